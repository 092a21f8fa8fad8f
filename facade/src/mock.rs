//! mockall mocks of every capability's trait, for expectation-style unit tests (feature `mock`).
//!
//! The mocks work behind the pointers the facade hands out: `Box<dyn GuestStats>` and
//! `Arc<dyn GuestAgent>` forward every method, the typed ones included, so an expectation set
//! on `expect_cpu_stolen_ms()` or `expect_osinfo()` is what the code under test meets.
//!
//! ```
//! # #[cfg(feature = "stats")] {
//! use vmsdk::guest_stats::{GuestStats, SessionId};
//! use vmsdk::mock::MockGuestStats;
//!
//! /// The code under test takes what `Platform::guest_stats` returns.
//! fn stolen_alarm(mut stats: Box<dyn GuestStats>) -> vmsdk::Result<bool> {
//!     stats.update()?;
//!     Ok(stats.cpu_stolen_ms()? > 1_000)
//! }
//!
//! let mut mock = MockGuestStats::new();
//! mock.expect_update().returning(|| Ok(SessionId::new(1)));
//! mock.expect_cpu_stolen_ms().returning(|| Ok(5_000));
//! assert!(stolen_alarm(Box::new(mock))?);
//! # }
//! # Ok::<(), vmsdk::Error>(())
//! ```

#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub use guest_stats::MockGuestStats;

#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub use qga_proto::MockGuestAgent;

#[cfg(feature = "disk")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub use disk_transport::{MockConnection, MockDisk, MockDiskTransport};

#[cfg(feature = "qmp")]
#[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
pub use qmp_proto::MockMonitor;
