//! Fragmentation of QUIC packets into circuit payloads, and bounded reassembly.
//!
//! One cell carries at most `payload_max` bytes (877 on the default network) but QUIC
//! needs datagrams of at least 1200 bytes, so every QUIC packet travels as 1 to
//! [`MAX_FRAGMENTS`] *fragments*, each one cell payload (on the circuit) or one UDP
//! datagram (between the exit and the gateway):
//!
//! ```text
//! kind (u8) | packet id (u32) | index (u8) | count (u8) | bytes
//! ```
//!
//! - `kind` is [`KIND_QUIC`] for a fragment, [`KIND_ECHO_REQUEST`] /
//!   [`KIND_ECHO_REPLY`] for the probe's echo (no id/index/count: the rest is opaque
//!   and the gateway returns it unchanged with the reply kind).
//! - `packet id` is chosen by the sender (a counter), `index < count <=
//!   MAX_FRAGMENTS`; every fragment but the last of a packet is full
//!   (`payload_max` bytes), so a packet is at most
//!   `MAX_FRAGMENTS * (payload_max - HEADER)` bytes.
//!
//! Invariants of [`Reassembler`]: it holds at most `capacity` incomplete packets
//! (oldest evicted first, counted in [`ReasmStats::evicted`]); it returns a packet
//! only when every fragment of it arrived, each exactly once (a duplicate fragment is
//! ignored, a fragment whose `count` disagrees with the first one seen is counted
//! malformed and dropped); it never panics on any input.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Fragment header length.
pub const HEADER: usize = 7;
/// Most fragments per packet accepted by a receiver.
pub const MAX_FRAGMENTS: usize = 4;
/// Fragments a sender splits a full-size QUIC packet into.
pub const SEND_FRAGMENTS: usize = 2;
/// A fragment of a QUIC packet.
pub const KIND_QUIC: u8 = 1;
/// A probe's echo request (the gateway answers it with [`KIND_ECHO_REPLY`]).
pub const KIND_ECHO_REQUEST: u8 = 2;
/// The gateway's answer to [`KIND_ECHO_REQUEST`].
pub const KIND_ECHO_REPLY: u8 = 3;

/// The largest QUIC packet a sender makes when one fragment holds at most `datagram`
/// bytes (the cell payload, header included).
pub fn max_packet(datagram: usize) -> usize {
    SEND_FRAGMENTS * datagram.saturating_sub(HEADER)
}

/// Splits `packet` into fragments of at most `datagram` bytes each, calling `out`
/// with every fragment in order. Returns `false` (and emits nothing) if the packet
/// needs more than [`MAX_FRAGMENTS`] fragments or is empty.
pub fn fragment(packet: &[u8], id: u32, datagram: usize, mut out: impl FnMut(&[u8])) -> bool {
    let room = datagram.saturating_sub(HEADER);
    if packet.is_empty() || room == 0 {
        return false;
    }
    let count = packet.len().div_ceil(room);
    if count > MAX_FRAGMENTS {
        return false;
    }
    let mut buf = [0u8; 8192];
    for (index, chunk) in packet.chunks(room).enumerate() {
        let n = HEADER + chunk.len();
        let Some(b) = buf.get_mut(..n) else {
            return false;
        };
        b[0] = KIND_QUIC;
        b[1..5].copy_from_slice(&id.to_be_bytes());
        // `index < count <= MAX_FRAGMENTS`, so both fit a byte.
        b[5] = index as u8;
        b[6] = count as u8;
        b[HEADER..].copy_from_slice(chunk);
        out(b);
    }
    true
}

/// Counters of a [`Reassembler`] (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasmStats {
    /// Packets completed.
    pub packets: u64,
    /// Incomplete packets evicted to make room (their fragments were lost or late).
    pub evicted: u64,
    /// Fragments dropped as malformed (short, bad kind, bad index/count, inconsistent
    /// count).
    pub malformed: u64,
    /// Duplicate fragments ignored.
    pub duplicates: u64,
}

#[derive(Debug)]
struct Partial {
    count: u8,
    have: u8,
    parts: [Vec<u8>; MAX_FRAGMENTS],
}

/// Reassembles fragments keyed by sender `K` (e.g. a source address). See the
/// [module docs](self).
#[derive(Debug)]
pub struct Reassembler<K> {
    partial: HashMap<(K, u32), Partial>,
    order: VecDeque<(K, u32)>,
    capacity: usize,
    stats: ReasmStats,
}

impl<K: Hash + Eq + Clone> Reassembler<K> {
    /// A reassembler holding at most `capacity` (at least 1) incomplete packets.
    pub fn new(capacity: usize) -> Self {
        Reassembler {
            partial: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            stats: ReasmStats::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> ReasmStats {
        self.stats
    }

    /// Incomplete packets held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Takes one [`KIND_QUIC`] fragment from `from`; returns the packet when it is
    /// complete (written to `out`, which is cleared first) and `false` otherwise.
    pub fn push(&mut self, from: K, frag: &[u8], out: &mut Vec<u8>) -> bool {
        if frag.len() < HEADER || frag[0] != KIND_QUIC {
            self.stats.malformed += 1;
            return false;
        }
        let id = u32::from_be_bytes([frag[1], frag[2], frag[3], frag[4]]);
        let (index, count) = (frag[5], frag[6]);
        if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
            self.stats.malformed += 1;
            return false;
        }
        let body = &frag[HEADER..];
        if count == 1 {
            out.clear();
            out.extend_from_slice(body);
            self.stats.packets += 1;
            return true;
        }
        let key = (from, id);
        if !self.partial.contains_key(&key) {
            while self.partial.len() >= self.capacity {
                match self.order.pop_front() {
                    Some(old) => {
                        if self.partial.remove(&old).is_some() {
                            self.stats.evicted += 1;
                        }
                    }
                    None => break,
                }
            }
            self.partial.insert(
                key.clone(),
                Partial {
                    count,
                    have: 0,
                    parts: Default::default(),
                },
            );
            self.order.push_back(key.clone());
        }
        let Some(p) = self.partial.get_mut(&key) else {
            return false;
        };
        if p.count != count {
            self.stats.malformed += 1;
            return false;
        }
        let bit = 1u8 << index;
        if p.have & bit != 0 {
            self.stats.duplicates += 1;
            return false;
        }
        p.have |= bit;
        p.parts[usize::from(index)] = body.to_vec();
        if p.have.count_ones() < u32::from(count) {
            return false;
        }
        let Some(p) = self.partial.remove(&key) else {
            return false;
        };
        // `order` keeps the key until it reaches the front; removing it here keeps
        // the queue bounded by `capacity` entries that still exist plus completed ones,
        // so drop completed keys lazily but cap the queue.
        if self.order.len() > 4 * self.capacity {
            let partial = &self.partial;
            self.order.retain(|k| partial.contains_key(k));
        }
        out.clear();
        for part in &p.parts[..usize::from(count)] {
            out.extend_from_slice(part);
        }
        self.stats.packets += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags(packet: &[u8], id: u32, datagram: usize) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        assert!(fragment(packet, id, datagram, |f| v.push(f.to_vec())));
        v
    }

    #[test]
    fn a_full_size_packet_is_two_cell_payloads_and_reassembles_in_any_order() {
        let max = max_packet(877);
        assert_eq!(max, 1740);
        let packet: Vec<u8> = (0..max).map(|i| (i * 7) as u8).collect();
        let f = frags(&packet, 42, 877);
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|x| x.len() <= 877));
        assert_eq!(f[0].len(), 877);
        let mut r = Reassembler::new(8);
        let mut out = Vec::new();
        assert!(!r.push(1u8, &f[1], &mut out));
        assert!(r.push(1u8, &f[0], &mut out));
        assert_eq!(out, packet);
        assert_eq!(r.pending(), 0);
        // A small packet is one fragment and passes straight through.
        let f = frags(b"ack", 43, 877);
        assert_eq!(
            f,
            vec![[&[KIND_QUIC, 0, 0, 0, 43, 0, 1][..], b"ack"].concat()]
        );
        assert!(r.push(1u8, &f[0], &mut out));
        assert_eq!(out, b"ack");
        assert_eq!(r.stats().packets, 2);
    }

    #[test]
    fn senders_and_ids_do_not_mix_and_duplicates_are_ignored() {
        let a: Vec<u8> = vec![0xaa; 1500];
        let b: Vec<u8> = vec![0xbb; 1500];
        let fa = frags(&a, 7, 877);
        let fb = frags(&b, 7, 877);
        let mut r = Reassembler::new(8);
        let mut out = Vec::new();
        assert!(!r.push("a", &fa[0], &mut out));
        assert!(!r.push("b", &fb[1], &mut out));
        assert!(!r.push("a", &fa[0], &mut out));
        assert_eq!(r.stats().duplicates, 1);
        assert!(r.push("b", &fb[0], &mut out));
        assert_eq!(out, b);
        assert!(r.push("a", &fa[1], &mut out));
        assert_eq!(out, a);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest_incomplete_packet() {
        let mut r = Reassembler::new(4);
        let mut out = Vec::new();
        let packets: Vec<Vec<Vec<u8>>> = (0..10u32)
            .map(|id| frags(&vec![id as u8; 1000], id, 877))
            .collect();
        for f in &packets {
            assert!(!r.push((), &f[0], &mut out));
            assert!(r.pending() <= 4);
        }
        assert_eq!(r.stats().evicted, 6);
        // Packets 0-5 were evicted: their second halves start new entries.
        assert!(!r.push((), &packets[0][1], &mut out));
        // Packet 9 is still there.
        assert!(r.push((), &packets[9][1], &mut out));
        assert_eq!(out, vec![9u8; 1000]);
        for _ in 0..1000 {
            for f in &packets {
                r.push((), &f[0], &mut out);
            }
        }
        assert!(r.pending() <= 4);
        assert!(r.order.len() <= 4 * 4 + 1, "{}", r.order.len());
    }

    #[test]
    fn malformed_fragments_are_counted_and_never_panic() {
        let mut r = Reassembler::new(4);
        let mut out = Vec::new();
        let bad: [&[u8]; 6] = [
            b"",
            &[KIND_QUIC, 0, 0, 0],
            &[KIND_ECHO_REQUEST, 0, 0, 0, 1, 0, 1],
            &[KIND_QUIC, 0, 0, 0, 1, 0, 0],
            &[KIND_QUIC, 0, 0, 0, 1, 2, 2],
            &[KIND_QUIC, 0, 0, 0, 1, 0, 5],
        ];
        for b in bad {
            assert!(!r.push(0, b, &mut out));
        }
        assert_eq!(r.stats().malformed, 6);
        // A count that disagrees with the first fragment seen.
        assert!(!r.push(0, &[KIND_QUIC, 0, 0, 0, 9, 0, 2, 1], &mut out));
        assert!(!r.push(0, &[KIND_QUIC, 0, 0, 0, 9, 1, 3, 1], &mut out));
        assert_eq!(r.stats().malformed, 7);
        // Too large to fragment, or empty.
        assert!(!fragment(&[0; 4000], 1, 877, |_| panic!("emitted")));
        assert!(!fragment(&[], 1, 877, |_| panic!("emitted")));
    }
}
