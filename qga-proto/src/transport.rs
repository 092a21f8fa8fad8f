//! Blocking byte channels with timeouts, and the character device channel.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A blocking channel whose reads and writes can be bounded in time.
///
/// [`crate::Client`] needs this on top of `Read + Write` so that no call can
/// block forever. Implemented for Unix and TCP sockets and [`CharDevice`].
pub trait Transport: Read + Write + Send {
    /// Bounds every following read; `None` blocks without limit.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds every following write; `None` blocks without limit.
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout.map(non_zero))
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout.map(non_zero))
    }
}

impl Transport for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout.map(non_zero))
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout.map(non_zero))
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
}

/// Sockets reject a zero timeout; the smallest real one has the same effect.
fn non_zero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// A character device channel (virtio-serial port, serial line) opened
/// non-blocking, so reads and writes honour timeouts without threads.
///
/// Waiting polls with a short back-off (1 to 20 ms): the agent protocol is
/// request/response with small messages, and this keeps the crate free of
/// `unsafe` `poll(2)` calls.
#[derive(Debug)]
pub struct CharDevice {
    file: File,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl CharDevice {
    /// Opens `path` read-write and non-blocking.
    pub fn open(path: impl AsRef<Path>) -> io::Result<CharDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        Ok(CharDevice {
            file,
            read_timeout: None,
            write_timeout: None,
        })
    }

    /// The underlying file (non-blocking).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Consumes the channel, returning the non-blocking file.
    pub fn into_file(self) -> File {
        self.file
    }
}

fn retry_until<T>(
    timeout: Option<Duration>,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(1);
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(limit) = timeout {
                    let elapsed = start.elapsed();
                    if elapsed >= limit {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "character device timed out",
                        ));
                    }
                    backoff = backoff.min(limit - elapsed);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

impl Read for CharDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let file = &mut self.file;
        retry_until(self.read_timeout, || file.read(buf))
    }
}

impl Write for CharDevice {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = &mut self.file;
        retry_until(self.write_timeout, || file.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Transport for CharDevice {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.read_timeout = timeout;
        Ok(())
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.write_timeout = timeout;
        Ok(())
    }
}

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use self::async_chardev::AsyncCharDevice;

#[cfg(feature = "tokio")]
mod async_chardev {
    use std::io;
    use std::path::Path;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::unix::pipe;

    /// A character device channel for the async client, driven by tokio's reactor.
    ///
    /// The device is opened once; a duplicate descriptor of it serves the
    /// write direction, as tokio registers each direction separately.
    #[derive(Debug)]
    pub struct AsyncCharDevice {
        rx: pipe::Receiver,
        tx: pipe::Sender,
    }

    impl AsyncCharDevice {
        /// Opens `path` read-write and non-blocking; needs a tokio runtime.
        pub fn open(path: impl AsRef<Path>) -> io::Result<AsyncCharDevice> {
            let file = super::CharDevice::open(path)?.into_file();
            let writer = file.try_clone()?;
            // "unchecked" only skips the FIFO file-type check: a character
            // device is not a FIFO but is polled the same way.
            Ok(AsyncCharDevice {
                rx: pipe::Receiver::from_file_unchecked(file)?,
                tx: pipe::Sender::from_file_unchecked(writer)?,
            })
        }
    }

    impl AsyncRead for AsyncCharDevice {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().rx).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for AsyncCharDevice {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().tx).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tx).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tx).poll_shutdown(cx)
        }
    }
}
