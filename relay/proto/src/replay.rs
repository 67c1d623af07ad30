//! Replay protection.
//!
//! - [`ReplayWindow`]: per circuit and direction, a sliding window over the 48-bit cell
//!   counter (as in IPsec/WireGuard). A counter is accepted once; counters more than
//!   [`WINDOW`] below the highest seen are refused. Memory: fixed, 136 bytes.
//! - [`SetupFilter`]: per onion key, the set of setup ephemerals seen. A setup carries
//!   its creation time and is refused outside `now ± skew`, so the filter only has to
//!   remember ephemerals for `2 * skew`: it keeps two generations, each spanning
//!   `2 * skew`, and drops the older when a new one starts. Each generation has a fixed
//!   capacity allocated up front; a full generation refuses further setups (fail
//!   closed) rather than grow or forget.

use std::collections::HashSet;

use crate::cell::{counter_add, counter_sub, COUNTER_MAX};

/// Width of the data-cell replay window, in cells.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Result of checking a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowCheck {
    /// Not seen, inside the window: may be accepted (call [`ReplayWindow::commit`] after
    /// the tag verifies).
    Fresh,
    /// Seen before, or too old to tell.
    Replay,
}

/// Half the 48-bit counter space: a counter less than this far ahead (mod 2^48) of
/// the highest seen is newer, anything else older (serial-number arithmetic, RFC 1982).
const HALF: u64 = 1 << 47;

/// A sliding replay window over 48-bit cell counters.
///
/// Counters start anywhere (every hop's are shifted by a secret) and wrap at 2^48;
/// they are compared with serial-number arithmetic: `n` is newer than the highest
/// counter seen, `top`, if `(n - top) mod 2^48` is in `1..2^47`. A counter is accepted
/// once; one more than [`WINDOW`] - 1 behind `top` is refused as too old.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest counter committed ([`NONE`] before the first: counters have 48 bits,
    /// so the sentinel keeps the window at 136 bytes where an `Option` takes 144).
    top: u64,
    bits: [u64; WORDS],
}

/// `top` before the first commit.
const NONE: u64 = u64::MAX;

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: NONE,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// How far `n` is ahead of the highest counter committed (0 if it is not ahead,
    /// or nothing was committed yet).
    pub fn ahead(&self, n: u64) -> u64 {
        match self.top() {
            Some(top) => {
                let d = counter_sub(n, top);
                if d < HALF {
                    d
                } else {
                    0
                }
            }
            None => 0,
        }
    }

    /// Checks `n` without changing state.
    pub fn check(&self, n: u64) -> WindowCheck {
        let Some(top) = self.top() else {
            return WindowCheck::Fresh;
        };
        let d = counter_sub(n, top);
        if d != 0 && d < HALF {
            return WindowCheck::Fresh;
        }
        if counter_sub(top, n) >= WINDOW {
            return WindowCheck::Replay;
        }
        let bit = n % WINDOW;
        if self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
            WindowCheck::Replay
        } else {
            WindowCheck::Fresh
        }
    }

    /// Records `n` as seen. Call only after `check(n) == Fresh` and a verified tag.
    pub fn commit(&mut self, n: u64) {
        let n = n & COUNTER_MAX;
        match self.top() {
            None => {
                self.bits = [0; WORDS];
                self.top = n;
            }
            Some(top) => {
                let advance = counter_sub(n, top);
                if advance != 0 && advance < HALF {
                    // Clear the bits of counters that slide into the window fresh.
                    if advance >= WINDOW {
                        self.bits = [0; WORDS];
                    } else {
                        for k in 1..=advance {
                            let bit = counter_add(top, k) % WINDOW;
                            self.bits[(bit / 64) as usize] &= !(1 << (bit % 64));
                        }
                    }
                    self.top = n;
                }
            }
        }
        let bit = n % WINDOW;
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// Highest counter committed, if any.
    pub fn top(&self) -> Option<u64> {
        (self.top != NONE).then_some(self.top)
    }
}

/// Why a setup was refused by the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupCheck {
    /// First time seen: recorded.
    Fresh,
    /// Seen before within the window.
    Replay,
    /// Timestamp outside `now ± skew`.
    Expired,
    /// The current generation is full.
    Full,
}

/// A bounded seen-filter for setup ephemerals of one onion key.
#[derive(Debug)]
pub struct SetupFilter {
    skew: u64,
    capacity: usize,
    gen_start: u64,
    /// Setups stamped at or before this second are refused as expired.
    floor: Option<u64>,
    current: HashSet<[u8; 16]>,
    previous: HashSet<[u8; 16]>,
}

impl SetupFilter {
    /// A filter accepting timestamps within `now ± skew` seconds, remembering at most
    /// `capacity` setups per generation (two generations are allocated now).
    pub fn new(skew: u64, capacity: usize, now: u64) -> Self {
        SetupFilter {
            skew: skew.max(1),
            capacity,
            gen_start: now,
            floor: None,
            current: HashSet::with_capacity(capacity),
            previous: HashSet::with_capacity(capacity),
        }
    }

    /// From now on, refuses (as [`SetupCheck::Expired`]) every setup stamped at or
    /// before second `ts`: setups this filter cannot know about, because something
    /// else (an earlier process) may have accepted them.
    pub fn refuse_up_to(&mut self, ts: u64) {
        self.floor = Some(self.floor.map_or(ts, |f| f.max(ts)));
    }

    /// The identity under which a setup with this ephemeral representative is
    /// remembered: its first 16 bytes.
    pub fn id_of(ephemeral: &[u8; 32]) -> [u8; 16] {
        let mut key = [0u8; 16];
        key.copy_from_slice(&ephemeral[..16]);
        key
    }

    /// Remembers a setup seen elsewhere (an earlier process's journal): later setups
    /// with this id are replays. Ignored if `ts` is outside `now ± skew` (such a setup
    /// is refused as expired anyway) or the generation is full.
    pub fn remember(&mut self, id: [u8; 16], ts: u64, now: u64) {
        if ts.abs_diff(now) <= self.skew && self.current.len() < self.capacity {
            self.current.insert(id);
        }
    }

    /// Checks and records the setup identified by `ephemeral` created at `ts`.
    pub fn check_and_insert(&mut self, ephemeral: &[u8; 32], ts: u64, now: u64) -> SetupCheck {
        if ts.abs_diff(now) > self.skew || self.floor.is_some_and(|f| ts <= f) {
            return SetupCheck::Expired;
        }
        if now >= self.gen_start + 2 * self.skew {
            core::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.gen_start = now;
        }
        let key = Self::id_of(ephemeral);
        if self.current.contains(&key) || self.previous.contains(&key) {
            return SetupCheck::Replay;
        }
        if self.current.len() >= self.capacity {
            return SetupCheck::Full;
        }
        self.current.insert(key);
        SetupCheck::Fresh
    }

    /// Setups remembered now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// True if nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_window_is_136_bytes() {
        assert_eq!(core::mem::size_of::<super::ReplayWindow>(), 136);
    }

    use super::*;

    #[test]
    fn window_accepts_once_and_slides() {
        let mut w = ReplayWindow::new();
        for n in [0u64, 5, 3, 1000, 4, 2000] {
            assert_eq!(w.check(n), WindowCheck::Fresh, "{n}");
            w.commit(n);
            assert_eq!(w.check(n), WindowCheck::Replay, "{n}");
        }
        // The window holds the 1024 counters 977..=2000.
        assert_eq!(w.check(1999), WindowCheck::Fresh);
        assert_eq!(w.check(977), WindowCheck::Fresh);
        assert_eq!(w.check(976), WindowCheck::Replay); // fell out of the window
        assert_eq!(w.ahead(2500), 500);
        assert_eq!(w.ahead(1500), 0);
        assert_eq!(w.check(1000), WindowCheck::Replay);
        w.commit(5000);
        assert_eq!(w.check(2000), WindowCheck::Replay);
        assert_eq!(w.check(4999), WindowCheck::Fresh);
    }

    #[test]
    fn window_compares_serially_across_the_48_bit_wrap() {
        let mut w = ReplayWindow::new();
        let near_end = COUNTER_MAX - 2;
        w.commit(near_end);
        for n in [COUNTER_MAX - 1, COUNTER_MAX, 0, 1] {
            assert_eq!(w.check(n), WindowCheck::Fresh, "{n}");
            w.commit(n);
        }
        assert_eq!(w.top(), Some(1));
        assert_eq!(w.check(near_end), WindowCheck::Replay);
        assert_eq!(w.check(COUNTER_MAX), WindowCheck::Replay);
        assert_eq!(w.check(2), WindowCheck::Fresh);
        assert_eq!(w.ahead(5), 4);
        // Half the space ahead or more counts as behind, hence too old.
        assert_eq!(w.check(1 + HALF), WindowCheck::Replay);
        assert_eq!(w.ahead(1 + HALF), 0);
    }

    #[test]
    fn window_reuses_bits_correctly_after_wrap() {
        let mut w = ReplayWindow::new();
        w.commit(10);
        w.commit(10 + WINDOW); // same bit position, newer counter
        assert_eq!(w.check(10 + WINDOW), WindowCheck::Replay);
        assert_eq!(w.check(11 + WINDOW), WindowCheck::Fresh);
        assert_eq!(w.check(10), WindowCheck::Replay);
    }

    #[test]
    fn setup_filter_bounds() {
        let mut f = SetupFilter::new(60, 2, 1000);
        let a = [1u8; 32];
        let b = [2u8; 32];
        let c = [3u8; 32];
        assert_eq!(f.check_and_insert(&a, 1000, 1000), SetupCheck::Fresh);
        assert_eq!(f.check_and_insert(&a, 1000, 1001), SetupCheck::Replay);
        assert_eq!(f.check_and_insert(&b, 1200, 1001), SetupCheck::Expired);
        assert_eq!(f.check_and_insert(&b, 990, 1001), SetupCheck::Fresh);
        assert_eq!(f.check_and_insert(&c, 990, 1001), SetupCheck::Full);
        // A generation later `a` is still remembered (previous generation)...
        assert_eq!(f.check_and_insert(&a, 1110, 1120), SetupCheck::Replay);
        // ...and its timestamp is what keeps older replays out after that.
        assert_eq!(f.check_and_insert(&a, 1000, 1300), SetupCheck::Expired);
    }

    #[test]
    fn setup_filter_floor_refuses_what_an_earlier_process_may_have_seen() {
        let mut f = SetupFilter::new(60, 8, 1000);
        f.refuse_up_to(1000);
        assert_eq!(f.check_and_insert(&[1; 32], 999, 1000), SetupCheck::Expired);
        assert_eq!(
            f.check_and_insert(&[2; 32], 1000, 1000),
            SetupCheck::Expired
        );
        assert_eq!(f.check_and_insert(&[3; 32], 1001, 1001), SetupCheck::Fresh);
        f.refuse_up_to(900); // never lowers the floor
        assert_eq!(
            f.check_and_insert(&[4; 32], 1000, 1001),
            SetupCheck::Expired
        );
    }
}
