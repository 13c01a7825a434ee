//! The ovlsnap side: LIVE on a fresh ext4 loop image, mounted over itself with `ovlsnap mount`,
//! driven with `ovlsnap take`, `list --json`, `diff`, `delete` and `mount-cmd`; views read at
//! `MNT/.snapshots/NAME`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::growth::{Growth, Store, clock};
use super::results::Results;
use super::workload::{self, timed};
use super::{Plan, System};
use crate::bench::layers::{FsKind, LoopFs, Scratch};
use crate::bench::mounts::Mounted;
use crate::bench::snapshots::SnapMount;
use crate::bench::{ops, progress};

/// A store of ovlsnap's: its mount, and the filesystem under it.
struct Ovlsnap {
    // Fields drop in order: the mount before the filesystem it lives on.
    mount: SnapMount,
    _image: LoopFs,
    ovlsnap: PathBuf,
}

/// Grows an ovlsnap store through the plan's checkpoints, recording into `results`.
pub fn run(ovlsnap: &Path, scratch: &Scratch, plan: &Plan, results: &mut Results) -> Result<()> {
    let gib = plan.image_gib();
    progress(&format!("==> ovlsnap: {gib} GiB ext4 loop image, generating the tree"));
    let image = LoopFs::create(&scratch.dir, "ovlsnap", FsKind::Ext4, gib)?;
    let live = image.dir.join("live");
    let started = Instant::now();
    workload::generate(&live)?;
    ops::sync()?;
    let generated = started.elapsed();
    let started = Instant::now();
    let mount = SnapMount::mount(ovlsnap, &live)?;
    progress(&format!(
        "    generated in {}; `ovlsnap mount` took {:.0} ms; daemon pid {}",
        clock(generated),
        started.elapsed().as_secs_f64() * 1e3,
        mount.pid.map_or("unknown".to_owned(), |pid| pid.to_string())
    ));
    let mut store = Ovlsnap { mount, _image: image, ovlsnap: ovlsnap.to_owned() };
    let view_mnt = scratch.dir.join("mnt");
    Growth::new(plan, &view_mnt).run(&mut store, results)?;
    store.mount.unmount()
}

impl Ovlsnap {
    /// `ovlsnap COMMAND ARGS... --mount MNT`, timed.
    fn command(&self, command: &str, args: &[&OsStr]) -> Result<(Duration, String)> {
        let mut all: Vec<&OsStr> = vec![command.as_ref()];
        all.extend_from_slice(args);
        all.extend(["--mount".as_ref(), self.mount.mnt.as_os_str()]);
        timed(&self.ovlsnap, &all)
    }
}

impl Store for Ovlsnap {
    fn system(&self) -> System {
        System::Ovlsnap
    }

    fn live(&self) -> &Path {
        &self.mount.mnt
    }

    fn take(&mut self, name: &str) -> Result<Duration> {
        let (elapsed, stdout) = self.command("take", &[name.as_ref()])?;
        if stdout.trim() != name {
            bail!("`ovlsnap take {name}` printed {:?}", stdout.trim());
        }
        Ok(elapsed)
    }

    fn list(&self, expected: usize) -> Result<Duration> {
        let (elapsed, stdout) = self.command("list", &["--json".as_ref()])?;
        let listed = stdout.matches("\"name\"").count();
        if listed != expected {
            bail!("`ovlsnap list` shows {listed} snapshots, not {expected}");
        }
        Ok(elapsed)
    }

    fn list_one(&self, name: &str) -> Result<Duration> {
        let (elapsed, stdout) = self.command("list", &["--json".as_ref(), name.as_ref()])?;
        if stdout.matches("\"name\"").count() != 1 || !stdout.contains(&format!("\"{name}\"")) {
            bail!("`ovlsnap list {name}` shows {stdout:?}");
        }
        Ok(elapsed)
    }

    fn diff(&self, older: &str, newer: &str) -> Result<Duration> {
        let (elapsed, stdout) = self.command("diff", &[older.as_ref(), newer.as_ref()])?;
        // Each take follows changed files: two adjacent snapshots always differ.
        if stdout.trim().is_empty() {
            bail!("`ovlsnap diff {older} {newer}` shows no change");
        }
        Ok(elapsed)
    }

    fn delete(&mut self, name: &str) -> Result<Duration> {
        Ok(self.command("delete", &[name.as_ref()])?.0)
    }

    fn view(&self, name: &str) -> PathBuf {
        self.mount.mnt.join(".snapshots").join(name)
    }

    fn daemon(&self) -> Option<u32> {
        self.mount.pid
    }

    fn kernel_mount(&self, name: &str, at: &Path) -> Option<Result<Mounted>> {
        Some(self.mount_cmd(name, at))
    }
}

impl Ovlsnap {
    /// Runs what `ovlsnap mount-cmd NAME AT` prints, with `sh -c` as its help says; the mount's
    /// guard, or the command's error (shortened: a command of thousands of layers is long).
    fn mount_cmd(&self, name: &str, at: &Path) -> Result<Mounted> {
        let (_, script) = self.command("mount-cmd", &[name.as_ref(), at.as_os_str()])?;
        progress(&format!("    mount-cmd printed {} bytes: {}", script.len(), shortened(script.trim(), 160)));
        let guard = Mounted::guard(at);
        let output = Command::new("sh")
            .args(["-c", script.trim()])
            .stdin(Stdio::null())
            .output()
            .context("could not start sh")?;
        if !output.status.success() {
            bail!(
                "the printed command ({} bytes) failed ({}): {}",
                script.len(),
                output.status,
                shortened(String::from_utf8_lossy(&output.stderr).trim(), 300)
            );
        }
        Ok(guard)
    }
}

/// `text` cut to about `max` characters, with the length said when cut.
fn shortened(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let head: String = text.chars().take(max).collect();
    format!("{head}... ({} characters)", text.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_shortened_and_say_so() {
        assert_eq!(shortened("abc", 5), "abc");
        assert_eq!(shortened("abcdefgh", 3), "abc... (8 characters)");
    }
}
