//! `ovlsnap mount-cmd` and `ovlsnap mount-view` (issue 15): a snapshot's view mounted read-only
//! by the stock kernel overlay.
//!
//! The daemon only answers with the view's layers ([`snap_fs::snapper::ViewLayers`]); this module
//! checks them against the daemon that serves MNT before using them, then either prints a mount
//! command that is safe to paste into a root shell (`mount-cmd`) or mounts the view itself through
//! the new mount API, with no shell and no option string to escape (`mount-view`). A daemon, or
//! something that answers on its socket, must never be able to make us print or mount anything
//! but that snapshot's layers over MNT.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use snap_fs::control::{self, Request, Status};
use snap_fs::snapper::ViewLayers;

/// What every printed command starts with (tests parse it).
const CMD_PREFIX: &str = "mount -t overlay overlay -o ";

/// The most bytes of options we hand mount(8): mount(2) passes one page (4096 bytes, its NUL
/// included) and cuts the rest silently, which can leave a shorter, valid-looking layer list (a
/// mount of the wrong tree, seen in bench-snapshots at N = 1000); a margin stays for what
/// mount(8) may add.
const MOUNT_OPTIONS_MAX: usize = 4096 - 256;

/// A snapshot view's lower layers, top first, checked by [`check_layers`]: every one but the
/// last is `/proc/<daemon pid>/fd/<store fd>/layers/<id>`, the last is MNT.
#[derive(Debug)]
pub struct CheckedLayers {
    lowers: Vec<PathBuf>,
    /// The kernel must read `user.overlay.*` (`userxattr`).
    userxattr: bool,
}

/// Asks the daemon of `mnt` (canonical) for the layers of snapshot `name` and checks them;
/// `for_shell`: few enough for a mount(8) command (see [`shell_max_layers`]), else as many as
/// the kernel stacks (the daemon consolidates the top layers of a deeper view into one).
pub fn fetch(mnt: &Path, name: &str, for_shell: bool) -> anyhow::Result<CheckedLayers> {
    let status: Status = serde_json::from_value(control::call(mnt, &Request::Status)?)
        .context("the daemon's status answer is not valid")?;
    let max_layers = for_shell.then(|| shell_max_layers(status.pid, mnt));
    let answer = control::call(mnt, &Request::MountCmd { name: name.to_owned(), max_layers })?;
    check_layers(answer, status.pid, mnt)
}

/// How many layers of daemon `pid`'s store, over `mnt`, surely fit in mount(2)'s page of
/// options (each `/proc/PID/fd/FD/layers/ID:` with the longest fd and id, and the top one
/// perhaps a consolidated `views/TOKEN`).
fn shell_max_layers(pid: u32, mnt: &Path) -> usize {
    let per_layer = format!("/proc/{pid}/fd/").len() + 10 + "/layers/".len() + 20 + 1;
    let fixed = "ro,userxattr,redirect_dir=follow,lowerdir=".len() + 2 * mnt.as_os_str().len() + 128;
    (MOUNT_OPTIONS_MAX.saturating_sub(fixed) / per_layer).max(3)
}

/// Checks the daemon's answer to `MountCmd`: snapshot layers of one store, reached through the
/// descriptor of the daemon `pid`, then `mnt` (exactly, byte for byte) last.
pub fn check_layers(answer: serde_json::Value, pid: u32, mnt: &Path) -> anyhow::Result<CheckedLayers> {
    let invalid = |why: String| anyhow::anyhow!("the daemon's answer is not a valid layer list: {why}");
    let layers: ViewLayers = serde_json::from_value(answer).map_err(|e| invalid(e.to_string()))?;
    let Some((last, snaps)) = layers.lowers.split_last() else { return Err(invalid("no layers".into())) };
    if snaps.is_empty() {
        return Err(invalid("no snapshot layer".into()));
    }
    if last.as_os_str() != mnt.as_os_str() {
        return Err(invalid(format!("the bottom layer is {last:?}, not the mount {mnt:?}")));
    }
    let mut store_fd = None;
    for (i, p) in snaps.iter().enumerate() {
        // Only the top layer may be a consolidated one.
        let Some(fd) = store_fd_of(p, pid).or_else(|| consolidated_fd_of(p, pid).filter(|_| i == 0)) else {
            return Err(invalid(format!("{p:?} is not a layer of the store of daemon {pid}")));
        };
        // One view is one store: layers behind two descriptors are not an answer we made.
        if *store_fd.get_or_insert(fd) != fd {
            return Err(invalid(format!("{p:?} is in another store than the layer above it")));
        }
    }
    Ok(CheckedLayers { lowers: layers.lowers, userxattr: layers.userxattr })
}

/// The store descriptor in `p` when it is exactly `/proc/<pid>/fd/<fd>/layers/<id>` (decimal
/// numbers, nothing else: no `..`, no extra slashes), else `None`.
fn store_fd_of(p: &Path, pid: u32) -> Option<&str> {
    let rest = p.to_str()?.strip_prefix(&format!("/proc/{pid}/fd/"))?;
    let (fd, id) = rest.split_once("/layers/")?;
    (is_decimal(fd) && is_decimal(id)).then_some(fd)
}

/// The store descriptor in `p` when it is exactly `/proc/<pid>/fd/<fd>/views/<token>` (a
/// consolidated top layer: the token is decimal numbers joined by `-`), else `None`.
fn consolidated_fd_of(p: &Path, pid: u32) -> Option<&str> {
    let rest = p.to_str()?.strip_prefix(&format!("/proc/{pid}/fd/"))?;
    let (fd, token) = rest.split_once("/views/")?;
    (is_decimal(fd) && token.split('-').all(is_decimal)).then_some(fd)
}

/// A number as the daemon formats one: ASCII digits, no sign, no leading zero.
fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// The one-line command that mounts the checked layers read-only at `dir` (absolute) with
/// mount(8), quoted so that a shell runs exactly that command whatever the paths hold.
pub fn mount_cmd(layers: &CheckedLayers, dir: &Path) -> anyhow::Result<String> {
    let dir = printable(dir)?;
    let mut lowers = Vec::with_capacity(layers.lowers.len());
    for p in &layers.lowers {
        let s = printable(p)?;
        // util-linux splits `-o` at every comma, escaped or not, and drops what follows an
        // unbalanced `"`: a piece such as `ro` or `loop` is taken as its own option and the
        // layer path is cut short (`/srv/a,ro` mounted `/srv/a`). The kernel itself accepts both.
        if let Some(c) = s.chars().find(|c| matches!(c, ',' | '"')) {
            bail!(
                "{s:?} holds {c:?}, which mount(8) cannot pass to the overlay intact: use `ovlsnap mount-view NAME \
                 DIR`, which mounts without mount(8) or a shell"
            );
        }
        lowers.push(escape_lowerdir(s));
    }
    let user = if layers.userxattr { "userxattr," } else { "" };
    let opts = format!("ro,{user}redirect_dir=follow,lowerdir={}", lowers.join(":"));
    // mount(2) takes one page of options: a deeper view's list would be cut short. (Names
    // relative to the store would fit more, but `delete` finds a mounted snapshot by the layer
    // paths mountinfo shows, so they stay absolute.)
    if opts.len() >= MOUNT_OPTIONS_MAX {
        bail!(
            "the view's {} layers make {} bytes of mount options, more than mount(2) surely takes \
             ({MOUNT_OPTIONS_MAX}): use `ovlsnap mount-view NAME DIR`, which passes one layer at a time",
            layers.lowers.len(),
            opts.len()
        );
    }
    Ok(format!("{CMD_PREFIX}{} {}", shell_quote(&opts), shell_quote(dir)))
}

/// `p` as text that a terminal shows as it is: UTF-8 without control characters (a newline
/// would end the command in a shell, an escape sequence would hide part of it).
fn printable(p: &Path) -> anyhow::Result<&str> {
    let advice = "use `ovlsnap mount-view NAME DIR`, which mounts without a shell";
    let Some(s) = p.to_str() else { bail!("{p:?} is not UTF-8, so it cannot be printed as a command: {advice}") };
    if s.chars().any(char::is_control) {
        bail!("{s:?} holds a control character (a newline?), so it cannot be printed as a command: {advice}");
    }
    Ok(s)
}

/// Escapes one path for the kernel overlay's `lowerdir=` list, which splits at `:` and at
/// unescaped `,` and takes `\` as the escape.
fn escape_lowerdir(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':' | ',') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One shell word holding exactly `s`: inside single quotes nothing is special but the quote
/// itself, which closes, gets escaped and reopens.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Mounts the checked layers read-only at `dir` with the kernel overlay, through the new mount
/// API: one `lowerdir+` per layer (Linux 6.8+), so paths need no escaping and no shell or
/// mount(8) parses them.
pub fn mount_view(layers: &CheckedLayers, dir: &Path) -> anyhow::Result<()> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create, fsconfig_set_flag,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).context("opening a kernel overlay (fsopen)")?;
    let with_log = |e: rustix::io::Errno, what: String| kernel_log(fs.as_fd(), anyhow::Error::new(e).context(what));
    for p in &layers.lowers {
        fsconfig_set_string(&fs, "lowerdir+", p.as_path()).map_err(|e| {
            let what = format!("adding layer {p:?}");
            if e == rustix::io::Errno::INVAL {
                // Before 6.8 the kernel has no `lowerdir+`.
                return with_log(e, format!("{what} (the kernel overlay needs Linux 6.8 or later for `mount-view`)"));
            }
            with_log(e, what)
        })?;
    }
    // What mount(8) calls it, so both kinds of mount look alike in mountinfo and df.
    fsconfig_set_string(&fs, "source", "overlay").map_err(|e| with_log(e, "setting the source".into()))?;
    fsconfig_set_string(&fs, "redirect_dir", "follow").map_err(|e| with_log(e, "setting redirect_dir".into()))?;
    if layers.userxattr {
        fsconfig_set_flag(&fs, "userxattr").map_err(|e| with_log(e, "setting userxattr".into()))?;
    }
    fsconfig_set_flag(&fs, "ro").map_err(|e| with_log(e, "setting ro".into()))?;
    fsconfig_create(&fs).map_err(|e| with_log(e, "creating the overlay".into()))?;
    let m = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_RDONLY)
        .map_err(|e| with_log(e, "making the mount".into()))?;
    move_mount(&m, "", rustix::fs::CWD, dir, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .with_context(|| format!("mounting at {}", dir.display()))?;
    Ok(())
}

/// `err` with what the kernel logged on the filesystem context `fs` (why a layer was refused).
fn kernel_log(fs: std::os::fd::BorrowedFd<'_>, err: anyhow::Error) -> anyhow::Error {
    let mut lines = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; the context keeps a handful.
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 || lines.len() >= 8 {
            break;
        }
        lines.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
    }
    if lines.is_empty() { err } else { err.context(format!("kernel: {}", lines.join("; "))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 4242;

    fn answer(lowers: &[&str]) -> serde_json::Value {
        serde_json::json!({ "lowers": lowers })
    }

    fn check(lowers: &[&str]) -> anyhow::Result<CheckedLayers> {
        check_layers(answer(lowers), PID, Path::new("/data"))
    }

    fn assert_refused(lowers: &[&str]) {
        let err = format!("{:#}", check(lowers).expect_err(&format!("{lowers:?} must be refused")));
        assert!(err.contains("the daemon's answer is not a valid layer list"), "{lowers:?}: {err}");
    }

    #[test]
    fn a_true_answer_is_accepted() {
        let l = check(&["/proc/4242/fd/7/layers/3", "/proc/4242/fd/7/layers/12", "/data"]).unwrap();
        assert_eq!(l.lowers.len(), 3);
    }

    #[test]
    fn a_tampered_answer_is_refused() {
        for bad in [
            &["/etc", "/data"][..],
            &["/proc/4242/fd/7/layers/3/../../../../etc", "/data"],
            &["/proc/4242/fd/7/layers/../3", "/data"],
            &["proc/4242/fd/7/layers/3", "/data"],
            &["/proc/1/fd/7/layers/3", "/data"],
            &["/proc/self/fd/7/layers/3", "/data"],
            &["/proc/4242/fd/7/layers/3", "/proc/4242/fd/8/layers/4", "/data"],
            &["/proc/4242/fd/7//layers/3", "/data"],
            &["/proc/4242/fd/7/layers/3/", "/data"],
            &["/proc/4242/fd/7/layers/03", "/data"],
            &["/proc/4242/fd/+7/layers/3", "/data"],
            &["/proc/4242/fd/7/layers/3", "/data/"],
            &["/proc/4242/fd/7/layers/3", "/etc"],
            &["/proc/4242/fd/7/layers/3", "/data/../etc"],
            &["/proc/4242/fd/7/layers/3"],
            &["/data"],
            &[],
        ] {
            assert_refused(bad);
        }
        for bad in
            [serde_json::json!("mount -t overlay overlay -o lowerdir=/etc /mnt; rm -rf /"), serde_json::json!(null)]
        {
            assert!(check_layers(bad, PID, Path::new("/data")).is_err());
        }
    }

    #[test]
    fn the_printed_command_quotes_everything_for_the_shell() {
        let l = check_layers(
            answer(&["/proc/4242/fd/7/layers/3", "/m n/a'b/$(x)/`y`;z/c:d/e\\f"]),
            PID,
            Path::new("/m n/a'b/$(x)/`y`;z/c:d/e\\f"),
        )
        .unwrap();
        let line = mount_cmd(&l, Path::new("/t/x'y $z")).unwrap();
        assert_eq!(
            line,
            r"mount -t overlay overlay -o 'ro,redirect_dir=follow,lowerdir=/proc/4242/fd/7/layers/3:/m n/a'\''b/$(x)/`y`;z/c\:d/e\\f' '/t/x'\''y $z'"
        );
    }

    #[test]
    fn a_view_too_deep_for_one_page_of_options_is_refused_with_advice() {
        let layers = |n: usize| {
            let mut l: Vec<String> = (1000..1000 + n).map(|id| format!("/proc/4242/fd/7/layers/{id}")).collect();
            l.push("/data".into());
            l
        };
        let fits = layers(100);
        let l = check(&fits.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert!(mount_cmd(&l, Path::new("/t")).is_ok(), "100 layers fit in a page");
        let deep = layers(150);
        let l = check(&deep.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        let err = format!("{:#}", mount_cmd(&l, Path::new("/t")).unwrap_err());
        assert!(err.contains("mount-view") && err.contains("151 layers"), "{err}");
    }

    #[test]
    fn paths_mount8_would_cut_or_a_shell_would_split_are_refused() {
        for mnt in ["/a,ro", "/a\"b", "/a\nb", "/a\u{1b}[2Jb"] {
            let l = check_layers(answer(&["/proc/4242/fd/7/layers/3", mnt]), PID, Path::new(mnt)).unwrap();
            let err = format!("{:#}", mount_cmd(&l, Path::new("/t")).unwrap_err());
            assert!(err.contains("mount-view"), "{mnt:?}: {err}");
        }
        let l = check(&["/proc/4242/fd/7/layers/3", "/data"]).unwrap();
        let err = format!("{:#}", mount_cmd(&l, Path::new("/t\nreboot")).unwrap_err());
        assert!(err.contains("control character"), "{err}");
        let latin1 = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/t/caf\xe9");
        let err = format!("{:#}", mount_cmd(&l, Path::new(latin1)).unwrap_err());
        assert!(err.contains("not UTF-8") && err.contains("mount-view"), "{err}");
    }
}
