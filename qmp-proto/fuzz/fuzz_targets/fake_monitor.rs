//! The fake monitor fed arbitrary client bytes, after a set-up that gives it block nodes,
//! bitmaps, a job and an export to work on: no panic, no hang, every line it sends is one JSON
//! object ending in CRLF, at most a few lines per input byte, and the model's invariants hold
//! afterwards.
#![no_main]

use std::io::{Cursor, Read, Write};

use disk_transport::memory::MemoryDisk;
use libfuzzer_sys::fuzz_target;
use qmp_proto::fake::{FakeMonitor, ImageFormat, QemuRelease};

const SETUP: &[u8] = br#"{"execute": "qmp_capabilities"}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": "/a.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "f0", "backing": "q0", "file": {"driver": "file", "filename": "/f.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}}
{"execute": "block-dirty-bitmap-add", "arguments": {"node": "q0", "name": "b0"}}
{"execute": "human-monitor-command", "arguments": {"command-line": "qemu-io q0 \"write -P 0x5a 4096 70000\""}}
{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/nbd"}}}}
"#;

/// A stream that reads the fuzzer's bytes and keeps what the fake writes.
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Small reads: the fake sees the input in many chunks.
        let n = buf.len().min(7);
        self.input.read(&mut buf[..n])
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let release = QemuRelease::ALL[usize::from(control) % QemuRelease::ALL.len()];
    let fake = FakeMonitor::builder()
        .release(release)
        .image("/a.qcow2", ImageFormat::Qcow2, MemoryDisk::new(4 << 20))
        .image("/f.qcow2", ImageFormat::Qcow2, MemoryDisk::new(4 << 20))
        .build();
    let mut input = if control & 0x80 == 0 { SETUP.to_vec() } else { Vec::new() };
    input.extend_from_slice(rest);
    let limit = input.len();
    let mut pipe = Pipe {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    fake.serve_blocking(&mut pipe);
    let lines: Vec<&[u8]> = pipe.output.split_inclusive(|&b| b == b'\n').collect();
    assert!(lines.len() <= 2 * limit + 64, "{} lines for {limit} bytes", lines.len());
    for line in lines {
        assert!(line.ends_with(b"\r\n"), "unterminated line {line:?}");
        let value: serde_json::Value = serde_json::from_slice(line).expect("a JSON line");
        assert!(value.is_object());
    }
    fake.state().check_invariants().expect("invariants");
});
