//! One object of a layer, looked at once: its parent directory opened once, its `lstat`, and its
//! xattr names listed at most once, so that asking for several overlay xattrs of an object that
//! has none (the common case) costs one `llistxattr` instead of one `getxattr` each.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ovl_core::sys;
use ovl_core::{Errno, Result};
use rustix::fs::Stat;

/// An object found in a layer.
pub(crate) struct Probe {
    dir: Rc<OwnedFd>,
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

/// Probes of one directory after which a scope reads its listing: from then on a name missing
/// from the listing is answered without an `lstat` (a merged directory's names are mostly
/// missing from all but one of its layers). Below it, a few `lstat`s cost less than a listing.
const LIST_AFTER: u32 = 4;

/// A directory opened in a [`with_dir_cache`] scope.
#[derive(Clone)]
struct CachedDir {
    fd: Rc<OwnedFd>,
    probes: Rc<std::cell::Cell<u32>>,
    /// The names in the directory, once listed (`None` inside: listing failed, so ask `lstat`).
    names: Rc<std::cell::OnceCell<Option<HashSet<OsString>>>>,
}

impl CachedDir {
    /// Whether `name` is certainly absent: only known once the listing has been read.
    fn certainly_lacks(&self, name: &CStr) -> bool {
        let n = self.probes.get() + 1;
        self.probes.set(n);
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

thread_local! {
    static DIR_CACHE: RefCell<Option<DirCache>> = const { RefCell::new(None) };
}

/// Runs `f` with the parent directories of the objects it probes opened once per layer instead
/// of once per object (a listing's entries all share their parent). The caller guarantees that
/// no name in the layers changes meanwhile (ovl-fs holds its namespace lock); scopes nest.
pub fn with_dir_cache<R>(f: impl FnOnce() -> R) -> R {
    let outer = DIR_CACHE.with(|c| c.borrow().is_some());
    if outer {
        return f();
    }
    DIR_CACHE.with(|c| *c.borrow_mut() = Some(HashMap::new()));
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            DIR_CACHE.with(|c| *c.borrow_mut() = None);
        }
    }
    let _clear = Clear;
    f()
}

/// The directory `parent` beneath `root`, `None` when absent; in a scope, from its cache, and
/// also `None` when the cached listing shows that `name` is not in it.
fn open_dir(root: BorrowedFd<'_>, parent: &Path, name: &CStr) -> Result<Option<Rc<OwnedFd>>> {
    let open = || match sys::open_dir_path(root, parent) {
        Ok(fd) => Ok(Some(Rc::new(fd))),
        Err(e) if is_absent(e.errno()) => Ok(None),
        Err(e) => Err(e),
    };
    DIR_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let Some(cache) = c.as_mut() else { return open() };
        let key = (root.as_raw_fd(), parent.to_path_buf());
        let dir = match cache.get(&key) {
            Some(hit) => hit.clone(),
            None => {
                let dir = open()?.map(|fd| CachedDir { fd, probes: Default::default(), names: Default::default() });
                cache.insert(key, dir.clone());
                dir
            }
        };
        Ok(dir.filter(|d| !d.certainly_lacks(name)).map(|d| d.fd))
    })
}

impl Probe {
    /// Looks at `path` (not the layer root) beneath `root`; `None` when nothing is there.
    pub fn open(root: BorrowedFd<'_>, path: &Path) -> Result<Option<Self>> {
        let Some(name) = path.file_name() else { return Err(Errno::INVAL.into()) };
        let name = sys::name_cstr(name)?;
        let Some(dir) = open_dir(root, path.parent().unwrap_or(Path::new("")), &name)? else { return Ok(None) };
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
