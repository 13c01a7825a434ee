//! The `ovlfs` binary: parse the kernel overlay's mount options, check them, mount, and serve
//! until `umount`. Without `-f` it returns once the mount is live and serves from the
//! background. `ovlfs check -o OPTS` checks the layers offline instead (`ovl_fs::check`).

use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use ovl_core::MountOptions;

mod sys;

const USAGE: &str = "usage: ovlfs [-f] -o lowerdir=L1:L2[,upperdir=U,workdir=W][,userxattr][,ro] MOUNTPOINT
       ovlfs SOURCE MOUNTPOINT -o OPTIONS      (the form mount.fuse3 uses)
       ovlfs check -o lowerdir=L1:L2,upperdir=U,workdir=W [--repair] [--json]

  -f         stay in the foreground
  -o OPTS    overlay mount options, as for `mount -t overlay`
  -h         this help;  -V, --version  the version";

/// The environment variable through which a background child tells its parent it is ready.
const NOTIFY: &str = "OVLFS_NOTIFY_READY";

struct Args {
    foreground: bool,
    options: MountOptions,
    source: String,
    mountpoint: PathBuf,
    raw: Vec<String>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut foreground = false;
    let mut opts = String::new();
    let mut positional = Vec::new();
    let mut it = raw.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("ovlfs {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-f" => foreground = true,
            "-d" => foreground = true,
            "-o" => {
                let o = it.next().context("-o needs an argument")?;
                if !opts.is_empty() {
                    opts.push(',');
                }
                opts.push_str(o);
            }
            s if s.starts_with("-o") => {
                if !opts.is_empty() {
                    opts.push(',');
                }
                opts.push_str(&s[2..]);
            }
            s if s.starts_with('-') => bail!("unknown flag `{s}`\n{USAGE}"),
            s => positional.push(s.to_string()),
        }
    }
    let (source, mountpoint) = match positional.as_slice() {
        [m] => ("ovlfs".to_string(), m.clone()),
        [s, m] => (s.clone(), m.clone()),
        _ => bail!("expected a mountpoint\n{USAGE}"),
    };
    let options = MountOptions::parse(&opts)?;
    if options.lowerdirs.is_empty() {
        bail!("missing lowerdir= (at least one lower directory is required)");
    }
    Ok(Some(Args { foreground, options, source, mountpoint: PathBuf::from(mountpoint), raw }))
}

const CHECK_USAGE: &str = "usage: ovlfs check -o lowerdir=L1:L2,upperdir=U,workdir=W [--repair] [--json]

Checks the upper layer U over the lower layers, and the work dir W, offline (unmount first):
whiteouts that hide nothing, broken redirects, origins, metacopy files without data, odd overlay
xattrs, leftovers in W/work. Each finding has a path and a severity: error, warning or fixable.

  -o OPTS    the overlay's mount options, as for `mount -t overlay` (metacopy=on, redirect_dir=,
             userxattr count)
  --repair   remove the fixable findings (they never show in the view), then check again
  --json     print the report as JSON

Exit status: 0 no errors (warnings and fixable findings allowed), 1 errors remain, 2 bad usage.
Example:
  ovlfs check -o lowerdir=/l1:/l2,upperdir=/u,workdir=/w --repair";

/// True for `ovlfs check [-o OPTS]... [FLAGS]`. A mount point after `check` makes it the
/// mount.fuse3 form `ovlfs SOURCE MNT -o OPTS` with a source named `check`.
fn is_check(args: &[String]) -> bool {
    let Some((first, rest)) = args.split_first() else { return false };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        if a == "-o" {
            it.next();
        } else if !a.starts_with('-') {
            return false;
        }
    }
    first == "check"
}

/// `ovlfs check ARGS`: parses by hand like the mount form, runs, prints, and gives the exit code.
fn check_main(args: &[String]) -> ExitCode {
    let usage = |msg: &str| {
        let first = CHECK_USAGE.lines().next().unwrap_or_default();
        eprintln!("ovlfs check: {msg}\n{first}\n(`ovlfs check --help` for more)");
        ExitCode::from(2)
    };
    let (mut opts, mut repair, mut json) = (String::new(), false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let more = match a.as_str() {
            "-h" | "--help" => {
                println!("{CHECK_USAGE}");
                return ExitCode::SUCCESS;
            }
            "--repair" => {
                repair = true;
                continue;
            }
            "--json" => {
                json = true;
                continue;
            }
            "-o" => match it.next() {
                Some(o) => o.as_str(),
                None => return usage("-o needs an argument"),
            },
            s if s.starts_with("-o") => &s[2..],
            s => return usage(&format!("unexpected argument `{s}`")),
        };
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str(more);
    }
    let options = match MountOptions::parse(&opts) {
        Ok(o) => o,
        Err(e) => return usage(&e.to_string()),
    };
    use ovl_fs::check::CheckError;
    match ovl_fs::check::check_options(&options, repair) {
        Ok(report) => {
            print!("{}", report.render(json));
            ExitCode::from(report.exit_code())
        }
        Err(e @ (CheckError::Stack(_) | CheckError::NoUpper)) => usage(&e.to_string()),
        Err(e) => {
            eprintln!("ovlfs check: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if is_check(&args) {
        return check_main(&args[1..]);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ovlfs: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else { return Ok(()) };
    if !args.foreground {
        return spawn_background(&args);
    }
    serve(&args, std::env::var_os(NOTIFY).is_some())
}

/// Mounts and serves until the unmount. With `notify`, prints `ready` once the mount is live and
/// then lets go of stdin, stdout and (unless `RUST_LOG` is set) stderr.
fn serve(args: &Args, notify: bool) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe) is lost, never a panic.
        .log_internal_errors(false)
        .init();
    // Objects we create get exactly the modes we ask for.
    rustix::process::umask(rustix::fs::Mode::empty());
    // One descriptor per layer, and every file open through the mount is one of ours.
    ovl_fs::limits::raise();
    let mount = ovl_fs::mount::Mount::new(&args.options, &args.mountpoint, &args.source)?;
    if notify {
        println!("ready");
        // Detach from the parent's pipes so readers of our output do not wait for the unmount.
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
        rustix::stdio::dup2_stdout(&null)?;
        if std::env::var_os("RUST_LOG").is_none() {
            rustix::stdio::dup2_stderr(&null)?;
        }
        rustix::stdio::dup2_stdin(&null)?;
    }
    unmount_on_signal(mount.mountpoint().to_path_buf())?;
    mount.run()
}

/// On SIGTERM, SIGINT or SIGHUP, detach the mount: the kernel then ends the session once no one
/// uses the filesystem any more, and `run` returns, instead of leaving a dead mount behind.
fn unmount_on_signal(mnt: PathBuf) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(sig, "unmounting on signal");
            if let Err(e) = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!("unmount {mnt:?}: {e}");
            }
        }
    })?;
    Ok(())
}

/// Starts the daemon in the background, in a new process group, and waits until it reports the
/// mount live (exit 0) or fails (its error, exit 1). The daemon is a fork of this process; only
/// if that is refused (see [`sys::fork`]) is it ourselves run again with `-f`.
fn spawn_background(args: &Args) -> anyhow::Result<()> {
    // Check what we can before forking so errors come from this process, and nothing changes.
    ovl_fs::mount::check_mountpoint(&args.mountpoint)?;
    // With `RUST_LOG` the daemon logs for as long as it runs: to our own stderr, which outlives
    // us (a pipe to us would close when we return, and the daemon's next log line hit EPIPE).
    let logs = std::env::var_os("RUST_LOG").is_some();
    let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let child = match sys::fork() {
        Ok(sys::Forked::Child) => {
            drop((out_r, err_r));
            std::process::exit(match daemon(args, out_w, (!logs).then_some(err_w)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ovlfs: {e:#}");
                    1
                }
            })
        }
        Ok(sys::Forked::Parent(pid)) => pid,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return spawn_reexec(args, logs),
        Err(e) => return Err(e).context("starting the background daemon"),
    };
    drop((out_w, err_w));
    let mut line = String::new();
    BufReader::new(std::fs::File::from(out_r)).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let mut err = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut err);
    let _ = rustix::process::waitpid(Some(child), rustix::process::WaitOptions::empty());
    failed(&err)
}

/// The forked daemon: its own process group, stdin from /dev/null, stdout (and stderr, when
/// given) the pipes its parent reads, then [`serve`] with notification.
fn daemon(args: &Args, out: OwnedFd, err: Option<OwnedFd>) -> anyhow::Result<()> {
    rustix::process::setpgid(None, None)?;
    let null = std::fs::File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&out)?;
    if let Some(err) = &err {
        rustix::stdio::dup2_stderr(err)?;
    }
    drop((null, out, err));
    serve(args, true)
}

/// The daemon's error (its stderr), as our own.
fn failed(err: &str) -> anyhow::Result<()> {
    let err = err.trim().trim_start_matches("ovlfs: ");
    if err.is_empty() { bail!("the daemon exited before the mount was live") } else { bail!("{err}") }
}

/// Runs ourselves with `-f` in a new process group and waits until it reports the mount live
/// (exit 0) or fails (its error, exit 1): for when this process may not fork.
fn spawn_reexec(args: &Args, logs: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut child = Command::new(exe)
        .arg("-f")
        .args(&args.raw)
        .env(NOTIFY, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if logs { Stdio::inherit() } else { Stdio::piped() })
        .process_group(0)
        .spawn()
        .context("starting the background daemon")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    failed(&err)
}
