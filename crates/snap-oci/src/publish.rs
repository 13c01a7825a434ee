//! Publishing a snapshot's image to a destination: a registry repository or a layout directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::cache::{Cache, Made};
use crate::image::{self, Image, Layer};
use crate::layer::{self, Blob};
use crate::registry::Remote;
use crate::source::Source;
use crate::{Compression, Ui};

/// Where an image goes.
pub trait Destination {
    /// The manifest the destination's tag holds now.
    fn prior(&self) -> anyhow::Result<Option<Vec<u8>>>;
    /// Whether it holds blob `digest`.
    fn has_blob(&self, digest: &str) -> anyhow::Result<bool>;
    /// Stores a layer blob.
    fn put_blob(&self, blob: &Blob, ui: &Arc<dyn Ui>) -> anyhow::Result<()>;
    /// Stores a small blob (the config).
    fn put_config(&self, bytes: &[u8], digest: &str) -> anyhow::Result<()>;
    /// Points the tag at the image's manifest (stored with it).
    fn put_manifest(&self, image: &Image) -> anyhow::Result<()>;
    /// A directory for the layer files being made.
    fn scratch(&self) -> &Path;
}

/// What a publish did.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The snapshots of the image's chain, oldest first.
    pub chain: Vec<String>,
    /// The layers stored, with their compressed sizes.
    pub stored: Vec<(String, u64)>,
    /// The layers the destination held already.
    pub present: Vec<String>,
    /// The manifest's digest.
    pub digest: String,
}

/// Publishes snapshot `name` of `src` to `dest`: the chain the destination's tag holds, extended
/// to `name` ([`image::chain_for`]); the layers it lacks are made and stored, then the config and
/// the manifest.
pub fn publish(
    src: &Source,
    name: &str,
    dest: &dyn Destination,
    compression: Compression,
    ui: &Arc<dyn Ui>,
) -> anyhow::Result<Report> {
    let target = src.find(name)?;
    let prior = match dest.prior()? {
        Some(bytes) => serde_json::from_slice(&bytes).ok().and_then(|m| image::chain_of(&m)).unwrap_or_default(),
        None => Vec::new(),
    };
    let chain = image::chain_for(&prior, &src.snaps(), &target);
    let mut layers = Vec::new();
    let mut report = Report {
        chain: chain.iter().map(|s| s.name.clone()).collect(),
        stored: Vec::new(),
        present: Vec::new(),
        digest: String::new(),
    };
    let mut cache = Cache::open();
    for (i, to) in chain.iter().enumerate() {
        let from = i.checked_sub(1).map(|j| &chain[j]);
        let key = Cache::key(src.mnt(), from.map(|f| f.key.as_str()), &to.key, compression);
        if let Some(made) = cache.get(&key).cloned() {
            if dest.has_blob(&made.digest)? {
                report.present.push(made.digest.clone());
                layers.push(Layer::new(from, to, compression.media_type(), &made.digest, made.size, &made.diff_id));
                continue;
            }
        }
        ui.phase(
            &match from {
                Some(a) => format!("sending {} (changes since {})", to.name, a.name),
                None => format!("sending {} (whole tree)", to.name),
            },
            None,
        );
        let blob = layer::write(src, from, to, compression, dest.scratch(), &|| ui.step())?;
        let kept = (|| {
            if dest.has_blob(&blob.digest)? {
                report.present.push(blob.digest.clone());
            } else {
                ui.phase(&format!("storing layer of {} ({} bytes)", to.name, blob.size), Some(blob.size));
                dest.put_blob(&blob, ui)?;
                report.stored.push((blob.digest.clone(), blob.size));
            }
            anyhow::Ok(())
        })();
        let _ = std::fs::remove_file(&blob.path);
        kept?;
        cache.put(key, Made { digest: blob.digest.clone(), size: blob.size, diff_id: blob.diff_id.clone() });
        layers.push(Layer::new(from, to, compression.media_type(), &blob.digest, blob.size, &blob.diff_id));
    }
    let img = image::build(&target, &chain, &layers)?;
    let config_digest = layer::digest_of(&img.config);
    if !dest.has_blob(&config_digest)? {
        dest.put_config(&img.config, &config_digest)?;
    }
    dest.put_manifest(&img)?;
    report.digest = img.digest;
    Ok(report)
}

/// A registry repository as a destination.
pub struct ToRegistry<'a> {
    /// The repository.
    pub remote: &'a Remote,
    /// Where layer files are made.
    pub scratch: PathBuf,
}

impl Destination for ToRegistry<'_> {
    fn prior(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.remote.manifest()?.map(|(b, _)| b))
    }

    fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        self.remote.has_blob(digest)
    }

    fn put_blob(&self, blob: &Blob, ui: &Arc<dyn Ui>) -> anyhow::Result<()> {
        let ui = ui.clone();
        self.remote.put_blob(&blob.path, &blob.digest, blob.size, Arc::new(move |n| ui.bytes(n)))
    }

    fn put_config(&self, bytes: &[u8], digest: &str) -> anyhow::Result<()> {
        self.remote.put_small_blob(bytes, digest)
    }

    fn put_manifest(&self, image: &Image) -> anyhow::Result<()> {
        self.remote.put_manifest(&image.manifest).with_context(|| format!("tagging {}", self.remote.reference()))
    }

    fn scratch(&self) -> &Path {
        &self.scratch
    }
}
