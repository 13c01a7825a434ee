//! The kernel's on-disk encoding: overlay xattr names, whiteouts, opaque directories.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::AsFd;

use rustix::fs::{FileType, Mode, Stat};

use crate::Result;

/// The overlay xattr names for one mount: `trusted.overlay.*` or, with `userxattr`,
/// `user.overlay.*`.
#[derive(Debug, Clone)]
pub struct XattrNames {
    prefix: &'static str,
    /// `overlay.opaque`: `y` hides lower entries, `x` marks a dir holding xwhiteouts.
    pub opaque: CString,
    /// `overlay.redirect`: where a renamed dir (or metacopy file) came from.
    pub redirect: CString,
    /// `overlay.origin`: the file handle of the lower object this was copied up from.
    pub origin: CString,
    /// `overlay.impure`: a dir holding entries with origin or redirect.
    pub impure: CString,
    /// `overlay.metacopy`: the data still lives in a lower layer.
    pub metacopy: CString,
    /// `overlay.whiteout`: marks an xwhiteout (a zero-size regular file).
    pub whiteout: CString,
    /// `overlay.nlink`: link count bookkeeping on index entries.
    pub nlink: CString,
    /// `overlay.upper`: on the index dir, the upper root it belongs to.
    pub upper: CString,
}

impl XattrNames {
    /// Names under `trusted.overlay.` (`user == false`) or `user.overlay.`.
    pub fn new(user: bool) -> Self {
        let prefix = if user { "user.overlay." } else { "trusted.overlay." };
        let n = |s: &str| CString::new(format!("{prefix}{s}")).expect("no NUL in names");
        Self {
            prefix,
            opaque: n("opaque"),
            redirect: n("redirect"),
            origin: n("origin"),
            impure: n("impure"),
            metacopy: n("metacopy"),
            whiteout: n("whiteout"),
            nlink: n("nlink"),
            upper: n("upper"),
        }
    }

    /// The prefix, e.g. `trusted.overlay.`.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// True for a name in our overlay namespace: such xattrs are never shown through the mount,
    /// never settable through it, and never copied up.
    pub fn is_private(&self, name: &OsStr) -> bool {
        name.as_encoded_bytes().starts_with(self.prefix.as_bytes())
    }

    /// True for overlay metadata of either namespace, which copy-up must not carry into a new
    /// layer. Escaped names (`*.overlay.overlay.*`, user data stored through a mount) are not
    /// metadata and are copied.
    pub fn is_any_overlay(name: &[u8]) -> bool {
        [&b"trusted.overlay."[..], b"user.overlay."]
            .iter()
            .any(|p| name.starts_with(p) && !name[p.len()..].starts_with(b"overlay."))
    }

    /// The real name under which a name given through the mount is stored: names in our
    /// overlay namespace are escaped (`trusted.overlay.X` becomes `trusted.overlay.overlay.X`),
    /// as the kernel does, so users can never touch overlay metadata.
    pub fn escape(&self, name: &OsStr) -> std::ffi::OsString {
        let b = name.as_encoded_bytes();
        if b.starts_with(self.prefix.as_bytes()) {
            let mut out = self.prefix.as_bytes().to_vec();
            out.extend_from_slice(b"overlay.");
            out.extend_from_slice(&b[self.prefix.len()..]);
            std::ffi::OsString::from(std::os::unix::ffi::OsStrExt::from_bytes(&out[..]) as &OsStr)
        } else {
            name.to_os_string()
        }
    }

    /// The name shown through the mount for a real xattr name, or `None` for overlay metadata
    /// that stays hidden.
    pub fn unescape(&self, real: &OsStr) -> Option<std::ffi::OsString> {
        let b = real.as_encoded_bytes();
        let p = self.prefix.as_bytes();
        if !b.starts_with(p) {
            return Some(real.to_os_string());
        }
        let rest = &b[p.len()..];
        let inner = rest.strip_prefix(b"overlay.")?;
        let mut out = p.to_vec();
        out.extend_from_slice(inner);
        Some(std::ffi::OsString::from(std::os::unix::ffi::OsStrExt::from_bytes(&out[..]) as &OsStr))
    }
}

/// The state of a directory's `overlay.opaque` xattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opaque {
    /// Not opaque: lower entries merge in.
    No,
    /// `y`: lower entries are hidden.
    Yes,
    /// `x`: not opaque, but holds xwhiteouts (only honoured in lower layers).
    XWhiteouts,
}

impl Opaque {
    /// Decodes an xattr value; anything but `y` or `x` counts as not opaque, as for the kernel.
    pub fn from_value(v: Option<&[u8]>) -> Self {
        match v {
            Some(b"y") => Opaque::Yes,
            Some(b"x") => Opaque::XWhiteouts,
            _ => Opaque::No,
        }
    }
}

/// Every key the kernel's overlay keeps under its prefix (`trusted.overlay.KEY`); anything else
/// there (except escaped user names, `overlay.*`) is unknown to it.
pub const KNOWN_KEYS: &[&str] =
    &["opaque", "redirect", "origin", "impure", "metacopy", "whiteout", "nlink", "upper", "uuid", "protattr"];

/// True when an `overlay.metacopy` value is one the kernel accepts: empty (the original form), or
/// the versioned header `u8 version (0), u8 len (the value's size), u8 flags (bit 0: a digest
/// follows), u8 digest algorithm` and at most a 64-byte digest. Any other value fails the
/// kernel's lookup of the file with `EIO`.
pub fn metacopy_value_is_valid(v: &[u8]) -> bool {
    const HEADER: usize = 4;
    const FLAG_DIGEST: u8 = 1;
    if v.is_empty() {
        return true;
    }
    let (version, len, flags) = match v {
        [version, len, flags, _algo, ..] => (*version, *len as usize, *flags),
        _ => return false,
    };
    let digest = v.len() - HEADER;
    version == 0 && len == v.len() && flags & !FLAG_DIGEST == 0 && digest <= 64
}

/// True if `st` describes a whiteout: a character device with device number 0:0.
pub fn is_whiteout_stat(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Creates a whiteout named `name` in `dir`.
pub fn make_whiteout(dir: impl AsFd, name: &CStr) -> Result<()> {
    rustix::fs::mknodat(dir, name, FileType::CharacterDevice, Mode::empty(), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metacopy_values() {
        assert!(metacopy_value_is_valid(b""));
        assert!(metacopy_value_is_valid(&[0, 4, 0, 0]));
        let mut digest = vec![0, 36, 1, 1];
        digest.extend_from_slice(&[7; 32]);
        assert!(metacopy_value_is_valid(&digest));
        for bad in [&[0u8][..], &[1, 4, 0, 0], &[0, 5, 0, 0], &[0, 4, 2, 0], &[0, 6, 0, 0, 9]] {
            assert!(!metacopy_value_is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn escapes_like_the_kernel() {
        let n = XattrNames::new(false);
        assert_eq!(n.escape(OsStr::new("trusted.overlay.foo")), "trusted.overlay.overlay.foo");
        assert_eq!(n.escape(OsStr::new("user.foo")), "user.foo");
        assert_eq!(n.unescape(OsStr::new("trusted.overlay.overlay.foo")).unwrap(), "trusted.overlay.foo");
        assert_eq!(n.unescape(OsStr::new("trusted.overlay.opaque")), None);
        assert_eq!(n.unescape(OsStr::new("security.selinux")).unwrap(), "security.selinux");
        assert!(XattrNames::is_any_overlay(b"trusted.overlay.origin"));
        assert!(XattrNames::is_any_overlay(b"user.overlay.redirect"));
        assert!(!XattrNames::is_any_overlay(b"trusted.overlay.overlay.foo"));
        assert!(!XattrNames::is_any_overlay(b"user.foo"));
        let u = XattrNames::new(true);
        assert_eq!(u.escape(OsStr::new("user.overlay.x")), "user.overlay.overlay.x");
    }
}
