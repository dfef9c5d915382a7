//! The device kernels (`kernels/cuda/decode.cu`): their names, the shapes
//! each one takes, its launch geometry and its arguments, in one place that
//! every way of running them shares: the CUDA device ([`cuda`], feature
//! `cuda`) and, in the unit tests, the host emulator (`kernels/emu`), which
//! runs the same sources with the same arguments on a machine without a GPU.
//!
//! Buffers are addresses ([`Arg::Ptr`]); 0 is null where a kernel takes an
//! optional input. Shapes a kernel does not handle are refused here with
//! [`Error::Kernel`], never launched.
//!
//! The device backend (`Backend::Device`, `model::gpu`) runs a slice on
//! them; it is off by default until a GPU has run them (see ARCHITECTURE.md).

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, unix))]
mod emu;
#[cfg(all(test, unix))]
pub(crate) mod tests;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Bytes of one block of quantized activations (`q8a`: f32 scale, f32 sum, 32 × i8).
pub const Q8A_BYTES: usize = 40;
/// Activation rows one product pass carries (`MAX_ROWS`); more are launched in groups.
pub const MAX_ROWS: usize = 8;
/// The largest head the attention kernel takes (`HEAD_DIM_MAX`).
pub const HEAD_DIM_MAX: usize = 256;
/// Threads of a product's block: four warps, one output row each.
const ROWS_PER_BLOCK: u32 = 4;

/// A weight type the device products read as GGUF stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    F16,
    F32,
}

impl DeviceType {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::F16 => Self::F16,
            GgmlDType::F32 => Self::F32,
            _ => return None,
        })
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }

    /// Values per block, and bytes per block.
    fn block(self) -> (usize, usize) {
        match self {
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
            Self::F16 => (8, 16),
            Self::F32 => (8, 32),
        }
    }

    pub fn row_bytes(self, cols: usize) -> usize {
        let (n, bytes) = self.block();
        cols / n * bytes
    }

    /// Whether activations go in as q8a blocks (else as f32).
    pub fn quantized(self) -> bool {
        !matches!(self, Self::F16 | Self::F32)
    }

    /// Bytes of `rows` activation rows of `cols` values as this type's products read them.
    pub fn act_bytes(self, rows: usize, cols: usize) -> usize {
        if self.quantized() {
            rows * cols / 32 * Q8A_BYTES
        } else {
            rows * cols * 4
        }
    }
}

/// A weight matrix in device memory, as GGUF stores it (f16 for F16).
#[derive(Debug)]
pub struct DeviceMatrix {
    pub ty: DeviceType,
    pub rows: usize,
    pub cols: usize,
    pub buf: DevBuf,
}

impl DeviceMatrix {
    /// Uploads `[rows, cols]` of type `ty` from their stored bytes; None
    /// where the products cannot take the columns.
    pub fn upload(kd: &dyn KernelDevice, ty: DeviceType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Option<Self>> {
        if (Product { ty, rows, cols, nb: 1 }).check("upload").is_err() {
            return Ok(None);
        }
        if bytes.len() != rows * ty.row_bytes(cols) {
            return Err(refuse("upload", format!("{} bytes for a [{rows}, {cols}] {ty:?} matrix", bytes.len())));
        }
        Ok(Some(Self { ty, rows, cols, buf: kd.upload(bytes)? }))
    }

    pub fn product(&self, nb: usize) -> Product {
        Product { ty: self.ty, rows: self.rows, cols: self.cols, nb }
    }
}

/// The gate function of a gated MLP, as `glu_*` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceGate {
    Silu = 0,
    GeluTanh = 1,
}

impl From<crate::model::Gate> for DeviceGate {
    fn from(g: crate::model::Gate) -> Self {
        match g {
            crate::model::Gate::Silu => Self::Silu,
            crate::model::Gate::GeluTanh => Self::GeluTanh,
        }
    }
}

/// One kernel parameter, as `cuLaunchKernel` takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// What runs a kernel by name: the CUDA device or the emulator.
pub trait Launcher {
    fn launch(&self, kernel: &str, geometry: Geometry, args: &[Arg]) -> Result<()>;
}

/// Device memory: its address, and the allocation that keeps it alive.
pub struct DevBuf {
    addr: u64,
    len: usize,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl DevBuf {
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address `offset` bytes in, checked against the allocation.
    fn at(&self, offset: usize, bytes: usize) -> Result<u64> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.len) {
            return Err(refuse("memory", format!("{bytes} bytes at {offset} of a buffer of {}", self.len)));
        }
        Ok(self.addr + offset as u64)
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.addr, self.len)
    }
}

/// A device the kernels run on: launches, and memory in [`DevBuf`]s.
/// Launches and copies run in order; `read` waits for what came before it.
pub trait KernelDevice: Launcher + Send + Sync + std::fmt::Debug {
    /// `bytes` of zeroed memory.
    fn alloc(&self, bytes: usize) -> Result<DevBuf>;
    /// Copies `bytes` to the address `dst` (of a live buffer, bounds checked by the caller).
    fn write_at(&self, dst: u64, bytes: &[u8]) -> Result<()>;
    fn read_at(&self, src: u64, out: &mut [u8]) -> Result<()>;
    fn copy_at(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Records launches and device-to-device copies from here on instead of
    /// running them (copies to or from the host fail while recording).
    fn begin_capture(&self) -> Result<()>;
    /// Stops recording: what was recorded, to replay as one graph.
    fn end_capture(&self) -> Result<Graph>;
    /// Runs a recorded graph again (its launches read their buffers anew).
    fn replay(&self, graph: &Graph) -> Result<()>;
    /// `y[nb, rows] = x[nb, cols] · w[rows, cols]ᵀ`: f16 `x` and `w`, f32 `y`
    /// and arithmetic (cuBLAS on a GPU: its tensor cores for prefill).
    fn gemm(&self, g: Gemm) -> Result<()>;
}

/// The shapes and buffers of [`KernelDevice::gemm`].
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub rows: usize,
    pub cols: usize,
    pub nb: usize,
    pub w: u64,
    pub x: u64,
    pub y: u64,
}

/// Launches recorded once and replayed (a CUDA graph on a GPU); what it
/// holds is its device's own (read by the CUDA device and the emulator, the
/// devices a build without the `cuda` feature and its tests lacks).
pub struct Graph(#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))] Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl dyn KernelDevice + '_ {
    pub fn upload(&self, bytes: &[u8]) -> Result<DevBuf> {
        let b = self.alloc(bytes.len())?;
        self.write(&b, 0, bytes)?;
        Ok(b)
    }

    pub fn write(&self, dst: &DevBuf, offset: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_at(dst.at(offset, bytes.len())?, bytes)
    }

    pub fn read(&self, src: &DevBuf, offset: usize, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.read_at(src.at(offset, out.len())?, out)
    }

    pub fn copy(&self, dst: &DevBuf, dst_offset: usize, src: &DevBuf, src_offset: usize, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.copy_at(dst.at(dst_offset, bytes)?, src.at(src_offset, bytes)?, bytes)
    }

    /// A whole buffer's bytes.
    pub fn download(&self, src: &DevBuf) -> Result<Vec<u8>> {
        let mut out = vec![0; src.len()];
        self.read(src, 0, &mut out)?;
        Ok(out)
    }
}

/// Whether slices on a GPU run on these kernels (`SOLLOL_DEVICE_KERNELS=1`)
/// instead of candle's ops: off by default until a GPU has run them.
pub fn enabled() -> bool {
    std::env::var("SOLLOL_DEVICE_KERNELS").is_ok_and(|v| v == "1")
}

/// The kernels' device for a candle device: CUDA (feature `cuda`), or in the
/// unit tests the host emulator standing for one on the CPU.
pub fn kernel_device(d: &candle_core::Device) -> Result<std::sync::Arc<dyn KernelDevice>> {
    match d {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(c) => Ok(cuda::CudaKernels::shared(c)),
        #[cfg(all(test, unix))]
        candle_core::Device::Cpu => Ok(std::sync::Arc::new(emu::Emu::default())),
        other => Err(refuse("device", format!("the device kernels do not run on {other:?}"))),
    }
}

fn refuse(kernel: &str, reason: impl Into<String>) -> Error {
    Error::Kernel { kernel: kernel.to_string(), reason: reason.into() }
}

fn int(kernel: &str, v: usize) -> Result<Arg> {
    i32::try_from(v).map(Arg::I32).map_err(|_| refuse(kernel, format!("{v} does not fit the kernel's int")))
}

fn count(kernel: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| refuse(kernel, format!("a grid of {v} blocks")))
}

/// `y = norm(x)·w (+ residual)` over `rows` rows of `n` values: written as
/// f32 to `y` and/or as q8a blocks to `yq` (0 for neither), `w` 0 for no
/// weight. `y` may be `x` or `residual`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(l: &dyn Launcher, x: u64, w: u64, residual: u64, y: u64, yq: u64, rows: usize, n: usize, eps: f32) -> Result<()> {
    const K: &str = "rmsnorm";
    if n == 0 || !n.is_multiple_of(32) {
        return Err(refuse(K, format!("{n} values a row: a multiple of 32 is needed")));
    }
    let threads = n.min(256) as u32;
    let g = Geometry { grid: [count(K, rows)?, 1, 1], block: [threads, 1, 1] };
    let args = [Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(residual), Arg::Ptr(y), Arg::Ptr(yq), int(K, n)?, Arg::F32(eps)];
    l.launch(K, g, &args)
}

/// An element-wise operation on f32 values (`rows_op`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowsOp {
    /// `a + b`
    Add,
    /// `a · s`
    Scale(f32),
    /// `f(a) · b`
    Gated(DeviceGate),
    /// GELU (tanh approximation) of `a`.
    Gelu,
    /// `0`
    Zero,
}

/// `y = op(a, b)` over `n` values; `y` may be `a` or `b`; `b` unused (0) by
/// `Scale` and `Gelu`.
pub fn rows_op(l: &dyn Launcher, op: RowsOp, a: u64, b: u64, y: u64, n: usize) -> Result<()> {
    const K: &str = "rows_op";
    let (code, s) = match op {
        RowsOp::Add => (0, 0.0),
        RowsOp::Scale(s) => (1, s),
        RowsOp::Gated(DeviceGate::Silu) => (2, 0.0),
        RowsOp::Gated(DeviceGate::GeluTanh) => (3, 0.0),
        RowsOp::Gelu => (4, 0.0),
        RowsOp::Zero => (5, 0.0),
    };
    let g = Geometry { grid: [count(K, n.div_ceil(256).clamp(1, 1024))?, 1, 1], block: [256, 1, 1] };
    l.launch(K, g, &[Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(y), int(K, n)?, Arg::I32(code), Arg::F32(s)])
}

/// Row `i` of `dst` = row `idx[i]` of `src` (i32 indices, `n` of them),
/// rows of `row_bytes` (a multiple of 4).
pub fn gather_rows(l: &dyn Launcher, src: u64, idx: u64, dst: u64, n: usize, row_bytes: usize) -> Result<()> {
    const K: &str = "gather_rows";
    if !row_bytes.is_multiple_of(4) {
        return Err(refuse(K, format!("rows of {row_bytes} bytes: whole 32-bit words are needed")));
    }
    let g = Geometry { grid: [count(K, n)?, 1, 1], block: [128, 1, 1] };
    l.launch(K, g, &[Arg::Ptr(src), Arg::Ptr(idx), Arg::Ptr(dst), int(K, row_bytes / 4)?])
}

/// `y[idx[i]] += w[i] · src[i]` for `n` rows of `width` f32; the indices
/// of one call distinct.
pub fn scatter_add(l: &dyn Launcher, y: u64, src: u64, idx: u64, w: u64, n: usize, width: usize) -> Result<()> {
    const K: &str = "scatter_add";
    let g = Geometry { grid: [count(K, n)?, 1, 1], block: [128, 1, 1] };
    l.launch(K, g, &[Arg::Ptr(y), Arg::Ptr(src), Arg::Ptr(idx), Arg::Ptr(w), int(K, width)?])
}

/// A whole `[rows, cols]` matrix of type `ty` as f16 (a GEMM's weights).
pub fn to_f16(l: &dyn Launcher, ty: DeviceType, w: u64, y: u64, rows: usize, cols: usize) -> Result<()> {
    let kernel = format!("to_f16_{}", ty.suffix());
    Product { ty, rows, cols, nb: 1 }.check(&kernel)?;
    let g = Geometry { grid: [count(&kernel, rows)?, 1, 1], block: [128, 1, 1] };
    l.launch(&kernel, g, &[Arg::Ptr(w), Arg::Ptr(y), int(&kernel, cols)?])
}

/// `n` f32 values as f16 (a GEMM's activations).
pub fn f32_to_f16(l: &dyn Launcher, x: u64, y: u64, n: usize) -> Result<()> {
    const K: &str = "f32_to_f16";
    let g = Geometry { grid: [count(K, n.div_ceil(256).clamp(1, 1024))?, 1, 1], block: [256, 1, 1] };
    l.launch(K, g, &[Arg::Ptr(x), Arg::Ptr(y), int(K, n)?])
}

/// `values` f32 (a multiple of 32) into q8a blocks.
pub fn quantize_q8(l: &dyn Launcher, x: u64, y: u64, values: usize) -> Result<()> {
    const K: &str = "quantize_q8";
    if !values.is_multiple_of(32) {
        return Err(refuse(K, format!("{values} values: a multiple of 32 is needed")));
    }
    let blocks = values / 32;
    let g = Geometry { grid: [count(K, blocks.div_ceil(8))?, 1, 1], block: [256, 1, 1] };
    l.launch(K, g, &[Arg::Ptr(x), Arg::Ptr(y), int(K, blocks)?])
}

/// The shapes of one product: a `[rows, cols]` weight of type `ty` times `nb`
/// activation rows.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub ty: DeviceType,
    pub rows: usize,
    pub cols: usize,
    pub nb: usize,
}

impl Product {
    fn check(&self, kernel: &str) -> Result<()> {
        let (n, _) = self.ty.block();
        let need = if self.ty.quantized() { n.max(32) } else { 8 };
        if self.cols == 0 || !self.cols.is_multiple_of(need) {
            return Err(refuse(kernel, format!("{} columns of {:?}: a multiple of {need} is needed", self.cols, self.ty)));
        }
        if self.rows == 0 {
            return Err(refuse(kernel, "no rows"));
        }
        Ok(())
    }

    /// Runs `kernel` over the activation rows in groups of [`MAX_ROWS`]:
    /// `args(x_offset, y_offset, group)` gives a group's arguments.
    fn launch_groups(&self, l: &dyn Launcher, kernel: &str, args: impl Fn(u64, u64, Arg) -> Vec<Arg>) -> Result<()> {
        self.check(kernel)?;
        let g = Geometry { grid: [count(kernel, self.rows.div_ceil(ROWS_PER_BLOCK as usize))?, 1, 1], block: [ROWS_PER_BLOCK * 32, 1, 1] };
        let mut start = 0;
        while start < self.nb {
            let group = (self.nb - start).min(MAX_ROWS);
            let x_off = self.ty.act_bytes(start, self.cols) as u64;
            let y_off = (start * self.rows * 4) as u64;
            l.launch(kernel, g, &args(x_off, y_off, int(kernel, group)?))?;
            start += group;
        }
        Ok(())
    }
}

fn offset(p: u64, by: u64) -> u64 {
    if p == 0 {
        0
    } else {
        p + by
    }
}

/// `y[r] = W·x[r] (+ residual[r])` for each activation row r: `x` q8a blocks
/// (f32 rows for F16 weights), `y` and `residual` `[nb, rows]` f32; `y` may
/// be `residual`.
pub fn matvec(l: &dyn Launcher, p: Product, w: u64, x: u64, y: u64, residual: u64) -> Result<()> {
    let kernel = format!("matvec_{}", p.ty.suffix());
    let (rows, cols) = (int(&kernel, p.rows)?, int(&kernel, p.cols)?);
    p.launch_groups(l, &kernel, |xo, yo, nb| {
        vec![Arg::Ptr(w), Arg::Ptr(x + xo), Arg::Ptr(y + yo), Arg::Ptr(offset(residual, yo)), rows, cols, nb]
    })
}

/// `y[r] = f(W_gate·x[r]) ⊙ (W_up·x[r])`, both products in one pass.
pub fn glu(l: &dyn Launcher, p: Product, gate: DeviceGate, wg: u64, wu: u64, x: u64, y: u64) -> Result<()> {
    let kernel = format!("glu_{}", p.ty.suffix());
    let (rows, cols) = (int(&kernel, p.rows)?, int(&kernel, p.cols)?);
    p.launch_groups(l, &kernel, |xo, yo, nb| {
        vec![Arg::Ptr(wg), Arg::Ptr(wu), Arg::Ptr(x + xo), Arg::Ptr(y + yo), rows, cols, nb, Arg::I32(gate as i32)]
    })
}

/// Rows `tokens[i]` (i32, `n` of them) of a `[vocab, cols]` embedding,
/// dequantized and multiplied by `scale`, into `y` `[n, cols]` f32.
#[allow(clippy::too_many_arguments)]
pub fn get_rows(l: &dyn Launcher, ty: DeviceType, w: u64, tokens: u64, y: u64, n: usize, cols: usize, scale: f32) -> Result<()> {
    let kernel = format!("get_rows_{}", ty.suffix());
    Product { ty, rows: 1, cols, nb: n }.check(&kernel)?;
    let g = Geometry { grid: [count(&kernel, n)?, 1, 1], block: [256, 1, 1] };
    l.launch(&kernel, g, &[Arg::Ptr(w), Arg::Ptr(tokens), Arg::Ptr(y), int(&kernel, cols)?, Arg::F32(scale)])
}

/// One layer's heads for [`rope_kv`] and [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn check(&self, kernel: &str) -> Result<()> {
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(refuse(kernel, format!("{} query heads over {} KV heads", self.n_heads, self.n_kv_heads)));
        }
        Ok(())
    }
}

/// Whether the attention kernel takes heads of `head_dim` values.
pub fn takes_heads(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && (32..=HEAD_DIM_MAX).contains(&head_dim)
}

/// The rotary tables and options of [`rope_kv`].
#[derive(Debug, Clone, Copy)]
pub struct RopeArgs {
    /// `[positions, rot / 2]` f32 each.
    pub cos: u64,
    pub sin: u64,
    /// Positions of the tables: every `pos` must be below it.
    pub positions: usize,
    pub rot: usize,
    /// Pairs (i, i + rot/2) instead of (2i, 2i + 1).
    pub neox: bool,
    /// Per-head RMSNorm weights of q and k (`head_dim` f32 each), or 0.
    pub q_norm: u64,
    pub k_norm: u64,
    pub eps: f32,
}

/// Per-row buffers of a step: the query/key/value projections `[nb, heads ·
/// head_dim]` f32, and per row (device arrays of `nb` entries) its session's
/// K and V caches of this layer (f16 `[capacity, n_kv_heads, head_dim]`)
/// and its position (i32).
#[derive(Debug, Clone, Copy)]
pub struct StepRows {
    pub nb: usize,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub k_caches: u64,
    pub v_caches: u64,
    pub positions: u64,
}

/// Normalizes (optionally) and rotates each query head in place and each
/// key head into its row's K cache at the row's position; copies V there.
pub fn rope_kv(l: &dyn Launcher, h: Heads, rows: &StepRows, r: &RopeArgs) -> Result<()> {
    const K: &str = "rope_kv";
    h.check(K)?;
    if !r.rot.is_multiple_of(2) || r.rot > h.head_dim {
        return Err(refuse(K, format!("rotating {} of {} values a head", r.rot, h.head_dim)));
    }
    let g = Geometry { grid: [count(K, h.n_heads + h.n_kv_heads)?, count(K, rows.nb)?, 1], block: [32, 1, 1] };
    let args = [
        Arg::Ptr(rows.q),
        Arg::Ptr(rows.k),
        Arg::Ptr(rows.v),
        Arg::Ptr(rows.k_caches),
        Arg::Ptr(rows.v_caches),
        Arg::Ptr(rows.positions),
        Arg::Ptr(r.cos),
        Arg::Ptr(r.sin),
        Arg::Ptr(r.q_norm),
        Arg::Ptr(r.k_norm),
        int(K, h.n_heads)?,
        int(K, h.n_kv_heads)?,
        int(K, h.head_dim)?,
        int(K, r.rot)?,
        Arg::I32(i32::from(r.neox)),
        Arg::F32(r.eps),
    ];
    l.launch(K, g, &args)
}

/// Decode attention of each row's query (`rows.q`, rotated) over positions
/// `[0, lens[r])` of its caches, the last `window` of them if given, into
/// `y` `[nb, n_heads · head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    /// i32 per row: positions cached, the new one included.
    pub lens: u64,
    /// The longest of them (sets how the context is split).
    pub max_len: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// f32 scratch of at least [`attention_scratch`] values.
    pub scratch: u64,
    pub y: u64,
}

/// Positions one block of `attn_split` takes. Fixed, so that a row's
/// result depends on its own context only, never on the rows batched with
/// it; a long context is many stretches, which fill a large GPU.
pub const ATTENTION_SPLIT: usize = 256;

/// f32 values of scratch [`attention`] needs.
pub fn attention_scratch(h: Heads, nb: usize, max_len: usize, split: usize) -> usize {
    nb * h.n_heads * max_len.max(1).div_ceil(split) * (h.head_dim + 2)
}

/// Flash-decoding: `attn_split` over stretches of `split` positions, then
/// `attn_combine`.
pub fn attention(l: &dyn Launcher, h: Heads, rows: &StepRows, a: &AttnArgs, split: usize) -> Result<()> {
    const K: &str = "attn_split";
    h.check(K)?;
    if !takes_heads(h.head_dim) {
        return Err(refuse(K, format!("heads of {}: a multiple of 32 up to {HEAD_DIM_MAX} is needed", h.head_dim)));
    }
    if split == 0 {
        return Err(refuse(K, "stretches of 0 positions"));
    }
    let splits = a.max_len.max(1).div_ceil(split);
    let g = Geometry { grid: [count(K, splits)?, count(K, h.n_heads)?, count(K, rows.nb)?], block: [128, 1, 1] };
    let window = a.window.map_or(Ok(Arg::I32(0)), |w| int(K, w))?;
    let args = [
        Arg::Ptr(rows.q),
        Arg::Ptr(rows.k_caches),
        Arg::Ptr(rows.v_caches),
        Arg::Ptr(a.lens),
        Arg::Ptr(a.scratch),
        int(K, h.n_heads)?,
        int(K, h.n_kv_heads)?,
        int(K, h.head_dim)?,
        int(K, split)?,
        Arg::F32(a.scale),
        window,
    ];
    l.launch(K, g, &args)?;
    const C: &str = "attn_combine";
    let g = Geometry { grid: [count(C, h.n_heads)?, count(C, rows.nb)?, 1], block: [32, 1, 1] };
    l.launch(C, g, &[Arg::Ptr(a.scratch), Arg::Ptr(a.y), int(C, h.n_heads)?, int(C, h.head_dim)?, int(C, splits)?])
}
