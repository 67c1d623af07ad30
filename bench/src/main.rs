//! `shroud-bench`: Shroud's benchmark. See docs/BENCHMARKING.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shroud_bench::{relaybench, report};

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
        /// Variants to run (ring, none, per-datagram, rustcrypto); default all.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) Run a relay with the same code as shroud-relay.
    #[command(name = "__relay", hide = true, disable_help_flag = true)]
    RelayProcess {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::RelayProcess { args } => {
            let mut all = vec!["shroud-relay".to_string()];
            all.extend(args);
            return shroud_relay::cli::main_with(all);
        }
        Cmd::Relay {
            duration,
            workers,
            cell,
            round_cells,
            variants,
            json,
        } => {
            let opts = relaybench::Opts {
                duration,
                workers,
                cell,
                round_cells,
                variants,
            };
            relaybench::run(&opts).and_then(|r| {
                relaybench::print(&r);
                if let Some(p) = json {
                    report::write_json(&p, &r)?;
                }
                Ok(())
            })
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
