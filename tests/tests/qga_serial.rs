//! The character-device path against a real qemu-ga of each generation (7.2 on the machine,
//! 10.0 in the Debian 13 root) on a serial line (pty pair from socat): the channel outlives
//! clients, so stale data from an earlier client really is waiting for the next one.

use std::io::Write;
use std::time::Duration;

use qga_proto::cmd;
use qga_proto::{AsyncClient, Client, ClientConfig, GuestAgent, GuestAgentExt};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qga::QemuGa;

/// Runs `body` with a serial-line agent of every selected generation.
fn with_each_serial_agent(mut body: impl FnMut(QemuGa)) {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_serial_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        body(qga);
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

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
fn blocking_client_on_a_dirty_serial_line() {
    with_each_serial_agent(|qga| blocking_on_dirty_line(&qga).expect("serial line"));
}

fn blocking_on_dirty_line(qga: &QemuGa) -> qga_proto::Result<()> {
    dirty_the_line(qga);
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

#[test]
fn async_client_on_a_dirty_serial_line() {
    with_each_serial_agent(|qga| {
        runtime()
            .block_on(async_on_dirty_line(qga))
            .expect("serial line")
    });
}

async fn async_on_dirty_line(qga: QemuGa) -> qga_proto::Result<()> {
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

#[test]
fn address_strings_reach_the_serial_line() {
    with_each_serial_agent(|qga| {
        runtime()
            .block_on(address_reaches(qga))
            .expect("serial line")
    });
}

async fn address_reaches(qga: QemuGa) -> qga_proto::Result<()> {
    let uri = format!("qga+serial://{}", qga.serial_path().display());
    let agent = AsyncClient::connect(&uri, config()).await?;
    assert_eq!(agent.sync(12345).await?, 12345);
    Ok(())
}
