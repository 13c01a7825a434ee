//! Reserved and odd names (issue 16.5). Names the OCI layer format reserves (`.wh.X`,
//! `.wh..wh..opq`) in LIVE: `send` refuses them, naming the path, and no receive deletes anything
//! because of them. Names that are not UTF-8 or hold a newline: `diff` prints each change on one
//! line, escaped as `ls -b` does, `diff --json` carries their exact bytes, and `restore` (with
//! and without `--dry-run`), `send`, `receive` and `list --json` work with them.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::common::*;
use crate::stream::{archive, assert_same, mkdirs, ovlsnap_io, receive, send, try_receive, ustar, write};

/// `ovlsnap send B [--from A] --mount MNT > out`, which must fail; returns its stderr.
fn refused_send(m: &SnapMount, b: &str, from: Option<&str>, out: &Path) -> String {
    let mut args = vec![OsStr::new("send"), OsStr::new(b), OsStr::new("--mount"), m.mnt().as_os_str()];
    if let Some(a) = from {
        args.extend([OsStr::new("--from"), OsStr::new(a)]);
    }
    let got = ovlsnap_io(&args, None, Some(out));
    got.expect_failure(&format!("send {b} from {from:?}")).to_owned()
}

/// A path from raw bytes.
fn raw(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

#[test]
fn names_oci_reserves_are_refused_by_send_and_delete_nothing_when_received() {
    let m = SnapMount::start(Form::Separate, |live| {
        write(&live.join("x"), b"x, which a whiteout .wh.x would delete");
        write(&live.join("keep"), b"keep");
        mkdirs(&live.join("d"));
        write(&live.join("d/a"), b"a, which an opaque marker in d would delete");
        write(&live.join("d/b"), b"b");
    });
    m.take(Some("s1"));
    let dest = m.scratch().mkdir("dest");
    let full = m.scratch().path().join("s1.tar");
    send(&m, "s1", None, &full);
    receive(&dest, &full);
    // The target holds files of its own too.
    write(&dest.join("mine"), b"the target's own");
    write(&dest.join("d/mine"), b"the target's own, in d");
    let before = record_tree(&dest);

    // An opaque marker's name in a directory, then a whiteout's name at the root: each is an
    // empty file in LIVE, exactly what a marker looks like in a stream.
    write(&m.mnt().join("d/.wh..wh..opq"), b"");
    m.take(Some("s2"));
    write(&m.mnt().join(".wh.x"), b"");
    m.take(Some("s3"));
    let stream = m.scratch().path().join("stream.tar");
    for (b, from, path) in [("s2", Some("s1"), "/d/.wh..wh..opq"), ("s3", Some("s2"), "/.wh.x"), ("s3", None, "/.wh.x")]
    {
        let what = format!("send {b} from {from:?}");
        let err = refused_send(&m, b, from, &stream);
        assert!(err.contains(path) && err.contains("OCI"), "{what}: the error names {path} and says why\n{err}");
        // Whatever the refused send wrote is no stream a receive applies.
        try_receive(&dest, &stream).expect_failure(&format!("receiving what {what} wrote"));
        assert_same_tree(&before, &record_tree(&dest), &format!("dest after receiving what {what} wrote"));
    }

    // Streams other senders make of such trees (or an ovlsnap before the fix): a reserved name on
    // a directory, on a file with data, and below a reserved name. Refused, nothing deleted.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a directory named .wh.x", archive(&[ustar(b".wh.x/", b'5', 0o755, b"", b"")])),
        ("a directory named .wh..wh..opq", archive(&[ustar(b"d/.wh..wh..opq/", b'5', 0o755, b"", b"")])),
        ("a file .wh.x with data", archive(&[ustar(b".wh.x", b'0', 0o644, b"", b"data")])),
        ("a symlink named .wh.x", archive(&[ustar(b".wh.x", b'2', 0o777, b"", b"")])),
        ("a file below .wh.d", archive(&[ustar(b".wh.d/f", b'0', 0o644, b"", b"")])),
    ];
    for (what, data) in &cases {
        let hostile = m.scratch().path().join("hostile.tar");
        write(&hostile, data);
        let err = try_receive(&dest, &hostile).expect_failure(&format!("receiving {what}")).to_owned();
        assert!(err.contains(".wh."), "receiving {what}: the error names the entry\n{err}");
        assert_same_tree(&before, &record_tree(&dest), &format!("dest after receiving {what}"));
    }

    // A real whiteout deletes exactly the name it gives, in the target; an opaque marker empties
    // exactly its directory, and the stream's own entries there stay.
    let ok = m.scratch().path().join("ok.tar");
    let marker = |name: &[u8]| ustar(name, b'0', 0o644, b"", b"");
    write(&ok, &archive(&[marker(b".wh.x"), marker(b"d/.wh..wh..opq"), ustar(b"d/new", b'0', 0o644, b"", b"n")]));
    receive(&dest, &ok);
    let mut want = before.clone();
    want.retain(|p, _| p != Path::new("x") && p.parent() != Some(Path::new("d")));
    want.insert("d/new".into(), record_entry(&dest.join("d/new")).expect("the stream's d/new"));
    assert_same_tree(&want, &record_tree(&dest), "dest after a stream with a whiteout and an opaque marker");
    assert_eq!(fs::read(dest.join("d/new")).unwrap(), b"n");
}

/// The changes of `diff --json` output: (kind, path bytes, other path bytes).
fn json_changes(text: &str) -> BTreeSet<(String, Vec<u8>, Vec<u8>)> {
    let report = parse_json(text).unwrap_or_else(|e| panic!("diff --json is not JSON ({e}): {text}"));
    let Some(Json::Arr(changes)) = report.get("changes") else { panic!("no changes array: {text}") };
    let path = |v: Option<&Json>| -> Vec<u8> {
        match v {
            Some(Json::Str(s)) => s.as_bytes().to_vec(),
            Some(o @ Json::Obj(_)) => match o.get("bytes") {
                Some(Json::Arr(b)) => b
                    .iter()
                    .map(|n| match n {
                        Json::Num(n) if n.fract() == 0.0 && (0.0..=255.0).contains(n) => *n as u8,
                        other => panic!("not a byte: {other:?} in {text}"),
                    })
                    .collect(),
                other => panic!("a path object without bytes: {other:?} in {text}"),
            },
            other => panic!("not a path: {other:?} in {text}"),
        }
    };
    changes
        .iter()
        .map(|c| {
            let Some(Json::Str(kind)) = c.get("change") else { panic!("a change without a kind: {text}") };
            let other = c.get("at").or(c.get("to"));
            (kind.clone(), path(c.get("path")), path(other))
        })
        .collect()
}

#[test]
fn names_not_utf8_or_with_a_newline_work_in_every_command() {
    let m = SnapMount::start(Form::Stacked, |live| {
        write(&live.join(raw(b"caf\xff")), b"v1");
        write(&live.join("new\nline"), b"nl");
        mkdirs(&live.join(raw(b"dir\xfe")));
        write(&live.join(raw(b"dir\xfe/in\x80side")), b"inside");
        write(&live.join("plain"), b"plain");
    });
    m.take(Some("s1"));
    let r = |b: &[u8]| m.mnt().join(raw(b));
    write(&r(b"caf\xff"), b"v2");
    fs::remove_file(r(b"new\nline")).unwrap();
    write(&r(b"added\xff\n"), b"added");
    write(&r(b"sp ace\\"), b"space and backslash");
    m.take(Some("s2"));
    let mnt_args = |args: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
        v.extend(["--mount".into(), m.mnt().into()]);
        v
    };

    // Text: one line per change, each name escaped as `ls -b` does.
    let out = ovlsnap(&mnt_args(&["diff", "s1", "s2"]));
    let text = out.expect_ok("diff s1 s2");
    let lines: BTreeSet<&str> = text.lines().collect();
    let want = ["M\t/caf\\377", "-\t/new\\nline", "+\t/added\\377\\n", "+\t/sp\\ ace\\\\"];
    assert_eq!(lines, BTreeSet::from(want), "diff prints each change on one line, escaped\n{out}");
    assert!(text.lines().all(|l| l.is_ascii() && !l.contains('\r')), "diff prints raw bytes\n{out}");

    // JSON: every path round-trips to its exact bytes; UTF-8 names are plain strings.
    let out = ovlsnap(&mnt_args(&["diff", "s1", "s2", "--json"]));
    let text = out.expect_ok("diff --json");
    assert!(text.contains("\"new\\nline\""), "a UTF-8 name is a JSON string\n{out}");
    let got = json_changes(text);
    let c = |k: &str, a: &[u8], b: &[u8]| (k.to_owned(), a.to_vec(), b.to_vec());
    for w in [
        c("modified", b"caf\xff", b"caf\xff"),
        c("deleted", b"new\nline", b"new\nline"),
        c("added", b"added\xff\n", b"added\xff\n"),
        c("added", b"sp ace\\", b"sp ace\\"),
    ] {
        assert!(got.contains(&w), "diff --json lacks {w:?}\n{out}");
    }
    assert_eq!(got.len(), want.len(), "diff --json and the text list the same changes\n{out}");
    let json = ovlsnap(&mnt_args(&["diff", "s1", "--json"]));
    assert_eq!(json_changes(json.expect_ok("diff s1 --json")), got, "diff to LIVE\n{json}");

    // list --json is unaffected by the names.
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);

    // Streams: full and incremental rebuild the trees with the exact names.
    let dest = m.scratch().mkdir("dest");
    let stream = m.scratch().path().join("stream.tar");
    send(&m, "s1", None, &stream);
    receive(&dest, &stream);
    assert_same(&m.view("s1"), &dest, true, "dest after the full stream of s1");
    send(&m, "s2", Some("s1"), &stream);
    receive(&dest, &stream);
    assert_same(&m.view("s2"), &dest, false, "dest after the stream s1→s2");
    assert_eq!(fs::read(dest.join(raw(b"added\xff\n"))).unwrap(), b"added");

    // Restore: the dry run lists each change on one line and changes nothing; the restore brings
    // back the exact names.
    let live_before = record_tree(m.mnt());
    let out = ovlsnap(&mnt_args(&["restore", "s1", "--dry-run"]));
    let text = out.expect_ok("restore --dry-run");
    for w in ["replace  /caf\\377", "restore  /new\\nline", "remove   /added\\377\\n"] {
        assert!(text.lines().any(|l| l == w), "restore --dry-run does not print {w:?}\n{out}");
    }
    assert_same_tree(&live_before, &record_tree(m.mnt()), "LIVE after restore --dry-run");
    ovlsnap(&mnt_args(&["restore", "s1"])).expect_ok("restore s1");
    assert_same_tree(&record_tree(&m.view("s1")), &record_tree(m.mnt()), "LIVE after restore s1");
    assert_eq!(fs::read(r(b"caf\xff")).unwrap(), b"v1");
    assert_eq!(fs::read(r(b"new\nline")).unwrap(), b"nl");
    assert_eq!(fs::read(r(b"dir\xfe/in\x80side")).unwrap(), b"inside");
    let out = ovlsnap(&mnt_args(&["diff", "s1"]));
    assert_eq!(out.expect_ok("diff after the restore"), "", "LIVE still differs from s1\n{out}");
}

// A directory rename (which keeps the old path in the snapshot with a redirect, recorded first in
// a journal) failed with EINVAL when either name was not UTF-8: the journal was JSON of the
// paths, and serde cannot write those as strings.
#[test]
fn a_dir_renamed_from_and_to_names_not_utf8_is_diffed_and_restored() {
    let m = SnapMount::start(Form::Stacked, |live| {
        mkdirs(&live.join(raw(b"dir\xfe")));
        write(&live.join(raw(b"dir\xfe/in\x80side")), b"inside");
        mkdirs(&live.join("plain"));
    });
    m.take(Some("s1"));
    let r = |b: &[u8]| m.mnt().join(raw(b));
    fs::rename(r(b"dir\xfe"), r(b"moved\n\xfd")).expect("rename dir\\376");
    fs::rename(r(b"plain"), r(b"odd\xff")).expect("rename plain");
    let mnt_args = |args: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
        v.extend(["--mount".into(), m.mnt().into()]);
        v
    };
    let out = ovlsnap(&mnt_args(&["diff", "s1"]));
    let lines: BTreeSet<&str> = out.expect_ok("diff s1").lines().collect();
    assert_eq!(lines, BTreeSet::from(["R\t/dir\\376 -> /moved\\n\\375", "R\t/plain -> /odd\\377"]), "{out}");
    let json = ovlsnap(&mnt_args(&["diff", "s1", "--json"]));
    let c = |k: &str, a: &[u8], b: &[u8]| (k.to_owned(), a.to_vec(), b.to_vec());
    let want = BTreeSet::from([c("renamed", b"dir\xfe", b"moved\n\xfd"), c("renamed", b"plain", b"odd\xff")]);
    assert_eq!(json_changes(json.expect_ok("diff s1 --json")), want, "{json}");
    let out = ovlsnap(&mnt_args(&["restore", "s1", "--dry-run"]));
    assert!(
        out.expect_ok("restore --dry-run").lines().any(|l| l == "move     /moved\\n\\375 back to /dir\\376"),
        "{out}"
    );
    ovlsnap(&mnt_args(&["restore", "s1"])).expect_ok("restore s1");
    assert_same_tree(&record_tree(&m.view("s1")), &record_tree(m.mnt()), "LIVE after restore s1");
    assert_eq!(fs::read(r(b"dir\xfe/in\x80side")).unwrap(), b"inside");
}

// With LIVE below a directory whose name is not UTF-8, `status` and `mount-view` failed: their
// answers held paths serde cannot write as strings. (MNT stays UTF-8 here: a mount point that is
// not would make /proc/self/mountinfo unreadable as text for every other program reading it so,
// other test suites on the machine included; ours now reads it byte for byte, see
// `ovl_fs::mount::read_mountinfo`.)
#[test]
fn a_live_dir_whose_path_is_not_utf8_serves_every_command() {
    let mut m = SnapMount::prepare_in(Form::Separate, OsStr::from_bytes(b"odd\xff\ndir"), OsStr::new("plain"));
    write(&m.live().join("f"), b"v1");
    m.mount();
    m.take(Some("s1"));
    write(&m.mnt().join("f"), b"v2");
    let mnt_args = |args: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
        v.extend(["--mount".into(), m.mnt().into()]);
        v
    };
    assert_eq!(m.list().into_iter().map(|s| s.name).collect::<Vec<_>>(), ["s1"]);
    let out = ovlsnap(&mnt_args(&["diff", "s1"]));
    assert_eq!(out.expect_ok("diff"), "M\t/f\n", "{out}");
    let out = ovlsnap(&mnt_args(&["status"]));
    assert!(out.expect_ok("status").contains("/odd\\377\\ndir/live\n"), "status escapes LIVE\n{out}");
    let out = ovlsnap(&mnt_args(&["status", "--json"]));
    let status = parse_json(out.expect_ok("status --json")).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let bytes: Vec<u8> = match status.get("live").and_then(|v| v.get("bytes")) {
        Some(Json::Arr(b)) => b.iter().map(|n| if let Json::Num(n) = n { *n as u8 } else { panic!("{out}") }).collect(),
        other => panic!("status --json: live is {other:?}\n{out}"),
    };
    assert_eq!(bytes, m.live().as_os_str().as_bytes(), "status --json carries LIVE's bytes");
    let dir = m.scratch().mkdir("view");
    let _view = KernelMount::view(&m, "s1", &dir);
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"v1");
}
