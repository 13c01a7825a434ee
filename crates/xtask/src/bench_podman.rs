//! `cargo xtask bench-podman [--rounds N] [--load]`: podman on the kernel's overlay driver, with
//! fuse-overlayfs and with a release `ovlfs` as its mount program, side by side (issue 18).
//!
//! Each backend gets a podman store of its own in `TMPDIR/ovlfs-bench-podman.PID` (its own
//! containers.conf and storage.conf, as the end-to-end tests make them) with one base image
//! imported from a busybox-static tree. Then, in rounds that go through the backends in turn
//! (each round starting one further along, so that none always runs first), it times
//! - `podman build --no-cache` of an image of [`RUN_STEPS`] `RUN` steps that create, append to,
//!   copy, rename, chmod and delete files of earlier layers, and
//! - 10 x `podman run --rm localhost/base true`,
//!
//! and prints the medians, their ratios and the targets (ovlfs faster than
//! fuse-overlayfs on both, within 1.5x of the kernel driver). A fourth column, "kernel, naive
//! diff", is the kernel driver made to build layers the way containers/storage builds them for
//! every mount program (the mounted layer against its parent, by stat, instead of taring the upper
//! dir): the part of a build's time that comes with any mount program, not with the filesystem.
//! `--load` keeps one core busy with a spinning thread meanwhile. Stores are reset and removed
//! on exit, also after an error.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::bench::{Pressure, build_release, median};
use crate::{mountinfo, prereqs};

/// What the user asked for.
pub struct Options {
    /// Rounds (each backend measured once per round); the median is reported.
    pub rounds: usize,
    /// Keep one core busy with a spinning thread during the measurements.
    pub load: bool,
}

/// How many `RUN` steps the benchmark image has.
const RUN_STEPS: usize = 8;

/// The benchmark image: [`RUN_STEPS`] steps changing what earlier layers made.
const CONTAINERFILE: &str = "\
FROM localhost/base
RUN mkdir -p /app/src && i=0 && while [ $i -lt 300 ]; do echo line $i > /app/src/f$i; i=$((i+1)); done
RUN cp -a /bin /app/bin-copy && rm /app/bin-copy/sh
RUN i=0 && while [ $i -lt 300 ]; do echo more >> /app/src/f$i; i=$((i+1)); done
RUN rm -rf /app/src/f1* && mkdir /app/src/f1 && echo dir > /app/src/f1/x
RUN mv /app/src /app/moved && chmod -R 750 /app/moved
RUN find /app -type f | wc -l > /app/count && ln /app/count /app/count-link
RUN rm -rf /app/bin-copy && echo done > /app/done
RUN cat /app/moved/f2* > /app/all
";

/// How many containers the run measurement starts, one after the other.
const RUNS: usize = 10;

/// The busybox applets of the base image (hard links of `/bin/busybox`).
const APPLETS: &[&str] =
    &["sh", "ls", "cp", "rm", "mv", "ln", "chmod", "cat", "mkdir", "echo", "true", "test", "find", "wc"];

/// One way podman mounts its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Kernel,
    KernelNaiveDiff,
    FuseOverlayfs,
    Ovlfs,
}

impl Backend {
    /// Its store's directory name, short (see `Store::create`).
    fn dir_name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::KernelNaiveDiff => "naive",
            Backend::FuseOverlayfs => "fuse",
            Backend::Ovlfs => "ovlfs",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::KernelNaiveDiff => "kernel, naive diff",
            Backend::FuseOverlayfs => "fuse-overlayfs",
            Backend::Ovlfs => "ovlfs",
        }
    }
}

/// The two measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Build,
    Runs,
}

impl Metric {
    const ALL: [Metric; 2] = [Metric::Build, Metric::Runs];

    fn label(self) -> String {
        match self {
            Metric::Build => format!("build --no-cache ({RUN_STEPS} RUN steps)"),
            Metric::Runs => format!("{RUNS} x run --rm base true"),
        }
    }
}

/// Runs the benchmark.
pub fn run(options: &Options) -> Result<()> {
    if !prereqs::is_root()? {
        bail!("bench-podman runs podman as root with its own stores; run it as root");
    }
    for tool in ["podman", "tar"] {
        if !prereqs::installed(tool) {
            bail!("no `{tool}`: `cargo xtask test` installs the packages (or apt-get install podman busybox-static)");
        }
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("no /bin/busybox: apt-get install busybox-static");
    }
    eprintln!("==> building release ovlfs (cargo build --release -p ovl-fs)");
    let ovlfs = build_release("ovl-fs", "ovlfs")?;
    let fuse_overlayfs = prereqs::find("fuse-overlayfs");
    if fuse_overlayfs.is_none() {
        eprintln!("    no fuse-overlayfs installed: its column stays empty");
    }
    let scratch = std::env::temp_dir().join(format!("ovlfs-bench-podman.{}", std::process::id()));
    fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let _remove_scratch = Removed(scratch.clone());
    let base = scratch.join("base.tar");
    build_base(&scratch.join("rootfs"), busybox, &base)?;
    let ctx = scratch.join("ctx");
    fs::create_dir(&ctx)?;
    fs::write(ctx.join("Containerfile"), CONTAINERFILE)?;

    let mut stores = Vec::new();
    let backends = [Backend::Kernel, Backend::KernelNaiveDiff, Backend::FuseOverlayfs, Backend::Ovlfs];
    for backend in backends {
        let program = match backend {
            Backend::Kernel | Backend::KernelNaiveDiff => None,
            Backend::FuseOverlayfs => match &fuse_overlayfs {
                Some(p) => Some(p.clone()),
                None => continue,
            },
            Backend::Ovlfs => Some(ovlfs.clone()),
        };
        eprintln!("==> store for {}", backend.name());
        stores.push(Store::create(&scratch, backend, program.as_deref(), &base)?);
    }

    let load = options.load.then(BusyCore::start);
    let pressure = Pressure::read();
    let started = Instant::now();
    let rounds = options.rounds.max(1);
    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..rounds {
        for i in 0..stores.len() {
            let store = &stores[(round + i) % stores.len()];
            let build = store.time_build(&ctx)?;
            let runs = store.time_runs()?;
            eprintln!(
                "    round {}/{rounds} {:<20} build {build:6.2} s   {RUNS} runs {runs:6.2} s",
                round + 1,
                store.backend.name()
            );
            samples.push(Sample { round, backend: store.backend, metric: Metric::Build, secs: build });
            samples.push(Sample { round, backend: store.backend, metric: Metric::Runs, secs: runs });
        }
    }
    let stalls = pressure.and_then(Pressure::since);
    drop(load);
    let present: Vec<Backend> = stores.iter().map(|s| s.backend).collect();
    println!("\n{}", table(&present, &samples, rounds, options.load));
    if let Some(stalls) = stalls {
        let wall = started.elapsed().as_secs_f64() * 1e6;
        let (cpu, io) = stalls.micros();
        println!(
            "pressure stalls during the run: cpu {:.0}%, io {:.0}%",
            cpu as f64 / wall * 100.0,
            io as f64 / wall * 100.0
        );
    }
    drop(stores);
    Ok(())
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
struct Sample {
    round: usize,
    backend: Backend,
    metric: Metric,
    secs: f64,
}

/// The table of medians: one row per metric, one column per backend, then ovlfs's ratios, each
/// the median of the rounds' own ratios (backends of one round run back to back, under the same
/// conditions, which on a shared machine change more between rounds than within one).
fn table(backends: &[Backend], samples: &[Sample], rounds: usize, load: bool) -> String {
    let load = if load { "one core kept busy by a spinning thread" } else { "no added load" };
    let mut out = format!("podman, medians of {rounds} rounds, seconds ({load})\n");
    out += &format!("{:<34}", "");
    for b in backends {
        out += &format!("{:>20}", b.name());
    }
    out += &format!("{:>14}{:>22}\n", "ovlfs/kernel", "ovlfs/fuse-overlayfs");
    for metric in Metric::ALL {
        out += &format!("{:<34}", metric.label());
        let of = |b: Backend| samples.iter().filter(move |s| s.backend == b && s.metric == metric);
        for &b in backends {
            let mut secs: Vec<f64> = of(b).map(|s| s.secs).collect();
            out += &format!("{:>20}", median(&mut secs).map_or("-".to_owned(), |m| format!("{m:.2}")));
        }
        let ratio = |other: Backend| {
            let mut ratios: Vec<f64> = of(Backend::Ovlfs)
                .filter_map(|ours| of(other).find(|s| s.round == ours.round).map(|theirs| ours.secs / theirs.secs))
                .filter(|r| r.is_finite())
                .collect();
            median(&mut ratios).map_or("-".to_owned(), |r| format!("{r:.2}x"))
        };
        out += &format!("{:>14}{:>22}\n", ratio(Backend::Kernel), ratio(Backend::FuseOverlayfs));
    }
    out += "ratios: medians of the rounds' own ratios; targets: ovlfs faster than fuse-overlayfs on both \
            (ratio < 1), within 1.5x of the kernel driver";
    out
}

/// A podman store of one backend under the scratch dir; reset on drop.
struct Store {
    backend: Backend,
    dir: PathBuf,
}

impl Store {
    fn create(scratch: &Path, backend: Backend, program: Option<&Path>, base: &Path) -> Result<Store> {
        let dir = scratch.join(backend.dir_name());
        // podman 4.3 refuses a `--runroot` over 50 characters, and passes it to the cleanup
        // process it has conmon start when a container exits: with a longer one that cleanup
        // fails, and every `podman run --rm` waits 20 s for it.
        let run_root = dir.join("run");
        if run_root.as_os_str().len() > 50 {
            bail!("{} is longer than podman's limit for a run root (50): set TMPDIR shorter", run_root.display());
        }
        for sub in ["root", "run", "tmp", "volumes", "networks", "home"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let containers = format!(
            "[containers]\nnetns = \"none\"\n{}[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             lock_type = \"file\"\ntmp_dir = \"{d}/tmp\"\nvolume_path = \"{d}/volumes\"\n\
             [network]\nnetwork_config_dir = \"{d}/networks\"\n",
            ulimits()
        );
        fs::write(dir.join("containers.conf"), containers)?;
        let mut storage = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/run\"\n\
             [storage.options.overlay]\nmountopt = \"nodev\"\n"
        );
        if let Some(p) = program {
            storage += &format!("mount_program = \"{}\"\n", p.display());
        }
        fs::write(dir.join("storage.conf"), storage)?;
        if backend == Backend::KernelNaiveDiff {
            // containers/storage's cached probe: "the upper dir cannot be tarred as the diff".
            fs::create_dir_all(dir.join("run/overlay"))?;
            fs::write(dir.join("run/overlay/native-diff(nodev)-false"), "bench-podman: naive diff")?;
        }
        let store = Store { backend, dir };
        store.podman(&["import", "-q"]).arg(base).arg("localhost/base").output_ok()?;
        Ok(store)
    }

    fn podman(&self, args: &[&str]) -> Podman {
        let mut cmd = Command::new("podman");
        cmd.args(args)
            .current_dir(&self.dir)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("HOME", self.dir.join("home"))
            .stdin(Stdio::null());
        Podman(cmd)
    }

    /// Seconds of `podman build --no-cache` of the benchmark image; its images removed after.
    fn time_build(&self, ctx: &Path) -> Result<f64> {
        let start = Instant::now();
        self.podman(&["build", "-q", "--no-cache", "--network", "none", "-t", "localhost/bench"])
            .arg(ctx)
            .output_ok()?;
        let took = start.elapsed().as_secs_f64();
        self.podman(&["rmi", "-f", "localhost/bench"]).output_ok()?;
        self.podman(&["image", "prune", "-f"]).output_ok()?;
        Ok(took)
    }

    /// Seconds of [`RUNS`] x `podman run --rm localhost/base true`.
    fn time_runs(&self) -> Result<f64> {
        let start = Instant::now();
        for _ in 0..RUNS {
            self.podman(&["run", "--rm", "localhost/base", "true"]).output_ok()?;
        }
        Ok(start.elapsed().as_secs_f64())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Best effort: podman 4.3's reset may fail to remove its own tmp dir ("directory not
        // empty"); the scratch dir's guard removes everything after, and says if it cannot.
        let _ = self.podman(&["rm", "-a", "-f", "--time=0"]).output_ok();
        let _ = self.podman(&["system", "reset", "-f"]).output_ok();
    }
}

/// A podman command line being built.
struct Podman(Command);

impl Podman {
    fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    /// Runs it; its stderr in the error when it fails.
    fn output_ok(mut self) -> Result<()> {
        let out = self.0.output().with_context(|| format!("starting {:?}", self.0))?;
        if !out.status.success() {
            bail!("{:?}: {}\n{}", self.0, out.status, String::from_utf8_lossy(&out.stderr).trim_end());
        }
        Ok(())
    }
}

/// `default_ulimits` for containers.conf: podman as root asks for more open files and processes
/// than a container without `CAP_SYS_RESOURCE` may grant; these are the limits we have.
fn ulimits() -> String {
    let limit = |name: &str| -> Option<u64> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().nth(1)?.parse().ok()
    };
    let nofile = limit("Max open files").unwrap_or(1 << 20).min(1 << 20);
    let nproc = limit("Max processes").unwrap_or(4096).min(4096);
    format!("default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n")
}

/// The base image's tree: busybox and its applets as hard links, packed into `tar`.
fn build_base(rootfs: &Path, busybox: &Path, tar: &Path) -> Result<()> {
    for dir in ["bin", "etc", "tmp", "root", "dev", "proc", "sys"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).context("copying busybox")?;
    for applet in APPLETS {
        fs::hard_link(rootfs.join("bin/busybox"), rootfs.join("bin").join(applet))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    let status = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(rootfs)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .context("starting tar")?;
    if !status.success() {
        bail!("tar of the base tree failed ({status})");
    }
    Ok(())
}

/// A thread spinning on one core until dropped.
struct BusyCore(Arc<AtomicBool>);

impl BusyCore {
    fn start() -> BusyCore {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        BusyCore(stop)
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Removes the scratch dir on drop, unless something is still mounted below it (then detaches
/// those mounts first; we never delete through a mount).
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        mountinfo::detach_and_remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_has_the_steps_it_claims() {
        assert_eq!(CONTAINERFILE.lines().filter(|l| l.starts_with("RUN ")).count(), RUN_STEPS);
        const { assert!(RUN_STEPS >= 6, "issue 18 asks for a multi-step image of 6+ RUN steps") };
    }

    #[test]
    fn table_shows_medians_and_ovlfs_ratios_per_round() {
        let sample = |round, backend, secs| Sample { round, backend, metric: Metric::Build, secs };
        let samples = [
            sample(0, Backend::Kernel, 2.0),
            sample(1, Backend::Kernel, 4.0),
            sample(2, Backend::Kernel, 3.0),
            sample(0, Backend::Ovlfs, 3.0),
            sample(1, Backend::Ovlfs, 8.0),
            sample(2, Backend::Ovlfs, 6.0),
            sample(0, Backend::FuseOverlayfs, 6.0),
        ];
        let t = table(&[Backend::Kernel, Backend::FuseOverlayfs, Backend::Ovlfs], &samples, 3, false);
        let build = t.lines().find(|l| l.starts_with("build")).unwrap();
        // Medians 3.00 and 6.00; round ratios to the kernel 1.5, 2, 2; to fuse-overlayfs 0.5.
        assert!(build.contains("3.00") && build.contains("6.00"), "{t}");
        assert!(build.contains("2.00x") && build.contains("0.50x"), "{t}");
        let runs = t.lines().find(|l| l.contains("run --rm")).unwrap();
        assert!(runs.trim_end().ends_with('-'), "{t}");
    }
}
