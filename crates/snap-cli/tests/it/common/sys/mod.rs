//! The only unsafe code of these tests: a shared writable mapping of a file (libc `mmap`), kept
//! in a `sys` module as the workspace's tidy check requires.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// `MAP_SHARED` read-write mapping of the first `len` bytes of a file; unmapped on drop.
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    /// Maps the first `len` (> 0) bytes of `file`, which must be open for reading and writing.
    pub fn new(file: &File, len: usize) -> io::Result<SharedMap> {
        assert!(len > 0, "empty mapping");
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: asks for a new mapping at an address the kernel chooses, so no existing memory
        // is touched; the fd is valid for the duration of the call (the mapping keeps its own
        // reference to the file).
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>()).expect("mmap returned a null mapping");
        Ok(SharedMap { ptr, len })
    }

    /// Stores `bytes` at `offset` through the mapping.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset.checked_add(bytes.len()).is_some_and(|end| end <= self.len), "write past the mapping");
        // SAFETY: the range lies inside the mapping (checked above), which stays mapped until
        // drop; `&mut self` means no slice of this mapping is borrowed meanwhile; the source is
        // ordinary memory, so the two ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset), bytes.len()) };
    }

    /// A copy of the mapped bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: reads `len` bytes from the start of the live mapping into a buffer of that size
        // that is not part of it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), out.as_mut_ptr(), self.len) };
        out
    }

    /// `msync(MS_SYNC)`: writes the dirty pages back to the file and waits.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the address and length are exactly those of this live mapping.
        let r = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly this mapping, once; nothing borrows it any more (we own it).
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if r != 0 {
            eprintln!("munmap: {}", io::Error::last_os_error());
        }
    }
}
