//! Registry credentials, from the auth files podman, skopeo and docker use, and the credential
//! helpers they name.

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

/// The credentials for `registry` in auth file `text`: its credential helper
/// (`credHelpers.HOST`), its `auths` entry, or the file's default helper (`credsStore`).
fn lookup(text: &[u8], registry: &str) -> anyhow::Result<Option<RegistryAuth>> {
    let v: serde_json::Value = serde_json::from_slice(text).context("not JSON")?;
    let wanted = |key: &str| {
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        host == registry || (registry == "docker.io" && host == "index.docker.io")
    };
    let helpers = v.get("credHelpers").and_then(|h| h.as_object());
    if let Some((_, helper)) = helpers.into_iter().flatten().find(|(k, _)| wanted(k)) {
        let helper = helper.as_str().context("a credHelpers entry is not a string")?;
        return from_helper(helper, registry).map(Some);
    }
    let auths = v.get("auths").and_then(|a| a.as_object());
    let entry = auths.into_iter().flatten().find(|(k, e)| wanted(k) && e.get("auth").is_some());
    let Some((key, entry)) = entry else {
        return match v.get("credsStore").and_then(|s| s.as_str()) {
            Some(store) => from_helper(store, registry).map(Some),
            None => Ok(None),
        };
    };
    let Some(b64) = entry.get("auth").and_then(|a| a.as_str()) else { return Ok(None) };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .with_context(|| format!("the entry for {key}: its auth is not base64"))?;
    let raw = String::from_utf8(raw).with_context(|| format!("the entry for {key}: its auth is not text"))?;
    let (user, pass) =
        raw.split_once(':').with_context(|| format!("the entry for {key}: its auth is not USER:PASSWORD"))?;
    Ok(Some(RegistryAuth::Basic(user.to_string(), pass.to_string())))
}

/// Asks credential helper `docker-credential-NAME` for `registry`'s credentials (`get`, the
/// registry on stdin, `{"Username": ..., "Secret": ...}` on stdout), as docker and podman do.
fn from_helper(name: &str, registry: &str) -> anyhow::Result<RegistryAuth> {
    use std::io::Write as _;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        anyhow::bail!("{name:?} is not a credential helper name");
    }
    let program = format!("docker-credential-{name}");
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running the credential helper {program}"))?;
    child.stdin.take().context("the helper's stdin")?.write_all(registry.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the credential helper {program} has no credentials for {registry}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{program} answered no JSON"))?;
    let (Some(user), Some(secret)) = (v["Username"].as_str(), v["Secret"].as_str()) else {
        anyhow::bail!("{program} answered without Username and Secret");
    };
    if user == "<token>" {
        anyhow::bail!(
            "{program} gave an identity token for {registry}, which ovlsnap cannot use: log in with a password"
        );
    }
    Ok(RegistryAuth::Basic(user.to_string(), secret.to_string()))
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
