//! Blocking byte channels whose reads and writes are bounded in time.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A blocking channel whose reads and writes can be bounded in time.
///
/// [`crate::Client`] needs this on top of `Read + Write` so that no call can block forever.
/// Implemented for Unix and TCP sockets and boxes of either.
pub trait Transport: Read + Write + Send {
    /// Bounds every following read; `None` blocks without limit.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds every following write; `None` blocks without limit.
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Makes the following reads return `WouldBlock` at once when nothing has arrived (`true`),
    /// or wait again within the read timeout (`false`). Lets [`crate::Client`] take the events
    /// that have already arrived without waiting (`next_event` with a zero timeout): a socket's
    /// shortest read timeout is a scheduler tick (4 ms at 250 Hz), not the 1 ms asked for.
    /// Transports that cannot return `Unsupported` (the default); the client then waits the
    /// shortest timeout instead.
    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        let _ = nonblocking;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this transport has no non-blocking reads",
        ))
    }
}

impl Transport for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout.map(non_zero))
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout.map(non_zero))
    }
    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, nonblocking)
    }
}

impl Transport for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout.map(non_zero))
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout.map(non_zero))
    }
    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        TcpStream::set_nonblocking(self, nonblocking)
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        (**self).set_nonblocking(nonblocking)
    }
}

/// A borrowed transport is one too (the client borrows its own stream while it reads).
impl<T: Transport + ?Sized> Transport for &mut T {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        (**self).set_nonblocking(nonblocking)
    }
}

/// Sockets reject a zero timeout; the smallest real one has the same effect.
fn non_zero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Connects to `host:port`, trying each resolved address until `deadline`.
pub(crate) fn tcp_connect(addr: &str, limit: Duration) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to no address"),
    );
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, non_zero(limit)) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
