//! Shared set-up of the VDDK tests: builds the stand-in `libvixDiskLib.so` (package
//! `vddk-standin`) with the same cargo, target directory and profile, lays it out like a VDDK
//! distribution (`<libdir>/lib64/libvixDiskLib.so.8`), writes an InitEx configuration file that
//! tells the stand-in where to publish its counters, and reads them back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use disk_transport::vddk::{LogLevel, VddkOptions, VddkTransport};

/// The built stand-in library. `VDDK_STANDIN_LIB` overrides the build (CI may prebuild it).
pub fn standin_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| match std::env::var_os("VDDK_STANDIN_LIB") {
            Some(path) => PathBuf::from(path),
            None => build_standin(false, None),
        })
        .clone()
}

/// The stand-in built with `VDDK_STANDIN_MINIMAL=1` (only the functions of VDDK 6.5), in its
/// own target directory next to this test's so the two builds do not replace each other's file.
pub fn minimal_standin_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // This test runs as <target>/<profile>/deps/<name>.
            let exe = std::env::current_exe().expect("test executable path");
            let target = exe
                .ancestors()
                .nth(3)
                .expect("the test runs inside a cargo target directory");
            build_standin(true, Some(&target.join("vddk-standin-minimal")))
        })
        .clone()
}

/// Runs `cargo build -p vddk-standin` with the same cargo and profile and returns the `.so`.
fn build_standin(minimal: bool, target_dir: Option<&Path>) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("vddk-standin/Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("-p")
        .arg("vddk-standin")
        .arg("--message-format=json-render-diagnostics");
    // Unset rather than "0" for the full build, as in a plain `cargo build`, so the two do not
    // make each other rerun the build script.
    if minimal {
        cmd.env("VDDK_STANDIN_MINIMAL", "1");
    } else {
        cmd.env_remove("VDDK_STANDIN_MINIMAL");
    }
    if let Some(dir) = target_dir {
        cmd.arg("--target-dir").arg(dir);
    }
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .expect("run cargo to build the vddk-standin library");
    assert!(
        out.status.success(),
        "building vddk-standin failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "vixDiskLib")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|p| p.extension().is_some_and(|e| e == "so"))
        .expect("cargo reported no libvixDiskLib.so for vddk-standin")
}

/// A directory laid out like an unpacked VDDK, holding the stand-in as `lib64/libvixDiskLib.so.8`,
/// and an InitEx configuration file. Kept for the life of the test process.
pub struct Fixture {
    pub libdir: PathBuf,
    pub config: PathBuf,
    pub stats: PathBuf,
    /// With [`with_datastores`](Self::with_datastores), `standin.datastoreDir`: remote disks
    /// `[ds] dir/disk.vmdk` are the files `ds/dir/disk.vmdk` here.
    pub datastores: PathBuf,
}

pub const PASSWORD: &str = "correct horse battery staple";

impl Fixture {
    pub fn new(extra_config: &str) -> Fixture {
        Fixture::with_library(&standin_library(), "libvixDiskLib.so.8", extra_config)
    }

    /// [`new`](Self::new) with `standin.datastoreDir` set to [`datastores`](Self::datastores):
    /// remote disks are files there (none exists until a test puts it there).
    pub fn with_datastores(extra_config: &str) -> Fixture {
        Fixture::build(&standin_library(), "libvixDiskLib.so.8", extra_config, true)
    }

    /// `library` laid out as `lib64/<soname>`.
    pub fn with_library(library: &Path, soname: &str, extra_config: &str) -> Fixture {
        Fixture::build(library, soname, extra_config, false)
    }

    fn build(library: &Path, soname: &str, extra_config: &str, with_datastores: bool) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("vddk-standin-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let lib64 = dir.join("lib64");
        std::fs::create_dir_all(&lib64).unwrap();
        std::os::unix::fs::symlink(library, lib64.join(soname)).unwrap();
        let stats = dir.join("stats.json");
        let config = dir.join("vddk.conf");
        let datastores = dir.join("datastores");
        std::fs::create_dir_all(&datastores).unwrap();
        std::fs::write(
            &config,
            format!(
                "# InitEx configuration for the stand-in\n\
                 vixDiskLib.nfc.LogLevel = 1\n\
                 standin.statsFile = \"{}\"\n\
                 standin.password = \"{PASSWORD}\"\n\
                 standin.logPassword = 1\n\
                 standin.delayUs = 200\n{extra_config}{}",
                stats.display(),
                if with_datastores {
                    format!("standin.datastoreDir = \"{}\"\n", datastores.display())
                } else {
                    String::new()
                }
            ),
        )
        .unwrap();
        Fixture {
            libdir: dir,
            config,
            stats,
            datastores,
        }
    }

    pub fn options(&self) -> VddkOptions {
        VddkOptions::new()
            .libdir(&self.libdir)
            .config_path(&self.config)
            .log_hook(|level, message| logs().lock().unwrap().push((level, message.to_owned())))
    }

    /// The stand-in's counters as last published.
    pub fn stats(&self) -> serde_json::Value {
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&self.stats) {
                if let Ok(v) = serde_json::from_str(&text) {
                    return v;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "the stand-in published no stats at {}",
            self.stats.display()
        );
    }

    /// Waits (up to 10 s) until `check` holds for the stats, for counters other tests running in
    /// parallel may briefly disturb; returns the last stats either way.
    pub fn eventually(&self, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            if check(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every message VDDK (the stand-in) logged through the hook, in order.
pub fn logs() -> &'static Mutex<Vec<(LogLevel, String)>> {
    static LOGS: OnceLock<Mutex<Vec<(LogLevel, String)>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

/// The process-wide fixture and transport (InitEx runs once per process).
pub fn shared() -> &'static (Fixture, Arc<VddkTransport>) {
    static SHARED: OnceLock<(Fixture, Arc<VddkTransport>)> = OnceLock::new();
    SHARED.get_or_init(|| {
        // The 10 000-character InitEx message tests the loader's truncation (opt-in).
        let fixture = Fixture::new("standin.logLongMessage = 1\n");
        let vddk = VddkTransport::new(&fixture.options()).expect("load the stand-in VDDK");
        (fixture, Arc::new(vddk))
    })
}

/// A counter of the stand-in's stats as u64 (0 when absent).
pub fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
