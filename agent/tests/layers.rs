//! The house's layering, checked: every top-level module of the `lichen` crate sits on a floor, a
//! module imports only from its own floor or below, and no two modules need each other (directly
//! or around a circle), nor do any two files. It reads the sources as text, the way a reviewer
//! would: every `crate::x` path outside comments counts as an import of `x`, and for files every
//! `crate::`, `super::` and `self::` path, resolved to the file that defines what it names. Run it
//! alone with `cargo test -p lichen --test layers`; it prints both import graphs with
//! `-- --nocapture`.
//!
//! The floors are the README's Layout section. Moving a module between floors, or adding one, is a
//! change to that picture: make it here and there together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, bottom up.
const FLOORS: &[(&str, &[&str])] = &[
    (
        "ground",
        &[
            "layout",
            "store",
            "config",
            "quantity",
            "names",
            "topic",
            "broker",
            "token",
            "host",
            "board",
            "logfmt",
            "metrics",
            "retry",
            "notify",
            "logging",
            "api_error",
            "heap",
            "version",
        ],
    ),
    (
        "domain",
        &["runtime", "modules", "pod", "cluster", "node", "telemetry", "bootstrap", "static_pods", "upgrade"],
    ),
    ("edge", &["kubelet", "control", "metrics_server"]),
    ("top", &["app", "cli", "main"]),
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|(_, mods)| mods.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a file names through `crate::` (or `lichen::` in the binary), comments left out.
fn imports(text: &str, crate_name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            // A `//` inside a string literal is rare in these sources; a URL in a string would
            // only hide the rest of that line.
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find(crate_name) {
            let before = rest[..i].chars().last();
            let after = &rest[i + crate_name.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        if let Some(i) = code.find(&format!("{crate_name}{{")) {
            let group = &code[i + crate_name.len() + 1..];
            for part in group.split([',', '}']) {
                let name: String =
                    part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        // The top-level module the file belongs to: `pod/worker.rs` -> `pod`, `app.rs` -> `app`.
        let module = module_path(&src, &file).swap_remove(0);
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let prefix = if module == "main" { "lichen::" } else { "crate::" };
        let deps = imports(&text, prefix);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    graph
}

#[test]
fn every_module_is_on_a_floor_and_imports_only_downward() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let Some(floor) = floor_of(module) else {
            wrong.push(format!("{module} is on no floor: add it to FLOORS and the README's Layout"));
            continue;
        };
        for dep in deps {
            match floor_of(dep) {
                None if !graph.contains_key(dep) => {}
                None => wrong.push(format!("{module} imports {dep}, which is on no floor")),
                Some(f) if f > floor => wrong.push(format!(
                    "{module} ({}) imports {dep} ({}): imports go down, never up",
                    FLOORS[floor].0, FLOORS[f].0
                )),
                Some(_) => {}
            }
        }
    }
    for (module, deps) in &graph {
        println!("{module:>16} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every circle a depth-first search meets in `graph` (at least one whenever there is one), each
/// as its nodes from where it closes back to itself. Edges to nodes that are not keys are ignored.
fn circles<K: Ord + Clone>(graph: &BTreeMap<K, BTreeSet<K>>) -> Vec<Vec<K>> {
    fn visit<K: Ord + Clone>(
        node: &K,
        graph: &BTreeMap<K, BTreeSet<K>>,
        path: &mut Vec<K>,
        done: &mut BTreeSet<K>,
        circles: &mut Vec<Vec<K>>,
    ) {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut circle = path[i..].to_vec();
            circle.push(node.clone());
            circles.push(circle);
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.clone());
        for dep in graph.get(node).into_iter().flatten() {
            if graph.contains_key(dep) {
                visit(dep, graph, path, done, circles);
            }
        }
        path.pop();
        done.insert(node.clone());
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn no_two_modules_need_each_other() {
    let circles: Vec<String> = circles(&graph()).iter().map(|c| c.join(" -> ")).collect();
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_reader_sees_imports_as_written() {
    let text = "use crate::{pod::board::StatusBoard, store};\nuse crate::config::AgentConfig;\n\
                // crate::app is only mentioned\nlet x = crate::metrics::global(); // crate::cli\n";
    let found: Vec<String> = imports(text, "crate::").into_iter().collect();
    assert_eq!(found, ["config", "metrics", "pod", "store"]);
}

/// A file's module path under `src`: `telemetry/gateway/mod.rs` -> `[telemetry, gateway]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut path: Vec<String> =
        rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if path.last().is_some_and(|l| l == "mod") {
        path.pop();
    }
    path
}

/// The code of a source file with comments and the insides of string and char literals taken out
/// (line breaks kept), so that braces and paths are the code's own.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && !chars[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"…", r#"…"#.
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            while i < chars.len() {
                if chars[i] == '"'
                    && chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes
                {
                    i += 1 + hashes;
                    break;
                }
                if chars[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\n' {
                    out.push('\n');
                }
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{7b}' (the escaped character itself may be
            // a quote).
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The module paths a file's code names through `crate::`, `super::` and `self::`, resolved from
/// `module` (the file's own path; inline modules such as `mod linux { … }` are followed, so a
/// `super` inside one means the file). What unit tests import is left out: test code may reach
/// anywhere.
fn file_imports(code: &str, module: &[String]) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    // The inline modules around the current position, each with the brace depth it opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let b = code.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let at_word = i == 0 || !is_ident(b[i - 1]);
        let rest = &b[i..];
        if b[i] == b'{' {
            depth += 1;
        } else if b[i] == b'}' {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
        } else if at_word && rest.starts_with(b"mod ") {
            // `mod name {`: an inline module opens at the next brace.
            let after = rest[4..].trim_ascii_start();
            let len = after.iter().take_while(|c| is_ident(**c)).count();
            if len > 0 && after[len..].trim_ascii_start().starts_with(b"{") {
                inline.push((String::from_utf8_lossy(&after[..len]).into_owned(), depth));
            }
        } else if at_word && [&b"crate::"[..], b"super::", b"self::"].iter().any(|p| rest.starts_with(p)) {
            let mut here: Vec<String> = module.to_vec();
            here.extend(inline.iter().map(|(n, _)| n.clone()));
            let (len, paths) = path_at(rest, &here);
            if !inline.iter().any(|(n, _)| n == "tests") {
                found.extend(paths);
            }
            i += len.max(1);
            continue;
        }
        i += 1;
    }
    found
}

/// The path (or `{…}` group of paths) at the start of `b`, resolved from `here`; how many bytes it
/// took.
fn path_at(b: &[u8], here: &[String]) -> (usize, Vec<Vec<String>>) {
    let mut i = 0;
    let mut base: Vec<String> = Vec::new();
    let mut first = true;
    loop {
        let len = b[i..].iter().take_while(|c| is_ident(**c)).count();
        if len == 0 {
            break;
        }
        let seg = String::from_utf8_lossy(&b[i..i + len]).into_owned();
        match (first, seg.as_str()) {
            (true, "crate") => base.clear(),
            (true, "self") => base = here.to_vec(),
            (true, "super") => {
                base = here.to_vec();
                base.pop();
            }
            (false, "super") if base.len() < here.len() => {
                base.pop();
            }
            _ => base.push(seg),
        }
        first = false;
        i += len;
        if b[i..].starts_with(b"::") {
            i += 2;
        } else {
            return (i, vec![base]);
        }
    }
    if b.get(i) != Some(&b'{') {
        return (i, vec![base]);
    }
    // A group: each item's leading path, one level deep.
    let mut paths = Vec::new();
    let mut level = 0;
    let mut item = String::new();
    for (k, &c) in b[i..].iter().enumerate() {
        match c {
            b'{' => level += 1,
            b'}' => level -= 1,
            _ => {}
        }
        if level == 1 && c != b'{' && c != b',' {
            item.push(char::from(c));
        }
        if (level == 1 && c == b',') || level == 0 {
            let mut p = base.clone();
            p.extend(
                item.trim()
                    .split("::")
                    .map(|s| s.bytes().take_while(|c| is_ident(*c)).map(char::from).collect::<String>())
                    .take_while(|s| !s.is_empty()),
            );
            paths.push(p);
            item.clear();
        }
        if level == 0 {
            return (i + k + 1, paths);
        }
    }
    (b.len(), paths)
}

/// Each source file's imports of other files, as module paths: an edge from a file to the file
/// that defines what it names (the longest module path that prefixes the name). A module's
/// `mod.rs` naming its own descendants is not an edge: it declares them and chooses what to
/// re-export, and a child reaching up (`super::X`) is the direction that counts.
fn file_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_path(&src, f), f.clone()))
        .filter(|(m, _)| !m.is_empty() && !matches!(m[..], [ref s] if s == "lib" || s == "main"))
        .filter(|(m, _)| m.last().is_some_and(|l| l != "tests"))
        .collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_only(&std::fs::read_to_string(file).expect("read a source file"));
        let mut deps = BTreeSet::new();
        for name in file_imports(&code, module) {
            let Some(target) =
                (0..=name.len()).rev().map(|n| name[..n].to_vec()).find(|p| modules.contains_key(p))
            else {
                continue;
            };
            if target != *module && !target.starts_with(module) {
                deps.insert(target);
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

#[test]
fn no_two_files_need_each_other() {
    let graph = file_graph();
    let name = |m: &Vec<String>| m.join("::");
    for (module, deps) in &graph {
        println!("{:>28} -> {}", name(module), deps.iter().map(name).collect::<Vec<_>>().join(", "));
    }
    let circles: Vec<String> =
        circles(&graph).iter().map(|c| c.iter().map(name).collect::<Vec<_>>().join(" -> ")).collect();
    assert!(circles.is_empty(), "files that need each other, around a circle:\n{}", circles.join("\n"));
}

#[test]
fn the_file_reader_resolves_paths_from_where_they_are_written() {
    let text = "use super::{LogError, files::Pos};\nuse crate::store::{self, StateStore};\n\
                let s = \"crate::app\"; // crate::cli\n\
                mod linux {\n    let q = '\\''; let b = b'}';\n    use super::Page;\n}\n\
                #[cfg(test)]\nmod tests {\n    use crate::pod::x;\n}\nuse self::inner::Y;\n";
    let module: Vec<String> = ["logfmt", "reader"].map(String::from).to_vec();
    let found: Vec<String> = file_imports(&code_only(text), &module).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "logfmt::LogError",
            "logfmt::files::Pos",
            "logfmt::reader::Page",
            "logfmt::reader::inner::Y",
            "store::StateStore",
            "store::self"
        ]
    );
}
