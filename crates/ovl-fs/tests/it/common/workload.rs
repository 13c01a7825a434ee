//! The random operations of the differential test, shared with the other tests that need a
//! realistic workload: [`gen_ops`] picks the next operations from the current [`View`] of a
//! mount (paths that exist, that existed, that never did), [`apply`] runs one on a mount and
//! returns its [`Outcome`] (a payload or an errno) for comparison.

use super::*;

use std::os::unix::fs::FileExt;

use rustix::fs::{OFlags, RenameFlags};

/// One filesystem operation, with paths relative to the mount root.
#[derive(Clone, Debug)]
pub enum Op {
    /// `open(O_CREAT|O_WRONLY|O_TRUNC[|O_EXCL])` then write `len` bytes made from `seed`.
    CreateWrite { path: PathBuf, excl: bool, mode: Perm, len: usize, seed: u64 },
    /// Open an existing file for writing (with or without `O_TRUNC`) and close it.
    OpenWrite { path: PathBuf, trunc: bool },
    /// `pwrite` of `len` bytes made from `seed` at `offset` (may extend the file).
    Pwrite { path: PathBuf, offset: u64, len: usize, seed: u64 },
    /// `O_APPEND` write.
    Append { path: PathBuf, len: usize, seed: u64 },
    /// `ftruncate` to `len`.
    Truncate { path: PathBuf, len: u64 },
    /// `chmod` (follows symlinks).
    Chmod { path: PathBuf, mode: Perm },
    /// `lchown`; `None` leaves that id.
    Chown { path: PathBuf, uid: Option<u32>, gid: Option<u32> },
    /// `utimensat(AT_SYMLINK_NOFOLLOW)` to an explicit old time, or to now.
    Utimes { path: PathBuf, time: Option<(i64, i64)> },
    /// `mkdir`.
    Mkdir { path: PathBuf, mode: Perm },
    /// `rmdir`.
    Rmdir { path: PathBuf },
    /// `unlink`.
    Unlink { path: PathBuf },
    /// `renameat2` with no flag, `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    Rename { from: PathBuf, to: PathBuf, flags: RenameFlags },
    /// `symlink(target, path)`.
    Symlink { target: String, path: PathBuf },
    /// `link(from, to)` (not following symlinks).
    Link { from: PathBuf, to: PathBuf },
    /// `mknod` of a fifo.
    Mkfifo { path: PathBuf, mode: Perm },
    /// `lsetxattr` with no flag, `XATTR_CREATE` or `XATTR_REPLACE`.
    SetXattr { path: PathBuf, name: String, value: Bytes, flags: XattrFlags },
    /// `lremovexattr`.
    RemoveXattr { path: PathBuf, name: String },
    /// `lgetxattr` of one name.
    GetXattr { path: PathBuf, name: String },
    /// `llistxattr` and every value.
    ListXattr { path: PathBuf },
    /// Read a whole file (`O_NOFOLLOW|O_NONBLOCK`) and hash it.
    Read { path: PathBuf },
    /// List a directory: names and `d_type`s.
    ReadDir { path: PathBuf },
    /// `lstat`, compared like the final views.
    Stat { path: PathBuf },
}

impl Op {
    /// A short name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::CreateWrite { .. } => "create_write",
            Op::OpenWrite { .. } => "open_write",
            Op::Pwrite { .. } => "pwrite",
            Op::Append { .. } => "append",
            Op::Truncate { .. } => "truncate",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimes { .. } => "utimes",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Unlink { .. } => "unlink",
            Op::Rename { flags, .. } if flags.contains(RenameFlags::EXCHANGE) => "rename_exchange",
            Op::Rename { flags, .. } if flags.contains(RenameFlags::NOREPLACE) => "rename_noreplace",
            Op::Rename { .. } => "rename",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Mkfifo { .. } => "mkfifo",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::Read { .. } => "read",
            Op::ReadDir { .. } => "readdir",
            Op::Stat { .. } => "stat",
        }
    }

    /// Whether a successful run can change the tree (so the cached view must be reloaded).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::GetXattr { .. } | Op::ListXattr { .. } | Op::Read { .. } | Op::ReadDir { .. } | Op::Stat { .. }
        )
    }
}

/// Permission bits, shown in octal.
#[derive(Clone, Copy)]
pub struct Perm(pub u32);

impl std::fmt::Debug for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// What a successful operation returned.
#[derive(Debug, PartialEq)]
pub enum Payload {
    /// Nothing to compare.
    Done,
    /// A file's length and content hash.
    Data { len: u64, hash: u64 },
    /// Directory entries with their types, sorted.
    Names(Vec<(OsString, Kind)>),
    /// An `lstat` result.
    Entry(Entry),
    /// Xattr names and values, sorted.
    Xattrs(Vec<(OsString, Bytes)>),
    /// One xattr value.
    Value(Bytes),
}

/// The result of one operation: a payload or an errno.
pub type Outcome = Result<Payload, i32>;

/// Whether two outcomes agree; `lstat` results are compared like views (new mtimes ignored).
pub fn same(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Ok(Payload::Entry(x)), Ok(Payload::Entry(y))) => x.diff(y).is_empty(),
        _ => a == b,
    }
}

/// The errno of a rustix error.
pub fn rx(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

/// The errno of a std error.
pub fn io(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// `len` bytes generated from `seed` (the same on both sides).
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// Opens `path` with `flags` plus `O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC` (fifos never block).
pub fn open(path: &Path, flags: OFlags, mode: u32) -> Result<File, i32> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::from_raw_mode(mode)).map(File::from).map_err(rx)
}

/// Runs `op` on the mount at `root`.
pub fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |rel: &Path| root.join(rel);
    let done = |r: rustix::io::Result<()>| r.map(|()| Payload::Done).map_err(rx);
    match op {
        Op::CreateWrite { path, excl, mode, len, seed } => {
            let mut flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
            if *excl {
                flags |= OFlags::EXCL;
            }
            let f = open(&p(path), flags, mode.0)?;
            f.write_all_at(&data(*len, *seed), 0).map_err(io)?;
            Ok(Payload::Done)
        }
        Op::OpenWrite { path, trunc } => {
            let flags = if *trunc { OFlags::WRONLY | OFlags::TRUNC } else { OFlags::RDWR };
            open(&p(path), flags, 0).map(|_| Payload::Done)
        }
        Op::Pwrite { path, offset, len, seed } => {
            let f = open(&p(path), OFlags::WRONLY, 0)?;
            f.write_all_at(&data(*len, *seed), *offset).map_err(io)?;
            Ok(Payload::Done)
        }
        Op::Append { path, len, seed } => {
            let mut f = open(&p(path), OFlags::WRONLY | OFlags::APPEND, 0)?;
            std::io::Write::write_all(&mut f, &data(*len, *seed)).map_err(io)?;
            Ok(Payload::Done)
        }
        Op::Truncate { path, len } => {
            let f = open(&p(path), OFlags::WRONLY, 0)?;
            done(rustix::fs::ftruncate(&f, *len))
        }
        Op::Chmod { path, mode } => {
            done(rustix::fs::chmodat(CWD, p(path), Mode::from_raw_mode(mode.0), AtFlags::empty()))
        }
        Op::Chown { path, uid, gid } => done(rustix::fs::chownat(
            CWD,
            p(path),
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )),
        Op::Utimes { path, time } => {
            let t = match time {
                Some((sec, nsec)) => Timespec { tv_sec: *sec, tv_nsec: *nsec },
                None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
            };
            let times = Timestamps { last_access: t, last_modification: t };
            done(rustix::fs::utimensat(CWD, p(path), &times, AtFlags::SYMLINK_NOFOLLOW))
        }
        Op::Mkdir { path, mode } => done(rustix::fs::mkdirat(CWD, p(path), Mode::from_raw_mode(mode.0))),
        Op::Rmdir { path } => done(rustix::fs::unlinkat(CWD, p(path), AtFlags::REMOVEDIR)),
        Op::Unlink { path } => done(rustix::fs::unlinkat(CWD, p(path), AtFlags::empty())),
        Op::Rename { from, to, flags } => done(rustix::fs::renameat_with(CWD, p(from), CWD, p(to), *flags)),
        Op::Symlink { target, path } => done(rustix::fs::symlinkat(target.as_str(), CWD, p(path))),
        Op::Link { from, to } => done(rustix::fs::linkat(CWD, p(from), CWD, p(to), AtFlags::empty())),
        Op::Mkfifo { path, mode } => {
            done(rustix::fs::mknodat(CWD, p(path), FileType::Fifo, Mode::from_raw_mode(mode.0), 0))
        }
        Op::SetXattr { path, name, value, flags } => {
            done(rustix::fs::lsetxattr(p(path), name.as_str(), &value.0, *flags))
        }
        Op::RemoveXattr { path, name } => done(rustix::fs::lremovexattr(p(path), name.as_str())),
        Op::GetXattr { path, name } => {
            let mut buf = vec![0u8; 64 * 1024];
            let n = rustix::fs::lgetxattr(p(path), name.as_str(), &mut buf[..]).map_err(rx)?;
            buf.truncate(n);
            Ok(Payload::Value(Bytes(buf)))
        }
        Op::ListXattr { path } => xattrs(&p(path), |_| true).map(Payload::Xattrs).map_err(io),
        Op::Read { path } => {
            let mut f = open(&p(path), OFlags::RDONLY, 0)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io)?;
            let mut h = Fnv::default();
            h.write(&buf);
            Ok(Payload::Data { len: buf.len() as u64, hash: h.0 })
        }
        Op::ReadDir { path } => {
            let mut names = Vec::new();
            for ent in fs::read_dir(p(path)).map_err(io)? {
                let ent = ent.map_err(io)?;
                names.push((ent.file_name(), Kind::of(ent.file_type().map_err(io)?)));
            }
            names.sort();
            Ok(Payload::Names(names))
        }
        Op::Stat { path } => Entry::of(&p(path)).map(Payload::Entry).map_err(io),
    }
}

/// The current tree of mount A, from which operations pick their targets.
pub struct View {
    all: Vec<(PathBuf, Kind)>,
    dirs: Vec<PathBuf>,
    /// Paths that existed earlier and are gone now (often whiteouts below), newest last.
    gone: Vec<PathBuf>,
}

/// Classes of target paths.
#[derive(Clone, Copy)]
pub enum T {
    /// An existing regular file.
    File,
    /// An existing directory other than the root.
    Dir,
    /// An existing symlink.
    Link,
    /// An existing object that is safe to open (not a fifo or device).
    Openable,
    /// Any existing object but the root.
    Any,
    /// A name that does not exist, in an existing directory.
    New,
    /// A path that existed before and is gone (its parent exists).
    Gone,
    /// A path under a missing directory.
    Missing,
}

impl View {
    /// Walks `root`.
    pub fn load(root: &Path) -> View {
        let all = list_tree(root);
        let mut dirs = vec![PathBuf::new()];
        dirs.extend(all.iter().filter(|(_, k)| *k == Kind::Dir).map(|(p, _)| p.clone()));
        View { all, dirs, gone: Vec::new() }
    }

    /// Walks `root` again, remembering what disappeared.
    pub fn reload(&mut self, root: &Path) {
        let new = View::load(root);
        let now: std::collections::BTreeSet<&PathBuf> = new.all.iter().map(|(p, _)| p).collect();
        let mut gone = std::mem::take(&mut self.gone);
        gone.extend(self.all.iter().map(|(p, _)| p).filter(|p| !now.contains(p)).cloned());
        let mut seen = std::collections::BTreeSet::new();
        gone.retain(|p| !now.contains(p) && seen.insert(p.clone()));
        let skip = gone.len().saturating_sub(64);
        *self = View { gone: gone.split_off(skip), ..new };
    }

    /// Whether `rel` exists as a directory (the root included).
    pub fn is_dir(&self, rel: &Path) -> bool {
        rel.as_os_str().is_empty() || self.all.binary_search(&(rel.to_owned(), Kind::Dir)).is_ok()
    }

    /// Picks a path of class `t`, falling back to a new name when there is none.
    pub fn pick(&self, rng: &mut StdRng, t: T) -> PathBuf {
        let of = |f: &dyn Fn(Kind) -> bool| -> Vec<&PathBuf> {
            self.all.iter().filter(|(_, k)| f(*k)).map(|(p, _)| p).collect()
        };
        let pool: Vec<&PathBuf> = match t {
            T::File => of(&|k| k == Kind::File),
            T::Dir => of(&|k| k == Kind::Dir),
            T::Link => of(&|k| k == Kind::Symlink),
            T::Openable => of(&|k| matches!(k, Kind::File | Kind::Dir | Kind::Symlink)),
            T::Any => of(&|_| true),
            T::Gone => self.gone.iter().filter(|p| self.is_dir(p.parent().unwrap())).collect(),
            T::Missing => return self.new_name(rng).join("sub").join("leaf"),
            T::New => return self.new_name(rng),
        };
        match pool.choose(rng) {
            Some(p) => (*p).clone(),
            None => self.new_name(rng),
        }
    }

    /// A name in an existing directory that does not exist yet (names of the fixture pool first).
    pub fn new_name(&self, rng: &mut StdRng) -> PathBuf {
        loop {
            let dir = self.dirs.choose(rng).unwrap();
            let name = if rng.random_bool(0.6) {
                (*NAME_POOL.choose(rng).unwrap()).to_owned()
            } else {
                format!("n{}", rng.random_range(0..1000))
            };
            let path = dir.join(name);
            if self.all.iter().all(|(p, _)| *p != path) {
                return path;
            }
        }
    }

    /// Picks a class by weight, then a path of that class.
    pub fn pick_w(&self, rng: &mut StdRng, weights: &[(u32, T)]) -> PathBuf {
        let total: u32 = weights.iter().map(|(w, _)| w).sum();
        let mut roll = rng.random_range(0..total);
        for (w, t) in weights {
            if roll < *w {
                return self.pick(rng, *t);
            }
            roll -= w;
        }
        unreachable!()
    }
}

/// Generates the next operations (one, or several for a recursive delete) from the current view.
/// `a` is the root of mount A, consulted for the xattr names a target has.
pub fn gen_ops(rng: &mut StdRng, v: &View, a: &Path) -> Vec<Op> {
    use T::*;
    let data_target = [(80, File), (5, Openable), (5, Link), (5, New), (5, Dir)];
    let any = [(85, Any), (5, Gone), (5, New), (5, Missing)];
    let len = |rng: &mut StdRng| match rng.random_range(0..10) {
        0..=5 => rng.random_range(0..4096),
        6..=8 => rng.random_range(4096..70_000),
        _ => rng.random_range(70_000..200_000),
    };
    let weights: [u32; 23] = [8, 2, 6, 4, 5, 4, 4, 3, 6, 5, 2, 7, 10, 3, 3, 2, 4, 2, 2, 2, 6, 4, 4];
    let mut roll = rng.random_range(0..weights.iter().sum::<u32>());
    let which = weights
        .iter()
        .position(|w| {
            if roll < *w {
                true
            } else {
                roll -= w;
                false
            }
        })
        .unwrap();
    let op = match which {
        0 => Op::CreateWrite {
            path: v.pick_w(rng, &[(55, New), (20, File), (15, Gone), (5, Dir), (5, Link)]),
            excl: rng.random_bool(0.2),
            mode: Perm(*[0o644, 0o600, 0o755, 0o4755].choose(rng).unwrap()),
            len: len(rng),
            seed: rng.random(),
        },
        1 => Op::OpenWrite { path: v.pick_w(rng, &data_target), trunc: rng.random_bool(0.3) },
        2 => {
            let path = v.pick_w(rng, &data_target);
            Op::Pwrite { path, offset: rng.random_range(0..150_000), len: len(rng), seed: rng.random() }
        }
        3 => Op::Append { path: v.pick_w(rng, &data_target), len: len(rng), seed: rng.random() },
        4 => Op::Truncate { path: v.pick_w(rng, &data_target), len: len(rng) as u64 },
        5 => Op::Chmod {
            path: v.pick_w(rng, &any),
            mode: Perm(*[0o644, 0o600, 0o755, 0o700, 0o4755, 0o2755, 0o1777, 0o444, 0o000, 0o777].choose(rng).unwrap()),
        },
        6 => {
            let id = |rng: &mut StdRng| {
                if rng.random_bool(0.2) { None } else { Some(*[0, 1000, 1001, 65534].choose(rng).unwrap()) }
            };
            Op::Chown { path: v.pick_w(rng, &any), uid: id(rng), gid: id(rng) }
        }
        7 => {
            let time = rng
                .random_bool(0.8)
                .then(|| (rng.random_range(1_000_000_000..1_500_000_000), rng.random_range(0..1_000_000_000)));
            Op::Utimes { path: v.pick_w(rng, &any), time }
        }
        8 => Op::Mkdir {
            path: v.pick_w(rng, &[(50, New), (30, Gone), (15, Any), (5, Missing)]),
            mode: Perm(*[0o755, 0o700, 0o777, 0o1777].choose(rng).unwrap()),
        },
        9 => Op::Rmdir { path: v.pick_w(rng, &[(80, Dir), (10, File), (5, Gone), (5, Link)]) },
        10 => return rm_tree(v, &v.pick(rng, Dir)),
        11 => Op::Unlink { path: v.pick_w(rng, &[(85, Any), (5, Dir), (5, Gone), (5, New)]) },
        12 => rename(rng, v),
        13 => Op::Symlink {
            target: (*LINK_TARGETS.choose(rng).unwrap()).to_owned(),
            path: v.pick_w(rng, &[(70, New), (20, Gone), (10, Any)]),
        },
        14 => Op::Link {
            from: v.pick_w(rng, &[(70, File), (10, Link), (10, Any), (5, Dir), (5, New)]),
            to: v.pick_w(rng, &[(75, New), (15, Gone), (10, Any)]),
        },
        15 => Op::Mkfifo { path: v.pick_w(rng, &[(70, New), (20, Gone), (10, Any)]), mode: Perm(0o644) },
        16 => Op::SetXattr {
            path: v.pick_w(rng, &any),
            name: (*["user.a", "user.b", "user.new", "user.a", "trusted.t", "trusted.overlay.opaque"]
                .choose(rng)
                .unwrap())
            .to_owned(),
            value: Bytes(data(rng.random_range(0..64), rng.random())),
            flags: *[XattrFlags::empty(), XattrFlags::empty(), XattrFlags::CREATE, XattrFlags::REPLACE]
                .choose(rng)
                .unwrap(),
        },
        17 => {
            let path = v.pick_w(rng, &any);
            let name = xattr_name(rng, a, &path, &["user.a", "user.color", "user.none", "trusted.t"]);
            Op::RemoveXattr { path, name }
        }
        18 => {
            let path = v.pick_w(rng, &any);
            let name =
                xattr_name(rng, a, &path, &["user.a", "user.none", "trusted.overlay.opaque", "trusted.overlay.origin"]);
            Op::GetXattr { path, name }
        }
        19 => Op::ListXattr { path: v.pick_w(rng, &any) },
        20 => Op::Read { path: v.pick_w(rng, &data_target) },
        21 => Op::ReadDir { path: v.pick_w(rng, &[(85, Dir), (5, File), (5, Gone), (5, New)]) },
        _ => Op::Stat { path: v.pick_w(rng, &any) },
    };
    vec![op]
}

/// An xattr name for `path`: mostly one it has on mount `a`, else one of `others`.
pub fn xattr_name(rng: &mut StdRng, a: &Path, path: &Path, others: &[&str]) -> String {
    let names = xattrs(&a.join(path), |_| true).unwrap_or_default();
    match names.choose(rng) {
        Some((name, _)) if rng.random_bool(0.7) => name.to_string_lossy().into_owned(),
        _ => (*others.choose(rng).unwrap()).to_owned(),
    }
}

/// A rename: files and dirs to new names, over files, dirs and gone names, into own subtrees, with
/// `RENAME_NOREPLACE` or `RENAME_EXCHANGE` now and then.
pub fn rename(rng: &mut StdRng, v: &View) -> Op {
    use T::*;
    let from = v.pick_w(rng, &[(45, File), (30, Dir), (10, Any), (5, Link), (5, Gone), (5, New)]);
    let to = if rng.random_bool(0.05) && v.is_dir(&from) {
        from.join("inside")
    } else {
        v.pick_w(rng, &[(35, New), (15, File), (15, Dir), (15, Any), (15, Gone), (5, Missing)])
    };
    let flags = match rng.random_range(0..100) {
        0..=64 => RenameFlags::empty(),
        65..=79 => RenameFlags::NOREPLACE,
        _ => RenameFlags::EXCHANGE,
    };
    Op::Rename { from, to, flags }
}

/// `rm -r dir`: unlink or rmdir each entry below `dir`, children first, then `dir` itself.
pub fn rm_tree(v: &View, dir: &Path) -> Vec<Op> {
    let mut ops: Vec<Op> = v
        .all
        .iter()
        .filter(|(p, _)| p.starts_with(dir))
        .rev()
        .map(|(p, k)| match k {
            Kind::Dir => Op::Rmdir { path: p.clone() },
            _ => Op::Unlink { path: p.clone() },
        })
        .collect();
    if dir.as_os_str().is_empty() {
        ops.clear();
    }
    ops
}

/// Symbolic name of an errno.
pub fn errno_name(e: i32) -> String {
    let names = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::ENXIO, "ENXIO"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::EFBIG, "EFBIG"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EMLINK, "EMLINK"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::E2BIG, "E2BIG"),
        (libc::ETXTBSY, "ETXTBSY"),
        (libc::EAGAIN, "EAGAIN"),
    ];
    names.iter().find(|(n, _)| *n == e).map_or(format!("errno{e}"), |(_, s)| (*s).to_owned())
}

/// Short form of an outcome for messages and statistics.
pub fn show(o: &Outcome) -> String {
    match o {
        Ok(Payload::Done) => "Ok".to_owned(),
        Ok(p) => format!("Ok({p:?})"),
        Err(e) => errno_name(*e),
    }
}

/// For two `lstat` results, the differing fields (kernel first), one per line; else nothing.
pub fn entry_diff(a: &Outcome, b: &Outcome) -> String {
    match (a, b) {
        (Ok(Payload::Entry(x)), Ok(Payload::Entry(y))) => {
            x.diff(y).iter().map(|d| format!("  differs: {d}\n")).collect()
        }
        _ => String::new(),
    }
}
