//! Per-worker counters, written by the worker after each batch (relaxed atomics, one
//! writer) and read by the admin socket and metrics off the data path.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use shroud_proto::relay::{DropReason, RelayStats};

/// Which I/O driver a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DriverKind {
    /// Not started yet.
    None = 0,
    /// io_uring with UDP GRO/GSO.
    Uring = 1,
    /// recvmmsg/sendmmsg fallback (io_uring unavailable).
    Mmsg = 2,
}

impl DriverKind {
    /// Stable name for logs, stats and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::None => "none",
            DriverKind::Uring => "io_uring",
            DriverKind::Mmsg => "recvmmsg",
        }
    }
}

/// Counters of one worker.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Cells received (whole cells in accepted datagrams).
    pub cells_rx: AtomicU64,
    /// Cells sent to peers and clients.
    pub cells_tx: AtomicU64,
    /// Datagrams received.
    pub datagrams_rx: AtomicU64,
    /// Datagrams (GSO sends count once) sent.
    pub datagrams_tx: AtomicU64,
    /// Forward cells processed (relayed or delivered).
    pub cells_forward: AtomicU64,
    /// Backward cells relayed or originated.
    pub cells_backward: AtomicU64,
    /// Payload datagrams delivered to exit destinations.
    pub exit_delivered: AtomicU64,
    /// Datagrams received from exit destinations and sent back on circuits.
    pub exit_replies: AtomicU64,
    /// Setups accepted.
    pub setups: AtomicU64,
    /// Live circuits (gauge).
    pub circuits: AtomicU64,
    /// Drops by reason (`DropReason as usize`).
    pub drops: [AtomicU64; 10],
    /// Send operations that failed in the kernel.
    pub send_errors: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
    driver: AtomicU8,
}

impl WorkerStats {
    /// Records the driver in use.
    pub fn set_driver(&self, d: DriverKind) {
        self.driver.store(d as u8, Relaxed);
    }

    /// The driver in use.
    pub fn driver(&self) -> DriverKind {
        match self.driver.load(Relaxed) {
            1 => DriverKind::Uring,
            2 => DriverKind::Mmsg,
            _ => DriverKind::None,
        }
    }

    /// Copies the protocol counters of the worker's relay.
    pub fn publish(&self, s: &RelayStats, circuits: usize) {
        for (a, v) in self.drops.iter().zip(s.drops.iter()) {
            a.store(*v, Relaxed);
        }
        self.cells_forward.store(s.cells_forward, Relaxed);
        self.cells_backward.store(s.cells_backward, Relaxed);
        self.setups.store(s.setups, Relaxed);
        self.circuits.store(circuits as u64, Relaxed);
    }

    /// A plain snapshot.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            driver: self.driver().name(),
            cells_rx: self.cells_rx.load(Relaxed),
            cells_tx: self.cells_tx.load(Relaxed),
            datagrams_rx: self.datagrams_rx.load(Relaxed),
            datagrams_tx: self.datagrams_tx.load(Relaxed),
            cells_forward: self.cells_forward.load(Relaxed),
            cells_backward: self.cells_backward.load(Relaxed),
            exit_delivered: self.exit_delivered.load(Relaxed),
            exit_replies: self.exit_replies.load(Relaxed),
            setups: self.setups.load(Relaxed),
            circuits: self.circuits.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name(), self.drops[*r as usize].load(Relaxed)))
                .collect(),
            send_errors: self.send_errors.load(Relaxed),
            batches: self.batches.load(Relaxed),
        }
    }
}

/// A point-in-time copy of [`WorkerStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot {
    /// Driver name.
    pub driver: &'static str,
    /// Cells received.
    pub cells_rx: u64,
    /// Cells sent.
    pub cells_tx: u64,
    /// Datagrams received.
    pub datagrams_rx: u64,
    /// Datagrams sent.
    pub datagrams_tx: u64,
    /// Forward cells processed.
    pub cells_forward: u64,
    /// Backward cells processed.
    pub cells_backward: u64,
    /// Exit deliveries.
    pub exit_delivered: u64,
    /// Exit replies.
    pub exit_replies: u64,
    /// Setups accepted.
    pub setups: u64,
    /// Live circuits.
    pub circuits: u64,
    /// Drops by reason name.
    pub drops: Vec<(&'static str, u64)>,
    /// Kernel send failures.
    pub send_errors: u64,
    /// Batches.
    pub batches: u64,
}
