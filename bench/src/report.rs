//! Reports: the machine description and JSON output shared by every subcommand.
//!
//! JSON schema (documented in docs/BENCHMARKING.md): every report has `schema`
//! (`"shroud-bench/<subcommand>/1"`), `machine`, and the subcommand's headline figures
//! at the top level.

use serde_json::{json, Value};
use shroud_admin::Latency;

/// Versions of the crates that decide the numbers (kept in step with Cargo.lock by a
/// unit test).
pub const CRATES: &[(&str, &str)] = &[("ring", "0.17"), ("aes-gcm", "0.11"), ("io-uring", "0.7")];

/// Describes this machine: CPU model and flags of interest, kernel, cores.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let interesting: Vec<&str> = [
        "aes",
        "pclmulqdq",
        "vaes",
        "vpclmulqdq",
        "avx2",
        "avx512f",
        "sha_ni",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    json!({
        "cpu": field("model name"),
        "cpu_flags": interesting,
        "kernel": kernel,
        "cores": cores,
        "shroud": env!("CARGO_PKG_VERSION"),
        "crates": CRATES.iter().map(|(n, v)| json!({"name": n, "version": v})).collect::<Vec<_>>(),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>(),
    })
}

/// Writes `v` to `path` (pretty JSON).
pub fn write_json(path: &std::path::Path, v: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")?;
    Ok(())
}

/// Microseconds of one call of `f`: the median of timed groups of `group` calls, at
/// least 20 groups and at most 200, over about `budget`.
pub fn time_us(budget: std::time::Duration, group: u32, mut f: impl FnMut()) -> f64 {
    let mut groups = Vec::new();
    let started = std::time::Instant::now();
    while groups.len() < 20 || (started.elapsed() < budget && groups.len() < 200) {
        let t = std::time::Instant::now();
        for _ in 0..group {
            f();
        }
        groups.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(group));
    }
    median(&mut groups)
}

/// A worker counter from a relay's admin `status` reply, summed over its workers.
pub fn worker_sum(status: &Value, name: &str) -> u64 {
    status["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["stats"][name].as_u64()).sum())
        .unwrap_or(0)
}

/// The cells' time in relay `i` of `net`
/// ([`shroud_admin::WorkerCounters::cell_residence`]), its workers added up; an
/// unreadable status counts nothing.
pub fn residence_of(net: &shroud_localnet::LocalNet, i: usize) -> Latency {
    let status = net
        .request(i, &shroud_admin::Request::Status)
        .ok()
        .and_then(|v| serde_json::from_value::<shroud_admin::Status>(v).ok());
    latency_sum(
        status
            .iter()
            .flat_map(|s| &s.workers)
            .filter_map(|w| w.stats.cell_residence.as_ref()),
    )
}

/// [`residence_of`] every relay of `net`, added up: one histogram of what a hop holds
/// a cell.
pub fn residence(net: &shroud_localnet::LocalNet) -> Latency {
    latency_sum((0..net.relays.len()).map(|i| residence_of(net, i)))
}

/// Histograms with the same bounds, added up.
pub fn latency_sum<H: std::borrow::Borrow<Latency>>(hs: impl IntoIterator<Item = H>) -> Latency {
    let mut total = Latency::default();
    for h in hs {
        add_latency(&mut total, h.borrow(), 1);
    }
    total
}

/// A microsecond figure of a report for a table: no decimals, `-` when absent.
pub fn us_or_dash(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

/// A report's summary of a [`residence`] histogram: cells, p50 and p99 in
/// microseconds, share within 1 ms.
pub fn in_relay(h: &Latency) -> Value {
    let us = |q: f64| latency_quantile(h, q).map(|s| s * 1e6);
    json!({
        "cells": h.count,
        "p50_us": us(0.5),
        "p99_us": us(0.99),
        "share_within_1ms": latency_share_at_most(h, 1e-3),
    })
}

/// `into += sign * h`, bucket by bucket (the relays' histograms share their bounds);
/// `sign` -1 takes an earlier reading off a later one.
pub fn add_latency(into: &mut Latency, h: &Latency, sign: i64) {
    if h.buckets.is_empty() {
        return;
    }
    if into.buckets.is_empty() {
        into.buckets = h.buckets.iter().map(|&(le, _)| (le, 0)).collect();
    }
    let apply = |a: u64, b: u64| a.saturating_add_signed(sign.saturating_mul(b as i64));
    for (a, b) in into.buckets.iter_mut().zip(&h.buckets) {
        a.1 = apply(a.1, b.1);
    }
    into.count = apply(into.count, h.count);
    into.sum_s += sign as f64 * h.sum_s;
}

/// The `q` quantile of a bucketed histogram, in seconds, interpolated linearly inside
/// its bucket (from the bucket below's bound); `None` without observations or in the
/// `+Inf` bucket.
pub fn latency_quantile(h: &Latency, q: f64) -> Option<f64> {
    if h.count == 0 {
        return None;
    }
    let want = q * h.count as f64;
    let (mut low, mut below) = (0.0, 0u64);
    for &(le, n) in &h.buckets {
        if n as f64 >= want && n > below {
            let frac = (want - below as f64) / (n - below) as f64;
            return Some(low + frac.clamp(0.0, 1.0) * (le - low));
        }
        (low, below) = (le, n);
    }
    None
}

/// The share of a histogram's observations at or below the bucket bound `le`.
pub fn latency_share_at_most(h: &Latency, le: f64) -> Option<f64> {
    let n = h.buckets.iter().find(|b| (b.0 - le).abs() < 1e-12)?.1;
    (h.count > 0).then(|| n as f64 / h.count as f64)
}

/// Median of a sample (0 for an empty one).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_versions_match_the_lock_file() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        for (name, version) in CRATES {
            let entry = format!("name = \"{name}\"\nversion = \"{version}");
            assert!(lock.contains(&entry), "{name} {version} not in Cargo.lock");
        }
    }

    #[test]
    fn bucketed_quantiles_interpolate_and_readings_subtract() {
        let h = |b: [u64; 3], count: u64| Latency {
            buckets: vec![(1e-4, b[0]), (5e-4, b[1]), (1e-3, b[2])],
            count,
            sum_s: count as f64 * 1e-4,
        };
        let mut total = Latency::default();
        add_latency(&mut total, &h([10, 80, 99], 100), 1);
        add_latency(&mut total, &h([30, 90, 100], 100), 1);
        assert_eq!(total.count, 200);
        assert_eq!(total.buckets[1], (5e-4, 170));
        assert_eq!(
            latency_sum([h([10, 80, 99], 100), h([30, 90, 100], 100)]),
            total
        );
        // Median: the 100th of 200 lies 60 of 130 into (100 us, 500 us].
        let p50 = latency_quantile(&total, 0.5).unwrap();
        assert!((p50 - (1e-4 + 60.0 / 130.0 * 4e-4)).abs() < 1e-12, "{p50}");
        // p99: the 198th lies in (500 us, 1 ms], 28 of 29.
        let p99 = latency_quantile(&total, 0.99).unwrap();
        assert!((p99 - (5e-4 + 28.0 / 29.0 * 5e-4)).abs() < 1e-12, "{p99}");
        assert_eq!(latency_share_at_most(&total, 1e-3), Some(199.0 / 200.0));
        // The last observation is above every bound.
        assert_eq!(latency_quantile(&total, 1.0), None);
        // A later reading minus an earlier one is what happened in between.
        let mut between = h([30, 150, 199], 200);
        add_latency(&mut between, &h([10, 80, 99], 100), -1);
        assert_eq!(between.buckets, vec![(1e-4, 20), (5e-4, 70), (1e-3, 100)]);
        assert_eq!(between.count, 100);
        assert_eq!(latency_quantile(&Latency::default(), 0.5), None);
    }

    #[test]
    fn machine_description_is_complete() {
        let m = machine();
        assert!(m["cores"].as_u64().unwrap() >= 1);
        assert!(!m["kernel"].as_str().unwrap().is_empty());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
