//! AVX2 + FMA + F16C dot products of weight rows with quantized activation rows.
//!
//! One kernel, specialised per weight type (`T`) and per number of
//! activation rows (`R`, 1..=4): a weight block is unpacked once and
//! multiplied with the same block of every activation row, which is what
//! makes prefill and batched decoding cheaper than `R` separate products.
//! Each row's arithmetic (two accumulators, even and odd blocks, then one
//! horizontal sum) is the same for every `R`, so a row's result does not
//! depend on which rows were batched with it.

use std::arch::x86_64::*;

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8, BlockQ8_0, QK};
use super::WeightType;

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

/// `y += p · x`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy(y: &mut [f32], p: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(y.as_ptr().add(i)));
        _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
        i += 8;
    }
    while i < n {
        y[i] += p * x[i];
        i += 1;
    }
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
