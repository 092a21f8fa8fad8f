//! The VMware backend: the guestlib statistics read straight from the hypervisor, in pure Rust
//! (no `libvmGuestLib`, no VMware Tools needed).
//!
//! The layers, bottom up:
//!
//! - [`backdoor`]: the only `unsafe` code of the crate. It issues the VMware backdoor call
//!   (I/O port `0x5658`/`0x5659`, or `vmcall`/`vmmcall` when CPUID leaf `0x40000010` says so),
//!   and only after CPUID (or DMI, when the hypervisor bit is absent) says VMware and a probe in
//!   a child process succeeded. Elsewhere it returns [`Error::NotRunningInVm`] and never
//!   executes the instruction.
//! - [`Backdoor`]: the small trait [`rpci`] is written against, implemented by the hardware
//!   backdoor and by [`sim::SimHost`], a simulated VMware host for tests.
//! - [`rpci`]: the GuestRPC message channel (command 30): open (with cookie, then without),
//!   send, receive, close, with checkpoint retries; one channel per request, as the host closes
//!   idle channels.
//! - [`guestlib`]: `guestlib.info.get 3` with fallback to `2`, and pure decoders of the v3
//!   (header + XDR) and v2 (669-byte struct) replies.
//! - [`facts`]: plain backdoor facts a monitoring agent wants: backdoor version and product
//!   type, host time, processor speed.
//!
//! # Privileges
//!
//! VMware lets ring 3 use the backdoor ports without `iopl(3)`: the hypervisor intercepts the
//! fault the `in` instruction raises. A host can forbid that
//! (`monitor_control.restrict_backdoor = "TRUE"`), and confidential VMs (TDX) do not forward
//! user-space hypercalls. The library never raises its own privileges; a program that wants
//! `iopl(3)` must call it itself before [`VmwareGuestStats::open`]. When the backdoor faults
//! anyway, `open` reports [`Error::BackdoorDenied`] (the probe runs in a child process, so the
//! fault does not kill the caller).

#[allow(unsafe_code)]
pub mod backdoor;
pub mod detect;
pub mod facts;
pub mod guestlib;
pub mod rpci;
pub mod sim;

use crate::{Error, GuestStats, Result, SessionId, Snapshot, Stat, StatValue};

pub use backdoor::HardwareBackdoor;
pub use guestlib::GuestlibInfo;

/// `BDOOR_MAGIC`, "VMXh": EAX of every backdoor call, and EBX of a GETVERSION reply from VMware.
pub const BDOOR_MAGIC: u32 = 0x564D_5868;

/// The six 32-bit registers of a backdoor call (only the low halves count, even on x86-64),
/// plus EBP, which high-bandwidth transfers use.
///
/// The backdoor implementation owns the low 16 bits of EDX (port number or hypercall flags)
/// and, for high-bandwidth transfers, ECX (the byte count) and the buffer address (ESI for a
/// send, EDI for a receive); callers fill in everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Registers {
    /// EAX: [`BDOOR_MAGIC`] in, result out.
    pub eax: u32,
    /// EBX: argument in, result out.
    pub ebx: u32,
    /// ECX: command (low 16) and sub-command (high 16) in, result out.
    pub ecx: u32,
    /// EDX: channel id (high 16) in, result out.
    pub edx: u32,
    /// ESI: argument in, result out.
    pub esi: u32,
    /// EDI: argument in, result out.
    pub edi: u32,
    /// EBP: high-bandwidth argument in (ignored by low-bandwidth calls).
    pub ebp: u32,
}

impl Registers {
    /// Registers for command `command` (ECX low 16) with sub-command `sub` (ECX high 16), EAX
    /// set to the magic and everything else zero.
    pub fn command(command: u16, sub: u16) -> Registers {
        Registers {
            eax: BDOOR_MAGIC,
            ecx: (u32::from(sub) << 16) | u32::from(command),
            ..Registers::default()
        }
    }
}

/// A way to make VMware backdoor calls: the hardware (in a VMware guest) or a simulated host.
pub trait Backdoor: Send {
    /// A low-bandwidth call: six registers in, six out.
    fn call(&mut self, registers: Registers) -> Registers;

    /// A high-bandwidth transfer from the guest to the host (`rep outsb` on port `0x5659`, or
    /// the hypercall equivalent) of all of `data`. The status comes back in EBX's high 16 bits.
    fn send_high_bandwidth(&mut self, registers: Registers, data: &[u8]) -> Registers;

    /// A high-bandwidth transfer from the host into all of `buffer` (`rep insb`). The status
    /// comes back in EBX's high 16 bits.
    fn receive_high_bandwidth(&mut self, registers: Registers, buffer: &mut [u8]) -> Registers;
}

impl<B: Backdoor + ?Sized> Backdoor for &mut B {
    fn call(&mut self, registers: Registers) -> Registers {
        (**self).call(registers)
    }

    fn send_high_bandwidth(&mut self, registers: Registers, data: &[u8]) -> Registers {
        (**self).send_high_bandwidth(registers, data)
    }

    fn receive_high_bandwidth(&mut self, registers: Registers, buffer: &mut [u8]) -> Registers {
        (**self).receive_high_bandwidth(registers, buffer)
    }
}

/// [`GuestStats`] from the VMware hypervisor, through the backdoor; see the
/// [module documentation](self).
///
/// It is generic over the [`Backdoor`] so that tests run the whole stack against
/// [`sim::SimHost`]; programs use [`VmwareGuestStats::open`].
#[derive(Debug)]
pub struct VmwareGuestStats<B = HardwareBackdoor> {
    backdoor: B,
    options: rpci::RpciOptions,
    /// The guestlib version the host last answered with (3 or 2).
    version: Option<u32>,
    current: Option<GuestlibInfo>,
}

impl VmwareGuestStats<HardwareBackdoor> {
    /// Opens the backend on this machine.
    ///
    /// Fails with [`Error::NotRunningInVm`] unless CPUID (or DMI) says VMware, without ever
    /// touching the backdoor; with [`Error::BackdoorDenied`] if VMware refuses the backdoor to
    /// this process. No RPC is sent until [`update`](GuestStats::update).
    pub fn open() -> Result<VmwareGuestStats<HardwareBackdoor>> {
        Ok(VmwareGuestStats::with_backdoor(HardwareBackdoor::open()?))
    }
}

impl<B: Backdoor> VmwareGuestStats<B> {
    /// The backend over any backdoor (a [`sim::SimHost`] in tests).
    pub fn with_backdoor(backdoor: B) -> VmwareGuestStats<B> {
        VmwareGuestStats {
            backdoor,
            options: rpci::RpciOptions::default(),
            version: None,
            current: None,
        }
    }

    /// Sets the message-channel options (for instance, forbid high-bandwidth transfers on
    /// hosts where they fail).
    pub fn with_rpci_options(mut self, options: rpci::RpciOptions) -> VmwareGuestStats<B> {
        self.options = options;
        self
    }

    /// The backdoor, for [`facts`] queries or to inspect a simulated host.
    pub fn backdoor_mut(&mut self) -> &mut B {
        &mut self.backdoor
    }

    /// The decoded reply of the last successful update.
    pub fn info(&self) -> Result<&GuestlibInfo> {
        self.current.as_ref().ok_or(Error::NoInfo)
    }

    /// The guestlib data version the host last answered with (3, or 2 for older hosts).
    pub fn data_version(&self) -> Option<u32> {
        self.version
    }

    /// The backdoor version and VMware product (GETVERSION); see [`facts::version`].
    pub fn backdoor_version(&mut self) -> Result<facts::BackdoorVersion> {
        facts::version(&mut self.backdoor)
    }

    /// The host's clock (GETTIMEFULL, else GETTIME); see [`facts::host_time`].
    pub fn host_time(&mut self) -> Result<facts::HostTime> {
        facts::host_time(&mut self.backdoor)
    }

    /// A raw statistic of the host (`VMGuestLib_StatGet`); see [`guestlib::stat_get`].
    pub fn stat_raw(&mut self, encoding: guestlib::StatEncoding, stat: &str) -> Result<String> {
        guestlib::stat_get(&mut self.backdoor, &self.options, encoding, stat)
    }

    /// The processor speed the host reports (GETMHZ); see [`facts::processor_mhz`].
    pub fn processor_mhz(&mut self) -> Result<u32> {
        facts::processor_mhz(&mut self.backdoor)
    }
}

impl<B: Backdoor> GuestStats for VmwareGuestStats<B> {
    fn backend(&self) -> &'static str {
        "vmware"
    }

    fn update(&mut self) -> Result<SessionId> {
        let previous = self.current.take().map(|info| info.session_id);
        let first_try = self.version.unwrap_or(guestlib::DATA_VERSION);
        let info = guestlib::fetch(&mut self.backdoor, &self.options, first_try)?;
        // After a session change (a vMotion to another host, …) a v2 answer may only mean the
        // old host was old: negotiate again from the newest version, as the C library does.
        let info = if info.version < guestlib::DATA_VERSION
            && previous.is_some_and(|previous| previous != info.session_id)
        {
            guestlib::fetch(&mut self.backdoor, &self.options, guestlib::DATA_VERSION)?
        } else {
            info
        };
        self.version = Some(info.version);
        let session = info.session_id;
        self.current = Some(info);
        Ok(session)
    }

    fn session_id(&self) -> Result<SessionId> {
        Ok(self.info()?.session_id)
    }

    fn stat(&self, stat: Stat) -> Result<StatValue> {
        self.info()?.stat(stat)
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let info = self.info()?;
        let mut snapshot = Snapshot::new(info.session_id, "vmware");
        for &stat in Stat::ALL {
            snapshot.set(stat, info.stat(stat).ok());
        }
        Ok(snapshot)
    }
}
