//! Hostile `overlay.redirect` values (issue 3), side by side with the kernel overlay on identical
//! copies of the layers: `..` and `.` (relative and inside absolute paths), relative paths, empty
//! values and components, absolute paths escaping the root, a symlink out of the layer on the
//! way, very long values and names, non-UTF-8 bytes, NUL bytes, and targets that are whiteouts,
//! files or symlinks; on upper dirs, on upper files with and without `overlay.metacopy`, on a
//! symlink, and on lower dirs and lower metacopy files. Every lookup, listing and read must give
//! the kernel's outcome (errno or content), and nothing outside the layer roots may ever show.
//!
//! What the kernel does (6.18, checked by this test): a value is a C string (it ends at a NUL);
//! empty, a relative value with `/`, or an absolute one with an empty component: `EINVAL`; a `.`,
//! `..` or empty component reached by the walk: `EACCES`; a missing component, a name over 255
//! bytes, a whiteout, a symlink or a file on the way: nothing there (a dir shows only its upper
//! part; a metacopy file has no data: `EIO`); a redirect on a file without `overlay.metacopy` or
//! on a symlink: ignored. Without `metacopy=on` every metacopy file fails with `EPERM` (after the
//! redirect's `EINVAL` check); with `nofollow` so does every redirect in a merged parent.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::Path;

use crate::common::{self, Backend, Layers, MountGuard, make_whiteout, mount_point, tempdir};
use rustix::fs::XattrFlags;

/// What a file outside the layers holds; no probe may ever read it.
const SECRET: &str = "SECRET-OUTSIDE-THE-LAYERS";

/// The kernel's options of each round; ovlfs gets the same.
const CONFIGS: [&str; 3] = [
    "redirect_dir=on,metacopy=on,index=off,xino=off",
    "redirect_dir=follow,metacopy=off,index=off,xino=off",
    "redirect_dir=nofollow,index=off,xino=off",
];

/// Eleven bytes of data naming `what` (every data file has the size of the metacopy files).
fn data(what: &str) -> String {
    format!("{what:<10.10}\n")
}

fn set(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("set {name} on {}: {e}", path.display()));
}

/// A metadata-only upper (or lower) copy: 11 bytes of hole, empty `overlay.metacopy`.
fn metacopy(path: &Path, redirect: Option<&[u8]>) {
    File::create(path).unwrap().set_len(11).unwrap();
    set(path, "trusted.overlay.metacopy", b"");
    if let Some(v) = redirect {
        set(path, "trusted.overlay.redirect", v);
    }
}

/// Builds the layers under `root/layers` and the secret under `root/outside`.
fn build(root: &Path) -> Layers {
    let outside = root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("SECRET"), SECRET).unwrap();
    let l = Layers::create(&root.join("layers"), 2);
    let (l1, l2, u) = (&l.lowers[0], &l.lowers[1], &l.upper);
    let dir_with = |p: &Path, file: &str| {
        fs::create_dir_all(p).unwrap();
        fs::write(p.join(file), data(file)).unwrap();
    };
    // Targets of the good redirects, each hidden at its own name (as a rename leaves it), so
    // that no lower object shows at two places (the kernel then answers ESTALE).
    for d in ["d", "dg", "dn", "dl", "sub/dg2", "sub/dg3"] {
        dir_with(&l2.join(d), "inner");
    }
    for f in ["data", "data1", "data3", "data4", "sub/data2"] {
        fs::write(l2.join(f), data(f)).unwrap();
    }
    fs::create_dir(u.join("sub")).unwrap();
    for hidden in ["dg", "dn", "dl", "data1", "data3", "data4", "sub/dg2", "sub/dg3", "sub/data2"] {
        make_whiteout(&u.join(hidden));
    }
    dir_with(&l2.join("wh"), "hidden");
    make_whiteout(&l1.join("wh"));
    fs::write(l2.join("whf"), data("whf")).unwrap();
    make_whiteout(&l1.join("whf"));
    symlink("../../outside", l1.join("sym")).unwrap();
    symlink(&outside, l1.join("symabs")).unwrap();
    let odd = l2.join(OsStr::from_bytes(b"\xff\xfe"));
    dir_with(&odd, "nu");
    make_whiteout(&u.join(OsStr::from_bytes(b"\xff\xfe")));
    fs::write(l2.join(OsStr::from_bytes(b"\xfd")), data("fd")).unwrap();
    make_whiteout(&u.join(OsStr::from_bytes(b"\xfd")));
    // 20 names of 200 bytes: a 4 KiB path.
    let long = vec!["b".repeat(200); 20].join("/");
    dir_with(&l2.join(&long), "deep");
    make_whiteout(&u.join("b".repeat(200)));
    let abs_long = format!("/{long}");

    let dirs: &[(&str, &[u8])] = &[
        ("r_dotdot_slash", b"../../outside"),
        ("r_dotdot", b".."),
        ("r_dot", b"."),
        ("r_abs_dotdot", b"/../../outside"),
        ("r_abs_dotdot_mid", b"/d/../../outside"),
        ("r_abs_missing_dotdot", b"/missing/../x"),
        ("r_abs_dot_end", b"/sub/."),
        ("r_abs_outside", b"/outside"),
        ("r_abs_etc", b"/etc"),
        ("r_abs_rootpath", outside.as_os_str().as_bytes()),
        ("r_empty", b""),
        ("r_slash", b"/"),
        ("r_dslash", b"//d"),
        ("r_trail", b"/d/"),
        ("r_relslash", b"d/inner"),
        ("r_long_comp", &[b'a'; 300]),
        ("r_long_abs", abs_long.as_bytes()),
        ("r_nonutf8", b"\xff\xfe"),
        ("r_nul", b"dn\0/../../outside"),
        ("r_nul_first", b"\0dn"),
        ("r_abs_nul_dotdot", b"/sub/dg3\0/../.."),
        ("r_wh", b"wh"),
        ("r_abs_wh", b"/wh"),
        ("r_sym", b"sym"),
        ("r_abs_sym", b"/sym/SECRET"),
        ("r_abs_symabs", b"/symabs"),
        ("r_abs_file_mid", b"/data/x"),
        ("r_good", b"dg"),
        ("r_abs_good", b"/sub/dg2"),
    ];
    for (name, v) in dirs {
        dir_with(&u.join(name), "own");
        set(&u.join(name), "trusted.overlay.redirect", v);
    }
    let m_long = format!("{abs_long}/deep");
    let secret = outside.join("SECRET");
    let files: &[(&str, Option<&[u8]>)] = &[
        ("m_good_rel", Some(b"data1")),
        ("m_good_abs", Some(b"/sub/data2")),
        ("m_dotdot", Some(b"..")),
        ("m_relslash", Some(b"../outside/SECRET")),
        ("m_abs_dotdot", Some(b"/../outside/SECRET")),
        ("m_abs_rootpath", Some(secret.as_os_str().as_bytes())),
        ("m_abs_sym", Some(b"/sym/SECRET")),
        ("m_sym", Some(b"sym")),
        ("m_wh", Some(b"whf")),
        ("m_dir", Some(b"d")),
        ("m_long", Some(m_long.as_bytes())),
        ("m_long_comp", Some(&[b'c'; 300])),
        ("m_empty", Some(b"")),
        ("m_dslash", Some(b"//data")),
        ("m_nul", Some(b"data3\0/../x")),
        ("m_nonutf8", Some(b"\xfd")),
        ("m_missing", Some(b"nope")),
        ("m_none", None),
    ];
    for (name, v) in files {
        metacopy(&u.join(name), *v);
    }
    // Not metacopy: the kernel never reads these redirects.
    fs::write(u.join("f_plain"), data("plain")).unwrap();
    set(&u.join("f_plain"), "trusted.overlay.redirect", b"/data");
    fs::write(u.join("f_plain_bad"), data("plainbad")).unwrap();
    set(&u.join("f_plain_bad"), "trusted.overlay.redirect", b"../../outside/SECRET");
    symlink("target", u.join("s_redirect")).unwrap();
    set(&u.join("s_redirect"), "trusted.overlay.redirect", b"/symabs");
    // In the top lower layer, as a layer that was once an upper leaves them.
    metacopy(&l1.join("lm"), Some(b"/data4"));
    metacopy(&l1.join("lm_bad"), Some(b"../x"));
    metacopy(&l1.join("lm_dotdot"), Some(b"/../outside/SECRET"));
    dir_with(&l1.join("ld"), "l1own");
    set(&l1.join("ld"), "trusted.overlay.redirect", b"dl");
    dir_with(&l1.join("ld_bad"), "l1own");
    set(&l1.join("ld_bad"), "trusted.overlay.redirect", b"/../outside");
    l
}

fn errno(e: &std::io::Error) -> String {
    common::errno_name(e.raw_os_error().unwrap_or(0))
}

/// Everything a user can see at the top of the mount and one level down: each entry's lstat
/// (or errno), a dir's listing and its files' contents, a file's content.
fn probe(m: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(m).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    let show = |n: &OsStr| n.to_string_lossy().into_owned();
    let read = |p: &Path| match fs::read(p) {
        Ok(b) => format!("{:?}", String::from_utf8_lossy(&b)),
        Err(e) => errno(&e),
    };
    let mut out = vec![format!("root: {}", names.iter().map(|n| show(n)).collect::<Vec<_>>().join(" "))];
    for n in &names {
        let p = m.join(n);
        let meta = match fs::symlink_metadata(&p) {
            Ok(meta) => meta,
            Err(e) => {
                out.push(format!("{}: lstat {}", show(n), errno(&e)));
                continue;
            }
        };
        let mut line =
            format!("{}: mode {:o} size {}", show(n), meta.mode(), if meta.is_dir() { 0 } else { meta.size() });
        if meta.is_dir() {
            match fs::read_dir(&p) {
                Ok(d) => {
                    let mut inner: Vec<_> = d.map(|e| e.unwrap().file_name()).collect();
                    inner.sort();
                    for i in inner {
                        line.push_str(&format!(" {}={}", show(&i), read(&p.join(&i))));
                    }
                }
                Err(e) => line.push_str(&format!(" readdir {}", errno(&e))),
            }
        } else if meta.is_file() {
            line.push_str(&format!(" read {}", read(&p)));
        } else if !meta.file_type().is_symlink() && !meta.file_type().is_char_device() {
            line.push_str(" odd type");
        }
        out.push(line);
    }
    out
}

#[test]
fn hostile_redirects_resolve_as_in_the_kernel_and_never_outside_the_layers() {
    let tmp = tempdir("hostile");
    let pristine = tmp.path().join("pristine");
    build(&pristine);
    for (i, opts) in CONFIGS.iter().enumerate() {
        // Each mount on its own copy: the kernel writes to the layers as it looks (origin, impure).
        let copy = |who: &str| {
            let dst = tmp.path().join(format!("{who}{i}"));
            let cp = std::process::Command::new("cp").arg("-a").arg(&pristine).arg(&dst).status().unwrap();
            assert!(cp.success(), "cp -a {}", pristine.display());
            Layers::at(&dst.join("layers"), 2)
        };
        let (kl, ol) = (copy("k"), copy("o"));
        let kernel = {
            let k = MountGuard::mount(Backend::Kernel, &kl, opts, &mount_point(tmp.path(), &format!("km{i}")));
            probe(k.path())
        };
        let ours = {
            let o = MountGuard::mount(Backend::Ovlfs, &ol, opts, &mount_point(tmp.path(), &format!("om{i}")));
            probe(o.path())
        };
        for line in kernel.iter().chain(&ours) {
            assert!(!line.contains(SECRET), "{opts}: a probe read outside the layers: {line}");
        }
        let diffs: Vec<String> = kernel
            .iter()
            .zip(&ours)
            .filter(|(k, o)| k != o)
            .map(|(k, o)| format!("  kernel: {k}\n  ovlfs:  {o}"))
            .collect();
        assert!(
            diffs.is_empty() && kernel.len() == ours.len(),
            "-o {opts}: ovlfs differs from the kernel ({} vs {} lines):\n{}",
            kernel.len(),
            ours.len(),
            diffs.join("\n")
        );
        // The rounds differ where the options say they should.
        let line = |name: &str| kernel.iter().find(|l| l.starts_with(&format!("{name}: "))).cloned().unwrap();
        let want = if i == 0 { "read \"data1     \\n\"" } else { "EPERM" };
        assert!(line("m_good_rel").contains(want), "{opts}: {}", line("m_good_rel"));
        assert!(line("r_dotdot_slash").contains("EINVAL"), "{opts}: {}", line("r_dotdot_slash"));
    }
}
