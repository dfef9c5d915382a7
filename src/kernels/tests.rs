//! Randomized comparisons: SIMD kernels against the scalar reference and both
//! against an f64 product of the dequantized weights; results independent of
//! how rows are batched; candle-backed types against candle's own matmul.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};

use super::*;

/// A generator with a fresh seed each run (or `SOLLOL_TEST_SEED`), printed
/// so that a failure can be replayed.
fn rng() -> rand::rngs::StdRng {
    let seed = std::env::var("SOLLOL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("SOLLOL_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn random_matrix(rng: &mut impl Rng, t: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
    if matches!(t, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
        // Valid packed scales: quantize random values (ggml's quantizer, via candle).
        let x = Tensor::new(random_acts(rng, rows * cols), &Device::Cpu).unwrap().reshape((rows, cols)).unwrap();
        return QTensor::quantize(&x, t).unwrap().data().unwrap().into_owned();
    }
    // Random bytes are valid blocks except for the f16 scales: set those to
    // small finite values so products stay meaningful.
    let bsize = t.type_size();
    let mut bytes: Vec<u8> = (0..rows * cols / QK * bsize).map(|_| rng.random()).collect();
    let scales = match t {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => 2,
        _ => 1,
    };
    for block in bytes.chunks_exact_mut(bsize) {
        for s in 0..scales {
            let v = f16::from_f32(rng.random_range(-0.05..0.05));
            block[2 * s..2 * s + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// Every type our kernels interleave.
const INTERLEAVED: [GgmlDType; 8] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

fn random_acts(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-3.0..3.0)).collect()
}

fn run(w: &QMatrix, x: &[f32]) -> Vec<f32> {
    let mut acts = QActs::new();
    acts.quantize_for(w, x);
    let mut out = vec![0f32; acts.rows() * w.rows()];
    matmul(&[w], &acts, &mut [&mut out]);
    out
}

#[test]
fn own_kernels_agree_with_scalar_and_f64_reference() {
    let mut rng = rng();
    for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0] {
        // 7 activation rows: one group of 4 and one of 3; 5 blocks per row: an odd tail.
        let (rows, cols, n) = (37, 160, 7);
        let bytes = random_matrix(&mut rng, t, rows, cols);
        let x = random_acts(&mut rng, n * cols);
        let simd = QMatrix::from_bytes(t, rows, cols, &bytes, true).unwrap().interleaved();
        let scalar = QMatrix::from_bytes(t, rows, cols, &bytes, false).unwrap();
        let (got, want) = (run(&simd, &x), run(&scalar, &x));
        let (mut w, mut w_scalar) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            simd.dequantize_row(r, &mut w);
            // The SIMD matrix holds its rows interleaved (all but the last
            // 37 % 8); each must read back as stored.
            scalar.dequantize_row(r, &mut w_scalar);
            assert_eq!(w, w_scalar, "{t:?} row {r} read back from the interleaved layout");
            for i in 0..n {
                let xr = &x[i * cols..(i + 1) * cols];
                let exact: f64 = w.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = w.iter().zip(xr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let (g, s) = (got[i * rows + r] as f64, want[i * rows + r] as f64);
                // SIMD and scalar differ only in float summation order.
                assert!((g - s).abs() <= 1e-5 * mag + 1e-6, "{t:?} row {r} act {i}: simd {g} scalar {s}");
                // Against unquantized activations: 8-bit activation error, ≤ ½ step of 1/127 of each block's max.
                assert!((g - exact).abs() <= 0.02 * mag + 1e-5, "{t:?} row {r} act {i}: {g} vs exact {exact}");
            }
        }
    }
}

/// A matrix of `t` whose stored values are as large as its kernels see them
/// (unsigned 4-bit 15, 5-bit 31, 6-bit 63; Q8_0's -128), so every integer
/// product is at its bound.
fn extreme_matrix(t: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
    let k_quant = |pattern: fn(usize) -> f32| {
        let x: Vec<f32> = (0..rows * cols).map(|i| pattern(i % cols)).collect();
        let x = Tensor::new(x, &Device::Cpu).unwrap().reshape((rows, cols)).unwrap();
        QTensor::quantize(&x, t).unwrap().data().unwrap().into_owned()
    };
    match t {
        // Each sub-block's minimum 0 and 31 values at its maximum.
        GgmlDType::Q4K | GgmlDType::Q5K => k_quant(|c| if c % 32 == 0 { 0.0 } else { 1.0 }),
        // ggml maps each 16 values' largest magnitude to -32; 31/32 of it the
        // other way is 31, stored as 63.
        GgmlDType::Q6K => k_quant(|c| if c % 16 == 0 { -1.0 } else { 31.0 / 32.0 }),
        _ => {
            let (bsize, scales) = (t.type_size(), if matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_1) { 2 } else { 1 });
            let fill = if t == GgmlDType::Q8_0 { 0x80 } else { 0xFF };
            let mut bytes = vec![fill; rows * cols / QK * bsize];
            for block in bytes.chunks_exact_mut(bsize) {
                block[..2 * scales].fill(0);
                block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            }
            bytes
        }
    }
}

#[test]
fn integer_sums_hold_the_largest_values() {
    // Activations that all quantize to 127: with the weights at their
    // extremes, every 16-bit partial sum a kernel keeps is at its bound,
    // which a wrapped sum would show as an error of the size of the result.
    for t in INTERLEAVED {
        // Two interleaved groups and a 3-row tail; 8 + 1 activation rows.
        let (rows, n) = (19, 9);
        let cols = if matches!(t, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) { 512 } else { 256 };
        let m = QMatrix::from_bytes(t, rows, cols, &extreme_matrix(t, rows, cols), true).unwrap().interleaved();
        let x = vec![1f32; n * cols];
        let got = run(&m, &x);
        let mut w = vec![0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut w);
            let exact: f64 = w.iter().map(|&v| v as f64).sum();
            let mag: f64 = w.iter().map(|&v| (v as f64).abs()).sum();
            assert!(mag > 0.0, "{t:?}: the extreme matrix is not empty");
            for i in 0..n {
                // The activations' f16 scale (1/127) is within 2⁻¹¹ of exact.
                let g = got[i * rows + r] as f64;
                assert!((g - exact).abs() <= 2e-3 * mag, "{t:?} row {r} act {i}: {g} vs {exact}");
            }
        }
    }
}

/// The interleaved kernels' AVX2 and AVX-512 VNNI forms must give the same
/// bits: the same integer sums, then the same float steps. Random and
/// extreme matrices (every integer product at its bound), 1 to 8 rows.
#[test]
#[cfg(target_arch = "x86_64")]
fn vnni_kernels_equal_the_avx2_ones_bit_for_bit() {
    if !avx2::vnni_available() {
        println!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    let mut rng = rng();
    for t in INTERLEAVED {
        let (rows, cols) = (24, if matches!(t, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) { 512 } else { 160 });
        for (name, bytes) in [("random", random_matrix(&mut rng, t, rows, cols)), ("extreme", extreme_matrix(t, rows, cols))] {
            let m = QMatrix::from_bytes(t, rows, cols, &bytes, true).unwrap().interleaved();
            assert_eq!(m.grouped, rows, "{t:?}: every row interleaved");
            let (w, nb, groups) = (m.data.bytes(), cols / t.block_size(), rows / repack::ROWS);
            for n in 1..=GROUP_KERNEL_ROWS {
                let x = if name == "extreme" { vec![1f32; n * cols] } else { random_acts(&mut rng, n * cols) };
                let mut acts = QActs::new();
                acts.quantize_for(&m, &x);
                let a: Vec<&[u8]> = (0..n).map(|i| acts.row(i)).collect();
                let product = |vnni: bool| {
                    let mut out = vec![0f32; n * rows];
                    let o: Vec<OutPtr> = out.chunks_exact_mut(rows).map(|o| SendPtr(o.as_mut_ptr())).collect();
                    // SAFETY: the CPU has AVX2 and VNNI (checked above); `w` is
                    // `groups` whole groups; each output has room for `rows` values.
                    unsafe {
                        match m.grouping().unwrap() {
                            Grouping::Own(t) => avx2_groups(t, vnni, w, nb, groups, &a, &o),
                            Grouping::K(k) => avx2_k_groups(k, vnni, w, nb, groups, &a, &o),
                        }
                    }
                    out
                };
                let (avx2, vnni) = (product(false), product(true));
                assert!(avx2.iter().any(|&v| v != 0.0), "{t:?} {name}: a non-trivial product");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&vnni), bits(&avx2), "{t:?} {name} matrix, {n} activation rows");
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_its_batch() {
    let mut rng = rng();
    for t in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let k_quant = matches!(t, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        let (rows, cols) = (19, if k_quant { 512 } else { 96 });
        let w = QMatrix::from_bytes(t, rows, cols, &random_matrix(&mut rng, t, rows, cols), true).unwrap().interleaved();
        let x = random_acts(&mut rng, 6 * cols);
        let batched = run(&w, &x);
        for i in 0..6 {
            let alone = run(&w, &x[i * cols..(i + 1) * cols]);
            assert_eq!(alone, batched[i * rows..(i + 1) * rows], "{t:?} row {i}");
        }
    }
}

#[test]
fn matrices_sharing_a_region_give_what_each_gives_alone() {
    // Two 37-row matrices (four interleaved groups and a 5-row tail each) in
    // one parallel region, on pools of several sizes: tiles of both are
    // claimed by whichever thread is free, which must not change a number.
    let mut rng = rng();
    for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_1, GgmlDType::Q8_0] {
        let (rows, cols) = (37, 64);
        let a = QMatrix::from_bytes(t, rows, cols, &random_matrix(&mut rng, t, rows, cols), true).unwrap().interleaved();
        let b = QMatrix::from_bytes(t, rows, cols, &random_matrix(&mut rng, t, rows, cols), true).unwrap().interleaved();
        let x = random_acts(&mut rng, 5 * cols);
        let mut acts = QActs::new();
        acts.quantize_for(&a, &x);
        let (mut oa, mut ob) = (vec![0f32; 5 * rows], vec![0f32; 5 * rows]);
        for threads in [1, 2, 3, 5] {
            let pool = pool::Pool::new(threads);
            matmul_in(&pool, &[&a, &b], &acts, &mut [&mut oa, &mut ob]);
            assert_eq!(oa, run(&a, &x), "{t:?}, {threads} threads: first matrix");
            assert_eq!(ob, run(&b, &x), "{t:?}, {threads} threads: second matrix");
        }
    }
}

#[test]
fn products_of_different_activations_in_one_region_give_what_each_gives_alone() {
    // A mixture's experts: matrices of their own sizes over rows of their
    // own (one row: a decode step's single pass; nine: prefill's tiles), in
    // one region, with a K-quant beside the legacy types, on pools of
    // several sizes.
    let mut rng = rng();
    let shapes = [(GgmlDType::Q4_0, 37, 64, 1), (GgmlDType::Q8_0, 16, 64, 9), (GgmlDType::Q4K, 21, 256, 3), (GgmlDType::Q5_1, 53, 32, 1)];
    let mats: Vec<QMatrix> = shapes
        .iter()
        .map(|&(t, rows, cols, _)| QMatrix::from_bytes(t, rows, cols, &random_matrix(&mut rng, t, rows, cols), true).unwrap().interleaved())
        .collect();
    let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, _, cols, n)| random_acts(&mut rng, n * cols)).collect();
    let acts: Vec<QActs> = mats
        .iter()
        .zip(&xs)
        .map(|(m, x)| {
            let mut a = QActs::new();
            a.quantize_for(m, x);
            a
        })
        .collect();
    let ins: Vec<(&QMatrix, &QActs)> = mats.iter().zip(&acts).collect();
    for threads in [1, 2, 3, 5] {
        let pool = pool::Pool::new(threads);
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, rows, _, n)| vec![f32::NAN; rows * n]).collect();
        let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        products_in(&pool, &ins, &mut out_refs);
        for (i, (m, x)) in mats.iter().zip(&xs).enumerate() {
            assert_eq!(outs[i], run(m, x), "{:?}, {threads} threads", shapes[i].0);
        }
    }
}

#[test]
fn quantizations_in_one_region_give_what_each_gives_alone() {
    // Jobs of different formats and row counts, each row prepared in place
    // with its job's own work first: the rows must land in their own job.
    let mut rng = rng();
    let shapes = [(GgmlDType::Q4_0, 64, 1), (GgmlDType::Q4K, 256, 3), (GgmlDType::Q8_0, 32, 5)];
    let mats: Vec<QMatrix> = shapes
        .iter()
        .map(|&(t, cols, _)| QMatrix::from_bytes(t, 16, cols, &random_matrix(&mut rng, t, 16, cols), true).unwrap().interleaved())
        .collect();
    let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, cols, n)| random_acts(&mut rng, n * cols)).collect();
    let prep = |j: usize, r: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v = *v * (j + 2) as f32 - r as f32);
    let mut inputs = xs.clone();
    let mut acts: Vec<QActs> = shapes.iter().map(|_| QActs::new()).collect();
    let mut jobs: Vec<Quantize> = acts.iter_mut().zip(&mats).zip(&mut inputs).map(|((acts, w), x)| Quantize { acts, w, x }).collect();
    quantize_all(&mut jobs, &prep);
    for (j, (m, x)) in mats.iter().zip(&xs).enumerate() {
        let mut alone = x.clone();
        alone.chunks_exact_mut(m.cols).enumerate().for_each(|(r, row)| prep(j, r, row));
        assert_eq!(inputs[j], alone, "job {j}: its rows prepared in place");
        let mut want = QActs::new();
        want.quantize_for(m, &alone);
        assert_eq!((acts[j].rows(), acts[j].data.bytes()), (want.rows(), want.data.bytes()), "job {j}");
    }
}

#[test]
fn candle_backed_types_match_candles_matmul() {
    let dev = Device::Cpu;
    let mut rng = rng();
    for t in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::F16] {
        // 37 rows: two 16-row tiles and a tail (K-quants: four interleaved
        // groups and 5 rows in GGUF's layout); 11 activation rows: the
        // K-quant kernels take 8 + 3, candle's dot products (F16) 4 + 4 + 3.
        let (rows, cols, n) = (37, 768, 11);
        let wf = Tensor::new(random_acts(&mut rng, rows * cols), &dev).unwrap().reshape((rows, cols)).unwrap();
        let q = QTensor::quantize(&wf, t).unwrap();
        let x = random_acts(&mut rng, n * cols);
        let q = std::sync::Arc::new(q);
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap().interleaved();
        // Every row reads back as stored, interleaved or not.
        let stored = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let mut w = vec![0f32; cols];
        for (r, want) in stored.iter().enumerate() {
            m.dequantize_row(r, &mut w);
            assert_eq!(&w, want, "{t:?} row {r} read back");
        }
        let ours = run(&m, &x);
        let xt = Tensor::new(x.as_slice(), &dev).unwrap().reshape((n, cols)).unwrap();
        let theirs = QMatMul::from_arc(q).unwrap().forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // candle multiplies F16 weights with f32 activations; the dot product
        // path rounds activations to f16 (2⁻¹¹ relative) first.
        let tol = if t == GgmlDType::F16 { 1e-3 } else { 1e-5 };
        for (idx, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let (i, r) = (idx / rows, idx % rows);
            m.dequantize_row(r, &mut w);
            let mag: f32 = w.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| (a * b).abs()).sum();
            assert!((a - b).abs() <= tol * mag, "{t:?}: {a} vs {b} (magnitude {mag})");
        }
    }
}

#[test]
fn unsupported_shapes_and_types_are_refused() {
    assert!(QMatrix::from_bytes(GgmlDType::Q4_1, 2, 48, &[0; 60], true).is_none(), "cols not a block multiple");
    assert!(QMatrix::from_bytes(GgmlDType::Q4_1, 2, 64, &[0; 79], true).is_none(), "wrong byte count");
    assert!(QMatrix::from_bytes(GgmlDType::Q8_1, 1, 32, &[0; 36], true).is_none());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_activation_quantization_equals_the_scalar_one_bit_for_bit() {
    if !simd_available() {
        return;
    }
    let mut rng = rng();
    let blocks = 64;
    for case in 0..4 {
        let mut x: Vec<f32> = (0..blocks * QK).map(|_| rng.random_range(-30.0..30.0)).collect();
        match case {
            // Values landing exactly on half steps (ties round away from zero).
            1 => x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 255) as f32 - 127.0 + 0.5 * (i % 2) as f32),
            // All-zero blocks (scale 0) and negative zeros.
            2 => x[..2 * QK].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { 0.0 } else { -0.0 }),
            // Tiny and huge magnitudes.
            3 => x.iter_mut().enumerate().for_each(|(i, v)| *v *= if i % 3 == 0 { 1e-30 } else { 1e4 }),
            _ => {}
        }
        let (mut ours, mut reference) = (vec![0u8; q8_row_bytes(x.len())], vec![0u8; q8_row_bytes(x.len())]);
        q8_quantize(&x, &mut ours, true);
        q8_quantize(&x, &mut reference, false);
        assert_eq!(ours, reference, "case {case}");
    }
}

/// The K-quants' activation rows from our AVX2 quantizer are the bytes of
/// candle's `BlockQ8K::from_float`, so that Q2_K/Q3_K matrices (candle's
/// dot products) can share them: random rows, values on exact half steps
/// of the scale (the scale from a largest value of 127, so that
/// `x * -127 / max` lands on ties), a largest magnitude held by both signs
/// (the first sets the scale's sign), zero blocks.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_k_quant_activations_equal_candles_bit_for_bit() {
    if !simd_available() {
        return;
    }
    let mut rng = rng();
    let n = 256 * 16;
    for case in 0..5 {
        let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0..30.0)).collect();
        match case {
            1 => x.iter_mut().enumerate().for_each(|(i, v)| *v = if i % 256 == 7 { 127.0 } else { (i % 255) as f32 * 0.5 - 63.5 }),
            2 => x.iter_mut().enumerate().for_each(|(i, v)| {
                *v = if i % 256 == 3 {
                    -5.0
                } else if i % 256 == 9 {
                    5.0
                } else {
                    *v * 0.1
                }
            }),
            3 => x[..512].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { 0.0 } else { -0.0 }),
            4 => x.iter_mut().enumerate().for_each(|(i, v)| *v *= if i % 3 == 0 { 1e-30 } else { 1e4 }),
            _ => {}
        }
        let bytes = n / 256 * size_of::<blocks::BlockQ8K>();
        let (mut theirs, mut ours) = (vec![0u8; bytes], vec![0u8; bytes]);
        ggml_quantize::<candle_core::quantized::k_quants::BlockQ4K>(&x, &mut theirs);
        // SAFETY: simd_available() said the CPU has AVX2/FMA/F16C.
        unsafe { avx2::quantize_q8k(&x, cast_mut(&mut ours)) };
        let (o, t) = (cast::<blocks::BlockQ8K>(&ours), cast::<blocks::BlockQ8K>(&theirs));
        for (b, (o, t)) in o.iter().zip(t).enumerate() {
            assert_eq!((o.d.to_bits(), o.qs, o.bsums), (t.d.to_bits(), t.qs, t.bsums), "case {case} block {b}");
        }
    }
}

#[test]
fn vectorized_row_ops_equal_their_portable_source_bit_for_bit() {
    // The same operations in the same order, only compiled for other
    // instructions (Rust contracts no multiply-add on its own): any
    // difference would mean the AVX2 build reordered the arithmetic.
    let mut rng = rng();
    for n in [1, 7, 8, 64, 161, 576, 1536] {
        let x = random_acts(&mut rng, n);
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
        let (mut a, mut b) = (x.clone(), x.clone());
        softmax(&mut a);
        ops::softmax(&mut b);
        assert_eq!(a, b, "softmax, n = {n}");
        let (mut a, mut b) = (x.clone(), x.clone());
        silu_mul(&mut a, &w);
        ops::silu_mul(&mut b, &w);
        assert_eq!(a, b, "silu_mul, n = {n}");
        let (mut a, mut b) = (x.clone(), x.clone());
        gelu_mul(&mut a, &w);
        ops::gelu_mul(&mut b, &w);
        assert_eq!(a, b, "gelu_mul, n = {n}");
        let (mut a, mut b) = (x.clone(), x.clone());
        gelu(&mut a);
        ops::gelu(&mut b);
        assert_eq!(a, b, "gelu, n = {n}");
        let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        layer_norm(&x, &w, &bias, 1e-5, &mut a);
        ops::layer_norm(&x, &w, &bias, 1e-5, &mut b);
        assert_eq!(a, b, "layer_norm, n = {n}");
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        rms_norm(&x, &w, 1e-5, &mut a);
        ops::rms_norm(&x, &w, 1e-5, &mut b);
        assert_eq!(a, b, "rms_norm, n = {n}");
    }
    // Two rows of three 64-value heads at position 5 of a 9-position table.
    let (heads, d) = (3, 64);
    let x = random_acts(&mut rng, 2 * heads * d);
    let (cos, sin): (Vec<f32>, Vec<f32>) = (0..9 * d / 2).map(|i| (i as f32 * 0.37).sin_cos()).unzip();
    for interleaved in [true, false] {
        let (mut a, mut b) = (x.clone(), x.clone());
        let r = ops::Rotation { cos: &cos, sin: &sin, rot_dim: d, interleaved };
        rope(&mut a, heads, d, 5, r);
        ops::rope(&mut b, heads, d, 5, r);
        assert_eq!(a, b, "rope, interleaved {interleaved}");
        assert_ne!(a, x, "rope rotated nothing");
    }
    // Partial rotation (phi2): the first 16 values of each head turn, the rest stay.
    let (mut a, mut b) = (x.clone(), x.clone());
    let r = ops::Rotation { cos: &cos, sin: &sin, rot_dim: 16, interleaved: false };
    rope(&mut a, heads, d, 5, r);
    ops::rope(&mut b, heads, d, 5, r);
    assert_eq!(a, b, "partial rope");
    for (h, (ra, rx)) in a.chunks_exact(d).zip(x.chunks_exact(d)).enumerate() {
        assert_ne!(ra[..16], rx[..16], "head {h} rotated nothing");
        assert_eq!(ra[16..], rx[16..], "head {h} rotated past its rotary dims");
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn f16_dot_product_matches_f64_at_every_length() {
    if !simd_available() {
        return;
    }
    let mut rng = rng();
    for n in (0..80).chain([576, 1536, 4099]) {
        let w: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
        let a: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-3.0..3.0))).collect();
        let exact: f64 = w.iter().zip(&a).map(|(w, a)| w.to_f64() * a.to_f64()).sum();
        let mag: f64 = w.iter().zip(&a).map(|(w, a)| (w.to_f64() * a.to_f64()).abs()).sum();
        // SAFETY: AVX2/FMA/F16C checked above; both rows hold n values.
        let ours = unsafe { avx2::dot_f16(n, &w, &a) } as f64;
        assert!((ours - exact).abs() <= 1e-6 * mag.max(1.0), "n = {n}: {ours} vs {exact}");
    }
}

/// Attention's value sums with AVX-512's registers (one pass over the
/// columns) give the AVX2 form's bits (two passes).
#[test]
#[cfg(target_arch = "x86_64")]
fn wide_value_sums_equal_the_avx2_ones_bit_for_bit() {
    if !avx2::vnni_available() {
        println!("skipped: this CPU has no AVX-512");
        return;
    }
    let mut rng = rng();
    for (heads, d, n) in [(1, 64, 37), (2, 64, 300), (3, 64, 1024), (3, 128, 5), (4, 72, 9), (7, 64, 100)] {
        let probs: Vec<f32> = (0..heads * n).map(|_| rng.random_range(0.0..1.0)).collect();
        let v: Vec<f16> = (0..n * d).map(|_| f16::from_f32(rng.random_range(-2.0..2.0))).collect();
        let (mut narrow, mut wide) = (vec![0f32; heads * d], vec![0f32; heads * d]);
        // SAFETY: the CPU has AVX2 and AVX-512 (checked above); the shapes are asserted inside.
        unsafe {
            avx2::weighted_sum(&probs, d, &v, &mut narrow);
            avx2::weighted_sum_wide(&probs, d, &v, &mut wide);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide), bits(&narrow), "{heads} heads of {d}, {n} rows");
    }
}

/// `softmax(q_h·Kᵀ · scale) V` in f64 for each head of `q`, `[group, head_dim]`.
fn attention_f64(shape: ops::AttnShape, q: &[f32], k: &[half::f16], v: &[half::f16], pos: usize, kv: usize) -> Vec<f64> {
    let (d, cap) = (shape.head_dim, shape.capacity);
    let seen = (pos + 1).saturating_sub(shape.window)..=pos;
    let mut out = vec![];
    for q in q.chunks_exact(d) {
        let s: Vec<f64> = seen
            .clone()
            .map(|j| (0..d).map(|c| q[c] as f64 * k[(kv * cap + j) * d + c].to_f64()).sum::<f64>() * shape.scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        out.extend((0..d).map(|c| seen.clone().zip(&s).map(|(j, s)| (s - m).exp() / z * v[(kv * cap + j) * d + c].to_f64()).sum::<f64>()));
    }
    out
}

#[test]
fn attention_matches_an_f64_softmax() {
    use half::f16;
    use ops::{attend, AttnShape};
    let mut rng = rng();
    // Head sizes on the SIMD path (multiples of 8, one above 64 values) and
    // off it; groups of query heads that the kernels take whole and in
    // pieces; every context length up to 11 (whole groups of four cache rows
    // and tails).
    // Sliding windows of 3 rows and none (the whole context).
    for (d, window) in [8, 24, 72, 6].into_iter().flat_map(|d| [(d, usize::MAX), (d, 3)]) {
        for group in [1, 2, 3, 4, 7] {
            let (n_kv, cap) = (2, 11);
            let scale = 1.0 / (d as f32).sqrt();
            let shape = AttnShape { n_heads: n_kv * group, n_kv_heads: n_kv, head_dim: d, capacity: cap, scale, window };
            let mut values = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
            let k: Vec<f16> = values(n_kv * cap * d, 2.0).into_iter().map(f16::from_f32).collect();
            let v: Vec<f16> = values(n_kv * cap * d, 2.0).into_iter().map(f16::from_f32).collect();
            // A different query per head, so a head mixed up with another shows.
            let q = values(group * d, 1.5);
            for pos in 0..cap {
                for kv in 0..n_kv {
                    let mut out = vec![0f32; group * d];
                    attend(shape, &q, &k, &v, pos, kv, &mut out);
                    for (c, (&got, want)) in out.iter().zip(attention_f64(shape, &q, &k, &v, pos, kv)).enumerate() {
                        // f32 rounding of sums of at most 72 products (scores of
                        // magnitude ≤ 26) and 11 weighted rows: ~1e-6 measured.
                        assert!(
                            (got as f64 - want).abs() < 2e-5,
                            "d {d} window {window} group {group} pos {pos} kv {kv} value {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// A long context attended in spans and combined equals the f64 softmax
/// over all of it: positions on both sides of span boundaries, with and
/// without a sliding window (which moves where the spans start).
#[test]
fn attention_in_spans_matches_an_f64_softmax() {
    use half::f16;
    use ops::{attend_span, combine_spans, AttnShape, SPAN};
    let mut rng = rng();
    let (d, group, n_kv, cap) = (64, 3, 2, 2 * SPAN + 300);
    for window in [usize::MAX, SPAN + 100] {
        let shape = AttnShape { n_heads: n_kv * group, n_kv_heads: n_kv, head_dim: d, capacity: cap, scale: 0.125, window };
        let mut values = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
        let k: Vec<f16> = values(n_kv * cap * d, 2.0).into_iter().map(f16::from_f32).collect();
        let v: Vec<f16> = values(n_kv * cap * d, 2.0).into_iter().map(f16::from_f32).collect();
        let q = values(group * d, 1.5);
        for pos in [SPAN - 1, SPAN, SPAN + 1, SPAN + 150, 2 * SPAN + 5, cap - 1] {
            let spans = shape.spans(pos);
            let seen = (pos + 1).min(window);
            assert_eq!(spans, seen.div_ceil(SPAN), "window {window} pos {pos}");
            for kv in 0..n_kv {
                let part_len = group * (d + 2);
                let mut parts = vec![0f32; spans * part_len];
                for (span, part) in parts.chunks_exact_mut(part_len).enumerate() {
                    let (out, ml) = part.split_at_mut(group * d);
                    attend_span(shape, &q, &k, &v, pos, kv, span, out, ml);
                }
                let mut out = vec![0f32; group * d];
                combine_spans(group, d, &parts, &mut out);
                for (c, (&got, want)) in out.iter().zip(attention_f64(shape, &q, &k, &v, pos, kv)).enumerate() {
                    // f32 sums over up to 2,348 weighted rows.
                    assert!((got as f64 - want).abs() < 5e-5, "window {window} pos {pos} kv {kv} value {c}: {got} vs {want}");
                }
            }
        }
    }
}
