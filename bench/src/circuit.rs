//! `shroud-bench circuit`: end to end through N hops.
//!
//! 1. Saturation: the demo's closed loop (at most `window` cells in flight) gives the
//!    saturation rate of `hops`-hop circuits on this network.
//! 2. Offered-load sweep: fixed offered rates at 25 %, 50 %, 75 %, 100 % and 125 % of
//!    saturation; delivered rate and one-way latency (p50, p99) at each.
//! 3. Added latency per hop at 50 % of saturation, two ways: the same offered rate
//!    through 1-hop and `hops`-hop circuits, (p50 and p99 of N hops − those of 1 hop) /
//!    (N − 1); and the relays' own histogram of each cell's time in a relay (from its
//!    datagram reaching the relay's socket to the relay handing the sends on to the
//!    kernel), read from their status before and after each run. The first carries
//!    the client, the sink and the machine's contention between five busy processes
//!    on its cores as well; the second is what a hop holds a cell.
//! 4. Setups: circuits built one after another (each waits for CREATED) for a while;
//!    setups per second, and per relay core (each setup costs every hop one X25519,
//!    spread over the relays).
//!
//! Every step's cells are sealed before its clock starts (at most `preseal_mb` MiB
//! per step; `0` seals live), as in the demo: the rates and latencies are the relays',
//! not those of a client sealing on the same two cores.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde_json::{json, Value};

use shroud_admin::Latency;

use crate::demo::{Drive, Session};
use crate::report::{
    add_latency, in_relay, latency_quantile, latency_sum, machine, residence, us_or_dash,
};

/// Options of `shroud-bench circuit`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Relays.
    pub relays: usize,
    /// Hops.
    pub hops: usize,
    /// Total seconds (split over the steps).
    pub duration: f64,
    /// Cell size.
    pub cell: u16,
    /// Circuits.
    pub circuits: usize,
    /// Window for the saturation step.
    pub window: u64,
    /// Loopback block.
    pub net: u8,
    /// MiB of cells to seal ahead of each step at most (0: seal live).
    pub preseal_mb: u64,
}

fn point(offered: f64, d: &Drive, held: &Latency) -> Value {
    json!({
        "offered_cells_per_sec": offered,
        "sent_cells_per_sec": d.sent as f64 / d.elapsed.max(1e-9),
        "delivered_cells_per_sec": d.cells_per_sec(),
        "payload_mb_per_sec": d.payload_mb_per_sec(),
        "lost": d.sent.saturating_sub(d.delivered),
        "p50_us": d.latency.value_at_quantile(0.5),
        "p99_us": d.latency.value_at_quantile(0.99),
        "in_relay": in_relay(held),
    })
}

/// Runs `drive` and returns what it returned with the relays' histogram of the cells'
/// time in a relay over the run (`cell_residence` of every worker of every relay, the
/// reading after the run less the one before): from a cell's datagram reaching a
/// relay's socket (the kernel's receive timestamp) to that relay handing its batch's
/// sends to the kernel. Unlike the end-to-end difference it leaves out the client,
/// the sink and the wire, and it counts each hop of each cell once.
fn held_during(
    s: &mut Session,
    drive: impl FnOnce(&mut Session) -> anyhow::Result<Drive>,
) -> anyhow::Result<(Drive, Latency)> {
    let before = residence(&s.net);
    let d = drive(s)?;
    let mut held = residence(&s.net);
    add_latency(&mut held, &before, -1);
    Ok((d, held))
}

/// Runs the benchmark; returns the report.
pub fn run(opts: &Opts, stop: &AtomicBool) -> anyhow::Result<Value> {
    anyhow::ensure!(opts.hops >= 2, "the per-hop latency needs at least 2 hops");
    let mut s = Session::start(opts.relays, opts.cell, opts.net)?;
    let bar = indicatif::ProgressBar::hidden();
    let step = (opts.duration / 9.0).max(0.5);
    s.build(opts.circuits, opts.hops)?;
    let max = crate::demo::preseal_bytes(opts.preseal_mb);
    let sat = s.drive_presealed(step, 0.0, opts.window, max, stop, &bar)?;
    let sat_rate = sat.cells_per_sec();
    let mut sweep = Vec::new();
    for f in [0.25, 0.5, 0.75, 1.0, 1.25] {
        let offered = f * sat_rate;
        let (d, held) = held_during(&mut s, |s| {
            s.drive_presealed(step, offered, u64::MAX / 2, max, stop, &bar)
        })?;
        sweep.push(point(offered, &d, &held));
    }
    // Added latency per hop at half of the N-hop saturation rate: N-hop and one-hop
    // circuits alternately, five runs each, and the median of each quantile over the
    // runs. A quantile of two separate runs differs by the noise of this machine too,
    // so a small or negative difference means "within the noise".
    let half = 0.5 * sat_rate;
    let runs = 5;
    let short = (step / 2.0).max(0.5);
    let (mut n_runs, mut one_runs) = (Vec::new(), Vec::new());
    let (mut n_held, mut one_held) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        s.build(opts.circuits, opts.hops)?;
        let (d, held) = held_during(&mut s, |s| {
            s.drive_presealed(short, half, u64::MAX / 2, max, stop, &bar)
        })?;
        n_runs.push(d);
        n_held.push(held);
        s.build(opts.circuits, 1)?;
        let (d, held) = held_during(&mut s, |s| {
            s.drive_presealed(short, half, u64::MAX / 2, max, stop, &bar)
        })?;
        one_runs.push(d);
        one_held.push(held);
    }
    let quantile = |runs: &[Drive], q: f64| {
        let mut v: Vec<f64> = runs
            .iter()
            .map(|d| d.latency.value_at_quantile(q) as f64)
            .collect();
        crate::report::median(&mut v)
    };
    let per_hop = |q: f64| (quantile(&n_runs, q) - quantile(&one_runs, q)) / (opts.hops - 1) as f64;
    let (n_hops, n_hops_held) = (&n_runs[runs / 2], &n_held[runs / 2]);
    let (one_hop, one_hop_held) = (&one_runs[runs / 2], &one_held[runs / 2]);
    let setups = s.setup_rate(opts.hops, Duration::from_secs_f64(step))?;
    let parallel = s.setup_rate_parallel(opts.hops, Duration::from_secs_f64(step), SETUP_BATCH)?;
    let (bare, edwards, _) = crate::setupbench::baselines(Duration::from_secs_f64(step.min(2.0)));
    Ok(json!({
        "schema": "shroud-bench/circuit/1",
        "sealing": if max > 0 { "ahead" } else { "live" },
        "payload_mb_per_sec": sat.payload_mb_per_sec(),
        "saturation_cells_per_sec": sat_rate,
        "hops": opts.hops,
        "relays": opts.relays,
        "circuits": opts.circuits,
        "cell": opts.cell,
        "sweep": sweep,
        "per_hop_latency_us": {
            "offered_cells_per_sec": half,
            "p50": per_hop(0.5),
            "p99": per_hop(0.99),
            "runs": runs,
            "n_hops_p50_us_median": quantile(&n_runs, 0.5),
            "n_hops_p99_us_median": quantile(&n_runs, 0.99),
            "one_hop_p50_us_median": quantile(&one_runs, 0.5),
            "one_hop_p99_us_median": quantile(&one_runs, 0.99),
            "n_hops": point(half, n_hops, n_hops_held),
            "one_hop": point(half, one_hop, one_hop_held),
            // The relays' own measure, all runs together: each hop of each cell once.
            "in_relay": in_relay(&latency_sum(&n_held)),
            "in_relay_p99_us_per_run": n_held
                .iter()
                .map(|h| latency_quantile(h, 0.99).map(|s| s * 1e6))
                .collect::<Vec<_>>(),
            "one_hop_in_relay": in_relay(&latency_sum(&one_held)),
        },
        "latency_cdf_us": crate::plot::cdf_points(&n_hops.latency),
        "setups_per_sec": setups,
        "setups_per_sec_per_relay_core": setups * opts.hops as f64 / opts.relays as f64,
        "setups_parallel": {
            "batch": SETUP_BATCH,
            "setups_per_sec": parallel.per_sec,
            "failed": parallel.failed,
            "relay_cpu_us_per_hop": parallel.relay_cpu_us_per_hop,
            "bare_x25519_us": bare,
            "x25519_edwards_us": edwards,
            // A hop's whole setup against one bare X25519 (x25519-dalek's ladder) on
            // this machine, same run: 1.0 would mean the relay spends nothing beyond
            // that X25519. The relay computes its X25519 on the Edwards form, so the
            // second share is against what it computes.
            "x25519_share": bare / parallel.relay_cpu_us_per_hop.max(1e-9),
            "x25519_edwards_share": edwards / parallel.relay_cpu_us_per_hop.max(1e-9),
        },
        "machine": machine(),
    }))
}

/// Setups sent at once in the parallel setup step.
const SETUP_BATCH: usize = 32;

/// Prints the human summary.
pub fn print(r: &Value) {
    println!(
        "shroud-bench circuit: {} hops over {} relays, CELL={} B; saturation {:.0} cells/s ({:.1} MB/s payload)",
        r["hops"], r["relays"], r["cell"], r["saturation_cells_per_sec"].as_f64().unwrap_or(0.0), r["payload_mb_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:>16} {:>12} {:>12} {:>8} {:>10} {:>10} {:>14} {:>14}",
        "offered cells/s",
        "sent",
        "delivered",
        "lost",
        "p50 us",
        "p99 us",
        "in relay p50",
        "in relay p99"
    );
    for p in r["sweep"].as_array().into_iter().flatten() {
        println!(
            "{:>16.0} {:>12.0} {:>12.0} {:>8} {:>10} {:>10} {:>14} {:>14}",
            p["offered_cells_per_sec"].as_f64().unwrap_or(0.0),
            p["sent_cells_per_sec"].as_f64().unwrap_or(0.0),
            p["delivered_cells_per_sec"].as_f64().unwrap_or(0.0),
            p["lost"],
            p["p50_us"],
            p["p99_us"],
            us_or_dash(&p["in_relay"]["p50_us"]),
            us_or_dash(&p["in_relay"]["p99_us"]),
        );
    }
    let h = &r["per_hop_latency_us"];
    println!(
        "added latency per hop at {:.0} cells/s: p50 {:.0} us, p99 {:.0} us (medians of {} runs: {} hops p50 {:.0} / p99 {:.0} us, one hop p50 {:.0} / p99 {:.0} us; a negative figure is within the noise)",
        h["offered_cells_per_sec"].as_f64().unwrap_or(0.0),
        h["p50"].as_f64().unwrap_or(0.0),
        h["p99"].as_f64().unwrap_or(0.0),
        h["runs"],
        r["hops"],
        h["n_hops_p50_us_median"].as_f64().unwrap_or(0.0),
        h["n_hops_p99_us_median"].as_f64().unwrap_or(0.0),
        h["one_hop_p50_us_median"].as_f64().unwrap_or(0.0),
        h["one_hop_p99_us_median"].as_f64().unwrap_or(0.0),
    );
    let held = &h["in_relay"];
    println!(
        "time in a relay at {:.0} cells/s, the relays' own measure ({} cell-hops over the {} runs): p50 {} us, p99 {} us, {:.2} % within 1 ms; p99 per run {}; one-hop runs p99 {} us",
        h["offered_cells_per_sec"].as_f64().unwrap_or(0.0),
        held["cells"],
        h["runs"],
        us_or_dash(&held["p50_us"]),
        us_or_dash(&held["p99_us"]),
        held["share_within_1ms"].as_f64().unwrap_or(0.0) * 100.0,
        h["in_relay_p99_us_per_run"]
            .as_array()
            .into_iter()
            .flatten()
            .map(us_or_dash)
            .collect::<Vec<_>>()
            .join(" / "),
        us_or_dash(&h["one_hop_in_relay"]["p99_us"]),
    );
    println!(
        "circuit setups, one at a time: {:.0}/s ({:.0}/s per relay core)",
        r["setups_per_sec"].as_f64().unwrap_or(0.0),
        r["setups_per_sec_per_relay_core"].as_f64().unwrap_or(0.0)
    );
    let p = &r["setups_parallel"];
    println!(
        "circuit setups, {} at once: {:.0}/s ({} failed); relay CPU {:.0} us per hop against {:.0} us for a bare X25519 (share {:.2}) and {:.0} us for the Edwards-form X25519 the relay computes (share {:.2})",
        p["batch"],
        p["setups_per_sec"].as_f64().unwrap_or(0.0),
        p["failed"],
        p["relay_cpu_us_per_hop"].as_f64().unwrap_or(0.0),
        p["bare_x25519_us"].as_f64().unwrap_or(0.0),
        p["x25519_share"].as_f64().unwrap_or(0.0),
        p["x25519_edwards_us"].as_f64().unwrap_or(0.0),
        p["x25519_edwards_share"].as_f64().unwrap_or(0.0)
    );
}
