//! The validated layer stack: lower layers (top first), an optional upper layer and its work dir.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};

use crate::root::LayerRoot;
use crate::sys;
use crate::{Error, MountOptions, StackError, XattrNames};

/// Index of a layer in the stack: 0 is the upper layer (when present), lowers follow top first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub u16);

/// One directory of the stack, held open for the life of the mount.
#[derive(Debug)]
pub struct Layer {
    id: LayerId,
    /// (Shared: a snapshot store's thousands of view stacks name the same layers.)
    path: Arc<Path>,
    root: LayerRoot,
    dev: u64,
    fs_index: u8,
    uuid: [u8; 16],
}

impl Layer {
    /// The layer's position in the stack.
    pub fn id(&self) -> LayerId {
        self.id
    }
    /// The path the layer was given as (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The open root directory; every access to the layer is relative to it. A snapshot
    /// store's layers are opened again here when their pool closed them (see [`LayerRoot`]):
    /// hold the descriptor only while it is used.
    pub fn root(&self) -> Result<Arc<OwnedFd>, Error> {
        self.root.get()
    }

    /// Whether the root stays open for the life of the stack, so that holding
    /// [`Layer::root`]'s descriptor costs none of its own.
    pub fn root_is_held(&self) -> bool {
        self.root.is_held()
    }
    /// The device of the layer's filesystem.
    pub fn dev(&self) -> u64 {
        self.dev
    }
    /// A small number identifying the layer's filesystem within this stack (0 = the first fs
    /// seen, the upper's when there is one). Used to keep inode numbers of different
    /// filesystems apart.
    pub fn fs_index(&self) -> u8 {
        self.fs_index
    }
    /// The UUID of the layer's filesystem (all zeros if it has none), as recorded in
    /// `overlay.origin`.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
}

/// The writable layer and its work directory (`WORKDIR/work`).
#[derive(Debug)]
pub struct UpperLayer {
    layer: Layer,
    workdir: PathBuf,
    work: OwnedFd,
    index: Option<Arc<OwnedFd>>,
}

impl UpperLayer {
    /// The upper layer itself.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }
    /// The `work` directory where objects are built before they are renamed into place.
    pub fn work(&self) -> BorrowedFd<'_> {
        self.work.as_fd()
    }
    /// The workdir given at mount.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
    /// `WORKDIR/index` of an `index=on` stack (see [`crate::index`]).
    pub fn index(&self) -> Option<BorrowedFd<'_>> {
        self.index.as_ref().map(|f| f.as_fd())
    }

    /// [`UpperLayer::index`], shared.
    pub fn index_shared(&self) -> Option<Arc<OwnedFd>> {
        self.index.clone()
    }
}

/// Lower layers, an optional upper layer, and the xattr names in use.
#[derive(Debug)]
pub struct LayerStack {
    lowers: Vec<Layer>,
    upper: Option<UpperLayer>,
    names: XattrNames,
    options: MountOptions,
    fs_count: u8,
    /// Reads the AUFS/OCI whiteouts and fuse-overlayfs's markers too (see [`crate::aufs`]).
    aufs: bool,
    /// Writes whiteouts as `.wh.NAME` files: the upper fs refused a 0/0 `mknod`.
    whiteout_files: bool,
    /// The AUFS marks of lower directories read so far (when `aufs`).
    marks: crate::aufs::MarksCache,
    /// What the frozen layers hold, when the caller knows (see [`crate::presence`]).
    presence: Option<crate::presence::Presence>,
    /// Objects are their own identity: no `overlay.origin` is followed (see
    /// [`LayerStack::use_own_identities`]).
    own_identities: bool,
}

impl LayerStack {
    /// Validates the layers named in `opts` and opens them. With an upper layer (and not `ro`),
    /// prepares `WORKDIR/work` and removes what an earlier, interrupted mount left in it.
    /// Nothing in any layer is changed unless every check passed.
    /// A work dir marked with an incompatible feature of the kernel (`WORKDIR/work/incompat/*`,
    /// which every `volatile` mount leaves) is refused, as the kernel refuses it.
    pub fn open(opts: &MountOptions) -> Result<Self, StackError> {
        Self::open_inner(opts, true)
    }

    /// Opens the stack read-only for an offline check, as [`LayerStack::open`] does, but accepts a
    /// work dir marked with an incompatible feature (the check reports the marker).
    pub fn open_to_check(opts: &MountOptions) -> Result<Self, StackError> {
        let mut opts = opts.clone();
        opts.read_only = true;
        Self::open_inner(&opts, false)
    }

    fn open_inner(opts: &MountOptions, refuse_incompat: bool) -> Result<Self, StackError> {
        if opts.lowerdirs.is_empty() {
            return Err(StackError::NoLower);
        }
        if opts.upperdir.is_some() != opts.workdir.is_some() {
            return Err(StackError::UpperWithoutWork);
        }
        let mut devs: Vec<u64> = Vec::new();
        let mut fs_index = |dev: u64| -> u8 {
            match devs.iter().position(|d| *d == dev) {
                Some(i) => i as u8,
                None => {
                    devs.push(dev);
                    (devs.len() - 1) as u8
                }
            }
        };
        let writable = !opts.read_only && opts.upperdir.is_some();
        let mut upper_parts = None;
        let mut next_id = 0u16;
        if let (Some(u), Some(w)) = (&opts.upperdir, &opts.workdir) {
            let (upath, ufd, ust) = open_dir("upperdir", u)?;
            let (wpath, wfd, wst) = open_dir("workdir", w)?;
            if ust.st_dev != wst.st_dev {
                return Err(StackError::WorkdirOtherFs { work: wpath, upper: upath });
            }
            check_disjoint(("upperdir", &upath), ("workdir", &wpath))?;
            let idx = fs_index(ust.st_dev);
            upper_parts = Some((
                Layer {
                    id: LayerId(0),
                    uuid: sys::fs_uuid(&ufd),
                    path: upath.into(),
                    root: LayerRoot::held(Arc::new(ufd)).map_err(|e| StackError::BadPath {
                        role: "upperdir",
                        path: u.clone(),
                        reason: e.to_string(),
                    })?,
                    dev: ust.st_dev,
                    fs_index: idx,
                },
                wpath,
                wfd,
            ));
            next_id = 1;
        }
        let mut lowers = Vec::new();
        for l in &opts.lowerdirs {
            let (path, fd, st) = open_dir("lowerdir", l)?;
            if let Some((u, w, _)) = &upper_parts {
                check_disjoint(("upperdir", u.path()), ("lowerdir", &path))?;
                check_disjoint(("workdir", w), ("lowerdir", &path))?;
            }
            let idx = fs_index(st.st_dev);
            lowers.push(Layer {
                id: LayerId(next_id),
                uuid: sys::fs_uuid(&fd),
                path: path.into(),
                root: LayerRoot::held(Arc::new(fd)).map_err(|e| StackError::BadPath {
                    role: "lowerdir",
                    path: l.clone(),
                    reason: e.to_string(),
                })?,
                dev: st.st_dev,
                fs_index: idx,
            });
            next_id += 1;
        }
        if let (Some((_, wpath, wfd)), true) = (&upper_parts, refuse_incompat) {
            check_incompat(wfd, wpath)?;
        }
        let mut opts = opts.clone();
        let mut whiteout_files = false;
        let upper = match upper_parts {
            Some((layer, workdir, wfd)) => {
                let work = if writable {
                    prepare_work(&wfd).map_err(|source| StackError::Workdir { path: workdir.clone(), source })?
                } else {
                    rustix::io::dup(&wfd)
                        .map_err(|e| StackError::Workdir { path: workdir.clone(), source: e.into() })?
                };
                if writable {
                    let caps = crate::unprivileged::probe_upper(&work, opts.userxattr)
                        .map_err(|source| StackError::Workdir { path: workdir.clone(), source })?;
                    opts.userxattr |= !caps.trusted_xattrs;
                    whiteout_files = !caps.whiteout_devices;
                }
                let index = match (opts.index, lowers.first()) {
                    (true, Some(l0)) => {
                        crate::index::open_index(&layer, &wfd, l0, &XattrNames::new(opts.userxattr), writable)?
                    }
                    _ => None,
                };
                Some(UpperLayer { layer, workdir, work, index: index.map(Arc::new) })
            }
            None => None,
        };
        if !writable && !opts.userxattr && !crate::unprivileged::may_read_trusted() {
            tracing::warn!(
                "trusted.* xattrs are out of reach (no CAP_SYS_ADMIN in the initial user namespace): reading user.overlay.* as with userxattr"
            );
            opts.userxattr = true;
        }
        let fs_count = lowers.iter().chain(upper.as_ref().map(|u| &u.layer)).map(|l| l.fs_index).max().unwrap_or(0) + 1;
        Ok(Self {
            lowers,
            upper,
            names: XattrNames::new(opts.userxattr),
            options: opts,
            fs_count,
            aufs: true,
            whiteout_files,
            marks: Default::default(),
            presence: None,
            own_identities: false,
        })
    }

    /// Builds a stack from directories the caller already holds open, without the path checks
    /// of [`LayerStack::open`]: layers may nest (the snapshot store lives inside the directory it
    /// snapshots, hidden from every view) and there may be no lower layer at all. `work` is the
    /// open `WORKDIR/work` of the upper layer; it is used as is, not cleaned. Paths are kept only
    /// to name the layers in messages (the options' `lowerdirs` are left empty: at 10,000 view
    /// stacks of a snapshot store a second copy of each path was a tenth of a stack's memory). The roots are shared ([`LayerRoot`]: held, or opened while
    /// used within a pool's budget), so many stacks over the same layers (the snapshot views)
    /// cost no descriptor of their own, and building one opens nothing.
    pub fn from_open_dirs(
        lowers: Vec<(impl Into<Arc<Path>>, LayerRoot)>,
        upper: Option<(PathBuf, LayerRoot, OwnedFd)>,
        mut options: MountOptions,
    ) -> Result<Self, Error> {
        options.lowerdirs = Vec::new();
        options.upperdir = upper.as_ref().map(|(p, _, _)| p.clone());
        options.workdir = options.upperdir.clone();
        let mut devs: Vec<u64> = Vec::new();
        let mut layer = |id: u16, path: Arc<Path>, root: LayerRoot| -> Result<Layer, Error> {
            let dev = root.dev();
            let fs_index = match devs.iter().position(|d| *d == dev) {
                Some(i) => i as u8,
                None => {
                    devs.push(dev);
                    (devs.len() - 1) as u8
                }
            };
            Ok(Layer { id: LayerId(id), uuid: root.uuid(), path, root, dev, fs_index })
        };
        let mut next = 0u16;
        let upper = match upper {
            Some((path, root, work)) => {
                next = 1;
                Some(UpperLayer { layer: layer(0, path.as_path().into(), root)?, workdir: path, work, index: None })
            }
            None => None,
        };
        let mut out = Vec::new();
        for (path, root) in lowers {
            out.push(layer(next, path.into(), root)?);
            next += 1;
        }
        let fs_count = devs.len().max(1) as u8;
        let names = XattrNames::new(options.userxattr);
        Ok(Self {
            lowers: out,
            upper,
            names,
            options,
            fs_count,
            aufs: false,
            whiteout_files: false,
            marks: Default::default(),
            presence: None,
            own_identities: false,
        })
    }

    /// Lets lookups skip layers that surely hold nothing at a path (see [`crate::presence`]).
    pub fn set_presence(&mut self, presence: crate::presence::Presence) {
        self.presence = Some(presence);
    }

    /// Makes every object its own identity (its layer and inode number): lookups follow no
    /// `overlay.origin` (each one an `open_by_handle_at`, and on a cold cache a read of the
    /// origin's inode). For a stack whose user takes no inode number from identities (snapshot
    /// views, which number objects by the layer object that shows them).
    pub fn use_own_identities(&mut self) {
        self.own_identities = true;
    }

    /// Whether objects are their own identity ([`LayerStack::use_own_identities`]).
    pub fn own_identities(&self) -> bool {
        self.own_identities
    }

    /// What the frozen layers hold, if known.
    pub fn presence(&self) -> Option<&crate::presence::Presence> {
        self.presence.as_ref()
    }

    /// The opaque state of lower layer `layer`'s root, as `read` reads it: read once per root
    /// for a layer the stack's presence calls frozen (a view over thousands of snapshot layers
    /// reads each root's marks for every stack it builds, issue 17), every time otherwise.
    pub fn root_opaque_of(
        &self,
        layer: &Layer,
        read: impl FnOnce() -> Result<crate::Opaque, Error>,
    ) -> Result<crate::Opaque, Error> {
        if self.presence.as_ref().is_some_and(|p| p.is_frozen(layer.id())) {
            layer.root.frozen_opaque(read)
        } else {
            read()
        }
    }

    /// The lower layers, top first.
    pub fn lowers(&self) -> &[Layer] {
        &self.lowers
    }
    /// The upper layer, if the stack has one (even on a read-only mount).
    pub fn upper(&self) -> Option<&UpperLayer> {
        self.upper.as_ref()
    }
    /// The upper layer when the mount may write to it.
    pub fn writable_upper(&self) -> Option<&UpperLayer> {
        if self.options.is_read_only() { None } else { self.upper.as_ref() }
    }
    /// The layer with id `id`.
    pub fn layer(&self, id: LayerId) -> &Layer {
        match &self.upper {
            Some(u) if id.0 == 0 => &u.layer,
            Some(_) => &self.lowers[id.0 as usize - 1],
            None => &self.lowers[id.0 as usize],
        }
    }
    /// The xattr names of this mount.
    pub fn names(&self) -> &XattrNames {
        &self.names
    }
    /// The options the stack was opened with.
    pub fn options(&self) -> &MountOptions {
        &self.options
    }
    /// A layer on the filesystem with device `dev`, if any.
    pub fn layer_on_dev(&self, dev: u64) -> Option<&Layer> {
        self.upper.iter().map(|u| &u.layer).chain(self.lowers.iter()).find(|l| l.dev == dev)
    }

    /// The lower layers whose filesystem has UUID `uuid`.
    pub fn lowers_with_uuid(&self, uuid: &[u8; 16]) -> impl Iterator<Item = &Layer> {
        self.lowers.iter().filter(move |l| &l.uuid == uuid)
    }

    /// The AUFS marks of directory `dir` of the lower layer `layer` (see
    /// [`crate::aufs::DirMarks`]), read with one listing the first time; `None` where the layer
    /// has no directory there.
    pub fn lower_marks(&self, layer: &Layer, dir: &Path) -> crate::Result<Option<Arc<crate::aufs::DirMarks>>> {
        self.marks.get(layer.id(), dir, || match sys::read_dir(layer.root()?, dir) {
            Ok(entries) => Ok(Some(entries.into_iter().map(|e| e.name).collect())),
            Err(e)
                if matches!(
                    e.errno(),
                    rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        })
    }

    /// Whether the AUFS/OCI whiteout encoding and fuse-overlayfs's markers are read too (see
    /// [`crate::aufs`]): true for stacks [`LayerStack::open`] makes (ovlfs mounts, which image
    /// layers of containers/storage may feed), false for [`LayerStack::from_open_dirs`] (the
    /// snapshot store, whose layers are plain kernel layers and whose LIVE may hold any name).
    pub fn reads_aufs(&self) -> bool {
        self.aufs
    }

    /// Whether whiteouts are written as `.wh.NAME` files because the upper fs refused a 0/0
    /// `mknod` (see [`crate::unprivileged`]); otherwise they are the kernel's 0/0 devices.
    pub fn writes_whiteout_files(&self) -> bool {
        self.whiteout_files
    }

    /// Writes whiteouts as `.wh.NAME` files from now on, as the upper fs had refused `mknod`
    /// (`OVLFS_DISABLE_OVL_WHITEOUT`, for stores whose tools cannot take device nodes).
    pub fn use_whiteout_files(&mut self) {
        self.whiteout_files = true;
    }

    /// How many distinct filesystems the layers live on.
    pub fn fs_count(&self) -> u8 {
        self.fs_count
    }
}

fn open_dir(role: &'static str, p: &Path) -> Result<(PathBuf, OwnedFd, rustix::fs::Stat), StackError> {
    let bad = |reason: String| StackError::BadPath { role, path: p.to_path_buf(), reason };
    let canon = std::fs::canonicalize(p).map_err(|e| bad(describe(&e)))?;
    let fd = rustix::fs::open(&canon, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| bad(if e == rustix::io::Errno::NOTDIR { "not a directory".into() } else { e.to_string() }))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| bad(e.to_string()))?;
    Ok((canon, fd, st))
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such directory".into(),
        _ => e.to_string(),
    }
}

fn check_disjoint(a: (&'static str, &Path), b: (&'static str, &Path)) -> Result<(), StackError> {
    let why = if a.1 == b.1 {
        "they are the same directory"
    } else if b.1.starts_with(a.1) {
        "the second is inside the first"
    } else if a.1.starts_with(b.1) {
        "the first is inside the second"
    } else {
        return Ok(());
    };
    Err(StackError::Overlap { a: a.0, a_path: a.1.to_path_buf(), b: b.0, b_path: b.1.to_path_buf(), why })
}

/// Refuses a work dir holding the kernel's marker of an incompatible feature: an entry in
/// `WORKDIR/work/incompat/`, such as `volatile`, which every kernel `volatile` mount leaves (also
/// at a clean unmount). The kernel then refuses every mount of the layers, read-only ones too
/// (`EINVAL`, "overlay with incompat feature 'volatile' cannot be mounted"), as writes may have
/// been lost in a crash since; so do we, before anything in the work dir is touched.
fn check_incompat(workdir: &OwnedFd, path: &Path) -> Result<(), StackError> {
    let entries = match sys::read_dir(workdir, Path::new("work/incompat")) {
        Ok(entries) => entries,
        Err(e) if matches!(e.errno(), rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(()),
        Err(source) => return Err(StackError::Workdir { path: path.to_path_buf(), source }),
    };
    match entries.into_iter().map(|e| e.name).min() {
        Some(feature) => Err(StackError::Incompat { workdir: path.to_path_buf(), feature }),
        None => Ok(()),
    }
}

/// Makes sure `WORKDIR/work` exists and is empty, and returns it open.
fn prepare_work(workdir: &OwnedFd) -> Result<OwnedFd, Error> {
    match rustix::fs::mkdirat(workdir, c"work", Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(Error::from(e).context("mkdir work")),
    }
    let work = sys::open_beneath(workdir, Path::new("work"), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let stale = sys::read_dir_fd(rustix::io::dup(&work)?)?;
    for e in stale {
        tracing::info!(name = ?e.name, "removing stale work entry");
        sys::remove_tree_at(&work, &sys::name_cstr(&e.name)?)?;
    }
    Ok(work)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn rejects_bad_stacks() {
        let t = tmp();
        let d = t.path();
        for n in ["l1", "l2", "u", "w"] {
            std::fs::create_dir(d.join(n)).unwrap();
        }
        std::fs::write(d.join("file"), b"").unwrap();
        let p = |s: &str| d.join(s).display().to_string();
        let cases = [
            (format!("lowerdir={}", p("missing")), "no such directory"),
            (format!("lowerdir={}", p("file")), "not a directory"),
            (format!("lowerdir={},upperdir={},workdir={}", p("l1"), p("l1"), p("w")), "same directory"),
            (format!("lowerdir={},upperdir={},workdir={}", p("l1/.."), p("u"), p("w")), "overlap"),
            (format!("lowerdir={},upperdir={},workdir={}", p("l1"), p("u"), p("u")), "same directory"),
            (format!("lowerdir={},upperdir={}", p("l1"), p("u")), "together"),
        ];
        for (opts, want) in cases {
            let o = MountOptions::parse(&opts).unwrap();
            let e = LayerStack::open(&o).unwrap_err().to_string();
            assert!(e.contains(want), "{opts}: {e}");
        }
        assert!(!d.join("w/work").exists(), "a failed open must not touch the workdir");
    }

    #[test]
    fn refuses_the_kernels_volatile_marker_and_leaves_it() {
        let t = tmp();
        let d = t.path();
        for n in ["l1", "u", "w/work/incompat/volatile"] {
            std::fs::create_dir_all(d.join(n)).unwrap();
        }
        std::fs::write(d.join("w/work/incompat/volatile/dirty"), b"").unwrap();
        let opts = |extra: &str| {
            let p = |s: &str| d.join(s).display().to_string();
            MountOptions::parse(&format!("lowerdir={},upperdir={},workdir={}{extra}", p("l1"), p("u"), p("w"))).unwrap()
        };
        for extra in ["", ",ro", ",volatile"] {
            let e = LayerStack::open(&opts(extra)).unwrap_err().to_string();
            assert!(e.contains("volatile") && e.contains("incompat"), "{extra}: {e}");
        }
        assert!(d.join("w/work/incompat/volatile/dirty").exists(), "the marker stays");
        std::fs::remove_dir_all(d.join("w/work/incompat/volatile")).unwrap();
        LayerStack::open(&opts("")).expect("an empty incompat dir is no marker");
    }

    #[test]
    fn cleans_stale_work_entries() {
        let t = tmp();
        let d = t.path();
        for n in ["l1", "u", "w/work/#stale/sub"] {
            std::fs::create_dir_all(d.join(n)).unwrap();
        }
        std::fs::write(d.join("w/work/#stale/sub/f"), b"x").unwrap();
        let o = MountOptions::parse(&format!(
            "lowerdir={},upperdir={},workdir={}",
            d.join("l1").display(),
            d.join("u").display(),
            d.join("w").display()
        ))
        .unwrap();
        let s = LayerStack::open(&o).unwrap();
        assert_eq!(std::fs::read_dir(d.join("w/work")).unwrap().count(), 0);
        assert_eq!(s.layer(LayerId(1)).path(), d.join("l1").canonicalize().unwrap());
        assert_eq!(s.fs_count(), 1);
    }
}
