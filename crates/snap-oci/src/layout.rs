//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`) as a destination:
//! what `skopeo copy oci:DIR:TAG ...` and `podman run oci:DIR:TAG` read.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::Ui;
use crate::image::{Image, MANIFEST_MEDIA_TYPE};
use crate::layer::Blob;
use crate::publish::Destination;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// A layout directory and the tag written in it.
pub struct Layout {
    dir: PathBuf,
    blobs: PathBuf,
    tag: String,
}

impl Layout {
    /// The layout at `dir` (made when missing; an existing non-empty directory must be a
    /// layout), tag `tag`.
    pub fn open(dir: &Path, tag: &str) -> anyhow::Result<Layout> {
        if tag.is_empty() || tag.len() > 128 || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            bail!("{tag:?} is not a valid tag (letters, digits, `_.-`, up to 128)");
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            if fs::read_dir(dir)?.next().is_some() {
                bail!("{} is neither empty nor an OCI image layout (it has no oci-layout file)", dir.display());
            }
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        Ok(Layout { dir: dir.to_path_buf(), blobs, tag: tag.to_string() })
    }

    fn index(&self) -> anyhow::Result<serde_json::Value> {
        match fs::read(self.dir.join("index.json")) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("{}/index.json is not JSON", self.dir.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn blob_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        let hex = digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(self.blobs.join(hex.with_context(|| format!("{digest:?} is not a sha256 digest"))?))
    }
}

impl Destination for Layout {
    fn prior(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let index = self.index()?;
        let entry = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"][REF_NAME] == self.tag.as_str());
        let Some(digest) = entry.and_then(|m| m["digest"].as_str()) else { return Ok(None) };
        Ok(fs::read(self.blob_path(digest)?).ok())
    }

    fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        // A blob is only ever put by renaming a complete, synced file into place.
        Ok(self.blob_path(digest)?.exists())
    }

    fn put_blob(&self, blob: &Blob, _: &Arc<dyn Ui>) -> anyhow::Result<()> {
        fs::rename(&blob.path, self.blob_path(&blob.digest)?)?;
        Ok(())
    }

    fn put_config(&self, bytes: &[u8], digest: &str) -> anyhow::Result<()> {
        write_atomic(&self.blob_path(digest)?, bytes)
    }

    fn put_manifest(&self, image: &Image) -> anyhow::Result<()> {
        write_atomic(&self.blob_path(&image.digest)?, &image.manifest)?;
        let mut index = self.index()?;
        let manifests = index["manifests"].as_array_mut().context("index.json has no manifests list")?;
        manifests.retain(|m| m["annotations"][REF_NAME] != self.tag.as_str());
        manifests.push(serde_json::json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": image.digest,
            "size": image.manifest.len(),
            "annotations": {REF_NAME: self.tag},
        }));
        write_atomic(&self.dir.join("index.json"), &serde_json::to_vec_pretty(&index)?)
    }

    fn scratch(&self) -> &Path {
        &self.blobs
    }
}

/// Writes `path` whole or not at all: a synced temp file renamed over it.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}
