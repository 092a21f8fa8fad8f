//! A `/metrics` HTTP server on tiny_http.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::registry::Registry;

#[cfg(feature = "stats")]
use super::Endpoint;
use super::{Scrape, PLAIN_TEXT};

/// The methods `/metrics` and `/` answer.
const ALLOWED: &str = "GET, HEAD";

/// What Prometheus' scrape timeout header is shortened by, so the answer arrives in time
/// (the blackbox exporter's default offset).
const TIMEOUT_OFFSET: Duration = Duration::from_millis(500);

/// What a request asks of a handler.
struct Ask<'a> {
    accept: Option<&'a str>,
    /// The scraper's timeout minus [`TIMEOUT_OFFSET`], from `X-Prometheus-Scrape-Timeout-Seconds`.
    #[cfg_attr(not(feature = "agent"), allow(dead_code))]
    timeout: Option<Duration>,
}

type MetricsHandler = Box<dyn Fn(&Ask<'_>) -> Scrape + Send + Sync>;
type ProbeHandler = Box<dyn Fn(&str, &Ask<'_>) -> Scrape + Send + Sync>;

/// A Prometheus exporter: serves the guest statistics ([`Exporter::bind`][link-bind]), any
/// `prometheus-client` [`Registry`] ([`Exporter::bind_registry`]) or the guest agent metrics
/// of many guests ([`Exporter::bind_guests`][link-bind-guests], with `/probe?target=NAME`
/// beside `/metrics`).
///
/// `GET` and `HEAD` of `/metrics` answer in the format the `Accept` header negotiates
/// (OpenMetrics 1.0 for Prometheus, text 0.0.4 for everyone else) with its exact
/// `Content-Type`, or `503` with the reason when the statistics cannot be updated; `/` says
/// where the metrics are; other methods get `405` with an `Allow` header, other paths `404`.
/// Requests are answered one at a time.
///
/// ```no_run
/// # #[cfg(feature = "stats")] {
/// use vmsdk::prometheus::{Endpoint, Exporter};
///
/// let stats = vmsdk::Platform::detect()?.guest_stats()?;
/// let endpoint = Endpoint::builder().label("vm", "db-1")?.build(stats)?;
/// let exporter = Exporter::bind("0.0.0.0:9101", endpoint)?;
/// println!("serving http://{}/metrics", exporter.local_addr());
/// exporter.serve(); // or exporter.spawn()? to serve from a thread of its own
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg_attr(feature = "stats", doc = "", doc = "[link-bind]: Exporter::bind")]
#[cfg_attr(
    not(feature = "stats"),
    doc = "",
    doc = "[link-bind]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.Exporter.html#method.bind"
)]
#[cfg_attr(
    feature = "agent",
    doc = "",
    doc = "[link-bind-guests]: Exporter::bind_guests"
)]
#[cfg_attr(
    not(feature = "agent"),
    doc = "",
    doc = "[link-bind-guests]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.Exporter.html#method.bind_guests"
)]
pub struct Exporter {
    server: Arc<tiny_http::Server>,
    metrics: MetricsHandler,
    probe: Option<ProbeHandler>,
    what: &'static str,
    local_addr: SocketAddr,
}

/// Stops an [`Exporter`]'s [`serve`](Exporter::serve) loop from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<tiny_http::Server>);

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter")
            .field("local_addr", &self.local_addr)
            .field("serves", &self.what)
            .field("probe", &self.probe.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Stopper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stopper").finish_non_exhaustive()
    }
}

/// An [`Exporter`] serving from a thread of its own; dropping it stops the server.
#[derive(Debug)]
pub struct RunningExporter {
    local_addr: SocketAddr,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

/// One answer, before it becomes a tiny_http response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Reply {
    fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: PLAIN_TEXT,
            body: body.to_owned(),
            allow: false,
        }
    }
}

impl Exporter {
    /// Serves the guest statistics of `endpoint` at `/metrics`, listening on `addr`
    /// (`127.0.0.1:9101`, `[::]:9101`; port 0 picks a free one).
    #[cfg(feature = "stats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
    pub fn bind(addr: impl ToSocketAddrs, endpoint: Endpoint) -> crate::Result<Exporter> {
        Self::listen(
            addr,
            "guest statistics",
            Box::new(move |ask: &Ask<'_>| endpoint.scrape(ask.accept)),
            None,
        )
    }

    /// Serves every metric of `registry` at `/metrics`: your own metrics, vmsdk's collectors,
    /// or both.
    ///
    /// ```
    /// use vmsdk::prometheus::prometheus_client::metrics::counter::Counter;
    /// use vmsdk::prometheus::prometheus_client::registry::Registry;
    /// use vmsdk::prometheus::Exporter;
    ///
    /// let mut registry = Registry::default();
    /// registry.register("myapp_requests", "Requests served", Counter::<u64>::default());
    /// let running = Exporter::bind_registry("127.0.0.1:0", registry)?.spawn()?;
    /// println!("serving http://{}/metrics", running.local_addr());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn bind_registry(addr: impl ToSocketAddrs, registry: Registry) -> crate::Result<Exporter> {
        Self::listen(
            addr,
            "metrics",
            Box::new(move |ask: &Ask<'_>| Scrape::of_registry(&registry, ask.accept)),
            None,
        )
    }

    /// Serves the guest agent metrics of `monitor`'s guests: every guest at `/metrics`, one
    /// at `/probe?target=NAME` (Prometheus' multi-target pattern: one scrape job per guest,
    /// each with its own timeout and `up`). A scrape's `X-Prometheus-Scrape-Timeout-Seconds`
    /// header, less 0.5 s, shortens the monitor's scrape deadline so that the answer arrives
    /// in time. An unknown target is a 404.
    #[cfg(feature = "agent")]
    #[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
    pub fn bind_guests(
        addr: impl ToSocketAddrs,
        monitor: crate::agent::monitor::GuestMonitor,
    ) -> crate::Result<Exporter> {
        use super::{Format, GuestCollector};
        let collector =
            |monitor: &crate::agent::monitor::GuestMonitor, target: Option<&str>, ask: &Ask<'_>| {
                let collector = match target {
                    Some(name) => GuestCollector::target(monitor.clone(), name),
                    None => GuestCollector::new(monitor.clone()),
                };
                let collector = match ask.timeout {
                    Some(timeout) => collector.within(timeout),
                    None => collector,
                };
                let mut registry = Registry::default();
                collector.register(&mut registry);
                Scrape::of_registry(&registry, ask.accept)
            };
        let for_probe = monitor.clone();
        Self::listen(
            addr,
            "guest agent metrics",
            Box::new(move |ask: &Ask<'_>| collector(&monitor, None, ask)),
            Some(Box::new(move |target: &str, ask: &Ask<'_>| {
                if !for_probe.guests().any(|g| g.name() == target) {
                    return Scrape::plain(
                        404,
                        format!("unknown target `{target}`: not one of this exporter's guests\n"),
                        Format::negotiate(ask.accept),
                    );
                }
                collector(&for_probe, Some(target), ask)
            })),
        )
    }

    fn listen(
        addr: impl ToSocketAddrs,
        what: &'static str,
        metrics: MetricsHandler,
        probe: Option<ProbeHandler>,
    ) -> crate::Result<Exporter> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| crate::Error::Listen {
                addr: "the given address".to_owned(),
                source: Box::new(source),
            })?
            .collect();
        let shown = addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let server =
            tiny_http::Server::http(&addrs[..]).map_err(|source| crate::Error::Listen {
                addr: shown.clone(),
                source,
            })?;
        let local_addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| crate::Error::Listen {
                addr: shown,
                source: "not an IP socket".into(),
            })?;
        Ok(Exporter {
            server: Arc::new(server),
            metrics,
            probe,
            what,
            local_addr,
        })
    }

    /// The address the exporter listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Something that stops [`serve`](Exporter::serve) from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.server))
    }

    /// Answers requests until [`Stopper::stop`] is called.
    pub fn serve(&self) {
        for request in self.server.incoming_requests() {
            let request_header = |name: &'static str| {
                request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv(name))
                    .map(|h| h.value.as_str().to_owned())
            };
            let accept = request_header("Accept");
            let timeout = request_header("X-Prometheus-Scrape-Timeout-Seconds")
                .and_then(|t| t.trim().parse::<f64>().ok())
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(|t| Duration::from_secs_f64(t).saturating_sub(TIMEOUT_OFFSET))
                .filter(|t| !t.is_zero());
            let ask = Ask {
                accept: accept.as_deref(),
                timeout,
            };
            let reply = self.route(request.method(), request.url(), &ask);
            let mut response = tiny_http::Response::from_string(reply.body)
                .with_status_code(reply.status)
                .with_header(header("Content-Type", reply.content_type));
            if reply.allow {
                response.add_header(header("Allow", ALLOWED));
            }
            // A scraper that hung up early is its own problem; keep serving the others.
            let _ = request.respond(response);
        }
    }

    /// Serves from a thread of its own until the returned handle is stopped or dropped.
    pub fn spawn(self) -> io::Result<RunningExporter> {
        let local_addr = self.local_addr;
        let stopper = self.stopper();
        let thread = std::thread::Builder::new()
            .name("vmsdk-exporter".to_owned())
            .spawn(move || self.serve())?;
        Ok(RunningExporter {
            local_addr,
            stopper,
            thread: Some(thread),
        })
    }

    fn route(&self, method: &tiny_http::Method, url: &str, ask: &Ask<'_>) -> Reply {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let readable = matches!(method, tiny_http::Method::Get | tiny_http::Method::Head);
        let probe = self.probe.as_ref().filter(|_| path == "/probe");
        match path {
            "/metrics" | "/" if !readable => Reply {
                allow: true,
                ..Reply::text(405, "method not allowed: use GET or HEAD\n")
            },
            "/probe" if probe.is_some() && !readable => Reply {
                allow: true,
                ..Reply::text(405, "method not allowed: use GET or HEAD\n")
            },
            "/metrics" => Reply::from((self.metrics)(ask)),
            "/probe" if probe.is_some() => match (probe, probe_target(query)) {
                (Some(probe), Some(target)) => Reply::from(probe(&target, ask)),
                _ => Reply::text(400, "missing target: ask /probe?target=NAME\n"),
            },
            "/" if self.probe.is_some() => Reply::text(
                200,
                "vmsdk guest agent exporter: every guest at /metrics, one at /probe?target=NAME\n",
            ),
            "/" => Reply {
                body: format!("vmsdk exporter of {}: see /metrics\n", self.what),
                ..Reply::text(200, "")
            },
            _ => Reply::text(404, "not found: the metrics are at /metrics\n"),
        }
    }
}

impl From<Scrape> for Reply {
    fn from(scrape: Scrape) -> Reply {
        Reply {
            status: scrape.status,
            content_type: scrape.content_type,
            body: scrape.body,
            allow: false,
        }
    }
}

/// The non-empty `target` of a `/probe` query string, decoded as a browser encodes a form
/// (`%XX` escapes, `+` for a space) by `form_urlencoded`, the `url` crate's decoder. A byte
/// sequence that is not UTF-8 becomes U+FFFD, so it names no guest rather than another one.
fn probe_target(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "target")
        .map(|(_, value)| value.into_owned())
        .filter(|target| !target.is_empty())
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    // Both are fixed ASCII strings of this module, which tiny_http always accepts.
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .unwrap_or_else(|()| unreachable!("invalid header {name}: {value}"))
}

impl Stopper {
    /// Makes [`Exporter::serve`] return after the request it is answering, if any.
    pub fn stop(&self) {
        self.0.unblock();
    }
}

impl RunningExporter {
    /// The address the exporter listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stopper.stop();
        if let Some(thread) = self.thread.take() {
            // The thread only answers requests; a panic there has already been reported.
            let _ = thread.join();
        }
    }
}

impl Drop for RunningExporter {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The `/probe` query on any input: never a panic, and what an encoder makes comes back.
#[cfg(test)]
mod query_tests {
    use proptest::prelude::*;

    use super::probe_target;

    fn encode(value: &str) -> String {
        form_urlencoded::byte_serialize(value.as_bytes()).collect()
    }

    proptest! {
        #[test]
        fn any_query_gives_a_target_or_none(query in ".*") {
            let _ = probe_target(&query);
        }

        #[test]
        fn encoded_names_come_back(name in "\\PC+", other in "[a-z]{0,8}") {
            let query = format!("{other}=1&target={}&x=2", encode(&name));
            prop_assert_eq!(probe_target(&query), Some(name));
        }
    }

    #[test]
    fn targets_are_decoded_and_an_empty_one_is_none() {
        assert_eq!(
            probe_target("target=%C3%A9t%C3%A9+1").as_deref(),
            Some("été 1")
        );
        assert_eq!(
            probe_target("target=vm%2F1&target=vm2").as_deref(),
            Some("vm/1")
        );
        assert_eq!(
            probe_target("target=%ff").as_deref(),
            Some("\u{fffd}"),
            "not UTF-8"
        );
        assert_eq!(
            probe_target("target=%").as_deref(),
            Some("%"),
            "a broken escape stays"
        );
        assert_eq!(probe_target("target="), None);
        assert_eq!(probe_target("module=x"), None);
        assert_eq!(probe_target(""), None);
    }
}

#[cfg(all(test, feature = "stats"))]
mod tests {
    use guest_stats::fake::FakeGuestStats;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::prometheus::Format;

    fn ask(accept: Option<&str>) -> Ask<'_> {
        Ask {
            accept,
            timeout: None,
        }
    }

    fn exporter() -> Exporter {
        let endpoint = Endpoint::builder()
            .build(FakeGuestStats::example())
            .unwrap();
        Exporter::bind("127.0.0.1:0", endpoint).unwrap()
    }

    /// One raw HTTP/1.0 request; the whole answer.
    fn request(addr: SocketAddr, head: &str) -> String {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn routes_methods_and_paths() {
        let exporter = exporter();
        let get = tiny_http::Method::Get;
        let post = tiny_http::Method::Post;
        assert_eq!(exporter.route(&get, "/metrics", &ask(None)).status, 200);
        assert_eq!(exporter.route(&get, "/metrics?x=1", &ask(None)).status, 200);
        assert_eq!(exporter.route(&get, "/", &ask(None)).status, 200);
        assert_eq!(exporter.route(&get, "/other", &ask(None)).status, 404);
        let refused = exporter.route(&post, "/metrics", &ask(None));
        assert_eq!((refused.status, refused.allow), (405, true));
        assert_eq!(
            exporter
                .route(&tiny_http::Method::Put, "/", &ask(None))
                .status,
            405
        );
        let om = exporter.route(&get, "/metrics", &ask(Some("application/openmetrics-text")));
        assert_eq!(om.content_type, Format::OpenMetrics.content_type());
    }

    #[test]
    fn serves_over_http_and_stops() {
        let running = exporter().spawn().unwrap();
        let addr = running.local_addr();
        let answer = request(
            addr,
            "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        assert!(answer.contains(
            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ));
        assert!(answer.ends_with("# EOF\n"), "{answer}");

        let head = request(addr, "HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        let post = request(addr, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");

        // Returns once the serving thread has ended.
        running.stop();
    }

    #[test]
    fn a_busy_port_is_a_clear_error() {
        let first = exporter();
        let taken = first.local_addr();
        let endpoint = Endpoint::builder()
            .build(FakeGuestStats::example())
            .unwrap();
        let error = Exporter::bind(taken, endpoint).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen on {taken}")),
            "{error}"
        );
    }
}
