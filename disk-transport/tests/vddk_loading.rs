//! Finding and initialising the library: clear errors for a missing library, a library that is
//! not VDDK, an unreadable configuration file and a failing InitEx — and a clean retry after.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use std::path::PathBuf;

use disk_transport::vddk::{
    self, candidate_paths, LogLevel, VddkOptions, VddkTransport, DEFAULT_LIBDIRS,
};
use disk_transport::{ConnectParams, DiskTransport, Error};
use vddk_support::{count, logs, Fixture, PASSWORD};

/// The C library this process runs with, found in its own memory map.
fn libc_path() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(PathBuf::from)
        .expect("libc in /proc/self/maps")
}

// One test, because the steps share the process-wide library state and must run in order.
#[test]
fn loading_errors_then_a_successful_retry() {
    // 1. Nothing there: every path tried is named.
    let empty = tempfile::tempdir().unwrap();
    let err = VddkTransport::new(&VddkOptions::new().libdir(empty.path())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    for (path, _) in candidate_paths(empty.path()) {
        assert!(
            text.contains(&format!("{} (absent)", path.display())),
            "{text}"
        );
    }
    assert!(text.contains("LD_LIBRARY_PATH"), "{text}");

    // Default locations are searched when no libdir is given (none exists on a test machine).
    if DEFAULT_LIBDIRS
        .iter()
        .all(|d| !std::path::Path::new(d).exists())
    {
        let text = VddkTransport::new(&VddkOptions::new())
            .unwrap_err()
            .to_string();
        for dir in DEFAULT_LIBDIRS {
            assert!(
                text.contains(&format!("{dir}/lib64/libvixDiskLib.so.9 (absent)")),
                "{text}"
            );
        }
    }

    // 2. A library that is not VDDK.
    let impostor = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(libc_path(), impostor.path().join("libvixDiskLib.so.7")).unwrap();
    let text = VddkTransport::new(&VddkOptions::new().libdir(impostor.path()))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("not a usable VDDK: it has no VixDiskLib_InitEx"),
        "{text}"
    );

    // 3. A file that is not a library at all: dlopen's reason is kept.
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(
        garbage.path().join("libvixDiskLib.so.9"),
        b"not an ELF file",
    )
    .unwrap();
    let text = VddkTransport::new(&VddkOptions::new().libdir(garbage.path()))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("libvixDiskLib.so.9 (dlopen failed:"),
        "{text}"
    );

    // 4. A configuration file that does not exist.
    let fixture = Fixture::new("standin.failInitEx = 35\n");
    let err = VddkTransport::new(
        &fixture
            .options()
            .config_path(fixture.libdir.join("nope.conf")),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.conf"), "{err}");

    // 4b. A malformed configuration is refused before anything is loaded: the error names the
    // file, the line and the key, and the stand-in never ran InitEx (it wrote no counters).
    let bad = Fixture::new("vixDiskLib.transport.LogLevel = 9\n");
    let err = VddkTransport::new(&bad.options()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Config { line: 7, .. }), "{err:?}");
    assert!(
        text.contains(&format!("{}:7:", bad.config.display()))
            && text.contains("vixDiskLib.transport.LogLevel must be from 0 to 6, found 9"),
        "{text}"
    );
    let no_equals = Fixture::new("vixDiskLib.nfc.LogLevel 2\n");
    let text = VddkTransport::new(&no_equals.options())
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("vddk.conf:7: expected `name = value`"),
        "{text}"
    );

    // 4c. A misspelt key is an error under strict checking, naming the key it resembles.
    let misspelt = Fixture::new("vixDiskLib.nfc.ReadTimoutMs = 60000\n");
    let text = VddkTransport::new(&misspelt.options().strict_config(true))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("vddk.conf:7: unknown key vixDiskLib.nfc.ReadTimoutMs; did you mean vixDiskLib.nfc.ReadTimeoutMs?"),
        "{text}"
    );
    for fixture in [&bad, &no_equals, &misspelt] {
        assert!(
            !fixture.stats.exists(),
            "InitEx ran on a refused configuration"
        );
    }
    assert!(vddk::loaded_library().is_none());

    // 5. InitEx itself fails: its VixError and text come back, and nothing stays initialised.
    let err = VddkTransport::new(&fixture.options()).unwrap_err();
    match &err {
        Error::Vix {
            function,
            code,
            message,
        } => {
            assert_eq!(function, "VixDiskLib_InitEx");
            assert_eq!(*code, 35);
            assert_eq!(message, "stand-in: Authentication failed");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(vddk::loaded_library().is_none());

    // 6. With a usable configuration the next attempt initialises the library. The misspelt
    // key is a warning through the log hook, naming the nearest known key, and still reaches
    // VDDK (a key newer than this crate keeps working); the stand-in's own keys are known.
    let good = Fixture::new(
        "vixDiskLib.nfc.ReadTimoutMs = 60000\n\
         standin.failPrepareForAccess = 13\n\
         standin.failCleanup = 1\n\
         standin.failConnectEx = 18000\n",
    );
    let vddk = VddkTransport::new(&good.options()).unwrap();
    assert_eq!(vddk.library().version, Some(8));
    let warnings: Vec<String> = logs()
        .lock()
        .unwrap()
        .iter()
        .filter(|(level, _)| *level == LogLevel::Warning)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(
        warnings,
        [format!(
            "InitEx configuration: {}:7: unknown key vixDiskLib.nfc.ReadTimoutMs; did you mean \
             vixDiskLib.nfc.ReadTimeoutMs?",
            good.config.display()
        )]
    );
    // The test noise of old is gone: no 8 KiB message unless a test asks for it.
    assert!(
        logs()
            .lock()
            .unwrap()
            .iter()
            .all(|(_, m)| !m.starts_with("long message")),
        "the stand-in logged its long test message without standin.logLongMessage"
    );

    // 7. The failure switches: a wrong password, a refused PrepareForAccess and Cleanup come
    // back with VDDK's code once and a hint where there is one.
    let params = |password: &str| {
        ConnectParams::builder()
            .server("vc.example")
            .user_password("admin", password)
            .vm("moref=vm-switch")
            .build()
            .unwrap()
    };
    let err = vddk.connect(&params("wrong")).unwrap_err();
    assert_eq!(err.vix_code(), Some(35));
    let text = err.to_string();
    assert_eq!(
        text,
        "VDDK VixDiskLib_ConnectEx failed: stand-in: Authentication failed (VixError 35); check \
         the user name with its SSO domain (administrator@vsphere.local, not administrator; root \
         for a standalone ESXi host) and the password"
    );
    let err = vddk
        .prepare_for_access(&params(PASSWORD), "backup")
        .unwrap_err();
    assert_eq!(err.vix_code(), Some(13), "{err}");
    assert!(err.to_string().contains("backup role"), "{err}");
    assert_eq!(
        vddk.cleanup(&params(PASSWORD)).unwrap_err().vix_code(),
        Some(1)
    );
    // The right password gets past the login check to the ConnectEx switch and its code.
    let err = vddk.connect(&params(PASSWORD)).unwrap_err();
    assert_eq!(err.vix_code(), Some(18000), "{err}");
    assert!(
        err.to_string()
            .starts_with("VDDK VixDiskLib_ConnectEx failed: "),
        "{err}"
    );
    let stats = good.stats();
    assert_eq!(count(&stats["calls"]["VixDiskLib_PrepareForAccess"]), 1);
    assert_eq!(count(&stats["calls"]["VixDiskLib_ConnectEx"]), 2);
    assert_eq!(stats["open_connections"], 0, "{stats}");
    assert!(stats["access"].as_object().unwrap().is_empty(), "{stats}");
    assert_eq!(
        count(&good.stats()["calls"]["VixDiskLib_ListTransportModes"]),
        1
    );
}
