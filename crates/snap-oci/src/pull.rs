//! Pulling an image: into a new plain tree, or as snapshots of a mounted LIVE.
//!
//! Nothing of the target changes before every blob is downloaded and checked: each blob against
//! its digest as it arrives, each layer's tar against the config's `diff_id`, the config against
//! its digest. The blobs are kept in a cache beside the target (`.ovlsnap-pull.NAME`) until the
//! pull has succeeded, so a rerun after a broken transfer downloads only what is missing.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use oci_client::manifest::OciImageManifest;
use sha2::{Digest as _, Sha256};
use snap_fs::control::{self, Request};

use crate::image::{self, Link};
use crate::registry::Remote;
use crate::source::Source;
use crate::{Compression, ORIGIN, Ui};

/// Makes LIVE the named snapshot again (`ovlsnap restore`), for [`into_live`].
pub type RollBack<'a> = dyn Fn(&str) -> anyhow::Result<()> + 'a;

/// An image whose blobs are all here and checked.
pub struct Fetched {
    /// Its manifest.
    pub manifest: OciImageManifest,
    /// Its chain, when ovlsnap made it.
    pub chain: Option<Vec<Link>>,
    /// Each layer's file and compression, in order.
    pub layers: Vec<(PathBuf, Option<Compression>)>,
    cache: PathBuf,
    _lock: File,
}

impl Fetched {
    /// Removes the downloaded blobs (after the pull succeeded).
    pub fn clean(self) {
        let _ = fs::remove_dir_all(&self.cache);
    }
}

/// What a pull did.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The layers applied.
    pub layers: usize,
    /// The snapshots taken (a pull into LIVE).
    pub snapshots: Vec<String>,
    /// Whether the image was made by ovlsnap.
    pub ovlsnap_image: bool,
}

/// Downloads and checks the image `remote` names into cache dir `cache` (made if missing; held
/// locked while the pull runs).
pub fn fetch(remote: &Remote, cache: &Path, ui: &Arc<dyn Ui>) -> anyhow::Result<Fetched> {
    remote.login(oci_client::RegistryOperation::Pull)?;
    let (bytes, _) = remote.manifest()?.with_context(|| format!("{} does not exist", remote.reference()))?;
    let manifest = image::parse_manifest(&bytes)?;
    let config = remote.get_small_blob(&manifest.config)?;
    let diff_ids = image::diff_ids(&config)?;
    if diff_ids.len() != manifest.layers.len() {
        bail!("the image config lists {} layers, the manifest {}", diff_ids.len(), manifest.layers.len());
    }
    snap_fs::access::private_dir(cache, "a pull will not keep blobs there; remove it")?;
    let lock = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(cache.join("lock"))?;
    if rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!("another pull is using {}", cache.display());
    }
    let mut layers = Vec::new();
    for (i, (d, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        let compression = image::compression_of(&d.media_type)?;
        let path = cache.join(d.digest.replace(':', "-"));
        let ok = path.exists() && digest_file(&path)? == d.digest;
        if !ok {
            ui.phase(
                &format!("downloading layer {} of {} ({} bytes)", i + 1, manifest.layers.len(), d.size),
                Some(d.size as u64),
            );
            let part = path.with_extension("part");
            let ui2 = ui.clone();
            remote.get_blob(d, &part, Arc::new(move |n| ui2.bytes(n)))?;
            fs::rename(&part, &path)?;
        }
        ui.phase(&format!("checking layer {} of {}", i + 1, manifest.layers.len()), None);
        let got = digest_reader(unpacked(&path, compression)?)
            .with_context(|| format!("layer {} ({}) does not decompress", i + 1, d.digest))?;
        if &got != diff_id {
            bail!(
                "layer {} ({}) holds a tar whose digest {got} is not the config's {diff_id}: refused",
                i + 1,
                d.digest
            );
        }
        layers.push((path, compression));
    }
    let chain = image::chain_of(&manifest);
    Ok(Fetched { manifest, chain, layers, cache: cache.to_path_buf(), _lock: lock })
}

/// Pulls the image into `dir`, a new directory (or an empty one): the tree is built beside it and
/// renamed into place whole.
pub fn into_tree(remote: &Remote, dir: &Path, ui: &Arc<dyn Ui>) -> anyhow::Result<Report> {
    let dir = std::path::absolute(dir)?;
    let (parent, name) = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(n)) => (p.to_path_buf(), n.to_os_string()),
        _ => bail!("{} cannot be pulled into", dir.display()),
    };
    if let Ok(mut entries) = fs::read_dir(&dir) {
        if entries.next().is_some() {
            bail!("{} is not empty: pull into a new directory", dir.display());
        }
    } else if dir.exists() {
        bail!("{} is not a directory", dir.display());
    }
    let cache = parent.join(format!(".ovlsnap-pull.{}", name.to_string_lossy()));
    let fetched = fetch(remote, &cache, ui)?;
    let stage = cache.join("tree");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir(&stage)?;
    let applied = (|| {
        for (i, (path, compression)) in fetched.layers.iter().enumerate() {
            ui.phase(&format!("applying layer {} of {}", i + 1, fetched.layers.len()), None);
            snap_fs::stream::receive(&stage, unpacked(path, *compression)?, &|| ui.step())?;
        }
        if dir.exists() {
            fs::remove_dir(&dir)?;
        }
        fs::rename(&stage, &dir).with_context(|| format!("moving the pulled tree to {}", dir.display()))
    })();
    if let Err(e) = applied {
        let _ = fs::remove_dir_all(&stage);
        return Err(e.context(format!(
            "{} was left as it was; the downloaded blobs stay in {} for a rerun",
            dir.display(),
            cache.display()
        )));
    }
    let report = Report { layers: fetched.layers.len(), snapshots: Vec::new(), ovlsnap_image: fetched.chain.is_some() };
    fetched.clean();
    Ok(report)
}

/// Pulls the image's chain into the mounted LIVE at `mnt` as snapshots, named as on the source,
/// each keeping its source key (property [`ORIGIN`]). LIVE must be empty with no snapshots, or
/// its newest snapshot must be one of the chain's (an earlier pull) with LIVE unchanged since:
/// then only the layers after it are applied. With `roll_back`, a LIVE changed since that
/// snapshot (a pull cut off while applying a layer, local changes) is first made that snapshot
/// again by calling it with the snapshot's name (`zfs receive -F`): its changes are lost.
pub fn into_live(
    remote: &Remote,
    mnt: &Path,
    ui: &Arc<dyn Ui>,
    roll_back: Option<&RollBack<'_>>,
) -> anyhow::Result<Report> {
    let src = Source::open(mnt)?;
    let local = src.snaps();
    // Checks that need no download first.
    let cache = mnt
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".ovlsnap-pull.{}", mnt.file_name().map_or("live".into(), |n| n.to_string_lossy())));
    let fetched = fetch(remote, &cache, ui)?;
    let Some(chain) = fetched.chain.clone() else {
        bail!(
            "{} was not made by ovlsnap push (its layers name no snapshots): pull it into a directory instead",
            remote.reference()
        );
    };
    // Where the chain continues, and the snapshot LIVE must be rolled back to first (if any).
    let (start, changed_since) = match local.last() {
        None => {
            let mut names = fs::read_dir(mnt)?.filter_map(|e| e.ok()).map(|e| e.file_name());
            if names.any(|n| n != snap_fs::SNAPDIR_NAME) {
                bail!("{} has files but no snapshot: pull into an empty LIVE", mnt.display());
            }
            (0, None)
        }
        Some(newest) => {
            let Some(k) = chain.iter().position(|l| l.key == newest.key) else {
                bail!(
                    "the newest snapshot of {} ({}) is not in the pulled chain ({}): nothing to continue from",
                    mnt.display(),
                    newest.name,
                    chain.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            };
            let changed = !differences(mnt, &newest.name)?.is_empty();
            if changed && roll_back.is_none() {
                bail!(
                    "{} changed since snapshot {} (local changes, or a pull cut off while applying): a pull \
                     would mix them into the pulled history; `ovlsnap restore {}` makes LIVE that snapshot \
                     again (take a snapshot first to keep the changes), then pull again, or pull with --force",
                    mnt.display(),
                    newest.name,
                    newest.name
                );
            }
            (k + 1, changed.then(|| newest.name.clone()))
        }
    };
    for l in &chain[start..] {
        if local.iter().any(|s| s.name == l.name) {
            bail!("{} already has a snapshot named {:?}: rename it first", mnt.display(), l.name);
        }
    }
    if let (Some(name), Some(roll_back)) = (&changed_since, roll_back) {
        roll_back(name)?;
        if !differences(mnt, name)?.is_empty() {
            bail!("{} still differs from snapshot {name} after rolling back", mnt.display());
        }
    }
    let mut taken = Vec::new();
    for (l, (path, compression)) in chain.iter().zip(&fetched.layers).skip(start) {
        ui.phase(&format!("applying {}", l.name), None);
        snap_fs::stream::receive(mnt, unpacked(path, *compression)?, &|| ui.step())
            .with_context(|| format!("applying {} (the snapshots before it are in place)", l.name))?;
        if let Ok(f) = File::open(mnt) {
            let _ = rustix::fs::syncfs(&f);
        }
        control::call(mnt, &Request::Take { name: Some(l.name.clone()), description: None })?;
        control::call(
            mnt,
            &Request::Set {
                name: l.name.clone(),
                description: None,
                no_description: false,
                properties: vec![(ORIGIN.to_string(), Some(l.key.clone()))],
            },
        )?;
        taken.push(l.name.clone());
    }
    let report = Report { layers: taken.len(), snapshots: taken, ovlsnap_image: true };
    fetched.clean();
    Ok(report)
}

/// What differs between snapshot `name` and LIVE.
fn differences(mnt: &Path, name: &str) -> anyhow::Result<Vec<snap_fs::diff::Change>> {
    let report: snap_fs::diff::Report =
        serde_json::from_value(control::call(mnt, &Request::Diff { a: name.to_string(), b: None })?)?;
    Ok(report.changes)
}

/// The tar in layer file `path`.
fn unpacked(path: &Path, compression: Option<Compression>) -> anyhow::Result<Box<dyn Read>> {
    let f = BufReader::with_capacity(1 << 20, File::open(path)?);
    Ok(match compression {
        None => Box::new(f),
        Some(Compression::Gzip) => Box::new(flate2::read::GzDecoder::new(f)),
        Some(Compression::Zstd) => Box::new(zstd::Decoder::with_buffer(f)?),
    })
}

fn digest_reader(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(h.finalize())));
        }
        h.update(&buf[..n]);
    }
}

fn digest_file(path: &Path) -> io::Result<String> {
    digest_reader(BufReader::new(File::open(path)?))
}
