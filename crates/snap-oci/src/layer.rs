//! One layer blob: a send stream, compressed, hashed on the way into a file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest as _, Sha256};

use crate::Compression;
use crate::Snap;
use crate::source::Source;

/// A layer blob written to a file.
#[derive(Debug)]
pub struct Blob {
    /// `sha256:HEX` of the compressed bytes (the blob's name in a registry).
    pub digest: String,
    /// The compressed size.
    pub size: u64,
    /// `sha256:HEX` of the uncompressed tar (the config's `diff_id`).
    pub diff_id: String,
    /// Where the bytes are.
    pub path: PathBuf,
}

/// A writer that hashes and counts what passes through it.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    /// Hashes what is written to `inner`.
    pub fn new(inner: W) -> Hashing<W> {
        Hashing { inner, hasher: Sha256::new(), len: 0 }
    }

    /// The writer, the `sha256:HEX` digest and the length of what went through.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, format!("sha256:{}", hex::encode(self.hasher.finalize())), self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The `sha256:HEX` digest of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes the layer of `to` (its whole tree, or with `from` the changes since `from`) into a new
/// file in `dir`. The bytes depend only on the snapshots' trees and `compression`: gzip without
/// a name or time in its header, zstd at a fixed level on one thread. `step` is called per entry.
pub fn write(
    src: &Source,
    from: Option<&Snap>,
    to: &Snap,
    compression: Compression,
    dir: &Path,
    step: &dyn Fn(),
) -> anyhow::Result<Blob> {
    let changes = from.map(|a| src.changes(a, to)).transpose()?;
    let view = src.view(to);
    let path = dir.join(format!(".layer.{}.{}", std::process::id(), to.id));
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let result = (|| {
        let packed = Hashing::new(BufWriter::with_capacity(1 << 20, file));
        let (packed, diff_id) = match compression {
            Compression::Gzip => {
                let gz = flate2::GzBuilder::new().mtime(0).write(packed, flate2::Compression::default());
                let mut tar = Hashing::new(gz);
                snap_fs::stream::send(&view, changes.as_deref(), &mut tar, step)?;
                let (gz, diff_id, _) = tar.finish();
                (gz.finish()?, diff_id)
            }
            Compression::Zstd => {
                let z = zstd::Encoder::new(packed, 3)?;
                let mut tar = Hashing::new(z);
                snap_fs::stream::send(&view, changes.as_deref(), &mut tar, step)?;
                let (z, diff_id, _) = tar.finish();
                (z.finish()?, diff_id)
            }
        };
        let (buf, digest, size) = packed.finish();
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        anyhow::Ok(Blob { digest, size, diff_id, path: path.clone() })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result.with_context(|| match from {
        Some(a) => format!("sending the changes from {} to {}", a.name, to.name),
        None => format!("sending snapshot {}", to.name),
    })
}
