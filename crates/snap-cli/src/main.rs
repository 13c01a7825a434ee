//! `ovlsnap`, the snapshot command line: a thin client of the snap-fs control socket, plus the
//! daemon entry (`mount` without `--foreground` re-runs itself in the background) and offline
//! commands that read the store directly. It holds no filesystem logic.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use snap_fs::control::{self, Request, Status};
use snap_fs::daemon;
use snap_fs::policy::Perm;
use snap_fs::snapper::Listed;

/// `println!` that hands back a failed write (a full disk, a closed pipe when SIGPIPE is ignored)
/// as an error instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(writeln!(std::io::stdout().lock(), $($arg)*), "writing to stdout")?
    }};
}

mod delegation;
mod sys;
mod view_mount;

/// Set in the background daemon's environment: print "ready" once the mount is live.
const NOTIFY: &str = "OVLSNAP_NOTIFY_READY";

#[derive(Parser, Debug)]
#[command(
    name = "ovlsnap",
    version,
    about = "Online copy-on-write snapshots of any directory, as kernel overlay layers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::enum_variant_names)] // `MountCmd` is the `mount-cmd` subcommand
enum Cmd {
    /// Start serving LIVE with snapshots at MNT (default: over LIVE itself).
    #[command(after_help = "The daemon opens snapshot layers while it uses them, a bounded number at once (an \
                             eighth of the open-file limit, at most 256), and raises its soft open-file limit \
                             (ulimit -n) to the hard one; a mount, or a take, that would leave too few free to serve \
                             with is refused, the limit named.\n\nExamples:\n  ovlsnap mount /data\n  ovlsnap \
                             mount --store /data/.snaps /data /mnt/data")]
    Mount {
        /// The directory to snapshot.
        live: PathBuf,
        /// Where to mount; LIVE itself when left out.
        mnt: Option<PathBuf>,
        /// The snapshot store (default LIVE/.ovlsnap); must be on LIVE's filesystem.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Stay in the foreground (logs go to stderr; RUST_LOG sets the level).
        #[arg(short, long)]
        foreground: bool,
    },
    /// Flush and unmount a snapshot mount; the daemon exits.
    #[command(after_help = "Example:\n  ovlsnap umount /data")]
    Umount {
        /// The mount (default: the one containing the current directory).
        mnt: Option<PathBuf>,
    },
    /// Take a snapshot now (online, in constant time).
    #[command(after_help = "Examples:\n  ovlsnap take before-upgrade\n  ovlsnap take --mount /data")]
    Take {
        /// Its name (default: the current UTC time).
        name: Option<String>,
        /// What it is for (shown by `list`).
        #[arg(short, long)]
        description: Option<String>,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// List the snapshots (or only NAME...).
    #[command(
        after_help = "Examples:\n  ovlsnap list\n  ovlsnap list --json --mount /data\n  ovlsnap list -o name,refer monday"
    )]
    List {
        /// Only these snapshots (an error if one does not exist).
        names: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only these columns, in this order, tab-separated without a header line when
        /// `-H` is given: id, name, created, layer, used, refer, shared, entries, state, holds,
        /// description. USED: what deleting it frees; REFER: what its tree references; SHARED:
        /// the part of REFER newer snapshots or LIVE share (all but its layer).
        #[arg(short = 'o', value_delimiter = ',')]
        columns: Vec<String>,
        /// No header line (with `-o`), for scripts.
        #[arg(short = 'H')]
        no_header: bool,
        /// The mount, or a LIVE directory that is not mounted (its store is read directly).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Print the stock-kernel command that mounts snapshot NAME read-only at DIR, quoted for the
    /// shell. Paths mount(8) cannot pass intact (with `,` or `"`) are refused: use mount-view.
    #[command(name = "mount-cmd", after_help = "Example:\n  sh -c \"$(ovlsnap mount-cmd before-upgrade /mnt/old)\"")]
    MountCmd {
        /// The snapshot.
        name: String,
        /// Where it would be mounted.
        dir: PathBuf,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Mount snapshot NAME read-only at DIR with the stock kernel overlay (Linux 6.8+), without a
    /// shell or mount(8). It works while the daemon runs; unmount it with `umount DIR`.
    #[command(name = "mount-view", after_help = "Example:\n  ovlsnap mount-view before-upgrade /mnt/old")]
    MountView {
        /// The snapshot.
        name: String,
        /// Where to mount it (an existing directory).
        dir: PathBuf,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// What changed from snapshot A to snapshot B (default: the live tree): `+` added, `-` deleted,
    /// `M` modified (data, type or metadata), `R` renamed directory. Names are escaped as by
    /// `ls -b` (`\n`, `\ `, `\377` for a byte that is not UTF-8), one change per line.
    #[command(after_help = "Examples:\n  ovlsnap diff monday\n  ovlsnap diff monday tuesday --json")]
    Diff {
        /// The older snapshot.
        a: String,
        /// The newer snapshot (default: the live tree).
        b: Option<String>,
        /// Print JSON: {\"changes\": [...], \"examined\": N}; a path that is not UTF-8 is
        /// {\"bytes\": [...]} instead of a string.
        #[arg(long)]
        json: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Delete a snapshot, online. Any one: the oldest just loses its layer; another has its layer
    /// merged into the next older one, and every other snapshot stays as it was.
    #[command(after_help = "Example:\n  ovlsnap delete monday")]
    Delete {
        /// The snapshot.
        name: String,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Rename a snapshot. Its view, files open in it and kernel mounts of it go on.
    #[command(after_help = "Example:\n  ovlsnap rename 2026-12-06T10:00:00Z before-upgrade")]
    Rename {
        /// The snapshot.
        name: String,
        /// Its new name.
        to: String,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Set a snapshot's description and user properties (`KEY=VALUE`; `KEY=` removes one), as
    /// snapper's description and userdata; `list` shows them.
    #[command(after_help = "Examples:\n  ovlsnap set monday --description 'before the upgrade'\n  ovlsnap set monday \
                            ticket=OPS-42 owner=alice\n  ovlsnap set monday ticket= --no-description")]
    Set {
        /// The snapshot.
        name: String,
        /// Properties: KEY=VALUE (KEY: letters, digits, `_.:-`; KEY= removes it).
        properties: Vec<String>,
        /// Its new description.
        #[arg(short, long, conflicts_with = "no_description")]
        description: Option<String>,
        /// Remove its description.
        #[arg(long)]
        no_description: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Put hold TAG on snapshots, as `zfs hold`: a snapshot with any hold cannot be deleted (by
    /// hand or by a retention policy) until each is released.
    #[command(after_help = "Example:\n  ovlsnap hold keep-for-audit monday tuesday")]
    Hold {
        /// The hold's tag (any text without control characters, up to 200 bytes).
        tag: String,
        /// The snapshots.
        #[arg(required = true)]
        names: Vec<String>,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Release hold TAG of snapshots (`zfs release`).
    #[command(after_help = "Example:\n  ovlsnap release keep-for-audit monday")]
    Release {
        /// The hold's tag.
        tag: String,
        /// The snapshots.
        #[arg(required = true)]
        names: Vec<String>,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Take a timeline snapshot `auto-TIME` and delete the timeline snapshots the retention policy
    /// no longer keeps (as snapper's timeline and sanoid): run it from a timer
    /// (contrib/systemd/ovlsnap-auto@.timer). Each rule keeps the first snapshot of each of its
    /// last N hours, days, weeks (from Monday, UTC), months or years; the newest and held ones
    /// are always kept; snapshots with other names are never touched. Prints what it did.
    #[command(after_help = "Examples:
  ovlsnap auto --mount /data
  ovlsnap auto --hourly 48 --daily 14                             --weekly 8 --monthly 0
  ovlsnap auto --no-take --dry-run

The clock is                             OVLSNAP_NOW (seconds since the epoch) when set, for tests.")]
    Auto {
        /// Hours whose first snapshot is kept.
        #[arg(long, default_value_t = 24)]
        hourly: usize,
        /// Days whose first snapshot is kept.
        #[arg(long, default_value_t = 7)]
        daily: usize,
        /// Weeks whose first snapshot is kept.
        #[arg(long, default_value_t = 4)]
        weekly: usize,
        /// Months whose first snapshot is kept.
        #[arg(long, default_value_t = 12)]
        monthly: usize,
        /// Years whose first snapshot is kept.
        #[arg(long, default_value_t = 0)]
        yearly: usize,
        /// Only prune: take no snapshot.
        #[arg(long)]
        no_take: bool,
        /// Say what would be deleted, delete nothing (takes nothing either).
        #[arg(long)]
        dry_run: bool,
        /// Print JSON: {"took": NAME|null, "kept": [{"name", "why": [...]}], "deleted": [...],
        /// "failed": [{"name", "error"}]}.
        #[arg(long)]
        json: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Run CMD between two snapshots `pre-TIME` and `post-TIME` (as snapper's pre/post pairs
    /// around a package upgrade), then print what it changed; exits with CMD's status.
    #[command(after_help = "Example:
  ovlsnap run -- apt-get -y upgrade")]
    Run {
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<std::ffi::OsString>,
    },
    /// The holds of snapshots (default: of every held snapshot), one `NAME TAG` per line.
    #[command(after_help = "Examples:\n  ovlsnap holds\n  ovlsnap holds monday --json")]
    Holds {
        /// The snapshots.
        names: Vec<String>,
        /// Print JSON: [{\"name\": NAME, \"tags\": [TAG, ...]}, ...].
        #[arg(long)]
        json: bool,
        /// The mount, or a LIVE directory that is not mounted (its store is read directly).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Mount a writable copy of snapshot NAME's tree at DIR (an ovlfs overlay over the
    /// snapshot's view, changes kept in its own upper dir); the snapshot itself never changes.
    /// Unmount it with `umount DIR`.
    #[command(after_help = "Example:\n  ovlsnap clone monday /mnt/monday-test")]
    Clone {
        /// The snapshot.
        name: String,
        /// Where to mount the clone (an existing empty directory).
        dir: PathBuf,
        /// Where the clone keeps its changes (default: `.DIRNAME.clone` next to DIR); reused if
        /// it exists, so a clone can be mounted again.
        #[arg(long)]
        upper: Option<PathBuf>,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Stay in the foreground serving the clone.
        #[arg(short, long)]
        foreground: bool,
    },
    /// Write snapshot B to stdout as a tar stream in the OCI image layer format: the whole tree,
    /// or with --from A only what changed since A (whiteouts `.wh.NAME` for removals). Standard
    /// tools read it (`tar -tvf`); `ovlsnap receive` applies it. A snapshot holding a name that
    /// starts with `.wh.` (reserved by OCI for whiteouts) is refused.
    #[command(
        after_help = "Examples:\n  ovlsnap send monday > monday.tar\n  ovlsnap send --from monday tuesday > monday-tuesday.tar"
    )]
    Send {
        /// The snapshot to send.
        b: String,
        /// Send only the changes since this older snapshot.
        #[arg(long, conflicts_with = "oci_layout")]
        from: Option<String>,
        /// Write the snapshot's image (as `push` makes it) into OCI image layout DIR, under TAG
        /// (default `latest`), instead of a stream to stdout. When DIR's tag already holds an
        /// image of this LIVE's snapshots, only the new layers are added.
        #[arg(long, value_name = "DIR[:TAG]")]
        oci_layout: Option<String>,
        /// Layer compression for --oci-layout: gzip or zstd.
        #[arg(long, default_value = "gzip", requires = "oci_layout")]
        compression: snap_oci::Compression,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Publish snapshot NAME to an OCI registry as an image: a chain of layers from the snapshot
    /// the tag already holds (its whole tree first, then each step's changes) to NAME, so a
    /// later push uploads only its new layer. Credentials come from the auth file podman and
    /// docker use ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
    /// ~/.docker/config.json). Failed requests are retried; a rerun of a failed push uploads only
    /// what is missing.
    #[command(after_help = "Examples:
  ovlsnap push monday registry.example/backups/data:latest
  ovlsnap push --insecure monday 127.0.0.1:5000/data")]
    Push {
        /// The snapshot.
        name: String,
        /// Where: HOST[:PORT]/REPOSITORY[:TAG] (tag default `latest`).
        reference: String,
        /// Layer compression: gzip or zstd.
        #[arg(long, default_value = "gzip")]
        compression: snap_oci::Compression,
        /// Plain HTTP and unverified certificates (a registry on loopback or a lab).
        #[arg(long)]
        insecure: bool,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Fetch an image from an OCI registry into DIR, a new directory (any image of filesystem
    /// layers), or with --into as snapshots of a mounted LIVE (an image `ovlsnap push` made: the
    /// snapshots keep their names). Every blob is checked against its digest before anything
    /// changes; an interrupted pull resumes when run again.
    #[command(after_help = "Examples:
  ovlsnap pull registry.example/backups/data:latest /restore/data
  ovlsnap pull --into /data registry.example/backups/data:latest")]
    Pull {
        /// What: HOST[:PORT]/REPOSITORY[:TAG].
        reference: String,
        /// The new directory to build the tree in.
        #[arg(required_unless_present = "into", conflicts_with = "into")]
        dir: Option<PathBuf>,
        /// Add the image's snapshots to this mounted LIVE (empty, or holding an earlier pull of
        /// the same chain and unchanged since).
        #[arg(long, value_name = "MOUNT")]
        into: Option<PathBuf>,
        /// With --into: if LIVE changed since its newest snapshot (a pull cut off while applying,
        /// or local changes), restore that snapshot first. Those changes are lost.
        #[arg(long, requires = "into")]
        force: bool,
        /// Plain HTTP and unverified certificates (a registry on loopback or a lab).
        #[arg(long)]
        insecure: bool,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a stream from `ovlsnap send` (read from stdin) to directory TARGET. A truncated or
    /// corrupt stream is refused before TARGET is touched. The stream is staged in
    /// `.ovlsnap-receive.PID` next to TARGET; if a receive was killed, run it again: it finishes
    /// the job and removes the stage the killed one left.
    #[command(
        after_help = "Examples:\n  ovlsnap receive /backup/data < monday.tar\n  ovlsnap receive /backup/data < monday-tuesday.tar"
    )]
    Receive {
        /// The directory to apply the stream to (a plain directory or a snapshot mount).
        target: PathBuf,
    },
    /// Make the live tree exactly snapshot NAME's tree, online. Every snapshot survives: the
    /// restore's own changes are saved into the newest one like any other change.
    #[command(after_help = "Examples:\n  ovlsnap restore monday --dry-run\n  ovlsnap restore monday")]
    Restore {
        /// The snapshot.
        name: String,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Check a snapshot store offline: the snapshot list, each snapshot's layer, what an
    /// interrupted run left (journals, unowned layers, half-made copies), and every layer as the
    /// kernel reads it (whiteouts, redirects, origins, metacopy, overlay xattrs). Each finding has
    /// a path and a severity: error, warning or fixable. A store a daemon serves is checked
    /// read-only while it runs (findings may be transient); --repair needs it unmounted.
    #[command(after_help = "Examples:\n  ovlsnap check /data\n  ovlsnap check /data --repair\n  ovlsnap check \
                            --mount /data --json\n\nExit status: 0 no errors (warnings and fixable findings allowed), \
                            1 errors remain, 2 bad usage.")]
    Check {
        /// LIVE, the directory whose store to check (default: the mount containing the current
        /// directory, as for the other commands).
        #[arg(conflicts_with = "mount")]
        live: Option<PathBuf>,
        /// A snapshot mount (checked through its daemon), or a LIVE directory that is not mounted.
        #[arg(long)]
        mount: Option<PathBuf>,
        /// The store, when it is not the default LIVE/.ovlsnap.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Settle and remove what is fixable, as the next mount would, then check again.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The snapshot names of the mount containing the current directory (or `--mount`), one per
    /// line, for shell completion; nothing (and exit 0) outside a mount.
    #[command(hide = true)]
    CompleteNames {
        /// The mount.
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Write shell completions and man pages into DIR (used by `cargo xtask dist`).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory.
        dir: PathBuf,
    },
    /// Let a user or the members of a group change this mount's snapshots, as `zfs allow` does;
    /// without arguments, list who may. Only root and the owner of LIVE may grant; they and root
    /// may always do everything. Reads (list, diff, status, mount-cmd) need no grant: whoever can
    /// read LIVE's root may, and diff shows only names its caller could list in the trees.
    #[command(
        after_help = "Examples:\n  ovlsnap allow alice take,delete\n  ovlsnap allow @backup all\n  ovlsnap allow \
                            --list --json\n\nPermissions: take, delete, restore, clone, rename, hold (all: every one)."
    )]
    Allow {
        /// USER or @GROUP, by name or number.
        #[arg(requires = "perms", conflicts_with = "list")]
        who: Option<String>,
        /// Comma-separated permissions.
        perms: Option<String>,
        /// List the grants (also what `ovlsnap allow` alone does).
        #[arg(long)]
        list: bool,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Take back permissions given with `allow` (all of USER's or @GROUP's without PERMS).
    #[command(after_help = "Examples:\n  ovlsnap unallow alice delete\n  ovlsnap unallow @backup")]
    Unallow {
        /// USER or @GROUP, by name or number.
        who: String,
        /// Comma-separated permissions; all when left out.
        perms: Option<String>,
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Who serves a mount: daemon pid, LIVE, store.
    Status {
        /// The mount (default: the one containing the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(cli.cmd, Cmd::Mount { foreground: true, .. } | Cmd::Clone { foreground: true, .. });
    if !daemon {
        sys::default_sigpipe();
    }
    if let Cmd::Check { live, mount, store, repair, json } = cli.cmd {
        let target = match live.or(mount) {
            Some(t) => t,
            None => match resolve_mount(None) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("ovlsnap check: {e:#} (or name LIVE)");
                    return ExitCode::from(2);
                }
            },
        };
        return check(target, store, repair, json);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ovlsnap: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Mount { live, mnt, store, foreground } => {
            let cfg = daemon::Config { mount: mnt.unwrap_or_else(|| live.clone()), live, store };
            if foreground { serve(&cfg) } else { spawn_background(&cfg) }
        }
        Cmd::Umount { mnt } => umount(&resolve_mount(mnt)?),
        Cmd::Take { name, description, mount } => {
            let mnt = resolve_mount(mount)?;
            // Dirty pages of shared writable mappings reach the daemon only as writes at
            // writeback: flush them so they land before the snapshot's instant.
            if let Ok(f) = std::fs::File::open(&mnt) {
                let _ = rustix::fs::syncfs(&f);
            }
            let v = control::call(&mnt, &Request::Take { name, description })?;
            let name = v.get("name").and_then(|n| n.as_str()).context("the daemon's answer has no name")?;
            say!("{name}");
            Ok(())
        }
        Cmd::List { names, json, columns, no_header, mount } => {
            if columns.is_empty() {
                list(mount, &names, json)
            } else {
                list_columns(mount, &names, &columns, no_header)
            }
        }
        Cmd::MountCmd { name, dir, mount } => {
            let mnt = resolve_mount(mount)?;
            let dir = std::path::absolute(&dir)?;
            let layers = view_mount::fetch(&mnt, &name, true)?;
            say!("{}", view_mount::mount_cmd(&layers, &dir)?);
            Ok(())
        }
        Cmd::MountView { name, dir, mount } => {
            let mnt = resolve_mount(mount)?;
            let dir = std::path::absolute(&dir)?;
            view_mount::mount_view(&view_mount::fetch(&mnt, &name, false)?, &dir)
        }
        Cmd::Diff { a, b, json, mount } => {
            let mnt = resolve_mount(mount)?;
            let v = control::call(&mnt, &Request::Diff { a, b })?;
            if json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let report: snap_fs::diff::Report = serde_json::from_value(v)?;
                for c in &report.changes {
                    say!("{}", snap_fs::diff::show(c));
                }
            }
            Ok(())
        }
        Cmd::Delete { name, mount } => {
            let mnt = resolve_mount(mount)?;
            let spinner = spinner(&format!("deleting {name}"));
            let out = control::call(&mnt, &Request::Delete { name: name.clone() });
            spinner.finish_and_clear();
            if let Err(e) = out {
                // A clone holds its snapshot's view open: name it (issue 21).
                let clones = clones_of(&mnt, &name);
                if clones.is_empty() {
                    return Err(e);
                }
                let at: Vec<String> = clones.iter().map(|c| c.display().to_string()).collect();
                bail!("{e:#}: the clone mounted at {} uses it (`umount {}` first)", at.join(", "), at[0]);
            }
            say!("deleted {name}");
            Ok(())
        }
        Cmd::Rename { name, to, mount } => {
            let mnt = resolve_mount(mount)?;
            control::call(&mnt, &Request::Rename { name: name.clone(), to: to.clone() })?;
            say!("renamed {name} to {to}");
            Ok(())
        }
        Cmd::Auto { hourly, daily, weekly, monthly, yearly, no_take, dry_run, json, mount } => {
            let policy = snap_fs::retention::Policy { hourly, daily, weekly, monthly, yearly };
            auto(&policy, !(no_take || dry_run), dry_run, json, mount)
        }
        Cmd::Run { mount, cmd } => run_between(mount, &cmd),
        Cmd::Set { name, properties, description, no_description, mount } => {
            let mut props = Vec::new();
            for p in &properties {
                let (k, v) = p.split_once('=').with_context(|| format!("{p:?} is not KEY=VALUE"))?;
                props.push((k.to_string(), (!v.is_empty()).then(|| v.to_string())));
            }
            if props.is_empty() && description.is_none() && !no_description {
                bail!("nothing to set: give KEY=VALUE, --description or --no-description");
            }
            let mnt = resolve_mount(mount)?;
            control::call(&mnt, &Request::Set { name: name.clone(), description, no_description, properties: props })?;
            say!("set {name}");
            Ok(())
        }
        Cmd::Hold { tag, names, mount } => set_holds(&tag, &names, mount, false),
        Cmd::Release { tag, names, mount } => set_holds(&tag, &names, mount, true),
        Cmd::Holds { names, json, mount } => {
            let items = listed(mount)?;
            for n in &names {
                if !items.iter().any(|l| &l.name == n) {
                    bail!("no snapshot named {n:?}");
                }
            }
            let wanted = |l: &&Listed| if names.is_empty() { !l.holds.is_empty() } else { names.contains(&l.name) };
            let held: Vec<&Listed> = items.iter().filter(wanted).collect();
            if json {
                let out: Vec<_> = held.iter().map(|l| serde_json::json!({"name": l.name, "tags": l.holds})).collect();
                say!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for l in held {
                    for t in &l.holds {
                        say!("{} {t}", l.name);
                    }
                }
            }
            Ok(())
        }
        Cmd::Clone { name, dir, upper, mount, foreground } => clone(&name, &dir, upper, mount, foreground),
        Cmd::Send { b, oci_layout: Some(layout), compression, mount, .. } => {
            let mnt = resolve_mount(mount)?;
            let (dir, tag) = match layout.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d.to_string(), t.to_string()),
                _ => (layout.clone(), "latest".to_string()),
            };
            let dest = snap_oci::layout::Layout::open(Path::new(&dir), &tag)?;
            let src = snap_oci::source::Source::open(&mnt)?;
            let ui = oci_ui();
            let r = snap_oci::publish::publish(&src, &b, &dest, compression, &ui)?;
            drop(ui);
            eprintln!(
                "wrote {b} to {dir}:{tag}: {} layer(s) ({}), {} new, {} already there; manifest {}",
                r.chain.len(),
                r.chain.join(" > "),
                r.stored.len(),
                r.present.len(),
                r.digest
            );
            Ok(())
        }
        Cmd::Send { b, from, mount, .. } => {
            let mnt = resolve_mount(mount)?;
            let view = mnt.join(snap_fs::SNAPDIR_NAME).join(&b);
            if !view.is_dir() {
                bail!("no snapshot named {b:?} on {}", mnt.display());
            }
            let changes = match from {
                Some(a) => {
                    let report: snap_fs::diff::Report =
                        serde_json::from_value(control::call(&mnt, &Request::Diff { a, b: Some(b.clone()) })?)?;
                    Some(report.changes)
                }
                None => None,
            };
            let bar = spinner(&format!("sending {b}"));
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            let n = snap_fs::stream::send(&view, changes.as_deref(), out, &|| bar.tick())?;
            bar.finish_and_clear();
            eprintln!("sent {n} entries of {b}");
            Ok(())
        }
        Cmd::Push { name, reference, compression, insecure, json, mount } => {
            let mnt = resolve_mount(mount)?;
            let src = snap_oci::source::Source::open(&mnt)?;
            src.find(&name)?;
            let remote = snap_oci::registry::Remote::open(&reference, insecure)?;
            remote.login(snap_oci::RegistryOperation::Push)?;
            let scratch_root = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
            let scratch = tempfile_dir(&scratch_root, "ovlsnap-push")?;
            let dest = snap_oci::publish::ToRegistry { remote: &remote, scratch: scratch.clone() };
            let ui = oci_ui();
            let r = snap_oci::publish::publish(&src, &name, &dest, compression, &ui);
            let _ = std::fs::remove_dir_all(&scratch);
            let r = r?;
            drop(ui);
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let bytes: u64 = r.stored.iter().map(|(_, n)| n).sum();
                say!(
                    "pushed {name} to {}: {} layer(s) ({}), {} uploaded ({}), {} already there; manifest {}",
                    remote.reference(),
                    r.chain.len(),
                    r.chain.join(" > "),
                    r.stored.len(),
                    human(bytes),
                    r.present.len(),
                    r.digest
                );
            }
            Ok(())
        }
        Cmd::Pull { reference, dir, into, force, insecure, json } => {
            let remote = snap_oci::registry::Remote::open(&reference, insecure)?;
            let ui = oci_ui();
            let r = match (dir, into) {
                (_, Some(mount)) => {
                    let mnt = resolve_mount(Some(mount))?;
                    let roll_back = |name: &str| {
                        delegation::authorize(&mnt, Perm::Restore)?;
                        restore(&mnt, name, false, true)
                    };
                    snap_oci::pull::into_live(
                        &remote,
                        &mnt,
                        &ui,
                        force.then_some(&roll_back as &snap_oci::pull::RollBack),
                    )?
                }
                (Some(dir), None) => snap_oci::pull::into_tree(&remote, &dir, &ui)?,
                (None, None) => bail!("pull needs DIR or --into MOUNT"),
            };
            drop(ui);
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else if r.snapshots.is_empty() {
                say!("pulled {} ({} layer(s))", remote.reference(), r.layers);
            } else {
                say!("pulled {}: took {}", remote.reference(), r.snapshots.join(", "));
            }
            Ok(())
        }
        Cmd::Receive { target } => {
            let bar = spinner(&format!("receiving into {}", target.display()));
            let n = snap_fs::stream::receive(&target, std::io::stdin().lock(), &|| bar.tick())?;
            bar.finish_and_clear();
            eprintln!("received {n} entries into {}", target.display());
            Ok(())
        }
        Cmd::Restore { name, dry_run, mount } => {
            let mnt = resolve_mount(mount)?;
            if !dry_run {
                delegation::authorize(&mnt, Perm::Restore)?;
            }
            restore(&mnt, &name, dry_run, false)
        }
        Cmd::Check { .. } => unreachable!("handled in main, for its exit code"),
        Cmd::GenerateDocs { dir } => generate_docs(&dir),
        Cmd::CompleteNames { mount } => {
            // Quiet: a completion must never print an error into the user's command line.
            if let Ok(items) = resolve_mount(mount).and_then(|mnt| listed(Some(mnt))) {
                for l in items {
                    say!("{}", l.name);
                }
            }
            Ok(())
        }
        Cmd::Allow { who, perms, list: _, json, mount } => {
            let mnt = resolve_mount(mount)?;
            match (who, perms) {
                (Some(who), Some(perms)) => delegation::allow(&mnt, &who, &perms),
                _ => delegation::list(&mnt, json),
            }
        }
        Cmd::Unallow { who, perms, mount } => delegation::unallow(&resolve_mount(mount)?, &who, perms.as_deref()),
        Cmd::Status { mount, json } => {
            let mnt = resolve_mount(mount)?;
            let v = control::call(&mnt, &Request::Status)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: Status = serde_json::from_value(v)?;
                use std::os::unix::ffi::OsStrExt;
                let esc = |p: &Path| snap_fs::names::escape(p.as_os_str().as_bytes());
                say!("mount  {}\nlive   {}\nstore  {}\npid    {}", esc(&s.mount), esc(&s.live), esc(&s.store), s.pid);
            }
            Ok(())
        }
    }
}

/// The snapshot mount to talk to: the one given (which must be an ovlsnap mount), or the one
/// containing the current directory.
fn resolve_mount(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => {
            let c = std::fs::canonicalize(&p).with_context(|| format!("{p:?}: no such directory"))?;
            if !daemon::mounts_of_type(daemon::FSTYPE)?.contains(&c) {
                bail!("no ovlsnap daemon on {}: run `ovlsnap mount {}`", c.display(), c.display());
            }
            Ok(c)
        }
        None => {
            let cwd = std::env::current_dir()?;
            daemon::mount_containing(&cwd)?.with_context(|| {
                format!(
                    "{} is not inside an ovlsnap mount: pass --mount MNT, or run `ovlsnap mount DIR`",
                    cwd.display()
                )
            })
        }
    }
}

/// The clock of `auto` and `run`: `OVLSNAP_NOW` (seconds since the epoch) when set, for tests
/// that run weeks of a schedule in seconds.
fn now_secs() -> anyhow::Result<u64> {
    match std::env::var("OVLSNAP_NOW") {
        Ok(v) => v.trim().parse().with_context(|| format!("OVLSNAP_NOW={v:?} is not a number of seconds")),
        Err(_) => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()),
    }
}

/// Takes snapshot `base` (or `base-2`, `base-3`... if the name is taken); returns its name.
fn take_named(mnt: &Path, base: &str, taken: &[Listed]) -> anyhow::Result<String> {
    let mut name = base.to_string();
    let mut n = 2;
    while taken.iter().any(|l| l.name == name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    if let Ok(f) = std::fs::File::open(mnt) {
        let _ = rustix::fs::syncfs(&f);
    }
    control::call(mnt, &Request::Take { name: Some(name.clone()), description: None })?;
    Ok(name)
}

/// `ovlsnap auto`: a timeline snapshot, then the deletions `policy` asks for.
fn auto(
    policy: &snap_fs::retention::Policy,
    take: bool,
    dry_run: bool,
    json: bool,
    mount: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mnt = resolve_mount(mount)?;
    let took = if take {
        let before = listed(Some(mnt.clone()))?;
        let name = take_named(&mnt, &snap_fs::retention::name_at(now_secs()?), &before)?;
        if !json {
            say!("took {name}");
        }
        Some(name)
    } else {
        None
    };
    let items = listed(Some(mnt.clone()))?;
    let snaps: Vec<(String, bool)> = items.iter().map(|l| (l.name.clone(), !l.holds.is_empty())).collect();
    let plan = snap_fs::retention::plan(&snaps, policy);
    let (mut deleted, mut failed) = (Vec::new(), Vec::new());
    for name in &plan.delete {
        if dry_run {
            if !json {
                say!("would delete {name}");
            }
            continue;
        }
        match control::call(&mnt, &Request::Delete { name: name.clone() }) {
            Ok(_) => {
                if !json {
                    say!("deleted {name}");
                }
                deleted.push(name.clone());
            }
            // One that cannot go now (open, mounted) goes at a later run.
            Err(e) => {
                eprintln!("ovlsnap auto: {name} not deleted: {e:#}");
                failed.push(serde_json::json!({"name": name, "error": format!("{e:#}")}));
            }
        }
    }
    if json {
        let kept: Vec<_> = plan.keep.iter().map(|(n, why)| serde_json::json!({"name": n, "why": why})).collect();
        let would = if dry_run { plan.delete.clone() } else { Vec::new() };
        let out = serde_json::json!({"took": took, "kept": kept, "deleted": deleted, "would_delete": would, "failed": failed});
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        say!("kept {} timeline snapshot(s), deleted {}", plan.keep.len(), deleted.len());
    }
    if !failed.is_empty() {
        bail!("{} timeline snapshot(s) could not be deleted now; a later run retries", failed.len());
    }
    Ok(())
}

/// `ovlsnap run -- CMD`: `pre-TIME`, CMD, `post-TIME`, the diff; CMD's exit status.
fn run_between(mount: Option<PathBuf>, cmd: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let mnt = resolve_mount(mount)?;
    let stamp = snap_fs::snapper::rfc3339(now_secs()?);
    let taken = listed(Some(mnt.clone()))?;
    let pre = take_named(&mnt, &format!("pre-{stamp}"), &taken)?;
    eprintln!("ovlsnap: took {pre}; running {}", cmd[0].to_string_lossy());
    let status = std::process::Command::new(&cmd[0]).args(&cmd[1..]).status();
    // The pair is made whatever CMD did: its changes so far are what the diff shows.
    let taken = listed(Some(mnt.clone()))?;
    let post = take_named(&mnt, &format!("post-{stamp}"), &taken)?;
    eprintln!("ovlsnap: took {post}; changes from {pre} to {post}:");
    let report: snap_fs::diff::Report =
        serde_json::from_value(control::call(&mnt, &Request::Diff { a: pre.clone(), b: Some(post.clone()) })?)?;
    for c in &report.changes {
        say!("{}", snap_fs::diff::show(c));
    }
    let status = status.with_context(|| format!("running {:?}", cmd[0]))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => std::process::exit(code),
        None => bail!("{:?} was killed ({status})", cmd[0]),
    }
}

/// Puts hold `tag` on each of `names` (or releases it), in order; stops at the first failure.
fn set_holds(tag: &str, names: &[String], mount: Option<PathBuf>, release: bool) -> anyhow::Result<()> {
    let mnt = resolve_mount(mount)?;
    for (i, name) in names.iter().enumerate() {
        let req = Request::Hold { name: name.clone(), tag: tag.to_string(), release };
        if let Err(e) = control::call(&mnt, &req) {
            let done = &names[..i];
            if done.is_empty() {
                return Err(e);
            }
            bail!("{e:#} (done before it: {})", done.join(", "));
        }
        say!("{} {name} {tag}", if release { "released" } else { "held" });
    }
    Ok(())
}

/// The columns `list -o` knows.
const LIST_COLUMNS: [&str; 11] =
    ["id", "name", "created", "layer", "used", "refer", "shared", "entries", "state", "holds", "description"];

/// `list -o COLUMNS`: the columns asked for, aligned, as `zfs list -o` prints them.
fn list_columns(mount: Option<PathBuf>, names: &[String], columns: &[String], no_header: bool) -> anyhow::Result<()> {
    if let Some(bad) = columns.iter().find(|c| !LIST_COLUMNS.contains(&c.as_str())) {
        bail!("no column {bad:?} (known: {})", LIST_COLUMNS.join(", "));
    }
    let items = listed_some(mount, names)?;
    let cell = |l: &Listed, c: &str| -> String {
        match c {
            "id" => l.id.to_string(),
            "name" => l.name.clone(),
            "created" => l.created.clone(),
            "layer" => human(l.layer_bytes),
            "used" => l.freed_bytes.map_or_else(|| "-".to_string(), human),
            "refer" => l.refer_bytes.map_or_else(|| "-".to_string(), human),
            "shared" => l.shared_bytes.map_or_else(|| "-".to_string(), human),
            "entries" => l.entries.to_string(),
            "state" => match &l.damage {
                None => "ok".into(),
                Some(d) if d.unverified => "UNVERIFIED".into(),
                Some(_) => "CHANGED".into(),
            },
            "holds" => {
                if l.holds.is_empty() {
                    "-".into()
                } else {
                    l.holds.join(",")
                }
            }
            _ => l.description.clone().unwrap_or_else(|| "-".into()),
        }
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    if !no_header {
        rows.push(columns.iter().map(|c| c.to_uppercase()).collect());
    }
    rows.extend(items.iter().map(|l| columns.iter().map(|c| cell(l, c)).collect()));
    if no_header {
        for r in rows {
            say!("{}", r.join("\t"));
        }
        return Ok(());
    }
    let widths: Vec<usize> =
        (0..columns.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let numeric = |c: &str| matches!(c, "id" | "layer" | "used" | "refer" | "shared" | "entries");
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(columns)
            .zip(&widths)
            .map(|((v, c), w)| if numeric(c) { format!("{v:>w$}") } else { format!("{v:<w$}") })
            .collect();
        say!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

fn list(mount: Option<PathBuf>, names: &[String], json: bool) -> anyhow::Result<()> {
    let items = listed_some(mount, names)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    say!(
        "{:<4} {:<28} {:<21} {:>10} {:>10} {:>10} {:>8}  {}",
        "ID",
        "NAME",
        "CREATED",
        "LAYER",
        "USED",
        "REFER",
        "ENTRIES",
        "STATE"
    );
    let mut damaged = 0;
    for l in &items {
        // A snapshot LIVE changed behind the daemon's back is never shown as if intact.
        let state = match &l.damage {
            None => "ok",
            Some(d) if d.unverified => "UNVERIFIED",
            Some(_) => "CHANGED",
        };
        let held = if l.holds.is_empty() { String::new() } else { format!(", held ({})", l.holds.len()) };
        let about = match (&l.description, l.properties.is_empty()) {
            (None, true) => String::new(),
            (d, _) => {
                let props = l.properties.iter().map(|(k, v)| format!("{k}={v}"));
                let words: Vec<String> = d.iter().map(|d| format!("{d:?}")).chain(props).collect();
                format!("  {}", words.join(" "))
            }
        };
        damaged += usize::from(l.damage.is_some());
        let used = l.freed_bytes.map_or_else(|| "-".to_string(), human);
        let refer = l.refer_bytes.map_or_else(|| "-".to_string(), human);
        say!(
            "{:<4} {:<28} {:<21} {:>10} {:>10} {:>10} {:>8}  {state}{held}{about}",
            l.id,
            l.name,
            l.created,
            human(l.layer_bytes),
            used,
            refer,
            l.entries
        );
    }
    if !items.is_empty() {
        let held: u64 = items.iter().map(|l| l.layer_bytes).sum();
        say!("{} snapshot(s); their layers hold {}", items.len(), human(held));
    }
    list_footer(damaged)
}

/// The snapshots of the mount `mount` (default: the one containing the current directory), or
/// of an unmounted LIVE's store.
fn listed(mount: Option<PathBuf>) -> anyhow::Result<Vec<Listed>> {
    listed_some(mount, &[])
}

/// [`listed`], only the snapshots `names` (all when empty), in list order.
fn listed_some(mount: Option<PathBuf>, names: &[String]) -> anyhow::Result<Vec<Listed>> {
    let mounted = match &mount {
        Some(p) => {
            let c = std::fs::canonicalize(p).with_context(|| format!("{p:?}: no such directory"))?;
            daemon::mounts_of_type(daemon::FSTYPE)?.contains(&c).then_some(c)
        }
        None => Some(resolve_mount(None)?),
    };
    let items: Vec<Listed> = match mounted {
        Some(mnt) if names.is_empty() => control::call_as(&mnt, &Request::List)?,
        Some(mnt) => control::call_as(&mnt, &Request::ListSome { names: names.to_vec() })?,
        None => {
            // Not mounted: read the store of that LIVE directly.
            let live = mount.expect("checked above");
            let store = live.join(snap_fs::store::DEFAULT_NAME);
            let fd = rustix::fs::open(
                &store,
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                rustix::fs::Mode::empty(),
            )
            .with_context(|| format!("no ovlsnap daemon on {} and no store at {}", live.display(), store.display()))?;
            let all = snap_fs::store::list_offline(&fd)?;
            if let Some(missing) = names.iter().find(|n| !all.iter().any(|l| &l.name == *n)) {
                bail!("no snapshot named {missing:?}");
            }
            all.into_iter().filter(|l| names.is_empty() || names.contains(&l.name)).collect()
        }
    };
    Ok(items)
}

/// What `list` says after its table.
fn list_footer(damaged: usize) -> anyhow::Result<()> {
    if damaged > 0 {
        eprintln!(
            "ovlsnap: {damaged} snapshot(s) are not as taken: LIVE was changed while no daemon served it; `ovlsnap \
             check` names what (reads of those paths in their views fail with EIO)"
        );
    }
    Ok(())
}

/// `ovlsnap check`: LIVE (or a mount over it) and its store; exit 0 without errors, 1 with.
fn check(live: PathBuf, store: Option<PathBuf>, repair: bool, json: bool) -> ExitCode {
    // Every layer is walked: a while on a big store.
    let bar = spinner(&format!("{} {}", if repair { "checking and repairing" } else { "checking" }, live.display()));
    let checked = snap_fs::check::check_store(&live, store.as_deref(), repair);
    bar.finish_and_clear();
    match checked {
        Ok(report) => {
            use std::io::Write as _;
            if let Err(e) = write!(std::io::stdout().lock(), "{}", report.render(json)) {
                eprintln!("ovlsnap check: writing to stdout: {e}");
                return ExitCode::from(1);
            }
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("ovlsnap check: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Replays the differences from snapshot `name` to LIVE through the mount until there are none.
/// Makes LIVE snapshot `name`'s tree; `to_stderr`: what was done is said on stderr (stdout
/// carries another command's answer).
fn restore(mnt: &Path, name: &str, dry_run: bool, to_stderr: bool) -> anyhow::Result<()> {
    use snap_fs::diff::{Change, Report};
    use snap_fs::restore::shown;
    let view = mnt.join(snap_fs::SNAPDIR_NAME).join(name);
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let report: Report =
            serde_json::from_value(control::call(mnt, &Request::Diff { a: name.to_string(), b: None })?)?;
        if report.changes.is_empty() {
            let done = if round == 0 {
                format!("{} already equals snapshot {name}", mnt.display())
            } else {
                format!("restored {} to snapshot {name}", mnt.display())
            };
            if to_stderr {
                eprintln!("{done}");
            } else {
                say!("{done}");
            }
            return Ok(());
        }
        if dry_run {
            for c in &report.changes {
                match c {
                    Change::Added { path, .. } => say!("remove   {}", shown(path)),
                    Change::Deleted { path, .. } => say!("restore  {}", shown(path)),
                    Change::Modified { path, .. } => say!("replace  {}", shown(path)),
                    Change::Renamed { path, to } => say!("move     {} back to {}", shown(to), shown(path)),
                }
            }
            return Ok(());
        }
        let bar = progress(report.changes.len() as u64, &format!("restoring {name}"));
        snap_fs::restore::apply(mnt, &view, &report.changes, &|_| bar.inc(1))?;
        // (Left on the terminal, finished: what was restored, how many.)
        bar.finish();
    }
    bail!(
        "{} still differs from snapshot {name} after {ROUNDS} rounds (is something changing it meanwhile?)",
        mnt.display()
    )
}

/// A progress bar on stderr when it is a terminal, else nothing.
fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Mounts a writable ovlfs overlay of snapshot `name`'s view at `dir`.
fn clone(
    name: &str,
    dir: &Path,
    upper: Option<PathBuf>,
    mount: Option<PathBuf>,
    foreground: bool,
) -> anyhow::Result<()> {
    let mnt = resolve_mount(mount)?;
    delegation::authorize(&mnt, Perm::Clone)?;
    let view = mnt.join(snap_fs::SNAPDIR_NAME).join(name);
    if !view.is_dir() {
        bail!("no snapshot named {name:?} on {}", mnt.display());
    }
    let dir = std::path::absolute(dir)?;
    let base = match upper {
        Some(u) => std::path::absolute(u)?,
        None => {
            let leaf = dir.file_name().context("DIR has no name")?.to_string_lossy().into_owned();
            dir.with_file_name(format!(".{leaf}.clone"))
        }
    };
    // Beside DIR in a shared directory another user could have made it first, with an upper
    // layer of theirs that would then show their files in the clone and receive its writes.
    if let Some(parent) = base.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    snap_fs::access::private_dir(&base, "a clone will not keep its upper layer there; remove it or give --upper")?;
    let (up, work) = (base.join("upper"), base.join("work"));
    if !up.exists() {
        std::fs::create_dir(&up).with_context(|| format!("creating {}", up.display()))?;
        // The overlay shows the upper root's own owner, mode and xattrs for the root.
        snap_fs::restore::copy_metadata(&view, &up)?;
    }
    if !work.exists() {
        std::fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    }
    let opts = format!("lowerdir={},upperdir={},workdir={}", esc(&view), esc(&up), esc(&work));
    if !foreground {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(["clone", "--foreground", "--mount"]).arg(&mnt).arg("--upper").arg(&base).arg(name).arg(&dir);
        let bar = spinner(&format!("mounting a clone of {name} at {}", dir.display()));
        let ready = wait_ready(cmd);
        bar.finish_and_clear();
        return ready;
    }
    init_logs();
    rustix::process::umask(rustix::fs::Mode::empty());
    let options = ovl_core::MountOptions::parse(&opts)?;
    let m = ovl_fs::mount::Mount::new(&options, &dir, &clone_source(&mnt, name))?;
    unmount_on_signal(dir.clone())?;
    notify_ready();
    m.run()
}

/// The mount source of a clone of snapshot `name` of the mount `mnt` (what mountinfo shows).
fn clone_source(mnt: &Path, name: &str) -> String {
    format!("ovlsnap-clone:{name}@{}", mnt.display())
}

/// The mount points of the clones of snapshot `name` of the mount `mnt`.
fn clones_of(mnt: &Path, name: &str) -> Vec<PathBuf> {
    let want = clone_source(mnt, name);
    let Ok(info) = ovl_fs::mount::read_mountinfo() else { return Vec::new() };
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let source = right.split(' ').nth(1)?;
            let point = left.split(' ').nth(4)?;
            (ovl_fs::mount::unescape_mountinfo(source).as_os_str() == std::ffi::OsStr::new(&want))
                .then(|| ovl_fs::mount::unescape_mountinfo(point))
        })
        .collect()
}

/// Escapes a path for a `lowerdir=`-style option list.
fn esc(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\").replace(',', "\\,").replace(':', "\\:")
}

/// Shell completions (bash, zsh, fish) and a man page per command into `dir`.
fn generate_docs(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let completions = dir.join("completions");
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "ovlsnap", &completions)?;
    }
    // Snapshot names where a command takes one (clap knows only the options).
    let bash = completions.join("ovlsnap.bash");
    let mut script = std::fs::read_to_string(&bash)?;
    script.push_str(BASH_NAMES);
    std::fs::write(&bash, script)?;
    let zsh = completions.join("_ovlsnap");
    let script = zsh_with_names(&std::fs::read_to_string(&zsh)?)?;
    std::fs::write(&zsh, script)?;
    let fish = completions.join("ovlsnap.fish");
    let mut script = std::fs::read_to_string(&fish)?;
    script.push_str(FISH_NAMES);
    std::fs::write(&fish, script)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, &man)?;
    // What clap does not know: appended to the main page.
    let main = man.join("ovlsnap.1");
    let mut page = std::fs::read_to_string(&main)?;
    page.push_str(MAN_SECTIONS);
    std::fs::write(&main, page)?;
    say!("wrote {} and {}", completions.display(), man.display());
    Ok(())
}

/// Completes snapshot names (from `ovlsnap complete-names`, for the mount of the current
/// directory or the `--mount` given) where a command takes one; everything else as clap's
/// completion does.
const BASH_NAMES: &str = r#"
# Snapshot names, asked of the mount (`ovlsnap complete-names`).
_ovlsnap_snapshot_names() {
    local cur="${COMP_WORDS[COMP_CWORD]}" sub="" i w mount="" positional=0 names=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if [[ "$w" == --mount ]]; then mount="${COMP_WORDS[i + 1]}"; ((i++)); continue; fi
        [[ "$w" == -* ]] && continue
        if [[ -z "$sub" ]]; then sub="$w"; else ((positional++)); fi
    done
    case "$sub" in
        delete|restore|rename|set|mount-cmd|mount-view|clone|push) ((positional == 0)) && names=1 ;;
        diff) ((positional < 2)) && names=1 ;;
        send) names=1 ;;
        hold|release) ((positional >= 1)) && names=1 ;;
        holds) names=1 ;;
    esac
    if ((names)) && [[ "$cur" != -* ]]; then
        local args=(complete-names) n
        [[ -n "$mount" ]] && args+=(--mount "$mount")
        COMPREPLY=()
        while IFS= read -r n; do
            [[ "$n" == "$cur"* ]] && COMPREPLY+=("$n")
        done < <(ovlsnap "${args[@]}" 2>/dev/null)
        return 0
    fi
    _ovlsnap "$@"
}
complete -F _ovlsnap_snapshot_names -o bashdefault -o default ovlsnap
"#;

/// The arguments that take a snapshot name, by command (clap's ids).
const SNAPSHOT_ARGS: [(&str, &[&str]); 13] = [
    ("delete", &["name"]),
    ("restore", &["name"]),
    ("rename", &["name"]),
    ("set", &["name"]),
    ("mount-cmd", &["name"]),
    ("mount-view", &["name"]),
    ("clone", &["name"]),
    ("diff", &["a", "b"]),
    ("send", &["b", "from"]),
    ("push", &["name"]),
    ("hold", &["names"]),
    ("release", &["names"]),
    ("holds", &["names"]),
];

/// clap's zsh completion with the snapshot names of the mount (`ovlsnap complete-names`, with the
/// `--mount` on the line) where [`SNAPSHOT_ARGS`] take one: each such argument's action becomes
/// `_ovlsnap_snapshot_names`. An error if one is not found (clap's output changed).
fn zsh_with_names(script: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(script.len() + ZSH_NAMES.len());
    let mut section = "";
    let mut done = std::collections::BTreeSet::new();
    for line in script.lines() {
        if let Some(name) = line.strip_prefix('(').and_then(|l| l.strip_suffix(')')) {
            section = name;
        }
        let ids = SNAPSHOT_ARGS.iter().find(|(c, _)| *c == section).map_or(&[][..], |(_, ids)| ids);
        let arg = line.trim_start_matches(['\'', '*', ':']);
        // An option that excludes others starts with their group: `(--oci-layout)--from=[...`.
        let arg = arg.strip_prefix('(').and_then(|a| a.split_once(')')).map_or(arg, |(_, rest)| rest);
        let named =
            ids.iter().find(|id| arg.starts_with(&format!("{id} -- ")) || arg.starts_with(&format!("--{id}=[")));
        match (named, line.strip_suffix(":_default' \\")) {
            (Some(id), Some(head)) => {
                out.push_str(&format!("{head}:_ovlsnap_snapshot_names' \\\n"));
                done.insert((section.to_string(), id.to_string()));
            }
            _ => {
                if line.starts_with("if [ \"$funcstack[1]\" = \"_ovlsnap\" ]") {
                    out.push_str(ZSH_NAMES);
                }
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (c, ids) in SNAPSHOT_ARGS {
        if let Some(id) = ids.iter().find(|id| !done.contains(&(c.to_string(), id.to_string()))) {
            anyhow::bail!("the zsh completion has no argument {id:?} of {c:?} to complete snapshot names for");
        }
    }
    if !out.contains(ZSH_NAMES) {
        anyhow::bail!("the zsh completion has no end to put the snapshot names before");
    }
    Ok(out)
}

/// zsh: the snapshot names of the mount of the current directory, or of the `--mount` given.
const ZSH_NAMES: &str = r#"(( $+functions[_ovlsnap_snapshot_names] )) ||
_ovlsnap_snapshot_names() {
    local -a args names
    local i
    args=(complete-names)
    for ((i = 1; i < CURRENT; i++)); do
        case ${words[i]} in
            --mount) args+=(--mount "${words[i + 1]}") ;;
            --mount=*) args+=(--mount "${words[i]#--mount=}") ;;
        esac
    done
    names=("${(@f)$(ovlsnap "${args[@]}" 2>/dev/null)}")
    names=(${names:#})
    compadd -a names
}

"#;

/// Snapshot names for fish, after the commands that take one.
const FISH_NAMES: &str = r#"
# Snapshot names, asked of the mount of the current directory (`ovlsnap complete-names`).
complete -c ovlsnap -n "__fish_seen_subcommand_from delete restore rename set mount-cmd mount-view clone diff send push hold release holds" -f -a "(ovlsnap complete-names 2>/dev/null)"
"#;

/// The sections of ovlsnap(1) after the commands (roff).
const MAN_SECTIONS: &str = r#".SH "EXIT STATUS"
0 on success; 1 on any error, with one line on standard error saying what to do; 2 on bad usage.
BcheckR exits 1 when it finds errors (fixable findings alone exit 0). BrunR exits with the
status of its command. BautoR exits 1 when a snapshot it should delete cannot go now (open or
mounted); the next run retries it.
.SH ENVIRONMENT
.TP
.B RUST_LOG
Log level of a daemon started with B\-\-foregroundR (BinfoR, BdebugR); logs go to
standard error, or to the journal under systemd.
.TP
.B OVLSNAP_NOW
The clock of BautoR and BrunR, in seconds since the epoch, instead of the system's: for
tests that run weeks of a schedule in seconds. Timeline names carry it.
.SH FILES
.TP
.I LIVE/.ovlsnap/
The store (or B\-\-storeR IDIRR on LIVE's filesystem): Bsnapshots.jsonR (the list, a
checkpoint) and Bsnapshots.logR (changes since, one synced line each), Bsnapshots.json.bakR,
Blayers/IIDR (one kernel overlay layer per snapshot), Bwork/R, BsealR (what LIVE
showed when last guarded), Bsummaries/R, Bviews/R (consolidated layers of deep views),
BlockR. Only root and LIVE's owner may write it. The format is in docs/format.md.
.TP
.I /run/ovlsnap/
Control sockets and pid files of root's daemons; I/run/user/UID/ovlsnap/R for other users.
.TP
.I contrib/systemd/ovlsnap@.service, ovlsnap-auto@.service, ovlsnap-auto@.timer
Serve a directory from boot to shutdown; hourly timeline snapshots.
.SH EXAMPLES
.nf
ovlsnap mount /data
cd /data && ovlsnap take before-upgrade -d 'before the upgrade'
ovlsnap diff before-upgrade
ls /data/.snapshots/before-upgrade
ovlsnap restore before-upgrade --dry-run
ovlsnap hold audit before-upgrade
ovlsnap auto --hourly 24 --daily 7 --weekly 4 --monthly 12
ovlsnap run -- apt-get -y upgrade
ovlsnap send --from monday tuesday > incr.tar
ovlsnap umount /data
.fi
.SH CAVEATS
Changes made to LIVE while it is not mounted bypass the snapshots: the next mount finds them
(against its seal) and marks the snapshots that show them CHANGED, whose views then answer EIO
for those files. Mount before the services that write LIVE start, and stop them before the
umount (ovlsnap@.service does).
.PP
Snapshot names are 1 to 200 bytes, without '/' or control characters; hold tags up to 200
bytes; descriptions and property values up to 1024 bytes. A snapshot holding a name that starts
with B.wh.R cannot be sent (OCI layers reserve such names).
.PP
BdeleteR refuses a snapshot that is held, whose view is open or is a process's current
directory, or that a kernel mount (Bmount\-viewR, Bmount\-cmdR) or a clone uses.
.PP
Bmount\-viewR needs Linux 6.8 or later; a view of more than 500 layers (the kernel's limit)
is mounted with its top layers consolidated into one (hard links, nothing copied).
.PP
A daemon keeps at most an eighth of its open-file limit open for snapshot layers and reopens
the others when used; a take is refused, not half made, when too few descriptors are left.
.SH "SEE ALSO"
BovlfsR(1), BmountR(8), BzfsR(8), BsnapperR(8), the README and SECURITY.md
"#;

/// A spinner on stderr while the daemon works, when stderr is a terminal.
/// A new private directory under `root`.
fn tempfile_dir(root: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    for n in 0..100u32 {
        let p = root.join(format!("{prefix}.{}.{n}", std::process::id()));
        match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating a work dir in {}", root.display())),
        }
    }
    bail!("no free work dir name in {}", root.display())
}

/// Progress of a push or pull on a terminal: a bar per transfer, a spinner per stream.
struct OciUi(indicatif::ProgressBar);

impl snap_oci::Ui for OciUi {
    fn phase(&self, what: &str, len: Option<u64>) {
        let style = match len {
            Some(n) => {
                self.0.set_length(n);
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})"
            }
            None => "{spinner} {msg} {pos} entries",
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(style) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.set_position(0);
        self.0.set_message(what.to_string());
    }

    fn step(&self) {
        self.0.inc(1);
    }

    fn bytes(&self, n: u64) {
        self.0.set_position(n);
    }
}

impl Drop for OciUi {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn oci_ui() -> std::sync::Arc<dyn snap_oci::Ui> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return std::sync::Arc::new(snap_oci::Quiet);
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    std::sync::Arc::new(OciUi(bar))
}

fn spinner(what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", units[i]) }
}

/// Syncs and unmounts `mnt`, then waits for its daemon to exit.
fn umount(mnt: &Path) -> anyhow::Result<()> {
    let pid =
        control::call(mnt, &Request::Status).ok().and_then(|v| serde_json::from_value::<Status>(v).ok()).map(|s| s.pid);
    // While LIVE is still guarded: the seal the next mount checks LIVE against.
    if let Err(e) = control::call(mnt, &Request::Seal) {
        eprintln!(
            "ovlsnap: warning: LIVE not sealed before the unmount ({e:#}); the next mount may mark snapshots unverified"
        );
    }
    if let Ok(f) = std::fs::File::open(mnt) {
        let _ = rustix::fs::syncfs(&f);
    }
    ovl_fs::mount::unmount(mnt, false).map_err(|e| {
        let busy = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(libc::EBUSY);
        if busy {
            anyhow::anyhow!("{} is busy (files open or a process inside it); close them and retry", mnt.display())
        } else {
            e.context(format!("unmounting {}", mnt.display()))
        }
    })?;
    if let Some(pid) = pid {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            // A zombie has closed its files (the store's lock among them) only once its other
            // threads are gone too.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
            if stat.split(' ').nth(2) == Some("Z") && threads <= 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The daemon itself: mount and serve until unmounted.
fn serve(cfg: &daemon::Config) -> anyhow::Result<()> {
    daemon::tune_allocator();
    init_logs();
    rustix::process::umask(rustix::fs::Mode::empty());
    // One descriptor per snapshot layer, and the mount's users' open files are ours too: allow as
    // many as we may.
    ovl_fs::limits::raise();
    let prepared = daemon::prepare(cfg)?;
    let mnt = std::fs::canonicalize(&cfg.mount)?;
    unmount_on_signal(mnt)?;
    daemon::run(prepared, notify_ready)
}

fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe) is lost, never a panic.
        .log_internal_errors(false)
        .init();
}

/// Tells the parent that started us in the background that the mount is live, then lets go of
/// its pipes so readers of our output do not wait for the unmount.
fn notify_ready() {
    if std::env::var_os(NOTIFY).is_some() {
        println!("ready");
        if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
            if std::env::var_os("RUST_LOG").is_none() {
                let _ = rustix::stdio::dup2_stderr(&null);
            }
            let _ = rustix::stdio::dup2_stdin(&null);
        }
    }
}

/// On SIGTERM, SIGINT or SIGHUP, detach the mount so the daemon ends once it is unused.
fn unmount_on_signal(mnt: PathBuf) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(sig, "unmounting on signal");
            let _ = ovl_fs::mount::unmount(&mnt, true);
        }
    })?;
    Ok(())
}

/// Runs ourselves with `--foreground` in a new process group and waits until it reports the
/// mount live (exit 0) or fails (its error, exit 1).
fn spawn_background(cfg: &daemon::Config) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("--foreground");
    if let Some(s) = &cfg.store {
        cmd.arg("--store").arg(std::path::absolute(s)?);
    }
    cmd.arg(std::path::absolute(&cfg.live)?).arg(std::path::absolute(&cfg.mount)?);
    wait_ready(cmd)
}

/// Starts `cmd` (ourselves in the foreground mode) in its own process group and waits for
/// "ready" on its stdout.
fn wait_ready(mut cmd: Command) -> anyhow::Result<()> {
    // With `RUST_LOG` the daemon logs for as long as it runs: to our own stderr, which outlives
    // us (a pipe to us would close when we return, and the daemon's next log line hit EPIPE).
    let logs = std::env::var_os("RUST_LOG").is_some();
    let mut child = cmd
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
    let err = err.trim().trim_start_matches("ovlsnap: ");
    if err.is_empty() { bail!("the daemon exited before the mount was live") } else { bail!("{err}") }
}
