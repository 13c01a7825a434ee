//! Recording a mounted view or an upper dir, and comparing two recordings.

use super::*;

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// The type of a filesystem object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device (a whiteout when 0:0 in a layer).
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

/// Every path under `root` (relative, `root` itself excluded) with its kind from `d_type`, without
/// following symlinks or reading contents; sorted so that parents come before their children.
pub fn list_tree(root: &Path) -> Vec<(PathBuf, Kind)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Kind)>) {
        let dir = root.join(rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        for ent in rd {
            let ent = ent.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            let kind = Kind::of(ent.file_type().expect("d_type"));
            let rel = rel.join(ent.file_name());
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

/// One object of a mounted view, as [`snapshot_tree`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Object type.
    pub kind: Kind,
    /// Permission bits including set-id and sticky (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size; 0 for directories (their size is a property of the backing fs).
    pub size: u64,
    /// FNV-1a hash of a regular file's content.
    pub hash: Option<u64>,
    /// A symlink's target.
    pub target: Option<OsString>,
    /// Major and minor of a device.
    pub rdev: Option<(u32, u32)>,
    /// `user.*` and `trusted.*` xattrs with values, sorted by name.
    pub xattrs: Vec<(OsString, Bytes)>,
    /// Link count of a non-directory.
    pub nlink: Option<u64>,
    /// Modification time (seconds, nanoseconds); compared only when old (see module docs).
    pub mtime: (i64, i64),
}

impl Entry {
    /// Records the object at `path` (not following a final symlink).
    pub fn of(path: &Path) -> std::io::Result<Entry> {
        let m = fs::symlink_metadata(path)?;
        let kind = Kind::of(m.file_type());
        let dev = matches!(kind, Kind::Char | Kind::Block);
        Ok(Entry {
            kind,
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if kind == Kind::Dir { 0 } else { m.size() },
            hash: if kind == Kind::File { Some(hash_file(path)?) } else { None },
            target: if kind == Kind::Symlink { Some(fs::read_link(path)?.into_os_string()) } else { None },
            rdev: dev.then(|| (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()))),
            xattrs: xattrs(path, |n| n.starts_with(b"user.") || n.starts_with(b"trusted."))?,
            nlink: (kind != Kind::Dir).then_some(m.nlink()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    /// Field-by-field differences to `other`; mtimes count only if either is old.
    pub fn diff(&self, other: &Entry) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out.push(format!("{}: {:?} != {:?}", stringify!($f), self.$f, other.$f));
                }
            )*};
        }
        field!(kind, uid, gid, size, hash, target, rdev, xattrs, nlink);
        if self.perm != other.perm {
            out.push(format!("perm: {:o} != {:o}", self.perm, other.perm));
        }
        let old = self.mtime.0 < OLD_TIME_CUTOFF || other.mtime.0 < OLD_TIME_CUTOFF;
        if old && self.mtime != other.mtime {
            out.push(format!("mtime: {:?} != {:?}", self.mtime, other.mtime));
        }
        out
    }
}

/// A mounted view: relative path (`""` is the root) to entry.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Walks a mounted view with `lstat` (never following symlinks) and records every object.
pub fn snapshot_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let rec =
        |p: &Path| Entry::of(&root.join(p)).unwrap_or_else(|e| panic!("snapshot {}: {e}", root.join(p).display()));
    tree.insert(PathBuf::new(), rec(Path::new("")));
    for (p, _) in list_tree(root) {
        let e = rec(&p);
        tree.insert(p, e);
    }
    tree
}

/// FNV-1a (64 bit) of a regular file's content; opens with `O_NOFOLLOW | O_NONBLOCK`.
pub fn hash_file(path: &Path) -> std::io::Result<u64> {
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let mut h = Fnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.0);
        }
        h.write(&buf[..n]);
    }
}

/// FNV-1a, 64 bit: a stable content hash that needs no dependency.
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Mixes `bytes` into the hash.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The xattrs of `path` (not following symlinks) whose names pass `keep`, sorted by name.
pub fn xattrs(path: &Path, keep: impl Fn(&[u8]) -> bool) -> std::io::Result<Vec<(OsString, Bytes)>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty() && keep(n)) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        value.truncate(len);
        out.push((name.to_owned(), Bytes(value)));
    }
    out.sort();
    Ok(out)
}

/// An xattr value; `Debug` shows it as an escaped byte string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub Vec<u8>);

impl Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let escaped: String = self.0.iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
        write!(f, "b\"{escaped}\"")
    }
}

/// One object of an upper layer as stored on disk, as [`snapshot_upper`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpperEntry {
    /// Object type.
    pub kind: Kind,
    /// Whether it is a whiteout (character device 0:0).
    pub whiteout: bool,
    /// Value of `trusted.overlay.opaque` (or `user.overlay.opaque` of a `userxattr` layer), if set.
    pub opaque: Option<Vec<u8>>,
    /// Permission bits including set-id and sticky.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a non-directory.
    pub size: u64,
    /// FNV-1a hash of a regular file's content.
    pub hash: Option<u64>,
    /// A symlink's target.
    pub target: Option<OsString>,
    /// Major and minor of a device other than a whiteout.
    pub rdev: Option<(u32, u32)>,
    /// `user.*` and `trusted.*` xattrs, sorted by name; overlay's own `trusted.overlay.*` and
    /// `user.overlay.*` are left out, escaped `*.overlay.overlay.*` (user data) kept.
    pub xattrs: Vec<(OsString, Bytes)>,
}

impl UpperEntry {
    /// Records the raw object at `path`.
    pub fn of(path: &Path) -> std::io::Result<UpperEntry> {
        let e = Entry::of(path)?;
        let whiteout = e.kind == Kind::Char && e.rdev == Some((0, 0));
        let is_opaque = |n: &[u8]| n == b"trusted.overlay.opaque" || n == b"user.overlay.opaque";
        let opaque = xattrs(path, is_opaque)?.pop().map(|(_, v)| v.0);
        // Overlay's own xattrs (also the `user.overlay.` ones of `userxattr` layers) are not
        // compared, but escaped ones (`*.overlay.overlay.*`: what a user's `trusted.overlay.*`
        // becomes in a layer) are user data.
        let own = |n: &[u8]| {
            [&b"trusted.overlay."[..], b"user.overlay."]
                .iter()
                .any(|p| n.starts_with(p) && !n[p.len()..].starts_with(b"overlay."))
        };
        let xattrs = e.xattrs.into_iter().filter(|(n, _)| !own(n.as_bytes())).collect();
        Ok(UpperEntry {
            kind: e.kind,
            whiteout,
            opaque,
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            hash: e.hash,
            target: e.target,
            rdev: if whiteout { None } else { e.rdev },
            xattrs,
        })
    }

    /// Field-by-field differences to `other`.
    pub fn diff(&self, other: &UpperEntry) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out.push(format!("{}: {:?} != {:?}", stringify!($f), self.$f, other.$f));
                }
            )*};
        }
        field!(kind, whiteout, size, hash, target, rdev, xattrs);
        // A whiteout's owner carries no meaning, and the kernel's depends on how it made it
        // (shared in the work dir, or by RENAME_WHITEOUT inheriting a directory's group).
        if !(self.whiteout && other.whiteout) {
            field!(uid, gid);
        }
        if self.opaque != other.opaque {
            let show = |o: &Option<Vec<u8>>| o.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
            out.push(format!("opaque: {:?} != {:?}", show(&self.opaque), show(&other.opaque)));
        }
        if self.perm != other.perm {
            out.push(format!("perm: {:o} != {:o}", self.perm, other.perm));
        }
        out
    }
}

/// An upper layer: relative path (`""` is the root) to entry.
pub type UpperState = BTreeMap<PathBuf, UpperEntry>;

/// Walks an upper dir directly (not through a mount) and records every object.
pub fn snapshot_upper(upper: &Path) -> UpperState {
    let rec = |p: &Path| {
        UpperEntry::of(&upper.join(p)).unwrap_or_else(|e| panic!("snapshot {}: {e}", upper.join(p).display()))
    };
    let mut state = UpperState::new();
    state.insert(PathBuf::new(), rec(Path::new("")));
    for (p, _) in list_tree(upper) {
        let e = rec(&p);
        state.insert(p, e);
    }
    state
}

/// Differences between two path maps, one line each; `diff` compares two entries.
pub fn diff_maps<T: Debug>(
    a: &BTreeMap<PathBuf, T>,
    b: &BTreeMap<PathBuf, T>,
    diff: impl Fn(&T, &T) -> Vec<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let show = |p: &Path| format!("/{}", p.display());
    for (p, ea) in a {
        match b.get(p) {
            None => out.push(format!("only in A: {} {ea:?}", show(p))),
            Some(eb) => out.extend(diff(ea, eb).into_iter().map(|d| format!("differs: {} {d}", show(p)))),
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            out.push(format!("only in B: {} {eb:?}", show(p)));
        }
    }
    out
}

/// Differences between two views (see [`Entry::diff`]).
pub fn diff_trees(a: &Tree, b: &Tree) -> Vec<String> {
    diff_maps(a, b, Entry::diff)
}

/// Differences between two upper layers (see [`UpperEntry::diff`]).
pub fn diff_upper(a: &UpperState, b: &UpperState) -> Vec<String> {
    diff_maps(a, b, UpperEntry::diff)
}

/// Formats the first 30 differences under a heading, or `None` if there are none.
pub fn report(what: &str, a: &str, b: &str, diffs: &[String]) -> Option<String> {
    if diffs.is_empty() {
        return None;
    }
    let mut s = format!("{what}: {} differences (A = {a}, B = {b})\n", diffs.len());
    for d in diffs.iter().take(30) {
        s.push_str("  ");
        s.push_str(d);
        s.push('\n');
    }
    if diffs.len() > 30 {
        s.push_str(&format!("  ... and {} more\n", diffs.len() - 30));
    }
    Some(s)
}

/// Panics with a readable diff unless the two views are the same.
pub fn assert_same_tree(what: &str, a_label: &str, a: &Tree, b_label: &str, b: &Tree) {
    if let Some(msg) = report(what, a_label, b_label, &diff_trees(a, b)) {
        panic!("{msg}");
    }
}

/// Panics with a readable diff unless the two upper layers encode the same state.
pub fn assert_same_upper(what: &str, a_label: &str, a: &UpperState, b_label: &str, b: &UpperState) {
    if let Some(msg) = report(what, a_label, b_label, &diff_upper(a, b)) {
        panic!("{msg}");
    }
}

/// A fresh temporary directory; kept after the test when `OVL_DIFF_KEEP` is set.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("create tempdir");
    if std::env::var_os("OVL_DIFF_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

/// Makes `dir/name` (a mount point) and returns it.
pub fn mount_point(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir(&p).expect("mkdir mount point");
    p
}

/// Writes `data` to a new file at `path` (test scenarios through a mount).
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
}
