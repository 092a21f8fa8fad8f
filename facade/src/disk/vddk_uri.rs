//! `vddk://` URIs: a VMware virtual disk reached through VDDK (libvixDiskLib loaded at run time).
//!
//! ```text
//! vddk://USER@SERVER[:PORT]/DISK-PATH?vm=moref=vm-16&snapshot=snapshot-47&thumbprint=AA:..:99
//!        &transports=nbdssl:nbd&libdir=/opt/vmware-vix-disklib-distrib&config=/etc/vddk.conf
//! vddk:///path/to/local.vmdk?libdir=/opt/vmware-vix-disklib-distrib
//! ```
//!
//! The disk path is percent-encoded (`%5Bdatastore1%5D%20vm%2Fvm.vmdk` for
//! `[datastore1] vm/vm.vmdk`). The password never goes in the URI, where shell history and logs
//! would keep it: it comes from the `VMSDK_VDDK_PASSWORD` environment variable.

use disk_transport::{
    parse_transport_modes, percent_decode, ConnectParams, Error, OpenFlags, Result, Secret,
    Thumbprint,
};

/// The environment variable holding the password of a `vddk://USER@…` URI.
pub const PASSWORD_ENV: &str = "VMSDK_VDDK_PASSWORD";

/// What a `vddk://` URI says: how to connect, and which disk to open.
#[derive(Debug, Clone)]
pub struct VddkTarget {
    /// The connection parameters (credentials redacted in `Debug`).
    pub params: ConnectParams,
    /// The disk path as VDDK takes it.
    pub path: String,
}

fn invalid(uri: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUri {
        uri: uri.to_owned(),
        reason: reason.into(),
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets).
fn host_and_port<'a>(uri: &str, text: &'a str) -> Result<(&'a str, Option<u16>)> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, rest)) => (host, Some(rest.strip_prefix(':').unwrap_or(rest))),
            None => return Err(invalid(uri, "an IPv6 host without its closing `]`")),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| invalid(uri, format!("`{p}` is not a port number")))
        })
        .transpose()?;
    Ok((host, port))
}

/// Parses a `vddk://` URI; `password` is consulted only when the URI names a user.
pub fn parse(uri: &str, flags: OpenFlags, password: Option<String>) -> Result<VddkTarget> {
    let rest = uri
        .strip_prefix("vddk://")
        .ok_or_else(|| invalid(uri, "expected vddk://"))?;
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match before_query.find('/') {
        Some(at) => before_query.split_at(at),
        None => (before_query, ""),
    };
    let mut builder = ConnectParams::builder().read_only(flags.read_only);
    let path = if authority.is_empty() {
        // A local file: keep the leading slash.
        percent_decode(uri, path)?
    } else {
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(percent_decode(uri, user)?), host),
            None => (None, authority),
        };
        let (host, port) = host_and_port(uri, host_port)?;
        builder = builder.server(host);
        if let Some(port) = port {
            builder = builder.port(port);
        }
        if let Some(user) = user {
            let password = password.ok_or_else(|| {
                invalid(
                    uri,
                    format!("set {PASSWORD_ENV} to the password of this user"),
                )
            })?;
            builder = builder.user_password(user, Secret::new(password));
        }
        percent_decode(uri, path.trim_start_matches('/'))?
    };
    if path.is_empty() || path == "/" {
        return Err(invalid(uri, "no disk path after the server"));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(uri, value)?;
        builder = match key {
            "vm" => builder.vm(value),
            "snapshot" => builder.snapshot(value),
            "thumbprint" => builder.thumbprint(Thumbprint::new(&value)?),
            "transports" => builder.transport_modes(parse_transport_modes(&value)?),
            "libdir" => builder.libdir(value),
            "config" => builder.config_path(value),
            "nfc-port" => builder.nfc_host_port(
                value
                    .parse()
                    .map_err(|_| invalid(uri, format!("nfc-port `{value}` is not a port")))?,
            ),
            other => return Err(invalid(uri, format!("unknown parameter `{other}`"))),
        };
    }
    Ok(VddkTarget {
        params: builder.build()?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uri_carries_every_parameter_and_hides_the_password() {
        let uri = "vddk://admin%40vsphere.local@esx1.example.com:902/\
                   %5Bdatastore1%5D%20vm1%2Fvm1.vmdk?vm=moref=vm-16&snapshot=snapshot-47\
                   &transports=nbdssl:nbd&libdir=/opt/vddk";
        let target = parse(uri, OpenFlags::read_only(), Some("s3cret".into())).unwrap();
        assert_eq!(target.path, "[datastore1] vm1/vm1.vmdk");
        let params = &target.params;
        assert_eq!(params.server(), Some("esx1.example.com"));
        assert_eq!(params.port(), Some(902));
        assert_eq!(params.vm(), Some("moref=vm-16"));
        assert_eq!(params.snapshot(), Some("snapshot-47"));
        assert_eq!(
            params.transport_modes_string().as_deref(),
            Some("nbdssl:nbd")
        );
        assert!(params.read_only());
        assert!(!format!("{target:?}").contains("s3cret"));
    }

    #[test]
    fn ipv6_servers_keep_their_port() {
        let target = parse(
            "vddk://u@[fd00::5]:902/d.vmdk?vm=moref=vm-1",
            OpenFlags::read_only(),
            Some("p".into()),
        )
        .unwrap();
        assert_eq!(target.params.server(), Some("fd00::5"));
        assert_eq!(target.params.port(), Some(902));
    }

    #[test]
    fn local_uri_keeps_the_absolute_path() {
        let target = parse("vddk:///srv/disks/a.vmdk", OpenFlags::read_write(), None).unwrap();
        assert_eq!(target.path, "/srv/disks/a.vmdk");
        assert!(!target.params.is_remote());
        assert!(!target.params.read_only());
    }

    #[test]
    fn a_user_without_a_password_is_refused_with_the_variable_to_set() {
        let err = parse("vddk://root@esx/disk.vmdk", OpenFlags::read_only(), None).unwrap_err();
        assert!(err.to_string().contains(PASSWORD_ENV), "{err}");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (uri, needle) in [
            ("vddk://esx/d.vmdk?colour=red", "colour"),
            ("vddk://esx:http/d.vmdk", "http"),
            ("vddk://esx/", "no disk path"),
            ("vddk://esx/d.vmdk?transports=warp", "warp"),
            ("vddk://esx/%zz", "escape"),
        ] {
            let err = parse(uri, OpenFlags::read_only(), None).unwrap_err();
            assert!(err.to_string().contains(needle), "{uri}: {err}");
        }
    }
}
