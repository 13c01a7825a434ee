//! The first change of a big file after a take (issue 16, item 6): its old content is copied
//! into the snapshot's layer, which on a filesystem without reflinks takes seconds for a file of
//! a GiB. Only changes of that same file may wait for the copy: creating, writing and reading
//! elsewhere in LIVE, reading a view and taking the next snapshot go on meanwhile. And whatever
//! ran during the copy, every snapshot shows the file as it was at its take.
//!
//! Each test starts the big write in a thread, waits until the daemon's copy is seen running
//! (an unnamed file of the store open in the daemon, `/proc/PID/fd`), runs the other operations,
//! and asserts that they returned before the big write did. The copy must outlast them by far
//! (hundreds of ms against a few ms); a machine that copies the file faster than the test can
//! see fails with a message saying so rather than passing.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// The big file's size: 1 GiB copies in about a second or more here (ext4, no reflink).
const BIG: u64 = 1 << 30;
/// Room each test needs: the file in LIVE and up to two saved copies of it.
const ROOM: u64 = 3 * BIG + (256 << 20);
/// The unit the file is written and checked in.
const CHUNK: usize = 1 << 20;

/// Chunk `i` of the big file as it is at the first take: each 4 KiB block names its offset.
fn chunk(i: u64) -> Vec<u8> {
    let mut out = vec![(i % 251) as u8 + 1; CHUNK];
    for (b, block) in out.chunks_mut(4096).enumerate() {
        let tag = format!("[{:012}]", i * CHUNK as u64 + b as u64 * 4096);
        block[..tag.len()].copy_from_slice(tag.as_bytes());
    }
    out
}

/// Writes the big file at `path` and a small tree beside it.
fn fill(live: &Path) {
    let f = fs::File::create(live.join("big")).expect("create big");
    for i in 0..BIG / CHUNK as u64 {
        f.write_all_at(&chunk(i), i * CHUNK as u64).expect("write big");
    }
    fs::create_dir(live.join("other")).unwrap();
    fs::write(live.join("other/small"), b"small before").unwrap();
}

/// The pid of the daemon serving the scratch dir of `snap`.
fn daemon_pid(snap: &SnapMount) -> i32 {
    let procs = processes_using(snap.scratch().path());
    procs
        .iter()
        .find(|p| p.cmdline.contains("ovlsnap") && !p.cmdline.contains("umount"))
        .unwrap_or_else(|| panic!("no ovlsnap daemon among {procs:?}"))
        .pid
}

/// Whether the daemon `pid` holds an unnamed file of the store open: a copy-up in progress
/// (copies are built as `O_TMPFILE`s in the store's work dir).
fn copying(pid: i32) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.flatten().any(|e| {
        fs::read_link(e.path()).is_ok_and(|t| {
            let t = t.to_string_lossy().into_owned();
            t.contains("/.ovlsnap/work/") && t.ends_with("(deleted)")
        })
    })
}

/// Starts a thread that writes `data` at `offset` of MNT/big; the flag is set when it returned.
fn start_write(mnt: &Path, offset: u64, data: &'static [u8]) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let (path, flag) = (mnt.join("big"), done.clone());
    let t = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(&path).expect("open big for writing");
        f.write_all_at(data, offset).expect("write big");
        flag.store(true, Ordering::SeqCst);
    });
    (t, done)
}

/// Waits until the daemon copies, failing when the write ended first.
fn wait_for_copy(pid: i32, done: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !copying(pid) {
        assert!(
            !done.load(Ordering::SeqCst),
            "the big write finished before its copy was seen: this machine copies {BIG} bytes too fast for this test"
        );
        assert!(Instant::now() < deadline, "no copy seen within 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks that `path` holds the big file as it was at the first take (`changed`: offsets
/// written since, with the bytes there now, instead).
fn check_big(path: &Path, changed: &[(u64, &[u8])]) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    assert_eq!(f.metadata().unwrap().len(), BIG, "{}: size", path.display());
    let mut buf = vec![0u8; CHUNK];
    for i in 0..BIG / CHUNK as u64 {
        let at = i * CHUNK as u64;
        f.read_exact_at(&mut buf, at).unwrap_or_else(|e| panic!("read {} at {at}: {e}", path.display()));
        let mut want = chunk(i);
        for (off, data) in changed {
            if (at..at + CHUNK as u64).contains(off) {
                let o = (off - at) as usize;
                want[o..o + data.len()].copy_from_slice(data);
            }
        }
        if buf != want {
            let first = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("{}: differs at byte {}", path.display(), at + first as u64);
        }
    }
}

/// A view path of `snap`.
fn in_view(snap: &SnapMount, name: &str, rel: &str) -> PathBuf {
    snap.view(name).join(rel)
}

/// While the first write to a 1 GiB file after `take s1` copies it: a create and a first write
/// in another dir, a `stat`, a read of the snapshot's view, a rename, an unlink and `take s2` all
/// return before that write does. (On the build before, each of them waited for the whole copy.) The copy, made
/// for s1 but finished after s2 was taken, is what s2 saves; both views show the old file.
#[test]
fn a_big_copy_blocks_only_its_own_file() {
    let snap = SnapMount::start_with_room(Form::Stacked, ROOM, fill);
    let mnt = snap.mnt().to_owned();
    snap.take(Some("s1"));
    let pid = daemon_pid(&snap);
    let (writer, done) = start_write(&mnt, 4096, b"NEW DATA");
    wait_for_copy(pid, &done);

    fs::write(mnt.join("other/new"), b"made during the copy").expect("create during the copy");
    fs::write(mnt.join("other/small"), b"small after").expect("first write of another file");
    fs::metadata(mnt.join("other/small")).expect("stat during the copy");
    assert_eq!(fs::read(in_view(&snap, "s1", "other/small")).unwrap(), b"small before");
    // A rename and an unlink lock the live overlay's namespace exclusively.
    fs::write(mnt.join("other/gone"), b"x").unwrap();
    fs::rename(mnt.join("other/gone"), mnt.join("other/moved")).expect("rename during the copy");
    fs::remove_file(mnt.join("other/moved")).expect("unlink during the copy");
    let during = [
        ("create, write, stat, view read, rename and unlink", done.load(Ordering::SeqCst)),
        ("take s2", {
            snap.take(Some("s2"));
            done.load(Ordering::SeqCst)
        }),
    ];
    for (what, write_done) in during {
        assert!(!write_done, "{what} waited for the copy of the big file");
    }
    writer.join().expect("writer");

    check_big(&in_view(&snap, "s1", "big"), &[]);
    check_big(&in_view(&snap, "s2", "big"), &[]);
    check_big(&mnt.join("big"), &[(4096, b"NEW DATA")]);
    assert_eq!(fs::read(in_view(&snap, "s2", "other/small")).unwrap(), b"small after");
    assert!(!in_view(&snap, "s1", "other/new").exists());
    assert_eq!(fs::read(in_view(&snap, "s2", "other/new")).unwrap(), b"made during the copy");
}

/// Two writers of the same big file during its copy: the second waits for the one copy, and
/// the snapshot shows neither write; then a rename after the next take saves it for that one.
#[test]
fn writers_of_the_same_file_share_one_copy() {
    let snap = SnapMount::start_with_room(Form::Separate, ROOM, fill);
    let mnt = snap.mnt().to_owned();
    snap.take(Some("s1"));
    let pid = daemon_pid(&snap);
    let (first, done) = start_write(&mnt, 0, b"FIRST");
    wait_for_copy(pid, &done);
    let (second, _) = start_write(&mnt, BIG - 6, b"SECOND");
    first.join().expect("first writer");
    second.join().expect("second writer");
    check_big(&in_view(&snap, "s1", "big"), &[]);
    let written: [(u64, &[u8]); 2] = [(0, b"FIRST"), (BIG - 6, b"SECOND")];
    check_big(&mnt.join("big"), &written);

    // A rename saves the file too (copied ahead the same way).
    snap.take(Some("s2"));
    fs::rename(mnt.join("big"), mnt.join("other/big")).expect("rename big");
    check_big(&in_view(&snap, "s2", "big"), &written);
    check_big(&in_view(&snap, "s1", "big"), &[]);
    assert!(!in_view(&snap, "s2", "other/big").exists());
}
