//! Snapshots as OCI images: `ovlsnap push`, `pull` and `send --oci-layout` (issue 22).
//!
//! This crate owns the image a snapshot becomes and its transport. An image of snapshot S is a
//! chain of OCI layers: the whole tree of the chain's first snapshot, then the changes from each
//! snapshot of the chain to the next, ending at S; each layer is `snap_fs::stream::send`'s tar,
//! compressed (gzip or zstd). Sending is byte-reproducible (the same snapshot, or the same pair,
//! gives the same bytes and so the same digest), so a later push finds the chain's older layers
//! already in the registry and uploads only the new one. The chain is the one the tag (or the
//! layout's tag) already holds, cut where a snapshot of it no longer exists here, plus S
//! ([`image::chain_for`]).
//!
//! Pulling treats the registry as hostile: every blob is downloaded and checked against its
//! digest, and every layer's uncompressed digest against the config's `diff_ids`, before the
//! target changes; a tree is built beside its target and renamed into place whole, and the
//! verified blobs stay beside it until the pull succeeds, so a rerun resumes.
//!
//! It must not change a snapshot or LIVE except through the mount (the daemon's control
//! requests and plain file operations on the mount), and it keeps the registry protocol in
//! `oci-client`: no HTTP of its own.

pub mod auth;
pub mod cache;
pub mod image;
pub mod layer;
pub mod layout;
pub mod publish;
pub mod pull;
pub mod registry;
pub mod source;

pub use oci_client::RegistryOperation;

/// Prefix of the annotations ovlsnap writes into manifests and layer descriptors.
pub const ANNOTATION_PREFIX: &str = "io.ovlsnap.";

/// How layers are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    /// gzip (every OCI tool reads it).
    #[default]
    Gzip,
    /// zstd (smaller and faster; podman reads it, older tools may not).
    Zstd,
}

impl Compression {
    /// The layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Compression> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => anyhow::bail!("unknown compression {s:?}: gzip or zstd"),
        }
    }
}

/// A snapshot as an image sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snap {
    /// Its name.
    pub name: String,
    /// Its id on its LIVE (order of creation).
    pub id: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// What names it in a chain: `ID@CREATED_UNIX` on the LIVE it was taken on (ids are not
    /// reused within a second); a pulled snapshot keeps the key it had there (its [`ORIGIN`]
    /// property).
    pub key: String,
}

/// The property a pulled snapshot keeps its key in.
pub const ORIGIN: &str = "ovlsnap:origin";

/// Called as an image is sent or fetched: the phases, the entries of a phase, the bytes.
pub trait Ui: Send + Sync {
    /// A new phase: `what` is going on, over `len` bytes when known.
    fn phase(&self, what: &str, len: Option<u64>);
    /// One more entry of a stream sent or received.
    fn step(&self);
    /// `n` bytes of the phase's transfer done.
    fn bytes(&self, n: u64);
}

/// A [`Ui`] that shows nothing.
pub struct Quiet;

impl Ui for Quiet {
    fn phase(&self, _: &str, _: Option<u64>) {}
    fn step(&self) {}
    fn bytes(&self, _: u64) {}
}
