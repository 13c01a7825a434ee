//! Lookup of one name down the stack.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Opaque, Result, is_whiteout_stat};

use crate::identity::identity_from;
use crate::probe::Probe;

use rustix::fs::{FileType, Stat};

/// A directory of a lower layer that takes part in a merged directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerDir {
    /// The layer.
    pub layer: LayerId,
    /// The directory's path inside the layer (differs from the overlay path after a redirect).
    pub path: PathBuf,
    /// The dir's `opaque` xattr is `x`: regular files in it may be xwhiteouts.
    pub xwhiteouts: bool,
}

/// Where one directory of the merged view lives: in the upper layer (at its overlay path) and in
/// which lower directories, top first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirLayers {
    /// The dir's path in the upper layer, when it exists there.
    pub upper: Option<PathBuf>,
    /// The lower dirs that merge into it (empty for an opaque or pure-upper dir).
    pub lowers: Vec<LowerDir>,
}

impl DirLayers {
    /// The root of the stack: the root of every layer (the upper's root is opaque only if it
    /// says so).
    pub fn root(stack: &LayerStack) -> Result<Self> {
        let names = stack.names();
        let upper_opaque = match stack.upper() {
            Some(u) => {
                Opaque::from_value(sys::get_xattr(u.layer().root(), None, &names.opaque)?.as_deref()) == Opaque::Yes
            }
            None => false,
        };
        let mut lowers = Vec::new();
        if !upper_opaque {
            for l in stack.lowers() {
                let opaque = Opaque::from_value(sys::get_xattr(l.root(), None, &names.opaque)?.as_deref());
                lowers.push(LowerDir { layer: l.id(), path: PathBuf::new(), xwhiteouts: opaque == Opaque::XWhiteouts });
                if opaque == Opaque::Yes {
                    break;
                }
            }
        }
        Ok(Self { upper: stack.upper().map(|_| PathBuf::new()), lowers })
    }

    /// True when lower layers contribute to this directory.
    pub fn is_merged(&self) -> bool {
        !self.lowers.is_empty()
    }
}

/// A non-directory object in a lower layer.
#[derive(Debug, Clone)]
pub struct LowerObject {
    /// The layer.
    pub layer: LayerId,
    /// Its path inside the layer.
    pub path: PathBuf,
    /// Its `lstat`.
    pub stat: Stat,
}

/// What a name is in the merged view.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The type of the object shown.
    pub kind: FileType,
    /// The `lstat` of the object shown (the upper one when it exists).
    pub stat: Stat,
    /// The object in the upper layer, if any.
    pub upper: Option<Stat>,
    /// For a non-dir only in lower layers: the topmost one.
    pub lower: Option<LowerObject>,
    /// For a dir: where it lives in each layer.
    pub dir: Option<DirLayers>,
    /// For a dir: the upper dir is opaque (`y`).
    pub opaque: bool,
    /// The object's stable identity (see [`crate::identity`]).
    pub identity: crate::Identity,
    /// For a metacopy file (metadata copied up, data not yet): the lower file holding the data.
    /// `stat` already shows that file's size and blocks.
    pub data: Option<LowerObject>,
}

/// Looks `name` up in the merged directory `parent`. `Ok(None)` when the name does not exist or
/// is hidden by a whiteout.
pub fn lookup(stack: &LayerStack, parent: &DirLayers, name: &OsStr) -> Result<Option<Entry>> {
    let names = stack.names();
    sys::name_cstr(name)?;
    let mut found: Option<Entry> = None;
    let mut target = Target::Rel(name.to_os_string());

    if let (Some(up), Some(upper)) = (&parent.upper, stack.upper()) {
        let path = up.join(name);
        if let Some(mut p) = Probe::open(upper.layer().root(), &path)? {
            let st = p.st;
            if is_whiteout_stat(&st) {
                return Ok(None);
            }
            let kind = FileType::from_raw_mode(st.st_mode);
            let identity = identity_from(stack, upper.layer(), &path, &st, p.xattr(&names.origin)?)?;
            if kind != FileType::Directory {
                let mut e = Entry {
                    kind,
                    stat: st,
                    upper: Some(st),
                    lower: None,
                    dir: None,
                    opaque: false,
                    data: None,
                    identity,
                };
                if kind == FileType::RegularFile && p.xattr(&names.metacopy)?.is_some() {
                    e.set_data(find_data(stack, &parent.lowers, name)?);
                }
                return Ok(Some(e));
            }
            let opaque = Opaque::from_value(p.xattr(&names.opaque)?.as_deref()) == Opaque::Yes;
            let redirect = if opaque { None } else { redirect_of(stack, &mut p, &path)? };
            found = Some(Entry {
                identity,
                kind,
                stat: st,
                upper: Some(st),
                lower: None,
                dir: Some(DirLayers { upper: Some(path), lowers: Vec::new() }),
                opaque,
                data: None,
            });
            if opaque {
                return Ok(found);
            }
            if let Some(t) = redirect {
                target = t;
            }
        }
    }

    // The lower dirs to search, and where in them: the parent's dirs joined with the name, or
    // (after an absolute redirect) a path from the root of every lower layer below.
    let mut list: std::borrow::Cow<'_, [LowerDir]> = match target {
        Target::Abs(_) => root_lowers(stack, None).into(),
        Target::Rel(_) => (&parent.lowers[..]).into(),
    };
    let mut i = 0;
    while i < list.len() {
        let ld = &list[i];
        i += 1;
        let layer = stack.layer(ld.layer);
        let path = match &target {
            Target::Rel(n) => ld.path.join(n),
            Target::Abs(p) => p.clone(),
        };
        let mut last_layer = false;
        // After an absolute redirect: where the layers below this one look (ancestors in this
        // layer may carry redirects of their own, which rewrite the path, as in the kernel).
        let mut below: Option<PathBuf> = None;
        if let Target::Abs(p) = &target {
            // An absolute path is walked component by component, as the kernel does: a
            // non-directory or whiteout on the way hides everything below, an opaque directory on
            // the way stops the layers below this one (unless a redirect further down restarts
            // them), and a redirect on the way rewrites the path for the layers below.
            match walk_ancestors(stack, layer, p)? {
                Walk::Missing { below } => {
                    target = Target::Abs(below);
                    continue;
                }
                Walk::Blocked => break,
                Walk::Open { stop, below: b } => {
                    last_layer = stop;
                    below = Some(b);
                }
            }
        }
        let Some(mut p) = Probe::open(layer.root(), &path)? else {
            if last_layer {
                break;
            }
            if let Some(b) = below {
                target = Target::Abs(b);
            }
            continue;
        };
        let st = p.st;
        if is_whiteout_stat(&st) {
            break;
        }
        let kind = FileType::from_raw_mode(st.st_mode);
        let xwhiteouts = ld.xwhiteouts && matches!(target, Target::Rel(_));
        if xwhiteouts && kind == FileType::RegularFile && st.st_size == 0 && p.xattr(&names.whiteout)?.is_some() {
            break;
        }
        match &mut found {
            None if kind != FileType::Directory => {
                let meta = kind == FileType::RegularFile && p.xattr(&names.metacopy)?.is_some();
                let identity = identity_from(stack, layer, &path, &st, p.xattr(&names.origin)?)?;
                let lower = LowerObject { layer: ld.layer, path, stat: st };
                let mut e = Entry {
                    kind,
                    stat: st,
                    upper: None,
                    lower: Some(lower),
                    dir: None,
                    opaque: false,
                    data: None,
                    identity,
                };
                if meta {
                    e.set_data(find_data(stack, &list[i..], name)?);
                }
                return Ok(Some(e));
            }
            None => {
                found = Some(Entry {
                    identity: identity_from(stack, layer, &path, &st, p.xattr(&names.origin)?)?,
                    kind,
                    stat: st,
                    upper: None,
                    lower: None,
                    dir: Some(DirLayers { upper: None, lowers: Vec::new() }),
                    opaque: false,
                    data: None,
                });
            }
            Some(_) if kind != FileType::Directory => break,
            Some(_) => {}
        }
        let opaque = Opaque::from_value(p.xattr(&names.opaque)?.as_deref());
        // The kernel reads no redirect of an opaque dir.
        let redirect = if opaque == Opaque::Yes { None } else { redirect_of(stack, &mut p, &path)? };
        let dir = found.as_mut().and_then(|f| f.dir.as_mut()).ok_or(Errno::IO)?;
        dir.lowers.push(LowerDir { layer: ld.layer, path, xwhiteouts: opaque == Opaque::XWhiteouts });
        // An absolute redirect restarts the layers below even under an opaque ancestor.
        if opaque == Opaque::Yes || (last_layer && !matches!(redirect, Some(Target::Abs(_)))) {
            break;
        }
        // A dir renamed in a layer that was once an upper layer: the layers below hold it
        // where its redirect says.
        match (redirect, below) {
            (Some(Target::Abs(p)), _) => {
                target = Target::Abs(p);
                list = root_lowers(stack, Some(ld.layer)).into();
                i = 0;
            }
            (Some(Target::Rel(n)), Some(b)) => target = Target::Abs(b.with_file_name(n)),
            (Some(rel), None) => target = rel,
            (None, Some(b)) => target = Target::Abs(b),
            (None, None) => {}
        }
    }
    Ok(found)
}

impl Entry {
    fn set_data(&mut self, data: LowerObject) {
        self.stat.st_size = data.stat.st_size;
        self.stat.st_blocks = data.stat.st_blocks;
        self.data = Some(data);
    }
}

/// The lower regular file holding the data of a metacopy file named `name`: the first regular
/// file that is not itself metacopy in `lowers`. A metacopy file without data is corrupt (`EIO`).
fn find_data(stack: &LayerStack, lowers: &[LowerDir], name: &OsStr) -> Result<LowerObject> {
    for ld in lowers {
        let layer = stack.layer(ld.layer);
        let path = ld.path.join(name);
        let Some(st) = stat_in(layer.root(), &path)? else { continue };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            break;
        }
        if has_xattr(layer.root(), &path, &stack.names().metacopy)? {
            continue;
        }
        return Ok(LowerObject { layer: ld.layer, path, stat: st });
    }
    Err(ovl_core::Error::corrupt(format!("metacopy file {name:?} has no lower data")))
}

fn has_xattr(root: std::os::fd::BorrowedFd<'_>, path: &Path, key: &std::ffi::CStr) -> Result<bool> {
    let (pfd, name) = sys::open_parent(root, path)?;
    Ok(sys::get_xattr(&pfd, Some(&name), key)?.is_some())
}

/// Where the layers below look for a name: joined to the parent's lower dirs (possibly renamed,
/// after a relative redirect), or from each layer's root (after an absolute one).
#[derive(Debug, Clone)]
enum Target {
    Rel(std::ffi::OsString),
    Abs(PathBuf),
}

/// What lies on the way to an absolute path in one layer.
enum Walk {
    /// Every ancestor is a directory. `stop`: an opaque one stops the layers below (no later
    /// absolute redirect restarted them); `below`: the path the layers below look up.
    Open { stop: bool, below: PathBuf },
    /// An ancestor is missing: nothing here; the layers below look up `below`.
    Missing { below: PathBuf },
    /// An ancestor is a non-directory or a whiteout: nothing here or below.
    Blocked,
}

/// Checks the ancestors of `path` (not `path` itself) in `layer`, the way the kernel walks an
/// absolute redirect through one layer: the walk stays on `path` in this layer, while each
/// redirect on the way rewrites what the layers below look for.
fn walk_ancestors(stack: &LayerStack, layer: &ovl_core::Layer, path: &Path) -> Result<Walk> {
    let mut cur = PathBuf::new();
    let mut below = PathBuf::new();
    let mut stop = false;
    let comps: Vec<_> = path.components().collect();
    let (last, ancestors) = match comps.split_last() {
        Some((l, a)) => (l.as_os_str(), a),
        None => return Ok(Walk::Open { stop, below }),
    };
    for (i, c) in ancestors.iter().enumerate() {
        cur.push(c);
        let Some(st) = stat_in(layer.root(), &cur)? else {
            for rest in &ancestors[i..] {
                below.push(rest);
            }
            below.push(last);
            return Ok(Walk::Missing { below });
        };
        if is_whiteout_stat(&st) || FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(Walk::Blocked);
        }
        let Some(mut p) = Probe::open(layer.root(), &cur)? else { return Ok(Walk::Blocked) };
        if Opaque::from_value(p.xattr(&stack.names().opaque)?.as_deref()) == Opaque::Yes {
            stop = true;
            below.push(c);
            continue;
        }
        match redirect_of(stack, &mut p, &cur)? {
            Some(Target::Abs(r)) => {
                stop = false;
                below = r;
            }
            Some(Target::Rel(n)) => below.push(n),
            None => below.push(c),
        }
    }
    below.push(last);
    Ok(Walk::Open { stop, below })
}

/// The lower layers below `after` (all of them for `None`), each searched from its root.
fn root_lowers(stack: &LayerStack, after: Option<LayerId>) -> Vec<LowerDir> {
    stack
        .lowers()
        .iter()
        .filter(|l| after.is_none_or(|a| l.id() > a))
        .map(|l| LowerDir { layer: l.id(), path: PathBuf::new(), xwhiteouts: false })
        .collect()
}

/// The longest redirect we accept (the kernel reads at most a path's worth).
pub const MAX_REDIRECT: usize = 4096;

/// True when `v` is an `overlay.redirect` value lookup follows: a single name (relative: same
/// parent), or `/a/b` whose every component is a plain name (absolute, from the root of the
/// layers below), at most [`MAX_REDIRECT`] bytes. Anything else fails the lookup with `EIO`.
pub fn redirect_is_valid(v: &[u8]) -> bool {
    parse_redirect(v).is_some()
}

/// The `overlay.redirect` of `name` in `dir`, when the mount follows redirects. A value that is
/// not a valid name or absolute path is corrupt (`EIO`): it can never point outside the layer,
/// since every component must be a plain name and paths are opened beneath the layer root.
fn redirect_of(stack: &LayerStack, p: &mut Probe, path: &Path) -> Result<Option<Target>> {
    use ovl_core::RedirectDir;
    if matches!(stack.options().redirect_dir, RedirectDir::Off | RedirectDir::NoFollow) {
        return Ok(None);
    }
    let Some(v) = p.xattr(&stack.names().redirect)? else { return Ok(None) };
    parse_redirect(&v).map(Some).ok_or_else(|| {
        ovl_core::Error::corrupt(format!("invalid overlay.redirect {:?} on {path:?}", String::from_utf8_lossy(&v)))
    })
}

/// Parses an untrusted `overlay.redirect` value: `Some((absolute, path))` for a single plain name
/// (relative) or `/a/b` (absolute, from the layer root), `None` for anything else (empty, `.` or
/// `..` components, NUL bytes, too long). A path it returns never leaves a layer root.
pub fn parse_redirect_value(v: &[u8]) -> Option<(bool, PathBuf)> {
    match parse_redirect(v)? {
        Target::Abs(p) => Some((true, p)),
        Target::Rel(n) => Some((false, PathBuf::from(n))),
    }
}

/// Parses a redirect: a single name (relative) or `/a/b` (absolute, from the layer root).
fn parse_redirect(v: &[u8]) -> Option<Target> {
    use std::os::unix::ffi::OsStrExt;
    let ok = |c: &[u8]| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0) && !c.contains(&b'/');
    if v.is_empty() || v.len() > MAX_REDIRECT {
        return None;
    }
    if let Some(rest) = v.strip_prefix(b"/") {
        let mut p = PathBuf::new();
        for c in rest.split(|b| *b == b'/') {
            if !ok(c) {
                return None;
            }
            p.push(OsStr::from_bytes(c));
        }
        (!p.as_os_str().is_empty()).then_some(Target::Abs(p))
    } else {
        ok(v).then(|| Target::Rel(OsStr::from_bytes(v).to_os_string()))
    }
}

/// True when a lower layer of `parent` has a positive entry (not a whiteout) named `name`:
/// removing or renaming away that name in the merged view then needs a whiteout.
pub fn lower_has_name(stack: &LayerStack, parent: &DirLayers, name: &OsStr) -> Result<bool> {
    for ld in &parent.lowers {
        let layer = stack.layer(ld.layer);
        let path = ld.path.join(name);
        let Some(st) = stat_in(layer.root(), &path)? else { continue };
        if is_whiteout_stat(&st) || (ld.xwhiteouts && is_xwhiteout(stack, layer.root(), &path, &st)?) {
            return Ok(false);
        }
        return Ok(true);
    }
    Ok(false)
}

/// `lstat` of `path` in a layer; `None` when it does not exist (or a component is not a dir).
pub(crate) fn stat_in(root: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<Option<Stat>> {
    match sys::lstat_beneath(root, path) {
        Ok(st) => Ok(Some(st)),
        Err(e) if crate::probe::is_absent(e.errno()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An xwhiteout: a zero-size regular file carrying `overlay.whiteout`.
pub(crate) fn is_xwhiteout(
    stack: &LayerStack,
    root: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    st: &Stat,
) -> Result<bool> {
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size != 0 {
        return Ok(false);
    }
    let (pfd, name) = sys::open_parent(root, path)?;
    Ok(sys::get_xattr(&pfd, Some(&name), &stack.names().whiteout)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_plain_names_or_clean_absolute_paths() {
        assert!(matches!(parse_redirect(b"b"), Some(Target::Rel(n)) if n == "b"));
        assert!(matches!(parse_redirect(b"/a/b"), Some(Target::Abs(p)) if p == Path::new("a/b")));
        for bad in [&b""[..], b"/", b"..", b".", b"/a/../../etc", b"/a//b", b"a/b", b"/a/./b", b"x\0y", b"/etc/"] {
            assert!(parse_redirect(bad).is_none(), "{:?} must be refused", String::from_utf8_lossy(bad));
        }
        assert!(parse_redirect(&vec![b'a'; 5000]).is_none());
    }
}
