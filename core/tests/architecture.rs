//! The module graph of the three crates (core, Worker, sandbox): no cycles, no forbidden edge, and the core's layers (ARCHITECTURE.md, "Module graph").
//!
//! An edge `a -> b` is any `crate::b…` path in module `a` (a `use` line, a grouped
//! `use crate::{b, c}`, or a path in code; `super::b` at a module's top level counts too).
//! Comments, string literals and `#[cfg(test)] mod … { … }` blocks are not read: tests may
//! import what they like. A module is a top-level `mod` of the crate root (`#[path]` is
//! followed, so `durable_objects/*.rs` are modules of the Worker crate); out-of-line
//! submodules count as part of their top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The core's layers, lowest first: a module may import its own layer or lower ones only.
const CORE_LAYERS: &[&[&str]] = &[
    &["error", "ids"],
    &[
        "queue",
        "gating",
        "pool",
        "repository",
        "snapshot",
        "background",
        "budget",
        "signing",
        "token",
        "github",
        "signin",
        "quota",
        "egress",
        "check",
        "provider",
        "tools",
    ],
    &["events", "pr_review", "slack"],
    &["sandbox", "slack_status"],
    &["session"],
    &["hosted", "store"],
    &["wire"],
    &["api"],
];

/// Modules nothing else in their crate may import, with the reason.
const NOT_IMPORTED: &[(&str, &str, &str)] = &[
    (
        "worker",
        "routes",
        "routes imports the area routers, never the reverse, and objects never import it",
    ),
    (
        "sandbox",
        "provider",
        "the provider's router is the top of the sandbox crate: shared pieces live in `state`",
    ),
];

/// Area routers: only `routes` may import them (objects and helpers sit below them).
const WORKER_AREAS: &[&str] = &["background", "repositories", "sandbox_api"];

/// Names a crate's code must never use: (crate, name, reason).
const FOREIGN: &[(&str, &str, &str)] = &[
    (
        "core",
        "nightshift_worker",
        "the core has no I/O: it never names the Worker",
    ),
    (
        "core",
        "worker",
        "the core has no I/O: it never names the `worker` runtime",
    ),
    (
        "core",
        "nightshift_sandbox",
        "the core never names the sandbox crate",
    ),
    (
        "sandbox",
        "nightshift_worker",
        "the sandbox crate never names the Worker",
    ),
    (
        "sandbox",
        "worker",
        "the sandbox crate never names the `worker` runtime",
    ),
];

struct Crate {
    name: &'static str,
    /// Module name -> the files it is made of.
    modules: BTreeMap<String, Vec<PathBuf>>,
    /// Module name -> the modules it imports.
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Module name -> every other crate or root path it names (`worker`, `nightshift_core`, …).
    names: BTreeMap<String, BTreeSet<String>>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Replaces comments, string and char literals with spaces (newlines kept).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(c[i - 1]))
        {
            // Raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(c[i..j.min(c.len())].iter().map(|&ch| blank(ch)));
            i = j;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            out.extend(c[i..(j + 1).min(c.len())].iter().map(|&ch| blank(ch)));
            i = j + 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{1F600}'), else a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 2..c.len()).find(|&j| c[j] == '\'')
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.extend(c[i..=e].iter().map(|&ch| blank(ch)));
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Blanks out every `#[cfg(test)] mod name { … }` block.
fn without_test_modules(code: &str) -> String {
    let mut out: Vec<char> = code.chars().collect();
    let text: String = out.iter().collect();
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]").map(|p| p + from) {
        from = at + 1;
        let rest = text[at + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub ").unwrap_or(rest).trim_start();
        let Some(after_mod) = rest.strip_prefix("mod ") else {
            continue;
        };
        let name_len = after_mod.chars().take_while(|&ch| is_ident(ch)).count();
        if !after_mod[name_len..].trim_start().starts_with('{') {
            continue;
        }
        // Char index of the opening brace, then its match.
        let start = text[..at].chars().count();
        let chars: Vec<char> = text.chars().collect();
        let Some(open) = (start..chars.len()).find(|&k| chars[k] == '{') else {
            continue;
        };
        let mut depth = 0;
        let mut end = chars.len() - 1;
        for (k, &ch) in chars.iter().enumerate().skip(open) {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
                _ => {}
            }
        }
        for ch in &mut out[start..=end] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    }
    out.into_iter().collect()
}

/// The first path segment after each `crate::` (or `super::`, when `super` is the crate
/// root), with `crate::{a, b::c}` giving `a` and `b`.
fn crate_paths(code: &str, super_is_root: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let chars: Vec<char> = code.chars().collect();
    let text: String = chars.iter().collect();
    let mut prefixes = vec!["crate::"];
    if super_is_root {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (byte, _) in text.match_indices(prefix) {
            let before = text[..byte].chars().next_back();
            if before.is_some_and(|b| is_ident(b) || b == ':') {
                continue;
            }
            let rest = text[byte + prefix.len()..].trim_start();
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0;
                let mut item = String::new();
                let mut items = Vec::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                        _ => {}
                    }
                    item.push(ch);
                }
                items.push(item);
                for it in items {
                    let it = it.trim_start_matches(',').trim();
                    let seg: String = it.chars().take_while(|&ch| is_ident(ch)).collect();
                    if !seg.is_empty() {
                        found.insert(seg);
                    }
                }
            } else {
                let seg: String = rest.chars().take_while(|&ch| is_ident(ch)).collect();
                if !seg.is_empty() {
                    found.insert(seg);
                }
            }
        }
    }
    found
}

/// Every identifier directly followed by `::` (the roots of paths: crates, modules, types).
fn path_roots(code: &str) -> BTreeSet<String> {
    let mut roots = BTreeSet::new();
    for (byte, _) in code.match_indices("::") {
        let head = &code[..byte];
        let name: String = head
            .chars()
            .rev()
            .take_while(|&ch| is_ident(ch))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let before = head[..head.len() - name.len()].chars().next_back();
        if !name.is_empty() && !before.is_some_and(|b| b == ':' || b == '$') {
            roots.insert(name);
        }
    }
    roots
}

/// `mod name;` declarations (with an optional `#[path = "…"]`) of a file, resolved.
fn declared_modules(file: &Path, code: &str, is_root: bool) -> Vec<(String, PathBuf)> {
    let dir = match (is_root, file.file_name().and_then(|n| n.to_str())) {
        (true, _) | (false, Some("mod.rs")) => file.parent().map(Path::to_path_buf),
        _ => file
            .parent()
            .map(|p| p.join(file.file_stem().unwrap_or_default())),
    }
    .unwrap_or_default();
    let src = std::fs::read_to_string(file).unwrap_or_default();
    let mut out = Vec::new();
    let mut path_attr: Option<String> = None;
    for (raw, line) in src.lines().zip(code.lines()) {
        let line = line.trim();
        if let Some(p) = raw.trim().strip_prefix("#[path = \"") {
            path_attr = p.strip_suffix("\"]").map(str::to_string);
            continue;
        }
        let decl = line
            .strip_prefix("pub(crate) mod ")
            .or_else(|| line.strip_prefix("pub mod "))
            .or_else(|| line.strip_prefix("mod "));
        if let Some(name) = decl.and_then(|d| d.strip_suffix(';')) {
            let path = match path_attr.take() {
                Some(p) => file.parent().unwrap_or(Path::new(".")).join(p),
                None if dir.join(format!("{name}.rs")).exists() => dir.join(format!("{name}.rs")),
                None => dir.join(name).join("mod.rs"),
            };
            out.push((name.trim().to_string(), path));
        } else if !line.is_empty() && !line.starts_with("#[") {
            path_attr = None;
        }
    }
    out
}

fn read_code(file: &Path) -> String {
    let src = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    without_test_modules(&code_only(&src))
}

fn load(name: &'static str, root_file: &str) -> Crate {
    let root = workspace().join(root_file);
    let mut modules = BTreeMap::new();
    for (m, path) in declared_modules(&root, &read_code(&root), true) {
        // The module's own file, then its out-of-line submodules (recursively).
        let mut files = vec![path];
        let mut k = 0;
        while k < files.len() {
            let code = read_code(&files[k]);
            files.extend(
                declared_modules(&files[k], &code, false)
                    .into_iter()
                    .map(|(_, p)| p),
            );
            k += 1;
        }
        modules.insert(m, files);
    }
    let mut edges = BTreeMap::new();
    let mut names = BTreeMap::new();
    for (m, files) in &modules {
        let mut to = BTreeSet::new();
        let mut roots = BTreeSet::new();
        for (i, f) in files.iter().enumerate() {
            let code = read_code(f);
            // `super::` is the crate root only in a top-level module's own file.
            to.extend(crate_paths(&code, i == 0));
            roots.extend(path_roots(&code));
        }
        to.retain(|t| t != m && modules.contains_key(t));
        edges.insert(m.clone(), to);
        names.insert(m.clone(), roots);
    }
    Crate {
        name,
        modules,
        edges,
        names,
    }
}

fn crates() -> Vec<Crate> {
    vec![
        load("core", "core/src/lib.rs"),
        load("worker", "src/lib.rs"),
        load("sandbox", "sandbox/src/lib.rs"),
    ]
}

/// Every cycle a depth-first search closes, as `a -> b -> a`.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(n.to_string());
            found.push(cycle);
            return;
        }
        if done.contains(n) {
            return;
        }
        stack.push(n.to_string());
        for next in edges.get(n).into_iter().flatten() {
            visit(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        visit(n, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

/// Every broken rule of one crate, one readable line each.
fn problems(c: &Crate) -> Vec<String> {
    let mut out = Vec::new();
    for cycle in cycles(&c.edges) {
        out.push(format!("{}: cycle {}", c.name, cycle.join(" -> ")));
    }
    for (from, tos) in &c.edges {
        for to in tos {
            for (_, _, why) in NOT_IMPORTED
                .iter()
                .filter(|(k, m, _)| *k == c.name && m == to)
            {
                out.push(format!("{}: forbidden edge {from} -> {to} ({why})", c.name));
            }
            if c.name == "worker" && WORKER_AREAS.contains(&to.as_str()) && from != "routes" {
                out.push(format!(
                    "worker: forbidden edge {from} -> {to} (area routers are imported by routes only; move what they share to `http` or the object's module)"
                ));
            }
        }
    }
    for (m, roots) in &c.names {
        for (_, name, why) in FOREIGN
            .iter()
            .filter(|(k, n, _)| *k == c.name && roots.contains(*n))
        {
            out.push(format!("{}: `{m}` names `{name}::` ({why})", c.name));
        }
    }
    if c.name == "core" {
        let layer = |m: &str| CORE_LAYERS.iter().position(|l| l.contains(&m));
        for m in c.modules.keys() {
            if layer(m).is_none() {
                out.push(format!(
                    "core: module `{m}` is not in CORE_LAYERS (core/tests/architecture.rs): give it a layer"
                ));
            }
        }
        for (from, tos) in &c.edges {
            for to in tos {
                if let (Some(a), Some(b)) = (layer(from), layer(to)) {
                    if a < b {
                        out.push(format!(
                            "core: forbidden edge {from} -> {to} (layer {} imports layer {}: a module imports only its own layer or lower ones)",
                            a + 1,
                            b + 1
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Modules in dependency order: each line imports only lines above it (or its own).
fn order(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut levels = Vec::new();
    while placed.len() < edges.len() {
        let level: Vec<String> = edges
            .iter()
            .filter(|(m, tos)| !placed.contains(*m) && tos.iter().all(|t| placed.contains(t)))
            .map(|(m, _)| m.clone())
            .collect();
        if level.is_empty() {
            break; // a cycle: reported by `problems`
        }
        placed.extend(level.iter().cloned());
        levels.push(level);
    }
    levels
}

#[test]
fn the_module_graphs_have_no_cycle_and_no_forbidden_edge() {
    let mut all = Vec::new();
    for c in crates() {
        for (i, level) in order(&c.edges).iter().enumerate() {
            eprintln!("{} {}: {}", c.name, i + 1, level.join(", "));
        }
        all.extend(problems(&c));
    }
    assert!(all.is_empty(), "module graph:\n  {}", all.join("\n  "));
}

#[test]
fn the_checker_sees_the_edges_it_should() {
    let crates = crates();
    let edge = |k: &str, a: &str, b: &str| {
        crates
            .iter()
            .find(|c| c.name == k)
            .and_then(|c| c.edges.get(a))
            .is_some_and(|tos| tos.contains(b))
    };
    // A `use` line, a grouped `use crate::{…}`, a path in code, a `#[path]` module.
    assert!(edge("core", "session", "queue"));
    assert!(edge("core", "repository", "egress"));
    assert!(edge("worker", "session_object", "session_provider"));
    assert!(edge("worker", "session_object", "agent_session"));
    assert!(edge("worker", "session_provider", "sandbox_start"));
    assert!(edge("worker", "routes", "sandbox_api"));
    assert!(edge("sandbox", "provider", "images"));
    assert!(edge("sandbox", "images", "state"));
    let core = &crates[0];
    assert!(
        core.modules.len() >= 15,
        "core modules: {:?}",
        core.modules.keys()
    );
}

#[test]
fn comments_strings_and_test_modules_are_not_edges() {
    let src = r##"
use crate::{alpha, beta::Thing, self};
// use crate::comment;
/* use crate::block; */
const S: &str = "crate::string";
const R: &str = r#"crate::raw"#;
fn f<'a>(x: &'a str) -> char { let _ = crate::gamma::g(); '"' }
#[cfg(test)]
mod tests {
    use crate::in_tests;
}
"##;
    let code = without_test_modules(&code_only(src));
    let found = crate_paths(&code, false);
    let want: BTreeSet<String> = ["alpha", "beta", "gamma", "self"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
}
