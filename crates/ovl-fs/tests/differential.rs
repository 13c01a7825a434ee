//! Differential tests: the system under test (ovlfs) against the kernel overlay on identical layers.
//!
//! Each sequence generates random layers from a seed, copies them, mounts the kernel overlay on
//! copy A and the system under test on copy B, and applies the same random operations to both:
//! every result (success payload or errno) must match. Then the two views must be the same, the
//! two upper dirs must encode the same state, the kernel must read B's upper as A's view, and the
//! system under test must read A's (kernel-written) upper the same way.
//!
//! Environment (all optional):
//! - `OVL_DIFF_SUT=kernel|ovlfs` system under test (default ovlfs; kernel self-checks the harness)
//! - `OVL_DIFF_SEQS` (24), `OVL_DIFF_OPS` (150): sequences and operations per sequence
//! - `OVL_DIFF_SEED` (0): first seed; sequence i uses seed + i (reproduce one with SEQS=1)
//! - `OVL_DIFF_OVLFS`: ovlfs binary to use instead of the one Cargo built
//! - `OVL_DIFF_SUT_OPTS`: extra mount options for ovlfs (default: the kernel's, see `KERNEL_OPTS`)
//! - `OVL_DIFF_VERBOSE=1`: print every operation and its result
//! - `OVL_DIFF_CHECK_EVERY=N`: also compare views and upper dirs every N operations (finds the
//!   first divergence that no single result shows)
//! - `OVL_DIFF_KEEP=1`: keep the temp dirs (layers, logs) for inspection
//! - `OVL_DIFF_HANG_SECS` (120): an ovlfs mount older than this is presumed hung; its daemon is
//!   killed so blocked calls fail instead of hanging (raise it for very long sequences)

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, XattrFlags};

/// Settings read from the environment.
struct Config {
    seqs: u64,
    ops: usize,
    seed: u64,
    sut: Backend,
    verbose: bool,
    /// Compare views (and upper dirs, minus contents) every this many operations; 0 = at the end.
    check_every: usize,
    /// Mount options for both sides.
    opts: String,
}

impl Config {
    /// Reads the `OVL_DIFF_*` variables.
    fn from_env() -> Config {
        let num = |name: &str, default: u64| {
            std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        };
        Config {
            seqs: num("OVL_DIFF_SEQS", 24),
            ops: num("OVL_DIFF_OPS", 150) as usize,
            seed: num("OVL_DIFF_SEED", 0),
            sut: Backend::sut_from_env(),
            verbose: std::env::var_os("OVL_DIFF_VERBOSE").is_some(),
            check_every: num("OVL_DIFF_CHECK_EVERY", 0) as usize,
            opts: KERNEL_OPTS.to_string(),
        }
    }

    /// The options for the system under test: `OVL_DIFF_SUT_OPTS` if set, else the kernel's.
    fn sut_opts(&self) -> String {
        match self.sut {
            Backend::Kernel => self.opts.clone(),
            Backend::Ovlfs => std::env::var("OVL_DIFF_SUT_OPTS").unwrap_or(self.opts.clone()),
        }
    }
}

/// One filesystem operation, with paths relative to the mount root.
#[derive(Clone, Debug)]
enum Op {
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
    fn kind(&self) -> &'static str {
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
    fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::GetXattr { .. } | Op::ListXattr { .. } | Op::Read { .. } | Op::ReadDir { .. } | Op::Stat { .. }
        )
    }
}

/// Permission bits, shown in octal.
#[derive(Clone, Copy)]
struct Perm(u32);

impl std::fmt::Debug for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// What a successful operation returned.
#[derive(Debug, PartialEq)]
enum Payload {
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
type Outcome = Result<Payload, i32>;

/// Whether two outcomes agree; `lstat` results are compared like views (new mtimes ignored).
fn same(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Ok(Payload::Entry(x)), Ok(Payload::Entry(y))) => x.diff(y).is_empty(),
        _ => a == b,
    }
}

/// The errno of a rustix error.
fn rx(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

/// The errno of a std error.
fn io(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// `len` bytes generated from `seed` (the same on both sides).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// Opens `path` with `flags` plus `O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC` (fifos never block).
fn open(path: &Path, flags: OFlags, mode: u32) -> Result<File, i32> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::from_raw_mode(mode)).map(File::from).map_err(rx)
}

/// Runs `op` on the mount at `root`.
fn apply(root: &Path, op: &Op) -> Outcome {
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
struct View {
    all: Vec<(PathBuf, Kind)>,
    dirs: Vec<PathBuf>,
    /// Paths that existed earlier and are gone now (often whiteouts below), newest last.
    gone: Vec<PathBuf>,
}

/// Classes of target paths.
#[derive(Clone, Copy)]
enum T {
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
    fn load(root: &Path) -> View {
        let all = list_tree(root);
        let mut dirs = vec![PathBuf::new()];
        dirs.extend(all.iter().filter(|(_, k)| *k == Kind::Dir).map(|(p, _)| p.clone()));
        View { all, dirs, gone: Vec::new() }
    }

    /// Walks `root` again, remembering what disappeared.
    fn reload(&mut self, root: &Path) {
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
    fn is_dir(&self, rel: &Path) -> bool {
        rel.as_os_str().is_empty() || self.all.binary_search(&(rel.to_owned(), Kind::Dir)).is_ok()
    }

    /// Picks a path of class `t`, falling back to a new name when there is none.
    fn pick(&self, rng: &mut StdRng, t: T) -> PathBuf {
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
    fn new_name(&self, rng: &mut StdRng) -> PathBuf {
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
    fn pick_w(&self, rng: &mut StdRng, weights: &[(u32, T)]) -> PathBuf {
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
fn gen_ops(rng: &mut StdRng, v: &View, a: &Path) -> Vec<Op> {
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
fn xattr_name(rng: &mut StdRng, a: &Path, path: &Path, others: &[&str]) -> String {
    let names = xattrs(&a.join(path), |_| true).unwrap_or_default();
    match names.choose(rng) {
        Some((name, _)) if rng.random_bool(0.7) => name.to_string_lossy().into_owned(),
        _ => (*others.choose(rng).unwrap()).to_owned(),
    }
}

/// A rename: files and dirs to new names, over files, dirs and gone names, into own subtrees, with
/// `RENAME_NOREPLACE` or `RENAME_EXCHANGE` now and then.
fn rename(rng: &mut StdRng, v: &View) -> Op {
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
fn rm_tree(v: &View, dir: &Path) -> Vec<Op> {
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
fn errno_name(e: i32) -> String {
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
fn show(o: &Outcome) -> String {
    match o {
        Ok(Payload::Done) => "Ok".to_owned(),
        Ok(p) => format!("Ok({p:?})"),
        Err(e) => errno_name(*e),
    }
}

/// For two `lstat` results, the differing fields (kernel first), one per line; else nothing.
fn entry_diff(a: &Outcome, b: &Outcome) -> String {
    match (a, b) {
        (Ok(Payload::Entry(x)), Ok(Payload::Entry(y))) => {
            x.diff(y).iter().map(|d| format!("  differs: {d}\n")).collect()
        }
        _ => String::new(),
    }
}

/// Counts of results per operation kind.
#[derive(Default)]
struct Stats {
    seqs: u64,
    ops: u64,
    by_kind: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

impl Stats {
    /// Counts one result.
    fn record(&mut self, op: &Op, o: &Outcome) {
        self.ops += 1;
        let key = match o {
            Ok(_) => "ok".to_owned(),
            Err(e) => errno_name(*e),
        };
        *self.by_kind.entry(op.kind()).or_default().entry(key).or_default() += 1;
    }

    /// Prints the table a human can quote.
    fn print(&self, sut: Backend, secs: f64) {
        eprintln!("differential: SUT={sut:?}: {} sequences, {} operations, {secs:.1} s", self.seqs, self.ops);
        for (kind, counts) in &self.by_kind {
            let cells: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            eprintln!("  {kind:<17} {}", cells.join(", "));
        }
    }
}

/// Random sequences on the kernel overlay and the system under test must agree op by op, and in
/// the final views, the final upper dirs, and when each side's layers are read by the other.
#[test]
fn differential_random_sequences() {
    run_all(&Config::from_env());
}

/// The same with `redirect_dir=on` on both sides: directories with lower parts move, through
/// `overlay.redirect`, and each side must follow the other's redirects.
#[test]
fn differential_random_sequences_with_redirects() {
    let mut cfg = Config::from_env();
    cfg.opts = KERNEL_OPTS.replace("redirect_dir=off", "redirect_dir=on");
    cfg.seed += 1000;
    run_all(&cfg);
}

/// Runs every configured seed and prints the per-op statistics.
fn run_all(cfg: &Config) {
    let start = Instant::now();
    let mut stats = Stats::default();
    for seed in cfg.seed..cfg.seed + cfg.seqs {
        run_sequence(cfg, seed, &mut stats);
        stats.seqs += 1;
    }
    stats.print(cfg.sut, start.elapsed().as_secs_f64());
}

/// One seed: generate, copy, mount both, run the operations, compare everything.
fn run_sequence(cfg: &Config, seed: u64, stats: &mut Stats) {
    let tmp = tempdir(&format!("ovl-diff-{seed}-"));
    let la = generate_layers(&tmp.path().join("a"), seed, 3, seed % 3 != 0);
    let lb = la.copy_to(&tmp.path().join("b"));
    let ma = MountGuard::mount(Backend::Kernel, &la, &cfg.opts, &mount_point(tmp.path(), "mnt-a"));
    let mb = MountGuard::mount(cfg.sut, &lb, &cfg.sut_opts(), &mount_point(tmp.path(), "mnt-b"));
    if cfg.sut == Backend::Ovlfs && std::env::var_os("OVL_DIFF_OVLFS").is_none() {
        assert_eq!(mb.fstype(), "fuse.ovlfs", "mount type of ovlfs in mountinfo");
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0d1f_f5eed);
    let mut view = View::load(ma.path());
    assert_same_tree(
        &format!("seed {seed}: initial views"),
        "kernel",
        &snapshot_tree(ma.path()),
        "SUT",
        &snapshot_tree(mb.path()),
    );
    let mut recent: VecDeque<String> = VecDeque::new();
    let mut index = 0;
    let mut last_check = 0;
    while index < cfg.ops {
        let mut dirty = false;
        for op in gen_ops(&mut rng, &view, ma.path()) {
            let (ra, rb) = (apply(ma.path(), &op), apply(mb.path(), &op));
            stats.record(&op, &ra);
            if cfg.verbose {
                eprintln!("seed {seed} op {index}: {op:?} -> {}", show(&ra));
            }
            if !same(&ra, &rb) {
                let history: Vec<String> = recent.iter().cloned().collect();
                panic!(
                    "seed {seed} op {index}: {op:?}\n  kernel: {}\n  SUT:    {}\n{}previous ops:\n  {}\n(reproduce: OVL_DIFF_SEED={seed} OVL_DIFF_SEQS=1 OVL_DIFF_VERBOSE=1)\n{}",
                    show(&ra),
                    show(&rb),
                    entry_diff(&ra, &rb),
                    history.join("\n  "),
                    mb.log_tail()
                );
            }
            recent.push_back(format!("{index}: {op:?} -> {}", show(&ra)));
            if recent.len() > 12 {
                recent.pop_front();
            }
            dirty |= op.mutates() && ra.is_ok();
            index += 1;
        }
        if dirty {
            view.reload(ma.path());
        }
        if cfg.check_every > 0 && index / cfg.check_every != last_check {
            last_check = index / cfg.check_every;
            check_midway(seed, index, &ma, &mb, &la, &lb);
        }
    }
    let want = snapshot_tree(ma.path());
    assert_same_tree(
        &format!("seed {seed}: views after {index} ops"),
        "kernel",
        &want,
        "SUT",
        &snapshot_tree(mb.path()),
    );
    ma.unmount().unwrap_or_else(|e| panic!("seed {seed}: kernel unmount: {e}"));
    mb.unmount().unwrap_or_else(|e| panic!("seed {seed}: SUT unmount: {e}"));
    assert_same_upper(
        &format!("seed {seed}: upper dirs"),
        "kernel",
        &snapshot_upper(&la.upper),
        "SUT",
        &snapshot_upper(&lb.upper),
    );

    let kb = MountGuard::mount(
        Backend::Kernel,
        &lb.with_fresh_work(tmp.path().join("b/work2")),
        &cfg.opts,
        &mount_point(tmp.path(), "mnt-kb"),
    );
    assert_same_tree(
        &format!("seed {seed}: kernel reading SUT's upper"),
        "kernel",
        &want,
        "kernel on B",
        &snapshot_tree(kb.path()),
    );
    kb.unmount().unwrap_or_else(|e| panic!("seed {seed}: unmount: {e}"));

    let la2 = la.with_fresh_work(tmp.path().join("a/work2"));
    let sa = MountGuard::mount(cfg.sut, &la2, &cfg.sut_opts(), &mount_point(tmp.path(), "mnt-sa"));
    assert_same_tree(
        &format!("seed {seed}: SUT reading kernel's upper"),
        "kernel",
        &want,
        "SUT on A",
        &snapshot_tree(sa.path()),
    );
    sa.unmount().unwrap_or_else(|e| panic!("seed {seed}: SUT unmount: {e}"));
}

/// Compares the views and the upper dirs while both are mounted. Contents and sizes in the upper
/// dirs are left out: a daemon with a writeback cache may not have written them yet.
fn check_midway(seed: u64, index: usize, ma: &MountGuard, mb: &MountGuard, la: &Layers, lb: &Layers) {
    let what = format!("seed {seed}: views after op {}", index - 1);
    assert_same_tree(&what, "kernel", &snapshot_tree(ma.path()), "SUT", &snapshot_tree(mb.path()));
    let diffs: Vec<String> = diff_upper(&snapshot_upper(&la.upper), &snapshot_upper(&lb.upper))
        .into_iter()
        .filter(|d| !d.contains(" size: ") && !d.contains(" hash: "))
        .collect();
    if let Some(msg) = report(&format!("seed {seed}: upper dirs after op {}", index - 1), "kernel", "SUT", &diffs) {
        panic!("{msg}");
    }
}

/// Layers for the fixed scenarios: two lowers, an empty upper.
const SCENARIO: &str = "
    l2 dir d
    l2 file d/keep lower2 keep
    l2 file d/gone lower2 gone
    l2 dir m
    l2 file m/one lower2 one
    l1 dir m
    l1 file m/two lower1 two
    l1 file f hello from l1
    l2 file f lower2 f
    l2 xattr f user.k v2
    l1 xattr f user.k v1
    l1 file g grow me
    l1 mode g 4755
    l1 link s f
    l1 dir e
    l2 file e lower2 file under dir
    l1 file e/inner inner
    l2 dir lowdir
    l2 file lowdir/x x
    l1 fifo p
    l1 owner g 1000 1000
";

/// Builds a scene through the kernel (whiteouts, an opaque dir, copied-up files), then mounts the
/// system under test on that upper: it must show the kernel's view.
#[test]
fn kernel_written_upper_reads_back() {
    let tmp = tempdir("ovl-readback-");
    let layers = Layers::create(&tmp.path().join("layers"), 2);
    apply_fixture(&layers, SCENARIO);
    let want = {
        let k = MountGuard::mount(Backend::Kernel, &layers, KERNEL_OPTS, &mount_point(tmp.path(), "mnt-k"));
        let m = k.path();
        fs::remove_file(m.join("d/gone")).unwrap();
        for f in ["m/one", "m/two"] {
            fs::remove_file(m.join(f)).unwrap();
        }
        fs::remove_dir(m.join("m")).unwrap();
        fs::create_dir(m.join("m")).unwrap();
        write_file(&m.join("m/new"), b"new file in opaque dir\n");
        fs::rename(m.join("m/new"), m.join("m/renamed")).unwrap();
        rustix::fs::chmodat(CWD, m.join("f"), Mode::from_raw_mode(0o600), AtFlags::empty()).unwrap();
        let mut g = fs::OpenOptions::new().append(true).open(m.join("g")).unwrap();
        std::io::Write::write_all(&mut g, b"more\n").unwrap();
        drop(g);
        rustix::fs::lsetxattr(m.join("d/keep"), "user.x", b"1", XattrFlags::empty()).unwrap();
        fs::hard_link(m.join("f"), m.join("f2")).unwrap();
        fs::create_dir_all(m.join("new/sub")).unwrap();
        write_file(&m.join("new/sub/file"), b"deep\n");
        std::os::unix::fs::symlink("new/sub/file", m.join("newlink")).unwrap();
        fs::remove_file(m.join("lowdir/x")).unwrap();
        fs::remove_dir(m.join("lowdir")).unwrap();
        let tree = snapshot_tree(m);
        k.unmount().unwrap();
        tree
    };
    let upper = snapshot_upper(&layers.upper);
    let at = |p: &str| upper.get(Path::new(p)).unwrap_or_else(|| panic!("kernel wrote no /{p} in upper"));
    for wh in ["d/gone", "lowdir"] {
        assert!(at(wh).whiteout, "/{wh} is a whiteout");
    }
    assert_eq!(at("m").opaque.as_deref(), Some(&b"y"[..]), "/m recreated over a whiteout is opaque");
    assert_eq!(at("f").perm, 0o600, "chmod copied /f up");
    assert!(!upper.contains_key(Path::new("m/new")));

    let fresh = layers.with_fresh_work(tmp.path().join("layers/work2"));
    let sut = Backend::sut_from_env();
    let s = MountGuard::mount(sut, &fresh, &sut.extra_options(), &mount_point(tmp.path(), "mnt-s"));
    assert_same_tree("kernel-written upper", "kernel", &want, "SUT", &snapshot_tree(s.path()));
    s.unmount().unwrap();
}

/// The kernel accepts the oracle's options; without redirect_dir renaming a lower or merged dir
/// gives EXDEV while an upper-only dir renames; the system under test does the same.
#[test]
fn dir_rename_without_redirect_dir_gives_exdev() {
    let mut backends = vec![Backend::Kernel];
    if Backend::sut_from_env() != Backend::Kernel {
        backends.push(Backend::Ovlfs);
    }
    for backend in backends {
        let tmp = tempdir("ovl-exdev-");
        let layers = Layers::create(&tmp.path().join("layers"), 2);
        apply_fixture(&layers, "l2 dir merged\nl2 file merged/a\nl1 dir merged\nl1 dir lower\nu dir upper");
        let m = MountGuard::mount(backend, &layers, &backend.extra_options(), &mount_point(tmp.path(), "mnt"));
        let rename =
            |a: &str, b: &str, flags| rustix::fs::renameat_with(CWD, m.path().join(a), CWD, m.path().join(b), flags);
        for dir in ["merged", "lower"] {
            assert_eq!(
                rename(dir, "moved", RenameFlags::empty()),
                Err(rustix::io::Errno::XDEV),
                "{backend:?}: rename /{dir}"
            );
            assert_eq!(
                rename(dir, "upper", RenameFlags::EXCHANGE),
                Err(rustix::io::Errno::XDEV),
                "{backend:?}: exchange /{dir}"
            );
        }
        assert_eq!(rename("upper", "moved", RenameFlags::empty()), Ok(()), "{backend:?}: rename upper-only dir");
        m.unmount().unwrap();
    }
}

/// The harness itself: copies are faithful and the generator makes every kind of object.
#[test]
fn fixture_copies_are_faithful() {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for seed in 0..6 {
        let tmp = tempdir("ovl-fixture-");
        let a = generate_layers(&tmp.path().join("a"), seed, 3, true);
        let b = a.copy_to(&tmp.path().join("b"));
        for (da, db) in a.lowers.iter().chain([&a.upper]).zip(b.lowers.iter().chain([&b.upper])) {
            assert_same_tree("raw layer copy", "original", &snapshot_tree(da), "copy", &snapshot_tree(db));
            assert_same_upper("raw layer copy", "original", &snapshot_upper(da), "copy", &snapshot_upper(db));
            for e in snapshot_upper(da).values() {
                let mut count = |what| *seen.entry(what).or_default() += 1;
                match e.kind {
                    _ if e.whiteout => count("whiteout"),
                    _ if e.opaque.is_some() => count("opaque dir"),
                    Kind::File if e.size > 65536 => count("big file"),
                    Kind::File if e.size == 0 => count("empty file"),
                    k => count(match k {
                        Kind::Dir => "dir",
                        Kind::File => "file",
                        Kind::Symlink => "symlink",
                        Kind::Fifo => "fifo",
                        _ => "other",
                    }),
                }
                if !e.xattrs.is_empty() {
                    count("xattrs");
                }
                if e.perm & 0o7000 != 0 {
                    count("set-id or sticky");
                }
            }
        }
    }
    for what in [
        "whiteout",
        "opaque dir",
        "big file",
        "empty file",
        "dir",
        "file",
        "symlink",
        "fifo",
        "xattrs",
        "set-id or sticky",
    ] {
        assert!(seen.get(what).copied().unwrap_or(0) > 0, "generator never made a {what}: {seen:?}");
    }
}

/// The harness itself: the comparisons notice a changed upper, an extra file and a changed old mtime.
#[test]
fn comparisons_detect_differences() {
    let tmp = tempdir("ovl-detect-");
    let a = generate_layers(&tmp.path().join("a"), 7, 3, true);
    let b = a.copy_to(&tmp.path().join("b"));
    write_file(&b.upper.join("zz-extra"), b"extra");
    make_whiteout(&b.upper.join("zz-wh"));
    set_times(&b.upper, 1_234_567_890, 5);
    let ma = MountGuard::mount(Backend::Kernel, &a, KERNEL_OPTS, &mount_point(tmp.path(), "mnt-a"));
    let mb = MountGuard::mount(Backend::Kernel, &b, KERNEL_OPTS, &mount_point(tmp.path(), "mnt-b"));
    let diffs = diff_trees(&snapshot_tree(ma.path()), &snapshot_tree(mb.path()));
    assert!(diffs.iter().any(|d| d.starts_with("only in B: /zz-extra")), "{diffs:?}");
    assert!(diffs.iter().any(|d| d.starts_with("differs: / mtime")), "{diffs:?}");
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    drop((ma, mb));
    let diffs = diff_upper(&snapshot_upper(&a.upper), &snapshot_upper(&b.upper));
    assert_eq!(diffs.len(), 2, "{diffs:?}");
}
