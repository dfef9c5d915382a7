//! The device backend: [`Ops`] as launches of our device kernels
//! (`kernels/cuda`, through [`crate::kernels::device`]) for a batch of
//! sessions, as the host backend runs them on the CPU.
//!
//! One call runs the rows of every item stacked (a decode token of one
//! session, a prefill chunk of another): each weight is read once per group
//! of up to eight rows, and each row attends to its own session's cache at
//! its own position, so a prefill chunk is rows of one item at successive
//! positions. Values are lazy where a launch gains by it: a norm is applied
//! by whatever reads it (`rmsnorm` writing the q8 blocks a product reads, or
//! adding a residual); a product is computed when read, in one launch with
//! what consumes it (`glu` of a gate and an up product of one input is one
//! `glu_*` launch; `add` of a product and a residual one `matvec_*`).
//!
//! Buffers come from a pool the slice keeps ([`DeviceState`]), so after the
//! first steps a step allocates nothing on the device; the small tables of
//! a step (positions, lengths, cache addresses per row and block) go up in
//! one copy, before its first launch. Norm weights and rotary tables are
//! uploaded once, on first use. A decode step is replayed as a graph once
//! its shape has been seen twice ([`run`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::host::{HostInput, Seg};
use super::kv_cache::KvCache;
use super::ops::{Act, Attention, Block, Experts, Gate, Ops};
use super::rope::RopeStyle;
use super::weights::{Embedding, Linear, Norm, Projections};
use crate::error::{Error, Result};
use crate::kernels::device::{self as dev, DevBuf, DeviceGate, DeviceMatrix, Graph, Heads, KernelDevice, RowsOp, StepRows};

/// A device slice's device and its buffers.
#[derive(Debug)]
pub(super) struct OnDevice {
    pub kd: Arc<dyn KernelDevice>,
    pub state: std::sync::Mutex<DeviceState>,
}

impl OnDevice {
    /// Decode steps are replayed as CUDA graphs unless `SOLLOL_DEVICE_GRAPHS=0`.
    pub fn new(kd: Arc<dyn KernelDevice>) -> Self {
        let graphs = std::env::var("SOLLOL_DEVICE_GRAPHS").map_or(true, |v| v != "0");
        Self { kd, state: std::sync::Mutex::new(DeviceState { graphs_on: graphs, ..Default::default() }) }
    }
}

/// Graphs kept per slice (one per decode shape in use); past it the least
/// used shape's goes, with its buffers.
const MAX_GRAPHS: usize = 16;

/// Captures of one shape that may fail (a buffer the capture would have to
/// allocate: the plain run after it allocates it) before the shape runs
/// without a graph.
const MAX_CAPTURE_FAILURES: u32 = 3;

/// A device slice's buffers and graphs between steps.
#[derive(Debug, Default)]
pub(super) struct DeviceState {
    /// Norm weights and rotary tables in device memory, by the address of
    /// their host copy (which lives as long as the slice).
    consts: HashMap<usize, DevBuf>,
    /// The buffers of steps that are not graphs (prefill chunks).
    pool: Pool,
    graphs_on: bool,
    /// Decode steps by shape (rows, attention stretches): each shape's own
    /// buffers, so that its steps get the same addresses every time, and its
    /// graph once captured.
    graphs: HashMap<(usize, usize), Graphed>,
    /// Set when a step cannot be a graph at all (a mixture reads its router
    /// back to the host mid-step).
    ungraphable: bool,
    /// Steps run by replaying a graph.
    pub replays: u64,
}

impl DeviceState {
    #[cfg(test)]
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_on = on;
    }
}

#[derive(Debug, Default)]
struct Graphed {
    pool: Pool,
    steps: u64,
    failures: u32,
    graph: Option<Captured>,
}

/// A captured step: its graph, where it reads its tables and inputs (which
/// a replay writes first), and where its output lands.
#[derive(Debug)]
struct Captured {
    graph: Graph,
    tables: u64,
    input: u64,
    out: u64,
    out_bytes: usize,
}

/// Device buffers free for the next value.
#[derive(Debug, Default)]
struct Pool {
    free: Vec<DevBuf>,
    /// While capturing: a buffer the pool lacks fails the capture instead
    /// of being allocated (an allocation is no launch a graph can replay).
    no_alloc: bool,
}

impl Pool {
    /// A buffer of at least `bytes`: the smallest free one that fits (the
    /// first of equals), or a new one.
    fn take(&mut self, kd: &dyn KernelDevice, bytes: usize) -> Result<DevBuf> {
        let best = self.free.iter().enumerate().filter(|(_, b)| b.len() >= bytes).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
        match best {
            Some(i) => Ok(self.free.swap_remove(i)),
            None if self.no_alloc => Err(Error::Kernel { kernel: "capture".into(), reason: format!("no free buffer of {bytes} bytes") }),
            None => kd.alloc(bytes),
        }
    }

    fn give(&mut self, b: DevBuf) {
        self.free.push(b);
    }

    /// One order for the same set of buffers, so that the same requests get
    /// the same buffers.
    fn settle(&mut self) {
        self.free.sort_by_key(|b| (b.len(), b.addr()));
    }
}

/// `values`' device copy, made on first use.
fn constant(consts: &mut HashMap<usize, DevBuf>, kd: &dyn KernelDevice, values: &[f32]) -> Result<u64> {
    let key = values.as_ptr() as usize;
    if let Some(b) = consts.get(&key) {
        return Ok(b.addr());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let b = kd.upload(&bytes)?;
    let addr = b.addr();
    consts.insert(key, b);
    Ok(addr)
}

/// What a step hands back.
pub(super) enum StepOut {
    /// `[items, vocab]`: each item's last row through the final norm and the LM head.
    Logits(Vec<f32>),
    /// `[rows, hidden]`: the last block's output rows.
    Rows(Vec<f32>),
}

/// The slice's parts a step runs.
pub(super) struct Step<'s> {
    pub blocks: &'s [Arc<dyn Block>],
    /// The embedding and its scale, on the first slice.
    pub embed: Option<(&'s Embedding, Option<f32>)>,
    /// The final norm and LM head, on the last slice; None hands rows on.
    pub head: Option<(&'s Norm, &'s Linear)>,
    pub hidden: usize,
}

/// The items of a step (checked by the caller: inputs of the slice's kind,
/// caches of this backend with room reserved).
pub(super) struct Items<'i> {
    pub inputs: &'i [HostInput<'i>],
    pub segs: &'i [Seg],
    pub caches: &'i [&'i mut KvCache],
}

/// Runs `step` over the items. A decode step (one row per item) is a CUDA
/// graph from its shape's third step on: the first allocates the shape's
/// buffers and uploads what it reads, the second is captured, the others
/// write their tables and inputs into the same buffers and replay it.
pub(super) fn run(kd: &dyn KernelDevice, state: &mut DeviceState, step: &Step<'_>, items: &Items<'_>) -> Result<StepOut> {
    let rows: usize = items.segs.iter().map(|g| g.len).sum();
    let max_len = items.segs.iter().map(|g| g.pos + g.len).max().unwrap_or(1);
    // One row per session, and few enough for the mat-vec (cuBLAS stays out of graphs).
    let decode = items.segs.iter().all(|g| g.len == 1) && rows < GEMM_ROWS;
    if !(state.graphs_on && decode && !state.ungraphable) {
        return plain(kd, &mut state.pool, &mut state.consts, step, items);
    }
    let key = (rows, max_len.div_ceil(dev::ATTENTION_SPLIT));
    if !state.graphs.contains_key(&key) && state.graphs.len() >= MAX_GRAPHS {
        let oldest = state.graphs.iter().min_by_key(|(_, g)| g.steps).map(|(k, _)| *k);
        oldest.and_then(|k| state.graphs.remove(&k));
    }
    let g = state.graphs.entry(key).or_default();
    let out = graphed(kd, g, &mut state.consts, step, items);
    match &out {
        Ok((_, replayed, readback)) => {
            state.replays += u64::from(*replayed);
            state.ungraphable |= readback;
        }
        // A buffer of the shape may be gone with the failed step, and its
        // graph would write there: the shape starts over.
        Err(_) => {
            state.graphs.remove(&key);
        }
    }
    out.map(|(o, _, _)| o)
}

/// A decode step of one shape: replayed, captured, or (the shape's first
/// step, or after failed captures) launched as it goes. Also says whether
/// it replayed a graph, and whether a capture failed on a mixture's read-back.
fn graphed(
    kd: &dyn KernelDevice,
    g: &mut Graphed,
    consts: &mut HashMap<usize, DevBuf>,
    step: &Step<'_>,
    items: &Items<'_>,
) -> Result<(StepOut, bool, bool)> {
    g.pool.settle();
    g.steps += 1;
    if let Some(c) = &g.graph {
        let ops = DeviceOps::new(kd, &mut g.pool, consts, step, items, false)?;
        // The same requests got the same buffers, or the graph would read others.
        let same = ops.tables.addr() == c.tables && ops.input.addr() == c.input;
        let out = if same {
            kd.replay(&c.graph).and_then(|()| read_out(kd, step, c.out, c.out_bytes))
        } else {
            Err(Error::Kernel { kernel: "replay".into(), reason: "the step's buffers moved".into() })
        };
        ops.finish();
        return Ok((out?, true, false));
    }
    if g.steps == 1 || g.failures >= MAX_CAPTURE_FAILURES {
        return Ok((plain(kd, &mut g.pool, consts, step, items)?, false, false));
    }
    let mut ops = DeviceOps::new(kd, &mut g.pool, consts, step, items, true)?;
    let (launched, captured) = match kd.begin_capture() {
        Ok(()) => {
            let launched = ops.launch(step);
            (launched, kd.end_capture())
        }
        Err(e) => (Err(e), Err(Error::Kernel { kernel: "capture".into(), reason: "not begun".into() })),
    };
    let (readback, tables, input) = (ops.read_back, ops.tables.addr(), ops.input.addr());
    ops.finish();
    match (launched, captured) {
        (Ok((out, out_bytes)), Ok(graph)) => {
            // The captured launches have not run yet: this step replays them too.
            let result = kd.replay(&graph).and_then(|()| read_out(kd, step, out, out_bytes))?;
            g.graph = Some(Captured { graph, tables, input, out, out_bytes });
            Ok((result, false, false))
        }
        (launched, captured) => {
            tracing::debug!(?launched, ?captured, "a decode step could not be captured; it runs without a graph");
            g.failures += 1;
            Ok((plain(kd, &mut g.pool, consts, step, items)?, false, readback))
        }
    }
}

/// A step launched as it goes.
fn plain(
    kd: &dyn KernelDevice,
    pool: &mut Pool,
    consts: &mut HashMap<usize, DevBuf>,
    step: &Step<'_>,
    items: &Items<'_>,
) -> Result<StepOut> {
    let mut ops = DeviceOps::new(kd, pool, consts, step, items, false)?;
    let out = ops.launch(step).and_then(|(at, bytes)| read_out(kd, step, at, bytes));
    ops.finish();
    out
}

/// The step's output, `bytes` at `at`: logits on the last slice, rows on the others.
fn read_out(kd: &dyn KernelDevice, step: &Step<'_>, at: u64, bytes: usize) -> Result<StepOut> {
    let mut out = vec![0u8; bytes];
    kd.read_at(at, &mut out)?;
    Ok(if step.head.is_some() { StepOut::Logits(f32s(&out)) } else { StepOut::Rows(f32s(&out)) })
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A layer's device matrix (every layer of a device slice has one).
fn on_device(l: &Linear) -> Result<&DeviceMatrix> {
    l.device().ok_or_else(|| unsupported("layer of another backend"))
}

fn unsupported(what: &str) -> Error {
    Error::InvalidRequest(format!("the device kernels have no {what}"))
}

/// How a product reads its input: q8a blocks (quantized weights' mat-vec),
/// f32 rows (float weights' mat-vec), or f16 rows (a GEMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Q8,
    F32,
    F16,
}

/// Rows at which a product goes through a GEMM (weights widened to f16
/// once, tensor cores on a GPU) instead of the mat-vec, which reads the
/// weights once per 8 rows: prefill chunks, and large batches.
const GEMM_ROWS: usize = 64;

enum Val {
    /// `[rows, width]` f32.
    Rows { buf: DevBuf, width: usize },
    /// `norm(x)`, not computed yet.
    Normed { x: Act, norm: Norm },
    /// `x · Wᵀ`, not computed yet.
    Product { x: Act, w: Linear },
    /// Freed (its buffer back in the pool).
    Gone,
}

/// [`Ops`] on the device kernels for one batch.
struct DeviceOps<'a> {
    kd: &'a dyn KernelDevice,
    pool: &'a mut Pool,
    consts: &'a mut HashMap<usize, DevBuf>,
    segs: &'a [Seg],
    rows: usize,
    vals: Vec<Val>,
    /// Inputs prepared for products: (value, form) → their buffer.
    prepared: Vec<((usize, Form), DevBuf)>,
    /// The step's tables: per row its position and the positions it sees
    /// (i32 each), then per block and row its K and V cache addresses.
    tables: DevBuf,
    /// The token ids (first slice) or the rows handed on (the others).
    input: DevBuf,
    /// The step's output, until it is read.
    out: Option<DevBuf>,
    max_len: usize,
    /// Launches are being captured: nothing may wait for the device.
    capturing: bool,
    /// A mixture asked to read the device back (which a capture cannot).
    read_back: bool,
}

impl<'a> DeviceOps<'a> {
    /// Takes the step's buffers and writes its tables and inputs: every
    /// copy to the device a step makes, before its first launch.
    fn new(
        kd: &'a dyn KernelDevice,
        pool: &'a mut Pool,
        consts: &'a mut HashMap<usize, DevBuf>,
        step: &Step<'_>,
        items: &Items<'a>,
        capturing: bool,
    ) -> Result<Self> {
        let segs = items.segs;
        let layers = step.blocks.len();
        let rows: usize = segs.iter().map(|g| g.len).sum();
        let mut bytes = Vec::with_capacity(rows * (8 + layers * 16));
        let row_items: Vec<(usize, usize)> = segs.iter().enumerate().flat_map(|(n, g)| (0..g.len).map(move |i| (n, g.pos + i))).collect();
        for &(_, pos) in &row_items {
            bytes.extend((pos as i32).to_le_bytes());
        }
        for &(_, pos) in &row_items {
            bytes.extend((pos as i32 + 1).to_le_bytes());
        }
        for layer in 0..layers {
            for kv in 0..2 {
                for &(item, _) in &row_items {
                    let (k, v) = items.caches[item].kernel_layer(layer).ok_or_else(|| unsupported("cache of another backend"))?;
                    bytes.extend(if kv == 0 { k } else { v }.to_le_bytes());
                }
            }
        }
        let tables = pool.take(kd, bytes.len())?;
        kd.write(&tables, 0, &bytes)?;
        // Token ids on the first slice, rows on the others (the caller checked which).
        let mut input = Vec::new();
        for i in items.inputs {
            match i {
                HostInput::Tokens(t) => input.extend(t.iter().flat_map(|&t| (t as i32).to_le_bytes())),
                HostInput::Hidden(x) => input.extend(x.iter().flat_map(|v| v.to_le_bytes())),
            }
        }
        let input_buf = pool.take(kd, input.len())?;
        kd.write(&input_buf, 0, &input)?;
        let max_len = row_items.iter().map(|&(_, p)| p + 1).max().unwrap_or(1);
        pool.no_alloc = capturing;
        Ok(Self {
            kd,
            pool,
            consts,
            segs,
            rows,
            vals: Vec::new(),
            prepared: Vec::new(),
            tables,
            input: input_buf,
            out: None,
            max_len,
            capturing,
            read_back: false,
        })
    }

    /// Every launch of the step: the address and size of its output.
    fn launch(&mut self, step: &Step<'_>) -> Result<(u64, usize)> {
        let mut h = self.first(step)?;
        for (layer, block) in step.blocks.iter().enumerate() {
            let out = block.forward(self, h, layer)?;
            h = self.end_block(out)?;
        }
        match step.head {
            Some((norm, output)) => self.logits(h, norm, output),
            None => {
                let at = self.rows(h)?;
                Ok((at, self.rows * step.hidden * 4))
            }
        }
    }

    fn put(&mut self, v: Val) -> Act {
        self.vals.push(v);
        Act(self.vals.len() - 1)
    }

    fn new_rows(&mut self, width: usize) -> Result<(DevBuf, u64)> {
        let buf = self.pool.take(self.kd, self.rows * width * 4)?;
        let addr = buf.addr();
        Ok((buf, addr))
    }

    /// The first block's input: embedding rows of the tokens, or the rows handed on.
    fn first(&mut self, step: &Step<'_>) -> Result<Act> {
        match step.embed {
            Some((Embedding::Device(m), scale)) => {
                let (buf, addr) = self.new_rows(step.hidden)?;
                dev::get_rows(self.kd, m.ty, m.buf.addr(), self.input.addr(), addr, self.rows, m.cols, scale.unwrap_or(1.0))?;
                Ok(self.put(Val::Rows { buf, width: step.hidden }))
            }
            Some(_) => Err(unsupported("embedding of another backend")),
            None => {
                let (buf, addr) = self.new_rows(step.hidden)?;
                self.kd.copy_at(addr, self.input.addr(), self.rows * step.hidden * 4)?;
                Ok(self.put(Val::Rows { buf, width: step.hidden }))
            }
        }
    }

    fn width(&self, x: Act) -> Result<usize> {
        Ok(match &self.vals[x.0] {
            Val::Rows { width, .. } => *width,
            Val::Normed { x, .. } => self.width(*x)?,
            Val::Product { w, .. } => on_device(w)?.rows,
            Val::Gone => return Err(Error::InvalidRequest("a freed value".into())),
        })
    }

    /// The address of `x` as f32 rows, computing it if it is lazy.
    fn rows(&mut self, x: Act) -> Result<u64> {
        let addr = match &self.vals[x.0] {
            Val::Rows { buf, .. } => return Ok(buf.addr()),
            Val::Gone => return Err(Error::InvalidRequest("a freed value".into())),
            Val::Normed { x: src, norm } => {
                let (src, norm) = (*src, norm.clone());
                let width = self.width(src)?;
                let s = self.rows(src)?;
                let (buf, y) = self.new_rows(width)?;
                self.norm_into(s, &norm, 0, y, 0, width)?;
                self.vals[x.0] = Val::Rows { buf, width };
                y
            }
            Val::Product { x: input, w } => {
                let (input, w) = (*input, w.clone());
                let m = on_device(&w)?;
                let (buf, y) = self.new_rows(m.rows)?;
                self.product_into(input, m, y, 0)?;
                self.vals[x.0] = Val::Rows { buf, width: m.rows };
                y
            }
        };
        Ok(addr)
    }

    fn norm_into(&mut self, x: u64, norm: &Norm, residual: u64, y: u64, yq: u64, width: usize) -> Result<()> {
        let (w, eps) = norm.rms_weights().ok_or_else(|| unsupported("LayerNorm"))?;
        let w = constant(self.consts, self.kd, w)?;
        dev::rmsnorm(self.kd, x, w, residual, y, yq, self.rows, width, eps)
    }

    /// How a product of `m` over this step's rows reads its input.
    fn form(&self, m: &DeviceMatrix) -> Form {
        if self.rows >= GEMM_ROWS {
            Form::F16
        } else if m.ty.quantized() {
            Form::Q8
        } else {
            Form::F32
        }
    }

    /// `y = x · Wᵀ (+ residual)`: the mat-vec, with the residual added as it
    /// writes, or a GEMM and then the residual.
    fn product_into(&mut self, x: Act, m: &DeviceMatrix, y: u64, residual: u64) -> Result<()> {
        let form = self.form(m);
        let xin = self.prepared(x, form)?;
        if form != Form::F16 {
            return dev::matvec(self.kd, m.product(self.rows), m.buf.addr(), xin, y, residual);
        }
        let w16 = self.pool.take(self.kd, m.rows * m.cols * 2)?;
        dev::to_f16(self.kd, m.ty, m.buf.addr(), w16.addr(), m.rows, m.cols)?;
        self.kd.gemm(dev::Gemm { rows: m.rows, cols: m.cols, nb: self.rows, w: w16.addr(), x: xin, y })?;
        // Launches run in order: the next one to take the buffer runs after the GEMM.
        self.pool.give(w16);
        if residual != 0 {
            dev::rows_op(self.kd, RowsOp::Add, y, residual, y, self.rows * m.rows)?;
        }
        Ok(())
    }

    /// `x` as a product reads it (`form`); made once per value and form.
    fn prepared(&mut self, x: Act, form: Form) -> Result<u64> {
        if let Some((_, b)) = self.prepared.iter().find(|(k, _)| *k == (x.0, form)) {
            return Ok(b.addr());
        }
        let width = self.width(x)?;
        let buf = match form {
            Form::F32 => return self.rows(x),
            Form::F16 => {
                let r = self.rows(x)?;
                let h = self.pool.take(self.kd, self.rows * width * 2)?;
                dev::f32_to_f16(self.kd, r, h.addr(), self.rows * width)?;
                h
            }
            Form::Q8 => {
                let q = self.pool.take(self.kd, self.rows * width / 32 * dev::Q8A_BYTES)?;
                match &self.vals[x.0] {
                    // The norm goes straight into the blocks.
                    Val::Normed { x: src, norm } => {
                        let (src, norm) = (*src, norm.clone());
                        let s = self.rows(src)?;
                        self.norm_into(s, &norm, 0, 0, q.addr(), width)?;
                    }
                    _ => {
                        let r = self.rows(x)?;
                        dev::quantize_q8(self.kd, r, q.addr(), self.rows * width)?;
                    }
                }
                q
            }
        };
        let addr = buf.addr();
        self.prepared.push(((x.0, form), buf));
        Ok(addr)
    }

    /// Frees every value but `keep`, which becomes the only handle.
    fn end_block(&mut self, keep: Act) -> Result<Act> {
        self.rows(keep)?;
        let kept = std::mem::replace(&mut self.vals[keep.0], Val::Gone);
        for v in std::mem::take(&mut self.vals) {
            if let Val::Rows { buf, .. } = v {
                self.pool.give(buf);
            }
        }
        for (_, b) in std::mem::take(&mut self.prepared) {
            self.pool.give(b);
        }
        Ok(self.put(kept))
    }

    /// Each item's last row through `norm` and the head: where the logits
    /// `[items, vocab]` land, and their size.
    fn logits(&mut self, h: Act, norm: &Norm, output: &Linear) -> Result<(u64, usize)> {
        let m = on_device(output)?;
        let width = self.width(h)?;
        let x = self.rows(h)?;
        let items = self.segs.len();
        let (w, eps) = norm.rms_weights().ok_or_else(|| unsupported("LayerNorm"))?;
        let w = constant(self.consts, self.kd, w)?;
        let q = m.ty.quantized();
        let row_bytes = if q { width / 32 * dev::Q8A_BYTES } else { width * 4 };
        let normed = self.pool.take(self.kd, items * row_bytes)?;
        for (i, g) in self.segs.iter().enumerate() {
            let last = x + ((g.start + g.len - 1) * width * 4) as u64;
            let at = normed.addr() + (i * row_bytes) as u64;
            let (y, yq) = if q { (0, at) } else { (at, 0) };
            dev::rmsnorm(self.kd, last, w, 0, y, yq, 1, width, eps)?;
        }
        let logits = self.pool.take(self.kd, items * m.rows * 4)?;
        dev::matvec(self.kd, m.product(items), m.buf.addr(), normed.addr(), logits.addr(), 0)?;
        let at = logits.addr();
        self.pool.give(normed);
        self.out = Some(logits);
        Ok((at, items * m.rows * 4))
    }

    /// Returns every buffer to the pool.
    fn finish(mut self) {
        for v in std::mem::take(&mut self.vals) {
            if let Val::Rows { buf, .. } = v {
                self.pool.give(buf);
            }
        }
        for (_, b) in std::mem::take(&mut self.prepared) {
            self.pool.give(b);
        }
        self.pool.give(self.tables);
        self.pool.give(self.input);
        if let Some(out) = self.out {
            self.pool.give(out);
        }
        self.pool.no_alloc = false;
    }

    /// The lazy product of `x`, or None.
    fn product(&self, a: Act) -> Option<(Act, Linear)> {
        match &self.vals[a.0] {
            Val::Product { x, w } => Some((*x, w.clone())),
            _ => None,
        }
    }
}

impl Ops for DeviceOps<'_> {
    fn linear(&mut self, x: Act, w: &Linear) -> Result<Act> {
        on_device(w)?;
        Ok(self.put(Val::Product { x, w: w.clone() }))
    }

    fn project(&mut self, x: Act, p: &Projections) -> Result<Vec<Act>> {
        match p {
            Projections::Separate(parts) => parts.iter().map(|w| self.linear(x, w)).collect(),
            Projections::Stacked { .. } => Err(unsupported("stacked projections")),
        }
    }

    fn norm(&mut self, x: Act, norm: &Norm) -> Result<Act> {
        norm.rms_weights().ok_or_else(|| unsupported("LayerNorm"))?;
        Ok(self.put(Val::Normed { x, norm: norm.clone() }))
    }

    fn glu(&mut self, gate: Act, up: Act, f: Gate) -> Result<Act> {
        if let (Some((xg, wg)), Some((xu, wu))) = (self.product(gate), self.product(up)) {
            let (mg, mu) = (wg.device().expect("checked by linear"), wu.device().expect("checked by linear"));
            if xg == xu && mg.ty == mu.ty && mg.rows == mu.rows && self.form(mg) != Form::F16 {
                let xin = self.prepared(xg, self.form(mg))?;
                let (buf, y) = self.new_rows(mg.rows)?;
                dev::glu(self.kd, mg.product(self.rows), DeviceGate::from(f), mg.buf.addr(), mu.buf.addr(), xin, y)?;
                return Ok(self.put(Val::Rows { buf, width: mg.rows }));
            }
        }
        let width = self.width(gate)?;
        let (g, u) = (self.rows(gate)?, self.rows(up)?);
        let (buf, y) = self.new_rows(width)?;
        dev::rows_op(self.kd, RowsOp::Gated(DeviceGate::from(f)), g, u, y, self.rows * width)?;
        Ok(self.put(Val::Rows { buf, width }))
    }

    fn gelu(&mut self, x: Act) -> Result<Act> {
        let width = self.width(x)?;
        let a = self.rows(x)?;
        let (buf, y) = self.new_rows(width)?;
        dev::rows_op(self.kd, RowsOp::Gelu, a, 0, y, self.rows * width)?;
        Ok(self.put(Val::Rows { buf, width }))
    }

    fn add(&mut self, a: Act, b: Act) -> Result<Act> {
        let width = self.width(a)?;
        // A product or a norm adds the other side as it writes.
        for (lazy, other) in [(a, b), (b, a)] {
            if let Some((x, w)) = self.product(lazy) {
                let m = w.device().expect("checked by linear");
                let residual = self.rows(other)?;
                let (buf, y) = self.new_rows(width)?;
                self.product_into(x, m, y, residual)?;
                return Ok(self.put(Val::Rows { buf, width }));
            }
            if let Val::Normed { x, norm } = &self.vals[lazy.0] {
                let (x, norm) = (*x, norm.clone());
                let residual = self.rows(other)?;
                let s = self.rows(x)?;
                let (buf, y) = self.new_rows(width)?;
                self.norm_into(s, &norm, residual, y, 0, width)?;
                return Ok(self.put(Val::Rows { buf, width }));
            }
        }
        let (x, z) = (self.rows(a)?, self.rows(b)?);
        let (buf, y) = self.new_rows(width)?;
        dev::rows_op(self.kd, RowsOp::Add, x, z, y, self.rows * width)?;
        Ok(self.put(Val::Rows { buf, width }))
    }

    fn scale(&mut self, x: Act, s: f32) -> Result<Act> {
        let width = self.width(x)?;
        let a = self.rows(x)?;
        let (buf, y) = self.new_rows(width)?;
        dev::rows_op(self.kd, RowsOp::Scale(s), a, 0, y, self.rows * width)?;
        Ok(self.put(Val::Rows { buf, width }))
    }

    fn attention(&mut self, q: Act, k: Act, v: Act, layer: usize, attn: &Attention) -> Result<Act> {
        let h = Heads { n_heads: attn.n_heads, n_kv_heads: attn.n_kv_heads, head_dim: attn.head_dim };
        // The queries rotate in place: a copy unless they are a product's own output.
        let fresh = self.product(q).is_some();
        let qa = self.rows(q)?;
        let width = h.n_heads * h.head_dim;
        let (qbuf, qa) = if fresh {
            (None, qa)
        } else {
            let (buf, y) = self.new_rows(width)?;
            self.kd.copy_at(y, qa, self.rows * width * 4)?;
            (Some(buf), y)
        };
        let (ka, va) = (self.rows(k)?, self.rows(v)?);
        let (cos, sin) = attn.rope.host_tables().ok_or_else(|| unsupported("rotary tables on another device"))?;
        let spec = attn.rope.spec();
        let positions = spec.context;
        if self.max_len > positions {
            return Err(Error::ContextOverflow { prompt: self.max_len, context: positions });
        }
        let (cos, sin) = (constant(self.consts, self.kd, cos)?, constant(self.consts, self.kd, sin)?);
        let norm = |n: &Option<Norm>, consts: &mut HashMap<usize, DevBuf>, kd: &dyn KernelDevice| -> Result<(u64, f32)> {
            match n {
                Some(n) => {
                    let (w, eps) = n.rms_weights().ok_or_else(|| unsupported("LayerNorm"))?;
                    Ok((constant(consts, kd, w)?, eps))
                }
                None => Ok((0, 0.0)),
            }
        };
        let (q_norm, eps) = norm(&attn.q_norm, self.consts, self.kd)?;
        let (k_norm, _) = norm(&attn.k_norm, self.consts, self.kd)?;
        let t = self.tables.addr();
        let per_layer = (self.rows * 16) as u64;
        let k_caches = t + (self.rows * 8) as u64 + layer as u64 * per_layer;
        let rows = StepRows { nb: self.rows, q: qa, k: ka, v: va, k_caches, v_caches: k_caches + (self.rows * 8) as u64, positions: t };
        let rope = dev::RopeArgs { cos, sin, positions, rot: spec.rot_dim, neox: spec.style == RopeStyle::Half, q_norm, k_norm, eps };
        dev::rope_kv(self.kd, h, &rows, &rope)?;
        let split = dev::ATTENTION_SPLIT;
        let scratch = self.pool.take(self.kd, dev::attention_scratch(h, self.rows, self.max_len, split) * 4)?;
        let (buf, y) = self.new_rows(width)?;
        let args = dev::AttnArgs {
            lens: t + (self.rows * 4) as u64,
            max_len: self.max_len,
            scale: 1.0 / (attn.score_dim as f32).sqrt(),
            window: attn.window,
            scratch: scratch.addr(),
            y,
        };
        dev::attention(self.kd, h, &rows, &args, split)?;
        self.pool.give(scratch);
        if let Some(b) = qbuf {
            self.pool.give(b);
        }
        Ok(self.put(Val::Rows { buf, width }))
    }

    /// The router's product, read back to route on the host (softmax, the
    /// best `top_k`, as the host backend does); then each routed expert on
    /// its rows only, gathered into one batch (its weights read once), and
    /// its weighted output added back onto them, experts in order.
    fn moe(&mut self, x: Act, e: &Experts) -> Result<Act> {
        if self.capturing {
            self.read_back = true;
            return Err(unsupported("mixture inside a graph (its router is read back mid-step)"));
        }
        let hidden = self.width(x)?;
        let n = e.experts.len();
        let router = self.linear(x, &e.router)?;
        let logits = self.rows(router)?;
        let mut bytes = vec![0u8; self.rows * n * 4];
        self.kd.read_at(logits, &mut bytes)?;
        let mut probs = f32s(&bytes);
        probs.chunks_exact_mut(n).for_each(crate::kernels::softmax);
        let routed = e.route(&probs);
        // One copy up: each routed expert's rows, then their weights.
        let mut table = Vec::new();
        let mut spans = Vec::new();
        for (i, rows) in routed.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            spans.push((i, table.len(), rows.len()));
            table.extend(rows.iter().flat_map(|&(r, _)| (r as i32).to_le_bytes()));
            table.extend(rows.iter().flat_map(|&(_, w)| w.to_le_bytes()));
        }
        let tb = self.pool.take(self.kd, table.len())?;
        self.kd.write(&tb, 0, &table)?;
        let (out, y) = self.new_rows(hidden)?;
        dev::rows_op(self.kd, RowsOp::Zero, 0, 0, y, self.rows * hidden)?;
        for (i, at, m) in spans {
            let ex = &e.experts[i];
            let (mg, mu, md) = (on_device(&ex.gate)?, on_device(&ex.up)?, on_device(&ex.down)?);
            if mg.ty != mu.ty {
                return Err(unsupported("expert whose gate and up differ in type"));
            }
            let (idx, weights) = (tb.addr() + at as u64, tb.addr() + (at + 4 * m) as u64);
            // Experts run their (few) rows through the mat-vec.
            let xin = self.prepared(x, if mg.ty.quantized() { Form::Q8 } else { Form::F32 })?;
            let row_bytes = mg.ty.act_bytes(1, hidden);
            let gathered = self.pool.take(self.kd, m * row_bytes)?;
            dev::gather_rows(self.kd, xin, idx, gathered.addr(), m, row_bytes)?;
            let g = self.pool.take(self.kd, m * mg.rows * 4)?;
            dev::glu(self.kd, mg.product(m), DeviceGate::from(e.gate), mg.buf.addr(), mu.buf.addr(), gathered.addr(), g.addr())?;
            let gq = if md.ty.quantized() {
                let q = self.pool.take(self.kd, md.ty.act_bytes(m, mg.rows))?;
                dev::quantize_q8(self.kd, g.addr(), q.addr(), m * mg.rows)?;
                Some(q)
            } else {
                None
            };
            let d = self.pool.take(self.kd, m * hidden * 4)?;
            dev::matvec(self.kd, md.product(m), md.buf.addr(), gq.as_ref().map_or(g.addr(), |q| q.addr()), d.addr(), 0)?;
            dev::scatter_add(self.kd, y, d.addr(), idx, weights, m, hidden)?;
            for b in [gathered, g, d].into_iter().chain(gq) {
                self.pool.give(b);
            }
        }
        self.pool.give(tb);
        Ok(self.put(Val::Rows { buf: out, width: hidden }))
    }
}

/// The integration tests' writer of tiny random models.
#[cfg(all(test, unix))]
#[path = "../../tests/common/tiny.rs"]
#[allow(dead_code)]
mod tiny;

#[cfg(all(test, unix))]
mod tests {
    //! The device backend on the kernels' host emulator against the host
    //! backend, on tiny random models of each architecture it runs.

    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    use crate::model::{Backend, BatchItem, HostInput, KvCache, ModelFile, ModelSlice, SliceOutput};

    use super::tiny;

    /// A tiny random model of `arch` written to a fresh directory (kept
    /// alive by the first value) and opened.
    fn tiny_file(arch: &str, dtype: GgmlDType, spec: &tiny::TinySpec) -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{arch}.gguf"));
        tiny::write_gguf(&path, spec, arch, dtype, &[]);
        let file = ModelFile::open(&path).unwrap();
        (dir, file)
    }

    fn logits(out: Vec<SliceOutput>) -> Vec<Vec<f32>> {
        out.into_iter().map(|o| o.into_values().unwrap()).collect()
    }

    /// Two sessions through the host and the device backends and the exact
    /// math (the weights dequantized, f32 throughout): prefills of different
    /// lengths in one batch, then decode steps of both together. The device
    /// backend's logits must be as close to the exact ones as the host
    /// backend's (they quantize activations differently, so neither is
    /// closer by construction), and its greedy tokens the same where the
    /// exact top two are not near a tie.
    fn agree(arch: &str, dtype: GgmlDType, spec: tiny::TinySpec, on: &Device) {
        agree_from(arch, dtype, spec, on, [vec![5, 17, 3, 60, 9, 41], vec![88, 2, 30]]);
    }

    fn agree_from(arch: &str, dtype: GgmlDType, spec: tiny::TinySpec, on: &Device, prompts: [Vec<u32>; 2]) {
        let (_dir, mut file) = tiny_file(arch, dtype, &spec);
        let n = spec.layers;
        let exact = ModelSlice::load_exact(&mut file, 0..n).unwrap();
        let host = ModelSlice::load_with(&mut file, 0..n, &Device::Cpu, Backend::Host).unwrap();
        let dev = ModelSlice::load_with(&mut file, 0..n, on, Backend::Device).unwrap();
        assert_eq!(dev.backend(), Backend::Device, "{arch} {dtype:?} fell back to another backend");
        let slices = [&exact, &host, &dev];
        let mut caches: Vec<[KvCache; 2]> =
            slices.iter().map(|s| [s.new_cache(spec.context).unwrap(), s.new_cache(spec.context).unwrap()]).collect();
        let mut inputs = prompts;
        let (mut worst_host, mut worst_dev) = (0f32, 0f32);
        for step in 0..4 {
            let mut out = Vec::new();
            for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
                let [a, b] = cache;
                out.push(if slice.backend().batches() {
                    let mut items = [
                        BatchItem { input: HostInput::Tokens(&inputs[0]), cache: a },
                        BatchItem { input: HostInput::Tokens(&inputs[1]), cache: b },
                    ];
                    logits(slice.forward_batch(&mut items).unwrap())
                } else {
                    let one = |t: &[u32], c: &mut KvCache| {
                        let x = candle_core::Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                        logits(vec![slice.forward(&x, c).unwrap()]).pop().unwrap()
                    };
                    vec![one(&inputs[0], a), one(&inputs[1], b)]
                });
            }
            for item in 0..2 {
                let (e, h, d) = (&out[0][item], &out[1][item], &out[2][item]);
                let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
                let dist = |x: &[f32]| e.iter().zip(x).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                let (dh, dd) = (dist(h), dist(d));
                worst_host = worst_host.max(dh);
                worst_dev = worst_dev.max(dd);
                let top = |l: &[f32]| (0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap();
                let mut sorted = e.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 2.0 * dd * scale {
                    assert_eq!(top(e), top(d), "{arch} {dtype:?} step {step} item {item}: greedy tokens differ");
                }
                inputs[item] = vec![top(e) as u32];
            }
        }
        eprintln!("{arch} {dtype:?}: largest logit error against the exact math, relative to the largest logit: host {worst_host:.5}, device {worst_dev:.5}");
        assert!(worst_dev <= 1.5 * worst_host + 1e-3, "{arch} {dtype:?}: device {worst_dev} against host {worst_host}");
    }

    fn spec(hidden: usize, heads: usize, ffn: usize) -> tiny::TinySpec {
        tiny::TinySpec { hidden, heads, kv_heads: heads / 2, ffn, vocab: 96, context: 64, layers: 2, ..Default::default() }
    }

    /// Each architecture and weight type the device kernels run, on a small model of it.
    fn cases() -> Vec<(&'static str, GgmlDType, tiny::TinySpec)> {
        let (small, wide) = (spec(128, 4, 256), spec(256, 8, 512));
        let moe = tiny::TinySpec { experts: 4, top_k: 2, ..small };
        vec![
            ("llama", GgmlDType::Q4_0, small),
            // Mixtral's layout (a router, three stacks of experts).
            ("llama", GgmlDType::Q8_0, moe),
            ("qwen3moe", GgmlDType::Q4_0, tiny::TinySpec { top_k: 3, ..moe }),
            ("llama", GgmlDType::Q8_0, small),
            ("llama", GgmlDType::F16, small),
            // K-quants need rows of whole 256-value super-blocks.
            ("llama", GgmlDType::Q4K, wide),
            ("llama", GgmlDType::Q6K, wide),
            ("qwen3", GgmlDType::Q4_1, small),
            ("gemma3", GgmlDType::Q8_0, tiny::TinySpec { window: 4, ..small }),
        ]
    }

    #[test]
    fn models_on_the_emulated_device_kernels_agree_with_the_host() {
        for (arch, dtype, spec) in cases() {
            agree(arch, dtype, spec, &Device::Cpu);
        }
    }

    /// Prefills of 64 rows and more go through the GEMM (f16 activations).
    #[test]
    fn long_prefills_through_the_gemm_agree_with_the_host() {
        let long = |n: u32, k: u32| (0..n).map(|i| (i * k + 3) % 96).collect::<Vec<u32>>();
        for dtype in [GgmlDType::Q4_0, GgmlDType::F16] {
            let spec = tiny::TinySpec { context: 128, ..spec(128, 4, 256) };
            agree_from("llama", dtype, spec, &Device::Cpu, [long(70, 7), long(40, 11)]);
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn models_on_gpu_kernels_agree_with_the_host() {
        if let Some(gpu) = crate::kernels::device::tests::test_gpu() {
            for (arch, dtype, spec) in cases() {
                agree(arch, dtype, spec, &gpu);
            }
            let long = |n: u32, k: u32| (0..n).map(|i| (i * k + 3) % 96).collect::<Vec<u32>>();
            let spec = tiny::TinySpec { context: 128, ..spec(128, 4, 256) };
            agree_from("llama", GgmlDType::Q4_0, spec, &gpu, [long(70, 7), long(40, 11)]);
        }
    }

    /// A pipeline of two device slices hands f32 rows on: its logits are
    /// the whole slice's, bit for bit; so are a session's alone and batched
    /// with another, and after its cache is exported mid-way and imported
    /// into a fresh one.
    #[test]
    fn device_slices_split_and_move_sessions_bit_for_bit() {
        let spec = spec(128, 4, 256);
        let (_dir, mut file) = tiny_file("llama", GgmlDType::Q4_0, &spec);
        let load = |f: &mut ModelFile, r: std::ops::Range<usize>| ModelSlice::load_with(f, r, &Device::Cpu, Backend::Device).unwrap();
        let (whole, first, second) = (load(&mut file, 0..2), load(&mut file, 0..1), load(&mut file, 1..2));
        let step = |s: &ModelSlice, input: HostInput<'_>, c: &mut KvCache| {
            s.forward_batch(&mut [BatchItem { input, cache: c }]).unwrap().pop().unwrap()
        };
        let (mut cw, mut c1, mut c2) = (whole.new_cache(64).unwrap(), first.new_cache(64).unwrap(), second.new_cache(64).unwrap());
        let mut tokens = vec![7u32, 1, 90, 33];
        for _ in 0..3 {
            let want = logits(vec![step(&whole, HostInput::Tokens(&tokens), &mut cw)]).pop().unwrap();
            let hidden = step(&first, HostInput::Tokens(&tokens), &mut c1).into_values().unwrap();
            let got = logits(vec![step(&second, HostInput::Hidden(&hidden), &mut c2)]).pop().unwrap();
            assert_eq!(want, got);
            let top = (0..want.len()).max_by(|&i, &j| want[i].total_cmp(&want[j])).unwrap();
            tokens = vec![top as u32];
        }
        // Alone or batched with another session, a session's logits are the same.
        let mut other = whole.new_cache(64).unwrap();
        let mut alone = whole.new_cache(64).unwrap();
        alone.import(&cw.export().unwrap()).unwrap();
        let want = logits(vec![step(&whole, HostInput::Tokens(&tokens), &mut alone)]).pop().unwrap();
        let mut batched = whole.new_cache(64).unwrap();
        batched.import(&cw.export().unwrap()).unwrap();
        let prompt = [3u32, 14, 15, 92, 65];
        let mut items = [
            BatchItem { input: HostInput::Tokens(&prompt), cache: &mut other },
            BatchItem { input: HostInput::Tokens(&tokens), cache: &mut batched },
        ];
        assert_eq!(logits(whole.forward_batch(&mut items).unwrap())[1], want, "a session's logits depend on its batch");
        let mut moved = whole.new_cache(64).unwrap();
        moved.import(&cw.export().unwrap()).unwrap();
        assert_eq!(moved.len(), cw.len());
        let a = logits(vec![step(&whole, HostInput::Tokens(&tokens), &mut cw)]);
        let b = logits(vec![step(&whole, HostInput::Tokens(&tokens), &mut moved)]);
        assert_eq!(a, b);
        // A state whose last block has the wrong shape is refused, and the
        // cache it was imported into keeps every block as it was.
        let before = moved.export().unwrap();
        let mut foreign = other.export().unwrap();
        let v = &mut foreign.layers.last_mut().unwrap().1;
        *v = v.narrow(3, 0, 16).unwrap();
        assert!(moved.import(&foreign).is_err());
        assert_eq!(moved.len(), before.len);
        let after = moved.export().unwrap();
        for ((k0, v0), (k1, v1)) in before.layers.iter().zip(&after.layers) {
            for (x, y) in [(k0, k1), (v0, v1)] {
                assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
    }

    /// A model with what the kernels lack (heads of 16 values; phi2's
    /// LayerNorms and biases) is loaded for candle instead, and runs.
    #[test]
    fn what_the_device_kernels_lack_runs_on_candle() {
        for (arch, spec) in [("llama", tiny::TinySpec::default()), ("phi2", spec(128, 4, 256))] {
            let (_dir, mut file) = tiny_file(arch, GgmlDType::Q8_0, &spec);
            let slice = ModelSlice::load_with(&mut file, 0..spec.layers, &Device::Cpu, Backend::Device).unwrap();
            assert_eq!(slice.backend(), Backend::Candle, "{arch}");
            let mut cache = slice.new_cache(16).unwrap();
            let x = candle_core::Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            assert_eq!(logits(vec![slice.forward(&x, &mut cache).unwrap()])[0].len(), spec.vocab);
        }
    }

    /// Decode steps replayed as graphs give the logits the same steps give
    /// launched one by one, bit for bit, as sessions come and go (new
    /// shapes, new positions, new tokens in the same buffers).
    #[test]
    fn decode_steps_as_graphs_equal_steps_launched_one_by_one() {
        let spec = spec(128, 4, 256);
        let (_dir, mut file) = tiny_file("qwen3", GgmlDType::Q4_0, &spec);
        let load = |f: &mut ModelFile, graphs: bool| {
            let s = ModelSlice::load_with(f, 0..spec.layers, &Device::Cpu, Backend::Device).unwrap();
            s.set_device_graphs(graphs);
            s
        };
        let (graphed, plain) = (load(&mut file, true), load(&mut file, false));
        let mut caches: Vec<Vec<KvCache>> = [&graphed, &plain].iter().map(|s| (0..3).map(|_| s.new_cache(64).unwrap()).collect()).collect();
        let mut tokens: Vec<Vec<u32>> = vec![vec![4, 8, 15], vec![16, 23], vec![42]];
        for step in 0..8 {
            // Two sessions, then three (a new shape), then two again.
            let live = if (3..6).contains(&step) { 3 } else { 2 };
            let mut out = Vec::new();
            for (slice, cache) in [&graphed, &plain].iter().zip(caches.iter_mut()) {
                let mut items: Vec<BatchItem> = tokens
                    .iter()
                    .zip(cache.iter_mut())
                    .take(live)
                    .map(|(t, c)| BatchItem { input: HostInput::Tokens(t), cache: c })
                    .collect();
                out.push(logits(slice.forward_batch(&mut items).unwrap()));
            }
            assert_eq!(out[0], out[1], "step {step}");
            for (t, l) in tokens.iter_mut().zip(&out[0]) {
                *t = vec![(0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap() as u32];
            }
        }
        assert!(graphed.device_replays() >= 3, "{} steps replayed", graphed.device_replays());
        assert_eq!(plain.device_replays(), 0);
    }
}
