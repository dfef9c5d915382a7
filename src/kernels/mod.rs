//! The project's own CPU compute kernels.
//!
//! candle stays the tensor framework (loading, devices, the GPU path); the
//! CPU hot path of a slice runs here: quantized matrix products over the
//! weights exactly as GGUF stores them ([`QMatrix`]), activations quantized
//! once per row and shared by every matrix that reads them ([`QActs`]), a
//! parked thread pool ([`pool`]) and the fused f32 operations of a block
//! ([`ops`]).
//!
//! Dispatch happens once, when a matrix is built: AVX2+FMA+F16C kernels for
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 where the CPU has them, the scalar
//! reference otherwise. Q4_K, Q5_K and Q6_K keep ggml's Q8_K activations
//! (quantized by our AVX2 port, bit for bit candle's) and get
//! our multi-row AVX2 kernels where the CPU has them (interleaved in groups
//! of eight rows like the types above), F16 our AVX2 dot product;
//! other GGUF types (and all of these on other CPUs) use candle's per-type
//! dot products inside the same row-parallel driver.

pub mod arena;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod blocks;
pub mod device;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod ops;
pub mod pool;
mod repack;

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

pub use blocks::WeightType;
use blocks::{BlockQ8, QK};
pub use pool::{pool, set_threads};

/// K-quant types with our AVX2 kernel. The discriminant selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum KQuant {
    Q4K = 0,
    Q5K = 1,
    Q6K = 2,
}

impl KQuant {
    fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }
}

impl WeightType {
    fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }
}

/// Bytes with 8-byte alignment, so block structs can be viewed in place.
/// Buffers of [`HUGE_FROM`] bytes and more (weight matrices) live in huge
/// pages ([`arena`]); smaller ones, and any that grow, in a vector.
#[derive(Debug, Default)]
struct Aligned {
    mem: Mem,
    len: usize,
}

#[derive(Debug)]
enum Mem {
    Words(Vec<u64>),
    Huge(arena::HugeBuf),
}

impl Default for Mem {
    fn default() -> Self {
        Mem::Words(Vec::new())
    }
}

/// Gemma-3-270M's block matrices are 110 KiB to 1 MiB: they gain as much
/// as its 170 MiB LM head from huge pages.
const HUGE_FROM: usize = 64 << 10;

impl Aligned {
    fn zeroed(len: usize) -> Self {
        match (len >= HUGE_FROM).then(|| arena::HugeBuf::zeroed(len)).flatten() {
            Some(b) => Self { mem: Mem::Huge(b), len },
            None => Self { mem: Mem::Words(vec![0; len.div_ceil(8)]), len },
        }
    }

    fn resize(&mut self, len: usize) {
        match &mut self.mem {
            Mem::Words(w) if w.len() * 8 < len => w.resize(len.div_ceil(8), 0),
            Mem::Huge(b) if b.len() < len => {
                let mut words = vec![0u64; len.div_ceil(8)];
                // SAFETY: u64 storage viewed as bytes, within its length.
                let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), b.len()) };
                bytes.copy_from_slice(b.bytes());
                self.mem = Mem::Words(words);
            }
            _ => {}
        }
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        match &self.mem {
            // SAFETY: u64 storage viewed as its bytes, within its length.
            Mem::Words(w) => unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), self.len) },
            Mem::Huge(b) => &b.bytes()[..self.len],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Mem::Words(w) => unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast(), self.len) },
            Mem::Huge(b) => &mut b.bytes_mut()[..self.len],
        }
    }
}

impl Clone for Aligned {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.bytes_mut().copy_from_slice(self.bytes());
        copy
    }
}

/// Views bytes as blocks. Every block type here is plain old data whose
/// alignment (≤ 8) the buffers and row strides respect.
fn cast<T>(bytes: &[u8]) -> &[T] {
    assert!(bytes.as_ptr().align_offset(align_of::<T>()) == 0 && bytes.len().is_multiple_of(size_of::<T>()));
    // SAFETY: asserted above: aligned for T and a whole number of them; T is
    // plain old data, valid for any bytes.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size_of::<T>()) }
}

fn cast_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    assert!(bytes.as_ptr().align_offset(align_of::<T>()) == 0 && bytes.len().is_multiple_of(size_of::<T>()));
    // SAFETY: as in `cast`; the borrow of `bytes` is exclusive.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / size_of::<T>()) }
}

/// The per-row functions of a matrix's weight type, chosen once per matrix.
#[derive(Clone, Copy)]
enum Kernel {
    /// Our kernels; activations are [`BlockQ8`] rows.
    Own { t: WeightType, simd: bool },
    /// candle's dot products for the other GGUF types.
    Ggml(GgmlFns),
}

#[derive(Clone, Copy)]
struct GgmlFns {
    /// The activation type of the dot product.
    act: GgmlDType,
    act_row_bytes: fn(usize) -> usize,
    quantize: fn(&[f32], &mut [u8]),
    dot: DotFn,
    dequantize: fn(&[u8], &mut [f32]),
    /// A kernel over weight rows × up to 8 activation rows, where there is
    /// one (SIMD K-quants); else `dot` per pair.
    gemm: Option<GemmFn>,
}

/// `(cols, weight row, activation row)` → their dot product.
type DotFn = fn(usize, &[u8], &[u8]) -> f32;

/// `(weight rows, row_bytes, activation rows, outputs)` as [`Kernel::gemm`]
/// takes them. Safety: chosen only where the CPU has what it needs, and
/// called with rows and outputs as [`simd_gemm`] requires.
type GemmFn = unsafe fn(&[u8], usize, &[&[u8]], &[OutPtr]);

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kernel::Own { t, simd } => write!(f, "Own({t:?}, simd: {simd})"),
            Kernel::Ggml(g) => write!(f, "Ggml(acts {:?})", g.act),
        }
    }
}

/// The layout of an interleaved matrix's groups, by the kernel that reads it.
#[derive(Debug, Clone, Copy)]
enum Grouping {
    /// [`repack`]'s layouts of our block types.
    Own(WeightType),
    /// [`repack::q4k`], [`repack::q5k`] or [`repack::q6k`].
    K(KQuant),
}

impl Grouping {
    /// `data`'s whole groups of eight rows interleaved in place.
    fn interleave(self, data: &mut [u8], rows: usize, row_bytes: usize) {
        match self {
            Grouping::Own(t) => repack::interleave(t, data, rows, row_bytes),
            Grouping::K(KQuant::Q4K) => repack::q4k::interleave(data, rows, row_bytes),
            Grouping::K(KQuant::Q5K) => repack::q5k::interleave(data, rows, row_bytes),
            Grouping::K(KQuant::Q6K) => repack::q6k::interleave(data, rows, row_bytes),
        }
    }

    /// Row `lane`'s block `b` of an interleaved group, back in GGUF's layout.
    fn original_block(self, group: &[u8], lane: usize, b: usize, out: &mut [u8]) {
        match self {
            Grouping::Own(t) => repack::original_block(t, group, lane, b, out),
            Grouping::K(KQuant::Q4K) => repack::q4k::original_block(group, lane, b, out),
            Grouping::K(KQuant::Q5K) => repack::q5k::original_block(group, lane, b, out),
            Grouping::K(KQuant::Q6K) => repack::q6k::original_block(group, lane, b, out),
        }
    }
}

/// What activation rows a kernel reads; matrices with the same kind share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActKind {
    Q8,
    Ggml(GgmlDType),
}

fn q8_row_bytes(cols: usize) -> usize {
    cols / QK * size_of::<BlockQ8>()
}

fn q8_quantize(x: &[f32], out: &mut [u8], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where the CPU has AVX2/FMA/F16C.
        return unsafe { avx2::quantize_q8(x, cast_mut(out)) };
    }
    let _ = simd;
    blocks::quantize_q8(x, cast_mut(out))
}

fn own_dot_scalar(t: WeightType, w: &[u8], a: &[u8]) -> f32 {
    let a = cast::<BlockQ8>(a);
    match t {
        WeightType::Q4_0 => blocks::scalar::q4_0(cast(w), a),
        WeightType::Q4_1 => blocks::scalar::q4_1(cast(w), a),
        WeightType::Q5_0 => blocks::scalar::q5_0(cast(w), a),
        WeightType::Q5_1 => blocks::scalar::q5_1(cast(w), a),
        WeightType::Q8_0 => blocks::scalar::q8_0(cast(w), a),
    }
}

fn own_dequantize(t: WeightType, w: &[u8], out: &mut [f32]) {
    match t {
        WeightType::Q4_0 => blocks::dequantize_q4_0(cast(w), out),
        WeightType::Q4_1 => blocks::dequantize_q4_1(cast(w), out),
        WeightType::Q5_0 => blocks::dequantize_q5_0(cast(w), out),
        WeightType::Q5_1 => blocks::dequantize_q5_1(cast(w), out),
        WeightType::Q8_0 => blocks::dequantize_q8_0(cast(w), out),
    }
}

fn ggml_row_bytes<T: GgmlType>(cols: usize) -> usize {
    cols / T::VecDotType::BLCK_SIZE * size_of::<T::VecDotType>()
}

fn ggml_quantize<T: GgmlType>(x: &[f32], out: &mut [u8]) {
    T::VecDotType::from_float(x, cast_mut(out))
}

fn ggml_dot<T: GgmlType>(cols: usize, w: &[u8], a: &[u8]) -> f32 {
    T::vec_dot(cols, cast(w), cast(a))
}

fn ggml_dequantize<T: GgmlType>(w: &[u8], out: &mut [f32]) {
    T::to_float(cast(w), out)
}

fn ggml_fns<T: GgmlType>() -> GgmlFns {
    GgmlFns {
        act: T::VecDotType::DTYPE,
        act_row_bytes: ggml_row_bytes::<T>,
        quantize: ggml_quantize::<T>,
        dot: ggml_dot::<T>,
        dequantize: ggml_dequantize::<T>,
        gemm: None,
    }
}

/// Runs `$body` with the const `$r` = the number of activation rows, one of the listed.
macro_rules! with_rows {
    ($n:expr, $r:ident => $body:expr; $($k:literal)+) => {
        match $n {
            $($k => {
                const $r: usize = $k;
                $body
            })+
            n => unreachable!("{n} activation rows"),
        }
    };
}

/// Activation rows one call of the row-at-a-time kernels takes.
const ROW_KERNEL_ROWS: usize = 4;
/// Activation rows one call of the interleaved kernels and of the K-quant
/// kernel takes: a batched decode step of 8 sessions unpacks each weight
/// block once.
const GROUP_KERNEL_ROWS: usize = 8;

impl Kernel {
    /// Activation rows one call of [`Self::gemm`] takes.
    fn max_rows(&self) -> usize {
        match self {
            Kernel::Ggml(GgmlFns { gemm: Some(_), .. }) => GROUP_KERNEL_ROWS,
            _ => ROW_KERNEL_ROWS,
        }
    }

    fn for_type(t: GgmlDType, allow_simd: bool) -> Option<Self> {
        if let Some(own) = WeightType::from_ggml(t) {
            return Some(Kernel::Own { t: own, simd: allow_simd && simd_available() });
        }
        let simd = allow_simd && simd_available();
        Some(Kernel::Ggml(match t {
            GgmlDType::Q2K => ggml_fns::<BlockQ2K>(),
            GgmlDType::Q3K => ggml_fns::<BlockQ3K>(),
            GgmlDType::Q4K => k_fns::<BlockQ4K, { KQuant::Q4K as u8 }>(simd),
            GgmlDType::Q5K => k_fns::<BlockQ5K, { KQuant::Q5K as u8 }>(simd),
            GgmlDType::Q6K => k_fns::<BlockQ6K, { KQuant::Q6K as u8 }>(simd),
            GgmlDType::F16 => GgmlFns { dot: f16_dot(simd).unwrap_or(ggml_dot::<f16>), ..ggml_fns::<f16>() },
            GgmlDType::F32 => ggml_fns::<f32>(),
            _ => return None,
        }))
    }

    fn acts(&self) -> ActKind {
        match self {
            Kernel::Own { .. } => ActKind::Q8,
            Kernel::Ggml(g) => ActKind::Ggml(g.act),
        }
    }

    fn act_row_bytes(&self, cols: usize) -> usize {
        match self {
            Kernel::Own { .. } => q8_row_bytes(cols),
            Kernel::Ggml(g) => (g.act_row_bytes)(cols),
        }
    }

    fn quantize(&self, x: &[f32], out: &mut [u8]) {
        match self {
            Kernel::Own { simd, .. } => q8_quantize(x, out, *simd),
            Kernel::Ggml(g) => (g.quantize)(x, out),
        }
    }

    fn dequantize(&self, w: &[u8], out: &mut [f32]) {
        match self {
            Kernel::Own { t, .. } => own_dequantize(*t, w, out),
            Kernel::Ggml(g) => (g.dequantize)(w, out),
        }
    }

    /// `outs[r][j] = W[j] · acts[r]` for the `w.len() / row_bytes` weight
    /// rows in `w` and up to [`Self::max_rows`] activation rows.
    fn gemm(&self, cols: usize, w: &[u8], row_bytes: usize, acts: &[&[u8]], outs: &[OutPtr]) {
        let nrows = w.len() / row_bytes;
        let (own, simd) = match *self {
            Kernel::Own { t, simd } => (t, simd),
            Kernel::Ggml(GgmlFns { gemm: Some(gemm), .. }) => {
                // SAFETY: set only where the CPU has what the kernel needs.
                unsafe { gemm(w, row_bytes, acts, outs) };
                return;
            }
            Kernel::Ggml(g) => {
                for (a, o) in acts.iter().zip(outs) {
                    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                        // SAFETY: see `OutPtr`.
                        unsafe { *o.0.add(j) = (g.dot)(cols, row, a) };
                    }
                }
                return;
            }
        };
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if simd {
            // SAFETY: `simd` is only set when the CPU has the kernel's
            // instructions; rows hold `cols / 32` blocks of the matrix's type
            // / of BlockQ8; every output has room for `nrows` values.
            unsafe { simd_gemm(own, w, row_bytes, nrows, acts, outs) };
            return;
        }
        let _ = (simd, cols);
        for (a, o) in acts.iter().zip(outs) {
            for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                // SAFETY: every output has room for `nrows` values (the caller's
                // contract), and j < nrows.
                unsafe { *o.0.add(j) = own_dot_scalar(own, row, a) };
            }
        }
    }
}

/// Runs `$body` with the const `$t` = the discriminant of weight type `$w`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! with_type {
    ($w:expr, $t:ident => $body:expr) => {
        with_type!(@arms $w, $t, $body; Q4_0 Q4_1 Q5_0 Q5_1 Q8_0)
    };
    (@arms $w:expr, $t:ident, $body:expr; $($v:ident)*) => {
        match $w {
            $(WeightType::$v => {
                const $t: u8 = WeightType::$v as u8;
                $body
            })*
        }
    };
}

/// The row-layout kernel of this CPU's SIMD (`gemm::<T, R>`: rows in GGUF's layout).
#[cfg(target_arch = "x86_64")]
use avx2 as row_simd;
#[cfg(target_arch = "aarch64")]
use neon as row_simd;

/// [`row_simd`]'s `gemm` for weight type `t`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
/// # Safety
/// The CPU has what [`row_simd`] needs (checked by `simd_available`), each
/// activation row holds the blocks of one weight row, and each output has
/// room for `nrows` values.
unsafe fn simd_gemm(t: WeightType, w: &[u8], row_bytes: usize, nrows: usize, acts: &[&[u8]], outs: &[OutPtr]) {
    let a = |i: usize| acts[i].as_ptr().cast::<BlockQ8>();
    let o = |i: usize| outs[i].0;
    let (w, bsize) = (w.as_ptr(), t.block_bytes());
    with_type!(t, T => with_rows!(acts.len(), R => row_simd::gemm::<T, R>(w, row_bytes, nrows, bsize, std::array::from_fn(a), std::array::from_fn(o)); 1 2 3 4))
}

/// [`avx2::gemm_groups`] (its AVX-512 VNNI form with `vnni`) for weight type `t`.
///
/// # Safety
/// As `avx2::gemm_groups`: `w` starts at whole groups of `t`, and the CPU
/// has AVX2 (interleaved matrices exist only where it does).
unsafe fn avx2_groups(t: WeightType, vnni: bool, w: &[u8], nb: usize, groups: usize, acts: &[&[u8]], outs: &[OutPtr]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(w.len() >= groups * nb * repack::layout(t as u8).bytes);
        let a = |i: usize| acts[i].as_ptr().cast::<BlockQ8>();
        let o = |i: usize| outs[i].0;
        let w = w.as_ptr();
        with_type!(t, T => with_rows!(acts.len(), R => {
            let (a, o) = (std::array::from_fn(a), std::array::from_fn(o));
            if vnni {
                avx2::gemm_groups_vnni::<T, R>(w, nb, groups, a, o)
            } else {
                avx2::gemm_groups::<T, R>(w, nb, groups, a, o)
            }
        }; 1 2 3 4 5 6 7 8))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, vnni, w, nb, groups, acts, outs);
        unreachable!("interleaved matrices exist only where the SIMD kernels do")
    }
}

/// [`avx2::k::gemm_groups`] (its AVX-512 VNNI form with `vnni`) for K-quant `k`.
///
/// # Safety
/// As `avx2::k::gemm_groups`: `w` starts at whole groups, and the CPU has
/// AVX2 (interleaved matrices exist only where it does).
unsafe fn avx2_k_groups(k: KQuant, vnni: bool, w: &[u8], nb: usize, groups: usize, acts: &[&[u8]], outs: &[OutPtr]) {
    assert!(w.len() >= groups * nb * repack::k_bytes(k as u8));
    #[cfg(target_arch = "x86_64")]
    {
        let a = |i: usize| acts[i].as_ptr().cast::<blocks::BlockQ8K>();
        let o = |i: usize| outs[i].0;
        let w = w.as_ptr();
        macro_rules! run {
            ($t:expr) => {{
                const T: u8 = $t as u8;
                with_rows!(acts.len(), R => {
                    let (a, o) = (std::array::from_fn(a), std::array::from_fn(o));
                    if vnni {
                        avx2::k::gemm_groups_vnni::<T, R>(w, nb, groups, a, o)
                    } else {
                        avx2::k::gemm_groups::<T, R>(w, nb, groups, a, o)
                    }
                }; 1 2 3 4 5 6 7 8)
            }};
        }
        match k {
            KQuant::Q4K => run!(KQuant::Q4K),
            KQuant::Q5K => run!(KQuant::Q5K),
            KQuant::Q6K => run!(KQuant::Q6K),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, vnni, nb, groups, acts, outs);
        unreachable!("interleaved matrices exist only where the SIMD kernels do")
    }
}

/// The K-quant type `B` ([`KQuant`] `T`) on our SIMD kernel and
/// activation quantizer where the CPU has them (bit-identical to candle's,
/// so matrices of Q2_K/Q3_K share the rows), else candle's.
fn k_fns<B: GgmlType, const T: u8>(simd: bool) -> GgmlFns {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where the CPU has AVX2/FMA/F16C.
        let quantize: fn(&[f32], &mut [u8]) = |x, out| unsafe { avx2::quantize_q8k(x, cast_mut(out)) };
        return GgmlFns { gemm: k_gemm::<T>(simd), quantize, ..ggml_fns::<B>() };
    }
    GgmlFns { gemm: k_gemm::<T>(simd), ..ggml_fns::<B>() }
}

/// Our multi-row AVX2 kernel for K-quant `T` (over ggml's Q8_K
/// activations), where the CPU has it.
fn k_gemm<const T: u8>(simd: bool) -> Option<GemmFn> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return Some(avx2_k_gemm::<T>);
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
/// # Safety
/// As [`simd_gemm`], for the K-quant type `T` and Q8_K activation rows.
unsafe fn avx2_k_gemm<const T: u8>(w: &[u8], row_bytes: usize, acts: &[&[u8]], outs: &[OutPtr]) {
    let a = |i: usize| acts[i].as_ptr().cast::<blocks::BlockQ8K>();
    let o = |i: usize| outs[i].0;
    let nrows = w.len() / row_bytes;
    with_rows!(acts.len(), R => avx2::k::gemm::<T, R>(w.as_ptr(), row_bytes, nrows, std::array::from_fn(a), std::array::from_fn(o)); 1 2 3 4 5 6 7 8)
}

/// Our AVX2+F16C f16 dot product where the CPU has it (candle's is scalar).
fn f16_dot(simd: bool) -> Option<DotFn> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: chosen only where the CPU has AVX2/FMA/F16C; both rows hold `cols` f16 values (asserted inside).
        return Some(|cols, w, a| unsafe { avx2::dot_f16(cols, cast(w), cast(a)) });
    }
    let _ = simd;
    None
}

/// Attention scores `out[i][p] = scale · q_i · K[p]` of the query heads in
/// `q` (`[heads, d]`) against the rows of `k`; `out` is `[heads, n]`. On
/// this CPU's fastest path, which reads each cache row once for all heads.
pub(crate) fn attention_scores(q: &[f32], d: usize, k: &[half::f16], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() && d.is_multiple_of(8) {
        // SAFETY: checked above; the shapes are asserted inside.
        return unsafe { avx2::scores(q, d, k, scale, out) };
    }
    let n = out.len() / (q.len() / d);
    for (qh, out) in q.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
        for (s, kr) in out.iter_mut().zip(k.chunks_exact(d)) {
            *s = ops::dot(qh, kr) * scale;
        }
    }
}

/// `ops` functions compiled a second time with AVX2 enabled (their bodies
/// are `#[inline(always)]`, so the compiler vectorizes them again inside a
/// `target_feature` wrapper), the wrapper chosen at run time where the CPU
/// has it. The same source either way: only the instructions differ.
macro_rules! vectorized {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                // SAFETY (of calling it): only where `simd_available()` said the
                // CPU has AVX2, FMA and F16C.
                unsafe fn simd($($arg: $ty),*) {
                    ops::$name($($arg),*)
                }
                if simd_available() {
                    // SAFETY: checked just above.
                    return unsafe { simd($($arg),*) };
                }
            }
            ops::$name($($arg),*)
        }
    )*};
}

vectorized! {
    /// [`ops::softmax`] on this CPU's vectors.
    softmax(x: &mut [f32]);
    /// [`ops::exp_shifted`] on this CPU's vectors.
    exp_shifted(x: &mut [f32], ml: &mut [f32]);
    /// [`ops::silu_mul`] on this CPU's vectors.
    silu_mul(g: &mut [f32], u: &[f32]);
    /// [`ops::gelu_mul`] on this CPU's vectors.
    gelu_mul(g: &mut [f32], u: &[f32]);
    /// [`ops::gelu`] on this CPU's vectors.
    gelu(x: &mut [f32]);
    /// [`ops::layer_norm`] on this CPU's vectors.
    layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]);
    /// [`ops::rms_norm`] on this CPU's vectors.
    rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]);
    /// [`ops::rope`] on this CPU's vectors.
    rope(x: &mut [f32], heads: usize, head_dim: usize, pos: usize, r: ops::Rotation);
}

/// `out[i] = Σ_p probs[i][p] · V[p]` for the heads of `probs` (`[heads, n]`)
/// and `out` (`[heads, d]`), on this CPU's fastest path.
pub(crate) fn weighted_sum(probs: &[f32], d: usize, v: &[half::f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() && d.is_multiple_of(8) {
        // SAFETY: checked above (AVX-512 where `vnni()`); the shapes are asserted inside.
        return unsafe {
            if vnni() {
                avx2::weighted_sum_wide(probs, d, v, out)
            } else {
                avx2::weighted_sum(probs, d, v, out)
            }
        };
    }
    let n = probs.len() / (out.len() / d);
    out.fill(0.0);
    for (probs, out) in probs.chunks_exact(n).zip(out.chunks_exact_mut(d)) {
        for (&p, vr) in probs.iter().zip(v.chunks_exact(d)) {
            for (o, &x) in out.iter_mut().zip(vr) {
                *o += p * x.to_f32();
            }
        }
    }
}

/// Whether this CPU runs our SIMD kernels: AVX2 + FMA + F16C on x86-64
/// (detected once), NEON on aarch64 (always there).
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(avx2::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        cfg!(target_arch = "aarch64")
    }
}

/// Whether the interleaved kernels run in their AVX-512 VNNI form, and
/// attention's value sums with AVX-512's registers: where the CPU has it,
/// unless `SOLLOL_KERNELS=avx2` asks for the AVX2 forms (to compare the two
/// on one machine). Both give the same results bit for bit.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| avx2::vnni_available() && std::env::var("SOLLOL_KERNELS").map_or(true, |k| k != "avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The name of the instruction set the own kernels use on this CPU.
pub fn isa() -> &'static str {
    match (simd_available(), cfg!(target_arch = "aarch64")) {
        (true, true) => "neon",
        (true, false) if vnni() => "avx512-vnni",
        (true, false) => "avx2",
        (false, _) => "scalar",
    }
}

/// A 2-D weight `[rows, cols]` in its GGUF type, `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Rows `0..grouped` are interleaved in groups of eight ([`repack`]),
    /// the rest in GGUF's layout after them.
    grouped: usize,
    data: Weights,
    kernel: Kernel,
}

/// A matrix's bytes: its own buffer, or the blocks of the CPU `QTensor` it
/// was made from, used in place (no copy, so a load never holds a weight twice).
#[derive(Debug, Clone)]
enum Weights {
    Owned(Aligned),
    Shared { _tensor: Arc<QTensor>, ptr: *const u8, len: usize },
}

// SAFETY: `Shared` points into the storage of a `QTensor` (Send + Sync) that
// it keeps alive and that nothing mutates.
unsafe impl Send for Weights {}
unsafe impl Sync for Weights {}

impl Weights {
    fn bytes(&self) -> &[u8] {
        match self {
            Weights::Owned(a) => a.bytes(),
            // SAFETY: `ptr`/`len` are the bytes of the candle tensor this value
            // keeps alive (`_tensor`), never written while shared.
            Weights::Shared { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl QMatrix {
    /// The kernel and row size for rows of `cols` values of `dtype`; `None`
    /// for a type no kernel here handles or a width not whole blocks.
    fn kernel_for(dtype: GgmlDType, cols: usize, simd: bool) -> Option<(Kernel, usize)> {
        let kernel = Kernel::for_type(dtype, simd)?;
        let bs = dtype.block_size();
        cols.is_multiple_of(bs).then(|| (kernel, cols / bs * dtype.type_size()))
    }

    /// A 2-D CPU `QTensor`'s blocks, used in place; `None` for a type no
    /// kernel here handles (or a tensor not on the CPU).
    /// A 3-D stack of matrices (experts) is their rows one after the other.
    pub fn from_qtensor(q: &Arc<QTensor>) -> candle_core::Result<Option<Self>> {
        let dims = q.shape().dims();
        let (rows, cols) = match *dims {
            [rows, cols] => (rows, cols),
            [n, rows, cols] => (n * rows, cols),
            _ => return Ok(None),
        };
        let dtype = q.dtype();
        let Some((kernel, row_bytes)) = Self::kernel_for(dtype, cols, true) else { return Ok(None) };
        let (ptr, len) = match q.data()? {
            std::borrow::Cow::Borrowed(b) => (b.as_ptr(), b.len()),
            std::borrow::Cow::Owned(_) => return Ok(None),
        };
        // The block structs need their alignment (2 for the f16 scales).
        if len != rows * row_bytes || !(ptr as usize).is_multiple_of(2) {
            return Ok(None);
        }
        let shared = Weights::Shared { _tensor: q.clone(), ptr, len };
        Ok(Some(Self { dtype, rows, cols, row_bytes, grouped: 0, data: shared, kernel }))
    }

    /// `bytes` are `rows` rows of `cols` values of type `dtype`, as in GGUF.
    /// `simd: false` forces the scalar reference (for tests).
    pub fn from_bytes(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8], simd: bool) -> Option<Self> {
        let (kernel, row_bytes) = Self::kernel_for(dtype, cols, simd)?;
        if bytes.len() != rows * row_bytes {
            return None;
        }
        let mut data = Aligned::zeroed(bytes.len());
        data.bytes_mut().copy_from_slice(bytes);
        Some(Self { dtype, rows, cols, row_bytes, grouped: 0, data: Weights::Owned(data), kernel })
    }

    /// `rows` rows of `cols` values of `dtype` read from `r` (GGUF layout)
    /// straight into the matrix's own buffer, which [`Self::interleaved`]
    /// then rearranges in place: a load holds each weight once. `Ok(None)`
    /// for a type no kernel here handles.
    pub fn read_from(dtype: GgmlDType, rows: usize, cols: usize, r: &mut impl std::io::Read) -> std::io::Result<Option<Self>> {
        let Some((kernel, row_bytes)) = Self::kernel_for(dtype, cols, true) else { return Ok(None) };
        let mut data = Aligned::zeroed(rows * row_bytes);
        r.read_exact(data.bytes_mut())?;
        Ok(Some(Self { dtype, rows, cols, row_bytes, grouped: 0, data: Weights::Owned(data), kernel }))
    }

    /// Rows `start..start + len` as a matrix of their own (a fused tensor's
    /// parts); `None` once interleaved, whose rows are no longer contiguous.
    pub fn rows_range(&self, start: usize, len: usize) -> Option<Self> {
        if self.grouped > 0 || start + len > self.rows {
            return None;
        }
        Self::from_bytes(self.dtype, len, self.cols, &self.data.bytes()[start * self.row_bytes..(start + len) * self.row_bytes], true)
    }

    /// This matrix laid out for products: its whole groups of eight rows
    /// interleaved, where its kernel is one of ours on SIMD (which then reads
    /// eight rows at once); unchanged otherwise. Weights the matrix owns are
    /// rearranged in place; weights it shares with a candle tensor are copied
    /// first (dropping the tensor then frees the original). A matrix only
    /// looked up (an embedding table) is left as stored: no work at load.
    pub fn interleaved(self) -> Self {
        let Some(grouping) = self.grouping() else { return self };
        let grouped = self.rows / repack::ROWS * repack::ROWS;
        if grouped == 0 {
            return self;
        }
        let mut data = match self.data {
            Weights::Owned(a) => a,
            Weights::Shared { .. } => {
                let mut a = Aligned::zeroed(self.data.bytes().len());
                a.bytes_mut().copy_from_slice(self.data.bytes());
                a
            }
        };
        grouping.interleave(data.bytes_mut(), self.rows, self.row_bytes);
        Self { grouped, data: Weights::Owned(data), ..self }
    }

    /// The group layout this matrix takes when interleaved: where there is
    /// an AVX2 group kernel for its type (NEON reads GGUF's layout).
    fn grouping(&self) -> Option<Grouping> {
        if !cfg!(target_arch = "x86_64") {
            return None;
        }
        match self.kernel {
            Kernel::Own { t, simd: true } => Some(Grouping::Own(t)),
            Kernel::Ggml(GgmlFns { gemm: Some(_), .. }) => KQuant::from_ggml(self.dtype).map(Grouping::K),
            _ => None,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn size_in_bytes(&self) -> usize {
        self.data.bytes().len()
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bytes = self.data.bytes();
        if r >= self.grouped {
            return self.kernel.dequantize(&bytes[r * self.row_bytes..(r + 1) * self.row_bytes], out);
        }
        let grouping = self.grouping().expect("only matrices with a group layout are interleaved");
        let group = &bytes[r / repack::ROWS * repack::ROWS * self.row_bytes..][..repack::ROWS * self.row_bytes];
        // One GGUF block at a time, in an 8-byte-aligned buffer the block structs can view.
        let mut buf = [0u64; 32];
        let bsize = self.dtype.type_size();
        assert!(bsize <= 8 * buf.len());
        for (b, o) in out.chunks_exact_mut(self.dtype.block_size()).enumerate() {
            // SAFETY: u64 storage viewed as bytes, within its size (asserted).
            let block = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), bsize) };
            grouping.original_block(group, r % repack::ROWS, b, block);
            self.kernel.dequantize(block, o);
        }
    }

    /// Activation rows [`Self::gemm_rows`] takes at once.
    fn act_rows_per_call(&self) -> usize {
        if self.grouped > 0 {
            GROUP_KERNEL_ROWS
        } else {
            self.kernel.max_rows()
        }
    }

    /// `outs[i][j - start] = W[j] · acts[i]` for weight rows `start..end`
    /// (`start` a multiple of 8) and up to [`Self::act_rows_per_call`]
    /// activation rows.
    fn gemm_rows(&self, start: usize, end: usize, acts: &[&[u8]], outs: &[OutPtr]) {
        assert!(start.is_multiple_of(repack::ROWS) && end <= self.rows);
        let grouped_end = end.min(self.grouped).max(start);
        if start < grouped_end {
            // `grouped` is a multiple of 8, so start..grouped_end is whole groups.
            let w = &self.data.bytes()[start * self.row_bytes..grouped_end * self.row_bytes];
            let (nb, groups) = (self.cols / self.dtype.block_size(), (grouped_end - start) / repack::ROWS);
            // SAFETY: each output has room for end - start values; the CPU has
            // AVX2 (only then are matrices interleaved), and AVX-512 VNNI where `vnni()`.
            match self.grouping().expect("only matrices with a group layout are interleaved") {
                Grouping::Own(t) => unsafe { avx2_groups(t, vnni(), w, nb, groups, acts, outs) },
                Grouping::K(k) => unsafe { avx2_k_groups(k, vnni(), w, nb, groups, acts, outs) },
            }
        }
        if grouped_end < end {
            let w = &self.data.bytes()[grouped_end * self.row_bytes..end * self.row_bytes];
            let per_call = self.kernel.max_rows();
            for (a, o) in acts.chunks(per_call).zip(outs.chunks(per_call)) {
                // SAFETY (offsets): each output has room for end - start values.
                let o: [OutPtr; GROUP_KERNEL_ROWS] =
                    std::array::from_fn(|i| SendPtr(unsafe { o[i.min(o.len() - 1)].0.add(grouped_end - start) }));
                self.kernel.gemm(self.cols, w, self.row_bytes, a, &o[..a.len()]);
            }
        }
    }

    /// Whether activations quantized for `other` serve this matrix too.
    pub fn shares_acts(&self, other: &QMatrix) -> bool {
        self.cols == other.cols && self.kernel.acts() == other.kernel.acts()
    }
}

/// Activation rows quantized for a kind of matrix; the buffer is reused
/// from step to step.
#[derive(Debug, Default)]
pub struct QActs {
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Aligned,
    kind: Option<ActKind>,
}

impl QActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x` (`rows × w.cols()`, row-major) the way `w` needs it.
    pub fn quantize_for(&mut self, w: &QMatrix, x: &[f32]) {
        let cols = w.cols;
        let rows = self.shape_for(w, x.len());
        let (data, row_bytes) = (SendPtr(self.data.bytes_mut().as_mut_ptr()), self.row_bytes);
        // SAFETY: row r of the buffer, written by this call only.
        let quantize = |r: usize| w.kernel.quantize(&x[r * cols..(r + 1) * cols], unsafe { data.slice(r * row_bytes, row_bytes) });
        for_rows(rows, &quantize);
    }

    /// Runs `prep(r, row)` on every row of `x` (in place), then quantizes
    /// it as [`Self::quantize_for`] does, each row in one go on one thread:
    /// the per-row work between two products (a norm, the SwiGLU gate) runs
    /// in the same parallel region as the quantization instead of alone.
    pub fn prepare_and_quantize_for(&mut self, w: &QMatrix, x: &mut [f32], prep: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        quantize_all(&mut [Quantize { acts: self, w, x }], &|_, r, row| prep(r, row));
    }

    /// Sized and labelled for `len` values of activations for `w`: its rows.
    fn shape_for(&mut self, w: &QMatrix, len: usize) -> usize {
        let cols = w.cols;
        assert_eq!(len % cols, 0, "activations are not whole rows of {cols}");
        let rows = len / cols;
        self.row_bytes = w.kernel.act_row_bytes(cols);
        self.data.resize(rows * self.row_bytes);
        self.rows = rows;
        self.cols = cols;
        self.kind = Some(w.kernel.acts());
        rows
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// `f(r)` for rows `0..rows`: a batch's rows in parallel (on one thread,
/// quantizing them is a step's longest stretch of work outside the
/// products), a single row on the caller's thread.
fn for_rows(rows: usize, f: &(dyn Fn(usize) + Sync)) {
    if rows > 1 {
        let pool = pool();
        pool.run(&|t| (t..rows).step_by(pool.threads()).for_each(f));
    } else {
        (0..rows).for_each(f);
    }
}

/// One quantization of [`quantize_all`]: the rows of `x` into `acts`, the
/// way `w` needs them.
pub struct Quantize<'a> {
    pub acts: &'a mut QActs,
    pub w: &'a QMatrix,
    pub x: &'a mut [f32],
}

/// Several quantizations in one parallel region, row by row, each row first
/// prepared in place by `prep(job, row index, row)`: a mixture's experts
/// each quantize their own rows, and a region each would cost more than the
/// work in a batched step.
pub fn quantize_all(jobs: &mut [Quantize], prep: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) {
    // Each job's buffers sized first, then only written through pointers.
    struct Rows<'a> {
        w: &'a QMatrix,
        x: SendPtr<f32>,
        out: SendPtr<u8>,
        cols: usize,
        row_bytes: usize,
        first: usize,
    }
    // On the stack: every down product of a dense model comes through here.
    assert!(jobs.len() <= MAX_MATS, "at most {MAX_MATS} quantizations per region");
    let mut plan: [Option<Rows>; MAX_MATS] = std::array::from_fn(|_| None);
    let mut total = 0;
    for (slot, j) in plan.iter_mut().zip(jobs.iter_mut()) {
        let rows = j.acts.shape_for(j.w, j.x.len());
        let (x, out) = (SendPtr(j.x.as_mut_ptr()), SendPtr(j.acts.data.bytes_mut().as_mut_ptr()));
        *slot = Some(Rows { w: j.w, x, out, cols: j.w.cols, row_bytes: j.acts.row_bytes, first: total });
        total += rows;
    }
    let plan = &plan[..jobs.len()];
    for_rows(total, &|index| {
        let i = plan.partition_point(|p| p.as_ref().is_some_and(|p| p.first <= index)) - 1;
        let Some(p) = &plan[i] else { unreachable!("every job's slot is filled") };
        let r = index - p.first;
        // SAFETY: row r of job i's input and output, touched by this call only.
        let (row, out) = unsafe { (p.x.slice(r * p.cols, p.cols), p.out.slice(r * p.row_bytes, p.row_bytes)) };
        prep(i, r, row);
        p.w.kernel.quantize(row, out);
    });
}

/// A buffer shared by the pool's threads, which write disjoint parts of it.
#[derive(Debug)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: the pool's tasks write disjoint parts of the buffer (each user
// says which), and the buffer outlives the parallel region.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// `len` values from `offset` on.
    ///
    /// # Safety
    /// They lie inside the buffer, and no other thread touches them while
    /// the slice lives.
    pub(crate) unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }

    /// `len` values from `offset` on, to read.
    ///
    /// # Safety
    /// They lie inside the buffer, and no thread writes them while the slice lives.
    pub(crate) unsafe fn read<'a>(self, offset: usize, len: usize) -> &'a [T] {
        unsafe { std::slice::from_raw_parts(self.0.add(offset), len) }
    }
}

/// An output pointer: the threads write disjoint columns.
type OutPtr = SendPtr<f32>;

/// Products one parallel region serves: eight experts' gates and ups.
pub const MAX_MATS: usize = 16;

/// Weight rows per tile: small enough to stay in L1 while every group of
/// activation rows passes over them, so prefill reads activations from
/// cache 16× less often than row by row.
const TILE_ROWS: usize = 16;
// Tiles start on interleaved groups.
const _: () = assert!(TILE_ROWS.is_multiple_of(repack::ROWS));

/// `outs[i] = acts · matsᵢᵀ` (`[acts.rows, matsᵢ.rows]` row-major) for
/// matrices that read the same activations, in one parallel region: the
/// weight rows of all of them are split evenly over the pool's threads, and
/// each weight row is read once for all activation rows.
pub fn matmul(mats: &[&QMatrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    matmul_in(pool(), mats, acts, outs)
}

fn matmul_in(pool: &pool::Pool, mats: &[&QMatrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    assert!((1..=MAX_MATS).contains(&mats.len()), "one to {MAX_MATS} matrices per region");
    let products: [(&QMatrix, &QActs); MAX_MATS] = std::array::from_fn(|i| (mats[i.min(mats.len() - 1)], acts));
    products_in(pool, &products[..mats.len()], outs)
}

/// `outs[i] = actsᵢ · matᵢᵀ` for products of different activations, in one
/// parallel region: a mixture's experts, each over its own rows, take one
/// region for all of them instead of one each, since a region's start and
/// its threads' claims cost about as much as reading a small expert.
pub fn matmul_products(products: &[(&QMatrix, &QActs)], outs: &mut [&mut [f32]]) {
    products_in(pool(), products, outs)
}

fn products_in(pool: &pool::Pool, products: &[(&QMatrix, &QActs)], outs: &mut [&mut [f32]]) {
    assert_eq!(products.len(), outs.len());
    assert!(products.len() <= MAX_MATS, "at most {MAX_MATS} products per region");
    for (&(m, acts), o) in products.iter().zip(outs.iter()) {
        assert_eq!(acts.kind, Some(m.kernel.acts()), "activations quantized for another kind of matrix");
        assert_eq!(m.cols, acts.cols);
        assert_eq!(o.len(), acts.rows * m.rows, "output is not [rows, out_features]");
    }
    let mut ptrs = [SendPtr(std::ptr::null_mut()); MAX_MATS];
    let mut tiles = [0usize; MAX_MATS];
    for ((ptr, t), (&(m, _), o)) in ptrs.iter_mut().zip(tiles.iter_mut()).zip(products.iter().zip(outs.iter_mut())) {
        *ptr = SendPtr(o.as_mut_ptr());
        *t = m.rows.div_ceil(TILE_ROWS);
    }
    let total: usize = tiles.iter().sum();
    let next = std::sync::atomic::AtomicUsize::new(0);
    // One pass over the weights for every activation row (a decode step).
    let one_pass = |&(m, acts): &(&QMatrix, &QActs)| acts.rows <= m.act_rows_per_call();
    // A decode step's tiles are one pass over their weights each, cheap
    // enough that claiming them one by one costs more than an uneven end;
    // a prefill's tiles each pass every activation row.
    let min_claim = if products.iter().all(one_pass) { 4 } else { 1 };
    // Weight rows start..end of product `i` against every activation row.
    let rows = |i: usize, start: usize, end: usize| {
        let ((m, acts), out) = (products[i], ptrs[i]);
        let n = acts.rows;
        let mut r = 0;
        while r < n {
            let k = (n - r).min(m.act_rows_per_call());
            let a: [&[u8]; GROUP_KERNEL_ROWS] = std::array::from_fn(|j| acts.row(r + j.min(k - 1)));
            // SAFETY: rows start..end of the product's output are this claim's alone.
            let o: [OutPtr; GROUP_KERNEL_ROWS] =
                std::array::from_fn(|j| SendPtr(unsafe { out.0.add((r + j.min(k - 1)) * m.rows + start) }));
            m.gemm_rows(start, end, &a[..k], &o[..k]);
            r += k;
        }
    };
    pool.run(&|_| {
        while let Some(claimed) = guided_claim(&next, total, pool.threads(), min_claim) {
            // The claim's tiles, product by product.
            let mut base = 0;
            for (i, &count) in tiles[..products.len()].iter().enumerate() {
                let (first, last) = (claimed.start.max(base) - base, claimed.end.min(base + count).saturating_sub(base));
                base += count;
                let end = |tile: usize| (tile * TILE_ROWS).min(products[i].0.rows);
                if first >= last {
                    continue;
                }
                if one_pass(&products[i]) {
                    // One pass over the weights (a decode step): the claim's
                    // tiles in one call, which pays the call's setup once.
                    rows(i, first * TILE_ROWS, end(last));
                } else {
                    // Several passes (prefill): tile by tile, so that a tile
                    // stays in L1 while every group of activation rows passes.
                    (first..last).for_each(|t| rows(i, t * TILE_ROWS, end(t + 1)));
                }
            }
        }
    });
}

/// The next tiles for one thread out of `0..total`, or `None` when all are taken.
///
/// Tiles are handed out from a shared counter rather than split evenly up
/// front: on a shared machine one core is often slower than the other, and
/// an even split then waits for it. Claims shrink with the work left (a
/// share of it per thread and one more, down to `min` tiles), so the
/// threads finish within about `min` tiles of each other. Each claim moves
/// the counter's cache line between cores and starts a new weight stream,
/// which in a decode step's region of a megabyte cost about 4 µs with
/// claims of a quarter of the rest down to single tiles; a third down to
/// four tiles costs about 2 µs.
fn guided_claim(next: &std::sync::atomic::AtomicUsize, total: usize, threads: usize, min: usize) -> Option<std::ops::Range<usize>> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut first = next.load(Relaxed);
    loop {
        if first >= total {
            return None;
        }
        let end = (first + ((total - first) / (threads + 1)).max(min)).min(total);
        match next.compare_exchange_weak(first, end, Relaxed, Relaxed) {
            Ok(_) => return Some(first..end),
            Err(seen) => first = seen,
        }
    }
}

#[cfg(test)]
mod tests;
