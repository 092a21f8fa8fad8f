//! The guest kernel: Debian's own `linux-image-*-amd64`, fetched with apt and unpacked with
//! `dpkg -x` into the cache (never installed on this machine), and its module dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::{run_checked, Phase};

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// The kernel release (`6.1.0-56-amd64`), as `uname -r` prints it in the guest.
    pub release: String,
    /// The bootable image.
    pub image: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// Marks a cache directory whose unpacking finished, so an interrupted run is redone.
const COMPLETE: &str = ".vmsdk-complete";

/// Returns the cached kernel, or downloads and unpacks the one `linux-image-amd64` points at.
pub fn fetch(cache: &Path) -> Result<Kernel, String> {
    let phase = Phase::start("kernel");
    let kernels = cache.join("kernel");
    if let Some(kernel) = cached(&kernels)? {
        phase.done(&format!("cached {}", kernel.release));
        return Ok(kernel);
    }
    let package = versioned_image_package()?;
    let download = cache.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).map_err(|e| format!("create {}: {e}", download.display()))?;
    run_checked(
        std::process::Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&download),
        "apt-get download",
    )?;
    let deb = fs::read_dir(&download)
        .map_err(|e| format!("read {}: {e}", download.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb behind"))?;
    let target = kernels.join(&package);
    let _ = fs::remove_dir_all(&target);
    fs::create_dir_all(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
    run_checked(
        std::process::Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(&target),
        "dpkg -x",
    )?;
    // Only the vmlinuz and the modules are kept; the .deb itself is 70 MB of cache we never reuse.
    let _ = fs::remove_dir_all(&download);
    fs::write(target.join(COMPLETE), package.as_bytes())
        .map_err(|e| format!("write the cache marker: {e}"))?;
    let kernel = unpacked(&target)?;
    phase.done(&format!("downloaded {}", kernel.release));
    Ok(kernel)
}

fn cached(kernels: &Path) -> Result<Option<Kernel>, String> {
    let Ok(entries) = fs::read_dir(kernels) else {
        return Ok(None);
    };
    let mut complete: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|dir| dir.join(COMPLETE).exists())
        .collect();
    complete.sort();
    match complete.pop() {
        Some(dir) => unpacked(&dir).map(Some),
        None => Ok(None),
    }
}

/// `linux-image-amd64` is a metapackage; the image itself is the versioned package it depends on.
fn versioned_image_package() -> Result<String, String> {
    let depends = |()| -> Result<Option<String>, String> {
        let out = std::process::Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .map_err(|e| format!("could not run apt-cache (a Debian machine is needed): {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .map(str::trim)
            .find(|name| name.starts_with("linux-image-") && name.ends_with("-amd64"))
            .map(str::to_owned))
    };
    if let Some(name) = depends(())? {
        return Ok(name);
    }
    // A fresh machine may have no package lists yet.
    run_checked(
        std::process::Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    depends(())?
        .ok_or_else(|| "apt-cache knows no versioned package behind linux-image-amd64".to_owned())
}

fn unpacked(dir: &Path) -> Result<Kernel, String> {
    let boot = dir.join("boot");
    let image = fs::read_dir(&boot)
        .map_err(|e| format!("read {}: {e}", boot.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = image
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules = dir.join("lib/modules").join(&release);
    if !modules.is_dir() {
        return Err(format!("no modules directory {}", modules.display()));
    }
    Ok(Kernel {
        release,
        image,
        modules,
    })
}

/// Everything the guest must `insmod` to have `wanted`, dependencies first, as paths relative
/// to the modules directory. Modules built into the kernel are left out.
///
/// The Debian package ships no `modules.dep` (depmod runs at install time), so the dependencies
/// come from each module's own `.modinfo` section.
pub fn module_load_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<PathBuf>, String> {
    let mut index = BTreeMap::new();
    index_modules(&kernel.modules.join("kernel"), &kernel.modules, &mut index)?;
    let context = Modules {
        base: &kernel.modules,
        index: &index,
        builtin: &builtin_names(&kernel.modules),
    };
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        context.visit(&module_name(name), &mut seen, &mut order)?;
    }
    Ok(order)
}

fn builtin_names(modules: &Path) -> BTreeSet<String> {
    fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .map(|file| module_name(file.trim_end_matches(".ko")))
        .collect()
}

struct Modules<'a> {
    base: &'a Path,
    index: &'a BTreeMap<String, PathBuf>,
    builtin: &'a BTreeSet<String>,
}

impl Modules<'_> {
    /// Depth-first: every dependency lands in `order` before the module that needs it.
    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), String> {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let relative = self
            .index
            .get(name)
            .ok_or_else(|| format!("kernel module `{name}` is neither built in nor shipped"))?;
        let bytes =
            fs::read(self.base.join(relative)).map_err(|e| format!("read module {name}: {e}"))?;
        for dependency in modinfo(&bytes, "depends") {
            for dep in dependency.split(',').filter(|d| !d.is_empty()) {
                self.visit(&module_name(dep), seen, order)?;
            }
        }
        order.push(relative.clone());
        Ok(())
    }
}

fn index_modules(
    dir: &Path,
    base: &Path,
    index: &mut BTreeMap<String, PathBuf>,
) -> Result<(), String> {
    for entry in fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            index_modules(&path, base, index)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            let relative = path.strip_prefix(base).map_err(|e| e.to_string())?;
            index.insert(module_name(stem), relative.to_path_buf());
        }
    }
    Ok(())
}

/// Module names use `_` where file names may use `-`.
fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The values of `key` in the `.modinfo` section of an ELF64 little-endian module.
fn modinfo(elf: &[u8], key: &str) -> Vec<String> {
    let section = elf_section(elf, ".modinfo").unwrap_or_default();
    let prefix = format!("{key}=");
    section
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    // ELF64 (class 2), little-endian (data 1).
    if elf.get(..4)? != b"\x7fELF" || elf.get(4)? != &2 || elf.get(5)? != &1 {
        return None;
    }
    let section_headers = u64_at(0x28)?;
    let entry_size = usize::from(u16_at(0x3A)?);
    let count = usize::from(u16_at(0x3C)?);
    let names_index = usize::from(u16_at(0x3E)?);
    let header = |i: usize| section_headers.checked_add(i.checked_mul(entry_size)?);
    let body = |at: usize| -> Option<&'a [u8]> {
        let offset = u64_at(at + 24)?;
        let size = u64_at(at + 32)?;
        elf.get(offset..offset.checked_add(size)?)
    };
    let names = body(header(names_index)?)?;
    (0..count).find_map(|i| {
        let at = header(i)?;
        let name_offset = usize::try_from(u32_at(at)?).ok()?;
        let name = names.get(name_offset..)?.split(|&b| b == 0).next()?;
        (name == wanted.as_bytes()).then(|| body(at)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_elf_module() {
        assert!(modinfo(b"not an elf at all", "depends").is_empty());
        assert!(modinfo(b"\x7fELF\x02\x01", "depends").is_empty());
        assert!(modinfo(&[], "depends").is_empty());
    }

    #[test]
    fn module_names_use_underscores() {
        assert_eq!(module_name("virtio-pci"), "virtio_pci");
    }
}
