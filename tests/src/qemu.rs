//! A real QEMU for QMP tests: `qemu-system-x86_64` of a [`Generation`] started paused (`-S`)
//! with no machine, no devices and no display, its QMP socket in a temporary directory the
//! test owns, and a second QMP socket for a second client (QEMU serves one client per monitor).
//! Nothing runs in it; it serves block nodes, jobs, bitmaps and NBD exports over QMP. It is
//! killed by PID when the handle drops ([`QemuProcess`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::peers::Generation;
use crate::qemu_process::{qemu_command, QemuProcess};

/// A running QEMU with a QMP socket.
#[derive(Debug)]
pub struct Qemu {
    process: QemuProcess,
    dir: tempfile::TempDir,
    socket: PathBuf,
    generation: Generation,
    version: String,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -S -nodefaults -display none -machine none` of `generation`
    /// with a QMP socket, or returns `None` after a skip notice when the generation or QEMU is
    /// missing (and panics under `CI=true`, see [`Generation::command`]).
    pub fn start_in(generation: Generation) -> Option<Qemu> {
        Self::start_with(generation, &["-machine", "none"])
    }

    /// Like [`Qemu::start_in`] with other machine arguments instead of `-machine none`.
    pub fn start_with(generation: Generation, machine_args: &[&str]) -> Option<Qemu> {
        let dir = tempfile::Builder::new()
            .prefix("qmp-test")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("qmp.sock");
        let monitors = [socket.clone(), dir.path().join("qmp2.sock")];
        let command = qemu_command(generation, dir.path(), &monitors)?
            .args(["-S", "-no-user-config"])
            .args(machine_args)
            .arg("-D")
            .arg(dir.path().join("qemu.log"));
        let version = crate::peers::peer_version(generation, "qemu-system-x86_64")
            .unwrap_or_else(|| "qemu-system-x86_64 (version unknown)".to_owned());
        let process = QemuProcess::spawn(&command, &monitors, Stdio::piped(), &version);
        Some(Qemu {
            process,
            dir,
            socket,
            generation,
            version,
        })
    }

    /// The QMP socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The socket as a `qmp+unix://` address.
    pub fn address(&self) -> String {
        format!("qmp+unix://{}", self.socket.display())
    }

    /// The second monitor's socket as a `qmp+unix://` address.
    pub fn second_address(&self) -> String {
        format!("qmp+unix://{}", self.dir.path().join("qmp2.sock").display())
    }

    /// The test's directory (visible to QEMU at the same path): images and NBD sockets go here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generation this QEMU belongs to.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// QEMU's version line, e.g. `QEMU emulator version 7.2.22 (Debian …)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The process id (of `unshare`, which becomes QEMU through `exec`, for the root).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}
