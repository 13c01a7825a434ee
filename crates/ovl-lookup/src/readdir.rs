//! The merged directory listing.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use ovl_core::sys;
use ovl_core::{LayerId, LayerStack, Result, is_whiteout_stat};
use rustix::fs::FileType;

use crate::DirLayers;
use crate::lookup::{is_xwhiteout, stat_in};

/// One entry of a merged directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedEntry {
    /// The name.
    pub name: OsString,
    /// The type of the object shown.
    pub file_type: FileType,
    /// The inode number in the layer the entry comes from.
    pub ino: u64,
    /// The layer the entry comes from.
    pub layer: LayerId,
    /// For an entry of an `impure` dir (one holding copied-up objects): its stable identity, so
    /// `d_ino` can agree with `st_ino`.
    pub identity: Option<crate::Identity>,
}

/// Lists the merged directory `dir`: upper entries first, then each lower layer's entries not
/// already seen. A lower layer whose summary the stack's presence holds lists a directory
/// without overlay metadata from the summary, and its entries carry no identity. Whiteouts (and xwhiteouts in `opaque=x` dirs) hide the name in the layers below
/// and are not listed. On a stack that reads the AUFS encoding, no `.wh.*` name is listed and
/// `.wh.NAME` hides `NAME` in its own layer and below. Order is stable for a given set of layers.
pub fn read_merged(stack: &LayerStack, dir: &DirLayers) -> Result<Vec<MergedEntry>> {
    let mut seen: HashSet<OsString> = HashSet::new();
    let mut out = Vec::new();
    let merged = dir.is_merged();
    if let (Some(up), Some(upper)) = (&dir.upper, stack.upper()) {
        let root = upper.layer().root()?;
        let root = root.as_fd();
        let impure = is_impure(stack, root, up)?;
        let (listing, hidden) = aufs_split(stack, sys::read_dir(root, up)?);
        for e in listing {
            if hidden.contains(&e.name) {
                continue;
            }
            let ft = resolve_type(root, &up.join(&e.name), e.file_type)?;
            if ft == FileType::CharacterDevice {
                if let Some(st) = stat_in(root, &up.join(&e.name))? {
                    if is_whiteout_stat(&st) {
                        if merged {
                            seen.insert(e.name);
                        }
                        continue;
                    }
                }
            }
            if merged {
                seen.insert(e.name.clone());
            }
            let identity = if impure { identity_of(stack, upper.layer(), &up.join(&e.name))? } else { None };
            out.push(MergedEntry { name: e.name, file_type: ft, ino: e.ino, layer: upper.layer().id(), identity });
        }
        if merged {
            seen.extend(hidden);
        }
    }
    let presence = stack.presence().filter(|_| !stack.reads_aufs()).map(|p| p.reader());
    for (i, ld) in dir.lowers.iter().enumerate() {
        let layer = stack.layer(ld.layer);
        let last = i + 1 == dir.lowers.len();
        // A frozen layer's plain directory is listed from its summary, whiteouts included (and
        // its root is not opened: a lazy root left closed costs no descriptor nor reopening).
        let summarized = presence.as_ref().filter(|_| !ld.xwhiteouts).and_then(|p| p.listing(ld.layer, &ld.path));
        if let Some(entries) = summarized {
            for (name, kind, ino) in entries {
                if seen.contains(&name) {
                    continue;
                }
                if !last {
                    seen.insert(name.clone());
                }
                if kind != ovl_core::presence::Kind::Whiteout {
                    let file_type = kind.file_type();
                    out.push(MergedEntry { name, file_type, ino, layer: ld.layer, identity: None });
                }
            }
            continue;
        }
        let root = layer.root()?;
        let root = root.as_fd();
        let impure = is_impure(stack, root, &ld.path)?;
        let (listing, hidden) = aufs_split(stack, sys::read_dir(root, &ld.path)?);
        for e in listing {
            if seen.contains(&e.name) || hidden.contains(&e.name) {
                continue;
            }
            let path = ld.path.join(&e.name);
            let ft = resolve_type(root, &path, e.file_type)?;
            let hidden = match ft {
                FileType::CharacterDevice => stat_in(root, &path)?.is_some_and(|st| is_whiteout_stat(&st)),
                FileType::RegularFile if ld.xwhiteouts => match stat_in(root, &path)? {
                    Some(st) => is_xwhiteout(stack, root, &path, &st)?,
                    None => false,
                },
                _ => false,
            };
            if !last {
                seen.insert(e.name.clone());
            }
            if !hidden {
                let identity = if impure { identity_of(stack, layer, &path)? } else { None };
                out.push(MergedEntry { name: e.name, file_type: ft, ino: e.ino, layer: ld.layer, identity });
            }
        }
        if !last {
            seen.extend(hidden);
        }
    }
    Ok(out)
}

/// Splits a layer's listing into the entries that may be shown and the names its `.wh.NAME`
/// entries hide (in this layer and below); both unchanged when the stack does not read the AUFS
/// encoding.
fn aufs_split(stack: &LayerStack, listing: Vec<sys::RawEntry>) -> (Vec<sys::RawEntry>, HashSet<OsString>) {
    if !stack.reads_aufs() {
        return (listing, HashSet::new());
    }
    let mut hidden = HashSet::new();
    let mut shown = Vec::with_capacity(listing.len());
    for e in listing {
        match e.name.as_bytes().strip_prefix(ovl_core::aufs::PREFIX) {
            Some(rest) => {
                hidden.insert(OsStr::from_bytes(rest).to_os_string());
            }
            None => shown.push(e),
        }
    }
    (shown, hidden)
}

fn resolve_type(root: std::os::fd::BorrowedFd<'_>, path: &std::path::Path, ft: FileType) -> Result<FileType> {
    if ft != FileType::Unknown {
        return Ok(ft);
    }
    Ok(stat_in(root, path)?.map(|st| FileType::from_raw_mode(st.st_mode)).unwrap_or(FileType::Unknown))
}

fn is_impure(stack: &LayerStack, root: std::os::fd::BorrowedFd<'_>, dir: &std::path::Path) -> Result<bool> {
    let key = &stack.names().impure;
    Ok(if dir.as_os_str().is_empty() {
        sys::get_xattr(root, None, key)?.is_some()
    } else {
        let (p, n) = sys::open_parent(root, dir)?;
        sys::get_xattr(&p, Some(&n), key)?.is_some()
    })
}

fn identity_of(stack: &LayerStack, layer: &ovl_core::Layer, path: &std::path::Path) -> Result<Option<crate::Identity>> {
    match stat_in(layer.root()?.as_fd(), path)? {
        Some(st) => Ok(Some(crate::identity(stack, layer, path, &st)?)),
        None => Ok(None),
    }
}
