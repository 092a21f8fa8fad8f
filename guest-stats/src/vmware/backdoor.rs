//! The VMware backdoor on real hardware: the only module of the crate with `unsafe` code.
//!
//! [`HardwareBackdoor::open`] reads CPUID, decides with [`detect`] whether this
//! is VMware, and probes the backdoor once in a forked child process, so that a host that
//! refuses ring-3 access (a fault: SIGSEGV for the port, SIGILL for a hypercall) kills the
//! child, not the caller. Only then can a [`HardwareBackdoor`] exist, so the instructions below
//! never run where they could fault.
//!
//! x86-64 Linux only; on every other target `open` returns [`Error::NotRunningInVm`].

use std::path::Path;

use super::detect::{self, CpuidFacts, Interface};
use super::{Backdoor, Registers};
use crate::{Error, Result};

/// I/O port of low-bandwidth calls.
pub const PORT_LOW_BANDWIDTH: u16 = 0x5658;
/// I/O port of high-bandwidth transfers.
pub const PORT_HIGH_BANDWIDTH: u16 = 0x5659;
/// `BDOOR_CMD_GETVERSION`.
pub const CMD_GET_VERSION: u16 = 10;

/// The backdoor of the VMware host this program runs on.
///
/// It can only be obtained from [`HardwareBackdoor::open`], which proves the backdoor works
/// first.
#[derive(Debug)]
pub struct HardwareBackdoor {
    interface: Interface,
}

impl HardwareBackdoor {
    /// Detects VMware (CPUID, else DMI under `/`) and probes the backdoor.
    pub fn open() -> Result<HardwareBackdoor> {
        HardwareBackdoor::open_with_root(Path::new("/"))
    }

    /// Like [`open`](HardwareBackdoor::open), reading DMI under `root`.
    ///
    /// Errors: [`Error::NotRunningInVm`] when CPUID/DMI do not say VMware or the backdoor
    /// does not answer with VMware's magic; [`Error::BackdoorDenied`] when VMware is there but
    /// the probe faulted (restricted backdoor, confidential VM) or could not run.
    pub fn open_with_root(root: &Path) -> Result<HardwareBackdoor> {
        let interface = detect::select_interface(&read_cpuid(), detect::dmi_says_vmware(root))?;
        arch::probe(interface)?;
        Ok(HardwareBackdoor { interface })
    }

    /// The instruction this host wants.
    pub fn interface(&self) -> Interface {
        self.interface
    }
}

impl Backdoor for HardwareBackdoor {
    fn call(&mut self, registers: Registers) -> Registers {
        arch::low_bandwidth(self.interface, registers)
    }

    fn send_high_bandwidth(&mut self, registers: Registers, data: &[u8]) -> Registers {
        arch::send_high_bandwidth(self.interface, registers, data)
    }

    fn receive_high_bandwidth(&mut self, registers: Registers, buffer: &mut [u8]) -> Registers {
        arch::receive_high_bandwidth(self.interface, registers, buffer)
    }
}

/// Reads the CPUID leaves detection needs (all zero off x86-64).
pub fn read_cpuid() -> CpuidFacts {
    arch::read_cpuid()
}

cfg_if::cfg_if! {
    if #[cfg(all(target_arch = "x86_64", target_os = "linux"))] {
        mod x86_64_linux;
        use self::x86_64_linux as arch;
    } else {
        // Other architectures have other backdoor mechanisms (or none); other x86-64 systems
        // need their own probe, as fork/prctl/waitpid are Linux's here.
        mod unsupported;
        use self::unsupported as arch;
    }
}
