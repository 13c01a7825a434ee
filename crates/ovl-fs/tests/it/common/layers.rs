//! Building layers: whiteouts, opaque dirs, owners and times, the text fixture format, and
//! random layer sets from a seed.

use super::*;

// ---------------------------------------------------------------------------------------------
// Layer building blocks
// ---------------------------------------------------------------------------------------------

/// Makes a whiteout (character device 0:0) at `path`.
pub fn make_whiteout(path: &Path) {
    rustix::fs::mknodat(CWD, path, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
        .unwrap_or_else(|e| panic!("mknod whiteout {}: {e}", path.display()));
}

/// Sets `trusted.overlay.opaque` on a directory to `value` (`y` hides everything below).
pub fn set_opaque(path: &Path, value: &[u8]) {
    rustix::fs::lsetxattr(path, "trusted.overlay.opaque", value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("set opaque on {}: {e}", path.display()));
}

/// Sets owner (without following symlinks) and, except for symlinks, permission bits.
fn set_owner_mode(path: &Path, uid: u32, gid: u32, perm: Option<u32>) {
    let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
    rustix::fs::chownat(CWD, path, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).expect("lchown");
    if let Some(perm) = perm {
        // After chown: chown clears set-id bits.
        rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(perm), AtFlags::empty()).expect("chmod");
    }
}

/// Sets atime and mtime of `path` (not following symlinks).
pub fn set_times(path: &Path, sec: i64, nsec: i64) {
    let t = Timespec { tv_sec: sec, tv_nsec: nsec };
    let times = Timestamps { last_access: t, last_modification: t };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

/// Gives every object under `root` (children before parents) an old mtime drawn from `rng`.
pub fn set_old_times(root: &Path, rng: &mut StdRng) {
    let mut paths: Vec<PathBuf> = list_tree(root).into_iter().map(|(p, _)| root.join(p)).collect();
    paths.sort();
    for p in paths.iter().rev() {
        set_times(p, rng.random_range(1_400_000_000..1_600_000_000), rng.random_range(0..1_000_000_000));
    }
}

/// Builds layers from a text fixture, one object per line (`#` starts a comment):
///
/// ```text
/// LAYER KIND PATH [ARG...]      LAYER = l1..lN (l1 is the top lower) or u (upper)
///   dir PATH | opaque PATH      directory (opaque: with trusted.overlay.opaque=y)
///   file PATH [TEXT...]         regular file holding TEXT plus a newline ("" if no TEXT)
///   link PATH TARGET | hard PATH EXISTING | fifo PATH | wh PATH (whiteout)
///   xattr PATH NAME VALUE | mode PATH OCTAL | owner PATH UID GID
/// ```
///
/// Missing parents are made as plain 0755 dirs. Finally every object gets a fixed old mtime.
pub fn apply_fixture(layers: &Layers, text: &str) {
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        assert!(words.len() >= 3, "fixture line {}: `{line}`: want LAYER KIND PATH", n + 1);
        let root = match words[0] {
            "u" => &layers.upper,
            l => {
                let i: usize = l.strip_prefix('l').and_then(|i| i.parse().ok()).unwrap_or(0);
                assert!((1..=layers.lowers.len()).contains(&i), "fixture line {}: layer {l}", n + 1);
                &layers.lowers[i - 1]
            }
        };
        let path = root.join(words[2]);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let arg = |i: usize| *words.get(i).unwrap_or_else(|| panic!("fixture line {}: missing arg", n + 1));
        match words[1] {
            "dir" => fs::create_dir_all(&path).unwrap(),
            "opaque" => {
                fs::create_dir_all(&path).unwrap();
                set_opaque(&path, b"y");
            }
            "file" => {
                let text = if words.len() > 3 { format!("{}\n", words[3..].join(" ")) } else { String::new() };
                fs::write(&path, text).unwrap();
            }
            "link" => symlink(arg(3), &path).unwrap(),
            "hard" => fs::hard_link(root.join(arg(3)), &path).unwrap(),
            "fifo" => rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap(),
            "wh" => make_whiteout(&path),
            "xattr" => rustix::fs::lsetxattr(&path, arg(3), arg(4).as_bytes(), XattrFlags::empty()).unwrap(),
            "mode" => {
                let mode = u32::from_str_radix(arg(3), 8).expect("octal mode");
                rustix::fs::chmodat(CWD, &path, Mode::from_raw_mode(mode), AtFlags::empty()).unwrap();
            }
            "owner" => {
                let m = fs::symlink_metadata(&path).unwrap();
                let perm = (!m.file_type().is_symlink()).then_some(m.mode() & 0o7777);
                set_owner_mode(&path, arg(3).parse().unwrap(), arg(4).parse().unwrap(), perm);
            }
            kind => panic!("fixture line {}: unknown kind {kind}", n + 1),
        }
    }
    let mut rng = StdRng::seed_from_u64(0);
    for dir in layers.lowers.iter().chain([&layers.upper]) {
        set_old_times(dir, &mut rng);
    }
}

// ---------------------------------------------------------------------------------------------
// Random layers
// ---------------------------------------------------------------------------------------------

/// Names the generator draws from: a small pool makes the same names meet in several layers.
pub const NAME_POOL: &[&str] = &["a", "b", "c", "d", "e", "f", "dir1", "dir2", "file1", "file2", "x"];

/// Symlink targets: relative without `..` or under a nonexistent absolute root, so that following
/// a link can never leave the mount.
pub const LINK_TARGETS: &[&str] =
    &["a", "b", "file1", "dir1", "dir1/file1", "x/y/z", "missing", "/nonexistent-ovl-test/t"];

/// What the generator put at one path of one layer.
enum Made {
    Whiteout,
    Dir { opaque: bool },
    NonDir,
}

/// State of a layer generation: the merged view of the layers below, and what this layer holds.
struct LayerGen<'a> {
    rng: &'a mut StdRng,
    /// Visible merged tree of the layers below: path -> is a directory.
    below: &'a mut BTreeMap<PathBuf, bool>,
    /// This layer's objects in creation (pre-)order.
    made: Vec<(PathBuf, Made)>,
    /// Regular files of this layer, targets for hard links.
    files: Vec<PathBuf>,
    /// Whether this is the bottom layer (whiteouts and opaque dirs mean nothing there).
    bottom: bool,
    /// Layer tag written into file contents.
    tag: String,
}

/// Generates `n_lowers` random lower layers (and, if `with_upper`, a pre-populated upper) under
/// `root`, reproducibly from `seed`.
///
/// Layers are built bottom-up against a model of the merged tree below, so upper layers place
/// whiteouts over names visible below (never inside opaque dirs), put dirs over files, files
/// over dirs, merge dirs, and mark some dirs opaque. Objects get varied sizes (0 B to 200 KiB),
/// modes (with set-id and sticky bits), owners, `user.*` xattrs, symlinks, fifos, hard links and
/// the odd character device; finally every object gets an old mtime.
pub fn generate_layers(root: &Path, seed: u64, n_lowers: usize, with_upper: bool) -> Layers {
    let layers = Layers::create(root, n_lowers);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut below = BTreeMap::new();
    let mut order: Vec<(PathBuf, String)> =
        layers.lowers.iter().enumerate().rev().map(|(i, p)| (p.clone(), format!("l{}", i + 1))).collect();
    if with_upper {
        order.push((layers.upper.clone(), "u".to_owned()));
    }
    for (i, (dir, tag)) in order.into_iter().enumerate() {
        let mut g =
            LayerGen { rng: &mut rng, below: &mut below, made: Vec::new(), files: Vec::new(), bottom: i == 0, tag };
        g.dir(&dir, Path::new(""), 0, true);
        g.merge_into_below();
        set_old_times(&dir, &mut rng);
    }
    layers
}

impl LayerGen<'_> {
    /// Fills directory `rel` of the layer at `root`; `merged` says whether lower entries show through.
    fn dir(&mut self, root: &Path, rel: &Path, depth: usize, merged: bool) {
        let mut names: Vec<OsString> = NAME_POOL.iter().map(OsString::from).collect();
        if merged {
            for p in self.below.keys().filter(|p| p.parent() == Some(rel)) {
                names.push(p.file_name().unwrap().to_owned());
            }
        }
        names.sort();
        names.dedup();
        for name in names {
            let rel = rel.join(&name);
            let below = if merged { self.below.get(&rel).copied() } else { None };
            let p = if below.is_some() || depth == 0 { 0.45 } else { 0.3 };
            if self.rng.random_bool(p) {
                self.object(root, &rel, depth, below);
            }
        }
    }

    /// Makes one object at `rel`; `below` is `Some(is_dir)` when the lower layers show something there.
    fn object(&mut self, root: &Path, rel: &Path, depth: usize, below: Option<bool>) {
        let path = root.join(rel);
        if below.is_some() && !self.bottom && self.rng.random_bool(0.25) {
            make_whiteout(&path);
            self.made.push((rel.to_owned(), Made::Whiteout));
            return;
        }
        let roll = self.rng.random_range(0..100);
        let (uid, gid) = if self.rng.random_bool(0.7) {
            (0, 0)
        } else {
            *[(1000, 1000), (1001, 100), (65534, 65534), (0, 1000)].choose(self.rng).unwrap()
        };
        if roll < 35 && depth < 3 {
            let opaque =
                !self.bottom && (below == Some(true) && self.rng.random_bool(0.3) || self.rng.random_bool(0.03));
            fs::create_dir(&path).unwrap();
            if opaque {
                set_opaque(&path, b"y");
            }
            let perm = *[0o755, 0o755, 0o700, 0o775, 0o1777, 0o2755, 0o555].choose(self.rng).unwrap();
            set_owner_mode(&path, uid, gid, Some(perm));
            self.xattrs(&path);
            self.made.push((rel.to_owned(), Made::Dir { opaque }));
            self.dir(root, rel, depth + 1, below == Some(true) && !opaque);
            return;
        }
        if (86..92).contains(&roll) && !self.files.is_empty() {
            let target = self.files.choose(self.rng).unwrap().clone();
            fs::hard_link(root.join(target), &path).unwrap();
        } else if (75..86).contains(&roll) {
            let target = *LINK_TARGETS.choose(self.rng).unwrap();
            symlink(target, &path).unwrap();
            set_owner_mode(&path, uid, gid, None);
        } else if (92..98).contains(&roll) {
            rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
            set_owner_mode(&path, uid, gid, Some(*[0o644, 0o600, 0o666].choose(self.rng).unwrap()));
        } else if roll >= 98 {
            let dev = rustix::fs::makedev(1, 3);
            rustix::fs::mknodat(CWD, &path, FileType::CharacterDevice, Mode::from_raw_mode(0o666), dev).unwrap();
        } else {
            let data = random_content(self.rng, &format!("{} {}", self.tag, rel.display()));
            fs::write(&path, data).unwrap();
            let perm = *[0o644, 0o644, 0o600, 0o755, 0o444, 0o640, 0o4755, 0o2755, 0o664].choose(self.rng).unwrap();
            set_owner_mode(&path, uid, gid, Some(perm));
            self.xattrs(&path);
            self.files.push(rel.to_owned());
        }
        self.made.push((rel.to_owned(), Made::NonDir));
    }

    /// Gives a quarter of the files and dirs one to three `user.*` xattrs.
    fn xattrs(&mut self, path: &Path) {
        if !self.rng.random_bool(0.25) {
            return;
        }
        for _ in 0..self.rng.random_range(1..=3) {
            let name = *["user.a", "user.b", "user.color", "user.long.name"].choose(self.rng).unwrap();
            let len = self.rng.random_range(0..48);
            let value: Vec<u8> = (0..len).map(|_| self.rng.random_range(b'a'..=b'z')).collect();
            rustix::fs::lsetxattr(path, name, &value, XattrFlags::empty()).unwrap();
        }
    }

    /// Folds this layer into the model of what the next layer up sees below it.
    fn merge_into_below(&mut self) {
        for (rel, made) in std::mem::take(&mut self.made) {
            let replaces = match made {
                Made::Whiteout | Made::NonDir => true,
                Made::Dir { opaque } => opaque || self.below.get(&rel) == Some(&false),
            };
            if replaces {
                let doomed: Vec<PathBuf> = self
                    .below
                    .range(rel.clone()..)
                    .map(|(p, _)| p)
                    .take_while(|p| p.starts_with(&rel))
                    .cloned()
                    .collect();
                for p in doomed {
                    self.below.remove(&p);
                }
            }
            match made {
                Made::Whiteout => {}
                Made::Dir { .. } => {
                    self.below.insert(rel, true);
                }
                Made::NonDir => {
                    self.below.insert(rel, false);
                }
            }
        }
    }
}

/// File content with a size spread from 0 B to ~200 KiB: text naming its origin, or random bytes.
pub fn random_content(rng: &mut StdRng, tag: &str) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 if rng.random_bool(0.3) => 0,
        0..=2 => rng.random_range(0..100),
        3..=6 => rng.random_range(100..4096),
        7..=8 => rng.random_range(4096..65536),
        _ => rng.random_range(65536..200 * 1024),
    };
    if rng.random_bool(0.5) {
        let line = format!("{tag}\n");
        line.bytes().cycle().take(len).collect()
    } else {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        data
    }
}
