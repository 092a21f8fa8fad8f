//! The blocking client against an agent that answers with arbitrary bytes:
//! every call ends (with a value or an error), never a panic or a hang.
#![no_main]

use std::io::{self, Read, Write};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qga_proto::{Client, ClientConfig, Transport};

/// A channel whose agent side replays fixed bytes, then times out.
struct Replay {
    input: io::Cursor<Vec<u8>>,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.read(buf)? {
            0 => Err(io::Error::new(io::ErrorKind::TimedOut, "no more agent bytes")),
            n => Ok(n),
        }
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Replay {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let config = ClientConfig::default().check_capabilities(data.first().is_some_and(|b| b & 1 == 1)).sync_attempts(1);
    let mut client = Client::with_config(Replay { input: io::Cursor::new(data.to_vec()) }, config);
    for name in ["guest-info", "guest-get-osinfo", "guest-exec-status", "guest-shutdown"] {
        let _ = client.execute_raw(name, None);
    }
});
