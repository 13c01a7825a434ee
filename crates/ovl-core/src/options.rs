//! Mount options in the kernel overlay's syntax (`lowerdir=A:B,upperdir=U,workdir=W,...`).

use std::path::PathBuf;

use crate::StackError;
use crate::idmap::{IdMap, IdShift};
use crate::statoverride::OverrideXattr;

/// How renamed directories are handled (the kernel's `redirect_dir=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectDir {
    /// Write and follow redirects.
    On,
    /// Follow redirects written by others, never write one (rename of merged dirs gives EXDEV).
    #[default]
    Follow,
    /// Neither write nor follow.
    Off,
    /// Never follow; rename of merged dirs gives EXDEV.
    NoFollow,
}

/// How the kernel hands requests to the daemon (`uring=`; not a kernel overlay option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Uring {
    /// Rings where the kernel offers them (`enable_uring` set), else `/dev/fuse`.
    #[default]
    Auto,
    /// Rings, or no mount.
    On,
    /// `/dev/fuse` only.
    Off,
}

impl std::str::FromStr for Uring {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Uring::Auto),
            "on" => Ok(Uring::On),
            "off" => Ok(Uring::Off),
            _ => Err(format!("{s:?}: expected on, off or auto")),
        }
    }
}

/// Parsed mount options. Construct with [`MountOptions::parse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Lower layers, top first, as given.
    pub lowerdirs: Vec<PathBuf>,
    /// The writable upper layer, if any.
    pub upperdir: Option<PathBuf>,
    /// The work directory (same filesystem as upperdir).
    pub workdir: Option<PathBuf>,
    /// Use `user.overlay.*` instead of `trusted.overlay.*`.
    pub userxattr: bool,
    /// Mount read-only even if an upper layer is given.
    pub read_only: bool,
    /// Redirect policy.
    pub redirect_dir: RedirectDir,
    /// Skip the fsyncs that make copy-up durable (the kernel's `volatile` or `fsync=volatile`).
    pub volatile: bool,
    /// Copy up only metadata on chmod/chown/utimes/xattr changes; data on first write
    /// (the kernel's `metacopy=on`).
    pub metacopy: bool,
    /// Keep lower hard links linked across copy-up through `WORKDIR/index` (the kernel's
    /// `index=on`, see [`crate::index`]).
    pub index: bool,
    /// Owners shown and written through the mount (`uidmapping=`, `gidmapping=`,
    /// `squash_to_uid=`, `squash_to_gid=`, `squash_to_root`: see [`crate::idmap`]).
    pub ids: IdShift,
    /// `xattr_permissions=1|2`: the upper layer keeps owner and mode in this xattr instead of
    /// the real inode (see [`crate::statoverride`]); `0` or absent: only where a layer root says so.
    pub xattr_permissions: Option<OverrideXattr>,
    /// `uring=on|off|auto`: FUSE over io_uring (unset: the `OVLFS_URING` environment
    /// variable, else auto).
    pub uring: Option<Uring>,
    /// `timeout=SECS` (fuse-overlayfs's option): how long the kernel may keep the entries,
    /// attributes and missing names it was told (unset: the mount's default).
    pub timeout: Option<std::time::Duration>,
    /// Options meant for the FUSE layer or mount(8) that we accept and ignore.
    pub ignored: Vec<String>,
}

/// Generic VFS and mount(8)/fstab options that carry no meaning for the overlay.
const IGNORED: &[&str] = &[
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "async",
    "sync",
    "dirsync",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "nofail",
    "_netdev",
    "defaults",
    "allow_other",
    "allow_root",
    "default_permissions",
    "silent",
    "loud",
];

/// Kernel overlay options that we accept with any of the listed values and do not act on yet.
const ACCEPTED_KERNEL: &[(&str, &[&str])] = &[
    ("xino", &["on", "off", "auto"]),
    ("nfs_export", &["off"]),
    ("uuid", &["on", "off", "null", "auto"]),
    ("verity", &["off"]),
];

impl MountOptions {
    /// Parses a comma-separated option string. A backslash escapes `,`, `:` and `\` inside
    /// values, as for the kernel.
    pub fn parse(s: &str) -> Result<Self, StackError> {
        let mut o = MountOptions::default();
        o.merge(s)?;
        Ok(o)
    }

    /// Parses more options into `self` (for several `-o` arguments).
    pub fn merge(&mut self, s: &str) -> Result<(), StackError> {
        for opt in split_escaped(s, ',') {
            if opt.is_empty() {
                continue;
            }
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            match (key, value) {
                ("lowerdir", Some(v)) => {
                    self.lowerdirs = split_escaped(v, ':')
                        .into_iter()
                        .filter(|p| !p.is_empty())
                        .map(|p| PathBuf::from(unescape(&p)))
                        .collect();
                }
                ("lowerdir+", Some(v)) => self.lowerdirs.push(PathBuf::from(unescape(v))),
                ("upperdir", Some(v)) => self.upperdir = Some(PathBuf::from(unescape(v))),
                ("workdir", Some(v)) => self.workdir = Some(PathBuf::from(unescape(v))),
                ("userxattr", None) => self.userxattr = true,
                ("ro", None) => self.read_only = true,
                ("volatile", None) => self.volatile = true,
                ("fsync", Some(v)) => {
                    self.volatile = match v {
                        "volatile" => true,
                        "strict" | "auto" => false,
                        _ => return Err(bad(key, "expected strict, auto or volatile")),
                    }
                }
                ("metacopy", Some(v)) => {
                    self.metacopy = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(key, "expected on or off")),
                    }
                }
                ("index", Some(v)) => {
                    self.index = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(key, "expected on or off")),
                    }
                }
                ("redirect_dir", Some(v)) => {
                    self.redirect_dir = match v {
                        "on" => RedirectDir::On,
                        "follow" => RedirectDir::Follow,
                        "off" => RedirectDir::Off,
                        "nofollow" => RedirectDir::NoFollow,
                        _ => return Err(bad(key, "expected on, follow, off or nofollow")),
                    }
                }
                ("uring", Some(v)) => self.uring = Some(v.parse().map_err(|e: String| bad(key, &e))?),
                ("timeout", Some(v)) => self.timeout = Some(seconds(key, v)?),
                (k, None) if IGNORED.contains(&k) => self.ignored.push(opt.clone()),
                ("uidmapping", Some(v)) => self.ids.uids = IdMap::parse(v).map_err(|e| bad(key, &e))?,
                ("gidmapping", Some(v)) => self.ids.gids = IdMap::parse(v).map_err(|e| bad(key, &e))?,
                ("squash_to_uid", Some(v)) => self.ids.squash_uid = Some(id(key, v)?),
                ("squash_to_gid", Some(v)) => self.ids.squash_gid = Some(id(key, v)?),
                ("squash_to_root", None) => self.ids.squash_to_root = true,
                ("xattr_permissions", Some(v)) => {
                    self.xattr_permissions = match v {
                        "0" => None,
                        "1" => Some(OverrideXattr::Privileged),
                        "2" => Some(OverrideXattr::Containers),
                        _ => {
                            return Err(bad(
                                key,
                                "expected 0 (off), 1 (security.fuseoverlayfs.override_stat) \
                                 or 2 (user.containers.override_stat)",
                            ));
                        }
                    }
                }
                // SELinux labels (containers/storage adds `context="..."`): FUSE mounts made
                // here carry none.
                ("fsname" | "subtype" | "source" | "context" | "fscontext" | "defcontext" | "rootcontext", Some(_)) => {
                    self.ignored.push(opt.clone())
                }
                (k, Some(v)) => match ACCEPTED_KERNEL.iter().find(|(name, _)| *name == k) {
                    Some((_, values)) if values.contains(&v) => self.ignored.push(opt.clone()),
                    Some((_, values)) => {
                        return Err(bad(k, &format!("supported values: {}", values.join(", "))));
                    }
                    None => return Err(StackError::UnknownOption(opt.clone())),
                },
                _ => return Err(StackError::UnknownOption(opt.clone())),
            }
        }
        Ok(())
    }

    /// True when the mount cannot change any layer.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.upperdir.is_none()
    }
}

/// A numeric user or group ID.
fn id(option: &str, v: &str) -> Result<u32, StackError> {
    v.parse().map_err(|_| bad(option, &format!("`{v}` is not an ID (0 to 4294967295)")))
}

/// A time in seconds, fractions allowed (`timeout=0.5`), from 0 to a billion (fuse-overlayfs's
/// default; the kernel caps what it keeps anyway).
fn seconds(option: &str, v: &str) -> Result<std::time::Duration, StackError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| (0.0..=1e9).contains(s))
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| bad(option, &format!("`{v}` is not a number of seconds from 0 to 1000000000")))
}

fn bad(option: &str, reason: &str) -> StackError {
    StackError::BadValue { option: option.to_string(), reason: reason.to_string() }
}

/// Splits at `sep` unless it is escaped with a backslash or, in an SELinux `*context=` value,
/// inside double quotes (`context="system_u:object_r:container_file_t:s0:c1,c2"`); escapes
/// and quotes are kept.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '"' && (quoted || is_context(out.last().expect("never empty"))) {
            quoted = !quoted;
            out.last_mut().expect("never empty").push(c);
        } else if quoted {
            out.last_mut().expect("never empty").push(c);
        } else if c == '\\' {
            let last = out.last_mut().expect("never empty");
            last.push('\\');
            if let Some(n) = chars.next() {
                last.push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

/// True if `elem` (an option so far) is an SELinux context option about to get its value.
fn is_context(elem: &str) -> bool {
    elem.split_once('=').is_some_and(|(k, v)| k.ends_with("context") && v.is_empty())
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_form() {
        let o = MountOptions::parse("rw,lowerdir=/a:/b\\:c,upperdir=/u,workdir=/w,userxattr").unwrap();
        assert_eq!(o.lowerdirs, vec![PathBuf::from("/a"), PathBuf::from("/b:c")]);
        assert_eq!(o.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(o.workdir, Some(PathBuf::from("/w")));
        assert!(o.userxattr);
        assert!(!o.is_read_only());
        assert_eq!(o.ignored, vec!["rw".to_string()]);
    }

    #[test]
    fn volatile_both_spellings() {
        assert!(MountOptions::parse("lowerdir=/a,volatile").unwrap().volatile);
        assert!(MountOptions::parse("lowerdir=/a,fsync=volatile").unwrap().volatile);
        assert!(!MountOptions::parse("lowerdir=/a,fsync=strict").unwrap().volatile);
        assert!(MountOptions::parse("lowerdir=/a,fsync=sometimes").is_err());
    }

    #[test]
    fn timeout_takes_seconds_with_fractions_and_refuses_the_rest() {
        let secs = |o: &str| MountOptions::parse(&format!("lowerdir=/a,{o}")).map(|o| o.timeout);
        assert_eq!(secs("ro").unwrap(), None);
        assert_eq!(secs("timeout=0").unwrap(), Some(std::time::Duration::ZERO));
        assert_eq!(secs("timeout=0.25").unwrap(), Some(std::time::Duration::from_millis(250)));
        assert_eq!(secs("timeout=1000000000").unwrap(), Some(std::time::Duration::from_secs(1_000_000_000)));
        for wrong in ["timeout=-1", "timeout=NaN", "timeout=inf", "timeout=1e10", "timeout=soon", "timeout="] {
            let e = secs(wrong).unwrap_err().to_string();
            assert!(e.contains("timeout"), "{wrong}: {e}");
        }
    }

    #[test]
    fn without_upper_is_read_only() {
        let o = MountOptions::parse("lowerdir=/a").unwrap();
        assert!(o.is_read_only());
    }

    #[test]
    fn unknown_option_is_named() {
        let e = MountOptions::parse("lowerdir=/a,frobnicate").unwrap_err();
        assert_eq!(e.to_string(), "unknown mount option `frobnicate`");
        let e = MountOptions::parse("lowerdir=/a,redirect_dir=maybe").unwrap_err();
        assert!(e.to_string().contains("redirect_dir"), "{e}");
    }

    /// Regression (issue 18): the option strings containers/storage hands its mount program.
    #[test]
    fn issue_18_accepts_what_podman_passes() {
        let o = MountOptions::parse(
            "lowerdir=/l/A:/l/B,upperdir=/d/diff,workdir=/d/work,,volatile,nodev,metacopy=on,\
             context=\"system_u:object_r:container_file_t:s0:c1,c2\",\
             uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,xattr_permissions=2",
        )
        .unwrap();
        assert_eq!(o.lowerdirs, vec![PathBuf::from("/l/A"), PathBuf::from("/l/B")]);
        assert!(o.volatile && o.metacopy);
        assert_eq!(o.ids.uids.shown(0), 100000);
        assert_eq!(o.ids.gids.stored(100007), 7);
        assert_eq!(o.xattr_permissions, Some(OverrideXattr::Containers));
        assert!(o.ignored.iter().any(|i| i.starts_with("context=\"system_u") && i.ends_with("c1,c2\"")));
        let q = MountOptions::parse("lowerdir=/a:/b,squash_to_uid=1000,squash_to_gid=1001,squash_to_root").unwrap();
        assert_eq!((q.ids.squash_uid, q.ids.squash_gid, q.ids.squash_to_root), (Some(1000), Some(1001), true));
        assert!(q.is_read_only());
        assert_eq!(MountOptions::parse("lowerdir=/a,xattr_permissions=0").unwrap().xattr_permissions, None);
        let keep_id = MountOptions::parse("lowerdir=/a,uidmapping=:0:1:1000:1000:0:1:1001:1001:64536").unwrap();
        assert_eq!(keep_id.ids.uids.ranges().len(), 3);
    }

    #[test]
    fn issue_18_bad_id_options_name_the_option_and_the_problem() {
        let msg = |s: &str| MountOptions::parse(s).unwrap_err().to_string();
        let m = msg("lowerdir=/a,uidmapping=:0:100000");
        assert!(m.contains("uidmapping") && m.contains("groups of three"), "{m}");
        let m = msg("lowerdir=/a,gidmapping=0:100000:65536:10:100010:5");
        assert!(m.contains("gidmapping") && m.contains("overlap"), "{m}");
        let m = msg("lowerdir=/a,squash_to_uid=-1");
        assert!(m.contains("squash_to_uid") && m.contains("not an ID"), "{m}");
        let m = msg("lowerdir=/a,xattr_permissions=3");
        assert!(m.contains("xattr_permissions") && m.contains("user.containers.override_stat"), "{m}");
        let m = msg("lowerdir=/a,uidmapping=");
        assert!(m.contains("no ranges"), "{m}");
    }
}
