//! The docs point into the code by name: [`fn on_readable`](../src/...rs)
//! links the file, and the label names what to look for in it. These
//! tests keep those pointers true as the code moves: a reader who follows
//! one finds the thing the text talks about, and no edit elsewhere in the
//! file can break the link (a line number would).

use std::fs;
use std::path::{Path, PathBuf};

fn docs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in fs::read_dir(root.join("docs")).expect("docs/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
}

/// Every `[label](target)` in a Markdown text.
fn links(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find("](") else { break };
        let label = &rest[..close];
        let after = &rest[close + 2..];
        let Some(end) = after.find(')') else { break };
        if !label.contains('[') {
            out.push((label.to_string(), after[..end].to_string()));
        }
        rest = &after[end..];
    }
    out
}

/// What a code label asks the file to contain (`fn run`, `enum Drain`, a
/// log message, a match arm), verbatim. A label that names a file or a
/// folder (`src/buffer.rs`, `worker/`) is the link itself, which
/// `every_relative_link_points_at_a_file` checks.
fn wanted(label: &str) -> Option<&str> {
    let code = label.strip_prefix('`')?.strip_suffix('`')?;
    let names_a_file = code.ends_with(".rs") || code.ends_with('/');
    (!code.is_empty() && !names_a_file).then_some(code)
}

#[test]
fn every_code_link_lands_in_a_file_that_has_what_its_label_names() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for doc in docs() {
        let text = fs::read_to_string(&doc).unwrap();
        for (label, target) in links(&text) {
            let file = target.split('#').next().unwrap();
            if target.starts_with("http") || !file.ends_with(".rs") {
                continue;
            }
            let Some(name) = wanted(&label) else {
                continue;
            };
            let path = doc.parent().unwrap().join(file);
            let source = fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{}: no file {file}", doc.display()));
            checked += 1;
            if !source.contains(name) {
                wrong.push(format!(
                    "{}: `{name}` is not in {file}",
                    doc.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "stale links:\n{}", wrong.join("\n"));
    assert!(checked >= 10, "only {checked} code links found");
}

#[test]
fn no_link_is_tied_to_a_line_number() {
    for doc in docs() {
        let text = fs::read_to_string(&doc).unwrap();
        for (label, target) in links(&text) {
            let numbered = target
                .split_once("#L")
                .is_some_and(|(_, n)| n.starts_with(|c: char| c.is_ascii_digit()));
            assert!(
                !numbered,
                "{}: [{label}]({target}) points at a line number; link the file and \
                 let the label name what to find",
                doc.display()
            );
        }
    }
}

#[test]
fn every_relative_link_points_at_a_file() {
    for doc in docs() {
        let text = fs::read_to_string(&doc).unwrap();
        for (_, target) in links(&text) {
            if target.starts_with("http") || target.starts_with('#') || target.contains(' ') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            let path = doc.parent().unwrap().join(file);
            assert!(path.exists(), "{}: link to missing {target}", doc.display());
        }
    }
}
