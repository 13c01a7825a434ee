//! `podman export` tars as trees, and one scenario run on every driver side by side.
//!
//! An export is extracted as root (`tar -x -p --numeric-owner`, which recreates the tar's hard
//! links) and recorded with [`snapshot_tree`]: names, types, modes, owners, contents, symlink
//! targets, link counts, and mtimes where the base image set them; plus its hard-link groups
//! (which names share an inode), compared strictly. [`compare`] runs a scenario on a fresh
//! [`Store`] per driver, prints one row of the scenario table and requires ovlfs's exports to
//! equal the kernel's; fuse-overlayfs's differences are printed, not asserted (its inode numbers
//! are not ours to fix).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use super::store::{Driver, Env, Store};
use crate::common::{Entry, Kind, Tree, diff_trees, report, snapshot_tree};

/// A `podman export`, extracted and recorded.
#[derive(Debug)]
pub struct Export {
    tree: Tree,
    links: BTreeSet<Vec<PathBuf>>,
}

/// The exports of one scenario on one driver, each with a label (`"running"`, `"committed"`..).
pub type Exports = Vec<(&'static str, Export)>;

impl Store {
    /// `podman export` of container `ctr` (running or not), recorded.
    pub fn export(&self, ctr: &str) -> Result<Export, String> {
        let name = format!("export-{ctr}");
        let tar = self.dir().join("out").join(format!("{name}.tar"));
        self.podman(&["export", "-o", tar.to_str().unwrap(), ctr])?;
        let dest = self.dir().join(&name);
        fs::create_dir(&dest).unwrap();
        let out = Command::new("tar")
            .args(["-x", "-p", "--same-owner", "--numeric-owner", "-f"])
            .arg(&tar)
            .arg("-C")
            .arg(&dest)
            .output()
            .map_err(|e| format!("tar: {e}"))?;
        if !out.status.success() {
            return Err(format!("extracting {}: {}", tar.display(), String::from_utf8_lossy(&out.stderr)));
        }
        let tree = snapshot_tree(&dest);
        let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
        for (path, entry) in &tree {
            if entry.kind != Kind::Dir && entry.nlink.is_some_and(|n| n > 1) {
                by_ino.entry(fs::symlink_metadata(dest.join(path)).unwrap().ino()).or_default().push(path.clone());
            }
        }
        fs::remove_dir_all(&dest).unwrap();
        fs::remove_file(&tar).unwrap();
        Ok(Export { tree, links: by_ino.into_values().collect() })
    }

    /// A container made from `image` (not started), exported, removed.
    pub fn export_image(&self, image: &str) -> Result<Export, String> {
        let id = self.podman(&["create", image, "true"])?;
        let export = self.export(id.trim());
        self.podman(&["rm", id.trim()])?;
        export
    }
}

/// What a comparison leaves out.
#[derive(Clone, Copy, Debug, Default)]
pub struct Except {
    /// Directory mtimes, for this reason (printed with the table row).
    pub dir_mtimes: Option<&'static str>,
}

/// Differences of `b` from `a`: hard-link groups first, then entries (see `common::Entry::diff`)
/// but for their link counts, which the groups already say, and what `except` leaves out.
fn diff_exports(a: &Export, b: &Export, except: Except) -> Vec<String> {
    let show = |g: &Vec<PathBuf>| g.iter().map(|p| format!("/{}", p.display())).collect::<Vec<_>>().join(" = ");
    let mut diffs: Vec<String> =
        a.links.difference(&b.links).map(|g| format!("hard-link group only in A: {}", show(g))).collect();
    diffs.extend(b.links.difference(&a.links).map(|g| format!("hard-link group only in B: {}", show(g))));
    let comparable = |t: &Tree| -> Tree {
        let entry = |e: &Entry| {
            let mtime = if e.kind == Kind::Dir && except.dir_mtimes.is_some() { (0, 0) } else { e.mtime };
            Entry { nlink: None, mtime, ..e.clone() }
        };
        t.iter().map(|(p, e)| (p.clone(), entry(e))).collect()
    };
    diffs.extend(diff_trees(&comparable(&a.tree), &comparable(&b.tree)));
    diffs
}

/// Runs `scenario` on a fresh store of every driver of `env`, prints the scenario's row of the
/// table (and fuse-overlayfs's differences), and panics unless the kernel ran it and ovlfs ran it
/// with every export equal to the kernel's.
pub fn compare(test: &str, env: &Env, scenario: impl Fn(&Store) -> Result<Exports, String>) {
    compare_except(test, env, Except::default(), scenario);
}

/// [`compare`], leaving out what `except` says.
pub fn compare_except(test: &str, env: &Env, except: Except, scenario: impl Fn(&Store) -> Result<Exports, String>) {
    if let Some(why) = except.dir_mtimes {
        eprintln!("podman_e2e: {test}: directory mtimes not compared: {why}");
    }
    let mut columns = Vec::new();
    for driver in env.drivers() {
        let start = Instant::now();
        let outcome = Store::new(env, driver).and_then(|store| scenario(&store));
        columns.push((driver, outcome, start.elapsed()));
    }
    let kernel = match &columns[0] {
        (Driver::Kernel, Ok(exports), _) => exports,
        (_, outcome, _) => panic!("{test}: the kernel driver (the oracle) failed: {}", outcome.as_ref().unwrap_err()),
    };
    let mut row = Vec::new();
    let mut failure = None;
    for (driver, outcome, took) in &columns {
        let verdict = match outcome {
            Ok(exports) => {
                let mut all = Vec::new();
                for ((label, want), (_, got)) in kernel.iter().zip(exports) {
                    let what = format!("{test} [{label}] export");
                    all.extend(report(&what, "kernel", driver.name(), &diff_exports(want, got, except)));
                }
                if all.is_empty() {
                    "pass".to_owned()
                } else {
                    if *driver == Driver::FuseOverlayfs {
                        eprintln!("{test}: fuse-overlayfs differs from the kernel (reported, not asserted):");
                        all.iter().for_each(|r| eprint!("{r}"));
                    }
                    failure = failure.or((*driver == Driver::Ovlfs).then(|| all.concat()));
                    "DIFFERS".to_owned()
                }
            }
            Err(e) => {
                failure = failure.or((*driver == Driver::Ovlfs).then(|| format!("ovlfs failed: {e}")));
                if *driver == Driver::FuseOverlayfs {
                    eprintln!("{test}: fuse-overlayfs failed (reported, not asserted): {e}");
                }
                "FAILED".to_owned()
            }
        };
        row.push(format!("{} {verdict} ({:.1}s)", driver.name(), took.as_secs_f64()));
    }
    eprintln!("podman_e2e table: {test}: {}", row.join(" | "));
    if let Some(failure) = failure {
        panic!("{test}: ovlfs as podman's mount program differs from the kernel driver:\n{failure}");
    }
}
