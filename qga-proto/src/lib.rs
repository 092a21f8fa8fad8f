//! Host side of the QEMU Guest Agent protocol (QGA): typed commands, sans-I/O
//! framing, blocking and async clients that never hang or desync, and a fake
//! agent that speaks the real wire protocol for unit tests.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), qga_proto::Error> {
//! use qga_proto::{GuestAgent, GuestAgentExt, cmd::GuestExecArgs};
//!
//! // In production: AsyncClient::connect("qga+unix:///run/qemu-server/100.qga", Default::default()).await?
//! let agent = qga_proto::fake::FakeAgent::linux().connect_async();
//!
//! let os = agent.osinfo().await?;
//! println!("guest runs {}", os.pretty_name.unwrap_or_default());
//!
//! let out = agent.exec_wait(GuestExecArgs::new("/bin/echo").arg("hello").capture(), None).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! assert!(out.success());
//! # Ok(()) }
//! ```
//!
//! # Layers
//! - [`types`] and [`cmd`]: every type and command of the protocol reference;
//!   each command implements [`cmd::Command`] (name, arguments, return type,
//!   whether it replies on success, first version).
//! - [`wire`]: request encoding and a streaming reply decoder (0xFF sentinel,
//!   bounded buffering).
//! - [`GuestAgent`]: the dyn-compatible trait (`execute_raw` plus a typed method
//!   per command); [`GuestAgentExt`] adds typed `call::<C>` and helpers
//!   (`exec_wait`, `read_file`, `write_file`, `freeze`).
//! - [`AsyncClient`] (feature `tokio`) and [`Client`] (blocking) over Unix
//!   sockets, TCP and character devices. The async client pipelines the calls of many
//!   tasks on one connection, matching replies to callers by request id.
//! - Version awareness: `guest-info` tells which commands the agent has; a command it
//!   lacks fails before sending, saying whether the agent is too old
//!   ([`Error::CommandNotSupported`]) or its build for this guest leaves the command out
//!   ([`Error::CommandUnavailable`]); arguments newer than the agent are rewritten into
//!   its form or refused ([`Error::ArgumentNotSupported`]).
//! - [`fake`]: [`fake::FakeAgent`], a stateful Linux-like agent for tests, built as
//!   qemu-ga 2.11, 7.2 or 10.0 ([`fake::AgentRelease`]).
//!
//! # Cargo features
//!
//! - `tokio` (default): [`AsyncClient`], [`transport::AsyncCharDevice`],
//!   [`GuestAgentExt::exec_wait`], [`freeze_filesystems`] and the async side of the fake agent.
//! - `mock`: [`MockGuestAgent`], mockall's expectation-style double of [`GuestAgent`].
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod address;
mod agent;
#[cfg(feature = "tokio")]
mod async_client;
mod client;
pub mod cmd;
mod compat;
mod error;
mod ext;
pub mod fake;
pub mod session;
pub mod transport;
pub mod types;
pub mod wire;

pub use address::Address;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use agent::MockGuestAgent;
pub use agent::{call, GuestAgent};
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use async_client::{AsyncClient, AsyncStream, BoxedStream};
pub use client::{Client, FreezeGuard, DRAIN_TIME};
pub use error::{Error, ErrorClass, Result};
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use ext::{freeze_filesystems, FsFreezeGuard};
pub use ext::{ExecOutput, GuestAgentExt, FILE_CHUNK};
pub use session::ClientConfig;
pub use transport::Transport;
