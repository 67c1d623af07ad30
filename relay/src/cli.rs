//! The `shroud-relay` command line (the binary's `main` is a one-line call to
//! [`main_with`]).
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad configuration (config file,
//! key files, peer list).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Config, EX_CONFIG};
use crate::daemon::{self, Daemon, StartError};

/// The Shroud relay daemon: forwards constant-size onion cells with thread-per-core
/// io_uring workers.
#[derive(Debug, Parser)]
#[command(
    name = "shroud-relay",
    version,
    after_help = "Signals: SIGHUP reloads the peer list and onion keys, SIGINT drains (refuses new circuits, waits up to 30 s), SIGTERM stops.\nExit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad configuration."
)]
struct Args {
    /// Configuration file (TOML; deploy/relay.toml shows every key).
    #[arg(short, long, default_value = "/etc/shroud/relay.toml")]
    config: PathBuf,
    /// Check the configuration, key files and peer list, print a summary, and exit.
    #[arg(long)]
    verify_config: bool,
}

/// The command-line grammar (for man pages and shell completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// Runs the relay daemon with command-line `args` (the first item is the program
/// name), exactly as the `shroud-relay` binary does; returns its exit code. The
/// benchmark runs relays through this too, so both run the same code.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            crate::logging::fatal(format_args!("configuration error: {e}"));
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    #[cfg(feature = "bench-no-crypto")]
    if cfg.io.crypto == crate::spec::CryptoChoice::None
        && std::env::var("SHROUD_BENCH_NO_CRYPTO").as_deref() != Ok("I-understand-this-is-insecure")
    {
        crate::logging::fatal(format_args!("configuration error: io.crypto = \"none\" forwards cells without encryption or authentication; it is for shroud-bench's baseline only"));
        return ExitCode::from(EX_CONFIG as u8);
    }
    crate::logging::init(&cfg.log.level, cfg.log.format);

    if args.verify_config {
        if let Some(p) = cfg.metrics.bearer_token_file.as_deref() {
            if let Err(e) = crate::metrics::read_token(p) {
                crate::logging::fatal(format_args!("configuration error: {e:#}"));
                return ExitCode::from(EX_CONFIG as u8);
            }
        }
        return match daemon::load(&cfg) {
            Ok(l) => {
                let warnings = daemon::warnings(&cfg, &l);
                for w in &warnings {
                    eprintln!("shroud-relay: warning: {w}");
                }
                println!(
                    "configuration OK{}: relay {} with {} worker(s) on {:?} ports {}-{}; peer list serial {} with {} relays (CELL={}, H_MAX={}); {}",
                    if warnings.is_empty() {
                        String::new()
                    } else {
                        format!(" with {} warning(s)", warnings.len())
                    },
                    l.identity.public().relay_id(),
                    cfg.network.workers,
                    cfg.network.listen,
                    cfg.network.base_port,
                    cfg.network.base_port as usize + cfg.network.workers - 1,
                    l.peers.serial,
                    l.peers.relays.len(),
                    l.peers.params.cell,
                    l.peers.params.h_max,
                    if cfg.exit_policy().is_exit() { "exit" } else { "not an exit" },
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                crate::logging::fatal(format_args!("configuration error: {e:#}"));
                ExitCode::from(EX_CONFIG as u8)
            }
        };
    }

    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let daemon = match Daemon::start(cfg.clone()) {
        Ok(d) => d,
        Err(StartError::Config(e)) => {
            crate::logging::fatal(format_args!("configuration error: {e:#}"));
            return ExitCode::from(EX_CONFIG as u8);
        }
        Err(StartError::Runtime(e)) => {
            crate::logging::fatal(format_args!("{e:#}"));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = daemon::forward_signals(events_tx.clone()) {
        crate::logging::fatal(format_args!("cannot install signal handlers: {e:#}"));
        return ExitCode::FAILURE;
    }
    if let Err(e) =
        daemon::serve_admin(&cfg.admin.socket, events_tx.clone(), daemon.admin_refused())
    {
        crate::logging::fatal(format_args!("{e:#}"));
        return ExitCode::FAILURE;
    }
    if let Some(addr) = cfg.metrics.listen {
        let token = match cfg.metrics.bearer_token_file.as_deref() {
            None => {
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "the metrics endpoint listens beyond loopback without a bearer token (metrics.bearer_token_file)");
                }
                None
            }
            Some(p) => match crate::metrics::read_token(p) {
                Ok(t) => Some(t),
                Err(e) => {
                    crate::logging::fatal(format_args!("configuration error: {e:#}"));
                    return ExitCode::from(EX_CONFIG as u8);
                }
            },
        };
        if let Err(e) = crate::metrics::serve_metrics(addr, daemon.stats(), token) {
            crate::logging::fatal(format_args!("{e:#}"));
            return ExitCode::FAILURE;
        }
    }
    match daemon.run(events_rx) {
        Ok(()) => {
            let _ = std::fs::remove_file(&cfg.admin.socket);
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::logging::fatal(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
