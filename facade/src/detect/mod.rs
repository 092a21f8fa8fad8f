//! Hypervisor and container detection at `systemd-detect-virt` parity, with the evidence.
//!
//! The probes and their precedence follow systemd's `detect_vm()` and `detect_container()`:
//!
//! 1. DMI vendor strings; oracle, xen, amazon, parallels and google are final here, because
//!    those platforms run on KVM or cloak Xen as Hyper-V and CPUID would mislead.
//! 2. User Mode Linux from `/proc/cpuinfo`.
//! 3. Xen from `/proc/xen`: a domU is final, a dom0 goes on to CPUID (it may be nested).
//! 4. CPUID: the hypervisor bit, then the vendor signature. Unlike systemd, which reads only
//!    leaf 0x40000000, every base from 0x40000000 to 0x4000FF00 is scanned (as virt-what and
//!    the kernel do) and the highest known signature wins, so a KVM or Xen host that also offers
//!    Hyper-V enlightenments is named by its real identity. `Microsoft Hv` alone stays weak: it
//!    becomes `microsoft` only when nothing else names the hypervisor.
//! 5. The DMI answer from step 1.
//! 6. `/sys/hypervisor/type`, 7. the device tree, 8. `/proc/sysinfo` (z/VM).
//!
//! Confidential VMs (`systemd-detect-virt --cvm`: AMD SEV, SEV-ES, SEV-SNP, Intel TDX, s390x
//! protected virtualization, Arm CCA) come from CPUID, the SEV_STATUS MSR and sysfs; see
//! [`Detector::detect_cvm`].
//!
//! Every path is read under a configurable root, CPUID goes through [`CpuidReader`] and MSRs
//! through [`MsrReader`], so the same code runs on fixture trees recorded from other machines.

mod cpuid;
mod cvm;
mod msr;

pub use cpuid::{CpuidReader, CpuidResult, NativeCpuid, NoCpuid, ParseCpuidError, RecordedCpuid};
pub use cvm::ConfidentialVm;
pub use msr::{DevCpuMsr, MsrReader, MSR_AMD64_SEV_STATUS};

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A virtual machine monitor, named as `systemd-detect-virt` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Hypervisor {
    /// Linux KVM (also QEMU with KVM acceleration, OpenStack, KubeVirt).
    Kvm,
    /// Amazon EC2 (Nitro).
    Amazon,
    /// QEMU with software emulation (TCG), or QEMU identified only by DMI.
    Qemu,
    /// Bochs.
    Bochs,
    /// Xen.
    Xen,
    /// User Mode Linux.
    Uml,
    /// VMware.
    Vmware,
    /// Oracle VirtualBox.
    Oracle,
    /// Microsoft Hyper-V.
    Microsoft,
    /// IBM z/VM.
    Zvm,
    /// Parallels.
    Parallels,
    /// FreeBSD bhyve.
    Bhyve,
    /// QNX hypervisor.
    Qnx,
    /// ACRN.
    Acrn,
    /// IBM PowerVM.
    Powervm,
    /// Apple Virtualization framework.
    Apple,
    /// SRE hypervisor.
    Sre,
    /// Google Compute Engine.
    Google,
    /// A virtual machine of a kind not known here.
    VmOther,
}

impl Hypervisor {
    /// Every hypervisor word, in `systemd-detect-virt --list` order.
    pub const ALL: &'static [Hypervisor] = &[
        Hypervisor::Kvm,
        Hypervisor::Amazon,
        Hypervisor::Qemu,
        Hypervisor::Bochs,
        Hypervisor::Xen,
        Hypervisor::Uml,
        Hypervisor::Vmware,
        Hypervisor::Oracle,
        Hypervisor::Microsoft,
        Hypervisor::Zvm,
        Hypervisor::Parallels,
        Hypervisor::Bhyve,
        Hypervisor::Qnx,
        Hypervisor::Acrn,
        Hypervisor::Powervm,
        Hypervisor::Apple,
        Hypervisor::Sre,
        Hypervisor::Google,
        Hypervisor::VmOther,
    ];

    /// The `systemd-detect-virt` word: `kvm`, `vmware`, `microsoft`, `vm-other`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Kvm => "kvm",
            Hypervisor::Amazon => "amazon",
            Hypervisor::Qemu => "qemu",
            Hypervisor::Bochs => "bochs",
            Hypervisor::Xen => "xen",
            Hypervisor::Uml => "uml",
            Hypervisor::Vmware => "vmware",
            Hypervisor::Oracle => "oracle",
            Hypervisor::Microsoft => "microsoft",
            Hypervisor::Zvm => "zvm",
            Hypervisor::Parallels => "parallels",
            Hypervisor::Bhyve => "bhyve",
            Hypervisor::Qnx => "qnx",
            Hypervisor::Acrn => "acrn",
            Hypervisor::Powervm => "powervm",
            Hypervisor::Apple => "apple",
            Hypervisor::Sre => "sre",
            Hypervisor::Google => "google",
            Hypervisor::VmOther => "vm-other",
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no hypervisor or container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a systemd-detect-virt word")]
pub struct UnknownWord(pub String);

impl FromStr for Hypervisor {
    type Err = UnknownWord;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        Hypervisor::ALL
            .iter()
            .copied()
            .find(|h| h.as_str() == word)
            .ok_or_else(|| UnknownWord(word.to_owned()))
    }
}

/// A container runtime, named as `systemd-detect-virt` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Container {
    /// systemd-nspawn.
    SystemdNspawn,
    /// libvirt's LXC driver.
    LxcLibvirt,
    /// LXC.
    Lxc,
    /// OpenVZ / Virtuozzo.
    Openvz,
    /// Docker.
    Docker,
    /// Podman.
    Podman,
    /// rkt.
    Rkt,
    /// Windows Subsystem for Linux.
    Wsl,
    /// proot.
    Proot,
    /// Pouch.
    Pouch,
    /// A container of a kind not known here.
    ContainerOther,
}

impl Container {
    /// Every container word, in `systemd-detect-virt --list` order.
    pub const ALL: &'static [Container] = &[
        Container::SystemdNspawn,
        Container::LxcLibvirt,
        Container::Lxc,
        Container::Openvz,
        Container::Docker,
        Container::Podman,
        Container::Rkt,
        Container::Wsl,
        Container::Proot,
        Container::Pouch,
        Container::ContainerOther,
    ];

    /// The `systemd-detect-virt` word: `docker`, `lxc`, `container-other`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Container::SystemdNspawn => "systemd-nspawn",
            Container::LxcLibvirt => "lxc-libvirt",
            Container::Lxc => "lxc",
            Container::Openvz => "openvz",
            Container::Docker => "docker",
            Container::Podman => "podman",
            Container::Rkt => "rkt",
            Container::Wsl => "wsl",
            Container::Proot => "proot",
            Container::Pouch => "pouch",
            Container::ContainerOther => "container-other",
        }
    }
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Container {
    type Err = UnknownWord;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        Container::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == word)
            .ok_or_else(|| UnknownWord(word.to_owned()))
    }
}

/// One observation a probe made, and what it concluded from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Evidence {
    /// Where the observation came from: a path under the root (`/sys/class/dmi/id/sys_vendor`),
    /// a CPUID leaf (`cpuid:0x40000000`) or an environment variable (`env:container`).
    pub source: String,
    /// What was seen there, trimmed (a vendor string, a signature, "present").
    pub observed: String,
    /// The word it points to, if any (`kvm`, `docker`, `vm-other`).
    pub indicates: Option<String>,
    /// Whether this observation decided the answer.
    pub decisive: bool,
}

/// The answer of [`detect`]: the hypervisor, the container, the confidential-computing
/// technology, and everything that was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Detection {
    /// The virtual machine monitor, `None` on bare metal.
    pub vm: Option<Hypervisor>,
    /// The container runtime, `None` outside containers.
    pub container: Option<Container>,
    /// The confidential-VM technology (`systemd-detect-virt --cvm`), `None` when there is none.
    pub cvm: Option<ConfidentialVm>,
    /// Every observation of the VM probes, in the order they ran.
    pub vm_evidence: Vec<Evidence>,
    /// Every observation of the container probes, in the order they ran.
    pub container_evidence: Vec<Evidence>,
    /// Every observation of the confidential-VM probes, in the order they ran.
    pub cvm_evidence: Vec<Evidence>,
}

impl Detection {
    /// What `systemd-detect-virt` prints without options: the container if there is one (it is
    /// the nearer environment), else the hypervisor, else `none`.
    pub fn virtualization(&self) -> String {
        match (self.container, self.vm) {
            (Some(container), _) => container.to_string(),
            (None, Some(vm)) => vm.to_string(),
            (None, None) => "none".to_owned(),
        }
    }
}

/// Detects the hypervisor and container of this machine (root `/`, the processor's CPUID).
pub fn detect() -> Detection {
    Detector::new().detect()
}

/// Detection with an injectable environment: the filesystem root, CPUID, MSRs, and the view of
/// process 1.
#[derive(Debug)]
pub struct Detector {
    root: PathBuf,
    cpuid: Box<dyn CpuidReader>,
    msr: Box<dyn MsrReader>,
    container_env: Option<String>,
    is_pid1: bool,
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO` in the kernel).
const INITIAL_CGROUP_NAMESPACE_INODE: u64 = 0xEFFF_FFFB;

/// DMI files in the order systemd reads them: `product_name` first so that "KVM" wins over the
/// "QEMU" vendor, `product_version` last for Hyper-V.
const DMI_VENDOR_FILES: &[&str] = &[
    "sys/class/dmi/id/product_name",
    "sys/class/dmi/id/sys_vendor",
    "sys/class/dmi/id/board_vendor",
    "sys/class/dmi/id/bios_vendor",
    "sys/class/dmi/id/product_version",
];

/// DMI vendor prefixes and what they mean.
const DMI_VENDORS: &[(&str, Hypervisor)] = &[
    ("KVM", Hypervisor::Kvm),
    ("OpenStack", Hypervisor::Kvm),
    ("KubeVirt", Hypervisor::Kvm),
    ("Amazon EC2", Hypervisor::Amazon),
    ("QEMU", Hypervisor::Qemu),
    ("VMware", Hypervisor::Vmware),
    ("VMW", Hypervisor::Vmware),
    ("innotek GmbH", Hypervisor::Oracle),
    ("VirtualBox", Hypervisor::Oracle),
    ("Oracle Corporation", Hypervisor::Oracle),
    ("Xen", Hypervisor::Xen),
    ("Bochs", Hypervisor::Bochs),
    ("Parallels", Hypervisor::Parallels),
    ("BHYVE", Hypervisor::Bhyve),
    ("Hyper-V", Hypervisor::Microsoft),
    ("Apple Virtualization", Hypervisor::Apple),
    ("Google Compute Engine", Hypervisor::Google),
];

/// CPUID vendor signatures (NUL padding removed) and what they mean.
const CPUID_VENDORS: &[(&[u8], Hypervisor)] = &[
    (b"XenVMMXenVMM", Hypervisor::Xen),
    (b"KVMKVMKVM", Hypervisor::Kvm),
    (b"LKVMLKVMLKVM", Hypervisor::Kvm),
    (b"Linux KVM Hv", Hypervisor::Kvm),
    (b"TCGTCGTCGTCG", Hypervisor::Qemu),
    (b"VMwareVMware", Hypervisor::Vmware),
    (b"Microsoft Hv", Hypervisor::Microsoft),
    (b"bhyve bhyve ", Hypervisor::Bhyve),
    (b"BHyVE BHyVE ", Hypervisor::Bhyve),
    (b"QNXQVMBSQG", Hypervisor::Qnx),
    (b"ACRNACRNACRN", Hypervisor::Acrn),
    (b"SRESRESRESRE", Hypervisor::Sre),
    (b"Apple VZ", Hypervisor::Apple),
];

/// Container names as `$container` and `/run/systemd/container` spell them.
const CONTAINER_NAMES: &[(&str, Container)] = &[
    ("lxc", Container::Lxc),
    ("lxc-libvirt", Container::LxcLibvirt),
    ("systemd-nspawn", Container::SystemdNspawn),
    ("docker", Container::Docker),
    ("podman", Container::Podman),
    ("rkt", Container::Rkt),
    ("wsl", Container::Wsl),
    ("proot", Container::Proot),
    ("pouch", Container::Pouch),
];

/// A probe's running record: what it saw, and the answer once one is decided.
#[derive(Default)]
struct Probe {
    evidence: Vec<Evidence>,
}

impl Probe {
    fn saw(
        &mut self,
        source: impl Into<String>,
        observed: impl Into<String>,
        indicates: Option<&str>,
    ) {
        self.evidence.push(Evidence {
            source: source.into(),
            observed: observed.into(),
            indicates: indicates.map(str::to_owned),
            decisive: false,
        });
    }

    /// Marks the latest observation pointing at `word` as the one that decided.
    fn decide<T: fmt::Display>(&mut self, answer: Option<T>) -> Option<T> {
        if let Some(word) = answer.as_ref().map(ToString::to_string) {
            if let Some(e) = self
                .evidence
                .iter_mut()
                .rev()
                .find(|e| e.indicates.as_deref() == Some(word.as_str()))
            {
                e.decisive = true;
            }
        }
        answer
    }
}

impl Detector {
    /// Detection of this machine: root `/`, the processor's CPUID, MSRs through
    /// `/dev/cpu/0/msr`, this process's view of PID 1.
    pub fn new() -> Self {
        Self {
            root: PathBuf::from("/"),
            cpuid: Box::new(NativeCpuid),
            msr: Box::new(DevCpuMsr::new()),
            container_env: if std::process::id() == 1 {
                std::env::var("container").ok()
            } else {
                None
            },
            is_pid1: std::process::id() == 1,
        }
    }

    /// Reads every path under `root` instead of `/` (a fixture tree, a mounted guest image).
    ///
    /// If the tree has a file named `cpuid` in the recorded format of [`RecordedCpuid`], it is
    /// used as the CPUID source; otherwise the tree is a machine without CPUID ([`NoCpuid`]: no
    /// hypervisor bit, and the arm64 and s390x confidential-VM files are looked at). MSRs come
    /// from the recording's `msr` lines if it has any, else from `<root>/dev/cpu/0/msr`. Use
    /// [`Detector::with_cpuid`] and [`Detector::with_msr`] afterwards to override these choices.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Result<Self, ParseCpuidError> {
        self.root = root.into();
        self.is_pid1 = false;
        self.container_env = None;
        self.msr = Box::new(DevCpuMsr::under_root(&self.root));
        self.cpuid = match fs::read_to_string(self.root.join("cpuid")) {
            Ok(text) => {
                let recording = text.parse::<RecordedCpuid>()?;
                if recording.has_msrs() {
                    self.msr = Box::new(recording.clone());
                }
                Box::new(recording)
            }
            Err(_) => Box::new(NoCpuid),
        };
        Ok(self)
    }

    /// Uses `reader` for CPUID.
    pub fn with_cpuid(mut self, reader: impl CpuidReader + 'static) -> Self {
        self.cpuid = Box::new(reader);
        self
    }

    /// Uses `reader` for model-specific registers (the SEV_STATUS MSR).
    pub fn with_msr(mut self, reader: impl MsrReader + 'static) -> Self {
        self.msr = Box::new(reader);
        self
    }

    /// Pretends to be PID 1 with `$container` set to `value` (systemd's first container source
    /// for init inside a container).
    pub fn with_pid1_container_env(mut self, value: impl Into<String>) -> Self {
        self.is_pid1 = true;
        self.container_env = Some(value.into());
        self
    }

    /// Runs the container, VM and confidential-VM probes.
    pub fn detect(&self) -> Detection {
        let (container, container_evidence) = self.detect_container();
        let (vm, vm_evidence) = self.detect_vm();
        let (cvm, cvm_evidence) = self.detect_cvm();
        Detection {
            vm,
            container,
            cvm,
            vm_evidence,
            container_evidence,
            cvm_evidence,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative.trim_start_matches('/'))
    }

    fn read(&self, relative: &str) -> Option<String> {
        fs::read(self.path(relative))
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    fn exists(&self, relative: &str) -> bool {
        // symlink_metadata: a dangling link (as in fixture trees) still counts as present.
        fs::symlink_metadata(self.path(relative)).is_ok()
    }

    /// The VM side, as `systemd-detect-virt --vm`.
    pub fn detect_vm(&self) -> (Option<Hypervisor>, Vec<Evidence>) {
        let mut probe = Probe::default();
        let answer = self.vm_probes(&mut probe);
        let answer = probe.decide(answer);
        (answer, probe.evidence)
    }

    fn vm_probes(&self, probe: &mut Probe) -> Option<Hypervisor> {
        let mut hyperv = false;
        let mut other = false;

        let dmi = self.dmi(probe);
        if matches!(
            dmi,
            Some(
                Hypervisor::Oracle
                    | Hypervisor::Xen
                    | Hypervisor::Amazon
                    | Hypervisor::Parallels
                    | Hypervisor::Google
            )
        ) {
            return dmi;
        }

        if let Some(uml) = self.uml(probe) {
            return Some(uml);
        }

        let xen_dom0 = match self.xen(probe) {
            XenRole::None => false,
            XenRole::DomU => return Some(Hypervisor::Xen),
            XenRole::Dom0 => true,
        };

        match self.cpuid_vendor(probe) {
            Some(Hypervisor::Microsoft) => hyperv = true,
            Some(Hypervisor::VmOther) => other = true,
            Some(found) => return Some(found),
            None => {}
        }

        if !xen_dom0 {
            match dmi {
                Some(Hypervisor::VmOther) => other = true,
                Some(found) => return Some(found),
                None => {}
            }
            match self.sys_hypervisor(probe) {
                Some(Hypervisor::VmOther) => other = true,
                Some(found) => return Some(found),
                None => {}
            }
            match self.device_tree(probe) {
                Some(Hypervisor::VmOther) => other = true,
                Some(found) => return Some(found),
                None => {}
            }
            if let Some(found) = self.zvm(probe) {
                return Some(found);
            }
        }

        // Nothing named the hypervisor: Hyper-V enlightenments alone mean Microsoft, a bare
        // "this is a VM" signal means vm-other.
        if hyperv {
            probe.saw(
                "fallback",
                "only the Microsoft Hv signature named a hypervisor",
                Some("microsoft"),
            );
            Some(Hypervisor::Microsoft)
        } else if other {
            probe.saw(
                "fallback",
                "a VM signal without a known vendor",
                Some("vm-other"),
            );
            Some(Hypervisor::VmOther)
        } else {
            None
        }
    }

    fn dmi(&self, probe: &mut Probe) -> Option<Hypervisor> {
        for file in DMI_VENDOR_FILES {
            let Some(content) = self.read(file) else {
                continue;
            };
            let value = content.trim();
            let found = DMI_VENDORS
                .iter()
                .find(|(prefix, _)| value.starts_with(prefix))
                .map(|&(_, h)| h);
            probe.saw(format!("/{file}"), value, found.map(Hypervisor::as_str));
            match found {
                // EC2 DMI strings are the same on bare-metal instances: the SMBIOS VM bit tells.
                Some(Hypervisor::Amazon) => return self.amazon(probe),
                Some(found) => return Some(found),
                None => {}
            }
        }
        match self.smbios_vm_bit(probe) {
            Some(true) => Some(Hypervisor::VmOther),
            _ => None,
        }
    }

    /// Byte 19 bit 4 of the SMBIOS BIOS information table: "this is a virtual machine".
    fn smbios_vm_bit(&self, probe: &mut Probe) -> Option<bool> {
        const TABLE: &str = "sys/firmware/dmi/entries/0-0/raw";
        let raw = fs::read(self.path(TABLE)).ok()?;
        let byte = *raw.get(19)?;
        let set = byte & (1 << 4) != 0;
        probe.saw(
            format!("/{TABLE}"),
            format!("BIOS characteristics extension byte 2 = {byte:#04x}"),
            set.then_some("vm-other"),
        );
        Some(set)
    }

    fn amazon(&self, probe: &mut Probe) -> Option<Hypervisor> {
        match self.smbios_vm_bit(probe) {
            Some(true) => Some(Hypervisor::Amazon),
            Some(false) => None,
            None => {
                let product = self
                    .read("sys/class/dmi/id/product_name")
                    .unwrap_or_default();
                if product.contains(".metal") {
                    probe.saw("/sys/class/dmi/id/product_name", product.trim(), None);
                    None
                } else {
                    Some(Hypervisor::Amazon)
                }
            }
        }
    }

    fn uml(&self, probe: &mut Probe) -> Option<Hypervisor> {
        let cpuinfo = self.read("proc/cpuinfo")?;
        let vendor = cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "vendor_id").then(|| value.trim().to_owned())
        })?;
        let uml = vendor == "User Mode Linux";
        probe.saw(
            "/proc/cpuinfo",
            format!("vendor_id: {vendor}"),
            uml.then_some("uml"),
        );
        uml.then_some(Hypervisor::Uml)
    }

    fn xen(&self, probe: &mut Probe) -> XenRole {
        if !self.exists("proc/xen") {
            return XenRole::None;
        }
        probe.saw("/proc/xen", "present", Some("xen"));
        // XENFEAT_dom0 is bit 11 of the feature word.
        if let Some(features) = self.read("sys/hypervisor/properties/features") {
            let word = u64::from_str_radix(features.trim().trim_start_matches("0x"), 16).ok();
            let dom0 = word.is_some_and(|w| w & (1 << 11) != 0);
            probe.saw("/sys/hypervisor/properties/features", features.trim(), None);
            return if dom0 { XenRole::Dom0 } else { XenRole::DomU };
        }
        let capabilities = self.read("proc/xen/capabilities").unwrap_or_default();
        let dom0 = capabilities.split(',').any(|c| c.trim() == "control_d");
        probe.saw("/proc/xen/capabilities", capabilities.trim(), None);
        if dom0 {
            XenRole::Dom0
        } else {
            XenRole::DomU
        }
    }

    fn cpuid_vendor(&self, probe: &mut Probe) -> Option<Hypervisor> {
        let leaf1 = self.cpuid.cpuid(1, 0)?;
        let present = leaf1.ecx & (1 << 31) != 0;
        probe.saw(
            "cpuid:0x00000001",
            format!("ecx bit 31 (hypervisor present) = {}", u8::from(present)),
            present.then_some("vm-other"),
        );
        if !present {
            return None;
        }
        // Scan from the highest base down and keep the first known signature: hypervisors that
        // offer Hyper-V enlightenments put "Microsoft Hv" at the lowest base and themselves above.
        let mut best = None;
        for base in (0..=0xffu32).rev().map(|i| 0x4000_0000 + (i << 8)) {
            let Some(leaf) = self.cpuid.cpuid(base, 0) else {
                continue;
            };
            let signature = leaf.signature();
            let trimmed: &[u8] = {
                let end = signature.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                &signature[..end]
            };
            let known = CPUID_VENDORS
                .iter()
                .find(|(sig, _)| *sig == trimmed)
                .map(|&(_, h)| h);
            if let Some(found) = known {
                probe.saw(
                    format!("cpuid:{base:#010x}"),
                    String::from_utf8_lossy(trimmed),
                    Some(found.as_str()),
                );
                if best.is_none() || best == Some(Hypervisor::Microsoft) {
                    best = Some(found);
                }
            } else if base == 0x4000_0000 && trimmed.iter().any(|b| b.is_ascii_graphic()) {
                probe.saw(
                    "cpuid:0x40000000",
                    String::from_utf8_lossy(trimmed).into_owned(),
                    None,
                );
            }
        }
        Some(best.unwrap_or(Hypervisor::VmOther))
    }

    fn sys_hypervisor(&self, probe: &mut Probe) -> Option<Hypervisor> {
        let kind = self.read("sys/hypervisor/type")?;
        let found = if kind.trim() == "xen" {
            Hypervisor::Xen
        } else {
            Hypervisor::VmOther
        };
        probe.saw("/sys/hypervisor/type", kind.trim(), Some(found.as_str()));
        Some(found)
    }

    fn device_tree(&self, probe: &mut Probe) -> Option<Hypervisor> {
        if let Some(compatible) = self.read("proc/device-tree/hypervisor/compatible") {
            let value = compatible.trim_end_matches('\0').trim();
            let found = if value == "linux,kvm" {
                Hypervisor::Kvm
            } else if value.contains("xen") {
                Hypervisor::Xen
            } else if value.contains("vmware") {
                Hypervisor::Vmware
            } else {
                Hypervisor::VmOther
            };
            probe.saw(
                "/proc/device-tree/hypervisor/compatible",
                value,
                Some(found.as_str()),
            );
            return Some(found);
        }
        if self.exists("proc/device-tree/ibm,partition-name")
            && self.exists("proc/device-tree/hmc-managed?")
            && !self.exists("proc/device-tree/chosen/qemu,graphic-width")
        {
            probe.saw(
                "/proc/device-tree/ibm,partition-name",
                "present, HMC-managed, no QEMU display",
                Some("powervm"),
            );
            return Some(Hypervisor::Powervm);
        }
        if let Ok(entries) = fs::read_dir(self.path("proc/device-tree")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains("fw-cfg") {
                    probe.saw(format!("/proc/device-tree/{name}"), "present", Some("qemu"));
                    return Some(Hypervisor::Qemu);
                }
            }
        }
        if let Some(compatible) = self.read("proc/device-tree/compatible") {
            if compatible.trim_end_matches('\0') == "qemu,pseries" {
                probe.saw("/proc/device-tree/compatible", "qemu,pseries", Some("qemu"));
                return Some(Hypervisor::Qemu);
            }
        }
        None
    }

    fn zvm(&self, probe: &mut Probe) -> Option<Hypervisor> {
        let sysinfo = self.read("proc/sysinfo")?;
        let control_program = sysinfo.lines().find_map(|line| {
            line.strip_prefix("VM00 Control Program:")
                .map(|rest| rest.trim().to_owned())
        })?;
        let found = if control_program.contains("z/VM") {
            Hypervisor::Zvm
        } else {
            Hypervisor::Kvm
        };
        probe.saw(
            "/proc/sysinfo",
            format!("VM00 Control Program: {control_program}"),
            Some(found.as_str()),
        );
        Some(found)
    }

    /// The container side, as `systemd-detect-virt --container`.
    pub fn detect_container(&self) -> (Option<Container>, Vec<Evidence>) {
        let mut probe = Probe::default();
        let answer = self.container_probes(&mut probe);
        let answer = probe.decide(answer);
        (answer, probe.evidence)
    }

    fn container_probes(&self, probe: &mut Probe) -> Option<Container> {
        if self.exists("proc/vz") && !self.exists("proc/bc") {
            probe.saw("/proc/vz", "present without /proc/bc", Some("openvz"));
            return Some(Container::Openvz);
        }
        if let Some(release) = self.read("proc/sys/kernel/osrelease") {
            if release.contains("Microsoft") || release.contains("WSL") {
                probe.saw("/proc/sys/kernel/osrelease", release.trim(), Some("wsl"));
                return Some(Container::Wsl);
            }
        }
        if let Some(found) = self.proot(probe) {
            return Some(found);
        }
        if let Some(manager) = self.read("run/host/container-manager") {
            probe.saw("/run/host/container-manager", manager.trim(), None);
            return self.container_name(manager.trim(), probe);
        }
        if self.is_pid1 {
            if let Some(value) = self.container_env.clone() {
                probe.saw("env:container", value.as_str(), None);
                // An empty $container in PID 1 means "explicitly not a container".
                return if value.is_empty() {
                    None
                } else {
                    self.container_name(&value, probe)
                };
            }
        }
        if let Some(value) = self.read("run/systemd/container") {
            probe.saw("/run/systemd/container", value.trim(), None);
            return self.container_name(value.trim(), probe);
        }
        // /proc/1/environ usually needs CAP_SYS_PTRACE; like systemd, an unreadable one is skipped.
        if let Some(environ) = self.read("proc/1/environ") {
            if let Some(value) = environ
                .split('\0')
                .find_map(|var| var.strip_prefix("container="))
            {
                probe.saw("/proc/1/environ", format!("container={value}"), None);
                return self.container_name(value, probe);
            }
        }
        if let Some(found) = self.container_files(probe) {
            return Some(found);
        }
        self.cgroup_namespace(probe)
    }

    fn proot(&self, probe: &mut Probe) -> Option<Container> {
        let status = self.read("proc/self/status")?;
        let tracer: u32 = status
            .lines()
            .find_map(|line| line.strip_prefix("TracerPid:"))?
            .trim()
            .parse()
            .ok()?;
        if tracer == 0 {
            return None;
        }
        let comm = self.read(&format!("proc/{tracer}/comm"))?;
        let is_proot = comm.trim() == "proot";
        probe.saw(
            format!("/proc/{tracer}/comm"),
            comm.trim(),
            is_proot.then_some("proot"),
        );
        is_proot.then_some(Container::Proot)
    }

    fn container_name(&self, name: &str, probe: &mut Probe) -> Option<Container> {
        if name == "oci" {
            // "oci" names a format, not a runtime: the marker files may say which one.
            if let Some(found) = self.container_files(probe) {
                return Some(found);
            }
        }
        let found = if name == "oci" {
            Container::ContainerOther
        } else {
            CONTAINER_NAMES
                .iter()
                .find(|(word, _)| *word == name)
                .map_or(Container::ContainerOther, |&(_, c)| c)
        };
        if let Some(last) = probe.evidence.last_mut() {
            last.indicates = Some(found.as_str().to_owned());
        }
        Some(found)
    }

    fn container_files(&self, probe: &mut Probe) -> Option<Container> {
        // /.dockerenv comes last: it can leak into images built by Docker and run elsewhere.
        for (file, kind) in [
            ("run/.containerenv", Container::Podman),
            (".dockerenv", Container::Docker),
        ] {
            if self.exists(file) {
                probe.saw(format!("/{file}"), "present", Some(kind.as_str()));
                return Some(kind);
            }
        }
        None
    }

    fn cgroup_namespace(&self, probe: &mut Probe) -> Option<Container> {
        let link = fs::read_link(self.path("proc/self/ns/cgroup")).ok()?;
        let text = link.to_string_lossy().into_owned();
        let inode: u64 = text
            .strip_prefix("cgroup:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        let inside = inode != INITIAL_CGROUP_NAMESPACE_INODE;
        probe.saw(
            "/proc/self/ns/cgroup",
            text,
            inside.then_some("container-other"),
        );
        inside.then_some(Container::ContainerOther)
    }

    /// The root this detector reads under.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

enum XenRole {
    None,
    DomU,
    Dom0,
}
