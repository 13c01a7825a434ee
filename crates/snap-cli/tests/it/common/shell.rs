//! Reading back what `ovlsnap mount-cmd` prints as a shell and the kernel overlay would: shell
//! words (quotes and backslashes undone, unquoted metacharacters refused) and the overlay's
//! option list (split at unescaped commas, `lowerdir` split at unescaped colons).

/// Splits `line` into words as a POSIX shell does for a simple command, without expanding
/// anything: an unquoted character that would make the shell do more than run one command
/// with literal arguments (`$`, a backtick, `;`, `&`, `|`, `<`, `>`, `(`, `)`, a newline, `*`,
/// `?`, `[`, `~`, `#`, `{`, `}`) is an error, as is an unfinished quote.
pub fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(cur.take()),
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(format!("unfinished '...' in {line:?}")),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('$' | '`' | '"' | '\\')) => w.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(format!("unfinished \"...\" in {line:?}")),
                        },
                        Some(c @ ('$' | '`')) => return Err(format!("{c:?} expands inside \"...\" in {line:?}")),
                        Some(c) => w.push(c),
                        None => return Err(format!("unfinished \"...\" in {line:?}")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => cur.get_or_insert_with(String::new).push(c),
                None => return Err(format!("a trailing backslash in {line:?}")),
            },
            c if "$`;&|<>()\n*?[~#{}".contains(c) => {
                return Err(format!("unquoted {c:?} in {line:?}: the shell would not run it as one plain command"));
            }
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(cur.take());
    Ok(words)
}

/// Splits `s` at each `sep` that no backslash escapes, keeping the escapes in the pieces.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let last = out.last_mut().expect("never empty");
                last.push('\\');
                last.extend(chars.next());
            }
            c if c == sep => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    out
}

/// Undoes the overlay's escapes in one path (`\x` is `x`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
    }
    out
}

/// The kernel overlay's reading of an option string: its options (escapes kept) and the paths of
/// its `lowerdir=` list (unescaped), top first.
pub fn overlay_options(opts: &str) -> (Vec<String>, Vec<String>) {
    let options = split_escaped(opts, ',');
    let lowers = options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .map(|l| split_escaped(l, ':').iter().map(|p| unescape(p)).collect())
        .unwrap_or_default();
    (options, lowers)
}
