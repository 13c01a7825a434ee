//! The sample layers that `mount` and `demo` use: two lower layers with a merged directory, a file that
//! shadows another, and a whiteout; an empty upper and work dir; a mount point.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::cmd;

/// What one sample entry is.
enum Node {
    Dir,
    File(&'static str),
    /// A character device 0:0: the overlay's mark that a name in a lower layer is deleted.
    Whiteout,
}

/// The sample, bottom layer first (parents before children): (layer, path, node).
const LAYOUT: &[(&str, &str, Node)] = &[
    ("lower2", "README.txt", Node::File("This README comes from lower2, the bottom layer.\n")),
    ("lower2", "docs", Node::Dir),
    ("lower2", "docs/guide.txt", Node::File("A guide that lives in lower2.\n")),
    ("lower2", "shared", Node::Dir),
    ("lower2", "shared/both.txt", Node::File("lower2's both.txt: hidden, lower1 has one too.\n")),
    ("lower2", "shared/from-lower2.txt", Node::File("Only lower2 has this file.\n")),
    ("lower2", "secret.txt", Node::File("lower2 has this file, but a whiteout in lower1 hides it.\n")),
    ("lower1", "notes.txt", Node::File("Only lower1 has this file.\n")),
    ("lower1", "shared", Node::Dir),
    ("lower1", "shared/both.txt", Node::File("lower1's both.txt: the higher layer wins.\n")),
    ("lower1", "shared/from-lower1.txt", Node::File("Only lower1 has this file.\n")),
    ("lower1", "secret.txt", Node::Whiteout),
];

/// The merged view of the sample: every path a correct overlay shows, directories with a trailing `/`.
pub const MERGED: &[&str] = &[
    "README.txt",
    "docs/",
    "docs/guide.txt",
    "notes.txt",
    "shared/",
    "shared/both.txt",
    "shared/from-lower1.txt",
    "shared/from-lower2.txt",
];

/// The directories of one sample under a root directory.
pub struct Sample {
    /// The directory holding everything below.
    pub root: PathBuf,
    /// The top lower layer.
    pub lower1: PathBuf,
    /// The bottom lower layer.
    pub lower2: PathBuf,
    /// The upper layer, empty at first.
    pub upper: PathBuf,
    /// The work dir, empty at first.
    pub work: PathBuf,
    /// The mount point.
    pub mnt: PathBuf,
}

impl Sample {
    /// The sample's paths under `root` (made absolute: ovlfs daemonizes and may change directory).
    pub fn at(root: &Path) -> Result<Sample> {
        let root = std::path::absolute(root).with_context(|| format!("making {} absolute", root.display()))?;
        // Both the kernel's option parser and ours split on these; escaping them is not worth it here.
        if root.to_string_lossy().contains([',', ':', '\\']) {
            bail!("the sample directory may not contain ',', ':' or '\\': {}", root.display());
        }
        Ok(Sample {
            lower1: root.join("lower1"),
            lower2: root.join("lower2"),
            upper: root.join("upper"),
            work: root.join("work"),
            mnt: root.join("mnt"),
            root,
        })
    }

    /// Creates the layers afresh (replacing any earlier ones) and the mount point.
    pub fn create(&self) -> Result<()> {
        for dir in [&self.lower1, &self.lower2, &self.upper, &self.work] {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing old {}", dir.display()))?;
            }
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::create_dir_all(&self.mnt).with_context(|| format!("creating {}", self.mnt.display()))?;
        for (layer, path, node) in LAYOUT {
            let path = self.root.join(layer).join(path);
            let made = match node {
                Node::Dir => fs::create_dir(&path),
                Node::File(text) => fs::write(&path, text),
                Node::Whiteout => {
                    // std has no mknod; the tool is in coreutils. Unprivileged since Linux 5.8 for 0:0.
                    cmd("mknod").arg(&path).args(["c", "0", "0"]).run_quiet()?;
                    Ok(())
                }
            };
            made.with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(())
    }

    /// `-o` options mounting the sample with `workdir`.
    pub fn options(&self, workdir: &Path) -> String {
        format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            self.lower1.display(),
            self.lower2.display(),
            self.upper.display(),
            workdir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_list_the_top_lower_layer_first() -> Result<()> {
        let sample = Sample::at(Path::new("/tmp/demo"))?;
        assert_eq!(
            sample.options(&sample.work),
            "lowerdir=/tmp/demo/lower1:/tmp/demo/lower2,upperdir=/tmp/demo/upper,workdir=/tmp/demo/work"
        );
        Ok(())
    }

    #[test]
    fn directories_that_would_break_the_options_are_refused() {
        assert!(Sample::at(Path::new("/tmp/a,b")).is_err());
        assert!(Sample::at(Path::new("/tmp/a:b")).is_err());
    }

    #[test]
    fn creates_the_layers_with_a_whiteout() -> Result<()> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};

        let root = std::env::temp_dir().join(format!("xtask-sample-test-{}", std::process::id()));
        let sample = Sample::at(&root)?;
        let created = sample.create();
        let whiteout = fs::symlink_metadata(sample.lower1.join("secret.txt"));
        let both = fs::read_to_string(sample.lower1.join("shared/both.txt"));
        let upper_empty = fs::read_dir(&sample.upper).map(|entries| entries.count() == 0);
        fs::remove_dir_all(&root)?;
        created?;
        let whiteout = whiteout?;
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
        assert!(both?.starts_with("lower1"));
        assert!(upper_empty?);
        Ok(())
    }
}
