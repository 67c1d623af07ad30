//! The relay's metrics (OpenMetrics text, written by the `prometheus-client` crate)
//! and the small HTTP endpoint that serves them off the data path (127.0.0.1 by
//! default in deploy/relay.toml).
//!
//! Sources ([`RelayMetrics`]): the workers' counters ([`WorkerStats`], relaxed atomics
//! written by each worker), the relay's [`RelayInfo`] (onion keys, peer list, cell
//! size, draining, reloads), which the daemon replaces under a mutex at start, reload,
//! rotation, drain and expiry (a scrape holds that mutex only to clone it), and the
//! process itself (`/proc/self`: CPU, memory, file descriptors, threads, start time).
//! Every scrape reads them afresh through a [`Collector`]; nothing is cached.
//!
//! Conventions: counter samples end in `_total`, times are seconds and timestamps
//! Unix seconds (`_timestamp_seconds`), per-worker series carry `worker` and `port`
//! labels.
//!
//! The endpoint ([`serve_metrics`]) answers `GET /metrics` (with `Authorization:
//! Bearer TOKEN` when a token is configured), `GET /healthz` (200 while the process
//! serves) and `GET /readyz` (200 while the relay accepts new circuits, else 503 with
//! the reason), each without a token. It runs hyper on its own current-thread tokio
//! runtime: every connection is a task, so a slow or stuck scraper costs no thread
//! and blocks nobody; a request's headers must arrive within 5 s, a connection lives
//! at most 30 s, and at most [`MAX_CONNECTIONS`] are served at once (more are closed
//! at accept). The server is `shroud-httpd`, the one the proxy and gateway use too.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use shroud_httpd::{reply, Body};

use crate::stats::WorkerStats;
use shroud_admin::{Latency, WorkerCounters};

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One onion key as the metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionKeyInfo {
    /// The public key, base64.
    pub public: String,
    /// When it expires according to the relay's own entry in the peer list; `None`
    /// while the key is not listed (not published yet).
    pub valid_until: Option<u64>,
}

/// Reloads (SIGHUP, `shroudctl reload`) since the start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadInfo {
    /// Reloads applied.
    pub succeeded: u64,
    /// Reloads refused (the relay kept its last good list and keys).
    pub failed: u64,
    /// Whether the last reload was applied (true before any reload).
    pub last_ok: bool,
    /// When the configuration in force was last loaded successfully (the start,
    /// then each applied reload), Unix seconds.
    pub last_success_s: u64,
}

/// Relay-wide facts the daemon publishes for the metrics thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayInfo {
    /// Cell size in bytes (bytes = cells x cell).
    pub cell: u64,
    /// Onion keys held, newest first.
    pub onion_keys: Vec<OnionKeyInfo>,
    /// Serial of the peer list in use.
    pub peer_list_serial: u64,
    /// End of validity of the peer list in use, Unix seconds.
    pub peer_list_valid_until: u64,
    /// Whether the list in force has expired (at start or while running): new
    /// circuits are refused until a reload brings a valid list.
    pub peer_list_expired: bool,
    /// Whether the relay is draining.
    pub draining: bool,
    /// Reloads.
    pub reloads: ReloadInfo,
}

impl RelayInfo {
    /// Whether new circuits are accepted, and if not, why.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining {
            Err("draining: new circuits are refused")
        } else if self.peer_list_expired {
            Err("the peer list in force has expired: new circuits are refused until a reload brings a valid list")
        } else {
            Ok(())
        }
    }
}

/// Everything the metrics endpoint reads: per-worker counters and the relay info.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    /// `(port, counters)` per worker, by worker index.
    pub workers: Vec<(u16, Arc<WorkerStats>)>,
    /// Updated by the daemon on start, reload, rotate, drain and peer-list expiry.
    pub info: Arc<Mutex<RelayInfo>>,
    /// Admin connections refused for their peer credentials.
    pub admin_refused: Arc<AtomicU64>,
}

impl RelayMetrics {
    /// A copy of the relay info (also if a writer panicked while holding it).
    pub fn info(&self) -> RelayInfo {
        self.info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

/// The `key` label of an onion key: the first 8 base64 characters of its public
/// key (enough to tell a relay's 3 keys apart; never the secret).
pub fn onion_key_label(public_base64: &str) -> String {
    public_base64.chars().take(8).collect()
}

type Labels = Vec<(&'static str, String)>;

/// One family's samples: labels and value.
fn family<V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels, V)],
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    if let [(labels, v)] = samples {
        if labels.is_empty() {
            return encode(*v, m);
        }
    }
    for (labels, v) in samples {
        encode(*v, m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter family; `name` without `_total` (the encoder appends it).
fn counters<V: prometheus_client::encoding::EncodeCounterValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, samples, |v, m| {
        ConstCounter::new(v).encode(m)
    })
}

/// A gauge family.
fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, samples, |v, m| {
        ConstGauge::new(v).encode(m)
    })
}

/// A histogram family, one histogram per worker that has `pick`'s.
fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    snaps: &[(Labels, WorkerCounters)],
    pick: impl Fn(&WorkerCounters) -> Option<&Latency>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, s) in snaps {
        let Some(h) = pick(s) else {
            continue;
        };
        // The encoder wants per-bucket counts, +Inf as f64::MAX.
        let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
        let mut below = 0;
        for (le, cum) in &h.buckets {
            buckets.push((*le, cum - below));
            below = *cum;
        }
        buckets.push((f64::MAX, h.count - below));
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(h.sum_s, h.count, &buckets, None)?;
    }
    Ok(())
}

fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Vec::new(), v)]
}

impl Collector for RelayMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let info = self.info();
        let snaps: Vec<(Labels, WorkerCounters)> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, (port, s))| {
                (
                    vec![("worker", i.to_string()), ("port", port.to_string())],
                    s.snapshot(),
                )
            })
            .collect();
        let per_worker = |f: &dyn Fn(&WorkerCounters) -> Vec<(Labels, u64)>| {
            let mut out = Vec::new();
            for (labels, s) in &snaps {
                for (extra, v) in f(s) {
                    let mut l = labels.clone();
                    l.extend(extra);
                    out.push((l, v));
                }
            }
            out
        };
        let dir = |d: &str| vec![("direction", d.to_owned())];
        let cell = info.cell;
        counters(
            &mut enc,
            "shroud_cells",
            "Cells received (rx) and sent (tx) on relay sockets.",
            &per_worker(&|s| vec![(dir("rx"), s.cells_rx), (dir("tx"), s.cells_tx)]),
        )?;
        counters(
            &mut enc,
            "shroud_bytes",
            "Cell bytes received (rx) and sent (tx) on relay sockets (cells times the cell size; UDP/IP headers not included).",
            &per_worker(&|s| {
                vec![
                    (dir("rx"), s.cells_rx.saturating_mul(cell)),
                    (dir("tx"), s.cells_tx.saturating_mul(cell)),
                ]
            }),
        )?;
        counters(
            &mut enc,
            "shroud_datagrams",
            "UDP datagrams received (rx) and sent (tx); a GSO send counts once.",
            &per_worker(&|s| vec![(dir("rx"), s.datagrams_rx), (dir("tx"), s.datagrams_tx)]),
        )?;
        counters(
            &mut enc,
            "shroud_circuit_cells",
            "Cells processed per circuit direction.",
            &per_worker(&|s| {
                vec![
                    (dir("forward"), s.cells_forward),
                    (dir("backward"), s.cells_backward),
                ]
            }),
        )?;
        counters(
            &mut enc,
            "shroud_exit_datagrams",
            "Datagrams delivered to exit destinations (out) and received from them (in).",
            &per_worker(&|s| vec![(dir("out"), s.exit_delivered), (dir("in"), s.exit_replies)]),
        )?;
        counters(
            &mut enc,
            "shroud_exit_sends",
            "Sends carrying exit deliveries (consecutive deliveries of one circuit leave in one UDP GSO send).",
            &per_worker(&|s| vec![(vec![], s.exit_sends)]),
        )?;
        counters(
            &mut enc,
            "shroud_drops",
            "Cells dropped, by reason.",
            &per_worker(&|s| {
                s.drops
                    .iter()
                    .map(|(r, v)| (vec![("reason", r.clone())], *v))
                    .collect()
            }),
        )?;
        counters(
            &mut enc,
            "shroud_setups",
            "Circuit setups accepted (the setup rate is rate(shroud_setups_total[1m])).",
            &per_worker(&|s| vec![(Vec::new(), s.setups)]),
        )?;
        counters(
            &mut enc,
            "shroud_setup_dh",
            "X25519 operations spent on setup cells (one per onion key tried).",
            &per_worker(&|s| vec![(Vec::new(), s.setup_dh)]),
        )?;
        counters(
            &mut enc,
            "shroud_setup_retries",
            "RETRY replies sent: setups from new addresses, under load, asked for a retry token instead of being opened.",
            &per_worker(&|s| vec![(Vec::new(), s.retries_sent)]),
        )?;
        counters(
            &mut enc,
            "shroud_circuits_expired",
            "Circuits removed for idleness.",
            &per_worker(&|s| vec![(Vec::new(), s.expired_circuits)]),
        )?;
        counters(
            &mut enc,
            "shroud_cover_cells",
            "Cover cells that ended at this exit (kind received, loop cover included) and loop cover cells it sent back (kind returned).",
            &per_worker(&|s| {
                vec![
                    (vec![("kind", "received".to_owned())], s.cover_received),
                    (vec![("kind", "returned".to_owned())], s.loop_cover_returned),
                ]
            }),
        )?;
        counters(
            &mut enc,
            "shroud_link_padding_cells",
            "Constant-rate links: link padding cells sent to peer relays (direction out) and received from them and dropped (direction in).",
            &per_worker(&|s| {
                vec![
                    (dir("out"), s.link_padding_sent),
                    (dir("in"), s.link_padding_received),
                ]
            }),
        )?;
        counters(
            &mut enc,
            "shroud_mix_delayed",
            "Mix mode: cells held for a delay before being sent on.",
            &per_worker(&|s| vec![(Vec::new(), s.mix_delayed)]),
        )?;
        counters(
            &mut enc,
            "shroud_mix_overflow",
            "Mix mode: cells dropped because the delay queue was full (also counted as queue_full).",
            &per_worker(&|s| vec![(Vec::new(), s.mix_overflow)]),
        )?;
        gauges(
            &mut enc,
            "shroud_mix_held",
            "Mix mode: cells held in the delay queue now.",
            &per_worker(&|s| vec![(Vec::new(), s.mix_held)]),
        )?;
        gauges(
            &mut enc,
            "shroud_circuits",
            "Live circuits.",
            &per_worker(&|s| vec![(Vec::new(), s.circuits)]),
        )?;
        gauges(
            &mut enc,
            "shroud_links",
            "Live links, by kind (client, or peer relay).",
            &per_worker(&|s| {
                vec![
                    (vec![("kind", "client".to_owned())], s.client_links),
                    (vec![("kind", "peer".to_owned())], s.peer_links),
                ]
            }),
        )?;
        counters(
            &mut enc,
            "shroud_send_errors",
            "Send operations the kernel failed.",
            &per_worker(&|s| vec![(Vec::new(), s.send_errors)]),
        )?;
        counters(
            &mut enc,
            "shroud_recv_errors",
            "Receive operations the kernel failed.",
            &per_worker(&|s| vec![(Vec::new(), s.recv_errors)]),
        )?;
        counters(
            &mut enc,
            "shroud_recv_ring_empty",
            "Times the receive buffer ring ran dry (receiving paused until sends released buffers).",
            &per_worker(&|s| vec![(Vec::new(), s.recv_ring_empty)]),
        )?;
        counters(
            &mut enc,
            "shroud_exit_pool_misses",
            "Exit sockets a worker made itself because its pool of ready exit sockets was empty.",
            &per_worker(&|s| vec![(Vec::new(), s.exit_pool_misses)]),
        )?;
        counters(
            &mut enc,
            "shroud_key_cache_misses",
            "Cells whose circuit's layer keys were not in the worker's key cache and were expanded ([limits] key_cache).",
            &per_worker(&|s| vec![(Vec::new(), s.key_cache_misses)]),
        )?;
        counters(
            &mut enc,
            "shroud_batches",
            "Worker loop iterations (batches), including empty ones.",
            &per_worker(&|s| vec![(Vec::new(), s.batches)]),
        )?;
        gauges(
            &mut enc,
            "shroud_driver_info",
            "The I/O driver a worker runs (1 for the active one).",
            &per_worker(&|s| vec![(vec![("driver", s.driver.clone())], 1)]),
        )?;
        histograms(
            &mut enc,
            "shroud_batch_latency_seconds",
            "Relay-internal time per batch: from reaping its completions to queueing its sends to the kernel.",
            &snaps,
            |s| s.batch_latency.as_ref(),
        )?;
        histograms(
            &mut enc,
            "shroud_cell_residence_seconds",
            "Each received cell's time in the relay: from its datagram reaching the socket (kernel receive timestamp) to its batch's sends being handed to the kernel.",
            &snaps,
            |s| s.cell_residence.as_ref(),
        )?;
        let keys: Vec<(Labels, u64)> = info
            .onion_keys
            .iter()
            .filter_map(|k| {
                k.valid_until
                    .map(|t| (vec![("key", onion_key_label(&k.public))], t))
            })
            .collect();
        gauges(
            &mut enc,
            "shroud_onion_key_expiry_timestamp_seconds",
            "When each onion key the relay holds expires (its valid-until in the relay's own peer-list entry), Unix seconds; keys not listed yet have no sample.",
            &keys,
        )?;
        let unlisted = info
            .onion_keys
            .iter()
            .filter(|k| k.valid_until.is_none())
            .count() as u64;
        gauges(
            &mut enc,
            "shroud_onion_keys",
            "Onion keys the relay holds (at most 3).",
            &one(info.onion_keys.len() as u64),
        )?;
        gauges(
            &mut enc,
            "shroud_onion_keys_unlisted",
            "Onion keys the relay holds that its own entry in the peer list does not list (not published yet).",
            &one(unlisted),
        )?;
        gauges(
            &mut enc,
            "shroud_peer_list_serial",
            "Serial of the peer list in use.",
            &one(info.peer_list_serial),
        )?;
        gauges(
            &mut enc,
            "shroud_peer_list_expiry_timestamp_seconds",
            "End of validity of the peer list in use, Unix seconds.",
            &one(info.peer_list_valid_until),
        )?;
        gauges(
            &mut enc,
            "shroud_peer_list_expired",
            "1 while the peer list in use has expired (new circuits refused until a reload brings a valid list), else 0.",
            &one(u64::from(info.peer_list_expired)),
        )?;
        counters(
            &mut enc,
            "shroud_admin_refused",
            "Admin socket connections refused because the peer is neither the relay's user nor root.",
            &one(self.admin_refused.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "shroud_draining",
            "1 while the relay drains (refuses new circuits), else 0.",
            &one(u64::from(info.draining)),
        )?;
        gauges(
            &mut enc,
            "shroud_accepting",
            "1 while the relay accepts new circuits (not draining, peer list not expired), else 0.",
            &one(u64::from(info.readiness().is_ok())),
        )?;
        counters(
            &mut enc,
            "shroud_reloads",
            "Reloads (SIGHUP, shroudctl reload) applied (success) and refused (failure: the last good peer list and keys stay in force).",
            &[
                (vec![("result", "success".to_owned())], info.reloads.succeeded),
                (vec![("result", "failure".to_owned())], info.reloads.failed),
            ],
        )?;
        gauges(
            &mut enc,
            "shroud_last_reload_successful",
            "1 if the last reload was applied (or none was tried), 0 if it was refused.",
            &one(u64::from(info.reloads.last_ok)),
        )?;
        gauges(
            &mut enc,
            "shroud_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (start or last applied reload), Unix seconds.",
            &one(info.reloads.last_success_s),
        )?;
        gauges(
            &mut enc,
            "shroud_build_info",
            "The relay's version (always 1).",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                    ("rust_version", env!("CARGO_PKG_RUST_VERSION").to_owned()),
                ],
                1u64,
            )],
        )?;
        Ok(())
    }
}

/// The process's own metrics, read from `/proc/self` at each scrape (Linux only, as
/// the relay is); a file that cannot be read leaves its family out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

/// What [`ProcessCollector`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
    /// Start time, Unix seconds.
    pub start_time_s: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
}

/// Parses `/proc/self/stat` (`stat`), `/proc/self/status` (`status`, for VmRSS)
/// and the boot time `btime` (from `/proc/stat`), with `ticks` clock ticks a second.
/// Without `btime` (systemd's `ProcSubset=pid` hides `/proc/stat`), the start time
/// is `fallback_start_s`.
pub fn parse_process_stats(
    stat: &str,
    status: &str,
    btime: Option<u64>,
    ticks: u64,
    fallback_start_s: u64,
) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold spaces: fields
    // are counted from after its last ')'; `f[0]` is field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ticks = ticks.max(1);
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())?;
    Some(ProcessStats {
        cpu_seconds: (num(11)? + num(12)?) as f64 / ticks as f64,
        threads: num(17)?,
        start_time_s: match btime {
            Some(b) => b + num(19)? / ticks,
            None => fallback_start_s,
        },
        virtual_bytes: num(20)?,
        resident_bytes: rss_kb * 1024,
    })
}

/// When the process started as far as the metrics know without `/proc/stat`: set
/// by [`serve_metrics`] (at the relay's start) or at the first scrape.
static PROCESS_START_S: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn read_process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    });
    let fallback = *PROCESS_START_S.get_or_init(|| crate::sys::now_ms() / 1000);
    parse_process_stats(&stat, &status, btime, crate::sys::clock_ticks(), fallback)
}

/// The soft limit on open files, from `/proc/self/limits`.
fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        if let Some(p) = read_process_stats() {
            counters(
                &mut enc,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                &one(p.cpu_seconds),
            )?;
            gauges(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                &one(p.resident_bytes),
            )?;
            gauges(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                &one(p.virtual_bytes),
            )?;
            gauges(
                &mut enc,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &one(p.start_time_s),
            )?;
            gauges(
                &mut enc,
                "process_threads",
                "Number of OS threads in the process.",
                &one(p.threads),
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauges(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors.",
                &one(fds.count() as u64),
            )?;
        }
        if let Some(n) = max_fds() {
            gauges(
                &mut enc,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                &one(n),
            )?;
        }
        Ok(())
    }
}

/// The OpenMetrics text of the relay's and the process's metrics (ends in `# EOF`).
pub fn render_metrics(metrics: &RelayMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics.clone()));
    registry.register_collector(Box::new(ProcessCollector));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a
    // collector above, and the partial text is still the best answer.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Reads the bearer token for `/metrics` from `path`: one line (surrounding
/// whitespace ignored) of at least 16 characters, in a file group and others cannot
/// read.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("metrics.bearer_token_file: cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(anyhow!(
            "metrics.bearer_token_file: {} has mode {mode:04o}: group and others must not read it (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("metrics.bearer_token_file: cannot read {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || token.contains(char::is_whitespace) || !token.is_ascii() {
        return Err(anyhow!(
            "metrics.bearer_token_file: {} must hold one token of at least 16 ASCII characters without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Compares without an early exit, so the time taken does not tell how much of a
/// guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries `token`.
pub fn authorized(header: Option<&[u8]>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let Some(h) = header else { return false };
    match h.strip_prefix(b"Bearer ") {
        Some(given) => same_secret(given, token.as_bytes()),
        None => false,
    }
}

/// Answers one request (see the [module docs](self)).
pub fn route<B>(
    req: &hyper::Request<B>,
    metrics: &RelayMetrics,
    token: Option<&str>,
) -> hyper::Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let get = req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD;
    match req.uri().path() {
        _ if !get => reply(405, TEXT, "only GET\n".into()),
        "/metrics" => {
            let auth = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !authorized(auth, token) {
                let mut r = reply(401, TEXT, "a bearer token is required\n".into());
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
            reply(200, CONTENT_TYPE, render_metrics(metrics))
        }
        "/healthz" => reply(200, TEXT, "ok\n".into()),
        "/readyz" => match metrics.info().readiness() {
            Ok(()) => reply(200, TEXT, "accepting circuits\n".into()),
            Err(why) => reply(503, TEXT, format!("{why}\n")),
        },
        _ => reply(
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves [`route`] on `addr` from a thread of its own; returns the bound address
/// (useful with port 0).
pub fn serve_metrics(
    addr: SocketAddr,
    metrics: RelayMetrics,
    token: Option<String>,
) -> anyhow::Result<SocketAddr> {
    PROCESS_START_S.get_or_init(|| crate::sys::now_ms() / 1000);
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the metrics server's runtime")?;
    let handler: shroud_httpd::Handler =
        Arc::new(move |req: &shroud_httpd::Request| route(req, &metrics, token.as_deref()));
    std::thread::Builder::new()
        .name("shroud-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => shroud_httpd::serve(l, MAX_CONNECTIONS, handler).await,
                    Err(e) => tracing::error!(error = %e, "metrics endpoint stopped"),
                }
            });
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    fn sample() -> RelayMetrics {
        let w = Arc::new(WorkerStats::default());
        w.cells_rx.store(10, Relaxed);
        w.batch_latency.record(Duration::from_micros(3));
        w.cell_residence.record_ns(80_000, 64);
        let info = RelayInfo {
            cell: 1024,
            onion_keys: vec![
                OnionKeyInfo {
                    public: "AbCd+/EfGhIjKlMnOpQrStUvWxYz0123456789abcd=".into(),
                    valid_until: Some(1_764_000_000),
                },
                OnionKeyInfo {
                    public: "ZZZZZZZZZZ".into(),
                    valid_until: None,
                },
            ],
            peer_list_serial: 7,
            peer_list_valid_until: 1_764_086_400,
            peer_list_expired: true,
            draining: false,
            reloads: ReloadInfo {
                succeeded: 2,
                failed: 1,
                last_ok: false,
                last_success_s: 1_764_000_100,
            },
        };
        RelayMetrics {
            workers: vec![(9000, w.clone()), (9001, w)],
            info: Arc::new(Mutex::new(info)),
            admin_refused: Arc::new(AtomicU64::new(3)),
        }
    }

    #[test]
    fn exposition_has_every_family_once_with_help_and_type() {
        let text = render_metrics(&sample());
        for want in [
            "shroud_cells_total{worker=\"0\",port=\"9000\",direction=\"rx\"} 10\n",
            "shroud_bytes_total{worker=\"1\",port=\"9001\",direction=\"rx\"} 10240\n",
            "shroud_onion_key_expiry_timestamp_seconds{key=\"AbCd+/Ef\"} 1764000000\n",
            "shroud_onion_keys 2\n",
            "shroud_onion_keys_unlisted 1\n",
            "shroud_peer_list_serial 7\n",
            "shroud_peer_list_expiry_timestamp_seconds 1764086400\n",
            "shroud_peer_list_expired 1\n",
            "shroud_accepting 0\n",
            "shroud_admin_refused_total 3\n",
            "shroud_draining 0\n",
            "shroud_reloads_total{result=\"success\"} 2\n",
            "shroud_reloads_total{result=\"failure\"} 1\n",
            "shroud_last_reload_successful 0\n",
            "shroud_last_reload_success_timestamp_seconds 1764000100\n",
            "shroud_build_info{version=\"0.1.0\",rust_version=\"1.95\"} 1\n",
            "shroud_batch_latency_seconds_bucket{le=\"0.000001\",worker=\"0\",port=\"9000\"} 0\n",
            "shroud_batch_latency_seconds_bucket{le=\"0.000005\",worker=\"0\",port=\"9000\"} 1\n",
            "shroud_batch_latency_seconds_bucket{le=\"+Inf\",worker=\"0\",port=\"9000\"} 1\n",
            "shroud_batch_latency_seconds_count{worker=\"1\",port=\"9001\"} 1\n",
            "shroud_cell_residence_seconds_bucket{le=\"0.00005\",worker=\"0\",port=\"9000\"} 0\n",
            "shroud_cell_residence_seconds_bucket{le=\"0.0001\",worker=\"0\",port=\"9000\"} 64\n",
            "shroud_cell_residence_seconds_count{worker=\"1\",port=\"9001\"} 64\n",
            "# TYPE shroud_cell_residence_seconds histogram\n",
            "# TYPE shroud_cells counter\n",
            "# TYPE shroud_batch_latency_seconds histogram\n",
            "process_threads ",
            "process_open_fds ",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("ZZZZZZZZ"));
        assert!(text.ends_with("# EOF\n"));
        // Every sample belongs to the family declared just before it, each declared once.
        let mut declared: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name.to_owned()), "{name} twice");
                declared.push(name.to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = declared.last().unwrap();
                assert!(name.starts_with(family.as_str()), "{line} after {family}");
            }
        }
        for name in &declared {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn process_stats_parse_from_proc_text() {
        // A command name with spaces and parentheses, as the kernel writes it.
        let stat = "4242 (shroud (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let status = "Name:\tshroud\nVmRSS:\t   8192 kB\nThreads:\t7\n";
        let p = parse_process_stats(stat, status, Some(1_700_000_000), 100, 5).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_s, 1_700_000_010);
        assert_eq!(p.virtual_bytes, 123_456_789);
        assert_eq!(p.resident_bytes, 8192 * 1024);
        assert_eq!(
            parse_process_stats("garbage", status, Some(0), 100, 5),
            None
        );
        // /proc/stat hidden (ProcSubset=pid): the fallback start time.
        let p = parse_process_stats(stat, status, None, 100, 5).unwrap();
        assert_eq!((p.start_time_s, p.threads), (5, 7));
        // And the live process reads.
        let live = read_process_stats().unwrap();
        assert!(live.threads >= 1 && live.resident_bytes > 0, "{live:?}");
    }

    #[test]
    fn bearer_tokens_are_checked_whole() {
        assert!(authorized(None, None));
        assert!(!authorized(None, Some("0123456789abcdef")));
        assert!(authorized(
            Some(b"Bearer 0123456789abcdef"),
            Some("0123456789abcdef")
        ));
        assert!(!authorized(
            Some(b"Bearer 0123456789abcde"),
            Some("0123456789abcdef")
        ));
        assert!(!authorized(
            Some(b"Basic 0123456789abcdef"),
            Some("0123456789abcdef")
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cr3t-t0ken-0123456789\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", read_token(&p).unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap(), "s3cr3t-t0ken-0123456789");
        std::fs::write(&p, "short\n").unwrap();
        let e = format!("{:#}", read_token(&p).unwrap_err());
        assert!(e.contains("at least 16"), "{e}");
        let e = format!("{:#}", read_token(&dir.path().join("none")).unwrap_err());
        assert!(e.contains("No such file"), "{e}");
    }

    fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, text)
    }

    #[test]
    fn endpoint_survives_slow_and_concurrent_scrapers_and_checks_the_token() {
        let m = sample();
        let token = "0123456789abcdef-token";
        let addr = serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            m.clone(),
            Some(token.into()),
        )
        .unwrap();
        // Slow scrapers: connected, half a request line, then nothing.
        let mut stalled = Vec::new();
        for _ in 0..8 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metr").unwrap();
            stalled.push(s);
        }
        // Concurrent scrapers all get their answer meanwhile.
        let threads: Vec<_> = (0..16)
            .map(|_| std::thread::spawn(move || get(addr, "/metrics", Some(token))))
            .collect();
        for t in threads {
            let (code, text) = t.join().unwrap();
            assert_eq!(code, 200, "{text}");
            assert!(
                text.contains("shroud_cells_total{worker=\"0\",port=\"9000\",direction=\"rx\"} 10")
            );
            assert!(text.contains(CONTENT_TYPE), "{text}");
        }
        let (code, text) = get(addr, "/metrics", None);
        assert_eq!(code, 401, "{text}");
        assert!(!text.contains("shroud_cells"));
        assert_eq!(get(addr, "/metrics", Some("wrong-token-000000000")).0, 401);
        assert_eq!(get(addr, "/healthz", None).0, 200);
        // The sample's peer list expired: not ready, and says why.
        let (code, text) = get(addr, "/readyz", None);
        assert_eq!(code, 503);
        assert!(text.contains("expired"), "{text}");
        m.info.lock().unwrap().peer_list_expired = false;
        assert_eq!(get(addr, "/readyz", None).0, 200);
        assert_eq!(get(addr, "/nope", None).0, 404);
        // The stalled connections are closed by the header timeout.
        for mut s in stalled {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    }
}
