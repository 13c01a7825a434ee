//! A real OCI registry on 127.0.0.1 for the `ovlsnap push`/`pull` tests (issue 22): Debian's
//! `docker-registry` (distribution 2.8) with filesystem storage in a temp dir, optionally behind
//! htpasswd auth, so the tests talk to the same server code a user would and can look at (and
//! damage) the stored blobs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The registry binary of the Debian package `docker-registry`.
const BIN: &str = "/usr/bin/docker-registry";
/// How long one start may take until `/v2/` answers.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many free ports are tried before giving up.
const PORT_TRIES: usize = 5;

/// A running `docker-registry` on `127.0.0.1`, killed on drop (its temp dir is removed then too).
pub struct Registry {
    dir: TempDir,
    storage: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    auth: bool,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry with empty storage on a free port, with htpasswd auth for `(user,
    /// password)` if `auth` is given, and waits until `GET /v2/` answers (200, or 401 with auth).
    /// Returns `None`, after printing why, if the binary is missing or the registry cannot start;
    /// the calling test then skips.
    pub fn start(auth: Option<(&str, &str)>) -> Option<Registry> {
        if !Path::new(BIN).is_file() {
            eprintln!("skipping: {BIN} is missing (install the Debian package docker-registry)");
            return None;
        }
        let dir = match tempfile::Builder::new().prefix("ovlsnap-registry-").tempdir() {
            Ok(dir) => dir,
            Err(e) => {
                eprintln!("skipping: cannot make a temp dir for the registry: {e}");
                return None;
            }
        };
        let storage = dir.path().join("storage");
        if let Err(e) = fs::create_dir(&storage) {
            eprintln!("skipping: cannot create {}: {e}", storage.display());
            return None;
        }
        let htpasswd = dir.path().join("htpasswd");
        if let Some((user, password)) = auth {
            let hash = match bcrypt_hash(password) {
                Ok(hash) => hash,
                Err(e) => {
                    eprintln!("skipping: cannot make a bcrypt htpasswd entry for the registry: {e}");
                    return None;
                }
            };
            if let Err(e) = fs::write(&htpasswd, format!("{user}:{hash}\n")) {
                eprintln!("skipping: cannot write {}: {e}", htpasswd.display());
                return None;
            }
        }
        let mut registry = Registry {
            config: dir.path().join("config.yml"),
            log: dir.path().join("registry.log"),
            dir,
            storage,
            port: 0,
            auth: auth.is_some(),
            child: None,
        };
        let mut errors = Vec::new();
        for _ in 0..PORT_TRIES {
            let port = match free_port() {
                Ok(port) => port,
                Err(e) => {
                    errors.push(format!("cannot find a free port: {e}"));
                    continue;
                }
            };
            registry.port = port;
            let config = registry.config_yaml(auth.is_some().then_some(htpasswd.as_path()));
            if let Err(e) = fs::write(&registry.config, config) {
                eprintln!("skipping: cannot write {}: {e}", registry.config.display());
                return None;
            }
            match registry.spawn() {
                Ok(()) => return Some(registry),
                Err(e) => errors.push(format!("port {port}: {e}")),
            }
        }
        eprintln!("skipping: {BIN} did not come up after {PORT_TRIES} tries:\n{}", errors.join("\n"));
        None
    }

    /// `127.0.0.1:PORT`, the host part of image references (`127.0.0.1:PORT/repo:tag`).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage root (it holds `docker/registry/v2/...`).
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// The number of blobs stored: the `docker/registry/v2/blobs/sha256/*/*/data` files.
    pub fn blob_count(&self) -> usize {
        let root = self.storage.join("docker/registry/v2/blobs/sha256");
        let Ok(prefixes) = fs::read_dir(&root) else { return 0 };
        let mut count = 0;
        for prefix in prefixes {
            let prefix = prefix.expect("read the registry's blob dir");
            let Ok(blobs) = fs::read_dir(prefix.path()) else { continue };
            for blob in blobs {
                let blob = blob.expect("read the registry's blob dir");
                if blob.path().join("data").is_file() {
                    count += 1;
                }
            }
        }
        count
    }

    /// The data file of the blob `digest` (`sha256:HEX`), whether or not it exists.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "not a sha256 digest: {digest}");
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Kills the registry and waits for it; the storage stays (see [`Registry::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the registry if it runs and starts it again on the same port, storage and auth, and
    /// waits until it answers; panics if it does not come up.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("restart the registry on {}: {e}", self.addr());
        }
    }

    /// The config for the current port, with htpasswd auth from `htpasswd` if given.
    fn config_yaml(&self, htpasswd: Option<&Path>) -> String {
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: '{}'\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{}\n  secret: ovlsnap-test-registry\n",
            self.storage.display(),
            self.port
        );
        if let Some(htpasswd) = htpasswd {
            config += &format!("auth:\n  htpasswd:\n    realm: ovlsnap-test\n    path: '{}'\n", htpasswd.display());
        }
        config
    }

    /// Starts the binary with the config as written and waits until it listens and answers on
    /// `/v2/`; on failure the process is killed and the error holds the end of its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0) as usize;
        let log = OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| format!("open log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("open log: {e}"))?;
        let child = Command::new(BIN)
            .arg("serve")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("run {BIN}: {e}"))?;
        self.child = Some(child);
        let expected = if self.auth { 401 } else { 200 };
        let deadline = Instant::now() + START_TIMEOUT;
        let failure = loop {
            let child = self.child.as_mut().expect("registry child");
            match child.try_wait() {
                Ok(Some(status)) => break format!("it exited ({status})"),
                Ok(None) => {}
                Err(e) => break format!("wait for it: {e}"),
            }
            // Only a listening message of this run proves that the port is ours and not another
            // test's registry.
            let listening = self.log_text().get(log_start..).is_some_and(|new| new.contains("listening on"));
            if listening {
                match get_status(self.port, "/v2/") {
                    Ok(status) if status == expected => return Ok(()),
                    Ok(status) => break format!("GET /v2/ answered {status}, expected {expected}"),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                break format!("no answer on /v2/ within {START_TIMEOUT:?}");
            }
            sleep(Duration::from_millis(20));
        };
        self.stop();
        let text = self.log_text();
        let new = text.get(log_start..).unwrap_or(&text);
        let tail: Vec<&str> = new.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("{failure}; end of {}:\n{}", self.log.display(), tail.join("\n")))
    }

    /// The whole log so far (empty if it cannot be read).
    fn log_text(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago (bound on port 0 and released).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// The HTTP status of `GET path` on `127.0.0.1:port`, by a plain HTTP/1.0 request.
fn get_status(port: u16, path: &str) -> std::io::Result<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.strip_prefix("HTTP/1.").and_then(|rest| rest.get(2..5)).and_then(|code| code.parse().ok());
    status.ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {:?}", text.lines().next())))
}

/// A bcrypt hash of `password` (the only kind the registry's htpasswd auth accepts), made by
/// Python's `crypt` module (Debian 12's python3) or else by `htpasswd -B` (apache2-utils).
fn bcrypt_hash(password: &str) -> Result<String, String> {
    let python = "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))";
    let tries: [(&str, &[&str]); 2] = [("python3", &["-W", "ignore", "-c", python]), ("htpasswd", &["-nbB", "u"])];
    let mut errors = Vec::new();
    for (program, args) in tries {
        match Command::new(program).args(args).arg(password).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let hash = text.trim().trim_start_matches("u:");
                if hash.starts_with("$2") {
                    return Ok(hash.to_string());
                }
                errors.push(format!("{program}: no bcrypt hash in {:?}", text.trim()));
            }
            Ok(out) => {
                errors.push(format!("{program}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
            }
            Err(e) => errors.push(format!("{program}: {e}")),
        }
    }
    Err(errors.join("; "))
}
