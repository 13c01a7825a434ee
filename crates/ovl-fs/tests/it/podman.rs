//! ovlfs as the mount program of podman and buildah (issue 18): containers/storage runs
//! `ovlfs -o OPTS MERGED` from its graph root, without `-f`, and `ovlfs --version` for
//! `podman info`. These tests use the exact option strings it builds (`optsAppendMappings` and
//! `xattr_permissions=2` in drivers/overlay/overlay.go) and check what they mean, as
//! fuse-overlayfs defines it: `uidmapping=:STORED:SHOWN:LEN` (layers store container IDs, the
//! mount shows host IDs; IDs outside every range become 65534), `squash_to_*` (every object
//! shown with one owner), `xattr_permissions=` (owner and mode kept in
//! `user.containers.override_stat` instead of the inode).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::XattrFlags;

use crate::common::{Layers, apply_fixture, mount_point, ovlfs_bin, tempdir};

/// A mount made the way containers/storage makes it: `ovlfs -o OPTS MNT`, run from `cwd`,
/// returning once the mount is live; unmounted on drop.
struct PodmanMount(PathBuf);

impl PodmanMount {
    fn new(cwd: &Path, opts: &str, mnt: &Path) -> Result<PodmanMount, String> {
        let out = Command::new(ovlfs_bin()).current_dir(cwd).arg("-o").arg(opts).arg(mnt).output().unwrap();
        if !out.status.success() {
            return Err(format!("ovlfs -o {opts}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(PodmanMount(mnt.to_path_buf()))
    }

    fn mount(cwd: &Path, opts: &str, mnt: &Path) -> PodmanMount {
        Self::new(cwd, opts, mnt).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for PodmanMount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// `lowerdir=..,upperdir=..,workdir=..` of `l`.
fn base(l: &Layers) -> String {
    l.mount_options("")
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// Layers whose lower holds root's files, a container user's file and a directory.
fn layers(tmp: &Path) -> Layers {
    let l = Layers::create(&tmp.join("layers"), 2);
    apply_fixture(
        &l,
        "l1 file etc/passwd root:x:0:0\n\
         l1 owner etc/passwd 0 0\n\
         l1 dir home/app\n\
         l1 owner home/app 1000 1000\n\
         l1 file home/app/data hello\n\
         l1 owner home/app/data 1000 1000\n\
         l1 mode home/app/data 644\n\
         l2 file high owned by 100000\n\
         l2 owner high 100000 100000\n\
         l2 dir srv\n",
    );
    l
}

/// Regression (issue 18): every option string containers/storage passes mounts.
#[test]
fn issue_18_podman_option_strings_mount() {
    let tmp = tempdir("podman-opts");
    let l = layers(tmp.path());
    let b = base(&l);
    let cases = [
        format!("{b},,volatile,nodev,uidmapping=:0:100000:65536,gidmapping=:0:100000:65536"),
        format!(
            "{b},nodev,uidmapping=:0:1:1000:1000:0:1:1001:1001:64536,gidmapping=:0:1:1000:1000:0:1:1001:1001:64536"
        ),
        format!("{b},squash_to_uid=1000,squash_to_gid=1000"),
        format!("{b},nodev,metacopy=on,uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,xattr_permissions=2"),
        format!("{b},context=\"system_u:object_r:container_file_t:s0:c1,c2\",squash_to_root"),
    ];
    for (i, opts) in cases.iter().enumerate() {
        let mnt = mount_point(tmp.path(), &format!("m{i}"));
        let m = PodmanMount::new(&l.root, opts, &mnt);
        let m = m.unwrap_or_else(|e| panic!("case {i}: {e}"));
        assert_eq!(fs::read_to_string(mnt.join("home/app/data")).unwrap(), "hello\n", "case {i}");
        drop(m);
    }
}

/// Regression (issue 18): `uidmapping=:0:100000:65536` shows stored IDs shifted up and stores
/// what callers write shifted down (getattr, readdir, chown, create, ACL entries).
#[test]
fn issue_18_uidmapping_shifts_both_ways() {
    let tmp = tempdir("podman-map");
    // Other users reach the mount point.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let l = layers(tmp.path());
    let mnt = mount_point(tmp.path(), "m");
    let maps = "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536";
    let _m = PodmanMount::mount(&l.root, &format!("{},{maps}", base(&l)), &mnt);
    assert_eq!(owner(&mnt.join("etc/passwd")), (100000, 100000));
    assert_eq!(owner(&mnt.join("home/app/data")), (101000, 101000));
    assert_eq!(owner(&mnt.join("high")), (65534, 65534), "a stored ID outside the map shows as 65534");
    for e in fs::read_dir(mnt.join("home/app")).unwrap() {
        assert_eq!(e.unwrap().metadata().unwrap().uid(), 101000);
    }
    // chown through the mount (copy-up keeps the owner, then the new one is stored shifted).
    chown(mnt.join("etc/passwd"), Some(100005), Some(100006)).unwrap();
    assert_eq!(owner(&mnt.join("etc/passwd")), (100005, 100006));
    assert_eq!(owner(&l.upper.join("etc/passwd")), (5, 6));
    assert_eq!(owner(&l.upper.join("etc")), (0, 0), "copied-up parent keeps its stored owner");
    // A new object made by (host) uid 101000 is stored as container uid 1000.
    let st = Command::new("setpriv")
        .args(["--reuid=101000", "--regid=101000", "--clear-groups", "touch"])
        .arg(mnt.join("home/app/new"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(owner(&mnt.join("home/app/new")), (101000, 101000));
    assert_eq!(owner(&l.upper.join("home/app/new")), (1000, 1000));
    // Named ACL entries: shown IDs through the mount, stored IDs in the layer.
    let f = mnt.join("home/app/data");
    let acl = acl_value(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 100007),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ]);
    rustix::fs::lsetxattr(&f, "system.posix_acl_access", &acl, XattrFlags::empty()).unwrap();
    let stored = xattr(&l.upper.join("home/app/data"), "system.posix_acl_access").unwrap();
    assert!(acl_ids(&stored).contains(&(0x02, 7)), "{:?}", acl_ids(&stored));
    let shown = xattr(&f, "system.posix_acl_access").unwrap();
    assert!(acl_ids(&shown).contains(&(0x02, 100007)), "{:?}", acl_ids(&shown));
}

/// The example of the issue: a layer storing host IDs, `uidmapping=:100000:0:65536`: a lower
/// file owned by 100000 shows as 0, and a chown to 5 writes 100005 in the upper layer.
#[test]
fn issue_18_uidmapping_the_other_way_round() {
    let tmp = tempdir("podman-map2");
    let l = layers(tmp.path());
    let mnt = mount_point(tmp.path(), "m");
    let maps = "uidmapping=:100000:0:65536,gidmapping=:100000:0:65536";
    let _m = PodmanMount::mount(&l.root, &format!("{},{maps}", base(&l)), &mnt);
    assert_eq!(owner(&mnt.join("high")), (0, 0));
    chown(mnt.join("high"), Some(5), Some(5)).unwrap();
    assert_eq!(owner(&mnt.join("high")), (5, 5));
    assert_eq!(owner(&l.upper.join("high")), (100005, 100005));
    fs::create_dir(mnt.join("srv/new")).unwrap();
    assert_eq!(owner(&l.upper.join("srv/new")), (100000, 100000), "root's new dir is stored as 100000");
}

/// Regression (issue 18): squash options show every object with the one owner.
#[test]
fn issue_18_squash_shows_one_owner() {
    let tmp = tempdir("podman-squash");
    let l = layers(tmp.path());
    let mnt = mount_point(tmp.path(), "m");
    let m = PodmanMount::mount(&l.root, &format!("{},squash_to_uid=1234,squash_to_gid=4321", base(&l)), &mnt);
    for p in ["", "etc", "etc/passwd", "home/app/data", "high", "srv"] {
        assert_eq!(owner(&mnt.join(p)), (1234, 4321), "{p}");
    }
    fs::write(mnt.join("srv/new"), b"x").unwrap();
    assert_eq!(owner(&mnt.join("srv/new")), (1234, 4321));
    assert_eq!(owner(&l.upper.join("srv/new")), (0, 0), "what is stored is only mapped (identity here)");
    drop(m);
    let mnt = mount_point(tmp.path(), "m2");
    let _m = PodmanMount::mount(&l.root, &format!("{},squash_to_root,squash_to_gid=7", base(&l)), &mnt);
    assert_eq!(owner(&mnt.join("home/app/data")), (0, 7), "squash_to_gid takes precedence over squash_to_root");
}

/// Regression (issue 18): with `xattr_permissions=2`, chmod and chown of a file the daemon
/// keeps go to `user.containers.override_stat` (the inode keeps its own), and come back from it;
/// a lower layer whose root carries the xattr is read the same way, devices stored as files too.
#[test]
fn issue_18_xattr_permissions_round_trip() {
    let tmp = tempdir("podman-xattr");
    let l = layers(tmp.path());
    const X: &str = "user.containers.override_stat";
    let set = |p: &Path, v: &str| rustix::fs::lsetxattr(p, X, v.as_bytes(), XattrFlags::empty()).unwrap();
    set(&l.lowers[1], "0:0:755:dir");
    fs::write(l.lowers[1].join("dev-null"), b"").unwrap();
    set(&l.lowers[1].join("dev-null"), "0:0:666:char-1-3");
    set(&l.lowers[1].join("high"), "7:8:4711");
    let mnt = mount_point(tmp.path(), "m");
    let _m = PodmanMount::mount(&l.root, &format!("{},xattr_permissions=2", base(&l)), &mnt);
    let high = fs::symlink_metadata(mnt.join("high")).unwrap();
    assert_eq!((high.uid(), high.gid(), high.mode() & 0o7777), (7, 8, 0o4711));
    let dev = fs::symlink_metadata(mnt.join("dev-null")).unwrap();
    assert!(dev.file_type().is_char_device(), "{:o}", dev.mode());
    assert_eq!((dev.rdev(), dev.mode() & 0o777), (libc::makedev(1, 3), 0o666));
    assert_eq!(xattr(&mnt.join("high"), X), None, "the override xattr is the mount's own");
    assert!(rustix::fs::lsetxattr(mnt.join("high"), X, b"0:0:777", XattrFlags::empty()).is_err());

    let f = mnt.join("home/app/data");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    chown(&f, Some(5), Some(6)).unwrap();
    let m = fs::symlink_metadata(&f).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5, 6, 0o600));
    let up = l.upper.join("home/app/data");
    assert_eq!(xattr(&up, X).as_deref(), Some(&b"5:6:600"[..]));
    let real = fs::symlink_metadata(&up).unwrap();
    assert_eq!((real.uid(), real.gid(), real.mode() & 0o7777), (1000, 1000, 0o644), "the inode is untouched");
    // A new file records its creator and mode in the xattr.
    fs::write(mnt.join("srv/new"), b"x").unwrap();
    fs::set_permissions(mnt.join("srv/new"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(xattr(&l.upper.join("srv/new"), X).as_deref(), Some(&b"0:0:640"[..]));
    assert_eq!(fs::symlink_metadata(mnt.join("srv/new")).unwrap().mode() & 0o7777, 0o640);
    assert!(xattr(&l.upper, X).is_some(), "the upper root got a value at mount");
}

/// Regression (issue 18): empty elements in the option string are skipped.
#[test]
fn issue_18_empty_option_elements() {
    let tmp = tempdir("podman-empty");
    let l = layers(tmp.path());
    let mnt = mount_point(tmp.path(), "m");
    let _m = PodmanMount::mount(&l.root, &format!(",{},,volatile,", base(&l)), &mnt);
    assert_eq!(fs::read_to_string(mnt.join("high")).unwrap(), "owned by 100000\n");
}

/// Regression (issue 18): containers/storage mounts additional image stores as `lowerdir=A:B`
/// only: read-only.
#[test]
fn issue_18_lowerdir_only_is_read_only() {
    let tmp = tempdir("podman-ro");
    let l = layers(tmp.path());
    let mnt = mount_point(tmp.path(), "m");
    let lowers: Vec<String> = l.lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!("lowerdir={},nodev,uidmapping=:0:100000:65536,gidmapping=:0:100000:65536", lowers.join(":"));
    let _m = PodmanMount::mount(&l.root, &opts, &mnt);
    assert_eq!(owner(&mnt.join("etc/passwd")), (100000, 100000));
    assert_eq!(fs::write(mnt.join("high"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::create_dir(mnt.join("d")).unwrap_err().raw_os_error(), Some(libc::EROFS));
}

/// Regression (issue 18): `podman info` runs `PROG --version` and shows its stdout: exit 0, one
/// line naming the program and a version.
#[test]
fn issue_18_version_is_parseable() {
    for flag in ["--version", "-V"] {
        let out = Command::new(ovlfs_bin()).arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text.trim_end_matches('\n');
        assert!(!line.contains('\n'), "{text:?}");
        let (name, version) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(name, "ovlfs");
        let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 3, "{version}");
    }
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(p, name, &mut buf).ok().map(|n| buf[..n].to_vec())
}

fn acl_value(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// (tag, id) of each entry of an ACL xattr value.
fn acl_ids(v: &[u8]) -> Vec<(u16, u32)> {
    v[4..]
        .chunks_exact(8)
        .map(|c| (u16::from_le_bytes([c[0], c[1]]), u32::from_le_bytes([c[4], c[5], c[6], c[7]])))
        .collect()
}
