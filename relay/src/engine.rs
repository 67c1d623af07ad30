//! The driver-independent half of a worker: runs received datagrams through the
//! protocol state machine, groups the cells to send by next hop, counts every drop,
//! runs the periodic tick and applies control messages. The drivers only arm, submit
//! and reap; they reach the protocol state only through [`Engine`]'s methods.
//!
//! Invariants: cells are processed in the buffer they arrived in and sent from it
//! (a [`CellAt::Rx`] names the receive slot and offset); only cells the relay itself
//! originates (exit replies) and cells held by mix mode (copied out of their receive
//! buffer, see [`crate::mixer`]) live in the worker's transmit arena ([`CellAt::Tx`]).
//! [`Plan`] keeps its vectors between batches, so after warm-up nothing here
//! allocates.

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use shroud_proto::aead::Aead;
use shroud_proto::relay::{
    Action, CellBatch, CircuitRef, DropReason, Event, OnionKeyring, Peer, Relay, CELL_BATCH,
};
use shroud_proto::Layout;

use crate::exits::{ExitSockets, TxArena};
use crate::mixer::{Held, Mixer};
use crate::stats::WorkerStats;

/// Where a cell to send lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellAt {
    /// In receive slot `slot` at byte offset `off`.
    Rx {
        /// Receive slot.
        slot: u32,
        /// Offset of the cell in the slot's buffer.
        off: u32,
    },
    /// In the transmit arena at cell index `idx`.
    Tx {
        /// Arena cell index.
        idx: u32,
    },
}

/// Cells bound for one next hop.
#[derive(Debug)]
pub struct Group {
    /// Next hop.
    pub dest: SocketAddr,
    /// Cells, in order.
    pub cells: Vec<CellAt>,
}

/// The cells of one batch, grouped per next hop (one GSO send each).
///
/// Finding a cell's group is O(1): the group of the previous cell first (the cells of
/// one received datagram usually share their next hop), then an index by address.
#[derive(Debug, Default)]
pub struct Plan {
    groups: Vec<Group>,
    active: usize,
    /// The group the last cell went to.
    last: usize,
    /// Group index by next hop, for the groups of this batch.
    index: std::collections::HashMap<SocketAddr, usize, ahash::RandomState>,
}

impl Plan {
    /// Adds a cell for `dest`.
    pub fn push(&mut self, dest: SocketAddr, loc: CellAt) {
        if self.last < self.active && self.groups[self.last].dest == dest {
            self.groups[self.last].cells.push(loc);
            return;
        }
        if let Some(&g) = self.index.get(&dest) {
            self.last = g;
            self.groups[g].cells.push(loc);
            return;
        }
        if self.active == self.groups.len() {
            self.groups.push(Group {
                dest,
                cells: Vec::with_capacity(64),
            });
        }
        let g = &mut self.groups[self.active];
        g.dest = dest;
        g.cells.clear();
        g.cells.push(loc);
        self.index.insert(dest, self.active);
        self.last = self.active;
        self.active += 1;
    }

    /// The groups of this batch.
    pub fn groups(&self) -> &[Group] {
        &self.groups[..self.active]
    }

    /// Empties the plan (keeping capacity).
    pub fn clear(&mut self) {
        for g in &mut self.groups[..self.active] {
            g.cells.clear();
        }
        self.index.clear();
        self.active = 0;
        self.last = 0;
    }

    /// True if nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.active == 0
    }
}

/// Which of the worker's sockets sends to each remote address.
///
/// A reply leaves from the socket its link's datagrams arrive on, so a client (or a
/// NAT before it) sees it come from the address and port it sent to, also when the
/// relay listens on several addresses of one family. An address never heard from
/// (a next-hop relay this worker extends to first) gets the first socket of its
/// family, which is why a relay's first listen address of each family must be the one
/// its peer-list entry names (OPERATIONS.md, `[network] listen`).
///
/// With one socket per address family there is nothing to choose and nothing is
/// stored. Otherwise an address is remembered only while the relay has a link to it
/// (checked when learnt, pruned at every tick), so the table is bounded by the link
/// tables and a flood from unknown sources adds nothing.
#[derive(Debug, Default)]
pub struct Routes {
    ipv4: Vec<bool>,
    /// More than one socket of one address family.
    choose: bool,
    learnt: ahash::AHashMap<SocketAddr, u8>,
}

impl Routes {
    /// Routes over sockets whose address families are `ipv4` (true: IPv4).
    pub fn new(ipv4: Vec<bool>) -> Self {
        let v4 = ipv4.iter().filter(|&&v| v).count();
        let choose = v4 > 1 || ipv4.len() - v4 > 1;
        Routes {
            ipv4,
            choose,
            learnt: ahash::AHashMap::new(),
        }
    }

    /// The socket that sends to `dest`: the one `dest` was last heard on, else the
    /// first of its family; `None` if the worker has no socket of that family.
    pub fn socket_for(&self, dest: &SocketAddr) -> Option<usize> {
        if self.choose {
            if let Some(&s) = self.learnt.get(dest) {
                return Some(usize::from(s));
            }
        }
        self.ipv4.iter().position(|&v4| v4 == dest.is_ipv4())
    }

    fn learn(&mut self, src: SocketAddr, sock: usize) {
        let first = self.ipv4.iter().position(|&v4| v4 == src.is_ipv4());
        if first == Some(sock) {
            // The default already: store nothing.
            self.learnt.remove(&src);
        } else if let Ok(s) = u8::try_from(sock) {
            self.learnt.insert(src, s);
        }
    }

    /// Addresses remembered (beyond the family defaults).
    pub fn len(&self) -> usize {
        self.learnt.len()
    }

    /// True if nothing beyond the family defaults is remembered.
    pub fn is_empty(&self) -> bool {
        self.learnt.is_empty()
    }
}

/// Work for the driver besides sending cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideEffect {
    /// Exit: send `buf[range]` of receive slot `slot` to `dest` for `circuit`.
    Deliver {
        /// Circuit.
        circuit: CircuitRef,
        /// Destination.
        dest: SocketAddr,
        /// Receive slot.
        slot: u32,
        /// Payload range in the slot's buffer.
        range: core::ops::Range<usize>,
    },
    /// An exit circuit opened and its socket exists (the engine opened it before
    /// planning the CREATED): start receiving on it.
    Opened {
        /// Circuit.
        circuit: CircuitRef,
        /// Destination.
        dest: SocketAddr,
    },
    /// Exit, mix mode: send the first `len` bytes of transmit-arena cell `idx` to the
    /// destination of `circuit`, then release the arena cell.
    DeliverHeld {
        /// Circuit.
        circuit: CircuitRef,
        /// Arena cell holding the payload.
        idx: u32,
        /// Payload length.
        len: u16,
    },
    /// A circuit closed: release its exit socket, if any.
    Closed {
        /// Circuit.
        circuit: CircuitRef,
    },
}

/// A batch whose datagrams held fewer cells than this on average makes the next wait
/// gather ([`Engine::gather`]).
pub const GATHER_BELOW_CELLS_PER_DATAGRAM: usize = 8;

/// Whether a worker's next wait gathers completions (see [`Engine::gather`]): decided
/// at the start of each batch from the datagrams of the last one that received any.
#[derive(Debug, Default, Clone, Copy)]
struct Gathering {
    /// Datagrams and cells received in the batch at hand.
    datagrams: usize,
    cells: usize,
    gather: bool,
}

impl Gathering {
    fn received(&mut self, datagrams: usize, cells: usize) {
        self.datagrams += datagrams;
        self.cells += cells;
    }

    /// The batch at hand is over: it decides, unless it received nothing.
    fn end_batch(&mut self) {
        if self.datagrams > 0 {
            self.gather = self.cells < GATHER_BELOW_CELLS_PER_DATAGRAM * self.datagrams;
        }
        (self.datagrams, self.cells) = (0, 0);
    }
}

/// Most payloads one exit send carries: the kernel's limit on UDP GSO segments.
pub const MAX_DELIVERY_RUN: usize = 64;

/// How many exit deliveries, from `side[i]` on, can leave in one UDP GSO send (at
/// least 1; 1 when `side[i]` is not a [`SideEffect::Deliver`]): consecutive deliveries
/// for the same circuit (so the same exit socket) whose payloads all have the first
/// one's length, except that the last may be shorter — the kernel cuts the send into
/// datagrams of the first one's size, so the destination receives exactly the
/// datagrams it would have from one send each. At most [`MAX_DELIVERY_RUN`] and
/// [`crate::sys::GSO_MAX_BYTES`]; an empty payload always goes alone, and everything
/// does when `gso` is off (`[io] gro_gso = false`, or after the kernel refused a GSO
/// send).
pub fn delivery_run(side: &[SideEffect], i: usize, gso: bool) -> usize {
    let Some(SideEffect::Deliver { circuit, range, .. }) = side.get(i) else {
        return 1;
    };
    if !gso {
        return 1;
    }
    let seg = range.len();
    if seg == 0 {
        return 1;
    }
    let max = crate::sys::gso_segments(MAX_DELIVERY_RUN, seg);
    let mut n = 1;
    while n < max {
        match side.get(i + n) {
            Some(SideEffect::Deliver {
                circuit: c,
                range: r,
                ..
            }) if c == circuit && r.len() == seg => n += 1,
            Some(SideEffect::Deliver {
                circuit: c,
                range: r,
                ..
            }) if c == circuit && !r.is_empty() && r.len() < seg => return n + 1,
            _ => break,
        }
    }
    n
}

/// Protocol state and counters of one worker.
pub struct Engine<A: Aead> {
    /// The protocol state machine.
    relay: Relay<A>,
    layout: Layout,
    stats: Arc<WorkerStats>,
    /// Setups allowed per batch.
    setup_budget: u32,
    ctl: Receiver<Control>,
    /// Set once draining: unix ms at which the worker stops regardless.
    drain_deadline: Option<u64>,
    /// The socket for each next hop.
    routes: Routes,
    /// Mix mode's delay queue.
    mixer: Mixer,
    /// Constant-rate links: cells a second per padded peer link (0: off), the time of
    /// the last padding round and the fraction of a cell carried over from it.
    link_rate: u32,
    pad_last_ms: u64,
    pad_carry: f64,
    /// The working space of [`Relay::handle_batch`] for the datagram at hand.
    batch: CellBatch,
    /// (receive time, cells) of each datagram handled since the driver last handed
    /// sends to the kernel: the cells' time in the relay ends there
    /// ([`Engine::sends_handed_over`]).
    arrivals: Vec<(u64, u32)>,
    /// See [`Engine::gather`].
    gathering: Gathering,
}

/// Constant-rate links: padding rounds at most this often (ms).
const PAD_INTERVAL_MS: u64 = 10;

impl<A: Aead> std::fmt::Debug for Engine<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl<A: Aead> Engine<A> {
    /// An engine over `relay`, counting into `stats`, taking control messages from
    /// `ctl`, sending over sockets whose address families are `ipv4` (see [`Routes`]),
    /// with `io`'s setup budget, holding up to `io.mix_queue` cells of mixed circuits
    /// (in the transmit arena's held pool, which must be as large) and padding peer
    /// links to `io.link_cells_per_sec`.
    pub fn new(
        relay: Relay<A>,
        layout: Layout,
        stats: Arc<WorkerStats>,
        ctl: Receiver<Control>,
        ipv4: Vec<bool>,
        io: &crate::spec::IoConfig,
    ) -> Self {
        let now = crate::sys::now_ms();
        Engine {
            relay,
            layout,
            stats,
            setup_budget: io.setup_budget,
            ctl,
            drain_deadline: None,
            routes: Routes::new(ipv4),
            mixer: Mixer::new(io.mix_queue, now),
            link_rate: io.link_cells_per_sec,
            pad_last_ms: now,
            pad_carry: 0.0,
            batch: CellBatch::default(),
            arrivals: Vec::with_capacity(1024),
            gathering: Gathering::default(),
        }
    }

    /// The socket (an index into the worker's sockets) that sends to `dest`.
    pub fn socket_for(&self, dest: &SocketAddr) -> Option<usize> {
        self.routes.socket_for(dest)
    }

    /// The next-hop sockets remembered (see [`Routes`]).
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The worker's shared counters (the drivers count I/O events there).
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Starts a batch: renews the per-batch setup budget, and decides from the batch
    /// before whether the next wait should gather ([`Engine::gather`]).
    pub fn begin_batch(&mut self) {
        self.relay.begin_batch(self.setup_budget);
        self.gathering.end_batch();
    }

    /// Whether the driver's next wait should gather completions for `[io]
    /// batch_wait_us` once one is there, rather than wake for the first: yes when
    /// the last batch that received anything held small datagrams (fewer than
    /// [`GATHER_BELOW_CELLS_PER_DATAGRAM`] cells each on average), as under a flood of
    /// single datagrams from many sources, where a wake-up per datagram would cost
    /// more than the datagram. Cells from peers and clients that send with GSO arrive
    /// in datagrams of tens of cells, which pay for their own wake-up; making them
    /// wait only adds latency (and the timer's own wake-ups).
    pub fn gather(&self) -> bool {
        self.gathering.gather
    }

    /// A send of `cells` cells failed in the kernel (its socket buffer full, or an
    /// error): one `send_errors`, and the cells dropped as `queue_full`. Both drivers
    /// count a failed send here, so they agree.
    pub fn send_failed(&mut self, cells: u64) {
        self.stats
            .send_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.relay.count_drop(DropReason::QueueFull, cells);
    }

    /// Counts `n` cells (or datagrams, for reasons counted per datagram) dropped.
    /// A malformed datagram the driver could not hand over counts as a received
    /// datagram of no cells for [`Engine::gather`].
    pub fn count_drop(&mut self, reason: DropReason, n: u64) {
        if reason == DropReason::Malformed {
            self.gathering.received(n as usize, 0);
        }
        self.relay.count_drop(reason, n);
    }

    /// Opens `circuit`'s exit socket and publishes the table's count of sockets the
    /// pool could not supply (the table is this worker's own: its count is the stat).
    fn open_exit(
        &self,
        exits: &mut ExitSockets,
        circuit: CircuitRef,
        dest: SocketAddr,
    ) -> std::io::Result<Option<u32>> {
        let r = exits.open(circuit, dest);
        self.stats
            .exit_pool_misses
            .store(exits.pool_misses(), std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// The driver has handed the sends planned so far to the kernel: the cells of
    /// every datagram handled since the last call have left the relay (forwarded,
    /// delivered, answered or dropped), and their time in it enters
    /// [`WorkerStats::cell_residence`](crate::stats::WorkerStats::cell_residence).
    pub fn sends_handed_over(&mut self) {
        if self.arrivals.is_empty() {
            return;
        }
        let now = crate::sys::realtime_ns();
        for &(at, cells) in &self.arrivals {
            self.stats
                .cell_residence
                .record_ns(now.saturating_sub(at), u64::from(cells));
        }
        self.arrivals.clear();
    }

    /// Handles one received datagram held in receive slot `slot`, which arrived on
    /// socket `sock` at `received_ns` on the realtime clock (the kernel's receive
    /// timestamp; `None` when the kernel gave none).
    ///
    /// A setup that makes this relay a circuit's exit gets its exit socket here, before
    /// its CREATED is planned; if the socket cannot be opened the CREATED becomes a
    /// REFUSED (`capacity`), so no client is told a circuit is open that cannot carry
    /// anything. The relay decides a batch of cells ([`Relay::handle_batch`]) before
    /// the actions are carried out, so a data cell that follows such a setup in the
    /// same datagram (a client does not send one before CREATED) is already decided
    /// when the circuit is refused: its delivery finds no exit socket and is counted
    /// as `unknown_circuit`, as it would be after the refusal.
    #[allow(clippy::too_many_arguments)]
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        sock: usize,
        slot: u32,
        buf: &mut [u8],
        received_ns: Option<u64>,
        out: Out<'_>,
        exits: &mut ExitSockets,
        now_ms: u64,
    ) {
        let Out { plan, side, arena } = out;
        let cell = self.layout.cell;
        self.stats
            .datagrams_rx
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.gathering.received(1, buf.len() / cell);
        if buf.is_empty() || !buf.len().is_multiple_of(cell) {
            self.relay.count_drop(DropReason::Malformed, 1);
            return;
        }
        self.stats.cells_rx.fetch_add(
            (buf.len() / cell) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(at) = received_ns {
            self.arrivals.push((at, (buf.len() / cell) as u32));
        }
        // The cells of one datagram share their source, so their link: the relay
        // handles them as batches (header masks in one AES call, the layers of
        // consecutive data cells stripped together), then the actions are carried out
        // in the cells' order.
        for (part, cells) in buf.chunks_mut(CELL_BATCH * cell).enumerate() {
            self.relay.handle_batch(src, cells, now_ms, &mut self.batch);
            for (i, c) in cells.chunks_exact_mut(cell).enumerate() {
                let action = self.batch.take(i);
                let off = (part * CELL_BATCH + i) * cell;
                let out = Out {
                    plan: &mut *plan,
                    side: &mut *side,
                    arena: &mut *arena,
                };
                self.carry_out(action, c, slot, off, out, exits, now_ms);
            }
        }
        if self.routes.choose && self.relay.has_link(&src) {
            self.routes.learn(src, sock);
        }
    }

    /// Carries out the relay's `action` for cell `c`, which lies at byte `off` of
    /// receive slot `slot`: plans it for sending, holds it (mix mode), delivers its
    /// payload or notes the event.
    #[allow(clippy::too_many_arguments)]
    fn carry_out(
        &mut self,
        action: Action,
        c: &mut [u8],
        slot: u32,
        off: usize,
        out: Out<'_>,
        exits: &mut ExitSockets,
        now_ms: u64,
    ) {
        let Out { plan, side, arena } = out;
        let loc = CellAt::Rx {
            slot,
            off: off as u32,
        };
        match action {
            Action::Send {
                to,
                event: Some(Event::ExitOpened { circuit, dest }),
            } => match self.open_exit(exits, circuit, dest) {
                Ok(Some(_)) => {
                    plan.push(to, loc);
                    side.push(SideEffect::Opened { circuit, dest });
                }
                failed => {
                    if let Err(e) = failed {
                        tracing::debug!(error = %e, %dest, "exit socket failed; refusing the circuit");
                    }
                    if let Some(to) = self.relay.refuse_exit(circuit, c) {
                        plan.push(to, loc);
                    }
                }
            },
            Action::Send { to, event } => {
                plan.push(to, loc);
                if let Some(e) = event {
                    side.push(side_of(e));
                }
            }
            Action::Delay { to, mean_ms } => {
                let Some(idx) = arena.alloc_held() else {
                    self.mix_overflow();
                    return;
                };
                arena.cell_mut(idx).copy_from_slice(c);
                self.hold(Held::Cell { to, idx }, mean_ms, arena, now_ms);
            }
            Action::Refuse { to, .. } => plan.push(to, loc),
            Action::Deliver {
                circuit,
                dest,
                payload,
            } => {
                let mean_ms = self.relay.mix_mean_ms(circuit);
                if mean_ms == 0 {
                    side.push(SideEffect::Deliver {
                        circuit,
                        dest,
                        slot,
                        range: off + payload.start..off + payload.end,
                    });
                    return;
                }
                let Some(idx) = arena.alloc_held() else {
                    self.mix_overflow();
                    return;
                };
                arena.cell_mut(idx)[..payload.len()].copy_from_slice(&c[payload.clone()]);
                let held = Held::Deliver {
                    circuit,
                    idx,
                    len: payload.len() as u16,
                };
                self.hold(held, mean_ms, arena, now_ms);
            }
            Action::Consumed { event: Some(e) } => side.push(side_of(e)),
            Action::Consumed { event: None } | Action::Drop(_) => {}
        }
    }

    /// Exit: wraps `payload`, a datagram from the destination of `circuit`, into a
    /// backward cell in the transmit arena and plans it. Payloads larger than a cell
    /// carries are dropped as malformed; a full arena drops as queue_full.
    pub fn exit_payload(
        &mut self,
        circuit: CircuitRef,
        payload: &[u8],
        arena: &mut crate::exits::TxArena,
        plan: &mut Plan,
        now_ms: u64,
    ) {
        if payload.len() > self.layout.payload_max() {
            self.relay.count_drop(DropReason::Malformed, 1);
            return;
        }
        // A mixed circuit's reply is held: it takes a cell of the held pool.
        let mean_ms = self.relay.mix_mean_ms(circuit);
        let idx = if mean_ms == 0 {
            arena.alloc()
        } else {
            arena.alloc_held()
        };
        let Some(idx) = idx else {
            if mean_ms == 0 {
                self.relay.count_drop(DropReason::QueueFull, 1);
            } else {
                self.mix_overflow();
            }
            return;
        };
        match self
            .relay
            .exit_reply(circuit, payload, arena.cell_mut(idx), now_ms)
        {
            Ok(to) => {
                self.stats
                    .exit_replies
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if mean_ms == 0 {
                    plan.push(to, CellAt::Tx { idx });
                } else {
                    self.hold(Held::Cell { to, idx }, mean_ms, arena, now_ms);
                }
            }
            Err(_) => arena.release(idx),
        }
    }

    /// A cell mix mode could not hold: dropped (`queue_full`) and counted.
    fn mix_overflow(&mut self) {
        self.stats
            .mix_overflow
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.relay.count_drop(DropReason::QueueFull, 1);
    }

    /// Mix mode: holds `held` (whose arena cell is filled) for its delay; a full queue
    /// frees the arena cell and drops it (`queue_full`, and `mix_overflow`).
    fn hold(&mut self, held: Held, mean_ms: u16, arena: &mut TxArena, now_ms: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        match self.mixer.hold(held, mean_ms, now_ms) {
            Ok(()) => {
                self.stats.mix_delayed.fetch_add(1, Relaxed);
                self.stats.mix_held.store(self.mixer.len() as u64, Relaxed);
            }
            Err(Held::Cell { idx, .. } | Held::Deliver { idx, .. }) => {
                arena.release(idx);
                self.mix_overflow();
            }
        }
    }

    /// Mix mode: plans every held cell whose delay has passed (cells into `plan`,
    /// exit payloads as [`SideEffect::DeliverHeld`] into `side`). Drivers call it
    /// before each flush.
    pub fn release_held(&mut self, now_ms: u64, plan: &mut Plan, side: &mut Vec<SideEffect>) {
        if self.mixer.is_empty() {
            return;
        }
        self.mixer.release(now_ms, |h| match h {
            Held::Cell { to, idx } => plan.push(to, CellAt::Tx { idx }),
            Held::Deliver { circuit, idx, len } => {
                side.push(SideEffect::DeliverHeld { circuit, idx, len })
            }
        });
        self.stats.mix_held.store(
            self.mixer.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Milliseconds until the engine has timed work: the next held cell due, or the
    /// next constant-rate padding round (`None`: nothing timed). Drivers wait no
    /// longer than this.
    pub fn next_wake_ms(&self, now_ms: u64) -> Option<u64> {
        let pad = (self.link_rate > 0)
            .then(|| (self.pad_last_ms + PAD_INTERVAL_MS).saturating_sub(now_ms));
        match (self.mixer.wait_ms(now_ms), pad) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Constant-rate links: every `PAD_INTERVAL_MS` (10 ms), tops every peer link that
    /// carries circuits up to the configured rate for the time since the last round
    /// with link padding cells (from the transmit arena, planned in `plan`). A pause
    /// longer than a second is padded for one second only.
    pub fn pad_links(&mut self, now_ms: u64, arena: &mut TxArena, plan: &mut Plan) {
        if self.link_rate == 0 || now_ms < self.pad_last_ms + PAD_INTERVAL_MS {
            return;
        }
        let elapsed = (now_ms - self.pad_last_ms).min(1000);
        self.pad_last_ms = now_ms;
        let want = f64::from(self.link_rate) * elapsed as f64 / 1000.0 + self.pad_carry;
        let quota = want.floor();
        self.pad_carry = want - quota;
        let mut full = 0;
        let mixer = &mut self.mixer;
        self.relay.pad_links(quota as u32, |write| {
            let Some(idx) = arena.alloc() else {
                full += 1;
                return;
            };
            let cell = arena.cell_mut(idx);
            mixer.fill_random(cell);
            let to = write(cell);
            plan.push(to, CellAt::Tx { idx });
        });
        if full > 0 {
            self.relay.count_drop(DropReason::QueueFull, full);
        }
    }

    /// The periodic tick: expires idle circuits and links. Each removed circuit's exit
    /// socket is released through `side`; a client whose first hop this is gets a
    /// `DESTROY` (from the transmit arena, planned in `plan`) telling it so.
    pub fn expire(
        &mut self,
        now_ms: u64,
        arena: &mut crate::exits::TxArena,
        plan: &mut Plan,
        side: &mut Vec<SideEffect>,
    ) {
        let mut full = 0;
        self.relay.expire(
            now_ms,
            |circuit| side.push(SideEffect::Closed { circuit }),
            |write| {
                let Some(idx) = arena.alloc() else {
                    full += 1;
                    return;
                };
                match write(arena.cell_mut(idx)) {
                    Some(to) => plan.push(to, CellAt::Tx { idx }),
                    None => arena.release(idx),
                }
            },
        );
        if full > 0 {
            self.relay.count_drop(DropReason::QueueFull, full);
        }
        if !self.routes.learnt.is_empty() {
            let relay = &self.relay;
            self.routes.learnt.retain(|a, _| relay.has_link(a));
        }
    }

    /// Copies the relay's counters to the shared stats.
    pub fn publish(&self) {
        self.stats.publish(
            self.relay.stats(),
            self.relay.circuit_count(),
            self.relay.link_counts(),
        );
    }

    /// Applies pending control messages; `Some(exit)` when the loop must end.
    pub fn poll_control(&mut self, now_ms: u64) -> Option<WorkerEnd> {
        // The daemon's watchdog reads this to tell a live worker from a stuck one.
        self.stats
            .loops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            match self.ctl.try_recv() {
                Ok(Control::SetPeers(p)) => self.relay.set_peers(p),
                Ok(Control::SetOnionKeys(k)) => self.relay.set_keyring(k),
                Ok(Control::SetAccepting(accepting)) => {
                    if self.drain_deadline.is_none() {
                        self.relay.set_accepting(accepting);
                    }
                }
                Ok(Control::Drain { deadline_ms }) => {
                    self.relay.set_accepting(false);
                    self.drain_deadline = Some(deadline_ms);
                }
                Ok(Control::Stop) => return Some(WorkerEnd::Stopped),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Some(WorkerEnd::Stopped)
                }
            }
        }
        match self.drain_deadline {
            Some(d) if now_ms >= d || self.relay.circuit_count() == 0 => Some(WorkerEnd::Drained),
            _ => None,
        }
    }
}

/// Where [`Engine::on_datagram`] puts its results: the cells to send, the side
/// effects, and the transmit arena (for cells mix mode holds).
#[derive(Debug)]
pub struct Out<'a> {
    /// Cells to send, per next hop.
    pub plan: &'a mut Plan,
    /// Work besides sending cells.
    pub side: &'a mut Vec<SideEffect>,
    /// The transmit arena.
    pub arena: &'a mut TxArena,
}

/// A message from the control plane, applied between batches.
#[derive(Debug)]
pub enum Control {
    /// A new verified peer list: links and circuits of relays that stay are kept.
    SetPeers(Vec<Peer>),
    /// New onion keys (newest first), as the process-wide keyring whose seen-filters
    /// every worker shares: circuits are untouched.
    SetOnionKeys(OnionKeyring),
    /// Accept new circuits or refuse them (while the peer list in force has expired);
    /// existing circuits are untouched. Ignored once draining: a drain never resumes.
    SetAccepting(bool),
    /// Refuse new circuits; exit when the last circuit is gone or at the deadline
    /// (unix ms).
    Drain {
        /// Deadline, unix milliseconds.
        deadline_ms: u64,
    },
    /// Stop now.
    Stop,
}

/// Why a worker loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Stopped by [`Control::Stop`] or the channel closing.
    Stopped,
    /// Drained: no circuits left, or the deadline passed.
    Drained,
}

fn side_of(e: Event) -> SideEffect {
    match e {
        Event::ExitOpened { circuit, dest } => SideEffect::Opened { circuit, dest },
        Event::Closed { circuit } => SideEffect::Closed { circuit },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(circuit: u32, len: usize) -> SideEffect {
        SideEffect::Deliver {
            circuit: CircuitRef::from_parts(circuit, 0),
            dest: addr(9),
            slot: 0,
            range: 100..100 + len,
        }
    }

    #[test]
    fn a_wait_gathers_after_small_datagrams_only() {
        let mut g = Gathering::default();
        assert!(!g.gather, "the first wait wakes for the first completion");
        // A flood of single cells (and a malformed datagram): gather.
        for _ in 0..100 {
            g.received(1, 1);
        }
        g.received(1, 0);
        g.end_batch();
        assert!(g.gather);
        // A batch that received nothing (a tick) keeps the decision.
        g.end_batch();
        assert!(g.gather);
        // GSO datagrams of 32 cells: wake for the first.
        g.received(3, 96);
        g.end_batch();
        assert!(!g.gather);
        // The bound: 8 cells a datagram on average is enough not to gather.
        g.received(2, 2 * GATHER_BELOW_CELLS_PER_DATAGRAM - 1);
        g.end_batch();
        assert!(g.gather);
        g.received(2, 2 * GATHER_BELOW_CELLS_PER_DATAGRAM);
        g.end_batch();
        assert!(!g.gather);
        g.end_batch();
        assert!(!g.gather);
    }

    #[test]
    fn exit_deliveries_group_per_circuit_and_length_as_udp_gso_allows() {
        let closed = SideEffect::Closed {
            circuit: CircuitRef::from_parts(1, 0),
        };
        // Same circuit, same length: one run; a shorter payload ends it (GSO's last
        // segment may be short); a longer one, another circuit or another effect
        // starts a new one.
        let side = vec![
            deliver(1, 500),
            deliver(1, 500),
            deliver(1, 500),
            deliver(1, 120),
            deliver(1, 500),
            deliver(1, 600),
            deliver(2, 600),
            closed.clone(),
            deliver(2, 600),
            deliver(2, 0),
            deliver(2, 0),
        ];
        assert_eq!(delivery_run(&side, 0, true), 4);
        assert_eq!(delivery_run(&side, 0, false), 1, "GSO off: one send each");
        assert_eq!(delivery_run(&side, 1, true), 3);
        assert_eq!(
            delivery_run(&side, 4, true),
            1,
            "a longer payload cannot follow"
        );
        assert_eq!(
            delivery_run(&side, 5, true),
            1,
            "another circuit is another socket"
        );
        assert_eq!(
            delivery_run(&side, 6, true),
            1,
            "a non-delivery ends the run"
        );
        assert_eq!(delivery_run(&side, 7, true), 1);
        assert_eq!(
            delivery_run(&side, 8, true),
            1,
            "an empty payload goes alone"
        );
        assert_eq!(delivery_run(&side, 9, true), 1);
        assert_eq!(delivery_run(&side, 10, true), 1);
        assert_eq!(delivery_run(&side, 11, true), 1, "past the end");
        // The kernel's limits: 64 segments, and about 64 KiB in one send.
        let many: Vec<SideEffect> = (0..100).map(|_| deliver(3, 877)).collect();
        assert_eq!(delivery_run(&many, 0, true), MAX_DELIVERY_RUN);
        assert_eq!(delivery_run(&many, 90, true), 10);
        let big: Vec<SideEffect> = (0..100).map(|_| deliver(3, 1400)).collect();
        assert_eq!(delivery_run(&big, 0, true), 65_000 / 1400);
    }

    #[test]
    fn routes_send_from_the_socket_an_address_was_heard_on() {
        let v6 = SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], 9));
        // One socket per family: nothing to choose, nothing stored.
        let mut one = Routes::new(vec![false, true]);
        one.learn(addr(1), 1);
        assert_eq!(one.socket_for(&addr(1)), Some(1));
        assert_eq!(one.socket_for(&v6), Some(0));
        assert_eq!(Routes::new(vec![true]).socket_for(&v6), None);
        // Two IPv4 sockets: an address heard on the second is answered from it; an
        // address never heard from, or heard on the first, gets the first.
        let mut two = Routes::new(vec![true, false, true]);
        assert_eq!(two.socket_for(&addr(1)), Some(0));
        two.learn(addr(1), 2);
        assert_eq!(two.socket_for(&addr(1)), Some(2));
        assert_eq!(two.socket_for(&addr(2)), Some(0));
        assert_eq!(two.socket_for(&v6), Some(1));
        assert_eq!(two.len(), 1);
        two.learn(addr(1), 0);
        assert_eq!(two.socket_for(&addr(1)), Some(0));
        assert!(two.is_empty(), "the default is not stored");
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_plan_groups_cells_per_next_hop_in_arrival_order() {
        let mut plan = Plan::default();
        // Interleaved destinations, then many distinct ones (past any linear scan).
        let order: Vec<u16> = [1, 1, 2, 1, 3, 2, 2]
            .into_iter()
            .chain(100..400)
            .chain([3, 1])
            .collect();
        for (k, &port) in order.iter().enumerate() {
            plan.push(addr(port), CellAt::Tx { idx: k as u32 });
        }
        let groups = plan.groups();
        assert_eq!(groups.len(), 3 + 300);
        let cells = |g: &Group| -> Vec<u32> {
            g.cells
                .iter()
                .map(|l| match l {
                    CellAt::Tx { idx } => *idx,
                    CellAt::Rx { .. } => unreachable!(),
                })
                .collect()
        };
        assert_eq!(groups[0].dest, addr(1));
        assert_eq!(cells(&groups[0]), vec![0, 1, 3, 308]);
        assert_eq!(cells(&groups[1]), vec![2, 5, 6]);
        assert_eq!(cells(&groups[2]), vec![4, 307]);
        for (g, port) in groups[3..].iter().zip(100u16..400) {
            assert_eq!(g.dest, addr(port));
            assert_eq!(g.cells.len(), 1);
        }
        // After a clear, the next batch starts empty and groups afresh.
        plan.clear();
        assert!(plan.is_empty());
        plan.push(addr(2), CellAt::Tx { idx: 9 });
        plan.push(addr(1), CellAt::Tx { idx: 10 });
        plan.push(addr(2), CellAt::Tx { idx: 11 });
        let groups = plan.groups();
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].dest, cells(&groups[0])), (addr(2), vec![9, 11]));
        assert_eq!((groups[1].dest, cells(&groups[1])), (addr(1), vec![10]));
    }
}
