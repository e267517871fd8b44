//! Tidy checks run as ordinary tests: the core stays sans-IO, every module says what it
//! owns, and nothing is left ignored or unfinished.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Strips `//` comments (including doc comments) so prose may mention forbidden names.
fn code_only(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names whose presence in `src/core` means the core does I/O, reads a clock, spawns a
/// thread, uses randomness or async: all of that belongs to the shell.
const CORE_FORBIDDEN: &[&str] = &[
    "tokio",
    "io_uring",
    "std::fs",
    "std::net",
    "std::time",
    "std::thread",
    "std::process",
    "std::os::",
    "std::io::stdin",
    "std::env",
    "nix::",
    "libc::read",
    "libc::write",
    "libc::open",
    "Instant::now",
    "SystemTime",
    "rand::",
    "async fn",
    ".await",
    "crate::shell",
];

/// Whether `name` occurs in `line` not followed by more of an identifier (so `.await`
/// does not match the field `.awaiting`).
fn contains_token(line: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(name).any(|(at, _)| {
        let next = line[at + name.len()..].chars().next();
        !(name.ends_with(ident) && next.is_some_and(ident))
    })
}

#[test]
fn core_is_sans_io() {
    let mut violations = Vec::new();
    for file in rust_files(&root().join("src/core")) {
        let source = fs::read_to_string(&file).unwrap();
        let code = code_only(&source);
        for (number, line) in code.lines().enumerate() {
            for name in CORE_FORBIDDEN {
                if contains_token(line, name) {
                    violations.push(format!("{}:{}: {name}", file.display(), number + 1));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "the core must not do I/O, read clocks, spawn threads or use async:\n{}",
        violations.join("\n")
    );
}

#[test]
fn every_module_starts_with_a_doc_line() {
    let mut missing = Vec::new();
    for dir in ["src", "tests", "fuzz/fuzz_targets"] {
        let path = root().join(dir);
        if !path.exists() {
            continue;
        }
        for file in rust_files(&path) {
            let source = fs::read_to_string(&file).unwrap();
            let first = source.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let allowed = first.starts_with("//!") || first.starts_with("#![");
            if !allowed {
                missing.push(file.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a leading //! line saying what they own:\n{}",
        missing.join("\n")
    );
}

#[test]
fn nothing_ignored_or_unfinished() {
    let forbidden = ["#[ignore", "todo!(", "unimplemented!(", "dbg!("];
    let mut hits = Vec::new();
    for dir in ["src", "tests"] {
        for file in rust_files(&root().join(dir)) {
            if file.ends_with("tidy.rs") {
                continue;
            }
            let code = code_only(&fs::read_to_string(&file).unwrap());
            for (number, line) in code.lines().enumerate() {
                for name in forbidden {
                    if line.contains(name) {
                        hits.push(format!("{}:{}: {name}", file.display(), number + 1));
                    }
                }
            }
        }
    }
    assert!(hits.is_empty(), "unfinished code:\n{}", hits.join("\n"));
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut missing = Vec::new();
    for file in rust_files(&root().join("src")) {
        let source = fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = source.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !code.contains("unsafe {") {
                continue;
            }
            let window = &lines[index.saturating_sub(6)..=index];
            if !window.iter().any(|l| l.contains("SAFETY:")) {
                missing.push(format!("{}:{}", file.display(), index + 1));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "unsafe blocks without a // SAFETY: comment:\n{}",
        missing.join("\n")
    );
}
