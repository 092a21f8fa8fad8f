//! QMP scripts: sequences of monitor commands (JSON files under
//! `qmp-proto/tests/fixtures/scripts/`) run on the raw wire against a real QEMU of either
//! [`Generation`] or against `qmp_proto::fake::FakeMonitor`, giving transcripts that are
//! compared after [`normalize`] takes out what legitimately varies (timestamps, temporary
//! paths, node names QEMU makes up, allocation sizes, QEMU-internal bitmaps and the
//! `paused`/`running` flicker of jobs while the block graph is drained).
//!
//! A script file:
//!
//! ```json
//! {"description": "…",
//!  "images": [{"name": "a.qcow2", "format": "qcow2", "size": 67108864}],
//!  "balloon": {"id": "balloon0", "memory_mib": 256},
//!  "steps": [
//!    {"send": {"execute": "qmp_capabilities"}},
//!    {"raw": "nonsense\n"},
//!    {"await": {"event": "JOB_STATUS_CHANGE", "data": {"id": "c1", "status": "concluded"}}}
//!  ]}
//! ```
//!
//! `send` gets an `id` (the step's number), `$DIR` in any string becomes the run's temporary
//! directory, `raw` is sent as is and answered by one line, `await` reads until a matching
//! event (or finds one that came since the previous `await`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use disk_transport::memory::MemoryDisk;
use qmp_proto::fake::{FakeMonitor, FakeMonitorBuilder, ImageFormat, QemuRelease};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::peers::Generation;
use crate::qemu_process::{qemu_command, QemuProcess};

/// How long a reply or an awaited event may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest line a script accepts from a monitor.
const MAX_LINE: usize = 16 << 20;

/// A script file.
#[derive(Debug, Clone, Deserialize)]
pub struct Script {
    /// What it checks.
    pub description: String,
    /// Images `qemu-img create` makes in the temporary directory before QEMU starts.
    #[serde(default)]
    pub images: Vec<ScriptImage>,
    /// A virtio balloon device (and the guest memory it reports).
    #[serde(default)]
    pub balloon: Option<ScriptBalloon>,
    /// The steps.
    pub steps: Vec<Value>,
}

/// An image of a script.
#[derive(Debug, Clone, Deserialize)]
pub struct ScriptImage {
    /// File name in the temporary directory.
    pub name: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
}

/// The balloon of a script.
#[derive(Debug, Clone, Deserialize)]
pub struct ScriptBalloon {
    /// QOM id of the device.
    pub id: String,
    /// Guest memory (`-m`).
    pub memory_mib: u64,
}

/// The directory of the scripts and recorded transcripts.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../qmp-proto/tests/fixtures")
}

/// Every script, by name (file stem), sorted.
pub fn scripts() -> Vec<(String, Script)> {
    let dir = fixtures_dir().join("scripts");
    let mut out: Vec<(String, Script)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read script");
            let script: Script = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("parse {}: {e}", p.display()));
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                script,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Where the recorded transcript of `script` against `release` lives.
pub fn transcript_path(script: &str, release: QemuRelease) -> PathBuf {
    let (major, minor, _) = release.version();
    fixtures_dir()
        .join("transcripts")
        .join(format!("{script}.qemu-{major}.{minor}.json"))
}

/// The release a peer generation's QEMU is.
pub fn release_of(generation: Generation) -> QemuRelease {
    match generation {
        Generation::Host => QemuRelease::V7_2,
        Generation::Trixie => QemuRelease::V10_0,
    }
}

/// A line-oriented reader of a monitor socket with a deadline per line.
struct Lines {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Lines {
    fn read_line(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(line.trim_ascii()).map_err(|e| {
                    format!(
                        "monitor sent a line that is not JSON ({e}): {}",
                        String::from_utf8_lossy(&line)
                    )
                });
            }
            if self.buf.len() > MAX_LINE {
                return Err("monitor line longer than 16 MiB".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("monitor did not answer in time".into());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("monitor closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("monitor did not answer in time".into())
                }
                Err(e) => return Err(format!("read from the monitor: {e}")),
            }
        }
    }
}

fn substitute(v: &Value, dir: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("$DIR", dir)),
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, dir)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), substitute(x, dir)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv))),
        _ => have == want,
    }
}

/// Runs `script` on a connected monitor socket (greeting not yet read). The transcript is
/// `{"replies": [...], "events": [...]}`: the greeting and one reply per `send`/`raw` step,
/// and every event in arrival order, as received (normalise before comparing).
pub fn run_script(stream: UnixStream, script: &Script, dir: &Path) -> Result<Value, String> {
    let dir_text = dir.to_string_lossy().into_owned();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut lines = Lines {
        stream,
        buf: Vec::new(),
    };
    let mut replies = vec![lines.read_line(Instant::now() + STEP_TIMEOUT)?];
    let mut events = Vec::new();
    let mut awaited_from = 0;
    for (number, step) in script.steps.iter().enumerate() {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let context = |e: String| format!("step {number} ({step}): {e}");
        if let Some(command) = step.get("send") {
            let mut command = substitute(command, &dir_text);
            command["id"] = json!(number);
            let mut bytes = serde_json::to_vec(&command).expect("serialise");
            bytes.extend_from_slice(b"\r\n");
            writer
                .write_all(&bytes)
                .map_err(|e| context(e.to_string()))?;
            loop {
                let msg = lines.read_line(deadline).map_err(context)?;
                if msg.get("event").is_some() {
                    events.push(msg);
                } else {
                    replies.push(msg);
                    break;
                }
            }
        } else if let Some(Value::String(raw)) = step.get("raw") {
            writer
                .write_all(raw.replace("$DIR", &dir_text).as_bytes())
                .map_err(|e| context(e.to_string()))?;
            loop {
                let msg = lines.read_line(deadline).map_err(context)?;
                if msg.get("event").is_some() {
                    events.push(msg);
                } else {
                    replies.push(msg);
                    break;
                }
            }
        } else if let Some(want) = step.get("await") {
            // Events that came with earlier replies count too (QEMU often finishes a job
            // before it answers the command that ended it).
            if events[awaited_from..].iter().any(|e| contains(e, want)) {
                awaited_from = events.len();
                continue;
            }
            loop {
                let msg = lines.read_line(deadline).map_err(context)?;
                if msg.get("event").is_none() {
                    return Err(context(format!("a reply nobody asked for: {msg}")));
                }
                let hit = contains(&msg, want);
                events.push(msg);
                if hit {
                    awaited_from = events.len();
                    break;
                }
            }
        } else {
            return Err(context("unknown step (send, raw or await)".into()));
        }
    }
    Ok(json!({"replies": replies, "events": events}))
}

/// Takes out what legitimately differs between runs and between QEMU and the fake:
/// timestamps, the temporary directory (`$DIR`), numbers of node names QEMU makes up
/// (`#block123` → `#block`), allocation-dependent sizes (`actual-size`, a `file` node's
/// `virtual-size`, the highest offset written to a `file` node), QEMU-internal (unnamed)
/// bitmaps, the micro version and package string, and the `paused` → `running`
/// `JOB_STATUS_CHANGE` pairs QEMU emits whenever it drains a job's nodes (how many differs
/// between releases).
pub fn normalize(transcript: &Value, dir: &Path) -> Value {
    let dir_text = dir.to_string_lossy().into_owned();
    let mut t = transcript.clone();
    scrub(&mut t, &dir_text);
    if let Some(events) = t.get_mut("events").and_then(Value::as_array_mut) {
        let mut kept: Vec<Value> = Vec::new();
        for ev in events.drain(..) {
            let is =
                |e: &Value, s: &str| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == s;
            if is(&ev, "running")
                && kept
                    .last()
                    .is_some_and(|p| is(p, "paused") && p["data"]["id"] == ev["data"]["id"])
            {
                kept.pop();
                continue;
            }
            kept.push(ev);
        }
        *events = kept;
    }
    t
}

fn scrub(v: &mut Value, dir: &str) {
    match v {
        Value::String(s) => {
            if s.contains(dir) {
                *s = s.replace(dir, "$DIR");
            }
            while let Some(pos) = s.find("#block") {
                let digits = s[pos + 6..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .count();
                if digits == 0 {
                    break;
                }
                s.replace_range(pos..pos + 6 + digits, "#BLOCK");
            }
            *s = s.replace("#BLOCK", "#block");
        }
        Value::Array(a) => {
            for x in a.iter_mut() {
                scrub(x, dir);
            }
        }
        Value::Object(m) => {
            m.remove("timestamp");
            m.remove("actual-size");
            m.remove("idle_time_ns");
            if m.get("format").and_then(Value::as_str) == Some("file") {
                m.remove("virtual-size");
            }
            let is_file_stats = m
                .get("driver-specific")
                .is_some_and(|d| d["driver"] == "file");
            if is_file_stats {
                if let Some(stats) = m.get_mut("stats").and_then(Value::as_object_mut) {
                    stats.remove("wr_highest_offset");
                }
            }
            if let Some(qemu) = m.get_mut("qemu").and_then(Value::as_object_mut) {
                if qemu.contains_key("micro") {
                    qemu.remove("micro");
                }
            }
            if m.contains_key("qemu") && m.contains_key("package") {
                m.insert("package".into(), json!("$PACKAGE"));
            }
            if let Some(Value::Array(bitmaps)) = m.get_mut("dirty-bitmaps") {
                bitmaps.retain(|b| b.get("name").is_some());
                if bitmaps.is_empty() {
                    m.remove("dirty-bitmaps");
                }
            }
            for x in m.values_mut() {
                scrub(x, dir);
            }
        }
        _ => {}
    }
}

/// A QEMU of one generation started for a script, killed by PID when dropped.
#[derive(Debug)]
pub struct QemuPeer {
    _process: QemuProcess,
    socket: PathBuf,
}

impl QemuPeer {
    /// Creates the script's images with the generation's `qemu-img` and starts
    /// `qemu-system-x86_64 -S -display none -nodefaults` with a QMP socket in `dir`. `None`
    /// (after a skip notice; a failure under `CI=true`) when the generation lacks QEMU.
    pub fn start(generation: Generation, script: &Script, dir: &Path) -> Option<QemuPeer> {
        for image in &script.images {
            let qemu_img = generation.command("qemu-img", "qemu-utils")?;
            let path = dir.join(&image.name);
            let out = qemu_img
                .args(["create", "-q", "-f", &image.format])
                .arg(&path)
                .arg(image.size.to_string())
                .output();
            assert!(
                out.status.success(),
                "qemu-img create {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let socket = dir.join("qmp.sock");
        let monitors = [socket.clone()];
        let mut command = qemu_command(generation, dir, &monitors)?
            .args(["-S", "-machine", "pc", "-accel", "tcg"]);
        if let Some(b) = &script.balloon {
            command = command
                .args(["-m", &b.memory_mib.to_string(), "-device"])
                .arg(format!("virtio-balloon-pci,id={}", b.id));
        }
        let process =
            QemuProcess::spawn(&command, &monitors, Stdio::piped(), &generation.to_string());
        Some(QemuPeer {
            _process: process,
            socket,
        })
    }

    /// A connection to its monitor.
    ///
    /// # Panics
    ///
    /// When QEMU does not accept it.
    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket.display()))
    }
}

/// A fake monitor of `release` set up like the QEMU [`QemuPeer::start`] starts for `script`:
/// the same images (empty, at the same paths) and balloon.
pub fn fake_for(script: &Script, release: QemuRelease, dir: &Path) -> FakeMonitor {
    fake_builder_for(script, release, dir).build()
}

/// [`fake_for`] before `build`, for more settings.
pub fn fake_builder_for(script: &Script, release: QemuRelease, dir: &Path) -> FakeMonitorBuilder {
    let mut builder = FakeMonitor::builder().release(release);
    for image in &script.images {
        let format = match image.format.as_str() {
            "qcow2" => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        };
        builder = builder.image(
            dir.join(&image.name).to_string_lossy(),
            format,
            MemoryDisk::new(image.size),
        );
    }
    if let Some(b) = &script.balloon {
        builder = builder.balloon(&b.id, b.memory_mib << 20);
    }
    builder
}

/// The first difference between two normalised transcripts, as a readable report, or `None`.
pub fn first_difference(
    left_name: &str,
    left: &Value,
    right_name: &str,
    right: &Value,
) -> Option<String> {
    for key in ["replies", "events"] {
        let (l, r) = (
            left[key].as_array().cloned().unwrap_or_default(),
            right[key].as_array().cloned().unwrap_or_default(),
        );
        for i in 0..l.len().max(r.len()) {
            let (a, b) = (l.get(i), r.get(i));
            if a != b {
                return Some(format!(
                    "{key}[{i}] differ:\n  {left_name}: {}\n  {right_name}: {}",
                    a.map_or("(missing)".into(), Value::to_string),
                    b.map_or("(missing)".into(), Value::to_string)
                ));
            }
        }
    }
    None
}
