//! The fake agent's request parser and dispatcher on arbitrary bytes: no panic.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use qga_proto::fake::FakeAgent;

struct Pipe {
    input: io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Small reads exercise the streaming request splitter.
        let n = buf.len().min(7);
        self.input.read(&mut buf[..n])
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

fuzz_target!(|data: &[u8]| {
    let mut pipe = Pipe { input: io::Cursor::new(data.to_vec()), output: Vec::new() };
    FakeAgent::linux().serve_blocking(&mut pipe);
    for line in pipe.output.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_prefix(&[0xFF]).unwrap_or(line);
        assert!(serde_json::from_slice::<serde_json::Value>(line).is_ok(), "fake wrote invalid JSON");
    }
});
