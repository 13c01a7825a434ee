//! The `ovlfs` binary: parse the kernel overlay's mount options, check them, mount, and serve
//! until `umount`. Without `-f` it returns once the mount is live and serves from the
//! background.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use ovl_core::MountOptions;

const USAGE: &str = "usage: ovlfs [-f] -o lowerdir=L1:L2[,upperdir=U,workdir=W][,userxattr][,ro] MOUNTPOINT
       ovlfs SOURCE MOUNTPOINT -o OPTIONS      (the form mount.fuse3 uses)

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

fn main() -> ExitCode {
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // Objects we create get exactly the modes we ask for.
    rustix::process::umask(rustix::fs::Mode::empty());
    let mount = ovl_fs::mount::Mount::new(&args.options, &args.mountpoint, &args.source)?;
    if std::env::var_os(NOTIFY).is_some() {
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

/// Runs ourselves with `-f` in a new process group and waits until it reports the mount live
/// (exit 0) or fails (its error, exit 1).
fn spawn_background(args: &Args) -> anyhow::Result<()> {
    // Check what we can before forking so errors come from this process, and nothing changes.
    ovl_fs::mount::check_mountpoint(&args.mountpoint)?;
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut child = Command::new(exe)
        .arg("-f")
        .args(&args.raw)
        .env(NOTIFY, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let err = err.trim().trim_start_matches("ovlfs: ");
    if err.is_empty() { bail!("the daemon exited before the mount was live") } else { bail!("{err}") }
}
