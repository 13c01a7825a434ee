//! `cargo xtask demo`: the product end to end, told as a story. Each step prints a line of narrative, then
//! the commands and their output; each result is also checked, so the demo doubles as a smoke test.
//!
//! Everything happens on a scratch tmpfs that is unmounted and removed at the end, even on error (guards
//! with `Drop`). The parts are functions run in order: `demo_ovlfs`, then `demo_snapshots`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, cmd, say, sh};
use crate::mount::{build_ovlfs, mount_ovlfs};
use crate::mountinfo::{self, MountGuard};
use crate::prereqs;
use crate::sample::{MERGED, Sample};
use crate::tree::Tree;

/// Runs every part of the demo in a scratch directory.
pub fn run() -> Result<()> {
    if !prereqs::is_root()? {
        bail!("the demo mounts a tmpfs and the kernel's overlay, so it must run as root");
    }
    let scratch = Scratch::create()?;
    demo_ovlfs(&scratch.dir)?;
    demo_snapshots(&scratch.dir)?;
    say("That's all; cleaning up.");
    Ok(())
}

/// ovlfs: mount sample layers, read, copy up, delete, create; then the kernel's overlay mounts the same
/// layers and must show the same tree.
fn demo_ovlfs(scratch: &Path) -> Result<()> {
    say("Build ovlfs.");
    let ovlfs = build_ovlfs()?;

    say("Make two lower layers. lower1 sits on top of lower2; both have a dir shared/.");
    let sample = Sample::at(&scratch.join("ovlfs"))?;
    sample.create()?;
    let dir = sample.root.as_path();
    println!("$ cd {}", dir.display());
    sh(dir, "find lower1 lower2 | sort")?;
    say("lower1/secret.txt is a whiteout, a character device 0:0: it hides lower2/secret.txt.");
    sh(dir, "ls -l lower1/secret.txt")?;

    say("Mount them with ovlfs, with an empty upper dir to take the changes.");
    let mut ovlfs_mount = MountGuard::new(&sample.mnt);
    mount_ovlfs(&ovlfs, &sample)?;

    say("The merged view: shared/ has both layers' files, both.txt is lower1's, secret.txt is hidden.");
    sh(dir, "ls -l mnt mnt/shared")?;
    sh(dir, "cat mnt/shared/both.txt")?;
    check_paths(dir, "mnt", MERGED)?;
    check_same_file(dir, "mnt/shared/both.txt", "lower1/shared/both.txt")?;

    say("A file from the bottom layer reads as it is.");
    sh(dir, "cat mnt/shared/from-lower2.txt")?;
    check_same_file(dir, "mnt/shared/from-lower2.txt", "lower2/shared/from-lower2.txt")?;

    say("Modify a lower file: ovlfs first copies it up into upper. The lower layer is never written.");
    let original = read(&sample.lower2.join("README.txt"))?;
    sh(dir, "echo 'edited through ovlfs' >> mnt/README.txt")?;
    sh(dir, "cat mnt/README.txt")?;
    sh(dir, "ls -l upper")?;
    sh(dir, "cat upper/README.txt")?;
    sh(dir, "cat lower2/README.txt")?;
    let edited = format!("{original}edited through ovlfs\n");
    check(read(&sample.upper.join("README.txt"))? == edited, "upper/README.txt holds the edited file")?;
    check(read(&sample.lower2.join("README.txt"))? == original, "lower2/README.txt is unchanged")?;

    say("Delete a lower file: ovlfs copies up its parent dir and leaves a whiteout (c 0,0) in its place.");
    sh(dir, "rm mnt/docs/guide.txt")?;
    sh(dir, "ls -l mnt/docs upper/docs")?;
    check(!sample.mnt.join("docs/guide.txt").exists(), "mnt/docs/guide.txt is gone")?;
    check(is_whiteout(&sample.upper.join("docs/guide.txt")), "upper/docs/guide.txt is a whiteout")?;
    check(sample.lower2.join("docs/guide.txt").is_file(), "lower2/docs/guide.txt is still there")?;

    say("Create a directory: it exists only in upper.");
    sh(dir, "mkdir mnt/projects && echo hello > mnt/projects/hello.txt")?;
    sh(dir, "ls -l upper upper/projects")?;
    check(read(&sample.upper.join("projects/hello.txt"))? == "hello\n", "upper/projects/hello.txt exists")?;
    let mut expected: Vec<&str> = MERGED.iter().copied().filter(|path| *path != "docs/guide.txt").collect();
    expected.extend(["projects/", "projects/hello.txt"]);
    expected.sort_unstable();
    check_paths(dir, "mnt", &expected)?;
    let seen_by_ovlfs = Tree::read(&sample.mnt)?;

    say("Unmount ovlfs.");
    ovlfs_mount.unmount()?;

    say("Mount the same layers with the kernel's overlay (and a fresh work dir): same on-disk format, same tree.");
    let kernel_work = sample.root.join("work-kernel");
    fs::create_dir(&kernel_work).with_context(|| format!("creating {}", kernel_work.display()))?;
    let mut kernel_mount = MountGuard::new(&sample.mnt);
    cmd("mount").args(["-t", "overlay", "overlay", "-o"]).arg(sample.options(&kernel_work)).arg(&sample.mnt).run()?;
    sh(dir, "ls -l mnt mnt/docs mnt/projects")?;
    let seen_by_kernel = Tree::read(&sample.mnt)?;
    let differences = seen_by_ovlfs.differences("ovlfs", &seen_by_kernel, "the kernel");
    if !differences.is_empty() {
        bail!("the kernel's overlay shows a different tree:\n  {}", differences.join("\n  "));
    }
    println!(
        "ok: the kernel shows the same {} entries (types, modes, owners, contents) as ovlfs",
        seen_by_kernel.len()
    );

    say("Unmount the kernel's overlay.");
    kernel_mount.unmount()
}

/// Snapshots with `ovlsnap`: mount a plain directory, change it, take snapshots, list, diff and browse
/// them, mount one with the stock kernel overlay, clone one, send and receive them, restore one,
/// delete one, unmount.
fn demo_snapshots(scratch: &Path) -> Result<()> {
    say("Build ovlsnap.");
    cargo().args(["build", "-p", "snap-cli"]).run()?;
    let bin_dir = crate::target_dir().join("debug");
    if !bin_dir.join("ovlsnap").is_file() {
        bail!("the build produced no {}", bin_dir.join("ovlsnap").display());
    }
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let dir = scratch.join("snapshots");
    fs::create_dir_all(dir.join("data/src")).context("creating data/")?;
    fs::create_dir_all(dir.join("data/photos"))?;
    fs::create_dir_all(dir.join("kernel-view"))?;
    fs::write(dir.join("data/notes.txt"), "v1\n")?;
    fs::write(dir.join("data/src/main.c"), "int main(void) { return 0; }\n")?;
    let photo: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    fs::write(dir.join("data/photos/cat.jpg"), &photo)?;
    let run = |script: &str| sh_env(&dir, script, "PATH", &path);
    println!("$ cd {}", dir.display());

    say("A plain directory, data/: the live data we want snapshots of.");
    run("find data | sort")?;
    say("Mount it with ovlsnap. The mount stacks over data/ itself; snapshots are kept in data/.ovlsnap, hidden.");
    let mut mount = MountGuard::new(&dir.join("data"));
    run("ovlsnap mount data")?;
    run("ls -la data")?;
    check(!dir.join("data/.ovlsnap").exists(), "the store is hidden from the mount")?;
    let monday_tree = Tree::read(&dir.join("data"))?;

    say("Take a snapshot: online, in constant time, nothing is copied yet.");
    run("ovlsnap take monday --mount data")?;
    say("Change things: append to a file, delete one, rename a directory, add a file.");
    run("echo v2 >> data/notes.txt && rm data/photos/cat.jpg && mv data/src data/source && echo todo > data/todo.txt")?;
    let tuesday_tree = Tree::read(&dir.join("data"))?;
    say("Take a second snapshot and change the file again.");
    run("ovlsnap take tuesday --mount data && echo v3 >> data/notes.txt")?;

    say("List the snapshots: a layer holds only what changed after its snapshot.");
    run("ovlsnap list --mount data")?;
    say(
        "Space, as `zfs list` shows it: USED is what deleting a snapshot frees, REFER what its whole tree references, SHARED the part newer snapshots or LIVE share. They are worked out beside the mount's work just after a take (`-` until then).",
    );
    run(
        "for i in $(seq 100); do ovlsnap list -o refer,shared -H --mount data | grep -q -- - || break; sleep 0.05; done; ovlsnap list -o name,used,refer,shared --mount data",
    )?;
    say("What changed since monday, read from the layers (constant in the tree size, grows with the changes).");
    run("ovlsnap diff monday --mount data")?;
    say("Browse: each snapshot is a read-only tree under .snapshots/NAME, served by the same daemon.");
    run("ls data/.snapshots && cat data/.snapshots/monday/notes.txt && ls data/.snapshots/monday")?;
    run("cat data/.snapshots/tuesday/notes.txt && cat data/notes.txt")?;
    for (name, want) in [("monday", &monday_tree), ("tuesday", &tuesday_tree)] {
        let seen = Tree::read(&dir.join("data/.snapshots").join(name))?;
        let differences = want.differences("taken", &seen, "browsed");
        if !differences.is_empty() {
            bail!("snapshot {name} differs from the tree at take time:\n  {}", differences.join("\n  "));
        }
        println!("ok: .snapshots/{name} shows the {} entries data/ had when it was taken", seen.len());
    }
    check(fs::read(dir.join("data/.snapshots/monday/photos/cat.jpg"))? == photo, "the deleted photo is in monday")?;

    say("Every snapshot is a stack of plain kernel overlay layers: the stock kernel mounts monday too.");
    let mut kernel = MountGuard::new(&dir.join("kernel-view"));
    run("ovlsnap mount-view monday kernel-view --mount data && ls kernel-view kernel-view/photos")?;
    let differences = monday_tree.differences("taken", &Tree::read(&dir.join("kernel-view"))?, "the kernel");
    if !differences.is_empty() {
        bail!("the kernel's view of monday differs:\n  {}", differences.join("\n  "));
    }
    println!("ok: the kernel shows monday as it was taken");
    kernel.unmount()?;
    say("mount-cmd prints the same mount as a command, every path quoted for the shell:");
    run("ovlsnap mount-cmd monday kernel-view --mount data")?;

    say("Clone monday: a writable copy of its tree; what is written there stays there.");
    let mut clone = MountGuard::new(&dir.join("clone"));
    fs::create_dir_all(dir.join("clone"))?;
    run("ovlsnap clone monday clone --mount data && echo draft > clone/draft.txt && ls clone")?;
    check(!dir.join("data/.snapshots/monday/draft.txt").exists(), "monday did not get the clone's file")?;
    clone.unmount()?;

    say(
        "Send monday as a tar stream (the OCI layer format), then what changed until tuesday; receive both into a fresh directory.",
    );
    fs::create_dir_all(dir.join("backup"))?;
    run("ovlsnap send monday --mount data > monday.tar && ovlsnap send --from monday tuesday --mount data > incr.tar")?;
    run("tar -tvf incr.tar && ovlsnap receive backup < monday.tar && ovlsnap receive backup < incr.tar")?;
    let differences = tuesday_tree.differences("tuesday", &Tree::read(&dir.join("backup"))?, "received");
    if !differences.is_empty() {
        bail!("the received tree differs from tuesday:\n  {}", differences.join("\n  "));
    }
    println!("ok: backup/ equals tuesday");

    say(
        "Restore monday, online: data/ becomes monday's tree. The restore's own changes are saved into the newest snapshot like any other change, so tuesday survives. On a terminal it shows a progress bar (restore, delete, send, receive, check and clone do; scripts get none).",
    );
    run("ovlsnap restore monday --mount data && cat data/notes.txt && ls data")?;
    let differences = monday_tree.differences("monday", &Tree::read(&dir.join("data"))?, "data/ after restore");
    if !differences.is_empty() {
        bail!("data/ after the restore differs from monday:\n  {}", differences.join("\n  "));
    }
    println!("ok: data/ equals monday again");
    let seen = Tree::read(&dir.join("data/.snapshots/tuesday"))?;
    if !tuesday_tree.differences("taken", &seen, "browsed").is_empty() {
        bail!("tuesday changed during the restore");
    }
    println!("ok: tuesday is unchanged");
    say("Hold monday, as `zfs hold`: a held snapshot cannot be deleted until its holds are released.");
    run(
        "ovlsnap hold audit monday --mount data && ovlsnap holds --mount data && ! ovlsnap delete monday --mount data",
    )?;
    run("ovlsnap release audit monday --mount data")?;
    say(
        "Timeline snapshots with retention, as snapper's timeline: `ovlsnap auto` (hourly from contrib/systemd/ovlsnap-auto@.timer) takes auto-TIME and deletes what its rules no longer keep. Four hourly runs on a fake clock (OVLSNAP_NOW), keeping 2 hours:",
    );
    run(
        "for h in 0 1 2 3; do OVLSNAP_NOW=$((1767571200 + h * 3600)) ovlsnap auto --hourly 2 --daily 0 --weekly 0 --monthly 0 --mount data; done",
    )?;
    say("Delete monday (the oldest: its layer just goes away); tuesday stays as it was. Rename tuesday.");
    run(
        "ovlsnap delete monday --mount data && ovlsnap rename tuesday before-restore --mount data && ovlsnap list --mount data",
    )?;
    let listed = std::process::Command::new(bin_dir.join("ovlsnap"))
        .args(["list", "--json", "--mount"])
        .arg(dir.join("data"))
        .output()?;
    let text = String::from_utf8_lossy(&listed.stdout);
    check(
        text.contains("\"before-restore\"")
            && text.contains("auto-2026-01-05T02:00:00Z")
            && text.contains("auto-2026-01-05T03:00:00Z")
            && !text.contains("auto-2026-01-05T01:00:00Z")
            && !text.contains("\"monday\""),
        "the list holds before-restore and the two newest timeline snapshots",
    )?;

    say("Unmount: the snapshots stay in data/.ovlsnap, one layer per snapshot; a new mount brings them back.");
    run("ovlsnap umount data && ls data/.ovlsnap/layers")?;
    mount.unmount()
}

/// Like [`sh`], with one environment variable set for the script.
fn sh_env(dir: &Path, script: &str, name: &str, value: &str) -> Result<()> {
    println!("$ {script}");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env(name, value)
        .status()
        .with_context(|| format!("could not start `{script}`"))?;
    if !status.success() {
        bail!("`{script}` failed ({status})");
    }
    Ok(())
}

/// A tmpfs mounted on a fresh temporary directory: the demo's files never touch a real disk, and one
/// unmount removes them all. Dropping it unmounts and removes the directory.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("ovlfs-demo.{}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let scratch = Scratch { dir };
        say(&format!("Work in a scratch tmpfs at {}.", scratch.dir.display()));
        cmd("mount").args(["-t", "tmpfs", "-o", "size=64m,mode=0755", "ovlfs-demo"]).arg(&scratch.dir).run()?;
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if mountinfo::is_mounted(&self.dir).unwrap_or(false) {
            let unmounted =
                cmd("umount").arg(&self.dir).succeeds() || cmd("umount").arg("-l").arg(&self.dir).succeeds();
            if !unmounted {
                eprintln!("warning: could not unmount {}", self.dir.display());
            }
        }
        // Never delete through a mount that is still there: it could be a layer someone else uses.
        if mountinfo::has_mounts_under(&self.dir).unwrap_or(true) {
            eprintln!("warning: left {} in place: something is still mounted there", self.dir.display());
        } else if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {err}", self.dir.display());
        }
    }
}

fn check(holds: bool, what: &str) -> Result<()> {
    if !holds {
        bail!("check failed: {what}");
    }
    println!("ok: {what}");
    Ok(())
}

/// Checks that the tree below `dir/name` holds exactly `expected` (sorted; dirs end in `/`).
fn check_paths(dir: &Path, name: &str, expected: &[&str]) -> Result<()> {
    let tree = Tree::read(&dir.join(name))?;
    let found = tree.paths();
    if found != expected {
        bail!("check failed: {name} shows {found:?}, expected {expected:?}");
    }
    println!("ok: {name} shows exactly the expected {} entries", expected.len());
    Ok(())
}

/// Checks that `dir/seen` and `dir/source` have the same contents.
fn check_same_file(dir: &Path, seen: &str, source: &str) -> Result<()> {
    let same = fs::read(dir.join(seen)).with_context(|| format!("reading {seen}"))?
        == fs::read(dir.join(source)).with_context(|| format!("reading {source}"))?;
    check(same, &format!("{seen} has the contents of {source}"))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_char_device() && meta.rdev() == 0)
}
