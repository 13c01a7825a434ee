//! The daemon under stress: started as our child in the foreground (so we know its pid), its open
//! descriptors and resident memory read from `/proc`, and stopped by unmounting; a daemon that
//! does not die is freed through its FUSE connection in fusectl.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mountinfo;

/// How long a mount may take to appear, and a daemon to exit after its unmount.
const DEADLINE: Duration = Duration::from_secs(30);

/// A FUSE daemon we started, serving `mnt`; dropping it detaches the mount and kills it.
pub struct Daemon {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
    conn: u64,
}

impl Daemon {
    /// Starts `cmd` (a daemon staying in the foreground) with its output going to `log` and
    /// waits until `mnt` is mounted.
    pub fn start(mut cmd: Command, mnt: &Path, log: &Path) -> Result<Daemon> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let mut d = Daemon { child, mnt: mnt.to_owned(), log: log.to_owned(), conn: 0 };
        let start = Instant::now();
        while !mountinfo::is_mounted(mnt)? {
            if let Some(status) = d.child.try_wait()? {
                bail!("{cmd:?} exited ({status}) before mounting\n{}", d.log_tail());
            }
            if start.elapsed() > DEADLINE {
                bail!("{} not mounted {DEADLINE:?} after starting {cmd:?}\n{}", mnt.display(), d.log_tail());
            }
            sleep(Duration::from_millis(20));
        }
        d.conn = fuse_connection(mnt)?;
        Ok(d)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The number of descriptors it has open.
    pub fn fds(&self) -> Result<usize> {
        let dir = format!("/proc/{}/fd", self.pid());
        Ok(fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.count())
    }

    /// The descriptors it keeps once the kernel has forgotten every inode it could: after the
    /// reclaimable dentries and inodes are dropped, sampled until two samples agree.
    pub fn settled_fds(&self) -> Result<usize> {
        drop_dentries();
        let mut last = self.fds()?;
        for _ in 0..30 {
            sleep(Duration::from_millis(100));
            let now = self.fds()?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// Its resident memory in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).context("no VmRSS in /proc/PID/status")?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    }

    /// The last lines it wrote.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- {} ---\n{}", self.log.display(), lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// Kills it (so that operations stuck on the mount fail) and waits; aborts its FUSE
    /// connection if it does not die (a daemon thread waiting on its own mount cannot).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                eprintln!("the daemon is still there 5 s after SIGKILL: aborting its FUSE connection {}", self.conn);
                abort_connection(self.conn);
                let _ = self.child.wait();
                break;
            }
            sleep(Duration::from_millis(10));
        }
        let _ = crate::cmd::cmd("umount").arg("-l").arg(&self.mnt).succeeds();
    }

    /// Unmounts and waits until it exits cleanly.
    pub fn stop(mut self) -> Result<()> {
        let umount = std::process::Command::new("umount").arg(&self.mnt).output().context("running umount")?;
        if !umount.status.success() {
            bail!("umount {}: {}", self.mnt.display(), String::from_utf8_lossy(&umount.stderr).trim());
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the daemon exited with {status} after the unmount\n{}", self.log_tail());
                }
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                self.kill();
                bail!("the daemon was still running {DEADLINE:?} after the unmount\n{}", self.log_tail());
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Asks the kernel to drop reclaimable dentries and inodes (not the page cache), so that it
/// sends FORGET for every inode no one uses.
pub fn drop_dentries() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}

/// The name in `/sys/fs/fuse/connections` of the FUSE mount at `mnt`: its device number as the
/// kernel writes it (major << 20 | minor).
fn fuse_connection(mnt: &Path) -> Result<u64> {
    let dev = fs::metadata(mnt).with_context(|| format!("stat {}", mnt.display()))?.dev();
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    Ok((major << 20) | minor)
}

/// Aborts FUSE connection `conn` (mounting fusectl first if it is not).
fn abort_connection(conn: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    if !dir.join(conn.to_string()).exists() {
        let _ = crate::cmd::cmd("mount").args(["-t", "fusectl", "fusectl"]).arg(dir).succeeds();
    }
    if let Err(e) = fs::write(dir.join(conn.to_string()).join("abort"), "1") {
        eprintln!("aborting FUSE connection {conn}: {e}");
    }
}
