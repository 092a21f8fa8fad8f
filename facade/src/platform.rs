//! `Platform`: detect the hypervisor once, then hand out the backends that fit it.

use std::fmt;
#[cfg(feature = "stats")]
use std::path::Path;
use std::path::PathBuf;
use std::str::FromStr;

#[cfg(feature = "stats")]
use guest_stats::GuestStats;

#[cfg(feature = "stats")]
use crate::detect::Hypervisor;
use crate::detect::{Detection, Detector};
use crate::error::{Error, Result};

/// Which family of backends to hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BackendChoice {
    /// The real backends that fit the detected hypervisor.
    #[default]
    Auto,
    /// The in-memory fakes, whatever the machine: for demos and for users' tests.
    Fake,
}

impl BackendChoice {
    /// The environment variable that overrides the default choice.
    pub const ENV: &'static str = "VMSDK_BACKEND";

    /// The choice named by `VMSDK_BACKEND`, or `Auto` when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV) {
            Ok(word) if !word.is_empty() => word.parse(),
            _ => Ok(Self::Auto),
        }
    }
}

impl FromStr for BackendChoice {
    type Err = Error;

    fn from_str(word: &str) -> Result<Self> {
        match word {
            "auto" => Ok(Self::Auto),
            "fake" => Ok(Self::Fake),
            other => Err(Error::UnknownBackend(other.to_owned())),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fake => "fake",
        })
    }
}

/// The machine as the SDK sees it: what runs it, and which backends to use.
///
/// ```
/// use vmsdk::{BackendChoice, Platform};
///
/// let platform = Platform::builder().backend(BackendChoice::Fake).build()?;
/// # #[cfg(feature = "stats")] {
/// let mut stats = platform.guest_stats()?;
/// stats.update()?;
/// println!("stolen: {} ms", stats.cpu_stolen_ms()?);
/// # }
/// # Ok::<(), vmsdk::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Platform {
    detection: Detection,
    backend: BackendChoice,
    root: PathBuf,
}

/// Builds a [`Platform`] with a chosen backend family and filesystem root.
#[derive(Debug, Clone, Default)]
pub struct PlatformBuilder {
    backend: Option<BackendChoice>,
    root: Option<PathBuf>,
}

impl PlatformBuilder {
    /// Uses `backend` instead of `VMSDK_BACKEND`.
    pub fn backend(mut self, backend: BackendChoice) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Reads `/proc`, `/sys`, ... under `root` for detection and the Linux backend.
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Detects the hypervisor and container and settles the backend choice.
    pub fn build(self) -> Result<Platform> {
        let backend = match self.backend {
            Some(choice) => choice,
            None => BackendChoice::from_env()?,
        };
        let (detection, root) = match self.root {
            Some(root) => {
                let detector =
                    Detector::new()
                        .with_root(&root)
                        .map_err(|source| Error::CpuidRecording {
                            root: root.clone(),
                            source,
                        })?;
                (detector.detect(), root)
            }
            None => (Detector::new().detect(), PathBuf::from("/")),
        };
        Ok(Platform {
            detection,
            backend,
            root,
        })
    }
}

impl Platform {
    /// Detects this machine, taking the backend choice from `VMSDK_BACKEND` (default `auto`).
    pub fn detect() -> Result<Self> {
        Self::builder().build()
    }

    /// A builder for a platform with explicit choices.
    pub fn builder() -> PlatformBuilder {
        PlatformBuilder::default()
    }

    /// What detection found, with its evidence.
    pub fn detection(&self) -> &Detection {
        &self.detection
    }

    /// The backend family in use.
    pub fn backend(&self) -> BackendChoice {
        self.backend
    }

    /// The filesystem root detection and the Linux backend read `/proc`, `/sys`, ... under.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The guest statistics backend for this machine: the VMware backdoor on VMware, the Linux
    /// backend on every other Linux guest, the scripted fake with [`BackendChoice::Fake`].
    ///
    /// The calls are blocking but short (a few small procfs reads, or one backdoor call), so an
    /// async program may call them on a task at its sampling interval.
    #[cfg(feature = "stats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
    pub fn guest_stats(&self) -> Result<Box<dyn GuestStats>> {
        if self.backend == BackendChoice::Fake {
            return Ok(Box::new(guest_stats::fake::FakeGuestStats::example()));
        }
        stats_backend(self.detection.vm, &self.root)
    }
}

#[cfg(feature = "stats")]
fn stats_backend(vm: Option<Hypervisor>, root: &Path) -> Result<Box<dyn GuestStats>> {
    if vm == Some(Hypervisor::Vmware) && root == Path::new("/") {
        // The backdoor needs I/O privilege (root and iopl); without it the Linux backend still
        // tells what procfs knows, which beats failing a monitoring agent outright.
        // Workstation and Fusion answer the backdoor but have no guestlib: their first update
        // says NotEnabled, and procfs is then the better source.
        match guest_stats::vmware::VmwareGuestStats::open() {
            Ok(mut stats) => match stats.update() {
                Err(error @ guest_stats::Error::NotEnabled) => warn_fallback(&error),
                _ => return Ok(Box::new(stats)),
            },
            Err(error) => warn_fallback(&error),
        }
    }
    let linux = guest_stats::linux::LinuxGuestStats::with_root(root);
    if linux.is_available() {
        return Ok(Box::new(linux));
    }
    Err(Error::NoStatsBackend {
        what: vm.map_or_else(|| "bare metal".to_owned(), |h| h.to_string()),
        root: root.to_owned(),
    })
}

/// Logs why the VMware backend was passed over, for whoever collects the program's traces.
#[cfg(feature = "stats")]
fn warn_fallback(error: &guest_stats::Error) {
    tracing::warn!(%error, "VMware backdoor unavailable; using the Linux statistics backend");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_words_parse_and_print() {
        assert_eq!(
            "fake".parse::<BackendChoice>().unwrap(),
            BackendChoice::Fake
        );
        assert_eq!(BackendChoice::Auto.to_string(), "auto");
        let err = "vmware".parse::<BackendChoice>().unwrap_err();
        assert!(err.to_string().contains("expected `auto` or `fake`"));
    }

    #[cfg(feature = "stats")]
    #[test]
    fn fake_platform_hands_out_the_fake_stats() {
        let platform = Platform::builder()
            .backend(BackendChoice::Fake)
            .build()
            .unwrap();
        let mut stats = platform.guest_stats().unwrap();
        assert_eq!(stats.backend(), "fake");
        stats.update().unwrap();
        assert!(stats.snapshot().unwrap().available().count() > 10);
    }
}
