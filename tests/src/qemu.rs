//! A real QEMU for QMP tests: `qemu-system-x86_64` of a [`Generation`] started paused (`-S`)
//! with no machine, no devices and no display, its QMP socket in a temporary directory the
//! test owns, and a second QMP socket for a second client (QEMU serves one client per monitor).
//! Nothing runs in it; it serves block nodes, jobs, bitmaps and NBD exports over QMP. It is
//! killed by PID when the handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::peers::{Generation, PeerCommand};

/// How long QEMU may take to create its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running QEMU with a QMP socket.
#[derive(Debug)]
pub struct Qemu {
    child: Option<Child>,
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
        let command = generation.command("qemu-system-x86_64", "qemu-system-x86")?;
        let dir = tempfile::Builder::new()
            .prefix("qmp-test")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("qmp.sock");
        let log = dir.path().join("qemu.log");
        let version = crate::peers::peer_version(generation, "qemu-system-x86_64")
            .unwrap_or_else(|| "qemu-system-x86_64 (version unknown)".to_owned());
        let command: PeerCommand = command
            .args(["-S", "-nodefaults", "-display", "none", "-no-user-config"])
            .args(machine_args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.path().join("qmp2.sock").display()
            ))
            .arg("-D")
            .arg(&log)
            .bind(dir.path());
        let child = command.spawn(Stdio::null(), Stdio::piped());
        let mut qemu = Qemu {
            child: Some(child),
            dir,
            socket,
            generation,
            version,
        };
        qemu.wait_for_socket();
        Some(qemu)
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        // QEMU creates each socket file when it binds, a moment before it listens: a connect
        // in between is refused. Wait until both monitors accept.
        let second = self.socket.with_file_name("qmp2.sock");
        while !(crate::disk::is_listening(&self.socket) && crate::disk::is_listening(&second)) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait for QEMU"))
            {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.as_mut().and_then(|c| c.stderr.take()) {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!(
                    "{} exited ({status}) before creating its QMP socket: {stderr}",
                    self.version
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on its QMP sockets within {START_TIMEOUT:?}",
                self.version
            );
            std::thread::sleep(Duration::from_millis(10));
        }
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
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Killed by PID: this process started it; nothing else named qemu is touched.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
