//! Where a guest agent is reached: parsed from `qga+unix:///path`,
//! `qga+tcp://host:port` or `qga+serial:///dev/...` addresses.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The guest-side virtio-serial port of the agent on Linux guests.
pub const VIRTIO_PORT_PATH: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";

/// A channel to a guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A Unix socket: QEMU's `-chardev socket,server=on` host end, or
    /// `qemu-ga -m unix-listen`.
    Unix(PathBuf),
    /// A TCP `host:port` (QEMU `-chardev socket,host=…,port=…,server=on`).
    Tcp(String),
    /// A character device, e.g. [`VIRTIO_PORT_PATH`] or a serial port.
    Serial(PathBuf),
}

impl Address {
    /// Parses an address.
    ///
    /// Accepted forms: `qga+unix:///run/qga.sock` (also `unix:/path`),
    /// `qga+tcp://127.0.0.1:4444` (also `tcp:host:port`),
    /// `qga+serial:///dev/ttyS1` (also `serial:/path`), and a bare absolute
    /// path: a path under `/dev` is a character device, anything else a socket.
    pub fn parse(address: &str) -> Result<Address> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = match address.split_once(':') {
            Some((s, r)) if !s.contains('/') => (s, r),
            _ => {
                if address.starts_with('/') {
                    let path = PathBuf::from(address);
                    return Ok(if address.starts_with("/dev/") {
                        Address::Serial(path)
                    } else {
                        Address::Unix(path)
                    });
                }
                return Err(invalid(
                    "expected qga+unix:///path, qga+tcp://host:port or qga+serial:///dev/…",
                ));
            }
        };
        let scheme = scheme.strip_prefix("qga+").unwrap_or(scheme);
        // `scheme://authority/path`: for unix and serial the authority must be empty.
        let body = rest.strip_prefix("//").unwrap_or(rest);
        match scheme {
            "unix" | "serial" | "chardev" => {
                let path = if rest.starts_with("//") {
                    if !body.starts_with('/') {
                        return Err(invalid(
                            "a host is not allowed here; write three slashes: qga+unix:///path",
                        ));
                    }
                    body
                } else {
                    rest
                };
                if path.is_empty() || !path.starts_with('/') {
                    return Err(invalid("the path must be absolute"));
                }
                let path = PathBuf::from(path);
                Ok(if scheme == "unix" {
                    Address::Unix(path)
                } else {
                    Address::Serial(path)
                })
            }
            "tcp" => {
                let hostport = body.trim_end_matches('/');
                match hostport.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                        Ok(Address::Tcp(hostport.to_owned()))
                    }
                    _ => Err(invalid("expected host:port")),
                }
            }
            other => Err(invalid(&format!(
                "unknown scheme '{other}' (use qga+unix, qga+tcp or qga+serial)"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "qga+unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "qga+tcp://{hp}"),
            Address::Serial(p) => write!(f, "qga+serial://{}", p.display()),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Address::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        assert_eq!(
            Address::parse("qga+unix:///run/qga.sock").unwrap(),
            Address::Unix("/run/qga.sock".into())
        );
        assert_eq!(
            Address::parse("unix:/run/qga.sock").unwrap(),
            Address::Unix("/run/qga.sock".into())
        );
        assert_eq!(
            Address::parse("qga+tcp://127.0.0.1:4444").unwrap(),
            Address::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Address::parse("tcp:[::1]:4444").unwrap(),
            Address::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Address::parse("qga+serial:///dev/ttyS1").unwrap(),
            Address::Serial("/dev/ttyS1".into())
        );
        assert_eq!(
            Address::parse(VIRTIO_PORT_PATH).unwrap(),
            Address::Serial(VIRTIO_PORT_PATH.into())
        );
        assert_eq!(
            Address::parse("/tmp/x.sock").unwrap(),
            Address::Unix("/tmp/x.sock".into())
        );
    }

    #[test]
    fn rejects_bad_forms_with_reasons() {
        for bad in [
            "qga+unix://host/path",
            "qga+tcp://nohost",
            "ftp://x",
            "relative",
            "qga+unix:",
            "tcp::80",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidAddress { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "qga+unix:///a/b",
            "qga+tcp://h:1",
            "qga+serial:///dev/vport1p1",
        ] {
            assert_eq!(Address::parse(s).unwrap().to_string(), s);
        }
    }
}
