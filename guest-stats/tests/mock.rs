//! Expectation-style tests with mockall's `MockGuestStats` (feature `mock`).
#![cfg(feature = "mock")]

use guest_stats::{Error, GuestStats, MockGuestStats, SessionId, Stat, StatValue};

/// Code under test: reads the stolen time once per update, and says so when the session moved.
fn stolen_report(
    stats: &mut dyn GuestStats,
    last: &mut Option<SessionId>,
) -> guest_stats::Result<String> {
    let session = stats.update()?;
    let moved = last.is_some_and(|last| last != session);
    *last = Some(session);
    let stolen = stats.cpu_stolen_ms()?;
    Ok(if moved {
        format!("{stolen} ms (new session)")
    } else {
        format!("{stolen} ms")
    })
}

#[test]
fn mock_drives_code_under_test() {
    let mut mock = MockGuestStats::new();
    let mut sessions = [SessionId::new(1), SessionId::new(2)].into_iter();
    mock.expect_update()
        .times(2)
        .returning(move || Ok(sessions.next().unwrap()));
    mock.expect_cpu_stolen_ms().times(2).returning(|| Ok(42));
    let mut last = None;
    assert_eq!(stolen_report(&mut mock, &mut last).unwrap(), "42 ms");
    assert_eq!(
        stolen_report(&mut mock, &mut last).unwrap(),
        "42 ms (new session)"
    );
}

#[test]
fn mock_returns_c_api_errors() {
    let mut mock = MockGuestStats::new();
    mock.expect_update().returning(|| Err(Error::NotEnabled));
    let error = stolen_report(&mut mock, &mut None).unwrap_err();
    assert_eq!(error.code(), 3);

    let mut mock = MockGuestStats::new();
    mock.expect_stat()
        .withf(|stat| *stat == Stat::ResourcePoolPath)
        .returning(|_| Ok(StatValue::from("/pool")));
    assert_eq!(
        mock.stat(Stat::ResourcePoolPath).unwrap().to_string(),
        "/pool"
    );
}
