//! What a check found, and how it is shown: one line per finding for people, JSON for scripts,
//! and the exit code (`1` while errors remain, else `0`).

use std::fmt::Write as _;
use std::path::PathBuf;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The view is not what the layers were meant to show, or the kernel refuses part of it.
    Error,
    /// Odd, but the kernel reads the layers the same way (it ignores what is odd).
    Warning,
    /// Harmless leftovers that `--repair` removes without changing the view.
    Fixable,
}

impl Severity {
    /// `error`, `warning` or `fixable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Fixable => "fixable",
        }
    }
}

/// One problem: where, how bad, what kind (a stable kebab-case name for scripts, listed in
/// [`crate::check`]), and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The kind, e.g. `orphan-whiteout`.
    pub kind: &'static str,
    /// The object on disk (absolute), e.g. `/upper/a/b`.
    pub path: PathBuf,
    /// What is wrong and what it means, one sentence.
    pub detail: String,
}

impl Finding {
    /// A finding.
    pub fn new(severity: Severity, kind: &'static str, path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self { severity, kind, path: path.into(), detail: detail.into() }
    }
}

/// The result of a check (and of a repair: what it fixed, then what the check after it found).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What the (last) check found, by path.
    pub findings: Vec<Finding>,
    /// What a repair fixed.
    pub repaired: Vec<Finding>,
    /// How many objects were looked at.
    pub checked: u64,
}

impl Report {
    /// Adds the findings and the count of `other`.
    pub fn merge(&mut self, other: Report) {
        self.findings.extend(other.findings);
        self.repaired.extend(other.repaired);
        self.checked += other.checked;
    }

    /// Sorts findings by path, then severity, for stable output.
    pub fn sort(&mut self) {
        let key = |f: &Finding| (f.path.clone(), f.severity, f.kind);
        self.findings.sort_by_key(key);
        self.repaired.sort_by_key(key);
    }

    /// How many findings have severity `s`.
    pub fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }

    /// The findings `--repair` would fix.
    pub fn fixable(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity == Severity::Fixable)
    }

    /// `1` while errors remain, else `0` (warnings and fixable leftovers do not fail a check).
    pub fn exit_code(&self) -> u8 {
        if self.count(Severity::Error) > 0 { 1 } else { 0 }
    }

    /// The report for people: one line per finding (`severity: path: detail [kind]`), what a
    /// repair fixed, and a summary line.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for f in &self.repaired {
            let _ = writeln!(out, "repaired: {}: {} [{}]", f.path.display(), f.detail, f.kind);
        }
        for f in &self.findings {
            let _ = writeln!(out, "{}: {}: {} [{}]", f.severity.as_str(), f.path.display(), f.detail, f.kind);
        }
        let (e, w, x) = (self.count(Severity::Error), self.count(Severity::Warning), self.count(Severity::Fixable));
        let objects = if self.checked == 1 { "object" } else { "objects" };
        let _ = write!(out, "checked {} {objects}: ", self.checked);
        if e + w + x == 0 {
            out.push_str("clean");
        } else {
            let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            let _ = write!(
                out,
                "{}, {}, {}",
                plural(e, "error", "errors"),
                plural(w, "warning", "warnings"),
                plural(x, "fixable", "fixable")
            );
            if x > 0 {
                out.push_str(" (--repair removes the fixable ones)");
            }
        }
        if !self.repaired.is_empty() {
            let _ = write!(out, "; repaired {}", self.repaired.len());
        }
        out.push('\n');
        out
    }

    /// What a command prints: [`Report::json`] (pretty) or [`Report::human`].
    pub fn render(&self, json: bool) -> String {
        if json { format!("{:#}\n", self.json()) } else { self.human() }
    }

    /// The report for scripts: `{"clean", "errors", "warnings", "fixable", "checked",
    /// "findings": [{"severity", "kind", "path", "detail"}], "repaired": [...]}`. `clean` means
    /// no errors (the exit code is 0).
    pub fn json(&self) -> serde_json::Value {
        let list = |v: &[Finding]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|f| {
                    serde_json::json!({
                        "severity": f.severity.as_str(),
                        "kind": f.kind,
                        "path": f.path.to_string_lossy(),
                        "detail": f.detail,
                    })
                })
                .collect()
        };
        serde_json::json!({
            "clean": self.exit_code() == 0,
            "errors": self.count(Severity::Error),
            "warnings": self.count(Severity::Warning),
            "fixable": self.count(Severity::Fixable),
            "checked": self.checked,
            "findings": list(&self.findings),
            "repaired": list(&self.repaired),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_exit_code() {
        let mut r = Report { checked: 3, ..Default::default() };
        assert_eq!(r.human(), "checked 3 objects: clean\n");
        r.findings.push(Finding::new(Severity::Fixable, "orphan-whiteout", "/u/x", "hides nothing"));
        assert_eq!(r.exit_code(), 0);
        r.findings.push(Finding::new(Severity::Error, "metacopy-no-data", "/u/f", "no data"));
        assert_eq!(r.exit_code(), 1);
        let text = r.human();
        assert!(text.contains("error: /u/f: no data [metacopy-no-data]\n"), "{text}");
        assert!(text.ends_with("1 error, 0 warnings, 1 fixable (--repair removes the fixable ones)\n"), "{text}");
        assert_eq!(r.json()["clean"], false);
        assert_eq!(r.json()["findings"][1]["kind"], "metacopy-no-data");
    }
}
