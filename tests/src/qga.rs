//! A real `qemu-ga` for tests, started safely on this machine.
//!
//! The agent acts on the machine it runs on, so [`QemuGa::start`] runs it
//! with every state-changing RPC blocked (`-b`, see research notes qga.md §4)
//! and, when the tests run as root, as `nobody` through `setpriv`: even a
//! command that slipped through the block list could not change the host.
//! Its socket, state directory, log and a scratch directory for file tests
//! live in a temporary directory the test owns. The agent is killed by PID
//! when the handle drops.
//!
//! [`QemuGa::start_in`] and [`QemuGa::start_serial_in`] start the agent of a
//! given [`Generation`]: Debian 12's qemu-ga 7.2 on the machine, or Debian
//! 13's qemu-ga 10.0 in the peer root (chroot in a private mount namespace
//! with `/proc`, `/sys`, `/dev` and the agent's directory mounted; see
//! [`crate::peers`]), with the same block list and user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::peers::{Generation, PeerCommand};

/// RPCs blocked on every agent the tests start: everything that changes the
/// machine, plus `guest-ssh-get-authorized-keys` (reads account data, and
/// serves as the test's "disabled command").
pub const BLOCKED_RPCS: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-set-time",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-set-user-password",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-ssh-get-authorized-keys",
];

/// A running `qemu-ga`: `-m unix-listen`, or `-m isa-serial` on one end of a
/// pseudo-terminal pair made by `socat` (the other end plays the host's
/// character device, which outlives clients and agent restarts like a
/// virtio-serial port).
#[derive(Debug)]
pub struct QemuGa {
    command: PeerCommand,
    child: Option<Child>,
    dir: tempfile::TempDir,
    unprivileged: bool,
    socat: Option<Child>,
}

const NOBODY_UID: u32 = 65534;
const NOGROUP_GID: u32 = 65534;

use crate::running_as_root;

impl QemuGa {
    /// Starts the machine's agent, or returns `None` after a skip notice when
    /// qemu-ga is not installed (fails under `CI=true`).
    pub fn start() -> Option<QemuGa> {
        Self::start_in(Generation::Host)
    }

    /// Starts the agent of `generation`, or returns `None` after a skip notice
    /// when the generation or its qemu-ga is missing (fails under `CI=true`).
    pub fn start_in(generation: Generation) -> Option<QemuGa> {
        Self::start_inner(generation, false)
    }

    /// Starts the machine's agent on a serial line (a pty pair from `socat`);
    /// the host end is [`QemuGa::serial_path`]. `None` after a skip notice
    /// when qemu-ga or socat is missing (fails under `CI=true`).
    pub fn start_serial() -> Option<QemuGa> {
        Self::start_serial_in(Generation::Host)
    }

    /// [`QemuGa::start_serial`] with the agent of `generation` (socat is the
    /// machine's: it plays the host's character device).
    pub fn start_serial_in(generation: Generation) -> Option<QemuGa> {
        Self::start_inner(generation, true)
    }

    fn start_inner(generation: Generation, serial: bool) -> Option<QemuGa> {
        let command = generation.command("qemu-ga", "qemu-guest-agent")?;
        let socat = if serial {
            Some(crate::require_program("socat", "socat")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("vmsdk-qga-")
            .tempdir()
            .expect("temporary directory");
        let unprivileged = running_as_root()
            && (generation != Generation::Host || crate::find_program("setpriv").is_some());
        for sub in ["state", "files"] {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path).expect("create test directory");
            if unprivileged {
                std::os::unix::fs::chown(&path, Some(NOBODY_UID), Some(NOGROUP_GID))
                    .expect("chown to nobody");
            }
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        if unprivileged {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY_UID), Some(NOGROUP_GID))
                .expect("chown to nobody");
        }
        let command = if unprivileged {
            command.as_nobody()
        } else {
            command
        };
        let mut agent = QemuGa {
            command: command.bind(dir.path()),
            child: None,
            dir,
            unprivileged,
            socat: None,
        };
        if let Some(socat) = socat {
            agent.start_socat(&socat);
        }
        agent.spawn();
        Some(agent)
    }

    fn start_socat(&mut self, socat: &Path) {
        let host = format!(
            "pty,raw,echo=0,ignoreeof,link={}",
            self.serial_path().display()
        );
        let mut guest = format!(
            "pty,raw,echo=0,ignoreeof,mode=600,link={}",
            self.guest_serial_path().display()
        );
        if self.unprivileged {
            guest.push_str(",user=nobody");
        }
        let child = Command::new(socat)
            .arg(host)
            .arg(guest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        self.socat = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.serial_path().exists() && self.guest_serial_path().exists()) {
            assert!(
                Instant::now() < deadline,
                "socat did not create its ptys within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let serial = self.socat.is_some();
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let (method, channel) = if serial {
            ("isa-serial", self.guest_serial_path())
        } else {
            ("unix-listen", socket.clone())
        };
        let cmd = self
            .command
            .clone()
            .arg("-m")
            .arg(method)
            .arg("-p")
            .arg(&channel)
            .arg("-t")
            .arg(self.dir.path().join("state"))
            .arg("-l")
            .arg(self.dir.path().join("state").join("qga.log"))
            .arg("-v")
            .arg(format!("--block-rpcs={}", BLOCKED_RPCS.join(",")));
        let child = cmd.spawn(Stdio::null(), Stdio::null());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let pty = std::fs::read_link(&channel).unwrap_or_default();
        // An agent in the peer root shows the pty under the root's path.
        let pty_in_root = self
            .generation()
            .root()
            .map(|root| root.join(pty.strip_prefix("/").unwrap_or(&pty)))
            .unwrap_or_else(|| pty.clone());
        let pid = self.pid().unwrap_or_default();
        // The agent is ready once it holds the channel open: the socket file
        // exists, or the pty shows up among its file descriptors.
        let ready = || {
            if serial {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|fds| {
                        fds.flatten().any(|fd| {
                            std::fs::read_link(fd.path())
                                .is_ok_and(|t| t == pty || t == pty_in_root)
                        })
                    })
                    .unwrap_or(false)
            } else {
                socket.exists()
            }
        };
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "qemu-ga did not open {} within 10 s; log:\n{}",
                channel.display(),
                self.log()
            );
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "qemu-ga exited at start with {status}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The generation of the agent.
    pub fn generation(&self) -> Generation {
        self.command.generation()
    }

    /// The agent's version line with its generation, e.g. `Debian 13 (trixie
    /// root): QEMU Guest Agent 10.0.13`.
    pub fn version(&self) -> String {
        self.generation().versions(&["qemu-ga"])
    }

    /// The agent's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    /// The host end of the serial line (agents from [`QemuGa::start_serial`]).
    pub fn serial_path(&self) -> PathBuf {
        self.dir.path().join("host-tty")
    }

    fn guest_serial_path(&self) -> PathBuf {
        self.dir.path().join("guest-tty")
    }

    /// A directory the agent may read and write (owned by the agent's user).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// Writes a file the agent can read.
    pub fn put_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.files_dir().join(name);
        std::fs::write(&path, contents).expect("write test file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    }

    /// The agent's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the agent process is still running (qemu-ga 7.2 exits when a
    /// client closes with a reply unread).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Starts the agent again if it exited.
    pub fn ensure_running(&mut self) {
        if !self.is_running() {
            self.child = None;
            self.spawn();
        }
    }

    /// Kills the agent (by PID) and starts a new one on the same socket path.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the agent by PID.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} {pid} failed");
        }
    }

    /// Stops the agent with SIGKILL by PID (which also ends a SIGSTOPped agent,
    /// without letting it run first).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state").join("qga.log")).unwrap_or_default()
    }

    /// The directory holding everything of this agent.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut socat) = self.socat.take() {
            let _ = socat.kill();
            let _ = socat.wait();
        }
    }
}
