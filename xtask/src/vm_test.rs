//! `cargo xtask vm-test`: boots a real QEMU virtual machine (software emulation, TCG, q35 with
//! `vmport=on`) and proves the SDK where it is meant to run.
//!
//! * Guest: Debian's own kernel (`apt-get download` + `dpkg -x`, cached) and a small initramfs
//!   written here (busybox, the virtio modules in dependency order, the Debian qemu-ga and
//!   systemd-detect-virt with their shared libraries, `vmsdk` and the `guest_checks` program of
//!   `vmsdk-tests`). `/init` runs `guest_checks`, which prints
//!   `VMSDK-CHECK <name> PASS|FAIL <detail>` lines on the serial console (captured to
//!   `<target>/vm-test/console-<profile>.log`); the host requires every expected check to PASS.
//! * Three boots ([`Profile`]):
//!   - `qemu`: QEMU as it is. `vmsdk detect` against systemd-detect-virt, `vmsdk stats` with the
//!     Linux backend, the backdoor refused under QEMU's CPUID signature. Then the guest starts
//!     qemu-ga and the host runs the `vm_guest_agent` test of `vmsdk-tests` through the
//!     virtio-serial chardev and QMP: qga-proto's clients, the `vmsdk agent` CLI, a killed
//!     client and resync, an application-consistent live backup with `vmsdk backup` of a
//!     qcow2 data disk (ext4 at `/data`, written to by the guest all along) frozen through the
//!     guest's qemu-ga, full then incremental, verified, restored and `e2fsck`ed, an
//!     incremental backup by hand (dirty bitmap, QEMU's NBD server, disk-transport's NBD
//!     client), and `guest-shutdown` last, after which QEMU must exit 0.
//!   - `vmware-dmi`: no CPUID hypervisor bit and a VMware DMI vendor, so guest-stats' own
//!     detection accepts the backdoor and QEMU's vmport answers it: the fault guard without
//!     I/O privilege, then GETVERSION through the real `asm!` port I/O after `iopl(3)`.
//!   - `qemu10`: today's QEMU. The same checks as `qemu`, with Debian 13's QEMU 10.0
//!     (`qemu-system-x86_64` of the peer root, run there by chroot in a private mount namespace,
//!     see [`crate::peer_root`]) and an image carrying Debian 13's qemu-ga 10.0 and
//!     systemd-detect-virt 257 with the root's libraries: detection parity, the agent checks,
//!     the incremental backup through QEMU 10's NBD export and `guest-shutdown`.
//!
//! `cargo xtask vm-test [PROFILE...]` runs the named boots only (all by default).
//!
//! Every wait is bounded; a failure prints the guest console's tail. Everything is cached under
//! `<target>/vm-test/` (`CARGO_TARGET_DIR` is honoured), so a second run downloads nothing;
//! delete `<target>/vm-test/kernel` to take a newer Debian kernel.

mod cpio;
mod initramfs;
mod kernel;

use std::env;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The Debian packages the VM test needs, with the file that proves each is installed.
pub(crate) const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("qemu-guest-agent", "/usr/sbin/qemu-ga"),
    ("systemd", "/usr/bin/systemd-detect-virt"),
    // strip keeps the initramfs small; ldd finds the libraries to ship.
    ("binutils", "/usr/bin/strip"),
    ("libc-bin", "/usr/bin/ldd"),
    // The data disk: ext4 made on the host, converted to qcow2.
    ("e2fsprogs", "/sbin/mkfs.ext4"),
    ("qemu-utils", "/usr/bin/qemu-img"),
];

/// Kernel modules the guest loads: virtio over PCI, the console/serial ports qemu-ga uses, and
/// the block device of the disk checks, and ext4 for the data disk the live backup freezes
/// (with the generic crc32c its metadata checksums need; TCG's CPU has no SSE 4.2).
const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// Which QEMU boots the guest, and whose qemu-ga and systemd-detect-virt go into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peers {
    /// Debian 12's, installed on this machine (QEMU and qemu-ga 7.2, systemd 252).
    Host,
    /// Debian 13's, from the peer root (QEMU and qemu-ga 10.0, systemd 257).
    Trixie,
}

/// One way of booting the guest: what QEMU pretends to be, and what the guest must report.
#[derive(Debug)]
struct Profile {
    /// The boot's name (console log `console-<name>.log`, `cargo xtask vm-test <name>`).
    name: &'static str,
    /// `vmsdk.profile=` on the kernel command line; `guest_checks` picks its checks by it.
    guest_profile: &'static str,
    /// Whose QEMU and guest programs.
    peers: Peers,
    /// Every check `guest_checks` must report here; a missing one is a failure.
    checks: &'static [&'static str],
    /// Extra QEMU arguments.
    qemu_args: &'static [&'static str],
    /// Whether the guest starts qemu-ga and the host checks run (else the guest powers off
    /// after its checks).
    agent: bool,
}

/// QEMU as it is: detection, statistics, the library refusing a non-VMware backdoor, then the
/// guest agent and disk checks from the host.
const QEMU: Profile = Profile {
    name: "qemu",
    guest_profile: "qemu",
    peers: Peers::Host,
    checks: &[
        "detect",
        "detect-evidence",
        "detect-parity",
        "stats",
        "backdoor-refused",
    ],
    qemu_args: &[],
    agent: true,
};

/// QEMU dressed as a VMware guest that hides the hypervisor bit (DMI says VMware), so that the
/// library's own detection accepts the backdoor, which QEMU's vmport device then answers.
const VMWARE_DMI: Profile = Profile {
    name: "vmware-dmi",
    guest_profile: "vmware-dmi",
    peers: Peers::Host,
    checks: &[
        "vmware-environment",
        "detect-parity",
        "backdoor-guard",
        "backdoor-getversion",
    ],
    qemu_args: &[
        "-cpu",
        "qemu64,hypervisor=off",
        "-smbios",
        "type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform",
    ],
    agent: false,
};

/// [`QEMU`] on Debian 13's QEMU 10.0 with its qemu-ga 10.0 and systemd-detect-virt 257.
const QEMU10: Profile = Profile {
    name: "qemu10",
    guest_profile: "qemu",
    peers: Peers::Trixie,
    checks: QEMU.checks,
    qemu_args: &[],
    agent: true,
};

/// Every boot, in the order they run.
const PROFILES: &[&Profile] = &[&QEMU, &VMWARE_DMI, &QEMU10];

/// The VMX type QEMU's vmport is told to report (default 2); the guest checks it gets this one.
const VMX_TYPE: u32 = 4;
/// The backdoor version QEMU's vmport reports (6, what VMware products answer).
const VMX_VERSION: u32 = 6;

/// Time limits, generous for TCG on two cores but bounded.
const BOOT_AND_GUEST_CHECKS: Duration = Duration::from_secs(300);
const AGENT_START: Duration = Duration::from_secs(60);
const HOST_TESTS: Duration = Duration::from_secs(300);
const QEMU_EXIT: Duration = Duration::from_secs(60);

/// The guest's virtio disk (`/dev/vda`, QEMU node `disk0`), zero-filled at every boot; the host
/// checks export it over NBD with a dirty bitmap.
const DISK_SIZE: u64 = 64 * 1024 * 1024;

/// The guest's second virtio disk (QEMU node `data0`, serial `vmsdk-data`): a qcow2 image
/// (persistent checkpoint bitmaps need qcow2) holding an ext4 filesystem made on the host at
/// every boot, mounted at `/data` in the guest, which writes to it while the host backs it up
/// live, frozen through the guest's qemu-ga.
const DATA_DISK_SIZE: u64 = 64 * 1024 * 1024;
/// The data disk's node name and virtio serial.
const DATA_NODE: &str = "data0";
const DATA_SERIAL: &str = "vmsdk-data";

/// vCPUs of the guest: one is enough, and TCG on a two-core host runs it fastest.
const GUEST_CPUS: u32 = 1;

/// One timed step, printed as it starts and ends.
pub(crate) struct Phase {
    name: String,
    started: Instant,
}

impl Phase {
    pub(crate) fn start(name: impl Into<String>) -> Phase {
        let name = name.into();
        println!("==> vm-test: {name}");
        Phase {
            name,
            started: Instant::now(),
        }
    }

    pub(crate) fn done(self, detail: &str) {
        println!(
            "<== vm-test: {} ok in {:.1} s ({detail})",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Runs a command to completion and turns a failure into an error message with its output.
pub(crate) fn run_checked(command: &mut Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("could not start {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Where the pieces of one run live.
struct Layout {
    root: PathBuf,
    target: PathBuf,
    /// `<target>/vm-test`: the kernel cache and the last run's image and console log.
    cache: PathBuf,
    /// Unix sockets need short paths (108 bytes), so they live in a private /tmp directory.
    sockets: PathBuf,
}

/// Runs every boot.
pub fn run(root: &Path) -> Result<(), String> {
    run_selected(root, &[])
}

/// Runs the boots named in `names` (every boot when empty).
pub fn run_selected(root: &Path, names: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let profiles: Vec<&Profile> = if names.is_empty() {
        PROFILES.to_vec()
    } else {
        let mut chosen = Vec::new();
        for name in names {
            let profile = PROFILES.iter().find(|p| p.name == name).ok_or_else(|| {
                let known: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
                format!("unknown vm-test boot `{name}`; known: {}", known.join(", "))
            })?;
            chosen.push(*profile);
        }
        chosen
    };
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                root.join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| root.join("target"));
    let layout = Layout {
        root: root.to_path_buf(),
        cache: target.join("vm-test"),
        target,
        sockets: env::temp_dir().join(format!("vmsdk-vm-test-{}", std::process::id())),
    };
    fs::create_dir_all(&layout.cache)
        .map_err(|e| format!("create {}: {e}", layout.cache.display()))?;
    fs::create_dir_all(&layout.sockets)
        .map_err(|e| format!("create {}: {e}", layout.sockets.display()))?;
    let result = run_in(&layout, &profiles);
    let _ = fs::remove_dir_all(&layout.sockets);
    let total = started.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("vm-test: PASSED in {total:.1} s"),
        Err(_) => println!("vm-test: FAILED after {total:.1} s"),
    }
    result
}

fn run_in(layout: &Layout, profiles: &[&Profile]) -> Result<(), String> {
    install_packages()?;
    // Debian 13's QEMU and guest programs come from the peer root (built once, as root).
    let peer_root = if profiles.iter().any(|p| p.peers == Peers::Trixie) {
        Some(crate::peer_root::ensure(&layout.root)?)
    } else {
        None
    };
    let kernel = kernel::fetch(&layout.cache)?;
    let binaries = build_binaries(layout)?;
    let mut images = Vec::new();
    for peers in [Peers::Host, Peers::Trixie] {
        if !profiles.iter().any(|p| p.peers == peers) {
            continue;
        }
        let (image, root) = match peers {
            Peers::Host => (layout.cache.join("initramfs.cpio"), None),
            Peers::Trixie => (
                layout.cache.join("initramfs-trixie.cpio"),
                peer_root.as_deref(),
            ),
        };
        build_image(&kernel, &binaries, &image, root)?;
        images.push((peers, image));
    }
    let mut failures = Vec::new();
    for profile in profiles {
        let image = images
            .iter()
            .find(|(peers, _)| *peers == profile.peers)
            .map(|(_, image)| image.as_path())
            .ok_or("no image for this boot")?;
        let root = match profile.peers {
            Peers::Host => None,
            Peers::Trixie => peer_root.as_deref(),
        };
        let console = layout.cache.join(format!("console-{}.log", profile.name));
        let vm = Vm::boot(layout, &kernel, image, &console, profile, root)?;
        let found = drive(vm, layout, &binaries, &kernel, profile, root);
        if !found.is_empty() {
            print_console_tail(&console);
        }
        failures.extend(found);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        for failure in &failures {
            println!("vm-test: FAIL {failure}");
        }
        Err(format!("{} vm-test check(s) failed", failures.len()))
    }
}

fn install_packages() -> Result<(), String> {
    let phase = Phase::start("packages");
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        phase.done("all present");
        return Ok(());
    }
    if !super::is_root() {
        return Err(format!(
            "the VM test needs these Debian packages: {}; install them or run as root",
            missing.join(" ")
        ));
    }
    let apt = |args: &[&str], what: &str| {
        run_checked(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            what,
        )
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(missing.iter().copied());
    // Try with the lists there are; refresh them only when that fails.
    if apt(&install, "apt-get install").is_err() {
        apt(&["update", "-q"], "apt-get update")?;
        apt(&install, "apt-get install")?;
    }
    phase.done(&format!("installed {}", missing.join(" ")));
    Ok(())
}

/// The programs built from this workspace.
struct Binaries {
    vmsdk: PathBuf,
    guest_checks: PathBuf,
    host_test: PathBuf,
}

fn build_binaries(layout: &Layout) -> Result<Binaries, String> {
    let phase = Phase::start("build");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "vmsdk",
            "--features",
            "vmsdk/cli",
            "--bin",
            "vmsdk",
            "-p",
            "vmsdk-tests",
            "--bin",
            "guest_checks",
        ])
        .env("CARGO_TARGET_DIR", &layout.target)
        .current_dir(&layout.root)
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !status.success() {
        return Err("building vmsdk and guest_checks failed".to_owned());
    }
    // The host half is a test target; its path comes from cargo's machine-readable output.
    let out = Command::new(&cargo)
        .args([
            "test",
            "--quiet",
            "--no-run",
            "--message-format=json",
            "-p",
            "vmsdk-tests",
            "--test",
            "vm_guest_agent",
        ])
        .env("CARGO_TARGET_DIR", &layout.target)
        .current_dir(&layout.root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !out.status.success() {
        return Err("building the vm_guest_agent test failed".to_owned());
    }
    let host_test = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("\"vm_guest_agent\""))
        .find_map(json_executable)
        .ok_or("cargo did not report the vm_guest_agent test executable")?;
    let debug = layout.target.join("debug");
    let binaries = Binaries {
        vmsdk: debug.join("vmsdk"),
        guest_checks: debug.join("guest_checks"),
        host_test: PathBuf::from(host_test),
    };
    phase.done("vmsdk, guest_checks, vm_guest_agent");
    Ok(binaries)
}

/// The `"executable"` string of one cargo JSON message (paths here need no unescaping beyond
/// backslashes and quotes).
fn json_executable(line: &str) -> Option<String> {
    let rest = line.split_once("\"executable\":\"")?.1;
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

/// Writes the initramfs: our binaries, and qemu-ga and systemd-detect-virt from `peer_root`
/// (with that root's libraries) or, without one, from this machine.
fn build_image(
    kernel: &kernel::Kernel,
    binaries: &Binaries,
    image: &Path,
    peer_root: Option<&Path>,
) -> Result<(), String> {
    let phase = Phase::start(format!(
        "initramfs ({})",
        image.file_name().unwrap_or_default().to_string_lossy()
    ));
    let modules = kernel::module_load_order(kernel, GUEST_MODULES)?;
    let script = init_script(&kernel.release, &modules);
    let qemu_ga = Path::new("/usr/sbin/qemu-ga");
    let programs = [
        initramfs::Program {
            host: &binaries.vmsdk,
            guest: "/usr/bin/vmsdk",
            root: None,
        },
        initramfs::Program {
            host: &binaries.guest_checks,
            guest: "/usr/bin/guest_checks",
            root: None,
        },
        initramfs::Program {
            host: qemu_ga,
            guest: "/usr/sbin/qemu-ga",
            root: peer_root,
        },
        // The reference `vmsdk detect` is compared with, run in the same guest.
        initramfs::Program {
            host: Path::new("/usr/bin/systemd-detect-virt"),
            guest: "/usr/bin/systemd-detect-virt",
            root: peer_root,
        },
    ];
    let size = initramfs::build(
        &initramfs::Contents {
            kernel,
            modules: &modules,
            busybox: Path::new("/bin/busybox"),
            programs: &programs,
            init_script: &script,
        },
        image,
    )?;
    let names: Vec<String> = modules
        .iter()
        .filter_map(|m| m.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    phase.done(&format!(
        "{:.1} MiB, modules {}",
        size as f64 / (1024.0 * 1024.0),
        names.join(" ")
    ));
    Ok(())
}

/// The guest's `/init`: mount the pseudo filesystems, load the modules, run the checks, start
/// qemu-ga on the virtio-serial port, then wait for the host to shut the VM down.
fn init_script(release: &str, modules: &[PathBuf]) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| {
            format!(
                "insmod /lib/modules/{release}/{} || echo \"VMSDK-STAGE insmod-failed {}\"\n",
                m.display(),
                m.display()
            )
        })
        .collect();
    format!(
        r#"#!/bin/sh
/bin/busybox mkdir -p /usr/sbin /sbin
/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname vmsdk-vm-test
echo "VMSDK-STAGE init $(uname -r)"
{insmods}
# udev is absent: find the agent's port by name and make the link udev would.
port=""
tries=0
while [ -z "$port" ] && [ $tries -lt 200 ]; do
  for dir in /sys/class/virtio-ports/*; do
    if [ "$(cat "$dir/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -e "/dev/${{dir##*/}}" ]; then
      port="/dev/${{dir##*/}}"
    fi
  done
  [ -z "$port" ] && sleep 0.1
  tries=$((tries + 1))
done
if [ -n "$port" ]; then
  mkdir -p /dev/virtio-ports
  ln -sf "$port" /dev/virtio-ports/org.qemu.guest_agent.0
fi
echo "VMSDK-STAGE agent-port ${{port:-missing}}"
# The data disk, found by its serial: ext4 at /data, written to while the host backs it up.
data=""
for dir in /sys/block/vd*; do
  [ "$(cat "$dir/serial" 2>/dev/null)" = {DATA_SERIAL} ] && data="/dev/${{dir##*/}}"
done
mkdir -p /data
if [ -n "$data" ] && mount -t ext4 "$data" /data; then
  echo "VMSDK-STAGE data-mounted $data"
else
  echo "VMSDK-STAGE data-missing ${{data:-no-disk}}"
fi
/usr/bin/guest_checks --vmsdk /usr/bin/vmsdk
echo "VMSDK-GUEST-CHECKS-DONE"
if ! grep -q "vmsdk.agent=1" /proc/cmdline; then
  sync
  poweroff -f
fi
# A writer that keeps the data disk busy (one line a tick, synced) through the live backups;
# the host reads /data/log to see it went on during and after them.
if grep -q " /data " /proc/mounts; then
  (
    i=0
    while true; do
      i=$((i + 1))
      echo "write $i" > "/data/file.$((i % 16))"
      echo "$i" >> /data/log
      sync
      sleep 0.1
    done
  ) </dev/null >/dev/null 2>&1 &
  echo "VMSDK-STAGE data-writer $!"
fi
mkdir -p /run/qemu-ga
# This agent acts on the throwaway guest, so nothing is blocked: exec and shutdown are tested.
qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run/qemu-ga -l /run/qemu-ga/qemu-ga.log &
echo "VMSDK-STAGE agent-started $!"
while true; do sleep 3600; done
"#
    )
}

/// The running QEMU and the paths of its sockets.
struct Vm {
    child: Child,
    console: PathBuf,
    qga_socket: PathBuf,
    qmp_socket: PathBuf,
}

impl Vm {
    /// Starts QEMU: this machine's, or with `peer_root` the root's, run there with the cache
    /// and socket directories bind-mounted at their own paths.
    fn boot(
        layout: &Layout,
        kernel: &kernel::Kernel,
        image: &Path,
        console: &Path,
        profile: &Profile,
        peer_root: Option<&Path>,
    ) -> Result<Vm, String> {
        let phase = Phase::start(format!("boot ({})", profile.name));
        let qga_socket = layout.sockets.join("qga.sock");
        let qmp_socket = layout.sockets.join("qmp.sock");
        let _ = fs::remove_file(console);
        let disk = layout.cache.join("disk.raw");
        // Truncating to 0 first drops the last run's data: the disk starts all zeros.
        fs::File::create(&disk)
            .and_then(|file| file.set_len(DISK_SIZE))
            .map_err(|e| format!("create {}: {e}", disk.display()))?;
        let data_disk = layout.cache.join("data.qcow2");
        make_data_disk(&layout.cache, &data_disk)?;
        let append = format!(
            "console=ttyS0 panic=-1 quiet vmsdk.profile={} vmsdk.agent={} \
             vmsdk.vmx_type={VMX_TYPE} vmsdk.vmx_version={VMX_VERSION}",
            profile.guest_profile,
            u8::from(profile.agent)
        );
        let mut command = match peer_root {
            None => Command::new("qemu-system-x86_64"),
            Some(root) => crate::peer_root::command_in_root(
                root,
                &[&layout.cache, &layout.sockets],
                "qemu-system-x86_64",
            ),
        };
        command
            .args(["-accel", "tcg", "-machine", "q35,vmport=on", "-m", "512"])
            .arg("-smp")
            .arg(GUEST_CPUS.to_string())
            .args(["-nographic", "-nodefaults", "-no-reboot"])
            .arg("-global")
            .arg(format!("vmport.vmware-vmx-type={VMX_TYPE}"))
            .arg("-global")
            .arg(format!("vmport.vmware-vmx-version={VMX_VERSION}"))
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(image)
            .arg("-append")
            .arg(append)
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga0,path={},server=on,wait=off",
                qga_socket.display()
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=disk0-file,filename={}",
                disk.display()
            ))
            .args(["-blockdev", "driver=raw,node-name=disk0,file=disk0-file"])
            .args(["-device", "virtio-blk-pci,drive=disk0"])
            // After disk0, so that disk0 stays the guest's vda.
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name={DATA_NODE}-file,filename={}",
                data_disk.display()
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver=qcow2,node-name={DATA_NODE},file={DATA_NODE}-file"
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive={DATA_NODE},serial={DATA_SERIAL}"
            ))
            .args(["-device", "virtio-serial-pci,id=virtio-serial0"])
            .args([
                "-device",
                "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .args(profile.qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let child = command
            .spawn()
            .map_err(|e| format!("could not start qemu-system-x86_64: {e}"))?;
        let version = match peer_root {
            None => Command::new("qemu-system-x86_64").arg("--version").output(),
            Some(root) => crate::peer_root::in_root(root, &["qemu-system-x86_64", "--version"])
                .map_err(std::io::Error::other),
        }
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
        let vm = Vm {
            child,
            console: console.to_path_buf(),
            qga_socket,
            qmp_socket,
        };
        phase.done(&format!("{version}, pid {}", vm.child.id()));
        Ok(vm)
    }

    /// Kills QEMU (by its own PID) if it is still running.
    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the data disk afresh: ext4 made by `mkfs.ext4` on a raw file, converted to qcow2
/// (the form QEMU keeps persistent bitmaps in), 0600.
fn make_data_disk(cache: &Path, out: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;

    let raw = cache.join("data.raw");
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(out);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&raw)
        .and_then(|file| file.set_len(DATA_DISK_SIZE))
        .map_err(|e| format!("create {}: {e}", raw.display()))?;
    let result = run_checked(
        Command::new("/sbin/mkfs.ext4")
            .args(["-q", "-F", "-L", "vmsdk-data"])
            .arg(&raw),
        "mkfs.ext4 of the data disk",
    )
    .and_then(|()| {
        run_checked(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(out),
            "qemu-img convert of the data disk",
        )
    });
    let _ = fs::remove_file(&raw);
    result?;
    fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", out.display()))
}

/// Follows the console log as QEMU writes it, echoing the `VMSDK-` lines.
struct ConsoleWatch {
    path: PathBuf,
    offset: u64,
    partial: String,
    lines: Vec<String>,
}

impl ConsoleWatch {
    fn new(path: &Path) -> ConsoleWatch {
        ConsoleWatch {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        }
    }

    fn poll(&mut self) {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return;
        }
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            // From the marker on: the firmware's screen-clearing escapes may precede it.
            if let Some(at) = line.find("VMSDK-") {
                println!("    guest| {}", &line[at..]);
            }
            self.lines.push(line);
        }
    }

    fn find(&self, marker: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|line| line.find(marker).map(|at| &line[at..]))
    }

    /// Waits until a console line contains `marker`; fails early if QEMU exits.
    fn wait_for(&mut self, vm: &mut Vm, marker: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            self.poll();
            if let Some(line) = self.find(marker) {
                return Ok(line.to_owned());
            }
            if let Ok(Some(status)) = vm.child.try_wait() {
                self.poll();
                return Err(format!(
                    "QEMU exited ({status}) before the guest printed `{marker}`"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the guest did not print `{marker}` within {} s",
                    limit.as_secs()
                ));
            }
            sleep(Duration::from_millis(200));
        }
    }
}

/// Runs one boot to its end and returns what failed.
fn drive(
    mut vm: Vm,
    layout: &Layout,
    binaries: &Binaries,
    kernel: &kernel::Kernel,
    profile: &Profile,
    peer_root: Option<&Path>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut watch = ConsoleWatch::new(&vm.console);
    if let Err(e) = guest_checks(&mut vm, &mut watch, profile, &mut failures) {
        failures.push(e);
        return failures;
    }
    if profile.agent {
        if let Err(e) = host_checks(&mut vm, &mut watch, layout, binaries, kernel, peer_root) {
            failures.push(e);
        }
    }
    let phase = Phase::start(format!("qemu exit ({})", profile.name));
    let deadline = Instant::now() + QEMU_EXIT;
    let exit = loop {
        watch.poll();
        match vm.child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(200)),
            _ => break None,
        }
    };
    match exit {
        Some(status) if status.success() => phase.done("QEMU exited with status 0"),
        Some(status) => failures.push(format!("QEMU exited with {status}")),
        None => {
            vm.kill();
            failures.push(format!(
                "QEMU still running {} s after the guest was told to power off; killed",
                QEMU_EXIT.as_secs()
            ));
        }
    }
    failures
}

/// Waits for the guest's own checks and collects their verdicts.
fn guest_checks(
    vm: &mut Vm,
    watch: &mut ConsoleWatch,
    profile: &Profile,
    failures: &mut Vec<String>,
) -> Result<(), String> {
    let phase = Phase::start(format!("guest boot and in-guest checks ({})", profile.name));
    watch.wait_for(vm, "VMSDK-GUEST-CHECKS-DONE", BOOT_AND_GUEST_CHECKS)?;
    let mut passed = 0;
    for name in profile.checks {
        let marker = format!("VMSDK-CHECK {name} ");
        match watch.find(&marker) {
            Some(line) if line[marker.len()..].starts_with("PASS") => passed += 1,
            Some(line) => failures.push(format!("{}: guest check {line}", profile.name)),
            None => failures.push(format!(
                "{}: guest check `{name}` reported nothing",
                profile.name
            )),
        }
    }
    // A check the harness does not know about must not fail unseen either.
    for line in watch
        .lines
        .iter()
        .filter_map(|l| l.find("VMSDK-CHECK ").map(|at| &l[at..]))
    {
        let mut words = line.split_whitespace().skip(1);
        let (name, status) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if status != "PASS" && !profile.checks.contains(&name) {
            failures.push(format!("{}: guest check {line}", profile.name));
        }
    }
    for marker in ["VMSDK-STAGE insmod-failed", "VMSDK-STAGE data-missing"] {
        if let Some(line) = watch.find(marker) {
            failures.push(format!("{}: {line}", profile.name));
        }
    }
    phase.done(&format!(
        "{passed}/{} guest checks passed",
        profile.checks.len()
    ));
    Ok(())
}

/// Runs the `vm_guest_agent` test against the guest's qemu-ga; it ends with guest-shutdown.
fn host_checks(
    vm: &mut Vm,
    watch: &mut ConsoleWatch,
    layout: &Layout,
    binaries: &Binaries,
    kernel: &kernel::Kernel,
    peer_root: Option<&Path>,
) -> Result<(), String> {
    let phase = Phase::start("agent start");
    watch.wait_for(vm, "VMSDK-STAGE agent-started", AGENT_START)?;
    // Without its port the agent cannot answer; say so now rather than after sync timeouts.
    if watch.find("VMSDK-STAGE agent-port missing").is_some() {
        return Err("the guest found no org.qemu.guest_agent.0 virtio-serial port".to_owned());
    }
    phase.done("qemu-ga running in the guest");

    let phase = Phase::start("host checks through virtio-serial and QMP (vm_guest_agent)");
    // The version of the qemu-ga put into the guest: this machine's or the peer root's.
    let qga_version = match peer_root {
        None => Command::new("/usr/sbin/qemu-ga").arg("-V").output(),
        Some(root) => crate::peer_root::in_root(root, &["/usr/sbin/qemu-ga", "-V"])
            .map_err(std::io::Error::other),
    }
    .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    .unwrap_or_default();
    let mut host = Command::new(&binaries.host_test)
        .env("VMSDK_VM_QGA_SOCKET", &vm.qga_socket)
        .env("VMSDK_VM_QMP_SOCKET", &vm.qmp_socket)
        .env("VMSDK_VM_KERNEL_RELEASE", &kernel.release)
        .env("VMSDK_VM_QGA_VERSION", qga_version)
        .env("VMSDK_VM_SOCKET_DIR", &layout.sockets)
        .env("VMSDK_VM_DISK_SIZE", DISK_SIZE.to_string())
        .env("VMSDK_VM_CPUS", GUEST_CPUS.to_string())
        .env("VMSDK_VM_VMSDK_BIN", &binaries.vmsdk)
        .env("VMSDK_VM_DATA_NODE", DATA_NODE)
        .current_dir(&layout.root)
        .spawn()
        .map_err(|e| format!("could not run {}: {e}", binaries.host_test.display()))?;
    let deadline = Instant::now() + HOST_TESTS;
    let status = loop {
        watch.poll();
        match host.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(200)),
            _ => {
                let _ = host.kill();
                let _ = host.wait();
                break None;
            }
        }
    };
    match status {
        Some(status) if status.success() => {
            phase.done("all host checks passed");
            Ok(())
        }
        Some(status) => Err(format!("host checks failed ({status})")),
        None => Err(format!(
            "host checks did not finish within {} s",
            HOST_TESTS.as_secs()
        )),
    }
}

fn print_console_tail(console: &Path) {
    let text = fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(60);
    println!(
        "---- guest console ({}), last {} lines ----",
        console.display(),
        lines.len() - from
    );
    for line in &lines[from..] {
        println!("{line}");
    }
    println!("---- end of guest console ----");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_json_executable_is_extracted() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"vm_guest_agent"},"executable":"/t/debug/deps/vm_guest_agent-0a1b","fresh":true}"#;
        assert_eq!(
            json_executable(line).as_deref(),
            Some("/t/debug/deps/vm_guest_agent-0a1b")
        );
        assert_eq!(json_executable(r#"{"executable":null}"#), None);
    }

    #[test]
    fn init_loads_modules_in_the_given_order() {
        let script = init_script(
            "6.1.0-1-amd64",
            &[
                PathBuf::from("kernel/drivers/virtio/virtio.ko"),
                PathBuf::from("kernel/drivers/char/virtio_console.ko"),
            ],
        );
        let first = script.find("virtio/virtio.ko").unwrap();
        let second = script.find("virtio_console.ko").unwrap();
        assert!(first < second);
        assert!(script.contains("/lib/modules/6.1.0-1-amd64/kernel/drivers/virtio/virtio.ko"));
        assert!(script.starts_with("#!/bin/sh\n"));
    }
}
