//! The snapshot store: one directory on LIVE's filesystem holding a kernel overlay layer per
//! snapshot (`layers/ID/`), the work dir copy-ups are built in (`work/work/`), the list of
//! snapshots, and a lock file that one daemon holds.
//!
//! The list is a checkpoint, `snapshots.json` (replaced atomically, with a backup), and a log of
//! the takes and deletes since, `snapshots.log` (one JSON line each, synced): a change costs one
//! small append, not a rewrite of a list that holds ten thousand snapshots (issue 17). Each
//! record has a sequence number; the checkpoint says up to which one it holds the log
//! (`Meta::logged`), so a stop between writing a checkpoint and emptying the log loses and
//! doubles nothing. The log is folded into a new checkpoint at every open and after
//! [`COMPACT_AFTER`] records. A line cut short by a stop (the last one, without its newline or
//! unparsable) was never acknowledged and is dropped; a bad line before the last is corruption.
//!
//! The commit point of a take is its record's sync (or the rename of a new checkpoint): a layer
//! dir that the list does not name is the leftover of an interrupted take and is removed at the
//! next open.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ovl_core::sys;
use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

/// The store's name inside LIVE when no `--store` is given.
pub const DEFAULT_NAME: &str = ".ovlsnap";

pub(crate) const META: &str = "snapshots.json";

/// The log of changes since the checkpoint `snapshots.json` (see the module docs).
pub(crate) const LOG: &str = "snapshots.log";

/// Log records after which a change writes a new checkpoint instead (the list's write, O(N),
/// then happens once per this many changes).
pub(crate) const COMPACT_AFTER: usize = 256;

/// The newest format of `snapshots.json` (2: it may have a log). Older ovlsnaps refuse it
/// rather than read a checkpoint without its log (they would take the logged snapshots' layers
/// for leftovers and remove them).
pub(crate) const META_VERSION: u32 = 2;

/// The store's dir of consolidated view layers (`Store::consolidation_dir`).
pub const VIEWS: &str = "views";

/// The copy of `snapshots.json` written after it, for `ovlsnap check --repair` when the list is
/// lost or corrupt.
pub(crate) const META_BACKUP: &str = "snapshots.json.bak";

/// One snapshot as recorded in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique, never reused; also the name of its layer dir.
    pub id: u64,
    /// The user's name for it.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// What it is for, in words (`take --description`, `set --description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// User properties (`ovlsnap set NAME key=value`), as snapper's userdata.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// The longest description or property value, in bytes.
pub const MAX_TEXT: usize = 1024;

/// Why `text` cannot be a description or property value, if it cannot.
pub fn text_problem(text: &str) -> Option<String> {
    if text.len() > MAX_TEXT {
        Some(format!("it is {} bytes long, and the limit is {MAX_TEXT}", text.len()))
    } else if text.chars().any(|c| c.is_control()) {
        Some("it contains a control character".into())
    } else {
        None
    }
}

/// Why `key` cannot name a user property, if it cannot: 1 to 64 of `A-Z a-z 0-9 _ . : -`.
pub fn key_problem(key: &str) -> Option<String> {
    if key.is_empty() || key.len() > 64 {
        Some("a key has 1 to 64 characters".into())
    } else if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)) {
        Some("a key has only letters, digits and `_.:-`".into())
    } else {
        None
    }
}

/// The directory the store belongs to: its filesystem UUID and inode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveId {
    /// Filesystem UUID as hex (all zeros when the fs has none).
    pub fs: String,
    /// Inode number of LIVE's root.
    pub ino: u64,
}

/// The store's metadata, `snapshots.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Format version (1, or 2: with a log).
    pub version: u32,
    /// The last log record this checkpoint holds (later ones are applied on top of it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logged: u64,
    /// The directory whose snapshots these are.
    pub live: LiveId,
    /// The id the next snapshot gets.
    pub next_id: u64,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Who besides root and LIVE's owner may change snapshots (`ovlsnap allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<crate::policy::Grant>,
    /// The layers keep their overlay metadata in `user.overlay.*` (a store made without root,
    /// mounted by the kernel with `userxattr`), not `trusted.overlay.*`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub userxattr: bool,
    /// Snapshots whose views no longer show, or can no longer be shown to show, the tree as it
    /// was: LIVE changed while no daemon served it (`crate::seal`). By snapshot id.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub damage: std::collections::BTreeMap<u64, Damage>,
    /// Holds (`ovlsnap hold`, as `zfs hold`): a snapshot with any tag cannot be deleted. By id.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub holds: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One change in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogRecord {
    seq: u64,
    #[serde(flatten)]
    change: Change,
}

/// What [`Store::commit_in_place`] needs to put the list back.
enum Undo {
    Add { len: usize, next_id: u64 },
    Delete { at: usize, info: SnapshotInfo, damage: Option<Damage>, holds: Option<std::collections::BTreeSet<String>> },
}

/// What a log record changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    /// A snapshot was taken (ids only grow: `next_id` follows).
    Add(SnapshotInfo),
    /// The snapshot with this id was deleted.
    Delete(u64),
    /// Snapshot `id` was renamed.
    Rename { id: u64, name: String },
    /// Snapshot `id` got hold `tag`.
    Hold { id: u64, tag: String },
    /// Snapshot `id` lost hold `tag`.
    Release { id: u64, tag: String },
    /// Snapshot `id`'s description (`None`: removed).
    Describe { id: u64, description: Option<String> },
    /// Snapshot `id`'s user property `key` (`None`: removed).
    Property { id: u64, key: String, value: Option<String> },
}

impl Change {
    /// Applies the change to `meta`; an error if it does not fit (a corrupt log).
    fn apply(&self, meta: &mut Meta) -> anyhow::Result<()> {
        match self {
            Change::Add(info) => {
                if info.id < meta.next_id
                    || !valid_name(&info.name)
                    || meta.snapshots.iter().any(|s| s.name == info.name)
                    || info.description.as_deref().is_some_and(|d| text_problem(d).is_some())
                    || info.properties.iter().any(|(k, v)| key_problem(k).is_some() || text_problem(v).is_some())
                {
                    bail!("snapshot {:?} (id {}) cannot be added to the list", info.name, info.id);
                }
                meta.next_id = info.id + 1;
                meta.snapshots.push(info.clone());
            }
            Change::Delete(id) => {
                let before = meta.snapshots.len();
                meta.snapshots.retain(|s| s.id != *id);
                if meta.snapshots.len() == before {
                    bail!("a deletion of id {id}, which the list does not hold");
                }
                meta.damage.remove(id);
                meta.holds.remove(id);
            }
            Change::Rename { id, name } => {
                if !valid_name(name) || meta.snapshots.iter().any(|s| &s.name == name) {
                    bail!("snapshot {id} cannot be renamed {name:?}");
                }
                let s = meta.snapshots.iter_mut().find(|s| s.id == *id);
                s.with_context(|| format!("a rename of id {id}, which the list does not hold"))?.name = name.clone();
            }
            Change::Hold { id, tag } => {
                if tag_problem(tag).is_some() || !meta.snapshots.iter().any(|s| s.id == *id) {
                    bail!("snapshot {id} cannot get the hold {tag:?}");
                }
                if !meta.holds.entry(*id).or_default().insert(tag.clone()) {
                    bail!("snapshot {id} has the hold {tag:?} already");
                }
            }
            Change::Describe { id, description } => {
                if description.as_deref().is_some_and(|d| text_problem(d).is_some()) {
                    bail!("snapshot {id} cannot have the description {description:?}");
                }
                let s = meta.snapshots.iter_mut().find(|s| s.id == *id);
                s.with_context(|| format!("a description of id {id}, which the list does not hold"))?.description =
                    description.clone();
            }
            Change::Property { id, key, value } => {
                if key_problem(key).is_some() || value.as_deref().is_some_and(|v| text_problem(v).is_some()) {
                    bail!("snapshot {id} cannot have the property {key:?} = {value:?}");
                }
                let s = meta.snapshots.iter_mut().find(|s| s.id == *id);
                let props =
                    &mut s.with_context(|| format!("a property of id {id}, which the list does not hold"))?.properties;
                match value {
                    Some(v) => props.insert(key.clone(), v.clone()),
                    None => props.remove(key),
                };
            }
            Change::Release { id, tag } => {
                let tags = meta.holds.get_mut(id);
                if !tags.is_some_and(|t| t.remove(tag)) {
                    bail!("a release of the hold {tag:?} that snapshot {id} does not have");
                }
                if meta.holds.get(id).is_some_and(|t| t.is_empty()) {
                    meta.holds.remove(id);
                }
            }
        }
        Ok(())
    }
}

/// The longest hold tag, in bytes.
pub const MAX_TAG: usize = 200;

/// Why `tag` cannot name a hold, if it cannot.
pub fn tag_problem(tag: &str) -> Option<String> {
    if tag.is_empty() {
        Some("it is empty".into())
    } else if tag.len() > MAX_TAG {
        Some(format!("it is {} bytes long, and the limit is {MAX_TAG}", tag.len()))
    } else if tag.chars().any(|c| c.is_control()) {
        Some("it contains a control character".into())
    } else {
        None
    }
}

/// What reading the log found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogState {
    /// The last record's sequence number (the checkpoint's `logged` if none is newer).
    pub last: u64,
    /// Bytes of whole records.
    pub len: u64,
    /// Records newer than the checkpoint.
    pub records: usize,
    /// A last line cut short (dropped).
    pub torn: bool,
    /// The highest sequence number of any record read, applied or not.
    pub seen: u64,
}

/// Applies the log `bytes` to the checkpoint `meta`. Strict (`lenient` false): a bad record
/// before the last line, a gap in the numbers or a change that does not fit is an error.
/// Lenient (a repair): stops at the first such record instead.
fn replay(meta: &mut Meta, bytes: &[u8], lenient: bool) -> anyhow::Result<LogState> {
    let mut state = LogState { last: meta.logged, ..Default::default() };
    let mut at = 0;
    while at < bytes.len() {
        let Some(nl) = bytes[at..].iter().position(|b| *b == b'\n') else {
            state.torn = true;
            break;
        };
        let end = at + nl + 1;
        let applied =
            serde_json::from_slice::<LogRecord>(&bytes[at..end - 1]).map_err(anyhow::Error::from).and_then(|r| {
                state.seen = state.seen.max(r.seq);
                if r.seq <= meta.logged {
                    return Ok(());
                }
                if r.seq != state.last + 1 {
                    bail!("record {} follows record {}", r.seq, state.last);
                }
                r.change.apply(meta)?;
                state.last = r.seq;
                state.records += 1;
                Ok(())
            });
        if let Err(e) = applied {
            if end == bytes.len() || lenient {
                // The last line: cut short by a stop before it was synced (never acknowledged).
                state.torn = true;
                break;
            }
            return Err(e.context(format!("{LOG} is corrupt at byte {at}")));
        }
        at = end;
        state.len = end as u64;
    }
    Ok(state)
}

/// Reads the log of the store dir `root` onto its checkpoint `meta`.
pub(crate) fn read_log(root: BorrowedFd<'_>, meta: &mut Meta, lenient: bool) -> anyhow::Result<LogState> {
    let fd = match rustix::fs::openat(root, LOG, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(LogState { last: meta.logged, ..Default::default() }),
        Err(e) => return Err(e).with_context(|| format!("opening {LOG}")),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut File::from(fd), &mut bytes).with_context(|| format!("reading {LOG}"))?;
    replay(meta, &bytes, lenient)
}

/// The store dir `root`'s log, open for writing (made if missing; never through a symlink).
fn open_log(root: BorrowedFd<'_>) -> anyhow::Result<File> {
    let fd = rustix::fs::openat(
        root,
        LOG,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .with_context(|| format!("opening {LOG}"))?;
    Ok(File::from(fd))
}

/// Why a snapshot's view is no longer what was taken, found at a mount (`crate::seal`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    /// In words, with when it was found.
    pub reason: String,
    /// The paths of its view that LIVE changed, added or removed while not served (those its view
    /// shows from LIVE); their reads fail with EIO rather than show what was not there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<crate::names::JsonPath>,
    /// True when what changed cannot be known (no seal): the whole view is unverified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
}

/// An open store, locked by this process.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    root: OwnedFd,
    layers: OwnedFd,
    work: OwnedFd,
    workdir: OwnedFd,
    _lock: File,
    meta: Meta,
    /// The log, open for writing at `log_state.len`.
    log: File,
    log_state: LogState,
    /// An append failed and its bytes may still be there: every change writes a checkpoint
    /// until the log could be emptied.
    log_broken: bool,
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

fn mkdir_open(dir: BorrowedFd<'_>, name: &str, mode: u32) -> std::io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    open_dir_at(dir, name)
}

/// Reads and checks the snapshot list of the store dir `root` (`snapshots.json` and its log);
/// `None` if there is none yet.
pub fn read_meta(root: BorrowedFd<'_>) -> anyhow::Result<Option<Meta>> {
    Ok(read_meta_logged(root)?.map(|(meta, _)| meta))
}

/// [`read_meta`], with what the log held.
pub(crate) fn read_meta_logged(root: BorrowedFd<'_>) -> anyhow::Result<Option<(Meta, LogState)>> {
    let Some(mut meta) = read_meta_named(root, META)? else { return Ok(None) };
    let log = read_log(root, &mut meta, false)?;
    Ok(Some((meta, log)))
}

/// Reads and checks the list `name` (`snapshots.json` or its backup) in the store dir `root`.
pub(crate) fn read_meta_named(root: BorrowedFd<'_>, name: &str) -> anyhow::Result<Option<Meta>> {
    let fd = match rustix::fs::openat(root, name, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {name}")),
    };
    let text = std::io::read_to_string(File::from(fd)).with_context(|| format!("reading {name}"))?;
    parse_meta(&text).map(Some)
}

/// The ids of the numbered layer dirs in `layers` (merges in progress and other names left out).
pub(crate) fn layer_ids(layers: BorrowedFd<'_>) -> anyhow::Result<Vec<u64>> {
    let mut ids: Vec<u64> = sys::read_dir_fd(rustix::io::dup(layers)?)?
        .into_iter()
        .filter_map(|e| e.name.to_str().and_then(|n| n.parse().ok()))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Parses and checks the text of `snapshots.json` (untrusted: it may be hand-edited or corrupt).
pub fn parse_meta(text: &str) -> anyhow::Result<Meta> {
    let meta: Meta = serde_json::from_str(text).context("snapshots.json is corrupt")?;
    if !(1..=META_VERSION).contains(&meta.version) {
        bail!("snapshots.json has format version {}, this ovlsnap reads versions 1 to {META_VERSION}", meta.version);
    }
    let mut seen = std::collections::HashSet::new();
    for s in &meta.snapshots {
        if s.id == 0 || s.id >= meta.next_id || !seen.insert(s.name.clone()) || !valid_name(&s.name) {
            bail!("snapshots.json is corrupt: bad snapshot entry {:?} (id {})", s.name, s.id);
        }
    }
    Ok(meta)
}

/// What `snapshots.json` records of LIVE (`live`, open): its filesystem's UUID and its inode.
pub(crate) fn live_id(live: BorrowedFd<'_>) -> anyhow::Result<LiveId> {
    let st = rustix::fs::fstat(live)?;
    Ok(LiveId { fs: sys::fs_uuid(live).iter().map(|b| format!("{b:02x}")).collect(), ino: st.st_ino })
}

/// The longest snapshot name, in bytes (room is kept below the file name limit of 255 for the
/// names the store derives from it).
pub const MAX_NAME: usize = 200;

/// Whether `name` may name a snapshot: a plain file name, printable, at most [`MAX_NAME`] bytes.
pub fn valid_name(name: &str) -> bool {
    name_problem(name).is_none()
}

/// Why `name` may not name a snapshot, for the error message; `None` when it may.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("it is empty".into())
    } else if name.len() > MAX_NAME {
        Some(format!("it is {} bytes long, and the limit is {MAX_NAME}", name.len()))
    } else if name == "." || name == ".." {
        Some("`.` and `..` name directories".into())
    } else if name.contains('/') {
        Some("it contains '/'".into())
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains a control character".into())
    } else {
        None
    }
}

impl Store {
    /// Opens (creating if needed) the store of LIVE (`live`, open), at `path` (`None`: the
    /// default inside LIVE), takes its lock, and removes what an interrupted take or copy-up left.
    pub fn open(live: BorrowedFd<'_>, live_path: &Path, path: Option<&Path>) -> anyhow::Result<Self> {
        let live_st = rustix::fs::fstat(live)?;
        let (path, root) = match path {
            None => {
                let root = mkdir_open(live, DEFAULT_NAME, 0o700)
                    .with_context(|| format!("creating the store {:?}", live_path.join(DEFAULT_NAME)))?;
                (live_path.join(DEFAULT_NAME), root)
            }
            Some(p) => {
                std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                    .create(p)
                    .with_context(|| format!("creating the store {p:?}"))?;
                let root = rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .with_context(|| format!("opening the store {p:?}"))?;
                (p.to_path_buf(), root)
            }
        };
        let st = rustix::fs::fstat(&root)?;
        // Whoever can write the store can rewrite history: only root and LIVE's owner may.
        let trusted = |uid: u32| uid == 0 || uid == live_st.st_uid || uid == rustix::process::geteuid().as_raw();
        if !trusted(st.st_uid) || st.st_mode & 0o022 != 0 {
            bail!(
                "the store {path:?} (uid {}, mode {:o}) can be written by others than root and LIVE's owner: \
                 `chown` it to one of them and `chmod go-w` it",
                st.st_uid,
                st.st_mode & 0o7777
            );
        }
        if st.st_dev != live_st.st_dev {
            bail!(
                "the store {path:?} is on another filesystem than {live_path:?}; a store must be on LIVE's \
                 filesystem (copy-ups are renamed and cloned into it)"
            );
        }
        let lock = rustix::fs::openat(
            &root,
            "lock",
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        if let Err(e) = rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                bail!("another ovlsnap daemon already serves {live_path:?} (its store {path:?} is locked)");
            }
            return Err(e).context("locking the store");
        }
        let live_id = live_id(live)?;
        let repair =
            || format!("nothing was changed; `ovlsnap check {} --repair` rebuilds the list", live_path.display());
        let (meta, last) = match read_meta_logged(root.as_fd()).with_context(repair)? {
            Some((m, log)) => {
                if log.torn {
                    tracing::warn!("dropping the last line of {LOG}: a change cut short by a stop, never committed");
                }
                if m.live.ino != live_id.ino || m.live.fs != live_id.fs {
                    bail!("the store {path:?} belongs to another directory than {live_path:?}");
                }
                (m, log.last)
            }
            None => {
                // A store that holds layers or a backup list but no list lost it: taking it for
                // a new store would drop every snapshot.
                let layers = match open_dir_at(root.as_fd(), "layers") {
                    Ok(fd) => layer_ids(fd.as_fd())?.len(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                    Err(e) => return Err(e).context("opening the store's layers"),
                };
                let backup = rustix::fs::statat(&root, META_BACKUP, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok();
                if layers > 0 || backup {
                    bail!(
                        "the snapshot list {:?} is missing, but the store holds {layers} snapshot layer(s){}: {}",
                        path.join(META),
                        if backup { " and a backup of the list" } else { "" },
                        repair()
                    );
                }
                // Without root, `trusted.*` cannot be written: such a store uses `user.*`.
                let userxattr = !rustix::process::geteuid().is_root();
                let fresh = Meta {
                    version: META_VERSION,
                    logged: 0,
                    live: live_id,
                    next_id: 1,
                    snapshots: Vec::new(),
                    allow: Vec::new(),
                    userxattr,
                    damage: Default::default(),
                    holds: Default::default(),
                };
                (fresh, 0)
            }
        };
        if !meta.userxattr && !rustix::process::geteuid().is_root() {
            bail!(
                "the store {path:?} keeps its overlay metadata in trusted.* xattrs, which only root can write: \
                 mount {live_path:?} as root"
            );
        }
        let layers = mkdir_open(root.as_fd(), "layers", 0o700)?;
        let workdir = mkdir_open(root.as_fd(), "work", 0o700)?;
        let work = mkdir_open(workdir.as_fd(), "work", 0o700)?;
        let log = open_log(root.as_fd())?;
        let log_state = LogState { last, ..Default::default() };
        let mut store = Self {
            path,
            root,
            layers,
            work,
            workdir,
            _lock: File::from(lock),
            meta: meta.clone(),
            log,
            log_state,
            log_broken: false,
        };
        // Folds the log into a new checkpoint and empties it (dropping a torn last line).
        store.commit(meta, None)?;
        store.recover_delete()?;
        store.clean()?;
        store.clean_unused_views()?;
        Ok(store)
    }

    /// Removes layer dirs no snapshot names and everything in the work dir.
    fn clean(&self) -> anyhow::Result<()> {
        for e in sys::read_dir_fd(rustix::io::dup(&self.work)?)? {
            tracing::info!(name = ?e.name, "removing a half-made copy from the work dir");
            sys::remove_tree_at(&self.work, &sys::name_cstr(&e.name)?)?;
        }
        // (A set: a search of the list per layer was 10^8 comparisons at N = 10,000.)
        let ids: std::collections::HashSet<u64> = self.meta.snapshots.iter().map(|s| s.id).collect();
        for e in sys::read_dir_fd(rustix::io::dup(&self.layers)?)? {
            let known = e.name.to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|id| ids.contains(&id));
            if !known {
                tracing::info!(name = ?e.name, "removing a layer no snapshot owns (interrupted take)");
                sys::remove_tree_at(&self.layers, &sys::name_cstr(&e.name)?)?;
            }
        }
        Ok(())
    }

    /// Makes `meta` the list, durably: by appending `change` (what makes `meta` of the list
    /// now) to the log, or, without one or when the log is due, by a new checkpoint. Nothing is
    /// changed when it fails.
    fn commit(&mut self, meta: Meta, change: Option<Change>) -> anyhow::Result<()> {
        match change {
            Some(c) if self.loggable() => self.append(c)?,
            _ => self.checkpoint(&meta)?,
        }
        self.meta = meta;
        Ok(())
    }

    /// Whether the next change may be appended to the log (else a checkpoint is written).
    fn loggable(&self) -> bool {
        !self.log_broken && self.log_state.records < COMPACT_AFTER && self.log_intact()
    }

    /// Commits a take or a delete by changing the list in place and appending the change to the
    /// log: no copy of a list of thousands of snapshots per take (issue 17: it was most of a
    /// take's work at 10,000). A failed append puts the list back as it was; when the log takes
    /// no more, a checkpoint of a changed copy is written as for any change.
    fn commit_in_place(&mut self, change: Change) -> anyhow::Result<()> {
        if !self.loggable() {
            let mut meta = self.meta.clone();
            change.apply(&mut meta)?;
            return self.commit(meta, None);
        }
        let undo = match &change {
            Change::Add(_) => Undo::Add { len: self.meta.snapshots.len(), next_id: self.meta.next_id },
            Change::Delete(id) => {
                let at = self.meta.snapshots.iter().position(|s| s.id == *id);
                let at = at.with_context(|| format!("a deletion of id {id}, which the list does not hold"))?;
                Undo::Delete {
                    at,
                    info: self.meta.snapshots[at].clone(),
                    damage: self.meta.damage.get(id).cloned(),
                    holds: self.meta.holds.get(id).cloned(),
                }
            }
            _ => bail!("only a take or a delete is committed in place"),
        };
        change.apply(&mut self.meta)?;
        if let Err(e) = self.append(change) {
            match undo {
                Undo::Add { len, next_id } => {
                    self.meta.snapshots.truncate(len);
                    self.meta.next_id = next_id;
                }
                Undo::Delete { at, info, damage, holds } => {
                    let id = info.id;
                    self.meta.snapshots.insert(at, info);
                    if let Some(d) = damage {
                        self.meta.damage.insert(id, d);
                    }
                    if let Some(h) = holds {
                        self.meta.holds.insert(id, h);
                    }
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Folds the log into a new checkpoint (if it holds anything).
    pub fn fold_log(&mut self) -> anyhow::Result<()> {
        if self.log_state.records > 0 || self.log_broken {
            self.commit(self.meta.clone(), None)?;
        }
        Ok(())
    }

    /// Whether the log is still the file at its name, as long as this daemon wrote it. Removed,
    /// replaced or cut behind our back, an append would commit to a file no mount reads, or
    /// after a hole that makes it read as a torn line: the change writes a checkpoint instead.
    fn log_intact(&self) -> bool {
        let here = rustix::fs::fstat(&self.log);
        let named = rustix::fs::statat(&self.root, LOG, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        let intact = match (here, named) {
            (Ok(h), Ok(n)) => {
                h.st_nlink > 0 && (h.st_dev, h.st_ino) == (n.st_dev, n.st_ino) && h.st_size as u64 == self.log_state.len
            }
            _ => false,
        };
        if !intact {
            tracing::warn!(
                "{LOG} was removed, replaced or changed behind the daemon's back: the list is written whole"
            );
        }
        intact
    }

    /// Appends one record to the log and syncs it (the commit point).
    fn append(&mut self, change: Change) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let seq = self.log_state.last + 1;
        let mut line = serde_json::to_vec(&LogRecord { seq, change })?;
        line.push(b'\n');
        let at = self.log_state.len;
        let written = self.log.write_all_at(&line, at).and_then(|()| self.log.sync_data());
        if let Err(e) = written {
            // Not committed: its bytes must not stay for a later read to take as a record.
            if self.log.set_len(at).and_then(|()| self.log.sync_data()).is_err() {
                self.log_broken = true;
            }
            return Err(anyhow::Error::from(e).context(format!("appending to {LOG}")));
        }
        self.log_state.last = seq;
        self.log_state.len += line.len() as u64;
        self.log_state.records += 1;
        Ok(())
    }

    /// Writes `meta` as a new checkpoint holding every record so far, then empties the log.
    fn checkpoint(&mut self, meta: &Meta) -> anyhow::Result<()> {
        let mut meta = meta.clone();
        meta.version = META_VERSION;
        // A failed append's record number is never used again: if its bytes stayed, the
        // checkpoint covers them.
        let last = self.log_state.last + u64::from(self.log_broken);
        meta.logged = last;
        self.write_meta(&meta)?;
        self.log_state = LogState { last, ..Default::default() };
        // A log removed or replaced behind our back: the file at its name is the log from now on.
        let named = rustix::fs::statat(&self.root, LOG, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        let here = rustix::fs::fstat(&self.log);
        if !matches!((&here, &named), (Ok(h), Ok(n)) if h.st_nlink > 0 && (h.st_dev, h.st_ino) == (n.st_dev, n.st_ino))
        {
            match open_log(self.root.as_fd()).and_then(|f| Ok((f, rustix::fs::fsync(&self.root)?))) {
                Ok((f, ())) => self.log = f,
                Err(e) => {
                    tracing::warn!("reopening {LOG}: {e:#}; changes rewrite the list until it works");
                    self.log_broken = true;
                    return Ok(());
                }
            }
        }
        // The log's records are all in the checkpoint now: emptying it only saves reading them.
        match self.log.set_len(0).and_then(|()| self.log.sync_data()) {
            Ok(()) => self.log_broken = false,
            Err(e) => {
                tracing::warn!("emptying {LOG}: {e}; changes rewrite the list until it works");
                self.log_broken = true;
            }
        }
        Ok(())
    }

    /// Replaces `snapshots.json` atomically and durably, then its backup.
    fn write_meta(&self, meta: &Meta) -> anyhow::Result<()> {
        write_meta_at(self.root.as_fd(), META, meta)?;
        // A stop before this leaves the backup one change behind, which a repair knows how to
        // read (it adopts the layers the backup does not name). So does a failure here (out of
        // descriptors, say): the change is made, and reporting it failed would have the caller
        // take back in memory what the list already holds.
        if let Err(e) = write_meta_at(self.root.as_fd(), META_BACKUP, meta) {
            tracing::error!("the backup {META_BACKUP} stays one change behind: {e:#}");
        }
        Ok(())
    }

    /// Where the store is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store dir, open.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The open `layers` dir, where each snapshot's layer is named by its id.
    pub fn layers_dir(&self) -> BorrowedFd<'_> {
        self.layers.as_fd()
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.meta.snapshots
    }

    /// The snapshot with id `id`.
    pub fn info(&self, id: u64) -> Option<&SnapshotInfo> {
        self.meta.snapshots.iter().find(|s| s.id == id)
    }

    /// The snapshot named `name`.
    pub fn by_name(&self, name: &str) -> Option<&SnapshotInfo> {
        self.meta.snapshots.iter().find(|s| s.name == name)
    }

    /// The overlay options every stack of this store's layers is read with: the xattr namespace
    /// its layers were written in.
    pub fn overlay_options(&self) -> ovl_core::MountOptions {
        ovl_core::MountOptions { userxattr: self.meta.userxattr, ..Default::default() }
    }

    /// The snapshots found damaged, by id.
    pub fn damage(&self) -> &std::collections::BTreeMap<u64, Damage> {
        &self.meta.damage
    }

    /// Records damage found at a mount, durably; a snapshot already marked keeps its first
    /// reason and gains the new paths.
    pub fn add_damage(&mut self, found: std::collections::BTreeMap<u64, Damage>) -> anyhow::Result<()> {
        let mut meta = self.meta.clone();
        for (id, d) in found {
            let e = meta.damage.entry(id).or_insert_with(|| Damage { reason: d.reason.clone(), ..Default::default() });
            e.unverified |= d.unverified;
            for p in d.paths {
                if !e.paths.contains(&p) {
                    e.paths.push(p);
                }
            }
        }
        self.commit(meta, None)
    }

    /// Renames snapshot `id` to `name`, durably.
    pub fn rename(&mut self, id: u64, name: &str) -> anyhow::Result<()> {
        if let Some(why) = name_problem(name) {
            bail!("{name:?} is not a valid snapshot name: {why}");
        }
        if self.by_name(name).is_some() {
            bail!("a snapshot named {name:?} already exists");
        }
        let change = Change::Rename { id, name: name.to_string() };
        let mut meta = self.meta.clone();
        change.apply(&mut meta)?;
        self.commit(meta, Some(change))
    }

    /// Sets snapshot `id`'s description (`None`: removes it), durably.
    pub fn describe(&mut self, id: u64, description: Option<&str>) -> anyhow::Result<()> {
        if let Some(why) = description.and_then(text_problem) {
            bail!("not a valid description: {why}");
        }
        let change = Change::Describe { id, description: description.map(str::to_string) };
        let mut meta = self.meta.clone();
        change.apply(&mut meta)?;
        self.commit(meta, Some(change))
    }

    /// Sets snapshot `id`'s user property `key` (`None`: removes it), durably.
    pub fn set_property(&mut self, id: u64, key: &str, value: Option<&str>) -> anyhow::Result<()> {
        if let Some(why) = key_problem(key) {
            bail!("{key:?} is not a valid property key: {why}");
        }
        if let Some(why) = value.and_then(text_problem) {
            bail!("not a valid value of {key:?}: {why}");
        }
        let change = Change::Property { id, key: key.to_string(), value: value.map(str::to_string) };
        let mut meta = self.meta.clone();
        change.apply(&mut meta)?;
        self.commit(meta, Some(change))
    }

    /// The holds of snapshot `id` (none: it may be deleted).
    pub fn holds(&self, id: u64) -> Vec<String> {
        self.meta.holds.get(&id).map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }

    /// Puts hold `tag` on snapshot `id` (`hold`) or takes it off, durably.
    pub fn set_hold(&mut self, id: u64, tag: &str, hold: bool) -> anyhow::Result<()> {
        if let Some(why) = tag_problem(tag) {
            bail!("{tag:?} is not a valid hold tag: {why}");
        }
        let has = self.meta.holds.get(&id).is_some_and(|t| t.contains(tag));
        let name = self.info(id).map_or_else(|| format!("id {id}"), |s| format!("{:?}", s.name));
        match (hold, has) {
            (true, true) => bail!("snapshot {name} has the hold {tag:?} already"),
            (false, false) => bail!("snapshot {name} has no hold {tag:?}"),
            _ => {}
        }
        let tag = tag.to_string();
        let change = if hold { Change::Hold { id, tag } } else { Change::Release { id, tag } };
        let mut meta = self.meta.clone();
        change.apply(&mut meta)?;
        self.commit(meta, Some(change))
    }

    /// Who besides root and LIVE's owner may change snapshots.
    pub fn grants(&self) -> &[crate::policy::Grant] {
        &self.meta.allow
    }

    /// Replaces the grants, durably (the list is rewritten atomically).
    pub fn set_grants(&mut self, grants: Vec<crate::policy::Grant>) -> anyhow::Result<()> {
        let mut meta = self.meta.clone();
        meta.allow = grants;
        self.commit(meta, None)
    }

    /// The layer dir of snapshot `id`, open.
    pub fn open_layer(&self, id: u64) -> anyhow::Result<OwnedFd> {
        open_dir_at(self.layers.as_fd(), &id.to_string()).with_context(|| format!("opening layer {id}"))
    }

    /// The work dir (`work/work`) and the workdir holding it.
    pub fn work(&self) -> anyhow::Result<(OwnedFd, OwnedFd)> {
        Ok((rustix::io::dup(&self.workdir)?, rustix::io::dup(&self.work)?))
    }

    /// The path of layer `id` relative to the store.
    pub fn layer_rel(id: u64) -> PathBuf {
        Path::new("layers").join(id.to_string())
    }

    /// Records a new snapshot `name` with an empty layer; returns it. The caller makes sure no
    /// change runs meanwhile.
    pub fn add(
        &mut self,
        name: &str,
        created: u64,
        description: Option<&str>,
        prepare: impl FnOnce(BorrowedFd<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<SnapshotInfo> {
        if let Some(why) = name_problem(name) {
            bail!("{name:?} is not a valid snapshot name: {why}");
        }
        if let Some(why) = description.and_then(text_problem) {
            bail!("not a valid description: {why}");
        }
        if self.by_name(name).is_some() {
            bail!("a snapshot named {name:?} already exists");
        }
        let id = self.meta.next_id;
        let ids = id.to_string();
        rustix::fs::mkdirat(&self.layers, ids.as_str(), Mode::from_raw_mode(0o755))
            .with_context(|| format!("creating layer {id}"))?;
        let prepared = self.open_layer(id).and_then(|fd| {
            prepare(fd.as_fd())?;
            rustix::fs::fsync(&fd)?;
            Ok(())
        });
        if let Err(e) = prepared {
            let _ = sys::remove_tree_at(&self.layers, &sys::name_cstr(std::ffi::OsStr::new(&ids))?);
            return Err(e);
        }
        rustix::fs::fsync(&self.layers)?;
        let description = description.map(str::to_string);
        let info = SnapshotInfo { id, name: name.to_string(), created, description, ..Default::default() };
        if let Err(e) = self.commit_in_place(Change::Add(info.clone())) {
            let _ = rustix::fs::unlinkat(&self.layers, ids.as_str(), rustix::fs::AtFlags::REMOVEDIR);
            return Err(e);
        }
        Ok(info)
    }
}

/// A snapshot list for the store dir `root` of LIVE `live` whose list is lost or unreadable
/// (`ovlsnap check --repair`): `snapshots.json`, else the backup list, if usable and LIVE's,
/// else an empty one; with the log's changes on top as far as they apply; then every numbered
/// layer it does not name is adopted as snapshot `recovered-ID` (created: the
/// layer dir's mtime), and every snapshot whose layer is gone is left out. Layers keep their order
/// (ids grow with every take), so each view shows what it showed. Removes nothing. Returns the
/// list and one line per thing it decided, for the report.
pub(crate) fn rebuild_meta(root: BorrowedFd<'_>, live: &LiveId) -> anyhow::Result<(Meta, Vec<String>)> {
    let mut notes = Vec::new();
    let userxattr = !rustix::process::geteuid().is_root();
    let fresh = Meta {
        version: META_VERSION,
        logged: 0,
        live: live.clone(),
        next_id: 1,
        snapshots: Vec::new(),
        allow: Vec::new(),
        userxattr,
        damage: Default::default(),
        holds: Default::default(),
    };
    let meta = match read_meta_named(root, META).ok().flatten().filter(|m| &m.live == live) {
        Some(m) => Ok(Some(m)),
        None => read_meta_named(root, META_BACKUP).inspect(|m| {
            if m.as_ref().is_some_and(|m| &m.live == live) {
                notes.push(format!("the list was restored from {META_BACKUP}"));
            }
        }),
    };
    let mut meta = match meta {
        Ok(Some(m)) if &m.live == live => m,
        Ok(Some(_)) => {
            notes.push(format!("{META_BACKUP} belongs to another directory: not used"));
            fresh
        }
        Ok(None) => fresh,
        Err(e) => {
            notes.push(format!("{META_BACKUP} is unusable too ({e:#})"));
            fresh
        }
    };
    let log = read_log(root, &mut meta, true)?;
    if log.records > 0 {
        notes.push(format!("{} change(s) were read from {LOG}", log.records));
    }
    if log.torn {
        notes.push(format!("{LOG} was read up to byte {}: what follows is dropped", log.len));
    }
    // Above every record the log holds, so that none is applied again on this list.
    meta.logged = log.last.max(log.seen);
    meta.version = META_VERSION;
    let layers = open_dir_at(root, "layers").context("opening the store's layers")?;
    let ids = layer_ids(layers.as_fd())?;
    meta.snapshots.retain(|s| {
        let kept = ids.contains(&s.id);
        if !kept {
            notes.push(format!("snapshot {:?} (id {}) is listed but its layer is gone: left out", s.name, s.id));
        }
        kept
    });
    for &id in &ids {
        if meta.snapshots.iter().any(|s| s.id == id) {
            continue;
        }
        let mut name = format!("recovered-{id}");
        while meta.snapshots.iter().any(|s| s.name == name) {
            name.push('~');
        }
        let created = rustix::fs::statat(&layers, id.to_string().as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_or(0, |st| st.st_mtime.max(0) as u64);
        notes.push(format!("layer {id} is adopted as snapshot {name:?}"));
        meta.snapshots.push(SnapshotInfo { id, name, created, ..Default::default() });
    }
    meta.snapshots.sort_by_key(|s| s.id);
    meta.next_id = meta.next_id.max(ids.last().map_or(1, |m| m + 1));
    Ok((meta, notes))
}

/// Makes the rebuilt list `meta` ([`rebuild_meta`]) the store dir `root`'s: `snapshots.json`,
/// its backup, and no log (its records are in `meta` or were dropped; `meta.logged` is above
/// them all, so a stop before the log goes applies none twice).
pub(crate) fn install_rebuilt_meta(root: BorrowedFd<'_>, meta: &Meta) -> anyhow::Result<()> {
    write_meta_at(root, META, meta)?;
    write_meta_at(root, META_BACKUP, meta)?;
    match rustix::fs::unlinkat(root, LOG, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e).context(format!("removing {LOG}")),
    }
    rustix::fs::fsync(root)?;
    Ok(())
}

/// Writes `meta` as `name` in the store dir `root`, atomically and durably.
pub(crate) fn write_meta_at(root: BorrowedFd<'_>, name: &str, meta: &Meta) -> anyhow::Result<()> {
    replace_file(root, name, |f| {
        f.write_all(serde_json::to_string_pretty(meta)?.as_bytes())?;
        f.write_all(b"\n")?;
        Ok(())
    })
}

/// Replaces the file `name` in the store dir `root` with what `fill` writes: a temp file (mode
/// 0600, never through a symlink), fsync, rename over `name`, fsync of the dir.
pub(crate) fn replace_file(
    root: BorrowedFd<'_>,
    name: &str,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut staged = stage_file(root, name, true, fill)?;
    staged.install()?;
    staged.sync()
}

/// The file `name` of the directory `dir`, written by `fill` under `NAME.tmp` (and synced if
/// `durable`), for [`StagedFile::install`] to put in place: the slow part (the data's fsync) can
/// run before the caller takes the locks under which it decides whether the file is still
/// wanted. The temporary name is opened without following a symlink or waiting on a FIFO
/// someone put there.
pub(crate) fn stage_file(
    dir: BorrowedFd<'_>,
    name: &str,
    durable: bool,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<StagedFile> {
    let dir = rustix::io::dup(dir)?;
    let tmp = format!("{name}.tmp");
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )?;
    // From here on a failure takes the temporary file away again.
    let staged = StagedFile { dir, tmp, name: name.to_owned(), installed: false };
    let mut w = std::io::BufWriter::new(File::from(fd));
    fill(&mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    if durable {
        f.sync_all()?;
    }
    Ok(staged)
}

/// A file [`stage_file`]d, not in place yet; dropped without being installed, it goes.
pub(crate) struct StagedFile {
    dir: OwnedFd,
    tmp: String,
    name: String,
    installed: bool,
}

impl StagedFile {
    /// Renames the file into place (its directory is synced by [`StagedFile::sync`], which
    /// needs no lock: a stop before it loses the new file, never leaves half of one).
    pub(crate) fn install(&mut self) -> anyhow::Result<()> {
        rustix::fs::renameat(&self.dir, self.tmp.as_str(), &self.dir, self.name.as_str())?;
        self.installed = true;
        Ok(())
    }

    /// Syncs the directory after [`StagedFile::install`].
    pub(crate) fn sync(&self) -> anyhow::Result<()> {
        Ok(rustix::fs::fsync(&self.dir)?)
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.installed {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), rustix::fs::AtFlags::empty());
        }
    }
}

/// A deletion by merge between the swap of the merged layer into place and the commit.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Merging {
    /// The snapshot whose layer gets the merged one.
    pub into: u64,
    /// The snapshot being deleted.
    pub drop: u64,
    /// The inode of the merged layer dir (to tell whether the swap happened).
    pub merged: u64,
}

pub(crate) const MERGING: &str = "delete-in-progress.json";

/// The delete journal of the store dir `root`, if there is one, and whether its swap happened
/// (`layers/INTO` is the merged dir): then the next open finishes the delete, else it undoes it.
pub(crate) fn pending_delete(root: BorrowedFd<'_>, layers: BorrowedFd<'_>) -> anyhow::Result<Option<(Merging, bool)>> {
    let fd = match rustix::fs::openat(root, MERGING, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let m: Merging =
        serde_json::from_str(&std::io::read_to_string(File::from(fd))?).context("reading delete-in-progress.json")?;
    let swapped = rustix::fs::statat(layers, m.into.to_string().as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_ino == m.merged);
    Ok(Some((m, swapped)))
}

/// Whether the delete journal of the store dir `root` is there but empty: what a stop between
/// creating it and its one write leaves. The journal comes before the swap, so nothing was
/// swapped yet: the next open removes it (and `clean` the merged layer that was being built).
pub(crate) fn delete_journal_cut_short(root: BorrowedFd<'_>) -> bool {
    rustix::fs::statat(root, MERGING, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_size == 0)
}

impl Store {
    /// Deletes snapshot `id` from the list and removes its layer. For the oldest snapshot that
    /// is all; otherwise `merged` (a dir in `layers/`, built by the caller) first replaces the
    /// next older snapshot's layer, in one atomic swap. The list is the commit point; a crash
    /// before it leaves the snapshot as it was, after it the next open finishes the cleanup.
    pub fn delete(&mut self, id: u64, merged: Option<(u64, &str)>) -> anyhow::Result<()> {
        if let Some(tags) = self.meta.holds.get(&id) {
            bail!(
                "snapshot id {id} is held ({}): it cannot be deleted",
                tags.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if let Some((into, name)) = merged {
            let ino = rustix::fs::statat(&self.layers, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?.st_ino;
            self.write_json(MERGING, &Merging { into, drop: id, merged: ino })?;
            rustix::fs::renameat_with(
                &self.layers,
                name,
                &self.layers,
                into.to_string().as_str(),
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .context("swapping the merged layer into place")?;
        }
        self.commit_in_place(Change::Delete(id))?;
        let _ = rustix::fs::unlinkat(&self.root, MERGING, rustix::fs::AtFlags::empty());
        // The dropped layer, and after a merge the older layer's old dir swapped out: those
        // alone, not a listing of every layer (`clean`, at the next open, takes what a stop
        // here leaves). The snapshot is deleted already: a failure only leaves a dir behind.
        let swapped_out = merged.map(|(_, name)| name.to_owned());
        for name in std::iter::once(id.to_string()).chain(swapped_out) {
            let removed = sys::name_cstr(std::ffi::OsStr::new(&name))
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(sys::remove_tree_at(&self.layers, &c)?));
            if let Err(e) = removed {
                tracing::warn!(name, "a deleted snapshot's layer dir stays until the next mount: {e:#}");
            }
        }
        Ok(())
    }

    /// Finishes or undoes a deletion a crash interrupted (see [`Store::delete`]).
    fn recover_delete(&mut self) -> anyhow::Result<()> {
        if delete_journal_cut_short(self.root.as_fd()) {
            tracing::warn!("removing an empty {MERGING}: a stop while it was written, before the swap");
            rustix::fs::unlinkat(&self.root, MERGING, rustix::fs::AtFlags::empty())?;
            return Ok(());
        }
        let Some((m, swapped)) = pending_delete(self.root.as_fd(), self.layers.as_fd())? else { return Ok(()) };
        if swapped && self.info(m.drop).is_some() {
            tracing::info!(id = m.drop, "finishing a snapshot deletion interrupted by a stop");
            let mut meta = self.meta.clone();
            meta.snapshots.retain(|s| s.id != m.drop);
            meta.damage.remove(&m.drop);
            self.commit(meta, Some(Change::Delete(m.drop)))?;
        }
        rustix::fs::unlinkat(&self.root, MERGING, rustix::fs::AtFlags::empty())?;
        Ok(())
    }

    /// Writes `value` as `name` in the store dir, durably.
    fn write_json(&self, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
        let fd = rustix::fs::openat(
            &self.root,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut f = File::from(fd);
        f.write_all(&serde_json::to_vec(value)?)?;
        f.sync_all()?;
        Ok(())
    }

    /// A fresh empty dir `views/TOKEN` to build the consolidated top layer of a view too deep
    /// for the kernel in (`Snapper::view_layers`); first removes the older ones no mount uses.
    pub fn consolidation_dir(&self, token: &str) -> anyhow::Result<OwnedFd> {
        let views = mkdir_open(self.root.as_fd(), VIEWS, 0o700)?;
        self.clean_views(&views)?;
        rustix::fs::mkdirat(&views, token, Mode::from_raw_mode(0o755))?;
        Ok(open_dir_at(views.as_fd(), token)?)
    }

    /// Removes the consolidated layers no mount uses (see [`Store::consolidation_dir`]).
    pub fn clean_unused_views(&self) -> anyhow::Result<()> {
        match open_dir_at(self.root.as_fd(), VIEWS) {
            Ok(views) => self.clean_views(&views),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the consolidated layers in `views/` that no mount on this machine uses: a kernel
    /// mount names each layer by its path, which mountinfo shows (`.../views/TOKEN`).
    fn clean_views(&self, views: &OwnedFd) -> anyhow::Result<()> {
        let info = ovl_fs::mount::read_mountinfo()?;
        for e in sys::read_dir_fd(rustix::io::dup(views)?)? {
            let Some(token) = e.name.to_str() else { continue };
            let needle = format!("/{VIEWS}/{token}");
            if !info.lines().any(|l| l.split(&[',', ':', ' ']).any(|w| w.ends_with(&needle))) {
                tracing::info!(token, "removing a consolidated view layer no mount uses");
                sys::remove_tree_at(views, &sys::name_cstr(&e.name)?)?;
            }
        }
        Ok(())
    }

    /// A fresh empty dir in `layers/` to build a merged layer in; its name.
    pub fn merge_dir(&self, into: u64) -> anyhow::Result<(String, OwnedFd)> {
        let name = format!("{into}.merging");
        let _ = sys::remove_tree_at(&self.layers, &sys::name_cstr(std::ffi::OsStr::new(&name))?);
        rustix::fs::mkdirat(&self.layers, name.as_str(), Mode::from_raw_mode(0o755))?;
        let fd = open_dir_at(self.layers.as_fd(), &name)?;
        Ok((name, fd))
    }
}

/// The snapshots of the store dir `root` with their usage, read without taking the lock (for
/// `ovlsnap list` when no daemon runs).
pub fn list_offline(root: &OwnedFd) -> anyhow::Result<Vec<crate::snapper::Listed>> {
    let meta = read_meta(root.as_fd())?.context("the store has no snapshots.json")?;
    let layers = open_dir_at(root.as_fd(), "layers")?;
    // The summaries that fit their layers (the newest has none: it may still be written to).
    let mut holders = ovl_core::presence::Holders::default();
    for s in &meta.snapshots {
        let l = open_dir_at(layers.as_fd(), &s.id.to_string())?;
        if let Some(summary) = crate::summary::load(root.as_fd(), s.id, l.as_fd()) {
            holders.add(s.id, &summary);
        }
    }
    crate::snapper::list_of(
        &meta.snapshots,
        &holders,
        |id| Ok(open_dir_at(layers.as_fd(), &id.to_string())?),
        |id| meta.damage.get(&id).cloned(),
        |id| meta.holds.get(&id).map(|t| t.iter().cloned().collect()).unwrap_or_default(),
        |id| crate::summary::load_refer(root.as_fd(), id),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(logged: u64, names: &[(u64, &str)]) -> Meta {
        Meta {
            version: META_VERSION,
            logged,
            live: LiveId { fs: "0".repeat(32), ino: 2 },
            next_id: names.last().map_or(1, |(id, _)| id + 1),
            snapshots: names
                .iter()
                .map(|(id, n)| SnapshotInfo { id: *id, name: n.to_string(), created: 7, ..Default::default() })
                .collect(),
            allow: Vec::new(),
            userxattr: false,
            damage: Default::default(),
            holds: Default::default(),
        }
    }

    fn line(seq: u64, change: Change) -> String {
        format!("{}\n", serde_json::to_string(&LogRecord { seq, change }).unwrap())
    }

    fn add(id: u64, name: &str) -> Change {
        Change::Add(SnapshotInfo { id, name: name.to_string(), created: 9, ..Default::default() })
    }

    fn names(m: &Meta) -> Vec<&str> {
        m.snapshots.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_log_replays_onto_its_checkpoint_skipping_what_it_holds() {
        let log =
            [line(4, add(3, "c")), line(5, add(4, "d")), line(6, Change::Delete(1)), line(7, add(5, "e"))].concat();
        // A checkpoint written after record 5: records 4 and 5 are in it already.
        let mut m = meta(5, &[(1, "a"), (3, "c"), (4, "d")]);
        let st = replay(&mut m, log.as_bytes(), false).unwrap();
        assert_eq!(names(&m), ["c", "d", "e"]);
        assert_eq!((st.last, st.records, st.torn, st.len), (7, 2, false, log.len() as u64));
        assert_eq!(m.next_id, 6);
    }

    #[test]
    fn a_line_cut_short_at_the_end_is_dropped_and_one_before_it_is_corruption() {
        let whole = [line(1, add(1, "a")), line(2, add(2, "b"))].concat();
        for cut in [&line(3, add(3, "c"))[..20], "{\"seq\":3,\"add\":{\"id\":3}}\n", "\0\0\0\0"] {
            let mut m = meta(0, &[]);
            let st = replay(&mut m, format!("{whole}{cut}").as_bytes(), false).unwrap();
            assert_eq!(names(&m), ["a", "b"], "{cut:?}");
            assert_eq!((st.last, st.len, st.torn), (2, whole.len() as u64, true), "{cut:?}");
        }
        let bad = format!("{}{{\"seq\":2,\"add\n{}", line(1, add(1, "a")), line(3, add(3, "c")));
        let e = replay(&mut meta(0, &[]), bad.as_bytes(), false).unwrap_err();
        assert!(format!("{e:#}").contains("corrupt"), "{e:#}");
        // A repair reads what comes before it.
        let mut m = meta(0, &[]);
        let st = replay(&mut m, bad.as_bytes(), true).unwrap();
        assert_eq!((names(&m), st.torn, st.seen), (vec!["a"], true, 1));
    }

    #[test]
    fn records_that_do_not_fit_the_list_are_refused() {
        let cases = [
            ("a gap", [line(1, add(1, "a")), line(3, add(2, "b"))].concat()),
            ("a name twice", [line(1, add(1, "a")), line(2, add(2, "a"))].concat()),
            ("an id that goes back", [line(1, add(5, "a")), line(2, add(4, "b"))].concat()),
            ("a delete of nothing", [line(1, Change::Delete(9)), line(2, add(1, "b"))].concat()),
            ("an invalid name", [line(1, add(1, "x/y")), line(2, add(2, "b"))].concat()),
        ];
        for (what, log) in cases {
            // (Followed by a line: a bad last line is taken for one cut short.)
            let log = format!("{log}{}", line(3, add(9, "z")));
            assert!(replay(&mut meta(0, &[]), log.as_bytes(), false).is_err(), "{what}");
        }
    }

    #[test]
    fn a_checkpoint_of_a_newer_format_is_refused() {
        let mut m = meta(3, &[(1, "a")]);
        assert!(parse_meta(&serde_json::to_string(&m).unwrap()).is_ok());
        m.version = META_VERSION + 1;
        let e = parse_meta(&serde_json::to_string(&m).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("format version"), "{e:#}");
    }
}
