//! The stand-in VDDK checked by a real consumer: nbdkit's own vddk plugin (Debian 13's
//! `nbdkit-plugin-vddk`, in the peer root) loads the stand-in `libvixDiskLib.so.8` from
//! `libdir=`, and `nbdinfo --map`, `nbdcopy` and vmsdk's NBD client read a file-backed stand-in
//! disk through it — the same bytes and extents vmsdk's own VDDK backend reads from the same
//! file through the same library, and what the file holds.
//!
//! Both processes configure the stand-in with `standin.fileDisks = 1` (InitEx configuration
//! file: nbdkit's `config=`, vmsdk's `VddkOptions::config_path`), so a local disk is the file
//! its path names and its allocation is the file system's, in 64 KiB chunks.
#![cfg(target_os = "linux")]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use disk_transport::vddk::{VddkOptions, VddkTransport};
use disk_transport::{open_uri, ConnectParams, Disk, DiskTransport, ExtentKind, OpenFlags};
use vmsdk_tests::disk::{
    merge_map, nbd_tool, nbdinfo_map_in, random_bytes, sha256, sha256_file, NbdServer,
};
use vmsdk_tests::peers::{announce, trixie_packages, trixie_root, Generation};
use vmsdk_tests::{running_in_ci, vddk_standin_libdir};

/// Where Debian 13's `nbdkit-plugin-vddk` installs the plugin, inside the root.
const PLUGIN: &str = "usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-vddk-plugin.so";

/// The stand-in's allocation unit.
const CHUNK: u64 = 64 * 1024;

/// The password the stand-in accepts for remote logins (`standin.password`).
const PASSWORD: &str = "stand-in secret";

/// A thumbprint for remote connections (the stand-in records it and checks nothing more).
const THUMBPRINT: &str = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD";

/// The disk: 8 MiB (whole chunks: nbdkit queries whole chunks up to the rounded-up end).
const SIZE: u64 = 8 << 20;

/// NBD block-status flags as `nbdinfo --map` prints them.
const HOLE_ZERO: u32 = 3;
const DATA: u32 = 0;

/// A test directory the peer root can see (bind-mounted by the harness), laid out as a VDDK
/// distribution (`lib64/libvixDiskLib.so.8`) with the disk, the two InitEx configuration files
/// and the stand-in's counters of both processes.
struct Fixture {
    dir: tempfile::TempDir,
    /// (offset, bytes) written into the otherwise sparse disk.
    islands: Vec<(u64, Vec<u8>)>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("lib64")).unwrap();
        std::fs::copy(
            vddk_standin_libdir().join("lib64/libvixDiskLib.so.8"),
            dir.path().join("lib64/libvixDiskLib.so.8"),
        )
        .expect("install the stand-in into the test directory");
        // Random data across chunk boundaries, a chunk written with zeros (allocated, so data
        // to both readers), a lone sector at the end; holes everywhere else.
        let islands = vec![
            (0, random_bytes(4096, 1)),
            (200_000 / 512 * 512, random_bytes(70_000 / 512 * 512, 2)),
            (3 << 20, random_bytes(1 << 20, 3)),
            (5 << 20, vec![0; CHUNK as usize]),
            (SIZE - 512, random_bytes(512, 4)),
        ];
        let file = std::fs::File::create(dir.path().join("disk.img")).unwrap();
        file.set_len(SIZE).unwrap();
        for (offset, bytes) in &islands {
            file.write_all_at(bytes, *offset).unwrap();
        }
        file.sync_all().unwrap();
        for who in ["nbdkit", "vmsdk"] {
            std::fs::write(
                dir.path().join(format!("{who}.conf")),
                format!(
                    "# The stand-in VDDK, as {who} loads it\nstandin.fileDisks = 1\nstandin.statsFile = {}\n\
                     standin.datastoreDir = {}\nstandin.password = {PASSWORD}\n",
                    dir.path().join(format!("{who}-stats.json")).display(),
                    dir.path().join("datastores").display()
                ),
            )
            .unwrap();
        }
        Fixture { dir, islands }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, key: &str, name: &str) -> String {
        format!("{key}={}", self.path(name).display())
    }

    /// The map the disk must have: a chunk is data when any island touches it, merged.
    fn expected_map(&self) -> Vec<(u64, u64, u32)> {
        let chunks = SIZE / CHUNK;
        let mut map = Vec::new();
        for c in 0..chunks {
            let (a, b) = (c * CHUNK, (c + 1) * CHUNK);
            let touched = self
                .islands
                .iter()
                .any(|(o, bytes)| *o < b && o + bytes.len() as u64 > a);
            map.push((a, CHUNK, if touched { DATA } else { HOLE_ZERO }));
        }
        merge_map(&map)
    }

    /// The stand-in's counters as one process published them.
    fn stats(&self, who: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(&format!("{who}-stats.json")))
            .unwrap_or_else(|e| panic!("{who}: the stand-in wrote no counters: {e}"));
        serde_json::from_str(&text).unwrap()
    }
}

/// Whether the root has the vddk plugin; a missing one fails under CI.
fn plugin_installed() -> bool {
    let plugin = trixie_root().join(PLUGIN);
    if plugin.is_file() {
        return true;
    }
    let message = format!(
        "nbdkit's vddk plugin {} is missing (Debian 13 package `nbdkit-plugin-vddk`, contrib; \
         `cargo xtask peer-root --rebuild`)",
        plugin.display()
    );
    assert!(!running_in_ci(), "{message}");
    eprintln!("SKIPPED (trixie): {message}");
    false
}

fn flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => DATA,
        ExtentKind::Zero => 2,
        ExtentKind::Hole => HOLE_ZERO,
        ExtentKind::Unallocated => 1,
        other => panic!("unexpected extent kind {other:?}"),
    }
}

/// Reads all of `disk` in 1 MiB requests and returns the SHA-256 and the extents as map triples.
fn read_disk(disk: &dyn Disk) -> (String, Vec<(u64, u64, u32)>) {
    let capacity = disk.info().unwrap().capacity;
    assert_eq!(capacity, SIZE);
    let mut all = vec![0u8; capacity as usize];
    for (i, chunk) in all.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, i as u64 * (1 << 20)).unwrap();
    }
    let extents = disk.allocated_extents(0, capacity).unwrap();
    let map = extents
        .iter()
        .map(|e| (e.offset, e.length, flags(e.kind)))
        .collect::<Vec<_>>();
    (sha256(&all), merge_map(&map))
}

/// What nbdkit prints for `--dump-plugin`, with the stand-in as its library.
fn dump_plugin(fixture: &Fixture) -> String {
    let command = Generation::Trixie
        .command("nbdkit", "nbdkit")
        .expect("nbdkit was found a moment ago");
    let out = command
        .args(["vddk", "--dump-plugin"])
        .arg(format!("libdir={}", fixture.dir.path().display()))
        .output();
    vmsdk_tests::assert_success(&out, "nbdkit vddk --dump-plugin");
    String::from_utf8(out.stdout).unwrap()
}

fn assert_no_violations(fixture: &Fixture, who: &str) -> serde_json::Value {
    let stats = fixture.stats(who);
    assert_eq!(
        stats["violations"],
        serde_json::json!({}),
        "{who} broke VDDK's rules: {stats}"
    );
    stats
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// One test for both directions: VDDK is initialised once per process with one `libdir`, and
/// vmsdk's backend here must load the stand-in from the test directory nbdkit sees.
#[test]
fn nbdkit_vddk_plugin_and_vmsdk_share_standin_disks() {
    let generation = Generation::Trixie;
    if generation.command("nbdkit", "nbdkit").is_none() || !plugin_installed() {
        return;
    }
    announce(generation, &["nbdkit", "nbdinfo", "nbdcopy"]);
    let package = trixie_packages()
        .into_iter()
        .find(|(name, _)| name == "nbdkit-plugin-vddk")
        .map_or_else(|| "(not in the root's stamp)".to_owned(), |(_, v)| v);
    eprintln!("peers: nbdkit-plugin-vddk {package}, loading the stand-in libvixDiskLib.so.8");

    let fixture = Fixture::new();
    let vddk = VddkTransport::new(
        &VddkOptions::new()
            .libdir(fixture.dir.path())
            .config_path(fixture.path("vmsdk.conf")),
    )
    .unwrap();
    read_the_same_disk(&fixture, &vddk);
    write_a_created_disk(&fixture, &vddk);
    map_the_tail_of_an_odd_sized_disk(&fixture, &vddk);
    share_a_remote_disk_in_the_datastore_directory(&fixture, &vddk);
}

/// nbdkit's remote-connection arguments for the stand-in's vCenter, with `password`.
fn remote_args(fixture: &Fixture, password: &str) -> Vec<String> {
    vec![
        "-r".to_owned(),
        "vddk".to_owned(),
        format!("libdir={}", fixture.dir.path().display()),
        fixture.arg("config", "nbdkit.conf"),
        "server=vc.example".to_owned(),
        "user=backup@vsphere.local".to_owned(),
        format!("password={password}"),
        format!("thumbprint={THUMBPRINT}"),
        "vm=moref=vm-7".to_owned(),
        "snapshot=snapshot-3".to_owned(),
        "transports=nbdssl".to_owned(),
        "file=[ds1] vm-7/vm-7.vmdk".to_owned(),
    ]
}

/// A remote disk as a user's integration test sets it up: an image copied into the stand-in's
/// datastore directory is `[ds1] vm-7/vm-7.vmdk` on "vCenter". vmsdk's VDDK backend writes to
/// it over a remote connection in this process; nbdkit's vddk plugin, another process, then
/// serves what was written (the disk persists in its file). With a wrong password the stand-in
/// refuses nbdkit's login with VDDK's code and no client gets the disk.
fn share_a_remote_disk_in_the_datastore_directory(fixture: &Fixture, vddk: &VddkTransport) {
    let generation = Generation::Trixie;
    let image = fixture.path("datastores/ds1/vm-7/vm-7.vmdk");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::copy(fixture.path("disk.img"), &image).unwrap();

    let params = ConnectParams::builder()
        .server("vc.example")
        .user_password("backup@vsphere.local", PASSWORD)
        .thumbprint(disk_transport::Thumbprint::new(THUMBPRINT).unwrap())
        .vm("moref=vm-7")
        .read_write()
        .build()
        .unwrap();
    let connection = vddk.connect_vddk(&params).unwrap();
    let disk = connection
        .open_disk("[ds1] vm-7/vm-7.vmdk", OpenFlags::read_write())
        .unwrap();
    let island = random_bytes(CHUNK as usize, 9);
    disk.write_at(&island, 6 * CHUNK).unwrap();
    disk.flush().unwrap();
    disk.close().unwrap();
    connection.disconnect().unwrap();
    let written_sha = sha256_file(&image);

    let args = remote_args(fixture, PASSWORD);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = NbdServer::nbdkit_in(generation, &args).expect("nbdkit was found before");
    let copy = fixture.path("remote-copy.img");
    let out = nbd_tool(generation, "nbdcopy")
        .expect("nbdcopy")
        .arg(server.uri())
        .arg(&copy)
        .output();
    vmsdk_tests::assert_success(&out, "nbdcopy from nbdkit-vddk's remote disk");
    assert_eq!(
        sha256_file(&copy),
        written_sha,
        "nbdkit serves what vmsdk wrote to the remote disk in another process"
    );
    let nbd_map = merge_map(&nbdinfo_map_in(generation, &server.uri(), None).expect("nbdinfo"));
    assert!(
        nbd_map
            .iter()
            .any(|&(o, l, f)| f == DATA && o <= 6 * CHUNK && 7 * CHUNK <= o + l),
        "the written chunk is data: {nbd_map:?}"
    );
    drop(server);
    let theirs = assert_no_violations(fixture, "nbdkit");
    let connect = &theirs["connects"]["moref=vm-7"];
    assert_eq!(connect["server"], "vc.example", "{theirs}");
    assert_eq!(connect["snapshot"], "snapshot-3", "{theirs}");
    assert_eq!(connect["transports"], "nbdssl", "{theirs}");
    assert_eq!(connect["thumbprint"], THUMBPRINT, "{theirs}");
    assert_no_violations(fixture, "vmsdk");

    // The login failure switch: the stand-in refuses nbdkit's ConnectEx with
    // VIX_E_AUTHENTICATION_FAIL, so nbdkit refuses the client and opens nothing.
    let args = remote_args(fixture, "wrong password");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = NbdServer::nbdkit_in(generation, &args).expect("nbdkit was found before");
    let out = nbd_tool(generation, "nbdcopy")
        .expect("nbdcopy")
        .arg(server.uri())
        .arg(fixture.path("refused.img"))
        .output();
    assert!(
        !out.status.success(),
        "nbdcopy got a disk past a refused login"
    );
    assert!(open_uri(&server.uri(), OpenFlags::read_only()).is_err());
    drop(server);
    let theirs = assert_no_violations(fixture, "nbdkit");
    assert!(
        count(&theirs["calls"]["VixDiskLib_ConnectEx"]) >= 1,
        "{theirs}"
    );
    assert_eq!(count(&theirs["calls"]["VixDiskLib_Open"]), 0, "{theirs}");
}

/// A file-backed disk read by nbdinfo, nbdcopy and vmsdk's NBD client through nbdkit-vddk, and
/// by vmsdk's VDDK backend directly: same bytes, same extents, as the file and its holes.
fn read_the_same_disk(fixture: &Fixture, vddk: &VddkTransport) {
    let generation = Generation::Trixie;
    let disk_path = fixture.path("disk.img");
    let file_sha = sha256_file(&disk_path);
    let expected = fixture.expected_map();
    assert!(expected.len() >= 7, "{expected:?}");

    // nbdkit finds the stand-in where it looks for VDDK 8 and sees every function it uses,
    // the optional ones included.
    let dump = dump_plugin(fixture);
    assert!(dump.contains("vddk_library_version=8\n"), "{dump}");
    let dll = format!(
        "vddk_dll={}\n",
        fixture.path("lib64/libvixDiskLib.so.8").display()
    );
    assert!(dump.contains(&dll), "{dump}");
    for function in [
        "VixDiskLib_Create",
        "VixDiskLib_Wait",
        "VixDiskLib_QueryAllocatedBlocks",
        "VixDiskLib_FreeBlockList",
        "VixDiskLib_AllocateConnectParams",
    ] {
        assert!(
            dump.contains(&format!("{function}=1\n")),
            "{function}: {dump}"
        );
    }

    let server = NbdServer::nbdkit_in(
        generation,
        &[
            "-r",
            "vddk",
            &format!("libdir={}", fixture.dir.path().display()),
            &fixture.arg("config", "nbdkit.conf"),
            &fixture.arg("file", "disk.img"),
        ],
    )
    .expect("nbdkit was found a moment ago");
    eprintln!("server: {}", server.version());
    let uri = server.uri();

    // nbdinfo --map: extents from VixDiskLib_QueryAllocatedBlocks in nbdkit.
    let nbd_map = merge_map(&nbdinfo_map_in(generation, &uri, None).expect("nbdinfo"));
    assert_eq!(nbd_map, expected, "nbdinfo --map through nbdkit-vddk");

    // nbdcopy: the bytes, from VixDiskLib_ReadAsync on nbdkit's per-connection worker thread.
    let copy = fixture.path("nbdcopy.img");
    let out = nbd_tool(generation, "nbdcopy")
        .expect("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .output();
    vmsdk_tests::assert_success(&out, "nbdcopy");
    assert_eq!(sha256_file(&copy), file_sha, "nbdcopy through nbdkit-vddk");

    // Three clients at once: nbdkit opens a VDDK connection and handle per client (ConnectEx and
    // Open on its connection threads, under its own open/close lock) and drives each handle
    // from that client's worker thread; the stand-in counts any overlap of Open/Close or
    // concurrent calls on one handle (checked below).
    let copies: Vec<PathBuf> = (0..3)
        .map(|i| fixture.path(&format!("nbdcopy-{i}.img")))
        .collect();
    let runs: Vec<_> = copies
        .iter()
        .map(|copy| {
            let command = nbd_tool(generation, "nbdcopy")
                .expect("nbdcopy")
                .arg(&uri)
                .arg(copy);
            std::thread::spawn(move || command.output())
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        vmsdk_tests::assert_success(&out, "parallel nbdcopy");
    }
    for copy in &copies {
        assert_eq!(
            sha256_file(copy),
            file_sha,
            "parallel nbdcopy {}",
            copy.display()
        );
    }

    // vmsdk's NBD client through nbdkit-vddk.
    let nbd_disk = open_uri(&uri, OpenFlags::read_only()).unwrap();
    let (nbd_sha, nbd_client_map) = read_disk(nbd_disk.as_ref());
    drop(nbd_disk);
    assert_eq!(nbd_sha, file_sha, "vmsdk NBD client through nbdkit-vddk");
    assert_eq!(
        nbd_client_map, expected,
        "vmsdk NBD extents through nbdkit-vddk"
    );

    // vmsdk's own VDDK backend on the same disk, through the same library, in this process.
    let connection = vddk
        .connect(&ConnectParams::builder().build().unwrap())
        .unwrap();
    let disk = connection
        .open(disk_path.to_str().unwrap(), OpenFlags::read_only())
        .unwrap();
    let (vddk_sha, vddk_map) = read_disk(disk.as_ref());
    assert_eq!(vddk_sha, file_sha, "vmsdk VDDK backend");
    assert_eq!(vddk_map, expected, "vmsdk VDDK backend extents");
    assert_eq!(vddk_map, nbd_map);
    drop(disk);
    drop(connection);

    // Both processes used the library by its rules, and used the calls compared here.
    let theirs = assert_no_violations(fixture, "nbdkit");
    let ours = assert_no_violations(fixture, "vmsdk");
    for stats in [&theirs, &ours] {
        assert!(
            count(&stats["calls"]["VixDiskLib_QueryAllocatedBlocks"]) > 0,
            "{stats}"
        );
        assert_eq!(
            stats["disks"][disk_path.to_str().unwrap()]["file"],
            disk_path.to_str().unwrap(),
            "{stats}"
        );
    }
    assert!(
        count(&theirs["calls"]["VixDiskLib_ReadAsync"]) > 0,
        "{theirs}"
    );
    assert!(count(&theirs["calls"]["VixDiskLib_Wait"]) > 0, "{theirs}");
    // nbdinfo, nbdcopy, three parallel nbdcopy and vmsdk's NBD client: a handle each.
    assert!(
        count(&theirs["disks"][disk_path.to_str().unwrap()]["opens"]) >= 6,
        "{theirs}"
    );
    assert_eq!(theirs["connects"]["local"]["read_only"], true, "{theirs}");
    drop(server);
}

/// nbdkit-vddk with `create=true` (VixDiskLib_Create) takes a copy of the disk from nbdcopy
/// (`--flush`: WriteAsync, then Wait and Flush), with asynchronous requests completed on the
/// stand-in's threads 300 µs later; a second, read-only nbdkit serves the result to nbdinfo and
/// nbdcopy while extents are asked between asynchronous reads; vmsdk's VDDK backend reads the
/// created file and agrees.
fn write_a_created_disk(fixture: &Fixture, vddk: &VddkTransport) {
    let generation = Generation::Trixie;
    let source = fixture.path("disk.img");
    let created = fixture.path("created.img");
    let created_name = created.to_str().unwrap();
    let with_delay = format!("file={created_name}?async_delay_us=300");
    let libdir = format!("libdir={}", fixture.dir.path().display());
    let config = fixture.arg("config", "nbdkit.conf");
    let size = format!("create-size={SIZE}");
    let server = NbdServer::nbdkit_in(
        generation,
        &["vddk", &libdir, &config, &with_delay, "create=true", &size],
    )
    .expect("nbdkit was found before");
    let out = nbd_tool(generation, "nbdcopy")
        .expect("nbdcopy")
        .arg("--flush")
        .arg(&source)
        .arg(server.uri())
        .output();
    vmsdk_tests::assert_success(&out, "nbdcopy into nbdkit-vddk");
    drop(server);
    let theirs = assert_no_violations(fixture, "nbdkit");
    assert_eq!(count(&theirs["calls"]["VixDiskLib_Create"]), 1, "{theirs}");
    let disk = &theirs["disks"][created_name];
    assert!(count(&disk["async_writes"]) > 0, "{theirs}");
    assert!(count(&disk["flushes"]) > 0, "{theirs}");
    assert_eq!(disk["size"], SIZE, "{theirs}");
    assert_eq!(
        sha256_file(&created),
        sha256_file(&source),
        "the file nbdkit-vddk created and nbdcopy filled"
    );

    // Read back through a read-only nbdkit, asynchronous completions still delayed.
    let server = NbdServer::nbdkit_in(generation, &["-r", "vddk", &libdir, &config, &with_delay])
        .expect("nbdkit was found before");
    let nbd_map = merge_map(&nbdinfo_map_in(generation, &server.uri(), None).expect("nbdinfo"));
    let copy = fixture.path("created-copy.img");
    let out = nbd_tool(generation, "nbdcopy")
        .expect("nbdcopy")
        .arg(server.uri())
        .arg(&copy)
        .output();
    vmsdk_tests::assert_success(&out, "nbdcopy from nbdkit-vddk");
    assert_eq!(sha256_file(&copy), sha256_file(&source));
    let nbd_disk = open_uri(&server.uri(), OpenFlags::read_only()).unwrap();
    let (nbd_sha, nbd_client_map) = read_disk(nbd_disk.as_ref());
    drop(nbd_disk);
    drop(server);
    let theirs = assert_no_violations(fixture, "nbdkit");
    assert!(
        count(&theirs["disks"][created_name]["async_reads"]) > 0,
        "{theirs}"
    );

    let connection = vddk
        .connect(&ConnectParams::builder().build().unwrap())
        .unwrap();
    let disk = connection
        .open(created_name, OpenFlags::read_only())
        .unwrap();
    let (vddk_sha, vddk_map) = read_disk(disk.as_ref());
    drop(disk);
    drop(connection);
    assert_eq!(vddk_sha, sha256_file(&source));
    assert_eq!(nbd_sha, vddk_sha);
    assert_eq!(nbd_map, vddk_map, "nbdinfo --map vs vmsdk VDDK backend");
    assert_eq!(nbd_client_map, vddk_map, "vmsdk NBD client vs VDDK backend");
    // Every chunk that has data in the source has data in the copy.
    for (offset, length, flags) in fixture.expected_map() {
        if flags == DATA {
            assert!(
                vddk_map
                    .iter()
                    .any(|&(o, l, f)| f == DATA && o <= offset && offset + length <= o + l),
                "{offset}+{length} lost its data: {vddk_map:?}"
            );
        }
    }
    assert_no_violations(fixture, "vmsdk");
}

/// A disk whose size is not a whole number of 64 KiB chunks: QueryAllocatedBlocks cannot be
/// asked about the tail (the stand-in refuses a range past the end, as the chunk rules
/// demand), so both nbdkit 1.42's plugin and vmsdk's backend stop at the last whole chunk and
/// report the tail as data.
fn map_the_tail_of_an_odd_sized_disk(fixture: &Fixture, vddk: &VddkTransport) {
    let generation = Generation::Trixie;
    let size = 16 * CHUNK + 1536;
    let path = fixture.path("odd.img");
    let name = path.to_str().unwrap();
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&random_bytes(4096, 5), 3 * CHUNK)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    let expected = vec![
        (0, 3 * CHUNK, HOLE_ZERO),
        (3 * CHUNK, CHUNK, DATA),
        (4 * CHUNK, 12 * CHUNK, HOLE_ZERO),
        (16 * CHUNK, 1536, DATA),
    ];

    let server = NbdServer::nbdkit_in(
        generation,
        &[
            "-r",
            "vddk",
            &format!("libdir={}", fixture.dir.path().display()),
            &fixture.arg("config", "nbdkit.conf"),
            &format!("file={name}"),
        ],
    )
    .expect("nbdkit was found before");
    let nbd_map = merge_map(&nbdinfo_map_in(generation, &server.uri(), None).expect("nbdinfo"));
    let nbd_disk = open_uri(&server.uri(), OpenFlags::read_only()).unwrap();
    let nbd_sha = read_all(nbd_disk.as_ref(), size);
    drop(nbd_disk);
    drop(server);
    assert_no_violations(fixture, "nbdkit");

    let connection = vddk
        .connect(&ConnectParams::builder().build().unwrap())
        .unwrap();
    let disk = connection.open(name, OpenFlags::read_only()).unwrap();
    let vddk_sha = read_all(disk.as_ref(), size);
    let vddk_map = merge_map(
        &disk
            .allocated_extents(0, size)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, flags(e.kind)))
            .collect::<Vec<_>>(),
    );
    drop(disk);
    drop(connection);
    assert_eq!(nbd_map, expected, "nbdinfo --map through nbdkit-vddk");
    assert_eq!(vddk_map, expected, "vmsdk VDDK backend");
    assert_eq!(nbd_sha, sha256_file(&path));
    assert_eq!(vddk_sha, nbd_sha);
    assert_no_violations(fixture, "vmsdk");
}

/// SHA-256 of all `size` bytes of `disk`, read in one request.
fn read_all(disk: &dyn Disk, size: u64) -> String {
    assert_eq!(disk.info().unwrap().capacity, size);
    let mut all = vec![0u8; size as usize];
    disk.read_at(&mut all, 0).unwrap();
    sha256(&all)
}
