//! `cargo xtask test` (and `ci`): prerequisites, then formatting, lints and the test suite, each a step
//! with a header and a timing, stopping at the first failure. The suite runs with
//! `OVL_PODMAN_REQUIRED=1`: the prerequisites step installed podman, so a podman test that finds it
//! missing fails instead of skipping.
//!
//! The suite runs twice over the two FUSE transports: first with the kernel's `enable_uring`
//! set (every mount is served through io_uring rings where the kernel offers them), then the
//! mounting crates again with `OVLFS_URING=off` (through `/dev/fuse`). The setting is put back
//! as it was afterwards.

use anyhow::Result;

use crate::cmd::{cargo, header, timed};
use crate::prereqs;

/// Runs every step; `cargo_test_args` go to the end of `cargo test --workspace`.
pub fn run(cargo_test_args: &[String]) -> Result<()> {
    let args: String = cargo_test_args.iter().map(|a| format!(" {a}")).collect();
    let test_command = format!("OVL_PODMAN_REQUIRED=1 cargo test --workspace{args} (io_uring where offered)");
    let devfuse_command = format!("OVLFS_URING=off cargo test -p ovl-fs -p snap-cli{args} (/dev/fuse)");
    let _uring = EnableUring::set(true);
    let steps: [(&str, &dyn Fn() -> Result<()>); 5] = [
        ("prerequisites", &prereqs::check),
        ("cargo fmt --all -- --check", &|| cargo().args(["fmt", "--all", "--", "--check"]).run()),
        ("cargo clippy --workspace --all-targets -- -D warnings", &|| {
            cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).run()
        }),
        (test_command.trim_end(), &|| {
            cargo().env("OVL_PODMAN_REQUIRED", "1").args(["test", "--workspace"]).args(cargo_test_args).run()
        }),
        (devfuse_command.trim_end(), &|| {
            let crates = ["test", "-p", "ovl-fs", "-p", "snap-cli"];
            cargo().env("OVLFS_URING", "off").env("OVL_PODMAN_REQUIRED", "1").args(crates).args(cargo_test_args).run()
        }),
    ];
    let total = steps.len();
    for (number, (title, step)) in steps.iter().enumerate() {
        header(&format!("[{}/{total}] {title}", number + 1));
        timed(title, step)?;
    }
    println!("\nall {total} steps passed");
    Ok(())
}

/// The kernel's switch for FUSE over io_uring: new connections are offered rings only when set.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets `enable_uring` for as long as it lives, then puts the old value back. Does nothing
/// (and says so) where the kernel has no such switch or it cannot be written.
pub struct EnableUring(Option<String>);

impl EnableUring {
    /// Sets the switch to `on`.
    pub fn set(on: bool) -> EnableUring {
        let Ok(old) = std::fs::read_to_string(ENABLE_URING) else {
            eprintln!("note: no {ENABLE_URING}: this kernel has no FUSE over io_uring");
            return EnableUring(None);
        };
        if let Err(e) = std::fs::write(ENABLE_URING, if on { "Y" } else { "N" }) {
            eprintln!("note: could not write {ENABLE_URING}: {e}");
            return EnableUring(None);
        }
        EnableUring(Some(old.trim().to_string()))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(ENABLE_URING, old);
        }
    }
}
