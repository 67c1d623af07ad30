//! The relay side as a state machine: `handle(src, cell, now) -> Action`.
//!
//! [`Relay`] owns everything one data-plane worker needs: its links (peer relays from
//! the signed peer list, and clients), a fixed-capacity circuit table, the onion keys
//! with their setup seen-filters, per-prefix budgets and the exit policy.
//! All tables are allocated in [`Relay::new`] and never grow: when full, the relay
//! refuses with a counted [`DropReason`].
//!
//! The caller passes each received cell (and its source address) to [`Relay::handle`],
//! or the cells of one datagram together to [`Relay::handle_batch`] (which strips the
//! layers of consecutive data cells as a batch, with the same result); either rewrites
//! each cell in place and says what to do with it. Time is an argument
//! (`now_ms`, milliseconds since the Unix epoch); nothing here reads a clock or does
//! I/O.
//!
//! A bad tag never tears a circuit down: the cell is dropped and counted, and the
//! circuit stays (see `docs/PROTOCOL.md`, "after a bad tag").
//!
//! The parts: `links` (who the relay talks to and with which header
//! keys), `circuits` (the circuit table), `limiter` (per-source setup
//! budgets), `setup` (setup admission and the onion keyring) and `batch` (a
//! datagram's cells handled together). This module holds the per-cell path:
//! [`Relay::handle`], forward and backward.

mod batch;
mod circuits;
mod keycache;
mod limiter;
mod links;
mod setup;

pub use batch::{CellBatch, CELL_BATCH};
pub use circuits::CircuitRef;
pub use links::{client_link_keys, peer_link_keys};
pub use setup::{OnionKeyring, SetupJournal, MAX_ONION_KEYS};

use std::collections::HashMap as StdHashMap;

/// The relay's tables hash with AES-based aHash under a random key per table:
/// cheaper than SipHash on the per-cell lookup, still keyed so clients choosing
/// circuit ids cannot aim collisions.
type HashMap<K, V> = StdHashMap<K, V, ahash::RandomState>;
use std::net::{IpAddr, SocketAddr};

use crate::aead::{Aead, BadTag};
use crate::cell::{counter_sub, Command, Header, HeaderKey, Layout};
use crate::keys::{IdentityKey, IdentityPublic, OnionSecret, RelayId};
use crate::layer::{
    add_backward, read_body, strip_forward, write_control, write_cover, write_payload, Body,
};
use crate::policy::ExitPolicy;
use crate::replay::WindowCheck;

use batch::{HeaderMasks, Protect, Received, Stripping};
use circuits::{CircuitTable, Direction, Hop};
use limiter::PrefixTable;
use links::{peer_link_keys as derive_peer_link_keys, Link, LinkKind, Links};

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
    /// The setup came from a client of another protocol version (REFUSED, so it
    /// learns why).
    Version,
    /// A cell for a client address that has not proved it receives (no cookie echoed
    /// yet) would have made the relay send it more than it received from it.
    Unvalidated,
    /// The setup asked this hop for mix mode (a mean delay) that it does not offer, or
    /// a mean delay above its maximum.
    Mix,
}

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [DropReason; 13] = [
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
        DropReason::Version,
        DropReason::Unvalidated,
        DropReason::Mix,
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
            DropReason::Version => "version",
            DropReason::Unvalidated => "unvalidated",
            DropReason::Mix => "mix",
        }
    }
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
    /// Mix mode: hold the rewritten cell for an exponential delay of mean `mean_ms`
    /// milliseconds (drawn by the data plane, independently per cell), then send it
    /// to `to`.
    Delay {
        /// Destination address.
        to: SocketAddr,
        /// Mean delay (ms) the client chose for this hop.
        mean_ms: u16,
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
    /// Entries of the cache of expanded layer keys (rounded up to a power of two; one
    /// per circuit and direction that carries cells, about 800 bytes each with `ring`).
    /// Circuits keep only their raw keys, so a circuit slot costs well under 1 KiB.
    pub key_cache: usize,
    /// Of those, circuits for which this worker is the exit (one exit socket each): a
    /// setup beyond it is refused before CREATED, so no circuit is announced open
    /// without room for its socket.
    pub max_exit_circuits: usize,
    /// Client links this worker can hold (peer links have a table of their own, one
    /// slot per port of the peer list).
    pub max_links: usize,
    /// Client links one source prefix (IPv4 /24, IPv6 /64) may hold.
    pub links_per_prefix: u32,
    /// Circuits the clients of one source prefix may hold.
    pub circuits_per_prefix: u32,
    /// Idle time after which a circuit is expired (ms).
    pub circuit_idle_ms: u64,
    /// Idle time after which a link (client or peer) with no circuits is forgotten (ms).
    pub link_idle_ms: u64,
    /// Accepted setup clock skew (s).
    pub setup_skew_s: u64,
    /// Setups remembered per onion key and filter generation.
    pub setup_filter_capacity: usize,
    /// Setups per second allowed per source prefix (token bucket rate).
    pub setup_rate: u32,
    /// Token bucket burst per source prefix.
    pub setup_burst: u32,
    /// Source prefixes tracked.
    pub setup_sources: usize,
    /// Setups per second given public-key work, all addresses without a link
    /// together (a garbage flood from many prefixes costs at most this much).
    pub newcomer_setup_rate: u32,
    /// RETRY replies per second per source prefix (bursts of two seconds' worth),
    /// once the newcomer budget is spent.
    pub retry_prefix_rate: u32,
    /// RETRY replies per second for all prefixes together (bursts of one second's
    /// worth); beyond either budget a setup is refused (`rate_limited`) unanswered.
    pub retry_rate: u32,
    /// Mix mode: the largest mean delay (ms) a setup may ask of this hop; 0 when the
    /// relay offers no mix mode. A setup asking more is refused (`mix`).
    pub max_mix_mean_ms: u16,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_circuits: 16384,
            key_cache: 4096,
            max_exit_circuits: 1024,
            max_links: 4096,
            links_per_prefix: 256,
            circuits_per_prefix: 1024,
            circuit_idle_ms: 300_000,
            link_idle_ms: 600_000,
            setup_skew_s: 120,
            setup_filter_capacity: 65536,
            setup_rate: 200,
            setup_burst: 400,
            setup_sources: 4096,
            newcomer_setup_rate: 50,
            retry_prefix_rate: 8,
            retry_rate: 10_000,
            max_mix_mean_ms: 0,
        }
    }
}

/// How far past its cookie a client's first forward counters may be (they start at
/// the cookie; the span allows for lost cells).
const COOKIE_SPAN: u64 = 1 << 16;

/// Counters a worker exports (cells handled per outcome).
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::ALL.len()],
    /// Forward data cells relayed or delivered.
    pub cells_forward: u64,
    /// Backward cells relayed.
    pub cells_backward: u64,
    /// Setups accepted.
    pub setups: u64,
    /// Circuits expired for idleness.
    pub expired_circuits: u64,
    /// Cover cells that ended here (exit), loop cover included.
    pub cover_received: u64,
    /// Loop cover cells this exit sent back as cover (each also in `cover_received`).
    pub loop_cover_returned: u64,
    /// Link padding cells sent on peer links (constant-rate links).
    pub link_padding_sent: u64,
    /// Link padding cells received from peers (dropped).
    pub link_padding_received: u64,
    /// X25519 operations spent on setup cells (one per onion key tried).
    pub setup_dh: u64,
    /// `RETRY` replies sent (setups from new addresses, under load, without a token).
    pub retries_sent: u64,
    /// Cells whose circuit's keys were not in the key cache and were expanded.
    pub key_cache_misses: u64,
}

/// One relay worker's protocol state.
pub struct Relay<A: Aead> {
    layout: Layout,
    limits: RelayLimits,
    me: RelayId,
    identity: IdentityKey,
    onion: OnionKeyring,
    peers: Vec<Peer>,
    peer_by_id: HashMap<RelayId, usize>,
    policy: ExitPolicy,
    links: Links,
    /// Header keys of the link to each peer (same index as `peers`), derived once.
    peer_keys: Vec<(HeaderKey, HeaderKey)>,
    circuits: CircuitTable<A>,
    prefixes: PrefixTable,
    stats: RelayStats,
    setup_budget: u32,
    accepting: bool,
    /// Live circuits for which this worker is the exit.
    exit_circuits: usize,
    /// Draws the cookies of CREATED replies to clients: AES-256 of a counter under a
    /// key drawn at start.
    cookies: CookieSource,
    /// Retry tokens: the secret MAC key, and the (public) key of `RETRY` replies.
    tokens: crate::retry::TokenKey,
    retry_key: A,
    /// Reused by [`Relay::expire`] for the slots and links it removes.
    scratch: Vec<u32>,
}

/// Unpredictable 48-bit cookies: `AES-256(key, n)` for `n = 0, 1, …`, key from the OS.
struct CookieSource {
    key: HeaderKey,
    next: u64,
}

impl CookieSource {
    fn new() -> Self {
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, k.as_mut());
        CookieSource {
            key: HeaderKey::new(&k),
            next: 0,
        }
    }

    fn block(&mut self) -> [u8; 16] {
        self.next += 1;
        let mut b = [0u8; 16];
        b[8..].copy_from_slice(&self.next.to_be_bytes());
        self.key.encrypt_block(b)
    }

    fn draw(&mut self) -> u64 {
        let out = self.block();
        let mut c = [0u8; 8];
        c[2..].copy_from_slice(&out[..6]);
        u64::from_be_bytes(c)
    }

    /// An unpredictable nonce for a `RETRY` reply (never the same twice).
    fn retry_nonce(&mut self) -> [u8; crate::retry::R_LEN] {
        let out = self.block();
        let mut n = [0u8; crate::retry::R_LEN];
        n.copy_from_slice(&out[..crate::retry::R_LEN]);
        n
    }
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
    ///
    /// The onion keys get a keyring of this worker's own; a process with several
    /// workers gives them one shared keyring with [`Relay::set_keyring`].
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
        let mut keyring = OnionKeyring::new(limits.setup_skew_s, limits.setup_filter_capacity);
        keyring.update(onion, now_ms);
        let mut r = Relay {
            layout,
            me,
            identity,
            onion: keyring,
            peers: Vec::new(),
            peer_by_id: HashMap::default(),
            policy,
            links: Links::new(0, limits.max_links),
            peer_keys: Vec::new(),
            circuits: CircuitTable::new(limits.max_circuits, limits.key_cache),
            prefixes: PrefixTable::new(
                limits.setup_rate,
                limits.setup_burst,
                limits.setup_sources,
                limits.links_per_prefix,
                limits.circuits_per_prefix,
            ),
            stats: RelayStats::default(),
            setup_budget: u32::MAX,
            accepting: true,
            exit_circuits: 0,
            cookies: CookieSource::new(),
            tokens: {
                let mut k = zeroize::Zeroizing::new([0u8; 32]);
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, k.as_mut());
                crate::retry::TokenKey::new(&k)
            },
            retry_key: crate::retry::retry_key(&me),
            scratch: Vec::with_capacity(limits.max_circuits.max(limits.max_links)),
            limits,
        };
        r.prefixes
            .set_newcomer_rate(r.limits.newcomer_setup_rate, now_ms);
        r.prefixes
            .set_retry_rates(r.limits.retry_prefix_rate, r.limits.retry_rate, now_ms);
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
        self.circuits.len()
    }

    /// Whether a link to `addr` exists (drivers keep per-address I/O state, such as
    /// the local socket a link uses, only while it does).
    pub fn has_link(&self, addr: &SocketAddr) -> bool {
        self.links.find(addr).is_some()
    }

    /// Live links: `(client links, peer links)`.
    pub fn link_counts(&self) -> (usize, usize) {
        self.links.counts()
    }

    /// Replaces the peer list. Links to relays that left are closed with their
    /// circuits; links and circuits of relays that stay are kept.
    ///
    /// The link keys of every peer are derived here (one X25519 each), so a link to a
    /// peer's port, or a cell spoofed from one, costs no public-key work later; the
    /// peer link table grows to one slot per port of the list.
    pub fn set_peers(&mut self, peers: Vec<Peer>) {
        self.peers = peers.into_iter().filter(|p| p.id != self.me).collect();
        self.peer_by_id = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, i))
            .collect();
        self.peer_keys = self
            .peers
            .iter()
            .map(|p| derive_peer_link_keys(&self.identity, &p.identity))
            .collect();
        let ports: usize = self
            .peers
            .iter()
            .map(|p| usize::from(p.ports.1.saturating_sub(p.ports.0)) + 1)
            .sum();
        self.links.grow_peers(ports);
        let links = self.limits.max_links + ports;
        self.scratch.reserve(links);
        let stale: Vec<u32> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind == LinkKind::Peer && self.peer_for_addr(l.addr).is_none())
            .map(|(i, _)| i)
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
        for slot in self.circuits.on_link(link) {
            self.remove_circuit(slot);
        }
        if let Some(l) = self.links.remove(link) {
            if l.kind == LinkKind::Client {
                self.prefixes.release_link(l.addr.ip());
            }
        }
    }

    /// The link to a peer relay's port, created (with its keys) on first use.
    fn peer_link(&mut self, addr: SocketAddr, now_ms: u64) -> Option<u32> {
        if let Some(l) = self.links.find(&addr) {
            return Some(l);
        }
        let p = self.peer_for_addr(addr)?;
        let (tx, rx) = self.peer_keys[p].clone();
        self.links.insert(Link {
            addr,
            kind: LinkKind::Peer,
            tx,
            rx,
            seed: [0; 16],
            circuits: 0,
            last_active: now_ms,
            validated: true,
            credit: 0,
            sent: 0,
        })
    }

    fn drop(&mut self, r: DropReason) -> Action {
        self.stats.drops[r as usize] += 1;
        Action::Drop(r)
    }

    /// Starts a batch of received cells: at most `setup_budget` client setup cells of
    /// this batch get the public-key work; further ones are dropped as
    /// [`DropReason::RateLimited`], so setups cannot starve data cells. Setups from
    /// peer relays are not counted: clients cannot starve them either.
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

    /// Computes the header masks of a received datagram's cells (`cells`, a whole
    /// number of cells from `src`, at most [`CELL_BATCH`]) into `masks`, in one
    /// pipelined AES call under the link's receive key, so that the cells need not
    /// make one latency-bound AES call each. Nothing when `src` has no link yet (its
    /// cells are setups, handled without) or the datagram holds one cell.
    fn header_masks(&self, src: SocketAddr, cells: &[u8], masks: &mut HeaderMasks) {
        masks.n = 0;
        if cells.len() < 2 * self.layout.cell {
            return;
        }
        let Some(link) = self.links.find(&src) else {
            return;
        };
        let Some(l) = self.links.get(link) else {
            return;
        };
        masks.link = link;
        masks.epoch = self.links.epoch();
        masks.n = l.rx.masks(cells, self.layout.cell, &mut masks.blocks);
    }

    /// Handles one received cell from `src`, rewriting it in place. A datagram's
    /// cells are better handled together ([`Relay::handle_batch`]); the result is the
    /// same.
    pub fn handle(&mut self, src: SocketAddr, cell: &mut [u8], now_ms: u64) -> Action {
        let received = self.receive(src, cell, now_ms, None);
        self.finish(received, src, cell, now_ms)
    }

    /// The first half of handling a cell: its link (a peer's is opened on its first
    /// cell), its header (unmasked with `masks`' cell `i` if that mask was computed
    /// under the key of this link, still unchanged), and what it is.
    fn receive(
        &mut self,
        src: SocketAddr,
        cell: &mut [u8],
        now_ms: u64,
        masks: Option<(&HeaderMasks, usize)>,
    ) -> Received {
        if cell.len() != self.layout.cell {
            return Received::Done(self.drop(DropReason::Malformed));
        }
        let link = match self.links.find(&src) {
            Some(l) => Some(l),
            None => {
                if self.peer_for_addr(src).is_some() {
                    match self.peer_link(src, now_ms) {
                        Some(l) => Some(l),
                        None => return Received::Done(self.drop(DropReason::Capacity)),
                    }
                } else {
                    None
                }
            }
        };
        let Some(link) = link else {
            return Received::Setup(None);
        };
        let epoch = self.links.epoch();
        let mask = masks.and_then(|(m, i)| m.get(link, epoch, i));
        let (kind, hdr) = {
            let Some(l) = self.links.get_mut(link) else {
                return Received::Done(self.drop(DropReason::Malformed));
            };
            l.last_active = now_ms;
            if !l.validated {
                l.credit = l.credit.saturating_add(cell.len() as u64);
            }
            let hdr = match mask {
                Some(m) => l.rx.unprotect_with(cell, m),
                None => l.rx.unprotect(cell),
            };
            (l.kind, hdr)
        };
        let hdr = match hdr {
            Ok(h) => h,
            Err(_) if kind == LinkKind::Client => return Received::Setup(Some(link)),
            Err(_) => return Received::Done(self.drop(DropReason::Malformed)),
        };
        if hdr.circuit == LINK_PADDING_ID && kind == LinkKind::Peer {
            // Constant-rate link padding from a peer: it ends here.
            self.stats.link_padding_received += 1;
            return Received::Done(Action::Consumed { event: None });
        }
        if hdr.command == Command::Setup {
            return Received::Setup(Some(link));
        }
        match self.circuits.lookup(link, hdr.circuit) {
            None => Received::Done(self.drop(DropReason::UnknownCircuit)),
            Some((slot, Direction::Forward)) => Received::Forward(slot, hdr),
            Some((slot, Direction::Backward)) => Received::Backward(slot, hdr),
        }
    }

    /// The second half of handling a received cell, one cell alone (a batch takes
    /// forward DATA cells its own way).
    fn finish(&mut self, r: Received, src: SocketAddr, cell: &mut [u8], now_ms: u64) -> Action {
        match r {
            Received::Done(a) => a,
            Received::Setup(link) => self.setup(src, link, cell, now_ms),
            Received::Forward(slot, hdr) => self.forward(slot, hdr, cell, now_ms),
            Received::Backward(slot, hdr) => self.backward(slot, hdr, cell),
        }
    }

    /// A forward cell: strip this hop's layer and pass it on (or deliver it, at the
    /// exit).
    fn forward(&mut self, slot: u32, hdr: Header, cell: &mut [u8], now_ms: u64) -> Action {
        let s = match self.forward_check(slot, hdr) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let misses = &mut self.stats.key_cache_misses;
        let Some(entry) = self.circuits.load_keys(slot, Direction::Forward, misses) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        let keys = self.circuits.keys_at(entry);
        let stripped = strip_forward(&self.layout, keys, hdr.command, s.counter, cell);
        self.forward_finish(&s, stripped, cell, now_ms, None)
    }

    /// Before a forward cell's layer is stripped: its command must be DATA or DESTROY
    /// and its counter new to the circuit's replay window.
    fn forward_check(&mut self, slot: u32, hdr: Header) -> Result<Stripping, Action> {
        if !matches!(hdr.command, Command::Data | Command::Destroy) {
            return Err(self.drop(DropReason::Malformed));
        }
        let circuit = self.circuits.handle(slot);
        let Some(c) = self.circuits.get_mut(slot) else {
            return Err(self.drop(DropReason::UnknownCircuit));
        };
        // This hop's counter: the header's plus this hop's secret shift.
        let counter = c.fwd.shifted(hdr.counter);
        if c.win_fwd.check(counter) == WindowCheck::Replay {
            return Err(self.drop(DropReason::Replay));
        }
        Ok(Stripping {
            circuit,
            hdr,
            counter,
        })
    }

    /// After a forward cell's layer was stripped (`stripped`): the replay window takes
    /// its counter (checked again: an earlier copy in the same batch may have taken
    /// it), and the cell goes on to the next hop or is delivered. With `later`, the
    /// header of a cell sent on is not protected here but noted in
    /// `later.0` as cell `later.1` of the batch, for the batch to protect with others
    /// on the same link.
    fn forward_finish(
        &mut self,
        s: &Stripping,
        stripped: Result<(), BadTag>,
        cell: &mut [u8],
        now_ms: u64,
        later: Option<(&mut Vec<Protect>, usize)>,
    ) -> Action {
        let layout = self.layout;
        let (slot, hdr, counter) = (s.circuit.slot, s.hdr, s.counter);
        if stripped.is_err() {
            return self.drop(DropReason::BadTag);
        }
        let Some(c) = self.circuits.get_mut_ref(s.circuit) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        if c.win_fwd.check(counter) == WindowCheck::Replay {
            return self.drop(DropReason::Replay);
        }
        c.win_fwd.commit(counter);
        self.stats.cells_forward += 1;
        // A client that starts its counters at the cookie of our CREATED received that
        // CREATED: its address is validated (an off-path spoofer cannot know the
        // cookie; a guess succeeds with probability 2^-32).
        let echoed = counter_sub(hdr.counter, c.cookie) < COOKIE_SPAN;
        let (prev_link, next, mix) = (c.prev_link, c.next, c.mix_mean_ms);
        let circuit = s.circuit;
        self.circuits.touch(slot, now_ms);
        if let Some(l) = self.links.get_mut(prev_link) {
            if !l.validated && echoed {
                l.validated = true;
            }
        }
        match next {
            Hop::Relay { link, id } => {
                let Some(l) = self.links.get_mut(link) else {
                    return self.drop(DropReason::UnknownCircuit);
                };
                let to = l.addr;
                let out = Header {
                    circuit: id,
                    counter,
                    command: hdr.command,
                };
                match later {
                    Some((protects, i)) => {
                        l.count_sent();
                        protects.push(Protect {
                            cell: i,
                            link,
                            hdr: out,
                        });
                    }
                    None => l.protect(cell, &out),
                }
                if hdr.command == Command::Destroy {
                    self.remove_circuit(slot);
                    Action::Send {
                        to,
                        event: Some(Event::Closed { circuit }),
                    }
                } else {
                    send_or_delay(to, mix)
                }
            }
            Hop::Exit { dest } => match hdr.command {
                Command::Data => match read_body(&layout, cell) {
                    Some(Body::Data(payload)) => Action::Deliver {
                        circuit,
                        dest,
                        payload,
                    },
                    Some(Body::Cover) => {
                        self.stats.cover_received += 1;
                        Action::Consumed { event: None }
                    }
                    Some(Body::Loop) => {
                        self.stats.cover_received += 1;
                        match self.exit_backward(circuit, None, cell) {
                            Ok(to) => {
                                self.stats.loop_cover_returned += 1;
                                send_or_delay(to, mix)
                            }
                            Err(reason) => Action::Drop(reason),
                        }
                    }
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

    /// A backward cell: add this hop's layer and relay it. It does not refresh the
    /// circuit's idle timer (backward traffic alone does not keep a circuit alive: a
    /// destination or a reflector could otherwise hold it open forever).
    fn backward(&mut self, slot: u32, hdr: Header, cell: &mut [u8]) -> Action {
        let layout = self.layout;
        if hdr.command == Command::Setup {
            return self.drop(DropReason::Malformed);
        }
        let circuit = self.circuits.handle(slot);
        let Some(c) = self.circuits.get_mut(slot) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        // Backward cells cannot be verified here (the layers are for the client); the
        // window still keeps a replayed one from being relayed twice.
        let counter = c.bwd.shifted(hdr.counter);
        if c.win_bwd.check(counter) == WindowCheck::Replay {
            return self.drop(DropReason::Replay);
        }
        let misses = &mut self.stats.key_cache_misses;
        let Some((c, keys)) = self.circuits.with_keys(slot, Direction::Backward, misses) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        c.win_bwd.commit(counter);
        add_backward(&layout, keys, hdr.command, counter, cell);
        let (prev_link, prev_id, mix) = (c.prev_link, c.prev_id, c.mix_mean_ms);
        let cookie = c.cookie;
        // A DESTROY or REFUSED ends the circuit here whether or not it can be sent on.
        let event = if matches!(hdr.command, Command::Destroy | Command::Refused) {
            self.remove_circuit(slot);
            Some(Event::Closed { circuit })
        } else {
            None
        };
        let Some(l) = self.links.get_mut(prev_link) else {
            return self.drop(DropReason::UnknownCircuit);
        };
        if !l.spend(cell.len()) {
            self.stats.drops[DropReason::Unvalidated as usize] += 1;
            return match event {
                Some(e) => Action::Consumed { event: Some(e) },
                None => Action::Drop(DropReason::Unvalidated),
            };
        }
        // To a client, a CREATED carries the cookie in place of the counter (the
        // client knows the counter of a CREATED without it).
        let header_counter = if l.kind == LinkKind::Client && hdr.command == Command::Created {
            cookie
        } else {
            counter
        };
        let to = l.addr;
        l.protect(
            cell,
            &Header {
                circuit: prev_id,
                counter: header_counter,
                command: hdr.command,
            },
        );
        self.stats.cells_backward += 1;
        match (hdr.command, event) {
            (Command::Data, None) => send_or_delay(to, mix),
            (_, event) => Action::Send { to, event },
        }
    }

    /// Mix mode: the mean delay (ms) the client chose for this hop of `circuit`, 0 for
    /// a plain circuit or a stale handle. The data plane asks it for what it delivers
    /// or originates as the exit.
    pub fn mix_mean_ms(&self, circuit: CircuitRef) -> u16 {
        self.circuits.get_ref(circuit).map_or(0, |c| c.mix_mean_ms)
    }

    /// Removes a circuit and releases its links' counts.
    fn remove_circuit(&mut self, slot: u32) {
        let Some(c) = self.circuits.remove(slot) else {
            return;
        };
        if let Some(l) = self.links.get_mut(c.prev_link) {
            l.circuits = l.circuits.saturating_sub(1);
            if l.kind == LinkKind::Client {
                self.prefixes.release_circuit(l.addr.ip());
            }
        }
        match c.next {
            Hop::Relay { link, .. } => {
                if let Some(l) = self.links.get_mut(link) {
                    l.circuits = l.circuits.saturating_sub(1);
                }
            }
            Hop::Exit { .. } => self.exit_circuits -= 1,
        }
    }

    /// Exit: wraps `payload` (a datagram from the circuit's destination) into a
    /// backward data cell in `cell` and returns where to send it. Fails with
    /// [`DropReason::UnknownCircuit`] for a stale handle and [`DropReason::Malformed`]
    /// for a payload longer than one cell carries, and with
    /// [`DropReason::Unvalidated`] when the circuit's client has not yet proved its
    /// address and received as much as it sent. A reply does not refresh the
    /// circuit's idle timer (`_now_ms` is unused): backward traffic alone does not
    /// keep a circuit alive.
    pub fn exit_reply(
        &mut self,
        circuit: CircuitRef,
        payload: &[u8],
        cell: &mut [u8],
        _now_ms: u64,
    ) -> Result<SocketAddr, DropReason> {
        let layout = self.layout;
        if cell.len() != layout.cell || payload.len() > layout.payload_max() {
            self.stats.drops[DropReason::Malformed as usize] += 1;
            return Err(DropReason::Malformed);
        }
        self.exit_backward(circuit, Some(payload), cell)
    }

    /// Exit: writes a backward data cell of `circuit` into `cell` carrying `payload`,
    /// or cover when `None`, and returns where to send it (see [`Relay::exit_reply`]).
    fn exit_backward(
        &mut self,
        circuit: CircuitRef,
        payload: Option<&[u8]>,
        cell: &mut [u8],
    ) -> Result<SocketAddr, DropReason> {
        let layout = self.layout;
        let misses = &mut self.stats.key_cache_misses;
        let Some((c, keys)) = self
            .circuits
            .with_keys_ref(circuit, Direction::Backward, misses)
            .filter(|(c, _)| matches!(c.next, Hop::Exit { .. }))
        else {
            self.stats.drops[DropReason::UnknownCircuit as usize] += 1;
            return Err(DropReason::UnknownCircuit);
        };
        let counter = c.bwd.shifted(c.exit_counter);
        let (prev_link, prev_id) = (c.prev_link, c.prev_id);
        let Some(l) = self.links.get_mut(prev_link) else {
            self.stats.drops[DropReason::UnknownCircuit as usize] += 1;
            return Err(DropReason::UnknownCircuit);
        };
        if !l.spend(layout.cell) {
            self.stats.drops[DropReason::Unvalidated as usize] += 1;
            return Err(DropReason::Unvalidated);
        }
        c.exit_counter += 1;
        cell[..layout.stack_end()].fill(0);
        match payload {
            Some(p) => {
                write_payload(&layout, cell, p);
            }
            None => write_cover(&layout, cell),
        }
        add_backward(&layout, keys, Command::Data, counter, cell);
        l.protect(
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

    /// Writes the backward `DESTROY` (origin marker, reason `expired`) that tells the
    /// client of the circuit in `slot` that it idled out (sequence number 0 of this
    /// hop, like a `REFUSED`; an exit's next one). Returns the client's address, or `None` if the address
    /// may not be sent another cell (unvalidated and out of credit).
    fn write_expired(&mut self, slot: u32, cell: &mut [u8]) -> Option<SocketAddr> {
        let layout = self.layout;
        if cell.len() != layout.cell {
            return None;
        }
        let misses = &mut self.stats.key_cache_misses;
        let (c, keys) = self.circuits.with_keys(slot, Direction::Backward, misses)?;
        let l = self.links.get_mut(c.prev_link)?;
        if !l.spend(layout.cell) {
            self.stats.drops[DropReason::Unvalidated as usize] += 1;
            return None;
        }
        cell[..layout.stack_end()].fill(0);
        write_control(&layout, cell, &[DropReason::Expired as u8]);
        // An exit (a 1-hop circuit) has sent the client sequence numbers already, over
        // which the client keeps a replay window: use its next one. Any other hop has
        // originated nothing on this circuit: 0, like a REFUSED.
        let sequence = match c.next {
            Hop::Exit { .. } => {
                c.exit_counter += 1;
                c.exit_counter - 1
            }
            Hop::Relay { .. } => 0,
        };
        let counter = c.bwd.shifted(sequence);
        add_backward(&layout, keys, Command::Destroy, counter, cell);
        l.protect(
            cell,
            &Header {
                circuit: c.prev_id,
                counter,
                command: Command::Destroy,
            },
        );
        Some(l.addr)
    }

    /// Exit: the socket for `circuit`, whose CREATED is in `cell`, could not be opened.
    /// Rewrites `cell` into a REFUSED (`capacity`) for the client instead, removes the
    /// circuit and returns where to send the cell (`None` for a stale handle). The
    /// CREATED was never sent, so the client learns the circuit failed at once.
    pub fn refuse_exit(&mut self, circuit: CircuitRef, cell: &mut [u8]) -> Option<SocketAddr> {
        let layout = self.layout;
        let reason = DropReason::Capacity;
        let slot = circuit.slot;
        let misses = &mut self.stats.key_cache_misses;
        let (c, keys) = self
            .circuits
            .with_keys_ref(circuit, Direction::Backward, misses)
            .filter(|(c, _)| matches!(c.next, Hop::Exit { .. }))?;
        write_control(&layout, cell, &[reason as u8]);
        cell[layout.stack_start()..layout.stack_end()].fill(0);
        let counter = c.bwd.shifted(0);
        add_backward(&layout, keys, Command::Refused, counter, cell);
        let (prev_link, prev_id) = (c.prev_link, c.prev_id);
        self.remove_circuit(slot);
        self.stats.drops[reason as usize] += 1;
        // The CREATED this replaces already spent the address's credit.
        let l = self.links.get_mut(prev_link)?;
        l.protect(
            cell,
            &Header {
                circuit: prev_id,
                counter,
                command: Command::Refused,
            },
        );
        Some(l.addr)
    }

    /// Removes circuits idle for longer than the limit and links (client or peer) with
    /// no circuits idle for longer than theirs (a peer link is made again, without
    /// public-key work, when next needed). Calls `closed` for each removed circuit.
    ///
    /// The client is told: for a circuit whose previous hop is a client (this relay is
    /// its first hop, and the first to see it idle, since every hop's timer is
    /// refreshed by the same forward cells), `tell` is called with a writer that puts a
    /// backward `DESTROY` (reason `expired`) for the client into a cell and returns
    /// where to send it (`None`: not sendable, e.g. the address has no credit left).
    /// Later hops cannot be told (a relay cannot make a forward layer); their own
    /// timers remove the circuit.
    pub fn expire(
        &mut self,
        now_ms: u64,
        mut closed: impl FnMut(CircuitRef),
        mut tell: impl FnMut(&mut dyn FnMut(&mut [u8]) -> Option<SocketAddr>),
    ) {
        // The scratch list keeps its capacity (every circuit slot and link), so expiry
        // allocates nothing.
        let mut idle = std::mem::take(&mut self.scratch);
        idle.clear();
        self.circuits
            .idle_into(now_ms, self.limits.circuit_idle_ms, &mut idle);
        for &slot in &idle {
            let circuit = self.circuits.handle(slot);
            let to_client = self
                .circuits
                .get_mut(slot)
                .and_then(|c| self.links.get(c.prev_link))
                .is_some_and(|l| l.kind == LinkKind::Client);
            if to_client {
                tell(&mut |cell| self.write_expired(slot, cell));
            }
            self.remove_circuit(slot);
            self.stats.expired_circuits += 1;
            closed(circuit);
        }
        idle.clear();
        let link_idle = self.limits.link_idle_ms;
        idle.extend(
            self.links
                .iter()
                .filter(|(_, l)| {
                    l.circuits == 0 && now_ms.saturating_sub(l.last_active) > link_idle
                })
                .map(|(i, _)| i),
        );
        for &l in &idle {
            self.close_link(l);
        }
        self.scratch = idle;
    }
}

/// The circuit id of link padding (no circuit has it: a routing slot naming id 0 is
/// invalid).
pub const LINK_PADDING_ID: u64 = 0;

impl<A: Aead> Relay<A> {
    /// Constant-rate links: tops up every peer link that carries circuits to `quota`
    /// cells since the previous call, with link padding cells. For each padding cell,
    /// `pad` is called with a writer that takes a cell filled with random bytes,
    /// protects a header (circuit [`LINK_PADDING_ID`], a counter from the cell's last
    /// bytes, `DATA`) over it and returns where to send it. To an observer of the link
    /// the padding is a cell like any other; the peer drops it
    /// (`link_padding_received`). Every peer link's count restarts at each call.
    pub fn pad_links(
        &mut self,
        quota: u32,
        mut pad: impl FnMut(&mut dyn FnMut(&mut [u8]) -> SocketAddr),
    ) {
        let mut due = std::mem::take(&mut self.scratch);
        due.clear();
        for (i, l) in self.links.iter() {
            if l.kind == LinkKind::Peer && l.circuits > 0 && l.sent < quota {
                due.push(i);
            }
        }
        for &i in &due {
            let Some(l) = self.links.get_mut(i) else {
                continue;
            };
            for _ in l.sent..quota {
                pad(&mut |cell| {
                    let mut c = [0u8; 8];
                    c[2..].copy_from_slice(&cell[cell.len() - 6..]);
                    let hdr = Header {
                        circuit: LINK_PADDING_ID,
                        counter: u64::from_be_bytes(c),
                        command: Command::Data,
                    };
                    l.tx.protect(cell, &hdr);
                    l.addr
                });
                self.stats.link_padding_sent += 1;
            }
        }
        self.links.reset_sent();
        self.scratch = due;
    }
}

/// A relayed data cell: sent at once on a plain circuit, held on a mixed one.
fn send_or_delay(to: SocketAddr, mix_mean_ms: u16) -> Action {
    if mix_mean_ms == 0 {
        Action::Send { to, event: None }
    } else {
        Action::Delay {
            to,
            mean_ms: mix_mean_ms,
        }
    }
}
