//! Chat templates: the Jinja template a model ships, rendered with minijinja
//! under the same settings HF's `apply_chat_template` uses.

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::tools::{self, Dialect, Tool, ToolCall};
use crate::error::{Error, Result};

/// A turn of a conversation, as templates read it (and Ollama sends it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// The calls an assistant turn made (fed back with the tools' answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn's call (OpenAI's `tool_call_id`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// …and function (Ollama's `tool_name`).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "tool_name")]
    pub name: Option<String>,
}

/// Clients send `null` for an assistant turn that only calls tools.
fn null_as_empty<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }
}

/// What a request asks the model to continue.
pub enum Prompt {
    /// Raw text, tokenized as is.
    Raw(String),
    /// Messages rendered with the model's chat template, offering these tools.
    Chat { messages: Vec<Message>, tools: Vec<Tool> },
}

impl Prompt {
    pub fn chat(messages: Vec<Message>) -> Self {
        Self::Chat { messages, tools: Vec::new() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template renders `tools` itself.
    knows_tools: bool,
    /// How the model writes its calls.
    dialect: Dialect,
}

/// ChatML, for models that ship no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with trim_blocks and lstrip_blocks on; templates are written for that.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date" in system prompts.
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let days = secs / 86_400;
            let (y, m, d) = civil_from_days(days as i64);
            fmt.replace("%Y", &format!("{y:04}")).replace("%m", &format!("{m:02}")).replace("%d", &format!("{d:02}"))
        });
        // HF replaces Jinja's HTML-escaping `tojson` with Python's `json.dumps`;
        // templates print tool schemas and arguments with it.
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
            knows_tools: tools::template_knows_tools(source),
            dialect: Dialect::of_template(source),
        })
    }

    /// The conversation as the model reads it. Tools go to a template that
    /// renders them, or else into the conversation itself ([`tools::without_tools`]).
    pub fn render(&self, messages: &[Message], tools: &[Tool], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        let rewritten;
        // Calls and tool turns of earlier turns need the rewrite too, even
        // when this turn offers no tools.
        let tool_turns = messages.iter().any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        let (messages, tools) = if self.knows_tools || (tools.is_empty() && !tool_turns) {
            (messages, tools)
        } else {
            rewritten = tools::without_tools(messages, tools);
            (rewritten.as_slice(), &[][..])
        };
        let specs: Option<Vec<&Value>> = (!tools.is_empty()).then(|| tools.iter().map(|t| &t.spec).collect());
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => specs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// How the model writes tool calls.
    pub fn dialect(&self) -> Dialect {
        if self.knows_tools {
            self.dialect
        } else {
            Dialect::Tagged
        }
    }
}

/// The `tojson` filter as HF's `apply_chat_template` defines it:
/// `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: &JinjaValue, indent: Option<usize>, kwargs: Kwargs) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent = indent.or(kwargs.get::<Option<usize>>("indent")?);
    let json = serde_json::to_value(value).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JinjaValue::from_safe_string(py_json(&json, indent)))
}

/// JSON as Python's `json.dumps(ensure_ascii=False)` writes it: ", " and
/// ": " between items on one line, or `indent` spaces a level with ",".
pub fn py_json(v: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py_json(&mut out, v, indent, 0);
    out
}

fn write_py_json(out: &mut String, v: &Value, indent: Option<usize>, level: usize) {
    let (open, close, items): (char, char, Vec<(Option<&String>, &Value)>) = match v {
        Value::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        Value::Object(m) => ('{', '}', m.iter().map(|(k, x)| (Some(k), x)).collect()),
        scalar => {
            out.push_str(&scalar.to_string());
            return;
        }
    };
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    for (i, (key, item)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, level + 1);
        if let Some(k) = key {
            out.push_str(&Value::String(k.clone()).to_string());
            out.push_str(": ");
        }
        write_py_json(out, item, indent, level + 1);
    }
    newline(out, level);
    out.push(close);
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render(&[Message::new("user", "hi")], &[], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() | upper }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "  x ")], &[], false).unwrap(), "X");
        let err = t.render(&[Message::new("system", "x")], &[], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"));
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let v = serde_json::json!({"b": [1, 2.5, "é<>"], "a": {}, "c": {"d": null, "e": true}});
        assert_eq!(py_json(&v, None), r#"{"b": [1, 2.5, "é<>"], "a": {}, "c": {"d": null, "e": true}}"#);
        assert_eq!(py_json(&serde_json::json!({"a": [1], "b": []}), Some(2)), "{\n  \"a\": [\n    1\n  ],\n  \"b\": []\n}");
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ messages[0].role | tojson(indent=2) }}", "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "<b>")], &[], false).unwrap(), r#"{"role": "user", "content": "<b>"}|"user""#);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
