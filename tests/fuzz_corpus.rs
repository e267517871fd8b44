//! Replays every file of `fuzz/corpus/<target>/` through the matching check function
//! of `mirrordisk::fuzzing`, so plain `cargo test` runs the fuzz checks on the seeds
//! and on the inputs the fuzzers found, without libFuzzer or nightly.
//!
//! Every corpus directory and every `fuzz/fuzz_targets/*.rs` must have an entry in
//! `TARGETS`: an unknown name fails, so a new target cannot be forgotten here.

use std::fs;
use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

/// Fuzz target name → the function its `fuzz_target!` calls.
const TARGETS: &[(&str, Check)] = &[
    ("nbd_handshake", mirrordisk::fuzzing::nbd_handshake),
    ("nbd_request", mirrordisk::fuzzing::nbd_request),
    (
        "meta_superblock",
        mirrordisk::fuzzing::meta::superblock_decode,
    ),
    (
        "meta_journal_replay",
        mirrordisk::fuzzing::meta::journal_replay,
    ),
    ("meta_snapshot", mirrordisk::fuzzing::meta::snapshot_decode),
    (
        "meta_activity_log",
        mirrordisk::fuzzing::meta::activity_log_decode,
    ),
    ("repl_frame", mirrordisk::fuzzing::repl::repl_frame),
    ("repl_handshake", mirrordisk::fuzzing::repl::repl_handshake),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn check_for(name: &str) -> Check {
    match TARGETS.iter().find(|(target, _)| *target == name) {
        Some((_, check)) => *check,
        None => panic!("fuzz target {name:?} has no entry in tests/fuzz_corpus.rs TARGETS"),
    }
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    entries
}

#[test]
fn every_corpus_file_passes_its_check() {
    let corpus_root = fuzz_dir().join("corpus");
    let mut replayed_count = 0;
    for target_dir in sorted_entries(&corpus_root) {
        assert!(
            target_dir.is_dir(),
            "{} is not a directory",
            target_dir.display()
        );
        let name = target_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let check = check_for(&name);
        let files = sorted_entries(&target_dir);
        assert!(!files.is_empty(), "corpus for {name} is empty");
        for file in files {
            let data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // The panic message of a failed check names the file through this frame.
            eprintln!("replaying {}", file.display());
            check(&data);
            replayed_count += 1;
        }
    }
    assert!(
        replayed_count > 0,
        "no corpus files found under {}",
        corpus_root.display()
    );
}

#[test]
fn every_fuzz_target_has_a_check_and_a_corpus() {
    let fuzz = fuzz_dir();
    let mut target_names = Vec::new();
    for source in sorted_entries(&fuzz.join("fuzz_targets")) {
        if source.extension().is_some_and(|ext| ext == "rs") {
            target_names.push(source.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    for name in &target_names {
        check_for(name);
        assert!(
            fuzz.join("corpus").join(name).is_dir(),
            "fuzz target {name} has no corpus"
        );
    }
    for (name, _) in TARGETS {
        assert!(
            target_names.iter().any(|target| target == name),
            "no fuzz target {name}"
        );
    }
}
