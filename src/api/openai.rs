//! OpenAI's API: chat and text completions (SSE streaming ending in
//! `data: [DONE]`, or one JSON object), model listing, OpenAI's error shape.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Dialect};
use super::service::{collect, event_body, Event, Finished, GenRequest, Service, TokenLogprob};
use super::{parse_json, priority};
use crate::head::chat::{Message, Prompt};
use crate::head::constraint::Format;
use crate::head::tools::{self, ToolCall, ToolChoice};
use crate::model::sampling::SamplingParams;

/// `stop` may be a string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: String,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub priority: Option<i32>,
    /// Chat: `true` for each token's log-probability; completions: how many
    /// alternatives (0–5) to report with it.
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token (0–20), with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}`.
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatBody {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<ChatMessage>,
    /// Functions the model may call, and whether it must.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
}

/// Content may be a string or a list of parts; only text parts are supported.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    /// An assistant turn's calls, fed back.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a tool turn answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: Value,
}

fn sampling(c: &CommonParams) -> Result<(SamplingParams, usize, Vec<String>), ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    let max = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = match max {
        Some(m) if m <= 0 => return Err(ApiError::bad_request(format!("max_tokens must be positive, got {m}"))),
        Some(m) => m as usize,
        None => 256,
    };
    if c.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2"));
    }
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: c.seed.map_or_else(rand::random, |s| s as u64),
    };
    params.validate()?;
    let stop = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() > 4 => return Err(ApiError::bad_request("at most 4 stop sequences")),
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok((params, max_tokens, stop))
}

fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(ApiError::bad_request("only text content parts are supported")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
        _ => Err(ApiError::bad_request("message content must be a string or a list of text parts")),
    }
}

fn usage(f: &Finished) -> Value {
    let s = &f.result.stats;
    let prompt = s.prompt_tokens + s.cached_tokens;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": s.generated_tokens,
        "total_tokens": prompt + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

fn finish_reason(f: &Finished) -> &'static str {
    match f.result.finish {
        _ if !f.tool_calls.is_empty() => "tool_calls",
        crate::head::generation::FinishReason::Length => "length",
        _ => "stop",
    }
}

/// Calls as OpenAI writes them: the arguments a string of JSON; `index`
/// too in a streamed delta.
fn tool_calls(calls: &[ToolCall], streamed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}});
            if streamed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What differs between chat and text completions.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

async fn respond(rx: tokio::sync::mpsc::Receiver<Event>, stream: bool, model: String, kind: Kind) -> Response {
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{:016x}", rand::random::<u64>()),
        Kind::Text => format!("cmpl-{:016x}", rand::random::<u64>()),
    };
    if stream {
        let chunk_object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let first = std::sync::atomic::AtomicBool::new(true);
        // A chat chunk's delta carries text or calls.
        let chunk = move |text: Option<&str>, calls: Option<Value>, finish: Option<&str>| -> Value {
            let choice = match kind {
                Kind::Chat => {
                    let mut delta = json!({});
                    if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        delta["role"] = json!("assistant");
                    }
                    if let Some(t) = text {
                        delta["content"] = json!(t);
                    }
                    if let Some(c) = calls {
                        delta["tool_calls"] = c;
                    }
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
                Kind::Text => {
                    json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
                }
            };
            json!({"id": id, "object": chunk_object, "created": created(), "model": model, "choices": [choice]})
        };
        // Where the next piece starts in the whole text (completions' `text_offset`).
        let offset = std::sync::atomic::AtomicUsize::new(0);
        let body = event_body(rx, move |event| match event {
            Event::Text(t, logprobs) => {
                let mut c = chunk(Some(&t), None, None);
                // Each piece's tokens' log-probabilities ride with it.
                let at = offset.fetch_add(logprobs.iter().map(|l| l.token.len()).sum(), std::sync::atomic::Ordering::Relaxed);
                c["choices"][0]["logprobs"] = logprobs_value(&logprobs, kind, at);
                vec![format!("data: {c}\n\n")]
            }
            Event::Done(f) => {
                let mut lines = Vec::new();
                if !f.tool_calls.is_empty() {
                    // Each call whole, in one delta: the client's accumulator takes it as is.
                    lines.push(format!("data: {}\n\n", chunk(None, Some(tool_calls(&f.tool_calls, true)), None)));
                }
                let mut last = chunk(None, None, Some(finish_reason(&f)));
                last["usage"] = usage(&f);
                last["_cluster"] = json!(f.route);
                lines.push(format!("data: {last}\n\n"));
                lines.push("data: [DONE]\n\n".to_string());
                lines
            }
            Event::Failed(e) => vec![format!("data: {}\n\n", e.in_dialect(Dialect::OpenAi).body()), "data: [DONE]\n\n".to_string()],
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    match collect(rx).await {
        Ok((text, f)) => {
            let (object, choice) = match kind {
                Kind::Chat => {
                    let mut message = json!({"role": "assistant", "content": text});
                    if !f.tool_calls.is_empty() {
                        message["tool_calls"] = tool_calls(&f.tool_calls, false);
                        if text.is_empty() {
                            message["content"] = Value::Null;
                        }
                    }
                    (
                        "chat.completion",
                        json!({"index": 0, "message": message, "logprobs": logprobs_value(&f.logprobs, kind, 0), "finish_reason": finish_reason(&f)}),
                    )
                }
                Kind::Text => (
                    "text_completion",
                    json!({"index": 0, "text": text, "logprobs": logprobs_value(&f.logprobs, kind, 0), "finish_reason": finish_reason(&f)}),
                ),
            };
            Json(json!({"id": id, "object": object, "created": created(), "model": model, "choices": [choice], "usage": usage(&f), "_cluster": f.route}))
                .into_response()
        }
        Err(e) => e.in_dialect(Dialect::OpenAi).into_response(),
    }
}

/// A checked request of either kind: the generation, and whether to stream.
pub struct Ask {
    pub gen: GenRequest,
    pub stream: bool,
}

/// The alternatives a request asks for, in either kind's dialect.
fn logprobs(c: &CommonParams, kind: Kind) -> Result<Option<usize>, ApiError> {
    let max = crate::model::sampling::MAX_TOP_LOGPROBS as i64;
    match (kind, &c.logprobs) {
        (Kind::Chat, None | Some(Value::Null) | Some(Value::Bool(false))) => match c.top_logprobs {
            Some(n) if n > 0 => Err(ApiError::bad_request("top_logprobs needs logprobs: true")),
            _ => Ok(None),
        },
        (Kind::Chat, Some(Value::Bool(true))) => match c.top_logprobs {
            Some(n) if !(0..=max).contains(&n) => Err(ApiError::bad_request(format!("top_logprobs must be between 0 and {max}"))),
            n => Ok(Some(n.unwrap_or(0) as usize)),
        },
        (Kind::Text, None | Some(Value::Null)) => Ok(None),
        (Kind::Text, Some(v)) => match v.as_i64() {
            Some(n) if (0..=5).contains(&n) => Ok(Some(n as usize)),
            _ => Err(ApiError::bad_request("logprobs must be an integer between 0 and 5")),
        },
        (Kind::Chat, Some(_)) => Err(ApiError::bad_request("logprobs must be true or false")),
    }
}

/// Tokens' `logprobs` in the kind's shape, the first token's text at
/// `offset` in the whole text; null when none were asked for.
fn logprobs_value(logprobs: &[TokenLogprob], kind: Kind, mut offset: usize) -> Value {
    if logprobs.is_empty() {
        return Value::Null;
    }
    match kind {
        Kind::Chat => json!({"content": super::ollama::logprob_entries(logprobs)}),
        Kind::Text => {
            let offsets: Vec<usize> = logprobs
                .iter()
                .map(|l| {
                    let at = offset;
                    offset += l.token.len();
                    at
                })
                .collect();
            let top: Vec<Value> = logprobs.iter().map(|l| l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect()).collect();
            json!({
                "tokens": logprobs.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// OpenAI's `response_format` as the constraint it asks for.
fn response_format(v: &Option<Value>) -> Result<Option<Format>, ApiError> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
    match v["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Format::Json)),
        Some("json_schema") => match &v["json_schema"]["schema"] {
            schema @ Value::Object(_) => Ok(Some(Format::Schema(schema.clone()))),
            _ => Err(ApiError::bad_request("response_format json_schema needs json_schema.schema, an object")),
        },
        _ => Err(ApiError::bad_request("response_format.type must be text, json_object or json_schema")),
    }
}

fn ask(headers: &HeaderMap, common: CommonParams, prompt: Prompt, tool_choice: ToolChoice, kind: Kind) -> Result<Ask, ApiError> {
    let (params, max_tokens, stop) = sampling(&common)?;
    let logprobs = logprobs(&common, kind)?;
    let gen = GenRequest {
        model: common.model,
        prompt,
        context: vec![],
        params,
        max_tokens,
        stop,
        num_ctx: 0,
        priority: priority(headers, common.priority),
        // Chat turns keep their session for the next turn.
        keep: matches!(kind, Kind::Chat),
        logprobs,
        keep_alive: None,
        format: response_format(&common.response_format)?,
        tool_choice,
    };
    Ok(Ask { gen, stream: common.stream })
}

/// `/v1/chat/completions`' body, checked: every refusal a client can cause
/// happens here, before anything is loaded or queued.
pub fn chat_request(body: &[u8], headers: &HeaderMap) -> Result<Ask, ApiError> {
    let req: ChatBody = parse_json(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let mut messages = Vec::new();
    for m in req.messages {
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        if !["system", "user", "assistant", "tool"].contains(&role) {
            return Err(ApiError::bad_request(format!("unknown message role '{}'", m.role)));
        }
        let mut message = Message::new(role, &text_of(&m.content)?);
        message.tool_calls = m.tool_calls.unwrap_or_default();
        message.tool_call_id = m.tool_call_id;
        message.name = m.name;
        messages.push(message);
    }
    let tools = tools::parse_tools(req.tools.as_ref())?;
    let choice = ToolChoice::parse(req.tool_choice.as_ref(), &tools)?;
    // "none": the model is not told of the tools at all.
    let tools = if choice == ToolChoice::None { Vec::new() } else { tools };
    ask(headers, req.common, Prompt::Chat { messages, tools }, choice, Kind::Chat)
}

/// `/v1/completions`' body, checked.
pub fn completion_request(body: &[u8], headers: &HeaderMap) -> Result<Ask, ApiError> {
    let req: CompletionBody = parse_json(body)?;
    let prompt = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(ApiError::bad_request("prompt must be a string (batches are not supported)")),
    };
    ask(headers, req.common, Prompt::Raw(prompt), ToolChoice::Auto, Kind::Text)
}

/// Admits and answers one checked request.
async fn complete(svc: &Arc<Service>, request: Result<Ask, ApiError>, kind: Kind) -> Response {
    let answer = async {
        let Ask { gen, stream } = request?;
        let model = gen.model.clone();
        let rx = svc.generate(gen).await?;
        Ok(respond(rx, stream, model, kind).await)
    };
    answer.await.unwrap_or_else(|e: ApiError| e.in_dialect(Dialect::OpenAi).into_response())
}

pub async fn chat_completions(State(svc): State<Arc<Service>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    complete(&svc, chat_request(&body, &headers), Kind::Chat).await
}

pub async fn completions(State(svc): State<Arc<Service>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    complete(&svc, completion_request(&body, &headers), Kind::Text).await
}

/// `/v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsBody {
    pub model: String,
    pub input: Value,
    /// "float" (the default) or "base64".
    pub encoding_format: Option<String>,
}

pub async fn embeddings(State(svc): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let req: EmbeddingsBody = parse_json(&body)?;
        // "base64": the little-endian f32 bytes, base64-encoded (what the
        // official client asks for by default, and decodes).
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(ApiError::bad_request(format!("encoding_format must be \"float\" or \"base64\", not \"{other}\""))),
        };
        let inputs = super::ollama::embed_inputs(&req.input)?;
        let e = svc.embed(&req.model, inputs, true, None).await?;
        let encode = |v: &Vec<f32>| -> Value {
            if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            }
        };
        let data: Vec<Value> =
            e.embeddings.iter().enumerate().map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": encode(v)})).collect();
        Ok(Json(json!({"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens}})))
    };
    answer.await.map_or_else(|e| e.in_dialect(Dialect::OpenAi).into_response(), IntoResponse::into_response)
}

pub async fn models(State(svc): State<Arc<Service>>) -> Json<Value> {
    let data: Vec<Value> = super::model_list(&svc)
        .await
        .into_iter()
        .map(|m| {
            let created = m.modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            json!({"id": m.name, "object": "model", "created": created, "owned_by": "sollol"})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
