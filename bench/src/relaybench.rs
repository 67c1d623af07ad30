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
//! Variants, each a fresh process pinned to the last core: `ring` with GRO/GSO (the
//! product), `none` (the same relay with the cell AEAD replaced by a no-op: the
//! no-crypto forwarder), `per-datagram` (ring, GRO/GSO off: one datagram per cell in
//! and out), `rustcrypto`, `zero-copy` (ring with SENDMSG_ZC), and the baselines
//! `bare` and `bare-none`: the bare forwarder ([`crate::forward`]: GRO in, one ring
//! AES-256-GCM open per cell or none, GSO out), this machine's ceiling. Any variant
//! prefixed `veth-` runs over the wire-like path of [`crate::veth`] (its own network
//! namespace behind a veth pair, single frames in) instead of loopback; there the
//! figure that says what an operator's NIC path costs is the core CPU per cell (the
//! process plus its NAPI thread), since the kernel's receive work happens on the NAPI
//! thread, partly while the forwarder is stopped. Raw AES-256-GCM opens per core are
//! measured in-process.

use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand_core::OsRng;
use serde_json::{json, Value};
use shroud_proto::aead::{nonce_for, Aead, RingAead, RustCryptoAead};
use shroud_proto::client::PathHop;
use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::Layout;

use crate::flow::{Generator, SinkRelay};
use crate::forward::Work;
use crate::net::{LocalNet, RelayCommand, RelaySpec, Virtual};
use crate::report::{machine, median, worker_sum};
use crate::veth::VethPair;
use shroud_localnet::{cpu_seconds, die_with_parent, launch_command};

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
    /// Most cells in flight in the veth variants' rounds.
    pub window: u64,
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

/// Where the forwarder under test runs.
#[derive(Debug, Clone, Copy)]
enum Place<'a> {
    /// On loopback, `127.0.<net>.x`.
    Loopback(u8),
    /// In its own namespace behind a veth pair, on this address of it (a fresh one
    /// per variant: a relay's io_uring may hold its socket a while after it exits).
    Veth(&'a VethPair, Ipv4Addr),
}

/// The forwarder under test: a relay process or the bare forwarder's.
enum Dut {
    Relay(Box<LocalNet>),
    Bare(Child),
}

impl Dut {
    fn pid(&self) -> u32 {
        match self {
            Dut::Relay(net) => net.pids().first().copied().unwrap_or(0),
            Dut::Bare(c) => c.id(),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid();
        if pid > 0 {
            // SAFETY: kill(2) on our own child; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }
}

impl Drop for Dut {
    fn drop(&mut self) {
        if let Dut::Bare(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Busy CPU seconds (everything but idle and iowait) of `cpus` from /proc/stat.
fn busy_seconds(cpus: &[usize]) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut ticks = 0u64;
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        let Some(n) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !cpus.contains(&n) {
            continue;
        }
        let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal ...
        let busy: u64 = v.iter().take(8).sum::<u64>()
            - v.get(3).copied().unwrap_or(0)
            - v.get(4).copied().unwrap_or(0)
            - v.get(7).copied().unwrap_or(0);
        ticks += busy;
    }
    ticks as f64 / shroud_relay::sys::clock_ticks() as f64
}

/// Starts the bare forwarder listening on `listen`, forwarding to `to`.
fn start_bare(
    listen: SocketAddr,
    to: SocketAddr,
    cell: usize,
    work: Work,
    cpu: Option<usize>,
    launcher: &[String],
) -> anyhow::Result<Child> {
    let mut cmd = launch_command(launcher, &std::env::current_exe()?);
    cmd.arg("__forward")
        .arg(listen.to_string())
        .arg(to.to_string())
        .arg(cell.to_string())
        .arg(
            match work {
                Work::Nothing => 0,
                Work::Open { body } => body,
            }
            .to_string(),
        )
        .arg(cpu.map_or("-".to_string(), |c| c.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting the bare forwarder")?;
    let mut line = String::new();
    let out = child.stdout.take().context("forwarder stdout")?;
    std::io::BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the bare forwarder did not start (see its error above)");
    }
    Ok(child)
}

/// How a round offers its cells.
#[derive(Debug, Clone, Copy)]
enum Method {
    /// Stop the forwarder, queue the whole round in its socket buffers, resume it and
    /// time until the sink has everything (loopback: the forwarder's own rate).
    Drain,
    /// Leave it running and send the round in GSO sends of up to 64 cells with at most
    /// this many cells in flight (sent, not yet at the sink), timing from the first
    /// send to the last cell at the sink. Over a device, the receive work must happen
    /// while the forwarder runs, as from a NIC: a stopped forwarder would let its NAPI
    /// thread take every frame alone, and GRO would never coalesce.
    Window(u64),
}

/// One round's cells, per destination.
type Round = Vec<(SocketAddr, Vec<u8>)>;

/// What the rounds measured.
#[derive(Debug, Default)]
struct Rounds {
    rates: Vec<f64>,
    lost: u64,
    timed: Duration,
    forwarded: u64,
}

/// Runs rounds for the configured duration (at least three): `fill` (re)fills the
/// round's cells per destination outside the timed window, `method` offers them.
fn rounds(
    opts: &Opts,
    method: Method,
    dut: &Dut,
    sock: &UdpSocket,
    sink: &SinkRelay,
    cell: usize,
    fill: &mut dyn FnMut(&mut Round) -> anyhow::Result<()>,
) -> anyhow::Result<Rounds> {
    let mut d = Rounds::default();
    let mut round: Round = Vec::new();
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed().as_secs_f64() < opts.duration || done < 3 {
        done += 1;
        fill(&mut round)?;
        let base = sink.cells.load(Relaxed);
        let total: usize = round.iter().map(|(_, b)| b.len() / cell).sum();
        let t0;
        let queued = match method {
            Method::Drain => {
                dut.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(5));
                let mut queued = 0usize;
                for (to, b) in &round {
                    queued += crate::flow::gso_send(sock, *to, b, cell);
                }
                std::thread::sleep(Duration::from_millis(10));
                sink.arm(base + queued as u64);
                t0 = Instant::now();
                dut.signal(libc::SIGCONT);
                queued
            }
            Method::Window(w) => {
                sink.arm(base + total as u64);
                t0 = Instant::now();
                let mut sent = 0usize;
                let mut offsets = vec![0usize; round.len()];
                let chunk = 64 * cell;
                let deadline = t0 + Duration::from_secs(3);
                while sent < total && Instant::now() < deadline {
                    let arrived = sink.cells.load(Relaxed) - base;
                    if sent as u64 >= arrived + w {
                        std::thread::sleep(Duration::from_micros(20));
                        continue;
                    }
                    for ((to, b), off) in round.iter().zip(offsets.iter_mut()) {
                        if *off < b.len() {
                            let end = (*off + chunk).min(b.len());
                            crate::flow::gso_send(sock, *to, &b[*off..end], cell);
                            sent += (end - *off) / cell;
                            *off = end;
                        }
                    }
                }
                sent
            }
        };
        let deadline = t0 + Duration::from_secs(3);
        while sink.reached().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        let got = sink.cells.load(Relaxed) - base;
        d.forwarded += got;
        match sink.reached() {
            Some(t1) if queued == total => {
                let dt = t1 - t0;
                d.timed += dt;
                d.rates.push(queued as f64 / dt.as_secs_f64());
            }
            _ => {
                // Cells were lost (socket buffer or device ring overflow, or drops):
                // counted as loss, the round as 3 s.
                d.lost += (total as u64).saturating_sub(got);
                d.timed += Duration::from_secs(3);
                // Let stragglers arrive before the next round's count starts.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(d)
}

fn run_variant(opts: &Opts, name: &str, cell: Layout, place: Place<'_>) -> anyhow::Result<Value> {
    let base = name.strip_prefix("veth-").unwrap_or(name);
    if base == "none" || base == "bare-none" {
        run_variant_with::<shroud_proto::aead::NullAead>(opts, name, cell, place)
    } else {
        run_variant_with::<RingAead>(opts, name, cell, place)
    }
}

/// One variant; `A` is the AEAD of the generator and the sink (a no-op for the
/// no-crypto variant, whose relay runs without cell crypto too).
fn run_variant_with<A: Aead>(
    opts: &Opts,
    name: &str,
    cell: Layout,
    place: Place<'_>,
) -> anyhow::Result<Value> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let base = name.strip_prefix("veth-").unwrap_or(name);
    let (crypto, gro_gso, zero_copy_send) = match base {
        "ring" | "bare" => ("ring", true, false),
        "none" | "bare-none" => ("none", true, false),
        "per-datagram" => ("ring", false, false),
        "rustcrypto" => ("rustcrypto", true, false),
        "zero-copy" => ("ring", true, true),
        other => bail!("unknown variant {other}"),
    };
    let bare = base.starts_with("bare");
    // Pin the forwarder to the last cores; the generator and sink use the rest.
    let cpus: Vec<usize> = if cores > opts.workers {
        (cores - opts.workers..cores).collect()
    } else {
        Vec::new()
    };
    let (fwd_ip, gen_ip): (IpAddr, IpAddr) = match place {
        Place::Loopback(n) => (
            Ipv4Addr::new(127, 0, n, 1).into(),
            Ipv4Addr::new(127, 0, n, 150).into(),
        ),
        Place::Veth(_, a) => (a.into(), crate::veth::GEN_ADDR.into()),
    };
    let sink = Virtual {
        identity: IdentityKey::generate(&mut OsRng),
        onion: OnionSecret::generate(&mut OsRng),
        addr: match place {
            Place::Loopback(n) => SocketAddr::from(([127, 0, n, 200], 9100)),
            Place::Veth(..) => SocketAddr::new(gen_ip, 9100),
        },
    };
    // The generator's and the sink's sockets, in the generator's namespace.
    let bind = |a: SocketAddr| -> anyhow::Result<UdpSocket> {
        match place {
            Place::Loopback(_) => UdpSocket::bind(a).with_context(|| format!("cannot bind {a}")),
            Place::Veth(v, _) => crate::veth::in_netns(&v.gen_ns, move || UdpSocket::bind(a)),
        }
    };
    let gen_sock = bind(SocketAddr::new(gen_ip, 0))?;
    let sink_sock = bind(sink.addr)?;
    let launcher = match place {
        Place::Loopback(_) => Vec::new(),
        Place::Veth(v, _) => v.launcher(),
    };
    let mut generator = Generator::with_socket(gen_sock, cell)?;
    let (dut, sink_relay, mut fill): (Dut, SinkRelay, Box<Filler>) = if bare {
        let work = if crypto == "none" {
            Work::Nothing
        } else {
            Work::Open {
                body: cell.forward_sealed_len(),
            }
        };
        let listen = SocketAddr::new(fwd_ip, 9000);
        let child = start_bare(
            listen,
            sink.addr,
            cell.cell,
            work,
            cpus.first().copied(),
            &launcher,
        )?;
        let sink_relay = SinkRelay::start_on::<A>(sink_sock, &sink, Vec::new(), cell)?;
        sink_relay.count();
        let mut cells = Vec::new();
        crate::forward::seal_cells(work, cell.cell, opts.round_cells, &mut cells)?;
        let mut cells = Some(cells);
        let fill: Box<Filler> = Box::new(move |_g, round| {
            if let Some(c) = cells.take() {
                round.push((listen, c));
            }
            Ok(())
        });
        (Dut::Bare(child), sink_relay, fill)
    } else {
        let spec = RelaySpec {
            workers: opts.workers,
            cpus: cpus.clone(),
            crypto: crypto.into(),
            gro_gso,
            zero_copy_send,
            exit_policy: Vec::new(),
            batch_wait_us: opts.batch_wait_us,
            recv_slots: opts.recv_slots,
            launcher,
            ..RelaySpec::default()
        };
        let net = crate::net::start_at(
            &[fwd_ip],
            &[spec],
            &[&sink],
            &RelayCommand::SelfExe,
            opts.cell,
        )?;
        let peers = shroud_relay::daemon::peers_of(&net.list);
        let sink_relay = SinkRelay::start_on::<A>(sink_sock, &sink, peers, cell)?;
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
                        SocketAddr::new(gen_ip, 9),
                        Duration::from_secs(5),
                    )
                    .with_context(|| {
                        format!(
                            "relay status: {}; its log: {}",
                            net.request(0, &shroud_admin::Request::Status)
                                .map(|s| s["drops"].to_string())
                                .unwrap_or_default(),
                            net.log(0)
                        )
                    })?;
                circuits.push(c);
            }
        }
        sink_relay.count();
        let payload = cell.payload_max();
        let per_circuit = opts.round_cells.div_ceil(circuits.len());
        let fill: Box<Filler> = Box::new(move |g, round| {
            round.resize_with(circuits.len(), || (circuits[0].first, Vec::new()));
            for ((to, b), c) in round.iter_mut().zip(circuits.iter_mut()) {
                *to = c.first;
                b.clear();
                g.seal(c, per_circuit, payload, b)?;
            }
            Ok(())
        });
        (Dut::Relay(Box::new(net)), sink_relay, fill)
    };
    let napi = |place: Place<'_>| match place {
        Place::Veth(v, _) => v.fwd_napi_cpu_seconds(),
        Place::Loopback(_) => 0.0,
    };
    let (cpu0, napi0, busy0) = (cpu_seconds(dut.pid()), napi(place), busy_seconds(&cpus));
    let sock = generator.sock.try_clone()?;
    let method = match place {
        Place::Loopback(_) => Method::Drain,
        Place::Veth(..) => Method::Window(opts.window),
    };
    let d = rounds(
        opts,
        method,
        &dut,
        &sock,
        &sink_relay,
        cell.cell,
        &mut |round| fill(&mut generator, round),
    )?;
    let cpu = cpu_seconds(dut.pid()) - cpu0;
    let napi_cpu = napi(place) - napi0;
    let busy = busy_seconds(&cpus) - busy0;
    let (drops, send_errors, recv_errors, ring_empty, driver, cells_per_datagram) = match &dut {
        Dut::Relay(net) => {
            let status = net.request(0, &shroud_admin::Request::Status)?;
            let datagrams = worker_sum(&status, "datagrams_rx");
            (
                status["drops"].clone(),
                json!(worker_sum(&status, "send_errors")),
                json!(worker_sum(&status, "recv_errors")),
                json!(worker_sum(&status, "recv_ring_empty")),
                status["workers"][0]["stats"]["driver"].clone(),
                json!(worker_sum(&status, "cells_rx") as f64 / datagrams.max(1) as f64),
            )
        }
        Dut::Bare(_) => (
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            json!("recvmmsg-gro/sendmmsg-gso"),
            Value::Null,
        ),
    };
    let mut rates = d.rates;
    let rounds = rates.len();
    let med = median(&mut rates);
    let per_cell = |secs: f64| secs * 1e9 / d.forwarded.max(1) as f64;
    Ok(json!({
        "variant": name,
        "forwarder": if bare { "bare" } else { "relay" },
        "path": match place { Place::Loopback(_) => "loopback", Place::Veth(..) => "veth" },
        "method": match method { Method::Drain => json!("drain"), Method::Window(w) => json!({"window": w}) },
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
        "lost_cells": d.lost,
        "relay_cpu_seconds": cpu,
        // CPU the forwarder's process spent per cell it forwarded (all rounds, setup
        // included).
        "relay_cpu_ns_per_cell": per_cell(cpu),
        // The same plus the kernel's receive work on its NAPI thread (veth only): what
        // one cell costs the forwarder's core.
        "napi_cpu_seconds": napi_cpu,
        "core_cpu_ns_per_cell": per_cell(cpu + napi_cpu),
        // Busy time of the forwarder's cores from /proc/stat over the same rounds
        // (includes anything else that ran there).
        "core_busy_ns_per_cell": per_cell(busy),
        // Share of the timed windows the relay's cores were busy.
        "relay_cpu_share_of_timed": if d.timed.as_secs_f64() > 0.0 { cpu / opts.workers as f64 / d.timed.as_secs_f64() } else { 0.0 },
        "relay_drops": drops,
        "relay_send_errors": send_errors,
        "relay_recv_errors": recv_errors,
        "relay_recv_ring_empty": ring_empty,
        // Cells per datagram the relay read: how much GRO coalesced.
        "relay_cells_per_datagram_rx": cells_per_datagram,
        "driver": driver,
    }))
}

/// Refills a round's cells (per destination) with the generator.
type Filler = dyn FnMut(&mut Generator, &mut Round) -> anyhow::Result<()>;

/// Runs the benchmark and returns the report.
pub fn run(opts: &Opts) -> anyhow::Result<Value> {
    let layout = shroud_proto::peerlist::NetworkParams {
        cell: opts.cell,
        ..Default::default()
    }
    .layout()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let restore = raise_buffer_limits(64 << 20);
    let body = layout.forward_sealed_len();
    let dur = Duration::from_millis(500);
    let raw = json!({
        "ring": raw_aead::<RingAead>(body, dur),
        "rustcrypto": raw_aead::<RustCryptoAead>(body, dur),
        "bytes": body,
    });
    let mut variants = Vec::new();
    let names: Vec<String> = if opts.variants.is_empty() {
        let mut v = vec![
            "ring",
            "none",
            "per-datagram",
            "rustcrypto",
            "zero-copy",
            "bare",
            "bare-none",
        ];
        // The wire-like path needs root (namespaces, devices).
        if nix::unistd::geteuid().is_root() {
            v.extend(["veth-ring", "veth-bare"]);
        } else {
            eprintln!("note: not root, so the veth variants are left out");
        }
        v.iter().map(|s| s.to_string()).collect()
    } else {
        opts.variants.clone()
    };
    let result = (|| -> anyhow::Result<()> {
        let mut veth: Option<VethPair> = None;
        for (i, v) in names.iter().enumerate() {
            eprintln!("relay benchmark: variant {v} ({}/{})", i + 1, names.len());
            let place = if v.starts_with("veth-") {
                if veth.is_none() {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                    let fwd: Vec<usize> = (cores.saturating_sub(opts.workers)..cores).collect();
                    let gen: Vec<usize> = (0..cores.saturating_sub(opts.workers)).collect();
                    veth = Some(
                        VethPair::create(&fwd, &gen)
                            .context("setting up the veth pair (needs root and iproute2)")?,
                    );
                }
                let pair = veth.as_ref().context("veth pair")?;
                Place::Veth(pair, pair.add_fwd_addr(i as u8)?)
            } else {
                Place::Loopback(40 + i as u8)
            };
            variants.push(run_variant(opts, v, layout, place)?);
        }
        Ok(())
    })();
    for (p, v) in restore {
        let _ = std::fs::write(p, v);
    }
    result?;
    let get = |name: &str| {
        variants
            .iter()
            .find(|v| v["variant"] == name)
            .map(|v| v["cells_per_sec_per_core"].as_f64().unwrap_or(0.0))
    };
    // Core CPU per cell (lower is better).
    let get_cost = |name: &str| {
        variants
            .iter()
            .find(|v| v["variant"] == name)
            .and_then(|v| v["core_cpu_ns_per_cell"].as_f64())
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
            // The relay against the bare forwarder doing the same crypto: the goal is
            // 0.8 on both paths.
            "ring_vs_bare": ratio(get("ring"), get("bare")),
            "none_vs_bare_none": ratio(get("none"), get("bare-none")),
            "veth_ring_vs_veth_bare": ratio(get("veth-ring"), get("veth-bare")),
            "veth_ring_vs_veth_bare_core_cpu": ratio(get_cost("veth-bare"), get_cost("veth-ring")),
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
        "{:<14} {:>14} {:>10} {:>12} {:>14} {:>8} {:>10}",
        "variant", "cells/s/core", "Gbit/s", "ns/cell", "core CPU ns", "rounds", "lost"
    );
    for v in r["variants"].as_array().into_iter().flatten() {
        println!(
            "{:<14} {:>14.0} {:>10.2} {:>12.0} {:>14.0} {:>8} {:>10}",
            v["variant"].as_str().unwrap_or(""),
            v["cells_per_sec_per_core"].as_f64().unwrap_or(0.0),
            v["gbit_per_sec"].as_f64().unwrap_or(0.0) / v["workers"].as_f64().unwrap_or(1.0),
            v["ns_per_cell_per_core"].as_f64().unwrap_or(0.0),
            v["core_cpu_ns_per_cell"].as_f64().unwrap_or(0.0),
            v["rounds"].as_u64().unwrap_or(0),
            v["lost_cells"].as_u64().unwrap_or(0),
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
