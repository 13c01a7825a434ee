//! A real `ovlfs` mount for the benches that time syscalls through FUSE: the daemon is the built
//! binary (as users run it), started in the foreground as a child, and the guard unmounts and
//! reaps it on drop, also when a bench panics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

/// How long a mount may take to appear, and the daemon to exit after its unmount.
const DEADLINE: Duration = Duration::from_secs(10);

/// The `ovlfs` binary: `$OVLFS_BIN` if set, else built now with the profile of the running bench
/// or test (a bench has no `CARGO_BIN_EXE_ovlfs`: the binary belongs to another package). The
/// build is a no-op when the binary is fresh.
///
/// # Panics
/// When the build fails.
pub fn ovlfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OVLFS_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<this executable>
    let exe = std::env::current_exe().expect("the running executable");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "ovl-fs", "--bin", "ovlfs"]).current_dir(workspace);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.stdin(Stdio::null()).status().expect("cargo starts");
    assert!(status.success(), "building ovlfs failed ({status}); or set OVLFS_BIN");
    let bin = profile_dir.join("ovlfs");
    assert!(bin.is_file(), "no {} after the build", bin.display());
    bin
}

/// An `ovlfs -f -o OPTIONS MNT` daemon and its mount; dropping it unmounts and reaps the daemon.
pub struct OvlfsMount {
    mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl OvlfsMount {
    /// Mounts `options` (the kernel's syntax) at `mnt`, an existing empty dir, with the binary
    /// `bin`; returns once the mount shows in `/proc/self/mountinfo`. The daemon's output goes to
    /// `MNT.log` beside the mount point.
    ///
    /// # Panics
    /// When the daemon exits first or the mount does not appear within 10 s (with its output).
    pub fn new(bin: &Path, options: &str, mnt: &Path) -> OvlfsMount {
        let mnt = std::fs::canonicalize(mnt).expect("the mount point exists");
        let log = mnt.with_extension("log");
        let out = File::create(&log).expect("the daemon's log");
        let child = Command::new(bin)
            .args(["-f", "-o", options])
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a second log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut guard = OvlfsMount { mnt, child: Some(child), log };
        let start = Instant::now();
        while !is_mounted(&guard.mnt) {
            if let Some(status) = guard.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                guard.child = None;
                panic!("ovlfs exited ({status}) before mounting:\n{}", guard.log_text());
            }
            assert!(start.elapsed() < DEADLINE, "no mount after {DEADLINE:?}:\n{}", guard.log_text());
            sleep(Duration::from_millis(5));
        }
        guard
    }

    /// The mount point (canonical).
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OvlfsMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let mut tries = 0;
            loop {
                match rustix::mount::unmount(&self.mnt, UnmountFlags::empty()) {
                    Err(Errno::BUSY) if tries < 40 => {
                        tries += 1;
                        sleep(Duration::from_millis(25));
                    }
                    Err(Errno::BUSY) => {
                        let _ = rustix::mount::unmount(&self.mnt, UnmountFlags::DETACH);
                        break;
                    }
                    Ok(()) | Err(_) => break,
                }
            }
        }
        let Some(mut child) = self.child.take() else { return };
        let start = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > DEADLINE {
                // Only our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            sleep(Duration::from_millis(2));
        }
    }
}

/// Whether `/proc/self/mountinfo` lists a mount at `mnt` (a canonical path without the
/// characters mountinfo escapes, as temp dirs are).
fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    let want = mnt.to_str().expect("a UTF-8 mount point");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}
