//! vmsdk: detect the hypervisor and get the right backends for guest statistics, the QEMU guest
//! agent and virtual disks.
//!
//! ```
//! let detection = vmsdk::detect::detect();
//! match detection.vm {
//!     Some(hypervisor) => println!("running on {hypervisor}"),
//!     None => println!("bare metal"),
//! }
//! for evidence in &detection.vm_evidence {
//!     println!("{}: {}", evidence.source, evidence.observed);
//! }
//! ```

#![forbid(unsafe_code)]

pub mod detect;

pub use detect::{detect, Container, Detection, Detector, Evidence, Hypervisor};
