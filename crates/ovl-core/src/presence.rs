//! What frozen layers hold, known without asking their filesystems: a lookup through a deep
//! stack of sparse layers (each holding, say, what changed in one interval) skips every layer
//! that holds nothing at the path it is about to probe.
//!
//! A [`Summary`] lists every object of one layer (whiteouts and directories included) by its path
//! in the layer, with its type, inode number and whether it carries overlay metadata that changes
//! how a lookup or a listing reads it ([`Object::special`]). A directory that carries none needs
//! no probe below the first layer that shows it, and a frozen layer's listing of it comes from
//! the summary ([`PresenceReader::plain`], [`PresenceReader::listing`]). [`Holders`] maps each path to the layers holding it, by a caller's layer number
//! (e.g. the ids of a store's layers); a stack gets a [`Presence`], which names each of its layers'
//! number (or none: a layer that may change, probed as always). A summary that lists more than its
//! layer holds costs a probe; one that lists less would hide objects, so a summary is made only of
//! a layer nothing writes to any more, and dropped before anything writes to it again.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustix::fs::Stat;

use crate::{LayerId, Result, sys};

/// One object of a summarized layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Its path relative to the layer root.
    pub path: PathBuf,
    /// Its type; a whiteout (a 0/0 character device) is [`Kind::Whiteout`].
    pub kind: Kind,
    /// Its inode number in the layer (`d_ino` of its listing).
    pub ino: u64,
    /// It carries overlay metadata other than `origin`, `impure` and `nlink` (an opaque or
    /// redirect mark, metacopy, an xwhiteout mark, or a name this summary does not know):
    /// lookups and listings read it from its layer.
    pub special: bool,
    /// The bytes it allocates (`st_blocks`).
    pub bytes: u64,
    /// A non-directory with other names (`st_nlink` > 1): its data may stay when this name goes.
    pub linked: bool,
    /// Its attributes when the layer was read (version 4; `None` in older summaries).
    pub meta: Option<Meta>,
}

/// An object's attributes as `lstat` showed them when its frozen layer was summarized: a lookup
/// of a plain object there is answered from them without a disk read (on a cold cache, the
/// inodes and directory blocks of a thousand sparse layers are scattered over the disk: the
/// oldest of 1000 snapshots walked 3x slower than the newest for those reads alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Size in bytes.
    pub size: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// Access, modification and change times: seconds, then nanoseconds.
    pub times: [(i64, u32); 3],
}

impl Meta {
    /// The attributes in `st`.
    pub fn of(st: &Stat) -> Self {
        Self {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            blksize: u32::try_from(st.st_blksize).unwrap_or(u32::MAX),
            size: st.st_size as u64,
            rdev: st.st_rdev,
            times: [
                (st.st_atime, st.st_atime_nsec as u32),
                (st.st_mtime, st.st_mtime_nsec as u32),
                (st.st_ctime, st.st_ctime_nsec as u32),
            ],
        }
    }

    /// A `stat` record of these attributes for inode `ino` on device `dev`, `bytes` allocated.
    pub fn stat(&self, dev: u64, ino: u64, bytes: u64) -> Stat {
        let mut st = sys::blank_stat();
        st.st_dev = dev as _;
        st.st_ino = ino as _;
        st.st_mode = self.mode as _;
        st.st_uid = self.uid as _;
        st.st_gid = self.gid as _;
        st.st_nlink = self.nlink as _;
        st.st_blksize = self.blksize as _;
        st.st_size = self.size as _;
        st.st_rdev = self.rdev as _;
        st.st_blocks = (bytes / 512) as _;
        let [(a, an), (m, mn), (c, cn)] = self.times;
        (st.st_atime, st.st_atime_nsec) = (a as _, an as _);
        (st.st_mtime, st.st_mtime_nsec) = (m as _, mn as _);
        (st.st_ctime, st.st_ctime_nsec) = (c as _, cn as _);
        st
    }

    /// The record's words in a summary file.
    fn encode(&self, out: &mut Vec<u8>) {
        let [(a, an), (m, mn), (c, cn)] = self.times;
        let (mode, uid, gid, nlink, blksize, size, rdev) =
            (self.mode, self.uid, self.gid, self.nlink, self.blksize, self.size, self.rdev);
        out.extend_from_slice(
            format!("{mode} {uid} {gid} {nlink} {blksize} {size} {rdev} {a} {an} {m} {mn} {c} {cn} ").as_bytes(),
        );
    }

    /// The record from the next words of `words`.
    fn decode<'a>(mut word: impl FnMut() -> Option<&'a [u8]>) -> Option<Self> {
        fn parse<T: std::str::FromStr>(w: Option<&[u8]>) -> Option<T> {
            std::str::from_utf8(w?).ok()?.parse().ok()
        }
        let (mode, uid, gid, nlink, blksize) =
            (parse(word())?, parse(word())?, parse(word())?, parse(word())?, parse(word())?);
        let (size, rdev) = (parse(word())?, parse(word())?);
        let mut times = [(0i64, 0u32); 3];
        for t in &mut times {
            *t = (parse(word())?, parse(word())?);
            if t.1 >= 1_000_000_000 {
                return None;
            }
        }
        Some(Self { mode, uid, gid, nlink, blksize, size, rdev, times })
    }
}

/// The type of a summarized object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Directory,
    /// A whiteout.
    Whiteout,
    /// Anything else, by its type.
    Other(rustix::fs::FileType),
}

impl Kind {
    fn code(self) -> u8 {
        use rustix::fs::FileType as T;
        match self {
            Kind::Directory => b'd',
            Kind::Whiteout => b'w',
            Kind::Other(T::RegularFile) => b'r',
            Kind::Other(T::Symlink) => b'l',
            Kind::Other(T::Fifo) => b'p',
            Kind::Other(T::Socket) => b's',
            Kind::Other(T::CharacterDevice) => b'c',
            Kind::Other(T::BlockDevice) => b'b',
            Kind::Other(_) => b'?',
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        use rustix::fs::FileType as T;
        Some(match c {
            b'd' => Kind::Directory,
            b'w' => Kind::Whiteout,
            b'r' => Kind::Other(T::RegularFile),
            b'l' => Kind::Other(T::Symlink),
            b'p' => Kind::Other(T::Fifo),
            b's' => Kind::Other(T::Socket),
            b'c' => Kind::Other(T::CharacterDevice),
            b'b' => Kind::Other(T::BlockDevice),
            _ => return None,
        })
    }

    /// The file type a listing shows (a whiteout is a character device).
    pub fn file_type(self) -> rustix::fs::FileType {
        match self {
            Kind::Directory => rustix::fs::FileType::Directory,
            Kind::Whiteout => rustix::fs::FileType::CharacterDevice,
            Kind::Other(t) => t,
        }
    }
}

/// Whether an object with xattrs `names` carries overlay metadata a lookup or listing must read
/// from the layer (see [`Object::special`]).
fn special(names: &[OsString]) -> bool {
    names.iter().any(|n| {
        let n = n.as_bytes();
        let Some(at) = n.windows(8).position(|w| w == b"overlay.") else { return false };
        !matches!(&n[at + 8..], b"origin" | b"impure" | b"nlink")
    })
}

/// Every object of one layer, and which directory it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The layer root's device and inode number when it was read: a summary is used only for
    /// that directory (a layer replaced by another under its name, as a merge does, is not it).
    pub root: (u64, u64),
    /// Every object, parents before their entries.
    pub objects: Vec<Object>,
    /// The bytes the objects allocate (`st_blocks`, a file of several names once per name).
    pub bytes: u64,
    /// The objects' own bytes and links are known (false for a summary of version 2, which
    /// serves lookups and listings until the layer is read again).
    pub sizes: bool,
}

/// The first words of a summary file, then the root's device and inode, the count of objects and
/// the bytes, one line; the objects follow, each as its type code, `+` if special else `-`, its
/// inode number, its bytes, `1` if linked else `0`, its mode, owner, group, link count, block
/// size, size, device number, and access, modification and change times (seconds, then
/// nanoseconds), each followed by a space, then its path, ended by a NUL byte.
const MAGIC: &str = "ovl-summary 4";

/// Version 3: no attributes per object (`code mark ino bytes linked path`).
const MAGIC_3: &str = "ovl-summary 3";

/// Version 2: no bytes nor links per object (`code mark ino path`).
const MAGIC_2: &str = "ovl-summary 2";

impl Summary {
    /// The bytes of the layer's non-directories that have no other name: what no other tree
    /// shares with the layer's (directories' own blocks left out).
    pub fn own_bytes(&self) -> u64 {
        self.objects.iter().filter(|o| o.kind != Kind::Directory && !o.linked).map(|o| o.bytes).sum()
    }

    /// Reads the whole layer under `root` (no symlink followed, nothing changed).
    pub fn read(root: BorrowedFd<'_>) -> Result<Self> {
        let st = rustix::fs::fstat(root)?;
        let (mut objects, mut bytes) = (Vec::new(), 0u64);
        let mut dirs = vec![PathBuf::new()];
        while let Some(dir) = dirs.pop() {
            let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY;
            let fd = sys::open_beneath(root, &dir, flags, rustix::fs::Mode::empty())?;
            for e in sys::read_dir_fd(rustix::io::dup(&fd)?)? {
                let name = sys::name_cstr(&e.name)?;
                let st = sys::lstat_at(&fd, &name)?;
                bytes += st.st_blocks as u64 * 512;
                let path = dir.join(&e.name);
                let kind = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                    rustix::fs::FileType::Directory => {
                        dirs.push(path.clone());
                        Kind::Directory
                    }
                    _ if crate::is_whiteout_stat(&st) => Kind::Whiteout,
                    t => Kind::Other(t),
                };
                let special = special(&sys::list_xattrs(&fd, Some(&name))?);
                let linked = kind != Kind::Directory && st.st_nlink > 1;
                let bytes = st.st_blocks as u64 * 512;
                objects.push(Object { path, kind, ino: st.st_ino, special, bytes, linked, meta: Some(Meta::of(&st)) });
            }
        }
        Ok(Self { root: (st.st_dev, st.st_ino), objects, bytes, sizes: true })
    }

    /// Whether this summary was read from the directory open as `root`.
    pub fn is_of(&self, root: BorrowedFd<'_>) -> bool {
        rustix::fs::fstat(root).is_ok_and(|st| self.is_of_dir(st.st_dev, st.st_ino))
    }

    /// Whether this is a summary of the directory whose device and inode number are these.
    pub fn is_of_dir(&self, dev: u64, ino: u64) -> bool {
        (dev, ino) == self.root
    }

    /// The summary as the bytes of its file.
    /// (Version 4 when every object's attributes are known, else version 3.)
    pub fn encode(&self) -> Vec<u8> {
        let (root, count, bytes) = (self.root, self.objects.len(), self.bytes);
        let attrs = self.objects.iter().all(|o| o.meta.is_some());
        let magic = if attrs { MAGIC } else { MAGIC_3 };
        let mut out = format!("{magic} {} {} {count} {bytes}\n", root.0, root.1).into_bytes();
        for o in &self.objects {
            out.push(o.kind.code());
            out.push(if o.special { b'+' } else { b'-' });
            out.extend_from_slice(format!("{} {} {} ", o.ino, o.bytes, u8::from(o.linked)).as_bytes());
            if let Some(m) = o.meta.as_ref().filter(|_| attrs) {
                m.encode(&mut out);
            }
            out.extend_from_slice(o.path.as_os_str().as_bytes());
            out.push(0);
        }
        out
    }

    /// A summary from the bytes of its file; `None` for anything else (a truncated or foreign
    /// file, or one of an older version: the caller reads the layer again).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let nl = bytes.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&bytes[..nl]).ok()?;
        let (version, rest) = [(4, MAGIC), (3, MAGIC_3), (2, MAGIC_2)]
            .into_iter()
            .find_map(|(v, magic)| Some((v, head.strip_prefix(magic)?)))?;
        let sizes = version >= 3;
        let mut words = rest.split_ascii_whitespace();
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
        let mut objects = Vec::new();
        for rec in body.split(|b| *b == 0).filter(|p| !p.is_empty()) {
            let (&[code, mark], rest) = rec.split_first_chunk::<2>()?;
            let kind = Kind::from_code(code)?;
            let special = match mark {
                b'+' => true,
                b'-' => false,
                _ => return None,
            };
            let words = match version {
                4 => 17,
                3 => 4,
                _ => 2,
            };
            let mut fields = rest.splitn(words, |b| *b == b' ');
            let mut number = || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
            let (ino, bytes, linked) = if sizes { (number()?, number()?, number()?) } else { (number()?, 0, 0) };
            if linked > 1 {
                return None;
            }
            let meta = if version >= 4 { Some(Meta::decode(|| fields.next())?) } else { None };
            let path = PathBuf::from(OsStr::from_bytes(fields.next()?));
            if path.as_os_str().is_empty()
                || path.is_absolute()
                || path.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return None;
            }
            objects.push(Object { path, kind, ino, special, bytes, linked: linked == 1, meta });
        }
        (objects.len() == count).then_some(Self { root, objects, bytes: used, sizes })
    }
}

/// What many summarized objects share: their type and marks, and the attributes that seldom
/// differ between them. Kept once in [`Shapes`], so that a record holds only what is its own (at
/// 10,000 snapshots the summaries list some 200,000 objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    /// [`Kind::code`].
    code: u8,
    special: bool,
    linked: bool,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    blksize: u32,
    rdev: u64,
}

impl Shape {
    fn kind(&self) -> Kind {
        Kind::from_code(self.code).unwrap_or(Kind::Other(rustix::fs::FileType::Unknown))
    }
}

/// Every [`Shape`] some record uses, each once, counted; a number is reused once unused.
#[derive(Debug, Default)]
struct Shapes {
    ids: HashMap<Shape, u32>,
    all: Vec<(Shape, u32)>,
    free: Vec<u32>,
}

impl Shapes {
    /// The number of `shape`, counting one more use.
    fn take(&mut self, shape: Shape) -> u32 {
        if let Some(&id) = self.ids.get(&shape) {
            self.all[id as usize].1 += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.all[id as usize] = (shape, 1);
                id
            }
            None => {
                self.all.push((shape, 1));
                u32::try_from(self.all.len() - 1).expect("fewer than 2^32 shapes")
            }
        };
        self.ids.insert(shape, id);
        id
    }

    /// One use of number `id` fewer.
    fn give_back(&mut self, id: u32) {
        let Some((shape, uses)) = self.all.get_mut(id as usize) else { return };
        *uses = uses.saturating_sub(1);
        if *uses == 0 {
            self.ids.remove(shape);
            self.free.push(id);
        }
    }

    fn get(&self, id: u32) -> &Shape {
        &self.all[id as usize].0
    }
}

/// The parent of a record at the top of its layer.
const ROOT: u32 = u32::MAX - 1;

/// The parent of a record whose directory its layer does not list (a summary that says less
/// than a layer holds): never part of a listing.
const NO_PARENT: u32 = u32::MAX;

/// One object of a summarized layer, as [`Holders`] keeps it: what is its own (its shape is
/// shared), in 56 bytes. Its sizes and times are kept narrow (blocks of 512 bytes, a size below
/// 4 GiB, access and change times within 68 years of the modification time); an object where
/// one does not fit is marked ([`WIDE`] blocks) and its values kept in its layer's
/// [`Known::wide`].
#[derive(Debug, Clone, Copy)]
struct Rec {
    /// Its path's number in [`Paths`].
    path: u32,
    /// Its directory's path number ([`ROOT`], [`NO_PARENT`]).
    parent: u32,
    /// Its number in [`Shapes`].
    shape: u32,
    /// Access, modification and change times (zero when the summary has no attributes:
    /// [`Known::attrs`] false): nanoseconds.
    nsecs: [u32; 3],
    /// Bytes allocated / 512, or [`WIDE`].
    blocks: u32,
    size: u32,
    /// Access and change time, seconds after the modification time.
    atime_off: i32,
    ctime_off: i32,
    ino: u64,
    mtime: i64,
}

/// [`Rec::blocks`] of a record whose sizes and times are in [`Known::wide`].
const WIDE: u32 = u32::MAX;

/// The sizes and times of a record that does not hold them narrow.
#[derive(Debug, Clone, Copy)]
struct Wide {
    bytes: u64,
    size: u64,
    secs: [i64; 3],
}

impl Rec {
    /// The record of these values: narrow, or marked wide (then they are returned to keep).
    fn new(ids: [u32; 3], ino: u64, bytes: u64, size: u64, times: [(i64, u32); 3]) -> (Self, Option<Wide>) {
        let [(a, an), (m, mn), (c, cn)] = times;
        let [path, parent, shape] = ids;
        let narrow = || -> Option<(u32, u32, i32, i32)> {
            let blocks = u32::try_from(bytes / 512).ok().filter(|b| bytes % 512 == 0 && *b != WIDE)?;
            let off = |t: i64| i32::try_from(t.checked_sub(m)?).ok();
            Some((blocks, u32::try_from(size).ok()?, off(a)?, off(c)?))
        };
        let nsecs = [an, mn, cn];
        match narrow() {
            Some((blocks, size, atime_off, ctime_off)) => {
                (Self { path, parent, shape, nsecs, blocks, size, atime_off, ctime_off, ino, mtime: m }, None)
            }
            None => {
                let rec = Self {
                    path,
                    parent,
                    shape,
                    nsecs,
                    blocks: WIDE,
                    size: 0,
                    atime_off: 0,
                    ctime_off: 0,
                    ino,
                    mtime: m,
                };
                (rec, Some(Wide { bytes, size, secs: [a, m, c] }))
            }
        }
    }
}

/// One layer holding an object at a path: the layer's number, where its record is, and what a
/// lookup asks of it first (kept here so that asking the thousands of layers holding a path near
/// the root reads one array, not each layer's records).
#[derive(Debug, Clone, Copy)]
struct Holder {
    layer: u32,
    /// Index in the layer's [`Known::recs`].
    rec: u32,
    /// [`Kind::code`].
    code: u8,
    special: bool,
}

impl Holder {
    /// What this says a lookup finds.
    fn held(&self) -> Held {
        match Kind::from_code(self.code) {
            _ if self.special => Held::Other,
            Some(Kind::Directory) => Held::PlainDir,
            Some(Kind::Whiteout) => Held::Whiteout,
            _ => Held::Other,
        }
    }

    /// A plain directory (held on the way to nearly every path).
    fn is_plain_dir(&self) -> bool {
        self.code == Kind::Directory.code() && !self.special
    }
}

/// Every path some summary in use lists, each once, with the layers holding it (ascending). A
/// number is reused once no layer holds its path.
#[derive(Debug, Default)]
struct Paths {
    ids: HashMap<Arc<Path>, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

#[derive(Debug, Default)]
struct Slot {
    /// `None` while the number is free.
    path: Option<Arc<Path>>,
    by: Vec<Holder>,
}

impl Paths {
    fn id(&self, path: &Path) -> Option<u32> {
        self.ids.get(path).copied()
    }

    fn holders(&self, path: &Path) -> &[Holder] {
        self.id(path).map_or(&[][..], |id| &self.slots[id as usize].by)
    }

    fn intern(&mut self, path: &Path) -> u32 {
        if let Some(id) = self.id(path) {
            return id;
        }
        let path: Arc<Path> = Arc::from(path);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(Slot::default());
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 - 2 paths")
            }
        };
        self.slots[id as usize].path = Some(path.clone());
        self.ids.insert(path, id);
        id
    }

    /// Layer `layer` no longer holds path number `id`.
    fn drop_holder(&mut self, id: u32, layer: u32) {
        let Some(slot) = self.slots.get_mut(id as usize) else { return };
        if let Ok(i) = slot.by.binary_search_by_key(&layer, |h| h.layer) {
            slot.by.remove(i);
        }
        if slot.by.is_empty() {
            if let Some(path) = slot.path.take() {
                self.ids.remove(&path);
                self.free.push(id);
            }
            slot.by = Vec::new();
        }
    }

    fn path(&self, id: u32) -> Option<&Path> {
        self.slots.get(id as usize)?.path.as_deref()
    }
}

/// One summarized layer: its counts, and its objects by directory.
#[derive(Debug)]
struct Known {
    objects: u64,
    bytes: u64,
    /// [`Summary::own_bytes`].
    own: u64,
    /// Objects' bytes and links known (see [`Summary::sizes`]).
    sizes: bool,
    /// Every object's attributes known (version 4).
    attrs: bool,
    /// The device of the layer's filesystem (for the `stat` records of [`Holding::stat`]).
    dev: u64,
    /// Its objects, by their directory's path number (stable: in each directory, in the order
    /// the summary lists them).
    recs: Box<[Rec]>,
    /// The sizes and times of the records marked [`WIDE`], by record index (rising).
    wide: Box<[(u32, Wide)]>,
}

impl Known {
    /// Record `i`'s sizes and times: bytes allocated, size, access, modification and change
    /// seconds.
    fn values(&self, i: usize) -> (u64, u64, [i64; 3]) {
        let r = &self.recs[i];
        if r.blocks != WIDE {
            let (m, a, c) = (r.mtime, r.mtime + i64::from(r.atime_off), r.mtime + i64::from(r.ctime_off));
            return (u64::from(r.blocks) * 512, u64::from(r.size), [a, m, c]);
        }
        match self.wide.binary_search_by_key(&(i as u32), |(at, _)| *at) {
            Ok(k) => {
                let w = self.wide[k].1;
                (w.bytes, w.size, w.secs)
            }
            Err(_) => (0, 0, [0; 3]),
        }
    }

    /// Record `i`'s bytes allocated.
    fn bytes(&self, i: usize) -> u64 {
        self.values(i).0
    }

    /// Record `i`'s attributes, as a [`Meta`].
    fn meta(&self, i: usize, shape: &Shape) -> Meta {
        let (_, size, s) = self.values(i);
        let n = self.recs[i].nsecs;
        let Shape { mode, uid, gid, nlink, blksize, rdev, .. } = *shape;
        let times = [(s[0], n[0]), (s[1], n[1]), (s[2], n[2])];
        Meta { mode, uid, gid, nlink, blksize, size, rdev, times }
    }

    /// The records of the entries of directory number `dir`.
    fn entries(&self, dir: u32) -> &[Rec] {
        let from = self.recs.partition_point(|r| r.parent < dir);
        let to = from + self.recs[from..].partition_point(|r| r.parent == dir);
        &self.recs[from..to]
    }
}

/// For each path, the summarized layers holding an object there (by the caller's numbers, e.g.
/// the ids of a store's layers), and what each holds.
#[derive(Debug, Default)]
pub struct Holders {
    paths: Paths,
    shapes: Shapes,
    /// By layer number (small, dense: a store's ids), the summarized layers: looked at for every
    /// layer of every lookup, so an index, not a hash.
    summarized: Vec<Option<Known>>,
    /// The same as one bit per number (set: summary in use): [`Holders::knows`] is asked for
    /// every layer of a lookup, and a few kilobytes of bits stay in the cache where thousands of
    /// `Known`s do not.
    known_bits: Vec<u64>,
    /// [`Holders::freed_by`] answers, by (layer, older layer): dropped when either changes.
    freed: parking_lot::Mutex<HashMap<(u64, Option<u64>), u64>>,
    /// Counts the changes of which layers have a summary in use (see [`Presence`]'s cache).
    epoch: u64,
}

impl Holders {
    /// Adds layer `layer`'s summary (replacing what was known of it: see [`Holders::forget`]).
    pub fn add(&mut self, layer: u64, summary: &Summary) {
        self.forget(layer);
        self.freed.get_mut().retain(|(a, b), _| *a != layer && *b != Some(layer));
        let Some(number) = u32::try_from(layer).ok().filter(|n| *n < u32::MAX) else {
            // Not a number this index is for: the layer is probed like any other.
            return;
        };
        // Numbers stay below the parent marks ([`ROOT`], [`NO_PARENT`]); a summary that would
        // need more (billions of objects) is not used: the layer is probed like any other.
        let room = |used: usize| used.saturating_add(summary.objects.len()) < ROOT as usize;
        if !room(self.paths.slots.len()) || !room(self.shapes.all.len()) {
            return;
        }
        let ids: Vec<u32> = summary.objects.iter().map(|o| self.paths.intern(&o.path)).collect();
        let listed: std::collections::HashSet<u32> = ids.iter().copied().collect();
        let parent_of = |path: &Path| match path.parent() {
            Some(p) if p.as_os_str().is_empty() => ROOT,
            Some(p) => self.paths.id(p).filter(|id| listed.contains(id)).unwrap_or(NO_PARENT),
            None => NO_PARENT,
        };
        let parents: Vec<u32> = summary.objects.iter().map(|o| parent_of(&o.path)).collect();
        let mut recs: Vec<(Rec, Option<Wide>)> = Vec::with_capacity(summary.objects.len());
        for ((o, &path), parent) in summary.objects.iter().zip(&ids).zip(parents) {
            let m = o.meta.unwrap_or_default();
            let (code, special, linked) = (o.kind.code(), o.special, o.linked);
            let (mode, uid, gid, nlink, blksize, rdev) = (m.mode, m.uid, m.gid, m.nlink, m.blksize, m.rdev);
            let shape = self.shapes.take(Shape { code, special, linked, mode, uid, gid, nlink, blksize, rdev });
            recs.push(Rec::new([path, parent, shape], o.ino, o.bytes, m.size, m.times));
        }
        recs.sort_by_key(|(r, _)| r.parent);
        let wide = recs.iter().enumerate().filter_map(|(i, (_, w))| Some((i as u32, (*w)?))).collect();
        let recs: Vec<Rec> = recs.into_iter().map(|(r, _)| r).collect();
        for (i, r) in recs.iter().enumerate() {
            let Shape { code, special, .. } = *self.shapes.get(r.shape);
            let holder = Holder { layer: number, rec: i as u32, code, special };
            let by = &mut self.paths.slots[r.path as usize].by;
            match by.binary_search_by_key(&number, |h| h.layer) {
                // (A summary naming a path twice: the last one counts.)
                Ok(at) => by[at] = holder,
                Err(at) => by.insert(at, holder),
            }
        }
        let at = number as usize;
        if at >= self.summarized.len() {
            self.summarized.resize_with(at + 1, || None);
        }
        if at / 64 >= self.known_bits.len() {
            self.known_bits.resize(at / 64 + 1, 0);
        }
        self.known_bits[at / 64] |= 1 << (at % 64);
        self.epoch += 1;
        self.summarized[at] = Some(Known {
            objects: summary.objects.len() as u64,
            bytes: summary.bytes,
            own: summary.own_bytes(),
            sizes: summary.sizes,
            attrs: summary.objects.iter().all(|o| o.meta.is_some()),
            dev: summary.root.0,
            recs: recs.into_boxed_slice(),
            wide,
        });
    }

    /// Stops using layer `layer`'s summary: it is probed again like any layer.
    pub fn forget(&mut self, layer: u64) {
        self.freed.get_mut().retain(|(a, b), _| *a != layer && *b != Some(layer));
        let Some(known) = usize::try_from(layer).ok().and_then(|at| self.summarized.get_mut(at)).and_then(Option::take)
        else {
            return;
        };
        let at = layer as usize;
        self.known_bits[at / 64] &= !(1 << (at % 64));
        self.epoch += 1;
        for r in &known.recs {
            self.paths.drop_holder(r.path, layer as u32);
            self.shapes.give_back(r.shape);
        }
    }

    /// Whether `layer` has a summary in use.
    pub fn knows(&self, layer: u64) -> bool {
        usize::try_from(layer)
            .ok()
            .and_then(|at| self.known_bits.get(at / 64))
            .is_some_and(|w| w >> (layer % 64) & 1 == 1)
    }

    /// Whether `layer` has a summary in use that knows its objects' bytes and links (one of
    /// version 2 does not: the layer is to be read again).
    pub fn knows_sizes(&self, layer: u64) -> bool {
        self.known(layer).is_some_and(|k| k.sizes)
    }

    /// Whether `layer` has a summary in use of the current version, which also knows each
    /// object's attributes (an older one serves lookups and listings; the layer is to be read
    /// again for what it lacks).
    pub fn knows_all(&self, layer: u64) -> bool {
        self.known(layer).is_some_and(|k| k.sizes && k.attrs)
    }

    fn known(&self, layer: u64) -> Option<&Known> {
        usize::try_from(layer).ok().and_then(|at| self.summarized.get(at)).and_then(Option::as_ref)
    }

    /// The objects and bytes of layer `layer`, from its summary.
    pub fn usage(&self, layer: u64) -> Option<(u64, u64)> {
        self.known(layer).map(|k| (k.objects, k.bytes))
    }

    /// Summarized layer `layer`'s [`Summary::own_bytes`], if its summary has sizes.
    pub fn own_bytes(&self, layer: u64) -> Option<u64> {
        self.known(layer).filter(|k| k.sizes).map(|k| k.own)
    }

    /// The bytes deleting summarized layer `layer`'s snapshot would free (what `zfs list` calls a
    /// snapshot's `used`), when `older` is the next older snapshot's layer (`None`: it is the
    /// oldest). The oldest just loses its layer: every object that has no other name. Another
    /// one's layer is merged into the older one, which keeps what its own view shows from it: what
    /// goes are its non-directories with no other name that the older layer hides (an object at
    /// the same path, or a non-directory, whiteout, opaque or redirected directory on the way).
    /// Directories' own blocks are left out. `None` while either layer has no summary in use.
    pub fn freed_by(&self, layer: u64, older: Option<u64>) -> Option<u64> {
        if let Some(n) = self.freed.lock().get(&(layer, older)) {
            return Some(*n);
        }
        let known = self.known(layer).filter(|k| k.sizes)?;
        let mut objects = Vec::with_capacity(known.recs.len());
        for (i, r) in known.recs.iter().enumerate() {
            let shape = self.shapes.get(r.shape);
            objects.push((self.paths.path(r.path)?, shape.kind(), known.bytes(i), shape.linked));
        }
        let n = self.freed_from(objects.into_iter(), older)?;
        self.freed.lock().insert((layer, older), n);
        Some(n)
    }

    /// [`Holders::freed_by`] for a layer read just now (the newest, which has no summary in use).
    pub fn freed_by_summary(&self, summary: &Summary, older: Option<u64>) -> Option<u64> {
        self.freed_from(summary.objects.iter().map(|o| (o.path.as_path(), o.kind, o.bytes, o.linked)), older)
    }

    fn freed_from<'p>(
        &self,
        objects: impl Iterator<Item = (&'p Path, Kind, u64, bool)>,
        older: Option<u64>,
    ) -> Option<u64> {
        let Some(older) = older else {
            return Some(objects.filter(|o| !o.3).map(|o| o.2).sum());
        };
        // (Which paths it holds is enough: its own sizes do not count.)
        if !self.knows(older) {
            return None;
        }
        let hides = |path: &Path| {
            // An object at the path itself hides it; on the way, only a non-directory or a
            // special directory (opaque, redirected) does.
            self.holder(older, path).is_some()
                || path
                    .ancestors()
                    .skip(1)
                    .filter(|a| !a.as_os_str().is_empty())
                    .any(|a| self.holder(older, a).is_some_and(|h| !h.is_plain_dir()))
        };
        Some(objects.filter(|o| o.1 != Kind::Directory && !o.3 && hides(o.0)).map(|o| o.2).sum())
    }

    /// Where summarized layer `layer` holds something at `path`, if it does.
    fn holder(&self, layer: u64, path: &Path) -> Option<Holder> {
        let layer = u32::try_from(layer).ok()?;
        let by = self.paths.holders(path);
        by.binary_search_by_key(&layer, |h| h.layer).ok().map(|i| by[i])
    }

    /// The record `holder` points to.
    fn rec(&self, holder: &Holder) -> Option<&Rec> {
        self.known(holder.layer.into())?.recs.get(holder.rec as usize)
    }
}

/// A stack's view of [`Holders`]: the caller's number of each of its layers.
#[derive(Debug, Clone)]
pub struct Presence {
    holders: Arc<RwLock<Holders>>,
    /// By `LayerId`: the layer's number in `holders`, `None` for a layer never summarized.
    numbers: Vec<Option<u64>>,
    /// The other way round: the `LayerId` of each number.
    ids: HashMap<u64, u16>,
    /// The numbers rise with the `LayerId`s (as in a store's stacks, oldest snapshot on top):
    /// then the next layer holding a path is the next number holding it ([`Holding::skip`]).
    rising: bool,
    /// The layers without a summary in use, in rising `LayerId`, as of the holders' epoch.
    /// (Shared by clones: they have the same layers.)
    unknown: Arc<RwLock<(u64, Arc<Vec<u16>>)>>,
}

impl Presence {
    /// Whether layer `layer` of the stack is a frozen one (has a number).
    pub fn is_frozen(&self, layer: crate::LayerId) -> bool {
        self.numbers.get(layer.0 as usize).copied().flatten().is_some()
    }

    /// Layer `LayerId(i)` of the stack is `numbers[i]` in `holders`.
    pub fn new(holders: Arc<RwLock<Holders>>, numbers: Vec<Option<u64>>) -> Self {
        let ids = numbers.iter().enumerate().filter_map(|(i, n)| Some(((*n)?, u16::try_from(i).ok()?))).collect();
        let known: Vec<u64> = numbers.iter().flatten().copied().collect();
        let rising = known.windows(2).all(|w| w[0] < w[1]);
        Self { holders, numbers, ids, rising, unknown: Arc::new(RwLock::new((u64::MAX, Arc::default()))) }
    }

    /// A reader for one lookup (holds the shared lock until dropped).
    pub fn reader(&self) -> PresenceReader<'_> {
        let holders = self.holders.read();
        let unknown = {
            let cached = self.unknown.read();
            if cached.0 == holders.epoch {
                cached.1.clone()
            } else {
                drop(cached);
                let known = |n: &Option<u64>| n.is_some_and(|n| holders.knows(n));
                let list: Vec<u16> =
                    (0..self.numbers.len()).filter(|&k| !known(&self.numbers[k])).map(|k| k as u16).collect();
                let list = Arc::new(list);
                *self.unknown.write() = (holders.epoch, list.clone());
                list
            }
        };
        PresenceReader { holders, numbers: &self.numbers, ids: &self.ids, rising: self.rising, unknown }
    }
}

/// What a summary says is at a path of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The layer has no summary in use: probe it.
    Unknown,
    /// Nothing.
    Nothing,
    /// A directory without overlay metadata that changes lookups (see [`Object::special`]).
    PlainDir,
    /// A whiteout without such metadata.
    Whiteout,
    /// Something else (a non-directory, or anything special): probe it.
    Other,
}

/// [`Presence`] for one lookup or listing.
pub struct PresenceReader<'a> {
    holders: parking_lot::RwLockReadGuard<'a, Holders>,
    numbers: &'a [Option<u64>],
    ids: &'a HashMap<u64, u16>,
    rising: bool,
    /// [`Presence::unknown`].
    unknown: Arc<Vec<u16>>,
}

impl PresenceReader<'_> {
    /// The number of layer `layer` in the holders, if its summary is in use.
    fn number(&self, layer: LayerId) -> Option<u64> {
        self.numbers.get(layer.0 as usize).copied().flatten().filter(|n| self.holders.knows(*n))
    }

    /// False only when layer `layer` surely holds nothing at `path`.
    pub fn may_hold(&mut self, layer: LayerId, path: &Path) -> bool {
        self.held(layer, path) != Held::Nothing
    }

    /// What layer `layer` holds at `path`, as far as its summary tells.
    pub fn held(&self, layer: LayerId, path: &Path) -> Held {
        self.holding(path).held(layer)
    }

    /// The summarized layers holding something at `path`: for asking about many layers at one
    /// path (a lookup in a directory that many layers hold), the path looked up once, not once
    /// per layer (at N = 10,000 layers that hashing was a tenth of a delete's CPU).
    pub fn holding<'r>(&'r self, path: &Path) -> Holding<'r> {
        let at = self.holders.paths.holders(path);
        Holding { reader: self, at, cursor: std::cell::Cell::new(0) }
    }

    /// The layers among the top `upto` of the stack that may do more to `path` than pass it
    /// through unchanged, top first: those without a summary in use, and those holding anything
    /// but a plain directory at `path` or at one of its ancestors (a file or whiteout there ends
    /// it, an opaque mark or a redirect rewrites it). Every other one of them holds nothing or
    /// plain directories on its way.
    pub fn may_rewrite(&self, upto: u16, path: &Path) -> Vec<LayerId> {
        let mut out: Vec<u16> = (0..upto).filter(|k| self.number(LayerId(*k)).is_none()).collect();
        for p in path.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            for h in self.holders.paths.holders(p) {
                // (Plain dirs first: near the root nearly every layer holds one.)
                if h.is_plain_dir() {
                    continue;
                }
                match self.ids.get(&u64::from(h.layer)) {
                    Some(&k) if k < upto && self.holders.knows(h.layer.into()) => out.push(k),
                    _ => {}
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out.into_iter().map(LayerId).collect()
    }

    /// The entries of directory `dir` of layer `layer` (name, type, inode number; whiteouts as
    /// [`Kind::Whiteout`]), when its summary is in use and neither the directory nor any entry
    /// is special; `None`: read the directory from the layer.
    pub fn listing(&self, layer: LayerId, dir: &Path) -> Option<Vec<(OsString, Kind, u64)>> {
        let number = self.number(layer)?;
        if !dir.as_os_str().is_empty() && self.held(layer, dir) != Held::PlainDir {
            return None;
        }
        let known = self.holders.known(number)?;
        let id = if dir.as_os_str().is_empty() { ROOT } else { self.holders.paths.id(dir)? };
        let entries = known.entries(id);
        let mut out = Vec::with_capacity(entries.len());
        for r in entries {
            let shape = self.holders.shapes.get(r.shape);
            if shape.special {
                return None;
            }
            let name = self.holders.paths.path(r.path)?.file_name()?;
            out.push((name.to_os_string(), shape.kind(), r.ino));
        }
        Some(out)
    }
}

/// The summarized layers holding something at one path ([`PresenceReader::holding`]).
pub struct Holding<'r> {
    reader: &'r PresenceReader<'r>,
    /// By layer number, ascending.
    at: &'r [Holder],
    /// Where the last question's number was (or would be) in `at`: a lookup asks about its
    /// layers in rising number, so each answer is a step or two from the last one, not a
    /// search (the root of a view of 10,000 layers is held by each of them).
    cursor: std::cell::Cell<usize>,
}

impl Holding<'_> {
    /// What layer `layer` holds at the path, as far as its summary tells. Cheapest asked in
    /// rising layer number.
    pub fn held(&self, layer: LayerId) -> Held {
        let Some(number) = self.reader.number(layer) else { return Held::Unknown };
        let at = self.at;
        let mut c = self.cursor.get();
        if c > 0 && at.get(c - 1).is_some_and(|h| u64::from(h.layer) >= number) {
            // Asked out of order: searched.
            c = at.partition_point(|h| u64::from(h.layer) < number);
        } else {
            while at.get(c).is_some_and(|h| u64::from(h.layer) < number) {
                c += 1;
            }
        }
        self.cursor.set(c);
        at.get(c).filter(|h| u64::from(h.layer) == number).map_or(Held::Nothing, Holder::held)
    }

    /// After layer `after` was found to hold nothing at the path: how many of the layers that
    /// follow it (`next`, in rising `LayerId`) surely hold nothing there either, without asking
    /// each ([`Holding::held`] per layer was a tenth of a diff at N = 10,000): those before the
    /// next layer the summaries say holds the path, while each has its summary in use and `same`
    /// says the caller looks at the same path in it. 0 unless the numbers rise with the ids.
    ///
    /// `dense`: the caller vouches that `next` are the layers right after `after`, one by one
    /// (a root's lower dirs), all at the same path: then counted without a step per layer.
    pub fn skip(
        &self,
        after: LayerId,
        next: impl ExactSizeIterator<Item = LayerId>,
        same: impl Fn(usize) -> bool,
        dense: bool,
    ) -> usize {
        let reader = self.reader;
        let Some(number) = reader.number(after).filter(|_| reader.rising) else { return 0 };
        let c = self.at.partition_point(|h| u64::from(h.layer) <= number);
        let stop = match self.at.get(c) {
            Some(holder) => match reader.ids.get(&u64::from(holder.layer)) {
                Some(&k) => LayerId(k),
                None => return 0,
            },
            None => LayerId(u16::MAX),
        };
        if dense {
            let from = after.0 as usize + 1;
            let u = reader.unknown.partition_point(|&k| (k as usize) < from);
            let first_unknown = reader.unknown.get(u).map_or(usize::MAX, |&k| k as usize);
            return next.len().min(first_unknown - from).min((stop.0 as usize).saturating_sub(from));
        }
        let mut n = 0;
        for layer in next {
            if layer >= stop || reader.number(layer).is_none() || !same(n) {
                break;
            }
            n += 1;
        }
        n
    }

    /// The attributes of what layer `layer` holds at the path, as its summary recorded them:
    /// only for an object a lookup may take from the summary alone, a plain one (not special)
    /// that shares its inode with no other name (a link elsewhere may change it since).
    pub fn stat(&self, layer: LayerId) -> Option<Stat> {
        let number = self.reader.number(layer)?;
        let at = self.at;
        let c = at.partition_point(|h| u64::from(h.layer) < number);
        let holder = at.get(c).filter(|h| u64::from(h.layer) == number)?;
        let known = self.reader.holders.known(number)?;
        let r = self.reader.holders.rec(holder)?;
        let shape = self.reader.holders.shapes.get(r.shape);
        if !known.attrs || shape.special || shape.linked || shape.kind() == Kind::Whiteout {
            return None;
        }
        let i = holder.rec as usize;
        Some(known.meta(i, shape).stat(known.dev, r.ino, known.bytes(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 1000,
            gid: 100,
            nlink: 1,
            blksize: 4096,
            size: 12,
            rdev: 0,
            times: [(-5, 1), (1_700_000_000, 999_999_999), (1_700_000_001, 0)],
        }
    }

    fn obj(path: &str, kind: Kind, special: bool) -> Object {
        let mode = match kind {
            Kind::Directory => 0o40755,
            Kind::Whiteout => 0o20000,
            Kind::Other(_) => 0o100644,
        };
        let meta = Some(meta(mode));
        Object { path: path.into(), kind, ino: path.len() as u64, special, bytes: 4096, linked: false, meta }
    }

    fn summary(objects: Vec<Object>) -> Summary {
        Summary { root: (0, 0), objects, bytes: 0, sizes: true }
    }

    #[test]
    fn summaries_round_trip_and_refuse_what_is_not_one() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let s = Summary {
            root: (7, 42),
            objects: vec![
                obj("a", Kind::Directory, true),
                obj("a/b c", reg, false),
                obj("a/\nx", Kind::Whiteout, false),
            ],
            bytes: 8192,
            sizes: true,
        };
        assert_eq!(Summary::decode(&s.encode()), Some(s.clone()));
        let bytes = s.encode();
        assert_eq!(Summary::decode(&bytes[..bytes.len() - 1]), None, "cut short in a path");
        let cut =
            bytes.len() - "w-4 4096 0 8192 1000 100 1 4096 12 0 -5 1 1700000000 999999999 1700000001 0 a/\nx".len() - 1;
        assert_eq!((bytes[cut - 1], bytes[cut]), (0, b'w'), "the last record starts there");
        assert_eq!(Summary::decode(&bytes[..cut]), None, "cut short after a path");
        let three = Summary::decode(b"ovl-summary 3 1 2 1 0\nr-1 512 0 a b\0").expect("version 3 is read");
        assert_eq!((three.sizes, three.objects[0].bytes, three.objects[0].meta), (true, 512, None));
        assert_eq!(
            Summary::decode(b"ovl-summary 3 1 2 1 0\nr-1 512 0 a b\0").map(|s| s.encode()),
            Some(b"ovl-summary 3 1 2 1 0\nr-1 512 0 a b\0".to_vec()),
            "a summary without attributes is written as version 3"
        );
        let four = |m: &str| Summary::decode(format!("ovl-summary 4 1 2 1 0\nr-1 0 0 {m} f\0").as_bytes());
        let m = four("33188 0 0 1 4096 3 0 1 2 3 4 5 6").expect("version 4 is read").objects[0].meta;
        assert_eq!(m.map(|m| (m.mode, m.size, m.times)), Some((0o100644, 3, [(1, 2), (3, 4), (5, 6)])));
        assert_eq!(four("33188 0 0 1 4096 3 0 1 2 3 4 5 1000000000"), None, "nanoseconds past a second");
        assert_eq!(four("33188 0 0 1 4096 3 0 1 2 3 4 5"), None, "a time missing");
        assert_eq!(four("33188 0 0 -1 4096 3 0 1 2 3 4 5 6"), None, "a negative link count");
        assert_eq!(Summary::decode(b"ovl-summary 1 1 2 1 0\na\0"), None, "an older version");
        let old = Summary::decode(b"ovl-summary 2 1 2 1 4096\nd-1 a b\0").expect("version 2 is read");
        assert_eq!(
            (old.sizes, old.bytes, &old.objects[0].path, old.objects[0].ino),
            (false, 4096, &PathBuf::from("a b"), 1)
        );
        assert_eq!(Summary::decode(b"ovl-summary 2 1 2 1 0\nd-x a\0"), None, "version 2, no number");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd-1 0 0 /etc\0"), None, "absolute");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd-1 0 0 a/../b\0"), None, "dot-dot");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nq-1 0 0 a\0"), None, "unknown type");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd*1 0 0 a\0"), None, "unknown mark");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd-x 0 0 a\0"), None, "no number");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd-1 0 2 a\0"), None, "links neither 0 nor 1");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 1 0\nd-1 0 a\0"), None, "a field missing");
        assert_eq!(Summary::decode(b"ovl-summary 3 1 2 0\n"), None, "no bytes");
        assert_eq!(
            Summary::decode(b"ovl-summary 3 1 2 0 0\n"),
            Some(Summary { root: (1, 2), objects: vec![], bytes: 0, sizes: true })
        );
    }

    #[test]
    fn deleting_frees_what_the_older_layer_hides_or_all_of_the_oldest() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let file = |p: &str, bytes: u64, linked: bool| Object { bytes, linked, ..obj(p, reg, false) };
        let mut h = Holders::default();
        // The older layer (1): a file `f`, a whiteout `w`, a plain dir `d`, an opaque dir `o`, a
        // file `x` where the newer layer has a dir.
        h.add(
            1,
            &summary(vec![
                file("f", 100, false),
                obj("w", Kind::Whiteout, false),
                obj("d", Kind::Directory, false),
                obj("o", Kind::Directory, true),
                file("x", 1, false),
            ]),
        );
        // The newer layer (2).
        let newer = summary(vec![
            file("f", 1000, false),           // hidden by 1's f: freed
            file("w", 2000, false),           // hidden by 1's whiteout: freed
            obj("d", Kind::Directory, false), // merged, not counted
            file("d/a", 4000, false),         // 1's plain dir passes it through: kept
            obj("o", Kind::Directory, false),
            file("o/b", 8000, false), // under 1's opaque dir: freed
            obj("x", Kind::Directory, false),
            file("x/c", 16000, false), // under 1's file: freed
            file("g", 32000, false),   // nothing in 1: kept
            file("h", 64000, true),    // hidden? no; and linked: kept anyway
        ]);
        assert_eq!(h.freed_by_summary(&newer, Some(1)), Some(1000 + 2000 + 8000 + 16000));
        h.add(2, &newer);
        assert_eq!(h.freed_by(2, Some(1)), Some(27000));
        assert_eq!(h.freed_by(2, None), Some(1000 + 2000 + 4096 * 3 + 4000 + 8000 + 16000 + 32000), "the oldest");
        assert_eq!(h.freed_by(2, Some(9)), None, "an older layer without a summary");
        // A summary of version 2 serves lookups but says nothing of what a delete frees.
        h.add(3, &Summary { sizes: false, ..summary(vec![file("f", 0, false)]) });
        assert!(h.knows(3) && !h.knows_sizes(3));
        assert_eq!(h.freed_by(3, Some(2)), None);
        assert_eq!(h.freed_by(2, Some(3)), Some(1000), "an older one of version 2 still tells what it hides");
        // The older layer replaced (a merge): the answer follows.
        h.add(1, &summary(vec![file("g", 5, false)]));
        assert_eq!(h.freed_by(2, Some(1)), Some(32000));
    }

    #[test]
    fn only_known_layers_are_skipped() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let holders = Arc::new(RwLock::new(Holders::default()));
        holders.write().add(5, &summary(vec![obj("d", Kind::Directory, false), obj("d/f", reg, false)]));
        holders.write().add(9, &summary(vec![obj("e", Kind::Directory, true)]));
        let p = Presence::new(holders.clone(), vec![Some(9), Some(5), Some(3), None]);
        let mut r = p.reader();
        assert!(r.may_hold(LayerId(1), Path::new("d/f")));
        assert!(!r.may_hold(LayerId(0), Path::new("d/f")), "layer 9 has no d/f");
        assert!(r.may_hold(LayerId(2), Path::new("d/f")), "layer 3 has no summary");
        assert!(r.may_hold(LayerId(3), Path::new("zzz")), "a layer without a number");
        assert!(r.may_hold(LayerId(8), Path::new("zzz")), "a layer beyond the list");
        assert_eq!(r.held(LayerId(1), Path::new("d")), Held::PlainDir);
        assert_eq!(r.held(LayerId(0), Path::new("e")), Held::Other, "a special dir is probed");
        drop(r);
        holders.write().forget(9);
        assert!(p.reader().may_hold(LayerId(0), Path::new("d/f")), "a forgotten summary");
        holders.write().add(u64::MAX, &summary(vec![]));
        assert!(!holders.read().knows(u64::MAX), "a number too large to index is never trusted");
    }

    #[test]
    fn attributes_come_from_the_summary_only_for_plain_unlinked_objects() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let holders = Arc::new(RwLock::new(Holders::default()));
        let linked = Object { linked: true, ..obj("d/l", reg, false) };
        let objects = vec![
            obj("d", Kind::Directory, false),
            obj("d/f", reg, false),
            obj("d/s", reg, true),
            obj("d/w", Kind::Whiteout, false),
            linked,
        ];
        holders.write().add(5, &Summary { root: (77, 2), ..summary(objects) });
        let three = Object { meta: None, ..obj("d/f", reg, false) };
        holders.write().add(6, &summary(vec![obj("d", Kind::Directory, false), three]));
        let p = Presence::new(holders.clone(), vec![Some(5), Some(6), None]);
        let r = p.reader();
        let st = r.holding(Path::new("d/f")).stat(LayerId(0)).expect("a plain file");
        assert_eq!((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid), (77, 3, 0o100644, 1000, 100));
        assert_eq!((st.st_size, st.st_blocks, st.st_nlink, st.st_blksize), (12, 8, 1, 4096));
        assert_eq!((st.st_atime, st.st_atime_nsec, st.st_mtime_nsec, st.st_ctime), (-5, 1, 999_999_999, 1_700_000_001));
        assert!(r.holding(Path::new("d")).stat(LayerId(0)).is_some(), "a plain dir");
        for (path, why) in [("d/s", "special"), ("d/w", "a whiteout"), ("d/l", "linked"), ("d/x", "absent")] {
            assert!(r.holding(Path::new(path)).stat(LayerId(0)).is_none(), "{why}");
        }
        assert!(r.holding(Path::new("d/f")).stat(LayerId(1)).is_none(), "a summary without attributes");
        assert!(r.holding(Path::new("d/f")).stat(LayerId(2)).is_none(), "a layer without one");
        drop(r);
        assert!(holders.read().knows_all(5) && !holders.read().knows_all(6));
    }

    #[test]
    fn a_holding_answers_the_same_in_any_order_of_questions() {
        let holders = Arc::new(RwLock::new(Holders::default()));
        // Layer n holds a plain dir at `p` if n % 3 == 0, a whiteout if n % 5 == 0 (not both).
        let want = |n: u64| match (n % 3, n % 5) {
            (0, _) => Held::PlainDir,
            (_, 0) => Held::Whiteout,
            _ => Held::Nothing,
        };
        for n in 1..=60u64 {
            let objects = match want(n) {
                Held::PlainDir => vec![obj("p", Kind::Directory, false)],
                Held::Whiteout => vec![obj("p", Kind::Whiteout, false)],
                _ => vec![obj("q", Kind::Directory, false)],
            };
            holders.write().add(n, &summary(objects));
        }
        // LayerId(i) is layer i + 1; the last layer has no number.
        let p = Presence::new(holders, (1..=60).map(Some).chain([None]).collect());
        let r = p.reader();
        let ascending: Vec<u16> = (0..61).collect();
        let descending: Vec<u16> = (0..61).rev().collect();
        let mixed: Vec<u16> = (0..61).map(|i| (i * 37) % 61).collect();
        for order in [ascending, descending, mixed] {
            let h = r.holding(Path::new("p"));
            for &i in &order {
                let expect = if i == 60 { Held::Unknown } else { want(u64::from(i) + 1) };
                assert_eq!(h.held(LayerId(i)), expect, "layer {i} in order {order:?}");
            }
        }
    }

    #[test]
    fn a_skip_passes_over_exactly_the_layers_that_surely_hold_nothing() {
        let holders = Arc::new(RwLock::new(Holders::default()));
        // Layers 1..=40 summarized but 17 and 29 (never added); `p` held by 8, 9, 23 and 40.
        for n in (1..=40u64).filter(|n| ![17, 29].contains(n)) {
            let path = if [8, 9, 23, 40].contains(&n) { "p" } else { "q" };
            holders.write().add(n, &summary(vec![obj(path, Kind::Directory, false)]));
        }
        // LayerId(i) is layer i + 1, then one without a number.
        let numbers: Vec<Option<u64>> = (1..=40).map(Some).chain([None]).collect();
        let p = Presence::new(holders.clone(), numbers.clone());
        // What a step per layer would pass over after layer `after`: layers holding nothing and
        // summarized, up to the first that is not.
        let stepped = |after: u16| {
            let r = p.reader();
            let h = r.holding(Path::new("p"));
            (after + 1..41).take_while(|&k| h.held(LayerId(k)) == Held::Nothing).count()
        };
        for after in (0..40u16).filter(|&a| p.reader().holding(Path::new("p")).held(LayerId(a)) == Held::Nothing) {
            let r = p.reader();
            let h = r.holding(Path::new("p"));
            let next = (after + 1..41).map(LayerId);
            assert_eq!(h.skip(LayerId(after), next.clone(), |_| true, false), stepped(after), "stepping after {after}");
            assert_eq!(h.skip(LayerId(after), next, |_| true, true), stepped(after), "dense after {after}");
        }
        // A layer summarized later ends a skip there from then on (a new epoch).
        holders.write().add(17, &summary(vec![obj("q", Kind::Directory, false)]));
        let r = p.reader();
        let h = r.holding(Path::new("p"));
        assert_eq!(h.skip(LayerId(9), (10..41).map(LayerId), |_| true, true), 12, "layers 11..=22 now");
        // `same` stops a stepping skip where the caller's path changes.
        assert_eq!(h.skip(LayerId(9), (10..41).map(LayerId), |k| k < 3, false), 3);
        drop(r);
        // Numbers that do not rise with the ids: no skipping at all.
        let p = Presence::new(holders, numbers.into_iter().rev().collect());
        let r = p.reader();
        assert_eq!(r.holding(Path::new("p")).skip(LayerId(1), (2..41).map(LayerId), |_| true, true), 0);
    }

    #[test]
    fn only_layers_holding_more_than_plain_dirs_on_the_way_may_rewrite_a_path() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let holders = Arc::new(RwLock::new(Holders::default()));
        holders.write().add(10, &summary(vec![obj("a", Kind::Directory, false), obj("a/b", Kind::Directory, false)]));
        holders.write().add(11, &summary(vec![obj("a", Kind::Directory, true)]));
        holders.write().add(12, &summary(vec![obj("a", Kind::Directory, false), obj("a/b", reg, false)]));
        holders.write().add(13, &summary(vec![obj("x", Kind::Whiteout, false)]));
        // Layers 0..5: 10, 11, 12, 13, one without a summary; 12 again below the range.
        let p = Presence::new(holders, vec![Some(10), Some(11), Some(12), Some(13), None, Some(14)]);
        let r = p.reader();
        assert_eq!(r.may_rewrite(5, Path::new("a/b")), vec![LayerId(1), LayerId(2), LayerId(4)]);
        assert_eq!(r.may_rewrite(5, Path::new("x")), vec![LayerId(3), LayerId(4)]);
        assert_eq!(r.may_rewrite(1, Path::new("a/b")), vec![], "a plain dir and its plain dir");
        assert_eq!(r.may_rewrite(6, Path::new("q")), vec![LayerId(4), LayerId(5)], "unknown layers");
    }

    #[test]
    fn listings_come_from_plain_dirs_only_and_a_replaced_summary_leaves_nothing_behind() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let holders = Arc::new(RwLock::new(Holders::default()));
        holders.write().add(
            2,
            &summary(vec![
                obj("d", Kind::Directory, false),
                obj("d/f", reg, false),
                obj("d/gone", Kind::Whiteout, false),
                obj("s", Kind::Directory, false),
                obj("s/moved", Kind::Directory, true),
            ]),
        );
        let p = Presence::new(holders.clone(), vec![Some(2)]);
        let mut listing = p.reader().listing(LayerId(0), Path::new("d")).unwrap();
        listing.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(listing, vec![("f".into(), reg, 3), ("gone".into(), Kind::Whiteout, 6)]);
        assert_eq!(p.reader().listing(LayerId(0), Path::new("s")), None, "an entry with a redirect");
        assert_eq!(p.reader().listing(LayerId(0), Path::new("")).map(|l| l.len()), Some(2), "the root");
        assert_eq!(p.reader().listing(LayerId(0), Path::new("d/f")), None, "not a dir");
        // The same layer number, another directory (a merge swapped it in): only the new objects.
        holders.write().add(2, &summary(vec![obj("d", Kind::Directory, false)]));
        assert_eq!(p.reader().listing(LayerId(0), Path::new("d")), Some(vec![]));
        assert_eq!(p.reader().held(LayerId(0), Path::new("d/f")), Held::Nothing);
        assert_eq!(p.reader().held(LayerId(0), Path::new("s")), Held::Nothing);
    }
    #[test]
    fn forgotten_layers_leave_no_paths_behind_and_their_numbers_are_reused() {
        // What a summarized object costs besides its holder entry (the daemon's memory at
        // 10,000 snapshots is mostly these).
        assert_eq!(std::mem::size_of::<Rec>(), 56);
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let mut h = Holders::default();
        let layer = |i: u64| summary(vec![obj("d", Kind::Directory, false), obj(&format!("d/f{i}"), reg, false)]);
        for round in 0..3 {
            for i in 0..50 {
                h.add(i, &layer(i + round * 1000));
            }
            assert_eq!(h.paths.ids.len(), 51, "d and one file per layer");
            for i in 0..50 {
                h.forget(i);
            }
            assert!(h.paths.ids.is_empty(), "round {round}: paths left after every layer was forgotten");
            assert!(h.shapes.ids.is_empty() && h.shapes.free.len() == h.shapes.all.len(), "shapes left");
            assert_eq!(h.paths.free.len(), h.paths.slots.len(), "every number free again");
            assert_eq!(h.paths.slots.len(), 51, "round {round}: numbers of forgotten paths were not reused");
        }
        // A layer replaced by a summary of fewer objects holds only those.
        h.add(7, &layer(7));
        h.add(7, &summary(vec![obj("d", Kind::Directory, false)]));
        assert_eq!(h.paths.ids.len(), 1);
        assert_eq!(h.holder(7, Path::new("d/f7")).map(|x| x.layer), None);
    }
    #[test]
    fn sizes_and_times_too_wide_for_a_record_come_back_exactly() {
        let reg = Kind::Other(rustix::fs::FileType::RegularFile);
        let with = |path: &str, bytes: u64, size: u64, times: [(i64, u32); 3]| {
            let mut o = obj(path, reg, false);
            o.bytes = bytes;
            o.meta = o.meta.map(|m| Meta { size, times, ..m });
            o
        };
        let t = 1_700_000_000;
        let objects = vec![
            obj("d", Kind::Directory, false),
            with("d/narrow", 8192, 5000, [(t - 10, 1), (t, 2), (t + 10, 3)]),
            with("d/big", 6 << 30, 5 << 30, [(t, 0), (t, 0), (t, 0)]),
            with("d/odd-bytes", 1000, 10, [(t, 0), (t, 0), (t, 0)]),
            with("d/far-times", 4096, 1, [(-(1 << 40), 7), (t, 8), (1 << 40, 9)]),
            with("d/max-blocks", u64::from(WIDE) * 512, 1, [(t, 0), (t, 0), (t, 0)]),
        ];
        let holders = Arc::new(RwLock::new(Holders::default()));
        holders.write().add(3, &summary(objects.clone()));
        let p = Presence::new(holders.clone(), vec![Some(3)]);
        let r = p.reader();
        for o in &objects[1..] {
            let st = r.holding(&o.path).stat(LayerId(0)).unwrap();
            let m = o.meta.unwrap();
            let times =
                [(st.st_atime, st.st_atime_nsec), (st.st_mtime, st.st_mtime_nsec), (st.st_ctime, st.st_ctime_nsec)];
            let times = times.map(|(s, n)| (s, n as u32));
            assert_eq!(
                (st.st_size as u64, st.st_blocks as u64 * 512, times),
                (m.size, o.bytes / 512 * 512, m.times),
                "{:?}",
                o.path
            );
        }
        let k = holders.read();
        let known = k.known(3).unwrap();
        assert_eq!(known.wide.len(), 4, "all but the narrow one kept wide");
        // (The oldest layer frees everything of one name, its dir's blocks too.)
        let all: u64 = objects.iter().map(|o| o.bytes).sum();
        assert_eq!(k.freed_by(3, None), Some(all), "exact bytes, 1000 included");
    }
}
