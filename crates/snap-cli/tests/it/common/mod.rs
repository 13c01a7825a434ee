//! Shared helpers for the ovlsnap integration tests (they run as root on Linux with `/dev/fuse`).
//!
//! - [`ovlsnap`] runs the CLI with a deadline and captures its output ([`CliOutput`]).
//! - [`Scratch`] is a temp dir that, when dropped, detaches every mount left under it and kills
//!   every process still using it, also while a test panics.
//! - [`SnapMount`] makes LIVE in a [`Scratch`], mounts it with `ovlsnap mount` (stacked over LIVE or
//!   at a separate MNT) and unmounts with `ovlsnap umount` on drop, falling back to the scratch sweep.
//! - [`KernelMount`] mounts a snapshot with the stock kernel overlay through `ovlsnap mount-cmd` or
//!   `ovlsnap mount-view` (or a tmpfs) and unmounts on drop; [`shell_words`] and
//!   [`overlay_options`] read a printed mount command back as a shell and the kernel would.
//! - [`record_tree`] records a tree and [`assert_same_tree`] compares two recordings (`tree.rs`);
//!   [`parse_list`] reads `ovlsnap list --json` (`json.rs`); [`SharedMap`] is a shared writable
//!   mapping (`sys/`, the only unsafe code).
//!
//! Environment (all optional):
//! - `OVLSNAP_BIN`: the binary to test instead of the one Cargo built
//! - `OVLSNAP_TEST_CMD_SECS` (60): deadline of one CLI command; it is killed after that
//! - `OVLSNAP_TEST_HANG_SECS` (300): a mount older than this is presumed hung and its daemon is
//!   killed, so blocked syscalls fail (ENOTCONN) instead of stalling the run
//! - `OVLSNAP_TEST_KEEP=1`: keep the temp dirs (after unmounting)

mod json;
pub mod registry;
mod shell;
mod sys;
mod tree;

pub use json::*;
pub use shell::*;
pub use sys::*;
pub use tree::*;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{Pid, Signal};

/// The start of every line `ovlsnap mount-cmd` prints; the options that follow (one shell word,
/// quoted) must include `ro` and a `lowerdir=`, and no `upperdir=` (the order of the options is
/// free); the last word is DIR.
pub const MOUNT_CMD_PREFIX: &str = "mount -t overlay overlay -o ";

/// How long a process that got the caller's pipes may keep them open after it exits.
const PIPE_GRACE: Duration = Duration::from_secs(10);

/// How long killed processes may take to disappear.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

fn env_secs(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")));
    Duration::from_secs(secs)
}

/// The binary under test: `OVLSNAP_BIN` if set, else the one Cargo built.
pub fn ovlsnap_bin() -> PathBuf {
    std::env::var_os("OVLSNAP_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ovlsnap")), PathBuf::from)
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// What a finished command did.
pub struct CliOutput {
    /// The command line, for messages.
    pub cmdline: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

impl CliOutput {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with the whole output unless it succeeded; returns stdout.
    pub fn expect_ok(&self, what: &str) -> &str {
        assert!(self.success(), "{what}: expected success\n{self}");
        &self.stdout
    }

    /// Panics unless it failed with a message on stderr; returns stderr.
    pub fn expect_failure(&self, what: &str) -> &str {
        assert!(!self.success(), "{what}: expected a non-zero exit\n{self}");
        assert!(!self.stderr.trim().is_empty(), "{what}: failed without saying why on stderr\n{self}");
        &self.stderr
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}\n{}", self.cmdline, self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Runs `program args` with stdin from /dev/null, killing it after `OVLSNAP_TEST_CMD_SECS`.
///
/// Errors (never panics, so [`Drop`] impls can use it) if it cannot start, runs past the deadline,
/// or leaves its stdout or stderr open for [`PIPE_GRACE`] after exiting: a daemon that keeps the
/// caller's pipes makes `$(ovlsnap mount ...)` and every log capture wait for the unmount.
pub fn run_with_deadline(program: &OsStr, args: &[OsString]) -> Result<CliOutput, String> {
    let mut cmdline = program.to_string_lossy().into_owned();
    for a in args {
        cmdline.push(' ');
        cmdline.push_str(&a.to_string_lossy());
    }
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmdline}: {e}"))?;
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let limit = env_secs("OVLSNAP_TEST_CMD_SECS", 60);
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => {
                sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let text = |rx: &Receiver<Vec<u8>>| {
                    rx.recv_timeout(Duration::from_secs(1)).map(|b| String::from_utf8_lossy(&b).into_owned())
                };
                let (o, e) = (text(&out).unwrap_or_default(), text(&err).unwrap_or_default());
                return Err(format!("$ {cmdline}\nstill running after {limit:?}: killed\n{o}{e}"));
            }
            Err(e) => return Err(format!("wait for {cmdline}: {e}")),
        }
    };
    let collect = |rx: &Receiver<Vec<u8>>, which: &str| {
        rx.recv_timeout(PIPE_GRACE).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|_| {
            format!(
                "$ {cmdline}\nexited ({status}) but its {which} stayed open for {PIPE_GRACE:?}: a process it \
                 started (the daemon?) holds the caller's pipe"
            )
        })
    };
    let stdout = collect(&out, "stdout")?;
    let stderr = collect(&err, "stderr")?;
    Ok(CliOutput { cmdline, status, stdout, stderr })
}

/// Reads `r` to its end on a thread; the receiver gets the bytes.
fn drain(mut r: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `ovlsnap args` (see [`run_with_deadline`]); panics if it cannot run or hangs.
pub fn ovlsnap<S: AsRef<OsStr>>(args: &[S]) -> CliOutput {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    run_with_deadline(ovlsnap_bin().as_os_str(), &args).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Mounts and processes
// ---------------------------------------------------------------------------------------------

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub struct MountLine {
    /// The mount point (unescaped).
    pub point: PathBuf,
    /// The filesystem type (`fuse.ovlsnap`, `overlay`, ...).
    pub fstype: String,
}

/// Every mount of this namespace, in mountinfo order (parents before children).
pub fn mounts() -> Vec<MountLine> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let (Some(point), Some(fstype)) = (pre.split(' ').nth(4), post.split(' ').next()) else { continue };
        out.push(MountLine {
            point: PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(point))),
            fstype: fstype.into(),
        });
    }
    out
}

/// The filesystem types mounted at exactly `path`, bottom first (the last one is what `path` shows).
pub fn mounts_at(path: &Path) -> Vec<String> {
    mounts().into_iter().filter(|m| m.point == path).map(|m| m.fstype).collect()
}

/// Whether the top mount at `path` is a FUSE mount.
pub fn is_fuse_mount(path: &Path) -> bool {
    mounts_at(path).last().is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
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

/// Unmounts `path`, retrying while busy for a second, then detaching; returns what went wrong.
fn unmount_or_detach(path: &Path) -> Option<String> {
    for _ in 0..40 {
        match rustix::mount::unmount(path, UnmountFlags::empty()) {
            Ok(()) => return None,
            Err(Errno::BUSY) => sleep(Duration::from_millis(25)),
            Err(e) => return Some(format!("umount {}: {e}", path.display())),
        }
    }
    let _ = rustix::mount::unmount(path, UnmountFlags::DETACH);
    Some(format!("{} busy for 1 s: detached", path.display()))
}

/// A process found by [`processes_using`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proc {
    /// Its pid.
    pub pid: i32,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
}

/// Live processes other than this one whose command line mentions `root` or that have their
/// working dir or an open file under `root` (zombies have neither, so they do not count).
pub fn processes_using(root: &Path) -> Vec<Proc> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let want = root.as_os_str().as_bytes();
    let under = |p: &Path| p == root || p.starts_with(root);
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let dir = ent.path();
        // A child this test binary is forking for another test (before its exec) still shows our
        // own executable and inherits our descriptors: it is not a leftover.
        let own_exe = std::env::current_exe().ok();
        if own_exe.is_some() && fs::read_link(dir.join("exe")).ok() == own_exe {
            continue;
        }
        let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
        let mentions = cmdline.windows(want.len().max(1)).any(|w| w == want);
        let uses = fs::read_link(dir.join("cwd")).is_ok_and(|p| under(&p))
            || fs::read_dir(dir.join("fd"))
                .map(|fds| fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|p| under(&p))))
                .unwrap_or(false);
        if mentions || uses {
            let text = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ");
            out.push(Proc { pid, cmdline: text.trim().to_owned() });
        }
    }
    out.sort();
    out
}

/// Sends SIGKILL to every process using `root` and waits for them to go; returns their list.
pub fn kill_processes_using(root: &Path) -> Vec<Proc> {
    let victims = processes_using(root);
    for p in &victims {
        if let Some(pid) = Pid::from_raw(p.pid) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
    let start = Instant::now();
    while !processes_using(root).is_empty() && start.elapsed() < KILL_DEADLINE {
        sleep(Duration::from_millis(20));
    }
    victims
}

// ---------------------------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------------------------

/// A temp dir that, when dropped, detaches every mount under it and kills every process using it
/// (and then removes it unless `OVLSNAP_TEST_KEEP` is set).
pub struct Scratch {
    root: PathBuf,
    /// Whether a tmpfs of its own is mounted on `root` ([`Scratch::with_room`]): unmounted on
    /// drop without a word.
    own_tmpfs: bool,
    /// Held for its drop, which removes the dir (after [`Drop::drop`] swept it).
    _dir: tempfile::TempDir,
}

impl Scratch {
    /// A fresh temp dir (its canonical path, so it matches mountinfo and `/proc` links).
    pub fn new() -> Scratch {
        let mut dir = tempfile::Builder::new().prefix("ovlsnap-test.").tempdir().expect("create tempdir");
        if std::env::var_os("OVLSNAP_TEST_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let root = fs::canonicalize(dir.path()).expect("canonical tempdir");
        Scratch { root, own_tmpfs: false, _dir: dir }
    }

    /// A fresh temp dir with room for `bytes` of files: on the temp filesystem when it has that
    /// much free (and a quarter more), else on a tmpfs of that size mounted over it (swept on drop
    /// like any mount inside), saying so. For tests whose data would fill a small disk.
    /// `OVLSNAP_TEST_TMPFS` set takes the tmpfs always (to try that path on a roomy machine).
    pub fn with_room(bytes: u64) -> Scratch {
        let mut scratch = Scratch::new();
        let st = rustix::fs::statvfs(scratch.path()).expect("statvfs of the temp dir");
        let free = match std::env::var_os("OVLSNAP_TEST_TMPFS") {
            Some(_) => 0,
            None => st.f_bavail.saturating_mul(st.f_frsize),
        };
        if free >= bytes + bytes / 4 {
            return scratch;
        }
        eprintln!(
            "{}: {} MiB free on the temp filesystem, {} MiB needed: using a tmpfs",
            scratch.path().display(),
            free >> 20,
            bytes >> 20
        );
        let size = std::ffi::CString::new(format!("size={bytes},mode=0755")).expect("no NUL");
        rustix::mount::mount("tmpfs", scratch.path(), "tmpfs", rustix::mount::MountFlags::empty(), size.as_c_str())
            .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", scratch.path().display()));
        scratch.own_tmpfs = true;
        scratch
    }

    /// The temp dir.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Makes the directory `self/rel` (and its parents) and returns it.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Mounts under the temp dir, innermost last.
    pub fn mounts_inside(&self) -> Vec<PathBuf> {
        mounts().into_iter().map(|m| m.point).filter(|p| p.starts_with(&self.root)).collect()
    }

    /// Detaches what is mounted under the temp dir and kills what still uses it; returns what it found.
    fn sweep(&self) -> Vec<String> {
        let mut found = Vec::new();
        for _ in 0..8 {
            let inside = self.mounts_inside();
            if inside.is_empty() {
                break;
            }
            for p in inside.iter().rev() {
                if !(self.own_tmpfs && *p == self.root) {
                    found.push(format!("still mounted: {}", p.display()));
                }
                if let Err(e) = rustix::mount::unmount(p, UnmountFlags::DETACH) {
                    found.push(format!("umount -l {}: {e}", p.display()));
                }
            }
        }
        found.extend(kill_processes_using(&self.root).into_iter().map(|p| format!("killed {} ({})", p.pid, p.cmdline)));
        found
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for line in self.sweep() {
            eprintln!("cleanup of {}: {line}", self.root.display());
        }
    }
}

/// Where `ovlsnap mount` serves LIVE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `ovlsnap mount LIVE`: MNT is LIVE itself, the mount stacked over it (the default form).
    Stacked,
    /// `ovlsnap mount LIVE MNT` with a separate, empty MNT.
    Separate,
}

/// LIVE (`<tmp>/live`) served by an ovlsnap daemon at MNT; dropping it unmounts (`ovlsnap umount`,
/// else a lazy unmount) and kills leftover daemons, also while a test panics.
///
/// Declare [`KernelMount`]s of its snapshots after it, so that they are unmounted first.
pub struct SnapMount {
    live: PathBuf,
    mnt: PathBuf,
    form: Form,
    store: Option<PathBuf>,
    mounted: bool,
    /// Dropping it stops the hang watchdog.
    watchdog: Option<Sender<()>>,
    /// Last, so it is swept and removed after `Drop::drop` ran.
    scratch: Scratch,
}

impl SnapMount {
    /// Makes an empty LIVE (mode 0755) and, for [`Form::Separate`], an empty MNT; mounts nothing yet.
    pub fn prepare(form: Form) -> SnapMount {
        SnapMount::prepare_under(form, "")
    }

    /// [`prepare`](Self::prepare) with LIVE and MNT in the dir `sub` of the temp dir (one path
    /// component, any bytes but `/`): for paths that a shell or an option parser could misread.
    pub fn prepare_under(form: Form, sub: &str) -> SnapMount {
        SnapMount::prepare_in(form, OsStr::new(sub), OsStr::new(sub))
    }

    /// [`prepare`](Self::prepare) with LIVE in the dir `live_sub` and MNT in the dir `mnt_sub` of
    /// the temp dir (one component each, any bytes but `/`, not UTF-8 say).
    pub fn prepare_in(form: Form, live_sub: &OsStr, mnt_sub: &OsStr) -> SnapMount {
        SnapMount::prepare_in_scratch(form, Scratch::new(), live_sub, mnt_sub)
    }

    /// [`start`](Self::start) in a temp dir with room for `bytes` of files ([`Scratch::with_room`]).
    pub fn start_with_room(form: Form, bytes: u64, init: impl FnOnce(&Path)) -> SnapMount {
        let mut m = SnapMount::prepare_in_scratch(form, Scratch::with_room(bytes), OsStr::new(""), OsStr::new(""));
        init(&m.live);
        m.mount();
        m
    }

    fn prepare_in_scratch(form: Form, scratch: Scratch, live_sub: &OsStr, mnt_sub: &OsStr) -> SnapMount {
        for sub in [live_sub, mnt_sub] {
            assert!(!sub.as_bytes().contains(&b'/'), "{sub:?}: one component");
        }
        let at = |sub: &OsStr, leaf: &str| {
            let p = scratch.path().join(sub).join(leaf);
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            p
        };
        let live = at(live_sub, "live");
        fs::set_permissions(&live, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod LIVE");
        let mnt = match form {
            Form::Stacked => live.clone(),
            Form::Separate => at(mnt_sub, "mnt"),
        };
        SnapMount { live, mnt, form, store: None, mounted: false, watchdog: None, scratch }
    }

    /// [`prepare`](Self::prepare), then `init(LIVE)` to fill it, then [`mount`](Self::mount).
    pub fn start(form: Form, init: impl FnOnce(&Path)) -> SnapMount {
        let mut m = SnapMount::prepare(form);
        init(&m.live);
        m.mount();
        m
    }

    /// Passes `--store DIR` to every later `ovlsnap mount`.
    pub fn set_store(&mut self, dir: PathBuf) {
        self.store = Some(dir);
    }

    /// The arguments of `ovlsnap mount` for this LIVE, MNT and store.
    pub fn mount_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["mount".into()];
        if let Some(s) = &self.store {
            args.extend(["--store".into(), s.clone().into()]);
        }
        args.push(self.live.clone().into());
        if self.form == Form::Separate {
            args.push(self.mnt.clone().into());
        }
        args
    }

    /// Runs `ovlsnap mount` and checks that the FUSE mount is live when it returns.
    pub fn mount(&mut self) {
        self.mount_wrapped(&[]);
    }

    /// [`mount`](Self::mount) with `ovlsnap mount` run by `wrapper` (e.g. `prlimit --nofile=40`).
    pub fn mount_wrapped(&mut self, wrapper: &[&str]) {
        let out = self.try_mount_wrapped(wrapper);
        out.expect_ok("ovlsnap mount");
        self.expect_served(&out);
    }

    /// Runs `ovlsnap mount` through `wrapper` (as [`mount_wrapped`](Self::mount_wrapped)) and
    /// returns what it did, whether it failed or not; on success the caller should check the
    /// mount with [`expect_served`](Self::expect_served).
    pub fn try_mount_wrapped(&mut self, wrapper: &[&str]) -> CliOutput {
        assert!(!self.mounted, "already mounted");
        let out = match wrapper.split_first() {
            None => ovlsnap(&self.mount_args()),
            Some((program, rest)) => {
                let mut args: Vec<OsString> = rest.iter().map(OsString::from).collect();
                args.push(ovlsnap_bin().into());
                args.extend(self.mount_args());
                run_with_deadline(OsStr::new(program), &args).unwrap_or_else(|e| panic!("{e}"))
            }
        };
        // From here on Drop tries `ovlsnap umount` first (the scratch sweep catches the rest).
        self.mounted = out.success() || is_fuse_mount(&self.mnt);
        out
    }

    /// After an `ovlsnap mount` (`out`) that succeeded: the FUSE mount is on top at MNT; starts
    /// the hang watchdog.
    pub fn expect_served(&mut self, out: &CliOutput) {
        assert!(
            is_fuse_mount(&self.mnt),
            "`ovlsnap mount` returned but no FUSE mount is on top at {} (mounts there: {:?})\n{out}",
            self.mnt.display(),
            mounts_at(&self.mnt)
        );
        self.watchdog = Some(watchdog(self.scratch.root.clone(), self.mnt.clone()));
    }

    /// Kills the daemon with SIGKILL and waits until it is gone; its dead mount stays (it answers
    /// ENOTCONN until detached).
    pub fn kill_daemon_leaving_its_mount(&self) {
        let pid = daemon_pid(self.mnt());
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL)
            .expect("kill -9 the daemon");
        while Path::new(&format!("/proc/{pid}/exe")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL, detaches its dead mount and records that it is gone.
    pub fn kill_daemon(&mut self) {
        self.kill_daemon_leaving_its_mount();
        rustix::mount::unmount(self.mnt(), rustix::mount::UnmountFlags::DETACH).expect("detach the dead mount");
        self.mark_unmounted();
    }

    /// Records that the mount went away without `ovlsnap umount` (a killed daemon, detached).
    pub fn mark_unmounted(&mut self) {
        self.watchdog = None;
        self.mounted = false;
    }

    /// Runs `ovlsnap umount MNT` and checks that it returned after the unmount and the daemon's exit.
    pub fn umount(&mut self) {
        assert!(self.mounted, "not mounted");
        self.watchdog = None;
        let out = ovlsnap(&[OsStr::new("umount"), self.mnt.as_os_str()]);
        self.mounted = false;
        out.expect_ok("ovlsnap umount");
        assert!(
            !is_fuse_mount(&self.mnt),
            "`ovlsnap umount` returned but a FUSE mount is still at {}\n{out}",
            self.mnt.display()
        );
        let left = processes_using(self.scratch.path());
        assert!(left.is_empty(), "`ovlsnap umount` returned but these processes still use the test dir: {left:?}");
    }

    /// LIVE (covered by the mount in the stacked form).
    pub fn live(&self) -> &Path {
        &self.live
    }

    /// The mount point (LIVE in the stacked form).
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// The form of the mount.
    pub fn form(&self) -> Form {
        self.form
    }

    /// The temp dir holding LIVE (and MNT); tests may make more dirs in it.
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// `MNT/.snapshots/NAME`.
    pub fn view(&self, name: &str) -> PathBuf {
        self.mnt.join(".snapshots").join(name)
    }

    /// Runs `ovlsnap take [NAME] --mount MNT`.
    pub fn try_take(&self, name: Option<&str>) -> CliOutput {
        let mut args: Vec<&OsStr> = vec![OsStr::new("take")];
        args.extend(name.map(OsStr::new));
        args.extend([OsStr::new("--mount"), self.mnt.as_os_str()]);
        ovlsnap(&args)
    }

    /// Takes a snapshot and returns the name it printed (which must be `name` when one is given).
    pub fn take(&self, name: Option<&str>) -> String {
        let out = self.try_take(name);
        let printed = out.expect_ok("ovlsnap take").trim();
        assert!(!printed.is_empty() && !printed.contains('\n'), "take must print one name\n{out}");
        if let Some(n) = name {
            assert_eq!(printed, n, "take {n} printed another name\n{out}");
        }
        printed.to_owned()
    }

    /// `ovlsnap list --json --mount MNT`, parsed and checked (see [`parse_list`]).
    pub fn list(&self) -> Vec<SnapInfo> {
        let out = ovlsnap(&[OsStr::new("list"), OsStr::new("--json"), OsStr::new("--mount"), self.mnt.as_os_str()]);
        parse_list(out.expect_ok("ovlsnap list --json")).unwrap_or_else(|e| panic!("list --json: {e}\n{out}"))
    }

    /// The names `MNT/.snapshots` lists, sorted.
    pub fn listed_views(&self) -> Vec<String> {
        let dir = self.mnt.join(".snapshots");
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        let mut names: Vec<String> =
            rd.map(|e| e.expect("readdir .snapshots").file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Runs `ovlsnap mount-cmd NAME DIR --mount MNT`.
    pub fn try_mount_cmd(&self, name: &str, dir: &Path) -> CliOutput {
        let args =
            [OsStr::new("mount-cmd"), OsStr::new(name), dir.as_os_str(), OsStr::new("--mount"), self.mnt.as_os_str()];
        ovlsnap(&args)
    }

    /// The one line `ovlsnap mount-cmd NAME DIR --mount MNT` prints, checked as a shell would read
    /// it: one plain command, `mount -t overlay overlay -o OPTS DIR`, a read-only overlay whose
    /// bottom layer is MNT, mounted at exactly `dir` (absolute).
    pub fn mount_cmd(&self, name: &str, dir: &Path) -> String {
        let out = self.try_mount_cmd(name, dir);
        let line = out.expect_ok("ovlsnap mount-cmd").trim();
        assert!(!line.contains('\n'), "mount-cmd must print one line\n{out}");
        assert!(
            line.starts_with(MOUNT_CMD_PREFIX),
            "mount-cmd must print `{MOUNT_CMD_PREFIX}'ro,lowerdir=...'`\n{out}"
        );
        let words = shell_words(line).unwrap_or_else(|e| panic!("mount-cmd: {e}\n{out}"));
        let [mount, t, ty, src, o, opts, at] = &words[..] else {
            panic!("mount-cmd must print `{MOUNT_CMD_PREFIX}OPTS DIR`, got the words {words:?}\n{out}")
        };
        assert_eq!([mount, t, ty, src, o], ["mount", "-t", "overlay", "overlay", "-o"], "mount-cmd\n{out}");
        assert_eq!(Path::new(at), dir, "mount-cmd: the mount point\n{out}");
        let (opts, lowers) = overlay_options(opts);
        let read_only = opts.iter().any(|o| o == "ro") && !opts.iter().any(|o| o.starts_with("upperdir="));
        assert!(
            read_only && opts.iter().any(|o| o.starts_with("lowerdir=")),
            "mount-cmd: not a read-only overlay\n{out}"
        );
        assert_eq!(lowers.last().map(Path::new), Some(self.mnt.as_path()), "mount-cmd: the bottom layer\n{out}");
        line.to_owned()
    }
}

impl Drop for SnapMount {
    fn drop(&mut self) {
        self.watchdog = None;
        if self.mounted {
            self.mounted = false;
            match run_with_deadline(ovlsnap_bin().as_os_str(), &["umount".into(), self.mnt.clone().into()]) {
                Ok(out) if out.success() => {}
                Ok(out) => eprintln!("cleanup: ovlsnap umount failed; detaching\n{out}"),
                Err(e) => eprintln!("cleanup: {e}; detaching"),
            }
        }
        // `scratch` sweeps what is left (a lazy unmount, leftover daemons) when it drops next.
    }
}

/// Starts a thread that kills every process using `root` (the daemon, so that calls blocked on
/// the mount fail with ENOTCONN) if the mount lives longer than `OVLSNAP_TEST_HANG_SECS`;
/// dropping the returned sender stops it.
fn watchdog(root: PathBuf, mnt: PathBuf) -> Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let limit = env_secs("OVLSNAP_TEST_HANG_SECS", 300);
    std::thread::spawn(move || {
        if rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
            eprintln!("ovlsnap mount at {} still there after {limit:?}: presumed hung, killing", mnt.display());
            for p in kill_processes_using(&root) {
                eprintln!("  killed {} ({})", p.pid, p.cmdline);
            }
        }
    });
    tx
}

/// The pid of the daemon serving `mnt` (`ovlsnap status --json`).
pub fn daemon_pid(mnt: &Path) -> i32 {
    let out = ovlsnap(&[OsStr::new("status"), OsStr::new("--json"), OsStr::new("--mount"), mnt.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.expect_ok("ovlsnap status")).unwrap();
    v["pid"].as_i64().unwrap() as i32
}

/// Something mounted with the kernel at a directory; dropping it unmounts (detaching if busy).
pub struct KernelMount {
    dir: PathBuf,
}

impl KernelMount {
    /// Mounts snapshot `name` of `snap` read-only at `dir` (an existing dir) by running the command
    /// `ovlsnap mount-cmd` prints with `sh -c`, and checks that an overlay is mounted there.
    pub fn snapshot(snap: &SnapMount, name: &str, dir: &Path) -> KernelMount {
        let line = snap.mount_cmd(name, dir);
        let out =
            run_with_deadline(OsStr::new("sh"), &["-c".into(), line.clone().into()]).unwrap_or_else(|e| panic!("{e}"));
        let guard = KernelMount { dir: dir.to_owned() };
        out.expect_ok(&format!("running the mount-cmd of {name}"));
        assert_eq!(
            mounts_at(dir).last().map(String::as_str),
            Some("overlay"),
            "after `{line}` no kernel overlay is mounted at {}",
            dir.display()
        );
        guard
    }

    /// Mounts snapshot `name` of `snap` read-only at `dir` (an existing dir) with
    /// `ovlsnap mount-view`, and checks that an overlay is mounted there.
    pub fn view(snap: &SnapMount, name: &str, dir: &Path) -> KernelMount {
        let out = ovlsnap(&[
            OsStr::new("mount-view"),
            OsStr::new(name),
            dir.as_os_str(),
            OsStr::new("--mount"),
            snap.mnt().as_os_str(),
        ]);
        let guard = KernelMount { dir: dir.to_owned() };
        out.expect_ok(&format!("ovlsnap mount-view {name}"));
        assert!(out.stdout.is_empty(), "mount-view prints nothing\n{out}");
        assert_eq!(
            mounts_at(dir).last().map(String::as_str),
            Some("overlay"),
            "after mount-view no kernel overlay is mounted at {}",
            dir.display()
        );
        guard
    }

    /// Takes over whatever is mounted at `dir` (a clone), to unmount it on drop.
    pub fn adopt(dir: &Path) -> KernelMount {
        KernelMount { dir: dir.to_owned() }
    }

    /// Mounts a fresh tmpfs at `dir`.
    pub fn tmpfs(dir: &Path) -> KernelMount {
        rustix::mount::mount("tmpfs", dir, "tmpfs", MountFlags::empty(), c"size=64m")
            .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", dir.display()));
        KernelMount { dir: dir.to_owned() }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if let Some(problem) = unmount_or_detach(&self.dir) {
            eprintln!("KernelMount: {problem}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small checks shared by the tests
// ---------------------------------------------------------------------------------------------

/// Names of the entries of `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
    let mut names: Vec<String> = rd
        .map(|e| {
            e.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())).file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Checks that the root of a snapshot view (`what`, for the message) does not list the default
/// store `.ovlsnap` (DESIGN §4: hidden from every view; [`record_tree`] skips the name, so this is
/// the check that sees it).
pub fn assert_store_hidden(view: &Path, what: &str) {
    let names = names_in(view);
    assert!(
        !names.iter().any(|n| n == ".ovlsnap"),
        "{what}: the store .ovlsnap shows at the root of {}",
        view.display()
    );
}

/// Checks what MNT must hide and show at its root: `.snapshots` and the store `.ovlsnap` are not
/// listed, `.ovlsnap` cannot be looked up, `.snapshots` can (and is a directory).
pub fn check_hidden_names(mnt: &Path) {
    let names = names_in(mnt);
    for hidden in [".snapshots", ".ovlsnap"] {
        assert!(!names.iter().any(|n| n == hidden), "{} lists {hidden}: {names:?}", mnt.display());
    }
    let store = mnt.join(".ovlsnap");
    match fs::symlink_metadata(&store) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        other => panic!("lookup of {} must fail with ENOENT, got {other:?}", store.display()),
    }
    let snaps = mnt.join(".snapshots");
    let m = fs::symlink_metadata(&snaps).unwrap_or_else(|e| panic!("lookup of {}: {e}", snaps.display()));
    assert!(m.is_dir(), "{} is not a directory", snaps.display());
}

/// `damage` of snapshot `name` in `ovlsnap list --json` (`None`: intact).
pub fn damage_of(m: &SnapMount, name: &str) -> Option<serde_json::Value> {
    let out = ovlsnap(&[OsStr::new("list"), OsStr::new("--json"), OsStr::new("--mount"), m.mnt().as_os_str()]);
    let items: serde_json::Value = serde_json::from_str(out.expect_ok("list --json")).unwrap();
    let item =
        items.as_array().unwrap().iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("no {name}\n{out}"));
    item.get("damage").cloned()
}

/// Drops the kernel's page, dentry and inode caches.
pub fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
}

/// Runs the shell `script` in `dir`, panicking unless it succeeds.
pub fn sh(script: &str, dir: &Path) {
    let out = run_with_deadline(OsStr::new("sh"), &["-c".into(), format!("cd '{}' && {script}", dir.display()).into()])
        .unwrap_or_else(|e| panic!("{e}"));
    out.expect_ok(script);
}
