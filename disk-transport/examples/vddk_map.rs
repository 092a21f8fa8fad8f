//! Opens a VMware virtual disk through VDDK and prints what it is and which ranges hold data —
//! the first step of every backup.
//!
//! ```text
//! # A local (hosted) VMDK:
//! cargo run -p disk-transport --example vddk_map -- --libdir /opt/vmware-vix-disklib-distrib /vms/disk.vmdk
//!
//! # A snapshot of a VM through vCenter; the password comes from the environment, never argv:
//! VC_PASSWORD=... cargo run -p disk-transport --example vddk_map -- \
//!     --libdir /opt/vmware-vix-disklib-distrib --server vcenter.example.com \
//!     --user backup@vsphere.local --thumbprint AA:BB:...:99 --vm moref=vm-16 \
//!     --snapshot snapshot-47 --transports nbdssl:nbd '[datastore1] vm/vm.vmdk'
//! ```
//!
//! Start it with `LD_LIBRARY_PATH=<libdir>/lib64` if VDDK cannot find its own libraries.

use disk_transport::vddk::{VddkOptions, VddkTransport};
use disk_transport::{
    parse_transport_modes, ConnectParams, Disk, DiskTransport, OpenFlags, Thumbprint,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

const USAGE: &str = "usage: vddk_map [--libdir DIR] [--config FILE] [--server HOST --user USER \
    (password in $VC_PASSWORD) --vm MOREF [--thumbprint SHA1] [--snapshot MOREF]] \
    [--transports LIST] DISK";

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = VddkOptions::new();
    let mut params = ConnectParams::builder();
    let mut disk_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value; {USAGE}"));
        match arg.as_str() {
            // The library and its configuration belong to the options (once per process),
            // not to the connection parameters.
            "--libdir" => options = options.libdir(value()?),
            // Checked before InitEx; a misspelt key stops the program here.
            "--config" => options = options.config_path(value()?).strict_config(true),
            "--server" => params = params.server(value()?),
            "--user" => {
                let password = std::env::var("VC_PASSWORD").map_err(|_| "set VC_PASSWORD")?;
                params = params.user_password(value()?, password);
            }
            "--thumbprint" => params = params.thumbprint(Thumbprint::new(&value()?)?),
            "--vm" => params = params.vm(value()?),
            "--snapshot" => params = params.snapshot(value()?),
            "--transports" => params = params.transport_modes(parse_transport_modes(&value()?)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ if disk_path.is_none() && !arg.starts_with("--") => disk_path = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}; {USAGE}").into()),
        }
    }
    let disk_path = disk_path.ok_or(USAGE)?;
    let params = params.build()?;

    let vddk = VddkTransport::new(&options)?;
    println!("library: {}", serde_json::to_string(vddk.library())?);
    println!("library transports: {}", vddk.transport_modes_text());
    println!("planned transports: {:?}", vddk.plan(&params)?);

    // Keep Storage vMotion off the VM while its disk is open (EndAccess also when `access`
    // drops on an error path).
    let access = match params.vm() {
        Some(_) => Some(vddk.prepare_for_access(&params, "vddk_map example")?),
        None => None,
    };
    let connection = vddk.connect_vddk(&params)?;
    let disk = connection.open_disk(&disk_path, OpenFlags::read_only())?;
    let info = disk.info()?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    let mut allocated = 0;
    for extent in disk.allocated_extents(0, info.capacity)? {
        if !extent.kind.reads_as_zero() {
            allocated += extent.length;
        }
        println!(
            "{:>14} {:>14} {:?}",
            extent.offset, extent.length, extent.kind
        );
    }
    println!("{allocated} of {} bytes to copy", info.capacity);
    // Close, Disconnect and EndAccess now, in VDDK's order, to see their errors (a drop can
    // only log them).
    disk.close()?;
    connection.disconnect()?;
    if let Some(access) = access {
        access.end()?;
    }
    Ok(())
}
