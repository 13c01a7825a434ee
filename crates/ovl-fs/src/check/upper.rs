//! The walk of an upper layer: every object it holds, judged by how the kernel reads it over the
//! layers below (found with `ovl-lookup`, which follows the kernel's lookup rules).

use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ovl_core::sys;
use ovl_core::{
    Errno, KNOWN_KEYS, LayerId, LayerStack, Opaque, Origin, OriginError, RedirectDir, Result, is_whiteout_stat,
    metacopy_value_is_valid,
};
use ovl_lookup::{DirLayers, LowerDir, OriginTarget};
use rustix::fs::{FileType, Stat};

use super::{Finding, Report, Severity};

/// Checks every object of the upper layer of `stack` against the layers below. The stack may be
/// read-only; nothing is written.
pub fn check_upper(stack: &LayerStack) -> Result<Report> {
    let upper = stack.upper().ok_or(Errno::INVAL)?.layer();
    let root = upper.root()?;
    let mut w = Walker {
        stack,
        root: root.as_fd(),
        top: upper.path().to_path_buf(),
        follows: stack.options().redirect_dir != RedirectDir::NoFollow,
        report: Report::default(),
        redirected: HashMap::new(),
    };
    w.walk()?;
    Ok(w.report)
}

/// What the walk knows of a directory of the upper layer.
struct Frame {
    /// Its path in the layer (and in the view).
    path: PathBuf,
    /// Where it merges with the layers below; `None` when a broken redirect on the way makes
    /// that unknowable (checks that need it are skipped inside).
    layers: Option<DirLayers>,
    /// Its `overlay.opaque` is `y`.
    opaque: bool,
}

struct Walker<'a> {
    stack: &'a LayerStack,
    root: BorrowedFd<'a>,
    /// The layer's path, to name objects in findings.
    top: PathBuf,
    /// The options follow redirects (all but `redirect_dir=nofollow`; `off` follows, as in the kernel's
    /// default configuration).
    follows: bool,
    report: Report,
    /// Lower dirs merged into a redirected dir, and where: each may show at one place only.
    redirected: HashMap<(LayerId, PathBuf), PathBuf>,
}

/// One object of the upper layer, looked at once.
struct Object<'d> {
    dir: BorrowedFd<'d>,
    /// Its name in `dir`; `None` for the layer root (`dir` itself).
    name: Option<&'d CStr>,
    path: PathBuf,
    st: Stat,
    xattrs: Vec<OsString>,
}

impl Object<'_> {
    fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.st.st_mode)
    }

    /// The value of overlay xattr `key`, if the object has it (listed once, read on demand).
    fn get(&self, key: &CStr) -> Result<Option<Vec<u8>>> {
        if !self.xattrs.iter().any(|n| n.as_bytes() == key.to_bytes()) {
            return Ok(None);
        }
        sys::get_xattr(self.dir, self.name, key)
    }
}

impl Walker<'_> {
    fn finding(&mut self, severity: Severity, kind: &'static str, path: &Path, detail: impl Into<String>) {
        self.report.findings.push(Finding::new(severity, kind, self.top.join(path), detail));
    }

    fn walk(&mut self) -> Result<()> {
        let root_st = rustix::fs::fstat(self.root)?;
        let root = Object {
            dir: self.root,
            name: None,
            path: PathBuf::new(),
            st: root_st,
            xattrs: sys::list_xattrs(self.root, None)?,
        };
        self.report.checked += 1;
        self.keys(&root)?;
        self.origin(&root)?;
        let layers = DirLayers::root(self.stack)?;
        let opaque = Opaque::from_value(root.get(&self.stack.names().opaque)?.as_deref()) == Opaque::Yes;
        let mut todo = vec![Frame { path: PathBuf::new(), layers: Some(layers), opaque }];
        while let Some(frame) = todo.pop() {
            let dir = sys::open_dir_path(self.root, &frame.path)?;
            for e in sys::read_dir(self.root, &frame.path)? {
                let name = sys::name_cstr(&e.name)?;
                let st = match sys::lstat_at(&dir, &name) {
                    Ok(st) => st,
                    Err(err) if err.errno() == Errno::NOENT => continue,
                    Err(err) => return Err(err),
                };
                let obj = Object {
                    dir: dir.as_fd(),
                    name: Some(&name),
                    path: frame.path.join(&e.name),
                    st,
                    xattrs: sys::list_xattrs(&dir, Some(&name))?,
                };
                self.report.checked += 1;
                if let Some(child) = self.object(&frame, &e.name, &obj)? {
                    todo.push(child);
                }
            }
        }
        Ok(())
    }

    /// Checks one object of the directory `parent`; returns it as a frame when it is a directory
    /// to walk.
    fn object(&mut self, parent: &Frame, name: &OsStr, obj: &Object<'_>) -> Result<Option<Frame>> {
        self.keys(obj)?;
        if is_whiteout_stat(&obj.st) {
            self.whiteout(parent, name, &obj.path)?;
            return Ok(None);
        }
        self.origin(obj)?;
        match obj.kind() {
            FileType::Directory => self.dir(parent, name, obj).map(Some),
            FileType::RegularFile => {
                self.regular(parent, name, obj)?;
                Ok(None)
            }
            _ => {
                if obj.get(&self.stack.names().redirect)?.is_some() {
                    self.finding(
                        Severity::Error,
                        "redirect-on-non-dir",
                        &obj.path,
                        "overlay.redirect on an object that is neither a directory nor a regular file: \
                         neither the kernel nor ovlfs ever writes one",
                    );
                }
                Ok(None)
            }
        }
    }

    /// Overlay xattrs that are unknown or out of place.
    fn keys(&mut self, obj: &Object<'_>) -> Result<()> {
        let prefix = self.stack.names().prefix().as_bytes();
        for n in &obj.xattrs {
            let Some(key) = n.as_bytes().strip_prefix(prefix) else { continue };
            if key.starts_with(b"overlay.") || KNOWN_KEYS.iter().any(|k| k.as_bytes() == key) {
                continue;
            }
            let detail = format!("{} is not an overlay attribute the kernel knows", n.to_string_lossy());
            self.finding(Severity::Warning, "unknown-xattr", &obj.path, detail);
        }
        let dir = obj.kind() == FileType::Directory;
        if let Some(v) = obj.get(&self.stack.names().opaque)? {
            if !dir {
                let detail = "overlay.opaque on a non-directory: ignored by the kernel";
                self.finding(Severity::Warning, "opaque-invalid", &obj.path, detail);
            } else if !matches!(&v[..], b"y" | b"x") {
                let detail = format!(
                    "overlay.opaque is {:?}, not y or x: the kernel takes the directory as not opaque",
                    String::from_utf8_lossy(&v)
                );
                self.finding(Severity::Warning, "opaque-invalid", &obj.path, detail);
            }
        }
        if !dir && obj.get(&self.stack.names().impure)?.is_some() {
            let detail = "overlay.impure on a non-directory: ignored by the kernel";
            self.finding(Severity::Warning, "impure-on-non-dir", &obj.path, detail);
        }
        Ok(())
    }

    /// A whiteout must hide something, and an opaque dir needs none. In a directory that merges
    /// nothing (opaque, or only in the upper layer) the kernel lists a whiteout as an entry that
    /// cannot be looked up; in a merged one it filters it out.
    fn whiteout(&mut self, parent: &Frame, name: &OsStr, path: &Path) -> Result<()> {
        let phantom = "the kernel lists it in the directory, though nothing can be looked up under that name";
        if parent.opaque {
            let detail = format!("whiteout inside an opaque directory: it hides nothing, and {phantom}");
            self.finding(Severity::Fixable, "whiteout-in-opaque-dir", path, detail);
            return Ok(());
        }
        let Some(layers) = &parent.layers else { return Ok(()) };
        if !ovl_lookup::lower_has_name(self.stack, layers, name)? {
            let detail = if layers.is_merged() {
                "orphan whiteout: no layer below shows this name, so it hides nothing".to_string()
            } else {
                format!("orphan whiteout in a directory that merges nothing: it hides nothing, and {phantom}")
            };
            self.finding(Severity::Fixable, "orphan-whiteout", path, detail);
        }
        Ok(())
    }

    /// `overlay.origin`: must decode; a stale or foreign one is ignored (by the kernel too).
    fn origin(&mut self, obj: &Object<'_>) -> Result<()> {
        let Some(v) = obj.get(&self.stack.names().origin)? else { return Ok(()) };
        if v.is_empty() {
            return Ok(()); // "copied up, origin unknown"
        }
        let origin = match Origin::decode(&v) {
            Ok(o) => o,
            Err(OriginError::Corrupt) => {
                let detail = format!("overlay.origin ({} bytes) is not a valid file handle", v.len());
                self.finding(Severity::Error, "origin-corrupt", &obj.path, detail);
                return Ok(());
            }
            Err(OriginError::OtherEndian) => {
                let detail = "overlay.origin was written on a host of the other byte order: ignored";
                self.finding(Severity::Warning, "origin-foreign", &obj.path, detail);
                return Ok(());
            }
        };
        if origin.path_upper {
            return Ok(()); // names an upper object, for the kernel's index: not checked
        }
        // The kernel decodes the origin of a directory only for its index (index=on); without it
        // a stale one means nothing (a saved copy of a directory removed since, in a snapshot).
        let index = self.stack.options().index;
        if obj.kind() == FileType::Directory && !index {
            return Ok(());
        }
        let ignored = "ignored, as by the kernel (the object's inode number is its own)";
        match ovl_lookup::resolve_origin(self.stack, &origin) {
            OriginTarget::Found(fd) => {
                let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
                if kind != obj.kind() {
                    let detail = format!("overlay.origin names a {kind:?}, but this is a {:?}: {ignored}", obj.kind());
                    self.finding(Severity::Warning, "origin-stale", &obj.path, detail);
                }
            }
            OriginTarget::Foreign => {
                let detail = format!("overlay.origin names a filesystem no lower layer is on: {ignored}");
                self.finding(Severity::Warning, "origin-foreign", &obj.path, detail);
            }
            OriginTarget::Stale(errno) => {
                let detail = format!("overlay.origin names an object that no longer opens ({errno}): {ignored}");
                self.finding(Severity::Warning, "origin-stale", &obj.path, detail);
            }
        }
        Ok(())
    }

    /// A directory: its redirect, and where it merges for the walk below it.
    fn dir(&mut self, parent: &Frame, name: &OsStr, obj: &Object<'_>) -> Result<Frame> {
        let names = self.stack.names();
        let opaque = Opaque::from_value(obj.get(&names.opaque)?.as_deref()) == Opaque::Yes;
        let unknown = Frame { path: obj.path.clone(), layers: None, opaque };
        let Some(layers) = &parent.layers else { return Ok(unknown) };
        // The kernel reads no redirect of an opaque dir.
        let redirect = if opaque { None } else { obj.get(&names.redirect)? };
        if let Some(v) = &redirect {
            if !self.follows {
                let detail = "overlay.redirect is not followed with these options (redirect_dir=nofollow): the \
                              kernel refuses the lookup (EPERM) where lower layers are left to look in";
                self.finding(Severity::Warning, "redirect-not-followed", &obj.path, detail);
            } else if !ovl_lookup::redirect_is_valid(v) {
                self.bad_redirect(&obj.path, v);
                return Ok(unknown);
            }
        }
        let entry = match ovl_lookup::lookup(self.stack, layers, name) {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(unknown),
            Err(e) => {
                let detail = format!("the overlay cannot look this directory up: {e}");
                self.finding(Severity::Error, "lookup-error", &obj.path, detail);
                return Ok(unknown);
            }
        };
        let merged = entry.dir.unwrap_or_default();
        if let Some(v) = redirect.filter(|_| self.follows) {
            let target = redirect_target(&obj.path, &v);
            if merged.lowers.is_empty() {
                let detail = format!(
                    "overlay.redirect {:?}: no directory there in the layers below, so it merges nothing",
                    String::from_utf8_lossy(&v)
                );
                self.finding(Severity::Warning, "redirect-dangling", &obj.path, detail);
            } else {
                self.shown_once(&obj.path, &target, &merged.lowers)?;
            }
        }
        Ok(Frame { path: obj.path.clone(), layers: Some(merged), opaque })
    }

    fn bad_redirect(&mut self, path: &Path, v: &[u8]) {
        let why = match ovl_lookup::redirect_error(v) {
            Some(Errno::ACCESS) => "has a `.`, `..` or empty component: the lookup fails (EACCES)",
            _ => "is neither a name nor an absolute path of names: the lookup fails (EINVAL)",
        };
        let detail = format!("overlay.redirect {:?} {why}", String::from_utf8_lossy(v));
        self.finding(Severity::Error, "redirect-malformed", path, detail);
    }

    /// A redirected dir must be the only place its lower dirs show: not also at the path it was
    /// moved from (the kernel leaves a whiteout or an opaque dir there), not in another
    /// redirected dir, and never inside itself.
    fn shown_once(&mut self, path: &Path, target: &Path, lowers: &[LowerDir]) -> Result<()> {
        let keys: Vec<(LayerId, PathBuf)> = lowers.iter().map(|l| (l.layer, l.path.clone())).collect();
        let mut clash: Option<PathBuf> = None;
        for k in &keys {
            match self.redirected.get(k) {
                Some(other) if other != path => clash = Some(other.clone()),
                Some(_) => {}
                None => {
                    self.redirected.insert(k.clone(), path.to_path_buf());
                }
            }
        }
        if clash.is_none() && target != path {
            if let Ok(Some(dir)) = view_dir(self.stack, target) {
                if dir.lowers.iter().any(|l| keys.contains(&(l.layer, l.path.clone()))) {
                    clash = Some(target.to_path_buf());
                }
            }
        }
        let Some(other) = clash else { return Ok(()) };
        let shown = format!("/{}", other.display());
        if path.starts_with(&other) {
            let detail = format!(
                "overlay.redirect merges the lower directory that its ancestor {shown} already shows: \
                 the directory would contain itself"
            );
            self.finding(Severity::Error, "redirect-loop", path, detail);
        } else {
            let detail = format!("the lower directory this redirect merges also shows at {shown}");
            self.finding(Severity::Error, "redirect-duplicate", path, detail);
        }
        Ok(())
    }

    /// A regular file: a metacopy file needs its data below.
    fn regular(&mut self, parent: &Frame, name: &OsStr, obj: &Object<'_>) -> Result<()> {
        let names = self.stack.names();
        // A redirect on a file that is no longer metacopy is what the kernel leaves after copying
        // up the data of a renamed metacopy file; it reads it no more.
        let Some(meta) = obj.get(&names.metacopy)? else { return Ok(()) };
        if !metacopy_value_is_valid(&meta) {
            let detail =
                format!("overlay.metacopy ({} bytes) is not a valid value: the lookup fails (EIO)", meta.len());
            self.finding(Severity::Error, "metacopy-invalid", &obj.path, detail);
            return Ok(());
        }
        if !self.stack.options().metacopy {
            let detail = "metadata-only copy, but these options lack metacopy=on: the kernel refuses it (EPERM)";
            self.finding(Severity::Warning, "metacopy-not-enabled", &obj.path, detail);
        }
        let redirect = obj.get(&names.redirect)?;
        if let Some(v) = &redirect {
            if !ovl_lookup::redirect_is_valid(v) {
                self.bad_redirect(&obj.path, v);
                return Ok(());
            }
        }
        let Some(layers) = &parent.layers else { return Ok(()) };
        if !metacopy_data(self.stack, layers, name, redirect.as_deref())? {
            let detail = "metadata-only copy without its data: no regular file below to read it from (the \
                          lookup fails with EIO)";
            self.finding(Severity::Error, "metacopy-no-data", &obj.path, detail);
        }
        Ok(())
    }
}

/// The view path a (valid) redirect on the dir at `path` points to.
fn redirect_target(path: &Path, v: &[u8]) -> PathBuf {
    match ovl_lookup::parse_redirect_value(v) {
        Some((true, abs)) => abs,
        Some((false, name)) => path.parent().unwrap_or(Path::new("")).join(name),
        None => path.to_path_buf(),
    }
}

/// Where the directory at view path `path` merges, resolved through the whole stack; `None`
/// when nothing or a non-directory is there.
fn view_dir(stack: &LayerStack, path: &Path) -> Result<Option<DirLayers>> {
    resolve(stack, DirLayers::root(stack)?, path)
}

/// Resolves `path` component by component from `dir`.
fn resolve(stack: &LayerStack, mut dir: DirLayers, path: &Path) -> Result<Option<DirLayers>> {
    for c in path.iter() {
        match ovl_lookup::lookup(stack, &dir, c)? {
            Some(e) if e.dir.is_some() => dir = e.dir.unwrap_or_default(),
            _ => return Ok(None),
        }
    }
    Ok(Some(dir))
}

/// Whether a metacopy file named `name` in a dir merging `layers` finds its data below, as the
/// kernel looks for it: by its redirect when it has one (relative: in the same lower dirs;
/// absolute: from the root of every lower layer), else by its name.
fn metacopy_data(stack: &LayerStack, layers: &DirLayers, name: &OsStr, redirect: Option<&[u8]>) -> Result<bool> {
    let below = |lowers: Vec<LowerDir>| DirLayers { upper: None, lowers };
    let (dir, name) = match redirect.and_then(ovl_lookup::parse_redirect_value) {
        Some((true, path)) => {
            let (Some(parent), Some(leaf)) = (path.parent(), path.file_name()) else { return Ok(false) };
            let roots = stack
                .lowers()
                .iter()
                .map(|l| {
                    let opaque = sys::get_xattr(l.root()?, None, &stack.names().opaque)?;
                    let xwhiteouts = Opaque::from_value(opaque.as_deref()) == Opaque::XWhiteouts;
                    Ok(LowerDir { layer: l.id(), path: PathBuf::new(), xwhiteouts })
                })
                .collect::<Result<Vec<_>>>()?;
            match resolve(stack, below(roots), parent) {
                Ok(Some(dir)) => (dir, leaf.to_os_string()),
                Ok(None) => return Ok(false),
                Err(e) if lookup_fails(e.errno()) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Some((false, rel)) => (below(layers.lowers.clone()), rel.into_os_string()),
        None => (below(layers.lowers.clone()), name.to_os_string()),
    };
    match ovl_lookup::lookup(stack, &dir, &name) {
        Ok(Some(e)) => Ok(e.kind == FileType::RegularFile),
        Ok(None) => Ok(false),
        // A lower metacopy file (or a dir on the way) the options refuse to follow: the
        // warnings about the options say so.
        Err(e) if e.errno() == Errno::PERM => Ok(true),
        // A lower metacopy file without data of its own, or a bad redirect on the way.
        Err(e) if lookup_fails(e.errno()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The errnos with which the kernel's lookup refuses what it finds in the layers.
fn lookup_fails(e: Errno) -> bool {
    matches!(e, Errno::IO | Errno::INVAL | Errno::ACCESS)
}
