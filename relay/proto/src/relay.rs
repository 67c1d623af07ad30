//! The relay side as a state machine: `handle(src, cell, now) -> Action`.
//!
//! [`Relay`] owns everything one data-plane worker needs: its links (peer relays from
//! the signed peer list, and clients), a fixed-capacity circuit table, the onion keys
//! with their setup seen-filters, a per-source setup rate limiter and the exit policy.
//! All tables are allocated in [`Relay::new`] and never grow: when full, the relay
//! refuses with a counted [`DropReason`].
//!
//! The caller passes each received cell (and its source address) to [`Relay::handle`],
//! which rewrites the cell in place and says what to do with it. Time is an argument
//! (`now_ms`, milliseconds since the Unix epoch); nothing here reads a clock or does
//! I/O.
//!
//! A bad tag never tears a circuit down: the cell is dropped and counted, and the
//! circuit stays (see `docs/PROTOCOL.md`, "after a bad tag").

use std::collections::HashMap as StdHashMap;

/// The relay's tables hash with AES-based aHash under a random key per table:
/// cheaper than SipHash on the per-cell lookup, still keyed so clients choosing
/// circuit ids cannot aim collisions.
type HashMap<K, V> = StdHashMap<K, V, ahash::RandomState>;
use std::net::{IpAddr, SocketAddr};

use hkdf::Hkdf;
use sha2::Sha256;

use crate::aead::Aead;
use crate::cell::{Command, Header, HeaderKey, Layout};
use crate::keys::{IdentityKey, IdentityPublic, OnionPublic, OnionSecret, RelayId};
use crate::layer::{
    add_backward, read_payload, strip_forward, write_control, write_payload, LayerKeys,
};
use crate::policy::ExitPolicy;
use crate::replay::{ReplayWindow, SetupCheck, SetupFilter, WindowCheck};
use crate::setup::{forward_setup, open_setup, Next, SetupError};

/// Why a cell was dropped. Each is a counter in the data plane, never a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// A tag did not verify (data cell on a known circuit, or a setup layer).
    BadTag = 0,
    /// Replayed data cell or setup cell.
    Replay,
    /// Header named no circuit of this relay.
    UnknownCircuit,
    /// Wrong length, undecodable header or routing, bad command for the direction,
    /// low-order ephemeral, duplicate circuit id.
    Malformed,
    /// Next hop or source not in the signed peer list.
    NotAPeer,
    /// Exit policy refused the destination (or this relay is no exit).
    Policy,
    /// A send queue was full (data plane).
    QueueFull,
    /// Setup rate limit of the source exceeded, or the setup filter is full.
    RateLimited,
    /// Setup timestamp outside the allowed skew, or circuit idle too long.
    Expired,
    /// Circuit or link table full.
    Capacity,
}

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [DropReason; 10] = [
        DropReason::BadTag,
        DropReason::Replay,
        DropReason::UnknownCircuit,
        DropReason::Malformed,
        DropReason::NotAPeer,
        DropReason::Policy,
        DropReason::QueueFull,
        DropReason::RateLimited,
        DropReason::Expired,
        DropReason::Capacity,
    ];

    /// Stable snake_case name (metrics label, JSON key).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadTag => "bad_tag",
            DropReason::Replay => "replay",
            DropReason::UnknownCircuit => "unknown_circuit",
            DropReason::Malformed => "malformed",
            DropReason::NotAPeer => "not_a_peer",
            DropReason::Policy => "policy",
            DropReason::QueueFull => "queue_full",
            DropReason::RateLimited => "rate_limited",
            DropReason::Expired => "expired",
            DropReason::Capacity => "capacity",
        }
    }
}

/// A handle on a circuit slot; stale handles (slot reused) are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CircuitRef {
    slot: u32,
    generation: u32,
}

/// Something the data plane may want to know besides sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An exit circuit was created towards `dest`.
    ExitOpened {
        /// The circuit.
        circuit: CircuitRef,
        /// Its destination.
        dest: SocketAddr,
    },
    /// A circuit was removed.
    Closed {
        /// The circuit.
        circuit: CircuitRef,
    },
}

/// What to do with a handled cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the rewritten cell to `to`.
    Send {
        /// Destination address.
        to: SocketAddr,
        /// A side effect to note.
        event: Option<Event>,
    },
    /// The setup was understood but refused: send the rewritten cell (a REFUSED reply)
    /// to `to`, and count `reason`.
    Refuse {
        /// Destination address (the previous hop).
        to: SocketAddr,
        /// Why.
        reason: DropReason,
    },
    /// Exit: deliver `cell[payload]` as one UDP datagram to `dest`.
    Deliver {
        /// The circuit (replies go back on it).
        circuit: CircuitRef,
        /// Destination.
        dest: SocketAddr,
        /// Payload range inside the cell.
        payload: core::ops::Range<usize>,
    },
    /// Nothing to send (padding consumed, or a circuit ended here).
    Consumed {
        /// A side effect to note.
        event: Option<Event>,
    },
    /// Drop the cell and count the reason.
    Drop(DropReason),
}

/// A relay of the peer list, as this relay sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Relay id.
    pub id: RelayId,
    /// Identity key (link keys are derived from it).
    pub identity: IdentityPublic,
    /// Address.
    pub addr: IpAddr,
    /// Inclusive port range.
    pub ports: (u16, u16),
}

/// Sizes and limits of a relay worker.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Circuits this worker can hold.
    pub max_circuits: usize,
    /// Links (peer ports and clients) this worker can hold.
    pub max_links: usize,
    /// Idle time after which a circuit is expired (ms).
    pub circuit_idle_ms: u64,
    /// Idle time after which a client link with no circuits is forgotten (ms).
    pub link_idle_ms: u64,
    /// Accepted setup clock skew (s).
    pub setup_skew_s: u64,
    /// Setups remembered per onion key and filter generation.
    pub setup_filter_capacity: usize,
    /// Setups per second allowed per source IP (token bucket rate).
    pub setup_rate: u32,
    /// Token bucket burst per source IP.
    pub setup_burst: u32,
    /// Source IPs tracked by the setup limiter.
    pub setup_sources: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_circuits: 16384,
            max_links: 4096,
            circuit_idle_ms: 300_000,
            link_idle_ms: 600_000,
            setup_skew_s: 120,
            setup_filter_capacity: 65536,
            setup_rate: 200,
            setup_burst: 400,
            setup_sources: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkKind {
    Peer,
    Client,
}

struct Link {
    addr: SocketAddr,
    kind: LinkKind,
    tx: HeaderKey,
    rx: HeaderKey,
    seed: [u8; 16],
    circuits: u32,
    last_active: u64,
}

enum Hop {
    Relay { link: u32, id: u64 },
    Exit { dest: SocketAddr },
}

struct Circuit<A: Aead> {
    generation: u32,
    prev_link: u32,
    prev_id: u64,
    next: Hop,
    fwd: LayerKeys<A>,
    bwd: LayerKeys<A>,
    win_fwd: ReplayWindow,
    win_bwd: ReplayWindow,
    exit_counter: u64,
    last_active: u64,
}

struct OnionSlot {
    secret: OnionSecret,
    public: OnionPublic,
    filter: SetupFilter,
}

struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// Derives the header-protection keys of the link between two relays from their
/// identity keys: `(tx, rx)` for `me`.
pub fn peer_link_keys(me: &IdentityKey, peer: &IdentityPublic) -> (HeaderKey, HeaderKey) {
    let secret = me.to_x25519_secret();
    let shared = secret.diffie_hellman(&peer.to_x25519());
    let my_id = me.public().relay_id();
    let peer_id = peer.relay_id();
    let (lo, hi) = if my_id < peer_id {
        (my_id, peer_id)
    } else {
        (peer_id, my_id)
    };
    let mut info = [0u8; 32];
    info[..16].copy_from_slice(lo.as_bytes());
    info[16..].copy_from_slice(hi.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(b"shroud-v1 link"), shared.as_bytes());
    let mut okm = zeroize::Zeroizing::new([0u8; 64]);
    hk.expand(&info, okm.as_mut())
        .unwrap_or_else(|_| unreachable!("64 bytes is within HKDF-SHA256's limit"));
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    let lo_to_hi = HeaderKey::new(&a);
    let hi_to_lo = HeaderKey::new(&b);
    if my_id < peer_id {
        (lo_to_hi, hi_to_lo)
    } else {
        (hi_to_lo, lo_to_hi)
    }
}

/// Derives a client link's header keys `(up, down)` (client-to-relay, relay-to-client)
/// from the client's link seed and the relay's id.
pub fn client_link_keys(seed: &[u8; 16], relay: &RelayId) -> (HeaderKey, HeaderKey) {
    let hk = Hkdf::<Sha256>::new(Some(b"shroud-v1 client-link"), seed);
    let mut okm = zeroize::Zeroizing::new([0u8; 64]);
    hk.expand(relay.as_bytes(), okm.as_mut())
        .unwrap_or_else(|_| unreachable!("64 bytes is within HKDF-SHA256's limit"));
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    (HeaderKey::new(&a), HeaderKey::new(&b))
}

/// Counters a worker exports (cells handled per outcome).
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; 10],
    /// Forward data cells relayed or delivered.
    pub cells_forward: u64,
    /// Backward cells relayed.
    pub cells_backward: u64,
    /// Setups accepted.
    pub setups: u64,
    /// Circuits expired for idleness.
    pub expired_circuits: u64,
}

/// One relay worker's protocol state.
pub struct Relay<A: Aead> {
    layout: Layout,
    limits: RelayLimits,
    me: RelayId,
    identity: IdentityKey,
    onion: Vec<OnionSlot>,
    peers: Vec<Peer>,
    peer_by_id: HashMap<RelayId, usize>,
    policy: ExitPolicy,
    links: Vec<Option<Link>>,
    free_links: Vec<u32>,
    link_by_addr: HashMap<SocketAddr, u32>,
    circuits: Vec<Option<Circuit<A>>>,
    generations: Vec<u32>,
    free_circuits: Vec<u32>,
    by_link_id: HashMap<(u32, u64), (u32, bool)>,
    buckets: HashMap<IpAddr, Bucket>,
    stats: RelayStats,
    setup_budget: u32,
    accepting: bool,
    live: usize,
}

impl<A: Aead> core::fmt::Debug for Relay<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Relay")
            .field("me", &self.me)
            .field("circuits", &self.circuit_count())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<A: Aead> Relay<A> {
    /// A relay worker with identity `identity`, current onion keys `onion` (newest
    /// first; at most 3), the peers of the signed list (itself excluded or not: it is
    /// skipped), an exit policy and limits. Every table is allocated here.
    pub fn new(
        layout: Layout,
        identity: IdentityKey,
        onion: Vec<OnionSecret>,
        peers: Vec<Peer>,
        policy: ExitPolicy,
        limits: RelayLimits,
        now_ms: u64,
    ) -> Self {
        let me = identity.public().relay_id();
        let mut r = Relay {
            layout,
            me,
            identity,
            onion: Vec::with_capacity(3),
            peers: Vec::new(),
            peer_by_id: HashMap::default(),
            policy,
            links: (0..limits.max_links).map(|_| None).collect(),
            free_links: (0..limits.max_links as u32).rev().collect(),
            link_by_addr: HashMap::with_capacity_and_hasher(
                limits.max_links,
                ahash::RandomState::new(),
            ),
            circuits: (0..limits.max_circuits).map(|_| None).collect(),
            generations: vec![0; limits.max_circuits],
            free_circuits: (0..limits.max_circuits as u32).rev().collect(),
            by_link_id: HashMap::with_capacity_and_hasher(
                limits.max_circuits * 2,
                ahash::RandomState::new(),
            ),
            buckets: HashMap::with_capacity_and_hasher(
                limits.setup_sources,
                ahash::RandomState::new(),
            ),
            stats: RelayStats::default(),
            setup_budget: u32::MAX,
            accepting: true,
            live: 0,
            limits,
        };
        r.set_onion_keys(onion, now_ms);
        r.set_peers(peers);
        r
    }

    /// The network parameters in force.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// This relay's id.
    pub fn id(&self) -> RelayId {
        self.me
    }

    /// Counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Live circuits.
    pub fn circuit_count(&self) -> usize {
        self.live
    }

    /// Replaces the onion keys (newest first, at most 3). Filters of keys that stay are
    /// kept, so a rotation never reopens a replay window; circuits are untouched.
    pub fn set_onion_keys(&mut self, keys: Vec<OnionSecret>, now_ms: u64) {
        let mut old: Vec<OnionSlot> = std::mem::take(&mut self.onion);
        for secret in keys.into_iter().take(3) {
            let public = secret.public();
            let filter = match old.iter().position(|s| s.public == public) {
                Some(i) => old.swap_remove(i).filter,
                None => SetupFilter::new(
                    self.limits.setup_skew_s,
                    self.limits.setup_filter_capacity,
                    now_ms / 1000,
                ),
            };
            self.onion.push(OnionSlot {
                secret,
                public,
                filter,
            });
        }
    }

    /// The onion public keys in use, newest first.
    pub fn onion_publics(&self) -> Vec<OnionPublic> {
        self.onion.iter().map(|s| s.public).collect()
    }

    /// Replaces the peer list. Links to relays that left are closed with their
    /// circuits; links and circuits of relays that stay are kept.
    pub fn set_peers(&mut self, peers: Vec<Peer>) {
        self.peers = peers.into_iter().filter(|p| p.id != self.me).collect();
        self.peer_by_id = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, i))
            .collect();
        let stale: Vec<u32> = self
            .links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match l {
                Some(l) if l.kind == LinkKind::Peer && self.peer_for_addr(l.addr).is_none() => {
                    Some(i as u32)
                }
                _ => None,
            })
            .collect();
        for link in stale {
            self.close_link(link);
        }
    }

    fn peer_for_addr(&self, addr: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| {
            p.addr == addr.ip() && addr.port() >= p.ports.0 && addr.port() <= p.ports.1
        })
    }

    fn close_link(&mut self, link: u32) {
        let doomed: Vec<u32> = self
            .by_link_id
            .iter()
            .filter(|((l, _), _)| *l == link)
            .map(|(_, (slot, _))| *slot)
            .collect();
        for slot in doomed {
            self.remove_circuit(slot);
        }
        if let Some(l) = self.links[link as usize].take() {
            self.link_by_addr.remove(&l.addr);
            self.free_links.push(link);
        }
    }

    fn new_link(
        &mut self,
        addr: SocketAddr,
        kind: LinkKind,
        keys: (HeaderKey, HeaderKey),
        seed: [u8; 16],
        now_ms: u64,
    ) -> Option<u32> {
        let idx = self.free_links.pop()?;
        self.links[idx as usize] = Some(Link {
            addr,
            kind,
            tx: keys.0,
            rx: keys.1,
            seed,
            circuits: 0,
            last_active: now_ms,
        });
        self.link_by_addr.insert(addr, idx);
        Some(idx)
    }

    fn peer_link(&mut self, addr: SocketAddr, now_ms: u64) -> Option<u32> {
        if let Some(&l) = self.link_by_addr.get(&addr) {
            return Some(l);
        }
        let p = self.peer_for_addr(addr)?;
        let keys = peer_link_keys(&self.identity, &self.peers[p].identity);
        self.new_link(addr, LinkKind::Peer, keys, [0; 16], now_ms)
    }

    fn drop(&mut self, r: DropReason) -> Action {
        self.stats.drops[r as usize] += 1;
        Action::Drop(r)
    }

    /// Starts a batch of received cells: at most `setup_budget` setup cells of this
    /// batch get the public-key work; further setups are dropped as
    /// [`DropReason::RateLimited`], so setups cannot starve data cells.
    pub fn begin_batch(&mut self, setup_budget: u32) {
        self.setup_budget = setup_budget;
    }

    /// Stops (or resumes) accepting new circuits, e.g. while draining. Refused setups
    /// are counted as [`DropReason::Capacity`]; existing circuits are not affected.
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// Counts a drop decided by the data plane (e.g. [`DropReason::QueueFull`]).
    pub fn count_drop(&mut self, r: DropReason, n: u64) {
        self.stats.drops[r as usize] += n;
    }

    /// Handles one received cell from `src`, rewriting it in place.
    pub fn handle(&mut self, src: SocketAddr, cell: &mut [u8], now_ms: u64) -> Action {
        if cell.len() != self.layout.cell {
            return self.drop(DropReason::Malformed);
        }
        let link = match self.link_by_addr.get(&src) {
            Some(&l) => Some(l),
            None => {
                if self.peer_for_addr(src).is_some() {
                    match self.peer_link(src, now_ms) {
                        Some(l) => Some(l),
                        None => return self.drop(DropReason::Capacity),
                    }
                } else {
                    None
                }
            }
        };
        let Some(link) = link else {
            return self.setup(src, None, cell, now_ms);
        };
        let (kind, hdr) = {
            let Some(l) = self.links[link as usize].as_mut() else {
                return self.drop(DropReason::Malformed);
            };
            l.last_active = now_ms;
            (l.kind, l.rx.unprotect(cell))
        };
        let hdr = match hdr {
            Ok(h) => h,
            Err(_) if kind == LinkKind::Client => return self.setup(src, Some(link), cell, now_ms),
            Err(_) => return self.drop(DropReason::Malformed),
        };
        if hdr.command == Command::Setup {
            return self.setup(src, Some(link), cell, now_ms);
        }
        let Some(&(slot, backward)) = self.by_link_id.get(&(link, hdr.circuit)) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        if backward {
            self.backward(slot, hdr, cell, now_ms)
        } else {
            self.forward(slot, hdr, cell, now_ms)
        }
    }

    fn forward(&mut self, slot: u32, hdr: Header, cell: &mut [u8], now_ms: u64) -> Action {
        let layout = self.layout;
        if !matches!(
            hdr.command,
            Command::Data | Command::Padding | Command::Destroy
        ) {
            return self.drop(DropReason::Malformed);
        }
        let Some(c) = self.circuits[slot as usize].as_mut() else {
            return self.drop(DropReason::UnknownCircuit);
        };
        if c.win_fwd.check(hdr.counter) == WindowCheck::Replay {
            return self.drop(DropReason::Replay);
        }
        if strip_forward(&layout, &c.fwd, hdr.command, hdr.counter, cell).is_err() {
            return self.drop(DropReason::BadTag);
        }
        c.win_fwd.commit(hdr.counter);
        c.last_active = now_ms;
        let generation = c.generation;
        self.stats.cells_forward += 1;
        let circuit = CircuitRef { slot, generation };
        match c.next {
            Hop::Relay { link, id } => {
                let Some(l) = self.links[link as usize].as_ref() else {
                    return self.drop(DropReason::UnknownCircuit);
                };
                let to = l.addr;
                l.tx.protect(
                    cell,
                    &Header {
                        circuit: id,
                        counter: hdr.counter,
                        command: hdr.command,
                    },
                );
                let event = if hdr.command == Command::Destroy {
                    self.remove_circuit(slot);
                    Some(Event::Closed { circuit })
                } else {
                    None
                };
                Action::Send { to, event }
            }
            Hop::Exit { dest } => match hdr.command {
                Command::Data => match read_payload(&layout, cell) {
                    Some(payload) => Action::Deliver {
                        circuit,
                        dest,
                        payload,
                    },
                    None => self.drop(DropReason::Malformed),
                },
                Command::Destroy => {
                    self.remove_circuit(slot);
                    Action::Consumed {
                        event: Some(Event::Closed { circuit }),
                    }
                }
                _ => Action::Consumed { event: None },
            },
        }
    }

    fn backward(&mut self, slot: u32, hdr: Header, cell: &mut [u8], now_ms: u64) -> Action {
        let layout = self.layout;
        let Some(c) = self.circuits[slot as usize].as_mut() else {
            return self.drop(DropReason::UnknownCircuit);
        };
        if hdr.command == Command::Setup {
            return self.drop(DropReason::Malformed);
        }
        if c.win_bwd.check(hdr.counter) == WindowCheck::Replay {
            return self.drop(DropReason::Replay);
        }
        c.win_bwd.commit(hdr.counter);
        c.last_active = now_ms;
        add_backward(&layout, &c.bwd, hdr.command, hdr.counter, cell);
        let (prev_link, prev_id, generation) = (c.prev_link, c.prev_id, c.generation);
        let Some(l) = self.links[prev_link as usize].as_ref() else {
            return self.drop(DropReason::UnknownCircuit);
        };
        let to = l.addr;
        l.tx.protect(
            cell,
            &Header {
                circuit: prev_id,
                counter: hdr.counter,
                command: hdr.command,
            },
        );
        self.stats.cells_backward += 1;
        let event = if matches!(hdr.command, Command::Destroy | Command::Refused) {
            self.remove_circuit(slot);
            Some(Event::Closed {
                circuit: CircuitRef { slot, generation },
            })
        } else {
            None
        };
        Action::Send { to, event }
    }

    fn rate_ok(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let rate = f64::from(self.limits.setup_rate);
        let burst = f64::from(self.limits.setup_burst);
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.limits.setup_sources {
            // Table full: forget sources whose bucket has refilled (they would start
            // full anyway); if none, refuse the newcomer rather than grow.
            self.buckets.retain(|_, b| {
                b.tokens + (now_ms.saturating_sub(b.last_ms) as f64 / 1000.0) * rate < burst
            });
            if self.buckets.len() >= self.limits.setup_sources {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last_ms: now_ms,
        });
        b.tokens =
            (b.tokens + (now_ms.saturating_sub(b.last_ms) as f64 / 1000.0) * rate).min(burst);
        b.last_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn setup(
        &mut self,
        src: SocketAddr,
        link: Option<u32>,
        cell: &mut [u8],
        now_ms: u64,
    ) -> Action {
        let layout = self.layout;
        if !self.accepting {
            return self.drop(DropReason::Capacity);
        }
        if self.setup_budget == 0 || !self.rate_ok(src.ip(), now_ms) {
            return self.drop(DropReason::RateLimited);
        }
        self.setup_budget -= 1;
        let mut opened = None;
        let mut bad_point = false;
        for (k, slot) in self.onion.iter().enumerate() {
            match open_setup::<A>(&layout, &slot.secret, slot.public.as_bytes(), cell) {
                Ok(x) => {
                    opened = Some((k, x));
                    break;
                }
                Err(SetupError::BadPoint) => bad_point = true,
                Err(SetupError::Malformed) => return self.drop(DropReason::Malformed),
                Err(SetupError::BadTag) => {}
            }
        }
        let Some((k, (secrets, routing))) = opened else {
            return self.drop(if bad_point {
                DropReason::Malformed
            } else {
                DropReason::BadTag
            });
        };
        let e = crate::setup::setup_ephemeral(&layout, cell);
        match self.onion[k]
            .filter
            .check_and_insert(&e, routing.timestamp, now_ms / 1000)
        {
            SetupCheck::Fresh => {}
            SetupCheck::Replay => return self.drop(DropReason::Replay),
            SetupCheck::Expired => return self.drop(DropReason::Expired),
            SetupCheck::Full => return self.drop(DropReason::RateLimited),
        }
        // The incoming link: known, or a client introducing itself with a link seed.
        let in_link = match link {
            Some(l) => l,
            None => {
                if routing.link_seed == [0; 16] {
                    return self.drop(DropReason::NotAPeer);
                }
                let keys = client_link_keys(&routing.link_seed, &self.me);
                // Client keys are (up, down) = (relay rx, relay tx).
                match self.new_link(
                    src,
                    LinkKind::Client,
                    (keys.1, keys.0),
                    routing.link_seed,
                    now_ms,
                ) {
                    Some(l) => l,
                    None => return self.drop(DropReason::Capacity),
                }
            }
        };
        if let Some(l) = self.links[in_link as usize].as_mut() {
            if l.kind == LinkKind::Client
                && l.circuits == 0
                && routing.link_seed != [0; 16]
                && routing.link_seed != l.seed
            {
                // The client restarted with a new seed and holds no circuit here: adopt it.
                let keys = client_link_keys(&routing.link_seed, &self.me);
                l.tx = keys.1;
                l.rx = keys.0;
                l.seed = routing.link_seed;
            }
        }
        if self.by_link_id.contains_key(&(in_link, routing.in_id)) {
            return self.drop(DropReason::Malformed);
        }
        let fwd = secrets.forward::<A>();
        let bwd = secrets.backward::<A>();
        let refuse = |relay: &mut Self, cell: &mut [u8], reason: DropReason| -> Action {
            relay.stats.drops[reason as usize] += 1;
            write_control(&layout, cell, &[reason as u8]);
            cell[layout.stack_start()..layout.stack_end()].fill(0);
            add_backward(&layout, &bwd, Command::Refused, 0, cell);
            if let Some(l) = relay.links[in_link as usize].as_ref() {
                l.tx.protect(
                    cell,
                    &Header {
                        circuit: routing.in_id,
                        counter: 0,
                        command: Command::Refused,
                    },
                );
            }
            Action::Refuse { to: src, reason }
        };
        let next = match routing.next {
            Next::Relay { id, port, out_id } => {
                let Some(&p) = self.peer_by_id.get(&id) else {
                    return refuse(self, cell, DropReason::NotAPeer);
                };
                let peer = &self.peers[p];
                if port < peer.ports.0 || port > peer.ports.1 {
                    return refuse(self, cell, DropReason::NotAPeer);
                }
                let to = SocketAddr::new(peer.addr, port);
                let Some(out_link) = self.peer_link(to, now_ms) else {
                    return refuse(self, cell, DropReason::Capacity);
                };
                if self.by_link_id.contains_key(&(out_link, out_id)) {
                    return refuse(self, cell, DropReason::Malformed);
                }
                Hop::Relay {
                    link: out_link,
                    id: out_id,
                }
            }
            Next::Exit { dest } => {
                if !self.policy.allows(&dest) {
                    return refuse(self, cell, DropReason::Policy);
                }
                Hop::Exit { dest }
            }
        };
        let Some(slot) = self.free_circuits.pop() else {
            return refuse(self, cell, DropReason::Capacity);
        };
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        let generation = self.generations[slot as usize];
        let circuit = CircuitRef { slot, generation };
        self.by_link_id
            .insert((in_link, routing.in_id), (slot, false));
        if let Some(l) = self.links[in_link as usize].as_mut() {
            l.circuits += 1;
        }
        let action = match next {
            Hop::Relay { link: out_link, id } => {
                self.by_link_id.insert((out_link, id), (slot, true));
                let l = self.links[out_link as usize]
                    .as_mut()
                    .unwrap_or_else(|| unreachable!("peer_link returned a live link"));
                l.circuits += 1;
                forward_setup(&layout, &secrets, &routing, cell);
                l.tx.protect(
                    cell,
                    &Header {
                        circuit: id,
                        counter: 0,
                        command: Command::Setup,
                    },
                );
                Action::Send {
                    to: l.addr,
                    event: None,
                }
            }
            Hop::Exit { dest } => {
                write_control(&layout, cell, &[]);
                cell[layout.stack_start()..layout.stack_end()].fill(0);
                add_backward(&layout, &bwd, Command::Created, 0, cell);
                if let Some(l) = self.links[in_link as usize].as_ref() {
                    l.tx.protect(
                        cell,
                        &Header {
                            circuit: routing.in_id,
                            counter: 0,
                            command: Command::Created,
                        },
                    );
                }
                Action::Send {
                    to: src,
                    event: Some(Event::ExitOpened { circuit, dest }),
                }
            }
        };
        self.circuits[slot as usize] = Some(Circuit {
            generation,
            prev_link: in_link,
            prev_id: routing.in_id,
            next,
            fwd,
            bwd,
            win_fwd: ReplayWindow::new(),
            win_bwd: ReplayWindow::new(),
            exit_counter: 1,
            last_active: now_ms,
        });
        self.stats.setups += 1;
        self.live += 1;
        action
    }

    fn remove_circuit(&mut self, slot: u32) {
        let Some(c) = self.circuits[slot as usize].take() else {
            return;
        };
        self.live -= 1;
        self.by_link_id.remove(&(c.prev_link, c.prev_id));
        if let Some(l) = self.links[c.prev_link as usize].as_mut() {
            l.circuits = l.circuits.saturating_sub(1);
        }
        if let Hop::Relay { link, id } = c.next {
            self.by_link_id.remove(&(link, id));
            if let Some(l) = self.links[link as usize].as_mut() {
                l.circuits = l.circuits.saturating_sub(1);
            }
        }
        self.free_circuits.push(slot);
    }

    /// Exit: wraps `payload` (a datagram from the circuit's destination) into a
    /// backward data cell in `cell` and returns where to send it. Fails with
    /// [`DropReason::UnknownCircuit`] for a stale handle and [`DropReason::Malformed`]
    /// for a payload longer than one cell carries.
    pub fn exit_reply(
        &mut self,
        circuit: CircuitRef,
        payload: &[u8],
        cell: &mut [u8],
        now_ms: u64,
    ) -> Result<SocketAddr, DropReason> {
        let layout = self.layout;
        if cell.len() != layout.cell || payload.len() > layout.payload_max() {
            self.stats.drops[DropReason::Malformed as usize] += 1;
            return Err(DropReason::Malformed);
        }
        let Some(c) = self.circuits[circuit.slot as usize]
            .as_mut()
            .filter(|c| c.generation == circuit.generation && matches!(c.next, Hop::Exit { .. }))
        else {
            self.stats.drops[DropReason::UnknownCircuit as usize] += 1;
            return Err(DropReason::UnknownCircuit);
        };
        let counter = c.exit_counter;
        c.exit_counter += 1;
        c.last_active = now_ms;
        cell[..layout.stack_end()].fill(0);
        write_payload(&layout, cell, payload);
        add_backward(&layout, &c.bwd, Command::Data, counter, cell);
        let (prev_link, prev_id) = (c.prev_link, c.prev_id);
        let Some(l) = self.links[prev_link as usize].as_ref() else {
            return Err(DropReason::UnknownCircuit);
        };
        l.tx.protect(
            cell,
            &Header {
                circuit: prev_id,
                counter,
                command: Command::Data,
            },
        );
        self.stats.cells_backward += 1;
        Ok(l.addr)
    }

    /// Removes circuits idle for longer than the limit and client links with no
    /// circuits idle for longer than theirs. Calls `closed` for each removed circuit.
    pub fn expire(&mut self, now_ms: u64, mut closed: impl FnMut(CircuitRef)) {
        let idle = self.limits.circuit_idle_ms;
        let stale: Vec<u32> = self
            .circuits
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Some(c) if now_ms.saturating_sub(c.last_active) > idle => Some(i as u32),
                _ => None,
            })
            .collect();
        for slot in stale {
            let generation = self.generations[slot as usize];
            self.remove_circuit(slot);
            self.stats.expired_circuits += 1;
            closed(CircuitRef { slot, generation });
        }
        let link_idle = self.limits.link_idle_ms;
        let idle_links: Vec<u32> = self
            .links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match l {
                Some(l)
                    if l.kind == LinkKind::Client
                        && l.circuits == 0
                        && now_ms.saturating_sub(l.last_active) > link_idle =>
                {
                    Some(i as u32)
                }
                _ => None,
            })
            .collect();
        for l in idle_links {
            self.close_link(l);
        }
    }
}
