//! The "override stat" xattr of fuse-overlayfs and containers/storage: owner, mode and, for
//! objects stored as plain files, type and device number, kept in an xattr of the object where
//! whoever wrote the layer could not `chown`, `chmod` or `mknod` (rootless storage,
//! `force_mask`). Only regular files and directories carry one.
//!
//! The value is text: `UID:GID:MODE` (mode in octal, permission bits only) or
//! `UID:GID:MODE:TYPE` with TYPE one of `file`, `dir`, `symlink`, `pipe`, `socket`,
//! `block-MAJOR-MINOR`, `char-MAJOR-MINOR`.
//!
//! ```
//! use ovl_core::statoverride::StatOverride;
//! let o = StatOverride::parse(b"0:0:644:char-1-3").unwrap();
//! assert_eq!(o.mode & 0o170000, 0o020000);
//! assert_eq!(o.to_bytes(), b"0:0:644:char-1-3");
//! ```

use std::ffi::CStr;

use crate::{Errno, Result};

/// Which xattr holds the override: a layer root carrying one of them (or the mount option
/// `xattr_permissions=`) says which one the layer's objects use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideXattr {
    /// `security.fuseoverlayfs.override_stat` (`xattr_permissions=1`).
    Privileged,
    /// `user.containers.override_stat` (`xattr_permissions=2`, what containers/storage writes).
    Containers,
    /// `user.fuseoverlayfs.override_stat` (older rootless fuse-overlayfs layers).
    User,
}

impl OverrideXattr {
    /// All of them, in the order a layer root is probed.
    pub const ALL: [OverrideXattr; 3] = [OverrideXattr::Privileged, OverrideXattr::Containers, OverrideXattr::User];

    /// The xattr's name.
    pub fn name(self) -> &'static CStr {
        match self {
            OverrideXattr::Privileged => c"security.fuseoverlayfs.override_stat",
            OverrideXattr::Containers => c"user.containers.override_stat",
            OverrideXattr::User => c"user.fuseoverlayfs.override_stat",
        }
    }

    /// True if `name` is one of the override xattrs.
    pub fn is_override_name(name: &[u8]) -> bool {
        Self::ALL.iter().any(|x| x.name().to_bytes() == name)
    }
}

/// A parsed override value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatOverride {
    /// The owner.
    pub uid: u32,
    /// The group.
    pub gid: u32,
    /// Permission bits (`0o7777`) and, if the value named a type, the type bits (`S_IFMT`).
    pub mode: u32,
    /// The device number of a `block-`/`char-` type.
    pub rdev: Option<u64>,
}

impl StatOverride {
    /// Parses a value; `EINVAL` for a malformed one.
    pub fn parse(value: &[u8]) -> Result<Self> {
        let s = std::str::from_utf8(value).map_err(|_| Errno::INVAL)?;
        let s = s.trim_end_matches('\0');
        let mut parts = s.splitn(4, ':');
        let mut next = || parts.next().ok_or(Errno::INVAL);
        let uid = next()?.parse::<u32>().map_err(|_| Errno::INVAL)?;
        let gid = next()?.parse::<u32>().map_err(|_| Errno::INVAL)?;
        let perm = u32::from_str_radix(next()?, 8).map_err(|_| Errno::INVAL)?;
        if perm > 0o7777 {
            return Err(Errno::INVAL.into());
        }
        let (kind, rdev) = match parts.next() {
            None => (0, None),
            Some(t) => parse_type(t)?,
        };
        Ok(Self { uid, gid, mode: perm | kind, rdev })
    }

    /// The value to store.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = format!("{}:{}:{:o}", self.uid, self.gid, self.mode & 0o7777);
        let dev = |r: Option<u64>| r.map(|d| format!("-{}-{}", libc::major(d), libc::minor(d))).unwrap_or_default();
        let t = match self.mode & libc::S_IFMT {
            0 => None,
            libc::S_IFDIR => Some("dir".to_string()),
            libc::S_IFREG => Some("file".to_string()),
            libc::S_IFLNK => Some("symlink".to_string()),
            libc::S_IFIFO => Some("pipe".to_string()),
            libc::S_IFSOCK => Some("socket".to_string()),
            libc::S_IFBLK => Some(format!("block{}", dev(self.rdev))),
            libc::S_IFCHR => Some(format!("char{}", dev(self.rdev))),
            _ => None,
        };
        if let Some(t) = t {
            s.push(':');
            s.push_str(&t);
        }
        s.into_bytes()
    }

    /// The override read from `st` (owner and permission bits, no type).
    pub fn from_stat(st: &rustix::fs::Stat) -> Self {
        Self { uid: st.st_uid, gid: st.st_gid, mode: st.st_mode & 0o7777, rdev: None }
    }

    /// Applies the override to an `lstat` of the object holding it (a type, if given, replaces
    /// the real one).
    pub fn apply(&self, st: &mut rustix::fs::Stat) {
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        let kind = if self.mode & libc::S_IFMT != 0 { self.mode & libc::S_IFMT } else { st.st_mode & libc::S_IFMT };
        st.st_mode = kind | (self.mode & 0o7777);
        if let Some(d) = self.rdev {
            st.st_rdev = d;
        }
    }
}

fn parse_type(t: &str) -> Result<(u32, Option<u64>)> {
    let dev = |rest: &str| -> Result<u64> {
        let (maj, min) = rest.trim_start_matches('-').split_once('-').ok_or(Errno::INVAL)?;
        let n = |v: &str| v.parse::<u32>().map_err(|_| crate::Error::new(Errno::INVAL));
        Ok(libc::makedev(n(maj)?, n(min)?))
    };
    Ok(if let Some(rest) = t.strip_prefix("block") {
        (libc::S_IFBLK, Some(dev(rest)?))
    } else if let Some(rest) = t.strip_prefix("char") {
        (libc::S_IFCHR, Some(dev(rest)?))
    } else {
        let kind = [
            ("dir", libc::S_IFDIR),
            ("file", libc::S_IFREG),
            ("symlink", libc::S_IFLNK),
            ("pipe", libc::S_IFIFO),
            ("socket", libc::S_IFSOCK),
        ];
        let k = kind.iter().find(|(name, _)| t.starts_with(name)).ok_or(Errno::INVAL)?;
        (k.1, None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_form() {
        for v in ["0:0:755", "100:200:4755:dir", "1:2:644:file", "0:0:666:char-1-3", "0:6:660:block-8-1", "5:5:0:pipe"]
        {
            let o = StatOverride::parse(v.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(o.to_bytes()).unwrap(), v);
        }
        let o = StatOverride::parse(b"0:0:666:char-1-3").unwrap();
        assert_eq!((o.mode & libc::S_IFMT, o.rdev), (libc::S_IFCHR, Some(libc::makedev(1, 3))));
    }

    #[test]
    fn refuses_malformed_values() {
        for v in ["", "0:0", "a:0:644", "0:0:999", "0:0:17777", "0:0:644:tape", "0:0:644:char-1"] {
            assert!(StatOverride::parse(v.as_bytes()).is_err(), "{v}");
        }
    }

    #[test]
    fn applies_type_only_when_given() {
        let mut st = rustix::fs::stat(".").unwrap();
        st.st_mode = libc::S_IFREG | 0o600;
        StatOverride::parse(b"7:8:4755").unwrap().apply(&mut st);
        assert_eq!((st.st_uid, st.st_gid, st.st_mode), (7, 8, libc::S_IFREG | 0o4755));
        StatOverride::parse(b"0:0:620:char-4-1").unwrap().apply(&mut st);
        assert_eq!((st.st_mode, st.st_rdev), (libc::S_IFCHR | 0o620, libc::makedev(4, 1)));
    }
}
