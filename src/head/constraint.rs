//! Structured outputs: a grammar (any JSON object, or a JSON schema)
//! compiled by llguidance against the model's tokenizer. Before each
//! sampled token the head computes which tokens keep the output inside the
//! grammar, as a bitset the sampler applies (on the last stage, which
//! samples); the chosen token then advances the grammar here.
//!
//! The constraint lives on the head, where the tokenizer is: the last stage
//! gets only the bitset (vocabulary / 8 bytes per step), so nodes need no
//! tokenizer and no grammar.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object (Ollama's `"json"`, OpenAI's `json_object`).
    Json,
    /// JSON valid against this schema.
    Schema(Value),
    /// A grammar in llguidance's Lark dialect (a tool call's shape).
    Grammar(String),
}

/// One line, ", " and ": " between items: free whitespace lets a small
/// model pad its output with newlines until the token limit cuts it
/// (llama.cpp's JSON grammar bounds whitespace too).
pub fn compact_json() -> Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// The grammar compiler for one tokenizer (built once per model).
pub struct Grammars {
    factory: ParserFactory,
}

fn grammar_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidRequest(format!("structured output: {e}"))
}

impl Grammars {
    /// From a tokenizer's `tokenizer.json` form, its end-of-generation ids
    /// and the model's vocabulary size.
    pub fn new(tokenizer_json: &[u8], eos: &[u32], vocab: usize) -> Result<Self> {
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(tokenizer_json).map_err(grammar_error)?;
        let known: Vec<u32> = eos.iter().copied().filter(|&t| (t as usize) < bytes.tokrx_info().vocab_size as usize).collect();
        if !known.is_empty() {
            bytes.set_eos_tokens(&known);
        }
        let env = bytes.into_tok_env(Some(vocab)).map_err(grammar_error)?;
        let factory = ParserFactory::new_simple(&env).map_err(grammar_error)?;
        Ok(Self { factory })
    }

    /// A fresh constraint for one generation.
    pub fn constraint(&self, format: &Format) -> Result<Constraint> {
        if let Format::Schema(s) = format {
            check_schema(s)?;
        }
        let grammar = match format {
            Format::Json | Format::Schema(_) => {
                let mut schema = match format {
                    Format::Schema(s) => s.clone(),
                    _ => serde_json::json!({"type": "object"}),
                };
                // A schema's own `x-guidance` options win.
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(compact_json);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Format::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        // The compiler recurses over the grammar: it runs on a thread with
        // room for deep grammars, not on a server thread's 2 MiB stack, where
        // an overflow aborts the process. (What recurses without end — a
        // schema holding -2^63 — `check_schema` keeps out.)
        let matcher = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("grammar".into())
                .stack_size(COMPILER_STACK)
                .spawn_scoped(scope, || self.factory.create_parser(grammar).map(|p| Matcher::new(Ok(p))))
                .map_err(grammar_error)?
                .join()
                .map_err(|_| grammar_error("the grammar compiler failed"))?
                .map_err(grammar_error)
        })?;
        if let Some(e) = matcher.get_error() {
            return Err(grammar_error(e));
        }
        Ok(Constraint { matcher })
    }
}

/// The grammar compiler's stack: 256 MiB of address space, touched only as deep as it goes.
const COMPILER_STACK: usize = 256 << 20;

/// Nesting and size past any schema an application sends.
const MAX_SCHEMA_DEPTH: usize = 64;
const MAX_SCHEMA_NODES: usize = 100_000;
/// JSON's exact integers: ±2^53.
const MAX_SCHEMA_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Bounds a client's schema before the compiler sees it: its nesting, its
/// size, and its numbers. (A schema holding -2^63 sent the compiler into a
/// recursion that overflowed the stack and aborted the process: found by
/// `examples/fuzz.rs`.)
pub fn check_schema(schema: &Value) -> Result<()> {
    let mut nodes = 0;
    let mut stack = vec![(schema, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if depth > MAX_SCHEMA_DEPTH || nodes > MAX_SCHEMA_NODES {
            return Err(grammar_error(format!(
                "the schema nests deeper than {MAX_SCHEMA_DEPTH} or holds more than {MAX_SCHEMA_NODES} values"
            )));
        }
        match v {
            Value::Number(n) if n.as_f64().is_none_or(|x| x.abs() > MAX_SCHEMA_INTEGER) => {
                return Err(grammar_error(format!("the schema's number {n} is outside ±2^53")));
            }
            Value::Array(items) => stack.extend(items.iter().map(|x| (x, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|x| (x, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// The tokens allowed next, as a bitset (bit `t % 32` of word `t / 32`).
    pub fn allowed(&mut self) -> Result<Vec<u32>> {
        let mask = self.matcher.compute_mask().map_err(grammar_error)?;
        Ok(mask.as_slice().to_vec())
    }

    /// Advances past the sampled token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(grammar_error)
    }

    /// The output is complete: nothing but the end may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Shared between a model's requests.
pub type SharedGrammars = Arc<Grammars>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_past_the_bounds_are_refused_before_compiling() {
        assert!(check_schema(&serde_json::json!({"enum": [-9223372036854775808i64]})).is_err());
        assert!(check_schema(&serde_json::json!({"type": "integer", "maximum": 1e300})).is_err());
        let mut deep = serde_json::json!({"type": "string"});
        for _ in 0..100 {
            deep = serde_json::json!({"type": "array", "items": deep});
        }
        assert!(check_schema(&deep).is_err());
        assert!(check_schema(&serde_json::json!({"type": "object", "properties": {"a": {"enum": [1, 2.5, -3]}}})).is_ok());
    }
}
