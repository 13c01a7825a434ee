//! What an unprivileged user may do through the mount (`allow_other`, the kernel checking
//! permissions): exactly what the kernel overlay allows. The same script runs as uid 1000 on a
//! kernel overlay and on ovlfs over identical layers; every answer and the resulting modes must
//! agree, and overlay metadata stays out of reach.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;

use crate::common::{UserPair, assert_same_lines};

/// The lower layer: root's and users' files, a sticky dir, set-ID files.
fn build(lower: &Path) {
    let file = |p: &str, mode: u32, uid: u32, gid: u32| {
        let path = lower.join(p);
        fs::write(&path, format!("{p}\n")).unwrap();
        chown(&path, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    };
    let dir = |p: &str, mode: u32, uid: u32| {
        let path = lower.join(p);
        fs::create_dir(&path).unwrap();
        chown(&path, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    };
    dir("rootdir", 0o755, 0);
    dir("sticky", 0o1777, 0);
    dir("userdir", 0o755, 1000);
    file("secret", 0o600, 0, 0);
    file("pub", 0o644, 0, 0);
    file("rootdir/f", 0o644, 0, 0);
    file("sticky/rootfile", 0o666, 0, 0);
    file("sticky/other", 0o666, 1001, 1001);
    file("userdir/f", 0o644, 1000, 1000);
    file("setuid", 0o4755, 1000, 1000);
    file("setgid", 0o2775, 1000, 1000);
}

/// Each line: a label and a command; the script prints the label, the exit status and, for
/// `stat` lines, the output.
const SCRIPT: &str = r#"
t() { label=$1; shift; out=$("$@" 2>/dev/null); echo "$label $? $out"; }
t read-secret cat secret
t read-pub cat pub
t write-pub sh -c 'echo x >> pub'
t create-in-rootdir sh -c 'echo x > rootdir/new'
t remove-in-rootdir rm -f rootdir/f
t chmod-root-file chmod 777 pub
t chown-own-file chown 0 userdir/f
t create-in-sticky sh -c 'echo x > sticky/mine'
t remove-roots-in-sticky rm -f sticky/rootfile
t remove-others-in-sticky rm -f sticky/other
t write-others-in-sticky sh -c 'echo y >> sticky/other'
t remove-own-in-sticky rm -f sticky/mine
t rename-in-userdir mv userdir/f userdir/g
t mkdir-in-userdir mkdir userdir/sub
t symlink-in-userdir ln -s target userdir/l
t user-xattr setfattr -n user.k -v v userdir/g
t read-user-xattr getfattr --only-values -n user.k userdir/g
t trusted-xattr getfattr -n trusted.overlay.origin userdir/g
t write-setuid sh -c 'echo more >> setuid'
t mode-setuid stat -c %a setuid
t write-setgid sh -c 'echo more >> setgid'
t mode-setgid stat -c %a setgid
t chmod-setgid-again chmod 2775 setgid
t truncate-setgid truncate -s 1 setgid
t mode-after-truncate stat -c %a setgid
t chmod-own-setuid chmod 4755 setuid
t mode-after-chmod stat -c %a setuid
t otrunc-setuid sh -c ': > setuid'
t mode-after-otrunc stat -c %a setuid
t chmod-setuid-again chmod 4755 setuid
t root-keeps-setuid-mode stat -c %a setuid
t list-rootdir ls rootdir
"#;

fn run_as_user(mnt: &Path) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", SCRIPT])
        .current_dir(mnt)
        .output()
        .expect("setpriv");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_unprivileged_user_may_do_what_the_kernel_overlay_allows() {
    compare_with_the_kernel(&[]);
}

/// With passthrough, the kernel writes to backing files with the daemon's credentials: writes by
/// the user must still clear set-ID bits (set-ID files are served by the daemon).
#[test]
fn an_unprivileged_user_may_do_what_the_kernel_overlay_allows_with_passthrough() {
    compare_with_the_kernel(&[("OVLFS_PASSTHROUGH", "1")]);
}

/// Runs the script as uid 1000 on the kernel overlay and on ovlfs (its daemon started with
/// `env`) over identical layers; every answer must agree.
fn compare_with_the_kernel(env: &[(&str, &str)]) {
    let pair = UserPair::mount("perm", build, env);
    let want = run_as_user(pair.kernel.path());
    let got = run_as_user(pair.ovlfs.path());
    assert!(want.lines().count() >= 25, "the script ran: {want}");
    assert!(want.contains("read-secret 1"), "sanity: the kernel refuses the secret: {want}");
    assert_same_lines("as uid 1000", &want, &got);
}
