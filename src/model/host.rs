//! The CPU backend: [`Ops`] over plain f32 buffers with the project's
//! kernels (`crate::kernels`), and the batch driver of a host slice.
//!
//! One call runs a batch: the rows of every item (a decode token of one
//! session, a prefill chunk of another) are stacked into one activation
//! matrix, so each weight row is read once per step for all of them; only
//! attention is per item, against that item's own KV cache. Buffers live in
//! a [`Scratch`] reused from call to call: after the first steps, a decode
//! step allocates no activation buffer, only its output and the few
//! handles and indices of each operation.
//!
//! `norm`, `glu` and `gelu` are lazy: the product that consumes one applies it
//! to each row inside its quantization pass (one parallel region, no pass of
//! its own); anything else materializes it first.
//!
//! A row's result does not depend on the rows batched with it (the matrix
//! kernels guarantee it per row, attention is per item), so a session gets
//! the same tokens alone or batched.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kv_cache::KvCache;
use super::ops::{Act, Attention, Experts, Gate, Ops};
use super::weights::{Linear, Norm, Projections};
use crate::error::{Error, Result};
use crate::kernels::ops::{self as kops, AttnShape};
use crate::kernels::{self, QActs, QMatrix};

/// The input of one batch item: token ids on the first slice, hidden states
/// (`[seq, hidden]` row-major) on the others.
#[derive(Debug, Clone, Copy)]
pub enum HostInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

pub struct BatchItem<'a> {
    pub input: HostInput<'a>,
    pub cache: &'a mut KvCache,
}

/// Activation buffers of one batch, grown to the largest batch seen.
#[derive(Debug, Default)]
pub struct Scratch {
    bufs: Vec<Vec<f32>>,
    /// The routed experts of a mixture's step, up to a region's worth.
    moe: Vec<ExpertRows>,
    /// The LM head's normalized input rows and its logits.
    head: [Vec<f32>; 2],
    acts: QActs,
    /// The batch items' cache buffers for the layer being run (empty between calls).
    kv: Vec<CacheLayer>,
    /// A layer's attention tasks, and the partial results of rows attended in several spans.
    attn_tasks: Vec<AttnTask>,
    attn_parts: Vec<f32>,
}

/// One routed expert's part of a step: the rows sent to it, gathered, its
/// gate, up and output rows, and the quantized activations its products read
/// (`up_acts` only where the up matrix reads another format than the gate).
#[derive(Debug, Default)]
struct ExpertRows {
    input: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    acts: QActs,
    up_acts: QActs,
}

/// Attention of row `i` of segment `seg`, K/V head `j`, over span `span` of
/// the `spans` its position sees; several spans write partial results to
/// slots `slot..slot + spans` (one span writes the output, no slot).
#[derive(Debug, Clone, Copy)]
struct AttnTask {
    seg: usize,
    i: usize,
    j: usize,
    span: usize,
    spans: usize,
    slot: usize,
}

/// One item's K and V buffers of one layer (`[n_kv_heads, capacity, head_dim]`).
#[derive(Debug, Clone, Copy)]
struct CacheLayer {
    k: kernels::SendPtr<f16>,
    v: kernels::SendPtr<f16>,
    capacity: usize,
}

/// Where an item's rows sit in the batch and where its cache stands.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seg {
    pub start: usize,
    pub len: usize,
    pub pos: usize,
}

/// What an [`Act`] stands for.
#[derive(Debug)]
enum Val {
    /// `[rows, width]` in buffer `buf`.
    Rows { buf: usize, width: usize },
    /// `norm(x)`, not computed yet.
    Normed { x: Act, norm: Norm },
    /// `f(gate) · up`, not computed yet (computed into gate's buffer).
    Gated { gate: Act, up: Act, f: Gate },
    /// `gelu(x)`, not computed yet (computed into x's buffer).
    Gelu { x: Act },
}

/// [`Ops`] on the host for one batch.
pub(super) struct HostOps<'a, 'c> {
    s: &'a mut Scratch,
    segs: &'a [Seg],
    rows: usize,
    caches: &'a mut [&'c mut KvCache],
    vals: Vec<Val>,
    /// Which of the scratch buffers hold a live value.
    used: Vec<bool>,
}

/// `task(item, row within the item, K/V head)` for this thread's share
/// (every `threads`-th, from `thread`) of the batch's rows × K/V heads.
fn for_each_task(segs: &[Seg], nkv: usize, thread: usize, threads: usize, mut task: impl FnMut(usize, usize, usize)) {
    let (mut index, mut seg, mut first) = (thread, 0, 0);
    while seg < segs.len() {
        if index >= first + segs[seg].len * nkv {
            first += segs[seg].len * nkv;
            seg += 1;
            continue;
        }
        task(seg, (index - first) / nkv, (index - first) % nkv);
        index += threads;
    }
}

fn host(l: &Linear) -> Result<&QMatrix> {
    l.host().ok_or_else(|| Error::InvalidRequest("a host slice was given a layer for candle".into()))
}

/// Work on each input row, `(row index, row)`, done in place just before
/// the row is quantized, in the same parallel region.
type Prep<'p> = Option<&'p (dyn Fn(usize, &mut [f32]) + Sync)>;

/// `outs[i] = prep(x) · Wᵢᵀ (+ bᵢ)` for up to three matrices reading the
/// same `x`: quantized once and multiplied in one parallel region when their
/// weight types share an activation format (the usual file), else one by one.
fn matmul(acts: &mut QActs, x: &mut [f32], prep: Prep, layers: &[&Linear], outs: &mut [&mut [f32]]) -> Result<()> {
    let n = layers.len();
    assert!((1..=3).contains(&n), "one to three projections of one input");
    let quantize = |acts: &mut QActs, m: &QMatrix, x: &mut [f32], prep: Prep| match prep {
        Some(prep) => acts.prepare_and_quantize_for(m, x, prep),
        None => acts.quantize_for(m, x),
    };
    let mats = layers.iter().map(|l| host(l)).collect::<Result<Vec<_>>>()?;
    if mats.iter().all(|m| m.shares_acts(mats[0])) {
        quantize(acts, mats[0], x, prep);
        kernels::matmul(&mats, acts, outs);
    } else {
        for (i, (m, o)) in mats.iter().zip(outs.iter_mut()).enumerate() {
            // `x` is prepared by the first quantization.
            quantize(acts, m, x, prep.filter(|_| i == 0));
            kernels::matmul(&[m], acts, &mut [&mut **o]);
        }
    }
    for (l, o) in layers.iter().zip(outs.iter_mut()) {
        add_bias(l, o);
    }
    Ok(())
}

/// `o` (rows of `l`'s output) plus `l`'s bias, if it has one.
fn add_bias(l: &Linear, o: &mut [f32]) {
    if let Some(b) = l.bias_host() {
        kops::add_rows(o, b);
    }
}

impl<'a, 'c> HostOps<'a, 'c> {
    pub(super) fn new(s: &'a mut Scratch, segs: &'a [Seg], caches: &'a mut [&'c mut KvCache]) -> Self {
        let rows = segs.iter().map(|g| g.len).sum();
        Self { s, segs, rows, caches, vals: Vec::new(), used: Vec::new() }
    }

    /// A new `[rows, width]` value for the caller to fill.
    pub(super) fn input(&mut self, width: usize) -> (Act, &mut [f32]) {
        let x = self.alloc(width);
        let Val::Rows { buf, .. } = self.vals[x.0] else { unreachable!("alloc makes rows") };
        (x, &mut self.s.bufs[buf])
    }

    /// A new `[rows, width]` value in a free buffer (contents unspecified).
    fn alloc(&mut self, width: usize) -> Act {
        let buf = match self.used.iter().position(|u| !u) {
            Some(b) => b,
            None => {
                self.used.push(false);
                if self.s.bufs.len() < self.used.len() {
                    self.s.bufs.push(Vec::new());
                }
                self.used.len() - 1
            }
        };
        self.used[buf] = true;
        self.s.bufs[buf].resize(self.rows * width, 0.0);
        self.vals.push(Val::Rows { buf, width });
        Act(self.vals.len() - 1)
    }

    /// `x` computed: its buffer and width.
    fn rows_of(&mut self, x: Act) -> Result<(usize, usize)> {
        match self.vals[x.0] {
            Val::Rows { buf, width } => return Ok((buf, width)),
            Val::Normed { x: src, .. } => {
                let (src, width) = self.rows_of(src)?;
                let out = self.alloc(width);
                let (out_buf, _) = self.rows_of(out)?;
                let Val::Normed { norm, .. } = &self.vals[x.0] else { unreachable!() };
                let mut o = std::mem::take(&mut self.s.bufs[out_buf]);
                norm.forward_host(&self.s.bufs[src], &mut o);
                self.s.bufs[out_buf] = o;
                self.vals[x.0] = Val::Rows { buf: out_buf, width };
            }
            Val::Gated { gate, up, f } => {
                let ((g, width), (u, _)) = (self.rows_of(gate)?, self.rows_of(up)?);
                let mut gb = std::mem::take(&mut self.s.bufs[g]);
                gate_rows(f, &mut gb, &self.s.bufs[u]);
                self.s.bufs[g] = gb;
                self.vals[x.0] = Val::Rows { buf: g, width };
            }
            Val::Gelu { x: src } => {
                let (b, width) = self.rows_of(src)?;
                kernels::gelu(&mut self.s.bufs[b]);
                self.vals[x.0] = Val::Rows { buf: b, width };
            }
        }
        self.rows_of(x)
    }

    /// The products of `x` by up to three matrices, a pending norm or gate
    /// of `x` applied to each row as it is quantized.
    fn products(&mut self, x: Act, layers: &[&Linear]) -> Result<Vec<Act>> {
        let outs: Vec<Act> =
            layers.iter().map(|l| host(l).map(|m| m.rows())).collect::<Result<Vec<_>>>()?.into_iter().map(|w| self.alloc(w)).collect();
        let out_bufs: Vec<usize> = outs.iter().map(|o| self.rows_of(*o).map(|(b, _)| b)).collect::<Result<_>>()?;
        let mut taken: Vec<Vec<f32>> = out_bufs.iter().map(|&b| std::mem::take(&mut self.s.bufs[b])).collect();
        let mut out_slices: Vec<&mut [f32]> = taken.iter_mut().map(|v| v.as_mut_slice()).collect();
        let result = match &self.vals[x.0] {
            Val::Rows { buf, .. } => {
                let buf = *buf;
                let mut input = std::mem::take(&mut self.s.bufs[buf]);
                let r = matmul(&mut self.s.acts, &mut input, None, layers, &mut out_slices);
                self.s.bufs[buf] = input;
                r
            }
            Val::Normed { x: src, norm } => {
                let (src, norm) = (*src, norm.clone());
                let (src_buf, width) = self.rows_of(src)?;
                // The normalized rows are kept: a second consumer reads them.
                let normed = self.alloc(width);
                let (nb, _) = self.rows_of(normed)?;
                let mut input = std::mem::take(&mut self.s.bufs[nb]);
                let src = &self.s.bufs[src_buf];
                let prep = |r: usize, row: &mut [f32]| norm.forward_host(&src[r * width..(r + 1) * width], row);
                let r = matmul(&mut self.s.acts, &mut input, Some(&prep), layers, &mut out_slices);
                self.s.bufs[nb] = input;
                self.vals[x.0] = Val::Rows { buf: nb, width };
                r
            }
            Val::Gated { gate, up, f } => {
                let (gate, up, f) = (*gate, *up, *f);
                let ((gb, width), (ub, _)) = (self.rows_of(gate)?, self.rows_of(up)?);
                let mut input = std::mem::take(&mut self.s.bufs[gb]);
                let up = &self.s.bufs[ub];
                let prep = |r: usize, row: &mut [f32]| gate_rows(f, row, &up[r * width..(r + 1) * width]);
                let r = matmul(&mut self.s.acts, &mut input, Some(&prep), layers, &mut out_slices);
                self.s.bufs[gb] = input;
                self.vals[x.0] = Val::Rows { buf: gb, width };
                r
            }
            Val::Gelu { x: src } => {
                let src = *src;
                let (b, width) = self.rows_of(src)?;
                let mut input = std::mem::take(&mut self.s.bufs[b]);
                let prep = |_: usize, row: &mut [f32]| kernels::gelu(row);
                let r = matmul(&mut self.s.acts, &mut input, Some(&prep), layers, &mut out_slices);
                self.s.bufs[b] = input;
                self.vals[x.0] = Val::Rows { buf: b, width };
                r
            }
        };
        drop(out_slices);
        for (b, v) in out_bufs.into_iter().zip(taken) {
            self.s.bufs[b] = v;
        }
        result.map(|()| outs)
    }

    /// The rows of a computed value.
    pub(super) fn rows(&mut self, x: Act) -> Result<&[f32]> {
        let (buf, width) = self.rows_of(x)?;
        Ok(&self.s.bufs[buf][..self.rows * width])
    }

    /// Frees every value but `keep` (a block's output), which becomes the only handle.
    pub(super) fn end_block(&mut self, keep: Act) -> Result<Act> {
        let (buf, width) = self.rows_of(keep)?;
        self.vals.clear();
        self.used.iter_mut().for_each(|u| *u = false);
        self.used[buf] = true;
        self.vals.push(Val::Rows { buf, width });
        Ok(Act(0))
    }

    /// `norm(x) · Wᵀ` for rows `pick` of `x` only (each item's last
    /// position, before the LM head), in the scratch's head buffers.
    pub(super) fn head(&mut self, x: Act, pick: &[usize], norm: &Norm, output: &Linear) -> Result<&[f32]> {
        let (buf, width) = self.rows_of(x)?;
        let vocab = host(output)?.rows();
        let s = &mut *self.s;
        let [normed, logits] = &mut s.head;
        normed.resize(pick.len() * width, 0.0);
        logits.resize(pick.len() * vocab, 0.0);
        for (&r, out) in pick.iter().zip(normed.chunks_exact_mut(width)) {
            norm.forward_host(&s.bufs[buf][r * width..(r + 1) * width], out);
        }
        matmul(&mut s.acts, normed, None, &[output], &mut [logits])?;
        Ok(logits)
    }
}

/// `g = f(g) · u` row-wise.
fn gate_rows(f: Gate, g: &mut [f32], u: &[f32]) {
    match f {
        Gate::Silu => kernels::silu_mul(g, u),
        Gate::GeluTanh => kernels::gelu_mul(g, u),
    }
}

impl Ops for HostOps<'_, '_> {
    fn linear(&mut self, x: Act, w: &Linear) -> Result<Act> {
        Ok(self.products(x, &[w])?[0])
    }

    fn project(&mut self, x: Act, p: &Projections) -> Result<Vec<Act>> {
        let layers: Vec<&Linear> = p.separate().iter().collect();
        if layers.is_empty() {
            return Err(Error::InvalidRequest("a host slice was given stacked projections".into()));
        }
        self.products(x, &layers)
    }

    fn norm(&mut self, x: Act, norm: &Norm) -> Result<Act> {
        self.vals.push(Val::Normed { x, norm: norm.clone() });
        Ok(Act(self.vals.len() - 1))
    }

    fn glu(&mut self, gate: Act, up: Act, f: Gate) -> Result<Act> {
        self.vals.push(Val::Gated { gate, up, f });
        Ok(Act(self.vals.len() - 1))
    }

    fn gelu(&mut self, x: Act) -> Result<Act> {
        self.vals.push(Val::Gelu { x });
        Ok(Act(self.vals.len() - 1))
    }

    fn add(&mut self, a: Act, b: Act) -> Result<Act> {
        let ((ab, width), (bb, _)) = (self.rows_of(a)?, self.rows_of(b)?);
        let out = self.alloc(width);
        let (ob, _) = self.rows_of(out)?;
        let mut o = std::mem::take(&mut self.s.bufs[ob]);
        for ((o, x), y) in o.iter_mut().zip(&self.s.bufs[ab]).zip(&self.s.bufs[bb]) {
            *o = x + y;
        }
        self.s.bufs[ob] = o;
        Ok(out)
    }

    fn scale(&mut self, x: Act, s: f32) -> Result<Act> {
        let (xb, width) = self.rows_of(x)?;
        let out = self.alloc(width);
        let (ob, _) = self.rows_of(out)?;
        let mut o = std::mem::take(&mut self.s.bufs[ob]);
        for (o, x) in o.iter_mut().zip(&self.s.bufs[xb]) {
            *o = x * s;
        }
        self.s.bufs[ob] = o;
        Ok(out)
    }

    /// The routed experts in index order, a region's worth at a time: every
    /// expert's gate and up in one parallel region, then every expert's
    /// down in another, each expert's weights read once for all its rows.
    fn moe(&mut self, x: Act, e: &Experts) -> Result<Act> {
        let logits = self.linear(x, &e.router)?;
        let ((xb, hidden), (lb, n)) = (self.rows_of(x)?, self.rows_of(logits)?);
        let mut probs = self.s.bufs[lb][..self.rows * n].to_vec();
        probs.chunks_exact_mut(n).for_each(kernels::softmax);
        let routed = e.route(&probs);
        let out = self.alloc(hidden);
        let (ob, _) = self.rows_of(out)?;
        let s = &mut *self.s;
        let mut y = std::mem::take(&mut s.bufs[ob]);
        y.fill(0.0);
        let active: Vec<usize> = (0..routed.len()).filter(|&i| !routed[i].is_empty()).collect();
        // A decode step's one row is every expert's input: quantized once
        // (for the first expert's format, which the others normally share).
        let single = self.rows == 1;
        let Some(&i) = active.first() else {
            s.bufs[ob] = y;
            return Ok(out);
        };
        let first = host(&e.experts[i].gate)?;
        if single {
            s.acts.quantize_for(first, &s.bufs[xb]);
        }
        for chunk in active.chunks(kernels::MAX_MATS / 2) {
            if s.moe.len() < chunk.len() {
                s.moe.resize_with(chunk.len(), ExpertRows::default);
            }
            // Each expert's rows gathered and quantized, all in one region.
            if !single {
                let mut jobs = Vec::with_capacity(chunk.len());
                for (b, &i) in s.moe.iter_mut().zip(chunk) {
                    b.input.clear();
                    routed[i].iter().for_each(|&(r, _)| b.input.extend_from_slice(&s.bufs[xb][r * hidden..(r + 1) * hidden]));
                    jobs.push(kernels::Quantize { acts: &mut b.acts, w: host(&e.experts[i].gate)?, x: &mut b.input });
                }
                kernels::quantize_all(&mut jobs, &|_, _, _| {});
            }

            // Every expert's gate and up in one region.
            let mut ins = Vec::with_capacity(2 * chunk.len());
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(2 * chunk.len());
            for (b, &i) in s.moe.iter_mut().zip(chunk) {
                let (gate, up) = (host(&e.experts[i].gate)?, host(&e.experts[i].up)?);
                let ExpertRows { input, gate: g, up: u, acts, up_acts, .. } = b;
                let input = if single { &s.bufs[xb][..] } else { &input[..] };
                let m = routed[i].len();
                g.resize(m * gate.rows(), 0.0);
                u.resize(m * up.rows(), 0.0);
                let gate_acts = match (single, gate.shares_acts(first)) {
                    (true, true) => &s.acts,
                    (true, false) => {
                        acts.quantize_for(gate, input);
                        &*acts
                    }
                    (false, _) => &*acts,
                };
                let up_acts = if up.shares_acts(gate) {
                    gate_acts
                } else {
                    up_acts.quantize_for(up, input);
                    &*up_acts
                };
                ins.extend([(gate, gate_acts), (up, up_acts)]);
                outs.extend([&mut g[..], &mut u[..]]);
            }
            kernels::matmul_products(&ins, &mut outs);

            // The gated rows, quantized for the downs in one region.
            let mut jobs = Vec::with_capacity(chunk.len());
            let mut ups = Vec::with_capacity(chunk.len());
            for (b, &i) in s.moe.iter_mut().zip(chunk) {
                let expert = &e.experts[i];
                add_bias(&expert.gate, &mut b.gate);
                add_bias(&expert.up, &mut b.up);
                b.down.resize(routed[i].len() * hidden, 0.0);
                let ExpertRows { gate, up, acts, .. } = b;
                ups.push((&up[..], up.len() / routed[i].len()));
                jobs.push(kernels::Quantize { acts, w: host(&expert.down)?, x: gate });
            }
            kernels::quantize_all(&mut jobs, &|j, r, row| {
                let (up, ffn) = ups[j];
                gate_rows(e.gate, row, &up[r * ffn..(r + 1) * ffn])
            });

            // Every expert's down in one region.
            let mut ins = Vec::with_capacity(chunk.len());
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(chunk.len());
            for (b, &i) in s.moe.iter_mut().zip(chunk) {
                ins.push((host(&e.experts[i].down)?, &b.acts));
                outs.push(&mut b.down[..]);
            }
            kernels::matmul_products(&ins, &mut outs);

            for (b, &i) in s.moe.iter_mut().zip(chunk) {
                add_bias(&e.experts[i].down, &mut b.down);
                for (&(r, w), d) in routed[i].iter().zip(b.down.chunks_exact(hidden)) {
                    for (o, &v) in y[r * hidden..(r + 1) * hidden].iter_mut().zip(d) {
                        *o += w * v;
                    }
                }
            }
        }
        s.bufs[ob] = y;
        Ok(out)
    }

    /// Rotates q and k in their buffers (the block does not read them again).
    fn attention(&mut self, q: Act, k: Act, v: Act, layer: usize, attn: &Attention) -> Result<Act> {
        let (hd, nh, nkv) = (attn.head_dim, attn.n_heads, attn.n_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let ((qb, qw), (kb, kw), (vb, vw)) = (self.rows_of(q)?, self.rows_of(k)?, self.rows_of(v)?);
        if (qw, kw, vw) != (q_dim, kv_dim, kv_dim) {
            return Err(Error::InvalidRequest(format!("attention of {nh}×{hd} / {nkv}×{hd} heads given rows of {qw}, {kw}, {vw}")));
        }
        let out = self.alloc(q_dim);
        let (ob, _) = self.rows_of(out)?;

        // Each item's cache buffers, shared by the tasks below, which write
        // disjoint rows of them (phase one) and then only read (phase two).
        self.s.kv.clear();
        for cache in self.caches.iter_mut() {
            let kv = cache.host_layer_mut(layer).ok_or_else(|| Error::InvalidRequest("a host slice was given a device KV cache".into()))?;
            let capacity = kv.rows;
            self.s.kv.push(CacheLayer { k: kernels::SendPtr(kv.k.as_mut_ptr()), v: kernels::SendPtr(kv.v.as_mut_ptr()), capacity });
        }
        let bufs = &mut self.s.bufs;
        let (qp, kp) = (kernels::SendPtr(bufs[qb].as_mut_ptr()), kernels::SendPtr(bufs[kb].as_mut_ptr()));
        let att = kernels::SendPtr(bufs[ob].as_mut_ptr());
        let (v, kv_bufs, segs) = (&bufs[vb], &self.s.kv, self.segs);
        let scale = 1.0 / (attn.score_dim as f32).sqrt();
        let window = attn.window.unwrap_or(usize::MAX);
        // One task per row and K/V head, in two parallel regions: normalize
        // and rotate the row's heads and append its K/V to the cache, then
        // (once every task has, so a prefill row sees the rows before it)
        // attend. The query heads sharing a K/V head go through the kernels
        // together, which read each cache row once.
        let group = nh / nkv;
        let pool = kernels::pool();
        pool.run(&|t| {
            for_each_task(segs, nkv, t, pool.threads(), |seg, i, j| {
                let (g, c) = (segs[seg], kv_bufs[seg]);
                let (row, p) = (g.start + i, g.pos + i);
                // SAFETY: the heads of K/V head j in row `row`, and cache row p
                // of head j, are this task's alone.
                let (q, k) = unsafe { (qp.slice(row * q_dim + j * group * hd, group * hd), kp.slice(row * kv_dim + j * hd, hd)) };
                if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
                    qn.forward_host_in_place(q);
                    kn.forward_host_in_place(k);
                }
                attn.rope.apply_host(q, group, p);
                attn.rope.apply_host(k, 1, p);
                let dst = (j * c.capacity + p) * hd;
                // SAFETY: cache row p of K/V head j is this task's alone (phase one
                // writes disjoint rows; nothing reads them before the next region).
                unsafe { c.k.slice(dst, hd) }.convert_from_f32_slice(k);
                unsafe { c.v.slice(dst, hd) }.convert_from_f32_slice(&v[row * kv_dim + j * hd..][..hd]);
            });
        });
        // Attend: a task per row, K/V head and span of the cache (one span
        // unless the row sees more than `kops::SPAN` rows); several spans'
        // partial results are combined after.
        let shape = |c: &CacheLayer| AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd, capacity: c.capacity, scale, window };
        let tasks = &mut self.s.attn_tasks;
        tasks.clear();
        let mut slots = 0;
        for (seg, g) in segs.iter().enumerate() {
            for i in 0..g.len {
                let spans = shape(&kv_bufs[seg]).spans(g.pos + i);
                for j in 0..nkv {
                    let slot = slots;
                    if spans > 1 {
                        slots += spans;
                    }
                    tasks.extend((0..spans).map(|span| AttnTask { seg, i, j, span, spans, slot }));
                }
            }
        }
        // Per slot (a span of a row's K/V head): its heads' outputs, then their maxima and sums.
        let part_len = group * (hd + 2);
        self.s.attn_parts.resize(slots * part_len, 0.0);
        let parts = kernels::SendPtr(self.s.attn_parts.as_mut_ptr());
        let tasks = &*tasks;
        pool.run(&|t| {
            for task in tasks.iter().skip(t).step_by(pool.threads()) {
                let (g, c) = (segs[task.seg], kv_bufs[task.seg]);
                let (row, heads) = (g.start + task.i, task.j * group * hd..(task.j + 1) * group * hd);
                let len = nkv * c.capacity * hd;
                // SAFETY: nothing writes the caches or q in this phase.
                let (k, v, q) = unsafe { (c.k.read(0, len), c.v.read(0, len), qp.read(row * q_dim + heads.start, heads.len())) };
                if task.spans == 1 {
                    // SAFETY: these heads of row `row` are written by this task only.
                    let out = unsafe { att.slice(row * q_dim + heads.start, heads.len()) };
                    kops::attend(shape(&c), q, k, v, g.pos + task.i, task.j, out);
                } else {
                    // SAFETY: slot `slot + span` is this task's alone.
                    let part = unsafe { parts.slice((task.slot + task.span) * part_len, part_len) };
                    let (out, ml) = part.split_at_mut(group * hd);
                    kops::attend_span(shape(&c), q, k, v, g.pos + task.i, task.j, task.span, out, ml);
                }
            }
        });
        if slots > 0 {
            pool.run(&|t| {
                for task in tasks.iter().filter(|t| t.spans > 1 && t.span == 0).skip(t).step_by(pool.threads()) {
                    let (row, heads) = (segs[task.seg].start + task.i, task.j * group * hd..(task.j + 1) * group * hd);
                    // SAFETY: the spans' slots were written in the region before
                    // (read only now); these heads of row `row` are this task's alone.
                    let spans = unsafe { parts.read(task.slot * part_len, task.spans * part_len) };
                    let out = unsafe { att.slice(row * q_dim + heads.start, heads.len()) };
                    kops::combine_spans(group, hd, spans, out);
                }
            });
        }
        self.s.kv.clear();
        Ok(out)
    }
}
