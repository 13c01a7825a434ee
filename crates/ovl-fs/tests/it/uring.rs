//! FUSE over io_uring (issue 20): with the kernel's `enable_uring` set, a mount with
//! `uring=on` (or `auto`) is served through rings, and the rings really carry its requests:
//! the daemon's io_uring descriptors show as many completions as requests made (read from
//! `/proc/PID/fdinfo`, outside the daemon). `uring=off` serves from `/dev/fuse` alone;
//! `uring=on` where the kernel does not offer rings refuses the mount with the reason.
//!
//! The test changes `/sys/module/fuse/parameters/enable_uring` and restores it. The kernel
//! reads it only when a connection starts, so other tests' mounts meanwhile just use one
//! transport or the other (`cargo xtask test` runs the whole suite in both).

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::{Backend, Layers, MountGuard, apply_fixture, mount_point, tempdir};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// The tests of this file that set `enable_uring` take turns (each expects its own setting).
static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets `enable_uring`, and puts the old value back when dropped; holds `TURNS` meanwhile.
struct EnableUring(String, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl EnableUring {
    fn set(on: bool) -> Option<EnableUring> {
        let turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
        let old = fs::read_to_string(PARAM).ok()?;
        fs::write(PARAM, if on { "Y" } else { "N" }).ok()?;
        Some(EnableUring(old.trim().to_string(), turn))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = fs::write(PARAM, &self.0);
    }
}

/// Whether this kernel has FUSE over io_uring (says SKIP when not).
fn kernel_has_rings() -> bool {
    let has = Path::new(PARAM).exists();
    if !has {
        eprintln!("SKIP: this kernel has no FUSE over io_uring ({PARAM} missing)");
    }
    has
}

/// The daemon's io_uring descriptors and the completions they have had (`CqTail` of each).
fn ring_completions(pid: u32) -> (usize, u64) {
    let mut rings = 0;
    let mut completions = 0;
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_ring = fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("io_uring"));
        if !is_ring {
            continue;
        }
        rings += 1;
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap();
        let tail = info.lines().find_map(|l| l.strip_prefix("CqTail:")).expect("CqTail in io_uring fdinfo");
        completions += tail.trim().parse::<u64>().unwrap();
    }
    (rings, completions)
}

/// Creates, writes, reads, lists, renames and removes files: about 12 requests per file.
fn workload(root: &Path) -> Vec<String> {
    let dir = root.join("work");
    fs::create_dir(&dir).unwrap();
    for i in 0..50 {
        let p = dir.join(format!("f{i}"));
        fs::write(&p, format!("contents {i}\n").repeat(i + 1)).unwrap();
        fs::rename(&p, dir.join(format!("g{i}"))).unwrap();
    }
    for i in (0..50).step_by(2) {
        fs::remove_file(dir.join(format!("g{i}"))).unwrap();
    }
    let mut seen: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let text = fs::read_to_string(e.path()).unwrap();
            format!("{} {} {}", e.file_name().to_string_lossy(), e.metadata().unwrap().len(), text.lines().count())
        })
        .collect();
    seen.sort();
    seen.push(fs::read_to_string(root.join("low.txt")).unwrap());
    seen
}

fn setup(name: &str) -> (tempfile::TempDir, Layers) {
    let tmp = tempdir(name);
    let layers = Layers::create(&tmp.path().join("layers"), 1);
    apply_fixture(&layers, "l1 file low.txt from-the-lower-layer");
    (tmp, layers)
}

#[test]
fn requests_go_through_the_rings_when_the_kernel_offers_them() {
    if !kernel_has_rings() {
        return;
    }
    // Not offered: `uring=on` refuses to mount, and says why; `auto` serves from /dev/fuse.
    {
        let _off = EnableUring::set(false).expect("root can write enable_uring");
        let (tmp, layers) = setup("ovl-uring-off-");
        let mnt = mount_point(tmp.path(), "mnt");
        let out = Command::new(crate::common::ovlfs_bin())
            .arg("-f")
            .arg("-o")
            .arg(layers.mount_options("uring=on"))
            .arg(&mnt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "uring=on mounted without kernel rings: {err}");
        assert!(err.contains("io_uring") && err.contains("enable_uring"), "{err}");
        assert!(crate::common::mount_fstype(&mnt).is_none(), "a refused mount was left behind");
        let m = MountGuard::mount(Backend::Ovlfs, &layers, "uring=auto", &mnt);
        workload(m.path());
        assert_eq!(ring_completions(m.daemon_pid().unwrap()).0, 0, "rings without the kernel's offer");
    }

    let _on = EnableUring::set(true).expect("root can write enable_uring");
    let (tmp, layers) = setup("ovl-uring-on-");
    let (rmnt, dmnt) = (mount_point(tmp.path(), "ring"), mount_point(tmp.path(), "devfuse"));
    let dev_layers = layers.copy_to(&tmp.path().join("dev-layers"));
    let ring = MountGuard::mount(Backend::Ovlfs, &layers, "uring=on", &rmnt);
    let dev = MountGuard::mount(Backend::Ovlfs, &dev_layers, "uring=off", &dmnt);
    let pid = ring.daemon_pid().unwrap();
    let (rings, before) = ring_completions(pid);
    let cpus = ovl_uring::possible_cpus().unwrap();
    assert!(rings >= cpus, "{rings} rings for {cpus} possible CPUs");

    let through_rings = workload(ring.path());
    let (_, after) = ring_completions(pid);
    // 50 files x (lookup, create, write, release, rename, ...) and the listing and reads.
    assert!(after - before >= 300, "only {} requests came through the rings\n{}", after - before, ring.log_tail());
    assert_eq!(ring_completions(dev.daemon_pid().unwrap()).0, 0, "uring=off made rings");
    assert_eq!(through_rings, workload(dev.path()), "the two transports served different trees");
}

/// Each name's `d_ino` and `st_ino` in directories `dirs` below `root`, after listing each dir
/// twice (the first listing of a dir is a readdirplus, later ones may be plain readdirs).
fn listed_numbers(root: &Path, dirs: &[&str]) -> Vec<(String, u64, u64)> {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let mut out = Vec::new();
    for round in 0..2 {
        for dir in dirs {
            for e in fs::read_dir(root.join(dir)).unwrap() {
                let e = e.unwrap();
                let st = fs::symlink_metadata(e.path()).unwrap().ino();
                let name = Path::new(dir).join(e.file_name()).display().to_string();
                out.push((format!("{name} (listing {round})"), e.ino(), st));
            }
        }
    }
    out.sort();
    out
}

/// Names whose listed number is not the one `stat` shows.
fn mismatched(numbers: &[(String, u64, u64)]) -> Vec<&(String, u64, u64)> {
    numbers.iter().filter(|(_, d, st)| d != st).collect()
}

/// Issue 19: a node whose id is not the number `stat` shows (each name of a lower hard link is a
/// node of its own, as in the kernel, yet all show the lower file's number) is listed, over the
/// rings, with the number `stat` shows, as the kernel lists it: `ls -i` and `find -inum` agree
/// with `stat`. (fuser's `/dev/fuse` replies carry one number for a readdirplus entry's node id
/// and `d_ino`, so there such names list their node id: ARCHITECTURE.md, known weaknesses.)
#[test]
fn listings_over_the_rings_carry_the_numbers_stat_shows() {
    if !kernel_has_rings() {
        return;
    }
    let _on = EnableUring::set(true).expect("root can write enable_uring");
    let tmp = tempdir("ovl-uring-dino-");
    let k = Layers::create(&tmp.path().join("k"), 2);
    apply_fixture(&k, "l2 file d/a lower-data\nl2 hard d/b d/a\nl2 hard c d/a\nl1 file q plain\n");
    let o = k.copy_to(&tmp.path().join("o"));
    let kernel = MountGuard::mount(Backend::Kernel, &k, "", &mount_point(tmp.path(), "kernel"));
    let ovlfs = MountGuard::mount(Backend::Ovlfs, &o, "uring=on", &mount_point(tmp.path(), "ring"));
    let dirs = ["", "d"];
    for (step, what) in [(0, "the lower hard links"), (1, "after one name's copy-up")] {
        if step == 1 {
            for m in [&kernel, &ovlfs] {
                fs::write(m.path().join("d/a"), b"written").unwrap();
            }
        }
        let (kn, on) = (listed_numbers(kernel.path(), &dirs), listed_numbers(ovlfs.path(), &dirs));
        assert!(mismatched(&kn).is_empty(), "{what}: the kernel lists other numbers than stat shows: {kn:#?}");
        assert!(
            mismatched(&on).is_empty(),
            "{what}: ovlfs lists other numbers than stat shows: {:#?}",
            mismatched(&on)
        );
        let names = |v: &[(String, u64, u64)]| v.iter().map(|(n, ..)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&kn), names(&on), "{what}: the listed names");
        // The three names of the lower file show one number on both sides (the copied-up one
        // its own).
        let of =
            |v: &[(String, u64, u64)], n: &str| v.iter().find(|(m, ..)| m == &format!("{n} (listing 0)")).unwrap().2;
        for v in [&kn, &on] {
            assert_eq!(of(v, "d/b"), of(v, "c"), "{what}: {v:#?}");
            assert_eq!(of(v, "d/a") == of(v, "d/b"), step == 0, "{what}: {v:#?}");
        }
    }
}

/// Pins the calling thread to CPU `cpu` (so its requests go to that CPU's queue).
fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).expect("pin a test thread");
}

/// A queue's quick requests are served by its one thread in line, and those that may take long
/// by helpers (session 18; before, every entry had a thread of its own, which made 5000 creates
/// 2-3x slower on a quiet machine). So a copy-up does not hold up its queue: from one CPU, an
/// open for writing of a big lower file (its copy-up) and `stat`s of other files at the same
/// time; the `stat`s go on while the copy runs.
#[test]
fn a_copy_up_over_the_rings_holds_up_no_other_request_of_its_cpu() {
    if !kernel_has_rings() {
        return;
    }
    let (tmp, layers) = setup("uring-queue");
    let big = layers.lowers[0].join("big");
    let f = fs::File::create(&big).unwrap();
    f.set_len(0).unwrap();
    // Real data (a sparse file copies in no time): 384 MiB.
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..384 {
        std::io::Write::write_all(&mut &f, &chunk).unwrap();
    }
    drop(f);
    for i in 0..20 {
        fs::write(layers.lowers[0].join(format!("s{i}")), b"x").unwrap();
    }
    let _on = EnableUring::set(true).expect("root can write enable_uring");
    let m = MountGuard::mount(Backend::Ovlfs, &layers, "uring=on", &mount_point(tmp.path(), "m"));
    let root = m.path().to_path_buf();
    let pid = m.daemon_pid().expect("an ovlfs daemon");
    let (rings, _) = ring_completions(pid);
    assert!(rings > 0, "the daemon has no rings");
    // The page cache would make the copy quick.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let copying = std::sync::atomic::AtomicBool::new(true);
    let (stats, worst, copy) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            pin_to(0);
            let t = std::time::Instant::now();
            let f = fs::OpenOptions::new().write(true).open(root.join("big")).unwrap();
            let took = t.elapsed();
            copying.store(false, std::sync::atomic::Ordering::SeqCst);
            drop(f);
            took
        });
        pin_to(0);
        // Let the open start its copy first.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (mut stats, mut worst) = (0, std::time::Duration::ZERO);
        while copying.load(std::sync::atomic::Ordering::SeqCst) {
            let t = std::time::Instant::now();
            fs::metadata(root.join(format!("s{}", stats % 20))).unwrap();
            worst = worst.max(t.elapsed());
            stats += 1;
        }
        (stats, worst, writer.join().unwrap())
    });
    assert!(copy > std::time::Duration::from_millis(300), "the copy-up took only {copy:?}: too short to show anything");
    assert!(stats >= 20, "{stats} stats from the same CPU during a copy-up of {copy:?}");
    assert!(worst < copy / 2, "a stat waited {worst:?} during a copy-up of {copy:?}");
    assert_eq!(fs::metadata(layers.upper.join("big")).unwrap().len(), 384 << 20, "the copy-up");
}
