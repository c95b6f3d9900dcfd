//! `kiln ui` in a real browser: headless Chromium driven through ChromeDriver's
//! WebDriver protocol (Debian's `chromium` and `chromium-driver`, which `.ci/run`
//! installs), checking what a person sees. Screenshots of each page go to
//! `$CARGO_TARGET_TMPDIR/ui-screenshots/`.
#![cfg(not(feature = "cuda-nccl"))]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_experiment_db::{
    EndStatus, ExperimentDb, MetricPoint, NewRun, RunId, RunTracker, StoreLocation,
};
use serde_json::{Value, json};

/// The first of `names` found on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Polls `check` until it returns `Some`, or fails naming `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Headless Chromium in a WebDriver session of a ChromeDriver of its own.
struct Browser {
    base: String,
    session: String,
    _driver: Killed,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// `None` (after saying why) when Chromium or ChromeDriver is missing, outside CI.
    fn start() -> Option<Self> {
        let (Some(chromium), Some(driver)) = (
            on_path(&["chromium", "chromium-browser", "google-chrome"]),
            on_path(&["chromedriver"]),
        ) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs the browser test: install Debian's chromium and chromium-driver"
            );
            eprintln!(
                "skipped: the browser test needs Chromium and ChromeDriver on PATH \
                 (Debian: apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Killed(
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}");
        wait_for("ChromeDriver to be ready", Duration::from_secs(30), || {
            let status: Value = ureq::get(&format!("{base}/status"))
                .call()
                .ok()?
                .into_json()
                .ok()?;
            (status["value"]["ready"] == true).then_some(())
        });
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let created: Value = ureq::post(&format!("{base}/session"))
            .send_json(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}}))
            .unwrap_or_else(|e| panic!("cannot start Chromium through ChromeDriver: {e}"))
            .into_json()
            .unwrap();
        let session = created["value"]["sessionId"].as_str().unwrap().to_string();
        Some(Self {
            base,
            session,
            _driver: driver,
            _profile: profile,
        })
    }

    fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let response: Value = ureq::post(&url)
            .send_json(body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
            .into_json()
            .unwrap();
        response["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.command("url", json!({ "url": url }));
    }

    /// The value the script returns (`return ...;`), evaluated in the page.
    fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
    }

    fn screenshot(&self, name: &str, engine: Engine) -> PathBuf {
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let response: Value = ureq::get(&url).call().unwrap().into_json().unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(response["value"].as_str().unwrap())
            .unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-{engine:?}.png").to_lowercase());
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
    }
}

fn new_run(name: &str, params: &[(&str, &str)]) -> NewRun {
    NewRun {
        experiment: "lm".into(),
        name: name.into(),
        config: json!({}),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        kiln_version: "0.1.0".into(),
        git_commit: None,
        host: "test".into(),
    }
}

fn losses(steps: std::ops::Range<u64>) -> Vec<MetricPoint> {
    steps
        .map(|step| MetricPoint {
            key: "loss".into(),
            split: "train".into(),
            step,
            epoch: 0,
            value: 3.0 / (step as f64 + 1.0),
            wall_time: 1_700_000_000.0 + step as f64,
        })
        .collect()
}

/// A store with a finished, a failed and a RUNNING run; the RUNNING one's handle.
fn store(location: &StoreLocation) -> (ExperimentDb, RunId) {
    let mut db = ExperimentDb::open_location(location).unwrap();
    let alpha = db
        .start_run(&new_run(
            "alpha",
            &[("lr", "0.001"), ("opt", "adam"), ("seed", "1")],
        ))
        .unwrap();
    db.log_metrics(alpha, &losses(0..12)).unwrap();
    db.finish_run(alpha, EndStatus::Finished, None).unwrap();
    let beta = db
        .start_run(&new_run(
            "beta",
            &[("lr", "0.003"), ("opt", "adam"), ("seed", "1")],
        ))
        .unwrap();
    db.log_metrics(beta, &losses(0..12)).unwrap();
    db.finish_run(beta, EndStatus::Failed, Some("non-finite loss at step 12"))
        .unwrap();
    let live = db
        .start_run(&new_run(
            "live",
            &[("lr", "0.001"), ("opt", "sgd"), ("seed", "1")],
        ))
        .unwrap();
    db.log_metrics(live, &losses(0..5)).unwrap();
    db.flush().unwrap();
    (db, live)
}

/// `kiln ui` on the store, on a free port; its address.
fn serve(location: &StoreLocation) -> (Killed, String) {
    let db = match location {
        StoreLocation::Sqlite(path) => path.display().to_string(),
        StoreLocation::Postgres(url) => url.clone(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["ui", "--db", &db, "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("kiln ui printed {line:?}"))
        .to_string();
    (Killed(child), url)
}

/// Which store the dashboard serves.
#[derive(Debug, Clone, Copy)]
enum Engine {
    Sqlite,
    Postgres,
}

#[rstest::rstest]
fn the_dashboard_shows_runs_curves_and_comparisons_live_in_a_browser(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let dir = tempfile::tempdir().unwrap();
    let database = match engine {
        Engine::Sqlite => None,
        Engine::Postgres => match kiln_experiment_db::testing::TempDatabase::create() {
            Some(database) => Some(database),
            None => return,
        },
    };
    let location: StoreLocation = match &database {
        Some(database) => database.url.parse().unwrap(),
        None => StoreLocation::Sqlite(dir.path().join("kiln.sqlite")),
    };
    let Some(browser) = Browser::start() else {
        return;
    };
    let (mut db, live) = store(&location);
    let (_server, url) = serve(&location);

    // The runs, with their statuses.
    browser.goto(&format!("{url}/"));
    let rows = browser.eval(
        "return Array.from(document.querySelectorAll('tr[data-run]')).map(r => \
         [r.querySelector('td:nth-child(4)').textContent, r.querySelector('.status').textContent]);",
    );
    assert_eq!(
        rows,
        json!([
            ["alpha", "FINISHED"],
            ["beta", "FAILED"],
            ["live", "RUNNING"]
        ])
    );
    browser.screenshot("runs", engine);
    // The filter form filters, as `kiln runs list --filter` does.
    browser.goto(&format!("{url}/?filter=param.lr%3E%3D0.002"));
    let names = browser.eval(
        "return Array.from(document.querySelectorAll('tr[data-run] td:nth-child(4)')).map(c => c.textContent);",
    );
    assert_eq!(names, json!(["beta"]));

    // One run: a curve of its 12 points.
    browser.goto(&format!("{url}/runs/1"));
    let drawn = browser.eval(
        "const c = document.querySelector('figure[data-series=\"train/loss\"] polyline.curve'); \
         return [c.getAttribute('data-points'), c.getAttribute('points').trim().split(' ').length];",
    );
    assert_eq!(drawn, json!(["12", 12]));
    assert_eq!(
        browser.eval("return document.querySelector('.status').textContent;"),
        json!("FINISHED")
    );
    browser.screenshot("run", engine);

    // Comparing the runs ticked on the runs page: one curve per run, the differing
    // params marked.
    browser.goto(&format!("{url}/"));
    browser.eval(
        "document.querySelectorAll('input[name=run]').forEach(b => b.checked = true); \
         document.querySelector('form[action=\"/compare\"]').submit(); return null;",
    );
    wait_for("the comparison page", Duration::from_secs(20), || {
        let title = browser.eval("return document.title;");
        title
            .as_str()?
            .starts_with("compare runs 1, 2, 3")
            .then_some(())
    });
    let curves = browser.eval(
        "return Array.from(document.querySelectorAll('figure[data-series=\"train/loss\"] polyline.curve')).map(c => c.getAttribute('data-run'));",
    );
    assert_eq!(curves, json!(["1", "2", "3"]));
    let differing = browser.eval(
        "return Array.from(document.querySelectorAll('tr.differs td:nth-child(2)')).map(c => c.textContent);",
    );
    assert_eq!(differing, json!(["lr", "opt"]));
    browser.screenshot("compare", engine);

    // The RUNNING run's curve takes a new point without the page being reloaded.
    browser.goto(&format!("{url}/runs/{live}"));
    let points = "return document.querySelector('figure[data-series=\"train/loss\"] polyline.curve').getAttribute('data-points');";
    assert_eq!(browser.eval(points), json!("5"));
    browser.eval("window.kilnMarker = 42; return null;");
    db.log_metrics(live, &losses(5..6)).unwrap();
    db.flush().unwrap();
    wait_for(
        "the new point in the live curve",
        Duration::from_secs(20),
        || (browser.eval(points) == json!("6")).then_some(()),
    );
    assert_eq!(
        browser.eval("return window.kilnMarker;"),
        json!(42),
        "the page was reloaded"
    );
    browser.screenshot("live", engine);

    // A run that does not exist: a 404 page, in the browser and over HTTP.
    browser.goto(&format!("{url}/runs/999"));
    assert_eq!(
        browser.eval("return document.title;"),
        json!("not found · kiln")
    );
    assert!(matches!(
        ureq::get(&format!("{url}/runs/999")).call(),
        Err(ureq::Error::Status(404, _))
    ));
}
