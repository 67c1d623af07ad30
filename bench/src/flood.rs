//! `shroud-bench flood`: the demo's traffic under a garbage flood, against the same
//! flood aimed at a sink in the same run.
//!
//! An attacker sprays random datagrams (nine in ten of 1024 bytes, the rest of random
//! length up to 1472) at every port of every relay, from one source address or from
//! 256 (each in its own /24), starting before the circuits are built or after. The
//! baseline of each case is the same flood, from the same sockets at the same rate,
//! aimed at a local sink socket instead: the attacker's CPU cost on this shared
//! machine is the same in both, so the ratio of delivered payload (flood at relays /
//! flood at sink) says what the flood costs the network itself. The goal (issue
//! "Protocol v2", item 4) is a ratio of at least 0.9 in every case.
//!
//! Each case runs on a fresh network. Reported per case: delivered payload MB/s, lost
//! payloads, p99 latency, datagrams the flood sent, the relays' drop counters and the
//! kernel's UDP receive-buffer errors during the case (`/proc/net/snmp`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};

use crate::background::Background;
use crate::demo::Session;
use crate::report::machine;

/// Options of `shroud-bench flood`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Seconds of traffic per case.
    pub duration: f64,
    /// Flood datagrams per second, all sources together.
    pub rate: u64,
    /// Circuits (3 hops over 3 relays).
    pub circuits: usize,
    /// Most cells in flight.
    pub window: u64,
    /// Third octet of the loopback block the relays use (127.0.NET.x).
    pub net: u8,
    /// Source counts to try (1 and 256 by default).
    pub sources: Vec<usize>,
    /// The relays' `[io] batch_wait_us`.
    pub batch_wait_us: u32,
}

/// The attacker: a thread spraying garbage from `sources` sockets at `targets`.
struct Flood {
    sent: Arc<AtomicU64>,
    thread: Background,
}

impl Flood {
    fn start(sources: usize, targets: Vec<SocketAddr>, rate: u64) -> anyhow::Result<Flood> {
        let socks: Vec<UdpSocket> = (0..sources)
            .map(|i| {
                // 127.200.i.1: every source in its own /24.
                let ip = Ipv4Addr::new(127, 200, (i % 256) as u8, 1 + (i / 256) as u8);
                UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))
            })
            .collect::<Result<_, _>>()?;
        let mut pool: Vec<Vec<u8>> = Vec::with_capacity(64);
        for k in 0..64u32 {
            let len = if k % 10 == 9 {
                1 + (OsRng.next_u32() % 1472) as usize
            } else {
                1024
            };
            let mut b = vec![0u8; len];
            OsRng.fill_bytes(&mut b);
            pool.push(b);
        }
        let sent = Arc::new(AtomicU64::new(0));
        let count = sent.clone();
        let thread = Background::spawn("flood", move |st| {
            let started = Instant::now();
            let mut n = 0u64;
            while !st.load(Relaxed) {
                // Pace to `rate`: send what is due, then sleep a millisecond.
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due {
                    let k = n as usize;
                    let s = &socks[k % socks.len()];
                    let to = targets[(k / socks.len()) % targets.len()];
                    let _ = s.send_to(&pool[k % pool.len()], to);
                    n += 1;
                }
                count.store(n, Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })?;
        Ok(Flood { sent, thread })
    }

    /// Stops the flood; returns the datagrams it sent.
    fn finish(mut self) -> u64 {
        self.thread.stop();
        self.sent.load(Relaxed)
    }
}

/// A socket that reads and discards whatever reaches it (the baseline's target).
struct Discard {
    addr: SocketAddr,
    _thread: Background,
}

impl Discard {
    fn start(at: SocketAddr) -> anyhow::Result<Discard> {
        let sock = UdpSocket::bind(at)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let thread = Background::spawn("flood-sink", move |stop| {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Relaxed) {
                let _ = sock.recv_from(&mut buf);
            }
        })?;
        Ok(Discard {
            addr,
            _thread: thread,
        })
    }
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer.
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Drop counters summed over the relays.
fn relay_drops(session: &Session) -> Value {
    let mut total = serde_json::Map::new();
    for i in 0..session.net.relays.len() {
        if let Ok(s) = session.net.request(i, &shroud_admin::Request::Status) {
            if let Some(d) = s["drops"].as_object() {
                for (k, v) in d {
                    let prev = total.get(k).and_then(Value::as_u64).unwrap_or(0);
                    total.insert(k.clone(), json!(prev + v.as_u64().unwrap_or(0)));
                }
            }
        }
    }
    Value::Object(total)
}

/// One case: a fresh network, the flood at `at_relays` (else at a sink), started
/// `before` the circuits are built (else after), then the demo's traffic.
fn case(
    opts: &Opts,
    sources: usize,
    before: bool,
    at_relays: bool,
    stop: &AtomicBool,
) -> anyhow::Result<Value> {
    eprintln!(
        "flood case: {sources} sources, {}, at {}",
        if before {
            "before circuits"
        } else {
            "after circuits"
        },
        if at_relays { "relays" } else { "a sink" }
    );
    // The shipped per-prefix setup budget (200/s, burst 400), not the benchmark's.
    let spec = crate::net::RelaySpec {
        setup_rate: 200,
        batch_wait_us: opts.batch_wait_us,
        ..Default::default()
    };
    let mut session = Session::start_with(3, 1024, opts.net, spec)?;
    let discard = Discard::start(SocketAddr::from(([127, 0, opts.net, 251], 0)))?;
    let targets: Vec<SocketAddr> = if at_relays {
        session
            .net
            .relays
            .iter()
            .flat_map(|r| (r.ports.0..=r.ports.1).map(|p| SocketAddr::new(r.addr, p)))
            .collect()
    } else {
        vec![discard.addr]
    };
    let rcvbuf0 = udp_rcvbuf_errors();
    let mut flood = None;
    if before {
        flood = Some(Flood::start(sources, targets.clone(), opts.rate)?);
        std::thread::sleep(Duration::from_millis(300));
    }
    let built = Instant::now();
    if let Err(e) = session.build(opts.circuits, 3) {
        // Circuits could not be built under this flood: that is the result of the
        // case (nothing delivered), not a failure of the benchmark.
        let flood_sent = flood.map_or(0, Flood::finish);
        return Ok(json!({
            "sources": sources,
            "flood_started": if before { "before_circuits" } else { "after_circuits" },
            "flood_at": if at_relays { "relays" } else { "sink" },
            "error": format!("{e:#}"),
            "payload_mb_per_sec": 0.0,
            "delivered_payloads": 0,
            "flood_datagrams": flood_sent,
            "udp_rcvbuf_errors": udp_rcvbuf_errors().saturating_sub(rcvbuf0),
            "relay_drops": if at_relays { relay_drops(&session) } else { Value::Null },
        }));
    }
    let build_s = built.elapsed().as_secs_f64();
    if !before {
        flood = Some(Flood::start(sources, targets, opts.rate)?);
        std::thread::sleep(Duration::from_millis(300));
    }
    let bar = indicatif::ProgressBar::hidden();
    let d = session.drive(opts.duration, 0.0, opts.window, None, stop, &bar)?;
    let flood_sent = flood.map_or(0, Flood::finish);
    let rcvbuf = udp_rcvbuf_errors().saturating_sub(rcvbuf0);
    let mut report = d.json();
    let case = json!({
        "sources": sources,
        "flood_started": if before { "before_circuits" } else { "after_circuits" },
        "flood_at": if at_relays { "relays" } else { "sink" },
        "circuit_build_s": build_s,
        "flood_datagrams": flood_sent,
        "flood_datagrams_per_sec": flood_sent as f64 / (d.elapsed + 0.3),
        "udp_rcvbuf_errors": rcvbuf,
        "relay_drops": if at_relays { relay_drops(&session) } else { Value::Null },
    });
    if let (Some(r), Value::Object(c)) = (report.as_object_mut(), case) {
        r.extend(c);
    }
    Ok(report)
}

/// Runs every case; returns the report.
pub fn run(opts: &Opts, stop: &AtomicBool) -> anyhow::Result<Value> {
    let mut cases = Vec::new();
    let mut ratios = Vec::new();
    for &sources in &opts.sources {
        for before in [false, true] {
            let sink = case(opts, sources, before, false, stop)?;
            let relays = case(opts, sources, before, true, stop)?;
            let base = sink["payload_mb_per_sec"].as_f64().unwrap_or(0.0);
            let under = relays["payload_mb_per_sec"].as_f64().unwrap_or(0.0);
            let ratio = if base > 0.0 { under / base } else { 0.0 };
            ratios.push(json!({
                "sources": sources,
                "flood_started": sink["flood_started"],
                "baseline_mb_per_sec": base,
                "under_flood_mb_per_sec": under,
                "ratio": ratio,
            }));
            cases.push(sink);
            cases.push(relays);
            if stop.load(Relaxed) {
                break;
            }
        }
    }
    let min_ratio = ratios
        .iter()
        .filter_map(|r| r["ratio"].as_f64())
        .fold(f64::INFINITY, f64::min);
    Ok(json!({
        "schema": "shroud-bench/flood/1",
        "min_ratio": if min_ratio.is_finite() { json!(min_ratio) } else { Value::Null },
        "goal_ratio": 0.9,
        "ratios": ratios,
        "cases": cases,
        "flood_rate": opts.rate,
        "circuits": opts.circuits,
        "hops": 3,
        "window": opts.window,
        "duration_s": opts.duration,
        "interrupted": stop.load(Relaxed),
        "machine": machine(),
    }))
}

/// Prints the human summary.
pub fn print(r: &Value) {
    println!(
        "shroud-bench flood: {} datagrams/s of garbage, 3 relays, {} circuits of 3 hops, {} s per case",
        r["flood_rate"], r["circuits"], r["duration_s"]
    );
    println!("  sources  flood started     at sink MB/s  at relays MB/s  ratio");
    for x in r["ratios"].as_array().into_iter().flatten() {
        println!(
            "  {:>7}  {:<16}  {:>12.1}  {:>14.1}  {:>5.2}",
            x["sources"],
            x["flood_started"].as_str().unwrap_or(""),
            x["baseline_mb_per_sec"].as_f64().unwrap_or(0.0),
            x["under_flood_mb_per_sec"].as_f64().unwrap_or(0.0),
            x["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  lowest ratio {:.2} (goal {:.1})",
        r["min_ratio"].as_f64().unwrap_or(0.0),
        r["goal_ratio"].as_f64().unwrap_or(0.0)
    );
    for c in r["cases"].as_array().into_iter().flatten() {
        if let Some(e) = c["error"].as_str() {
            println!(
                "  {} sources, {}, at {}: {e}; relay drops {}",
                c["sources"],
                c["flood_started"].as_str().unwrap_or(""),
                c["flood_at"].as_str().unwrap_or(""),
                c["relay_drops"]
            );
        } else if c["flood_at"] == "relays" {
            println!(
                "  {} sources, {}: lost {} payloads, p99 {} us, {} kernel rcvbuf drops, relay drops {}",
                c["sources"],
                c["flood_started"].as_str().unwrap_or(""),
                c["lost_payloads"],
                c["latency_us"]["p99"],
                c["udp_rcvbuf_errors"],
                c["relay_drops"]
            );
        }
    }
}
