//! `Platform` on fixture trees: the backend it hands out reads the tree it was given.

#![cfg(feature = "stats")]

use std::path::PathBuf;

use vmsdk::{BackendChoice, Platform};

fn guest_stats_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-stats/tests/fixtures")
        .join(name)
}

#[test]
fn a_linux_guest_tree_gets_the_linux_backend_reading_that_tree() {
    let platform = Platform::builder()
        .backend(BackendChoice::Auto)
        .root(guest_stats_fixture("xen-hvm-cgroup2"))
        .build()
        .unwrap();
    let mut stats = platform.guest_stats().unwrap();
    assert_eq!(stats.backend(), "linux");
    stats.update().unwrap();
    // The Xen balloon target exists only in that tree, so a value proves the root was used.
    assert!(stats.mem_target_size_mb().unwrap() > 0);
}

#[test]
fn a_tree_without_procfs_has_no_backend_and_says_why() {
    let empty = tempfile::tempdir().unwrap();
    let platform = Platform::builder()
        .backend(BackendChoice::Auto)
        .root(empty.path())
        .build()
        .unwrap();
    let error = platform
        .guest_stats()
        .err()
        .expect("no backend for an empty tree");
    let message = error.to_string();
    assert!(message.contains("proc/stat"), "{message}");
    // A library user is pointed at the library's switch, not at a command-line flag.
    assert!(message.contains("BackendChoice::Fake"), "{message}");
    assert!(!message.contains("--backend"), "{message}");
    assert!(!message.contains("  "), "stray spaces: {message}");
}

#[test]
fn the_fake_choice_ignores_the_machine() {
    let empty = tempfile::tempdir().unwrap();
    let platform = Platform::builder()
        .backend(BackendChoice::Fake)
        .root(empty.path())
        .build()
        .unwrap();
    assert_eq!(platform.guest_stats().unwrap().backend(), "fake");
}
