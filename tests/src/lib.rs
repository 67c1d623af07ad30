//! Harness for integration tests that run real `shroud-relay` processes.
//!
//! [`TestNet::start`] generates an authority key, per-relay identity and onion keys
//! (files with mode 0600), a signed peer list, and one TOML config per relay in a
//! temporary directory; starts one `shroud-relay` process per relay on its own
//! loopback address `127.0.<net>.<i+1>` (so tests running in parallel never share
//! addresses); and waits until every relay answers `status` on its admin socket. Every
//! process is killed when the [`TestNet`] is dropped, also when a test panics.
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

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use serde_json::Value;
use shroud_client::{Client, PathHop};
use shroud_proto::keys::{encode_key, IdentityKey, OnionSecret, RelayId};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};

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
        }
    }
}

/// One relay process and its files.
#[derive(Debug)]
pub struct RelayProc {
    /// The process (None once killed).
    pub child: Option<Child>,
    /// Relay id.
    pub id: RelayId,
    /// Address.
    pub addr: IpAddr,
    /// Port range.
    pub ports: (u16, u16),
    /// Admin socket.
    pub admin: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Onion key file (the first in the config).
    pub onion_key: PathBuf,
    /// Second onion key slot file (for rotation tests).
    pub onion_key_next: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Identity key file.
    pub identity_key: PathBuf,
    /// Onion key directory (used when [`NetOpts::onion_key_dir`] is set; its first
    /// key is `onion-<start time - 60>.key`).
    pub key_dir: PathBuf,
    /// Metrics endpoint (when [`NetOpts::metrics`] is set).
    pub metrics: Option<SocketAddr>,
    /// Its peer-list rollback state (`relay.peer_list_state`).
    pub peer_list_state: PathBuf,
}

/// A running test network.
#[derive(Debug)]
pub struct TestNet {
    /// Temporary directory with every file.
    pub dir: PathBuf,
    /// The relays.
    pub relays: Vec<RelayProc>,
    /// The signed peer list.
    pub list: PeerList,
    /// Peer list file.
    pub list_path: PathBuf,
    /// The authority that signed it.
    pub authority: IdentityKey,
    opts: NetOpts,
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    f.write_all(encode_key(secret).as_bytes())
        .expect("write key");
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let mut r = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut r);
    let d = std::env::temp_dir().join(format!("shroud-{tag}-{}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

impl TestNet {
    /// Generates everything and starts the relays.
    pub fn start(opts: NetOpts) -> TestNet {
        let dir = temp_dir(&format!("net{}", opts.net));
        let authority = IdentityKey::generate(&mut OsRng);
        let now = now_s();
        let mut list = PeerList::new(
            1,
            now - 60,
            now + opts.list_valid_for,
            NetworkParams::default(),
        );
        let mut relays = Vec::new();
        let mut identities = Vec::new();
        for i in 0..opts.relays {
            let id = IdentityKey::generate(&mut OsRng);
            let onion = OnionSecret::generate(&mut OsRng);
            let addr = opts
                .addrs
                .get(i)
                .copied()
                .unwrap_or(IpAddr::V4(Ipv4Addr::new(127, 0, opts.net, i as u8 + 1)));
            let ports = (9000, 9000 + opts.workers as u16 - 1);
            let rdir = dir.join(format!("relay{i}"));
            std::fs::create_dir_all(&rdir).unwrap();
            write_key(&rdir.join("identity.key"), &id.to_bytes());
            write_key(&rdir.join("onion.key"), &onion.to_bytes());
            let key_dir = rdir.join("keys");
            if opts.onion_key_dir {
                std::fs::create_dir_all(&key_dir).unwrap();
                write_key(
                    &key_dir.join(format!("onion-{}.key", now - 60)),
                    &onion.to_bytes(),
                );
            }
            list.relays.push(RelayDescriptor {
                identity: id.public(),
                addr,
                ports,
                onion_keys: vec![OnionKeyEntry {
                    key: onion.public(),
                    valid_until: now + 7200,
                }],
                exit: !opts.exit_policy.is_empty(),
                weight: 100,
            });
            relays.push(RelayProc {
                child: None,
                id: id.public().relay_id(),
                addr,
                ports,
                admin: rdir.join("admin.sock"),
                config: rdir.join("relay.toml"),
                onion_key: rdir.join("onion.key"),
                onion_key_next: rdir.join("onion-next.key"),
                log: rdir.join("relay.log"),
                identity_key: rdir.join("identity.key"),
                key_dir,
                metrics: opts.metrics.then(|| SocketAddr::new(addr, 9478)),
                peer_list_state: rdir.join("peer-list.serial"),
            });
            identities.push(id);
        }
        list.normalize();
        list.sign(&authority).expect("sign peer list");
        let list_path = dir.join("peers.list");
        std::fs::write(&list_path, list.encode()).unwrap();
        let mut net = TestNet {
            dir,
            relays,
            list,
            list_path,
            authority,
            opts,
        };
        for i in 0..net.relays.len() {
            net.write_config(i, &["onion.key"]);
            net.spawn(i);
        }
        for i in 0..net.relays.len() {
            net.wait_ready(i);
        }
        net
    }

    /// (Re)writes relay `i`'s config with these onion key files (newest first), or
    /// with `onion_key_dir = "keys"` (ignoring `onion_files`) when the network uses
    /// key directories.
    pub fn write_config(&self, i: usize, onion_files: &[&str]) {
        let r = &self.relays[i];
        let policy: Vec<String> = self
            .opts
            .exit_policy
            .iter()
            .map(|p| format!("{p:?}"))
            .collect();
        let onion: Vec<String> = onion_files.iter().map(|f| format!("{f:?}")).collect();
        let onion_line = if self.opts.onion_key_dir {
            "onion_key_dir = \"keys\"".to_owned()
        } else {
            format!("onion_keys = [{}]", onion.join(", "))
        };
        let metrics = match r.metrics {
            Some(a) => format!("\n[metrics]\nlisten = \"{a}\"\n"),
            None => String::new(),
        };
        let text = format!(
            r#"[relay]
identity_key = "identity.key"
setup_journal = "setup.journal"
{onion_line}
peer_list = {list:?}
peer_list_state = "peer-list.serial"
authorities = [{auth:?}]
exit_policy = [{policy}]

[network]
listen = [{listen}]
base_port = {port}
workers = {workers}
socket_buffer_bytes = 4194304

[limits]
max_circuits = 1024
max_links = 256
links_per_prefix = {lpp}
circuits_per_prefix = {cpp}
newcomer_setup_rate = {newcomer}
circuit_idle_secs = {circuit_idle}
link_idle_secs = {link_idle}
setup_rate = {rate}
setup_burst = {burst}
exit_sockets = 256

[io]
driver = "{driver}"
zero_copy_send = {zc}
recv_slots = {recv_slots}
send_slots = 128
tx_cells = {tx_cells}
setup_budget = {setup_budget}

[admin]
socket = "admin.sock"
{metrics}"#,
            list = self.list_path.display().to_string(),
            auth = self.authority.public().to_base64(),
            policy = policy.join(", "),
            listen = std::iter::once(&r.addr)
                .chain(self.opts.more_listen.get(i).into_iter().flatten())
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            port = r.ports.0,
            workers = self.opts.workers,
            rate = self.opts.setup_rate,
            burst = self.opts.setup_burst,
            lpp = self.opts.links_per_prefix,
            cpp = self.opts.circuits_per_prefix,
            newcomer = self.opts.newcomer_setup_rate,
            circuit_idle = self.opts.circuit_idle_secs,
            link_idle = self.opts.link_idle_secs,
            tx_cells = self.opts.tx_cells,
            recv_slots = self.opts.recv_slots,
            setup_budget = self.opts.setup_budget,
            driver = self.opts.driver,
            zc = self.opts.zero_copy_send,
        );
        std::fs::write(&r.config, text).unwrap();
    }

    /// Starts relay `i`'s process without waiting for it (see [`TestNet::restart`]
    /// to wait until it answers, [`TestNet::wait_exit`] for one that should fail).
    pub fn spawn(&mut self, i: usize) {
        let r = &mut self.relays[i];
        let log = std::fs::File::create(&r.log).unwrap();
        let mut cmd = match self.opts.launchers.get(i).and_then(|l| l.split_first()) {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(relay_bin());
                c
            }
            None => Command::new(relay_bin()),
        };
        let child = cmd
            .arg("--config")
            .arg(&r.config)
            .env("SHROUD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shroud-relay");
        r.child = Some(child);
    }

    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = try_admin(&self.relays[i].admin, &serde_json::json!({"cmd": "status"}))
            {
                if v["ok"] == true {
                    return;
                }
            }
            if let Some(c) = self.relays[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "relay {i} exited with {status}: {}",
                        std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "relay {i} not ready: {}",
                std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
        self.kill(i);
        // The kernel tears a dead process's io_uring down asynchronously, and sockets
        // its in-flight operations hold stay bound until then: wait until every port
        // can be bound again.
        let r = &self.relays[i];
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in r.ports.0..=r.ports.1 {
            while std::net::UdpSocket::bind(SocketAddr::new(r.addr, port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "port {port} of relay {i} stays bound"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.spawn(i);
        self.wait_ready(i);
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

    /// Kills relay `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.relays[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal to relay `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.relays[i].child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits for relay `i` to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let c = self.relays[i].child.as_mut()?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.relays[i].child = None;
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log of relay `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
    }

    /// Replaces the network's peer list (normalized and signed by the authority)
    /// on disk and in [`TestNet::list`]; relays see it at their next reload.
    pub fn set_list(&mut self, mut list: PeerList) {
        list.signatures.clear();
        list.normalize();
        list.sign(&self.authority).expect("sign peer list");
        std::fs::write(&self.list_path, list.encode()).unwrap();
        self.list = list;
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for i in 0..self.relays.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One admin request over a Unix socket, `None` if the socket does not answer.
pub fn try_admin(path: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}
