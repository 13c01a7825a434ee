//! Mount options in the kernel overlay's syntax (`lowerdir=A:B,upperdir=U,workdir=W,...`).

use std::path::PathBuf;

use crate::StackError;

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
                (k, None) if IGNORED.contains(&k) => self.ignored.push(opt.clone()),
                ("fsname" | "subtype" | "source", Some(_)) => self.ignored.push(opt.clone()),
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

fn bad(option: &str, reason: &str) -> StackError {
    StackError::BadValue { option: option.to_string(), reason: reason.to_string() }
}

/// Splits at `sep` unless it is escaped with a backslash; escapes are kept for [`unescape`].
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
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
}
