//! Throughput of the quantized matrix kernels alone, per weight type and
//! number of activation rows, on SmolLM2-135M's MLP shapes (random weights).
//!
//! The matrices stay in cache from call to call, so this measures the
//! kernels' arithmetic, not memory: a whole model's decode step reads its
//! weights from DRAM (`cargo bench --bench engine` and `sollol bench` report
//! that ceiling). The `8 rows / 1 row` column is the cost of one batched
//! decode step of 8 sessions against one session's, where arithmetic binds.
//!
//! Run: `cargo bench --bench kernels` (SOLLOL_THREADS sets the threads).

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sollol::kernels::{matmul, QActs, QMatrix};

const TYPES: [GgmlDType; 8] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];
/// SmolLM2-135M's gate/up and down projections, `[rows, cols]`; K-quants
/// take 768 for 576, their blocks being 256 values.
const SHAPES: [(usize, usize); 2] = [(1536, 576), (576, 1536)];
const ROWS: [usize; 3] = [1, 8, 128];

/// Seconds per product, over ~0.1 s of products.
fn time(m: &QMatrix, acts: &QActs, out: &mut [f32]) -> f64 {
    let iters = (10_000_000_000 / (m.rows() * m.cols() * acts.rows())).max(2);
    let t = Instant::now();
    for _ in 0..iters {
        matmul(&[m], acts, &mut [&mut *out]);
    }
    t.elapsed().as_secs_f64() / iters as f64
}

/// One product to measure: a matrix, activation rows, their output.
struct Case {
    m: QMatrix,
    acts: QActs,
    out: Vec<f32>,
    best: f64,
}

fn main() {
    if let Some(n) = std::env::var("SOLLOL_THREADS").ok().and_then(|v| v.parse().ok()) {
        sollol::kernels::set_threads(n);
    }
    let random = |n: usize| -> Vec<f32> { Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap().to_vec1().unwrap() };
    let mut cases = vec![];
    for t in TYPES {
        for (rows, cols) in SHAPES {
            let fit = |n: usize| n.next_multiple_of(t.block_size());
            let (rows, cols) = (fit(rows), fit(cols));
            let w = Tensor::from_vec(random(rows * cols), (rows, cols), &Device::Cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&w, t).unwrap());
            let m = QMatrix::from_qtensor(&q).unwrap().expect("a type our kernels take").interleaved();
            for n in ROWS {
                let mut acts = QActs::new();
                acts.quantize_for(&m, &random(n * cols));
                cases.push(Case { m: m.clone(), acts, out: vec![0f32; n * rows], best: f64::MAX });
            }
        }
    }
    // Rounds go over every case in turn, so a slow spell of a shared machine
    // hits all of them alike; the best round of each counts.
    for _ in 0..5 {
        for c in &mut cases {
            c.best = c.best.min(time(&c.m, &c.acts, &mut c.out));
        }
    }
    println!(
        "kernels: {}, {} threads; GMAC/s (multiply-adds per second), best of 5 interleaved rounds",
        sollol::kernels::isa(),
        sollol::kernels::pool().threads()
    );
    println!("{:<6} {:>11} {:>9} {:>9} {:>9} {:>15}", "type", "shape", "1 row", "8 rows", "128 rows", "8 rows / 1 row");
    for row in cases.chunks(ROWS.len()) {
        let m = &row[0].m;
        let gmacs = |c: &Case| (m.rows() * m.cols() * c.acts.rows()) as f64 / c.best / 1e9;
        println!(
            "{:<6} {:>11} {:>9.1} {:>9.1} {:>9.1} {:>14.2}×",
            format!("{:?}", m.dtype()),
            format!("{}×{}", m.rows(), m.cols()),
            gmacs(&row[0]),
            gmacs(&row[1]),
            gmacs(&row[2]),
            row[1].best / row[0].best
        );
    }
}
