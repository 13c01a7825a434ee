//! Deleting a snapshot that is not the oldest: its layer `u_k` is merged into the next older layer
//! `u_(k-1)`, so that the older snapshot's view stays the same to the byte without `u_k`.
//!
//! View A (the older snapshot) is `u_(k-1) : u_k : rest` and view B (the next newer snapshot, or
//! LIVE) is `rest`. The merged layer `m` must give `m : rest == A`: it holds exactly what differs
//! between A and B, found by the diff (which only visits what those two layers touch), written in
//! A's paths: a whiteout where B has something A has not; A's object where A has something B has
//! not or has differently (files are hard links to the inode in `u_(k-1)` or `u_k`, which both go
//! away, so nothing is copied; an object A shows from a layer below them is copied, never linked:
//! sharing a LIVE inode would make the snapshot change with LIVE; the names of one such file share
//! one copy); a directory whose A side the two layers alone decide (opaque, new)
//! is taken whole and opaque; a directory that moved gets an absolute redirect to its place in B;
//! the directories on the way get A's metadata and a redirect where their place in B differs.
//!
//! The diff it is built from counts a different mtime as a change, so that A's times stay (a
//! directory whose entries changed in B, a file only touched). Two things the diff does not see
//! are kept as well (issue 16.4): every name A shows of a
//! hard-linked file of the two layers is put in `m` as a link of it (else a name the diff found
//! equal in B would show B's object, splitting the group), and every directory made in `m` gets
//! A's times back once all its entries are in (making them moved its mtime).
//!
//! The same build over more range layers, which then stay, consolidates the top layers of a view
//! deeper than the kernel stacks into one (`Snapper::view_layers`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result, XattrNames, make_whiteout};
use ovl_lookup::Entry;
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps};

use crate::diff::{Change, Differ, Report, translate};

/// Builds the merged layer into the empty directory `out` from views `a` (`range` layers over
/// `b`: two for a delete, any number for a view consolidated for the kernel) and `b`. Returns
/// the inode numbers of objects that views of A and older may have shown and no longer show:
/// for a delete, the merged layers' objects not linked into `out` (they go), and objects of
/// layers below that were copied (see `Views::saved`).
///
/// `keep`: the range layers stay (a consolidated view layer, not a delete): their files are
/// copied (cloned where the filesystem can, by `copy_file_range`) rather than linked, so that
/// link counts stay what the view shows; the names of one file still share one copy.
pub(crate) fn build(
    a: &LayerStack,
    b: &LayerStack,
    range: u16,
    keep: bool,
    hidden: &[std::ffi::OsString],
    out: BorrowedFd<'_>,
) -> Result<Vec<u64>> {
    let report = Differ::new(a, b, range as usize, hidden).with_times().run()?;
    let copied = keep.then(Default::default);
    let resolver = crate::resolver::Resolver::new(a)?;
    let mut m = Merge {
        a,
        range,
        copied,
        out,
        made: BTreeSet::new(),
        times: Vec::new(),
        resolver,
        from_below: Vec::new(),
        below_links: Default::default(),
        hidden,
    };
    // Before anything is linked into `out`, which adds to the link counts.
    let mut groups = Vec::new();
    let mut held = std::collections::HashSet::new();
    for l in 0..range {
        let objects = non_dirs(a.layer(LayerId(l)).root()?.as_fd())?;
        held.extend(objects.iter().map(|(_, st)| st.st_ino));
        groups.push(linked_files(objects));
    }
    m.root_meta()?;
    m.apply(&report)?;
    for g in groups {
        m.keep_link_groups(g)?;
    }
    m.keep_groups_from_below()?;
    m.put_back_dir_times()?;
    let mut gone = std::mem::take(&mut m.from_below);
    if !keep {
        for (_, st) in non_dirs(out)? {
            held.remove(&st.st_ino);
        }
        gone.extend(held);
    }
    Ok(gone)
}

struct Merge<'a> {
    a: &'a LayerStack,
    /// The top layers of `a` that are merged (`LayerId(0)` up to this, excluded).
    range: u16,
    /// When the range layers stay: their files copied so far, by inode, with the path of the copy.
    copied: Option<std::collections::HashMap<(u64, u64), PathBuf>>,
    out: BorrowedFd<'a>,
    made: BTreeSet<PathBuf>,
    /// Every directory made in the merged layer, with A's times for it.
    times: Vec<(PathBuf, Timestamps)>,
    /// Paths of A, resolved (A does not change while the merge is built).
    resolver: crate::resolver::Resolver<'a>,
    /// Inode numbers of the objects of layers below the range that were copied.
    from_below: Vec<u64>,
    /// Of those with several links: by inode, the path of the copy, the names put so far and
    /// the file's link count, so that A's names of one such file share one copy
    /// (`keep_groups_from_below`).
    below_links: std::collections::HashMap<(u64, u64), (PathBuf, u64, u64)>,
    /// Root names that are no part of either view.
    hidden: &'a [std::ffi::OsString],
}

impl Merge<'_> {
    fn names(&self) -> &XattrNames {
        self.a.names()
    }

    /// Resolves `p` in view A.
    fn resolve(&self, p: &Path) -> Result<Option<Entry>> {
        self.resolver.resolve(p)
    }

    /// The merged layer's root gets A's root metadata (the kernel shows the top layer's root).
    fn root_meta(&mut self) -> Result<()> {
        let root = self.resolver.root();
        let top = root.lowers.first().ok_or(Errno::IO)?;
        let src = self.a.layer(top.layer).root()?;
        let src = src.as_fd();
        let st = rustix::fs::fstat(src)?;
        self.times.push((PathBuf::new(), times_of(&st)));
        copy_meta(src, None, &st, self.out, None)
    }

    fn apply(&mut self, report: &Report) -> Result<()> {
        // The shallowest A dirs the merged layers alone decide: each is taken whole.
        let mut whole: BTreeSet<PathBuf> = BTreeSet::new();
        for c in &report.changes {
            let pa = match c {
                Change::Added { at, .. } => at,
                Change::Deleted { path, .. } | Change::Modified { path, .. } | Change::Renamed { path, .. } => path,
            };
            if let Some(w) = self.decided_ancestor(pa)? {
                whole.insert(w);
            }
        }
        let under = |p: &Path| whole.iter().any(|w| p.starts_with(w));
        let whole_list: Vec<PathBuf> = whole.iter().cloned().collect();
        for w in &whole_list {
            if whole_list.iter().any(|o| o != w && w.starts_with(o)) {
                continue;
            }
            self.ensure_parents(w)?;
            self.take_whole(w)?;
        }
        for c in &report.changes {
            match c {
                // The root's metadata is A's already (see `root_meta`).
                Change::Modified { path, .. } if path.as_os_str().is_empty() => {}
                Change::Renamed { path, to } if !under(path) => self.ensure_dir(path, Some(to))?,
                Change::Modified { path, .. } if !under(path) => {
                    let e = self.resolve(path)?.ok_or(Errno::IO)?;
                    if e.kind == FileType::Directory && self.translate(path)?.is_some() {
                        self.ensure_dir(path, None)?;
                    } else {
                        self.ensure_parents(path)?;
                        self.take_whole(path)?;
                    }
                }
                Change::Deleted { path, .. } if !under(path) => {
                    self.ensure_parents(path)?;
                    self.take_whole(path)?;
                }
                // Where A has an object of its own (a moved dir's old place), that object,
                // written above, already hides B's.
                Change::Added { at, .. } if !under(at) && self.resolve(at)?.is_none() => {
                    self.ensure_parents(at)?;
                    let (dir, name) = self.parent_of(at)?;
                    make_whiteout(&dir, &name)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn translate(&self, pa: &Path) -> Result<Option<PathBuf>> {
        translate(self.a, self.range, pa)
    }

    /// The shallowest existing A dir at or above `pa` (excluding the root) that the merged layers
    /// alone decide.
    fn decided_ancestor(&self, pa: &Path) -> Result<Option<PathBuf>> {
        let mut cur = PathBuf::new();
        for c in pa.iter() {
            cur.push(c);
            match self.resolve(&cur)? {
                Some(e) if e.kind == FileType::Directory => {
                    if self.translate(&cur)?.is_none() {
                        return Ok(Some(cur));
                    }
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    fn parent_of(&self, p: &Path) -> Result<(std::os::fd::OwnedFd, std::ffi::CString)> {
        sys::open_parent(self.out, p)
    }

    /// Makes every parent of `pa` exist in the merged layer.
    fn ensure_parents(&mut self, pa: &Path) -> Result<()> {
        if let Some(parent) = pa.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.ensure_dir(parent, None)?;
        }
        Ok(())
    }

    /// Makes dir `pa` exist in the merged layer with A's metadata, merging with B: with a
    /// redirect to `to` (or to wherever B has it, when that is not the default place).
    fn ensure_dir(&mut self, pa: &Path, to: Option<&PathBuf>) -> Result<()> {
        self.ensure_parents(pa)?;
        let (dir, name) = self.parent_of(pa)?;
        if !self.made.contains(pa) {
            let e = self.resolve(pa)?.ok_or(Errno::IO)?;
            let (root, path) = Differ::location(self.a, &e)?;
            let root = root.as_fd();
            rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700))?;
            let (sdir, sname) = open_at(root, &path)?;
            copy_meta(sdir.as_ref().map_or(root, |d| d.as_fd()), sname.as_deref(), &e.stat, dir.as_fd(), Some(&name))?;
            self.made.insert(pa.to_path_buf());
            self.times.push((pa.to_path_buf(), times_of(&e.stat)));
        }
        let target = match to {
            Some(t) => Some(t.clone()),
            None => self.translate(pa)?,
        };
        let default = match pa.parent() {
            Some(p) => self.translate(p)?.map(|t| t.join(pa.file_name().unwrap_or_default())),
            None => Some(pa.to_path_buf()),
        };
        if let Some(t) = target.filter(|t| Some(t) != default.as_ref()) {
            let mut v = b"/".to_vec();
            v.extend_from_slice(t.as_os_str().as_encoded_bytes());
            sys::set_xattr(&dir, Some(&name), &self.names().redirect, &v, 0)?;
        }
        Ok(())
    }

    /// Puts A's object at `pa` into the merged layer, a dir with everything below it (opaque).
    fn take_whole(&mut self, pa: &Path) -> Result<()> {
        let e = self.resolve(pa)?.ok_or(Errno::IO)?;
        let (dir, name) = self.parent_of(pa)?;
        if e.kind == FileType::Directory {
            if self.made.contains(pa) {
                // Made as a parent already: it becomes the whole dir.
                sys::remove_tree_at(&dir, &name)?;
                self.made.remove(pa);
            }
            self.copy_dir(&e, pa, &dir, &name)?;
            sys::set_xattr(&dir, Some(&name), &self.names().opaque, b"y", 0)?;
        } else {
            self.put_file(&e, pa, &dir, &name)?;
        }
        Ok(())
    }

    /// Puts A's non-directory `e` (at A path `pa`) in the merged layer as `dir/name`: a link of
    /// its inode when it is in one of the merged layers (which go away; when they stay, a copy,
    /// or a link of the copy already made of that inode), else a copy. A link to an object of a
    /// layer below, LIVE above all, would make the merged snapshot change with it.
    fn put_file(&mut self, e: &Entry, pa: &Path, dir: &std::os::fd::OwnedFd, name: &std::ffi::CStr) -> Result<()> {
        let (root, path) = Differ::location(self.a, e)?;
        let root = root.as_fd();
        let (sdir, sname) = sys::open_parent(root, &path)?;
        let layer = e.lower.as_ref().map(|l| l.layer).ok_or(Errno::IO)?;
        if layer.0 < self.range {
            let Some(copied) = &mut self.copied else {
                rustix::fs::linkat(&sdir, &sname, dir, name, AtFlags::empty())?;
                return Ok(());
            };
            let key = (e.stat.st_dev, e.stat.st_ino);
            if let Some(first) = copied.get(&key) {
                let (fdir, fname) = sys::open_parent(self.out, first)?;
                rustix::fs::linkat(&fdir, &fname, dir, name, AtFlags::empty())?;
            } else {
                copy_object(&sdir, &sname, &e.stat, dir.as_fd(), name)?;
                copied.insert(key, pa.to_path_buf());
            }
            return Ok(());
        }
        tracing::debug!(?path, "the merged layer gets a copy of an object of a lower layer");
        let key = (e.stat.st_dev, e.stat.st_ino);
        if let Some((first, names, _)) = self.below_links.get_mut(&key) {
            // Another name of a hard-linked file copied already: the names share the copy.
            let (fdir, fname) = sys::open_parent(self.out, first)?;
            rustix::fs::linkat(&fdir, &fname, dir, name, AtFlags::empty())?;
            *names += 1;
            return Ok(());
        }
        self.from_below.push(e.stat.st_ino);
        copy_object(&sdir, &sname, &e.stat, dir.as_fd(), name)?;
        if e.stat.st_nlink > 1 {
            self.below_links.insert(key, (pa.to_path_buf(), 1, e.stat.st_nlink));
        }
        Ok(())
    }

    /// Copies A's dir `e` (at A path `pa`) to `dir/name`: the dir, then every entry below it
    /// (files as hard links to the range layers' inodes).
    fn copy_dir(&mut self, e: &Entry, pa: &Path, dir: &std::os::fd::OwnedFd, name: &std::ffi::CStr) -> Result<()> {
        let (root, path) = Differ::location(self.a, e)?;
        let root = root.as_fd();
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?;
        let (sdir, sname) = open_at(root, &path)?;
        copy_meta(sdir.as_ref().map_or(root, |d| d.as_fd()), sname.as_deref(), &e.stat, dir.as_fd(), Some(name))?;
        self.times.push((pa.to_path_buf(), times_of(&e.stat)));
        let layers = e.dir.as_ref().ok_or(Errno::IO)?;
        let out =
            rustix::fs::openat(dir, name, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY, Mode::empty())?;
        for child in ovl_lookup::read_merged(self.a, layers)? {
            let ce = ovl_lookup::lookup(self.a, layers, &child.name)?.ok_or(Errno::IO)?;
            let cname = sys::name_cstr(&child.name)?;
            if ce.kind == FileType::Directory {
                self.copy_dir(&ce, &pa.join(&child.name), &out, &cname)?;
            } else {
                self.put_file(&ce, &pa.join(&child.name), &out, &cname)?;
            }
        }
        Ok(())
    }
}

impl Merge<'_> {
    /// Puts in the merged layer every name A shows of each hard-linked file of a merged layer
    /// (`groups`, found before the merge began) that is not there yet, as a link of that file.
    fn keep_link_groups(&mut self, groups: BTreeMap<(u64, u64), Vec<PathBuf>>) -> Result<()> {
        for ((dev, ino), names) in groups {
            for p in names {
                // Only names A shows as this very file (an upper layer may hide some).
                let shown = self.resolve(&p)?.is_some_and(|e| (e.stat.st_dev, e.stat.st_ino) == (dev, ino));
                if !shown || present(self.out, &p)? {
                    continue;
                }
                self.ensure_parents(&p)?;
                self.take_whole(&p)?;
            }
        }
        Ok(())
    }

    /// A hard-linked file of a layer below the range that was copied (its dir taken whole) must
    /// not lose the names A shows of it that the diff did not list: they would show the file
    /// below, a separate object from the copy, and the group would split in A's view (a
    /// directory moved into a new one, then back by a restore, and the snapshot between
    /// deleted: model seed 1017). Where fewer names were put than the file has links, A's tree
    /// is walked for the others (rare: only then), and each is linked to the copy. Links the
    /// file has outside A (a CoW link in a snapshot layer) are simply not found.
    fn keep_groups_from_below(&mut self) -> Result<()> {
        let wanted: std::collections::HashSet<(u64, u64)> =
            self.below_links.iter().filter(|(_, (_, names, nlink))| names < nlink).map(|(k, _)| *k).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut found = Vec::new();
        let mut todo = vec![(PathBuf::new(), self.resolver.root())];
        while let Some((dir, layers)) = todo.pop() {
            for child in ovl_lookup::read_merged(self.a, &layers)? {
                if dir.as_os_str().is_empty() && self.hidden.contains(&child.name) {
                    continue;
                }
                let Some(e) = ovl_lookup::lookup(self.a, &layers, &child.name)? else { continue };
                let p = dir.join(&child.name);
                match (e.kind, e.dir) {
                    (FileType::Directory, Some(d)) => todo.push((p, d)),
                    _ if wanted.contains(&(e.stat.st_dev, e.stat.st_ino)) => found.push((p, e.stat)),
                    _ => {}
                }
            }
        }
        for (p, st) in found {
            if present(self.out, &p)? {
                continue;
            }
            let Some((first, names, nlink)) = self.below_links.get(&(st.st_dev, st.st_ino)).cloned() else {
                continue;
            };
            self.ensure_parents(&p)?;
            let (dir, name) = self.parent_of(&p)?;
            let (fdir, fname) = sys::open_parent(self.out, &first)?;
            rustix::fs::linkat(&fdir, &fname, &dir, &name, AtFlags::empty())?;
            self.below_links.insert((st.st_dev, st.st_ino), (first, names + 1, nlink));
        }
        Ok(())
    }

    /// Gives each directory made in the merged layer A's times again, now that its entries are in.
    fn put_back_dir_times(&self) -> Result<()> {
        for (p, times) in &self.times {
            let fd = match sys::open_dir_path(self.out, p) {
                Ok(fd) => fd,
                // Made as a parent, then replaced by a whole copy (recorded again).
                Err(e) if e.errno() == Errno::NOENT => continue,
                Err(e) => return Err(e),
            };
            sys::set_times(fd.as_fd(), times)?;
        }
        Ok(())
    }
}

/// The non-directories of the layer `root` (whiteouts aside), with their paths in it.
fn non_dirs(root: BorrowedFd<'_>) -> Result<Vec<(PathBuf, rustix::fs::Stat)>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        for e in sys::read_dir(root, &dir)? {
            let p = dir.join(&e.name);
            if e.file_type == FileType::Directory {
                todo.push(p);
                continue;
            }
            let st = sys::lstat_beneath(root, &p)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => todo.push(p),
                _ if !ovl_core::is_whiteout_stat(&st) => out.push((p, st)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Of a layer's non-directories, those with several links, by inode, each with its names.
fn linked_files(objects: Vec<(PathBuf, rustix::fs::Stat)>) -> BTreeMap<(u64, u64), Vec<PathBuf>> {
    let mut out: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, st) in objects {
        if st.st_nlink > 1 {
            out.entry((st.st_dev, st.st_ino)).or_default().push(p);
        }
    }
    out
}

/// Copies the non-directory `sname` in `sdir` (whose `lstat` is `st`) to `name` in `dir`, with
/// its data, owner, mode, times and user-visible xattrs.
fn copy_object(
    sdir: &std::os::fd::OwnedFd,
    sname: &std::ffi::CStr,
    st: &rustix::fs::Stat,
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
) -> Result<()> {
    use rustix::fs::OFlags;
    let kind = FileType::from_raw_mode(st.st_mode);
    match kind {
        FileType::RegularFile => {
            let src =
                rustix::fs::openat(sdir, sname, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
            let dst = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600))?;
            let (mut src, mut dst) = (std::fs::File::from(src), std::fs::File::from(dst));
            std::io::copy(&mut src, &mut dst).map_err(ovl_core::Error::from)?;
            dst.sync_all().map_err(ovl_core::Error::from)?;
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(sdir, sname, Vec::new())?;
            rustix::fs::symlinkat(&target, dir, name)?;
            // Only owner and times: a symlink's mode is fixed, and most filesystems refuse
            // user xattrs on it.
            let uid = Some(rustix::fs::Uid::from_raw(st.st_uid));
            let gid = Some(rustix::fs::Gid::from_raw(st.st_gid));
            rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
            rustix::fs::utimensat(dir, name, &times_of(st), AtFlags::SYMLINK_NOFOLLOW)?;
            return Ok(());
        }
        _ => rustix::fs::mknodat(dir, name, kind, Mode::from_raw_mode(0o600), st.st_rdev)?,
    }
    copy_meta(sdir.as_fd(), Some(sname), st, dir, Some(name))
}

/// Whether `p` exists in the merged layer `out`.
fn present(out: BorrowedFd<'_>, p: &Path) -> Result<bool> {
    match sys::lstat_beneath(out, p) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR) => Ok(false),
        Err(e) => Err(e),
    }
}

fn times_of(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
        last_modification: Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
    }
}

/// The parent dir and name of `path` in a layer, or `None` for the layer root itself.
fn open_at(root: BorrowedFd<'_>, path: &Path) -> Result<(Option<std::os::fd::OwnedFd>, Option<std::ffi::CString>)> {
    if path.as_os_str().is_empty() {
        return Ok((None, None));
    }
    let (d, n) = sys::open_parent(root, path)?;
    Ok((Some(d), Some(n)))
}

/// Gives `dst_dir/dst_name` (or `dst_dir` itself) the owner, mode, times and user-visible
/// xattrs of `src_dir/src_name` (whose `lstat` is `st`).
fn copy_meta(
    src_dir: BorrowedFd<'_>,
    src_name: Option<&std::ffi::CStr>,
    st: &rustix::fs::Stat,
    dst_dir: BorrowedFd<'_>,
    dst_name: Option<&std::ffi::CStr>,
) -> Result<()> {
    for key in sys::list_xattrs(src_dir, src_name)? {
        if XattrNames::is_any_overlay(key.as_encoded_bytes()) {
            continue;
        }
        let k = std::ffi::CString::new(key.as_encoded_bytes()).map_err(|_| Errno::INVAL)?;
        if let Some(v) = sys::get_xattr(src_dir, src_name, &k)? {
            sys::set_xattr(dst_dir, dst_name, &k, &v, 0)?;
        }
    }
    let uid = Some(rustix::fs::Uid::from_raw(st.st_uid));
    let gid = Some(rustix::fs::Gid::from_raw(st.st_gid));
    let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
    let times = times_of(st);
    match dst_name {
        Some(n) => {
            rustix::fs::chownat(dst_dir, n, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
            rustix::fs::chmodat(dst_dir, n, mode, AtFlags::empty())?;
            rustix::fs::utimensat(dst_dir, n, &times, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        None => {
            rustix::fs::fchown(dst_dir, uid, gid)?;
            rustix::fs::fchmod(dst_dir, mode)?;
            sys::set_times(dst_dir, &times)?;
        }
    }
    Ok(())
}
