//! File handles (`name_to_handle_at`, `open_by_handle_at`) and the filesystem UUID
//! (`FS_IOC_GETFSUUID`): the raw material of `overlay.origin`. With `xattr_at.rs` and `blank.rs`, the
//! only `unsafe` in ovl-core.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

use crate::Result;

/// The largest handle we ask the kernel for (`MAX_HANDLE_SZ`).
const MAX_HANDLE_SZ: usize = 128;

/// An exportable file handle: the filesystem's handle type and opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandle {
    /// The handle type (`FILEID_*`).
    pub handle_type: i32,
    /// The handle bytes.
    pub bytes: Vec<u8>,
}

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The file handle of `name` in `dir` (not following a final symlink).
pub fn name_to_handle(dir: impl AsFd, name: &CStr) -> Result<FileHandle> {
    name_to_handle_flags(dir, name, 0)
}

fn name_to_handle_flags(dir: impl AsFd, name: &CStr, flags: libc::c_int) -> Result<FileHandle> {
    let mut raw = RawHandle { handle_bytes: MAX_HANDLE_SZ as u32, handle_type: 0, f_handle: [0; MAX_HANDLE_SZ] };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a `struct file_handle` with room for `handle_bytes` bytes of f_handle,
    // `name` is NUL-terminated, and both out-pointers are valid for the call.
    let rc = unsafe {
        libc::name_to_handle_at(
            dir.as_fd().as_raw_fd(),
            name.as_ptr(),
            (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            flags,
        )
    };
    if rc != 0 {
        return Err(
            Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)).into()
        );
    }
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle { handle_type: raw.handle_type, bytes: raw.f_handle[..n].to_vec() })
}

/// Opens the object `handle` names on the filesystem of `mount` as an `O_PATH` descriptor.
/// Needs `CAP_DAC_READ_SEARCH`. A handle of a deleted object gives `ESTALE`.
pub fn open_by_handle(mount: impl AsFd, handle: &FileHandle) -> Result<OwnedFd> {
    if handle.bytes.len() > MAX_HANDLE_SZ {
        return Err(Errno::INVAL.into());
    }
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `raw` is a valid `struct file_handle` whose `handle_bytes` fits its buffer; the
    // kernel only reads it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_fd().as_raw_fd(),
            (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(
            Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)).into()
        );
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
struct FsUuid2 {
    len: u8,
    uuid: [u8; 16],
}

/// `_IOR(0x15, 0, struct fsuuid2)`.
const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;

/// The UUID of the filesystem holding `fd` (all zeros when it has none or does not say).
pub fn fs_uuid(fd: impl AsFd) -> [u8; 16] {
    let mut out = FsUuid2 { len: 0, uuid: [0; 16] };
    // SAFETY: FS_IOC_GETFSUUID writes at most `sizeof(struct fsuuid2)` bytes into `out`.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), FS_IOC_GETFSUUID, &mut out as *mut FsUuid2) };
    if rc == 0 && out.len as usize == 16 { out.uuid } else { [0; 16] }
}

/// The file handle of the object `fd` is open on (a layer root, say).
pub fn fd_to_handle(fd: impl AsFd) -> Result<FileHandle> {
    name_to_handle_flags(fd, c"", libc::AT_EMPTY_PATH)
}
