//! The driver-independent half of a worker: runs received datagrams through the
//! protocol state machine and groups the cells to send by next hop.
//!
//! Invariants: cells are processed in the buffer they arrived in and sent from it
//! (a [`Loc::Rx`] names the receive slot and offset); only cells the relay itself
//! originates (exit replies) live in the worker's transmit arena ([`Loc::Tx`]).
//! [`Plan`] keeps its vectors between batches, so after warm-up nothing here
//! allocates.

use std::net::SocketAddr;
use std::sync::Arc;

use shroud_proto::aead::Aead;
use shroud_proto::relay::{Action, CircuitRef, DropReason, Event, Relay};
use shroud_proto::Layout;

use crate::stats::WorkerStats;

/// Where a cell to send lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
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
    pub cells: Vec<Loc>,
}

/// The cells of one batch, grouped per next hop (one GSO send each).
#[derive(Debug, Default)]
pub struct Plan {
    groups: Vec<Group>,
    active: usize,
}

impl Plan {
    /// Adds a cell for `dest`.
    pub fn push(&mut self, dest: SocketAddr, loc: Loc) {
        if let Some(g) = self.groups[..self.active]
            .iter_mut()
            .find(|g| g.dest == dest)
        {
            g.cells.push(loc);
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
        self.active = 0;
    }

    /// True if nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.active == 0
    }
}

/// Work for the driver besides sending cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
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
    /// An exit circuit opened: create its socket.
    Opened {
        /// Circuit.
        circuit: CircuitRef,
        /// Destination.
        dest: SocketAddr,
    },
    /// A circuit closed: release its exit socket, if any.
    Closed {
        /// Circuit.
        circuit: CircuitRef,
    },
}

/// Protocol state and counters of one worker.
pub struct Engine<A: Aead> {
    /// The protocol state machine.
    pub relay: Relay<A>,
    /// Cell layout.
    pub layout: Layout,
    /// Shared counters.
    pub stats: Arc<WorkerStats>,
    /// Setups allowed per batch.
    pub setup_budget: u32,
}

impl<A: Aead> std::fmt::Debug for Engine<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl<A: Aead> Engine<A> {
    /// Handles one received datagram held in receive slot `slot`.
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        slot: u32,
        buf: &mut [u8],
        plan: &mut Plan,
        side: &mut Vec<Side>,
        now_ms: u64,
    ) {
        let cell = self.layout.cell;
        self.stats
            .datagrams_rx
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if buf.is_empty() || !buf.len().is_multiple_of(cell) {
            self.relay.count_drop(DropReason::Malformed, 1);
            return;
        }
        self.stats.cells_rx.fetch_add(
            (buf.len() / cell) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        for (i, c) in buf.chunks_exact_mut(cell).enumerate() {
            let off = i * cell;
            let loc = Loc::Rx {
                slot,
                off: off as u32,
            };
            match self.relay.handle(src, c, now_ms) {
                Action::Send { to, event } => {
                    plan.push(to, loc);
                    if let Some(e) = event {
                        side.push(side_of(e));
                    }
                }
                Action::Refuse { to, .. } => plan.push(to, loc),
                Action::Deliver {
                    circuit,
                    dest,
                    payload,
                } => side.push(Side::Deliver {
                    circuit,
                    dest,
                    slot,
                    range: off + payload.start..off + payload.end,
                }),
                Action::Consumed { event: Some(e) } => side.push(side_of(e)),
                Action::Consumed { event: None } | Action::Drop(_) => {}
            }
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
        let Some(idx) = arena.alloc() else {
            self.relay.count_drop(DropReason::QueueFull, 1);
            return;
        };
        match self
            .relay
            .exit_reply(circuit, payload, arena.cell_mut(idx), now_ms)
        {
            Ok(to) => {
                plan.push(to, Loc::Tx { idx });
                self.stats
                    .exit_replies
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => arena.release(idx),
        }
    }

    /// Copies the relay's counters to the shared stats.
    pub fn publish(&self) {
        self.stats
            .publish(self.relay.stats(), self.relay.circuit_count());
    }
}

fn side_of(e: Event) -> Side {
    match e {
        Event::ExitOpened { circuit, dest } => Side::Opened { circuit, dest },
        Event::Closed { circuit } => Side::Closed { circuit },
    }
}
