//! The head's HTTP server: Ollama's and OpenAI's APIs, Prometheus metrics and
//! a dashboard, over the service in `service`.
//!
//! Architecture invariant: only `api` knows JSON and HTTP; it converts at the
//! edge to `service::GenRequest` and back.

pub mod admin;
pub mod dashboard;
pub mod error;
pub mod history;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod service;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use error::ApiError;
use service::{ServeConfig, Service};

/// Requests larger than this are refused before parsing (a 1 MB prompt fits).
pub const MAX_BODY: usize = 8 << 20;

pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/", get(ollama::root).head(ollama::root))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/pull", post(ollama::pull))
        .route("/api/delete", axum::routing::delete(ollama::delete))
        .route("/api/version", get(ollama::version))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/metrics", get(metrics_handler))
        .route("/dashboard", get(dashboard::page))
        .route("/api/sollol/status", get(dashboard::status))
        .route("/api/sollol/drain", post(admin::drain))
        .layer(middleware::from_fn_with_state(svc.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(svc)
}

/// Serves until SIGINT or SIGTERM.
pub async fn serve(cfg: ServeConfig) -> crate::Result<()> {
    let listen = cfg.listen;
    let svc = Service::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| crate::Error::io(format!("cannot listen on {listen}"), e))?;
    let local = listener.local_addr().map_err(|e| crate::Error::io("listen address", e))?;
    let stop = crate::sys::stop_signal().map_err(|e| crate::Error::io("signal handlers", e))?;
    println!("sollol serving on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    axum::serve(listener, router(svc)).with_graceful_shutdown(stop).await.map_err(|e| crate::Error::io("http server", e))
}

/// Counts every request by route and status, and tags it with a request id
/// (the caller's `x-request-id`, or a fresh one) in logs and in the response.
async fn observe(State(svc): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %path);
    let mut response = next.run(req).instrument(span.clone()).await;
    let route = match path.as_str() {
        p if KNOWN_ROUTES.contains(&p) => p,
        _ => "other",
    };
    svc.metrics.request(route, response.status().as_u16());
    span.in_scope(|| tracing::info!(status = response.status().as_u16(), "done"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

const KNOWN_ROUTES: &[&str] = &[
    "/",
    "/api/generate",
    "/api/chat",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/version",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/metrics",
    "/dashboard",
    "/api/sollol/status",
];

async fn metrics_handler(State(svc): State<Arc<Service>>) -> Response {
    // Node health is sampled when scraped.
    svc.node_health().await;
    let (running, waiting) = svc.queue.depth();
    svc.metrics.queue(running, waiting);
    Response::builder().header("content-type", metrics::CONTENT_TYPE).body(svc.metrics.render().into()).unwrap_or_default()
}

/// JSON bodies parsed by hand, so malformed input gets the API's own error shape.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The request's priority: the body's `priority`, else the `x-priority` header, else 0.
pub fn priority(headers: &HeaderMap, body: Option<i32>) -> i32 {
    body.or_else(|| headers.get("x-priority")?.to_str().ok()?.trim().parse().ok()).unwrap_or(0)
}

/// UTC time as RFC 3339 with nanoseconds, as Ollama writes it.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = crate::head::chat::civil_from_days(days);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_nanos())
}

pub struct ListedModel {
    pub name: String,
    pub size: u64,
    pub digest: String,
    pub modified: SystemTime,
    pub family: String,
    pub quantization: String,
}

/// The loaded models, then catalog models whose file is already in the cache.
pub async fn model_list(svc: &Service) -> Vec<ListedModel> {
    let mut out: Vec<ListedModel> = svc
        .loaded()
        .await
        .iter()
        .map(|w| ListedModel {
            name: w.name.clone(),
            size: w.size,
            digest: w.digest.clone(),
            modified: w.loaded_at,
            family: w.config.arch.name.to_string(),
            quantization: w.quantization.clone(),
        })
        .collect();
    if let (Ok(catalog), Some(cache)) = (crate::model::catalog::Catalog::load(), crate::paths::cache_dir()) {
        for e in catalog.entries {
            let Some(f) = &e.fetch else { continue };
            let path = cache.join("models").join(&f.file);
            if out.iter().any(|m| m.name == e.name) {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(&path) {
                out.push(ListedModel {
                    name: e.name.clone(),
                    size: meta.len(),
                    digest: f.sha256.clone().unwrap_or_default(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    family: e.architecture.clone(),
                    quantization: String::new(),
                });
            }
        }
    }
    out
}
