//! The snapshots of a mounted LIVE, as the images are built from them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use snap_fs::control::{self, Request};
use snap_fs::diff::{Change, Report};
use snap_fs::snapper::Listed;

use crate::Snap;

/// A mounted LIVE (its mount point) whose snapshots are sent.
pub struct Source {
    mnt: PathBuf,
    listed: Vec<Listed>,
}

impl Source {
    /// The snapshots of the mount at `mnt`, oldest first.
    pub fn open(mnt: &Path) -> anyhow::Result<Source> {
        let mut listed: Vec<Listed> = control::call_as(mnt, &Request::List)?;
        listed.sort_by_key(|l| l.id);
        Ok(Source { mnt: mnt.to_path_buf(), listed })
    }

    /// Every snapshot, oldest first.
    pub fn snaps(&self) -> Vec<Snap> {
        self.listed.iter().map(snap).collect()
    }

    /// The snapshot named `name`, refused when its view is no longer what was taken.
    pub fn find(&self, name: &str) -> anyhow::Result<Snap> {
        let l = self
            .listed
            .iter()
            .find(|l| l.name == name)
            .with_context(|| format!("no snapshot named {name:?} on {}", self.mnt.display()))?;
        if l.damage.is_some() {
            bail!(
                "snapshot {name:?} is not what was taken (LIVE changed while it was not mounted; see \
                 `ovlsnap check`): it cannot be published"
            );
        }
        Ok(snap(l))
    }

    /// The mount point.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// Where snapshot `s`'s tree is seen.
    pub fn view(&self, s: &Snap) -> PathBuf {
        self.mnt.join(snap_fs::SNAPDIR_NAME).join(&s.name)
    }

    /// The changes from `a` to `b`.
    pub fn changes(&self, a: &Snap, b: &Snap) -> anyhow::Result<Vec<Change>> {
        let report: Report = serde_json::from_value(control::call(
            &self.mnt,
            &Request::Diff { a: a.name.clone(), b: Some(b.name.clone()) },
        )?)?;
        Ok(report.changes)
    }
}

fn snap(l: &Listed) -> Snap {
    let key = l.properties.get(crate::ORIGIN).cloned().unwrap_or_else(|| format!("{}@{}", l.id, l.created_unix));
    Snap { name: l.name.clone(), id: l.id, created: l.created.clone(), key }
}
