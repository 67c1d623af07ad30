//! Mix mode in the worker: cells of mixed circuits wait in a [`DelayQueue`] for an
//! exponential delay drawn per cell, then go out like any other cell.
//!
//! A held cell lives in the worker's transmit arena (copied there from its receive
//! buffer, which goes back to the kernel at once), in a pool of its own as large as
//! the queue, so held cells and the cells the worker originates never starve each
//! other. Time is the worker's clock, passed in;
//! the random bits come from a ChaCha8 generator seeded from the operating system per
//! worker, so an observer cannot predict the delays.

use std::net::SocketAddr;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shroud_proto::mix::{exponential_delay_ms, DelayQueue};
use shroud_proto::relay::CircuitRef;

/// Wheel slots of 1 ms: a 4 s horizon, beyond which deadlines wait extra rounds.
const WHEEL_SLOTS: usize = 4096;

/// What waits in the queue.
#[derive(Debug, Clone, Copy)]
pub enum Held {
    /// A cell in transmit-arena cell `idx`, to send to `to`.
    Cell {
        /// Next hop.
        to: SocketAddr,
        /// Arena cell.
        idx: u32,
    },
    /// Exit: a payload (the first `len` bytes of arena cell `idx`) to deliver to the
    /// destination of `circuit`.
    Deliver {
        /// The circuit whose exit socket sends it.
        circuit: CircuitRef,
        /// Arena cell holding the payload.
        idx: u32,
        /// Payload length.
        len: u16,
    },
}

/// The delay queue of one worker and the generator its delays are drawn from.
pub struct Mixer {
    queue: DelayQueue<Held>,
    rng: ChaCha8Rng,
}

impl std::fmt::Debug for Mixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixer")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Mixer {
    /// A mixer holding at most `capacity` cells, starting at `now_ms`.
    pub fn new(capacity: usize, now_ms: u64) -> Self {
        Mixer {
            queue: DelayQueue::new(capacity, WHEEL_SLOTS, 1, now_ms),
            rng: ChaCha8Rng::from_entropy(),
        }
    }

    /// The most cells it holds.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Cells held now.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Holds `held` for an exponential delay of mean `mean_ms` from `now_ms`. A full
    /// queue hands it back (the caller frees its arena cell and counts the drop).
    pub fn hold(&mut self, held: Held, mean_ms: u16, now_ms: u64) -> Result<(), Held> {
        let delay = exponential_delay_ms(f64::from(mean_ms), self.rng.next_u64());
        // Rounded up to the wheel's millisecond: a delay is never shortened.
        self.queue.push(now_ms + delay.ceil() as u64, held)
    }

    /// Hands every held item due at `now_ms` to `out`.
    pub fn release(&mut self, now_ms: u64, out: impl FnMut(Held)) {
        self.queue.pop_due(now_ms, out);
    }

    /// Fills `buf` with random bytes (link padding).
    pub fn fill_random(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }

    /// How long (ms) the driver may wait before the next held item is due: `None`
    /// when nothing is held.
    pub fn wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.queue.next_deadline().map(|t| t.saturating_sub(now_ms))
    }
}
