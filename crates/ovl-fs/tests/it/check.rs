//! `ovlfs check` (issue 8): layers written by the kernel overlay and by ovlfs through a random
//! workload check clean; each corruption injected by hand is reported with its path and
//! severity; `--repair` removes exactly the fixable ones, and the kernel then shows the same tree
//! as before; exit codes and refusals.
//!
//! Environment: `OVL_CHECK_SEEDS` (3) random workloads per configuration, `OVL_CHECK_OPS` (150)
//! operations each.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustix::fs::XattrFlags;

/// The kernel options of the workloads: renames of merged dirs through redirects, with and
/// without metadata-only copy-up.
const CONFIGS: [&str; 2] =
    ["redirect_dir=on,index=off,metacopy=off,xino=off", "redirect_dir=on,index=off,metacopy=on,xino=off"];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
}

/// What `ovlfs check` answered.
struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Checked {
    /// The report, parsed (the run must have been with `--json`).
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }

    /// `(severity, kind, path)` of each finding (or of each repaired one, for `what = "repaired"`).
    fn set(&self, what: &str) -> BTreeSet<(String, String, PathBuf)> {
        let j = self.json();
        let list = j[what].as_array().unwrap_or_else(|| panic!("no {what} in {}", self.stdout));
        list.iter()
            .map(|f| {
                let s = |k: &str| f[k].as_str().unwrap_or_else(|| panic!("{k} missing: {f}")).to_string();
                (s("severity"), s("kind"), PathBuf::from(s("path")))
            })
            .collect()
    }
}

/// Runs `ovlfs check ARGS`.
fn ovlfs_check<S: AsRef<OsStr>>(args: &[S]) -> Checked {
    let out = Command::new(ovlfs_bin()).arg("check").args(args).output().expect("run ovlfs check");
    Checked {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ovlfs check -o OPTS --json [more]` for `layers` with `extra` options.
fn check_layers(layers: &Layers, extra: &str, more: &[&str]) -> Checked {
    let mut args = vec!["-o".to_string(), layers.mount_options(extra), "--json".to_string()];
    args.extend(more.iter().map(|s| s.to_string()));
    ovlfs_check(&args)
}

/// Lower objects for [`script`], in the top lower layer under `script/` (a name the random
/// layers never use).
fn script_objects(lower: &Path) {
    let s = lower.join("script");
    for d in ["dir/sub", "dir2/sub", "deldir"] {
        fs::create_dir_all(s.join(d)).unwrap();
    }
    for f in ["dir/sub/f", "dir2/f", "deldir/x", "file", "gone", "append"] {
        fs::write(s.join(f), format!("{f}\n")).unwrap();
    }
}

/// A fixed script through the mount that makes every kind of overlay object: renamed dirs with
/// lower parts (relative and absolute redirects), a removed file (whiteout), a dir removed and
/// made again (opaque), copy-ups (origin; metadata only with metacopy=on), a renamed copied-up
/// file.
fn script(mnt: &Path) {
    let s = mnt.join("script");
    fs::rename(s.join("dir"), s.join("dir-moved")).unwrap();
    fs::rename(s.join("dir2"), mnt.join("script-dir2-moved")).unwrap();
    fs::set_permissions(s.join("file"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fs::rename(s.join("file"), s.join("file-moved")).unwrap();
    fs::remove_file(s.join("gone")).unwrap();
    fs::remove_file(s.join("deldir/x")).unwrap();
    fs::remove_dir(s.join("deldir")).unwrap();
    fs::create_dir(s.join("deldir")).unwrap();
    fs::OpenOptions::new().append(true).open(s.join("append")).unwrap().write_all(b"more\n").unwrap();
}

/// Runs `ops` random operations (the differential test's) on the mount at `mnt`.
fn workload(mnt: &Path, seed: u64, ops: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4ec);
    let mut view = View::load(mnt);
    let mut done = 0;
    while done < ops {
        let mut dirty = false;
        for op in gen_ops(&mut rng, &view, mnt) {
            let r = apply(mnt, &op);
            dirty |= op.mutates() && r.is_ok();
            done += 1;
        }
        if dirty {
            view.reload(mnt);
        }
    }
}

/// What an upper layer holds of the overlay's own objects: `whiteout`, and the keys of the
/// `trusted.overlay.*` xattrs its objects carry (`redirect`, `origin`, `metacopy`, ...).
fn overlay_objects(upper: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (p, kind) in list_tree(upper) {
        let path = upper.join(&p);
        if kind == Kind::Char
            && fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::MetadataExt::rdev(&m) == 0)
        {
            out.insert("whiteout".to_string());
        }
        for (name, _) in xattrs(&path, |n| n.starts_with(b"trusted.overlay.")).unwrap() {
            out.insert(name.to_string_lossy().trim_start_matches("trusted.overlay.").to_string());
        }
    }
    out
}

/// Layers written through `backend` by a fixed script and then a random workload check clean:
/// no finding at all. They must have made every kind of overlay object the options allow.
fn written_layers_check_clean(backend: Backend) {
    let (seeds, ops) = (env_num("OVL_CHECK_SEEDS", 3), env_num("OVL_CHECK_OPS", 150) as usize);
    for (c, extra) in CONFIGS.iter().enumerate() {
        let mut made = BTreeSet::new();
        for seed in 0..seeds {
            let seed = seed + 100 * c as u64;
            let tmp = tempdir("ovl-check-clean-");
            let layers = generate_layers(&tmp.path().join("layers"), seed, 2, seed % 2 == 0);
            script_objects(&layers.lowers[0]);
            {
                let m = MountGuard::mount(backend, &layers, extra, &mount_point(tmp.path(), "mnt"));
                script(m.path());
                workload(m.path(), seed, ops);
                m.unmount().unwrap_or_else(|e| panic!("seed {seed}: unmount: {e}"));
            }
            made.extend(overlay_objects(&layers.upper));
            let out = check_layers(&layers, extra, &[]);
            let findings = out.set("findings");
            assert!(
                out.code == 0 && findings.is_empty(),
                "{backend:?} seed {seed} ({extra}): layers written by the overlay must check clean (exit {})\n{}{}",
                out.code,
                out.stdout,
                out.stderr
            );
        }
        let mut want = vec!["whiteout", "opaque", "redirect", "origin", "impure"];
        if extra.contains("metacopy=on") {
            want.push("metacopy");
        }
        for w in want {
            assert!(made.contains(w), "{backend:?} ({extra}): the workloads never made a {w}: {made:?}");
        }
    }
}

#[test]
fn layers_the_kernel_wrote_check_clean() {
    written_layers_check_clean(Backend::Kernel);
}

#[test]
fn layers_ovlfs_wrote_check_clean() {
    written_layers_check_clean(Backend::Ovlfs);
}

/// The lower layers of the corruption scenarios.
const LOWERS: &str = "
    l2 dir d
    l2 file d/x lower x
    l2 dir m
    l2 file m/a lower a
    l1 dir keep
    l1 file keep/k kept
    l1 file f hello
    l1 file mc data of mc
    u dir d
    u wh d/x
";

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

/// An `overlay.origin` value naming the lower file `lower/name`, which is then deleted.
fn stale_origin(lower: &Path, name: &str) -> Vec<u8> {
    let path = lower.join(name);
    fs::write(&path, b"soon gone").unwrap();
    // CLOEXEC like every std open: the daemons other tests spawn meanwhile must not inherit it.
    let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC;
    let dir = rustix::fs::open(lower, flags, rustix::fs::Mode::empty()).unwrap();
    let handle = ovl_core::sys::name_to_handle(&dir, &std::ffi::CString::new(name).unwrap()).unwrap();
    let value = ovl_core::Origin { uuid: ovl_core::sys::fs_uuid(&dir), handle, path_upper: false }.encode();
    fs::remove_file(&path).unwrap();
    value
}

/// An `overlay.origin` value of a valid shape naming a filesystem that is nowhere.
fn foreign_origin() -> Vec<u8> {
    let handle = ovl_core::sys::FileHandle { handle_type: 1, bytes: vec![1, 2, 3, 4, 5, 6, 7, 8] };
    ovl_core::Origin { uuid: [0x5a; 16], handle, path_upper: false }.encode()
}

/// Injects one corruption of each kind into the upper layer and the work dir; returns what the
/// check must report: `(severity, kind, path relative to the upper or work dir's parent)`.
fn corrupt(layers: &Layers) -> Vec<(&'static str, &'static str, PathBuf)> {
    let u = &layers.upper;
    let mut want = Vec::new();
    let mut expect = |sev, kind, path: PathBuf| want.push((sev, kind, path));

    make_whiteout(&u.join("ghost"));
    expect("fixable", "orphan-whiteout", u.join("ghost"));
    make_whiteout(&u.join("d/ghost2"));
    expect("fixable", "orphan-whiteout", u.join("d/ghost2"));
    fs::create_dir(u.join("m")).unwrap();
    set_opaque(&u.join("m"), b"y");
    make_whiteout(&u.join("m/a"));
    expect("fixable", "whiteout-in-opaque-dir", u.join("m/a"));

    fs::create_dir(u.join("badr")).unwrap();
    set_xattr(&u.join("badr"), "trusted.overlay.redirect", b"a/b");
    expect("error", "redirect-malformed", u.join("badr"));
    fs::create_dir(u.join("dang")).unwrap();
    set_xattr(&u.join("dang"), "trusted.overlay.redirect", b"/nowhere");
    expect("warning", "redirect-dangling", u.join("dang"));
    fs::create_dir(u.join("d/loop")).unwrap();
    set_xattr(&u.join("d/loop"), "trusted.overlay.redirect", b"/d");
    expect("error", "redirect-loop", u.join("d/loop"));
    fs::create_dir(u.join("dup")).unwrap();
    set_xattr(&u.join("dup"), "trusted.overlay.redirect", b"/keep");
    expect("error", "redirect-duplicate", u.join("dup"));
    symlink("f", u.join("sym")).unwrap();
    set_xattr(&u.join("sym"), "trusted.overlay.redirect", b"f");
    expect("error", "redirect-on-non-dir", u.join("sym"));
    // What the kernel leaves on a renamed metacopy file after copying up its data: not reported.
    fs::write(u.join("plain"), b"plain").unwrap();
    set_xattr(&u.join("plain"), "trusted.overlay.redirect", b"f");

    fs::write(u.join("oc"), b"x").unwrap();
    set_xattr(&u.join("oc"), "trusted.overlay.origin", &[0, 0xfb, 99, 0, 1, 2, 3]);
    expect("error", "origin-corrupt", u.join("oc"));
    fs::write(u.join("ostale"), b"x").unwrap();
    set_xattr(&u.join("ostale"), "trusted.overlay.origin", &stale_origin(&layers.lowers[0], "gone"));
    expect("warning", "origin-stale", u.join("ostale"));
    fs::write(u.join("oforeign"), b"x").unwrap();
    set_xattr(&u.join("oforeign"), "trusted.overlay.origin", &foreign_origin());
    expect("warning", "origin-foreign", u.join("oforeign"));

    fs::write(u.join("nodata"), b"").unwrap();
    set_xattr(&u.join("nodata"), "trusted.overlay.metacopy", b"");
    expect("error", "metacopy-no-data", u.join("nodata"));
    fs::write(u.join("f"), b"").unwrap();
    set_xattr(&u.join("f"), "trusted.overlay.metacopy", &[1, 2, 3]);
    expect("error", "metacopy-invalid", u.join("f"));
    // Metacopy files with data below, by name and through an absolute redirect: not reported.
    fs::write(u.join("mc"), b"").unwrap();
    set_xattr(&u.join("mc"), "trusted.overlay.metacopy", b"");
    fs::write(u.join("moved"), b"").unwrap();
    set_xattr(&u.join("moved"), "trusted.overlay.metacopy", b"");
    set_xattr(&u.join("moved"), "trusted.overlay.redirect", b"/d/x");

    fs::create_dir(u.join("odd")).unwrap();
    set_xattr(&u.join("odd"), "trusted.overlay.opaque", b"z");
    expect("warning", "opaque-invalid", u.join("odd"));
    fs::write(u.join("imp"), b"x").unwrap();
    set_xattr(&u.join("imp"), "trusted.overlay.impure", b"y");
    expect("warning", "impure-on-non-dir", u.join("imp"));
    fs::write(u.join("unk"), b"x").unwrap();
    set_xattr(&u.join("unk"), "trusted.overlay.frobnicate", b"1");
    set_xattr(&u.join("unk"), "trusted.overlay.overlay.user", b"an escaped user xattr: fine");
    expect("warning", "unknown-xattr", u.join("unk"));

    let work = layers.work.join("work");
    fs::create_dir_all(work.join("half/sub")).unwrap();
    fs::write(work.join("#ovl.1.2"), b"partial").unwrap();
    expect("fixable", "stale-work-entry", work.join("half"));
    expect("fixable", "stale-work-entry", work.join("#ovl.1.2"));
    // The kernel's shared whiteout, which it leaves at every unmount: not reported.
    make_whiteout(&work.join("#2a"));
    fs::create_dir(layers.work.join("index")).unwrap();
    expect("warning", "index-not-checked", layers.work.join("index"));
    want
}

fn as_set(v: &[(&str, &str, PathBuf)]) -> BTreeSet<(String, String, PathBuf)> {
    v.iter().map(|(s, k, p)| (s.to_string(), k.to_string(), p.clone())).collect()
}

#[test]
fn every_corruption_is_reported_and_repair_fixes_only_the_fixable() {
    let tmp = tempdir("ovl-check-corrupt-");
    let root = fs::canonicalize(tmp.path()).unwrap();
    let layers = Layers::create(&root.join("layers"), 2);
    apply_fixture(&layers, LOWERS);
    let want = corrupt(&layers);
    let opts = "redirect_dir=on,metacopy=on";

    let first = check_layers(&layers, opts, &[]);
    assert_eq!(first.code, 1, "errors remain: exit 1\n{}{}", first.stdout, first.stderr);
    let got = first.set("findings");
    assert_eq!(got, as_set(&want), "\n{}", first.stdout);
    let human = ovlfs_check(&["-o", &layers.mount_options(opts)]);
    assert_eq!(human.code, 1);
    for (sev, kind, path) in &want {
        let line = format!("{sev}: {}: ", path.display());
        assert!(
            human.stdout.lines().any(|l| l.starts_with(&line) && l.ends_with(&format!("[{kind}]"))),
            "the human report names {kind} at {}:\n{}",
            path.display(),
            human.stdout
        );
    }
    assert!(human.stdout.contains("--repair removes the fixable ones"), "{}", human.stdout);

    // Without metacopy=on the kernel refuses metacopy files: a warning on each.
    let no_meta = check_layers(&layers, "redirect_dir=on", &[]).set("findings");
    for f in ["nodata", "mc", "moved"] {
        let w = ("warning".to_string(), "metacopy-not-enabled".to_string(), layers.upper.join(f));
        assert!(no_meta.contains(&w), "{f}: {no_meta:?}");
    }
    // Options that do not follow redirects: each redirected dir says so (and is not judged).
    let no_follow = check_layers(&layers, "redirect_dir=nofollow,metacopy=on", &[]).set("findings");
    for d in ["dang", "d/loop", "dup", "badr"] {
        let w = ("warning".to_string(), "redirect-not-followed".to_string(), layers.upper.join(d));
        assert!(no_follow.contains(&w), "{d}: {no_follow:?}");
    }

    let repaired = check_layers(&layers, opts, &["--repair"]);
    assert_eq!(repaired.code, 1, "errors remain after a repair\n{}{}", repaired.stdout, repaired.stderr);
    let fixable: Vec<_> = want.iter().filter(|w| w.0 == "fixable").cloned().collect();
    let rest: Vec<_> = want.iter().filter(|w| w.0 != "fixable").cloned().collect();
    assert_eq!(repaired.set("repaired"), as_set(&fixable), "\n{}", repaired.stdout);
    assert_eq!(repaired.set("findings"), as_set(&rest), "\n{}", repaired.stdout);
    for (_, _, p) in &fixable {
        assert!(fs::symlink_metadata(p).is_err(), "{} was not removed", p.display());
    }
    assert!(layers.work.join("work/#2a").exists(), "the kernel's whiteout is not ours to remove");
    assert!(layers.upper.join("d/x").exists(), "a whiteout that hides a lower file stays");
    let again = check_layers(&layers, opts, &[]);
    assert_eq!(again.set("findings"), as_set(&rest), "a check after the repair finds the same\n{}", again.stdout);
}

/// Whiteouts that hide nothing in merged dirs, work dir leftovers and warnings: after a repair
/// the kernel shows exactly the tree it showed before.
#[test]
fn a_repair_does_not_change_what_the_kernel_shows() {
    let tmp = tempdir("ovl-check-view-");
    let root = fs::canonicalize(tmp.path()).unwrap();
    let layers = Layers::create(&root.join("layers"), 2);
    apply_fixture(&layers, LOWERS);
    let u = &layers.upper;
    for p in ["ghost", "d/ghost2"] {
        make_whiteout(&u.join(p));
    }
    fs::create_dir(u.join("dang")).unwrap();
    set_xattr(&u.join("dang"), "trusted.overlay.redirect", b"/nowhere");
    fs::create_dir(u.join("odd")).unwrap();
    set_xattr(&u.join("odd"), "trusted.overlay.opaque", b"z");
    fs::write(u.join("oforeign"), b"x").unwrap();
    set_xattr(&u.join("oforeign"), "trusted.overlay.origin", &foreign_origin());
    fs::create_dir_all(layers.work.join("work/half")).unwrap();
    // Old times everywhere, so the comparison sees any time a repair would change.
    set_old_times(u, &mut StdRng::seed_from_u64(1));
    let opts = "redirect_dir=on,index=off,metacopy=off,xino=off";

    let before = {
        let copy = layers.copy_to(&root.join("copy"));
        let copy = copy.with_fresh_work(root.join("copy/work2"));
        let k = MountGuard::mount(Backend::Kernel, &copy, opts, &mount_point(&root, "mnt-before"));
        snapshot_tree(k.path())
    };
    let out = check_layers(&layers, opts, &["--repair"]);
    assert_eq!(out.code, 0, "only warnings remain\n{}{}", out.stdout, out.stderr);
    assert_eq!(out.set("repaired").len(), 3, "{}", out.stdout);
    assert!(out.set("findings").iter().all(|f| f.0 == "warning"), "{}", out.stdout);
    let after = layers.with_fresh_work(root.join("work2"));
    let k = MountGuard::mount(Backend::Kernel, &after, opts, &mount_point(&root, "mnt-after"));
    assert_same_tree("kernel view across a repair", "before", &before, "after", &snapshot_tree(k.path()));
}

/// Names `dir` lists that cannot be looked up.
fn phantoms(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| fs::symlink_metadata(dir.join(n)).is_err())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// In a dir that merges nothing (opaque, or only in the upper layer) the kernel lists a
/// whiteout as an entry nothing can be looked up under: a repair removes those phantoms and
/// nothing else.
#[test]
fn a_repair_removes_the_phantoms_of_whiteouts_in_unmerged_dirs() {
    let tmp = tempdir("ovl-check-phantom-");
    let root = fs::canonicalize(tmp.path()).unwrap();
    let layers = Layers::create(&root.join("layers"), 2);
    apply_fixture(&layers, LOWERS);
    let u = &layers.upper;
    fs::create_dir(u.join("m")).unwrap();
    set_opaque(&u.join("m"), b"y");
    fs::write(u.join("m/new"), b"new in m\n").unwrap();
    make_whiteout(&u.join("m/a"));
    fs::create_dir(u.join("pure")).unwrap();
    fs::write(u.join("pure/y"), b"y\n").unwrap();
    make_whiteout(&u.join("pure/x"));
    let opts = "redirect_dir=on,index=off,metacopy=off,xino=off";
    let out = check_layers(&layers, opts, &[]);
    let want = as_set(&[
        ("fixable", "whiteout-in-opaque-dir", u.join("m/a")),
        ("fixable", "orphan-whiteout", u.join("pure/x")),
    ]);
    assert_eq!(out.set("findings"), want, "{}", out.stdout);
    {
        let k = MountGuard::mount(Backend::Kernel, &layers, opts, &mount_point(&root, "mnt-before"));
        assert_eq!(phantoms(&k.path().join("m")), ["a"]);
        assert_eq!(phantoms(&k.path().join("pure")), ["x"]);
    }
    let out = check_layers(&layers, opts, &["--repair"]);
    assert_eq!(out.set("repaired"), want, "{}", out.stdout);
    assert!(out.set("findings").is_empty(), "{}", out.stdout);
    let k = MountGuard::mount(Backend::Kernel, &layers, opts, &mount_point(&root, "mnt-after"));
    for (dir, name) in [("m", "new"), ("pure", "y")] {
        assert!(phantoms(&k.path().join(dir)).is_empty());
        assert_eq!(fs::read_dir(k.path().join(dir)).unwrap().count(), 1, "{dir} keeps only {name}");
        assert!(k.path().join(dir).join(name).is_file());
    }
}

#[test]
fn a_volatile_marker_is_an_error_a_repair_keeps() {
    let tmp = tempdir("ovl-check-volatile-");
    let root = fs::canonicalize(tmp.path()).unwrap();
    let layers = Layers::create(&root.join("layers"), 1);
    let opts = "volatile";
    {
        let k = MountGuard::mount(Backend::Kernel, &layers, opts, &mount_point(&root, "mnt"));
        fs::write(k.path().join("f"), b"written without fsync").unwrap();
    }
    let marker = layers.work.join("work/incompat/volatile");
    assert!(marker.is_dir(), "the kernel leaves its volatile marker even at a clean unmount");
    let out = check_layers(&layers, "", &["--repair"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(out.set("findings"), as_set(&[("error", "volatile-incompat", marker.clone())]), "{}", out.stdout);
    assert!(marker.is_dir(), "a repair must not remove the marker");
}

#[test]
fn usage_errors_and_layers_in_use() {
    let tmp = tempdir("ovl-check-usage-");
    let root = fs::canonicalize(tmp.path()).unwrap();
    let layers = Layers::create(&root.join("layers"), 1);
    for (args, what) in [
        (vec![], "no options"),
        (vec!["--frobnicate".to_string()], "an unknown flag"),
        (vec!["-o".to_string(), format!("lowerdir={}", layers.lowers[0].display())], "no upper layer"),
        (
            vec!["-o".to_string(), format!("lowerdir={0},upperdir={0}/nope,workdir={0}/w", root.display())],
            "a missing dir",
        ),
        (vec!["-o".to_string(), layers.mount_options("frob=1")], "an unknown option"),
    ] {
        let out = ovlfs_check(&args);
        assert_eq!(out.code, 2, "{what}: bad usage is exit 2\n{}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains("usage: ovlfs check"), "{what}: {}", out.stderr);
    }
    let help = ovlfs_check(&["--help"]);
    assert!(help.code == 0 && help.stdout.contains("Example"), "{}", help.stdout);
    let clean = ovlfs_check(&["-o", &layers.mount_options("")]);
    assert_eq!((clean.code, clean.stdout.trim()), (0, "checked 1 object: clean"), "{}", clean.stderr);

    make_whiteout(&layers.upper.join("ghost"));
    for backend in [Backend::Kernel, Backend::Ovlfs] {
        let m = MountGuard::mount(backend, &layers, "", &mount_point(&root, &format!("mnt-{backend:?}")));
        let out = check_layers(&layers, "", &[]);
        assert!(
            out.set("findings").iter().any(|f| f.1 == "layers-in-use"),
            "{backend:?}: a check of mounted layers says so\n{}",
            out.stdout
        );
        let refused = check_layers(&layers, "", &["--repair"]);
        assert_eq!(refused.code, 1, "{backend:?}: {}{}", refused.stdout, refused.stderr);
        assert!(refused.stderr.contains("refusing to repair"), "{backend:?}: {}", refused.stderr);
        assert!(layers.upper.join("ghost").exists(), "{backend:?}: nothing repaired while mounted");
        m.unmount().unwrap();
    }
    // mount.fuse3's form with a source named `check` still mounts.
    let mnt = mount_point(&root, "mnt-check-source");
    let out =
        Command::new(ovlfs_bin()).arg("check").arg(&mnt).arg("-o").arg(layers.mount_options("")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mount_fstype(&mnt).as_deref(), Some("fuse.ovlfs"));
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
}
