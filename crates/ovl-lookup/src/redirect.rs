//! `overlay.redirect` values, read the way the kernel reads them.
//!
//! The kernel (fs/overlayfs `ovl_get_redirect_xattr`, `ovl_lookup_single`) treats a value as a C
//! string: it ends at the first NUL byte. An empty value, a relative value holding a `/`, and an
//! absolute value with an empty component (`/`, `//a`, `/a/`) are refused: the lookup fails with
//! `EINVAL`. Other values are followed one component at a time with the VFS's single-name lookup,
//! which refuses `.`, `..` and the empty name with `EACCES` when the walk reaches them, and finds
//! nothing for a name longer than `NAME_MAX`. There is no length limit besides the xattr's own.
//! Nothing here can leave a layer: a component is never `..`, and layers are opened beneath
//! their root without following symlinks.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use ovl_core::{Errno, Result};

/// The longest redirect value there can be (the kernel's `XATTR_SIZE_MAX`); the kernel itself
/// sets no other limit when it reads one (it writes at most `redirect_max`, 256 bytes).
pub const MAX_REDIRECT: usize = 65536;

/// Stands for a component the kernel's lookup refuses with `EACCES` (`.`, `..`, or empty): a
/// name no directory entry can have.
const REFUSED: &str = "\0";

/// Where the layers below look for a name: joined to the parent's lower dirs (possibly renamed,
/// after a relative redirect), or from each layer's root (after an absolute one). A component
/// may be [`REFUSED`]; see [`refused`].
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Rel(OsString),
    Abs(PathBuf),
}

/// True for a component standing for one the kernel refuses to look up: reaching it in a layer
/// fails the lookup with `EACCES`.
pub(crate) fn refused(c: &OsStr) -> bool {
    c == REFUSED
}

/// Fails with `EACCES` when `name` is a [`refused`] component.
pub(crate) fn check_component(name: &OsStr) -> Result<()> {
    if refused(name) {
        Err(ovl_core::Error::new(Errno::ACCESS).context("redirect component `.`, `..` or empty"))
    } else {
        Ok(())
    }
}

/// Parses an untrusted value as the kernel does (see the module docs). `Err(EINVAL)` for a value
/// the kernel refuses outright.
pub(crate) fn parse(v: &[u8]) -> std::result::Result<Target, Errno> {
    if v.is_empty() {
        return Err(Errno::INVAL);
    }
    let v = &v[..v.iter().position(|b| *b == 0).unwrap_or(v.len())];
    let component = |c: &[u8]| -> OsString {
        if c.is_empty() || c == b"." || c == b".." {
            OsString::from(REFUSED)
        } else {
            OsStr::from_bytes(c).to_os_string()
        }
    };
    if v.first() == Some(&b'/') {
        let mut p = PathBuf::new();
        for c in v[1..].split(|b| *b == b'/') {
            if c.is_empty() {
                return Err(Errno::INVAL);
            }
            p.push(component(c));
        }
        Ok(Target::Abs(p))
    } else if v.contains(&b'/') {
        Err(Errno::INVAL)
    } else {
        Ok(Target::Rel(component(v)))
    }
}

/// Why a lookup through the redirect value `v` fails, the kernel's way: `EINVAL` for a value it
/// refuses outright, `EACCES` for one with a `.`, `..` or empty component (when the walk gets
/// there); `None` for a value that is followed.
pub fn redirect_error(v: &[u8]) -> Option<Errno> {
    match parse(v) {
        Err(e) => Some(e),
        Ok(Target::Rel(n)) if refused(&n) => Some(Errno::ACCESS),
        Ok(Target::Abs(p)) if p.iter().any(refused) => Some(Errno::ACCESS),
        Ok(_) => None,
    }
}

/// True when `v` is an `overlay.redirect` value lookup follows: a single name (relative: same
/// parent), or `/a/b` whose every component is a plain name (absolute, from the root of the
/// layers below); the value ends at a NUL byte. See [`redirect_error`] for the others.
pub fn redirect_is_valid(v: &[u8]) -> bool {
    redirect_error(v).is_none()
}

/// Parses an untrusted `overlay.redirect` value: `Some((absolute, path))` for a value
/// [`redirect_is_valid`] accepts, `None` for any other. A path it returns never leaves a layer
/// root.
pub fn parse_redirect_value(v: &[u8]) -> Option<(bool, PathBuf)> {
    if !redirect_is_valid(v) {
        return None;
    }
    match parse(v).ok()? {
        Target::Abs(p) => Some((true, p)),
        Target::Rel(n) => Some((false, PathBuf::from(n))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn values_parse_as_the_kernel_reads_them() {
        assert!(matches!(parse(b"b"), Ok(Target::Rel(n)) if n == "b"));
        assert!(matches!(parse(b"/a/b"), Ok(Target::Abs(p)) if p == Path::new("a/b")));
        // A C string: the value ends at the first NUL.
        assert!(matches!(parse(b"b\0/../.."), Ok(Target::Rel(n)) if n == "b"));
        assert!(matches!(parse(b"/a\0//"), Ok(Target::Abs(p)) if p == Path::new("a")));
        for bad in [&b""[..], b"/", b"a/b", b"../../etc", b"//a", b"/a//b", b"/etc/", b"/\0a"] {
            assert_eq!(redirect_error(bad), Some(Errno::INVAL), "{:?}", String::from_utf8_lossy(bad));
        }
        for refused in [&b".."[..], b".", b"\0a", b"/../../etc", b"/a/./b", b"/a/.."] {
            assert_eq!(redirect_error(refused), Some(Errno::ACCESS), "{:?}", String::from_utf8_lossy(refused));
        }
        assert!(redirect_is_valid(&[b'a'; 300]), "too long a name is looked up (and found nowhere)");
        let long: Vec<u8> = (0..40).flat_map(|_| [&b"/"[..], &[b'b'; 120]].concat()).collect();
        assert!(long.len() > 4096 && redirect_is_valid(&long));
        assert!(redirect_is_valid(b"\xff\xfe") && redirect_is_valid(b"/\xff/x"));
        assert_eq!(parse_redirect_value(b"/a/../b"), None);
        assert_eq!(parse_redirect_value(b"/a/b\0x"), Some((true, PathBuf::from("a/b"))));
    }
}
