//! The stress test's only unsafe code: a shared, writable mapping of a file, for the fsx
//! writers' stores through `mmap` (xtask takes no crate for it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A shared, writable mapping of the start of a file; unmapped on drop.
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    /// Maps the first `len` (> 0) bytes of `file` (open for reading and writing).
    pub fn new(file: &File, len: usize) -> std::io::Result<SharedMap> {
        assert!(len > 0, "empty mapping");
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new mapping at an address the kernel chooses touches no existing memory; the
        // fd is valid for the call (the mapping keeps its own reference to the file).
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedMap { ptr: NonNull::new(addr.cast::<u8>()).expect("mmap gave a null mapping"), len })
    }

    /// Stores `bytes` at `offset`, then `msync(MS_SYNC)`.
    pub fn store(&mut self, offset: usize, bytes: &[u8]) -> std::io::Result<()> {
        assert!(offset.checked_add(bytes.len()).is_some_and(|end| end <= self.len), "a store past the mapping");
        // SAFETY: the range lies inside the mapping (checked above), mapped until drop; `&mut self`
        // means no one else uses it; the source is ordinary memory, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset), bytes.len()) };
        // SAFETY: the address and length are exactly those of this live mapping.
        let r = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly this mapping, which nothing borrows any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
