//! Harness for integration tests that run real `shroud-relay` processes.
//!
//! [`TestNet::start`] starts a local network through the project's one launcher,
//! [`shroud_localnet::LocalNet`] (the benchmarks use it too): an authority key,
//! per-relay identity and onion keys (files with mode 0600), a signed peer list, one
//! TOML config per relay in a temporary directory, and one `shroud-relay` process per
//! relay on its own loopback address `127.0.<net>.<i+1>` (so tests running in parallel
//! never share addresses), each answering `status` on its admin socket before
//! `start` returns. Every process is killed when the [`TestNet`] is dropped, also when
//! a test panics. A `TestNet` derefs to its [`LocalNet`] (relays, list, authority,
//! files); its own methods panic with the relay's log where a test cannot go on.
//!
//! The relay binary is found next to the test executable's `deps` directory (cargo
//! builds it for the workspace tests), or at `$SHROUD_RELAY_BIN`; `shroudctl` the
//! same way ([`shroudctl_bin`], `$SHROUDCTL_BIN`).
//!
//! Options: [`NetOpts::onion_key_dir`] gives each relay an onion key directory
//! (`relay<i>/keys`, the layout `shroudctl daemon` keeps) instead of key files, and
//! [`NetOpts::metrics`] serves Prometheus metrics on `127.0.<net>.<i+1>:9478`, and
//! [`NetOpts::list_valid_for`] sets how long the peer list stays valid. Each relay
//! keeps its peer-list rollback state in `relay<i>/peer-list.serial`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use rand_core::OsRng;
use serde_json::Value;
use shroud_client::{Client, PathHop};
use shroud_localnet::{LocalNet, NetSetup, Program, RelaySetup};
use shroud_proto::keys::RelayId;
use shroud_proto::peerlist::PeerList;

pub use shroud_localnet::{now_s, RelayProc};

/// Options of a test network.
#[derive(Debug, Clone)]
pub struct NetOpts {
    /// Third octet of the loopback addresses (unique per test).
    pub net: u8,
    /// Relays.
    pub relays: usize,
    /// Workers per relay.
    pub workers: usize,
    /// I/O driver (`auto`, `uring`, `mmsg`).
    pub driver: &'static str,
    /// Send with SENDMSG_ZC (io_uring driver).
    pub zero_copy_send: bool,
    /// UDP GRO and GSO (`[io] gro_gso`, default true).
    pub gro_gso: bool,
    /// Exit policy of every relay.
    pub exit_policy: Vec<String>,
    /// Setup rate per source per second.
    pub setup_rate: u32,
    /// Setup burst per source.
    pub setup_burst: u32,
    /// Onion keys from a key directory (`relay<i>/keys/onion-<T>.key`,
    /// `relay.onion_key_dir`) instead of `relay.onion_keys`.
    pub onion_key_dir: bool,
    /// Serve metrics on `<relay address>:9478`.
    pub metrics: bool,
    /// Seconds from the start until the peer list expires (default one hour).
    pub list_valid_for: u64,
    /// Client links one source prefix may hold (default: the whole table, 256).
    pub links_per_prefix: u32,
    /// Circuits one source prefix may hold (default: the whole table, 1024).
    pub circuits_per_prefix: u32,
    /// Setups per second given public-key work from addresses with no link, all
    /// together, per worker (default 250); beyond it they get a RETRY.
    pub newcomer_setup_rate: u32,
    /// Seconds without a forward cell after which a circuit is expired (default 300).
    pub circuit_idle_secs: u64,
    /// Seconds after which a link with no circuits is forgotten (default 600).
    pub link_idle_secs: u64,
    /// Cells a worker can originate at once (`[io] tx_cells`, default 1024).
    pub tx_cells: usize,
    /// Receive buffers per worker (`[io] recv_slots`, default 16).
    pub recv_slots: usize,
    /// Client setups given public-key work per receive batch (`[io] setup_budget`,
    /// default 16).
    pub setup_budget: u32,
    /// Relay `i`'s address (default, when empty: `127.0.<net>.<i+1>`).
    pub addrs: Vec<IpAddr>,
    /// A command relay `i` is started under, e.g. `["ip", "netns", "exec", NAME]`
    /// (default, when empty: none).
    pub launchers: Vec<Vec<String>>,
    /// Further listen addresses of relay `i`, after its peer-list address (default,
    /// when empty: none).
    pub more_listen: Vec<Vec<IpAddr>>,
    /// Largest mean mix delay (ms) a relay offers (`[mix] max_mean_delay_ms`,
    /// default 2000; 0: no mix mode).
    pub mix_max_mean_ms: u16,
    /// Cells a worker can hold for their mix delay (`[mix] queue_cells`, default
    /// 1024).
    pub mix_queue_cells: usize,
    /// Constant-rate links (`[mix] link_cells_per_sec`, default 0: off).
    pub link_cells_per_sec: u32,
}

impl NetOpts {
    /// `relays` one-worker relays on `127.0.<net>.x`, exits to loopback.
    pub fn new(net: u8, relays: usize) -> Self {
        NetOpts {
            net,
            relays,
            workers: 1,
            driver: "auto",
            zero_copy_send: false,
            gro_gso: true,
            exit_policy: vec!["accept 127.0.0.0/8:*".into()],
            setup_rate: 200,
            setup_burst: 400,
            onion_key_dir: false,
            metrics: false,
            list_valid_for: 3600,
            links_per_prefix: 256,
            circuits_per_prefix: 1024,
            newcomer_setup_rate: 250,
            circuit_idle_secs: 300,
            link_idle_secs: 600,
            tx_cells: 1024,
            recv_slots: 16,
            setup_budget: 16,
            addrs: Vec::new(),
            launchers: Vec::new(),
            more_listen: Vec::new(),
            mix_max_mean_ms: 2000,
            mix_queue_cells: 1024,
            link_cells_per_sec: 0,
        }
    }
}

/// A running test network (see the crate docs).
#[derive(Debug)]
pub struct TestNet {
    net: LocalNet,
    opts: NetOpts,
}

impl std::ops::Deref for TestNet {
    type Target = LocalNet;
    fn deref(&self) -> &LocalNet {
        &self.net
    }
}

impl std::ops::DerefMut for TestNet {
    fn deref_mut(&mut self) -> &mut LocalNet {
        &mut self.net
    }
}

/// Path of the `shroud-relay` binary.
pub fn relay_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHROUD_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("shroud-relay");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p shroud-relay` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// Path of the `shroudctl` binary: next to `shroud-relay` (see [`relay_bin`]), or
/// at `$SHROUDCTL_BIN`. Cargo builds it for the workspace tests because
/// shroud-control has integration tests.
pub fn shroudctl_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHROUDCTL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("shroudctl");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p shroud-control` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// Writes a secret key file with mode 0600.
pub fn write_key(path: &Path, secret: &[u8; 32]) {
    shroud_localnet::write_key(path, secret).expect("write key file");
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let mut r = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut r);
    let d = std::env::temp_dir().join(format!("shroud-{tag}-{}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

impl NetOpts {
    /// Relay `i`'s launch settings: the test limits (small tables so that tests
    /// can fill them), this network's `[io]` choices and info-level logs.
    fn relay_setup(&self, i: usize) -> RelaySetup {
        let addr = self
            .addrs
            .get(i)
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::new(127, 0, self.net, i as u8 + 1)));
        let mut s = RelaySetup::new(addr);
        s.workers = self.workers;
        s.exit_policy = self.exit_policy.clone();
        s.onion_key_dir = self.onion_key_dir;
        s.more_listen = self.more_listen.get(i).cloned().unwrap_or_default();
        s.launcher = self.launchers.get(i).cloned().unwrap_or_default();
        s.metrics = self.metrics.then(|| SocketAddr::new(addr, 9478));
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        s.set("network", "socket_buffer_bytes", 4_194_304)
            .set("limits", "max_circuits", 1024)
            .set("limits", "max_links", 256)
            .set(
                "limits",
                "links_per_prefix",
                int(self.links_per_prefix.into()),
            )
            .set(
                "limits",
                "circuits_per_prefix",
                int(self.circuits_per_prefix.into()),
            )
            .set(
                "limits",
                "newcomer_setup_rate",
                int(self.newcomer_setup_rate.into()),
            )
            .set("limits", "circuit_idle_secs", int(self.circuit_idle_secs))
            .set("limits", "link_idle_secs", int(self.link_idle_secs))
            .set("limits", "setup_rate", int(self.setup_rate.into()))
            .set("limits", "setup_burst", int(self.setup_burst.into()))
            .set("limits", "exit_sockets", 256)
            .set("io", "driver", self.driver)
            .set("io", "zero_copy_send", self.zero_copy_send)
            .set("io", "gro_gso", self.gro_gso)
            .set("io", "recv_slots", int(self.recv_slots as u64))
            .set("io", "send_slots", 128)
            .set("io", "tx_cells", int(self.tx_cells as u64))
            .set("io", "setup_budget", int(self.setup_budget.into()))
            .set("mix", "max_mean_delay_ms", i64::from(self.mix_max_mean_ms))
            .set("mix", "queue_cells", int(self.mix_queue_cells as u64))
            .set(
                "mix",
                "link_cells_per_sec",
                i64::from(self.link_cells_per_sec),
            );
        s
    }
}

impl TestNet {
    /// Starts the network and waits until every relay answers; panics (with the
    /// relay's log) if one does not.
    pub fn start(opts: NetOpts) -> TestNet {
        let relays = (0..opts.relays).map(|i| opts.relay_setup(i)).collect();
        let mut setup = NetSetup::new(relays, Program::Binary(relay_bin()));
        setup.list_valid_for = opts.list_valid_for;
        setup.env = vec![("SHROUD_LOG".into(), "info".into())];
        setup.tag = format!("shroud-net{}", opts.net);
        let net = LocalNet::start(setup).unwrap_or_else(|e| panic!("test network: {e}"));
        TestNet { net, opts }
    }

    /// (Re)writes relay `i`'s config with these onion key files (newest first), or
    /// with `onion_key_dir = "keys"` (ignoring `onion_files`) when the network uses
    /// key directories.
    pub fn write_config(&self, i: usize, onion_files: &[&str]) {
        self.net
            .write_config(i, onion_files)
            .unwrap_or_else(|e| panic!("relay {i}'s config: {e}"));
    }

    /// Starts relay `i`'s process without waiting for it (see [`TestNet::restart`]
    /// to wait until it answers, [`LocalNet::wait_exit`] for one that should fail).
    pub fn spawn(&mut self, i: usize) {
        self.net
            .spawn(i)
            .unwrap_or_else(|e| panic!("spawn relay {i}: {e}"));
    }

    /// Sends one admin command to relay `i` and returns the reply.
    pub fn admin(&self, i: usize, req: Value) -> Value {
        try_admin(&self.relays[i].admin, &req)
            .unwrap_or_else(|| panic!("relay {i} admin socket did not answer {req}"))
    }

    /// Sum of drop counter `reason` over relay `i`'s workers. Panics if the relay
    /// reports no such counter (a renamed counter must fail the test, not read 0).
    pub fn drops(&self, i: usize, reason: &str) -> u64 {
        let s = self.admin(i, serde_json::json!({"cmd": "status"}));
        s["result"]["drops"][reason]
            .as_u64()
            .unwrap_or_else(|| panic!("relay {i} reports no drop counter {reason:?}: {s}"))
    }

    /// Sum of worker counter `name` (a field of the `status` document's
    /// `workers[].stats`, e.g. `setup_dh`) over relay `i`'s workers. Panics if a
    /// worker reports no such counter.
    pub fn worker_stat(&self, i: usize, name: &str) -> u64 {
        let s = self.admin(i, serde_json::json!({"cmd": "status"}));
        let workers = s["result"]["workers"]
            .as_array()
            .unwrap_or_else(|| panic!("relay {i} reports no workers: {s}"));
        workers
            .iter()
            .map(|w| {
                w["stats"][name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("relay {i} reports no worker counter {name:?}: {s}"))
            })
            .sum()
    }

    /// Live circuits at relay `i`, over all its workers.
    pub fn circuits(&self, i: usize) -> u64 {
        let s = self.admin(i, serde_json::json!({"cmd": "status"}));
        s["result"]["circuits"]
            .as_u64()
            .unwrap_or_else(|| panic!("relay {i} reports no circuit count: {s}"))
    }

    /// Kills relay `i` (SIGKILL) and starts it again with the same files; returns when
    /// it answers on its admin socket.
    pub fn restart(&mut self, i: usize) {
        self.net
            .restart(i)
            .unwrap_or_else(|e| panic!("restart relay {i}: {e}"));
    }

    /// A client bound to `127.0.<net>.200:0`.
    pub fn client(&self) -> Client {
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, self.opts.net, 200)), 0);
        Client::new(bind, &self.list).expect("client")
    }

    /// A path through relays `idx` (in order), each at its first port.
    pub fn path(&self, idx: &[usize]) -> Vec<PathHop> {
        let ids: Vec<RelayId> = idx.iter().map(|&i| self.relays[i].id).collect();
        shroud_client::path_from_ids(&self.list, &ids, now_s()).expect("path")
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) to relay `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        let n = match sig.trim_start_matches("SIG") {
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "TERM" => libc::SIGTERM,
            "KILL" => libc::SIGKILL,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            other => panic!("unknown signal {other:?}"),
        };
        self.net.signal(i, n);
    }

    /// Replaces the network's peer list (normalized and signed by the authority)
    /// on disk and in [`LocalNet::list`]; relays see it at their next reload.
    pub fn set_list(&mut self, list: PeerList) {
        self.net.set_list(list).expect("write the peer list");
    }
}

/// One admin request over a Unix socket, `None` if the socket does not answer.
pub fn try_admin(path: &Path, req: &Value) -> Option<Value> {
    shroud_localnet::admin_line(path, &req.to_string()).ok()
}
