//! The facade's error type: one type for every capability, so `?` works across them.

use std::path::PathBuf;

/// What can go wrong in the facade or in any capability it hands out.
///
/// Each capability's own error converts into it with `From`, so a function returning
/// [`vmsdk::Result`](Result) can use `?` on detection, statistics, the guest agent and disks
/// alike. The capability's error stays reachable for matching:
///
/// ```
/// # #[cfg(all(feature = "stats", feature = "disk"))]
/// # fn demo() -> vmsdk::Result<()> {
/// use vmsdk::disk::OpenFlags;
/// use vmsdk::{BackendChoice, Platform};
///
/// /// Statistics and a disk in one function, one error type.
/// fn report() -> vmsdk::Result<String> {
///     let platform = Platform::builder().backend(BackendChoice::Fake).build()?;
///     let mut stats = platform.guest_stats()?;
///     stats.update()?; // a guest_stats::Error
///     let disk = vmsdk::disk::open("mem://scratch?size=1M", OpenFlags::read_only())?;
///     Ok(format!("{} ms stolen, {} bytes", stats.cpu_stolen_ms()?, disk.info()?.capacity))
/// }
///
/// /// A copy's error converts too, keeping how far the copy got.
/// fn backup(src: &str, dst: &str) -> vmsdk::Result<u64> {
///     let src = vmsdk::disk::open(src, OpenFlags::read_only())?;
///     let dst = vmsdk::disk::open(std::path::Path::new(dst), OpenFlags::read_write())?;
///     let options = vmsdk::disk::copy::CopyOptions::default();
///     let report = vmsdk::disk::copy::copy(src.as_ref(), dst.as_ref(), &options, &mut |_| {})?;
///     Ok(report.progress.done)
/// }
///
/// let line = report()?;
/// match backup("mem://error-doc-src?size=2M", "/nonexistent-dir/backup.img") {
///     Err(vmsdk::Error::Disk(cause)) => println!("cannot open the destination: {cause}"),
///     other => panic!("expected a disk error, got {other:?}"),
/// }
/// let small = tempfile_path();
/// std::fs::write(&small, [0u8; 4096]).unwrap();
/// match backup("mem://error-doc-src?size=2M", &small) {
///     Err(vmsdk::Error::Copy(failed)) => assert!(
///         failed.to_string().starts_with("copy did not start: the copy destination is smaller"),
///         "{failed}"
///     ),
///     other => panic!("expected a copy error, got {other:?}"),
/// }
/// # std::fs::remove_file(&small).unwrap();
/// # fn tempfile_path() -> String {
/// #     std::env::temp_dir().join(format!("vmsdk-error-doc-{}.img", std::process::id())).display().to_string()
/// # }
/// assert!(line.ends_with("1048576 bytes"));
/// match vmsdk::disk::open("nbd://", OpenFlags::read_only()) {
///     Err(vmsdk::Error::Disk(cause)) => println!("the disk layer said: {cause}"),
///     other => panic!("expected a disk error, got {other:?}"),
/// }
/// # Ok(())
/// # }
/// # #[cfg(all(feature = "stats", feature = "disk"))]
/// # demo().unwrap();
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest statistics backend failed.
    #[cfg(feature = "stats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
    #[error(transparent)]
    GuestStats(#[from] guest_stats::Error),
    /// The guest agent client failed.
    #[cfg(feature = "agent")]
    #[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
    #[error(transparent)]
    Agent(#[from] qga_proto::Error),
    /// The QEMU monitor (QMP) client failed.
    #[cfg(feature = "qmp")]
    #[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
    #[error(transparent)]
    Qmp(#[from] qmp_proto::Error),
    /// A disk backend failed.
    #[cfg(feature = "disk")]
    #[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
    #[error(transparent)]
    Disk(#[from] disk_transport::Error),
    /// A copy, checksum or comparison of disks stopped: why, and how far it got
    /// ([`CopyError::report`](disk_transport::copy::CopyError::report)). Its message says
    /// both, e.g. `copy stopped after 1048576 of 4194304 bytes: injected read failure at
    /// offset 1048576`.
    #[cfg(feature = "disk")]
    #[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
    #[error(transparent)]
    Copy(#[from] disk_transport::copy::CopyError),
    /// A live backup, verification or restore failed.
    #[cfg(feature = "backup")]
    #[cfg_attr(docsrs, doc(cfg(feature = "backup")))]
    #[error(transparent)]
    Backup(#[from] live_backup::Error),
    /// This machine has no guest statistics backend.
    #[error(
        "no guest statistics backend for {what}: {}/proc/stat is not readable, and only Linux \
         guests and VMware VMs have one (choose BackendChoice::Fake, or set VMSDK_BACKEND=fake, \
         for the fake)",
        root.display().to_string().trim_end_matches('/')
    )]
    NoStatsBackend {
        /// What was detected (`bare metal`, `kvm`, ...).
        what: String,
        /// The filesystem root the Linux backend looked under.
        root: PathBuf,
    },
    /// `VMSDK_BACKEND` (or whatever string was parsed) names no backend.
    #[error("unknown backend `{0}` (expected `auto` or `fake`)")]
    UnknownBackend(String),
    /// A metric name prefix or label name that Prometheus would not accept, or a label that
    /// clashes with another.
    #[cfg(feature = "prometheus-client")]
    #[cfg_attr(docsrs, doc(cfg(feature = "prometheus-client")))]
    #[error("invalid Prometheus name `{name}`: {problem}")]
    InvalidMetricName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The Prometheus exporter cannot listen on its address.
    #[cfg(feature = "exporter")]
    #[cfg_attr(docsrs, doc(cfg(feature = "exporter")))]
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address, as resolved.
        addr: String,
        /// Why not.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A guest monitor was given guests it cannot tell apart or settings it cannot honour.
    #[cfg(feature = "agent")]
    #[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
    #[error("invalid guest monitor setting: {0}")]
    InvalidGuests(String),
    /// The guest monitor's polling thread could not be started.
    #[cfg(feature = "agent")]
    #[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
    #[error("cannot start the guest monitor's polling thread")]
    MonitorThread(#[source] std::io::Error),
    /// A fixture tree's CPUID recording could not be read.
    #[error("cannot read the CPUID recording under {}", root.display())]
    CpuidRecording {
        /// The root whose `cpuid` file is broken.
        root: PathBuf,
        /// What was wrong.
        source: crate::detect::ParseCpuidError,
    },
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
