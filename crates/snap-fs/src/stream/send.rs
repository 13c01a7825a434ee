//! Sending: a view's tree, or the changes since an older snapshot, as a tar stream.

use super::*;

/// Writes the tree at `view` (a snapshot's view, `MNT/.snapshots/NAME`) to `out` as a tar
/// stream. With `changes` (the diff from an older snapshot A to this one), only what changed,
/// in the OCI layer format (whiteouts `.wh.NAME`, opaque dirs `.wh..wh..opq`); applied to a tree
/// equal to A it gives this snapshot's tree. `step` is called once per entry written.
pub fn send(view: &Path, changes: Option<&[Change]>, out: impl Write, step: &dyn Fn()) -> anyhow::Result<u64> {
    let root = rustix::fs::open(view, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {}", view.display()))?;
    let tar = tar::Builder::new(Poison { inner: out, poisoned: false });
    let mut s =
        Sender { root, tar, step, count: 0, linked: HashMap::new(), nlinks: HashMap::new(), sent_names: Vec::new() };
    if let Err(e) = s.run(changes) {
        // The builder writes the end-of-archive marker when dropped: a failed stream must not
        // look complete to a receiver.
        s.tar.get_mut().poisoned = true;
        return Err(e);
    }
    let mut out = s.tar.into_inner()?;
    out.inner.flush()?;
    Ok(s.count)
}

/// A writer that fails every write once poisoned.
struct Poison<W> {
    inner: W,
    poisoned: bool,
}

impl<W: Write> Write for Poison<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(io::Error::other("the send failed"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How much of a B object an incremental stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum How {
    /// The object's own entry (a directory's children, if changed, are listed separately).
    Entry,
    /// The object and, for a directory, everything below it.
    Whole,
    /// A directory whole, with an opaque marker right after its entry.
    WholeOpaque,
}

/// What an incremental stream holds: whiteouts (paths of A) and objects of B.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    pub(super) whiteouts: BTreeSet<PathBuf>,
    pub(super) objects: BTreeMap<PathBuf, How>,
}

impl Plan {
    /// The plan for `changes` (A→B); `is_dir` says whether B's object at a path is a directory.
    pub(super) fn new(changes: &[Change], is_dir: impl Fn(&Path) -> anyhow::Result<bool>) -> anyhow::Result<Plan> {
        // Dirs of A with a change listed below them: A has a directory there. The root is one
        // on both sides: its change is its own metadata (a full stream has no entry for it).
        let mut a_dirs = HashSet::from([Path::new("")]);
        for c in changes {
            let a = match c {
                Change::Added { at, .. } => at,
                Change::Deleted { path, .. } | Change::Modified { path, .. } | Change::Renamed { path, .. } => path,
            };
            a_dirs.extend(a.ancestors().skip(1));
        }
        fn put(objects: &mut BTreeMap<PathBuf, How>, p: &Path, how: How) {
            let e = objects.entry(p.to_path_buf()).or_insert(how);
            *e = (*e).max(how);
        }
        let mut plan = Plan::default();
        for c in changes {
            match c {
                Change::Deleted { at, .. } => {
                    plan.whiteouts.insert(at.clone());
                }
                Change::Added { path, .. } => put(&mut plan.objects, path, How::Whole),
                // A changed directory of B whose A side may not have been a directory (the diff
                // does not say): replaced whole, unless changes below show A had a directory.
                Change::Modified { path, at } if !a_dirs.contains(path.as_path()) && is_dir(at)? => {
                    plan.whiteouts.insert(at.clone());
                    put(&mut plan.objects, at, How::Whole);
                }
                Change::Modified { at, .. } => put(&mut plan.objects, at, How::Entry),
                Change::Renamed { path, to } => {
                    plan.whiteouts.insert(path.clone());
                    put(&mut plan.objects, to, How::WholeOpaque);
                }
            }
        }
        // The directories holding a change are sent too (their own entry): what changed inside
        // changed their times, which B's entries carry and the diff need not list.
        let parents: BTreeSet<PathBuf> = plan
            .whiteouts
            .iter()
            .chain(plan.objects.keys())
            .flat_map(|p| p.ancestors().skip(1))
            .filter(|a| !a.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .collect();
        for p in parents {
            if is_dir(&p).unwrap_or(false) {
                put(&mut plan.objects, &p, How::Entry);
            }
        }
        // What is sent whole covers every change below it; what is removed, every whiteout below.
        let covered: BTreeSet<PathBuf> =
            plan.objects.iter().filter(|(_, h)| **h != How::Entry).map(|(p, _)| p.clone()).collect();
        let removed: BTreeSet<PathBuf> = plan.whiteouts.union(&covered).cloned().collect();
        let below = |p: &Path, set: &BTreeSet<PathBuf>| p.ancestors().skip(1).any(|a| set.contains(a));
        plan.whiteouts.retain(|w| !below(w, &removed));
        plan.objects.retain(|o, _| !below(o, &covered));
        Ok(plan)
    }
}

struct Sender<'a, W: Write> {
    root: OwnedFd,
    tar: tar::Builder<Poison<W>>,
    step: &'a dyn Fn(),
    count: u64,
    /// The first path sent of each object with several links, by (device, inode) in the view:
    /// its other names are sent as hard links to it (issue 16.4).
    linked: HashMap<(u64, u64), PathBuf>,
    /// The link count of each object in `linked`.
    nlinks: HashMap<(u64, u64), u64>,
    /// Every name sent of an object with several links.
    sent_names: Vec<(PathBuf, (u64, u64))>,
}

impl<W: Write> Sender<'_, W> {
    fn run(&mut self, changes: Option<&[Change]>) -> anyhow::Result<()> {
        let Some(changes) = changes else {
            self.root_entry()?;
            for name in self.children(Path::new(""))? {
                if name != SNAPDIR_NAME {
                    self.tree(Path::new(&name), false)?;
                }
            }
            return Ok(());
        };
        let plan = Plan::new(changes, |p| {
            let st = sys::lstat_beneath(&self.root, p)
                .with_context(|| format!("the snapshot's {}", crate::names::shown(p)))?;
            Ok(FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        })?;
        for w in &plan.whiteouts {
            refuse_reserved(w)?;
            let (Some(dir), Some(name)) = (w.parent(), w.file_name()) else { continue };
            self.marker(dir, &[WHITEOUT, name.as_bytes()].concat())?;
        }
        for (p, how) in &plan.objects {
            // The root's own metadata is no entry of a stream (a full stream has none either,
            // and a receiver keeps its target's): a change of it alone made the send fail.
            if p.as_os_str().is_empty() {
                continue;
            }
            match how {
                How::Entry => {
                    self.entry(p)?;
                }
                How::Whole => self.tree(p, false)?,
                How::WholeOpaque => self.tree(p, true)?,
            }
        }
        self.other_names()
    }

    /// An incremental stream that sent one name of a file with several links sends its other
    /// names too, as links: the receiver's unchanged names would otherwise stay a separate
    /// file. Finding them takes a walk of the view, done only when such a file was sent.
    fn other_names(&mut self) -> anyhow::Result<()> {
        let mut sent: HashMap<(u64, u64), u64> = HashMap::new();
        for key in self.sent_names.iter().map(|(_, k)| *k) {
            *sent.entry(key).or_default() += 1;
        }
        if !self
            .linked
            .iter()
            .any(|(k, _)| sent.get(k).copied().unwrap_or(0) < self.nlinks.get(k).copied().unwrap_or(0))
        {
            return Ok(());
        }
        let done: HashSet<PathBuf> = self.sent_names.iter().map(|(p, _)| p.clone()).collect();
        let mut todo = vec![PathBuf::new()];
        while let Some(dir) = todo.pop() {
            for name in self.children(&dir)? {
                if dir.as_os_str().is_empty() && name == SNAPDIR_NAME {
                    continue;
                }
                let p = dir.join(name);
                let st = sys::lstat_beneath(&self.root, &p).with_context(|| crate::names::shown(&p))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    todo.push(p);
                } else if let Some(first) = self.linked.get(&(st.st_dev, st.st_ino)).cloned() {
                    if !done.contains(&p) {
                        self.hard_link(&p, &first, &st)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The names in directory `p` of the view, sorted.
    fn children(&self, p: &Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
        let mut names: Vec<_> = sys::read_dir(&self.root, p)
            .with_context(|| format!("listing {}", crate::names::shown(p)))?
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Sends `p` and everything below it; `opaque` adds the opaque marker after a directory.
    fn tree(&mut self, p: &Path, opaque: bool) -> anyhow::Result<()> {
        if self.entry(p)? != Some(FileType::Directory) {
            return Ok(());
        }
        if opaque {
            self.marker(p, OPAQUE)?;
        }
        for name in self.children(p)? {
            self.tree(&p.join(name), false)?;
        }
        Ok(())
    }

    /// The root's own entry, `./`, first in a full stream: its mode, owner, times and xattrs,
    /// for a receive into a directory it makes (one it finds keeps its own). Without it a tree
    /// whose root was 0700 landed under a root the receiver's umask opened to everyone.
    fn root_entry(&mut self) -> anyhow::Result<()> {
        let st = rustix::fs::fstat(&self.root).context("the snapshot's root")?;
        let Some((h, mut pax)) = header(Path::new("."), &st, self.root.as_fd(), c".")? else {
            bail!("the snapshot's root is not a directory");
        };
        let mut keys = sys::list_xattrs(&self.root, None).context("the snapshot's root")?;
        keys.sort();
        for k in keys.iter().filter(|k| !private_xattr(k.as_bytes())) {
            let key = CString::new(k.as_bytes())?;
            if let Some(v) = sys::get_xattr(&self.root, None, &key).context("the snapshot's root")? {
                pax.add(&[b"SCHILY.xattr.", k.as_bytes()].concat(), &v);
            }
        }
        self.write(h, pax, b".", io::empty())
    }

    /// An empty regular file `dir/name`: a whiteout or an opaque marker.
    fn marker(&mut self, dir: &Path, name: &[u8]) -> anyhow::Result<()> {
        let mut h = Header::new_ustar();
        let mut pax = PaxRecords::default();
        let path = [dir.as_os_str().as_bytes(), if dir.as_os_str().is_empty() { b"" } else { b"/" }, name].concat();
        set_path(&mut h, &path, &mut pax);
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        self.write(h, pax, name, io::empty())
    }

    /// Sends the object at `p` alone; returns its type (`None` for a socket, which tar cannot hold).
    fn entry(&mut self, p: &Path) -> anyhow::Result<Option<FileType>> {
        refuse_reserved(p)?;
        let shown = || crate::names::shown(p);
        let (dir, name) = sys::open_parent(&self.root, p).with_context(shown)?;
        let st = sys::lstat_at(&dir, &name).with_context(shown)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let key = (st.st_dev, st.st_ino);
        if kind != FileType::Directory && st.st_nlink > 1 {
            self.sent_names.push((p.to_path_buf(), key));
            self.nlinks.insert(key, st.st_nlink as u64);
            if let Some(first) = self.linked.get(&key).cloned() {
                self.hard_link(p, &first, &st)?;
                return Ok(Some(kind));
            }
        }
        let Some((h, mut pax)) = header(p, &st, dir.as_fd(), &name).with_context(shown)? else {
            tracing::warn!("send: {} is a socket, which a tar stream cannot hold: skipped", shown());
            return Ok(None);
        };
        let mut keys = sys::list_xattrs(&dir, Some(&name)).with_context(shown)?;
        keys.sort();
        for k in keys.iter().filter(|k| !private_xattr(k.as_bytes())) {
            let key = CString::new(k.as_bytes())?;
            if let Some(v) = sys::get_xattr(&dir, Some(&name), &key).with_context(shown)? {
                pax.add(&[b"SCHILY.xattr.", k.as_bytes()].concat(), &v);
            }
        }
        let base = p.file_name().map_or(&b""[..], |n| n.as_bytes());
        if kind != FileType::Directory && st.st_nlink > 1 {
            self.linked.insert(key, p.to_path_buf());
        }
        if kind == FileType::RegularFile {
            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let file = File::from(rustix::fs::openat(&dir, &name, flags, Mode::empty()).with_context(shown)?);
            let data = Exact { inner: file, left: st.st_size as u64 };
            self.write(h, pax, base, data).with_context(shown)?;
        } else {
            self.write(h, pax, base, io::empty()).with_context(shown)?;
        }
        Ok(Some(kind))
    }

    /// A hard-link entry: `p` is another name of the object (`st`) sent as `first`. Its owner and
    /// time are informative (a receiver takes the object's from `first`), within the ustar fields.
    fn hard_link(&mut self, p: &Path, first: &Path, st: &Stat) -> anyhow::Result<()> {
        let mut h = Header::new_ustar();
        let mut pax = PaxRecords::default();
        set_path(&mut h, p.as_os_str().as_bytes(), &mut pax);
        h.set_entry_type(EntryType::Link);
        let target = first.as_os_str().as_bytes();
        let field = &mut h.as_ustar_mut().expect("a ustar header").linkname;
        if target.len() > field.len() {
            pax.add(b"linkpath", target);
        }
        let n = target.len().min(field.len());
        field[..n].copy_from_slice(&target[..n]);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid).min(MAX_OCTAL_7));
        h.set_gid(u64::from(st.st_gid).min(MAX_OCTAL_7));
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0).min(MAX_OCTAL_11));
        h.set_size(0);
        let base = p.file_name().map_or(&b""[..], |n| n.as_bytes());
        self.write(h, pax, base, io::empty())
    }

    /// Appends one entry, preceded by its PAX header when it has records.
    fn write(&mut self, mut h: Header, pax: PaxRecords, base: &[u8], data: impl Read) -> anyhow::Result<()> {
        if !pax.0.is_empty() {
            let mut x = Header::new_ustar();
            let name = [&b"PaxHeaders/"[..], base].concat();
            let field = &mut x.as_ustar_mut().expect("a ustar header").name;
            let n = name.len().min(field.len());
            field[..n].copy_from_slice(&name[..n]);
            x.set_entry_type(EntryType::XHeader);
            x.set_mode(0o644);
            x.set_mtime(h.mtime().unwrap_or(0));
            x.set_size(pax.0.len() as u64);
            x.set_cksum();
            self.tar.append(&x, &pax.0[..])?;
        }
        h.set_cksum();
        self.tar.append(&h, data)?;
        self.count += 1;
        (self.step)();
        Ok(())
    }
}

/// Refuses a path with a name the OCI layer format reserves (`.wh.` and what follows): a receiver
/// would take the object for a whiteout or an opaque marker and delete what it names in the
/// target. Refused rather than escaped: OCI has no escape, and every other tool reading the stream
/// would still delete.
fn refuse_reserved(p: &Path) -> anyhow::Result<()> {
    if p.iter().any(|c| c.as_bytes().starts_with(WHITEOUT)) {
        bail!(
            "{}: names starting with `.wh.` are whiteouts in the OCI layer format, so a stream cannot carry \
             this one (a receiver would delete what it names); rename it in the live tree and take a new \
             snapshot to send it",
            crate::names::shown(p)
        );
    }
    Ok(())
}

/// The header of `name` in `dir` (`st` its lstat) sent as `p`, with the PAX records it needs
/// (long names, big numbers, times to the nanosecond); `None` for a socket.
fn header(p: &Path, st: &Stat, dir: BorrowedFd<'_>, name: &CStr) -> anyhow::Result<Option<(Header, PaxRecords)>> {
    let kind = FileType::from_raw_mode(st.st_mode);
    let mut h = Header::new_ustar();
    let mut pax = PaxRecords::default();
    let mut path = p.as_os_str().as_bytes().to_vec();
    let size = if kind == FileType::RegularFile { st.st_size as u64 } else { 0 };
    if size > MAX_OCTAL_11 {
        // First: the tar crate stops reading records at one it cannot parse.
        pax.add(b"size", size.to_string().as_bytes());
    }
    match kind {
        FileType::Directory => {
            path.push(b'/');
            h.set_entry_type(EntryType::Directory);
        }
        FileType::RegularFile => h.set_entry_type(EntryType::Regular),
        FileType::Symlink => {
            h.set_entry_type(EntryType::Symlink);
            let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
            let target = target.as_bytes();
            let field = &mut h.as_ustar_mut().expect("a ustar header").linkname;
            if target.len() > field.len() {
                pax.add(b"linkpath", target);
            }
            let n = target.len().min(field.len());
            field[..n].copy_from_slice(&target[..n]);
        }
        FileType::Fifo => h.set_entry_type(EntryType::Fifo),
        FileType::CharacterDevice | FileType::BlockDevice => {
            let char = kind == FileType::CharacterDevice;
            h.set_entry_type(if char { EntryType::Char } else { EntryType::Block });
            h.set_device_major(rustix::fs::major(st.st_rdev))?;
            h.set_device_minor(rustix::fs::minor(st.st_rdev))?;
        }
        _ => return Ok(None),
    }
    set_path(&mut h, &path, &mut pax);
    h.set_size(size);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid.into());
    h.set_gid(st.st_gid.into());
    for (key, id) in [(&b"uid"[..], st.st_uid), (b"gid", st.st_gid)] {
        if u64::from(id) > MAX_OCTAL_7 {
            pax.add(key, id.to_string().as_bytes());
        }
    }
    let (sec, nsec) = (st.st_mtime, st.st_mtime_nsec as u32);
    let in_field = u64::try_from(sec).ok().filter(|s| *s <= MAX_OCTAL_11);
    h.set_mtime(in_field.unwrap_or(0));
    if nsec != 0 || in_field.is_none() {
        pax.add(b"mtime", format_time(sec, nsec).as_bytes());
    }
    Ok(Some((h, pax)))
}

/// Reads exactly `left` bytes of `inner`: a file that shrank would otherwise misalign the stream.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was sent"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// PAX extended header records (`LEN KEY=VALUE\n`, LEN counting the whole record) of one entry.
#[derive(Default)]
pub(super) struct PaxRecords(pub(super) Vec<u8>);

impl PaxRecords {
    pub(super) fn add(&mut self, key: &[u8], value: &[u8]) {
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        self.0.extend_from_slice(format!("{len} ").as_bytes());
        self.0.extend_from_slice(key);
        self.0.push(b'=');
        self.0.extend_from_slice(value);
        self.0.push(b'\n');
    }
}

/// Puts `path` into the ustar name (and prefix) fields, or into a PAX `path` record when it does
/// not fit (the name field then holds its start).
pub(super) fn set_path(h: &mut Header, path: &[u8], pax: &mut PaxRecords) {
    let u = h.as_ustar_mut().expect("a ustar header");
    if path.len() <= u.name.len() {
        u.name[..path.len()].copy_from_slice(path);
        return;
    }
    let split = (1..path.len().min(u.prefix.len() + 1))
        .rev()
        .find(|&s| path[s] == b'/' && path.len() - s - 1 <= u.name.len() && path.len() - s - 1 > 0);
    match split {
        Some(s) => {
            u.prefix[..s].copy_from_slice(&path[..s]);
            u.name[..path.len() - s - 1].copy_from_slice(&path[s + 1..]);
        }
        None => {
            pax.add(b"path", path);
            let n = u.name.len();
            u.name.copy_from_slice(&path[..n]);
        }
    }
}
