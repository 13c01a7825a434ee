//! Failures the snapshot store must survive (issue 5, bad input): a full disk during a copy-on-write
//! copy, and a daemon killed with SIGKILL.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;
use rustix::mount::{MountFlags, UnmountFlags};

/// Bytes that differ per seed, so copies cannot be confused.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn append(path: &Path, data: &[u8]) -> std::io::Result<()> {
    OpenOptions::new().append(true).open(path)?.write_all(data)
}

/// Entries left in the store's work dir (half-made copies).
/// What a change left in the store's work dir, besides the shared whiteout new whiteouts are
/// linked from (`#ovl.whiteout`, kept on purpose while mounted).
fn work_leftovers(live: &Path) -> Vec<String> {
    let mut names = names_in(&live.join(".ovlsnap/work/work"));
    names.retain(|n| n != "#ovl.whiteout");
    names
}

#[test]
fn a_full_disk_fails_the_change_and_keeps_the_snapshot() {
    let mut m = SnapMount::prepare(Form::Separate);
    // LIVE on a 6 MiB tmpfs, filled so that the copy a change needs does not fit.
    rustix::mount::mount("tmpfs", m.live(), "tmpfs", MountFlags::empty(), c"size=6m,mode=0755")
        .expect("mount a small tmpfs on LIVE");
    let big = pattern(2 << 20, 7);
    fs::write(m.live().join("big"), &big).unwrap();
    fs::write(m.live().join("small"), b"small\n").unwrap();
    m.mount();
    m.take(Some("s1"));
    let before = record_tree(&m.view("s1"));

    // A new file costs no copy; it fills the disk so the 2 MiB copy of `big` cannot be made.
    let filler = m.mnt().join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let mut written = 0usize;
    let chunk = vec![0x5au8; 64 << 10];
    while written < (5 << 20) {
        match f.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling the disk: {e}");
                break;
            }
        }
    }
    drop(f);
    // Leave less room than `big` needs, but some.
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len((written as u64).saturating_sub(1 << 20))
        .unwrap();

    let err = append(&m.mnt().join("big"), b"more").expect_err("a change whose copy does not fit must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "the change fails with ENOSPC: {err}");
    assert_eq!(fs::read(m.mnt().join("big")).unwrap(), big, "the failed change did not reach LIVE");
    assert_same_tree(&before, &record_tree(&m.view("s1")), "s1 after the failed change");
    assert!(work_leftovers(m.live()).is_empty(), "the failed copy left {:?} in the work dir", work_leftovers(m.live()));

    // With room again the same change goes through, and the snapshot still has the old bytes.
    fs::remove_file(&filler).unwrap();
    // The kernel sends FUSE RELEASE after close(2) returns: the space comes back a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while rustix::fs::statvfs(m.live()).map(|v| v.f_bavail * v.f_frsize).unwrap_or(0) < (5 << 19)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    append(&m.mnt().join("big"), b"more").expect("the change fits now");
    assert_eq!(fs::read(m.mnt().join("big")).unwrap().len(), big.len() + 4);
    assert_same_tree(&before, &record_tree(&m.view("s1")), "s1 after the change");
    let kernel_dir = m.scratch().mkdir("kernel");
    let k = KernelMount::snapshot(&m, "s1", &kernel_dir);
    assert_same_tree(&before, &record_tree(k.path()), "kernel view of s1");
    drop(k);
    m.umount();
    rustix::mount::unmount(m.live(), UnmountFlags::DETACH).expect("unmount the tmpfs");
}

#[test]
fn a_killed_daemon_loses_no_snapshot_and_remount_cleans_up() {
    for form in [Form::Stacked, Form::Separate] {
        let mut m = SnapMount::start(form, |live| {
            fs::create_dir_all(live.join("d/e")).unwrap();
            fs::write(live.join("d/e/f"), b"one\n").unwrap();
            fs::write(live.join("g"), pattern(100_000, 1)).unwrap();
            fs::set_permissions(live.join("g"), fs::Permissions::from_mode(0o640)).unwrap();
        });
        m.take(Some("s1"));
        let s1 = record_tree(m.mnt());
        fs::write(m.mnt().join("d/e/f"), b"two\n").unwrap();
        fs::rename(m.mnt().join("d"), m.mnt().join("d2")).unwrap();
        fs::remove_file(m.mnt().join("g")).unwrap();
        fs::write(m.mnt().join("h"), b"new\n").unwrap();
        m.take(Some("s2"));
        let s2 = record_tree(m.mnt());
        fs::write(m.mnt().join("d2/e/f"), b"three\n").unwrap();
        let live_now = record_tree(m.mnt());

        // The dead mount answers ENOTCONN until it is detached, as for any FUSE daemon.
        m.kill_daemon();
        // What a crash in the middle of a copy or a take leaves: a half-made copy in the work dir
        // and a layer no snapshot owns yet.
        fs::write(m.live().join(".ovlsnap/work/work/#ovl.half-made"), b"partial").unwrap();
        fs::create_dir(m.live().join(".ovlsnap/layers/99")).unwrap();

        m.mount();
        assert_same_tree(&s1, &record_tree(&m.view("s1")), "s1 after the kill and remount");
        assert_same_tree(&s2, &record_tree(&m.view("s2")), "s2 after the kill and remount");
        assert_same_tree(&live_now, &record_tree(m.mnt()), "LIVE after the kill and remount");
        let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s1", "s2"]);
        // Changes after the remount still go through the copy-on-write rules.
        fs::write(m.mnt().join("d2/e/f"), b"four\n").unwrap();
        assert_same_tree(&s2, &record_tree(&m.view("s2")), "s2 after a change following the remount");
        m.umount();
        assert!(work_leftovers(m.live()).is_empty(), "the half-made copy was not removed");
        assert!(!m.live().join(".ovlsnap/layers/99").exists(), "the orphan layer was not removed");
    }
}

/// Layer dirs of the store of `live` (the default store), sorted.
fn layer_dirs(live: &Path) -> Vec<String> {
    names_in(&live.join(".ovlsnap/layers"))
}

/// Issue 16.1: a lost `snapshots.json` used to make the next mount take the store for a new one
/// and remove every layer, silently. Now the mount refuses, nothing is touched, and `check
/// --repair` brings the list back: from its backup, or by adopting the layers.
#[test]
fn a_lost_snapshot_list_refuses_the_mount_and_a_repair_brings_every_snapshot_back() {
    for lose_backup_too in [false, true] {
        let mut m = SnapMount::prepare(Form::Separate);
        fs::write(m.live().join("f"), b"v1\n").unwrap();
        m.mount();
        m.take(Some("s1"));
        fs::write(m.mnt().join("f"), b"v2\n").unwrap();
        m.take(Some("s2"));
        fs::write(m.mnt().join("f"), b"v3\n").unwrap();
        m.umount();
        let store = m.live().join(".ovlsnap");
        let layers = layer_dirs(m.live());
        assert_eq!(layers.len(), 2);
        fs::remove_file(store.join("snapshots.json")).unwrap();
        if lose_backup_too {
            fs::remove_file(store.join("snapshots.json.bak")).unwrap();
        }
        let out = ovlsnap(&m.mount_args());
        let err = out.expect_failure("mount with a lost list");
        assert!(err.contains("missing") && err.contains("check") && err.contains("--repair"), "{out}");
        assert!(!is_fuse_mount(m.mnt()), "a refused mount must not be left mounted");
        assert_eq!(layer_dirs(m.live()), layers, "a refused mount removed layers");

        let check = ovlsnap(&[OsStr::new("check"), m.live().as_os_str()]);
        assert!(!check.success() && check.stdout.contains("snapshot-list-missing"), "{check}");
        ovlsnap(&[OsStr::new("check"), m.live().as_os_str(), OsStr::new("--repair")]).expect_ok("check --repair");
        assert_eq!(layer_dirs(m.live()), layers, "the repair removed layers");
        m.mount();
        let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
        let want = if lose_backup_too { ["recovered-1", "recovered-2"] } else { ["s1", "s2"] };
        assert_eq!(names, want);
        assert_eq!(fs::read(m.view(want[0]).join("f")).unwrap(), b"v1\n");
        assert_eq!(fs::read(m.view(want[1]).join("f")).unwrap(), b"v2\n");
        assert_eq!(fs::read(m.mnt().join("f")).unwrap(), b"v3\n");
        m.umount();
    }
}

/// A corrupt list (a torn or hand-edited file) refuses the mount the same way; the repair
/// restores the backup, which the daemon keeps in step with every change.
#[test]
fn a_corrupt_snapshot_list_refuses_the_mount_and_the_backup_restores_it() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v1\n").unwrap();
    m.mount();
    for n in ["a", "b", "c"] {
        m.take(Some(n));
    }
    ovlsnap(&[OsStr::new("delete"), OsStr::new("b"), OsStr::new("--mount"), m.mnt().as_os_str()]).expect_ok("delete b");
    m.umount();
    let list = m.live().join(".ovlsnap/snapshots.json");
    fs::write(&list, b"{\"version\": 1, \"snap").unwrap();
    let out = ovlsnap(&m.mount_args());
    assert!(out.expect_failure("mount with a corrupt list").contains("--repair"), "{out}");
    ovlsnap(&[OsStr::new("check"), m.live().as_os_str(), OsStr::new("--repair")]).expect_ok("check --repair");
    m.mount();
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "c"], "the backup follows every change, the delete included");
}

/// Issue 16.3: a take whose layer cannot be opened (the daemon's descriptors exhausted) used to
/// fail yet stay recorded, its view then showing data written after it. Now it is taken back:
/// the failed name is not listed, before or after a remount, and every other view is exact.
/// (Snapshot layers no longer use up descriptors, issue 17: files held open through the mount do.)
#[test]
fn a_take_that_cannot_start_its_layer_is_taken_back() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("a"), b"0\n").unwrap();
    // A hard limit the daemon cannot raise.
    m.mount_wrapped(&["prlimit", "--nofile=64:64"]);
    const TAKEN: usize = 10;
    for i in 1..=TAKEN {
        fs::write(m.mnt().join("a"), format!("{i}\n")).unwrap_or_else(|e| panic!("write {i}: {e}"));
        m.take(Some(&format!("t{i}")));
    }
    // Files held open through the mount, until the daemon has no descriptor left; then a few
    // free again, fewer than a take needs.
    let mut held = Vec::new();
    for i in 0..64 {
        let path = m.mnt().join(format!("held{i}"));
        match fs::write(&path, b"x").and_then(|()| fs::File::open(&path)) {
            Ok(f) => held.push(f),
            Err(_) => break,
        }
    }
    held.truncate(held.len().saturating_sub(4));
    let failed = TAKEN + 1;
    fs::write(m.mnt().join("a"), format!("{failed}\n")).unwrap();
    let out = m.try_take(Some(&format!("t{failed}")));
    assert!(!out.success(), "a take with 4 descriptors free succeeded\n{out}");
    assert!(out.stderr.contains("was not taken"), "the failure must say the snapshot was not taken\n{out}");
    drop(held);
    fs::write(m.mnt().join("a"), b"after\n").unwrap();
    m.umount();
    m.mount();
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    let want: Vec<String> = (1..failed).map(|i| format!("t{i}")).collect();
    assert_eq!(names, want, "the failed take t{failed} must not be recorded");
    for i in 1..failed {
        assert_eq!(fs::read_to_string(m.view(&format!("t{i}")).join("a")).unwrap(), format!("{i}\n"), "view t{i}");
    }
}

/// Issue 16.2: writes to LIVE while no daemon served it used to change snapshots silently. Now the
/// mount compares LIVE with the seal the last serving left: every snapshot that shows a changed
/// path is marked (list, check), and its view fails exactly those paths with EIO, while what the
/// snapshots saved themselves stays readable. Nothing is flagged when nothing changed.
#[test]
fn writes_to_live_while_unmounted_are_found_and_never_shown_as_taken() {
    let mut m = SnapMount::prepare(Form::Separate);
    let live = m.live().to_path_buf();
    fs::write(live.join("f"), b"f1\n").unwrap();
    fs::write(live.join("g"), b"g1\n").unwrap();
    fs::create_dir(live.join("d")).unwrap();
    fs::write(live.join("d/x"), b"x1\n").unwrap();
    fs::write(live.join("h1"), b"h\n").unwrap();
    fs::hard_link(live.join("h1"), live.join("h2")).unwrap();
    m.mount();
    m.take(Some("t1"));
    fs::write(m.mnt().join("g"), b"g2\n").unwrap();
    fs::remove_file(m.mnt().join("h2")).unwrap();
    fs::rename(m.mnt().join("d"), m.mnt().join("d2")).unwrap();
    fs::rename(m.mnt().join("d2"), m.mnt().join("d")).unwrap();
    m.take(Some("t2"));
    // Served changes only, then a clean round trip: nothing may be flagged.
    m.umount();
    m.mount();
    assert_eq!(damage_of(&m, "t1"), None, "a clean umount and mount flagged t1");
    assert_eq!(damage_of(&m, "t2"), None, "a clean umount and mount flagged t2");
    m.umount();

    // Behind the daemon's back.
    fs::write(live.join("f"), b"tampered\n").unwrap();
    fs::write(live.join("d/new"), b"new\n").unwrap();
    m.mount();
    for name in ["t1", "t2"] {
        let d = damage_of(&m, name).unwrap_or_else(|| panic!("{name} not marked after LIVE changed unserved"));
        let paths = d["paths"].to_string();
        assert!(paths.contains("\"f\"") && paths.contains("d/new"), "{name}: {d}");
        assert_ne!(d.get("unverified"), Some(&serde_json::Value::Bool(true)), "{name}: a sure change: {d}");
        let err = fs::read(m.view(name).join("f")).expect_err("a changed file must not read as taken");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}/f: {err}");
        assert!(fs::read(m.view(name).join("d/new")).is_err(), "{name}/d/new was never taken");
        assert_eq!(fs::read(m.view(name).join("d/x")).unwrap(), b"x1\n", "{name}/d/x is intact");
    }
    assert_eq!(fs::read(m.view("t1").join("g")).unwrap(), b"g1\n", "what t1 saved itself stays readable");
    assert_eq!(fs::read(m.view("t2").join("g")).unwrap(), b"g2\n");
    let human = ovlsnap(&[OsStr::new("list"), OsStr::new("--mount"), m.mnt().as_os_str()]);
    assert!(human.expect_ok("list").contains("CHANGED") && human.stderr.contains("not as taken"), "{human}");
    let check = ovlsnap(&[OsStr::new("check"), OsStr::new("--mount"), m.mnt().as_os_str()]);
    assert!(!check.success() && check.stdout.contains("snapshot-changed-unserved"), "{check}");
    // The mark stays across remounts and goes with the snapshot.
    m.umount();
    m.mount();
    assert!(damage_of(&m, "t1").is_some(), "the mark must survive a remount");
    ovlsnap(&[OsStr::new("delete"), OsStr::new("t1"), OsStr::new("--mount"), m.mnt().as_os_str()])
        .expect_ok("delete t1");
    assert!(damage_of(&m, "t2").is_some());
    m.take(Some("t3"));
    assert_eq!(damage_of(&m, "t3"), None, "a snapshot taken after the mount is intact");
}

/// A store that was never sealed (made by an older ovlsnap, or the seal lost): its snapshots
/// cannot be vouched for, so they are marked unverified, yet stay readable.
#[test]
fn snapshots_without_a_seal_are_marked_unverified() {
    let mut m = SnapMount::start(Form::Separate, |live| fs::write(live.join("f"), b"1\n").unwrap());
    m.take(Some("old"));
    m.umount();
    fs::remove_file(m.live().join(".ovlsnap/seal")).unwrap();
    m.mount();
    let d = damage_of(&m, "old").expect("an unsealed store's snapshot is marked");
    assert_eq!(d["unverified"], serde_json::Value::Bool(true), "{d}");
    assert_eq!(fs::read(m.view("old").join("f")).unwrap(), b"1\n", "unverified views stay readable");
    let human = ovlsnap(&[OsStr::new("list"), OsStr::new("--mount"), m.mnt().as_os_str()]);
    assert!(human.expect_ok("list").contains("UNVERIFIED"), "{human}");
    // A corrupt seal is no seal either: the mount goes on, nothing is taken for intact.
    m.take(Some("new"));
    m.umount();
    fs::write(m.live().join(".ovlsnap/seal"), b"ovlsnap-seal 2 newest=\xff garbage\n").unwrap();
    m.mount();
    let d = damage_of(&m, "new").expect("a snapshot checked against a corrupt seal is marked");
    assert_eq!(d["unverified"], serde_json::Value::Bool(true), "{d}");
    assert_eq!(fs::read(m.view("new").join("f")).unwrap(), b"1\n");
}

/// Issue 21: after a `kill -9` of the daemon, `ovlsnap mount` said "mount point ... is not a
/// directory" (the dead FUSE mount answers ENOTCONN). It now detaches the dead mount of its own
/// type and mounts, and the snapshots are all there.
#[test]
fn mount_over_the_dead_mount_of_a_killed_daemon_clears_it() {
    for form in [Form::Stacked, Form::Separate] {
        let mut m = SnapMount::start(form, |live| fs::write(live.join("f"), b"one\n").unwrap());
        m.take(Some("s1"));
        fs::write(m.mnt().join("f"), b"two\n").unwrap();
        m.kill_daemon_leaving_its_mount();
        let dead = rustix::fs::statfs(m.mnt()).err();
        use rustix::io::Errno;
        assert!(
            matches!(dead, Some(Errno::NOTCONN | Errno::CONNABORTED | Errno::CANCELED)),
            "{form:?}: the dead mount answers ENOTCONN (ECONNABORTED caught in flight, ECANCELED queued for \
             io_uring rings being torn down): {dead:?}"
        );
        m.mark_unmounted();
        m.mount();
        assert_eq!(fs::read(m.mnt().join("f")).unwrap(), b"two\n", "{form:?}: LIVE");
        assert_eq!(fs::read(m.mnt().join(".snapshots/s1/f")).unwrap(), b"one\n", "{form:?}: the snapshot");
        let stacked = mounts().iter().filter(|l| l.point == m.mnt()).count();
        assert_eq!(stacked, 1, "{form:?}: one mount on the mount point, the dead one gone");
    }
}

/// Issue 17: a take or delete appends one line to `snapshots.log` instead of rewriting the whole
/// list (twice, with its backup: O(N) at N = 10,000). The log survives a kill -9; a line cut
/// short at its end (never acknowledged) is dropped at the next mount; a bad line before the
/// end refuses the mount, and `check --repair` keeps every record before it.
#[test]
fn takes_and_deletes_append_to_the_list_log_which_survives_a_kill_and_a_torn_line() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v0\n").unwrap();
    m.mount();
    let store = m.live().join(".ovlsnap");
    let (list, log) = (store.join("snapshots.json"), store.join("snapshots.log"));
    let before = (fs::read(&list).unwrap(), std::os::unix::fs::MetadataExt::ino(&fs::metadata(&list).unwrap()));
    for (n, v) in [("a", "v1"), ("b", "v2"), ("c", "v3")] {
        m.take(Some(n));
        fs::write(m.mnt().join("f"), format!("{v}\n")).unwrap();
    }
    ovlsnap(&[OsStr::new("delete"), OsStr::new("b"), OsStr::new("--mount"), m.mnt().as_os_str()]).expect_ok("delete b");
    let after = (fs::read(&list).unwrap(), std::os::unix::fs::MetadataExt::ino(&fs::metadata(&list).unwrap()));
    assert!(before == after, "takes and a delete rewrote snapshots.json");
    let lines = fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().count(), 4, "one record per change:\n{lines}");
    let names = |m: &SnapMount| m.list().into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(names(&m), ["a", "c"]);
    m.umount();
    assert_eq!(fs::read(&log).unwrap(), b"", "a clean umount folds the log into the list");
    assert!(String::from_utf8(fs::read(&list).unwrap()).unwrap().contains("\"c\""));

    // Killed with records in the log, and a last line cut short (as by a stop mid-append).
    m.mount();
    m.take(Some("d"));
    m.kill_daemon();
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 1);
    OpenOptions::new().append(true).open(&log).unwrap().write_all(b"{\"seq\":99,\"add\":{\"id\"").unwrap();
    m.mount();
    assert_eq!(names(&m), ["a", "c", "d"], "after a kill and a torn last line");
    assert_eq!(fs::read(m.view("a").join("f")).unwrap(), b"v0\n");
    assert_eq!(fs::read(m.view("d").join("f")).unwrap(), b"v3\n");
    assert_eq!(fs::read(&log).unwrap(), b"", "the mount folded the log and dropped the torn line");

    // A bad line before the last one: corruption, not a stop.
    m.take(Some("e"));
    fs::write(m.mnt().join("f"), b"v4\n").unwrap();
    m.take(Some("g"));
    m.kill_daemon();
    let text = fs::read_to_string(&log).unwrap();
    let recs: Vec<&str> = text.lines().collect();
    assert_eq!(recs.len(), 2, "{text}");
    fs::write(&log, format!("{}\n{{\"seq\":\n{}\n", recs[0], recs[1])).unwrap();
    let out = ovlsnap(&m.mount_args());
    let err = out.expect_failure("mount with a corrupt log");
    assert!(err.contains("snapshots.log") && err.contains("--repair"), "{out}");
    assert!(!is_fuse_mount(m.mnt()), "a refused mount must not be left mounted");
    let check = ovlsnap(&[OsStr::new("check"), m.live().as_os_str()]);
    assert!(!check.success() && check.stdout.contains("snapshot-list-corrupt"), "{check}");
    ovlsnap(&[OsStr::new("check"), m.live().as_os_str(), OsStr::new("--repair")]).expect_ok("check --repair");
    m.mount();
    let now = names(&m);
    assert_eq!(now[..4], ["a", "c", "d", "e"], "records before the bad line are kept: {now:?}");
    assert!(now.len() == 5 && now[4].starts_with("recovered-"), "g's layer is adopted: {now:?}");
    assert_eq!(fs::read(m.view(&now[4]).join("f")).unwrap(), b"v4\n");
    assert_eq!(fs::read(m.view("e").join("f")).unwrap(), b"v3\n");
    m.umount();
}

/// The list's log is folded into a new checkpoint every 256 records while the daemon runs: a
/// long-running mount's log stays short, and a kill right after the fold loses nothing.
#[test]
fn the_list_log_is_folded_after_256_changes_and_a_kill_after_it_loses_nothing() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"0\n").unwrap();
    m.mount();
    let store = m.live().join(".ovlsnap");
    let (list, log) = (store.join("snapshots.json"), store.join("snapshots.log"));
    let checkpoint = || fs::read_to_string(&list).unwrap();
    let first = checkpoint();
    for i in 0..256 {
        m.take(Some(&format!("s{i:03}")));
    }
    assert_eq!(checkpoint(), first, "the checkpoint changed before the log was due");
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 256);
    fs::write(m.mnt().join("f"), b"257\n").unwrap();
    m.take(Some("s256"));
    assert!(checkpoint().contains("\"s256\""), "the 257th change wrote a checkpoint");
    assert_eq!(fs::read(&log).unwrap(), b"", "and emptied the log");
    m.take(Some("s257"));
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 1, "then the log grows again");
    m.kill_daemon();
    m.mount();
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names.len(), 258);
    assert_eq!((names[0].as_str(), names[257].as_str()), ("s000", "s257"));
    assert_eq!(fs::read(m.view("s000").join("f")).unwrap(), b"0\n");
    assert_eq!(fs::read(m.view("s257").join("f")).unwrap(), b"257\n");
    m.umount();
}

/// The list's log removed, cut or replaced behind the daemon's back (by root or LIVE's owner: the
/// store is theirs): a change then writes the whole list, never an append to a file no mount
/// reads or after a hole that reads as a torn line. A kill -9 afterwards loses no snapshot.
#[test]
fn a_list_log_removed_or_cut_while_mounted_loses_no_snapshot() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"0\n").unwrap();
    m.mount();
    let log = m.live().join(".ovlsnap/snapshots.log");
    m.take(Some("a"));
    fs::remove_file(&log).unwrap();
    m.take(Some("b"));
    assert!(log.exists(), "the log is made again");
    m.take(Some("c"));
    OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    fs::write(m.mnt().join("f"), b"4\n").unwrap();
    m.take(Some("d"));
    fs::write(&log, b"not ours\n").unwrap();
    m.take(Some("e"));
    m.kill_daemon();
    m.mount();
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(fs::read(m.view("c").join("f")).unwrap(), b"0\n");
    assert_eq!(fs::read(m.view("d").join("f")).unwrap(), b"4\n");
    m.umount();
}

/// A take or a delete is committed by appending a record to the list's log, with the list
/// changed in place (no copy of it per change). When that append fails (here: the record needs a
/// new page of a full tmpfs), the change fails with the reason, the list is as it was (also after
/// a remount), and with room again the same change goes through.
#[test]
fn a_take_or_delete_whose_log_record_does_not_fit_changes_nothing() {
    let mut m = SnapMount::prepare(Form::Separate);
    rustix::mount::mount("tmpfs", m.live(), "tmpfs", MountFlags::empty(), c"size=2m,mode=0755")
        .expect("mount a small tmpfs on LIVE");
    fs::write(m.live().join("f"), b"v0\n").unwrap();
    m.mount();
    let log = m.live().join(".ovlsnap/snapshots.log");
    let names = |m: &SnapMount| m.list().into_iter().map(|s| s.name).collect::<Vec<_>>();
    let take = |name: &str, about: &str| {
        let args = [
            OsStr::new("take"),
            OsStr::new(name),
            OsStr::new("-d"),
            OsStr::new(about),
            OsStr::new("--mount"),
            m.mnt().as_os_str(),
        ];
        ovlsnap(&args)
    };
    let log_len = || fs::metadata(&log).unwrap().len() as usize;
    // Takes until fewer than `room` bytes are left in the log's last page (descriptions sized to
    // get there), so that a record longer than that needs a new page.
    let fill_page = |first: usize, room: usize| {
        let (mut n, mut base) = (first, 150);
        loop {
            let len = log_len();
            let left = 4096 - len % 4096;
            if left < room {
                return n;
            }
            let about = "x".repeat(left.saturating_sub(base + room / 2).min(1000));
            take(&format!("s{n}"), &about).expect_ok("take");
            base = (log_len() - len).saturating_sub(about.len());
            fs::write(m.mnt().join("f"), format!("v{n}\n")).unwrap();
            n += 1;
        }
    };
    // Fills the tmpfs through the mount; returns the filler's path.
    let fill_disk = || {
        let filler = m.mnt().join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 16 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling the disk: {e}");
                break;
            }
        }
        f.sync_all().ok();
        filler
    };
    let free_again = |filler: &Path| {
        fs::remove_file(filler).unwrap();
        // The kernel sends FUSE RELEASE after close(2) returns: the space comes back a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while rustix::fs::statvfs(m.live()).map(|v| v.f_bavail * v.f_frsize).unwrap_or(0) < (1 << 20)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    let n = fill_page(0, 1000);
    let before = names(&m);
    let filler = fill_disk();
    let long = "x".repeat(1000);
    let out = take("late", &long);
    let err = out.expect_failure("a take whose log record does not fit");
    assert!(err.contains("No space left on device"), "the take says why: {out}");
    assert_eq!(names(&m), before, "a failed take leaves the list as it was");
    free_again(&filler);
    take("late", &long).expect_ok("the same take with room again");
    let mut want = before.clone();
    want.push("late".into());
    assert_eq!(names(&m), want);

    // The same for a delete of the oldest (no merge: only its record, over 20 bytes, is written).
    fill_page(n, 20);
    let before = names(&m);
    let filler = fill_disk();
    let delete = [OsStr::new("delete"), OsStr::new(&before[0]), OsStr::new("--mount"), m.mnt().as_os_str()];
    let out = ovlsnap(&delete);
    let err = out.expect_failure("a delete whose log record does not fit");
    assert!(err.contains("No space left on device"), "the delete says why: {out}");
    assert_eq!(names(&m), before, "a failed delete leaves the list as it was");
    assert_eq!(fs::read(m.view(&before[0]).join("f")).unwrap(), b"v0\n", "the oldest view after the failed delete");
    free_again(&filler);
    ovlsnap(&delete).expect_ok("the same delete with room again");
    m.umount();
    m.mount();
    assert_eq!(names(&m), before[1..].to_vec(), "after a remount");
    assert_eq!(fs::read(m.view("late").join("f")).unwrap(), format!("v{}\n", n - 1).into_bytes());
    m.umount();
    rustix::mount::unmount(m.live(), UnmountFlags::DETACH).expect("unmount the tmpfs");
}
