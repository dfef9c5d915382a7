//! Quantizers for Q4_K, Q5_K and Q6_K as llama.cpp's reference ones (what
//! `llama-quantize` runs without an importance matrix). Q4_K/Q5_K: each
//! 32-value sub-block's scale and minimum are searched by a weighted
//! least-squares fit over 21 (Q4_K) or 16 (Q5_K) candidate scales, weights
//! `rms + |x|`; Q6_K: each 16-value sub-block's signed scale by a fit
//! weighted by x² over 19 candidates. candle quantizes these types with
//! other searches, whose files differ from llama-quantize's; with these, a
//! file `sollol quantize` writes is the one llama-quantize writes.
//!
//! Arithmetic follows the reference's operation order in f32, and rounding
//! its `nearest_int` (half to even), so that the bits agree.

use half::f16;

/// Values per super-block.
const QK_K: usize = 256;
/// Values per sub-block (one scale and one minimum each).
const SUB: usize = 32;

/// Bytes of one Q4_K block: d, dmin (f16), 12 bytes of 6-bit scales and
/// minimums, 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;
/// Bytes of one Q5_K block: Q4_K's plus 32 bytes of fifth bits.
const Q5K_BYTES: usize = 176;
/// Bytes of one Q6_K block: 128 bytes of low nibbles, 64 of high bit
/// pairs, 16 signed 8-bit scales, d (f16).
const Q6K_BYTES: usize = 210;
/// Below this a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// llama.cpp's `nearest_int`: rounds half to even through the f32 mantissa
/// (exact for |x| < 2^22, which every caller's values are).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Search of the scale and minimum of one sub-block with levels 0..=nmax:
/// returns (scale, -min) and leaves the levels in `levels`.
fn scale_min(x: &[f32; SUB], nmax: i32, levels: &mut [u8; SUB], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let sum_x2 = x.iter().fold(0f32, |s, v| s + v * v);
    let av_x = (sum_x2 / SUB as f32).sqrt();
    let w: [f32; SUB] = std::array::from_fn(|i| av_x + x[i].abs());
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (w[0], w[0] * x[0]);
    for i in 1..SUB {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..SUB {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut aux = [0u8; SUB];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..SUB {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let lf = l as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..SUB {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                *levels = aux;
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One super-block's scales and minimums as 6-bit codes over f16 `d` and
/// `dmin`, and each value's level (0..=nmax) under them.
struct SuperBlock {
    d: f16,
    dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums packed as Q4_K/Q5_K keep them.
    scales: [u8; 12],
    levels: [u8; QK_K],
}

fn super_block(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> SuperBlock {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; QK_K / SUB], [0f32; QK_K / SUB]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / SUB {
        let sub: &[f32; SUB] = x[j * SUB..(j + 1) * SUB].try_into().expect("a sub-block is 32 values");
        let lv: &mut [u8; SUB] = (&mut levels[j * SUB..(j + 1) * SUB]).try_into().expect("32 levels");
        (scales[j], mins[j]) = scale_min(sub, nmax, lv, rmin, 0.1, nstep);
        max_scale = if scales[j] > max_scale { scales[j] } else { max_scale };
        max_min = if mins[j] > max_min { mins[j] } else { max_min };
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / SUB {
        // The reference stores the rounded value in a byte before its MIN(63, ·).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, dmin) = (f16::from_f32(max_scale / 63.0), f16::from_f32(max_min / 63.0));
    // Levels again under the stored (rounded) scales and minimums.
    for j in 0..QK_K / SUB {
        let (sc, m) = unpack_scale_min(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..SUB {
            levels[j * SUB + i] = nearest_int((x[j * SUB + i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    SuperBlock { d, dmin, scales: packed, levels }
}

impl SuperBlock {
    /// `d`, `dmin` and the packed scales: how Q4_K and Q5_K blocks begin.
    fn put_scales(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.d.to_le_bytes());
        out.extend_from_slice(&self.dmin.to_le_bytes());
        out.extend_from_slice(&self.scales);
    }
}

/// The 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
fn unpack_scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K or Q5_K blocks of `x` (a multiple of 256 values), `bytes` each:
/// every super-block's scales and mins (searched with `super_block`'s
/// parameters), then its levels as `pack` lays them out.
fn with_scales_and_mins(x: &[f32], bytes: usize, (nmax, rmin, nstep): (i32, f32, i32), pack: impl Fn(&[u8], &mut Vec<u8>)) -> Vec<u8> {
    debug_assert!(x.len().is_multiple_of(QK_K));
    let mut out = Vec::with_capacity(x.len() / QK_K * bytes);
    for chunk in x.chunks_exact(QK_K) {
        let b = super_block(chunk, nmax, rmin, nstep);
        b.put_scales(&mut out);
        pack(&b.levels, &mut out);
    }
    out
}

/// Q4_K blocks of `x` (a multiple of 256 values).
pub fn quantize_q4k(x: &[f32]) -> Vec<u8> {
    with_scales_and_mins(x, Q4K_BYTES, (15, -1.0, 20), |levels, out| {
        // 64 values per 32 bytes: the first 32 in low nibbles, the next 32 in high.
        for half in levels.chunks_exact(64) {
            out.extend((0..32).map(|l| half[l] | (half[l + 32] << 4)));
        }
    })
}

/// Q5_K blocks of `x` (a multiple of 256 values).
pub fn quantize_q5k(x: &[f32]) -> Vec<u8> {
    with_scales_and_mins(x, Q5K_BYTES, (31, -0.5, 15), |levels, out| {
        // The fifth bit of value n + j (n = 0, 64, …) is bit 2n/64 of qh[j];
        // of value n + j + 32 the bit above it.
        let mut qh = [0u8; 32];
        let mut ql = [0u8; QK_K / 2];
        for (k, half) in levels.chunks_exact(64).enumerate() {
            for j in 0..32 {
                let (l1, l2) = (half[j], half[j + 32]);
                qh[j] |= ((l1 >> 4) << (2 * k)) | ((l2 >> 4) << (2 * k + 1));
                ql[k * 32 + j] = (l1 & 0xf) | ((l2 & 0xf) << 4);
            }
        }
        out.extend_from_slice(&qh);
        out.extend_from_slice(&ql);
    })
}

/// The signed scale of one 16-value Q6_K sub-block (levels -32..=31,
/// stored +32 in `levels`): from the largest magnitude, refined by the
/// fit weighted by x² over 19 nearby candidates (ggml's `make_qx_quants`
/// with `rmse_type` 1).
fn signed_scale(x: &[f32], levels: &mut [u8]) -> f32 {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
    let fit = |iscale: f32| -> (f32, f32) {
        x.iter().fold((0f32, 0f32), |(slx, sl2), &v| {
            let l = level(iscale, v) as f32;
            let w = v * v;
            (slx + w * v * l, sl2 + w * l * l)
        })
    };
    let iscale = -(NMAX as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (level(iscale, v) + NMAX) as u8;
    }
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (level(iscale, v) + NMAX) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K blocks of `x` (a multiple of 256 values).
pub fn quantize_q6k(x: &[f32]) -> Vec<u8> {
    debug_assert!(x.len().is_multiple_of(QK_K));
    let mut out = Vec::with_capacity(x.len() / QK_K * Q6K_BYTES);
    for chunk in x.chunks_exact(QK_K) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for (ib, sub) in chunk.chunks_exact(16).enumerate() {
            scales[ib] = signed_scale(sub, &mut levels[ib * 16..(ib + 1) * 16]);
            if scales[ib].abs() > max_abs {
                max_abs = scales[ib].abs();
                max_scale = scales[ib];
            }
        }
        if max_abs < GROUP_MAX_EPS {
            out.resize(out.len() + Q6K_BYTES, 0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let codes: [i8; QK_K / 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
        // Levels again under the stored (rounded) scales.
        for (j, sub) in chunk.chunks_exact(16).enumerate() {
            let dj = d.to_f32() * codes[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for (i, &v) in sub.iter().enumerate() {
                levels[16 * j + i] = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }
        // Per 128 values: ql holds low nibbles of values l and l+64 (and
        // l+32 and l+96) in one byte; qh the top two bits of four values.
        let (mut ql, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 4]);
        for (h, q) in levels.chunks_exact(128).enumerate() {
            for l in 0..32 {
                ql[64 * h + l] = (q[l] & 0xf) | ((q[l + 64] & 0xf) << 4);
                ql[64 * h + l + 32] = (q[l + 32] & 0xf) | ((q[l + 96] & 0xf) << 4);
                qh[32 * h + l] = (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(codes.iter().map(|&c| c as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                // Some sub-blocks all positive, some with outliers.
                if i % 512 < 32 {
                    u.abs() + 0.5
                } else if i % 97 == 0 {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect()
    }

    fn dequantize(bytes: Vec<u8>, dtype: GgmlDType, n: usize) -> Vec<f32> {
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype).unwrap();
        let q = QTensor::new(storage, (n,)).unwrap();
        q.dequantize(&Device::Cpu).unwrap().to_vec1().unwrap()
    }

    /// The blocks decode (by candle's reader) to values near the input, and
    /// nearer than candle's own quantizer's on the whole: the weighted
    /// search's point.
    #[test]
    fn blocks_decode_close_to_their_input_and_closer_than_candles() {
        let n = 256 * 64;
        let x = values(n, 7);
        let t = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
        for (dtype, ours, bound) in
            [(GgmlDType::Q4K, quantize_q4k(&x), 0.06), (GgmlDType::Q5K, quantize_q5k(&x), 0.015), (GgmlDType::Q6K, quantize_q6k(&x), 0.004)]
        {
            let back = dequantize(ours, dtype, n);
            let theirs: Vec<f32> = QTensor::quantize(&t, dtype).unwrap().dequantize(&Device::Cpu).unwrap().to_vec1().unwrap();
            // Weighted as the search weighs them.
            let err = |y: &[f32]| x.iter().zip(y).map(|(a, b)| (a.abs() + 0.5) * (a - b) * (a - b)).sum::<f32>() / n as f32;
            let (e_ours, e_theirs) = (err(&back), err(&theirs));
            assert!(e_ours < bound, "{dtype:?}: weighted squared error {e_ours}");
            assert!(e_ours < e_theirs, "{dtype:?}: {e_ours} against candle's {e_theirs}");
        }
    }

    /// Zero stays zero; a constant comes back within the f16 rounding of its scales.
    #[test]
    fn constant_blocks_decode_to_their_value() {
        for v in [0.0f32, 0.75, -2.5] {
            let x = vec![v; 256];
            for (dtype, q) in [(GgmlDType::Q4K, quantize_q4k(&x)), (GgmlDType::Q5K, quantize_q5k(&x)), (GgmlDType::Q6K, quantize_q6k(&x))] {
                let back = dequantize(q, dtype, 256);
                assert!(back.iter().all(|b| (b - v).abs() <= 2e-3 * v.abs()), "{dtype:?} of {v}: {:?}", &back[..4]);
            }
        }
    }

    /// The blocks llama.cpp's `quantize_row_{q4,q5,q6}_K_ref` (ggml 0c1e570)
    /// wrote for these values, by digest: ours are the same bytes.
    #[test]
    fn blocks_are_the_bytes_llama_cpp_writes() {
        use sha2::{Digest, Sha256};
        let x = values(256 * 64, 11);
        let digest = |b: Vec<u8>| format!("{:x}", Sha256::digest(b));
        assert_eq!(digest(quantize_q4k(&x)), "c07acacc25d1688a2bfcbe8f7131ca7d16a09ddcbba96437f9a7b9f88e41606b");
        assert_eq!(digest(quantize_q5k(&x)), "39fc8e564a36becd37ead4ec51386f9bda25d767284da844a4b2eb9a23b468c7");
        assert_eq!(digest(quantize_q6k(&x)), "9e508a9eb7c5ef94116a75110eaee5a57313d3d726b987bdce6557909beab804");
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 7.6].map(nearest_int), [0, 2, 2, 0, -2, 2, 8]);
    }
}
