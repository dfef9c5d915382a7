//! GGUF block layouts of the types with our own kernels, the activation
//! block they are multiplied with, and scalar (de)quantization.
//!
//! Layouts are ggml's, byte for byte, so a tensor's bytes are used as read
//! from the file. Activations are quantized the way ggml's `q8_0`/`q8_1` do
//! (scale and scaled sum rounded through f16), which keeps our results within
//! float summation order of ggml's and of the numpy reference.

use half::f16;

/// Values per block of every type here.
pub const QK: usize = 32;

/// Weight types with our own kernels. The discriminant selects the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WeightType {
    Q4_0 = 0,
    Q4_1 = 1,
    Q5_0 = 2,
    Q5_1 = 3,
    Q8_0 = 4,
}

impl WeightType {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => size_of::<BlockQ4_0>(),
            Self::Q4_1 => size_of::<BlockQ4_1>(),
            Self::Q5_0 => size_of::<BlockQ5_0>(),
            Self::Q5_1 => size_of::<BlockQ5_1>(),
            Self::Q8_0 => size_of::<BlockQ8_0>(),
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// Values per super-block of the K-quants.
pub const QK_K: usize = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, one per 32 values, packed.
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// Q4_K with a fifth bit per value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    /// Bit `k` of byte `l`: the fifth bit of value `l` of sub-block `k`.
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ6K {
    /// Low 4 bits of the values.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the values.
    pub qh: [u8; QK_K / 4],
    /// One scale per 16 values.
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// ggml's activation block for the K-quants (quantized by candle's port of
/// ggml's `quantize_row_q8_K`): one scale per 256 values, sums per 16.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// 32 activations as `d * qs[i]`. `s = d * Σ qs` (ggml's q8_1 sum, for the
/// types with a minimum) and the exact integer `sum = Σ qs` (for the types
/// with an offset, so `Σ (q - 8) a` stays an exact integer).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; QK],
}

/// Quantizes one row (`x.len()` a multiple of 32) into `out`.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            // Half away from zero, as C's roundf, without the libm call:
            // the cast truncates.
            let r = v * id;
            *q = (r + 0.5f32.copysign(r)) as i8;
            sum += *q as i32;
        }
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
        b.sum = sum;
    }
}

/// The 5th bits of a q5 block, one per value, as `0` or `16`.
pub(crate) fn high_bits(qh: [u8; 4]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    std::array::from_fn(|j| (((qh >> j) & 1) << 4) as u8)
}

/// Values of a 4-bit block in order: low nibbles are values 0..16, high nibbles 16..32.
pub(crate) fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|j| if j < QK / 2 { qs[j] & 0x0F } else { qs[j - QK / 2] >> 4 })
}

pub fn dequantize_q4_0(w: &[BlockQ4_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, q) in o.iter_mut().zip(nibbles(&b.qs)) {
            *o = (q as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(w: &[BlockQ4_1], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for (o, q) in o.iter_mut().zip(nibbles(&b.qs)) {
            *o = q as f32 * d + m;
        }
    }
}

pub fn dequantize_q5_0(w: &[BlockQ5_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for ((o, q), h) in o.iter_mut().zip(nibbles(&b.qs)).zip(high_bits(b.qh)) {
            *o = ((q | h) as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(w: &[BlockQ5_1], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for ((o, q), h) in o.iter_mut().zip(nibbles(&b.qs)).zip(high_bits(b.qh)) {
            *o = (q | h) as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(w: &[BlockQ8_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in o.iter_mut().zip(b.qs.iter()) {
            *o = q as f32 * d;
        }
    }
}

/// Scalar dot products, the reference every SIMD kernel is tested against and
/// the path on CPUs without one.
pub mod scalar {
    use super::*;

    fn idot(w: &[u8; QK], a: &[i8; QK]) -> i32 {
        w.iter().zip(a).map(|(&w, &a)| w as i32 * a as i32).sum()
    }

    pub fn q4_0(w: &[BlockQ4_0], a: &[BlockQ8]) -> f32 {
        w.iter().zip(a).map(|(w, a)| w.d.to_f32() * a.d * (idot(&nibbles(&w.qs), &a.qs) - 8 * a.sum) as f32).sum()
    }

    pub fn q4_1(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
        w.iter().zip(a).map(|(w, a)| w.d.to_f32() * a.d * idot(&nibbles(&w.qs), &a.qs) as f32 + w.m.to_f32() * a.s).sum()
    }

    fn q5_values(qs: &[u8; QK / 2], qh: [u8; 4]) -> [u8; QK] {
        let (lo, hi) = (nibbles(qs), high_bits(qh));
        std::array::from_fn(|j| lo[j] | hi[j])
    }

    pub fn q5_0(w: &[BlockQ5_0], a: &[BlockQ8]) -> f32 {
        w.iter().zip(a).map(|(w, a)| w.d.to_f32() * a.d * (idot(&q5_values(&w.qs, w.qh), &a.qs) - 16 * a.sum) as f32).sum()
    }

    pub fn q5_1(w: &[BlockQ5_1], a: &[BlockQ8]) -> f32 {
        w.iter().zip(a).map(|(w, a)| w.d.to_f32() * a.d * idot(&q5_values(&w.qs, w.qh), &a.qs) as f32 + w.m.to_f32() * a.s).sum()
    }

    pub fn q8_0(w: &[BlockQ8_0], a: &[BlockQ8]) -> f32 {
        w.iter()
            .zip(a)
            .map(|(w, a)| {
                let i: i32 = w.qs.iter().zip(&a.qs).map(|(&w, &a)| w as i32 * a as i32).sum();
                w.d.to_f32() * a.d * i as f32
            })
            .sum()
    }
}
