//! The `VixDiskLib_InitEx` configuration file.
//!
//! One `name = value` per line; `#` starts a comment (on its own line or after a value); values
//! may be quoted (`tmpDirectory = "/var/tmp/vddk"`). Names are matched case-insensitively, as
//! VMware's config files are. Every key of the VDDK guide is parsed, range-checked and given
//! its documented default; keys this crate does not know (there are many undocumented ones, such
//! as `vixDiskLib.nfcAio.Session.BufSizeIn64KB`) are kept in order and written back unchanged.
//!
//! [`Config::check`] (and [`Config::check_path`], which the VDDK backend runs on the file before
//! `VixDiskLib_InitEx`) also reports the keys nobody knows — neither the VDDK guide nor the
//! tuning keys of [`keys::UNINTERPRETED`] — as [`ConfigWarning`]s naming the nearest known key:
//! a misspelt `vixDiskLib.nfc.ReadTimoutMs` would otherwise silently leave the read timeout
//! unset. A key newer than this crate still reaches VDDK; [`ConfigCheck::Strict`] refuses it.
//!
//! ```
//! use disk_transport::Config;
//!
//! # fn main() -> Result<(), disk_transport::Error> {
//! let config: Config = r#"
//! ## log level 0 to 6 for quiet ranging to verbose
//! vixDiskLib.transport.LogLevel = 2
//! vixDiskLib.nfc.ReadTimeoutMs = 60000   # one minute
//! tmpDirectory = "/var/tmp/vddk"
//! vixDiskLib.nfcAio.Session.BufSizeIn64KB = 32
//! "#
//! .parse()?;
//! assert_eq!(config.transport_log_level, 2);
//! assert_eq!(config.nfc_read_timeout(), Some(std::time::Duration::from_secs(60)));
//! assert_eq!(config.nfc_log_level, 1); // the default
//! assert_eq!(config.extra[0].0, "vixDiskLib.nfcAio.Session.BufSizeIn64KB");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest NFC timeout: the value is stored in a 32-bit field, "2G (2,147,483,648)".
pub const MAX_TIMEOUT_MS: u32 = 2_147_483_648;

/// Keys of the InitEx configuration file, as the VDDK guide spells them.
pub mod keys {
    /// Temporary directory for logs.
    pub const TMP_DIRECTORY: &str = "tmpDirectory";
    /// Log level of the transport functions, 0..=6, default 6.
    pub const TRANSPORT_LOG_LEVEL: &str = "vixDiskLib.transport.LogLevel";
    /// NFC accept timeout (ms), default 0 = none.
    pub const NFC_ACCEPT_TIMEOUT_MS: &str = "vixDiskLib.nfc.AcceptTimeoutMs";
    /// NFC request timeout (ms), default 0 = none.
    pub const NFC_REQUEST_TIMEOUT_MS: &str = "vixDiskLib.nfc.RequestTimeoutMs";
    /// NFC read timeout (ms), default 0 = none.
    pub const NFC_READ_TIMEOUT_MS: &str = "vixDiskLib.nfc.ReadTimeoutMs";
    /// NFC write timeout (ms), default 0 = none.
    pub const NFC_WRITE_TIMEOUT_MS: &str = "vixDiskLib.nfc.WriteTimeoutMs";
    /// NFC file system operation timeout (ms), default 0 = wait forever.
    pub const NFC_FSSRVR_TIMEOUT_MS: &str = "vixDiskLib.nfcFssrvr.TimeoutMs";
    /// NFC file system write timeout (ms), default 0 = none.
    pub const NFC_FSSRVR_WRITE_TIMEOUT_MS: &str = "vixDiskLib.nfcFssrvrWrite.TimeoutMs";
    /// NFC log level, 0..=4, default 1 (errors only).
    pub const NFC_LOG_LEVEL: &str = "vixDiskLib.nfc.LogLevel";
    /// vixDiskLib caching, 0 or 1, default 0.
    pub const DISKLIB_ENABLE_CACHE: &str = "vixDiskLib.disklib.EnableCache";
    /// Check the SSL thumbprint of Linux VMs, 0 or 1, default 0.
    pub const LINUX_SSL_VERIFY_CERTIFICATES: &str = "vixDiskLib.linuxSSL.verifyCertificates";

    /// Keys VDDK reads that the guide does not document and this crate passes through without
    /// interpreting (NFC AIO buffer tuning, HotAdd without an NFC session). They are not warned
    /// about.
    pub const UNINTERPRETED: [&str; 3] = [
        "vixDiskLib.nfcAio.Session.BufSizeIn64KB",
        "vixDiskLib.nfcAio.Session.BufCount",
        "vixDiskLib.transport.hotadd.NoNfcSession",
    ];

    /// The prefix of the stand-in `libvixDiskLib.so`'s own keys (`standin.fileDisks`, ...; see
    /// the `vddk-standin` package). Real VDDK ignores them; they are not warned about.
    pub const STANDIN_PREFIX: &str = "standin.";

    /// Every documented key.
    pub const ALL: [&str; 11] = [
        TMP_DIRECTORY,
        TRANSPORT_LOG_LEVEL,
        NFC_ACCEPT_TIMEOUT_MS,
        NFC_REQUEST_TIMEOUT_MS,
        NFC_READ_TIMEOUT_MS,
        NFC_WRITE_TIMEOUT_MS,
        NFC_FSSRVR_TIMEOUT_MS,
        NFC_FSSRVR_WRITE_TIMEOUT_MS,
        NFC_LOG_LEVEL,
        DISKLIB_ENABLE_CACHE,
        LINUX_SSL_VERIFY_CERTIFICATES,
    ];
}

/// NFC log levels (`vixDiskLib.nfc.LogLevel`); each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NfcLogLevel {
    /// 0: nothing.
    None,
    /// 1: errors (the default).
    Error,
    /// 2: warnings.
    Warning,
    /// 3: information.
    Info,
    /// 4: debugging.
    Debug,
}

/// A parsed InitEx configuration file. Numbers keep the file's units (milliseconds); `0` for a
/// timeout means "no timeout", as in VDDK. The accessors turn them into `Option<Duration>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// `tmpDirectory`: where VDDK writes its logs.
    pub tmp_directory: Option<PathBuf>,
    /// `vixDiskLib.transport.LogLevel`, 0 (quiet) ..= 6 (verbose), default 6.
    pub transport_log_level: u8,
    /// `vixDiskLib.nfc.AcceptTimeoutMs` (NBD/NBDSSL only), default 0.
    pub nfc_accept_timeout_ms: u32,
    /// `vixDiskLib.nfc.RequestTimeoutMs`, default 0.
    pub nfc_request_timeout_ms: u32,
    /// `vixDiskLib.nfc.ReadTimeoutMs`, default 0.
    pub nfc_read_timeout_ms: u32,
    /// `vixDiskLib.nfc.WriteTimeoutMs`, default 0.
    pub nfc_write_timeout_ms: u32,
    /// `vixDiskLib.nfcFssrvr.TimeoutMs`, default 0 (wait forever: a failed network can leave
    /// the file system locked).
    pub nfc_fssrvr_timeout_ms: u32,
    /// `vixDiskLib.nfcFssrvrWrite.TimeoutMs`, default 0.
    pub nfc_fssrvr_write_timeout_ms: u32,
    /// `vixDiskLib.nfc.LogLevel`, 0..=4, default 1.
    pub nfc_log_level: u8,
    /// `vixDiskLib.disklib.EnableCache`, default off (sequential backups get slower and may
    /// read stale data with it).
    pub enable_cache: bool,
    /// `vixDiskLib.linuxSSL.verifyCertificates`, default off.
    pub linux_ssl_verify_certificates: bool,
    /// Keys this crate does not interpret, with their values, in file order.
    pub extra: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tmp_directory: None,
            transport_log_level: 6,
            nfc_accept_timeout_ms: 0,
            nfc_request_timeout_ms: 0,
            nfc_read_timeout_ms: 0,
            nfc_write_timeout_ms: 0,
            nfc_fssrvr_timeout_ms: 0,
            nfc_fssrvr_write_timeout_ms: 0,
            nfc_log_level: 1,
            enable_cache: false,
            linux_ssl_verify_certificates: false,
            extra: Vec::new(),
        }
    }
}

/// How [`Config::check`] treats keys it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigCheck {
    /// Unknown keys are [`ConfigWarning`]s and still reach VDDK (a key newer than this crate
    /// keeps working).
    #[default]
    Lenient,
    /// Unknown keys are errors ([`Error::Config`]), for deployments that want a typo to stop
    /// the program rather than a timeout to silently not apply.
    Strict,
}

/// A key of an InitEx configuration file that neither the VDDK guide nor this crate knows.
/// VDDK still receives it; its `Display` names the file, line and key and, when one is close,
/// the known key it probably meant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConfigWarning {
    /// The file, if the text came from one.
    pub path: Option<PathBuf>,
    /// 1-based line number.
    pub line: usize,
    /// The key as written.
    pub key: String,
    /// The nearest known key, when it is close enough to be a likely misspelling.
    pub suggestion: Option<&'static str>,
}

impl ConfigWarning {
    fn describe(&self) -> String {
        match self.suggestion {
            Some(known) => format!("unknown key {}; did you mean {known}?", self.key),
            None => format!(
                "unknown key {} (not in the VDDK guide; passed to VDDK as written)",
                self.key
            ),
        }
    }
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{}:{}: {}", path.display(), self.line, self.describe()),
            None => write!(f, "line {}: {}", self.line, self.describe()),
        }
    }
}

/// Whether `key` is one this crate knows (documented, uninterpreted tuning or the stand-in's).
fn is_known_key(key: &str) -> bool {
    keys::ALL
        .iter()
        .chain(keys::UNINTERPRETED.iter())
        .any(|k| k.eq_ignore_ascii_case(key))
        || key
            .get(..keys::STANDIN_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(keys::STANDIN_PREFIX))
}

/// The known key nearest to `key` (case-insensitive edit distance), when it is close enough to
/// be a misspelling: at most 3 edits, and fewer than a quarter of the key's length.
pub fn nearest_known_key(key: &str) -> Option<&'static str> {
    let folded = key.to_ascii_lowercase();
    keys::ALL
        .iter()
        .chain(keys::UNINTERPRETED.iter())
        .map(|k| (edit_distance(&folded, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 3 && *d * 4 < k.len().max(folded.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes, with one row of memory. Keys are short ASCII names; long
/// inputs (fuzzing) are cut off early, as they cannot be near any key anyway.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 3 {
        return a.len().abs_diff(b.len());
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

fn timeout(ms: u32) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(u64::from(ms)))
}

impl Config {
    /// Reads and parses a file; errors name the file and line. Unknown keys are kept in
    /// [`extra`](Config::extra) without a word; [`check_path`](Config::check_path) reports them.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        Config::check_path(path, ConfigCheck::Lenient).map(|(config, _)| config)
    }

    /// Parses `text` and reports the keys nobody knows: as warnings, or with
    /// [`ConfigCheck::Strict`] as an error naming the line, the key and the nearest known key.
    ///
    /// ```
    /// use disk_transport::config::{Config, ConfigCheck};
    ///
    /// let text = "vixDiskLib.nfc.ReadTimoutMs = 60000\nvixDiskLib.nfc.LogLevel = 2\n";
    /// let (config, warnings) = Config::check(text, ConfigCheck::Lenient)?;
    /// assert_eq!(config.nfc_read_timeout(), None); // the misspelt key set nothing
    /// assert_eq!(
    ///     warnings[0].to_string(),
    ///     "line 1: unknown key vixDiskLib.nfc.ReadTimoutMs; did you mean vixDiskLib.nfc.ReadTimeoutMs?"
    /// );
    /// assert!(Config::check(text, ConfigCheck::Strict).is_err());
    /// # Ok::<(), disk_transport::Error>(())
    /// ```
    pub fn check(text: &str, mode: ConfigCheck) -> Result<(Self, Vec<ConfigWarning>)> {
        Config::parse(text, None, mode)
    }

    /// [`check`](Config::check) of a file; errors and warnings name the file and line. The VDDK
    /// backend runs this on [`VddkOptions::config_path`](crate::vddk::VddkOptions::config_path)
    /// before `VixDiskLib_InitEx`.
    pub fn check_path(
        path: impl AsRef<Path>,
        mode: ConfigCheck,
    ) -> Result<(Self, Vec<ConfigWarning>)> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::io(
                format!("read the VDDK configuration file {}", path.display()),
                None,
                e,
            )
        })?;
        Config::parse(&text, Some(path), mode)
    }

    /// The NFC accept timeout, `None` when unlimited.
    pub fn nfc_accept_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_accept_timeout_ms)
    }
    /// The NFC request timeout.
    pub fn nfc_request_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_request_timeout_ms)
    }
    /// The NFC read timeout.
    pub fn nfc_read_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_read_timeout_ms)
    }
    /// The NFC write timeout.
    pub fn nfc_write_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_write_timeout_ms)
    }
    /// The NFC file-system idle timeout.
    pub fn nfc_fssrvr_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_fssrvr_timeout_ms)
    }
    /// The NFC file-system write timeout.
    pub fn nfc_fssrvr_write_timeout(&self) -> Option<Duration> {
        timeout(self.nfc_fssrvr_write_timeout_ms)
    }
    /// The NFC log level as an enum.
    pub fn nfc_log_level(&self) -> NfcLogLevel {
        match self.nfc_log_level {
            0 => NfcLogLevel::None,
            1 => NfcLogLevel::Error,
            2 => NfcLogLevel::Warning,
            3 => NfcLogLevel::Info,
            _ => NfcLogLevel::Debug,
        }
    }

    /// The value of an uninterpreted key (case-insensitive).
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn parse(
        text: &str,
        path: Option<&Path>,
        mode: ConfigCheck,
    ) -> Result<(Self, Vec<ConfigWarning>)> {
        let mut config = Config::default();
        let mut warnings = Vec::new();
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line_no = index + 1;
            let err = |message: String| Error::Config {
                path: path.map(Path::to_path_buf),
                line: line_no,
                message,
            };
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = line
                .split_once('=')
                .ok_or_else(|| err(format!("expected `name = value`, found {line:?}")))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(err("missing name before `=`".to_owned()));
            }
            if name.contains(char::is_whitespace) {
                return Err(err(format!("name {name:?} contains white space")));
            }
            let value = parse_value(rest.trim()).map_err(err)?;
            let folded = name.to_ascii_lowercase();
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == folded) {
                return Err(err(format!(
                    "{name} is set twice (first on line {first}); keep one"
                )));
            }
            seen.push((folded, line_no));
            config.apply(name, value).map_err(err)?;
            if !is_known_key(name) {
                let warning = ConfigWarning {
                    path: path.map(Path::to_path_buf),
                    line: line_no,
                    key: name.to_owned(),
                    suggestion: nearest_known_key(name),
                };
                if mode == ConfigCheck::Strict {
                    return Err(err(format!(
                        "{} (strict configuration checking)",
                        warning.describe()
                    )));
                }
                warnings.push(warning);
            }
        }
        Ok((config, warnings))
    }

    fn apply(&mut self, name: &str, value: String) -> std::result::Result<(), String> {
        let is = |key: &str| name.eq_ignore_ascii_case(key);
        if is(keys::TMP_DIRECTORY) {
            if value.is_empty() {
                return Err("tmpDirectory is empty".to_owned());
            }
            self.tmp_directory = Some(PathBuf::from(value));
        } else if is(keys::TRANSPORT_LOG_LEVEL) {
            self.transport_log_level = int_in(name, &value, 0, 6)? as u8;
        } else if is(keys::NFC_ACCEPT_TIMEOUT_MS) {
            self.nfc_accept_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_REQUEST_TIMEOUT_MS) {
            self.nfc_request_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_READ_TIMEOUT_MS) {
            self.nfc_read_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_WRITE_TIMEOUT_MS) {
            self.nfc_write_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_FSSRVR_TIMEOUT_MS) {
            self.nfc_fssrvr_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_FSSRVR_WRITE_TIMEOUT_MS) {
            self.nfc_fssrvr_write_timeout_ms = timeout_ms(name, &value)?;
        } else if is(keys::NFC_LOG_LEVEL) {
            self.nfc_log_level = int_in(name, &value, 0, 4)? as u8;
        } else if is(keys::DISKLIB_ENABLE_CACHE) {
            self.enable_cache = boolean(name, &value)?;
        } else if is(keys::LINUX_SSL_VERIFY_CERTIFICATES) {
            self.linux_ssl_verify_certificates = boolean(name, &value)?;
        } else {
            self.extra.push((name.to_owned(), value));
        }
        Ok(())
    }
}

/// Unquotes a value and strips a trailing `# comment`.
fn parse_value(rest: &str) -> std::result::Result<String, String> {
    if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted
            .find('"')
            .ok_or_else(|| "unterminated quoted value (missing closing `\"`)".to_owned())?;
        let after = quoted[close + 1..].trim();
        if !(after.is_empty() || after.starts_with('#')) {
            return Err(format!("unexpected text {after:?} after the quoted value"));
        }
        Ok(quoted[..close].to_owned())
    } else {
        let value = match rest.find('#') {
            Some(hash) => &rest[..hash],
            None => rest,
        };
        Ok(value.trim().to_owned())
    }
}

fn int_in(name: &str, value: &str, min: u64, max: u64) -> std::result::Result<u64, String> {
    let n: u64 = value.parse().map_err(|_| {
        format!("{name} must be a whole number from {min} to {max}, found {value:?}")
    })?;
    if n < min || n > max {
        return Err(format!("{name} must be from {min} to {max}, found {n}"));
    }
    Ok(n)
}

fn timeout_ms(name: &str, value: &str) -> std::result::Result<u32, String> {
    int_in(name, value, 0, u64::from(MAX_TIMEOUT_MS)).map(|n| n as u32)
}

fn boolean(name: &str, value: &str) -> std::result::Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("{name} must be 0 (off) or 1 (on), found {value:?}")),
    }
}

impl FromStr for Config {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Config::check(s, ConfigCheck::Lenient).map(|(config, _)| config)
    }
}

impl fmt::Display for Config {
    /// Writes every documented key (defaults included, so the file says what is in force) and
    /// the uninterpreted keys, in a form [`Config::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(dir) = &self.tmp_directory {
            writeln!(f, "{} = \"{}\"", keys::TMP_DIRECTORY, dir.display())?;
        }
        writeln!(
            f,
            "{} = {}",
            keys::TRANSPORT_LOG_LEVEL,
            self.transport_log_level
        )?;
        for (key, ms) in [
            (keys::NFC_ACCEPT_TIMEOUT_MS, self.nfc_accept_timeout_ms),
            (keys::NFC_REQUEST_TIMEOUT_MS, self.nfc_request_timeout_ms),
            (keys::NFC_READ_TIMEOUT_MS, self.nfc_read_timeout_ms),
            (keys::NFC_WRITE_TIMEOUT_MS, self.nfc_write_timeout_ms),
            (keys::NFC_FSSRVR_TIMEOUT_MS, self.nfc_fssrvr_timeout_ms),
            (
                keys::NFC_FSSRVR_WRITE_TIMEOUT_MS,
                self.nfc_fssrvr_write_timeout_ms,
            ),
        ] {
            writeln!(f, "{key} = {ms}")?;
        }
        writeln!(f, "{} = {}", keys::NFC_LOG_LEVEL, self.nfc_log_level)?;
        writeln!(
            f,
            "{} = {}",
            keys::DISKLIB_ENABLE_CACHE,
            u8::from(self.enable_cache)
        )?;
        writeln!(
            f,
            "{} = {}",
            keys::LINUX_SSL_VERIFY_CERTIFICATES,
            u8::from(self.linux_ssl_verify_certificates)
        )?;
        for (key, value) in &self.extra {
            writeln!(f, "{key} = \"{value}\"")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = r#"
# log level 0 to 6 for quiet ranging to verbose
vixDiskLib.transport.LogLevel = 6
# disable caching to disk
vixDiskLib.disklib.EnableCache = 0
# whether to check SSL thumbprint on Linux
vixDiskLib.linuxSSL.verifyCertificates = 1
# network file copy options
vixDiskLib.nfc.AcceptTimeoutMs = 180000
vixDiskLib.nfc.RequestTimeoutMs = 180000
vixDiskLib.nfc.ReadTimeoutMs = 60000
vixDiskLib.nfc.WriteTimeoutMs = 600000
vixDiskLib.nfcFssrvr.TimeoutMs = 0
vixDiskLib.nfcFssrvrWrite.TimeoutMs = 0
# nfc.LogLevel (0 = none, 1 = Error, 2 = Warning, 3 = Info, 4 = Debug)
vixDiskLib.nfc.LogLevel = 2
tmpDirectory = "/var/tmp/vddk logs"
"#;

    #[test]
    fn parses_the_guides_sample() {
        let c: Config = SAMPLE.parse().unwrap();
        assert_eq!(c.transport_log_level, 6);
        assert!(!c.enable_cache);
        assert!(c.linux_ssl_verify_certificates);
        assert_eq!(c.nfc_accept_timeout(), Some(Duration::from_secs(180)));
        assert_eq!(c.nfc_request_timeout_ms, 180_000);
        assert_eq!(c.nfc_read_timeout_ms, 60_000);
        assert_eq!(c.nfc_write_timeout_ms, 600_000);
        assert_eq!(c.nfc_fssrvr_timeout(), None);
        assert_eq!(c.nfc_fssrvr_write_timeout(), None);
        assert_eq!(c.nfc_log_level(), NfcLogLevel::Warning);
        assert_eq!(
            c.tmp_directory.as_deref(),
            Some(Path::new("/var/tmp/vddk logs"))
        );
        assert!(c.extra.is_empty());
        assert_eq!(c.to_string().parse::<Config>().unwrap(), c);
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c: Config = "\n# nothing\n".parse().unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.transport_log_level, 6);
        assert_eq!(c.nfc_log_level(), NfcLogLevel::Error);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("vixDiskLib.transport.LogLevel = 7", 1, "from 0 to 6"),
            ("\n\nvixDiskLib.nfc.LogLevel = -1", 3, "whole number"),
            ("vixDiskLib.nfc.ReadTimeoutMs = 2147483649", 1, "2147483648"),
            (
                "vixDiskLib.disklib.EnableCache = maybe",
                1,
                "0 (off) or 1 (on)",
            ),
            ("just words", 1, "name = value"),
            ("= 3", 1, "missing name"),
            ("tmpDirectory = \"/tmp", 1, "unterminated"),
            ("tmpDirectory = \"/tmp\" junk", 1, "unexpected text"),
            ("a = 1\nA = 2", 2, "first on line 1"),
        ];
        for (text, line, needle) in cases {
            match text.parse::<Config>() {
                Err(Error::Config {
                    line: l, message, ..
                }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
                other => panic!("{text:?}: unexpected {other:?}"),
            }
        }
        assert!(MAX_TIMEOUT_MS.to_string().parse::<u32>().is_ok());
        let max = format!("vixDiskLib.nfc.ReadTimeoutMs = {MAX_TIMEOUT_MS}");
        assert_eq!(
            max.parse::<Config>().unwrap().nfc_read_timeout_ms,
            MAX_TIMEOUT_MS
        );
    }

    #[test]
    fn unknown_keys_are_kept_and_names_are_case_insensitive() {
        let c: Config =
            "VIXDISKLIB.NFC.LOGLEVEL = 4\nvixDiskLib.nfcAio.Session.BufCount = 16 # tuned\n"
                .parse()
                .unwrap();
        assert_eq!(c.nfc_log_level, 4);
        assert_eq!(c.extra("vixdisklib.nfcaio.session.bufcount"), Some("16"));
        assert_eq!(c.to_string().parse::<Config>().unwrap(), c);
    }

    #[test]
    fn from_path_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vddk.conf");
        std::fs::write(&path, "vixDiskLib.nfc.LogLevel = 9\n").unwrap();
        let err = Config::from_path(&path).unwrap_err().to_string();
        assert!(err.contains("vddk.conf:1"), "{err}");
        assert!(Config::from_path(dir.path().join("missing")).is_err());
    }

    #[test]
    fn unknown_keys_warn_with_the_nearest_known_key_or_fail_when_strict() {
        let text = "vixDiskLib.nfc.LogLevel = 2\n\
                    vixDiskLib.nfc.ReadTimoutMs = 60000\n\
                    vixdisklib.NFCAIO.session.bufcount = 16\n\
                    standin.fileDisks = 1\n\
                    vendor.newFeature.Enabled = 1\n";
        let (config, warnings) = Config::check(text, ConfigCheck::Lenient).unwrap();
        assert_eq!(config.nfc_log_level, 2);
        // Unknown keys still reach VDDK: they stay in `extra`, in order.
        assert_eq!(config.extra("vixDiskLib.nfc.ReadTimoutMs"), Some("60000"));
        assert_eq!(config.extra("vendor.newFeature.Enabled"), Some("1"));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(
            (warnings[0].line, warnings[0].key.as_str()),
            (2, "vixDiskLib.nfc.ReadTimoutMs")
        );
        assert_eq!(warnings[0].suggestion, Some(keys::NFC_READ_TIMEOUT_MS));
        assert_eq!(
            warnings[0].to_string(),
            "line 2: unknown key vixDiskLib.nfc.ReadTimoutMs; did you mean \
             vixDiskLib.nfc.ReadTimeoutMs?"
        );
        assert_eq!((warnings[1].line, warnings[1].suggestion), (5, None));
        assert!(warnings[1]
            .to_string()
            .contains("passed to VDDK as written"));

        match Config::check(text, ConfigCheck::Strict) {
            Err(Error::Config {
                line: 2, message, ..
            }) => {
                assert!(
                    message.contains("did you mean vixDiskLib.nfc.ReadTimeoutMs?"),
                    "{message}"
                );
                assert!(message.contains("strict"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Known, documented, uninterpreted and stand-in keys pass strict checking.
        let known =
            "vixDiskLib.nfc.ReadTimeoutMs = 1\nvixDiskLib.nfcAio.Session.BufSizeIn64KB = 32\n\
                     STANDIN.password = x\n";
        assert!(Config::check(known, ConfigCheck::Strict)
            .unwrap()
            .1
            .is_empty());
    }

    #[test]
    fn check_path_names_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vddk.conf");
        std::fs::write(&path, "# tuned\nvixDiskLib.transport.LogLevel = 9\n").unwrap();
        let err = Config::check_path(&path, ConfigCheck::Lenient)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vddk.conf:2"), "{err}");
        assert!(err.contains("vixDiskLib.transport.LogLevel"), "{err}");
        std::fs::write(&path, "vixDiskLib.nfc.AcceptTimoutMs = 5\n").unwrap();
        let (_, warnings) = Config::check_path(&path, ConfigCheck::Lenient).unwrap();
        assert!(
            warnings[0]
                .to_string()
                .starts_with(&format!("{}:1: ", path.display())),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn nearest_keys_are_only_suggested_when_close() {
        assert_eq!(
            nearest_known_key("vixDiskLib.transport.LogLvl"),
            Some(keys::TRANSPORT_LOG_LEVEL)
        );
        assert_eq!(nearest_known_key("TMPDIRECTRY"), Some(keys::TMP_DIRECTORY));
        assert_eq!(nearest_known_key("colour"), None);
        assert_eq!(nearest_known_key(""), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    fn arb_config() -> impl Strategy<Value = Config> {
        let extra_key = "[a-zA-Z][a-zA-Z0-9._]{0,30}".prop_filter("not a known key", |k| {
            !keys::ALL.iter().any(|known| known.eq_ignore_ascii_case(k))
        });
        (
            proptest::option::of("/[a-zA-Z0-9_ ./-]{0,30}[a-zA-Z0-9_./-]"),
            0u8..=6,
            proptest::array::uniform6(0u32..=MAX_TIMEOUT_MS),
            0u8..=4,
            any::<bool>(),
            any::<bool>(),
            proptest::collection::btree_map(extra_key, "[a-zA-Z0-9_./:-]{0,20}", 0..4),
        )
            .prop_map(|(dir, tl, t, nl, cache, ssl, extra)| Config {
                tmp_directory: dir.map(PathBuf::from),
                transport_log_level: tl,
                nfc_accept_timeout_ms: t[0],
                nfc_request_timeout_ms: t[1],
                nfc_read_timeout_ms: t[2],
                nfc_write_timeout_ms: t[3],
                nfc_fssrvr_timeout_ms: t[4],
                nfc_fssrvr_write_timeout_ms: t[5],
                nfc_log_level: nl,
                enable_cache: cache,
                linux_ssl_verify_certificates: ssl,
                // Names are case-insensitive: keep one spelling per folded name.
                extra: {
                    let mut seen = std::collections::HashSet::new();
                    extra
                        .into_iter()
                        .filter(|(k, _)| seen.insert(k.to_ascii_lowercase()))
                        .collect()
                },
            })
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errors_without_panicking(text in "\\PC*") {
            let _ = text.parse::<Config>();
        }

        #[test]
        fn config_like_text_never_panics(
            lines in proptest::collection::vec(
                "(#.*|[a-zA-Z.]{0,40} *= *\"?[0-9a-z/ -]{0,12}\"? *(#.*)?|.{0,20})", 0..12)
        ) {
            let text = lines.join("\n");
            if let Err(Error::Config { line, .. }) = text.parse::<Config>() {
                prop_assert!(line >= 1 && line <= lines.len().max(1));
            }
        }

        #[test]
        fn check_agrees_with_parse_and_strict_fails_exactly_on_warnings(
            lines in proptest::collection::vec(
                "([a-zA-Z.]{1,40}|vixDiskLib\\.nfc\\.[A-Za-z]{4,16}) = [0-9]{1,3}", 0..8)
        ) {
            let text = lines.join("\n");
            let parsed = text.parse::<Config>();
            match Config::check(&text, ConfigCheck::Lenient) {
                Ok((config, warnings)) => {
                    prop_assert_eq!(parsed.ok(), Some(config));
                    for w in &warnings {
                        prop_assert!(w.line >= 1 && w.line <= lines.len());
                        prop_assert!(!is_known_key(&w.key));
                    }
                    prop_assert_eq!(
                        Config::check(&text, ConfigCheck::Strict).is_ok(),
                        warnings.is_empty()
                    );
                }
                Err(_) => prop_assert!(parsed.is_err()),
            }
        }

        #[test]
        fn display_round_trips(config in arb_config()) {
            let text = config.to_string();
            prop_assert_eq!(text.parse::<Config>().unwrap(), config);
        }
    }
}
