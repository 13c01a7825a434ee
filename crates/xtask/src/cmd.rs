//! Running external programs the way a person reads a terminal: print `$ command`, then run it with the
//! terminal's own stdin/stdout/stderr so its output streams through unchanged.
//!
//! Children inherit our stdio rather than writing into pipes on purpose: `ovlfs` daemonizes, and a daemon
//! that kept a pipe of ours open would make a reader wait for it forever.

use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// A command to run, with the form we show the reader kept beside it.
pub struct Cmd {
    command: Command,
    shown: String,
}

/// A command running `program`.
pub fn cmd(program: impl AsRef<OsStr>) -> Cmd {
    let program = program.as_ref();
    Cmd { command: Command::new(program), shown: quote(program) }
}

/// `cargo` (the one from `$CARGO` when set, as when we run under `cargo run`), in the workspace root.
pub fn cargo() -> Cmd {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cargo = cmd(program);
    cargo.shown = "cargo".to_owned();
    cargo.command.current_dir(crate::workspace_root());
    cargo
}

/// Echoes `$ script` and runs it with `sh -c` in `dir`.
pub fn sh(dir: &Path, script: &str) -> Result<()> {
    let mut shell = cmd("sh").arg("-c").arg(script).dir(dir);
    shell.shown = script.to_owned();
    shell.run()
}

impl Cmd {
    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        self.command.arg(arg);
        self.shown.push(' ');
        self.shown.push_str(&quote(arg));
        self
    }

    /// Adds several arguments.
    pub fn args<I>(self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        args.into_iter().fold(self, Cmd::arg)
    }

    /// Sets an environment variable for the child (shown as `NAME=value` before the command).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.command.env(name, value);
        self.shown = format!("{name}={} {}", quote(OsStr::new(value)), self.shown);
        self
    }

    /// Runs the child in `dir`.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// Echoes the command, runs it, and fails unless it exits 0.
    pub fn run(self) -> Result<()> {
        println!("{}", dim(&format!("$ {}", self.shown)));
        self.run_quiet()
    }

    /// Runs the command without echoing it, and fails unless it exits 0.
    pub fn run_quiet(mut self) -> Result<()> {
        let status = self.command.status().with_context(|| format!("could not start `{}`", self.shown))?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.shown);
        }
        Ok(())
    }

    /// Runs the command without echoing it and returns whether it exited 0; its output is discarded.
    pub fn succeeds(mut self) -> bool {
        self.command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// Prints a step header, e.g. `==> [2/4] cargo fmt`.
pub fn header(text: &str) {
    println!("\n{}", bold(&format!("==> {text}")));
}

/// Prints a line of narrative for the reader.
pub fn say(text: &str) {
    println!("\n{}", bold(&format!("# {text}")));
}

/// Runs `f`, then reports how long it took.
pub fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let result = f();
    let verdict = if result.is_ok() { "ok" } else { "FAILED" };
    println!("<== {what}: {verdict} in {:.1}s", start.elapsed().as_secs_f64());
    result
}

fn bold(text: &str) -> String {
    styled("1", text)
}

fn dim(text: &str) -> String {
    styled("2", text)
}

fn styled(code: &str, text: &str) -> String {
    if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Quotes `word` for display the way a POSIX shell would need it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.into_owned();
    }
    let mut quoted = String::from("'");
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_words_alone_and_quotes_the_rest() {
        assert_eq!(quote(OsStr::new("lowerdir=/a:/b,upperdir=/u")), "lowerdir=/a:/b,upperdir=/u");
        assert_eq!(quote(OsStr::new("two words")), "'two words'");
        assert_eq!(quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn shown_form_lists_program_and_arguments() {
        let c = cmd("mount").args(["-t", "overlay", "my dir"]);
        assert_eq!(c.shown, "mount -t overlay 'my dir'");
    }

    #[test]
    fn failing_command_is_an_error_and_succeeds_reports_it() {
        assert!(cmd("false").run_quiet().is_err());
        assert!(!cmd("false").succeeds());
        assert!(cmd("true").succeeds());
        assert!(cmd("/nonexistent/program").run_quiet().is_err());
    }
}
