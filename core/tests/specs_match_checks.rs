//! The TLA+ specs and the Rust model checks cannot drift apart: every property a spec declares
//! has a model check of the same name, and every name a model check asserts is declared in its
//! spec.
//!
//! Convention (in every `specs/*.tla`): one line
//! `\* Checked by core/tests/model_<name>.rs: ...` marks the properties section; every top-level
//! definition (`Name == ...`) after it is a property (an invariant, or a step property written
//! `[][...]_vars`) that the named Rust file asserts under the same name. A line
//! `\* Rust only: A, B.` in that section names checks about implementation detail the spec
//! abstracts away (the reason is written beside it). On the Rust side a check is a tuple
//! `("Name", holds)` returned by `invariants` or `step_properties`.
//!
//! The specs are design notes: nothing runs TLC. What runs is the Rust model checks.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

const MARKER: &str = "\\* Checked by ";
const RUST_ONLY: &str = "\\* Rust only:";

struct Spec {
    file: PathBuf,
    rust_file: PathBuf,
    declared: BTreeSet<String>,
    rust_only: BTreeSet<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the core crate sits in the workspace")
        .to_path_buf()
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_uppercase()) && c.all(|x| x.is_ascii_alphanumeric())
}

/// Parses one spec's properties section.
fn parse_spec(file: &Path, text: &str) -> Result<Spec, String> {
    let mut rust_file = None;
    let mut declared = BTreeSet::new();
    let mut rust_only = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(MARKER) {
            if rust_file.is_some() {
                return Err(format!("{}: two `{MARKER}` lines", file.display()));
            }
            let path = rest.split(':').next().unwrap_or("").trim();
            rust_file = Some(root().join(path));
            continue;
        }
        if rust_file.is_none() {
            continue;
        }
        if let Some(rest) = line.strip_prefix(RUST_ONLY) {
            let names = rest.split('.').next().unwrap_or("");
            for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !is_name(n) {
                    return Err(format!("{}: bad Rust-only name {n:?}", file.display()));
                }
                rust_only.insert(n.to_string());
            }
            continue;
        }
        // A top-level definition: `Name == ...` or `Name(args) == ...` at column 0.
        if let Some((lhs, _)) = line.split_once("==") {
            let name = lhs.split('(').next().unwrap_or("").trim_end();
            if !line.starts_with(' ') && is_name(name) && !line.starts_with("====") {
                declared.insert(name.to_string());
            }
        }
    }
    let rust_file = rust_file.ok_or_else(|| format!("{}: no `{MARKER}` line", file.display()))?;
    Ok(Spec {
        file: file.to_path_buf(),
        rust_file,
        declared,
        rust_only,
    })
}

/// The names a model check asserts: string literals opening a tuple, `("Name", ...)`.
fn rust_checks(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find('"') {
        let start = i + off;
        let Some(len) = text[start + 1..].find('"') else {
            break;
        };
        let end = start + 1 + len;
        let lit = &text[start + 1..end];
        let before = text[..start].trim_end().as_bytes().last().copied();
        let after = text[end + 1..].trim_start().as_bytes().first().copied();
        if before == Some(b'(') && after == Some(b',') && is_name(lit) {
            out.insert(lit.to_string());
        }
        i = end + 1;
        debug_assert!(i <= b.len());
    }
    out
}

fn specs() -> Vec<Spec> {
    let dir = root().join("specs");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "tla"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = fs::read_to_string(f).expect("read spec");
            parse_spec(f, &text).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Every spec property has a Rust check of the same name, and every Rust check is declared in
/// its spec (or listed there as Rust only).
#[test]
fn every_spec_property_has_a_model_check_of_the_same_name_and_back() {
    let specs = specs();
    assert!(
        specs.len() >= 6,
        "expected the six specs, found {}",
        specs.len()
    );
    let mut problems = Vec::new();
    for s in &specs {
        let text = fs::read_to_string(&s.rust_file)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", s.file.display(), s.rust_file.display()));
        let rust = rust_checks(&text);
        assert!(
            !s.declared.is_empty() && !rust.is_empty(),
            "{}: nothing found",
            s.file.display()
        );
        for n in s.declared.intersection(&s.rust_only) {
            problems.push(format!(
                "{}: {n} is both a spec property and Rust only",
                s.file.display()
            ));
        }
        for n in s.declared.union(&s.rust_only) {
            if !rust.contains(n) {
                problems.push(format!(
                    "{}: {n} has no model check of that name in {}",
                    s.file.display(),
                    s.rust_file.display()
                ));
            }
        }
        for n in &rust {
            if !s.declared.contains(n) && !s.rust_only.contains(n) {
                problems.push(format!(
                    "{}: the check {n} is not declared in {}",
                    s.rust_file.display(),
                    s.file.display()
                ));
            }
        }
    }
    // Every model check file belongs to a spec.
    let mapped: BTreeSet<&PathBuf> = specs.iter().map(|s| &s.rust_file).collect();
    for e in fs::read_dir(root().join("core/tests")).expect("core/tests") {
        let p = e.expect("entry").path();
        let is_model = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("model_") && n.ends_with(".rs"));
        if is_model && !mapped.contains(&p) {
            problems.push(format!("{}: no spec names it", p.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "specs and checks drifted:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_parsers_see_what_they_should() {
    let spec = "\\* header\nFoo == 1\n\\* Checked by core/tests/model_x.rs: the rest.\nA == TRUE\n\
                B(x) == x\n  Indented == no\n\\* Rust only: C, D. (why)\n====\n";
    let s = parse_spec(Path::new("x.tla"), spec).expect("parses");
    assert_eq!(s.declared, ["A", "B"].map(String::from).into());
    assert_eq!(s.rust_only, ["C", "D"].map(String::from).into());
    let rust = "vec![(\"A\", x), (\n \"B\",\n y), f(\"No\"), (M, \"Nor\"), (\"lower\", z)]";
    assert_eq!(rust_checks(rust), ["A", "B"].map(String::from).into());
}
