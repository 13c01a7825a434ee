//! One object of a layer, looked at once: its parent directory opened once, its `lstat`, and its
//! xattr names listed at most once, so that asking for several overlay xattrs of an object that
//! has none (the common case) costs one `llistxattr` instead of one `getxattr` each.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result};

use crate::DirLayers;
use rustix::fs::Stat;

/// An object found in a layer.
pub(crate) struct Probe {
    dir: Arc<OwnedFd>,
    name: CString,
    /// The object's `lstat`.
    pub st: Stat,
    names: Option<Vec<OsString>>,
}

/// Errors that mean "nothing there" for a path in a layer: missing, a non-directory or a symlink
/// on the way (`openat2` answers `ELOOP`), or a name too long to exist.
pub(crate) fn is_absent(e: Errno) -> bool {
    matches!(e, Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG | Errno::LOOP)
}

/// Parent directories opened during a [`with_dir_cache`] scope, by layer root and path; `None`
/// for a parent that is absent in that layer.
type DirCache = HashMap<(RawFd, PathBuf), Option<CachedDir>>;

/// Probes of one directory after which its listing is read: from then on a name missing from the
/// listing is answered without an `lstat` (a merged directory's names are mostly missing from all
/// but one of its layers). Below it, a few `lstat`s cost less than a listing.
const LIST_AFTER: u32 = 4;

/// A directory opened in a [`with_dir_cache`] scope.
#[derive(Clone)]
struct CachedDir {
    fd: Arc<OwnedFd>,
    /// Whether its listing may answer for absent names: only in a lower layer, which nothing
    /// changes while mounted. The upper layer changes under readers (copy-up holds the namespace
    /// lock shared), so there every name is asked of `lstat` at the moment it is needed.
    listable: bool,
    probes: Arc<AtomicU32>,
    /// The names in the directory, once listed (`None` inside: listing failed, so ask `lstat`).
    names: Arc<OnceLock<Option<HashSet<OsString>>>>,
}

impl CachedDir {
    /// Whether `name` is certainly absent: only known once the listing has been read.
    fn certainly_lacks(&self, name: &CStr) -> bool {
        if !self.listable {
            return false;
        }
        let n = self.probes.fetch_add(1, Ordering::Relaxed) + 1;
        if n < LIST_AFTER && self.names.get().is_none() {
            return false;
        }
        let names = self.names.get_or_init(|| {
            let listing = sys::read_dir(&*self.fd, Path::new("")).ok()?;
            Some(listing.into_iter().map(|e| e.name).collect())
        });
        names.as_ref().is_some_and(|set| !set.contains(std::ffi::OsStr::from_bytes(name.to_bytes())))
    }
}

/// The lower-layer directories (and their listings) of [`with_dir_cache`] scopes, kept from one
/// scope to the next: an open directory's readdirplus requests each list a few dozen entries of
/// the same parents, and reading a parent's listing again per request would cost the size of the
/// directory per request. Lower layers do not change while mounted, so these never go stale.
#[derive(Default)]
pub struct KeptDirs {
    dirs: DirCache,
}

/// A scope's state: its dirs, and the upper layer's root (never listed, never kept).
struct Scope {
    dirs: DirCache,
    upper_root: Option<RawFd>,
}

thread_local! {
    static DIR_CACHE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Runs `f` with the parent directories of the objects it probes opened once per layer instead
/// of once per object (a listing's entries all share their parent). The caller guarantees that
/// no name in the layers changes meanwhile except through copy-up and creation in the upper
/// layer, whose root is `upper_root` (ovl-fs holds the dir's path and the kernel its lock); scopes nest. `kept`
/// carries lower-layer dirs into the scope and back out of it. Dirs are known by their layer
/// root's descriptor number: only for stacks whose roots are held open (`Layer::root_is_held`),
/// never closed and reused for another layer meanwhile.
pub fn with_dir_cache<R>(upper_root: Option<BorrowedFd<'_>>, kept: &mut KeptDirs, f: impl FnOnce() -> R) -> R {
    let outer = DIR_CACHE.with(|c| c.borrow().is_some());
    if outer {
        return f();
    }
    let dirs = std::mem::take(&mut kept.dirs);
    let upper_root = upper_root.map(|r| r.as_raw_fd());
    DIR_CACHE.with(|c| *c.borrow_mut() = Some(Scope { dirs, upper_root }));
    /// Ends the scope, also when `f` panics: lower-layer dirs go back to `kept`.
    struct Clear<'k>(&'k mut KeptDirs);
    impl Drop for Clear<'_> {
        fn drop(&mut self) {
            if let Some(scope) = DIR_CACHE.with(|c| c.borrow_mut().take()) {
                self.0.dirs = scope.dirs.into_iter().filter(|((root, _), _)| Some(*root) != scope.upper_root).collect();
            }
        }
    }
    let _clear = Clear(kept);
    f()
}

/// A merged directory's dirs in its layers, held open as `O_PATH` descriptors, so that looking a
/// name up in it opens nothing (ovl-fs keeps them per directory node, a bounded number in all).
/// A descriptor follows its directory through renames; the caller makes sure the directory is
/// still the one wanted (ovl-fs: the layers it was opened for are still the node's).
#[derive(Debug, Default)]
pub struct DirHandles {
    upper: Option<(PathBuf, Arc<OwnedFd>)>,
    lowers: Vec<(LayerId, PathBuf, Arc<OwnedFd>)>,
    /// How many of these descriptors are their own (see [`DirHandles::own_descriptors`]).
    own: usize,
}

impl DirHandles {
    /// Opens the dirs of `dir` in every layer where it exists (a layer's root held open for the
    /// stack's life is its own descriptor, shared: no new one).
    pub fn open(stack: &LayerStack, dir: &DirLayers) -> Result<Self> {
        let mut own = 0;
        let mut held = |layer: &ovl_core::Layer, path: &Path| {
            if path.as_os_str().is_empty() {
                own += usize::from(!layer.root_is_held());
                return Ok(Some(layer.root()?));
            }
            match sys::open_dir_path(layer.root()?, path) {
                Ok(fd) => {
                    own += 1;
                    Ok(Some(Arc::new(fd)))
                }
                Err(e) if is_absent(e.errno()) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let upper = match (&dir.upper, stack.upper()) {
            (Some(path), Some(u)) => held(u.layer(), path)?.map(|fd| (path.clone(), fd)),
            _ => None,
        };
        let mut lowers = Vec::with_capacity(dir.lowers.len());
        for ld in &dir.lowers {
            if let Some(fd) = held(stack.layer(ld.layer), &ld.path)? {
                lowers.push((ld.layer, ld.path.clone(), fd));
            }
        }
        Ok(Self { upper, lowers, own })
    }

    /// How many descriptors these hold of their own (a held layer root's is the layer's).
    pub fn own_descriptors(&self) -> usize {
        self.own
    }

    /// The dir in the upper layer.
    pub fn upper(&self) -> Option<&Arc<OwnedFd>> {
        self.upper.as_ref().map(|(_, fd)| fd)
    }

    /// The dir at `path` in lower layer `layer`, if it is one of these.
    pub fn lower(&self, layer: LayerId, path: &Path) -> Option<&Arc<OwnedFd>> {
        self.lowers.iter().find(|(l, p, _)| *l == layer && p == path).map(|(_, _, fd)| fd)
    }
}

/// The directory `parent` beneath `root`, `None` when absent: `held` when the caller holds it
/// open; in a scope, from its cache, and also `None` when the cached listing shows that `name`
/// is not in it.
fn open_dir(
    root: BorrowedFd<'_>,
    parent: &Path,
    name: &CStr,
    held: Option<&Arc<OwnedFd>>,
) -> Result<Option<Arc<OwnedFd>>> {
    let open = || match held {
        Some(fd) => Ok(Some(fd.clone())),
        None => match sys::open_dir_path(root, parent) {
            Ok(fd) => Ok(Some(Arc::new(fd))),
            Err(e) if is_absent(e.errno()) => Ok(None),
            Err(e) => Err(e),
        },
    };
    DIR_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let Some(scope) = c.as_mut() else { return open() };
        let key = (root.as_raw_fd(), parent.to_path_buf());
        let dir = match scope.dirs.get(&key) {
            Some(hit) => hit.clone(),
            None => {
                let listable = Some(root.as_raw_fd()) != scope.upper_root;
                let dir =
                    open()?.map(|fd| CachedDir { fd, listable, probes: Default::default(), names: Default::default() });
                scope.dirs.insert(key, dir.clone());
                dir
            }
        };
        Ok(dir.filter(|d| !d.certainly_lacks(name)).map(|d| d.fd))
    })
}

impl Probe {
    /// Looks at `path` (not the layer root) beneath `root`; `None` when nothing is there.
    pub fn open(root: BorrowedFd<'_>, path: &Path) -> Result<Option<Self>> {
        Self::open_in(root, path, None)
    }

    /// Like [`Probe::open`], in a parent dir the caller holds open (`held`, that of `path`).
    pub fn open_in(root: BorrowedFd<'_>, path: &Path, held: Option<&Arc<OwnedFd>>) -> Result<Option<Self>> {
        let Some(name) = path.file_name() else { return Err(Errno::INVAL.into()) };
        let name = sys::name_cstr(name)?;
        let parent = path.parent().unwrap_or(Path::new(""));
        let Some(dir) = open_dir(root, parent, &name, held)? else { return Ok(None) };
        match sys::lstat_at(&dir, &name) {
            Ok(st) => Ok(Some(Self { dir, name, st, names: None })),
            Err(e) if is_absent(e.errno()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value of xattr `key`, if the object has it.
    pub fn xattr(&mut self, key: &CStr) -> Result<Option<Vec<u8>>> {
        if self.names.is_none() {
            self.names = Some(sys::list_xattrs(&*self.dir, Some(&self.name))?);
        }
        let listed = self.names.as_deref().unwrap_or_default();
        if !listed.iter().any(|n| n.as_bytes() == key.to_bytes()) {
            return Ok(None);
        }
        sys::get_xattr(&*self.dir, Some(&self.name), key)
    }
}
