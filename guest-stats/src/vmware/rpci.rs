//! The GuestRPC message channel ("RPCI", backdoor command 30): how a guest sends a text
//! request to the VMware host and gets its reply.
//!
//! Each request uses its own channel (open, send, receive, close), because the host closes
//! channels that stay idle. Every step that the host answers with the checkpoint bit (a
//! snapshot or suspend happened in the middle) is retried from the start of that transfer,
//! a bounded number of times.
//!
//! The module is written against [`Backdoor`], so the same code runs on the hardware and on
//! [`SimHost`](super::sim::SimHost).

use super::{Backdoor, Registers};
use crate::{Error, Result};

/// `BDOOR_CMD_MESSAGE`.
pub const CMD_MESSAGE: u16 = 30;
/// `MESSAGE_TYPE_OPEN`.
pub const TYPE_OPEN: u16 = 0;
/// `MESSAGE_TYPE_SENDSIZE`.
pub const TYPE_SEND_SIZE: u16 = 1;
/// `MESSAGE_TYPE_SENDPAYLOAD`.
pub const TYPE_SEND_PAYLOAD: u16 = 2;
/// `MESSAGE_TYPE_RECVSIZE`.
pub const TYPE_RECV_SIZE: u16 = 3;
/// `MESSAGE_TYPE_RECVPAYLOAD`.
pub const TYPE_RECV_PAYLOAD: u16 = 4;
/// `MESSAGE_TYPE_RECVSTATUS`.
pub const TYPE_RECV_STATUS: u16 = 5;
/// `MESSAGE_TYPE_CLOSE`.
pub const TYPE_CLOSE: u16 = 6;

/// Status bit: the request succeeded.
pub const STATUS_SUCCESS: u16 = 0x0001;
/// Status bit: the host has a message for the guest.
pub const STATUS_DORECV: u16 = 0x0002;
/// Status bit: the channel was closed.
pub const STATUS_CLOSED: u16 = 0x0004;
/// Status bit: the host removed the message before it was fetched.
pub const STATUS_UNSENT: u16 = 0x0008;
/// Status bit: a checkpoint happened; retry.
pub const STATUS_CPT: u16 = 0x0010;
/// Status bit: a device is powering off.
pub const STATUS_POWEROFF: u16 = 0x0020;
/// Status bit: the host saw a channel time-out.
pub const STATUS_TIMEOUT: u16 = 0x0040;
/// Status bit: the host supports high-bandwidth transfers.
pub const STATUS_HB: u16 = 0x0080;

/// The RPCI protocol number ("RPCI").
pub const PROTOCOL_RPCI: u32 = 0x4943_5052;
/// `GUESTMSG_FLAG_COOKIE`: ask for a cookie-protected channel.
pub const FLAG_COOKIE: u32 = 0x8000_0000;
/// EBX of a high-bandwidth transfer: `BDOORHB_CMD_MESSAGE` with the success status.
pub const HB_MESSAGE: u32 = 0x0001_0000;

/// The largest reply accepted; anything longer is refused rather than allocated (guestlib
/// replies are under 2 KiB).
pub const MAX_REPLY_LEN: u32 = 1 << 20;

/// Options of the message channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RpciOptions {
    /// Use high-bandwidth transfers when the host offers them (default `true`). Turn it off on
    /// hosts where they fail (for instance encrypted-memory guests); the 4-bytes-per-call path
    /// always works.
    pub high_bandwidth: bool,
    /// How many times a transfer is restarted after checkpoints before giving up (default 8).
    pub checkpoint_retries: u32,
}

impl Default for RpciOptions {
    fn default() -> Self {
        RpciOptions {
            high_bandwidth: true,
            checkpoint_retries: 8,
        }
    }
}

impl RpciOptions {
    /// Whether to use high-bandwidth transfers.
    pub fn high_bandwidth(mut self, enabled: bool) -> Self {
        self.high_bandwidth = enabled;
        self
    }

    /// How many checkpoint restarts to allow per transfer.
    pub fn checkpoint_retries(mut self, retries: u32) -> Self {
        self.checkpoint_retries = retries;
        self
    }
}

/// A reply of the host: `"1 "` (success) or `"0 "` (failure) followed by the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcReply {
    /// Whether the host said `1`.
    pub success: bool,
    /// The bytes after the two-byte prefix (binary for guestlib, text otherwise).
    pub payload: Vec<u8>,
}

impl RpcReply {
    /// Splits a raw reply into status and payload.
    pub fn parse(raw: &[u8]) -> Result<RpcReply> {
        match raw {
            [b'1', b' ', payload @ ..] => Ok(RpcReply {
                success: true,
                payload: payload.to_vec(),
            }),
            [b'0', b' ', payload @ ..] => Ok(RpcReply {
                success: false,
                payload: payload.to_vec(),
            }),
            // Some hosts answer a bare "1"/"0" for an empty payload.
            [b'1'] => Ok(RpcReply {
                success: true,
                payload: Vec::new(),
            }),
            [b'0'] => Ok(RpcReply {
                success: false,
                payload: Vec::new(),
            }),
            _ => Err(channel_error(format!(
                "reply does not start with \"1 \" or \"0 \" ({} bytes: {:?})",
                raw.len(),
                String::from_utf8_lossy(&raw[..raw.len().min(32)])
            ))),
        }
    }

    /// The payload as text (lossy), for failure messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload)
            .trim_end_matches('\0')
            .to_owned()
    }
}

fn channel_error(detail: impl Into<String>) -> Error {
    Error::Channel {
        detail: detail.into(),
    }
}

fn status_of(word: u32) -> u16 {
    (word >> 16) as u16
}

fn describe(status: u16) -> String {
    let mut parts = Vec::new();
    for (bit, name) in [
        (STATUS_SUCCESS, "success"),
        (STATUS_DORECV, "dorecv"),
        (STATUS_CLOSED, "closed"),
        (STATUS_UNSENT, "unsent"),
        (STATUS_CPT, "checkpoint"),
        (STATUS_POWEROFF, "poweroff"),
        (STATUS_TIMEOUT, "timeout"),
        (STATUS_HB, "hb"),
    ] {
        if status & bit != 0 {
            parts.push(name);
        }
    }
    if parts.is_empty() {
        "status 0".to_owned()
    } else {
        format!("status {}", parts.join("|"))
    }
}

/// An open message channel. Closing it is [`Channel::close`]; [`send_one`] does all of it.
#[derive(Debug)]
pub struct Channel<'b, B: Backdoor + ?Sized> {
    backdoor: &'b mut B,
    id: u16,
    cookie_high: u32,
    cookie_low: u32,
    options: RpciOptions,
}

impl<'b, B: Backdoor + ?Sized> Channel<'b, B> {
    /// Opens an RPCI channel: first asking for a cookie, then (older hosts) without.
    pub fn open(backdoor: &'b mut B, options: RpciOptions) -> Result<Channel<'b, B>> {
        let mut last_status = 0;
        let mut checkpoints = 0;
        let mut protocols = [PROTOCOL_RPCI | FLAG_COOKIE, PROTOCOL_RPCI]
            .into_iter()
            .peekable();
        while let Some(&protocol) = protocols.peek() {
            let mut registers = Registers::command(CMD_MESSAGE, TYPE_OPEN);
            registers.ebx = protocol;
            let out = backdoor.call(registers);
            last_status = status_of(out.ecx);
            if last_status & STATUS_SUCCESS == 0 {
                // A checkpoint says nothing about cookie support: ask the same again.
                if last_status & STATUS_CPT != 0 && checkpoints < options.checkpoint_retries {
                    checkpoints += 1;
                } else {
                    protocols.next();
                }
                continue;
            }
            let with_cookie = protocol & FLAG_COOKIE != 0;
            return Ok(Channel {
                backdoor,
                id: status_of(out.edx),
                cookie_high: if with_cookie { out.esi } else { 0 },
                cookie_low: if with_cookie { out.edi } else { 0 },
                options,
            });
        }
        Err(channel_error(format!(
            "the host refused to open an RPCI channel ({}); is the backdoor restricted?",
            describe(last_status)
        )))
    }

    /// The channel id the host gave.
    pub fn id(&self) -> u16 {
        self.id
    }

    fn registers(&self, kind: u16) -> Registers {
        let mut registers = Registers::command(CMD_MESSAGE, kind);
        registers.edx = u32::from(self.id) << 16;
        registers.esi = self.cookie_high;
        registers.edi = self.cookie_low;
        registers
    }

    fn hb_registers(&self) -> Registers {
        Registers {
            eax: super::BDOOR_MAGIC,
            ebx: HB_MESSAGE,
            ecx: 0,
            edx: u32::from(self.id) << 16,
            esi: 0,
            edi: 0,
            ebp: 0,
        }
    }

    fn retry_or_fail(&self, attempt: &mut u32, what: &str, status: u16) -> Result<()> {
        if status & STATUS_CPT != 0 && *attempt < self.options.checkpoint_retries {
            *attempt += 1;
            Ok(())
        } else if status & STATUS_CPT != 0 {
            Err(channel_error(format!(
                "{what}: still interrupted by checkpoints after {} retries",
                self.options.checkpoint_retries
            )))
        } else {
            Err(channel_error(format!(
                "{what} failed on channel {} ({})",
                self.id,
                describe(status)
            )))
        }
    }

    /// Sends one request.
    pub fn send(&mut self, request: &[u8]) -> Result<()> {
        let length =
            u32::try_from(request.len()).map_err(|_| channel_error("request longer than 4 GiB"))?;
        let mut attempt = 0;
        'restart: loop {
            let mut registers = self.registers(TYPE_SEND_SIZE);
            registers.ebx = length;
            let out = self.backdoor.call(registers);
            let status = status_of(out.ecx);
            if status & STATUS_SUCCESS == 0 {
                self.retry_or_fail(&mut attempt, "SENDSIZE", status)?;
                continue 'restart;
            }
            if request.is_empty() {
                return Ok(());
            }
            if status & STATUS_HB != 0 && self.options.high_bandwidth {
                let mut registers = self.hb_registers();
                registers.edi = self.cookie_low;
                registers.ebp = self.cookie_high;
                let out = self.backdoor.send_high_bandwidth(registers, request);
                let status = status_of(out.ebx);
                if status & STATUS_SUCCESS == 0 {
                    self.retry_or_fail(&mut attempt, "high-bandwidth send", status)?;
                    continue 'restart;
                }
                return Ok(());
            }
            for chunk in request.chunks(4) {
                let mut word = [0u8; 4];
                word[..chunk.len()].copy_from_slice(chunk);
                let mut registers = self.registers(TYPE_SEND_PAYLOAD);
                registers.ebx = u32::from_le_bytes(word);
                let out = self.backdoor.call(registers);
                let status = status_of(out.ecx);
                if status & STATUS_SUCCESS == 0 {
                    self.retry_or_fail(&mut attempt, "SENDPAYLOAD", status)?;
                    continue 'restart;
                }
            }
            return Ok(());
        }
    }

    /// Receives the host's reply to the request sent last (raw: prefix included).
    pub fn receive(&mut self) -> Result<Vec<u8>> {
        let mut attempt = 0;
        'restart: loop {
            let out = self.backdoor.call(self.registers(TYPE_RECV_SIZE));
            let status = status_of(out.ecx);
            if status & STATUS_SUCCESS == 0 {
                self.retry_or_fail(&mut attempt, "RECVSIZE", status)?;
                continue 'restart;
            }
            if status & STATUS_DORECV == 0 {
                return Ok(Vec::new());
            }
            if status_of(out.edx) != TYPE_SEND_SIZE {
                return Err(self.abort(format!(
                    "protocol error: RECVSIZE answered with message type {} instead of {TYPE_SEND_SIZE}",
                    status_of(out.edx)
                )));
            }
            let length = out.ebx;
            if length > MAX_REPLY_LEN {
                return Err(self.abort(format!(
                    "reply of {length} bytes is larger than the {MAX_REPLY_LEN}-byte limit"
                )));
            }
            let mut reply = vec![0u8; length as usize];
            if length > 0 && status & STATUS_HB != 0 && self.options.high_bandwidth {
                let mut registers = self.hb_registers();
                registers.esi = self.cookie_high;
                registers.ebp = self.cookie_low;
                let out = self.backdoor.receive_high_bandwidth(registers, &mut reply);
                let status = status_of(out.ebx);
                if status & STATUS_SUCCESS == 0 {
                    self.retry_or_fail(&mut attempt, "high-bandwidth receive", status)?;
                    continue 'restart;
                }
            } else {
                for chunk in reply.chunks_mut(4) {
                    let mut registers = self.registers(TYPE_RECV_PAYLOAD);
                    registers.ebx = u32::from(STATUS_SUCCESS);
                    let out = self.backdoor.call(registers);
                    let status = status_of(out.ecx);
                    if status & STATUS_SUCCESS == 0 {
                        self.retry_or_fail(&mut attempt, "RECVPAYLOAD", status)?;
                        continue 'restart;
                    }
                    if status_of(out.edx) != TYPE_SEND_PAYLOAD {
                        return Err(self.abort(format!(
                            "protocol error: RECVPAYLOAD answered with message type {} instead of {TYPE_SEND_PAYLOAD}",
                            status_of(out.edx)
                        )));
                    }
                    let word = out.ebx.to_le_bytes();
                    let len = chunk.len();
                    chunk.copy_from_slice(&word[..len]);
                }
            }
            let mut registers = self.registers(TYPE_RECV_STATUS);
            registers.ebx = u32::from(STATUS_SUCCESS);
            let out = self.backdoor.call(registers);
            let status = status_of(out.ecx);
            if status & STATUS_SUCCESS == 0 {
                self.retry_or_fail(&mut attempt, "RECVSTATUS", status)?;
                continue 'restart;
            }
            return Ok(reply);
        }
    }

    /// Tells the host the receive failed (a RECVPAYLOAD with status 0), so it drops the
    /// message, and returns the error to report.
    fn abort(&mut self, detail: String) -> Error {
        let mut registers = self.registers(TYPE_RECV_PAYLOAD);
        registers.ebx = 0;
        self.backdoor.call(registers);
        channel_error(detail)
    }

    /// Closes the channel (retrying after checkpoints, so the host does not keep it until it
    /// times out).
    pub fn close(self) -> Result<()> {
        let mut attempt = 0;
        loop {
            let out = self.backdoor.call(self.registers(TYPE_CLOSE));
            let status = status_of(out.ecx);
            if status & STATUS_SUCCESS != 0 {
                return Ok(());
            }
            self.retry_or_fail(&mut attempt, "CLOSE", status)?;
        }
    }
}

/// Sends one request on a fresh channel and returns the host's reply: open, send, receive,
/// close. A failure to close after a complete exchange is ignored (the host reaps idle
/// channels), any other failure is returned.
pub fn send_one<B: Backdoor + ?Sized>(
    backdoor: &mut B,
    options: &RpciOptions,
    request: &[u8],
) -> Result<RpcReply> {
    let mut channel = Channel::open(backdoor, *options)?;
    let exchange = channel.send(request).and_then(|()| channel.receive());
    let closed = channel.close();
    let raw = exchange?;
    if let Err(error) = closed {
        // The reply is complete; the host reaps the channel on its own. Only a reply that
        // fails to parse is worth more than this note.
        return RpcReply::parse(&raw).map_err(|_| error);
    }
    RpcReply::parse(&raw)
}
