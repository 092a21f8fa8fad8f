//! The feature sets stay honest: each capability of the facade and each backend of the crates
//! builds and lints on its own, and a library user's dependency tree holds none of the command
//! line tool's crates.

use std::path::Path;
use std::process::Command;

use crate::step;

/// Feature sets of `vmsdk` a library user may pick, as `--features` values (empty: detection
/// only).
const FEATURE_SETS: &[&str] = &[
    "",
    "stats",
    "agent",
    "disk",
    "stats,agent,disk,mock",
    "qmp",
    "qmp,mock",
    "stats,prometheus-client",
    "stats,prometheus-client,exporter",
    // A host-side exporter of guest agent metrics: no in-guest statistics crate.
    "agent,prometheus-client",
    "agent,exporter",
    "prometheus-client",
    "exporter",
    "disk,qmp,backup",
];

/// Each capability crate's features, linted one at a time with the crate's defaults off, so a
/// user who picks one backend builds without warnings (an import used only by another backend
/// shows up here, not in the all-features lint).
const CRATE_FEATURES: &[(&str, &[&str])] = &[
    ("guest-stats", &["", "vmware", "linux", "mock"]),
    ("qga-proto", &["", "tokio", "mock"]),
    ("qmp-proto", &["", "tokio", "mock", "fake"]),
    (
        "disk-transport",
        &["", "file", "nbd", "tls", "vddk", "qcow2", "mock"],
    ),
    ("live-backup", &["", "agent", "qemu", "tls"]),
];

/// The facade's features that turn on others (its `Cargo.toml`), so that a set naming only
/// `exporter` may bring in what `prometheus-client` brings.
const IMPLIED_FEATURES: &[(&str, &[&str])] = &[
    ("exporter", &["prometheus-client"]),
    ("tls", &["disk"]),
    ("backup", &["disk", "qmp"]),
];

/// The features a `--features` value turns on: those it names and those they imply.
fn enabled_features(features: &str) -> Vec<&str> {
    let mut enabled: Vec<&str> = features.split(',').filter(|f| !f.is_empty()).collect();
    let mut next = 0;
    while next < enabled.len() {
        let feature = enabled[next];
        for (_, implied) in IMPLIED_FEATURES.iter().filter(|(f, _)| *f == feature) {
            for implied in *implied {
                if !enabled.contains(implied) {
                    enabled.push(implied);
                }
            }
        }
        next += 1;
    }
    enabled
}

/// Crates only the `cli` feature may bring in.
const CLI_ONLY: &[&str] = &["clap", "indicatif"];

/// Crates each capability may bring in and the others must not.
const CAPABILITY_CRATES: &[(&str, &[&str])] = &[
    ("stats", &["guest-stats"]),
    ("agent", &["qga-proto", "tokio", "async-trait"]),
    ("disk", &["disk-transport", "rustix", "libloading"]),
    ("qmp", &["qmp-proto"]),
    ("prometheus-client", &["prometheus-client"]),
    ("exporter", &["tiny_http", "form_urlencoded"]),
    ("backup", &["live-backup"]),
];

/// Lints every feature set and builds its docs with warnings denied, runs the facade's doc
/// tests with statistics only, and checks the dependency trees.
pub fn check(root: &Path, cargo: &str) -> Result<(), String> {
    for features in FEATURE_SETS {
        let mut args = vec!["clippy", "--quiet", "-p", "vmsdk", "--no-default-features"];
        if !features.is_empty() {
            args.extend(["--features", features]);
        }
        args.extend(["--lib", "--", "-D", "warnings"]);
        let name = format!("clippy vmsdk [{}]", display(features));
        step(root, &name, cargo, &args, &[])?;
        // The docs of each feature set render without a broken link (a link to what the set
        // leaves out goes to docs.rs).
        let mut args = vec![
            "doc",
            "--quiet",
            "-p",
            "vmsdk",
            "--no-deps",
            "--no-default-features",
        ];
        if !features.is_empty() {
            args.extend(["--features", features]);
        }
        let name = format!("docs vmsdk [{}]", display(features));
        step(
            root,
            &name,
            cargo,
            &args,
            &[("RUSTDOCFLAGS", "-D warnings")],
        )?;
    }
    for (package, features) in CRATE_FEATURES {
        for features in *features {
            let mut args = vec!["clippy", "--quiet", "-p", package, "--no-default-features"];
            if !features.is_empty() {
                args.extend(["--features", features]);
            }
            args.extend(["--lib", "--", "-D", "warnings"]);
            let shown = if features.is_empty() {
                "no features"
            } else {
                features
            };
            let name = format!("clippy {package} [{shown}]");
            step(root, &name, cargo, &args, &[])?;
        }
    }
    step(
        root,
        "doc tests vmsdk [stats]",
        cargo,
        &[
            "test",
            "--quiet",
            "-p",
            "vmsdk",
            "--no-default-features",
            "--features",
            "stats",
            "--doc",
        ],
        &[],
    )?;
    for features in FEATURE_SETS {
        let tree = dependency_tree(root, cargo, features)?;
        let mut forbidden: Vec<&str> = CLI_ONLY.to_vec();
        let enabled = enabled_features(features);
        for (capability, crates) in CAPABILITY_CRATES {
            if !enabled.contains(capability) {
                forbidden.extend(crates.iter().copied());
            }
        }
        let found: Vec<&str> = forbidden
            .into_iter()
            .filter(|name| tree.iter().any(|line| line == name))
            .collect();
        if !found.is_empty() {
            return Err(format!(
                "vmsdk [{}] pulls in {} for a library user",
                display(features),
                found.join(", ")
            ));
        }
        println!(
            "<== vmsdk [{}]: {} crates, none of the command line tool's",
            display(features),
            tree.len()
        );
    }
    Ok(())
}

fn display(features: &str) -> &str {
    if features.is_empty() {
        "detection only"
    } else {
        features
    }
}

/// The names of every crate in vmsdk's normal dependency tree with `features`.
fn dependency_tree(root: &Path, cargo: &str, features: &str) -> Result<Vec<String>, String> {
    let mut command = Command::new(cargo);
    command.args([
        "tree",
        "-p",
        "vmsdk",
        "--no-default-features",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if !features.is_empty() {
        command.args(["--features", features]);
    }
    let output = command
        .current_dir(root)
        .output()
        .map_err(|e| format!("could not run cargo tree: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}
