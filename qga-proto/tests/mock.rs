//! The mockall mock (feature `mock`) stands in for `dyn GuestAgent`.
#![cfg(feature = "mock")]

use qga_proto::types::GuestHostName;
use qga_proto::{Error, ErrorClass, GuestAgent, MockGuestAgent};

async fn describe(agent: &dyn GuestAgent) -> String {
    match agent.host_name().await {
        Ok(h) => h.host_name,
        Err(e) if e.is_unsupported() => "<no host name>".into(),
        Err(e) => format!("<{e}>"),
    }
}

#[tokio::test]
async fn mock_expectations_on_typed_methods() {
    let mut mock = MockGuestAgent::new();
    mock.expect_host_name().times(1).returning(|| {
        Ok(GuestHostName {
            host_name: "mocked".into(),
        })
    });
    assert_eq!(describe(&mock).await, "mocked");

    let mut mock = MockGuestAgent::new();
    mock.expect_host_name().returning(|| {
        Err(Error::Agent {
            class: ErrorClass::CommandNotFound,
            desc: "Command guest-get-host-name has been disabled".into(),
        })
    });
    assert_eq!(describe(&mock).await, "<no host name>");
}
