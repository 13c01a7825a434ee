//! One podman storage per test and driver, and what podman needs from the machine.
//!
//! A [`Store`] lives in its own temp dir with its own `containers.conf` and `storage.conf` (graph
//! root, run root, tmp dir, file locks, events file, network config), so tests run in parallel and
//! share nothing but the images' blob-info cache of containers/image. It imports one base image,
//! `localhost/base`, built from a busybox-static tree whose applets are hard links of
//! `/bin/busybox`. podman runs as root or, for [`Who::Rootless`], as the test user
//! [`ROOTLESS_USER`] (created if missing, with subordinate ID ranges) through `setpriv`, with its
//! own `HOME` and `XDG_RUNTIME_DIR`. Dropping a store resets it (`podman system reset -f`), ends
//! its rootless pause process, detaches any mount left under it and removes the directory, also
//! while a test panics.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::{mounts_under, ovlfs_bin, tempdir};

/// How long one podman command may take before it is presumed hung and killed.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// The mtime of every object of the base image: before `common::OLD_TIME_CUTOFF`, so the
/// comparisons check that what a container did not touch keeps it.
const BASE_MTIME: &str = "@1500000000";

/// The rootless test user, made by [`ready`] when missing.
pub const ROOTLESS_USER: &str = "ovlpodman";

/// How many subordinate IDs the test user gets: the base image holds IDs up to 65534.
const SUBID_COUNT: u64 = 65536;

/// The busybox applets of the base image, each a hard link of `/bin/busybox`.
const APPLETS: &[&str] = &[
    "sh", "ls", "cp", "rm", "mv", "ln", "chmod", "chown", "cat", "mkdir", "touch", "echo", "true", "false", "test",
    "sleep", "id", "find", "sort", "wc", "head", "rmdir", "readlink", "stat", "printf", "tr", "sed", "grep", "env",
];

/// The overlay containers/storage mounts layers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// The kernel's overlay (no mount program): the oracle.
    Kernel,
    /// `mount_program = fuse-overlayfs`: the program ovlfs means to replace.
    FuseOverlayfs,
    /// `mount_program = ovlfs`.
    Ovlfs,
}

impl Driver {
    /// The column name in the scenario table.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Kernel => "kernel",
            Driver::FuseOverlayfs => "fuse-overlayfs",
            Driver::Ovlfs => "ovlfs",
        }
    }

    /// Its name in temp dir names (short, see `Store::new`).
    fn short_name(self) -> &'static str {
        match self {
            Driver::Kernel => "k",
            Driver::FuseOverlayfs => "f",
            Driver::Ovlfs => "o",
        }
    }

    /// Whether containers/storage runs a FUSE mount program for this driver.
    pub fn is_mount_program(self) -> bool {
        self != Driver::Kernel
    }
}

/// Who runs podman.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    /// root, as `sudo podman`.
    Root,
    /// The rootless test user, as that user's own `podman`.
    Rootless(User),
}

/// A local user's IDs.
#[derive(Clone, Copy, Debug)]
pub struct User {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
}

/// What the machine offers the podman tests, found by [`ready`].
#[derive(Clone, Debug)]
pub struct Env {
    busybox: PathBuf,
    fuse_overlayfs: Option<PathBuf>,
    /// Root, or the rootless test user.
    pub who: Who,
}

impl Env {
    /// The drivers to compare: the kernel first (the oracle), fuse-overlayfs when installed.
    pub fn drivers(&self) -> Vec<Driver> {
        let mut drivers = vec![Driver::Kernel];
        if self.fuse_overlayfs.is_some() {
            drivers.push(Driver::FuseOverlayfs);
        }
        drivers.push(Driver::Ovlfs);
        drivers
    }
}

/// Whether a missing prerequisite fails the test (`OVL_PODMAN_REQUIRED=1`, set by `cargo xtask
/// test`) instead of skipping it.
fn required() -> bool {
    std::env::var("OVL_PODMAN_REQUIRED").is_ok_and(|v| v == "1")
}

/// The machine's podman setup for `test`, or `None` after printing why the test is skipped;
/// with `OVL_PODMAN_REQUIRED=1` a missing prerequisite panics instead. With `rootless`, also
/// makes the test user and lets it use `/dev/fuse`.
pub fn ready(test: &str, rootless: bool) -> Option<Env> {
    match probe(rootless) {
        Ok(env) => Some(env),
        Err(why) if required() => panic!("{test}: OVL_PODMAN_REQUIRED=1 but {why}"),
        Err(why) => {
            eprintln!("SKIP {test}: {why} (OVL_PODMAN_REQUIRED=1 makes this a failure)");
            None
        }
    }
}

fn probe(rootless: bool) -> Result<Env, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("the podman tests run as root".into());
    }
    for tool in ["podman", "tar", "setpriv"] {
        which(tool).ok_or_else(|| format!("no `{tool}` in PATH (Debian: apt-get install podman)"))?;
    }
    if which("runc").is_none() && which("crun").is_none() {
        return Err("no OCI runtime (runc or crun) in PATH".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
        return Err("the kernel has no overlay filesystem (the oracle)".into());
    }
    let busybox = which("busybox").ok_or("no busybox (Debian: apt-get install busybox-static)")?;
    if !is_static_elf(&busybox) {
        return Err(format!("{} is not statically linked (Debian: apt-get install busybox-static)", busybox.display()));
    }
    let who = if rootless {
        for tool in ["newuidmap", "newgidmap"] {
            which(tool).ok_or_else(|| format!("no `{tool}` for rootless podman (Debian: apt-get install uidmap)"))?;
        }
        let paths = ["/usr/libexec/podman/catatonit", "/usr/bin/catatonit"];
        if !paths.iter().any(|p| Path::new(p).exists()) {
            return Err("no catatonit for rootless podman's pause process (Debian: apt-get install catatonit)".into());
        }
        Who::Rootless(rootless_user()?)
    } else {
        Who::Root
    };
    Ok(Env { busybox, fuse_overlayfs: which("fuse-overlayfs"), who })
}

/// `name` in `PATH` or an sbin directory.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether `path` is a 64-bit little-endian ELF executable without a program interpreter (a
/// dynamically linked busybox cannot run in an image that has no libc).
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..count).all(|i| {
        let o = phoff + i * size;
        b.get(o..o + 4).is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != PT_INTERP)
    })
}

/// Serializes making the test user between tests of this process.
static USER_SETUP: Mutex<()> = Mutex::new(());

/// The rootless test user: made if missing (no home, no login shell), given subordinate uid and
/// gid ranges if it has none, and `/dev/fuse` opened to unprivileged users as a stock system
/// has it (udev makes it 0666; some containers leave it 0600).
fn rootless_user() -> Result<User, String> {
    let _serial = USER_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if passwd_entry(ROOTLESS_USER).is_none() {
        let args = ["--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", ROOTLESS_USER];
        run_tool("useradd", &args)?;
        eprintln!("podman_e2e: made the rootless test user {ROOTLESS_USER}");
    }
    let user = passwd_entry(ROOTLESS_USER).ok_or(format!("useradd made no {ROOTLESS_USER}"))?;
    for (file, flag) in [("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")] {
        let text = fs::read_to_string(file).unwrap_or_default();
        match subid_count(&text, ROOTLESS_USER) {
            Some(n) if n >= SUBID_COUNT => {}
            Some(n) => return Err(format!("{ROOTLESS_USER} has {n} IDs in {file}; the tests need {SUBID_COUNT}")),
            None => {
                let start = subid_end(&text).max(100_000);
                run_tool("usermod", &[flag, &format!("{start}-{}", start + SUBID_COUNT - 1), ROOTLESS_USER])?;
            }
        }
    }
    let mode = fs::metadata("/dev/fuse").map_err(|e| format!("/dev/fuse: {e}"))?.mode();
    if mode & 0o006 != 0o006 {
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).map_err(|e| format!("chmod: {e}"))?;
        eprintln!("podman_e2e: /dev/fuse was {:o}; made it 0666 as udev does", mode & 0o777);
    }
    Ok(user)
}

fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool).args(args).output().map_err(|e| format!("{tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// The uid and gid of `name` from `/etc/passwd`.
fn passwd_entry(name: &str) -> Option<User> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    let f: Vec<&str> = text.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f[0] == name)?;
    Some(User { uid: f.get(2)?.parse().ok()?, gid: f.get(3)?.parse().ok()? })
}

/// How many subordinate IDs `name` has in an `/etc/subuid`-style text.
fn subid_count(text: &str, name: &str) -> Option<u64> {
    let ranges = text.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() == 3 && f[0] == name);
    ranges.map(|f| f[2].parse::<u64>().unwrap_or(0)).reduce(|a, b| a + b)
}

/// The first ID after every range of an `/etc/subuid`-style text.
fn subid_end(text: &str) -> u64 {
    let ends = text.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() == 3);
    ends.filter_map(|f| Some(f[1].parse::<u64>().ok()? + f[2].parse::<u64>().ok()?)).max().unwrap_or(0)
}

/// A podman storage of its own, with `localhost/base` imported; reset and removed on drop.
pub struct Store {
    /// The driver its layers are mounted with.
    pub driver: Driver,
    who: Who,
    dir: PathBuf,
    run_root: PathBuf,
    commands: AtomicUsize,
    _tmp: tempfile::TempDir,
}

impl Store {
    /// A new store for `driver` run as `env.who`, with the base image.
    pub fn new(env: &Env, driver: Driver) -> Result<Store, String> {
        // Short: podman 4.3 refuses a `--runroot` over 50 characters, and passes it to the cleanup
        // process conmon starts when a container exits; with a longer one that cleanup fails (and
        // `podman run --rm` waits 20 s for it, `rm` meets a still-mounted shm).
        let tmp = tempdir(&format!("pm-{}-", driver.short_name()));
        let dir = tmp.path().to_owned();
        if dir.join("run").as_os_str().len() > 50 {
            return Err(format!("{} is too long for podman's run root (50 at most): shorten TMPDIR", dir.display()));
        }
        let mut store =
            Store { driver, who: env.who, dir, run_root: PathBuf::new(), commands: AtomicUsize::new(0), _tmp: tmp };
        store.lay_out(env)?;
        // Rootless podman keeps its run root in XDG_RUNTIME_DIR whatever storage.conf says.
        store.run_root = PathBuf::from(store.podman(&["info", "--format", "{{.Store.RunRoot}}"])?.trim());
        store.podman(&["import", "-q", "base.tar", "localhost/base"])?;
        Ok(store)
    }

    fn lay_out(&self, env: &Env) -> Result<(), String> {
        let d = &self.dir;
        for sub in ["root", "run", "tmp", "volumes", "networks", "home", "xdg", "out", "ctx"] {
            fs::create_dir(d.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        // Under `--uidmap` the container's root (another host uid) walks down to merged/.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.join("xdg"), fs::Permissions::from_mode(0o700)).unwrap();
        let program = match self.driver {
            Driver::Kernel => None,
            Driver::FuseOverlayfs => env.fuse_overlayfs.clone(),
            // The test user must be able to run it: a copy, outside a target dir it may not reach.
            Driver::Ovlfs if matches!(self.who, Who::Rootless(_)) => {
                fs::copy(ovlfs_bin(), d.join("ovlfs")).map_err(|e| format!("copy ovlfs: {e}"))?;
                Some(d.join("ovlfs"))
            }
            Driver::Ovlfs => Some(ovlfs_bin()),
        };
        fs::write(d.join("containers.conf"), self.containers_conf()).unwrap();
        fs::write(d.join("storage.conf"), storage_conf(d, program.as_deref())).unwrap();
        build_base(&d.join("rootfs"), &env.busybox, &d.join("base.tar"))?;
        fs::remove_dir_all(d.join("rootfs")).unwrap();
        if let Who::Rootless(user) = self.who {
            chown_tree(d, user);
        }
        Ok(())
    }

    /// Everything podman reads from containers.conf: no systemd, no network, file locks and
    /// events, the tmp dir (alive file, exit codes, pause pid) in the store. As root, limits
    /// podman may set: it asks for `nofile=1048576` and more processes than a CI container
    /// without `CAP_SYS_RESOURCE` can grant (runc then fails "error setting rlimit type 7").
    fn containers_conf(&self) -> String {
        use rustix::process::{Resource, getrlimit};
        let mut conf = String::from("[containers]\nnetns = \"none\"\n");
        if matches!(self.who, Who::Root) {
            let nofile = getrlimit(Resource::Nofile).maximum.unwrap_or(1 << 20).min(1 << 20);
            let nproc = getrlimit(Resource::Nproc).maximum.unwrap_or(4096).min(4096);
            conf += &format!("default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n");
        }
        let d = self.dir.display();
        conf += &format!(
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nlock_type = \"file\"\n\
             tmp_dir = \"{d}/tmp\"\nvolume_path = \"{d}/volumes\"\n[network]\nnetwork_config_dir = \"{d}/networks\"\n"
        );
        conf
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run root (containers/storage's `runroot`).
    pub fn run_root(&self) -> &Path {
        &self.run_root
    }

    /// Whether podman runs as the rootless test user.
    pub fn rootless(&self) -> bool {
        matches!(self.who, Who::Rootless(_))
    }

    /// `podman ARGS` in this store; its stdout, or its exit status and stderr.
    pub fn podman(&self, args: &[&str]) -> Result<String, String> {
        let n = self.commands.fetch_add(1, Ordering::Relaxed);
        let (stdout, stderr) = (self.dir.join(format!("out/{n}.stdout")), self.dir.join(format!("out/{n}.stderr")));
        let mut cmd = match self.who {
            Who::Root => Command::new("podman"),
            Who::Rootless(u) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", &u.uid.to_string(), "--regid", &u.gid.to_string(), "--init-groups", "podman"]);
                c.env("XDG_RUNTIME_DIR", self.dir.join("xdg"));
                c
            }
        };
        let d = &self.dir;
        cmd.args(args)
            .current_dir(d)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("HOME", d.join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        let shown = format!("[{}] podman {}", self.driver.name(), args.join(" "));
        let mut child = cmd.spawn().map_err(|e| format!("{shown}: {e}"))?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > COMMAND_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: still running after {COMMAND_DEADLINE:?}; killed"));
            }
            sleep(Duration::from_millis(5));
        };
        if std::env::var_os("OVL_PODMAN_TRACE").is_some() {
            eprintln!("{:>6.2}s {shown} ({status})", start.elapsed().as_secs_f64());
        }
        let out = fs::read_to_string(&stdout).unwrap_or_default();
        if !status.success() {
            let err = fs::read_to_string(&stderr).unwrap_or_default();
            return Err(format!("{shown}: {status}\n{}", err.trim_end()));
        }
        Ok(out)
    }

    /// Makes `path` (made by the test) podman's: the test user's for a rootless store.
    pub fn give(&self, path: &Path) {
        if let Who::Rootless(u) = self.who {
            chown(path, Some(u.uid), Some(u.gid)).unwrap();
        }
    }

    /// Writes `text` to `ctx/NAME`, readable by podman (the build context dir).
    pub fn write_context(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join("ctx").join(name);
        fs::write(&p, text).unwrap();
        self.give(&p);
        p
    }

    /// `podman rm -f --time=0 CTR`, tried again (for up to 2 s) while it fails on the container's
    /// shm mount being busy: podman 4.3's `rm` right after `stop` can race the cleanup process
    /// conmon started when the container exited (seen with `--uidmap`).
    pub fn remove(&self, ctr: &str) -> Result<(), String> {
        let start = Instant::now();
        loop {
            match self.podman(&["rm", "-f", "--time=0", ctr]) {
                Err(e) if e.contains("device or resource busy") && start.elapsed() < Duration::from_secs(2) => {
                    sleep(Duration::from_millis(50))
                }
                done => return done.map(drop),
            }
        }
    }

    /// Polls `podman exec CTR test -e PATH` until it succeeds (the container is ready).
    pub fn wait_for_file(&self, ctr: &str, path: &str) -> Result<(), String> {
        let start = Instant::now();
        while self.podman(&["exec", ctr, "test", "-e", path]).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                let logs = self.podman(&["logs", ctr]).unwrap_or_else(|e| e);
                return Err(format!("[{}] {ctr} never made {path}; its output:\n{logs}", self.driver.name()));
            }
            sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Containers first, killed at once: `reset` gives each 10 s to stop, and a shell as pid 1
        // ignores SIGTERM.
        let _ = self.podman(&["rm", "-a", "-f", "--time=0"]);
        if let Err(e) = self.podman(&["system", "reset", "-f"]) {
            eprintln!("podman_e2e: reset of {}: {e}", self.dir.display());
        }
        if let Who::Rootless(user) = self.who {
            end_pause_process(&self.dir.join("tmp/pause.pid"), user);
        }
        for point in mounts_under(&self.dir) {
            if let Err(e) = rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH) {
                eprintln!("podman_e2e: umount -l {}: {e}", point.display());
            }
        }
    }
}

/// Kills the pause process rootless podman left to hold its user namespace (its pid in the
/// store's tmp dir), if that pid is still the test user's process; its namespaces, and the
/// mounts podman made in them, go with it.
fn end_pause_process(pid_file: &Path, user: User) {
    let Some(pid) = fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else { return };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let ours = fs::metadata(&proc_dir).is_ok_and(|m| m.uid() == user.uid)
        && fs::read_to_string(proc_dir.join("comm")).is_ok_and(|c| c.trim() == "catatonit");
    if let (true, Some(pid)) = (ours, rustix::process::Pid::from_raw(pid)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

fn chown_tree(path: &Path, user: User) {
    chown(path, Some(user.uid), Some(user.gid)).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for e in fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), user);
        }
    }
}

/// storage.conf: the overlay driver in the store's dirs, with `program` as the mount program.
fn storage_conf(dir: &Path, program: Option<&Path>) -> String {
    let d = dir.display();
    let mut conf = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/run\"\n\
         rootless_storage_path = \"{d}/root\"\n[storage.options.overlay]\nmountopt = \"nodev\"\n"
    );
    if let Some(p) = program {
        conf += &format!("mount_program = \"{}\"\n", p.display());
    }
    conf
}

/// Makes the base image's tree in `rootfs` and packs it into `tar`: busybox with its applets as
/// hard links, `/etc/passwd`, a hard-linked pair and a symlink under `/srv/a`, a read-only doc
/// dir, a user's home, every mtime [`BASE_MTIME`].
fn build_base(rootfs: &Path, busybox: &Path, tar: &Path) -> Result<(), String> {
    let mkdir = |p: &str, mode: u32| {
        let p = rootfs.join(p);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    let file = |p: &str, text: &str, mode: u32| {
        let p = rootfs.join(p);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    for (dir, mode) in [("bin", 0o755), ("etc", 0o755), ("dev", 0o755), ("proc", 0o755), ("sys", 0o755)] {
        mkdir(dir, mode);
    }
    for (dir, mode) in [("tmp", 0o1777), ("root", 0o700), ("var/lib", 0o755), ("srv/a/b", 0o755)] {
        mkdir(dir, mode);
    }
    mkdir("usr/share/doc/pkg", 0o755);
    mkdir("home/app", 0o750);
    fs::copy(busybox, rootfs.join("bin/busybox")).map_err(|e| format!("copy busybox: {e}"))?;
    for applet in APPLETS {
        fs::hard_link(rootfs.join("bin/busybox"), rootfs.join("bin").join(applet)).unwrap();
    }
    file(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
        0o644,
    );
    file("etc/group", "root:x:0:\napp:x:1000:\nnobody:x:65534:\n", 0o644);
    file("srv/a/one", "one\n", 0o644);
    fs::hard_link(rootfs.join("srv/a/one"), rootfs.join("srv/a/one-link")).unwrap();
    symlink("one", rootfs.join("srv/a/sym")).unwrap();
    file("srv/a/b/two", "two\n", 0o640);
    file("usr/share/doc/pkg/README", "read me\n", 0o444);
    file("home/app/.profile", "PS1='$ '\n", 0o600);
    for p in ["home/app", "home/app/.profile"] {
        chown(rootfs.join(p), Some(1000), Some(1000)).unwrap();
    }
    let out = Command::new("tar")
        .args(["--numeric-owner", "--sort=name", "--mtime", BASE_MTIME, "-C"])
        .arg(rootfs)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!("tar of the base tree: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

#[test]
fn subordinate_ranges_are_read_per_user() {
    let text = "alice:100000:65536\novlpodman:165536:1000\novlpodman:300000:64536\n";
    assert_eq!(subid_count(text, "ovlpodman"), Some(65536));
    assert_eq!(subid_count(text, "bob"), None);
    assert_eq!(subid_end(text), 364536);
    assert_eq!(subid_end(""), 0);
}
