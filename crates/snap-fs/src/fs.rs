//! The filesystem of a snapshot mount: the live overlay (LIVE as the only, upper, layer, with
//! the snapshot hook) plus `.snapshots` and the views. Requests are routed by node id: view ids
//! live in `[VIEW_BASE, 1 << 63)`, everything else is the live overlay's, whose own dispatch
//! serves it. This router is the snapshot mount's one [`Handler`], whichever transport carried
//! the request.

use std::sync::Arc;
use std::time::Duration;

use ovl_fs::{OverlayFs, Served, errno};
use ovl_proto::{Answer, Attr, Ctx, Handler, Op, fopen, guarded};

use crate::view::{SNAPDIR, SNAPDIR_NAME, VIEW_BASE, Views};

const TTL: Duration = Duration::from_secs(1);

fn is_view(id: u64) -> bool {
    (VIEW_BASE..1 << 63).contains(&id)
}

/// The errno of a view's failure (logged when unexpected).
fn view_errno(e: ovl_core::Error) -> i32 {
    let code = e.errno().raw_os_error();
    if code == libc::EIO {
        tracing::warn!("snapshot view: {e}");
    }
    code
}

macro_rules! tri {
    ($answer:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $answer.error(view_errno(e)),
        }
    };
}

/// The filesystem served on a snapshot mount.
pub struct SnapFs {
    live: OverlayFs,
    views: Arc<Views>,
}

impl SnapFs {
    /// The live overlay's notifier slot (see `OverlayFs::notifier_slot`).
    pub(crate) fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.live.notifier_slot()
    }

    /// The live overlay `live` (built with the snapshot hook) and the views.
    pub(crate) fn new(live: OverlayFs, views: Arc<Views>) -> Self {
        Self { live, views }
    }
}

impl Served for SnapFs {
    fn init(&mut self, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        self.live.init(config)
    }
}

impl Handler for SnapFs {
    fn handle(&self, ctx: &Ctx, op: Op<'_>, a: &mut dyn Answer) {
        let Some(view) = view_side(&op) else {
            return self.live.handle(ctx, op, a);
        };
        match view {
            Side::View => guarded(op.name(), || self.serve_view(op, a)),
            Side::Refused(e) => a.error(e),
        }
    }

    /// A change to LIVE may first copy what it changes into the newest snapshot's layer (the
    /// CoW rules): however small, it may take as long as that copy.
    fn may_block(&self, op: &Op<'_>) -> bool {
        op.may_block()
            || view_side(op).is_none()
                && matches!(
                    op,
                    Op::Write { .. }
                        | Op::Create { .. }
                        | Op::Mknod { .. }
                        | Op::Mkdir { .. }
                        | Op::Symlink { .. }
                        | Op::Unlink { .. }
                )
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if ino == SNAPDIR {
            return;
        }
        if is_view(ino) {
            return self.views.forget(ino, nlookup);
        }
        self.live.forget(ino, nlookup)
    }
}

/// Where a request that is not the live overlay's goes.
enum Side {
    /// To the views.
    View,
    /// Nowhere: a change aimed at a view, or across the views' border.
    Refused(i32),
}

/// `None` for the live overlay's requests.
fn view_side(op: &Op<'_>) -> Option<Side> {
    let refuse_in = |ino: u64| is_view(ino).then_some(Side::Refused(libc::EROFS));
    match *op {
        Op::Lookup { parent, name } => (is_view(parent) || parent == 1 && name == SNAPDIR_NAME).then_some(Side::View),
        Op::Setattr { ino, .. }
        | Op::Write { ino, .. }
        | Op::Setxattr { ino, .. }
        | Op::Removexattr { ino, .. }
        | Op::Fallocate { ino, .. } => refuse_in(ino),
        Op::Mknod { parent, .. }
        | Op::Mkdir { parent, .. }
        | Op::Unlink { parent, .. }
        | Op::Rmdir { parent, .. }
        | Op::Symlink { parent, .. }
        | Op::Create { parent, .. } => refuse_in(parent),
        // Between a view and the live tree it is another filesystem for `mv`.
        Op::Rename { parent, newparent, .. } => match (is_view(parent), is_view(newparent)) {
            (false, false) => None,
            (true, true) => Some(Side::Refused(libc::EROFS)),
            _ => Some(Side::Refused(libc::EXDEV)),
        },
        Op::Link { ino, newparent, .. } => match (is_view(ino), is_view(newparent)) {
            (false, false) => None,
            (_, true) => Some(Side::Refused(libc::EROFS)),
            _ => Some(Side::Refused(libc::EXDEV)),
        },
        // The kernel falls back to read + write.
        Op::CopyFileRange { ino_in, ino_out, .. } => {
            (is_view(ino_in) || is_view(ino_out)).then_some(Side::Refused(libc::EXDEV))
        }
        Op::Lseek { ino, .. } => is_view(ino).then_some(Side::Refused(libc::ENOSYS)),
        Op::Statfs { .. } => None,
        Op::Getattr { ino, .. }
        | Op::Readlink { ino }
        | Op::Open { ino, .. }
        | Op::Read { ino, .. }
        | Op::Flush { ino, .. }
        | Op::Release { ino, .. }
        | Op::Fsync { ino, .. }
        | Op::Opendir { ino }
        | Op::Readdir { ino, .. }
        | Op::Releasedir { ino, .. }
        | Op::Fsyncdir { ino, .. }
        | Op::Getxattr { ino, .. }
        | Op::Listxattr { ino, .. }
        | Op::Access { ino, .. } => is_view(ino).then_some(Side::View),
    }
}

impl SnapFs {
    /// Serves a read-only request of `.snapshots` or a view (`view_side` chose it).
    fn serve_view(&self, op: Op<'_>, a: &mut dyn Answer) {
        match op {
            Op::Lookup { parent, name } => {
                if parent == 1 {
                    return a.entry(SNAPDIR, TTL, TTL, &self.views.snapdir_attr());
                }
                let attr = tri!(a, self.views.lookup(parent, name));
                // A view node's bytes never change (see `crate::view`): names are kept like LIVE's.
                a.entry(attr.ino, TTL, TTL, &attr);
            }
            Op::Getattr { ino, .. } => a.attr(TTL, &tri!(a, self.views.getattr(ino))),
            Op::Readlink { ino } => a.data(&tri!(a, self.views.readlink(ino))),
            Op::Open { ino, flags, .. } => {
                let (fh, keep) = tri!(a, self.views.open(ino, flags));
                a.opened(fh, if keep { fopen::KEEP_CACHE } else { 0 } | fopen::NOFLUSH, None);
            }
            Op::Read { fh, offset, size, .. } => a.data(&tri!(a, self.views.read(fh, offset, size))),
            Op::Release { fh, .. } => {
                self.views.release(fh);
                a.ok();
            }
            Op::Releasedir { fh, .. } => {
                self.views.releasedir(fh);
                a.ok();
            }
            Op::Flush { .. } | Op::Fsync { .. } | Op::Fsyncdir { .. } => a.ok(),
            Op::Opendir { ino } => {
                let fh = tri!(a, self.views.opendir(ino));
                // `.snapshots` changes with every take; a view never changes.
                a.opened(fh, if ino == SNAPDIR { 0 } else { fopen::KEEP_CACHE | fopen::CACHE_DIR }, None);
            }
            Op::Readdir { fh, offset, plus: false, .. } => {
                let list = tri!(a, self.views.listing(fh));
                for (i, (name, kind, child)) in list.iter().enumerate().skip(offset as usize) {
                    if a.dir_entry(*child, i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                a.ok();
            }
            Op::Readdir { ino, fh, offset, plus: true, .. } => {
                let list = tri!(a, self.views.listing(fh));
                let self_attr = tri!(a, self.views.getattr(ino));
                for (i, (name, kind, child)) in list.iter().enumerate().skip(offset as usize) {
                    let off = i as u64 + 1;
                    let dots = name == "." || name == "..";
                    let looked = if dots { None } else { self.views.lookup(ino, name).ok() };
                    let full = match looked {
                        Some(attr) => {
                            let full = a.dir_entry_plus(attr.ino, off, name, TTL, &attr);
                            if full {
                                self.views.forget(attr.ino, 1);
                            }
                            full
                        }
                        None => {
                            // Listed only (no node): a failed lookup is asked again on use.
                            let attr = Attr { ino: *child, kind: *kind, ..self_attr };
                            a.dir_entry_plus(0, off, name, if dots { TTL } else { Duration::ZERO }, &attr)
                        }
                    };
                    if full {
                        break;
                    }
                }
                a.ok();
            }
            Op::Getxattr { ino, name, size } => {
                if ino == SNAPDIR {
                    return a.error(libc::ENODATA);
                }
                let v = tri!(a, self.views.getxattr(ino, name));
                a.xattr(size, &v);
            }
            Op::Listxattr { ino, size } => {
                let v = if ino == SNAPDIR { Vec::new() } else { tri!(a, self.views.listxattr(ino)) };
                a.xattr(size, &v);
            }
            Op::Access { mask, .. } => {
                if mask & libc::W_OK != 0 {
                    return a.error(libc::EROFS);
                }
                a.ok();
            }
            other => {
                tracing::error!(op = other.name(), "a live request was routed to the views");
                a.error(errno(ovl_core::Errno::IO.into()));
            }
        }
    }
}
