//! NBD wire format: constants, request encoding and pure parsers for handshake and reply
//! bytes. Nothing here does I/O, so everything is property-tested and fuzzed.
//!
//! All integers are big-endian (NBD protocol, `doc/proto.md`).

use crate::{Error, Result};

/// `"NBDMAGIC"`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: fixed newstyle handshake and option requests.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Oldstyle handshake magic (obsolete, refused).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request, once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended (32-byte) reply chunk, once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;

/// Options.
pub mod opt {
    /// Legacy export selection.
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the handshake.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Export information without entering transmission.
    pub const INFO: u32 = 6;
    /// Select the export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Final acknowledgement.
    pub const ACK: u32 = 1;
    /// An export (LIST).
    pub const SERVER: u32 = 2;
    /// Export information (INFO/GO).
    pub const INFO: u32 = 3;
    /// A selected metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on error replies.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    /// Invalid option.
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;
}

/// `NBD_INFO_*` types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Connections share one cache.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE supported (experimental).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS takes a context filter payload (extended headers only).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1;
    /// WRITE_ZEROES must allocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail WRITE_ZEROES unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// The request's length is the payload's (extended headers; required on WRITE).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Nothing (final chunk only).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors (32-bit, compact headers).
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status descriptors (64-bit, extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Error.
    pub const ERROR: u16 = 32769;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = 32770;
    /// Bit set on error chunk types.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Chunk flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Largest option reply payload accepted (names and descriptions are ≤ 4096 bytes).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest error chunk payload accepted.
pub const MAX_ERROR_PAYLOAD: u32 = 4096 + 14;
/// Largest block status payload accepted (2^20 descriptors, as the spec advises servers).
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 20);
/// Largest extended block status payload accepted (2^20 descriptors).
pub const MAX_BLOCK_STATUS_EXT_PAYLOAD: u32 = 8 + 16 * (1 << 20);

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn proto(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// Encodes a 28-byte request header.
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes a 32-byte extended request header. `length` is the payload length when `flags`
/// has [`cflag::PAYLOAD_LEN`], else the effect length (up to 64 bits).
pub fn encode_request_ext(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes an option request: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO: export name and the info types requested.
pub fn encode_go(export: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// Data of NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT.
pub fn encode_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// What the server sends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE`, `FLAG_NO_ZEROES`).
    pub flags: u16,
}

/// Parses the 18-byte newstyle greeting.
pub fn parse_greeting(b: &[u8; 18]) -> Result<ServerGreeting> {
    if be64(&b[0..8]) != NBDMAGIC {
        return Err(Error::Handshake(
            "the peer is not an NBD server (no NBDMAGIC)".into(),
        ));
    }
    let second = be64(&b[8..16]);
    if second == OLDSTYLE_MAGIC {
        return Err(Error::Handshake(
            "the server speaks the obsolete oldstyle protocol; run it in newstyle mode".into(),
        ));
    }
    if second != IHAVEOPT {
        return Err(Error::Handshake(format!(
            "unexpected handshake magic {second:#x}"
        )));
    }
    let flags = be16(&b[16..18]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Handshake(
            "the server does not support fixed newstyle negotiation".into(),
        ));
    }
    Ok(ServerGreeting { flags })
}

/// The 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Payload length.
    pub length: u32,
}

/// Parses an option reply header and checks it answers `expected_option`.
pub fn parse_option_reply_header(b: &[u8; 20], expected_option: u32) -> Result<OptionReplyHeader> {
    if be64(&b[0..8]) != OPTION_REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    let h = OptionReplyHeader {
        option: be32(&b[8..12]),
        reply: be32(&b[12..16]),
        length: be32(&b[16..20]),
    };
    if h.option != expected_option {
        return Err(proto(format!(
            "option reply for option {} while waiting for {expected_option}",
            h.option
        )));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(proto(format!(
            "reply {} of {} bytes to {} (at most {MAX_OPTION_REPLY} allowed)",
            reply_name(h.reply),
            h.length,
            option_name(h.option)
        )));
    }
    Ok(h)
}

/// A decoded `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        maximum: u32,
    },
    /// Canonical name or description (ignored).
    Text(u16, String),
    /// A type this client does not know (ignored, as the spec allows).
    Unknown(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply.
pub fn parse_info(payload: &[u8]) -> Result<InfoReply> {
    if payload.len() < 2 {
        return Err(proto("NBD_REP_INFO shorter than its type"));
    }
    let kind = be16(payload);
    let body = &payload[2..];
    match kind {
        info::EXPORT => {
            if body.len() != 10 {
                return Err(proto("NBD_INFO_EXPORT must be 12 bytes"));
            }
            Ok(InfoReply::Export {
                size: be64(body),
                flags: be16(&body[8..]),
            })
        }
        info::BLOCK_SIZE => {
            if body.len() != 12 {
                return Err(proto("NBD_INFO_BLOCK_SIZE must be 14 bytes"));
            }
            let (minimum, preferred, maximum) = (be32(body), be32(&body[4..]), be32(&body[8..]));
            let valid = minimum.is_power_of_two()
                && minimum <= 64 * 1024
                && preferred.is_power_of_two()
                && preferred >= minimum
                && maximum >= minimum
                && (maximum == u32::MAX || maximum % minimum == 0);
            if !valid {
                return Err(proto(format!(
                    "invalid block sizes: minimum {minimum}, preferred {preferred}, maximum {maximum}"
                )));
            }
            Ok(InfoReply::BlockSize {
                minimum,
                preferred,
                maximum,
            })
        }
        info::NAME | info::DESCRIPTION => Ok(InfoReply::Text(
            kind,
            String::from_utf8_lossy(body).into_owned(),
        )),
        other => Ok(InfoReply::Unknown(other)),
    }
}

/// Parses an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String)> {
    if payload.len() < 4 {
        return Err(proto("NBD_REP_META_CONTEXT shorter than 4 bytes"));
    }
    let name = std::str::from_utf8(&payload[4..])
        .map_err(|_| proto("metadata context name is not UTF-8"))?;
    Ok((be32(payload), name.to_owned()))
}

/// Parses an `NBD_REP_SERVER` payload (a reply to `NBD_OPT_LIST`): export name and
/// description (empty if the server sent none).
pub fn parse_server_reply(payload: &[u8]) -> Result<(String, String)> {
    if payload.len() < 4 {
        return Err(proto("NBD_REP_SERVER shorter than 4 bytes"));
    }
    let name_len = be32(payload) as usize;
    let rest = &payload[4..];
    if name_len > rest.len() {
        return Err(proto("NBD_REP_SERVER name longer than the reply"));
    }
    let name =
        std::str::from_utf8(&rest[..name_len]).map_err(|_| proto("export name is not UTF-8"))?;
    let description = String::from_utf8_lossy(&rest[name_len..]).into_owned();
    Ok((name.to_owned(), description))
}

/// The protocol's name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::ABORT => "NBD_OPT_ABORT",
        opt::LIST => "NBD_OPT_LIST",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::INFO => "NBD_OPT_INFO",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// The protocol's name of an option reply type, for messages.
pub fn reply_name(reply: u32) -> String {
    let name = match reply {
        rep::ACK => "NBD_REP_ACK",
        rep::SERVER => "NBD_REP_SERVER",
        rep::INFO => "NBD_REP_INFO",
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT",
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        rep::ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        other => return format!("{other:#x}"),
    };
    name.to_owned()
}

/// Text of an option error reply, for messages.
pub fn option_error_text(reply: u32) -> &'static str {
    match reply {
        rep::ERR_UNSUP => "not supported",
        rep::ERR_POLICY => "forbidden by server policy",
        rep::ERR_INVALID => "invalid",
        rep::ERR_PLATFORM => "not supported on the server's platform",
        rep::ERR_TLS_REQD => "the server requires TLS",
        rep::ERR_UNKNOWN => "no such export",
        rep::ERR_SHUTDOWN => "the server is shutting down",
        rep::ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        rep::ERR_TOO_BIG => "request too big",
        rep::ERR_EXT_HEADER_REQD => "extended headers required",
        _ => "unknown error",
    }
}

/// The header of a transmission-phase reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: error and cookie (16 bytes on the wire).
    Simple {
        /// Error value, 0 on success.
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured reply chunk (20 bytes on the wire) or an extended one (32 bytes).
    Chunk {
        /// Chunk flags (`chunk::FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie of the request.
        cookie: u64,
        /// The request's offset, echoed by extended chunks (`None` for structured chunks).
        offset: Option<u64>,
        /// Payload length.
        length: u64,
    },
}

/// Bytes of the header that follow the 4-byte magic, or an error for a magic that does not
/// belong to the negotiated header style: with extended headers every reply is an extended
/// chunk; without them, extended chunks are an error.
pub fn reply_header_rest_len(magic: u32, extended: bool) -> Result<usize> {
    match (magic, extended) {
        (SIMPLE_REPLY_MAGIC, false) => Ok(12),
        (STRUCTURED_REPLY_MAGIC, false) => Ok(16),
        (EXTENDED_REPLY_MAGIC, true) => Ok(28),
        (EXTENDED_REPLY_MAGIC, false) => Err(proto(
            "extended-header reply although extended headers were not negotiated",
        )),
        (SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC, true) => Err(proto(format!(
            "compact reply (magic {magic:#010x}) although extended headers were negotiated"
        ))),
        (other, _) => Err(proto(format!("bad reply magic {other:#010x}"))),
    }
}

/// Parses the rest of a reply header after its magic (`rest` has
/// [`reply_header_rest_len`] bytes).
pub fn parse_reply_header(magic: u32, rest: &[u8], extended: bool) -> Result<ReplyHeader> {
    let need = reply_header_rest_len(magic, extended)?;
    if rest.len() != need {
        return Err(proto("reply header of the wrong length"));
    }
    Ok(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be32(rest),
            cookie: be64(&rest[4..]),
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: be16(rest),
            kind: be16(&rest[2..]),
            cookie: be64(&rest[4..]),
            offset: None,
            length: u64::from(be32(&rest[12..])),
        },
        _ => ReplyHeader::Chunk {
            flags: be16(rest),
            kind: be16(&rest[2..]),
            cookie: be64(&rest[4..]),
            offset: Some(be64(&rest[12..])),
            length: be64(&rest[20..]),
        },
    })
}

/// Parses an `OFFSET_HOLE` payload: offset and size.
pub fn parse_hole(payload: &[u8]) -> Result<(u64, u32)> {
    if payload.len() != 12 {
        return Err(proto("OFFSET_HOLE chunk must be 12 bytes"));
    }
    let size = be32(&payload[8..]);
    if size == 0 {
        return Err(proto("OFFSET_HOLE chunk of size 0"));
    }
    Ok((be64(payload), size))
}

/// A decoded error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Error value (errno).
    pub errno: u32,
    /// Human-readable message.
    pub message: String,
    /// Offset, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Parses an `ERROR` or `ERROR_OFFSET` payload (or an unknown error type, which carries at
/// least the errno and message length).
pub fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<ErrorChunk> {
    if payload.len() < 6 {
        return Err(proto("error chunk shorter than 6 bytes"));
    }
    let errno = be32(payload);
    let msg_len = be16(&payload[4..]) as usize;
    let rest = &payload[6..];
    if msg_len > rest.len() {
        return Err(proto("error chunk message longer than the chunk"));
    }
    let message = String::from_utf8_lossy(&rest[..msg_len]).into_owned();
    let offset = if kind == chunk::ERROR_OFFSET {
        if rest.len() != msg_len + 8 {
            return Err(proto("ERROR_OFFSET chunk has the wrong length"));
        }
        Some(be64(&rest[msg_len..]))
    } else {
        None
    };
    if errno == 0 {
        return Err(proto("error chunk with error value 0"));
    }
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// Parses an extended `BLOCK_STATUS_EXT` payload: context id and (length, status)
/// descriptors. The contexts this client negotiates are 32-bit, so a status with any of its
/// upper 32 bits set is an error.
pub fn parse_block_status_ext(payload: &[u8]) -> Result<(u32, Vec<(u64, u64)>)> {
    if payload.len() < 24 || !(payload.len() - 8).is_multiple_of(16) {
        return Err(proto(
            "BLOCK_STATUS_EXT chunk must hold a context id, a count and at least one descriptor",
        ));
    }
    let id = be32(payload);
    let count = be32(&payload[4..]) as usize;
    let descriptors = payload[8..]
        .chunks_exact(16)
        .map(|d| (be64(d), be64(&d[8..])))
        .collect::<Vec<_>>();
    if count != descriptors.len() {
        return Err(proto(format!(
            "BLOCK_STATUS_EXT chunk announces {count} descriptors but holds {}",
            descriptors.len()
        )));
    }
    if descriptors.iter().any(|&(len, _)| len == 0) {
        return Err(proto("BLOCK_STATUS_EXT descriptor of length 0"));
    }
    if let Some(&(_, status)) = descriptors.iter().find(|&&(_, s)| s > u64::from(u32::MAX)) {
        return Err(proto(format!(
            "BLOCK_STATUS_EXT status {status:#x} does not fit the 32-bit context"
        )));
    }
    Ok((id, descriptors))
}

/// Parses a `BLOCK_STATUS` payload: context id and (length, flags) descriptors.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(proto(
            "BLOCK_STATUS chunk must hold a context id and at least one descriptor",
        ));
    }
    let id = be32(payload);
    let descriptors = payload[4..]
        .chunks_exact(8)
        .map(|d| (be32(d), be32(&d[4..])))
        .collect::<Vec<_>>();
    if descriptors.iter().any(|&(len, _)| len == 0) {
        return Err(proto("BLOCK_STATUS descriptor of length 0"));
    }
    Ok((id, descriptors))
}

/// Checks that the data/hole chunk `[offset, offset + length)` lies inside the request.
pub fn check_chunk_range(req_offset: u64, req_length: u64, offset: u64, length: u64) -> Result<()> {
    let end = offset.checked_add(length);
    let req_end = req_offset + req_length;
    match end {
        Some(end) if offset >= req_offset && end <= req_end => Ok(()),
        _ => Err(proto(format!(
            "reply chunk [{offset}, +{length}) lies outside the request [{req_offset}, +{req_length})"
        ))),
    }
}

/// Checks that non-overlapping chunks `ranges` (relative offset, length) exactly cover
/// `[0, length)`; sorts them in place.
pub fn check_coverage(ranges: &mut [(u64, u64)], length: u64) -> Result<()> {
    ranges.sort_unstable();
    let mut pos = 0u64;
    for &(start, len) in ranges.iter() {
        if start != pos {
            return Err(proto(if start < pos {
                format!("read reply chunks overlap at relative offset {start}")
            } else {
                format!("read reply leaves bytes {pos}..{start} uncovered (short read)")
            }));
        }
        pos = start + len;
    }
    if pos != length {
        return Err(proto(format!(
            "read reply covers {pos} of {length} bytes (short read)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout() {
        let b = encode_request(cflag::FUA, cmd::WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(be64(&b[8..]), 0x0102_0304_0506_0708);
        assert_eq!(be64(&b[16..]), 4096);
        assert_eq!(be32(&b[24..]), 512);
    }

    #[test]
    fn greeting_checks() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g).unwrap().flags, 3);
        g[17] = 2;
        assert!(parse_greeting(&g).is_err());
        g[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(parse_greeting(&g)
            .unwrap_err()
            .to_string()
            .contains("oldstyle"));
    }

    #[test]
    fn info_and_chunks() {
        let mut p = vec![0, 0];
        p.extend_from_slice(&(1u64 << 30).to_be_bytes());
        p.extend_from_slice(&(tflag::HAS_FLAGS | tflag::READ_ONLY).to_be_bytes());
        assert_eq!(
            parse_info(&p).unwrap(),
            InfoReply::Export {
                size: 1 << 30,
                flags: 3
            }
        );
        let mut bs = vec![0, 3];
        for v in [512u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(
            parse_info(&bs).unwrap(),
            InfoReply::BlockSize { minimum: 512, .. }
        ));
        let mut bad = vec![0, 3];
        for v in [3u32, 4096, 1 << 25] {
            bad.extend_from_slice(&v.to_be_bytes());
        }
        assert!(parse_info(&bad).is_err());

        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        e.extend_from_slice(&99u64.to_be_bytes());
        let ec = parse_error_chunk(chunk::ERROR_OFFSET, &e).unwrap();
        assert_eq!(
            (ec.errno, ec.message.as_str(), ec.offset),
            (5, "bad", Some(99))
        );
        assert!(parse_error_chunk(chunk::ERROR, &e[..7]).is_err());

        let mut bsr = 1u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3)] {
            bsr.extend_from_slice(&l.to_be_bytes());
            bsr.extend_from_slice(&f.to_be_bytes());
        }
        assert_eq!(
            parse_block_status(&bsr).unwrap(),
            (1, vec![(4096, 0), (8192, 3)])
        );
        assert!(parse_block_status(&bsr[..8]).is_err());
    }

    #[test]
    fn coverage() {
        assert!(check_coverage(&mut [(10, 5), (0, 10)], 15).is_ok());
        assert!(check_coverage(&mut [(0, 10), (5, 10)], 15).is_err());
        assert!(check_coverage(&mut [(0, 10)], 15)
            .unwrap_err()
            .to_string()
            .contains("short read"));
        assert!(check_coverage(&mut [], 0).is_ok());
        assert!(check_chunk_range(100, 50, 100, 50).is_ok());
        assert!(check_chunk_range(100, 50, 99, 10).is_err());
        assert!(check_chunk_range(100, 50, u64::MAX, 10).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), kind in any::<u16>()) {
            let _ = parse_info(&bytes);
            let _ = parse_meta_context(&bytes);
            let _ = parse_server_reply(&bytes);
            let _ = parse_hole(&bytes);
            let _ = parse_error_chunk(kind, &bytes);
            let _ = parse_block_status(&bytes);
            let _ = parse_block_status_ext(&bytes);
            if bytes.len() >= 20 {
                let mut h = [0u8; 20];
                h.copy_from_slice(&bytes[..20]);
                let _ = parse_option_reply_header(&h, 7);
                let magic = be32(&bytes);
                for extended in [false, true] {
                    if let Ok(n) = reply_header_rest_len(magic, extended) {
                        if bytes.len() >= 4 + n {
                            let _ = parse_reply_header(magic, &bytes[4..4 + n], extended);
                        }
                    }
                }
            }
            if bytes.len() >= 18 {
                let mut g = [0u8; 18];
                g.copy_from_slice(&bytes[..18]);
                let _ = parse_greeting(&g);
            }
        }

        #[test]
        fn block_status_ext_round_trips(id in any::<u32>(), descs in proptest::collection::vec((1u64.., 0..=u64::from(u32::MAX)), 1..50)) {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            for (l, f) in &descs {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            prop_assert_eq!(parse_block_status_ext(&p).unwrap(), (id, descs.clone()));
            // A wrong count, a cut descriptor, a 64-bit status: errors, never panics.
            let mut wrong = p.clone();
            wrong[7] ^= 1;
            prop_assert!(parse_block_status_ext(&wrong).is_err());
            prop_assert!(parse_block_status_ext(&p[..p.len() - 1]).is_err());
            let mut wide = p.clone();
            wide[16] = 1;
            prop_assert!(parse_block_status_ext(&wide).is_err());
        }

        #[test]
        fn extended_requests_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u64>()) {
            let b = encode_request_ext(flags, command, cookie, offset, length);
            prop_assert_eq!(be32(&b), EXTENDED_REQUEST_MAGIC);
            prop_assert_eq!((be16(&b[4..]), be16(&b[6..]), be64(&b[8..]), be64(&b[16..]), be64(&b[24..])), (flags, command, cookie, offset, length));
        }

        #[test]
        fn block_status_round_trips(id in any::<u32>(), descs in proptest::collection::vec((1u32.., any::<u32>()), 1..50)) {
            let mut p = id.to_be_bytes().to_vec();
            for (l, f) in &descs {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            prop_assert_eq!(parse_block_status(&p).unwrap(), (id, descs));
        }

        #[test]
        fn reply_headers_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), length in any::<u32>(), error in any::<u32>()) {
            let mut s = Vec::new();
            s.extend_from_slice(&error.to_be_bytes());
            s.extend_from_slice(&cookie.to_be_bytes());
            prop_assert_eq!(parse_reply_header(SIMPLE_REPLY_MAGIC, &s, false).unwrap(), ReplyHeader::Simple { error, cookie });
            prop_assert!(parse_reply_header(SIMPLE_REPLY_MAGIC, &s, true).is_err());
            let mut c = Vec::new();
            c.extend_from_slice(&flags.to_be_bytes());
            c.extend_from_slice(&kind.to_be_bytes());
            c.extend_from_slice(&cookie.to_be_bytes());
            c.extend_from_slice(&length.to_be_bytes());
            prop_assert_eq!(parse_reply_header(STRUCTURED_REPLY_MAGIC, &c, false).unwrap(), ReplyHeader::Chunk { flags, kind, cookie, offset: None, length: u64::from(length) });
            let mut e = Vec::new();
            e.extend_from_slice(&flags.to_be_bytes());
            e.extend_from_slice(&kind.to_be_bytes());
            e.extend_from_slice(&cookie.to_be_bytes());
            e.extend_from_slice(&u64::from(error).to_be_bytes());
            e.extend_from_slice(&(u64::from(length) << 20).to_be_bytes());
            prop_assert_eq!(parse_reply_header(EXTENDED_REPLY_MAGIC, &e, true).unwrap(), ReplyHeader::Chunk { flags, kind, cookie, offset: Some(u64::from(error)), length: u64::from(length) << 20 });
            prop_assert!(parse_reply_header(EXTENDED_REPLY_MAGIC, &e, false).is_err());
        }

        #[test]
        fn coverage_accepts_any_partition(cuts in proptest::collection::btree_set(1u64..1000, 0..20)) {
            let mut points: Vec<u64> = cuts.into_iter().collect();
            points.insert(0, 0);
            points.push(1000);
            let mut ranges: Vec<(u64, u64)> = points.windows(2).map(|w| (w[0], w[1] - w[0])).rev().collect();
            prop_assert!(check_coverage(&mut ranges, 1000).is_ok());
        }
    }
}
