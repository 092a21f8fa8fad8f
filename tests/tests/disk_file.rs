//! disk-transport's file backend on a real file system: extents agree with nbdkit's view of the
//! same file (nbdkit and nbdinfo of each peer generation), and O_DIRECT copies are exact.

use disk_transport::copy::{copy, CopyOptions};
use disk_transport::file::{FileDisk, FileOptions};
use disk_transport::{open_uri, Disk, Error, OpenFlags};
use vmsdk_tests::disk::{merge_map, nbdinfo_map_in, sha256_file, sparse_image, NbdServer};
use vmsdk_tests::peers::for_each_generation;

const MIB: u64 = 1 << 20;

#[test]
fn file_extents_match_nbdkit_file_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("sparse.img");
    sparse_image(
        &image,
        32 * MIB,
        &[
            (MIB, 4096),
            (9 * MIB, 2 * MIB as usize),
            (32 * MIB - 8192, 8192),
        ],
    );
    let disk = FileDisk::open(
        &image,
        &FileOptions {
            read_only: true,
            ..FileOptions::default()
        },
    )
    .unwrap();
    if !disk.info().unwrap().can_extents {
        eprintln!("SKIPPED: this file system has no SEEK_DATA/SEEK_HOLE");
        return;
    }
    let ours: Vec<(u64, u64, u32)> = disk
        .allocated_extents(0, 32 * MIB)
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.length, e.kind.nbd_flags()))
        .collect();
    for_each_generation(&["nbdkit", "nbdinfo"], |g| {
        let Some(server) = NbdServer::nbdkit_in(g, &["-r", "file", image.to_str().unwrap()]) else {
            return;
        };
        let Some(theirs) = nbdinfo_map_in(g, &server.uri(), None) else {
            return;
        };
        assert_eq!(ours, merge_map(&theirs), "{g}");
    });
}

#[test]
fn direct_io_copy_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.img");
    let dst_path = dir.path().join("dst.img");
    sparse_image(
        &src_path,
        16 * MIB,
        &[
            (0, 65536),
            (5 * MIB + 4096, 300_000),
            (15 * MIB, MIB as usize),
        ],
    );
    drop(FileDisk::create(&dst_path, 16 * MIB).unwrap());
    let direct = |path: &std::path::Path, read_only: bool| {
        FileDisk::open(
            path,
            &FileOptions {
                read_only,
                direct: true,
                create_size: None,
            },
        )
    };
    let src = match direct(&src_path, true) {
        Ok(d) => d,
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIPPED: this file system does not support O_DIRECT");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dst = direct(&dst_path, false).unwrap();
    assert_eq!(dst.info().unwrap().min_block_size, 4096);
    // An odd request size is rounded to the O_DIRECT alignment by the engine.
    let options = CopyOptions::default()
        .request_size(100_000)
        .destination_is_zero(true);
    copy(&src, &dst, &options, &mut |_| {}).unwrap();
    drop(dst);
    assert_eq!(sha256_file(&src_path), sha256_file(&dst_path));
    // Unaligned I/O is refused with the rule that demands alignment.
    let err = src.read_at(&mut [0u8; 100], 10).unwrap_err();
    assert!(err.to_string().contains("O_DIRECT"), "{err}");
}

#[test]
fn file_uris_open_read_only_and_read_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    sparse_image(&path, MIB, &[(4096, 100)]);
    let uri = format!("file://{}", path.display());
    let ro = open_uri(&uri, OpenFlags::read_only()).unwrap();
    assert!(ro.info().unwrap().read_only);
    assert!(matches!(ro.write_at(b"x", 0), Err(Error::ReadOnly(_))));
    let rw = open_uri(path.to_str().unwrap(), OpenFlags::read_write()).unwrap();
    rw.write_at(b"hello", 0).unwrap();
    rw.flush().unwrap();
    let mut buf = [0u8; 5];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello");
}
