//! Mix mode's delay queue: Poisson mixing (as Loopix) without a clock.
//!
//! A hop in mix mode holds each cell of a mixed circuit for an independent sample of an
//! exponential distribution whose mean the client chose for that hop, then forwards it;
//! cells therefore leave in an order unrelated to the order they came in. This module is
//! the sans-IO half: [`exponential_delay_ms`] turns the worker's uniform random bits
//! into a delay, and [`DelayQueue`] holds values until a deadline, with time always an
//! argument (the worker passes its clock in), so it is tested with a simulated clock.
//!
//! The queue is a hashed timing wheel over a slab allocated once, at construction:
//! `push` and `pop_due` never allocate, memory does not grow with load, and a push into
//! a full queue is refused (the value is handed back) and counted, so the caller drops
//! the cell and counts it. Deadlines beyond the wheel's horizon are kept in their slot
//! and skipped until their round comes.

/// No entry (end of a slot's list).
const NIL: u32 = u32::MAX;

/// A delay in milliseconds drawn from the exponential distribution with mean
/// `mean_ms`, by inversion of its CDF, from 64 uniform random bits. Delays are capped at
/// 64 times the mean (a probability of e^-64, about 1.6e-28, of being reached), so one
/// sample never holds a cell for unbounded time.
pub fn exponential_delay_ms(mean_ms: f64, random: u64) -> f64 {
    if mean_ms <= 0.0 || mean_ms.is_nan() {
        return 0.0;
    }
    // The top 53 bits as a uniform in [0, 1): 1 - u is in (0, 1], so ln is finite.
    let u = (random >> 11) as f64 / (1u64 << 53) as f64;
    (-(1.0 - u).ln() * mean_ms).min(64.0 * mean_ms)
}

struct Entry<T> {
    deadline_ms: u64,
    next: u32,
    value: Option<T>,
}

/// Values held until their deadline (see the module docs).
pub struct DelayQueue<T> {
    tick_ms: u64,
    /// Head of each slot's list; slot of a deadline = (deadline / tick) % slots.
    heads: Vec<u32>,
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    /// The first tick not yet processed.
    tick: u64,
    len: usize,
    overflows: u64,
}

impl<T> core::fmt::Debug for DelayQueue<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DelayQueue")
            .field("len", &self.len)
            .field("capacity", &self.entries.len())
            .field("overflows", &self.overflows)
            .finish_non_exhaustive()
    }
}

impl<T> DelayQueue<T> {
    /// A queue of at most `capacity` values, a wheel of `slots` slots of `tick_ms`
    /// milliseconds each (its horizon is `slots * tick_ms`; later deadlines wait extra
    /// rounds), starting at time `now_ms`. All memory is allocated here.
    pub fn new(capacity: usize, slots: usize, tick_ms: u64, now_ms: u64) -> Self {
        let capacity = capacity.min(NIL as usize);
        let tick_ms = tick_ms.max(1);
        DelayQueue {
            tick_ms,
            heads: vec![NIL; slots.max(1)],
            entries: (0..capacity)
                .map(|_| Entry {
                    deadline_ms: 0,
                    next: NIL,
                    value: None,
                })
                .collect(),
            free: (0..capacity as u32).rev().collect(),
            tick: now_ms / tick_ms,
            len: 0,
            overflows: 0,
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most values it holds.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Pushes refused because the queue was full.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Holds `value` until `deadline_ms`. A deadline already past is due at the next
    /// [`DelayQueue::pop_due`]. When the queue is full the value comes back (and the
    /// overflow is counted): the caller drops it.
    pub fn push(&mut self, deadline_ms: u64, value: T) -> Result<(), T> {
        let Some(i) = self.free.pop() else {
            self.overflows += 1;
            return Err(value);
        };
        // A deadline before the next unprocessed tick lands in that tick's slot.
        let tick = (deadline_ms / self.tick_ms).max(self.tick);
        let slot = (tick % self.heads.len() as u64) as usize;
        let e = &mut self.entries[i as usize];
        e.deadline_ms = deadline_ms.max(tick * self.tick_ms);
        e.value = Some(value);
        e.next = self.heads[slot];
        self.heads[slot] = i;
        self.len += 1;
        Ok(())
    }

    /// Hands every value whose deadline is at or before `now_ms` to `out`, tick by tick
    /// (within one tick in no particular order), and frees its place. Visits the slots
    /// from the last call's tick to now's, at most one whole round however long the
    /// pause (every slot is then seen once, and every due value is in one of them).
    pub fn pop_due(&mut self, now_ms: u64, mut out: impl FnMut(T)) {
        let last = now_ms / self.tick_ms;
        let slots = self.heads.len() as u64;
        if self.len > 0 {
            let span = (last.saturating_sub(self.tick) + 1).min(slots);
            for k in 0..span {
                let slot = ((self.tick + k) % slots) as usize;
                let mut prev = NIL;
                let mut i = self.heads[slot];
                while i != NIL {
                    let next = self.entries[i as usize].next;
                    if self.entries[i as usize].deadline_ms <= now_ms {
                        if prev == NIL {
                            self.heads[slot] = next;
                        } else {
                            self.entries[prev as usize].next = next;
                        }
                        let e = &mut self.entries[i as usize];
                        e.next = NIL;
                        if let Some(v) = e.value.take() {
                            out(v);
                        }
                        self.free.push(i);
                        self.len -= 1;
                    } else {
                        prev = i;
                    }
                    i = next;
                }
            }
        }
        // The current tick stays open: values due later in it are in its slot, which
        // the next call visits first.
        self.tick = self.tick.max(last);
    }

    /// The earliest deadline held, or None when empty. Walks the wheel from the current
    /// tick (at most one round), so a driver calls it once per wait, not per cell.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let slots = self.heads.len() as u64;
        let mut best: Option<u64> = None;
        for k in 0..slots {
            let slot = ((self.tick + k) % slots) as usize;
            let mut i = self.heads[slot];
            while i != NIL {
                let d = self.entries[i as usize].deadline_ms;
                best = Some(best.map_or(d, |b| b.min(d)));
                i = self.entries[i as usize].next;
            }
            // A deadline within this round ends the search at its slot.
            if let Some(b) = best {
                if b / self.tick_ms <= self.tick + k {
                    return Some(b);
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic 64-bit generator (SplitMix64) for the tests.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn exponential_delays_have_the_mean_and_the_shape_asked_for() {
        let mut rng = SplitMix(7);
        let mean = 20.0;
        let n = 200_000;
        let mut xs: Vec<f64> = (0..n)
            .map(|_| exponential_delay_ms(mean, rng.next()))
            .collect();
        let avg = xs.iter().sum::<f64>() / n as f64;
        assert!((avg / mean - 1.0).abs() < 0.01, "mean {avg}");
        // Kolmogorov-Smirnov against 1 - exp(-x / mean): the critical value at
        // alpha = 0.001 is 1.95 / sqrt(n).
        xs.sort_by(f64::total_cmp);
        let d = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = 1.0 - (-x / mean).exp();
                (f - i as f64 / n as f64)
                    .abs()
                    .max((f - (i + 1) as f64 / n as f64).abs())
            })
            .fold(0.0, f64::max);
        assert!(d < 1.95 / (n as f64).sqrt(), "KS distance {d}");
        assert_eq!(exponential_delay_ms(0.0, 5), 0.0);
        assert_eq!(exponential_delay_ms(mean, 0), 0.0);
        assert!(exponential_delay_ms(mean, u64::MAX) <= 64.0 * mean);
    }

    #[test]
    fn values_leave_at_their_deadline_on_a_simulated_clock() {
        // Exponential delays (mean 20 ms) on a 1 ms wheel of 256 slots (a 256 ms
        // horizon, so the tail waits extra rounds); the clock advances 1 ms at a time.
        let mut rng = SplitMix(11);
        let start = 1_000_000;
        let mut q: DelayQueue<(u32, u64)> = DelayQueue::new(4096, 256, 1, start);
        let mut now = start;
        let mut out = Vec::new();
        let mut late = 0u64;
        let mut pushed = 0u32;
        while pushed < 50_000 || !q.is_empty() {
            if pushed < 50_000 {
                for _ in 0..2 {
                    let d = exponential_delay_ms(20.0, rng.next()).ceil() as u64;
                    q.push(now + d, (pushed, now + d)).unwrap();
                    pushed += 1;
                }
            }
            now += 1;
            q.pop_due(now, |(id, deadline)| {
                if deadline > now {
                    late += 1; // released before its deadline: must never happen
                }
                out.push((id, deadline, now));
            });
        }
        assert_eq!(late, 0);
        assert_eq!(out.len(), 50_000);
        // Each value leaves in the first call at or after its deadline (the clock
        // moves 1 ms a call, so at exactly its deadline).
        assert!(out.iter().all(|&(_, d, t)| t == d));
        assert_eq!(q.overflows(), 0);
    }

    #[test]
    fn a_full_queue_refuses_and_counts_and_memory_stays_put() {
        let mut q: DelayQueue<u32> = DelayQueue::new(3, 8, 1, 0);
        let cap = q.entries.capacity();
        assert!(q.push(5, 1).is_ok());
        assert!(q.push(5, 2).is_ok());
        assert!(q.push(100, 3).is_ok());
        assert_eq!(q.push(1, 4), Err(4));
        assert_eq!(q.overflows(), 1);
        assert_eq!(q.next_deadline(), Some(5));
        let mut got = Vec::new();
        q.pop_due(4, |v| got.push(v));
        assert!(got.is_empty());
        q.pop_due(5, |v| got.push(v));
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(q.next_deadline(), Some(100));
        // Past the horizon (8 slots): 100 waits for its round, not for slot 100 % 8.
        q.pop_due(99, |v| got.push(v));
        assert_eq!(got.len(), 2);
        q.pop_due(100, |v| got.push(v));
        assert_eq!(got, vec![1, 2, 3]);
        assert!(q.is_empty());
        assert_eq!(q.entries.capacity(), cap, "no growth");
        // A deadline already past leaves at the next pop.
        q.push(50, 9).unwrap();
        q.pop_due(101, |v| got.push(v));
        assert_eq!(got.last(), Some(&9));
    }

    #[test]
    fn a_long_pause_releases_everything_due_once() {
        let mut q: DelayQueue<u32> = DelayQueue::new(100, 16, 2, 0);
        for k in 0..100u32 {
            q.push(u64::from(k) * 7, k).unwrap();
        }
        let mut got = Vec::new();
        // The clock jumps far past the horizon (16 slots x 2 ms) in one step.
        q.pop_due(350, |v| got.push(v));
        got.sort_unstable();
        assert_eq!(got, (0..=50).collect::<Vec<_>>());
        q.pop_due(10_000, |v| got.push(v));
        assert_eq!(got.len(), 100);
        assert!(q.is_empty());
    }
}
