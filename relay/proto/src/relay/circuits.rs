//! Circuits: the fixed-capacity table of a worker's circuits and its index by
//! `(link, circuit id)`.
//!
//! A circuit occupies one slot from its setup to its removal; a [`CircuitRef`] names a
//! slot and the generation it had, so a handle kept by the data plane (an exit socket)
//! goes stale when the slot is reused. Every circuit is indexed under its incoming
//! `(link, id)` (cells there travel forward) and, if it continues to another relay,
//! under its outgoing `(link, id)` (cells there travel backward).

use std::net::SocketAddr;

use super::keycache::KeyCache;
use super::HashMap;
use crate::aead::Aead;
use crate::layer::{LayerKeys, LayerSecret};
use crate::replay::ReplayWindow;

/// The most circuit slots a table may have (a slot number fits in 31 bits with room
/// for the key cache's empty tag).
pub const MAX_CIRCUIT_SLOTS: usize = (1 << 31) - 2;

/// A handle on a circuit slot; stale handles (slot reused) are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CircuitRef {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

impl CircuitRef {
    /// A handle from its parts, for tables kept beside the relay (tests of the exit
    /// socket table): it names a circuit only if the relay has a live one in `slot`
    /// of that `generation`, so a made-up handle reaches nothing.
    pub fn from_parts(slot: u32, generation: u32) -> Self {
        CircuitRef { slot, generation }
    }
}

/// Where a circuit goes after this relay.
#[derive(Debug, Clone, Copy)]
pub(super) enum Hop {
    /// To another relay, on `link` under circuit id `id`.
    Relay { link: u32, id: u64 },
    /// Out of the network: this relay is the exit and delivers to `dest`.
    Exit { dest: SocketAddr },
}

/// One circuit's state at this relay: its raw layer keys (expanded on demand into the
/// table's [`KeyCache`]), replay windows, ids and next hop.
pub(super) struct Circuit {
    pub(super) prev_link: u32,
    pub(super) prev_id: u64,
    pub(super) next: Hop,
    pub(super) fwd: LayerSecret,
    pub(super) bwd: LayerSecret,
    pub(super) win_fwd: ReplayWindow,
    pub(super) win_bwd: ReplayWindow,
    /// Exit only: the sequence number of the next backward cell it originates.
    pub(super) exit_counter: u64,
    /// First hop only: the cookie sent to the client in the CREATED header; the
    /// client starts its forward counters there, which proves it received it.
    pub(super) cookie: u64,
    /// Mix mode: mean delay (ms) of this hop for the circuit's data cells; 0: plain.
    pub(super) mix_mean_ms: u16,
}

/// Which way cells indexed under a `(link, id)` travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Towards the exit.
    Forward = 0,
    /// Towards the client.
    Backward = 1,
}

/// The circuits of one worker, allocated at start.
pub(super) struct CircuitTable<A: Aead> {
    slots: Vec<Option<Circuit>>,
    /// The expanded keys of the circuits in use.
    keys: KeyCache<A>,
    /// When each slot's circuit last carried a cell (ms; `u64::MAX` for a free slot),
    /// kept apart from the circuits so that idle expiry reads 8 bytes a slot instead
    /// of walking every circuit's keys.
    active: Vec<u64>,
    generations: Vec<u32>,
    free: Vec<u32>,
    by_link_id: HashMap<(u32, u64), (u32, Direction)>,
    live: usize,
}

impl<A: Aead> CircuitTable<A> {
    /// A table of `capacity` circuits (at most [`MAX_CIRCUIT_SLOTS`]) whose key cache
    /// has `key_cache` entries (rounded up to a power of two).
    pub(super) fn new(capacity: usize, key_cache: usize) -> Self {
        assert!(
            capacity <= MAX_CIRCUIT_SLOTS,
            "at most {MAX_CIRCUIT_SLOTS} circuit slots"
        );
        CircuitTable {
            slots: (0..capacity).map(|_| None).collect(),
            keys: KeyCache::new(key_cache),
            active: vec![u64::MAX; capacity],
            generations: vec![0; capacity],
            free: (0..capacity as u32).rev().collect(),
            by_link_id: HashMap::with_capacity_and_hasher(capacity * 2, ahash::RandomState::new()),
            live: 0,
        }
    }

    /// Live circuits.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// True if no slot is free.
    pub(super) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// The circuit indexed under `(link, id)` and the direction its cells travel there.
    pub(super) fn lookup(&self, link: u32, id: u64) -> Option<(u32, Direction)> {
        self.by_link_id.get(&(link, id)).copied()
    }

    /// True if `(link, id)` names a circuit already.
    pub(super) fn id_in_use(&self, link: u32, id: u64) -> bool {
        self.by_link_id.contains_key(&(link, id))
    }

    pub(super) fn get_mut(&mut self, slot: u32) -> Option<&mut Circuit> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// The circuit in `slot` and its expanded keys for direction `dir` (from the
    /// cache, or expanded now: `misses` counts those).
    pub(super) fn with_keys(
        &mut self,
        slot: u32,
        dir: Direction,
        misses: &mut u64,
    ) -> Option<(&mut Circuit, &LayerKeys<A>)> {
        let entry = self.load_keys(slot, dir, misses)?;
        let c = self.slots.get_mut(slot as usize)?.as_mut()?;
        Some((c, self.keys.at(entry)))
    }

    /// The key-cache entry that holds the keys of `(slot, dir)` when cached: two
    /// circuits with the same entry evict each other.
    pub(super) fn key_entry(&self, slot: u32, dir: Direction) -> u32 {
        self.keys.entry(slot, dir)
    }

    /// Brings the keys of the circuit in `slot` for `dir` into the key cache (counting
    /// a miss in `misses`) and returns their entry, for [`Self::keys_at`]; `None` for
    /// an empty slot.
    pub(super) fn load_keys(&mut self, slot: u32, dir: Direction, misses: &mut u64) -> Option<u32> {
        let c = self.slots.get(slot as usize)?.as_ref()?;
        let generation = self.generations[slot as usize];
        let secret = match dir {
            Direction::Forward => &c.fwd,
            Direction::Backward => &c.bwd,
        };
        Some(self.keys.load(slot, generation, dir, secret, misses))
    }

    /// The keys in key-cache entry `entry` (see [`Self::load_keys`]).
    pub(super) fn keys_at(&self, entry: u32) -> &LayerKeys<A> {
        self.keys.at(entry)
    }

    /// Whether `r`'s slot still has the generation `r` was taken at (the handle is not
    /// stale).
    fn is_current(&self, r: CircuitRef) -> bool {
        self.generations.get(r.slot as usize) == Some(&r.generation)
    }

    /// The circuit `r` names, if that handle is not stale.
    pub(super) fn get_mut_ref(&mut self, r: CircuitRef) -> Option<&mut Circuit> {
        if !self.is_current(r) {
            return None;
        }
        self.slots.get_mut(r.slot as usize)?.as_mut()
    }

    /// [`Self::with_keys`] for the circuit `r` names, if that handle is not stale.
    pub(super) fn with_keys_ref(
        &mut self,
        r: CircuitRef,
        dir: Direction,
        misses: &mut u64,
    ) -> Option<(&mut Circuit, &LayerKeys<A>)> {
        if !self.is_current(r) {
            return None;
        }
        self.with_keys(r.slot, dir, misses)
    }

    /// The circuit `r` names, if that handle is not stale.
    pub(super) fn get_ref(&self, r: CircuitRef) -> Option<&Circuit> {
        if !self.is_current(r) {
            return None;
        }
        self.slots.get(r.slot as usize).and_then(Option::as_ref)
    }

    /// The handle of the circuit in `slot` now.
    pub(super) fn handle(&self, slot: u32) -> CircuitRef {
        CircuitRef {
            slot,
            generation: self.generations[slot as usize],
        }
    }

    /// Records that the circuit in `slot` carried a cell at `now_ms`.
    pub(super) fn touch(&mut self, slot: u32, now_ms: u64) {
        if let Some(t) = self.active.get_mut(slot as usize) {
            *t = now_ms;
        }
    }

    /// Installs a circuit, active at `now_ms`, and indexes it; `None` when the table is
    /// full. The caller has checked that its `(link, id)` keys are free.
    pub(super) fn insert(&mut self, c: Circuit, now_ms: u64) -> Option<CircuitRef> {
        let slot = self.free.pop()?;
        self.active[slot as usize] = now_ms;
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1);
        self.by_link_id
            .insert((c.prev_link, c.prev_id), (slot, Direction::Forward));
        if let Hop::Relay { link, id } = c.next {
            self.by_link_id
                .insert((link, id), (slot, Direction::Backward));
        }
        self.slots[slot as usize] = Some(c);
        self.live += 1;
        Some(self.handle(slot))
    }

    /// Removes the circuit in `slot`, its index entries and its cached keys, returning
    /// it so the caller can release its links (its raw keys are wiped when it drops).
    pub(super) fn remove(&mut self, slot: u32) -> Option<Circuit> {
        let c = self.slots.get_mut(slot as usize)?.take()?;
        self.keys.forget(slot, self.generations[slot as usize]);
        self.active[slot as usize] = u64::MAX;
        self.live -= 1;
        self.by_link_id.remove(&(c.prev_link, c.prev_id));
        if let Hop::Relay { link, id } = c.next {
            self.by_link_id.remove(&(link, id));
        }
        self.free.push(slot);
        Some(c)
    }

    /// Slots of the circuits that use `link`.
    pub(super) fn on_link(&self, link: u32) -> Vec<u32> {
        self.by_link_id
            .iter()
            .filter(|((l, _), _)| *l == link)
            .map(|(_, (slot, _))| *slot)
            .collect()
    }

    /// Appends to `out` the slots of the circuits idle since before `now_ms - idle_ms`
    /// (a scan of the dense activity array; free slots never qualify).
    pub(super) fn idle_into(&self, now_ms: u64, idle_ms: u64, out: &mut Vec<u32>) {
        let Some(cutoff) = now_ms.checked_sub(idle_ms) else {
            return;
        };
        out.extend(
            self.active
                .iter()
                .enumerate()
                .filter(|&(_, &t)| t < cutoff)
                .map(|(i, _)| i as u32),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The circuit itself (raw keys, windows, ids, next hop) stays small: the expanded
    /// keys are in the cache, not here (ARCHITECTURE.md, Memory).
    #[test]
    fn a_circuit_slot_holds_no_expanded_keys() {
        let size = core::mem::size_of::<Option<Circuit>>();
        assert!(size <= 512, "{size} B");
    }
}
