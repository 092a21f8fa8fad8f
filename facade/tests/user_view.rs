//! The SDK as a user crate meets it: only `vmsdk` paths, no other crate of the workspace named.
//! Mocks behind the pointers the facade hands out, `?` across capabilities, serde shapes, and
//! error messages that do not repeat their sources.

#![cfg(all(
    feature = "stats",
    feature = "agent",
    feature = "disk",
    feature = "mock"
))]

use std::error::Error as _;
use std::sync::Arc;

use vmsdk::agent::GuestAgent;
use vmsdk::disk::{Disk, OpenFlags};
use vmsdk::guest_stats::{GuestStats, Interval, Sampler, SessionId, Snapshot, Stat, StatValue};
use vmsdk::mock::{MockGuestAgent, MockGuestStats};
use vmsdk::{BackendChoice, Platform};

/// A monitoring function as a user writes it: it takes what `Platform::guest_stats` returns.
fn stolen_percent(stats: Box<dyn GuestStats>) -> vmsdk::Result<Option<f64>> {
    let mut sampler = Sampler::new(stats);
    sampler.sample()?;
    Ok(sampler.sample()?.cpu_stolen_percent)
}

#[test]
fn a_stats_mock_behind_the_facades_box_is_what_the_code_meets() {
    let mut mock = MockGuestStats::new();
    let mut elapsed = 0;
    mock.expect_update()
        .times(3)
        .returning(|| Ok(SessionId::new(0x5eed)));
    mock.expect_session_id()
        .returning(|| Ok(SessionId::new(0x5eed)));
    mock.expect_backend().return_const("mock");
    // A mock mocks every method, the provided ones too: the sampler asks for `snapshot`.
    mock.expect_snapshot().returning(move || {
        elapsed += 1_000;
        let mut snapshot = Snapshot::new(SessionId::new(0x5eed), "mock");
        snapshot.set(Stat::ElapsedMs, Some(StatValue::U64(elapsed)));
        snapshot.set(Stat::CpuStolenMs, Some(StatValue::U64(elapsed / 10)));
        Ok(snapshot)
    });
    mock.expect_cpu_stolen_ms().times(1).returning(|| Ok(4_242));
    let mut boxed: Box<dyn GuestStats> = Box::new(mock);
    assert_eq!(boxed.cpu_stolen_ms().unwrap(), 4_242);
    boxed.update().unwrap();
    assert_eq!(boxed.session_id().unwrap(), SessionId::new(0x5eed));
    // Elapsed 1000→2000 ms, stolen 100→200 ms between the two samples: 10 %.
    assert_eq!(stolen_percent(boxed).unwrap(), Some(10.0));
}

/// A user's async function that takes the facade's agent handle.
async fn os_name(agent: Arc<dyn GuestAgent>) -> vmsdk::Result<String> {
    let info = agent.osinfo().await?;
    Ok(info.pretty_name.unwrap_or_default())
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_mock_behind_the_facades_arc_answers_typed_calls() {
    let mut mock = MockGuestAgent::new();
    mock.expect_osinfo().times(1).returning(|| {
        Ok(serde_json::from_value(serde_json::json!({"pretty-name": "Mockian 1"})).unwrap())
    });
    let agent: Arc<dyn GuestAgent> = Arc::new(mock);
    assert_eq!(os_name(Arc::clone(&agent)).await.unwrap(), "Mockian 1");
}

/// One function, three capabilities, one error type.
async fn inventory() -> vmsdk::Result<(String, u64, u64)> {
    let platform = Platform::builder().backend(BackendChoice::Fake).build()?;
    let mut stats = platform.guest_stats()?;
    stats.update()?;
    let agent = vmsdk::agent::fake();
    let host = agent.host_name().await?.host_name;
    let disk = vmsdk::disk::open("mem://inventory?size=4M", OpenFlags::read_only())?;
    Ok((host, stats.mem_limit_mb()?, disk.info()?.capacity))
}

#[tokio::test(flavor = "current_thread")]
async fn question_mark_works_across_capabilities() {
    let (host, limit, capacity) = inventory().await.unwrap();
    assert!(!host.is_empty());
    assert!(limit > 0);
    assert_eq!(capacity, 4 << 20);
}

#[test]
fn intervals_and_session_ids_serialise_for_json_readers() {
    let platform = Platform::builder()
        .backend(BackendChoice::Fake)
        .build()
        .unwrap();
    let mut sampler = Sampler::new(platform.guest_stats().unwrap());
    sampler.sample().unwrap();
    let interval = sampler.sample().unwrap();
    let json = serde_json::to_value(&interval).unwrap();
    // Session ids use all 64 bits: a string, as Display prints it, not a number that
    // JavaScript or jq would round.
    let session = json["snapshot"]["session_id"].as_str().expect("a string");
    assert_eq!(session, interval.snapshot.session_id.to_string());
    assert!(session.starts_with("0x"));
    assert!(json["cpu_stolen_percent"].is_number());
    let back: Interval = serde_json::from_value(json).unwrap();
    assert_eq!(back, interval);

    let big = SessionId::new(u64::MAX - 1);
    let text = serde_json::to_string(&big).unwrap();
    assert_eq!(text, "\"0xfffffffffffffffe\"");
    assert_eq!(serde_json::from_str::<SessionId>(&text).unwrap(), big);
}

/// Asserts the rule every error of the SDK keeps: a message does not repeat its source, so a
/// report that walks the chain says each thing once.
fn assert_no_repeated_source(error: &(dyn std::error::Error + 'static)) {
    let mut current = error;
    while let Some(source) = current.source() {
        let (outer, inner) = (current.to_string(), source.to_string());
        assert!(
            !outer.contains(&inner),
            "`{outer}` repeats its source `{inner}`"
        );
        current = source;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn errors_of_every_capability_keep_their_sources_apart() {
    let dir = tempfile::tempdir().unwrap();

    // The agent: a socket that does not exist. The message names it; the OS error is the source.
    let socket = dir.path().join("missing.sock");
    let error = vmsdk::agent::connect(&format!("qga+unix://{}", socket.display()))
        .await
        .err()
        .expect("no agent there");
    assert!(error.to_string().contains(&socket.display().to_string()));
    assert!(error.source().is_some());
    assert_no_repeated_source(&error);

    // A disk: a file that does not exist.
    let missing = dir.path().join("missing.img");
    let Err(error) = vmsdk::disk::open(missing.display().to_string(), OpenFlags::read_only())
    else {
        panic!("a missing disk opened");
    };
    assert!(matches!(error, vmsdk::Error::Disk(_)));
    assert!(error.to_string().contains("missing.img"), "{error}");
    assert!(error.source().is_some(), "{error:?}");
    assert_no_repeated_source(&error);

    // Statistics: a Linux tree whose /proc/stat turns into a directory after detection.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::write(root.join("proc/stat"), "cpu  1 2 3 4 5 6 7 8 0 0\n").unwrap();
    let platform = Platform::builder()
        .backend(BackendChoice::Auto)
        .root(&root)
        .build()
        .unwrap();
    let mut stats = platform.guest_stats().unwrap();
    std::fs::remove_file(root.join("proc/stat")).unwrap();
    let error: vmsdk::Error = stats.update().unwrap_err().into();
    assert!(error.to_string().contains("proc/stat"), "{error}");
    assert_no_repeated_source(&error);

    // The facade's own: no statistics backend for an empty tree; a library user is pointed at
    // the library's switch.
    let empty = Platform::builder()
        .backend(BackendChoice::Auto)
        .root(dir.path().join("empty"))
        .build()
        .unwrap();
    let error = empty.guest_stats().err().expect("no backend");
    assert!(error.to_string().contains("BackendChoice::Fake"), "{error}");
    assert_no_repeated_source(&error);
}

#[test]
fn a_disk_behind_a_box_or_an_arc_is_still_a_disk() {
    /// A user's helper written against the trait, generic over the handle.
    fn first_byte(disk: &impl Disk) -> vmsdk::Result<u8> {
        let mut byte = [0];
        disk.read_at(&mut byte, 0)?;
        Ok(byte[0])
    }
    let disk = vmsdk::disk::open("mem://boxed?size=1M", OpenFlags::read_write()).unwrap();
    disk.write_at(&[0xeb], 0).unwrap();
    assert_eq!(first_byte(&disk).unwrap(), 0xeb);
    let shared: Arc<dyn Disk> = disk.into();
    assert_eq!(first_byte(&shared).unwrap(), 0xeb);
}
