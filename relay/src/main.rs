//! `shroud-relay`: the Shroud relay daemon.
//!
//! ```text
//! shroud-relay --config /etc/shroud/relay.toml [--verify-config]
//! ```
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad configuration (config file,
//! key files, peer list).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    shroud_relay::cli::main_with(std::env::args_os())
}
