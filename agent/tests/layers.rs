//! The house's layering, checked: every top-level module of the `lichen` crate sits on a floor, a
//! module imports only from its own floor or below, and no two modules need each other (directly
//! or around a circle). It reads the sources as text, the way a reviewer would: every `crate::x`
//! path outside comments counts as an import of `x`. Run it alone with
//! `cargo test -p lichen --test layers`; it prints the import graph with `-- --nocapture`.
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

/// The top-level module a source file belongs to: `pod/worker.rs` -> `pod`, `app.rs` -> `app`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component").as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
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
        let module = module_of(&src, &file);
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

#[test]
fn no_two_modules_need_each_other() {
    let graph = graph();
    // Depth-first search for a back edge; report each circle found.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut circle = path[i..].to_vec();
            circle.push(node.to_owned());
            circles.push(circle.join(" -> "));
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if graph.contains_key(dep) {
                visit(dep, graph, path, done, circles);
            }
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let (mut done, mut circles) = (BTreeSet::new(), Vec::new());
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_reader_sees_imports_as_written() {
    let text = "use crate::{pod::board::StatusBoard, store};\nuse crate::config::AgentConfig;\n\
                // crate::app is only mentioned\nlet x = crate::metrics::global(); // crate::cli\n";
    let found: Vec<String> = imports(text, "crate::").into_iter().collect();
    assert_eq!(found, ["config", "metrics", "pod", "store"]);
}
