//! QEMU's monitor (QMP) by URI: a blocking client with typed commands, events and a job
//! helper ([`qmp_proto`]).
//!
//! The handle is a `Box<dyn Monitor>`, so the code under test takes the real client, a fake
//! monitor or a mock (`vmsdk::mock::MockMonitor`, feature `mock`) alike; the typed commands
//! and [`MonitorExt::run_job`] work on all of them.
//!
//! ```no_run
//! use vmsdk::qmp::{cmd, Monitor, MonitorExt};
//!
//! let mut qemu = vmsdk::qmp::connect("qmp+unix:///run/qemu-server/100.qmp")?;
//! println!("QEMU {}", qemu.greeting().version.qemu);
//! println!("{}", qemu.call::<cmd::QueryStatus>(&())?.status);
//! # Ok::<(), vmsdk::Error>(())
//! ```

pub use qmp_proto::{
    cmd, events, types, Address, Client, ClientConfig, Event, EventFilter, JobOptions, Monitor,
    MonitorExt,
};

use crate::Result;

/// Connects to the monitor at `uri` (`qmp+unix:///path` or `qmp+tcp://host:port`) with
/// [`ClientConfig::default()`]: 10 s for the connection and the handshake, 30 s for each
/// command's reply.
///
/// A failure names the address and keeps the operating system's error as its source:
///
/// ```
/// let error = vmsdk::qmp::connect("qmp+unix:///nonexistent/vm.qmp").err().unwrap();
/// assert_eq!(
///     error.to_string(),
///     "cannot connect to the QEMU monitor at qmp+unix:///nonexistent/vm.qmp"
/// );
/// assert!(std::error::Error::source(&error).is_some());
/// ```
pub fn connect(uri: &str) -> Result<Box<dyn Monitor>> {
    connect_with(uri, ClientConfig::default())
}

/// Like [`connect`] with other settings.
pub fn connect_with(uri: &str, config: ClientConfig) -> Result<Box<dyn Monitor>> {
    Ok(Box::new(Client::connect(uri, config)?))
}
