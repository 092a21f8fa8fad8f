//! Confidential-VM detection at `systemd-detect-virt --cvm` parity (systemd 257).
//!
//! The algorithm of systemd's `detect_confidential_virtualization()`:
//!
//! - **x86-64.** Nothing unless CPUID leaf 1 has the hypervisor bit (ECX bit 31). Then the vendor
//!   of leaf 0 picks the technology:
//!   - `AuthenticAMD`: the highest extended leaf (0x80000000 EAX) must reach 0x8000001F. If leaf
//!     0x8000001F does not advertise SEV (EAX bit 1), the only way left is Hyper-V's isolation
//!     leaves (Azure hides the SEV leaf from its SEV-SNP guests): `sev-snp` when they say so.
//!     Otherwise the SEV_STATUS MSR (0xC0010131), read through `/dev/cpu/0/msr`, tells: bit 2
//!     `sev-snp`, bit 1 `sev-es`, bit 0 `sev`. An MSR that cannot be read (no `msr` module, not
//!     root) counts as zero, so the answer is none, as systemd 257 answers.
//!   - `GenuineIntel`: as systemd 257, the highest *extended* leaf must reach 0x21; then leaf
//!     0x21 carrying `IntelTDX    ` (EBX, EDX, ECX) means `tdx`, and so do Hyper-V's isolation
//!     leaves saying TDX.
//!   - Hyper-V isolation: leaf 0x40000000 is `Microsoft Hv` with a highest leaf in
//!     0x40000005..=0x4000FFFF, leaf 0x40000003 EBX has bit 22 (isolated partition) and not bit 12
//!     (root partition), and leaf 0x4000000C EBX bits 0-3 give the isolation type (2 SNP, 3 TDX).
//! - **s390x.** `/sys/firmware/uv/prot_virt_guest` starting with `1` means `protvirt`.
//! - **arm64.** `/sys/devices/platform/arm-cca-dev` existing means `cca` (systemd after 257).
//!
//! Which branch runs follows the CPUID reader: a reader that answers is an x86 processor and
//! only the x86 branch runs, as in systemd's x86-64 build; without CPUID (another architecture,
//! or a recorded tree without a `cpuid` file) the s390x and arm64 files are looked at, each of
//! which exists only on its own architecture.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::msr::MSR_AMD64_SEV_STATUS;
use super::{CpuidResult, Detector, Evidence, Probe, UnknownWord};

/// A confidential-computing technology protecting this VM from its host, named as
/// `systemd-detect-virt --cvm` names it (`sev-snp`, `tdx`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ConfidentialVm {
    /// AMD Secure Encrypted Virtualization: guest memory encrypted with a per-VM key.
    Sev,
    /// AMD SEV with Encrypted State: the register state is encrypted as well.
    SevEs,
    /// AMD SEV with Secure Nested Paging: memory integrity against the host, too.
    SevSnp,
    /// Intel Trust Domain Extensions.
    Tdx,
    /// IBM Secure Execution (protected virtualization) on s390x.
    Protvirt,
    /// An Arm Confidential Compute Architecture realm on arm64.
    Cca,
}

impl ConfidentialVm {
    /// Every word, in `systemd-detect-virt --list-cvm` order (after `none`); `cca` is the word
    /// systemd added after 257.
    pub const ALL: &'static [ConfidentialVm] = &[
        ConfidentialVm::Sev,
        ConfidentialVm::SevEs,
        ConfidentialVm::SevSnp,
        ConfidentialVm::Tdx,
        ConfidentialVm::Protvirt,
        ConfidentialVm::Cca,
    ];

    /// The `systemd-detect-virt --cvm` word: `sev`, `sev-es`, `sev-snp`, `tdx`, `protvirt`, `cca`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfidentialVm::Sev => "sev",
            ConfidentialVm::SevEs => "sev-es",
            ConfidentialVm::SevSnp => "sev-snp",
            ConfidentialVm::Tdx => "tdx",
            ConfidentialVm::Protvirt => "protvirt",
            ConfidentialVm::Cca => "cca",
        }
    }
}

impl fmt::Display for ConfidentialVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConfidentialVm {
    type Err = UnknownWord;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        ConfidentialVm::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == word)
            .ok_or_else(|| UnknownWord(word.to_owned()))
    }
}

const HYPERVISOR_PRESENT: u32 = 1 << 31;
const LEAF_HIGHEST_EXTENDED: u32 = 0x8000_0000;
const LEAF_AMD_ENCRYPTED_MEMORY: u32 = 0x8000_001f;
const AMD_SEV_SUPPORTED: u32 = 1 << 1;
const LEAF_INTEL_TDX: u32 = 0x21;
const INTEL_TDX_SIGNATURE: &[u8; 12] = b"IntelTDX    ";
const SEV_STATUS_SEV: u64 = 1 << 0;
const SEV_STATUS_SEV_ES: u64 = 1 << 1;
const SEV_STATUS_SEV_SNP: u64 = 1 << 2;

const LEAF_HYPERV_VENDOR: u32 = 0x4000_0000;
const LEAF_HYPERV_FEATURES: u32 = 0x4000_0003;
const LEAF_HYPERV_ISOLATION: u32 = 0x4000_000c;
const HYPERV_HIGHEST_LEAF: std::ops::RangeInclusive<u32> = 0x4000_0005..=0x4000_ffff;
const HYPERV_ISOLATED: u32 = 1 << 22;
const HYPERV_ROOT_PARTITION: u32 = 1 << 12;

/// Hyper-V's isolation types (leaf 0x4000000C EBX bits 0-3), as the TLFS numbers them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HypervIsolation {
    Snp = 2,
    Tdx = 3,
}

fn isolation_name(kind: u32) -> &'static str {
    match kind {
        0 => "none",
        1 => "VBS",
        2 => "SNP",
        3 => "TDX",
        _ => "unknown",
    }
}

/// A 12-byte register string for evidence, quoted, with unprintable bytes escaped.
fn quoted(bytes: &[u8; 12]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

impl Detector {
    /// The confidential-VM side, as `systemd-detect-virt --cvm`: the technology, `None` when
    /// this is no confidential VM (or systemd's algorithm cannot tell, like an unreadable MSR).
    pub fn detect_cvm(&self) -> (Option<ConfidentialVm>, Vec<Evidence>) {
        let mut probe = Probe::default();
        let answer = match self.cpuid.cpuid(1, 0) {
            Some(leaf1) => self.cvm_x86(&mut probe, leaf1),
            None => self.cvm_sysfs(&mut probe),
        };
        let answer = probe.decide(answer);
        (answer, probe.evidence)
    }

    /// A CPUID leaf of a processor known to have CPUID; a reader that stops answering counts
    /// as zeros.
    fn leaf(&self, leaf: u32) -> CpuidResult {
        self.cpuid.cpuid(leaf, 0).unwrap_or_default()
    }

    fn cvm_x86(&self, probe: &mut Probe, leaf1: CpuidResult) -> Option<ConfidentialVm> {
        let present = leaf1.ecx & HYPERVISOR_PRESENT != 0;
        probe.saw(
            "cpuid:0x00000001",
            format!("ecx bit 31 (hypervisor present) = {}", u8::from(present)),
            None,
        );
        if !present {
            return None;
        }
        let vendor = self.leaf(0).vendor();
        probe.saw(
            "cpuid:0x00000000",
            format!("vendor {}", quoted(&vendor)),
            None,
        );
        match &vendor {
            b"AuthenticAMD" => self.sev(probe),
            b"GenuineIntel" => self.tdx(probe),
            _ => None,
        }
    }

    /// The highest extended leaf, which systemd 257 checks before the AMD and Intel leaves.
    fn highest_extended_leaf(&self, probe: &mut Probe) -> u32 {
        let highest = self.leaf(LEAF_HIGHEST_EXTENDED).eax;
        probe.saw(
            "cpuid:0x80000000",
            format!("highest extended leaf = {highest:#010x}"),
            None,
        );
        highest
    }

    fn sev(&self, probe: &mut Probe) -> Option<ConfidentialVm> {
        if self.highest_extended_leaf(probe) < LEAF_AMD_ENCRYPTED_MEMORY {
            return None;
        }
        let eax = self.leaf(LEAF_AMD_ENCRYPTED_MEMORY).eax;
        let sev = eax & AMD_SEV_SUPPORTED != 0;
        probe.saw(
            "cpuid:0x8000001f",
            format!("eax bit 1 (SEV) = {}", u8::from(sev)),
            None,
        );
        if !sev {
            // Azure blocks the SEV leaf from its SEV-SNP guests; Hyper-V's leaves say it there.
            return self
                .hyperv_isolation(probe, HypervIsolation::Snp, ConfidentialVm::SevSnp)
                .then_some(ConfidentialVm::SevSnp);
        }
        let source = format!("msr:{MSR_AMD64_SEV_STATUS:#010x}");
        match self.msr.read_msr(MSR_AMD64_SEV_STATUS) {
            Ok(status) => {
                // SNP implies ES implies SEV: the highest bit set names it.
                let found = if status & SEV_STATUS_SEV_SNP != 0 {
                    Some(ConfidentialVm::SevSnp)
                } else if status & SEV_STATUS_SEV_ES != 0 {
                    Some(ConfidentialVm::SevEs)
                } else if status & SEV_STATUS_SEV != 0 {
                    Some(ConfidentialVm::Sev)
                } else {
                    None
                };
                probe.saw(
                    source,
                    format!("SEV_STATUS = {status:#x} (from {})", self.msr.origin()),
                    found.map(ConfidentialVm::as_str),
                );
                found
            }
            Err(error) => {
                probe.saw(
                    source,
                    format!(
                        "SEV_STATUS unreadable: {error} (needs the msr module and root); \
                         systemd 257 then answers none"
                    ),
                    None,
                );
                None
            }
        }
    }

    fn tdx(&self, probe: &mut Probe) -> Option<ConfidentialVm> {
        // systemd 257 compares the highest *extended* leaf with 0x21 here.
        if self.highest_extended_leaf(probe) < LEAF_INTEL_TDX {
            return None;
        }
        let signature = self.leaf(LEAF_INTEL_TDX).vendor();
        let tdx = &signature == INTEL_TDX_SIGNATURE;
        probe.saw(
            "cpuid:0x00000021",
            format!("signature {}", quoted(&signature)),
            tdx.then_some(ConfidentialVm::Tdx.as_str()),
        );
        if tdx {
            return Some(ConfidentialVm::Tdx);
        }
        self.hyperv_isolation(probe, HypervIsolation::Tdx, ConfidentialVm::Tdx)
            .then_some(ConfidentialVm::Tdx)
    }

    /// Whether Hyper-V's leaves describe an isolated (confidential) partition of `wanted` type.
    fn hyperv_isolation(
        &self,
        probe: &mut Probe,
        wanted: HypervIsolation,
        word: ConfidentialVm,
    ) -> bool {
        let vendor = self.leaf(LEAF_HYPERV_VENDOR);
        let signature = vendor.signature();
        let hyperv = &signature == b"Microsoft Hv" && HYPERV_HIGHEST_LEAF.contains(&vendor.eax);
        probe.saw(
            "cpuid:0x40000000",
            format!(
                "signature {}, highest leaf {:#010x}{}",
                quoted(&signature),
                vendor.eax,
                if hyperv {
                    ""
                } else {
                    ": no Hyper-V isolation leaves"
                }
            ),
            None,
        );
        if !hyperv {
            return false;
        }
        let features = self.leaf(LEAF_HYPERV_FEATURES).ebx;
        let isolated = features & HYPERV_ISOLATED != 0 && features & HYPERV_ROOT_PARTITION == 0;
        probe.saw(
            "cpuid:0x40000003",
            format!(
                "ebx bit 22 (isolated partition) = {}, bit 12 (root partition) = {}",
                u8::from(features & HYPERV_ISOLATED != 0),
                u8::from(features & HYPERV_ROOT_PARTITION != 0)
            ),
            None,
        );
        if !isolated {
            return false;
        }
        let kind = self.leaf(LEAF_HYPERV_ISOLATION).ebx & 0xf;
        let matches = kind == wanted as u32;
        probe.saw(
            "cpuid:0x4000000c",
            format!("isolation type = {kind} ({})", isolation_name(kind)),
            matches.then_some(word.as_str()),
        );
        matches
    }

    fn cvm_sysfs(&self, probe: &mut Probe) -> Option<ConfidentialVm> {
        const PROT_VIRT: &str = "sys/firmware/uv/prot_virt_guest";
        const ARM_CCA: &str = "sys/devices/platform/arm-cca-dev";
        // s390x: the ultravisor's flag. Where the file exists, it alone decides.
        if let Ok(bytes) = std::fs::read(self.path(PROT_VIRT)) {
            let protected = bytes.first() == Some(&b'1');
            probe.saw(
                format!("/{PROT_VIRT}"),
                String::from_utf8_lossy(&bytes).trim(),
                protected.then_some(ConfidentialVm::Protvirt.as_str()),
            );
            return protected.then_some(ConfidentialVm::Protvirt);
        }
        if self.exists(ARM_CCA) {
            probe.saw(
                format!("/{ARM_CCA}"),
                "present",
                Some(ConfidentialVm::Cca.as_str()),
            );
            return Some(ConfidentialVm::Cca);
        }
        probe.saw(
            "cpuid",
            format!("no CPUID (not x86), and neither /{PROT_VIRT} nor /{ARM_CCA} exists"),
            None,
        );
        None
    }
}
