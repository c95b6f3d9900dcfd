//! Tidy checks over kiln's sources, in the manner of rust-analyzer's: they read
//! the code as text and fail with what to fix.
//!
//! `module_imports_form_layers`: within each library crate, the modules' `crate::`
//! imports form layers, with no cycle. A module is a file of `src/` or a folder
//! (`learner/` is one module); a name `lib.rs` re-exports counts as its module's
//! (`crate::TrainingCoordinator` is `coordinator`), and test code does not count.
//! Inside a folder its files form layers too (`super::` imports; a name of
//! `mod.rs` itself counts as `mod`, which holds every file of the folder).
//!
//! `each_package_has_one_integration_test_binary`: every test binary links and
//! monomorphises Burn's training code again (seventeen of them took half an hour
//! to build cold), so a package's integration tests are modules of one binary,
//! `tests/it/main.rs`.
//!
//! A unit-test module of xtask (no test binary of its own).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace_root() -> PathBuf {
    // Read at run time first: cargo may reuse a binary built in another checkout.
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .parent()
    .expect("xtask lives in the workspace root")
    .to_path_buf()
}

/// The source files below `dir`, with their module (first path component below
/// `src/`, without `.rs`).
fn modules(src: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()) {
            if entry.is_dir() {
                stack.push(entry);
            } else if entry.extension().is_some_and(|e| e == "rs") {
                let rel = entry.strip_prefix(src).unwrap();
                let first = rel.components().next().unwrap().as_os_str();
                let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
                found.push((module, entry));
            }
        }
    }
    found
}

/// `text` without comments and without its test module (from a `#[cfg(test)]` or
/// `#[cfg(all(test, ...))]` on a `mod` to the end of the file).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let test_cfg = trimmed.starts_with("#[cfg(test)]") || trimmed.starts_with("#[cfg(all(test");
        let is_mod = |line: &str| {
            let line = line.trim_start();
            let line = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            line.starts_with("mod ")
        };
        if test_cfg && lines.peek().is_some_and(|next| is_mod(next)) {
            break;
        }
        let without_comment = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// Where the names a module's code can reach stand: the modules of its level
/// (`known`), and the names its parent (`lib.rs` or `mod.rs`) re-exports from them.
struct Names {
    known: BTreeSet<String>,
    /// Re-exported name -> the module it comes from.
    aliases: BTreeMap<String, String>,
    /// The module an unknown name counts as (a folder's `mod`), if any.
    fallback: Option<String>,
}

impl Names {
    fn resolve(&self, name: &str) -> Option<String> {
        if self.known.contains(name) {
            return Some(name.to_owned());
        }
        self.aliases
            .get(name)
            .cloned()
            .or_else(|| self.fallback.clone().filter(|_| !name.is_empty()))
    }
}

/// The names `code` (a `lib.rs` or `mod.rs`) re-exports from the modules of
/// `known` (`pub use run::Failure;`, `pub(crate) use group::{A, B as C};`).
fn reexports(code: &str, known: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for statement in code.split(';') {
        let Some(at) = statement
            .find("pub use ")
            .map(|i| i + "pub use ".len())
            .or_else(|| {
                statement
                    .find("pub(crate) use ")
                    .map(|i| i + "pub(crate) use ".len())
            })
        else {
            continue;
        };
        let Some((module, names)) = statement[at..].trim().split_once("::") else {
            continue;
        };
        if !known.contains(module) {
            continue;
        }
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let last = name.rsplit("::").next().unwrap_or("");
            let shown = last.rsplit(" as ").next().unwrap_or("").trim();
            if !shown.is_empty() {
                found.insert(shown.to_owned(), module.to_owned());
            }
        }
    }
    found
}

/// The modules that `code` names through `prefix` (`crate::` or `super::`): paths
/// (`crate::run::Failure`) and grouped imports (`use crate::{run::X, group}`),
/// resolved by `names`.
fn imports(code: &str, prefix: &str, names: &Names) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let word_before = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
        rest = &rest[i + prefix.len()..];
        if word_before {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group, up to its closing brace.
            let mut depth = 0usize;
            let mut name = String::new();
            let mut at_start = true;
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        // The group's last name, ended by its brace.
                        if at_start {
                            found.extend(names.resolve(&name));
                        }
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        at_start = true;
                        name.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if ch.is_alphanumeric() || ch == '_' {
                        name.push(ch);
                    } else if !name.is_empty() {
                        found.extend(names.resolve(&name));
                        at_start = false;
                    }
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.extend(names.resolve(&name));
        }
    }
    found
}

/// The import graph of the library crate whose sources are in `src`.
fn graph(src: &Path) -> Graph {
    let files = modules(src);
    let known: BTreeSet<String> = files
        .iter()
        .map(|(m, _)| m.clone())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let names = Names {
        aliases: reexports(&code_of(&lib), &known),
        known,
        fallback: None,
    };
    let mut graph = Graph::new();
    for (module, path) in files {
        if !names.known.contains(&module) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(
            imports(&code, "crate::", &names)
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

/// The import graph of the files of the folder module `dir` (one level): `mod`
/// (its `mod.rs`) holds every file, and each file's `super::` imports name a
/// sibling, or `mod` itself.
fn folder_graph(dir: &Path) -> Graph {
    let files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, path)
        })
        .collect();
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let parent = std::fs::read_to_string(dir.join("mod.rs")).unwrap_or_default();
    let names = Names {
        aliases: reexports(&code_of(&parent), &known),
        known,
        fallback: Some("mod".to_owned()),
    };
    let mut graph = Graph::new();
    for (module, path) in files {
        let edges = graph.entry(module.clone()).or_default();
        if module == "mod" {
            edges.extend(names.known.iter().filter(|m| *m != "mod").cloned());
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        edges.extend(
            imports(&code, "super::", &names)
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

/// The cycles of `graph`, each said as its modules and their edges inside it.
fn said_cycles(graph: &Graph, place: &Path) -> Vec<String> {
    cycles(graph)
        .into_iter()
        .map(|cycle| {
            let edges: Vec<String> = cycle
                .iter()
                .map(|m| {
                    let inside: Vec<&str> = graph[m]
                        .iter()
                        .filter(|t| cycle.contains(t))
                        .map(String::as_str)
                        .collect();
                    format!("{m} -> {}", inside.join(", "))
                })
                .collect();
            format!(
                "{}: modules {} import each other in a cycle:\n  {}",
                place.display(),
                cycle.join(", "),
                edges.join("\n  ")
            )
        })
        .collect()
}

/// The cycles of `graph`: its strongly connected components of more than one
/// module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found
}

#[test]
fn module_imports_form_layers() {
    let crates = workspace_root().join("crates");
    let mut problems = Vec::new();
    let (mut checked, mut folders) = (0, 0);
    for entry in std::fs::read_dir(&crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.join("lib.rs").exists() {
            continue;
        }
        let graph = graph(&src);
        checked += graph.len();
        problems.extend(said_cycles(&graph, &src));
        for dir in std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()) {
            if dir.join("mod.rs").exists() {
                folders += 1;
                problems.extend(said_cycles(&folder_graph(&dir), &dir));
            }
        }
    }
    assert!(
        checked > 20 && folders > 0,
        "only {checked} modules and {folders} folders read: is the layout still crates/*/src?"
    );
    assert!(
        problems.is_empty(),
        "move what both sides need into a lower module:\n{}",
        problems.join("\n")
    );
}

/// The integration-test binaries of the package in `dir`: its `[[test]]` targets
/// and what cargo finds by itself (`tests/*.rs`, `tests/*/main.rs`).
fn test_binaries(dir: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    let mut found: Vec<String> = manifest
        .lines()
        .filter(|line| line.trim() == "[[test]]")
        .map(|_| "[[test]] in Cargo.toml".to_owned())
        .collect();
    if !manifest.contains("autotests = false") {
        let entries = std::fs::read_dir(dir.join("tests")).into_iter().flatten();
        for path in entries.map(|entry| entry.unwrap().path()) {
            let is_binary = match path.is_dir() {
                true => path.join("main.rs").exists(),
                false => path.extension().is_some_and(|e| e == "rs"),
            };
            if is_binary {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn each_package_has_one_integration_test_binary() {
    let root = workspace_root();
    let mut packages: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    packages.extend(["tests", "examples", "xtask"].map(|dir| root.join(dir)));
    let mut problems = Vec::new();
    let mut with_tests = 0;
    for package in packages.iter().filter(|p| p.join("Cargo.toml").exists()) {
        let binaries = test_binaries(package);
        with_tests += usize::from(!binaries.is_empty());
        if binaries.len() > 1 {
            problems.push(format!("{}: {}", package.display(), binaries.join(", ")));
        }
    }
    assert!(
        with_tests >= 4,
        "only {with_tests} packages with integration tests found: is the layout still crates/*/tests?"
    );
    assert!(
        problems.is_empty(),
        "more than one integration-test binary; make each a module of tests/it/main.rs:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_reader_finds_imports_and_cycles() {
    let known: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
    let lib = code_of("mod a;\npub use e::{Shown, Other as Renamed};\npub(crate) use d::Hidden;\n");
    let names = Names {
        aliases: reexports(&lib, &known),
        known,
        fallback: None,
    };
    let code = code_of(
        "use crate::a::X;\n// crate::d::in_a_comment\nfn f() { crate::b::g(); }\n\
         use crate::{c::{Y, Z}, Error, Renamed};\nuse kiln_crate::d::Q;\n\
         #[cfg(test)]\npub(crate) mod tests { use crate::d; }\n",
    );
    assert_eq!(
        imports(&code, "crate::", &names),
        ["a", "b", "c", "e"].map(String::from).into()
    );
    assert_eq!(
        imports("use crate::Hidden;", "crate::", &names),
        ["d"].map(String::from).into()
    );
    let in_folder = Names {
        fallback: Some("mod".to_owned()),
        ..names
    };
    assert_eq!(
        imports(
            "use super::Shared;\nuse super::b::Y;",
            "super::",
            &in_folder
        ),
        ["b", "mod"].map(String::from).into()
    );
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_string(), to.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
}
