//! Where a QEMU monitor is reached: `qmp+unix:///path` or `qmp+tcp://host:port`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// A QMP socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A Unix socket: `-qmp unix:/path,server=on,wait=off` or
    /// `-chardev socket,path=…,server=on` with `-mon mode=control`.
    Unix(PathBuf),
    /// A TCP `host:port` (`-qmp tcp:127.0.0.1:4444,server=on,wait=off`).
    Tcp(String),
}

impl Address {
    /// Parses an address.
    ///
    /// Accepted forms: `qmp+unix:///run/qemu/vm.qmp` (also `unix:/path` and a bare absolute
    /// path) and `qmp+tcp://127.0.0.1:4444` (also `tcp:host:port`; IPv6 as `[::1]:4444`).
    ///
    /// ```
    /// use qmp_proto::Address;
    /// let a: Address = "qmp+unix:///run/qemu/vm.qmp".parse()?;
    /// assert_eq!(a, Address::Unix("/run/qemu/vm.qmp".into()));
    /// assert_eq!(a.to_string(), "qmp+unix:///run/qemu/vm.qmp");
    /// # Ok::<(), qmp_proto::Error>(())
    /// ```
    pub fn parse(address: &str) -> Result<Address> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = match address.split_once(':') {
            Some((s, r)) if !s.contains('/') => (s, r),
            _ if address.starts_with('/') => return Ok(Address::Unix(PathBuf::from(address))),
            _ => return Err(invalid("expected qmp+unix:///path or qmp+tcp://host:port")),
        };
        let scheme = scheme.strip_prefix("qmp+").unwrap_or(scheme);
        let body = rest.strip_prefix("//").unwrap_or(rest);
        match scheme {
            "unix" => {
                let path = if rest.starts_with("//") {
                    if !body.starts_with('/') {
                        return Err(invalid(
                            "a host is not allowed here; write three slashes: qmp+unix:///path",
                        ));
                    }
                    body
                } else {
                    rest
                };
                if !path.starts_with('/') {
                    return Err(invalid("the path must be absolute"));
                }
                Ok(Address::Unix(PathBuf::from(path)))
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
                "unknown scheme '{other}' (use qmp+unix or qmp+tcp)"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "qmp+unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "qmp+tcp://{hp}"),
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
        for (text, want) in [
            (
                "qmp+unix:///run/q.sock",
                Address::Unix("/run/q.sock".into()),
            ),
            ("unix:/run/q.sock", Address::Unix("/run/q.sock".into())),
            ("/tmp/q.sock", Address::Unix("/tmp/q.sock".into())),
            (
                "qmp+tcp://127.0.0.1:4444",
                Address::Tcp("127.0.0.1:4444".into()),
            ),
            ("tcp:[::1]:4444", Address::Tcp("[::1]:4444".into())),
        ] {
            assert_eq!(Address::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_bad_forms_with_reasons() {
        for bad in [
            "qmp+unix://host/path",
            "qmp+tcp://nohost",
            "qmp+tcp://h:99999",
            "qga+unix:///x",
            "relative",
            "qmp+unix:",
            "tcp::80",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidAddress { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["qmp+unix:///a/b", "qmp+tcp://h:1", "qmp+tcp://[::1]:4444"] {
            assert_eq!(Address::parse(s).unwrap().to_string(), s);
        }
    }
}
