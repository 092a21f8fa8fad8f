//! Every target without a backdoor implementation: CPUID reads as absent and the probe
//! always fails, so a [`HardwareBackdoor`] can never be constructed.

use super::*;

pub(super) fn read_cpuid() -> CpuidFacts {
    CpuidFacts::default()
}

pub(super) fn probe(_interface: Interface) -> Result<()> {
    Err(Error::NotRunningInVm)
}

// A `HardwareBackdoor` cannot be constructed here (`probe` always fails), so these are
// never called; they answer like a host without a backdoor.
pub(super) fn low_bandwidth(_interface: Interface, r: Registers) -> Registers {
    Registers { eax: u32::MAX, ..r }
}

pub(super) fn send_high_bandwidth(_: Interface, r: Registers, _: &[u8]) -> Registers {
    Registers { ebx: 0, ..r }
}

pub(super) fn receive_high_bandwidth(_: Interface, r: Registers, _: &mut [u8]) -> Registers {
    Registers { ebx: 0, ..r }
}
