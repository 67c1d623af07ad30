//! `shroud-bench demo`: a local Shroud network carrying traffic, on defaults.
//!
//! Starts `relays` real `shroud-relay` processes on `127.0.<net>.x` (60 by default) with fresh keys and a
//! signed peer list, a UDP sink behind the exits, builds `circuits` circuits of `hops`
//! hops (rotating which relay is entry, middle and exit), and pushes cells for
//! `duration` seconds. The generator keeps at most `window` cells in flight (sent but
//! not yet counted at the sink), so the network runs at its saturation rate without
//! overflowing queues; `--rate` caps the offered load instead. Ctrl-C stops early and
//! still tears everything down.
//!
//! The demo measures the relays, not the generator: the relays and the client share
//! this machine's cores, and a client sealing three layers per cell while the relays
//! run takes about a third of them. So the generator seals up to `preseal_mb` of cells
//! before the clock starts ([`Session::preseal`]) and only sends while it runs; if the
//! sealed cells run out before `duration`, the rest of the time runs with the
//! generator sealing live, reported separately. One-way latency is measured at the
//! sink (same clock): a live payload carries its send time; a presealed payload
//! carries (pool, circuit, cell index) and the generator notes each batch's send time
//! in a [`SendBook`] the sink reads.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use shroud_proto::aead::RingAead;
use shroud_proto::client::PathHop;

use crate::background::Background;
use crate::flow::{gso_send, set_buffers, Circ, Generator};
use crate::net::{relay_binary, LocalNet, RelayCommand, RelaySpec};
use crate::report::{add_latency, in_relay, machine, residence_of, us_or_dash};

/// Options of `shroud-bench demo`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Relays to start.
    pub relays: usize,
    /// Hops per circuit.
    pub hops: usize,
    /// Seconds of traffic.
    pub duration: f64,
    /// Offered cells per second (0 = as fast as the network takes them).
    pub rate: u64,
    /// Cell size.
    pub cell: u16,
    /// Circuits.
    pub circuits: usize,
    /// Most cells in flight.
    pub window: u64,
    /// Show a live progress line.
    pub progress: bool,
    /// Third octet of the loopback block (127.0.NET.x).
    pub net: u8,
    /// MiB of cells to seal before the clock starts (0: seal live).
    pub preseal_mb: u64,
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// Marks a payload stamp as (pool, circuit, cell index) of presealed cells rather
/// than a send time.
const PRESEALED: u64 = 1 << 63;
/// Cells per send (one GSO send) and per entry of the [`SendBook`].
const BATCH: usize = 32;
/// Most cells a drive at an offered rate sends at once after falling behind.
const PACE_BURST: f64 = 256.0;

/// When each batch of presealed cells was sent (ns since the session's epoch; 0 not
/// yet), per circuit: the sink turns a presealed payload's stamp into its send time.
/// A stamp is `PRESEALED | pool << 48 | circuit << 32 | cell`: a straggler of an
/// earlier pool (same session, an earlier drive) is not timed against this one.
#[derive(Debug)]
pub struct SendBook {
    pool: u64,
    sent_ns: Vec<Vec<AtomicU64>>,
}

impl SendBook {
    fn stamp(pool: u64, circuit: usize, cell: usize) -> u64 {
        PRESEALED | (pool & 0x7fff) << 48 | ((circuit as u64) & 0xffff) << 32 | cell as u64
    }

    fn sent_ns(&self, stamp: u64) -> Option<u64> {
        if (stamp >> 48) & 0x7fff != self.pool & 0x7fff {
            return None;
        }
        let circuit = ((stamp >> 32) & 0xffff) as usize;
        let cell = (stamp & 0xffff_ffff) as usize;
        let t = self.sent_ns.get(circuit)?.get(cell / BATCH)?.load(Relaxed);
        (t != 0).then_some(t)
    }
}

/// Cells sealed before the clock starts, per circuit, and how far each was sent.
#[derive(Debug)]
pub struct Presealed {
    cells: Vec<Vec<u8>>,
    next: Vec<usize>,
    book: Arc<SendBook>,
    /// Seconds the sealing took (all threads, wall clock).
    pub seal_secs: f64,
}

impl Presealed {
    /// Cells sealed in all.
    pub fn len(&self, cell: usize) -> usize {
        self.cells.iter().map(|c| c.len() / cell).sum()
    }
}

struct SinkState {
    hist: Histogram<u64>,
    book: Option<Arc<SendBook>>,
}

struct Sink {
    bytes: Arc<AtomicU64>,
    payloads: Arc<AtomicU64>,
    state: Arc<Mutex<SinkState>>,
    _thread: Background,
}

impl Sink {
    fn start(
        bind: SocketAddr,
        payload: usize,
        epoch: Instant,
    ) -> anyhow::Result<(SocketAddr, Sink)> {
        let sock = UdpSocket::bind(bind)?;
        set_buffers(&sock, 32 << 20);
        shroud_relay::sys::enable_gro(&sock)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let payloads = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(SinkState {
            hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
            book: None,
        }));
        let (b, p, h) = (bytes.clone(), payloads.clone(), state.clone());
        let thread = Background::spawn("demo-sink", move |s| {
            let mut buf = vec![0u8; 65536];
            let mut k = 0u64;
            while !s.load(Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // GRO may coalesce equal-size payloads: each segment is one payload.
                let seg = payload.min(n).max(1);
                for chunk in buf[..n].chunks(seg) {
                    p.fetch_add(1, Relaxed);
                    k += 1;
                    // Every 16th payload is a latency sample, recorded straight into
                    // the shared histogram (an uncontended lock) so a drive sees all
                    // of its samples however short it is.
                    if k.is_multiple_of(16) && chunk.len() >= 8 {
                        let stamp = u64::from_le_bytes(chunk[..8].try_into().unwrap_or([0; 8]));
                        let now = now_ns(epoch);
                        let _ = h.lock().map(|mut g| {
                            let sent = if stamp & PRESEALED == 0 {
                                Some(stamp)
                            } else {
                                g.book.as_ref().and_then(|b| b.sent_ns(stamp))
                            };
                            if let Some(sent) = sent {
                                let lat_us = now.saturating_sub(sent) / 1000;
                                g.hist.record(lat_us.max(1)).ok();
                            }
                        });
                    }
                }
                b.fetch_add(n as u64, Relaxed);
            }
        })?;
        Ok((
            addr,
            Sink {
                bytes,
                payloads,
                state,
                _thread: thread,
            },
        ))
    }
}

/// How long a sent cell may take to reach the sink before the generator counts it as
/// lost (far above the p99.9 latency of a loaded local network).
const LOSS_AFTER: Duration = Duration::from_millis(200);

/// What one [`Session::drive`] measured.
#[derive(Debug, Clone)]
pub struct Drive {
    /// Payloads sent.
    pub sent: u64,
    /// Payloads counted at the sink.
    pub delivered: u64,
    /// Payload bytes counted at the sink.
    pub bytes: u64,
    /// Seconds of traffic.
    pub elapsed: f64,
    /// One-way latency, microseconds (sampled).
    pub latency: Histogram<u64>,
}

impl Drive {
    /// Delivered cells per second.
    pub fn cells_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.max(1e-9)
    }

    /// Payload MB (10^6 bytes) per second.
    pub fn payload_mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.max(1e-9)
    }

    /// Throughput, loss, latency and duration as report keys.
    pub fn json(&self) -> Value {
        json!({
            "payload_mb_per_sec": self.payload_mb_per_sec(),
            "cells_per_sec": self.cells_per_sec(),
            "sent_payloads": self.sent,
            "delivered_payloads": self.delivered,
            "lost_payloads": self.sent.saturating_sub(self.delivered),
            "latency_us": {
                "p50": self.latency.value_at_quantile(0.5),
                "p99": self.latency.value_at_quantile(0.99),
                "p999": self.latency.value_at_quantile(0.999),
                "samples": self.latency.len(),
            },
            "duration_s": self.elapsed,
        })
    }
}

/// What [`Session::setup_rate_parallel`] measured.
#[derive(Debug, Clone, Copy)]
pub struct SetupRate {
    /// Circuits built per second.
    pub per_sec: f64,
    /// Setups that failed (refused or unanswered).
    pub failed: u64,
    /// Relay CPU time per hop of a setup, microseconds (all relays' CPU over the
    /// step, over circuits x hops).
    pub relay_cpu_us_per_hop: f64,
}

/// A running local network with a sink and a generator's circuits.
pub struct Session {
    /// The relays.
    pub net: LocalNet,
    sink: Sink,
    dest: SocketAddr,
    generator: Generator,
    circuits: Vec<Circ<RingAead>>,
    layout: shroud_proto::Layout,
    epoch: Instant,
    /// Pools sealed so far ([`Session::preseal`]), numbering their stamps.
    pools: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("circuits", &self.circuits.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts `relays` relay processes on `127.0.<net>.x`, the sink and the generator.
    pub fn start(relays: usize, cell: u16, net: u8) -> anyhow::Result<Session> {
        Self::start_with(relays, cell, net, RelaySpec::default())
    }

    /// [`Session::start`] with every relay configured as `spec`.
    pub fn start_with(
        relays: usize,
        cell: u16,
        net: u8,
        spec: RelaySpec,
    ) -> anyhow::Result<Session> {
        let params = shroud_proto::peerlist::NetworkParams {
            cell,
            ..Default::default()
        };
        let layout = params.layout().map_err(|e| anyhow::anyhow!("{e}"))?;
        let cmd = match relay_binary() {
            Ok(b) => RelayCommand::Binary(b),
            Err(e) => {
                eprintln!("note: {e:#}; running relays through this binary instead (same code)");
                RelayCommand::SelfExe
            }
        };
        let specs = vec![spec; relays];
        let local = crate::net::start(net, &specs, &[], &cmd, cell)?;
        eprintln!("relays started: pids {:?}", local.pids());
        let epoch = Instant::now();
        let (dest, sink) = Sink::start(
            SocketAddr::from(([127, 0, net, 250], 0)),
            layout.payload_max(),
            epoch,
        )?;
        let generator = Generator::new(SocketAddr::from(([127, 0, net, 240], 0)), layout)?;
        Ok(Session {
            net: local,
            sink,
            dest,
            generator,
            circuits: Vec::new(),
            layout,
            epoch,
            pools: 0,
        })
    }

    fn hops_of(&self, k: usize, hops: usize) -> anyhow::Result<Vec<PathHop>> {
        let n = self.net.relays.len();
        (0..hops)
            .map(|j| {
                let r = &self.net.relays[(k + j) % n];
                let d = self
                    .net
                    .list
                    .relay_by_id(&r.id)
                    .context("relay not in the peer list")?;
                Ok(PathHop {
                    id: r.id,
                    onion: d.onion_keys[0].key,
                    addr: SocketAddr::new(r.addr, r.ports.0),
                })
            })
            .collect()
    }

    /// Replaces the circuits with `count` circuits of `hops` hops (entry, middle and
    /// exit rotating over the relays).
    pub fn build(&mut self, count: usize, hops: usize) -> anyhow::Result<()> {
        self.build_mixed(count, hops, 0)
    }

    /// [`Session::build`] for mix-mode circuits: every hop holds each cell for an
    /// exponential delay of mean `mix_mean_ms` (0: plain circuits).
    pub fn build_mixed(
        &mut self,
        count: usize,
        hops: usize,
        mix_mean_ms: u16,
    ) -> anyhow::Result<()> {
        let mix = if mix_mean_ms == 0 {
            Vec::new()
        } else {
            vec![mix_mean_ms; hops]
        };
        anyhow::ensure!(
            hops >= 1 && hops <= self.net.relays.len(),
            "need at least as many relays ({}) as hops ({hops})",
            self.net.relays.len()
        );
        self.circuits.clear();
        for k in 0..count.max(1) {
            let path = self.hops_of(k, hops)?;
            let c = self
                .generator
                .build(&path, &mix, self.dest, Duration::from_secs(5))
                .with_context(|| format!("building circuit {k}"))?;
            self.circuits.push(c);
        }
        Ok(())
    }

    /// Builds circuits one after another for `duration`; returns setups per second.
    pub fn setup_rate(&mut self, hops: usize, duration: Duration) -> anyhow::Result<f64> {
        Ok(self.setup_rate_parallel(hops, duration, 1)?.per_sec)
    }

    /// Circuit setups per second with `batch` setups sent at once
    /// (`shroud_client::Client::build_circuits`, one round trip per batch), and the
    /// relays' CPU time per hop of a setup meanwhile. Each batch's circuits are torn
    /// down after it, so the relays' tables do not fill.
    pub fn setup_rate_parallel(
        &mut self,
        hops: usize,
        duration: Duration,
        batch: usize,
    ) -> anyhow::Result<SetupRate> {
        let bind = SocketAddr::new(self.dest.ip(), 0);
        let mut client = shroud_client::Client::new(bind, &self.net.list)
            .map_err(|e| anyhow::anyhow!("setup client: {e}"))?;
        let cpu0: f64 = (0..self.net.relays.len())
            .map(|i| self.net.cpu_seconds(i))
            .sum();
        let started = Instant::now();
        let mut n = 0u64;
        let mut failed = 0u64;
        let mut k = 0usize;
        while started.elapsed() < duration {
            let paths: Vec<Vec<PathHop>> = (0..batch)
                .map(|j| self.hops_of(k + j, hops))
                .collect::<anyhow::Result<_>>()?;
            k += batch;
            let requests: Vec<(&[PathHop], SocketAddr)> =
                paths.iter().map(|p| (p.as_slice(), self.dest)).collect();
            for r in client.build_circuits(&requests, Duration::from_secs(5)) {
                match r {
                    Ok(id) => {
                        n += 1;
                        let _ = client.destroy(id);
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu: f64 = (0..self.net.relays.len())
            .map(|i| self.net.cpu_seconds(i))
            .sum::<f64>()
            - cpu0;
        if n == 0 {
            anyhow::bail!("no circuit could be built ({failed} setups failed)");
        }
        Ok(SetupRate {
            per_sec: n as f64 / elapsed,
            failed,
            relay_cpu_us_per_hop: cpu * 1e6 / (n as f64 * hops as f64),
        })
    }

    /// Seals cells for every circuit ahead of time, about `bytes` of them in all (a
    /// whole number of 32-cell batches per circuit), on one thread per core; stops early
    /// (keeping what it sealed) when `stop` is set.
    pub fn preseal(&mut self, bytes: usize, stop: &AtomicBool) -> anyhow::Result<Presealed> {
        let cell = self.layout.cell;
        let n = self.circuits.len().max(1);
        let per_circuit = bytes / cell / n / BATCH * BATCH;
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let data = vec![0x5au8; self.layout.payload_max()];
        let t0 = Instant::now();
        self.pools += 1;
        let pool = self.pools;
        let cells = self.generator.preseal(
            &mut self.circuits,
            per_circuit,
            &data,
            threads,
            |circuit, cell| SendBook::stamp(pool, circuit, cell),
            stop,
        )?;
        let book = SendBook {
            pool,
            sent_ns: (0..n)
                .map(|_| {
                    (0..per_circuit / BATCH)
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        };
        Ok(Presealed {
            next: vec![0; cells.len()],
            cells,
            book: Arc::new(book),
            seal_secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// How many bytes of cells a drive of `duration` at `rate` cells/s sends at most
    /// (a closed loop, `rate` 0: `max_bytes`), capped at `max_bytes`.
    fn preseal_budget(&self, duration: f64, rate: f64, max_bytes: usize) -> usize {
        if rate > 0.0 {
            let cells = (rate * duration) as usize + BATCH * self.circuits.len();
            max_bytes.min(cells.saturating_mul(self.layout.cell))
        } else {
            max_bytes
        }
    }

    /// [`Session::drive`] on cells sealed before the clock starts (as many as the drive
    /// can send, at most `max_bytes`; fewer than a batch per circuit: sealed live).
    pub fn drive_presealed(
        &mut self,
        duration: f64,
        rate: f64,
        window: u64,
        max_bytes: usize,
        stop: &AtomicBool,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<Drive> {
        let budget = self.preseal_budget(duration, rate, max_bytes);
        if budget < self.layout.cell * BATCH * self.circuits.len() {
            return self.drive(duration, rate, window, None, stop, bar);
        }
        let mut pool = self.preseal(budget, stop)?;
        self.drive(duration, rate, window, Some(&mut pool), stop, bar)
    }

    /// Drives traffic for `duration`: at `rate` cells/s (0 = as fast as the window
    /// allows) with at most `window` cells in flight. With `pool`, sends its presealed
    /// cells and stops early when they run out; without, seals every cell live.
    pub fn drive(
        &mut self,
        duration: f64,
        rate: f64,
        window: u64,
        mut pool: Option<&mut Presealed>,
        stop: &AtomicBool,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<Drive> {
        let layout = self.layout;
        let mut buf = Vec::with_capacity(BATCH * layout.cell);
        let mut data = vec![0x5au8; layout.payload_max()];
        let base_delivered = self.sink.payloads.load(Relaxed);
        let base_bytes = self.sink.bytes.load(Relaxed);
        let _ = self.sink.state.lock().map(|mut s| {
            s.hist.reset();
            s.book = pool.as_ref().map(|p| p.book.clone());
        });
        let mut sent = 0u64;
        let started = Instant::now();
        let mut last_report = started;
        let mut k = 0usize;
        let limit = Duration::from_secs_f64(duration);
        // (time, cells sent by then): a cell sent more than LOSS_AFTER ago is delivered
        // or lost, so it no longer holds a place in the window. Without this, every
        // lost cell held its place for the rest of the run, and a window's worth of
        // losses stopped the generator for good.
        let mut checkpoints: VecDeque<(Instant, u64)> = VecDeque::with_capacity(1 << 16);
        let mut settled = 0u64;
        let (mut credit, mut credit_at) = (BATCH as f64, 0.0f64);
        while started.elapsed() < limit && !stop.load(Relaxed) {
            let delivered = self.sink.payloads.load(Relaxed) - base_delivered;
            let now = Instant::now();
            while let Some(&(t, n)) = checkpoints.front() {
                if now.duration_since(t) < LOSS_AFTER {
                    break;
                }
                settled = n;
                checkpoints.pop_front();
            }
            let in_flight = sent.saturating_sub(delivered.max(settled));
            // An offered rate is paced by a token bucket of PACE_BURST cells: after a
            // stall of the generator's thread (two cores shared with three relays) it
            // sends at most that many at once rather than the whole backlog, as a
            // paced sender would; the rate it reached is `sent / elapsed`.
            if rate > 0.0 {
                let t = now.duration_since(started).as_secs_f64();
                credit = (credit + (t - credit_at) * rate).min(PACE_BURST);
                credit_at = t;
            }
            if in_flight + BATCH as u64 > window || (rate > 0.0 && credit < BATCH as f64) {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                let i = k % self.circuits.len();
                k += 1;
                let c = &mut self.circuits[i];
                let cells: &[u8] = match pool.as_deref_mut() {
                    Some(p) => {
                        let (from, to) = (p.next[i], p.next[i] + BATCH);
                        if to * layout.cell > p.cells[i].len() {
                            break; // sealed ahead and all sent
                        }
                        p.next[i] = to;
                        p.book.sent_ns[i][from / BATCH].store(now_ns(self.epoch), Relaxed);
                        &p.cells[i][from * layout.cell..to * layout.cell]
                    }
                    None => {
                        buf.clear();
                        for _ in 0..BATCH {
                            data[..8].copy_from_slice(&now_ns(self.epoch).to_le_bytes());
                            let start = buf.len();
                            buf.resize(start + layout.cell, 0);
                            self.generator.seal_one(c, &data, &mut buf[start..])?;
                        }
                        &buf
                    }
                };
                sent += gso_send(&self.generator.sock, c.first, cells, layout.cell) as u64;
                credit -= BATCH as f64;
                checkpoints.push_back((Instant::now(), sent));
            }
            if last_report.elapsed() > Duration::from_millis(250) {
                last_report = Instant::now();
                let t = started.elapsed().as_secs_f64();
                let d = self.sink.payloads.load(Relaxed) - base_delivered;
                bar.set_message(format!(
                    "{:>9.0} cells/s  {:>7.1} MB/s payload  sent {sent}  delivered {d}",
                    d as f64 / t,
                    (self.sink.bytes.load(Relaxed) - base_bytes) as f64 / 1e6 / t
                ));
                bar.tick();
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        // Let the last cells arrive before counting losses.
        let settle = Instant::now();
        while self.sink.payloads.load(Relaxed) - base_delivered < sent
            && settle.elapsed() < Duration::from_millis(500)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let latency = self
            .sink
            .state
            .lock()
            .map(|s| s.hist.clone())
            .unwrap_or_else(|e| e.into_inner().hist.clone());
        Ok(Drive {
            sent,
            delivered: self.sink.payloads.load(Relaxed) - base_delivered,
            bytes: self.sink.bytes.load(Relaxed) - base_bytes,
            elapsed,
            latency,
        })
    }
}

/// The bytes of cells to seal ahead: `mb` MiB, at most a third of the memory the
/// kernel reports available (MemAvailable), so that the demo never pushes a small
/// machine into swap.
pub fn preseal_bytes(mb: u64) -> usize {
    let wanted = (mb as usize).saturating_mul(1 << 20);
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(usize::MAX, |kb| kb.saturating_mul(1024) / 3);
    wanted.min(available)
}

/// Runs the demo; returns the report.
pub fn run(opts: &Opts, stop: &AtomicBool) -> anyhow::Result<Value> {
    let mut session = Session::start(opts.relays, opts.cell, opts.net)?;
    session.build(opts.circuits, opts.hops)?;
    let cell = session.layout.cell;
    let budget = session.preseal_budget(
        opts.duration,
        opts.rate as f64,
        preseal_bytes(opts.preseal_mb),
    );
    let mut pool = if budget >= cell * BATCH * session.circuits.len() {
        let p = session.preseal(budget, stop)?;
        eprintln!(
            "sealed {} cells ahead of time in {:.1} s ({} MiB); the clock starts now",
            p.len(cell),
            p.seal_secs,
            (p.len(cell) * cell) >> 20
        );
        Some(p)
    } else {
        None
    };
    let cpu0: Vec<f64> = (0..opts.relays)
        .map(|i| session.net.cpu_seconds(i))
        .collect();
    let held0: Vec<_> = (0..opts.relays)
        .map(|i| residence_of(&session.net, i))
        .collect();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let d = session.drive(
        opts.duration,
        opts.rate as f64,
        opts.window,
        pool.as_mut(),
        stop,
        &bar,
    )?;
    let cpu: Vec<f64> = (0..opts.relays)
        .map(|i| (session.net.cpu_seconds(i) - cpu0[i]) / d.elapsed * 100.0)
        .collect();
    // Each relay's own measure of the cells' time in it over the run.
    let held: Vec<Value> = (0..opts.relays)
        .map(|i| {
            let mut h = residence_of(&session.net, i);
            add_latency(&mut h, &held0[i], -1);
            in_relay(&h)
        })
        .collect();
    let presealed = pool.as_ref().map(|p| (p.len(cell), p.seal_secs));
    drop(pool);
    // The sealed cells ran out before the time was up: the rest runs sealing live.
    let live = match presealed {
        Some(_) if d.elapsed + 0.25 < opts.duration && !stop.load(Relaxed) => Some(session.drive(
            opts.duration - d.elapsed,
            opts.rate as f64,
            opts.window,
            None,
            stop,
            &bar,
        )?),
        _ => None,
    };
    bar.finish_and_clear();
    let relays: Vec<Value> = session
        .net
        .relays
        .iter()
        .zip(cpu.iter().zip(&held))
        .map(|(r, (c, h))| json!({"id": r.id.to_string(), "addr": r.addr.to_string(), "ports": [r.ports.0, r.ports.1], "cpu_percent": c, "in_relay": h}))
        .collect();
    let cells_per_sec = d.cells_per_sec();
    let layout = session.layout;
    let mut report = d.json();
    let extra = json!({
        "schema": "shroud-bench/demo/1",
        "sealing": if presealed.is_some() { "ahead" } else { "live" },
        "presealed_cells": presealed.map(|p| p.0),
        "preseal_seconds": presealed.map(|p| p.1),
        "live_sealing": live.as_ref().map(Drive::json),
        "gbit_per_sec": cells_per_sec * layout.cell as f64 * 8.0 / 1e9,
        "latency_cdf_us": crate::plot::cdf_points(&d.latency),
        "relays": relays,
        "hops": opts.hops,
        "circuits": session.circuits.len(),
        "cell": opts.cell,
        "payload_bytes_per_cell": layout.payload_max(),
        "interrupted": stop.load(Relaxed),
        "machine": machine(),
    });
    if let (Some(r), Value::Object(e)) = (report.as_object_mut(), extra) {
        r.extend(e);
    }
    Ok(report)
}

/// Prints the human summary.
pub fn print(r: &Value) {
    println!(
        "shroud-bench demo: {} relays, {} circuits of {} hops, CELL={} B, {:.1} s, cells sealed {}",
        r["relays"].as_array().map_or(0, Vec::len),
        r["circuits"],
        r["hops"],
        r["cell"],
        r["duration_s"].as_f64().unwrap_or(0.0),
        if r["sealing"] == "ahead" {
            "ahead of time (the relays measured, not the client)"
        } else {
            "live by the generator (on the same cores as the relays)"
        }
    );
    println!(
        "  delivered {:.0} cells/s = {:.2} Gbit/s of cells, {:.1} MB/s of payload ({} of {} payloads delivered, {} lost)",
        r["cells_per_sec"].as_f64().unwrap_or(0.0),
        r["gbit_per_sec"].as_f64().unwrap_or(0.0),
        r["payload_mb_per_sec"].as_f64().unwrap_or(0.0),
        r["delivered_payloads"],
        r["sent_payloads"],
        r["lost_payloads"]
    );
    let l = &r["latency_us"];
    println!(
        "  one-way latency through {} hops: p50 {} us, p99 {} us, p99.9 {} us",
        r["hops"], l["p50"], l["p99"], l["p999"]
    );
    for (i, rel) in r["relays"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  relay {i} {}:{}-{} cpu {:.0}%, a cell's time in it p50 {} us, p99 {} us",
            rel["addr"].as_str().unwrap_or(""),
            rel["ports"][0],
            rel["ports"][1],
            rel["cpu_percent"].as_f64().unwrap_or(0.0),
            us_or_dash(&rel["in_relay"]["p50_us"]),
            us_or_dash(&rel["in_relay"]["p99_us"]),
        );
    }
    let l = &r["live_sealing"];
    if l.is_object() {
        println!(
            "  then {:.1} s with the generator sealing live: {:.0} cells/s, {:.1} MB/s of payload ({} lost), p99 {} us",
            l["duration_s"].as_f64().unwrap_or(0.0),
            l["cells_per_sec"].as_f64().unwrap_or(0.0),
            l["payload_mb_per_sec"].as_f64().unwrap_or(0.0),
            l["lost_payloads"],
            l["latency_us"]["p99"]
        );
    }
}
