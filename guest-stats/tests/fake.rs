//! The fake backend, the trait's provided methods and the sampler, driven through the public API.

use guest_stats::fake::{EndOfScript, FakeGuestStats, FakeSample};
use guest_stats::{Error, ErrorCode, GuestStats, Sampler, SessionId, Snapshot, Stat, StatValue};

fn counters(elapsed: u64, used: u64, stolen: u64) -> FakeSample {
    FakeSample::new()
        .with(Stat::ElapsedMs, elapsed)
        .with(Stat::CpuUsedMs, used)
        .with(Stat::CpuStolenMs, stolen)
        .with(Stat::HostProcessorSpeedMhz, 2_000u64)
}

#[test]
fn accessors_before_first_update_are_no_info() {
    let stats = FakeGuestStats::example();
    assert!(matches!(stats.session_id(), Err(Error::NoInfo)));
    assert!(matches!(stats.cpu_limit_mhz(), Err(Error::NoInfo)));
    assert!(matches!(stats.resource_pool_path(), Err(Error::NoInfo)));
    assert!(matches!(stats.snapshot(), Err(Error::NoInfo)));
    assert_eq!(stats.backend(), "fake");
}

#[test]
fn every_typed_accessor_reads_its_own_statistic() {
    // Give each numeric statistic a distinct value, then check each accessor returns its own.
    let mut sample = FakeSample::new();
    for (index, &stat) in Stat::ALL.iter().enumerate() {
        sample = if stat == Stat::ResourcePoolPath {
            sample.with(stat, "/pool")
        } else {
            sample.with(stat, 1_000 + index as u64)
        };
    }
    let mut stats = FakeGuestStats::constant(sample);
    stats.update().unwrap();
    type Accessor = fn(&FakeGuestStats) -> guest_stats::Result<u64>;
    let accessors: Vec<(Stat, Accessor)> = vec![
        (Stat::CpuReservationMhz, |s| s.cpu_reservation_mhz()),
        (Stat::CpuLimitMhz, |s| s.cpu_limit_mhz()),
        (Stat::CpuShares, |s| s.cpu_shares()),
        (Stat::CpuUsedMs, |s| s.cpu_used_ms()),
        (Stat::HostProcessorSpeedMhz, |s| {
            s.host_processor_speed_mhz()
        }),
        (Stat::MemReservationMb, |s| s.mem_reservation_mb()),
        (Stat::MemLimitMb, |s| s.mem_limit_mb()),
        (Stat::MemShares, |s| s.mem_shares()),
        (Stat::MemMappedMb, |s| s.mem_mapped_mb()),
        (Stat::MemActiveMb, |s| s.mem_active_mb()),
        (Stat::MemOverheadMb, |s| s.mem_overhead_mb()),
        (Stat::MemBalloonedMb, |s| s.mem_ballooned_mb()),
        (Stat::MemSwappedMb, |s| s.mem_swapped_mb()),
        (Stat::MemSharedMb, |s| s.mem_shared_mb()),
        (Stat::MemSharedSavedMb, |s| s.mem_shared_saved_mb()),
        (Stat::MemUsedMb, |s| s.mem_used_mb()),
        (Stat::ElapsedMs, |s| s.elapsed_ms()),
        (Stat::CpuStolenMs, |s| s.cpu_stolen_ms()),
        (Stat::MemTargetSizeMb, |s| s.mem_target_size_mb()),
        (Stat::HostCpuNumCores, |s| s.host_cpu_num_cores()),
        (Stat::HostCpuUsedMs, |s| s.host_cpu_used_ms()),
        (Stat::HostMemSwappedMb, |s| s.host_mem_swapped_mb()),
        (Stat::HostMemSharedMb, |s| s.host_mem_shared_mb()),
        (Stat::HostMemUsedMb, |s| s.host_mem_used_mb()),
        (Stat::HostMemPhysMb, |s| s.host_mem_phys_mb()),
        (Stat::HostMemPhysFreeMb, |s| s.host_mem_phys_free_mb()),
        (Stat::HostMemKernOvhdMb, |s| s.host_mem_kern_ovhd_mb()),
        (Stat::HostMemMappedMb, |s| s.host_mem_mapped_mb()),
        (Stat::HostMemUnmappedMb, |s| s.host_mem_unmapped_mb()),
        (Stat::MemZippedMb, |s| s.mem_zipped_mb()),
        (Stat::MemZipSavedMb, |s| s.mem_zip_saved_mb()),
        (Stat::MemLlSwappedMb, |s| s.mem_ll_swapped_mb()),
        (Stat::MemSwapTargetMb, |s| s.mem_swap_target_mb()),
        (Stat::MemBalloonTargetMb, |s| s.mem_balloon_target_mb()),
        (Stat::MemBalloonMaxMb, |s| s.mem_balloon_max_mb()),
    ];
    // Every numeric statistic has an accessor in the list.
    assert_eq!(accessors.len() + 1, Stat::ALL.len());
    for (stat, accessor) in accessors {
        let expected = stats.stat(stat).unwrap().as_u64().unwrap();
        assert_eq!(accessor(&stats).unwrap(), expected, "{stat}");
    }
    assert_eq!(stats.resource_pool_path().unwrap(), "/pool");
}

#[test]
fn missing_statistics_are_not_available_and_none_in_the_snapshot() {
    let mut stats = FakeGuestStats::constant(FakeSample::new().with(Stat::ElapsedMs, 5u64));
    assert_eq!(stats.update().unwrap(), SessionId::new(1));
    match stats.mem_limit_mb() {
        Err(Error::NotAvailable { stat }) => assert_eq!(stat, Stat::MemLimitMb),
        other => panic!("expected NotAvailable, got {other:?}"),
    }
    let snapshot = stats.snapshot().unwrap();
    assert_eq!(snapshot.elapsed_ms, Some(5));
    assert_eq!(snapshot.mem_limit_mb, None);
    assert_eq!(snapshot.available().count(), 1);
    assert_eq!(snapshot.backend, "fake");
}

#[test]
fn snapshot_propagates_hard_errors_but_skips_missing_ones() {
    let missing = FakeSample::new().with(Stat::ElapsedMs, 1u64).with_error(
        Stat::HostCpuUsedMs,
        Error::UnsupportedVersion {
            stat: Stat::HostCpuUsedMs,
        },
    );
    let mut stats = FakeGuestStats::constant(missing);
    stats.update().unwrap();
    assert_eq!(stats.snapshot().unwrap().host_cpu_used_ms, None);

    let broken = FakeSample::new().with_error(Stat::CpuUsedMs, Error::Other);
    let mut stats = FakeGuestStats::constant(broken);
    stats.update().unwrap();
    assert!(matches!(stats.snapshot(), Err(Error::Other)));
}

#[test]
fn script_advances_changes_session_and_fails_on_cue() {
    let mut stats = FakeGuestStats::builder()
        .session(SessionId::new(7))
        .sample(counters(1_000, 10, 1))
        .sample(counters(2_000, 20, 2))
        .update_error(Error::NotEnabled)
        .session(SessionId::new(8))
        .sample(counters(10, 0, 0))
        .build();
    assert_eq!(stats.update().unwrap(), SessionId::new(7));
    assert_eq!(stats.elapsed_ms().unwrap(), 1_000);
    assert_eq!(stats.update().unwrap(), SessionId::new(7));
    assert_eq!(stats.elapsed_ms().unwrap(), 2_000);
    assert!(matches!(stats.update(), Err(Error::NotEnabled)));
    assert!(matches!(stats.elapsed_ms(), Err(Error::NoInfo)));
    assert!(matches!(stats.session_id(), Err(Error::NoInfo)));
    assert_eq!(stats.update().unwrap(), SessionId::new(8));
    assert_eq!(stats.elapsed_ms().unwrap(), 10);
    // RepeatLast: the last sample stays.
    assert_eq!(stats.update().unwrap(), SessionId::new(8));
    assert_eq!(stats.elapsed_ms().unwrap(), 10);
    assert_eq!(stats.update_count(), 5);
}

#[test]
fn cycle_restarts_the_script() {
    let mut stats = FakeGuestStats::builder()
        .sample(counters(1, 0, 0))
        .sample(counters(2, 0, 0))
        .end_of_script(EndOfScript::Cycle)
        .build();
    let seen: Vec<u64> = (0..5)
        .map(|_| {
            stats.update().unwrap();
            stats.elapsed_ms().unwrap()
        })
        .collect();
    assert_eq!(seen, [1, 2, 1, 2, 1]);
}

#[test]
fn empty_script_behaves_like_a_host_without_the_api() {
    let mut stats = FakeGuestStats::builder().build();
    assert!(matches!(stats.update(), Err(Error::NotEnabled)));
    assert!(matches!(stats.cpu_used_ms(), Err(Error::NoInfo)));
}

#[test]
fn example_is_plausible_and_consistent() {
    let mut stats = FakeGuestStats::example();
    let first = stats.update().unwrap();
    let snapshot = stats.snapshot().unwrap();
    assert!(first.is_valid());
    // The guide: cpuUsedMs is a subset of elapsedMs per vCPU; memUsed = mapped - sharedSaved.
    let elapsed = snapshot.elapsed_ms.unwrap();
    assert!(snapshot.cpu_used_ms.unwrap() <= elapsed * 4);
    assert_eq!(
        snapshot.mem_used_mb.unwrap(),
        snapshot.mem_mapped_mb.unwrap() - snapshot.mem_shared_saved_mb.unwrap()
    );
    let mut sessions = vec![first];
    for _ in 0..60 {
        let session = stats.update().unwrap();
        if *sessions.last().unwrap() != session {
            sessions.push(session);
        }
    }
    // One vMotion in the middle, and the cycle back to the start.
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0], sessions[2]);
}

#[test]
fn sampler_computes_rates_and_resets_on_session_change_and_errors() {
    let fake = FakeGuestStats::builder()
        .sample(counters(10_000, 1_000, 100))
        .sample(counters(12_000, 2_000, 300))
        .session(SessionId::new(2))
        .sample(counters(500, 100, 10))
        .sample(counters(1_500, 600, 20))
        .update_error(Error::Other)
        .sample(counters(2_500, 700, 30))
        .sample(counters(3_500, 500, 40)) // used went backwards: no rate
        .build();
    let mut sampler = Sampler::new(fake);

    let first = sampler.sample().unwrap();
    assert!(!first.session_changed);
    assert_eq!(first.cpu_used_percent, None);

    let second = sampler.sample().unwrap();
    assert_eq!(second.elapsed_delta_ms, Some(2_000));
    assert_eq!(second.cpu_used_delta_ms, Some(1_000));
    assert_eq!(second.cpu_used_percent, Some(50.0));
    assert_eq!(second.cpu_stolen_percent, Some(10.0));
    assert_eq!(second.effective_cpu_mhz, Some(1_000.0));

    let moved = sampler.sample().unwrap();
    assert!(moved.session_changed);
    assert_eq!(moved.cpu_used_percent, None);
    assert_eq!(sampler.session_id(), Some(SessionId::new(2)));

    let fourth = sampler.sample().unwrap();
    assert_eq!(fourth.cpu_used_percent, Some(50.0));

    assert!(matches!(sampler.sample(), Err(Error::Other)));
    assert_eq!(sampler.session_id(), None);
    assert_eq!(sampler.sample().unwrap().cpu_used_percent, None);

    let backwards = sampler.sample().unwrap();
    assert_eq!(backwards.cpu_used_delta_ms, None);
    assert_eq!(backwards.cpu_stolen_percent, Some(1.0));
}

#[test]
fn error_codes_and_texts_match_the_c_api() {
    let cases: [(Error, u32, &str); 10] = [
        (Error::Other, 1, "VMGUESTLIB_ERROR_OTHER"),
        (
            Error::NotRunningInVm,
            2,
            "VMGUESTLIB_ERROR_NOT_RUNNING_IN_VM",
        ),
        (Error::NotEnabled, 3, "VMGUESTLIB_ERROR_NOT_ENABLED"),
        (
            Error::NotAvailable {
                stat: Stat::CpuStolenMs,
            },
            4,
            "VMGUESTLIB_ERROR_NOT_AVAILABLE",
        ),
        (Error::NoInfo, 5, "VMGUESTLIB_ERROR_NO_INFO"),
        (Error::Memory, 6, "VMGUESTLIB_ERROR_MEMORY"),
        (
            Error::BufferTooSmall,
            7,
            "VMGUESTLIB_ERROR_BUFFER_TOO_SMALL",
        ),
        (Error::InvalidHandle, 8, "VMGUESTLIB_ERROR_INVALID_HANDLE"),
        (Error::InvalidArg, 9, "VMGUESTLIB_ERROR_INVALID_ARG"),
        (
            Error::UnsupportedVersion {
                stat: Stat::MemShares,
            },
            10,
            "VMGUESTLIB_ERROR_UNSUPPORTED_VERSION",
        ),
    ];
    for (error, code, name) in cases {
        assert_eq!(error.code(), code);
        assert_eq!(error.kind().c_name(), name);
        assert_eq!(ErrorCode::from_code(code), Some(error.kind()));
        // Display speaks to a Rust user: no C function names, no page references.
        let text = error.to_string();
        assert!(!text.contains("VMGuestLib_"), "{text}");
        assert!(!text.contains("page "), "{text}");
        assert!(!text.contains("  "), "{text}");
    }
    // The guide's text stays available, verbatim, for users who know the C API.
    assert_eq!(
        ErrorCode::NoInfo.description(),
        "The handle data structure does not contain any information. You must call \
         VMGuestLib_UpdateInfo to update the data structure."
    );
    assert_eq!(
        Error::NotAvailable {
            stat: Stat::CpuStolenMs
        }
        .to_string(),
        "cpu_stolen_ms is not available from this backend on this host"
    );
    assert_eq!(ErrorCode::from_code(0), Some(ErrorCode::Success));
    assert_eq!(ErrorCode::from_code(11), None);
    assert_eq!(
        ErrorCode::NoInfo.error_text(),
        "VMGuestLib_UpdateInfo() has not been called"
    );
}

#[test]
fn stat_names_are_unique_and_round_trip() {
    let mut names: Vec<&str> = Stat::ALL.iter().map(|stat| stat.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Stat::ALL.len());
    for &stat in Stat::ALL {
        assert_eq!(stat.name().parse::<Stat>().unwrap(), stat);
        assert!(stat
            .name()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        assert!(stat.c_function().starts_with("VMGuestLib_Get"));
        assert!(!stat.description().is_empty());
        assert_eq!(
            serde_json::to_string(&stat).unwrap(),
            format!("\"{}\"", stat.name())
        );
    }
    assert_eq!(Stat::MemBalloonedMb.unit().to_string(), "MB");
    assert_eq!(Stat::CpuLimitMhz.unit().to_string(), "MHz");
    assert_eq!(Stat::CpuStolenMs.unit().to_string(), "ms");
    assert!("no_such_stat".parse::<Stat>().is_err());
}

#[test]
fn snapshot_serde_round_trip_and_generic_iteration() {
    let mut stats = FakeGuestStats::example();
    stats.update().unwrap();
    let snapshot = stats.snapshot().unwrap();
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(json["backend"], "fake");
    assert_eq!(json["mem_limit_mb"], 8_192);
    assert!(json["host_cpu_used_ms"].is_null());
    let back: Snapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, snapshot);
    for (stat, value) in snapshot.iter() {
        assert_eq!(value, stats.stat(stat).ok(), "{stat}");
    }
    let mut edited = snapshot.clone();
    assert!(!edited.set(Stat::MemLimitMb, Some(StatValue::from("text"))));
    assert_eq!(edited, snapshot);
    assert!(edited.set(Stat::MemLimitMb, None));
    assert_eq!(edited.mem_limit_mb, None);
    assert_eq!(SessionId::new(0xabc).to_string(), "0xabc");
}

#[test]
fn boxed_trait_objects_work() {
    let mut boxed: Box<dyn GuestStats> = Box::new(FakeGuestStats::example());
    boxed.update().unwrap();
    assert_eq!(boxed.backend(), "fake");
    assert!(boxed.mem_limit_mb().is_ok());
    let mut sampler = Sampler::new(boxed);
    sampler.sample().unwrap();
}
