//! The daemon around the workers: loading keys and the peer list, binding sockets,
//! spawning pinned workers, and serving the control plane (admin socket, signals,
//! systemd notification, metrics) off the data path.
//!
//! Onion keys come from `relay.onion_keys` (fixed files) or `relay.onion_key_dir`
//! (the 3 newest `onion-<UNIX_SECONDS>.key` files, re-read on `reload` and `rotate`).
//! A rotation replaces the keys used for *new* circuit setups only: circuits keep
//! their own keys, so no cell of an existing circuit is affected. A failed reload or
//! rotation keeps the last good keys and peer list.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use crossbeam_channel::{Receiver, Sender};
use shroud_admin::{
    Draining, OnionKeyStatus, PeerListStatus, PeerSummary, Peers, Reloaded, Reply, Request,
    Rotated, Status, Stopping, WorkerStatus,
};
use shroud_proto::aead::{Aead, RingAead, RustCryptoAead};
use shroud_proto::keys::{IdentityKey, IdentityPublic, OnionPublic, OnionSecret};
use shroud_proto::peerlist::{PeerList, TrustPolicy};
use shroud_proto::relay::{OnionKeyring, Peer, Relay};

use crate::journal::FileJournal;
use shroud_proto::Layout;

use crate::config::Config;
use crate::engine::{Control, WorkerEnd};
use crate::metrics::{OnionKeyInfo, RelayInfo, RelayMetrics, ReloadInfo};
use crate::spec::{CryptoChoice, WorkerSpec};
use crate::stats::WorkerStats;
use crate::sys;
use crate::worker;

/// Everything loaded from disk that the relay needs to start or reload.
pub struct Loaded {
    /// Identity key.
    pub identity: IdentityKey,
    /// Onion keys, newest first.
    pub onion: Vec<OnionKey>,
    /// The verified peer list.
    pub peers: PeerList,
    /// The list is past its `valid_until` (everything else verified): the relay
    /// starts on it but refuses new circuits until a reload brings a valid list.
    pub expired: bool,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("serial", &self.peers.serial)
            .finish_non_exhaustive()
    }
}

/// A startup failure: configuration (exit 78) or runtime (exit 1).
#[derive(Debug)]
pub enum StartError {
    /// Bad configuration, keys or peer list.
    Config(anyhow::Error),
    /// Anything else.
    Runtime(anyhow::Error),
}

fn now_s() -> u64 {
    sys::now_ms() / 1000
}

/// One loaded onion key.
pub struct OnionKey {
    /// The secret (zeroized on drop).
    pub secret: OnionSecret,
    /// Its public key.
    pub public: OnionPublic,
    /// Its creation time (the number in its file name) when it comes from
    /// `relay.onion_key_dir`.
    pub created: Option<u64>,
}

impl std::fmt::Debug for OnionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnionKey")
            .field("public", &self.public)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// Reads the onion keys the configuration names, newest first: the files of
/// `relay.onion_keys`, or the 3 newest key files of `relay.onion_key_dir` (other
/// entries of the directory are ignored with a warning). Every file must be a valid
/// key file with mode 0600 or stricter; any error fails the whole load.
pub fn load_onion_keys(cfg: &Config) -> anyhow::Result<Vec<OnionKey>> {
    let sel = cfg.onion_key_files().map_err(anyhow::Error::new)?;
    for p in &sel.ignored {
        tracing::warn!(path = %p.display(), "ignoring an entry of the onion key directory that is not named onion-<UNIX_SECONDS>.key");
    }
    if sel.unused > 0 {
        tracing::warn!(
            unused = sel.unused,
            "the onion key directory holds more than 3 key files; only the 3 newest are used (old keys should have been erased)"
        );
    }
    let mut keys: Vec<OnionKey> = Vec::with_capacity(sel.files.len());
    for f in &sel.files {
        let secret =
            shroud_keystore::keyfile::read_onion_key_file(&f.path).map_err(anyhow::Error::new)?;
        let public = secret.public();
        if keys.iter().any(|k| k.public == public) {
            return Err(anyhow!(
                "onion key file {} holds the same key as another file",
                f.path.display()
            ));
        }
        keys.push(OnionKey {
            secret,
            public,
            created: f.created,
        });
    }
    Ok(keys)
}

fn secrets(keys: &[OnionKey]) -> Vec<OnionSecret> {
    keys.iter().map(|k| k.secret.clone()).collect()
}

/// The trust policy from the configuration.
pub fn trust_policy(cfg: &Config) -> anyhow::Result<TrustPolicy> {
    let authorities = cfg
        .relay
        .authorities
        .iter()
        .map(|a| {
            a.parse::<IdentityPublic>()
                .map_err(|e| anyhow!("relay.authorities: {a:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(TrustPolicy {
        authorities,
        threshold: cfg.relay.authority_threshold,
    })
}

/// The serial recorded in `relay.peer_list_state`: `None` if the file does not exist
/// (a first start); an error naming the file if it cannot be read or does not hold
/// one serial. Never "ignore and accept anything": that would reopen the rollback
/// the file is there to prevent.
pub fn recorded_serial(cfg: &Config) -> anyhow::Result<Option<u64>> {
    let p = &cfg.relay.peer_list_state;
    shroud_keystore::peerfile::read_state(p).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "relay.peer_list_state: cannot use the peer-list rollback state {} (it must \
             hold the serial of the last accepted peer list and a newline; restore it, \
             or remove it to accept any serial once)",
            p.display()
        ))
    })
}

/// Records `serial` in `relay.peer_list_state` (atomically: temporary file, fsync,
/// rename), unless the file already holds it. A missing file is created; its
/// directory must exist.
pub fn record_serial(cfg: &Config, serial: u64) -> anyhow::Result<()> {
    if recorded_serial(cfg)? == Some(serial) {
        return Ok(());
    }
    let p = &cfg.relay.peer_list_state;
    shroud_keystore::peerfile::write_state(p, serial).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "relay.peer_list_state: cannot record peer-list serial {serial} in {}",
            p.display()
        ))
    })
}

/// Reads and verifies the peer list (signatures and threshold, validity window, no
/// rollback below `last` nor below the serial recorded in `relay.peer_list_state`,
/// network parameters). Writes nothing: the caller records the serial
/// ([`record_serial`]) once it commits to the list.
pub fn load_peer_list(cfg: &Config, last: Option<u64>) -> anyhow::Result<PeerList> {
    let floor = last.max(recorded_serial(cfg)?);
    let text = std::fs::read_to_string(&cfg.relay.peer_list)
        .with_context(|| format!("cannot read peer list {}", cfg.relay.peer_list.display()))?;
    let policy = trust_policy(cfg)?;
    PeerList::parse_and_verify(&text, &policy, now_s(), floor)
        .map_err(|e| anyhow!("peer list {} refused: {e}", cfg.relay.peer_list.display()))
}

/// Reads and verifies the peer list at start: as [`load_peer_list`], except that a
/// list past its `valid_until` is accepted if it verifies in every other respect
/// (signatures and threshold, rollback, parameters), and `true` says so. A relay
/// restarted after its list expired comes back on that last good list, refusing new
/// circuits until a reload brings a valid one, instead of staying down (as Tor
/// starts from its cached consensus).
pub fn load_peer_list_at_start(cfg: &Config) -> anyhow::Result<(PeerList, bool)> {
    match load_peer_list(cfg, None) {
        Ok(list) => Ok((list, false)),
        Err(e) => {
            let floor = recorded_serial(cfg)?;
            let Ok(text) = std::fs::read_to_string(&cfg.relay.peer_list) else {
                return Err(e);
            };
            let policy = trust_policy(cfg)?;
            let now = now_s();
            match PeerList::parse_and_verify(&text, &policy, now, floor) {
                Err(shroud_proto::peerlist::PeerListError::Expired { until, .. }) => {
                    // Verify again as of its last valid second: everything but
                    // the expiry must still hold.
                    let list =
                        PeerList::parse_and_verify(&text, &policy, until.saturating_sub(1), floor)
                            .map_err(|e2| {
                                anyhow!("peer list {} refused: {e2}", cfg.relay.peer_list.display())
                            })?;
                    Ok((list, true))
                }
                _ => Err(e),
            }
        }
    }
}

/// Loads keys and the peer list (an expired but otherwise valid list is accepted
/// and flagged, see [`load_peer_list_at_start`]).
pub fn load(cfg: &Config) -> anyhow::Result<Loaded> {
    let identity = shroud_keystore::keyfile::read_identity_key_file(&cfg.relay.identity_key)
        .map_err(anyhow::Error::new)?;
    let onion = load_onion_keys(cfg)?;
    let (peers, expired) = load_peer_list_at_start(cfg)?;
    peers
        .params
        .layout()
        .map_err(|e| anyhow!("peer list network parameters: {e}"))?;
    Ok(Loaded {
        identity,
        onion,
        peers,
        expired,
    })
}

/// What is wrong with a configuration that still lets the relay start: said at
/// start (log warnings) and by `--verify-config`.
pub fn warnings(cfg: &Config, loaded: &Loaded) -> Vec<String> {
    let mut out = Vec::new();
    if loaded.expired {
        out.push(format!(
            "the peer list has expired (valid until {}): the relay starts on it but refuses \
             new circuits until a reload brings a valid peer list",
            loaded.peers.valid_until
        ));
    }
    let me = loaded.identity.public().relay_id();
    match loaded.peers.relay_by_id(&me) {
        None => out.push(format!(
            "this relay ({me}) is not in the peer list: clients cannot choose it"
        )),
        Some(d) => {
            let want = (
                cfg.network.base_port,
                cfg.network.base_port + cfg.network.workers as u16 - 1,
            );
            if d.ports != want {
                out.push(format!(
                    "the peer list lists ports {}-{} for this relay, but base_port and workers \
                     give {}-{}: clients will send to ports the relay does not serve",
                    d.ports.0, d.ports.1, want.0, want.1
                ));
            }
        }
    }
    out
}

/// The peers of a list as the protocol core wants them.
pub fn peers_of(list: &PeerList) -> Vec<Peer> {
    list.relays
        .iter()
        .map(|r| Peer {
            id: r.relay_id(),
            identity: r.identity,
            addr: r.addr,
            ports: r.ports,
        })
        .collect()
}

fn bind(addr: SocketAddr, buf: usize) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.bind(&addr.into())
        .with_context(|| format!("cannot bind {addr}"))?;
    let s: UdpSocket = s.into();
    let (r, w) = sys::buffer_sizes(&s);
    if r < buf || w < buf {
        tracing::warn!(
            %addr, requested = buf, rcvbuf = r, sndbuf = w,
            "the kernel clamped the socket buffers: raise net.core.rmem_max/wmem_max (deploy/sysctl.conf)"
        );
    }
    Ok(s)
}

/// The keyring of a process started at `start_ms`, holding `keys`: every worker gets a
/// clone, so they share each key's setup seen-filter, and setups stamped at or before
/// the start second are refused (an earlier process may have seen them).
///
/// The keyring records every accepted setup in the setup journal, and starts with the
/// setups the journal holds from earlier processes.
fn process_keyring(cfg: &Config, keys: &[OnionKey], start_ms: u64) -> anyhow::Result<OnionKeyring> {
    let limits = cfg.relay_limits();
    let mut k =
        OnionKeyring::new(limits.setup_skew_s, limits.setup_filter_capacity).started_at(start_ms);
    k.update(secrets(keys), start_ms);
    let (journal, remembered) =
        FileJournal::open(&cfg.relay.setup_journal, limits.setup_skew_s, &k, start_ms)?;
    tracing::info!(
        path = %cfg.relay.setup_journal.display(), remembered,
        "setup journal loaded"
    );
    Ok(k.with_journal(Arc::new(journal)))
}

/// File descriptors the relay may hold at once: per worker its exit sockets and, on
/// an exit, the ready pool of exit sockets (two families, plus one in each helper's
/// hands), its listen sockets and its io_uring; and a margin for the rest (admin and
/// metrics connections, journal, log, standard streams).
fn descriptors_needed(cfg: &Config) -> u64 {
    let exits = cfg.exit_sockets();
    let pool = if exits > 0 {
        2 * (crate::exits::POOL_SOCKETS + 1)
    } else {
        0
    };
    let per_worker = exits + pool + cfg.network.listen.len() + 1;
    (cfg.network.workers * per_worker + 128) as u64
}

/// The unix-ms deadline of a drain of `timeout` from `now_ms`; an absurd timeout (an
/// admin request may ask for u64::MAX seconds) saturates instead of wrapping into the
/// past, which would end the drain at once.
fn drain_deadline(now_ms: u64, timeout: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

/// Sleeps until the wall clock has left the second of `start_ms`, so that no setup
/// stamped in that second is ever accepted by this process (see [`process_keyring`]).
fn wait_for_next_second(start_ms: u64) {
    loop {
        let now = sys::now_ms();
        if now / 1000 > start_ms / 1000 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1000 - now % 1000));
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_with<A: Aead>(
    cfg: &Config,
    loaded: &Loaded,
    keyring: &OnionKeyring,
    layout: Layout,
    now_ms: u64,
    spec: WorkerSpec,
    rx: Receiver<Control>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<JoinHandle<std::io::Result<WorkerEnd>>> {
    let mut relay = Relay::<A>::new(
        layout,
        loaded.identity.clone(),
        Vec::new(),
        peers_of(&loaded.peers),
        cfg.exit_policy(),
        cfg.relay_limits(),
        now_ms,
    );
    relay.set_keyring(keyring.clone());
    if loaded.expired {
        relay.set_accepting(false);
    }
    worker::spawn(spec, relay, rx, stats)
}

/// One started worker, as the control plane sees it.
struct WorkerHandle {
    tx: Sender<Control>,
    stats: Arc<WorkerStats>,
    thread: JoinHandle<std::io::Result<WorkerEnd>>,
    port: u16,
}

/// A running relay.
pub struct Daemon {
    cfg: Config,
    loaded: Loaded,
    /// The onion keys as every worker holds them (shared seen-filters).
    keyring: OnionKeyring,
    layout: Layout,
    workers: Vec<WorkerHandle>,
    started: Instant,
    draining: bool,
    /// The peer list in force reached its `valid_until` while running: new circuits
    /// are refused until a reload brings a valid list.
    list_expired: bool,
    info: Arc<Mutex<RelayInfo>>,
    /// Admin connections refused for their peer credentials ([`serve_admin`]).
    admin_refused: Arc<AtomicU64>,
    /// Reloads applied and refused, for the metrics.
    reloads: ReloadInfo,
    /// Each worker's loop count when the watchdog last looked.
    last_loops: Vec<u64>,
    /// Workers that made no progress between the last two looks.
    stalled: Vec<usize>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Control-plane events for the daemon's main loop.
#[derive(Debug)]
pub enum Event {
    /// SIGHUP or admin `reload`.
    Reload(Option<Sender<Reply>>),
    /// Admin `rotate`: re-read the onion keys only.
    Rotate(Option<Sender<Reply>>),
    /// SIGINT or admin `drain`.
    Drain(Duration, Option<Sender<Reply>>),
    /// SIGTERM or admin `shutdown`.
    Stop(Option<Sender<Reply>>),
    /// Admin `status` / `stats` / `peers`.
    Query(Query, Sender<Reply>),
}

/// The read-only admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `status`.
    Status,
    /// `stats`.
    Stats,
    /// `peers`.
    Peers,
}

impl Daemon {
    /// Loads everything, binds every worker's sockets and starts the workers.
    pub fn start(cfg: Config) -> Result<Daemon, StartError> {
        let loaded = load(&cfg).map_err(StartError::Config)?;
        record_serial(&cfg, loaded.peers.serial).map_err(StartError::Config)?;
        let layout = loaded
            .peers
            .params
            .layout()
            .map_err(|e| StartError::Config(anyhow!("{e}")))?;
        let me = loaded.identity.public().relay_id();
        for w in warnings(&cfg, &loaded) {
            if !w.starts_with("the peer list has expired") {
                tracing::warn!(relay = %me, "{w}");
            }
        }
        let now_ms = sys::now_ms();
        let keyring = process_keyring(&cfg, &loaded.onion, now_ms).map_err(StartError::Config)?;
        wait_for_next_second(now_ms);
        let needed = descriptors_needed(&cfg);
        match sys::raise_nofile(needed) {
            Ok(soft) if soft >= needed => {}
            Ok(soft) => tracing::warn!(
                limit = soft,
                needed,
                "the open-file limit is below what the configured exit sockets need: exit \
                 circuits beyond it are refused (raise LimitNOFILE= or lower [limits] exit_sockets)"
            ),
            Err(e) => tracing::warn!(error = %e, needed, "cannot raise the open-file limit"),
        }
        let mut workers = Vec::new();
        for i in 0..cfg.network.workers {
            let port = cfg.network.base_port + i as u16;
            let sockets = cfg
                .network
                .listen
                .iter()
                .map(|ip| bind(SocketAddr::new(*ip, port), cfg.network.socket_buffer_bytes))
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(StartError::Runtime)?;
            let spec = WorkerSpec {
                index: i,
                cpu: cfg.network.cpus.get(i).copied(),
                sockets,
                layout,
                io: cfg.io_config(),
            };
            let (tx, rx) = crossbeam_channel::bounded(16);
            let stats = Arc::new(WorkerStats::default());
            let st = stats.clone();
            let handle = match cfg.io.crypto {
                CryptoChoice::Ring => {
                    spawn_with::<RingAead>(&cfg, &loaded, &keyring, layout, now_ms, spec, rx, st)
                }
                CryptoChoice::Rustcrypto => spawn_with::<RustCryptoAead>(
                    &cfg, &loaded, &keyring, layout, now_ms, spec, rx, st,
                ),
                #[cfg(feature = "bench-no-crypto")]
                CryptoChoice::None => spawn_with::<shroud_proto::aead::NullAead>(
                    &cfg, &loaded, &keyring, layout, now_ms, spec, rx, st,
                ),
            }
            .map_err(|e| StartError::Runtime(e.into()))?;
            workers.push(WorkerHandle {
                tx,
                stats,
                thread: handle,
                port,
            });
        }
        tracing::info!(
            relay = %me, workers = workers.len(),
            ports = %format!("{}-{}", cfg.network.base_port, cfg.network.base_port as usize + workers.len() - 1),
            peers = loaded.peers.relays.len(), serial = loaded.peers.serial,
            exit = cfg.exit_policy().is_exit(), crypto = ?cfg.io.crypto, gro_gso = cfg.io.gro_gso,
            "shroud-relay started"
        );
        let d = Daemon {
            cfg,
            loaded,
            keyring,
            layout,
            workers,
            started: Instant::now(),
            draining: false,
            list_expired: false,
            last_loops: Vec::new(),
            stalled: Vec::new(),
            info: Arc::new(Mutex::new(RelayInfo::default())),
            admin_refused: Arc::new(AtomicU64::new(0)),
            reloads: ReloadInfo {
                last_ok: true,
                last_success_s: now_s(),
                ..ReloadInfo::default()
            },
        };
        if d.loaded.expired {
            tracing::error!(
                serial = d.loaded.peers.serial,
                valid_until = d.loaded.peers.valid_until,
                "the peer list has expired: starting on it (the last good list) but refusing \
                 new circuits until a reload brings a valid peer list"
            );
        }
        let mut d = d;
        d.list_expired = d.loaded.expired;
        d.last_loops = d.workers.iter().map(|w| w.stats.loops()).collect();
        d.publish_info();
        Ok(d)
    }

    /// Refreshes what the metrics thread reads about keys, peer list and draining.
    fn publish_info(&self) {
        let until = self.onion_valid_until();
        let info = RelayInfo {
            cell: self.layout.cell as u64,
            onion_keys: self
                .loaded
                .onion
                .iter()
                .zip(until)
                .map(|(k, valid_until)| OnionKeyInfo {
                    public: k.public.to_base64(),
                    valid_until,
                })
                .collect(),
            peer_list_serial: self.loaded.peers.serial,
            peer_list_valid_until: self.loaded.peers.valid_until,
            peer_list_expired: self.list_expired,
            draining: self.draining,
            reloads: self.reloads.clone(),
        };
        match self.info.lock() {
            Ok(mut g) => *g = info,
            Err(poisoned) => *poisoned.into_inner() = info,
        }
    }

    /// For each onion key held, its expiry in this relay's own peer-list entry.
    fn onion_valid_until(&self) -> Vec<Option<u64>> {
        let me = self.loaded.identity.public().relay_id();
        let listed = self.loaded.peers.relay_by_id(&me);
        self.loaded
            .onion
            .iter()
            .map(|k| {
                listed
                    .and_then(|d| d.onion_keys.iter().find(|e| e.key == k.public))
                    .map(|e| e.valid_until)
            })
            .collect()
    }

    /// The counter of admin connections refused for their peer credentials, for
    /// [`serve_admin`].
    pub fn admin_refused(&self) -> Arc<AtomicU64> {
        self.admin_refused.clone()
    }

    /// Notices when the peer list in force expires while the relay runs: logs it
    /// once, shows it in `status` and the metrics, and makes every worker refuse new
    /// circuits (existing ones keep forwarding) until [`Self::reload`] brings a valid
    /// list. A relay must not keep admitting circuits on a directory nobody vouches
    /// for any more (relays removed since, onion keys replaced).
    fn check_peer_list_expiry(&mut self) {
        if self.list_expired || now_s() < self.loaded.peers.valid_until {
            return;
        }
        self.list_expired = true;
        tracing::error!(
            serial = self.loaded.peers.serial,
            valid_until = self.loaded.peers.valid_until,
            "the peer list in force has expired: refusing new circuits (existing ones keep \
             working) until a reload brings a valid peer list"
        );
        self.broadcast(|| Control::SetAccepting(false));
        self.publish_info();
    }

    /// Compares each worker's loop count with the last look: workers that did not
    /// loop since (and have not ended) are stalled; logs when that set changes.
    fn look_at_workers(&mut self) {
        let now: Vec<u64> = self.workers.iter().map(|w| w.stats.loops()).collect();
        let ended: Vec<bool> = self
            .workers
            .iter()
            .map(|w| w.thread.is_finished())
            .collect();
        let stalled = stalled_workers(&self.last_loops, &now, &ended);
        if stalled != self.stalled {
            if stalled.is_empty() {
                tracing::info!("every worker makes progress again");
            } else {
                tracing::error!(
                    workers = ?stalled,
                    "worker(s) made no progress for a second: no longer feeding the systemd watchdog"
                );
            }
            self.stalled = stalled;
            self.publish_info();
        }
        self.last_loops = now;
    }

    fn broadcast(&self, make: impl Fn() -> Control) {
        for w in &self.workers {
            let _ = w.tx.send(make());
        }
    }

    /// Re-reads the configuration file for the parts that apply without a restart
    /// (onion key files, peer list file, authorities); other changes are reported.
    fn reread_config(&mut self) -> anyhow::Result<()> {
        let new = Config::load(&self.cfg.path).map_err(|e| anyhow!("{e}"))?;
        if new.network.listen != self.cfg.network.listen
            || new.network.base_port != self.cfg.network.base_port
            || new.network.workers != self.cfg.network.workers
            || new.relay.identity_key != self.cfg.relay.identity_key
            || new.relay.exit_policy != self.cfg.relay.exit_policy
        {
            tracing::warn!("listen addresses, ports, workers, identity key or exit policy changed: restart the relay to apply them");
        }
        if new.relay.onion_key_dir.is_some() != self.cfg.relay.onion_key_dir.is_some() {
            tracing::info!("switching between relay.onion_keys and relay.onion_key_dir");
        }
        self.cfg.relay.onion_keys = new.relay.onion_keys;
        self.cfg.relay.onion_key_dir = new.relay.onion_key_dir;
        self.cfg.relay.peer_list = new.relay.peer_list;
        self.cfg.relay.peer_list_state = new.relay.peer_list_state;
        self.cfg.relay.authorities = new.relay.authorities;
        self.cfg.relay.authority_threshold = new.relay.authority_threshold;
        Ok(())
    }

    fn reload(&mut self) -> anyhow::Result<Reloaded> {
        self.reread_config()?;
        let list = load_peer_list(&self.cfg, Some(self.loaded.peers.serial))?;
        let layout = list.params.layout().map_err(|e| anyhow!("{e}"))?;
        if layout != self.layout {
            return Err(anyhow!("the new peer list changes the network parameters (CELL/H_MAX); restart the relay to apply them"));
        }
        let onion = load_onion_keys(&self.cfg)?;
        // Record the serial before applying the list: a list whose serial cannot be
        // recorded is not applied, so a restart can never fall back below it.
        record_serial(&self.cfg, list.serial)?;
        let peers = peers_of(&list);
        self.keyring.update(secrets(&onion), sys::now_ms());
        let keyring = self.keyring.clone();
        self.broadcast(|| Control::SetPeers(peers.clone()));
        self.broadcast(|| Control::SetOnionKeys(keyring.clone()));
        self.loaded.peers = list;
        self.loaded.onion = onion;
        if self.list_expired {
            // verified above: the new list is within its validity window.
            self.list_expired = false;
            if !self.draining {
                self.broadcast(|| Control::SetAccepting(true));
            }
            tracing::info!("a valid peer list is in force again: accepting new circuits");
        }
        self.publish_info();
        tracing::info!(
            serial = self.loaded.peers.serial,
            peers = self.loaded.peers.relays.len(),
            "reloaded peer list and onion keys"
        );
        Ok(Reloaded {
            serial: self.loaded.peers.serial,
            peers: self.loaded.peers.relays.len() as u64,
            onion_keys: self.loaded.onion.len() as u64,
        })
    }

    fn rotate(&mut self) -> anyhow::Result<Rotated> {
        self.reread_config()?;
        let onion = load_onion_keys(&self.cfg)?;
        self.keyring.update(secrets(&onion), sys::now_ms());
        let keyring = self.keyring.clone();
        self.broadcast(|| Control::SetOnionKeys(keyring.clone()));
        self.loaded.onion = onion;
        self.publish_info();
        tracing::info!(
            onion_keys = self.loaded.onion.len(),
            newest = %self.loaded.onion[0].public,
            "onion keys rotated"
        );
        Ok(Rotated {
            onion_keys: self.onion_status(),
        })
    }

    /// The onion keys held, newest first: `public` (base64), `valid_until` (from the
    /// relay's own peer-list entry; null while not listed) and `created` (the number
    /// in the file name for keys from `relay.onion_key_dir`, else null).
    fn onion_status(&self) -> Vec<OnionKeyStatus> {
        self.loaded
            .onion
            .iter()
            .zip(self.onion_valid_until())
            .map(|(k, valid_until)| OnionKeyStatus {
                public: k.public.to_base64(),
                valid_until,
                created: k.created,
            })
            .collect()
    }

    /// The `status` document.
    pub fn status(&self) -> Status {
        let workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerStatus {
                index: i as u64,
                port: w.port,
                stats: w.stats.snapshot(),
            })
            .collect();
        let mut drops = std::collections::BTreeMap::new();
        for w in &workers {
            for (name, v) in &w.stats.drops {
                *drops.entry(name.clone()).or_insert(0) += v;
            }
        }
        Status {
            relay_id: self.loaded.identity.public().relay_id().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            draining: self.draining,
            accepting: !self.draining && !self.list_expired,
            stalled_workers: self.stalled.clone(),
            admin_refused: self.admin_refused.load(Ordering::Relaxed),
            cell: self.layout.cell as u64,
            h_max: self.layout.h_max as u64,
            circuits: workers.iter().map(|w| w.stats.circuits).sum(),
            drops,
            workers,
            peer_list: PeerListStatus {
                serial: self.loaded.peers.serial,
                valid_until: self.loaded.peers.valid_until,
                expired: self.list_expired,
                relays: self.loaded.peers.relays.len() as u64,
            },
            onion_keys: self.onion_status(),
            onion_key_dir: self
                .cfg
                .relay
                .onion_key_dir
                .as_ref()
                .map(|d| d.display().to_string()),
        }
    }

    /// The `peers` document: the list in force as its canonical signed text
    /// (`document`, what `shroudctl peers list --running` parses), its serial,
    /// validity and expiry, and its relays in short.
    fn peers(&self) -> Peers {
        let list = &self.loaded.peers;
        Peers {
            serial: list.serial,
            valid_until: list.valid_until,
            expired: self.list_expired,
            document: list.encode(),
            relays: list
                .relays
                .iter()
                .map(|r| PeerSummary {
                    id: r.relay_id().to_string(),
                    addr: r.addr.to_string(),
                    ports: r.ports,
                    exit: r.exit,
                    weight: r.weight,
                })
                .collect(),
        }
    }

    /// What the metrics endpoint serves: every worker's counters and the relay info
    /// (onion keys, peer list, draining), which the daemon keeps up to date.
    pub fn stats(&self) -> RelayMetrics {
        RelayMetrics {
            workers: self
                .workers
                .iter()
                .map(|w| (w.port, w.stats.clone()))
                .collect(),
            info: self.info.clone(),
            admin_refused: self.admin_refused.clone(),
        }
    }

    /// Runs the control loop until the relay stops. Returns when every worker ended.
    pub fn run(mut self, events: Receiver<Event>) -> anyhow::Result<()> {
        let watchdog = sd_watchdog();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let tick = watchdog.map(|w| w / 2).unwrap_or(Duration::from_secs(1));
        // Workers loop at least every 50 ms (their I/O wait times out), so one
        // second without a loop is a stuck worker.
        let look_every = tick.min(Duration::from_secs(1));
        let mut last_look = Instant::now();
        loop {
            if self.workers.iter().all(|w| w.thread.is_finished()) {
                break;
            }
            self.check_peer_list_expiry();
            match events.recv_timeout(tick) {
                Ok(Event::Reload(reply)) => {
                    let r = self.reload();
                    self.reloads.last_ok = r.is_ok();
                    if let Err(e) = &r {
                        self.reloads.failed += 1;
                        tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the last good peer list and keys");
                    } else {
                        self.reloads.succeeded += 1;
                        self.reloads.last_success_s = now_s();
                    }
                    self.publish_info();
                    answer(reply, r);
                }
                Ok(Event::Rotate(reply)) => {
                    let r = self.rotate();
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "rotation failed; keeping the current onion keys");
                    }
                    answer(reply, r);
                }
                Ok(Event::Drain(timeout, reply)) => {
                    self.draining = true;
                    self.publish_info();
                    let deadline_ms = drain_deadline(sys::now_ms(), timeout);
                    self.broadcast(|| Control::Drain { deadline_ms });
                    tracing::info!(
                        timeout_s = timeout.as_secs(),
                        "draining: refusing new circuits, waiting for existing ones"
                    );
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                    answer(
                        reply,
                        Ok(Draining {
                            draining: true,
                            deadline_ms,
                        }),
                    );
                }
                Ok(Event::Stop(reply)) => {
                    self.broadcast(|| Control::Stop);
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                    answer(reply, Ok(Stopping { stopping: true }));
                }
                Ok(Event::Query(what, reply)) => {
                    let r = match what {
                        Query::Status => Reply::ok(self.status()),
                        Query::Stats => Reply::ok(
                            self.workers
                                .iter()
                                .map(|w| w.stats.snapshot())
                                .collect::<Vec<_>>(),
                        ),
                        Query::Peers => Reply::ok(self.peers()),
                    };
                    let _ = reply.send(r);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    self.broadcast(|| Control::Stop);
                }
            }
            if last_look.elapsed() >= look_every {
                last_look = Instant::now();
                self.look_at_workers();
                // The watchdog is fed only while every worker makes progress: a stuck
                // worker lets systemd restart the relay (WatchdogSec).
                if watchdog.is_some() && self.stalled.is_empty() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
        for (i, w) in self.workers.into_iter().enumerate() {
            match w.thread.join() {
                Ok(Ok(exit)) => tracing::info!(worker = i, ?exit, "worker ended"),
                Ok(Err(e)) => tracing::error!(worker = i, error = %e, "worker failed"),
                Err(_) => tracing::error!(worker = i, "worker panicked"),
            }
        }
        Ok(())
    }
}

/// The workers whose loop count did not move between two looks (`before`, `now`,
/// by worker index), ended ones excepted. A worker missing from `before` (none
/// looked yet) counts as moving.
pub fn stalled_workers(before: &[u64], now: &[u64], ended: &[bool]) -> Vec<usize> {
    now.iter()
        .enumerate()
        .filter(|&(i, n)| before.get(i) == Some(n) && !ended.get(i).copied().unwrap_or(false))
        .map(|(i, _)| i)
        .collect()
}

fn answer<T: serde::Serialize>(reply: Option<Sender<Reply>>, r: anyhow::Result<T>) {
    if let Some(tx) = reply {
        let _ = tx.send(match r {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::error(format!("{e:#}")),
        });
    }
}

fn sd_watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec))
}

/// Creates the admin socket at `path`, owner-only (0600) from the moment the path
/// exists, replacing a stale socket left by an earlier run.
///
/// Binding at `path` and then `chmod`ing would leave a window in which the socket
/// exists with the permissions the umask allows (typically 0755, and connecting
/// needs only write permission on the socket, so a 0757 or 0777 one would be open
/// to everyone). Setting the umask around `bind` is not safe either: the umask is
/// process-wide, and other threads create files meanwhile. Instead the socket is
/// bound inside a fresh directory that only this user can enter (0700), set to 0600
/// there, and renamed into place; `rename` is atomic, so `path` goes from "absent
/// or the old socket" to "the new socket, 0600" with nothing in between.
pub fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("admin socket {}: not a file name", path.display()))?;
    let mut attempt = 0;
    let private = loop {
        let mut r = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut r);
        let d = dir.join(format!(
            ".{}.{:016x}.tmp",
            name.to_string_lossy(),
            u64::from_le_bytes(r)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => break d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot create a private directory in {}",
                    dir.display()
                )))
            }
        }
    };
    let inner = private.join(name);
    let result = (|| -> anyhow::Result<UnixListener> {
        // The umask may have taken bits from 0700; it can only have taken them.
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    result.with_context(|| format!("cannot bind admin socket {}", path.display()))
}

/// Whether a peer of the admin socket running as `peer_uid` may use it: only the
/// relay's own user (`own_uid`) and root. The socket's mode (0600) already keeps
/// other users out; this holds even if the mode or the directory is loosened by
/// mistake (a `chmod`, a shared runtime directory).
pub fn admin_peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

/// Checks the peer credentials (`SO_PEERCRED`, fixed at `connect`) of an accepted
/// admin connection. `Err` carries what to log at debug level.
fn check_admin_peer(conn: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(conn, PeerCredentials)
        .map_err(|e| format!("cannot read its credentials: {e}"))?;
    if admin_peer_allowed(cred.uid(), nix::unistd::geteuid().as_raw()) {
        Ok(())
    } else {
        Err(format!(
            "uid {} gid {} pid {}",
            cred.uid(),
            cred.gid(),
            cred.pid()
        ))
    }
}

/// Serves the admin socket: one JSON object per line in, one per line out.
/// Commands: `status`, `stats`, `peers`, `reload`, `rotate`, `drain` (optional
/// `timeout_s`, default 30), `shutdown`. The socket is created owner-only (0600,
/// [`bind_admin_socket`]), and every connection whose peer is neither the relay's
/// user nor root is closed unanswered and counted in `refused`.
pub fn serve_admin(
    path: &Path,
    events: Sender<Event>,
    refused: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = bind_admin_socket(path)?;
    Ok(std::thread::Builder::new()
        .name("shroud-admin".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(who) = check_admin_peer(&conn) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "refused an admin connection from a process that is neither the \
                         relay's user nor root"
                    );
                    tracing::debug!(peer = %who, "refused admin connection");
                    drop(conn);
                    continue;
                }
                let events = events.clone();
                let _ = std::thread::Builder::new()
                    .name("shroud-admin-conn".into())
                    .spawn(move || admin_conn(conn, events));
            }
        })?)
}

fn admin_conn(conn: UnixStream, events: Sender<Event>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_admin(&line, &events);
        if writeln!(out, "{}", reply.to_line()).is_err() {
            return;
        }
    }
}

fn handle_admin(line: &str, events: &Sender<Event>) -> Reply {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(message) => return Reply::error(message),
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let ev = match req {
        Request::Status => Event::Query(Query::Status, tx),
        Request::Stats => Event::Query(Query::Stats, tx),
        Request::Peers => Event::Query(Query::Peers, tx),
        Request::Reload => Event::Reload(Some(tx)),
        Request::Rotate => Event::Rotate(Some(tx)),
        Request::Drain { timeout_s } => Event::Drain(Duration::from_secs(timeout_s), Some(tx)),
        Request::Shutdown => Event::Stop(Some(tx)),
    };
    if events.send(ev).is_err() {
        return Reply::error("relay is shutting down");
    }
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| Reply::error("relay did not answer in time"))
}

/// Turns SIGHUP into reload, SIGINT into drain (30 s) and SIGTERM into stop.
pub fn forward_signals(events: Sender<Event>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("shroud-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                let ev = match s {
                    SIGHUP => Event::Reload(None),
                    SIGINT => Event::Drain(Duration::from_secs(30), None),
                    _ => Event::Stop(None),
                };
                if events.send(ev).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn a_worker_is_stalled_when_its_loop_count_stands_still() {
        assert_eq!(
            stalled_workers(&[5, 9], &[6, 10], &[false, false]),
            Vec::<usize>::new()
        );
        assert_eq!(stalled_workers(&[5, 9], &[6, 9], &[false, false]), vec![1]);
        assert_eq!(
            stalled_workers(&[5, 9], &[5, 9], &[false, false]),
            vec![0, 1]
        );
        // An ended worker is not stalled (the relay is stopping).
        assert_eq!(stalled_workers(&[5, 9], &[5, 9], &[true, false]), vec![1]);
        // Nothing to compare with yet.
        assert_eq!(
            stalled_workers(&[], &[5, 9], &[false, false]),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn a_huge_drain_timeout_saturates_instead_of_wrapping() {
        let now = 1_800_000_000_000;
        assert_eq!(drain_deadline(now, Duration::from_secs(30)), now + 30_000);
        // {"cmd":"drain","timeout_s":18446744073709551615} once wrapped the deadline
        // into the past (release) or panicked the main thread (debug).
        assert_eq!(drain_deadline(now, Duration::from_secs(u64::MAX)), u64::MAX);
        let req = Request::parse(r#"{"cmd":"drain","timeout_s":18446744073709551615}"#);
        assert_eq!(
            req,
            Ok(Request::Drain {
                timeout_s: u64::MAX
            })
        );
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shroud-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("keys")).unwrap();
        d
    }

    fn config(dir: &Path, onion: &str) -> Config {
        let text = format!(
            "[relay]\nidentity_key = \"id.key\"\n{onion}\npeer_list = \"peers.list\"\nauthorities = [\"AAAA\"]\n"
        );
        Config::parse(&text, &dir.join("relay.toml")).unwrap()
    }

    fn key(path: &Path, seed: u8, mode: u32) -> OnionPublic {
        let secret = OnionSecret::from_bytes(&[seed; 32]);
        std::fs::write(path, shroud_proto::keys::encode_key(&[seed; 32])).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        secret.public()
    }

    #[test]
    fn load_onion_keys_from_a_directory_takes_the_three_newest() {
        let d = temp("keydir");
        let k = d.join("keys");
        let p100 = key(&k.join("onion-100.key"), 1, 0o600);
        let p300 = key(&k.join("onion-300.key"), 3, 0o600);
        let p200 = key(&k.join("onion-200.key"), 2, 0o400);
        key(&k.join("onion-50.key"), 9, 0o600);
        std::fs::write(k.join("notes"), "not a key").unwrap();
        let cfg = config(&d, "onion_key_dir = \"keys\"");
        let keys = load_onion_keys(&cfg).unwrap();
        let got: Vec<(OnionPublic, Option<u64>)> =
            keys.iter().map(|k| (k.public, k.created)).collect();
        assert_eq!(
            got,
            vec![(p300, Some(300)), (p200, Some(200)), (p100, Some(100))]
        );
        // `rotate` re-reads the directory: a newer key appears, the oldest loaded
        // one drops out of the three.
        let p400 = key(&k.join("onion-400.key"), 4, 0o600);
        let keys = load_onion_keys(&cfg).unwrap();
        let got: Vec<OnionPublic> = keys.iter().map(|k| k.public).collect();
        assert_eq!(got, vec![p400, p300, p200]);
        // A loaded key file readable by others fails the whole load, naming it.
        key(&k.join("onion-300.key"), 3, 0o644);
        let e = format!("{:#}", load_onion_keys(&cfg).unwrap_err());
        assert!(e.contains("onion-300.key") && e.contains("chmod"), "{e}");
        // Two files with the same key are refused.
        key(&k.join("onion-300.key"), 4, 0o600);
        let e = format!("{:#}", load_onion_keys(&cfg).unwrap_err());
        assert!(e.contains("same key"), "{e}");
        // An empty directory is refused.
        std::fs::remove_dir_all(&k).unwrap();
        std::fs::create_dir(&k).unwrap();
        let e = format!("{:#}", load_onion_keys(&cfg).unwrap_err());
        assert!(e.contains("no onion key file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn admin_socket_is_created_0600_in_place_of_a_stale_file() {
        let d = temp("admin-bind");
        let path = d.join("run").join("admin.sock");
        std::fs::create_dir_all(d.join("run")).unwrap();
        std::fs::write(&path, "stale").unwrap();
        let listener = bind_admin_socket(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_socket(), "{meta:?}");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // The private directory it was bound in is gone; nothing else was left.
        let names: Vec<_> = std::fs::read_dir(d.join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.sock")]);
        // It is the listening socket.
        let _c = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn admin_peers_are_the_relays_user_and_root() {
        assert!(admin_peer_allowed(998, 998));
        assert!(admin_peer_allowed(0, 998));
        assert!(admin_peer_allowed(0, 0));
        assert!(!admin_peer_allowed(65534, 998));
        assert!(!admin_peer_allowed(998, 0));
    }

    /// Environment variable telling [`admin_peer_child`] which socket to try.
    const CHILD_SOCKET: &str = "SHROUD_TEST_ADMIN_PEER_SOCKET";

    /// Not a test by itself: [`admin_socket_refuses_other_users`] runs this test
    /// binary again under another uid with only this test, which connects to the
    /// admin socket, asks for `status` and prints what it got.
    #[test]
    #[ignore = "run by admin_socket_refuses_other_users as another user"]
    fn admin_peer_child() {
        let Some(path) = std::env::var_os(CHILD_SOCKET) else {
            return;
        };
        let result = (|| -> std::io::Result<String> {
            let mut s = UnixStream::connect(&path)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            writeln!(s, "{}", Request::Status.to_line())?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        })();
        match result {
            Ok(line) if !line.is_empty() => println!("CHILD-RESULT reply {}", line.trim()),
            Ok(_) => println!("CHILD-RESULT no reply (end of stream)"),
            Err(e) => println!("CHILD-RESULT no reply ({e})"),
        }
    }

    #[test]
    fn admin_socket_refuses_other_users() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to run a client as another user");
            return;
        }
        let d = temp("admin-peer");
        // Loosen every permission so that only the peer-credential check stands
        // between the other user and the relay.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = d.join("admin.sock");
        let (tx, rx) = crossbeam_channel::unbounded();
        let refused = Arc::new(AtomicU64::new(0));
        serve_admin(&path, tx, refused.clone()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let answered = Arc::new(AtomicU64::new(0));
        let n = answered.clone();
        std::thread::spawn(move || {
            for ev in rx {
                if let Event::Query(_, reply) = ev {
                    n.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Reply::ok(Status {
                        relay_id: "x".into(),
                        ..Status::default()
                    }));
                }
            }
        });
        // Runs `admin_peer_child` from this test binary, under `wrapper` if given.
        let ask = |wrapper: &[&str]| -> String {
            let exe = std::env::current_exe().unwrap();
            let mut cmd = match wrapper.split_first() {
                None => std::process::Command::new(&exe),
                Some((program, args)) => {
                    let mut c = std::process::Command::new(program);
                    c.args(args).arg(&exe);
                    c
                }
            };
            let out = cmd
                .args(["--exact", "daemon::tests::admin_peer_child"])
                .args(["--ignored", "--nocapture"])
                .env(CHILD_SOCKET, &path)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{out:?}");
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("CHILD-RESULT "))
                .unwrap_or_else(|| panic!("the child did not report: {stdout}"))
                .to_owned()
        };
        // The relay's own user gets its answer.
        let mine = ask(&[]);
        assert!(mine.starts_with("reply {\"ok\":true"), "{mine}");
        assert_eq!(refused.load(Ordering::Relaxed), 0);
        // nobody (65534) reaches the socket but is refused without an answer.
        let other = ask(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]);
        assert!(other.starts_with("no reply"), "{other}");
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        assert_eq!(answered.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn load_onion_keys_from_files_keeps_the_configured_order() {
        let d = temp("files");
        let a = key(&d.join("a.key"), 1, 0o600);
        let b = key(&d.join("b.key"), 2, 0o600);
        let cfg = config(&d, "onion_keys = [\"b.key\", \"a.key\"]");
        let keys = load_onion_keys(&cfg).unwrap();
        let got: Vec<(OnionPublic, Option<u64>)> =
            keys.iter().map(|k| (k.public, k.created)).collect();
        assert_eq!(got, vec![(b, None), (a, None)]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
