//! `shroud-bench`: Shroud's benchmark. See docs/BENCHMARKING.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use shroud_bench::{circuit, demo, flood, mixbench, proxybench, relaybench, report, setupbench};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shroud's benchmark: every figure next to a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A local Shroud network carrying traffic: relays, circuits, a sink; prints
    /// throughput, loss, latency and per-relay CPU, and stops everything it started.
    Demo {
        /// Relays to start (at least `hops`).
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// Hops per circuit.
        #[arg(long, default_value_t = 3)]
        hops: usize,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Offered cells per second (0 = as many as the network takes).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Cell size in bytes (a network parameter).
        #[arg(long, default_value_t = 1024)]
        cell: u16,
        /// Circuits (entry, middle and exit rotate over the relays).
        #[arg(long, default_value_t = 6)]
        circuits: usize,
        /// Most cells in flight (sent but not yet at the sink): more raises
        /// throughput up to saturation, and latency with it.
        #[arg(long, default_value_t = 1024)]
        window: u64,
        /// Third octet of the loopback block the relays use (127.0.NET.x).
        #[arg(long, default_value_t = 60)]
        net: u8,
        /// MiB of cells to seal before the clock starts, so that the relays are
        /// measured and not the client's sealing (at most a third of the available
        /// memory; 0 = seal live). When they run out, the rest of the time runs with
        /// live sealing, reported separately.
        #[arg(long, default_value_t = 2048)]
        preseal_mb: u64,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw the latency CDF into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Circuit setups one relay core handles (setup cells built ahead, sent in
    /// windows), against a bare X25519 and an Elligator2 decode + X25519 timed in the
    /// same run.
    Setups {
        /// Setups per round.
        #[arg(long, default_value_t = 3000)]
        setups: usize,
        /// Setups sent at once (at most the relay's per-batch budget, 16).
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Rounds (fresh setups each; medians reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Third octet of the loopback block (127.0.NET.x).
        #[arg(long, default_value_t = 99)]
        net: u8,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Throughput of ONE relay (generator -> relay -> sink), with the no-crypto
    /// forwarder, the per-datagram path and raw AES-GCM measured in the same run.
    Relay {
        /// Seconds per variant.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Relay workers (one pinned core each).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Cell size in bytes.
        #[arg(long, default_value_t = 1024)]
        cell: u16,
        /// Cells per drain round.
        #[arg(long, default_value_t = 8192)]
        round_cells: usize,
        /// Variants to run: ring, none, per-datagram, rustcrypto, zero-copy, the bare
        /// forwarder baselines bare and bare-none, and any of them prefixed veth- for
        /// the wire-like path (network namespaces and a veth pair; root). Default: all
        /// loopback ones, and veth-ring and veth-bare when root.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// The relay's `[io] batch_wait_us` (gathering while small datagrams come in; 0 = never).
        #[arg(long, default_value_t = 50)]
        batch_wait_us: u32,
        /// The relay's `[io] recv_slots` (receive buffers; default: the relay's).
        #[arg(long)]
        recv_slots: Option<usize>,
        /// Most cells in flight in the veth variants' rounds (sent, not yet at the
        /// sink); a veth's receive ring holds 256 frames, more overflows it.
        #[arg(long, default_value_t = 128)]
        window: u64,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// End to end through N hops: offered-load sweep (delivered rate and latency),
    /// added latency per hop at 50% of saturation, circuit setups per second.
    Circuit {
        /// Relays to start (at least `hops`).
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// Hops per circuit (at least 2).
        #[arg(long, default_value_t = 3)]
        hops: usize,
        /// Total seconds, split over the steps.
        #[arg(long, default_value_t = 18.0)]
        duration: f64,
        /// Cell size in bytes.
        #[arg(long, default_value_t = 1024)]
        cell: u16,
        /// Circuits.
        #[arg(long, default_value_t = 6)]
        circuits: usize,
        /// Most cells in flight in the saturation step.
        #[arg(long, default_value_t = 1024)]
        window: u64,
        /// Third octet of the loopback block the relays use (127.0.NET.x).
        #[arg(long, default_value_t = 70)]
        net: u8,
        /// MiB of cells to seal before each step's clock starts, at most (a third of
        /// the available memory at most; 0 = seal live).
        #[arg(long, default_value_t = 2048)]
        preseal_mb: u64,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw delivered-vs-offered and the latency CDF into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Mix mode against a passive timing observer: for each mean delay, the
    /// observer's accuracy matching cells out to cells in (FIFO and best match) against
    /// chance, the entropy of its guess, the added latency and the relays' CPU per cell
    /// against plain circuits (delay 0) in the same run.
    Mix {
        /// Relays to start (at least `hops`).
        #[arg(long, default_value_t = 1)]
        relays: usize,
        /// Hops per circuit (1: the observer watches one relay's links).
        #[arg(long, default_value_t = 1)]
        hops: usize,
        /// Concurrent circuits.
        #[arg(long, default_value_t = 100)]
        circuits: usize,
        /// Cells a second entering, all circuits together (Poisson arrivals).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Seconds of traffic per mean delay.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Mean delays per hop to measure, ms (0: plain circuits, the baseline).
        #[arg(long, value_delimiter = ',', default_value = "0,1,2,5,10,20,50")]
        delays: Vec<u16>,
        /// Third octet of the loopback block the relays use (127.0.NET.x; the
        /// saturation step uses NET+1).
        #[arg(long, default_value_t = 97)]
        net: u8,
        /// Mean delay (ms) per hop of the saturation step, which offers the plain
        /// circuits' saturation rate to plain and to mixed circuits (0 skips it).
        #[arg(long, default_value_t = 5)]
        saturation_delay: u16,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw the observer's accuracy and the added latency against the mean delay
        /// into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The demo's traffic under a garbage flood at the relays, against the same flood
    /// at a sink in the same run; from 1 and 256 sources, started before and after
    /// the circuits are built.
    Flood {
        /// Seconds of traffic per case (8 cases).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Flood datagrams per second, all sources together.
        #[arg(long, default_value_t = 90000)]
        rate: u64,
        /// Circuits of 3 hops.
        #[arg(long, default_value_t = 6)]
        circuits: usize,
        /// Most cells in flight.
        #[arg(long, default_value_t = 1024)]
        window: u64,
        /// Flood source counts to run (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "1,256")]
        sources: Vec<usize>,
        /// Third octet of the loopback block the relays use (127.0.NET.x).
        #[arg(long, default_value_t = 66)]
        net: u8,
        /// The relays' `[io] batch_wait_us` (gathering while small datagrams come in; 0 = never).
        #[arg(long, default_value_t = 50)]
        batch_wait_us: u32,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One TCP stream through shroud-proxy (SOCKS5, QUIC over 3 hops, stream gateway)
    /// against direct loopback TCP in the same run: MB/s and time to first byte; then
    /// parallel streams on one circuit each.
    Proxy {
        /// Bytes per stream.
        #[arg(long, default_value_t = 100_000_000)]
        size: u64,
        /// Single-stream runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Streams at once in the parallel step (0 skips it).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Third octet of the loopback block the relays use (127.0.NET.x).
        #[arg(long, default_value_t = 96)]
        net: u8,
        /// The relays' I/O driver: auto, uring or mmsg.
        #[arg(long, default_value = "auto")]
        driver: String,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) Run the bare forwarder (`relay`'s baseline): LISTEN TO CELL BODY CPU,
    /// BODY 0 for no crypto, CPU `-` for no pinning.
    #[command(name = "__forward", hide = true)]
    Forward {
        listen: std::net::SocketAddr,
        to: std::net::SocketAddr,
        cell: usize,
        body: usize,
        cpu: String,
    },
    /// (internal) Run a relay with the same code as shroud-relay.
    #[command(name = "__relay", hide = true, disable_help_flag = true)]
    RelayProcess {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// A flag that SIGINT (Ctrl-C) and SIGTERM set, so a run ends early but still
/// reports and tears down everything it started.
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("shroud-bench: cannot handle signals: {e}");
        }
    }
    stop
}

/// Prints a report and writes the JSON and SVG files that were asked for.
fn emit(
    r: &serde_json::Value,
    print: fn(&serde_json::Value),
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> anyhow::Result<()> {
    print(r);
    if let Some(p) = json {
        report::write_json(&p, r)?;
    }
    if let Some(p) = plot {
        shroud_bench::plot::plot(&p, r)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Forward {
            listen,
            to,
            cell,
            body,
            cpu,
        } => {
            let work = match body {
                0 => shroud_bench::forward::Work::Nothing,
                body => shroud_bench::forward::Work::Open { body },
            };
            shroud_bench::forward::run(listen, to, cell, work, cpu.parse().ok())
        }
        Cmd::RelayProcess { args } => {
            let mut all = vec!["shroud-relay".to_string()];
            all.extend(args);
            return shroud_relay::cli::main_with(all);
        }
        Cmd::Demo {
            relays,
            hops,
            duration,
            rate,
            cell,
            circuits,
            window,
            net,
            preseal_mb,
            json,
            plot,
        } => {
            let stop = stop_on_signals();
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let opts = demo::Opts {
                preseal_mb,
                relays,
                hops,
                duration,
                rate,
                cell,
                circuits,
                window,
                progress,
                net,
            };
            demo::run(&opts, &stop).and_then(|r| emit(&r, demo::print, json, plot))
        }
        Cmd::Circuit {
            relays,
            hops,
            duration,
            cell,
            circuits,
            window,
            net,
            preseal_mb,
            json,
            plot,
        } => {
            let stop = stop_on_signals();
            let opts = circuit::Opts {
                preseal_mb,
                relays,
                hops,
                duration,
                cell,
                circuits,
                window,
                net,
            };
            circuit::run(&opts, &stop).and_then(|r| emit(&r, circuit::print, json, plot))
        }
        Cmd::Mix {
            relays,
            hops,
            circuits,
            rate,
            seconds,
            delays,
            net,
            saturation_delay,
            json,
            plot,
        } => {
            let stop = stop_on_signals();
            let opts = mixbench::Opts {
                saturation_delay,
                relays,
                hops,
                circuits,
                rate,
                seconds,
                delays,
                net,
            };
            mixbench::run(&opts, &stop).and_then(|r| emit(&r, mixbench::print, json, plot))
        }
        Cmd::Proxy {
            size,
            runs,
            parallel,
            net,
            driver,
            json,
        } => {
            let opts = proxybench::Opts {
                size,
                runs: runs.max(1),
                parallel,
                net,
                driver,
            };
            proxybench::run(&opts).and_then(|r| emit(&r, proxybench::print, json, None))
        }
        Cmd::Flood {
            duration,
            rate,
            circuits,
            window,
            sources,
            net,
            batch_wait_us,
            json,
        } => {
            let stop = stop_on_signals();
            let opts = flood::Opts {
                batch_wait_us,
                duration,
                rate,
                circuits,
                window,
                net,
                sources,
            };
            flood::run(&opts, &stop).and_then(|r| emit(&r, flood::print, json, None))
        }
        Cmd::Setups {
            setups,
            window,
            rounds,
            net,
            json,
        } => {
            let opts = setupbench::Opts {
                setups,
                window,
                rounds,
                net,
            };
            setupbench::run(&opts).and_then(|r| emit(&r, setupbench::print, json, None))
        }
        Cmd::Relay {
            duration,
            workers,
            cell,
            round_cells,
            variants,
            batch_wait_us,
            recv_slots,
            window,
            json,
        } => {
            let opts = relaybench::Opts {
                batch_wait_us,
                recv_slots,
                window,
                duration,
                workers,
                cell,
                round_cells,
                variants,
            };
            relaybench::run(&opts).and_then(|r| emit(&r, relaybench::print, json, None))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shroud-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
