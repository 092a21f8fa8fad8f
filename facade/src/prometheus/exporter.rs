//! A `/metrics` HTTP server on tiny_http.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::endpoint::PLAIN_TEXT;
use super::Endpoint;

/// The methods `/metrics` and `/` answer.
const ALLOWED: &str = "GET, HEAD";

/// A Prometheus exporter of the guest statistics: serves an [`Endpoint`] at `/metrics`.
///
/// `GET` and `HEAD` of `/metrics` answer in the format the `Accept` header negotiates
/// (OpenMetrics 1.0 for Prometheus, text 0.0.4 for everyone else) with its exact
/// `Content-Type`, or `503` with the reason when the statistics cannot be updated; `/` says
/// where the metrics are; other methods get `405` with an `Allow` header, other paths `404`.
/// Requests are answered one at a time, each with a fresh update (microseconds on every
/// backend).
///
/// ```no_run
/// use vmsdk::prometheus::{Endpoint, Exporter};
///
/// let stats = vmsdk::Platform::detect()?.guest_stats()?;
/// let endpoint = Endpoint::builder().label("vm", "db-1")?.build(stats)?;
/// let exporter = Exporter::bind("0.0.0.0:9101", endpoint)?;
/// println!("serving http://{}/metrics", exporter.local_addr());
/// exporter.serve(); // or exporter.spawn()? to serve from a thread of its own
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Exporter {
    server: Arc<tiny_http::Server>,
    endpoint: Endpoint,
    local_addr: SocketAddr,
}

/// Stops an [`Exporter`]'s [`serve`](Exporter::serve) loop from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<tiny_http::Server>);

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter")
            .field("local_addr", &self.local_addr)
            .field("endpoint", &self.endpoint)
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
    /// Listens on `addr` (`127.0.0.1:9101`, `[::]:9101`; port 0 picks a free one).
    pub fn bind(addr: impl ToSocketAddrs, endpoint: Endpoint) -> crate::Result<Exporter> {
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
            endpoint,
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
            let accept = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Accept"))
                .map(|h| h.value.as_str().to_owned());
            let reply = self.route(request.method(), request.url(), accept.as_deref());
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

    fn route(&self, method: &tiny_http::Method, url: &str, accept: Option<&str>) -> Reply {
        let path = url.split('?').next().unwrap_or("");
        let readable = matches!(method, tiny_http::Method::Get | tiny_http::Method::Head);
        match path {
            "/metrics" | "/" if !readable => Reply {
                allow: true,
                ..Reply::text(405, "method not allowed: use GET or HEAD\n")
            },
            "/metrics" => {
                let scrape = self.endpoint.scrape(accept);
                Reply {
                    status: scrape.status,
                    content_type: scrape.content_type,
                    body: scrape.body,
                    allow: false,
                }
            }
            "/" => Reply::text(200, "vmsdk guest statistics exporter: see /metrics\n"),
            _ => Reply::text(404, "not found: the metrics are at /metrics\n"),
        }
    }
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use guest_stats::fake::FakeGuestStats;

    use super::*;
    use crate::prometheus::Format;

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
        assert_eq!(exporter.route(&get, "/metrics", None).status, 200);
        assert_eq!(exporter.route(&get, "/metrics?x=1", None).status, 200);
        assert_eq!(exporter.route(&get, "/", None).status, 200);
        assert_eq!(exporter.route(&get, "/other", None).status, 404);
        let refused = exporter.route(&post, "/metrics", None);
        assert_eq!((refused.status, refused.allow), (405, true));
        assert_eq!(
            exporter.route(&tiny_http::Method::Put, "/", None).status,
            405
        );
        let om = exporter.route(&get, "/metrics", Some("application/openmetrics-text"));
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
