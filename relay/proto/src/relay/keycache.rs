//! The expanded layer keys of the circuits that carry cells, in a cache of fixed size.
//!
//! A circuit keeps its raw layer keys ([`LayerSecret`], 72 bytes a direction); the
//! AES-GCM and stack-mask schedules a cell needs ([`LayerKeys`], about 800 bytes a
//! direction with `ring`) live here, one entry per (circuit slot, direction),
//! direct-mapped: the entry of `(slot, forward)` is `slot mod n`, that of
//! `(slot, backward)` is `(slot XOR n/2) mod n`. So the forward keys of up to `n`
//! circuits in consecutive slots (the table hands out low slots first), or the keys of
//! both directions of up to `n/2`, never collide. Past that, a cell whose entry holds
//! another circuit's keys expands its own (a miss, counted: a few hundred nanoseconds)
//! and evicts the other. An entry is tagged with the slot's generation, so a reused
//! slot never meets the keys of the circuit it had before; the keys of a removed
//! circuit are overwritten at once.

use crate::aead::Aead;
use crate::layer::{LayerKeys, LayerSecret};

use super::circuits::Direction;

/// Tag of an entry that holds no circuit's keys. A real tag is
/// `generation << 32 | slot << 1 | direction` with `slot < 2^31 - 1`
/// ([`super::circuits::MAX_CIRCUIT_SLOTS`]), so its low 32 bits are never all ones.
const EMPTY: u64 = u64::MAX;

/// Expanded layer keys of the active circuits.
pub(super) struct KeyCache<A: Aead> {
    tags: Vec<u64>,
    keys: Vec<LayerKeys<A>>,
    mask: u32,
    half: u32,
}

fn blank() -> LayerSecret {
    LayerSecret::new(&[0; 32], &[0; 32], 0)
}

fn tag(slot: u32, generation: u32, dir: Direction) -> u64 {
    (u64::from(generation) << 32) | (u64::from(slot) << 1) | dir as u64
}

impl<A: Aead> KeyCache<A> {
    /// A cache of `entries` (rounded up to a power of two, at least 2), every schedule
    /// expanded here, so the cache's memory is fixed and resident from the start.
    pub(super) fn new(entries: usize) -> Self {
        let n = entries.clamp(2, 1 << 30).next_power_of_two();
        let blank = blank();
        KeyCache {
            tags: vec![EMPTY; n],
            keys: (0..n).map(|_| blank.expand()).collect(),
            mask: (n - 1) as u32,
            half: (n / 2) as u32,
        }
    }

    /// Entries.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tags.len()
    }

    fn index(&self, slot: u32, dir: Direction) -> usize {
        let flip = match dir {
            Direction::Forward => 0,
            Direction::Backward => self.half,
        };
        ((slot ^ flip) & self.mask) as usize
    }

    /// The expanded `secret`, which is the key of the circuit in `slot` of
    /// `generation` in direction `dir` ([`Self::load`], then [`Self::at`]; tests).
    #[cfg(test)]
    pub(super) fn get(
        &mut self,
        slot: u32,
        generation: u32,
        dir: Direction,
        secret: &LayerSecret,
        misses: &mut u64,
    ) -> &LayerKeys<A> {
        let entry = self.load(slot, generation, dir, secret, misses);
        self.at(entry)
    }

    /// The entry the keys of `(slot, dir)` live in when cached.
    pub(super) fn entry(&self, slot: u32, dir: Direction) -> u32 {
        self.index(slot, dir) as u32
    }

    /// Brings the keys of `(slot, generation, dir)`, expanded from `secret`, into
    /// their entry if it holds anything else (and then adds one to `misses`), and
    /// returns the entry, for [`Self::at`] to read.
    pub(super) fn load(
        &mut self,
        slot: u32,
        generation: u32,
        dir: Direction,
        secret: &LayerSecret,
        misses: &mut u64,
    ) -> u32 {
        let i = self.index(slot, dir);
        let t = tag(slot, generation, dir);
        if self.tags[i] != t {
            self.keys[i] = secret.expand();
            self.tags[i] = t;
            *misses += 1;
        }
        i as u32
    }

    /// The keys in `entry` (whatever circuit's they are now: a caller holding an entry
    /// from [`Self::load`] must not have loaded a colliding circuit since).
    pub(super) fn at(&self, entry: u32) -> &LayerKeys<A> {
        &self.keys[entry as usize]
    }

    /// Overwrites the keys of the circuit in `slot` of `generation`, if cached, so
    /// that they do not outlive it.
    pub(super) fn forget(&mut self, slot: u32, generation: u32) {
        for dir in [Direction::Forward, Direction::Backward] {
            let i = self.index(slot, dir);
            if self.tags[i] == tag(slot, generation, dir) {
                self.keys[i] = blank().expand();
                self.tags[i] = EMPTY;
            }
        }
    }

    /// Whether the keys of `(slot, generation, dir)` are in the cache (tests).
    #[cfg(test)]
    pub(super) fn holds(&self, slot: u32, generation: u32, dir: Direction) -> bool {
        self.tags[self.index(slot, dir)] == tag(slot, generation, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aead::RingAead;
    use crate::cell::Command;
    use crate::layer::cell_nonce;

    fn secret(k: u8) -> LayerSecret {
        LayerSecret::new(&[k; 32], &[k ^ 0x55; 32], u64::from(k) * 1000)
    }

    /// The cached schedule seals exactly as a fresh expansion of the same secret.
    fn same_keys(a: &LayerKeys<RingAead>, s: &LayerSecret) -> bool {
        let fresh: LayerKeys<RingAead> = s.expand();
        let nonce = cell_nonce(Command::Data, 7);
        let (mut x, mut y) = ([3u8; 64], [3u8; 64]);
        a.aead().seal(&nonce, b"ad", &mut x) == fresh.aead().seal(&nonce, b"ad", &mut y)
            && x == y
            && a.shifted(5) == s.shifted(5)
    }

    #[test]
    fn entries_round_up_to_a_power_of_two() {
        assert_eq!(KeyCache::<RingAead>::new(0).len(), 2);
        assert_eq!(KeyCache::<RingAead>::new(3).len(), 4);
        assert_eq!(KeyCache::<RingAead>::new(4096).len(), 4096);
    }

    #[test]
    fn a_second_use_hits_and_gives_the_same_keys() {
        let mut c = KeyCache::<RingAead>::new(8);
        let mut misses = 0;
        let s = secret(1);
        assert!(same_keys(
            c.get(3, 1, Direction::Forward, &s, &mut misses),
            &s
        ));
        assert_eq!(misses, 1);
        assert!(same_keys(
            c.get(3, 1, Direction::Forward, &s, &mut misses),
            &s
        ));
        assert_eq!(misses, 1, "the second use is a hit");
    }

    #[test]
    fn both_directions_of_half_the_entries_and_the_forward_keys_of_all_fit() {
        let n = 16u32;
        let mut c = KeyCache::<RingAead>::new(n as usize);
        let mut misses = 0;
        for slot in 0..n / 2 {
            for dir in [Direction::Forward, Direction::Backward] {
                c.get(slot, 1, dir, &secret(slot as u8), &mut misses);
            }
        }
        for slot in 0..n / 2 {
            for dir in [Direction::Forward, Direction::Backward] {
                assert!(c.holds(slot, 1, dir), "slot {slot} {dir:?} was evicted");
            }
        }
        assert_eq!(misses, u64::from(n));
        let mut c = KeyCache::<RingAead>::new(n as usize);
        let mut misses = 0;
        for slot in 0..n {
            c.get(
                slot,
                1,
                Direction::Forward,
                &secret(slot as u8),
                &mut misses,
            );
        }
        assert!((0..n).all(|s| c.holds(s, 1, Direction::Forward)));
    }

    #[test]
    fn a_colliding_circuit_evicts_and_each_still_gets_its_own_keys() {
        let mut c = KeyCache::<RingAead>::new(4);
        let mut misses = 0;
        let (a, b) = (secret(1), secret(2));
        // Slots 1 and 5 share entry 1 of 4.
        for round in 0..3 {
            assert!(same_keys(
                c.get(1, 1, Direction::Forward, &a, &mut misses),
                &a
            ));
            assert!(same_keys(
                c.get(5, 1, Direction::Forward, &b, &mut misses),
                &b
            ));
            assert_eq!(misses, 2 * (round + 1));
        }
    }

    #[test]
    fn a_reused_slot_never_gets_the_previous_circuits_keys() {
        let mut c = KeyCache::<RingAead>::new(8);
        let mut misses = 0;
        let (old, new) = (secret(1), secret(2));
        c.get(2, 1, Direction::Forward, &old, &mut misses);
        // Same slot, next generation (the circuit was removed and the slot reused).
        assert!(same_keys(
            c.get(2, 2, Direction::Forward, &new, &mut misses),
            &new
        ));
        assert_eq!(misses, 2);
    }

    #[test]
    fn a_removed_circuits_keys_are_overwritten() {
        let mut c = KeyCache::<RingAead>::new(8);
        let mut misses = 0;
        let s = secret(9);
        c.get(2, 1, Direction::Forward, &s, &mut misses);
        c.get(2, 1, Direction::Backward, &s, &mut misses);
        // Forgetting another generation of the slot leaves them.
        c.forget(2, 7);
        assert!(c.holds(2, 1, Direction::Forward));
        c.forget(2, 1);
        assert!(!c.holds(2, 1, Direction::Forward) && !c.holds(2, 1, Direction::Backward));
        let i = c.index(2, Direction::Forward);
        assert!(
            same_keys(&c.keys[i], &blank()),
            "the schedule is the blank one now"
        );
    }
}
