//! vmsdk: detect the hypervisor and get the right backends for guest statistics, the QEMU guest
//! agent and virtual disks.
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
//! let mut stats = platform.guest_stats()?;
//! let session = stats.update()?;
//! println!("session {session}: {} ms stolen", stats.cpu_stolen_ms()?);
//! # Ok::<(), vmsdk::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod agent;
pub mod detect;
pub mod disk;
mod error;
mod platform;
pub mod prometheus;

pub use detect::{detect, ConfidentialVm, Container, Detection, Detector, Evidence, Hypervisor};
pub use error::{Error, Result};
pub use platform::{BackendChoice, Platform, PlatformBuilder};

/// The crates the facade builds on, re-exported so one dependency is enough.
pub use {disk_transport, guest_stats, qga_proto};
