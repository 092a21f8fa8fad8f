//! QEMU Machine Protocol (QMP): drive a running QEMU from Rust — its run state, block nodes,
//! dirty bitmaps, transactions, block jobs and NBD exports — with a client that never hangs and
//! never loses an event.
//!
//! A first program: the run state, the block nodes, a dirty bitmap added and listed. It runs
//! here against the fake monitor (feature `fake`); against QEMU, connect with
//! `Client::connect("qmp+unix:///run/qemu/vm.qmp", ClientConfig::default())` instead.
//!
//! ```
//! # #[cfg(feature = "fake")] {
//! use qmp_proto::cmd::{self, BlockDirtyBitmapAddArgs, QueryNamedBlockNodesArgs};
//! use qmp_proto::types::BlockdevOptions;
//! use qmp_proto::{Monitor, MonitorExt};
//!
//! let fake = qmp_proto::fake::FakeMonitor::new();
//! let mut qemu = fake.connect()?;
//! println!("QEMU {}", qemu.greeting().version.qemu);
//!
//! let status = qemu.call::<cmd::QueryStatus>(&())?;
//! println!("the VM is {}", status.status);
//!
//! qemu.call::<cmd::BlockdevAdd>(&BlockdevOptions::null_co("disk0", 64 << 20))?;
//! qemu.call::<cmd::BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("disk0", "checkpoint1"))?;
//! for node in qemu.call::<cmd::QueryNamedBlockNodes>(&QueryNamedBlockNodesArgs::flat())? {
//!     let bitmaps: Vec<String> = node.dirty_bitmaps.unwrap_or_default().into_iter()
//!         .filter_map(|b| b.name).collect();
//!     println!("{:?}: {} of {} bytes, bitmaps {bitmaps:?}", node.node_name, node.drv, node.image.virtual_size);
//!     assert_eq!(bitmaps, ["checkpoint1"]);
//! }
//! # }
//! # Ok::<(), qmp_proto::Error>(())
//! ```
//!
//! # Layers
//! - [`wire`]: the greeting, request encoding and a streaming decoder of the monitor's
//!   messages (CRLF-terminated JSON objects, bounded in size).
//! - [`session`]: the sans-I/O client state machine: the handshake (`qmp_capabilities`, `oob`
//!   only when QEMU offers it and the caller asks), numbered requests and replies matched to
//!   them (a reply for an id never sent ends the connection with a protocol error), events
//!   kept for their subscribers in bounded buffers, so none is lost while a command waits for
//!   its reply and none piles up without limit.
//! - [`Monitor`]: the trait at the top (raw commands, subscriptions, events); [`MonitorExt`]
//!   adds typed calls ([`cmd`], checked against the QEMU version of the greeting before
//!   anything is sent) and the job helper [`MonitorExt::run_job`], which follows a job to its
//!   end from `JOB_STATUS_CHANGE`/`BLOCK_JOB_*` and returns the job's own error.
//! - [`Client`]: the blocking client over Unix sockets and TCP ([`Address`]:
//!   `qmp+unix:///path`, `qmp+tcp://host:port`), with a deadline on the handshake and on every
//!   call. `AsyncClient` (feature `tokio`): calls of many tasks in flight on one connection,
//!   each with its own deadline, and `EventStream`s.
//! - [`types`] and [`events`]: what the typed commands and events carry. Unknown fields are
//!   ignored and enum values newer than this crate are kept verbatim (`Other(String)`), so a
//!   newer QEMU does not break decoding.
//!
//! # Cargo features
//!
//! - `tokio`: `AsyncClient`.
//! - `mock`: `MockMonitor`, mockall's expectation-style double of [`Monitor`].
//! - `fake`: `fake::FakeMonitor`, a fake QEMU monitor on the real wire modelled on QEMU 7.2 and
//!   10.0, whose block nodes are disk-transport `MemoryDisk`s.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod address;
#[cfg(feature = "tokio")]
mod async_client;
mod client;
pub mod cmd;
mod error;
pub mod events;
#[cfg(feature = "fake")]
#[cfg_attr(docsrs, doc(cfg(feature = "fake")))]
pub mod fake;
mod job;
mod monitor;
pub mod session;
pub mod transport;
pub mod types;
pub mod wire;

pub use address::Address;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use async_client::{AsyncClient, AsyncStream, EventStream, JobFollower};
pub use client::Client;
pub use error::{Error, ErrorClass, Result};
pub use job::JobOptions;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use monitor::MockMonitor;
pub use monitor::{check_command, Monitor, MonitorExt};
pub use session::{ClientConfig, EventFilter, SubscriptionId};
pub use transport::Transport;
pub use wire::{Event, Greeting, QemuVersion, VersionInfo};
