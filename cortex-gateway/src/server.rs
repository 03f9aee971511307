//! Starts cortex: binds the API and metrics listeners, starts the poller,
//! serves, and drains on shutdown (stop accepting, let open requests finish
//! up to `gateway.drain_timeout_ms`, then return).

use crate::api;
use crate::config::{ms, Config};
use crate::inference::{self, Route};
use crate::state::Gateway;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A running cortex.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Begins the drain: stop accepting, `/ready` turns 503.
    pub fn shutdown(&self) {
        self.gateway.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }

    /// Waits until the drain is over (or its timeout passed).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The API router, shared by the binary and the tests.
pub fn app(gw: Arc<Gateway>) -> Router {
    let limit = gw.config.gateway.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(api::list_models))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(request_id))
        .with_state(gw)
}

type Gw = State<Arc<Gateway>>;

async fn chat(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Chat, req).await
}
async fn completions(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Completions, req).await
}
async fn responses(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Responses, req).await
}
async fn embeddings(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Embeddings, req).await
}

/// Keeps the client's `x-request-id` (if sane) or makes one; puts it on the
/// request (for the neuron) and on every response.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .expect("uuid is a header value")
        });
    req.headers_mut().insert("x-request-id", id.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-request-id", id);
    resp
}

async fn metrics_text(State(gw): Gw) -> Response {
    let mut r = Response::new(axum::body::Body::from(gw.metrics.render()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn bind(addr: &str, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            what,
            source,
        })
}

/// Binds, starts the poller and serves until [`Running::shutdown`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    let api_listener = bind(&config.gateway.listen, "gateway.listen").await?;
    let metrics_listener = bind(&config.gateway.metrics_listen, "gateway.metrics_listen").await?;
    let addr = api_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.gateway.listen.clone(),
            what: "gateway.listen",
            source,
        })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.gateway.metrics_listen.clone(),
            what: "gateway.metrics_listen",
            source,
        })?;
    let gw = Arc::new(Gateway::new(config)?);
    let (tx, rx) = watch::channel(false);
    let poller = crate::poller::spawn(gw.clone());

    let metrics_app = Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(gw.clone());
    let mut mrx = rx.clone();
    let metrics_task = tokio::spawn(async move {
        let _ = axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move {
                let _ = mrx.wait_for(|v| *v).await;
            })
            .await;
    });

    let api = app(gw.clone());
    let drain = ms(gw.config.gateway.drain_timeout_ms);
    let listener = api_listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut srx = rx.clone();
    let mut drx = rx;
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, api).with_graceful_shutdown(async move {
            let _ = srx.wait_for(|v| *v).await;
        });
        let serve = std::future::IntoFuture::into_future(serve);
        tokio::pin!(serve);
        let deadline = async {
            let _ = drx.wait_for(|v| *v).await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            r = &mut serve => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "API server failed");
                }
                tracing::info!("drained; stopping");
            }
            _ = deadline => tracing::warn!(drain_ms = drain.as_millis() as u64,
                "drain timeout passed with requests still open; stopping"),
        }
        poller.abort();
        metrics_task.abort();
    });
    tracing::info!(%addr, %metrics_addr, neurons = gw.fleet.neurons.len(), "cortex listening");
    Ok(Running {
        addr,
        metrics_addr,
        gateway: gw,
        shutdown: tx,
        task,
    })
}
