//! `cargo xtask mount`: sample layers in a directory, mounted with a debug build of `ovlfs`, left mounted
//! for a person to explore. Also the building and mounting of `ovlfs` that `demo` shares.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, cmd, header};
use crate::mountinfo;
use crate::sample::Sample;

/// Mounts the sample under `dir` and tells the user what to try.
pub fn run(dir: &Path) -> Result<()> {
    let sample = Sample::at(dir)?;
    if let Some(entry) = mountinfo::mount_at(&sample.mnt)? {
        bail!(
            "{} is already mounted ({}); unmount it first with: umount {}",
            sample.mnt.display(),
            entry.fs_type,
            sample.mnt.display()
        );
    }

    header("building ovlfs");
    let ovlfs = build_ovlfs()?;

    header(&format!("creating sample layers in {}", sample.root.display()));
    sample.create()?;
    println!("lower1, lower2: the read-only layers (lower1 on top); upper, work: empty; mnt: the mount point");

    header("mounting");
    mount_ovlfs(&ovlfs, &sample)?;

    let (mnt, upper) = (sample.mnt.display(), sample.upper.display());
    let tries = [
        (format!("ls -la {mnt} {mnt}/shared"), "the merged view; lower2's secret.txt is whited out"),
        (format!("echo more >> {mnt}/README.txt"), "copy-up: upper gets its own copy of the file"),
        (format!("rm {mnt}/notes.txt"), "leaves a whiteout (char device 0:0) in upper"),
        (format!("echo hi > {mnt}/new"), "a new file lands in upper only"),
        (format!("ls -la {upper}"), "what changed"),
    ];
    let width = tries.iter().map(|(command, _)| command.len()).max().unwrap_or(0);
    println!("\nThe overlay is mounted at {mnt}. Try:");
    for (command, what) in &tries {
        println!("  {command:<width$}   # {what}");
    }
    println!("Unmount it with:\n  umount {mnt}");
    Ok(())
}

/// Builds `ovlfs` (debug) and returns the path of the binary.
pub fn build_ovlfs() -> Result<PathBuf> {
    cargo().args(["build", "-p", "ovl-fs"]).run()?;
    let binary = crate::target_dir().join("debug/ovlfs");
    if !binary.is_file() {
        bail!("the build produced no {}: ovl-fs must have a binary named `ovlfs`", binary.display());
    }
    Ok(binary)
}

/// Mounts `sample` with `ovlfs` (which returns once the mount is live and keeps serving in the background)
/// and waits until mountinfo lists it.
pub fn mount_ovlfs(ovlfs: &Path, sample: &Sample) -> Result<()> {
    cmd(ovlfs).arg("-o").arg(sample.options(&sample.work)).arg(&sample.mnt).run()?;
    let entry = mountinfo::wait_until_mounted(&sample.mnt)
        .with_context(|| format!("{} returned but the mount is not live", ovlfs.display()))?;
    println!("mounted: {} ({})", sample.mnt.display(), entry.fs_type);
    Ok(())
}
