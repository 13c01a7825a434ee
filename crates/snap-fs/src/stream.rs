//! Send streams: a snapshot (or the changes between two) as an OCI image layer tar, and applying
//! one to a directory. Not implemented yet.

use std::io::{Read, Write};
use std::path::Path;

use crate::diff::Change;

/// Writes the tree at `view` (a snapshot's view, `MNT/.snapshots/NAME`) to `out` as a tar
/// stream. With `changes` (the diff from an older snapshot A to this one), only what changed,
/// in the OCI layer format (whiteouts `.wh.NAME`, opaque dirs `.wh..wh..opq`); applied to a tree
/// equal to A it gives this snapshot's tree. `step` is called once per entry written.
pub fn send(view: &Path, changes: Option<&[Change]>, out: impl Write, step: &dyn Fn()) -> anyhow::Result<u64> {
    let _ = (view, changes, out, step);
    anyhow::bail!("send is not implemented yet")
}

/// Applies a stream made by [`send`] to the directory `target`. The whole stream is read and
/// checked before `target` is touched: a truncated or corrupt stream leaves it as it was.
pub fn receive(target: &Path, input: impl Read, step: &dyn Fn()) -> anyhow::Result<u64> {
    let _ = (target, input, step);
    anyhow::bail!("receive is not implemented yet")
}
