//! `cargo xtask stress` for a few seconds (issue 8), so that CI runs the stress test: a short run
//! of ovlfs and ovlsnap must pass. It uses the `ovlfs` and `ovlsnap` Cargo builds for this
//! workspace (`cargo build -p ovl-fs -p snap-cli`, a no-op when `cargo test --workspace` built
//! them already). Needs root and `/dev/fuse`, like the other mount tests.

use std::path::PathBuf;
use std::process::Command;

/// Builds the daemons (debug) and returns their paths, next to this test's own binary.
fn daemons() -> (PathBuf, PathBuf) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "ovl-fs", "-p", "snap-cli"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p ovl-fs -p snap-cli failed");
    // TARGET/debug/deps/stress-HASH -> TARGET/debug
    let exe = std::env::current_exe().expect("our own path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("TARGET/debug");
    (dir.join("ovlfs"), dir.join("ovlsnap"))
}

/// Runs `xtask stress` with `args` (and the daemons) and returns whether it passed, with its output.
fn stress(args: &[&str]) -> (bool, String) {
    let (ovlfs, ovlsnap) = daemons();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("stress")
        .args(args)
        .arg("--ovlfs")
        .arg(&ovlfs)
        .arg("--ovlsnap")
        .arg(&ovlsnap)
        .output()
        .expect("run xtask stress");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.contains("stress: passed"), text)
}

// The kinds `readback` and `listing` (reading records in the shared directory that other workers
// rename over and unlink) are left out here: they fail on two bugs of ovl-fs that
// `the_whole_mix_passes` reproduces (see there).
#[test]
fn a_short_stress_run_passes() {
    let (passed, out) =
        stress(&["--secs", "3", "--procs", "3", "--seed", "1", "--take-every", "1", "--skip", "readback,listing"]);
    assert!(passed, "{out}");
    for want in ["== ovlfs", "== ovlsnap", "operations in", "no mismatch", "open descriptors", "snapshots: "] {
        assert!(out.contains(want), "the summary lacks {want:?}:\n{out}");
    }
}

// Bugs (found by the stress test): reads of files that other threads rename over or unlink at the
// same time get another file's data, a short read, ENXIO, EIO or EXDEV, on ovlfs and on ovlsnap
// (the kernel's overlay passes the same run: `cargo xtask stress --only kernel`).
// 1. ovl-fs opens a node by its path (`data_location` in src/data.rs): an OPEN racing with a
//    rename over the name or an unlink opens what is at the path by then: another file (read
//    with the old file's cached size: short or mixed data), or the whiteout an unlink of a
//    lower name left there (a char device 0:0: ENXIO).
// 2. A node id is the backing inode number: when ext4 reuses the number of a deleted file for a
//    new one while the kernel still holds the old node, both get the same node id, and the
//    kernel mixes their cached pages and sizes.
// Reproduce: `cargo xtask stress --secs 10` (any seed fails within seconds).
#[test]
#[ignore = "bug: reads racing renames/unlinks get another file's data or ENXIO (ovl-fs opens by path; node ids reuse inode numbers)"]
fn the_whole_mix_passes() {
    let (passed, out) = stress(&["--secs", "10", "--procs", "4", "--seed", "1", "--take-every", "2"]);
    assert!(passed, "{out}");
}
