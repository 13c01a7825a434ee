//! The differences between snapshot A and a newer snapshot B (or LIVE), read from the layers in
//! between: only directories those layers touch are visited, so the cost grows with the number of
//! changes, not with the size of the tree.
//!
//! View A is the stack `range : view B`, where `range` is the layers `u_A .. u_(B-1)`. A name that
//! no range layer holds in a directory resolves in view A exactly as in view B, so a directory
//! whose A side merges with B's same directory only needs the names its range layers list. A
//! directory of A that the range layers moved (a redirect) is compared with where it is in B; one
//! they made opaque is compared name by name with B's directory of the same path.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result, XattrNames};
use ovl_lookup::{DirLayers, Entry};
use rustix::fs::{FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::layerwalk::{State, layer_walk};

/// One difference. Paths are relative to the root of the tree. In JSON each path is a string, or
/// `{"bytes": [...]}` when it is not UTF-8 ([`crate::names`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "lowercase")]
pub enum Change {
    /// `path` exists in B, not in A.
    Added {
        /// Where, in B.
        #[serde(with = "crate::names::json_path")]
        path: PathBuf,
        /// The same place in A (its parent may have moved).
        #[serde(with = "crate::names::json_path")]
        at: PathBuf,
    },
    /// `path` of A does not exist in B; `at` is where it would be in B.
    Deleted {
        /// Where, in A.
        #[serde(with = "crate::names::json_path")]
        path: PathBuf,
        /// The same place in B (its parent may have moved).
        #[serde(with = "crate::names::json_path")]
        at: PathBuf,
    },
    /// The object at `path` in A differs (data, type or metadata) from the one at `at` in B.
    Modified {
        /// Where, in A.
        #[serde(with = "crate::names::json_path")]
        path: PathBuf,
        /// Where, in B.
        #[serde(with = "crate::names::json_path")]
        at: PathBuf,
    },
    /// The directory at `path` in A is at `to` in B (differences inside are listed too).
    Renamed {
        /// Where, in A.
        #[serde(with = "crate::names::json_path")]
        path: PathBuf,
        /// Where, in B.
        #[serde(with = "crate::names::json_path")]
        to: PathBuf,
    },
}

/// The differences and how many names were examined to find them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The differences, in the order found (parents before children).
    pub changes: Vec<Change>,
    /// Names looked up on both sides: the cost of the diff.
    pub examined: u64,
}

/// Where in B the layers below the `range` top layers of `a` continue for A path `pa`; `None`
/// when the range layers alone decide what `pa` is.
pub(crate) fn translate(a: &LayerStack, range: u16, pa: &Path) -> Result<Option<PathBuf>> {
    let mut t = pa.to_path_buf();
    // Only the layers whose summaries show more than plain directories on the way are walked
    // (all of them without summaries): the others pass the path on unchanged.
    let walked = |from: u16, t: &Path| match a.presence() {
        Some(p) => p.reader().may_rewrite(range, t).into_iter().filter(|l| l.0 >= from).collect(),
        None => (from..range).map(LayerId).collect::<Vec<_>>(),
    };
    let mut todo = walked(0, &t);
    let mut i = 0;
    while i < todo.len() {
        let k = todo[i];
        i += 1;
        let w = layer_walk(a.layer(k).root()?.as_fd(), a.names(), &t)?;
        match w.state {
            State::Absent | State::Dir { opaque: false } if w.lower == t => {}
            State::Absent | State::Dir { opaque: false } => {
                // Rewritten by a redirect: the layers below see another path.
                t = w.lower;
                todo = walked(k.0 + 1, &t);
                i = 0;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(t))
}

impl Report {
    /// The report as users read it: a dir reported as renamed is not also "added" at its new
    /// place (the complete report, which merges need, lists both).
    pub fn for_display(mut self) -> Self {
        let targets: Vec<PathBuf> = self
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Renamed { to, .. } => Some(to.clone()),
                _ => None,
            })
            .collect();
        self.changes.retain(|c| !matches!(c, Change::Added { path, .. } if targets.contains(path)));
        self
    }
}

/// Diffs view `a` (whose `range` top layers are the difference) against view `b`.
pub(crate) struct Differ<'a> {
    a: &'a LayerStack,
    b: &'a LayerStack,
    range: u16,
    hidden: &'a [OsString],
    /// Objects whose mtimes differ count as changed (see [`Differ::with_times`]).
    times: bool,
    report: Report,
    /// Paths of B resolved so far (see [`Differ::resolve_b`]).
    resolver_b: Option<crate::resolver::Resolver<'a>>,
    /// The roots' layers of A and B, if given; B's also for its resolver, made when first used.
    roots: Option<(Arc<DirLayers>, Arc<DirLayers>)>,
}

impl<'a> Differ<'a> {
    /// `a` is `range` layers stacked over the layers of `b`; `hidden` are root names of neither.
    pub fn new(a: &'a LayerStack, b: &'a LayerStack, range: usize, hidden: &'a [OsString]) -> Self {
        Self {
            a,
            b,
            range: range as u16,
            hidden,
            times: false,
            report: Report::default(),
            resolver_b: None,
            roots: None,
        }
    }

    /// With the roots' layers of `a` and `b` known (a kept view's): not worked out again from
    /// each of their layers.
    pub fn with_roots(mut self, a: Arc<DirLayers>, b: Arc<DirLayers>) -> Self {
        self.roots = Some((a, b));
        self
    }

    /// Also reports objects that differ only in their mtime: a delete's merge must keep them (a
    /// directory whose entries changed later, a file only touched), while users of `diff`, `send`
    /// and `restore` are not told of a directory's time alone.
    pub fn with_times(mut self) -> Self {
        self.times = true;
        self
    }

    /// Runs the diff.
    pub fn run(mut self) -> Result<Report> {
        let (da, db) = match self.roots.clone() {
            Some(roots) => roots,
            None => (Arc::new(DirLayers::root(self.a)?), Arc::new(DirLayers::root(self.b)?)),
        };
        // The root shows its top layer's root: owner, mode, xattrs.
        let (ta, tb) = (da.lowers.first(), db.lowers.first());
        if let (Some(ta), Some(tb)) = (ta, tb) {
            let (ra, rb) = (self.a.layer(ta.layer).root()?, self.b.layer(tb.layer).root()?);
            let (ra, rb) = (ra.as_fd(), rb.as_fd());
            let (sa, sb) = (rustix::fs::fstat(ra)?, rustix::fs::fstat(rb)?);
            let meta = |s: &rustix::fs::Stat| (s.st_mode, s.st_uid, s.st_gid);
            if meta(&sa) != meta(&sb) || xattrs(ra, Path::new(""))? != xattrs(rb, Path::new(""))? {
                self.report.changes.push(Change::Modified { path: PathBuf::new(), at: PathBuf::new() });
            }
        }
        self.dir(Path::new(""), Path::new(""), &da, Some(&db), false)?;
        Ok(self.report)
    }

    fn translate(&self, pa: &Path) -> Result<Option<PathBuf>> {
        translate(self.a, self.range, pa)
    }

    /// Resolves `p` from the root of view B.
    fn resolve_b(&mut self, p: &Path) -> Result<Option<Entry>> {
        if self.resolver_b.is_none() {
            self.resolver_b = Some(match &self.roots {
                Some((_, db)) => crate::resolver::Resolver::with_root(self.b, DirLayers::clone(db)),
                None => crate::resolver::Resolver::new(self.b)?,
            });
        }
        self.resolver_b.as_ref().map_or(Ok(None), |r| r.resolve(p))
    }

    /// Compares dir `pa` of A (layers `da`) with dir `pb` of B (`db`). Unless `full`, only the
    /// names the range layers list are compared (the rest are the same on both sides).
    fn dir(&mut self, pa: &Path, pb: &Path, da: &DirLayers, db: Option<&DirLayers>, full: bool) -> Result<()> {
        let mut names: BTreeSet<OsString> = BTreeSet::new();
        for ld in da.lowers.iter().filter(|l| l.layer.0 < self.range) {
            for e in sys::read_dir(self.a.layer(ld.layer).root()?, &ld.path)? {
                names.insert(e.name);
            }
        }
        if full {
            if let Some(db) = db {
                names.extend(ovl_lookup::read_merged(self.b, db)?.into_iter().map(|e| e.name));
            }
        }
        let at_root = pa.as_os_str().is_empty();
        for x in names {
            if at_root && self.hidden.contains(&x) {
                continue;
            }
            self.report.examined += 1;
            let ea = ovl_lookup::lookup(self.a, da, &x)?;
            let eb = match db {
                Some(db) => ovl_lookup::lookup(self.b, db, &x)?,
                None => None,
            };
            self.entry(&pa.join(&x), &pb.join(&x), ea, eb)?;
        }
        Ok(())
    }

    fn entry(&mut self, pax: &Path, pbx: &Path, ea: Option<Entry>, eb: Option<Entry>) -> Result<()> {
        let changes = &mut self.report.changes;
        let Some(ea) = ea else {
            if eb.is_some() {
                changes.push(Change::Added { path: pbx.to_path_buf(), at: pax.to_path_buf() });
            }
            return Ok(());
        };
        let deleted = Change::Deleted { path: pax.to_path_buf(), at: pbx.to_path_buf() };
        let modified = Change::Modified { path: pax.to_path_buf(), at: pbx.to_path_buf() };
        if ea.kind != FileType::Directory {
            match eb {
                None => self.report.changes.push(deleted),
                Some(eb) => {
                    if self.differs(&ea, &eb)? {
                        self.report.changes.push(modified);
                    }
                }
            }
            return Ok(());
        }
        let da = ea.dir.clone().ok_or(Errno::IO)?;
        match self.translate(pax)? {
            Some(q) if q != pbx => {
                // Moved: compare with where it is in B; what B has at this path is another object.
                match self.resolve_b(&q)? {
                    Some(bq) if bq.kind == FileType::Directory => {
                        self.report.changes.push(Change::Renamed { path: pax.to_path_buf(), to: q.clone() });
                        if self.differs(&ea, &bq)? {
                            self.report.changes.push(Change::Modified { path: pax.to_path_buf(), at: q.clone() });
                        }
                        self.dir(pax, &q, &da, bq.dir.as_ref(), false)?;
                    }
                    _ => self.report.changes.push(deleted),
                }
                if eb.is_some() {
                    self.report.changes.push(Change::Added { path: pbx.to_path_buf(), at: pax.to_path_buf() });
                }
            }
            merged => match eb {
                Some(eb) if eb.kind == FileType::Directory => {
                    if self.differs(&ea, &eb)? {
                        self.report.changes.push(modified);
                    }
                    // Merged with B's dir: only the range's names can differ. Decided by the
                    // range alone (opaque): every name of both sides.
                    self.dir(pax, pbx, &da, eb.dir.as_ref(), merged.is_none())?;
                }
                Some(_) => self.report.changes.push(modified),
                None => self.report.changes.push(deleted),
            },
        }
        Ok(())
    }

    /// Where an entry's object is: its layer's root and its path there.
    pub(crate) fn location(stack: &LayerStack, e: &Entry) -> Result<(std::sync::Arc<std::os::fd::OwnedFd>, PathBuf)> {
        match (&e.lower, &e.dir) {
            (Some(l), _) => Ok((stack.layer(l.layer).root()?, l.path.clone())),
            (None, Some(d)) => {
                let l = d.lowers.first().ok_or(Errno::IO)?;
                Ok((stack.layer(l.layer).root()?, l.path.clone()))
            }
            (None, None) => Err(Errno::IO.into()),
        }
    }

    /// True when the objects differ in type, metadata, xattrs or contents.
    fn differs(&self, ea: &Entry, eb: &Entry) -> Result<bool> {
        let (sa, sb) = (&ea.stat, &eb.stat);
        if ea.kind != FileType::Directory && (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) {
            return Ok(false);
        }
        if ea.kind != eb.kind
            || sa.st_mode != sb.st_mode
            || sa.st_uid != sb.st_uid
            || sa.st_gid != sb.st_gid
            || sa.st_rdev != sb.st_rdev
            || (ea.kind != FileType::Directory && sa.st_size != sb.st_size)
            // A file that gained or lost names (issue 16.4): restore and send redo its links.
            || (ea.kind != FileType::Directory && sa.st_nlink != sb.st_nlink)
            || (self.times && (sa.st_mtime, sa.st_mtime_nsec) != (sb.st_mtime, sb.st_mtime_nsec))
        {
            return Ok(true);
        }
        let (ra, pa) = Self::location(self.a, ea)?;
        let ra = ra.as_fd();
        let (rb, pb) = Self::location(self.b, eb)?;
        let rb = rb.as_fd();
        if xattrs(ra, &pa)? != xattrs(rb, &pb)? {
            return Ok(true);
        }
        match ea.kind {
            FileType::Symlink => Ok(readlink(ra, &pa)? != readlink(rb, &pb)?),
            FileType::RegularFile => Ok(!same_contents(ra, &pa, rb, &pb)?),
            _ => Ok(false),
        }
    }
}

/// The user-visible xattrs of `path` in a layer (overlay metadata left out), sorted.
pub(crate) fn xattrs(root: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<Vec<(OsString, Vec<u8>)>> {
    let (dir, name) = if path.as_os_str().is_empty() {
        (rustix::io::dup(root)?, None)
    } else {
        let (d, n) = sys::open_parent(root, path)?;
        (d, Some(n))
    };
    let mut out = Vec::new();
    for k in sys::list_xattrs(&dir, name.as_deref())? {
        if XattrNames::is_any_overlay(k.as_encoded_bytes()) {
            continue;
        }
        let key = std::ffi::CString::new(k.as_encoded_bytes()).map_err(|_| Errno::INVAL)?;
        if let Some(v) = sys::get_xattr(&dir, name.as_deref(), &key)? {
            out.push((k, v));
        }
    }
    out.sort();
    Ok(out)
}

fn readlink(root: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<Vec<u8>> {
    let (d, n) = sys::open_parent(root, path)?;
    Ok(rustix::fs::readlinkat(&d, &n, Vec::new())?.into_bytes())
}

fn same_contents(
    ra: std::os::fd::BorrowedFd<'_>,
    pa: &Path,
    rb: std::os::fd::BorrowedFd<'_>,
    pb: &Path,
) -> Result<bool> {
    let open = |r, p: &Path| -> Result<std::fs::File> {
        Ok(std::fs::File::from(sys::open_beneath(r, p, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())?))
    };
    let (mut fa, mut fb) = (open(ra, pa)?, open(rb, pb)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// One line of `ovlsnap diff` in the style of `zfs diff`: `+`, `-`, `M`, `R`, a tab and the path,
/// escaped as `ls -b` does ([`crate::names::shown`]): one line per change whatever the names hold.
pub fn show(c: &Change) -> String {
    use crate::names::shown as p;
    match c {
        Change::Added { path, .. } => format!("+\t{}", p(path)),
        Change::Deleted { path, .. } => format!("-\t{}", p(path)),
        Change::Modified { path, .. } => format!("M\t{}", p(path)),
        Change::Renamed { path, to } => format!("R\t{} -> {}", p(path), p(to)),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    // Issue 16.5: a name that is not UTF-8 made the whole diff fail to serialize.
    #[test]
    fn changes_with_any_bytes_round_trip_through_json() {
        let p = |b: &[u8]| PathBuf::from(OsString::from_vec(b.to_vec()));
        let report = Report {
            changes: vec![
                Change::Added { path: p(b"caf\xff"), at: p(b"caf\xff") },
                Change::Deleted { path: p(b"new\nline"), at: p(b"new\nline") },
                Change::Modified { path: p(b"d\xfe/x"), at: p(b"d\xfe/x") },
                Change::Renamed { path: p(b"old"), to: p(b"n\x80ew") },
            ],
            examined: 4,
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#"{"change":"deleted","path":"new\nline","at":"new\nline"}"#), "{text}");
        assert!(text.contains(r#""path":{"bytes":[99,97,102,255]}"#), "{text}");
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.changes, report.changes);
        let shown: Vec<String> = report.changes.iter().map(show).collect();
        assert_eq!(shown, ["+\t/caf\\377", "-\t/new\\nline", "M\t/d\\376/x", "R\t/old -> /n\\200ew"]);
    }
}
