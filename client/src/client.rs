//! [`Client`]: one UDP socket, the links and circuits built through it.
//!
//! # Invariants
//!
//! - **One link per relay endpoint.** The client holds exactly one
//!   [`ClientLink`] per relay address and port it talks to (created on first use,
//!   replaced only if the relay id at that endpoint changes). All circuits whose first
//!   hop is that endpoint share it, since the relay keys its link by our socket address.
//! - **Every received datagram is a whole number of cells** or it is dropped and
//!   counted (`malformed`); with `UDP_GRO` ([`crate::udp`]) a read holds a run of
//!   datagrams and each is checked on its own, so a bad one costs only itself. Every cell goes through [`ClientLink::read_header`] of the
//!   link of its source, then through its circuit's `open`, which authenticates every
//!   layer and checks the replay window. A cell that fails anywhere is counted
//!   (`unknown` or `rejected`) and dropped silently: it never reaches the caller and
//!   never changes a circuit's state.
//! - **Nothing received is lost while waiting for something else.** Payloads and
//!   teardowns that arrive during [`Client::build_circuit`] are queued (bounded by
//!   [`ClientConfig::queue_limit`]; overflow is counted in `queue_dropped`) and
//!   returned by the next [`Client::recv`] calls, in arrival order.
//! - **Bounded waits.** [`Client::recv`] and [`Client::build_circuit`] return by their
//!   deadline (plus scheduling delay), and not before it with `Timeout`: the socket
//!   read timeout in place is never longer than the time left (it is reset only when
//!   it would be, or when it is under half of it), and a wait that ends early loops.
//! - **Circuit ids are unique within a client** (they key the circuit map): a freshly
//!   built circuit whose random first-link id collides with a live one is rebuilt.
//! - Circuits that are refused, torn down by a hop ([`ClientError::CircuitClosed`]) or
//!   destroyed by [`Client::destroy`] are forgotten: later calls with their id fail
//!   with [`ClientError::UnknownCircuit`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use shroud_proto::cell::{cells_mut, Layout};
use shroud_proto::client::{
    CircuitState, ClientCircuit, ClientError as ProtoError, ClientLink, PathHop, Received,
};
use shroud_proto::keys::RelayId;
use shroud_proto::peerlist::{ParamsError, PeerList};
use shroud_proto::relay::DropReason;
use shroud_proto::retry::{apply_token, open_retry, retry_key, TOKEN_LEN};
use shroud_proto::DefaultAead;

/// `RETRY`s answered per setup attempt: a relay that asks again for a token it was
/// just sent is not worth more round trips within one attempt.
pub const MAX_RETRIES: u32 = 2;

/// Largest UDP payload; the receive buffer holds one whole datagram.
const MAX_DATAGRAM: usize = 65536;

/// Identifies a circuit of a [`Client`]: its circuit id on the first link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircuitId(pub u64);

impl core::fmt::Display for CircuitId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The name of a `REFUSED` reason byte (`DropReason as u8`, PROTOCOL.md §8), or
/// `"unknown"`.
pub fn reason_name(reason: u8) -> &'static str {
    DropReason::ALL
        .get(usize::from(reason))
        .map_or("unknown", |r| r.name())
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("UDP socket: {0}")]
    Io(#[from] io::Error),
    /// The peer list's network parameters are unusable.
    #[error("peer list parameters: {0}")]
    Params(#[from] ParamsError),
    /// Nothing arrived before the deadline.
    #[error("timed out")]
    Timeout,
    /// No CREATED came back for any of the setup attempts.
    #[error(
        "circuit setup through {first_hop} timed out: no answer to {attempts} attempt(s) within {timeout:?}"
    )]
    SetupTimeout {
        /// The first hop the setups were sent to.
        first_hop: SocketAddr,
        /// Setup cells sent.
        attempts: u32,
        /// The total time allowed.
        timeout: Duration,
    },
    /// A hop refused the circuit.
    #[error("hop {hop} (relay {relay}) refused the circuit: {reason_name} (reason {reason})")]
    Refused {
        /// Which hop (0 = first).
        hop: usize,
        /// That hop's relay id.
        relay: RelayId,
        /// Reason byte (`DropReason as u8`).
        reason: u8,
        /// Its name (`DropReason::name`, or `"unknown"`).
        reason_name: &'static str,
    },
    /// A hop tore the circuit down (a DESTROY arrived, or a REFUSED on an open
    /// circuit); it is forgotten.
    #[error("circuit {circuit} was closed by hop {hop}")]
    CircuitClosed {
        /// The circuit.
        circuit: CircuitId,
        /// Which hop sent the DESTROY (0 = first).
        hop: usize,
    },
    /// No such circuit (never built, refused, closed or destroyed).
    #[error("unknown circuit {0}")]
    UnknownCircuit(CircuitId),
    /// Payload larger than one cell carries.
    #[error("payload of {got} bytes exceeds the {max}-byte cell payload of this network")]
    PayloadTooLarge {
        /// Payload length.
        got: usize,
        /// `Layout::payload_max()`.
        max: usize,
    },
    /// The buffer given to [`Client::recv_into`] cannot hold every possible payload.
    #[error("receive buffer of {got} bytes is smaller than the {need}-byte cell payload")]
    BufferTooSmall {
        /// Buffer length.
        got: usize,
        /// `Layout::payload_max()`.
        need: usize,
    },
    /// Any other refusal of the protocol core (e.g. path length, counter exhausted).
    #[error(transparent)]
    Protocol(ProtoError),
}

fn proto(e: ProtoError) -> ClientError {
    match e {
        ProtoError::PayloadTooLarge { got, max } => ClientError::PayloadTooLarge { got, max },
        e => ClientError::Protocol(e),
    }
}

/// What a sealed cell carries.
#[derive(Debug, Clone, Copy)]
enum Body<'a> {
    Data(&'a [u8]),
    Cover,
    Loop,
}

/// The time until the next cover cell of a Poisson process of `rate_per_s` cells a
/// second (an exponential interval drawn from `rng`): a client that sends cover at
/// these times, data or not, shows an observer the same process whether it is busy
/// or quiet. `rate_per_s` must be positive.
pub fn cover_interval<R: rand_core::RngCore>(rate_per_s: f64, rng: &mut R) -> Duration {
    let mean_ms = 1000.0 / rate_per_s.max(f64::MIN_POSITIVE);
    let ms = shroud_proto::mix::exponential_delay_ms(mean_ms, rng.next_u64());
    Duration::from_secs_f64(ms / 1000.0)
}

/// Tunables of a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Setup cells sent per [`Client::build_circuit`] (at least 1): the timeout is
    /// split evenly, and each retry uses a fresh circuit.
    pub setup_attempts: u32,
    /// Received payloads and teardowns held while [`Client::build_circuit`] waits.
    pub queue_limit: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            setup_attempts: 3,
            queue_limit: 4096,
        }
    }
}

/// Counters of a [`Client`] (monotonic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Cells sent (setup, data, padding, destroy).
    pub cells_sent: u64,
    /// Cells received and authenticated (any command).
    pub cells_received: u64,
    /// Data payloads handed to the caller (or queued for it).
    pub payloads_received: u64,
    /// Padding cells received and discarded (loop cover coming back included).
    pub padding_received: u64,
    /// Cover cells sent (discarded at the exit).
    pub cover_sent: u64,
    /// Loop cover cells sent (the exit sends each back as cover).
    pub loop_cover_sent: u64,
    /// Cells for a known circuit that failed authentication, the replay window or
    /// decoding.
    pub rejected: u64,
    /// Cells from an unknown source, with an undecodable header, or for no circuit.
    pub unknown: u64,
    /// Datagrams that were not a whole number of cells.
    pub malformed: u64,
    /// Received payloads dropped because the queue was full.
    pub queue_dropped: u64,
    /// Setup cells sent.
    pub setups_sent: u64,
    /// Circuits opened (CREATED received).
    pub setups_ok: u64,
    /// Setups refused by a hop.
    pub setups_refused: u64,
    /// Setup attempts that got no answer in their time.
    pub setups_timed_out: u64,
    /// Teardowns received from a hop (DESTROY, or REFUSED on an open circuit).
    pub destroyed_received: u64,
    /// `RETRY` replies received (a relay under load asked for its token; the setup
    /// was sent again with it).
    pub retries_received: u64,
}

struct LinkEntry {
    relay: RelayId,
    link: ClientLink,
}

struct CircuitEntry {
    circ: ClientCircuit<DefaultAead>,
    path: Vec<PathHop>,
    /// Last authenticated cell received (CREATED included).
    last_rx: Option<Instant>,
    /// Cover this circuit sends on its own ([`Client::set_cover`]).
    cover: Option<CoverSchedule>,
}

/// Which cover a circuit sends (see [`Client::set_cover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoverKind {
    /// Drop cover: the exit discards it.
    Drop,
    /// Loop cover: the exit sends a cover cell back.
    Loop,
}

#[derive(Debug, Clone, Copy)]
struct CoverSchedule {
    rate_per_s: f64,
    kind: CoverKind,
    next: Instant,
}

/// The most cover cells one circuit sends at once to catch up after the client was
/// not running (a longer pause is not made up for).
const COVER_CATCH_UP: u32 = 16;

enum Queued {
    Data(CircuitId, Vec<u8>),
    Closed(CircuitId, usize),
}

/// What one received cell meant to the caller.
enum Incoming {
    /// Dropped, padding, or nothing to report.
    Nothing,
    /// A payload at `range` of the cell.
    Data(CircuitId, core::ops::Range<usize>),
    /// A building circuit opened.
    Created(CircuitId),
    /// A building circuit was refused (it stays in the map for `build_circuit`).
    Refused(CircuitId, usize, u8),
    /// A hop tore the circuit down (already forgotten).
    Closed(CircuitId, usize),
    /// The first hop answered the pending setup with a `RETRY` carrying this token.
    Retry(CircuitId, [u8; TOKEN_LEN]),
}

/// A setup [`Client::build_circuit`] or [`Client::build_circuits`] is waiting on: a
/// `RETRY` from its first hop names it by its `E`, so the cell is kept to check the
/// reply and to send it again.
struct Pending {
    id: u64,
    first_hop: SocketAddr,
    cell: Vec<u8>,
}

/// The client state other than the socket and its buffer (so both can be borrowed at
/// once).
struct Core {
    layout: Layout,
    links: HashMap<SocketAddr, LinkEntry>,
    circuits: HashMap<u64, CircuitEntry>,
    queue: VecDeque<Queued>,
    queue_limit: usize,
    stats: ClientStats,
    pending: Vec<Pending>,
}

impl Core {
    /// Handles one cell received from `src`, in place.
    fn process(&mut self, src: SocketAddr, cell: &mut [u8]) -> Incoming {
        let Some(entry) = self.links.get_mut(&src) else {
            self.stats.unknown += 1;
            return Incoming::Nothing;
        };
        // Before the relay has answered on this link, a cell from it may be a RETRY
        // for the setup being built (it is not header-protected: the relay did not
        // open the setup, so it does not know the link keys yet).
        if !entry.link.is_linked() {
            for p in self.pending.iter().filter(|p| p.first_hop == src) {
                let key: DefaultAead = retry_key(&entry.relay);
                let mut copy = cell.to_vec();
                if let Some(token) = open_retry(&self.layout, &key, &p.cell, &mut copy) {
                    return Incoming::Retry(CircuitId(p.id), token);
                }
            }
        }
        let Ok(hdr) = entry.link.read_header(cell) else {
            self.stats.unknown += 1;
            return Incoming::Nothing;
        };
        let Some(c) = self
            .circuits
            .get_mut(&hdr.circuit)
            .filter(|c| c.circ.first_hop() == src)
        else {
            self.stats.unknown += 1;
            return Incoming::Nothing;
        };
        let id = CircuitId(hdr.circuit);
        let was = c.circ.state();
        match c.circ.open(&hdr, cell) {
            Err(_) => {
                self.stats.rejected += 1;
                Incoming::Nothing
            }
            Ok(r) => {
                self.stats.cells_received += 1;
                c.last_rx = Some(Instant::now());
                match r {
                    Received::Created if was == CircuitState::Building => Incoming::Created(id),
                    Received::Created => Incoming::Nothing,
                    Received::Data(range) => {
                        self.stats.payloads_received += 1;
                        Incoming::Data(id, range)
                    }
                    Received::Padding => {
                        self.stats.padding_received += 1;
                        Incoming::Nothing
                    }
                    Received::Refused { hop, reason } if was == CircuitState::Building => {
                        Incoming::Refused(id, hop, reason)
                    }
                    // A hop of an open circuit can only mean "gone": same as DESTROY.
                    Received::Refused { hop, .. } | Received::Destroyed { hop, .. } => {
                        self.stats.destroyed_received += 1;
                        self.circuits.remove(&hdr.circuit);
                        Incoming::Closed(id, hop)
                    }
                }
            }
        }
    }

    /// Open circuit `id` and the link of its first hop, for sealing a cell.
    fn circuit_and_link(
        &mut self,
        id: CircuitId,
    ) -> Result<(&mut ClientCircuit<DefaultAead>, &ClientLink), ClientError> {
        let c = self
            .circuits
            .get_mut(&id.0)
            .ok_or(ClientError::UnknownCircuit(id))?;
        let l = self
            .links
            .get(&c.circ.first_hop())
            .ok_or(ClientError::UnknownCircuit(id))?;
        Ok((&mut c.circ, &l.link))
    }

    fn enqueue(&mut self, q: Queued) {
        if self.queue.len() >= self.queue_limit {
            self.stats.queue_dropped += 1;
        } else {
            self.queue.push_back(q);
        }
    }
}

/// A Shroud client: one UDP socket and the circuits built through it. See the
/// [module docs](self) for its invariants.
pub struct Client {
    socket: UdpSocket,
    local: SocketAddr,
    rng: OsRng,
    config: ClientConfig,
    core: Core,
    /// Receive buffer: one datagram, processed cell by cell (`pos..end` not yet).
    rx: Vec<u8>,
    rx_src: SocketAddr,
    rx_pos: usize,
    rx_end: usize,
    /// The socket's read timeout as last set (`None`: never set).
    rx_timeout: Option<Duration>,
    /// Send buffer: one cell.
    tx: Vec<u8>,
    /// Send buffer of [`Client::send_batch`]: up to a GSO send's worth of cells.
    tx_batch: Vec<u8>,
    /// Whether batches go out with `UDP_SEGMENT` (turned off for good on the first
    /// send the path cannot segment).
    gso: bool,
    /// Reads with `UDP_GRO` when the socket allows it.
    receiver: crate::udp::Receiver,
    /// The earliest time a circuit's cover is due (`None`: no circuit sends cover).
    next_cover: Option<Instant>,
}

impl core::fmt::Debug for Client {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client")
            .field("local", &self.local)
            .field("layout", &self.core.layout)
            .field("links", &self.core.links.len())
            .field("circuits", &self.core.circuits.len())
            .field("stats", &self.core.stats)
            .finish_non_exhaustive()
    }
}

/// `now + d`, saturating at about a century for absurd timeouts (`Duration::MAX`).
fn deadline_in(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(from)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Client {
    /// A client on a socket bound to `bind` (e.g. `127.0.0.1:0`), for the network of
    /// `list` (its cell layout).
    pub fn new(bind: SocketAddr, list: &PeerList) -> Result<Client, ClientError> {
        Self::with_layout(bind, list.params.layout()?, ClientConfig::default())
    }

    /// A client for an explicit layout and configuration.
    pub fn with_layout(
        bind: SocketAddr,
        layout: Layout,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        Self::with_socket(UdpSocket::bind(bind)?, layout, config)
    }

    /// A client on a socket the caller made (e.g. with larger buffers). The socket
    /// must be bound and blocking; the client sets its read timeout and turns
    /// `UDP_GRO` on where the kernel has it ([`crate::udp`]), so the socket is the
    /// client's alone from then on.
    pub fn with_socket(
        socket: UdpSocket,
        layout: Layout,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let local = socket.local_addr()?;
        let receiver = crate::udp::Receiver::new(&socket);
        Ok(Client {
            socket,
            local,
            rng: OsRng,
            core: Core {
                layout,
                links: HashMap::new(),
                circuits: HashMap::new(),
                queue: VecDeque::new(),
                queue_limit: config.queue_limit,
                stats: ClientStats::default(),
                pending: Vec::new(),
            },
            config,
            rx: vec![0u8; MAX_DATAGRAM],
            rx_src: local,
            rx_pos: 0,
            rx_end: 0,
            rx_timeout: None,
            tx: vec![0u8; layout.cell],
            tx_batch: Vec::new(),
            gso: cfg!(target_os = "linux"),
            receiver,
            next_cover: None,
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The network's cell layout.
    pub fn layout(&self) -> &Layout {
        &self.core.layout
    }

    /// Most payload bytes one [`Client::send`] carries.
    pub fn payload_max(&self) -> usize {
        self.core.layout.payload_max()
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.core.stats
    }

    /// Ids of the open circuits.
    pub fn circuits(&self) -> Vec<CircuitId> {
        let mut v: Vec<CircuitId> = self
            .core
            .circuits
            .iter()
            .filter(|(_, c)| c.circ.state() == CircuitState::Open)
            .map(|(&id, _)| CircuitId(id))
            .collect();
        v.sort();
        v
    }

    /// The path of a circuit.
    pub fn path(&self, id: CircuitId) -> Option<&[PathHop]> {
        self.core.circuits.get(&id.0).map(|c| c.path.as_slice())
    }

    /// True if circuit `id` is open and received an authenticated cell (its CREATED
    /// counts) within the last `idle`. The protocol has no echo at the exit, so
    /// liveness is inferred from traffic: applications that need it should expect
    /// replies (or send their own keep-alives through the destination).
    pub fn check_alive(&self, id: CircuitId, idle: Duration) -> bool {
        self.core.circuits.get(&id.0).is_some_and(|c| {
            c.circ.state() == CircuitState::Open && c.last_rx.is_some_and(|t| t.elapsed() <= idle)
        })
    }

    /// Makes sure a link to `hop` exists (and belongs to `hop.id`).
    fn ensure_link(&mut self, hop: &PathHop) {
        let rng = &mut self.rng;
        self.core
            .links
            .entry(hop.addr)
            .and_modify(|e| {
                if e.relay != hop.id {
                    // Another relay now serves this endpoint: its link keys differ.
                    *e = LinkEntry {
                        relay: hop.id,
                        link: ClientLink::new(&hop.id, hop.addr, rng),
                    };
                }
            })
            .or_insert_with(|| LinkEntry {
                relay: hop.id,
                link: ClientLink::new(&hop.id, hop.addr, rng),
            });
    }

    fn send_tx(&mut self, to: SocketAddr) -> Result<(), ClientError> {
        self.socket.send_to(&self.tx, to)?;
        self.core.stats.cells_sent += 1;
        Ok(())
    }

    /// The next received cell, processed; `Err(Timeout)` at `deadline`. Cover that
    /// falls due meanwhile is sent ([`Client::set_cover`]).
    fn next_cell(&mut self, deadline: Instant) -> Result<(Incoming, usize), ClientError> {
        let cell = self.core.layout.cell;
        loop {
            if self.rx_pos < self.rx_end {
                let at = self.rx_pos;
                self.rx_pos += cell;
                let inc = self.core.process(self.rx_src, &mut self.rx[at..at + cell]);
                return Ok((inc, at));
            }
            let now = Instant::now();
            if self.next_cover.is_some_and(|t| t <= now) {
                self.send_due_cover()?;
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            // Wake for the next cover cell too (the loop then goes on waiting).
            let left = match self.next_cover {
                Some(t) => left.min(
                    t.saturating_duration_since(now)
                        .max(Duration::from_micros(100)),
                ),
                None => left,
            };
            // The timeout is set only when the one in place would overshoot the
            // deadline or is far shorter than the time left: a receive loop with a
            // steady timeout then costs one system call per datagram, not two. A wait
            // that ends before the deadline just loops.
            if self.rx_timeout.is_none_or(|t| t > left || t < left / 2) {
                self.socket.set_read_timeout(Some(left))?;
                self.rx_timeout = Some(left);
            }
            match self.receiver.recv(&self.socket, &mut self.rx) {
                Ok((n, src, stride)) => {
                    let n = self.keep_whole_cells(n, stride);
                    if n == 0 {
                        continue;
                    }
                    self.rx_src = src;
                    self.rx_pos = 0;
                    self.rx_end = n;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout);
                    }
                }
                // ICMP errors about earlier sends (reported on some platforms): the
                // datagram is lost, the socket is fine.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks each datagram of a read (`n` bytes, datagrams of `stride` bytes but the
    /// last) and moves the whole-cell ones together at the front, in order; counts the
    /// others `malformed`. Returns the bytes kept. Without GRO (or when every datagram
    /// is good, the usual case) nothing moves.
    fn keep_whole_cells(&mut self, n: usize, stride: usize) -> usize {
        let layout = self.core.layout;
        let stride = stride.clamp(1, n.max(1));
        let mut kept = 0;
        let mut at = 0;
        while at < n {
            let end = (at + stride).min(n);
            if cells_mut(&layout, &mut self.rx[at..end]).is_ok() {
                if kept != at {
                    self.rx.copy_within(at..end, kept);
                }
                kept += end - at;
            } else {
                self.core.stats.malformed += 1;
            }
            at = end;
        }
        kept
    }

    fn queue_payload(&mut self, inc: Incoming, at: usize) {
        match inc {
            Incoming::Data(id, r) => {
                let v = self.rx[at + r.start..at + r.end].to_vec();
                self.core.enqueue(Queued::Data(id, v));
            }
            Incoming::Closed(id, hop) => self.core.enqueue(Queued::Closed(id, hop)),
            Incoming::Nothing
            | Incoming::Created(_)
            | Incoming::Refused(..)
            | Incoming::Retry(..) => {}
        }
    }

    /// Forgets setup attempts that did not open; sends them a DESTROY (best effort)
    /// when the relay knows our link, so a setup that arrived but whose answer was lost
    /// does not hold relay state until it idles out.
    fn abandon(&mut self, attempts: &[u64], keep: Option<u64>) {
        for &a in attempts {
            if Some(a) == keep {
                continue;
            }
            let Some(mut c) = self.core.circuits.remove(&a) else {
                continue;
            };
            if c.circ.state() != CircuitState::Building {
                continue;
            }
            let Some(l) = self.core.links.get(&c.circ.first_hop()) else {
                continue;
            };
            if l.link.is_linked()
                && c.circ
                    .seal_destroy(&l.link, &mut self.tx, &mut self.rng)
                    .is_ok()
            {
                let _ = self.send_tx(c.circ.first_hop());
            }
        }
    }

    /// Builds a circuit through `path` (first hop first) to `dest` behind the exit,
    /// in one round trip.
    ///
    /// Sends the setup to `path[0].addr` and waits for CREATED. If none comes within
    /// `timeout / setup_attempts`, sends a new setup (fresh circuit ids and keys); a
    /// late CREATED for an earlier attempt is still accepted until `timeout`. Cells for
    /// other circuits that arrive meanwhile are queued for [`Client::recv`].
    ///
    /// Errors: [`ClientError::Refused`] names the refusing hop and reason,
    /// [`ClientError::SetupTimeout`] when no attempt was answered.
    ///
    /// A first hop under load may answer a setup from a new link with a `RETRY`
    /// (`docs/PROTOCOL.md` §5.5): the same setup is sent again at once with the token
    /// (at most [`MAX_RETRIES`] times per attempt), and later setups on that link carry
    /// it too.
    pub fn build_circuit(
        &mut self,
        path: &[PathHop],
        dest: SocketAddr,
        timeout: Duration,
    ) -> Result<CircuitId, ClientError> {
        self.build_mixed_circuit(path, &[], dest, timeout)
    }

    /// [`Client::build_circuit`] in mix mode: hop `i` holds each data cell of the
    /// circuit (both ways) for an independent exponential delay of mean
    /// `mix_mean_ms[i]` milliseconds (0: none at that hop). `mix_mean_ms` is empty (a
    /// plain circuit) or names every hop. A hop that does not offer that much mixing
    /// refuses the circuit (reason `mix`). See `docs/SECURITY.md` for what it hides.
    pub fn build_mixed_circuit(
        &mut self,
        path: &[PathHop],
        mix_mean_ms: &[u16],
        dest: SocketAddr,
        timeout: Duration,
    ) -> Result<CircuitId, ClientError> {
        let r = self.build_circuit_inner(path, mix_mean_ms, dest, timeout);
        self.core.pending.clear();
        r
    }

    /// Builds one circuit per `(path, dest)` request at once: every setup is sent
    /// before any reply is awaited, so `n` circuits take about one round trip rather
    /// than `n`. Returns one result per request, in order: the circuit, the refusal
    /// ([`ClientError::Refused`]), or [`ClientError::SetupTimeout`] for a setup not
    /// answered within `timeout` (one attempt each; a `RETRY` is answered as in
    /// [`Client::build_circuit`]).
    ///
    /// Every setup is one public-key operation at every hop: a first hop admits a
    /// burst of setups per source prefix (`setup_burst`, 400 by default) and drops the
    /// rest silently, so keep a batch well under that.
    pub fn build_circuits(
        &mut self,
        requests: &[(&[PathHop], SocketAddr)],
        timeout: Duration,
    ) -> Vec<Result<CircuitId, ClientError>> {
        let r = self.build_circuits_inner(requests, timeout);
        self.core.pending.clear();
        r
    }

    fn build_circuits_inner(
        &mut self,
        requests: &[(&[PathHop], SocketAddr)],
        timeout: Duration,
    ) -> Vec<Result<CircuitId, ClientError>> {
        let layout = self.core.layout;
        let deadline = deadline_in(Instant::now(), timeout);
        let mut results: Vec<Option<Result<CircuitId, ClientError>>> =
            (0..requests.len()).map(|_| None).collect();
        // Circuit id -> (request index, retries so far).
        let mut waiting: HashMap<u64, (usize, u32)> = HashMap::new();
        for (i, &(path, dest)) in requests.iter().enumerate() {
            if path.is_empty() || path.len() > layout.h_max {
                results[i] = Some(Err(ClientError::Protocol(ProtoError::PathLength {
                    got: path.len(),
                    max: layout.h_max,
                })));
                continue;
            }
            let circ = loop {
                self.ensure_link(&path[0]);
                let link = &self.core.links[&path[0].addr].link;
                match ClientCircuit::<DefaultAead>::build(
                    &layout,
                    link,
                    path,
                    dest,
                    unix_ms(),
                    &mut self.rng,
                    &mut self.tx,
                ) {
                    Ok(c) if self.core.circuits.contains_key(&c.id()) => continue,
                    Ok(c) => break Ok(c),
                    Err(e) => break Err(proto(e)),
                }
            };
            let circ = match circ {
                Ok(c) => c,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let id = circ.id();
            if let Err(e) = self.send_tx(path[0].addr) {
                results[i] = Some(Err(e));
                continue;
            }
            self.core.stats.setups_sent += 1;
            self.core.circuits.insert(
                id,
                CircuitEntry {
                    circ,
                    path: path.to_vec(),
                    last_rx: None,
                    cover: None,
                },
            );
            self.core.pending.push(Pending {
                id,
                first_hop: path[0].addr,
                cell: self.tx.clone(),
            });
            waiting.insert(id, (i, 0));
        }
        while !waiting.is_empty() {
            match self.next_cell(deadline) {
                Err(ClientError::Timeout) => break,
                Err(e) => {
                    // The socket failed: every setup still waiting fails with it.
                    let msg = e.to_string();
                    for (_, (i, _)) in waiting.drain() {
                        results[i] = Some(Err(ClientError::Io(std::io::Error::other(msg.clone()))));
                    }
                    break;
                }
                Ok((Incoming::Created(c), _)) if waiting.contains_key(&c.0) => {
                    let (i, _) = waiting.remove(&c.0).unwrap_or_default();
                    self.core.pending.retain(|p| p.id != c.0);
                    self.core.stats.setups_ok += 1;
                    results[i] = Some(Ok(c));
                }
                Ok((Incoming::Refused(c, hop, reason), _)) if waiting.contains_key(&c.0) => {
                    let (i, _) = waiting.remove(&c.0).unwrap_or_default();
                    self.core.pending.retain(|p| p.id != c.0);
                    self.core.circuits.remove(&c.0);
                    self.core.stats.setups_refused += 1;
                    let path = requests[i].0;
                    results[i] = Some(Err(ClientError::Refused {
                        hop,
                        relay: path.get(hop).map_or(RelayId([0; 16]), |h| h.id),
                        reason,
                        reason_name: reason_name(reason),
                    }));
                }
                Ok((Incoming::Retry(c, token), _)) => {
                    let Some(w) = waiting.get_mut(&c.0).filter(|w| w.1 < MAX_RETRIES) else {
                        continue;
                    };
                    w.1 += 1;
                    self.core.stats.retries_received += 1;
                    let Some(p) = self.core.pending.iter_mut().find(|p| p.id == c.0) else {
                        continue;
                    };
                    let hop = p.first_hop;
                    if let Some(l) = self.core.links.get_mut(&hop) {
                        l.link.set_retry_token(token, unix_ms());
                    }
                    apply_token(&token, &mut p.cell);
                    self.tx.copy_from_slice(&p.cell);
                    if self.send_tx(hop).is_ok() {
                        self.core.stats.setups_sent += 1;
                    }
                }
                Ok((inc, at)) => self.queue_payload(inc, at),
            }
        }
        let timed_out: Vec<u64> = waiting.keys().copied().collect();
        for (_, (i, _)) in waiting {
            self.core.stats.setups_timed_out += 1;
            results[i] = Some(Err(ClientError::SetupTimeout {
                first_hop: requests[i].0[0].addr,
                attempts: 1,
                timeout,
            }));
        }
        self.abandon(&timed_out, None);
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ClientError::Timeout)))
            .collect()
    }

    fn build_circuit_inner(
        &mut self,
        path: &[PathHop],
        mix_mean_ms: &[u16],
        dest: SocketAddr,
        timeout: Duration,
    ) -> Result<CircuitId, ClientError> {
        let layout = self.core.layout;
        if path.is_empty() || path.len() > layout.h_max {
            return Err(ClientError::Protocol(ProtoError::PathLength {
                got: path.len(),
                max: layout.h_max,
            }));
        }
        let attempts = self.config.setup_attempts.max(1);
        let start = Instant::now();
        let mut tried: Vec<u64> = Vec::with_capacity(attempts as usize);
        for k in 1..=attempts {
            let circ = loop {
                self.ensure_link(&path[0]);
                let link = &self.core.links[&path[0].addr].link;
                let now_ms = unix_ms();
                let c = ClientCircuit::<DefaultAead>::build_mixed(
                    &layout,
                    link,
                    path,
                    mix_mean_ms,
                    dest,
                    now_ms,
                    &mut self.rng,
                    &mut self.tx,
                )
                .map_err(proto)?;
                if !self.core.circuits.contains_key(&c.id()) {
                    break c;
                }
            };
            let id = circ.id();
            if let Err(e) = self.send_tx(path[0].addr) {
                self.abandon(&tried, None);
                return Err(e);
            }
            self.core.stats.setups_sent += 1;
            self.core.circuits.insert(
                id,
                CircuitEntry {
                    circ,
                    path: path.to_vec(),
                    last_rx: None,
                    cover: None,
                },
            );
            tried.push(id);
            self.core.pending.clear();
            self.core.pending.push(Pending {
                id,
                first_hop: path[0].addr,
                cell: self.tx.clone(),
            });
            let mut retries = 0;
            // Attempt k of n waits until k/n of the timeout has passed.
            let until = if k == attempts {
                timeout
            } else {
                (timeout / attempts) * k
            };
            let deadline = deadline_in(start, until);
            loop {
                match self.next_cell(deadline) {
                    Err(ClientError::Timeout) => break,
                    Err(e) => {
                        self.abandon(&tried, None);
                        return Err(e);
                    }
                    Ok((Incoming::Created(c), _)) if tried.contains(&c.0) => {
                        self.core.stats.setups_ok += 1;
                        self.abandon(&tried, Some(c.0));
                        return Ok(c);
                    }
                    Ok((Incoming::Refused(c, hop, reason), _)) if tried.contains(&c.0) => {
                        self.core.stats.setups_refused += 1;
                        self.abandon(&tried, None);
                        return Err(ClientError::Refused {
                            hop,
                            relay: path.get(hop).map_or(RelayId([0; 16]), |h| h.id),
                            reason,
                            reason_name: reason_name(reason),
                        });
                    }
                    Ok((Incoming::Refused(c, ..), _)) => {
                        // A refusal for a setup no longer waited for.
                        self.core.circuits.remove(&c.0);
                    }
                    // A teardown of an attempt: that attempt is gone (already
                    // forgotten); the caller never saw its id, so nothing to report.
                    Ok((Incoming::Closed(c, _), _)) if tried.contains(&c.0) => {}
                    Ok((Incoming::Retry(c, token), _)) if c.0 == id && retries < MAX_RETRIES => {
                        retries += 1;
                        self.core.stats.retries_received += 1;
                        if let Some(l) = self.core.links.get_mut(&path[0].addr) {
                            l.link.set_retry_token(token, unix_ms());
                        }
                        let Some(p) = self.core.pending.iter_mut().find(|p| p.id == id) else {
                            continue;
                        };
                        apply_token(&token, &mut p.cell);
                        self.tx.copy_from_slice(&p.cell);
                        if let Err(e) = self.send_tx(path[0].addr) {
                            self.abandon(&tried, None);
                            return Err(e);
                        }
                        self.core.stats.setups_sent += 1;
                    }
                    Ok((inc, at)) => self.queue_payload(inc, at),
                }
            }
            self.core.stats.setups_timed_out += 1;
        }
        self.abandon(&tried, None);
        Err(ClientError::SetupTimeout {
            first_hop: path[0].addr,
            attempts,
            timeout,
        })
    }

    fn seal_and_send(&mut self, id: CircuitId, body: Body<'_>) -> Result<(), ClientError> {
        let (circ, link) = self.core.circuit_and_link(id)?;
        let hop = circ.first_hop();
        match body {
            Body::Data(p) => circ.seal_data(link, p, &mut self.tx, &mut self.rng),
            Body::Cover => circ.seal_padding(link, &mut self.tx, &mut self.rng),
            Body::Loop => circ.seal_loop_cover(link, &mut self.tx, &mut self.rng),
        }
        .map_err(proto)?;
        self.send_tx(hop)?;
        match body {
            Body::Data(_) => {}
            Body::Cover => self.core.stats.cover_sent += 1,
            Body::Loop => self.core.stats.loop_cover_sent += 1,
        }
        Ok(())
    }

    /// Sends `payload` (at most [`Client::payload_max`] bytes) as one cell on circuit
    /// `id`: the exit delivers it as one UDP datagram to the circuit's destination.
    pub fn send(&mut self, id: CircuitId, payload: &[u8]) -> Result<(), ClientError> {
        self.seal_and_send(id, Body::Data(payload))
    }

    /// Sends each payload as one cell on circuit `id`, in order. Every size is checked
    /// before anything is sent; on an I/O error the payloads before it were sent.
    ///
    /// On Linux the cells go out up to [`crate::udp::MAX_SEGMENTS`] per system call
    /// (`UDP_SEGMENT`): the first relay receives the same datagrams as from one
    /// [`Client::send`] each, but in a burst it handles in one wake-up, and the batch
    /// stays together along the circuit. Far cheaper per cell than `send` for bulk
    /// data.
    pub fn send_batch(&mut self, id: CircuitId, payloads: &[&[u8]]) -> Result<(), ClientError> {
        let max = self.payload_max();
        if let Some(p) = payloads.iter().find(|p| p.len() > max) {
            return Err(ClientError::PayloadTooLarge { got: p.len(), max });
        }
        let cell = self.core.layout.cell;
        let per_send = (crate::udp::MAX_GSO_BYTES / cell).clamp(1, crate::udp::MAX_SEGMENTS);
        for chunk in payloads.chunks(per_send) {
            if !self.gso || chunk.len() == 1 {
                for p in chunk {
                    self.seal_and_send(id, Body::Data(p))?;
                }
                continue;
            }
            let (circ, link) = self.core.circuit_and_link(id)?;
            let hop = circ.first_hop();
            self.tx_batch.resize(chunk.len() * cell, 0);
            for (p, out) in chunk.iter().zip(self.tx_batch.chunks_exact_mut(cell)) {
                circ.seal_data(link, p, out, &mut self.rng).map_err(proto)?;
            }
            match crate::udp::send_segments(&self.socket, &self.tx_batch, cell, hop) {
                Ok(()) => self.core.stats.cells_sent += chunk.len() as u64,
                Err(e) if crate::udp::gso_unsupported(&e) => {
                    // This path cannot segment: send the sealed cells one by one, and
                    // every later batch too.
                    self.gso = false;
                    for k in 0..chunk.len() {
                        self.socket
                            .send_to(&self.tx_batch[k * cell..(k + 1) * cell], hop)?;
                        self.core.stats.cells_sent += 1;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends one cover cell on circuit `id`; the exit discards it. To every relay it
    /// is a data cell like any other.
    pub fn send_padding(&mut self, id: CircuitId) -> Result<(), ClientError> {
        self.seal_and_send(id, Body::Cover)
    }

    /// Sends one loop cover cell on circuit `id`: the exit discards it and sends a
    /// cover cell back on the circuit, which this client discards (counted in
    /// [`ClientStats::padding_received`]). To every relay both look like data, so a
    /// client that sends loops at a steady (Poisson, see [`cover_interval`]) rate looks
    /// the same in both directions whether or not it has anything to say.
    pub fn send_loop_cover(&mut self, id: CircuitId) -> Result<(), ClientError> {
        self.seal_and_send(id, Body::Loop)
    }

    /// Makes circuit `id` send cover on its own, at the times of a Poisson process of
    /// `rate_per_s` cells a second ([`cover_interval`]), whether or not the application
    /// sends anything: drop cover ([`CoverKind::Drop`], discarded by the exit) or loop
    /// cover ([`CoverKind::Loop`], which comes back). A rate of 0 (or less) stops it.
    ///
    /// The client has no thread of its own: cover is sent while the application waits
    /// in [`Client::recv`], [`Client::recv_into`] or a circuit build, or when it calls
    /// [`Client::send_due_cover`]. After a pause in which none of these ran, at most a
    /// few cells per circuit are sent to catch up.
    pub fn set_cover(
        &mut self,
        id: CircuitId,
        rate_per_s: f64,
        kind: CoverKind,
    ) -> Result<(), ClientError> {
        let c = self
            .core
            .circuits
            .get_mut(&id.0)
            .ok_or(ClientError::UnknownCircuit(id))?;
        c.cover = (rate_per_s > 0.0 && rate_per_s.is_finite()).then(|| CoverSchedule {
            rate_per_s,
            kind,
            next: Instant::now() + cover_interval(rate_per_s, &mut self.rng),
        });
        self.next_cover = self
            .core
            .circuits
            .values()
            .filter_map(|c| c.cover.map(|s| s.next))
            .min();
        Ok(())
    }

    /// Sends the cover cells that are due ([`Client::set_cover`]); returns how many.
    /// A circuit that is not open (or is gone) stops sending cover.
    pub fn send_due_cover(&mut self) -> Result<usize, ClientError> {
        let now = Instant::now();
        let due: Vec<(u64, CoverSchedule)> = self
            .core
            .circuits
            .iter()
            .filter_map(|(&id, c)| c.cover.filter(|s| s.next <= now).map(|s| (id, s)))
            .collect();
        let mut sent = 0;
        for (id, mut s) in due {
            let mut n = 0;
            while s.next <= now && n < COVER_CATCH_UP {
                let body = match s.kind {
                    CoverKind::Drop => Body::Cover,
                    CoverKind::Loop => Body::Loop,
                };
                match self.seal_and_send(CircuitId(id), body) {
                    Ok(()) => sent += 1,
                    Err(ClientError::Protocol(_)) | Err(ClientError::UnknownCircuit(_)) => {
                        // Not open any more: stop its cover.
                        if let Some(c) = self.core.circuits.get_mut(&id) {
                            c.cover = None;
                        }
                        break;
                    }
                    Err(e) => return Err(e),
                }
                s.next += cover_interval(s.rate_per_s, &mut self.rng);
                n += 1;
            }
            if s.next <= now {
                // Too far behind: start afresh from now.
                s.next = now + cover_interval(s.rate_per_s, &mut self.rng);
            }
            if let Some(c) = self.core.circuits.get_mut(&id) {
                if c.cover.is_some() {
                    c.cover = Some(s);
                }
            }
        }
        self.next_cover = self
            .core
            .circuits
            .values()
            .filter_map(|c| c.cover.map(|s| s.next))
            .min();
        Ok(sent)
    }

    /// Receives the next payload of any circuit into `buf` (which must hold
    /// [`Client::payload_max`] bytes), without allocating. Returns the circuit and the
    /// payload length.
    ///
    /// Padding and cells that fail authentication or the replay window are skipped
    /// (and counted). Returns [`ClientError::Timeout`] when nothing arrives within
    /// `timeout`, and [`ClientError::CircuitClosed`] (once) when a hop tears a circuit
    /// down.
    pub fn recv_into(
        &mut self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<(CircuitId, usize), ClientError> {
        let need = self.payload_max();
        if buf.len() < need {
            return Err(ClientError::BufferTooSmall {
                got: buf.len(),
                need,
            });
        }
        if let Some(q) = self.core.queue.pop_front() {
            return match q {
                Queued::Data(id, v) => {
                    buf[..v.len()].copy_from_slice(&v);
                    Ok((id, v.len()))
                }
                Queued::Closed(circuit, hop) => Err(ClientError::CircuitClosed { circuit, hop }),
            };
        }
        let deadline = deadline_in(Instant::now(), timeout);
        loop {
            match self.next_cell(deadline)? {
                (Incoming::Data(id, r), at) => {
                    let n = r.len();
                    buf[..n].copy_from_slice(&self.rx[at + r.start..at + r.end]);
                    return Ok((id, n));
                }
                (Incoming::Closed(circuit, hop), _) => {
                    return Err(ClientError::CircuitClosed { circuit, hop })
                }
                (Incoming::Refused(c, ..), _) => {
                    // A refusal for a setup no longer waited for.
                    self.core.circuits.remove(&c.0);
                }
                (Incoming::Nothing | Incoming::Created(_) | Incoming::Retry(..), _) => {}
            }
        }
    }

    /// Receives the next payload of any circuit: [`Client::recv_into`] with a new
    /// buffer.
    pub fn recv(&mut self, timeout: Duration) -> Result<(CircuitId, Vec<u8>), ClientError> {
        if let Some(Queued::Data(..)) = self.core.queue.front() {
            if let Some(Queued::Data(id, v)) = self.core.queue.pop_front() {
                return Ok((id, v));
            }
        }
        let mut buf = vec![0u8; self.payload_max()];
        let (id, n) = self.recv_into(&mut buf, timeout)?;
        buf.truncate(n);
        Ok((id, buf))
    }

    /// Tears circuit `id` down: sends DESTROY through every hop (best effort, UDP) and
    /// forgets the circuit. The circuit is forgotten even if the send fails.
    pub fn destroy(&mut self, id: CircuitId) -> Result<(), ClientError> {
        let mut c = self
            .core
            .circuits
            .remove(&id.0)
            .ok_or(ClientError::UnknownCircuit(id))?;
        let hop = c.circ.first_hop();
        let l = self
            .core
            .links
            .get(&hop)
            .ok_or(ClientError::UnknownCircuit(id))?;
        c.circ
            .seal_destroy(&l.link, &mut self.tx, &mut self.rng)
            .map_err(proto)?;
        self.send_tx(hop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With GRO a read holds a run of datagrams; a bad one among them (not a whole
    /// number of cells) is counted and costs only itself: the good cells around it
    /// are still each looked at (here they come from no relay, so `unknown`).
    #[test]
    fn a_bad_datagram_in_a_gro_run_costs_only_itself() {
        let layout = Layout::default();
        let mut client = Client::with_layout(
            "127.0.0.1:0".parse().unwrap(),
            layout,
            ClientConfig::default(),
        )
        .unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let cell = layout.cell;
        // Two cells, then a 100-byte datagram: one GSO send, one GRO read.
        let mut run = vec![0x5au8; 2 * cell + 100];
        run[cell..2 * cell].fill(0xa5);
        crate::udp::send_segments(&sender, &run, cell, client.local_addr()).unwrap();
        // And two more cells sent one by one after it.
        for _ in 0..2 {
            sender
                .send_to(&vec![1u8; cell], client.local_addr())
                .unwrap();
        }
        let mut buf = vec![0u8; client.payload_max()];
        let r = client.recv_into(&mut buf, Duration::from_millis(300));
        assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
        let st = client.stats();
        assert_eq!(st.malformed, 1, "{st:?}");
        assert_eq!(st.unknown, 4, "{st:?}");
    }
}
