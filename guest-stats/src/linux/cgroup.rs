//! Where this process's cgroups are, and the CPU and memory limits that apply to them.
//!
//! Both hierarchies are read: cgroup v2 (`memory.max`, `memory.min`, `cpu.max`, `cpu.weight`)
//! and, on hybrid or legacy systems, cgroup v1 (`memory.limit_in_bytes`, `cpu.cfs_quota_us`,
//! `cpu.cfs_period_us`, `cpu.shares`). A limit applies when it is set on the process's cgroup
//! or any ancestor; the effective one is the smallest.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    pub hierarchy: u32,
    pub controllers: Vec<String>,
    pub path: String,
}

pub(crate) fn parse_memberships(text: &str) -> Result<Vec<Membership>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "line {}: expected `id:controllers:path`",
                    index + 1
                ));
            };
            let hierarchy = id
                .parse()
                .map_err(|_| format!("line {}: hierarchy id `{id}` is not a number", index + 1))?;
            if !path.starts_with('/') {
                return Err(format!("line {}: path `{path}` is not absolute", index + 1));
            }
            Ok(Membership {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A cgroup filesystem mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// `true` for cgroup2.
    pub unified: bool,
    /// The part of the hierarchy that is mounted (not `/` inside a cgroup namespace or a bind
    /// mount).
    pub root: String,
    pub mount_point: String,
    /// The v1 controllers of this mount (empty for cgroup2).
    pub controllers: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && bytes.len() - index >= 4 {
            let digits = &bytes[index + 1..index + 4];
            if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    index += 4;
                    continue;
                }
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_cgroup_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ');
            let root = unescape(fields.nth(3)?);
            let mount_point = unescape(fields.next()?);
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let _source = after.next()?;
            let options = after.next().unwrap_or_default();
            let unified = match fs_type {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if unified {
                Vec::new()
            } else {
                options
                    .split(',')
                    .filter(|option| matches!(*option, "cpu" | "cpuacct" | "memory"))
                    .map(str::to_owned)
                    .collect()
            };
            Some(CgroupMount {
                unified,
                root,
                mount_point,
                controllers,
            })
        })
        .collect()
}

/// The directories of the cgroup that holds `controller`, from the process's own cgroup up to
/// the mount point, for each hierarchy that has the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupChain {
    pub unified: bool,
    /// Leaf first, the mount point (the hierarchy's visible root) last.
    pub dirs: Vec<PathBuf>,
}

impl CgroupChain {
    /// Whether the process sits in the root of the visible hierarchy (where no limits can be
    /// set).
    pub fn is_root(&self) -> bool {
        self.dirs.len() <= 1
    }
}

pub(crate) fn chains(
    fs_root: &Path,
    memberships: &[Membership],
    mounts: &[CgroupMount],
    controller: &str,
) -> Vec<CgroupChain> {
    let mut result = Vec::new();
    for membership in memberships {
        let unified = membership.hierarchy == 0 && membership.controllers.is_empty();
        let Some(mount) = mounts.iter().find(|mount| {
            mount.unified == unified
                && (unified || mount.controllers.iter().any(|c| c == controller))
                && (unified || membership.controllers.iter().any(|c| c == controller))
        }) else {
            continue;
        };
        let relative = if mount.root == "/" {
            membership.path.as_str()
        } else {
            match membership.path.strip_prefix(mount.root.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                // The process's cgroup is outside the mounted part: nothing to read.
                _ => continue,
            }
        };
        let base = fs_root.join(mount.mount_point.trim_start_matches('/'));
        let components: Vec<&str> = relative
            .split('/')
            .filter(|c| !c.is_empty() && *c != "." && *c != "..")
            .collect();
        let dirs = (0..=components.len())
            .rev()
            .map(|depth| {
                components[..depth]
                    .iter()
                    .fold(base.clone(), |dir, component| dir.join(component))
            })
            .collect();
        result.push(CgroupChain { unified, dirs });
    }
    result
}

/// Bytes at or above this are "no limit" in cgroup v1 (the kernel prints its page counter
/// maximum, e.g. 9223372036854771712).
pub(crate) const V1_UNLIMITED_BYTES: u64 = 1 << 62;

/// `cpu.max` (v2): `max PERIOD` or `QUOTA PERIOD` → the CPU count, or `None` for no limit.
pub(crate) fn parse_cpu_max(text: &str) -> Result<Option<f64>, String> {
    let mut fields = text.split_ascii_whitespace();
    let quota = fields.next().ok_or("empty cpu.max")?;
    let period: u64 = match fields.next() {
        Some(period) => period
            .parse()
            .map_err(|_| format!("period `{period}` is not a number"))?,
        None => 100_000,
    };
    if quota == "max" {
        return Ok(None);
    }
    let quota: u64 = quota
        .parse()
        .map_err(|_| format!("quota `{quota}` is not a number"))?;
    if period == 0 {
        return Err("period is 0".to_owned());
    }
    Ok(Some(quota as f64 / period as f64))
}

/// `memory.max`/`memory.min` (v2): `max` or bytes.
pub(crate) fn parse_memory_max(text: &str) -> Result<Option<u64>, String> {
    let trimmed = text.trim();
    if trimmed == "max" {
        return Ok(None);
    }
    trimmed
        .parse()
        .map(Some)
        .map_err(|_| format!("`{trimmed}` is neither `max` nor a byte count"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hierarchy_resolves_each_controller() {
        let memberships = parse_memberships("4:memory:/process_api/abc\n1:cpu:/\n0::/\n").unwrap();
        let mounts = parse_cgroup_mounts(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 3);
        let memory = chains(Path::new("/r"), &memberships, &mounts, "memory");
        assert_eq!(memory.len(), 2);
        assert!(!memory[0].unified);
        assert_eq!(
            memory[0].dirs,
            [
                PathBuf::from("/r/sys/fs/cgroup/memory/process_api/abc"),
                PathBuf::from("/r/sys/fs/cgroup/memory/process_api"),
                PathBuf::from("/r/sys/fs/cgroup/memory"),
            ]
        );
        assert!(memory[1].unified && memory[1].is_root());
        let cpu = chains(Path::new("/"), &memberships, &mounts, "cpu");
        assert_eq!(cpu[0].dirs, [PathBuf::from("/sys/fs/cgroup/cpu")]);
    }

    #[test]
    fn namespaced_mount_root_is_stripped_and_escapes_decoded() {
        let mounts = parse_cgroup_mounts(
            "50 40 0:40 /kubepods/pod1 /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(mounts[0].mount_point, "/sys/fs/cgroup x");
        let inside = parse_memberships("0::/kubepods/pod1/ctr\n").unwrap();
        let chain = &chains(Path::new("/"), &inside, &mounts, "memory")[0];
        assert_eq!(chain.dirs[0], PathBuf::from("/sys/fs/cgroup x/ctr"));
        let outside = parse_memberships("0::/other\n").unwrap();
        assert!(chains(Path::new("/"), &outside, &mounts, "memory").is_empty());
    }

    #[test]
    fn limit_files() {
        assert_eq!(parse_cpu_max("max 100000\n").unwrap(), None);
        assert_eq!(parse_cpu_max("150000 100000\n").unwrap(), Some(1.5));
        assert!(parse_cpu_max("1 0").is_err());
        assert!(parse_cpu_max("").is_err());
        assert_eq!(parse_memory_max("max\n").unwrap(), None);
        assert_eq!(parse_memory_max("1073741824\n").unwrap(), Some(1 << 30));
        assert!(parse_memory_max("lots").is_err());
        assert!(parse_memberships("garbage").is_err());
        assert!(parse_memberships("0::relative").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC*") {
            let _ = parse_memberships(&text);
            let mounts = parse_cgroup_mounts(&text);
            let memberships = parse_memberships(&text).unwrap_or_default();
            let _ = chains(Path::new("/"), &memberships, &mounts, "memory");
            let _ = parse_cpu_max(&text);
            let _ = parse_memory_max(&text);
            let _ = unescape(&text);
        }
    }
}
