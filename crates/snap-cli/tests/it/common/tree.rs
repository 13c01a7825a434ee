//! Recording a directory tree (what a user can see of it) and comparing two recordings.
//!
//! A recording keeps, per path: the file type, the permission bits, a regular file's whole
//! content, a symlink's target, the xattrs other than `security.*`, and for a non-directory its
//! link count and which names in the tree are the same object (issue 16.4: hard links). It
//! leaves out times, inode numbers, owners and directory sizes and link counts (a merged
//! directory of an overlay has one link); see `record_meta` for owners and times.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Names that are never recorded at the root of a tree: the snapshot views and the default store.
pub const HIDDEN_AT_ROOT: [&str; 2] = [".snapshots", ".ovlsnap"];

/// The type of a filesystem object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Unix socket.
    Socket,
}

impl Kind {
    /// The kind of a `std` file type.
    pub fn of(t: fs::FileType) -> Kind {
        if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_char_device() {
            Kind::Char
        } else if t.is_block_device() {
            Kind::Block
        } else {
            Kind::Socket
        }
    }
}

/// One recorded object.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Object type.
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// A regular file's content.
    pub data: Option<Vec<u8>>,
    /// A symlink's target.
    pub target: Option<OsString>,
    /// Xattrs other than `security.*`, sorted by name.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
    /// A non-directory's link count.
    pub nlink: Option<u64>,
    /// For a non-directory with several links: the first path (in path order) of the recorded
    /// tree that is the same object (device and inode), so equal trees have equal link groups.
    pub group: Option<PathBuf>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {:o}", self.kind, self.mode)?;
        if let Some(d) = &self.data {
            write!(f, " {} bytes {:?}", d.len(), Show(&d[..d.len().min(24)]))?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if !self.xattrs.is_empty() {
            write!(f, " xattrs {}", show_xattrs(&self.xattrs))?;
        }
        if let Some(n) = self.nlink.filter(|n| *n != 1) {
            write!(f, " nlink {n}")?;
        }
        if let Some(g) = &self.group {
            write!(f, " same as /{}", g.display())?;
        }
        Ok(())
    }
}

/// A recorded tree: path relative to the root (`""` is the root itself) to entry.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Records the object at `path` (not following a final symlink).
pub fn record_entry(path: &Path) -> std::io::Result<Entry> {
    let m = fs::symlink_metadata(path)?;
    let kind = Kind::of(m.file_type());
    let data = if kind == Kind::File { Some(read_nofollow(path)?) } else { None };
    let target = if kind == Kind::Symlink { Some(fs::read_link(path)?.into_os_string()) } else { None };
    let nlink = (kind != Kind::Dir).then_some(m.nlink());
    Ok(Entry { kind, mode: m.mode() & 0o7777, data, target, xattrs: xattrs(path)?, nlink, group: None })
}

/// Walks `root` without following symlinks and records every object, `root` itself as `""`; the
/// names in [`HIDDEN_AT_ROOT`] are skipped at the root. Panics on any error, and if a listing
/// holds a name twice or gives a `d_type` that disagrees with `lstat`.
pub fn record_tree(root: &Path) -> Tree {
    record_tree_skipping(root, &[])
}

/// [`record_tree`], skipping also the names in `skip` at the root: files a daemon rewrites at any
/// time (a store's `seal` and `seal.tmp`), which could vanish between the listing and the record.
pub fn record_tree_skipping(root: &Path, skip: &[&str]) -> Tree {
    fn walk(root: &Path, rel: &Path, tree: &mut Tree, skip: &[&str]) {
        let dir = root.join(rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        for ent in rd {
            let ent = ent.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            if rel.as_os_str().is_empty() && HIDDEN_AT_ROOT.iter().chain(skip).any(|h| ent.file_name() == *h) {
                continue;
            }
            let rel = rel.join(ent.file_name());
            let path = root.join(&rel);
            let e = record_entry(&path).unwrap_or_else(|e| panic!("record {}: {e}", path.display()));
            let listed = Kind::of(ent.file_type().unwrap_or_else(|e| panic!("d_type of {}: {e}", path.display())));
            assert_eq!(listed, e.kind, "{}: readdir's d_type and lstat disagree", path.display());
            let is_dir = e.kind == Kind::Dir;
            assert!(tree.insert(rel.clone(), e).is_none(), "{} listed twice", path.display());
            if is_dir {
                walk(root, &rel, tree, skip);
            }
        }
    }
    let mut tree = Tree::new();
    tree.insert(PathBuf::new(), record_entry(root).unwrap_or_else(|e| panic!("record {}: {e}", root.display())));
    walk(root, Path::new(""), &mut tree, skip);
    set_groups(root, &mut tree);
    tree
}

/// Fills in [`Entry::group`] from the device and inode of each non-directory with several links.
fn set_groups(root: &Path, tree: &mut Tree) {
    let mut first: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for (p, e) in tree.iter_mut() {
        if e.kind == Kind::Dir || e.nlink.unwrap_or(1) < 2 {
            continue;
        }
        // Gone since the walk (a tree changing while it is recorded): no group to tell.
        let Ok(m) = fs::symlink_metadata(root.join(p)) else { continue };
        e.group = Some(first.entry((m.dev(), m.ino())).or_insert_with(|| p.clone()).clone());
    }
}

/// The inode number of every non-directory below `root` (the root and [`HIDDEN_AT_ROOT`] left
/// out).
pub fn inode_numbers(root: &Path) -> BTreeMap<PathBuf, u64> {
    list_kinds(root)
        .into_iter()
        .filter(|(_, k)| *k != Kind::Dir)
        .map(|(p, _)| {
            let ino =
                fs::symlink_metadata(root.join(&p)).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display())).ino();
            (p, ino)
        })
        .collect()
}

/// Owner, group and mtime (seconds, nanoseconds) of an object.
pub type Meta = (u32, u32, (i64, i64));

/// Owner, group and mtime of every object below `root`, the root included as `""`.
pub fn record_meta(root: &Path) -> BTreeMap<PathBuf, Meta> {
    paths_with_root(root)
        .into_iter()
        .map(|p| {
            let m = fs::symlink_metadata(root.join(&p)).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            (p, (m.uid(), m.gid(), (m.mtime(), m.mtime_nsec())))
        })
        .collect()
}

/// The root (`""`) and every path under it, as [`list_kinds`] lists them.
pub fn paths_with_root(root: &Path) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::new()];
    paths.extend(list_kinds(root).into_iter().map(|(p, _)| p));
    paths
}

/// Every path under `root` (relative, the root and [`HIDDEN_AT_ROOT`] left out) with its kind,
/// sorted so that parents come before their children; no contents are read.
pub fn list_kinds(root: &Path) -> Vec<(PathBuf, Kind)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Kind)>) {
        let dir = root.join(rel);
        for ent in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let ent = ent.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            if rel.as_os_str().is_empty() && HIDDEN_AT_ROOT.iter().any(|h| ent.file_name() == *h) {
                continue;
            }
            let rel = rel.join(ent.file_name());
            let kind = Kind::of(fs::symlink_metadata(root.join(&rel)).expect("lstat").file_type());
            out.push((rel.clone(), kind));
            if kind == Kind::Dir {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out.sort();
    out
}

/// A file's whole content, opened with `O_NOFOLLOW | O_NONBLOCK` (a fifo never blocks).
pub fn read_nofollow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// The xattrs of `path` (not following symlinks) other than `security.*`, sorted by name.
pub fn xattrs(path: &Path) -> std::io::Result<Vec<(OsString, Vec<u8>)>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty() && !n.starts_with(b"security.")) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        value.truncate(len);
        out.push((name.to_owned(), value));
    }
    out.sort();
    Ok(out)
}

/// Bytes shown as an escaped string.
struct Show<'a>(&'a [u8]);

impl fmt::Debug for Show<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: String = self.0.iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
        write!(f, "b\"{s}\"")
    }
}

fn show_xattrs(x: &[(OsString, Vec<u8>)]) -> String {
    let parts: Vec<String> = x.iter().map(|(n, v)| format!("{}={:?}", n.to_string_lossy(), Show(v))).collect();
    format!("[{}]", parts.join(", "))
}

/// How two entries at the same path differ, one phrase per field.
fn diff_entry(want: &Entry, got: &Entry) -> Vec<String> {
    let mut out = Vec::new();
    if want.kind != got.kind {
        out.push(format!("type: want {:?}, got {:?}", want.kind, got.kind));
    }
    if want.mode != got.mode {
        out.push(format!("mode: want {:o}, got {:o}", want.mode, got.mode));
    }
    if let (Some(w), Some(g)) = (&want.data, &got.data)
        && w != g
    {
        let at = w.iter().zip(g).position(|(a, b)| a != b).unwrap_or(w.len().min(g.len()));
        let around = |d: &[u8]| format!("{:?}", Show(&d[at.min(d.len())..(at + 16).min(d.len())])).to_string();
        out.push(format!(
            "content: want {} bytes, got {}; first difference at byte {at}: want {} got {}",
            w.len(),
            g.len(),
            around(w),
            around(g)
        ));
    }
    if want.target != got.target && want.kind == got.kind {
        out.push(format!("symlink target: want {:?}, got {:?}", want.target, got.target));
    }
    if want.xattrs != got.xattrs {
        out.push(format!("xattrs: want {}, got {}", show_xattrs(&want.xattrs), show_xattrs(&got.xattrs)));
    }
    if want.nlink != got.nlink && want.kind == got.kind {
        out.push(format!("link count: want {:?}, got {:?}", want.nlink, got.nlink));
    }
    if want.group != got.group {
        out.push(format!("hard-link group: want {:?}, got {:?}", want.group, got.group));
    }
    out
}

/// Every difference between two recordings, one line each, in path order.
pub fn diff_trees(want: &Tree, got: &Tree) -> Vec<String> {
    let show = |p: &Path| format!("/{}", p.display());
    let mut out = Vec::new();
    let mut paths: Vec<&PathBuf> = want.keys().chain(got.keys()).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        match (want.get(p), got.get(p)) {
            (Some(w), None) => out.push(format!("missing    {}: {w:?}", show(p))),
            (None, Some(g)) => out.push(format!("unexpected {}: {g:?}", show(p))),
            (Some(w), Some(g)) => {
                out.extend(diff_entry(w, g).into_iter().map(|d| format!("differs    {}: {d}", show(p))))
            }
            (None, None) => {}
        }
    }
    out
}

/// Panics unless `actual` equals `expected`, listing the first 20 differences under `context`.
pub fn assert_same_tree(expected: &Tree, actual: &Tree, context: &str) {
    let diffs = diff_trees(expected, actual);
    if diffs.is_empty() {
        return;
    }
    let mut msg = format!("{context}: {} difference(s) from the expected tree\n", diffs.len());
    for d in diffs.iter().take(20) {
        msg.push_str("  ");
        msg.push_str(d);
        msg.push('\n');
    }
    if diffs.len() > 20 {
        msg.push_str(&format!("  ... and {} more\n", diffs.len() - 20));
    }
    panic!("{msg}");
}
