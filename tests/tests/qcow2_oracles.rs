//! The qcow2 backend against QEMU's own tools of both peer generations (qemu-img/qemu-io 7.2
//! on the machine, 10.0 in the Debian 13 root): every image we write passes `qemu-img check`
//! (exit 0: no corruption, no leaked clusters) and compares equal with `qemu-img compare`; our
//! extents equal `qemu-img map --output=json`; images qemu-img made (backing chains, cluster
//! sizes 4 KiB to 2 MiB, zero and discarded clusters, compressed clusters) read byte-exact.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use disk_transport::memory::MemoryDisk;
use disk_transport::qcow2::{BackingFormat, CreateOptions, MapEntry, Qcow2Disk};
use disk_transport::{factory, Disk, Error, OpenFlags};
use proptest::prelude::*;
use serde_json::Value;
use vmsdk_tests::disk::random_bytes;
use vmsdk_tests::peers::{for_each_generation, Generation};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Runs qemu-img (or qemu-io) of `g`; returns (stdout, stderr, exit code).
fn run(g: Generation, program: &str, args: &[&str]) -> (String, String, i32) {
    let out = g
        .command(program, "qemu-utils")
        .expect("qemu-utils is there: for_each_generation checked")
        .args(args)
        .output();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn qemu_img_ok(g: Generation, args: &[&str]) -> String {
    let (out, err, code) = run(g, "qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?} ({g}): {out}{err}");
    out
}

fn qemu_io(g: Generation, image: &Path, commands: &[String]) {
    let mut args = vec!["-f".to_owned(), "qcow2".to_owned()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.to_str().unwrap().to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, err, code) = run(g, "qemu-io", &args);
    assert!(
        code == 0 && !out.contains("failed") && !err.contains("failed"),
        "qemu-io {args:?}: {out}{err}"
    );
}

/// `qemu-img check` exits 0: no corruption and no leaked cluster.
fn check(g: Generation, image: &Path) {
    let (out, err, code) = run(
        g,
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
    assert_eq!(
        code,
        0,
        "qemu-img check {} ({g}): {out}{err}",
        image.display()
    );
}

/// `qemu-img compare` of a qcow2 image (with its chain) and a raw one exits 0.
fn compare_with_raw(g: Generation, image: &Path, raw: &Path) {
    let (out, err, code) = run(
        g,
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "qemu-img compare ({g}): {out}{err}");
}

/// One map run as both tools give it: start, length, depth, present, zero, data, offset.
type Run = (u64, u64, u64, bool, bool, bool, Option<u64>);

/// The fields both maps share, merged again: qemu-img reports a data cluster over a hole of
/// the host file as zero too, and only 8.2 and later print `compressed`.
fn normalise(entries: Vec<Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (start, length, depth, present, zero, data, offset) in entries {
        let zero = zero && !data;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.6, offset) {
                (Some(a), Some(b)) => a + last.1 == b,
                (None, None) => true,
                _ => false,
            };
            if last.0 + last.1 == start
                && (last.2, last.3, last.4, last.5) == (depth, present, zero, data)
                && contiguous
            {
                last.1 += length;
                continue;
            }
        }
        out.push((start, length, depth, present, zero, data, offset));
    }
    out
}

fn qemu_map(g: Generation, image: &Path) -> Vec<Run> {
    let out = qemu_img_ok(
        g,
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
        ],
    );
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    normalise(
        entries
            .iter()
            .map(|e| {
                let data = e["data"].as_bool().unwrap();
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["present"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                    data,
                    // Compressed clusters have no offset; zero clusters' offsets are a detail.
                    if data { e["offset"].as_u64() } else { None },
                )
            })
            .collect(),
    )
}

fn our_map(image: &Path) -> Vec<Run> {
    let disk = Qcow2Disk::open_read_only(image).unwrap();
    let size = disk.info().unwrap().capacity;
    let map: Vec<MapEntry> = disk.map(0, size).unwrap();
    normalise(
        map.into_iter()
            .map(|e| {
                (
                    e.start,
                    e.length,
                    u64::from(e.depth),
                    e.present,
                    e.zero,
                    e.data,
                    if e.data { e.offset } else { None },
                )
            })
            .collect(),
    )
}

fn assert_same_map(g: Generation, image: &Path) {
    assert_eq!(
        our_map(image),
        qemu_map(g, image),
        "map of {} ({g})",
        image.display()
    );
}

/// Everything a disk reads, via our backend.
fn read_all(disk: &dyn Disk) -> Vec<u8> {
    let size = disk.info().unwrap().capacity;
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(7 * MIB as usize).enumerate() {
        disk.read_at(chunk, i as u64 * 7 * MIB).unwrap();
    }
    out
}

/// `qemu-img convert -O raw` of the image (whole chain) and its bytes.
fn qemu_raw(g: Generation, image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!(
        "{}.raw",
        image.file_name().unwrap().to_str().unwrap()
    ));
    let _ = std::fs::remove_file(&raw);
    qemu_img_ok(
        g,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// A raw model file with the same writes as the image.
fn write_raw(path: &Path, data: &[u8], offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

#[test]
fn images_we_write_pass_check_compare_and_map() {
    for_each_generation(&["qemu-img"], |g| {
        for cluster_size in [4 * KIB, 64 * KIB, 2 * MIB] {
            let dir = tempfile::tempdir().unwrap();
            let size = 24 * MIB + 3 * 512;
            let image = dir.path().join("ours.qcow2");
            let raw = dir.path().join("model.raw");
            std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
            let disk = Qcow2Disk::create(
                &image,
                &CreateOptions::new(size).cluster_size(cluster_size as u32),
            )
            .unwrap();
            let mode = std::fs::metadata(&image).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "images hold VM data");
            let data = random_bytes(5 * MIB as usize, cluster_size);
            let writes: [(u64, usize, usize); 7] = [
                (0, 0, 3 * MIB as usize),        // aligned, several clusters
                (7 * MIB + 1000, 100, 70_000),   // unaligned, partial clusters
                (size - 5000, 7, 5000),          // the last, partial cluster
                (MIB + 17, 3, 9000),             // rewriting allocated clusters
                (12 * MIB, 0, 4 * MIB as usize), // to be zeroed in part
                (20 * MIB, 1, 2 * MIB as usize), // to be trimmed
                (7 * MIB + 500, 9, 300),         // rewriting a partial cluster
            ];
            for (offset, from, len) in writes {
                disk.write_at(&data[from..from + len], offset).unwrap();
                write_raw(&raw, &data[from..from + len], offset);
            }
            let zero = (12 * MIB + 12345, 3 * MIB);
            disk.write_zeroes(zero.0, zero.1).unwrap();
            write_raw(&raw, &vec![0u8; zero.1 as usize], zero.0);
            // Trim is a hint; on an image without a backing file it frees whole clusters,
            // which then read as zeros: the model does the same.
            disk.trim(20 * MIB, 2 * MIB).unwrap();
            write_raw(&raw, &vec![0u8; 2 * MIB as usize], 20 * MIB);
            disk.flush().unwrap();
            assert_eq!(read_all(&disk), std::fs::read(&raw).unwrap());
            drop(disk);
            check(g, &image);
            compare_with_raw(g, &image, &raw);
            assert_same_map(g, &image);
        }
    });
}

#[test]
fn images_qemu_img_made_read_byte_exact_with_their_maps() {
    for_each_generation(&["qemu-img", "qemu-io"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = 16 * MIB;
        // A raw source: random data with holes and zero runs.
        let raw = d.join("source.raw");
        let mut content = random_bytes(size as usize, 7);
        // Half of it compressible (text-like), so `convert -c` stores compressed clusters.
        for (i, b) in content[..size as usize / 2].iter_mut().enumerate() {
            *b = b"qcow2 compressed cluster "[i % 25] ^ ((i / 4096) as u8 & 3);
        }
        for hole in [(MIB, 3 * MIB), (9 * MIB + 4096, MIB), (15 * MIB, MIB)] {
            content[hole.0 as usize..(hole.0 + hole.1) as usize].fill(0);
        }
        std::fs::write(&raw, &content).unwrap();
        for cluster_size in ["4k", "64k", "2M"] {
            for compressed in [false, true] {
                let image = d.join(format!("conv-{cluster_size}-{compressed}.qcow2"));
                let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o"];
                let options = format!("cluster_size={cluster_size}");
                args.push(&options);
                if compressed {
                    args.push("-c");
                }
                args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
                qemu_img_ok(g, &args);
                let disk = Qcow2Disk::open_read_only(&image).unwrap();
                assert_eq!(read_all(&disk), content, "{}", image.display());
                let map = disk.map(0, size).unwrap();
                assert_eq!(map.iter().any(|e| e.compressed), compressed, "{map:?}");
                assert!(map.iter().any(|e| !e.present), "holes stay holes: {map:?}");
                assert_same_map(g, &image);
            }
        }

        // A chain: base (64 KiB clusters) ← mid (4 KiB, zero and discarded clusters) ← top.
        let base = d.join("base.qcow2");
        qemu_img_ok(
            g,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                base.to_str().unwrap(),
            ],
        );
        let mid = d.join("mid.qcow2");
        qemu_img_ok(
            g,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                mid.to_str().unwrap(),
                "16M",
            ],
        );
        qemu_io(
            g,
            &mid,
            &[
                "write -P 0x55 100k 300k".into(),
                "write -z 2M 1M".into(),
                "write -P 0x66 5M 64k".into(),
                "discard 5M 64k".into(),
                "write -P 0x77 8M 8k".into(),
            ],
        );
        let top = d.join("top.qcow2");
        qemu_img_ok(
            g,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=2M",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                top.to_str().unwrap(),
                "20M",
            ],
        );
        qemu_io(
            g,
            &top,
            &["write -P 0x88 6M 2M".into(), "write -z 18M 2M".into()],
        );
        let want = qemu_raw(g, &top, d);
        let disk = Qcow2Disk::open_read_only(&top).unwrap();
        assert_eq!(disk.chain().len(), 3);
        assert_eq!(read_all(&disk), want);
        assert_same_map(g, &top);
        assert_same_map(g, &mid);
    });
}

#[test]
fn chains_with_raw_at_the_bottom_and_our_overlays() {
    for_each_generation(&["qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = 8 * MIB;
        let raw = d.join("base.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(6 * MIB).unwrap(); // shorter than the overlays: the rest reads as zeros
        f.write_all_at(&random_bytes(MIB as usize, 3), 2 * MIB)
            .unwrap();
        drop(f);
        let mut model = vec![0u8; size as usize];
        model[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&random_bytes(MIB as usize, 3));
        let mut below = ("base.raw".to_owned(), BackingFormat::Raw);
        // Four overlays of our making, each writing, zeroing and discarding a little.
        for level in 0..4u64 {
            let name = format!("inc{level}.qcow2");
            let path = d.join(&name);
            let disk = Qcow2Disk::create(
                &path,
                &CreateOptions::new(size)
                    .cluster_size(if level % 2 == 0 { 64 * KIB } else { 4 * KIB } as u32)
                    .backing(below.0.clone(), below.1),
            )
            .unwrap();
            let bytes = random_bytes(300_000, 10 + level);
            let at = level * 1_300_000 + 777;
            disk.write_at(&bytes, at).unwrap();
            model[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
            disk.write_zeroes(2 * MIB + level * 128 * KIB, 128 * KIB)
                .unwrap();
            let z = (2 * MIB + level * 128 * KIB) as usize;
            model[z..z + 128 * KIB as usize].fill(0);
            disk.flush().unwrap();
            assert_eq!(read_all(&disk), model, "level {level}");
            drop(disk);
            check(g, &path);
            assert_same_map(g, &path);
            below = (name, BackingFormat::Qcow2);
        }
        let top = d.join("inc3.qcow2");
        assert_eq!(qemu_raw(g, &top, d), model);
        let disk = factory::open(top.to_str().unwrap(), OpenFlags::read_only()).unwrap();
        assert_eq!(disk.info().unwrap().num_links, 5);
    });
}

#[test]
fn formats_are_never_probed_and_bad_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A raw disk whose guest wrote a qcow2 header: raw it stays, whatever its name says.
    let fake = d.join("guest.img");
    let header = Qcow2Disk::create(d.join("real.qcow2"), &CreateOptions::new(MIB)).unwrap();
    drop(header);
    std::fs::copy(d.join("real.qcow2"), &fake).unwrap();
    let raw = factory::open(fake.to_str().unwrap(), OpenFlags::read_only()).unwrap();
    assert_eq!(
        raw.info().unwrap().capacity,
        std::fs::metadata(&fake).unwrap().len()
    );
    // A file named .qcow2 that is not one: a clear error, no raw fallback.
    let named = d.join("raw.qcow2");
    std::fs::write(&named, vec![0u8; 65536]).unwrap();
    match factory::open(named.to_str().unwrap(), OpenFlags::read_only()) {
        Err(Error::Format { reason, .. }) => {
            assert!(reason.contains("not a qcow2 image"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // `raw:` opens it as what it is.
    let uri = format!("raw:{}", named.display());
    assert_eq!(
        factory::open(&uri, OpenFlags::read_only())
            .unwrap()
            .info()
            .unwrap()
            .capacity,
        65536
    );
    // `qcow2:` says qcow2 for any name.
    let uri = format!("qcow2:{}", fake.display());
    assert_eq!(
        factory::open(&uri, OpenFlags::read_only())
            .unwrap()
            .info()
            .unwrap()
            .capacity,
        MIB
    );

    // A loop: x ← y ← x.
    let err = loop_error(d);
    assert!(err.contains("loops"), "{err}");

    // A chain deeper than the limit.
    let mut below = "deep0.qcow2".to_owned();
    Qcow2Disk::create(d.join(&below), &CreateOptions::new(4096)).unwrap();
    let mut result = Ok(());
    for i in 1..=disk_transport::qcow2::MAX_CHAIN_DEPTH + 1 {
        let name = format!("deep{i}.qcow2");
        result = Qcow2Disk::create(
            d.join(&name),
            &CreateOptions::new(4096).backing(below.clone(), BackingFormat::Qcow2),
        )
        .map(drop);
        if result.is_err() {
            break;
        }
        below = name;
    }
    let err = result.unwrap_err().to_string();
    assert!(err.contains("deeper than"), "{err}");
}

/// Builds x ← y, then replaces y by an image backed by x, and opens x.
fn loop_error(d: &Path) -> String {
    let x = d.join("x.qcow2");
    let y = d.join("y.qcow2");
    Qcow2Disk::create(&y, &CreateOptions::new(MIB)).unwrap();
    Qcow2Disk::create(
        &x,
        &CreateOptions::new(MIB).backing("y.qcow2", BackingFormat::Qcow2),
    )
    .unwrap();
    let y2 = d.join("y2.qcow2");
    Qcow2Disk::create(
        &y2,
        &CreateOptions::new(MIB).backing("x.qcow2", BackingFormat::Qcow2),
    )
    .unwrap();
    std::fs::rename(&y2, &y).unwrap();
    Qcow2Disk::open_read_only(&x).unwrap_err().to_string()
}

/// The operations of the property test.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Trim(u64, u64),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let at = 0..size;
    prop_oneof![
        (at.clone(), 1usize..200_000, any::<u8>()).prop_map(move |(o, l, b)| Op::Write(
            o,
            l.min((size - o) as usize),
            b
        )),
        (at.clone(), 1u64..400_000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
        (at, 1u64..400_000).prop_map(move |(o, l)| Op::Trim(o, l.min(size - o))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random writes, zeroes and trims on an image (with or without a backing file) agree with
    /// a MemoryDisk model, and qemu-img finds the image consistent and equal to the model.
    #[test]
    fn random_operations_match_the_model_and_qemu_img(
        ops in proptest::collection::vec(op(3 * MIB + 512), 1..24),
        cluster_bits in 12u32..=16,
        with_backing in any::<bool>(),
    ) {
        let g = Generation::Host;
        if g.command("qemu-img", "qemu-utils").is_none() {
            return Ok(());
        }
        let size = 3 * MIB + 512;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let model = MemoryDisk::new(size);
        let mut options = CreateOptions::new(size).cluster_size(1 << cluster_bits);
        if with_backing {
            let base = d.join("base.raw");
            let bytes = random_bytes(size as usize, u64::from(cluster_bits));
            std::fs::write(&base, &bytes).unwrap();
            model.write_at(&bytes, 0).unwrap();
            options = options.backing("base.raw", BackingFormat::Raw);
        }
        let image = d.join("p.qcow2");
        let disk = Qcow2Disk::create(&image, &options).unwrap();
        for op in &ops {
            match *op {
                Op::Write(o, l, b) => {
                    let bytes: Vec<u8> = (0..l).map(|i| b.wrapping_add(i as u8)).collect();
                    disk.write_at(&bytes, o).unwrap();
                    model.write_at(&bytes, o).unwrap();
                }
                Op::Zero(o, l) => {
                    disk.write_zeroes(o, l).unwrap();
                    model.write_zeroes(o, l).unwrap();
                }
                Op::Trim(o, l) => {
                    // Contents after a trim are unspecified: the model takes what the image reads.
                    disk.trim(o, l).unwrap();
                    let mut now = vec![0u8; l as usize];
                    disk.read_at(&mut now, o).unwrap();
                    model.write_at(&now, o).unwrap();
                }
            }
        }
        disk.flush().unwrap();
        prop_assert_eq!(read_all(&disk), model.to_vec().unwrap());
        drop(disk);
        check(g, &image);
        let raw = d.join("model.raw");
        std::fs::write(&raw, model.to_vec().unwrap()).unwrap();
        compare_with_raw(g, &image, &raw);
        prop_assert_eq!(our_map(&image), qemu_map(g, &image));
    }
}

#[test]
fn writes_into_images_qemu_img_made_keep_them_consistent() {
    for_each_generation(&["qemu-img", "qemu-io"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = 8 * MIB;
        let raw = d.join("source.raw");
        let mut content = random_bytes(size as usize, 11);
        for (i, b) in content[..4 * MIB as usize].iter_mut().enumerate() {
            *b = b"compressible "[i % 13];
        }
        std::fs::write(&raw, &content).unwrap();
        let cases: [(&str, &[&str]); 4] = [
            // Compressed clusters rewritten (copy-on-write into new clusters).
            ("compressed", &["convert", "-c", "-f", "raw", "-O", "qcow2"]),
            // 512-byte clusters: the refcount table must grow while we write.
            (
                "tiny",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=512",
                ],
            ),
            // Version 2: no zero flag.
            (
                "v2",
                &["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10"],
            ),
            // 1-bit refcounts.
            (
                "refbits1",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "refcount_bits=1",
                ],
            ),
        ];
        for (name, convert) in cases {
            let image = d.join(format!("{name}.qcow2"));
            let mut args = convert.to_vec();
            args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
            qemu_img_ok(g, &args);
            let model = d.join(format!("{name}.model"));
            std::fs::copy(&raw, &model).unwrap();
            let disk = Qcow2Disk::open_read_write(&image).unwrap();
            let bytes = random_bytes(3 * MIB as usize + 16, 99);
            for (at, from, len) in [
                (777u64, 0usize, 100_000usize),
                (2 * MIB, 5, 3 * MIB as usize),
                (6 * MIB + 3, 1, 65_536),
            ] {
                disk.write_at(&bytes[from..from + len], at).unwrap();
                write_raw(&model, &bytes[from..from + len], at);
            }
            disk.write_zeroes(MIB + 4096, 2 * MIB).unwrap();
            write_raw(&model, &vec![0u8; 2 * MIB as usize], MIB + 4096);
            disk.flush().unwrap();
            assert_eq!(read_all(&disk), std::fs::read(&model).unwrap(), "{name}");
            drop(disk);
            check(g, &image);
            compare_with_raw(g, &image, &model);
            assert_same_map(g, &image);
        }

        // An empty image with 512-byte clusters, whose one-cluster refcount table covers
        // 8 MiB of file: writing 20 MiB moves the table twice.
        let grow = d.join("grow.qcow2");
        qemu_img_ok(
            g,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                grow.to_str().unwrap(),
                "32M",
            ],
        );
        let table_before = refcount_table_offset(&grow);
        let disk = Qcow2Disk::open_read_write(&grow).unwrap();
        let bytes = random_bytes(20 * MIB as usize, 5);
        for (i, chunk) in bytes.chunks(MIB as usize).enumerate() {
            disk.write_at(chunk, 4096 + i as u64 * MIB).unwrap();
        }
        disk.flush().unwrap();
        drop(disk);
        assert_ne!(
            refcount_table_offset(&grow),
            table_before,
            "the refcount table moved"
        );
        check(g, &grow);
        let mut model = vec![0u8; 32 * MIB as usize];
        model[4096..4096 + bytes.len()].copy_from_slice(&bytes);
        assert_eq!(qemu_raw(g, &grow, d), model);

        // A v2 overlay over a backing file: zeroing writes zeros (there is no zero flag).
        let base = d.join("base.qcow2");
        qemu_img_ok(
            g,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                base.to_str().unwrap(),
            ],
        );
        let overlay = d.join("over-v2.qcow2");
        qemu_img_ok(
            g,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                overlay.to_str().unwrap(),
            ],
        );
        let disk = Qcow2Disk::open_read_write(&overlay).unwrap();
        disk.write_zeroes(0, 3 * MIB).unwrap();
        disk.trim(4 * MIB, MIB).unwrap(); // a hint a v2 overlay cannot take: nothing changes
        let mut model = content.clone();
        model[..3 * MIB as usize].fill(0);
        disk.flush().unwrap();
        assert_eq!(read_all(&disk), model);
        drop(disk);
        check(g, &overlay);
        assert_same_map(g, &overlay);
        assert_eq!(qemu_raw(g, &overlay, d), model);
    });
}

fn refcount_table_offset(image: &Path) -> u64 {
    let mut field = [0u8; 8];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut field, 48)
        .unwrap();
    u64::from_be_bytes(field)
}

#[test]
fn a_writable_open_drops_persistent_bitmaps_and_refuses_what_it_cannot_write() {
    for_each_generation(&["qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = d.join("bitmaps.qcow2");
        qemu_img_ok(g, &["create", "-f", "qcow2", image.to_str().unwrap(), "4M"]);
        qemu_img_ok(
            g,
            &[
                "bitmap",
                "--add",
                "-f",
                "qcow2",
                image.to_str().unwrap(),
                "b0",
            ],
        );
        let disk = Qcow2Disk::open_read_write(&image).unwrap();
        disk.write_at(&[1u8; 4096], 0).unwrap();
        disk.flush().unwrap();
        drop(disk);
        check(g, &image);
        let info = qemu_img_ok(
            g,
            &[
                "info",
                "--output=json",
                "-f",
                "qcow2",
                image.to_str().unwrap(),
            ],
        );
        let info: Value = serde_json::from_str(&info).unwrap();
        let bitmaps = &info["format-specific"]["data"]["bitmaps"];
        assert!(
            bitmaps.as_array().is_none_or(|b| b.is_empty()),
            "bitmaps are dropped, not left half-maintained: {info}"
        );

        // Internal snapshots: read-only only.
        let snap = d.join("snap.qcow2");
        qemu_img_ok(g, &["create", "-f", "qcow2", snap.to_str().unwrap(), "4M"]);
        qemu_img_ok(g, &["snapshot", "-c", "s1", snap.to_str().unwrap()]);
        assert!(Qcow2Disk::open_read_only(&snap).is_ok());
        let err = Qcow2Disk::open_read_write(&snap).unwrap_err().to_string();
        assert!(err.contains("snapshots"), "{err}");

        // Features we do not implement are refused by name, never half-read.
        for (option, word) in [
            ("compression_type=zstd", "zstd"),
            ("extended_l2=on", "extended L2"),
            ("data_file=DIR/ext.raw", "external data file"),
        ] {
            // Inside the test's directory, never the working directory.
            let option = option.replace("DIR", d.to_str().unwrap());
            let option = option.as_str();
            let path = d.join(format!("{}.qcow2", option.split('=').next().unwrap()));
            let (out, err, code) = run(
                g,
                "qemu-img",
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    option,
                    path.to_str().unwrap(),
                    "4M",
                ],
            );
            if code != 0 {
                eprintln!("qemu-img ({g}) cannot make {option}: {out}{err}");
                continue;
            }
            let got = Qcow2Disk::open_read_only(&path).unwrap_err().to_string();
            assert!(got.contains(word), "{option}: {got}");
        }
    });
}

#[test]
fn parallel_copy_writers_leave_a_consistent_image() {
    use disk_transport::copy::{copy, CopyOptions};
    for_each_generation(&["qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let size = 40 * MIB + 4096;
        let source = MemoryDisk::new(size);
        // Islands of data of odd sizes and places, so requests split clusters every way.
        for i in 0..60u64 {
            let at = (i * 677_777) % (size - 300_000);
            let len = 1000 + (i as usize * 4099) % 250_000;
            source.write_at(&random_bytes(len, i), at).unwrap();
        }
        source.write_zeroes(3 * MIB, 2 * MIB).unwrap();
        for cluster_size in [4 * KIB, 64 * KIB] {
            let image = dir.path().join(format!("par-{cluster_size}.qcow2"));
            let dst = Qcow2Disk::create(
                &image,
                &CreateOptions::new(size).cluster_size(cluster_size as u32),
            )
            .unwrap();
            let options = CopyOptions::default()
                .threads(4)
                .request_size(96 * 1024 + 512)
                .destination_is_zero(true);
            copy(&source, &dst, &options, &mut |_| {})
                .map_err(|e| e.error)
                .unwrap();
            assert_eq!(read_all(&dst), source.to_vec().unwrap());
            drop(dst);
            check(g, &image);
            let raw = dir.path().join("source.raw");
            std::fs::write(&raw, source.to_vec().unwrap()).unwrap();
            compare_with_raw(g, &image, &raw);
            assert_same_map(g, &image);
        }
    });
}

/// Writers racing for the same clusters and their neighbours: eight threads write disjoint
/// pieces of the same partial clusters (each must allocate it, or wait for the one that does
/// and then write in place: a second allocation would lose a piece and leak a cluster), and
/// half-cluster-shifted whole-cluster spans that share every cluster with a neighbour's span,
/// over a backing file whose data a partial cluster's copy-on-write must keep. The result
/// reads as the model, passes `qemu-img check` (no corruption, no leak) and compares equal.
#[test]
fn parallel_writers_to_the_same_and_neighbouring_clusters() {
    const THREADS: u64 = 8;
    for_each_generation(&["qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        for cluster_size in [4 * KIB, 64 * KIB] {
            let clusters = 96u64;
            let size = clusters * cluster_size;
            let base = dir.path().join(format!("base-{cluster_size}.raw"));
            let mut model = random_bytes(size as usize, cluster_size);
            std::fs::write(&base, &model).unwrap();
            let image = dir.path().join(format!("race-{cluster_size}.qcow2"));
            let disk = Qcow2Disk::create(
                &image,
                &CreateOptions::new(size)
                    .cluster_size(cluster_size as u32)
                    .backing(
                        base.file_name().unwrap().to_str().unwrap(),
                        BackingFormat::Raw,
                    ),
            )
            .unwrap();
            // Each write: (offset, bytes), by thread.
            let slice = cluster_size / THREADS / 2;
            let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); THREADS as usize];
            // The first half of the disk: thread t writes slice t of every cluster (the second
            // half of each cluster keeps the backing file's data), each thread starting at
            // another cluster so they meet on every one.
            for (t, plan) in plans.iter_mut().enumerate() {
                let t = t as u64;
                for k in 0..clusters / 2 {
                    let c = (k + t * 5) % (clusters / 2);
                    let at = c * cluster_size + t * slice;
                    plan.push((at, random_bytes(slice as usize, 1000 + c * THREADS + t)));
                }
            }
            // The second half: spans of one cluster and a half from the middle of a cluster,
            // thread t taking every THREADS-th, so each cluster is split between two threads.
            let second = clusters / 2;
            for c in second..clusters - 1 {
                if (c - second) % 2 == 1 {
                    continue; // leave every other span out, so clusters split with the backing
                }
                let t = ((c - second) / 2) % THREADS;
                let at = c * cluster_size + cluster_size / 2;
                let len = cluster_size + cluster_size / 2;
                let len = len.min(size - at);
                plans[t as usize].push((at, random_bytes(len as usize, 5000 + c)));
            }
            for plan in &plans {
                for (at, bytes) in plan {
                    model[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
                }
            }
            std::thread::scope(|s| {
                for plan in &plans {
                    let disk = &disk;
                    s.spawn(move || {
                        for (at, bytes) in plan {
                            disk.write_at(bytes, *at).unwrap();
                        }
                    });
                }
            });
            assert!(
                read_all(&disk) == model,
                "{cluster_size}: reads back as the model"
            );
            drop(disk);
            check(g, &image);
            let raw = dir.path().join(format!("model-{cluster_size}.raw"));
            std::fs::write(&raw, &model).unwrap();
            compare_with_raw(g, &image, &raw);
            assert_same_map(g, &image);
        }
    });
}

/// Image locking as QEMU does it: while we have an image open for writing, qemu-img and
/// qemu-io refuse it (`Failed to get shared "write" lock`, `Failed to get "write" lock`) unless
/// told to share (`-U`), and a second writable open of ours fails; while qemu-nbd serves it
/// writable, our writable open fails with a clear error and a read-only one works; once the
/// other side has closed it, everything opens again.
#[test]
fn writable_opens_lock_the_image_against_qemu_and_qemu_against_us() {
    for_each_generation(&["qemu-img", "qemu-io", "qemu-nbd"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("locked.qcow2");
        let name = image.to_str().unwrap();
        let disk = Qcow2Disk::create(&image, &CreateOptions::new(4 * MIB)).unwrap();
        disk.write_at(&[5u8; 4096], 0).unwrap();

        let (out, err, code) = run(g, "qemu-img", &["info", "-f", "qcow2", name]);
        assert_ne!(
            code, 0,
            "qemu-img info of an image open for writing ({g}): {out}"
        );
        assert!(
            err.contains("Failed to get shared \"write\" lock"),
            "{g}: {err}"
        );
        qemu_img_ok(g, &["info", "-U", "-f", "qcow2", name]);
        let (out, err, code) = run(
            g,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 9 0 4k", name],
        );
        assert!(
            code != 0 || err.contains("Failed to get") || out.contains("Failed to get"),
            "qemu-io wrote an image open for writing ({g}): {out}{err}"
        );
        assert!(
            err.contains("Failed to get \"write\" lock")
                || out.contains("Failed to get \"write\" lock"),
            "{g}: {out}{err}"
        );
        let second = Qcow2Disk::open_read_write(&image).unwrap_err();
        assert!(second.to_string().contains("lock"), "{second}");
        drop(disk);
        qemu_img_ok(g, &["info", "-f", "qcow2", name]);
        check(g, &image);

        // The other way round: qemu-nbd serving the image writable.
        let server = vmsdk_tests::disk::NbdServer::qemu_nbd_in(g, &["-f", "qcow2", name])
            .expect("qemu-nbd is there: for_each_generation checked");
        // Listening is not enough: qemu-nbd opens (and locks) the image after it listens.
        server.wait_until_serving();
        let refused = Qcow2Disk::open_read_write(&image).unwrap_err();
        let text = refused.to_string();
        assert!(
            matches!(&refused, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::ResourceBusy),
            "{g}: {refused:?}"
        );
        assert!(
            text.contains("Failed to get") && text.contains("\"write\" lock"),
            "{g}: {text}"
        );
        let reader = Qcow2Disk::open_read_only(&image).unwrap();
        let mut first = [0u8; 4];
        reader.read_at(&mut first, 0).unwrap();
        assert_eq!(first, [5; 4]);
        drop(reader);
        drop(server);
        let again = Qcow2Disk::open_read_write(&image).unwrap();
        again.write_at(&[6u8; 512], 8192).unwrap();
        drop(again);
        check(g, &image);
    });
}
