//! How paths leave the program: printed for people, and written in JSON for programs. A Linux
//! name is any bytes but `/` and NUL, so neither may assume UTF-8 or a name without newlines.
//!
//! - **Text** ([`escape`], [`shown`]): the quoting of `ls --quoting-style=escape` (`ls -b`) in a
//!   UTF-8 locale, so one name is one word on one line: `\\` for a backslash, `\ ` for a space,
//!   `\a \b \t \n \v \f \r` for those controls, a three-digit octal `\NNN` for each byte of any
//!   other control character (C0, DEL, C1 and the line and paragraph separators U+2028/U+2029)
//!   and for each byte that is not UTF-8. Everything else is printed as it is.
//! - **JSON** ([`json_path`]): a path is a plain JSON string when its bytes are UTF-8 (which JSON
//!   escapes as needed: a newline is `"\n"`), and otherwise an object holding all its bytes,
//!   `{"bytes": [99, 97, 102, 255]}`. Lossless for any name, and ordinary names stay strings.
//!
//! ```
//! use snap_fs::names::escape;
//! assert_eq!(escape(b"caf\xff new\nline"), r"caf\377\ new\nline");
//! ```

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `raw` quoted as `ls --quoting-style=escape` does in a UTF-8 locale (see the module doc).
pub fn escape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let octal = |out: &mut String, b: u8| {
        let _ = write!(out, "\\{b:03o}");
    };
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                ' ' => out.push_str("\\ "),
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0b' => out.push_str("\\v"),
                '\x0c' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                // Terminals act on these (or break lines at them) instead of showing them.
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        octal(&mut out, b);
                    }
                }
                c => out.push(c),
            }
        }
        for &b in chunk.invalid() {
            octal(&mut out, b);
        }
    }
    out
}

/// A path relative to a tree's root as people see it: `/` and the path, escaped ([`escape`]).
pub fn shown(rel: &Path) -> String {
    let raw = rel.as_os_str().as_bytes();
    let raw = raw.strip_prefix(b"/").unwrap_or(raw);
    format!("/{}", escape(raw))
}

/// Serde functions for a `PathBuf` field in the JSON the control socket and `--json` outputs
/// carry (`#[serde(with = "crate::names::json_path")]`): a string when the path is UTF-8, else
/// `{"bytes": [...]}` (see the module doc). Reading takes either form.
pub mod json_path {
    use std::fmt;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::de::{self, MapAccess, Visitor};
    use serde::ser::SerializeStruct;
    use serde::{Deserializer, Serializer};

    /// Writes `p` as a string, or as `{"bytes": [...]}` when it is not UTF-8.
    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        let raw = p.as_os_str().as_bytes();
        match std::str::from_utf8(raw) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut o = s.serialize_struct("Bytes", 1)?;
                o.serialize_field("bytes", raw)?;
                o.end()
            }
        }
    }

    /// Reads a path written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        d.deserialize_any(PathVisitor)
    }

    struct PathVisitor;

    impl<'de> Visitor<'de> for PathVisitor {
        type Value = PathBuf;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"a path: a string, or {"bytes": [...]}"#)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<PathBuf, E> {
            Ok(PathBuf::from(v))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PathBuf, A::Error> {
            let mut bytes: Option<Vec<u8>> = None;
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "bytes" if bytes.is_none() => bytes = Some(map.next_value()?),
                    "bytes" => return Err(de::Error::duplicate_field("bytes")),
                    other => return Err(de::Error::unknown_field(other, &["bytes"])),
                }
            }
            let bytes = bytes.ok_or_else(|| de::Error::missing_field("bytes"))?;
            Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
        }
    }
}

/// A path in the JSON form of [`json_path`], for paths held in containers (a `Vec`, a tuple, an
/// `Option`), where a field attribute cannot reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath(pub std::path::PathBuf);

impl serde::Serialize for JsonPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        json_path::serialize(&self.0, s)
    }
}

impl<'de> serde::Deserialize<'de> for JsonPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        json_path::deserialize(d).map(JsonPath)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStringExt;
    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[test]
    fn escapes_like_ls_escape_style() {
        let cases: &[(&[u8], &str)] = &[
            (b"plain", "plain"),
            (b"a b", r"a\ b"),
            (b"back\\slash", r"back\\slash"),
            (b"a\nb\tc\rd", r"a\nb\tc\rd"),
            (b"bel\x07\x01\x7f", r"bel\a\001\177"),
            (b"e\xffz", r"e\377z"),
            ("café".as_bytes(), "café"),
            (b"c1\xc2\x85x", r"c1\302\205x"),
            (b"ls\xe2\x80\xa8x", r"ls\342\200\250x"),
            (b"cut\xc3", r"cut\303"),
            (b"q'\"~#", "q'\"~#"),
        ];
        for (raw, want) in cases {
            assert_eq!(escape(raw), *want, "{:?}", OsStr::from_bytes(raw));
        }
        assert_eq!(shown(Path::new("a/new\nline")), r"/a/new\nline");
        assert_eq!(shown(Path::new("")), "/");
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct P {
        #[serde(with = "json_path")]
        p: PathBuf,
    }

    #[test]
    fn json_paths_are_strings_when_utf8_and_bytes_otherwise() {
        let p = |b: &[u8]| P { p: PathBuf::from(OsString::from_vec(b.to_vec())) };
        let cases: &[(&[u8], &str)] = &[
            (b"a/b c", r#"{"p":"a/b c"}"#),
            (b"new\nline", r#"{"p":"new\nline"}"#),
            ("café".as_bytes(), r#"{"p":"café"}"#),
            (b"caf\xff", r#"{"p":{"bytes":[99,97,102,255]}}"#),
        ];
        for (raw, want) in cases {
            let text = serde_json::to_string(&p(raw)).unwrap();
            assert_eq!(text, *want);
            assert_eq!(serde_json::from_str::<P>(&text).unwrap(), p(raw));
        }
        assert!(serde_json::from_str::<P>(r#"{"p":{"bytes":[256]}}"#).is_err());
        assert!(serde_json::from_str::<P>(r#"{"p":{"text":"x"}}"#).is_err());
        assert!(serde_json::from_str::<P>(r#"{"p":{}}"#).is_err());
    }
}
