//! Weights that are the checkpoint's own pages: a tensor loaded on the CPU in
//! the dtype it is stored in keeps the file's bytes where the kernel already
//! has them (the page cache), mapped into the process, instead of a copy in
//! fresh memory. Loading then costs what reading the file costs — no page of
//! anonymous memory zeroed and no copy — and the resident set is still the
//! weights once. A tensor loaded for a GPU is copied to the device from the
//! same adopted pages, which leave the process as soon as it is.
//!
//! candle keeps a CPU tensor's data in a `Vec`, which its allocator frees.
//! So a mapped file lives in a slot of one address range reserved at the
//! first load ([`SLOT_BYTES`] per file, nothing backed until a file is mapped
//! there), an adopted tensor is a `Vec` pointing into its file's slot, and
//! the process's global allocator ([`WeightsAwareAllocator`]) recognises a
//! pointer in that range with one comparison: freeing it drops the tensor's
//! pages from the process and, with the last tensor of the file, unmaps the
//! file. Every other allocation goes to the system allocator unchanged.
//!
//! The mapping is private and writable: the loaded weights are never written
//! through to the file (a write copies the page), and a read-only volume is
//! fine. The file must not be truncated while its weights are in use (the
//! checkpoint volume is mounted read-only in a pod): reading a page past a
//! new end of file would stop the process with SIGBUS.
//!
//! Where the range cannot be reserved (an address-space limit), a file is too
//! large for a slot, or every slot is taken, [`MappedFile::map`] says so and
//! the loader reads the tensors into memory instead.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space per mapped file: the largest safetensors file (shard)
/// whose tensors can be adopted. Checkpoints shard at 5–10 GB.
const SLOT_BYTES: usize = 1 << 36;

/// Files mapped at once, at most (the reserved range: 16 TiB of addresses,
/// none of it memory until a file is mapped).
const SLOTS: usize = 256;

const PAGE: usize = 4096;

/// Start of the reserved range; 0 until it is reserved (and forever, if it
/// cannot be). Read by every `dealloc`, so a plain atomic.
static REGION: AtomicUsize = AtomicUsize::new(0);

/// Per slot: the tensors adopted from its file that are still alive, plus
/// one while a [`MappedFile`] holds it; 0 is a free slot, [`TEARING_DOWN`]
/// one whose mapping is being replaced by the reservation again.
static SLOT_USERS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

const TEARING_DOWN: usize = usize::MAX;

/// The reserved range's start, reserving it on the first call.
fn region() -> Option<usize> {
    static RESERVED: OnceLock<Option<usize>> = OnceLock::new();
    *RESERVED.get_or_init(|| {
        // SAFETY: a new anonymous mapping nobody else refers to; PROT_NONE and
        // MAP_NORESERVE: address space only, no memory is committed.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SLOTS * SLOT_BYTES,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        REGION.store(base as usize, Ordering::Release);
        Some(base as usize)
    })
}

/// The slot `ptr` lies in, if it lies in the reserved range.
fn slot_of(ptr: usize) -> Option<usize> {
    let base = REGION.load(Ordering::Acquire);
    let at = ptr.wrapping_sub(base);
    (base != 0 && at < SLOTS * SLOT_BYTES).then_some(at / SLOT_BYTES)
}

/// One safetensors file mapped into a slot, from which tensors stored in the
/// dtype they are loaded in are adopted ([`Self::adopt`]). Dropping it
/// unmaps the file once no adopted tensor is left.
#[derive(Debug)]
pub(crate) struct MappedFile {
    slot: usize,
    start: usize,
    len: usize,
}

impl MappedFile {
    /// Maps `file` (of `len` bytes) into a free slot; `None` where that is
    /// not possible (see the module documentation) or the kernel refuses.
    pub(crate) fn map(file: &File, len: u64) -> Option<Self> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0 && l <= SLOT_BYTES)?;
        let base = region()?;
        let slot = (0..SLOTS).find(|&s| {
            SLOT_USERS[s]
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let start = base + slot * SLOT_BYTES;
        // SAFETY: the slot is ours (claimed above) and lies in our reservation,
        // so MAP_FIXED replaces nothing but reserved address space.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        let this = Self { slot, start, len };
        if mapped == libc::MAP_FAILED {
            drop(this); // gives the slot back (and re-reserves its addresses)
            return None;
        }
        Some(this)
    }

    /// The `bytes` at `offset` of the file as a `Vec<T>` that stays in the
    /// mapping (the caller checked that they lie in the file and hold whole
    /// `T`s); `None` when they are not aligned for `T`. Their pages are read
    /// in (from the page cache, or the disk) before it returns, by `threads`
    /// threads.
    pub(crate) fn adopt<T: Copy + Send + Sync>(
        &self,
        offset: u64,
        bytes: usize,
        threads: usize,
    ) -> Option<Vec<T>> {
        let offset = usize::try_from(offset).ok()?;
        assert!(offset + bytes <= self.len && bytes.is_multiple_of(size_of::<T>()));
        let ptr = self.start + offset;
        if bytes == 0 || !ptr.is_multiple_of(align_of::<T>()) {
            return None;
        }
        populate_read(ptr, bytes, threads);
        SLOT_USERS[self.slot].fetch_add(1, Ordering::AcqRel);
        let n = bytes / size_of::<T>();
        // SAFETY: the range lies in this file's mapping, readable and writable
        // (private), aligned for `T`, and every `T` the loader adopts is plain
        // data (any bit pattern valid). The process's global allocator is
        // `WeightsAwareAllocator`, which frees a pointer of the reserved range
        // by releasing it here (counted above), so the Vec may own it.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.slot);
    }
}

/// Reads in the pages of `[ptr, ptr + bytes)` (MADV_POPULATE_READ) in chunks
/// spread over `threads` threads, so that a cold file is read by several
/// requests at once and a warm one is mapped without a fault per page. Only a
/// speed-up: where the kernel refuses, pages fault in as they are read.
fn populate_read(ptr: usize, bytes: usize, threads: usize) {
    const CHUNK: usize = 8 << 20;
    let start = ptr / PAGE * PAGE;
    let end = ptr + bytes;
    let chunks = (end - start).div_ceil(CHUNK);
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                return;
            }
            let from = start + i * CHUNK;
            // SAFETY: within a mapping of ours; populating reads pages, it writes none.
            unsafe {
                libc::madvise(
                    from as *mut libc::c_void,
                    CHUNK.min(end - from),
                    libc::MADV_POPULATE_READ,
                )
            };
        }
    };
    let helpers = threads.min(chunks).saturating_sub(1);
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(work);
        }
        work();
    });
}

/// One user of `slot` fewer; the last one puts the reservation back over the
/// file's mapping (unmapping the file). A slot claimed again between the
/// count reaching 0 and the teardown is left to its new owner, whose
/// `MAP_FIXED` mapping replaces the old one.
fn release(slot: usize) {
    if SLOT_USERS[slot].fetch_sub(1, Ordering::AcqRel) != 1
        || SLOT_USERS[slot]
            .compare_exchange(0, TEARING_DOWN, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let base = REGION.load(Ordering::Acquire);
    // SAFETY: the slot lies in our reservation and nothing refers to it any
    // more (no user left, and claims are held off by TEARING_DOWN).
    unsafe {
        libc::mmap(
            (base + slot * SLOT_BYTES) as *mut libc::c_void,
            SLOT_BYTES,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        );
    }
    SLOT_USERS[slot].store(0, Ordering::Release);
}

/// Frees an adopted buffer: its whole pages leave the process at once (a
/// tensor replaced while loading, e.g. by a LoRA merge, does not stay
/// resident until its file's last tensor goes), then its slot loses a user.
/// The pages at its ends may hold a neighbour's bytes and stay.
fn release_adopted(ptr: usize, bytes: usize, slot: usize) {
    let start = ptr.next_multiple_of(PAGE);
    let end = (ptr + bytes) / PAGE * PAGE;
    if end > start {
        // SAFETY: whole pages of this buffer only, which nobody uses any more;
        // on a private file mapping they are dropped (read again if touched).
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
    release(slot);
}

/// The process's allocator: the system's, except that a buffer adopted from
/// a mapped file ([`MappedFile::adopt`]) is released into its mapping.
pub struct WeightsAwareAllocator;

// SAFETY: every allocation is the system allocator's; `dealloc`/`realloc`
// hand it back exactly the pointers it gave, and pointers of the reserved
// range (which the system allocator never returns: the range is mapped)
// only ever come from `MappedFile::adopt`.
unsafe impl GlobalAlloc for WeightsAwareAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr as usize) {
            Some(slot) => release_adopted(ptr as usize, layout.size(), slot),
            // SAFETY: a pointer of the system allocator, with its layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(slot) = slot_of(ptr as usize) else {
            // SAFETY: a pointer of the system allocator, with its layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        };
        // An adopted buffer that grows or shrinks moves to the heap.
        // SAFETY: the caller's contract: a valid non-zero size for this alignment.
        let moved =
            unsafe { System.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !moved.is_null() {
            // SAFETY: both ranges are valid for the bytes copied and distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            release_adopted(ptr as usize, layout.size(), slot);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: WeightsAwareAllocator = WeightsAwareAllocator;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    /// Whether the file is mapped into the process (by its inode in
    /// /proc/self/maps: other tests map other files meanwhile).
    fn is_mapped(file: &File) -> bool {
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap()).to_string();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .any(|line| line.split_whitespace().nth(4) == Some(inode.as_str()))
    }

    #[test]
    fn an_adopted_buffer_reads_the_file_and_the_last_one_unmaps_it() {
        let data: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i % 251) as u8).collect();
        let file = file_of(&data);
        let mapped = MappedFile::map(&file, data.len() as u64).expect("mapped");
        let words: Vec<u32> = mapped.adopt(4, 2 * PAGE, 2).expect("aligned");
        let tail: Vec<u8> = mapped
            .adopt(2 * PAGE as u64 + 4, PAGE + 96, 1)
            .expect("bytes");
        assert_eq!(slot_of(words.as_ptr() as usize), Some(mapped.slot));
        let expected: Vec<u32> = data[4..4 + 2 * PAGE]
            .chunks(4)
            .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, expected);
        assert_eq!(tail, data[2 * PAGE + 4..]);
        assert!(mapped.adopt::<u32>(2, 8, 1).is_none(), "unaligned for u32");
        drop(mapped);
        assert!(is_mapped(&file), "the adopted buffers keep the file mapped");
        drop(words);
        assert!(is_mapped(&file));
        drop(tail);
        assert!(!is_mapped(&file), "the last buffer unmapped the file");
    }

    #[test]
    fn writes_to_an_adopted_buffer_never_reach_the_file_and_growing_moves_it() {
        let data = vec![7u8; 2 * PAGE];
        let file = file_of(&data);
        let mapped = MappedFile::map(&file, data.len() as u64).expect("mapped");
        let mut bytes: Vec<u8> = mapped.adopt(0, 2 * PAGE, 1).expect("bytes");
        bytes[10] = 1;
        bytes.push(9); // reallocates onto the heap
        assert_eq!(slot_of(bytes.as_ptr() as usize), None);
        assert_eq!((bytes[9], bytes[10], bytes[2 * PAGE]), (7, 1, 9));
        drop((bytes, mapped));
        let mut again = vec![0u8; 2 * PAGE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut again, 0).unwrap();
        assert_eq!(again, data);
    }
}
