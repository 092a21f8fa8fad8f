//! Backdoor facts outside guestlib that a monitoring agent wants: the backdoor version and
//! VMware product, the host's clock, the processor speed (what `vmware-toolbox-cmd stat
//! hosttime`/`speed` print).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Backdoor, Registers, BDOOR_MAGIC};
use crate::{Error, Result};

/// `BDOOR_CMD_GETMHZ`.
pub const CMD_GET_MHZ: u16 = 1;
/// `BDOOR_CMD_GETVERSION`.
pub const CMD_GET_VERSION: u16 = 10;
/// `BDOOR_CMD_GETTIME` (deprecated, the fallback of GETTIMEFULL).
pub const CMD_GET_TIME: u16 = 23;
/// `BDOOR_CMD_GETTIMEFULL`.
pub const CMD_GET_TIME_FULL: u16 = 46;
/// The backdoor version current VMware products report (`VERSION_MAGIC`).
pub const VERSION_MAGIC: u32 = 6;

/// The VMware product behind the backdoor (GETVERSION's ECX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VmxProduct {
    /// The host did not set a type.
    Unset,
    /// VMware Express.
    Express,
    /// ESX/ESXi ("scalable server"): the hosts with guestlib statistics.
    Esx,
    /// GSX/VMware Server.
    Server,
    /// Workstation (also Fusion and Player).
    Workstation,
    /// Workstation Enterprise / ACE.
    WorkstationEnterprise,
    /// A type this crate does not know.
    Other(u32),
}

impl VmxProduct {
    /// The product for GETVERSION's ECX.
    pub fn from_ecx(ecx: u32) -> VmxProduct {
        if ecx >> 16 == 0xFFFF {
            return VmxProduct::Unset;
        }
        match ecx {
            0 => VmxProduct::Unset,
            1 => VmxProduct::Express,
            2 => VmxProduct::Esx,
            3 => VmxProduct::Server,
            4 => VmxProduct::Workstation,
            5 => VmxProduct::WorkstationEnterprise,
            other => VmxProduct::Other(other),
        }
    }
}

/// GETVERSION's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackdoorVersion {
    /// The backdoor protocol version ([`VERSION_MAGIC`] on current products).
    pub version: u32,
    /// The VMware product.
    pub product: VmxProduct,
}

/// Asks the backdoor for its version and product type.
pub fn version<B: Backdoor + ?Sized>(backdoor: &mut B) -> Result<BackdoorVersion> {
    let mut registers = Registers::command(CMD_GET_VERSION, 0xFFFF);
    registers.ebx = !BDOOR_MAGIC;
    let out = backdoor.call(registers);
    if out.ebx != BDOOR_MAGIC || out.eax == u32::MAX {
        return Err(Error::NotRunningInVm);
    }
    Ok(BackdoorVersion {
        version: out.eax,
        product: VmxProduct::from_ecx(out.ecx),
    })
}

/// The host's clock, as GETTIMEFULL gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostTime {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub micros: u32,
    /// The largest lag of the guest's clock the host allows, in microseconds.
    pub max_lag_micros: u32,
}

impl HostTime {
    /// The host time as a `SystemTime`.
    pub fn system_time(&self) -> SystemTime {
        UNIX_EPOCH
            + Duration::from_secs(self.seconds)
            + Duration::from_micros(u64::from(self.micros))
    }
}

/// Reads the host's clock: GETTIMEFULL, or the older GETTIME on hosts without it.
pub fn host_time<B: Backdoor + ?Sized>(backdoor: &mut B) -> Result<HostTime> {
    let out = backdoor.call(Registers::command(CMD_GET_TIME_FULL, 0));
    if out.eax == BDOOR_MAGIC {
        let micros = out.ebx;
        if micros >= 1_000_000 {
            return Err(Error::BackdoorCommand {
                command: "GETTIMEFULL",
                detail: format!("{micros} microseconds is not within a second"),
            });
        }
        return Ok(HostTime {
            seconds: (u64::from(out.esi) << 32) | u64::from(out.edx),
            micros,
            max_lag_micros: out.ecx,
        });
    }
    let out = backdoor.call(Registers::command(CMD_GET_TIME, 0));
    if out.eax == u32::MAX || out.ebx >= 1_000_000 {
        return Err(Error::BackdoorCommand {
            command: "GETTIME",
            detail: "the host did not give its time".to_owned(),
        });
    }
    Ok(HostTime {
        seconds: u64::from(out.eax),
        micros: out.ebx,
        max_lag_micros: out.ecx,
    })
}

/// The processor speed in MHz the host reports (GETMHZ).
pub fn processor_mhz<B: Backdoor + ?Sized>(backdoor: &mut B) -> Result<u32> {
    let out = backdoor.call(Registers::command(CMD_GET_MHZ, 0));
    // The answer is signed in open-vm-tools; zero or negative means failure.
    if out.eax == 0 || out.eax > i32::MAX as u32 {
        return Err(Error::BackdoorCommand {
            command: "GETMHZ",
            detail: format!("the host answered {}", out.eax as i32),
        });
    }
    Ok(out.eax)
}
