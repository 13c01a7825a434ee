//! Offline consistency checks of an overlay's layers (`ovlfs check`, and the layers of every
//! snapshot in `ovlsnap check`), and the repair of what is safe to repair.
//!
//! The upper layer is walked object by object and judged by how the kernel reads it over the
//! layers below: names are resolved with `ovl-lookup` (the kernel's lookup rules), and every
//! layer is opened beneath its root without following symlinks (`ovl_core::sys`). The work dir
//! is looked at too. Nothing is written unless a repair is asked for, and a repair only removes
//! what is no part of the tree (through `ovl-copyup`, one object at a time, keeping the parent's
//! times), then the caller checks again: whiteouts that hide nothing (in a merged directory the
//! view does not change at all; in one that merges nothing the kernel lists a whiteout as a
//! phantom entry that cannot be looked up, which goes away) and work dir leftovers.
//!
//! | kind | severity | what |
//! |---|---|---|
//! | `orphan-whiteout` | fixable | a whiteout whose name no layer below shows |
//! | `whiteout-in-opaque-dir` | fixable | a whiteout in an opaque dir (hides nothing; listed) |
//! | `stale-work-entry` | fixable | a half-made object left in `WORKDIR/work` |
//! | `redirect-malformed` | error | not a name or an absolute path of names (lookup fails: `EINVAL`, `EACCES` for `.`/`..`) |
//! | `redirect-dangling` | warning | nothing below where it points: merges nothing |
//! | `redirect-loop` | error | merges the lower dir an ancestor already shows |
//! | `redirect-duplicate` | error | merges a lower dir that also shows elsewhere |
//! | `redirect-on-non-dir` | error | on a symlink, device, fifo or socket |
//! | `redirect-not-followed` | warning | `redirect_dir=nofollow`: the kernel refuses such lookups (`EPERM`) |
//! | `origin-corrupt` | error | `overlay.origin` is not a valid file handle |
//! | `origin-stale`, `origin-foreign` | warning | names a deleted object / no lower fs: ignored (dirs: only with `index=on`) |
//! | `metacopy-no-data` | error | a metadata-only copy with no data below (lookup fails, `EIO`) |
//! | `metacopy-invalid` | error | an `overlay.metacopy` value the kernel refuses |
//! | `metacopy-not-enabled` | warning | metacopy files, but no `metacopy=on` |
//! | `opaque-invalid`, `impure-on-non-dir`, `unknown-xattr` | warning | odd overlay xattrs |
//! | `lookup-error` | error | the overlay cannot look a directory up |
//! | `volatile-incompat` | error | `WORKDIR/work/incompat/volatile` (any volatile mount leaves it): the kernel refuses to mount |
//! | `index-not-checked` | warning | an `index=on` layout (`WORKDIR/index`) is not checked |
//! | `layers-in-use` | warning | a mount or a process uses the layers (a repair is refused) |
//!
//! Two things the kernel itself leaves are not reported: its shared whiteout in
//! `WORKDIR/work` (a 0:0 device named `#N`, removed at its next mount), and `overlay.redirect`
//! on a regular file that is no longer metacopy (a renamed metacopy file whose data was copied
//! up since; the kernel never reads it again).

mod busy;
mod report;
mod upper;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_core::sys;
use ovl_core::{Errno, LayerStack, MountOptions, Result, StackError, is_whiteout_stat};
use rustix::fs::{Mode, OFlags};

pub use busy::users_of;
pub use report::{Finding, Report, Severity};
pub use upper::check_upper;

/// Why `ovlfs check` could not run to the end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The options or layers cannot name an overlay to check (bad usage: exit code 2).
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The options name no upper layer: there is nothing to check.
    #[error("check needs upperdir= and workdir= (the upper layer is what is checked)")]
    NoUpper,
    /// A repair was asked for while something uses the layers.
    #[error("refusing to repair layers in use ({}): unmount first", .0.join(", "))]
    Busy(Vec<String>),
    /// Reading (or repairing) a layer failed.
    #[error("{0}")]
    Io(#[from] ovl_core::Error),
}

/// Checks the overlay `opts` names (its upper layer over its lower layers, and its work dir);
/// with `repair`, then removes what is fixable and checks again. The layers are opened
/// read-only: a check changes nothing, not even the work dir a mount would clean.
pub fn check_options(opts: &MountOptions, repair: bool) -> std::result::Result<Report, CheckError> {
    if opts.upperdir.is_none() || opts.workdir.is_none() {
        return Err(CheckError::NoUpper);
    }
    // A mount would refuse a work dir marked incompatible; the check reports the marker instead.
    let stack = LayerStack::open_to_check(opts)?;
    let upper = stack.upper().ok_or(CheckError::NoUpper)?;
    let work = upper.workdir().join("work");
    let users = users_of(&[upper.layer().path(), upper.workdir(), &work]);
    if repair && !users.is_empty() {
        return Err(CheckError::Busy(users));
    }
    let mut report = check_layers(&stack)?;
    for u in &users {
        let detail = format!("in use by {u}: what the check saw may be changing");
        report.findings.push(Finding::new(Severity::Warning, "layers-in-use", upper.layer().path(), detail));
    }
    if repair && report.fixable().next().is_some() {
        let repaired = repair_layers(&stack, &report)?;
        report = check_layers(&stack)?;
        report.repaired = repaired;
    }
    report.sort();
    Ok(report)
}

/// Checks the upper layer of `stack` (opened with [`LayerStack::open`]) and its work dir.
pub fn check_layers(stack: &LayerStack) -> Result<Report> {
    let upper = stack.upper().ok_or(Errno::INVAL)?;
    let mut report = check_upper(stack)?;
    report.merge(check_workdir(upper.workdir())?);
    Ok(report)
}

/// Checks a work dir: leftovers in `WORKDIR/work`, the kernel's `incompat` marker of a volatile
/// mount, an `index=on` layout.
pub fn check_workdir(workdir: &Path) -> Result<Report> {
    let mut report = Report::default();
    let dir = match rustix::fs::open(workdir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(report),
        Err(e) => return Err(e.into()),
    };
    let work = workdir.join("work");
    for e in entries(&dir, "work")?.unwrap_or_default() {
        report.checked += 1;
        let path = work.join(&e.name);
        if e.name == "incompat" {
            for feature in entries(&dir, "work/incompat")?.unwrap_or_default() {
                let detail = if feature.name == "volatile" {
                    "a volatile mount used these layers (the kernel leaves this marker even at a clean \
                     unmount): the kernel refuses to mount them while it is there, as a crash may have lost \
                     writes; remove it only if the system did not crash since that mount"
                } else {
                    "an incompatible feature the kernel refuses to mount with"
                };
                report.findings.push(Finding::new(
                    Severity::Error,
                    "volatile-incompat",
                    path.join(&feature.name),
                    detail,
                ));
            }
            continue;
        }
        if is_kernel_whiteout_cache(&dir, &e.name)? {
            continue;
        }
        let detail = "left in the work dir by an interrupted copy-up or whiteout: never part of the view";
        report.findings.push(Finding::new(Severity::Fixable, "stale-work-entry", path, detail));
    }
    if let Some(index) = entries(&dir, "index")? {
        let detail = format!("an index=on layout with {} entries: not checked", index.len());
        report.findings.push(Finding::new(Severity::Warning, "index-not-checked", workdir.join("index"), detail));
    }
    Ok(report)
}

/// The entries of the directory `rel` beneath `dir`; `None` when there is none.
fn entries(dir: &OwnedFd, rel: &str) -> Result<Option<Vec<sys::RawEntry>>> {
    match sys::read_dir(dir, Path::new(rel)) {
        Ok(v) => Ok(Some(v)),
        Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The kernel keeps one whiteout in `WORKDIR/work` (named `#` and a hex number) to hard-link
/// whiteouts from, and leaves it there at unmount; its next mount removes it. ovlfs keeps one
/// too (`ovl_copyup::SHARED_WHITEOUT`).
fn is_kernel_whiteout_cache(workdir: &OwnedFd, name: &std::ffi::OsStr) -> Result<bool> {
    let b = name.as_encoded_bytes();
    let named = (b.len() > 1 && b[0] == b'#' && b[1..].iter().all(u8::is_ascii_hexdigit))
        || b == ovl_copyup::SHARED_WHITEOUT.to_bytes();
    if !named {
        return Ok(false);
    }
    let st = sys::lstat_beneath(workdir, &Path::new("work").join(name))?;
    Ok(is_whiteout_stat(&st))
}

/// Removes the fixable findings of `report` from the layers of `stack` (the read-only stack the
/// check used): whiteouts that hide nothing, and work dir leftovers. Returns what it removed;
/// a finding that no longer holds (the object changed meanwhile) is left alone.
pub fn repair_layers(stack: &LayerStack, report: &Report) -> Result<Vec<Finding>> {
    let upper = stack.upper().ok_or(Errno::INVAL)?;
    let work = open_work(upper.workdir())?;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<ovl_core::LayerRoot> {
        ovl_core::LayerRoot::held(Arc::new(rustix::io::dup(fd)?))
    };
    let lowers = stack
        .lowers()
        .iter()
        .map(|l| Ok((l.path().to_path_buf(), dup(l.root()?.as_fd())?)))
        .collect::<Result<Vec<_>>>()?;
    let mut options = stack.options().clone();
    options.read_only = false;
    let writable = LayerStack::from_open_dirs(
        lowers,
        Some((upper.layer().path().to_path_buf(), dup(upper.layer().root()?.as_fd())?, work)),
        options,
    )?;
    let mut done = repair_upper(&writable, report.fixable())?;
    done.extend(repair_work(upper.workdir(), report.fixable())?);
    Ok(done)
}

/// Removes the whiteouts among `findings` that are in the upper layer of `stack` (writable).
pub fn repair_upper<'a>(stack: &LayerStack, findings: impl Iterator<Item = &'a Finding>) -> Result<Vec<Finding>> {
    let upper = stack.writable_upper().ok_or(Errno::ROFS)?.layer().path().to_path_buf();
    let mut done = Vec::new();
    for f in findings.filter(|f| matches!(f.kind, "orphan-whiteout" | "whiteout-in-opaque-dir")) {
        let Some((parent, name)) = layer_parent(&upper, &f.path) else { continue };
        match ovl_copyup::remove_whiteout(stack, &parent, &sys::name_cstr(&name)?) {
            Ok(()) => done.push(f.clone()),
            Err(e) if matches!(e.errno(), Errno::NOENT | Errno::INVAL) => {}
            Err(e) => return Err(e.context(format!("removing {}", f.path.display()))),
        }
    }
    Ok(done)
}

/// Removes the work dir leftovers among `findings` from `WORKDIR/work`.
pub fn repair_work<'a>(workdir: &Path, findings: impl Iterator<Item = &'a Finding>) -> Result<Vec<Finding>> {
    let work_path = workdir.join("work");
    let mut done = Vec::new();
    let mut work: Option<OwnedFd> = None;
    for f in findings.filter(|f| f.kind == "stale-work-entry") {
        let (Some(parent), Some(name)) = (f.path.parent(), f.path.file_name()) else { continue };
        if parent != work_path {
            continue;
        }
        if work.is_none() {
            work = Some(open_work(workdir)?);
        }
        let Some(fd) = &work else { continue };
        sys::remove_tree_at(fd.as_fd(), &sys::name_cstr(name)?)?;
        done.push(f.clone());
    }
    Ok(done)
}

/// `WORKDIR/work`, open.
fn open_work(workdir: &Path) -> Result<OwnedFd> {
    let wd = rustix::fs::open(workdir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    sys::open_beneath(&wd, Path::new("work"), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
}

/// The parent (in the layer) and name of `path`, an object of the layer at `top`.
fn layer_parent(top: &Path, path: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
    let rel = path.strip_prefix(top).ok()?;
    Some((rel.parent()?.to_path_buf(), rel.file_name()?.to_os_string()))
}
