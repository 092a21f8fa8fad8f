//! Connection parameters (`VixDiskLibConnectParams` + the extra `ConnectEx` arguments) and open
//! flags.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mode::{format_transport_modes, TransportMode};
use crate::{Error, Result};

/// A secret string (password, session cookie, key). `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call it only where the value is handed to the library or the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// How to authenticate to vCenter or ESXi (`VixDiskLibCredType`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// `VIXDISKLIB_CRED_UID`: user name and password.
    UserPassword {
        /// User name, e.g. `administrator@vsphere.local`.
        user: String,
        /// Password.
        password: Secret,
    },
    /// `VIXDISKLIB_CRED_SESSIONID`: the `vmware_soap_session` cookie of an existing session
    /// (vSphere ≥ 6.7), often faster than a password login.
    SessionId {
        /// The session cookie.
        cookie: Secret,
        /// User name of the session.
        user: String,
        /// The session key.
        key: Secret,
    },
}

/// A SHA-1 certificate thumbprint: 20 hex pairs separated by colons.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Thumbprint(String);

impl Thumbprint {
    /// Validates and normalises (uppercase) a thumbprint such as
    /// `"AA:BB:...:99"` (20 pairs).
    pub fn new(text: &str) -> Result<Self> {
        let pairs: Vec<&str> = text.trim().split(':').collect();
        let valid = pairs.len() == 20
            && pairs
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(Error::InvalidParams(format!(
                "thumbprint {text:?} is not a SHA-1 thumbprint (20 hex pairs separated by colons; \
                 `openssl s_client -connect HOST:443 | openssl x509 -noout -fingerprint -sha1` prints it)"
            )));
        }
        Ok(Thumbprint(text.trim().to_ascii_uppercase()))
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to connect: the fields of `VixDiskLibConnectParams`, the `readOnly`,
/// `snapshotRef` and `transportModes` arguments of `VixDiskLib_ConnectEx`, and where the library
/// and its InitEx configuration file live. Build one with [`ConnectParams::builder`].
///
/// Local (hosted) connections leave `server` unset. Secrets never appear in `Debug` output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectParams {
    server: Option<String>,
    port: Option<u16>,
    nfc_host_port: Option<u16>,
    thumbprint: Option<Thumbprint>,
    vm: Option<String>,
    snapshot: Option<String>,
    credentials: Option<Credentials>,
    read_only: bool,
    transport_modes: Option<Vec<TransportMode>>,
    libdir: Option<PathBuf>,
    config_path: Option<PathBuf>,
}

impl ConnectParams {
    /// Starts a builder. Connections are read-only unless [`ConnectParamsBuilder::read_write`]
    /// is called, because backups are the common case and read-only is often faster.
    pub fn builder() -> ConnectParamsBuilder {
        ConnectParamsBuilder {
            params: ConnectParams {
                read_only: true,
                ..ConnectParams::default()
            },
        }
    }

    /// Parameters for a local (hosted) read-only connection.
    pub fn local() -> Self {
        ConnectParams {
            read_only: true,
            ..ConnectParams::default()
        }
    }

    /// vCenter or ESXi host name (`serverName`); `None` for hosted disks.
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }
    /// Port of vCenter/ESXi authentication (`port`, 443 when unset).
    pub fn port(&self) -> Option<u16> {
        self.port
    }
    /// NFC port on ESXi (`nfcHostPort`, 902 when unset).
    pub fn nfc_host_port(&self) -> Option<u16> {
        self.nfc_host_port
    }
    /// The server's SHA-1 thumbprint.
    pub fn thumbprint(&self) -> Option<&Thumbprint> {
        self.thumbprint.as_ref()
    }
    /// The VM (`vmxSpec`), e.g. `moref=vm-16` (vCenter) or `moref=2` (ESXi).
    pub fn vm(&self) -> Option<&str> {
        self.vm.as_deref()
    }
    /// The snapshot MoRef (`ConnectEx`'s `snapshotRef`), e.g. `snapshot-47`.
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }
    /// The credentials.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }
    /// Whether the connection is read-only (then every open is read-only).
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// The caller's transport modes in priority order; `None` accepts the library default.
    pub fn transport_modes(&self) -> Option<&[TransportMode]> {
        self.transport_modes.as_deref()
    }
    /// The transport modes as VDDK's colon-separated string, if set.
    pub fn transport_modes_string(&self) -> Option<String> {
        self.transport_modes.as_deref().map(format_transport_modes)
    }
    /// Directory holding `libvixDiskLib.so` (InitEx `libDir`), as a `vddk://` URI gives it.
    /// The VDDK backend is configured once per process by its `VddkOptions`; this is read by
    /// `VddkTransport::from_params` and otherwise only compared with the library in use (a
    /// different one is an error).
    pub fn libdir(&self) -> Option<&std::path::Path> {
        self.libdir.as_deref()
    }
    /// InitEx configuration file (see [`Config`](crate::Config)), as a `vddk://` URI gives it;
    /// like [`libdir`](Self::libdir), it must agree with the one the process initialised.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }
    /// Whether the disk is reached through a server rather than as a local file.
    pub fn is_remote(&self) -> bool {
        self.server.is_some()
    }
}

/// Whether `id` looks like a managed-object reference id: `vm-16`, `snapshot-47`, `2`,
/// `2-snapshot-5` (letters, digits, `-`, `_`, `.`, starting with a letter or digit).
fn is_moref_id(id: &str) -> bool {
    id.len() <= 80
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks a VM given as VDDK's `vmxSpec`: `moref=vm-16` (vCenter), `moref=2` (ESXi), or the
/// older `[datastore] dir/vm.vmx?dcPath=…&dsName=…` form. A bare MoRef (`vm-16`) is refused
/// early with the expected form: VDDK would only fail at ConnectEx, on a real vCenter.
///
/// ```
/// use disk_transport::check_vm_spec;
///
/// assert!(check_vm_spec("moref=vm-16").is_ok());
/// let err = check_vm_spec("vm-16").unwrap_err().to_string();
/// assert!(err.contains("moref=vm-16"), "{err}");
/// ```
pub fn check_vm_spec(spec: &str) -> Result<()> {
    if let Some(id) = spec.strip_prefix("moref=") {
        if is_moref_id(id) {
            return Ok(());
        }
        return Err(Error::InvalidParams(format!(
            "VM {spec:?}: {id:?} is not a managed-object reference; expected moref=vm-16 \
             (vCenter) or moref=2 (ESXi)"
        )));
    }
    if spec.contains("?dcPath=") || spec.contains("?dsName=") {
        return Ok(());
    }
    let hint = if is_moref_id(spec) {
        format!("write moref={spec}")
    } else {
        "expected moref=vm-16 (vCenter) or moref=2 (ESXi)".to_owned()
    };
    Err(Error::InvalidParams(format!(
        "VM {spec:?} is not a vmxSpec: {hint} (the `vm=` value of a vddk:// URI, \
         ConnectParamsBuilder::vm)"
    )))
}

/// Checks a snapshot's managed-object reference: the bare id, `snapshot-47` (vCenter) or
/// `2-snapshot-5` (ESXi), as `VixDiskLib_ConnectEx` takes it.
///
/// ```
/// use disk_transport::check_snapshot_moref;
///
/// assert!(check_snapshot_moref("snapshot-47").is_ok());
/// assert!(check_snapshot_moref("moref=snapshot-47").is_err());
/// ```
pub fn check_snapshot_moref(moref: &str) -> Result<()> {
    if let Some(id) = moref.strip_prefix("moref=") {
        return Err(Error::InvalidParams(format!(
            "snapshot {moref:?}: a snapshot is given as its bare MoRef, without moref=: {id}"
        )));
    }
    if moref.starts_with("vm-") {
        return Err(Error::InvalidParams(format!(
            "snapshot {moref:?} is a VM's MoRef; the snapshot's looks like snapshot-47 \
             (vCenter) or 2-snapshot-5 (ESXi)"
        )));
    }
    if !is_moref_id(moref) {
        return Err(Error::InvalidParams(format!(
            "snapshot {moref:?} is not a managed-object reference; expected snapshot-47 \
             (vCenter) or 2-snapshot-5 (ESXi)"
        )));
    }
    Ok(())
}

/// Builder of [`ConnectParams`]; [`build`](ConnectParamsBuilder::build) checks the combination.
#[derive(Debug, Clone)]
pub struct ConnectParamsBuilder {
    params: ConnectParams,
}

impl ConnectParamsBuilder {
    /// vCenter or ESXi host name.
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.params.server = Some(server.into());
        self
    }
    /// Authentication port (default 443).
    pub fn port(mut self, port: u16) -> Self {
        self.params.port = Some(port);
        self
    }
    /// NFC port on ESXi (default 902).
    pub fn nfc_host_port(mut self, port: u16) -> Self {
        self.params.nfc_host_port = Some(port);
        self
    }
    /// The server certificate's SHA-1 thumbprint.
    pub fn thumbprint(mut self, thumbprint: Thumbprint) -> Self {
        self.params.thumbprint = Some(thumbprint);
        self
    }
    /// The VM as a `vmxSpec`, e.g. `moref=vm-16`.
    pub fn vm(mut self, vmx_spec: impl Into<String>) -> Self {
        self.params.vm = Some(vmx_spec.into());
        self
    }
    /// The snapshot MoRef to read, e.g. `snapshot-47`.
    pub fn snapshot(mut self, moref: impl Into<String>) -> Self {
        self.params.snapshot = Some(moref.into());
        self
    }
    /// User name and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<Secret>) -> Self {
        self.params.credentials = Some(Credentials::UserPassword {
            user: user.into(),
            password: password.into(),
        });
        self
    }
    /// Any credentials.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.params.credentials = Some(credentials);
        self
    }
    /// Allow writes (connections are read-only by default).
    pub fn read_write(mut self) -> Self {
        self.params.read_only = false;
        self
    }
    /// Set read-only explicitly.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.params.read_only = read_only;
        self
    }
    /// Transport modes in priority order.
    pub fn transport_modes(mut self, modes: impl Into<Vec<TransportMode>>) -> Self {
        self.params.transport_modes = Some(modes.into());
        self
    }
    /// Directory of `libvixDiskLib.so`.
    pub fn libdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.params.libdir = Some(dir.into());
        self
    }
    /// InitEx configuration file.
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.params.config_path = Some(path.into());
        self
    }

    /// Checks the parameters as VDDK would need them and returns them.
    ///
    /// The VM and snapshot must be managed-object references in the forms VDDK takes
    /// ([`check_vm_spec`], [`check_snapshot_moref`]).
    /// A remote connection needs a VM and credentials (VDDK crashes on missing ones); a snapshot
    /// only means something with a VM; an empty transport list is rejected.
    pub fn build(self) -> Result<ConnectParams> {
        let p = self.params;
        if let Some(vm) = &p.vm {
            check_vm_spec(vm)?;
        }
        if let Some(snapshot) = &p.snapshot {
            check_snapshot_moref(snapshot)?;
        }
        if p.server.is_some() {
            if p.vm.is_none() {
                return Err(Error::InvalidParams(
                    "a remote connection needs the VM (vmxSpec such as \"moref=vm-16\")".into(),
                ));
            }
            if p.credentials.is_none() {
                return Err(Error::InvalidParams(
                    "a remote connection needs credentials (user and password or a session cookie)"
                        .into(),
                ));
            }
        } else if p.vm.is_some() || p.credentials.is_some() || p.thumbprint.is_some() {
            return Err(Error::InvalidParams(
                "VM, credentials and thumbprint need a server; leave them unset for local disks"
                    .into(),
            ));
        }
        if p.snapshot.is_some() && p.vm.is_none() {
            return Err(Error::InvalidParams(
                "a snapshot MoRef only means something together with the VM".into(),
            ));
        }
        if matches!(&p.transport_modes, Some(m) if m.is_empty()) {
            return Err(Error::InvalidParams(
                "the transport mode list is empty; leave it unset for the default".into(),
            ));
        }
        if let Some(Credentials::UserPassword { user, .. }) = &p.credentials {
            if user.is_empty() {
                return Err(Error::InvalidParams("the user name is empty".into()));
            }
        }
        Ok(p)
    }
}

/// Flags for [`Connection::open`](crate::Connection::open) (`VIXDISKLIB_FLAG_OPEN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct OpenFlags {
    /// Open read-only (`READ_ONLY`, 4). Forced on by a read-only connection.
    pub read_only: bool,
    /// Do not open parent disks (`SINGLE_LINK`, 2): unallocated ranges may then hold data in a
    /// parent.
    pub single_link: bool,
    /// Bypass host caching (`UNBUFFERED`, 1); for files this is `O_DIRECT`.
    pub unbuffered: bool,
    /// NFC compression (vSphere ≥ 6.5, NBD/NBDSSL only).
    pub compression: Compression,
}

/// NFC compression of the data stream (`VIXDISKLIB_FLAG_OPEN_COMPRESSION_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// zlib (16): small, but much slower.
    Zlib,
    /// FastLZ (32).
    FastLz,
    /// SkipZ (64): skips zeroed blocks.
    SkipZ,
}

impl OpenFlags {
    /// Read-only flags.
    pub fn read_only() -> Self {
        OpenFlags {
            read_only: true,
            ..OpenFlags::default()
        }
    }

    /// Read-write flags.
    pub fn read_write() -> Self {
        OpenFlags::default()
    }

    /// The VDDK flag word (`UNBUFFERED` 1, `SINGLE_LINK` 2, `READ_ONLY` 4, compression 16/32/64).
    pub fn bits(&self) -> u32 {
        let mut bits = 0;
        if self.unbuffered {
            bits |= 1;
        }
        if self.single_link {
            bits |= 2;
        }
        if self.read_only {
            bits |= 4;
        }
        bits |= match self.compression {
            Compression::None => 0,
            Compression::Zlib => 16,
            Compression::FastLz => 32,
            Compression::SkipZ => 64,
        };
        bits
    }

    /// The flags actually in force on a connection: a read-only connection makes every open
    /// read-only, whatever was asked.
    pub fn effective(self, connection_read_only: bool) -> Self {
        OpenFlags {
            read_only: self.read_only || connection_read_only,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug() {
        let p = ConnectParams::builder()
            .server("vcenter.example.com")
            .vm("moref=vm-16")
            .snapshot("snapshot-47")
            .user_password("admin", "hunter2")
            .build()
            .unwrap();
        let text = format!("{p:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
        assert!(p.read_only());
        match p.credentials() {
            Some(Credentials::UserPassword { password, .. }) => {
                assert_eq!(password.expose(), "hunter2")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn remote_needs_vm_and_credentials() {
        assert!(ConnectParams::builder().server("h").build().is_err());
        assert!(ConnectParams::builder()
            .server("h")
            .vm("moref=2")
            .build()
            .is_err());
        assert!(ConnectParams::builder().vm("moref=2").build().is_err());
        assert!(ConnectParams::builder().build().unwrap().server().is_none());
    }

    #[test]
    fn morefs_are_checked_where_given() {
        for good in [
            "moref=vm-16",
            "moref=2",
            "[ds1] vm/vm.vmx?dcPath=dc&dsName=ds1",
        ] {
            assert!(check_vm_spec(good).is_ok(), "{good}");
        }
        let bare = ConnectParams::builder()
            .server("vc")
            .user_password("u", "p")
            .vm("vm-16")
            .build()
            .unwrap_err()
            .to_string();
        assert!(bare.contains("write moref=vm-16"), "{bare}");
        for bad in ["", "moref=", "moref=vm 16", "vm 16", "moref=vm-16&x"] {
            let err = check_vm_spec(bad).unwrap_err().to_string();
            assert!(
                err.contains("moref=vm-16 (vCenter) or moref=2 (ESXi)"),
                "{bad}: {err}"
            );
        }
        for good in ["snapshot-47", "2-snapshot-5"] {
            assert!(check_snapshot_moref(good).is_ok(), "{good}");
        }
        let snap = |s: &str| {
            ConnectParams::builder()
                .server("vc")
                .user_password("u", "p")
                .vm("moref=vm-16")
                .snapshot(s)
                .build()
                .unwrap_err()
                .to_string()
        };
        assert!(snap("moref=snapshot-47").contains("without moref=: snapshot-47"));
        assert!(snap("vm-16").contains("a VM's MoRef"));
        assert!(snap("").contains("snapshot-47 (vCenter)"));
    }

    proptest::proptest! {
        #[test]
        fn vm_specs_are_accepted_exactly_in_moref_form(id in "[a-z0-9][a-z0-9-]{0,20}", junk in "[ =&/]") {
            let moref = format!("moref={id}");
            proptest::prop_assert!(check_vm_spec(&moref).is_ok());
            let bare = check_vm_spec(&id).unwrap_err().to_string();
            let expected = format!("write moref={id}");
            proptest::prop_assert!(bare.contains(&expected), "{}", bare);
            let broken = format!("moref={id}{junk}x");
            proptest::prop_assert!(check_vm_spec(&broken).is_err());
        }
    }

    #[test]
    fn thumbprints_are_checked() {
        let good = (0..20)
            .map(|i| format!("{i:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            Thumbprint::new(&good).unwrap().as_str(),
            good.to_uppercase()
        );
        assert!(Thumbprint::new("AA:BB").is_err());
        assert!(Thumbprint::new(&good.replace("0a", "0g")).is_err());
    }

    #[test]
    fn read_only_connection_forces_read_only_opens() {
        let flags = OpenFlags::read_write().effective(true);
        assert!(flags.read_only);
        assert_eq!(flags.bits(), 4);
        let f = OpenFlags {
            unbuffered: true,
            single_link: true,
            compression: Compression::SkipZ,
            ..OpenFlags::default()
        };
        assert_eq!(f.bits(), 1 | 2 | 64);
        assert!(!f.effective(false).read_only);
    }
}
