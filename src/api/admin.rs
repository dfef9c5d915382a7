//! Operator endpoints of the head: moving a node's work elsewhere while it serves.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::service::Service;

/// `POST /api/sollol/drain {"node": NAME_OR_ADDR, "to": NAME_OR_ADDR?}`: every
/// loaded model's stage on `node` moves, with its live sessions' KV state,
/// to `to` or to the best idle registered node. What `sollol cluster drain` calls.
pub async fn drain(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    let req: Value = super::parse_json(&body)?;
    let node = req["node"].as_str().ok_or_else(|| ApiError::bad_request("'node' is required"))?;
    let moved = svc.drain(node, req["to"].as_str()).await.map_err(ApiError::from)?;
    let moved: Vec<Value> = moved
        .iter()
        .map(|d| {
            json!({
                "model": d.model, "stage": d.stage, "from": d.replaced.old, "to": d.to, "to_addr": d.replaced.new,
                "sessions_moved": d.replaced.sessions_moved, "kv_bytes": d.replaced.kv_bytes,
                "paused_ms": d.replaced.paused.as_secs_f64() * 1e3,
            })
        })
        .collect();
    Ok(Json(json!({ "drained": node, "moved": moved })))
}
