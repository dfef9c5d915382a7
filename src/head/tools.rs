//! Tool calling: the functions a request offers the model go into the prompt
//! through the model's own chat template, and the calls it writes come back
//! out of its text.
//!
//! Families write calls in one of three ways, and the template says which
//! ([`Dialect::of_template`]): Qwen and Hermes wrap a JSON object in
//! `<tool_call>` tags, Llama 3.x answers with a bare `{"name", "parameters"}`
//! object, Mistral with a `[TOOL_CALLS]` list. A template that knows no tools
//! (SmolLM2's, Gemma's) gets them from us, in the tagged form
//! ([`without_tools`]), the form most open models were trained on.
//!
//! `tool_choice: "required"` or a named function constrains decoding to one
//! call of the dialect ([`call_grammar`]), whose arguments match the
//! function's JSON schema.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::chat::{py_json, Message};
use super::constraint::Format;
use crate::error::{Error, Result};

/// A function the model may call, as both APIs send it:
/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The definition as templates read it (`tool.function.name`, `tool | tojson`).
    pub spec: Value,
}

/// Longest function name OpenAI accepts.
const MAX_NAME: usize = 64;
/// More functions than any prompt can describe usefully.
pub const MAX_TOOLS: usize = 128;

impl Tool {
    /// A checked definition: a function with a plain name and an object schema.
    pub fn parse(v: &Value) -> Result<Self> {
        let bad = |m: String| Error::InvalidRequest(format!("tools: {m}"));
        if v["type"].as_str().is_some_and(|t| t != "function") {
            return Err(bad(format!("type must be \"function\", not {}", v["type"])));
        }
        let f = &v["function"];
        let name = f["name"].as_str().ok_or_else(|| bad("each tool needs function.name, a string".into()))?;
        if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(bad(format!("function name '{name}' must be 1-{MAX_NAME} characters of a-z, A-Z, 0-9, _, - and .")));
        }
        let parameters = match &f["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            p @ Value::Object(_) => p.clone(),
            other => return Err(bad(format!("{name}: parameters must be a JSON schema object, not {other}"))),
        };
        super::constraint::check_schema(&parameters)?;
        let mut function = serde_json::Map::new();
        function.insert("name".into(), json!(name));
        if let Some(d) = f["description"].as_str() {
            function.insert("description".into(), json!(d));
        }
        function.insert("parameters".into(), parameters);
        Ok(Self { name: name.to_string(), spec: json!({"type": "function", "function": function}) })
    }

    pub fn parameters(&self) -> &Value {
        &self.spec["function"]["parameters"]
    }
}

/// The tools of a request, checked: at most [`MAX_TOOLS`], names unique.
pub fn parse_tools(v: Option<&Value>) -> Result<Vec<Tool>> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(Error::InvalidRequest("tools must be a list".into())),
    };
    if items.len() > MAX_TOOLS {
        return Err(Error::InvalidRequest(format!("at most {MAX_TOOLS} tools")));
    }
    let tools: Vec<Tool> = items.iter().map(Tool::parse).collect::<Result<_>>()?;
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|o| o.name == t.name) {
            return Err(Error::InvalidRequest(format!("tools: function '{}' is defined twice", t.name)));
        }
    }
    Ok(tools)
}

/// Whether, and which, function the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// No call: the tools are left out of the prompt.
    None,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this function.
    Function(String),
}

impl ToolChoice {
    /// OpenAI's `tool_choice`: `"none" | "auto" | "required"` or
    /// `{"type": "function", "function": {"name": …}}`, checked against the tools.
    pub fn parse(v: Option<&Value>, tools: &[Tool]) -> Result<Self> {
        let choice = match v {
            None | Some(Value::Null) => Self::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Self::Auto,
                "none" => Self::None,
                "required" => Self::Required,
                other => {
                    return Err(Error::InvalidRequest(format!("tool_choice must be none, auto, required or a function, not '{other}'")))
                }
            },
            Some(v) => match v["function"]["name"].as_str() {
                Some(name) => Self::Function(name.to_string()),
                None => {
                    return Err(Error::InvalidRequest(
                        "tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                    ))
                }
            },
        };
        match &choice {
            Self::Required if tools.is_empty() => Err(Error::InvalidRequest("tool_choice \"required\" needs tools".into())),
            Self::Function(name) if !tools.iter().any(|t| &t.name == name) => {
                Err(Error::InvalidRequest(format!("tool_choice names '{name}', which is not among the tools")))
            }
            _ => Ok(choice),
        }
    }
}

/// A call the model made, or one fed back in an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WireCall")]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object (OpenAI carries them as a string of it).
    pub arguments: Value,
}

impl ToolCall {
    fn new(name: &str, arguments: Value) -> Self {
        Self { id: call_id(), name: name.to_string(), arguments }
    }
}

/// Templates read calls in OpenAI's shape, with the arguments as an object.
impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}).serialize(s)
    }
}

/// A call as either API sends it back: Ollama's `{"function": {"name",
/// "arguments": {…}}}`, OpenAI's with `id`, `type` and the arguments as a string.
#[derive(Deserialize)]
struct WireCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

impl TryFrom<WireCall> for ToolCall {
    type Error = String;

    fn try_from(w: WireCall) -> std::result::Result<Self, String> {
        let arguments = match w.function.arguments {
            Value::String(s) => serde_json::from_str(&s).map_err(|e| format!("tool call arguments are not JSON: {e}"))?,
            Value::Null => json!({}),
            v => v,
        };
        Ok(Self { id: w.id.unwrap_or_default(), name: w.function.name, arguments })
    }
}

/// Nine letters and digits: the id form Mistral's template insists on, and
/// any other client takes.
fn call_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..9).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// How a model family writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (Qwen, Hermes,
    /// and our prompt for templates without tools).
    Tagged,
    /// A bare `{"name": …, "parameters": {…}}` (Llama 3.x).
    Llama3,
    /// `[TOOL_CALLS][{"name": …, "arguments": {…}}]` (Mistral).
    Mistral,
}

impl Dialect {
    /// The dialect a chat template's own examples use; tagged where it shows none.
    pub fn of_template(source: &str) -> Self {
        if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<tool_call>") {
            Self::Tagged
        } else if source.contains("\"parameters\": ") && source.contains("ipython") {
            Self::Llama3
        } else {
            Self::Tagged
        }
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            Self::Tagged | Self::Mistral => "arguments",
        }
    }
}

/// Whether a chat template renders tools itself.
pub fn template_knows_tools(source: &str) -> bool {
    source.contains("tools")
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The conversation rewritten for a template that knows no tools: the tools
/// described in the system message with the tagged call format, the
/// assistant's calls as tagged text, and the tools' answers as user turns
/// holding `<tool_response>` blocks.
pub fn without_tools(messages: &[Message], tools: &[Tool]) -> Vec<Message> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    let mut system = String::new();
    if let Some(first) = messages.first().filter(|m| m.role == "system") {
        system = format!("{}\n\n", first.content);
        rest = &messages[1..];
    }
    if !tools.is_empty() {
        system += "# Tools\n\nYou can call functions to answer the user. Their signatures are inside <tools></tools>:\n<tools>";
        for t in tools {
            system += "\n";
            // One line, as Python's `json.dumps` writes it (the format's examples are).
            system += &py_json(&t.spec, None);
        }
        system += "\n</tools>\n\nTo call a function, answer with its name and arguments as a JSON object inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
    }
    if !system.is_empty() {
        out.push(Message::new("system", system.trim_end()));
    }
    for m in rest {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for c in &m.tool_calls {
                    let call = json!({"name": c.name, "arguments": c.arguments});
                    text += &format!("\n{OPEN}\n{}\n{CLOSE}", py_json(&call, None));
                }
                out.push(Message::new("assistant", text.trim_start()));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    // The answers to one turn's calls go in one user turn.
                    Some(last) if last.role == "user" && last.content.ends_with("</tool_response>") => {
                        last.content = format!("{}\n{block}", last.content);
                    }
                    _ => out.push(Message::new("user", &block)),
                }
            }
            _ => out.push(m.clone()),
        }
    }
    out
}

/// The grammar of exactly one call, in `dialect`, to `choice`'s function(s):
/// each function's name with its arguments matching its schema.
pub fn call_grammar(dialect: Dialect, tools: &[Tool], choice: &ToolChoice) -> Option<Format> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::Auto | ToolChoice::None => return None,
    };
    let key = dialect.arguments_key();
    let calls: Vec<Value> = chosen
        .iter()
        .map(|t| {
            // The function's own arguments only, unless its schema allows more
            // (as OpenAI's strict mode has it): a sampled model otherwise
            // invents arguments until the token limit cuts the call.
            let mut arguments = t.parameters().clone();
            if let Some(obj) = arguments.as_object_mut().filter(|o| o.contains_key("properties")) {
                obj.entry("additionalProperties").or_insert(json!(false));
            }
            json!({"type": "object", "properties": {"name": {"const": t.name}, key: arguments},
                   "required": ["name", key], "additionalProperties": false})
        })
        .collect();
    let one = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    let mut schema = match dialect {
        Dialect::Mistral => json!({"type": "array", "items": one, "minItems": 1, "maxItems": 1}),
        Dialect::Tagged | Dialect::Llama3 => one,
    };
    schema["x-guidance"] = super::constraint::compact_json();
    let json = schema.to_string();
    Some(Format::Grammar(match dialect {
        Dialect::Tagged => format!("start: \"{OPEN}\\n\" call \"\\n{CLOSE}\"\ncall: %json {json}\n"),
        Dialect::Llama3 | Dialect::Mistral => format!("start: %json {json}\n"),
    }))
}

/// The calls in a finished text, and the text around them; None when it
/// holds no call (or one that does not parse, which stays text).
pub fn parse_calls(text: &str, dialect: Dialect) -> Option<(String, Vec<ToolCall>)> {
    match dialect {
        Dialect::Tagged => parse_tagged(text),
        Dialect::Llama3 | Dialect::Mistral => {
            let body = text.trim_start().trim_start_matches("<|python_tag|>").trim_start_matches("[TOOL_CALLS]");
            parse_json_calls(body).map(|calls| (String::new(), calls))
        }
    }
}

fn parse_tagged(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        content.push_str(&rest[..at]);
        let inner = &rest[at + OPEN.len()..];
        // The JSON is read first: a string argument may itself hold the
        // closing tag. Then the tag, or the end of the output (the token
        // limit, an EOS standing in for it) where the JSON is whole.
        let (found, used) = json_calls(inner)?;
        let after = inner[used..].trim_start();
        rest = match after.strip_prefix(CLOSE) {
            Some(after) => after,
            None if after.is_empty() => after,
            None => return None,
        };
        calls.extend(found);
    }
    content.push_str(rest);
    (!calls.is_empty()).then(|| (content.trim().to_string(), calls))
}

/// One or more calls as JSON: an object, a list of objects, or objects
/// one after another (separated by whitespace or `;`), each with a `name`
/// and its `arguments` (or `parameters`). Anything else is not a call.
fn parse_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    let (calls, used) = json_calls(text)?;
    text[used..].trim().is_empty().then_some(calls)
}

/// The calls that `text` starts with (as [`parse_json_calls`] reads them),
/// and the bytes they took; at least one call, or None.
fn json_calls(text: &str) -> Option<(Vec<ToolCall>, usize)> {
    let mut calls = Vec::new();
    let mut used = text.len() - text.trim_start().len();
    loop {
        let rest = &text[used..];
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let Some(Ok(value)) = values.next() else { break };
        match value {
            Value::Array(items) => calls.extend(items.iter().map(call_of).collect::<Option<Vec<_>>>()?),
            v => calls.push(call_of(&v)?),
        }
        let after = &rest[values.byte_offset()..];
        let next = after.trim_start().trim_start_matches(';').trim_start();
        used += values.byte_offset() + (after.len() - next.len());
    }
    (!calls.is_empty()).then_some((calls, used))
}

fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v["name"].as_str().filter(|n| !n.is_empty())?;
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => json!({}),
        // Some models write the arguments as a string of JSON.
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return None,
    };
    Some(ToolCall::new(name, arguments))
}

/// Splits streamed text into what is shown as the answer's content and what
/// may be a call, held back until the end decides.
pub struct ToolStream {
    dialect: Dialect,
    /// Held text: a possible start of a tag, or a call being written.
    held: String,
    /// Everything from here on is a call (or was meant to be).
    in_call: bool,
    /// Some text has been let through.
    started: bool,
}

impl ToolStream {
    pub fn new(dialect: Dialect) -> Self {
        Self { dialect, held: String::new(), in_call: false, started: false }
    }

    /// The part of `piece` (with what was held before) that is content for sure.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.in_call {
            return String::new();
        }
        match self.dialect {
            Dialect::Tagged => {
                if let Some(at) = self.held.find(OPEN) {
                    self.in_call = true;
                    return self.release(at);
                }
                // Hold back a suffix that could be the start of the tag.
                let hold = (1..OPEN.len()).rev().find(|&n| self.held.ends_with(&OPEN[..n])).unwrap_or(0);
                self.release(self.held.len() - hold)
            }
            // A call is the whole answer: decided by its first visible character.
            Dialect::Llama3 | Dialect::Mistral if !self.started => match self.held.trim_start().chars().next() {
                None => String::new(),
                Some('{' | '[') => {
                    self.in_call = true;
                    String::new()
                }
                Some(_) => self.release(self.held.len()),
            },
            Dialect::Llama3 | Dialect::Mistral => self.release(self.held.len()),
        }
    }

    fn release(&mut self, upto: usize) -> String {
        let out: String = self.held.drain(..upto).collect();
        self.started |= !out.is_empty();
        out
    }

    /// At the end: the content still held, and the calls (none if the held
    /// text was not a call after all; then it is all content).
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        match parse_calls(&self.held, self.dialect) {
            Some((content, calls)) if self.in_call => (content, calls),
            _ => (self.held, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::parse(&json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}))
        .unwrap()
    }

    #[test]
    fn tool_definitions_are_checked() {
        assert_eq!(weather().name, "get_weather");
        for bad in [
            json!({"type": "function", "function": {"name": "has space"}}),
            json!({"type": "function", "function": {}}),
            json!({"type": "retrieval", "function": {"name": "x"}}),
            json!({"type": "function", "function": {"name": "x", "parameters": "nope"}}),
        ] {
            assert!(Tool::parse(&bad).is_err(), "{bad}");
        }
        let twice = json!([weather().spec, weather().spec]);
        assert!(parse_tools(Some(&twice)).unwrap_err().to_string().contains("twice"));
        let tools = [weather()];
        assert_eq!(ToolChoice::parse(Some(&json!("required")), &tools).unwrap(), ToolChoice::Required);
        assert!(ToolChoice::parse(Some(&json!({"type": "function", "function": {"name": "other"}})), &tools).is_err());
        assert!(ToolChoice::parse(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn calls_parse_in_each_dialect() {
        let (content, calls) = parse_calls(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            Dialect::Tagged,
        )
        .unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!((calls[0].name.as_str(), &calls[0].arguments), ("get_weather", &json!({"city": "Paris"})));
        assert_eq!(calls[0].id.len(), 9);
        // SmolLM2's list inside the tags, and two blocks, one unclosed.
        let (_, calls) = parse_calls("<tool_call>[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}]</tool_call>\n<tool_call>{\"name\": \"c\"}", Dialect::Tagged).unwrap();
        assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(calls[1].arguments, json!({"x": 1}));
        let (_, calls) = parse_calls("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}", Dialect::Llama3).unwrap();
        assert_eq!(calls[0].arguments, json!({"city": "Oslo"}));
        let (_, calls) = parse_calls(
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"k\": [1]}}, {\"name\": \"b\", \"arguments\": {}}]",
            Dialect::Mistral,
        )
        .unwrap();
        assert_eq!(calls.len(), 2);
        // Not calls: plain text, a broken call, JSON that names nothing.
        assert!(parse_calls("The weather is fine.", Dialect::Tagged).is_none());
        assert!(parse_calls("<tool_call>{\"name\": \"a\", \"argu", Dialect::Tagged).is_none());
        assert!(parse_calls("{\"answer\": 42}", Dialect::Llama3).is_none());
        assert!(parse_calls("{\"name\": \"a\"} and then prose", Dialect::Llama3).is_none());
    }

    /// The closing tag inside a string argument is the argument's, not the
    /// end of the call (a sampled city name held one).
    #[test]
    fn a_closing_tag_inside_an_argument_stays_in_it() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a}}}</tool_call>b\"}}\n</tool_call> after";
        let (content, calls) = parse_calls(text, Dialect::Tagged).unwrap();
        assert_eq!((content.as_str(), calls.len()), ("after", 1));
        assert_eq!(calls[0].arguments, serde_json::json!({"city": "a}}}</tool_call>b"}));
        // Text between the JSON and the tag makes it no call at all.
        assert!(parse_calls("<tool_call>{\"name\": \"f\", \"arguments\": {}} trailing</tool_call>", Dialect::Tagged).is_none());
    }

    #[test]
    fn streamed_text_holds_back_only_what_may_be_a_call() {
        let mut s = ToolStream::new(Dialect::Tagged);
        let pieces = ["Sure", ". <tool", "_ca", "ll>\n{\"name\": \"get_weather\", ", "\"arguments\": {}}\n</tool_call>"];
        let shown: String = pieces.iter().map(|p| s.push(p)).collect();
        assert_eq!(shown, "Sure. ");
        let (content, calls) = s.finish();
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        // A '<' that starts no tag is let through once it cannot be one.
        let mut s = ToolStream::new(Dialect::Tagged);
        assert_eq!(s.push("a <"), "a ");
        assert_eq!(s.push("b"), "<b");
        assert_eq!(s.finish(), (String::new(), vec![]));
        // A bare-JSON dialect decides on the first visible character.
        let mut s = ToolStream::new(Dialect::Llama3);
        assert_eq!(s.push("  "), "");
        assert_eq!(s.push("{\"name\": \"x\", \"parameters\": {}}"), "");
        assert_eq!(s.finish().1.len(), 1);
        let mut s = ToolStream::new(Dialect::Llama3);
        assert_eq!(s.push("Hi {"), "Hi {");
        // Held text that is no call after all is content.
        let mut s = ToolStream::new(Dialect::Mistral);
        assert_eq!(s.push("[not json"), "");
        assert_eq!(s.finish(), ("[not json".to_string(), vec![]));
    }

    #[test]
    fn dialects_come_from_the_templates() {
        assert_eq!(Dialect::of_template("{{ '[TOOL_CALLS][' }}"), Dialect::Mistral);
        assert_eq!(Dialect::of_template("<tool_call>\\n{\"name\""), Dialect::Tagged);
        assert_eq!(Dialect::of_template("ipython ... '\"parameters\": '"), Dialect::Llama3);
        assert_eq!(Dialect::of_template("{% for m in messages %}"), Dialect::Tagged);
    }

    #[test]
    fn a_template_without_tools_gets_them_in_the_system_turn() {
        let call = ToolCall { id: "abcdefghi".into(), name: "get_weather".into(), arguments: json!({"city": "Paris"}) };
        let mut assistant = Message::new("assistant", "");
        assistant.tool_calls = vec![call];
        let messages = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Weather?"),
            assistant,
            Message::new("tool", "21C"),
            Message::new("tool", "sunny"),
        ];
        let out = without_tools(&messages, &[weather()]);
        assert_eq!(out.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user", "assistant", "user"]);
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert!(out[0].content.contains("{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""));
        assert_eq!(out[2].content, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(out[3].content, "<tool_response>\n21C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>");
    }

    #[test]
    fn call_ids_round_trip_through_either_api() {
        let openai: ToolCall =
            serde_json::from_value(json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}))
                .unwrap();
        let ollama: ToolCall = serde_json::from_value(json!({"function": {"name": "f", "arguments": {"a": 1}}})).unwrap();
        assert_eq!(openai.arguments, ollama.arguments);
        assert_eq!(
            serde_json::to_value(&openai).unwrap(),
            json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}})
        );
        assert!(serde_json::from_value::<ToolCall>(json!({"function": {"name": "f", "arguments": "{oops"}})).is_err());
    }
}
