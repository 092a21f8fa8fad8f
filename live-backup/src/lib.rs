//! Live backups of running VMs: VDDK's access lifecycle — a point in time for every disk at
//! once, read while the guest keeps running, ended cleanly, cleaned up after a crash — for
//! QEMU over QMP and NBD, and for your unit tests in memory; written as qcow2 chains that
//! every QEMU tool reads.
//!
//! ```text
//! BackupSource ──begin(checkpoint, since, disks)──▶ BackupSession ──open(disk)──▶ Disk (point in time)
//!  (qemu::QemuSource, fake::FakeVm)                 (finish / abort / drop)        dirty_extents since the
//!                                                                                 previous checkpoint
//! BackupDir::create(source) ── per disk: vda.1.qcow2 ◀── vda.2.qcow2 ◀── …  + manifest.json
//! BackupDir::verify, BackupDir::restore(disk, point, destination)
//! ```
//!
//! # Example: a backup program, unit-tested against the fake VM
//!
//! ```
//! use live_backup::fake::FakeVm;
//! use live_backup::{BackupDir, BackupOptions, BackupSource};
//!
//! /// The code under test: one backup of `vm` into `dir`, full or incremental.
//! fn nightly(vm: &mut dyn BackupSource, dir: &BackupDir) -> live_backup::Result<u32> {
//!     let report = dir.create(vm, None, &BackupOptions::new().full_if_needed(true), &mut |_| {})?;
//!     Ok(report.point.number)
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tmp = tempfile::tempdir()?;
//! let dir = BackupDir::new(tmp.path().join("web-1"));
//! let vm = FakeVm::new("web-1").with_disk("vda", 8 << 20);
//! vm.guest_write("vda", 0, b"first")?;
//! assert_eq!(nightly(&mut vm.clone(), &dir)?, 1); // full
//! vm.guest_write("vda", 4 << 20, b"second")?;
//! assert_eq!(nightly(&mut vm.clone(), &dir)?, 2); // incremental: what changed since point 1
//!
//! // Point 1 restores to the disk as it was then.
//! let restored = tmp.path().join("vda-at-1.img");
//! dir.restore(None, Some(1), restored.to_str().unwrap(), &Default::default(), &mut |_| {})?;
//! let bytes = std::fs::read(&restored)?;
//! assert_eq!(&bytes[..5], b"first");
//! assert_eq!(&bytes[4 << 20..(4 << 20) + 6], &[0u8; 6]);
//! dir.verify(&mut |_| {})?;
//! # Ok(())
//! # }
//! ```
//!
//! # The parts
//!
//! - [`BackupSource`] and [`BackupSession`]: the lifecycle, with a table of how VDDK, QEMU
//!   and a future VMware implementation map onto it.
//! - [`fake::FakeVm`]: disks in memory, guest writes and faults injected.
//! - [`BackupDir`]: the output side. Per disk a qcow2 chain (`NODE.1.qcow2` full, then
//!   `NODE.2.qcow2` backed by it, ...), and `manifest.json` (the VM, the disks, every point's
//!   checkpoint, times, sizes, consistency and block hash), with every point's block digests
//!   beside its image (`NODE.N.blkdigests`: the next incremental point is hashed from the
//!   blocks it copies, never by reading the chain back). Files 0600, directories 0700;
//!   images are written as `.NAME.part` and renamed, the manifest replaced atomically, so a
//!   failed backup leaves the previous chain and manifest as they were.
//! - [`Quiesce`]: the guest's filesystems frozen around the checkpoint moment only and thawed
//!   on every path ([`quiesce::AgentQuiesce`] through the QEMU guest agent).
//!
//! # Checkpoints
//!
//! Checkpoints are named `vmsdk-CHAIN-POINT` ([`CHECKPOINT_PREFIX`]): the chain is a random
//! name kept in the manifest, so two backup directories of one VM never take each other's.
//! An incremental backup needs the chain's last checkpoint present, recording, persistent
//! and consistent on every disk; otherwise it fails with
//! [`Error::IncrementalImpossible`] saying why, or, with
//! [`BackupOptions::full_if_needed`], takes a full backup and records the reason. The old
//! checkpoint is removed only after the new point is stored; this chain's stale checkpoints
//! (of a backup killed half-way) are removed at the start of the next backup.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dir;
mod error;
pub mod fake;
pub mod manifest;
#[cfg(feature = "qemu")]
#[cfg_attr(docsrs, doc(cfg(feature = "qemu")))]
pub mod qemu;
pub mod quiesce;
mod source;

pub use dir::{
    BackupDir, BackupOptions, BackupReport, Progress, RestoreReport, VerifiedPoint,
    DEFAULT_BLKHASH, LOCK_FILE,
};
pub use error::{Error, Result};
pub use manifest::{Manifest, Point, PointDisk, PointKind};
pub use quiesce::{FreezeWindow, Quiesce};
pub use source::{
    BackupSession, BackupSource, BeginRequest, Checkpoint, CheckpointDisk, CleanupReport,
    Consistency, SessionDisk, SourceDisk, VmIdentity, CHECKPOINT_PREFIX,
};
