//! `cargo xtask test` (and `ci`): prerequisites, then formatting, lints and the test suite, each a step
//! with a header and a timing, stopping at the first failure. The suite runs with
//! `OVL_PODMAN_REQUIRED=1`: the prerequisites step installed podman, so a podman test that finds it
//! missing fails instead of skipping.

use anyhow::Result;

use crate::cmd::{cargo, header, timed};
use crate::prereqs;

/// Runs every step; `cargo_test_args` go to the end of `cargo test --workspace`.
pub fn run(cargo_test_args: &[String]) -> Result<()> {
    let test_command = format!("OVL_PODMAN_REQUIRED=1 cargo test --workspace {}", cargo_test_args.join(" "));
    let steps: [(&str, &dyn Fn() -> Result<()>); 4] = [
        ("prerequisites", &prereqs::check),
        ("cargo fmt --all -- --check", &|| cargo().args(["fmt", "--all", "--", "--check"]).run()),
        ("cargo clippy --workspace --all-targets -- -D warnings", &|| {
            cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).run()
        }),
        (test_command.trim_end(), &|| {
            cargo().env("OVL_PODMAN_REQUIRED", "1").args(["test", "--workspace"]).args(cargo_test_args).run()
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
