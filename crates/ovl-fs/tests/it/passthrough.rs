//! FUSE passthrough (issue 7): files whose data is in the upper layer are read and written by
//! the kernel straight from the upper file. These tests check that what goes through a
//! passthrough descriptor is what every other reader sees (another descriptor, a mapping, a
//! mount without passthrough, a remount, the upper file itself), that sizes follow appends and
//! truncates, and that no open fails where passthrough and daemon-served opens of one file meet
//! (the kernel refuses to mix them on one inode; see `src/passthrough.rs`).
//!
//! The daemon runs with `RUST_LOG=ovl_fs::passthrough=debug`, which logs how each open is
//! served; the tests read that log to know that passthrough really was used.

#[allow(dead_code)] // shared with snap-cli's tests, which use all of it
#[path = "../../../snap-cli/tests/it/common/sys/mod.rs"]
mod sys;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{Backend, Layers, MountGuard, apply_fixture, mount_point, tempdir};

const FIXTURE: &str = "
l1 file low.txt lower-data
l1 file dir/low2.txt second
";

const DEBUG: &[(&str, &str)] =
    &[("RUST_LOG", "ovl_fs::passthrough=debug"), ("NO_COLOR", "1"), ("OVLFS_PASSTHROUGH", "1")];

/// How many opens the daemon logged as passed through and as served by itself.
fn served(m: &MountGuard) -> (usize, usize) {
    let log = m.log_text();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    (count("passthrough=true"), count("passthrough=false"))
}

/// Opens `path` read-only until an open passes through: a release reaches the daemon after
/// `close` returns, and until it does, the daemon serves new opens as the old one was served.
fn open_until_passthrough(m: &MountGuard, path: &Path) -> File {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = served(m).0;
        let f = File::open(path).unwrap();
        if served(m).0 > before {
            return f;
        }
        assert!(Instant::now() < deadline, "no passthrough open of {}\n{}", path.display(), m.log_tail());
        drop(f);
        std::thread::sleep(Duration::from_millis(5));
        // A node once opened through the page cache stays there until the kernel forgets it
        // (src/passthrough.rs): let the kernel drop unused inodes. Machine-wide, while the other
        // tests of this binary run: like memory pressure, it must not change what they see.
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    }
}

fn setup(name: &str) -> (tempfile::TempDir, Layers) {
    let tmp = tempdir(name);
    let layers = Layers::create(&tmp.path().join("layers"), 1);
    apply_fixture(&layers, FIXTURE);
    (tmp, layers)
}

#[test]
fn passthrough_writes_are_seen_by_every_reader() {
    let (tmp, layers) = setup("ovl-pt-readers-");
    let mnt = mount_point(tmp.path(), "mnt");
    let m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, DEBUG);
    let path = mnt.join("new.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

    let mut w = File::create(&path).unwrap();
    w.write_all(&data).unwrap();
    // Another descriptor, opened while the writer is open, reads what it wrote.
    let mut r = File::open(&path).unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    assert_eq!(back, data, "second descriptor");
    assert_eq!(fs::metadata(&path).unwrap().len(), data.len() as u64, "size while open");
    // Appends move the size; the kernel and the daemon agree on it.
    let mut a = OpenOptions::new().append(true).open(&path).unwrap();
    a.write_all(b"tail").unwrap();
    assert_eq!(a.metadata().unwrap().len(), data.len() as u64 + 4, "fstat after append");
    assert_eq!(fs::metadata(&path).unwrap().len(), data.len() as u64 + 4, "stat after append");
    drop((w, r, a));
    // Truncate through the mount, with and without a descriptor.
    let t = OpenOptions::new().write(true).open(&path).unwrap();
    t.set_len(1000).unwrap();
    assert_eq!(t.metadata().unwrap().len(), 1000, "ftruncate");
    drop(t);
    assert_eq!(fs::read(&path).unwrap(), &data[..1000], "after ftruncate");
    fs::write(&path, b"rewritten").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"rewritten", "O_TRUNC rewrite");
    // The upper file itself holds it.
    assert_eq!(fs::read(layers.upper.join("new.bin")).unwrap(), b"rewritten", "upper file");
    // O_DIRECT reads (the upper fs is ext4 or like it) see it too.
    let mut d = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
    let mut aligned = AlignedBuf::new(4096);
    let n = d.read(aligned.as_mut()).unwrap();
    assert_eq!(&aligned.as_mut()[..n], b"rewritten", "O_DIRECT read");
    drop(d);

    let (pass, _) = served(&m);
    assert!(pass >= 5, "expected passthrough opens, log:\n{}", m.log_tail());
    m.unmount().unwrap();

    // A mount whose daemon serves every open, and a plain remount, read the same bytes.
    let m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, &[("OVLFS_PASSTHROUGH", "0")]);
    assert_eq!(fs::read(&path).unwrap(), b"rewritten", "daemon-served read");
    m.unmount().unwrap();
    let m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, DEBUG);
    assert_eq!(fs::read(&path).unwrap(), b"rewritten", "after remount");
    assert_eq!(served(&m), (1, 0), "{}", m.log_tail());
    drop(m);
}

#[test]
fn lower_descriptors_and_copy_up_never_mix_modes() {
    let (tmp, layers) = setup("ovl-pt-copyup-");
    let mnt = mount_point(tmp.path(), "mnt");
    let m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, DEBUG);
    let path = mnt.join("low.txt");

    // Read-only on the lower file: served by the daemon (it may have to switch to the copy).
    let mut lower = File::open(&path).unwrap();
    let mut s = String::new();
    lower.read_to_string(&mut s).unwrap();
    assert_eq!(s, "lower-data\n");
    // A write-open copies up; with the lower descriptor open it must be served the same way.
    let w = OpenOptions::new().write(true).open(&path).unwrap();
    w.write_all_at(b"UPPER", 0).unwrap();
    // Another open meanwhile also succeeds, and everyone sees the new data.
    let mut third = File::open(&path).unwrap();
    let mut t = String::new();
    third.read_to_string(&mut t).unwrap();
    assert_eq!(t, "UPPER-data\n", "third descriptor");
    let mut again = String::new();
    lower.seek(SeekFrom::Start(0)).unwrap();
    lower.read_to_string(&mut again).unwrap();
    assert_eq!(again, "UPPER-data\n", "descriptor opened before the copy-up");
    assert_eq!(served(&m), (0, 3), "all three opens served by the daemon\n{}", m.log_tail());
    drop((lower, w, third));

    // All closed (and the node forgotten): later opens pass through and see the same bytes, and writes through them
    // reach every later reader.
    let first = open_until_passthrough(&m, &path);
    let mut buf = [0u8; 10];
    first.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"UPPER-data", "passthrough read after daemon-served writes");
    let pt = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    pt.write_all_at(b"again", 5).unwrap();
    first.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"UPPERagain", "other passthrough descriptor");
    drop((first, pt));
    assert_eq!(fs::read_to_string(&path).unwrap(), "UPPERagain\n");
    drop(m);
}

#[test]
fn mmap_writes_through_passthrough_are_read_back() {
    let (tmp, layers) = setup("ovl-pt-mmap-");
    let mnt = mount_point(tmp.path(), "mnt");
    let m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, DEBUG);
    let path = mnt.join("mapped.bin");
    const LEN: usize = 3 * 4096;
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(LEN as u64).unwrap();
    let mut map = sys::SharedMap::new(&f, LEN).expect("mmap through the mount");
    map.write(4096 + 10, b"mapped-bytes");
    // Another descriptor sees the stores at once (one page cache: the upper file's).
    let other = File::open(&path).unwrap();
    let mut buf = [0u8; 12];
    other.read_exact_at(&mut buf, 4096 + 10).unwrap();
    assert_eq!(&buf, b"mapped-bytes", "read while mapped");
    map.sync().unwrap();
    drop(map);
    drop((f, other));
    let all = fs::read(&path).unwrap();
    assert_eq!(all.len(), LEN);
    assert_eq!(&all[4096 + 10..4096 + 22], b"mapped-bytes");
    assert_eq!(&fs::read(layers.upper.join("mapped.bin")).unwrap()[4096 + 10..4096 + 22], b"mapped-bytes");
    assert!(served(&m).0 >= 3, "{}", m.log_tail());
    m.unmount().unwrap();
    let _m = MountGuard::mount(Backend::Ovlfs, &layers, "", &mnt);
    assert_eq!(&fs::read(&path).unwrap()[4096 + 10..4096 + 22], b"mapped-bytes", "after remount");
}

#[test]
fn racing_opens_around_a_copy_up_all_succeed() {
    let (tmp, layers) = setup("ovl-pt-race-");
    let mnt = mount_point(tmp.path(), "mnt");
    let _m = MountGuard::mount_env(Backend::Ovlfs, &layers, "", &mnt, DEBUG);
    let path = mnt.join("dir/low2.txt");
    std::thread::scope(|s| {
        for t in 0..6 {
            let path = &path;
            s.spawn(move || {
                for i in 0..150 {
                    let res = if (i + t) % 3 == 0 {
                        OpenOptions::new().write(true).open(path).and_then(|f| f.write_all_at(b"s", 0))
                    } else {
                        File::open(path).and_then(|mut f| {
                            let mut v = Vec::new();
                            f.read_to_end(&mut v).map(|_| ())
                        })
                    };
                    res.unwrap_or_else(|e| panic!("thread {t} round {i}: {e}"));
                }
            });
        }
    });
    assert_eq!(fs::read_to_string(&path).unwrap(), "second\n");
}

/// A page-aligned buffer for `O_DIRECT`.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + 4096];
        let start = bytes.as_ptr().align_offset(4096);
        Self { bytes, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}
