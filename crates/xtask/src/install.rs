//! `cargo xtask install`: release binaries into `PREFIX/bin`.
//!
//! `mount -t fuse.ovlfs` goes through mount.fuse3 (from the fuse3 package), which runs `ovlfs` by name with
//! a minimal `PATH`; the default prefix `/usr/local` puts it where that lookup finds it, so no
//! `mount.fuse.ovlfs` helper of our own is needed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, header};

/// The binaries we install: (file name, whether the build must have produced it).
const BINARIES: &[(&str, bool)] = &[("ovlfs", true), ("ovlsnap", false)];

/// Builds the release binaries and copies them into `prefix/bin`.
pub fn run(prefix: &Path) -> Result<()> {
    header("building release binaries");
    cargo().args(["build", "--release", "-p", "ovl-fs", "-p", "snap-cli"]).run()?;

    header(&format!("installing into {}", prefix.join("bin").display()));
    let release = crate::target_dir().join("release");
    let bin = prefix.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let mut installed = Vec::new();
    for &(name, required) in BINARIES {
        let built = release.join(name);
        if !built.is_file() {
            if required {
                bail!("the build produced no {}", built.display());
            }
            println!("skipped {name}: not built yet");
            continue;
        }
        let dest = bin.join(name);
        install_file(&built, &dest)?;
        installed.push(dest);
    }
    println!("installed:");
    for path in &installed {
        println!("  {}", path.display());
    }
    Ok(())
}

/// Copies `src` to `dest` with mode 0755 through a temporary name, so a running `dest` is replaced rather
/// than overwritten in place (which fails with ETXTBSY, or corrupts a process that pages it in later).
fn install_file(src: &Path, dest: &Path) -> Result<()> {
    let name = dest.file_name().context("destination has no file name")?;
    let temp = dest.with_file_name(format!(".{}.xtask-install", name.to_string_lossy()));
    fs::copy(src, &temp).with_context(|| format!("copying {} to {}", src.display(), temp.display()))?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", temp.display()))?;
    fs::rename(&temp, dest).with_context(|| format!("renaming {} to {}", temp.display(), dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_file_replaces_the_destination_and_makes_it_executable() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-install-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let src = dir.join("built");
        let dest = dir.join("ovlfs");
        fs::write(&src, "new")?;
        fs::write(&dest, "old")?;
        install_file(&src, &dest)?;
        let contents = fs::read_to_string(&dest)?;
        let mode = fs::metadata(&dest)?.permissions().mode() & 0o777;
        let leftovers = fs::read_dir(&dir)?.count();
        fs::remove_dir_all(&dir)?;
        assert_eq!(contents, "new");
        assert_eq!(mode, 0o755);
        assert_eq!(leftovers, 2, "no temporary file may be left behind");
        Ok(())
    }
}
