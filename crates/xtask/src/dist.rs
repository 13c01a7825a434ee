//! `cargo xtask dist`: everything a package needs in `target/dist/`: release binaries (`bin/`),
//! shell completions and man pages for `ovlsnap` (generated from its clap definitions by
//! `ovlsnap generate-docs`), a man page for `ovlfs` (whose arguments follow mount(8), not clap),
//! and examples: an fstab line and systemd units for both.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::{cargo, cmd, header};

/// The `ovlfs(1)` page.
const OVLFS_MAN: &str = r#".TH OVLFS 1 "" "ovlsnap" "User Commands"
.SH NAME
ovlfs \- the Linux overlay filesystem, served over FUSE
.SH SYNOPSIS
.B ovlfs
[\fB\-f\fR] \fB\-o\fR lowerdir=\fIL1\fR:\fIL2\fR[,upperdir=\fIU\fR,workdir=\fIW\fR][,\fIoptions\fR] \fIMOUNTPOINT\fR
.br
.B ovlfs
\fISOURCE\fR \fIMOUNTPOINT\fR \fB\-o\fR \fIOPTIONS\fR
.br
.B mount \-t fuse.ovlfs
ovlfs \fIMOUNTPOINT\fR \fB\-o\fR \fIOPTIONS\fR
.br
.B ovlfs check
\fB\-o\fR lowerdir=\fIL1\fR:\fIL2\fR,upperdir=\fIU\fR,workdir=\fIW\fR [\fB\-\-repair\fR] [\fB\-\-json\fR]
.SH DESCRIPTION
A drop-in for the kernel's overlayfs: the same mount options and the same on-disk format (whiteouts,
opaque and redirected directories, origin file handles), so layers move freely between ovlfs and the
kernel. It returns once the mount is live and keeps serving in the background; unmount with
\fBumount\fR(8).
.SH OPTIONS
.TP
.B lowerdir=\fIL1\fR:\fIL2\fR...
Read-only layers, top first.
.TP
.B upperdir=\fIU\fR, workdir=\fIW\fR
The writable layer and an empty directory on the same filesystem. Without them the mount is read-only.
.TP
.B ro
Read-only even with an upper layer.
.TP
.B userxattr
Keep overlay metadata in user.overlay.* instead of trusted.overlay.*.
.TP
.B redirect_dir=on|follow|off|nofollow
Rename directories that have lower parts (\fBon\fR), or answer EXDEV (\fBfollow\fR, the default).
.TP
.B metacopy=on
Copy up only metadata on chmod, chown, utimes and xattr changes.
.TP
.B volatile, fsync=volatile
Skip the fsyncs that make copy-up durable.
.TP
.B uidmapping=\fISTORED\fR:\fISHOWN\fR:\fILEN\fR[:...], gidmapping=...
Shift owners: IDs \fISTORED\fR.. in the layers are shown as \fISHOWN\fR.., and IDs callers write (chown,
owners of new objects, named ACL entries) are stored shifted back. IDs outside every range become 65534.
Empty fields are skipped (containers/storage writes \fBuidmapping=:0:100000:65536\fR); ranges may not
overlap.
.TP
.B squash_to_uid=\fIUID\fR, squash_to_gid=\fIGID\fR, squash_to_root
Show every object owned by \fIUID\fR/\fIGID\fR (or 0); what callers write is only mapped, and a chown
that fails is ignored. \fBsquash_to_uid\fR/\fBsquash_to_gid\fR take precedence over \fBsquash_to_root\fR.
.TP
.B xattr_permissions=0|1|2
Keep owner and mode of new and changed files and directories of the upper layer in an xattr
(\fB1\fR: security.fuseoverlayfs.override_stat, \fB2\fR: user.containers.override_stat) instead of on the
inode, for stores where the daemon cannot chown. Any layer whose root carries one of these xattrs
(or user.fuseoverlayfs.override_stat) is read that way whatever the option says. The value is
\fIUID\fR:\fIGID\fR:\fIOCTAL-MODE\fR[:\fITYPE\fR], TYPE one of file, dir, symlink, pipe, socket,
block-\fIMAJ\fR-\fIMIN\fR, char-\fIMAJ\fR-\fIMIN\fR; the xattr itself is hidden from callers.
.TP
.B context=\fILABEL\fR
Accepted and ignored (containers/storage adds it under SELinux).
.TP
.B \-f
Stay in the foreground.
.TP
.B \-V, \-\-version
Print \fBovlfs\fR \fIVERSION\fR on one line (what \fBpodman info\fR shows).
.SH CHECKING LAYERS
\fBovlfs check\fR checks unmounted layers as the kernel reads them: the upper layer over the lower
layers (whiteouts that hide nothing, malformed, dangling or looping redirects, origins that do not
decode or name nothing, metacopy files without data, unknown overlay xattrs) and the work dir
(leftovers of an interrupted copy-up, the marker a volatile mount leaves). Each finding has a path and a
severity: \fBerror\fR, \fBwarning\fR or \fBfixable\fR. \fB\-\-repair\fR removes the fixable ones (they are
no part of the tree), then checks again; \fB\-\-json\fR prints the report as JSON.
.SH EXIT STATUS
0 once the mount is live (or, with \fB\-f\fR, after it is unmounted); 1 with a one-line error on bad
options, missing or overlapping directories, or a failed mount. Nothing is changed on error.
\fBovlfs check\fR: 0 without errors (warnings and fixable findings allowed), 1 while errors remain,
2 on bad usage.
.SH SEE ALSO
\fBovlsnap\fR(1), \fBmount\fR(8), the kernel's Documentation/filesystems/overlayfs.rst
"#;

const FSTAB: &str = "# An ovlfs overlay mounted at boot (mount.fuse3 runs /usr/local/bin/ovlfs):
ovlfs  /srv/merged  fuse.ovlfs  lowerdir=/srv/base:/srv/extra,upperdir=/srv/upper,workdir=/srv/work,nofail  0 0
";

const OVLFS_UNIT: &str = "# /etc/systemd/system/srv-merged.mount: an ovlfs overlay as a systemd mount unit.
[Unit]
Description=ovlfs overlay at /srv/merged

[Mount]
What=ovlfs
Where=/srv/merged
Type=fuse.ovlfs
Options=lowerdir=/srv/base:/srv/extra,upperdir=/srv/upper,workdir=/srv/work

[Install]
WantedBy=multi-user.target
";

/// The systemd units of `contrib/systemd` (one copy: the dist ships the reviewed ones).
const OVLSNAP_UNITS: [(&str, &str); 3] = [
    ("ovlsnap@.service", include_str!("../../../contrib/systemd/ovlsnap@.service")),
    ("ovlsnap-auto@.service", include_str!("../../../contrib/systemd/ovlsnap-auto@.service")),
    ("ovlsnap-auto@.timer", include_str!("../../../contrib/systemd/ovlsnap-auto@.timer")),
];

/// Builds release binaries and writes the distribution files into `target/dist/`.
pub fn run() -> Result<()> {
    header("building release binaries");
    cargo().args(["build", "--release", "-p", "ovl-fs", "-p", "snap-cli"]).run()?;
    let release = crate::target_dir().join("release");
    let dist = crate::target_dir().join("dist");
    let _ = fs::remove_dir_all(&dist);
    for sub in ["bin", "man/man1", "examples"] {
        fs::create_dir_all(dist.join(sub)).with_context(|| format!("creating {}", dist.join(sub).display()))?;
    }
    for bin in ["ovlfs", "ovlsnap"] {
        fs::copy(release.join(bin), dist.join("bin").join(bin)).with_context(|| format!("copying {bin}"))?;
    }
    header("completions and man pages");
    cmd(dist.join("bin/ovlsnap")).arg("generate-docs").arg(&dist).run()?;
    write(&dist.join("man/man1/ovlfs.1"), OVLFS_MAN)?;
    write(&dist.join("examples/fstab"), FSTAB)?;
    write(&dist.join("examples/srv-merged.mount"), OVLFS_UNIT)?;
    for (name, text) in OVLSNAP_UNITS {
        write(&dist.join("examples").join(name), text)?;
    }
    println!("wrote {}:", dist.display());
    list(&dist, &dist)?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn list(root: &Path, dir: &Path) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            list(root, &p)?;
        } else {
            println!("  {}", p.strip_prefix(root).unwrap_or(&p).display());
        }
    }
    Ok(())
}
