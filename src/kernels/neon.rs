//! NEON dot products of weight rows (GGUF's layout) with quantized
//! activation rows, for aarch64: the counterpart of `avx2::gemm`.
//!
//! NEON is part of every aarch64 CPU, so nothing is detected. A weight
//! block is unpacked once to 32 signed bytes and multiplied with the same
//! block of up to `R` activation rows: 8-bit products widened to 16 bits
//! (`smull`, two per lane, at most 2 · 127 · 127), pairwise added into
//! 32-bit lanes (`sadalp`), exact in integers; one float product per block
//! and row applies both scales. Each row has its own accumulators, so its
//! result does not depend on the rows batched with it.
//!
//! Where the CPU has the dot-product extension (ARMv8.2 `sdot`: Apple M1
//! on, Graviton 2 on, Cortex-A76 on), each 16 products go to four lanes in
//! one instruction instead: a block's integer sum is the same, spread over
//! the lanes differently, so the float results may differ in the last bits
//! between the two variants (a CPU always uses the same one).
//!
//! This file uses nothing but the block layouts, so that
//! `tests/neon/` can build it alone for an emulated aarch64 CPU.

use std::arch::aarch64::*;
use std::arch::asm;

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8, BlockQ8_0, WeightType, QK};

/// A weight block unpacked for multiplication: values 0..16 and 16..32 as
/// signed bytes, the scale, and the minimum (0 for types without one).
struct Unpacked {
    lo: int8x16_t,
    hi: int8x16_t,
    d: f32,
    m: f32,
}

/// 16 bytes of packed nibbles → values 0..16 (low nibbles) and 16..32 (high).
#[inline(always)]
/// # Safety
/// the CPU is aarch64, whose baseline includes NEON.
unsafe fn nibbles(qs: &[u8; QK / 2]) -> (uint8x16_t, uint8x16_t) {
    let raw = vld1q_u8(qs.as_ptr());
    (vandq_u8(raw, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(raw))
}

/// The 32 fifth bits of a q5 block as bytes of `0x10` or `0`, values 0..16 and 16..32.
#[inline(always)]
/// # Safety
/// the CPU is aarch64, whose baseline includes NEON.
unsafe fn high_bits(qh: [u8; 4]) -> (uint8x16_t, uint8x16_t) {
    const SPREAD_LO: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    const SPREAD_HI: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // Byte j takes byte j / 8 of qh and keeps bit j % 8 of it.
    let bytes = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes(qh)));
    let bit = vld1q_u8(BIT.as_ptr());
    let pick = |spread: &[u8; 16]| vandq_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(spread.as_ptr())), bit), vdupq_n_u8(0x10));
    (pick(&SPREAD_LO), pick(&SPREAD_HI))
}

#[inline(always)]
/// # Safety
/// the CPU is aarch64, whose baseline includes NEON.
unsafe fn signed(v: uint8x16_t, offset: i8) -> int8x16_t {
    vsubq_s8(vreinterpretq_s8_u8(v), vdupq_n_s8(offset))
}

#[inline(always)]
/// # Safety
/// the CPU is aarch64, whose baseline includes NEON; `w` addresses one whole block of weight type `T`.
unsafe fn unpack<const T: u8>(w: *const u8) -> Unpacked {
    match T {
        t if t == WeightType::Q4_0 as u8 => {
            let b = &*w.cast::<BlockQ4_0>();
            let (lo, hi) = nibbles(&b.qs);
            Unpacked { lo: signed(lo, 8), hi: signed(hi, 8), d: b.d.to_f32(), m: 0.0 }
        }
        t if t == WeightType::Q4_1 as u8 => {
            let b = &*w.cast::<BlockQ4_1>();
            let (lo, hi) = nibbles(&b.qs);
            Unpacked { lo: signed(lo, 0), hi: signed(hi, 0), d: b.d.to_f32(), m: b.m.to_f32() }
        }
        t if t == WeightType::Q5_0 as u8 => {
            let b = &*w.cast::<BlockQ5_0>();
            let ((lo, hi), (hlo, hhi)) = (nibbles(&b.qs), high_bits(b.qh));
            Unpacked { lo: signed(vorrq_u8(lo, hlo), 16), hi: signed(vorrq_u8(hi, hhi), 16), d: b.d.to_f32(), m: 0.0 }
        }
        t if t == WeightType::Q5_1 as u8 => {
            let b = &*w.cast::<BlockQ5_1>();
            let ((lo, hi), (hlo, hhi)) = (nibbles(&b.qs), high_bits(b.qh));
            Unpacked { lo: signed(vorrq_u8(lo, hlo), 0), hi: signed(vorrq_u8(hi, hhi), 0), d: b.d.to_f32(), m: b.m.to_f32() }
        }
        _ => {
            let b = &*w.cast::<BlockQ8_0>();
            Unpacked { lo: vld1q_s8(b.qs.as_ptr()), hi: vld1q_s8(b.qs.as_ptr().add(16)), d: b.d.to_f32(), m: 0.0 }
        }
    }
}

/// `Σ w a` over one block in four 32-bit lanes, exact.
#[inline(always)]
/// # Safety
/// the CPU is aarch64, whose baseline includes NEON; with `DOT`, the CPU has the dot-product extension
/// (checked at run time by the caller).
unsafe fn block_dot<const DOT: bool>(u: &Unpacked, a: &BlockQ8) -> int32x4_t {
    let (a0, a1) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
    if DOT {
        return sdot(sdot(vdupq_n_s32(0), u.lo, a0), u.hi, a1);
    }
    let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(u.lo), vget_low_s8(a0)), u.lo, a0);
    let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(u.hi), vget_low_s8(a1)), u.hi, a1);
    vpadalq_s16(vpaddlq_s16(p0), p1)
}

/// `acc[i] += Σ_(k<4) w[4i + k] a[4i + k]` (Rust's `vdotq_s32` is not stable yet).
#[target_feature(enable = "neon,dotprod")]
#[inline]
/// # Safety
/// The CPU has the dot-product extension (checked at run time).
unsafe fn sdot(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    asm!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b", acc = inout(vreg) acc, w = in(vreg) w, a = in(vreg) a, options(pure, nomem, nostack));
    acc
}

/// Whether this CPU has `sdot` (asked once).
fn has_dotprod() -> bool {
    static DOTPROD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DOTPROD.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// `out[r][j] = W[j] · a[r]` for `nrows` consecutive weight rows of
/// `row_bytes` bytes (blocks of type `T`, `bsize` bytes each) and `R`
/// activation rows, with `sdot` where the CPU has it.
///
/// # Safety
/// `w` points at `nrows` rows of whole blocks of type `T`, each `a[r]` at
/// `row_bytes / bsize` blocks, and each `out[r]` has room for `nrows` values.
pub unsafe fn gemm<const T: u8, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    bsize: usize,
    a: [*const BlockQ8; R],
    out: [*mut f32; R],
) {
    if has_dotprod() {
        gemm_dotprod::<T, R>(w, row_bytes, nrows, bsize, a, out)
    } else {
        gemm_neon::<T, R>(w, row_bytes, nrows, bsize, a, out)
    }
}

/// The two variants of [`gemm`]: one body, compiled for each; each row's
/// float work is the same either way, only the exact integer sums are taken
/// differently.
macro_rules! variants {
    ($($(#[$doc:meta])* $name:ident($features:literal, dot: $dot:literal);)*) => {$(
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`gemm`], and the CPU has these features.
        #[target_feature(enable = $features)]
        pub unsafe fn $name<const T: u8, const R: usize>(
            w: *const u8,
            row_bytes: usize,
            nrows: usize,
            bsize: usize,
            a: [*const BlockQ8; R],
            out: [*mut f32; R],
        ) {
            let nb = row_bytes / bsize;
            for j in 0..nrows {
                let row = w.add(j * row_bytes);
                let mut acc = [vdupq_n_f32(0.0); R];
                let mut mins = [0f32; R];
                for b in 0..nb {
                    let u = unpack::<T>(row.add(b * bsize));
                    for r in 0..R {
                        let ab = &*a[r].add(b);
                        acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(block_dot::<$dot>(&u, ab)), vdupq_n_f32(u.d * ab.d));
                        mins[r] += u.m * ab.s;
                    }
                }
                for r in 0..R {
                    *out[r].add(j) = vaddvq_f32(acc[r]) + mins[r];
                }
            }
        }
    )*};
}

variants! {
    /// [`gemm`] with `smull`/`sadalp` only (every aarch64 CPU).
    gemm_neon("neon", dot: false);
    /// [`gemm`] with `sdot`.
    gemm_dotprod("neon,dotprod", dot: true);
}
