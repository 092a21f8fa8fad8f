//! QEMU Machine Protocol (QMP): drive a running QEMU from Rust.
//!
//! # Layers
//! - [`wire`]: the greeting, request encoding and a streaming decoder of the monitor's
//!   messages (CRLF-terminated JSON objects, bounded in size).
//! - [`session`]: the sans-I/O client state machine: the handshake (`qmp_capabilities`, `oob`
//!   only when QEMU offers it and the caller asks), numbered requests and replies matched to
//!   them, events kept for their subscribers in bounded buffers so that none is lost while a
//!   command waits for its reply.
//! - [`Address`]: `qmp+unix:///path` and `qmp+tcp://host:port`.
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
pub use async_client::{AsyncClient, AsyncStream, EventStream};
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
