//! Files that are open (or mapped) across a take, and the CLI's answers to bad input.
//!
//! The point-in-time rule of DESIGN §4: every write whose syscall returned before `take` started
//! is in the snapshot; none that started after `take` returned is, also when it goes through a
//! descriptor or a shared mapping that was set up before the take. Each snapshot is checked
//! through `MNT/.snapshots/NAME` and through the stock kernel overlay (`ovlsnap mount-cmd`).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

/// Reads a whole file through `path`.
fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Reads an open file from its start (not moving its offset).
fn read_all_at(f: &File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).expect("pread");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Shows bytes as text in assertion messages.
fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Mounts snapshot `name` with the kernel at a fresh dir and returns the guard.
fn kernel_view(snap: &SnapMount, name: &str) -> KernelMount {
    let dir = snap.scratch().mkdir(&format!("kernel-{name}"));
    KernelMount::snapshot(snap, name, &dir)
}

/// A file held open `O_RDWR` across `take s1`: one that existed in LIVE before the mount, one
/// created through MNT. Before the take each gets "before" (no fsync: the take must flush what
/// the writer's syscalls returned); after it "after" at the fd's offset and "B" at offset 0.
fn writer_across_take(form: Form) {
    let snap = SnapMount::start(form, |live| fs::write(live.join("old"), b"0123456789").unwrap());
    let mnt = snap.mnt();
    let open_rw = |name: &str| {
        let p = mnt.join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    };
    let mut old = open_rw("old");
    let mut new = open_rw("new");
    old.write_all(b"before").unwrap();
    new.write_all(b"before").unwrap();

    snap.take(Some("s1"));
    let view = snap.view("s1");
    let early_reader = File::open(view.join("old")).expect("open the snapshot's old file");
    let early_reader_new = File::open(view.join("new")).expect("open the snapshot's new file");

    for f in [&mut old, &mut new] {
        f.write_all(b"after").unwrap();
        f.write_all_at(b"B", 0).unwrap();
        f.sync_all().unwrap();
    }
    let (old_snap, new_snap): (&[u8], &[u8]) = (b"before6789", b"before");
    let live_now = b"Beforeafter";
    assert_eq!(text(&read_all_at(&early_reader)), text(old_snap), "reader of s1/old opened before the second write");
    assert_eq!(
        text(&read_all_at(&early_reader_new)),
        text(new_snap),
        "reader of s1/new opened before the second write"
    );
    let check = |when: &str| {
        assert_eq!(text(&read(&view.join("old"))), text(old_snap), "{when}: .snapshots/s1/old");
        assert_eq!(text(&read(&view.join("new"))), text(new_snap), "{when}: .snapshots/s1/new");
        assert_eq!(text(&read(&mnt.join("old"))), text(live_now), "{when}: MNT/old");
        assert_eq!(text(&read(&mnt.join("new"))), text(live_now), "{when}: MNT/new");
        if form == Form::Separate {
            assert_eq!(text(&read(&snap.live().join("old"))), text(live_now), "{when}: LIVE/old (directly)");
        }
    };
    check("writers still open");
    drop((old, new));
    check("writers closed");
    let k = kernel_view(&snap, "s1");
    assert_eq!(text(&read(&k.path().join("old"))), text(old_snap), "kernel view of s1: old");
    assert_eq!(text(&read(&k.path().join("new"))), text(new_snap), "kernel view of s1: new");
}

#[test]
fn writer_fd_across_take_stacked() {
    writer_across_take(Form::Stacked);
}

#[test]
fn writer_fd_across_take_separate() {
    writer_across_take(Form::Separate);
}

/// A `MAP_SHARED` writable mapping of a file opened through MNT across `take s1`: bytes stored
/// (on two pages) and msynced before the take are in the snapshot, the ones stored after are not.
fn mapping_across_take(form: Form) {
    const LEN: usize = 3 * 4096;
    let snap = SnapMount::start(form, |live| fs::write(live.join("m"), vec![b'.'; LEN]).unwrap());
    let path = snap.mnt().join("m");
    let f = OpenOptions::new().read(true).write(true).open(&path).expect("open through MNT");
    let mut map = SharedMap::new(&f, LEN).expect("mmap MAP_SHARED through MNT");
    let with = |a: &[u8], b: &[u8]| {
        let mut v = vec![b'.'; LEN];
        v[..a.len()].copy_from_slice(a);
        v[5000..5000 + b.len()].copy_from_slice(b);
        v
    };
    map.write(0, b"first");
    map.write(5000, b"FIRST");
    map.sync().expect("msync");

    snap.take(Some("s1"));
    map.write(0, b"second");
    map.write(5000, b"SECOND");
    map.sync().expect("msync");
    assert_eq!(map.to_vec(), with(b"second", b"SECOND"), "the mapping reads back its own stores");
    drop(map);
    drop(f);

    let (want_snap, want_live) = (with(b"first", b"FIRST"), with(b"second", b"SECOND"));
    let view = snap.view("s1").join("m");
    assert!(read(&view) == want_snap, "{}: want the first stores, got {:?}", view.display(), text(&read(&view)[..16]));
    assert!(read(&path) == want_live, "{}: want the second stores, got {:?}", path.display(), text(&read(&path)[..16]));
    let k = kernel_view(&snap, "s1");
    assert!(read(&k.path().join("m")) == want_snap, "kernel view of s1 differs from the first stores");
}

#[test]
fn shared_mapping_across_take_stacked() {
    mapping_across_take(Form::Stacked);
}

#[test]
fn shared_mapping_across_take_separate() {
    mapping_across_take(Form::Separate);
}

#[test]
fn take_with_an_existing_name_fails_and_keeps_the_snapshot() {
    let snap = SnapMount::start(Form::Stacked, |live| fs::write(live.join("f"), b"one").unwrap());
    snap.take(Some("s1"));
    fs::write(snap.mnt().join("f"), b"two").unwrap();
    let out = snap.try_take(Some("s1"));
    let err = out.expect_failure("take of an existing name");
    assert!(err.contains("s1") || err.to_lowercase().contains("exist"), "the error should name the clash\n{out}");
    let names: Vec<String> = snap.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1"], "list after the refused take");
    assert_eq!(snap.listed_views(), ["s1"], "ls .snapshots after the refused take");
    assert_eq!(text(&read(&snap.view("s1").join("f"))), "one", "s1 after the refused take");
    // The refused take must not have started a new layer that later changes are saved into.
    fs::write(snap.mnt().join("f"), b"three").unwrap();
    fs::write(snap.mnt().join("g"), b"new").unwrap();
    assert_eq!(text(&read(&snap.view("s1").join("f"))), "one", "s1 after more changes");
    assert!(!snap.view("s1").join("g").exists(), "a file made after s1 shows in s1");
    let k = kernel_view(&snap, "s1");
    assert_eq!(names_in(k.path()), ["f"], "kernel view of s1");
    assert_eq!(text(&read(&k.path().join("f"))), "one", "kernel view of s1: f");
}

#[test]
fn mount_of_a_regular_file_fails() {
    let scratch = Scratch::new();
    let file = scratch.path().join("live");
    fs::write(&file, b"not a dir").unwrap();
    let out = ovlsnap(&[OsStr::new("mount"), file.as_os_str()]);
    out.expect_failure("mount of a regular file");
    assert!(mounts_at(&file).is_empty(), "something got mounted at {}\n{out}", file.display());
    let mnt = scratch.mkdir("mnt");
    let out = ovlsnap(&[OsStr::new("mount"), file.as_os_str(), mnt.as_os_str()]);
    out.expect_failure("mount of a regular file at a separate MNT");
    assert!(mounts_at(&mnt).is_empty(), "something got mounted at {}\n{out}", mnt.display());
    assert_eq!(read(&file), b"not a dir", "the file was changed");
    let left = processes_using(scratch.path());
    assert!(left.is_empty(), "failed mounts left processes behind: {left:?}");
}

/// A second `ovlsnap mount` of a LIVE that is already served (stacked over LIVE and at another
/// MNT) fails, saying which daemon serves LIVE where, starts nothing, and the first mount keeps
/// working.
fn second_mount_is_refused(form: Form) {
    let snap = SnapMount::start(form, |live| fs::write(live.join("f"), b"one").unwrap());
    let before = processes_using(snap.scratch().path());
    let live = snap.live().as_os_str();
    let mnt2 = snap.scratch().mkdir("mnt2");
    for args in [vec![OsStr::new("mount"), live], vec![OsStr::new("mount"), live, mnt2.as_os_str()]] {
        let out = ovlsnap(&args);
        let err = out.expect_failure("second mount of the same LIVE");
        // Issue 21: the stacked case said ".snapshots is reserved"; both say who serves LIVE.
        let at = format!("at {:?}", snap.mnt());
        assert!(err.contains("is already served by the ovlsnap daemon") && err.contains(&at), "{err}");
        let expected_at_live = if form == Form::Stacked { 1 } else { 0 };
        assert_eq!(mounts_at(snap.live()).len(), expected_at_live, "mounts at LIVE after the refused mount\n{out}");
        assert!(mounts_at(&mnt2).is_empty(), "the refused mount mounted {}\n{out}", mnt2.display());
        assert!(is_fuse_mount(snap.mnt()), "the first mount is gone\n{out}");
        assert_eq!(processes_using(snap.scratch().path()), before, "processes after the refused mount\n{out}");
    }
    let f = snap.mnt().join("f");
    assert_eq!(text(&read(&f)), "one");
    fs::write(&f, b"two").unwrap();
    snap.take(Some("s1"));
    fs::write(&f, b"three").unwrap();
    assert_eq!(text(&read(&snap.view("s1").join("f"))), "two", "s1 taken after the refused mount");
    assert_eq!(text(&read(&f)), "three", "MNT after the refused mount");
}

#[test]
fn second_mount_is_refused_stacked() {
    second_mount_is_refused(Form::Stacked);
}

#[test]
fn second_mount_is_refused_separate() {
    second_mount_is_refused(Form::Separate);
}

#[test]
fn store_on_another_filesystem_is_refused() {
    let scratch = Scratch::new();
    let live = scratch.mkdir("live");
    fs::write(live.join("f"), b"one").unwrap();
    let mnt = scratch.mkdir("mnt");
    let other = scratch.mkdir("other");
    let _tmpfs = KernelMount::tmpfs(&other);
    let store = other.join("store");
    fs::create_dir(&store).unwrap();
    for separate in [false, true] {
        let mut args = vec![OsStr::new("mount"), OsStr::new("--store"), store.as_os_str(), live.as_os_str()];
        if separate {
            args.push(mnt.as_os_str());
        }
        let out = ovlsnap(&args);
        out.expect_failure("--store on another filesystem");
        assert!(mounts_at(&live).is_empty() && mounts_at(&mnt).is_empty(), "it mounted anyway\n{out}");
        let left = processes_using(scratch.path());
        assert!(left.is_empty(), "the refused mount left processes: {left:?}\n{out}");
    }
    assert_eq!(names_in(&live), ["f"], "LIVE after the refused mounts");
    // Control: the same LIVE mounts with a store on its own filesystem, so the refusals above
    // were about the store's filesystem.
    let store2 = scratch.mkdir("store2");
    let out = ovlsnap(&[OsStr::new("mount"), OsStr::new("--store"), store2.as_os_str(), live.as_os_str()]);
    out.expect_ok("control: --store on LIVE's filesystem");
    assert!(is_fuse_mount(&live), "control: no FUSE mount at LIVE\n{out}");
    ovlsnap(&[OsStr::new("umount"), live.as_os_str()]).expect_ok("control: umount");
}

#[test]
fn store_elsewhere_on_the_same_filesystem() {
    let mut snap = SnapMount::prepare(Form::Stacked);
    let store = snap.scratch().mkdir("store");
    snap.set_store(store.clone());
    fs::write(snap.live().join("f"), b"one").unwrap();
    snap.mount();
    check_hidden_names(snap.mnt());
    snap.take(Some("s1"));
    fs::write(snap.mnt().join("f"), b"two").unwrap();
    assert_eq!(text(&read(&snap.view("s1").join("f"))), "one");
    snap.umount();
    assert_eq!(names_in(snap.live()), ["f"], "LIVE holds no store of its own with --store");
    assert!(!names_in(&store).is_empty(), "the store dir is empty after a take");
    snap.mount();
    let names: Vec<String> = snap.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1"], "snapshots after the remount with --store");
    assert_eq!(text(&read(&snap.view("s1").join("f"))), "one", "s1 after the remount");
    assert_eq!(text(&read(&snap.mnt().join("f"))), "two", "MNT after the remount");
}

#[test]
fn commands_against_a_plain_dir_say_there_is_no_daemon() {
    let scratch = Scratch::new();
    let plain = scratch.mkdir("plain");
    for args in [vec!["take", "x", "--mount"], vec!["take", "--mount"], vec!["list", "--json", "--mount"]] {
        let mut args: Vec<&OsStr> = args.into_iter().map(OsStr::new).collect();
        args.push(plain.as_os_str());
        let out = ovlsnap(&args);
        let err = out.expect_failure("a command against a plain dir");
        assert!(err.to_lowercase().contains("daemon"), "the error should say there is no daemon\n{out}");
    }
    assert!(names_in(&plain).is_empty(), "the plain dir was written to");
}

#[test]
fn snapshot_views_are_read_only() {
    let snap = SnapMount::start(Form::Separate, |live| {
        fs::write(live.join("f"), b"one").unwrap();
        fs::create_dir(live.join("d")).unwrap();
    });
    snap.take(Some("s1"));
    let view = snap.view("s1");
    let before = record_tree(&view);
    let f = view.join("f");
    let attempts: Vec<(&str, std::io::Result<()>)> = vec![
        ("create", File::create(view.join("new")).map(drop)),
        ("open for writing", OpenOptions::new().write(true).open(&f).map(drop)),
        ("truncate", OpenOptions::new().write(true).truncate(true).open(&f).map(drop)),
        ("mkdir", fs::create_dir(view.join("nd"))),
        ("unlink", fs::remove_file(&f)),
        ("rmdir", fs::remove_dir(view.join("d"))),
        ("rename", fs::rename(&f, view.join("g"))),
        ("chmod", fs::set_permissions(&f, fs::Permissions::from_mode(0o600))),
        ("symlink", std::os::unix::fs::symlink("f", view.join("l"))),
        ("link", fs::hard_link(&f, view.join("h"))),
        ("setxattr", rustix::fs::lsetxattr(&f, "user.k", b"v", rustix::fs::XattrFlags::empty()).map_err(Into::into)),
    ];
    for (what, r) in attempts {
        assert!(r.is_err(), "{what} in the snapshot view {} succeeded", view.display());
    }
    assert_same_tree(&before, &record_tree(&view), "s1 after refused writes");
    assert_eq!(names_in(snap.mnt()), ["d", "f"], "the refused writes reached MNT");
    let missing = snap.view("no-such-snapshot");
    match fs::symlink_metadata(&missing) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        other => panic!("lookup of {} must fail with ENOENT, got {other:?}", missing.display()),
    }
    let mut buf = String::new();
    File::open(&f).unwrap().read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "one");
}
