//! Finding and initialising the library: clear errors for a missing library, a library that is
//! not VDDK, an unreadable configuration file and a failing InitEx — and a clean retry after.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use std::path::PathBuf;

use disk_transport::vddk::{self, candidate_paths, VddkOptions, VddkTransport, DEFAULT_LIBDIRS};
use disk_transport::Error;
use vddk_support::{count, Fixture};

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
            assert_eq!(message, "stand-in: Authentication failed (VixError 35)");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(vddk::loaded_library().is_none());

    // 6. With a good configuration the next attempt initialises the library.
    let good = Fixture::new("");
    let vddk = VddkTransport::new(&good.options()).unwrap();
    assert_eq!(vddk.library().version, Some(8));
    assert_eq!(
        count(&good.stats()["calls"]["VixDiskLib_ListTransportModes"]),
        1
    );
}
