//! The command line itself: help, version, generated completions and man pages, and errors that
//! say what to do next.

use std::fs;

use crate::common::*;

#[test]
fn help_version_and_generated_docs() {
    let help = ovlsnap(&["--help"]);
    let text = help.expect_ok("--help");
    for cmd in [
        "mount",
        "umount",
        "take",
        "list",
        "diff",
        "delete",
        "restore",
        "clone",
        "send",
        "receive",
        "mount-cmd",
        "mount-view",
        "allow",
        "unallow",
    ] {
        assert!(text.contains(cmd), "--help does not list {cmd}:\n{text}");
    }
    assert!(ovlsnap(&["--version"]).expect_ok("--version").starts_with("ovlsnap "));
    assert!(ovlsnap(&["take", "--help"]).expect_ok("take --help").contains("Examples"), "take --help has examples");

    let s = Scratch::new();
    let dir = s.mkdir("dist");
    ovlsnap(&["generate-docs".as_ref(), dir.as_os_str()]).expect_ok("generate-docs");
    for f in ["completions/ovlsnap.bash", "completions/_ovlsnap", "completions/ovlsnap.fish", "man/man1/ovlsnap.1"] {
        let len = fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{f} was not generated (or is empty)");
    }
    let page = fs::read_to_string(dir.join("man/man1/ovlsnap-restore.1")).expect("a page per command");
    assert!(page.contains("restore"), "the restore page is about restore");
    // Issue 21: what a man page answers beyond the options.
    let main = fs::read_to_string(dir.join("man/man1/ovlsnap.1")).unwrap();
    for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "CAVEATS", "SEE ALSO"] {
        assert!(
            main.contains(&format!(".SH \"{section}\"")) || main.contains(&format!(".SH {section}\n")),
            "no {section}"
        );
    }
    for cmd in ["auto", "run", "hold", "release", "holds", "rename", "set"] {
        assert!(dir.join(format!("man/man1/ovlsnap-{cmd}.1")).is_file(), "no page for {cmd}");
    }
    // It renders: man(1) reads it without warnings, when man is there.
    if let Ok(out) = std::process::Command::new("man")
        .args(["--warnings", "-l", "-Tutf8"])
        .arg(dir.join("man/man1/ovlsnap.1"))
        .output()
    {
        // (Bold and underline come as overstrikes: `X\x08X`.)
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(text.contains("EXIT STATUS") && text.contains("OVLSNAP_NOW"), "{text}");
        assert!(
            String::from_utf8_lossy(&out.stderr).trim().is_empty(),
            "man warns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn errors_say_what_to_do_next() {
    let s = Scratch::new();
    let plain = s.mkdir("plain");
    let out = ovlsnap(&["take".as_ref(), "x".as_ref(), "--mount".as_ref(), plain.as_os_str()]);
    let err = out.expect_failure("take on a plain dir");
    assert!(err.contains("ovlsnap mount"), "the error names the command to run: {err}");
    let out = ovlsnap(&["mount".as_ref(), s.path().join("missing").as_os_str()]);
    assert!(out.expect_failure("mount of a missing dir").contains("no such directory"));
    // A LIVE that has its own `.snapshots` would lose sight of it: refused, nothing changed.
    let live = s.mkdir("live");
    fs::create_dir(live.join(".snapshots")).unwrap();
    let out = ovlsnap(&["mount".as_ref(), live.as_os_str()]);
    assert!(out.expect_failure("mount over a .snapshots").contains("rename it first"));
    assert!(!live.join(".ovlsnap").exists() && !is_fuse_mount(&live), "the refused mount changed LIVE");
}

/// Issue 16.7: `ovlsnap list | head` ended in a panic on the closed pipe. Output commands now end
/// quietly, as other Unix tools do (killed by SIGPIPE, nothing on stderr), and the daemon lives on.
#[test]
fn a_closed_pipe_ends_output_commands_quietly() {
    let m = SnapMount::start(Form::Separate, |live| fs::write(live.join("f"), b"1\n").unwrap());
    m.take(Some("t1"));
    fs::write(m.mnt().join("f"), b"2\n").unwrap();
    for cmd in ["list", "diff t1", "status", "send t1"] {
        // The reader is gone before ovlsnap has connected to its daemon, let alone written.
        let script = format!("\"$0\" {cmd} --mount \"$1\" 2>&1 | true; echo \"${{PIPESTATUS[0]}}\"");
        let out = run_with_deadline(
            std::ffi::OsStr::new("bash"),
            &["-c".into(), script.into(), ovlsnap_bin().into(), m.mnt().into()],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let status = out.stdout.trim();
        assert!(status == "141" || status == "0", "{cmd} | true: exit {status}, expected SIGPIPE (141)\n{out}");
        assert!(!out.stderr.contains("panicked"), "{cmd}: {out}");
    }
    let out = run_with_deadline(
        std::ffi::OsStr::new("bash"),
        &[
            "-c".into(),
            "\"$0\" list --mount \"$1\" 2>&1 >/dev/full; echo $?".into(),
            ovlsnap_bin().into(),
            m.mnt().into(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.stdout.contains("panicked"), "a full disk on stdout: {out}");
    m.take(Some("t2"));
}

/// Regression: with `RUST_LOG` set, the background daemon kept its stderr on a pipe to `ovlsnap
/// mount`, which closed when the command returned; the daemon's next log line killed it (the
/// mount then answered ECONNABORTED). The daemon now logs to the command's own stderr.
#[test]
fn the_daemon_keeps_logging_where_mount_logged() {
    let mut m = SnapMount::prepare(Form::Separate);
    fs::write(m.live().join("f"), b"one").unwrap();
    let log = m.live().parent().unwrap().join("daemon.log");
    let script = format!("RUST_LOG=debug exec \"$@\" 2>>'{}'", log.display());
    m.mount_wrapped(&["sh", "-c", &script, "sh"]);
    for i in 0..10 {
        fs::write(m.mnt().join(format!("g{i}")), b"x").unwrap();
        assert_eq!(fs::read(m.mnt().join("f")).unwrap(), b"one", "read {i}");
    }
    m.take(Some("after-logging"));
    assert!(m.mnt().join(".snapshots/after-logging/f").exists(), "the snapshot is browsable");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("DEBUG"), "the daemon's log reached the file: {text}");
}

/// Issue 21: a name of 201-255 bytes was refused as "not a valid name" without the reason; the
/// error now says what is wrong with it (here: the length, and the limit).
#[test]
fn a_refused_name_says_why() {
    let m = SnapMount::start(Form::Separate, |_| {});
    let long = "n".repeat(201);
    let out = m.try_take(Some(&long));
    let err = out.expect_failure("take with a 201-byte name");
    assert!(err.contains("201 bytes long, and the limit is 200"), "{err}");
    let out = m.try_take(Some("a\tb"));
    let err = out.expect_failure("take with a tab in the name");
    assert!(err.contains("control character"), "{err}");
    m.take(Some(&"n".repeat(200)));
}

/// Issue 21: bash and zsh complete snapshot names of the mount where a command takes one (the
/// mount of the current directory, or the `--mount` on the line), and paths elsewhere.
#[test]
fn bash_and_zsh_complete_the_snapshot_names_of_the_mount() {
    let m = SnapMount::start(Form::Separate, |live| fs::write(live.join("f"), b"x").unwrap());
    for n in ["monday", "month-end", "tuesday"] {
        m.take(Some(n));
    }
    let docs = m.scratch().mkdir("docs");
    ovlsnap(&["generate-docs".as_ref(), docs.as_os_str()]).expect_ok("generate-docs");
    let bin_dir = ovlsnap_bin().parent().unwrap().to_path_buf();
    // Completes `LINE` as bash would with the cursor at its end; prints the candidates.
    let complete = |dir: &std::path::Path, line: &str| -> Vec<String> {
        let script = format!(
            r#"source '{}'
COMP_LINE='{line}'; read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *' ' ]] && COMP_WORDS+=('')
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_POINT=${{#COMP_LINE}}
_ovlsnap_snapshot_names ovlsnap "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
            docs.join("completions/ovlsnap.bash").display()
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
            .output()
            .unwrap();
        let mut got: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
        got.sort();
        got
    };
    let mnt = m.mnt().to_path_buf();
    assert_eq!(complete(&mnt, "ovlsnap delete mo"), ["monday", "month-end"]);
    assert_eq!(complete(&mnt, "ovlsnap diff monday "), ["monday", "month-end", "tuesday"]);
    assert_eq!(complete(&mnt, "ovlsnap hold keep t"), ["tuesday"]);
    let elsewhere = m.scratch().mkdir("elsewhere");
    let line = format!("ovlsnap restore --mount {} tu", mnt.display());
    assert_eq!(complete(&elsewhere, &line), ["tuesday"], "names of the --mount given");
    assert!(complete(&elsewhere, "ovlsnap delete mo").is_empty(), "outside a mount: no names, no error");
    // fish asks the same command (fish itself is not installed here to run it).
    let fish = fs::read_to_string(docs.join("completions/ovlsnap.fish")).unwrap();
    assert!(fish.contains("-a \"(ovlsnap complete-names 2>/dev/null)\""), "{fish}");
    // Not a name position: clap's completion (subcommands here).
    assert!(complete(&mnt, "ovlsnap ho").contains(&"hold".to_string()));

    // zsh: the completion system itself, in an interactive zsh on a pseudo-terminal, with TAB
    // pressed after the line; what it offers is recorded by a `compadd` that passes everything on.
    if std::process::Command::new("zsh").arg("-fc").arg("true").status().is_err() {
        // `cargo xtask test` installs zsh; a bare `cargo test` may lack it.
        eprintln!("SKIPPED: no zsh to run its completion");
        return;
    }
    let driver = m.scratch().path().join("drive.zsh");
    fs::write(&driver, ZSH_DRIVER).unwrap();
    let zsh = |dir: &std::path::Path, line: &str| -> Vec<String> {
        let out = m.scratch().path().join("offered");
        let _ = fs::remove_file(&out);
        let status = std::process::Command::new("timeout")
            .args(["30", "zsh", "-f"])
            .arg(&driver)
            .arg(&out)
            .arg(docs.join("completions"))
            .arg(line)
            .current_dir(dir)
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
            .status()
            .unwrap();
        assert!(status.success(), "the zsh driver failed: {status}");
        let mut got: Vec<String> = fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        got.sort();
        got.dedup();
        got
    };
    assert_eq!(zsh(&mnt, "ovlsnap delete mo"), ["monday", "month-end"]);
    assert_eq!(zsh(&mnt, "ovlsnap diff monday "), ["monday", "month-end", "tuesday"]);
    assert_eq!(zsh(&mnt, "ovlsnap hold keep t"), ["tuesday"]);
    assert_eq!(zsh(&mnt, "ovlsnap send --from m"), ["monday", "month-end"]);
    assert_eq!(zsh(&elsewhere, &line), ["tuesday"], "zsh: names of the --mount given");
    let outside = zsh(&elsewhere, "ovlsnap delete mo");
    assert!(outside.is_empty(), "zsh outside a mount: no names, but {outside:?}");
    assert!(zsh(&mnt, "ovlsnap ho").contains(&"hold".to_string()), "zsh: clap's subcommands");
}

/// Drives an interactive zsh on a pseudo-terminal: `compinit` with the completions in `$2`, a
/// `compadd` that records what it is given to offer in `$1` and passes it on, then line `$3` and a
/// TAB; done when `$1` stayed the same for half a second (10 s at most).
const ZSH_DRIVER: &str = r#"zmodload zsh/zpty
out=$1; compdir=$2; line=$3
zpty z zsh -f -i
zpty -w z "PS1='' ; fpath=($compdir \$fpath); autoload -U compinit; compinit -u -D"
zpty -w z 'compadd () { if [[ " $* " == *" -"[OAD]" "* ]]; then builtin compadd "$@"; return; fi; local -a __h; builtin compadd -A __h "$@"; print -rl -- ${^__h} >> '"$out"'; builtin compadd "$@"; }'
zpty -w z 'print READY-$((1+1))'
zpty -r z x '*READY-2*'
zpty -w -n z "$line"$'\t'
integer i last=-1 size
for ((i = 0; i < 100; i++)); do
    sleep 0.1
    size=$(wc -c < $out 2>/dev/null || echo 0)
    (( i > 5 && size == last )) && break
    last=size
done
zpty -d z
"#;
