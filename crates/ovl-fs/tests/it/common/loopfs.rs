//! Filesystems of their own for tests, in loop images.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Command;

use super::tempdir;

/// A filesystem in a loop image, mounted at `dir`; unmounted (and its loop device freed) on drop.
pub struct LoopFs {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopFs {
    /// Makes a `size`-byte image with `mkfs` (`xfs` with reflink, `btrfs` or `ext4`) and mounts it.
    pub fn new(kind: &str, size: u64) -> LoopFs {
        let tmp = tempdir(&format!("loop-{kind}"));
        let img = tmp.path().join("img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let mkfs = match kind {
            "xfs" => Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img).output(),
            "btrfs" => Command::new("mkfs.btrfs").arg("-q").arg(&img).output(),
            "ext4" => Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img).output(),
            _ => unreachable!(),
        }
        .unwrap();
        assert!(mkfs.status.success(), "mkfs.{kind}: {}", String::from_utf8_lossy(&mkfs.stderr));
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        let out = Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&dir).output().unwrap();
        assert!(out.status.success(), "mount {kind} image: {}", String::from_utf8_lossy(&out.stderr));
        LoopFs { dir, _tmp: tmp }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::empty()).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
    }
}
