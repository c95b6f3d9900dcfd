// kiln ui: keeps the curves of RUNNING runs live. An element with `data-live="URL"`
// is refilled with what URL returns, every second, while the fragment says
// `data-running="true"`; the page itself is never reloaded.
(function () {
  "use strict";
  var live = document.querySelector("[data-live]");
  if (!live) {
    return;
  }
  var url = live.getAttribute("data-live");
  function running() {
    var marked = live.querySelector("[data-running]");
    return !marked || marked.getAttribute("data-running") === "true";
  }
  function tick() {
    fetch(url, { cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== live.innerHTML) {
          live.innerHTML = html;
        }
      })
      .catch(function () {
        // The server went away for a moment: try again at the next tick.
      })
      .then(function () {
        if (running()) {
          window.setTimeout(tick, 1000);
        }
      });
  }
  window.setTimeout(tick, 1000);
})();
