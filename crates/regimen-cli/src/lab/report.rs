//! A lab report: Markdown with PNG figures beside it, and the same report as one
//! self-contained HTML page (figures embedded as base64 data URLs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One block of a report.
enum Block {
    Heading(usize, String),
    Text(String),
    /// A table: header and rows, cells already formatted.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A figure: file name in the report folder, caption.
    Figure(String, String),
}

/// A report being written into a folder.
pub struct Report {
    pub dir: PathBuf,
    title: String,
    blocks: Vec<Block>,
}

impl Report {
    pub fn new(dir: &Path, title: &str) -> Result<Report> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Report {
            dir: dir.to_path_buf(),
            title: title.to_string(),
            blocks: Vec::new(),
        })
    }

    pub fn heading(&mut self, level: usize, text: &str) {
        self.blocks.push(Block::Heading(level, text.to_string()));
    }

    pub fn text(&mut self, text: &str) {
        self.blocks.push(Block::Text(text.to_string()));
    }

    pub fn table(&mut self, header: &[&str], rows: Vec<Vec<String>>) {
        self.blocks.push(Block::Table(
            header.iter().map(|h| h.to_string()).collect(),
            rows,
        ));
    }

    /// A figure already written as `file` in the report folder.
    pub fn figure(&mut self, file: &str, caption: &str) {
        self.blocks
            .push(Block::Figure(file.to_string(), caption.to_string()));
    }

    /// Path of a file in the report folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The Markdown text.
    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for b in &self.blocks {
            match b {
                Block::Heading(l, t) => s += &format!("{} {t}\n\n", "#".repeat(l + 1)),
                Block::Text(t) => s += &format!("{t}\n\n"),
                Block::Table(h, rows) => {
                    s += &format!("| {} |\n", h.join(" | "));
                    s += &format!("|{}\n", "---|".repeat(h.len()));
                    for r in rows {
                        s += &format!("| {} |\n", r.join(" | "));
                    }
                    s += "\n";
                }
                Block::Figure(f, c) => s += &format!("![{c}]({f})\n\n*{c}*\n\n"),
            }
        }
        s
    }

    /// The HTML page, figures embedded.
    pub fn html(&self) -> Result<String> {
        let mut s = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{}</style></head><body>\n<h1>{}</h1>\n",
            escape(&self.title),
            STYLE,
            escape(&self.title)
        );
        for b in &self.blocks {
            match b {
                Block::Heading(l, t) => {
                    let id = anchor(t);
                    s += &format!("<h{0} id=\"{id}\">{1}</h{0}>\n", l + 1, escape(t));
                }
                Block::Text(t) => s += &format!("<p>{}</p>\n", inline(t)),
                Block::Table(h, rows) => {
                    s += "<table><tr>";
                    for c in h {
                        s += &format!("<th>{}</th>", inline(c));
                    }
                    s += "</tr>\n";
                    for r in rows {
                        s += "<tr>";
                        for c in r {
                            s += &format!("<td>{}</td>", inline(c));
                        }
                        s += "</tr>\n";
                    }
                    s += "</table>\n";
                }
                Block::Figure(f, c) => {
                    let bytes = std::fs::read(self.dir.join(f))
                        .with_context(|| format!("reading the figure {f}"))?;
                    s += &format!(
                        "<figure><img alt=\"{0}\" src=\"data:image/png;base64,{1}\"><figcaption>{0}</figcaption></figure>\n",
                        escape(c),
                        base64(&bytes)
                    );
                }
            }
        }
        s += "</body></html>\n";
        Ok(s)
    }

    /// The headings of level 1, for a table of contents: `(text, anchor)`.
    pub fn sections(&self) -> Vec<(String, String)> {
        self.blocks
            .iter()
            .filter_map(|b| match b {
                Block::Heading(1, t) => Some((t.clone(), anchor(t))),
                _ => None,
            })
            .collect()
    }

    /// Write `report.md` and `report.html` (atomically).
    pub fn write(&self) -> Result<()> {
        regimen::io::write_atomic(&self.dir.join("report.md"), self.markdown().as_bytes())?;
        regimen::io::write_atomic(&self.dir.join("report.html"), self.html()?.as_bytes())?;
        Ok(())
    }

    /// Put a table of contents of the level-1 headings first.
    pub fn with_contents(mut self) -> Report {
        let items: Vec<String> = self
            .sections()
            .iter()
            .map(|(t, a)| format!("[{t}](#{a})"))
            .collect();
        if !items.is_empty() {
            let mut blocks = vec![Block::Text(format!("Contents: {}", items.join(" · ")))];
            blocks.append(&mut self.blocks);
            self.blocks = blocks;
        }
        self
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-style:italic}\
code{background:#f4f4f4;padding:0 3px}";

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `code` spans and [text](#anchor) links of the Markdown subset reports use.
fn inline(s: &str) -> String {
    let mut out = String::new();
    let e = escape(s);
    let mut code = false;
    for part in e.split('`') {
        if code {
            out += &format!("<code>{part}</code>");
        } else {
            out += &links(part);
        }
        code = !code;
    }
    out
}

fn links(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        let Some(j) = rest[i..].find("](") else { break };
        let Some(k) = rest[i + j..].find(')') else {
            break;
        };
        out += &rest[..i];
        let text = &rest[i + 1..i + j];
        let href = &rest[i + j + 2..i + j + k];
        out += &format!("<a href=\"{href}\">{text}</a>");
        rest = &rest[i + j + k + 1..];
    }
    out + rest
}

fn anchor(t: &str) -> String {
    t.chars()
        .filter_map(|c| {
            if c.is_ascii_alphanumeric() {
                Some(c.to_ascii_lowercase())
            } else if c == ' ' || c == '-' {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        s.push(A[(n >> 18) as usize & 63] as char);
        s.push(A[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_answers() {
        // RFC 4648 test vectors.
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn markdown_and_html_hold_the_same_content() {
        let dir = std::env::temp_dir().join(format!("regimen-report-{}", std::process::id()));
        let mut r = Report::new(&dir, "T").unwrap();
        r.heading(1, "Init & scale");
        r.text("the `std` of layer 10");
        r.table(&["layer", "std"], vec![vec!["1".into(), "0.5".into()]]);
        let md = r.markdown();
        assert!(
            md.contains("## Init & scale") && md.contains("| 1 | 0.5 |"),
            "{md}"
        );
        let html = r.html().unwrap();
        assert!(
            html.contains("<h2 id=\"init--scale\">Init &amp; scale</h2>"),
            "{html}"
        );
        assert!(html.contains("<code>std</code>"), "{html}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
