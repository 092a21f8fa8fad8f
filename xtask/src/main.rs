//! Project automation for vmsdk, run as `cargo xtask <task>`.
//!
//! * `ci` — install what the tests need (Debian packages, as root, only when missing), then run
//!   `cargo fmt --check`, clippy with warnings denied, the whole test suite, the docs, the
//!   packaging of every published crate, every fuzz target for a bounded time, and the VM test.
//! * `deps` — only the install step of `ci` (the Debian packages and the peer root).
//! * `peer-root [--unmount | --rebuild]` — build (once, cached under `target/peer-root/`) the
//!   Debian 13 root holding the second generation of test peers; see [`peer_root`].
//! * `bench-detect [RUNS]` — wall time of `vmsdk detect` and `systemd-detect-virt` as whole
//!   processes, interleaved in one run, with their ratio.
//! * `package` — `cargo package` of every published crate, each built from its package.
//! * `fuzz [SECONDS]` — build every fuzz target and run each for a while on its seed corpus
//!   (installs cargo-fuzz when missing); a crash fails the task and names its reproducer.
//! * `vm-test` — boot Debian's kernel under QEMU (TCG) and check the SDK inside the guest and
//!   through the guest agent's virtio-serial channel.
//!
//! The tool has no dependencies beyond std so that it builds in seconds on a fresh machine.

#![forbid(unsafe_code)]

mod features;
mod peer_root;
mod vm_test;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// Debian packages the test suite talks to, with the command that proves each is present.
///
/// The peers are the real programs the integration tests run against: the guest agent, the NBD
/// servers and clients, and QEMU for the virtual-machine test.
const TEST_PEERS: &[(&str, &str)] = &[
    ("qemu-guest-agent", "/usr/sbin/qemu-ga"),
    ("qemu-utils", "/usr/bin/qemu-nbd"),
    ("nbdkit", "/usr/bin/nbdkit"),
    ("libnbd-bin", "/usr/bin/nbdinfo"),
    ("systemd", "/usr/bin/systemd-detect-virt"),
    ("util-linux", "/usr/bin/setpriv"),
    ("socat", "/usr/bin/socat"),
    // disk-transport's `tls` feature links the system OpenSSL (nbds:// tests, the CLI).
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("pkgconf", "/usr/bin/pkg-config"),
    // Scrapes `vmsdk stats --listen` in the exporter's peer test.
    ("prometheus", "/usr/bin/prometheus"),
];

/// Crates with a cargo-fuzz package of their own, outside the workspace.
const FUZZ_DIRS: &[&str] = &[
    "guest-stats/fuzz",
    "qga-proto/fuzz",
    "disk-transport/fuzz",
    "qmp-proto/fuzz",
    "live-backup/fuzz",
];

/// Seconds each fuzz target runs in `cargo xtask ci`...
const CI_FUZZ_SECONDS: u32 = 20;

/// ...unless there are so many targets that their runs together would take longer than this;
/// then each gets an equal share, so the step stays bounded as targets are added (13 targets
/// of 20 s and three sanitizer builds took about 9 minutes on a busy 2-core machine).
const CI_FUZZ_RUN_BUDGET_SECONDS: u32 = 360;

/// Seconds one fuzz input may take before libFuzzer reports it as a hang (a failure, with the
/// input saved like a crash). Far above what any decoder needs for one input.
const FUZZ_INPUT_TIMEOUT_SECONDS: u32 = 10;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let result = match task {
        "ci" => ci(),
        "deps" => {
            install_test_peers().and_then(|()| peer_root::ensure(&workspace_root()).map(|_| ()))
        }
        "peer-root" => peer_root::run(&workspace_root(), &args[1..]),
        "features" => features::check(
            &workspace_root(),
            &env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()),
        ),
        "fuzz" => fuzz_task(args.get(1).map(String::as_str)),
        "package" => package(
            &workspace_root(),
            &env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()),
        ),
        "bench-detect" => bench_detect(args.get(1).map(String::as_str)),
        "vm-test" => vm_test::run_selected(&workspace_root(), &args[1..]),
        "help" | "-h" | "--help" => {
            print_help();
            Ok(())
        }
        other => Err(format!("unknown task `{other}`; run `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!(
        "usage: cargo xtask <task>\n\n\
         tasks:\n  \
         ci            install test peers, then fmt, clippy, tests, docs, packaging, fuzzing, VM test\n  \
         deps          install the Debian packages the tests need (as root, only if missing)\n  \
         peer-root [--unmount|--rebuild]  build the Debian 13 peer root (cached in target/)\n  \
         package       package and build every published crate as `cargo publish` would\n  \
         features      lint the facade's feature sets alone and check a library user's dependency tree\n  \
         fuzz [SECS]   run every fuzz target for SECS seconds each (default 60; ci runs 20)\n  \
         bench-detect [RUNS]  time `vmsdk detect` against `systemd-detect-virt`, interleaved\n  \
         vm-test [BOOT...]  boot QEMU VMs (TCG: qemu, vmware-dmi, qemu10) and run the in-guest\n                \
         and guest-agent checks"
    );
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn ci() -> Result<(), String> {
    let started = Instant::now();
    install_test_peers()?;
    let root = workspace_root();
    // The second generation of peers (Debian 13) the tests also run against.
    peer_root::ensure(&root)?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());

    step(
        &root,
        "format",
        &cargo,
        &["fmt", "--all", "--", "--check"],
        &[],
    )?;
    step(
        &root,
        "clippy",
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // Each capability of the facade on its own, and the lean library build.
    features::check(&root, &cargo)?;
    // The peers were installed above, so a peer test that finds its peer missing must fail
    // rather than skip: CI=true tells the tests so.
    step(
        &root,
        "tests",
        &cargo,
        &["test", "--workspace", "--all-features", "--no-fail-fast"],
        &[("CI", "true")],
    )?;
    step(
        &root,
        "docs",
        &cargo,
        &["doc", "--workspace", "--no-deps", "--all-features"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    package(&root, &cargo)?;
    fuzz_all(&root, FuzzTime::Ci)?;
    // The end-to-end test in a real virtual machine comes last: it needs the binaries the
    // steps above built and checked.
    println!("==> vm-test");
    let vm_started = Instant::now();
    vm_test::run(&root)?;
    println!(
        "<== vm-test: ok in {:.0} s",
        vm_started.elapsed().as_secs_f64()
    );
    println!(
        "xtask ci: all steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(
    dir: &Path,
    name: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<(), String> {
    println!("==> {name}: {program} {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(dir)
        .status()
        .map_err(|e| format!("could not start `{program}`: {e}"))?;
    println!(
        "<== {name}: {} in {:.0} s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("step `{name}` failed ({status})"))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Every package the tests and the VM test need, with the file that proves each is installed.
fn required_packages() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    TEST_PEERS.iter().chain(vm_test::VM_PACKAGES)
}

fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = required_packages()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(package, _)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// Installs the missing test peers with apt-get. Present packages are left alone, so a machine
/// that already has everything never touches the network.
///
/// Everything is installed before any test runs, so the tests meet the same versions as the VM
/// test. Installing Debian's qemu-system-x86 can remove a newer backported qemu-utils (their
/// shared dependencies conflict); a second round then installs the qemu-utils that matches.
fn install_test_peers() -> Result<(), String> {
    let apt_env = [("DEBIAN_FRONTEND", "noninteractive")];
    let root = workspace_root();
    for round in 0..2 {
        let missing = missing_packages();
        if missing.is_empty() {
            println!("==> test peers: all present");
            return Ok(());
        }
        if !is_root() {
            return Err(format!(
                "the tests need these Debian packages: {}; run `sudo cargo xtask deps` or \
                 install them",
                missing.join(" ")
            ));
        }
        println!("==> test peers: installing {}", missing.join(" "));
        if round == 0 {
            // The package lists of a fresh machine may be empty or stale.
            step(
                &root,
                "apt-get update",
                "apt-get",
                &["update", "-q"],
                &apt_env,
            )?;
        }
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(missing.iter().copied());
        step(&root, "apt-get install", "apt-get", &install, &apt_env)?;
    }
    let still_missing = missing_packages();
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "installed packages but these are still missing: {}",
            still_missing.join(", ")
        ))
    }
}

/// Packages every published crate as `cargo publish` would and builds each package on its own:
/// the published crates resolve each other from the packages just made, not from their paths.
/// Members marked `publish = false` (tests, tools) are left out.
fn package(root: &Path, cargo: &str) -> Result<(), String> {
    let members = workspace_members(root)?;
    // A target directory of its own, see `forget_previous_packages`.
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let check_dir = target.join("package-check");
    forget_previous_packages(&check_dir, &members)?;
    let check_dir = check_dir.to_string_lossy();
    let mut args = vec![
        "package",
        "--workspace",
        "--allow-dirty",
        "--target-dir",
        &check_dir,
    ];
    for (name, _) in members.iter().filter(|(_, published)| !published) {
        args.extend(["--exclude", name.as_str()]);
    }
    step(root, "package", cargo, &args, &[])
}

/// Removes what earlier packaging runs left for the next one to trip over.
///
/// Cargo verifies each package against its siblings' packages in a registry it makes under
/// `<target>/package/`, unpacks them into `$CARGO_HOME/registry/src/-<hash>/` (a local registry
/// has no host name), and treats registry packages as immutable: an unpacked `name-version`
/// directory is reused as it is, and so is a build of it (its files carry cargo's fixed 2006
/// timestamp, older than any build). After a change to a sibling crate of the same version,
/// the next verification would build against the sibling's previous package. So packaging
/// uses a target directory of its own (`check_dir`, where every build of our crates comes from
/// a package, and third-party dependencies stay cached), and this removes its registry, the
/// fingerprints of our crates in it, and their unpacked copies.
fn forget_previous_packages(check_dir: &Path, members: &[(String, bool)]) -> Result<(), String> {
    let remove = |dir: &Path| {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot remove {}: {e}", dir.display()))
    };
    // `name-<something>` where the rest starts like a version or a hash, not `name-tests-...`.
    let is_ours = |file_name: &str, rest_starts: fn(char) -> bool| {
        members.iter().any(|(member, _)| {
            file_name
                .strip_prefix(member.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|rest| rest.starts_with(rest_starts) && !rest.contains('-'))
        })
    };
    let previous = check_dir.join("package");
    if previous.is_dir() {
        remove(&previous)?;
    }
    for profile in ["debug", "release"] {
        let Ok(fingerprints) = std::fs::read_dir(check_dir.join(profile).join(".fingerprint"))
        else {
            continue;
        };
        for dir in fingerprints.filter_map(|entry| entry.ok().map(|e| e.path())) {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|name| is_ours(&name, |c| c.is_ascii_hexdigit())) {
                remove(&dir)?;
            }
        }
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let Some(sources) = cargo_home.map(|home| home.join("registry").join("src")) else {
        return Ok(());
    };
    let Ok(registries) = std::fs::read_dir(&sources) else {
        return Ok(());
    };
    for registry in registries.filter_map(|entry| entry.ok().map(|e| e.path())) {
        let local = registry
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with('-'));
        if !local {
            continue;
        }
        let Ok(unpacked) = std::fs::read_dir(&registry) else {
            continue;
        };
        for dir in unpacked.filter_map(|entry| entry.ok().map(|e| e.path())) {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            let ours = name.is_some_and(|name| is_ours(&name, |c| c.is_ascii_digit()));
            if ours && dir.is_dir() {
                remove(&dir)?;
            }
        }
    }
    Ok(())
}

/// The members of the workspace by package name, each with whether it is published (its
/// manifest does not say `publish = false`).
fn workspace_members(root: &Path) -> Result<Vec<(String, bool)>, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let workspace = read(&root.join("Cargo.toml"))?;
    let members = workspace
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .ok_or("no `members = [...]` in the workspace manifest")?;
    let mut names = Vec::new();
    let entries = members
        .lines()
        .map(|line| line.split_once('#').map_or(line, |(code, _)| code))
        .flat_map(|code| code.split(','));
    for member in entries {
        let member = member.trim().trim_matches('"');
        if member.is_empty() {
            continue;
        }
        let manifest = read(&root.join(member).join("Cargo.toml"))?;
        let field = |key: &str| {
            manifest.lines().find_map(|line| {
                let (k, v) = line.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let name = field("name").ok_or(format!("{member}/Cargo.toml has no name"))?;
        names.push((name, field("publish").as_deref() != Some("false")));
    }
    Ok(names)
}

fn fuzz_task(seconds: Option<&str>) -> Result<(), String> {
    let seconds = seconds.unwrap_or("60");
    let seconds = seconds
        .parse::<u32>()
        .map_err(|_| format!("`{seconds}` is not a number of seconds"))?;
    fuzz_all(&workspace_root(), FuzzTime::Each(seconds))
}

/// How long each fuzz target runs.
#[derive(Debug, Clone, Copy)]
enum FuzzTime {
    /// This many seconds.
    Each(u32),
    /// [`CI_FUZZ_SECONDS`], shortened to fit [`CI_FUZZ_RUN_BUDGET_SECONDS`].
    Ci,
}

/// Builds every target of every fuzz package (one `cargo fuzz build` per package, with the
/// address sanitizer), and runs each target for a bounded time on its corpus and seeds.
///
/// The runs of one package overlap the build of the next: a worker thread runs the fuzz
/// binaries one at a time (each is single-threaded) while cargo builds. The binaries are run
/// directly, as `cargo fuzz run` would after its build, so that they do not wait for the
/// build directory's lock. Each run's output goes to `<target>/fuzz/logs/<target>.log`. All
/// targets run even when one fails; the failures are reported together with the reproducer
/// files libFuzzer wrote under `fuzz/artifacts/<target>/`.
fn fuzz_all(root: &Path, time: FuzzTime) -> Result<(), String> {
    let started = Instant::now();
    ensure_cargo_fuzz(root)?;
    let mut packages = Vec::new();
    for dir in FUZZ_DIRS {
        let dir = root.join(dir);
        if dir.join("Cargo.toml").exists() {
            let targets = fuzz_targets(&dir)?;
            packages.push((dir, targets));
        }
    }
    let count: usize = packages.iter().map(|(_, targets)| targets.len()).sum();
    let seconds = match time {
        FuzzTime::Each(seconds) => seconds,
        FuzzTime::Ci => {
            let share =
                CI_FUZZ_RUN_BUDGET_SECONDS / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
            CI_FUZZ_SECONDS.min(share.max(1))
        }
    };
    // cargo-fuzz needs nightly-only flags; the one stable toolchain here allows them with
    // RUSTC_BOOTSTRAP.
    let env = [("RUSTC_BOOTSTRAP", "1")];
    // One target directory for the three packages, so libFuzzer itself and the dependencies
    // they share are compiled once.
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target_dir = target.join("fuzz");
    let binaries = target_dir.join(host_triple()?).join("release");
    let logs = target_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let target_dir = target_dir.to_string_lossy().into_owned();

    let (jobs, queue) = std::sync::mpsc::channel::<FuzzJob>();
    let worker = std::thread::spawn(move || {
        queue
            .into_iter()
            .map(|job| job.run(seconds))
            .collect::<Vec<_>>()
    });
    let mut build_error = None;
    for (dir, targets) in &packages {
        let built = step(
            dir,
            &format!("fuzz build ({} targets)", targets.len()),
            "cargo",
            &["fuzz", "build", "--target-dir", &target_dir],
            &env,
        );
        if let Err(error) = built {
            build_error = Some(error);
            break;
        }
        for target in targets {
            let job = FuzzJob {
                dir: dir.clone(),
                target: target.clone(),
                binary: binaries.join(target),
                log: logs.join(format!("{target}.log")),
            };
            if jobs.send(job).is_err() {
                break;
            }
        }
    }
    drop(jobs);
    let outcomes = worker
        .join()
        .map_err(|_| "the fuzz worker thread panicked".to_owned())?;
    if let Some(error) = build_error {
        return Err(error);
    }
    let failures: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
    println!(
        "fuzz: {count} targets, {seconds} s each, {} failed, {:.0} s in all (builds included)",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzzing found failures:\n  {}",
            failures.join("\n  ")
        ))
    }
}

/// One fuzz target to run once its package is built.
#[derive(Debug)]
struct FuzzJob {
    /// The fuzz package (holds `corpus/`, `seeds/`, `artifacts/`).
    dir: PathBuf,
    target: String,
    binary: PathBuf,
    log: PathBuf,
}

impl FuzzJob {
    /// Runs the target for `seconds` on `corpus/<target>` (where new inputs go) and
    /// `seeds/<target>` (valid inputs the crate ships, so the fuzzer starts past the header
    /// checks); a crash, a leak or an input slower than the per-input timeout fails it.
    fn run(self, seconds: u32) -> Result<(), String> {
        let FuzzJob {
            dir,
            target,
            binary,
            log,
        } = self;
        let fail = |why: String| Err(format!("{target}: {why}"));
        let corpus = dir.join("corpus").join(&target);
        let seeds = dir.join("seeds").join(&target);
        let artifacts = dir.join("artifacts").join(&target);
        for needed in [&corpus, &artifacts] {
            if let Err(e) = std::fs::create_dir_all(needed) {
                return fail(format!("cannot create {}: {e}", needed.display()));
            }
        }
        let output = match std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok(files) => files,
            Err(e) => return fail(format!("cannot create {}: {e}", log.display())),
        };
        let before = files_in(&artifacts);
        let mut command = Command::new(&binary);
        command
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={FUZZ_INPUT_TIMEOUT_SECONDS}"))
            .arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        // What `cargo fuzz run` adds for the address sanitizer, after the caller's options.
        let asan_options = match env::var("ASAN_OPTIONS") {
            Ok(options) if !options.is_empty() => format!("{options}:detect_odr_violation=0"),
            _ => "detect_odr_violation=0".to_owned(),
        };
        let started = Instant::now();
        let status = command
            .env("ASAN_OPTIONS", asan_options)
            .current_dir(&dir)
            .stdout(output.0)
            .stderr(output.1)
            .status();
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        // libFuzzer's last word, e.g. "Done 412345 runs in 21 second(s)".
        let summary = log_text
            .lines()
            .rev()
            .find(|line| line.starts_with("Done "))
            .unwrap_or("")
            .to_owned();
        let ok = matches!(&status, Ok(status) if status.success());
        println!(
            "<== fuzz {target}: {} in {:.0} s {summary} (log: {})",
            if ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64(),
            log.display()
        );
        if ok {
            return Ok(());
        }
        let tail: Vec<&str> = log_text.lines().rev().take(30).collect();
        eprintln!(
            "--- last lines of {} ---\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        let written: Vec<PathBuf> = files_in(&artifacts)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        let why = match status {
            Err(e) => format!("cannot run {}: {e}", binary.display()),
            Ok(status) => format!("{status}"),
        };
        if written.is_empty() {
            return fail(format!(
                "{why} (no reproducer was written; see {})",
                log.display()
            ));
        }
        let files: Vec<String> = written
            .iter()
            .map(|file| {
                format!(
                    "reproducer {}\n    replay: cd {} && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {}",
                    file.display(),
                    dir.display(),
                    file.display()
                )
            })
            .collect();
        fail(format!("{why}: {}", files.join("\n  ")))
    }
}

/// The target triple cargo-fuzz builds for: this host's, from `rustc -vV`.
fn host_triple() -> Result<String, String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run rustc -vV: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV names no host triple".to_owned())
}

fn ensure_cargo_fuzz(root: &Path) -> Result<(), String> {
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if has_cargo_fuzz {
        return Ok(());
    }
    step(
        root,
        "install cargo-fuzz",
        "cargo",
        &["install", "--locked", "cargo-fuzz"],
        &[],
    )
}

/// The targets `cargo fuzz list` names in the fuzz package at `dir`.
fn fuzz_targets(dir: &Path) -> Result<Vec<String>, String> {
    let listing = Command::new("cargo")
        .args(["fuzz", "list"])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("could not run cargo fuzz: {e}"))?;
    if !listing.status.success() {
        return Err(format!(
            "`cargo fuzz list` failed in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&listing.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The files directly in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// Times whole-process runs of `vmsdk detect` and `systemd-detect-virt`, alternating them so
/// that both see the same machine state, and prints medians and the ratio.
fn bench_detect(runs: Option<&str>) -> Result<(), String> {
    let runs: usize = runs
        .unwrap_or("200")
        .parse()
        .map_err(|_| "RUNS must be a number".to_owned())?;
    let root = workspace_root();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        &root,
        "build vmsdk (release)",
        &cargo,
        &[
            "build",
            "--release",
            "--quiet",
            "-p",
            "vmsdk",
            "--features",
            "cli",
            "--bin",
            "vmsdk",
        ],
        &[],
    )?;
    let target = env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    let ours = target.join("release/vmsdk");
    let theirs = "systemd-detect-virt";
    let time_one = |program: &Path, args: &[&str]| -> Result<f64, String> {
        let started = Instant::now();
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("could not run {}: {e}", program.display()))?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        Ok(if out.stdout.is_empty() {
            f64::NAN
        } else {
            elapsed
        })
    };
    let mut ours_ms = Vec::with_capacity(runs);
    let mut theirs_ms = Vec::with_capacity(runs);
    // Warm the page cache for both binaries first.
    time_one(&ours, &["detect"])?;
    time_one(Path::new(theirs), &[])?;
    for _ in 0..runs {
        ours_ms.push(time_one(&ours, &["detect"])?);
        theirs_ms.push(time_one(Path::new(theirs), &[])?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ours_mean, theirs_mean) = (mean(&ours_ms), mean(&theirs_ms));
    let (ours_median, theirs_median) = (median(&mut ours_ms), median(&mut theirs_ms));
    println!("runs each: {runs} (interleaved)");
    println!("vmsdk detect          median {ours_median:7.3} ms  mean {ours_mean:7.3} ms");
    println!("systemd-detect-virt   median {theirs_median:7.3} ms  mean {theirs_mean:7.3} ms");
    println!(
        "ratio vmsdk/systemd   median {:.2}x  mean {:.2}x  (goal <= 1x)",
        ours_median / theirs_median,
        ours_mean / theirs_mean
    );
    Ok(())
}
