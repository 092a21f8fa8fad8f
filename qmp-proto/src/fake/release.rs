//! The QEMU releases the fake monitor imitates, and what sets them apart on the wire.

use std::fmt;

/// A QEMU release the fake monitor can be built as ([`super::FakeMonitorBuilder::release`]).
///
/// What differs between the two, as captured from Debian's `qemu-system-x86_64` 7.2.22 and
/// 10.0.13 (the transcripts are in `qmp-proto/tests/fixtures/`):
///
/// | | 7.2 | 10.0 |
/// |---|---|---|
/// | `query-status` | `status`, `running`, `singlestep` | `status`, `running` (no `singlestep`) |
/// | `query-named-block-nodes` | no `active` | `active: true` on every node |
/// | `file` nodes' `image` | no `format-specific` | `format-specific: {type: file, data: {}}` |
/// | `query-blockstats` | | + `zone_append_*` counters, `failed_zone_append_operations` |
/// | balloon `guest-stats` | 10 statistics | + `stat-alloc-stalls`, `stat-direct-*`, `stat-async-*`, ... |
/// | machine type (`qom-get /machine type`) | `pc-i440fx-7.2-machine` | `pc-i440fx-10.0-machine` |
///
/// Error classes and texts of the commands the fake answers are the same in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum QemuRelease {
    /// QEMU 7.2 (Debian 12, `1:7.2+dfsg-7+deb12u18`).
    V7_2,
    /// QEMU 10.0 (Debian 13, `1:10.0.13+ds-0+deb13u1`).
    V10_0,
}

impl QemuRelease {
    /// Every release the fake knows, oldest first.
    pub const ALL: &'static [QemuRelease] = &[QemuRelease::V7_2, QemuRelease::V10_0];

    /// `(major, minor, micro)` as the greeting and `query-version` report them.
    pub fn version(self) -> (u64, u64, u64) {
        match self {
            QemuRelease::V7_2 => (7, 2, 22),
            QemuRelease::V10_0 => (10, 0, 13),
        }
    }

    /// The `package` string of the greeting (Debian's).
    pub fn package(self) -> &'static str {
        match self {
            QemuRelease::V7_2 => "Debian 1:7.2+dfsg-7+deb12u18+b3",
            QemuRelease::V10_0 => "Debian 1:10.0.13+ds-0+deb13u1",
        }
    }

    /// The release whose `(major, minor)` is given, if the fake knows it.
    pub fn from_version(major: u64, minor: u64) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| (r.version().0, r.version().1) == (major, minor))
    }

    /// Whether `query-status` carries `singlestep` (removed in 8.1).
    pub(crate) fn has_singlestep(self) -> bool {
        self < QemuRelease::V10_0
    }

    /// Whether block node info carries `active` (added in 10.0, for inactive nodes after
    /// migration).
    pub(crate) fn has_active_flag(self) -> bool {
        self >= QemuRelease::V10_0
    }

    /// Whether a `file` node's image info has `format-specific` (added in 8.0).
    pub(crate) fn file_format_specific(self) -> bool {
        self >= QemuRelease::V10_0
    }

    /// Whether block statistics count zone appends (added in 8.1).
    pub(crate) fn has_zone_stats(self) -> bool {
        self >= QemuRelease::V10_0
    }

    /// The machine type QOM name of the default `pc` machine.
    pub(crate) fn machine_type(self) -> &'static str {
        match self {
            QemuRelease::V7_2 => "pc-i440fx-7.2-machine",
            QemuRelease::V10_0 => "pc-i440fx-10.0-machine",
        }
    }

    /// The statistics names of the balloon's `guest-stats` property.
    pub(crate) fn balloon_stats(self) -> &'static [&'static str] {
        const V7: &[&str] = &[
            "stat-swap-in",
            "stat-swap-out",
            "stat-major-faults",
            "stat-minor-faults",
            "stat-free-memory",
            "stat-total-memory",
            "stat-available-memory",
            "stat-disk-caches",
            "stat-htlb-pgalloc",
            "stat-htlb-pgfail",
        ];
        const V10: &[&str] = &[
            "stat-swap-in",
            "stat-swap-out",
            "stat-major-faults",
            "stat-minor-faults",
            "stat-free-memory",
            "stat-total-memory",
            "stat-available-memory",
            "stat-disk-caches",
            "stat-htlb-pgalloc",
            "stat-htlb-pgfail",
            "stat-oom-kills",
            "stat-alloc-stalls",
            "stat-async-scans",
            "stat-direct-scans",
            "stat-async-reclaims",
            "stat-direct-reclaims",
        ];
        match self {
            QemuRelease::V7_2 => V7,
            QemuRelease::V10_0 => V10,
        }
    }
}

impl fmt::Display for QemuRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor, micro) = self.version();
        write!(f, "QEMU {major}.{minor}.{micro}")
    }
}
