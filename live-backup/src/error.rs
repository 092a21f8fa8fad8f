//! The crate's one error type.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while backing up, verifying or restoring.
///
/// The layers below keep their own errors as sources: a disk or copy error
/// ([`disk_transport::Error`], with the NBD errno or VDDK code), a monitor error (QEMU's error
/// class and text), an agent error. Messages say what failed and, where there is one, what to
/// do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the VM's disk or writing the backup failed.
    #[error("{what}")]
    Disk {
        /// What was being done ("copy disk vda into vda.2.qcow2").
        what: String,
        /// The disk layer's error.
        #[source]
        source: disk_transport::Error,
    },
    /// A copy stopped; the report says how far it got.
    #[error("{what}")]
    Copy {
        /// What was being copied.
        what: String,
        /// The copy engine's error and report.
        #[source]
        source: disk_transport::copy::CopyError,
    },
    /// The hypervisor's control channel (QMP for QEMU) refused or failed a command.
    #[error("{command} failed: {message}")]
    Monitor {
        /// The command (`transaction`, `block-export-add`, ...).
        command: String,
        /// The hypervisor's own words (QEMU's error class and description).
        message: String,
    },
    /// A disk named in the request is not a disk of the VM.
    #[error("the VM has no disk {disk:?} (its disks: {})", known.join(", "))]
    NoSuchDisk {
        /// The name asked for.
        disk: String,
        /// The disks the VM has.
        known: Vec<String>,
    },
    /// An incremental backup cannot be taken: the chain's last checkpoint is missing, not
    /// recording or inconsistent on some disk, or the VM's disks changed. Take a full backup
    /// (`BackupOptions::full`), or let one be taken in its place
    /// (`BackupOptions::full_if_needed`).
    #[error("cannot take an incremental backup: {reason} (take a full backup with --full, or let one be taken when needed with --full-if-needed)")]
    IncrementalImpossible {
        /// Why not.
        reason: String,
    },
    /// A checkpoint to create exists already, or one to use does not.
    #[error("checkpoint {name:?}: {problem}")]
    Checkpoint {
        /// The checkpoint (dirty bitmap) name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The backup directory holds no backup, or not the one asked for.
    #[error("{}: {problem}", dir.display())]
    NoBackup {
        /// The backup directory.
        dir: PathBuf,
        /// What is missing.
        problem: String,
    },
    /// The manifest could not be read or does not describe a valid chain.
    #[error("manifest {}: {problem}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A backup file or directory could not be created, written, renamed or locked.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another backup of this directory is running (its lock is held): of a backup
    /// directory, or of the QEMU source's scratch directory, whose lock a running backup of
    /// the VM holds (`cleanup` then leaves everything alone).
    #[error("{} is in use by another backup (its lock file is held)", dir.display())]
    Busy {
        /// The backup or scratch directory.
        dir: PathBuf,
    },
    /// `verify` found a point whose files do not restore to the recorded hashes, or a file
    /// that fails its structural check.
    #[error("verification failed: {}", problems.join("; "))]
    Verify {
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The scratch filesystem of a live backup is (nearly) full: the point-in-time view
    /// needs room there for the old contents of every cluster the guest overwrites while the
    /// backup reads, and without it the guest's writes would fail (a VM whose disks stop on
    /// `ENOSPC` would pause). The backup gave its view up and failed; the chain is as it was.
    #[error("the scratch filesystem of {} {problem}; free space there or choose a larger scratch directory (--scratch-dir), then back up again", dir.display())]
    ScratchFull {
        /// The scratch directory.
        dir: PathBuf,
        /// What was found ("has 1048576 bytes free, below ...").
        problem: String,
    },
    /// The operation was cancelled (Ctrl-C); everything it made was torn down.
    #[error("cancelled")]
    Cancelled,
    /// The backup failed (`source` says why), and ending its session in the source failed
    /// too, as when QEMU was killed: what the backup made there (exports, jobs, scratch nodes
    /// and files, its checkpoint) may be left for `cleanup`, or the next backup, to remove once
    /// the source answers again. The chain is as it was.
    #[error("the backup failed and could not be ended in the hypervisor ({teardown}; cleanup removes what it left once the hypervisor answers)")]
    NotTornDown {
        /// Why the backup failed.
        #[source]
        source: Box<Error>,
        /// Why ending the session failed.
        teardown: String,
    },
    /// The backup source broke its contract (an answer that makes no sense).
    #[error("backup source: {0}")]
    Source(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn disk(what: impl Into<String>, source: disk_transport::Error) -> Self {
        match source {
            disk_transport::Error::Cancelled => Error::Cancelled,
            source => Error::Disk {
                what: what.into(),
                source,
            },
        }
    }

    pub(crate) fn copy(what: impl Into<String>, source: disk_transport::copy::CopyError) -> Self {
        if matches!(source.error, disk_transport::Error::Cancelled) {
            return Error::Cancelled;
        }
        Error::Copy {
            what: what.into(),
            source,
        }
    }

    /// Whether the error is a cancellation (torn down or not).
    pub fn is_cancelled(&self) -> bool {
        match self {
            Error::Cancelled => true,
            Error::NotTornDown { source, .. } => source.is_cancelled(),
            _ => false,
        }
    }

    /// `error`, unless ending the session after it failed too.
    pub(crate) fn after_abort(error: Error, abort: Result<()>) -> Self {
        match abort {
            Ok(()) => error,
            Err(teardown) => Error::NotTornDown {
                source: Box::new(error),
                teardown: teardown.to_string(),
            },
        }
    }
}
