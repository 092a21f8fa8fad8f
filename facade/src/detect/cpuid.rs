//! CPUID through a trait, so detection runs on recorded leaves in tests.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::msr::MsrReader;

/// The four registers one CPUID leaf returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

impl CpuidResult {
    /// The 12-byte vendor signature hypervisor leaves carry in EBX, ECX, EDX.
    pub fn signature(&self) -> [u8; 12] {
        let mut signature = [0u8; 12];
        signature[..4].copy_from_slice(&self.ebx.to_le_bytes());
        signature[4..8].copy_from_slice(&self.ecx.to_le_bytes());
        signature[8..].copy_from_slice(&self.edx.to_le_bytes());
        signature
    }

    /// The 12-byte string leaf 0 (the processor vendor, `GenuineIntel`) and Intel's leaf 0x21
    /// (`IntelTDX    `) carry in EBX, EDX, ECX: the order differs from the hypervisor leaves.
    pub fn vendor(&self) -> [u8; 12] {
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&self.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&self.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&self.ecx.to_le_bytes());
        vendor
    }
}

/// Anything that answers CPUID queries: the processor, or a recording of one.
///
/// `None` means CPUID does not exist here (not x86), which detection treats as "no CPUID signal",
/// exactly as systemd does on other architectures.
pub trait CpuidReader: Send + Sync + fmt::Debug {
    /// Executes CPUID with `leaf` in EAX and `subleaf` in ECX.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> Option<CpuidResult>;
}

/// The CPUID instruction of the processor this code runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeCpuid;

impl CpuidReader for NativeCpuid {
    #[cfg(target_arch = "x86_64")]
    fn cpuid(&self, leaf: u32, subleaf: u32) -> Option<CpuidResult> {
        // CPUID is unprivileged and exists on every x86-64 processor; the intrinsic is safe.
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        Some(CpuidResult {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        })
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn cpuid(&self, _leaf: u32, _subleaf: u32) -> Option<CpuidResult> {
        None
    }
}

/// A processor without the CPUID instruction: any architecture but x86.
///
/// [`Detector::with_root`](super::Detector::with_root) uses it for trees without a `cpuid`
/// recording, so the arm64 and s390x signals of a recorded tree are looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoCpuid;

impl CpuidReader for NoCpuid {
    fn cpuid(&self, _leaf: u32, _subleaf: u32) -> Option<CpuidResult> {
        None
    }
}

/// Recorded CPUID leaves (subleaf 0) and model-specific registers, as captured from a machine;
/// leaves not recorded read as zeros, registers not recorded cannot be read.
///
/// The text form, one leaf per line, is what `vmsdk detect --dump-cpuid` prints and what the
/// fixture trees store in a file named `cpuid`. Lines starting with `msr` record a register
/// (index, 64-bit value), as the msr driver would answer it:
///
/// ```text
/// # leaf      eax        ebx        ecx        edx
/// 0x00000001 0x00000000 0x00000000 0x80000000 0x00000000
/// 0x40000000 0x40000001 0x4b4d564b 0x564b4d56 0x0000004d
/// msr 0xc0010131 0x0000000000000003
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordedCpuid {
    leaves: BTreeMap<u32, CpuidResult>,
    msrs: BTreeMap<u32, u64>,
}

impl RecordedCpuid {
    /// An empty recording: a processor that answers zeros everywhere (no hypervisor bit).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the answer for `leaf`.
    pub fn with_leaf(mut self, leaf: u32, result: CpuidResult) -> Self {
        self.leaves.insert(leaf, result);
        self
    }

    /// Records a hypervisor: the hypervisor bit of leaf 1 and `signature` at `base`.
    pub fn with_hypervisor(self, base: u32, signature: &str) -> Self {
        let mut padded = [0u8; 12];
        let bytes = signature.as_bytes();
        let len = bytes.len().min(12);
        padded[..len].copy_from_slice(&bytes[..len]);
        let word =
            |i: usize| u32::from_le_bytes([padded[i], padded[i + 1], padded[i + 2], padded[i + 3]]);
        let mut leaf1 = self.leaves.get(&1).copied().unwrap_or_default();
        leaf1.ecx |= 1 << 31;
        self.with_leaf(1, leaf1).with_leaf(
            base,
            CpuidResult {
                eax: base + 1,
                ebx: word(0),
                ecx: word(4),
                edx: word(8),
            },
        )
    }

    /// Records the value of model-specific register `index`.
    pub fn with_msr(mut self, index: u32, value: u64) -> Self {
        self.msrs.insert(index, value);
        self
    }

    /// Whether the recording holds any model-specific register.
    pub fn has_msrs(&self) -> bool {
        !self.msrs.is_empty()
    }

    /// Captures the leaves detection uses from another reader (normally [`NativeCpuid`]): the
    /// vendor and feature leaves, every hypervisor base, Hyper-V's feature and isolation leaves,
    /// the highest extended leaf, AMD's encrypted-memory leaf and Intel's TDX leaf.
    pub fn capture(reader: &dyn CpuidReader) -> Self {
        let mut recording = Self::new();
        let leaves = [0, 1, 0x21]
            .into_iter()
            .chain((0x4000_0000..=0x4000_ff00).step_by(0x100))
            .chain([0x4000_0003, 0x4000_000c, 0x8000_0000, 0x8000_001f]);
        for leaf in leaves {
            if let Some(result) = reader.cpuid(leaf, 0) {
                if result != CpuidResult::default() {
                    recording.leaves.insert(leaf, result);
                }
            }
        }
        recording
    }

    /// Adds a model-specific register read through `reader`, if it can be read here.
    pub fn capture_msr(mut self, reader: &dyn MsrReader, index: u32) -> std::io::Result<Self> {
        let value = reader.read_msr(index)?;
        self.msrs.insert(index, value);
        Ok(self)
    }
}

impl CpuidReader for RecordedCpuid {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> Option<CpuidResult> {
        Some(self.leaves.get(&leaf).copied().unwrap_or_default())
    }
}

impl MsrReader for RecordedCpuid {
    fn read_msr(&self, index: u32) -> std::io::Result<u64> {
        self.msrs.get(&index).copied().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("MSR {index:#010x} is not in the recording"),
            )
        })
    }

    fn origin(&self) -> String {
        "the CPUID recording".to_owned()
    }
}

impl fmt::Display for RecordedCpuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# leaf      eax        ebx        ecx        edx")?;
        for (leaf, r) in &self.leaves {
            writeln!(
                f,
                "{leaf:#010x} {:#010x} {:#010x} {:#010x} {:#010x}",
                r.eax, r.ebx, r.ecx, r.edx
            )?;
        }
        for (index, value) in &self.msrs {
            writeln!(f, "msr {index:#010x} {value:#018x}")?;
        }
        Ok(())
    }
}

/// A line of a CPUID recording that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CPUID recording line {line}: {reason}")]
pub struct ParseCpuidError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong with it.
    pub reason: String,
}

impl FromStr for RecordedCpuid {
    type Err = ParseCpuidError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut recording = Self::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let error = |reason: String| ParseCpuidError {
                line: index + 1,
                reason,
            };
            let hex = |word: &str| {
                word.strip_prefix("0x")
                    .or_else(|| word.strip_prefix("0X"))
                    .map(str::to_owned)
                    .ok_or_else(|| error(format!("`{word}` is not a 0x-prefixed number")))
            };
            if let Some(rest) = line.strip_prefix("msr") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let [index, value] = words[..] else {
                    return Err(error(format!(
                        "expected `msr INDEX VALUE`, found {} numbers",
                        words.len()
                    )));
                };
                let index = u32::from_str_radix(&hex(index)?, 16)
                    .map_err(|e| error(format!("`{index}` is not a 32-bit MSR index: {e}")))?;
                let value = u64::from_str_radix(&hex(value)?, 16)
                    .map_err(|e| error(format!("`{value}` is not a 64-bit hex number: {e}")))?;
                recording.msrs.insert(index, value);
                continue;
            }
            let numbers = line
                .split_whitespace()
                .map(|word| {
                    u32::from_str_radix(&hex(word)?, 16)
                        .map_err(|e| error(format!("`{word}` is not a 32-bit hex number: {e}")))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let [leaf, eax, ebx, ecx, edx] = numbers[..] else {
                return Err(error(format!(
                    "expected 5 numbers (leaf eax ebx ecx edx), found {}",
                    numbers.len()
                )));
            };
            recording
                .leaves
                .insert(leaf, CpuidResult { eax, ebx, ecx, edx });
        }
        Ok(recording)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_round_trips_through_text() {
        let recording = RecordedCpuid::new()
            .with_hypervisor(0x4000_0000, "Microsoft Hv")
            .with_hypervisor(0x4000_0100, "KVMKVMKVM");
        let text = recording.to_string();
        let parsed: RecordedCpuid = text.parse().unwrap();
        assert_eq!(parsed, recording);
        assert_eq!(
            &parsed.cpuid(0x4000_0100, 0).unwrap().signature(),
            b"KVMKVMKVM\0\0\0"
        );
        assert_eq!(parsed.cpuid(1, 0).unwrap().ecx >> 31, 1);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let err = "0x1 0x2 0x3\n".parse::<RecordedCpuid>().unwrap_err();
        assert_eq!(err.line, 1);
        let err = "# ok\n0x1 0x2 0x3 0x4 zz\n"
            .parse::<RecordedCpuid>()
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().contains("zz"));
    }

    #[test]
    fn msr_lines_round_trip_and_unrecorded_registers_are_unreadable() {
        let recording = RecordedCpuid::new()
            .with_hypervisor(0x4000_0000, "KVMKVMKVM")
            .with_msr(0xc001_0131, 0x3);
        let text = recording.to_string();
        assert!(text.contains("msr 0xc0010131 0x0000000000000003"), "{text}");
        let parsed: RecordedCpuid = text.parse().unwrap();
        assert_eq!(parsed, recording);
        assert_eq!(parsed.read_msr(0xc001_0131).unwrap(), 3);
        let err = parsed.read_msr(0x10).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        let err = "msr 0xc0010131\n".parse::<RecordedCpuid>().unwrap_err();
        assert!(err.reason.contains("msr INDEX VALUE"), "{err}");
        let err = "msr 0xc0010131 0x1ffffffffffffffff\n"
            .parse::<RecordedCpuid>()
            .unwrap_err();
        assert!(err.reason.contains("64-bit"), "{err}");
    }

    #[test]
    fn vendor_strings_read_ebx_edx_ecx() {
        let leaf0 = CpuidResult {
            eax: 0x10,
            ebx: u32::from_le_bytes(*b"Auth"),
            ecx: u32::from_le_bytes(*b"cAMD"),
            edx: u32::from_le_bytes(*b"enti"),
        };
        assert_eq!(&leaf0.vendor(), b"AuthenticAMD");
    }

    #[test]
    fn unrecorded_leaves_read_as_zero() {
        let recording = RecordedCpuid::new();
        assert_eq!(
            recording.cpuid(0x4000_0000, 0),
            Some(CpuidResult::default())
        );
    }
}
