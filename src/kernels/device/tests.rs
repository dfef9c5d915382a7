//! Every device kernel against a CPU reference on random inputs, on the
//! host emulator always and on the GPU where the `cuda` feature and a
//! device are present. References are f64 over the values the kernel is
//! given (weights dequantized by candle, activations by their q8a blocks).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::emu::Emu;
use super::*;

fn uniform(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}

fn f16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// The q8a blocks of `x` as the kernels make them, and the values they hold.
fn q8a(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(x.len() / 32 * Q8A_BYTES);
    let mut values = Vec::with_capacity(x.len());
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let q: Vec<i8> = block.iter().map(|v| if amax == 0.0 { 0 } else { (v / d).round() as i8 }).collect();
        let s = d * q.iter().map(|&q| q as f32).sum::<f32>();
        bytes.extend(d.to_le_bytes());
        bytes.extend(s.to_le_bytes());
        bytes.extend(q.iter().map(|&q| q as u8));
        values.extend(q.iter().map(|&q| d * q as f32));
    }
    (bytes, values)
}

fn ggml(ty: DeviceType) -> GgmlDType {
    match ty {
        DeviceType::Q4_0 => GgmlDType::Q4_0,
        DeviceType::Q4_1 => GgmlDType::Q4_1,
        DeviceType::Q8_0 => GgmlDType::Q8_0,
        DeviceType::Q4K => GgmlDType::Q4K,
        DeviceType::Q6K => GgmlDType::Q6K,
        DeviceType::F16 => GgmlDType::F16,
        DeviceType::F32 => GgmlDType::F32,
    }
}

const TYPES: [DeviceType; 7] =
    [DeviceType::Q4_0, DeviceType::Q4_1, DeviceType::Q8_0, DeviceType::Q4K, DeviceType::Q6K, DeviceType::F16, DeviceType::F32];

/// A random `[rows, cols]` weight of type `ty`: its bytes as GGUF stores
/// them (quantized by candle) and its values (dequantized by candle).
fn weight(r: &mut StdRng, ty: DeviceType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let values = uniform(r, rows * cols, 1.0);
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ggml(ty)).unwrap();
    let bytes = q.data().unwrap().to_vec();
    assert_eq!(bytes.len(), rows * ty.row_bytes(cols));
    (bytes, q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap())
}

/// Activation rows as the products of `ty` take them, and the values they hold.
fn acts(r: &mut StdRng, ty: DeviceType, n: usize) -> (Vec<u8>, Vec<f32>) {
    let x = uniform(r, n, 2.0);
    if ty.quantized() {
        q8a(&x)
    } else {
        (f32_bytes(&x), x)
    }
}

fn dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&a, &b)| (s + a as f64 * b as f64, m + (a as f64 * b as f64).abs()))
}

/// `got` within `rel` of `want`'s magnitude `scale` (Σ|terms|, to bound rounding).
fn close(what: &str, got: f32, want: f64, scale: f64, rel: f64) {
    assert!((got as f64 - want).abs() <= rel * scale + 1e-6, "{what}: got {got}, want {want} (terms {scale})");
}

fn check_rmsnorm(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(1);
    let (rows, n, eps) = (3, 320, 1e-6f32);
    let x = uniform(&mut r, rows * n, 3.0);
    let w = uniform(&mut r, n, 1.5);
    let res = uniform(&mut r, rows * n, 1.0);
    for (with_w, with_res) in [(true, false), (true, true), (false, false)] {
        let (xb, wb, rb) = (d.upload(&f32_bytes(&x)).unwrap(), d.upload(&f32_bytes(&w)).unwrap(), d.upload(&f32_bytes(&res)).unwrap());
        let (yb, qb) = (d.upload(&vec![0; rows * n * 4]).unwrap(), d.upload(&vec![0; rows * n / 32 * Q8A_BYTES]).unwrap());
        let (wa, ra) = (if with_w { wb.addr() } else { 0 }, if with_res { rb.addr() } else { 0 });
        let (xa, ya, qa) = (xb.addr(), yb.addr(), qb.addr());
        rmsnorm(d, xa, wa, ra, ya, qa, rows, n, eps).unwrap();
        let y = f32s(&d.download(&yb).unwrap());
        for row in 0..rows {
            let xr = &x[row * n..][..n];
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..n {
                let mut want = xr[i] as f64 * inv * if with_w { w[i] as f64 } else { 1.0 };
                if with_res {
                    want += res[row * n + i] as f64;
                }
                close("rmsnorm", y[row * n + i], want, want.abs().max(1.0), 1e-5);
            }
        }
        // The blocks are exactly those of the f32 output.
        assert_eq!(d.download(&qb).unwrap(), q8a(&y).0, "rmsnorm's q8a blocks");
    }
    // In place, with the residual added to itself.
    let xb = d.upload(&f32_bytes(&x)).unwrap();
    let xa = xb.addr();
    rmsnorm(d, xa, 0, xa, xa, 0, rows, n, eps).unwrap();
    let y = f32s(&d.download(&xb).unwrap());
    let inv = 1.0 / ((x[..n].iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64) + eps as f64).sqrt();
    close("rmsnorm in place", y[5], x[5] as f64 * inv + x[5] as f64, 1.0, 1e-5);
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())
}

fn check_rows_op(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(7);
    let n = 1000;
    let (a, b) = (uniform(&mut r, n, 4.0), uniform(&mut r, n, 2.0));
    type Reference = fn(f64, f64) -> f64;
    let cases: [(RowsOp, Reference); 6] = [
        (RowsOp::Zero, |_, _| 0.0),
        (RowsOp::Add, |a, b| a + b),
        (RowsOp::Scale(1.5), |a, _| a * 1.5),
        (RowsOp::Gated(DeviceGate::Silu), |a, b| silu(a) * b),
        (RowsOp::Gated(DeviceGate::GeluTanh), |a, b| gelu(a) * b),
        (RowsOp::Gelu, |a, _| gelu(a)),
    ];
    for (op, f) in cases {
        let (ab, bb) = (d.upload(&f32_bytes(&a)).unwrap(), d.upload(&f32_bytes(&b)).unwrap());
        // In place, over `a`.
        rows_op(d, op, ab.addr(), bb.addr(), ab.addr(), n).unwrap();
        let y = f32s(&d.download(&ab).unwrap());
        for i in 0..n {
            let want = f(a[i] as f64, b[i] as f64);
            close(&format!("{op:?}"), y[i], want, want.abs().max(1.0), 1e-6);
        }
    }
}

fn check_gather_scatter(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(8);
    let (rows, width) = (9, 96);
    let x = uniform(&mut r, rows * width, 2.0);
    let idx = [7i32, 0, 4];
    // Powers of two: the products are exact, fused or not.
    let w = [0.5f32, -2.0, 0.25];
    let (xb, ib, wb) = (d.upload(&f32_bytes(&x)).unwrap(), d.upload(&i32_bytes(&idx)).unwrap(), d.upload(&f32_bytes(&w)).unwrap());
    let gb = d.upload(&vec![0; idx.len() * width * 4]).unwrap();
    gather_rows(d, xb.addr(), ib.addr(), gb.addr(), idx.len(), width * 4).unwrap();
    let g = f32s(&d.download(&gb).unwrap());
    for (i, &row) in idx.iter().enumerate() {
        assert_eq!(&g[i * width..][..width], &x[row as usize * width..][..width], "gathered row {i}");
    }
    // Added back, weighted, onto the rows they came from (in place over x).
    scatter_add(d, xb.addr(), gb.addr(), ib.addr(), wb.addr(), idx.len(), width).unwrap();
    let y = f32s(&d.download(&xb).unwrap());
    for row in 0..rows {
        let wi = idx.iter().position(|&i| i as usize == row).map_or(0.0, |i| w[i]);
        for c in 0..width {
            let v = x[row * width + c];
            assert_eq!(y[row * width + c], v + wi * v, "row {row} column {c}");
        }
    }
}

fn check_quantize(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(2);
    let mut x = uniform(&mut r, 32 * 21, 4.0);
    x[32..64].fill(0.0); // a block of zeros has scale 0
    let (xb, yb) = (d.upload(&f32_bytes(&x)).unwrap(), d.upload(&vec![0; 21 * Q8A_BYTES]).unwrap());
    let (xa, ya) = (xb.addr(), yb.addr());
    quantize_q8(d, xa, ya, x.len()).unwrap();
    assert_eq!(d.download(&yb).unwrap(), q8a(&x).0);
}

fn check_products(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(3);
    let (rows, cols) = (37, 512);
    for ty in TYPES {
        let (wb_bytes, w) = weight(&mut r, ty, rows, cols);
        let (ub_bytes, u) = weight(&mut r, ty, rows, cols);
        for nb in [1, 3, 11] {
            let (xb_bytes, x) = acts(&mut r, ty, nb * cols);
            let res = uniform(&mut r, nb * rows, 1.0);
            let p = Product { ty, rows, cols, nb };
            let (wb, ub, xb) = (d.upload(&wb_bytes).unwrap(), d.upload(&ub_bytes).unwrap(), d.upload(&xb_bytes).unwrap());
            let (yb, gb) = (d.upload(&f32_bytes(&res)).unwrap(), d.upload(&vec![0; nb * rows * 4]).unwrap());
            let (wa, ua, xa, ya, ga) = (wb.addr(), ub.addr(), xb.addr(), yb.addr(), gb.addr());
            // With the residual in place on the odd sizes, without on the others.
            let with_res = nb % 2 == 1;
            if with_res {
                matvec(d, p, wa, xa, ya, ya).unwrap();
            } else {
                matvec(d, p, wa, xa, ya, 0).unwrap();
            }
            let gate = if nb == 3 { DeviceGate::GeluTanh } else { DeviceGate::Silu };
            glu(d, p, gate, wa, ua, xa, ga).unwrap();
            let (y, g) = (f32s(&d.download(&yb).unwrap()), f32s(&d.download(&gb).unwrap()));
            for b in 0..nb {
                let xr = &x[b * cols..][..cols];
                for o in 0..rows {
                    let (s, m) = dot(&w[o * cols..][..cols], xr);
                    let want = s + if with_res { res[b * rows + o] as f64 } else { 0.0 };
                    close(&format!("matvec {ty:?} nb {nb} row {b} out {o}"), y[b * rows + o], want, m + 1.0, 2e-6);
                    let (su, mu) = dot(&u[o * cols..][..cols], xr);
                    let f = match gate {
                        DeviceGate::Silu => silu(s),
                        DeviceGate::GeluTanh => gelu(s),
                    };
                    close(&format!("glu {ty:?} nb {nb} row {b} out {o}"), g[b * rows + o], f * su, (m + 1.0) * (mu + 1.0), 4e-6);
                }
            }
        }
    }
}

fn check_gemm(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(9);
    let (rows, cols, nb) = (37, 512, 40);
    for ty in TYPES {
        let (wb_bytes, w) = weight(&mut r, ty, rows, cols);
        let (wb, w16) = (d.upload(&wb_bytes).unwrap(), d.upload(&vec![0; rows * cols * 2]).unwrap());
        to_f16(d, ty, wb.addr(), w16.addr(), rows, cols).unwrap();
        let wh = f16s(&d.download(&w16).unwrap());
        for (i, (&got, &want)) in wh.iter().zip(&w).enumerate() {
            // One f16 rounding of candle's value (a GPU may fuse its multiply-add).
            close(&format!("to_f16 {ty:?} value {i}"), got, want as f64, want.abs() as f64, 1.0 / 1024.0);
        }
        let x = uniform(&mut r, nb * cols, 2.0);
        let (xb, x16, yb) =
            (d.upload(&f32_bytes(&x)).unwrap(), d.upload(&vec![0; nb * cols * 2]).unwrap(), d.upload(&vec![0; nb * rows * 4]).unwrap());
        f32_to_f16(d, xb.addr(), x16.addr(), nb * cols).unwrap();
        let xh = f16s(&d.download(&x16).unwrap());
        assert_eq!(xh, f16s(&f16_bytes(&x)), "f32_to_f16");
        d.gemm(Gemm { rows, cols, nb, w: w16.addr(), x: x16.addr(), y: yb.addr() }).unwrap();
        let y = f32s(&d.download(&yb).unwrap());
        for b in 0..nb {
            for o in 0..rows {
                let (s, m) = dot(&wh[o * cols..][..cols], &xh[b * cols..][..cols]);
                close(&format!("gemm {ty:?} row {b} out {o}"), y[b * rows + o], s, m + 1.0, 1e-5);
            }
        }
    }
}

fn check_get_rows(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(4);
    let (vocab, cols, scale) = (10, 512, 1.5f32);
    let tokens = [3i32, 0, 9, 3];
    for ty in TYPES {
        let (wb_bytes, w) = weight(&mut r, ty, vocab, cols);
        let (wb, tb, yb) =
            (d.upload(&wb_bytes).unwrap(), d.upload(&i32_bytes(&tokens)).unwrap(), d.upload(&vec![0; tokens.len() * cols * 4]).unwrap());
        let (wa, ta, ya) = (wb.addr(), tb.addr(), yb.addr());
        get_rows(d, ty, wa, ta, ya, tokens.len(), cols, scale).unwrap();
        let y = f32s(&d.download(&yb).unwrap());
        for (i, &t) in tokens.iter().enumerate() {
            // Within a rounding of candle's dequantization (a GPU may fuse
            // its multiply-add of scale and minimum).
            for (c, v) in w[t as usize * cols..][..cols].iter().enumerate() {
                let want = (v * scale) as f64;
                close(&format!("get_rows {ty:?} token {t}"), y[i * cols + c], want, want.abs(), 1e-6);
            }
        }
    }
}

/// Rotary tables `[positions, rot / 2]` for base 10000.
fn tables(positions: usize, rot: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..positions {
        for i in 0..rot / 2 {
            let a = p as f32 / 10000f32.powf(2.0 * i as f32 / rot as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

fn check_rope_kv(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(5);
    let h = Heads { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let (nb, cap, eps) = (3, 24, 1e-6f32);
    let pos = [0i32, 5, 23];
    for (rot, neox, norms) in [(64, false, false), (32, true, true), (64, true, false)] {
        let (cos, sin) = tables(cap, rot);
        let q = uniform(&mut r, nb * h.n_heads * h.head_dim, 2.0);
        let k = uniform(&mut r, nb * h.n_kv_heads * h.head_dim, 2.0);
        let v = uniform(&mut r, nb * h.n_kv_heads * h.head_dim, 2.0);
        let (qn, kn) = (uniform(&mut r, h.head_dim, 1.5), uniform(&mut r, h.head_dim, 1.5));
        let cache_len = cap * h.n_kv_heads * h.head_dim;
        // Caches start as a pattern the kernel must leave where it does not write.
        let before: Vec<u8> = (0..cache_len * 2).map(|i| (i % 7) as u8).collect();
        let kcs: Vec<DevBuf> = (0..nb).map(|_| d.upload(&before).unwrap()).collect();
        let vcs: Vec<DevBuf> = (0..nb).map(|_| d.upload(&before).unwrap()).collect();
        let kc_addrs: Vec<u64> = kcs.iter().map(|b| b.addr()).collect();
        let vc_addrs: Vec<u64> = vcs.iter().map(|b| b.addr()).collect();
        let bufs: Vec<DevBuf> = [
            f32_bytes(&q),
            f32_bytes(&k),
            f32_bytes(&v),
            u64_bytes(&kc_addrs),
            u64_bytes(&vc_addrs),
            i32_bytes(&pos),
            f32_bytes(&cos),
            f32_bytes(&sin),
            f32_bytes(&qn),
            f32_bytes(&kn),
        ]
        .iter()
        .map(|b| d.upload(b).unwrap())
        .collect();
        let a: Vec<u64> = bufs.iter().map(|b| b.addr()).collect();
        let rows = StepRows { nb, q: a[0], k: a[1], v: a[2], k_caches: a[3], v_caches: a[4], positions: a[5] };
        let (q_norm, k_norm) = if norms { (a[8], a[9]) } else { (0, 0) };
        let ra = RopeArgs { cos: a[6], sin: a[7], positions: cap, rot, neox, q_norm, k_norm, eps };
        rope_kv(d, h, &rows, &ra).unwrap();
        let hd = h.head_dim;
        // The reference: norm, then rotate the pairs, in f64 over the same tables.
        let rotate = |x: &[f32], p: usize, nw: Option<&[f32]>| -> Vec<f64> {
            let inv = nw.map_or(1.0, |_| 1.0 / (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hd as f64 + eps as f64).sqrt());
            let mut y: Vec<f64> = (0..hd).map(|i| x[i] as f64 * inv * nw.map_or(1.0, |w| w[i] as f64)).collect();
            for i in 0..rot / 2 {
                let (ia, ib) = if neox { (i, i + rot / 2) } else { (2 * i, 2 * i + 1) };
                let (c, s) = (cos[p * rot / 2 + i] as f64, sin[p * rot / 2 + i] as f64);
                let (xa, xb) = (y[ia], y[ib]);
                y[ia] = xa * c - xb * s;
                y[ib] = xa * s + xb * c;
            }
            y
        };
        let got_q = f32s(&d.download(&bufs[0]).unwrap());
        for row in 0..nb {
            let p = pos[row] as usize;
            for head in 0..h.n_heads {
                let at = (row * h.n_heads + head) * hd;
                let want = rotate(&q[at..at + hd], p, norms.then_some(qn.as_slice()));
                for i in 0..hd {
                    close("rope q", got_q[at + i], want[i], want[i].abs().max(1.0), 1e-5);
                }
            }
            let (kc, vc) = (d.download(&kcs[row]).unwrap(), d.download(&vcs[row]).unwrap());
            let (kh, vh) = (f16s(&kc), f16s(&vc));
            let slot = p * h.n_kv_heads * hd;
            let written = slot * 2..(slot + h.n_kv_heads * hd) * 2;
            for (i, (&kb, &vb)) in kc.iter().zip(&vc).enumerate() {
                if !written.contains(&i) {
                    assert!(kb == before[i] && vb == before[i], "rope_kv wrote byte {i} of row {row}'s caches");
                }
            }
            for head in 0..h.n_kv_heads {
                let at = (row * h.n_kv_heads + head) * hd;
                let want = rotate(&k[at..at + hd], p, norms.then_some(kn.as_slice()));
                for i in 0..hd {
                    let got = kh[slot + head * hd + i];
                    close("rope k cache", got, want[i], want[i].abs().max(1e-3), 1.0 / 1024.0);
                    assert_eq!(vh[slot + head * hd + i], f16::from_f32(v[at + i]).to_f32(), "v cache");
                }
            }
        }
    }
}

fn check_attention(d: &dyn KernelDevice) {
    let mut r = StdRng::seed_from_u64(6);
    let lens = [1i32, 40, 97];
    let (nb, cap) = (lens.len(), 100);
    for (h, window, split) in [
        (Heads { n_heads: 4, n_kv_heads: 2, head_dim: 64 }, None, None),
        (Heads { n_heads: 4, n_kv_heads: 2, head_dim: 64 }, None, Some(7)),
        (Heads { n_heads: 2, n_kv_heads: 2, head_dim: 128 }, Some(16), Some(32)),
        (Heads { n_heads: 8, n_kv_heads: 1, head_dim: 256 }, Some(3), Some(32)),
    ] {
        let hd = h.head_dim;
        let cache = cap * h.n_kv_heads * hd;
        let kcache: Vec<Vec<f32>> = (0..nb).map(|_| uniform(&mut r, cache, 1.0)).collect();
        let vcache: Vec<Vec<f32>> = (0..nb).map(|_| uniform(&mut r, cache, 1.0)).collect();
        // The caches hold f16; the reference reads the same rounded values.
        let kcache: Vec<Vec<f32>> = kcache.iter().map(|c| f16s(&f16_bytes(c))).collect();
        let vcache: Vec<Vec<f32>> = vcache.iter().map(|c| f16s(&f16_bytes(c))).collect();
        let q = uniform(&mut r, nb * h.n_heads * hd, 3.0);
        let max_len = *lens.iter().max().unwrap() as usize;
        let split = split.unwrap_or(ATTENTION_SPLIT);
        let kcs: Vec<DevBuf> = kcache.iter().map(|c| d.upload(&f16_bytes(c)).unwrap()).collect();
        let vcs: Vec<DevBuf> = vcache.iter().map(|c| d.upload(&f16_bytes(c)).unwrap()).collect();
        let kc_addrs: Vec<u64> = kcs.iter().map(|b| b.addr()).collect();
        let vc_addrs: Vec<u64> = vcs.iter().map(|b| b.addr()).collect();
        let scratch = attention_scratch(h, nb, max_len, split);
        let bufs: Vec<DevBuf> = [
            f32_bytes(&q),
            u64_bytes(&kc_addrs),
            u64_bytes(&vc_addrs),
            i32_bytes(&lens),
            vec![0; scratch * 4],
            vec![0; nb * h.n_heads * hd * 4],
        ]
        .iter()
        .map(|b| d.upload(b).unwrap())
        .collect();
        let a: Vec<u64> = bufs.iter().map(|b| b.addr()).collect();
        let rows = StepRows { nb, q: a[0], k: 0, v: 0, k_caches: a[1], v_caches: a[2], positions: 0 };
        let scale = 1.0 / (hd as f32).sqrt();
        let args = AttnArgs { lens: a[3], max_len, scale, window, scratch: a[4], y: a[5] };
        attention(d, h, &rows, &args, split).unwrap();
        let y = f32s(&d.download(&bufs[5]).unwrap());
        for row in 0..nb {
            let len = lens[row] as usize;
            let lo = window.map_or(0, |w| len.saturating_sub(w));
            for head in 0..h.n_heads {
                let kvh = head / (h.n_heads / h.n_kv_heads);
                let qh = &q[(row * h.n_heads + head) * hd..][..hd];
                let at = |p: usize| (p * h.n_kv_heads + kvh) * hd;
                let scores: Vec<f64> = (lo..len).map(|p| dot(qh, &kcache[row][at(p)..][..hd]).0 * scale as f64).collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = e.iter().sum();
                for i in 0..hd {
                    let want: f64 = (lo..len).zip(&e).map(|(p, e)| e * vcache[row][at(p) + i] as f64).sum::<f64>() / total;
                    let got = y[(row * h.n_heads + head) * hd + i];
                    close(&format!("attention {h:?} window {window:?} split {split} row {row} head {head}"), got, want, 1.0, 1e-5);
                }
            }
        }
    }
}

#[test]
fn shapes_the_kernels_do_not_take_are_refused_before_launch() {
    struct Never;
    impl Launcher for Never {
        fn launch(&self, kernel: &str, _: Geometry, _: &[Arg]) -> Result<()> {
            panic!("{kernel} launched");
        }
    }
    let p = Product { ty: DeviceType::Q4K, rows: 8, cols: 96, nb: 1 };
    assert!(matches!(matvec(&Never, p, 0, 0, 0, 0), Err(Error::Kernel { .. })));
    assert!(rmsnorm(&Never, 0, 0, 0, 0, 0, 1, 100, 1e-6).is_err());
    let h = Heads { n_heads: 3, n_kv_heads: 2, head_dim: 64 };
    let rows = StepRows { nb: 1, q: 0, k: 0, v: 0, k_caches: 0, v_caches: 0, positions: 0 };
    let a = AttnArgs { lens: 0, max_len: 4, scale: 1.0, window: None, scratch: 0, y: 0 };
    assert!(attention(&Never, h, &rows, &a, 32).is_err());
    let h = Heads { n_heads: 2, n_kv_heads: 2, head_dim: 320 };
    assert!(attention(&Never, h, &rows, &a, 32).is_err());
}

#[test]
fn the_emulator_refuses_what_it_cannot_run() {
    let g = Geometry { grid: [1, 1, 1], block: [32, 1, 1] };
    assert!(Emu::default().launch("no_such_kernel", g, &[]).is_err());
    let g = Geometry { grid: [1, 1, 1], block: [20, 1, 1] };
    assert!(Emu::default().launch("quantize_q8", g, &[Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)]).is_err());
}

/// The GPU the `on_gpu` tests run on: None (the test skips, saying so)
/// where there is none, unless `SOLLOL_REQUIRE_GPU=1` (scripts/gpu-check.sh),
/// where a missing GPU fails the test instead of passing it unchecked.
#[cfg(feature = "cuda")]
pub(crate) fn test_gpu() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("SOLLOL_REQUIRE_GPU").is_ok_and(|v| v == "1") => panic!("no CUDA device: {e}"),
        Err(_) => {
            eprintln!("SKIPPED: no CUDA device");
            None
        }
    }
}

macro_rules! on_every_device {
    ($($check:ident),* $(,)?) => {
        mod on_emulator {
            $(#[test] fn $check() { super::$check(&super::Emu::default()) })*
        }
        #[cfg(feature = "cuda")]
        mod on_gpu {
            $(#[test] fn $check() {
                if let Some(gpu) = super::test_gpu() {
                    super::$check(&*crate::kernels::device::kernel_device(&gpu).unwrap());
                }
            })*
        }
    };
}

on_every_device!(
    check_rmsnorm,
    check_rows_op,
    check_gather_scatter,
    check_gemm,
    check_quantize,
    check_products,
    check_get_rows,
    check_rope_kv,
    check_attention
);
