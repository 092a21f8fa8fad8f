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
//! | `stats` | yes | [`Platform::guest_stats`], [`guest_stats`] (VMware backdoor, Linux procfs, the fake) |
//! | `agent` | yes | [`agent`]: QEMU guest agent clients on tokio, [`qga_proto`], the fake agent |
//! | `disk` | yes | [`disk`]: disks by URI (file, NBD, VDDK, memory), [`disk_transport`], the copy engine |
//! | `mock` | no | mockall mocks of every trait, gathered in [`mock`] |
//! | `prometheus-client` | no | [`prometheus`]: the statistics as metrics through the official `prometheus-client` crate: a collector for your `Registry`, OpenMetrics and text 0.0.4 with content negotiation |
//! | `exporter` | no | [`prometheus::Exporter`], a `/metrics` server (tiny_http) with your labels and per-interval rates |
//! | `cli` | no | the `vmsdk` command line tool (clap, indicatif, tiny_http): `cargo install vmsdk --features cli` |
//!
//! A monitoring agent that needs detection and statistics only:
//!
//! ```toml
//! [dependencies]
//! vmsdk = { version = "0.1", default-features = false, features = ["stats"] }
//! ```
//!
//! # Errors
//!
//! One [`Error`] type for the facade and every capability: each crate's error converts into it,
//! so `?` works across statistics, the agent and disks in one function.
//!
//! # Testing your code
//!
//! Every capability has an in-memory fake ([`guest_stats::fake::FakeGuestStats`],
//! [`qga_proto::fake::FakeAgent`], [`disk_transport::memory::MemoryDisk`]) and, with the `mock`
//! feature, a mockall mock in [`mock`]. Both work behind the `Box<dyn …>` and `Arc<dyn …>` the
//! facade hands out: every trait method forwards through those pointers.
//!
//! # With tokio
//!
//! The guest agent is async ([`agent::connect`] returns an async client). Statistics and disks
//! are blocking calls: a statistics update reads a few small files or makes one backdoor call
//! (microseconds), which is fine on an async task at a scrape or sampling interval; disk reads,
//! writes and copies can block for as long as the storage takes, so run them in
//! `tokio::task::spawn_blocking` (see [`disk`]).
//!

// Links to what an optional feature adds go to the item when the feature is on and to the
// features table when it is off, so the documentation of every feature set builds cleanly.
#![cfg_attr(not(feature = "mock"), doc = "[`mock`]: crate#features")]
#![cfg_attr(
    not(feature = "prometheus-client"),
    doc = "[`prometheus`]: crate#features"
)]
#![cfg_attr(
    not(feature = "exporter"),
    doc = "[`prometheus::Exporter`]: crate#features"
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

/// The disk crate, re-exported so one dependency is enough.
#[cfg(feature = "disk")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub use disk_transport;
