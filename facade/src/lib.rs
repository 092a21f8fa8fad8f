//! vmsdk: detect the hypervisor and get the right backends for guest statistics, the QEMU guest
//! agent and virtual disks — one dependency, with in-memory fakes and mocks for your tests.
//!
//! ```
//! use vmsdk::{BackendChoice, Platform};
//!
//! // Detection runs on the real machine; the fake backend keeps this example portable.
//! let platform = Platform::builder().backend(BackendChoice::Fake).build()?;
//! match platform.detection().vm {
//!     Some(hypervisor) => println!("running on {hypervisor}"),
//!     None => println!("bare metal"),
//! }
//! # #[cfg(feature = "stats")] {
//! let mut stats = platform.guest_stats()?;
//! let session = stats.update()?;
//! println!("session {session}: {} ms stolen", stats.cpu_stolen_ms()?);
//! # }
//! # Ok::<(), vmsdk::Error>(())
//! ```
//!
//! # Features
//!
//! Detection ([`detect()`], [`Detector`], [`Platform`]) is always built. Each capability is a
//! feature, so a program builds only what it uses:
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `stats` | yes | [`Platform::guest_stats`][link-Platform-guest-stats], [`guest_stats`][link-guest-stats] (VMware backdoor, Linux procfs, the fake) |
//! | `agent` | yes | [`agent`][link-agent]: QEMU guest agent clients on tokio, [`qga_proto`][link-qga-proto], the fake agent |
//! | `disk` | yes | [`disk`][link-disk]: disks by URI (file, NBD, VDDK, memory), [`disk_transport`][link-disk-transport], the copy engine |
//! | `qmp` | no | [`qmp`][link-qmp]: QEMU's monitor protocol, a blocking client with typed commands, events and jobs, [`qmp_proto`][link-qmp-proto] |
//! | `backup` | no | [`backup`][link-backup]: live backups of running QEMU VMs into qcow2 chains (the `live-backup` crate): checkpoints, verify, restore, the fake VM |
//! | `mock` | no | mockall mocks of every trait, gathered in [`mock`][link-mock] |
//! | `prometheus-client` | no | [`prometheus`][link-prometheus]: metrics through the official `prometheus-client` crate, OpenMetrics and text 0.0.4 with content negotiation: with `stats` the statistics of this VM, with `agent` the guest agent metrics of many guests on a host (`GuestCollector`) |
//! | `exporter` | no | [`prometheus::Exporter`][link-prometheus-Exporter], a `/metrics` server (tiny_http) for any registry, with `/probe?target=` for guests |
//! | `cli` | no | the `vmsdk` command line tool (clap, indicatif, tiny_http): `cargo install vmsdk --features cli` |
//!
//! A monitoring agent that needs detection and statistics only:
//!
//! ```toml
//! [dependencies]
//! vmsdk = { version = "0.1", default-features = false, features = ["stats"] }
//! ```
//!
//! A host-side exporter of many guests' agent metrics, without the in-guest statistics:
//!
//! ```toml
//! [dependencies]
//! vmsdk = { version = "0.1", default-features = false, features = ["agent", "exporter"] }
//! ```
//!
//! # Errors
//!
//! One [`Error`] type for the facade and every capability: each crate's error converts into it,
//! so `?` works across statistics, the agent and disks in one function.
//!
//! # Testing your code
//!
//! Every capability has an in-memory fake ([`guest_stats::fake::FakeGuestStats`][link-guest-stats-fake-FakeGuestStats],
//! [`qga_proto::fake::FakeAgent`][link-qga-proto-fake-FakeAgent], [`disk_transport::memory::MemoryDisk`][link-disk-transport-memory-MemoryDisk]) and, with the `mock`
//! feature, a mockall mock in [`mock`][link-mock]. Both work behind the `Box<dyn …>` and `Arc<dyn …>` the
//! facade hands out: every trait method forwards through those pointers.
//!
//! # With tokio
//!
//! The guest agent is async ([`agent::connect`][link-agent-connect] returns an async client). Statistics and disks
//! are blocking calls: a statistics update reads a few small files or makes one backdoor call
//! (microseconds), which is fine on an async task at a scrape or sampling interval; disk reads,
//! writes and copies can block for as long as the storage takes, so run them in
//! `tokio::task::spawn_blocking` (see [`disk`][link-disk]).

// Links to what a feature set may leave out: into these docs when it is built, to docs.rs
// when not, so the docs of every feature set render without broken links.
#![cfg_attr(
    feature = "stats",
    doc = "",
    doc = "[link-Platform-guest-stats]: Platform::guest_stats",
    doc = "[link-guest-stats-fake-FakeGuestStats]: guest_stats::fake::FakeGuestStats",
    doc = "[link-guest-stats]: guest_stats"
)]
#![cfg_attr(
    not(feature = "stats"),
    doc = "",
    doc = "[link-Platform-guest-stats]: https://docs.rs/vmsdk/latest/vmsdk/struct.Platform.html#method.guest_stats",
    doc = "[link-guest-stats-fake-FakeGuestStats]: https://docs.rs/guest-stats/latest/guest_stats/fake/struct.FakeGuestStats.html",
    doc = "[link-guest-stats]: https://docs.rs/guest-stats"
)]
#![cfg_attr(
    feature = "agent",
    doc = "",
    doc = "[link-agent-connect]: agent::connect",
    doc = "[link-agent]: agent",
    doc = "[link-qga-proto-fake-FakeAgent]: qga_proto::fake::FakeAgent",
    doc = "[link-qga-proto]: qga_proto"
)]
#![cfg_attr(
    not(feature = "agent"),
    doc = "",
    doc = "[link-agent-connect]: https://docs.rs/vmsdk/latest/vmsdk/agent/fn.connect.html",
    doc = "[link-agent]: https://docs.rs/vmsdk/latest/vmsdk/agent/index.html",
    doc = "[link-qga-proto-fake-FakeAgent]: https://docs.rs/qga-proto/latest/qga_proto/fake/struct.FakeAgent.html",
    doc = "[link-qga-proto]: https://docs.rs/qga-proto"
)]
#![cfg_attr(
    feature = "disk",
    doc = "",
    doc = "[link-disk-transport-memory-MemoryDisk]: disk_transport::memory::MemoryDisk",
    doc = "[link-disk-transport]: disk_transport",
    doc = "[link-disk]: disk"
)]
#![cfg_attr(
    not(feature = "disk"),
    doc = "",
    doc = "[link-disk-transport-memory-MemoryDisk]: https://docs.rs/disk-transport/latest/disk_transport/memory/struct.MemoryDisk.html",
    doc = "[link-disk-transport]: https://docs.rs/disk-transport",
    doc = "[link-disk]: https://docs.rs/vmsdk/latest/vmsdk/disk/index.html"
)]
#![cfg_attr(
    feature = "qmp",
    doc = "",
    doc = "[link-qmp-proto]: qmp_proto",
    doc = "[link-qmp]: qmp"
)]
#![cfg_attr(
    not(feature = "qmp"),
    doc = "",
    doc = "[link-qmp-proto]: https://docs.rs/qmp-proto",
    doc = "[link-qmp]: https://docs.rs/vmsdk/latest/vmsdk/qmp/index.html"
)]
#![cfg_attr(feature = "backup", doc = "", doc = "[link-backup]: backup")]
#![cfg_attr(
    not(feature = "backup"),
    doc = "",
    doc = "[link-backup]: https://docs.rs/live-backup"
)]
#![cfg_attr(feature = "mock", doc = "", doc = "[link-mock]: mock")]
#![cfg_attr(
    not(feature = "mock"),
    doc = "",
    doc = "[link-mock]: https://docs.rs/vmsdk/latest/vmsdk/mock/index.html"
)]
#![cfg_attr(
    feature = "prometheus-client",
    doc = "",
    doc = "[link-prometheus]: prometheus"
)]
#![cfg_attr(
    not(feature = "prometheus-client"),
    doc = "",
    doc = "[link-prometheus]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/index.html"
)]
#![cfg_attr(
    feature = "exporter",
    doc = "",
    doc = "[link-prometheus-Exporter]: prometheus::Exporter"
)]
#![cfg_attr(
    not(feature = "exporter"),
    doc = "",
    doc = "[link-prometheus-Exporter]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.Exporter.html"
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub mod agent;
pub mod detect;
#[cfg(feature = "disk")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub mod disk;
mod error;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;
mod platform;
#[cfg(feature = "prometheus-client")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus-client")))]
pub mod prometheus;
#[cfg(feature = "qmp")]
#[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
pub mod qmp;

pub use detect::{detect, ConfidentialVm, Container, Detection, Detector, Evidence, Hypervisor};
pub use error::{Error, Result};
pub use platform::{BackendChoice, Platform, PlatformBuilder};

/// The guest statistics crate, re-exported so one dependency is enough.
#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub use guest_stats;

/// The guest agent crate, re-exported so one dependency is enough.
#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub use qga_proto;

/// Live backups of running VMs (the `live-backup` crate): [`backup::BackupSource`] (QEMU
/// over QMP and NBD, the fake VM), [`backup::BackupDir`] (qcow2 chains, manifest, verify,
/// restore).
#[cfg(feature = "backup")]
#[cfg_attr(docsrs, doc(cfg(feature = "backup")))]
pub use live_backup as backup;

/// The disk crate, re-exported so one dependency is enough.
#[cfg(feature = "disk")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub use disk_transport;

/// The QEMU monitor crate, re-exported so one dependency is enough.
#[cfg(feature = "qmp")]
#[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
pub use qmp_proto;
