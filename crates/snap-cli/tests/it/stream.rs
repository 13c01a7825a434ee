//! `ovlsnap send` / `ovlsnap receive`: full and incremental streams rebuild each snapshot's tree
//! exactly (contents, types, modes, owners, xattrs, file times), GNU tar reads them, truncated,
//! corrupt and hostile streams change nothing (and nothing outside the target), and a directory
//! served by ovlsnap can receive without disturbing its own snapshots.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Uid, XattrFlags};

// ---------------------------------------------------------------------------------------------
// Running send and receive
// ---------------------------------------------------------------------------------------------

/// Runs `ovlsnap ARGS <INPUT >OUTPUT` (`/dev/null` for what is not given), with the deadline of
/// the other CLI calls.
pub(crate) fn ovlsnap_io(args: &[&OsStr], input: Option<&Path>, output: Option<&Path>) -> CliOutput {
    let null = Path::new("/dev/null");
    let mut argv: Vec<OsString> =
        vec!["-c".into(), r#"i=$1; o=$2; shift 2; exec "$@" <"$i" >"$o""#.into(), "sh".into()];
    argv.push(input.unwrap_or(null).into());
    argv.push(output.unwrap_or(null).into());
    argv.push(ovlsnap_bin().into());
    argv.extend(args.iter().map(|a| a.to_os_string()));
    run_with_deadline(OsStr::new("sh"), &argv).unwrap_or_else(|e| panic!("{e}"))
}

/// `ovlsnap send B [--from A] --mount MNT > out`.
pub(crate) fn send(m: &SnapMount, b: &str, from: Option<&str>, out: &Path) {
    let mut args = vec![OsStr::new("send"), OsStr::new(b), OsStr::new("--mount"), m.mnt().as_os_str()];
    if let Some(a) = from {
        args.extend([OsStr::new("--from"), OsStr::new(a)]);
    }
    ovlsnap_io(&args, None, Some(out)).expect_ok("ovlsnap send");
}

/// `ovlsnap receive DIR < stream`.
pub(crate) fn try_receive(dir: &Path, stream: &Path) -> CliOutput {
    ovlsnap_io(&[OsStr::new("receive"), dir.as_os_str()], Some(stream), None)
}

pub(crate) fn receive(dir: &Path, stream: &Path) {
    try_receive(dir, stream).expect_ok(&format!("ovlsnap receive {} < {}", dir.display(), stream.display()));
}

/// `tar -tvf stream`, which must succeed.
fn tar_list(stream: &Path) -> String {
    let out = run_with_deadline(OsStr::new("tar"), &["-tvf".into(), stream.into()]).unwrap_or_else(|e| panic!("{e}"));
    out.expect_ok("tar -tvf").to_owned()
}

/// Whether `tar -tvf` lists an entry named exactly `name` (for a symlink: `name -> target`).
fn listed(listing: &str, name: &str) -> bool {
    listing.lines().any(|l| l.ends_with(&format!(" {name}")))
}

/// Stage dirs `ovlsnap receive` left in `dir`.
pub(crate) fn stages_in(dir: &Path) -> Vec<String> {
    names_in(dir).into_iter().filter(|n| n.starts_with(".ovlsnap-receive")).collect()
}

// ---------------------------------------------------------------------------------------------
// What record_tree leaves out
// ---------------------------------------------------------------------------------------------

/// Owner, group and mtime (seconds, nanoseconds) of an object.
type Owned = (u32, u32, Option<(i64, i64)>);

/// Owner and group of every object below `root`, with the mtime of every non-directory (and of
/// directories when `dir_times`: a stream sets the times of the directories it holds, but a
/// directory it only adds to gets the time of the receive).
fn owners_times(root: &Path, dir_times: bool) -> BTreeMap<PathBuf, Owned> {
    list_kinds(root)
        .into_iter()
        .map(|(rel, kind)| {
            let m = fs::symlink_metadata(root.join(&rel)).unwrap_or_else(|e| panic!("lstat /{}: {e}", rel.display()));
            let time = (kind != Kind::Dir || dir_times).then(|| (m.mtime(), m.mtime_nsec()));
            (rel, (m.uid(), m.gid(), time))
        })
        .collect()
}

/// Panics unless `got` is the tree of `want` (what record_tree compares, plus owners and times).
pub(crate) fn assert_same(want: &Path, got: &Path, dir_times: bool, context: &str) {
    assert_same_tree(&record_tree(want), &record_tree(got), context);
    let (w, g) = (owners_times(want, dir_times), owners_times(got, dir_times));
    let diffs: Vec<String> = w
        .iter()
        .filter(|(p, o)| g.get(*p) != Some(o))
        .map(|(p, o)| format!("/{}: want (uid, gid, mtime) {o:?}, got {:?}", p.display(), g.get(p)))
        .take(20)
        .collect();
    assert!(diffs.is_empty(), "{context}: owners or times differ\n  {}", diffs.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// Building trees
// ---------------------------------------------------------------------------------------------

pub(crate) fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

pub(crate) fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub(crate) fn mkdirs(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub(crate) fn chown(p: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(CWD, p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

pub(crate) fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn ln_s(target: &str, p: &Path) {
    symlink(target, p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
}

fn mv(root: &Path, from: &str, to: &str) {
    fs::rename(root.join(from), root.join(to)).unwrap_or_else(|e| panic!("mv {from} {to}: {e}"));
}

fn rm_rf(p: &Path) {
    let r = if fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) { fs::remove_dir_all(p) } else { fs::remove_file(p) };
    r.unwrap_or_else(|e| panic!("rm -rf {}: {e}", p.display()));
}

/// Every kind of object a stream carries, with the metadata that is easy to lose.
fn build_varied(root: &Path, rng: &mut StdRng) {
    let r = |p: &str| root.join(p);
    mkdirs(&r("d1/d2/d3"));
    mkdirs(&r("empty"));
    for (d, mode) in [("sticky", 0o1777), ("setgid", 0o2755), ("private", 0o700)] {
        mkdirs(&r(d));
        chmod(&r(d), mode);
    }
    write(&r("small"), &random(rng, 100));
    write(&r("empty_file"), b"");
    write(&r("big"), &random(rng, 1 << 20));
    write(&r("d1/d2/d3/deep"), &random(rng, 5000));
    write(&r("private/secret"), &random(rng, 10));
    // A name longer than the ustar name field, and a path that needs the prefix field.
    write(&r(&format!("d1/{}", "n".repeat(150))), b"long name");
    let split = format!("d1/d2/d3/{}/{}", "x".repeat(90), "y".repeat(90));
    mkdirs(Path::new(&r(&split)).parent().unwrap());
    write(&r(&split), b"long path");
    write(&root.join(OsStr::from_bytes(b"caf\xe9 \n")), b"not UTF-8, a space and a newline");
    ln_s("big", &r("link"));
    ln_s("/nonexistent/x", &r("dangling"));
    ln_s(&"t".repeat(200), &r("longlink"));
    rustix::fs::mknodat(CWD, r("fifo"), FileType::Fifo, Mode::from_raw_mode(0o640), 0).expect("mkfifo");
    rustix::fs::mknodat(
        CWD,
        r("null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o620),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod");
    fs::hard_link(r("small"), r("hardlink")).expect("link");
    chmod(&r("big"), 0o4755);
    chmod(&r("small"), 0o444);
    set_xattr(&r("small"), "user.a", b"1");
    set_xattr(&r("d1"), "user.bin", &[0, b'\n', 0xff, b'=', b' ', 7]);
    set_xattr(&r("d1/d2/d3/deep"), "trusted.t", b"trusted value");
    set_xattr(&r("empty"), "user.dir", &random(rng, 300));
    chown(&r("d1"), 1000, 1000);
    chown(&r("small"), 1000, 1000);
    chown(&r("link"), 1001, 50);
    chown(&r("fifo"), 1000, 0);
}

/// The tree the chain of snapshots starts from.
pub(crate) fn build_chain(root: &Path, rng: &mut StdRng) {
    let r = |p: &str| root.join(p);
    for d in ["a/sub/inner", "b", "c/c2", "m", "mx", "x", "del/deep/tree", "p", "q", "r1", "r2", "sl", "untouched"] {
        mkdirs(&r(d));
    }
    for f in ["a/x", "a/keep", "a/sub/y", "a/sub/inner/z", "b/f", "c/c1", "c/c2/c3", "e", "m/child", "mx/child"] {
        write(&r(f), &random(rng, 64));
    }
    for f in ["x/file", "x/other", "del/deep/tree/file", "f1", "f2", "p/pf", "q/qf", "r1/k", "r2/j", "own"] {
        write(&r(f), &random(rng, 64));
    }
    write(&r("bigfile"), &random(rng, 256 << 10));
    write(&r("untouched/huge"), &random(rng, 512 << 10));
    set_xattr(&r("x/file"), "user.old", b"1");
    set_xattr(&r("x/other"), "user.old", b"2");
    set_xattr(&r("x"), "user.gone", b"removed with a change inside");
    ln_s("f1", &r("ln"));
    chown(&r("a/sub"), 1000, 1000);
}

/// s1 → s2, through the mount: every kind of change, renames nested in renames included.
pub(crate) fn change_1(root: &Path, rng: &mut StdRng) {
    let r = |p: &str| root.join(p);
    let mut f = fs::OpenOptions::new().write(true).open(r("bigfile")).unwrap();
    f.seek(SeekFrom::Start(100 << 10)).unwrap();
    f.write_all(&random(rng, 1000)).unwrap();
    drop(f);
    rm_rf(&r("f1"));
    rm_rf(&r("del"));
    mv(root, "f2", "f2renamed");
    mv(root, "a", "a2");
    mv(root, "a2/sub", "a2/sub2");
    write(&r("a2/x"), b"changed inside a renamed dir");
    write(&r("a2/new"), b"new inside a renamed dir");
    rm_rf(&r("a2/sub2/y"));
    mv(root, "a2/sub2/inner", "inner_moved");
    rm_rf(&r("c"));
    write(&r("c"), b"a dir became a file");
    rm_rf(&r("e"));
    mkdirs(&r("e"));
    write(&r("e/child"), b"a file became a dir");
    chmod(&r("m"), 0o700);
    set_xattr(&r("x/file"), "user.new", b"new");
    set_xattr(&r("x/file"), "user.old", b"changed");
    rustix::fs::lremovexattr(r("x/other"), "user.old").expect("removexattr");
    rustix::fs::lremovexattr(r("x"), "user.gone").expect("removexattr");
    mkdirs(&r("new/deeper"));
    write(&r("new/deeper/file"), &random(rng, 3000));
    write(&r("new/zeros"), &[0; 4096]);
    chown(&r("own"), 1000, 1000);
    mv(root, "p", "swap");
    mv(root, "q", "p");
    mv(root, "swap", "q");
    rm_rf(&r("r2"));
    mv(root, "r1", "r2");
    rm_rf(&r("ln"));
    ln_s("f2renamed", &r("ln"));
    rm_rf(&r("sl"));
    ln_s("a2", &r("sl"));
}

/// s2 → s3: renames back, type changes back, metadata-only changes of directories.
pub(crate) fn change_2(root: &Path, rng: &mut StdRng) {
    let r = |p: &str| root.join(p);
    mv(root, "a2", "a");
    write(&r("a/keep"), b"changed after the rename back");
    rm_rf(&r("inner_moved"));
    mv(root, "new/deeper", "new/deeper2");
    write(&r("new/deeper2/more"), &random(rng, 10));
    chmod(&r("mx"), 0o750);
    set_xattr(&r("mx"), "user.k", b"on a dir whose entries did not change");
    rm_rf(&r("c"));
    mkdirs(&r("c"));
    write(&r("c/again"), b"a file became a dir again");
    rm_rf(&r("e"));
    write(&r("e"), b"a dir became a file again");
    mkdirs(&r("z1/z2"));
    mv(root, "q", "z1/z2/q");
    ln_s("/nowhere", &r("dangling"));
    write(&r("f2renamed"), b"changed");
    chmod(&r("f2renamed"), 0o600);
    mv(root, "f2renamed", "a/f2");
    fs::hard_link(r("bigfile"), r("hardlink")).expect("link");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_stream_rebuilds_the_snapshot_and_tar_reads_it() {
    let mut rng = StdRng::seed_from_u64(1);
    let m = SnapMount::start(Form::Separate, |live| build_varied(live, &mut rng));
    m.take(Some("s1"));
    let view = m.view("s1");
    let stream = m.scratch().path().join("s1.tar");
    send(&m, "s1", None, &stream);

    // Next to the stage (objects renamed into place), and on another filesystem (copied).
    let same_fs = m.scratch().mkdir("same-fs");
    let other_fs = m.scratch().mkdir("other-fs");
    let _tmpfs = KernelMount::tmpfs(&other_fs);
    chmod(&other_fs, 0o755);
    for dir in [&same_fs, &other_fs] {
        receive(dir, &stream);
        assert_same(&view, dir, true, &format!("{} after receiving s1", dir.display()));
        assert_eq!(stages_in(m.scratch().path()), Vec::<String>::new(), "stage dirs left behind");
    }

    // A stream GNU tar makes (`./` entries, hard links as links) is received alike.
    let gnu = m.scratch().path().join("gnu.tar");
    let args = ["--xattrs", "--xattrs-include=*", "--format=pax", "-C"].map(OsString::from);
    let args = [&args[..], &[view.clone().into(), "-cf".into(), gnu.clone().into(), ".".into()]].concat();
    run_with_deadline(OsStr::new("tar"), &args).unwrap_or_else(|e| panic!("{e}")).expect_ok("tar -cf");
    let from_gnu = m.scratch().mkdir("from-gnu");
    receive(&from_gnu, &gnu);
    assert_same(&view, &from_gnu, true, "after receiving GNU tar's stream of s1");

    let listing = tar_list(&stream);
    let split = format!("d1/d2/d3/{}/{}", "x".repeat(90), "y".repeat(90));
    let long = format!("d1/{}", "n".repeat(150));
    for name in ["big", "empty_file", "d1/", "d1/d2/d3/deep", "fifo", "null", "link -> big", "sticky/", &split, &long] {
        assert!(listed(&listing, name), "tar -tvf does not list {name}:\n{listing}");
    }
    assert!(!listing.contains(".snapshots") && !listing.contains(".wh."), "a full stream lists:\n{listing}");
}

#[test]
fn incremental_streams_follow_a_chain_of_snapshots() {
    let mut rng = StdRng::seed_from_u64(2);
    let m = SnapMount::start(Form::Stacked, |live| build_chain(live, &mut rng));
    m.take(Some("s1"));
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));
    change_2(m.mnt(), &mut rng);
    m.take(Some("s3"));

    let dest = m.scratch().mkdir("dest");
    let full = m.scratch().path().join("s1.tar");
    send(&m, "s1", None, &full);
    receive(&dest, &full);
    assert_same(&m.view("s1"), &dest, true, "dest after the full stream of s1");
    for (a, b) in [("s1", "s2"), ("s2", "s3")] {
        let stream = m.scratch().path().join(format!("{a}-{b}.tar"));
        send(&m, b, Some(a), &stream);
        let listing = tar_list(&stream);
        assert!(listing.lines().any(|l| l.contains(".wh.")), "{a}→{b} has no whiteouts:\n{listing}");
        assert!(!listing.contains("untouched"), "{a}→{b} carries what did not change:\n{listing}");
        receive(&dest, &stream);
        assert_same(&m.view(b), &dest, true, &format!("dest after the stream {a}→{b}"));
        assert_eq!(stages_in(m.scratch().path()), Vec::<String>::new(), "stage dirs left behind");
    }
    let listing = tar_list(&m.scratch().path().join("s1-s2.tar"));
    for name in
        [".wh.f1", ".wh.del", ".wh.a", "a2/", "a2/.wh..wh..opq", "a2/x", "a2/new", "c", "e/child", "inner_moved/"]
    {
        assert!(listed(&listing, name), "s1→s2 does not list {name}:\n{listing}");
    }
}

/// Regression: a change of the root's own metadata (its mode here) made the incremental stream
/// empty. The plan took the root for a replaced directory, to be sent whole, which covered
/// every change below it, and a full stream has no entry for the root: `send` wrote nothing,
/// `receive` applied nothing, and the replica silently stayed at the older snapshot (the model
/// test's seed 3 with incremental streams).
#[test]
fn an_incremental_stream_after_a_change_of_the_root_carries_every_change() {
    let mut rng = StdRng::seed_from_u64(7);
    let m = SnapMount::start(Form::Separate, |live| build_chain(live, &mut rng));
    m.take(Some("s1"));
    chmod(m.mnt(), 0o750);
    write(&m.mnt().join("added"), b"new at the top");
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));
    let dest = m.scratch().mkdir("dest");
    let stream = m.scratch().path().join("stream.tar");
    send(&m, "s1", None, &stream);
    receive(&dest, &stream);
    send(&m, "s2", Some("s1"), &stream);
    let listing = tar_list(&stream);
    for name in ["added", ".wh.f1", "c"] {
        assert!(listed(&listing, name), "s1→s2 does not list {name}:\n{listing}");
    }
    receive(&dest, &stream);
    // A stream carries what is below the root; the target keeps its own root (see `stream`).
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o750)).unwrap();
    assert_same(&m.view("s2"), &dest, true, "dest after the stream s1→s2");
}

/// A full stream carries the root's own metadata (`./`), which a receive gives a target it
/// makes: a tree whose root was 0700 landed under a root of the receiver's umask (0755), its
/// files open to every user of the machine. A target the receive finds keeps its own root; a
/// new one stays 0700 until the end, or gets the umask's mode from a stream without `./`.
#[test]
fn a_received_tree_gets_its_roots_mode_owner_and_xattrs_in_a_new_target_only() {
    let m = SnapMount::start(Form::Separate, |live| {
        write(&live.join("private"), b"for the owner only");
        chmod(live, 0o700);
        std::os::unix::fs::chown(live, Some(1234), Some(5678)).unwrap();
        set_xattr(live, "user.root", b"kept");
    });
    m.take(Some("s1"));
    let stream = m.scratch().path().join("s1.tar");
    send(&m, "s1", None, &stream);
    assert!(tar_list(&stream).lines().next().is_some_and(|l| l.ends_with(" ./")), "the root's entry comes first");
    let new = m.scratch().path().join("new");
    receive(&new, &stream);
    let md = fs::symlink_metadata(&new).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o700, 1234, 5678), "the new target's root");
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(&new, "user.root", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"kept", "the root's xattr");
    assert_eq!(md.mtime(), fs::symlink_metadata(m.view("s1")).unwrap().mtime(), "the root's mtime");
    // A target that exists keeps its own root.
    let old = m.scratch().mkdir("old");
    chmod(&old, 0o755);
    receive(&old, &stream);
    let md = fs::symlink_metadata(&old).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o755, 0), "an existing target's root");
    // A stream with no root entry (GNU tar of the names below it): the umask's mode.
    let gnu = m.scratch().path().join("gnu.tar");
    let args = ["-C".into(), m.view("s1").into_os_string(), "-cf".into(), gnu.clone().into(), "private".into()];
    run_with_deadline(OsStr::new("tar"), &args).unwrap_or_else(|e| panic!("{e}")).expect_ok("tar -cf");
    let plain = m.scratch().path().join("plain");
    receive(&plain, &gnu);
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let umask =
        status.lines().find_map(|l| l.strip_prefix("Umask:")).map(|u| u32::from_str_radix(u.trim(), 8).unwrap());
    assert_eq!(fs::symlink_metadata(&plain).unwrap().mode() & 0o7777, 0o777 & !umask.unwrap(), "the umask's mode");
}

/// The same snapshot sends the same bytes (what an OCI registry needs to dedupe layers, issue
/// 22): twice in one mount, after a remount, and after a snapshot between was deleted (its
/// layer merged into the older one's), for full and incremental streams, hard links included.
#[test]
fn sends_are_byte_for_byte_reproducible() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut m = SnapMount::start(Form::Stacked, |live| {
        build_chain(live, &mut rng);
        fs::write(live.join("linked"), b"one inode, two names\n").unwrap();
        fs::hard_link(live.join("linked"), live.join("linked2")).unwrap();
    });
    m.take(Some("s1"));
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));
    change_2(m.mnt(), &mut rng);
    m.take(Some("s3"));
    fs::write(m.mnt().join("after-s3"), b"LIVE only").unwrap();
    let sends: [(&str, Option<&str>); 4] = [("s1", None), ("s3", None), ("s3", Some("s1")), ("s2", Some("s1"))];
    let all = |m: &SnapMount, round: &str, upto: usize| -> Vec<Vec<u8>> {
        sends[..upto]
            .iter()
            .map(|(b, from)| {
                let out = m.scratch().path().join(format!("{round}-{b}-{}.tar", from.unwrap_or("full")));
                send(m, b, *from, &out);
                fs::read(&out).unwrap()
            })
            .collect()
    };
    let first = all(&m, "first", 4);
    assert!(first.iter().all(|t| t.len() > 1024), "every stream holds something");
    let same = |other: &[Vec<u8>], when: &str| {
        for (i, (a, b)) in first.iter().zip(other).enumerate() {
            let at = a.iter().zip(b).position(|(x, y)| x != y);
            assert!(
                a == b,
                "{when}: send {:?} differs (lengths {} and {}, first difference at {at:?})",
                sends[i],
                a.len(),
                b.len()
            );
        }
    };
    same(&all(&m, "again", 4), "sent again in the same mount");
    m.umount();
    m.mount();
    same(&all(&m, "remounted", 4), "after a remount");
    ovlsnap(&[OsStr::new("delete"), OsStr::new("s2"), OsStr::new("--mount"), m.mnt().as_os_str()])
        .expect_ok("delete s2");
    same(&all(&m, "deleted", 3), "after s2 was deleted");
}

/// Where each 512-byte header of a tar stream starts, with its type flag, data size and name.
fn headers(tar: &[u8]) -> Vec<(usize, u8, usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
        let field = String::from_utf8_lossy(&tar[at + 124..at + 136]).trim_matches(['\0', ' ']).to_owned();
        let size = usize::from_str_radix(&field, 8).unwrap_or_else(|_| panic!("size field {field:?} at {at}"));
        let name = tar[at..at + 100].split(|b| *b == 0).next().unwrap_or_default().to_vec();
        out.push((at, tar[at + 156], size, name));
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

#[test]
fn truncated_and_corrupt_streams_change_nothing() {
    let mut rng = StdRng::seed_from_u64(3);
    let m = SnapMount::start(Form::Separate, |live| build_chain(live, &mut rng));
    m.take(Some("s1"));
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));
    let dest = m.scratch().mkdir("dest");
    let full = m.scratch().path().join("s1.tar");
    send(&m, "s1", None, &full);
    receive(&dest, &full);
    let good = m.scratch().path().join("s1-s2.tar");
    send(&m, "s2", Some("s1"), &good);
    let bytes = fs::read(&good).unwrap();

    let hdrs = headers(&bytes);
    let objects: Vec<_> = hdrs.iter().filter(|h| h.1 != b'x').collect();
    let (big_at, _, big_size, _) = **objects.iter().max_by_key(|h| h.2).unwrap();
    // Cut right after data ending in zeros, the stream ends in zeros as a whole one does.
    let zeros = objects.iter().find(|h| h.3 == b"new/zeros").expect("the stream holds new/zeros");
    assert!(big_size > 100_000, "the stream holds bigfile");
    // An entry boundary: the first header of an entry (its PAX header if it has one).
    let boundaries: Vec<usize> = hdrs.windows(2).filter(|w| w[0].1 != b'x').map(|w| w[1].0).collect();
    let boundary = boundaries[boundaries.len() / 2];
    let mut flipped = bytes.clone();
    flipped[objects[objects.len() / 2].0 + 3] ^= 0x20;
    let mut trailing = bytes.clone();
    let n = trailing.len();
    trailing[n - 100] = 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("cut in a header", bytes[..objects[2].0 + 100].to_vec()),
        ("cut in the data of bigfile", bytes[..big_at + 512 + big_size / 2].to_vec()),
        ("cut at a block boundary in the data of bigfile", bytes[..big_at + 512 + 512 * 100].to_vec()),
        ("cut at an entry boundary", bytes[..boundary].to_vec()),
        ("cut after a file of zeros", bytes[..zeros.0 + 512 + zeros.2].to_vec()),
        ("without the end-of-archive marker", bytes[..n - 1024].to_vec()),
        ("with half the end-of-archive marker", bytes[..n - 512].to_vec()),
        ("with a flipped bit in a header", flipped),
        ("with garbage in the end-of-archive marker", trailing),
    ];
    let before = (record_tree(&dest), owners_times(&dest, true));
    for (what, data) in &cases {
        let bad = m.scratch().path().join("bad.tar");
        write(&bad, data);
        let out = try_receive(&dest, &bad);
        let err = out.expect_failure(&format!("receiving a stream {what}"));
        assert!(err.contains("truncated") || err.contains("corrupt"), "a stream {what}: the message says why\n{out}");
        assert_same_tree(&before.0, &record_tree(&dest), &format!("dest after a stream {what}"));
        assert_eq!(before.1, owners_times(&dest, true), "owners or times changed by a stream {what}");
        assert_eq!(stages_in(m.scratch().path()), Vec::<String>::new(), "a stream {what} left a stage dir");
    }
    receive(&dest, &good);
    assert_same(&m.view("s2"), &dest, false, "dest after the good stream");
}

/// One ustar header (and its data, padded) written by hand: streams no sender makes.
pub(crate) fn ustar(name: &[u8], typeflag: u8, mode: u32, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..265].copy_from_slice(b"ustar\x0000");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

pub(crate) fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = entries.concat();
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn hostile_streams_write_nothing_outside_the_target() {
    let s = Scratch::new();
    let dest = s.mkdir("dest");
    write(&dest.join("mine"), b"the target's own file");
    let outside = s.mkdir("outside");
    write(&outside.join("victim"), b"not the stream's to touch");
    let out_path = |n: &str| outside.join(n).into_os_string().into_vec();
    let file = |name: &[u8]| ustar(name, b'0', 0o644, b"", b"payload");

    // A legitimate symlink out of the target: receivers must never follow it.
    let streams = s.mkdir("streams");
    let link = streams.join("link.tar");
    write(&link, &archive(&[ustar(b"x", b'2', 0o777, &out_path(""), b"")]));
    receive(&dest, &link);

    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("../ in a name", archive(&[file(b"ok"), file(b"../escape")]), true),
        ("a name deeper with ../", archive(&[file(b"sub/../../escape")]), true),
        ("an absolute name", archive(&[file(&s.path().join("absolute").into_os_string().into_vec())]), true),
        (
            "an entry below a symlink of the stream",
            archive(&[ustar(b"y", b'2', 0o777, &out_path(""), b""), file(b"y/planted")]),
            true,
        ),
        ("an entry below a symlink of the target", archive(&[file(b"x/planted")]), true),
        ("a hard link out of the target", archive(&[ustar(b"h", b'1', 0o644, &out_path("victim"), b"")]), true),
        ("a whiteout of ..", archive(&[file(b"sub/.wh..")]), true),
        // Nothing to refuse: the whiteout names nothing inside the target.
        ("a whiteout below a symlink of the target", archive(&[file(b"x/.wh.victim")]), false),
    ];
    let outside_before = record_tree(&outside);
    let scratch_before = names_in(s.path());
    for (what, data, refused) in &cases {
        let before = record_tree(&dest);
        let stream = streams.join("hostile.tar");
        write(&stream, data);
        let out = try_receive(&dest, &stream);
        if *refused {
            out.expect_failure(&format!("receiving a stream with {what}"));
            assert_same_tree(&before, &record_tree(&dest), &format!("dest after a stream with {what}"));
        }
        assert_same_tree(&outside_before, &record_tree(&outside), &format!("outside after a stream with {what}"));
        assert_eq!(names_in(s.path()), scratch_before, "next to dest after a stream with {what}");
    }
    assert!(fs::symlink_metadata(Path::new("/escape")).is_err(), "/escape exists");
}

#[test]
fn a_snapshot_mount_receives_and_keeps_its_snapshots() {
    let mut rng = StdRng::seed_from_u64(5);
    let src = SnapMount::start(Form::Separate, |live| build_chain(live, &mut rng));
    src.take(Some("s1"));
    change_1(src.mnt(), &mut rng);
    src.take(Some("s2"));
    let full = src.scratch().path().join("s1.tar");
    let inc = src.scratch().path().join("s1-s2.tar");
    send(&src, "s1", None, &full);
    send(&src, "s2", Some("s1"), &inc);

    let mut dst = SnapMount::prepare(Form::Stacked);
    receive(dst.live(), &full);
    dst.mount();
    dst.take(Some("t1"));
    let t1 = record_tree(&dst.view("t1"));
    assert_same_tree(&record_tree(&src.view("s1")), &t1, "t1");
    receive(dst.mnt(), &inc);
    assert_same(&src.view("s2"), dst.mnt(), false, "the snapshot mount after the stream s1→s2");
    assert_same_tree(&t1, &record_tree(&dst.view("t1")), "t1 after the receive");
    assert_eq!(stages_in(dst.scratch().path()), Vec::<String>::new(), "stage dirs left behind");
    assert_eq!(stages_in(dst.mnt()), Vec::<String>::new(), "stage dirs left in the mount");
}

/// One random change to the tree at `root` (through the mount): writes, creates, renames (dirs
/// into other dirs, over nothing), removals of files and trees, type changes, chmod, xattrs.
fn random_change(root: &Path, rng: &mut StdRng) {
    let all = list_kinds(root);
    let dirs: Vec<PathBuf> =
        std::iter::once(PathBuf::new()).chain(all.iter().filter(|e| e.1 == Kind::Dir).map(|e| e.0.clone())).collect();
    let pick_dir = |rng: &mut StdRng| dirs[rng.random_range(0..dirs.len())].clone();
    let fresh = |rng: &mut StdRng, dir: &Path| loop {
        let p = dir.join(format!("n{}", rng.random_range(0..1000)));
        if fs::symlink_metadata(root.join(&p)).is_err() {
            break p;
        }
    };
    let Some((path, kind)) = (!all.is_empty()).then(|| all[rng.random_range(0..all.len())].clone()) else {
        return mkdirs(&root.join("n0"));
    };
    let p = root.join(&path);
    match rng.random_range(0..10) {
        0 if kind == Kind::File => write(&p, &random(rng, 2000)),
        0 | 1 => {
            let dir = pick_dir(rng);
            write(&root.join(fresh(rng, &dir)), &random(rng, 500));
        }
        2 => {
            let dir = pick_dir(rng);
            mkdirs(&root.join(fresh(rng, &dir)));
        }
        3 | 4 => {
            let dir = pick_dir(rng);
            if !dir.starts_with(&path) {
                let to = fresh(rng, &dir);
                mv(root, path.to_str().unwrap(), to.to_str().unwrap());
            }
        }
        5 => rm_rf(&p),
        6 => {
            // The same name, the other type.
            rm_rf(&p);
            if kind == Kind::Dir {
                write(&p, b"was a dir");
            } else {
                mkdirs(&p.join("was-a-file"));
            }
        }
        7 if kind != Kind::Symlink => chmod(&p, [0o700, 0o755, 0o640, 0o1777][rng.random_range(0..4)]),
        8 if kind != Kind::Symlink => set_xattr(&p, &format!("user.r{}", rng.random_range(0..3)), &random(rng, 8)),
        9 if kind != Kind::Symlink => {
            let _ = rustix::fs::lremovexattr(&p, "user.r0");
        }
        _ => {
            let dir = pick_dir(rng);
            ln_s("somewhere", &root.join(fresh(rng, &dir)));
        }
    }
}

#[test]
fn random_changes_round_trip_through_incremental_streams() {
    let seeds: u64 = std::env::var("OVLSNAP_STREAM_SEEDS").map_or(3, |v| v.parse().expect("OVLSNAP_STREAM_SEEDS"));
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(100 + seed);
        let m = SnapMount::start(Form::Separate, |live| build_chain(live, &mut rng));
        let names = ["s0", "s1", "s2", "s3"];
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                for _ in 0..30 {
                    random_change(m.mnt(), &mut rng);
                }
            }
            m.take(Some(name));
        }
        let context = |what: &str| format!("seed {seed}: {what}");
        let dest = m.scratch().mkdir("dest");
        let stream = m.scratch().path().join("stream.tar");
        send(&m, "s0", None, &stream);
        receive(&dest, &stream);
        for w in names.windows(2) {
            send(&m, w[1], Some(w[0]), &stream);
            receive(&dest, &stream);
            assert_same(&m.view(w[1]), &dest, false, &context(&format!("after {}→{}", w[0], w[1])));
        }
        // Across several layers at once, onto a copy of s0.
        let skip = m.scratch().mkdir("skip");
        send(&m, "s0", None, &stream);
        receive(&skip, &stream);
        send(&m, "s3", Some("s0"), &stream);
        receive(&skip, &stream);
        assert_same(&m.view("s3"), &skip, false, &context("after s0→s3"));
    }
}

// Issue 8: a killed receive left its stage dir next to the target for good. A receive now
// removes the stages there that no live receive holds (their `lock` is free, or they have none
// yet and their process is gone), and never a running receive's.
#[test]
fn a_receive_removes_stages_of_dead_receives_and_keeps_live_ones() {
    use std::process::{Command, Stdio};
    let s = Scratch::new();
    let parent = s.mkdir("parent");
    let stream = s.path().join("one.tar");
    write(&stream, &archive(&[ustar(b"f", b'0', 0o644, b"", b"data")]));
    // A receive that runs (it waits for its stream) holds its stage.
    let mut running = Command::new(ovlsnap_bin())
        .arg("receive")
        .arg(parent.join("slow"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ovlsnap receive");
    let running_stage = parent.join(format!(".ovlsnap-receive.{}", running.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !running_stage.join("lock").exists() {
        assert!(std::time::Instant::now() < deadline, "the running receive made no locked stage");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // Made after the running receive swept the parent at its start.
    // A dead process's stage without a lock (killed right after making it).
    let dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let no_lock_dead = parent.join(format!(".ovlsnap-receive.{dead_pid}"));
    mkdirs(&no_lock_dead.join("tree/a"));
    write(&no_lock_dead.join("stream"), b"half a stream");
    // A stage whose lock nobody holds, named after a live process (a reused pid): the lock decides.
    let me = std::process::id();
    let free_lock = parent.join(format!(".ovlsnap-receive.{me}.3"));
    mkdirs(&free_lock.join("tree"));
    write(&free_lock.join("lock"), b"");
    // A stage of a live process without a lock yet (one being made now): kept.
    let being_made = parent.join(format!(".ovlsnap-receive.{me}.4"));
    mkdirs(&being_made);
    // Not a stage: kept.
    write(&parent.join(".ovlsnap-receive.notes"), b"someone's file");

    receive(&parent.join("t"), &stream);
    assert_eq!(fs::read(parent.join("t/f")).unwrap(), b"data");
    let mut left = stages_in(&parent);
    left.sort();
    let mut want = vec![
        ".ovlsnap-receive.notes".to_owned(),
        format!(".ovlsnap-receive.{}", running.id()),
        format!(".ovlsnap-receive.{me}.4"),
    ];
    want.sort();
    assert_eq!(left, want, "stages after a receive next to them");

    let mut stdin = running.stdin.take().unwrap();
    stdin.write_all(&fs::read(&stream).unwrap()).unwrap();
    drop(stdin);
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success(), "the running receive: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(parent.join("slow/f")).unwrap(), b"data");
    fs::remove_dir(&being_made).unwrap();
    fs::remove_file(parent.join(".ovlsnap-receive.notes")).unwrap();
    assert_eq!(stages_in(&parent), Vec::<String>::new(), "stages after both receives");
}
