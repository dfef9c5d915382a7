//! Weights in groups of eight interleaved rows: the layout of the multi-row kernels.
//!
//! A kernel that multiplies one weight row at a time ends every 32-value
//! block with a float conversion, a scale product and an add for that one
//! row, and every row with a horizontal sum: on a batch of activation rows
//! that float work, not the integer products, is what the CPU spends most of
//! its time on. With eight rows' values side by side (four values of each
//! row per 32-bit lane group), one integer product of a broadcast activation
//! chunk leaves row `i`'s partial sum in lane `i`: the float steps serve eight
//! rows at once and the result vector is the eight outputs.
//!
//! A group's block `b` (same bytes as the eight rows' blocks `b`, so a
//! repacked matrix is as large as the original):
//!
//! | field | bytes | present for |
//! |---|---|---|
//! | `d[8]` scales, f16 | 16 | all |
//! | `m[8]` minimums, f16 | 16 | Q4_1, Q5_1 |
//! | `qh[8]` fifth bits, u32 per chunk | 32 | Q5_0, Q5_1 |
//! | `qs` values | 128 (4-/5-bit) or 256 (Q8_0) | all |
//!
//! Chunk `c` (0..8) is values `4c..4c + 4` of every row; in it, byte `4i + j`
//! is row `i`'s value `4c + j`. 4-/5-bit: 32-byte vector `k` holds chunk `2k`
//! in its low nibbles and chunk `2k + 1` in its high ones; `qh` word `c`
//! holds chunk `c`'s fifth bits, bit `4i + j` for byte `4i + j`. Q8_0: vector
//! `c` is chunk `c` as signed bytes.
//!
//! Rows past the last whole group stay in GGUF's layout after the groups.

use half::f16;

use super::blocks::{high_bits, nibbles, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};
use super::WeightType;

/// Rows per group.
pub const ROWS: usize = 8;

/// Where a type's fields sit in a group's block, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// A group's block: eight GGUF blocks' worth.
    pub bytes: usize,
    /// Offset of `m[8]`, 0 for types without minimums.
    pub m: usize,
    /// Offset of `qh[8]`, 0 for types without fifth bits.
    pub qh: usize,
    pub qs: usize,
    /// Bits per value as the kernel unpacks them: 4, 5 or 8.
    pub bits: u32,
    /// What the activation sum is multiplied by to undo an unsigned offset.
    // Read by the AVX2 group kernel only (nothing is interleaved elsewhere).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub offset: i32,
}

/// The layout of weight type `t` (its discriminant, so kernels can take it as a const).
pub const fn layout(t: u8) -> Layout {
    const D: usize = 2 * ROWS;
    match t {
        t if t == WeightType::Q4_0 as u8 => Layout { bytes: 8 * size_of::<BlockQ4_0>(), m: 0, qh: 0, qs: D, bits: 4, offset: 8 },
        t if t == WeightType::Q4_1 as u8 => Layout { bytes: 8 * size_of::<BlockQ4_1>(), m: D, qh: 0, qs: 2 * D, bits: 4, offset: 0 },
        t if t == WeightType::Q5_0 as u8 => Layout { bytes: 8 * size_of::<BlockQ5_0>(), m: 0, qh: D, qs: D + 32, bits: 5, offset: 16 },
        t if t == WeightType::Q5_1 as u8 => {
            Layout { bytes: 8 * size_of::<BlockQ5_1>(), m: D, qh: 2 * D, qs: 2 * D + 32, bits: 5, offset: 0 }
        }
        _ => Layout { bytes: 8 * size_of::<BlockQ8_0>(), m: 0, qh: 0, qs: D, bits: 8, offset: 0 },
    }
}

/// One GGUF block as its parts: scale, minimum (0 without one) and the 32
/// values as stored (unsigned 4-/5-bit codes, or Q8_0's signed bytes).
struct Values {
    d: f16,
    m: f16,
    q: [u8; QK],
}

fn read<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= size_of::<T>());
    // SAFETY: T is a plain-old-data block struct; the read is unaligned.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) }
}

fn write<T: Copy>(v: T, b: &mut [u8]) {
    assert!(b.len() >= size_of::<T>());
    unsafe { std::ptr::write_unaligned(b.as_mut_ptr().cast(), v) }
}

fn pack_nibbles(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| (q[j] & 0x0F) | (q[j + QK / 2] << 4))
}

fn with_fifth_bits(q: [u8; QK], qh: [u8; 4]) -> [u8; QK] {
    let h = high_bits(qh);
    std::array::from_fn(|j| q[j] | h[j])
}

fn fifth_bits(q: &[u8; QK]) -> [u8; 4] {
    q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j).to_le_bytes()
}

fn unpack(t: WeightType, b: &[u8]) -> Values {
    let zero = f16::ZERO;
    match t {
        WeightType::Q4_0 => {
            let b: BlockQ4_0 = read(b);
            Values { d: b.d, m: zero, q: nibbles(&b.qs) }
        }
        WeightType::Q4_1 => {
            let b: BlockQ4_1 = read(b);
            Values { d: b.d, m: b.m, q: nibbles(&b.qs) }
        }
        WeightType::Q5_0 => {
            let b: BlockQ5_0 = read(b);
            Values { d: b.d, m: zero, q: with_fifth_bits(nibbles(&b.qs), b.qh) }
        }
        WeightType::Q5_1 => {
            let b: BlockQ5_1 = read(b);
            Values { d: b.d, m: b.m, q: with_fifth_bits(nibbles(&b.qs), b.qh) }
        }
        WeightType::Q8_0 => {
            let b: BlockQ8_0 = read(b);
            Values { d: b.d, m: zero, q: b.qs.map(|v| v as u8) }
        }
    }
}

fn pack(t: WeightType, v: &Values, out: &mut [u8]) {
    match t {
        WeightType::Q4_0 => write(BlockQ4_0 { d: v.d, qs: pack_nibbles(&v.q) }, out),
        WeightType::Q4_1 => write(BlockQ4_1 { d: v.d, m: v.m, qs: pack_nibbles(&v.q) }, out),
        WeightType::Q5_0 => write(BlockQ5_0 { d: v.d, qh: fifth_bits(&v.q), qs: pack_nibbles(&v.q) }, out),
        WeightType::Q5_1 => write(BlockQ5_1 { d: v.d, m: v.m, qh: fifth_bits(&v.q), qs: pack_nibbles(&v.q) }, out),
        WeightType::Q8_0 => write(BlockQ8_0 { d: v.d, qs: v.q.map(|q| q as i8) }, out),
    }
}

/// Where chunk `c` of row `i` starts in `qs`, and the shift of its nibbles (4-/5-bit).
fn chunk_at(l: &Layout, i: usize, c: usize) -> (usize, u32) {
    if l.bits == 8 {
        (l.qs + 32 * c + 4 * i, 0)
    } else {
        (l.qs + 32 * (c / 2) + 4 * i, 4 * (c % 2) as u32)
    }
}

/// Byte of `qh` and shift of the four fifth bits of chunk `c` of row `i` (bits `4i..4i + 4` of word `c`).
fn fifth_bits_at(l: &Layout, i: usize, c: usize) -> (usize, u32) {
    (l.qh + 4 * c + i / 2, 4 * (i % 2) as u32)
}

/// Row `i` of a group's block into the group block `out` (zeroed before the first row).
fn put(l: &Layout, i: usize, v: &Values, out: &mut [u8]) {
    out[2 * i..2 * i + 2].copy_from_slice(&v.d.to_le_bytes());
    if l.m != 0 {
        out[l.m + 2 * i..l.m + 2 * i + 2].copy_from_slice(&v.m.to_le_bytes());
    }
    let mask = if l.bits == 8 { 0xFF } else { 0x0F };
    for (c, q) in v.q.chunks_exact(4).enumerate() {
        let (at, shift) = chunk_at(l, i, c);
        for (o, &q) in out[at..at + 4].iter_mut().zip(q) {
            *o |= (q & mask) << shift;
        }
        if l.qh != 0 {
            let (at, shift) = fifth_bits_at(l, i, c);
            let bits = q.iter().enumerate().fold(0u8, |b, (j, &q)| b | ((q >> 4) & 1) << j);
            out[at] |= bits << shift;
        }
    }
}

/// Row `i` of a group's block, as `put` wrote it.
fn get(l: &Layout, i: usize, blk: &[u8]) -> Values {
    let h = |at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]);
    let mask = if l.bits == 8 { 0xFF } else { 0x0F };
    let mut q = [0u8; QK];
    for (c, q) in q.chunks_exact_mut(4).enumerate() {
        let (at, shift) = chunk_at(l, i, c);
        let high = if l.qh != 0 {
            let (at, shift) = fifth_bits_at(l, i, c);
            blk[at] >> shift
        } else {
            0
        };
        for (j, (q, &b)) in q.iter_mut().zip(&blk[at..at + 4]).enumerate() {
            *q = ((b >> shift) & mask) | ((high >> j) & 1) << 4;
        }
    }
    Values { d: h(2 * i), m: if l.m != 0 { h(l.m + 2 * i) } else { f16::ZERO }, q }
}

/// `data`'s `rows` rows of `row_bytes` (GGUF layout) with every whole group
/// of eight interleaved, in place: a group's interleaved blocks fill the
/// bytes its eight rows held, so only one group at a time is copied aside.
pub fn interleave(t: WeightType, data: &mut [u8], rows: usize, row_bytes: usize) {
    assert_eq!(data.len(), rows * row_bytes);
    let (l, bsize) = (layout(t as u8), t.block_bytes());
    let group_bytes = ROWS * row_bytes;
    let groups = rows / ROWS;
    let base = super::SendPtr(data.as_mut_ptr());
    // Groups are independent: split over the compute threads (this is most
    // of a model's load time otherwise).
    let pool = super::pool();
    pool.run(&|thread| {
        let mut stored = vec![0u8; group_bytes];
        for g in (thread..groups).step_by(pool.threads()) {
            // SAFETY: group g's bytes, touched by this thread only.
            let group = unsafe { base.slice(g * group_bytes, group_bytes) };
            stored.copy_from_slice(group);
            group.fill(0);
            for (b, blk) in group.chunks_exact_mut(l.bytes).enumerate() {
                for i in 0..ROWS {
                    let at = i * row_bytes + b * bsize;
                    put(&l, i, &unpack(t, &stored[at..at + bsize]), blk);
                }
            }
        }
    });
}

/// Block `b` of row `lane` of a group (`group` is its `nb` blocks) back in
/// GGUF's layout (`out` is one block).
pub fn original_block(t: WeightType, group: &[u8], lane: usize, b: usize, out: &mut [u8]) {
    let l = layout(t as u8);
    pack(t, &get(&l, lane, &group[b * l.bytes..(b + 1) * l.bytes]), out);
}
