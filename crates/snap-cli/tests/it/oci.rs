//! `ovlsnap push`, `pull` and `send --oci-layout` (issue 22) against a real registry on loopback
//! (`common::registry`): a later push uploads only its new layer, pulls rebuild every snapshot
//! exactly (into a tree, and as snapshots of another LIVE), skopeo and podman read the images,
//! layouts are byte-reproducible, and the bad days: a registry going down mid-push, corrupt or
//! truncated blobs, images ovlsnap did not make, wrong credentials.
//!
//! Tests skip (saying so) when `docker-registry` cannot start; the podman check skips when podman
//! is missing.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::common::registry::Registry;
use crate::common::*;
use crate::stream::{assert_same, build_chain, change_1, change_2, mkdirs, random, write};

/// `ovlsnap ARGS` with `env` set (e.g. the auth file).
fn ovlsnap_env(env: &[(&str, &Path)], args: &[&OsStr]) -> CliOutput {
    let mut argv: Vec<OsString> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = OsString::from(format!("{k}="));
            kv.push(v);
            kv
        })
        .collect();
    if !env.iter().any(|(k, _)| *k == "REGISTRY_AUTH_FILE") {
        // No auth file of the machine's user may change what a test sees.
        argv.push("REGISTRY_AUTH_FILE=/nonexistent".into());
    }
    // A HOME nothing can be made in: no auth file or layer cache of the user's is read or made.
    argv.push("HOME=/dev/null".into());
    argv.push(ovlsnap_bin().into());
    argv.extend(args.iter().map(|a| a.to_os_string()));
    run_with_deadline(OsStr::new("env"), &argv).unwrap_or_else(|e| panic!("{e}"))
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `ovlsnap push --insecure --json NAME REF --mount MNT`, which must succeed: (stored, present).
fn push(m: &SnapMount, name: &str, reference: &str) -> (usize, usize) {
    let cache = m.scratch().path().join("cache");
    let out = ovlsnap_env(
        &[("XDG_CACHE_HOME", &cache)],
        &[os("push"), os("--insecure"), os("--json"), os(name), os(reference), os("--mount"), m.mnt().as_os_str()],
    );
    let v: serde_json::Value =
        serde_json::from_str(out.expect_ok(&format!("push {name}"))).expect("push --json prints JSON");
    (v["stored"].as_array().unwrap().len(), v["present"].as_array().unwrap().len())
}

fn try_pull(reference: &str, dir: &Path) -> CliOutput {
    ovlsnap_env(&[], &[os("pull"), os("--insecure"), os(reference), dir.as_os_str()])
}

fn try_pull_into(reference: &str, m: &SnapMount) -> CliOutput {
    ovlsnap_env(&[], &[os("pull"), os("--insecure"), os("--into"), m.mnt().as_os_str(), os(reference)])
}

fn names(m: &SnapMount) -> Vec<String> {
    let out = ovlsnap(&[os("list"), os("--json"), os("--mount"), m.mnt().as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.expect_ok("list --json")).unwrap();
    v.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

/// A tree for a chain of snapshots: `build_chain`'s, plus a hard link and a static busybox.
fn build(root: &Path, rng: &mut StdRng) {
    build_chain(root, rng);
    fs::hard_link(root.join("a/keep"), root.join("b/keep-too")).unwrap();
    if Path::new("/bin/busybox").exists() {
        fs::copy("/bin/busybox", root.join("busybox")).unwrap();
    }
}

fn start_registry(auth: Option<(&str, &str)>) -> Option<Registry> {
    let r = Registry::start(auth);
    if r.is_none() {
        eprintln!("skipping: no registry could be started on loopback (install docker-registry)");
    }
    r
}

#[test]
fn each_push_uploads_only_its_new_layer_and_pulls_rebuild_every_snapshot() {
    let Some(reg) = start_registry(None) else { return };
    let mut rng = StdRng::seed_from_u64(22);
    let m = SnapMount::start(Form::Stacked, |live| build(live, &mut rng));
    let reference = format!("{}/backups/data:latest", reg.addr());
    m.take(Some("s1"));
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));
    change_2(m.mnt(), &mut rng);
    m.take(Some("s3"));

    for (i, s) in ["s1", "s2", "s3"].into_iter().enumerate() {
        let before = reg.blob_count();
        assert_eq!(push(&m, s, &reference), (1, i), "push {s}: (layers uploaded, layers already there)");
        // Its layer, config and manifest; the older layers were found there.
        assert_eq!(reg.blob_count() - before, 3, "blobs the registry gained with push {s}");
    }
    // A push of what the tag holds uploads no layer.
    assert_eq!(push(&m, "s3", &reference), (0, 3));
    // The layers made are remembered (a later push need not make them again to learn their
    // digests): s1's tree, s1→s2, s2→s3.
    let cached: serde_json::Value =
        serde_json::from_slice(&fs::read(m.scratch().path().join("cache/ovlsnap/layers.json")).unwrap()).unwrap();
    assert_eq!(cached.as_object().map(|o| o.len()), Some(3), "{cached}");

    let dir = m.scratch().path().join("pulled");
    try_pull(&reference, &dir).expect_ok("pull into a new dir");
    assert_same(&m.view("s3"), &dir, true, "the pulled tree against s3's view");
    assert!(!m.scratch().path().join(".ovlsnap-pull.pulled").exists(), "the pull's cache stays after success");
    let out = try_pull(&reference, &dir);
    assert!(out.expect_failure("pull into a dir that is not empty").contains("not empty"));

    // A second machine: the chain becomes its snapshots, with their names and trees.
    let other = SnapMount::start(Form::Separate, |_| {});
    try_pull_into(&reference, &other).expect_ok("pull --into an empty LIVE");
    assert_eq!(names(&other), ["s1", "s2", "s3"]);
    for s in ["s1", "s2", "s3"] {
        assert_same(&m.view(s), &other.view(s), true, &format!("{s} pulled into another LIVE"));
    }
    assert_same(&m.view("s3"), other.mnt(), true, "the other LIVE after the pull");

    // A later snapshot: one more layer up, one more snapshot down.
    write(&m.mnt().join("later"), b"after s3");
    fs::remove_file(m.mnt().join("b/keep-too")).unwrap();
    m.take(Some("s4"));
    assert_eq!(push(&m, "s4", &reference), (1, 3));
    try_pull_into(&reference, &other).expect_ok("pull --into the LIVE holding s1..s3");
    assert_eq!(names(&other), ["s1", "s2", "s3", "s4"]);
    assert_same(&m.view("s4"), &other.view("s4"), true, "s4 pulled into the other LIVE");

    // The other machine pushes the same chain from its own snapshots: the same bytes, so every
    // layer is found there.
    let (stored, present) = push(&other, "s4", &reference);
    // Whole-tree layers depend only on the tree; a changes layer also on how the diff saw the
    // change (a rename made on the first machine is a removal and an addition on the second).
    assert!(stored + present == 4 && present >= 1, "the other machine's push: ({stored}, {present})");
    let dir = m.scratch().path().join("pulled-from-other");
    try_pull(&reference, &dir).expect_ok("pull of the other machine's push");
    assert_same(&m.view("s4"), &dir, true, "the other machine's image of s4");
    // A new tag starts a chain with the snapshot's whole tree.
    let reference2 = format!("{}/backups/data:second", reg.addr());
    assert_eq!(push(&m, "s2", &reference2), (1, 0));

    // A LIVE that changed since its newest pulled snapshot is refused: a pull would mix them.
    write(&other.mnt().join("local-change"), b"x");
    let out = try_pull_into(&reference, &other);
    assert!(out.expect_failure("pull --into a changed LIVE").contains("changed since"), "{out}");
    assert!(other.mnt().join("local-change").exists(), "a refused pull changed LIVE");
    // With --force the change goes (LIVE is made s4 again) and the new snapshot comes.
    write(&m.mnt().join("fifth"), b"5");
    m.take(Some("s5"));
    assert_eq!(push(&m, "s5", &reference), (1, 4));
    ovlsnap_env(
        &[],
        &[os("pull"), os("--insecure"), os("--force"), os("--into"), other.mnt().as_os_str(), os(&reference)],
    )
    .expect_ok("pull --into --force a changed LIVE");
    assert_eq!(names(&other), ["s1", "s2", "s3", "s4", "s5"]);
    assert!(!other.mnt().join("local-change").exists(), "the change made since s4 is still there");
    assert_same(&m.view("s5"), &other.view("s5"), true, "s5 pulled after rolling back");
    assert_same(&m.view("s4"), &other.view("s4"), true, "s4 after the roll back");
}

#[test]
fn layouts_are_reproducible_and_skopeo_and_podman_read_the_images() {
    let Some(reg) = start_registry(None) else { return };
    let mut rng = StdRng::seed_from_u64(23);
    let mut m = SnapMount::start(Form::Separate, |live| build(live, &mut rng));
    m.take(Some("s1"));
    change_1(m.mnt(), &mut rng);
    m.take(Some("s2"));

    let mnt = m.mnt().to_path_buf();
    let layout = |dir: &Path, s: &str| {
        let arg = format!("{}:v1", dir.display());
        ovlsnap_env(&[], &[os("send"), os("--oci-layout"), os(&arg), os(s), os("--mount"), mnt.as_os_str()])
            .expect_ok(&format!("send --oci-layout {s}"));
        let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_string()
    };
    let (l1, l2) = (m.scratch().path().join("layout1"), m.scratch().path().join("layout2"));
    layout(&l1, "s1");
    let d1 = layout(&l1, "s2");
    let d2 = layout(&l2, "s1");
    let d2 = {
        assert_ne!(d2, d1);
        layout(&l2, "s2")
    };
    assert_eq!(d1, d2, "the same chain written twice has the same manifest digest");
    m.umount();
    m.mount();
    let l3 = m.scratch().path().join("layout3");
    layout(&l3, "s1");
    assert_eq!(layout(&l3, "s2"), d1, "the same chain after a remount has the same manifest digest");

    // skopeo reads the layout and copies it to the registry; ovlsnap pulls that copy.
    let skopeo = |args: &[&str]| {
        run_with_deadline(os("skopeo"), &args.iter().map(OsString::from).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let src = format!("oci:{}:v1", l1.display());
    let inspect = skopeo(&["inspect", &src]);
    let v: serde_json::Value = serde_json::from_str(inspect.expect_ok("skopeo inspect")).unwrap();
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(2), "{v}");
    let reference = format!("{}/copied:v1", reg.addr());
    skopeo(&["copy", "--dest-tls-verify=false", &src, &format!("docker://{reference}")]).expect_ok("skopeo copy");
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")]);
    assert!(raw.expect_ok("skopeo inspect --raw").contains("io.ovlsnap.layer.snapshot"), "annotations lost: {raw}");
    let dir = m.scratch().path().join("pulled");
    try_pull(&reference, &dir).expect_ok("pull of skopeo's copy");
    assert_same(&m.view("s2"), &dir, true, "the pulled copy against s2's view");

    // zstd layers: written, copied and pulled alike.
    let lz = m.scratch().path().join("layout-zstd");
    let arg = format!("{}:v1", lz.display());
    ovlsnap_env(
        &[],
        &[
            os("send"),
            os("--oci-layout"),
            os(&arg),
            os("--compression"),
            os("zstd"),
            os("s2"),
            os("--mount"),
            m.mnt().as_os_str(),
        ],
    )
    .expect_ok("send --oci-layout --compression zstd");
    let zref = format!("{}/zstd:v1", reg.addr());
    skopeo(&["copy", "--dest-tls-verify=false", &format!("oci:{arg}"), &format!("docker://{zref}")])
        .expect_ok("skopeo copy (zstd)");
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{zref}")]);
    assert!(raw.expect_ok("skopeo inspect --raw").contains("tar+zstd"), "{raw}");
    let dir = m.scratch().path().join("pulled-zstd");
    try_pull(&zref, &dir).expect_ok("pull of zstd layers");
    assert_same(&m.view("s2"), &dir, true, "the zstd image against s2's view");

    // podman runs the image: the container sees the snapshot's files, sizes, modes and owners.
    if Command::new("podman").arg("--version").output().is_err() || !m.view("s2").join("busybox").exists() {
        eprintln!("skipping the podman check: podman or /bin/busybox is missing");
        return;
    }
    let listing = "cd / && /busybox find b untouched x | /busybox sort | while read f; do if [ -d \"$f\" ]; then /busybox stat -c '%n dir %a %u %g' \"$f\"; \
                   else /busybox stat -c '%n %s %a %u %g %h' \"$f\"; fi; done";
    let ran = run_with_deadline(
        os("podman"),
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--tls-verify=false",
            &reference,
            "/busybox",
            "sh",
            "-c",
            listing,
        ]
        .map(OsString::from),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = Command::new("podman").args(["rmi", &reference]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let local = run_with_deadline(
        os("sh"),
        &[
            "-c".into(),
            listing
                .replace("cd /", &format!("cd {}", m.view("s2").display()))
                .replace("/busybox ", "/bin/busybox ")
                .into(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ran.expect_ok("podman run"),
        local.expect_ok("the same listing of the view"),
        "podman's view of /b, /untouched and /x"
    );
}

#[test]
fn a_push_cut_off_by_the_registry_going_down_fails_clearly_and_a_rerun_completes() {
    let Some(mut reg) = start_registry(None) else { return };
    let m = SnapMount::start(Form::Separate, |live| write(&live.join("small"), b"first"));
    let reference = format!("{}/cut:latest", reg.addr());
    m.take(Some("s1"));
    push(&m, "s1", &reference);
    let mut rng = StdRng::seed_from_u64(24);
    for i in 0..2 {
        write(&m.mnt().join(format!("big{i}")), &random(&mut rng, 16 << 20));
    }
    m.take(Some("s2"));

    let mut child = Command::new(ovlsnap_bin())
        .args(["push", "--insecure", "s2", &reference, "--mount"])
        .arg(m.mnt())
        .env("REGISTRY_AUTH_FILE", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Down as soon as the big layer's upload has begun.
    let uploads = reg.storage().join("docker/registry/v2/repositories/cut/_uploads");
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(&uploads).map_or(true, |mut d| d.next().is_none()) {
        assert!(child.try_wait().unwrap().is_none(), "the push ended before its upload began");
        assert!(Instant::now() < deadline, "no upload began in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    reg.stop();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the push succeeded with the registry down");
    assert!(err.contains("uploading blob") || err.contains("looking for blob"), "unclear error: {err}");

    reg.restart();
    let dir = m.scratch().path().join("after-failure");
    try_pull(&reference, &dir).expect_ok("pull after the failed push");
    assert_same(&m.view("s1"), &dir, true, "the tag after a failed push still gives s1");
    assert_eq!(push(&m, "s2", &reference), (1, 1), "the rerun uploads the layer the failed push did not finish");
    let dir = m.scratch().path().join("after-rerun");
    try_pull(&reference, &dir).expect_ok("pull after the rerun");
    assert_same(&m.view("s2"), &dir, true, "the tag after the rerun gives s2");
}

#[test]
fn pulls_refuse_corrupt_truncated_and_overlong_blobs_before_changing_anything_and_resume() {
    let Some(reg) = start_registry(None) else { return };
    let mut rng = StdRng::seed_from_u64(25);
    let m = SnapMount::start(Form::Separate, |live| {
        mkdirs(&live.join("d"));
        write(&live.join("d/f"), &random(&mut rng, 1 << 20));
    });
    let reference = format!("{}/bad:latest", reg.addr());
    m.take(Some("s1"));
    push(&m, "s1", &reference);
    write(&m.mnt().join("d/g"), &random(&mut rng, 1 << 20));
    m.take(Some("s2"));
    push(&m, "s2", &reference);
    let manifest = skopeo_raw_manifest(&reference);
    let first = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let second = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    let blob = reg.blob_path(&second);
    let good = fs::read(&blob).unwrap();
    let other = SnapMount::start(Form::Separate, |_| {});

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let truncated = good[..good.len() - 100].to_vec();
    let overlong = [&good[..], &[0; 4096][..]].concat();
    let dir = m.scratch().path().join("target");
    let cache = m.scratch().path().join(".ovlsnap-pull.target");
    for (what, bytes) in [("a corrupt blob", flipped), ("a truncated blob", truncated), ("an overlong blob", overlong)]
    {
        fs::write(&blob, &bytes).unwrap();
        let out = try_pull(&reference, &dir);
        let err = out.expect_failure(&format!("pull of {what}"));
        assert!(err.contains("digest") || err.contains("bytes"), "{what}: unclear error: {err}");
        assert!(!dir.exists(), "{what}: the target was made");
        // The first layer was checked and kept for a rerun; the bad one was not kept.
        let kept: Vec<String> =
            fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(kept.contains(&first.replace(':', "-")), "{what}: the good layer is not kept: {kept:?}");
        assert!(
            !kept.iter().any(|k| k.starts_with(&second.replace(':', "-"))),
            "{what}: the bad layer is kept: {kept:?}"
        );
        let out = try_pull_into(&reference, &other);
        out.expect_failure(&format!("pull --into of {what}"));
        assert!(names(&other).is_empty(), "{what}: a snapshot was taken");
        let left: Vec<_> = fs::read_dir(other.mnt()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{what}: LIVE changed: {left:?}");
    }
    fs::write(&blob, &good).unwrap();
    try_pull(&reference, &dir).expect_ok("pull of the repaired blob");
    assert_same(&m.view("s2"), &dir, true, "the pulled tree once the blob is whole");
    assert!(!cache.exists(), "the cache outlives a pull that succeeded");
}

#[test]
fn a_pull_keeps_no_blob_in_a_directory_another_user_made_first() {
    let Some(reg) = start_registry(None) else { return };
    let m = SnapMount::start(Form::Separate, |live| write(&live.join("f"), b"data"));
    m.take(Some("s1"));
    let reference = format!("{}/shared:latest", reg.addr());
    push(&m, "s1", &reference);
    // A shared dir (sticky, world-writable): another user made the pull's cache dir first.
    let shared = m.scratch().mkdir("shared");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let planted = shared.join(".ovlsnap-pull.target");
    fs::create_dir(&planted).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&planted, Some(1000), Some(1000)).unwrap();
    let victim = m.scratch().path().join("victim");
    write(&victim, b"must stay");
    std::os::unix::fs::symlink(&victim, planted.join("lock")).unwrap();
    let dir = shared.join("target");
    let out = try_pull(&reference, &dir);
    assert!(out.expect_failure("pull next to another user's dir").contains("only you may write"), "{out}");
    assert_eq!(fs::read(&victim).unwrap(), b"must stay", "the planted symlink was followed");
    assert!(!dir.exists());
    // Once it is gone, the pull makes its own.
    fs::remove_dir_all(&planted).unwrap();
    try_pull(&reference, &dir).expect_ok("pull once the planted dir is gone");
    assert_same(&m.view("s1"), &dir, true, "the pulled tree");
}

fn skopeo_raw_manifest(reference: &str) -> serde_json::Value {
    let out = run_with_deadline(
        os("skopeo"),
        &["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")].map(OsString::from),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(out.expect_ok("skopeo inspect --raw")).unwrap()
}

#[test]
fn images_ovlsnap_did_not_make_pull_as_trees_and_are_refused_as_snapshots() {
    let Some(reg) = start_registry(None) else { return };
    let s = Scratch::new();
    // An image of one layer made by GNU tar (`./` names), in a layout written by hand.
    let src = s.mkdir("src");
    mkdirs(&src.join("etc/app"));
    write(&src.join("etc/app/conf"), b"key = value\n");
    fs::set_permissions(src.join("etc/app/conf"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    let layout = s.mkdir("layout");
    let blobs = layout.join("blobs/sha256");
    mkdirs(&blobs);
    let tar = s.path().join("layer.tar");
    sh(&format!("tar --format=pax -C {} -cf {} . && gzip -n -k {}", src.display(), tar.display(), tar.display()));
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = s.path().join("blob");
        fs::write(&tmp, bytes).unwrap();
        let hex = sh(&format!("sha256sum {} | cut -d' ' -f1", tmp.display())).trim().to_string();
        fs::rename(&tmp, blobs.join(&hex)).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let diff_id = format!("sha256:{}", sh(&format!("sha256sum {} | cut -d' ' -f1", tar.display())).trim());
    let (layer, layer_size) = put(&fs::read(tar.with_extension("tar.gz")).unwrap());
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}});
    let (config, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest, "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let reference = format!("{}/foreign:v1", reg.addr());
    let out = run_with_deadline(
        os("skopeo"),
        &["copy", "--dest-tls-verify=false", &format!("oci:{}:v1", layout.display()), &format!("docker://{reference}")]
            .map(OsString::from),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out.expect_ok("skopeo copy of the hand-made image");

    let dir = s.path().join("pulled");
    try_pull(&reference, &dir).expect_ok("pull of a foreign image into a dir");
    assert_same_tree(&record_tree(&src), &record_tree(&dir), "the foreign image pulled as a tree");
    let m = SnapMount::start(Form::Separate, |_| {});
    let out = try_pull_into(&reference, &m);
    assert!(out.expect_failure("pull --into of a foreign image").contains("not made by ovlsnap"), "{out}");
    assert!(names(&m).is_empty());
}

#[test]
fn wrong_credentials_fail_in_one_line_and_right_ones_push_and_pull() {
    let Some(reg) = start_registry(Some(("alice", "s3cret"))) else { return };
    let m = SnapMount::start(Form::Separate, |live| write(&live.join("f"), b"data"));
    m.take(Some("s1"));
    let reference = format!("{}/private:latest", reg.addr());
    let auth = |user_pass: &str| -> PathBuf {
        let f = m.scratch().path().join(format!("auth-{}.json", user_pass.len()));
        let b64 = sh(&format!("printf %s '{user_pass}' | base64 -w0"));
        fs::write(&f, format!(r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#, reg.addr(), b64.trim())).unwrap();
        f
    };
    let push_with = |file: &Path| {
        ovlsnap_env(
            &[("REGISTRY_AUTH_FILE", file)],
            &[os("push"), os("--insecure"), os("s1"), os(&reference), os("--mount"), m.mnt().as_os_str()],
        )
    };
    let wrong = push_with(&auth("alice:wrong"));
    let err = wrong.expect_failure("push with a wrong password");
    assert_eq!(wrong.status.code(), Some(1), "{wrong}");
    assert_eq!(err.trim().lines().count(), 1, "the error is one line: {err}");
    assert!(err.contains("credentials"), "{err}");
    let none = push_with(Path::new("/nonexistent"));
    assert!(none.expect_failure("push without credentials").contains("credentials"), "{none}");

    let right = auth("alice:s3cret");
    push_with(&right).expect_ok("push with the right password");
    let dir = m.scratch().path().join("pulled");
    ovlsnap_env(&[("REGISTRY_AUTH_FILE", &right)], &[os("pull"), os("--insecure"), os(&reference), dir.as_os_str()])
        .expect_ok("pull with the right password");
    assert_same(&m.view("s1"), &dir, true, "pulled with credentials");
    // A credential helper named for the registry (as `docker login` with a helper leaves it).
    let bin = m.scratch().mkdir("bin");
    let helper = bin.join("docker-credential-ovltest");
    fs::write(
        &helper,
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread reg\n\
         printf '{\"ServerURL\":\"%s\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}' \"$reg\"\n",
    )
    .unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
    let with_helper = m.scratch().path().join("auth-helper.json");
    fs::write(&with_helper, format!(r#"{{"credHelpers": {{"{}": "ovltest"}}}}"#, reg.addr())).unwrap();
    let path = PathBuf::from(format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    let dir = m.scratch().path().join("pulled-with-helper");
    ovlsnap_env(
        &[("REGISTRY_AUTH_FILE", &with_helper), ("PATH", &path)],
        &[os("pull"), os("--insecure"), os(&reference), dir.as_os_str()],
    )
    .expect_ok("pull with credentials from a helper");
    assert_same(&m.view("s1"), &dir, true, "pulled with a helper's credentials");
    // Without --insecure a plain-HTTP registry is refused (TLS is verified by default).
    let tls = ovlsnap_env(
        &[("REGISTRY_AUTH_FILE", &right)],
        &[os("pull"), os(&reference), m.scratch().path().join("tls").as_os_str()],
    );
    tls.expect_failure("pull over TLS from a plain-HTTP registry");
}

/// `sh -c SCRIPT`'s stdout; panics if it fails.
fn sh(script: &str) -> String {
    let out = run_with_deadline(os("sh"), &["-c".into(), script.into()]).unwrap_or_else(|e| panic!("{e}"));
    out.expect_ok(script).to_string()
}
