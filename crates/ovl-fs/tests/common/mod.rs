//! Shared helpers for the ovl-fs integration tests (they run as root on Linux).
//!
//! - [`MountGuard`] mounts the kernel overlay or an `ovlfs` daemon over a [`Layers`] set, waits for
//!   the mount to show in `/proc/self/mountinfo`, and unmounts on drop, also while a test panics.
//! - [`generate_layers`] builds random lower layers (and optionally an upper) from a seed;
//!   [`apply_fixture`] builds layers from a small text format instead.
//! - [`Layers::copy_to`] clones a layer set with `cp -a` (owners, times, xattrs, whiteouts, links).
//! - [`snapshot_tree`] records a mounted view and [`snapshot_upper`] an upper dir as stored on disk;
//!   [`assert_same_tree`] and [`assert_same_upper`] print the first differences on mismatch.
//!
//! An ovlfs daemon still mounted after `OVL_DIFF_HANG_SECS` (120) is presumed hung and killed,
//! so a deadlock fails the test (blocked calls get ENOTCONN) instead of stalling the run.
//!
//! Times: every object the fixtures make gets an mtime before [`OLD_TIME_CUTOFF`], and tests set
//! explicit times before it too; an mtime at or after the cutoff means "set by the clock". The
//! comparisons check mtimes only when one side is old, so copy-up must keep times but two clocks
//! never have to agree.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

/// Options that make the kernel overlay behave like the overlay ovlfs implements.
pub const KERNEL_OPTS: &str = "redirect_dir=off,index=off,metacopy=off,xino=off";

/// Mtimes before this instant (2021-01-01) were set on purpose and must survive copy-up.
pub const OLD_TIME_CUTOFF: i64 = 1_609_459_200;

/// How long a mount may take to appear.
const MOUNT_DEADLINE: Duration = Duration::from_secs(10);

/// How long an ovlfs daemon may take to exit after its unmount before it is killed.
const EXIT_DEADLINE: Duration = Duration::from_secs(5);

/// How long an ovlfs mount may live before the daemon is presumed hung and killed (which fails
/// the blocked syscalls with ENOTCONN instead of hanging the test run); `OVL_DIFF_HANG_SECS`.
fn hang_limit() -> Duration {
    let secs = std::env::var("OVL_DIFF_HANG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    Duration::from_secs(secs)
}

/// Which implementation serves a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `mount -t overlay`: the oracle.
    Kernel,
    /// The `ovlfs` FUSE daemon, started with `-f` as a child process.
    Ovlfs,
}

impl Backend {
    /// The system under test: `OVL_DIFF_SUT=kernel` self-checks the harness, anything else is ovlfs.
    pub fn sut_from_env() -> Backend {
        match std::env::var("OVL_DIFF_SUT").as_deref() {
            Ok("kernel") => Backend::Kernel,
            Ok("ovlfs") | Err(_) => Backend::Ovlfs,
            Ok(other) => panic!("OVL_DIFF_SUT={other:?}: expected `kernel` or `ovlfs`"),
        }
    }

    /// Extra mount options for this backend: the kernel always gets [`KERNEL_OPTS`]; ovlfs gets
    /// `OVL_DIFF_SUT_OPTS` when set (may be empty), else the same options as the kernel.
    pub fn extra_options(self) -> String {
        match self {
            Backend::Kernel => KERNEL_OPTS.to_owned(),
            Backend::Ovlfs => std::env::var("OVL_DIFF_SUT_OPTS").unwrap_or(KERNEL_OPTS.to_owned()),
        }
    }
}

/// The path of the ovlfs binary: `OVL_DIFF_OVLFS` if set, else the one Cargo built for this crate.
pub fn ovlfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OVL_DIFF_OVLFS") {
        return PathBuf::from(p);
    }
    match option_env!("CARGO_BIN_EXE_ovlfs") {
        Some(p) => PathBuf::from(p),
        None => panic!("no ovlfs binary in this crate: set OVL_DIFF_OVLFS or OVL_DIFF_SUT=kernel"),
    }
}

/// The directories of one overlay, each created under a common root.
#[derive(Clone, Debug)]
pub struct Layers {
    /// Directory holding the layers (`l1..lN`, `upper`, `work`).
    pub root: PathBuf,
    /// Lower layers in kernel order: the first is the top lower layer.
    pub lowers: Vec<PathBuf>,
    /// The upper layer.
    pub upper: PathBuf,
    /// The work dir, on the same filesystem as the upper layer.
    pub work: PathBuf,
}

impl Layers {
    /// Creates `root/l1..lN`, `root/upper` and `root/work`, all empty.
    pub fn create(root: &Path, n_lowers: usize) -> Layers {
        let layers = Layers::at(root, n_lowers);
        for dir in layers.lowers.iter().chain([&layers.upper, &layers.work]) {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        layers
    }

    /// The layer set of `n_lowers` lowers that [`Layers::create`] made under `root`.
    pub fn at(root: &Path, n_lowers: usize) -> Layers {
        Layers {
            root: root.to_owned(),
            lowers: (1..=n_lowers).map(|i| root.join(format!("l{i}"))).collect(),
            upper: root.join("upper"),
            work: root.join("work"),
        }
    }

    /// Copies the whole set to `dst` (which must not exist) with `cp -a`, which keeps modes, owners,
    /// times, hard links and all xattrs including `trusted.*`, and copies whiteouts as devices.
    pub fn copy_to(&self, dst: &Path) -> Layers {
        run(Command::new("cp").arg("-a").arg(&self.root).arg(dst));
        Layers::at(dst, self.lowers.len())
    }

    /// The same layers with a new, empty work dir at `work` (for a remount by another backend).
    pub fn with_fresh_work(&self, work: PathBuf) -> Layers {
        fs::create_dir_all(&work).expect("mkdir fresh work dir");
        Layers { work, ..self.clone() }
    }

    /// `lowerdir=..,upperdir=..,workdir=..` followed by `extra` (if not empty).
    pub fn mount_options(&self, extra: &str) -> String {
        let all = self.lowers.iter().chain([&self.upper, &self.work]);
        for p in all {
            let s = p.to_str().expect("layer paths are UTF-8");
            assert!(!s.contains([',', ':', '\\']), "layer path needs escaping: {s}");
        }
        let lowers: Vec<&str> = self.lowers.iter().map(|p| p.to_str().unwrap()).collect();
        let mut opts =
            format!("lowerdir={},upperdir={},workdir={}", lowers.join(":"), self.upper.display(), self.work.display());
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        opts
    }
}

/// Runs a helper command and panics with its stderr if it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A mounted overlay; dropping it unmounts and reaps the daemon.
///
/// Declare it after the `TempDir` holding its layers, so it drops (unmounts) first.
pub struct MountGuard {
    mnt: PathBuf,
    backend: Backend,
    child: Option<Child>,
    log: Option<PathBuf>,
    fstype: String,
    mounted: bool,
    /// Dropping it stops the hang watchdog of an ovlfs daemon.
    watchdog: Option<std::sync::mpsc::Sender<()>>,
}

impl MountGuard {
    /// Mounts `layers` at `mnt` (an existing empty dir) with `backend` and extra options `extra`,
    /// then waits until the mount shows in `/proc/self/mountinfo`. Panics on failure with the
    /// reason (and the daemon's output for ovlfs).
    pub fn mount(backend: Backend, layers: &Layers, extra: &str, mnt: &Path) -> MountGuard {
        let mnt = fs::canonicalize(mnt).expect("mount point exists");
        let opts = layers.mount_options(extra);
        let mut guard =
            MountGuard { mnt, backend, child: None, log: None, fstype: String::new(), mounted: false, watchdog: None };
        match backend {
            Backend::Kernel => {
                let data = std::ffi::CString::new(opts.clone()).unwrap();
                rustix::mount::mount("overlay", &guard.mnt, "overlay", MountFlags::empty(), &*data)
                    .unwrap_or_else(|e| panic!("mount -t overlay -o {opts} {:?}: {e}", guard.mnt));
            }
            Backend::Ovlfs => {
                let log = guard.mnt.with_extension("ovlfs.log");
                let out = File::create(&log).expect("create daemon log");
                let child = Command::new(ovlfs_bin())
                    .arg("-f")
                    .arg("-o")
                    .arg(&opts)
                    .arg(&guard.mnt)
                    .stdin(Stdio::null())
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {:?}: {e}", ovlfs_bin()));
                guard.watchdog = Some(watchdog(&child, &guard.mnt));
                guard.child = Some(child);
                guard.log = Some(log);
            }
        }
        guard.wait_mounted(&opts);
        guard
    }

    /// Polls mountinfo until the mount appears; panics if the daemon exits or the deadline passes.
    fn wait_mounted(&mut self, opts: &str) {
        let start = Instant::now();
        loop {
            if let Some(fstype) = mount_fstype(&self.mnt) {
                self.fstype = fstype;
                self.mounted = true;
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!("ovlfs exited ({status}) before mounting -o {opts}\n{}", self.log_tail());
                }
            }
            if start.elapsed() > MOUNT_DEADLINE {
                if let Some(child) = self.child.as_mut() {
                    let _ = child.kill();
                }
                panic!("{:?} not mounted after {MOUNT_DEADLINE:?} (-o {opts})\n{}", self.mnt, self.log_tail());
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The backend serving this mount.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The filesystem type mountinfo reports (`overlay` or `fuse.ovlfs`).
    pub fn fstype(&self) -> &str {
        &self.fstype
    }

    /// The last 40 lines the daemon wrote (empty for a kernel mount).
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- ovlfs output ({}) ---\n{tail}", log.display())
    }

    /// Unmounts now and reports whether the daemon exited cleanly (status 0 within 5 s).
    pub fn unmount(mut self) -> Result<(), String> {
        self.teardown()
    }

    /// Unmounts (retrying on EBUSY, then detaching) and reaps the daemon.
    fn teardown(&mut self) -> Result<(), String> {
        self.watchdog = None;
        let mut problems = Vec::new();
        // A mount that appeared after a failed wait is ours too: the mount point is our temp dir.
        if self.mounted || mount_fstype(&self.mnt).is_some() {
            self.mounted = false;
            let mut tries = 0;
            loop {
                match rustix::mount::unmount(&self.mnt, UnmountFlags::empty()) {
                    Ok(()) => break,
                    Err(Errno::BUSY) if tries < 40 => {
                        tries += 1;
                        sleep(Duration::from_millis(25));
                    }
                    Err(Errno::BUSY) => {
                        problems.push(format!("{:?} busy for 1 s; detached", self.mnt));
                        let _ = rustix::mount::unmount(&self.mnt, UnmountFlags::DETACH);
                        break;
                    }
                    Err(e) => {
                        problems.push(format!("umount {:?}: {e}", self.mnt));
                        break;
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let start = Instant::now();
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if start.elapsed() < EXIT_DEADLINE => sleep(Duration::from_millis(10)),
                    _ => break None,
                }
            };
            match status {
                Some(s) if s.success() => {}
                Some(s) => problems.push(format!("ovlfs exited with {s}")),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    problems.push(format!("ovlfs still running {EXIT_DEADLINE:?} after umount; killed"));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(format!("{}\n{}", problems.join("\n"), self.log_tail())) }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("MountGuard({}): {e}", self.mnt.display());
        }
    }
}

/// Starts a thread that kills the daemon `child` if the mount at `mnt` lives longer than
/// [`hang_limit`]; dropping the returned sender stops it.
fn watchdog(child: &Child, mnt: &Path) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let pid = rustix::process::Pid::from_child(child);
    let mnt = mnt.to_owned();
    let limit = hang_limit();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("ovlfs at {} still mounted after {limit:?}: presumed hung, killing it", mnt.display());
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    });
    tx
}

/// The filesystem type of the top mount at `mnt` per `/proc/self/mountinfo`, if one is there.
pub fn mount_fstype(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = mnt.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let Some(point) = pre.split(' ').nth(4) else { continue };
        if unescape_mountinfo(point) == want {
            found = post.split(' ').next().map(str::to_owned);
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], digits) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Layer building blocks
// ---------------------------------------------------------------------------------------------

/// Makes a whiteout (character device 0:0) at `path`.
pub fn make_whiteout(path: &Path) {
    rustix::fs::mknodat(CWD, path, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
        .unwrap_or_else(|e| panic!("mknod whiteout {}: {e}", path.display()));
}

/// Sets `trusted.overlay.opaque` on a directory to `value` (`y` hides everything below).
pub fn set_opaque(path: &Path, value: &[u8]) {
    rustix::fs::lsetxattr(path, "trusted.overlay.opaque", value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("set opaque on {}: {e}", path.display()));
}

/// Sets owner (without following symlinks) and, except for symlinks, permission bits.
fn set_owner_mode(path: &Path, uid: u32, gid: u32, perm: Option<u32>) {
    let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
    rustix::fs::chownat(CWD, path, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).expect("lchown");
    if let Some(perm) = perm {
        // After chown: chown clears set-id bits.
        rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(perm), AtFlags::empty()).expect("chmod");
    }
}

/// Sets atime and mtime of `path` (not following symlinks).
pub fn set_times(path: &Path, sec: i64, nsec: i64) {
    let t = Timespec { tv_sec: sec, tv_nsec: nsec };
    let times = Timestamps { last_access: t, last_modification: t };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

/// Gives every object under `root` (children before parents) an old mtime drawn from `rng`.
pub fn set_old_times(root: &Path, rng: &mut StdRng) {
    let mut paths: Vec<PathBuf> = list_tree(root).into_iter().map(|(p, _)| root.join(p)).collect();
    paths.sort();
    for p in paths.iter().rev() {
        set_times(p, rng.random_range(1_400_000_000..1_600_000_000), rng.random_range(0..1_000_000_000));
    }
}

/// Builds layers from a text fixture, one object per line (`#` starts a comment):
///
/// ```text
/// LAYER KIND PATH [ARG...]      LAYER = l1..lN (l1 is the top lower) or u (upper)
///   dir PATH | opaque PATH      directory (opaque: with trusted.overlay.opaque=y)
///   file PATH [TEXT...]         regular file holding TEXT plus a newline ("" if no TEXT)
///   link PATH TARGET | hard PATH EXISTING | fifo PATH | wh PATH (whiteout)
///   xattr PATH NAME VALUE | mode PATH OCTAL | owner PATH UID GID
/// ```
///
/// Missing parents are made as plain 0755 dirs. Finally every object gets a fixed old mtime.
pub fn apply_fixture(layers: &Layers, text: &str) {
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        assert!(words.len() >= 3, "fixture line {}: `{line}`: want LAYER KIND PATH", n + 1);
        let root = match words[0] {
            "u" => &layers.upper,
            l => {
                let i: usize = l.strip_prefix('l').and_then(|i| i.parse().ok()).unwrap_or(0);
                assert!((1..=layers.lowers.len()).contains(&i), "fixture line {}: layer {l}", n + 1);
                &layers.lowers[i - 1]
            }
        };
        let path = root.join(words[2]);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let arg = |i: usize| *words.get(i).unwrap_or_else(|| panic!("fixture line {}: missing arg", n + 1));
        match words[1] {
            "dir" => fs::create_dir_all(&path).unwrap(),
            "opaque" => {
                fs::create_dir_all(&path).unwrap();
                set_opaque(&path, b"y");
            }
            "file" => {
                let text = if words.len() > 3 { format!("{}\n", words[3..].join(" ")) } else { String::new() };
                fs::write(&path, text).unwrap();
            }
            "link" => symlink(arg(3), &path).unwrap(),
            "hard" => fs::hard_link(root.join(arg(3)), &path).unwrap(),
            "fifo" => rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap(),
            "wh" => make_whiteout(&path),
            "xattr" => rustix::fs::lsetxattr(&path, arg(3), arg(4).as_bytes(), XattrFlags::empty()).unwrap(),
            "mode" => {
                let mode = u32::from_str_radix(arg(3), 8).expect("octal mode");
                rustix::fs::chmodat(CWD, &path, Mode::from_raw_mode(mode), AtFlags::empty()).unwrap();
            }
            "owner" => {
                let m = fs::symlink_metadata(&path).unwrap();
                let perm = (!m.file_type().is_symlink()).then_some(m.mode() & 0o7777);
                set_owner_mode(&path, arg(3).parse().unwrap(), arg(4).parse().unwrap(), perm);
            }
            kind => panic!("fixture line {}: unknown kind {kind}", n + 1),
        }
    }
    let mut rng = StdRng::seed_from_u64(0);
    for dir in layers.lowers.iter().chain([&layers.upper]) {
        set_old_times(dir, &mut rng);
    }
}

// ---------------------------------------------------------------------------------------------
// Random layers
// ---------------------------------------------------------------------------------------------

/// Names the generator draws from: a small pool makes the same names meet in several layers.
pub const NAME_POOL: &[&str] = &["a", "b", "c", "d", "e", "f", "dir1", "dir2", "file1", "file2", "x"];

/// Symlink targets: relative without `..` or under a nonexistent absolute root, so that following
/// a link can never leave the mount.
pub const LINK_TARGETS: &[&str] =
    &["a", "b", "file1", "dir1", "dir1/file1", "x/y/z", "missing", "/nonexistent-ovl-test/t"];

/// What the generator put at one path of one layer.
enum Made {
    Whiteout,
    Dir { opaque: bool },
    NonDir,
}

/// State of a layer generation: the merged view of the layers below, and what this layer holds.
struct LayerGen<'a> {
    rng: &'a mut StdRng,
    /// Visible merged tree of the layers below: path -> is a directory.
    below: &'a mut BTreeMap<PathBuf, bool>,
    /// This layer's objects in creation (pre-)order.
    made: Vec<(PathBuf, Made)>,
    /// Regular files of this layer, targets for hard links.
    files: Vec<PathBuf>,
    /// Whether this is the bottom layer (whiteouts and opaque dirs mean nothing there).
    bottom: bool,
    /// Layer tag written into file contents.
    tag: String,
}

/// Generates `n_lowers` random lower layers (and, if `with_upper`, a pre-populated upper) under
/// `root`, reproducibly from `seed`.
///
/// Layers are built bottom-up against a model of the merged tree below, so upper layers place
/// whiteouts over names visible below (never inside opaque dirs), put dirs over files, files
/// over dirs, merge dirs, and mark some dirs opaque. Objects get varied sizes (0 B to 200 KiB),
/// modes (with set-id and sticky bits), owners, `user.*` xattrs, symlinks, fifos, hard links and
/// the odd character device; finally every object gets an old mtime.
pub fn generate_layers(root: &Path, seed: u64, n_lowers: usize, with_upper: bool) -> Layers {
    let layers = Layers::create(root, n_lowers);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut below = BTreeMap::new();
    let mut order: Vec<(PathBuf, String)> =
        layers.lowers.iter().enumerate().rev().map(|(i, p)| (p.clone(), format!("l{}", i + 1))).collect();
    if with_upper {
        order.push((layers.upper.clone(), "u".to_owned()));
    }
    for (i, (dir, tag)) in order.into_iter().enumerate() {
        let mut g =
            LayerGen { rng: &mut rng, below: &mut below, made: Vec::new(), files: Vec::new(), bottom: i == 0, tag };
        g.dir(&dir, Path::new(""), 0, true);
        g.merge_into_below();
        set_old_times(&dir, &mut rng);
    }
    layers
}

impl LayerGen<'_> {
    /// Fills directory `rel` of the layer at `root`; `merged` says whether lower entries show through.
    fn dir(&mut self, root: &Path, rel: &Path, depth: usize, merged: bool) {
        let mut names: Vec<OsString> = NAME_POOL.iter().map(OsString::from).collect();
        if merged {
            for p in self.below.keys().filter(|p| p.parent() == Some(rel)) {
                names.push(p.file_name().unwrap().to_owned());
            }
        }
        names.sort();
        names.dedup();
        for name in names {
            let rel = rel.join(&name);
            let below = if merged { self.below.get(&rel).copied() } else { None };
            let p = if below.is_some() || depth == 0 { 0.45 } else { 0.3 };
            if self.rng.random_bool(p) {
                self.object(root, &rel, depth, below);
            }
        }
    }

    /// Makes one object at `rel`; `below` is `Some(is_dir)` when the lower layers show something there.
    fn object(&mut self, root: &Path, rel: &Path, depth: usize, below: Option<bool>) {
        let path = root.join(rel);
        if below.is_some() && !self.bottom && self.rng.random_bool(0.25) {
            make_whiteout(&path);
            self.made.push((rel.to_owned(), Made::Whiteout));
            return;
        }
        let roll = self.rng.random_range(0..100);
        let (uid, gid) = if self.rng.random_bool(0.7) {
            (0, 0)
        } else {
            *[(1000, 1000), (1001, 100), (65534, 65534), (0, 1000)].choose(self.rng).unwrap()
        };
        if roll < 35 && depth < 3 {
            let opaque =
                !self.bottom && (below == Some(true) && self.rng.random_bool(0.3) || self.rng.random_bool(0.03));
            fs::create_dir(&path).unwrap();
            if opaque {
                set_opaque(&path, b"y");
            }
            let perm = *[0o755, 0o755, 0o700, 0o775, 0o1777, 0o2755, 0o555].choose(self.rng).unwrap();
            set_owner_mode(&path, uid, gid, Some(perm));
            self.xattrs(&path);
            self.made.push((rel.to_owned(), Made::Dir { opaque }));
            self.dir(root, rel, depth + 1, below == Some(true) && !opaque);
            return;
        }
        if (86..92).contains(&roll) && !self.files.is_empty() {
            let target = self.files.choose(self.rng).unwrap().clone();
            fs::hard_link(root.join(target), &path).unwrap();
        } else if (75..86).contains(&roll) {
            let target = *LINK_TARGETS.choose(self.rng).unwrap();
            symlink(target, &path).unwrap();
            set_owner_mode(&path, uid, gid, None);
        } else if (92..98).contains(&roll) {
            rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
            set_owner_mode(&path, uid, gid, Some(*[0o644, 0o600, 0o666].choose(self.rng).unwrap()));
        } else if roll >= 98 {
            let dev = rustix::fs::makedev(1, 3);
            rustix::fs::mknodat(CWD, &path, FileType::CharacterDevice, Mode::from_raw_mode(0o666), dev).unwrap();
        } else {
            let data = random_content(self.rng, &format!("{} {}", self.tag, rel.display()));
            fs::write(&path, data).unwrap();
            let perm = *[0o644, 0o644, 0o600, 0o755, 0o444, 0o640, 0o4755, 0o2755, 0o664].choose(self.rng).unwrap();
            set_owner_mode(&path, uid, gid, Some(perm));
            self.xattrs(&path);
            self.files.push(rel.to_owned());
        }
        self.made.push((rel.to_owned(), Made::NonDir));
    }

    /// Gives a quarter of the files and dirs one to three `user.*` xattrs.
    fn xattrs(&mut self, path: &Path) {
        if !self.rng.random_bool(0.25) {
            return;
        }
        for _ in 0..self.rng.random_range(1..=3) {
            let name = *["user.a", "user.b", "user.color", "user.long.name"].choose(self.rng).unwrap();
            let len = self.rng.random_range(0..48);
            let value: Vec<u8> = (0..len).map(|_| self.rng.random_range(b'a'..=b'z')).collect();
            rustix::fs::lsetxattr(path, name, &value, XattrFlags::empty()).unwrap();
        }
    }

    /// Folds this layer into the model of what the next layer up sees below it.
    fn merge_into_below(&mut self) {
        for (rel, made) in std::mem::take(&mut self.made) {
            let replaces = match made {
                Made::Whiteout | Made::NonDir => true,
                Made::Dir { opaque } => opaque || self.below.get(&rel) == Some(&false),
            };
            if replaces {
                let doomed: Vec<PathBuf> = self
                    .below
                    .range(rel.clone()..)
                    .map(|(p, _)| p)
                    .take_while(|p| p.starts_with(&rel))
                    .cloned()
                    .collect();
                for p in doomed {
                    self.below.remove(&p);
                }
            }
            match made {
                Made::Whiteout => {}
                Made::Dir { .. } => {
                    self.below.insert(rel, true);
                }
                Made::NonDir => {
                    self.below.insert(rel, false);
                }
            }
        }
    }
}

/// File content with a size spread from 0 B to ~200 KiB: text naming its origin, or random bytes.
pub fn random_content(rng: &mut StdRng, tag: &str) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 if rng.random_bool(0.3) => 0,
        0..=2 => rng.random_range(0..100),
        3..=6 => rng.random_range(100..4096),
        7..=8 => rng.random_range(4096..65536),
        _ => rng.random_range(65536..200 * 1024),
    };
    if rng.random_bool(0.5) {
        let line = format!("{tag}\n");
        line.bytes().cycle().take(len).collect()
    } else {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        data
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// The type of a filesystem object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device (a whiteout when 0:0 in a layer).
    Char,
    /// Block device.
    Block,
    /// Unix socket.
    Socket,
}

impl Kind {
    /// The kind of a `std` file type.
    pub fn of(t: fs::FileType) -> Kind {
        if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_char_device() {
            Kind::Char
        } else if t.is_block_device() {
            Kind::Block
        } else {
            Kind::Socket
        }
    }
}

/// Every path under `root` (relative, `root` itself excluded) with its kind from `d_type`, without
/// following symlinks or reading contents; sorted so that parents come before their children.
pub fn list_tree(root: &Path) -> Vec<(PathBuf, Kind)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Kind)>) {
        let dir = root.join(rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        for ent in rd {
            let ent = ent.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            let kind = Kind::of(ent.file_type().expect("d_type"));
            let rel = rel.join(ent.file_name());
            out.push((rel.clone(), kind));
            if kind == Kind::Dir {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out.sort();
    out
}

/// One object of a mounted view, as [`snapshot_tree`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Object type.
    pub kind: Kind,
    /// Permission bits including set-id and sticky (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size; 0 for directories (their size is a property of the backing fs).
    pub size: u64,
    /// FNV-1a hash of a regular file's content.
    pub hash: Option<u64>,
    /// A symlink's target.
    pub target: Option<OsString>,
    /// Major and minor of a device.
    pub rdev: Option<(u32, u32)>,
    /// `user.*` and `trusted.*` xattrs with values, sorted by name.
    pub xattrs: Vec<(OsString, Bytes)>,
    /// Link count of a non-directory.
    pub nlink: Option<u64>,
    /// Modification time (seconds, nanoseconds); compared only when old (see module docs).
    pub mtime: (i64, i64),
}

impl Entry {
    /// Records the object at `path` (not following a final symlink).
    pub fn of(path: &Path) -> std::io::Result<Entry> {
        let m = fs::symlink_metadata(path)?;
        let kind = Kind::of(m.file_type());
        let dev = matches!(kind, Kind::Char | Kind::Block);
        Ok(Entry {
            kind,
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if kind == Kind::Dir { 0 } else { m.size() },
            hash: if kind == Kind::File { Some(hash_file(path)?) } else { None },
            target: if kind == Kind::Symlink { Some(fs::read_link(path)?.into_os_string()) } else { None },
            rdev: dev.then(|| (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()))),
            xattrs: xattrs(path, |n| n.starts_with(b"user.") || n.starts_with(b"trusted."))?,
            nlink: (kind != Kind::Dir).then_some(m.nlink()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    /// Field-by-field differences to `other`; mtimes count only if either is old.
    pub fn diff(&self, other: &Entry) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out.push(format!("{}: {:?} != {:?}", stringify!($f), self.$f, other.$f));
                }
            )*};
        }
        field!(kind, uid, gid, size, hash, target, rdev, xattrs, nlink);
        if self.perm != other.perm {
            out.push(format!("perm: {:o} != {:o}", self.perm, other.perm));
        }
        let old = self.mtime.0 < OLD_TIME_CUTOFF || other.mtime.0 < OLD_TIME_CUTOFF;
        if old && self.mtime != other.mtime {
            out.push(format!("mtime: {:?} != {:?}", self.mtime, other.mtime));
        }
        out
    }
}

/// A mounted view: relative path (`""` is the root) to entry.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Walks a mounted view with `lstat` (never following symlinks) and records every object.
pub fn snapshot_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let rec =
        |p: &Path| Entry::of(&root.join(p)).unwrap_or_else(|e| panic!("snapshot {}: {e}", root.join(p).display()));
    tree.insert(PathBuf::new(), rec(Path::new("")));
    for (p, _) in list_tree(root) {
        let e = rec(&p);
        tree.insert(p, e);
    }
    tree
}

/// FNV-1a (64 bit) of a regular file's content; opens with `O_NOFOLLOW | O_NONBLOCK`.
pub fn hash_file(path: &Path) -> std::io::Result<u64> {
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let mut h = Fnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.0);
        }
        h.write(&buf[..n]);
    }
}

/// FNV-1a, 64 bit: a stable content hash that needs no dependency.
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Mixes `bytes` into the hash.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The xattrs of `path` (not following symlinks) whose names pass `keep`, sorted by name.
pub fn xattrs(path: &Path, keep: impl Fn(&[u8]) -> bool) -> std::io::Result<Vec<(OsString, Bytes)>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty() && keep(n)) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        value.truncate(len);
        out.push((name.to_owned(), Bytes(value)));
    }
    out.sort();
    Ok(out)
}

/// An xattr value; `Debug` shows it as an escaped byte string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub Vec<u8>);

impl Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let escaped: String = self.0.iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
        write!(f, "b\"{escaped}\"")
    }
}

/// One object of an upper layer as stored on disk, as [`snapshot_upper`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpperEntry {
    /// Object type.
    pub kind: Kind,
    /// Whether it is a whiteout (character device 0:0).
    pub whiteout: bool,
    /// Value of `trusted.overlay.opaque` (or `user.overlay.opaque` of a `userxattr` layer), if set.
    pub opaque: Option<Vec<u8>>,
    /// Permission bits including set-id and sticky.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a non-directory.
    pub size: u64,
    /// FNV-1a hash of a regular file's content.
    pub hash: Option<u64>,
    /// A symlink's target.
    pub target: Option<OsString>,
    /// Major and minor of a device other than a whiteout.
    pub rdev: Option<(u32, u32)>,
    /// `user.*` and `trusted.*` xattrs, sorted by name; overlay's own `trusted.overlay.*` and
    /// `user.overlay.*` are left out, escaped `*.overlay.overlay.*` (user data) kept.
    pub xattrs: Vec<(OsString, Bytes)>,
}

impl UpperEntry {
    /// Records the raw object at `path`.
    pub fn of(path: &Path) -> std::io::Result<UpperEntry> {
        let e = Entry::of(path)?;
        let whiteout = e.kind == Kind::Char && e.rdev == Some((0, 0));
        let is_opaque = |n: &[u8]| n == b"trusted.overlay.opaque" || n == b"user.overlay.opaque";
        let opaque = xattrs(path, is_opaque)?.pop().map(|(_, v)| v.0);
        // Overlay's own xattrs (also the `user.overlay.` ones of `userxattr` layers) are not
        // compared, but escaped ones (`*.overlay.overlay.*`: what a user's `trusted.overlay.*`
        // becomes in a layer) are user data.
        let own = |n: &[u8]| {
            [&b"trusted.overlay."[..], b"user.overlay."]
                .iter()
                .any(|p| n.starts_with(p) && !n[p.len()..].starts_with(b"overlay."))
        };
        let xattrs = e.xattrs.into_iter().filter(|(n, _)| !own(n.as_bytes())).collect();
        Ok(UpperEntry {
            kind: e.kind,
            whiteout,
            opaque,
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            hash: e.hash,
            target: e.target,
            rdev: if whiteout { None } else { e.rdev },
            xattrs,
        })
    }

    /// Field-by-field differences to `other`.
    pub fn diff(&self, other: &UpperEntry) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out.push(format!("{}: {:?} != {:?}", stringify!($f), self.$f, other.$f));
                }
            )*};
        }
        field!(kind, whiteout, size, hash, target, rdev, xattrs);
        // A whiteout's owner carries no meaning, and the kernel's depends on how it made it
        // (shared in the work dir, or by RENAME_WHITEOUT inheriting a directory's group).
        if !(self.whiteout && other.whiteout) {
            field!(uid, gid);
        }
        if self.opaque != other.opaque {
            let show = |o: &Option<Vec<u8>>| o.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
            out.push(format!("opaque: {:?} != {:?}", show(&self.opaque), show(&other.opaque)));
        }
        if self.perm != other.perm {
            out.push(format!("perm: {:o} != {:o}", self.perm, other.perm));
        }
        out
    }
}

/// An upper layer: relative path (`""` is the root) to entry.
pub type UpperState = BTreeMap<PathBuf, UpperEntry>;

/// Walks an upper dir directly (not through a mount) and records every object.
pub fn snapshot_upper(upper: &Path) -> UpperState {
    let rec = |p: &Path| {
        UpperEntry::of(&upper.join(p)).unwrap_or_else(|e| panic!("snapshot {}: {e}", upper.join(p).display()))
    };
    let mut state = UpperState::new();
    state.insert(PathBuf::new(), rec(Path::new("")));
    for (p, _) in list_tree(upper) {
        let e = rec(&p);
        state.insert(p, e);
    }
    state
}

/// Differences between two path maps, one line each; `diff` compares two entries.
pub fn diff_maps<T: Debug>(
    a: &BTreeMap<PathBuf, T>,
    b: &BTreeMap<PathBuf, T>,
    diff: impl Fn(&T, &T) -> Vec<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let show = |p: &Path| format!("/{}", p.display());
    for (p, ea) in a {
        match b.get(p) {
            None => out.push(format!("only in A: {} {ea:?}", show(p))),
            Some(eb) => out.extend(diff(ea, eb).into_iter().map(|d| format!("differs: {} {d}", show(p)))),
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            out.push(format!("only in B: {} {eb:?}", show(p)));
        }
    }
    out
}

/// Differences between two views (see [`Entry::diff`]).
pub fn diff_trees(a: &Tree, b: &Tree) -> Vec<String> {
    diff_maps(a, b, Entry::diff)
}

/// Differences between two upper layers (see [`UpperEntry::diff`]).
pub fn diff_upper(a: &UpperState, b: &UpperState) -> Vec<String> {
    diff_maps(a, b, UpperEntry::diff)
}

/// Formats the first 30 differences under a heading, or `None` if there are none.
pub fn report(what: &str, a: &str, b: &str, diffs: &[String]) -> Option<String> {
    if diffs.is_empty() {
        return None;
    }
    let mut s = format!("{what}: {} differences (A = {a}, B = {b})\n", diffs.len());
    for d in diffs.iter().take(30) {
        s.push_str("  ");
        s.push_str(d);
        s.push('\n');
    }
    if diffs.len() > 30 {
        s.push_str(&format!("  ... and {} more\n", diffs.len() - 30));
    }
    Some(s)
}

/// Panics with a readable diff unless the two views are the same.
pub fn assert_same_tree(what: &str, a_label: &str, a: &Tree, b_label: &str, b: &Tree) {
    if let Some(msg) = report(what, a_label, b_label, &diff_trees(a, b)) {
        panic!("{msg}");
    }
}

/// Panics with a readable diff unless the two upper layers encode the same state.
pub fn assert_same_upper(what: &str, a_label: &str, a: &UpperState, b_label: &str, b: &UpperState) {
    if let Some(msg) = report(what, a_label, b_label, &diff_upper(a, b)) {
        panic!("{msg}");
    }
}

/// A fresh temporary directory; kept after the test when `OVL_DIFF_KEEP` is set.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("create tempdir");
    if std::env::var_os("OVL_DIFF_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

/// Makes `dir/name` (a mount point) and returns it.
pub fn mount_point(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir(&p).expect("mkdir mount point");
    p
}

/// Writes `data` to a new file at `path` (test scenarios through a mount).
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
}
