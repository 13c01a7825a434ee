//! Who else is using a set of layer directories: kernel overlay mounts that name them (their
//! options show in `/proc/self/mountinfo`) and processes holding one of them open (an `ovlfs`
//! daemon keeps its layer roots and work dir open for the life of the mount).

use std::path::Path;

use crate::mount::unescape_mountinfo;

/// One line per user of any of `dirs` (canonical paths), this process excluded: `kernel overlay
/// mounted at MNT` or `process PID (COMM)`. Empty when nobody uses them.
pub fn users_of(dirs: &[&Path]) -> Vec<String> {
    let mut out = kernel_mounts_of(dirs);
    out.extend(processes_holding(dirs));
    out
}

/// Kernel overlay mounts whose `lowerdir=`, `upperdir=` or `workdir=` names one of `dirs`.
fn kernel_mounts_of(dirs: &[&Path]) -> Vec<String> {
    // Every byte kept: a mount elsewhere with a name that is not UTF-8 must not hide these.
    let Ok(info) = crate::mount::read_mountinfo() else { return Vec::new() };
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mut fields = right.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let options = fields.nth(1).unwrap_or_default();
        let named = options.split(',').filter_map(|o| o.split_once('=')).any(|(key, value)| {
            matches!(key, "lowerdir" | "lowerdir+" | "datadir+" | "upperdir" | "workdir")
                && value.split(':').any(|v| dirs.contains(&unescape_mountinfo(v).as_path()))
        });
        if named {
            let point = left.split(' ').nth(4).unwrap_or("?");
            out.push(format!("kernel overlay mounted at {}", unescape_mountinfo(point).display()));
        }
    }
    out
}

/// Processes other than this one with an open descriptor (or working directory) on one of
/// `dirs` itself.
fn processes_holding(dirs: &[&Path]) -> Vec<String> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let holds = |link: &Path| std::fs::read_link(link).is_ok_and(|t| dirs.iter().any(|d| t == *d));
        let cwd = holds(&p.path().join("cwd"));
        let fd = || std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| fds.flatten().any(|fd| holds(&fd.path())));
        if cwd || fd() {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("process {pid} ({})", comm.trim()));
        }
    }
    out
}
