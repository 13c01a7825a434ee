//! Issue 21: what `zfs rename`, `zfs hold` and `zfs release`, and snapper's descriptions and
//! userdata give snapshot users. A rename keeps the view, its open files and its content, and the
//! old name is gone at once; a held snapshot cannot be deleted until every hold is released;
//! descriptions and properties show in `list`; all are the store's, through a remount and a kill -9.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::Path;

use crate::common::*;

/// `ovlsnap ARGS --mount MNT`.
fn run(m: &SnapMount, args: &[&str]) -> CliOutput {
    let mut v: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    v.extend([OsStr::new("--mount"), m.mnt().as_os_str()]);
    ovlsnap(&v)
}

fn names(m: &SnapMount) -> Vec<String> {
    m.list().into_iter().map(|s| s.name).collect()
}

/// Kills `m`'s daemon with SIGKILL and mounts again.
fn kill_and_remount(m: &mut SnapMount) {
    m.kill_daemon();
    m.mount();
}

#[test]
fn a_renamed_snapshot_keeps_its_view_and_open_files_and_the_old_name_is_gone_at_once() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v1\n").unwrap();
    m.mount();
    m.take(Some("a"));
    fs::write(m.mnt().join("f"), b"v2\n").unwrap();
    m.take(Some("b"));
    let mut open = fs::File::open(m.view("a").join("f")).unwrap();
    // Looked up just before: the kernel keeps the name for the entry's TTL unless told.
    assert!(m.view("a").join("f").exists());
    run(&m, &["rename", "a", "monday"]).expect_ok("rename a monday");
    assert!(!m.view("a").exists(), ".snapshots/a is still there after the rename");
    assert_eq!(fs::read(m.view("monday").join("f")).unwrap(), b"v1\n");
    let mut text = String::new();
    open.read_to_string(&mut text).unwrap();
    assert_eq!(text, "v1\n", "a file open in the view reads on");
    assert_eq!(names(&m), ["monday", "b"]);
    assert_eq!(m.listed_views(), ["b", "monday"]);
    let diff = run(&m, &["diff", "monday", "b"]);
    assert!(diff.expect_ok("diff by the new name").contains("M\t/f"), "{diff}");

    // Refused, changing nothing: a name in use, an invalid or too long one, an unknown snapshot.
    let taken = run(&m, &["rename", "monday", "b"]);
    assert!(taken.expect_failure("rename to a name in use").contains("already exists"), "{taken}");
    let long = "x".repeat(201);
    let bad = run(&m, &["rename", "monday", &long]);
    assert!(bad.expect_failure("rename to 201 bytes").contains("limit is 200"), "{bad}");
    let slash = run(&m, &["rename", "monday", "a/b"]);
    assert!(slash.expect_failure("rename to a/b").contains("'/'"), "{slash}");
    let none = run(&m, &["rename", "nope", "x"]);
    assert!(none.expect_failure("rename of nothing").contains("no snapshot named \"nope\""), "{none}");
    assert_eq!(names(&m), ["monday", "b"]);

    // The store's: through a kill -9 (a record of the log) and a clean remount.
    run(&m, &["rename", "b", "tuesday"]).expect_ok("rename b tuesday");
    kill_and_remount(&mut m);
    assert_eq!(names(&m), ["monday", "tuesday"]);
    m.umount();
    m.mount();
    assert_eq!(names(&m), ["monday", "tuesday"]);
    assert_eq!(fs::read(m.view("tuesday").join("f")).unwrap(), b"v2\n");
    m.umount();
}

#[test]
fn a_held_snapshot_cannot_be_deleted_until_every_hold_is_released() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v1\n").unwrap();
    m.mount();
    for n in ["a", "b", "c"] {
        m.take(Some(n));
    }
    run(&m, &["hold", "audit", "a", "b"]).expect_ok("hold audit a b");
    run(&m, &["hold", "legal hold", "a"]).expect_ok("a second hold on a");
    let again = run(&m, &["hold", "audit", "a"]);
    assert!(again.expect_failure("the same hold twice").contains("already"), "{again}");
    let holds = run(&m, &["holds"]);
    assert_eq!(holds.expect_ok("holds"), "a audit\na legal hold\nb audit\n");
    let json: serde_json::Value = serde_json::from_str(run(&m, &["holds", "b", "--json"]).expect_ok("holds --json"))
        .expect("holds --json is JSON");
    assert_eq!(json, serde_json::json!([{"name": "b", "tags": ["audit"]}]));
    let listed: serde_json::Value =
        serde_json::from_str(run(&m, &["list", "--json"]).expect_ok("list --json")).unwrap();
    assert_eq!(listed[0]["holds"], serde_json::json!(["audit", "legal hold"]));
    assert!(listed[2].get("holds").is_none(), "an unheld snapshot lists no holds: {listed}");
    assert!(run(&m, &["list"]).expect_ok("list").contains("ok, held (2)"));

    // Neither the oldest (which only loses its layer) nor a middle one (merged) goes.
    for n in ["a", "b"] {
        let out = run(&m, &["delete", n]);
        let err = out.expect_failure("delete of a held snapshot");
        assert!(err.contains("is held") && err.contains("ovlsnap release"), "{out}");
    }
    assert_eq!(names(&m), ["a", "b", "c"]);

    // Holds are the store's: through a kill -9 and a remount.
    kill_and_remount(&mut m);
    assert!(run(&m, &["delete", "b"]).expect_failure("delete after the kill").contains("is held"));
    run(&m, &["release", "audit", "b"]).expect_ok("release audit b");
    let gone = run(&m, &["release", "audit", "b"]);
    assert!(gone.expect_failure("release of a hold not there").contains("no hold"), "{gone}");
    run(&m, &["delete", "b"]).expect_ok("delete b once released");
    run(&m, &["release", "audit", "a"]).expect_ok("release audit a");
    assert!(run(&m, &["delete", "a"]).expect_failure("still one hold on a").contains("legal hold"));
    m.umount();
    m.mount();
    assert_eq!(run(&m, &["holds"]).expect_ok("holds after the remount"), "a legal hold\n");
    run(&m, &["release", "legal hold", "a"]).expect_ok("release the last hold");
    run(&m, &["delete", "a"]).expect_ok("delete a");
    assert_eq!(names(&m), ["c"]);
    let bad = run(&m, &["hold", "", "c"]);
    assert!(bad.expect_failure("an empty tag").contains("not a valid hold tag"), "{bad}");
    m.umount();
}

#[test]
fn descriptions_and_user_properties_are_listed_and_kept_through_a_kill() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"v1\n").unwrap();
    m.mount();
    run(&m, &["take", "a", "--description", "before the upgrade"]).expect_ok("take with a description");
    m.take(Some("b"));
    run(&m, &["set", "a", "ticket=OPS-42", "owner=alice"]).expect_ok("set properties");
    run(&m, &["set", "b", "--description", "after"]).expect_ok("set a description");
    let human = run(&m, &["list"]);
    assert!(human.expect_ok("list").contains("ok  \"before the upgrade\" owner=alice ticket=OPS-42"), "{human}");
    // Refused, changing nothing.
    for (args, why) in [
        (&["set", "a", "bad key=1"][..], "not a valid property key"),
        (&["set", "a", "novalue"], "not KEY=VALUE"),
        (&["set", "a", "k=line\nbreak"], "control character"),
        (&["set", "a"], "nothing to set"),
        (&["set", "nope", "k=v"], "no snapshot named"),
    ] {
        let out = run(&m, args);
        assert!(out.expect_failure("a bad set").contains(why), "{args:?}: {out}");
    }
    let long = "d".repeat(1025);
    let out = run(&m, &["set", "a", "--description", &long]);
    assert!(out.expect_failure("a long description").contains("limit is 1024"), "{out}");

    kill_and_remount(&mut m);
    let listed: serde_json::Value =
        serde_json::from_str(run(&m, &["list", "--json"]).expect_ok("list --json")).unwrap();
    assert_eq!(listed[0]["description"], "before the upgrade");
    assert_eq!(listed[0]["properties"], serde_json::json!({"owner": "alice", "ticket": "OPS-42"}));
    assert_eq!(listed[1]["description"], "after");
    run(&m, &["set", "a", "ticket=", "--no-description"]).expect_ok("remove a property and the description");
    m.umount();
    m.mount();
    let listed: serde_json::Value =
        serde_json::from_str(run(&m, &["list", "--json"]).expect_ok("list --json")).unwrap();
    assert!(listed[0].get("description").is_none(), "{listed}");
    assert_eq!(listed[0]["properties"], serde_json::json!({"owner": "alice"}));
    m.umount();
}

/// Bytes of the non-directory inodes under `dir`, each inode once.
fn inode_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if seen.insert((md.dev(), md.ino())) {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

/// Issue 21, space accounting: `list` says per snapshot the bytes deleting it frees (`zfs list`'s
/// `used`), and a delete frees exactly that (files' blocks; each delete checked against the
/// store's layers before and after).
#[test]
fn list_says_what_deleting_a_snapshot_frees_and_the_delete_frees_it() {
    const MIB: usize = 1 << 20;
    let mut m = SnapMount::prepare(Form::Separate);
    let data = |seed: u8, n: usize| (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    fs::write(m.live().join("a"), data(1, MIB)).unwrap();
    fs::write(m.live().join("b"), data(2, 2 * MIB)).unwrap();
    m.mount();
    m.take(Some("s1"));
    fs::write(m.mnt().join("a"), data(3, MIB)).unwrap(); // s1 keeps a v1
    m.take(Some("s2"));
    fs::write(m.mnt().join("a"), data(4, MIB)).unwrap(); // s2 keeps a v2, hidden in s1's view by a v1
    fs::write(m.mnt().join("b"), data(5, 2 * MIB)).unwrap(); // s2 keeps b v1, which s1's view shows
    m.take(Some("s3"));
    fs::write(m.mnt().join("b"), data(6, 2 * MIB)).unwrap(); // s3 keeps b v2, hidden by s2's b v1
    m.take(Some("s4"));
    // The frozen layers' summaries are made in the background after each take.
    let freed = |m: &SnapMount| -> Vec<(String, Option<u64>)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let v: serde_json::Value =
                serde_json::from_str(run(m, &["list", "--json"]).expect_ok("list --json")).unwrap();
            let got: Vec<(String, Option<u64>)> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["name"].as_str().unwrap().to_string(), s["freed_bytes"].as_u64()))
                .collect();
            if got.iter().all(|(_, f)| f.is_some()) || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let mib = MIB as u64;
    let want: Vec<(String, Option<u64>)> =
        [("s1", mib), ("s2", mib), ("s3", 2 * mib), ("s4", 0)].iter().map(|(n, b)| (n.to_string(), Some(*b))).collect();
    assert_eq!(freed(&m), want);
    assert!(run(&m, &["list"]).expect_ok("list").contains("USED"));
    let cols = run(&m, &["list", "-o", "name,used,entries", "-H"]);
    assert_eq!(cols.expect_ok("list -o -H"), "s1\t1.0 MiB\t1\ns2\t1.0 MiB\t2\ns3\t2.0 MiB\t1\ns4\t0 B\t0\n", "{cols}");
    let table = run(&m, &["list", "-o", "used,name"]);
    assert_eq!(table.expect_ok("list -o").lines().next(), Some("   USED  NAME"), "{table}");
    let bad = run(&m, &["list", "-o", "name,refer"]);
    assert!(bad.expect_failure("an unknown column").contains("no column \"refer\""), "{bad}");
    let layers = m.live().join(".ovlsnap/layers");
    for name in ["s3", "s2", "s1"] {
        let expect = freed(&m).into_iter().find(|(n, _)| n == name).and_then(|(_, f)| f).unwrap();
        let before = inode_bytes(&layers);
        run(&m, &["delete", name]).expect_ok("delete");
        assert_eq!(before - inode_bytes(&layers), expect, "bytes freed by deleting {name}");
    }
    assert_eq!(fs::read(m.view("s4").join("a")).unwrap(), data(4, MIB), "the last snapshot's view is intact");
    m.umount();
}
