//! The daemon's open-file limit (issue 16.3): it held one descriptor per snapshot layer, so a
//! low `RLIMIT_NOFILE` ran out after a number of takes; it opens layers while it uses them now,
//! a bounded number at once (issue 17), and users' open files are what can still run it short.
//! Whatever the limit, a command that fails leaves no trace: a refused `take` records no snapshot (before or after a remount) and leaves
//! the daemon serving, and an `ovlsnap mount` that could not serve fails before it returns 0.
//!
//! The limits are set with `prlimit --nofile=N:N` on `ovlsnap mount` (the daemon inherits them,
//! and cannot raise a hard limit).

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::common::*;

fn append(path: &Path, line: &str) {
    let mut f = OpenOptions::new().append(true).create(true).open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    f.write_all(line.as_bytes()).unwrap_or_else(|e| panic!("append to {path:?}: {e}"));
}

/// `1\n2\n...i\n`: what `LIVE/a` holds after `i` appends.
fn lines_upto(i: usize) -> String {
    (1..=i).map(|k| format!("{k}\n")).collect()
}

fn list_names(m: &SnapMount) -> Vec<String> {
    m.list().into_iter().map(|s| s.name).collect()
}

/// A refusal for want of descriptors says so and says how to raise the limit.
fn assert_explains_the_limit(out: &CliOutput, what: &str) {
    let err = &out.stderr;
    assert!(err.contains("open-file limit"), "{what}: the failure must name the open-file limit\n{out}");
    assert!(err.contains("prlimit") || err.contains("ulimit"), "{what}: the failure must say how to raise it\n{out}");
}

/// The loop: `echo $i >> a; ovlsnap take tN` under a hard limit of 60 descriptors. The
/// daemon opens snapshot layers while it uses them (issue 17), so takes go on past the limit
/// (until session 10 they were refused after ~25: a descriptor per layer). Descriptors held by
/// users' open files still run it short: then a take is refused up front with the limit named,
/// is never listed, the daemon keeps serving (list, views, LIVE), the next take after the files
/// close succeeds, and after a remount every snapshot shows exactly what was written before it.
#[test]
fn takes_under_a_low_open_file_limit_leave_no_failed_snapshot() {
    const TAKES: usize = 80;
    let mut m = SnapMount::prepare(Form::Stacked);
    m.mount_wrapped(&["prlimit", "--nofile=60:60"]);
    let a = m.mnt().join("a");
    let mut taken = Vec::new();
    for i in 1..=TAKES {
        append(&a, &format!("{i}\n"));
        let out = m.try_take(Some(&format!("t{i}")));
        assert!(out.success(), "take {i} of {TAKES} under a limit of 60\n{out}");
        taken.push(i);
    }
    // Users' open files: each is a descriptor of the daemon's. Open until it has none left.
    for i in 0..60 {
        fs::write(m.mnt().join(format!("held{i}")), b"x").unwrap();
    }
    let mut held = Vec::new();
    for i in 0..60 {
        match fs::File::open(m.mnt().join(format!("held{i}"))) {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "open {i} through the mount: {e}");
                break;
            }
        }
    }
    assert!(held.len() < 60, "the daemon never ran out of descriptors under a limit of 60");
    // Some free again: enough to serve, fewer than a take keeps free for serving after it.
    held.truncate(held.len().saturating_sub(12));
    let name = format!("t{}", TAKES + 1);
    append(&a, &format!("{}\n", TAKES + 1));
    let out = m.try_take(Some(&name));
    assert!(!out.success(), "{name} was taken with 12 descriptors free\n{out}");
    assert!(out.stderr.contains("was not taken"), "{name}: the failure must say it was not taken\n{out}");
    assert_explains_the_limit(&out, &name);
    // The daemon serves on: nothing it needs was used up by the refused take.
    let want: Vec<String> = taken.iter().map(|k| format!("t{k}")).collect();
    assert_eq!(list_names(&m), want, "after the refused {name}");
    let oldest = fs::read_to_string(m.view("t1").join("a")).unwrap();
    assert_eq!(oldest, lines_upto(1), "oldest view after the refused {name}");
    assert_eq!(fs::read_to_string(&a).unwrap(), lines_upto(TAKES + 1), "LIVE after {name}");
    drop(held);
    m.take(Some(&name));
    taken.push(TAKES + 1);
    append(&a, "after\n");
    m.umount();
    m.mount_wrapped(&["prlimit", "--nofile=60:60"]);
    let want: Vec<String> = taken.iter().map(|k| format!("t{k}")).collect();
    assert_eq!(list_names(&m), want, "after a remount: only the takes that succeeded");
    for &k in &taken {
        let got = fs::read_to_string(m.view(&format!("t{k}")).join("a")).unwrap();
        assert_eq!(got, lines_upto(k), "view t{k} after a remount");
    }
}

/// The layer roots a daemon keeps open (`RootPool`) are a cache: a take short of descriptors
/// closes them before it refuses. A CI machine (more serving threads than here) refused take 12
/// of `takes_under_a_low_open_file_limit_leave_no_failed_snapshot` with 37 of 60 in use while
/// the kept roots counted as used. Here the limit is lowered, with the roots open, to two
/// fewer than the take needs on top of what is open.
#[test]
fn a_take_short_of_descriptors_closes_the_layer_roots_it_keeps_open_first() {
    /// What a take keeps free (snap-fs's `TAKE_FDS` + ovl-fs's `SERVE_RESERVE`).
    const NEED: usize = 8 + 16;
    let mut m = SnapMount::prepare(Form::Stacked);
    m.mount_wrapped(&["prlimit", "--nofile=60:60"]);
    let a = m.mnt().join("a");
    for i in 1..=12 {
        append(&a, &format!("{i}\n"));
        m.take(Some(&format!("t{i}")));
    }
    let pid = daemon_pid(m.mnt());
    let targets: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    let is_root = |t: &&String| {
        let (dir, name) = t.rsplit_once('/').unwrap_or(("", ""));
        dir.ends_with("/layers") && !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
    };
    let roots = targets.iter().filter(is_root).count();
    assert!(roots >= 4, "the daemon keeps {roots} layer roots open after 12 takes: {targets:?}");
    let limit = targets.len() + NEED - 2;
    sh(&format!("prlimit --pid {pid} --nofile={limit}:{limit}"), Path::new("/"));
    append(&a, "13\n");
    let out = m.try_take(Some("t13"));
    assert!(
        out.success(),
        "take under a limit of {limit} with {} open, {roots} of them kept roots\n{out}",
        targets.len()
    );
    for k in [1, 7, 13] {
        let got = fs::read_to_string(m.view(&format!("t{k}")).join("a")).unwrap();
        assert_eq!(got, lines_upto(k), "view t{k} after the take");
    }
    assert_eq!(list_names(&m).len(), 13);
}

/// Near the hard limit `ovlsnap mount` used to return 0 with a daemon that died right after
/// (its FUSE threads could not clone `/dev/fuse`), leaving LIVE answering ENOTCONN. Under every
/// limit from far too few up to past what 30 snapshots once needed, the mount now either serves
/// (LIVE, the oldest view, list and umount work) or fails with the limit named, no mount left
/// behind. The range starts low: a mount opens no file per snapshot since session 17, so where
/// it starts to serve depends on the machine's CPUs (threads, rings), not on the snapshots (a
/// CI machine served from 40 on, this one from 42).
#[test]
fn a_mount_near_the_open_file_limit_serves_or_fails_before_returning() {
    let mut m = SnapMount::prepare(Form::Stacked);
    m.mount();
    let a = m.mnt().join("a");
    const SNAPS: usize = 30;
    for i in 1..=SNAPS {
        append(&a, &format!("{i}\n"));
        m.take(Some(&format!("t{i}")));
    }
    m.umount();
    let (mut served, mut failed) = (0, Vec::new());
    for limit in (10..=SNAPS * 3 + 40).step_by(2) {
        let nofile = format!("--nofile={limit}:{limit}");
        let out = m.try_mount_wrapped(&["prlimit", &nofile]);
        if !out.success() {
            assert!(!is_fuse_mount(m.mnt()), "a failed mount under {limit} left a FUSE mount\n{out}");
            m.mark_unmounted();
            failed.push((limit, out));
            continue;
        }
        m.expect_served(&out);
        let live = fs::read_to_string(&a).unwrap_or_else(|e| panic!("LIVE after a mount under {limit}: {e}\n{out}"));
        assert_eq!(live, lines_upto(SNAPS), "LIVE under {limit}");
        let oldest = fs::read_to_string(m.view("t1").join("a"))
            .unwrap_or_else(|e| panic!("oldest view after a mount under {limit}: {e}\n{out}"));
        assert_eq!(oldest, lines_upto(1), "t1 under {limit}");
        assert_eq!(m.listed_views().len(), SNAPS, "views under {limit}");
        assert_eq!(list_names(&m).len(), SNAPS, "list under {limit}");
        m.umount();
        served += 1;
    }
    for (limit, out) in &failed {
        assert_explains_the_limit(out, &format!("mount under {limit}"));
    }
    let failed = failed.len();
    assert!(failed > 0 && served > 0, "the limits tried should cover both outcomes: {failed} failed, {served} served");
}

/// A daemon opens snapshot layers while it uses them, a bounded number at once (issue 17): under
/// a limit of 256 descriptors it takes 300 snapshots (until session 9 it refused past ~100, in
/// session 9 past ~199: one descriptor per layer), every view shows what was taken, a diff, a
/// delete and the next mount work, and the daemon stays within the limit.
#[test]
fn snapshots_outnumber_the_open_file_limit() {
    const TAKES: usize = 300;
    let mut m = SnapMount::prepare(Form::Stacked);
    m.mount_wrapped(&["prlimit", "--nofile=256:256"]);
    let a = m.mnt().join("a");
    for i in 1..=TAKES {
        append(&a, &format!("{i}\n"));
        let out = m.try_take(Some(&format!("t{i}")));
        assert!(out.success(), "take {i} of {TAKES} under a limit of 256\n{out}");
    }
    // Every view, oldest first: each walks layers the others' walks closed again.
    for i in (1..=TAKES).step_by(7).chain([TAKES]) {
        let got = fs::read_to_string(m.view(&format!("t{i}")).join("a")).unwrap();
        assert_eq!(got, lines_upto(i), "view t{i}");
    }
    let fds = fs::read_dir(format!("/proc/{}/fd", daemon_pid(m.mnt()))).unwrap().count();
    assert!(fds < 256 - 16, "the daemon holds {fds} descriptors of 256 with {TAKES} snapshots");
    let diff = ovlsnap(&[OsStr::new("diff"), OsStr::new("t1"), OsStr::new("--mount"), m.mnt().as_os_str()]);
    diff.expect_ok("diff t1 to LIVE");
    assert_eq!(diff.stdout.trim_end(), "M\t/a", "diff t1 to LIVE\n{diff}");
    let mid = format!("t{}", TAKES / 2);
    ovlsnap(&[OsStr::new("delete"), OsStr::new(&mid), OsStr::new("--mount"), m.mnt().as_os_str()])
        .expect_ok("delete a middle snapshot");
    let before = format!("t{}", TAKES / 2 - 1);
    let got = fs::read_to_string(m.view(&before).join("a")).unwrap();
    assert_eq!(got, lines_upto(TAKES / 2 - 1), "view {before} after deleting {mid}");
    m.umount();
    m.mount_wrapped(&["prlimit", "--nofile=256:256"]);
    assert_eq!(list_names(&m).len(), TAKES - 1, "snapshots after a remount under the same limit");
    let got = fs::read_to_string(m.view("t1").join("a")).unwrap();
    assert_eq!(got, lines_upto(1), "the oldest view after a remount");
}
