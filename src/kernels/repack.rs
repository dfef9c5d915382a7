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
//! The K-quants' group blocks, 256 values with sub-block scales, are
//! [`q4k`]'s, [`q5k`]'s and [`q6k`]'s ([`k_bytes`] each).

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
    let l = layout(t as u8);
    interleave_with(data, rows, row_bytes, t.block_bytes(), l.bytes, &|i, block, out| put(&l, i, &unpack(t, block), out));
}

/// `put(i, block, out)`: row `i`'s GGUF block into the zeroed group block `out`.
type PutRow<'a> = dyn Fn(usize, &[u8], &mut [u8]) + Sync + 'a;

/// [`interleave`] for any layout of GGUF blocks of `bsize` bytes.
fn interleave_with(data: &mut [u8], rows: usize, row_bytes: usize, bsize: usize, group_block: usize, put: &PutRow<'_>) {
    assert_eq!(data.len(), rows * row_bytes);
    assert_eq!(ROWS * bsize, group_block, "a group block holds its rows' bytes");
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
            for (b, blk) in group.chunks_exact_mut(group_block).enumerate() {
                for i in 0..ROWS {
                    let at = i * row_bytes + b * bsize;
                    put(i, &stored[at..at + bsize], blk);
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

/// Bytes of one group block of K-quant `t` (a `KQuant` discriminant).
pub const fn k_bytes(t: u8) -> usize {
    use super::KQuant;
    if t == KQuant::Q4K as u8 {
        q4k::BYTES
    } else if t == KQuant::Q5K as u8 {
        q5k::BYTES
    } else {
        q6k::BYTES
    }
}

/// Where the low 4 bits of value `v` (0..256) of row `i` sit in a K-quant
/// group block whose 32-value sub-blocks start at `qs` and take `stride`
/// bytes each, and their shift: a sub-block's first 128 bytes are laid out
/// as one block of the 4-bit types' groups.
fn k_nibble_at(qs: usize, stride: usize, i: usize, v: usize) -> (usize, u32) {
    let (s, c, j) = (v / 32, (v % 32) / 4, v % 4);
    (qs + stride * s + 32 * (c / 2) + 4 * i + j, 4 * (c % 2) as u32)
}

/// Q4_K in groups of eight interleaved rows: a group block holds the eight
/// rows' 256-value blocks in the same 1,152 bytes.
///
/// | field | offset | bytes |
/// |---|---|---|
/// | `d[8]`, f16 | 0 | 16 |
/// | `dmin[8]`, f16 | [`DMIN`] | 16 |
/// | low nibbles of the scales | [`SC`] | 32 |
/// | low nibbles of the minimums | [`M`] | 32 |
/// | top two bits of both | [`TOP`] | 32 |
/// | values | [`QS`] | 1024 |
///
/// Scales and minimums are numbered `f = 8 · sub-block + row`. Scale
/// nibble byte `k` holds scale `k` (low) and `k + 32` (high), minimum
/// nibble bytes likewise; top-bit byte `k` holds, two bits each from bit 0,
/// scale `k`, scale `k + 32`, minimum `k`, minimum `k + 32`. Sub-block `s`'s
/// 32 values take 128 bytes at `QS + 128 s`, laid out as one block of the
/// 4-bit types' groups (chunk `2j` in the low nibbles of vector `j`, chunk
/// `2j + 1` in the high ones, row `i`'s four values at bytes `4i..4i + 4`).
pub mod q4k {
    use super::super::blocks::BlockQ4K;
    use super::{read, write, ROWS};
    use half::f16;

    pub const BYTES: usize = ROWS * size_of::<BlockQ4K>();
    pub const DMIN: usize = 16;
    pub const SC: usize = 32;
    pub const M: usize = 64;
    pub const TOP: usize = 96;
    pub const QS: usize = 128;
    /// Bytes per 32-value sub-block.
    pub const SUB: usize = 128;

    /// ggml's 12-byte packing of eight 6-bit scales and eight minimums,
    /// unpacked: byte `j` of each word is sub-block `j`'s. Packed, bytes 0..4
    /// hold scales 0..4, 4..8 minimums 0..4, 8..12 the low nibbles of scales
    /// / minimums 4..8, whose top 2 bits are the top bits of bytes 0..8.
    pub fn scales_mins(packed: &[u8; 12]) -> (u64, u64) {
        let u: [u32; 3] =
            std::array::from_fn(|i| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]));
        let (k1, k2, k3) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
        let scales = (u[0] & k1) as u64 | (((u[2] & k2) | (((u[0] >> 6) & k3) << 4)) as u64) << 32;
        let mins = (u[1] & k1) as u64 | ((((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4)) as u64) << 32;
        (scales, mins)
    }

    /// The inverse of [`scales_mins`], from the values as bytes.
    pub fn pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
            p[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
            p[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
        }
        p
    }

    /// The low 4 bits of value `v` (0..256) of a Q4_K or Q5_K block's
    /// `qs`: 64 values per 32 bytes, the first 32 in the low nibbles.
    pub(super) fn nibble(qs: &[u8; 128], v: usize) -> u8 {
        (qs[32 * (v / 64) + v % 32] >> (4 * ((v / 32) % 2))) & 0xF
    }

    /// Sets the low 4 bits of value `v` in a zeroed `qs`, as [`nibble`] reads them.
    pub(super) fn set_nibble(qs: &mut [u8; 128], v: usize, x: u8) {
        qs[32 * (v / 64) + v % 32] |= x << (4 * ((v / 32) % 2));
    }

    fn at(i: usize, v: usize) -> (usize, u32) {
        super::k_nibble_at(QS, SUB, i, v)
    }

    /// Scale or minimum `f` (`which`: 0 scales, 1 minimums): its nibble's
    /// byte and shift, and its top bits' shift.
    fn scale_at(which: usize, f: usize) -> (usize, u32, u32) {
        let nib = if which == 0 { SC } else { M };
        (nib + f % 32, 4 * (f / 32) as u32, (4 * which + 2 * (f / 32)) as u32)
    }

    /// Row `i`'s scales (`d`, `dmin`, ggml's packed 6-bit scales and
    /// minimums) into a Q4_K or Q5_K group block's header.
    pub(super) fn put_header(i: usize, d: f16, dmin: f16, packed: &[u8; 12], out: &mut [u8]) {
        out[2 * i..2 * i + 2].copy_from_slice(&d.to_le_bytes());
        out[DMIN + 2 * i..DMIN + 2 * i + 2].copy_from_slice(&dmin.to_le_bytes());
        let (sc, m) = scales_mins(packed);
        for (which, vals) in [sc.to_le_bytes(), m.to_le_bytes()].iter().enumerate() {
            for (s, &x) in vals.iter().enumerate() {
                let (nib, shift, top) = scale_at(which, 8 * s + i);
                out[nib] |= (x & 0xF) << shift;
                out[TOP + (8 * s + i) % 32] |= (x >> 4) << top;
            }
        }
    }

    /// Row `lane`'s `d`, `dmin` and packed scales from a group block's header.
    pub(super) fn header(blk: &[u8], lane: usize) -> (f16, f16, [u8; 12]) {
        let h = |a: usize| f16::from_le_bytes([blk[a], blk[a + 1]]);
        let get = |which: usize| -> [u8; 8] {
            std::array::from_fn(|s| {
                let f = 8 * s + lane;
                let (nib, shift, top) = scale_at(which, f);
                ((blk[nib] >> shift) & 0xF) | (((blk[TOP + f % 32] >> top) & 3) << 4)
            })
        };
        (h(2 * lane), h(DMIN + 2 * lane), pack_scales(&get(0), &get(1)))
    }

    /// Row `i`'s GGUF block into the zeroed group block `out`.
    pub fn put(i: usize, block: &[u8], out: &mut [u8]) {
        let b: BlockQ4K = read(block);
        put_header(i, b.d, b.dmin, &b.scales, out);
        for v in 0..256 {
            let (a, shift) = at(i, v);
            out[a] |= nibble(&b.qs, v) << shift;
        }
    }

    /// Row `lane`'s block `b` of a group (`group` is its blocks) back in
    /// GGUF's layout (`out` is one block).
    pub fn original_block(group: &[u8], lane: usize, b: usize, out: &mut [u8]) {
        let blk = &group[b * BYTES..(b + 1) * BYTES];
        let mut qs = [0u8; 128];
        for v in 0..256 {
            let (a, shift) = at(lane, v);
            set_nibble(&mut qs, v, (blk[a] >> shift) & 0xF);
        }
        let (d, dmin, scales) = header(blk, lane);
        write(BlockQ4K { d, dmin, scales, qs }, out);
    }

    /// `data`'s whole groups of eight rows interleaved in place, as [`super::interleave`].
    pub fn interleave(data: &mut [u8], rows: usize, row_bytes: usize) {
        super::interleave_with(data, rows, row_bytes, size_of::<BlockQ4K>(), BYTES, &put);
    }
}

/// Q5_K in groups of eight interleaved rows: a group block holds the eight
/// rows' 256-value blocks in the same 1,408 bytes.
///
/// | field | offset | bytes |
/// |---|---|---|
/// | scales, as [`q4k`]'s | 0 | 128 |
/// | eight 32-value sub-blocks | [`QS`] | 8 × [`SUB`] |
///
/// Sub-block `s` (at `QS + SUB s`) holds its low 4 bits as [`q4k`]'s (128
/// bytes), then at [`HIGH`] within it the fifth bits (32 bytes): bit `c`
/// of byte `4i + j` is the fifth bit of value `j` of row `i`'s chunk `c`,
/// so the kernel reaches chunks `2k` and `2k + 1` by shifting the vector
/// right 2 bits per chunk pair. As Q6_K's, a group is one forward stream.
pub mod q5k {
    use super::super::blocks::BlockQ5K;
    use super::q4k::{header, nibble, put_header, set_nibble};
    use super::{read, write, ROWS};

    pub const BYTES: usize = ROWS * size_of::<BlockQ5K>();
    pub use super::q4k::QS;
    /// Bytes per 32-value sub-block.
    pub const SUB: usize = 160;
    /// Offset of the fifth bits within a sub-block.
    pub const HIGH: usize = 128;

    /// Where value `v` of row `i` sits in a group block: its low bits' byte
    /// and shift, its fifth bit's byte and bit.
    fn at(i: usize, v: usize) -> (usize, u32, usize, u32) {
        let (low, shift) = super::k_nibble_at(QS, SUB, i, v);
        let (s, c, j) = (v / 32, (v % 32) / 4, v % 4);
        (low, shift, QS + SUB * s + HIGH + 4 * i + j, c as u32)
    }

    /// Row `i`'s GGUF block into the zeroed group block `out`.
    pub fn put(i: usize, block: &[u8], out: &mut [u8]) {
        let b: BlockQ5K = read(block);
        put_header(i, b.d, b.dmin, &b.scales, out);
        for v in 0..256 {
            let (a, shift, h, bit) = at(i, v);
            out[a] |= nibble(&b.qs, v) << shift;
            out[h] |= ((b.qh[v % 32] >> (v / 32)) & 1) << bit;
        }
    }

    /// Row `lane`'s block `b` of a group (`group` is its blocks) back in
    /// GGUF's layout (`out` is one block).
    pub fn original_block(group: &[u8], lane: usize, b: usize, out: &mut [u8]) {
        let blk = &group[b * BYTES..(b + 1) * BYTES];
        let (mut qs, mut qh) = ([0u8; 128], [0u8; 32]);
        for v in 0..256 {
            let (a, shift, h, bit) = at(lane, v);
            set_nibble(&mut qs, v, (blk[a] >> shift) & 0xF);
            qh[v % 32] |= ((blk[h] >> bit) & 1) << (v / 32);
        }
        let (d, dmin, scales) = header(blk, lane);
        write(BlockQ5K { d, dmin, scales, qh, qs }, out);
    }

    /// `data`'s whole groups of eight rows interleaved in place, as [`super::interleave`].
    pub fn interleave(data: &mut [u8], rows: usize, row_bytes: usize) {
        super::interleave_with(data, rows, row_bytes, size_of::<BlockQ5K>(), BYTES, &put);
    }
}

/// Q6_K in groups of eight interleaved rows: a group block holds the eight
/// rows' 256-value blocks in the same 1,680 bytes.
///
/// | field | offset | bytes |
/// |---|---|---|
/// | `d[8]`, f16 | 0 | 16 |
/// | scales, i8, byte `8 g + row` for 16-value group `g` | [`SC`] | 128 |
/// | eight 32-value sub-blocks | [`QS`] | 8 × [`SUB`] |
///
/// Sub-block `s` (at `QS + SUB s`) holds its low 4 bits as [`q4k`]'s (128
/// bytes), then its top 2 bits at [`TOP`] within it (64 bytes): two 32-byte
/// vectors, vector `h` holding chunks `4h..4h + 4` two bits each from bit 0,
/// at the byte where the low bits' vectors hold the same value (`4i + j`).
/// Keeping each sub-block's bits together makes a group one forward stream
/// of reads: with the top bits in a plane of their own (two streams), the
/// hardware prefetcher fell behind and single-session decode ran slower
/// than on GGUF's layout (BENCHMARKS.md, session 9).
pub mod q6k {
    use super::super::blocks::BlockQ6K;
    use super::{read, write, ROWS};
    use half::f16;

    pub const BYTES: usize = ROWS * size_of::<BlockQ6K>();
    pub const SC: usize = 16;
    pub const QS: usize = 144;
    /// Bytes per 32-value sub-block.
    pub const SUB: usize = 192;
    /// Offset of the top bits within a sub-block.
    pub const TOP: usize = 128;

    /// Where value `v`'s bits sit in a GGUF block: its `ql` byte and nibble
    /// shift, its `qh` byte and 2-bit shift.
    fn gguf_at(v: usize) -> (usize, u32, usize, u32) {
        let (n, q, l) = (v / 128, (v % 128) / 32, v % 32);
        (64 * n + l + 32 * (q & 1), 4 * (q / 2) as u32, 32 * n + l, 2 * q as u32)
    }

    /// Where value `v` of row `i` sits in a group block: its low bits' byte
    /// and shift, its top bits' byte and shift.
    fn at(i: usize, v: usize) -> (usize, u32, usize, u32) {
        let (low, shift) = super::k_nibble_at(QS, SUB, i, v);
        let (s, c, j) = (v / 32, (v % 32) / 4, v % 4);
        (low, shift, QS + SUB * s + TOP + 32 * (c / 4) + 4 * i + j, 2 * (c % 4) as u32)
    }

    /// Row `i`'s GGUF block into the zeroed group block `out`.
    pub fn put(i: usize, block: &[u8], out: &mut [u8]) {
        let b: BlockQ6K = read(block);
        out[2 * i..2 * i + 2].copy_from_slice(&b.d.to_le_bytes());
        for (g, &sc) in b.scales.iter().enumerate() {
            out[SC + 8 * g + i] = sc as u8;
        }
        for v in 0..256 {
            let (l, ls, h, hs) = gguf_at(v);
            let q = ((b.ql[l] >> ls) & 0xF) | (((b.qh[h] >> hs) & 3) << 4);
            let (a, shift, t, tshift) = at(i, v);
            out[a] |= (q & 0xF) << shift;
            out[t] |= (q >> 4) << tshift;
        }
    }

    /// Row `lane`'s block `b` of a group (`group` is its blocks) back in
    /// GGUF's layout (`out` is one block).
    pub fn original_block(group: &[u8], lane: usize, b: usize, out: &mut [u8]) {
        let blk = &group[b * BYTES..(b + 1) * BYTES];
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for v in 0..256 {
            let (a, shift, t, tshift) = at(lane, v);
            let q = ((blk[a] >> shift) & 0xF) | (((blk[t] >> tshift) & 3) << 4);
            let (l, ls, h, hs) = gguf_at(v);
            ql[l] |= (q & 0xF) << ls;
            qh[h] |= (q >> 4) << hs;
        }
        let scales = std::array::from_fn(|g| blk[SC + 8 * g + lane] as i8);
        write(BlockQ6K { ql, qh, scales, d: f16::from_le_bytes([blk[2 * lane], blk[2 * lane + 1]]) }, out);
    }

    /// `data`'s whole groups of eight rows interleaved in place, as [`super::interleave`].
    pub fn interleave(data: &mut [u8], rows: usize, row_bytes: usize) {
        super::interleave_with(data, rows, row_bytes, size_of::<BlockQ6K>(), BYTES, &put);
    }
}
