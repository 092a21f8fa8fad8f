//! Starting a QEMU for a test, as every QEMU-driving helper here does: the generation's
//! `qemu-system-x86_64` with no default devices and no display, QMP monitors on Unix sockets,
//! a wait until every monitor accepts (QEMU creates a socket file when it binds, a moment
//! before it listens), and a kill by its PID when the handle drops: nothing else named qemu
//! is ever touched.
//!
//! [`Qemu`](crate::qemu::Qemu), [`QemuPeer`](crate::qmp::QemuPeer) and
//! [`QemuVm`](crate::qemu_vm::QemuVm) add their machines, disks and helpers on top.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::disk::is_listening;
use crate::peers::{Generation, PeerCommand};

/// How long QEMU may take to accept on its monitors.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The start of a QEMU command line: `qemu-system-x86_64 -nodefaults -display none` of
/// `generation`, with `dir` (where its sockets, images and logs go) bound into the peer root,
/// and a QMP monitor (`-qmp unix:…,server=on,wait=off`) on each of `monitors`. `None` after
/// a skip notice when the generation or its QEMU is missing (a failure under `CI=true`, see
/// [`Generation::command`]).
pub fn qemu_command(
    generation: Generation,
    dir: &Path,
    monitors: &[PathBuf],
) -> Option<PeerCommand> {
    let mut command = generation
        .command("qemu-system-x86_64", "qemu-system-x86")?
        .bind(dir)
        .args(["-nodefaults", "-display", "none"]);
    for monitor in monitors {
        command = command
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    }
    Some(command)
}

/// A running QEMU, killed by its PID when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Option<Child>,
    /// Names it in panics: the generation, or the version line.
    label: String,
}

impl QemuProcess {
    /// Starts `command` (from [`qemu_command`]) and waits until every one of `monitors`
    /// accepts connections. Its standard error goes to `stderr`; piped, it is shown when QEMU
    /// exits before its monitors listen.
    ///
    /// # Panics
    ///
    /// When QEMU exits first, or its monitors do not listen within 30 s.
    pub fn spawn(command: &PeerCommand, monitors: &[PathBuf], stderr: Stdio, label: &str) -> Self {
        let mut process = QemuProcess {
            child: Some(command.spawn(Stdio::null(), stderr)),
            label: label.to_owned(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !monitors.iter().all(|m| is_listening(m)) {
            if let Some(child) = process.child.as_mut() {
                if let Some(status) = child.try_wait().expect("wait for QEMU") {
                    let mut output = String::new();
                    if let Some(mut pipe) = child.stderr.take() {
                        let _ = pipe.read_to_string(&mut output);
                    }
                    panic!(
                        "QEMU ({label}) exited ({status}) before its QMP monitors listened: \
                         {output}"
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "QEMU ({label}) did not listen on its QMP monitors within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    /// The process id (of `unshare`, which becomes QEMU through `exec`, for the peer root).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for QEMU to exit on its own (after a `quit`), then kills it.
    pub fn wait_or_kill(&mut self, timeout: Duration) {
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + timeout;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    eprintln!(
                        "QEMU ({}) did not exit within {timeout:?}: killed",
                        self.label
                    );
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Kills QEMU (SIGKILL, by its PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
