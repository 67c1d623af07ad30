//! `shroud-bench relay`: the throughput of ONE relay, generator → relay → sink, with
//! the baselines measured in the same run.
//!
//! Method (drain, as the probes in shared/limits): per round the generator seals
//! `round_cells` cells ahead of time, stops the relay (SIGSTOP), queues every cell in
//! the relay's socket buffers with GSO sends, resumes it (SIGCONT) and times how long
//! the relay takes until the sink — an in-process relay of the peer list on the other
//! core — has received them all. Sealing and queueing are outside the timed window, so
//! the figure is the relay's own forwarding rate. The median over the rounds is
//! reported.
//!
//! Variants, each a fresh relay process pinned to the last core: `ring` with GRO/GSO
//! (the product), `none` (the same relay with the cell AEAD replaced by a no-op: the
//! no-crypto forwarder), `per-datagram` (ring, GRO/GSO off: one datagram per cell in
//! and out), `rustcrypto`, and `zero-copy` (ring with SENDMSG_ZC). Raw AES-256-GCM opens per core are measured in-process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand_core::OsRng;
use serde_json::{json, Value};
use shroud_proto::aead::{nonce_for, Aead, RingAead, RustCryptoAead};
use shroud_proto::client::PathHop;
use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::Layout;

use crate::flow::{Generator, SinkRelay};
use crate::net::{RelayCommand, RelaySpec, Virtual};
use crate::report::{machine, median};

/// Options of `shroud-bench relay`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Seconds per variant.
    pub duration: f64,
    /// Relay workers.
    pub workers: usize,
    /// Cell size.
    pub cell: u16,
    /// Cells per drain round.
    pub round_cells: usize,
    /// Variants to run (default all).
    pub variants: Vec<String>,
    /// The relay's `[io] batch_wait_us`.
    pub batch_wait_us: u32,
    /// The relay's `[io] recv_slots` (None: its default).
    pub recv_slots: Option<usize>,
}

fn raw_aead<A: Aead>(len: usize, dur: Duration) -> f64 {
    let k = A::new(&[7; 32]);
    let mut buf = vec![0x5au8; len];
    let tag = k.seal(&nonce_for(1), &[], &mut buf);
    let pristine = buf.clone();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..256 {
            buf.copy_from_slice(&pristine);
            let _ = k.open(&nonce_for(1), &[], std::hint::black_box(&mut buf), &tag);
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Raises the socket-buffer ceilings so a drain round fits in the relay's buffers;
/// returns the previous values to restore.
fn raise_buffer_limits(bytes: u64) -> Vec<(String, String)> {
    let mut old = Vec::new();
    for p in ["/proc/sys/net/core/rmem_max", "/proc/sys/net/core/wmem_max"] {
        if let Ok(v) = std::fs::read_to_string(p) {
            if v.trim().parse::<u64>().unwrap_or(0) < bytes
                && std::fs::write(p, bytes.to_string()).is_ok()
            {
                eprintln!(
                    "note: raised {p} from {} to {bytes} for this run (restored at the end)",
                    v.trim()
                );
                old.push((p.to_string(), v));
            }
        }
    }
    old
}

fn run_variant(opts: &Opts, name: &str, cell: Layout, net_no: u8) -> anyhow::Result<Value> {
    if name == "none" {
        run_variant_with::<shroud_proto::aead::NullAead>(opts, name, cell, net_no)
    } else {
        run_variant_with::<RingAead>(opts, name, cell, net_no)
    }
}

/// One variant; `A` is the AEAD of the generator and the sink (a no-op for the
/// no-crypto variant, whose relay runs without cell crypto too).
fn run_variant_with<A: Aead>(
    opts: &Opts,
    name: &str,
    cell: Layout,
    net_no: u8,
) -> anyhow::Result<Value> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (crypto, gro_gso, zero_copy_send) = match name {
        "ring" => ("ring", true, false),
        "none" => ("none", true, false),
        "per-datagram" => ("ring", false, false),
        "rustcrypto" => ("rustcrypto", true, false),
        "zero-copy" => ("ring", true, true),
        other => bail!("unknown variant {other}"),
    };
    // Pin the relay's workers to the last cores; the generator and sink use the rest.
    let cpus: Vec<usize> = if cores > opts.workers {
        (cores - opts.workers..cores).collect()
    } else {
        Vec::new()
    };
    let sink = Virtual {
        identity: IdentityKey::generate(&mut OsRng),
        onion: OnionSecret::generate(&mut OsRng),
        addr: SocketAddr::from(([127, 0, net_no, 200], 9100)),
    };
    let spec = RelaySpec {
        workers: opts.workers,
        cpus,
        crypto: crypto.into(),
        gro_gso,
        zero_copy_send,
        exit_policy: Vec::new(),
        batch_wait_us: opts.batch_wait_us,
        recv_slots: opts.recv_slots,
        ..RelaySpec::default()
    };
    let net = crate::net::start(net_no, &[spec], &[&sink], &RelayCommand::SelfExe, opts.cell)?;
    let peers = shroud_relay::daemon::peers_of(&net.list);
    let sink_relay = SinkRelay::start::<A>(&sink, peers, cell)?;
    let mut generator = Generator::new(SocketAddr::from(([127, 0, net_no, 150], 0)), cell)?;
    let r = &net.relays[0];
    let onion_r = net
        .list
        .relay_by_id(&r.id)
        .context("relay in list")?
        .onion_keys[0]
        .key;
    let sink_hop = PathHop {
        id: sink.identity.public().relay_id(),
        onion: sink.onion.public(),
        addr: sink.addr,
    };
    let mut circuits = Vec::new();
    for w in 0..opts.workers {
        for _ in 0..2 {
            let hop = PathHop {
                id: r.id,
                onion: onion_r,
                addr: SocketAddr::new(r.addr, r.ports.0 + w as u16),
            };
            let c = generator
                .build::<A>(
                    &[hop, sink_hop],
                    &[],
                    SocketAddr::from(([127, 0, net_no, 201], 9)),
                    Duration::from_secs(5),
                )
                .with_context(|| {
                    format!(
                        "relay status: {}",
                        net.request(0, &shroud_admin::Request::Status)
                            .map(|s| s["drops"].to_string())
                            .unwrap_or_default()
                    )
                })?;
            circuits.push(c);
        }
    }
    sink_relay.count();
    let payload = cell.payload_max();
    let per_circuit = opts.round_cells.div_ceil(circuits.len());
    let mut rates = Vec::new();
    let mut lost = 0u64;
    let mut timed = Duration::ZERO;
    let mut forwarded = 0u64;
    let cpu0 = net.cpu_seconds(0);
    let started = Instant::now();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(per_circuit * cell.cell); circuits.len()];
    while started.elapsed().as_secs_f64() < opts.duration || rates.len() < 3 {
        for (b, c) in bufs.iter_mut().zip(circuits.iter_mut()) {
            b.clear();
            generator.seal(c, per_circuit, payload, b)?;
        }
        net.signal(0, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(5));
        let mut queued = 0usize;
        for (b, c) in bufs.iter().zip(&circuits) {
            queued += crate::flow::gso_send(&generator.sock, c.first, b, cell.cell);
        }
        std::thread::sleep(Duration::from_millis(10));
        let base = sink_relay.cells.load(std::sync::atomic::Ordering::Relaxed);
        sink_relay.arm(base + queued as u64);
        let t0 = Instant::now();
        net.signal(0, libc::SIGCONT);
        let deadline = t0 + Duration::from_secs(3);
        while sink_relay.reached().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        let got = sink_relay.cells.load(std::sync::atomic::Ordering::Relaxed) - base;
        forwarded += got;
        match sink_relay.reached() {
            Some(t1) => {
                let dt = t1 - t0;
                timed += dt;
                rates.push(queued as f64 / dt.as_secs_f64());
            }
            None => {
                // Cells were lost (socket buffer overflow or drops): rate over the
                // window with what arrived, counted as loss.
                lost += queued as u64 - got;
                timed += Duration::from_secs(3);
            }
        }
    }
    let cpu = net.cpu_seconds(0) - cpu0;
    let status = net.request(0, &shroud_admin::Request::Status)?;
    let rounds = rates.len();
    let med = median(&mut rates);
    Ok(json!({
        "variant": name,
        "crypto": crypto,
        "gro_gso": gro_gso,
        "zero_copy_send": zero_copy_send,
        "workers": opts.workers,
        "rounds": rounds,
        "round_cells": opts.round_cells,
        "cells_per_sec": med,
        "cells_per_sec_per_core": med / opts.workers as f64,
        "gbit_per_sec": med * cell.cell as f64 * 8.0 / 1e9,
        "ns_per_cell_per_core": if med > 0.0 { 1e9 * opts.workers as f64 / med } else { 0.0 },
        "lost_cells": lost,
        "relay_cpu_seconds": cpu,
        // CPU the relay spent per cell it forwarded (all rounds, setup included).
        "relay_cpu_ns_per_cell": cpu * 1e9 / forwarded.max(1) as f64,
        // Share of the timed windows the relay's cores were busy.
        "relay_cpu_share_of_timed": if timed.as_secs_f64() > 0.0 { cpu / opts.workers as f64 / timed.as_secs_f64() } else { 0.0 },
        "relay_drops": status["drops"],
        "relay_send_errors": worker_sum(&status, "send_errors"),
        "relay_recv_errors": worker_sum(&status, "recv_errors"),
        "relay_recv_ring_empty": worker_sum(&status, "recv_ring_empty"),
        "driver": status["workers"][0]["stats"]["driver"],
    }))
}

/// A worker counter from an admin `status` reply, summed over the workers.
fn worker_sum(status: &Value, name: &str) -> u64 {
    status["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["stats"][name].as_u64()).sum())
        .unwrap_or(0)
}

/// Runs the benchmark and returns the report.
pub fn run(opts: &Opts) -> anyhow::Result<Value> {
    let layout = shroud_proto::peerlist::NetworkParams {
        cell: opts.cell,
        ..Default::default()
    }
    .layout()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let restore = raise_buffer_limits(64 << 20);
    let body = layout.body_len();
    let dur = Duration::from_millis(500);
    let raw = json!({
        "ring": raw_aead::<RingAead>(body, dur),
        "rustcrypto": raw_aead::<RustCryptoAead>(body, dur),
        "bytes": body,
    });
    let mut variants = Vec::new();
    let names: Vec<String> = if opts.variants.is_empty() {
        ["ring", "none", "per-datagram", "rustcrypto", "zero-copy"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        opts.variants.clone()
    };
    for (i, v) in names.iter().enumerate() {
        eprintln!("relay benchmark: variant {v} ({}/{})", i + 1, names.len());
        variants.push(run_variant(opts, v, layout, 40 + i as u8)?);
    }
    for (p, v) in restore {
        let _ = std::fs::write(p, v);
    }
    let get = |name: &str| {
        variants
            .iter()
            .find(|v| v["variant"] == name)
            .map(|v| v["cells_per_sec_per_core"].as_f64().unwrap_or(0.0))
    };
    let headline = get("ring")
        .or_else(|| {
            variants
                .first()
                .and_then(|v| v["cells_per_sec_per_core"].as_f64())
        })
        .unwrap_or(0.0);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let raw_ring = raw["ring"].as_f64();
    Ok(json!({
        "schema": "shroud-bench/relay/1",
        "cells_per_sec_per_core": headline,
        "gbit_per_sec_per_core": headline * opts.cell as f64 * 8.0 / 1e9,
        "cell": opts.cell,
        "workers": opts.workers,
        "ratios": {
            "ring_vs_no_crypto": ratio(get("ring"), get("none")),
            "ring_vs_per_datagram": ratio(get("ring"), get("per-datagram")),
            "ring_vs_raw_aes_gcm_open": ratio(get("ring"), raw_ring),
            "rustcrypto_vs_ring": ratio(get("rustcrypto"), get("ring")),
            "zero_copy_vs_ring": ratio(get("zero-copy"), get("ring")),
        },
        "raw_aes_gcm_opens_per_sec_per_core": raw,
        "variants": variants,
        "machine": machine(),
    }))
}

/// Prints the human summary.
pub fn print(r: &Value) {
    println!(
        "shroud-bench relay: CELL={} B, {} worker(s), drain rounds of {} cells",
        r["cell"], r["workers"], r["variants"][0]["round_cells"]
    );
    println!(
        "{:<14} {:>14} {:>10} {:>12} {:>8} {:>10}",
        "variant", "cells/s/core", "Gbit/s", "ns/cell", "rounds", "lost"
    );
    for v in r["variants"].as_array().into_iter().flatten() {
        println!(
            "{:<14} {:>14.0} {:>10.2} {:>12.0} {:>8} {:>10}",
            v["variant"].as_str().unwrap_or(""),
            v["cells_per_sec_per_core"].as_f64().unwrap_or(0.0),
            v["gbit_per_sec"].as_f64().unwrap_or(0.0) / v["workers"].as_f64().unwrap_or(1.0),
            v["ns_per_cell_per_core"].as_f64().unwrap_or(0.0),
            v["rounds"],
            v["lost_cells"],
        );
    }
    let raw = &r["raw_aes_gcm_opens_per_sec_per_core"];
    println!(
        "raw AES-256-GCM open of {} B per core: ring {:.0}/s, rustcrypto {:.0}/s",
        raw["bytes"],
        raw["ring"].as_f64().unwrap_or(0.0),
        raw["rustcrypto"].as_f64().unwrap_or(0.0)
    );
    for (k, v) in r["ratios"].as_object().into_iter().flatten() {
        if let Some(x) = v.as_f64() {
            println!("ratio {k}: {x:.3}");
        }
    }
}
