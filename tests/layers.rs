//! The module layers of `src/` (ARCHITECTURE.md, "Layers"): every path a
//! module names (`crate::X`, `use crate::{X, ..}`) must point to a lower
//! layer, the API must reach the rest only through the service, and the
//! two store backends never name each other. Test code (`#[cfg(test)]`
//! items and files) is left out: a test may build whatever it needs.
//! Reads the source only; needs no Docker.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and its layer: a module may name only
/// modules of a lower layer. A module missing here fails the check.
const LAYERS: &[(&str, u8)] = &[
    ("serve", 10),
    ("cli", 9),
    ("api", 8),
    ("service", 7),
    ("scheduler", 6),
    ("store", 5),
    ("runtime", 5),
    ("registry", 5),
    ("logging", 4),
    ("metrics", 4),
    ("activity", 3),
    ("failpoint", 2),
    ("config", 1),
    ("model", 0),
];

/// What `api` may name besides the service: plain data and the
/// process-wide hooks. The store, the scheduler and the runtime are
/// reached through `Service` only.
const API_MAY_NAME: &[&str] = &[
    "service", "model", "config", "metrics", "activity", "logging",
];

#[test]
fn modules_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = rust_files(&src);
    let test_only = test_only_files(&files);
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let Some(from) = top_module(rel) else {
            continue;
        };
        if test_only.contains(file) {
            continue;
        }
        let Some(&from_layer) = layer.get(from.as_str()) else {
            problems.push(format!(
                "src/{}: module {from} has no layer in tests/layers.rs",
                rel.display()
            ));
            continue;
        };
        let code = strip_test_items(&blank_comments_and_strings(&read(file)));
        for (line, to) in crate_refs(&code) {
            if to == from {
                continue;
            }
            let at = format!("src/{}:{line}", rel.display());
            let Some(&to_layer) = layer.get(to.as_str()) else {
                problems.push(format!("{at}: names crate::{to}, which has no layer"));
                continue;
            };
            edges.entry(from.clone()).or_default().insert(to.clone());
            if to_layer >= from_layer {
                problems.push(format!(
                    "{at}: {from} (layer {from_layer}) names crate::{to} (layer {to_layer}): imports must point down"
                ));
            }
            if from == "api" && !API_MAY_NAME.contains(&to.as_str()) {
                problems.push(format!(
                    "{at}: api names crate::{to}: the API reaches it through the service"
                ));
            }
        }
        let backend = rel.components().nth(1).and_then(|c| c.as_os_str().to_str());
        if from == "store" {
            for (own, other) in [("embedded", "nats"), ("nats", "embedded")] {
                if backend == Some(own) && names_backend(&code, other) {
                    problems.push(format!(
                        "src/{}: the {own} store names the {other} store",
                        rel.display()
                    ));
                }
            }
        }
    }
    if let Some(cycle) = find_cycle(&edges) {
        problems.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
}

/// The check itself works: an upward import, a grouped import and a
/// path inside a function are seen; comments, strings, macro-relative
/// paths (`$crate::`) and test modules are not.
#[test]
fn the_scanner_sees_what_it_must() {
    let code = r##"
        use crate::model::Call; // crate::api in a comment
        use crate::{store::Store, runtime::{self, Runtime}};
        fn f() { let s = "crate::cli"; crate::service::go(); $crate::serve::x(); }
        /* crate::cli::x */
        #[cfg(test)]
        mod tests { use crate::bench; }
        fn g() -> &'static str { 'x'; "" }
        fn h() { crate::metrics::hit(); }
    "##;
    let code = strip_test_items(&blank_comments_and_strings(code));
    let names: Vec<String> = crate_refs(&code).into_iter().map(|(_, m)| m).collect();
    assert_eq!(names, ["model", "store", "runtime", "service", "metrics"]);
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `x.rs` or `x/...` → `x`; the crate roots are nobody's layer.
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// Files declared `#[cfg(test)] mod NAME;` (and everything under them).
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut roots = Vec::new();
    for file in files {
        let code = blank_comments_and_strings(&read(file));
        let dir = match file.file_name().and_then(|n| n.to_str()) {
            Some("mod.rs" | "lib.rs" | "main.rs") => file.parent().expect("parent").to_path_buf(),
            _ => file.with_extension(""),
        };
        let mut rest = code.as_str();
        while let Some(at) = rest.find("#[cfg(test)]") {
            rest = &rest[at + "#[cfg(test)]".len()..];
            let item = rest.trim_start();
            let item = item.strip_prefix("pub ").unwrap_or(item);
            if let Some(decl) = item.strip_prefix("mod ") {
                let name: String = decl
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if decl[name.len()..].trim_start().starts_with(';') {
                    roots.push(dir.join(&name));
                }
            }
        }
    }
    files
        .iter()
        .filter(|f| {
            roots
                .iter()
                .any(|r| f.starts_with(r) || **f == r.with_extension("rs"))
        })
        .cloned()
        .collect()
}

/// `text` with comments, string and char literals replaced by spaces (line
/// breaks kept, so line numbers stay true).
fn blank_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (!ident_before(&chars, i) || (chars[i - 1] == 'b' && !ident_before(&chars, i - 1)))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let body_start = j + 1;
            let rest: String = chars[body_start..].iter().collect();
            let end = rest.find(&close).map_or(chars.len(), |e| {
                body_start + rest[..e].chars().count() + close.chars().count()
            });
            for &ch in &chars[i..end] {
                out.push(blank(ch));
            }
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), else a lifetime.
            let lit_end = if next == Some('\\') {
                chars[i + 2..]
                    .iter()
                    .position(|&ch| ch == '\'')
                    .map(|p| i + 2 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match lit_end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// `code` (blanked) without its `#[cfg(test)]` items: the attribute and the
/// item after it, up to its `;` or its matching `}`.
fn strip_test_items(code: &str) -> String {
    let mut out: Vec<char> = code.chars().collect();
    let attr: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + attr.len() <= out.len() {
        if out[i..i + attr.len()] != attr[..] {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + attr.len();
        let mut depth = 0usize;
        while j < out.len() {
            match out[j] {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = j.min(out.len() - 1) + 1;
        for ch in &mut out[start..end] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = j + 1;
    }
    out.into_iter().collect()
}

/// Every `crate::X` and `crate::{X, ..}` (not `$crate::`, which a macro
/// resolves where it is used), with its line.
fn crate_refs(code: &str) -> Vec<(usize, String)> {
    let chars: Vec<char> = code.chars().collect();
    let pat: Vec<char> = "crate::".chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\n' {
            line += 1;
        }
        let starts = chars[i..].starts_with(&pat)
            && (i == 0
                || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == '$'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i + pat.len();
        if chars.get(j) == Some(&'{') {
            // The first segment of every path at the group's top level.
            let mut depth = 0;
            let mut at_segment_start = true;
            while j < chars.len() {
                let ch = chars[j];
                match ch {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            at_segment_start = true;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_segment_start = true,
                    c if depth == 1 && at_segment_start && (c.is_alphabetic() || c == '_') => {
                        let name: String = chars[j..]
                            .iter()
                            .take_while(|c| c.is_alphanumeric() || **c == '_')
                            .collect();
                        j += name.len() - 1;
                        at_segment_start = false;
                        if name != "self" {
                            out.push((line, name));
                        }
                    }
                    '\n' => line += 1,
                    _ => {}
                }
                j += 1;
            }
            i = j;
            continue;
        }
        let name: String = chars[j..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || **c == '_')
            .collect();
        j += name.len();
        // `crate::name!` is a macro exported at the crate root, not a module.
        if !name.is_empty() && chars.get(j) != Some(&'!') {
            out.push((line, name));
        }
        i = j;
    }
    out
}

/// Whether a file of one store backend names the other backend.
fn names_backend(code: &str, other: &str) -> bool {
    [
        format!("crate::store::{other}"),
        format!("super::{other}"),
        format!("super::super::{other}"),
    ]
    .iter()
    .any(|p| code.contains(p.as_str()))
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == node) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}
