//! The reference: the same tree in a subvolume of a fresh btrfs loop image, snapshots taken with
//! `btrfs subvolume snapshot -r` into `snaps/`, listed with `btrfs subvolume list`, deleted with
//! `btrfs subvolume delete` (which returns before the cleaner has freed the space, as a user sees
//! it); views are the snapshot subvolumes themselves.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::growth::{Growth, Store, clock};
use super::results::Results;
use super::workload::{self, timed};
use super::{Plan, System};
use crate::bench::layers::{FsKind, LoopFs, Scratch};
use crate::bench::mounts::{Mounted, quiet};
use crate::bench::{ops, progress};

/// A btrfs filesystem with the tree in subvolume `live` and snapshots in `snaps/`.
struct Btrfs {
    image: LoopFs,
    live: PathBuf,
    snaps: PathBuf,
}

/// Grows a store of btrfs snapshots through the plan's checkpoints, recording into `results`.
pub fn run(scratch: &Scratch, plan: &Plan, results: &mut Results) -> Result<()> {
    let gib = plan.image_gib();
    progress(&format!("==> btrfs: {gib} GiB btrfs loop image, generating the tree"));
    let image = LoopFs::create(&scratch.dir, "btrfs", FsKind::Btrfs, gib)?;
    let live = image.dir.join("live");
    quiet("btrfs", &["subvolume".as_ref(), "create".as_ref(), live.as_os_str()])?;
    let snaps = image.dir.join("snaps");
    fs::create_dir(&snaps).with_context(|| format!("creating {}", snaps.display()))?;
    let started = Instant::now();
    workload::generate(&live)?;
    ops::sync()?;
    progress(&format!("    generated in {}", clock(started.elapsed())));
    let mut store = Btrfs { image, live, snaps };
    let view_mnt = scratch.dir.join("mnt");
    Growth::new(plan, &view_mnt).run(&mut store, results)
}

impl Btrfs {
    /// `btrfs subvolume ARGS...`, timed.
    fn subvolume(&self, args: &[&OsStr]) -> Result<(Duration, String)> {
        let mut all: Vec<&OsStr> = vec!["subvolume".as_ref()];
        all.extend_from_slice(args);
        timed("btrfs", &all)
    }
}

impl Store for Btrfs {
    fn system(&self) -> System {
        System::Btrfs
    }

    fn live(&self) -> &Path {
        &self.live
    }

    fn take(&mut self, name: &str) -> Result<Duration> {
        let view = self.view(name);
        Ok(self.subvolume(&["snapshot".as_ref(), "-r".as_ref(), self.live.as_os_str(), view.as_os_str()])?.0)
    }

    fn list(&self, expected: usize) -> Result<Duration> {
        let (elapsed, stdout) = self.subvolume(&["list".as_ref(), self.image.dir.as_os_str()])?;
        let listed = stdout.lines().filter(|line| line.contains(" path snaps/")).count();
        if listed != expected {
            bail!("`btrfs subvolume list` shows {listed} snapshots, not {expected}");
        }
        Ok(elapsed)
    }

    fn diff(&self, older: &str, newer: &str) -> Result<Duration> {
        bail!("btrfs has no diff of {older} and {newer} to time")
    }

    fn list_one(&self, name: &str) -> Result<Duration> {
        bail!("btrfs has no list of one snapshot ({name}) to time")
    }

    fn delete(&mut self, name: &str) -> Result<Duration> {
        Ok(self.subvolume(&["delete".as_ref(), self.view(name).as_os_str()])?.0)
    }

    fn view(&self, name: &str) -> PathBuf {
        self.snaps.join(name)
    }

    fn daemon(&self) -> Option<u32> {
        None
    }

    fn kernel_mount(&self, _name: &str, _at: &Path) -> Option<Result<Mounted>> {
        None
    }
}
