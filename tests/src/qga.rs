//! A real `qemu-ga` for tests, started safely on this machine.
//!
//! The agent acts on the machine it runs on, so [`QemuGa::start`] runs it
//! with every state-changing RPC blocked (`-b`, see research notes qga.md §4)
//! and, when the tests run as root, as `nobody` through `setpriv`: even a
//! command that slipped through the block list could not change the host.
//! Its socket, state directory, log and a scratch directory for file tests
//! live in a temporary directory the test owns. The agent is killed by PID
//! when the handle drops.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    binary: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    unprivileged: bool,
    socat: Option<Child>,
}

const NOBODY_UID: u32 = 65534;
const NOGROUP_GID: u32 = 65534;

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

impl QemuGa {
    /// Starts an agent, or returns `None` after a skip notice when qemu-ga is
    /// not installed (fails under `CI=true`).
    pub fn start() -> Option<QemuGa> {
        Self::start_inner(false)
    }

    /// Starts an agent on a serial line (a pty pair from `socat`); the host
    /// end is [`QemuGa::serial_path`]. `None` after a skip notice when qemu-ga
    /// or socat is missing (fails under `CI=true`).
    pub fn start_serial() -> Option<QemuGa> {
        Self::start_inner(true)
    }

    fn start_inner(serial: bool) -> Option<QemuGa> {
        let binary = crate::require_program("qemu-ga", "qemu-guest-agent")?;
        let socat = if serial {
            Some(crate::require_program("socat", "socat")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("vmsdk-qga-")
            .tempdir()
            .expect("temporary directory");
        let unprivileged = running_as_root() && crate::find_program("setpriv").is_some();
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
        let mut agent = QemuGa {
            binary,
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
        let mut cmd = if self.unprivileged {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        cmd.arg("-m")
            .arg(method)
            .arg("-p")
            .arg(&channel)
            .arg("-t")
            .arg(self.dir.path().join("state"))
            .arg("-l")
            .arg(self.dir.path().join("state").join("qga.log"))
            .arg("-v")
            .arg(format!("--block-rpcs={}", BLOCKED_RPCS.join(",")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start qemu-ga");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let pty = std::fs::read_link(&channel).unwrap_or_default();
        let pid = self.pid().unwrap_or_default();
        // The agent is ready once it holds the channel open: the socket file
        // exists, or the pty shows up among its file descriptors.
        let ready = || {
            if serial {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|fds| {
                        fds.flatten()
                            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == pty))
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
