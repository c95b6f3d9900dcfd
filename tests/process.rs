//! Child processes in tests: waiting for one within a time limit, and reading its
//! output without ever blocking it. Shared by kiln-tests and the `kiln` binary's
//! tests (included there by path: they share no crate).

use std::io::{BufReader, Read};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits for `child` at most `limit`; kills it and fails the test past that.
pub fn wait_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output of `child`, read on a thread so that a full pipe never blocks it.
pub fn collect(stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stream).read_to_string(&mut text);
        text
    })
}
