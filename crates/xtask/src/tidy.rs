//! Tidy checks run as ordinary tests (`cargo test -p xtask`): rules of STYLE.md that a machine
//! can hold us to.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    rust_files(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    fn workspace_files() -> Vec<PathBuf> {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut files = Vec::new();
        rust_files(&crates, &mut files);
        assert!(files.len() > 20, "found the workspace sources");
        files
    }

    #[test]
    fn every_file_opens_with_a_module_doc() {
        for f in workspace_files() {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.starts_with("//!"), "{} must start with a `//!` paragraph", f.display());
        }
    }

    #[test]
    fn no_placeholders_in_code() {
        let (todo, unimpl) = (concat!("todo", "!("), concat!("unimplemented", "!("));
        for f in workspace_files() {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(!text.contains(todo) && !text.contains(unimpl), "{}: placeholder macro", f.display());
        }
    }

    #[test]
    fn unsafe_only_in_sys_modules_with_a_safety_line() {
        let word = concat!("unsafe", " {");
        for f in workspace_files() {
            let text = std::fs::read_to_string(&f).unwrap();
            let in_sys = f.components().any(|c| c.as_os_str() == "sys");
            for (i, line) in text.lines().enumerate() {
                if line.contains(word) {
                    assert!(in_sys, "{}:{}: unsafe outside a sys module", f.display(), i + 1);
                    let above = text.lines().take(i).collect::<Vec<_>>();
                    let tail = &above[above.len().saturating_sub(4)..];
                    assert!(
                        tail.iter().any(|l| l.contains("// SAFETY:")),
                        "{}:{}: unsafe block without a `// SAFETY:` line",
                        f.display(),
                        i + 1
                    );
                }
            }
        }
    }

    #[test]
    fn pictures_match_their_sources() {
        let pictures = crate::pictures::sources().unwrap();
        assert!(pictures.len() >= 2, "the layer stack and the snapshot chain");
        for (svg, want) in pictures {
            let have = std::fs::read_to_string(&svg).unwrap_or_default();
            assert!(have == want, "{} is stale: run `cargo xtask pictures`", svg.display());
        }
    }
}
