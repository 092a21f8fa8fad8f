//! `cargo xtask peer-root`: the second generation of test peers, a Debian 13 ("trixie") root.
//!
//! The machine is Debian 12, whose peers (qemu-ga and qemu-nbd 7.2, nbdkit 1.32, libnbd 1.14,
//! systemd 252) are the first generation. The second is built here with `debootstrap
//! --variant=minbase` into `<target>/peer-root/trixie` and holds qemu-ga, qemu-nbd and
//! qemu-system-x86_64 10.0, nbdkit 1.42 with the VDDK plugin, libnbd 1.22, systemd 257 and
//! gnutls/openssl tools. nbdcopy and nbdinfo 1.24 (the first with `--blkhash`) exist only in
//! Debian unstable: their packages are unpacked with `dpkg -x` into `/opt/libnbd-1.24` of the
//! root and run through the wrappers `/usr/local/bin/nbdcopy-1.24` and `nbdinfo-1.24`, which set
//! `LD_LIBRARY_PATH` (installing them with dpkg fails on unstable-only dependencies).
//!
//! The root is built once and reused. The build goes into a temporary sibling directory and is
//! renamed into place only when complete, with a stamp file ([`STAMP`]) recording the recipe and
//! the package versions, so an interrupted build is never mistaken for a finished one. A root
//! whose stamp names another recipe is rebuilt.
//!
//! Programs run in the root through `chroot` inside a private mount namespace (`unshare
//! --mount --propagation private`): `/proc`, `/sys` and `/dev` are bind-mounted there, and the
//! kernel drops those mounts with the namespace when its last process exits, also when a run is
//! killed. Nothing is mounted in the machine's own namespace. debootstrap itself runs in such a
//! namespace too, so an interrupted debootstrap cannot leave its `/proc` mount behind.
//! `cargo xtask peer-root --unmount` still checks the machine's mount table for anything mounted
//! under `<target>/peer-root` (for example by hand) and unmounts it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The Debian release of the root.
const SUITE: &str = "trixie";
/// The Debian mirror the root and the unstable packages come from.
const MIRROR: &str = "http://deb.debian.org/debian";

/// Packages installed in the root (debootstrap `--include`). `nbdkit-plugin-vddk` is in
/// `contrib`.
const PACKAGES: &[&str] = &[
    "qemu-guest-agent",
    "qemu-utils",
    "qemu-system-x86",
    "nbdkit",
    "nbdkit-plugin-vddk",
    "libnbd-bin",
    "systemd",
    "gnutls-bin",
    "openssl",
    "procps",
    "iproute2",
    "util-linux",
];

/// Packages taken from Debian unstable and unpacked (not installed) into [`UNSTABLE_DIR`].
const UNSTABLE_PACKAGES: &[&str] = &["libnbd-bin", "libnbd0", "libxml2-16"];

/// Where the unstable packages are unpacked, relative to the root.
pub(crate) const UNSTABLE_DIR: &str = "opt/libnbd-1.24";

/// The libnbd version the unstable packages must have (major.minor).
const UNSTABLE_LIBNBD: &str = "1.24.";

/// Programs of the unstable libnbd, reachable in the root as `/usr/local/bin/<name>-1.24`.
const UNSTABLE_PROGRAMS: &[&str] = &["nbdcopy", "nbdinfo"];

/// The stamp file at the top of a finished root.
pub(crate) const STAMP: &str = "vmsdk-peer-root.stamp";

/// Bumped whenever the recipe above changes, so existing roots are rebuilt.
const RECIPE_VERSION: u32 = 1;

/// Every bounded step's limit (debootstrap downloads ~150 MB).
const STEP_TIMEOUT_SECS: u32 = 1800;

/// The programs whose versions are printed (and recorded in the stamp), with their arguments.
const VERSION_PROBES: &[(&str, &[&str])] = &[
    ("qemu-ga", &["--version"]),
    ("qemu-nbd", &["--version"]),
    ("qemu-system-x86_64", &["--version"]),
    ("nbdkit", &["--version"]),
    ("nbdinfo", &["--version"]),
    ("nbdcopy", &["--version"]),
    ("nbdinfo-1.24", &["--version"]),
    ("nbdcopy-1.24", &["--version"]),
    ("systemd-detect-virt", &["--version"]),
];

/// Mounts a program in the root needs, made inside a private mount namespace, then `chroot`.
/// Arguments: the root, the number of directories to bind-mount at their own path, those
/// directories, then the program and its arguments.
const CHROOT_SCRIPT: &str = r#"set -e
root=$1; n=$2; shift 2
for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
while [ "$n" -gt 0 ]; do
  mkdir -p "$root$1"; mount --bind "$1" "$root$1"; shift; n=$((n - 1))
done
exec chroot "$root" "$@""#;

fn recipe() -> String {
    format!(
        "{RECIPE_VERSION} {SUITE} {MIRROR} [{}] unstable [{}]",
        PACKAGES.join(","),
        UNSTABLE_PACKAGES.join(",")
    )
}

/// `<target>/peer-root`, honouring `CARGO_TARGET_DIR`.
fn base_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from)
        .join("peer-root")
}

/// Where the finished root lives.
pub(crate) fn root_dir(workspace: &Path) -> PathBuf {
    base_dir(workspace).join(SUITE)
}

/// `cargo xtask peer-root [--unmount | --rebuild]`.
pub(crate) fn run(workspace: &Path, args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        None => ensure(workspace).map(|_| ()),
        Some("--unmount") => {
            let count = unmount_under(&base_dir(workspace))?;
            println!(
                "peer-root: {count} stale mount(s) under {} unmounted",
                base_dir(workspace).display()
            );
            Ok(())
        }
        Some("--rebuild") => {
            build(workspace)?;
            print_versions(&root_dir(workspace))
        }
        Some(other) => Err(format!(
            "unknown option `{other}` for peer-root (use --unmount or --rebuild)"
        )),
    }
}

/// Builds the root unless a finished one with the current recipe exists; prints the versions.
pub(crate) fn ensure(workspace: &Path) -> Result<PathBuf, String> {
    let root = root_dir(workspace);
    match read_stamp(&root) {
        Some(stamp) if stamp_recipe(&stamp) == Some(recipe().as_str()) => {
            println!("==> peer root: {} is ready", root.display());
        }
        Some(_) => {
            println!(
                "==> peer root: {} was built by another recipe; rebuilding",
                root.display()
            );
            build(workspace)?;
        }
        None => build(workspace)?,
    }
    print_versions(&root)?;
    Ok(root)
}

fn read_stamp(root: &Path) -> Option<String> {
    fs::read_to_string(root.join(STAMP)).ok()
}

fn stamp_recipe(stamp: &str) -> Option<&str> {
    stamp.lines().find_map(|l| l.strip_prefix("recipe: "))
}

fn print_versions(root: &Path) -> Result<(), String> {
    println!("==> peer root versions (Debian 13 in {}):", root.display());
    for (program, version) in probe_versions(root)? {
        println!("    {program:<20} {version}");
    }
    Ok(())
}

/// The first line of each program's `--version` in the root (two for nbdinfo, whose second line
/// names the library).
fn probe_versions(root: &Path) -> Result<Vec<(String, String)>, String> {
    let mut versions = Vec::new();
    for (program, args) in VERSION_PROBES {
        let mut argv = vec![*program];
        argv.extend_from_slice(args);
        let out = in_root(root, &argv)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(if program.starts_with("nbdinfo") { 2 } else { 1 })
            .collect::<Vec<_>>()
            .join("; ");
        if !out.status.success() || version.is_empty() {
            return Err(format!(
                "`{program} --version` in the peer root failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        versions.push(((*program).to_owned(), version));
    }
    Ok(versions)
}

/// Runs `argv` in `root` (chroot in a private mount namespace with /proc, /sys, /dev) and
/// returns its output; bounded by [`STEP_TIMEOUT_SECS`].
pub(crate) fn in_root(root: &Path, argv: &[&str]) -> Result<Output, String> {
    let mut command = timeout_command();
    command.args(["unshare", "--mount", "--propagation", "private", "--"]);
    chroot_args(&mut command, root, &[]);
    command
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {} in the peer root: {e}", argv[0]))
}

/// A command running `program` in `root` with the directories `binds` (absolute, at least two
/// levels deep, e.g. a build cache and a socket directory) bind-mounted at their own paths,
/// all inside a private mount namespace. `unshare`, `sh` and `chroot` each exec the next, so
/// the child's PID is the program's own and killing it by PID ends it; its mounts end with it.
pub(crate) fn command_in_root(root: &Path, binds: &[&Path], program: &str) -> Command {
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "--"]);
    chroot_args(&mut command, root, binds);
    command.arg(program);
    command
}

/// `sh -c CHROOT_SCRIPT …` with the root and the binds, and a clean environment.
fn chroot_args(command: &mut Command, root: &Path, binds: &[&Path]) {
    for dir in binds {
        assert!(
            dir.is_absolute() && dir.components().count() >= 3,
            "refusing to bind {} into the peer root",
            dir.display()
        );
    }
    command
        .args(["sh", "-c", CHROOT_SCRIPT, "sh"])
        .arg(root)
        .arg(binds.len().to_string())
        .args(binds)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8");
}

/// `timeout --foreground STEP_TIMEOUT_SECS`: bounded, and left in xtask's process group so that
/// Ctrl-C reaches the whole chain (plain `timeout` moves its child into a group of its own,
/// which an interrupted xtask would leave running).
fn timeout_command() -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["--foreground", "--kill-after=10"])
        .arg(STEP_TIMEOUT_SECS.to_string());
    command
}

/// Runs a command, inheriting output, and fails with its name when it fails.
fn run_step(what: &str, command: &mut Command) -> Result<(), String> {
    let status = command
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("could not start {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn is_root() -> bool {
    crate::is_root()
}

/// Installs debootstrap with apt-get when it is missing, waiting for the dpkg lock.
fn ensure_debootstrap() -> Result<(), String> {
    if Path::new("/usr/sbin/debootstrap").exists() {
        return Ok(());
    }
    println!("==> peer root: installing debootstrap");
    let lock_wait = "DPkg::Lock::Timeout=900";
    let apt = |args: &[&str]| {
        let mut c = timeout_command();
        c.arg("apt-get")
            .args(["-q", "-o", lock_wait])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    // A fresh machine's package lists may be empty.
    if run_step(
        "apt-get install debootstrap",
        &mut apt(&["install", "-y", "--no-install-recommends", "debootstrap"]),
    )
    .is_err()
    {
        run_step("apt-get update", &mut apt(&["update"]))?;
        run_step(
            "apt-get install debootstrap",
            &mut apt(&["install", "-y", "--no-install-recommends", "debootstrap"]),
        )?;
    }
    Ok(())
}

/// Builds the root into a temporary directory and renames it into place when complete.
fn build(workspace: &Path) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "building the Debian 13 peer root ({}) needs root (debootstrap, chroot); run `sudo \
             cargo xtask peer-root`",
            root_dir(workspace).display()
        ));
    }
    let started = Instant::now();
    let base = base_dir(workspace);
    fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    // Leftovers of interrupted builds (ours or a killed one's) go first.
    remove_leftovers(&base)?;
    ensure_debootstrap()?;

    let tmp = base.join(format!("{SUITE}.tmp-{}", std::process::id()));
    let cache = base.join("debs");
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let cache = fs::canonicalize(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    println!(
        "==> peer root: debootstrap {SUITE} into {} (a few minutes)",
        tmp.display()
    );
    let result = (|| {
        // In a private mount namespace: the /proc and /sys debootstrap mounts in the target die
        // with it, even if it is killed.
        run_step(
            "debootstrap",
            timeout_command()
                .args(["unshare", "--mount", "--propagation", "private", "--"])
                .arg("debootstrap")
                .args(["--variant=minbase", "--components=main,contrib"])
                .arg(format!("--include={}", PACKAGES.join(",")))
                .arg(format!("--cache-dir={}", cache.display()))
                .arg(SUITE)
                .arg(&tmp)
                .arg(MIRROR)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        let debootstrap_secs = started.elapsed().as_secs_f64();
        let unstable = unpack_unstable(&base, &tmp)?;
        // Downloaded packages are in the cache directory; the root keeps none.
        let _ = in_root(&tmp, &["apt-get", "clean"]);
        let packages = installed_versions(&tmp)?;
        let versions = probe_versions(&tmp)?;
        let mut stamp = String::new();
        stamp.push_str(&format!("recipe: {}\n", recipe()));
        stamp.push_str(&format!(
            "built: {}\n",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ));
        stamp.push_str(&format!(
            "build-seconds: {:.0} (debootstrap {debootstrap_secs:.0})\n",
            started.elapsed().as_secs_f64()
        ));
        for (package, version) in &packages {
            stamp.push_str(&format!("package {package}: {version}\n"));
        }
        for (package, version) in &unstable {
            stamp.push_str(&format!("unstable {package}: {version}\n"));
        }
        for (program, version) in &versions {
            stamp.push_str(&format!("program {program}: {version}\n"));
        }
        fs::write(tmp.join(STAMP), stamp).map_err(|e| format!("cannot write the stamp: {e}"))
    })();
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    let root = root_dir(workspace);
    if root.exists() {
        let old = base.join(format!("{SUITE}.old-{}", std::process::id()));
        fs::rename(&root, &old).map_err(|e| format!("cannot move the old root aside: {e}"))?;
        fs::rename(&tmp, &root).map_err(|e| format!("cannot rename the new root: {e}"))?;
        remove_tree(&old)?;
    } else {
        fs::rename(&tmp, &root).map_err(|e| format!("cannot rename the new root: {e}"))?;
    }
    println!(
        "<== peer root: built {} in {:.0} s",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `dpkg-query` of the root for each package of the recipe.
fn installed_versions(root: &Path) -> Result<Vec<(String, String)>, String> {
    let out = in_root(
        root,
        &[
            "dpkg-query",
            "-W",
            "-f",
            "${Package} ${Version} ${db:Status-Abbrev}\n",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut versions = Vec::new();
    for package in PACKAGES {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(*package))
            .ok_or_else(|| format!("package {package} is not installed in the peer root"))?;
        let mut fields = line.split_whitespace();
        let version = fields.nth(1).unwrap_or_default();
        if fields.next() != Some("ii") {
            return Err(format!("package {package} is not fully installed: {line}"));
        }
        versions.push(((*package).to_owned(), version.to_owned()));
    }
    Ok(versions)
}

/// Downloads the unstable packages with the machine's apt (a private sources list and state
/// directory under `base`, nothing of the machine's apt configuration changed), unpacks them into
/// the root's [`UNSTABLE_DIR`] and writes the `-1.24` wrappers. Returns package versions.
fn unpack_unstable(base: &Path, root: &Path) -> Result<Vec<(String, String)>, String> {
    let work = base.join(format!("unstable.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        fs::create_dir_all(work.join(sub)).map_err(|e| format!("cannot create {sub}: {e}"))?;
    }
    let work = fs::canonicalize(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let result = (|| {
        let list = work.join("sources.list");
        fs::write(
            &list,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} sid main\n"
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", list.display()))?;
        let options = [
            format!("Dir::Etc::SourceList={}", list.display()),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", work.join("lists").display()),
            format!("Dir::Cache={}", work.join("cache").display()),
            "APT::Architectures::=amd64".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".to_owned(),
            "Acquire::Languages=none".to_owned(),
        ];
        let apt = |args: &[&str]| {
            let mut c = timeout_command();
            c.arg("apt-get").arg("-q");
            for o in &options {
                c.arg("-o").arg(o);
            }
            c.args(args).current_dir(work.join("debs"));
            c
        };
        println!("==> peer root: nbdcopy 1.24 from Debian unstable");
        run_step("apt-get update (unstable index)", &mut apt(&["update"]))?;
        let mut download = vec!["download"];
        download.extend_from_slice(UNSTABLE_PACKAGES);
        run_step("apt-get download (unstable)", &mut apt(&download))?;
        let target = root.join(UNSTABLE_DIR);
        fs::create_dir_all(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        let mut versions = Vec::new();
        for entry in
            fs::read_dir(work.join("debs")).map_err(|e| format!("cannot list the debs: {e}"))?
        {
            let deb = entry.map_err(|e| e.to_string())?.path();
            run_step(
                &format!("dpkg -x {}", deb.display()),
                Command::new("dpkg").arg("-x").arg(&deb).arg(&target),
            )?;
            let out = Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .args(["Package", "Version"])
                .output()
                .map_err(|e| format!("dpkg-deb: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start_matches(':').trim().to_owned())
                    .unwrap_or_default()
            };
            versions.push((field("Package"), field("Version")));
        }
        versions.sort();
        for package in UNSTABLE_PACKAGES {
            if !versions.iter().any(|(p, _)| p == package) {
                return Err(format!("unstable package {package} was not downloaded"));
            }
        }
        if let Some((_, v)) = versions.iter().find(|(p, _)| p == "libnbd-bin") {
            if !v.starts_with(UNSTABLE_LIBNBD) {
                return Err(format!(
                    "unstable libnbd-bin is {v}, expected {UNSTABLE_LIBNBD}x; update the recipe"
                ));
            }
        }
        let bin = root.join("usr/local/bin");
        fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
        for program in UNSTABLE_PROGRAMS {
            let wrapper = bin.join(format!("{program}-1.24"));
            fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\n# {program} of libnbd 1.24 (Debian unstable), unpacked by cargo \
                     xtask peer-root\nLD_LIBRARY_PATH=/{UNSTABLE_DIR}/usr/lib/x86_64-linux-gnu \
                     exec /{UNSTABLE_DIR}/usr/bin/{program} \"$@\"\n"
                ),
            )
            .map_err(|e| format!("cannot write {}: {e}", wrapper.display()))?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod {}: {e}", wrapper.display()))?;
        }
        Ok(versions)
    })();
    let _ = fs::remove_dir_all(&work);
    result
}

/// Removes the temporary and old trees an interrupted build left in `base`.
fn remove_leftovers(base: &Path) -> Result<(), String> {
    let entries = fs::read_dir(base).map_err(|e| format!("cannot list {}: {e}", base.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") || name.contains(".old-") {
            let users = processes_using(&entry.path());
            if !users.is_empty() {
                return Err(format!(
                    "{} is still in use by process(es) {} (another build, or one an interrupted \
                     build left running); wait for them or end them, then run again",
                    entry.path().display(),
                    users.join(", ")
                ));
            }
            println!("==> peer root: removing the leftover {name}");
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// Processes (`PID command`) whose root, working directory or an open file is under `dir`.
fn processes_using(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut users = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return users;
    };
    for entry in procs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let proc_dir = entry.path();
        let under = |link: PathBuf| fs::read_link(link).is_ok_and(|t| t.starts_with(&dir));
        let uses = under(proc_dir.join("root"))
            || under(proc_dir.join("cwd"))
            || fs::read_dir(proc_dir.join("fd"))
                .map(|fds| fds.flatten().any(|fd| under(fd.path())))
                .unwrap_or(false);
        if uses {
            let command = fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            users.push(format!("{name} {}", command.trim()));
        }
    }
    users
}

/// Deletes a tree after unmounting anything under it, never crossing into another file system.
fn remove_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    unmount_under(dir)?;
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        return Err(format!(
            "refusing to delete {}: still mounted: {}",
            dir.display(),
            left.join(", ")
        ));
    }
    run_step(
        &format!("rm -rf {}", dir.display()),
        Command::new("rm")
            .args(["-rf", "--one-file-system", "--"])
            .arg(dir),
    )
}

/// Mount points (of this mount namespace) at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Result<Vec<String>, String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let dir = dir.to_string_lossy().into_owned();
    let table = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mut found: Vec<String> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mount_path)
        .filter(|m| Path::new(m).starts_with(&dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&raw[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted at or below `dir` in this namespace, deepest first (lazily when
/// busy). Returns how many mount points there were.
fn unmount_under(dir: &Path) -> Result<usize, String> {
    let mounts = mounts_under(dir)?;
    for mount in &mounts {
        let plain = Command::new("umount")
            .arg(mount)
            .stderr(Stdio::null())
            .status();
        if !plain.is_ok_and(|s| s.success()) {
            run_step(
                &format!("umount -l {mount}"),
                Command::new("umount").arg("-l").arg(mount),
            )?;
        }
        println!("    unmounted {mount}");
    }
    Ok(mounts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        // A trailing backslash without three digits stays as it is.
        assert_eq!(unescape_mount_path(r"/x\04"), r"/x\04");
    }

    #[test]
    fn the_stamp_names_the_recipe_and_a_changed_recipe_is_noticed() {
        let stamp = format!("recipe: {}\nbuilt: 1\npackage nbdkit: 1.42.3-1\n", recipe());
        assert_eq!(stamp_recipe(&stamp), Some(recipe().as_str()));
        assert_ne!(stamp_recipe("recipe: 0 trixie\n"), Some(recipe().as_str()));
        assert_eq!(stamp_recipe("built: 1\n"), None);
        // Every package the tests rely on is in the recipe.
        for package in [
            "qemu-guest-agent",
            "nbdkit-plugin-vddk",
            "gnutls-bin",
            "systemd",
        ] {
            assert!(recipe().contains(package), "{package}");
        }
    }

    #[test]
    fn mounts_under_a_directory_are_found_deepest_first() {
        // The machine's own root has mounts under it (/proc at least); a fresh directory none.
        let found = mounts_under(Path::new("/")).unwrap();
        assert!(found.iter().any(|m| m == "/proc"), "{found:?}");
        let depths: Vec<usize> = found.iter().map(String::len).collect();
        assert!(depths.windows(2).all(|w| w[0] >= w[1]));
        let dir = std::env::temp_dir().join(format!("peer-root-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(mounts_under(&dir).unwrap().is_empty());
        fs::remove_dir(&dir).unwrap();
    }
}
