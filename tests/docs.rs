//! The docs point into the code by line: [`fn on_readable`](../src/...#L551).
//! These tests keep those pointers true as the code moves, so a reader who
//! follows one lands on the line the text talks about.

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

#[test]
fn every_line_link_lands_on_what_its_label_names() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for doc in docs() {
        let text = fs::read_to_string(&doc).unwrap();
        for (label, target) in links(&text) {
            let Some((file, line)) = target.split_once("#L") else {
                continue;
            };
            if file.starts_with("http") {
                continue;
            }
            let path = doc.parent().unwrap().join(file);
            let source = fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{}: no file {file}", doc.display()));
            let n: usize = line.parse().expect("line number");
            let code = source.lines().nth(n - 1).unwrap_or("");
            let name = label.trim_matches('`');
            checked += 1;
            if !code.contains(name) {
                let actual = source
                    .lines()
                    .position(|l| l.contains(name))
                    .map_or("nowhere".to_string(), |i| format!("line {}", i + 1));
                wrong.push(format!(
                    "{}: `{name}` -> {file}#L{n} is `{}`; it is at {actual}",
                    doc.file_name().unwrap().to_string_lossy(),
                    code.trim()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "stale links:\n{}", wrong.join("\n"));
    assert!(checked >= 10, "only {checked} line links found");
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
