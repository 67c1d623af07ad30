//! The relay's admin protocol, defined once for both ends.
//!
//! The admin socket (a Unix stream socket, owner-only) carries one JSON object per
//! line each way: a [`Request`] (`{"cmd":"status"}`, `{"cmd":"drain","timeout_s":30}`,
//! ...) and a [`Reply`] (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`).
//! The result of each command is one of the documents below ([`Status`] for
//! `status`, [`WorkerCounters`] per worker for `stats`, [`Peers`] for `peers`,
//! [`Reloaded`], [`Rotated`], [`Draining`], [`Stopping`]). `shroud-relay` writes them
//! and `shroudctl` reads them with these same types; every document field has a
//! default, so a reader also accepts a document from an older or newer relay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The drain timeout when a `drain` request names none, seconds.
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 30;

fn default_drain_timeout() -> u64 {
    DEFAULT_DRAIN_TIMEOUT_S
}

/// A request on the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The [`Status`] document.
    Status,
    /// Every worker's [`WorkerCounters`].
    Stats,
    /// The peer list in force ([`Peers`]).
    Peers,
    /// Re-read the configuration, peer list and onion keys ([`Reloaded`]).
    Reload,
    /// Re-read the onion keys only ([`Rotated`]).
    Rotate,
    /// Refuse new circuits; stop when the last one closes or after `timeout_s`
    /// ([`Draining`]).
    Drain {
        /// Seconds to wait for circuits to close.
        #[serde(default = "default_drain_timeout")]
        timeout_s: u64,
    },
    /// Stop now ([`Stopping`]).
    Shutdown,
}

impl Request {
    /// The command names, as on the wire.
    pub const COMMANDS: [&'static str; 7] = [
        "status", "stats", "peers", "reload", "rotate", "drain", "shutdown",
    ];

    /// Parses one request line. The error is the message for the `error` field of
    /// the reply: not JSON, no `cmd`, an unknown command, or a bad argument.
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let Some(cmd) = v.get("cmd").and_then(Value::as_str) else {
            return Err("missing \"cmd\"".into());
        };
        if !Self::COMMANDS.contains(&cmd) {
            return Err(format!(
                "unknown command {cmd:?} ({})",
                Self::COMMANDS.join(", ")
            ));
        }
        let cmd = cmd.to_owned();
        let request: Request =
            serde_json::from_value(v.clone()).map_err(|e| format!("bad {cmd:?} request: {e}"))?;
        // serde does not refuse extra fields beside the tag of a unit variant: a
        // field the printed form lacks is one this command does not take.
        let known = serde_json::to_value(&request).unwrap_or(Value::Null);
        if let Some(extra) = v
            .as_object()
            .and_then(|o| o.keys().find(|k| known.get(k.as_str()).is_none()))
        {
            return Err(format!("bad {cmd:?} request: unknown field `{extra}`"));
        }
        Ok(request)
    }

    /// The command name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Stats => "stats",
            Request::Peers => "peers",
            Request::Reload => "reload",
            Request::Rotate => "rotate",
            Request::Drain { .. } => "drain",
            Request::Shutdown => "shutdown",
        }
    }

    /// The request as one line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a request always serialises")
    }
}

/// A reply on the admin socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// The command's document when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why the command failed when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success carrying `result`.
    pub fn ok(result: impl Serialize) -> Reply {
        Reply {
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or(Value::Null)),
            error: None,
        }
    }

    /// A failure with its message.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }

    /// The reply as one line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a reply always serialises")
    }

    /// `Ok(result)` (null when absent) or `Err(message)`.
    pub fn into_result(self) -> Result<Value, String> {
        if self.ok {
            Ok(self.result.unwrap_or(Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| "(no message)".into()))
        }
    }
}

/// The `status` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// Relay id, 32 hex digits.
    pub relay_id: String,
    /// `shroud-relay` version.
    pub version: String,
    /// Seconds since the relay started.
    pub uptime_s: u64,
    /// Whether the relay drains (refuses new circuits, then stops).
    pub draining: bool,
    /// Whether new circuits are accepted (not draining, and the peer list in force
    /// has not expired).
    pub accepting: bool,
    /// Workers whose loop did not move at the last look.
    pub stalled_workers: Vec<usize>,
    /// Admin connections refused (another user).
    pub admin_refused: u64,
    /// Cell size in bytes.
    pub cell: u64,
    /// Maximum hops.
    pub h_max: u64,
    /// Live circuits, all workers.
    pub circuits: u64,
    /// Drops by reason, all workers.
    pub drops: BTreeMap<String, u64>,
    /// Workers, by index.
    pub workers: Vec<WorkerStatus>,
    /// The peer list in use.
    pub peer_list: PeerListStatus,
    /// Onion keys held, newest first.
    pub onion_keys: Vec<OnionKeyStatus>,
    /// The onion key directory, when the relay uses one.
    pub onion_key_dir: Option<String>,
}

/// One worker in [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerStatus {
    /// Worker index.
    pub index: u64,
    /// Its UDP port.
    pub port: u16,
    /// Its counters.
    pub stats: WorkerCounters,
}

/// A worker's counters (all monotonic except the live counts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerCounters {
    /// I/O driver (`io_uring` or `recvmmsg`).
    pub driver: String,
    /// Cells received.
    pub cells_rx: u64,
    /// Cells sent.
    pub cells_tx: u64,
    /// Datagrams received.
    pub datagrams_rx: u64,
    /// Datagrams sent (a GSO send counts once).
    pub datagrams_tx: u64,
    /// Forward cells processed.
    pub cells_forward: u64,
    /// Backward cells processed.
    pub cells_backward: u64,
    /// Exit deliveries.
    pub exit_delivered: u64,
    /// Sends carrying them (a GSO send of several deliveries counts once; absent from
    /// relays before 2026-12-04).
    #[serde(default)]
    pub exit_sends: u64,
    /// Exit replies.
    pub exit_replies: u64,
    /// Circuit setups accepted.
    pub setups: u64,
    /// X25519 operations spent on setup cells.
    pub setup_dh: u64,
    /// `RETRY` replies sent.
    pub retries_sent: u64,
    /// Circuits expired for idleness.
    pub expired_circuits: u64,
    /// Cover cells that ended at this exit (drop and loop cover).
    pub cover_received: u64,
    /// Loop cover cells this exit sent back.
    pub loop_cover_returned: u64,
    /// Constant-rate links: link padding cells sent to peers.
    pub link_padding_sent: u64,
    /// Link padding cells received from peers (dropped).
    pub link_padding_received: u64,
    /// Mix mode: cells held for a delay.
    pub mix_delayed: u64,
    /// Mix mode: cells held now (gauge).
    pub mix_held: u64,
    /// Mix mode: cells refused by a full delay queue (also dropped as `queue_full`).
    pub mix_overflow: u64,
    /// Live circuits (gauge).
    pub circuits: u64,
    /// Live client links (gauge).
    pub client_links: u64,
    /// Live peer links (gauge).
    pub peer_links: u64,
    /// Drops by reason name.
    pub drops: Vec<(String, u64)>,
    /// Kernel send failures.
    pub send_errors: u64,
    /// Kernel receive failures.
    pub recv_errors: u64,
    /// Times the receive buffer ring ran dry.
    pub recv_ring_empty: u64,
    /// Exit sockets the worker made itself (the ready pool was empty).
    #[serde(default)]
    pub exit_pool_misses: u64,
    /// Cells whose circuit's layer keys were not in the key cache (expanded then).
    #[serde(default)]
    pub key_cache_misses: u64,
    /// Batches (worker loop iterations).
    pub batches: u64,
    /// Batch latency histogram (relays that have it).
    pub batch_latency: Option<Latency>,
    /// Each received cell's time in the relay, from its datagram reaching the socket
    /// to its batch's sends being handed to the kernel (relays that have it).
    #[serde(default)]
    pub cell_residence: Option<Latency>,
}

impl WorkerCounters {
    /// Drops of every reason.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }
}

/// A latency histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// `(upper bound in seconds, observations at or below it)`, cumulative,
    /// ascending; the `+Inf` bucket is [`Self::count`].
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_s: f64,
}

impl Latency {
    /// The smallest bucket bound at or below which a fraction `q` (0 to 1) of the
    /// observations lie, in seconds; `None` without observations or when the
    /// quantile falls in the `+Inf` bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map(|(le, _)| *le)
    }
}

/// The peer list in [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerListStatus {
    /// Serial.
    pub serial: u64,
    /// End of validity, Unix seconds.
    pub valid_until: u64,
    /// Relays listed.
    pub relays: u64,
    /// Whether it expired while the relay ran (the relay then refuses new circuits
    /// until a reload brings a valid list).
    pub expired: bool,
}

/// One onion key in [`Status`] and [`Rotated`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OnionKeyStatus {
    /// Public key, base64.
    pub public: String,
    /// Expiry in the relay's own peer-list entry; `None` while not listed.
    pub valid_until: Option<u64>,
    /// Creation time (key directories only).
    pub created: Option<u64>,
}

/// The `peers` document: the list in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Peers {
    /// Serial.
    pub serial: u64,
    /// End of validity, Unix seconds.
    pub valid_until: u64,
    /// Whether it expired while the relay ran.
    pub expired: bool,
    /// The list as its canonical signed text (what `shroudctl peers list --running`
    /// parses and verifies).
    pub document: String,
    /// Its relays, in short.
    pub relays: Vec<PeerSummary>,
}

/// One relay of [`Peers`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerSummary {
    /// Relay id, 32 hex digits.
    pub id: String,
    /// Address.
    pub addr: String,
    /// Inclusive port range.
    pub ports: (u16, u16),
    /// Whether it is an exit.
    pub exit: bool,
    /// Relative selection weight.
    pub weight: u32,
}

/// The `reload` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reloaded {
    /// Serial of the peer list now in force.
    pub serial: u64,
    /// Relays it lists.
    pub peers: u64,
    /// Onion keys held.
    pub onion_keys: u64,
}

/// The `rotate` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rotated {
    /// Onion keys held, newest first.
    pub onion_keys: Vec<OnionKeyStatus>,
}

/// The `drain` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Draining {
    /// Always true.
    pub draining: bool,
    /// When the relay stops at the latest, Unix milliseconds.
    pub deadline_ms: u64,
}

/// The `shutdown` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stopping {
    /// Always true.
    pub stopping: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_and_print_to_the_wire_form() {
        for (line, want) in [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#"{"cmd":"stats"}"#, Request::Stats),
            (r#"{"cmd":"peers"}"#, Request::Peers),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (r#"{"cmd":"rotate"}"#, Request::Rotate),
            (r#"{"cmd":"drain"}"#, Request::Drain { timeout_s: 30 }),
            (
                r#"{"cmd":"drain","timeout_s":5}"#,
                Request::Drain { timeout_s: 5 },
            ),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown),
        ] {
            assert_eq!(Request::parse(line), Ok(want.clone()), "{line}");
            assert_eq!(Request::parse(&want.to_line()), Ok(want.clone()));
            assert!(Request::COMMANDS.contains(&want.name()));
        }
        assert_eq!(
            Request::Drain { timeout_s: 7 }.to_line(),
            r#"{"cmd":"drain","timeout_s":7}"#
        );
    }

    #[test]
    fn bad_requests_get_a_message_that_says_what_is_wrong() {
        let err = |line: &str| Request::parse(line).unwrap_err();
        assert!(err("not json").starts_with("not JSON: "));
        assert_eq!(err("[]"), "missing \"cmd\"");
        assert_eq!(err(r#"{"cmd":1}"#), "missing \"cmd\"");
        assert_eq!(
            err(r#"{"cmd":"nope"}"#),
            "unknown command \"nope\" (status, stats, peers, reload, rotate, drain, shutdown)"
        );
        assert!(err(r#"{"cmd":"drain","timeout_s":-1}"#).starts_with("bad \"drain\" request: "));
        assert!(err(r#"{"cmd":"drain","timeout_s":"5"}"#).starts_with("bad \"drain\" request: "));
        // A misspelt argument is refused, not silently replaced by the default.
        assert!(err(r#"{"cmd":"drain","timeout":5}"#).starts_with("bad \"drain\" request: "));
        assert!(err(r#"{"cmd":"status","verbose":true}"#).starts_with("bad \"status\" request: "));
    }

    #[test]
    fn replies_round_trip_and_documents_read_with_missing_fields() {
        let ok = Reply::ok(Stopping { stopping: true });
        assert_eq!(ok.to_line(), r#"{"ok":true,"result":{"stopping":true}}"#);
        let back: Reply = serde_json::from_str(&ok.to_line()).unwrap();
        assert_eq!(
            back.into_result(),
            Ok(serde_json::json!({"stopping": true}))
        );
        let bad = Reply::error("no");
        assert_eq!(bad.to_line(), r#"{"ok":false,"error":"no"}"#);
        assert_eq!(bad.into_result(), Err("no".into()));
        let bare: Reply = serde_json::from_str(r#"{"ok":false}"#).unwrap();
        assert_eq!(bare.into_result(), Err("(no message)".into()));
        // A status from a relay that knows fewer fields still reads.
        let s: Status =
            serde_json::from_str(r#"{"relay_id":"ab","workers":[{"index":1}]}"#).unwrap();
        assert_eq!(s.relay_id, "ab");
        assert_eq!(s.workers[0].index, 1);
        assert_eq!(s.workers[0].stats, WorkerCounters::default());
        // And a full one round-trips.
        let mut full = Status {
            relay_id: "ab".into(),
            circuits: 3,
            ..Status::default()
        };
        full.drops.insert("replay".into(), 2);
        full.workers.push(WorkerStatus {
            index: 0,
            port: 9000,
            stats: WorkerCounters {
                driver: "io_uring".into(),
                drops: vec![("replay".into(), 2)],
                batch_latency: Some(Latency {
                    buckets: vec![(0.001, 4)],
                    count: 5,
                    sum_s: 0.01,
                }),
                ..WorkerCounters::default()
            },
        });
        let text = serde_json::to_string(&full).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), full);
    }

    #[test]
    fn latency_quantiles_are_bucket_bounds() {
        let l = Latency {
            buckets: vec![(0.001, 50), (0.01, 99), (0.1, 100)],
            count: 101,
            sum_s: 1.0,
        };
        // 50 of 101 observations are at or below 1 ms: 49 % is, 50 % is not.
        assert_eq!(l.quantile_bound(0.49), Some(0.001));
        assert_eq!(l.quantile_bound(0.5), Some(0.01));
        assert_eq!(l.quantile_bound(0.98), Some(0.01));
        assert_eq!(l.quantile_bound(0.99), Some(0.1));
        // The last observation is above every bound.
        assert_eq!(l.quantile_bound(1.0), None);
        assert_eq!(Latency::default().quantile_bound(0.5), None);
    }
}
