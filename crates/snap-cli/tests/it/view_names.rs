//! View names the kernel keeps (issue 17: a walk through a view costs no LOOKUP per file, so
//! the kernel keeps view names for the entry timeout like LIVE's) never show a change made
//! after the take: neither a name looked up before LIVE changed the file, nor a descriptor
//! opened on it then, nor a newer view's name of the changed file, whose node must not be the
//! old one. The descriptor checks failed on the build before (the newer view's name joined the
//! old node, whose attributes then came from the changed LIVE file).

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// LIVE with a file `f` and a file of two names `g` and `h`.
fn init(live: &Path) {
    fs::write(live.join("f"), b"taken\n").unwrap();
    fs::write(live.join("g"), b"linked\n").unwrap();
    fs::hard_link(live.join("g"), live.join("h")).unwrap();
}

/// The whole content of open file `f`.
fn content(f: &File) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).expect("read a held view file");
    buf.truncate(n);
    buf
}

/// Checks that `view`'s `f` and `g` (through `held`, descriptors opened before the changes,
/// and by name) show what was taken.
fn assert_taken(view: &Path, held: &[(&str, &File)], when: &str) {
    let want = |name: &str| -> &'static [u8] { if name == "f" { b"taken\n" } else { b"linked\n" } };
    for (name, file) in held {
        let md = file.metadata().unwrap_or_else(|e| panic!("{when}: fstat of held {name}: {e}"));
        assert_eq!(md.len(), want(name).len() as u64, "{when}: size of held {name}");
        assert_eq!(content(file), want(name), "{when}: bytes of held {name}");
        let p = view.join(name);
        assert_eq!(fs::read(&p).unwrap(), want(name), "{when}: {}", p.display());
        assert_eq!(fs::metadata(&p).unwrap().len(), want(name).len() as u64, "{when}: size of {}", p.display());
    }
    assert_eq!(fs::read(view.join("h")).unwrap(), b"linked\n", "{when}: h");
}

/// The names of s1 are looked up and opened; LIVE changes `f` (rewritten), removes `h` (which
/// saves `g`'s file under both names) and then appends to `g` (no copy: the saved one stands);
/// s2 is taken and its names of the changed files looked up. s1 shows what it took, at once (the
/// names the kernel kept) and after the attribute timeout (the daemon answers for the nodes).
#[test]
fn a_view_name_kept_by_the_kernel_never_shows_a_later_change() {
    let m = SnapMount::start(Form::Separate, init);
    m.take(Some("s1"));
    let v1 = m.view("s1");
    let held_f = File::open(v1.join("f")).expect("open s1/f");
    let held_g = File::open(v1.join("g")).expect("open s1/g");
    let ino_before = fs::metadata(v1.join("f")).unwrap().ino();
    assert_eq!(fs::metadata(v1.join("h")).unwrap().nlink(), 2);
    let held = [("f", &held_f), ("g", &held_g)];
    assert_taken(&v1, &held, "before the changes");

    sh("printf 'changed after s1, and longer\\n' > f && rm h && echo more >> g", m.mnt());
    m.take(Some("s2"));
    let v2 = m.view("s2");
    assert_eq!(fs::read(v2.join("f")).unwrap(), b"changed after s1, and longer\n");
    assert_eq!(fs::read(v2.join("g")).unwrap(), b"linked\nmore\n");
    let ino_new = fs::metadata(v2.join("f")).unwrap().ino();
    assert_ne!(ino_new, ino_before, "s2's f (LIVE's changed file) is not s1's node");

    assert_taken(&v1, &held, "right after the changes");
    std::thread::sleep(Duration::from_millis(1200));
    assert_taken(&v1, &held, "after the attribute timeout");
    drop_caches();
    assert_taken(&v1, &held, "after a cache drop");
    let dir = m.scratch().mkdir("kernel");
    let k = KernelMount::view(&m, "s1", &dir);
    assert_taken(k.path(), &[], "the kernel's mount of s1");
    assert_eq!(fs::read(k.path().join("f")).unwrap(), b"taken\n");
}
