//! Can this machine run the test suite? Checks root, the tools the tests shell out to, `/dev/fuse` and the
//! kernel's overlay filesystem (the tests' oracle), and fixes what it can.
//!
//! Missing tools are installed with apt-get when we are root (one `apt-get update`, only if something is
//! missing); otherwise we print the exact command and fail, because silently skipping tests that need a
//! tool would turn a red suite green.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::cmd;

/// A program the tests need and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The program's file name, looked up in `PATH` and the sbin directories.
    pub name: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
}

/// What the test suite runs besides cargo.
pub const TOOLS: &[Tool] = &[
    Tool { name: "fusermount3", package: "fuse3" },
    Tool { name: "mkfs.xfs", package: "xfsprogs" },
    Tool { name: "mkfs.btrfs", package: "btrfs-progs" },
    Tool { name: "getfattr", package: "attr" },
    Tool { name: "setfattr", package: "attr" },
    Tool { name: "fuse-overlayfs", package: "fuse-overlayfs" },
    // The security tests run fake daemons and connection floods as other users.
    Tool { name: "python3", package: "python3" },
    // The completion test runs zsh's own completion system on a pseudo-terminal.
    Tool { name: "zsh", package: "zsh" },
    // The podman end-to-end tests (issue 18): podman with its runtime, a static busybox for the
    // base image, and for rootless podman the ID-map helpers and the pause process.
    Tool { name: "podman", package: "podman" },
    Tool { name: "runc", package: "runc" },
    Tool { name: "busybox", package: "busybox-static" },
    Tool { name: "newuidmap", package: "uidmap" },
    Tool { name: "newgidmap", package: "uidmap" },
    Tool { name: "catatonit", package: "catatonit" },
    // The registry tests (issue 22): a registry on loopback, and skopeo to read what it holds.
    Tool { name: "docker-registry", package: "docker-registry" },
    Tool { name: "skopeo", package: "skopeo" },
];

/// Checks everything and installs what is missing when we may. Warns, without failing, when not root.
pub fn check() -> Result<()> {
    let root = is_root()?;
    if !root {
        println!(
            "warning: not running as root; the mount tests need root (CAP_SYS_ADMIN, trusted.* xattrs) \
             and will fail"
        );
    }
    let mut apt = Apt::default();
    ensure_tools(root, &mut apt)?;
    ensure_fuse_device(root)?;
    ensure_overlay(root)?;
    report_disk();
    Ok(())
}

/// Prints the free space where the tests write (the temp dir) and build (here): a test that
/// fails with ENOSPC on a small machine is then read for what it is.
fn report_disk() {
    let tmp = std::env::temp_dir();
    match std::process::Command::new("df").arg("-h").arg(&tmp).arg(".").output() {
        Ok(out) if out.status.success() => {
            print!("disk space (temp dir, then build dir):\n{}", String::from_utf8_lossy(&out.stdout))
        }
        _ => println!("note: could not run `df -h {}`", tmp.display()),
    }
}

/// Whether our effective uid is 0, read from `/proc/self/status` (no libc needed).
pub fn is_root() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = parse_euid(&status).context("no Uid line in /proc/self/status")?;
    Ok(euid == 0)
}

/// The effective uid from the text of `/proc/PID/status` (`Uid: real effective saved fs`).
fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn ensure_tools(root: bool, apt: &mut Apt) -> Result<()> {
    let missing = missing_tools(TOOLS, &search_dirs());
    if missing.is_empty() {
        let names: Vec<_> = TOOLS.iter().map(|tool| tool.name).collect();
        println!("tools: all present ({})", names.join(", "));
        return Ok(());
    }
    let names: Vec<_> = missing.iter().map(|tool| tool.name).collect();
    let packages = packages_for(&missing);
    println!("tools: missing {} (from packages {})", names.join(", "), packages.join(" "));
    if !root {
        println!("install them as root, then run this again:");
        println!("  sudo apt-get update");
        println!("  sudo {}", install_command(&packages));
        bail!("missing tools: {}", names.join(", "));
    }
    apt.install(&packages)?;
    let still_missing = missing_tools(TOOLS, &search_dirs());
    if !still_missing.is_empty() {
        let names: Vec<_> = still_missing.iter().map(|tool| tool.name).collect();
        bail!("still missing after apt-get install: {}", names.join(", "));
    }
    Ok(())
}

fn ensure_fuse_device(root: bool) -> Result<()> {
    let device = Path::new("/dev/fuse");
    if !device.exists() && root {
        println!("/dev/fuse is missing; trying to load the fuse module");
        // Failure is reported by the check below, with advice.
        let _ = cmd("modprobe").arg("fuse").run();
    }
    if !device.exists() {
        bail!(
            "/dev/fuse does not exist: load the module as root (`modprobe fuse`), or in a container pass \
             the device in (e.g. `--device /dev/fuse`)"
        );
    }
    println!("fuse: /dev/fuse present");
    Ok(())
}

fn ensure_overlay(root: bool) -> Result<()> {
    if !kernel_has_overlay()? {
        if !root {
            bail!("the kernel has no overlay filesystem loaded: run `modprobe overlay` as root");
        }
        println!("overlay is not in /proc/filesystems; trying to load the module");
        let _ = cmd("modprobe").arg("overlay").run();
        if !kernel_has_overlay()? {
            bail!("the kernel does not support overlay (not in /proc/filesystems after `modprobe overlay`)");
        }
    }
    println!("kernel: overlay supported");
    Ok(())
}

fn kernel_has_overlay() -> Result<bool> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").context("reading /proc/filesystems")?;
    Ok(lists_filesystem(&filesystems, "overlay"))
}

/// Whether `/proc/filesystems` text (`[nodev]<TAB>name` per line) lists `name`.
fn lists_filesystem(filesystems: &str, name: &str) -> bool {
    filesystems.lines().any(|line| line.split_whitespace().last() == Some(name))
}

/// `name` as an executable in `PATH` or an sbin directory.
pub fn find(name: &str) -> Option<PathBuf> {
    find_executable(name, &search_dirs())
}

/// Whether `name` is an executable in `PATH` or an sbin directory.
pub fn installed(name: &str) -> bool {
    find(name).is_some()
}

/// Where to look for tools: `PATH`, then the sbin directories, which a non-root `PATH` often lacks.
fn search_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|dir| dir == Path::new(sbin)) {
            dirs.push(PathBuf::from(sbin));
        }
    }
    dirs
}

/// The tools of `tools` that are not an executable file in any of `dirs`.
fn missing_tools<'a>(tools: &'a [Tool], dirs: &[PathBuf]) -> Vec<&'a Tool> {
    tools.iter().filter(|tool| find_executable(tool.name, dirs).is_none()).collect()
}

fn find_executable(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|dir| dir.join(name)).find(|candidate| {
        std::fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// The packages that provide `tools`, each once, sorted.
fn packages_for(tools: &[&Tool]) -> Vec<&'static str> {
    let packages: BTreeSet<_> = tools.iter().map(|tool| tool.package).collect();
    packages.into_iter().collect()
}

fn install_command(packages: &[&str]) -> String {
    format!("DEBIAN_FRONTEND=noninteractive apt-get install -y {}", packages.join(" "))
}

/// apt-get, updating its package lists at most once per run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        if find_executable("apt-get", &search_dirs()).is_none() {
            bail!("no apt-get here: install these packages with the system's package manager: {}", packages.join(" "));
        }
        if !self.updated {
            cmd("apt-get").arg("update").run()?;
            self.updated = true;
        }
        cmd("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y"]).args(packages).run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_does_not_exist_is_reported_missing_with_its_package() {
        let fake = Tool { name: "xtask-no-such-tool-5c1e", package: "xtask-fake-package" };
        let real = Tool { name: "sh", package: "dash" };
        let tools = [real, fake];
        let missing = missing_tools(&tools, &search_dirs());
        assert_eq!(missing, [&fake]);
        assert_eq!(packages_for(&missing), ["xtask-fake-package"]);
        assert_eq!(
            install_command(&packages_for(&missing)),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y xtask-fake-package"
        );
    }

    #[test]
    fn a_tool_is_found_only_in_the_directories_given() {
        let sh = Tool { name: "sh", package: "dash" };
        assert_eq!(missing_tools(&[sh], &[PathBuf::from("/nonexistent")]), [&sh]);
    }

    #[test]
    fn packages_are_listed_once_each() {
        let getfattr = &TOOLS[3];
        let setfattr = &TOOLS[4];
        assert_eq!(packages_for(&[getfattr, setfattr, getfattr]), ["attr"]);
    }

    #[test]
    fn sbin_directories_are_searched_even_if_path_lacks_them() {
        let dirs = search_dirs();
        assert!(dirs.contains(&PathBuf::from("/usr/sbin")));
        assert!(dirs.contains(&PathBuf::from("/sbin")));
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcat\nUid:\t1000\t0\t1000\t1000\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Name:\tcat\n"), None);
    }

    #[test]
    fn filesystems_are_matched_by_whole_name() {
        let filesystems = "nodev\tsysfs\nnodev\toverlay\n\text4\nnodev\tfuse\n";
        assert!(lists_filesystem(filesystems, "overlay"));
        assert!(lists_filesystem(filesystems, "ext4"));
        assert!(!lists_filesystem(filesystems, "over"));
        assert!(!lists_filesystem("nodev\tfuseblk\n", "fuse"));
    }
}
