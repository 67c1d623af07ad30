//! The benchmarks' local networks, started by the project's one launcher
//! ([`shroud_localnet::LocalNet`], which the integration tests use too): one relay
//! process per [`RelaySpec`] on `127.0.<net>.<i+1>`, all files in a temporary
//! directory, torn down (processes killed, files removed) when the [`LocalNet`] is
//! dropped. Relay processes also die with the benchmark (`PR_SET_PDEATHSIG`), so an
//! interrupted or killed benchmark leaves none behind.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use shroud_localnet::{NetSetup, Program, RelaySetup};

pub use shroud_localnet::{LocalNet, Virtual};

/// How to start relay processes.
#[derive(Debug, Clone)]
pub enum RelayCommand {
    /// The `shroud-relay` binary at this path.
    Binary(PathBuf),
    /// This benchmark binary in its hidden `__relay` mode (same library code).
    SelfExe,
}

/// One relay of the network.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// Workers.
    pub workers: usize,
    /// CPUs to pin the workers to (empty = no pinning).
    pub cpus: Vec<usize>,
    /// `ring`, `rustcrypto` or `none`.
    pub crypto: String,
    /// GRO/GSO on.
    pub gro_gso: bool,
    /// SENDMSG_ZC sends.
    pub zero_copy_send: bool,
    /// Exit policy rules.
    pub exit_policy: Vec<String>,
    /// Setups per second (and burst) per source prefix. The default is far above the
    /// shipped 200/400, so that one generator can measure setup rates; the flood
    /// benchmark uses the shipped values.
    pub setup_rate: u32,
    /// `[io] batch_wait_us` (the relay's default is 50).
    pub batch_wait_us: u32,
    /// I/O driver (`auto`, `uring`, `mmsg`).
    pub driver: String,
    /// `[io] recv_slots` (None: the relay's default).
    pub recv_slots: Option<usize>,
    /// A command prefix the relay runs under (e.g. `ip netns exec NS`); empty: none.
    pub launcher: Vec<String>,
    /// Further `[limits]` settings (name, value).
    pub limits: Vec<(&'static str, i64)>,
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            workers: 1,
            cpus: Vec::new(),
            crypto: "ring".into(),
            gro_gso: true,
            zero_copy_send: false,
            exit_policy: vec!["accept 127.0.0.0/8:*".into()],
            setup_rate: 100000,
            batch_wait_us: 50,
            driver: "auto".into(),
            recv_slots: None,
            launcher: Vec::new(),
            limits: Vec::new(),
        }
    }
}

/// Finds `shroud-relay` next to this executable, building it first when run by cargo.
pub fn relay_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no executable directory"))?;
    let bin = dir.join("shroud-relay");
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "shroud-relay",
            "--bin",
            "shroud-relay",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .context("cannot run cargo to build shroud-relay")?;
        if !status.success() {
            bail!("building shroud-relay failed");
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p shroud-relay`",
            bin.display()
        );
    }
    Ok(bin)
}

impl RelaySpec {
    fn setup(&self, addr: IpAddr) -> RelaySetup {
        let mut s = RelaySetup::new(addr);
        s.workers = self.workers;
        s.launcher = self.launcher.clone();
        s.exit_policy = self.exit_policy.clone();
        let cpus: Vec<toml::Value> = self.cpus.iter().map(|&c| (c as i64).into()).collect();
        s.set("network", "cpus", cpus)
            .set("network", "socket_buffer_bytes", 16_777_216)
            .set("limits", "setup_rate", i64::from(self.setup_rate))
            .set(
                "limits",
                "setup_burst",
                i64::from(self.setup_rate.saturating_mul(2)),
            )
            .set("io", "driver", self.driver.as_str())
            .set("io", "crypto", self.crypto.as_str())
            .set("io", "gro_gso", self.gro_gso)
            .set("io", "zero_copy_send", self.zero_copy_send)
            .set("io", "batch_wait_us", i64::from(self.batch_wait_us))
            .set("log", "level", "warn");
        if let Some(n) = self.recv_slots {
            s.set("io", "recv_slots", n as i64);
        }
        for &(name, value) in &self.limits {
            s.set("limits", name, value);
        }
        s
    }
}

/// Creates keys, the peer list (including `virtuals`, relays this process plays
/// itself) and one process per spec in `relays`, relay `i` on `127.0.<net>.<i+1>`
/// ports `9000..`, and waits until every relay answers on its admin socket.
pub fn start(
    net: u8,
    relays: &[RelaySpec],
    virtuals: &[&Virtual],
    cmd: &RelayCommand,
    cell: u16,
) -> anyhow::Result<LocalNet> {
    let addrs: Vec<IpAddr> = (0..relays.len())
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, net, i as u8 + 1)))
        .collect();
    start_at(&addrs, relays, virtuals, cmd, cell)
}

/// As [`start`], relay `i` on `addrs[i]`.
pub fn start_at(
    addrs: &[IpAddr],
    relays: &[RelaySpec],
    virtuals: &[&Virtual],
    cmd: &RelayCommand,
    cell: u16,
) -> anyhow::Result<LocalNet> {
    let setups = relays.iter().zip(addrs).map(|(r, &a)| r.setup(a)).collect();
    let program = match cmd {
        RelayCommand::Binary(b) => Program::Binary(b.clone()),
        RelayCommand::SelfExe => Program::SelfExe("__relay".into()),
    };
    let mut setup = NetSetup::new(setups, program);
    setup.virtuals = virtuals.to_vec();
    setup.cell = cell;
    setup.tag = "shroud-bench".into();
    setup.die_with_parent = true;
    setup.env = vec![(
        "SHROUD_BENCH_NO_CRYPTO".into(),
        "I-understand-this-is-insecure".into(),
    )];
    Ok(LocalNet::start(setup)?)
}
