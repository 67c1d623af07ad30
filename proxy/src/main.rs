//! `shroud-proxy`: the SOCKS5 proxy (`run`), the stream gateway (`gateway`), the
//! gateway's certificate (`gen-cert`) and the operator's probe (`probe`).

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shroud_proto::keys::RelayId;
use shroud_proxy::config::{GatewayConfig, ProxyConfig};
use shroud_proxy::gateway::{GatewayStats, StreamRules};
use shroud_proxy::pool::Pool;
use shroud_proxy::socks::{Socks, SocksStats};
use shroud_proxy::{frag, probe, tls};

/// Exit code for a bad configuration (sysexits EX_CONFIG), as the relay.
const EX_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "shroud-proxy",
    version,
    about = "SOCKS5 through Shroud circuits, its stream gateway, and a path probe"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the local SOCKS5 proxy.
    Run {
        /// The proxy's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration (and the peer list) and exit.
        #[arg(long)]
        verify_config: bool,
    },
    /// Runs the stream gateway beside an exit relay.
    Gateway {
        /// The gateway's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration and exit.
        #[arg(long)]
        verify_config: bool,
    },
    /// Makes the gateway's self-signed certificate and key; prints the SHA-256 the
    /// proxies pin (`[gateway] cert_sha256`).
    GenCert {
        /// Certificate output (DER).
        #[arg(long)]
        cert: PathBuf,
        /// Key output (PKCS#8 DER, mode 0600).
        #[arg(long)]
        key: PathBuf,
    },
    /// Prints the SHA-256 of a certificate (DER).
    Fingerprint {
        /// The certificate.
        cert: PathBuf,
    },
    /// Builds a circuit through named relays and reports setup times, echo
    /// round-trip times and loss through it to a stream gateway.
    Probe {
        /// A proxy configuration (peer list, authorities, gateway address).
        #[arg(long)]
        config: PathBuf,
        /// Relay ids (hex), first hop first, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        via: Vec<String>,
        /// Echo requests to send.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Milliseconds between echo requests.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Milliseconds to wait for a setup, and for replies after the last request.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHROUD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shroud-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("shroud-proxy: bad configuration: {e}");
    ExitCode::from(EX_CONFIG)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            config,
            verify_config,
        } => {
            let cfg = match ProxyConfig::load(&config, now_s()) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(e)),
            };
            if verify_config {
                println!(
                    "configuration OK ({} relays in the peer list)",
                    cfg.list.relays.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            runtime()?.block_on(proxy_main(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gateway {
            config,
            verify_config,
        } => {
            let cfg = match GatewayConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(e)),
            };
            if verify_config {
                println!("configuration OK");
                return Ok(ExitCode::SUCCESS);
            }
            runtime()?.block_on(gateway_main(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenCert { cert, key } => {
            let (c, k) = tls::generate_cert()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("{}", key.display()))?;
            std::io::Write::write_all(&mut f, &k)?;
            std::fs::write(&cert, &c).with_context(|| format!("{}", cert.display()))?;
            println!("{}", tls::fingerprint(&c));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fingerprint { cert } => {
            let c = std::fs::read(&cert).with_context(|| format!("{}", cert.display()))?;
            println!("{}", tls::fingerprint(&c));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Probe {
            config,
            via,
            count,
            interval_ms,
            timeout_ms,
            json,
        } => {
            let cfg = match ProxyConfig::load(&config, now_s()) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(e)),
            };
            let ids = via
                .iter()
                .map(|s| s.trim().parse::<RelayId>())
                .collect::<Result<Vec<_>, _>>()
                .context("--via: relay ids are 32 hex digits")?;
            let path = shroud_client::path_from_ids(&cfg.list, &ids, now_s())?;
            let report = probe::probe(
                &cfg.list,
                cfg.file.proxy.bind,
                &path,
                cfg.file.gateway.addr,
                count,
                Duration::from_millis(interval_ms),
                Duration::from_millis(timeout_ms),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.received > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn proxy_main(cfg: ProxyConfig) -> anyhow::Result<()> {
    let listen = cfg.file.proxy.listen;
    let metrics = cfg.file.proxy.metrics;
    let streams = cfg.file.streams.clone();
    let pool = Pool::new(Arc::new(cfg))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("SOCKS listen address {listen}"))?;
    tracing::info!(%listen, "SOCKS5 proxy listening");
    let socks = Arc::new(Socks {
        pool: pool.clone(),
        stats: SocksStats::default(),
        attempts: streams.attempts,
        answer_timeout: Duration::from_secs(streams.answer_timeout_secs),
        handshake_timeout: Duration::from_secs(streams.handshake_timeout_secs),
        udp_destinations: streams.udp_destinations,
        isolate_destination: streams.isolate_destination,
    });
    {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.fill().await;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                pool.sweep();
                pool.fill().await;
            }
        });
    }
    if let Some(addr) = metrics {
        let (socks, pool) = (socks.clone(), pool.clone());
        let bound = shroud_proxy::metrics::serve(
            addr,
            Arc::new(move || {
                shroud_proxy::metrics::proxy_text(
                    &socks.stats,
                    &pool.stats,
                    pool.dead_relays().len(),
                )
            }),
        )
        .await?;
        tracing::info!(metrics = %bound, "metrics endpoint listening");
    }
    {
        let (socks, pool) = (socks.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STATS_EVERY).await;
                log_proxy_stats(&socks, &pool);
            }
        });
    }
    tokio::select! {
        _ = socks.clone().serve(listener) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
    }
    log_proxy_stats(&socks, &pool);
    Ok(())
}

/// How often the proxy and the gateway log their counters.
const STATS_EVERY: Duration = Duration::from_secs(60);

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

fn log_proxy_stats(socks: &Socks, pool: &Pool) {
    let s = &socks.stats;
    let p = &pool.stats;
    let replies: Vec<u64> = s.replies.iter().map(load).collect();
    tracing::info!(
        connections = load(&s.connections),
        bad_input = load(&s.bad_input),
        replies = ?replies,
        udp_out = load(&s.udp_out),
        udp_in = load(&s.udp_in),
        udp_dropped = load(&s.udp_dropped),
        circuits_built = load(&p.built),
        circuit_build_failures = load(&p.build_failures),
        circuits_died = load(&p.died),
        relays_found_dead = load(&p.relays_dead),
        relays_avoided = pool.dead_relays().len(),
        "counters (replies: per SOCKS reply code 0-8)"
    );
}

fn log_gateway_stats(s: &GatewayStats) {
    let status: Vec<u64> = s.status.iter().map(load).collect();
    tracing::info!(
        streams = load(&s.streams),
        status = ?status,
        echoes = load(&s.echoes),
        "counters (status: per answer code 0-8)"
    );
}

async fn gateway_main(cfg: GatewayConfig) -> anyhow::Result<()> {
    let g = &cfg.file.gateway;
    let max_packet = u16::try_from(frag::max_packet(g.max_datagram))?;
    let idle = Duration::from_millis(g.idle_timeout_ms);
    let server = tls::server_config(cfg.cert.clone(), cfg.key.clone(), max_packet, idle)?;
    let stats = Arc::new(GatewayStats::default());
    let listen: SocketAddr = g.listen;
    let endpoint = shroud_proxy::gateway::endpoint(listen, g.max_datagram, server, stats.clone())
        .with_context(|| format!("gateway listen address {listen}"))?;
    tracing::info!(%listen, fingerprint = %tls::fingerprint(&cfg.cert), "stream gateway listening");
    let rules = Arc::new(StreamRules {
        policy: cfg.policy.clone(),
        connect_timeout: Duration::from_secs(g.connect_timeout_secs),
    });
    if let Some(addr) = g.metrics {
        let st = stats.clone();
        let bound = shroud_proxy::metrics::serve(
            addr,
            Arc::new(move || shroud_proxy::metrics::gateway_text(&st)),
        )
        .await?;
        tracing::info!(metrics = %bound, "metrics endpoint listening");
    }
    {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STATS_EVERY).await;
                log_gateway_stats(&stats);
            }
        });
    }
    tokio::select! {
        _ = shroud_proxy::gateway::serve(endpoint, rules, stats.clone()) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
    }
    log_gateway_stats(&stats);
    Ok(())
}
