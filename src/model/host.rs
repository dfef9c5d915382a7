//! The CPU path of a slice: the same block math as `block.rs`, over plain f32
//! buffers with the project's kernels (`crate::kernels`).
//!
//! One call runs a batch: the rows of every item (a decode token of one
//! session, a prefill chunk of another) are stacked into one activation
//! matrix, so each weight row is read once per step for all of them; only
//! attention is per item, against that item's own KV cache. Buffers live in
//! a [`Scratch`] reused from call to call: after the first steps, a decode
//! step allocates nothing but its output.
//!
//! A row's result does not depend on the rows batched with it (the matrix
//! kernels guarantee it per row, attention is per item), so a session gets
//! the same tokens alone or batched.

use candle_core::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::block::Block;
use super::kv_cache::KvCache;
use super::rope::Rope;
use super::slice::{ModelSlice, SliceOutput};
use super::weights::Linear;
use crate::error::{Error, Result};
use crate::kernels::ops::{self, AttnShape};
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
    h: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    tmp: Vec<f32>,
    logits: Vec<f32>,
    acts: QActs,
    /// The batch items' cache buffers for the layer being run (empty between calls).
    kv: Vec<CacheLayer>,
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
struct Seg {
    start: usize,
    len: usize,
    pos: usize,
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

fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

fn host(l: &Linear) -> &QMatrix {
    l.host().expect("a host slice holds only host linears (checked at load)")
}

/// Work on each input row, `(row index, row)`, done in place just before
/// the row is quantized, in the same parallel region.
type Prep<'a> = Option<&'a (dyn Fn(usize, &mut [f32]) + Sync)>;

/// `outs[i] = prep(x) · Wᵢᵀ (+ bᵢ)` for up to three layers reading the same
/// `x`: quantized once and multiplied in one parallel region when their
/// weight types share an activation format (the usual file), else one by one.
fn project(acts: &mut QActs, x: &mut [f32], prep: Prep, layers: &[&Linear], outs: &mut [&mut [f32]]) {
    let n = layers.len();
    assert!((1..=3).contains(&n), "one to three projections of one input");
    let quantize = |acts: &mut QActs, m: &QMatrix, x: &mut [f32], prep: Prep| match prep {
        Some(prep) => acts.prepare_and_quantize_for(m, x, prep),
        None => acts.quantize_for(m, x),
    };
    let first = host(layers[0]);
    if layers.iter().all(|l| host(l).shares_acts(first)) {
        quantize(acts, first, x, prep);
        let mats: [&QMatrix; 3] = std::array::from_fn(|i| host(layers[i.min(n - 1)]));
        kernels::matmul(&mats[..n], acts, outs);
    } else {
        for (i, (l, o)) in layers.iter().zip(outs.iter_mut()).enumerate() {
            // `x` is prepared by the first quantization.
            quantize(acts, host(l), x, prep.filter(|_| i == 0));
            kernels::matmul(&[host(l)], acts, &mut [&mut **o]);
        }
    }
    for (l, o) in layers.iter().zip(outs.iter_mut()) {
        if let Some(b) = l.bias_host() {
            ops::add_rows(o, b);
        }
    }
}

impl Block {
    /// The block over every row in `s.h` (`[rows, hidden]`), in place.
    fn forward_host(&self, s: &mut Scratch, segs: &[Seg], caches: &mut [&mut KvCache], layer: usize, rope: &Rope) {
        let rows: usize = segs.iter().map(|g| g.len).sum();
        let hidden = s.h.len() / rows;
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let xn = sized(&mut s.xn, rows * hidden);
        let (q, k, v) = (sized(&mut s.q, rows * q_dim), sized(&mut s.k, rows * kv_dim), sized(&mut s.v, rows * kv_dim));
        let [wq, wk, wv] = self.qkv.separate() else { unreachable!("host blocks keep Q, K, V apart (checked by is_host)") };
        let h = &s.h;
        let norm = |r: usize, row: &mut [f32]| self.attn_norm.forward_host(&h[r * hidden..(r + 1) * hidden], row);
        project(&mut s.acts, xn, Some(&norm), &[wq, wk, wv], &mut [q, k, v]);

        // Each item's cache buffers, shared by the tasks below, which write
        // disjoint rows of them (phase one) and then only read (phase two).
        s.kv.clear();
        for cache in caches.iter_mut() {
            let capacity = cache.capacity();
            let kv = cache.host_layer_mut(layer).expect("host caches only (checked by the caller)");
            s.kv.push(CacheLayer { k: kernels::SendPtr(kv.k.as_mut_ptr()), v: kernels::SendPtr(kv.v.as_mut_ptr()), capacity });
        }
        let (qp, kp) = (kernels::SendPtr(s.q.as_mut_ptr()), kernels::SendPtr(s.k.as_mut_ptr()));
        let att = kernels::SendPtr(sized(&mut s.att, rows * q_dim).as_mut_ptr());
        let (v, kv_bufs) = (&s.v, &s.kv);
        // One task per row and K/V head, in two phases of one parallel
        // region: rotate the row's heads and append its K/V to the cache,
        // then (once every task has, so a prefill row sees the rows before
        // it) attend. The query heads sharing a K/V head go through the
        // kernels together, which read each cache row once.
        let group = nh / nkv;
        let pool = kernels::pool();
        let barrier = kernels::pool::Barrier::new(pool);
        pool.run(&|t| {
            for_each_task(segs, nkv, t, pool.threads(), |seg, i, j| {
                let (g, c) = (segs[seg], kv_bufs[seg]);
                let (row, p) = (g.start + i, g.pos + i);
                // SAFETY: the heads of K/V head j in row `row`, and cache row p
                // of head j, are this task's alone.
                let (q, k) = unsafe { (qp.slice(row * q_dim + j * group * hd, group * hd), kp.slice(row * kv_dim + j * hd, hd)) };
                rope.apply_host(q, group, hd, p);
                rope.apply_host(k, 1, hd, p);
                let dst = (j * c.capacity + p) * hd;
                unsafe { c.k.slice(dst, hd) }.convert_from_f32_slice(k);
                unsafe { c.v.slice(dst, hd) }.convert_from_f32_slice(&v[row * kv_dim + j * hd..][..hd]);
            });
            barrier.wait();
            for_each_task(segs, nkv, t, pool.threads(), |seg, i, j| {
                let (g, c) = (segs[seg], kv_bufs[seg]);
                let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd, capacity: c.capacity };
                let (row, heads) = (g.start + i, j * group * hd..(j + 1) * group * hd);
                let len = nkv * c.capacity * hd;
                // SAFETY: nothing writes the caches or q in this phase; these
                // heads of row `row` are written by this task only.
                let (k, v, q) = unsafe { (c.k.read(0, len), c.v.read(0, len), qp.read(row * q_dim + heads.start, heads.len())) };
                let out = unsafe { att.slice(row * q_dim + heads.start, heads.len()) };
                ops::attend(shape, q, k, v, g.pos + i, j, out);
            });
        });
        s.kv.clear();

        let tmp = sized(&mut s.tmp, rows * hidden);
        project(&mut s.acts, &mut s.att[..rows * q_dim], None, &[&self.o], &mut [tmp]);
        ops::add(&mut s.h, &s.tmp[..rows * hidden]);

        let [wgate, wup] = self.gate_up.separate() else { unreachable!("host blocks keep gate and up apart (checked by is_host)") };
        let ffn = host(wgate).rows();
        let (gate, up) = (sized(&mut s.gate, rows * ffn), sized(&mut s.up, rows * ffn));
        let h = &s.h;
        let norm = |r: usize, row: &mut [f32]| self.ffn_norm.forward_host(&h[r * hidden..(r + 1) * hidden], row);
        project(&mut s.acts, &mut s.xn[..rows * hidden], Some(&norm), &[wgate, wup], &mut [gate, up]);
        let up = &s.up;
        let swiglu = |r: usize, row: &mut [f32]| kernels::silu_mul(row, &up[r * ffn..(r + 1) * ffn]);
        project(&mut s.acts, &mut s.gate[..rows * ffn], Some(&swiglu), &[&self.down], &mut [&mut s.tmp[..rows * hidden]]);
        ops::add(&mut s.h, &s.tmp[..rows * hidden]);
    }

    /// Whether every weight of the block runs on our kernels.
    pub(super) fn is_host(&self) -> bool {
        let (qkv, gate_up) = (self.qkv.separate(), self.gate_up.separate());
        qkv.len() == 3 && gate_up.len() == 2 && qkv.iter().chain(gate_up).chain([&self.o, &self.down]).all(|l| l.host().is_some())
    }
}

impl ModelSlice {
    /// Runs several sessions' inputs as one batch; one output per item, in order.
    /// Every item is checked before any runs, so a bad one leaves all caches untouched.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<SliceOutput>> {
        let cfg = self.config();
        let hidden = cfg.hidden_size;
        let mut segs = Vec::with_capacity(items.len());
        let mut rows = 0;
        for (n, item) in items.iter().enumerate() {
            let len = match (item.input, self.embed()) {
                (HostInput::Tokens(t), Some(_)) => t.len(),
                (HostInput::Hidden(h), None) if h.len() % hidden == 0 => h.len() / hidden,
                (HostInput::Tokens(_), None) | (HostInput::Hidden(_), _) => {
                    return Err(Error::InvalidRequest(format!(
                        "batch item {n}: slice {}..{} takes {}",
                        self.layers().start,
                        self.layers().end,
                        if self.is_first() { "token ids".to_string() } else { format!("hidden states of width {hidden}") }
                    )))
                }
            };
            if len == 0 {
                return Err(Error::InvalidRequest(format!("batch item {n}: empty input")));
            }
            if !item.cache.is_host() || item.cache.n_layers() != self.n_blocks() {
                return Err(Error::InvalidRequest(format!("batch item {n}: KV cache belongs to a different slice")));
            }
            item.cache.reserve(len)?;
            if let (HostInput::Tokens(t), Some(e)) = (item.input, self.embed()) {
                if let Some(bad) = t.iter().find(|&&id| id as usize >= e.vocab_size()) {
                    return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary of {}", e.vocab_size())));
                }
            }
            segs.push(Seg { start: rows, len, pos: item.cache.len() });
            rows += len;
        }

        let mut guard = self.scratch().lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let h = sized(&mut s.h, rows * hidden);
        for (item, g) in items.iter().zip(&segs) {
            let dst = &mut h[g.start * hidden..(g.start + g.len) * hidden];
            match item.input {
                HostInput::Tokens(t) => self.embed().expect("checked above").lookup_host(t, dst)?,
                HostInput::Hidden(x) => dst.copy_from_slice(x),
            }
        }
        let mut caches: Vec<&mut KvCache> = items.iter_mut().map(|i| &mut *i.cache).collect();
        for (layer, block) in self.blocks().iter().enumerate() {
            block.forward_host(s, &segs, &mut caches, layer, self.rope());
        }
        for (c, g) in caches.iter_mut().zip(&segs) {
            c.advance(g.len);
        }

        match self.head() {
            Some((norm, output)) => {
                // Only each item's last position is sampled.
                let normed = sized(&mut s.xn, segs.len() * hidden);
                for (g, out) in segs.iter().zip(normed.chunks_exact_mut(hidden)) {
                    let last = g.start + g.len - 1;
                    norm.forward_host(&s.h[last * hidden..(last + 1) * hidden], out);
                }
                let vocab = host(output).rows();
                let logits = sized(&mut s.logits, segs.len() * vocab);
                project(&mut s.acts, &mut s.xn[..segs.len() * hidden], None, &[output], &mut [logits]);
                s.logits.chunks_exact(vocab).map(|l| Ok(SliceOutput::Logits(Tensor::from_slice(l, (1, vocab), &Device::Cpu)?))).collect()
            }
            None => segs
                .iter()
                .map(|g| {
                    let rows = &s.h[g.start * hidden..(g.start + g.len) * hidden];
                    Ok(SliceOutput::Hidden(Tensor::from_slice(rows, (1, g.len, hidden), &Device::Cpu)?))
                })
                .collect(),
        }
    }
}
