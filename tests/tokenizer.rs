//! Tokenizers rebuilt from GGUF metadata: SmolLM2's byte-level BPE (`pre =
//! smollm`, which candle's own GGUF tokenizer gets wrong) and a SentencePiece
//! vocabulary written by the test.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sollol::head::tokenizer::Tokenizer;
use sollol::model::gguf::GgufFile;

fn smollm2() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&common::smollm2()).unwrap()).unwrap()
}

#[test]
fn smollm2_round_trips_text_of_every_kind() {
    let tok = smollm2();
    for text in [
        "The capital of France is",
        "  leading spaces, trailing  \n\n\tand tabs",
        "numbers 1234567 and 3.14159",
        "café naïve 日本語 한국어 emoji 🤖🚀",
        "fn main() { println!(\"{}\", x.map(|v| v * 2)); }",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = tok.encode(text).unwrap();
        let back = tok.decode(&ids).unwrap();
        let expected = text.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(back, expected, "round trip of {text:?} via {ids:?}");
    }
}

#[test]
fn smollm2_known_ids_specials_and_digit_splitting() {
    let tok = smollm2();
    assert_eq!(tok.encode("The capital of France is").unwrap(), vec![504, 3575, 282, 4649, 314]);
    // Special tokens are single ids, not spelled out.
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    assert!(tok.is_eos(2));
    // `pre = smollm` splits digits one by one.
    assert_eq!(tok.encode("12345").unwrap().len(), 5);
    // SmolLM2 does not add BOS to raw prompts.
    assert_ne!(tok.encode("Hello").unwrap()[0], 1);
}

#[test]
fn smollm2_chat_template_renders_chatml() {
    let tok = smollm2();
    let text = tok.chat_template().unwrap().render(&[sollol::head::chat::Message::new("user", "What is 2+2?")], &[], true).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(text.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"), "{text}");
}

/// A SentencePiece (llama) vocabulary: scores decide merges, unknown
/// characters fall back to byte tokens, "▁" marks spaces.
#[test]
fn sentencepiece_vocabulary_segments_by_score_with_byte_fallback() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("▁h", -3.0),
        ("he", -3.0),
        ("ll", -3.0),
        ("llo", -4.0),
        ("hello", -5.0),
        ("▁hello", -6.0),
        ("▁he", -7.0),
    ];
    let mut scores: Vec<f32> = vec![0.0; tokens.len()];
    for (p, s) in pieces {
        tokens.push(p.into());
        types.push(1);
        scores.push(s);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().cloned().map(Value::String).collect())),
        ("tokenizer.ggml.scores", Value::Array(scores.iter().map(|s| Value::F32(*s)).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types.iter().map(|t| Value::I32(*t)).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    let t = QTensor::quantize(&Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md_refs, &[("dummy", &t)]).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();

    let ids = tok.encode("hello hello").unwrap();
    assert_eq!(ids, vec![1, id("▁hello"), id("▁hello")], "BOS, then the highest-scoring pieces");
    assert_eq!(tok.decode(&ids).unwrap(), "hello hello");
    // 'é' is not in the vocabulary: its UTF-8 bytes come out as byte tokens, and decode back.
    let ids = tok.encode("hé").unwrap();
    assert_eq!(ids, vec![1, id("▁h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
}

fn gemma3() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&common::gemma3()).unwrap()).unwrap()
}

/// Gemma 3's 262k SentencePiece vocabulary (no space prefix, byte fallback)
/// and the chat template its file lacks (gemma3's own, from the architecture).
#[test]
fn gemma3_tokenizes_like_sentencepiece_and_renders_its_chat_turns() {
    let tok = gemma3();
    assert_eq!(tok.vocab_size(), 262_144);
    let ids = tok.encode("The capital of France is").unwrap();
    eprintln!("{ids:?}");
    assert_eq!(ids[0], 2, "BOS first");
    for text in ["The capital of France is", "  two spaces\n\ttab", "café 日本語 🤖", "x\u{0}y"] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "round trip of {text:?} via {ids:?}");
    }
    let chat = tok.chat_template().expect("gemma3's built-in template");
    let prompt = chat.render(&[sollol::head::chat::Message::new("user", "Hi")], &[], true).unwrap();
    assert_eq!(prompt, "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
    let ids = tok.encode(&prompt).unwrap();
    eprintln!("{ids:?}");
    let start = tok.token_to_id("<start_of_turn>").unwrap();
    let end = tok.token_to_id("<end_of_turn>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 2, "<start_of_turn> is one token: {ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "one BOS: {ids:?}");
    assert!(tok.is_eos(end), "a turn ends generation");
}

/// A tool conversation through three families' own templates renders as HF
/// transformers renders it (`tests/render_templates.py` wrote the expected
/// text with jinja2), and each template names the dialect its model writes.
#[test]
fn tool_conversations_render_as_hf_renders_them() {
    use serde_json::json;
    use sollol::head::chat::{ChatTemplate, Message};
    use sollol::head::tools::{Dialect, Tool, ToolCall};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates");
    let tool = Tool::parse(&json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}}, "required": ["city"]}}}))
    .unwrap();
    let mut call = Message::new("assistant", "");
    call.tool_calls = vec![ToolCall { id: "abcDEF123".into(), name: "get_weather".into(), arguments: json!({"city": "Paris"}) }];
    let mut answer = Message::new("tool", "12 degrees");
    answer.tool_call_id = Some("abcDEF123".into());
    answer.name = Some("get_weather".into());
    let messages = vec![
        Message::new("system", "You are terse."),
        Message::new("user", "Weather in Paris?"),
        call,
        answer,
        Message::new("assistant", "It is 12 degrees."),
        Message::new("user", "And in Oslo?"),
    ];
    for (name, bos, eos, dialect) in [
        ("qwen2.5", "", "<|im_end|>", Dialect::Tagged),
        ("llama3.1", "<|begin_of_text|>", "<|eot_id|>", Dialect::Llama3),
        ("mistral-nemo", "<s>", "</s>", Dialect::Mistral),
    ] {
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let expected = std::fs::read_to_string(dir.join(format!("{name}.expected"))).unwrap();
        let template = ChatTemplate::new(&source, bos, eos).unwrap();
        assert_eq!(template.render(&messages, std::slice::from_ref(&tool), true).unwrap(), expected, "{name}");
        assert_eq!(template.dialect(), dialect, "{name}");
    }
}

/// A required call's grammar, in each dialect, over SmolLM2's vocabulary:
/// the call the dialect writes passes token by token and completes the
/// grammar; a call to a function not offered, or with an argument the
/// schema lacks, is refused at the token that goes wrong.
#[test]
fn required_tool_calls_are_constrained_to_the_functions_schemas() {
    use serde_json::json;
    use sollol::head::tools::{call_grammar, Dialect, Tool, ToolChoice};
    let tok = smollm2();
    let grammars = tok.grammars().unwrap();
    let tools = [
        Tool::parse(&json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}))
        .unwrap(),
        Tool::parse(&json!({"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}))
        .unwrap(),
    ];
    // Whether every token of `text` is allowed in turn; and whether the grammar then is complete.
    let run = |format: &sollol::head::constraint::Format, text: &str| -> (bool, bool) {
        let mut c = grammars.constraint(format).unwrap();
        for id in tok.encode(text).unwrap() {
            let allowed = c.allowed().unwrap();
            if allowed[id as usize / 32] & (1 << (id % 32)) == 0 {
                return (false, false);
            }
            c.commit(id).unwrap();
        }
        (true, c.is_done())
    };
    let cases = [
        (Dialect::Tagged, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>"),
        (Dialect::Llama3, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
        (Dialect::Mistral, "[{\"name\": \"get_time\", \"arguments\": {\"zone\": \"UTC\"}}]"),
    ];
    for (dialect, good) in cases {
        let any = call_grammar(dialect, &tools, &ToolChoice::Required).unwrap();
        assert_eq!(run(&any, good), (true, true), "{dialect:?}: {good}");
        let other = good.replace("get_time", "get_date").replace("get_weather", "get_date");
        assert!(!run(&any, &other).0, "{dialect:?}: an unknown function");
        let extra = good.replace("}}", ", \"units\": \"C\"}}");
        assert!(!run(&any, &extra).0, "{dialect:?}: an argument not in the schema");
    }
    // A named function admits that function only.
    let named = call_grammar(Dialect::Tagged, &tools, &ToolChoice::Function("get_weather".into())).unwrap();
    assert!(!run(&named, cases[0].1).0);
    assert!(call_grammar(Dialect::Tagged, &tools, &ToolChoice::Auto).is_none());
}
