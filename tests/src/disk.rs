//! Helpers for the disk-transport tests: NBD servers (qemu-nbd, nbdkit) on Unix sockets in a
//! temporary directory, test images, checksums and `nbdinfo --map`.
//!
//! Every server is started in the foreground as a child of the test and killed by its PID when
//! the [`NbdServer`] is dropped. The `*_in` constructors start the server of a given
//! [`Generation`] (in the Debian 13 root through [`crate::peers`]); the plain ones start the
//! machine's own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::peers::{Generation, PeerCommand};

/// A running NBD server serving one export on a Unix socket.
#[derive(Debug)]
pub struct NbdServer {
    child: Option<Child>,
    socket: PathBuf,
    export: String,
    generation: Generation,
    program: &'static str,
    _dir: tempfile::TempDir,
}

impl NbdServer {
    /// Starts the machine's `qemu-nbd` with `args` (e.g. `["-r", "-f", "raw", IMAGE]`), export
    /// name `disk`. Returns `None` (after a skip notice) when qemu-nbd is missing outside CI.
    pub fn qemu_nbd(args: &[&str]) -> Option<NbdServer> {
        Self::qemu_nbd_in(Generation::Host, args)
    }

    /// Starts `qemu-nbd` of `generation` with `args`, export name `disk`. Files the arguments
    /// name are visible to a server in the Debian 13 root (their directories are bind-mounted;
    /// see [`PeerCommand`]). Returns `None` (after a skip notice) when the generation or
    /// qemu-nbd is missing outside CI.
    pub fn qemu_nbd_in(generation: Generation, args: &[&str]) -> Option<NbdServer> {
        let command = generation.command("qemu-nbd", "qemu-utils")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let command = command
            .arg("-t")
            .args(["-e", "8"])
            .args(["-x", "disk"])
            .arg("-k")
            .arg(&socket)
            .args(args);
        Some(NbdServer::spawn(
            &command,
            "qemu-nbd",
            socket,
            "disk".into(),
            dir,
        ))
    }

    /// Starts the machine's `nbdkit` with `args` (filters, plugin and its parameters), default
    /// export. Returns `None` (after a skip notice) when nbdkit is missing outside CI.
    pub fn nbdkit(args: &[&str]) -> Option<NbdServer> {
        Self::nbdkit_in(Generation::Host, args)
    }

    /// Starts `nbdkit` of `generation` with `args`, default export (see
    /// [`NbdServer::qemu_nbd_in`]).
    pub fn nbdkit_in(generation: Generation, args: &[&str]) -> Option<NbdServer> {
        let command = generation.command("nbdkit", "nbdkit")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let command = command
            .arg("-f")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&socket)
            .args(args);
        Some(NbdServer::spawn(
            &command,
            "nbdkit",
            socket,
            String::new(),
            dir,
        ))
    }

    /// Starts the machine's `qemu-nbd` listening on TCP 127.0.0.1 (a free port), export name
    /// `disk`; the URI is then `nbd://127.0.0.1:PORT/disk`.
    pub fn qemu_nbd_tcp(args: &[&str]) -> Option<(NbdServer, String)> {
        Self::qemu_nbd_tcp_in(Generation::Host, args)
    }

    /// [`NbdServer::qemu_nbd_tcp`] with the `qemu-nbd` of `generation`.
    pub fn qemu_nbd_tcp_in(generation: Generation, args: &[&str]) -> Option<(NbdServer, String)> {
        let command = generation.command("qemu-nbd", "qemu-utils")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let command = command
            .arg("-t")
            .args(["-e", "8", "-x", "disk", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args);
        let child = command.spawn(Stdio::null(), Stdio::inherit());
        let mut server = NbdServer {
            child: Some(child),
            socket: PathBuf::new(),
            export: "disk".into(),
            generation,
            program: "qemu-nbd",
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("qemu-nbd exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some((server, format!("nbd://127.0.0.1:{port}/disk")))
    }

    fn spawn(
        command: &PeerCommand,
        program: &'static str,
        socket: PathBuf,
        export: String,
        dir: tempfile::TempDir,
    ) -> Self {
        let child = command.spawn(Stdio::null(), Stdio::inherit());
        let mut server = NbdServer {
            child: Some(child),
            socket,
            export,
            generation: command.generation(),
            program,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(), a moment before listen(): wait for the listening
        // state (a connection in between would be refused).
        while !is_listening(&server.socket) {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("NBD server exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "NBD server did not listen on {} within 10 s",
                server.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Waits (up to 10 s) until the server has served one client its export. qemu-nbd listens
    /// before it opens its image, so a listening server may not hold the image yet (nor its
    /// locks); one that completed a handshake does.
    pub fn wait_until_serving(&self) {
        use disk_transport::nbd::{NbdDisk, NbdOptions};
        use disk_transport::NbdAddress;
        let options = NbdOptions::new(NbdAddress::Unix(self.socket.clone()))
            .export(self.export.clone())
            .read_only(true)
            .timeout(Duration::from_secs(10));
        let client = NbdDisk::connect(&options).unwrap_or_else(|e| {
            panic!(
                "{} on {} served no client: {e}",
                self.program,
                self.socket.display()
            )
        });
        drop(client);
    }

    /// The libnbd URI of the export.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The generation of the server program.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The server's version line with its generation, e.g. `Debian 13 (trixie root): qemu-nbd
    /// 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)`.
    pub fn version(&self) -> String {
        self.generation.versions(&[self.program])
    }

    /// Kills the server now (by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Unix socket is bound at `path` and listening, from `/proc/net/unix` (whose Flags
/// column has `__SO_ACCEPTCON`, 0x10000, for listening sockets). Without a probe connection, so
/// servers log no failed negotiation.
pub fn is_listening(path: &Path) -> bool {
    const ACCEPTING: u32 = 0x10000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == wanted
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & ACCEPTING != 0)
    })
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a sparse image of `size` bytes with random data at each `(offset, length)`.
pub fn sparse_image(path: &Path, size: u64, islands: &[(u64, usize)]) {
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(size).expect("size image");
    use std::os::unix::fs::FileExt;
    for (i, &(offset, length)) in islands.iter().enumerate() {
        file.write_all_at(&random_bytes(length, i as u64 + 1), offset)
            .expect("write island");
    }
}

/// Writes a fully random image.
pub fn random_image(path: &Path, size: usize, seed: u64) {
    let mut f = std::fs::File::create(path).expect("create image");
    f.write_all(&random_bytes(size, seed)).expect("write image");
}

/// SHA-256 of a file, hex. Uses coreutils' `sha256sum` when present (the `sha2` crate is slow
/// in unoptimised test builds, and images here are hundreds of MiB).
pub fn sha256_file(path: &Path) -> String {
    if let Ok(out) = Command::new("sha256sum").arg(path).output() {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(hex) = text.split_whitespace().next() {
                return hex.to_owned();
            }
        }
    }
    let data = std::fs::read(path).expect("read for checksum");
    sha256(&data)
}

/// SHA-256 of bytes, hex.
pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The machine's `nbdinfo --map[=CONTEXT] URI` as (offset, length, flags) triples, or `None`
/// (after a skip notice) when nbdinfo is missing outside CI.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Option<Vec<(u64, u64, u32)>> {
    nbdinfo_map_in(Generation::Host, uri, context)
}

/// A libnbd tool of `generation`: `nbdinfo`, `nbdcopy`, or in [`Generation::Trixie`] also
/// `nbdinfo-1.24` and `nbdcopy-1.24` (libnbd 1.24 from Debian unstable). A `socket=` in a URI
/// argument is made visible in the root. `None` after a skip notice when missing outside CI.
pub fn nbd_tool(generation: Generation, program: &str) -> Option<PeerCommand> {
    generation.command(program, "libnbd-bin")
}

/// [`nbdinfo_map`] with the `nbdinfo` of `generation`.
pub fn nbdinfo_map_in(
    generation: Generation,
    uri: &str,
    context: Option<&str>,
) -> Option<Vec<(u64, u64, u32)>> {
    let command = nbd_tool(generation, "nbdinfo")?;
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let out = command.arg(map_arg).arg(uri).output();
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("nbdinfo output is UTF-8");
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace();
                let mut next = || {
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .expect("nbdinfo map line")
                };
                let (o, len, f) = (next(), next(), next());
                (o, len, f as u32)
            })
            .collect(),
    )
}

/// Merges adjacent triples with equal flags (nbdinfo prints server extents unmerged).
pub fn merge_map(map: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for &(o, l, f) in map {
        match out.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, f)),
        }
    }
    out
}
