//! A scripted NBD server for the client's own unit tests: it answers out of order and splits
//! read replies into data and hole chunks in shuffled order — behaviour the spec allows but
//! qemu-nbd and nbdkit rarely show — so reassembly and cookie matching are exercised over a
//! real socket with real threads. With [`Config::extended`] it speaks extended headers, may
//! advertise an export larger than the bytes it holds (the rest reads as a hole), and logs
//! every request it gets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::proto::{self, cflag, chunk, cmd, info, opt, rep, tflag};

/// Tiny deterministic generator (xorshift) so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A request as the server saw it: command, flags, offset, length.
pub(crate) type Logged = (u16, u16, u64, u64);

/// How the server behaves beyond the defaults.
#[derive(Default, Clone)]
pub(crate) struct Config {
    /// Accept `NBD_OPT_EXTENDED_HEADERS`.
    pub extended: bool,
    /// Advertised size, when larger than the data (the rest is a hole).
    pub size: Option<u64>,
    /// More transmission flags (FUA, FAST_ZERO, ...).
    pub flags: u16,
    /// Answer `FAST_ZERO` requests with `ENOTSUP`.
    pub slow_zero: bool,
    /// Where to log requests.
    pub log: Option<Arc<Mutex<Vec<Logged>>>>,
    /// Advertised minimum block size (default 1).
    pub min_block: Option<u32>,
    /// Split every block status descriptor at an unaligned point (as nbdkit does at an
    /// unaligned end of image).
    pub unaligned_extents: bool,
    /// Answer only this many requests, then read the rest and answer nothing.
    pub mute_after: Option<usize>,
}

fn send_option_reply(s: &mut UnixStream, option: u32, reply: u32, payload: &[u8]) {
    let mut v = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v).unwrap();
}

struct Request {
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    payload: Vec<u8>,
}

/// Chunk headers in the negotiated style.
struct Replies {
    extended: bool,
}

impl Replies {
    fn header(&self, flags: u16, kind: u16, r: &Request, length: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        if self.extended {
            v.extend_from_slice(&proto::EXTENDED_REPLY_MAGIC.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&r.cookie.to_be_bytes());
            v.extend_from_slice(&r.offset.to_be_bytes());
            v.extend_from_slice(&(length as u64).to_be_bytes());
        } else {
            v.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&r.cookie.to_be_bytes());
            v.extend_from_slice(&(length as u32).to_be_bytes());
        }
        v
    }
}

/// Serves `disk` on `s` until the client disconnects.
pub(crate) fn serve(s: UnixStream, disk: Vec<u8>, seed: u64) {
    serve_with(s, disk, seed, Config::default());
}

/// Serves `disk` as `config` says until the client disconnects.
pub(crate) fn serve_with(mut s: UnixStream, mut disk: Vec<u8>, seed: u64, config: Config) {
    let mut rng = Rng(seed | 1);
    let size = config.size.unwrap_or(disk.len() as u64);
    let mut greeting = proto::NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&greeting).unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).unwrap();
    let mut extended = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        match option {
            opt::EXTENDED_HEADERS if config.extended => {
                extended = true;
                send_option_reply(&mut s, option, rep::ACK, &[])
            }
            opt::STRUCTURED_REPLY => send_option_reply(&mut s, option, rep::ACK, &[]),
            opt::SET_META_CONTEXT => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                send_option_reply(&mut s, option, rep::META_CONTEXT, &ctx);
                send_option_reply(&mut s, option, rep::ACK, &[]);
            }
            opt::GO => {
                let mut export = info::EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                let tf = tflag::HAS_FLAGS
                    | tflag::SEND_FLUSH
                    | tflag::SEND_TRIM
                    | tflag::SEND_WRITE_ZEROES
                    | config.flags;
                export.extend_from_slice(&tf.to_be_bytes());
                send_option_reply(&mut s, option, rep::INFO, &export);
                let mut block = info::BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [config.min_block.unwrap_or(1), 4096, 1 << 20] {
                    block.extend_from_slice(&v.to_be_bytes());
                }
                send_option_reply(&mut s, option, rep::INFO, &block);
                send_option_reply(&mut s, option, rep::ACK, &[]);
                break;
            }
            _ => send_option_reply(&mut s, option, rep::ERR_UNSUP, &[]),
        }
    }
    let replies = Replies { extended };
    let header_len = if extended { 32 } else { 28 };
    // Transmission: gather what the client sent within a millisecond, answer it shuffled.
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut queue: Vec<Request> = Vec::new();
    let mut answered_left = config.mute_after;
    loop {
        let mut h = [0u8; 32];
        let got = read_full(&mut s, &mut h[..header_len]);
        match got {
            Some(true) => {
                let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let want = if extended {
                    proto::EXTENDED_REQUEST_MAGIC
                } else {
                    proto::REQUEST_MAGIC
                };
                assert_eq!(magic, want, "request magic");
                let flags = u16::from_be_bytes([h[4], h[5]]);
                let command = u16::from_be_bytes([h[6], h[7]]);
                if command == cmd::DISC {
                    return;
                }
                let length = if extended {
                    u64::from_be_bytes(h[24..32].try_into().unwrap())
                } else {
                    u64::from(u32::from_be_bytes(h[24..28].try_into().unwrap()))
                };
                let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
                if let Some(log) = &config.log {
                    log.lock().unwrap().push((command, flags, offset, length));
                }
                let mut payload = Vec::new();
                if command == cmd::WRITE {
                    assert_eq!(
                        extended,
                        flags & cflag::PAYLOAD_LEN != 0,
                        "PAYLOAD_LEN on writes exactly with extended headers"
                    );
                    payload = vec![0u8; length as usize];
                    s.set_read_timeout(None).unwrap();
                    s.read_exact(&mut payload).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                }
                queue.push(Request {
                    command,
                    flags,
                    cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
                    offset,
                    length,
                    payload,
                });
                if queue.len() < 16 {
                    continue;
                }
            }
            Some(false) => {}
            None => return,
        }
        while !queue.is_empty() {
            if let Some(left) = &mut answered_left {
                if *left == 0 {
                    queue.clear();
                    break;
                }
                *left -= 1;
            }
            let i = rng.below(queue.len() as u64) as usize;
            let r = queue.swap_remove(i);
            if answer(&mut s, &mut disk, &mut rng, &replies, &config, r).is_err() {
                return;
            }
        }
    }
}

/// Reads exactly `buf`; `Some(false)` if nothing arrived in time, `None` at EOF.
fn read_full(s: &mut UnixStream, buf: &mut [u8]) -> Option<bool> {
    let mut pos = 0;
    while pos < buf.len() {
        match s.read(&mut buf[pos..]) {
            Ok(0) => return None,
            Ok(n) => pos += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if pos == 0 {
                    return Some(false);
                }
            }
            Err(_) => return None,
        }
    }
    Some(true)
}

fn answer(
    s: &mut UnixStream,
    disk: &mut [u8],
    rng: &mut Rng,
    replies: &Replies,
    config: &Config,
    r: Request,
) -> std::io::Result<()> {
    let start = r.offset as usize;
    let end = (r.offset + r.length) as usize;
    // The part of the request the data covers (the rest of a larger export is a hole).
    let (held_start, held_end) = (start.min(disk.len()), end.min(disk.len()));
    match r.command {
        cmd::READ => {
            // Split at up to two random points; all-zero pieces become holes.
            let mut cuts = vec![start, end];
            for _ in 0..rng.below(3) {
                cuts.push(start + rng.below(r.length) as usize);
            }
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            for i in (1..pieces.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                pieces.swap(i, j);
            }
            let n = pieces.len();
            for (k, (a, b)) in pieces.into_iter().enumerate() {
                let done = if k + 1 == n { chunk::FLAG_DONE } else { 0 };
                if disk[a..b].iter().all(|&x| x == 0) {
                    let mut v = replies.header(done, chunk::OFFSET_HOLE, &r, 12);
                    v.extend_from_slice(&(a as u64).to_be_bytes());
                    v.extend_from_slice(&((b - a) as u32).to_be_bytes());
                    s.write_all(&v)?;
                } else {
                    let mut v = replies.header(done, chunk::OFFSET_DATA, &r, 8 + b - a);
                    v.extend_from_slice(&(a as u64).to_be_bytes());
                    v.extend_from_slice(&disk[a..b]);
                    s.write_all(&v)?;
                }
            }
            if n == 0 {
                s.write_all(&replies.header(chunk::FLAG_DONE, chunk::NONE, &r, 0))?;
            }
        }
        cmd::BLOCK_STATUS => {
            // One descriptor per 64 KiB granule (the last may run past the request), and one
            // for everything beyond the data.
            let mut descriptors: Vec<(u64, u32)> = Vec::new();
            let mut pos = start;
            while pos < end && pos < disk.len() && descriptors.len() < 64 {
                let g_end = ((pos / 65536 + 1) * 65536).min(disk.len());
                let flags: u32 = if disk[pos..g_end].iter().all(|&x| x == 0) {
                    3
                } else {
                    0
                };
                let len = (g_end - pos) as u64;
                if config.unaligned_extents && len > 300 {
                    descriptors.push((len - 300, flags));
                    descriptors.push((300, flags));
                } else {
                    descriptors.push((len, flags));
                }
                pos = g_end;
            }
            if pos >= disk.len() && pos < end && descriptors.len() < 64 {
                descriptors.push(((end - pos) as u64, 3));
            }
            let (kind, payload) = if replies.extended {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                for (len, flags) in &descriptors {
                    p.extend_from_slice(&len.to_be_bytes());
                    p.extend_from_slice(&u64::from(*flags).to_be_bytes());
                }
                (chunk::BLOCK_STATUS_EXT, p)
            } else {
                let mut p = 1u32.to_be_bytes().to_vec();
                for (len, flags) in &descriptors {
                    p.extend_from_slice(&(*len as u32).to_be_bytes());
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                (chunk::BLOCK_STATUS, p)
            };
            let mut v = replies.header(chunk::FLAG_DONE, kind, &r, payload.len());
            v.extend_from_slice(&payload);
            s.write_all(&v)?;
        }
        cmd::WRITE_ZEROES if r.flags & cflag::FAST_ZERO != 0 && config.slow_zero => {
            let mut p = 95u32.to_be_bytes().to_vec();
            p.extend_from_slice(&0u16.to_be_bytes());
            let mut v = replies.header(chunk::FLAG_DONE, chunk::ERROR, &r, p.len());
            v.extend_from_slice(&p);
            s.write_all(&v)?;
        }
        other => {
            match other {
                cmd::WRITE => disk[start..end].copy_from_slice(&r.payload),
                cmd::WRITE_ZEROES | cmd::TRIM => disk[held_start..held_end].fill(0),
                _ => {}
            }
            // Alternate simple and structured replies where both are valid.
            if !replies.extended && rng.below(2) == 0 {
                let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                v.extend_from_slice(&0u32.to_be_bytes());
                v.extend_from_slice(&r.cookie.to_be_bytes());
                s.write_all(&v)?;
            } else {
                s.write_all(&replies.header(chunk::FLAG_DONE, chunk::NONE, &r, 0))?;
            }
        }
    }
    Ok(())
}
