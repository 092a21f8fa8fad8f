//! The manifest of a backup directory: which VM, which disks, which points, and the block
//! hash of every point, as JSON (`manifest.json`).
//!
//! It is written atomically (a temporary file, fsync, rename, fsync of the directory), last,
//! after every file of a new point: a backup that fails at any moment leaves the previous
//! manifest, and the chain it describes, as they were.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::source::{Consistency, VmIdentity, CHECKPOINT_PREFIX};
use crate::{Error, Result};

/// The manifest's file name inside a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The format version this crate writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// The largest manifest read: a chain of thousands of points of dozens of disks is far below.
pub const MAX_MANIFEST_SIZE: u64 = 16 << 20;

/// Whether a point holds every byte of the disk or only what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PointKind {
    /// A full copy: a qcow2 image without a backing file.
    Full,
    /// What changed since the previous point: a qcow2 overlay on the previous point's image.
    Incremental,
}

/// One disk of one point.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PointDisk {
    /// The disk's node name on the source.
    pub node: String,
    /// Its size in bytes.
    pub size: u64,
    /// The qcow2 image of this point, relative to the backup directory.
    pub file: String,
    /// The image it is an overlay of (the previous point's), for incremental points.
    pub backing: Option<String>,
    /// Bytes read from the VM and written.
    pub bytes_copied: u64,
    /// The image file's size on disk.
    pub file_size: u64,
    /// The block hash of the disk at this point: `SPEC:HEX` with a spec in nbdcopy's
    /// `--blkhash` form (`blake3/64k:3f5a…` by default; for `sha256/64k:…` and the other specs
    /// nbdcopy knows, `nbdcopy --blkhash=SPEC` of a restored disk prints the same HEX). A full point hashes what it read from the VM; an incremental one hashes the blocks
    /// it copied on top of the previous point's [`block_digests`](Self::block_digests) (or,
    /// without them, reads its chain back), unless the backup was told not to
    /// (`BackupOptions::hash_incrementals(false)`): then `None`.
    #[serde(default)]
    pub blkhash: Option<String>,
    /// The file beside the image holding every block's digest of this point
    /// (`NODE.N.blkdigests`, [`BlockDigests`](disk_transport::blkhash::BlockDigests)'s
    /// stored form), from which the next incremental point's hash is computed with the
    /// changed blocks only. `None` when the point has no hash, or for chains written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_digests: Option<String>,
}

/// One point of the chain: the disks at one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Point {
    /// Its number: 1 is the first (full) backup.
    pub number: u32,
    /// Full or incremental.
    pub kind: PointKind,
    /// The checkpoint taken at this point (still on the VM for the chain's last point).
    pub checkpoint: String,
    /// The checkpoint an incremental point holds the changes since.
    pub since: Option<String>,
    /// When the backup started, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it was complete, milliseconds since the Unix epoch.
    pub finished_ms: u64,
    /// Crash- or application-consistent.
    pub consistency: Consistency,
    /// Why a full backup was taken where an incremental one was asked for.
    pub full_reason: Option<String>,
    /// What went less well than asked.
    pub warnings: Vec<String>,
    /// The disks.
    pub disks: Vec<PointDisk>,
}

impl Point {
    /// The disk `node` of this point.
    pub fn disk(&self, node: &str) -> Option<&PointDisk> {
        self.disks.iter().find(|d| d.node == node)
    }
}

/// A backup directory's manifest; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// A random name of this chain, part of every checkpoint name
    /// (`vmsdk-CHAIN-POINT`), so two backup directories of one VM never take each other's
    /// checkpoints.
    pub chain: String,
    /// The VM.
    pub vm: VmIdentity,
    /// The points, oldest first.
    pub points: Vec<Point>,
}

/// Splits a recorded block hash `SPEC:HEX` into the spec and the lowercase hex digest.
pub fn parse_blkhash(text: &str) -> Option<(disk_transport::blkhash::BlkhashSpec, &str)> {
    let (spec, hex) = text.split_once(':')?;
    let spec: disk_transport::blkhash::BlkhashSpec = spec.parse().ok()?;
    let valid = hex.len() == 2 * spec.algorithm.digest_len()
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then_some((spec, hex))
}

/// The text [`parse_blkhash`] reads.
pub fn format_blkhash(hash: &disk_transport::blkhash::Blkhash) -> String {
    format!("{}:{}", hash.spec(), hash.hex())
}

fn problem(path: &Path, problem: impl Into<String>) -> Error {
    Error::Manifest {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Whether `name` is a plain file name inside the directory: no separator, no `..`, no
/// leading dot, nothing a shell or a qcow2 header would misread.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Manifest {
    /// A manifest of a new chain without points.
    pub fn new(chain: impl Into<String>, vm: VmIdentity) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            chain: chain.into(),
            vm,
            points: Vec::new(),
        }
    }

    /// The last point.
    pub fn last(&self) -> Option<&Point> {
        self.points.last()
    }

    /// Point `number` (from 1).
    pub fn point(&self, number: u32) -> Option<&Point> {
        self.points.iter().find(|p| p.number == number)
    }

    /// The prefix of this chain's checkpoints: `vmsdk-CHAIN-`.
    pub fn checkpoint_prefix(&self) -> String {
        format!("{CHECKPOINT_PREFIX}{}-", self.chain)
    }

    /// Parses and checks a manifest read from `path` (named in errors): JSON of this format,
    /// points numbered 1, 2, ... starting with a full one, file names inside the directory,
    /// every overlay's backing file the previous point's image of the same disk, checkpoint
    /// names of this chain.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(problem(
                path,
                format!("larger than {MAX_MANIFEST_SIZE} bytes"),
            ));
        }
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| problem(path, format!("not a backup manifest: {e}")))?;
        manifest.check().map_err(|p| problem(path, p))?;
        Ok(manifest)
    }

    /// The checks of [`parse`](Self::parse).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "format version {} (this vmsdk reads {MANIFEST_VERSION})",
                self.version
            ));
        }
        if !is_plain_file_name(&self.chain) {
            return Err(format!("chain name {:?} is not a plain name", self.chain));
        }
        let prefix = self.checkpoint_prefix();
        for (i, point) in self.points.iter().enumerate() {
            let expected = i as u64 + 1;
            if u64::from(point.number) != expected {
                return Err(format!(
                    "point {} where point {expected} belongs",
                    point.number
                ));
            }
            if !point.checkpoint.starts_with(&prefix) {
                return Err(format!(
                    "point {}: checkpoint {:?} is not of this chain ({prefix}...)",
                    point.number, point.checkpoint
                ));
            }
            if point.disks.is_empty() {
                return Err(format!("point {} has no disks", point.number));
            }
            let previous = i.checked_sub(1).map(|j| &self.points[j]);
            match (point.kind, previous) {
                (PointKind::Incremental, None) => {
                    return Err("the first point is incremental".into());
                }
                (PointKind::Incremental, Some(prev)) => {
                    if point.since.as_deref() != Some(prev.checkpoint.as_str()) {
                        return Err(format!(
                            "point {} is not the changes since point {}'s checkpoint",
                            point.number, prev.number
                        ));
                    }
                }
                (PointKind::Full, _) => {}
            }
            for (k, disk) in point.disks.iter().enumerate() {
                if point.disks[..k].iter().any(|d| d.node == disk.node) {
                    return Err(format!(
                        "point {} lists disk {} twice",
                        point.number, disk.node
                    ));
                }
                if !is_plain_file_name(&disk.file) {
                    return Err(format!(
                        "point {}: file {:?} is not a plain file name in the directory",
                        point.number, disk.file
                    ));
                }
                if let Some(name) = &disk.block_digests {
                    if !is_plain_file_name(name) || disk.blkhash.is_none() {
                        return Err(format!(
                            "point {}: block digests {name:?} are not a plain file name in \
                             the directory beside a recorded hash",
                            point.number
                        ));
                    }
                }
                let want_backing = match (point.kind, previous) {
                    (PointKind::Incremental, Some(prev)) => {
                        let prev_disk = prev.disk(&disk.node).ok_or_else(|| {
                            format!(
                                "point {}: disk {} is not in point {}",
                                point.number, disk.node, prev.number
                            )
                        })?;
                        if prev_disk.size != disk.size {
                            return Err(format!(
                                "point {}: disk {} changed size in an incremental point",
                                point.number, disk.node
                            ));
                        }
                        Some(prev_disk.file.as_str())
                    }
                    _ => None,
                };
                if disk.backing.as_deref() != want_backing {
                    return Err(format!(
                        "point {}: disk {} has backing {:?}, expected {:?}",
                        point.number, disk.node, disk.backing, want_backing
                    ));
                }
                if point.kind == PointKind::Full && disk.blkhash.is_none() {
                    return Err(format!(
                        "point {}: disk {}: a full point without its block hash",
                        point.number, disk.node
                    ));
                }
                if disk
                    .blkhash
                    .as_deref()
                    .is_some_and(|h| parse_blkhash(h).is_none())
                {
                    return Err(format!(
                        "point {}: disk {}: block hash {:?} is not SPEC:HEX (sha256/64k:...)",
                        point.number, disk.node, disk.blkhash
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads `dir`'s manifest; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("read", &path, e))?;
        Self::parse(&bytes, &path).map(Some)
    }

    /// Writes the manifest into `dir` atomically: a temporary file (0600), fsync, rename over
    /// `manifest.json`, fsync of the directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.check()
            .map_err(|p| problem(&dir.join(MANIFEST_FILE), p))?;
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| problem(&dir.join(MANIFEST_FILE), e.to_string()))?;
        text.push(b'\n');
        write_atomically(dir, MANIFEST_FILE, &text)
    }
}

/// Creates `dir/name` with `bytes` atomically: `.name.tmp` (0600) written and fsynced,
/// renamed over `name`, the directory fsynced.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut file = create_private(&tmp)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename into place", &path, e))?;
    sync_dir(dir)
}

/// Creates (or truncates) `path` readable and writable by its owner only.
pub(crate) fn create_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    set_private(path, 0o600)?;
    Ok(file)
}

/// Sets `path`'s permission bits to `mode` (an existing file keeps its mode on open).
pub(crate) fn set_private(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("set the permissions of", path, e))
}

/// Makes renames and creations in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// `dir` created 0700 with its parents when missing; an existing directory gets 0700 too.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("create directory", dir, e))?;
    }
    set_private(dir, 0o700)?;
    Ok(dir.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        let disk = |file: &str, backing: Option<&str>| PointDisk {
            node: "vda".into(),
            size: 1 << 20,
            file: file.into(),
            backing: backing.map(Into::into),
            bytes_copied: 65536,
            file_size: 327680,
            blkhash: Some(format!("sha256/64k:{}", "0f".repeat(32))),
            block_digests: Some(file.replace(".qcow2", ".blkdigests")),
        };
        let point = |n: u32, kind, since: Option<&str>, d| Point {
            number: n,
            kind,
            checkpoint: format!("vmsdk-c0ffee-{n}"),
            since: since.map(Into::into),
            started_ms: 1,
            finished_ms: 2,
            consistency: Consistency::Crash,
            full_reason: None,
            warnings: vec![],
            disks: vec![d],
        };
        Manifest {
            version: MANIFEST_VERSION,
            chain: "c0ffee".into(),
            vm: VmIdentity {
                name: Some("vm".into()),
                uuid: None,
                hypervisor: "fake".into(),
            },
            points: vec![
                point(1, PointKind::Full, None, disk("vda.1.qcow2", None)),
                point(
                    2,
                    PointKind::Incremental,
                    Some("vmsdk-c0ffee-1"),
                    disk("vda.2.qcow2", Some("vda.1.qcow2")),
                ),
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_broken_chains() {
        let m = sample();
        let text = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&text, Path::new("m.json")).unwrap(), m);

        let broken = |f: &dyn Fn(&mut Manifest)| {
            let mut m = sample();
            f(&mut m);
            let text = serde_json::to_vec(&m).unwrap();
            Manifest::parse(&text, Path::new("m.json"))
                .unwrap_err()
                .to_string()
        };
        assert!(broken(&|m| m.points[1].number = 3).contains("point 3 where point 2"));
        assert!(broken(&|m| m.points[0].kind = PointKind::Incremental).contains("incremental"));
        assert!(
            broken(&|m| m.points[1].disks[0].file = "../etc/passwd".into())
                .contains("plain file name")
        );
        assert!(
            broken(&|m| m.points[1].disks[0].backing = Some("other.qcow2".into()))
                .contains("backing")
        );
        assert!(broken(&|m| m.points[1].since = None).contains("changes since"));
        assert!(
            broken(&|m| m.points[1].disks[0].block_digests = Some("../vda.blkdigests".into()))
                .contains("block digests")
        );
        assert!(
            broken(&|m| m.points[0].checkpoint = "libvirt-1".into()).contains("not of this chain")
        );
        assert!(broken(&|m| m.version = 9).contains("format version 9"));
        assert!(broken(&|m| m.points[1].disks[0].size = 5).contains("changed size"));
        let e = Manifest::parse(b"{\"version\":1", Path::new("m.json")).unwrap_err();
        assert!(e.to_string().contains("not a backup manifest"), "{e}");
    }

    #[test]
    fn written_atomically_and_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.write(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(MANIFEST_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(m));
        assert!(!dir.path().join(".manifest.json.tmp").exists());
        assert_eq!(Manifest::read(&dir.path().join("none")).unwrap(), None);
    }

    proptest! {
        /// Any bytes: a manifest or an error, never a panic.
        #[test]
        fn any_bytes_parse_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::parse(&bytes, Path::new("m.json"));
        }

        /// Mutations of a valid manifest's text: accepted only if the checks hold.
        #[test]
        fn mutated_manifests_are_checked(pos in 0usize..2000, byte in any::<u8>()) {
            let mut text = serde_json::to_vec(&sample()).unwrap();
            let i = pos % text.len();
            text[i] = byte;
            if let Ok(m) = Manifest::parse(&text, Path::new("m.json")) {
                prop_assert!(m.check().is_ok());
            }
        }
    }
}
