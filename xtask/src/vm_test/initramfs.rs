//! Assembles the guest's initramfs: busybox, the kernel modules, qemu-ga, the project's binaries
//! with the shared libraries they load, and the `/init` script that runs the checks.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::Archive;
use super::kernel::Kernel;

/// A program to put into the guest: where it is on the host and where it goes in the guest.
#[derive(Debug)]
pub struct Program<'a> {
    /// The program's path on the host, or inside `root` when that is set.
    pub host: &'a Path,
    pub guest: &'a str,
    /// A Debian root (the peer root) the program comes from, with its shared libraries. Where
    /// a library path is wanted by programs from both, the root's copy goes in: the root is
    /// the newer Debian, and glibc and its neighbours stay compatible with older binaries.
    pub root: Option<&'a Path>,
}

/// What goes into the image besides the fixed layout.
#[derive(Debug)]
pub struct Contents<'a> {
    pub kernel: &'a Kernel,
    /// Modules to load, dependencies first, relative to the kernel's modules directory.
    pub modules: &'a [PathBuf],
    pub busybox: &'a Path,
    pub programs: &'a [Program<'a>],
    pub init_script: &'a str,
}

/// Builds the archive and writes it to `out`; returns its size in bytes.
pub fn build(contents: &Contents<'_>, out: &Path) -> Result<u64, String> {
    let mut archive = Archive::new();
    for dir in [
        "/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc", "/var",
    ] {
        archive.directory(dir);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    archive.char_device("/dev/console", 5, 1);
    archive.symlink("/var/run", "../run");

    archive.file("/bin/busybox", 0o755, &read(contents.busybox)?);
    // Applets are linked at boot with `busybox --install -s`; sh is needed to run /init itself.
    archive.symlink("/bin/sh", "busybox");

    // Guest path of each library → where its bytes come from.
    let mut libraries: BTreeMap<String, PathBuf> = BTreeMap::new();
    for program in contents.programs {
        match program.root {
            None => {
                archive.file(program.guest, 0o755, &stripped(program.host)?);
                for library in shared_libraries(program.host)? {
                    libraries
                        .entry(library.clone())
                        .or_insert_with(|| PathBuf::from(library));
                }
            }
            Some(root) => {
                let inside = program.host.strip_prefix("/").unwrap_or(program.host);
                archive.file(program.guest, 0o755, &stripped(&root.join(inside))?);
                for library in root_shared_libraries(root, program.host)? {
                    let source = root.join(library.trim_start_matches('/'));
                    libraries.insert(library, source);
                }
            }
        }
    }
    for (library, source) in &libraries {
        archive.file(library, 0o755, &read(source)?);
    }

    let modules_dir = format!("/lib/modules/{}", contents.kernel.release);
    for module in contents.modules {
        let guest = format!("{modules_dir}/{}", module.display());
        archive.file(&guest, 0o644, &read(&contents.kernel.modules.join(module))?);
    }

    // qemu-ga's guest-get-osinfo reads os-release; say plainly what this system is.
    archive.file(
        "/etc/os-release",
        0o644,
        b"NAME=\"vmsdk vm-test initramfs\"\nID=vmsdk-vm-test\nPRETTY_NAME=\"vmsdk vm-test initramfs\"\nVERSION_ID=1\n",
    );
    archive.file("/etc/hostname", 0o644, b"vmsdk-vm-test\n");
    // qemu-ga runs /sbin/shutdown for guest-shutdown; busybox has no `shutdown` applet, and
    // `poweroff` without -f would only signal init (a shell script here), so power off directly.
    let shutdown =
        b"#!/bin/sh\necho \"VMSDK-STAGE shutdown $*\"\nsync\nexec /bin/busybox poweroff -f\n";
    archive.file("/sbin/shutdown", 0o755, shutdown);
    archive.file("/init", 0o755, contents.init_script.as_bytes());

    let mut file = fs::File::create(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    archive
        .finish(&mut file)
        .map_err(|e| format!("write {}: {e}", out.display()))?;
    fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| format!("stat {}: {e}", out.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// The program without its debug information (a debug build is ten times larger, and every byte
/// of the initramfs is copied by an emulated CPU), or as it is when `strip` is missing.
fn stripped(path: &Path) -> Result<Vec<u8>, String> {
    let out = std::env::temp_dir().join(format!(
        "vmsdk-vm-test-strip-{}-{}",
        std::process::id(),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("bin")
    ));
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status();
    let bytes = match status {
        Ok(status) if status.success() => read(&out),
        _ => read(path),
    };
    let _ = fs::remove_file(&out);
    bytes
}

/// The shared libraries `ldd` says the program loads, with the dynamic loader, as the absolute
/// paths they have on this machine (the guest gets them at the same paths).
fn shared_libraries(program: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("could not run ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        return if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            Ok(Vec::new())
        } else {
            Err(format!(
                "ldd {} failed: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        };
    }
    parse_ldd(&text).map_err(|line| format!("{}: library {line}", program.display()))
}

/// [`shared_libraries`] of a program in a Debian root, as the root's dynamic loader resolves
/// them there (`ld.so --list`, run in the root).
fn root_shared_libraries(root: &Path, program: &Path) -> Result<Vec<String>, String> {
    let program = program.to_string_lossy();
    let out =
        crate::peer_root::in_root(root, &["/lib64/ld-linux-x86-64.so.2", "--list", &program])?;
    if !out.status.success() {
        return Err(format!(
            "ld.so --list {program} in {} failed: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .map_err(|line| format!("{program} in {}: library {line}", root.display()))
}

/// The absolute paths in `ldd` output, or the first line naming a library that is not found.
fn parse_ldd(text: &str) -> Result<Vec<String>, String> {
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(line.to_owned());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)";
        // the vDSO has no path.
        let path = line
            .split_once("=> ")
            .map_or(line, |(_, rest)| rest)
            .split(" (")
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libraries.push(path.to_owned());
        }
    }
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libglib-2.0.so.0",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let text = "\tlibfoo.so.1 => not found\n";
        assert_eq!(parse_ldd(text).unwrap_err(), "libfoo.so.1 => not found");
    }
}
