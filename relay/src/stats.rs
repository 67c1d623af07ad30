//! Per-worker counters, written by the worker after each batch (relaxed atomics, one
//! writer) and read by the admin socket and metrics off the data path.
//!
//! [`LatencyHistogram`] is a fixed-bucket histogram, kept for two times: the
//! relay-internal time per batch (from a batch's completions being reaped to its sends
//! being queued to the kernel) and each received cell's time in the relay (from its
//! datagram reaching the socket to the sends of its batch being handed to the kernel).
//! Recording is one bucket search over [`LATENCY_BUCKETS_NS`] and three relaxed
//! additions, no allocation and no lock. Readers may see a bucket incremented before
//! the sum or count of the same observation; each value is monotonic on its own.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use shroud_admin::{Latency, WorkerCounters};
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
    /// Sends to exit destinations: consecutive deliveries of one circuit leave in one
    /// UDP GSO send, which counts once.
    pub exit_sends: AtomicU64,
    /// Datagrams received from exit destinations and sent back on circuits.
    pub exit_replies: AtomicU64,
    /// Setups accepted.
    pub setups: AtomicU64,
    /// X25519 operations spent on setup cells.
    pub setup_dh: AtomicU64,
    /// `RETRY` replies sent to new addresses under load.
    pub retries_sent: AtomicU64,
    /// Cells whose circuit's layer keys were expanded because the key cache did not
    /// hold them.
    pub key_cache_misses: AtomicU64,
    /// Circuits expired for idleness.
    pub expired_circuits: AtomicU64,
    /// Cover cells that ended here (exit), loop cover included.
    pub cover_received: AtomicU64,
    /// Loop cover cells sent back (exit).
    pub loop_cover_returned: AtomicU64,
    /// Link padding cells sent to peers.
    pub link_padding_sent: AtomicU64,
    /// Link padding cells received from peers.
    pub link_padding_received: AtomicU64,
    /// Mix mode: cells held for a delay.
    pub mix_delayed: AtomicU64,
    /// Mix mode: cells held now.
    pub mix_held: AtomicU64,
    /// Mix mode: cells refused by a full delay queue.
    pub mix_overflow: AtomicU64,
    /// Live circuits (gauge).
    pub circuits: AtomicU64,
    /// Live client links (gauge).
    pub client_links: AtomicU64,
    /// Live peer links (gauge).
    pub peer_links: AtomicU64,
    /// Drops by reason (`DropReason as usize`).
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Send operations that failed in the kernel.
    pub send_errors: AtomicU64,
    /// Receive operations that failed in the kernel (not counting a buffer ring
    /// that ran dry, which only delays the receive).
    pub recv_errors: AtomicU64,
    /// Times the receive buffer ring ran dry (io_uring driver): receiving paused
    /// until buffers came back, datagrams waiting in the socket meanwhile.
    pub recv_ring_empty: AtomicU64,
    /// Exit circuits whose socket the worker had to make itself because the pool of
    /// ready exit sockets was empty.
    pub exit_pool_misses: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
    /// Worker loop iterations that polled the control channel: the watchdog's sign
    /// that the worker is alive (it loops at least every 50 ms, idle or not).
    pub loops: AtomicU64,
    /// Time from reaping a batch's completions to queueing its sends.
    pub batch_latency: LatencyHistogram,
    /// Each received cell's time in the relay: from its datagram reaching the
    /// socket (the kernel's receive timestamp) to the sends of its batch being handed
    /// to the kernel. The waits for the worker to wake and to be scheduled count, as
    /// they do for the cell; one observation per cell.
    pub cell_residence: LatencyHistogram,
    driver: AtomicU8,
}

/// Upper bounds (inclusive, nanoseconds) of the [`LatencyHistogram`] buckets; one more
/// bucket above the last bound counts everything slower (`+Inf`).
pub const LATENCY_BUCKETS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// A histogram of latencies in fixed buckets (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket counts (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation of `d`.
    #[inline]
    pub fn record(&self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), 1);
    }

    /// Records `n` observations of `ns` nanoseconds each.
    #[inline]
    pub fn record_ns(&self, ns: u64, n: u64) {
        let i = LATENCY_BUCKETS_NS.partition_point(|&le| le < ns);
        self.buckets[i].fetch_add(n, Relaxed);
        self.sum_ns.fetch_add(ns.saturating_mul(n), Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// A plain copy, with cumulative bucket counts as Prometheus wants them.
    pub fn snapshot(&self) -> Latency {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_NS.len());
        for (le, b) in LATENCY_BUCKETS_NS.iter().zip(&self.buckets) {
            total += b.load(Relaxed);
            buckets.push((*le as f64 / 1e9, total));
        }
        total += self.buckets[LATENCY_BUCKETS_NS.len()].load(Relaxed);
        Latency {
            buckets,
            // At least every bucketed observation, so `+Inf` never falls below a
            // finite bucket even when read between a bucket and the count.
            count: self.count.load(Relaxed).max(total),
            sum_s: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

impl WorkerStats {
    /// The worker's loop count ([`Self::loops`]).
    pub fn loops(&self) -> u64 {
        self.loops.load(Relaxed)
    }

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
    pub fn publish(&self, s: &RelayStats, circuits: usize, (clients, peers): (usize, usize)) {
        self.client_links.store(clients as u64, Relaxed);
        self.peer_links.store(peers as u64, Relaxed);
        for (a, v) in self.drops.iter().zip(s.drops.iter()) {
            a.store(*v, Relaxed);
        }
        self.cells_forward.store(s.cells_forward, Relaxed);
        self.cells_backward.store(s.cells_backward, Relaxed);
        self.setups.store(s.setups, Relaxed);
        self.setup_dh.store(s.setup_dh, Relaxed);
        self.retries_sent.store(s.retries_sent, Relaxed);
        self.key_cache_misses.store(s.key_cache_misses, Relaxed);
        self.expired_circuits.store(s.expired_circuits, Relaxed);
        self.cover_received.store(s.cover_received, Relaxed);
        self.loop_cover_returned
            .store(s.loop_cover_returned, Relaxed);
        self.link_padding_sent.store(s.link_padding_sent, Relaxed);
        self.link_padding_received
            .store(s.link_padding_received, Relaxed);
        self.circuits.store(circuits as u64, Relaxed);
    }

    /// A plain snapshot.
    pub fn snapshot(&self) -> WorkerCounters {
        WorkerCounters {
            driver: self.driver().name().to_owned(),
            cells_rx: self.cells_rx.load(Relaxed),
            cells_tx: self.cells_tx.load(Relaxed),
            datagrams_rx: self.datagrams_rx.load(Relaxed),
            datagrams_tx: self.datagrams_tx.load(Relaxed),
            cells_forward: self.cells_forward.load(Relaxed),
            cells_backward: self.cells_backward.load(Relaxed),
            exit_delivered: self.exit_delivered.load(Relaxed),
            exit_sends: self.exit_sends.load(Relaxed),
            exit_replies: self.exit_replies.load(Relaxed),
            setups: self.setups.load(Relaxed),
            setup_dh: self.setup_dh.load(Relaxed),
            retries_sent: self.retries_sent.load(Relaxed),
            expired_circuits: self.expired_circuits.load(Relaxed),
            cover_received: self.cover_received.load(Relaxed),
            loop_cover_returned: self.loop_cover_returned.load(Relaxed),
            link_padding_sent: self.link_padding_sent.load(Relaxed),
            link_padding_received: self.link_padding_received.load(Relaxed),
            mix_delayed: self.mix_delayed.load(Relaxed),
            mix_held: self.mix_held.load(Relaxed),
            mix_overflow: self.mix_overflow.load(Relaxed),
            circuits: self.circuits.load(Relaxed),
            client_links: self.client_links.load(Relaxed),
            peer_links: self.peer_links.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), self.drops[*r as usize].load(Relaxed)))
                .collect(),
            send_errors: self.send_errors.load(Relaxed),
            recv_errors: self.recv_errors.load(Relaxed),
            recv_ring_empty: self.recv_ring_empty.load(Relaxed),
            exit_pool_misses: self.exit_pool_misses.load(Relaxed),
            key_cache_misses: self.key_cache_misses.load(Relaxed),
            batches: self.batches.load(Relaxed),
            batch_latency: Some(self.batch_latency.snapshot()),
            cell_residence: Some(self.cell_residence.snapshot()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_inclusive_and_cumulative() {
        let h = LatencyHistogram::default();
        for ns in [0, 1_000, 1_001, 7_000, 2_000_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS_NS.len());
        assert_eq!(s.buckets[0], (1e-6, 2)); // 0 and exactly 1 us
        assert_eq!(s.buckets[1].1, 3); // 1.001 us <= 2.5 us
        assert_eq!(s.buckets[2].1, 3);
        assert_eq!(s.buckets[3].1, 4); // 7 us <= 10 us
        assert_eq!(s.buckets.last().unwrap().1, 4); // 2 s only in +Inf
        assert!((s.sum_s - 2.000_009_001).abs() < 1e-9, "{}", s.sum_s);
        assert!(s.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(s.quantile_bound(0.5), Some(2.5e-6));
        assert_eq!(s.quantile_bound(0.8), Some(1e-5));
        assert_eq!(s.quantile_bound(1.0), None);
        assert_eq!(
            LatencyHistogram::default().snapshot().quantile_bound(0.5),
            None
        );
        // n observations at once count n times.
        let h = LatencyHistogram::default();
        h.record_ns(300_000, 64);
        h.record_ns(2_000_000, 1);
        let s = h.snapshot();
        assert_eq!(s.count, 65);
        assert_eq!(s.buckets[7].1, 0); // <= 250 us
        assert_eq!(s.buckets[8].1, 64); // <= 500 us
        assert_eq!(s.buckets[10].1, 65); // <= 2.5 ms
        assert!(
            (s.sum_s - (64.0 * 300e-6 + 2e-3)).abs() < 1e-9,
            "{}",
            s.sum_s
        );
        assert_eq!(s.quantile_bound(0.98), Some(5e-4));
        assert_eq!(s.quantile_bound(0.99), Some(2.5e-3));
    }
}
