//! Issue 18: layers in the AUFS/OCI whiteout encoding (`.wh.NAME`, `.wh..wh..opq`) that
//! containers/storage writes with a mount program, and layers fuse-overlayfs wrote (its `.wh.`
//! whiteouts and `user.fuseoverlayfs.opaque`). The kernel reads none of it, so fuse-overlayfs
//! (installed by `.ci/run`) is the oracle: both mount copies of the same layers, run the same
//! steps, and must show the same tree. Also: a rootless mount in a user namespace (no
//! `trusted.*` xattrs: `user.overlay.*`, checked by the kernel mounting the result with
//! `userxattr`), and whiteouts written as files when `mknod` is refused
//! (`OVLFS_DISABLE_OVL_WHITEOUT`, read back by fuse-overlayfs).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Backend, Layers, MountGuard, assert_same_tree, mount_fstype, mount_point, ovlfs_bin, snapshot_tree, tempdir,
};

/// A fuse-overlayfs mount (root: it mounts itself and daemonizes); unmounted on drop.
struct FuseOverlayfs {
    mnt: PathBuf,
}

impl FuseOverlayfs {
    fn mount(layers: &Layers, mnt: &Path, env: &[(&str, &str)]) -> FuseOverlayfs {
        let out = Command::new("fuse-overlayfs")
            .arg("-o")
            .arg(layers.mount_options(""))
            .arg(mnt)
            .envs(env.iter().copied())
            .output()
            .expect("fuse-overlayfs must be installed for this test (.ci/run installs it)");
        assert!(out.status.success(), "fuse-overlayfs: {}", String::from_utf8_lossy(&out.stderr));
        let mnt = fs::canonicalize(mnt).unwrap();
        let start = Instant::now();
        while mount_fstype(&mnt).as_deref() != Some("fuse.fuse-overlayfs") {
            assert!(start.elapsed() < Duration::from_secs(10), "fuse-overlayfs did not mount {mnt:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        FuseOverlayfs { mnt }
    }
}

impl Drop for FuseOverlayfs {
    fn drop(&mut self) {
        for _ in 0..40 {
            if rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::empty()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
    }
}

/// An empty file of mode 0, as containers/storage extracts a whiteout (`install -m0`).
fn marker(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"").unwrap();
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o0)).unwrap();
}

fn file(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// The issue's layers and a few more cases: whiteouts of files and of a whole dir, an opaque
/// dir by `.wh..wh..opq` and one by fuse-overlayfs's xattr, a marker that is a dir, and a
/// name hidden in the same layer that holds its marker (as fuse-overlayfs reads it).
fn image_layers(root: &Path) -> Layers {
    let l = Layers::create(root, 2);
    let (l1, l2) = (&l.lowers[0], &l.lowers[1]);
    for (p, t) in [
        ("f", "1"),
        ("d/a", "a"),
        ("d/b", "b"),
        ("o/x", "x"),
        ("fo/j", "j"),
        ("gone/inner", "i"),
        ("n/deep/z", "z"),
        ("n/deep/w", "w"),
        ("e/q", "q"),
        ("e/r", "r"),
    ] {
        file(&l2.join(p), t);
    }
    for (p, t) in [("o/y", "y"), ("fo/k", "k"), ("same", "s"), ("n/deep/v", "v")] {
        file(&l1.join(p), t);
    }
    for p in [".wh.f", "d/.wh.a", "o/.wh..wh..opq", ".wh.gone", "n/deep/.wh.z", ".wh.same"] {
        marker(&l1.join(p));
    }
    fs::create_dir_all(l1.join("e/.wh.q")).unwrap();
    rustix::fs::lsetxattr(l1.join("fo"), "user.fuseoverlayfs.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
    l
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn issue_18_aufs_whiteouts_hide_like_fuse_overlayfs() {
    let tmp = tempdir("aufs-read");
    let ours = image_layers(&tmp.path().join("o"));
    let theirs = ours.copy_to(&tmp.path().join("t"));
    let om = MountGuard::mount(Backend::Ovlfs, &ours, "", &mount_point(tmp.path(), "om"));
    let tm = FuseOverlayfs::mount(&theirs, &mount_point(tmp.path(), "tm"), &[]);
    let (o, t) = (om.path(), tm.mnt.as_path());
    assert_eq!(names(o), ["d", "e", "fo", "n", "o"]);
    assert_eq!(names(&o.join("d")), ["b"]);
    assert_eq!(names(&o.join("o")), ["y"]);
    assert_eq!(names(&o.join("fo")), ["k"]);
    assert_eq!(names(&o.join("e")), ["r"]);
    assert_same_tree("image layers", "fuse-overlayfs", &snapshot_tree(t), "ovlfs", &snapshot_tree(o));
    for p in [".wh.f", "d/.wh.a", "o/.wh..wh..opq", "f", "gone", "same", "n/deep/z"] {
        assert_eq!(errno_of(fs::symlink_metadata(o.join(p))), Some(libc::ENOENT), "lookup {p}");
        assert_eq!(errno_of(fs::symlink_metadata(t.join(p))), Some(libc::ENOENT), "fuse-overlayfs: lookup {p}");
    }
    assert_eq!(errno_of(fs::write(o.join(".wh.new"), "")), Some(libc::EINVAL));
    assert_eq!(errno_of(fs::write(t.join(".wh.new"), "")), Some(libc::EINVAL));
    assert_eq!(errno_of(fs::create_dir(o.join(".wh.dir"))), Some(libc::EINVAL));
    assert_eq!(errno_of(fs::rename(o.join("d/b"), o.join("d/.wh.b"))), Some(libc::EINVAL));
    let xattrs = Command::new("getfattr").args(["-d", "-m", "-"]).arg(o.join("fo")).output().unwrap();
    assert!(!String::from_utf8_lossy(&xattrs.stdout).contains("fuseoverlayfs"), "fuse-overlayfs's xattr shows");
}

/// The same steps on a mount of each: removals and recreations over every kind of marker.
fn change(m: &Path) {
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-ec").arg(script).current_dir(m).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh("rm -rf d o; mkdir d; echo new > d/a; echo again > f; mkdir gone; ls -A gone; mkdir n/deep/z");
    sh("mv e/r e/q; echo 2 > same; rm -rf fo; mkdir fo; mv n/deep/v n/deep/w");
}

#[test]
fn issue_18_changes_over_aufs_whiteouts_match_fuse_overlayfs() {
    let tmp = tempdir("aufs-change");
    let ours = image_layers(&tmp.path().join("o"));
    let theirs = ours.copy_to(&tmp.path().join("t"));
    {
        let om = MountGuard::mount(Backend::Ovlfs, &ours, "", &mount_point(tmp.path(), "om"));
        let tm = FuseOverlayfs::mount(&theirs, &mount_point(tmp.path(), "tm"), &[]);
        change(om.path());
        change(&tm.mnt);
        assert_same_tree(
            "after changes",
            "fuse-overlayfs",
            &snapshot_tree(&tm.mnt),
            "ovlfs",
            &snapshot_tree(om.path()),
        );
        assert_eq!(names(&om.path().join("d")), ["a"]);
        assert_eq!(names(&om.path().join("gone")), Vec::<String>::new());
    }
    // What ovlfs wrote is the kernel's format: no `.wh.` names (the issue's `.wh..wh.a`).
    let out = Command::new("find").arg(&ours.upper).args(["-name", ".wh.*"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "ovlfs wrote AUFS names into the upper layer");
    // Remounted, it shows the same again.
    let om = MountGuard::mount(Backend::Ovlfs, &ours, "", &mount_point(tmp.path(), "om2"));
    let tm = FuseOverlayfs::mount(&theirs, &mount_point(tmp.path(), "tm2"), &[]);
    assert_same_tree("remounted", "fuse-overlayfs", &snapshot_tree(&tm.mnt), "ovlfs", &snapshot_tree(om.path()));
}

/// A store fuse-overlayfs wrote (whiteouts as `.wh.` files, as it does where it may not mknod;
/// an upper dir made opaque by `user.fuseoverlayfs.opaque`, as it marks them rootless) read and
/// changed by ovlfs: the same tree as fuse-overlayfs shows, before and after more changes.
#[test]
fn issue_18_switch_from_fuse_overlayfs() {
    let tmp = tempdir("aufs-switch");
    let ours = image_layers(&tmp.path().join("o"));
    {
        let env = [("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")];
        let fm = FuseOverlayfs::mount(&ours, &mount_point(tmp.path(), "fm"), &env);
        let out = Command::new("sh")
            .arg("-ec")
            .arg("rm -rf d/b e n; echo 3 > newf; rm -f o/y; mkdir -p x/y")
            .current_dir(&fm.mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let up = &ours.upper;
    assert!(up.join(".wh.e").exists() && up.join("d/.wh.b").exists(), "fuse-overlayfs wrote .wh. whiteouts");
    file(&up.join("fo/u"), "u");
    rustix::fs::lsetxattr(up.join("fo"), "user.fuseoverlayfs.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
    let theirs = ours.copy_to(&tmp.path().join("t"));
    let om = MountGuard::mount(Backend::Ovlfs, &ours, "", &mount_point(tmp.path(), "om"));
    let tm = FuseOverlayfs::mount(&theirs, &mount_point(tmp.path(), "tm"), &[]);
    assert_same_tree(
        "fuse-overlayfs's upper",
        "fuse-overlayfs",
        &snapshot_tree(&tm.mnt),
        "ovlfs",
        &snapshot_tree(om.path()),
    );
    assert_eq!(names(&om.path().join("fo")), ["u"]);
    for m in [om.path(), tm.mnt.as_path()] {
        let out = Command::new("sh")
            .arg("-ec")
            .arg("mkdir e; echo b > d/b; mv newf n; ls -A e; rm -rf x; echo o > o/y")
            .current_dir(m)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_same_tree("changed after", "fuse-overlayfs", &snapshot_tree(&tm.mnt), "ovlfs", &snapshot_tree(om.path()));
    assert_eq!(names(&om.path().join("e")), Vec::<String>::new());
    assert!(!up.join(".wh.e").exists() && !up.join("d/.wh.b").exists(), "the markers of recreated names are gone");
}

/// Where `mknod` of a whiteout is refused, ovlfs writes `.wh.NAME` files, and fuse-overlayfs
/// reads what it wrote as ovlfs shows it.
#[test]
fn issue_18_whiteout_files_when_mknod_is_refused() {
    let tmp = tempdir("aufs-files");
    let ours = image_layers(&tmp.path().join("o"));
    let theirs = ours.copy_to(&tmp.path().join("t"));
    let script = "rm -rf d/b e; echo 3 > newf; rm -f o/y; mv fo/k kk; mkdir e; echo e > e/r; mv n/deep/w nw; rm -rf n";
    let ours_tree = {
        let env = [("OVLFS_DISABLE_OVL_WHITEOUT", "1")];
        let om = MountGuard::mount_env(Backend::Ovlfs, &ours, "", &mount_point(tmp.path(), "om"), &env);
        let out = Command::new("sh").arg("-ec").arg(script).current_dir(om.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        snapshot_tree(om.path())
    };
    {
        let env = [("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")];
        let tm = FuseOverlayfs::mount(&theirs, &mount_point(tmp.path(), "tm"), &env);
        let out = Command::new("sh").arg("-ec").arg(script).current_dir(&tm.mnt).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_same_tree("same steps", "fuse-overlayfs", &snapshot_tree(&tm.mnt), "ovlfs", &ours_tree);
    }
    let devices = Command::new("find").arg(&ours.upper).args(["-type", "c"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&devices.stdout), "", "no whiteout devices were to be made");
    assert!(ours.upper.join("d/.wh.b").exists());
    let fresh = ours.with_fresh_work(tmp.path().join("o/work2"));
    let tm = FuseOverlayfs::mount(&fresh, &mount_point(tmp.path(), "tm2"), &[]);
    assert_same_tree(
        "ovlfs's upper read by fuse-overlayfs",
        "fuse-overlayfs",
        &snapshot_tree(&tm.mnt),
        "ovlfs",
        &ours_tree,
    );
}

/// Rootless: ovlfs run as root of a user namespace (`unshare --user --map-root-user --mount`),
/// where `trusted.*` xattrs are refused, must work as with `userxattr` and say so in its log;
/// the kernel then mounts the result with `userxattr` and shows the same tree.
#[test]
fn issue_18_rootless_uses_user_xattrs() {
    let tmp = tempdir("aufs-rootless");
    let l = Layers::create(&tmp.path().join("o"), 1);
    let l1 = &l.lowers[0];
    file(&l1.join("a"), "a\n");
    file(&l1.join("dir/z"), "z");
    file(&l1.join("dir/y"), "y");
    file(&l1.join("dir2/q"), "q");
    let m = mount_point(tmp.path(), "m");
    let log = tmp.path().join("log");
    let script = format!(
        "'{bin}' -f -o '{opts}' '{m}' >'{log}' 2>&1 & pid=$!; \
         trap \"cd /; umount -l '{m}' 2>/dev/null; kill $pid 2>/dev/null; wait $pid\" EXIT; \
         i=0; while ! grep -q ' {m} ' /proc/self/mountinfo; do i=$((i+1)); [ $i -lt 500 ] || exit 9; sleep 0.02; done; \
         cd '{m}'; echo b >> a; rm dir/z; rm -rf dir2; mkdir dir2; echo n > dir2/n; mv dir/y dir/x; \
         cd /; umount '{m}'; trap - EXIT; wait $pid",
        bin = ovlfs_bin().display(),
        opts = l.mount_options(""),
        m = m.display(),
        log = log.display()
    );
    let out =
        Command::new("unshare").args(["--user", "--map-root-user", "--mount", "sh", "-ec", &script]).output().unwrap();
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "rootless run: {}\n{log_text}", String::from_utf8_lossy(&out.stderr));
    assert!(log_text.contains("userxattr"), "the log must say userxattr is in use:\n{log_text}");
    let xattrs =
        Command::new("getfattr").args(["-R", "-d", "-m", "-", "--absolute-names"]).arg(&l.upper).output().unwrap();
    let xattrs = String::from_utf8_lossy(&xattrs.stdout);
    assert!(!xattrs.contains("trusted."), "trusted xattrs written:\n{xattrs}");
    assert!(xattrs.contains("user.overlay.opaque"), "no user.overlay.opaque:\n{xattrs}");
    assert!(fs::symlink_metadata(l.upper.join("dir/z")).unwrap().file_type().is_char_device());
    assert_eq!(fs::symlink_metadata(l.upper.join("dir/z")).unwrap().rdev(), 0);
    let km = MountGuard::mount(Backend::Kernel, &l, "userxattr", &mount_point(tmp.path(), "km"));
    assert_eq!(names(km.path()), ["a", "dir", "dir2"]);
    assert_eq!(names(&km.path().join("dir")), ["x"]);
    assert_eq!(names(&km.path().join("dir2")), ["n"]);
    assert_eq!(fs::read_to_string(km.path().join("a")).unwrap(), "a\nb\n");
}
