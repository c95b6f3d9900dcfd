//! `kiln ui`: the web dashboard over the experiment store (`kiln-ui`).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use kiln_experiment_db::StoreLocation;

/// Serve a web dashboard over the experiment store.
#[derive(Debug, Clone, Parser)]
pub struct UiArgs {
    /// Experiment store: a SQLite file, or a PostgreSQL database as
    /// postgres://user[:password]@host[:port]/dbname (default: <output-dir>/kiln.sqlite).
    #[arg(long, value_name = "FILE|URL")]
    db: Option<StoreLocation>,
    /// Directory whose kiln.sqlite to serve.
    #[arg(long, default_value = "runs")]
    output_dir: PathBuf,
    /// Address to listen on. The dashboard has no login: any other address than
    /// loopback lets whoever reaches it read the store.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

pub fn run(args: &UiArgs) -> Result<()> {
    let location = crate::train::existing_store(args.db.as_ref(), &args.output_dir)?;
    if !args.host.is_loopback() {
        eprintln!(
            "kiln ui: warning: listening on {}, not loopback: the dashboard has no login, so \
             anyone who reaches this address can read the store",
            args.host
        );
    }
    let ui = kiln_ui::Dashboard::bind(&location, SocketAddr::new(args.host, args.port))?;
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "kiln ui: serving http://{} (store: {location}); Ctrl-C stops it",
        ui.local_addr()
    )?;
    stdout.flush()?;
    Ok(ui.serve()?)
}
