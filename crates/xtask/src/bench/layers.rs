//! The workload's layers, generated once per run, and the scratch places they live in: a directory
//! on the temp dir's filesystem and an XFS loop image with reflink. Each place is a guard that
//! removes itself on drop.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::mounts::{quiet, quiet_output};
use crate::cmd::cmd;
use crate::mountinfo;

/// The big file that is read and copied up, relative to the overlay root.
pub const BIG: &str = "big/big.bin";
/// A second big file, copied up while another thread times `lstat` on [`Layers::stat_targets`].
pub const BIG2: &str = "big/big2.bin";
/// What [`BIG`] is renamed to on the mount where a rename copies it up.
pub const BIG_RENAMED: &str = "big/big.bin.renamed";
/// The directory of many entries that is renamed (it lives in the bottom lower layer only).
pub const RENAME_DIR: &str = "rename-me";
/// A copy of [`RENAME_DIR`] that is moved with `mv`, which copies and deletes when rename gives `EXDEV`.
pub const MV_DIR: &str = "move-me";

/// How big the workload is.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Whether this is the `--quick` scale.
    pub quick: bool,
    /// Repetitions of each measurement (the median is reported).
    pub runs: usize,
    /// Top-level directories of small files.
    pub dirs: usize,
    /// Small files per directory (in the merged view).
    pub files_per_dir: usize,
    /// Size of each big file in MiB.
    pub big_mib: u64,
    /// Files of 4 KiB that `create_5k` creates.
    pub create_files: usize,
    /// Lower files that `unlink_2k_lower` removes.
    pub unlink_files: usize,
    /// Entries of the directory that `rename_dir_1k` renames.
    pub rename_dir_files: usize,
    /// Snapshots taken per tree size and way of asking (the median is reported). A take costs a
    /// few milliseconds, so many samples are cheap and keep the median steady on a busy machine.
    pub snapshot_takes: usize,
    /// Size in MiB of each file the snapshot write measurements write.
    pub snapshot_write_mib: u64,
    /// How long each churn measurement (`churn_1_dir`, `churn_2_dirs`) cycles.
    pub churn: Duration,
}

impl Scale {
    /// The workload of issue 7, five repetitions.
    pub fn full() -> Scale {
        Scale {
            quick: false,
            runs: 5,
            dirs: 100,
            files_per_dir: 200,
            big_mib: 512,
            create_files: 5000,
            unlink_files: 2000,
            rename_dir_files: 1000,
            snapshot_takes: 15,
            snapshot_write_mib: 256,
            churn: Duration::from_secs(3),
        }
    }

    /// One repetition of the same overlay workload (under a minute here; the full scale is cheap
    /// enough that scaling it down would only make quick numbers incomparable with full ones) but
    /// for shorter churns (a rate, so still comparable); fewer snapshot takes and smaller snapshot
    /// writes (the tree sizes are the metrics' names).
    pub fn quick() -> Scale {
        Scale {
            quick: true,
            runs: 1,
            snapshot_takes: 7,
            snapshot_write_mib: 64,
            churn: Duration::from_millis(1500),
            ..Scale::full()
        }
    }

    /// One line for the reader.
    pub fn describe(&self) -> String {
        format!(
            "{}{} dirs x {} files (half the dirs merged), 2 x {} MiB big files, create {}, unlink {}, \
             rename a dir of {}, churn {} s; snapshots: {} takes per tree, writes of {} MiB",
            if self.quick {
                "--quick (1 run, full overlay workload but shorter churn, lighter snapshot phase): "
            } else {
                ""
            },
            self.dirs,
            self.files_per_dir,
            self.big_mib,
            self.create_files,
            self.unlink_files,
            self.rename_dir_files,
            self.churn.as_secs_f64(),
            self.snapshot_takes,
            self.snapshot_write_mib
        )
    }
}

/// The generated lower layers and what the measurements need to know about them.
pub struct Layers {
    /// `lowerdir` order: the top layer first.
    pub lowers: Vec<PathBuf>,
    /// Entries below the overlay root in the merged view (what a full walk must see).
    pub entries: u64,
    /// [`BIG`] in the lower layer that holds it.
    pub big_lower: PathBuf,
    /// [`BIG2`] in the lower layer that holds it.
    pub big2_lower: PathBuf,
    /// Paths (relative to the overlay root) of lower files that `unlink_2k_lower` removes.
    pub unlink_victims: Vec<PathBuf>,
    /// Files (relative to the overlay root) away from `big/` and from the unlink victims, whose
    /// `lstat` latency is sampled during a copy-up: every file of the second half of the dirs.
    pub stat_targets: Vec<PathBuf>,
    /// Two merged dirs (relative to the overlay root) where the churn measurements create, rename
    /// and unlink their files: away from the stat targets and the unlink victims.
    pub churn_dirs: [PathBuf; 2],
}

impl Layers {
    /// [`Layers::stat_targets`] below the mount point `mnt`.
    pub fn stat_targets_in(&self, mnt: &Path) -> Vec<PathBuf> {
        self.stat_targets.iter().map(|path| mnt.join(path)).collect()
    }
}

impl Layers {
    /// Creates `dir/lower1` (top) and `dir/lower2` (bottom):
    /// - `dNNN/`: even dirs in both layers (lower1 has the first 60% of the names, lower2 the last
    ///   60%, so a fifth of the names are shadowed); dirs `4k+1` only in lower1, `4k+3` only in lower2;
    /// - `big/big.bin`, `big/big2.bin` in lower2: real data (a pattern), not sparse;
    /// - `rename-me/` and `move-me/` in lower2 with their small files.
    ///
    /// The stat targets are the files of the second half of the dirs, the unlink victims the first
    /// files of the odd dirs, and the churn dirs the first two even (merged) dirs.
    pub fn generate(dir: &Path, scale: &Scale) -> Result<Layers> {
        let lower1 = dir.join("lower1");
        let lower2 = dir.join("lower2");
        let content = [b'x'; 512];
        let mut entries = 0u64;
        let mut unlink_victims = Vec::new();
        let mut stat_targets = Vec::new();
        let per_dir = scale.files_per_dir;
        let (top_end, bottom_start) = (per_dir * 3 / 5, per_dir * 2 / 5);
        for d in 0..scale.dirs {
            let name = format!("d{d:03}");
            let ranges: &[(&Path, std::ops::Range<usize>)] = match d % 4 {
                0 | 2 => &[(&lower1, 0..top_end), (&lower2, bottom_start..per_dir)],
                1 => &[(&lower1, 0..per_dir)],
                _ => &[(&lower2, 0..per_dir)],
            };
            for (layer, range) in ranges {
                let sub = layer.join(&name);
                fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
                for f in range.clone() {
                    write_file(&sub.join(format!("f{f:03}")), &content)?;
                }
            }
            entries += 1 + per_dir as u64;
            if d >= scale.dirs / 2 {
                stat_targets.extend((0..per_dir).map(|f| Path::new(&name).join(format!("f{f:03}"))));
            }
            if d % 2 == 1 && unlink_victims.len() < scale.unlink_files {
                let take = (scale.unlink_files - unlink_victims.len()).min(per_dir);
                unlink_victims.extend((0..take).map(|f| Path::new(&name).join(format!("f{f:03}"))));
            }
        }
        let mut merged = (0..scale.dirs / 2).filter(|d| d % 2 == 0).map(|d| PathBuf::from(format!("d{d:03}")));
        let (Some(first), Some(second)) = (merged.next(), merged.next()) else {
            bail!("the scale has too few merged dirs to churn in apart from the stat targets");
        };
        let churn_dirs = [first, second];
        let victims_end = unlink_victims.last().and_then(|p| p.parent()).map(Path::to_owned);
        if unlink_victims.len() < scale.unlink_files
            || victims_end.is_some_and(|dir| stat_targets.iter().any(|p| p.starts_with(&dir)))
        {
            bail!(
                "the scale has too few lower-only files to unlink {} apart from the stat targets",
                scale.unlink_files
            );
        }

        let big_dir = lower2.join("big");
        fs::create_dir_all(&big_dir).with_context(|| format!("creating {}", big_dir.display()))?;
        let (big_lower, big2_lower) = (lower2.join(BIG), lower2.join(BIG2));
        write_big_file(&big_lower, scale.big_mib, 1)?;
        write_big_file(&big2_lower, scale.big_mib, 2)?;
        entries += 3;

        for name in [RENAME_DIR, MV_DIR] {
            let dir = lower2.join(name);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in 0..scale.rename_dir_files {
                write_file(&dir.join(format!("r{f:04}")), &content[..64])?;
            }
            entries += 1 + scale.rename_dir_files as u64;
        }

        Ok(Layers {
            lowers: vec![lower1, lower2],
            entries,
            big_lower,
            big2_lower,
            unlink_victims,
            stat_targets,
            churn_dirs,
        })
    }
}

fn write_file(path: &Path, content: &[u8]) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

/// Writes `mib` MiB of real data (a pseudo-random pattern, different per `seed` and per MiB, so no
/// block is a hole, all zeroes or a duplicate of another) and flushes it to disk.
pub fn write_big_file(path: &Path, mib: u64, seed: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut block = pattern_block(seed);
    for index in 0..mib {
        mark_block(&mut block, index);
        file.write_all(&block).with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all().with_context(|| format!("flushing {}", path.display()))
}

/// One MiB of pseudo-random bytes, different per `seed`.
pub fn pattern_block(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..1 << 20)
        .map(|_| {
            // xorshift64: cheap, and enough to keep the data from being trivially compressible.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Stamps a block of [`pattern_block`] with its index in the file, so no two MiB are alike.
pub fn mark_block(block: &mut [u8], index: u64) {
    block[..8].copy_from_slice(&index.to_le_bytes());
}

/// A fresh directory in the temp dir for one run; removed on drop, unless something is still
/// mounted below it (we never delete through a mount).
pub struct Scratch {
    /// The directory.
    pub dir: PathBuf,
}

impl Scratch {
    /// Creates `TMPDIR/ovlfs-bench.PID` (refusing characters that the mount options cannot carry).
    pub fn create() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("ovlfs-bench.{}", std::process::id()));
        let dir = std::path::absolute(&dir).context("making the scratch dir absolute")?;
        if dir.to_string_lossy().contains([',', ':', '\\']) {
            bail!("the temp dir may not contain ',', ':' or '\\': {}", dir.display());
        }
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let scratch = Scratch { dir };
        fs::create_dir(scratch.dir.join("mnt")).context("creating the mount point")?;
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if mountinfo::has_mounts_under(&self.dir).unwrap_or(true) {
            eprintln!("warning: left {} in place: something is still mounted there", self.dir.display());
        } else if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {err}", self.dir.display());
        }
    }
}

/// Which filesystem a [`LoopFs`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext4, inode tables and journal initialised up front (no lazy init running during the
    /// measurements).
    Ext4,
    /// XFS with reflink (`mkfs.xfs -m reflink=1`), where copy-up can clone instead of copy.
    XfsReflink,
    /// btrfs, for its own snapshots (`btrfs subvolume snapshot -r`) as the reference.
    Btrfs,
}

/// How the image file of a [`LoopFs`] takes its space on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// Sparse: the host allocates each block of the image on its first write.
    Sparse,
    /// Allocated up front (`fallocate`), so that writing a new file inside does not also time the
    /// host's allocation: on the machine this was written on, a new 256 MiB file with `fsync` ran
    /// at 350 MB/s in a sparse image and 1.5 GB/s in a preallocated one. Costs the disk space.
    Preallocated,
}

/// A fresh filesystem in an image file in the scratch dir, attached to a loop device (with direct
/// I/O, so that its data is cached once, not again in the image file's page cache) and mounted. Dropping it unmounts, detaches the loop device and deletes the image.
///
/// The layers live in such an image rather than straight in the temp dir because the cost of
/// creating an inode on a long-used host filesystem depends on where the allocator puts it: on
/// the machine this was written on, creating a file took 25 us in one directory and 700 us in
/// another of the same ext4, which swamped every create and unlink measurement.
pub struct LoopFs {
    /// Where the filesystem is mounted.
    pub dir: PathBuf,
    image: PathBuf,
    device: Option<String>,
}

impl LoopFs {
    /// Makes a `gib` GiB filesystem of `kind` in a sparse `scratch/NAME.img` and mounts it on
    /// `scratch/NAME`.
    pub fn create(scratch: &Path, name: &str, kind: FsKind, gib: u64) -> Result<LoopFs> {
        LoopFs::create_in(scratch, name, kind, gib, Image::Sparse)
    }

    /// The same with the image file allocated as `allocation` says.
    pub fn create_in(scratch: &Path, name: &str, kind: FsKind, gib: u64, allocation: Image) -> Result<LoopFs> {
        let image = scratch.join(format!("{name}.img"));
        let dir = scratch.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A sparse image is fine for most measurements: what matters is that the files inside
        // hold real data.
        File::create(&image)
            .and_then(|file| file.set_len(gib << 30))
            .with_context(|| format!("creating {}", image.display()))?;
        let mut loop_fs = LoopFs { dir, image, device: None };
        if allocation == Image::Preallocated {
            quiet("fallocate", &["-l".as_ref(), format!("{gib}GiB").as_ref(), loop_fs.image.as_os_str()])?;
        }
        let device = quiet_output(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), "--direct-io=on".as_ref(), loop_fs.image.as_os_str()],
        )?;
        let device = device.trim().to_owned();
        if !device.starts_with("/dev/") {
            bail!("losetup printed no device: {device:?}");
        }
        loop_fs.device = Some(device.clone());
        let (mkfs, options): (&str, &[&str]) = match kind {
            FsKind::Ext4 => ("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]),
            FsKind::XfsReflink => ("mkfs.xfs", &["-q", "-f", "-m", "reflink=1"]),
            FsKind::Btrfs => ("mkfs.btrfs", &["-q", "-f"]),
        };
        let mut args: Vec<&std::ffi::OsStr> = options.iter().map(|o| o.as_ref()).collect();
        args.push(device.as_ref());
        quiet(mkfs, &args)?;
        quiet("mount", &[device.as_ref(), loop_fs.dir.as_os_str()])?;
        mountinfo::wait_until_mounted(&loop_fs.dir)?;
        Ok(loop_fs)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if mountinfo::is_mounted(&self.dir).unwrap_or(false) && !unmount_patiently(&self.dir) {
            eprintln!("warning: could not unmount {}", self.dir.display());
        }
        if let Some(device) = &self.device {
            if quiet("losetup", &["-d".as_ref(), device.as_ref()]).is_err() {
                eprintln!("warning: could not detach {device}; run: losetup -d {device}");
            }
        }
        if !mountinfo::is_mounted(&self.dir).unwrap_or(true) {
            let _ = fs::remove_dir(&self.dir);
            if let Err(err) = fs::remove_file(&self.image) {
                eprintln!("warning: could not remove {}: {err}", self.image.display());
            }
        }
    }
}

/// Unmounts `dir`, retrying for a while: a FUSE daemon that was just unmounted may still hold files
/// of the filesystem below open for a moment as it exits. Falls back to a lazy unmount.
fn unmount_patiently(dir: &Path) -> bool {
    for _ in 0..20 {
        if cmd("umount").arg(dir).succeeds() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    quiet("umount", &["-l".as_ref(), dir.as_os_str()]).is_ok()
}
