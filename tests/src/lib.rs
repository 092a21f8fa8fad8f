//! Shared helpers for vmsdk's integration tests against real peers (qemu-ga, qemu-nbd, nbdkit,
//! systemd-detect-virt, qemu-system).
//!
//! A peer test never passes silently when its peer is missing: [`require_program`] skips with a
//! message on a developer's machine and fails the test when `CI=true` (which `cargo xtask ci`
//! sets after installing every peer).
//!
//! Peers come in two generations ([`peers::Generation`]): Debian 12's on the machine and
//! Debian 13's in the root `cargo xtask peer-root` builds; peer tests run against both.

#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod disk;
pub mod http;
pub mod peers;
pub mod qemu;
pub mod qemu_process;
pub mod qemu_vm;
pub mod qga;
pub mod qmp;
pub mod tls;

/// Whether this process runs as root (uid 0), from `/proc/self/status`.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Panics unless `out` is a successful exit, naming `what` ran and showing its standard error.
#[track_caller]
pub fn assert_success(out: &std::process::Output, what: impl std::fmt::Display) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

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
        "{} is not built; run `cargo build -p vmsdk --features cli` or `cargo test --workspace --all-features`",
        binary.display()
    );
    assert!(!running_in_ci(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}

/// The stand-in `libvixDiskLib.so` (package `vddk-standin`), built on first use with the cargo
/// and target directory of this test run, laid out as a VDDK distribution
/// (`<libdir>/lib64/libvixDiskLib.so.8`). Returns the libdir.
///
/// # Panics
///
/// When the build fails: the stand-in is part of this workspace, so that is a real failure.
pub fn vddk_standin_libdir() -> PathBuf {
    static LIBDIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIBDIR
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // Test executables run as <target>/<profile>/deps/<name>.
            let profile_dir = exe.parent().and_then(|d| d.parent()).expect("profile dir");
            let target = profile_dir.parent().expect("target dir");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build
                .args(["build", "--quiet", "-p", "vddk-standin"])
                .env("CARGO_TARGET_DIR", target)
                .env_remove("VDDK_STANDIN_MINIMAL");
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build -p vddk-standin");
            assert!(status.success(), "building the VDDK stand-in failed");
            let library = profile_dir.join("libvixDiskLib.so");
            assert!(library.is_file(), "{} was not built", library.display());
            let libdir = target.join("vmsdk-tests-vddk");
            std::fs::create_dir_all(libdir.join("lib64")).expect("create the stand-in libdir");
            let installed = libdir.join("lib64/libvixDiskLib.so.8");
            std::fs::copy(&library, &installed).expect("install the stand-in");
            libdir
        })
        .clone()
}
