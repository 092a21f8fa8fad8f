//! The sans-I/O client state machine shared by [`crate::Client`] and
//! [`crate::AsyncClient`]: synchronisation, request/reply matching, the
//! capability cache. The clients only move bytes and keep time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::cmd;
use crate::error::{Error, ErrorClass, Result};
use crate::types::GuestAgentInfo;
use crate::wire::{self, Decoder, Frame, Reply};

/// Commands whose success changes which commands the agent has enabled.
const FREEZE_COMMANDS: &[&str] = &[
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
];

/// Settings shared by the blocking and the async client. Start from
/// `ClientConfig::default()` and change fields with the setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Longest wait for a command's reply (default 30 s). Long-running commands
    /// (fsfreeze with hooks, fstrim) block the whole agent, so raise it for them.
    pub timeout: Duration,
    /// Longest wait for one synchronisation attempt (default 5 s, as libvirt).
    pub sync_timeout: Duration,
    /// Longest wait for the channel to open (default 5 s): a TCP handshake, or a Unix socket
    /// whose listen queue is full. QEMU's chardev socket serves one client at a time and
    /// queues one more; while another client (libvirt, a second monitor) holds it, a connect
    /// is retried every 50 ms until this bound and then fails with
    /// [`Error::ChannelBusy`].
    pub connect_timeout: Duration,
    /// Synchronisation attempts before giving up (default 2: a first attempt may
    /// be eaten by garbage, as libvirt observed).
    pub sync_attempts: u32,
    /// How long commands that send nothing on success (shutdown, suspend) wait
    /// for an error line before reporting success (default 1 s).
    pub no_reply_grace: Duration,
    /// Longest reply line accepted (default 10 MiB).
    pub max_reply_size: usize,
    /// Ask `guest-info` once per synchronisation and refuse, before sending,
    /// commands the agent lacks or has disabled (default on).
    pub check_capabilities: bool,
    /// Put an `id` on every request of the blocking [`crate::Client`] and ignore replies with
    /// another id (default off: it only adds a cross-check, strict FIFO already holds). The
    /// async client always numbers its requests, which is what lets it pipeline them.
    pub request_ids: bool,
    /// Requests the async client keeps in flight on one connection at most (default 32).
    /// Callers beyond that wait their turn, within their own timeouts. 1 sends one request at
    /// a time. Agents that do not echo request ids (QEMU 2.x) get one at a time regardless.
    pub max_in_flight: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            sync_attempts: 2,
            no_reply_grace: Duration::from_secs(1),
            max_reply_size: wire::DEFAULT_MAX_REPLY_SIZE,
            check_capabilities: true,
            request_ids: false,
            max_in_flight: 32,
        }
    }
}

impl ClientConfig {
    /// The preset for a monitoring program that polls an agent within `deadline`: a quarter
    /// of it to open the channel, a quarter for one synchronisation attempt (a hung agent is
    /// not worth a second), half for the replies, so that connecting, synchronising and one
    /// round of pipelined calls together end within `deadline`
    /// ([`worst_case`](Self::worst_case)). Replies are limited to 4 MiB (a guest with
    /// thousands of mounts stays far below).
    ///
    /// Connect per poll and close at once (the default of vmsdk's guest monitor) when the
    /// agent sits behind QEMU's chardev socket: it serves one client at a time, so a kept
    /// connection locks out every other tool (`virsh`, `qm agent`, a backup's freeze). Keep
    /// one client only on a channel nobody else uses (a dedicated second channel, `qemu-ga
    /// -m unix-listen` in tests) and poll often: it saves the connect and the handshake.
    ///
    /// ```
    /// use std::time::Duration;
    /// use qga_proto::ClientConfig;
    ///
    /// let config = ClientConfig::monitoring(Duration::from_secs(2));
    /// assert_eq!(config.sync_attempts, 1);
    /// assert_eq!(config.timeout, Duration::from_secs(1));
    /// assert_eq!(config.worst_case(), Duration::from_secs(2));
    /// ```
    pub fn monitoring(deadline: Duration) -> Self {
        let quarter = deadline / 4;
        ClientConfig {
            timeout: deadline - 2 * quarter,
            sync_timeout: quarter,
            connect_timeout: quarter,
            sync_attempts: 1,
            max_reply_size: 4 << 20,
            ..ClientConfig::default()
        }
    }

    /// How long connecting, synchronising (every attempt) and one round of calls take at
    /// most: `connect_timeout + sync_timeout × sync_attempts + timeout`.
    pub fn worst_case(&self) -> Duration {
        self.connect_timeout
            .saturating_add(self.sync_timeout.saturating_mul(self.sync_attempts.max(1)))
            .saturating_add(self.timeout)
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets [`sync_timeout`](Self::sync_timeout).
    pub fn sync_timeout(mut self, t: Duration) -> Self {
        self.sync_timeout = t;
        self
    }

    /// Sets [`sync_attempts`](Self::sync_attempts) (at least 1).
    pub fn sync_attempts(mut self, n: u32) -> Self {
        self.sync_attempts = n.max(1);
        self
    }

    /// Sets [`no_reply_grace`](Self::no_reply_grace).
    pub fn no_reply_grace(mut self, t: Duration) -> Self {
        self.no_reply_grace = t;
        self
    }

    /// Sets [`max_reply_size`](Self::max_reply_size).
    pub fn max_reply_size(mut self, bytes: usize) -> Self {
        self.max_reply_size = bytes;
        self
    }

    /// Sets [`check_capabilities`](Self::check_capabilities).
    pub fn check_capabilities(mut self, on: bool) -> Self {
        self.check_capabilities = on;
        self
    }

    /// Sets [`request_ids`](Self::request_ids).
    pub fn request_ids(mut self, on: bool) -> Self {
        self.request_ids = on;
        self
    }

    /// Sets [`max_in_flight`](Self::max_in_flight) (at least 1).
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests.max(1);
        self
    }
}

/// A fresh, hard-to-guess sync id: a stale reply from another client must not
/// match it by accident.
pub(crate) fn random_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (h.finish() & 0x7fff_ffff_ffff_ffff) as i64
}

/// What the client waits for.
#[derive(Debug, Clone)]
pub(crate) enum Await {
    /// The reply to our `guest-sync-delimited`.
    Sync { id: i64, after_delimiter: bool },
    /// The reply to a command.
    Reply {
        command: String,
        id: Option<Value>,
        /// `guest-sync-delimited` sent as an ordinary command: its reply follows a sentinel.
        delimited: bool,
        /// A sentinel arrived that was not ours: the reply after it is stale.
        skip_next: bool,
    },
}

/// Result of feeding frames to an [`Await`].
#[derive(Debug)]
pub(crate) enum Step {
    /// Keep reading.
    Pending,
    /// Sync completed.
    Synced,
    /// The command's reply (or agent error).
    Done(Result<Value>),
}

/// What the capability cache knows.
#[derive(Debug, Clone)]
pub(crate) enum Caps {
    Unknown,
    Known(GuestAgentInfo),
    /// `guest-info` itself failed; fall back to the static command table.
    Unavailable,
}

/// Client state independent of I/O.
#[derive(Debug)]
pub(crate) struct Session {
    pub config: ClientConfig,
    pub decoder: Decoder,
    pub in_sync: bool,
    pub caps: Caps,
    next_id: u64,
}

impl Session {
    pub fn new(config: ClientConfig) -> Self {
        let decoder = Decoder::with_max_reply_size(config.max_reply_size);
        Session {
            config,
            decoder,
            in_sync: false,
            caps: Caps::Unknown,
            next_id: 1,
        }
    }

    /// Forget everything tied to the old connection.
    pub fn reset_connection(&mut self) {
        self.decoder.reset();
        self.in_sync = false;
        self.caps = Caps::Unknown;
    }

    /// Whether the next command must first fetch `guest-info`.
    pub fn needs_caps(&self) -> bool {
        self.config.check_capabilities && matches!(self.caps, Caps::Unknown)
    }

    /// Checks `name` against the cache; returns whether the agent answers on success.
    pub fn check_command(&self, name: &str) -> Result<bool> {
        match &self.caps {
            Caps::Known(info) if self.config.check_capabilities => {
                crate::compat::check_command(info, name)
            }
            _ => Ok(cmd::spec(name).map(|s| s.success_response).unwrap_or(true)),
        }
    }

    /// `args` of `name` in the form the agent's release accepts (`None`: unchanged), or why
    /// it has none; see [`crate::compat::adapt_arguments`]. Without a known `guest-info` the
    /// arguments go out as given.
    pub fn adapt_arguments(&self, name: &str, args: Option<&Value>) -> Result<Option<Value>> {
        match &self.caps {
            Caps::Known(info) if self.config.check_capabilities => {
                crate::compat::adapt_arguments(info, name, args)
            }
            _ => Ok(None),
        }
    }

    /// Bytes and wait state for one synchronisation attempt.
    pub fn begin_sync(&mut self) -> (Vec<u8>, Await) {
        let id = random_id();
        self.in_sync = false;
        (
            wire::encode_sync_delimited(id),
            Await::Sync {
                id,
                after_delimiter: false,
            },
        )
    }

    /// Bytes and wait state for a command.
    pub fn begin_command(&mut self, name: &str, args: Option<&Value>) -> Result<(Vec<u8>, Await)> {
        let id = self.config.request_ids.then(|| {
            let id = self.next_id;
            self.next_id += 1;
            Value::from(id)
        });
        let bytes = wire::encode_request_value(name, args.unwrap_or(&Value::Null), id.as_ref())?;
        let delimited = name == <cmd::GuestSyncDelimited as cmd::Command>::NAME;
        Ok((
            bytes,
            Await::Reply {
                command: name.to_owned(),
                id,
                delimited,
                skip_next: false,
            },
        ))
    }

    /// Starts a command's exchange: the bytes to send, the state to wait in, and how long to
    /// wait for the reply (the caller's `timeout`, or only the no-reply grace period for a
    /// command that sends nothing back on success). Until a reply is consumed the channel
    /// state is unknown, so the session counts as out of sync until [`conclude`](Self::conclude)
    /// sees one: if an async caller is dropped half-way, the next call re-synchronises.
    pub(crate) fn start_exchange(
        &mut self,
        name: &str,
        args: Option<&Value>,
        replies: bool,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Await, Duration)> {
        let (bytes, wait) = self.begin_command(name, args)?;
        self.in_sync = false;
        let wait_for = if replies {
            timeout
        } else {
            self.config.no_reply_grace
        };
        Ok((bytes, wait, wait_for))
    }

    /// Fills the capability cache from `guest-info`'s `reply`: the agent's command list, or,
    /// when the agent refuses `guest-info`, the knowledge that there is none to be had.
    pub(crate) fn record_caps(&mut self, reply: Result<Value>) -> Result<()> {
        match reply {
            Ok(v) => {
                self.caps = Caps::Known(decode(<cmd::GuestInfo as cmd::Command>::NAME, v)?);
                Ok(())
            }
            Err(Error::Agent { .. }) => {
                self.caps = Caps::Unavailable;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// What a command's exchange amounts to, once waiting for its reply has ended with
    /// `outcome` (a step, silence until the deadline, or an error) after `waited`.
    ///
    /// Shared by the blocking and the async client, so both read the same meaning into the
    /// same events.
    pub(crate) fn conclude(
        &mut self,
        name: &str,
        outcome: Result<Option<Step>>,
        replies: bool,
        waited: Duration,
    ) -> Result<Value> {
        match outcome {
            Ok(Some(Step::Done(result))) => {
                self.finished(name, &result);
                result
            }
            Ok(Some(Step::Synced | Step::Pending)) => Err(Error::Protocol {
                detail: "unexpected client state".into(),
            }),
            // guest-shutdown and guest-suspend-* send nothing on success: silence through the
            // grace period means the command was taken, and so does the channel closing as the
            // guest goes down. The guest is going away or asleep, so the next call re-syncs.
            Ok(None) | Err(Error::Disconnected { .. }) if !replies => {
                Ok(Value::Object(Default::default()))
            }
            Ok(None) => Err(Error::Timeout {
                command: name.to_owned(),
                timeout: waited,
            }),
            Err(error) => Err(error),
        }
    }

    pub fn finished(&mut self, name: &str, result: &Result<Value>) {
        match result {
            Err(e) if e.is_channel_error() => return,
            // The agent knows better than the cache (it was restarted,
            // upgraded, or froze filesystems): ask guest-info again next time.
            Err(Error::Agent {
                class: ErrorClass::CommandNotFound,
                ..
            }) => self.caps_stale(),
            // Freezing disables most commands and thawing enables them again.
            Ok(_) if FREEZE_COMMANDS.contains(&name) => self.caps_stale(),
            _ => {}
        }
        self.in_sync = true;
    }

    fn caps_stale(&mut self) {
        if matches!(self.caps, Caps::Known(_)) {
            self.caps = Caps::Unknown;
        }
    }

    /// Drains decoded frames into `wait`.
    pub fn poll(&mut self, wait: &mut Await) -> Step {
        while let Some(frame) = self.decoder.next_frame() {
            match feed(wait, frame) {
                Step::Pending => continue,
                Step::Synced => {
                    self.in_sync = true;
                    return Step::Synced;
                }
                done => return done,
            }
        }
        Step::Pending
    }
}

fn feed(wait: &mut Await, frame: Frame) -> Step {
    match wait {
        Await::Sync {
            id,
            after_delimiter,
        } => {
            match frame {
                Frame::Delimiter => *after_delimiter = true,
                Frame::Reply(Reply { outcome: Ok(v), .. })
                    if *after_delimiter && v.as_i64() == Some(*id) =>
                {
                    return Step::Synced
                }
                // Error lines (the agent's answer to our 0xFF), stale replies,
                // garbage: all ignored until our delimited reply shows up.
                _ => *after_delimiter = false,
            }
            Step::Pending
        }
        Await::Reply {
            command,
            id,
            delimited,
            skip_next,
        } => match frame {
            Frame::Delimiter => {
                if !*delimited {
                    *skip_next = true;
                }
                Step::Pending
            }
            Frame::Reply(reply) => {
                if *skip_next {
                    *skip_next = false;
                    return Step::Pending;
                }
                if let Some(ours) = id {
                    if reply.id.as_ref() != Some(ours) {
                        return Step::Pending;
                    }
                }
                Step::Done(reply.outcome.map_err(Error::from))
            }
            Frame::Invalid { excerpt, reason } => Step::Done(Err(Error::Protocol {
                detail: format!("{reason} while waiting for the reply to {command}: {excerpt:?}"),
            })),
            Frame::Oversized { limit } => Step::Done(Err(Error::ReplyTooLarge { limit })),
        },
    }
}

/// Decodes a command's return value.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|source| Error::Decode {
        command: command.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sync_skips_error_line_and_stale_sync_replies() {
        let mut s = Session::new(ClientConfig::default());
        let (bytes, mut wait) = s.begin_sync();
        assert_eq!(bytes[0], 0xFF);
        let Await::Sync { id, .. } = wait else {
            panic!()
        };
        s.decoder.push(b"{\"return\": {}}\n\xff{\"return\": 7}\n");
        s.decoder.push(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n");
        assert!(matches!(s.poll(&mut wait), Step::Pending));
        s.decoder.push(b"\x00garbage\n");
        s.decoder.push(&[0xFF]);
        s.decoder.push(format!("{{\"return\": {id}}}\n").as_bytes());
        assert!(matches!(s.poll(&mut wait), Step::Synced));
        assert!(s.in_sync);
    }

    #[test]
    fn reply_after_foreign_sentinel_is_skipped() {
        let mut s = Session::new(ClientConfig::default());
        let (_, mut wait) = s.begin_command("guest-ping", None).unwrap();
        s.decoder.push(b"\xff{\"return\": 99}\n{\"return\": {}}\n");
        match s.poll(&mut wait) {
            Step::Done(Ok(v)) => assert_eq!(v, json!({})),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_filter_stale_replies() {
        let mut s = Session::new(ClientConfig::default().request_ids(true));
        let (bytes, mut wait) = s.begin_command("guest-ping", None).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("\"id\":1"));
        s.decoder
            .push(b"{\"return\": {}, \"id\": 0}\n{\"return\": {\"ok\": 1}, \"id\": 1}\n");
        match s.poll(&mut wait) {
            Step::Done(Ok(v)) => assert_eq!(v, json!({"ok": 1})),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn capabilities_refuse_missing_and_disabled() {
        let mut s = Session::new(ClientConfig::default());
        s.caps = Caps::Known(
            serde_json::from_value(json!({"version": "7.2.22", "supported_commands": [
                {"name": "guest-ping", "enabled": true, "success-response": true},
                {"name": "guest-shutdown", "enabled": false, "success-response": false}
            ]}))
            .unwrap(),
        );
        assert!(s.check_command("guest-ping").unwrap());
        assert!(matches!(
            s.check_command("guest-shutdown"),
            Err(Error::CommandDisabled { .. })
        ));
        assert!(matches!(
            s.check_command("guest-get-load"),
            Err(Error::CommandNotSupported { .. })
        ));
        assert!(s.check_command("guest-sync-delimited").unwrap());
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
        assert!(random_id() >= 0);
    }

    proptest::proptest! {
        /// Whatever precedes it, the agent's delimited reply completes the sync,
        /// and nothing but that reply does.
        #[test]
        fn sync_survives_any_preceding_bytes(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
                                             cut in 1usize..64) {
            let mut s = Session::new(ClientConfig::default());
            let (_, mut wait) = s.begin_sync();
            let Await::Sync { id, .. } = wait else { unreachable!() };
            let mut early = false;
            for chunk in junk.chunks(cut) {
                s.decoder.push(chunk);
                early |= matches!(s.poll(&mut wait), Step::Synced);
            }
            proptest::prop_assert!(!early, "synced on junk");
            s.decoder.push(format!("\n\u{ff}{{\"return\": {id}}}\n").as_bytes());
            // The two bytes of U+00FF in UTF-8 are not the sentinel; push the real one.
            s.decoder.push(&[0xFF]);
            s.decoder.push(format!("{{\"return\": {id}}}\n").as_bytes());
            proptest::prop_assert!(matches!(s.poll(&mut wait), Step::Synced));
        }

        /// A command waiting for its reply gets a result or keeps waiting; it
        /// never panics, whatever arrives.
        #[test]
        fn command_wait_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut s = Session::new(ClientConfig::default().max_reply_size(64));
            let (_, mut wait) = s.begin_command("guest-ping", None).unwrap();
            s.decoder.push(&data);
            let _ = s.poll(&mut wait);
        }
    }
}
