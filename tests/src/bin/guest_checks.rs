//! The in-guest half of `cargo xtask vm-test`: runs inside the QEMU guest as root and checks the
//! SDK against the real virtual hardware.
//!
//! Each check prints one line on the console, `VMSDK-CHECK <name> PASS|FAIL <detail>`, which the
//! host side of the test parses; raw outputs follow on lines of their own for the log.
//!
//! * `detect`: `vmsdk detect --json` says `qemu`, as systemd-detect-virt does under QEMU TCG.
//! * `detect-evidence`: its evidence holds the DMI vendor `QEMU` and the CPUID signature
//!   `TCGTCGTCGTCG`, and these match what this program reads itself.
//! * `detect-parity`: `vmsdk detect` and the real `systemd-detect-virt`, both run here, give the
//!   same answers and exit codes (plain, `--vm`, `--container`).
//! * `stats`: `vmsdk stats --format json` succeeds with the Linux backend, and its values agree
//!   with the guest's own `/proc`.
//! * `backdoor-refused`: guest-stats' `HardwareBackdoor::open` refuses QEMU (its CPUID signature
//!   is not VMware's) without touching the port, although vmport would answer.
//!
//! The host boots the guest a second time dressed as a VMware guest that hides the hypervisor
//! bit (`vmsdk.profile=vmware-dmi`: no CPUID hypervisor bit, DMI vendor "VMware, Inc."), where
//! QEMU's vmport device plays the VMware backdoor:
//!
//! * `vmware-environment`: that is what the guest sees;
//! * `detect-parity`: `vmsdk detect` still agrees with systemd-detect-virt;
//! * `backdoor-guard`: without I/O privilege the `in` faults, the forked probe takes the SIGSEGV
//!   and `open` reports `BackdoorDenied`;
//! * `backdoor-getversion`: with the I/O privilege raised (`iopl(3)`, here only — the library
//!   never does it), the real `asm!` port I/O reaches vmport: the magic in EBX, and the version
//!   and VMX type the host configured, raw and through `facts::version`.
//!
//! The profile comes from `vmsdk.profile=` on the kernel command line.
//! Usage: `guest_checks [--vmsdk PATH]` (default `/usr/bin/vmsdk`). Exits 1 if any check failed.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use serde_json::Value;

/// The outcome of one check: the detail says what was seen either way.
type Outcome = Result<String, String>;

fn main() -> ExitCode {
    let mut vmsdk = PathBuf::from("/usr/bin/vmsdk");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--vmsdk", Some(path)) => vmsdk = PathBuf::from(path),
            _ => {
                eprintln!("usage: guest_checks [--vmsdk PATH]");
                return ExitCode::from(2);
            }
        }
    }

    let profile = kernel_word("profile").unwrap_or_default();
    let mut all_passed = true;
    match profile.as_str() {
        // QEMU as it is: DMI "QEMU", the TCG CPUID signature, and the vmport device.
        "qemu" => {
            let detection = run_json(&vmsdk, &["detect", "--json"], "detect");
            all_passed &= report("detect", check_detect(&detection));
            all_passed &= report("detect-evidence", check_detect_evidence(&detection));
            all_passed &= report("detect-parity", check_detect_parity(&vmsdk));
            all_passed &= report("stats", check_stats(&vmsdk));
            all_passed &= report("backdoor-refused", backdoor::check_refused());
        }
        // QEMU dressed as a VMware guest that hides the hypervisor bit: DMI says VMware, and
        // QEMU's vmport device answers the backdoor.
        "vmware-dmi" => {
            all_passed &= report("vmware-environment", backdoor::check_environment());
            all_passed &= report("detect-parity", check_detect_parity(&vmsdk));
            all_passed &= report("backdoor-guard", backdoor::check_guard());
            all_passed &= report("backdoor-getversion", backdoor::check_get_version());
        }
        other => {
            report(
                "profile",
                Err(format!(
                    "unknown vmsdk.profile={other:?} on the kernel command line"
                )),
            );
            all_passed = false;
        }
    }
    if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(name: &str, outcome: Outcome) -> bool {
    // One line each, whatever the detail holds, so the host can parse it.
    let flatten = |s: String| s.replace(['\n', '\r'], " ");
    match outcome {
        Ok(detail) => {
            println!("VMSDK-CHECK {name} PASS {}", flatten(detail));
            true
        }
        Err(detail) => {
            println!("VMSDK-CHECK {name} FAIL {}", flatten(detail));
            false
        }
    }
}

/// Runs `vmsdk ARGS`, echoes its output for the log, and parses stdout as JSON.
fn run_json(vmsdk: &std::path::Path, args: &[&str], label: &str) -> Result<Value, String> {
    let out = Command::new(vmsdk)
        .args(args)
        .output()
        .map_err(|e| format!("could not run {}: {e}", vmsdk.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines() {
        println!("  {label}| {line}");
    }
    for line in stderr.lines() {
        println!("  {label} (stderr)| {line}");
    }
    if !out.status.success() {
        return Err(format!(
            "`vmsdk {}` exited with {}: {}",
            args.join(" "),
            out.status,
            stderr.trim()
        ));
    }
    serde_json::from_str(&stdout)
        .map_err(|e| format!("`vmsdk {}` printed invalid JSON: {e}", args.join(" ")))
}

fn check_detect(detection: &Result<Value, String>) -> Outcome {
    let detection = detection.as_ref().map_err(Clone::clone)?;
    let word = detection["virtualization"].as_str().unwrap_or("<missing>");
    let vm = detection["vm"].as_str().unwrap_or("<missing>");
    if word == "qemu" && vm == "qemu" {
        Ok(format!("virtualization={word} vm={vm}"))
    } else {
        Err(format!(
            "expected qemu (what systemd-detect-virt says under QEMU TCG), got virtualization={word} vm={vm}"
        ))
    }
}

fn check_detect_evidence(detection: &Result<Value, String>) -> Outcome {
    let detection = detection.as_ref().map_err(Clone::clone)?;
    let evidence = detection["vm_evidence"]
        .as_array()
        .ok_or("no vm_evidence array in the detection")?;
    let sys_vendor = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor")
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("read /sys/class/dmi/id/sys_vendor: {e}"))?;
    let signature = ffi::hypervisor_signature();
    // The ground truth of this VM first, so a wrong environment is not blamed on the SDK.
    if sys_vendor != "QEMU" || signature != "TCGTCGTCGTCG" {
        return Err(format!(
            "this is not the expected VM: DMI sys_vendor={sys_vendor:?}, CPUID 0x40000000={signature:?}"
        ));
    }
    let seen = |source_part: &str, observed: &str| {
        evidence.iter().any(|e| {
            e["source"]
                .as_str()
                .is_some_and(|s| s.contains(source_part))
                && e["observed"].as_str().is_some_and(|o| o.contains(observed))
                && e["indicates"].as_str() == Some("qemu")
        })
    };
    let dmi = seen("dmi", "QEMU");
    let cpuid = seen("cpuid:0x40000000", "TCGTCGTCGTCG");
    let decisive: Vec<&str> = evidence
        .iter()
        .filter(|e| e["decisive"].as_bool() == Some(true))
        .filter_map(|e| e["source"].as_str())
        .collect();
    if dmi && cpuid && !decisive.is_empty() {
        Ok(format!(
            "DMI vendor QEMU and CPUID TCGTCGTCGTCG both point to qemu; decisive: {}",
            decisive.join(", ")
        ))
    } else {
        Err(format!(
            "evidence incomplete: DMI QEMU->qemu {dmi}, CPUID TCGTCGTCGTCG->qemu {cpuid}, decisive {decisive:?}; evidence: {}",
            Value::Array(evidence.clone())
        ))
    }
}

/// `vmsdk detect` against the real `systemd-detect-virt` in the same guest: same word, same exit
/// status, for the plain, `--vm` and `--container` questions.
fn check_detect_parity(vmsdk: &std::path::Path) -> Outcome {
    let systemd = std::path::Path::new(SYSTEMD_DETECT_VIRT);
    let mut answers = Vec::new();
    for flags in [&[][..], &["--vm"][..], &["--container"][..]] {
        let ours = word_and_status(vmsdk, &[&["detect"][..], flags].concat())?;
        let theirs = word_and_status(systemd, flags)?;
        if ours != theirs {
            return Err(format!(
                "{flags:?}: vmsdk detect says {ours:?}, systemd-detect-virt says {theirs:?}"
            ));
        }
        answers.push(format!("detect{}={}", flags.concat(), ours.0));
    }
    Ok(format!(
        "same words and exit codes as systemd-detect-virt: {}",
        answers.join(" ")
    ))
}

/// Where the initramfs puts systemd's own detector (with its shared libraries).
const SYSTEMD_DETECT_VIRT: &str = "/usr/bin/systemd-detect-virt";

fn word_and_status(program: &std::path::Path, args: &[&str]) -> Result<(String, i32), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("could not run {}: {e}", program.display()))?;
    let word = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!(
        "  parity| {} {} -> {word} ({})",
        program.display(),
        args.join(" "),
        out.status
    );
    Ok((word, out.status.code().unwrap_or(-1)))
}

fn check_stats(vmsdk: &std::path::Path) -> Outcome {
    let snapshot = run_json(vmsdk, &["stats", "--format", "json"], "stats")?;
    let object = snapshot
        .as_object()
        .ok_or("the snapshot is not a JSON object")?;
    let backend = object.get("backend").and_then(Value::as_str).unwrap_or("");
    if backend != "linux" {
        return Err(format!(
            "expected the linux backend in a KVM-less QEMU guest, got {backend:?}"
        ));
    }
    // Session ids are written as hex strings ("0x…") so 64-bit values survive JSON readers.
    let session = object
        .get("session_id")
        .and_then(Value::as_str)
        .and_then(|hex| hex.parse::<guest_stats::SessionId>().ok());
    if !session.is_some_and(guest_stats::SessionId::is_valid) {
        return Err("session_id is missing or 0 (0 is never a live session)".to_owned());
    }
    let present: Vec<(&String, &Value)> = object
        .iter()
        .filter(|(key, value)| !value.is_null() && *key != "backend" && *key != "session_id")
        .collect();
    if present.is_empty() {
        return Err("the Linux backend gave no statistic at all".to_owned());
    }
    // Guest memory figures cannot exceed the guest's memory.
    let mem_total_mb = meminfo_kib("MemTotal")? / 1024;
    for (key, value) in &present {
        if let (true, Some(mb)) = (
            key.starts_with("mem_") && key.ends_with("_mb"),
            value.as_u64(),
        ) {
            if mb > mem_total_mb + 1 {
                return Err(format!(
                    "{key}={mb} MB exceeds the guest's MemTotal of {mem_total_mb} MB"
                ));
            }
        }
    }
    // Time figures are bounded by the guest's uptime, read after vmsdk ran.
    let uptime_ms = uptime_ms()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let number = |key: &str| object.get(key).and_then(Value::as_u64);
    if let Some(elapsed) = number("elapsed_ms") {
        if elapsed == 0 || elapsed > uptime_ms {
            return Err(format!(
                "elapsed_ms={elapsed} but the guest has been up {uptime_ms} ms"
            ));
        }
    }
    if let Some(used) = number("cpu_used_ms") {
        if used > uptime_ms * cpus {
            return Err(format!(
                "cpu_used_ms={used} exceeds {uptime_ms} ms of uptime on {cpus} vCPU(s)"
            ));
        }
    }
    let names: Vec<String> = present
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    Ok(format!(
        "backend=linux, {} statistics: {}",
        present.len(),
        names.join(" ")
    ))
}

fn meminfo_kib(field: &str) -> Result<u64, String> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("read /proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/meminfo"))
}

fn uptime_ms() -> Result<u64, String> {
    let text =
        std::fs::read_to_string("/proc/uptime").map_err(|e| format!("read /proc/uptime: {e}"))?;
    let seconds: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unreadable /proc/uptime: {text:?}"))?;
    // /proc/uptime counts hundredths of a second: allow for its rounding.
    Ok((seconds * 1000.0) as u64 + 10)
}

/// What the host told the guest, from `vmsdk.<key>=` on the kernel command line.
fn kernel_word(key: &str) -> Result<String, String> {
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let prefix = format!("vmsdk.{key}=");
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix))
        .map(str::to_owned)
        .ok_or_else(|| format!("no {prefix} on the kernel command line"))
}

/// A number the host told QEMU's vmport to answer, from the kernel command line.
fn kernel_parameter(key: &str) -> Result<u32, String> {
    kernel_word(key)?
        .parse()
        .map_err(|e| format!("vmsdk.{key}: {e}"))
}

/// The guest-stats VMware backdoor layer on real (emulated) hardware: QEMU's vmport device.
mod backdoor {
    use guest_stats::vmware::backdoor::{HardwareBackdoor, CMD_GET_VERSION};
    use guest_stats::vmware::detect::Interface;
    use guest_stats::vmware::facts::{self, VmxProduct};
    use guest_stats::vmware::{Backdoor, Registers, BDOOR_MAGIC};
    use guest_stats::Error;

    use super::{ffi, kernel_parameter, Outcome};

    /// In the plain QEMU guest the vmport device would answer, but CPUID carries QEMU's own
    /// signature, and a backdoor answer proves nothing where other hypervisors emulate it: the
    /// library must refuse without touching the port, even with the I/O privilege raised.
    pub fn check_refused() -> Outcome {
        ffi::raise_io_privilege()?;
        match HardwareBackdoor::open() {
            Err(Error::NotRunningInVm) => Ok(
                "HardwareBackdoor::open() -> NotRunningInVm under the TCGTCGTCGTCG signature"
                    .to_owned(),
            ),
            Err(other) => Err(format!("expected NotRunningInVm, got {other:?}")),
            Ok(backdoor) => Err(format!(
                "the library opened the backdoor ({:?}) on a non-VMware hypervisor",
                backdoor.interface()
            )),
        }
    }

    /// The VMware-impersonating boot is what the host meant it to be.
    pub fn check_environment() -> Outcome {
        let cpuid = guest_stats::vmware::backdoor::read_cpuid();
        let vendor = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor")
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("read sys_vendor: {e}"))?;
        if cpuid.hypervisor_bit || !vendor.contains("VMware") {
            return Err(format!(
                "expected no hypervisor bit and a VMware DMI vendor, got bit={} vendor={vendor:?}",
                cpuid.hypervisor_bit
            ));
        }
        Ok(format!(
            "CPUID hypervisor bit clear, DMI sys_vendor {vendor:?}"
        ))
    }

    /// Without I/O privilege QEMU faults the `in` (ring 3, IOPL 0): the probe in the forked
    /// child takes the SIGSEGV and `open` reports BackdoorDenied instead of crashing.
    pub fn check_guard() -> Outcome {
        match HardwareBackdoor::open() {
            Err(Error::BackdoorDenied { detail }) => Ok(format!(
                "without iopl: BackdoorDenied ({detail}); this process survived"
            )),
            Err(other) => Err(format!(
                "expected BackdoorDenied without iopl, got {other:?}"
            )),
            Ok(_) => Err(
                "the backdoor opened without I/O privilege (QEMU should fault ring-3 IN)"
                    .to_owned(),
            ),
        }
    }

    /// With `iopl(3)`: detection (DMI) picks the I/O port, the forked probe succeeds, and
    /// GETVERSION returns the magic with the version and VMX type the host configured.
    pub fn check_get_version() -> Outcome {
        let version = kernel_parameter("vmx_version")?;
        let vmx_type = kernel_parameter("vmx_type")?;
        // QEMU, unlike VMware, does not let ring 3 at the port without I/O privilege.
        ffi::raise_io_privilege()?;
        let mut backdoor =
            HardwareBackdoor::open().map_err(|e| format!("HardwareBackdoor::open(): {e:?}"))?;
        if backdoor.interface() != Interface::IoPort {
            return Err(format!(
                "expected the I/O port, got {:?}",
                backdoor.interface()
            ));
        }
        // The raw call first, to see every register QEMU answers...
        let mut request = Registers::command(CMD_GET_VERSION, 0xFFFF);
        request.ebx = !BDOOR_MAGIC;
        let raw = backdoor.call(request);
        let detail = format!(
            "raw IN 0x5658: eax(version)={} ebx={:#010x} ecx(vmx type)={}",
            raw.eax, raw.ebx, raw.ecx
        );
        if raw.ebx != BDOOR_MAGIC {
            return Err(format!("no 'VMXh' magic in EBX: {detail}"));
        }
        if raw.eax != version || raw.ecx != vmx_type {
            return Err(format!(
                "expected version {version} and VMX type {vmx_type} as configured on the host: {detail}"
            ));
        }
        // ...then the typed layer on top of it.
        let typed = facts::version(&mut backdoor).map_err(|e| format!("facts::version: {e:?}"))?;
        if typed.version != version || typed.product != VmxProduct::from_ecx(vmx_type) {
            return Err(format!("facts::version gave {typed:?}; {detail}"));
        }
        Ok(format!("{detail}; facts::version: {typed:?}"))
    }
}

/// The only unsafe code of this program: CPUID, and raising the I/O privilege level.
#[allow(unsafe_code)]
mod ffi {
    /// The 12-byte hypervisor vendor signature of CPUID leaf 0x40000000 (EBX, ECX, EDX).
    pub fn hypervisor_signature() -> String {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: CPUID exists on every x86-64 processor and only writes the four registers
            // the intrinsic returns; leaves above the maximum return harmless values. (The
            // intrinsic is safe on newer toolchains, unsafe on the minimum supported one.)
            #[allow(unused_unsafe)]
            let leaf = unsafe { std::arch::x86_64::__cpuid(0x4000_0000) };
            let mut bytes = Vec::with_capacity(12);
            for register in [leaf.ebx, leaf.ecx, leaf.edx] {
                bytes.extend_from_slice(&register.to_le_bytes());
            }
            String::from_utf8_lossy(&bytes)
                .trim_end_matches('\0')
                .to_owned()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            String::new()
        }
    }

    /// `iopl(3)`: lets this process use IN/OUT on any port. Needs root (CAP_SYS_RAWIO).
    pub fn raise_io_privilege() -> Result<(), String> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        {
            // SAFETY: iopl only changes this thread's I/O privilege level; it touches no memory.
            let rc = unsafe { libc::iopl(3) };
            if rc == 0 {
                Ok(())
            } else {
                Err(format!(
                    "iopl(3) failed: {}",
                    std::io::Error::last_os_error()
                ))
            }
        }
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            Err("iopl exists only on x86-64 Linux".to_owned())
        }
    }
}
