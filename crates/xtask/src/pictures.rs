//! `cargo xtask pictures`: the SVG pictures in `docs/pictures/`, drawn from the text files next to
//! them. A source has one item per line: `title: TEXT`, `view: LABEL | ITEM, ITEM, ...` (the merged
//! view, drawn on top), `layer: LABEL | ITEM, ...` (top layer first), `note: TEXT`. The tidy test
//! checks that the committed SVGs are what the sources give.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const WIDTH: usize = 980;
const GAP: usize = 18;
const CHAR_W: f64 = 6.6;

/// One row of a picture.
struct Row {
    view: bool,
    label: String,
    items: Vec<String>,
}

/// Parses a picture source.
fn parse(text: &str) -> Result<(String, Vec<Row>, Vec<String>)> {
    let (mut title, mut rows, mut notes) = (String::new(), Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = line.split_once(':').with_context(|| format!("line {}: no `key:`", n + 1))?;
        let rest = rest.trim();
        match key {
            "title" => title = rest.to_string(),
            "note" => notes.push(rest.to_string()),
            "view" | "layer" => {
                let (label, items) = rest.split_once('|').unwrap_or((rest, ""));
                let items = split_items(items);
                rows.push(Row { view: key == "view", label: label.trim().to_string(), items });
            }
            k => bail!("line {}: unknown key {k:?}", n + 1),
        }
    }
    Ok((title, rows, notes))
}

/// Splits `a, b (c, d), e` at the commas outside parentheses.
fn split_items(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Where each item of a row goes: (x, line) with the label on its own line above.
fn layout(items: &[String]) -> (Vec<(f64, usize, f64)>, usize) {
    let (mut x, mut line) = (32.0, 0usize);
    let mut out = Vec::new();
    for item in items {
        let w = item.chars().count() as f64 * CHAR_W + 16.0;
        if x + w > (WIDTH - 30) as f64 && x > 32.0 {
            x = 32.0;
            line += 1;
        }
        out.push((x, line, w));
        x += w + 8.0;
    }
    (out, line + 1)
}

fn row_height(items: &[String]) -> usize {
    30 + layout(items).1 * 27
}

/// Draws a picture as SVG.
pub fn render(text: &str) -> Result<String> {
    let (title, rows, notes) = parse(text)?;
    let height = 60 + rows.iter().map(|r| row_height(&r.items) + GAP).sum::<usize>() + notes.len() * 20 + 10;
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(svg, r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#)?;
    writeln!(svg, r#"<text x="20" y="32" font-size="17" font-weight="bold">{}</text>"#, esc(&title))?;
    let mut y = 52;
    for (i, row) in rows.iter().enumerate() {
        let h = row_height(&row.items);
        let (fill, stroke) = if row.view { ("#e8f1fb", "#3973b5") } else { ("#f4f4f4", "#777") };
        writeln!(
            svg,
            r#"<rect x="20" y="{y}" width="{}" height="{h}" rx="6" fill="{fill}" stroke="{stroke}"/>"#,
            WIDTH - 40
        )?;
        writeln!(svg, r#"<text x="32" y="{}" font-weight="bold">{}</text>"#, y + 19, esc(&row.label))?;
        for (item, (x, line, w)) in row.items.iter().zip(layout(&row.items).0) {
            let iy = y + 28 + line * 27;
            let (f, s) = if item.contains("whiteout") { ("#fbe9e9", "#b53939") } else { ("white", "#999") };
            writeln!(svg, r#"<rect x="{x:.0}" y="{iy}" width="{w:.0}" height="21" rx="4" fill="{f}" stroke="{s}"/>"#)?;
            writeln!(svg, r#"<text x="{:.0}" y="{}">{}</text>"#, x + 8.0, iy + 15, esc(item))?;
        }
        if i + 1 < rows.len() {
            let ax = WIDTH / 2;
            writeln!(
                svg,
                r##"<path d="M {ax} {} l 0 {} m -5 -6 l 5 6 l 5 -6" stroke="#555" fill="none"/>"##,
                y + h + 2,
                GAP - 4
            )?;
        }
        y += h + GAP;
    }
    for note in &notes {
        writeln!(svg, r##"<text x="20" y="{}" fill="#333">{}</text>"##, y + 4, esc(note))?;
        y += 20;
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}

/// The picture sources in `docs/pictures/` and the SVG each gives.
pub fn sources() -> Result<Vec<(PathBuf, String)>> {
    let dir = crate::workspace_root().join("docs/pictures");
    let mut out = Vec::new();
    let mut names: Vec<_> = fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.collect();
    names.sort_by_key(|e| e.as_ref().map(|e| e.file_name()).ok());
    for e in names {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "txt") {
            let text = fs::read_to_string(&p)?;
            out.push((p.with_extension("svg"), render(&text).with_context(|| format!("{}", p.display()))?));
        }
    }
    Ok(out)
}

/// Writes every picture.
pub fn run() -> Result<()> {
    for (svg, text) in sources()? {
        fs::write(&svg, text).with_context(|| format!("writing {}", svg.display()))?;
        println!("wrote {}", rel(&svg).display());
    }
    Ok(())
}

fn rel(p: &Path) -> &Path {
    p.strip_prefix(crate::workspace_root()).unwrap_or(p)
}
