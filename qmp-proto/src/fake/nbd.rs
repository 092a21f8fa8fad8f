//! The fake's NBD server (with [`super::FakeMonitorBuilder::serve_nbd`]): what
//! `nbd-server-start` listens on, serving the exports of `block-export-add` the way QEMU's
//! server does for a backup client — fixed newstyle negotiation, `NBD_OPT_GO`/`INFO`/`LIST`,
//! structured replies, the `base:allocation` and `qemu:dirty-bitmap:NAME` metadata contexts,
//! reads, block status, and writes to writable exports. No TLS, no extended headers.
//!
//! Unix sockets only, at the path the client names (TCP is refused: the fake never listens on
//! the network).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use disk_transport::{Disk, ExtentKind};

use super::export::ExportDisk;
use super::FakeShared;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_BLOCK_STATUS: u16 = 7;
const CFLAG_REQ_ONE: u16 = 1 << 3;

const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_ERROR: u16 = 32769;
const REPLY_FLAG_DONE: u16 = 1;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// The largest option payload and request the server accepts (QEMU's limit is 32 MiB).
const MAX_REQUEST: u32 = 32 << 20;
/// How long a client may take to send the rest of a message it started.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection: bytes both ways, and a hint when the server waits for the next
/// request (where an idle client may take as long as it likes) or inside a message (where a
/// stalled client is cut off after [`IO_TIMEOUT`]).
pub(crate) trait NbdStream: Read + Write {
    /// Called with `true` before waiting for a request, `false` once one started.
    fn idle(&mut self, idle: bool) -> io::Result<()>;
}

impl NbdStream for UnixStream {
    fn idle(&mut self, idle: bool) -> io::Result<()> {
        self.set_read_timeout(if idle { None } else { Some(IO_TIMEOUT) })
    }
}

/// Any stream, without timeouts (the caller bounds it).
pub(crate) struct Untimed<S>(pub S);

impl<S: Read> Read for Untimed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Untimed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<S: Read + Write> NbdStream for Untimed<S> {
    fn idle(&mut self, _idle: bool) -> io::Result<()> {
        Ok(())
    }
}

/// A listening NBD server; dropping the last handle stops it and removes its socket.
#[derive(Debug)]
pub(crate) struct NbdListener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NbdListener {
    /// Listens at `path`, serving connections against the fake behind `shared`.
    pub(crate) fn start(path: PathBuf, shared: FakeShared) -> io::Result<Arc<NbdListener>> {
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qmp-fake-nbd".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("qmp-fake-nbd-conn".into())
                        .spawn(move || {
                            if stream.set_write_timeout(Some(IO_TIMEOUT)).is_ok() {
                                let _ = serve(&mut stream, &shared);
                            }
                        });
                }
            })?;
        Ok(Arc::new(NbdListener {
            path,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn option_reply(s: &mut impl Write, option: u32, reply: u32, payload: &[u8]) -> io::Result<()> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v)
}

/// Reads a `u32`-length-prefixed string from `data` at `*pos`.
fn take_string(data: &[u8], pos: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?) as usize;
    *pos += 4;
    let text = data.get(*pos..pos.checked_add(len)?)?;
    *pos += len;
    String::from_utf8(text.to_vec()).ok()
}

/// The metadata contexts a client may select on an export: `(id, name, bitmap)`.
fn contexts_for(
    shared: &FakeShared,
    export: &str,
    queries: &[String],
) -> Vec<(u32, String, Option<String>)> {
    let state = shared.lock();
    let Some(e) = state.exports().iter().find(|e| e.name == export) else {
        return Vec::new();
    };
    let mut all = vec![(1u32, "base:allocation".to_owned(), None)];
    for (i, (_, b)) in e.bitmaps.iter().enumerate() {
        all.push((
            2 + i as u32,
            format!("qemu:dirty-bitmap:{b}"),
            Some(b.clone()),
        ));
    }
    if queries.is_empty() {
        return all;
    }
    all.into_iter()
        .filter(|(_, name, _)| {
            queries.iter().any(|q| {
                q == name
                    || (q == "base:" && name.starts_with("base:"))
                    || (q == "qemu:" && name.starts_with("qemu:"))
                    || (q == "qemu:dirty-bitmap:" && name.starts_with("qemu:dirty-bitmap:"))
            })
        })
        .collect()
}

/// One client connection: negotiation, then transmission until `NBD_CMD_DISC` or EOF.
pub(crate) fn serve<S: NbdStream>(s: &mut S, shared: &FakeShared) -> io::Result<()> {
    let s = &mut *s;
    s.idle(false)?;
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let mut structured = false;
    let mut selected: Vec<(u32, String, Option<String>)> = Vec::new();
    let export = loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        if u64::from_be_bytes(h[0..8].try_into().expect("8 bytes")) != IHAVEOPT {
            return Ok(());
        }
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        if len > MAX_REQUEST {
            option_reply(s, option, REP_ERR_TOO_BIG, &[])?;
            return Ok(());
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_ABORT => {
                option_reply(s, option, REP_ACK, &[])?;
                return Ok(());
            }
            OPT_LIST => {
                let names: Vec<String> = shared
                    .lock()
                    .exports()
                    .iter()
                    .map(|e| e.name.clone())
                    .collect();
                for name in names {
                    let mut p = (name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    option_reply(s, option, REP_SERVER, &p)?;
                }
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let mut pos = 0;
                let parsed = (|| {
                    let name = take_string(&data, &mut pos)?;
                    let n = u32::from_be_bytes(data.get(pos..pos + 4)?.try_into().ok()?);
                    pos += 4;
                    let mut queries = Vec::new();
                    for _ in 0..n.min(1024) {
                        queries.push(take_string(&data, &mut pos)?);
                    }
                    Some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    option_reply(
                        s,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )?;
                    continue;
                };
                if option == OPT_SET_META_CONTEXT && !structured {
                    option_reply(s, option, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                if option == OPT_SET_META_CONTEXT && queries.is_empty() {
                    selected.clear();
                    option_reply(s, option, REP_ACK, &[])?;
                    continue;
                }
                let found = contexts_for(shared, &name, &queries);
                for (id, ctx, _) in &found {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(ctx.as_bytes());
                    option_reply(s, option, REP_META_CONTEXT, &p)?;
                }
                if option == OPT_SET_META_CONTEXT {
                    selected = found;
                }
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let mut pos = 0;
                let Some(name) = take_string(&data, &mut pos) else {
                    option_reply(s, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let found = shared
                    .lock()
                    .exports()
                    .iter()
                    .find(|e| e.name == name)
                    .map(|e| e.writable);
                let Some(writable) = found else {
                    let msg = format!("Export '{name}' not present");
                    option_reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let disk = ExportDisk::open(shared.clone(), &name, None)
                    .map_err(|e| io::Error::other(e.0))?;
                let size = disk.info().map_err(io::Error::other)?.capacity;
                let mut p = 0u16.to_be_bytes().to_vec(); // NBD_INFO_EXPORT
                p.extend_from_slice(&size.to_be_bytes());
                let mut tflags: u16 = 1 | (1 << 2) | (1 << 8); // HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN
                if !writable {
                    tflags |= 1 << 1; // READ_ONLY
                }
                p.extend_from_slice(&tflags.to_be_bytes());
                option_reply(s, option, REP_INFO, &p)?;
                let mut b = 3u16.to_be_bytes().to_vec(); // NBD_INFO_BLOCK_SIZE
                for v in [1u32, 4096, MAX_REQUEST] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(s, option, REP_INFO, &b)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    break name;
                }
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    };
    transmission(s, shared, &export, structured, &selected)
}

fn transmission<S: NbdStream>(
    s: &mut S,
    shared: &FakeShared,
    export: &str,
    structured: bool,
    contexts: &[(u32, String, Option<String>)],
) -> io::Result<()> {
    let plain =
        ExportDisk::open(shared.clone(), export, None).map_err(|e| io::Error::other(e.0))?;
    loop {
        // Idle clients may wait as long as they like between requests.
        s.idle(true)?;
        let mut h = [0u8; 28];
        if s.read_exact(&mut h).is_err() {
            return Ok(());
        }
        s.idle(false)?;
        if u32::from_be_bytes(h[0..4].try_into().expect("4 bytes")) != REQUEST_MAGIC {
            return Ok(());
        }
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let command = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
        let reply = Reply { structured, cookie };
        match command {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if length > MAX_REQUEST {
                    reply.error(s, EINVAL)?;
                    continue;
                }
                let mut buf = vec![0u8; length as usize];
                match plain.read_at(&mut buf, offset) {
                    Ok(()) => reply.data(s, offset, &buf)?,
                    Err(e) => reply.error(s, errno_of(&e))?,
                }
            }
            CMD_WRITE => {
                if length > MAX_REQUEST {
                    return Ok(()); // cannot skip the payload safely
                }
                let mut buf = vec![0u8; length as usize];
                s.read_exact(&mut buf)?;
                let writable = shared
                    .lock()
                    .exports()
                    .iter()
                    .find(|e| e.name == export)
                    .map(|e| (e.writable, e.node.clone()));
                match writable {
                    Some((true, node)) => match shared.lock().guest_write(&node, &buf, offset) {
                        Ok(()) => reply.ok(s)?,
                        Err(_) => reply.error(s, EINVAL)?,
                    },
                    Some((false, _)) => reply.error(s, EPERM)?,
                    None => reply.error(s, EIO)?,
                }
            }
            CMD_FLUSH => reply.ok(s)?,
            CMD_BLOCK_STATUS if structured && !contexts.is_empty() => {
                let mut chunks = Vec::new();
                for (id, _, bitmap) in contexts {
                    let descriptors = match bitmap {
                        None => plain.allocated_extents(offset, u64::from(length)).map(|v| {
                            v.into_iter()
                                .map(|e| {
                                    let f = if e.kind == ExtentKind::Data { 0 } else { 3 };
                                    (e.length, f)
                                })
                                .collect::<Vec<_>>()
                        }),
                        Some(b) => ExportDisk::open(shared.clone(), export, Some(b))
                            .map_err(|e| disk_transport::Error::NotFound(e.0))
                            .and_then(|d| d.dirty_extents(offset, u64::from(length)))
                            .map(|v| {
                                v.into_iter()
                                    .map(|e| (e.length, u32::from(e.dirty)))
                                    .collect()
                            }),
                    };
                    match descriptors {
                        Ok(mut d) => {
                            if flags & CFLAG_REQ_ONE != 0 {
                                d.truncate(1);
                            }
                            chunks.push((*id, d));
                        }
                        Err(e) => {
                            chunks.clear();
                            reply.error(s, errno_of(&e))?;
                            break;
                        }
                    }
                }
                let last = chunks.len();
                for (i, (id, d)) in chunks.into_iter().enumerate() {
                    let mut p = id.to_be_bytes().to_vec();
                    for (len, f) in d {
                        p.extend_from_slice(&(len as u32).to_be_bytes());
                        p.extend_from_slice(&f.to_be_bytes());
                    }
                    let done = if i + 1 == last { REPLY_FLAG_DONE } else { 0 };
                    reply.chunk(s, done, CHUNK_BLOCK_STATUS, &p)?;
                }
            }
            _ => {
                if command == CMD_WRITE || length > MAX_REQUEST {
                    return Ok(());
                }
                reply.error(s, EINVAL)?;
            }
        }
    }
}

fn errno_of(e: &disk_transport::Error) -> u32 {
    match e {
        disk_transport::Error::OutOfRange { .. } => EINVAL,
        disk_transport::Error::ReadOnly(_) => EPERM,
        _ => EIO,
    }
}

/// Replies to one request, simple or structured as negotiated.
struct Reply {
    structured: bool,
    cookie: u64,
}

impl Reply {
    fn simple(&self, s: &mut impl Write, error: u32, data: &[u8]) -> io::Result<()> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(data);
        s.write_all(&v)
    }

    fn chunk(&self, s: &mut impl Write, flags: u16, kind: u16, payload: &[u8]) -> io::Result<()> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        s.write_all(&v)
    }

    fn ok(&self, s: &mut impl Write) -> io::Result<()> {
        if self.structured {
            self.chunk(s, REPLY_FLAG_DONE, 0, &[])
        } else {
            self.simple(s, 0, &[])
        }
    }

    fn data(&self, s: &mut impl Write, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.structured {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend_from_slice(data);
            self.chunk(s, REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, &p)
        } else {
            self.simple(s, 0, data)
        }
    }

    fn error(&self, s: &mut impl Write, errno: u32) -> io::Result<()> {
        if self.structured {
            let mut p = errno.to_be_bytes().to_vec();
            p.extend_from_slice(&0u16.to_be_bytes());
            self.chunk(s, REPLY_FLAG_DONE, CHUNK_ERROR, &p)
        } else {
            self.simple(s, errno, &[])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::fake::{FakeMonitor, ImageFormat};
    use crate::Monitor;
    use disk_transport::memory::MemoryDisk;

    /// Reads the client's bytes, keeps the server's.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn exporting_fake() -> FakeMonitor {
        let disk = MemoryDisk::new(1 << 20);
        disk.write_at(&[0xab; 4096], 65536).unwrap();
        let fake = FakeMonitor::builder()
            .image("/vda.qcow2", ImageFormat::Qcow2, disk)
            .build();
        let mut qemu = fake.connect().unwrap();
        for (c, a) in [
            (
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "vda",
                "file": {"driver": "file", "filename": "/vda.qcow2"}}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "vda", "name": "b", "disabled": true}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": "/unused"}}}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "vda",
                "name": "vda", "bitmaps": ["b"]}),
            ),
        ] {
            qemu.execute_raw(c, Some(a)).unwrap();
        }
        fake
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Client flags, structured replies, both contexts, GO on `vda`.
    fn handshake() -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut meta = 3u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"vda");
        meta.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:b"] {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        v.extend(option(OPT_SET_META_CONTEXT, &meta));
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vda");
        go.extend_from_slice(&0u16.to_be_bytes());
        v.extend(option(OPT_GO, &go));
        v
    }

    fn request(command: u16, offset: u64, length: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn reads_and_block_status_after_go() {
        let fake = exporting_fake();
        let mut input = handshake();
        input.extend(request(CMD_READ, 65536, 8));
        input.extend(request(CMD_BLOCK_STATUS, 0, 1 << 20));
        input.extend(request(CMD_WRITE, 0, 2));
        input.extend_from_slice(b"xx");
        input.extend(request(CMD_READ, 1 << 20, 1));
        input.extend(request(CMD_DISC, 0, 0));
        let mut pipe = Untimed(Pipe {
            input: Cursor::new(input),
            output: Vec::new(),
        });
        serve(&mut pipe, &fake.shared()).unwrap();
        let out = pipe.0.output;
        // The read's data chunk: offset then eight 0xab bytes, flagged done.
        let data_chunk = [
            &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..],
            &REPLY_FLAG_DONE.to_be_bytes(),
            &CHUNK_OFFSET_DATA.to_be_bytes(),
            &7u64.to_be_bytes(),
            &16u32.to_be_bytes(),
            &65536u64.to_be_bytes(),
            &[0xab; 8],
        ]
        .concat();
        assert!(out.windows(data_chunk.len()).any(|w| w == data_chunk));
        // base:allocation: hole, data (the written cluster), hole.
        let mut alloc = 1u32.to_be_bytes().to_vec();
        for (len, flags) in [(65536u32, 3u32), (65536, 0), (917504, 3)] {
            alloc.extend_from_slice(&len.to_be_bytes());
            alloc.extend_from_slice(&flags.to_be_bytes());
        }
        assert!(out.windows(alloc.len()).any(|w| w == alloc));
        // The write to a read-only export and the read past the end fail with EPERM, EINVAL.
        for errno in [EPERM, EINVAL] {
            let mut err = CHUNK_ERROR.to_be_bytes().to_vec();
            err.extend_from_slice(&7u64.to_be_bytes());
            err.extend_from_slice(&6u32.to_be_bytes());
            err.extend_from_slice(&errno.to_be_bytes());
            assert!(out.windows(err.len()).any(|w| w == err), "errno {errno}");
        }
    }

    #[test]
    fn unknown_export_is_refused() {
        let fake = exporting_fake();
        let mut input = 3u32.to_be_bytes().to_vec();
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nope");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(option(OPT_GO, &go));
        let mut pipe = Untimed(Pipe {
            input: Cursor::new(input),
            output: Vec::new(),
        });
        assert!(
            serve(&mut pipe, &fake.shared()).is_err(),
            "EOF after the refusal"
        );
        let out = pipe.0.output;
        assert!(out.windows(4).any(|w| w == REP_ERR_UNKNOWN.to_be_bytes()));
    }

    proptest! {
        /// Any client bytes, raw or after a valid negotiation: the server never panics, ends
        /// when the input ends, and writes at most a bounded reply per request.
        #[test]
        fn any_client_bytes_end_cleanly(negotiate in any::<bool>(),
                                        data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let fake = exporting_fake();
            let mut input = if negotiate { handshake() } else { Vec::new() };
            input.extend_from_slice(&data);
            let len = input.len();
            let mut pipe = Untimed(Pipe { input: Cursor::new(input), output: Vec::new() });
            let _ = serve(&mut pipe, &fake.shared());
            // Reads are capped by the export (1 MiB) per 28-byte request.
            prop_assert!(pipe.0.output.len() <= 4096 + (len / 28 + 1) * ((1 << 20) + 64));
        }
    }
}
