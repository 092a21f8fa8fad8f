//! Fixed-newstyle negotiation: structured replies, metadata contexts, `NBD_OPT_GO`.

use std::io::{Read, Write};

use super::proto::{self, info, opt, rep, InfoReply};
use crate::{Error, Result};

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    pub structured: bool,
    pub base_allocation: Option<u32>,
    pub dirty_bitmap: Option<u32>,
}

pub(crate) struct HandshakeRequest<'a> {
    pub export: &'a str,
    pub structured: bool,
    pub extents: bool,
    pub dirty_bitmap: Option<&'a str>,
}

fn io_err(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout {
            what: "NBD handshake".into(),
            offset: None,
            after: std::time::Duration::ZERO,
        },
        std::io::ErrorKind::UnexpectedEof => Error::Handshake(
            "the server closed the connection during negotiation (export limit reached, or TLS \
             required?)"
                .into(),
        ),
        _ => Error::io("NBD handshake", None, e),
    }
}

fn read_option_reply<S: Read>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).map_err(io_err)?;
    let header = proto::parse_option_reply_header(&h, option)?;
    let mut payload = vec![0u8; header.length as usize];
    s.read_exact(&mut payload).map_err(io_err)?;
    Ok((header.reply, payload))
}

fn option_error(option: &str, reply: u32, payload: &[u8]) -> String {
    let message = String::from_utf8_lossy(payload);
    let message = message.trim();
    if message.is_empty() {
        format!("{option}: {}", proto::option_error_text(reply))
    } else {
        format!("{option}: {} ({message})", proto::option_error_text(reply))
    }
}

/// Reads the greeting and answers with the client flags; returns whether NO_ZEROES is on.
fn greet<S: Read + Write>(s: &mut S) -> Result<bool> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(io_err)?;
    let greeting = proto::parse_greeting(&greeting)?;
    let no_zeroes = greeting.flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(proto::FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(proto::FLAG_NO_ZEROES)
        } else {
            0
        };
    s.write_all(&client_flags.to_be_bytes()).map_err(io_err)?;
    Ok(no_zeroes)
}

/// Lists the server's exports (`NBD_OPT_LIST`), then ends the session with `NBD_OPT_ABORT`.
pub(crate) fn list_exports<S: Read + Write>(s: &mut S) -> Result<Vec<(String, String)>> {
    greet(s)?;
    s.write_all(&proto::encode_option(opt::LIST, &[]))
        .map_err(io_err)?;
    let mut exports = Vec::new();
    loop {
        let (reply, payload) = read_option_reply(s, opt::LIST)?;
        match reply {
            rep::ACK => break,
            rep::SERVER => exports.push(proto::parse_server_reply(&payload)?),
            r if r & rep::ERR_BIT != 0 => {
                return Err(Error::Handshake(option_error("NBD_OPT_LIST", r, &payload)))
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected reply {other} to NBD_OPT_LIST"
                )))
            }
        }
    }
    // The server may close without acknowledging the abort; either is fine.
    let _ = s.write_all(&proto::encode_option(opt::ABORT, &[]));
    Ok(exports)
}

/// Runs the handshake on a stream whose timeouts are already set.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    req: &HandshakeRequest<'_>,
) -> Result<Negotiated> {
    let no_zeroes = greet(s)?;

    let mut structured = false;
    if req.structured {
        s.write_all(&proto::encode_option(opt::STRUCTURED_REPLY, &[]))
            .map_err(io_err)?;
        let (reply, _) = read_option_reply(s, opt::STRUCTURED_REPLY)?;
        structured = reply == rep::ACK;
    }

    let mut base_allocation = None;
    let mut dirty_bitmap = None;
    let dirty_name = req.dirty_bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
    if structured && (req.extents || dirty_name.is_some()) {
        let mut queries = Vec::new();
        if req.extents {
            queries.push("base:allocation");
        }
        if let Some(name) = &dirty_name {
            queries.push(name.as_str());
        }
        s.write_all(&proto::encode_option(
            opt::SET_META_CONTEXT,
            &proto::encode_meta_context(req.export, &queries),
        ))
        .map_err(io_err)?;
        loop {
            let (reply, payload) = read_option_reply(s, opt::SET_META_CONTEXT)?;
            match reply {
                rep::ACK => break,
                rep::META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&payload)?;
                    if name == "base:allocation" {
                        base_allocation = Some(id);
                    } else if Some(&name) == dirty_name.as_ref() {
                        dirty_bitmap = Some(id);
                    }
                }
                r if r & rep::ERR_BIT != 0 => break,
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected reply {other} to SET_META_CONTEXT"
                    )))
                }
            }
        }
    }
    if let (Some(name), None) = (&dirty_name, dirty_bitmap) {
        return Err(Error::Handshake(format!(
            "the server does not offer {name}; export the bitmap (qemu-nbd -B NAME)"
        )));
    }

    // NBD_OPT_GO with a promise to respect block sizes.
    s.write_all(&proto::encode_option(
        opt::GO,
        &proto::encode_go(req.export, &[info::BLOCK_SIZE]),
    ))
    .map_err(io_err)?;
    let mut export = None;
    let mut block = None;
    loop {
        let (reply, payload) = read_option_reply(s, opt::GO)?;
        match reply {
            rep::ACK => break,
            rep::INFO => match proto::parse_info(&payload)? {
                InfoReply::Export { size, flags } => export = Some((size, flags)),
                InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => block = Some((minimum, preferred, maximum)),
                InfoReply::Text(..) | InfoReply::Unknown(_) => {}
            },
            rep::ERR_UNSUP => {
                // A server from before NBD_OPT_GO: fall back to EXPORT_NAME.
                return export_name_fallback(s, req.export, no_zeroes, structured);
            }
            rep::ERR_UNKNOWN => {
                return Err(Error::NotFound(format!(
                    "NBD export {:?}: {}",
                    req.export,
                    option_error("NBD_OPT_GO", reply, &payload)
                )))
            }
            r if r & rep::ERR_BIT != 0 => {
                return Err(Error::Handshake(option_error("NBD_OPT_GO", r, &payload)))
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected reply {other} to NBD_OPT_GO"
                )))
            }
        }
    }
    let (size, flags) = export.ok_or_else(|| {
        Error::Protocol("the server accepted NBD_OPT_GO without NBD_INFO_EXPORT".into())
    })?;
    let (min_block, preferred_block, max_payload) = block.unwrap_or((1, 4096, 32 << 20));
    Ok(Negotiated {
        size,
        flags,
        min_block,
        preferred_block,
        max_payload: max_payload.min(32 << 20).max(min_block),
        structured,
        base_allocation,
        dirty_bitmap,
    })
}

fn export_name_fallback<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<Negotiated> {
    s.write_all(&proto::encode_option(opt::EXPORT_NAME, export.as_bytes()))
        .map_err(io_err)?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).map_err(io_err)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).map_err(io_err)?;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&b[..8]);
    Ok(Negotiated {
        size: u64::from_be_bytes(size),
        flags: u16::from_be_bytes([b[8], b[9]]),
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
        structured,
        base_allocation: None,
        dirty_bitmap: None,
    })
}
