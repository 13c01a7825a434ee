//! Issue 15: only those allowed change snapshots, reads reveal nothing a caller could not read
//! through the tree, and no one can impersonate the daemon. The CLI runs as uid 1000 (and 1001,
//! a member of an allowed group) through `setpriv` against a root-owned mount; each denied command
//! must fail with a one-line "permission denied" naming the permission and leave the store byte
//! for byte as it was. The control socket is then attacked directly: a socket planted by another
//! user, a symlink in its place, garbage, oversized and cut-off requests, a flood of connections,
//! a dead daemon.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// Where root's daemons keep their sockets (snap-fs's `control::RUN_DIR`).
const RUN_DIR: &str = "/run/ovlsnap";

/// A user the tests act as: uid, primary gid, supplementary groups.
#[derive(Clone, Copy)]
struct User {
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

const ALICE: User = User { uid: 1000, gid: 1000, groups: &[] };
/// In group 4242, which a test grants `delete`.
const BOB: User = User { uid: 1001, gid: 1001, groups: &[4242] };

/// Runs `ovlsnap args` as `user`.
fn as_user<S: AsRef<OsStr>>(user: User, args: &[S]) -> CliOutput {
    let mut argv: Vec<OsString> =
        vec!["--reuid".into(), user.uid.to_string().into(), "--regid".into(), user.gid.to_string().into()];
    if user.groups.is_empty() {
        argv.push("--clear-groups".into());
    } else {
        let list: Vec<String> = user.groups.iter().map(u32::to_string).collect();
        argv.extend(["--groups".into(), list.join(",").into()]);
    }
    argv.push(shared_bin().into());
    argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
    run_with_deadline(OsStr::new("setpriv"), &argv).unwrap_or_else(|e| panic!("{e}"))
}

/// The binary under test copied where every user can run it (the build dir may be root's).
fn shared_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("ovlsnap-bin.").tempdir().unwrap().keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("ovlsnap");
        fs::copy(ovlsnap_bin(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        bin
    })
    .clone()
}

/// Debian's Python (root's own may live under /root, out of other users' reach).
const PYTHON: &str = "/usr/bin/python3";

/// A root-owned LIVE (0755, with `pub/` 0755 and `secret/` 0700) served at a separate MNT, so
/// the store under LIVE stays reachable for byte comparison; the scratch dir is opened up for
/// other users to reach MNT.
fn mount_with_secret() -> SnapMount {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::set_permissions(m.scratch().path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(m.mnt(), fs::Permissions::from_mode(0o755)).unwrap();
    let live = m.live().to_path_buf();
    fs::create_dir(live.join("pub")).unwrap();
    fs::write(live.join("pub/a"), b"a1\n").unwrap();
    fs::create_dir(live.join("secret")).unwrap();
    fs::set_permissions(live.join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(live.join("secret/payroll-2026"), b"s1\n").unwrap();
    fs::write(live.join("secret/old-plans"), b"p\n").unwrap();
    m.mount();
    m
}

/// `args` followed by `--mount MNT`.
fn mnt_args(m: &SnapMount, args: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
    v.extend(["--mount".into(), m.mnt().into()]);
    v
}

fn store_of(m: &SnapMount) -> PathBuf {
    m.live().join(".ovlsnap")
}

/// The store of `m`, byte for byte, but for the seal (and its temp file) and the layer
/// summaries: the daemon writes them in the background after every take (`snap_fs` seal and
/// summary), whatever callers do. (The summaries are checked against their layers in
/// `summaries.rs`.)
fn store_tree(m: &SnapMount) -> Tree {
    // Rewritten in the background after each change (a temp file renamed into place): skipped
    // while walking, not after, or they may vanish between the listing and the record.
    record_tree_skipping(&store_of(m), &["seal", "seal.tmp", "summaries"])
}

/// Asserts that `out` failed with a one-line permission error that names `what`.
fn assert_denied(out: &CliOutput, what: &str) {
    let err = out.expect_failure(what);
    assert!(err.contains("permission denied") && err.contains(what), "{what}: not a permission error naming it\n{out}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: the error must be one line\n{out}");
    assert!(out.stdout.trim().is_empty(), "{what}: a denied command printed output\n{out}");
}

#[test]
fn a_user_without_a_grant_changes_nothing() {
    let m = mount_with_secret();
    m.take(Some("t1"));
    fs::write(m.mnt().join("pub/a"), b"a2\n").unwrap();
    m.take(Some("t2"));
    let clone_dir = m.scratch().mkdir("clone");
    fs::set_permissions(&clone_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let before = store_tree(&m);
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["take", "evil"])), "take");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["delete", "t1"])), "delete");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["restore", "t1"])), "restore");
    let clone =
        [OsStr::new("clone"), OsStr::new("t1"), clone_dir.as_os_str(), OsStr::new("--mount"), m.mnt().as_os_str()];
    assert_denied(&as_user(ALICE, &clone), "clone");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["rename", "t1", "mine"])), "rename");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["hold", "keep", "t1"])), "hold");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["release", "keep", "t1"])), "hold");
    for args in [&["allow", "1000", "all"][..], &["unallow", "1000"]] {
        assert_denied(&as_user(ALICE, &mnt_args(&m, args)), "change who may change snapshots");
    }
    assert_same_tree(&before, &store_tree(&m), "the store after denied commands");
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["t1", "t2"]);
    assert_eq!(fs::read(m.mnt().join("pub/a")).unwrap(), b"a2\n", "a denied restore changed LIVE");
    assert!(mounts_at(&clone_dir).is_empty(), "a denied clone mounted something");
}

#[test]
fn grants_let_users_and_group_members_change_snapshots_until_taken_back() {
    let mut m = mount_with_secret();
    m.take(Some("t1"));
    ovlsnap(&mnt_args(&m, &["allow", "1000", "take"])).expect_ok("allow 1000 take");
    ovlsnap(&mnt_args(&m, &["allow", "@4242", "delete,restore"])).expect_ok("allow @4242");
    as_user(ALICE, &mnt_args(&m, &["take", "by-alice"])).expect_ok("alice may take");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["delete", "t1"])), "delete");
    as_user(BOB, &mnt_args(&m, &["delete", "t1"])).expect_ok("a member of @4242 may delete");
    ovlsnap(&mnt_args(&m, &["allow", "1000", "hold"])).expect_ok("allow 1000 hold");
    as_user(ALICE, &mnt_args(&m, &["hold", "mine", "by-alice"])).expect_ok("alice may hold");
    let held = as_user(BOB, &mnt_args(&m, &["delete", "by-alice"]));
    assert!(held.expect_failure("delete of a held snapshot").contains("is held"), "{held}");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["rename", "by-alice", "x"])), "rename");
    as_user(ALICE, &mnt_args(&m, &["release", "mine", "by-alice"])).expect_ok("alice may release");
    assert_denied(&as_user(BOB, &mnt_args(&m, &["take", "by-bob"])), "take");
    // The grants are the store's: they survive a remount.
    m.umount();
    m.mount();
    let listed = ovlsnap(&mnt_args(&m, &["allow", "--list", "--json"]));
    let text = listed.expect_ok("allow --list --json");
    for want in ["\"user\": 1000", "\"group\": 4242", "\"take\"", "\"delete\"", "\"restore\""] {
        assert!(text.contains(want), "the grant list lacks {want}\n{listed}");
    }
    as_user(ALICE, &mnt_args(&m, &["take", "again"])).expect_ok("the grant survived the remount");
    ovlsnap(&mnt_args(&m, &["unallow", "1000"])).expect_ok("unallow 1000");
    ovlsnap(&mnt_args(&m, &["unallow", "@4242", "delete"])).expect_ok("unallow @4242 delete");
    assert_denied(&as_user(ALICE, &mnt_args(&m, &["take", "late"])), "take");
    assert_denied(&as_user(BOB, &mnt_args(&m, &["delete", "again"])), "delete");
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["by-alice", "again"]);
}

#[test]
fn the_owner_of_live_may_change_its_snapshots_and_delegate() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::set_permissions(m.scratch().path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(m.mnt(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.live().join("f"), b"1\n").unwrap();
    std::os::unix::fs::chown(m.live(), Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    m.mount();
    as_user(ALICE, &mnt_args(&m, &["take", "mine"])).expect_ok("the owner takes");
    assert_denied(&as_user(BOB, &mnt_args(&m, &["take", "bobs"])), "take");
    as_user(ALICE, &mnt_args(&m, &["allow", "1001", "take"])).expect_ok("the owner delegates");
    as_user(BOB, &mnt_args(&m, &["take", "bobs"])).expect_ok("delegated take");
    as_user(ALICE, &mnt_args(&m, &["delete", "bobs"])).expect_ok("the owner deletes");
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["mine"]);
}

#[test]
fn reads_need_live_readable_and_show_no_name_the_caller_cannot_list() {
    let m = mount_with_secret();
    m.take(Some("t1"));
    fs::write(m.mnt().join("pub/a"), b"a2\n").unwrap();
    fs::write(m.mnt().join("pub/new"), b"n\n").unwrap();
    fs::write(m.mnt().join("secret/payroll-2026"), b"s2\n").unwrap();
    fs::write(m.mnt().join("secret/layoffs"), b"l\n").unwrap();
    fs::remove_file(m.mnt().join("secret/old-plans")).unwrap();
    m.take(Some("t2"));
    let secret_names = ["secret/payroll-2026", "secret/layoffs", "secret/old-plans"];

    let root_diff = ovlsnap(&mnt_args(&m, &["diff", "t1"]));
    for n in secret_names {
        assert!(root_diff.expect_ok("root's diff").contains(n), "root must see {n}\n{root_diff}");
    }
    for args in [&["diff", "t1"][..], &["diff", "t1", "t2", "--json"], &["diff", "t1", "--json"]] {
        let out = as_user(ALICE, &mnt_args(&m, args));
        let text = out.expect_ok("alice's diff");
        assert!(text.contains("pub/new") && text.contains("pub/a"), "alice must see pub's changes\n{out}");
        for n in secret_names {
            assert!(!text.contains(n), "{args:?} revealed {n} to a user who cannot list secret/\n{out}");
        }
    }
    // send --from reads the diff and the view as the caller: no secret name gets out either.
    let sent = as_user(ALICE, &mnt_args(&m, &["send", "--from", "t1", "t2"]));
    sent.expect_ok("alice's send");
    for n in ["payroll", "layoffs", "old-plans"] {
        assert!(!sent.stdout.contains(n), "send revealed {n}\n{sent}");
    }
    for args in [&["list"][..], &["status"], &["diff", "t1"], &["allow", "--list"]] {
        as_user(ALICE, &mnt_args(&m, args)).expect_ok("a reader of LIVE may read");
    }
    // check reads the store through the daemon's descriptors, which only root may: it fails, and
    // tells nothing of the secret names.
    let checked = as_user(ALICE, &mnt_args(&m, &["check", "--json"]));
    assert!(!checked.success(), "{checked}");
    for n in secret_names {
        assert!(!checked.stdout.contains(n) && !checked.stderr.contains(n), "check revealed {n}\n{checked}");
    }

    // LIVE's root closed to others: nothing is told, not even the list.
    fs::set_permissions(m.live(), fs::Permissions::from_mode(0o700)).unwrap();
    let dir = m.scratch().mkdir("kview");
    let dir_s = dir.to_str().unwrap();
    for args in [&["list"][..], &["status"], &["diff", "t1"], &["mount-cmd", "t1", dir_s], &["allow", "--list"]] {
        let out = as_user(ALICE, &mnt_args(&m, args));
        assert_denied(&out, "read this mount's snapshots");
    }
    fs::set_permissions(m.live(), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Starts a fake daemon listening at `path` that answers every request with a shell command;
/// it binds as root (the socket file is root's) and listens as uid 1000 when `listen_as_user`,
/// else does both as uid 1000. Kill it when done.
fn fake_daemon(path: &Path, listen_as_user: bool) -> std::process::Child {
    let script = r#"
import socket, sys, os
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
if os.getuid() == 0:
    os.setgroups([]); os.setgid(1000); os.setuid(1000)
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(65536)
        c.sendall(b'{"error": null, "value": "touch /tmp/ovlsnap-pwned; echo pwned"}\n')
    except OSError:
        pass
    c.close()
"#;
    let mut cmd = if listen_as_user {
        std::process::Command::new(PYTHON)
    } else {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid", "1000", "--regid", "1000", "--clear-groups", PYTHON]);
        c
    };
    let mut child =
        cmd.arg("-c").arg(script).arg(path).stdout(std::process::Stdio::piped()).spawn().expect("start a fake daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening", "the fake daemon did not start");
    child
}

/// The daemon's socket: where the client looks for it (named after the mount), checked against
/// the pid file beside it. (Searching RUN_DIR for a pid file naming the daemon found, once in CI,
/// the stale file of a killed daemon whose pid number had come round again: pid_max is 32768.)
fn socket_of(m: &SnapMount) -> PathBuf {
    let status = ovlsnap(&mnt_args(m, &["status", "--json"]));
    let text = status.expect_ok("status");
    let pid = text.split("\"pid\":").nth(1).and_then(|r| r.trim().split([',', '\n']).next()).unwrap().trim().to_owned();
    let mnt = fs::canonicalize(m.mnt()).unwrap();
    let sock = snap_fs::control::socket_path(&mnt, 0);
    assert!(sock.starts_with(RUN_DIR), "{sock:?}");
    let named = fs::read_to_string(snap_fs::control::pid_path(&mnt, 0)).unwrap_or_default();
    assert_eq!(named.trim(), pid, "the pid file beside {sock:?}");
    sock
}

#[test]
fn the_socket_directory_is_roots_and_a_planted_socket_is_refused() {
    let m = mount_with_secret();
    m.take(Some("t1"));
    let run = fs::symlink_metadata(RUN_DIR).unwrap();
    assert!(
        run.is_dir() && run.uid() == 0 && run.mode() & 0o7777 == 0o755,
        "{RUN_DIR}: uid {} mode {:o}",
        run.uid(),
        run.mode()
    );
    let sock = socket_of(&m);
    let real = m.scratch().path().join("real.sock");

    // Root's socket path ends up at a socket of uid 1000's (as it could when the directory was
    // world-writable): one whose file is uid 1000's, and one whose file is root's but whose
    // listener runs as uid 1000. Root's client must believe neither.
    let spot = m.scratch().mkdir("planted");
    fs::set_permissions(&spot, fs::Permissions::from_mode(0o777)).unwrap();
    fs::rename(&sock, &real).unwrap();
    let kdir = m.scratch().mkdir("kview");
    let _ = fs::remove_file("/tmp/ovlsnap-pwned");
    for (listen_as_user, why) in [(false, "not a socket made by root"), (true, "served by uid 1000")] {
        let fake_path = spot.join("fake.sock");
        let mut fake = fake_daemon(&fake_path, listen_as_user);
        fs::rename(&fake_path, &sock).unwrap();
        for args in [&["mount-cmd", "t1", kdir.to_str().unwrap()][..], &["status"], &["list"], &["take", "x"]] {
            let out = ovlsnap(&mnt_args(&m, args));
            let err = out.expect_failure("a planted socket");
            assert!(err.contains("refusing to trust") && err.contains(why), "{args:?}: not refused clearly\n{out}");
            assert!(out.stdout.is_empty(), "{args:?}: printed what a fake daemon said\n{out}");
        }
        let _ = fake.kill();
        let _ = fake.wait();
        fs::remove_file(&sock).unwrap();
    }
    assert!(!Path::new("/tmp/ovlsnap-pwned").exists());

    // A symlink to the real socket in its place is refused too.
    std::os::unix::fs::symlink(&real, &sock).unwrap();
    let out = ovlsnap(&mnt_args(&m, &["list"]));
    assert!(out.expect_failure("a symlinked socket").contains("refusing to trust"), "{out}");
    fs::remove_file(&sock).unwrap();
    fs::rename(&real, &sock).unwrap();
    ovlsnap(&mnt_args(&m, &["list"])).expect_ok("the real socket back in place");
}

/// Sends raw bytes and returns the daemon's one-line answer.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The daemon may answer (and close) before it read everything: a write error is fine.
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

#[test]
fn hostile_clients_leave_the_daemon_serving_and_the_store_unchanged() {
    let m = mount_with_secret();
    m.take(Some("t1"));
    let sock = socket_of(&m);
    let before = store_tree(&m);

    assert!(raw(&sock, b"\x00\xff garbage\n").contains("bad request"));
    assert!(raw(&sock, b"{\"cmd\":\"delete\",\"name\":1}\n").contains("bad request"));
    assert!(raw(&sock, b"{\"cmd\":\"frobnicate\"}\n").contains("bad request"));
    let huge = vec![b'x'; 1 << 20];
    assert!(raw(&sock, &huge).contains("too large"), "a 1 MiB request must be refused");
    {
        // Cut off mid-request: the client goes away.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"cmd\":\"delete\",\"na").unwrap();
    }
    // A thousand connections held open by root (exempt from the per-user cap) and a flood by
    // uid 1000, which gets "busy" beyond its cap: root's requests are still answered.
    let held: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let flood = r#"
import socket, sys
conns, busy = [], 0
for _ in range(40):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sys.argv[1])
    conns.append(c)
for c in conns[16:]:
    c.settimeout(20)
    if b"busy" in c.recv(4096):
        busy += 1
print(busy)
"#;
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "1000", "--regid", "1000", "--clear-groups", PYTHON, "-c", flood])
        .arg(&sock)
        .output()
        .expect("python3 flood");
    let busy: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert!(busy >= 20, "a user's connections beyond its cap must be refused as busy (got {busy})\n{out:?}");
    let listed = ovlsnap(&mnt_args(&m, &["list", "--json"]));
    assert!(listed.expect_ok("list during the flood").contains("\"t1\""), "{listed}");
    drop(held);
    assert_same_tree(&before, &store_tree(&m), "the store after hostile clients");
    m.take(Some("after"));
}

#[test]
fn a_dead_daemon_is_reported_not_trusted() {
    let mut m = mount_with_secret();
    let status = ovlsnap(&mnt_args(&m, &["status", "--json"]));
    let text = status.expect_ok("status").to_owned();
    let pid: i32 =
        text.split("\"pid\":").nth(1).and_then(|r| r.trim().split([',', '\n']).next()).unwrap().trim().parse().unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/exe")).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    m.mark_unmounted();
    let out = ovlsnap(&mnt_args(&m, &["list"]));
    let err = out.expect_failure("list on a dead daemon");
    assert!(err.contains("is gone") && err.contains(&pid.to_string()), "{out}");
}

/// Gives unprivileged users FUSE access, as a stock system does (udev makes `/dev/fuse` 0666;
/// some containers leave it 0600 for root alone).
fn fuse_for_everyone() {
    let m = fs::metadata("/dev/fuse").expect("/dev/fuse");
    if m.mode() & 0o006 != 0o006 {
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).expect("chmod /dev/fuse");
    }
}

/// Runs `script` with `sh -c` as `user` in `dir`.
fn sh_as(user: User, dir: &Path, script: &str) -> CliOutput {
    let argv: Vec<OsString> = vec![
        "--reuid".into(),
        user.uid.to_string().into(),
        "--regid".into(),
        user.gid.to_string().into(),
        "--clear-groups".into(),
        "sh".into(),
        "-c".into(),
        format!("cd '{}' && {script}", dir.display()).into(),
    ];
    run_with_deadline(OsStr::new("setpriv"), &argv).unwrap_or_else(|e| panic!("{e}"))
}

/// A LIVE and a MNT owned by `user`, in a scratch dir others can traverse.
fn users_dirs(user: User) -> (Scratch, PathBuf, PathBuf) {
    let s = Scratch::new();
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (live, mnt) = (s.mkdir("live"), s.mkdir("mnt"));
    fs::write(live.join("f"), b"v1\n").unwrap();
    fs::create_dir(live.join("d")).unwrap();
    fs::write(live.join("d/x"), b"x1\n").unwrap();
    for p in [&live, &mnt, &live.join("f"), &live.join("d"), &live.join("d/x")] {
        std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid)).unwrap();
    }
    (s, live, mnt)
}

#[test]
fn without_root_only_your_own_directory_mounts() {
    fuse_for_everyone();
    let (_s, live, mnt) = users_dirs(BOB);
    let out = as_user(
        ALICE,
        &[live.as_os_str(), mnt.as_os_str()].iter().fold(vec![OsString::from("mount")], |mut v, a| {
            v.push(a.into());
            v
        }),
    );
    assert!(out.expect_failure("mount of another user's dir").contains("only mount a directory you own"), "{out}");
    assert!(!is_fuse_mount(&mnt));
}

/// The user's socket directory is theirs alone: one made by someone else (it may be in /tmp) is
/// refused, and nothing is mounted.
#[test]
fn a_squatted_socket_directory_is_refused() {
    fuse_for_everyone();
    let carol = User { uid: 1002, gid: 1002, groups: &[] };
    let run = PathBuf::from("/tmp/ovlsnap-1002");
    let _ = fs::remove_dir_all(&run);
    fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(BOB.uid), Some(BOB.gid)).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).unwrap();
    let (_s, live, mnt) = users_dirs(carol);
    let out = as_user(carol, &[OsString::from("mount"), live.clone().into(), mnt.clone().into()]);
    let _ = fs::remove_dir_all(&run);
    let err = out.expect_failure("mount with a squatted socket dir");
    assert!(err.contains("/tmp/ovlsnap-1002") && err.contains("1001"), "{out}");
    assert!(!is_fuse_mount(&mnt), "{out}");
}

/// Issue 15: a user who owns LIVE and may use FUSE snapshots it without root. The daemon runs as
/// them (so it reaches nothing they could not), the mount is theirs alone, the layers carry
/// `user.overlay.*` (no `trusted.*`, which they cannot write), and root's client still talks to
/// the user's daemon, trusting it as the mount's owner.
#[test]
fn an_unprivileged_owner_snapshots_their_own_directory() {
    fuse_for_everyone();
    let (_s, live, mnt) = users_dirs(ALICE);
    let mount = as_user(ALICE, &[OsString::from("mount"), live.clone().into(), mnt.clone().into()]);
    mount.expect_ok("mount as its owner");
    assert!(is_fuse_mount(&mnt), "{mount}");
    let me = |args: &[&str]| {
        let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
        v.extend(["--mount".into(), mnt.clone().into()]);
        as_user(ALICE, &v)
    };
    me(&["take", "t1"]).expect_ok("take");
    sh_as(ALICE, &mnt, "echo v2 > f && mv d e && echo x2 > e/x && mkdir new").expect_ok("changes as alice");
    let views = sh_as(ALICE, &mnt, "cat .snapshots/t1/f .snapshots/t1/d/x f e/x; ls .snapshots/t1");
    assert_eq!(views.expect_ok("read the view"), "v1\nx1\nv2\nx2\nd\nf\n", "{views}");
    let diff = me(&["diff", "t1"]);
    let text = diff.expect_ok("diff");
    assert!(text.contains("/new") && text.contains("/f"), "{diff}");
    // t1's layer holds what the changes saved: a copy, a redirect, a whiteout.
    let mut names = Vec::new();
    let dump = std::process::Command::new("getfattr")
        .args(["-R", "-d", "-m", "-", "--absolute-names"])
        .arg(live.join(".ovlsnap/layers"))
        .output()
        .expect("getfattr");
    for line in String::from_utf8_lossy(&dump.stdout).lines() {
        if let Some((name, _)) = line.split_once('=') {
            names.push(name.to_owned());
        }
    }
    assert!(names.iter().any(|n| n.starts_with("user.overlay.")), "no user.overlay.* in the layers: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("trusted.")), "trusted.* in a user's layers: {names:?}");

    me(&["take", "t2"]).expect_ok("take t2");
    me(&["delete", "t1"]).expect_ok("delete t1");

    // Another user cannot even look (no allow_other): the mount gives them nothing new.
    let peek = sh_as(BOB, Path::new("/"), &format!("ls '{}'", mnt.display()));
    assert!(!peek.success(), "another user listed alice's mount\n{peek}");
    let listed = ovlsnap(&[OsStr::new("list"), OsStr::new("--mount"), mnt.as_os_str()]);
    assert!(listed.expect_ok("root lists the user's mount").contains("t2"), "{listed}");

    as_user(ALICE, &[OsString::from("umount"), mnt.clone().into()]).expect_ok("umount as its owner");
    assert!(!is_fuse_mount(&mnt));
    // Root can serve the user's store too: it reads the namespace the store was made with.
    ovlsnap(&[OsStr::new("mount"), live.as_os_str(), mnt.as_os_str()]).expect_ok("root mounts the user's store");
    let f = fs::read_to_string(mnt.join(".snapshots/t2/f"));
    let _ = ovlsnap(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_eq!(f.unwrap(), "v2\n");
}
