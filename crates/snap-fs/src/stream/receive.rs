//! Receiving: a stream checked whole in a stage, then applied to the target.

use super::*;

/// Applies a stream made by [`send`] to the directory `target`. The whole stream is read and
/// checked before `target` is touched: a truncated or corrupt stream leaves it as it was.
pub fn receive(target: &Path, input: impl Read, step: &dyn Fn()) -> anyhow::Result<u64> {
    let target = std::path::absolute(target)?;
    let exists = match std::fs::metadata(&target) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => bail!("{} is not a directory", target.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("{}", target.display())),
    };
    let stage = Stage::new(&target)?;
    let staged = match stage.unpack(input) {
        Ok(s) => s,
        Err(e) if e.is::<Bad>() => bail!("refusing the stream, {} was not changed: {e}", target.display()),
        Err(e) => return Err(e.context(format!("unpacking the stream in {}", stage.shown.display()))),
    };
    if !exists {
        // Private until the stream's root (or the umask, without one) says otherwise, at the end.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .with_context(|| format!("creating {}", target.display()))?;
    }
    let root = rustix::fs::open(&target, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {}", target.display()))?;
    staged
        .check_base(root.as_fd())
        .with_context(|| format!("refusing the stream, {} was not changed", target.display()))?;
    let n = staged
        .apply(root.as_fd(), stage.tree()?.as_fd(), step)
        .with_context(|| format!("applying the stream to {}", target.display()))?;
    if !exists {
        made_root(&target, staged.root.as_ref()).with_context(|| format!("finishing {}", target.display()))?;
    }
    Ok(n)
}

/// Gives a target the receive made the stream root's metadata, or without one in the stream the
/// mode the umask gives a new directory.
fn made_root(target: &Path, meta: Option<&Meta>) -> anyhow::Result<()> {
    let parent = target.parent().context("no parent")?;
    let name = CString::new(target.file_name().context("no name")?.as_bytes())?;
    let parent = rustix::fs::open(parent, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    // The target itself, never a symlink put in its place (in a parent others may write), and
    // changed as `.` below its own descriptor: a chmod through its name would follow one.
    let dir = rustix::fs::openat(
        &parent,
        &name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let here = c".".to_owned();
    let Some(meta) = meta else {
        let mode = 0o777 & !umask();
        rustix::fs::chmodat(&dir, &here, Mode::from_raw_mode(mode), AtFlags::empty())?;
        return Ok(());
    };
    set_meta(dir.as_fd(), &here, &Item { kind: Kind::Dir, meta: meta.clone() })?;
    let t = |(sec, nsec): (i64, u32)| Timespec { tv_sec: sec, tv_nsec: nsec.into() };
    let times = Timestamps { last_access: t(meta.atime), last_modification: t(meta.mtime) };
    rustix::fs::utimensat(&dir, &here, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// This process's umask, read without changing it (`/proc/thread-self/status`); 022 if unreadable.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|u| u32::from_str_radix(u.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A stream problem: truncated, corrupt, or unsafe to apply.
#[derive(Debug)]
struct Bad(String);

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Bad {}

fn bad(what: impl fmt::Display) -> anyhow::Error {
    Bad(what.to_string()).into()
}

/// The prefix of stage dir names (`.ovlsnap-receive.PID`, `.ovlsnap-receive.PID.N`).
const STAGE_PREFIX: &str = ".ovlsnap-receive.";

/// The stage dir: the spooled stream (`stream`) and the objects unpacked from it (`tree`), and
/// `lock`, which the receive holds locked (`flock`) while it lives. Removed with everything in it
/// when dropped; one a killed receive left is removed by the next receive next to it.
struct Stage {
    parent: OwnedFd,
    name: CString,
    dir: OwnedFd,
    /// Held for the life of the stage: tells other receives it is in use.
    _lock: OwnedFd,
    shown: PathBuf,
}

impl Stage {
    /// `.ovlsnap-receive.PID` next to `target`, or in the temp dir when that is not writable.
    /// Stages that killed receives left there are removed first.
    fn new(target: &Path) -> anyhow::Result<Stage> {
        let pid = std::process::id();
        let near = target.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf);
        for base in near.into_iter().chain([std::env::temp_dir()]) {
            let Ok(parent) = rustix::fs::open(&base, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            else {
                continue;
            };
            remove_stale_stages(parent.as_fd(), &base);
            for n in 0..100 {
                let name = if n == 0 { format!("{STAGE_PREFIX}{pid}") } else { format!("{STAGE_PREFIX}{pid}.{n}") };
                match rustix::fs::mkdirat(&parent, name.as_str(), Mode::from_raw_mode(0o700)) {
                    Ok(()) => {
                        let shown = base.join(&name);
                        let name = CString::new(name)?;
                        let made = sys::open_dir_path(&parent, Path::new(OsStr::from_bytes(name.to_bytes())))
                            .map_err(anyhow::Error::from)
                            .and_then(|dir| Ok((lock_stage(dir.as_fd())?, dir)));
                        return match made {
                            Ok((lock, dir)) => Ok(Stage { parent, name, dir, _lock: lock, shown }),
                            Err(e) => {
                                let _ = sys::remove_tree_at(&parent, &name);
                                Err(e.context(format!("making the stage {}", shown.display())))
                            }
                        };
                    }
                    Err(Errno::EXIST) => continue,
                    Err(_) => break,
                }
            }
        }
        bail!("no writable place for the stage directory, next to {} or in the temp dir", target.display())
    }

    fn tree(&self) -> anyhow::Result<OwnedFd> {
        Ok(sys::open_dir_path(&self.dir, Path::new("tree"))?)
    }

    /// Spools `input`, checks it is a whole archive and unpacks it into `tree`.
    fn unpack(&self, mut input: impl Read) -> anyhow::Result<Staged> {
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC;
        let mut spool = File::from(rustix::fs::openat(&self.dir, "stream", flags, Mode::from_raw_mode(0o600))?);
        let len = io::copy(&mut input, &mut spool).context("reading the stream")?;
        spool.rewind()?;
        if len % BLOCK != 0 || len < 2 * BLOCK || !zeros(&spool, len - 2 * BLOCK, len)? {
            return Err(bad("the stream is truncated: it does not end with the end-of-archive marker"));
        }
        rustix::fs::mkdirat(&self.dir, "tree", Mode::from_raw_mode(0o755))?;
        let tree = self.tree()?;
        let mut staged = Staged::default();
        let mut archive = tar::Archive::new(BufReader::new(&spool));
        let mut end = 0;
        for e in archive.entries().map_err(|e| bad(format!("the stream is corrupt or truncated: {e}")))? {
            let mut e = e.map_err(|e| bad(format!("the stream is corrupt or truncated after byte {end}: {e}")))?;
            let pax = read_pax(&spool, end, e.raw_header_position())?;
            end = e.raw_file_position() + e.size().div_ceil(BLOCK) * BLOCK;
            staged.add(tree.as_fd(), &mut e, pax)?;
        }
        // After the last entry only zeros, at least the two blocks of the end marker: the parser
        // stops at the first zero block and would take a stream cut at an entry boundary as whole.
        if len < end + 2 * BLOCK || !zeros(&spool, end, len)? {
            return Err(bad(format!("the stream is truncated or corrupt: no end-of-archive marker at byte {end}")));
        }
        rustix::fs::unlinkat(&self.dir, "stream", AtFlags::empty())?;
        Ok(staged)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Err(e) = sys::remove_tree_at(&self.parent, &self.name) {
            tracing::warn!("removing the stage {}: {e}", self.shown.display());
        }
    }
}

/// Makes `lock` in the new stage `dir`, locked before it has its name: a `lock` a receive can
/// see is held for as long as the receive that made it lives (the kernel drops the lock when
/// the process dies, killed or not).
fn lock_stage(dir: BorrowedFd<'_>) -> anyhow::Result<OwnedFd> {
    let flags = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, "lock.new", flags, Mode::from_raw_mode(0o600)).context("creating the lock")?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).context("locking the stage")?;
    rustix::fs::renameat(dir, "lock.new", dir, "lock").context("naming the lock")?;
    Ok(fd)
}

/// Removes the stages in `parent` (shown as `base`) that no live receive uses: their `lock` is
/// not held, or, if they have none yet (a receive killed right after making the dir, or one that
/// is making it now), the process their name gives is gone. Never fails: a stage it cannot judge
/// or remove stays, with a log line.
fn remove_stale_stages(parent: BorrowedFd<'_>, base: &Path) {
    let Ok(entries) = rustix::io::dup(parent).map_err(ovl_core::Error::from).and_then(sys::read_dir_fd) else {
        return;
    };
    for e in entries {
        let Some(rest) = e.name.as_bytes().strip_prefix(STAGE_PREFIX.as_bytes()) else { continue };
        let pid = rest.split(|b| *b == b'.').next().and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let Ok(name) = sys::name_cstr(&e.name) else { continue };
        let shown = base.join(&e.name);
        // Kept locked (when it has a lock) until the stage is gone.
        let lock = match stage_owner(parent, &name, pid) {
            Ok(Owner::Dead(lock)) => lock,
            Ok(Owner::Keep) => continue,
            Err(err) => {
                tracing::warn!("leaving {}: {err}", shown.display());
                continue;
            }
        };
        match sys::remove_tree_at(parent, &name) {
            Ok(()) => tracing::info!("removed {}, left by a receive that was killed", shown.display()),
            Err(err) => tracing::warn!("removing {}, left by a receive that was killed: {err}", shown.display()),
        }
        drop(lock);
    }
}

/// Who a stage dir belongs to.
enum Owner {
    /// A live receive, or not a stage at all: leave it.
    Keep,
    /// A receive that died; its lock (when it has one), held now by the caller.
    Dead(Option<OwnedFd>),
}

/// Who stage `name` in `parent` (named after process `pid`) belongs to.
fn stage_owner(parent: BorrowedFd<'_>, name: &CStr, pid: u32) -> anyhow::Result<Owner> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(d) => d,
        // Not a dir (not ours), or gone meanwhile.
        Err(Errno::NOTDIR | Errno::LOOP | Errno::NOENT) => return Ok(Owner::Keep),
        Err(e) => return Err(e.into()),
    };
    match rustix::fs::openat(&dir, "lock", OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
        Ok(lock) => match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Owner::Dead(Some(lock))),
            Err(Errno::WOULDBLOCK) => Ok(Owner::Keep),
            Err(e) => Err(anyhow::Error::from(e).context("locking its lock")),
        },
        Err(Errno::NOENT) => {
            let alive = Path::new("/proc").join(pid.to_string()).exists();
            Ok(if alive { Owner::Keep } else { Owner::Dead(None) })
        }
        Err(e) => Err(anyhow::Error::from(e).context("opening its lock")),
    }
}

/// PAX records (key, value) in stream order.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// Whether bytes `from..to` of `f` are all zero.
fn zeros(f: &File, from: u64, to: u64) -> anyhow::Result<bool> {
    let mut buf = vec![0u8; 1 << 16];
    let mut at = from;
    while at < to {
        let n = buf.len().min(usize::try_from(to - at).unwrap_or(usize::MAX));
        f.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// The PAX records of the extended headers in bytes `from..to` of the stream (those between the
/// previous entry and this one's header). Parsed here, strictly, because the tar crate splits
/// records at newlines, which binary xattr values and file names may hold.
fn read_pax(f: &File, from: u64, to: u64) -> anyhow::Result<Records> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let mut block = [0u8; BLOCK as usize];
        f.read_exact_at(&mut block, at)?;
        let h = Header::from_byte_slice(&block);
        let size = h.entry_size().map_err(|e| bad(format!("the stream is corrupt at byte {at}: {e}")))?;
        if h.entry_type() == EntryType::XHeader {
            if size > 64 << 20 {
                return Err(bad(format!("the stream is corrupt at byte {at}: a PAX header of {size} bytes")));
            }
            let mut data = vec![0u8; usize::try_from(size)?];
            f.read_exact_at(&mut data, at + BLOCK)?;
            out.extend(parse_pax(&data).map_err(|e| bad(format!("the stream is corrupt at byte {at}: {e}")))?);
        }
        at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
    }
    Ok(out)
}

pub(super) fn parse_pax(mut d: &[u8]) -> Result<Records, &'static str> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let sp = d.iter().position(|b| *b == b' ').ok_or("a PAX record without a length")?;
        let len = std::str::from_utf8(&d[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|l| *l > sp + 1 && *l <= d.len())
            .ok_or("a PAX record with a bad length")?;
        let rec = d[sp + 1..len].strip_suffix(b"\n").ok_or("a PAX record without its newline")?;
        let eq = rec.iter().position(|b| *b == b'=').ok_or("a PAX record without `=`")?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        d = &d[len..];
    }
    Ok(out)
}

/// The path of an entry, relative, without `.` components; `None` for the root itself.
pub(super) fn clean(raw: &[u8]) -> anyhow::Result<Option<PathBuf>> {
    if raw.first() == Some(&b'/') {
        return Err(bad(format!("unsafe entry {:?}: an absolute path", OsStr::from_bytes(raw))));
    }
    let mut p = PathBuf::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(bad(format!("unsafe entry {:?}: `..` leaves the target", OsStr::from_bytes(raw)))),
            c => p.push(OsStr::from_bytes(c)),
        }
    }
    Ok(if p.as_os_str().is_empty() { None } else { Some(p) })
}

/// The parent and final name of a (cleaned, non-root) path.
fn split(p: &Path) -> anyhow::Result<(&Path, CString)> {
    let name = p.file_name().context("an entry without a name")?;
    Ok((p.parent().unwrap_or(Path::new("")), sys::name_cstr(name)?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char(u64),
    Block(u64),
}

/// An object's metadata as the stream gives it.
#[derive(Clone, Debug)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    atime: (i64, u32),
    xattrs: BTreeMap<CString, Vec<u8>>,
}

#[derive(Clone, Debug)]
struct Item {
    kind: Kind,
    meta: Meta,
}

/// A stream unpacked into the stage: objects by path (parents sort first), the directories made
/// for their parents that the stream does not hold, whiteouts and opaque markers.
#[derive(Default)]
struct Staged {
    /// The root's own entry (`./`), applied only to a target the receive makes.
    root: Option<Meta>,
    entries: BTreeMap<PathBuf, Item>,
    placeholders: BTreeSet<PathBuf>,
    whiteouts: Vec<PathBuf>,
    opaque: Vec<PathBuf>,
}

impl Staged {
    /// Stages one entry (with its PAX records `pax`) below `tree`.
    fn add(&mut self, tree: BorrowedFd<'_>, e: &mut tar::Entry<'_, impl Read>, pax: Records) -> anyhow::Result<()> {
        let et = e.header().entry_type();
        if et == EntryType::XGlobalHeader {
            return Ok(());
        }
        let find = |key: &[u8]| pax.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let raw = find(b"path").unwrap_or_else(|| e.path_bytes().into_owned());
        let Some(path) = clean(&raw)? else {
            // The root itself (`./`, as `tar -C DIR .` and `send` write it): kept for a target
            // the receive makes; one it finds stays as it is.
            if et != EntryType::Directory {
                return Err(bad("a non-directory entry for the root"));
            }
            self.root = Some(meta(e.header(), &pax).map_err(|err| bad(format!("the root's entry: {err}")))?);
            return Ok(());
        };
        let shown = crate::names::shown(&path);
        let (parent, name) = split(&path).map_err(|e| bad(format!("entry {shown}: {e}")))?;
        let name_b = name.to_bytes();
        // OCI reserves these names: a whiteout or opaque marker is an empty file, and nothing
        // lives below one. Anything else under such a name is not a marker (a sender that does
        // not reserve the names sent a file of its tree): refused, never taken as a deletion.
        if parent.iter().any(|c| c.as_bytes().starts_with(WHITEOUT)) {
            return Err(bad(format!("entry {shown}: below a whiteout name (`.wh.`), which OCI reserves")));
        }
        if name_b.starts_with(WHITEOUT) && (!matches!(et, EntryType::Regular | EntryType::Continuous) || e.size() != 0)
        {
            return Err(bad(format!(
                "entry {shown}: a name OCI reserves for whiteouts (`.wh.`) on an object that is not an empty file"
            )));
        }
        if name_b == OPAQUE {
            push_new(&mut self.opaque, parent.to_path_buf());
            return Ok(());
        }
        if name_b.starts_with(b".wh..wh.") {
            return Err(bad(format!("entry {shown}: unsupported whiteout metadata")));
        }
        if let Some(hidden) = name_b.strip_prefix(WHITEOUT) {
            let hidden =
                sys::name_cstr(OsStr::from_bytes(hidden)).map_err(|_| bad(format!("unsafe whiteout {shown}")))?;
            push_new(&mut self.whiteouts, parent.join(OsStr::from_bytes(hidden.to_bytes())));
            return Ok(());
        }
        let meta = meta(e.header(), &pax).map_err(|err| bad(format!("entry {shown}: {err}")))?;
        let h = e.header();
        let dev = || -> anyhow::Result<u64> {
            let (ma, mi) = (h.device_major(), h.device_minor());
            let (Ok(Some(ma)), Ok(Some(mi))) = (ma, mi) else { return Err(bad(format!("entry {shown}: bad device"))) };
            Ok(rustix::fs::makedev(ma, mi))
        };
        let kind = match et {
            EntryType::Regular | EntryType::Continuous | EntryType::Link => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Fifo => Kind::Fifo,
            EntryType::Char => Kind::Char(dev()?),
            EntryType::Block => Kind::Block(dev()?),
            other => return Err(bad(format!("entry {shown}: unsupported type {:?}", other.as_byte() as char))),
        };
        let dir = self.stage_dir(tree, parent).map_err(|err| match err.errno() {
            Errno::NOTDIR | Errno::LOOP => bad(format!("unsafe entry {shown}: below a non-directory of the stream")),
            _ => anyhow::Error::from(err).context(format!("staging {shown}")),
        })?;
        // A directory made earlier (for an entry below it, or by an earlier entry) stays; a later
        // entry replaces anything else, with what was staged below it.
        let earlier = self.entries.get(&path).map(|i| i.kind);
        let placeholder = self.placeholders.contains(&path);
        if kind == Kind::Dir && (placeholder || earlier == Some(Kind::Dir)) {
            self.placeholders.remove(&path);
            self.entries.insert(path, Item { kind, meta });
            return Ok(());
        }
        if earlier.is_some() || placeholder {
            sys::remove_tree_at(&dir, &name)?;
            self.entries.retain(|k, _| !k.starts_with(&path));
            self.placeholders.retain(|k| !k.starts_with(&path));
        }
        let mut item = Item { kind, meta };
        let link = find(b"linkpath").or_else(|| e.link_name_bytes().map(|l| l.into_owned())).unwrap_or_default();
        if et == EntryType::Link {
            let t = clean(&link)?.ok_or_else(|| bad(format!("entry {shown}: a hard link without a target")))?;
            let Some(target) = self.entries.get(&t).filter(|i| i.kind != Kind::Dir) else {
                return Err(bad(format!(
                    "entry {shown}: a hard link to {}, not a non-directory before it",
                    crate::names::shown(&t)
                )));
            };
            // Both names go into place by rename (one inode), or are linked again when copied.
            item = target.clone();
            let (tdir, tname) = sys::open_parent(tree, &t)?;
            rustix::fs::linkat(&tdir, &tname, &dir, &name, AtFlags::empty())?;
        } else {
            create(dir.as_fd(), &name, kind, e, link, &shown)?;
        }
        self.entries.insert(path, item);
        Ok(())
    }

    /// The stage directory `rel`, made (as a placeholder) if missing.
    fn stage_dir(&mut self, tree: BorrowedFd<'_>, rel: &Path) -> ovl_core::Result<OwnedFd> {
        let placeholders = &mut self.placeholders;
        make_dirs(tree, rel, &mut |p| {
            placeholders.insert(p.to_path_buf());
        })
    }

    /// Checks, before anything changes, that the parents the stream does not hold are directories
    /// in `root` (or absent, or removed by the stream first): otherwise it was made for another tree.
    fn check_base(&self, root: BorrowedFd<'_>) -> anyhow::Result<()> {
        let whiteouts: HashSet<&Path> = self.whiteouts.iter().map(PathBuf::as_path).collect();
        let opaque: HashSet<&Path> = self.opaque.iter().map(PathBuf::as_path).collect();
        for p in &self.placeholders {
            let mut q = PathBuf::new();
            for c in p.iter() {
                let emptied = opaque.contains(q.as_path());
                q.push(c);
                if emptied || whiteouts.contains(q.as_path()) {
                    break;
                }
                match sys::lstat_beneath(root, &q) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) if self.entries.contains_key(&q) => break,
                    Ok(_) => bail!(
                        "the stream was made for another tree: {} is not a directory here",
                        crate::names::shown(&q)
                    ),
                    Err(e) if e.errno() == Errno::NOENT => break,
                    Err(e) => return Err(anyhow::Error::from(e).context(crate::names::shown(&q))),
                }
            }
        }
        Ok(())
    }

    /// Gives the staged objects their metadata before they are renamed into place, so none shows
    /// under its name with the stage's mode or owner (they are set again after the rename, for
    /// objects copied instead). Children first. Directories only as root: a non-root receive
    /// could lose the right to move children out of a staged directory it has made read-only.
    fn premeta(&self, tree: BorrowedFd<'_>) -> anyhow::Result<()> {
        let root = rustix::process::geteuid().is_root();
        for (p, item) in self.entries.iter().rev() {
            if item.kind != Kind::Dir || root {
                let (dir, name) = sys::open_parent(tree, p)?;
                set_meta(dir.as_fd(), &name, item).with_context(|| format!("staging {}", crate::names::shown(p)))?;
            }
        }
        Ok(())
    }

    /// Applies the staged stream to `root`: whiteouts, opaque markers, objects (renamed from
    /// `tree`, or copied across filesystems) with their metadata, then times.
    fn apply(&self, root: BorrowedFd<'_>, tree: BorrowedFd<'_>, step: &dyn Fn()) -> anyhow::Result<u64> {
        // The directories the stream changes inside but does not carry kept their metadata from
        // A to B: their times are put back at the end (a hard link's other name, a whiteout, an
        // opaque dir's emptying changed their mtime here). The target's root is one of them.
        let touched: BTreeSet<&Path> = self
            .whiteouts
            .iter()
            .filter_map(|w| w.parent())
            .chain(self.opaque.iter().map(PathBuf::as_path))
            .chain(self.entries.keys().filter_map(|p| p.parent()))
            .filter(|d| !self.entries.contains_key(*d))
            .collect();
        let mut kept = Vec::new();
        for d in touched {
            if let Some(fd) = existing_dir(root, d)? {
                let st = rustix::fs::fstat(&fd)?;
                let times = Timestamps {
                    last_access: Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
                    last_modification: Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
                };
                kept.push((d, times));
            }
        }
        let mut n = 0;
        for w in &self.whiteouts {
            let (parent, name) = split(w)?;
            if let Some(dir) = existing_dir(root, parent)? {
                sys::remove_tree_at(&dir, &name).with_context(|| format!("removing {}", crate::names::shown(w)))?;
            }
            step();
            n += 1;
        }
        for d in &self.opaque {
            if let Some(dir) = existing_dir(root, d)? {
                for e in sys::read_dir_fd(rustix::io::dup(&dir)?)? {
                    sys::remove_tree_at(&dir, &sys::name_cstr(&e.name)?)
                        .with_context(|| format!("emptying {}", crate::names::shown(d)))?;
                }
            }
            step();
            n += 1;
        }
        let mut copy = rustix::fs::fstat(tree)?.st_dev != rustix::fs::fstat(root)?.st_dev;
        if !copy {
            self.premeta(tree)?;
        }
        let mut moved: Option<&Path> = None;
        // Where each staged object with several links was placed: when objects are copied, its
        // other names are linked to that copy (renamed objects keep their links by themselves).
        let mut placed: HashMap<(u64, u64), &Path> = HashMap::new();
        for (p, item) in &self.entries {
            let shown = || crate::names::shown(p);
            let (parent, name) = split(p)?;
            let dir = make_dirs(root, parent, &mut |_| {}).with_context(shown)?;
            let linked = if item.kind == Kind::Dir || moved.is_some_and(|m| p.starts_with(m)) {
                None
            } else {
                let (sdir, sname) = sys::open_parent(tree, p).with_context(shown)?;
                Some(sys::lstat_at(&sdir, &sname).with_context(shown)?).filter(|st| st.st_nlink > 1)
            };
            let first = linked.and_then(|st| placed.get(&(st.st_dev, st.st_ino)).copied());
            if let Some(first) = first.filter(|_| copy) {
                link_placed(root, first, dir.as_fd(), &name).with_context(shown)?;
            } else if !moved.is_some_and(|m| p.starts_with(m))
                && place(tree, dir.as_fd(), p, &name, item, &mut copy).with_context(shown)?
            {
                moved = Some(p);
            }
            if let Some(st) = linked {
                placed.entry((st.st_dev, st.st_ino)).or_insert(p);
            }
            set_meta(dir.as_fd(), &name, item).with_context(shown)?;
            step();
            n += 1;
        }
        // Last: placing an object changes its parent's mtime.
        for (p, item) in &self.entries {
            let ts = |(sec, nsec): (i64, u32)| Timespec { tv_sec: sec as _, tv_nsec: nsec as _ };
            let times = Timestamps { last_access: ts(item.meta.atime), last_modification: ts(item.meta.mtime) };
            let (dir, name) = sys::open_parent(root, p)?;
            rustix::fs::utimensat(&dir, &name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .with_context(|| format!("setting the times of {}", crate::names::shown(p)))?;
        }
        for (d, times) in kept {
            if let Some(fd) = existing_dir(root, d)? {
                rustix::fs::utimensat(&fd, c".", &times, AtFlags::empty())
                    .with_context(|| format!("putting back the times of {}", crate::names::shown(d)))?;
            }
        }
        Ok(n)
    }
}

fn push_new(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

/// The metadata of an entry: its header, overridden by its PAX records.
fn meta(h: &Header, pax: &Records) -> anyhow::Result<Meta> {
    let id = |v: &[u8]| std::str::from_utf8(v).ok().and_then(|s| s.parse::<u32>().ok()).context("a bad PAX uid/gid");
    let time = |v: &[u8]| parse_time(v).context("a bad PAX time");
    let mut m = Meta {
        mode: h.mode()? & 0o7777,
        uid: u32::try_from(h.uid()?)?,
        gid: u32::try_from(h.gid()?)?,
        mtime: (i64::try_from(h.mtime()?)?, 0),
        atime: (0, 0),
        xattrs: BTreeMap::new(),
    };
    let mut atime = None;
    for (k, v) in pax {
        match k.as_slice() {
            b"uid" => m.uid = id(v)?,
            b"gid" => m.gid = id(v)?,
            b"mtime" => m.mtime = time(v)?,
            b"atime" => atime = Some(time(v)?),
            _ => {
                if let Some(name) = k.strip_prefix(b"SCHILY.xattr.").filter(|n| !n.is_empty() && !private_xattr(n)) {
                    m.xattrs.insert(CString::new(name)?, v.clone());
                }
            }
        }
    }
    m.atime = atime.unwrap_or(m.mtime);
    Ok(m)
}

/// Makes the staged object of an entry (`kind`, data `e`, symlink target `link`) at `name` in `dir`.
fn create(
    dir: BorrowedFd<'_>,
    name: &CStr,
    kind: Kind,
    e: &mut impl Read,
    link: Vec<u8>,
    shown: &str,
) -> anyhow::Result<()> {
    let private = Mode::from_raw_mode(0o600);
    match kind {
        Kind::Dir => rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755))?,
        Kind::File => {
            let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let mut f = File::from(rustix::fs::openat(dir, name, flags, private)?);
            copy_data(e, &mut f, shown)?;
        }
        Kind::Symlink => {
            let target = CString::new(link).ok().filter(|t| !t.is_empty());
            let target = target.ok_or_else(|| bad(format!("entry {shown}: a symlink without a target")))?;
            rustix::fs::symlinkat(target.as_c_str(), dir, name)?;
        }
        Kind::Fifo => rustix::fs::mknodat(dir, name, FileType::Fifo, private, 0)?,
        Kind::Char(d) => rustix::fs::mknodat(dir, name, FileType::CharacterDevice, private, d)?,
        Kind::Block(d) => rustix::fs::mknodat(dir, name, FileType::BlockDevice, private, d)?,
    }
    Ok(())
}

/// Copies the data of entry `e` into `f`; the stream must hold all of it.
fn copy_data(e: &mut impl Read, f: &mut File, shown: &str) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n =
            e.read(&mut buf).map_err(|err| bad(format!("the stream is truncated in the data of {shown}: {err}")))?;
        if n == 0 {
            return Ok(());
        }
        f.write_all(&buf[..n])?;
    }
}

/// The directory `rel` beneath `root` if it is one there (reached without symlinks).
fn existing_dir(root: BorrowedFd<'_>, rel: &Path) -> anyhow::Result<Option<OwnedFd>> {
    match sys::open_dir_path(root, rel) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens directory `rel` beneath `root`, making missing components (mode 0755, each reported to
/// `made`); a symlink or non-directory on the way gives `ELOOP`/`ENOTDIR`.
fn make_dirs(root: BorrowedFd<'_>, rel: &Path, made: &mut dyn FnMut(&Path)) -> ovl_core::Result<OwnedFd> {
    match sys::open_dir_path(root, rel) {
        Err(e) if e.errno() == Errno::NOENT => {}
        r => return r,
    }
    let mut dir = sys::open_dir_path(root, Path::new(""))?;
    let mut sofar = PathBuf::new();
    for c in rel.iter() {
        sofar.push(c);
        dir = match sys::open_dir_path(&dir, Path::new(c)) {
            Err(e) if e.errno() == Errno::NOENT => {
                rustix::fs::mkdirat(&dir, &sys::name_cstr(c)?, Mode::from_raw_mode(0o755))?;
                made(&sofar);
                sys::open_dir_path(&dir, Path::new(c))?
            }
            r => r?,
        };
    }
    Ok(dir)
}

/// Puts staged `p` at `name` in `dir`, replacing what is there (a directory over a directory is
/// kept: the stream's entries below it merge). True when a directory was moved in whole.
fn place(
    tree: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    p: &Path,
    name: &CString,
    item: &Item,
    copy: &mut bool,
) -> anyhow::Result<bool> {
    let existing = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
        Err(Errno::NOENT) => None,
        Err(e) => return Err(e.into()),
    };
    let is_dir = item.kind == Kind::Dir;
    match existing {
        Some(FileType::Directory) if is_dir => return Ok(false),
        Some(FileType::Directory) => sys::remove_tree_at(dir, name)?,
        Some(_) if is_dir || *copy => rustix::fs::unlinkat(dir, name, AtFlags::empty())?,
        _ => {}
    }
    let (sdir, sname) = sys::open_parent(tree, p)?;
    if !*copy {
        match rustix::fs::renameat(&sdir, &sname, dir, name) {
            Ok(()) => return Ok(is_dir),
            Err(Errno::XDEV) => {
                *copy = true;
                if existing.is_some() && !is_dir {
                    rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let private = Mode::from_raw_mode(0o600);
    match item.kind {
        Kind::Dir => rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?,
        Kind::File => {
            let src =
                rustix::fs::openat(&sdir, &sname, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
            let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let dst = rustix::fs::openat(dir, name, flags, private)?;
            io::copy(&mut File::from(src), &mut File::from(dst))?;
        }
        Kind::Symlink => {
            let target = rustix::fs::readlinkat(&sdir, &sname, Vec::new())?;
            rustix::fs::symlinkat(target.as_c_str(), dir, name)?;
        }
        Kind::Fifo => rustix::fs::mknodat(dir, name, FileType::Fifo, private, 0)?,
        Kind::Char(d) => rustix::fs::mknodat(dir, name, FileType::CharacterDevice, private, d)?,
        Kind::Block(d) => rustix::fs::mknodat(dir, name, FileType::BlockDevice, private, d)?,
    }
    Ok(false)
}

/// Makes `name` in `dir` (replacing a non-directory there) another name of the object placed at
/// `first` beneath `root`.
fn link_placed(root: BorrowedFd<'_>, first: &Path, dir: BorrowedFd<'_>, name: &CString) -> anyhow::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => sys::remove_tree_at(dir, name)?,
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())?,
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let (fdir, fname) = sys::open_parent(root, first)?;
    rustix::fs::linkat(&fdir, &fname, dir, name, AtFlags::empty())?;
    Ok(())
}

/// Gives `name` in `dir` the owner (when root), mode and exactly the xattrs of `item` (leaving
/// the target's security labels and overlay metadata alone).
fn set_meta(dir: BorrowedFd<'_>, name: &CString, item: &Item) -> anyhow::Result<()> {
    let m = &item.meta;
    if rustix::process::geteuid().is_root() {
        let (uid, gid) = (rustix::fs::Uid::from_raw(m.uid), rustix::fs::Gid::from_raw(m.gid));
        rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW).context("chown")?;
    }
    if item.kind != Kind::Symlink {
        // After chown, which clears the set-ID bits.
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(m.mode), AtFlags::empty()).context("chmod")?;
    }
    for k in sys::list_xattrs(dir, Some(name))? {
        let k = CString::new(k.as_bytes())?;
        if !private_xattr(k.as_bytes()) && !m.xattrs.contains_key(&k) {
            sys::remove_xattr(dir, Some(name), &k).with_context(|| format!("removing xattr {k:?}"))?;
        }
    }
    for (k, v) in &m.xattrs {
        sys::set_xattr(dir, Some(name), k, v, 0).with_context(|| format!("setting xattr {k:?}"))?;
    }
    Ok(())
}
