//! Text ⇄ token ids, built from a model's own files: the `tokenizer.ggml.*`
//! metadata of a GGUF file, or `tokenizer.json` of an HF directory.
//!
//! GGUF stores the vocabulary, not a `tokenizer.json`; we rebuild the HF
//! pipeline that produced it (byte-level BPE with the pre-tokenizer named by
//! `tokenizer.ggml.pre`, or a SentencePiece vocabulary as BPE with byte
//! fallback) and hand it to the `tokenizers` crate.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::chat::{ChatTemplate, Message, Prompt, CHATML};
use super::constraint::Grammars;
use super::tools::{Dialect, Tool};
use crate::error::{Error, Result};
use crate::model::gguf::{value_u64, GgufFile};
use crate::model::ModelFile;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    /// Every id that ends a generation (EOS, end-of-turn, end-of-message).
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
    /// The grammar compiler for structured outputs, built on first use.
    grammars: std::sync::OnceLock<std::result::Result<std::sync::Arc<Grammars>, String>>,
}

// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

/// The split regexes of llama.cpp's `llama_vocab` pre-tokenizer types, as the
/// HF tokenizers that those GGUF files came from define them.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_byte_level(pattern: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value.
fn gpt2_pre_tokenizer(pre: &str) -> Json {
    match pre {
        // Digits split one by one, then the GPT-2 regex (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => split_then_byte_level(LLAMA3_SPLIT),
        "qwen2" | "qwen" | "deepseek-r1-qwen" => split_then_byte_level(QWEN2_SPLIT),
        "gpt2" | "default" | "gpt-2" | "olmo" | "phi-2" | "jina-es" | "jina-de" => byte_level(true),
        other => {
            tracing::warn!("tokenizer pre-type '{other}' is not known to sollol; using the GPT-2 rules");
            byte_level(true)
        }
    }
}

impl Tokenizer {
    pub fn for_model(file: &ModelFile) -> Result<Self> {
        match file {
            ModelFile::Gguf(g) => Self::from_gguf(g),
            ModelFile::Safetensors(d) => Self::from_hf_dir(d.path()),
            ModelFile::Synthetic(m) => Err(Error::Tokenizer(format!(
                "{} has random weights and no tokenizer; it serves `sollol bench`, which feeds token ids",
                m.name()
            ))),
        }
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let md = file.metadata();
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let model = file.metadata_str("tokenizer.ggml.model").ok_or_else(|| err("no tokenizer.ggml.model".into()))?;
        let tokens: Vec<String> = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(err("tokenizer.ggml.tokens holds a non-string".into())),
                })
                .collect::<Result<_>>()?,
            _ => return Err(err("no tokenizer.ggml.tokens".into())),
        };
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| value_i64(v).unwrap_or(TOKEN_NORMAL)).collect(),
            _ => vec![TOKEN_NORMAL; tokens.len()],
        };
        let id = |key: &str| file.metadata_u64(key).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let bos = id("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        // Files that name no end-of-turn token still have one the chat
        // template ends turns with (gemma's `<end_of_turn>`): llama.cpp
        // recognizes these control tokens by their text, and so do we.
        eos.extend(
            tokens
                .iter()
                .enumerate()
                .filter(|(i, t)| types.get(*i) == Some(&TOKEN_CONTROL) && END_OF_TURN.contains(&t.as_str()))
                .map(|(i, _)| i as u32),
        );
        eos.sort_unstable();
        eos.dedup();
        let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == TOKEN_CONTROL})
            })
            .collect();
        let spec = match model {
            "gpt2" => {
                let merges: Vec<Json> = match md.get("tokenizer.ggml.merges") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| match v {
                            Value::String(s) => s.split_once(' ').map(|(l, r)| json!([l, r])),
                            _ => None,
                        })
                        .collect(),
                    _ => return Err(err("BPE vocabulary without tokenizer.ggml.merges".into())),
                };
                let pre = file.metadata_str("tokenizer.ggml.pre").unwrap_or("default");
                json!({
                    "version": "1.0",
                    "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": gpt2_pre_tokenizer(pre),
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                              "ignore_merges": pre.starts_with("llama"), "vocab": vocab, "merges": merges}
                })
            }
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| if let Value::F32(f) = v { *f } else { 0.0 }).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i as usize].clone());
                // SentencePiece marks word starts with ▁ and, by default,
                // the text's start too (gemma's files turn that off).
                let space_prefix = file.metadata_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut normalizers = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if space_prefix {
                    normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                json!({
                    "version": "1.0",
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": normalizers},
                    "pre_tokenizer": null,
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": decoders},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                              "vocab": vocab, "merges": spm_merges(&tokens, &scores, &types)}
                })
            }
            other => return Err(err(format!("tokenizer model '{other}' is not supported (gpt2 BPE and llama SentencePiece are)"))),
        };
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| err(e.to_string()))?;
        let token_text = |i: Option<u32>| i.map(|i| tokens[i as usize].clone()).unwrap_or_default();
        // A file without a template gets its architecture's (llama.cpp keeps
        // such built-in templates too).
        let builtin =
            file.metadata_str("general.architecture").and_then(|a| crate::model::arch::by_gguf_name(a).ok()).and_then(|a| a.chat_template);
        let chat_template = file
            .metadata_str("tokenizer.chat_template")
            .or(builtin)
            .map(|t| ChatTemplate::new(t, &token_text(bos), &token_text(eos.first().copied())))
            .transpose()?;
        let add_bos = file.metadata_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
        Ok(Self { inner, bos, eos, add_bos, chat_template, grammars: Default::default() })
    }

    /// `tokenizer.json`, with special tokens and the chat template from
    /// `tokenizer_config.json` and extra EOS ids from `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let read_json = |name: &str| -> Json {
            std::fs::read_to_string(dir.join(name)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Json::Null)
        };
        let cfg = read_json("tokenizer_config.json");
        let token_str =
            |v: &Json| -> Option<String> { v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string)) };
        let bos_text = token_str(&cfg["bos_token"]);
        let eos_text = token_str(&cfg["eos_token"]);
        let bos = bos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos: Vec<u32> = eos_text.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect();
        let gen = read_json("generation_config.json");
        match &gen["eos_token_id"] {
            Json::Number(n) => eos.extend(n.as_u64().map(|v| v as u32)),
            Json::Array(a) => eos.extend(a.iter().filter_map(|v| v.as_u64().map(|v| v as u32))),
            _ => {}
        }
        eos.sort_unstable();
        eos.dedup();
        let chat_template = cfg["chat_template"]
            .as_str()
            .map(|t| ChatTemplate::new(t, bos_text.as_deref().unwrap_or(""), eos_text.as_deref().unwrap_or("")))
            .transpose()?;
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        Ok(Self { inner, bos, eos, add_bos, chat_template, grammars: Default::default() })
    }

    /// Token ids of `text`; special-token text (`<|im_start|>`) maps to its id.
    /// BOS is prepended when the model asks for it and the text lacks it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// The tokens that end a generation.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether the model wants BOS before a text.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The grammar compiler for structured outputs over this vocabulary
    /// (built once, on first use: about a tenth of a second).
    pub fn grammars(&self) -> Result<std::sync::Arc<Grammars>> {
        self.grammars
            .get_or_init(|| {
                let json = self.inner.to_string(false).map_err(|e| e.to_string())?;
                let vocab = self.inner.get_vocab_size(true);
                Grammars::new(json.as_bytes(), &self.eos, vocab).map(std::sync::Arc::new).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::InvalidRequest)
    }

    /// Renders `messages`, offering `tools`, with the model's chat template
    /// (the assistant's turn opened), or with ChatML for a model that ships none.
    pub fn render_chat(&self, messages: &[Message], tools: &[Tool]) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.render(messages, tools, true),
            None => ChatTemplate::new(CHATML, "", "")?.render(messages, tools, true),
        }
    }

    /// How the model writes tool calls (its template's way).
    pub fn tool_dialect(&self) -> Dialect {
        self.chat_template.as_ref().map_or(Dialect::Tagged, ChatTemplate::dialect)
    }

    /// The token ids of a prompt: raw text as it is, messages through the chat template.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Raw(text) => self.encode(text),
            Prompt::Chat { messages, tools } => self.encode(&self.render_chat(messages, tools)?),
        }
    }
}

/// Control tokens that end a turn in the chat templates of the families we run.
const END_OF_TURN: &[&str] = &["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>"];

fn value_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        ref other => value_u64(other).map(|x| x as i64),
    }
}

/// SentencePiece vocabularies carry scores, not merges. A BPE that merges the
/// pair whose concatenation scores highest first segments the same way; the
/// merge list is every (left, right) split of a vocabulary piece into two
/// pieces, ordered by the joined piece's score (as HF's `SpmConverter` does).
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i64]) -> Vec<Json> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).is_some_and(|&t| t != TOKEN_NORMAL && t != TOKEN_USER_DEFINED) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                if types.get(li) == Some(&TOKEN_BYTE) || types.get(ri) == Some(&TOKEN_BYTE) {
                    continue;
                }
                merges.push((scores.get(i).copied().unwrap_or(0.0), i, li, ri));
            }
        }
    }
    // Highest score first; ties by the joined piece's id, then the split.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, l, r)| json!([tokens[l], tokens[r]])).collect()
}
