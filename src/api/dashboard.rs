//! The dashboard: a static page served by the binary, refreshed from a JSON
//! status endpoint (nodes, the layer map of every loaded model, tok/s, queue).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Html;
use axum::Json;
use serde_json::{json, Value};

use super::service::Service;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

pub async fn status(State(svc): State<Arc<Service>>) -> Json<Value> {
    let nodes = svc.node_health().await;
    let workers: Vec<Value> = svc
        .loaded()
        .await
        .iter()
        .map(|w| {
            let replicas: Vec<Value> = w
                .replicas()
                .iter()
                .map(|r| {
                    let (running, served) = r.load();
                    let p = r.pipeline();
                    json!({
                        "route": r.route(), "running": running, "served": served, "micro_batches": p.micro_batches_now(),
                        "ring": p.ringed(), "ring_steps": p.ring_steps(),
                    })
                })
                .collect();
            json!({"model": w.name, "n_layers": w.config.n_layers, "route": w.route(), "replicas": replicas, "rebalances": w.rebalances()})
        })
        .collect();
    let (running, waiting) = svc.queue.depth();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "nodes": nodes,
        "models": workers,
        "queue": {"running": running, "waiting": waiting, "slots": svc.cfg.parallel, "max_waiting": svc.cfg.max_queue},
        "tok_s": svc.recent_tok_s(),
        "conversations": svc.conversations(),
        "tokens_generated": svc.metrics.tokens_generated(),
        "history": svc.history.samples(),
    }))
}
