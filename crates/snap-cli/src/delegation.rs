//! `ovlsnap allow` / `unallow`: who besides root and LIVE's owner may change a mount's snapshots.
//! Names are resolved here (the daemon stores and checks numbers only).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use snap_fs::control::{self, Request};
use snap_fs::policy::{Grant, Perm, Who};

/// `USER` or `@GROUP`, by name or number.
pub fn parse_who(s: &str) -> anyhow::Result<Who> {
    if let Some(g) = s.strip_prefix('@') {
        let gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => uzers::get_group_by_name(g).with_context(|| format!("no group named {g:?}"))?.gid(),
        };
        return Ok(Who::Group(gid));
    }
    let uid = match s.parse::<u32>() {
        Ok(n) => n,
        Err(_) => uzers::get_user_by_name(s).with_context(|| format!("no user named {s:?}"))?.uid(),
    };
    Ok(Who::User(uid))
}

/// A comma-separated list of permissions (`all` for every one).
pub fn parse_perms(s: &str) -> anyhow::Result<BTreeSet<Perm>> {
    let mut out = BTreeSet::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if p == "all" {
            out.extend(Perm::ALL);
            continue;
        }
        let known = Perm::ALL.map(Perm::name).join(", ");
        out.insert(Perm::parse(p).with_context(|| format!("no permission {p:?} (known: {known}, all)"))?);
    }
    if out.is_empty() {
        bail!("no permission given (known: {}, all)", Perm::ALL.map(Perm::name).join(", "));
    }
    Ok(out)
}

/// How a grant's subject reads: `alice`, `@staff`, or the number when it has no name.
fn shown(who: Who) -> String {
    match who {
        Who::User(uid) => uzers::get_user_by_uid(uid).map_or(uid.to_string(), |u| u.name().to_string_lossy().into()),
        Who::Group(gid) => {
            format!("@{}", uzers::get_group_by_gid(gid).map_or(gid.to_string(), |g| g.name().to_string_lossy().into()))
        }
    }
}

#[derive(Serialize)]
struct Shown<'a> {
    who: Who,
    name: String,
    perms: &'a BTreeSet<Perm>,
}

/// Prints the grants of the mount at `mnt`.
pub fn list(mnt: &Path, json: bool) -> anyhow::Result<()> {
    let grants: Vec<Grant> = serde_json::from_value(control::call(mnt, &Request::Grants)?)?;
    if json {
        let rows: Vec<Shown> =
            grants.iter().map(|g| Shown { who: g.who, name: shown(g.who), perms: &g.perms }).collect();
        say!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    say!("root and the owner of LIVE may do everything; besides them:");
    if grants.is_empty() {
        say!("  nobody");
    }
    for g in &grants {
        let perms: Vec<&str> = g.perms.iter().map(|p| p.name()).collect();
        say!("  {:<24} {}", shown(g.who), perms.join(","));
    }
    Ok(())
}

/// `ovlsnap allow WHO PERMS` on the mount at `mnt`.
pub fn allow(mnt: &Path, who: &str, perms: &str) -> anyhow::Result<()> {
    let (who, perms) = (parse_who(who)?, parse_perms(perms)?);
    control::call(mnt, &Request::Allow { who, perms })?;
    list(mnt, false)
}

/// `ovlsnap unallow WHO [PERMS]` on the mount at `mnt`.
pub fn unallow(mnt: &Path, who: &str, perms: Option<&str>) -> anyhow::Result<()> {
    let who = parse_who(who)?;
    let perms = perms.map(parse_perms).transpose()?.unwrap_or_default();
    control::call(mnt, &Request::Unallow { who, perms })?;
    list(mnt, false)
}

/// Asks the daemon whether we may `perm` before doing it ourselves through the mount.
pub fn authorize(mnt: &Path, perm: Perm) -> anyhow::Result<()> {
    control::call(mnt, &Request::Authorize { perm }).map(drop)
}
