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

/// The non-directories under `dir` (not following symlinks), each name's status.
fn non_dirs(dir: &Path) -> Vec<fs::Metadata> {
    let (mut out, mut stack) = (Vec::new(), vec![dir.to_path_buf()]);
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let md = fs::symlink_metadata(&path).unwrap();
            if md.is_dir() {
                stack.push(path);
            } else {
                out.push(md);
            }
        }
    }
    out
}

/// Bytes of the non-directory inodes under `dir`, each inode once.
fn inode_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    non_dirs(dir).iter().filter(|md| seen.insert((md.dev(), md.ino()))).map(|md| md.blocks() * 512).sum()
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
    let bad = run(&m, &["list", "-o", "name,bogus"]);
    assert!(bad.expect_failure("an unknown column").contains("no column \"bogus\""), "{bad}");
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

/// What the tree at `dir` references, as `list`'s REFER counts it: every name's blocks shared
/// among its links, directories left out.
fn referenced_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    non_dirs(dir).iter().map(|md| md.blocks() * 512 / md.nlink().max(1)).sum()
}

/// Bytes of the non-directories of one name under `dir`.
fn one_name_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    non_dirs(dir).iter().filter(|md| md.nlink() == 1).map(|md| md.blocks() * 512).sum()
}

/// `list --json`'s `(name, refer_bytes, shared_bytes, layer_bytes)`, once every snapshot's
/// referenced bytes are worked out (beside the mount's work after each take).
fn referenced(m: &SnapMount) -> Vec<(String, u64, u64, u64)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v: serde_json::Value = serde_json::from_str(run(m, &["list", "--json"]).expect_ok("list --json")).unwrap();
        let got: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let n = |k: &str| s[k].as_u64();
                (s["name"].as_str().unwrap().to_string(), n("refer_bytes"), n("shared_bytes"), n("layer_bytes"))
            })
            .collect();
        if got.iter().all(|g| g.1.is_some() && g.2.is_some()) {
            return got.into_iter().map(|(n, r, s, l)| (n, r.unwrap(), s.unwrap(), l.unwrap())).collect();
        }
        assert!(std::time::Instant::now() < deadline, "referenced bytes never worked out: {got:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Issue 21, space accounting: `list` says what each snapshot's tree references (`zfs list`'s
/// `refer`) and the part newer snapshots share, without walking the layers at each `list`: the
/// first snapshot's figure comes from one walk, every later one from the changes in between (new,
/// rewritten, removed and hard-linked files, a renamed and a removed tree). Each must equal a walk
/// of the snapshot's view, also after a middle snapshot is deleted, after a remount (the figures
/// are the store's), and when the store lost them (worked out again).
#[test]
fn list_says_what_each_snapshot_references_as_a_walk_of_its_view_counts_it() {
    const KIB: usize = 1 << 10;
    let mut m = SnapMount::prepare(Form::Separate);
    let data = |seed: u8, n: usize| (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    fs::create_dir_all(m.live().join("tree/deep/er")).unwrap();
    for i in 0..20 {
        fs::write(m.live().join(format!("tree/deep/er/f{i}")), data(i, 24 * KIB)).unwrap();
    }
    fs::create_dir(m.live().join("gone")).unwrap();
    fs::write(m.live().join("gone/x"), data(7, 100 * KIB)).unwrap();
    fs::write(m.live().join("big"), data(1, 512 * KIB)).unwrap();
    m.mount();
    let mnt = m.mnt().to_path_buf();
    m.take(Some("s1"));
    fs::write(mnt.join("big"), data(2, 1024 * KIB)).unwrap();
    fs::write(mnt.join("new"), data(3, 64 * KIB)).unwrap();
    fs::hard_link(mnt.join("new"), mnt.join("new-link")).unwrap();
    m.take(Some("s2"));
    fs::rename(mnt.join("tree"), mnt.join("moved")).unwrap();
    fs::create_dir(mnt.join("tree")).unwrap(); // another dir where the moved one was
    fs::write(mnt.join("tree/other"), data(5, 40 * KIB)).unwrap();
    fs::write(mnt.join("moved/deep/er/f3"), data(9, 200 * KIB)).unwrap();
    fs::remove_file(mnt.join("gone/x")).unwrap();
    fs::remove_dir(mnt.join("gone")).unwrap();
    std::os::unix::fs::symlink("moved/deep", mnt.join("link")).unwrap();
    m.take(Some("s3"));
    fs::remove_file(mnt.join("new-link")).unwrap();
    fs::remove_dir_all(mnt.join("moved/deep")).unwrap();
    m.take(Some("s4"));
    fs::write(mnt.join("after"), data(4, 300 * KIB)).unwrap();

    let check = |m: &SnapMount, what: &str| {
        let got = referenced(m);
        for (name, refer, shared, layer) in &got {
            assert_eq!(*refer, referenced_bytes(&m.view(name)), "{what}: what {name} references");
            // What only its layer holds: the layer's files of one name.
            let id = m.list().into_iter().find(|s| &s.name == name).unwrap().id;
            let own = one_name_bytes(&m.live().join(format!(".ovlsnap/layers/{id}")));
            assert_eq!(*shared, refer - own, "{what}: what {name} shares (its layer holds {layer} bytes)");
        }
        got
    };
    let first = check(&m, "after the takes");
    let by_name = |v: &[(String, u64, u64, u64)], n: &str| v.iter().find(|g| g.0 == n).unwrap().1;
    assert!(by_name(&first, "s2") > by_name(&first, "s1") + 512 * KIB as u64, "{first:?}");
    assert!(by_name(&first, "s4") < by_name(&first, "s3"), "{first:?}");
    let cols = run(&m, &["list", "-o", "name,refer,shared", "-H"]).expect_ok("list -o refer").to_string();
    assert_eq!(cols.lines().count(), 4, "{cols}");
    assert!(cols.lines().all(|l| l.split('\t').count() == 3 && !l.contains("\t-")), "{cols}");
    assert!(run(&m, &["list"]).expect_ok("list").contains("REFER"));
    // `list NAME...`: only those, in list order, the same figures.
    let some: serde_json::Value =
        serde_json::from_str(run(&m, &["list", "--json", "s3", "s1"]).expect_ok("list s3 s1")).unwrap();
    let some: Vec<(&str, u64)> = some
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["refer_bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(some, [("s1", by_name(&first, "s1")), ("s3", by_name(&first, "s3"))]);
    let bad = run(&m, &["list", "s1", "nosuch"]);
    assert!(bad.expect_failure("list of a missing snapshot").contains("no snapshot named \"nosuch\""), "{bad}");

    run(&m, &["delete", "s2"]).expect_ok("delete s2");
    let after = check(&m, "after deleting s2");
    for (name, refer, _, _) in &after {
        assert_eq!(*refer, by_name(&first, name), "deleting s2 changed what {name} references");
    }
    m.umount();
    m.mount();
    assert_eq!(referenced(&m).iter().map(|g| g.1).collect::<Vec<_>>(), after.iter().map(|g| g.1).collect::<Vec<_>>());
    m.umount();
    // A store that lost its figures (or never had them) works them out again, the same.
    for e in fs::read_dir(m.live().join(".ovlsnap/summaries")).unwrap() {
        let p = e.unwrap().path();
        if p.extension() == Some(OsStr::new("refer")) {
            fs::remove_file(p).unwrap();
        }
    }
    m.mount();
    let again = check(&m, "worked out again");
    assert_eq!(again.iter().map(|g| g.1).collect::<Vec<_>>(), after.iter().map(|g| g.1).collect::<Vec<_>>());
    m.umount();
}

/// The first snapshot's REFER comes from a walk of a whole tree, a part at a time; takes while it
/// runs pause it (the worker seals first) and it goes on where it stopped: with takes right
/// after the first, every figure must still be what a walk of the view counts.
#[test]
fn a_walk_for_refer_paused_by_takes_goes_on_and_counts_right() {
    let mut m = SnapMount::prepare(Form::Separate);
    for d in 0..40 {
        let dir = m.live().join(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..300 {
            fs::write(dir.join(format!("f{f:03}")), vec![b'x'; 100 + f]).unwrap();
        }
    }
    m.mount();
    let mnt = m.mnt().to_path_buf();
    for i in 0..6 {
        m.take(Some(&format!("s{i}")));
        fs::write(mnt.join(format!("d{i:02}/f000")), vec![b'y'; 9000 * (i + 1)]).unwrap();
        fs::remove_file(mnt.join(format!("d{:02}/f001", 39 - i))).unwrap();
    }
    for (name, refer, _, _) in referenced(&m) {
        assert_eq!(refer, referenced_bytes(&m.view(&name)), "what {name} references");
    }
    m.umount();
}
