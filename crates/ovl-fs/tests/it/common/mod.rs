//! Shared helpers for the ovl-fs integration tests (they run as root on Linux).
//!
//! - [`MountGuard`] mounts the kernel overlay or an `ovlfs` daemon over a [`Layers`] set, waits for
//!   the mount to show in `/proc/self/mountinfo`, and unmounts on drop, also while a test panics;
//!   [`MountGuard::kill_daemon`] does what a crash does instead (SIGKILL, then `umount -l`).
//! - [`generate_layers`] builds random lower layers (and optionally an upper) from a seed;
//!   [`apply_fixture`] builds layers from a small text format instead.
//! - [`Layers::copy_to`] clones a layer set with `cp -a` (owners, times, xattrs, whiteouts, links).
//! - [`gen_ops`] and [`apply`] are the differential test's random operations (`workload.rs`).
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

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
        Self::mount_env(backend, layers, extra, mnt, &[])
    }

    /// [`MountGuard::mount`] with extra environment variables for the ovlfs daemon.
    pub fn mount_env(backend: Backend, layers: &Layers, extra: &str, mnt: &Path, env: &[(&str, &str)]) -> MountGuard {
        let nofile = std::env::var("OVL_TEST_NOFILE").ok().and_then(|v| v.parse().ok());
        Self::mount_limited(backend, layers, extra, mnt, env, nofile)
    }

    /// [`MountGuard::mount_env`] with the ovlfs daemon's open-file limit (soft and hard) set to
    /// `nofile` (`prlimit`); `OVL_TEST_NOFILE` sets it for every mount of a run by hand.
    pub fn mount_limited(
        backend: Backend,
        layers: &Layers,
        extra: &str,
        mnt: &Path,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> MountGuard {
        let mnt = fs::canonicalize(mnt).expect("mount point exists");
        let opts = layers.mount_options(extra);
        let mut guard =
            MountGuard { mnt, child: None, log: None, fstype: String::new(), mounted: false, watchdog: None };
        match backend {
            Backend::Kernel => {
                let data = std::ffi::CString::new(opts.clone()).unwrap();
                rustix::mount::mount("overlay", &guard.mnt, "overlay", MountFlags::empty(), &*data)
                    .unwrap_or_else(|e| panic!("mount -t overlay -o {opts} {:?}: {e}", guard.mnt));
            }
            Backend::Ovlfs => {
                let log = guard.mnt.with_extension("ovlfs.log");
                let out = File::create(&log).expect("create daemon log");
                let mut cmd = match nofile {
                    Some(n) => {
                        let mut c = Command::new("prlimit");
                        c.arg(format!("--nofile={n}:{n}")).arg(ovlfs_bin());
                        c
                    }
                    None => Command::new(ovlfs_bin()),
                };
                let child = cmd
                    .arg("-f")
                    .arg("-o")
                    .arg(&opts)
                    .arg(&guard.mnt)
                    .envs(env.iter().copied())
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

    /// The pid of the ovlfs daemon (`None` for a kernel mount).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
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

    /// Everything the daemon wrote so far (empty for a kernel mount).
    pub fn log_text(&self) -> String {
        self.log.as_ref().map(|log| fs::read_to_string(log).unwrap_or_default()).unwrap_or_default()
    }

    /// What a crash leaves: kills the daemon with SIGKILL, waits until it is gone, then detaches
    /// the dead mount (`umount -l`). Fails if the daemon is still there after 5 s (then its FUSE
    /// connection `conn`, see [`fuse_connection`], is aborted so that nothing hangs).
    pub fn kill_daemon(mut self, conn: u64) -> Result<(), String> {
        self.watchdog = None;
        let mut result = Ok(());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > EXIT_DEADLINE {
                    let _ = fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
                    let _ = child.wait();
                    result = Err(format!("ovlfs still there {EXIT_DEADLINE:?} after SIGKILL\n{}", self.log_tail()));
                    break;
                }
                sleep(Duration::from_millis(2));
            }
        }
        if self.mounted {
            self.mounted = false;
            if let Err(e) = rustix::mount::unmount(&self.mnt, UnmountFlags::DETACH) {
                result = result.and(Err(format!("umount -l {}: {e}", self.mnt.display())));
            }
        }
        result
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

/// The FUSE connection of the mount at `mnt`: its name in `/sys/fs/fuse/connections`.
pub fn fuse_connection(mnt: &Path) -> u64 {
    let dev = rustix::fs::stat(mnt).expect("stat the mount").st_dev;
    (u64::from(rustix::fs::major(dev)) << 20) | u64::from(rustix::fs::minor(dev))
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

/// Every mount point at or below `dir` per `/proc/self/mountinfo`, deepest (and latest) first: the
/// order to detach them in. (For the podman test binary, which shares this module.)
#[allow(dead_code)]
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(OsString::from_vec(unescape_mountinfo(point))))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.reverse();
    found.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
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

/// A kernel overlay and an ovlfs mount (its daemon started with `env`) over identical copies
/// of one lower layer made by `build`, both reachable by an unprivileged user: for scripts run as
/// uid 1000 on each side. Fields drop in order: the mounts before their temp dir.
pub struct UserPair {
    pub kernel: MountGuard,
    pub ovlfs: MountGuard,
    _tmp: tempfile::TempDir,
}

impl UserPair {
    pub fn mount(name: &str, build: impl FnOnce(&Path), env: &[(&str, &str)]) -> UserPair {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        let tmp = tempdir(name);
        open(tmp.path());
        let base = Layers::create(&tmp.path().join("k"), 1);
        build(&base.lowers[0]);
        for d in [&base.root, &base.lowers[0], &base.upper] {
            open(d);
        }
        let ours = base.copy_to(&tmp.path().join("o"));
        let (km, om) = (mount_point(tmp.path(), "km"), mount_point(tmp.path(), "om"));
        open(&km);
        open(&om);
        let kernel = MountGuard::mount(Backend::Kernel, &base, KERNEL_OPTS, &km);
        let ovlfs = MountGuard::mount_env(Backend::Ovlfs, &ours, "", &om, env);
        UserPair { kernel, ovlfs, _tmp: tmp }
    }
}

/// Asserts that two scripts' outputs agree line by line, showing every differing pair.
pub fn assert_same_lines(what: &str, want: &str, got: &str) {
    let diffs: Vec<String> = want
        .lines()
        .zip(got.lines())
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("kernel: {w:<60} ovlfs: {g}"))
        .collect();
    assert!(diffs.is_empty(), "{what}, ovlfs differs from the kernel overlay:\n{}", diffs.join("\n"));
    assert_eq!(want.lines().count(), got.lines().count(), "{what}: kernel:\n{want}\novlfs:\n{got}");
}

mod layers;
mod loopfs;
mod snapshot;
mod workload;
pub use layers::*;
pub use loopfs::*;
pub use snapshot::*;
pub use workload::*;
