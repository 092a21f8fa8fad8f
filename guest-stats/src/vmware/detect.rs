//! Deciding from CPUID and DMI whether this is a VMware guest, and which backdoor instruction
//! the host wants. Pure functions: the CPUID values are read by [`backdoor`](super::backdoor).

use std::path::Path;

use crate::{Error, Result};

/// CPUID leaf with the hypervisor vendor signature.
pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// CPUID leaf `CPUID_VMW_FEATURES` (TSC and APIC rates, backdoor interface bits).
pub const LEAF_VMWARE_FEATURES: u32 = 0x4000_0010;
/// ECX bit of [`LEAF_VMWARE_FEATURES`]: use `vmmcall` (AMD).
pub const FEATURE_VMMCALL: u32 = 1 << 0;
/// ECX bit of [`LEAF_VMWARE_FEATURES`]: use `vmcall` (Intel).
pub const FEATURE_VMCALL: u32 = 1 << 1;
/// The vendor signature of VMware hypervisors.
pub const VMWARE_SIGNATURE: &[u8; 12] = b"VMwareVMware";

/// How the backdoor is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Interface {
    /// `in`/`rep insb`/`rep outsb` on ports `0x5658`/`0x5659` (every VMware host).
    IoPort,
    /// The `vmcall` instruction (Intel hosts that advertise it).
    Vmcall,
    /// The `vmmcall` instruction (AMD hosts that advertise it).
    Vmmcall,
}

/// What CPUID says, as far as VMware detection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidFacts {
    /// CPUID leaf 1, ECX bit 31.
    pub hypervisor_bit: bool,
    /// EBX, ECX, EDX of leaf `0x40000000`, as bytes.
    pub vendor: [u8; 12],
    /// EAX of leaf `0x40000000`: the highest hypervisor leaf.
    pub max_leaf: u32,
    /// ECX of leaf `0x40000010`, when `max_leaf` reaches it.
    pub vmware_features_ecx: Option<u32>,
}

/// Decides whether to use the backdoor, and how.
///
/// With the hypervisor bit set, only the `VMwareVMware` signature counts (KVM can emulate the
/// backdoor ports, so answering them proves nothing). Without it, a DMI vendor of VMware
/// (hosts that hide the bit) allows the I/O-port backdoor, which is then probed.
pub fn select_interface(cpuid: &CpuidFacts, dmi_says_vmware: bool) -> Result<Interface> {
    if cpuid.hypervisor_bit {
        if &cpuid.vendor != VMWARE_SIGNATURE {
            return Err(Error::NotRunningInVm);
        }
        let features = cpuid.vmware_features_ecx.unwrap_or(0);
        Ok(if features & FEATURE_VMCALL != 0 {
            Interface::Vmcall
        } else if features & FEATURE_VMMCALL != 0 {
            Interface::Vmmcall
        } else {
            Interface::IoPort
        })
    } else if dmi_says_vmware {
        Ok(Interface::IoPort)
    } else {
        Err(Error::NotRunningInVm)
    }
}

/// Whether the DMI system vendor or product name under `root` says VMware
/// (`/sys/class/dmi/id/sys_vendor` is "VMware, Inc." on VMware hosts; both files are readable
/// without root).
pub fn dmi_says_vmware(root: &Path) -> bool {
    [
        "sys/class/dmi/id/sys_vendor",
        "sys/class/dmi/id/product_name",
    ]
    .iter()
    .filter_map(|file| std::fs::read_to_string(root.join(file)).ok())
    .any(|text| text.contains("VMware"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(vendor: &[u8; 12], features: Option<u32>) -> CpuidFacts {
        CpuidFacts {
            hypervisor_bit: true,
            vendor: *vendor,
            max_leaf: if features.is_some() {
                LEAF_VMWARE_FEATURES
            } else {
                LEAF_HYPERVISOR
            },
            vmware_features_ecx: features,
        }
    }

    #[test]
    fn interface_follows_cpuid() {
        assert_eq!(
            select_interface(&facts(VMWARE_SIGNATURE, None), false).unwrap(),
            Interface::IoPort
        );
        assert_eq!(
            select_interface(&facts(VMWARE_SIGNATURE, Some(FEATURE_VMCALL)), false).unwrap(),
            Interface::Vmcall
        );
        assert_eq!(
            select_interface(&facts(VMWARE_SIGNATURE, Some(FEATURE_VMMCALL)), false).unwrap(),
            Interface::Vmmcall
        );
        assert_eq!(
            select_interface(
                &facts(VMWARE_SIGNATURE, Some(FEATURE_VMCALL | FEATURE_VMMCALL)),
                false
            )
            .unwrap(),
            Interface::Vmcall
        );
    }

    #[test]
    fn other_hypervisors_and_bare_metal_are_not_vmware() {
        // KVM (even with its VMware backdoor emulation on), Xen, Hyper-V: never the backdoor,
        // whatever DMI says.
        for vendor in [b"KVMKVMKVM\0\0\0", b"XenVMMXenVMM", b"Microsoft Hv"] {
            assert!(matches!(
                select_interface(&facts(vendor, None), true),
                Err(Error::NotRunningInVm)
            ));
        }
        let bare = CpuidFacts::default();
        assert!(matches!(
            select_interface(&bare, false),
            Err(Error::NotRunningInVm)
        ));
        assert_eq!(select_interface(&bare, true).unwrap(), Interface::IoPort);
    }

    #[test]
    fn dmi_files_under_a_root() {
        let dir = std::env::temp_dir().join(format!("guest-stats-dmi-{}", std::process::id()));
        let dmi = dir.join("sys/class/dmi/id");
        std::fs::create_dir_all(&dmi).unwrap();
        std::fs::write(dmi.join("sys_vendor"), "QEMU\n").unwrap();
        assert!(!dmi_says_vmware(&dir));
        std::fs::write(dmi.join("sys_vendor"), "VMware, Inc.\n").unwrap();
        assert!(dmi_says_vmware(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
