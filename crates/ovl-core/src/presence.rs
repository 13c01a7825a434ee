//! What frozen layers hold, known without asking their filesystems: a lookup through a deep
//! stack of sparse layers (each holding, say, what changed in one interval) skips every layer
//! that holds nothing at the path it is about to probe.
//!
//! A [`Summary`] lists every object of one layer (whiteouts and directories included) by its path
//! in the layer. [`Holders`] maps each path to the layers holding it, by a caller's layer number
//! (e.g. the ids of a store's layers); a stack gets a [`Presence`], which names each of its layers'
//! number (or none: a layer that may change, probed as always). A summary that lists more than its
//! layer holds costs a probe; one that lists less would hide objects, so a summary is made only of
//! a layer nothing writes to any more, and dropped before anything writes to it again.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::{LayerId, Result, sys};

/// The path of every object in one layer, and which directory it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The layer root's device and inode number when it was read: a summary is used only for
    /// that directory (a layer replaced by another under its name, as a merge does, is not it).
    pub root: (u64, u64),
    /// Every object's path relative to the layer root, parents before their entries.
    pub paths: Vec<PathBuf>,
    /// The bytes the objects allocate (`st_blocks`, a file of several names once per name).
    pub bytes: u64,
}

/// The first words of a summary file, then the root's device and inode, the count of paths and
/// the bytes, one line; the paths follow, each ended by a NUL byte.
const MAGIC: &str = "ovl-summary 1";

impl Summary {
    /// Reads the whole layer under `root` (no symlink followed, nothing changed).
    pub fn read(root: BorrowedFd<'_>) -> Result<Self> {
        let st = rustix::fs::fstat(root)?;
        let (mut paths, mut bytes) = (Vec::new(), 0u64);
        let mut dirs = vec![PathBuf::new()];
        while let Some(dir) = dirs.pop() {
            let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY;
            let fd = sys::open_beneath(root, &dir, flags, rustix::fs::Mode::empty())?;
            for e in sys::read_dir_fd(rustix::io::dup(&fd)?)? {
                let st = sys::lstat_at(&fd, &sys::name_cstr(&e.name)?)?;
                bytes += st.st_blocks as u64 * 512;
                let path = dir.join(&e.name);
                if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                    dirs.push(path.clone());
                }
                paths.push(path);
            }
        }
        Ok(Self { root: (st.st_dev, st.st_ino), paths, bytes })
    }

    /// Whether this summary was read from the directory open as `root`.
    pub fn is_of(&self, root: BorrowedFd<'_>) -> bool {
        rustix::fs::fstat(root).is_ok_and(|st| (st.st_dev, st.st_ino) == self.root)
    }

    /// The summary as the bytes of its file.
    pub fn encode(&self) -> Vec<u8> {
        let (root, count, bytes) = (self.root, self.paths.len(), self.bytes);
        let mut out = format!("{MAGIC} {} {} {count} {bytes}\n", root.0, root.1).into_bytes();
        for p in &self.paths {
            out.extend_from_slice(p.as_os_str().as_bytes());
            out.push(0);
        }
        out
    }

    /// A summary from the bytes of its file; `None` for anything else (a truncated or foreign
    /// file: the caller reads the layer again).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let nl = bytes.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&bytes[..nl]).ok()?;
        let mut words = head.strip_prefix(MAGIC)?.split_ascii_whitespace();
        let root = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
        let count: usize = words.next()?.parse().ok()?;
        let used: u64 = words.next()?.parse().ok()?;
        if words.next().is_some() {
            return None;
        }
        let body = &bytes[nl + 1..];
        if !body.is_empty() && body.last() != Some(&0) {
            return None;
        }
        let mut paths = Vec::new();
        for p in body.split(|b| *b == 0).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(p));
            if path.is_absolute() || path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return None;
            }
            paths.push(path);
        }
        (paths.len() == count).then_some(Self { root, paths, bytes: used })
    }
}

/// For each path, the summarized layers holding an object there (by the caller's numbers, e.g.
/// the ids of a store's layers).
#[derive(Debug, Default)]
pub struct Holders {
    by_path: HashMap<PathBuf, Vec<u64>>,
    /// By layer number (small, dense: a store's ids), the summarized layers' objects and bytes:
    /// looked at for every layer of every lookup, so an index, not a hash.
    summarized: Vec<Option<(u64, u64)>>,
}

impl Holders {
    /// Adds layer `layer`'s summary (replacing what was known of it: see [`Holders::forget`]).
    pub fn add(&mut self, layer: u64, summary: &Summary) {
        self.forget(layer);
        for p in &summary.paths {
            let ids = self.by_path.entry(p.clone()).or_default();
            if let Err(at) = ids.binary_search(&layer) {
                ids.insert(at, layer);
            }
        }
        let at = usize::try_from(layer).unwrap_or(usize::MAX);
        if at >= self.summarized.len() {
            if at > 1 << 32 {
                // Not a number this index is for: the layer is probed like any other.
                return;
            }
            self.summarized.resize(at + 1, None);
        }
        self.summarized[at] = Some((summary.paths.len() as u64, summary.bytes));
    }

    /// Stops using layer `layer`'s summary: it is probed again like any layer. (Its paths stay
    /// listed, which only costs probes, until the layer is summarized again.)
    pub fn forget(&mut self, layer: u64) {
        if let Some(slot) = usize::try_from(layer).ok().and_then(|at| self.summarized.get_mut(at)) {
            *slot = None;
        }
    }

    /// Whether `layer` has a summary in use.
    pub fn knows(&self, layer: u64) -> bool {
        self.usage(layer).is_some()
    }

    /// The objects and bytes of layer `layer`, from its summary.
    pub fn usage(&self, layer: u64) -> Option<(u64, u64)> {
        usize::try_from(layer).ok().and_then(|at| self.summarized.get(at).copied().flatten())
    }

    /// The summarized layers holding an object at `path`.
    fn at(&self, path: &Path) -> &[u64] {
        self.by_path.get(path).map_or(&[], |v| v.as_slice())
    }
}

/// A stack's view of [`Holders`]: the caller's number of each of its layers.
#[derive(Debug, Clone)]
pub struct Presence {
    holders: Arc<RwLock<Holders>>,
    /// By `LayerId`: the layer's number in `holders`, `None` for a layer never summarized.
    numbers: Vec<Option<u64>>,
}

impl Presence {
    /// Layer `LayerId(i)` of the stack is `numbers[i]` in `holders`.
    pub fn new(holders: Arc<RwLock<Holders>>, numbers: Vec<Option<u64>>) -> Self {
        Self { holders, numbers }
    }

    /// A reader for one lookup (holds the shared lock until dropped).
    pub fn reader(&self) -> PresenceReader<'_> {
        PresenceReader { holders: self.holders.read(), numbers: &self.numbers, last: None }
    }
}

/// [`Presence`] for one lookup: answers for one path after another, remembering the last.
pub struct PresenceReader<'a> {
    holders: parking_lot::RwLockReadGuard<'a, Holders>,
    numbers: &'a [Option<u64>],
    last: Option<(PathBuf, Vec<u64>)>,
}

impl PresenceReader<'_> {
    /// False only when layer `layer` surely holds nothing at `path`.
    pub fn may_hold(&mut self, layer: LayerId, path: &Path) -> bool {
        let Some(number) = self.numbers.get(layer.0 as usize).copied().flatten() else { return true };
        if !self.holders.knows(number) {
            return true;
        }
        if self.last.as_ref().is_none_or(|(p, _)| p != path) {
            self.last = Some((path.to_path_buf(), self.holders.at(path).to_vec()));
        }
        self.last.as_ref().is_some_and(|(_, ids)| ids.binary_search(&number).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip_and_refuse_what_is_not_one() {
        let s = Summary { root: (7, 42), paths: vec!["a".into(), "a/b c".into(), "a/\nx".into()], bytes: 8192 };
        assert_eq!(Summary::decode(&s.encode()), Some(s.clone()));
        let bytes = s.encode();
        assert_eq!(Summary::decode(&bytes[..bytes.len() - 1]), None, "cut short in a path");
        let cut = bytes.len() - "a/\nx".len() - 1;
        assert_eq!(Summary::decode(&bytes[..cut]), None, "cut short after a path");
        assert_eq!(Summary::decode(b"ovl-summary 2 1 2 0 0\n"), None, "another version");
        assert_eq!(Summary::decode(b"ovl-summary 1 1 2 1 0\n/etc\0"), None, "absolute");
        assert_eq!(Summary::decode(b"ovl-summary 1 1 2 1 0\na/../b\0"), None, "dot-dot");
        assert_eq!(Summary::decode(b"ovl-summary 1 1 2 0\n"), None, "no bytes");
        assert_eq!(
            Summary::decode(b"ovl-summary 1 1 2 0 0\n"),
            Some(Summary { root: (1, 2), paths: vec![], bytes: 0 })
        );
    }

    #[test]
    fn only_known_layers_are_skipped() {
        let holders = Arc::new(RwLock::new(Holders::default()));
        holders.write().add(5, &Summary { root: (0, 0), paths: vec!["d".into(), "d/f".into()], bytes: 0 });
        holders.write().add(9, &Summary { root: (0, 0), paths: vec!["e".into()], bytes: 0 });
        let p = Presence::new(holders.clone(), vec![Some(9), Some(5), Some(3), None]);
        let mut r = p.reader();
        assert!(r.may_hold(LayerId(1), Path::new("d/f")));
        assert!(!r.may_hold(LayerId(0), Path::new("d/f")), "layer 9 has no d/f");
        assert!(r.may_hold(LayerId(2), Path::new("d/f")), "layer 3 has no summary");
        assert!(r.may_hold(LayerId(3), Path::new("zzz")), "a layer without a number");
        assert!(r.may_hold(LayerId(8), Path::new("zzz")), "a layer beyond the list");
        drop(r);
        holders.write().forget(9);
        assert!(p.reader().may_hold(LayerId(0), Path::new("d/f")), "a forgotten summary");
        holders.write().add(u64::MAX, &Summary { root: (0, 0), paths: vec![], bytes: 0 });
        assert!(!holders.read().knows(u64::MAX), "a number too large to index is never trusted");
    }
}
