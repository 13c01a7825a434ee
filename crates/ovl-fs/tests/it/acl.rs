//! POSIX ACLs through the mount, as through the kernel overlay: enforced (a named user's deny
//! entry keeps that user out even where the mode bits would let them in, a grant lets them in),
//! inherited by new objects from their parent's default ACL (which replaces the umask), the umask
//! applied where there is none, and an ACL set through the mount changing the mode. The same
//! script runs as uid 1000 on a kernel overlay and on ovlfs over identical layers; then root
//! lists modes and raw ACL xattrs on both. Every line must agree.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;

use crate::common::{UserPair, assert_same_lines};

const ANY: u32 = u32::MAX;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// An ACL xattr value (version 2) from (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The lower layer: files with ACLs, a dir with a default ACL, a dir without.
fn build(lower: &Path) {
    let file = |p: &str, mode: u32, access: Option<Vec<u8>>| {
        let path = lower.join(p);
        fs::write(&path, format!("{p}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        if let Some(a) = access {
            rustix::fs::lsetxattr(&path, "system.posix_acl_access", &a, rustix::fs::XattrFlags::empty()).unwrap();
        }
    };
    // 0644 would let uid 1000 read; the named entry says no.
    file(
        "denied",
        0o644,
        Some(acl(&[(USER_OBJ, 6, ANY), (USER, 0, 1000), (GROUP_OBJ, 4, ANY), (MASK, 4, ANY), (OTHER, 4, ANY)])),
    );
    // 0640 root:root would not; the named entry says yes.
    file(
        "granted",
        0o640,
        Some(acl(&[(USER_OBJ, 6, ANY), (USER, 4, 1000), (GROUP_OBJ, 4, ANY), (MASK, 4, ANY), (OTHER, 0, ANY)])),
    );
    file("plain", 0o664, None);
    for (d, default) in [
        (
            "inherit",
            Some(acl(&[(USER_OBJ, 7, ANY), (USER, 7, 1000), (GROUP_OBJ, 5, ANY), (MASK, 7, ANY), (OTHER, 0, ANY)])),
        ),
        ("minimal", Some(acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 1, ANY)]))),
        ("open", None),
    ] {
        let path = lower.join(d);
        fs::create_dir(&path).unwrap();
        chown(&path, Some(0), Some(0)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        if let Some(a) = default {
            rustix::fs::lsetxattr(&path, "system.posix_acl_default", &a, rustix::fs::XattrFlags::empty()).unwrap();
        }
    }
}

/// Run as uid 1000 in the mount; one line per step: its name and exit status.
const USER_SCRIPT: &str = r#"
t() { name=$1; shift; "$@" >/dev/null 2>&1; echo "$name $?"; }
umask 022
t read-denied cat denied
t read-granted cat granted
t write-granted sh -c 'echo x >> granted'
t read-plain cat plain
for d in inherit minimal open; do
  t "$d-file" touch $d/f
  t "$d-dir" mkdir $d/d
  t "$d-fifo" mkfifo $d/p
  t "$d-create-mode" sh -c "umask 027; : > $d/g; mkdir $d/e"
  t "$d-nested" touch $d/d/nested
done
"#;

/// Run as root after the user's script: modes and raw ACLs of everything made, then an ACL set
/// through the mount.
const ROOT_SCRIPT: &str = r#"
show() { for p in "$@"; do
  echo "$p $(stat -c '%a %u %g' $p)"
  for k in system.posix_acl_access system.posix_acl_default; do
    echo "$p $k $(getfattr --absolute-names -n $k -e hex $p 2>&1 | grep -o '=0x.*' || echo none)"
  done
done; }
show denied granted plain inherit minimal open
for d in inherit minimal open; do show $d/f $d/d $d/p $d/g $d/e $d/d/nested; done
setfattr -n system.posix_acl_access -v 0x02000000010006ffffffffff02000000e803000004000400ffffffff10000000ffffffff20000400ffffffff plain 2>&1 | sed 's/^/setfattr: /'
setfattr -n system.posix_acl_access -v 0x0200000001000600ffffffff02000000e803000004000400ffffffff10000400ffffffff20000400ffffffff plain; echo "set-acl $?"
show plain
chmod 640 plain; echo "chmod $?"
show plain
"#;

fn run(mnt: &Path, as_user: bool, script: &str) -> String {
    let mut cmd = if as_user {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    let out = cmd.current_dir(mnt).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn acls_are_enforced_inherited_and_set_as_through_the_kernel_overlay() {
    let pair = UserPair::mount("acl", build, &[]);
    let (kernel, ovlfs) = (&pair.kernel, &pair.ovlfs);
    let mut want = run(kernel.path(), true, USER_SCRIPT);
    let mut got = run(ovlfs.path(), true, USER_SCRIPT);
    want += &run(kernel.path(), false, ROOT_SCRIPT);
    got += &run(ovlfs.path(), false, ROOT_SCRIPT);
    // The script ran, and the kernel did what the test is about.
    for line in [
        "read-denied 1",
        "read-granted 0",
        "read-plain 0",
        "inherit-file 0",
        "set-acl 0",
        "inherit/f 660 1000 1000",
        "minimal/f 640 1000 1000",
        "minimal/d 751 1000 1000",
        "open/f 644 1000 1000",
        "open/g 640 1000 1000",
        "open/e 750 1000 1000",
    ] {
        assert!(want.lines().any(|l| l == line), "sanity: the kernel shows {line:?}:\n{want}");
    }
    assert!(want.contains("inherit/f system.posix_acl_access =0x"), "an inherited access ACL:\n{want}");
    assert_same_lines("as uid 1000 and root", &want, &got);
}
