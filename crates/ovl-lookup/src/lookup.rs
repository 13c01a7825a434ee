//! Lookup of one name down the stack.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Opaque, Result, is_whiteout_stat};

use crate::identity::identity_from;
use crate::probe::{DirHandles, Probe};
use crate::redirect::{self, Target, check_component};

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
        let upper_opaque = match stack.upper() {
            Some(u) => crate::aufs::root_opaque(stack, u.layer().root()?.as_fd())? == Opaque::Yes,
            None => false,
        };
        let mut lowers = Vec::new();
        if !upper_opaque {
            for l in stack.lowers() {
                let opaque = stack.root_opaque_of(l, || crate::aufs::root_opaque(stack, l.root()?.as_fd()))?;
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
/// is hidden by a whiteout, or is one the AUFS encoding reserves (`.wh.*`) on a stack that reads
/// it.
pub fn lookup(stack: &LayerStack, parent: &DirLayers, name: &OsStr) -> Result<Option<Entry>> {
    lookup_in(stack, parent, None, name)
}

/// [`lookup`] in a directory whose layer dirs the caller holds open (`held`, opened for
/// `parent`): the parent dirs are not opened again.
pub fn lookup_in(
    stack: &LayerStack,
    parent: &DirLayers,
    held: Option<&DirHandles>,
    name: &OsStr,
) -> Result<Option<Entry>> {
    let names = stack.names();
    sys::name_cstr(name)?;
    if stack.reads_aufs() && ovl_core::aufs::is_reserved(name) {
        return Ok(None);
    }
    let mut found: Option<Entry> = None;
    let mut target = Target::Rel(name.to_os_string());

    if let (Some(up), Some(upper)) = (&parent.upper, stack.upper()) {
        let path = up.join(name);
        if crate::aufs::hidden(stack, upper.layer(), &path, held.and_then(|h| h.upper()))? {
            return Ok(None);
        }
        if let Some(mut p) = Probe::open_in(upper.layer().root()?.as_fd(), &path, held.and_then(|h| h.upper()))? {
            let st = p.st;
            if is_whiteout_stat(&st) {
                return Ok(None);
            }
            let kind = FileType::from_raw_mode(st.st_mode);
            let identity = identity_from(stack, upper.layer(), &path, &st, origin_of(stack, &mut p)?)?;
            // With `nofollow` the kernel reads a redirect only where lower layers are left.
            let reads = reads_redirect(stack, None, parent.is_merged());
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
                if let Some(redirect) = metacopy_redirect(stack, &mut p, &path, reads)? {
                    // A metadata-only copy: its data is below, under its name or where its
                    // redirect says (the kernel writes one when it renames such a file).
                    let target = redirect.unwrap_or(target);
                    let list = match target {
                        Target::Abs(_) => root_lowers(stack, None).into(),
                        Target::Rel(_) => (&parent.lowers[..]).into(),
                    };
                    e.set_data(find_data(stack, list, 0, target, &path)?);
                }
                return Ok(Some(e));
            }
            let opaque = crate::aufs::opaque(stack, upper.layer(), &mut p, &path)? == Opaque::Yes;
            let redirect = if opaque || !reads { None } else { dir_redirect(stack, &mut p, &path)? };
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
    let mut list: Cow<'_, [LowerDir]> = match target {
        Target::Abs(_) => root_lowers(stack, None).into(),
        Target::Rel(_) => (&parent.lowers[..]).into(),
    };
    // Frozen layers whose summary lists nothing at the path are skipped unprobed, where a missing
    // object means "go on to the next layer": a relative target, and no AUFS marks to read.
    let presence = stack.presence().filter(|_| !stack.reads_aufs()).map(|p| p.reader());
    // The summaries' holders of the path last asked about: every layer of a relative target
    // asks about the same path (the parent's dirs are at one path unless redirected).
    // Kept with the layer dir and name it was asked for: a layer at the same dir whose summary
    // holds nothing there is passed over without building its path (the root dir of a view of
    // 10,000 layers is in each of them, and a lookup there would allocate and hash 10,000 paths).
    let mut holding: Option<(Cursor, ovl_core::presence::Holding<'_>)> = None;
    let mut i = 0;
    while i < list.len() {
        if let (Target::Rel(n), Some((at, h))) = (&target, &holding) {
            let next = &list[i];
            if at.is(&next.path, n) && h.held(next.layer) == ovl_core::presence::Held::Nothing {
                // And the layers after it up to the next one holding the path, at once.
                let rest = &list[i + 1..];
                // A root's lower dirs are every layer in turn, all at the root (no other dir's
                // path is empty).
                let dense = at.dir.as_os_str().is_empty()
                    && rest.last().is_some_and(|l| l.layer.0 as usize == next.layer.0 as usize + rest.len());
                i += 1 + h.skip(next.layer, rest.iter().map(|l| l.layer), |k| at.is_dir(&rest[k].path), dense);
                continue;
            }
        }
        let ld = list[i].clone();
        i += 1;
        let layer = stack.layer(ld.layer);
        let mut last_layer = false;
        // After an absolute redirect: where the layers below this one look (ancestors in this
        // layer may carry redirects of their own, which rewrite the path, as in the kernel).
        let mut below: Option<PathBuf> = None;
        let path = match &target {
            Target::Rel(n) => {
                check_component(n)?;
                ld.path.join(n)
            }
            // An absolute path is walked component by component, as the kernel does: a
            // non-directory or whiteout on the way hides everything below, an opaque directory on
            // the way stops the layers below this one (unless a redirect further down restarts
            // them), and a redirect on the way rewrites the path for the layers below.
            Target::Abs(p) => match walk_ancestors(stack, layer, p)? {
                Walk::Missing { below } => {
                    target = Target::Abs(below);
                    continue;
                }
                Walk::Blocked => break,
                Walk::Open { stop, below: b } => {
                    last_layer = stop;
                    below = Some(b);
                    p.clone()
                }
            },
        };
        if let (Target::Rel(n), Some(presence)) = (&target, presence.as_ref()) {
            use ovl_core::presence::Held;
            let at = match holding.take() {
                Some((c, h)) if c.is(&ld.path, n) => (c, h),
                _ => (Cursor { dir: ld.path.clone(), name: n.clone() }, presence.holding(&path)),
            };
            let held = at.1.held(ld.layer);
            // Where objects are their own identity (no origin to read), a plain object's
            // attributes recorded in the summary are all a lookup needs of it.
            let recorded = match held {
                Held::PlainDir | Held::Other if stack.own_identities() && !ld.xwhiteouts => at.1.stat(ld.layer),
                _ => None,
            };
            holding = Some(at);
            match held {
                Held::Nothing => continue,
                Held::Whiteout => break,
                // A directory below the first one found that carries no opaque mark, redirect
                // or xwhiteout mark: it only joins the merge, nothing of it needs reading.
                Held::PlainDir if found.as_ref().is_some_and(|f| f.dir.is_some()) => {
                    let dir = found.as_mut().and_then(|f| f.dir.as_mut()).ok_or(Errno::IO)?;
                    dir.lowers.push(LowerDir { layer: ld.layer, path, xwhiteouts: false });
                    continue;
                }
                Held::PlainDir | Held::Other | Held::Unknown => {}
            }
            if let Some(st) = recorded {
                let kind = FileType::from_raw_mode(st.st_mode);
                if found.is_some() && kind != FileType::Directory {
                    // Below a directory: a non-directory ends the merge.
                    break;
                }
                if found.is_none() {
                    let identity = identity_from(stack, layer, &path, &st, None)?;
                    let (lower, dir) = if kind == FileType::Directory {
                        (
                            None,
                            Some(DirLayers {
                                upper: None,
                                lowers: vec![LowerDir { layer: ld.layer, path, xwhiteouts: false }],
                            }),
                        )
                    } else {
                        (Some(LowerObject { layer: ld.layer, path, stat: st }), None)
                    };
                    let e = Entry { kind, stat: st, upper: None, lower, dir, opaque: false, data: None, identity };
                    if kind != FileType::Directory {
                        return Ok(Some(e));
                    }
                    found = Some(e);
                    continue;
                }
            }
        }
        if crate::aufs::hidden(stack, layer, &path, None)? {
            break;
        }
        let dir = held.and_then(|h| h.lower(ld.layer, path.parent().unwrap_or(Path::new(""))));
        let Some(mut p) = Probe::open_in(layer.root()?.as_fd(), &path, dir)? else {
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
        let reads = reads_redirect(stack, Some(ld.layer), i < list.len());
        match &mut found {
            None if kind != FileType::Directory => {
                let identity = identity_from(stack, layer, &path, &st, origin_of(stack, &mut p)?)?;
                let meta = metacopy_redirect(stack, &mut p, &path, reads)?;
                let mut e = Entry {
                    kind,
                    stat: st,
                    upper: None,
                    lower: Some(LowerObject { layer: ld.layer, path: path.clone(), stat: st }),
                    dir: None,
                    opaque: false,
                    data: None,
                    identity,
                };
                if let Some(redirect) = meta {
                    let (list, i, target) = advance(stack, list, i, ld.layer, target, below, redirect);
                    e.set_data(find_data(stack, list, i, target, &path)?);
                }
                return Ok(Some(e));
            }
            None => {
                found = Some(Entry {
                    identity: identity_from(stack, layer, &path, &st, origin_of(stack, &mut p)?)?,
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
        let opaque = crate::aufs::opaque(stack, layer, &mut p, &path)?;
        // The kernel reads no redirect of an opaque dir.
        let redirect = if opaque == Opaque::Yes || !reads { None } else { dir_redirect(stack, &mut p, &path)? };
        let dir = found.as_mut().and_then(|f| f.dir.as_mut()).ok_or(Errno::IO)?;
        dir.lowers.push(LowerDir { layer: ld.layer, path, xwhiteouts: opaque == Opaque::XWhiteouts });
        // An absolute redirect restarts the layers below even under an opaque ancestor.
        if opaque == Opaque::Yes || (last_layer && !matches!(redirect, Some(Target::Abs(_)))) {
            break;
        }
        // A dir renamed in a layer that was once an upper layer: the layers below hold it
        // where its redirect says.
        (list, i, target) = advance(stack, list, i, ld.layer, target, below, redirect);
    }
    Ok(found)
}

/// The layer dir and name a lookup's [`ovl_core::presence::Holding`] was asked for.
struct Cursor {
    dir: PathBuf,
    name: OsString,
}

impl Cursor {
    /// Compared as bytes (a `Path`'s `==` compares component by component), and empty ones
    /// without `memcmp`: the root dir's path is empty, its buffer a dangling pointer, and this
    /// machine's `memcmp` reads even zero bytes with a masked vector load, which at an unmapped
    /// address costs a microcode assist (~100 ns): in a view of 4,000 layers it doubled the time
    /// of a delete.
    fn is(&self, dir: &Path, name: &OsStr) -> bool {
        self.is_dir(dir) && same_bytes(self.name.as_bytes(), name.as_bytes())
    }

    /// Whether `dir` is the cursor's dir (the name being the same).
    fn is_dir(&self, dir: &Path) -> bool {
        same_bytes(self.dir.as_os_str().as_bytes(), dir.as_os_str().as_bytes())
    }
}

/// `a == b`, without `memcmp` for empty slices (see [`Cursor::is`]).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

/// The `overlay.origin` of the object `p` probes, unless the stack takes objects as their own
/// identity ([`LayerStack::own_identities`]).
fn origin_of(stack: &LayerStack, p: &mut Probe) -> Result<Option<Vec<u8>>> {
    if stack.own_identities() {
        return Ok(None);
    }
    p.xattr(&stack.names().origin)
}

impl Entry {
    fn set_data(&mut self, data: LowerObject) {
        self.stat.st_size = data.stat.st_size;
        self.stat.st_blocks = data.stat.st_blocks;
        self.data = Some(data);
    }
}

/// Where the layers below the object just found in layer `layer` (at `list[i - 1]`) look: the
/// object's own redirect wins (an absolute one restarts from the roots of the layers below
/// `layer`), else the rewritten path `below` of an absolute walk, else `target` unchanged.
fn advance<'a>(
    stack: &LayerStack,
    list: Cow<'a, [LowerDir]>,
    i: usize,
    layer: LayerId,
    target: Target,
    below: Option<PathBuf>,
    redirect: Option<Target>,
) -> (Cow<'a, [LowerDir]>, usize, Target) {
    match (redirect, below) {
        (Some(Target::Abs(p)), _) => (root_lowers(stack, Some(layer)).into(), 0, Target::Abs(p)),
        (Some(Target::Rel(n)), Some(b)) => (list, i, Target::Abs(b.with_file_name(n))),
        (Some(rel), None) => (list, i, rel),
        (None, Some(b)) => (list, i, Target::Abs(b)),
        (None, None) => (list, i, target),
    }
}

/// The lower regular file holding the data of the metacopy file at `meta_path`, looked up from
/// `list[i..]` at `target` the way the kernel does: the first regular file that is not itself
/// metacopy; a whiteout, a non-regular file or a non-directory on the way ends the search, and
/// a lower metacopy file on the way sends it on where its own redirect says. A metacopy file
/// without data is corrupt (`EIO`).
fn find_data(
    stack: &LayerStack,
    mut list: Cow<'_, [LowerDir]>,
    mut i: usize,
    mut target: Target,
    meta_path: &Path,
) -> Result<LowerObject> {
    let names = stack.names();
    while i < list.len() {
        let ld = list[i].clone();
        i += 1;
        let layer = stack.layer(ld.layer);
        let (path, stop, below) = match &target {
            Target::Rel(n) => {
                check_component(n)?;
                (ld.path.join(n), false, None)
            }
            Target::Abs(p) => match walk_ancestors(stack, layer, p)? {
                Walk::Missing { below } => {
                    target = Target::Abs(below);
                    continue;
                }
                Walk::Blocked => break,
                Walk::Open { stop, below } => (p.clone(), stop, Some(below)),
            },
        };
        if crate::aufs::hidden(stack, layer, &path, None)? {
            break;
        }
        let Some(mut p) = Probe::open(layer.root()?.as_fd(), &path)? else {
            // An opaque ancestor stops the layers below, unless a metacopy file is found here.
            if stop {
                break;
            }
            if let Some(b) = below {
                target = Target::Abs(b);
            }
            continue;
        };
        let st = p.st;
        if is_whiteout_stat(&st) || FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            break;
        }
        let xwhiteouts = ld.xwhiteouts && matches!(target, Target::Rel(_));
        if xwhiteouts && st.st_size == 0 && p.xattr(&names.whiteout)?.is_some() {
            break;
        }
        let reads = reads_redirect(stack, Some(ld.layer), i < list.len());
        match metacopy_redirect(stack, &mut p, &path, reads)? {
            None => return Ok(LowerObject { layer: ld.layer, path, stat: st }),
            Some(redirect) => (list, i, target) = advance(stack, list, i, ld.layer, target, below, redirect),
        }
    }
    Err(ovl_core::Error::corrupt(format!("metacopy file {meta_path:?} has no lower data")))
}

/// For a regular file carrying `overlay.metacopy`, its redirect (`Some(None)` when it has none
/// or the kernel would not read it, see [`reads_redirect`]); `None` for any other object.
/// Fails as the kernel does: `EIO` for a metacopy value too short to be one, `EINVAL` for a
/// redirect it refuses, `EPERM` when the options do not follow metacopy files (`metacopy=off`)
/// or redirects (`redirect_dir=nofollow`). A redirect on a file that is not metacopy (one whose
/// data was copied up after a rename) is never read.
fn metacopy_redirect(stack: &LayerStack, p: &mut Probe, path: &Path, reads: bool) -> Result<Option<Option<Target>>> {
    if FileType::from_raw_mode(p.st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    let Some(meta) = p.xattr(&stack.names().metacopy)? else { return Ok(None) };
    if (1..4).contains(&meta.len()) {
        return Err(ovl_core::Error::corrupt(format!("overlay.metacopy of {path:?} is too short")));
    }
    let redirect = if reads { read_redirect(stack, p, path)? } else { None };
    refuse_unfollowed(stack, redirect.is_some(), path)?;
    if !stack.options().metacopy {
        return Err(ovl_core::Error::new(Errno::PERM).context(format!("metacopy file {path:?} without metacopy=on")));
    }
    Ok(Some(redirect))
}

/// The redirect of a directory the kernel reads it of ([`reads_redirect`]); `EPERM` with
/// `redirect_dir=nofollow`.
fn dir_redirect(stack: &LayerStack, p: &mut Probe, path: &Path) -> Result<Option<Target>> {
    let redirect = read_redirect(stack, p, path)?;
    refuse_unfollowed(stack, redirect.is_some(), path)?;
    Ok(redirect)
}

/// The kernel refuses a lookup that would follow a redirect when the options say `nofollow`.
fn refuse_unfollowed(stack: &LayerStack, has_redirect: bool, path: &Path) -> Result<()> {
    if has_redirect && !follows(stack) {
        return Err(ovl_core::Error::new(Errno::PERM).context(format!("redirect on {path:?} with nofollow")));
    }
    Ok(())
}

/// True unless the options say `redirect_dir=nofollow`. `off` follows: the kernel's default
/// configuration (`CONFIG_OVERLAY_FS_REDIRECT_ALWAYS_FOLLOW`) turns it into `follow`.
fn follows(stack: &LayerStack) -> bool {
    stack.options().redirect_dir != ovl_core::RedirectDir::NoFollow
}

/// Whether the kernel reads the redirect of an object met in `layer` (`None`: the upper layer).
/// Following redirects, it reads them everywhere but in the bottom layer, below which there is
/// nothing to follow them into. With `nofollow` it reads them (and then refuses the lookup)
/// only where lower dirs are left in the parent's list (`more`).
fn reads_redirect(stack: &LayerStack, layer: Option<LayerId>, more: bool) -> bool {
    if !follows(stack) {
        return more;
    }
    layer.is_none() || layer != stack.lowers().last().map(|l| l.id())
}

/// The `overlay.redirect` of the object `p` at `path`, parsed as the kernel does (see
/// [`crate::redirect`]); a value the kernel refuses fails the lookup with `EINVAL`.
fn read_redirect(stack: &LayerStack, p: &mut Probe, path: &Path) -> Result<Option<Target>> {
    let Some(v) = p.xattr(&stack.names().redirect)? else { return Ok(None) };
    redirect::parse(&v).map(Some).map_err(|e| {
        ovl_core::Error::new(e)
            .context(format!("invalid overlay.redirect {:?} on {path:?}", String::from_utf8_lossy(&v)))
    })
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
/// redirect on the way rewrites what the layers below look for. Reaching a component the
/// kernel refuses (`.`, `..`, empty) fails with `EACCES`, as in the kernel.
fn walk_ancestors(stack: &LayerStack, layer: &ovl_core::Layer, path: &Path) -> Result<Walk> {
    let mut cur = PathBuf::new();
    let mut below = PathBuf::new();
    let mut stop = false;
    let comps: Vec<_> = path.components().collect();
    let (last, ancestors) = match comps.split_last() {
        Some((l, a)) => (l.as_os_str(), a),
        None => return Ok(Walk::Open { stop, below }),
    };
    let reads = reads_redirect(stack, Some(layer.id()), true);
    for (i, c) in ancestors.iter().enumerate() {
        check_component(c.as_os_str())?;
        cur.push(c);
        if crate::aufs::hidden(stack, layer, &cur, None)? {
            return Ok(Walk::Blocked);
        }
        let Some(st) = stat_in(layer.root()?.as_fd(), &cur)? else {
            for rest in &ancestors[i..] {
                below.push(rest);
            }
            below.push(last);
            return Ok(Walk::Missing { below });
        };
        if is_whiteout_stat(&st) || FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(Walk::Blocked);
        }
        let Some(mut p) = Probe::open(layer.root()?.as_fd(), &cur)? else { return Ok(Walk::Blocked) };
        if !reads {
            below.push(c);
            continue;
        }
        if crate::aufs::opaque(stack, layer, &mut p, &cur)? == Opaque::Yes {
            stop = true;
            below.push(c);
            continue;
        }
        match dir_redirect(stack, &mut p, &cur)? {
            Some(Target::Abs(r)) => {
                stop = false;
                below = r;
            }
            Some(Target::Rel(n)) => below.push(n),
            None => below.push(c),
        }
    }
    check_component(last)?;
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

/// True when a lower layer of `parent` has a positive entry (not a whiteout) named `name`:
/// removing or renaming away that name in the merged view then needs a whiteout.
pub fn lower_has_name(stack: &LayerStack, parent: &DirLayers, name: &OsStr) -> Result<bool> {
    for ld in &parent.lowers {
        let layer = stack.layer(ld.layer);
        let path = ld.path.join(name);
        if crate::aufs::hidden(stack, layer, &path, None)? {
            return Ok(false);
        }
        let Some(st) = stat_in(layer.root()?.as_fd(), &path)? else { continue };
        if is_whiteout_stat(&st) || (ld.xwhiteouts && is_xwhiteout(stack, layer.root()?.as_fd(), &path, &st)?) {
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
