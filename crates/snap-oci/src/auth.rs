//! Registry credentials, from the auth files podman, skopeo and docker use.

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

/// The auth files looked at, first match wins: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
/// `~/.docker/config.json`.
pub fn files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        v.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(PathBuf::from(d).join("containers/auth.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        let h = PathBuf::from(h);
        v.push(h.join(".config/containers/auth.json"));
        v.push(h.join(".docker/config.json"));
    }
    v
}

/// The credentials for `registry` (`host[:port]`): the first auth file with an entry for it, else
/// anonymous. A file that exists but cannot be read or parsed is an error, not a silent
/// anonymous access.
pub fn for_registry(registry: &str) -> anyhow::Result<RegistryAuth> {
    for f in files() {
        let text = match std::fs::read(&f) {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the auth file {}", f.display())),
        };
        if let Some(auth) = lookup(&text, registry).with_context(|| format!("the auth file {}", f.display()))? {
            tracing::debug!("credentials for {registry} from {}", f.display());
            return Ok(auth);
        }
    }
    Ok(RegistryAuth::Anonymous)
}

/// The entry for `registry` in auth file `text`.
fn lookup(text: &[u8], registry: &str) -> anyhow::Result<Option<RegistryAuth>> {
    let v: serde_json::Value = serde_json::from_slice(text).context("not JSON")?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else { return Ok(None) };
    let wanted = |key: &str| {
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        host == registry || (registry == "docker.io" && host == "index.docker.io")
    };
    let Some((key, entry)) = auths.iter().find(|(k, _)| wanted(k)) else { return Ok(None) };
    let Some(b64) = entry.get("auth").and_then(|a| a.as_str()) else { return Ok(None) };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .with_context(|| format!("the entry for {key}: its auth is not base64"))?;
    let raw = String::from_utf8(raw).with_context(|| format!("the entry for {key}: its auth is not text"))?;
    let (user, pass) =
        raw.split_once(':').with_context(|| format!("the entry for {key}: its auth is not USER:PASSWORD"))?;
    Ok(Some(RegistryAuth::Basic(user.to_string(), pass.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auth_file_entry_is_found_by_host_in_any_of_its_spellings() {
        let f = br#"{"auths": {"https://reg.example:5000/v1/": {"auth": "dTpw"}, "other": {"auth": "eDp5"}}}"#;
        match lookup(f, "reg.example:5000").unwrap() {
            Some(RegistryAuth::Basic(u, p)) => assert_eq!((u.as_str(), p.as_str()), ("u", "p")),
            other => panic!("{other:?}"),
        }
        assert!(lookup(f, "reg.example").unwrap().is_none());
        assert!(lookup(br#"{"auths": {"h": {"auth": "!!"}}}"#, "h").is_err());
    }
}
