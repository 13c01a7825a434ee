//! The digests of layers made before, so a push does not make again the layers the destination
//! already holds (a 1 GiB whole tree takes half a minute to compress and hash).
//!
//! One JSON file per user (`$XDG_CACHE_HOME/ovlsnap/layers.json`, else `~/.cache/...`), keyed by
//! the mount, the pair of snapshot keys and the compression. An entry is used only when the
//! destination holds its blob; it names what the layer was when made, which a snapshot never
//! changes afterwards. A cache that cannot be read or written is ignored (layers are then made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Entries kept at most; past it the file starts over.
const MAX_ENTRIES: usize = 20_000;

/// A layer made before.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Made {
    /// Its blob's digest.
    pub digest: String,
    /// Its blob's size.
    pub size: u64,
    /// Its tar's digest.
    pub diff_id: String,
}

/// The cache file and what it held when read.
pub struct Cache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Made>,
}

impl Cache {
    /// The user's cache (empty when there is none or it cannot be read).
    pub fn open() -> Cache {
        let dir = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        let path = dir.map(|d| d.join("ovlsnap/layers.json"));
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Cache { path, entries }
    }

    /// The key of the layer from `from` to `to` (snapshot keys) of the mount at `mnt`.
    pub fn key(mnt: &Path, from: Option<&str>, to: &str, compression: crate::Compression) -> String {
        format!("{}|{}|{to}|{compression:?}", mnt.display(), from.unwrap_or("-"))
    }

    /// What was made under `key`.
    pub fn get(&self, key: &str) -> Option<&Made> {
        self.entries.get(key)
    }

    /// Records `made` under `key`, durably if it can.
    pub fn put(&mut self, key: String, made: Made) {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(key, made);
        let Some(path) = &self.path else { return };
        let write = || -> std::io::Result<()> {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec(&self.entries)?)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::debug!("not caching layer digests in {}: {e}", path.display());
        }
    }
}
