//! ovlfs as podman's mount program end to end (issue 18): real podman, as root and rootless, each
//! scenario run on the kernel's overlay driver (the oracle), fuse-overlayfs (when installed; its
//! differences are reported, not asserted) and ovlfs, every `podman export` compared as a tree
//! with its hard-link groups (see `compare`). Each test has a podman storage of its own per driver
//! (see `store`), removed afterwards.
//!
//! - `issue_18_podman_run_commit_export`: a container writes, deletes lower files, renames a
//!   lower directory, makes hard links (to lower and new files), chmods, chowns and replaces a
//!   directory; `podman commit` while it runs; exports of the running container and of a
//!   container of the committed image.
//! - `issue_18_podman_multi_stage_build`: a two-stage `podman build` whose later steps delete and
//!   recreate files and directories of earlier layers, and `COPY --from=` of a directory holding
//!   hard links.
//! - `issue_18_podman_three_containers_at_once`: three containers of one image changing the same
//!   lower paths at the same time.
//! - `issue_18_podman_uidmap_as_root`: the run/commit/export scenario under `--uidmap`, committed
//!   after the container stopped (see `Commit`), around podman 4.3's double ID mapping with a
//!   mount program (see `around_double_mapping`).
//! - `issue_18_podman_rootless_run_commit_export` and `issue_18_podman_rootless_keep_id`: podman
//!   run by the test user `ovlpodman` (the scenario above, and `--userns=keep-id`).
//!
//! Where podman 4.3 (containers/storage 1.43) itself goes wrong, the tests say so in a comment
//! at the place, take the path that works, and print what they did.
//!
//! Prerequisites (root, podman, runc, a static busybox, `/dev/fuse`, and for rootless runs
//! `newuidmap` and catatonit) missing make a test print `SKIP` and its reason and return, or fail
//! when `OVL_PODMAN_REQUIRED=1` (as `cargo xtask test` sets it). `cargo test -p ovl-fs --test
//! podman -- --nocapture` shows the scenario table (`podman_e2e table:` lines).

// A test binary of its own, not a module of `it`: podman's helpers (`storage-tar`, runc, the
// rootless pause process) enter new mount namespaces holding copies of every mount that exists
// then, so other tests' FUSE mounts made meanwhile would outlive their unmount there, and their
// daemons their tests' deadlines (seen as "still running 5s after umount" in parallel runs).
// Cargo runs test binaries one after another.
#[allow(dead_code, unused_imports)]
#[path = "../it/common/mod.rs"]
mod common;
#[path = "podman_e2e_parts/compare.rs"]
mod compare;
#[path = "podman_e2e_parts/store.rs"]
mod store;

use std::fs;

use self::compare::{Except, Exports, compare, compare_except};
use self::store::{Store, ready};

/// What the run/commit/export scenario does in its container (as the container's root). A new
/// name linked to a file of a lower layer is touched: containers/storage diffs layers of a mount
/// program by stat against the parent ("naive diff"), which leaves out a linked-to file that did
/// not change, and so the link, where the kernel driver's diff of the upper dir keeps both.
const CHANGES: &str = "\
    echo new > /root/new
    mkdir -p /var/lib/data/x && echo deep > /var/lib/data/x/f
    echo 'extra:x:2000:2000::/:/bin/sh' >> /etc/passwd
    rm /srv/a/b/two /bin/false
    mv /srv/a /srv/renamed
    ln /srv/renamed/one /srv/hl-one
    ln /root/new /root/new-link
    ln /bin/busybox /bin/extra && touch /bin/extra
    chmod 600 /srv/renamed/one
    chmod 4755 /bin/true
    chown 1000:1000 /root/new
    chmod 0 /home/app/.profile
    ln -s /srv/renamed/sym /srv/abs-sym
    rm -rf /usr/share/doc && mkdir -p /usr/share/doc/new && echo replaced > /usr/share/doc/new/README
";

/// Runs its first argument as a `sh -e` script, then says how that went in `/tmp/.done` (its
/// stderr in `/tmp/.err`; `/tmp` is writable by every user) and stays up for `podman commit` and
/// `podman export`.
const WRAPPER: &str = "if sh -e -c \"$0\" 2>/tmp/.err; then echo ok > /tmp/.done; else echo failed > /tmp/.done; fi; \
                       exec sleep 600";

/// Starts container `name` of the base image running `script` (with `args` for `podman run`).
fn start(s: &Store, name: &str, args: &[&str], script: &str) -> Result<(), String> {
    let mut argv = vec!["run", "-d", "--name", name];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["localhost/base", "sh", "-c", WRAPPER, script]);
    s.podman(&argv).map(drop)
}

/// Waits until the script of container `name` is done; its stderr if it failed.
fn finished(s: &Store, name: &str) -> Result<(), String> {
    s.wait_for_file(name, "/tmp/.done")?;
    match s.podman(&["exec", name, "cat", "/tmp/.done"])?.trim() {
        "ok" => Ok(()),
        _ => Err(format!(
            "[{}] the script in {name} failed: {}",
            s.driver.name(),
            s.podman(&["exec", name, "cat", "/tmp/.err"])?
        )),
    }
}

/// When `podman commit` runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// While the container runs (podman's default, no pause).
    Running,
    /// After the container stopped. With an ID map (`--uidmap`, `--userns=keep-id`) and any mount
    /// program, containers/storage 1.43 diffs a running container through its live, ID-shifted
    /// mount (its naive diff reuses the mount) against an unshifted mount of the parent, so every
    /// file lands in the new layer with host IDs; fuse-overlayfs gives the same. A stopped
    /// container is mounted afresh, unshifted, and commits right.
    Stopped,
}

/// `script` in a container run with `args`, committed while it runs or after it stopped; the
/// exports of the container and of a container of the committed image.
fn run_commit_export(s: &Store, args: &[&str], script: &str, when: Commit) -> Result<Exports, String> {
    start(s, "c1", args, script)?;
    finished(s, "c1")?;
    if when == Commit::Stopped {
        s.podman(&["stop", "--time=0", "c1"])?;
    }
    s.podman(&["commit", "-q", "c1", "localhost/committed"])?;
    let container = s.export("c1")?;
    s.remove("c1")?;
    let committed = s.export_image("localhost/committed")?;
    Ok(vec![("container", container), ("committed image", committed)])
}

#[test]
fn issue_18_podman_run_commit_export() {
    let Some(env) = ready("podman_e2e::issue_18_podman_run_commit_export", false) else { return };
    compare("run-commit-export", &env, |s| run_commit_export(s, &[], CHANGES, Commit::Running));
}

/// Two stages; later steps delete and recreate what earlier layers made; the final stage copies
/// a directory with hard links from the first. Links to files of lower layers are touched (see
/// [`CHANGES`]).
const CONTAINERFILE: &str = "\
FROM localhost/base AS stage
RUN mkdir -p /data/keep /data/gone /data/swap \\
 && echo k > /data/keep/k && ln /data/keep/k /data/keep/k2 && ln /data/keep/k /data/k3 \\
 && echo g > /data/gone/g && echo f > /data/swap/f && echo file > /data/file && ln -s keep /data/link
RUN rm -rf /data/gone /data/file /data/swap && mkdir /data/file /data/swap \\
 && echo inside > /data/file/x && echo new > /data/swap/new && rm /srv/a/one
RUN echo now-a-file > /data/gone && mkdir /data/keep/sub && chmod 2750 /data/keep/sub \\
 && rm /data/keep/k2 && ln /data/keep/k /data/keep/k4 && touch /data/keep/k4 && chown -R 1000:1000 /data/keep/sub
RUN mv /srv/a /srv/moved && chmod 700 /srv/moved/b && rm /srv/moved/one-link
FROM localhost/base
COPY --from=stage /data /data
COPY --from=stage /srv /srv
RUN rm -rf /srv/moved/b /usr/share/doc/pkg && echo final > /srv/moved/final \\
 && rm /bin/rmdir && ln -s busybox /bin/rmdir
RUN rm -rf /data/file && echo back > /data/file && ln /bin/busybox /bin/extra && touch /bin/extra \\
 && mkdir /usr/share/doc/pkg
RUN chmod 4755 /bin/true && rm /data/link && mkdir /data/link && echo dir > /data/link/now
";

#[test]
fn issue_18_podman_multi_stage_build() {
    let Some(env) = ready("podman_e2e::issue_18_podman_multi_stage_build", false) else { return };
    compare("multi-stage-build", &env, |s| {
        let file = s.write_context("Containerfile", CONTAINERFILE);
        let ctx = file.parent().unwrap().to_str().unwrap();
        s.podman(&["build", "-q", "--network", "none", "-t", "localhost/built", "-f", file.to_str().unwrap(), ctx])?;
        Ok(vec![("built image", s.export_image("localhost/built")?)])
    });
}

/// What each of the three containers does, `{n}` replaced by its number, once all three run.
const ONE_OF_THREE: &str = "\
    while [ ! -e /sync/go ]; do sleep 0.02; done
    n=0; while [ $n -lt 200 ]; do echo {n}.$n > /srv/a/f{n}-$n; n=$((n+1)); done
    echo {n} >> /srv/a/one
    rm /srv/a/b/two
    mv /srv/a/b /srv/a/b{n}
    ln /srv/a/f{n}-0 /srv/a/f{n}-link
    ln /srv/a/one-link /srv/a/one-link-{n}
    rm -rf /usr/share/doc/pkg
";

#[test]
fn issue_18_podman_three_containers_at_once() {
    let Some(env) = ready("podman_e2e::issue_18_podman_three_containers_at_once", false) else { return };
    compare("three-at-once", &env, |s| {
        let sync = s.dir().join("sync");
        fs::create_dir(&sync).unwrap();
        let volume = format!("{}:/sync", sync.display());
        let names = ["c1", "c2", "c3"];
        for (i, name) in names.iter().enumerate() {
            start(s, name, &["-v", &volume], &ONE_OF_THREE.replace("{n}", &(i + 1).to_string()))?;
        }
        fs::write(sync.join("go"), "").unwrap();
        let mut exports = Vec::new();
        for name in names {
            finished(s, name)?;
        }
        for name in names {
            exports.push((name, s.export(name)?));
        }
        Ok(exports)
    });
}

/// The file in which containers/storage 1.43 caches whether the kernel mounts overlay on
/// idmapped lower layers, under its run root.
const IDMAPPED_PROBE: &str = "overlay/idmapped-lower-dir";

/// Records in the store that the kernel cannot mount overlay on idmapped lower layers, as on
/// kernels before 5.19: containers/storage then leaves the shifting to the mount program alone.
fn without_idmapped_lowers(s: &Store, why: &str) {
    let _ = fs::remove_file(s.run_root().join(format!("{IDMAPPED_PROBE}-true")));
    let probe = s.run_root().join(format!("{IDMAPPED_PROBE}-false"));
    fs::create_dir_all(probe.parent().unwrap()).unwrap();
    fs::write(&probe, why).unwrap();
    s.give(&probe);
}

/// podman 4.3's containers/storage (1.43) maps IDs twice under `--uidmap` with a mount program:
/// when the kernel supports idmapped lower layers it passes the lowers through idmapped mounts
/// *and* `uidmapping=` to the program (later versions make idmapped mounts only without a mount
/// program). Every lower ID then lands outside the map and shows as 65534, so the container's
/// root cannot create `/etc/hosts` and runc fails with EACCES, with fuse-overlayfs as with ovlfs.
/// This recognises that failure, says so, and goes on [`without_idmapped_lowers`], the path
/// later versions take. Any other failure is an error.
fn around_double_mapping(s: &Store, map: &[&str]) -> Result<(), String> {
    let mut argv = vec!["run", "--rm"];
    argv.extend_from_slice(map);
    argv.extend_from_slice(&["localhost/base", "true"]);
    let Err(e) = s.podman(&argv) else { return Ok(()) };
    let seen = s.run_root().join(format!("{IDMAPPED_PROBE}-true")).exists();
    if !seen || !e.contains("to rootfs at \"/etc/") || !e.contains("permission denied") {
        return Err(e);
    }
    eprintln!(
        "podman_e2e: [{}] --uidmap fails as with containers/storage 1.43's double ID mapping (idmapped \
         lowers plus uidmapping=; known, not ovlfs's); going on without idmapped lowers",
        s.driver.name()
    );
    without_idmapped_lowers(s, "podman_e2e: containers/storage 1.43 maps twice with a mount program");
    Ok(())
}

#[test]
fn issue_18_podman_uidmap_as_root() {
    let Some(env) = ready("podman_e2e::issue_18_podman_uidmap_as_root", false) else { return };
    compare("uidmap-as-root", &env, |s| {
        let map = ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"];
        if s.driver.is_mount_program() {
            around_double_mapping(s, &map)?;
            return run_commit_export(s, &map, CHANGES, Commit::Stopped);
        }
        // podman 4.3's kernel driver commits an ID-mapped container wrong: on idmapped lowers
        // its copy-ups keep host IDs in the upper dir, committed as they are (every copied-up
        // file owned by 100000); on ID-shifted copies of the layers (no idmapped lowers) the
        // committed layer loses its whiteouts (deleted files come back). Inside the container
        // the IDs are the same either way, so the committed image of an unmapped run of the same
        // script stands in for it.
        let mut container = run_commit_export(s, &map, CHANGES, Commit::Stopped)?;
        let mut unmapped = run_commit_export(s, &[], CHANGES, Commit::Stopped)?;
        Ok(vec![container.remove(0), unmapped.remove(1)])
    });
}

#[test]
fn issue_18_podman_rootless_run_commit_export() {
    let Some(env) = ready("podman_e2e::issue_18_podman_rootless_run_commit_export", true) else { return };
    compare("rootless-run-commit-export", &env, |s| {
        assert!(s.rootless());
        run_commit_export(s, &[], CHANGES, Commit::Running)
    });
}

/// What the container does as the test user under `--userns=keep-id` (it owns only `/tmp`).
const KEEP_ID: &str = "\
    mkdir /tmp/k && echo mine > /tmp/k/f && ln /tmp/k/f /tmp/k/g && chmod 640 /tmp/k/f
    cp /srv/a/one /tmp/k/copy && echo appended >> /tmp/k/g
    ln -s ../../srv/a/one /tmp/k/sym && id -u > /tmp/k/uid
";

#[test]
fn issue_18_podman_rootless_keep_id() {
    let Some(env) = ready("podman_e2e::issue_18_podman_rootless_keep_id", true) else { return };
    // Rootless, the kernel driver cannot shift IDs: containers/storage copies the image's layers
    // for the keep-id map, and its copy gives directories that hold hard links (/bin, /srv/a) the
    // time of the copy. A mount program shifts IDs and shows the image's own times.
    let except = Except { dir_mtimes: Some("the kernel driver's store copies the image's layers for keep-id") };
    compare_except("rootless-keep-id", &env, except, |s| {
        run_commit_export(s, &["--userns=keep-id"], KEEP_ID, Commit::Stopped)
    });
}
