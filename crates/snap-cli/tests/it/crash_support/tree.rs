//! Trees for the crash tests: building LIVE, random changes through the mount, and the model of
//! a planned sequence of changes (the tree after each step).

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};

use super::io_step;
use crate::common::*;

/// The umask of this process (new objects get `mode & !umask`).
pub fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).expect("a Umask line");
    u32::from_str_radix(line.trim(), 8).expect("an octal umask")
}

pub fn bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// `len` bytes in which every 4 KiB block starts with its offset (a misplaced block shows).
pub fn big_data(len: usize, rng: &mut StdRng) -> Vec<u8> {
    let block = bytes(rng, 1 << 20);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(block.len());
        out.extend_from_slice(&block[..n]);
    }
    for off in (0..len).step_by(4096) {
        let stamp = (off as u64).to_le_bytes();
        let end = (off + 8).min(len);
        out[off..end].copy_from_slice(&stamp[..end - off]);
    }
    out
}

pub fn xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {}: {e}", p.display()));
}

/// `dirs` directories (up to three deep) with `files` small files each, modes and `user.*`
/// xattrs, a symlink and a hard link pair.
pub fn build_tree(root: &Path, rng: &mut StdRng, dirs: usize, files: usize) {
    let mut made: Vec<PathBuf> = vec![PathBuf::new()];
    for i in 0..dirs {
        let parent = made.choose(rng).unwrap().clone();
        let d = if parent.components().count() >= 2 {
            PathBuf::from(format!("d{i}"))
        } else {
            parent.join(format!("d{i}"))
        };
        fs::create_dir(root.join(&d)).unwrap();
        if rng.random_bool(0.3) {
            xattr(&root.join(&d), "user.dir", format!("dir {i}").as_bytes());
        }
        made.push(d);
    }
    for (i, d) in made.iter().enumerate() {
        for j in 0..files {
            let p = root.join(d).join(format!("f{j}"));
            let len =
                if rng.random_ratio(1, 10) { rng.random_range(20_000..200_000) } else { rng.random_range(0..4000) };
            fs::write(&p, bytes(rng, len)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(*[0o644, 0o600, 0o755].choose(rng).unwrap())).unwrap();
            if rng.random_bool(0.2) {
                xattr(&p, "user.k", format!("{i}.{j}").as_bytes());
            }
        }
    }
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
    fs::write(root.join("hl1"), b"hard linked\n").unwrap();
    fs::hard_link(root.join("hl1"), root.join(&made[made.len() - 1]).join("hl2")).unwrap();
}

/// `n` random changes through `mnt`, errors ignored (an earlier change may have removed the
/// target), leaving the files named `big*` at the root alone: rewrites, appends, truncates, removals, new files and dirs, chmod, xattrs, renames
/// of files and dirs and `rm -rf` of dirs.
pub fn churn(mnt: &Path, rng: &mut StdRng, n: usize) {
    let all = list_kinds(mnt);
    let mine = |p: &Path| p.as_os_str().as_encoded_bytes().starts_with(b"big");
    let files: Vec<&PathBuf> = all.iter().filter(|(p, k)| *k == Kind::File && !mine(p)).map(|(p, _)| p).collect();
    let mut dirs: Vec<PathBuf> = all.iter().filter(|(_, k)| *k == Kind::Dir).map(|(p, _)| p.clone()).collect();
    dirs.push(PathBuf::new());
    if files.is_empty() {
        return;
    }
    for i in 0..n {
        let f = mnt.join(files.choose(rng).unwrap());
        let d = mnt.join(dirs.choose(rng).unwrap());
        let new = d.join(format!("c{i}.{}", rng.random_range(0..1000)));
        let _ = match rng.random_range(0..100) {
            0..25 => OpenOptions::new().write(true).open(&f).and_then(|h| h.write_all_at(&bytes(rng, 500), 100)),
            25..35 => OpenOptions::new().append(true).open(&f).and_then(|mut h| h.write_all(b"appended")),
            35..40 => OpenOptions::new().write(true).open(&f).and_then(|h| h.set_len(10)),
            40..55 => fs::remove_file(&f),
            55..70 => fs::write(&new, bytes(rng, 300)),
            70..75 => fs::create_dir(&new),
            75..80 => fs::set_permissions(&f, fs::Permissions::from_mode(0o640)),
            80..85 => {
                rustix::fs::lsetxattr(&f, "user.churn", b"x", rustix::fs::XattrFlags::empty()).map_err(Into::into)
            }
            85..90 => fs::rename(&f, &new),
            90..97 if d != mnt => fs::rename(&d, d.with_file_name(format!("r{i}"))),
            _ if d != mnt && rng.random_bool(0.5) => fs::remove_dir_all(&d),
            _ => Ok(()),
        };
    }
}

/// [`record_tree`] without link counts and hard-link groups: the crash tests model each change
/// without following links, and judge atomicity; `hardlinks.rs` and the model test judge links.
pub fn record_unlinked(root: &Path) -> Tree {
    unlinked(&record_tree(root))
}

/// [`record_entry`] without link count and group.
pub fn record_entry_unlinked(path: &Path) -> std::io::Result<Entry> {
    Ok(Entry { nlink: None, group: None, ..record_entry(path)? })
}

/// `tree` without link counts and hard-link groups.
pub fn unlinked(tree: &Tree) -> Tree {
    tree.iter().map(|(p, e)| (p.clone(), Entry { nlink: None, group: None, ..e.clone() })).collect()
}

/// `tree` with the subtree at `from` moved to `to`.
pub fn moved(tree: &Tree, from: &Path, to: &Path) -> Tree {
    tree.iter()
        .map(|(p, e)| match p.strip_prefix(from) {
            Ok(rest) if !p.as_os_str().is_empty() => (to.join(rest), e.clone()),
            _ => (p.clone(), e.clone()),
        })
        .collect()
}

/// A new file's, dir's or symlink's entry as [`record_tree`] records it.
pub fn new_entry(kind: Kind, data: Option<Vec<u8>>, target: Option<&str>) -> Entry {
    let mode = match kind {
        Kind::File => 0o644 & !umask(),
        Kind::Dir => 0o755 & !umask(),
        _ => 0o777,
    };
    let nlink = (kind != Kind::Dir).then_some(1);
    Entry { kind, mode, data, target: target.map(OsString::from), xattrs: Vec::new(), nlink, group: None }
}

/// One change of a planned sequence: one syscall that changes the tree (and opens and closes).
#[derive(Clone)]
pub enum Change {
    /// `unlink`.
    Unlink(PathBuf),
    /// `rmdir`.
    Rmdir(PathBuf),
    /// `open(O_CREAT | O_EXCL)` of an empty file.
    Create(PathBuf),
    /// `write` to a file (new here, so the snapshot has nothing to save).
    Write(PathBuf, Vec<u8>),
    /// `mkdir` (mode 0755).
    Mkdir(PathBuf),
    /// `symlink(target, path)`.
    Symlink(PathBuf, String),
    /// `rename(from, to)`.
    Rename(PathBuf, PathBuf),
}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Unlink(p) => write!(f, "unlink {}", p.display()),
            Change::Rmdir(p) => write!(f, "rmdir {}", p.display()),
            Change::Create(p) => write!(f, "create {}", p.display()),
            Change::Write(p, d) => write!(f, "write {} bytes to {}", d.len(), p.display()),
            Change::Mkdir(p) => write!(f, "mkdir {}", p.display()),
            Change::Symlink(p, t) => write!(f, "symlink {} -> {t}", p.display()),
            Change::Rename(a, b) => write!(f, "mv {} {}", a.display(), b.display()),
        }
    }
}

impl Change {
    /// Makes the change under `root`.
    pub fn apply(&self, root: &Path) -> std::io::Result<()> {
        let p = |rel: &Path| root.join(rel);
        match self {
            Change::Unlink(path) => fs::remove_file(p(path)),
            Change::Rmdir(path) => fs::remove_dir(p(path)),
            Change::Create(path) => OpenOptions::new().write(true).create_new(true).mode(0o644).open(p(path)).map(drop),
            Change::Write(path, data) => OpenOptions::new().write(true).open(p(path))?.write_all(data),
            Change::Mkdir(path) => fs::DirBuilder::new().mode(0o755).create(p(path)),
            Change::Symlink(path, target) => std::os::unix::fs::symlink(target, p(path)),
            Change::Rename(from, to) => fs::rename(p(from), p(to)),
        }
    }

    /// The tree after the change.
    pub fn model(&self, tree: &Tree) -> Tree {
        let mut t = tree.clone();
        match self {
            Change::Unlink(path) | Change::Rmdir(path) => {
                t.remove(path);
            }
            Change::Create(path) => {
                t.insert(path.clone(), new_entry(Kind::File, Some(Vec::new()), None));
            }
            Change::Write(path, data) => {
                t.get_mut(path).expect("written file in the model").data = Some(data.clone());
            }
            Change::Mkdir(path) => {
                t.insert(path.clone(), new_entry(Kind::Dir, None, None));
            }
            Change::Symlink(path, target) => {
                t.insert(path.clone(), new_entry(Kind::Symlink, None, Some(target)));
            }
            Change::Rename(from, to) => t = moved(&t, from, to),
        }
        t
    }
}

/// Runs `plan` under `mnt` in order, counting the changes that returned; stops at the first error.
pub fn run_plan(mnt: PathBuf, plan: Vec<Change>) -> impl FnOnce(&AtomicUsize) -> Result<(), String> + Send + 'static {
    move |done| {
        for c in &plan {
            io_step(done, &format!("{c:?}"), c.apply(&mnt))?;
        }
        Ok(())
    }
}

/// The states of `before` after each change of `plan` (`before` first).
pub fn states_of(before: &Tree, plan: &[Change]) -> Vec<Tree> {
    let mut states = vec![before.clone()];
    for c in plan {
        let next = c.model(states.last().unwrap());
        states.push(next);
    }
    states
}

/// The dirs of a tree (the root as `""` included) and its other objects.
pub fn split_kinds(tree: &Tree) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let dirs = tree.iter().filter(|(_, e)| e.kind == Kind::Dir).map(|(p, _)| p.clone()).collect();
    let others = tree.iter().filter(|(_, e)| e.kind != Kind::Dir).map(|(p, _)| p.clone()).collect();
    (dirs, others)
}

/// `tree` with the place of the dir at `at` taken by the tree `sub`.
pub fn graft(tree: &Tree, at: &Path, sub: &Tree) -> Tree {
    let mut t: Tree = tree.iter().filter(|(p, _)| !p.starts_with(at)).map(|(p, e)| (p.clone(), e.clone())).collect();
    t.extend(sub.iter().map(|(p, e)| (at.join(p), e.clone())));
    t
}

/// `tree` without the receive stages at its top (`.ovlsnap-receive.*`), and their names.
pub fn without_stages(tree: &Tree) -> (Tree, Vec<PathBuf>) {
    let stage = |p: &Path| {
        p.components().next().is_some_and(|c| c.as_os_str().as_encoded_bytes().starts_with(b".ovlsnap-receive."))
    };
    let stages = tree.keys().filter(|p| p.components().count() == 1 && stage(p)).cloned().collect();
    (tree.iter().filter(|(p, _)| !stage(p)).map(|(p, e)| (p.clone(), e.clone())).collect(), stages)
}

/// The paths in `tree` whose name is one of restore's temporary names (`.ovlsnap-restore.*`).
pub fn restore_temps(tree: &Tree) -> Vec<PathBuf> {
    let temp = |p: &Path| p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b".ovlsnap-restore."));
    tree.keys().filter(|p| temp(p)).cloned().collect()
}

/// The receive stage dirs (`.ovlsnap-receive.*`) in `dir`.
pub fn stages_in(dir: &Path) -> Vec<String> {
    names_in(dir).into_iter().filter(|n| n.starts_with(".ovlsnap-receive.")).collect()
}

/// The objects of `live` (outside restore's temporary names) that are in none of `trees` under
/// any name: half-made ones (data cut short, mode or xattrs not set yet).
pub fn half_made(live: &Tree, trees: &[&Tree]) -> Vec<String> {
    let temp = |p: &Path| p.iter().any(|c| c.as_encoded_bytes().starts_with(b".ovlsnap-restore."));
    let known: Vec<&Entry> = trees.iter().flat_map(|t| t.values()).collect();
    live.iter()
        .filter(|(p, e)| !temp(p) && !known.contains(e))
        .map(|(p, e)| format!("/{}: {e:?}", p.display()))
        .collect()
}
