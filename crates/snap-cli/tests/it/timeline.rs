//! Issue 21: timeline snapshots with retention (`ovlsnap auto`, as snapper's timeline and
//! sanoid) run on a fake clock through five weeks of a schedule, and pre/post pairs around a
//! command (`ovlsnap run`).

use std::ffi::{OsStr, OsString};
use std::fs;

use crate::common::*;

/// Monday 2026-01-05 00:00:00 UTC.
const MONDAY: u64 = 1_767_571_200;
const H: u64 = 3600;
const D: u64 = 86_400;

/// `ovlsnap COMMAND --mount MNT ARGS...` with the clock at `now`.
fn at(now: u64, m: &SnapMount, args: &[&str]) -> CliOutput {
    let mut v: Vec<OsString> = vec![format!("OVLSNAP_NOW={now}").into(), ovlsnap_bin().into(), args[0].into()];
    v.extend(["--mount".into(), m.mnt().into()]);
    v.extend(args[1..].iter().map(OsString::from));
    run_with_deadline(OsStr::new("env"), &v).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn auto_keeps_what_its_rules_keep_through_five_weeks_and_never_a_held_or_hand_made_snapshot() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"start\n").unwrap();
    m.mount();
    m.take(Some("manual"));
    // Every 2 hours for three days, then daily at noon for 30 days: 66 runs, each after a change.
    let times: Vec<u64> =
        (0..36).map(|k| MONDAY + 2 * H * k).chain((0..30).map(|j| MONDAY + 3 * D + 12 * H + j * D)).collect();
    let policy = ["--hourly", "4", "--daily", "3", "--weekly", "2", "--monthly", "2"];
    for (k, &t) in times.iter().enumerate() {
        fs::write(m.mnt().join("f"), format!("run {k}\n")).unwrap();
        let mut args = vec!["auto"];
        args.extend(policy);
        let out = at(t, &m, &args);
        let text = out.expect_ok("auto");
        assert!(text.starts_with(&format!("took {}\n", snap_fs::retention::name_at(t))), "{out}");
        if k == 4 {
            m.take(Some("by-hand"));
            at(t, &m, &["hold", "keep", "auto-2026-01-05T02:00:00Z"]).expect_ok("hold");
        }
    }
    // Kept: the newest; the first of each of the last 4 hours, 3 days, 2 weeks (from Monday) and
    // 2 months with a snapshot; the held one; and the snapshots not named auto-TIME.
    let want = [
        "manual",
        "auto-2026-01-05T00:00:00Z", // January's first (monthly)
        "auto-2026-01-05T02:00:00Z", // held
        "by-hand",
        "auto-2026-01-26T12:00:00Z", // first of the week of Jan 26 (weekly)
        "auto-2026-02-01T12:00:00Z", // February's first (monthly; a Sunday)
        "auto-2026-02-02T12:00:00Z", // first of the week of Feb 2 (weekly)
        "auto-2026-02-03T12:00:00Z", // hourly
        "auto-2026-02-04T12:00:00Z", // hourly, daily
        "auto-2026-02-05T12:00:00Z", // hourly, daily
        "auto-2026-02-06T12:00:00Z", // the newest
    ];
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, want);
    // Every kept view shows the tree of its run (deletions merged layers, changing no view).
    for (k, &t) in times.iter().enumerate() {
        let name = snap_fs::retention::name_at(t);
        if want.contains(&name.as_str()) {
            assert_eq!(fs::read_to_string(m.view(&name).join("f")).unwrap(), format!("run {k}\n"), "{name}");
        }
    }
    assert_eq!(fs::read_to_string(m.view("manual").join("f")).unwrap(), "start\n");

    // A dry run with fewer kept says what would go and deletes nothing.
    let out = at(
        times[65] + H,
        &m,
        &["auto", "--dry-run", "--json", "--hourly", "1", "--daily", "0", "--weekly", "0", "--monthly", "0"],
    );
    let v: serde_json::Value = serde_json::from_str(out.expect_ok("auto --dry-run --json")).expect("JSON");
    assert_eq!(v["took"], serde_json::Value::Null);
    let would: Vec<&str> = v["would_delete"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(would, [want[1], want[4], want[5], want[6], want[7], want[8], want[9]]);
    assert_eq!(m.list().len(), want.len(), "a dry run deleted something");
    m.umount();
}

#[test]
fn run_takes_a_pre_post_pair_around_a_command_and_shows_what_it_changed() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v1\n").unwrap();
    m.mount();
    let script = format!("echo new > '{0}/new' && rm '{0}/f' && exit 3", m.mnt().display());
    let out = at(MONDAY, &m, &["run", "--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(3), "run exits with the command's status\n{out}");
    let mut changes: Vec<&str> = out.stdout.lines().collect();
    changes.sort();
    assert_eq!(changes, ["+\t/new", "-\t/f"], "{out}");
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["pre-2026-01-05T00:00:00Z", "post-2026-01-05T00:00:00Z"]);
    assert_eq!(fs::read(m.view(&names[0]).join("f")).unwrap(), b"v1\n");
    assert!(!m.view(&names[0]).join("new").exists());
    assert_eq!(fs::read(m.view(&names[1]).join("new")).unwrap(), b"new\n");
    // A command that cannot start: the pair is made, the error says why.
    let out = at(MONDAY, &m, &["run", "--", "/nonexistent/cmd"]);
    assert!(out.expect_failure("run of nothing").contains("/nonexistent/cmd"), "{out}");
    assert_eq!(m.list().len(), 4, "pre-...-2 and post-...-2");
    m.umount();
}
