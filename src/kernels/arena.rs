//! Weight memory in transparent huge pages.
//!
//! A decode step streams every weight once. With 4 KiB pages that is a TLB
//! miss, and a fresh start for the hardware prefetcher, every 4 KiB; with
//! 2 MiB pages a model's weights span a few hundred pages. Linux backs only
//! whole 2 MiB-aligned ranges of a mapping that asked for it
//! (`MADV_HUGEPAGE`; THP's "madvise" mode is the usual default), so a
//! 200 KiB matrix in a mapping of its own would never get one. Buffers are
//! therefore carved one after another out of shared 32 MiB chunks; a chunk
//! is unmapped when the last buffer in it is dropped. A slice's matrices,
//! loaded in order, share chunks with their neighbours: at most one
//! partly-used chunk per load boundary outlives its other tenants.
//!
//! Elsewhere than Linux, or where the kernel refuses the mapping, callers
//! fall back to ordinary vectors ([`HugeBuf::zeroed`] returns `None`).

use std::sync::{Arc, Mutex};

/// Huge page size and a chunk's size.
const HUGE: usize = 2 << 20;
const CHUNK: usize = 32 << 20;
/// Buffers start on cache lines.
const ALIGN: usize = 64;
#[cfg(target_os = "linux")]
const PAGE: usize = 4096;

/// One anonymous mapping, 2 MiB-aligned, advised to use huge pages.
struct Chunk {
    base: *mut u8,
    size: usize,
    /// The mapping as made (it is larger than `size`, to align `base`).
    map: *mut libc::c_void,
    map_len: usize,
}

// SAFETY: the mapping is plain memory; who may touch which bytes is decided
// by the `HugeBuf`s carved from it, which never overlap.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    #[cfg(target_os = "linux")]
    fn new(size: usize) -> Option<Self> {
        let map_len = size + HUGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let map = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        let base = (map as usize).next_multiple_of(HUGE) as *mut u8;
        // SAFETY: advice over whole pages inside the mapping; a refusal (THP
        // compiled out) leaves ordinary pages, which still work.
        unsafe { libc::madvise(base.cast(), size, libc::MADV_HUGEPAGE) };
        Some(Self { base, size, map, map_len })
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_size: usize) -> Option<Self> {
        None
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the mapping made in `new`, unmapped once: no `HugeBuf`
        // points into it any more (each holds the chunk alive).
        unsafe {
            libc::munmap(self.map, self.map_len);
        }
    }
}

/// The chunk new buffers are carved from, and where its free space starts.
static CURRENT: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// Bytes in huge pages, zeroed until written, owned alone.
pub struct HugeBuf {
    chunk: Arc<Chunk>,
    offset: usize,
    len: usize,
}

// SAFETY: a buffer's bytes are its own (buffers never overlap); access goes
// through `&self` / `&mut self` like a `Vec`'s.
unsafe impl Send for HugeBuf {}
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    /// `len` zero bytes, from the current chunk when they fit, else from a
    /// new one (a buffer larger than a chunk gets a chunk of its own).
    pub fn zeroed(len: usize) -> Option<Self> {
        let need = len.max(1).next_multiple_of(ALIGN);
        if need > CHUNK / 2 {
            let chunk = Arc::new(Chunk::new(need.next_multiple_of(HUGE))?);
            return Some(Self { chunk, offset: 0, len });
        }
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let fits = current.as_ref().is_some_and(|(c, free)| c.size - free >= need);
        if !fits {
            *current = Some((Arc::new(Chunk::new(CHUNK)?), 0));
        }
        let (chunk, free) = current.as_mut().expect("a chunk with room");
        let buf = Self { chunk: chunk.clone(), offset: *free, len };
        *free += need;
        Some(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: within the chunk: `offset + len <= size`.
        unsafe { self.chunk.base.add(self.offset) }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: this buffer's own range of a live mapping.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and no other buffer overlaps this range.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast_mut(), self.len) }
    }
}

impl Drop for HugeBuf {
    /// Hands this buffer's whole pages back to the system while its chunk
    /// lives on for other buffers (the chunk itself is unmapped with its
    /// last one). A matrix split into parts at load (a fused QKV tensor, a
    /// stack of experts) would otherwise stay resident beside its parts.
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if Arc::strong_count(&self.chunk) > 1 {
            let (start, end) = (self.as_ptr() as usize, self.as_ptr() as usize + self.len);
            let (start, end) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if end > start {
                // SAFETY: whole pages inside this buffer's own range, which
                // nothing reads or writes again (ranges are never reused).
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
            }
        }
    }
}

impl std::fmt::Debug for HugeBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers are disjoint, zeroed, cache-line aligned, and a chunk goes
    /// when its last buffer does.
    #[test]
    fn buffers_are_disjoint_and_their_chunk_lives_as_long_as_they_do() {
        let Some(mut a) = HugeBuf::zeroed(100_000) else { return };
        let mut b = HugeBuf::zeroed(300_000).unwrap();
        assert!(a.bytes().iter().all(|&x| x == 0) && b.bytes().iter().all(|&x| x == 0));
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        a.bytes_mut().fill(1);
        b.bytes_mut().fill(2);
        assert!(a.bytes().iter().all(|&x| x == 1) && b.bytes().iter().all(|&x| x == 2));
        let (ra, rb) = (a.as_ptr() as usize..a.as_ptr() as usize + a.len(), b.as_ptr() as usize..b.as_ptr() as usize + b.len());
        assert!(ra.end <= rb.start || rb.end <= ra.start, "{ra:?} and {rb:?} overlap");
        // A buffer larger than half a chunk has one of its own, 2 MiB-aligned.
        let big = HugeBuf::zeroed(CHUNK).unwrap();
        assert_eq!(big.as_ptr() as usize % HUGE, 0);
        assert!(!Arc::ptr_eq(&big.chunk, &a.chunk));
        let weak = Arc::downgrade(&big.chunk);
        drop(big);
        assert!(weak.upgrade().is_none(), "the chunk outlived its only buffer");
    }

    /// A buffer dropped while its chunk lives on (a fused tensor split into
    /// parts) hands its pages back: none of its whole pages stays resident.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_dropped_buffer_leaves_no_page_resident() {
        let Some(mut a) = HugeBuf::zeroed(1 << 20) else { return };
        let _neighbour = HugeBuf::zeroed(1 << 20).unwrap();
        a.bytes_mut().fill(7);
        let (start, end) = ((a.as_ptr() as usize).next_multiple_of(PAGE), (a.as_ptr() as usize + a.len()) / PAGE * PAGE);
        let resident = |start: usize, end: usize| {
            let mut pages = vec![0u8; (end - start) / PAGE];
            // SAFETY: a query on whole pages of a mapping the test still holds.
            assert_eq!(unsafe { libc::mincore(start as *mut libc::c_void, end - start, pages.as_mut_ptr()) }, 0);
            pages.iter().filter(|&&p| p & 1 == 1).count()
        };
        assert_eq!(resident(start, end), (end - start) / PAGE, "written pages are resident");
        drop(a);
        assert_eq!(resident(start, end), 0, "pages of a dropped buffer stayed resident");
    }
}
