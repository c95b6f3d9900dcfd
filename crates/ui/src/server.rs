//! The HTTP server: routes, the store shared by the handlers, and the static files.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use kiln_experiment_db::{ExperimentDb, StoreLocation};

use crate::pages::{self, PageError, RunsParams};
use crate::{Error, Result};

const SCRIPT: &str = include_str!("../static/kiln.js");
const STYLE: &str = include_str!("../static/kiln.css");

/// The store, shared by the handlers; each request holds it while it reads.
type Shared = Arc<Mutex<ExperimentDb>>;

/// A dashboard bound to its address, ready to serve.
#[derive(Debug)]
pub struct Dashboard {
    listener: TcpListener,
    db: ExperimentDb,
}

impl Dashboard {
    /// Opens the store and listens on `addr` (port 0: any free port, see
    /// [`Dashboard::local_addr`]). The dashboard only reads the store (opening a store
    /// of an older kiln brings its schema up to date, as every kiln command does).
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be opened (naming it, and why);
    /// [`Error::Bind`] when the address cannot be listened on (a port in use says so).
    pub fn bind(location: &StoreLocation, addr: SocketAddr) -> Result<Self> {
        let db = ExperimentDb::open_location(location)?;
        let listener = TcpListener::bind(addr).map_err(|source| Error::Bind {
            addr,
            hint: match source.kind() {
                std::io::ErrorKind::AddrInUse => {
                    " (another program listens there: choose another port with --port)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (ports below 1024 need privileges: choose another with --port)"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    " (no interface of this machine has that address: check --host)"
                }
                _ => "",
            },
            source,
        })?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, db })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until the process ends, on a runtime of two threads (the store's reads
    /// run on its blocking pool).
    ///
    /// # Errors
    /// [`Error::Io`] when the runtime cannot start or the listener fails.
    pub fn serve(self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-ui")
            .enable_all()
            .build()?;
        let app = router(Arc::new(Mutex::new(self.db)));
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(self.listener)?;
            axum::serve(listener, app).await
        })?;
        Ok(())
    }
}

fn router(db: Shared) -> Router {
    Router::new()
        .route("/", get(runs))
        .route("/runs/{id}", get(run))
        .route("/runs/{id}/charts", get(run_charts))
        .route("/compare", get(compare))
        .route("/compare/charts", get(compare_charts))
        .route(
            "/static/kiln.js",
            get(|| async { static_file(SCRIPT, "text/javascript") }),
        )
        .route(
            "/static/kiln.css",
            get(|| async { static_file(STYLE, "text/css") }),
        )
        .fallback(|| async {
            respond(Err::<String, _>(PageError::NotFound("no such page".into())))
        })
        .with_state(db)
}

fn static_file(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Runs `page` on the store, on the runtime's blocking pool.
async fn with_db(
    db: Shared,
    page: impl FnOnce(&ExperimentDb) -> Result<String, PageError> + Send + 'static,
) -> Response {
    let rendered = tokio::task::spawn_blocking(move || {
        let db = db.lock().unwrap_or_else(PoisonError::into_inner);
        page(&db)
    })
    .await
    .unwrap_or_else(|e| {
        Err(PageError::Store(kiln_experiment_db::Error::Invalid(
            format!("the page's task failed: {e}"),
        )))
    });
    respond(rendered)
}

fn respond(rendered: Result<String, PageError>) -> Response {
    match rendered {
        Ok(html) => ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(error) => {
            let status = match &error {
                PageError::NotFound(_) => StatusCode::NOT_FOUND,
                PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
                PageError::Store(e) => {
                    tracing::error!(error = %e, "kiln ui: a page failed");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            (status, Html(pages::error_page(&error))).into_response()
        }
    }
}

async fn runs(State(db): State<Shared>, Query(params): Query<RunsParams>) -> Response {
    with_db(db, move |db| pages::runs(db, &params)).await
}

async fn run(State(db): State<Shared>, Path(id): Path<String>) -> Response {
    with_db(db, move |db| pages::run(db, &id)).await
}

async fn run_charts(State(db): State<Shared>, Path(id): Path<String>) -> Response {
    with_db(db, move |db| pages::run_charts(db, pages::run_id(&id)?)).await
}

async fn compare(State(db): State<Shared>, Query(query): Query<Vec<(String, String)>>) -> Response {
    with_db(db, move |db| pages::compare(db, &query)).await
}

async fn compare_charts(
    State(db): State<Shared>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    with_db(db, move |db| pages::compare_charts(db, &query)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreLocation::Sqlite(dir.path().join("kiln.sqlite"));
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Dashboard::bind(&store, addr).unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&addr.to_string()) && text.contains("--port"),
            "{text}"
        );
        let free = Dashboard::bind(&store, "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(free.local_addr().port(), 0);
    }
}
