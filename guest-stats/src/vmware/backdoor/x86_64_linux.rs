//! The backdoor on x86-64 Linux: the `in`/`rep outsb`/`rep insb` port instructions and the
//! `vmcall`/`vmmcall` hypercalls, CPUID, and the probe in a forked child.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, CpuidResult};
use std::time::Instant;

use super::*;
use crate::vmware::BDOOR_MAGIC;

/// Hypercall flags in DX (they replace the port number): low bandwidth.
const HYPERCALL_LOW_BANDWIDTH: u32 = 0;
/// Hypercall flags: high bandwidth, host to guest.
const HYPERCALL_HB_READ: u32 = 1;
/// Hypercall flags: high bandwidth, guest to host.
const HYPERCALL_HB_WRITE: u32 = 3;

/// How long the probe child may take before it is killed and the backdoor deemed unusable.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn cpuid(leaf: u32) -> CpuidResult {
    // CPUID exists on every x86-64 CPU and only reads identification registers; the
    // intrinsic is safe since Rust 1.87 (the workspace's minimum).
    __cpuid(leaf)
}

pub(super) fn read_cpuid() -> CpuidFacts {
    let hypervisor_bit = cpuid(1).ecx & (1 << 31) != 0;
    if !hypervisor_bit {
        return CpuidFacts::default();
    }
    let leaf = cpuid(detect::LEAF_HYPERVISOR);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    vendor[8..12].copy_from_slice(&leaf.edx.to_le_bytes());
    let vmware_features_ecx = (&vendor == detect::VMWARE_SIGNATURE
        && leaf.eax >= detect::LEAF_VMWARE_FEATURES)
        .then(|| cpuid(detect::LEAF_VMWARE_FEATURES).ecx);
    CpuidFacts {
        hypervisor_bit,
        vendor,
        max_leaf: leaf.eax,
        vmware_features_ecx,
    }
}

/// One low-bandwidth call with `$instruction`. RBX cannot be an asm operand (LLVM reserves
/// it), so it is swapped with a scratch register around the instruction.
macro_rules! low_bandwidth_call {
    ($instruction:tt, $r:expr, $dx_low:expr) => {{
        let r: Registers = $r;
        let mut ebx = u64::from(r.ebx);
        let (mut eax, mut ecx, mut esi, mut edi) = (r.eax, r.ecx, r.esi, r.edi);
        let mut edx = (r.edx & 0xFFFF_0000) | $dx_low;
        // SAFETY: only reached through a `HardwareBackdoor`, which exists only after CPUID
        // (or DMI) said VMware and a probe of this very call succeeded in a child process,
        // so the hypervisor handles the instruction instead of faulting. The registers are
        // all declared (RBX is restored by the second xchg); the call touches no memory of
        // this process and no stack.
        unsafe {
            asm!(
                "xchg rbx, {ebx}",
                $instruction,
                "xchg rbx, {ebx}",
                ebx = inout(reg) ebx,
                inout("eax") eax,
                inout("ecx") ecx,
                inout("edx") edx,
                inout("esi") esi,
                inout("edi") edi,
                options(nostack, nomem),
            );
        }
        Registers { eax, ebx: ebx as u32, ecx, edx, esi, edi, ebp: r.ebp }
    }};
}

pub(super) fn low_bandwidth(interface: Interface, r: Registers) -> Registers {
    match interface {
        Interface::IoPort => {
            low_bandwidth_call!("in eax, dx", r, u32::from(PORT_LOW_BANDWIDTH))
        }
        Interface::Vmcall => low_bandwidth_call!("vmcall", r, HYPERCALL_LOW_BANDWIDTH),
        Interface::Vmmcall => low_bandwidth_call!("vmmcall", r, HYPERCALL_LOW_BANDWIDTH),
    }
}

/// One high-bandwidth transfer with `$instruction`. RBX and RBP cannot be asm operands, so
/// both are swapped with scratch registers around the instruction (no stack is used, so
/// the red zone is safe).
macro_rules! high_bandwidth_call {
    ($instruction:tt, $r:expr, $dx_low:expr, $pointer_reg:tt, $pointer:expr, $other_reg:tt, $other:expr, $count:expr, $($memory:ident)?) => {{
        let r: Registers = $r;
        let mut ebx = u64::from(r.ebx);
        let mut ebp = u64::from(r.ebp);
        let mut eax = r.eax;
        let mut edx = (r.edx & 0xFFFF_0000) | $dx_low;
        let mut other: u32 = $other;
        // SAFETY: as for low-bandwidth calls, the backdoor is known to work here. The
        // string instruction (or hypercall) moves exactly `count` bytes through the pointer
        // register, which points at a live buffer of exactly that many bytes, borrowed
        // (mutably for a receive) for the duration of the call. RBX and RBP are restored by
        // the second xchg; the direction flag is cleared first as `rep` needs.
        unsafe {
            asm!(
                "xchg rbx, {ebx}",
                "xchg rbp, {ebp}",
                "cld",
                $instruction,
                "xchg rbp, {ebp}",
                "xchg rbx, {ebx}",
                ebx = inout(reg) ebx,
                ebp = inout(reg) ebp,
                inout("eax") eax,
                inout("rcx") $count => _,
                inout("edx") edx,
                inout($pointer_reg) $pointer => _,
                inout($other_reg) other,
                options(nostack $(, $memory)?),
            );
        }
        let _ = other;
        Registers { eax, ebx: ebx as u32, ecx: 0, edx, esi: 0, edi: 0, ebp: ebp as u32 }
    }};
}

pub(super) fn send_high_bandwidth(interface: Interface, r: Registers, data: &[u8]) -> Registers {
    let (pointer, count) = (data.as_ptr() as u64, data.len() as u64);
    match interface {
        Interface::IoPort => high_bandwidth_call!(
            "rep outsb",
            r,
            u32::from(PORT_HIGH_BANDWIDTH),
            "rsi",
            pointer,
            "edi",
            r.edi,
            count,
            readonly
        ),
        Interface::Vmcall => high_bandwidth_call!(
            "vmcall",
            r,
            HYPERCALL_HB_WRITE,
            "rsi",
            pointer,
            "edi",
            r.edi,
            count,
            readonly
        ),
        Interface::Vmmcall => high_bandwidth_call!(
            "vmmcall",
            r,
            HYPERCALL_HB_WRITE,
            "rsi",
            pointer,
            "edi",
            r.edi,
            count,
            readonly
        ),
    }
}

pub(super) fn receive_high_bandwidth(
    interface: Interface,
    r: Registers,
    buffer: &mut [u8],
) -> Registers {
    let (pointer, count) = (buffer.as_mut_ptr() as u64, buffer.len() as u64);
    match interface {
        Interface::IoPort => high_bandwidth_call!(
            "rep insb",
            r,
            u32::from(PORT_HIGH_BANDWIDTH),
            "rdi",
            pointer,
            "esi",
            r.esi,
            count,
        ),
        Interface::Vmcall => high_bandwidth_call!(
            "vmcall",
            r,
            HYPERCALL_HB_READ,
            "rdi",
            pointer,
            "esi",
            r.esi,
            count,
        ),
        Interface::Vmmcall => high_bandwidth_call!(
            "vmmcall",
            r,
            HYPERCALL_HB_READ,
            "rdi",
            pointer,
            "esi",
            r.esi,
            count,
        ),
    }
}

fn get_version_registers() -> Registers {
    let mut registers = Registers::command(CMD_GET_VERSION, 0xFFFF);
    registers.ebx = !BDOOR_MAGIC;
    registers
}

/// Runs GETVERSION in a child process and reports how it ended.
pub(super) fn probe(interface: Interface) -> Result<()> {
    // The child must only do async-signal-safe things (see `run_in_child`): one backdoor
    // instruction on registers, then exit.
    fn child(interface: Interface) -> i32 {
        let out = low_bandwidth(interface, get_version_registers());
        i32::from(out.ebx != BDOOR_MAGIC)
    }
    let status = run_in_child(|| child(interface), PROBE_TIMEOUT)?;
    match status {
        ChildEnd::Exited(0) => Ok(()),
        ChildEnd::Exited(_) => Err(Error::NotRunningInVm),
        ChildEnd::Signalled(signal) => {
            let what = match signal {
                libc::SIGSEGV => "SIGSEGV: the host refuses ring-3 I/O port access",
                libc::SIGILL => "SIGILL: the host does not accept the hypercall from ring 3",
                _ => "an unexpected signal",
            };
            Err(Error::BackdoorDenied {
                detail: format!(
                    "the probe was killed by signal {signal} ({what}, via {interface:?})"
                ),
            })
        }
        ChildEnd::TimedOut => Err(Error::BackdoorDenied {
            detail: format!("the probe did not finish within {PROBE_TIMEOUT:?}"),
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum ChildEnd {
    Exited(i32),
    Signalled(i32),
    TimedOut,
}

/// Runs `body` in a forked child (without core dumps) and waits for it at most `timeout`,
/// killing it after that. `body` must be async-signal-safe: the child of a multi-threaded
/// process may not allocate or take locks.
pub(super) fn run_in_child(
    body: impl FnOnce() -> i32,
    timeout: std::time::Duration,
) -> Result<ChildEnd> {
    // SAFETY: fork has no memory-safety preconditions. The child runs only `body` (which
    // the caller keeps async-signal-safe), prctl and `_exit`; `_exit` runs no destructors
    // or atexit handlers, so nothing of the parent's state is touched twice.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::BackdoorDenied {
            detail: format!(
                "cannot fork the probe process: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    if pid == 0 {
        // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's core-dump flag, so a
        // fault of the probe leaves no core file behind.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        let code = body();
        // SAFETY: `_exit` ends the child at once, as explained above.
        unsafe { libc::_exit(code) };
    }
    let started = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our own child and `status` a valid place for the result.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == pid {
            break;
        }
        if reaped < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::BackdoorDenied {
                detail: format!("cannot wait for the probe process: {error}"),
            });
        }
        if started.elapsed() > timeout {
            // SAFETY: signalling and reaping our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Ok(ChildEnd::TimedOut);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(if libc::WIFSIGNALED(status) {
        ChildEnd::Signalled(libc::WTERMSIG(status))
    } else {
        ChildEnd::Exited(libc::WEXITSTATUS(status))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // These exercise the fork/wait machinery of the probe with children that end in each
    // way a probe can, without ever running a backdoor instruction.
    #[test]
    fn child_exit_codes_are_reported() {
        assert_eq!(
            run_in_child(|| 0, PROBE_TIMEOUT).unwrap(),
            ChildEnd::Exited(0)
        );
        assert_eq!(
            run_in_child(|| 3, PROBE_TIMEOUT).unwrap(),
            ChildEnd::Exited(3)
        );
    }

    #[test]
    fn a_faulting_child_is_reported_not_fatal() {
        let end = run_in_child(
            || {
                // std's SIGSEGV handler lets a *raised* (not faulting) signal return, so
                // restore the default action, as a real fault ends up with.
                // SAFETY: changing a signal disposition and raising the signal only affect
                // the forked child, which it ends.
                unsafe {
                    libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                    libc::raise(libc::SIGSEGV);
                }
                0
            },
            PROBE_TIMEOUT,
        )
        .unwrap();
        assert_eq!(end, ChildEnd::Signalled(libc::SIGSEGV));
    }

    #[test]
    fn a_hanging_child_is_killed() {
        let end = run_in_child(
            || loop {
                // SAFETY: pause only sleeps until a signal arrives (SIGKILL, here).
                unsafe { libc::pause() };
            },
            Duration::from_millis(50),
        )
        .unwrap();
        assert_eq!(end, ChildEnd::TimedOut);
    }
}
