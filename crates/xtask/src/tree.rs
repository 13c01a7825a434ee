//! A directory tree read into memory (type, permissions, owner, contents), to compare what two mounts show.
//! Times, inode numbers and link counts are left out: they legitimately differ between two mounts.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};

/// What a path holds, as far as a user reading the tree can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(std::ffi::OsString),
    Device { char: bool, rdev: u64 },
    Fifo,
    Socket,
}

/// Every entry below a directory, keyed by relative path; directories end in `/`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// Reads everything below `root` (not `root` itself).
    pub fn read(root: &Path) -> Result<Tree> {
        let mut tree = Tree::default();
        tree.read_dir(root, "")?;
        Ok(tree)
    }

    fn read_dir(&mut self, dir: &Path, prefix: &str) -> Result<()> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            names.push(entry.with_context(|| format!("listing {}", dir.display()))?.file_name());
        }
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                Kind::Dir
            } else if file_type.is_file() {
                Kind::File(fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
            } else if file_type.is_symlink() {
                Kind::Symlink(fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?.into())
            } else if file_type.is_char_device() || file_type.is_block_device() {
                Kind::Device { char: file_type.is_char_device(), rdev: meta.rdev() }
            } else if file_type.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let is_dir = kind == Kind::Dir;
            let entry = Entry { kind, mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid() };
            let key = format!("{prefix}{}{}", name.to_string_lossy(), if is_dir { "/" } else { "" });
            self.entries.insert(key.clone(), entry);
            if is_dir {
                self.read_dir(&path, &key)?;
            }
        }
        Ok(())
    }

    /// The paths in the tree, sorted; directories end in `/`.
    pub fn paths(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// How many entries the tree holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// One line per path that differs between `self` (called `ours`) and `theirs`.
    pub fn differences(&self, ours: &str, other: &Tree, theirs: &str) -> Vec<String> {
        let mut lines = Vec::new();
        for (path, entry) in &self.entries {
            match other.entries.get(path) {
                None => lines.push(format!("only in {ours}: {path}")),
                Some(theirs_entry) if theirs_entry != entry => {
                    lines.push(format!("{path}: {ours} has {entry}, {theirs} has {theirs_entry}"));
                }
                Some(_) => {}
            }
        }
        for path in other.entries.keys().filter(|path| !self.entries.contains_key(*path)) {
            lines.push(format!("only in {theirs}: {path}"));
        }
        lines
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Dir => write!(f, "a dir")?,
            Kind::File(data) => write!(f, "a file of {} bytes {:?}", data.len(), String::from_utf8_lossy(data))?,
            Kind::Symlink(target) => write!(f, "a symlink to {target:?}")?,
            Kind::Device { char, rdev } => {
                write!(f, "a {} device {rdev:#x}", if *char { "char" } else { "block" })?;
            }
            Kind::Fifo => write!(f, "a fifo")?,
            Kind::Socket => write!(f, "a socket")?,
        }
        write!(f, " (mode {:04o}, owner {}:{})", self.mode, self.uid, self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_tree_and_reports_differences() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-tree-test-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        for side in [&a, &b] {
            fs::create_dir_all(side.join("dir"))?;
            fs::write(side.join("dir/same.txt"), "same")?;
        }
        fs::write(a.join("changed.txt"), "one")?;
        fs::write(b.join("changed.txt"), "two")?;
        fs::write(a.join("only-a"), "")?;
        let (tree_a, tree_b) = (Tree::read(&a), Tree::read(&b));
        fs::remove_dir_all(&root)?;
        let (tree_a, tree_b) = (tree_a?, tree_b?);

        assert_eq!(tree_b.paths(), ["changed.txt", "dir/", "dir/same.txt"]);
        let diff = tree_a.differences("a", &tree_b, "b");
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("changed.txt: a has a file of 3 bytes \"one\""), "{diff:?}");
        assert_eq!(diff[1], "only in a: only-a");
        assert!(tree_b.differences("b", &tree_b, "b").is_empty());
        Ok(())
    }
}
