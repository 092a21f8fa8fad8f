//! The VMware stack end to end: rpci + guestlib + the backend against the simulated host
//! (both data versions, fallback, checkpoints, closed channels, refusals, garbled replies),
//! golden vectors built from the documented layouts, and the real detection on this machine.
#![cfg(feature = "vmware")]

use guest_stats::vmware::facts::{self, VmxProduct};
use guest_stats::vmware::guestlib::{self, GuestlibInfo};
use guest_stats::vmware::rpci::{self, RpciOptions};
use guest_stats::vmware::sim::SimHost;
use guest_stats::vmware::{backdoor, detect, VmwareGuestStats};
use guest_stats::{Error, GuestStats, Sampler, SessionId, Stat, StatValue};

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .filter(|token| *token != "|")
        .map(|byte| u8::from_str_radix(byte, 16).unwrap())
        .collect()
}

/// The synthesized v3 reply of the research notes (§4.4), prefix included: four statistics,
/// session 0x0123456789abcdef.
const RESEARCH_V3: &str =
    "31 20 | 03 00 00 00 | ef cd ab 89 67 45 23 01 | 38 00 00 00 | 00 00 00 04 | \
    00 00 00 01 00 00 00 01 00 00 03 e8 | 00 00 00 02 00 00 00 00 00 00 00 00 | \
    00 00 00 03 00 00 00 01 00 00 07 d0 | 00 00 00 04 00 00 00 01 00 00 00 00 07 5b cd 15";

#[test]
fn golden_v3_from_the_documented_layout() {
    let raw = hex(RESEARCH_V3);
    assert_eq!(raw.len(), 74);
    let reply = rpci::RpcReply::parse(&raw).unwrap();
    assert!(reply.success);
    let info = guestlib::decode_v3(&reply.payload).unwrap();
    assert_eq!(info.session_id, SessionId::new(0x0123_4567_89ab_cdef));
    assert_eq!(
        info.stat(Stat::CpuReservationMhz).unwrap(),
        StatValue::U64(1_000)
    );
    assert!(matches!(
        info.stat(Stat::CpuLimitMhz),
        Err(Error::NotAvailable { .. })
    ));
    assert_eq!(info.stat(Stat::CpuShares).unwrap(), StatValue::U64(2_000));
    assert_eq!(
        info.stat(Stat::CpuUsedMs).unwrap(),
        StatValue::U64(123_456_789)
    );
    // A host that sends four statistics is too old for the fifth and later.
    assert!(matches!(
        info.stat(Stat::HostProcessorSpeedMhz),
        Err(Error::UnsupportedVersion { .. })
    ));
    // The crate's encoder produces exactly the documented bytes.
    assert_eq!(guestlib::encode_v3(&info), reply.payload);
}

/// Big-endian XDR by hand, independent of the crate's encoder.
struct Xdr(Vec<u8>);

impl Xdr {
    fn u32(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    fn u64(mut self, value: u64) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    fn string(mut self, text: &str) -> Self {
        self = self.u32(text.len() as u32);
        self.0.extend_from_slice(text.as_bytes());
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    fn reply(self, session: u64) -> Vec<u8> {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&session.to_le_bytes());
        bytes.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&self.0);
        bytes
    }
}

#[test]
fn golden_v3_with_path_stolen_time_long_path_and_64_bit_shares() {
    let mut xdr = Xdr(Vec::new()).u32(38);
    for id in 1..=38u32 {
        xdr = xdr.u32(id);
        xdr = match id {
            4 | 17 | 19 | 20 | 22..=30 => xdr.u32(1).u64(u64::from(id) * 1_000_000_007),
            18 => xdr.u32(1).string("/Datacenter/host/Cluster/Resources/prod"),
            37 => xdr
                .u32(1)
                .string("/Datacenter/host/Cluster/Resources/prod/a-very-long-child"),
            38 => xdr.u32(1).u64(5_000_000_000),
            7 => xdr.u32(0).u32(0xdead_beef), // invalid: the value must be ignored
            _ => xdr.u32(1).u32(id * 10),
        };
    }
    let info = guestlib::decode_v3(&xdr.reply(42)).unwrap();
    assert_eq!(info.session_id, SessionId::new(42));
    assert_eq!(
        info.stat(Stat::CpuStolenMs).unwrap(),
        StatValue::U64(19 * 1_000_000_007)
    );
    assert_eq!(
        info.stat(Stat::HostMemPhysMb).unwrap(),
        StatValue::U64(26 * 1_000_000_007)
    );
    assert_eq!(
        info.stat(Stat::MemBalloonMaxMb).unwrap(),
        StatValue::U64(360)
    );
    assert!(matches!(
        info.stat(Stat::MemLimitMb),
        Err(Error::NotAvailable { .. })
    ));
    // The long path (id 37) and 64-bit shares (id 38) win over ids 18 and 8.
    assert_eq!(
        info.stat(Stat::ResourcePoolPath).unwrap(),
        StatValue::Text("/Datacenter/host/Cluster/Resources/prod/a-very-long-child".into())
    );
    assert_eq!(
        info.stat(Stat::MemShares).unwrap(),
        StatValue::U64(5_000_000_000)
    );
}

#[test]
fn v3_from_a_newer_host_stops_at_unknown_ids() {
    let mut xdr = Xdr(Vec::new()).u32(40);
    for id in 1..=40u32 {
        xdr = xdr.u32(id).u32(1);
        xdr = match id {
            4 | 17 | 19 | 20 | 22..=30 | 38 => xdr.u64(1),
            18 | 37 => xdr.string("/p"),
            39 | 40 => xdr.u32(7).u32(7).u32(7), // some future arm this crate cannot know
            _ => xdr.u32(1),
        };
    }
    let info = guestlib::decode_v3(&xdr.reply(1)).unwrap();
    assert_eq!(info.stat(Stat::MemBalloonMaxMb).unwrap(), StatValue::U64(1));
}

#[test]
fn golden_v2_from_the_documented_offsets() {
    let mut raw = vec![0u8; 669];
    raw[0..4].copy_from_slice(&2u32.to_le_bytes());
    raw[4..12].copy_from_slice(&0x0bad_cafe_u64.to_le_bytes());
    let mut put32 = |offset: usize, value: u32| {
        raw[offset] = 1;
        raw[offset + 4..offset + 8].copy_from_slice(&value.to_le_bytes());
    };
    put32(20, 4_000); // cpuLimitMHz
    put32(48, 2_400); // hostMHz
    put32(104, 256); // memBalloonedMB
    put32(136, 3_000); // memUsedMB
    raw[36] = 1; // cpuUsedMs (StatUint64 at 36)
    raw[40..48].copy_from_slice(&9_876_543_210u64.to_le_bytes());
    raw[144] = 1; // elapsedMs
    raw[148..156].copy_from_slice(&86_400_000u64.to_le_bytes());
    raw[156] = 1;
    raw[157..157 + 8].copy_from_slice(b"/ha-root");

    let info = guestlib::decode_v2(&raw).unwrap();
    assert_eq!(info.version, 2);
    assert_eq!(info.session_id, SessionId::new(0x0bad_cafe));
    assert_eq!(info.stat(Stat::CpuLimitMhz).unwrap(), StatValue::U64(4_000));
    assert_eq!(
        info.stat(Stat::HostProcessorSpeedMhz).unwrap(),
        StatValue::U64(2_400)
    );
    assert_eq!(
        info.stat(Stat::MemBalloonedMb).unwrap(),
        StatValue::U64(256)
    );
    assert_eq!(info.stat(Stat::MemUsedMb).unwrap(), StatValue::U64(3_000));
    assert_eq!(
        info.stat(Stat::CpuUsedMs).unwrap(),
        StatValue::U64(9_876_543_210)
    );
    assert_eq!(
        info.stat(Stat::ElapsedMs).unwrap(),
        StatValue::U64(86_400_000)
    );
    assert_eq!(
        info.stat(Stat::ResourcePoolPath).unwrap(),
        StatValue::Text("/ha-root".into())
    );
    assert!(matches!(
        info.stat(Stat::CpuReservationMhz),
        Err(Error::NotAvailable { .. })
    ));
    assert!(matches!(
        info.stat(Stat::CpuStolenMs),
        Err(Error::UnsupportedVersion { .. })
    ));
    assert_eq!(guestlib::encode_v2(&info), raw);

    // A path without a terminating NUL ends at byte 667, as the C library forces.
    raw[157..668].fill(b'x');
    raw[668] = b'y';
    let info = guestlib::decode_v2(&raw).unwrap();
    assert_eq!(
        info.stat(Stat::ResourcePoolPath)
            .unwrap()
            .as_text()
            .unwrap()
            .len(),
        511
    );
}

#[test]
fn malformed_replies_are_clear_errors() {
    let good = guestlib::encode_v3(
        &GuestlibInfo::new(3, SessionId::new(9)).with(Stat::CpuLimitMhz, Some(1u64.into())),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "short header",
            good[..10].to_vec(),
            "shorter than the 16-byte header",
        ),
        (
            "wrong version",
            {
                let mut b = good.clone();
                b[0] = 2;
                b
            },
            "version 2",
        ),
        (
            "data size lie",
            {
                let mut b = good.clone();
                b[12] = 200;
                b
            },
            "announces 200 data bytes",
        ),
        (
            "truncated data",
            {
                let mut b = good.clone();
                let size = (b.len() - 16 - 2) as u32;
                b[12..16].copy_from_slice(&size.to_le_bytes());
                b.truncate(b.len() - 2);
                b
            },
            "truncated",
        ),
        (
            "ids out of order",
            {
                let mut b = good.clone();
                b[23] = 5;
                b
            },
            "ids must be 1, 2, 3",
        ),
        (
            "huge count",
            {
                let mut b = good.clone();
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            },
            "cannot fit",
        ),
    ];
    for (name, bytes, expected) in cases {
        match guestlib::decode_v3(&bytes) {
            Err(error @ Error::Decode { version: 3, .. }) => {
                assert!(error.to_string().contains(expected), "{name}: {error}");
                assert_eq!(error.code(), 1);
            }
            other => panic!("{name}: expected a v3 decode error, got {other:?}"),
        }
    }
    let error = guestlib::decode_v2(&[0u8; 668]).unwrap_err();
    assert!(error.to_string().contains("exactly 669"), "{error}");
    let mut wrong = vec![0u8; 669];
    wrong[0] = 3;
    assert!(guestlib::decode_v2(&wrong)
        .unwrap_err()
        .to_string()
        .contains("version 3"));

    let mut oversized = Xdr(Vec::new()).u32(18);
    for id in 1..=17u32 {
        oversized = oversized.u32(id).u32(0).u32(0);
        if matches!(id, 4 | 17) {
            oversized = oversized.u32(0);
        }
    }
    let oversized = oversized.u32(18).u32(1).string(&"p".repeat(513)).reply(1);
    assert!(guestlib::decode_v3(&oversized)
        .unwrap_err()
        .to_string()
        .contains("at most 512"));
}

fn full_info(session: u64, elapsed: u64) -> GuestlibInfo {
    Stat::ALL.iter().enumerate().fold(
        GuestlibInfo::new(3, SessionId::new(session)),
        |info, (index, &stat)| {
            let value = match stat {
                Stat::ResourcePoolPath => StatValue::Text("/pool".into()),
                Stat::ElapsedMs => StatValue::U64(elapsed),
                Stat::CpuUsedMs => StatValue::U64(elapsed / 2),
                Stat::CpuStolenMs => StatValue::U64(elapsed / 100),
                Stat::HostProcessorSpeedMhz => StatValue::U64(2_000),
                _ => StatValue::U64(index as u64 * 3),
            };
            info.with(stat, Some(value))
        },
    )
}

#[test]
fn v3_host_end_to_end() {
    let mut stats =
        VmwareGuestStats::with_backdoor(SimHost::guestlib(vec![full_info(7, 1_000)], 3));
    assert!(matches!(stats.cpu_stolen_ms(), Err(Error::NoInfo)));
    assert_eq!(stats.update().unwrap(), SessionId::new(7));
    assert_eq!(stats.data_version(), Some(3));
    assert_eq!(stats.backend(), "vmware");
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 10);
    assert_eq!(stats.resource_pool_path().unwrap(), "/pool");
    let snapshot = stats.snapshot().unwrap();
    assert_eq!(snapshot.backend, "vmware");
    assert_eq!(snapshot.available().count(), Stat::ALL.len());
    let host = stats.backdoor_mut();
    assert_eq!(host.requests(), [b"guestlib.info.get 3".to_vec()]);
    assert_eq!(host.open_channels(), 0, "every request closes its channel");
}

#[test]
fn v2_host_falls_back_and_sticks_to_v2() {
    let mut stats =
        VmwareGuestStats::with_backdoor(SimHost::guestlib(vec![full_info(7, 1_000)], 2));
    assert_eq!(stats.update().unwrap(), SessionId::new(7));
    assert_eq!(stats.data_version(), Some(2));
    assert_eq!(stats.mem_limit_mb().unwrap(), 18);
    assert!(matches!(
        stats.cpu_stolen_ms(),
        Err(Error::UnsupportedVersion {
            stat: Stat::CpuStolenMs
        })
    ));
    let snapshot = stats.snapshot().unwrap();
    assert_eq!(snapshot.cpu_stolen_ms, None);
    stats.update().unwrap();
    assert_eq!(
        stats.backdoor_mut().requests(),
        [
            b"guestlib.info.get 3".to_vec(),
            b"guestlib.info.get 2".to_vec(),
            b"guestlib.info.get 2".to_vec(),
        ]
    );
}

#[test]
fn session_change_on_a_v2_host_renegotiates_from_v3() {
    let host = SimHost::guestlib(vec![full_info(1, 1_000), full_info(2, 10)], 2);
    let mut stats = VmwareGuestStats::with_backdoor(host);
    stats.update().unwrap();
    assert_eq!(stats.update().unwrap(), SessionId::new(2));
    let requests: Vec<String> = stats
        .backdoor_mut()
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(
        requests,
        [
            "guestlib.info.get 3",
            "guestlib.info.get 2",
            "guestlib.info.get 2",
            "guestlib.info.get 3",
            "guestlib.info.get 2"
        ]
    );
}

#[test]
fn host_without_guestlib_is_not_enabled() {
    let mut stats = VmwareGuestStats::with_backdoor(SimHost::without_guestlib());
    let error = stats.update().unwrap_err();
    assert!(matches!(error, Error::NotEnabled));
    assert_eq!(error.code(), 3);
    assert!(matches!(stats.mem_limit_mb(), Err(Error::NoInfo)));
    // "Unknown command" ends the negotiation at once: no v2 attempt.
    assert_eq!(stats.backdoor_mut().requests().len(), 1);
    let version = facts::version(stats.backdoor_mut()).unwrap();
    assert_eq!(version.product, VmxProduct::Workstation);
}

#[test]
fn a_failed_update_invalidates_earlier_data() {
    let mut calls = 0;
    let host = SimHost::new(move |_| {
        calls += 1;
        if calls == 1 {
            let mut reply = b"1 ".to_vec();
            reply.extend(guestlib::encode_v3(&full_info(5, 100)));
            reply
        } else {
            b"1 garbage".to_vec()
        }
    });
    let mut stats = VmwareGuestStats::with_backdoor(host);
    stats.update().unwrap();
    assert!(stats.elapsed_ms().is_ok());
    assert!(matches!(
        stats.update(),
        Err(Error::Decode { version: 3, .. })
    ));
    assert!(matches!(stats.elapsed_ms(), Err(Error::NoInfo)));
}

/// Counts the message calls of one clean exchange, so fault tests can hit every one of them.
fn calls_of_one_update(host: SimHost) -> u64 {
    let mut stats = VmwareGuestStats::with_backdoor(host);
    stats.update().unwrap();
    stats.backdoor_mut().message_calls()
}

#[test]
fn a_checkpoint_at_any_step_is_retried() {
    for low_bandwidth_only in [false, true] {
        let host = || {
            let host = SimHost::guestlib(vec![full_info(3, 500)], 3);
            if low_bandwidth_only {
                host.without_high_bandwidth()
            } else {
                host
            }
        };
        let calls = calls_of_one_update(host());
        assert!(calls >= 6);
        for call in 0..calls {
            let mut stats = VmwareGuestStats::with_backdoor(host().checkpoint_at(call));
            assert_eq!(
                stats.update().unwrap(),
                SessionId::new(3),
                "checkpoint at call {call}"
            );
            assert_eq!(stats.elapsed_ms().unwrap(), 500);
            assert_eq!(stats.backdoor_mut().open_channels(), 0);
        }
    }
}

#[test]
fn endless_checkpoints_give_up_with_an_error() {
    let mut host = SimHost::guestlib(vec![full_info(3, 500)], 3);
    for call in 1..200 {
        host = host.checkpoint_at(call);
    }
    let mut stats = VmwareGuestStats::with_backdoor(host)
        .with_rpci_options(RpciOptions::default().checkpoint_retries(3));
    let error = stats.update().unwrap_err();
    assert!(matches!(error, Error::Channel { .. }), "{error:?}");
    assert!(error.to_string().contains("checkpoints"), "{error}");
}

#[test]
fn a_channel_closed_at_any_step_is_an_error_not_a_panic() {
    let calls =
        calls_of_one_update(SimHost::guestlib(vec![full_info(3, 500)], 3).without_high_bandwidth());
    for call in 0..calls {
        let host = SimHost::guestlib(vec![full_info(3, 500)], 3)
            .without_high_bandwidth()
            .close_at(call);
        let mut stats = VmwareGuestStats::with_backdoor(host);
        match stats.update() {
            // Closing at the very last step (CLOSE itself) loses nothing.
            Ok(session) => assert_eq!(session, SessionId::new(3), "close at call {call}"),
            Err(error) => {
                assert!(
                    matches!(error, Error::Channel { .. }),
                    "close at {call}: {error:?}"
                );
                assert!(matches!(stats.elapsed_ms(), Err(Error::NoInfo)));
            }
        }
    }
}

#[test]
fn channel_options_and_old_hosts() {
    // A host without cookies, one without high bandwidth, and a guest that refuses it: all
    // produce the same statistics.
    let expected = full_info(11, 2_000);
    let hosts = [
        SimHost::guestlib(vec![expected.clone()], 3).without_cookies(),
        SimHost::guestlib(vec![expected.clone()], 3).without_high_bandwidth(),
        SimHost::guestlib(vec![expected.clone()], 3),
    ];
    let mut calls = Vec::new();
    for (index, host) in hosts.into_iter().enumerate() {
        let options = RpciOptions::default().high_bandwidth(index != 2);
        let mut stats = VmwareGuestStats::with_backdoor(host).with_rpci_options(options);
        stats.update().unwrap();
        assert_eq!(stats.info().unwrap(), &expected);
        calls.push(stats.backdoor_mut().message_calls());
    }
    // 4 bytes a call costs many more calls than one string transfer.
    assert!(calls[1] > calls[0] * 10, "{calls:?}");
    assert_eq!(calls[1], calls[2]);
}

#[test]
fn refusals_and_protocol_errors() {
    let mut stats = VmwareGuestStats::with_backdoor(
        SimHost::guestlib(vec![full_info(1, 1)], 3).refusing_channels(),
    );
    let error = stats.update().unwrap_err();
    assert!(error.to_string().contains("refused to open"), "{error}");

    // Message calls of one exchange: OPEN, SENDSIZE, HB send, RECVSIZE, …
    let mut stats = VmwareGuestStats::with_backdoor(
        SimHost::guestlib(vec![full_info(1, 1)], 3).wrong_type_at(3),
    );
    let error = stats.update().unwrap_err();
    assert!(error.to_string().contains("protocol error"), "{error}");
    assert_eq!(stats.backdoor_mut().open_channels(), 0);

    for (reply, expected) in [
        (b"".to_vec(), "does not start with"),
        (b"garbage".to_vec(), "does not start with"),
        (b"1 \x03\x00".to_vec(), "shorter than the 16-byte header"),
        (vec![b'1'; 2 << 20], "larger than"),
    ] {
        let mut stats = VmwareGuestStats::with_backdoor(SimHost::new(move |_| reply.clone()));
        let error = stats.update().unwrap_err();
        assert!(error.to_string().contains(expected), "{expected}: {error}");
        assert_eq!(error.code(), 1);
    }
}

#[test]
fn backdoor_facts() {
    let mut host = SimHost::guestlib(Vec::new(), 3);
    let version = facts::version(&mut host).unwrap();
    assert_eq!(version.version, facts::VERSION_MAGIC);
    assert_eq!(version.product, VmxProduct::Esx);
    assert_eq!(facts::processor_mhz(&mut host).unwrap(), 2_600);
    let time = facts::host_time(&mut host).unwrap();
    assert_eq!((time.seconds, time.micros), (1_763_700_000, 250_000));
    assert!(time.system_time() > std::time::UNIX_EPOCH);
    let mut broken = SimHost::guestlib(Vec::new(), 3).with_mhz(0).with_time(None);
    assert!(matches!(
        facts::processor_mhz(&mut broken),
        Err(Error::BackdoorCommand {
            command: "GETMHZ",
            ..
        })
    ));
    assert!(matches!(
        facts::host_time(&mut broken),
        Err(Error::BackdoorCommand {
            command: "GETTIME",
            ..
        })
    ));
    assert_eq!(VmxProduct::from_ecx(0xFFFF_0000), VmxProduct::Unset);
}

#[test]
fn sampler_over_a_vmotion() {
    let host = SimHost::guestlib(
        vec![
            full_info(1, 10_000),
            full_info(1, 12_000),
            full_info(2, 500),
        ],
        3,
    );
    let mut sampler = Sampler::new(VmwareGuestStats::with_backdoor(host));
    sampler.sample().unwrap();
    let interval = sampler.sample().unwrap();
    assert_eq!(interval.cpu_used_percent, Some(50.0));
    assert_eq!(interval.cpu_stolen_percent, Some(1.0));
    assert_eq!(interval.effective_cpu_mhz, Some(1_000.0));
    let moved = sampler.sample().unwrap();
    assert!(moved.session_changed);
    assert_eq!(moved.cpu_used_percent, None);
}

/// The real detection on this machine: the backdoor instruction must never run unless CPUID
/// or DMI says VMware, and opening must not crash anywhere.
#[test]
fn open_on_this_machine_never_crashes() {
    let cpuid = backdoor::read_cpuid();
    let vmware =
        detect::select_interface(&cpuid, detect::dmi_says_vmware(std::path::Path::new("/")));
    match VmwareGuestStats::open() {
        Ok(mut stats) => {
            assert!(vmware.is_ok());
            // On a real VMware guest: an ESXi host answers, Workstation says NotEnabled.
            match stats.update() {
                Ok(session) => assert!(session.is_valid()),
                Err(error) => assert!(matches!(error, Error::NotEnabled), "{error:?}"),
            }
        }
        Err(Error::NotRunningInVm) => eprintln!(
            "not a VMware guest: {:?}",
            String::from_utf8_lossy(&cpuid.vendor)
        ),
        Err(Error::BackdoorDenied { detail }) => {
            assert!(vmware.is_ok());
            eprintln!("VMware refused the backdoor: {detail}");
        }
        Err(other) => panic!("unexpected error opening the VMware backend: {other:?}"),
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any request and reply bytes, of any length (so every 4-byte tail), over either
        /// transfer mode, with or without cookies, with checkpoints anywhere: the guest gets
        /// exactly the host's reply, or a clear error, and the host got exactly the request.
        #[test]
        fn rpci_carries_any_bytes(
            request in proptest::collection::vec(any::<u8>(), 0..300),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            success in any::<bool>(),
            high_bandwidth in any::<bool>(),
            cookies in any::<bool>(),
            checkpoints in proptest::collection::btree_set(0u64..200, 0..4),
        ) {
            let mut reply = if success { b"1 ".to_vec() } else { b"0 ".to_vec() };
            reply.extend_from_slice(&payload);
            let answer = reply.clone();
            let mut host = SimHost::new(move |_| answer.clone());
            if !high_bandwidth {
                host = host.without_high_bandwidth();
            }
            if !cookies {
                host = host.without_cookies();
            }
            for &call in &checkpoints {
                host = host.checkpoint_at(call);
            }
            let received = rpci::send_one(&mut host, &RpciOptions::default(), &request);
            prop_assert!(received.is_ok(), "{:?}", received);
            let received = received.unwrap();
            prop_assert_eq!(received.success, success);
            prop_assert_eq!(&received.payload, &payload);
            prop_assert_eq!(host.requests().last().unwrap(), &request);
            prop_assert_eq!(host.open_channels(), 0);
        }

        /// Any reply bytes through the whole backend: statistics or an error, never a panic.
        #[test]
        fn backend_survives_any_reply(reply in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut stats = VmwareGuestStats::with_backdoor(SimHost::new(move |_| reply.clone()));
            if stats.update().is_ok() {
                prop_assert!(stats.snapshot().is_ok());
            } else {
                prop_assert!(matches!(stats.snapshot(), Err(Error::NoInfo)));
            }
        }
    }
}

#[test]
fn raw_statistics_like_stat_raw() {
    use guest_stats::vmware::guestlib::StatEncoding;
    let host = SimHost::new(|request| match request {
        b"guestlib.stat.get json session" => b"1 {\"session\":{\"type\":\"static\"}}".to_vec(),
        b"guestlib.stat.get text" => b"1 session\nhost\nresources\nvscsi\nvnet\n".to_vec(),
        _ => b"0 Unknown stat".to_vec(),
    });
    let mut stats = VmwareGuestStats::with_backdoor(host);
    assert_eq!(
        stats.stat_raw(StatEncoding::Json, "session").unwrap(),
        "{\"session\":{\"type\":\"static\"}}"
    );
    assert!(stats
        .stat_raw(StatEncoding::Text, "")
        .unwrap()
        .contains("vnet"));
    let error = stats
        .stat_raw(StatEncoding::Yaml, "vnet 00:50:56:aa:bb:cc")
        .unwrap_err();
    assert!(
        matches!(&error, Error::RawStatNotAvailable { name } if name == "vnet 00:50:56:aa:bb:cc")
    );
    assert_eq!(error.code(), 4);
    assert!(error.is_missing_statistic());
    assert!(matches!(
        stats.stat_raw(StatEncoding::Text, &"x".repeat(300)),
        Err(Error::BufferTooSmall)
    ));
    assert!(matches!(
        stats.stat_raw(StatEncoding::Text, "a\0b"),
        Err(Error::InvalidArg)
    ));
    // Only the three well-formed requests reached the host.
    assert_eq!(stats.backdoor_mut().requests().len(), 3);
}
