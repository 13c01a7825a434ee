//! Kernel mounts of a snapshot (issue 15): `ovlsnap mount-cmd` must print a command that is safe
//! to run with `sh -c "$(ovlsnap mount-cmd NAME DIR)"` as root, and `ovlsnap mount-view` must
//! mount the view itself, whatever MNT and DIR are called.
//!
//! Each hostile name is a directory holding LIVE, MNT and DIR. Through `mount-cmd` the shell must
//! mount exactly the snapshot's view (compared with `MNT/.snapshots/NAME`) and run nothing else
//! (the names try to `touch CANARY`), or `mount-cmd` must refuse with a message pointing to
//! `mount-view` and print nothing; `mount-view` must mount the view for every name, and delete
//! must be refused while it is. The check of the daemon's answer itself is unit-tested in
//! `src/view_mount.rs`.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use crate::common::*;

/// Names that a shell or mount(8) could misread, with whether mount-cmd may refuse them (mount(8)
/// cuts `-o` at every comma and stops at an unbalanced `"`).
const HOSTILE: &[(&str, bool)] = &[
    ("two words", false),
    ("it's", false),
    ("$(touch CANARY)", false),
    ("`touch CANARY`", false),
    ("x;touch CANARY;", false),
    ("a\\b", false),
    ("a:b", false),
    ("a=b&&touch CANARY||", false),
    ("a,ro", true),
    ("a,loop", true),
    ("say \"hi\"", true),
    ("' \"$(touch CANARY)\" `touch CANARY`;a\\:b,ro'\\''", true),
];

/// LIVE with a few files, snapshot `s1` taken, then LIVE changed so that the view differs from it.
fn snapshot_under(form: Form, sub: &str) -> SnapMount {
    let mut m = SnapMount::prepare_under(form, sub);
    fs::write(m.live().join("a"), b"one").unwrap();
    fs::create_dir(m.live().join("d")).unwrap();
    fs::write(m.live().join("d/b"), b"two").unwrap();
    m.mount();
    m.take(Some("s1"));
    fs::write(m.mnt().join("a"), b"changed").unwrap();
    fs::write(m.mnt().join("d/new"), b"new").unwrap();
    fs::remove_file(m.mnt().join("d/b")).unwrap();
    m
}

/// Panics if a file named CANARY exists anywhere under `root` or in our own working directory
/// (where a relative `touch` run by a test's shell would land).
fn assert_no_canary(root: &Path, what: &str) {
    assert!(!Path::new("CANARY").exists(), "{what}: the shell ran `touch CANARY` (in the test's cwd)");
    let found: Vec<_> =
        list_kinds(root).into_iter().filter(|(p, _)| p.file_name() == Some(OsStr::new("CANARY"))).collect();
    assert!(found.is_empty(), "{what}: the shell ran `touch CANARY`: {found:?}");
}

/// Runs `line` with `sh -c` in `cwd`.
fn sh_in(cwd: &Path, line: &str) -> CliOutput {
    let args = ["-C".into(), cwd.into(), "sh".into(), "-c".into(), line.into()];
    run_with_deadline(OsStr::new("env"), &args).unwrap_or_else(|e| panic!("{e}"))
}

/// mount-cmd through `sh -c` (or its refusal), then mount-view, for the name `sub`.
fn check_name(form: Form, sub: &str, may_refuse: bool) {
    let m = snapshot_under(form, sub);
    let base = m.live().parent().unwrap().to_owned();
    let want = record_tree(&m.view("s1"));
    let dir = base.join("view-cmd");
    fs::create_dir(&dir).unwrap();
    let out = m.try_mount_cmd("s1", &dir);
    let what = format!("{sub:?} ({form:?})");
    if may_refuse && !out.success() {
        let err = out.expect_failure(&format!("mount-cmd of {what}"));
        assert!(err.contains("mount-view") && out.stdout.is_empty(), "mount-cmd of {what}: a clear refusal\n{out}");
    } else {
        let line = m.mount_cmd("s1", &dir);
        let _k = KernelMount::adopt(&dir);
        sh_in(&base, &line).expect_ok(&format!("sh -c \"$(ovlsnap mount-cmd)\" of {what}"));
        assert_eq!(mounts_at(&dir).last().map(String::as_str), Some("overlay"), "{what}: `{line}` mounted no overlay");
        assert_same_tree(&want, &record_tree(&dir), &format!("the kernel's mount of s1 from mount-cmd, {what}"));
    }
    assert_no_canary(m.scratch().path(), &what);

    let dir = base.join("view");
    fs::create_dir(&dir).unwrap();
    {
        let _k = KernelMount::view(&m, "s1", &dir);
        assert_same_tree(&want, &record_tree(&dir), &format!("the kernel's mount of s1 from mount-view, {what}"));
        let out = ovlsnap(&[OsStr::new("delete"), OsStr::new("s1"), OsStr::new("--mount"), m.mnt().as_os_str()]);
        let err = out.expect_failure(&format!("delete while mount-view has s1 mounted, {what}"));
        assert!(err.contains("is mounted at") && err.contains("view"), "{what}: delete names the mount\n{out}");
    }
    assert_same_tree(&want, &record_tree(&m.view("s1")), &format!("s1 after the refused delete, {what}"));
    assert_no_canary(m.scratch().path(), &what);
}

#[test]
fn hostile_names_mount_the_right_tree_or_are_refused() {
    for (sub, may_refuse) in HOSTILE {
        check_name(Form::Separate, sub, *may_refuse);
    }
}

#[test]
fn a_hostile_name_of_a_stacked_mount() {
    check_name(Form::Stacked, "$(touch CANARY) a:b\\c 'd'", false);
    check_name(Form::Stacked, "a,ro", true);
}

#[test]
fn a_newline_or_control_character_is_refused_by_mount_cmd() {
    let m = snapshot_under(Form::Separate, "plain");
    let want = record_tree(&m.view("s1"));
    for name in ["new\nline", "esc\u{1b}[2J", "tab\there"] {
        let dir = m.scratch().mkdir(name);
        let out = m.try_mount_cmd("s1", &dir);
        let err = out.expect_failure(&format!("mount-cmd into {name:?}"));
        assert!(err.contains("control character") && err.contains("mount-view"), "{name:?}: a clear refusal\n{out}");
        assert!(out.stdout.is_empty(), "{name:?}: a refusal prints nothing on stdout\n{out}");
        let _k = KernelMount::view(&m, "s1", &dir);
        assert_same_tree(&want, &record_tree(&dir), &format!("mount-view into {name:?}"));
    }
    // MNT itself with a newline.
    let m = snapshot_under(Form::Separate, "mnt\nwith a newline");
    let want = record_tree(&m.view("s1"));
    let dir = m.scratch().mkdir("view");
    let out = m.try_mount_cmd("s1", &dir);
    assert!(out.expect_failure("mount-cmd of a MNT with a newline").contains("mount-view"), "{out}");
    assert!(out.stdout.is_empty(), "a refusal prints nothing on stdout\n{out}");
    let _k = KernelMount::view(&m, "s1", &dir);
    assert_same_tree(&want, &record_tree(&dir), "mount-view of a MNT with a newline");
}

#[test]
fn a_hostile_dir_under_a_plain_mnt_is_mounted_by_both() {
    // DIR is its own argument of mount(8), not part of `-o`: a comma or a quote in it is no
    // reason for mount-cmd to refuse.
    let m = snapshot_under(Form::Separate, "plain");
    let want = record_tree(&m.view("s1"));
    for name in ["a,ro", "say \"hi\"", "$(touch CANARY),x:y", "-o rw"] {
        let parent = m.scratch().mkdir(name);
        let dir = m.scratch().mkdir(&format!("{name}/cmd"));
        let line = m.mount_cmd("s1", &dir);
        {
            let _k = KernelMount::adopt(&dir);
            sh_in(&parent, &line).expect_ok(&format!("sh -c \"$(ovlsnap mount-cmd)\" into {name:?}"));
            assert_same_tree(&want, &record_tree(&dir), &format!("mount-cmd into {name:?}"));
        }
        let dir = m.scratch().mkdir(&format!("{name}/view"));
        let _k = KernelMount::view(&m, "s1", &dir);
        assert_same_tree(&want, &record_tree(&dir), &format!("mount-view into {name:?}"));
        assert_no_canary(m.scratch().path(), name);
    }
}

/// Issue 17: the kernel stacks at most 500 layers and mount(2) takes one page of options, so a
/// snapshot under 600 newer ones could not be mounted by the kernel at all (`mount-view`: "maximum
/// fs stacking depth exceeded"; `mount-cmd`'s command failed past ~130 layers). Now the daemon
/// consolidates the view's top layers into one (copies of the frozen layers' files, one per inode), and both
/// kernel mounts show exactly the view; the consolidated layer goes once no mount uses it.
#[test]
fn a_view_deeper_than_the_kernel_stacks_mounts_consolidated() {
    const SNAPSHOTS: usize = 600;
    let mut m = SnapMount::prepare(Form::Separate);
    for d in 0..10 {
        fs::create_dir_all(m.live().join(format!("d{d}"))).unwrap();
        for f in 0..5 {
            fs::write(m.live().join(format!("d{d}/f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    m.mount();
    for i in 0..SNAPSHOTS {
        m.take(Some(&format!("s{i}")));
        let (d, f) = (i % 10, (i / 10) % 5);
        match i % 3 {
            0 => fs::write(m.mnt().join(format!("d{d}/f{f}")), format!("changed after s{i}")).unwrap(),
            1 => fs::write(m.mnt().join(format!("d{d}/new{i}")), b"new").unwrap(),
            _ => {
                let _ = fs::remove_file(m.mnt().join(format!("d{d}/f{f}")));
            }
        }
    }
    let base = m.live().parent().unwrap().to_owned();
    for name in ["s0", "s250"] {
        let want = record_tree(&m.view(name));
        let dir = base.join(format!("view-{name}"));
        fs::create_dir(&dir).unwrap();
        {
            let k = KernelMount::view(&m, name, &dir);
            assert_same_tree(
                &want,
                &record_tree(k.path()),
                &format!("mount-view of {name} under {SNAPSHOTS} snapshots"),
            );
        }
        let line = m.mount_cmd(name, &dir);
        assert!(line.len() < 4096, "mount-cmd of {name}: {} bytes", line.len());
        {
            let k = KernelMount::snapshot(&m, name, &dir);
            assert_same_tree(
                &want,
                &record_tree(k.path()),
                &format!("mount-cmd of {name} under {SNAPSHOTS} snapshots"),
            );
            // Its layers are consolidated, and still in use: neither it nor one it holds goes.
            for held in [name.to_owned(), format!("s{}", name[1..].parse::<usize>().unwrap() + 1)] {
                let out =
                    ovlsnap(&[OsStr::new("delete"), OsStr::new(&held), OsStr::new("--mount"), m.mnt().as_os_str()]);
                let err = out.expect_failure(&format!("delete {held} while {name} is mounted consolidated"));
                assert!(err.contains("is mounted at"), "delete {held}: names the mount\n{out}");
            }
        }
    }
    // The snapshots stay as they were, and nothing is left of the consolidated layers but what a
    // mount uses (none now; the next consolidation or mount removes the rest).
    let views = m.live().join(".ovlsnap/views");
    assert!(fs::read_dir(&views).unwrap().count() > 0, "consolidated layers were made in {}", views.display());
    m.umount();
    m.mount();
    assert_eq!(fs::read_dir(&views).unwrap().count(), 0, "unused consolidated layers are removed at a mount");
    assert_eq!(m.list().len(), SNAPSHOTS);
}
