//! The character-device path against a real qemu-ga on a serial line (pty
//! pair from socat): the channel outlives clients, so stale data from an
//! earlier client really is waiting for the next one.

use std::io::Write;
use std::time::Duration;

use qga_proto::cmd;
use qga_proto::{AsyncClient, Client, ClientConfig, GuestAgent, GuestAgentExt};
use vmsdk_tests::qga::QemuGa;

fn config() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(10))
        .sync_timeout(Duration::from_secs(3))
}

/// Leaves an unread reply and half a request on the line, as a client killed
/// mid-call would.
fn dirty_the_line(qga: &QemuGa) {
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(qga.serial_path())
        .expect("open host tty");
    tty.write_all(b"{\"execute\":\"guest-info\"}\n{\"execute\": \"guest-get-ho")
        .expect("write");
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn blocking_client_on_a_dirty_serial_line() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start_serial() else {
        return Ok(());
    };
    dirty_the_line(&qga);
    let mut client = Client::open_serial(qga.serial_path(), config())?;
    assert!(client.call::<cmd::GuestInfo>(&())?.is_enabled("guest-ping"));
    assert!(!client
        .call::<cmd::GuestGetHostName>(&())?
        .host_name
        .is_empty());
    let out = client.exec_wait(
        cmd::GuestExecArgs::new("/bin/echo")
            .arg("over serial")
            .capture(),
        Some(Duration::from_secs(10)),
    )?;
    assert_eq!(out.stdout, b"over serial\n");
    Ok(())
}

#[tokio::test]
async fn async_client_on_a_dirty_serial_line() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start_serial() else {
        return Ok(());
    };
    dirty_the_line(&qga);
    let agent: Box<dyn GuestAgent> =
        Box::new(AsyncClient::open_serial(qga.serial_path(), config())?);
    agent.ping().await?;
    assert!(agent.osinfo().await?.kernel_release.is_some());
    let sample = qga.put_file("serial.txt", b"via the tty\n");
    assert_eq!(
        agent.read_file(sample.to_str().unwrap()).await?,
        b"via the tty\n"
    );
    // The agent restarts behind the line; the line stays, the client re-syncs.
    let mut qga = qga;
    qga.restart();
    let err = agent.host_name().await;
    if let Err(e) = &err {
        assert!(e.is_channel_error(), "{e}");
    }
    assert!(!agent.host_name().await?.host_name.is_empty());
    Ok(())
}

#[tokio::test]
async fn address_strings_reach_the_serial_line() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start_serial() else {
        return Ok(());
    };
    let uri = format!("qga+serial://{}", qga.serial_path().display());
    let agent = AsyncClient::connect(&uri, config()).await?;
    assert_eq!(agent.sync(12345).await?, 12345);
    Ok(())
}
