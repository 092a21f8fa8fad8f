//! The vSphere Guest API statistics — CPU and memory limits, reservations, shares, stolen time,
//! ballooning — behind one trait, for any hypervisor.
//!
//! [`GuestStats`] is the Rust form of a `VMGuestLibHandle`: [`update`](GuestStats::update)
//! refreshes every statistic at once (`VMGuestLib_UpdateInfo` + `VMGuestLib_GetSessionId`),
//! then typed accessors such as [`cpu_stolen_ms`](GuestStats::cpu_stolen_ms) read them. Errors
//! keep the C API's codes and texts ([`Error::code`]). Backends:
//!
//! - `vmware` (feature `vmware`): pure Rust, speaks the VMware backdoor and the guestlib RPC
//!   itself, no `libvmGuestLib` needed.
//! - `linux` (feature `linux`): any Linux guest (KVM, Xen, Hyper-V, Firecracker, …) from procfs,
//!   sysfs and cgroupfs; what Linux cannot know is [`Error::NotAvailable`].
//! - [`fake`]: a scriptable, stateful stand-in for your own unit tests.
//!
//! A changed [`SessionId`] (migration, suspend/resume, snapshot revert) makes earlier counter
//! values stale; [`Sampler`] turns counters into per-interval rates and restarts on a change.
//!
//! # Example
//!
//! A monitoring function written against the trait, tested with the fake:
//!
//! ```
//! use guest_stats::fake::{FakeGuestStats, FakeSample};
//! use guest_stats::{GuestStats, Result, Stat};
//!
//! /// Warns when the hypervisor reclaims more than a quarter of the memory limit.
//! fn balloon_warning(stats: &mut dyn GuestStats) -> Result<Option<String>> {
//!     stats.update()?;
//!     let ballooned = stats.mem_ballooned_mb()?;
//!     let limit = stats.mem_limit_mb()?;
//!     Ok((ballooned * 4 > limit).then(|| format!("{ballooned} of {limit} MB ballooned")))
//! }
//!
//! fn main() -> Result<()> {
//!     let mut stats = FakeGuestStats::builder()
//!         .sample(FakeSample::new().with(Stat::MemBalloonedMb, 100u64).with(Stat::MemLimitMb, 4096u64))
//!         .sample(FakeSample::new().with(Stat::MemBalloonedMb, 2048u64).with(Stat::MemLimitMb, 4096u64))
//!         .build();
//!
//!     assert_eq!(balloon_warning(&mut stats)?, None);
//!     assert_eq!(balloon_warning(&mut stats)?.as_deref(), Some("2048 of 4096 MB ballooned"));
//!     Ok(())
//! }
//! ```
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `vmware` | yes | the [`vmware`] backend: backdoor, RPCI channel, guestlib decoders |
//! | `linux` | yes | the [`linux`] backend: procfs, sysfs, cgroupfs |
//! | `mock` | no | `MockGuestStats`, a mockall mock of [`GuestStats`], for expectation-style tests |
//!
//! The [`fake`] is always built. Both the fake and the mock keep working behind the
//! `Box<dyn GuestStats>` a facade hands out: the pointer forwards every method.
//!
//! # With tokio
//!
//! An update reads a few small files (Linux) or makes one backdoor call (VMware): microseconds,
//! so calling it from an async task at a sampling interval is fine; there is no async API.
//!
//! # Threads
//!
//! One handle must not be updated from two threads at once (the C API has no internal locking):
//! `update` takes `&mut self`, so the compiler enforces it. Give each thread its own handle, or
//! share one behind a `Mutex`.

#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod fake;
// The trait lives in a private module so that the `__mock_*` module mockall generates next to
// it (feature `mock`) stays out of the documentation; the trait and its mock are re-exported.
#[cfg(feature = "linux")]
#[cfg_attr(docsrs, doc(cfg(feature = "linux")))]
pub mod linux;
mod sampler;
mod snapshot;
mod stat;
mod traits;
#[cfg(feature = "vmware")]
#[cfg_attr(docsrs, doc(cfg(feature = "vmware")))]
pub mod vmware;

pub use error::{Error, ErrorCode, Result};
pub use sampler::{Interval, Sampler};
pub use snapshot::{ParseSessionIdError, SessionId, Snapshot};
pub use stat::{Stat, StatValue, Unit, UnknownStat};
pub use traits::GuestStats;
#[cfg(feature = "mock")]
pub use traits::MockGuestStats;

/// Calls `$apply!` with every typed numeric accessor of [`GuestStats`], the name of its mockall
/// expectation, and the statistic it reads. One list serves the pointer impls below and the test that proves they forward, so an
/// accessor added to the trait but not here fails that test instead of silently bypassing a
/// mock's expectation behind a `Box`.
macro_rules! numeric_accessors {
    ($apply:ident) => {
        $apply! {
            cpu_reservation_mhz / expect_cpu_reservation_mhz => CpuReservationMhz,
            cpu_limit_mhz / expect_cpu_limit_mhz => CpuLimitMhz,
            cpu_shares / expect_cpu_shares => CpuShares,
            cpu_stolen_ms / expect_cpu_stolen_ms => CpuStolenMs,
            cpu_used_ms / expect_cpu_used_ms => CpuUsedMs,
            elapsed_ms / expect_elapsed_ms => ElapsedMs,
            host_processor_speed_mhz / expect_host_processor_speed_mhz => HostProcessorSpeedMhz,
            mem_active_mb / expect_mem_active_mb => MemActiveMb,
            mem_ballooned_mb / expect_mem_ballooned_mb => MemBalloonedMb,
            mem_limit_mb / expect_mem_limit_mb => MemLimitMb,
            mem_mapped_mb / expect_mem_mapped_mb => MemMappedMb,
            mem_overhead_mb / expect_mem_overhead_mb => MemOverheadMb,
            mem_reservation_mb / expect_mem_reservation_mb => MemReservationMb,
            mem_shared_mb / expect_mem_shared_mb => MemSharedMb,
            mem_shared_saved_mb / expect_mem_shared_saved_mb => MemSharedSavedMb,
            mem_shares / expect_mem_shares => MemShares,
            mem_swapped_mb / expect_mem_swapped_mb => MemSwappedMb,
            mem_target_size_mb / expect_mem_target_size_mb => MemTargetSizeMb,
            mem_used_mb / expect_mem_used_mb => MemUsedMb,
            host_cpu_num_cores / expect_host_cpu_num_cores => HostCpuNumCores,
            host_cpu_used_ms / expect_host_cpu_used_ms => HostCpuUsedMs,
            host_mem_swapped_mb / expect_host_mem_swapped_mb => HostMemSwappedMb,
            host_mem_shared_mb / expect_host_mem_shared_mb => HostMemSharedMb,
            host_mem_used_mb / expect_host_mem_used_mb => HostMemUsedMb,
            host_mem_phys_mb / expect_host_mem_phys_mb => HostMemPhysMb,
            host_mem_phys_free_mb / expect_host_mem_phys_free_mb => HostMemPhysFreeMb,
            host_mem_kern_ovhd_mb / expect_host_mem_kern_ovhd_mb => HostMemKernOvhdMb,
            host_mem_mapped_mb / expect_host_mem_mapped_mb => HostMemMappedMb,
            host_mem_unmapped_mb / expect_host_mem_unmapped_mb => HostMemUnmappedMb,
            mem_zipped_mb / expect_mem_zipped_mb => MemZippedMb,
            mem_zip_saved_mb / expect_mem_zip_saved_mb => MemZipSavedMb,
            mem_ll_swapped_mb / expect_mem_ll_swapped_mb => MemLlSwappedMb,
            mem_swap_target_mb / expect_mem_swap_target_mb => MemSwapTargetMb,
            mem_balloon_target_mb / expect_mem_balloon_target_mb => MemBalloonTargetMb,
            mem_balloon_max_mb / expect_mem_balloon_max_mb => MemBalloonMaxMb,
        }
    };
}

/// Implements [`GuestStats`] for a pointer type by forwarding every method, the provided ones
/// included: a backend or mock that overrides an accessor keeps its answer behind the pointer.
macro_rules! forward_guest_stats {
    ($($pointer:tt)*) => {
        #[deny(clippy::missing_trait_methods)]
        impl<G: GuestStats + ?Sized> GuestStats for $($pointer)* {
            fn backend(&self) -> &'static str {
                (**self).backend()
            }

            fn update(&mut self) -> Result<SessionId> {
                (**self).update()
            }

            fn session_id(&self) -> Result<SessionId> {
                (**self).session_id()
            }

            fn stat(&self, stat: Stat) -> Result<StatValue> {
                (**self).stat(stat)
            }

            fn snapshot(&self) -> Result<Snapshot> {
                (**self).snapshot()
            }

            fn resource_pool_path(&self) -> Result<String> {
                (**self).resource_pool_path()
            }

            numeric_accessors!(forward_numeric);
        }
    };
}

macro_rules! forward_numeric {
    ($($method:ident / $expect:ident => $stat:ident,)*) => {
        $(
            fn $method(&self) -> Result<u64> {
                (**self).$method()
            }
        )*
    };
}

forward_guest_stats!(Box<G>);
forward_guest_stats!(&mut G);

fn number(value: Result<StatValue>, stat: Stat) -> Result<u64> {
    match value? {
        StatValue::U64(value) => Ok(value),
        StatValue::Text(_) => Err(wrong_kind(stat)),
    }
}

/// A backend returned text for a number or the reverse: a backend bug, reported rather than
/// hidden.
fn wrong_kind(_stat: Stat) -> Error {
    Error::Other
}

#[cfg(test)]
mod forwarding_tests {
    use super::*;

    /// Every accessor is listed once, and every numeric statistic has one.
    #[test]
    fn the_accessor_list_covers_every_numeric_statistic() {
        macro_rules! stats_of {
            ($($method:ident / $expect:ident => $stat:ident,)*) => {
                vec![$(Stat::$stat),*]
            };
        }
        let mut listed: Vec<Stat> = numeric_accessors!(stats_of);
        let count = listed.len();
        listed.sort_by_key(|s| s.name());
        listed.dedup();
        assert_eq!(listed.len(), count, "an accessor is listed twice");
        for &stat in Stat::ALL {
            if stat != Stat::ResourcePoolPath {
                assert!(
                    listed.contains(&stat),
                    "{} has no forwarded accessor",
                    stat.name()
                );
            }
        }
    }

    /// A mock with an expectation on every accessor answers the same through `Box<dyn _>` and
    /// `&mut dyn _`: nothing falls back to the provided method (which would call `stat`, which
    /// has no expectation and would panic).
    #[cfg(feature = "mock")]
    #[test]
    fn pointers_forward_every_method_to_the_mock() {
        macro_rules! expect_all {
            ($($method:ident / $expect:ident => $stat:ident,)*) => {{
                let mut mock = MockGuestStats::new();
                let mut answer = 1000_u64;
                $(
                    answer += 1;
                    let this = answer;
                    mock.$expect().times(2).returning(move || Ok(this));
                )*
                mock
            }};
        }
        macro_rules! check_all {
            ($stats:expr; $($method:ident / $expect:ident => $stat:ident,)*) => {{
                let mut expected = 1000_u64;
                $(
                    expected += 1;
                    assert_eq!($stats.$method().unwrap(), expected, stringify!($method));
                )*
            }};
        }
        let mut mock: MockGuestStats = numeric_accessors!(expect_all);
        mock.expect_backend().times(2).return_const("mock");
        mock.expect_update()
            .times(2)
            .returning(|| Ok(SessionId::new(7)));
        mock.expect_session_id()
            .times(2)
            .returning(|| Ok(SessionId::new(7)));
        mock.expect_stat()
            .times(2)
            .returning(|_| Ok(StatValue::U64(1)));
        mock.expect_snapshot()
            .times(2)
            .returning(|| Ok(Snapshot::new(SessionId::new(7), "mock")));
        mock.expect_resource_pool_path()
            .times(2)
            .returning(|| Ok("/pool".to_owned()));

        fn check(stats: &mut dyn GuestStats) {
            assert_eq!(stats.backend(), "mock");
            assert_eq!(stats.update().unwrap(), SessionId::new(7));
            assert_eq!(stats.session_id().unwrap(), SessionId::new(7));
            assert_eq!(stats.stat(Stat::CpuShares).unwrap(), StatValue::U64(1));
            assert_eq!(stats.snapshot().unwrap().backend, "mock");
            assert_eq!(stats.resource_pool_path().unwrap(), "/pool");
            macro_rules! check_here {
                ($($tt:tt)*) => { check_all!(stats; $($tt)*) };
            }
            numeric_accessors!(check_here);
        }
        {
            let mut by_ref: &mut dyn GuestStats = &mut mock;
            check(&mut by_ref);
        }
        let mut boxed: Box<dyn GuestStats> = Box::new(mock);
        check(&mut boxed);
    }
}
