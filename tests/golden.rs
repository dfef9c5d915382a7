//! Golden tests on the real default model: sollol's slices against candle's
//! own `quantized_llama`, which runs the same ops in the same order, so the
//! logits must agree bit for bit; and composed slices against the whole model.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use sollol::model::sampling::argmax;
use sollol::model::{KvCache, ModelFile, ModelSlice, SliceOutput};

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314]; // "The capital of France is"
const DECODE_STEPS: usize = 16;

/// Logits of the prompt and of 16 greedy decode steps, from candle's reference.
fn reference_logits() -> Vec<Vec<f32>> {
    let path = common::smollm2();
    let mut reader = BufReader::new(File::open(&path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    let input = Tensor::new(&PROMPT[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut logits: Vec<f32> = model.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let mut pos = PROMPT.len();
    for _ in 0..DECODE_STEPS {
        let next = argmax(&logits);
        out.push(logits);
        let input = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        logits = model.forward(&input, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        pos += 1;
    }
    out.push(logits);
    out
}

/// The same sequence run through a chain of slices with the given boundaries.
fn chain_logits(bounds: &[usize]) -> Vec<Vec<f32>> {
    let path = common::smollm2();
    let mut file = ModelFile::open(&path).unwrap();
    let slices: Vec<ModelSlice> =
        bounds.windows(2).map(|w| ModelSlice::load(&mut file, w[0]..w[1], &Device::Cpu).unwrap()).collect();
    let mut caches: Vec<KvCache> = slices.iter().map(|s| s.new_cache(64).unwrap()).collect();
    let mut run = |tokens: &[u32]| -> Vec<f32> {
        let mut x = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
            x = match slice.forward(&x, cache).unwrap() {
                SliceOutput::Hidden(h) => h,
                SliceOutput::Logits(l) => return l.squeeze(0).unwrap().to_vec1().unwrap(),
            };
        }
        unreachable!("the last slice returns logits")
    };
    let mut out = Vec::new();
    let mut logits = run(&PROMPT);
    for _ in 0..DECODE_STEPS {
        let next = argmax(&logits);
        out.push(logits);
        logits = run(&[next]);
    }
    out.push(logits);
    out
}

fn assert_bitwise(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len());
        let diff = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(diff, 0, "{what}: step {step} has {diff} logits that differ in bits");
    }
}

#[test]
fn whole_model_matches_candle_quantized_llama_bit_for_bit() {
    let reference = reference_logits();
    let ours = chain_logits(&[0, 30]);
    assert_bitwise(&reference, &ours, "whole model vs quantized_llama");
    // The greedy continuation is the expected one: " Paris."
    let tokens: Vec<u32> = ours.iter().map(|l| argmax(l)).collect();
    assert_eq!(tokens[0], 7042, "first token should be ' Paris'");
}

#[test]
fn composed_slices_equal_the_whole_model_bit_for_bit() {
    let whole = chain_logits(&[0, 30]);
    assert_bitwise(&whole, &chain_logits(&[0, 15, 30]), "two slices");
    assert_bitwise(&whole, &chain_logits(&[0, 7, 19, 30]), "three slices");
}
