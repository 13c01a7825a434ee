//! A repository in a registry, through `oci-client`, with retries for what a retry can cure.

use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::image::MANIFEST_MEDIA_TYPE;

/// How many times a request that failed for a passing reason (the registry down or overloaded,
/// the connection lost) is made, with waits doubling from half a second in between.
const ATTEMPTS: u32 = 5;
/// The size of the chunks a blob is uploaded in.
const CHUNK: usize = 8 << 20;

/// Called with the bytes transferred so far of the blob in hand.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A repository (and tag) of a registry.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
}

impl Remote {
    /// The repository `reference` names (`HOST[:PORT]/REPO[:TAG]`), with the credentials of the
    /// auth files. `insecure`: plain HTTP and unverified certificates (a registry on loopback).
    pub fn open(reference: &str, insecure: bool) -> anyhow::Result<Remote> {
        let reference: Reference =
            reference.parse().with_context(|| format!("{reference:?} is not an image reference (HOST/REPO:TAG)"))?;
        let auth = crate::auth::for_registry(reference.resolve_registry())?;
        let config = ClientConfig {
            protocol: if insecure { ClientProtocol::Http } else { ClientProtocol::Https },
            accept_invalid_certificates: insecure,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Remote { rt, client: Client::new(config), reference, auth })
    }

    /// The reference, as given.
    pub fn reference(&self) -> String {
        self.reference.whole()
    }

    /// The tag (`latest` when none was given).
    pub fn tag(&self) -> &str {
        self.reference.tag().unwrap_or("latest")
    }

    /// Runs `op` until it succeeds, fails for good, or failed [`ATTEMPTS`] times.
    fn retry<T, F: Future<Output = Result<T, OciDistributionError>>>(
        &self,
        what: &str,
        mut op: impl FnMut() -> F,
    ) -> anyhow::Result<T> {
        let mut wait = Duration::from_millis(500);
        for attempt in 1.. {
            match self.rt.block_on(op()) {
                Ok(v) => return Ok(v),
                Err(e) if attempt < ATTEMPTS && passing(&e) => {
                    tracing::warn!("{what}: {e}; trying again in {wait:?} ({attempt} of {ATTEMPTS})");
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(e) => return Err(explain(e, &self.reference)).with_context(|| what.to_string()),
            }
        }
        unreachable!("the loop returns")
    }

    /// Logs in (when there are credentials) for `op`: bad credentials fail here, once.
    pub fn login(&self, op: RegistryOperation) -> anyhow::Result<()> {
        if matches!(self.auth, RegistryAuth::Anonymous) {
            return Ok(());
        }
        self.retry("logging in", || self.client.auth(&self.reference, &self.auth, op)).map(|_| ())
    }

    /// The manifest the tag names (its bytes and digest), `None` when the repository or tag does
    /// not exist.
    pub fn manifest(&self) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let accept = [MANIFEST_MEDIA_TYPE, oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE];
        let got = self.rt.block_on(async { self.client.pull_manifest_raw(&self.reference, &self.auth, &accept).await });
        match got {
            Ok((bytes, digest)) => Ok(Some((bytes.to_vec(), digest))),
            Err(OciDistributionError::RegistryError { envelope, .. })
                if envelope
                    .errors
                    .iter()
                    .all(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown)) =>
            {
                Ok(None)
            }
            Err(OciDistributionError::ImageManifestNotFoundError(_)) => Ok(None),
            Err(e) if passing(&e) => self
                .retry("reading the tag's manifest", || {
                    self.client.pull_manifest_raw(&self.reference, &self.auth, &accept)
                })
                .map(|(b, d)| Some((b.to_vec(), d))),
            Err(e) => Err(explain(e, &self.reference)).context("reading the tag's manifest"),
        }
    }

    /// Whether the repository holds blob `digest`.
    pub fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        self.retry(&format!("looking for blob {digest}"), || self.client.blob_exists(&self.reference, digest))
    }

    /// Uploads the blob in file `path` as `digest`; `progress` sees the bytes sent.
    pub fn put_blob(&self, path: &Path, digest: &str, size: u64, progress: Progress) -> anyhow::Result<()> {
        self.retry(&format!("uploading blob {digest}"), || {
            let stream = file_stream(path, progress.clone());
            let client = &self.client;
            let reference = &self.reference;
            async move { client.push_blob_stream(reference, stream?, digest, Some(size)).await }
        })
        .map(|_| ())
    }

    /// Uploads `bytes` as a blob (a config).
    pub fn put_small_blob(&self, bytes: &[u8], digest: &str) -> anyhow::Result<()> {
        self.retry(&format!("uploading blob {digest}"), || {
            self.client.push_blob(&self.reference, bytes.to_vec(), digest)
        })
        .map(|_| ())
    }

    /// Stores manifest `bytes` under the tag.
    pub fn put_manifest(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let content_type = http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
        self.retry("storing the manifest", || {
            self.client.push_manifest_raw(&self.reference, bytes.to_vec(), content_type.clone())
        })
        .map(|_| ())
    }

    /// Downloads blob `d` into file `path` (created anew). The bytes are checked against the
    /// digest as they arrive: on a mismatch the file is removed and the call fails.
    pub fn get_blob(&self, d: &OciDescriptor, path: &Path, progress: Progress) -> anyhow::Result<()> {
        let what = format!("downloading blob {}", d.digest);
        let r = self.retry(&what, || async {
            let file = tokio::fs::File::create(path).await?;
            let limit = u64::try_from(d.size).unwrap_or(0);
            let out = Counting { inner: file, n: 0, limit, progress: progress.clone() };
            self.client.pull_blob(&self.reference, d, out).await
        });
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r?;
        let len = std::fs::metadata(path)?.len();
        if i64::try_from(len).ok() != Some(d.size) {
            let _ = std::fs::remove_file(path);
            bail!("blob {} has {len} bytes where the manifest says {}", d.digest, d.size);
        }
        Ok(())
    }

    /// Downloads a small blob (a config) checked against its digest.
    pub fn get_small_blob(&self, d: &OciDescriptor) -> anyhow::Result<Vec<u8>> {
        if d.size > 4 << 20 {
            bail!("the image config claims {} bytes, more than a config holds", d.size);
        }
        self.retry(&format!("downloading blob {}", d.digest), || async {
            let mut out = Vec::new();
            self.client.pull_blob(&self.reference, d, &mut out).await?;
            Ok(out)
        })
    }
}

/// Whether a failure may pass: the connection, or the registry's 5xx and 429 answers.
fn passing(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => {
            !r.is_builder() && r.status().is_none_or(|s| s.is_server_error() || s.as_u16() == 429)
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        _ => false,
    }
}

/// `e` in words a user acts on.
fn explain(e: OciDistributionError, r: &Reference) -> anyhow::Error {
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            anyhow::anyhow!(
                "{} refused the credentials (or asked for some): check the auth file ({}) or log in with \
                 `podman login {}`",
                r.resolve_registry(),
                crate::auth::files().first().map_or("none".into(), |f| f.display().to_string()),
                r.resolve_registry()
            )
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            anyhow::anyhow!("{} denied access to {}: {envelope}", r.resolve_registry(), r.repository())
        }
        e => anyhow::Error::new(e),
    }
}

/// The file at `path` as a stream of chunks, reporting the bytes read.
fn file_stream(
    path: &Path,
    progress: Progress,
) -> Result<
    impl futures_util::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static,
    OciDistributionError,
> {
    let file = std::fs::File::open(path)?;
    progress(0);
    Ok(futures_util::stream::try_unfold((file, 0u64, progress), |(mut file, sent, progress)| async move {
        let mut buf = vec![0; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            let got = file.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        let sent = sent + n as u64;
        progress(sent);
        Ok(Some((bytes::Bytes::from(buf), (file, sent, progress))))
    }))
}

/// An async writer that counts what it writes, and fails past `limit` bytes (a registry sending
/// more than the manifest says would otherwise fill the disk before the digest check).
struct Counting<W> {
    inner: W,
    n: u64,
    limit: u64,
    progress: Progress,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.n + buf.len() as u64 > self.limit {
            let e = std::io::Error::other(format!("the blob has more than the {} bytes the manifest says", self.limit));
            return std::task::Poll::Ready(Err(e));
        }
        let p = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = p {
            self.n += n as u64;
            (self.progress)(self.n);
        }
        p
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
