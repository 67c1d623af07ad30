//! `shroud-bench setups`: circuit setups one relay core handles, against a bare X25519
//! measured in the same run.
//!
//! Method: one relay process (one worker, pinned to the last core, not an exit) is
//! the first hop of 2-hop circuits whose second hop is a relay of the peer list that
//! this process plays (the sink). A first circuit is built end to end so that the
//! generator's link to the relay exists; then the sink only counts. The generator
//! builds `setups` setup cells ahead of time (its own public-key work is not timed) and
//! sends them in windows of `window` (at most the relay's per-batch setup budget),
//! waiting for each window to reach the sink (each accepted setup leaves the relay as
//! one setup cell to the next hop). The relay's CPU time over the whole blast divided
//! by the setups it accepted is its cost per setup; `1e6 /` that is setups per second
//! per relay core. Baselines, timed in this process on the relay's core (while the
//! relay idles) right before each round: one X25519 (`x25519-dalek`, what a setup
//! cannot avoid) and one Elligator2 decode plus X25519 (what PROTOCOL.md's setup
//! requires of a hop before any symmetric work). The two vCPUs of a VM need not run at
//! the same speed (their host cores have other tenants), so the baseline is timed
//! where the relay runs, and each round is compared with its own baseline.
//! Rounds: `rounds` blasts, each with fresh cells; medians of the per-round figures
//! and ratios reported.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand_core::OsRng;
use serde_json::{json, Value};
use shroud_proto::aead::RingAead;
use shroud_proto::client::PathHop;
use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::Layout;

use crate::flow::{Generator, SinkRelay};
use crate::net::{RelayCommand, RelaySpec, Virtual};
use crate::report::{machine, median, time_us, worker_sum};

/// Options of `shroud-bench setups`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Setups per round.
    pub setups: usize,
    /// Setups sent before waiting for them to reach the next hop.
    pub window: usize,
    /// Rounds.
    pub rounds: usize,
    /// Loopback block (127.0.NET.x).
    pub net: u8,
}

/// The baselines, microseconds: a bare X25519 (x25519-dalek's ladder), the same
/// X25519 on the Edwards form (what the relay computes since 2026-12-04,
/// `OnionSecret::diffie_hellman_checked_fast`), and the Elligator2 decode plus that
/// X25519 (`relay_agree`, all a setup's public-key work).
pub(crate) fn baselines(budget: Duration) -> (f64, f64, f64) {
    let secret = OnionSecret::generate(&mut OsRng);
    let peer = *OnionSecret::generate(&mut OsRng).public().as_bytes();
    let bare = time_us(budget, 20, || {
        std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&peer)));
    });
    let edwards = time_us(budget, 20, || {
        let _ =
            std::hint::black_box(secret.diffie_hellman_checked_fast(std::hint::black_box(&peer)));
    });
    let reps: Vec<[u8; 32]> = (0..64)
        .map(|_| shroud_proto::setup::Ephemeral::generate(&mut OsRng).representative)
        .collect();
    let mut k = 0;
    let decode = time_us(budget, 20, || {
        k = (k + 1) % reps.len();
        std::hint::black_box(shroud_proto::setup::relay_agree(&secret, &reps[k]));
    });
    (bare, edwards, decode)
}

/// [`baselines`] on a thread pinned to `cpu` (if any).
fn baselines_on(cpu: Option<usize>, budget: Duration) -> anyhow::Result<(f64, f64, f64)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(c) = cpu {
                let mut set = nix::sched::CpuSet::new();
                set.set(c)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    .context("pinning the baseline thread")?;
            }
            Ok(baselines(budget))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline thread panicked"))?
    })
}

/// Runs the benchmark; returns the report.
pub fn run(opts: &Opts) -> anyhow::Result<Value> {
    anyhow::ensure!(
        opts.setups > 0 && opts.rounds > 0,
        "setups and rounds must be positive"
    );
    anyhow::ensure!(
        (1..=16).contains(&opts.window),
        "the window must be 1 to 16 (the relay's per-batch setup budget)"
    );
    let layout = Layout::default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = if cores > 1 {
        vec![cores - 1]
    } else {
        Vec::new()
    };
    let relay_cpu = cpus.first().copied();
    let n = opts.net;
    let relay_ip: IpAddr = Ipv4Addr::new(127, 0, n, 1).into();
    let gen_ip: IpAddr = Ipv4Addr::new(127, 0, n, 150).into();
    let sink = Virtual {
        identity: IdentityKey::generate(&mut OsRng),
        onion: OnionSecret::generate(&mut OsRng),
        addr: SocketAddr::from(([127, 0, n, 200], 9100)),
    };
    let total = (opts.setups * opts.rounds + 16) as i64;
    let spec = RelaySpec {
        cpus,
        exit_policy: Vec::new(),
        setup_rate: 1_000_000,
        limits: vec![
            ("max_circuits", total),
            ("circuits_per_prefix", total),
            ("setup_filter_capacity", total.max(65536)),
        ],
        ..RelaySpec::default()
    };
    let net = crate::net::start_at(
        &[relay_ip],
        &[spec],
        &[&sink],
        &RelayCommand::SelfExe,
        layout.cell as u16,
    )?;
    let peers = shroud_relay::daemon::peers_of(&net.list);
    let sink_sock =
        UdpSocket::bind(sink.addr).with_context(|| format!("cannot bind {}", sink.addr))?;
    let sink_relay = SinkRelay::start_on::<RingAead>(sink_sock, &sink, peers, layout)?;
    let gen_sock = UdpSocket::bind(SocketAddr::new(gen_ip, 0))?;
    let mut generator = Generator::with_socket(gen_sock, layout)?;
    let r = &net.relays[0];
    let hop = PathHop {
        id: r.id,
        onion: net
            .list
            .relay_by_id(&r.id)
            .context("relay in list")?
            .onion_keys[0]
            .key,
        addr: SocketAddr::new(r.addr, r.ports.0),
    };
    let path = [
        hop,
        PathHop {
            id: sink.identity.public().relay_id(),
            onion: sink.onion.public(),
            addr: sink.addr,
        },
    ];
    let dest = SocketAddr::new(gen_ip, 9);
    generator
        .build::<RingAead>(&path, &[], dest, Duration::from_secs(5))
        .with_context(|| format!("the warm-up circuit; relay log: {}", net.log(0)))?;
    sink_relay.count();
    let (mut cpu_us, mut rates, mut lost) = (Vec::new(), Vec::new(), 0u64);
    let (mut bares, mut decodes, mut shares, mut decode_shares) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut edwardses, mut edwards_shares) = (Vec::new(), Vec::new());
    let mut accepted_total = 0u64;
    for _ in 0..opts.rounds {
        let (bare, edwards, decode) = baselines_on(relay_cpu, Duration::from_millis(400))?;
        let mut cells = Vec::new();
        generator.setup_cells::<RingAead>(&path, dest, opts.setups, &mut cells)?;
        let before = worker_sum(&net.request(0, &shroud_admin::Request::Status)?, "setups");
        let cpu0 = net.cpu_seconds(0);
        let started = Instant::now();
        let mut sent = sink_relay.cells.load(std::sync::atomic::Ordering::Relaxed);
        for window in cells.chunks(opts.window * layout.cell) {
            let k = (window.len() / layout.cell) as u64;
            sink_relay.arm(sent + k);
            for c in window.chunks_exact(layout.cell) {
                generator.sock.send_to(c, hop.addr)?;
            }
            let deadline = Instant::now() + Duration::from_millis(200);
            while sink_relay.reached().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(50));
            }
            sent = sink_relay.cells.load(std::sync::atomic::Ordering::Relaxed);
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = net.cpu_seconds(0) - cpu0;
        let accepted =
            worker_sum(&net.request(0, &shroud_admin::Request::Status)?, "setups") - before;
        anyhow::ensure!(
            accepted > 0,
            "the relay accepted no setup; its log: {}",
            net.log(0)
        );
        lost += opts.setups as u64 - accepted.min(opts.setups as u64);
        accepted_total += accepted;
        let per_setup = cpu * 1e6 / accepted as f64;
        cpu_us.push(per_setup);
        rates.push(accepted as f64 / wall);
        bares.push(bare);
        decodes.push(decode);
        edwardses.push(edwards);
        edwards_shares.push(edwards / per_setup);
        shares.push(bare / per_setup);
        decode_shares.push(decode / per_setup);
    }
    let per_setup = median(&mut cpu_us.clone());
    let status = net.request(0, &shroud_admin::Request::Status)?;
    Ok(json!({
        "schema": "shroud-bench/setups/1",
        "setups_per_round": opts.setups,
        "rounds": opts.rounds,
        "window": opts.window,
        "accepted": accepted_total,
        "not_accepted": lost,
        "relay_cpu_us_per_setup": per_setup,
        "relay_cpu_us_per_setup_rounds": cpu_us,
        "setups_per_sec_per_relay_core": 1e6 / per_setup.max(1e-9),
        "setups_per_sec_wall": median(&mut rates),
        "relay_cpu": relay_cpu,
        "bare_x25519_us": median(&mut bares.clone()),
        "bare_x25519_us_rounds": bares,
        "x25519_edwards_us": median(&mut edwardses.clone()),
        "x25519_edwards_us_rounds": edwardses,
        // The same against the X25519 the relay itself computes (Edwards form).
        "share_of_x25519_edwards": median(&mut edwards_shares.clone()),
        "share_of_x25519_edwards_rounds": edwards_shares,
        "decode_and_x25519_us": median(&mut decodes.clone()),
        "decode_and_x25519_us_rounds": decodes,
        // Per round, its baseline over its relay CPU per setup; the median of those.
        // 1.0 would mean the relay spends nothing on a setup beyond one X25519.
        "share_of_bare_x25519": median(&mut shares.clone()),
        "share_of_bare_x25519_rounds": shares,
        "share_of_decode_and_x25519": median(&mut decode_shares.clone()),
        "relay_drops": status["workers"][0]["stats"]["drops"].clone(),
        "machine": machine(),
    }))
}

/// Prints the human summary.
pub fn print(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "shroud-bench setups: {} rounds of {} setups, windows of {}; {} accepted, {} not",
        r["rounds"], r["setups_per_round"], r["window"], r["accepted"], r["not_accepted"]
    );
    println!(
        "relay CPU per setup {:.1} us (rounds {}): {:.0} setups/s per relay core ({:.0}/s wall)",
        f("relay_cpu_us_per_setup"),
        r["relay_cpu_us_per_setup_rounds"],
        f("setups_per_sec_per_relay_core"),
        f("setups_per_sec_wall")
    );
    println!(
        "baselines on the relay's core before each round: bare X25519 (x25519-dalek ladder) {:.1} us {}, the same on the Edwards form (the relay's) {:.1} us, Elligator2 decode + that X25519 {:.1} us",
        f("bare_x25519_us"),
        r["bare_x25519_us_rounds"],
        f("x25519_edwards_us"),
        f("decode_and_x25519_us")
    );
    println!(
        "ratio relay_vs_bare_x25519: {:.3} (rounds {})\nratio relay_vs_x25519_edwards: {:.3} (rounds {})\nratio relay_vs_decode_and_x25519: {:.3}",
        f("share_of_bare_x25519"),
        r["share_of_bare_x25519_rounds"],
        f("share_of_x25519_edwards"),
        r["share_of_x25519_edwards_rounds"],
        f("share_of_decode_and_x25519")
    );
}
