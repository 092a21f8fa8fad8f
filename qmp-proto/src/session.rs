//! The sans-I/O client state machine shared by [`crate::Client`] and the tokio client: the
//! greeting and capability negotiation, numbered requests and replies matched to them, and
//! event subscriptions with bounded buffers. The clients only move bytes and keep time.
//!
//! ```
//! use qmp_proto::session::{Handshake, Session, ClientConfig, EventFilter};
//!
//! let mut session = Session::new(ClientConfig::default());
//! session.receive(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n");
//! let Handshake::Send(negotiate) = session.poll_handshake().unwrap() else { panic!() };
//! assert!(negotiate.starts_with(b"{\"execute\":\"qmp_capabilities\""));
//! session.receive(b"{\"return\": {}, \"id\": 0}\r\n");
//! assert!(matches!(session.poll_handshake(), Ok(Handshake::Done)));
//!
//! let jobs = session.subscribe(EventFilter::names(["JOB_STATUS_CHANGE"]));
//! let (id, bytes) = session.start_command("query-status", None, false).unwrap();
//! assert_eq!(bytes, b"{\"execute\":\"query-status\",\"id\":1}\r\n");
//! // An event raised while the command runs is kept for the subscriber.
//! session.receive(b"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\", \"status\": \"running\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n");
//! session.receive(b"{\"return\": {\"status\": \"prelaunch\", \"running\": false}, \"id\": 1}\r\n");
//! assert_eq!(session.take_reply(id).unwrap().unwrap()["status"], "prelaunch");
//! assert_eq!(session.next_event(jobs).unwrap().unwrap().data["status"], "running");
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::wire::{self, Capability, Decoder, Event, Greeting, Message, Reply, WireError};

/// Settings shared by the blocking and the tokio client. Start from
/// `ClientConfig::default()` and change fields with the setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Longest wait for the connection, the greeting and the capability negotiation together
    /// (default 10 s).
    pub handshake_timeout: Duration,
    /// Longest wait for a command's reply (default 30 s). Commands that wait for the guest or
    /// the disk (`blockdev-add` of a slow network node) may need more; each call can also set
    /// its own.
    pub timeout: Duration,
    /// Longest message accepted from the monitor (default 10 MiB). A longer one closes the
    /// connection with [`Error::MessageTooLarge`], without being held in memory.
    pub max_message_size: usize,
    /// Events each subscription holds until they are read (default 1024). More are dropped
    /// and reported as [`Error::EventOverflow`] by the next read.
    pub event_buffer: usize,
    /// Enable out-of-band execution when the monitor offers it (default off). Proxmox's QEMU
    /// does not offer it, so nothing should depend on it.
    pub oob: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            handshake_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_message_size: wire::DEFAULT_MAX_MESSAGE_SIZE,
            event_buffer: 1024,
            oob: false,
        }
    }
}

impl ClientConfig {
    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`event_buffer`](Self::event_buffer) (at least 1).
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// Sets [`oob`](Self::oob).
    pub fn oob(mut self, on: bool) -> Self {
        self.oob = on;
        self
    }
}

/// The number a request carries as its `id`.
pub type RequestId = u64;

/// Replies for calls whose caller gave up that the session still expects (and then drops).
/// Beyond this many the monitor is not answering at all and the connection is closed.
const MAX_ABANDONED: usize = 1024;

/// Which events a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventFilter {
    /// Every event.
    All,
    /// Events with one of these names.
    Names(BTreeSet<String>),
}

impl EventFilter {
    /// Events with one of `names`.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EventFilter::Names(names.into_iter().map(Into::into).collect())
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &str) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Names(names) => names.contains(event),
        }
    }
}

/// A subscription to events, from [`Session::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(u64);

#[derive(Debug)]
struct Subscription {
    filter: EventFilter,
    queue: VecDeque<Event>,
    dropped: u64,
}

/// Where the handshake stands, from [`Session::poll_handshake`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Waiting for bytes from the monitor.
    NeedBytes,
    /// Send these bytes (the `qmp_capabilities` request), then wait for bytes.
    Send(Vec<u8>),
    /// Command mode: the session takes commands.
    Done,
}

#[derive(Debug)]
enum Phase {
    AwaitingGreeting,
    GreetingReceived,
    Negotiating(RequestId),
    Ready,
}

/// Client state independent of I/O.
#[derive(Debug)]
pub struct Session {
    config: ClientConfig,
    decoder: Decoder,
    phase: Phase,
    greeting: Option<Greeting>,
    oob_enabled: bool,
    next_id: RequestId,
    /// Requests sent and not yet answered, with their command names.
    pending: BTreeMap<RequestId, String>,
    /// Requests whose caller gave up; their late replies are dropped.
    abandoned: BTreeSet<RequestId>,
    replies: HashMap<RequestId, Result<Value>>,
    subscriptions: BTreeMap<SubscriptionId, Subscription>,
    next_subscription: u64,
    fatal: Option<Error>,
}

impl Session {
    /// A session for a fresh connection; the monitor speaks first.
    pub fn new(config: ClientConfig) -> Self {
        Session {
            decoder: Decoder::with_max_message_size(config.max_message_size),
            config,
            phase: Phase::AwaitingGreeting,
            greeting: None,
            oob_enabled: false,
            next_id: 0,
            pending: BTreeMap::new(),
            abandoned: BTreeSet::new(),
            replies: HashMap::new(),
            subscriptions: BTreeMap::new(),
            next_subscription: 0,
            fatal: None,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The monitor's greeting, once received.
    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.oob_enabled
    }

    /// Whether the session takes commands.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready) && self.fatal.is_none()
    }

    /// The error that ended the connection, if one did. Every later call fails with it.
    pub fn fatal(&self) -> Option<&Error> {
        self.fatal.as_ref()
    }

    /// Commands sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Ends the connection with `error` (an I/O failure, a closed socket): every waiting call
    /// and every later one fails with it. The first fatal error is kept.
    pub fn fail(&mut self, error: Error) {
        if self.fatal.is_none() {
            self.fatal = Some(error);
        }
    }

    fn check_open(&self) -> Result<()> {
        match &self.fatal {
            Some(e) => Err(e.duplicate()),
            None => Ok(()),
        }
    }

    /// Feeds bytes received from the monitor and handles every complete message in them.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.fatal.is_some() {
            return;
        }
        self.decoder.push(bytes);
        while let Some(message) = self.decoder.next_message() {
            if let Err(e) = self.handle(message) {
                self.fail(e);
                return;
            }
        }
    }

    fn handle(&mut self, message: std::result::Result<Message, WireError>) -> Result<()> {
        match message? {
            Message::Greeting(greeting) => match self.phase {
                Phase::AwaitingGreeting => {
                    self.greeting = Some(greeting);
                    self.phase = Phase::GreetingReceived;
                    Ok(())
                }
                _ => Err(Error::Protocol {
                    detail: "a second greeting on the same connection".to_owned(),
                }),
            },
            _ if matches!(self.phase, Phase::AwaitingGreeting) => Err(Error::Protocol {
                detail: "the monitor did not start with a QMP greeting".to_owned(),
            }),
            Message::Reply(reply) => self.handle_reply(reply),
            Message::Event(event) => {
                self.deliver(event);
                Ok(())
            }
        }
    }

    fn handle_reply(&mut self, reply: Reply) -> Result<()> {
        let Some(id_value) = reply.id else {
            // QEMU answers without an id only when it could not read the request's id: the
            // request was not valid JSON, so the stream is out of step.
            let what = match reply.outcome {
                Err(e) => format!("{}: {}", e.class, e.desc),
                Ok(v) => format!("return {v}"),
            };
            return Err(Error::Protocol {
                detail: format!("reply without an id ({what})"),
            });
        };
        let id = id_value.as_u64();
        if let Phase::Negotiating(negotiation) = self.phase {
            if id == Some(negotiation) {
                return match reply.outcome {
                    Ok(_) => {
                        self.phase = Phase::Ready;
                        Ok(())
                    }
                    Err(e) => Err(Error::Qmp {
                        command: "qmp_capabilities".to_owned(),
                        class: e.class,
                        desc: e.desc,
                    }),
                };
            }
        }
        let Some(id) = id else {
            return Err(never_sent(&id_value));
        };
        if let Some(command) = self.pending.remove(&id) {
            let outcome = reply.outcome.map_err(|e| Error::Qmp {
                command,
                class: e.class,
                desc: e.desc,
            });
            self.replies.insert(id, outcome);
            Ok(())
        } else if self.abandoned.remove(&id) {
            Ok(())
        } else {
            Err(never_sent(&id_value))
        }
    }

    fn deliver(&mut self, event: Event) {
        let capacity = self.config.event_buffer.max(1);
        let mut interested = self
            .subscriptions
            .values_mut()
            .filter(|s| s.filter.matches(&event.event))
            .peekable();
        while let Some(sub) = interested.next() {
            if sub.queue.len() >= capacity {
                sub.dropped += 1;
            } else if interested.peek().is_some() {
                sub.queue.push_back(event.clone());
            } else {
                sub.queue.push_back(event);
                return;
            }
        }
    }

    /// Drives the handshake: call after each [`receive`](Self::receive) until it says
    /// [`Handshake::Done`].
    pub fn poll_handshake(&mut self) -> Result<Handshake> {
        self.check_open()?;
        match self.phase {
            Phase::AwaitingGreeting | Phase::Negotiating(_) => Ok(Handshake::NeedBytes),
            Phase::Ready => Ok(Handshake::Done),
            Phase::GreetingReceived => {
                let offered = self.greeting.as_ref().is_some_and(Greeting::offers_oob);
                self.oob_enabled = offered && self.config.oob;
                let args = self
                    .oob_enabled
                    .then(|| serde_json::json!({"enable": [Capability::Oob.as_str()]}));
                let id = self.take_id();
                let bytes = wire::encode_command(
                    "qmp_capabilities",
                    args.as_ref(),
                    Some(&Value::from(id)),
                    false,
                )?;
                self.phase = Phase::Negotiating(id);
                Ok(Handshake::Send(bytes))
            }
        }
    }

    fn take_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Starts a command: its id and the bytes to send. `oob` sends it with `exec-oob`, which
    /// needs the negotiated capability.
    pub fn start_command(
        &mut self,
        name: &str,
        arguments: Option<&Value>,
        oob: bool,
    ) -> Result<(RequestId, Vec<u8>)> {
        self.check_open()?;
        if !matches!(self.phase, Phase::Ready) {
            return Err(Error::Protocol {
                detail: format!("{name} sent before the capability negotiation finished"),
            });
        }
        if oob && !self.oob_enabled {
            return Err(Error::OobUnavailable {
                command: name.to_owned(),
                offered: self.greeting.as_ref().is_some_and(Greeting::offers_oob),
            });
        }
        let id = self.next_id;
        let bytes = wire::encode_command(name, arguments, Some(&Value::from(id)), oob)?;
        self.next_id += 1;
        self.pending.insert(id, name.to_owned());
        Ok((id, bytes))
    }

    /// The outcome of command `id`, once its reply arrived (or the connection ended).
    pub fn take_reply(&mut self, id: RequestId) -> Option<Result<Value>> {
        if let Some(reply) = self.replies.remove(&id) {
            return Some(reply);
        }
        let fatal = self.fatal.as_ref()?;
        let command = self.pending.remove(&id);
        Some(Err(match fatal {
            Error::Disconnected { command: None } => Error::Disconnected { command },
            other => other.duplicate(),
        }))
    }

    /// The caller of command `id` gave up (its deadline passed): its reply, if it still
    /// comes, is dropped. Returns the command's name.
    pub fn abandon(&mut self, id: RequestId) -> Option<String> {
        self.replies.remove(&id);
        let name = self.pending.remove(&id)?;
        self.abandoned.insert(id);
        if self.abandoned.len() > MAX_ABANDONED {
            self.fail(Error::Protocol {
                detail: format!("{MAX_ABANDONED} commands left without a reply"),
            });
        }
        Some(name)
    }

    /// A new subscription to the events `filter` lets through. Events that no subscription
    /// wants are not kept.
    pub fn subscribe(&mut self, filter: EventFilter) -> SubscriptionId {
        let id = SubscriptionId(self.next_subscription);
        self.next_subscription += 1;
        self.subscriptions.insert(
            id,
            Subscription {
                filter,
                queue: VecDeque::new(),
                dropped: 0,
            },
        );
        id
    }

    /// Ends a subscription and drops its unread events.
    pub fn unsubscribe(&mut self, id: SubscriptionId) -> Result<()> {
        self.subscriptions
            .remove(&id)
            .map(drop)
            .ok_or(Error::NoSuchSubscription)
    }

    /// The next buffered event of subscription `id`; `Ok(None)` when none is waiting. After an
    /// overflow the next call reports it once ([`Error::EventOverflow`]), then delivery goes
    /// on with the events that were kept. When the connection has ended and nothing is left,
    /// its error.
    pub fn next_event(&mut self, id: SubscriptionId) -> Result<Option<Event>> {
        let capacity = self.config.event_buffer.max(1);
        let sub = self
            .subscriptions
            .get_mut(&id)
            .ok_or(Error::NoSuchSubscription)?;
        if sub.dropped > 0 {
            let dropped = std::mem::take(&mut sub.dropped);
            return Err(Error::EventOverflow { capacity, dropped });
        }
        match sub.queue.pop_front() {
            Some(event) => Ok(Some(event)),
            None => self.check_open().map(|()| None),
        }
    }

    /// Checks a command against the QEMU version of the greeting.
    pub fn check_since(&self, command: &str, since: (u32, u32)) -> Result<()> {
        match &self.greeting {
            Some(g) if !g.version.qemu.at_least(since) => Err(Error::CommandNotSupported {
                command: command.to_owned(),
                qemu: g.version.qemu.to_string(),
                since,
            }),
            _ => Ok(()),
        }
    }
}

fn never_sent(id: &Value) -> Error {
    Error::Protocol {
        detail: format!(
            "a reply for id {id}, which this client never sent or already has an answer for"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use serde_json::json;

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n";

    fn ready(config: ClientConfig) -> Session {
        let mut s = Session::new(config);
        assert_eq!(s.poll_handshake().unwrap(), Handshake::NeedBytes);
        s.receive(GREETING);
        let Handshake::Send(bytes) = s.poll_handshake().unwrap() else {
            panic!("no negotiation")
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["execute"], "qmp_capabilities");
        s.receive(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", v["id"]).as_bytes());
        assert_eq!(s.poll_handshake().unwrap(), Handshake::Done);
        s
    }

    #[test]
    fn oob_only_when_offered_and_asked() {
        let mut asked = Session::new(ClientConfig::default().oob(true));
        asked.receive(GREETING);
        let Handshake::Send(bytes) = asked.poll_handshake().unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["arguments"], json!({"enable": ["oob"]}));
        assert!(asked.oob_enabled());

        let mut not_asked = Session::new(ClientConfig::default());
        not_asked.receive(GREETING);
        let Handshake::Send(bytes) = not_asked.poll_handshake().unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.get("arguments").is_none());

        // Proxmox's QEMU offers no oob: asking is harmless, using it is a clear error.
        let mut pve = Session::new(ClientConfig::default().oob(true));
        pve.receive(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 9}, \"package\": \"pve-qemu-kvm_9.0.2-4\"}, \"capabilities\": []}}\r\n");
        let Handshake::Send(bytes) = pve.poll_handshake().unwrap() else {
            panic!()
        };
        assert!(!String::from_utf8_lossy(&bytes).contains("oob"));
        pve.receive(b"{\"return\": {}, \"id\": 0}\r\n");
        assert!(pve.is_ready());
        assert!(matches!(
            pve.start_command("migrate-pause", None, true),
            Err(Error::OobUnavailable { offered: false, .. })
        ));
    }

    #[test]
    fn replies_match_ids_out_of_order() {
        let mut s = ready(ClientConfig::default());
        let (a, _) = s.start_command("query-status", None, false).unwrap();
        let (b, _) = s.start_command("query-version", None, false).unwrap();
        s.receive(format!("{{\"return\": 2, \"id\": {b}}}\r\n{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"no\"}}, \"id\": {a}}}\r\n").as_bytes());
        assert_eq!(s.take_reply(b).unwrap().unwrap(), json!(2));
        let err = s.take_reply(a).unwrap().unwrap_err();
        assert_eq!(err.class(), Some(&ErrorClass::DeviceNotFound));
        assert!(err.to_string().contains("query-status"), "{err}");
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn reply_for_an_id_never_sent_ends_the_connection() {
        let mut s = ready(ClientConfig::default());
        let (a, _) = s.start_command("query-status", None, false).unwrap();
        s.receive(b"{\"return\": {}, \"id\": 4711}\r\n");
        let err = s.take_reply(a).unwrap().unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { detail } if detail.contains("4711")),
            "{err}"
        );
        assert!(s.start_command("stop", None, false).is_err());
    }

    #[test]
    fn late_reply_of_an_abandoned_call_is_dropped() {
        let mut s = ready(ClientConfig::default());
        let (a, _) = s.start_command("query-block", None, false).unwrap();
        assert_eq!(s.abandon(a).as_deref(), Some("query-block"));
        let (b, _) = s.start_command("query-status", None, false).unwrap();
        s.receive(
            format!("{{\"return\": [], \"id\": {a}}}\r\n{{\"return\": {{}}, \"id\": {b}}}\r\n")
                .as_bytes(),
        );
        assert!(s.fatal().is_none());
        assert!(s.take_reply(b).unwrap().is_ok());
    }

    #[test]
    fn messages_before_the_greeting_are_refused() {
        let mut s = Session::new(ClientConfig::default());
        s.receive(b"{\"return\": {}}\r\n");
        assert!(matches!(s.poll_handshake(), Err(Error::Protocol { .. })));
        let mut garbage = Session::new(ClientConfig::default());
        garbage.receive(b"SSH-2.0-OpenSSH_9.2\r\n");
        assert!(matches!(
            garbage.poll_handshake(),
            Err(Error::Protocol { .. })
        ));
    }

    #[test]
    fn events_go_to_matching_subscribers_and_overflow_is_reported() {
        let mut s = ready(ClientConfig::default().event_buffer(2));
        let all = s.subscribe(EventFilter::All);
        let jobs = s.subscribe(EventFilter::names(["JOB_STATUS_CHANGE"]));
        for i in 0..3 {
            s.receive(format!("{{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {{\"id\": \"j{i}\", \"status\": \"running\"}}, \"timestamp\": {{\"seconds\": 0, \"microseconds\": 0}}}}\r\n").as_bytes());
        }
        s.receive(
            b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 0, \"microseconds\": 0}}\r\n",
        );
        // `all` is full after two events: the third and STOP were dropped and counted.
        assert!(matches!(
            s.next_event(all),
            Err(Error::EventOverflow {
                capacity: 2,
                dropped: 2
            })
        ));
        assert_eq!(s.next_event(all).unwrap().unwrap().data["id"], "j0");
        assert_eq!(s.next_event(all).unwrap().unwrap().data["id"], "j1");
        assert_eq!(s.next_event(all).unwrap(), None);
        assert!(matches!(
            s.next_event(jobs),
            Err(Error::EventOverflow { dropped: 1, .. })
        ));
        s.unsubscribe(jobs).unwrap();
        assert!(matches!(s.next_event(jobs), Err(Error::NoSuchSubscription)));
    }

    #[test]
    fn disconnect_fails_the_waiting_call_with_its_name() {
        let mut s = ready(ClientConfig::default());
        let (a, _) = s.start_command("blockdev-backup", None, false).unwrap();
        s.fail(Error::Disconnected { command: None });
        let err = s.take_reply(a).unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU monitor connection closed while waiting for the reply to blockdev-backup"
        );
    }

    #[test]
    fn version_check_uses_the_greeting() {
        let s = ready(ClientConfig::default());
        assert!(s.check_since("block-export-add", (5, 2)).is_ok());
        assert!(matches!(
            s.check_since("x-future", (11, 0)),
            Err(Error::CommandNotSupported { .. })
        ));
    }
}
