//! Crash safety of ovlfs (issue 8): the daemon is killed with SIGKILL at a random instant while
//! it copies up a big lower file, renames merged directories (`redirect_dir=on`) or creates
//! files; the dead mount is detached and the same layers are mounted again. The view must then
//! be the tree from before or after the operation in flight, `WORKDIR/work` must be empty (the
//! remount removes what a copy left there), and the stock kernel overlay must mount the layers
//! and show the same tree.
//!
//! Each round builds fresh layers: two lowers with merged directories and, for the copy-up, a
//! 48-80 MiB file in the bottom (or top) lower. The copy-up is a `pwrite`, an append, a
//! truncate or an `O_TRUNC` open and a write, each counted as two steps (the open copies up);
//! the renames are a sequence of `mv`s of merged and lower-only directories. The thread doing
//! the steps counts those that returned: the view must be the state after that many steps or
//! one more (the step in flight may have reached the layers without its answer reaching us).
//! The kill comes after a random fraction of a bound that adapts to how long the operation
//! takes here (shrunk when the kill came after it returned, grown when a late kill still found
//! it in flight), so that most kills land inside it.
//!
//! Environment (all optional):
//! - `OVL_CRASH_SEED` (1): round i of each test uses seed SEED + i
//! - `OVL_CRASH_ROUNDS` (8): rounds per test
//! - see `common/mod.rs` for `OVL_DIFF_OVLFS` and `OVL_DIFF_KEEP`

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore, SeedableRng};
use rustix::fs::{Mode, OFlags};

/// The options of every mount: redirects written (and followed), nothing the kernel would add.
const OPTS: &str = "redirect_dir=on,index=off,metacopy=off,xino=off";

/// How long the operation may stay blocked once the daemon is dead.
const AFTER_KILL: Duration = Duration::from_secs(30);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
}

/// One object of a view: what a user sees of it, times and inode numbers left out (a copy-up
/// keeps times, but parents of renamed dirs get new ones), content kept whole (compared by
/// `memcmp`, where the common recording hashes byte by byte, slow for big files in debug builds).
#[derive(Clone, PartialEq, Eq)]
struct Obj {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: Option<u64>,
    data: Option<Vec<u8>>,
    target: Option<OsString>,
    xattrs: Vec<(OsString, Bytes)>,
}

impl std::fmt::Debug for Obj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {:o} {}:{} nlink {:?}", self.kind, self.perm, self.uid, self.gid, self.nlink)?;
        if let Some(d) = &self.data {
            write!(f, " {} bytes {:?}", d.len(), Bytes(d[..d.len().min(16)].to_vec()))?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        write!(f, " xattrs {:?}", self.xattrs)
    }
}

type View = BTreeMap<PathBuf, Obj>;

/// Records the view under `root`.
fn record(root: &Path) -> View {
    let mut out = View::new();
    let paths = std::iter::once(PathBuf::new()).chain(list_tree(root).into_iter().map(|(p, _)| p));
    for rel in paths {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let kind = Kind::of(m.file_type());
        let data = (kind == Kind::File).then(|| {
            let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&p).expect("open");
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            buf
        });
        let obj = Obj {
            kind,
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            nlink: (kind != Kind::Dir).then_some(m.nlink()),
            data,
            target: (kind == Kind::Symlink).then(|| fs::read_link(&p).unwrap().into_os_string()),
            xattrs: xattrs(&p, |n| n.starts_with(b"user.") || n.starts_with(b"trusted.")).expect("xattrs"),
        };
        out.insert(rel, obj);
    }
    out
}

/// Every difference between two views, one line each.
fn differences(want: &View, got: &View) -> Vec<String> {
    diff_maps(want, got, |a, b| if a == b { Vec::new() } else { vec![format!("{a:?}\n      != {b:?}")] })
}

/// `view` with the subtree at `from` moved to `to`.
fn moved(view: &View, from: &Path, to: &Path) -> View {
    view.iter()
        .map(|(p, o)| match p.strip_prefix(from) {
            Ok(rest) if !p.as_os_str().is_empty() => (to.join(rest), o.clone()),
            _ => (p.clone(), o.clone()),
        })
        .collect()
}

/// The bound of the random kill delay, learned from the rounds so far.
struct Tuner(Duration);

impl Tuner {
    fn learn(&mut self, delay: Duration, took: Option<Duration>) {
        match took {
            Some(t) => self.0 = t.mul_f64(1.25).max(Duration::from_millis(1)),
            None if delay > self.0.mul_f64(0.7) => self.0 = self.0.mul_f64(1.5),
            None => {}
        }
    }
}

/// Prints what a failed round did and how to reproduce it (also during a panic).
struct Note(String, Vec<String>);

impl Drop for Note {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}\n  {}", self.0, self.1.join("\n  "));
        }
    }
}

/// The steps of one round's operation; each returned step bumps the counter.
type Op = Box<dyn FnOnce(&AtomicUsize) -> Result<(), String> + Send>;

/// Sets up layers with `build`, mounts ovlfs, plans the operation with `plan` (which returns
/// the states after each step, `before` first, and the steps), runs it, kills the daemon after a
/// random delay, remounts, and checks the view, the work dir and the kernel's view.
fn crash_rounds(test: &str, first: Duration, round: impl Fn(&mut StdRng, &Layers, &Path) -> (Vec<View>, Op)) {
    let (seed0, rounds) = (env_num("OVL_CRASH_SEED", 1), env_num("OVL_CRASH_ROUNDS", 8));
    let mut tuner = Tuner(first);
    let (mut in_flight, mut before, mut after) = (0, 0, 0);
    for seed in seed0..seed0 + rounds {
        let mut note = Note(
            format!(
                "ovlfs crash round failed: {test}, seed {seed}; reproduce with OVL_CRASH_SEED={seed} OVL_CRASH_ROUNDS=1 \
                 cargo test -p ovl-fs --test it -- --exact crash::{test}"
            ),
            Vec::new(),
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let tmp = tempdir("ovl-crash");
        let layers = Layers::create(tmp.path(), 2);
        let mnt = mount_point(tmp.path(), "mnt");
        let m = MountGuard::mount(Backend::Ovlfs, &layers, OPTS, &mnt);
        // The steps reach the mount through a descriptor of its root: a step that starts after
        // the kill and the detach of the mount then fails (the connection is gone) instead of
        // going on in the bare mount point dir beneath, where it would seem done. (Through
        // the path, a create that started then succeeded in that dir and counted as done: a
        // file "lost" by the remount that was never made in the overlay.)
        let root = rustix::fs::open(m.path(), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("open the mount root");
        let via = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
        let (states, op) = round(&mut rng, &layers, &via);
        let conn = fuse_connection(m.path());

        let delay = tuner.0.mul_f64(rng.random());
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let counter = done.clone();
        let start = Instant::now();
        std::thread::spawn(move || {
            let r = op(&counter);
            let _ = tx.send((r, start.elapsed()));
        });
        sleep(delay.saturating_sub(start.elapsed()));
        let early = rx.try_recv().ok();
        m.kill_daemon(conn).unwrap_or_else(|e| panic!("killing the daemon: {e}"));
        let finished = early.is_some();
        let (result, took) = match early {
            Some(r) => r,
            None => rx.recv_timeout(AFTER_KILL).unwrap_or_else(|_| panic!("still blocked after the daemon was killed")),
        };
        tuner.learn(delay, finished.then_some(took));
        let done = done.load(Ordering::SeqCst);
        in_flight += u32::from(!finished);
        note.1.push(format!(
            "killed after {delay:?}; the op {} after {took:?}, {done} of {} step(s) done: {result:?}",
            if finished { "had returned" } else { "was in flight, returned" },
            states.len() - 1
        ));

        let m = MountGuard::mount(Backend::Ovlfs, &layers, OPTS, &mnt);
        let work: Vec<_> = fs::read_dir(layers.work.join("work")).expect("read WORKDIR/work").collect();
        assert!(work.is_empty(), "WORKDIR/work after the remount: {work:?}");
        let view = record(m.path());
        let last = states.len() - 1;
        let i = if finished && result.is_ok() { last } else { done.min(last) };
        if differences(&states[i], &view).is_empty() {
            before += u32::from(i < last);
            after += u32::from(i == last);
        } else if i < last && differences(&states[i + 1], &view).is_empty() {
            after += 1;
        } else {
            let mut msg = format!("the view after the remount is neither state {i} nor {} of {last}\n", i + 1);
            for j in [i, (i + 1).min(last)] {
                let d = differences(&states[j], &view);
                msg.push_str(&format!("  vs state {j}: {}\n", d[..d.len().min(8)].join("\n    ")));
            }
            for (what, dir) in [("upper", &layers.upper), ("work", &layers.work)] {
                let mut names: Vec<String> = walkdir_names(dir);
                names.sort();
                msg.push_str(&format!("  {what} holds: {names:?}\n"));
            }
            panic!("{msg}");
        }
        m.unmount().unwrap_or_else(|e| panic!("unmount after the checks: {e}"));
        let k = MountGuard::mount(
            Backend::Kernel,
            &layers.with_fresh_work(tmp.path().join("work2")),
            OPTS,
            &mount_point(tmp.path(), "kernel"),
        );
        let d = differences(&view, &record(k.path()));
        assert!(d.is_empty(), "the kernel's view of the layers differs from ovlfs's:\n  {}", d.join("\n  "));
        drop(k);
        note.1.clear();
    }
    eprintln!(
        "ovlfs crash {test} (seeds {seed0}..{}): killed in flight {in_flight} of {rounds}; view before {before}, after {after}",
        seed0 + rounds
    );
}

/// Opens `path` with `o` as one step of an operation.
fn open(path: &Path, o: &OpenOptions, done: &AtomicUsize) -> Result<fs::File, String> {
    let f = o.open(path).map_err(|e| format!("open: {e}"))?;
    done.fetch_add(1, Ordering::SeqCst);
    Ok(f)
}

/// Counts a step that succeeded.
fn step(done: &AtomicUsize, r: std::io::Result<()>) -> Result<(), String> {
    r.map_err(|e| e.to_string())?;
    done.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Random bytes in which every 4 KiB block starts with its offset.
fn big_data(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut block = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut block);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&block[..(len - out.len()).min(block.len())]);
    }
    for off in (0..len).step_by(4096) {
        let end = (off + 8).min(len);
        out[off..end].copy_from_slice(&(off as u64).to_le_bytes()[..end - off]);
    }
    out
}

#[test]
fn copy_up_of_a_big_lower_file() {
    crash_rounds("copy_up_of_a_big_lower_file", Duration::from_millis(300), |rng, layers, mnt| {
        let len = (rng.random_range(48..=80) << 20) + rng.random_range(0..4096);
        let lower = layers.lowers.choose(rng).unwrap();
        fs::write(lower.join("big"), big_data(rng, len)).unwrap();
        for (i, l) in layers.lowers.iter().enumerate() {
            fs::create_dir_all(l.join("d")).unwrap();
            fs::write(l.join(format!("d/f{i}")), format!("file of lower {i}\n")).unwrap();
        }
        let before = record(mnt);
        let old = before[Path::new("big")].data.clone().unwrap();
        let with = |data: Vec<u8>| {
            let mut v = before.clone();
            v.get_mut(Path::new("big")).unwrap().data = Some(data);
            v
        };
        let mut patch = vec![0u8; 4096];
        rng.fill_bytes(&mut patch);
        let big = mnt.join("big");
        let (mid, end, op): (View, View, Op) = match rng.random_range(0..4) {
            0 => {
                let off = rng.random_range(0..len - 4096);
                let mut new = old.clone();
                new[off..off + 4096].copy_from_slice(&patch);
                let op = Box::new(move |d: &AtomicUsize| {
                    step(d, open(&big, OpenOptions::new().write(true), d)?.write_all_at(&patch, off as u64))
                });
                (before.clone(), with(new), op)
            }
            1 => {
                let mut new = old.clone();
                new.extend_from_slice(&patch);
                let op = Box::new(move |d: &AtomicUsize| {
                    step(d, open(&big, OpenOptions::new().append(true), d)?.write_all(&patch))
                });
                (before.clone(), with(new), op)
            }
            2 => {
                let cut = rng.random_range(0..len);
                let op = Box::new(move |d: &AtomicUsize| {
                    step(d, open(&big, OpenOptions::new().write(true), d)?.set_len(cut as u64))
                });
                (before.clone(), with(old[..cut].to_vec()), op)
            }
            _ => {
                let end = with(patch.clone());
                let op = Box::new(move |d: &AtomicUsize| {
                    step(d, open(&big, OpenOptions::new().write(true).truncate(true), d)?.write_all(&patch))
                });
                (with(Vec::new()), end, op)
            }
        };
        (vec![before, mid, end], op)
    });
}

#[test]
fn rename_of_merged_dirs() {
    crash_rounds("rename_of_merged_dirs", Duration::from_millis(30), |rng, layers, mnt| {
        // Dirs merged from both lowers, dirs of one lower only, nested two deep.
        for (i, l) in layers.lowers.iter().enumerate() {
            for d in ["m0", "m0/s", "m1", "m1/s/t", "m2"] {
                fs::create_dir_all(l.join(d)).unwrap();
                fs::write(l.join(d).join(format!("f{i}")), format!("{d} in lower {i}\n")).unwrap();
            }
            fs::create_dir_all(l.join(format!("only{i}/inner"))).unwrap();
            fs::write(l.join(format!("only{i}/inner/g")), b"one lower only\n").unwrap();
        }
        let before = record(mnt);
        let mut states = vec![before];
        let mut plan = Vec::new();
        for k in 0..12 {
            let view = states.last().unwrap();
            let dirs: Vec<&PathBuf> = view.iter().filter(|(_, o)| o.kind == Kind::Dir).map(|(p, _)| p).collect();
            let from = (*dirs[1..].choose(rng).unwrap()).clone();
            let parents: Vec<&&PathBuf> = dirs.iter().filter(|d| !d.starts_with(&from)).collect();
            let to = parents.choose(rng).unwrap().join(format!("r{k}"));
            states.push(moved(view, &from, &to));
            plan.push((from, to));
        }
        let mnt = mnt.to_owned();
        let op: Op = Box::new(move |done| {
            for (from, to) in &plan {
                fs::rename(mnt.join(from), mnt.join(to))
                    .map_err(|e| format!("mv {} {}: {e}", from.display(), to.display()))?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
        (states, op)
    });
}

// Regression: ovlfs made a new file, dir or symlink whose name was free in the upper dir
// directly there with mode 0600 and the daemon's owner, then chowned and chmodded it; a daemon
// killed in between left it in the upper layer with the wrong mode and owner. New objects are
// now built complete in the work dir and renamed into place.
#[test]
fn creates_of_new_names() {
    crash_rounds("creates_of_new_names", Duration::from_millis(30), |rng, layers, mnt| {
        for (i, l) in layers.lowers.iter().enumerate() {
            fs::create_dir_all(l.join("m")).unwrap();
            fs::write(l.join(format!("m/f{i}")), b"lower\n").unwrap();
        }
        let before = record(mnt);
        let umask = u32::from_str_radix(
            fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .unwrap()
                .trim(),
            8,
        )
        .unwrap();
        let mut states = vec![before];
        let mut plan = Vec::new();
        for k in 0..60 {
            let path = PathBuf::from(if rng.random_bool(0.5) { format!("m/n{k}") } else { format!("n{k}") });
            let mut next = states.last().unwrap().clone();
            let obj = Obj {
                kind: Kind::File,
                perm: 0o644 & !umask,
                uid: 0,
                gid: 0,
                nlink: Some(1),
                data: Some(Vec::new()),
                target: None,
                xattrs: Vec::new(),
            };
            next.insert(path.clone(), obj);
            states.push(next);
            plan.push(path);
        }
        let mnt = mnt.to_owned();
        let op: Op = Box::new(move |done| {
            for p in &plan {
                let o = OpenOptions::new().write(true).create_new(true).mode(0o644).open(mnt.join(p));
                o.map_err(|e| format!("create {}: {e}", p.display()))?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
        (states, op)
    });
}

/// Every path below `dir` (for failure messages).
fn walkdir_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            }
        }
    }
    out
}
