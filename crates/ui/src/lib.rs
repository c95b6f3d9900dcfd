//! kiln's web dashboard over an experiment store (SQLite or PostgreSQL): the runs,
//! filtered and sorted as `kiln runs list` does; one run with its params, summaries,
//! resumes, artifacts and a curve of every metric; and a comparison of chosen runs
//! with overlaid curves and the differing params marked. The curves of a RUNNING run
//! follow it as it trains (the page fetches them again every second).
//!
//! Everything is served by this crate: HTML rendered on the server, charts drawn as
//! inline SVG, one small script and one style sheet compiled in. No CDN, no login:
//! it listens on 127.0.0.1 unless told otherwise.
//!
//! ```no_run
//! use kiln_experiment_db::StoreLocation;
//!
//! let store: StoreLocation = "runs/kiln.sqlite".parse()?;
//! let ui = kiln_ui::Dashboard::bind(&store, "127.0.0.1:8080".parse()?)?;
//! println!("serving http://{}", ui.local_addr());
//! ui.serve()?; // until the process ends
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chart;
mod html;
mod pages;
mod server;

pub use server::Dashboard;

/// Errors of the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be listened on (a port in use, an address not of this
    /// machine, a port below 1024 without the right).
    #[error("kiln ui: cannot listen on {addr}{hint}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the system said.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] kiln_experiment_db::Error),
    /// The server's runtime failed.
    #[error("kiln ui: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias of the dashboard.
pub type Result<T, E = Error> = std::result::Result<T, E>;
