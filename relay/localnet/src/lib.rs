//! One launcher for local Shroud networks: the benchmarks (`shroud-bench`, whose
//! `demo` is the README's main command) and the integration tests (`shroud-tests`)
//! both start their relays here.
//!
//! [`LocalNet::start`] generates an authority key, each relay's identity and onion
//! keys (files with mode 0600), a signed peer list (with any [`Virtual`] relays the
//! caller plays itself, such as a benchmark's sink), and one TOML config per relay in
//! a fresh temporary directory; starts one real `shroud-relay` process per relay, on
//! the address its [`RelaySetup`] names; and waits until each answers `status` on its
//! admin socket. Dropping the [`LocalNet`] kills every process and removes the
//! directory; with [`NetSetup::die_with_parent`] processes also die with their
//! parent, so an interrupted benchmark leaves none behind.
//!
//! The config has what every local relay needs (keys, peer list, rollback state,
//! setup journal, authority, exit policy, listen addresses, ports, workers, admin
//! socket); everything else — limits, `[io]`, `[log]`, `[metrics]` — comes from the
//! caller as a TOML table ([`RelaySetup::settings`]) merged over it.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use serde_json::Value;
use shroud_admin::Request;
use shroud_proto::keys::{encode_key, IdentityKey, OnionSecret, RelayId};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};

/// The first port of every relay; worker `i` listens on `BASE_PORT + i`.
pub const BASE_PORT: u16 = 9000;

/// One relay process to start.
#[derive(Debug, Clone)]
pub struct RelaySetup {
    /// Its address (the one in the peer list, and its first listen address).
    pub addr: IpAddr,
    /// Further listen addresses.
    pub more_listen: Vec<IpAddr>,
    /// Workers (ports `BASE_PORT ..= BASE_PORT + workers - 1`).
    pub workers: usize,
    /// Exit policy rules; an empty policy makes a non-exit.
    pub exit_policy: Vec<String>,
    /// An onion key directory (`keys/`, holding `onion-<now - 60>.key`, the layout
    /// `shroudctl daemon` keeps) instead of the key file `onion.key`.
    pub onion_key_dir: bool,
    /// The metrics endpoint, written as `[metrics] listen` (None: no endpoint).
    pub metrics: Option<SocketAddr>,
    /// Everything else in the config (e.g. `[limits]`, `[io]`, `[log]`), merged over
    /// the launcher's own keys table by table.
    pub settings: toml::Table,
    /// A command the relay is started under, e.g. `["ip", "netns", "exec", NAME]`.
    pub launcher: Vec<String>,
}

impl RelaySetup {
    /// A one-worker non-exit relay on `addr` with no further settings.
    pub fn new(addr: IpAddr) -> Self {
        RelaySetup {
            addr,
            more_listen: Vec::new(),
            workers: 1,
            exit_policy: Vec::new(),
            onion_key_dir: false,
            metrics: None,
            settings: toml::Table::new(),
            launcher: Vec::new(),
        }
    }

    /// Sets `[section] key = value` in [`RelaySetup::settings`].
    pub fn set(&mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> &mut Self {
        let t = self
            .settings
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = t {
            t.insert(key.to_owned(), value.into());
        }
        self
    }
}

/// A relay of the peer list that the caller plays itself (e.g. a benchmark's sink).
#[derive(Debug)]
pub struct Virtual {
    /// Identity.
    pub identity: IdentityKey,
    /// Onion key.
    pub onion: OnionSecret,
    /// Address and port.
    pub addr: SocketAddr,
}

/// The program relays run as.
#[derive(Debug, Clone)]
pub enum Program {
    /// A `shroud-relay` binary.
    Binary(PathBuf),
    /// This executable with `arg` first (e.g. `shroud-bench __relay`, which runs the
    /// same library code).
    SelfExe(String),
}

/// A whole network to start.
#[derive(Debug)]
pub struct NetSetup<'a> {
    /// The relays.
    pub relays: Vec<RelaySetup>,
    /// Relays in the list that the caller plays itself.
    pub virtuals: Vec<&'a Virtual>,
    /// `CELL`, in the peer list's network parameters.
    pub cell: u16,
    /// Seconds the peer list stays valid.
    pub list_valid_for: u64,
    /// What the relays run as.
    pub program: Program,
    /// Environment of every relay process.
    pub env: Vec<(String, String)>,
    /// Prefix of the temporary directory's name.
    pub tag: String,
    /// Relays get SIGKILL when the thread that started them ends
    /// (`PR_SET_PDEATHSIG`): for a benchmark that starts them from its main thread,
    /// so that no relay outlives an interrupted run.
    pub die_with_parent: bool,
}

impl NetSetup<'_> {
    /// `relays` on `program`, 1024-byte cells, a list valid for a day.
    pub fn new(relays: Vec<RelaySetup>, program: Program) -> Self {
        NetSetup {
            relays,
            virtuals: Vec::new(),
            cell: 1024,
            list_valid_for: 86_400,
            program,
            env: Vec::new(),
            tag: "shroud-net".into(),
            die_with_parent: false,
        }
    }
}

/// One relay process and its files.
#[derive(Debug)]
pub struct RelayProc {
    /// The process (None before it starts and once it is killed or has exited).
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
    /// A second onion key file name in the relay's directory (for rotation tests).
    pub onion_key_next: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Identity key file.
    pub identity_key: PathBuf,
    /// Onion key directory (used when [`RelaySetup::onion_key_dir`] is set).
    pub key_dir: PathBuf,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Its peer-list rollback state.
    pub peer_list_state: PathBuf,
}

/// A running local network.
#[derive(Debug)]
pub struct LocalNet {
    /// Temporary directory with every file (removed on drop).
    pub dir: PathBuf,
    /// The relays, in [`NetSetup::relays`] order.
    pub relays: Vec<RelayProc>,
    /// The signed peer list.
    pub list: PeerList,
    /// Its file.
    pub list_path: PathBuf,
    /// The authority that signed it.
    pub authority: IdentityKey,
    setups: Vec<RelaySetup>,
    program: Program,
    env: Vec<(String, String)>,
    die_with_parent: bool,
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a secret key file (mode 0600) in the relay's key format.
pub fn write_key(path: &Path, secret: &[u8; 32]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(encode_key(secret).as_bytes())
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

fn strings<'a>(v: impl IntoIterator<Item = &'a String>) -> toml::Value {
    toml::Value::Array(v.into_iter().map(|s| s.clone().into()).collect())
}

impl LocalNet {
    /// Creates the keys, the signed list and the configs, starts every relay and waits
    /// (up to 30 s each) until it answers on its admin socket.
    pub fn start(setup: NetSetup<'_>) -> io::Result<LocalNet> {
        let mut net = LocalNet::create(setup)?;
        for i in 0..net.relays.len() {
            net.write_config(i, &["onion.key"])?;
            net.spawn(i)?;
        }
        for i in 0..net.relays.len() {
            net.wait_ready(i, Duration::from_secs(30))?;
        }
        Ok(net)
    }

    /// Creates the keys and the signed list, starting nothing and writing no config.
    pub fn create(setup: NetSetup<'_>) -> io::Result<LocalNet> {
        let mut r = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut r);
        let dir = std::env::temp_dir().join(format!("{}-{}", setup.tag, u64::from_le_bytes(r)));
        std::fs::create_dir_all(&dir)?;
        let authority = IdentityKey::generate(&mut OsRng);
        let now = now_s();
        let params = NetworkParams {
            cell: setup.cell,
            ..NetworkParams::default()
        };
        params
            .validate()
            .map_err(|e| other(format!("cell size {}: {e}", setup.cell)))?;
        let mut list = PeerList::new(1, now - 60, now + setup.list_valid_for, params);
        let mut relays = Vec::new();
        for (i, s) in setup.relays.iter().enumerate() {
            let id = IdentityKey::generate(&mut OsRng);
            let onion = OnionSecret::generate(&mut OsRng);
            let ports = (BASE_PORT, BASE_PORT + s.workers as u16 - 1);
            let rdir = dir.join(format!("relay{i}"));
            std::fs::create_dir_all(&rdir)?;
            write_key(&rdir.join("identity.key"), &id.to_bytes())?;
            write_key(&rdir.join("onion.key"), &onion.to_bytes())?;
            let key_dir = rdir.join("keys");
            if s.onion_key_dir {
                std::fs::create_dir_all(&key_dir)?;
                write_key(
                    &key_dir.join(format!("onion-{}.key", now - 60)),
                    &onion.to_bytes(),
                )?;
            }
            list.relays.push(RelayDescriptor {
                identity: id.public(),
                addr: s.addr,
                ports,
                onion_keys: vec![OnionKeyEntry {
                    key: onion.public(),
                    valid_until: now + setup.list_valid_for.max(7200),
                }],
                exit: !s.exit_policy.is_empty(),
                weight: 100,
            });
            relays.push(RelayProc {
                child: None,
                id: id.public().relay_id(),
                addr: s.addr,
                ports,
                admin: rdir.join("admin.sock"),
                config: rdir.join("relay.toml"),
                onion_key: rdir.join("onion.key"),
                onion_key_next: rdir.join("onion-next.key"),
                log: rdir.join("relay.log"),
                identity_key: rdir.join("identity.key"),
                key_dir,
                metrics: s.metrics,
                peer_list_state: rdir.join("peer-list.serial"),
            });
        }
        for v in &setup.virtuals {
            list.relays.push(RelayDescriptor {
                identity: v.identity.public(),
                addr: v.addr.ip(),
                ports: (v.addr.port(), v.addr.port()),
                onion_keys: vec![OnionKeyEntry {
                    key: v.onion.public(),
                    valid_until: now + setup.list_valid_for.max(7200),
                }],
                exit: true,
                weight: 1,
            });
        }
        list.normalize();
        list.sign(&authority)
            .map_err(|e| other(format!("signing the peer list: {e}")))?;
        let list_path = dir.join("peers.list");
        std::fs::write(&list_path, list.encode())?;
        Ok(LocalNet {
            dir,
            relays,
            list,
            list_path,
            authority,
            setups: setup.relays,
            program: setup.program,
            env: setup.env,
            die_with_parent: setup.die_with_parent,
        })
    }

    /// (Re)writes relay `i`'s config with these onion key files (newest first, names in
    /// its directory), or with `onion_key_dir = "keys"` when its setup asks for one.
    pub fn write_config(&self, i: usize, onion_files: &[&str]) -> io::Result<()> {
        let r = &self.relays[i];
        let s = &self.setups[i];
        let mut relay = toml::Table::new();
        relay.insert("identity_key".into(), "identity.key".into());
        if s.onion_key_dir {
            relay.insert("onion_key_dir".into(), "keys".into());
        } else {
            let files: Vec<String> = onion_files.iter().map(|f| (*f).to_owned()).collect();
            relay.insert("onion_keys".into(), strings(&files));
        }
        relay.insert(
            "peer_list".into(),
            self.list_path.display().to_string().into(),
        );
        relay.insert("peer_list_state".into(), "peer-list.serial".into());
        relay.insert("setup_journal".into(), "setup.journal".into());
        relay.insert(
            "authorities".into(),
            strings(&[self.authority.public().to_base64()]),
        );
        relay.insert("exit_policy".into(), strings(&s.exit_policy));
        let mut network = toml::Table::new();
        let listen: Vec<String> = std::iter::once(&s.addr)
            .chain(&s.more_listen)
            .map(ToString::to_string)
            .collect();
        network.insert("listen".into(), strings(&listen));
        network.insert("base_port".into(), i64::from(BASE_PORT).into());
        network.insert("workers".into(), (s.workers as i64).into());
        let mut admin = toml::Table::new();
        admin.insert("socket".into(), "admin.sock".into());
        let mut config = toml::Table::new();
        config.insert("relay".into(), relay.into());
        config.insert("network".into(), network.into());
        config.insert("admin".into(), admin.into());
        if let Some(m) = s.metrics {
            let mut metrics = toml::Table::new();
            metrics.insert("listen".into(), m.to_string().into());
            config.insert("metrics".into(), metrics.into());
        }
        merge(&mut config, &s.settings);
        let text =
            toml::to_string(&config).map_err(|e| other(format!("relay {i}'s config: {e}")))?;
        std::fs::write(&r.config, text)
    }

    /// Starts relay `i`'s process without waiting for it.
    pub fn spawn(&mut self, i: usize) -> io::Result<()> {
        let r = &self.relays[i];
        let log = std::fs::File::create(&r.log)?;
        let (program, first): (PathBuf, Option<&str>) = match &self.program {
            Program::Binary(b) => (b.clone(), None),
            Program::SelfExe(arg) => (std::env::current_exe()?, Some(arg.as_str())),
        };
        let mut cmd = launch_command(&self.setups[i].launcher, &program);
        cmd.args(first)
            .arg("--config")
            .arg(&r.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.die_with_parent {
            die_with_parent(&mut cmd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| other(format!("starting {}: {e}", program.display())))?;
        self.relays[i].child = Some(child);
        Ok(())
    }

    /// Waits until relay `i` answers `status`; an error (with its log) if it exits or
    /// does not answer within `timeout`.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.admin_raw(i, &Request::Status.to_line()) {
                if v["ok"] == true {
                    return Ok(());
                }
            }
            if let Some(c) = self.relays[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(other(format!(
                        "relay {i} exited with {status}: {}",
                        self.log(i)
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(other(format!("relay {i} not ready: {}", self.log(i))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one line to relay `i`'s admin socket and returns the reply, whatever it
    /// says (10 s timeout).
    pub fn admin_raw(&self, i: usize, line: &str) -> io::Result<Value> {
        admin_line(&self.relays[i].admin, line)
    }

    /// One admin request to relay `i`; its result, or an error with the relay's.
    pub fn request(&self, i: usize, req: &Request) -> io::Result<Value> {
        let v = self.admin_raw(i, &req.to_line())?;
        if v["ok"] != true {
            return Err(other(format!("relay {i}: {v}")));
        }
        Ok(v["result"].clone())
    }

    /// Kills relay `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.relays[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills relay `i`, waits until its ports can be bound again (the kernel tears a
    /// dead process's io_uring down asynchronously, and sockets its in-flight
    /// operations hold stay bound until then), starts it with the same files and
    /// waits until it answers.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        let r = &self.relays[i];
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in r.ports.0..=r.ports.1 {
            while std::net::UdpSocket::bind(SocketAddr::new(r.addr, port)).is_err() {
                if Instant::now() > deadline {
                    return Err(other(format!("port {port} of relay {i} stays bound")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.spawn(i)?;
        self.wait_ready(i, Duration::from_secs(20))
    }

    /// Sends signal `sig` to relay `i`.
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(c) = &self.relays[i].child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Waits for relay `i` to exit on its own; its exit code (None: still running at
    /// the timeout, or killed by a signal).
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

    /// Relay `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.relays[i].log).unwrap_or_default()
    }

    /// CPU seconds (user + system) relay `i` has used so far.
    pub fn cpu_seconds(&self, i: usize) -> f64 {
        self.relays[i]
            .child
            .as_ref()
            .map_or(0.0, |c| cpu_seconds(c.id()))
    }

    /// Relay process ids (for checks that nothing is left behind).
    pub fn pids(&self) -> Vec<u32> {
        self.relays
            .iter()
            .filter_map(|r| r.child.as_ref().map(Child::id))
            .collect()
    }

    /// Replaces the peer list (normalized and signed by the authority) on disk and in
    /// [`LocalNet::list`]; relays see it at their next reload.
    pub fn set_list(&mut self, mut list: PeerList) -> io::Result<()> {
        list.signatures.clear();
        list.normalize();
        list.sign(&self.authority)
            .map_err(|e| other(format!("signing the peer list: {e}")))?;
        std::fs::write(&self.list_path, list.encode())?;
        self.list = list;
        Ok(())
    }
}

impl Drop for LocalNet {
    fn drop(&mut self) {
        for i in 0..self.relays.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command that runs `program` under `launcher` (a command prefix such as `ip netns
/// exec NS` or `prlimit ...`; empty: directly).
pub fn launch_command(launcher: &[String], program: &Path) -> Command {
    match launcher.split_first() {
        Some((first, args)) => {
            let mut c = Command::new(first);
            c.args(args).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Makes the kernel kill the process `cmd` starts (SIGKILL) when the thread that
/// started it ends (`PR_SET_PDEATHSIG`), so that nothing outlives an interrupted run.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// CPU seconds (user + system) process `pid` (or kernel thread, e.g. a NAPI thread)
/// has used so far (0 if it is gone): from its CPU-time clock, in nanoseconds, where
/// `/proc/<pid>/stat` counts 10 ms ticks (the fallback if the clock is refused).
pub fn cpu_seconds(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid only writes the clock id through the valid pointer.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } == 0 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the timespec through the valid pointer.
        if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
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

/// One line to an admin socket and its JSON reply (10 s timeout).
pub fn admin_line(path: &Path, line: &str) -> io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{line}")?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| other(format!("admin reply {reply:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_of_a_busy_child_are_finer_than_a_tick() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(300));
        let a = cpu_seconds(pid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            (0.02..1.0).contains(&a),
            "{a} s after 300 ms of a busy loop"
        );
        // Nanoseconds, where /proc's ticks are 10 ms (a whole number of ticks by
        // chance has odds of about one in ten million).
        let ticks = a * 100.0;
        assert!(
            (ticks - ticks.round()).abs() > 1e-9,
            "{a} s is a whole number of ticks"
        );
        assert_eq!(
            cpu_seconds(pid),
            0.0,
            "a reaped child has used nothing we can read"
        );
    }

    #[test]
    fn settings_merge_over_the_launchers_keys_table_by_table() {
        let mut base: toml::Table = toml::from_str(
            "[network]\nlisten = [\"127.0.0.1\"]\nworkers = 1\n[admin]\nsocket = \"a\"\n",
        )
        .unwrap();
        let mut s = RelaySetup::new(IpAddr::from([127, 0, 0, 1]));
        s.set("network", "workers", 2)
            .set("network", "socket_buffer_bytes", 4_194_304)
            .set("limits", "max_circuits", 1024);
        merge(&mut base, &s.settings);
        assert_eq!(base["network"]["workers"].as_integer(), Some(2));
        assert_eq!(base["network"]["listen"][0].as_str(), Some("127.0.0.1"));
        assert_eq!(
            base["network"]["socket_buffer_bytes"].as_integer(),
            Some(4_194_304)
        );
        assert_eq!(base["limits"]["max_circuits"].as_integer(), Some(1024));
        assert_eq!(base["admin"]["socket"].as_str(), Some("a"));
    }
}
