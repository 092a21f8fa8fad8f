//! The Prometheus exporter against real consumers.
//!
//! - A real Prometheus (Debian's `prometheus` package) scrapes `vmsdk stats --listen`: the
//!   target is healthy, Prometheus negotiated OpenMetrics (its metadata API keeps the `# UNIT`
//!   only OpenMetrics carries), and a rate of stolen seconds is queryable through its HTTP API.
//! - Both expositions go through parser crates: OpenMetrics through `openmetrics-parser`
//!   (strict: `# EOF`, unit suffixes, `_total` samples of counter families), text 0.0.4
//!   through `openmetrics-parser`'s Prometheus parser and `prometheus-parse`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use openmetrics_parser::{MetricNumber, OpenMetricsType, OpenMetricsValue, PrometheusType};
use vmsdk::guest_stats::fake::FakeGuestStats;
use vmsdk::prometheus::{Endpoint, Format};
use vmsdk_tests::http::{api, encode, free_port, wait_for, Reaped};
use vmsdk_tests::{require_program, vmsdk_binary};

/// Starts `vmsdk stats --listen` on the fake backend and returns it with its address.
fn start_exporter(vmsdk: &Path) -> (Reaped, SocketAddr) {
    let mut child = Command::new(vmsdk)
        .args(["--backend", "fake", "stats", "--listen", "127.0.0.1:0"])
        .args(["--label", "vm=prometheus-peer-test"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("vmsdk starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let exporter = Reaped(child);
    let mut banner = String::new();
    BufReader::new(stdout)
        .read_line(&mut banner)
        .expect("vmsdk prints where it serves");
    let addr = banner
        .trim()
        .strip_prefix("serving http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("unexpected banner {banner:?}"));
    (exporter, addr)
}

#[test]
fn prometheus_scrapes_the_exporter_and_queries_a_rate_of_stolen_seconds() {
    let Some(prometheus) = require_program("prometheus", "prometheus") else {
        return;
    };
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let version = Command::new(&prometheus)
        .arg("--version")
        .output()
        .expect("prometheus --version runs");
    let version = String::from_utf8_lossy(&version.stdout);
    println!(
        "peer: {}",
        version
            .lines()
            .next()
            .unwrap_or("prometheus (unknown version)")
    );

    let (_exporter, target) = start_exporter(&vmsdk);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: vmsdk\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let api_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={api_addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("prometheus starts");
    let _server = Reaped(server);

    // The target is scraped and healthy.
    let target_state = wait_for("a healthy target", Duration::from_secs(60), || {
        let data = api(api_addr, "/api/v1/targets")?;
        let target = data["activeTargets"].as_array()?.first()?.clone();
        (target["health"] == "up").then_some(target)
    });
    assert_eq!(target_state["lastError"], "", "{target_state}");
    assert_eq!(target_state["labels"]["job"], "vmsdk");

    // OpenMetrics was negotiated: the counter family is stored under its OpenMetrics name,
    // with the unit of its `# UNIT` line (text 0.0.4 has neither).
    let metadata = wait_for(
        "metadata of the stolen-time counter",
        Duration::from_secs(30),
        || {
            let data = api(api_addr, "/api/v1/metadata?metric=vmsdk_cpu_stolen_seconds")?;
            data["vmsdk_cpu_stolen_seconds"]
                .as_array()?
                .first()
                .cloned()
        },
    );
    assert_eq!(metadata["type"], "counter", "{metadata}");
    assert_eq!(metadata["unit"], "seconds", "{metadata}");

    // A rate of stolen seconds, computed by Prometheus from the counter (the fake steals
    // 80-140 ms per scrape), with the exporter's label.
    let query = encode("rate(vmsdk_cpu_stolen_seconds_total[10s])");
    let result = wait_for("a rate of stolen seconds", Duration::from_secs(60), || {
        let data = api(api_addr, &format!("/api/v1/query?query={query}"))?;
        data["result"].as_array()?.first().cloned()
    });
    assert_eq!(result["metric"]["vm"], "prometheus-peer-test", "{result}");
    assert_eq!(result["metric"]["backend"], "fake", "{result}");
    let rate: f64 = result["value"][1].as_str().unwrap().parse().unwrap();
    assert!(
        rate > 0.0 && rate < 1.0,
        "stolen seconds per second: {rate}"
    );

    // The exporter's own per-interval ratio arrived too.
    let query = encode("vmsdk_interval_cpu_stolen_ratio");
    let ratio = wait_for(
        "the per-interval stolen ratio",
        Duration::from_secs(30),
        || {
            let data = api(api_addr, &format!("/api/v1/query?query={query}"))?;
            data["result"].as_array()?.first().cloned()
        },
    );
    let ratio: f64 = ratio["value"][1].as_str().unwrap().parse().unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "stolen ratio: {ratio}");
}

/// Two scrapes of an endpoint on the fake, so the second has per-interval rates.
fn second_scrape(accept: &str) -> vmsdk::prometheus::Scrape {
    let endpoint = Endpoint::builder()
        .label("vm", "db-1")
        .unwrap()
        .build(FakeGuestStats::example())
        .unwrap();
    endpoint.scrape(Some(accept));
    endpoint.scrape(Some(accept))
}

#[test]
fn the_openmetrics_exposition_parses_strictly() {
    let scrape = second_scrape("application/openmetrics-text;version=1.0.0");
    assert_eq!(scrape.content_type, Format::OpenMetrics.content_type());
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&scrape.body)
        .unwrap_or_else(|e| panic!("{e:?} in\n{}", scrape.body));
    let stolen = &exposition.families["vmsdk_cpu_stolen_seconds"];
    assert_eq!(stolen.family_type, OpenMetricsType::Counter);
    assert_eq!(stolen.unit, "seconds");
    let sample = stolen
        .iter_samples()
        .next()
        .expect("one stolen-time sample");
    let labels = sample.get_labelset().unwrap();
    assert_eq!(labels.get_label_value("vm"), Some("db-1"));
    assert_eq!(labels.get_label_value("backend"), Some("fake"));
    let OpenMetricsValue::Counter(counter) = &sample.value else {
        panic!("not a counter: {:?}", sample.value);
    };
    assert!(matches!(counter.value, MetricNumber::Float(v) if v > 0.0));

    let balloon = &exposition.families["vmsdk_mem_ballooned_bytes"];
    assert_eq!(
        (balloon.family_type, balloon.unit.as_str()),
        (OpenMetricsType::Gauge, "bytes")
    );
    let session = &exposition.families["vmsdk_session"];
    assert_eq!(session.family_type, OpenMetricsType::Info);
    let ratio = &exposition.families["vmsdk_interval_cpu_stolen_ratio"];
    assert_eq!(ratio.unit, "ratio");
    for family in exposition.families.values() {
        if !family.unit.is_empty() {
            assert!(family.family_name.ends_with(&format!("_{}", family.unit)));
        }
    }
}

#[test]
fn the_text_exposition_parses_with_both_parsers() {
    let scrape = second_scrape("text/plain;version=0.0.4");
    assert_eq!(scrape.content_type, Format::Text.content_type());
    assert!(!scrape.body.contains("# EOF") && !scrape.body.contains("# UNIT"));

    let exposition = openmetrics_parser::prometheus::parse_prometheus(&scrape.body)
        .unwrap_or_else(|e| panic!("{e:?} in\n{}", scrape.body));
    let stolen = &exposition.families["vmsdk_cpu_stolen_seconds_total"];
    assert_eq!(stolen.family_type, PrometheusType::Counter);
    assert_eq!(
        exposition.families["vmsdk_session_info"].family_type,
        PrometheusType::Gauge
    );

    let lines = scrape.body.lines().map(|line| Ok(line.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("prometheus-parse reads it");
    let sample = parsed
        .samples
        .iter()
        .find(|s| s.metric == "vmsdk_interval_cpu_stolen_ratio")
        .expect("the per-interval stolen ratio");
    let prometheus_parse::Value::Gauge(ratio) = sample.value else {
        panic!("not a gauge: {:?}", sample.value);
    };
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    assert_eq!(sample.labels.get("vm"), Some("db-1"));
}
