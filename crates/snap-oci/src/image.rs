//! The image of a snapshot: which chain of layers, and its config and manifest.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use oci_client::manifest::{OciDescriptor, OciImageManifest};

use crate::Snap;
use crate::layer::digest_of;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The most layers an image gets: past it a push starts a new chain with the snapshot's whole
/// tree (overlay-based runtimes refuse images much deeper than a hundred layers).
pub const MAX_LAYERS: usize = 64;

/// Layer annotation: the key (`ID@CREATED`) of the snapshot the layer ends at.
pub const LAYER_SNAPSHOT: &str = "io.ovlsnap.layer.snapshot";
/// Layer annotation: that snapshot's name.
pub const LAYER_NAME: &str = "io.ovlsnap.layer.name";
/// Layer annotation: that snapshot's creation time (RFC 3339).
pub const LAYER_CREATED: &str = "io.ovlsnap.layer.created";
/// Layer annotation: the key of the snapshot a changes layer starts from (absent: a whole tree).
pub const LAYER_FROM: &str = "io.ovlsnap.layer.from";
/// Manifest annotation: the snapshot's name.
pub const SNAPSHOT_NAME: &str = "io.ovlsnap.snapshot.name";
/// Manifest annotation: the snapshot's id on its LIVE.
pub const SNAPSHOT_ID: &str = "io.ovlsnap.snapshot.id";
/// Manifest annotation: the snapshot's creation time (RFC 3339).
pub const SNAPSHOT_CREATED: &str = "io.ovlsnap.snapshot.created";
/// Manifest annotation: the host it was pushed from.
pub const SOURCE_HOST: &str = "io.ovlsnap.source.host";

/// One layer of an image as its annotations describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The key of the snapshot the layer ends at.
    pub key: String,
    /// That snapshot's name when pushed.
    pub name: String,
    /// Its creation time (RFC 3339).
    pub created: String,
}

/// The chain a manifest holds, when ovlsnap made it (every layer annotated, each changes layer
/// starting at the one before); `None` for any other image.
pub fn chain_of(m: &OciImageManifest) -> Option<Vec<Link>> {
    let mut links: Vec<Link> = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let a = l.annotations.as_ref()?;
        let from = a.get(LAYER_FROM);
        if from != links.last().map(|p| &p.key) || (i == 0) != from.is_none() {
            return None;
        }
        links.push(Link {
            key: a.get(LAYER_SNAPSHOT)?.clone(),
            name: a.get(LAYER_NAME)?.clone(),
            created: a.get(LAYER_CREATED).cloned().unwrap_or_default(),
        });
    }
    (!links.is_empty()).then_some(links)
}

/// The chain of snapshots to publish `target` as: the longest start of `prior` (the chain the
/// destination already holds) made of snapshots that still exist here and are older than
/// `target`, then `target`; or `prior` up to `target` when it holds it. Starts afresh when that
/// would pass [`MAX_LAYERS`].
pub fn chain_for(prior: &[Link], local: &[Snap], target: &Snap) -> Vec<Snap> {
    let mut chain = Vec::new();
    for link in prior {
        let Some(s) = local.iter().find(|s| s.key == link.key) else { break };
        if s.id > target.id {
            break;
        }
        chain.push(s.clone());
        if s.id == target.id {
            return chain;
        }
    }
    if chain.len() + 1 > MAX_LAYERS {
        chain.clear();
    }
    chain.push(target.clone());
    chain
}

/// A layer of an image being built.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Its descriptor in the manifest.
    pub descriptor: OciDescriptor,
    /// The digest of its uncompressed tar.
    pub diff_id: String,
}

impl Layer {
    /// The layer of `to` (from `from`) whose blob has `digest`, `size` and `diff_id`.
    pub fn new(from: Option<&Snap>, to: &Snap, media_type: &str, digest: &str, size: u64, diff_id: &str) -> Layer {
        let mut a = BTreeMap::new();
        a.insert(LAYER_SNAPSHOT.to_string(), to.key.clone());
        a.insert(LAYER_NAME.to_string(), to.name.clone());
        a.insert(LAYER_CREATED.to_string(), to.created.clone());
        if let Some(f) = from {
            a.insert(LAYER_FROM.to_string(), f.key.clone());
        }
        Layer {
            descriptor: OciDescriptor {
                media_type: media_type.to_string(),
                digest: digest.to_string(),
                size: size as i64,
                urls: None,
                annotations: Some(a),
                artifact_type: None,
            },
            diff_id: diff_id.to_string(),
        }
    }
}

/// An image's config and manifest, as the bytes that are stored.
#[derive(Debug)]
pub struct Image {
    /// The config JSON.
    pub config: Vec<u8>,
    /// The manifest JSON.
    pub manifest: Vec<u8>,
    /// The manifest's digest.
    pub digest: String,
}

/// The image of `target` over `layers` (its chain, oldest first).
pub fn build(target: &Snap, chain: &[Snap], layers: &[Layer]) -> anyhow::Result<Image> {
    let history: Vec<serde_json::Value> = chain
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let what = if i == 0 {
                format!("snapshot {} (whole tree)", s.name)
            } else {
                format!("snapshot {} (changes since {})", s.name, chain[i - 1].name)
            };
            serde_json::json!({"created": s.created, "created_by": format!("ovlsnap {what}")})
        })
        .collect();
    let config = serde_json::json!({
        "created": target.created,
        "architecture": arch(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": history,
    });
    let config = serde_json::to_vec(&config)?;
    let mut annotations = BTreeMap::new();
    annotations.insert("org.opencontainers.image.created".to_string(), target.created.clone());
    annotations.insert(SNAPSHOT_NAME.to_string(), target.name.clone());
    annotations.insert(SNAPSHOT_ID.to_string(), target.id.to_string());
    annotations.insert(SNAPSHOT_CREATED.to_string(), target.created.clone());
    annotations.insert(SOURCE_HOST.to_string(), hostname());
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_string()),
        config: OciDescriptor {
            media_type: CONFIG_MEDIA_TYPE.to_string(),
            digest: digest_of(&config),
            size: config.len() as i64,
            urls: None,
            annotations: None,
            artifact_type: None,
        },
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        subject: None,
        artifact_type: None,
        annotations: Some(annotations),
    };
    let manifest = serde_json::to_vec(&manifest)?;
    let digest = digest_of(&manifest);
    Ok(Image { config, manifest, digest })
}

/// A pulled manifest, parsed and checked: an image manifest whose layers this tool can apply.
pub fn parse_manifest(bytes: &[u8]) -> anyhow::Result<OciImageManifest> {
    let m: OciImageManifest = serde_json::from_slice(bytes).context("the manifest is not an image manifest")?;
    if m.layers.is_empty() {
        bail!("the image has no layers");
    }
    for l in &m.layers {
        compression_of(&l.media_type)?;
        if !l.digest.starts_with("sha256:")
            || l.digest.len() != 71
            || !l.digest[7..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            bail!("a layer's digest {:?} is not a sha256 digest", l.digest);
        }
        if l.size < 0 {
            bail!("a layer's size {} is negative", l.size);
        }
    }
    Ok(m)
}

/// How a layer of `media_type` is compressed (`None`: a plain tar).
pub fn compression_of(media_type: &str) -> anyhow::Result<Option<crate::Compression>> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar" => Ok(None),
        "application/vnd.oci.image.layer.v1.tar+gzip" | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Ok(Some(crate::Compression::Gzip))
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Some(crate::Compression::Zstd)),
        other => bail!("a layer has media type {other:?}, which is not a filesystem layer this tool can apply"),
    }
}

/// The config's `rootfs.diff_ids`.
pub fn diff_ids(config: &[u8]) -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config).context("the image config is not JSON")?;
    let ids =
        v.pointer("/rootfs/diff_ids").and_then(|d| d.as_array()).context("the image config has no rootfs.diff_ids")?;
    ids.iter().map(|d| d.as_str().map(str::to_string).context("a diff_id is not a string")).collect()
}

/// The OCI name of this machine's architecture.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64) -> Snap {
        Snap { name: format!("s{id}"), id, created: String::new(), key: format!("{id}@{}", 100 + id) }
    }

    fn link(s: &Snap) -> Link {
        Link { key: s.key.clone(), name: s.name.clone(), created: String::new() }
    }

    #[test]
    fn a_chain_extends_what_the_destination_holds_and_stops_at_what_is_gone() {
        let local: Vec<Snap> = [1, 2, 4, 5].into_iter().map(snap).collect();
        let prior: Vec<Link> = [1, 2, 3, 4].into_iter().map(|i| link(&snap(i))).collect();
        let ids = |c: Vec<Snap>| c.iter().map(|s| s.id).collect::<Vec<_>>();
        // 3 is gone here: the chain stops before it.
        assert_eq!(ids(chain_for(&prior, &local, &snap(5))), vec![1, 2, 5]);
        // An older snapshot than the chain's end: the chain up to it.
        assert_eq!(ids(chain_for(&prior[..2], &local, &snap(2))), vec![1, 2]);
        // Nothing there yet: the whole tree.
        assert_eq!(ids(chain_for(&[], &local, &snap(4))), vec![4]);
        // A snapshot of another LIVE with the same id but another time does not count.
        let other = [Link { key: "1@7".into(), name: "s1".into(), created: String::new() }];
        assert_eq!(ids(chain_for(&other, &local, &snap(2))), vec![2]);
        // A chain at the limit starts afresh.
        let many: Vec<Snap> = (1..=MAX_LAYERS as u64 + 1).map(snap).collect();
        let prior: Vec<Link> = many[..MAX_LAYERS].iter().map(link).collect();
        assert_eq!(ids(chain_for(&prior, &many, &many[MAX_LAYERS])), vec![MAX_LAYERS as u64 + 1]);
    }

    #[test]
    fn a_chain_is_read_back_only_from_manifests_ovlsnap_made() {
        let (a, b) = (snap(1), snap(2));
        let layers = [Layer::new(None, &a, "x", "sha256:0", 1, "d"), Layer::new(Some(&a), &b, "x", "sha256:1", 1, "e")];
        let img = build(&b, &[a.clone(), b.clone()], &layers).unwrap();
        let m: OciImageManifest = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(
            chain_of(&m).unwrap(),
            vec![link(&a), link(&b)]
                .into_iter()
                .map(|mut l| {
                    l.created = String::new();
                    l
                })
                .collect::<Vec<_>>()
        );
        let mut broken = m.clone();
        broken.layers.swap(0, 1);
        assert_eq!(chain_of(&broken), None, "a chain out of order is no ovlsnap chain");
        let mut foreign = m;
        foreign.layers[1].annotations = None;
        assert_eq!(chain_of(&foreign), None);
    }
}
