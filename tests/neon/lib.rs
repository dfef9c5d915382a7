//! C entry points into sollol's NEON kernels and their scalar reference,
//! compiled from the same source files as sollol (`#[path]`), for
//! `tests/neon.py` to call on an emulated aarch64 CPU.

#![allow(dead_code)]

#[path = "../../src/kernels/blocks.rs"]
mod blocks;
#[path = "../../src/kernels/neon.rs"]
mod neon;

use blocks::{BlockQ8, WeightType, QK};

/// Runs `$body` with the const `$t` = weight type `$w` (a discriminant) and
/// the const `$r` = `$n` activation rows.
macro_rules! with_type_rows {
    ($w:expr, $n:expr, $t:ident, $r:ident => $body:expr) => {
        with_type_rows!(@types $w, $n, $t, $r, $body; Q4_0 Q4_1 Q5_0 Q5_1 Q8_0)
    };
    (@types $w:expr, $n:expr, $t:ident, $r:ident, $body:expr; $($v:ident)*) => {
        match $w {
            $(w if w == WeightType::$v as u8 => {
                const $t: u8 = WeightType::$v as u8;
                with_type_rows!(@rows $n, $r, $body; 1 2 3 4)
            })*
            _ => return 1,
        }
    };
    (@rows $n:expr, $r:ident, $body:expr; $($k:literal)*) => {
        match $n {
            $($k => {
                const $r: usize = $k;
                $body
            })*
            _ => return 1,
        }
    };
}

fn weight_type(t: u8) -> Option<WeightType> {
    [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q5_0, WeightType::Q5_1, WeightType::Q8_0].into_iter().find(|w| *w as u8 == t)
}

/// `neon::gemm_neon` (`dotprod` 0) or `neon::gemm_dotprod` (1) for weight
/// type `t` and `r` activation rows; 0 on success. (`neon::gemm` chooses
/// between them by asking the OS, which the emulator has none of.)
///
/// # Safety
/// As `neon::gemm`; `acts` and `outs` hold `r` pointers.
#[no_mangle]
pub unsafe extern "C" fn sollol_neon_gemm(
    t: u8,
    r: usize,
    dotprod: u32,
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    acts: *const *const BlockQ8,
    outs: *const *mut f32,
) -> u32 {
    let Some(bsize) = weight_type(t).map(WeightType::block_bytes) else { return 1 };
    with_type_rows!(t, r, T, R => {
        let (a, o) = (std::array::from_fn(|i| *acts.add(i)), std::array::from_fn(|i| *outs.add(i)));
        if dotprod != 0 {
            neon::gemm_dotprod::<T, R>(w, row_bytes, nrows, bsize, a, o)
        } else {
            neon::gemm_neon::<T, R>(w, row_bytes, nrows, bsize, a, o)
        }
    });
    0
}

/// sollol's activation quantizer over `n` values (a multiple of 32).
///
/// # Safety
/// `x` holds `n` values, `out` room for `n / 32` blocks.
#[no_mangle]
pub unsafe extern "C" fn sollol_quantize_q8(x: *const f32, n: usize, out: *mut BlockQ8) {
    blocks::quantize_q8(std::slice::from_raw_parts(x, n), std::slice::from_raw_parts_mut(out, n / QK));
}

/// The scalar reference dot product of one weight row of `nb` blocks of type
/// `t` with one activation row.
///
/// # Safety
/// `w` holds `nb` blocks of type `t`, `a` `nb` activation blocks.
#[no_mangle]
pub unsafe extern "C" fn sollol_scalar_dot(t: u8, w: *const u8, a: *const BlockQ8, nb: usize) -> f32 {
    use blocks::scalar;
    let a = std::slice::from_raw_parts(a, nb);
    macro_rules! rows {
        ($block:ty) => {
            std::slice::from_raw_parts(w.cast::<$block>(), nb)
        };
    }
    match weight_type(t) {
        Some(WeightType::Q4_0) => scalar::q4_0(rows!(blocks::BlockQ4_0), a),
        Some(WeightType::Q4_1) => scalar::q4_1(rows!(blocks::BlockQ4_1), a),
        Some(WeightType::Q5_0) => scalar::q5_0(rows!(blocks::BlockQ5_0), a),
        Some(WeightType::Q5_1) => scalar::q5_1(rows!(blocks::BlockQ5_1), a),
        Some(WeightType::Q8_0) => scalar::q8_0(rows!(blocks::BlockQ8_0), a),
        None => f32::NAN,
    }
}
