//! The circuit pool: QUIC connections to the gateway, each over its own circuit.
//!
//! Invariants:
//! - **Isolation.** Every isolation key (the SOCKS credentials, or none) has its own
//!   circuit; a circuit serves one key in its life (spares are built for no key and
//!   given to the first key that needs one).
//! - **Rotation.** A circuit older than `rotate_after_secs` takes no new streams; it
//!   is closed once its last stream ends.
//! - **Dead relays are avoided.** When a circuit fails (torn down, or its QUIC
//!   connection idles out because nothing comes back), each relay of its path is
//!   checked with a one-hop setup ([`relay_alive`]: a relay that answers, with
//!   `CREATED` or `REFUSED`, is alive); the silent ones are avoided by every path
//!   chosen for `dead_relay_secs`. If avoiding them leaves no path, they are not
//!   avoided (a path through a maybe-dead relay beats none).
//! - **Exit policies are honoured.** The peer list carries only the exit flag; an
//!   exit that refuses a circuit's destination (`REFUSED`, reason `policy`, from the
//!   last hop) is left out of later paths to that destination for
//!   `dead_relay_secs`, and the build is retried on another path.
//! - At most one stream circuit is built at a time; builds run on blocking threads
//!   and never hold the pool's lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use shroud_client::{choose_path_with, Client, ClientError, PathError, PathHop, PathRules};
use shroud_proto::keys::RelayId;

use crate::circuit::{Circuit, CircuitSpec, Mode};
use crate::config::ProxyConfig;
use crate::frag;

/// An isolation key: streams with different keys never share a circuit.
pub type IsoKey = Option<(Vec<u8>, Vec<u8>)>;

/// Pool counters (monotonic).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Circuits built.
    pub built: AtomicU64,
    /// Circuit builds that failed.
    pub build_failures: AtomicU64,
    /// Circuits found dead.
    pub died: AtomicU64,
    /// Relays found dead by the one-hop check.
    pub relays_dead: AtomicU64,
}

/// One circuit with its QUIC connection to the gateway.
#[derive(Debug)]
pub struct Entry {
    /// The connection.
    pub conn: quinn::Connection,
    /// The circuit.
    pub circuit: Circuit,
    /// When it was built.
    pub born: Instant,
    /// Streams open on it.
    pub streams: AtomicUsize,
    /// Set once its failure was handled ([`Pool::failed`]).
    reported: AtomicBool,
    _endpoint: quinn::Endpoint,
}

impl Entry {
    /// Whether it can carry streams (circuit and connection alive).
    pub fn alive(&self) -> bool {
        !self.circuit.is_dead() && self.conn.close_reason().is_none()
    }

    /// The relay ids of its path, first hop first.
    pub fn relays(&self) -> Vec<RelayId> {
        self.circuit.path.iter().map(|h| h.id).collect()
    }
}

#[derive(Default)]
struct State {
    by_key: HashMap<IsoKey, Arc<Entry>>,
    spare: Vec<Arc<Entry>>,
    retired: Vec<Arc<Entry>>,
}

/// The pool. See the [module docs](self).
pub struct Pool {
    cfg: Arc<ProxyConfig>,
    list: Arc<shroud_proto::peerlist::PeerList>,
    quic: quinn::ClientConfig,
    max_packet: u16,
    state: Mutex<State>,
    dead: Mutex<HashMap<RelayId, Instant>>,
    /// Exits that refused a destination by their exit policy (the peer list carries
    /// only the exit flag, not the policy): avoided for that destination.
    refused: Mutex<HashMap<(RelayId, SocketAddr), Instant>>,
    building: tokio::sync::Mutex<()>,
    /// Counters.
    pub stats: PoolStats,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether the relay at `hop` answers a one-hop setup towards `dest` within
/// `timeout` (blocking). `CREATED` or `REFUSED` both prove it alive.
pub fn relay_alive(
    list: &shroud_proto::peerlist::PeerList,
    bind: SocketAddr,
    hop: &PathHop,
    dest: SocketAddr,
    timeout: Duration,
) -> bool {
    let Ok(mut c) = Client::new(bind, list) else {
        return true;
    };
    match c.build_circuit(std::slice::from_ref(hop), dest, timeout) {
        Ok(id) => {
            let _ = c.destroy(id);
            true
        }
        Err(ClientError::Refused { .. }) => true,
        Err(ClientError::SetupTimeout { .. }) => false,
        // Local trouble says nothing about the relay.
        Err(_) => true,
    }
}

impl Pool {
    /// A pool for `cfg` (nothing is built until [`Pool::fill`] or a stream asks).
    pub fn new(cfg: Arc<ProxyConfig>) -> anyhow::Result<Arc<Pool>> {
        let layout = cfg.list.params.layout()?;
        let max_packet = u16::try_from(frag::max_packet(layout.payload_max()))?;
        anyhow::ensure!(
            max_packet >= 1200,
            "cells of this network carry {} bytes: two fragments cannot hold a 1200-byte QUIC packet",
            layout.payload_max()
        );
        let quic = crate::tls::client_config(cfg.cert_sha256, max_packet, cfg.idle_timeout())?;
        Ok(Arc::new(Pool {
            list: Arc::new(cfg.list.clone()),
            cfg,
            quic,
            max_packet,
            state: Mutex::new(State::default()),
            dead: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            building: tokio::sync::Mutex::new(()),
            stats: PoolStats::default(),
        }))
    }

    fn avoided(&self) -> Vec<RelayId> {
        let keep = Duration::from_secs(self.cfg.file.circuits.dead_relay_secs);
        let Ok(mut d) = self.dead.lock() else {
            return Vec::new();
        };
        d.retain(|_, t| t.elapsed() < keep);
        d.keys().copied().collect()
    }

    fn refused_for(&self, dest: SocketAddr) -> Vec<RelayId> {
        let keep = Duration::from_secs(self.cfg.file.circuits.dead_relay_secs);
        let Ok(mut r) = self.refused.lock() else {
            return Vec::new();
        };
        r.retain(|_, t| t.elapsed() < keep);
        r.keys().filter(|k| k.1 == dest).map(|k| k.0).collect()
    }

    /// A path to `dest` for a new circuit under the configured rules.
    pub fn choose(
        &self,
        exit: Option<RelayId>,
        dest: SocketAddr,
    ) -> Result<Vec<PathHop>, PathError> {
        let c = &self.cfg.file.circuits;
        let mut avoid = self.avoided();
        avoid.extend(self.refused_for(dest));
        let mut rules = PathRules {
            exit,
            distinct_subnets: c.distinct_subnets,
            avoid,
        };
        let now = now_s();
        match choose_path_with(&self.list, c.hops, true, &rules, now, &mut OsRng) {
            Ok(p) => Ok(p),
            Err(e) if !rules.avoid.is_empty() => {
                tracing::warn!(error = %e, "no path avoids the relays noticed dead; using them");
                rules.avoid.clear();
                choose_path_with(&self.list, c.hops, true, &rules, now, &mut OsRng)
            }
            Err(e) => Err(e),
        }
    }

    /// Builds a circuit in `mode` to `dest` (blocking thread), trying up to three
    /// paths.
    pub async fn build_circuit(
        self: &Arc<Self>,
        dest: SocketAddr,
        exit: Option<RelayId>,
        mode: Mode,
    ) -> anyhow::Result<(Circuit, tokio::sync::mpsc::Receiver<Vec<u8>>)> {
        let mut last = None;
        for _ in 0..3 {
            let path = self.choose(exit, dest)?;
            let spec = CircuitSpec {
                list: self.list.clone(),
                path: path.clone(),
                dest,
                bind: self.cfg.file.proxy.bind,
                timeout: self.cfg.build_timeout(),
                mode,
            };
            match tokio::task::spawn_blocking(move || Circuit::build(spec)).await? {
                Ok(c) => {
                    self.stats.built.fetch_add(1, Ordering::Relaxed);
                    let ids: Vec<String> = path.iter().map(|h| h.id.to_string()).collect();
                    tracing::info!(path = %ids.join(","), %dest, "circuit built");
                    return Ok(c);
                }
                Err(e) => {
                    self.stats.build_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "circuit build failed");
                    match &e {
                        ClientError::SetupTimeout { .. } => self.check_relays(&path).await,
                        // The exit's policy refuses this destination: try other exits.
                        ClientError::Refused {
                            hop,
                            relay,
                            reason_name,
                            ..
                        } if *reason_name == "policy" && *hop + 1 == path.len() => {
                            if let Ok(mut r) = self.refused.lock() {
                                r.insert((*relay, dest), Instant::now());
                            }
                        }
                        _ => {}
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no circuit"), anyhow::Error::from))
    }

    /// Builds a stream circuit and connects QUIC over it.
    async fn build_entry(self: &Arc<Self>) -> anyhow::Result<Arc<Entry>> {
        let gw = self.cfg.file.gateway.addr;
        let (circuit, rx) = self
            .build_circuit(gw, self.cfg.exit, Mode::Fragmented)
            .await?;
        let sock = circuit.socket(rx, gw);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            crate::tls::endpoint_config(self.max_packet),
            None,
            Arc::new(sock),
            Arc::new(quinn::TokioRuntime),
        )?;
        let connecting = endpoint.connect_with(self.quic.clone(), gw, crate::tls::SERVER_NAME)?;
        let conn = match tokio::time::timeout(self.cfg.idle_timeout(), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.check_relays(&circuit.path).await;
                anyhow::bail!("QUIC handshake with the gateway over the circuit: {e}")
            }
            Err(_) => {
                self.check_relays(&circuit.path).await;
                anyhow::bail!("QUIC handshake with the gateway over the circuit timed out")
            }
        };
        Ok(Arc::new(Entry {
            conn,
            circuit,
            born: Instant::now(),
            streams: AtomicUsize::new(0),
            reported: AtomicBool::new(false),
            _endpoint: endpoint,
        }))
    }

    fn fresh(&self, e: &Entry) -> bool {
        e.alive()
            && e.born.elapsed() < Duration::from_secs(self.cfg.file.circuits.rotate_after_secs)
    }

    /// Keeps `prebuild` spare circuits built (call after startup and after a spare
    /// was taken).
    pub async fn fill(self: &Arc<Self>) {
        loop {
            let (n, dead) = {
                let Ok(mut s) = self.state.lock() else { return };
                let dead: Vec<Arc<Entry>> =
                    s.spare.iter().filter(|e| !e.alive()).cloned().collect();
                s.spare.retain(|e| self.fresh(e));
                (s.spare.len(), dead)
            };
            for e in &dead {
                self.failed(e).await;
            }
            if n >= self.cfg.file.circuits.prebuild {
                return;
            }
            let _g = self.building.lock().await;
            match self.build_entry().await {
                Ok(e) => {
                    if let Ok(mut s) = self.state.lock() {
                        s.spare.push(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "building a spare circuit failed");
                    return;
                }
            }
        }
    }

    /// The circuit for `key`: its current one if fresh and alive, else a spare, else
    /// a new one.
    pub async fn get(self: &Arc<Self>, key: &IsoKey) -> anyhow::Result<Arc<Entry>> {
        let failed = {
            let Ok(mut s) = self.state.lock() else {
                anyhow::bail!("pool lock poisoned")
            };
            match s.by_key.get(key) {
                Some(e) if self.fresh(e) => return Ok(e.clone()),
                Some(_) => s.by_key.remove(key),
                None => None,
            }
        };
        if let Some(old) = failed {
            if old.alive() {
                if let Ok(mut s) = self.state.lock() {
                    s.retired.push(old);
                }
            } else {
                self.failed(&old).await;
            }
        }
        let _g = self.building.lock().await;
        // Another task may have made one meanwhile.
        let (spare, dead) = {
            let Ok(mut s) = self.state.lock() else {
                anyhow::bail!("pool lock poisoned")
            };
            if let Some(e) = s.by_key.get(key).filter(|e| self.fresh(e)) {
                return Ok(e.clone());
            }
            let dead: Vec<Arc<Entry>> = s.spare.iter().filter(|e| !e.alive()).cloned().collect();
            s.spare.retain(|e| self.fresh(e));
            (s.spare.pop(), dead)
        };
        // A dead spare's relays are checked before a new path is chosen.
        for e in &dead {
            self.failed(e).await;
        }
        let e = match spare {
            Some(e) => e,
            None => self.build_entry().await?,
        };
        if let Ok(mut s) = self.state.lock() {
            s.by_key.insert(key.clone(), e.clone());
        }
        drop(_g);
        let ids: Vec<String> = e.relays().iter().map(|r| r.to_string()).collect();
        tracing::info!(
            path = %ids.join(","),
            local = %e.circuit.local(),
            credentials = key.is_some(),
            "circuit assigned"
        );
        let p = self.clone();
        tokio::spawn(async move { p.fill().await });
        Ok(e)
    }

    /// Reports that `e` failed a stream: it takes no more streams, its relays are
    /// checked, and the silent ones are avoided.
    pub async fn failed(self: &Arc<Self>, e: &Arc<Entry>) {
        if let Ok(mut s) = self.state.lock() {
            s.by_key.retain(|_, x| !Arc::ptr_eq(x, e));
            s.spare.retain(|x| !Arc::ptr_eq(x, e));
        }
        e.conn.close(0u32.into(), b"circuit failed");
        if !e.reported.swap(true, Ordering::AcqRel) {
            self.stats.died.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                why = e
                    .circuit
                    .why()
                    .unwrap_or_else(|| "QUIC connection lost".into()),
                "circuit failed"
            );
            self.check_relays(&e.circuit.path).await;
        }
    }

    /// Checks each relay of `path` with a one-hop setup (in parallel); remembers the
    /// silent ones as dead.
    pub async fn check_relays(self: &Arc<Self>, path: &[PathHop]) {
        let timeout = Duration::from_millis(self.cfg.file.circuits.build_timeout_ms.min(1500));
        let mut tasks = Vec::new();
        for hop in path.iter().cloned() {
            let list = self.list.clone();
            let bind = self.cfg.file.proxy.bind;
            let dest = self.cfg.file.gateway.addr;
            tasks.push(tokio::task::spawn_blocking(move || {
                (hop.id, relay_alive(&list, bind, &hop, dest, timeout))
            }));
        }
        for t in tasks {
            if let Ok((id, false)) = t.await {
                self.stats.relays_dead.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(relay = %id, "relay does not answer; avoiding it");
                if let Ok(mut d) = self.dead.lock() {
                    d.insert(id, Instant::now());
                }
            }
        }
    }

    /// Closes retired circuits whose streams have all ended (call periodically;
    /// [`Pool::fill`] handles dead spares).
    pub fn sweep(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        s.retired.retain(|e| {
            if e.streams.load(Ordering::Acquire) == 0 || !e.alive() {
                e.conn.close(0u32.into(), b"rotated");
                false
            } else {
                true
            }
        });
    }

    /// Relays currently avoided.
    pub fn dead_relays(&self) -> Vec<RelayId> {
        self.avoided()
    }
}
