//! The three overlays under comparison, mounted on a fresh upper and work dir, each behind a guard
//! that unmounts on drop; and the quiet command runner the benchmark uses (nothing on stdout, so
//! that `--json` output stays machine-readable).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

use crate::mountinfo;

/// An overlay implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's overlayfs (`mount -t overlay`, `redirect_dir=on`): the reference.
    Kernel,
    /// fuse-overlayfs, the established FUSE overlay.
    FuseOverlayfs,
    /// Ours, a release build, served over `/dev/fuse` (`uring=off`).
    Ovlfs,
    /// Ours over FUSE's io_uring transport (`uring=on`; the kernel's `enable_uring` set).
    OvlfsUring,
}

impl Backend {
    /// The backends to compare: the kernel first (ratios are to it), fuse-overlayfs when installed.
    pub fn available() -> Vec<Backend> {
        let mut backends = vec![Backend::Kernel];
        if fuse_overlayfs_version().is_some() {
            backends.push(Backend::FuseOverlayfs);
        } else {
            eprintln!("note: fuse-overlayfs is not installed (apt-get install fuse-overlayfs); comparing without it");
        }
        backends.push(Backend::Ovlfs);
        if crate::bench::uring_available() {
            backends.push(Backend::OvlfsUring);
        } else {
            eprintln!("note: this kernel has no FUSE over io_uring; comparing ovlfs over /dev/fuse only");
        }
        backends
    }

    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::FuseOverlayfs => "fuse-overlayfs",
            Backend::Ovlfs => "ovlfs",
            Backend::OvlfsUring => "ovlfs-uring",
        }
    }
}

/// What `fuse-overlayfs --version` says of itself (e.g. `version 1.10`), if it is installed.
pub fn fuse_overlayfs_version() -> Option<String> {
    let output = Command::new("fuse-overlayfs").arg("--version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|line| line.starts_with("fuse-overlayfs"))?;
    Some(line.trim_start_matches("fuse-overlayfs:").trim().to_owned())
}

/// A fresh, empty upper and work dir for one mount, on the filesystem of `base`.
pub struct RunDirs {
    root: PathBuf,
    /// The upper dir.
    pub upper: PathBuf,
    /// The work dir.
    pub work: PathBuf,
}

impl RunDirs {
    /// Creates `base/run-TAG-N/{upper,work}` with a new N.
    pub fn create(base: &Path, tag: &str) -> Result<RunDirs> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = base.join(format!("run-{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        let dirs = RunDirs { upper: root.join("upper"), work: root.join("work"), root };
        for dir in [&dirs.upper, &dirs.work] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(dirs)
    }

    /// Deletes the dirs (after the overlay on them is unmounted).
    pub fn remove(self) -> Result<()> {
        fs::remove_dir_all(&self.root).with_context(|| format!("removing {}", self.root.display()))
    }
}

/// An overlay mounted at a mount point; unmounted on drop if still mounted.
pub struct Mounted {
    mnt: PathBuf,
}

impl Mounted {
    /// Mounts `backend` with `lowers` (top first) and `dirs` at `mnt`, and waits until it is live.
    /// `volatile` asks each backend to skip the fsyncs of copy-up.
    pub fn mount(
        backend: Backend,
        ovlfs: &Path,
        lowers: &[PathBuf],
        dirs: &RunDirs,
        mnt: &Path,
        volatile: bool,
    ) -> Result<Mounted> {
        if mountinfo::is_mounted(mnt)? {
            bail!("{} is already mounted", mnt.display());
        }
        let lowerdir: Vec<String> = lowers.iter().map(|lower| lower.display().to_string()).collect();
        let mut options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowerdir.join(":"),
            dirs.upper.display(),
            dirs.work.display()
        );
        let extra: &[&str] = match backend {
            Backend::FuseOverlayfs => &[],
            Backend::Kernel => &["redirect_dir=on"],
            Backend::Ovlfs => &["redirect_dir=on", "uring=off"],
            Backend::OvlfsUring => &["redirect_dir=on", "uring=on"],
        };
        for option in extra.iter().copied().chain(volatile.then_some("volatile")) {
            options.push(',');
            options.push_str(option);
        }
        // The guard exists before the mount does, so a half-made mount is cleaned up too.
        let guard = Mounted { mnt: mnt.to_owned() };
        let options = OsStr::new(&options);
        match backend {
            Backend::Kernel => quiet(
                "mount",
                &["-t".as_ref(), "overlay".as_ref(), "overlay".as_ref(), "-o".as_ref(), options, mnt.as_os_str()],
            )?,
            Backend::FuseOverlayfs => quiet("fuse-overlayfs", &["-o".as_ref(), options, mnt.as_os_str()])?,
            Backend::Ovlfs | Backend::OvlfsUring => {
                quiet(ovlfs.as_os_str(), &["-o".as_ref(), options, mnt.as_os_str()])?
            }
        }
        mountinfo::wait_until_mounted(mnt)?;
        Ok(guard)
    }

    /// A guard for whatever gets mounted at `mnt` by other means (e.g. a command another tool
    /// printed); made before the mount, so that a half-made one is cleaned up too.
    pub fn guard(mnt: &Path) -> Mounted {
        Mounted { mnt: mnt.to_owned() }
    }

    /// Unmounts now, reporting errors, and waits until the mount is gone.
    pub fn unmount(&mut self) -> Result<()> {
        if !mountinfo::is_mounted(&self.mnt)? {
            return Ok(());
        }
        quiet("umount", &[self.mnt.as_os_str()])?;
        let start = std::time::Instant::now();
        while mountinfo::is_mounted(&self.mnt)? {
            if start.elapsed() > std::time::Duration::from_secs(10) {
                bail!("{} is still mounted 10s after umount", self.mnt.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !mountinfo::is_mounted(&self.mnt).unwrap_or(true) {
            return;
        }
        eprintln!("cleaning up: unmounting {}", self.mnt.display());
        if self.unmount().is_err() && quiet("umount", &["-l".as_ref(), self.mnt.as_os_str()]).is_err() {
            eprintln!("warning: could not unmount {}; unmount it by hand", self.mnt.display());
        }
    }
}

/// Runs `program` with its stdout sent to our stderr; fails unless it exits 0.
pub fn quiet(program: impl AsRef<OsStr>, args: &[&OsStr]) -> Result<()> {
    let program = program.as_ref();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("could not start {}", program.to_string_lossy()))?;
    if !status.success() {
        bail!("`{}` failed ({status})", shown(program, args));
    }
    Ok(())
}

/// Runs `program` and returns what it printed on stdout; fails unless it exits 0.
pub fn quiet_output(program: impl AsRef<OsStr>, args: &[&OsStr]) -> Result<String> {
    let program = program.as_ref();
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {}", program.to_string_lossy()))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", shown(program, args), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn shown(program: &OsStr, args: &[&OsStr]) -> String {
    std::iter::once(program).chain(args.iter().copied()).map(OsStr::to_string_lossy).collect::<Vec<_>>().join(" ")
}
