//! Types against the wire: replies recorded from qemu-ga 7.2.22
//! (shared/research/qga-schemas/probe-7.2-*.txt) decode into the typed
//! structures and serialise back to the same JSON; every command of the
//! protocol reference has a `Command` type.

use std::collections::BTreeSet;
use std::path::Path;

use qga_proto::cmd::{self, Command, COMMANDS};
use qga_proto::types::*;
use qga_proto::ErrorClass;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Decodes `return` of a recorded reply line as `T` and checks that encoding
/// `T` again gives the same JSON value.
fn round_trip<T: DeserializeOwned + Serialize + std::fmt::Debug>(reply_line: &str) -> T {
    let reply: Value = serde_json::from_str(reply_line).expect("recorded line is JSON");
    let ret = reply["return"].clone();
    let typed: T =
        serde_json::from_value(ret.clone()).unwrap_or_else(|e| panic!("{reply_line}: {e}"));
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        ret,
        "round trip of {reply_line}"
    );
    typed
}

#[test]
fn probe_replies_round_trip() {
    let os: GuestOSInfo = round_trip(
        r##"{"return": {"name": "Debian GNU/Linux", "kernel-release": "6.18.44-fc-v657", "version": "12 (bookworm)", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12", "kernel-version": "#1 SMP PREEMPT_DYNAMIC @0", "machine": "x86_64", "id": "debian"}}"##,
    );
    assert_eq!(os.version_id.as_deref(), Some("12"));
    let host: GuestHostName = round_trip(r#"{"return": {"host-name": "vm"}}"#);
    assert_eq!(host.host_name, "vm");
    let tz: GuestTimezone = round_trip(r#"{"return": {"zone": "UTC", "offset": 0}}"#);
    assert_eq!(tz.offset, 0);
    let users: Vec<GuestUser> = round_trip(r#"{"return": []}"#);
    assert!(users.is_empty());
    let cpus: Vec<GuestLogicalProcessor> = round_trip(
        r#"{"return": [{"online": true, "can-offline": true, "logical-id": 1}, {"online": true, "can-offline": false, "logical-id": 0}]}"#,
    );
    assert_eq!(cpus[1].can_offline, Some(false));
    let mb: GuestMemoryBlockInfo = round_trip(r#"{"return": {"size": 134217728}}"#);
    assert_eq!(mb.size, 134217728);
    let fz: GuestFsfreezeStatus = round_trip(r#"{"return": "thawed"}"#);
    assert_eq!(fz, GuestFsfreezeStatus::Thawed);
    let ifs: Vec<GuestNetworkInterface> = round_trip(
        r#"{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}, {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}], "statistics": {"tx-packets": 29, "tx-errs": 0, "rx-bytes": 3193, "rx-dropped": 0, "rx-packets": 29, "rx-errs": 0, "tx-bytes": 3193, "tx-dropped": 0}, "hardware-address": "00:00:00:00:00:00"}, {"name": "ifb0", "hardware-address": "16:4c:0f:1e:a6:ea"}]}"#,
    );
    assert_eq!(
        ifs[0].ip_addresses.as_ref().unwrap()[1].ip_address_type,
        GuestIpAddressType::Ipv6
    );
    assert!(ifs[1].statistics.is_none());
    let fs: Vec<GuestFilesystemInfo> = round_trip(
        r#"{"return": [{"name": "vda", "total-bytes": 97572749312, "mountpoint": "/", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 2, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 12019163136, "type": "ext4"}]}"#,
    );
    assert_eq!(fs[0].disk[0].bus_type, GuestDiskBusType::Virtio);
    let stats: Vec<GuestCpuStats> = round_trip(
        r#"{"return": [{"cpu": 0, "guestnice": 0, "idle": 367860, "steal": 180, "iowait": 580, "system": 12320, "guest": 0, "nice": 0, "irq": 0, "type": "linux", "user": 10710, "softirq": 190}]}"#,
    );
    assert!(matches!(&stats[0], GuestCpuStats::Linux(s) if s.steal == Some(180)));
    let ds: Vec<GuestDiskStatsInfo> = round_trip(
        r#"{"return": [{"name": "loop0", "stats": {"discard-sectors": 0, "write-ios": 0, "discard-ios": 0, "discard-ticks": 0, "weight-ticks": 0, "read-ios": 0, "flush-ios": 0, "write-sectors": 0, "write-merges": 0, "write-ticks": 0, "ios-pgr": 0, "read-sectors": 0, "read-merges": 0, "total-ticks": 0, "discard-merges": 0, "flush-ticks": 0, "read-ticks": 0}, "minor": 0, "major": 7}]}"#,
    );
    assert_eq!(ds[0].stats.weight_ticks, Some(0));
    let disks: Vec<GuestDiskInfo> = round_trip(
        r#"{"return": [{"name": "/dev/vda", "dependencies": [], "partition": false, "address": {"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 2, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}}]}"#,
    );
    assert!(!disks[0].partition);
    let blocks: Vec<GuestMemoryBlock> =
        round_trip(r#"{"return": [{"online": true, "can-offline": true, "phys-index": 188}]}"#);
    assert_eq!(blocks[0].phys_index, 188);
}

#[test]
fn probe_exec_and_file_replies_round_trip() {
    let pid: GuestExec = round_trip(r#"{"return": {"pid": 9544}}"#);
    assert_eq!(pid.pid, 9544);
    let st: GuestExecStatus = round_trip(
        r#"{"return": {"exitcode": 0, "out-data": "aGVsbG8gcWdhCg==", "out-truncated": false, "exited": true}}"#,
    );
    assert_eq!(st.out_data.unwrap().0, b"hello qga\n");
    let st: GuestExecStatus = round_trip(r#"{"return": {"signal": 15, "exited": true}}"#);
    assert_eq!(st.signal, Some(15));
    let st: GuestExecStatus = round_trip(r#"{"return": {"exited": false}}"#);
    assert!(!st.exited);
    let read: GuestFileRead =
        round_trip(r#"{"return": {"count": 5, "buf-b64": "aGVsbG8=", "eof": false}}"#);
    assert_eq!(read.buf_b64.0, b"hello");
    let eof: GuestFileRead = round_trip(r#"{"return": {"count": 0, "buf-b64": "", "eof": true}}"#);
    assert!(eof.eof);
    let seek: GuestFileSeek = round_trip(r#"{"return": {"eof": false, "position": 0}}"#);
    assert_eq!(seek.position, 0);
    let handle: i64 = round_trip(r#"{"return": 1000}"#);
    assert_eq!(handle, 1000);
}

#[test]
fn guest_info_of_7_2_round_trips_and_answers_queries() {
    let line = r#"{"return": {"version": "7.2.22", "supported_commands": [{"enabled": true, "name": "guest-get-cpustats", "success-response": true}, {"enabled": false, "name": "guest-shutdown", "success-response": false}, {"enabled": false, "name": "guest-get-devices", "success-response": true}]}}"#;
    let info: GuestAgentInfo = round_trip(line);
    assert_eq!(info.version_numbers(), Some((7, 2)));
    assert!(info.is_enabled("guest-get-cpustats"));
    assert!(!info.is_enabled("guest-shutdown"));
    assert!(!info.command("guest-shutdown").unwrap().success_response);
    assert!(info.command("guest-get-load").is_none());
}

#[test]
fn old_agents_without_success_response_decode() {
    // Agents before 1.7 do not send `success-response`.
    let info: GuestAgentInfo =
        serde_json::from_value(json!({"version": "1.5.0", "supported_commands": [{"name": "guest-ping", "enabled": true}]}))
            .unwrap();
    assert!(info.supported_commands[0].success_response);
}

#[test]
fn unknown_enum_values_and_union_variants_are_kept() {
    let addr: GuestIpAddress =
        serde_json::from_value(json!({"ip-address": "x", "ip-address-type": "ipv7", "prefix": 1}))
            .unwrap();
    assert_eq!(
        addr.ip_address_type,
        GuestIpAddressType::Other("ipv7".into())
    );
    assert_eq!(
        serde_json::to_value(&addr).unwrap()["ip-address-type"],
        "ipv7"
    );

    let stats: GuestCpuStats =
        serde_json::from_value(json!({"type": "freebsd", "cpu": 0, "user": 1})).unwrap();
    match &stats {
        GuestCpuStats::Other { os, members } => {
            assert_eq!(os.as_str(), "freebsd");
            assert_eq!(members["user"], 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        serde_json::to_value(&stats).unwrap(),
        json!({"type": "freebsd", "cpu": 0, "user": 1})
    );

    let smart: GuestDiskSmart = serde_json::from_value(json!({"type": "scsi"})).unwrap();
    assert!(matches!(
        smart,
        GuestDiskSmart::Other {
            bus_type: GuestDiskBusType::Scsi,
            ..
        }
    ));
    let id: GuestDeviceId =
        serde_json::from_value(json!({"type": "pci", "vendor-id": 6900, "device-id": 4097}))
            .unwrap();
    assert_eq!(
        id,
        GuestDeviceId::Pci(GuestDeviceIdPCI {
            vendor_id: 6900,
            device_id: 4097
        })
    );
    assert_eq!(
        serde_json::to_value(&id).unwrap(),
        json!({"type": "pci", "vendor-id": 6900, "device-id": 4097})
    );
}

#[test]
fn alternates_use_both_wire_forms() {
    let args = cmd::GuestFileSeekArgs {
        handle: 1000,
        offset: 0,
        whence: GuestFileWhence::Name(QGASeek::Set),
    };
    assert_eq!(
        serde_json::to_value(&args).unwrap(),
        json!({"handle": 1000, "offset": 0, "whence": "set"})
    );
    let args = cmd::GuestFileSeekArgs::from_seek(1000, std::io::SeekFrom::Current(0));
    assert_eq!(
        serde_json::to_value(&args).unwrap(),
        json!({"handle": 1000, "offset": 0, "whence": 1})
    );
    let w: GuestFileWhence = serde_json::from_value(json!(2)).unwrap();
    assert_eq!(w, GuestFileWhence::Value(2));

    let exec = cmd::GuestExecArgs::new("/bin/sh")
        .args(["-c", "cat; echo err >&2; exit 3"])
        .input("from-stdin\n")
        .capture();
    assert_eq!(
        serde_json::to_value(&exec).unwrap(),
        json!({"path": "/bin/sh", "arg": ["-c", "cat; echo err >&2; exit 3"], "input-data": "ZnJvbS1zdGRpbgo=", "capture-output": true})
    );
    let mode =
        cmd::GuestExecArgs::new("/bin/echo").capture_mode(GuestExecCaptureOutputMode::Separated);
    assert_eq!(
        serde_json::to_value(&mode).unwrap()["capture-output"],
        "separated"
    );
}

#[test]
fn passwords_are_base64_on_the_wire_and_redacted_in_debug() {
    let args = cmd::GuestSetUserPasswordArgs {
        username: "root".into(),
        password: Password::new("hunter2"),
        crypted: false,
    };
    let debug = format!("{args:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<redacted>"));
    assert_eq!(
        serde_json::to_value(&args).unwrap()["password"],
        "aHVudGVyMg=="
    );
}

#[test]
fn broken_base64_is_a_decode_error() {
    let r: Result<GuestFileRead, _> =
        serde_json::from_value(json!({"count": 1, "buf-b64": "!!", "eof": false}));
    assert!(r.unwrap_err().to_string().contains("base64"));
}

fn reference_names() -> BTreeSet<String> {
    let list = include_str!("data/commands-reference.txt");
    let mut names: BTreeSet<String> = list
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    // Where the workspace sits next to shared/, re-read the seed itself so the
    // fixture cannot drift from it.
    let seed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seeds/002_1225759bb29ff578.txt");
    if let Ok(text) = std::fs::read_to_string(&seed) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Command ") {
                if let Some((name, _)) = rest.split_once(" (Since") {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

#[test]
fn every_reference_command_has_a_command_type() {
    let ours: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
    let reference = reference_names();
    assert_eq!(reference.len(), 44);
    let missing: Vec<_> = reference.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&reference).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(COMMANDS.len(), ours.len(), "duplicate entries");
}

#[test]
fn command_facts_match_the_reference() {
    assert_eq!(cmd::GuestGetLoad::SINCE, (10, 0));
    assert_eq!(cmd::GuestNetworkGetRoute::SINCE, (9, 1));
    assert_eq!(cmd::GuestSyncDelimited::SINCE, (1, 1));
    let silent: Vec<_> = COMMANDS
        .iter()
        .filter(|c| !c.success_response)
        .map(|c| c.name)
        .collect();
    assert_eq!(
        silent,
        [
            "guest-shutdown",
            "guest-suspend-disk",
            "guest-suspend-ram",
            "guest-suspend-hybrid"
        ]
    );
    let exec = cmd::spec("guest-exec").unwrap();
    assert_eq!(
        exec.params.iter().map(|p| p.name).collect::<Vec<_>>(),
        ["path", "arg", "env", "input-data", "capture-output"]
    );
}

/// Decodes a Python bytes literal body (`b'...'` without the quotes) as the
/// probe transcripts print them.
fn python_bytes(lit: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = lit.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).expect("\\x escape"));
            }
            Some(other) => out.push(other as u8),
            None => {}
        }
    }
    out
}

/// Decodes `v` as the return type of `C` and checks it encodes back to `v`.
fn typed_round_trip<C>(v: &Value) -> Result<(), String>
where
    C: Command,
    C::Returns: Serialize + std::fmt::Debug,
{
    let typed: C::Returns =
        serde_json::from_value(v.clone()).map_err(|e| format!("{}: {e}", C::NAME))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == v {
        Ok(())
    } else {
        Err(format!("{}: {v} came back as {back}", C::NAME))
    }
}

fn round_trip_by_name(name: &str, v: &Value) -> Option<Result<(), String>> {
    use cmd::*;
    Some(match name {
        "guest-sync" | "guest-sync-delimited" => typed_round_trip::<GuestSync>(v),
        "guest-ping" => typed_round_trip::<GuestPing>(v),
        "guest-get-time" => typed_round_trip::<GuestGetTime>(v),
        "guest-info" => typed_round_trip::<GuestInfo>(v),
        "guest-file-open" => typed_round_trip::<GuestFileOpen>(v),
        "guest-file-close" => typed_round_trip::<GuestFileClose>(v),
        "guest-file-read" => typed_round_trip::<cmd::GuestFileRead>(v),
        "guest-file-seek" => typed_round_trip::<cmd::GuestFileSeek>(v),
        "guest-fsfreeze-status" => typed_round_trip::<cmd::GuestFsfreezeStatus>(v),
        "guest-network-get-interfaces" => typed_round_trip::<GuestNetworkGetInterfaces>(v),
        "guest-get-vcpus" => typed_round_trip::<GuestGetVcpus>(v),
        "guest-get-disks" => typed_round_trip::<GuestGetDisks>(v),
        "guest-get-fsinfo" => typed_round_trip::<GuestGetFsinfo>(v),
        "guest-get-memory-blocks" => typed_round_trip::<GuestGetMemoryBlocks>(v),
        "guest-get-memory-block-info" => typed_round_trip::<GuestGetMemoryBlockInfo>(v),
        "guest-exec" => typed_round_trip::<cmd::GuestExec>(v),
        "guest-exec-status" => typed_round_trip::<cmd::GuestExecStatus>(v),
        "guest-get-host-name" => typed_round_trip::<GuestGetHostName>(v),
        "guest-get-users" => typed_round_trip::<GuestGetUsers>(v),
        "guest-get-timezone" => typed_round_trip::<GuestGetTimezone>(v),
        "guest-get-osinfo" => typed_round_trip::<GuestGetOsinfo>(v),
        "guest-get-diskstats" => typed_round_trip::<GuestGetDiskstats>(v),
        "guest-get-cpustats" => typed_round_trip::<GuestGetCpustats>(v),
        "guest-get-load" => typed_round_trip::<GuestGetLoad>(v),
        "guest-network-get-route" => typed_round_trip::<GuestNetworkGetRoute>(v),
        _ => return None,
    })
}

/// Every complete reply in the recorded qemu-ga 7.2 transcripts goes through
/// the real decoder and, for successful replies, the command's typed return.
#[test]
fn recorded_transcripts_decode_and_round_trip() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/research/qga-schemas");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "{} is missing under CI", dir.display());
        eprintln!("SKIPPED: transcripts not found at {}", dir.display());
        return;
    };
    let mut typed = 0;
    let mut errors = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("probe-7.2-") && name.ends_with(".txt")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let mut command: Option<String> = None;
        for line in text.lines() {
            if let Some(req) = line
                .strip_prefix(">>> b'")
                .and_then(|l| l.strip_suffix('\''))
            {
                let bytes = python_bytes(req);
                let start = bytes.iter().position(|&b| b == b'{').unwrap_or(0);
                command = serde_json::from_slice::<Value>(&bytes[start..])
                    .ok()
                    .and_then(|v| v["execute"].as_str().map(str::to_owned));
                continue;
            }
            let Some(reply) = line
                .strip_prefix("<<< b'")
                .and_then(|l| l.strip_suffix('\''))
            else {
                continue;
            };
            if reply.contains("<truncated") {
                continue;
            }
            let mut decoder = qga_proto::wire::Decoder::new();
            decoder.push(&python_bytes(reply));
            while let Some(frame) = decoder.next_frame() {
                match frame {
                    qga_proto::wire::Frame::Delimiter => {}
                    qga_proto::wire::Frame::Reply(r) => match (&r.outcome, command.as_deref()) {
                        (Ok(v), Some(cmd)) => {
                            if let Some(result) = round_trip_by_name(cmd, v) {
                                result.unwrap_or_else(|e| panic!("{name}: {e}"));
                                typed += 1;
                            }
                        }
                        (Err(e), _) => {
                            assert!(matches!(
                                e.class,
                                ErrorClass::GenericError | ErrorClass::CommandNotFound
                            ));
                            errors += 1;
                        }
                        (Ok(_), None) => {}
                    },
                    other => panic!("{name}: recorded reply decoded as {other:?}"),
                }
            }
        }
    }
    assert!(typed >= 20, "only {typed} typed replies found");
    assert!(errors >= 15, "only {errors} error replies found");
}
