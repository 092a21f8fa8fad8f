//! A QEMU VM for the live-backup tests: `qemu-system-x86_64 -S` (no guest code runs; the
//! block layer, QMP and the NBD server do) with qcow2 disks, two QMP monitors (one for the
//! code under test, one for the test's guest writes) and guest writes made at known moments
//! through HMP's `qemu-io`, so every byte of every disk is known at every moment.
//! [`QemuVm::start_booting`] makes one that runs and boots from its first disk instead, for
//! guest code in a boot sector that a test wrote there (its writes go through the device, so
//! its error policy applies, which `qemu-io` skips).
//!
//! The VM of a [`Generation`] is that generation's QEMU (Debian 12's 7.2 on the machine,
//! Debian 13's 10.0 in the peer root); it is killed by its PID when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::peers::Generation;
use crate::qemu_process::{qemu_command, QemuProcess};

/// A running QEMU with qcow2 disks; see the [module docs](self).
#[derive(Debug)]
pub struct QemuVm {
    process: QemuProcess,
    /// The test's connection to its monitor, kept: QEMU may hand an event of a connection
    /// that just closed (`BLOCK_EXPORT_DELETED` of a hard export removal) to the next one
    /// before its greeting, so a connection per command fails now and then.
    test_monitor: std::sync::Mutex<Option<qmp_proto::Client<std::os::unix::net::UnixStream>>>,
    generation: Generation,
    dir: PathBuf,
    disks: Vec<(String, u64)>,
    /// The contents every disk has now, by the writes the test made.
    model: Vec<Vec<u8>>,
}

impl QemuVm {
    /// Starts the QEMU of `generation` in `dir` (bound into the peer root) with a qcow2 disk
    /// `NAME.qcow2` of each `(NAME, SIZE)` (node name NAME, device NAME-dev), created by the
    /// generation's qemu-img when missing. `None` (after a skip notice) when the generation or
    /// QEMU is missing outside CI.
    pub fn start(generation: Generation, dir: &Path, disks: &[(&str, u64)]) -> Option<QemuVm> {
        Self::launch(generation, dir, disks, false)
    }

    /// Like [`start`](Self::start), but the VM runs: the firmware boots from the first disk
    /// (which the test has made with a boot sector), and the guest's debug console (port
    /// 0xe9) goes to `debugcon.log` in `dir` ([`debug_console`](Self::debug_console)). The
    /// disks' model knows nothing of what the images held before, nor of the guest's writes.
    pub fn start_booting(
        generation: Generation,
        dir: &Path,
        disks: &[(&str, u64)],
    ) -> Option<QemuVm> {
        Self::launch(generation, dir, disks, true)
    }

    /// What the guest wrote on its debug console so far (a VM of
    /// [`start_booting`](Self::start_booting)).
    pub fn debug_console(&self) -> String {
        std::fs::read_to_string(self.dir.join("debugcon.log")).unwrap_or_default()
    }

    fn launch(
        generation: Generation,
        dir: &Path,
        disks: &[(&str, u64)],
        boot: bool,
    ) -> Option<QemuVm> {
        let mut model = Vec::new();
        for (name, size) in disks {
            let image = dir.join(format!("{name}.qcow2"));
            if !image.exists() {
                let out = generation
                    .command("qemu-img", "qemu-utils")?
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&image)
                    .arg(size.to_string())
                    .output();
                crate::assert_success(&out, "qemu-img create");
            }
            model.push(vec![0u8; *size as usize]);
        }
        let monitors = [dir.join("qmp.sock"), dir.join("qmp-test.sock")];
        let mut command = qemu_command(generation, dir, &monitors)?.args([
            "-m",
            "64",
            "-machine",
            "pc,accel=tcg",
        ]);
        command = if boot {
            command
                .arg("-debugcon")
                .arg(format!("file:{}", dir.join("debugcon.log").display()))
        } else {
            command.arg("-S")
        };
        for (i, (name, _)) in disks.iter().enumerate() {
            let bootindex = if boot && i == 0 { ",bootindex=0" } else { "" };
            command = command
                .arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name={name}-file",
                    dir.join(format!("{name}.qcow2")).display()
                ))
                .arg("-blockdev")
                .arg(format!("driver=qcow2,file={name}-file,node-name={name}"))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive={name},id={name}-dev{bootindex}"
                ));
        }
        // qemu-io's reports (one per write) would drown the test's output.
        let process = QemuProcess::spawn(
            &command,
            &monitors,
            Stdio::inherit(),
            &generation.to_string(),
        );
        let vm = QemuVm {
            process,
            test_monitor: std::sync::Mutex::new(None),
            generation,
            dir: dir.to_owned(),
            disks: disks.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            model,
        };
        Some(vm)
    }

    /// The QMP socket for the code under test.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// `qmp+unix://` URI of [`qmp`](Self::qmp).
    pub fn qmp_uri(&self) -> String {
        format!("qmp+unix://{}", self.qmp().display())
    }

    /// A scratch directory for the backup source, inside the VM's directory (so QEMU in the
    /// peer root sees it).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// The generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The QEMU version line.
    pub fn version(&self) -> String {
        self.generation.versions(&["qemu-system-x86_64"])
    }

    /// The socket of the test's second monitor, for a client of the test's own (a benchmark
    /// driving QEMU's push jobs) or a second client under test; close the test's own
    /// connection to it first ([`close_test_monitor`](Self::close_test_monitor)): QEMU serves
    /// one client per monitor.
    pub fn test_qmp(&self) -> PathBuf {
        self.dir.join("qmp-test.sock")
    }

    /// `qmp+unix://` URI of [`test_qmp`](Self::test_qmp).
    pub fn test_qmp_uri(&self) -> String {
        format!("qmp+unix://{}", self.test_qmp().display())
    }

    /// QEMU's process id (for its CPU time in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Closes the test's connection to its monitor; the next command opens a new one.
    pub fn close_test_monitor(&self) {
        *self
            .test_monitor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// Runs `f` on the test's monitor connection (made on first use).
    fn on_test_monitor<T>(
        &self,
        f: impl FnOnce(&mut qmp_proto::Client<std::os::unix::net::UnixStream>) -> T,
    ) -> T {
        let mut guard = self
            .test_monitor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let monitor = guard.get_or_insert_with(|| {
            qmp_proto::Client::connect_unix(self.test_qmp(), qmp_proto::ClientConfig::default())
                .expect("connect to the test's QMP monitor")
        });
        f(monitor)
    }

    /// Runs an HMP command on the test's monitor and returns its output.
    pub fn hmp(&self, command_line: &str) -> String {
        use qmp_proto::Monitor;
        let out = self
            .on_test_monitor(|monitor| {
                monitor.execute_raw(
                    "human-monitor-command",
                    Some(json!({ "command-line": command_line })),
                )
            })
            .unwrap_or_else(|e| panic!("HMP {command_line}: {e}"));
        out.as_str().unwrap_or_default().to_owned()
    }

    /// The guest writes `pattern` bytes at `offset..offset+length` of disk `name` (through
    /// the device, as the guest would: `qemu-io -d NAME-dev "write -P PATTERN OFF LEN"`).
    pub fn write(&mut self, name: &str, offset: u64, length: u64, pattern: u8) {
        if let Err(out) = self.try_write(name, offset, length, pattern) {
            panic!("qemu-io write on {name}: {out}");
        }
    }

    /// Like [`write`](Self::write), for a write the test expects to fail (the guest's write
    /// broken by a backup's copy-before-write filter): it is not recorded in the disk's
    /// model, so a later comparison with the model shows whether it really failed. qemu-io
    /// reports a failed write (`write failed: ...`) on QEMU's standard output only, not in
    /// the monitor's answer, which is returned.
    pub fn write_expecting_failure(
        &mut self,
        name: &str,
        offset: u64,
        length: u64,
        pattern: u8,
    ) -> String {
        self.hmp(&format!(
            "qemu-io -d /machine/peripheral/{name}-dev/virtio-backend \"write -P {pattern} {offset} {length}\""
        ))
    }

    fn try_write(
        &mut self,
        name: &str,
        offset: u64,
        length: u64,
        pattern: u8,
    ) -> Result<(), String> {
        let out = self.write_expecting_failure(name, offset, length, pattern);
        // qemu-io prints its report on QEMU's standard output; the monitor's answer is empty
        // unless the command failed.
        if out.to_lowercase().contains("error") || out.contains("failed") {
            return Err(out);
        }
        let i = self.index(name);
        self.model[i][offset as usize..(offset + length) as usize].fill(pattern);
        Ok(())
    }

    /// The guest writes zeros (`write -z`).
    pub fn write_zeroes(&mut self, name: &str, offset: u64, length: u64) {
        let out = self.hmp(&format!(
            "qemu-io -d /machine/peripheral/{name}-dev/virtio-backend \"write -z {offset} {length}\""
        ));
        assert!(
            !out.to_lowercase().contains("error") && !out.contains("failed"),
            "qemu-io write -z on {name}: {out}"
        );
        let i = self.index(name);
        self.model[i][offset as usize..(offset + length) as usize].fill(0);
    }

    fn index(&self, name: &str) -> usize {
        self.disks
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no disk {name}"))
    }

    /// What disk `name` holds now, by the writes made.
    pub fn contents(&self, name: &str) -> Vec<u8> {
        self.model[self.index(name)].clone()
    }

    /// What vmsdk made in this QEMU that a finished backup does not keep: block exports, jobs,
    /// `vmsdk-` nodes, and bitmaps other than `keep` (unnamed ones are the copy-before-write
    /// filter's of a backup job left running).
    pub fn vmsdk_leftovers(&self, keep: &str) -> Vec<String> {
        let mut found = Vec::new();
        for export in self
            .qmp_command("query-block-exports", Value::Null)
            .as_array()
            .unwrap()
        {
            found.push(format!("export {}", export["id"]));
        }
        for job in self
            .qmp_command("query-jobs", Value::Null)
            .as_array()
            .unwrap()
        {
            found.push(format!("job {}", job["id"]));
        }
        let nodes = self.qmp_command("query-named-block-nodes", json!({"flat": true}));
        for node in nodes.as_array().unwrap() {
            let name = node["node-name"].as_str().unwrap_or_default();
            if name.starts_with("vmsdk-") {
                found.push(format!("node {name}"));
            }
            for bitmap in node["dirty-bitmaps"].as_array().into_iter().flatten() {
                let bitmap = bitmap["name"].as_str().unwrap_or("(unnamed)");
                if bitmap != keep {
                    found.push(format!("bitmap {bitmap} on {name}"));
                }
            }
        }
        found
    }

    /// A QMP command on the test's monitor.
    pub fn qmp_command(&self, command: &str, arguments: Value) -> Value {
        use qmp_proto::Monitor;
        let arguments = (!arguments.is_null()).then_some(arguments);
        self.on_test_monitor(|monitor| monitor.execute_raw(command, arguments))
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    /// Quits QEMU cleanly (persistent bitmaps are stored) and waits for it.
    pub fn quit(mut self) {
        let _ = self.qmp_command("quit", Value::Null);
        self.close_test_monitor();
        self.process.wait_or_kill(Duration::from_secs(20));
    }

    /// Kills QEMU (SIGKILL, by PID): persistent bitmaps are not stored.
    pub fn kill(&mut self) {
        self.close_test_monitor();
        self.process.kill();
    }
}
