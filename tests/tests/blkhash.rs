//! Block hashes against nbdcopy 1.24.4's `--blkhash` (libnbd from Debian unstable, in the
//! Debian 13 peer root): `vmsdk disk checksum` and `vmsdk disk copy --blkhash` must print the
//! same digests for random, half-sparse and odd-sized disks, from files, qemu-nbd and nbdkit
//! (`data`, `pattern`, `sparse-random`), for every algorithm and a few block sizes. The NBD
//! servers come from each peer generation in turn; nbdcopy 1.24 runs in the root and reaches
//! them through their Unix sockets.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vmsdk_tests::disk::{nbd_tool, random_bytes, NbdServer};
use vmsdk_tests::peers::{announce, for_each_generation, Generation};

const MIB: u64 = 1 << 20;

/// `nbdcopy-1.24 --blkhash=SPEC SOURCE null:` in the Debian 13 root.
fn nbdcopy_blkhash(source: &str, spec: &str) -> Option<String> {
    let command = nbd_tool(Generation::Trixie, "nbdcopy-1.24")?;
    let out = command
        .arg(format!("--blkhash={spec}"))
        .arg(source)
        .arg("null:")
        .output();
    vmsdk_tests::assert_success(&out, format_args!("nbdcopy --blkhash={spec} {source}"));
    Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
}

fn vmsdk(args: &[&str]) -> Option<String> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    let out = Command::new(binary).args(args).output().unwrap();
    vmsdk_tests::assert_success(&out, format_args!("vmsdk {args:?}"));
    Some(String::from_utf8(out.stdout).unwrap())
}

fn vmsdk_checksum(uri: &str, spec: &str) -> Option<String> {
    Some(
        vmsdk(&["disk", "checksum", "--no-progress", "--blkhash", spec, uri])?
            .trim()
            .to_owned(),
    )
}

/// Disk images: random, half-sparse (random first half, a hole after, a little data at the
/// end), odd-sized (not a multiple of 512 or of any block size).
fn images(dir: &Path) -> Vec<std::path::PathBuf> {
    let random = dir.join("random.img");
    std::fs::write(&random, random_bytes(16 * MIB as usize, 1)).unwrap();
    let half = dir.join("half.img");
    let file = std::fs::File::create(&half).unwrap();
    file.set_len(32 * MIB).unwrap();
    file.write_all_at(&random_bytes(16 * MIB as usize, 2), 0)
        .unwrap();
    file.write_all_at(&random_bytes(5000, 3), 30 * MIB + 4096)
        .unwrap();
    let odd = dir.join("odd.img");
    let mut data = random_bytes(3 * MIB as usize + 12_345, 4);
    data[MIB as usize..2 * MIB as usize].fill(0);
    std::fs::write(&odd, data).unwrap();
    vec![random, half, odd]
}

const SPECS: [&str; 6] = ["sha256", "md5", "sha1", "sha512", "sha256/4k", "md5/1M"];

#[test]
fn files_hash_as_nbdcopy_1_24_hashes_them() {
    announce(Generation::Trixie, &["nbdcopy-1.24"]);
    let dir = tempfile::tempdir().unwrap();
    for image in images(dir.path()) {
        let path = image.to_str().unwrap();
        for spec in SPECS {
            let Some(expected) = nbdcopy_blkhash(path, spec) else {
                return;
            };
            assert_eq!(
                vmsdk_checksum(path, spec).unwrap(),
                expected,
                "{spec} of {path}"
            );
        }
        eprintln!("{path}: equal to nbdcopy 1.24.4 for {SPECS:?}");
    }
}

#[test]
fn nbd_exports_hash_as_nbdcopy_1_24_hashes_them() {
    announce(Generation::Trixie, &["nbdcopy-1.24"]);
    for_each_generation(&["qemu-nbd", "nbdkit"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let imgs = images(dir.path());
        let mut servers = Vec::new();
        // qemu-nbd serves the sizes that are multiples of 512; nbdkit's file plugin the odd one.
        for image in &imgs[..2] {
            let Some(s) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", image.to_str().unwrap()])
            else {
                return;
            };
            servers.push(s);
        }
        let plugins: [&[&str]; 4] = [
            &["-r", "file", imgs[2].to_str().unwrap()],
            &["data", "\"12345678\"*512*256 @0x500000 \"tail\"", "size=7M"],
            &["pattern", "size=24M"],
            &[
                "sparse-random",
                "size=64M",
                "seed=42",
                "percent=20",
                "runlength=1048576",
            ],
        ];
        for args in plugins {
            let Some(s) = NbdServer::nbdkit_in(g, args) else {
                return;
            };
            servers.push(s);
        }
        for server in &servers {
            let uri = server.uri();
            for spec in ["sha256", "md5/4k", "sha512/1M"] {
                let Some(expected) = nbdcopy_blkhash(&uri, spec) else {
                    return;
                };
                let ours = vmsdk_checksum(&uri, spec).unwrap();
                assert_eq!(ours, expected, "{spec} of {uri} ({})", server.version());
            }
            eprintln!("{}: equal to nbdcopy 1.24.4", server.version());
        }
    });
}

#[test]
fn copy_prints_the_source_hash_and_the_copy_hashes_the_same() {
    announce(Generation::Trixie, &["nbdcopy-1.24"]);
    let dir = tempfile::tempdir().unwrap();
    let image = &images(dir.path())[1];
    let target = dir.path().join("copy.img");
    let hash_file = dir.path().join("hash.txt");
    let Some(expected) = nbdcopy_blkhash(image.to_str().unwrap(), "sha256") else {
        return;
    };
    let Some(out) = vmsdk(&[
        "disk",
        "copy",
        "--no-progress",
        "--blkhash",
        image.to_str().unwrap(),
        target.to_str().unwrap(),
    ]) else {
        return;
    };
    assert_eq!(out.lines().last(), Some(expected.as_str()), "{out}");
    // The copy hashes the same as the source; --blkhash-file takes the digest.
    let target2 = dir.path().join("copy2.img");
    vmsdk(&[
        "disk",
        "copy",
        "--no-progress",
        "--blkhash=md5/4k",
        "--blkhash-file",
        hash_file.to_str().unwrap(),
        target.to_str().unwrap(),
        target2.to_str().unwrap(),
    ])
    .unwrap();
    let written = std::fs::read_to_string(&hash_file).unwrap();
    assert_eq!(
        written.trim(),
        nbdcopy_blkhash(image.to_str().unwrap(), "md5/4k").unwrap()
    );
    assert_eq!(
        vmsdk_checksum(target2.to_str().unwrap(), "sha256").unwrap(),
        expected
    );
}
