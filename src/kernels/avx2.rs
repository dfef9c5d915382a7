//! AVX2 + FMA + F16C dot products of weight rows with quantized activation rows.
//!
//! Kernels specialised per weight type and per number of activation rows
//! (`R`): interleaved groups of eight weight rows × 1–8 activation rows, and
//! GGUF-layout rows × 1–4 (K-quants × 1–8) for the rows past the last whole
//! group. A weight block is unpacked once and multiplied with the same block
//! of every activation row, which is what makes prefill and batched decoding
//! cheaper than `R` separate products.
//! Each row's arithmetic (two accumulators, even and odd blocks, then one
//! horizontal sum) is the same for every `R`, so a row's result does not
//! depend on which rows were batched with it.

use std::arch::x86_64::*;

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8, BlockQ8_0, QK};
use super::{repack, WeightType};

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn h2f(bits: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits.to_bits() as i32)))
}

/// 16 bytes of packed nibbles → 32 values 0..16 in value order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them).
unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
    let raw = _mm_loadu_si128(qs.as_ptr().cast());
    let m4 = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4))
}

/// The 32 5th bits of a q5 block as bytes of `0x10` or `0`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn high_bits(qh: [u8; 4]) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(i32::from_le_bytes(qh)),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
    );
    // Byte i keeps only bit i % 8 clear in the mask; it is all ones iff that bit is set.
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Σ pairs of u8 × i8 products widened to eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_u8_i8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The integer products of the group kernels, per instruction set. AVX2
/// multiplies bytes with `maddubs` into 16-bit pair sums, added up a few
/// chunks at a time and then widened with `madd`; AVX-512 VNNI's `dpbusd`
/// sums four byte products into 32 bits in one instruction (and takes its
/// broadcast activations straight from memory), `dpwssd` fuses `madd` and
/// its add. Every sum is exact either way (no 16-bit sum here can saturate),
/// so both give the same integers and a matrix's results are bit for bit
/// the same on either.
///
/// Kernels built on this are `#[inline(always)]` without target features
/// of their own: each entry point enables its set, and the kernel body is
/// compiled inside it.
pub trait Ints {
    /// `p` plus `w0 · a0 + w1 · a1` (unsigned by signed bytes), in the
    /// kernel's partial form.
    unsafe fn pair(p: __m256i, w0: __m256i, a0: __m256i, w1: __m256i, a1: __m256i) -> __m256i;
    /// `sum` (32-bit lanes) plus a partial sum of [`Ints::pair`]s.
    unsafe fn widen(sum: __m256i, p: __m256i) -> __m256i;
    /// `sum` plus Σ of each four `w · a` (unsigned by signed bytes) as 32 bits.
    unsafe fn dot(sum: __m256i, w: __m256i, a: __m256i) -> __m256i;
    /// `sum` plus Σ of each two 16-bit `x · y` as 32 bits (`madd` and an add).
    unsafe fn scaled(sum: __m256i, x: __m256i, y: __m256i) -> __m256i;
    /// `lo` (bytes below 16) with 16 added to the bytes whose bit is set in `qh`.
    unsafe fn fifth(lo: __m256i, qh: [u8; 4]) -> __m256i;
}

/// AVX2 + FMA + F16C.
pub enum Avx2 {}

impl Ints for Avx2 {
    #[inline(always)]
    unsafe fn pair(p: __m256i, w0: __m256i, a0: __m256i, w1: __m256i, a1: __m256i) -> __m256i {
        _mm256_add_epi16(p, _mm256_add_epi16(_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(w1, a1)))
    }
    #[inline(always)]
    unsafe fn widen(sum: __m256i, p: __m256i) -> __m256i {
        _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dot(sum: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_add_epi32(sum, dot_u8_i8(w, a))
    }
    #[inline(always)]
    unsafe fn scaled(sum: __m256i, x: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi32(sum, _mm256_madd_epi16(x, y))
    }
    #[inline(always)]
    unsafe fn fifth(lo: __m256i, qh: [u8; 4]) -> __m256i {
        _mm256_or_si256(lo, high_bits(qh))
    }
}

/// AVX2 with AVX-512 F/BW/VL and VNNI, on 256-bit vectors (the interleaved
/// layout's eight 32-bit lanes).
pub enum Vnni {}

impl Ints for Vnni {
    #[inline(always)]
    unsafe fn pair(p: __m256i, w0: __m256i, a0: __m256i, w1: __m256i, a1: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(p, w0, a0), w1, a1)
    }
    #[inline(always)]
    unsafe fn widen(sum: __m256i, p: __m256i) -> __m256i {
        _mm256_add_epi32(sum, p)
    }
    #[inline(always)]
    unsafe fn dot(sum: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(sum, w, a)
    }
    #[inline(always)]
    unsafe fn scaled(sum: __m256i, x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(sum, x, y)
    }
    #[inline(always)]
    unsafe fn fifth(lo: __m256i, qh: [u8; 4]) -> __m256i {
        // Bit i of `qh` is byte i's fifth bit: a mask register, one masked add.
        _mm256_mask_add_epi8(lo, u32::from_le_bytes(qh), lo, _mm256_set1_epi8(0x10))
    }
}

/// Whether this CPU has what [`Vnni`] needs.
pub fn vnni_available() -> bool {
    available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// A weight block unpacked for multiplication: the 32 values, the scale,
/// the minimum (0 for types without one) and what the activation sum must be
/// multiplied by to undo an unsigned offset (8 for q4_0, 16 for q5_0).
struct Unpacked {
    q: __m256i,
    d: f32,
    m: f32,
    offset: i32,
    signed: bool,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `w` addresses one whole block of weight type `T`.
unsafe fn unpack<const T: u8>(w: *const u8) -> Unpacked {
    match T {
        t if t == WeightType::Q4_0 as u8 => {
            let b = &*w.cast::<BlockQ4_0>();
            Unpacked { q: nibbles(&b.qs), d: h2f(b.d), m: 0.0, offset: 8, signed: false }
        }
        t if t == WeightType::Q4_1 as u8 => {
            let b = &*w.cast::<BlockQ4_1>();
            Unpacked { q: nibbles(&b.qs), d: h2f(b.d), m: h2f(b.m), offset: 0, signed: false }
        }
        t if t == WeightType::Q5_0 as u8 => {
            let b = &*w.cast::<BlockQ5_0>();
            let q = _mm256_or_si256(nibbles(&b.qs), high_bits(b.qh));
            Unpacked { q, d: h2f(b.d), m: 0.0, offset: 16, signed: false }
        }
        t if t == WeightType::Q5_1 as u8 => {
            let b = &*w.cast::<BlockQ5_1>();
            let q = _mm256_or_si256(nibbles(&b.qs), high_bits(b.qh));
            Unpacked { q, d: h2f(b.d), m: h2f(b.m), offset: 0, signed: false }
        }
        _ => {
            let b = &*w.cast::<BlockQ8_0>();
            Unpacked { q: _mm256_loadu_si256(b.qs.as_ptr().cast()), d: h2f(b.d), m: 0.0, offset: 0, signed: true }
        }
    }
}

const fn has_min<const T: u8>() -> bool {
    T == WeightType::Q4_1 as u8 || T == WeightType::Q5_1 as u8
}

/// One block of one row: `(d_w d_a) Σ w a` as eight lanes, plus the scalar minimum term.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them).
unsafe fn block_product(u: &Unpacked, a: &BlockQ8, acc: __m256) -> __m256 {
    let aq = _mm256_loadu_si256(a.qs.as_ptr().cast());
    let p = if u.signed {
        // maddubs wants its first operand unsigned: move w's sign onto a.
        dot_u8_i8(_mm256_sign_epi8(u.q, u.q), _mm256_sign_epi8(aq, u.q))
    } else if u.offset != 0 {
        // Σ (q - k) a = Σ q a - k Σ a, taken off one lane: exact in integers.
        _mm256_sub_epi32(dot_u8_i8(u.q, aq), _mm256_setr_epi32(u.offset * a.sum, 0, 0, 0, 0, 0, 0, 0))
    } else {
        dot_u8_i8(u.q, aq)
    };
    _mm256_fmadd_ps(_mm256_set1_ps(u.d * a.d), _mm256_cvtepi32_ps(p), acc)
}

/// `out[r] = w · a[r]` for one weight row of `nb` blocks of type `T` (block
/// size `bsize` bytes) and `R` activation rows.
///
/// # Safety
/// `w` points at `nb` blocks of type `T`, each `a[r]` at `nb` blocks, and the
/// CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<const T: u8, const R: usize>(w: *const u8, bsize: usize, nb: usize, a: [*const BlockQ8; R]) -> [f32; R] {
    let mut even = [_mm256_setzero_ps(); R];
    let mut odd = [_mm256_setzero_ps(); R];
    let mut mins = [0f32; R];
    let mut b = 0;
    while b + 1 < nb {
        let u0 = unpack::<T>(w.add(b * bsize));
        let u1 = unpack::<T>(w.add((b + 1) * bsize));
        for r in 0..R {
            let (a0, a1) = (&*a[r].add(b), &*a[r].add(b + 1));
            even[r] = block_product(&u0, a0, even[r]);
            odd[r] = block_product(&u1, a1, odd[r]);
            if has_min::<T>() {
                mins[r] += u0.m * a0.s + u1.m * a1.s;
            }
        }
        b += 2;
    }
    if b < nb {
        let u = unpack::<T>(w.add(b * bsize));
        for r in 0..R {
            let ab = &*a[r].add(b);
            even[r] = block_product(&u, ab, even[r]);
            if has_min::<T>() {
                mins[r] += u.m * ab.s;
            }
        }
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])) + mins[r])
}

/// `out[r][j] = W[j] · a[r]` for `nrows` consecutive weight rows of
/// `row_bytes` bytes each: one call per tile, so the per-row cost is the
/// kernel's alone.
///
/// # Safety
/// As [`dot_rows`], for every row; each `out[r]` has room for `nrows` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<const T: u8, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    bsize: usize,
    a: [*const BlockQ8; R],
    out: [*mut f32; R],
) {
    let nb = row_bytes / bsize;
    for j in 0..nrows {
        let res = dot_rows::<T, R>(w.add(j * row_bytes), bsize, nb, a);
        for r in 0..R {
            *out[r].add(j) = res[r];
        }
    }
}

/// How many interleaved blocks ahead the group kernels prefetch.
const PREFETCH: usize = 8;

/// Asks for the group block [`PREFETCH`] blocks of `bytes` past `blk`. The
/// stream of one tile is a few KiB, too short for the hardware prefetcher to
/// run ahead of. (Past the matrix's end the hint is dropped, never faults.)
#[inline(always)]
/// # Safety
/// The CPU has SSE (x86-64 always does); the address is only a hint,
/// formed with wrapping arithmetic, never read.
unsafe fn prefetch_ahead(blk: *const u8, bytes: usize) {
    let ahead = blk.wrapping_add(PREFETCH * bytes);
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
    }
}

/// One 8-row group of an interleaved matrix ([`repack`]) against `R`
/// activation rows: lane `i` of result `r` is weight row `i` · `a[r]`.
///
/// Per block, each row's exact integer sum ends in its own lane, then one
/// scale product and one conversion serve all eight rows. A row's arithmetic
/// is the same for every `R`, so its result does not depend on its batch.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` indexes several per-row arrays at once
/// # Safety
/// The CPU has what `I` needs (every kernel here is reached only through the run-time dispatch that checked it); `w` addresses `nb` interleaved group blocks of type `T`
/// and each `a[r]` `nb` activation blocks.
unsafe fn group<I: Ints, const T: u8, const R: usize>(w: *const u8, nb: usize, a: [*const BlockQ8; R]) -> [__m256; R] {
    let l = repack::layout(T);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = w.add(b * l.bytes);
        prefetch_ahead(blk, l.bytes);
        let ab: [&BlockQ8; R] = std::array::from_fn(|r| &*a[r].add(b));
        // Activation chunk c (4 values) in every lane.
        let chunk = |r: usize, c: usize| _mm256_set1_epi32(std::ptr::read_unaligned(ab[r].qs.as_ptr().add(4 * c).cast::<i32>()));
        let mut sum = [_mm256_setzero_si256(); R];
        if l.bits == 8 {
            for c in 0..8 {
                let q = _mm256_loadu_si256(blk.add(l.qs + 32 * c).cast());
                let absq = _mm256_sign_epi8(q, q);
                for r in 0..R {
                    // The unsigned operand is w's magnitude: move w's sign onto a.
                    sum[r] = I::dot(sum[r], absq, _mm256_sign_epi8(chunk(r, c), q));
                }
            }
        } else {
            let mut part = [_mm256_setzero_si256(); R];
            for k in 0..4 {
                let raw = _mm256_loadu_si256(blk.add(l.qs + 32 * k).cast());
                let (mut lo, mut hi) = (_mm256_and_si256(raw, m4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
                if l.bits == 5 {
                    let qh = |c: usize| std::ptr::read_unaligned(blk.add(l.qh + 4 * c).cast::<[u8; 4]>());
                    lo = I::fifth(lo, qh(2 * k));
                    hi = I::fifth(hi, qh(2 * k + 1));
                }
                for r in 0..R {
                    part[r] = I::pair(part[r], lo, chunk(r, 2 * k), hi, chunk(r, 2 * k + 1));
                }
                // Each 16-bit lane of AVX2's partial sums gains at most 2 ·
                // 31 · 127 per chunk: eight chunks of 4-bit values fit it
                // (30,480), four of 5-bit ones.
                if k == 3 || (l.bits == 5 && k == 1) {
                    for r in 0..R {
                        sum[r] = I::widen(sum[r], part[r]);
                        part[r] = _mm256_setzero_si256();
                    }
                }
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        let m = if l.m != 0 { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(l.m).cast())) } else { _mm256_setzero_ps() };
        for r in 0..R {
            if l.offset != 0 {
                // Σ (q - k) a = Σ q a - k Σ a: exact in integers.
                sum[r] = _mm256_sub_epi32(sum[r], _mm256_set1_epi32(l.offset * ab[r].sum));
            }
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab[r].d)), _mm256_cvtepi32_ps(sum[r]), acc[r]);
            if l.m != 0 {
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab[r].s), acc[r]);
            }
        }
    }
    acc
}

/// `out[r][8g + i] = W[8g + i] · a[r]` for `groups` consecutive groups of an
/// interleaved matrix, `nb` blocks per row.
#[inline(always)]
/// # Safety
/// `w` points at `groups` groups of `nb` interleaved blocks of type `T`,
/// each `a[r]` at `nb` blocks; each `out[r]` has room for `8 · groups`
/// values; the CPU has what `I` needs.
unsafe fn groups_with<I: Ints, const T: u8, const R: usize>(
    w: *const u8,
    nb: usize,
    groups: usize,
    a: [*const BlockQ8; R],
    out: [*mut f32; R],
) {
    let group_bytes = nb * repack::layout(T).bytes;
    for g in 0..groups {
        let res = group::<I, T, R>(w.add(g * group_bytes), nb, a);
        for r in 0..R {
            _mm256_storeu_ps(out[r].add(repack::ROWS * g), res[r]);
        }
    }
}

/// `gemm_groups` and `gemm_groups_vnni`: a group kernel's body, generic
/// over [`Ints`], compiled for AVX2 and for AVX-512 VNNI.
macro_rules! group_entry_points {
    ($body:ident, $acts:ty) => {
        #[doc = concat!("[`", stringify!($body), "`] on AVX2.")]
        ///
        /// # Safety
        #[doc = concat!("As [`", stringify!($body), "`]; the CPU has AVX2, FMA and F16C.")]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn gemm_groups<const T: u8, const R: usize>(
            w: *const u8,
            nb: usize,
            groups: usize,
            a: [*const $acts; R],
            out: [*mut f32; R],
        ) {
            $body::<Avx2, T, R>(w, nb, groups, a, out)
        }

        #[doc = concat!("[`", stringify!($body), "`] on AVX-512 VNNI.")]
        ///
        /// # Safety
        #[doc = concat!("As [`", stringify!($body), "`]; the CPU has what [`Vnni`] needs ([`vnni_available`]).")]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn gemm_groups_vnni<const T: u8, const R: usize>(
            w: *const u8,
            nb: usize,
            groups: usize,
            a: [*const $acts; R],
            out: [*mut f32; R],
        ) {
            $body::<Vnni, T, R>(w, nb, groups, a, out)
        }
    };
}

group_entry_points!(groups_with, BlockQ8);

/// [`super::blocks::quantize_q8`] eight values at a time, with the same
/// result bit for bit: the same maximum, scale, products and rounding (half
/// away from zero, then truncation), only done in vectors.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK);
    let (sign, half) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(0.5));
    for (b, blk) in out.iter_mut().enumerate() {
        let p = x.as_ptr().add(b * QK);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_andnot_ps(sign, v[i]));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let r = _mm256_mul_ps(v[i], id);
            _mm256_cvttps_epi32(_mm256_add_ps(r, _mm256_or_ps(half, _mm256_and_ps(r, sign))))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
        // The packs interleave 128-bit lanes; the permutation puts values back in order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(blk.qs.as_mut_ptr().cast(), ordered);
        blk.d = half::f16::from_f32(d).to_f32();
        blk.s = half::f16::from_f32(sum as f32 * d).to_f32();
        blk.sum = sum;
    }
}

/// Activation rows for the K-quants as candle's port of ggml's
/// `quantize_row_q8_K` (`BlockQ8K::from_float`) writes them, bit for bit,
/// eight values at a time: the scale from the first value of the largest
/// magnitude (its sign included), each value rounded half away from zero
/// (`f32::round`), sums per 16. The scalar version ran at 5% of a
/// Gemma-3 prefill.
#[target_feature(enable = "avx2,fma,f16c")]
/// # Safety
/// the CPU has AVX2, FMA and F16C (reached only through the run-time dispatch that checked them).
pub unsafe fn quantize_q8k(x: &[f32], out: &mut [super::blocks::BlockQ8K]) {
    const QK_K: usize = 256;
    assert_eq!(x.len(), out.len() * QK_K);
    let sign = _mm256_set1_ps(-0.0);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for (b, blk) in out.iter_mut().enumerate() {
        let p = x.as_ptr().add(b * QK_K);
        let mut m = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 {
            blk.d = 0.0;
            blk.qs.fill(0);
            blk.bsums.fill(0);
            continue;
        }
        // The first value whose magnitude is the largest gives the scale its sign.
        let target = _mm256_set1_ps(amax);
        let mut max = amax;
        for i in 0..QK_K / 8 {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i)));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, target));
            if hit != 0 {
                max = *p.add(8 * i + hit.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127.0 / max;
        let is = _mm256_set1_ps(iscale);
        for g in 0..QK_K / 32 {
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let r = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * g + 8 * i)), is);
                // Half away from zero, exactly: the truncation, plus one
                // away from zero where the dropped fraction is at least a half.
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(r, t));
                let step = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), _mm256_or_ps(one, _mm256_and_ps(r, sign)));
                _mm256_cvttps_epi32(_mm256_add_ps(t, step))
            });
            // Saturating packs clamp to -128..=127 as the scalar clamp does;
            // the permutation undoes their lane interleaving.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(blk.qs.as_mut_ptr().add(32 * g).cast(), ordered);
        }
        for (j, s) in blk.bsums.iter_mut().enumerate() {
            let v = _mm_loadu_si128(blk.qs.as_ptr().add(16 * j).cast());
            // i8 → i16 pairs summed, then the eight pairs' sums.
            let w = _mm256_cvtepi8_epi16(v);
            let pairs = _mm256_madd_epi16(w, _mm256_set1_epi16(1));
            let t = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256::<1>(pairs));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
            *s = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t))) as i16;
        }
        blk.d = 1.0 / iscale;
    }
}

/// Eight f16 values from `p + i` (in values) as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `p + i .. p + i + 8` are in one allocation.
unsafe fn load_f16(p: *const half::f16, i: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.add(i).cast()))
}

/// Query heads one attention kernel call serves at most: each cache row is
/// loaded and widened once for all of them (the heads sharing a K/V head
/// under grouped-query attention), and their accumulators still fit the 16
/// vector registers.
const HEADS: usize = 3;

/// `scores[i][p] = scale · q_i · K[p]` for the `heads = q.len() / d` query
/// rows of `q` and the rows of `k` (`d` values each, a multiple of 8);
/// `scores` is `[heads, n]`. Four cache rows at a time, each head and row
/// with its own accumulator, reduced together at the end: a head's result
/// does not depend on the heads computed with it.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `d` is a multiple of 8; `k` holds `n` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores(q: &[f32], d: usize, k: &[half::f16], scale: f32, scores: &mut [f32]) {
    assert!(d.is_multiple_of(8) && q.len().is_multiple_of(d));
    let heads = q.len() / d;
    let n = scores.len() / heads;
    assert!(scores.len() == heads * n && k.len() >= n * d);
    let mut h = 0;
    while h < heads {
        let (qh, out) = (q.as_ptr().add(h * d), scores.as_mut_ptr().add(h * n));
        h += match heads - h {
            1 => scores_heads::<1>(qh, d, k.as_ptr(), n, scale, out),
            2 => scores_heads::<2>(qh, d, k.as_ptr(), n, scale, out),
            _ => scores_heads::<HEADS>(qh, d, k.as_ptr(), n, scale, out),
        };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `q` addresses `G` heads of `d` values, `k` `n` cache
/// rows of `d`, and `out` `G` rows of `n` scores.
unsafe fn scores_heads<const G: usize>(q: *const f32, d: usize, k: *const half::f16, n: usize, scale: f32, out: *mut f32) -> usize {
    let mut p = 0;
    while p + 4 <= n {
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        for c in (0..d).step_by(8) {
            for j in 0..4 {
                let kv = load_f16(k, (p + j) * d + c);
                for (g, acc) in acc.iter_mut().enumerate() {
                    acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), kv, acc[j]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            // Horizontal sums of the four accumulators in one vector.
            let h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            _mm_storeu_ps(out.add(g * n + p), _mm_mul_ps(s, _mm_set1_ps(scale)));
        }
        p += 4;
    }
    while p < n {
        let mut acc = [_mm256_setzero_ps(); G];
        for c in (0..d).step_by(8) {
            let kv = load_f16(k, p * d + c);
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), kv, *acc);
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            *out.add(g * n + p) = hsum(*acc) * scale;
        }
        p += 1;
    }
    G
}

/// `out[i] = Σ_p probs[i][p] · V[p]` for the `heads = out.len() / d` rows of
/// `probs` (`[heads, n]`) and `out` (`[heads, d]`, `d` a multiple of 8), the
/// outputs kept in registers a column block at a time. Each value is one
/// chain of products over `p` in order, whatever the heads or block width.
///
/// `WIDE`: the CPU has AVX-512's 32 vector registers, so 64 columns of
/// three heads stay in registers and a 64-value head's V rows are read in
/// one pass instead of two (the same products in the same order).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512 F/VL with `WIDE`); `d` is a
/// multiple of 8; `v` holds `n` rows.
#[inline(always)]
unsafe fn weighted_sum_with<const WIDE: bool>(probs: &[f32], d: usize, v: &[half::f16], out: &mut [f32]) {
    assert!(d.is_multiple_of(8) && out.len().is_multiple_of(d));
    let heads = out.len() / d;
    let n = probs.len() / heads;
    assert!(probs.len() == heads * n && v.len() >= n * d);
    let mut h = 0;
    while h < heads {
        let (pr, o) = (probs.as_ptr().add(h * n), out.as_mut_ptr().add(h * d));
        h += match (heads - h, WIDE) {
            (1, _) => weighted_heads::<1, 8>(pr, n, v.as_ptr(), d, o),
            (2, false) => weighted_heads::<2, 4>(pr, n, v.as_ptr(), d, o),
            (2, true) => weighted_heads::<2, 8>(pr, n, v.as_ptr(), d, o),
            (_, false) => weighted_heads::<HEADS, 4>(pr, n, v.as_ptr(), d, o),
            (_, true) => weighted_heads::<HEADS, 8>(pr, n, v.as_ptr(), d, o),
        };
    }
}

/// [`weighted_sum_with`] on AVX2.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `d` is a multiple of 8; `v` holds `n` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_sum(probs: &[f32], d: usize, v: &[half::f16], out: &mut [f32]) {
    weighted_sum_with::<false>(probs, d, v, out)
}

/// [`weighted_sum_with`] with AVX-512's registers: the same results bit for bit.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F/VL; `d` is a multiple of 8;
/// `v` holds `n` rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn weighted_sum_wide(probs: &[f32], d: usize, v: &[half::f16], out: &mut [f32]) {
    weighted_sum_with::<true>(probs, d, v, out)
}

/// [`weighted_sum`] for `G` heads, `W` vectors of columns at a time.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `j` indexes the value row and every head's accumulators
/// # Safety
/// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `probs` addresses `G` rows of `n`, `v` `n` cache rows,
/// and the outputs `G` rows of the head width.
unsafe fn weighted_heads<const G: usize, const W: usize>(
    probs: *const f32,
    n: usize,
    v: *const half::f16,
    d: usize,
    out: *mut f32,
) -> usize {
    for c0 in (0..d).step_by(8 * W) {
        let width = (d - c0).min(8 * W) / 8;
        let mut acc = [[_mm256_setzero_ps(); W]; G];
        for p in 0..n {
            let pv: [__m256; G] = std::array::from_fn(|g| _mm256_set1_ps(*probs.add(g * n + p)));
            let row = v.add(p * d + c0);
            for j in 0..width {
                let x = load_f16(row, 8 * j);
                for g in 0..G {
                    acc[g][j] = _mm256_fmadd_ps(pv[g], x, acc[g][j]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate().take(width) {
                _mm256_storeu_ps(out.add(g * d + c0 + 8 * j), *acc);
            }
        }
    }
    G
}

/// Dot product of two f16 rows (weights and f16-rounded activations), in
/// f32 with four 8-lane accumulators.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; both rows hold `n` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(n: usize, w: &[half::f16], a: &[half::f16]) -> f32 {
    assert!(w.len() >= n && a.len() >= n);
    let (w, a) = (w.as_ptr().cast::<u8>(), a.as_ptr().cast::<u8>());
    let load = |p: *const u8, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load(w, i + 8 * j), load(a, i + 8 * j), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load(w, i), load(a, i), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)));
    while i < n {
        sum += h2f(*w.cast::<half::f16>().add(i)) * h2f(*a.cast::<half::f16>().add(i));
        i += 1;
    }
    sum
}

/// K-quant kernels: weights in 256-value blocks against ggml's Q8_K
/// activations (one scale per 256 values), so each block's sub-block scales
/// are applied in integers and one float product is taken per block and
/// row, as ggml does; one weight block serves up to 8 activation rows.
pub mod k {
    use super::*;
    use crate::kernels::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
    use crate::kernels::KQuant;

    /// The low and high nibbles of 32 bytes of Q4_K/Q5_K values; with
    /// `FIFTH`, bits 0 and 1 of each byte of `hb` join them at bit 4 as their
    /// fifth bits, and `hb` moves on 2 bits to the next pair (the 16-bit
    /// shifts only carry bits these masks drop).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    /// # Safety
    /// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them).
    unsafe fn nibbles<const FIFTH: bool>(raw: __m256i, hb: &mut __m256i) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        let (mut lo, mut hi) = (_mm256_and_si256(raw, m4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
        if FIFTH {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(*hb, _mm256_set1_epi8(1)), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(*hb, _mm256_set1_epi8(2)), 3));
            *hb = _mm256_srli_epi16(*hb, 2);
        }
        (lo, hi)
    }

    /// Q4_K (`FIFTH` false) or Q5_K (true): the same sub-block scales and
    /// minimums; Q5_K's fifth bits come from `qh`, two sub-blocks per pass.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    /// # Safety
    /// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `w` addresses `nb` Q4_K (Q5_K with `FIFTH`) blocks and
    /// each `a[r]` `nb` Q8_K blocks.
    unsafe fn row_q4k<const FIFTH: bool, const R: usize>(w: *const u8, nb: usize, a: [*const BlockQ8K; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = [_mm_setzero_ps(); R];
        for i in 0..nb {
            let (d, dmin, packed, qs, mut hb) = if FIFTH {
                let b = &*w.cast::<BlockQ5K>().add(i);
                (b.d, b.dmin, &b.scales, b.qs.as_ptr(), _mm256_loadu_si256(b.qh.as_ptr().cast()))
            } else {
                let b = &*w.cast::<BlockQ4K>().add(i);
                (b.d, b.dmin, &b.scales, b.qs.as_ptr(), _mm256_setzero_si256())
            };
            let (scales, mins) = repack::q4k::scales_mins(packed);
            let sc = scales.to_le_bytes();
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let (lo, hi) = nibbles::<FIFTH>(_mm256_loadu_si256(qs.add(32 * j).cast()), &mut hb);
                let (sl, sh) = (_mm256_set1_epi16(sc[2 * j] as i16), _mm256_set1_epi16(sc[2 * j + 1] as i16));
                for r in 0..R {
                    let q8 = (*a[r].add(i)).qs.as_ptr().add(64 * j);
                    let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q8.cast())));
                    let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q8.add(32).cast())));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
                }
            }
            let (d, dmin) = (h2f(d), h2f(dmin));
            for r in 0..R {
                let ab = &*a[r].add(i);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                // Minimums: Σ_k m_k Σ_(values of sub-block k) a, from the sums per 16.
                let bs = _mm256_loadu_si256(ab.bsums.as_ptr().cast());
                let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
                let prod = _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs));
                acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-dmin * ab.d), prod, acc_m[r]);
            }
        }
        std::array::from_fn(|r| {
            let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
            hsum(acc[r]) + _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    /// # Safety
    /// the CPU has AVX2, FMA and F16C (every kernel here is reached only through the run-time dispatch that checked them); `w` addresses `nb` Q6_K blocks and each `a[r]` `nb` Q8_K blocks.
    unsafe fn row_q6k<const R: usize>(w: *const BlockQ6K, nb: usize, a: [*const BlockQ8K; R]) -> [f32; R] {
        let (m4, m2, m32) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
        let mut acc = [_mm256_setzero_ps(); R];
        for i in 0..nb {
            let b = &*w.add(i);
            let mut sumi = [_mm256_setzero_si256(); R];
            // Sub-block k of 32 values: half n = k / 4, quarter j = k % 4 of
            // it; low bits from nibbles of 32 bytes of ql, high bits 2j..2j+2
            // of 32 bytes of qh; scales 2k (values 0..16) and 2k + 1.
            for k in 0..8 {
                let (n, j) = (k / 4, k % 4);
                let ql = _mm256_loadu_si256(b.ql.as_ptr().add(64 * n + 32 * (j & 1)).cast());
                let lo = if j < 2 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) };
                let qh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * n).cast());
                let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), m2);
                let q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), m32);
                let absq = _mm256_sign_epi8(q, q);
                let sc = _mm256_set_m128i(_mm_set1_epi16(b.scales[2 * k + 1] as i16), _mm_set1_epi16(b.scales[2 * k] as i16));
                for r in 0..R {
                    let q8 = _mm256_loadu_si256((*a[r].add(i)).qs.as_ptr().add(32 * k).cast());
                    // maddubs wants its first operand unsigned: move q's sign onto a.
                    let p = _mm256_maddubs_epi16(absq, _mm256_sign_epi8(q8, q));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(sc, p));
                }
            }
            let d = h2f(b.d);
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * (*a[r].add(i)).d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]))
    }

    /// One 8-row group of an interleaved Q4_K matrix ([`repack::q4k`]), or
    /// Q5_K (`FIFTH`, [`repack::q5k`]: each value's fifth bit joins its low
    /// nibble), against `R` activation rows: lane `i` of result `r` is weight row `i`
    /// · `a[r]`. Per sub-block each row's integer sum ends in its own lane,
    /// scaled there by that row's 6-bit scale; the minimums' term is eight
    /// lanes of integer products too, then one float product per block and
    /// row serves all eight rows. A row's arithmetic is the same for every
    /// `R`, so its result does not depend on its batch.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `r` indexes several per-row arrays at once
    /// # Safety
    /// The CPU has what `I` needs (every kernel here is reached only through the run-time dispatch that checked it); `w` addresses `nb` interleaved Q4_K (Q5_K) group
    /// blocks and each `a[r]` `nb` Q8_K blocks.
    unsafe fn group_q4k<I: Ints, const FIFTH: bool, const R: usize>(w: *const u8, nb: usize, a: [*const BlockQ8K; R]) -> [__m256; R] {
        use repack::q4k::{DMIN, M, QS, SC, TOP};
        let (bytes, sub) = if FIFTH { (repack::q5k::BYTES, repack::q5k::SUB) } else { (repack::q4k::BYTES, repack::q4k::SUB) };
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        // Each row's (B[2t], B[2t + 1]) pair of sub-block activation sums in every lane.
        let pair_idx: [__m256i; 4] = std::array::from_fn(|t| _mm256_set1_epi32(t as i32));
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = w.add(b * bytes);
            prefetch_ahead(blk, bytes);
            // The 6-bit scales and minimums, f = 8 · sub-block + row, one byte each.
            let load = |o: usize| _mm256_loadu_si256(blk.add(o).cast());
            let (nsc, nm, top) = (load(SC), load(M), load(TOP));
            let mut sm = [0u8; 128];
            let parts = [
                _mm256_or_si256(_mm256_and_si256(nsc, m4), _mm256_and_si256(_mm256_slli_epi16(top, 4), m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nsc, 4), m4), _mm256_and_si256(_mm256_slli_epi16(top, 2), m30)),
                _mm256_or_si256(_mm256_and_si256(nm, m4), _mm256_and_si256(top, m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nm, 4), m4), _mm256_and_si256(_mm256_srli_epi16(top, 2), m30)),
            ];
            for (k, p) in parts.iter().enumerate() {
                _mm256_storeu_si256(sm.as_mut_ptr().add(32 * k).cast(), *p);
            }
            let eight = |f: usize| _mm_loadl_epi64(sm.as_ptr().add(f).cast());
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                // Row i's scale in both 16-bit halves of lane i.
                let x = eight(8 * s);
                let sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, x));
                let q = blk.add(QS + sub * s);
                let mut hb = if FIFTH { _mm256_loadu_si256(q.add(repack::q5k::HIGH).cast()) } else { _mm256_setzero_si256() };
                let nib: [(__m256i, __m256i); 4] =
                    std::array::from_fn(|k| nibbles::<FIFTH>(_mm256_loadu_si256(q.add(32 * k).cast()), &mut hb));
                for r in 0..R {
                    let qa = (*a[r].add(b)).qs.as_ptr().add(32 * s);
                    let chunk = |c: usize| _mm256_set1_epi32(std::ptr::read_unaligned(qa.add(4 * c).cast::<i32>()));
                    let mut s16 = _mm256_setzero_si256();
                    // Each 16-bit lane gains at most 2 · 15 · 127 per chunk:
                    // 8 chunks of 4-bit values fit, 4 of 5-bit ones.
                    for (k, (lo, hi)) in nib.iter().enumerate() {
                        s16 = _mm256_add_epi16(
                            s16,
                            _mm256_add_epi16(_mm256_maddubs_epi16(*lo, chunk(2 * k)), _mm256_maddubs_epi16(*hi, chunk(2 * k + 1))),
                        );
                        if FIFTH && k == 1 {
                            sumi[r] = I::scaled(sumi[r], s16, sc);
                            s16 = _mm256_setzero_si256();
                        }
                    }
                    sumi[r] = I::scaled(sumi[r], s16, sc);
                }
            }
            // Row i's minimums of sub-blocks 2t and 2t + 1 as the 16-bit pair of lane i.
            let mins: [__m256i; 4] =
                std::array::from_fn(|t| _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(eight(64 + 16 * t), eight(72 + 16 * t))));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(DMIN).cast()));
            for r in 0..R {
                let ab = &*a[r].add(b);
                let bs = _mm256_loadu_si256(ab.bsums.as_ptr().cast());
                // Sums of each sub-block's 32 activations: at most 32 · 127, an i16.
                let pairs = _mm256_castsi128_si256(_mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1)));
                let mut msum = _mm256_setzero_si256();
                for t in 0..4 {
                    msum = I::scaled(msum, mins[t], _mm256_permutevar8x32_epi32(pairs, pair_idx[t]));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab.d)), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, _mm256_set1_ps(-ab.d)), _mm256_cvtepi32_ps(msum), acc[r]);
            }
        }
        acc
    }

    /// One 8-row group of an interleaved Q6_K matrix ([`repack::q6k`])
    /// against `R` activation rows, as [`group_q4k`]: values are taken
    /// unsigned (0..64) and the offset of 32 undone with the activations'
    /// sums per 16 values, each 16-value group's integer sum scaled in its
    /// lane by that row's scale. A row's arithmetic is the same for every
    /// `R`, so its result does not depend on its batch.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `r` indexes several per-row arrays at once
    /// # Safety
    /// The CPU has what `I` needs (every kernel here is reached only through the run-time dispatch that checked it); `w` addresses `nb` interleaved Q6_K group blocks and
    /// each `a[r]` `nb` Q8_K blocks.
    unsafe fn group_q6k<I: Ints, const R: usize>(w: *const u8, nb: usize, a: [*const BlockQ8K; R]) -> [__m256; R] {
        use repack::q6k::{BYTES, QS, SC, SUB, TOP};
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let pair_idx: [__m256i; 8] = std::array::from_fn(|t| _mm256_set1_epi32(t as i32));
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = w.add(b * BYTES);
            prefetch_ahead(blk, BYTES);
            let eight = |at: usize| _mm_loadl_epi64(blk.add(SC + at).cast());
            // Row i's scale of group g in both 16-bit halves of lane i.
            let scale = |g: usize| {
                let x = eight(8 * g);
                _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, x))
            };
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                let q = blk.add(QS + SUB * s);
                let top = [0, 1].map(|h| _mm256_loadu_si256(q.add(TOP + 32 * h).cast()));
                // Chunks 2k and 2k + 1: low nibbles and high nibbles, each with its top bits at bits 4..6.
                let vals: [(__m256i, __m256i); 4] = std::array::from_fn(|k| {
                    let raw = _mm256_loadu_si256(q.add(32 * k).cast());
                    let t = top[k / 2];
                    let (tl, th) =
                        if k % 2 == 0 { (_mm256_slli_epi16(t, 4), _mm256_slli_epi16(t, 2)) } else { (t, _mm256_srli_epi16(t, 2)) };
                    (
                        _mm256_or_si256(_mm256_and_si256(raw, m4), _mm256_and_si256(tl, m30)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), _mm256_and_si256(th, m30)),
                    )
                });
                let (sc0, sc1) = (scale(2 * s), scale(2 * s + 1));
                for r in 0..R {
                    let qa = (*a[r].add(b)).qs.as_ptr().add(32 * s);
                    let chunk = |c: usize| _mm256_set1_epi32(std::ptr::read_unaligned(qa.add(4 * c).cast::<i32>()));
                    // Each 16-bit lane gains at most 2 · 63 · 127 per chunk: two chunks fit.
                    let two = |k: usize| {
                        _mm256_add_epi16(_mm256_maddubs_epi16(vals[k].0, chunk(2 * k)), _mm256_maddubs_epi16(vals[k].1, chunk(2 * k + 1)))
                    };
                    let g0 = I::scaled(I::scaled(_mm256_setzero_si256(), two(0), sc0), two(1), sc0);
                    let g1 = I::scaled(I::scaled(g0, two(2), sc1), two(3), sc1);
                    sumi[r] = _mm256_add_epi32(sumi[r], g1);
                }
            }
            // Row i's scales of groups 2t and 2t + 1 as the 16-bit pair of lane i.
            let scale_pairs: [__m256i; 8] =
                std::array::from_fn(|t| _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(eight(16 * t), eight(16 * t + 8))));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
            for r in 0..R {
                let ab = &*a[r].add(b);
                let bs = _mm256_loadu_si256(ab.bsums.as_ptr().cast());
                // Σ_g scale_g · Σ (values of group g) a, for the offset of 32.
                let mut off = _mm256_setzero_si256();
                for t in 0..8 {
                    off = I::scaled(off, scale_pairs[t], _mm256_permutevar8x32_epi32(bs, pair_idx[t]));
                }
                let exact = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 5));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab.d)), _mm256_cvtepi32_ps(exact), acc[r]);
            }
        }
        acc
    }

    /// `out[r][8g + i] = W[8g + i] · a[r]` for `groups` consecutive groups of
    /// an interleaved K-quant matrix of type `T`, `nb` blocks per row.
    #[inline(always)]
    /// # Safety
    /// `w` points at `groups` groups of `nb` interleaved blocks, each `a[r]`
    /// at `nb` Q8_K blocks; each `out[r]` has room for `8 · groups` values;
    /// the CPU has what `I` needs.
    unsafe fn groups_with<I: Ints, const T: u8, const R: usize>(
        w: *const u8,
        nb: usize,
        groups: usize,
        a: [*const BlockQ8K; R],
        out: [*mut f32; R],
    ) {
        let bytes = repack::k_bytes(T);
        for g in 0..groups {
            let wg = w.add(g * nb * bytes);
            let res = if T == KQuant::Q4K as u8 {
                group_q4k::<I, false, R>(wg, nb, a)
            } else if T == KQuant::Q5K as u8 {
                group_q4k::<I, true, R>(wg, nb, a)
            } else {
                group_q6k::<I, R>(wg, nb, a)
            };
            for r in 0..R {
                _mm256_storeu_ps(out[r].add(repack::ROWS * g), res[r]);
            }
        }
    }

    group_entry_points!(groups_with, BlockQ8K);

    /// `out[r][j] = W[j] · a[r]` for `nrows` weight rows of `row_bytes` bytes.
    ///
    /// # Safety
    /// Rows hold whole blocks of type `T`, each `a[r]` as many Q8_K blocks;
    /// each `out[r]` has room for `nrows` values; the CPU has AVX2, FMA, F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm<const T: u8, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        nrows: usize,
        a: [*const BlockQ8K; R],
        out: [*mut f32; R],
    ) {
        for j in 0..nrows {
            let row = w.add(j * row_bytes);
            let res = if T == KQuant::Q4K as u8 {
                row_q4k::<false, R>(row, row_bytes / size_of::<BlockQ4K>(), a)
            } else if T == KQuant::Q5K as u8 {
                row_q4k::<true, R>(row, row_bytes / size_of::<BlockQ5K>(), a)
            } else {
                row_q6k::<R>(row.cast(), row_bytes / size_of::<BlockQ6K>(), a)
            };
            for r in 0..R {
                *out[r].add(j) = res[r];
            }
        }
    }
}
