//! Ollama's REST API, following its published reference: NDJSON streaming by
//! default, durations in nanoseconds, `done`/`done_reason`, `context`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Dialect};
use super::service::{collect, event_body, Event, Finished, GenRequest, KeepAlive, Service, TokenLogprob};
use super::{parse_json, priority};
use crate::head::chat::{Message, Prompt};
use crate::head::constraint::Format;
use crate::head::tools::{self, ToolCall, ToolChoice};
use crate::model::sampling::SamplingParams;

/// Ollama's `options`; unknown keys are ignored, as Ollama does.
#[derive(Debug, Default, Deserialize)]
pub struct Options {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub seed: Option<i64>,
    pub num_predict: Option<i64>,
    pub num_ctx: Option<i64>,
    pub stop: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct GenerateBody {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    pub system: Option<String>,
    #[serde(default)]
    pub raw: bool,
    pub stream: Option<bool>,
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Options,
    #[serde(default)]
    pub context: Vec<u32>,
    pub priority: Option<i32>,
    pub keep_alive: Option<Value>,
    /// Each token's log-probability in the answer, and this many alternatives'.
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub stream: Option<bool>,
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Options,
    pub priority: Option<i32>,
    pub keep_alive: Option<Value>,
    /// Each token's log-probability in the answer, and this many alternatives'.
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Functions the model may call.
    pub tools: Option<Value>,
}

/// Sampling from Ollama options, with Ollama's defaults; absurd values are refused.
pub fn sampling(o: &Options) -> Result<(SamplingParams, usize, usize, Vec<String>), ApiError> {
    let bad = |m: String| ApiError::bad_request(m);
    let top_k = match o.top_k {
        Some(k) if k < 0 => return Err(bad(format!("top_k must be >= 0, got {k}"))),
        Some(k) => k as usize,
        None => 40,
    };
    let num_predict = match o.num_predict {
        Some(n) if n < -2 => return Err(bad(format!("num_predict must be >= -2, got {n}"))),
        // -1: until the context is full; -2: fill the context.
        Some(n) if n < 0 => usize::MAX,
        Some(n) => n as usize,
        None => 128,
    };
    let num_ctx = match o.num_ctx {
        Some(n) if n <= 0 => return Err(bad(format!("num_ctx must be positive, got {n}"))),
        Some(n) => n as usize,
        None => 0,
    };
    let params = SamplingParams {
        temperature: o.temperature.unwrap_or(0.8),
        top_k,
        top_p: o.top_p.unwrap_or(0.9),
        min_p: o.min_p.unwrap_or(0.0),
        repeat_penalty: o.repeat_penalty.unwrap_or(1.1),
        repeat_last_n: o.repeat_last_n.map_or(64, |n| n.clamp(0, 4096) as usize),
        seed: o.seed.map_or_else(rand::random, |s| s as u64),
    };
    params.validate()?;
    Ok((params, num_predict, num_ctx, o.stop.clone().unwrap_or_default()))
}

/// Ollama's `format`: `"json"` (any JSON object) or a JSON schema.
fn format(format: &Option<Value>) -> Result<Option<Format>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Format::Json)),
        Some(schema @ Value::Object(_)) => Ok(Some(Format::Schema(schema.clone()))),
        Some(other) => Err(ApiError::bad_request(format!("format must be \"json\" or a JSON schema, not {other}"))),
    }
}

fn now() -> String {
    crate::api::rfc3339(std::time::SystemTime::now())
}

fn final_fields(f: &Finished) -> Value {
    let s = &f.result.stats;
    json!({
        "done": true,
        "done_reason": f.result.finish.as_str(),
        "total_duration": f.total.as_nanos() as u64,
        "load_duration": f.load.as_nanos() as u64,
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": s.prefill.as_nanos() as u64,
        "eval_count": s.generated_tokens,
        "eval_duration": s.decode.as_nanos() as u64,
        "_cluster": f.route,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Streams NDJSON lines, or collects them into one object when `stream` is false.
async fn respond(
    rx: tokio::sync::mpsc::Receiver<Event>,
    stream: bool,
    line: impl Fn(Option<&str>, Option<&Finished>) -> Value + Send + Sync + 'static,
) -> Response {
    if stream {
        let body = event_body(rx, move |event| {
            let value = match event {
                Event::Text(t, logprobs) => {
                    let mut v = line(Some(&t), None);
                    if !logprobs.is_empty() {
                        v["logprobs"] = logprob_entries(&logprobs);
                    }
                    v
                }
                Event::Done(f) => {
                    let mut v = line(None, Some(&f));
                    // Streamed with the pieces.
                    if let Some(o) = v.as_object_mut() {
                        o.remove("logprobs");
                    }
                    v
                }
                Event::Failed(e) => e.in_dialect(Dialect::Ollama).body(),
            };
            vec![format!("{value}\n")]
        });
        return Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    match collect(rx).await {
        Ok((text, f)) => {
            let mut v = line(None, Some(&f));
            // The full text where the streamed lines carry pieces.
            if v.get("response").is_some() {
                v["response"] = json!(text);
            } else {
                v["message"]["content"] = json!(text);
            }
            Json(v).into_response()
        }
        Err(e) => e.in_dialect(Dialect::Ollama).into_response(),
    }
}

/// What an Ollama request asks for, once its body is checked: loading a
/// model (an empty prompt, Ollama's way), or a generation.
pub enum Ask {
    /// Load a model (an empty prompt), or unload it (that and `keep_alive: 0`).
    Load(String, Option<KeepAlive>),
    Generate {
        gen: Box<GenRequest>,
        stream: bool,
    },
}

/// `/api/generate`'s body, checked: every refusal a client can cause
/// happens here, before anything is loaded or queued.
pub fn generate_request(body: &[u8], headers: &HeaderMap) -> Result<Ask, ApiError> {
    let req: GenerateBody = parse_json(body)?;
    let format = format(&req.format)?;
    let (params, max_tokens, num_ctx, stop) = sampling(&req.options)?;
    let keep_alive = keep_alive(&req.keep_alive)?;
    if req.prompt.is_empty() && req.system.is_none() {
        return Ok(Ask::Load(req.model, keep_alive));
    }
    let prompt = if req.raw {
        Prompt::Raw(req.prompt)
    } else {
        let mut m: Vec<Message> = req.system.iter().map(|s| Message::new("system", s)).collect();
        m.push(Message::new("user", &req.prompt));
        Prompt::chat(m)
    };
    let gen = GenRequest {
        model: req.model,
        prompt,
        context: req.context,
        params,
        max_tokens,
        stop,
        num_ctx,
        priority: priority(headers, req.priority),
        keep: false,
        logprobs: logprobs(req.logprobs, req.top_logprobs)?,
        keep_alive,
        format,
        tool_choice: ToolChoice::Auto,
    };
    Ok(Ask::Generate { gen: Box::new(gen), stream: req.stream.unwrap_or(true) })
}

/// `/api/chat`'s body, checked.
pub fn chat_request(body: &[u8], headers: &HeaderMap) -> Result<Ask, ApiError> {
    let req: ChatBody = parse_json(body)?;
    let format = format(&req.format)?;
    let (params, max_tokens, num_ctx, stop) = sampling(&req.options)?;
    let keep_alive = keep_alive(&req.keep_alive)?;
    if req.messages.is_empty() {
        return Ok(Ask::Load(req.model, keep_alive));
    }
    for m in &req.messages {
        if !["system", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!("unknown message role '{}'", m.role)));
        }
    }
    // Ollama's API has no `tool_choice`: the model decides.
    let tools = tools::parse_tools(req.tools.as_ref())?;
    let gen = GenRequest {
        model: req.model,
        prompt: Prompt::Chat { messages: req.messages, tools },
        context: vec![],
        params,
        max_tokens,
        stop,
        num_ctx,
        priority: priority(headers, req.priority),
        keep: true,
        logprobs: logprobs(req.logprobs, req.top_logprobs)?,
        keep_alive,
        format,
        tool_choice: ToolChoice::Auto,
    };
    Ok(Ask::Generate { gen: Box::new(gen), stream: req.stream.unwrap_or(true) })
}

/// Ollama's `logprobs` / `top_logprobs` (0–20) as the alternatives asked for.
fn logprobs(on: bool, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let max = crate::model::sampling::MAX_TOP_LOGPROBS as i64;
    match top {
        Some(n) if !(0..=max).contains(&n) => Err(ApiError::bad_request(format!("top_logprobs must be between 0 and {max}, got {n}"))),
        Some(n) if n > 0 && !on => Err(ApiError::bad_request("top_logprobs needs logprobs: true")),
        top => Ok(on.then(|| top.unwrap_or(0) as usize)),
    }
}

/// Calls as Ollama writes them: the arguments an object.
fn tool_calls(calls: &[ToolCall]) -> Value {
    calls.iter().enumerate().map(|(i, c)| json!({"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}})).collect()
}

/// Token log-probabilities as Ollama and OpenAI's chat write them.
pub fn logprob_entries(logprobs: &[TokenLogprob]) -> Value {
    let bytes = |t: &str| t.as_bytes().to_vec();
    logprobs
        .iter()
        .map(|l| {
            let top: Vec<Value> = l.top.iter().map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": bytes(t)})).collect();
            json!({"token": l.token, "logprob": l.logprob, "bytes": bytes(&l.token), "top_logprobs": top})
        })
        .collect()
}

/// `/api/embed`: `input` a string or a list of them, `truncate` (default true).
#[derive(Debug, Deserialize)]
pub struct EmbedBody {
    pub model: String,
    pub input: Value,
    pub truncate: Option<bool>,
    pub keep_alive: Option<Value>,
    #[allow(dead_code)]
    pub options: Option<Value>,
}

/// The texts of an embedding request's `input` (OpenAI's too): a string or a list of strings.
pub fn embed_inputs(input: &Value) -> Result<Vec<String>, ApiError> {
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request("input must be a string or a list of strings")))
            .collect(),
        _ => Err(ApiError::bad_request("input must be a string or a list of strings")),
    }
}

pub async fn embed(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let req: EmbedBody = parse_json(&body)?;
        let inputs = embed_inputs(&req.input)?;
        let e = svc.embed(&req.model, inputs, req.truncate.unwrap_or(true), keep_alive(&req.keep_alive)?).await?;
        Ok::<_, ApiError>(Json(json!({
            "model": req.model,
            "embeddings": e.embeddings,
            "total_duration": e.total.as_nanos() as u64,
            "load_duration": e.load.as_nanos() as u64,
            "prompt_eval_count": e.prompt_tokens,
        })))
    };
    answer.await.map_or_else(|e| e.in_dialect(Dialect::Ollama).into_response(), IntoResponse::into_response)
}

/// `/api/pull` and `/api/delete`: a catalog model by name.
#[derive(Debug, Deserialize)]
pub struct ModelBody {
    #[serde(alias = "name")]
    pub model: String,
    pub stream: Option<bool>,
    #[allow(dead_code)]
    pub insecure: Option<bool>,
}

/// The catalog entry a pull or delete names, if sollol can fetch it.
fn fetchable(svc: &Service, name: &str) -> Result<crate::model::catalog::CatalogEntry, ApiError> {
    svc.catalog_entry(name)
        .filter(|e| e.fetch.is_some())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("model '{name}' not found: sollol pulls the models of its catalog")))
}

/// `/api/pull`: fetches a catalog model into the cache (as `sollol pull`
/// does), streaming Ollama's progress objects: the bytes downloaded so far,
/// then the checksum, then "success".
pub async fn pull(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let req: ModelBody = parse_json(&body)?;
        let entry = fetchable(&svc, &req.model)?;
        let (file, _, partial) = crate::model::source::cache_files(&entry)
            .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no cache directory (set HOME or SOLLOL_CACHE)"))?;
        let digest = entry.fetch.as_ref().and_then(|f| f.sha256.clone()).map(|d| format!("sha256:{d}")).unwrap_or_default();
        let total = entry.fetch.as_ref().and_then(|f| f.size);
        let name = entry.name.clone();
        let fetch = tokio::task::spawn_blocking(move || crate::model::source::resolve_name(&name));
        if !req.stream.unwrap_or(true) {
            fetch.await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            return Ok(Json(json!({"status": "success"})).into_response());
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(16);
        tokio::spawn(async move {
            let _ = tx.send(json!({"status": "pulling manifest"})).await;
            // Bytes so far, out of the file's size: the partial download's, or the cached file's.
            let progress = || {
                let completed = std::fs::metadata(&partial).or_else(|_| std::fs::metadata(&file)).map_or(0, |m| m.len());
                let mut line = json!({"status": format!("pulling {}", entry.name), "digest": digest, "completed": completed});
                if let Some(total) = total {
                    line["total"] = json!(total);
                }
                line
            };
            let mut fetch = fetch;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(300));
            let done = loop {
                tokio::select! {
                    done = &mut fetch => break done,
                    _ = tick.tick() => { let _ = tx.send(progress()).await; }
                }
            };
            let last = match done {
                Ok(Ok(_)) => {
                    // The whole file, also when it was cached already (as Ollama reports a layer it has).
                    let _ = tx.send(progress()).await;
                    let _ = tx.send(json!({"status": "verifying sha256 digest"})).await;
                    let _ = tx.send(json!({"status": "writing manifest"})).await;
                    json!({"status": "success"})
                }
                Ok(Err(e)) => json!({"error": e.to_string()}),
                Err(e) => json!({"error": e.to_string()}),
            };
            let _ = tx.send(last).await;
        });
        let lines = futures_util::stream::unfold(rx, |mut rx| async move {
            let v = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(format!("{v}\n")), rx))
        });
        Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(axum::body::Body::from_stream(lines))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    };
    answer.await.unwrap_or_else(|e| e.in_dialect(Dialect::Ollama).into_response())
}

/// `/api/delete`: removes a catalog model's file from the cache (a copy
/// already loaded on nodes serves on; the next load fetches it again).
pub async fn delete(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let req: ModelBody = parse_json(&body)?;
        let entry = fetchable(&svc, &req.model)?;
        let (file, verified, _) =
            crate::model::source::cache_files(&entry).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no cache directory"))?;
        if !file.exists() {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("model '{}' not found", req.model)));
        }
        std::fs::remove_file(&file)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot delete {}: {e}", file.display())))?;
        let _ = std::fs::remove_file(&verified);
        Ok(StatusCode::OK.into_response())
    };
    answer.await.unwrap_or_else(|e| e.in_dialect(Dialect::Ollama).into_response())
}

/// `/api/embeddings` (Ollama's older endpoint): one `prompt`, one `embedding`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsBody {
    pub model: String,
    pub prompt: String,
}

pub async fn embeddings(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let req: EmbeddingsBody = parse_json(&body)?;
        let mut e = svc.embed(&req.model, vec![req.prompt], true, None).await?;
        Ok::<_, ApiError>(Json(json!({ "embedding": e.embeddings.pop().unwrap_or_default() })))
    };
    answer.await.map_or_else(|e| e.in_dialect(Dialect::Ollama).into_response(), IntoResponse::into_response)
}

/// Ollama's answer to a load request, or to an unload (`keep_alive: 0`).
async fn load(svc: &Arc<Service>, model: String, chat: bool, keep_alive: Option<KeepAlive>) -> Result<Response, ApiError> {
    let mut v = json!({"model": model, "created_at": now(), "done": true});
    if keep_alive == Some(KeepAlive::For(std::time::Duration::ZERO)) {
        svc.unload(&model).await?;
        v["done_reason"] = json!("unload");
    } else {
        let w = svc.worker(&model).await?;
        w.keep_alive_for(keep_alive);
        v["done_reason"] = json!("load");
        v["load_duration"] = json!(w.load_duration.as_nanos() as u64);
    }
    if chat {
        v["message"] = json!({"role": "assistant", "content": ""});
    } else {
        v["response"] = json!("");
    }
    Ok(Json(v).into_response())
}

/// Ollama's `keep_alive`: seconds as a number, or a duration (`"5m"`,
/// `"1h30m"`, `"0"`); negative keeps the model loaded for good.
pub fn keep_alive(v: &Option<Value>) -> Result<Option<KeepAlive>, ApiError> {
    let bad = || ApiError::bad_request("keep_alive must be a number of seconds or a duration like \"5m\"");
    let secs: f64 = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64().ok_or_else(bad)?,
        Some(Value::String(s)) => parse_duration(s.trim()).ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    if secs < 0.0 {
        return Ok(Some(KeepAlive::Forever));
    }
    if !secs.is_finite() || secs > 1e9 {
        return Err(bad());
    }
    Ok(Some(KeepAlive::For(std::time::Duration::from_secs_f64(secs))))
}

/// Go's duration syntax (`"1h30m"`, `"90s"`, `"-1m"`, `"250ms"`), or bare seconds.
fn parse_duration(s: &str) -> Option<f64> {
    if let Ok(n) = s.parse::<f64>() {
        return Some(n);
    }
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s),
    };
    let mut total = 0.0;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(split);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = next;
    }
    Some(sign * total)
}

pub async fn generate(State(svc): State<Arc<Service>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    answer(&svc, &headers, &body, false).await.unwrap_or_else(|e| e.in_dialect(Dialect::Ollama).into_response())
}

pub async fn chat(State(svc): State<Arc<Service>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    answer(&svc, &headers, &body, true).await.unwrap_or_else(|e| e.in_dialect(Dialect::Ollama).into_response())
}

/// Checks, admits and answers `/api/chat` (`chat`) or `/api/generate`: the
/// two differ in their request and in where a line carries the text.
async fn answer(svc: &Arc<Service>, headers: &HeaderMap, body: &[u8], chat: bool) -> Result<Response, ApiError> {
    let ask = if chat { chat_request(body, headers)? } else { generate_request(body, headers)? };
    let (gen, stream) = match ask {
        Ask::Load(model, keep_alive) => return load(svc, model, chat, keep_alive).await,
        Ask::Generate { gen, stream } => (*gen, stream),
    };
    let model = gen.model.clone();
    let rx = svc.generate(gen).await?;
    Ok(respond(rx, stream, move |piece, finished| {
        let text = piece.unwrap_or("");
        let mut v = json!({"model": model, "created_at": now()});
        if chat {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        match finished {
            None => {
                v["done"] = json!(false);
                v
            }
            Some(f) => {
                if !chat {
                    let mut context = f.prompt_ids.clone();
                    context.extend(&f.result.tokens);
                    v["context"] = json!(context);
                }
                if !f.logprobs.is_empty() {
                    v["logprobs"] = logprob_entries(&f.logprobs);
                }
                if !f.tool_calls.is_empty() {
                    v["message"]["tool_calls"] = tool_calls(&f.tool_calls);
                }
                merge(v, final_fields(f))
            }
        }
    })
    .await)
}

fn details(family: &str, quantization: &str, params: Option<u64>) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params.map_or(String::new(), |p| if p >= 1_000_000_000 { format!("{:.1}B", p as f64 / 1e9) } else { format!("{}M", p / 1_000_000) }),
        "quantization_level": quantization,
    })
}

/// Models this head can serve: the loaded ones, plus catalog models whose file is cached.
pub async fn tags(State(svc): State<Arc<Service>>) -> Json<Value> {
    Json(json!({ "models": super::model_list(&svc).await.into_iter().map(|m| json!({
        "name": m.name, "model": m.name, "modified_at": crate::api::rfc3339(m.modified), "size": m.size,
        "digest": m.digest, "details": details(&m.family, &m.quantization, None),
    })).collect::<Vec<_>>() }))
}

pub async fn ps(State(svc): State<Arc<Service>>) -> Json<Value> {
    let models: Vec<Value> = svc
        .loaded()
        .await
        .iter()
        .map(|w| {
            json!({
                "name": w.name, "model": w.name, "size": w.size, "digest": w.digest,
                "details": details(w.config.arch.name, &w.quantization, None),
                // Never: a hundred years on, as Ollama shows a negative keep_alive.
                "expires_at": super::rfc3339(w.expires_at().unwrap_or_else(|| std::time::SystemTime::now() + std::time::Duration::from_secs(100 * 365 * 86_400))),
                "size_vram": 0, "_cluster": w.route(),
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

#[derive(Deserialize)]
pub struct ShowBody {
    #[serde(alias = "name")]
    model: String,
}

pub async fn show(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let req: ShowBody = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let w = match svc.worker(&req.model).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let c = &w.config;
    let arch = c.arch.name;
    Json(json!({
        "modelfile": format!("FROM {}\n", w.name),
        "parameters": "",
        "template": w.tokenizer.chat_template().map_or("", |_| "{{ chat_template }}"),
        "details": details(arch, &w.quantization, None),
        "model_info": {
            "general.architecture": arch,
            format!("{arch}.block_count"): c.n_layers,
            format!("{arch}.embedding_length"): c.hidden_size,
            format!("{arch}.context_length"): c.context_length,
            format!("{arch}.attention.head_count"): c.n_heads,
            format!("{arch}.attention.head_count_kv"): c.n_kv_heads,
            format!("{arch}.feed_forward_length"): c.intermediate_size,
            format!("{arch}.vocab_size"): c.vocab_size,
        },
        // Every model takes tools: a template without them gets ours.
        "capabilities": ["completion", "tools"],
        "_cluster": w.route(),
    }))
    .into_response()
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

pub async fn root() -> &'static str {
    "Ollama is running"
}
