//! Crash safety (issue 8): the ovlsnap daemon (or, in two tests, the `ovlsnap` client) is
//! killed with SIGKILL at a random instant while one operation is in flight; the dead mount is detached (`umount -l`) and LIVE mounted again
//! with `ovlsnap mount`. Then every snapshot view must equal the tree recorded when it was
//! taken, LIVE must be the tree from just before or just after the interrupted operation, and
//! the store must be clean: `work/work` empty, no journal left, `snapshots.json` readable and
//! naming exactly the layer dirs there are. The newest snapshot is also mounted with the stock
//! kernel overlay and compared, and a change after the remount must still be saved.
//!
//! One test per kind of operation, each running `OVLSNAP_CRASH_ROUNDS` rounds on a fresh LIVE
//! (stacked or separate mount, chosen by the round's seed):
//! - `copy_up`: the first write after a take to a 64 MiB file (its copy into the snapshot
//!   layer takes a while): `pwrite`, append, truncate, or `O_TRUNC` and a write;
//! - `removals`: a sequence of unlinks and `rm -rf`s of names the snapshots have (saved into the
//!   layer by a hard link, or as an opaque copy of the dir);
//! - `creates`: mostly creates, mkdirs and symlinks of new names and of removed ones (saved as
//!   whiteouts, or already decided by the layer);
//! - `dir_renames`: a sequence of `mv`s of directories that exist in the snapshots, in a layer
//!   already holding redirects (so a rename rewrites them under `rename-in-progress.json`);
//! - `take` and `delete` (of a middle or the newest snapshot, merged with many changes): sent
//!   on the control socket itself, so the kill is timed against the daemon's work and not the
//!   start of a CLI process;
//! - `restore` and `receive` (an incremental stream into the mount): the `ovlsnap` command;
//!   `restore_client_killed` and `receive_client_killed` kill that command instead of the daemon.
//!
//! After the checks each round mounts the newest snapshot with the kernel, makes a change and
//! checks that the snapshot did not see it; `take` and `delete` also take a new snapshot.
//!
//! "Before or after": a sequence's thread counts the steps that returned; LIVE must be the
//! state after that many steps, or one more (the step in flight may have reached LIVE without
//! its answer reaching us); a step that returned before the kill must be in LIVE. `take` and
//! `delete` leave LIVE as it is and the list is the old one or the new one. `restore` and
//! `receive` are many ordinary changes made by a client through the mount, multi-step by
//! design: LIVE may also be in between, provided that running the same command again
//! finishes the job. Their leftovers: restore's temporary names `.ovlsnap-restore.*` (every
//! object it writes is built under one beside its target, then renamed into place) may show
//! only in such an in-between state, and after the rerun none may be left anywhere in LIVE;
//! the stage dir `.ovlsnap-receive.PID` a killed receive leaves next to its target is not part
//! of LIVE for the comparison, and after the next receive into the same parent (the rerun, or
//! one into a sibling of the target when the killed one had finished) none may be left.
//!
//! The kill instant: a random fraction (from the seed) of a bound that adapts to how long the
//! operation takes here (a kill that came after the operation had returned shrinks it, a late
//! kill that still found it in flight grows it), so most kills land inside. The seed fixes the
//! choices, not the timing; failures print the delay.
//!
//! Environment (all optional):
//! - `OVLSNAP_CRASH_SEED` (1): round i of each kind uses seed SEED + i
//! - `OVLSNAP_CRASH_ROUNDS` (15): rounds per kind
//! - `OVLSNAP_CRASH_VERBOSE=1`: print each round's steps
//! - see `common/mod.rs` for `OVLSNAP_BIN`, `OVLSNAP_TEST_KEEP` and the deadlines

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use crate::crash_support::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

#[test]
fn copy_up() {
    run_kind("copy-up", "copy_up", Duration::from_millis(300), |r| {
        let len = (64 << 20) + r.rng.random_range(0..1 << 16);
        r.start(|live, rng| {
            build_tree(live, rng, 3, 4);
            fs::write(live.join("big"), big_data(len, rng)).unwrap();
        });
        r.take("s1");
        churn(&r.mnt(), &mut r.rng, 10);
        let before = r.take("s2");
        let big = r.mnt().join("big");
        let old = before[Path::new("big")].data.clone().unwrap();
        let mut states = vec![before.clone(), before.clone(), before.clone()];
        let with = |data: Vec<u8>| {
            let mut t = before.clone();
            t.get_mut(Path::new("big")).unwrap().data = Some(data);
            t
        };
        let patch = bytes(&mut r.rng, 4096);
        let op: Op = match r.rng.random_range(0..4) {
            0 => {
                let off = r.rng.random_range(0..len - 4096);
                let mut new = old.clone();
                new[off..off + 4096].copy_from_slice(&patch);
                states[2] = with(new);
                r.log(format!("op: open for write and pwrite 4 KiB at {off} of {len}"));
                Box::new(move |done| {
                    let f = OpenOptions::new().write(true).open(&big).map_err(|e| format!("open: {e}"))?;
                    done.fetch_add(1, Ordering::SeqCst);
                    io_step(done, "pwrite", f.write_all_at(&patch, off as u64))
                })
            }
            1 => {
                let mut new = old.clone();
                new.extend_from_slice(&patch);
                states[2] = with(new);
                r.log(format!("op: append 4 KiB to {len}"));
                Box::new(move |done| {
                    let mut f = OpenOptions::new().append(true).open(&big).map_err(|e| format!("open: {e}"))?;
                    done.fetch_add(1, Ordering::SeqCst);
                    io_step(done, "append", f.write_all(&patch))
                })
            }
            2 => {
                let cut = r.rng.random_range(0..len);
                states[2] = with(old[..cut].to_vec());
                r.log(format!("op: truncate {len} to {cut}"));
                Box::new(move |done| {
                    let f = OpenOptions::new().write(true).open(&big).map_err(|e| format!("open: {e}"))?;
                    done.fetch_add(1, Ordering::SeqCst);
                    io_step(done, "ftruncate", f.set_len(cut as u64))
                })
            }
            _ => {
                states[1] = with(Vec::new());
                states[2] = with(patch.clone());
                r.log(format!("op: open O_TRUNC ({len} bytes) and write 4 KiB"));
                Box::new(move |done| {
                    let mut f =
                        OpenOptions::new().write(true).truncate(true).open(&big).map_err(|e| format!("open: {e}"))?;
                    done.fetch_add(1, Ordering::SeqCst);
                    io_step(done, "write", f.write_all(&patch))
                })
            }
        };
        let crash = r.crash("first write to big after a take", op);
        r.check_snapshots();
        let live = r.check_live(&states, &crash);
        Outcome { live, finished: crash.finished }
    });
}

/// What a planned sequence of changes is made of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Unlinks and `rm -rf`s of names the snapshots have (saved into the layer by a hard link,
    /// an opaque copy of a removed dir).
    Removals,
    /// Mostly creates, mkdirs and symlinks of new names and of removed ones (saved as
    /// whiteouts, or already decided by the layer), with some removals.
    Creates,
}

/// `len` changes (or fewer when nothing is left to remove) planned on the tree `before`.
fn plan(rng: &mut StdRng, before: &Tree, mix: Mix, len: usize) -> Vec<Change> {
    let mut tree = before.clone();
    let mut plan = Vec::new();
    let mut removed: Vec<PathBuf> = Vec::new();
    while plan.len() < len {
        let (dirs, others) = split_kinds(&tree);
        let mut changes = Vec::new();
        let roll = rng.random_range(0..100);
        if mix == Mix::Creates && roll < 75 {
            let again = removed.iter().filter(|p| !tree.contains_key(*p) && tree.contains_key(p.parent().unwrap()));
            let again: Vec<&PathBuf> = again.collect();
            let path = match again.choose(rng) {
                Some(p) if rng.random_bool(0.5) => (*p).clone(),
                _ => dirs.choose(rng).unwrap().join(format!("new{}", plan.len())),
            };
            match roll {
                0..45 => {
                    let len = rng.random_range(1..3000);
                    changes.push(Change::Create(path.clone()));
                    changes.push(Change::Write(path, bytes(rng, len)));
                }
                45..65 => changes.push(Change::Mkdir(path)),
                _ => changes.push(Change::Symlink(path, "x/y".into())),
            }
        } else if dirs.len() > 1 && (roll % 4 == 0 || others.is_empty()) {
            let d = dirs[1..].choose(rng).unwrap();
            let mut below: Vec<(&PathBuf, &Entry)> = tree.iter().filter(|(p, _)| p.starts_with(d)).collect();
            below.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
            for (p, e) in below {
                changes.push(if e.kind == Kind::Dir { Change::Rmdir(p.clone()) } else { Change::Unlink(p.clone()) });
            }
        } else if let Some(p) = others.choose(rng) {
            changes.push(Change::Unlink(p.clone()));
        } else {
            break;
        }
        for c in changes {
            if let Change::Unlink(p) | Change::Rmdir(p) = &c {
                removed.push(p.clone());
            }
            tree = c.model(&tree);
            plan.push(c);
        }
    }
    plan
}

/// A round of a planned sequence of removals or creates after two takes.
fn sequence_round(r: &mut Round, mix: Mix) -> Outcome {
    r.start(|live, rng| build_tree(live, rng, 6, 6));
    r.take("s1");
    churn(&r.mnt(), &mut r.rng, 20);
    let before = r.take("s2");
    let plan = plan(&mut r.rng, &before, mix, 60);
    r.log(format!("op: {} changes: {plan:?}", plan.len()));
    let states = states_of(&before, &plan);
    let crash = r.crash("the planned changes", run_plan(r.mnt(), plan));
    r.check_snapshots();
    let live = r.check_live(&states, &crash);
    Outcome { live, finished: crash.finished }
}

#[test]
fn removals() {
    run_kind("removals", "removals", Duration::from_millis(100), |r| sequence_round(r, Mix::Removals));
}

// Regression: ovl-fs made a new file, dir or symlink directly in the upper dir with mode 0600
// and the daemon's owner, then chowned and chmodded it; a daemon killed in between left it
// visible with the wrong mode and owner (seen with OVLSNAP_CRASH_SEED=11, `d5/new1` mode 0600
// instead of 0644). New objects are now built complete in the work dir and renamed into place.
#[test]
fn creates() {
    run_kind("creates", "creates", Duration::from_millis(100), |r| sequence_round(r, Mix::Creates));
}

#[test]
fn dir_renames() {
    run_kind("dir-renames", "dir_renames", Duration::from_millis(60), |r| {
        r.start(|live, rng| {
            for i in 0..6 {
                let q = live.join(format!("p/q{i}"));
                fs::create_dir_all(q.join("r")).unwrap();
                for f in ["a", "b", "r/c"] {
                    fs::write(q.join(f), bytes(rng, 100)).unwrap();
                }
            }
            for d in ["t", "u/v"] {
                fs::create_dir_all(live.join(d)).unwrap();
                fs::write(live.join(d).join("f"), bytes(rng, 100)).unwrap();
            }
        });
        r.take("s1");
        let mnt = r.mnt();
        fs::write(mnt.join("p/q3/a"), b"changed").unwrap();
        fs::rename(mnt.join("p/q4"), mnt.join("t/q4")).unwrap();
        r.take("s2");
        // Redirects in the newest layer, which later renames of their parents rewrite.
        for (from, to) in [("p/q0", "p/q0a"), ("p/q1", "t/q1"), ("p/q2/r", "u/r2"), ("t/q4", "u/v/q4")] {
            fs::rename(mnt.join(from), mnt.join(to)).unwrap();
        }
        let before = record_unlinked(&mnt);
        let mut tree = before.clone();
        let mut plan = Vec::new();
        for k in 0..10 {
            let (dirs, _) = split_kinds(&tree);
            let from = dirs[1..].choose(&mut r.rng).unwrap().clone();
            let parents: Vec<&PathBuf> = dirs.iter().filter(|d| !d.starts_with(&from)).collect();
            let to = parents.choose(&mut r.rng).unwrap().join(format!("m{k}"));
            let c = Change::Rename(from, to);
            tree = c.model(&tree);
            plan.push(c);
        }
        r.log(format!("op: {plan:?}"));
        let states = states_of(&before, &plan);
        let crash = r.crash("directory renames", run_plan(mnt, plan));
        r.check_snapshots();
        let live = r.check_live(&states, &crash);
        Outcome { live, finished: crash.finished }
    });
}

/// Whether snapshot `name` is listed.
fn listed(r: &Round, name: &str) -> bool {
    r.m.list().iter().any(|s| s.name == name)
}

/// A take after the crash works, and shows the live tree.
fn take_again(r: &mut Round) {
    let live = record_unlinked(&r.mnt());
    let tree = r.take("after-crash");
    assert_same_tree(&live, &tree, "MNT right after a take following the crash");
    assert_same_tree(&live, &record_unlinked(&r.m.view("after-crash")), "a snapshot taken after the crash");
}

// Regression: the daemon opened and `syncfs`ed its own mount when it served a take. A kill
// while one of its FUSE threads had read such a request left it unkillable for good (the kernel
// waits for that answer uninterruptibly, and the connection ends only when the last thread
// closes /dev/fuse), its control thread stuck in `fuse_dir_open` -> `request_wait_answer` (seen
// with OVLSNAP_CRASH_SEED=8). The client syncs now; `kill_and_wait` aborts the connection
// through fusectl and fails if a daemon does not die.
#[test]
fn take() {
    run_kind("take", "take", Duration::from_millis(10), |r| {
        r.start(|live, rng| build_tree(live, rng, 4, 4));
        r.take("s1");
        churn(&r.mnt(), &mut r.rng, 20);
        let live = record_unlinked(&r.mnt());
        let mnt = r.mnt();
        let crash = r.crash("take s2", move |done| step(done, control(&mnt, r#"{"cmd":"take","name":"s2"}"#)));
        let taken = listed(r, "s2");
        assert!(taken || crash.done == 0, "take s2 returned before the kill, but s2 is gone after the remount");
        if taken {
            r.snaps.push(("s2".into(), live.clone()));
        }
        r.check_snapshots();
        r.check_live(&[live], &crash);
        take_again(r);
        Outcome { live: if taken { Live::After } else { Live::Before }, finished: crash.finished }
    });
}

#[test]
fn delete() {
    run_kind("delete", "delete", Duration::from_millis(100), |r| {
        r.start(|live, rng| build_tree(live, rng, 8, 8));
        r.take("s1");
        churn(&r.mnt(), &mut r.rng, 150);
        r.take("s2");
        churn(&r.mnt(), &mut r.rng, 150);
        r.take("s3");
        churn(&r.mnt(), &mut r.rng, 30);
        let live = record_unlinked(&r.mnt());
        // A middle snapshot (merged into s1) or the newest (merged, reading LIVE).
        let victim = if r.rng.random_ratio(2, 3) { "s2" } else { "s3" };
        let mnt = r.mnt();
        let request = format!(r#"{{"cmd":"delete","name":"{victim}"}}"#);
        let crash = r.crash(&format!("delete {victim}"), move |done| step(done, control(&mnt, &request)));
        let gone = !listed(r, victim);
        assert!(gone || crash.done == 0, "delete {victim} returned before the kill, but it is back after the remount");
        if gone {
            r.snaps.retain(|(n, _)| n != victim);
        }
        r.check_snapshots();
        r.check_live(&[live], &crash);
        take_again(r);
        Outcome { live: if gone { Live::After } else { Live::Before }, finished: crash.finished }
    });
}

/// Which process a round kills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The daemon (the mount is detached and mounted again).
    Daemon,
    /// The `ovlsnap` client itself (the daemon serves on).
    Client,
}

/// Runs the `ovlsnap` command `args` (stdin from `input`) in a round and kills `who` meanwhile.
fn crash_command(r: &mut Round, who: Kill, what: &str, args: Vec<OsString>, input: Option<PathBuf>) -> Crash {
    match who {
        Kill::Daemon => r.crash(what, move |done| step(done, ovlsnap_step(&args, input.as_deref()))),
        Kill::Client => {
            let mut cmd = Command::new(ovlsnap_bin());
            cmd.args(&args);
            cmd.stdin(match &input {
                Some(p) => Stdio::from(File::open(p).expect("open the stream")),
                None => Stdio::null(),
            });
            let crash = r.kill_client(what, cmd);
            r.settle();
            crash
        }
    }
}

/// A restore of s1 over many changes, killed. No object of LIVE may be half-made (each is one
/// of the trees before the restore or of s1, under some name) but under a temporary name; a
/// rerun must finish the restore, removing every temporary name the killed one left
/// (`.ovlsnap-restore.*`) anywhere in LIVE.
fn restore_round(r: &mut Round, who: Kill) -> Outcome {
    r.start(|live, rng| build_tree(live, rng, 8, 8));
    let s1 = r.take("s1");
    churn(&r.mnt(), &mut r.rng, 120);
    r.take("s2");
    churn(&r.mnt(), &mut r.rng, 40);
    let before = record_unlinked(&r.mnt());
    let args: Vec<OsString> = vec!["restore".into(), "s1".into(), "--mount".into(), r.mnt().into()];
    let crash = crash_command(r, who, "ovlsnap restore s1", args.clone(), None);
    r.check_snapshots();
    let live = record_unlinked(&r.mnt());
    let temps = restore_temps(&live);
    let state = if diff_trees(&s1, &live).is_empty() {
        Live::After
    } else {
        assert!(crash.done == 0, "restore returned before the kill, but LIVE is not s1");
        if diff_trees(&before, &live).is_empty() { Live::Before } else { Live::Between }
    };
    r.leftovers += temps.len() as u64;
    let half = half_made(&live, &[&before, &s1]);
    assert!(half.is_empty(), "half-made objects in LIVE after the kill ({state:?}):\n  {}", half.join("\n  "));
    if state != Live::After {
        r.log(format!("LIVE {state:?} with {} temporary name(s) {temps:?}: running the restore again", temps.len()));
        ovlsnap(&args).expect_ok("ovlsnap restore again after the crash");
        let again = record_unlinked(&r.mnt());
        let left = restore_temps(&again);
        assert!(left.is_empty(), "temporary names of the killed restore left after the rerun: {left:?}");
        assert_same_tree(&s1, &again, "LIVE after running the killed restore again");
        r.check_snapshots();
    }
    Outcome { live: state, finished: crash.finished }
}

#[test]
fn restore() {
    run_kind("restore", "restore", Duration::from_millis(300), |r| restore_round(r, Kill::Daemon));
}

// Issue 8: restore wrote a file deleted since the snapshot straight to its final name, so a
// killed restore left it half-written there until a rerun. Every object is now built under a
// temporary name beside its target and renamed into place; the rerun removes the temporaries.
#[test]
fn restore_client_killed() {
    run_kind("restore-client", "restore_client_killed", Duration::from_millis(300), |r| restore_round(r, Kill::Client));
}

/// `ovlsnap send B [--from A]` of `m` into `out`.
fn send_to(m: &SnapMount, b: &str, from: Option<&str>, out: &Path) {
    let mut cmd = Command::new(ovlsnap_bin());
    cmd.args(["send", b, "--mount"]).arg(m.mnt());
    if let Some(a) = from {
        cmd.args(["--from", a]);
    }
    let o = cmd.stdin(Stdio::null()).stdout(File::create(out).unwrap()).output().expect("run ovlsnap send");
    assert!(o.status.success(), "ovlsnap send {b}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The streams of the receive rounds: a full one of snapshot a and an incremental one from a to b,
/// with the trees of a and b.
struct Streams {
    full: PathBuf,
    incr: PathBuf,
    ta: Tree,
    tb: Tree,
    /// Holds the stream files.
    _src: SnapMount,
}

fn streams() -> Streams {
    let mut rng = StdRng::seed_from_u64(Config::from_env().seed);
    let mut src = SnapMount::start(Form::Separate, |live| {
        build_tree(live, &mut rng, 10, 10);
        for i in 0..4 {
            fs::write(live.join(format!("big{i}")), bytes(&mut rng, 1 << 20)).unwrap();
        }
    });
    src.take(Some("a"));
    let ta = record_unlinked(&src.view("a"));
    churn(src.mnt(), &mut rng, 120);
    src.take(Some("b"));
    let tb = record_unlinked(&src.view("b"));
    let dir = src.scratch().mkdir("streams");
    let (full, incr) = (dir.join("full.tar"), dir.join("incr.tar"));
    send_to(&src, "a", None, &full);
    send_to(&src, "b", Some("a"), &incr);
    src.umount();
    Streams { full, incr, ta, tb, _src: src }
}

/// An incremental receive into the mount's root or a dir in it, killed. The stage the killed
/// receive left (inside LIVE when the target is a dir in it) is not part of LIVE for the
/// comparison. The next receive into the same parent (the rerun, or when the killed one had
/// finished, a full stream into a sibling of the target) must remove it and leave none.
fn receive_round(r: &mut Round, s: &Streams, who: Kill) -> Outcome {
    // Into the mount's root (the stage is outside the mount) or a dir in it (inside).
    let into_root = r.rng.random_bool(0.5);
    r.start(|live, rng| {
        if !into_root {
            build_tree(live, rng, 2, 3);
        }
    });
    let target = if into_root { r.mnt() } else { r.mnt().join("backup") };
    let parent = target.parent().unwrap().to_owned();
    ovlsnap_step(&["receive".into(), target.clone().into()], Some(&s.full)).expect("receive the full stream");
    r.take("t1");
    let before = record_unlinked(&r.mnt());
    let after = if into_root { s.tb.clone() } else { graft(&before, Path::new("backup"), &s.tb) };
    let args: Vec<OsString> = vec!["receive".into(), target.into()];
    let crash = crash_command(r, who, "ovlsnap receive (incremental)", args.clone(), Some(s.incr.clone()));
    r.check_snapshots();
    let stages = stages_in(&parent);
    r.leftovers += stages.len() as u64;
    let (live, _) = without_stages(&record_unlinked(&r.mnt()));
    if !into_root {
        // Staged on the target's fs: every object is renamed into place complete. (Into the root
        // the stage is on another fs and objects are copied at their names: a known weakness.)
        let half = half_made(&live, &[&before, &after]);
        assert!(half.is_empty(), "half-made objects in LIVE after the kill:\n  {}", half.join("\n  "));
    }
    let state = if diff_trees(&after, &live).is_empty() {
        Live::After
    } else {
        assert!(crash.done == 0, "receive returned before the kill, but LIVE is not the stream's tree");
        if diff_trees(&before, &live).is_empty() { Live::Before } else { Live::Between }
    };
    if state != Live::After {
        r.log(format!("LIVE {state:?}, stages {stages:?}: receiving again"));
        ovlsnap_step(&args, Some(&s.incr)).expect("receive again after the crash");
    } else {
        r.log(format!("LIVE after, stages {stages:?}: a full stream into a sibling"));
        let sibling = parent.join("sibling");
        ovlsnap_step(&["receive".into(), sibling.clone().into()], Some(&s.full)).expect("receive into a sibling");
        assert_same_tree(&s.ta, &record_unlinked(&sibling), "the sibling after its receive");
        fs::remove_dir_all(&sibling).expect("remove the sibling");
    }
    let left = stages_in(&parent);
    assert!(left.is_empty(), "stage dirs in {} after the next receive there: {left:?}", parent.display());
    assert_same_tree(&after, &record_unlinked(&r.mnt()), "LIVE after the next receive");
    if state != Live::After {
        r.check_snapshots();
    }
    Outcome { live: state, finished: crash.finished }
}

#[test]
fn receive() {
    let s = streams();
    run_kind("receive", "receive", Duration::from_millis(300), |r| receive_round(r, &s, Kill::Daemon));
}

// Issue 8: a killed `ovlsnap receive` left its stage dir `.ovlsnap-receive.PID` next to the
// target for good. Each receive now removes the stages there that no live receive holds.
#[test]
fn receive_client_killed() {
    let s = streams();
    run_kind("receive-client", "receive_client_killed", Duration::from_millis(300), |r| {
        receive_round(r, &s, Kill::Client)
    });
}

/// Regression (found by `delete` with OVLSNAP_CRASH_SEED=1000 OVLSNAP_CRASH_ROUNDS=40, round
/// 1002): a daemon killed between creating `delete-in-progress.json` and writing it left the
/// journal empty, and every later `ovlsnap mount` failed on it ("EOF while parsing").
#[test]
fn a_delete_journal_cut_short_is_ignored_at_mount() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut m = SnapMount::start(Form::Separate, |live| build_tree(live, &mut rng, 3, 3));
    m.take(Some("s1"));
    churn(m.mnt(), &mut rng, 20);
    m.take(Some("s2"));
    churn(m.mnt(), &mut rng, 20);
    let (s1, s2, live) = (record_unlinked(&m.view("s1")), record_unlinked(&m.view("s2")), record_unlinked(m.mnt()));
    m.umount();
    // What a kill leaves between creating the journal and writing it: the merged layer being
    // built, and an empty journal; the swap comes after the journal.
    let store = m.live().join(".ovlsnap");
    fs::create_dir(store.join("layers/1.merging")).unwrap();
    fs::write(store.join("layers/1.merging/half"), b"x").unwrap();
    fs::write(store.join("delete-in-progress.json"), b"").unwrap();
    let out = ovlsnap(&[OsStr::new("check"), m.live().as_os_str()]);
    let text = out.expect_ok("ovlsnap check: an empty delete journal is no error");
    assert!(text.contains("delete-in-progress") && text.contains("removes it"), "ovlsnap check\n{out}");
    m.mount();
    assert_same_tree(&s1, &record_unlinked(&m.view("s1")), "s1 after the remount");
    assert_same_tree(&s2, &record_unlinked(&m.view("s2")), "s2 after the remount");
    assert_same_tree(&live, &record_unlinked(m.mnt()), "LIVE after the remount");
    let names: Vec<String> = m.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);
    m.umount();
    assert!(!store.join("delete-in-progress.json").exists(), "the journal is still there");
    assert!(!store.join("layers/1.merging").exists(), "the half-built merged layer is still there");
}
