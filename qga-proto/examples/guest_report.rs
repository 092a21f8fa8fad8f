//! Prints what the guest agent knows about its guest.
//!
//! ```text
//! cargo run -p qga-proto --example guest_report -- qga+unix:///run/qemu-server/100.qga
//! cargo run -p qga-proto --example guest_report -- fake
//! ```
//!
//! Commands the agent lacks or has disabled are reported as such instead of
//! failing the whole report.

use std::time::Duration;

use qga_proto::{AsyncClient, ClientConfig, GuestAgent, GuestAgentExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "fake".to_owned());
    let config = ClientConfig::default().timeout(Duration::from_secs(10));
    let agent: Box<dyn GuestAgent> = if address == "fake" {
        Box::new(qga_proto::fake::FakeAgent::linux().connect_async_with(config))
    } else {
        Box::new(AsyncClient::connect(&address, config).await?)
    };

    let info = agent.info().await?;
    let enabled = info.supported_commands.iter().filter(|c| c.enabled).count();
    println!(
        "agent {} ({enabled} of {} commands enabled)",
        info.version,
        info.supported_commands.len()
    );

    match agent.osinfo().await {
        Ok(os) => println!(
            "os: {}",
            os.pretty_name
                .or(os.name)
                .unwrap_or_else(|| "unknown".into())
        ),
        Err(e) => println!("os: {e}"),
    }
    match agent.host_name().await {
        Ok(h) => println!("host name: {}", h.host_name),
        Err(e) => println!("host name: {e}"),
    }
    match agent.network_interfaces().await {
        Ok(ifs) => {
            for i in ifs {
                let addrs: Vec<String> = i
                    .ip_addresses
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| format!("{}/{}", a.ip_address, a.prefix))
                    .collect();
                println!("interface {}: {}", i.name, addrs.join(", "));
            }
        }
        Err(e) => println!("interfaces: {e}"),
    }
    match agent.fsinfo().await {
        Ok(fss) => {
            for fs in fss {
                let used = fs
                    .used_bytes
                    .map(|b| format!("{} MiB used", b >> 20))
                    .unwrap_or_default();
                println!(
                    "filesystem {} ({}) on {}: {used}",
                    fs.mountpoint, fs.r#type, fs.name
                );
            }
        }
        Err(e) => println!("filesystems: {e}"),
    }
    match agent.load().await {
        Ok(l) => println!("load: {:.2} {:.2} {:.2}", l.load1m, l.load5m, l.load15m),
        Err(e) if e.is_unsupported() => println!("load: not available in this agent"),
        Err(e) => println!("load: {e}"),
    }
    match agent
        .exec_wait(
            qga_proto::cmd::GuestExecArgs::new("uname")
                .arg("-a")
                .capture(),
            Some(Duration::from_secs(10)),
        )
        .await
    {
        Ok(out) => print!("uname: {}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => println!("uname: {e}"),
    }
    Ok(())
}
