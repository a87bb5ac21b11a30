//! The library's shape, checked on its source (issue 21): no import cycle between `src/`
//! modules (a module's `src/<module>/` files counted as its own), of any length. A module depends on another when its text names `crate::<other>`
//! (a `use`, a path in code, a doc link), `use crate::{<other>, ...}` included. Pure text: no
//! engine, nothing built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `src/*.rs` module (not `lib.rs`, not the binaries) and the modules it names.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let (Some(stem), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        if stem == "lib" {
            continue;
        }
        let mut names = named_modules(&std::fs::read_to_string(&path).unwrap());
        // A module's submodules (`src/<module>/*.rs`) are part of it.
        if let Ok(children) = std::fs::read_dir(src.join(stem)) {
            for child in children {
                let child = child.unwrap().path();
                names.extend(named_modules(&std::fs::read_to_string(&child).unwrap()));
            }
        }
        modules.insert(stem.to_owned(), names);
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    for (name, deps) in modules.iter_mut() {
        deps.retain(|dep| dep != name && names.contains(dep));
    }
    assert!(
        modules.len() >= 20,
        "found only {} modules in {}",
        modules.len(),
        src.display()
    );
    modules
}

/// The first path segments after each `crate::` in `text`, groups (`crate::{a, b::c}`) too.
fn named_modules(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, up to its own closing brace (a nested group's
            // names follow a `::{` and are not modules of ours).
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// A cycle in `graph`, as the modules along it, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = dependencies();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle: {} (move the shared part into a module both can depend on)",
            cycle.join(" -> ")
        );
    }
}

/// The checker finds what it is meant to find: a three-module cycle, grouped imports, nested
/// groups, doc links.
#[test]
fn the_cycle_checker_sees_cycles_and_groups() {
    let deps = named_modules(
        "use crate::{a, b::{X, Y}, c::Z};\n/// see [`crate::d::f`]\nfn f() { crate::e::g() }",
    );
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
    assert_eq!(deps, want);
    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph.entry(to.to_string()).or_default();
            graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
        }
        graph
    };
    let cycle = find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("a", "d")]));
    assert_eq!(cycle.map(|c| c.len()), Some(4), "a -> b -> c -> a");
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("a", "c"), ("b", "c")])),
        None
    );
}
