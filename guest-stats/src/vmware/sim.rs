//! A simulated VMware host: the host side of the backdoor, the GuestRPC channel and guestlib,
//! as a state machine. **A test double**: it lets [`rpci`](super::rpci),
//! [`guestlib`] and [`VmwareGuestStats`](super::VmwareGuestStats) run end to
//! end anywhere, including faults a real host produces rarely (checkpoints in the middle of a
//! transfer, channels closed under the guest, refusals, garbled replies). It never touches the
//! hardware.
//!
//! ```
//! use guest_stats::vmware::guestlib::GuestlibInfo;
//! use guest_stats::vmware::sim::SimHost;
//! use guest_stats::vmware::VmwareGuestStats;
//! use guest_stats::{GuestStats, SessionId, Stat};
//!
//! let info = GuestlibInfo::new(3, SessionId::new(0x1234))
//!     .with(Stat::MemBalloonedMb, Some(512u64.into()));
//! let host = SimHost::guestlib(vec![info], 3).checkpoint_at(2);
//! let mut stats = VmwareGuestStats::with_backdoor(host);
//! assert_eq!(stats.update()?, SessionId::new(0x1234));
//! assert_eq!(stats.mem_ballooned_mb()?, 512);
//! # Ok::<(), guest_stats::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::facts::{CMD_GET_MHZ, CMD_GET_TIME, CMD_GET_TIME_FULL, CMD_GET_VERSION, VERSION_MAGIC};
use super::guestlib::{self, GuestlibInfo};
use super::rpci::{
    CMD_MESSAGE, FLAG_COOKIE, PROTOCOL_RPCI, STATUS_CLOSED, STATUS_CPT, STATUS_DORECV, STATUS_HB,
    STATUS_SUCCESS, TYPE_CLOSE, TYPE_OPEN, TYPE_RECV_PAYLOAD, TYPE_RECV_SIZE, TYPE_RECV_STATUS,
    TYPE_SEND_PAYLOAD, TYPE_SEND_SIZE,
};
use super::{Backdoor, Registers, BDOOR_MAGIC};

/// The host's answer to one RPC: the raw reply bytes, `"1 "`/`"0 "` prefix included. An empty
/// reply means the host has nothing to send back.
pub type RpcHandler = Box<dyn FnMut(&[u8]) -> Vec<u8> + Send>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChannelState {
    Idle,
    Receiving { expected: usize, data: Vec<u8> },
    Replying { reply: Vec<u8>, position: usize },
}

#[derive(Debug, Clone)]
struct SimChannel {
    cookie: (u32, u32),
    state: ChannelState,
}

/// A simulated VMware host; see the [module documentation](self).
pub struct SimHost {
    handler: RpcHandler,
    channels: BTreeMap<u16, SimChannel>,
    next_cookie: u32,
    message_calls: u64,
    requests: Vec<Vec<u8>>,
    checkpoints: BTreeSet<u64>,
    closes: BTreeSet<u64>,
    wrong_types: BTreeSet<u64>,
    refuse_open: bool,
    cookies: bool,
    high_bandwidth: bool,
    product: u32,
    mhz: u32,
    time: Option<(u64, u32)>,
}

impl fmt::Debug for SimHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHost")
            .field("channels", &self.channels)
            .field("message_calls", &self.message_calls)
            .field("requests", &self.requests.len())
            .field("high_bandwidth", &self.high_bandwidth)
            .field("cookies", &self.cookies)
            .finish_non_exhaustive()
    }
}

impl SimHost {
    /// A host that answers every RPC with `handler`. It speaks cookies and high-bandwidth
    /// transfers, reports ESX, 2600 MHz and a fixed clock.
    pub fn new(handler: impl FnMut(&[u8]) -> Vec<u8> + Send + 'static) -> SimHost {
        SimHost {
            handler: Box::new(handler),
            channels: BTreeMap::new(),
            next_cookie: 0x1000_0001,
            message_calls: 0,
            requests: Vec::new(),
            checkpoints: BTreeSet::new(),
            closes: BTreeSet::new(),
            wrong_types: BTreeSet::new(),
            refuse_open: false,
            cookies: true,
            high_bandwidth: true,
            product: 2,
            mhz: 2_600,
            time: Some((1_763_700_000, 250_000)),
        }
    }

    /// An ESX host whose guestlib answers from `script`: each successful
    /// `guestlib.info.get` answers with the next entry (the last one repeats).
    /// `max_version` is the newest data version it speaks (2 or 3); older requests are
    /// answered in their own format, newer ones refused with "Unsupported version".
    pub fn guestlib(script: Vec<GuestlibInfo>, max_version: u32) -> SimHost {
        let mut position = 0;
        SimHost::new(move |request| {
            let text = String::from_utf8_lossy(request);
            let Some(version) = text.strip_prefix("guestlib.info.get ") else {
                return format!("0 {}", guestlib::UNKNOWN_COMMAND).into_bytes();
            };
            let version: u32 = match version.trim().parse() {
                Ok(version) if (2..=max_version).contains(&version) => version,
                _ => return b"0 Unsupported version".to_vec(),
            };
            let Some(info) = script.get(position.min(script.len().saturating_sub(1))) else {
                return b"0 No data".to_vec();
            };
            position += 1;
            let mut reply = b"1 ".to_vec();
            reply.extend(if version == 2 {
                guestlib::encode_v2(info)
            } else {
                guestlib::encode_v3(info)
            });
            reply
        })
    }

    /// A Workstation/Fusion-like host: the backdoor works but guestlib is unknown.
    pub fn without_guestlib() -> SimHost {
        let mut host = SimHost::new(|_| format!("0 {}", guestlib::UNKNOWN_COMMAND).into_bytes());
        host.product = 4;
        host
    }

    /// Answers the message call with this index (counting every command-30 call from 0) with
    /// the checkpoint status, as a snapshot or suspend in the middle of a transfer does; the
    /// transfer in progress must restart.
    pub fn checkpoint_at(mut self, call: u64) -> SimHost {
        self.checkpoints.insert(call);
        self
    }

    /// Closes the channel under the guest at this message call.
    pub fn close_at(mut self, call: u64) -> SimHost {
        self.closes.insert(call);
        self
    }

    /// Answers a RECVSIZE or RECVPAYLOAD at this message call with the wrong message type.
    pub fn wrong_type_at(mut self, call: u64) -> SimHost {
        self.wrong_types.insert(call);
        self
    }

    /// Refuses to open channels (a restricted backdoor).
    pub fn refusing_channels(mut self) -> SimHost {
        self.refuse_open = true;
        self
    }

    /// Refuses cookie-protected channels, like old hosts.
    pub fn without_cookies(mut self) -> SimHost {
        self.cookies = false;
        self
    }

    /// Offers no high-bandwidth transfers: everything moves 4 bytes a call.
    pub fn without_high_bandwidth(mut self) -> SimHost {
        self.high_bandwidth = false;
        self
    }

    /// Sets what GETMHZ answers (0 = failure).
    pub fn with_mhz(mut self, mhz: u32) -> SimHost {
        self.mhz = mhz;
        self
    }

    /// Sets the host clock (seconds, microseconds); `None` makes the time commands fail.
    pub fn with_time(mut self, time: Option<(u64, u32)>) -> SimHost {
        self.time = time;
        self
    }

    /// Every request the guest completed, in order.
    pub fn requests(&self) -> &[Vec<u8>] {
        &self.requests
    }

    /// How many message (command 30) calls the guest made, high-bandwidth ones included.
    pub fn message_calls(&self) -> u64 {
        self.message_calls
    }

    /// How many channels are open now (0 after every complete exchange).
    pub fn open_channels(&self) -> usize {
        self.channels.len()
    }

    fn status(status: u16) -> u32 {
        u32::from(status) << 16 | u32::from(CMD_MESSAGE)
    }

    fn offered(&self) -> u16 {
        if self.high_bandwidth {
            STATUS_SUCCESS | STATUS_HB
        } else {
            STATUS_SUCCESS
        }
    }

    /// Applies the scheduled faults of this call. `Some(status)` ends the call with it.
    fn fault(&mut self, id: u16) -> Option<u16> {
        let call = self.message_calls;
        self.message_calls += 1;
        if self.closes.contains(&call) {
            self.channels.remove(&id);
            return Some(STATUS_CLOSED);
        }
        if self.checkpoints.contains(&call) {
            if let Some(channel) = self.channels.get_mut(&id) {
                channel.state = match std::mem::replace(&mut channel.state, ChannelState::Idle) {
                    ChannelState::Replying { reply, .. } => {
                        ChannelState::Replying { reply, position: 0 }
                    }
                    _ => ChannelState::Idle,
                };
            }
            return Some(STATUS_CPT);
        }
        None
    }

    fn channel(&mut self, registers: &Registers) -> Option<&mut SimChannel> {
        let id = (registers.edx >> 16) as u16;
        let channel = self.channels.get_mut(&id)?;
        (channel.cookie == (registers.esi, registers.edi)).then_some(channel)
    }

    fn finish_request(&mut self, id: u16, data: Vec<u8>) {
        let reply = (self.handler)(&data);
        self.requests.push(data);
        if let Some(channel) = self.channels.get_mut(&id) {
            channel.state = if reply.is_empty() {
                ChannelState::Idle
            } else {
                ChannelState::Replying { reply, position: 0 }
            };
        }
    }

    fn message(&mut self, registers: Registers) -> Registers {
        let kind = (registers.ecx >> 16) as u16;
        let id = (registers.edx >> 16) as u16;
        let mut out = registers;
        out.ecx = SimHost::status(0);
        if let Some(status) = self.fault(id) {
            out.ecx = SimHost::status(status);
            return out;
        }
        if kind == TYPE_OPEN {
            let with_cookie = registers.ebx & FLAG_COOKIE != 0;
            if self.refuse_open
                || registers.ebx & !FLAG_COOKIE != PROTOCOL_RPCI
                || (with_cookie && !self.cookies)
            {
                return out;
            }
            let Some(free) = (0..128u16).find(|id| !self.channels.contains_key(id)) else {
                return out;
            };
            let cookie = if with_cookie {
                self.next_cookie = self.next_cookie.wrapping_mul(0x9E37_79B9).wrapping_add(1);
                (self.next_cookie, !self.next_cookie)
            } else {
                (0, 0)
            };
            self.channels.insert(
                free,
                SimChannel {
                    cookie,
                    state: ChannelState::Idle,
                },
            );
            out.ecx = SimHost::status(STATUS_SUCCESS);
            out.edx = u32::from(free) << 16;
            (out.esi, out.edi) = cookie;
            return out;
        }
        let offered = self.offered();
        let wrong_type = self.wrong_types.contains(&(self.message_calls - 1));
        let Some(channel) = self.channel(&registers) else {
            return out;
        };
        match (kind, &mut channel.state) {
            (TYPE_SEND_SIZE, state) => {
                let expected = registers.ebx as usize;
                *state = ChannelState::Receiving {
                    expected,
                    data: Vec::with_capacity(expected.min(1 << 16)),
                };
                out.ecx = SimHost::status(offered);
                if expected == 0 {
                    self.finish_request(id, Vec::new());
                }
            }
            (TYPE_SEND_PAYLOAD, ChannelState::Receiving { expected, data }) => {
                let take = (*expected - data.len()).min(4);
                data.extend_from_slice(&registers.ebx.to_le_bytes()[..take]);
                out.ecx = SimHost::status(STATUS_SUCCESS);
                if data.len() == *expected {
                    let data = std::mem::take(data);
                    self.finish_request(id, data);
                }
            }
            (TYPE_RECV_SIZE, ChannelState::Replying { reply, position }) => {
                *position = 0;
                out.ecx = SimHost::status(offered | STATUS_DORECV);
                out.edx = u32::from(if wrong_type {
                    TYPE_SEND_PAYLOAD
                } else {
                    TYPE_SEND_SIZE
                }) << 16;
                out.ebx = reply.len() as u32;
            }
            (TYPE_RECV_SIZE, _) => {
                out.ecx = SimHost::status(STATUS_SUCCESS);
            }
            (TYPE_RECV_PAYLOAD, ChannelState::Replying { reply, position }) => {
                if registers.ebx == 0 {
                    // The guest gave up on this message.
                    channel.state = ChannelState::Idle;
                    out.ecx = SimHost::status(STATUS_SUCCESS);
                    return out;
                }
                let mut word = [0u8; 4];
                let end = (*position + 4).min(reply.len());
                word[..end - *position].copy_from_slice(&reply[*position..end]);
                *position = end;
                out.ebx = u32::from_le_bytes(word);
                out.ecx = SimHost::status(STATUS_SUCCESS);
                out.edx = u32::from(if wrong_type {
                    TYPE_SEND_SIZE
                } else {
                    TYPE_SEND_PAYLOAD
                }) << 16;
            }
            (TYPE_RECV_STATUS, ChannelState::Replying { .. }) => {
                channel.state = ChannelState::Idle;
                out.ecx = SimHost::status(STATUS_SUCCESS);
            }
            (TYPE_CLOSE, _) => {
                self.channels.remove(&id);
                out.ecx = SimHost::status(STATUS_SUCCESS);
            }
            // Anything else is out of sequence: refused, as a host refuses it.
            _ => {}
        }
        out
    }

    fn high_bandwidth_channel(
        &mut self,
        registers: &Registers,
        cookie: (u32, u32),
    ) -> Option<(u16, u32)> {
        let id = (registers.edx >> 16) as u16;
        if let Some(status) = self.fault(id) {
            return Some((id, u32::from(status) << 16));
        }
        if !self.high_bandwidth || registers.ebx & 0xFFFF != 0 {
            return Some((id, 0));
        }
        match self.channels.get(&id) {
            Some(channel) if channel.cookie == cookie => None,
            _ => Some((id, 0)),
        }
    }
}

impl Backdoor for SimHost {
    fn call(&mut self, registers: Registers) -> Registers {
        let mut out = registers;
        if registers.eax != BDOOR_MAGIC {
            out.eax = u32::MAX;
            return out;
        }
        match registers.ecx as u16 {
            CMD_MESSAGE => self.message(registers),
            CMD_GET_VERSION => {
                out.eax = VERSION_MAGIC;
                out.ebx = BDOOR_MAGIC;
                out.ecx = self.product;
                out
            }
            CMD_GET_MHZ => {
                out.eax = self.mhz;
                out
            }
            CMD_GET_TIME_FULL => match self.time {
                Some((seconds, micros)) => {
                    out.eax = BDOOR_MAGIC;
                    out.esi = (seconds >> 32) as u32;
                    out.edx = seconds as u32;
                    out.ebx = micros;
                    out.ecx = 1_000_000;
                    out
                }
                None => {
                    out.eax = u32::MAX;
                    out
                }
            },
            CMD_GET_TIME => match self.time {
                Some((seconds, micros)) if seconds <= u64::from(u32::MAX - 1) => {
                    out.eax = seconds as u32;
                    out.ebx = micros;
                    out.ecx = 1_000_000;
                    out
                }
                _ => {
                    out.eax = u32::MAX;
                    out
                }
            },
            _ => {
                out.eax = u32::MAX;
                out
            }
        }
    }

    fn send_high_bandwidth(&mut self, registers: Registers, data: &[u8]) -> Registers {
        let mut out = registers;
        // A send carries cookieHigh in EBP and cookieLow in EDI.
        if let Some((_, status)) =
            self.high_bandwidth_channel(&registers, (registers.ebp, registers.edi))
        {
            out.ebx = status;
            return out;
        }
        let id = (registers.edx >> 16) as u16;
        let complete = match self.channels.get_mut(&id).map(|c| &mut c.state) {
            Some(ChannelState::Receiving {
                expected,
                data: received,
            }) if received.is_empty() && data.len() == *expected => Some(data.to_vec()),
            _ => None,
        };
        match complete {
            Some(request) => {
                self.finish_request(id, request);
                out.ebx = u32::from(STATUS_SUCCESS) << 16;
            }
            None => out.ebx = 0,
        }
        out
    }

    fn receive_high_bandwidth(&mut self, registers: Registers, buffer: &mut [u8]) -> Registers {
        let mut out = registers;
        // A receive carries cookieHigh in ESI and cookieLow in EBP.
        if let Some((_, status)) =
            self.high_bandwidth_channel(&registers, (registers.esi, registers.ebp))
        {
            out.ebx = status;
            return out;
        }
        let id = (registers.edx >> 16) as u16;
        out.ebx = 0;
        if let Some(ChannelState::Replying { reply, position }) =
            self.channels.get_mut(&id).map(|c| &mut c.state)
        {
            if buffer.len() == reply.len() {
                buffer.copy_from_slice(reply);
                *position = reply.len();
                out.ebx = u32::from(STATUS_SUCCESS) << 16;
            }
        }
        out
    }
}
