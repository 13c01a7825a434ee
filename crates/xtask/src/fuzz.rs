//! `cargo xtask fuzz [--secs N] [TARGET...]`: runs the cargo-fuzz targets in `fuzz/` (decoders of
//! untrusted input: origin handles, redirects, the store's snapshots.json, send streams) for N
//! seconds each, starting from the seed corpus in `fuzz/corpus/TARGET` (copied to
//! `target/fuzz-corpus/`, so the repo's corpus only changes by hand). Needs the nightly toolchain and `cargo install cargo-fuzz`.
//! A crash leaves its input in `fuzz/artifacts/TARGET/` and fails the task.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::header;

/// Every target in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &["origin", "redirect", "store_meta", "stream", "layer_values"];

/// Runs `targets` (all when empty) for `secs` seconds each.
pub fn run(secs: u64, targets: &[String]) -> Result<()> {
    let ok = Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "cargo-fuzz on the nightly toolchain is needed: run `rustup toolchain install nightly && cargo install cargo-fuzz`"
        );
    }
    let fuzz = crate::workspace_root().join("fuzz");
    let chosen: Vec<&str> =
        if targets.is_empty() { TARGETS.to_vec() } else { targets.iter().map(String::as_str).collect() };
    let mut summary = Vec::new();
    for t in chosen {
        if !TARGETS.contains(&t) {
            bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
        }
        header(&format!("fuzzing {t} for {secs} s"));
        let corpus = crate::target_dir().join("fuzz-corpus").join(t);
        let _ = fs::remove_dir_all(&corpus);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        for e in fs::read_dir(fuzz.join("corpus").join(t)).with_context(|| format!("seed corpus of {t}"))? {
            let e = e?;
            fs::copy(e.path(), corpus.join(e.file_name()))?;
        }
        let out = Command::new("cargo")
            .current_dir(&fuzz)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .output()
            .with_context(|| format!("running the {t} target"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log.lines().rev().find_map(|l| l.strip_prefix("Done ").map(|r| r.to_string()));
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {t} failed: its input is in fuzz/artifacts/{t}/");
        }
        let line = format!("{t}: {}", runs.unwrap_or_else(|| "done".into()));
        println!("{line}");
        summary.push(line);
    }
    println!("\nno crash:\n  {}", summary.join("\n  "));
    Ok(())
}
