//! The fake monitor's NBD server fed arbitrary client bytes, raw or after a valid negotiation
//! (structured replies, both metadata contexts, `NBD_OPT_GO`): no panic, no hang, replies
//! bounded by the requests, and the monitor's model intact afterwards.
#![no_main]

use std::io::{Cursor, Read, Write};

use disk_transport::memory::MemoryDisk;
use disk_transport::Disk;
use libfuzzer_sys::fuzz_target;
use qmp_proto::fake::{FakeMonitor, ImageFormat};

const SETUP: &[u8] = br#"{"execute": "qmp_capabilities"}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "vda", "file": {"driver": "file", "filename": "/vda.qcow2"}}}
{"execute": "block-dirty-bitmap-add", "arguments": {"node": "vda", "name": "b", "disabled": true}}
{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/unused"}}}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "vda", "name": "vda", "bitmaps": ["b"], "writable": true}}
"#;

struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
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

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn handshake() -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend(option(8, &[]));
    let mut meta = 3u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"vda");
    meta.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "qemu:dirty-bitmap:b"] {
        meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
        meta.extend_from_slice(q.as_bytes());
    }
    v.extend(option(10, &meta));
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"vda");
    go.extend_from_slice(&0u16.to_be_bytes());
    v.extend(option(7, &go));
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let disk = MemoryDisk::new(1 << 20);
    disk.write_at(&[0xab; 4096], 65536).unwrap();
    let fake = FakeMonitor::builder()
        .image("/vda.qcow2", ImageFormat::Qcow2, disk)
        .build();
    fake.serve_blocking(Pipe {
        input: Cursor::new(SETUP.to_vec()),
        output: Vec::new(),
    });
    assert_eq!(fake.state().exports().len(), 1, "the set-up exported vda");
    let mut input = if control & 1 == 1 { handshake() } else { Vec::new() };
    input.extend_from_slice(rest);
    let requests = input.len() / 28 + 1;
    let mut pipe = Pipe {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    fake.serve_nbd_connection(&mut pipe);
    assert!(pipe.output.len() <= 4096 + requests * ((1 << 20) + 64));
    fake.state().check_invariants().expect("invariants");
});
