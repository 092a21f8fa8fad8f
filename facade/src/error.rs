//! The facade's error type.

use std::path::PathBuf;

/// What can go wrong when the facade picks or opens a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest statistics backend failed.
    #[error(transparent)]
    GuestStats(#[from] guest_stats::Error),
    /// This machine has no guest statistics backend in this build.
    #[error("no guest statistics backend for {what}: {why}")]
    NoStatsBackend {
        /// What was detected ("bare metal", "vmware", ...).
        what: String,
        /// Why nothing fits and what to do about it.
        why: String,
    },
    /// `VMSDK_BACKEND` or `--backend` holds a word that names no backend.
    #[error("unknown backend `{0}` (expected `auto` or `fake`)")]
    UnknownBackend(String),
    /// A fixture tree's CPUID recording could not be read.
    #[error("cannot read the CPUID recording under {root}: {source}")]
    CpuidRecording {
        /// The root whose `cpuid` file is broken.
        root: PathBuf,
        /// What was wrong.
        source: crate::detect::ParseCpuidError,
    },
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
