//! Copy-up through a real ovlfs mount: clone-up on reflink filesystems (XFS, btrfs loop images),
//! hole-preserving copies, descriptors opened before a copy-up, and many threads racing to copy
//! up the same and different files.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, Backend, KERNEL_OPTS, Layers, LoopFs, MountGuard, apply_fixture, mount_point, tempdir};

/// Writes `len` bytes of a position-dependent pattern at `off`.
fn pattern(f: &File, off: u64, len: usize, seed: u8) {
    let buf: Vec<u8> = (0..len).map(|i| ((off as usize + i) as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    f.write_all_at(&buf, off).unwrap();
}

/// Bytes of the file shared with another file, per `filefrag -v` (extents flagged `shared`).
fn shared_extents(path: &Path) -> usize {
    let out = Command::new("filefrag").arg("-v").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("shared")).count()
}

fn clone_up_on(kind: &str) {
    let lfs = LoopFs::new(kind, 1 << 30);
    let l = Layers::create(&lfs.dir.join("layers"), 1);
    let big = l.lowers[0].join("big");
    let f = File::create(&big).unwrap();
    for i in 0..64 {
        pattern(&f, i << 20, 1 << 20, 7);
    }
    f.sync_all().unwrap();
    drop(f);
    let m = MountGuard::mount(Backend::Ovlfs, &l, "", &lfs.dir.join("m").tap_mkdir());
    let f = OpenOptions::new().write(true).open(m.path().join("big")).unwrap();
    f.write_all_at(b"changed", 0).unwrap();
    drop(f);
    let upper = l.upper.join("big");
    assert_eq!(fs::metadata(&upper).unwrap().len(), 64 << 20);
    assert!(shared_extents(&upper) > 0, "{kind}: the copy-up should share extents with the lower file");
    let data = fs::read(m.path().join("big")).unwrap();
    assert_eq!(&data[..7], b"changed");
    let lower = fs::read(&big).unwrap();
    assert_eq!(data[7..], lower[7..], "{kind}: copied data");
    assert_ne!(&lower[..7], b"changed", "the lower file is untouched");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn clone_up_on_xfs_shares_extents() {
    clone_up_on("xfs");
}

#[test]
fn clone_up_on_btrfs_shares_extents() {
    clone_up_on("btrfs");
}

#[test]
fn copy_up_keeps_holes_on_ext4() {
    let tmp = tempdir("holes");
    let l = Layers::create(&tmp.path().join("a"), 1);
    let f = File::create(l.lowers[0].join("sparse")).unwrap();
    f.set_len(4 << 30).unwrap();
    pattern(&f, 1 << 30, 4096, 1);
    pattern(&f, 3 << 30, 4096, 2);
    drop(f);
    let m = MountGuard::mount(Backend::Ovlfs, &l, "", &mount_point(tmp.path(), "m"));
    let f = OpenOptions::new().write(true).open(m.path().join("sparse")).unwrap();
    f.write_all_at(b"x", 0).unwrap();
    drop(f);
    let meta = fs::metadata(l.upper.join("sparse")).unwrap();
    assert_eq!(meta.len(), 4 << 30);
    assert!(meta.blocks() * 512 < 1 << 20, "holes stay holes: {} bytes allocated", meta.blocks() * 512);
    let mut buf = vec![0u8; 4096];
    File::open(m.path().join("sparse")).unwrap().read_exact_at(&mut buf, 3 << 30).unwrap();
    let want: Vec<u8> =
        (0..4096).map(|i| ((((3u64 << 30) as usize + i) as u8).wrapping_mul(31)).wrapping_add(2)).collect();
    assert_eq!(buf, want);
}

/// The lower layer on its own tmpfs: copy_file_range cannot cross filesystems (EXDEV) and the
/// copy falls back to reads and writes, keeping every byte.
#[test]
fn copy_up_from_a_lower_on_another_filesystem() {
    let tmp = tempdir("xfs-lower");
    let l = Layers::create(&tmp.path().join("a"), 1);
    let out =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"]).arg(&l.lowers[0]).output().unwrap();
    assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _lower = Unmount(l.lowers[0].clone());
    let data: Vec<u8> = (0..(3 << 20) + 123).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(l.lowers[0].join("big"), &data).unwrap();
    let m = MountGuard::mount(Backend::Ovlfs, &l, "", &mount_point(tmp.path(), "m"));
    let f = OpenOptions::new().write(true).open(m.path().join("big")).unwrap();
    f.write_all_at(b"X", 10).unwrap();
    drop(f);
    let mut want = data.clone();
    want[10] = b'X';
    assert_eq!(fs::read(l.upper.join("big")).unwrap(), want, "the upper copy holds every byte");
    assert_eq!(fs::read(l.lowers[0].join("big")).unwrap(), data, "the lower file is untouched");
    drop(m);
}

/// What a descriptor opened read-only before a copy-up reads after another descriptor wrote.
fn read_after_copy_up(mnt: &Path) -> (Vec<u8>, u64) {
    let old = File::open(mnt.join("f")).unwrap();
    let mut buf = vec![0u8; 5];
    old.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"lower");
    let w = OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    w.write_all_at(b"UPPER and more", 0).unwrap();
    w.sync_all().unwrap();
    drop(w);
    // Drop cached pages so the read reaches the filesystem.
    rustix::fs::fadvise(&old, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let mut buf = vec![0u8; 64];
    let n = old.read_at(&mut buf, 0).unwrap();
    buf.truncate(n);
    (buf, old.metadata().unwrap().len())
}

#[test]
fn fd_opened_before_copy_up_sees_later_writes_like_the_kernel() {
    let tmp = tempdir("fd");
    let a = Layers::create(&tmp.path().join("a"), 1);
    apply_fixture(&a, "l1 file f lower\n");
    let b = a.copy_to(&tmp.path().join("b"));
    let ka = MountGuard::mount(Backend::Kernel, &a, KERNEL_OPTS, &mount_point(tmp.path(), "ka"));
    let mb = MountGuard::mount(Backend::Ovlfs, &b, "", &mount_point(tmp.path(), "mb"));
    let kernel = read_after_copy_up(ka.path());
    assert_eq!(kernel.0, b"UPPER and more", "the kernel's behaviour this test assumes");
    assert_eq!(read_after_copy_up(mb.path()), kernel);
}

#[test]
fn racing_copy_ups_make_one_copy_and_lose_no_write() {
    let tmp = tempdir("race");
    let l = Layers::create(&tmp.path().join("a"), 2);
    let mut fixture = String::new();
    for d in 0..4 {
        for f in 0..4 {
            fixture.push_str(&format!("l2 file d{d}/sub/f{f} base\n"));
        }
    }
    apply_fixture(&l, &fixture);
    let m = MountGuard::mount(Backend::Ovlfs, &l, "", &mount_point(tmp.path(), "m"));
    let root = m.path().to_path_buf();
    // 8 threads: each owns a disjoint 64-byte slot in every file and writes it after reads, so
    // every file must end with all 8 slots intact whatever order the copy-ups happened in.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let root = root.clone();
            s.spawn(move || {
                for round in 0..6u64 {
                    for d in 0..4 {
                        let f = (t + round + d) % 4;
                        let path = root.join(format!("d{d}/sub/f{f}"));
                        let r = fs::read(&path).unwrap();
                        assert!(r.starts_with(b"base"), "{path:?}");
                        let h = OpenOptions::new().write(true).open(&path).unwrap();
                        let slot = vec![b'a' + t as u8; 64];
                        h.write_all_at(&slot, 64 * (t + 1)).unwrap();
                        let _ = fs::metadata(root.join(format!("d{}/sub", (d + 1) % 4))).unwrap();
                    }
                }
            });
        }
    });
    for d in 0..4 {
        for f in 0..4 {
            let path = root.join(format!("d{d}/sub/f{f}"));
            let data = fs::read(&path).unwrap();
            assert_eq!(&data[..4], b"base");
            for t in 0..8u64 {
                let s = &data[(64 * (t + 1)) as usize..(64 * (t + 2)) as usize];
                assert!(s.iter().all(|c| *c == b'a' + t as u8), "{path:?} slot {t}");
            }
        }
    }
    // Exactly one upper object per file, nothing left in the work dir.
    assert_eq!(fs::read_dir(l.work.join("work")).unwrap().count(), 0);
    for d in 0..4 {
        assert_eq!(fs::read_dir(l.upper.join(format!("d{d}/sub"))).unwrap().count(), 4);
    }
}

/// Metadata changes on lower files with `metacopy=on`; then a write pulls the data up.
fn metacopy_script(m: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let p = |s: &str| m.join(s);
    let mut log = vec![];
    let mut step = |what: &str, r: std::io::Result<String>| log.push(format!("{what}: {r:?}"));
    step("chmod", fs::set_permissions(p("big"), fs::Permissions::from_mode(0o600)).map(|()| String::new()));
    step("chown", std::os::unix::fs::chown(p("small"), Some(7), Some(8)).map(|()| String::new()));
    step(
        "setxattr",
        rustix::fs::lsetxattr(p("x"), "user.k", b"v", rustix::fs::XattrFlags::empty())
            .map(|()| String::new())
            .map_err(std::io::Error::from),
    );
    step("size after chmod", fs::metadata(p("big")).map(|m| m.len().to_string()));
    step(
        "read after chmod",
        fs::read(p("big")).map(|d| format!("{} bytes, sum {}", d.len(), d.iter().map(|b| *b as u64).sum::<u64>())),
    );
    step(
        "append",
        OpenOptions::new()
            .append(true)
            .open(p("small"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"+"))
            .map(|()| String::new()),
    );
    step("read after append", fs::read_to_string(p("small")));
    step("truncate", OpenOptions::new().write(true).open(p("x")).and_then(|f| f.set_len(2)).map(|()| String::new()));
    step("read after truncate", fs::read_to_string(p("x")));
    log
}

#[test]
fn metacopy_copies_data_only_when_written_like_the_kernel() {
    let tmp = tempdir("metacopy");
    let a = Layers::create(&tmp.path().join("a"), 1);
    let f = File::create(a.lowers[0].join("big")).unwrap();
    for i in 0..8 {
        pattern(&f, i << 20, 1 << 20, 3);
    }
    drop(f);
    fs::write(a.lowers[0].join("small"), b"small").unwrap();
    fs::write(a.lowers[0].join("x"), b"xxxx").unwrap();
    let b = a.copy_to(&tmp.path().join("b"));
    // The kernel turns redirect_dir on with metacopy.
    let kopts = "metacopy=on,redirect_dir=on,index=off,xino=off";
    let view = {
        let ka = MountGuard::mount(Backend::Kernel, &a, kopts, &mount_point(tmp.path(), "ka"));
        let mb = MountGuard::mount(Backend::Ovlfs, &b, "metacopy=on", &mount_point(tmp.path(), "mb"));
        let (la, lb) = (metacopy_script(ka.path()), metacopy_script(mb.path()));
        assert_eq!(la, lb, "kernel (left) and ovlfs (right)");
        common::assert_same_tree(
            "metacopy",
            "kernel",
            &common::snapshot_tree(ka.path()),
            "ovlfs",
            &common::snapshot_tree(mb.path()),
        );
        common::snapshot_tree(mb.path())
    };
    // After chmod only, the upper copy of `big` holds no data, in both.
    for l in [&a, &b] {
        let m = fs::metadata(l.upper.join("big")).unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "metacopy upper file should be sparse: {} bytes", m.blocks() * 512);
        let mut v = [0u8; 64];
        let n = rustix::fs::lgetxattr(l.upper.join("big"), "trusted.overlay.metacopy", &mut v[..]).unwrap();
        assert_eq!(n, 0, "empty metacopy xattr");
        assert!(
            rustix::fs::lgetxattr(l.upper.join("small"), "trusted.overlay.metacopy", &mut v[..]).is_err(),
            "data copied up on append"
        );
    }
    common::assert_same_upper(
        "metacopy",
        "kernel",
        &common::snapshot_upper(&a.upper),
        "ovlfs",
        &common::snapshot_upper(&b.upper),
    );
    // The kernel reads our metacopy layer.
    let b2 = b.with_fresh_work(tmp.path().join("b/work2"));
    let k = MountGuard::mount(Backend::Kernel, &b2, kopts, &mount_point(tmp.path(), "kb"));
    common::assert_same_tree("metacopy remount", "ovlfs", &view, "kernel", &common::snapshot_tree(k.path()));
}

/// Regression (renamed metacopy files read EIO): with `metacopy=on,redirect_dir=on` the kernel
/// renames a file whose data is still below by giving its metadata-only upper copy an
/// `overlay.redirect` (relative within a dir, absolute across dirs). ovlfs, mounted on the layers
/// the kernel wrote, must find the data through those redirects (also through a renamed parent,
/// a file renamed twice, and a second lower layer), ignore the redirect left on a file whose
/// data was copied up since, and show what the kernel showed; `ovlfs check` finds them clean.
#[test]
fn a_kernel_renamed_metacopy_file_reads_its_data_through_its_redirect() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempdir("metacopy-rename");
    let l = Layers::create(&tmp.path().join("a"), 2);
    apply_fixture(
        &l,
        "l1 file f top data\n\
         l1 file d/g in d\n\
         l1 file d/h to the root\n\
         l1 dir e\n\
         l1 file twice moved twice\n\
         l1 file d2/k in a dir that moves\n\
         l1 file written data copied up later\n\
         l2 file low from the second lower\n\
         l2 file d/deep from the second lower, in a merged dir\n",
    );
    let kopts = "metacopy=on,redirect_dir=on,index=off,xino=off";
    let (view, inos) = {
        let k = MountGuard::mount(Backend::Kernel, &l, kopts, &mount_point(tmp.path(), "k"));
        let m = k.path();
        for f in ["f", "d/g", "d/h", "twice", "d2/k", "written", "low", "d/deep"] {
            fs::set_permissions(m.join(f), fs::Permissions::from_mode(0o640)).unwrap();
        }
        fs::rename(m.join("f"), m.join("f2")).unwrap();
        fs::rename(m.join("d/g"), m.join("e/g2")).unwrap();
        fs::rename(m.join("d/h"), m.join("h3")).unwrap();
        fs::rename(m.join("twice"), m.join("e/once")).unwrap();
        fs::rename(m.join("e/once"), m.join("d/twice2")).unwrap();
        fs::rename(m.join("d2"), m.join("d2-moved")).unwrap();
        fs::rename(m.join("written"), m.join("e/written2")).unwrap();
        OpenOptions::new().append(true).open(m.join("e/written2")).unwrap().write_all_at(b"+", 100).unwrap();
        fs::rename(m.join("low"), m.join("e/low2")).unwrap();
        fs::rename(m.join("d/deep"), m.join("deep2")).unwrap();
        let names = ["f2", "e/g2", "h3", "d/twice2", "d2-moved/k", "e/written2", "e/low2", "deep2"];
        let inos: Vec<u64> = names.iter().map(|n| fs::metadata(m.join(n)).unwrap().ino()).collect();
        (common::snapshot_tree(m), inos)
    };
    // What the kernel wrote: metadata-only copies carrying redirects.
    let xattr = |p: &str, name: &str| {
        let mut v = vec![0u8; 256];
        rustix::fs::lgetxattr(l.upper.join(p), name, &mut v[..]).map(|n| v[..n].to_vec()).ok()
    };
    for (p, redirect) in [("f2", &b"f"[..]), ("e/g2", b"/d/g"), ("h3", b"/d/h"), ("d/twice2", b"/twice")] {
        assert_eq!(xattr(p, "trusted.overlay.redirect").as_deref(), Some(redirect), "{p}");
        assert_eq!(xattr(p, "trusted.overlay.metacopy").as_deref(), Some(&b""[..]), "{p}");
    }
    assert!(xattr("e/written2", "trusted.overlay.redirect").is_some(), "the kernel leaves the redirect");
    assert!(xattr("e/written2", "trusted.overlay.metacopy").is_none(), "its data was copied up");

    let fresh = l.with_fresh_work(tmp.path().join("a/work2"));
    let o = MountGuard::mount(Backend::Ovlfs, &fresh, "metacopy=on,redirect_dir=on", &mount_point(tmp.path(), "o"));
    common::assert_same_tree("renamed metacopy files", "kernel", &view, "ovlfs", &common::snapshot_tree(o.path()));
    let names = ["f2", "e/g2", "h3", "d/twice2", "d2-moved/k", "e/written2", "e/low2", "deep2"];
    let ours: Vec<u64> = names.iter().map(|n| fs::metadata(o.path().join(n)).unwrap().ino()).collect();
    assert_eq!(inos, ours, "inode numbers of {names:?}: kernel (left) and ovlfs (right)");
    assert_eq!(fs::read_to_string(o.path().join("h3")).unwrap(), "to the root\n");
    drop(o);

    let out = Command::new(common::ovlfs_bin())
        .args(["check", "-o"])
        .arg(fresh.mount_options("metacopy=on,redirect_dir=on"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("clean"),
        "ovlfs check: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removals of lower files race opens for writing of the same files (which copy them up): a
/// removal looks its name up once, before it holds the name, and uses that only if no copy-up
/// came in between (issue 20: one lookup fewer per removal). Every removal succeeds, whichever
/// went first, and each name ends as a whiteout in the upper layer, as the kernel's mount of
/// the layers shows: nothing.
#[test]
fn removals_racing_copy_ups_of_the_same_files_leave_whiteouts() {
    const FILES: usize = 400;
    let tmp = tempdir("unlink-race");
    let l = Layers::create(&tmp.path().join("a"), 1);
    let fixture: String = (0..FILES).map(|i| format!("l1 file d/f{i} lower\n")).collect();
    apply_fixture(&l, &fixture);
    let m = MountGuard::mount(Backend::Ovlfs, &l, "", &mount_point(tmp.path(), "m"));
    let dir = m.path().join("d");
    let names: Vec<_> = (0..FILES).map(|i| dir.join(format!("f{i}"))).collect();
    for n in &names {
        fs::metadata(n).unwrap();
    }
    // Each name's open and removal start together.
    let start = std::sync::Barrier::new(2);
    let mut failed = Vec::new();
    let opened = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut opened, mut failed) = (0, Vec::new());
            for n in &names {
                start.wait();
                match OpenOptions::new().append(true).open(n) {
                    Ok(mut f) => {
                        if let Err(e) = std::io::Write::write_all(&mut f, b" written") {
                            failed.push(format!("write {n:?}: {e}"));
                        }
                        opened += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => failed.push(format!("open {n:?}: {e}")),
                }
            }
            (opened, failed)
        });
        for (i, n) in names.iter().enumerate() {
            start.wait();
            // Later and later after the open starts, so some removals meet its copy-up halfway.
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(5 * (i % 80) as u64) {
                std::hint::spin_loop();
            }
            // (A failure is kept, not a panic: the writer waits for every round.)
            if let Err(e) = fs::remove_file(n) {
                failed.push(format!("remove {n:?}: {e}"));
            }
        }
        let (opened, writes_failed) = writer.join().unwrap();
        failed.extend(writes_failed);
        opened
    });
    assert!(failed.is_empty(), "removals or opens failed: {failed:#?}");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "names left in the mount");
    drop(m);
    for i in 0..FILES {
        let st = fs::symlink_metadata(l.upper.join(format!("d/f{i}"))).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(st.file_type().is_char_device() && st.rdev() == 0, "upper d/f{i} is not a whiteout: {st:?}");
    }
    let k = MountGuard::mount(Backend::Kernel, &l, KERNEL_OPTS, &mount_point(tmp.path(), "k"));
    assert_eq!(fs::read_dir(k.path().join("d")).unwrap().count(), 0, "the kernel shows names");
    eprintln!("{opened} of {FILES} opened before their removal");
}
