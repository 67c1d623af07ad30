//! Prometheus text exposition (format 0.0.4) of the relay on `GET /metrics`, served by
//! its own thread off the data path (127.0.0.1 by default in deploy/relay.toml).
//!
//! Two sources feed it ([`RelayMetrics`]): the workers' counters ([`WorkerStats`],
//! relaxed atomics written by each worker) and the relay's [`RelayInfo`] (onion keys,
//! peer list, cell size, draining), which the daemon replaces under a mutex at start,
//! reload, rotation and drain; a scrape holds that mutex only to clone it.
//!
//! Conventions: counters end in `_total`, times are seconds and timestamps Unix
//! seconds (`_timestamp_seconds`), per-worker series carry `worker` and `port`
//! labels, and every family has `# HELP` and `# TYPE` lines.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::stats::{StatsSnapshot, WorkerStats};

/// One onion key as the metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionKeyInfo {
    /// The public key, base64.
    pub public: String,
    /// When it expires according to the relay's own entry in the peer list; `None`
    /// while the key is not listed (not published yet).
    pub valid_until: Option<u64>,
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
    /// Whether that list expired while the relay ran (new circuits are refused).
    pub peer_list_expired: bool,
    /// Whether the relay is draining.
    pub draining: bool,
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

/// Serves Prometheus text on `GET /metrics`.
pub fn serve_metrics(addr: SocketAddr, metrics: RelayMetrics) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind metrics on {addr}"))?;
    std::thread::Builder::new()
        .name("shroud-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = metrics_conn(conn, &metrics);
            }
        })?;
    Ok(())
}

fn metrics_conn(mut conn: std::net::TcpStream, metrics: &RelayMetrics) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    // A request is a line and a few headers: read at most 16 KiB of it.
    let mut reader = BufReader::new(std::io::Read::take(conn.try_clone()?, 16 << 10));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Read the headers up to the blank line (bounded): closing a socket with unread
    // input makes the kernel reset the connection, and the client may lose the
    // response.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
    }
    let path = request.split(' ').nth(1).unwrap_or("");
    let body = if request.starts_with("GET ")
        && (path == "/metrics" || path.starts_with("/metrics?"))
    {
        let info = metrics
            .info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        render_metrics(
            &metrics.workers,
            &info,
            metrics.admin_refused.load(Ordering::Relaxed),
        )
    } else {
        let msg = "not found: try /metrics\n";
        write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}", msg.len())?;
        return Ok(());
    };
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()?;
    conn.shutdown(std::net::Shutdown::Write)
}

/// Escapes a label value (backslash, double quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `key` label of an onion key: the first 8 base64 characters of its public
/// key (enough to tell a relay's 3 keys apart; never the secret).
pub fn onion_key_label(public_base64: &str) -> String {
    public_base64.chars().take(8).collect()
}

/// Formats a float sample value as Prometheus expects (`+Inf`, `NaN`, or the
/// shortest round-tripping decimal).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition of the worker counters, the relay info and the
/// count of refused admin connections.
pub fn render_metrics(
    workers: &[(u16, Arc<WorkerStats>)],
    info: &RelayInfo,
    admin_refused: u64,
) -> String {
    let mut o = String::new();
    let snaps: Vec<(u16, StatsSnapshot)> =
        workers.iter().map(|(p, s)| (*p, s.snapshot())).collect();
    let per_worker = |o: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      f: &dyn Fn(&StatsSnapshot) -> Vec<(String, u64)>| {
        header(o, name, kind, help);
        for (i, (port, s)) in snaps.iter().enumerate() {
            for (labels, v) in f(s) {
                let sep = if labels.is_empty() { "" } else { "," };
                let _ = writeln!(
                    o,
                    "{name}{{worker=\"{i}\",port=\"{port}\"{sep}{labels}}} {v}"
                );
            }
        }
    };
    per_worker(
        &mut o,
        "shroud_cells_total",
        "counter",
        "Cells received (rx) and sent (tx) on relay sockets.",
        &|s| {
            vec![
                ("direction=\"rx\"".into(), s.cells_rx),
                ("direction=\"tx\"".into(), s.cells_tx),
            ]
        },
    );
    let cell = info.cell;
    per_worker(
        &mut o,
        "shroud_bytes_total",
        "counter",
        "Cell bytes received (rx) and sent (tx) on relay sockets (cells times the cell size; UDP/IP headers not included).",
        &|s| {
            vec![
                ("direction=\"rx\"".into(), s.cells_rx.saturating_mul(cell)),
                ("direction=\"tx\"".into(), s.cells_tx.saturating_mul(cell)),
            ]
        },
    );
    per_worker(
        &mut o,
        "shroud_datagrams_total",
        "counter",
        "UDP datagrams received (rx) and sent (tx); a GSO send counts once.",
        &|s| {
            vec![
                ("direction=\"rx\"".into(), s.datagrams_rx),
                ("direction=\"tx\"".into(), s.datagrams_tx),
            ]
        },
    );
    per_worker(
        &mut o,
        "shroud_circuit_cells_total",
        "counter",
        "Cells processed per circuit direction.",
        &|s| {
            vec![
                ("direction=\"forward\"".into(), s.cells_forward),
                ("direction=\"backward\"".into(), s.cells_backward),
            ]
        },
    );
    per_worker(
        &mut o,
        "shroud_exit_datagrams_total",
        "counter",
        "Datagrams delivered to exit destinations (out) and received from them (in).",
        &|s| {
            vec![
                ("direction=\"out\"".into(), s.exit_delivered),
                ("direction=\"in\"".into(), s.exit_replies),
            ]
        },
    );
    per_worker(
        &mut o,
        "shroud_drops_total",
        "counter",
        "Cells dropped, by reason.",
        &|s| {
            s.drops
                .iter()
                .map(|(r, v)| (format!("reason=\"{r}\""), *v))
                .collect()
        },
    );
    per_worker(
        &mut o,
        "shroud_setups_total",
        "counter",
        "Circuit setups accepted (the setup rate is rate(shroud_setups_total[1m])).",
        &|s| vec![(String::new(), s.setups)],
    );
    per_worker(
        &mut o,
        "shroud_setup_dh_total",
        "counter",
        "X25519 operations spent on setup cells (one per onion key tried).",
        &|s| vec![(String::new(), s.setup_dh)],
    );
    per_worker(
        &mut o,
        "shroud_setup_retries_total",
        "counter",
        "RETRY replies sent: setups from new addresses, under load, asked for a retry token instead of being opened.",
        &|s| vec![(String::new(), s.retries_sent)],
    );
    per_worker(
        &mut o,
        "shroud_circuits_expired_total",
        "counter",
        "Circuits removed for idleness.",
        &|s| vec![(String::new(), s.expired_circuits)],
    );
    per_worker(&mut o, "shroud_circuits", "gauge", "Live circuits.", &|s| {
        vec![(String::new(), s.circuits)]
    });
    per_worker(
        &mut o,
        "shroud_links",
        "gauge",
        "Live links, by kind (client, or peer relay).",
        &|s| {
            vec![
                ("kind=\"client\"".into(), s.client_links),
                ("kind=\"peer\"".into(), s.peer_links),
            ]
        },
    );
    per_worker(
        &mut o,
        "shroud_send_errors_total",
        "counter",
        "Send operations the kernel failed.",
        &|s| vec![(String::new(), s.send_errors)],
    );
    per_worker(
        &mut o,
        "shroud_batches_total",
        "counter",
        "Worker loop iterations (batches), including empty ones.",
        &|s| vec![(String::new(), s.batches)],
    );
    per_worker(
        &mut o,
        "shroud_driver_info",
        "gauge",
        "The I/O driver a worker runs (1 for the active one).",
        &|s| vec![(format!("driver=\"{}\"", s.driver), 1)],
    );

    let name = "shroud_batch_latency_seconds";
    header(
        &mut o,
        name,
        "histogram",
        "Relay-internal time per batch: from reaping its completions to queueing its sends to the kernel.",
    );
    for (i, (port, s)) in snaps.iter().enumerate() {
        let h = &s.batch_latency;
        let l = format!("worker=\"{i}\",port=\"{port}\"");
        for (le, n) in &h.buckets {
            let _ = writeln!(o, "{name}_bucket{{{l},le=\"{}\"}} {n}", float(*le));
        }
        let _ = writeln!(o, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(o, "{name}_sum{{{l}}} {}", float(h.sum_s));
        let _ = writeln!(o, "{name}_count{{{l}}} {}", h.count);
    }

    let name = "shroud_onion_key_expiry_timestamp_seconds";
    header(
        &mut o,
        name,
        "gauge",
        "When each onion key the relay holds expires (its valid-until in the relay's own peer-list entry), Unix seconds; keys not listed yet have no sample.",
    );
    for k in &info.onion_keys {
        if let Some(t) = k.valid_until {
            let _ = writeln!(
                o,
                "{name}{{key=\"{}\"}} {t}",
                label_value(&onion_key_label(&k.public))
            );
        }
    }
    header(
        &mut o,
        "shroud_onion_keys",
        "gauge",
        "Onion keys the relay holds (at most 3).",
    );
    let _ = writeln!(o, "shroud_onion_keys {}", info.onion_keys.len());
    header(
        &mut o,
        "shroud_peer_list_serial",
        "gauge",
        "Serial of the peer list in use.",
    );
    let _ = writeln!(o, "shroud_peer_list_serial {}", info.peer_list_serial);
    header(
        &mut o,
        "shroud_peer_list_expiry_timestamp_seconds",
        "gauge",
        "End of validity of the peer list in use, Unix seconds.",
    );
    let _ = writeln!(
        o,
        "shroud_peer_list_expiry_timestamp_seconds {}",
        info.peer_list_valid_until
    );
    header(
        &mut o,
        "shroud_peer_list_expired",
        "gauge",
        "1 while the peer list in use has expired (new circuits refused until a reload brings a valid list), else 0.",
    );
    let _ = writeln!(
        o,
        "shroud_peer_list_expired {}",
        u8::from(info.peer_list_expired)
    );
    header(
        &mut o,
        "shroud_admin_refused_total",
        "counter",
        "Admin socket connections refused because the peer is neither the relay's user nor root.",
    );
    let _ = writeln!(o, "shroud_admin_refused_total {admin_refused}");
    header(
        &mut o,
        "shroud_draining",
        "gauge",
        "1 while the relay drains (refuses new circuits), else 0.",
    );
    let _ = writeln!(o, "shroud_draining {}", u8::from(info.draining));
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn exposition_has_every_family_once_with_help_and_type() {
        let w = Arc::new(WorkerStats::default());
        w.cells_rx.store(10, Relaxed);
        w.batch_latency.record(Duration::from_micros(3));
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
        };
        let text = render_metrics(&[(9000, w.clone()), (9001, w)], &info, 3);
        assert!(
            text.contains("shroud_cells_total{worker=\"0\",port=\"9000\",direction=\"rx\"} 10\n")
        );
        assert!(text
            .contains("shroud_bytes_total{worker=\"1\",port=\"9001\",direction=\"rx\"} 10240\n"));
        assert!(text
            .contains("shroud_onion_key_expiry_timestamp_seconds{key=\"AbCd+/Ef\"} 1764000000\n"));
        assert!(!text.contains("ZZZZZZZZ"));
        assert!(text.contains("shroud_onion_keys 2\n"));
        assert!(text.contains("shroud_peer_list_serial 7\n"));
        assert!(text.contains("shroud_peer_list_expiry_timestamp_seconds 1764086400\n"));
        assert!(text.contains("shroud_peer_list_expired 1\n"));
        assert!(text.contains("shroud_admin_refused_total 3\n"));
        assert!(text.contains("shroud_draining 0\n"));
        assert!(text.contains(
            "shroud_batch_latency_seconds_bucket{worker=\"0\",port=\"9000\",le=\"0.000001\"} 0\n"
        ));
        assert!(text.contains(
            "shroud_batch_latency_seconds_bucket{worker=\"0\",port=\"9000\",le=\"0.000005\"} 1\n"
        ));
        assert!(text.contains(
            "shroud_batch_latency_seconds_bucket{worker=\"0\",port=\"9000\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains("shroud_batch_latency_seconds_count{worker=\"1\",port=\"9001\"} 1\n"));
        // Every sample belongs to a family declared before it, each declared once.
        let mut declared = Vec::new();
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
            if text.contains(&format!("# TYPE {name} counter")) {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(onion_key_label("abc"), "abc");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(1e-6), "0.000001");
    }
}
