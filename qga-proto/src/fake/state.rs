//! The fake agent's state and its Linux-like defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AgentRelease, FaultQueue, Handler};
use crate::cmd::COMMANDS;
use crate::types::*;

/// Commands qemu-ga keeps enabled while filesystems are frozen (its `ga_freeze_allowlist`,
/// unchanged since 2.x).
pub(crate) const FROZEN_ALLOWED: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// One command the fake knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCommand {
    /// Wire name.
    pub name: String,
    /// Whether it is enabled (a disabled command answers "has been disabled").
    pub enabled: bool,
    /// Whether it answers on success.
    pub success_response: bool,
}

/// A user account of the fake guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    /// Last password set through `guest-set-user-password`, and whether it was crypted.
    pub password: Option<(Password, bool)>,
    /// `~/.ssh/authorized_keys`.
    pub authorized_keys: Vec<String>,
}

/// A file handle of `guest-file-open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    /// Path in the in-memory filesystem.
    pub path: String,
    /// Current position.
    pub position: u64,
    /// Opened for reading.
    pub readable: bool,
    /// Opened for writing.
    pub writable: bool,
    /// Writes go to the end.
    pub append: bool,
}

/// What a canned program was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// Path as given to `guest-exec`.
    pub path: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Standard input.
    pub input: Vec<u8>,
}

/// What a canned program does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutcome {
    /// Exit code after a normal exit.
    pub exitcode: Option<i64>,
    /// Signal after an abnormal exit.
    pub signal: Option<i64>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// How long the process runs before `guest-exec-status` reports it exited.
    pub runtime: Duration,
}

impl ExecOutcome {
    /// Exit with `code` after writing `stdout`.
    pub fn exit(code: i64, stdout: impl Into<Vec<u8>>) -> Self {
        ExecOutcome {
            exitcode: Some(code),
            stdout: stdout.into(),
            ..Default::default()
        }
    }
}

/// A canned program of the fake's `guest-exec`.
pub type Program = Arc<dyn Fn(&ExecRequest) -> ExecOutcome + Send + Sync>;

/// A process started by `guest-exec`.
#[derive(Debug, Clone)]
pub(crate) struct FakeProcess {
    pub outcome: ExecOutcome,
    pub started: Instant,
    pub capture: (bool, bool, bool),
}

/// Something that happened to the fake guest that has no reply to show it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FakeEvent {
    /// `guest-shutdown` with this mode.
    Shutdown(String),
    /// `guest-suspend-disk`.
    SuspendDisk,
    /// `guest-suspend-ram`.
    SuspendRam,
    /// `guest-suspend-hybrid`.
    SuspendHybrid,
}

/// Everything the fake guest is. Public fields: tests read and change them
/// directly through [`super::FakeAgent::state`].
pub struct FakeState {
    /// The release whose error texts and argument rules the fake follows.
    pub release: AgentRelease,
    /// `guest-info` version.
    pub version: String,
    /// Registered commands, in `guest-info` order.
    pub commands: Vec<FakeCommand>,
    /// Handlers replacing the built-in behaviour, by command.
    pub handlers: BTreeMap<String, Handler>,
    /// `guest-get-osinfo`.
    pub osinfo: GuestOSInfo,
    /// `guest-get-host-name`.
    pub host_name: String,
    /// `guest-get-timezone`.
    pub timezone: GuestTimezone,
    /// Offset added to the host clock for `guest-get-time` (changed by `guest-set-time`).
    pub clock_offset_ns: i64,
    /// `guest-get-users`.
    pub users: Vec<GuestUser>,
    /// Accounts for passwords and SSH keys.
    pub accounts: BTreeMap<String, Account>,
    /// `guest-network-get-interfaces`.
    pub interfaces: Vec<GuestNetworkInterface>,
    /// `guest-network-get-route`.
    pub routes: Vec<GuestNetworkRoute>,
    /// `guest-get-fsinfo`.
    pub filesystems: Vec<GuestFilesystemInfo>,
    /// `guest-get-disks`.
    pub disks: Vec<GuestDiskInfo>,
    /// `guest-get-diskstats`.
    pub diskstats: Vec<GuestDiskStatsInfo>,
    /// `guest-get-cpustats`.
    pub cpustats: Vec<GuestCpuStats>,
    /// `guest-get-load`.
    pub load: GuestLoadAverage,
    /// `guest-get-devices` (Windows guests).
    pub devices: Vec<GuestDeviceInfo>,
    /// `guest-get-vcpus` (changed by `guest-set-vcpus`).
    pub vcpus: Vec<GuestLogicalProcessor>,
    /// `guest-get-memory-blocks` (changed by `guest-set-memory-blocks`).
    pub memory_blocks: Vec<GuestMemoryBlock>,
    /// `guest-get-memory-block-info`.
    pub memory_block_size: u64,
    /// In-memory filesystem: path to contents.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Open handles.
    pub open_files: BTreeMap<i64, OpenFile>,
    /// Next handle (qemu-ga starts at 1000 and never reuses one).
    pub next_handle: i64,
    /// Canned programs by absolute path.
    pub programs: BTreeMap<String, Program>,
    pub(crate) processes: BTreeMap<i64, FakeProcess>,
    /// Next PID handed out by `guest-exec`.
    pub next_pid: i64,
    /// Whether filesystems are frozen.
    pub frozen: bool,
    /// Shutdowns and suspends received.
    pub events: Vec<FakeEvent>,
    /// Every command name received, in order (including the client's syncs).
    pub requests: Vec<String>,
    pub(crate) faults: FaultQueue,
}

impl fmt::Debug for FakeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeState")
            .field("release", &self.release)
            .field("version", &self.version)
            .field("commands", &self.commands.len())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("host_name", &self.host_name)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("open_files", &self.open_files)
            .field("programs", &self.programs.keys().collect::<Vec<_>>())
            .field("frozen", &self.frozen)
            .field("events", &self.events)
            .field("requests", &self.requests.len())
            .finish_non_exhaustive()
    }
}

impl FakeState {
    /// Registers `name` (enabled or not) if it is not known yet.
    pub fn register(&mut self, name: &str, enabled: bool) {
        if let Some(c) = self.commands.iter_mut().find(|c| c.name == name) {
            c.enabled = enabled;
        } else {
            let success_response = crate::cmd::spec(name).is_none_or(|s| s.success_response);
            self.commands.push(FakeCommand {
                name: name.to_owned(),
                enabled,
                success_response,
            });
        }
    }

    /// Disables `name`, as `qemu-ga --block-rpcs` does.
    pub fn disable(&mut self, name: &str) {
        if let Some(c) = self.commands.iter_mut().find(|c| c.name == name) {
            c.enabled = false;
        }
    }

    /// Enables `name` again.
    pub fn enable(&mut self, name: &str) {
        if let Some(c) = self.commands.iter_mut().find(|c| c.name == name) {
            c.enabled = true;
        }
    }

    /// Removes `name` entirely, like an older agent that lacks it.
    pub fn remove(&mut self, name: &str) {
        self.commands.retain(|c| c.name != name);
        self.handlers.remove(name);
    }

    /// Adds a canned program at `path`.
    pub fn program<F>(&mut self, path: &str, program: F)
    where
        F: Fn(&ExecRequest) -> ExecOutcome + Send + Sync + 'static,
    {
        self.programs.insert(path.to_owned(), Arc::new(program));
    }

    /// Looks up a program the way `g_spawn` with a search path would.
    pub(crate) fn find_program(&self, path: &str) -> Option<Program> {
        if path.contains('/') || self.programs.contains_key(path) {
            return self.programs.get(path).cloned();
        }
        ["/usr/bin/", "/bin/"]
            .iter()
            .find_map(|dir| self.programs.get(&format!("{dir}{path}")).cloned())
    }

    /// A Windows Server guest running the virtio-win agent: its own version
    /// numbering, `guest-get-devices`, no Linux-only commands, drive letters,
    /// no `guest-exec` programs beyond the ones a test adds.
    pub fn windows() -> Self {
        const LINUX_ONLY: &[&str] = &[
            "guest-suspend-hybrid",
            "guest-set-vcpus",
            "guest-get-memory-blocks",
            "guest-set-memory-blocks",
            "guest-get-memory-block-info",
            "guest-get-diskstats",
            "guest-get-cpustats",
        ];
        let mut state = FakeState::linux();
        state.version = "108.0.2".into();
        state.commands = COMMANDS
            .iter()
            .filter(|c| !LINUX_ONLY.contains(&c.name))
            .map(|c| FakeCommand {
                name: c.name.to_owned(),
                enabled: true,
                success_response: c.success_response,
            })
            .collect();
        state.osinfo = GuestOSInfo {
            kernel_release: Some("20348".into()),
            kernel_version: Some("10.0".into()),
            machine: Some("x86_64".into()),
            id: Some("mswindows".into()),
            name: Some("Microsoft Windows".into()),
            pretty_name: Some("Windows Server 2022 Standard".into()),
            version: Some("Microsoft Windows Server 2022".into()),
            version_id: Some("2022".into()),
            variant: Some("server".into()),
            variant_id: Some("server".into()),
        };
        state.host_name = "WIN-FAKE".into();
        state.timezone = GuestTimezone {
            zone: Some("Coordinated Universal Time".into()),
            offset: 0,
        };
        state.users = vec![GuestUser {
            user: "Administrator".into(),
            domain: Some("WIN-FAKE".into()),
            login_time: 1_700_000_000.5,
        }];
        for fs in &mut state.filesystems {
            fs.name = "\\\\?\\Volume{5ad3bdb7-0000-0000-0000-100000000000}\\".into();
            fs.mountpoint = "C:\\".into();
            fs.r#type = "NTFS".into();
            fs.total_bytes_privileged = None;
        }
        state.routes.clear();
        state.cpustats.clear();
        state.diskstats.clear();
        state.devices = vec![GuestDeviceInfo {
            driver_name: "Red Hat VirtIO SCSI controller".into(),
            driver_date: Some(1_690_848_000_000_000_000),
            driver_version: Some("100.94.104.24000".into()),
            id: Some(GuestDeviceId::Pci(GuestDeviceIdPCI {
                vendor_id: 0x1af4,
                device_id: 0x1004,
            })),
        }];
        state.accounts = [("Administrator".to_owned(), Account::default())]
            .into_iter()
            .collect();
        state.files = [(
            "C:\\Windows\\System32\\drivers\\etc\\hosts".to_owned(),
            b"127.0.0.1 localhost\r\n".to_vec(),
        )]
        .into_iter()
        .collect();
        state.programs.clear();
        state.program("cmd.exe", |r| {
            let text = r
                .args
                .iter()
                .skip_while(|a| a.as_str() != "/c")
                .skip(1)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            match text.strip_prefix("echo ") {
                Some(rest) => ExecOutcome::exit(0, format!("{rest}\r\n")),
                None => ExecOutcome {
                    exitcode: Some(1),
                    stderr: format!("'{text}' is not recognized\r\n").into_bytes(),
                    ..Default::default()
                },
            }
        });
        state
    }

    /// The state of a small Debian guest running qemu-ga 10.0.
    pub fn linux() -> Self {
        Self::linux_release(AgentRelease::Qemu10_0)
    }

    /// The state of a small Debian guest running `release` of qemu-ga: the commands a Linux
    /// build of that release has (before 9.1 with the Windows-only ones listed disabled, since
    /// then left out), the reply members it sends and its error texts.
    pub fn linux_release(release: AgentRelease) -> Self {
        let commands = COMMANDS
            .iter()
            .filter(|c| c.since <= release.numbers())
            .filter_map(|c| {
                let windows_only = c.availability == "CONFIG_WIN32";
                (!windows_only || release.lists_platform_stubs()).then(|| FakeCommand {
                    name: c.name.to_owned(),
                    enabled: !windows_only,
                    success_response: c.success_response,
                })
            })
            .collect();

        let disk_address = GuestDiskAddress {
            pci_controller: GuestPCIAddress {
                domain: 0,
                bus: 0,
                slot: 2,
                function: 0,
            },
            bus_type: GuestDiskBusType::Virtio,
            bus: 0,
            target: 0,
            unit: 0,
            serial: None,
            dev: Some("/dev/vda".into()),
            ccw_address: None,
        };
        let mut accounts = BTreeMap::new();
        accounts.insert("root".to_owned(), Account::default());
        accounts.insert(
            "debian".to_owned(),
            Account {
                password: None,
                authorized_keys: vec![
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests debian@host".into(),
                ],
            },
        );
        let mut files = BTreeMap::new();
        files.insert("/etc/hostname".to_owned(), b"fake-guest\n".to_vec());
        files.insert(
            "/etc/os-release".to_owned(),
            b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n".to_vec(),
        );

        let mut state = FakeState {
            release,
            version: release.version().into(),
            commands,
            handlers: BTreeMap::new(),
            osinfo: GuestOSInfo {
                kernel_release: Some("6.1.0-28-amd64".into()),
                kernel_version: Some("#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)".into()),
                machine: Some("x86_64".into()),
                id: Some("debian".into()),
                name: Some("Debian GNU/Linux".into()),
                pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
                version: Some("12 (bookworm)".into()),
                version_id: Some("12".into()),
                variant: None,
                variant_id: None,
            },
            host_name: "fake-guest".into(),
            timezone: GuestTimezone {
                zone: Some("UTC".into()),
                offset: 0,
            },
            clock_offset_ns: 0,
            users: vec![GuestUser {
                user: "debian".into(),
                domain: None,
                login_time: 1_700_000_000.25,
            }],
            accounts,
            interfaces: vec![
                GuestNetworkInterface {
                    name: "lo".into(),
                    hardware_address: Some("00:00:00:00:00:00".into()),
                    ip_addresses: Some(vec![
                        GuestIpAddress {
                            ip_address: "127.0.0.1".into(),
                            ip_address_type: GuestIpAddressType::Ipv4,
                            prefix: 8,
                        },
                        GuestIpAddress {
                            ip_address: "::1".into(),
                            ip_address_type: GuestIpAddressType::Ipv6,
                            prefix: 128,
                        },
                    ]),
                    statistics: Some(GuestNetworkInterfaceStat {
                        rx_bytes: 3193,
                        rx_packets: 29,
                        rx_errs: 0,
                        rx_dropped: 0,
                        tx_bytes: 3193,
                        tx_packets: 29,
                        tx_errs: 0,
                        tx_dropped: 0,
                    }),
                },
                GuestNetworkInterface {
                    name: "eth0".into(),
                    hardware_address: Some("52:54:00:12:34:56".into()),
                    ip_addresses: Some(vec![GuestIpAddress {
                        ip_address: "192.0.2.2".into(),
                        ip_address_type: GuestIpAddressType::Ipv4,
                        prefix: 24,
                    }]),
                    statistics: Some(GuestNetworkInterfaceStat {
                        rx_bytes: 26_688_598,
                        rx_packets: 1676,
                        rx_errs: 0,
                        rx_dropped: 0,
                        tx_bytes: 214_258,
                        tx_packets: 1397,
                        tx_errs: 0,
                        tx_dropped: 0,
                    }),
                },
            ],
            routes: vec![GuestNetworkRoute {
                iface: "eth0".into(),
                destination: "0.0.0.0".into(),
                metric: 0,
                gateway: Some("192.0.2.1".into()),
                mask: Some("0.0.0.0".into()),
                irtt: Some(0),
                flags: Some(3),
                refcnt: Some(0),
                r#use: Some(0),
                window: Some(0),
                mtu: Some(0),
                desprefixlen: None,
                source: None,
                srcprefixlen: None,
                nexthop: None,
                version: 4,
            }],
            filesystems: vec![GuestFilesystemInfo {
                name: "vda1".into(),
                mountpoint: "/".into(),
                r#type: "ext4".into(),
                used_bytes: Some(1_234_567_168),
                total_bytes: Some(10_434_273_280),
                total_bytes_privileged: Some(10_968_498_176),
                disk: vec![disk_address.clone()],
            }],
            disks: vec![GuestDiskInfo {
                name: "/dev/vda".into(),
                partition: false,
                dependencies: Some(vec![]),
                address: Some(disk_address),
                alias: None,
                smart: None,
            }],
            diskstats: vec![GuestDiskStatsInfo {
                name: "vda".into(),
                major: 254,
                minor: 0,
                stats: GuestDiskStats {
                    read_sectors: Some(402_184),
                    read_ios: Some(9_020),
                    write_sectors: Some(118_736),
                    write_ios: Some(3_114),
                    ..Default::default()
                },
            }],
            cpustats: (0..2)
                .map(|cpu| {
                    GuestCpuStats::Linux(GuestLinuxCpuStats {
                        cpu,
                        user: 10_710,
                        nice: 0,
                        system: 12_320,
                        idle: 367_860,
                        iowait: Some(580),
                        irq: Some(0),
                        softirq: Some(190),
                        steal: Some(180),
                        guest: Some(0),
                        guestnice: Some(0),
                    })
                })
                .collect(),
            load: GuestLoadAverage {
                load1m: 0.08,
                load5m: 0.03,
                load15m: 0.01,
            },
            devices: Vec::new(),
            vcpus: vec![
                GuestLogicalProcessor {
                    logical_id: 0,
                    online: true,
                    can_offline: Some(false),
                },
                GuestLogicalProcessor {
                    logical_id: 1,
                    online: true,
                    can_offline: Some(true),
                },
            ],
            memory_blocks: (0..8)
                .map(|i| GuestMemoryBlock {
                    phys_index: i,
                    online: true,
                    can_offline: Some(i > 0),
                })
                .collect(),
            memory_block_size: 128 * 1024 * 1024,
            files,
            open_files: BTreeMap::new(),
            next_handle: 1000,
            programs: BTreeMap::new(),
            processes: BTreeMap::new(),
            next_pid: 4000,
            frozen: false,
            events: Vec::new(),
            requests: Vec::new(),
            faults: FaultQueue::new(),
        };
        if !release.fs_usage() {
            for fs in &mut state.filesystems {
                fs.used_bytes = None;
                fs.total_bytes = None;
                for disk in &mut fs.disk {
                    disk.dev = None;
                    disk.serial = None;
                }
            }
        }
        if !release.privileged_bytes() {
            for fs in &mut state.filesystems {
                fs.total_bytes_privileged = None;
            }
        }
        install_programs(&mut state);
        state
    }
}

fn install_programs(state: &mut FakeState) {
    state.program("/bin/echo", |r| {
        let mut args = r.args.as_slice();
        let newline = args.first().map(String::as_str) != Some("-n");
        if !newline {
            args = &args[1..];
        }
        let mut out = args.join(" ").into_bytes();
        if newline {
            out.push(b'\n');
        }
        ExecOutcome::exit(0, out)
    });
    state.program("/bin/cat", |r| ExecOutcome::exit(0, r.input.clone()));
    state.program("/bin/uname", |r| {
        let all = r.args.iter().any(|a| a == "-a");
        let text: &[u8] = if all {
            b"Linux fake-guest 6.1.0-28-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22) x86_64 GNU/Linux\n"
        } else {
            b"Linux\n"
        };
        ExecOutcome::exit(0, text)
    });
    state.program("/bin/true", |_| ExecOutcome::exit(0, Vec::new()));
    state.program("/bin/false", |_| ExecOutcome::exit(1, Vec::new()));
    state.program("/bin/sleep", |r| {
        let secs = r
            .args
            .first()
            .and_then(|a| a.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0);
        match secs {
            Some(s) => ExecOutcome {
                exitcode: Some(0),
                runtime: Duration::from_secs_f64(s.min(3600.0)),
                ..Default::default()
            },
            None => ExecOutcome {
                exitcode: Some(1),
                stderr: b"sleep: invalid time interval\n".to_vec(),
                ..Default::default()
            },
        }
    });
    // `sh -c SCRIPT` for scripts of `;`-separated `echo WORDS` (`>&2` for stderr), `cat`,
    // `exit N` and `kill -TERM $$`: enough for exit-status and capture tests.
    state.program("/bin/sh", |r| {
        let script = match r.args.as_slice() {
            [flag, script, ..] if flag == "-c" => script.trim(),
            _ => {
                return ExecOutcome {
                    exitcode: Some(2),
                    stderr: b"sh: only -c is supported by the fake\n".to_vec(),
                    ..Default::default()
                }
            }
        };
        let mut outcome = ExecOutcome::exit(0, Vec::new());
        for (line, step) in script.split(';').map(str::trim).enumerate() {
            if let Some(code) = step
                .strip_prefix("exit ")
                .and_then(|c| c.trim().parse().ok())
            {
                outcome.exitcode = Some(code);
                return outcome;
            }
            if step == "kill -TERM $$" {
                outcome.exitcode = None;
                outcome.signal = Some(15);
                return outcome;
            }
            if step == "cat" {
                outcome.stdout.extend_from_slice(&r.input);
                continue;
            }
            if let Some(words) = step.strip_prefix("echo ") {
                let (words, to_stderr) = match words.trim().strip_suffix(">&2") {
                    Some(w) => (w.trim(), true),
                    None => (words.trim(), false),
                };
                let text = format!("{words}\n").into_bytes();
                if to_stderr {
                    outcome.stderr.extend(text);
                } else {
                    outcome.stdout.extend(text);
                }
                continue;
            }
            outcome.exitcode = Some(127);
            outcome
                .stderr
                .extend(format!("sh: {}: {step}: not found\n", line + 1).into_bytes());
            return outcome;
        }
        outcome
    });
}
