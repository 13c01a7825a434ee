//! Snapshot model test (DESIGN §6): random operations on LIVE through an ovlsnap mount, with
//! takes at random points; every snapshot must keep showing the tree recorded when it was taken.
//!
//! Each sequence builds a small random tree in LIVE (dirs three deep, files, a symlink, a hard
//! link pair, `user.*` xattrs) and the same tree in a plain "shadow" dir, mounts LIVE (stacked
//! over LIVE for even seeds, at a separate MNT for odd ones) and applies each operation both
//! through MNT and to the shadow: the results (success or errno) must agree, and the shadow is the
//! oracle of the live view. About one step in 15 is a `take`; right after it the tree of MNT is
//! recorded as the snapshot's expected tree, and every snapshot's view `.snapshots/NAME` is
//! compared with its recording. At the end each snapshot is also mounted with the stock kernel
//! overlay (`ovlsnap mount-cmd`) and compared; then `ovlsnap umount` (LIVE must hold the final
//! live tree), `ovlsnap mount` again (every view, the list and MNT must be as before), and a
//! few more operations and a take after the remount.
//!
//! Hard links (issue 16.4): recordings hold each non-directory's link count and which names are
//! one object, so views, the kernel's mounts, received streams (each snapshot sent whole and
//! received at the end) and LIVE after a restore must keep the groups of take time. Views must
//! also keep every owner and mtime of take time (directories included), their inode numbers
//! must survive the cache drops made at every third take. (The kernel's mount is compared by
//! link groups, not numbers: it shows a LIVE object by the live mount's number, which is not
//! LIVE's inode number when the live overlay had to allocate one; `hardlinks.rs` compares
//! numbers where it is.)
//!
//! Environment (all optional):
//! - `OVLSNAP_MODEL_SEED` (1): first seed; sequence i uses SEED + i (reproduce one with SEQS=1)
//! - `OVLSNAP_MODEL_SEQS` (8), `OVLSNAP_MODEL_OPS` (200): sequences, and steps per sequence
//! - `OVLSNAP_MODEL_VERBOSE=1`: print every operation and take
//! - see `common/mod.rs` for `OVLSNAP_BIN`, `OVLSNAP_TEST_KEEP` and the deadlines

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// Settings read from the environment.
struct Config {
    seed: u64,
    seqs: u64,
    ops: usize,
    verbose: bool,
}

impl Config {
    fn from_env() -> Config {
        let num = |name: &str, default: u64| {
            std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        };
        Config {
            seed: num("OVLSNAP_MODEL_SEED", 1),
            seqs: num("OVLSNAP_MODEL_SEQS", 8),
            ops: num("OVLSNAP_MODEL_OPS", 200) as usize,
            verbose: std::env::var_os("OVLSNAP_MODEL_VERBOSE").is_some(),
        }
    }
}

#[test]
fn snapshots_keep_the_tree_recorded_at_take() {
    let cfg = Config::from_env();
    for i in 0..cfg.seqs {
        run_sequence(&cfg, cfg.seed + i);
    }
}

/// Sequences that once failed, run in CI whatever the environment says (issue 16.4): seed 7 (a
/// delete split a hard-link group in an older view), 102 (a delete gave an older view's directory
/// the time of a later change in it: the merge's diff ignored mtimes), 109 (a delete linked LIVE's
/// own symlinks into the merged layer, so that view showed them with LIVE's link counts and would
/// have followed every later change of them).
#[test]
fn sequences_that_once_broke_a_delete() {
    let cfg = Config { seed: 0, seqs: 1, ..Config::from_env() };
    for seed in [7, 102, 109] {
        run_sequence(&cfg, seed);
    }
}

/// Longer sequences that once failed (session 21, 400 steps; CI's other sequences run 200): seed
/// 1014 (restore removed a directory moved below a new one in its old place along with that
/// place) and 1017 (restore gave up on a directory that goes back below where it is; then a
/// delete split a hard-link group a restore had moved back, in older views).
#[test]
fn long_sequences_that_once_broke_a_restore_or_a_delete() {
    let cfg = Config { seed: 0, seqs: 1, ops: 400, ..Config::from_env() };
    for seed in [1014, 1017] {
        run_sequence(&cfg, seed);
    }
}

/// Names the generator uses, so that renames and links often meet existing names.
const NAME_POOL: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h", "with space", "é"];

const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o640, 0o444, 0o700];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o750, 0o775, 0o1777];

/// Permission bits, shown in octal.
#[derive(Clone, Copy)]
struct Perm(u32);

impl std::fmt::Debug for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// One operation, with paths relative to the tree's root.
#[derive(Clone, Debug)]
enum Op {
    /// `pwrite` of `len` bytes made from `seed` at `offset` (may extend the file, leaving a hole).
    Write { path: PathBuf, offset: u64, len: usize, seed: u64 },
    /// `O_APPEND` write.
    Append { path: PathBuf, len: usize, seed: u64 },
    /// `ftruncate` to `len` (shrink or grow).
    Truncate { path: PathBuf, len: u64 },
    /// `open(O_WRONLY | O_TRUNC)`, then write `len` bytes.
    OpenTrunc { path: PathBuf, len: usize, seed: u64 },
    /// `open(O_CREAT | O_EXCL)` with `mode`, then write `len` bytes.
    Create { path: PathBuf, mode: Perm, len: usize, seed: u64 },
    /// `mkdir`.
    Mkdir { path: PathBuf, mode: Perm },
    /// `rename` (of a file, symlink or dir; over an existing file or empty dir or not).
    Rename { from: PathBuf, to: PathBuf },
    /// `unlink`.
    Unlink { path: PathBuf },
    /// `rmdir`.
    Rmdir { path: PathBuf },
    /// `chmod`.
    Chmod { path: PathBuf, mode: Perm },
    /// `symlink(target, path)`.
    Symlink { target: String, path: PathBuf },
    /// `link(from, to)`.
    Link { from: PathBuf, to: PathBuf },
    /// `lsetxattr` of a `user.*` name.
    SetXattr { path: PathBuf, name: String, value: String },
    /// `lremovexattr`.
    RemoveXattr { path: PathBuf, name: String },
}

/// `len` printable bytes made from `seed`.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(b'a'..=b'z')).collect()
}

/// The errno of an `io::Error`.
fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Runs `op` under `root`; the errno on failure.
fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let p = |rel: &Path| root.join(rel);
    let open = |rel: &Path, o: &mut OpenOptions| o.custom_flags(libc::O_NOFOLLOW).open(p(rel)).map_err(errno);
    match op {
        Op::Write { path, offset, len, seed } => {
            open(path, OpenOptions::new().write(true))?.write_all_at(&data(*len, *seed), *offset).map_err(errno)
        }
        Op::Append { path, len, seed } => {
            open(path, OpenOptions::new().append(true))?.write_all(&data(*len, *seed)).map_err(errno)
        }
        Op::Truncate { path, len } => open(path, OpenOptions::new().write(true))?.set_len(*len).map_err(errno),
        Op::OpenTrunc { path, len, seed } => {
            open(path, OpenOptions::new().write(true).truncate(true))?.write_all(&data(*len, *seed)).map_err(errno)
        }
        Op::Create { path, mode, len, seed } => {
            open(path, OpenOptions::new().write(true).create_new(true).mode(mode.0))?
                .write_all(&data(*len, *seed))
                .map_err(errno)
        }
        Op::Mkdir { path, mode } => fs::DirBuilder::new().mode(mode.0).create(p(path)).map_err(errno),
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map_err(errno),
        Op::Unlink { path } => fs::remove_file(p(path)).map_err(errno),
        Op::Rmdir { path } => fs::remove_dir(p(path)).map_err(errno),
        Op::Chmod { path, mode } => fs::set_permissions(p(path), fs::Permissions::from_mode(mode.0)).map_err(errno),
        Op::Symlink { target, path } => std::os::unix::fs::symlink(target, p(path)).map_err(errno),
        Op::Link { from, to } => fs::hard_link(p(from), p(to)).map_err(errno),
        Op::SetXattr { path, name, value } => {
            rustix::fs::lsetxattr(p(path), name.as_str(), value.as_bytes(), rustix::fs::XattrFlags::empty())
                .map_err(|e| e.raw_os_error())
        }
        Op::RemoveXattr { path, name } => {
            rustix::fs::lremovexattr(p(path), name.as_str()).map_err(|e| e.raw_os_error())
        }
    }
}

/// Shows an operation's result.
fn show(r: &Result<(), i32>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{}", std::io::Error::from_raw_os_error(*e)),
    }
}

/// Builds the starting tree at `root` from `seed` (the same tree for the same seed): dirs up to
/// three deep, files with content, a symlink and a dangling one, a hard link pair across dirs,
/// `user.*` xattrs on the root, some dirs and files.
fn build_initial(root: &Path, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let chmod = |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    let xattr = |p: &Path, k: &str, v: &str| {
        rustix::fs::lsetxattr(p, k, v.as_bytes(), rustix::fs::XattrFlags::empty()).unwrap();
    };
    chmod(root, 0o755);
    xattr(root, "user.root", "r");
    let mut dirs = vec![PathBuf::from("a"), PathBuf::from("a/b"), PathBuf::from("a/b/c")];
    for _ in 0..rng.random_range(2..=4) {
        let parent = dirs.choose(&mut rng).unwrap().parent().unwrap().to_owned();
        let name = NAME_POOL.choose(&mut rng).unwrap();
        if !dirs.contains(&parent.join(name)) {
            dirs.push(parent.join(name));
        }
    }
    for d in &dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in &dirs {
        chmod(&root.join(d), *DIR_MODES[..4].choose(&mut rng).unwrap());
        if rng.random_bool(0.4) {
            xattr(&root.join(d), "user.k", &format!("dir{}", rng.random_range(0..100)));
        }
    }
    let mut parents = dirs.clone();
    parents.push(PathBuf::new());
    let mut files = Vec::new();
    for i in 0..rng.random_range(6..=12) {
        let rel = parents.choose(&mut rng).unwrap().join(format!("f{i}"));
        let len = if rng.random_ratio(1, 8) { rng.random_range(20_000..140_000) } else { rng.random_range(0..5000) };
        fs::write(root.join(&rel), data(len, rng.random())).unwrap();
        chmod(&root.join(&rel), *FILE_MODES.choose(&mut rng).unwrap());
        if rng.random_bool(0.4) {
            xattr(
                &root.join(&rel),
                &format!("user.k{}", rng.random_range(0..3)),
                &format!("v{}", rng.random_range(0..100)),
            );
        }
        files.push(rel);
    }
    let target = files.choose(&mut rng).unwrap();
    std::os::unix::fs::symlink(Path::new("..").join(target), root.join("a/link")).unwrap();
    std::os::unix::fs::symlink("no/such/target", root.join("a/b/dangling")).unwrap();
    fs::write(root.join("a/hl1"), data(3000, rng.random())).unwrap();
    fs::hard_link(root.join("a/hl1"), root.join("a/b/c/hl2")).unwrap();
}

/// The objects of the current tree (from the shadow), from which operations pick targets.
struct State {
    all: Vec<(PathBuf, Kind)>,
}

impl State {
    fn of(&self, f: impl Fn(Kind) -> bool) -> Vec<PathBuf> {
        self.all.iter().filter(|(_, k)| f(*k)).map(|(p, _)| p.clone()).collect()
    }

    /// Every directory, the root (`""`) included.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut d = vec![PathBuf::new()];
        d.extend(self.of(|k| k == Kind::Dir));
        d
    }

    fn exists(&self, p: &Path) -> bool {
        p.as_os_str().is_empty() || self.all.iter().any(|(q, _)| q == p)
    }

    /// Everything below `dir` (not `dir` itself), parents before children.
    fn below(&self, dir: &Path) -> Vec<(PathBuf, Kind)> {
        self.all.iter().filter(|(p, _)| p != dir && p.starts_with(dir)).cloned().collect()
    }

    /// Directories other than the root with nothing in them.
    fn empty_dirs(&self) -> Vec<PathBuf> {
        self.of(|k| k == Kind::Dir).into_iter().filter(|d| self.below(d).is_empty()).collect()
    }

    /// A path that does not exist yet in one of `dirs` (which must not be empty).
    fn new_in(&self, rng: &mut StdRng, dirs: &[PathBuf]) -> PathBuf {
        let dir = dirs.choose(rng).expect("a dir to pick").clone();
        self.new_name(rng, &dir)
    }

    /// A path in `dir` that does not exist yet (names of the pool first).
    fn new_name(&self, rng: &mut StdRng, dir: &Path) -> PathBuf {
        for _ in 0..4 {
            let p = dir.join(NAME_POOL.choose(rng).unwrap());
            if !self.exists(&p) {
                return p;
            }
        }
        loop {
            let p = dir.join(format!("n{}", rng.random_range(0..100_000)));
            if !self.exists(&p) {
                return p;
            }
        }
    }
}

/// A snapshot taken by the sequence, with the tree recorded right after it.
struct Taken {
    name: String,
    tree: Tree,
    /// Owners and mtimes at take time.
    meta: std::collections::BTreeMap<PathBuf, Meta>,
    /// Steps done before it was taken (for messages).
    after_step: usize,
}

/// One sequence: the mount, the shadow oracle, the snapshots taken so far.
struct Model<'c> {
    cfg: &'c Config,
    seed: u64,
    rng: StdRng,
    snap: SnapMount,
    shadow: PathBuf,
    state: State,
    taken: Vec<Taken>,
    /// Takes made so far (deleted ones included), for unique names.
    takes_made: usize,
    /// The dir renamed last, to rename again (ignored once it no longer exists).
    hot_dir: Option<PathBuf>,
    steps: usize,
    ops_tried: usize,
    ops_ok: usize,
    /// The last actions, printed when the sequence fails.
    history: VecDeque<String>,
}

/// Prints how to reproduce a sequence if it fails (dropped last, also during a panic).
struct PanicNote(String);

impl Drop for PanicNote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0);
        }
    }
}

fn run_sequence(cfg: &Config, seed: u64) {
    let form = if seed % 2 == 0 { Form::Stacked } else { Form::Separate };
    let _note = PanicNote(format!(
        "model sequence failed: seed {seed} ({form:?}); reproduce with OVLSNAP_MODEL_SEED={seed} OVLSNAP_MODEL_SEQS=1 \
         OVLSNAP_MODEL_OPS={}",
        cfg.ops
    ));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut snap = SnapMount::prepare(form);
    let shadow = snap.scratch().mkdir("shadow");
    let init = rng.random();
    build_initial(snap.live(), init);
    build_initial(&shadow, init);
    let before = record_tree(snap.live());
    assert_same_tree(&before, &record_tree(&shadow), "harness: LIVE and the shadow are built alike");
    snap.mount();
    check_hidden_names(snap.mnt());
    assert_same_tree(&before, &record_tree(snap.mnt()), "MNT right after mount vs LIVE before it");
    let state = State { all: list_kinds(&shadow) };
    let mut m = Model {
        cfg,
        seed,
        rng,
        snap,
        shadow,
        state,
        taken: Vec::new(),
        takes_made: 0,
        hot_dir: None,
        steps: 0,
        ops_tried: 0,
        ops_ok: 0,
        history: VecDeque::new(),
    };
    m.note(format!("sequence seed {seed}, {form:?}, {} steps", cfg.ops));
    for _ in 0..cfg.ops {
        m.step(true);
    }
    m.finish();
}

impl Model<'_> {
    /// Remembers an action for the failure report (and prints it when verbose).
    fn note(&mut self, line: String) {
        if self.cfg.verbose {
            eprintln!("{line}");
        }
        self.history.push_back(line);
        if self.history.len() > 40 {
            self.history.pop_front();
        }
    }

    /// One step: a take (about 1 in 15 when `takes`), else one planned operation (which may be a
    /// few syscalls, such as emptying a dir).
    fn step(&mut self, takes: bool) {
        self.steps += 1;
        if takes && self.rng.random_ratio(1, 15) {
            self.take();
            return;
        }
        if takes && !self.taken.is_empty() {
            // The snapshot lifecycle (issue 6), now and then between changes.
            match self.rng.random_range(0..120) {
                0..=3 => return self.diff(),
                4..=5 => return self.delete(),
                6 => return self.restore(),
                7 => return self.clone_check(),
                _ => {}
            }
        }
        for op in self.plan() {
            self.run(&op);
        }
    }

    /// Applies `op` through MNT and to the shadow; the results must agree.
    fn run(&mut self, op: &Op) {
        let got = apply(self.snap.mnt(), op);
        let want = apply(&self.shadow, op);
        self.note(format!("step {}: {op:?} -> {}", self.steps, show(&got)));
        assert_eq!(
            got,
            want,
            "step {}: {op:?} gave {} through MNT but {} on a plain dir",
            self.steps,
            show(&got),
            show(&want)
        );
        self.ops_tried += 1;
        self.ops_ok += usize::from(got.is_ok());
        self.state = State { all: list_kinds(&self.shadow) };
    }

    /// Picks the next operation from the current tree (most succeed).
    fn plan(&mut self) -> Vec<Op> {
        let rng = &mut self.rng;
        let st = &self.state;
        let files = st.of(|k| k == Kind::File);
        let dirs = st.dirs();
        let sub_dirs = st.of(|k| k == Kind::Dir);
        let seed = rng.random();
        let size = |p: &Path| fs::symlink_metadata(self.shadow.join(p)).map_or(0, |m| m.len());
        let choice = rng.random_range(0..100);
        let create = |rng: &mut StdRng| {
            let dir = dirs.choose(rng).unwrap();
            let len =
                if rng.random_ratio(1, 10) { rng.random_range(10_000..100_000) } else { rng.random_range(0..3000) };
            vec![Op::Create { path: st.new_name(rng, dir), mode: Perm(*FILE_MODES.choose(rng).unwrap()), len, seed }]
        };
        if files.is_empty() && choice < 27 {
            return create(rng);
        }
        match choice {
            0..12 => {
                let path = files.choose(rng).unwrap().clone();
                let offset = rng.random_range(0..=size(&path) + 4096);
                let len =
                    if rng.random_ratio(1, 8) { rng.random_range(4096..65_536) } else { rng.random_range(1..2000) };
                vec![Op::Write { path, offset, len, seed }]
            }
            12..18 => {
                vec![Op::Append { path: files.choose(rng).unwrap().clone(), len: rng.random_range(1..5000), seed }]
            }
            18..24 => {
                let path = files.choose(rng).unwrap().clone();
                let now = size(&path);
                let len = if rng.random_bool(0.5) || now > 400_000 {
                    rng.random_range(0..=now)
                } else {
                    rng.random_range(now..now + 70_000)
                };
                vec![Op::Truncate { path, len }]
            }
            24..27 => {
                vec![Op::OpenTrunc { path: files.choose(rng).unwrap().clone(), len: rng.random_range(0..3000), seed }]
            }
            27..37 => create(rng),
            37..45 => {
                let dir = dirs.choose(rng).unwrap();
                vec![Op::Mkdir { path: st.new_name(rng, dir), mode: Perm(*DIR_MODES.choose(rng).unwrap()) }]
            }
            45..53 => {
                let movable = st.of(|k| matches!(k, Kind::File | Kind::Symlink));
                let Some(from) = movable.choose(rng).cloned() else { return create(rng) };
                let others: Vec<&PathBuf> = files.iter().filter(|f| **f != from).collect();
                let to = match others.choose(rng) {
                    Some(f) if rng.random_bool(0.5) => (*f).clone(),
                    _ => st.new_in(rng, &dirs),
                };
                vec![Op::Rename { from, to }]
            }
            53..63 => self.plan_dir_rename(),
            63..68 => {
                let gone = st.of(|k| matches!(k, Kind::File | Kind::Symlink));
                let Some(path) = gone.choose(rng).cloned() else { return create(rng) };
                vec![Op::Unlink { path }]
            }
            68..71 => {
                let empty = st.empty_dirs();
                let pool = if !empty.is_empty() && rng.random_bool(0.8) { empty } else { sub_dirs };
                let Some(path) = pool.choose(rng).cloned() else { return create(rng) };
                vec![Op::Rmdir { path }]
            }
            71..74 => {
                // Empty a dir with a small subtree (children first), and in half the cases remove
                // it too (small, so that the tree does not collapse).
                let small: Vec<PathBuf> = sub_dirs.iter().filter(|d| st.below(d).len() <= 8).cloned().collect();
                let Some(dir) = small.choose(rng).cloned() else { return create(rng) };
                let mut ops: Vec<Op> = st
                    .below(&dir)
                    .into_iter()
                    .rev()
                    .map(|(path, k)| if k == Kind::Dir { Op::Rmdir { path } } else { Op::Unlink { path } })
                    .collect();
                if rng.random_bool(0.5) {
                    ops.push(Op::Rmdir { path: dir });
                }
                ops
            }
            74..80 => {
                let path = if rng.random_ratio(1, 20) {
                    PathBuf::new()
                } else {
                    st.of(|k| matches!(k, Kind::File | Kind::Dir)).choose(rng).cloned().unwrap_or_default()
                };
                let is_dir = path.as_os_str().is_empty() || sub_dirs.contains(&path);
                let modes = if is_dir { DIR_MODES } else { FILE_MODES };
                vec![Op::Chmod { path, mode: Perm(*modes.choose(rng).unwrap()) }]
            }
            80..84 => {
                let path = st.new_in(rng, &dirs);
                let up = "../".repeat(path.components().count() - 1);
                let target = match (rng.random_range(0..3), st.all.choose(rng)) {
                    (0, Some((p, _))) => format!("{up}{}", p.display()),
                    (1, _) => "/nonexistent/target".to_owned(),
                    _ => NAME_POOL.choose(rng).unwrap().to_string(),
                };
                vec![Op::Symlink { target, path }]
            }
            84..90 => {
                let Some(from) = files.choose(rng).cloned() else { return create(rng) };
                vec![Op::Link { from, to: st.new_in(rng, &dirs) }]
            }
            90..96 => {
                let path = self.xattr_target(false);
                let rng = &mut self.rng;
                let len = if rng.random_ratio(1, 10) { rng.random_range(200..2000) } else { rng.random_range(0..40) };
                let value = String::from_utf8(data(len, rng.random())).unwrap();
                vec![Op::SetXattr { path, name: format!("user.k{}", rng.random_range(0..4)), value }]
            }
            _ => {
                let path = self.xattr_target(true);
                let have: Vec<String> = xattrs(&self.shadow.join(&path))
                    .unwrap()
                    .into_iter()
                    .map(|(n, _)| n.to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("user."))
                    .collect();
                let rng = &mut self.rng;
                let name = have.choose(rng).cloned().unwrap_or_else(|| format!("user.k{}", rng.random_range(0..4)));
                vec![Op::RemoveXattr { path, name }]
            }
        }
    }

    /// A file or dir (rarely the root) to set or remove an xattr on; `with_xattr`: mostly one
    /// that has a `user.*` xattr.
    fn xattr_target(&mut self, with_xattr: bool) -> PathBuf {
        if self.rng.random_ratio(1, 20) {
            return PathBuf::new();
        }
        let mut pool = self.state.of(|k| matches!(k, Kind::File | Kind::Dir));
        if with_xattr && self.rng.random_bool(0.8) {
            let has = |p: &PathBuf| xattrs(&self.shadow.join(p)).is_ok_and(|x| !x.is_empty());
            let with: Vec<PathBuf> = pool.iter().filter(|p| has(p)).cloned().collect();
            if !with.is_empty() {
                pool = with;
            }
        }
        pool.choose(&mut self.rng).cloned().unwrap_or_default()
    }

    /// A directory rename: within its parent, to another parent, into a dir made just before,
    /// or over an empty dir; half the time the dir renamed last is renamed again.
    fn plan_dir_rename(&mut self) -> Vec<Op> {
        let rng = &mut self.rng;
        let st = &self.state;
        let sub_dirs = st.of(|k| k == Kind::Dir);
        let hot = self.hot_dir.clone().filter(|h| sub_dirs.contains(h) && rng.random_bool(0.5));
        let Some(from) = hot.or_else(|| sub_dirs.choose(rng).cloned()) else {
            return vec![Op::Mkdir { path: st.new_name(rng, Path::new("")), mode: Perm(0o755) }];
        };
        let outside: Vec<PathBuf> = st.dirs().into_iter().filter(|d| !d.starts_with(&from)).collect();
        let parent = from.parent().unwrap_or(Path::new("")).to_owned();
        let mut ops = Vec::new();
        let to = match rng.random_range(0..4) {
            0 => st.new_name(rng, &parent),
            1 => st.new_in(rng, &outside),
            2 => {
                let made = st.new_in(rng, &outside);
                ops.push(Op::Mkdir { path: made.clone(), mode: Perm(0o755) });
                made.join(NAME_POOL.choose(rng).unwrap())
            }
            _ => {
                let empty: Vec<PathBuf> = st.empty_dirs().into_iter().filter(|d| !d.starts_with(&from)).collect();
                match empty.choose(rng) {
                    Some(e) => e.clone(),
                    None => st.new_name(rng, &parent),
                }
            }
        };
        self.hot_dir = Some(to.clone());
        ops.push(Op::Rename { from, to });
        ops
    }

    /// Takes a snapshot (named, or in 1 of 5 named by ovlsnap), records MNT right after it, and
    /// checks the live view and every snapshot view.
    fn take(&mut self) {
        self.takes_made += 1;
        let name = self.rng.random_bool(0.8).then(|| format!("model-{}", self.takes_made));
        let got = self.snap.take(name.as_deref());
        self.note(format!("step {}: take {name:?} -> {got}", self.steps));
        assert!(!self.taken.iter().any(|t| t.name == got), "take printed a name already in use: {got:?}");
        let tree = self.check_live(&format!("right after take {got}"));
        let meta = record_meta(self.snap.mnt());
        self.taken.push(Taken { name: got, tree, meta, after_step: self.steps });
        self.check_views(&format!("after take {}", self.taken.len()));
    }

    /// `ovlsnap diff A [B] --json` between two random snapshots (or one and LIVE): empty exactly
    /// when the recorded trees are equal, and every change it reports is a real difference.
    fn diff(&mut self) {
        let i = self.rng.random_range(0..self.taken.len());
        let j = self.rng.random_range(i..=self.taken.len());
        let a = self.taken[i].name.clone();
        let (b, tb) = match self.taken.get(j) {
            Some(t) if j > i => (Some(t.name.clone()), t.tree.clone()),
            _ => (None, record_tree(self.snap.mnt())),
        };
        let ta = self.taken[i].tree.clone();
        let mut args: Vec<OsString> = vec!["diff".into(), a.clone().into()];
        args.extend(b.clone().map(OsString::from));
        args.extend(["--json".into(), "--mount".into(), self.snap.mnt().into()]);
        let out = ovlsnap(&args);
        let text = out.expect_ok("ovlsnap diff").to_string();
        self.note(format!("step {}: diff {a} {b:?}", self.steps));
        let report = parse_json(&text).unwrap_or_else(|e| panic!("diff --json is not JSON ({e}): {text}"));
        let changes = match report.get("changes") {
            Some(Json::Arr(c)) => c.clone(),
            other => panic!("diff --json has no changes array: {other:?}"),
        };
        let field = |c: &Json, k: &str| match c.get(k) {
            Some(Json::Str(s)) => PathBuf::from(s),
            other => panic!("diff change without {k}: {other:?} in {text}"),
        };
        let equal = ta == tb;
        assert_eq!(
            changes.is_empty(),
            equal,
            "diff {a} {b:?}: reported {} changes for trees that are {}equal: {text}",
            changes.len(),
            if equal { "" } else { "not " }
        );
        for c in &changes {
            let kind = match c.get("change") {
                Some(Json::Str(s)) => s.clone(),
                other => panic!("diff change without a kind: {other:?}"),
            };
            match kind.as_str() {
                "added" => {
                    // Where A has something at the same place, it is a dir that moved away.
                    let (p, at) = (field(c, "path"), field(c, "at"));
                    let moved_away = changes
                        .iter()
                        .any(|o| o.get("change") == Some(&Json::Str("renamed".into())) && o.get("path") == c.get("at"));
                    assert!(
                        tb.contains_key(&p) && (!ta.contains_key(&at) || moved_away),
                        "diff {a} {b:?}: bogus {c:?}"
                    );
                }
                "deleted" => {
                    let p = field(c, "path");
                    assert!(ta.contains_key(&p) && !tb.contains_key(&field(c, "at")), "diff {a} {b:?}: bogus {c:?}");
                }
                "modified" => {
                    let (p, at) = (field(c, "path"), field(c, "at"));
                    assert!(
                        ta.contains_key(&p) && tb.contains_key(&at) && ta.get(&p) != tb.get(&at),
                        "diff {a} {b:?}: {c:?} but the recorded objects are equal"
                    );
                }
                "renamed" => {
                    let (p, to) = (field(c, "path"), field(c, "to"));
                    assert!(
                        ta.get(&p).is_some_and(|e| e.kind == Kind::Dir)
                            && tb.get(&to).is_some_and(|e| e.kind == Kind::Dir),
                        "diff {a} {b:?}: bogus {c:?}"
                    );
                }
                k => panic!("diff: unknown change kind {k}"),
            }
        }
    }

    /// `ovlsnap delete` of a random snapshot: every other view stays as recorded.
    fn delete(&mut self) {
        let i = self.rng.random_range(0..self.taken.len());
        let name = self.taken[i].name.clone();
        let out = ovlsnap(&["delete".as_ref(), OsStr::new(&name), "--mount".as_ref(), self.snap.mnt().as_os_str()]);
        self.note(format!("step {}: delete {name}", self.steps));
        out.expect_ok("ovlsnap delete");
        self.taken.remove(i);
        self.check_views(&format!("after deleting {name}"));
        self.check_live(&format!("after deleting {name}"));
    }

    /// `ovlsnap restore` of a random snapshot: LIVE becomes its tree, every view stays; the
    /// shadow is then reset to that tree.
    fn restore(&mut self) {
        let i = self.rng.random_range(0..self.taken.len());
        let name = self.taken[i].name.clone();
        let out = ovlsnap(&["restore".as_ref(), OsStr::new(&name), "--mount".as_ref(), self.snap.mnt().as_os_str()]);
        self.note(format!("step {}: restore {name}", self.steps));
        out.expect_ok("ovlsnap restore");
        assert_same_tree(&self.taken[i].tree, &record_tree(self.snap.mnt()), &format!("LIVE after restore {name}"));
        self.check_views(&format!("after restoring {name}"));
        // The shadow follows: the same tree, copied from LIVE with its hard links (`cp -a`).
        fs::remove_dir_all(&self.shadow).unwrap();
        fs::create_dir(&self.shadow).unwrap();
        let view = self.snap.mnt().to_path_buf();
        let cp = std::process::Command::new("cp").arg("-a").arg(view.join(".")).arg(&self.shadow).status().expect("cp");
        assert!(cp.success(), "copying {} to the shadow", view.display());
        fs::set_permissions(&self.shadow, fs::metadata(&view).unwrap().permissions()).unwrap();
        self.state = State { all: list_kinds(&self.shadow) };
        self.check_live(&format!("after restore {name}: shadow reset"));
    }

    /// `ovlsnap clone` of a random snapshot: the clone shows its tree, takes writes, and the
    /// snapshot does not change.
    fn clone_check(&mut self) {
        let i = self.rng.random_range(0..self.taken.len());
        let name = self.taken[i].name.clone();
        let dir = self.snap.scratch().mkdir(&format!("clone-{}", self.steps));
        let out = ovlsnap(&[
            "clone".as_ref(),
            OsStr::new(&name),
            dir.as_os_str(),
            "--mount".as_ref(),
            self.snap.mnt().as_os_str(),
        ]);
        self.note(format!("step {}: clone {name}", self.steps));
        out.expect_ok("ovlsnap clone");
        let guard = KernelMount::adopt(&dir);
        // Hard-link groups too: an ovlfs mount without an index shows the names of a lower hard
        // link with the lower file's one st_ino since session 7 (they were compared ungrouped).
        let t = &self.taken[i];
        assert_same_tree(&t.tree, &record_tree(&dir), &format!("clone of {name}"));
        fs::write(dir.join("written-in-clone"), b"clone\n").expect("write into the clone");
        drop(guard);
        self.check_views(&format!("after writing into a clone of {name}"));
    }

    /// Records MNT and checks it against the shadow (and, at a separate MNT, against LIVE read
    /// directly); returns the recording.
    fn check_live(&self, when: &str) -> Tree {
        let live = record_tree(self.snap.mnt());
        assert_same_tree(&record_tree(&self.shadow), &live, &format!("{when}: MNT vs the shadow dir"));
        if self.snap.form() == Form::Separate {
            assert_same_tree(&live, &record_tree(self.snap.live()), &format!("{when}: LIVE read directly vs MNT"));
        }
        live
    }

    /// Checks `ls .snapshots` and every `.snapshots/NAME` against the recorded trees.
    fn check_views(&self, when: &str) {
        let mut names: Vec<String> = self.taken.iter().map(|t| t.name.clone()).collect();
        names.sort();
        assert_eq!(self.snap.listed_views(), names, "{when}: names listed in .snapshots");
        let mut inos = Vec::new();
        for t in &self.taken {
            let what = format!("{when}: .snapshots/{} (taken after step {})", t.name, t.after_step);
            let view = self.snap.view(&t.name);
            assert_store_hidden(&view, &what);
            assert_same_tree(&t.tree, &record_tree(&view), &what);
            assert_same_meta(t, &record_meta(&view), &what);
            inos.push(inode_numbers(&view));
        }
        if self.takes_made % 3 == 0 {
            drop_caches();
            for (t, before) in self.taken.iter().zip(inos) {
                let what = format!("{when}: .snapshots/{} after a cache drop", t.name);
                let view = self.snap.view(&t.name);
                assert_eq!(inode_numbers(&view), before, "{what}: inode numbers");
                assert_same_tree(&t.tree, &record_tree(&view), &what);
            }
        }
    }

    /// Each snapshot sent whole and received into an empty dir must be its recorded tree, hard
    /// links included, and so must each one sent as an incremental stream from the one before
    /// it, received over that one.
    fn check_streams(&self) {
        // Roots are not compared: a receive over an existing tree (the incremental ones) keeps its root.
        let below_root = |t: &Tree| -> Tree {
            t.iter().filter(|(p, _)| !p.as_os_str().is_empty()).map(|(p, e)| (p.clone(), e.clone())).collect()
        };
        for (i, t) in self.taken.iter().enumerate() {
            let stream = self.snap.scratch().path().join(format!("stream-{i}.tar"));
            crate::stream::send(&self.snap, &t.name, None, &stream);
            let dir = self.snap.scratch().path().join(format!("received-{i}"));
            crate::stream::receive(&dir, &stream);
            let what = format!("{} sent and received", t.name);
            assert_same_tree(&below_root(&t.tree), &below_root(&record_tree(&dir)), &what);
            // Until session 21 opt-in: a snapshot whose root changed mode (seed 3) was sent as an
            // empty stream (`stream::tests::a_changed_root_leaves_the_changes_below_it_in_the_stream`).
            if i > 0 {
                let prev = self.snap.scratch().path().join(format!("received-{}", i - 1));
                let incr = self.snap.scratch().path().join(format!("incr-{i}.tar"));
                crate::stream::send(&self.snap, &t.name, Some(&self.taken[i - 1].name), &incr);
                crate::stream::receive(&prev, &incr);
                let what = format!("{} received as changes since {}", t.name, self.taken[i - 1].name);
                assert_same_tree(&below_root(&t.tree), &below_root(&record_tree(&prev)), &what);
                fs::remove_dir_all(&prev).unwrap();
            }
        }
    }

    /// Checks that `list --json` names the snapshots in the order taken; returns (name, id) pairs.
    fn check_list(&self, when: &str) -> Vec<(String, f64)> {
        let list = self.snap.list();
        let listed: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
        let taken: Vec<&str> = self.taken.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(listed, taken, "{when}: list --json names vs takes in order");
        let mut ids: Vec<f64> = list.iter().map(|s| s.id).collect();
        ids.sort_by(f64::total_cmp);
        ids.dedup();
        assert_eq!(ids.len(), list.len(), "{when}: list --json ids are not unique: {list:?}");
        list.into_iter().map(|s| (s.name, s.id)).collect()
    }

    /// The end of a sequence: kernel views, umount, remount, and a few more steps.
    fn finish(&mut self) {
        if self.taken.len() < 2 || self.rng.random_bool(0.5) {
            self.take();
        }
        let final_live = self.check_live("at the end");
        self.check_views("at the end");
        let ids = self.check_list("at the end");
        {
            let mut kernel = Vec::new();
            for (i, t) in self.taken.iter().enumerate() {
                let dir = self.snap.scratch().mkdir(&format!("kernel/{i}"));
                kernel.push(KernelMount::snapshot(&self.snap, &t.name, &dir));
            }
            for (t, k) in self.taken.iter().zip(&kernel) {
                let what = format!("kernel overlay view of {} (taken after step {})", t.name, t.after_step);
                assert_store_hidden(k.path(), &what);
                assert_same_tree(&t.tree, &record_tree(k.path()), &what);
                assert_same_meta(t, &record_meta(k.path()), &what);
            }
        }
        self.check_streams();
        self.snap.umount();
        assert_same_tree(&final_live, &record_tree(self.snap.live()), "LIVE after ovlsnap umount vs MNT before it");
        assert!(self.snap.live().join(".ovlsnap").is_dir(), "no default store LIVE/.ovlsnap after umount");
        self.check_store();
        self.snap.mount();
        check_hidden_names(self.snap.mnt());
        assert_eq!(self.check_list("after remount"), ids, "names and ids after remount");
        assert_same_tree(&final_live, &record_tree(self.snap.mnt()), "MNT after remount vs MNT before umount");
        self.check_views("after remount");
        // The store must still work after a remount: changes are saved for the newest snapshot,
        // and a new take starts a new layer.
        let tail = (self.cfg.ops / 10).max(10);
        for _ in 0..tail {
            self.step(false);
        }
        self.check_views("after steps following the remount");
        self.take();
        for _ in 0..tail {
            self.step(false);
        }
        self.check_live("at the very end");
        self.check_views("at the very end");
        self.check_list("at the very end");
        let (ok, tried) = (self.ops_ok, self.ops_tried);
        assert!(ok * 2 >= tried, "harness: only {ok} of {tried} operations succeeded; the generator is off");
        eprintln!("seed {}: {tried} operations ({ok} ok), {} takes", self.seed, self.taken.len());
    }
}

impl Model<'_> {
    /// `ovlsnap check` of the unmounted store: no errors, only what a healthy store may have
    /// (whiteouts that hide nothing since a removal, origins of copies whose LIVE file is gone),
    /// and `--repair` leaves warnings only. The remount that follows checks every view.
    fn check_store(&mut self) {
        let live = self.snap.live().to_path_buf();
        for repair in [false, true] {
            let mut args = vec![OsStr::new("check"), OsStr::new("--json"), live.as_os_str()];
            if repair {
                args.push(OsStr::new("--repair"));
            }
            let out = ovlsnap(&args);
            assert_eq!(out.status.code(), Some(0), "ovlsnap check (repair: {repair}) of a store the model made\n{out}");
            let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("check --json");
            for f in report["findings"].as_array().expect("findings") {
                let (sev, kind) = (f["severity"].as_str().unwrap_or(""), f["kind"].as_str().unwrap_or(""));
                let healthy = matches!((sev, kind), ("fixable", "orphan-whiteout") | ("warning", "origin-stale"));
                assert!(healthy && !(repair && sev == "fixable"), "check (repair: {repair}): {f}\n{out}");
            }
            self.note(format!(
                "ovlsnap check (repair: {repair}): {} findings",
                report["findings"].as_array().map_or(0, Vec::len)
            ));
        }
    }
}

/// Panics unless owners and mtimes `got` equal those recorded for `t` (directories included,
/// also after deletes merged newer snapshots into its layers).
fn assert_same_meta(t: &Taken, got: &std::collections::BTreeMap<PathBuf, Meta>, what: &str) {
    let diffs: Vec<String> = t
        .meta
        .iter()
        .filter(|(p, w)| got.get(*p) != Some(*w))
        .map(|(p, w)| format!("  /{}: want {w:?}, got {:?}", p.display(), got.get(p)))
        .take(10)
        .collect();
    assert!(
        diffs.is_empty() && t.meta.len() == got.len(),
        "{what}: owner, group, mtime (uid, gid, (s, ns))\n{}",
        diffs.join("\n")
    );
}

impl Drop for Model<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.snap.scratch().path().display();
            eprintln!("seed {}: temp dir {dir} (OVLSNAP_TEST_KEEP=1 keeps it); the last actions:", self.seed);
            for line in &self.history {
                eprintln!("  {line}");
            }
        }
    }
}
