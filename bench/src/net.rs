//! A local Shroud network for benchmarks: keys, a signed peer list and one relay
//! process per relay on `127.0.<net>.<i+1>`, all in a temporary directory, torn down
//! (processes killed, files removed) when the [`LocalNet`] is dropped. Relay
//! processes also die with the benchmark (`PR_SET_PDEATHSIG`), so an interrupted or
//! killed benchmark leaves none behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use rand_core::OsRng;
use serde_json::Value;
use shroud_proto::keys::{encode_key, IdentityKey, OnionSecret, RelayId};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};

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
        }
    }
}

/// A relay of the list that this process simulates itself (e.g. a sink).
#[derive(Debug)]
pub struct Virtual {
    /// Identity.
    pub identity: IdentityKey,
    /// Onion key.
    pub onion: OnionSecret,
    /// Address and port.
    pub addr: SocketAddr,
}

/// A running relay process.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Option<Child>,
    /// Relay id.
    pub id: RelayId,
    /// Address.
    pub addr: IpAddr,
    /// Port range.
    pub ports: (u16, u16),
    /// Admin socket path.
    pub admin: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

/// A local network.
#[derive(Debug)]
pub struct LocalNet {
    /// Working directory (removed on drop).
    pub dir: PathBuf,
    /// Relay processes.
    pub relays: Vec<Proc>,
    /// The signed peer list.
    pub list: PeerList,
    /// Its file.
    pub list_path: PathBuf,
    /// The authority that signed it (base64 public key).
    pub authority: String,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_key(path: &Path, secret: &[u8; 32]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(encode_key(secret).as_bytes())?;
    Ok(())
}

/// Finds `shroud-relay` next to this executable, building it first when run by cargo.
pub fn relay_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no executable directory"))?;
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

impl LocalNet {
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
        let mut r = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut r);
        let dir = std::env::temp_dir().join(format!("shroud-bench-{}", u64::from_le_bytes(r)));
        std::fs::create_dir_all(&dir)?;
        let authority = IdentityKey::generate(&mut OsRng);
        let now = now_s();
        let params = NetworkParams {
            cell,
            ..NetworkParams::default()
        };
        params
            .validate()
            .map_err(|e| anyhow!("cell size {cell}: {e}"))?;
        let mut list = PeerList::new(1, now - 60, now + 86400, params);
        let mut procs = Vec::new();
        for (i, spec) in relays.iter().enumerate() {
            let id = IdentityKey::generate(&mut OsRng);
            let onion = OnionSecret::generate(&mut OsRng);
            let addr = IpAddr::V4(Ipv4Addr::new(127, 0, net, i as u8 + 1));
            let ports = (9000, 9000 + spec.workers as u16 - 1);
            let rdir = dir.join(format!("relay{i}"));
            std::fs::create_dir_all(&rdir)?;
            write_key(&rdir.join("identity.key"), &id.to_bytes())?;
            write_key(&rdir.join("onion.key"), &onion.to_bytes())?;
            list.relays.push(RelayDescriptor {
                identity: id.public(),
                addr,
                ports,
                onion_keys: vec![OnionKeyEntry {
                    key: onion.public(),
                    valid_until: now + 86400,
                }],
                exit: !spec.exit_policy.is_empty(),
                weight: 100,
            });
            procs.push(Proc {
                child: None,
                id: id.public().relay_id(),
                addr,
                ports,
                admin: rdir.join("admin.sock"),
                log: rdir.join("relay.log"),
            });
        }
        for v in virtuals {
            list.relays.push(RelayDescriptor {
                identity: v.identity.public(),
                addr: v.addr.ip(),
                ports: (v.addr.port(), v.addr.port()),
                onion_keys: vec![OnionKeyEntry {
                    key: v.onion.public(),
                    valid_until: now + 86400,
                }],
                exit: true,
                weight: 1,
            });
        }
        list.normalize();
        list.sign(&authority).map_err(|e| anyhow!("{e}"))?;
        let list_path = dir.join("peers.list");
        std::fs::write(&list_path, list.encode())?;
        let mut me = LocalNet {
            dir,
            relays: procs,
            list,
            list_path: list_path.clone(),
            authority: authority.public().to_base64(),
        };
        for (i, spec) in relays.iter().enumerate() {
            let p = &me.relays[i];
            let rdir = p.admin.parent().unwrap_or(Path::new("."));
            let cfg = rdir.join("relay.toml");
            let quote = |v: &[String]| {
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            std::fs::write(
                &cfg,
                format!(
                    "[relay]\nidentity_key = \"identity.key\"\nonion_keys = [\"onion.key\"]\npeer_list = {list:?}\npeer_list_state = \"peer-list.serial\"\nsetup_journal = \"setup.journal\"\nauthorities = [{auth:?}]\nexit_policy = [{policy}]\n\n\
                     [network]\nlisten = [\"{addr}\"]\nbase_port = 9000\nworkers = {w}\ncpus = [{cpus}]\nsocket_buffer_bytes = 16777216\n\n\
                     [limits]\nsetup_rate = {rate}\nsetup_burst = {burst}\n\n\
                     [io]\ndriver = \"{driver}\"\ncrypto = \"{crypto}\"\ngro_gso = {gro}\nzero_copy_send = {zc}\nbatch_wait_us = {bw}\n{slots}\n[admin]\nsocket = \"admin.sock\"\n\n[log]\nlevel = \"warn\"\n",
                    list = list_path.display().to_string(),
                    auth = authority.public().to_base64(),
                    policy = quote(&spec.exit_policy),
                    addr = p.addr,
                    w = spec.workers,
                    cpus = spec.cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
                    crypto = spec.crypto,
                    driver = spec.driver,
                    gro = spec.gro_gso,
                    zc = spec.zero_copy_send,
                    bw = spec.batch_wait_us,
                    slots = spec.recv_slots.map(|n| format!("recv_slots = {n}\n")).unwrap_or_default(),
                    rate = spec.setup_rate,
                    burst = spec.setup_rate.saturating_mul(2),
                ),
            )?;
            let log = std::fs::File::create(&p.log)?;
            let mut command = match cmd {
                RelayCommand::Binary(b) => Command::new(b),
                RelayCommand::SelfExe => {
                    let mut c = Command::new(std::env::current_exe()?);
                    c.arg("__relay");
                    c
                }
            };
            command
                .arg("--config")
                .arg(&cfg)
                .env("SHROUD_BENCH_NO_CRYPTO", "I-understand-this-is-insecure")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent;
            // it makes the kernel kill the relay when the benchmark dies.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            me.relays[i].child = Some(command.spawn().context("cannot start a relay")?);
        }
        for i in 0..me.relays.len() {
            me.wait_ready(i)?;
        }
        Ok(me)
    }

    fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.admin(i, "status").is_ok() {
                return Ok(());
            }
            if let Some(c) = self.relays[i].child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    bail!(
                        "relay {i} exited with {s}: {}",
                        std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "relay {i} did not come up: {}",
                    std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One admin command to relay `i`.
    pub fn admin(&self, i: usize, cmd: &str) -> anyhow::Result<Value> {
        let mut s = UnixStream::connect(&self.relays[i].admin)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(s, "{}", serde_json::json!({"cmd": cmd}))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)?;
        if v["ok"] != true {
            bail!("relay {i}: {v}");
        }
        Ok(v["result"].clone())
    }

    /// Sends a signal to relay `i`.
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(c) = &self.relays[i].child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// CPU seconds (user + system) relay `i` has used so far.
    pub fn cpu_seconds(&self, i: usize) -> f64 {
        let Some(c) = &self.relays[i].child else {
            return 0.0;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", c.id())) else {
            return 0.0;
        };
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }

    /// Relay process ids (for checks that nothing is left behind).
    pub fn pids(&self) -> Vec<u32> {
        self.relays
            .iter()
            .filter_map(|r| r.child.as_ref().map(Child::id))
            .collect()
    }
}

impl Drop for LocalNet {
    fn drop(&mut self) {
        for r in &mut self.relays {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
