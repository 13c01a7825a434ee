//! `ovlsnap check` (issue 8): a store after a model-like sequence (mount, takes, changes,
//! delete, restore) checks clean and a repair keeps every snapshot's view (ovlsnap's and the
//! kernel's); injected store corruptions are reported with their path and severity; what a
//! killed daemon leaves is fixable; a running daemon is checked read-only and never repaired.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// The findings a healthy store may have: whiteouts a later removal from LIVE left with nothing
/// to hide, and origins of copies whose LIVE file is gone since.
const HEALTHY: [&str; 2] = ["orphan-whiteout", "origin-stale"];

/// `ovlsnap check ARGS --json`: the exit code and the report.
fn check(args: &[&OsStr]) -> (i32, serde_json::Value, CliOutput) {
    let mut all: Vec<&OsStr> = vec![OsStr::new("check"), OsStr::new("--json")];
    all.extend_from_slice(args);
    let out = ovlsnap(&all);
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (code, json, out)
}

/// `(severity, kind, path)` of each entry of `report[what]`.
fn set(report: &serde_json::Value, what: &str) -> BTreeSet<(String, String, PathBuf)> {
    let list = report[what].as_array().unwrap_or_else(|| panic!("no {what} in {report}"));
    list.iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_else(|| panic!("{k} missing: {f}")).to_string();
            (s("severity"), s("kind"), PathBuf::from(s("path")))
        })
        .collect()
}

fn of(items: &[(&str, &str, PathBuf)]) -> BTreeSet<(String, String, PathBuf)> {
    items.iter().map(|(s, k, p)| (s.to_string(), k.to_string(), p.clone())).collect()
}

/// Checks `live` offline: no errors, and only the findings a healthy store may have.
fn assert_healthy(live: &Path, what: &str) -> serde_json::Value {
    let (code, report, out) = check(&[live.as_os_str()]);
    assert_eq!(code, 0, "{what}: exit 0\n{out}");
    for (sev, kind, path) in set(&report, "findings") {
        assert!(HEALTHY.contains(&kind.as_str()), "{what}: {sev} {kind} at {}\n{out}", path.display());
    }
    report
}

/// A small tree: dirs two deep, files, a symlink, a hard link pair.
fn fill(live: &Path) {
    for d in ["docs/old", "src/lib", "empty"] {
        fs::create_dir_all(live.join(d)).unwrap();
    }
    for (f, text) in [("docs/a", "a\n"), ("docs/old/b", "b\n"), ("src/lib/c", "c\n"), ("top", "top\n")] {
        fs::write(live.join(f), text).unwrap();
    }
    std::os::unix::fs::symlink("docs/a", live.join("link")).unwrap();
    fs::hard_link(live.join("top"), live.join("top-link")).unwrap();
}

/// Takes, changes of every kind, a delete of a middle snapshot and a restore, like the model
/// test does at random; returns the names of the snapshots left.
fn model_like(m: &SnapMount) -> Vec<String> {
    let mnt = m.mnt();
    m.take(Some("s1"));
    fs::write(mnt.join("docs/a"), "a changed\n").unwrap();
    fs::rename(mnt.join("docs"), mnt.join("documents")).unwrap();
    fs::remove_file(mnt.join("top")).unwrap();
    fs::write(mnt.join("new"), "new\n").unwrap();
    fs::set_permissions(mnt.join("src/lib/c"), fs::Permissions::from_mode(0o600)).unwrap();
    m.take(Some("s2"));
    fs::write(mnt.join("short-lived"), "gone soon\n").unwrap();
    fs::remove_file(mnt.join("short-lived")).unwrap();
    fs::write(mnt.join("src/lib/c"), "c changed\n").unwrap();
    fs::remove_file(mnt.join("src/lib/c")).unwrap();
    fs::remove_dir(mnt.join("empty")).unwrap();
    fs::rename(mnt.join("documents/old"), mnt.join("old")).unwrap();
    m.take(Some("s3"));
    fs::create_dir(mnt.join("later")).unwrap();
    fs::write(mnt.join("later/x"), "x\n").unwrap();
    ovlsnap(&[OsStr::new("delete"), OsStr::new("s2"), OsStr::new("--mount"), mnt.as_os_str()]).expect_ok("delete s2");
    let restore = [OsStr::new("restore"), OsStr::new("s1"), OsStr::new("--mount"), mnt.as_os_str()];
    ovlsnap(&restore).expect_ok("restore s1");
    m.take(Some("s4"));
    fs::write(mnt.join("after-restore"), "after\n").unwrap();
    vec!["s1".into(), "s3".into(), "s4".into()]
}

/// Each snapshot's view through the mount and through the stock kernel.
fn record_views(m: &SnapMount, names: &[String]) -> Vec<(Tree, Tree)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dir = m.scratch().mkdir(&format!("kernel-{i}"));
            let k = KernelMount::snapshot(m, n, &dir);
            (record_tree(&m.view(n)), record_tree(k.path()))
        })
        .collect()
}

#[test]
fn a_store_after_takes_changes_delete_and_restore_checks_clean_and_a_repair_keeps_every_view() {
    for form in [Form::Stacked, Form::Separate] {
        let mut m = SnapMount::start(form, fill);
        let names = model_like(&m);
        let views = record_views(&m, &names);

        // While the daemon runs: a read-only check that says so; no repair.
        let (code, report, out) = check(&[OsStr::new("--mount"), m.mnt().as_os_str()]);
        assert_eq!(code, 0, "{form:?}: online check\n{out}");
        assert!(set(&report, "findings").iter().any(|f| f.1 == "store-in-use"), "{form:?}: {out}");
        let (code, _, out) = check(&[m.live().as_os_str(), OsStr::new("--repair")]);
        assert_eq!(code, 1, "{form:?}: a repair while the daemon runs is refused\n{out}");
        assert!(out.stderr.contains("unmount"), "{form:?}: {out}");

        m.umount();
        let report = assert_healthy(m.live(), &format!("{form:?} after umount"));
        let (code, repaired, out) = check(&[m.live().as_os_str(), OsStr::new("--repair")]);
        assert_eq!(code, 0, "{form:?}: repair\n{out}");
        let fixed = set(&report, "findings").into_iter().filter(|f| f.0 == "fixable").collect::<BTreeSet<_>>();
        assert_eq!(set(&repaired, "repaired"), fixed, "{form:?}: the repair fixes what the check called fixable");
        assert!(set(&repaired, "findings").iter().all(|f| f.0 == "warning"), "{form:?}: {out}");

        m.mount();
        for ((before_view, before_kernel), (after_view, after_kernel)) in views.iter().zip(record_views(&m, &names)) {
            assert_same_tree(before_view, &after_view, &format!("{form:?}: a view across check --repair"));
            assert_same_tree(before_kernel, &after_kernel, &format!("{form:?}: a kernel view across check --repair"));
        }
        m.umount();
    }
}

/// The store dir of `m`'s LIVE.
fn store(m: &SnapMount) -> PathBuf {
    m.live().join(".ovlsnap")
}

/// The id of snapshot `name` in the store's list (`snapshots.json` and its log).
fn id_of(m: &SnapMount, name: &str) -> u64 {
    let root = fs::File::open(store(m)).unwrap();
    let meta = snap_fs::store::read_meta(std::os::fd::AsFd::as_fd(&root)).unwrap().expect("a snapshot list");
    meta.snapshots.iter().find(|s| s.name == name).map(|s| s.id).unwrap()
}

#[test]
fn injected_store_corruptions_are_reported() {
    let mut m = SnapMount::start(Form::Separate, fill);
    let names = model_like(&m);
    let views = record_views(&m, &names);
    m.umount();
    let (live, st) = (m.live().to_path_buf(), store(&m));
    // What the healthy store has to say, which every case below adds to.
    let (_, base, _) = check(&[live.as_os_str()]);
    let base = set(&base, "findings");
    let newest = st.join(format!("layers/{}", id_of(&m, "s4")));

    // Fixable leftovers, all at once.
    fs::create_dir_all(st.join("layers/99/sub")).unwrap();
    fs::create_dir(st.join(format!("layers/{}.merging", id_of(&m, "s1")))).unwrap();
    fs::write(st.join("work/work/#ovl.1.1"), b"half").unwrap();
    fs::write(st.join("snapshots.json.tmp"), b"{\"half\":").unwrap();
    let whiteout = rustix::fs::FileType::CharacterDevice;
    rustix::fs::mknodat(rustix::fs::CWD, newest.join("ghost"), whiteout, rustix::fs::Mode::empty(), 0).unwrap();
    let injected = of(&[
        ("fixable", "layer-unlisted", st.join("layers/99")),
        ("fixable", "layer-unlisted", st.join(format!("layers/{}.merging", id_of(&m, "s1")))),
        ("fixable", "stale-work-entry", st.join("work/work/#ovl.1.1")),
        ("fixable", "snapshot-list-temp", st.join("snapshots.json.tmp")),
        ("fixable", "orphan-whiteout", newest.join("ghost")),
    ]);
    let (code, report, out) = check(&[live.as_os_str()]);
    assert_eq!(code, 0, "fixable leftovers are no errors\n{out}");
    assert_eq!(set(&report, "findings"), base.union(&injected).cloned().collect(), "{out}");
    let human = ovlsnap(&[OsStr::new("check"), live.as_os_str()]);
    assert!(human.stdout.contains(&format!("fixable: {}: ", st.join("layers/99").display())), "{human}");
    let (code, report, out) = check(&[live.as_os_str(), OsStr::new("--repair")]);
    assert_eq!(code, 0, "{out}");
    assert!(set(&report, "repaired").is_superset(&injected), "{out}");
    assert!(
        !st.join("layers/99").exists() && !st.join("snapshots.json.tmp").exists() && !newest.join("ghost").exists()
    );
    assert_healthy(&live, "after the repair of the leftovers");

    // Errors, one at a time, each undone before the next.
    let meta_path = st.join("snapshots.json");
    let meta = fs::read_to_string(&meta_path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        f(&mut j);
        serde_json::to_string_pretty(&j).unwrap()
    };
    let list = st.join("snapshots.json");
    let cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "{\"version\": 1, \"snaps".to_string(), "snapshot-list-corrupt"),
        ("a newer format", with(&|j| j["version"] = 3.into()), "snapshot-list-corrupt"),
        ("an id twice", with(&|j| j["snapshots"][1]["id"] = j["snapshots"][0]["id"].clone()), "snapshot-entry-invalid"),
        ("an id from the future", with(&|j| j["snapshots"][0]["id"] = j["next_id"].clone()), "snapshot-entry-invalid"),
        ("an invalid name", with(&|j| j["snapshots"][0]["name"] = "a/b".into()), "snapshot-entry-invalid"),
        (
            "a name twice",
            with(&|j| j["snapshots"][1]["name"] = j["snapshots"][0]["name"].clone()),
            "snapshot-entry-invalid",
        ),
        ("another LIVE", with(&|j| j["live"]["ino"] = 1.into()), "store-of-other-live"),
    ];
    for (what, text, kind) in cases {
        fs::write(&meta_path, &text).unwrap();
        let (code, report, out) = check(&[live.as_os_str()]);
        assert_eq!(code, 1, "{what}: an error\n{out}");
        let want = ("error".to_string(), kind.to_string(), list.clone());
        assert!(set(&report, "findings").contains(&want), "{what}: {kind} expected\n{out}");
        fs::write(&meta_path, &meta).unwrap();
    }

    // No list while layers are there: an error; a repair must not take it for a new store (it
    // used to be refused; since issue 16.1 it rebuilds the list from its backup, exactly).
    fs::rename(&meta_path, st.join("saved.json")).unwrap();
    let (code, report, out) = check(&[live.as_os_str()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        set(&report, "findings").contains(&("error".into(), "snapshot-list-missing".into(), list.clone())),
        "{out}"
    );
    let (code, report, out) = check(&[live.as_os_str(), OsStr::new("--repair")]);
    assert_eq!(code, 0, "the repair rebuilds a lost list\n{out}");
    assert!(
        set(&report, "repaired").contains(&("error".into(), "snapshot-list-missing".into(), list.clone())),
        "{out}"
    );
    assert!(newest.is_dir(), "a repair without a list must not remove the layers");
    let listed = |text: &str| {
        let j: serde_json::Value = serde_json::from_str(text).unwrap();
        j["snapshots"].as_array().unwrap().iter().map(|s| (s["id"].clone(), s["name"].clone())).collect::<Vec<_>>()
    };
    let saved = fs::read_to_string(st.join("saved.json")).unwrap();
    assert_eq!(listed(&fs::read_to_string(&meta_path).unwrap()), listed(&saved), "the rebuilt list is the backup");
    fs::rename(st.join("saved.json"), &meta_path).unwrap();

    // A listed snapshot without its layer (moved away: also an unowned dir, left alone).
    let s3 = st.join(format!("layers/{}", id_of(&m, "s3")));
    let away = st.join("layers/away");
    fs::rename(&s3, &away).unwrap();
    let (code, report, out) = check(&[live.as_os_str(), OsStr::new("--repair")]);
    assert_eq!(code, 1, "{out}");
    let found = set(&report, "findings");
    assert!(found.contains(&("error".into(), "layer-missing".into(), s3.clone())), "{out}");
    assert!(found.contains(&("fixable".into(), "layer-unlisted".into(), away.clone())), "{out}");
    assert!(away.is_dir(), "no store repair while a layer is missing");
    fs::rename(&away, &s3).unwrap();

    // An unreadable delete journal: no daemon would start.
    fs::write(st.join("delete-in-progress.json"), b"not json").unwrap();
    let (code, report, out) = check(&[live.as_os_str()]);
    assert_eq!(code, 1, "{out}");
    let journal = st.join("delete-in-progress.json");
    assert!(set(&report, "findings").contains(&("error".into(), "delete-journal-corrupt".into(), journal.clone())));
    fs::remove_file(&journal).unwrap();

    // A broken layer: a malformed redirect in the oldest snapshot's layer.
    let oldest = st.join(format!("layers/{}", id_of(&m, "s1")));
    fs::create_dir(oldest.join("bad")).unwrap();
    rustix::fs::lsetxattr(oldest.join("bad"), "trusted.overlay.redirect", b"a/b", rustix::fs::XattrFlags::empty())
        .unwrap();
    let (code, report, out) = check(&[live.as_os_str()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        set(&report, "findings").contains(&("error".into(), "redirect-malformed".into(), oldest.join("bad"))),
        "{out}"
    );
    fs::remove_dir(oldest.join("bad")).unwrap();

    assert_healthy(&live, "after every case was undone");
    m.mount();
    for ((view, kernel), (after_view, after_kernel)) in views.iter().zip(record_views(&m, &names)) {
        assert_same_tree(view, &after_view, "a view after the cases");
        assert_same_tree(kernel, &after_kernel, "a kernel view after the cases");
    }
}

#[test]
fn a_killed_daemons_leftovers_are_fixable() {
    for form in [Form::Stacked, Form::Separate] {
        let mut m = SnapMount::start(form, fill);
        let names = model_like(&m);
        let views = record_views(&m, &names);
        fs::rename(m.mnt().join("src"), m.mnt().join("source")).unwrap();
        let live_now = record_tree(m.mnt());

        m.kill_daemon();

        // What a kill in the middle of a copy, a take, a rename or a delete leaves: a half-made
        // copy, an unowned layer, the journal of the rename of `src` (which happened), and the
        // journal of a delete whose swap did not happen, with its merged dir.
        let st = store(&m);
        fs::write(st.join("work/work/#ovl.half-made"), b"partial").unwrap();
        fs::create_dir(st.join("layers/77")).unwrap();
        let moved = fs::symlink_metadata(m.live().join("source")).unwrap();
        let rename =
            serde_json::json!({"moved": std::os::unix::fs::MetadataExt::ino(&moved), "to": "source", "undo": []});
        fs::write(st.join("rename-in-progress.json"), rename.to_string()).unwrap();
        let into = id_of(&m, "s3");
        fs::create_dir(st.join(format!("layers/{into}.merging"))).unwrap();
        let delete = serde_json::json!({"into": into, "drop": id_of(&m, "s4"), "merged": 1});
        fs::write(st.join("delete-in-progress.json"), delete.to_string()).unwrap();

        let (code, report, out) = check(&[m.live().as_os_str()]);
        assert_eq!(code, 0, "{form:?}: a killed daemon's leftovers are no errors\n{out}");
        let want = of(&[
            ("fixable", "stale-work-entry", st.join("work/work/#ovl.half-made")),
            ("fixable", "layer-unlisted", st.join("layers/77")),
            ("fixable", "layer-unlisted", st.join(format!("layers/{into}.merging"))),
            ("fixable", "rename-in-progress", st.join("rename-in-progress.json")),
            ("fixable", "delete-in-progress", st.join("delete-in-progress.json")),
        ]);
        let found = set(&report, "findings");
        assert!(found.is_superset(&want), "{form:?}: {out}");
        let text = ovlsnap(&[OsStr::new("check"), m.live().as_os_str()]).stdout;
        assert!(
            text.contains("LIVE shows it done") && text.contains("undoes it"),
            "{form:?}: what settling does\n{text}"
        );

        let (code, report, out) = check(&[m.live().as_os_str(), OsStr::new("--repair")]);
        assert_eq!(code, 0, "{form:?}: {out}");
        assert!(set(&report, "repaired").is_superset(&want), "{form:?}: {out}");
        for gone in ["rename-in-progress.json", "delete-in-progress.json", "layers/77", "work/work/#ovl.half-made"] {
            assert!(!st.join(gone).exists(), "{form:?}: {gone} is still there");
        }
        assert_healthy(m.live(), &format!("{form:?}: after the repair"));

        m.mount();
        let listed: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
        assert_eq!(listed, names, "{form:?}: every snapshot survives");
        assert_same_tree(&live_now, &record_tree(m.mnt()), &format!("{form:?}: LIVE after the repair"));
        for ((view, kernel), (after_view, after_kernel)) in views.iter().zip(record_views(&m, &names)) {
            assert_same_tree(view, &after_view, &format!("{form:?}: a view after the repair"));
            assert_same_tree(kernel, &after_kernel, &format!("{form:?}: a kernel view after the repair"));
        }
    }
}

#[test]
fn usage() {
    let out = ovlsnap(&["check"]);
    assert_eq!(out.status.code(), Some(2), "no LIVE and no --mount is bad usage\n{out}");
    let out = ovlsnap(&["check", "/a", "--mount", "/b"]);
    assert_eq!(out.status.code(), Some(2), "LIVE and --mount together\n{out}");
    let out = ovlsnap(&["check", "--help"]);
    assert!(out.success() && out.stdout.contains("ovlsnap check /data --repair"), "{out}");
    let scratch = Scratch::new();
    let out = ovlsnap(&[OsStr::new("check"), scratch.mkdir("no-store").as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no snapshot store"), "{out}");
}

/// Issue 21: `ovlsnap check` without arguments, run inside a snapshot mount, checks that mount,
/// as every other command finds its mount from the current directory (it was a usage error).
#[test]
fn check_without_arguments_checks_the_mount_it_runs_in() {
    let m = SnapMount::start(Form::Separate, |live| fs::write(live.join("f"), b"one").unwrap());
    m.take(Some("s1"));
    let out = std::process::Command::new(ovlsnap_bin()).arg("check").current_dir(m.mnt().join(".")).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "check inside the mount\n{stdout}\n{stderr}");
    let live_store = m.live().join(".ovlsnap").display().to_string();
    assert!(
        stdout.contains(&live_store) && stdout.contains("checked"),
        "the report is of this mount's store:\n{stdout}"
    );
}

/// Issue 21: every name made after a take and then removed or renamed away left its whiteout in
/// the newest layer, hiding nothing: a 3000-file restore left 3000 `orphan-whiteout` findings,
/// an editor's save (temp file renamed over the original) one each. They now go as the name
/// does, and the views stay what they were.
#[test]
fn temp_files_and_restores_leave_no_orphan_whiteouts() {
    let mut m = SnapMount::start(Form::Stacked, |live| {
        for i in 0..20 {
            fs::write(live.join(format!("f{i}")), format!("{i}\n")).unwrap();
        }
    });
    m.take(Some("s1"));
    for i in 0..20 {
        // What editors do: write a temp file, rename it over the original.
        let tmp = m.mnt().join(format!(".f{i}.swp"));
        fs::write(&tmp, b"edited\n").unwrap();
        fs::rename(&tmp, m.mnt().join(format!("f{i}"))).unwrap();
        // And lock files that come and go.
        fs::write(m.mnt().join("lock"), b"").unwrap();
        fs::remove_file(m.mnt().join("lock")).unwrap();
    }
    fs::create_dir(m.mnt().join("tmpdir")).unwrap();
    fs::remove_dir(m.mnt().join("tmpdir")).unwrap();
    m.take(Some("s2"));
    ovlsnap(&["restore".as_ref(), "s1".as_ref(), "--mount".as_ref(), m.mnt().as_os_str()]).expect_ok("restore s1");
    assert_eq!(fs::read(m.mnt().join(".snapshots/s1/f3")).unwrap(), b"3\n", "s1 after all that");
    assert_eq!(fs::read(m.mnt().join(".snapshots/s2/f3")).unwrap(), b"edited\n", "s2 after all that");
    assert_eq!(fs::read(m.mnt().join("f3")).unwrap(), b"3\n", "LIVE restored");
    assert!(!m.mnt().join(".snapshots/s1/lock").exists() && !m.mnt().join(".snapshots/s2/.f3.swp").exists());
    m.umount();
    let out = ovlsnap(&[OsStr::new("check"), m.live().as_os_str()]);
    assert!(!out.stdout.contains("orphan-whiteout"), "orphan whiteouts left:\n{out}");
}
