//! A relay's `status` document, rates computed from two of them, and the tables of
//! `shroudctl status` and `shroudctl top`.
//!
//! [`Status`] (from `shroud-admin`, the types the relay writes) is the relay's reply to
//! `{"cmd":"status"}`. Every field has a default, so a document from an older or newer
//! relay (fields missing or added) still reads. [`Rates::between`] turns two samples into per-second rates per
//! worker; counters that went down (the relay restarted in between) count as zero.
//! [`render_status`] is the human table; `now` is an argument.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use shroud_admin::{Latency, Status, WorkerStatus};

use crate::time::{format_date_relative, format_relative, format_span};

/// Per-second rates of one worker between two samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkerRates {
    /// Worker index.
    pub index: u64,
    /// Its UDP port.
    pub port: u16,
    /// Cells received per second.
    pub cells_rx_per_s: f64,
    /// Cells sent per second.
    pub cells_tx_per_s: f64,
    /// Datagrams received per second.
    pub datagrams_rx_per_s: f64,
    /// Datagrams sent per second.
    pub datagrams_tx_per_s: f64,
    /// Setups accepted per second.
    pub setups_per_s: f64,
    /// Drops (all reasons) per second.
    pub drops_per_s: f64,
    /// Batch latencies observed in the interval.
    pub batch_latency_observations: u64,
    /// Upper bucket bound of the median batch latency in the interval, seconds
    /// (`None` without observations or above the largest bound).
    pub batch_latency_p50_s: Option<f64>,
    /// Upper bucket bound of the 99th-percentile batch latency in the interval.
    pub batch_latency_p99_s: Option<f64>,
    /// Cells whose time in the relay was observed in the interval (each received
    /// cell once).
    pub cell_residence_observations: u64,
    /// Upper bucket bound of the median cell's time in the relay in the interval.
    pub cell_residence_p50_s: Option<f64>,
    /// Upper bucket bound of the 99th-percentile cell's time in the relay.
    pub cell_residence_p99_s: Option<f64>,
}

/// Rates between two [`Status`] samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the samples.
    pub interval_s: f64,
    /// Per worker, by index (workers present in both samples).
    pub workers: Vec<WorkerRates>,
    /// Sums over the workers (`index` and `port` are 0).
    pub total: WorkerRates,
    /// Drops per second by reason, all workers.
    pub drops_per_s: BTreeMap<String, f64>,
}

fn per_s(a: u64, b: u64, secs: f64) -> f64 {
    b.saturating_sub(a) as f64 / secs
}

/// Observations made between `a` and `b`, and the bucket bounds of their p50 and p99.
fn interval(a: Option<&Latency>, b: Option<&Latency>) -> (u64, Option<f64>, Option<f64>) {
    let observations = b
        .map_or(0, |l| l.count)
        .saturating_sub(a.map_or(0, |l| l.count));
    (
        observations,
        interval_quantile(a, b, 0.5),
        interval_quantile(a, b, 0.99),
    )
}

/// The `q` quantile's bucket bound among the observations made between `a` and `b`.
fn interval_quantile(a: Option<&Latency>, b: Option<&Latency>, q: f64) -> Option<f64> {
    let b = b?;
    let count = b.count.saturating_sub(a.map_or(0, |a| a.count));
    if count == 0 {
        return None;
    }
    let want = ((q * count as f64).ceil() as u64).max(1);
    b.buckets.iter().enumerate().find_map(|(i, (le, n))| {
        let before = a.and_then(|a| a.buckets.get(i)).map_or(0, |x| x.1);
        (n.saturating_sub(before) >= want).then_some(*le)
    })
}

impl Rates {
    /// The rates from sample `a` to sample `b`, `secs` apart (`secs > 0`).
    pub fn between(a: &Status, b: &Status, secs: f64) -> Rates {
        let secs = if secs > 0.0 { secs } else { f64::MIN_POSITIVE };
        let mut workers = Vec::new();
        for wb in &b.workers {
            let Some(wa) = a.workers.iter().find(|w| w.index == wb.index) else {
                continue;
            };
            let (x, y) = (&wa.stats, &wb.stats);
            let batch = interval(x.batch_latency.as_ref(), y.batch_latency.as_ref());
            let held = interval(x.cell_residence.as_ref(), y.cell_residence.as_ref());
            workers.push(WorkerRates {
                index: wb.index,
                port: wb.port,
                cells_rx_per_s: per_s(x.cells_rx, y.cells_rx, secs),
                cells_tx_per_s: per_s(x.cells_tx, y.cells_tx, secs),
                datagrams_rx_per_s: per_s(x.datagrams_rx, y.datagrams_rx, secs),
                datagrams_tx_per_s: per_s(x.datagrams_tx, y.datagrams_tx, secs),
                setups_per_s: per_s(x.setups, y.setups, secs),
                drops_per_s: per_s(x.drops_total(), y.drops_total(), secs),
                batch_latency_observations: batch.0,
                batch_latency_p50_s: batch.1,
                batch_latency_p99_s: batch.2,
                cell_residence_observations: held.0,
                cell_residence_p50_s: held.1,
                cell_residence_p99_s: held.2,
            });
        }
        let mut total = WorkerRates::default();
        for w in &workers {
            total.cells_rx_per_s += w.cells_rx_per_s;
            total.cells_tx_per_s += w.cells_tx_per_s;
            total.datagrams_rx_per_s += w.datagrams_rx_per_s;
            total.datagrams_tx_per_s += w.datagrams_tx_per_s;
            total.setups_per_s += w.setups_per_s;
            total.drops_per_s += w.drops_per_s;
        }
        let drops_per_s = b
            .drops
            .iter()
            .map(|(reason, n)| {
                let before = a.drops.get(reason).copied().unwrap_or(0);
                (reason.clone(), per_s(before, *n, secs))
            })
            .collect();
        Rates {
            interval_s: secs,
            workers,
            total,
            drops_per_s,
        }
    }
}

/// A rate for a table: no decimals from 100 up, one below.
pub fn format_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A duration in seconds for a table: `250us`, `2.5ms`, `1.2s`.
fn format_seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{}us", trim(s * 1e6))
    } else if s < 1.0 {
        format!("{}ms", trim(s * 1e3))
    } else {
        format!("{}s", trim(s))
    }
}

/// A p99 latency column: `<=250us`, or `>100ms` above the largest bucket of `h`,
/// or `-` without observations.
fn p99_cell(p99_s: Option<f64>, observations: u64, h: Option<&Latency>) -> String {
    match (p99_s, h.and_then(|h| h.buckets.last())) {
        (Some(v), _) => format!("<={}", format_seconds(v)),
        (None, Some((last, _))) if observations > 0 => {
            format!(">{}", format_seconds(*last))
        }
        _ => "-".into(),
    }
}

fn trim(v: f64) -> String {
    let t = format!("{v:.1}");
    t.strip_suffix(".0").map(str::to_owned).unwrap_or(t)
}

/// Lays out rows under a header, columns separated by two spaces, the first
/// `left` columns left-aligned and the others right-aligned.
fn table(out: &mut String, indent: &str, header: &[&str], rows: &[Vec<String>], left: usize) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(indent);
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            if i < left {
                let _ = write!(l, "{cell:<w$}");
            } else {
                let _ = write!(l, "{cell:>w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// The human rendering of a status sample, with rates when two samples were taken.
pub fn render_status(s: &Status, rates: Option<&Rates>, now: u64) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "relay {}  shroud-relay {}  up {}  cell {}  h-max {}  {}",
        s.relay_id,
        s.version,
        format_span(s.uptime_s),
        s.cell,
        s.h_max,
        if s.draining {
            "DRAINING (refusing new circuits)"
        } else if s.peer_list.expired {
            "PEER LIST EXPIRED (refusing new circuits until a reload brings a valid list)"
        } else {
            "accepting circuits"
        }
    );
    let _ = writeln!(
        o,
        "peer list serial {}, {} relays, expires {}",
        s.peer_list.serial,
        s.peer_list.relays,
        format_date_relative(s.peer_list.valid_until, now)
    );
    let _ = writeln!(
        o,
        "onion keys (newest first){}",
        s.onion_key_dir
            .as_ref()
            .map(|d| format!(", from {d}"))
            .unwrap_or_default()
    );
    for k in &s.onion_keys {
        let expiry = match k.valid_until {
            Some(t) if t <= now => format!("EXPIRED {}", format_date_relative(t, now)),
            Some(t) => format!("expires {}", format_date_relative(t, now)),
            None => "not in the peer list yet".to_owned(),
        };
        let created = k
            .created
            .map(|t| format!("; created {}", format_relative(t, now)))
            .unwrap_or_default();
        let _ = writeln!(o, "  {}  {expiry}{created}", k.public);
    }

    let _ = writeln!(
        o,
        "\nworkers{}",
        rates
            .map(|r| format!(" (rates over {} s)", trim(r.interval_s)))
            .unwrap_or_default()
    );
    let header = [
        "WORKER",
        "PORT",
        "DRIVER",
        "RX CELLS/S",
        "TX CELLS/S",
        "SETUPS/S",
        "DROPS/S",
        "CIRCUITS",
        "BATCH P99",
        "CELL P99",
    ];
    let rate_of =
        |w: &WorkerStatus| rates.and_then(|r| r.workers.iter().find(|x| x.index == w.index));
    let mut rows: Vec<Vec<String>> = s
        .workers
        .iter()
        .map(|w| {
            let r = rate_of(w);
            let f = |g: fn(&WorkerRates) -> f64| {
                r.map_or_else(|| "-".to_owned(), |r| format_rate(g(r)))
            };
            let p99 = |g: fn(&WorkerRates) -> (Option<f64>, u64), h: Option<&Latency>| {
                r.map_or_else(
                    || "-".to_owned(),
                    |r| {
                        let (p99, n) = g(r);
                        p99_cell(p99, n, h)
                    },
                )
            };
            vec![
                w.index.to_string(),
                w.port.to_string(),
                w.stats.driver.clone(),
                f(|r| r.cells_rx_per_s),
                f(|r| r.cells_tx_per_s),
                f(|r| r.setups_per_s),
                f(|r| r.drops_per_s),
                w.stats.circuits.to_string(),
                p99(
                    |r| (r.batch_latency_p99_s, r.batch_latency_observations),
                    w.stats.batch_latency.as_ref(),
                ),
                p99(
                    |r| (r.cell_residence_p99_s, r.cell_residence_observations),
                    w.stats.cell_residence.as_ref(),
                ),
            ]
        })
        .collect();
    if s.workers.len() > 1 {
        let t = rates.map(|r| &r.total);
        let f =
            |g: fn(&WorkerRates) -> f64| t.map_or_else(|| "-".to_owned(), |r| format_rate(g(r)));
        rows.push(vec![
            "total".into(),
            String::new(),
            String::new(),
            f(|r| r.cells_rx_per_s),
            f(|r| r.cells_tx_per_s),
            f(|r| r.setups_per_s),
            f(|r| r.drops_per_s),
            s.circuits.to_string(),
            String::new(),
            String::new(),
        ]);
    }
    table(&mut o, "  ", &header, &rows, 3);

    let _ = writeln!(o, "\ndrops by reason");
    let rows: Vec<Vec<String>> = s
        .drops
        .iter()
        .map(|(reason, n)| {
            vec![
                reason.clone(),
                n.to_string(),
                rates
                    .and_then(|r| r.drops_per_s.get(reason))
                    .map_or_else(|| "-".to_owned(), |v| format_rate(*v)),
            ]
        })
        .collect();
    table(&mut o, "  ", &["REASON", "TOTAL", "PER S"], &rows, 1);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(rx: u64, setups: u64, bad_tag: u64, latency: (u64, u64)) -> Status {
        serde_json::from_value(json!({
            "relay_id": "00112233445566778899aabbccddeeff",
            "version": "0.1.0",
            "uptime_s": 3_700,
            "draining": false,
            "cell": 1024,
            "h_max": 8,
            "circuits": 3,
            "drops": {"bad_tag": bad_tag, "replay": 0},
            "workers": [
                {"index": 0, "port": 9000, "stats": {
                    "driver": "io_uring", "cells_rx": rx, "cells_tx": rx, "datagrams_rx": 1,
                    "datagrams_tx": 1, "setups": setups, "circuits": 2,
                    "drops": [["bad_tag", bad_tag], ["replay", 0]], "send_errors": 0,
                    "batches": 10, "some_new_counter": 5,
                    "batch_latency": {"buckets": [[0.00001, latency.0], [0.001, latency.1]],
                                      "count": latency.1, "sum_s": 0.0},
                    "cell_residence": {"buckets": [[0.0001, rx / 2], [0.0025, rx]],
                                       "count": rx, "sum_s": 0.0}}},
                {"index": 1, "port": 9001, "stats": {"driver": "io_uring", "circuits": 1,
                    "drops": [["bad_tag", 0], ["replay", 0]]}}
            ],
            "peer_list": {"serial": 7, "valid_until": 1_764_086_400, "relays": 3},
            "onion_keys": [
                {"public": "NEWKEY", "valid_until": null, "created": 1_764_040_000},
                {"public": "OLDKEY", "valid_until": 1_764_050_000, "created": null}
            ],
            "a_future_field": true
        }))
        .expect("status parses")
    }

    #[test]
    fn rates_between_two_samples() {
        let a = sample(1_000, 10, 1, (5, 10));
        let b = sample(3_000, 14, 3, (95, 110));
        let r = Rates::between(&a, &b, 2.0);
        assert_eq!(r.workers.len(), 2);
        assert_eq!(r.workers[0].cells_rx_per_s, 1_000.0);
        assert_eq!(r.workers[0].setups_per_s, 2.0);
        assert_eq!(r.workers[0].drops_per_s, 1.0);
        // 100 observations in the interval, 90 of them at or below 10 us.
        assert_eq!(r.workers[0].batch_latency_p50_s, Some(0.00001));
        assert_eq!(r.workers[0].batch_latency_p99_s, Some(0.001));
        assert_eq!(r.workers[0].batch_latency_observations, 100);
        assert_eq!(r.workers[1].batch_latency_p99_s, None);
        // 2,000 cells in the interval, 1,000 of them at or below 100 us.
        assert_eq!(r.workers[0].cell_residence_observations, 2_000);
        assert_eq!(r.workers[0].cell_residence_p50_s, Some(0.0001));
        assert_eq!(r.workers[0].cell_residence_p99_s, Some(0.0025));
        assert_eq!(r.workers[1].cell_residence_observations, 0);
        let mut slow = sample(3_000, 14, 3, (10, 20));
        if let Some(l) = slow.workers[0].stats.batch_latency.as_mut() {
            l.count += 100; // 100 batches above the largest bound
        }
        let r2 = Rates::between(&a, &slow, 1.0);
        assert_eq!(r2.workers[0].batch_latency_p99_s, None);
        assert_eq!(
            p99_cell(
                r2.workers[0].batch_latency_p99_s,
                r2.workers[0].batch_latency_observations,
                a.workers[0].stats.batch_latency.as_ref()
            ),
            ">1ms"
        );
        assert_eq!(format_seconds(0.0000025), "2.5us");
        assert_eq!(format_seconds(0.1), "100ms");
        assert_eq!(r.total.cells_tx_per_s, 1_000.0);
        assert_eq!(r.drops_per_s["bad_tag"], 1.0);
        // A restart in between (counters went down) counts as zero, not negative.
        let r = Rates::between(&b, &a, 1.0);
        assert_eq!(r.workers[0].cells_rx_per_s, 0.0);
    }

    #[test]
    fn table_shows_workers_rates_drops_and_keys() {
        let a = sample(1_000, 10, 1, (5, 10));
        let b = sample(3_000, 14, 3, (95, 110));
        let r = Rates::between(&a, &b, 2.0);
        let t = render_status(&b, Some(&r), 1_764_043_200);
        assert!(
            t.starts_with("relay 00112233445566778899aabbccddeeff  shroud-relay 0.1.0  up 1h 1m"),
            "{t}"
        );
        assert!(
            t.contains("peer list serial 7, 3 relays, expires 2025-11-25T16:00:00Z (in 12h)"),
            "{t}"
        );
        assert!(
            t.contains("  NEWKEY  not in the peer list yet; created 53m 20s ago\n"),
            "{t}"
        );
        assert!(
            t.contains("  OLDKEY  expires 2025-11-25T05:53:20Z (in 1h 53m)\n"),
            "{t}"
        );
        assert!(t.contains("workers (rates over 2 s)"), "{t}");
        let row = t
            .lines()
            .find(|l| l.trim_start().starts_with("0 "))
            .expect("worker row");
        for want in ["9000", "io_uring", "1000", "2.0", "<=1ms", "<=2.5ms"] {
            assert!(row.contains(want), "{want}: {row}");
        }
        assert!(
            t.lines().any(|l| l.trim_start().starts_with("total")),
            "{t}"
        );
        let drop_row = t
            .lines()
            .find(|l| l.trim_start().starts_with("bad_tag"))
            .expect("drops");
        assert!(drop_row.ends_with("3    1.0"), "{drop_row:?}");
        assert!(t.contains("  accepting circuits\n"), "{t}");
        let mut expired = b.clone();
        expired.peer_list.expired = true;
        let t = render_status(&expired, None, 1_764_043_200);
        assert!(
            t.contains("  PEER LIST EXPIRED (refusing new circuits until a reload"),
            "{t}"
        );
        // Without rates, rate columns show '-'.
        let t = render_status(&b, None, 1_764_043_200);
        assert!(!t.contains("rates over"), "{t}");
        let row = t
            .lines()
            .find(|l| l.trim_start().starts_with("0 "))
            .expect("worker row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["0", "9000", "io_uring", "-", "-", "-", "-", "2", "-", "-"]
        );
    }
}
