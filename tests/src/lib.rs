//! Shared helpers for vmsdk's integration tests against real peers (qemu-ga, qemu-nbd, nbdkit,
//! systemd-detect-virt, qemu-system).
//!
//! A peer test never passes silently when its peer is missing: [`require_program`] skips with a
//! message on a developer's machine and fails the test when `CI=true` (which `cargo xtask ci`
//! sets after installing every peer).

#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod disk;
pub mod qga;

/// Whether the tests run under CI, where every peer must be present.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds `program` (a bare name looked up in `PATH` and the sbin directories, or an absolute
/// path). Returns `None` after printing a skip notice if it is missing outside CI.
///
/// # Panics
///
/// When the program is missing and [`running_in_ci`] is true: a missing peer is a failure there.
pub fn require_program(program: &str, debian_package: &str) -> Option<PathBuf> {
    if let Some(found) = find_program(program) {
        return Some(found);
    }
    let message = format!(
        "peer `{program}` is missing (Debian package `{debian_package}`; `cargo xtask deps` installs it)"
    );
    assert!(!running_in_ci(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}

/// Looks `program` up in `PATH` plus the sbin directories that non-root `PATH`s often lack.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let candidate = PathBuf::from(program);
    if candidate.is_absolute() {
        return candidate.is_file().then_some(candidate);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The `vmsdk` binary of this build (`target/<profile>/vmsdk`), built by `cargo test
/// --workspace` alongside the tests. Returns `None` after a skip notice when it was not built
/// (for example `cargo test -p vmsdk-tests` alone), and fails under CI.
pub fn vmsdk_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // Test executables live in target/<profile>/deps/.
    let profile_dir = exe.parent()?.parent()?;
    let binary = profile_dir.join("vmsdk");
    if binary.is_file() {
        return Some(binary);
    }
    let message = format!(
        "{} is not built; run `cargo build -p vmsdk` or `cargo test --workspace`",
        binary.display()
    );
    assert!(!running_in_ci(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}
