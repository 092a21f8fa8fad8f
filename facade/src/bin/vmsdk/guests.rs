//! `vmsdk guests`: the guest agents of many VMs on this host, in one bounded scrape, once as
//! a table or JSON, or served to Prometheus.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use vmsdk::agent::monitor::{Guest, GuestMonitor, GuestReport, PollStatus};
use vmsdk::prometheus::Exporter;

use crate::stats::{parse_duration, parse_label};
use crate::CliResult;

/// Where the guests' agent sockets are, and how to scrape them.
///
/// QEMU's chardev socket serves one client at a time: each poll connects, asks and closes at
/// once. On a libvirt host libvirt holds every agent socket for the domain's lifetime, so a
/// direct connection is never served (it is reported busy or as a sync timeout): there, use
/// libvirt's API (`virsh domfsinfo`, `virsh guestinfo`) or give each guest a second agent
/// channel for monitoring. Proxmox VE keeps its sockets at /var/run/qemu-server/VMID.qga and
/// holds none of them.
#[derive(Debug, Args)]
pub struct GuestsArgs {
    /// A guest by name and agent address, e.g. --guest web-1=/var/run/qemu-server/101.qga or
    /// --guest db=qga+tcp://127.0.0.1:4444 (repeatable).
    #[arg(long, value_name = "NAME=URI", value_parser = parse_label)]
    guest: Vec<(String, String)>,
    /// Agent sockets by pattern, e.g. '/var/run/qemu-server/*.qga' (quote it): each guest is
    /// named after what the wildcards matched (101 for 101.qga).
    #[arg(long, value_name = "GLOB")]
    guests: Vec<String>,
    /// The QEMU monitor (QMP socket) of a guest named with --guest or --guests, e.g. --qmp
    /// web-1=/var/run/qemu-server/101.qmp: its balloon and block statistics join the guest's
    /// (repeatable).
    #[arg(long, value_name = "NAME=URI", value_parser = parse_label)]
    qmp: Vec<(String, String)>,
    /// With --guests: each socket's QEMU monitor is the file beside it with the extension
    /// .qmp (Proxmox's /var/run/qemu-server/VMID.qmp), where there is one.
    #[arg(long, requires = "guests")]
    with_qmp: bool,
    /// Longest poll of one guest, connect included (default 3s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "3s")]
    deadline: Duration,
    /// Longest whole scrape (default 8s, below Prometheus' 10 s scrape timeout); a guest still
    /// polled then is reported down and skipped until its poll ends.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "8s")]
    scrape_deadline: Duration,
    /// Guests polled at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    concurrency: usize,
    /// Serve a guest's last result for up to DUR instead of polling it at every scrape (its
    /// age is exported).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    cache: Option<Duration>,
    /// A label on every guest's metrics and reports, e.g. --label host=hv-3 (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Print one JSON object instead of a table.
    #[arg(long, conflicts_with = "listen")]
    json: bool,
    /// Serve Prometheus at http://ADDR/metrics (every guest) and /probe?target=NAME (one).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

pub fn run(args: &GuestsArgs) -> CliResult {
    let mut guests = Vec::new();
    for (name, uri) in &args.guest {
        guests.push(Guest::new(name, &as_uri(uri))?);
    }
    for pattern in &args.guests {
        let matches = glob(pattern)?;
        if matches.is_empty() {
            eprintln!("vmsdk: no agent socket matches {pattern}");
        }
        for (name, path) in matches {
            let mut guest = Guest::new(name, &format!("qga+unix://{}", path.display()))?;
            let monitor = path.with_extension("qmp");
            if args.with_qmp && monitor != path && monitor.exists() {
                guest = guest.qmp(&monitor.display().to_string())?;
            }
            guests.push(guest);
        }
    }
    for (name, uri) in &args.qmp {
        let Some(at) = guests.iter().position(|g| g.name() == name) else {
            return Err(format!("--qmp {name}=…: no guest is named {name}").into());
        };
        let guest = guests.remove(at).qmp(uri)?;
        guests.insert(at, guest);
    }
    if guests.is_empty() {
        return Err("no guests: give --guest NAME=URI or --guests GLOB".into());
    }
    let guests = guests.into_iter().map(|guest| {
        args.label
            .iter()
            .fold(guest, |guest, (name, value)| guest.label(name, value))
    });
    let mut builder = GuestMonitor::builder()
        .guests(guests)
        .guest_deadline(args.deadline)
        .scrape_deadline(args.scrape_deadline)
        .concurrency(args.concurrency);
    if let Some(max_age) = args.cache {
        builder = builder.cache(max_age);
    }
    let monitor = builder.build()?;

    if let Some(addr) = args.listen {
        let exporter = Exporter::bind_guests(addr, monitor)?;
        println!(
            "serving http://{0}/metrics and http://{0}/probe?target=NAME",
            exporter.local_addr()
        );
        std::io::stdout().flush()?;
        exporter.serve();
        return Ok(ExitCode::SUCCESS);
    }

    let started = Instant::now();
    let reports = monitor.scrape_blocking();
    let seconds = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    if args.json {
        let document = serde_json::json!({ "scrape_seconds": seconds, "guests": reports });
        serde_json::to_writer_pretty(&mut out, &document)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &reports)?;
        writeln!(
            out,
            "{} of {} guests up in {seconds:.2} s",
            reports.iter().filter(|r| r.is_up()).count(),
            reports.len()
        )?;
    }
    Ok(if reports.iter().all(GuestReport::is_up) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A bare path is a socket; anything else is an agent URI.
fn as_uri(text: &str) -> String {
    if text.starts_with('/') {
        format!("qga+unix://{text}")
    } else {
        text.to_owned()
    }
}

fn write_table(out: &mut impl std::io::Write, reports: &[GuestReport]) -> std::io::Result<()> {
    let mut rows = vec![[
        "GUEST".to_owned(),
        "STATUS".to_owned(),
        "AGENT".to_owned(),
        "OS".to_owned(),
        "LOAD1".to_owned(),
        "ROOT USED".to_owned(),
        "SECONDS".to_owned(),
        "ERROR".to_owned(),
    ]];
    for report in reports {
        let data = report.data.as_ref();
        let status = match report.status {
            PollStatus::Up => "up",
            PollStatus::Down => "down",
            PollStatus::Busy => "busy",
            PollStatus::NotPolled => "not polled",
            _ => "?",
        };
        let os = data
            .and_then(|d| d.os.as_ref())
            .and_then(|os| os.pretty_name.clone().or_else(|| os.name.clone()))
            .unwrap_or_default();
        let load = data
            .and_then(|d| d.load.as_ref())
            .map(|l| format!("{:.2}", l.load1m))
            .unwrap_or_else(|| "-".to_owned());
        let root = data
            .and_then(|d| d.filesystems.as_ref())
            .and_then(|fs| {
                fs.iter()
                    .find(|f| f.mountpoint == "/" || f.mountpoint == "C:\\")
                    .or_else(|| fs.first())
            })
            .and_then(|fs| {
                let (used, total) = (fs.used_bytes?, fs.total_bytes?);
                (total > 0).then(|| {
                    format!(
                        "{:.0}% of {}",
                        used as f64 * 100.0 / total as f64,
                        size(total)
                    )
                })
            })
            .unwrap_or_else(|| "-".to_owned());
        rows.push([
            report.name.clone(),
            status.to_owned(),
            data.map(|d| d.version.clone()).unwrap_or_default(),
            os,
            load,
            root,
            if report.duration_seconds > 0.0 {
                format!("{:.3}", report.duration_seconds)
            } else {
                "-".to_owned()
            },
            report.error.clone().unwrap_or_default(),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `10.2G`-style sizes.
fn size(bytes: u64) -> String {
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", units[unit])
    }
}

/// The paths matching `pattern` (`*` and `?` in any component, no `**`), sorted, each with
/// the name made of what its wildcards matched (components joined by `/`).
fn glob(pattern: &str) -> CliResult<Vec<(String, PathBuf)>> {
    if !pattern.starts_with('/') {
        return Err(format!("--guests {pattern}: give an absolute pattern").into());
    }
    let components: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut found = Vec::new();
    walk(Path::new("/"), &components, Vec::new(), &mut found);
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found
        .into_iter()
        .map(|(parts, path)| {
            let name = if parts.is_empty() {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                parts.join("/")
            };
            (name, path)
        })
        .collect())
}

fn walk(dir: &Path, rest: &[&str], parts: Vec<String>, found: &mut Vec<(Vec<String>, PathBuf)>) {
    let Some((component, rest)) = rest.split_first() else {
        found.push((parts, dir.to_owned()));
        return;
    };
    if !component.contains(['*', '?']) {
        let next = dir.join(component);
        if rest.is_empty() && !next.exists() {
            return;
        }
        walk(&next, rest, parts, found);
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if name.starts_with('.') && !component.starts_with('.') {
            continue;
        }
        if let Some(matched) = wildcard_match(component, name) {
            let mut parts = parts.clone();
            parts.push(matched);
            walk(&entry.path(), rest, parts, found);
        }
    }
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character); what the wildcards
/// matched, concatenated.
fn wildcard_match(pattern: &str, name: &str) -> Option<String> {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    // Backtracking matcher; patterns are a few characters long.
    fn go(p: &[char], n: &[char], matched: &mut String) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => {
                for split in (0..=n.len()).rev() {
                    let before = matched.len();
                    matched.extend(&n[..split]);
                    if go(rest, &n[split..], matched) {
                        return true;
                    }
                    matched.truncate(before);
                }
                false
            }
            Some(('?', rest)) => match n.split_first() {
                Some((c, n_rest)) => {
                    matched.push(*c);
                    if go(rest, n_rest, matched) {
                        return true;
                    }
                    matched.pop();
                    false
                }
                None => false,
            },
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..], matched),
        }
    }
    let mut matched = String::new();
    go(&pattern, &name, &mut matched).then_some(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_and_name_the_guest() {
        assert_eq!(wildcard_match("*.qga", "101.qga").as_deref(), Some("101"));
        assert_eq!(wildcard_match("*.qga", "101.qmp"), None);
        assert_eq!(wildcard_match("vm-?", "vm-a").as_deref(), Some("a"));
        assert_eq!(wildcard_match("a*b*c", "axxbyyc").as_deref(), Some("xxyy"));
        assert_eq!(wildcard_match("plain", "plain").as_deref(), Some(""));
    }

    #[test]
    fn globs_walk_directories() {
        let dir = tempfile::tempdir().unwrap();
        for (sub, file) in [
            ("1-web", "org.qemu.guest_agent.0"),
            ("2-db", "org.qemu.guest_agent.0"),
        ] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join(file), b"").unwrap();
        }
        std::fs::write(dir.path().join("101.qga"), b"").unwrap();
        std::fs::write(dir.path().join("101.qmp"), b"").unwrap();
        let base = dir.path().display();
        let libvirt = glob(&format!("{base}/*/org.qemu.guest_agent.0")).unwrap();
        let names: Vec<&str> = libvirt.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["1-web", "2-db"]);
        let proxmox = glob(&format!("{base}/*.qga")).unwrap();
        assert_eq!(proxmox.len(), 1);
        assert_eq!(proxmox[0].0, "101");
        assert!(glob("relative/*.qga").is_err());
        assert!(glob(&format!("{base}/none-*.qga")).unwrap().is_empty());
    }
}
