//! `shroud-bench mix`: how much mix mode hides from the strongest passive observer this
//! machine can host, and what it costs.
//!
//! For each mean delay (0 = plain circuits, the baseline of the same run), `circuits`
//! circuits of `hops` hops through real relay processes carry cells that enter at the
//! times of a Poisson process of `rate` cells a second (each on a circuit drawn at
//! random). The observer sees every datagram entering the first relay (the client's
//! sends) and leaving the last (the exit's deliveries to the destination) with its
//! timestamp, and decrypts nothing; with one hop that is exactly one relay's links.
//! For each cell that leaves it guesses which entering cell it is, by timing alone:
//!
//! - **FIFO**: the k-th cell out is the k-th cell in;
//! - **best match**: the entering cell whose delay would be the most likely under the
//!   real delay distribution (the observer is given the histogram of the true delays of
//!   this very run, more than a real one could know).
//!
//! Its accuracy is compared with chance, 1 / (cells in the mix when the cell leaves:
//! those that entered and had not yet left, itself included). The entropy of the
//! observer's distribution over the entering cells (p_i proportional to the density of
//! the delay `t_out - t_in_i`; Serjantov and Danezis's measure, in bits) and its
//! effective anonymity set (2^entropy) are reported too, with the added latency and the
//! relays' CPU time per cell against the plain circuits of the same run. Timestamps are
//! taken in this process at the client's send and the sink's receive: on loopback that
//! is within microseconds of the datagrams crossing the relays' links.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use shroud_client::Client;

use crate::demo::Session;
use crate::net::{relay_binary, RelayCommand, RelaySpec};
use crate::report::machine;

/// Options of `shroud-bench mix`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Relays (at least `hops`).
    pub relays: usize,
    /// Hops per circuit (1: the observer watches one relay; more: the path's ends).
    pub hops: usize,
    /// Concurrent circuits.
    pub circuits: usize,
    /// Cells a second entering, all circuits together.
    pub rate: f64,
    /// Seconds of traffic per mean delay.
    pub seconds: f64,
    /// Mean delays per hop to measure (ms); 0 is the plain baseline.
    pub delays: Vec<u16>,
    /// Loopback block (the saturation step uses the next one).
    pub net: u8,
    /// Mean delay (ms) of the saturation step (0 skips it).
    pub saturation_delay: u16,
}

/// One cell's identity in its payload: circuit index and sequence number (used only
/// to score the observer, which never reads it).
fn key(payload: &[u8]) -> Option<u64> {
    let b: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// Receives the exit's deliveries and stamps each.
struct Sink {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(bind: SocketAddr, epoch: Instant) -> anyhow::Result<Sink> {
        let sock = UdpSocket::bind(bind).context("sink socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st2.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let t = epoch.elapsed().as_nanos() as u64;
                    if let Some(k) = key(&buf[..n]) {
                        s2.lock().unwrap_or_else(|e| e.into_inner()).push((t, k));
                    }
                }
            }
        });
        Ok(Sink {
            addr,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the observer achieved against one mean delay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// Cells that left (and were scored).
    pub scored: usize,
    /// FIFO guesses right.
    pub fifo: f64,
    /// Best-match guesses right.
    pub best: f64,
    /// Mean of 1 / (cells in the mix when a cell leaves).
    pub chance: f64,
    /// Mean cells in the mix when a cell leaves.
    pub pool: f64,
    /// Mean entropy of the observer's distribution (bits).
    pub entropy_bits: f64,
    /// Delays (ms): median and 99th percentile.
    pub delay_p50_ms: f64,
    /// 99th percentile.
    pub delay_p99_ms: f64,
}

/// Scores the observer on `entered` (time in ns, cell) and `left` (time in ns, cell).
/// Cells that never left are ignored; so are deliveries of unknown cells.
pub fn score(entered: &[(u64, u64)], left: &[(u64, u64)]) -> Score {
    let mut entered = entered.to_vec();
    entered.sort_unstable();
    let mut left = left.to_vec();
    left.sort_unstable();
    let index: HashMap<u64, usize> = entered.iter().enumerate().map(|(i, e)| (e.1, i)).collect();
    // The true entering index and delay of every cell that left.
    let truth: Vec<(u64, usize)> = left
        .iter()
        .filter_map(|&(t, k)| {
            let &i = index.get(&k)?;
            (t >= entered[i].0).then_some((t, i))
        })
        .collect();
    let n = truth.len();
    if n == 0 {
        return Score::default();
    }
    let mut delays: Vec<u64> = truth.iter().map(|&(t, i)| t - entered[i].0).collect();
    delays.sort_unstable();
    let q = |p: f64| delays[((n - 1) as f64 * p) as usize] as f64 / 1e6;
    // The delay density the observer is given: a histogram of the true delays.
    let span = delays[n - 1] - delays[0];
    let width = (span / 400).max(10_000); // at least 10 us per bin
    let bins = (span / width + 1) as usize;
    let mut hist = vec![0f64; bins];
    for &d in &delays {
        hist[((d - delays[0]) / width) as usize] += 1.0;
    }
    let density = |d: u64| -> f64 {
        if d < delays[0] || d > delays[n - 1] {
            return 0.0;
        }
        hist[((d - delays[0]) / width) as usize]
    };
    let times: Vec<u64> = entered.iter().map(|e| e.0).collect();
    // Cells that left, by entering index: to count the pool.
    let mut left_at = vec![u64::MAX; entered.len()];
    for &(t, i) in &truth {
        left_at[i] = t;
    }
    let (mut fifo, mut best, mut chance, mut pool_sum, mut entropy) =
        (0usize, 0usize, 0.0, 0.0, 0.0);
    // FIFO pairs the k-th leaving cell with the k-th entering cell that ever left.
    let mut left_order: Vec<usize> = truth.iter().map(|&(_, i)| i).collect();
    left_order.sort_unstable();
    for (k, &(t, i)) in truth.iter().enumerate() {
        if left_order[k] == i {
            fifo += 1;
        }
        // Candidates: entered between t - max delay and t - min delay.
        let lo = times.partition_point(|&x| x + delays[n - 1] < t);
        let hi = times.partition_point(|&x| x + delays[0] <= t);
        let (mut total, mut arg, mut top) = (0.0, usize::MAX, 0.0);
        let mut pool = 0usize;
        for j in lo..hi {
            let w = density(t - times[j]);
            if w > 0.0 {
                total += w;
                if w > top {
                    top = w;
                    arg = j;
                }
            }
            if left_at[j] >= t {
                pool += 1;
            }
        }
        // Cells in the mix that entered before the window (waiting longer than any
        // delay seen) cannot exist; the pool is counted within it.
        let pool = pool.max(1);
        if arg == i {
            best += 1;
        }
        chance += 1.0 / pool as f64;
        pool_sum += pool as f64;
        if total > 0.0 {
            let mut h = 0.0;
            for &tj in &times[lo..hi] {
                let p = density(t - tj) / total;
                if p > 0.0 {
                    h -= p * p.log2();
                }
            }
            entropy += h;
        }
    }
    let nf = n as f64;
    Score {
        scored: n,
        fifo: fifo as f64 / nf,
        best: best as f64 / nf,
        chance: chance / nf,
        pool: pool_sum / nf,
        entropy_bits: entropy / nf,
        delay_p50_ms: q(0.5),
        delay_p99_ms: q(0.99),
    }
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs the benchmark; returns the report.
pub fn run(opts: &Opts, stop: &AtomicBool) -> anyhow::Result<Value> {
    anyhow::ensure!(
        opts.hops >= 1 && opts.relays >= opts.hops,
        "need 1 to {} hops",
        opts.relays
    );
    anyhow::ensure!(
        opts.rate > 0.0 && opts.circuits > 0,
        "rate and circuits must be positive"
    );
    let cmd = match relay_binary() {
        Ok(b) => RelayCommand::Binary(b),
        Err(e) => {
            eprintln!("note: {e:#}; running relays through this binary instead (same code)");
            RelayCommand::SelfExe
        }
    };
    let specs = vec![RelaySpec::default(); opts.relays];
    let net = crate::net::start(opts.net, &specs, &[], &cmd, 1024)?;
    let epoch = Instant::now();
    let sink = Sink::start(SocketAddr::from(([127, 0, opts.net, 250], 0)), epoch)?;
    let mut client = Client::new(SocketAddr::from(([127, 0, opts.net, 240], 0)), &net.list)
        .map_err(|e| anyhow::anyhow!("client: {e}"))?;
    let ids: Vec<_> = net.relays[..opts.hops].iter().map(|r| r.id).collect();
    let path = shroud_client::path_from_ids(&net.list, &ids, shroud_localnet::now_s())
        .map_err(|e| anyhow::anyhow!("path: {e}"))?;
    let mut rng = ChaCha8Rng::from_entropy();
    let mut rows = Vec::new();
    let mut plain_cpu_per_cell = None;
    for &mean in &opts.delays {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mix = vec![mean; opts.hops];
        let mut ids = Vec::with_capacity(opts.circuits);
        for k in 0..opts.circuits {
            let id = client
                .build_mixed_circuit(&path, &mix, sink.addr, Duration::from_secs(5))
                .map_err(|e| anyhow::anyhow!("circuit {k} (mean {mean} ms): {e}"))?;
            ids.push(id);
        }
        sink.take();
        let cpu0: f64 = (0..opts.relays).map(|i| net.cpu_seconds(i)).sum();
        let mut entered: Vec<(u64, u64)> = Vec::new();
        let start = Instant::now();
        let mut next = 0.0f64;
        let mut seq = vec![0u32; ids.len()];
        let mut payload = [0u8; 64];
        while next < opts.seconds && !stop.load(Ordering::Relaxed) {
            let due = start + Duration::from_secs_f64(next);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let c = (rng.next_u64() % ids.len() as u64) as usize;
            let k = ((c as u64) << 32) | u64::from(seq[c]);
            seq[c] += 1;
            payload[..8].copy_from_slice(&k.to_be_bytes());
            let t = epoch.elapsed().as_nanos() as u64;
            client
                .send(ids[c], &payload)
                .map_err(|e| anyhow::anyhow!("send: {e}"))?;
            entered.push((t, k));
            let gap_ms =
                shroud_proto::mix::exponential_delay_ms(1000.0 / opts.rate, rng.next_u64());
            next += gap_ms / 1000.0;
        }
        // Let every held cell out (delays are capped at 64 means per hop).
        let drain =
            Instant::now() + Duration::from_millis(500 + 64 * u64::from(mean) * opts.hops as u64);
        while sink.count() < entered.len()
            && Instant::now() < drain
            && !stop.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let cpu = (0..opts.relays).map(|i| net.cpu_seconds(i)).sum::<f64>() - cpu0;
        let left = sink.take();
        let rss: Vec<f64> = net.pids().into_iter().map(rss_mb).collect();
        for id in ids {
            let _ = client.destroy(id);
        }
        let s = score(&entered, &left);
        let cells = entered.len().max(1) as f64;
        // Relay CPU per cell and per hop, in microseconds.
        let cpu_per_cell = cpu / cells / opts.hops as f64 * 1e6;
        if mean == 0 {
            plain_cpu_per_cell = Some(cpu_per_cell);
        }
        eprintln!(
            "mean {mean:>5} ms: {} of {} cells out; observer FIFO {:.3}, best {:.3}, chance {:.3} (pool {:.1}), entropy {:.2} bits; delay p50 {:.2} ms",
            s.scored,
            entered.len(),
            s.fifo,
            s.best,
            s.chance,
            s.pool,
            s.entropy_bits,
            s.delay_p50_ms
        );
        rows.push(json!({
            "mean_delay_ms": mean,
            "cells_entered": entered.len(),
            "cells_left": s.scored,
            "fifo_accuracy": s.fifo,
            "best_match_accuracy": s.best,
            "observer_accuracy": s.fifo.max(s.best),
            "chance": s.chance,
            "mean_pool": s.pool,
            "entropy_bits": s.entropy_bits,
            "effective_anonymity_set": s.entropy_bits.exp2(),
            "delay_p50_ms": s.delay_p50_ms,
            "delay_p99_ms": s.delay_p99_ms,
            "relay_cpu_us_per_cell_hop": cpu_per_cell,
            "cpu_ratio_to_plain": plain_cpu_per_cell.map(|p| cpu_per_cell / p),
            "delivered_fraction": s.scored as f64 / cells,
            "relay_rss_mb": rss,
        }));
    }
    drop(client);
    drop(sink);
    drop(net);
    let saturation = if opts.saturation_delay > 0 && !stop.load(Ordering::Relaxed) {
        Some(saturation(opts, stop)?)
    } else {
        None
    };
    Ok(json!({
        "schema": "shroud-bench/mix/1",
        "machine": machine(),
        "saturation": saturation,
        "hops": opts.hops,
        "circuits": opts.circuits,
        "rate_cells_per_sec": opts.rate,
        "seconds_per_delay": opts.seconds,
        "results": rows,
    }))
}

/// The relays' forwarding rate with mixed circuits against plain ones at the same
/// offered load: the plain circuits' saturation rate (the demo's closed loop), offered
/// open loop to plain and then to mixed circuits (the demo's generator, which seals
/// ahead on several threads, so the relays and not the generator are measured).
fn saturation(opts: &Opts, stop: &AtomicBool) -> anyhow::Result<Value> {
    let step = opts.seconds.max(1.0);
    let mut s = Session::start(opts.relays, 1024, opts.net.wrapping_add(1))?;
    let bar = indicatif::ProgressBar::hidden();
    s.build(opts.circuits, opts.hops)?;
    let sat = s.drive(step, 0.0, 1024, None, stop, &bar)?;
    let offered = sat.cells_per_sec();
    let cpu = |s: &Session| -> f64 { (0..opts.relays).map(|i| s.net.cpu_seconds(i)).sum() };
    let c0 = cpu(&s);
    let plain = s.drive(step, offered, u64::MAX / 2, None, stop, &bar)?;
    let c1 = cpu(&s);
    s.build_mixed(opts.circuits, opts.hops, opts.saturation_delay)?;
    let c2 = cpu(&s);
    let mixed = s.drive(step, offered, u64::MAX / 2, None, stop, &bar)?;
    let c3 = cpu(&s);
    let per_cell = |cpu: f64, d: &crate::demo::Drive| cpu / (d.delivered.max(1) as f64) * 1e6;
    let r = json!({
        "mean_delay_ms": opts.saturation_delay,
        "plain_saturation_cells_per_sec": offered,
        "offered_cells_per_sec": offered,
        "plain_delivered_cells_per_sec": plain.cells_per_sec(),
        "mixed_delivered_cells_per_sec": mixed.cells_per_sec(),
        "mixed_to_plain": mixed.cells_per_sec() / plain.cells_per_sec().max(1e-9),
        "plain_relay_cpu_us_per_cell": per_cell(c1 - c0, &plain),
        "mixed_relay_cpu_us_per_cell": per_cell(c3 - c2, &mixed),
        "mixed_p50_us": mixed.latency.value_at_quantile(0.5),
        "plain_p50_us": plain.latency.value_at_quantile(0.5),
    });
    eprintln!("saturation: {r}");
    Ok(r)
}

/// Prints a report.
pub fn print(r: &Value) {
    if let Some(s) = r["saturation"].as_object() {
        println!(
            "at the plain saturation rate ({:.0} cells/s offered): plain delivered {:.0}, mixed (mean {} ms per hop) {:.0} cells/s: ratio {:.3}",
            s["offered_cells_per_sec"].as_f64().unwrap_or(0.0),
            s["plain_delivered_cells_per_sec"].as_f64().unwrap_or(0.0),
            s["mean_delay_ms"],
            s["mixed_delivered_cells_per_sec"].as_f64().unwrap_or(0.0),
            s["mixed_to_plain"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "mix mode: {} circuits of {} hop(s), {} cells/s entering, passive timing observer",
        r["circuits"], r["hops"], r["rate_cells_per_sec"]
    );
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "mean ms",
        "FIFO",
        "best",
        "chance",
        "pool",
        "entropy",
        "eff. set",
        "p50 ms",
        "p99 ms",
        "CPU ratio"
    );
    for row in r["results"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>8} {:>8.3} {:>8.3} {:>8.3} {:>8.1} {:>9.2} {:>9.1} {:>10.2} {:>10.2} {:>9.2}",
            row["mean_delay_ms"],
            f("fifo_accuracy"),
            f("best_match_accuracy"),
            f("chance"),
            f("mean_pool"),
            f("entropy_bits"),
            f("effective_anonymity_set"),
            f("delay_p50_ms"),
            f("delay_p99_ms"),
            f("cpu_ratio_to_plain"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_order_network_is_fully_exposed_and_a_shuffle_is_not() {
        // In order, 1 ms apart, each taking 100 us: FIFO and best match are exact.
        let entered: Vec<(u64, u64)> = (0..1000).map(|k| (k * 1_000_000, k)).collect();
        let left: Vec<(u64, u64)> = entered.iter().map(|&(t, k)| (t + 100_000, k)).collect();
        let s = score(&entered, &left);
        assert_eq!(s.scored, 1000);
        assert_eq!((s.fifo, s.best), (1.0, 1.0));
        assert_eq!(s.chance, 1.0);
        // Ten cells enter at once and leave in reverse order: FIFO gets at most one
        // right per group, and the pool shrinks from ten to one as they leave.
        let mut entered = Vec::new();
        let mut left = Vec::new();
        for g in 0..100u64 {
            for j in 0..10u64 {
                entered.push((g * 100_000_000 + j, g * 10 + j));
                left.push((g * 100_000_000 + 50_000_000 - j * 1_000_000, g * 10 + j));
            }
        }
        let s = score(&entered, &left);
        assert_eq!(s.scored, 1000);
        assert!(s.fifo <= 0.1 + 1e-9, "{s:?}");
        let mean_pool = (1..=10).sum::<usize>() as f64 / 10.0;
        assert!((s.pool - mean_pool).abs() < 1e-9, "{s:?}");
        assert!(s.entropy_bits > 0.0);
    }
}
