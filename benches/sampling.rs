//! Time to draw one token from a vocabulary's logits, per sampling setting,
//! on SmolLM2's (49,152) and Gemma 3's (262,144) vocabulary sizes: on the
//! last stage this runs once per sampled token, on one thread, between two
//! decode steps (`sollol bench` decodes greedily, which reads the logits in
//! place).
//!
//! Run: `cargo bench --bench sampling`.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use sollol::model::sampling::{sample, sample_with_logprobs, SamplingParams};

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let settings: [(&str, SamplingParams, Option<usize>); 6] = [
        ("greedy", SamplingParams::default(), None),
        (
            "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05 (Ollama's defaults)",
            SamplingParams { temperature: 0.8, ..Default::default() },
            None,
        ),
        ("the defaults, 5 top logprobs", SamplingParams { temperature: 0.8, ..Default::default() }, Some(5)),
        (
            "temperature 1, no top-k, top-p or min-p (OpenAI's defaults)",
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() },
            None,
        ),
        (
            "temperature 0.8, top-k off, top-p 0.9",
            SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.9, min_p: 0.0, ..Default::default() },
            None,
        ),
        ("the defaults, repeat penalty 1.1", SamplingParams { temperature: 0.8, repeat_penalty: 1.1, ..Default::default() }, None),
    ];
    println!("{:<72} {:>12} {:>12}", "setting", "49,152 µs", "262,144 µs");
    for (name, params, top) in settings {
        let mut cells = Vec::new();
        for vocab in [49_152, 262_144] {
            // Logits shaped like a model's: most tokens far below a few likely ones.
            let logits: Vec<f32> =
                (0..vocab).map(|_| rng.random::<f32>() * 8.0 - 4.0 + if rng.random::<f32>() < 0.001 { 10.0 } else { 0.0 }).collect();
            let history: Vec<u32> = (0..64).map(|i| i * 37 % vocab as u32).collect();
            let iters = 200;
            let t = Instant::now();
            let mut sink = 0u64;
            for step in 0..iters {
                sink += match top {
                    None => sample(&logits, &params, &history, step) as u64,
                    Some(n) => sample_with_logprobs(&logits, &params, &history, step, Some(n)).0 as u64,
                };
            }
            std::hint::black_box(sink);
            cells.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
        }
        println!("{name:<72} {:>12.1} {:>12.1}", cells[0], cells[1]);
    }
}
