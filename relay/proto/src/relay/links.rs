//! Links: the other ends a relay worker exchanges cells with.
//!
//! A link is one remote `SocketAddr` with the header-protection keys of that link: a
//! peer relay's port (keys from the two identity keys, [`peer_link_keys`]) or a client
//! (keys from the link seed it sent in its first setup, [`client_link_keys`]). Peer
//! links and client links live in separate tables ([`Links`]), so clients can never
//! take the slots relays need: the peer table has one slot per port of the peer list,
//! the client table a fixed number allocated at start. A link's id is stable while it
//! lives and is what circuits refer to.

use std::net::SocketAddr;

use hkdf::Hkdf;
use sha2::Sha256;

use super::HashMap;
use crate::cell::HeaderKey;
use crate::keys::{IdentityKey, IdentityPublic, RelayId};

/// Who is at the other end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkKind {
    /// A port of a relay in the signed peer list.
    Peer,
    /// A client, known by the link seed of its first setup.
    Client,
}

/// One link.
pub(super) struct Link {
    pub(super) addr: SocketAddr,
    pub(super) kind: LinkKind,
    /// Protects headers this relay sends on the link.
    pub(super) tx: HeaderKey,
    /// Removes the protection of headers received on the link.
    pub(super) rx: HeaderKey,
    /// The client's link seed (zero for peers).
    pub(super) seed: [u8; 16],
    /// Circuits using this link, in either direction.
    pub(super) circuits: u32,
    pub(super) last_active: u64,
    /// Client links: the address has proved it receives what the relay sends it (it
    /// echoed a cookie, see `Relay::forward`). Peer links are always validated.
    pub(super) validated: bool,
    /// Until validated: bytes received from the address minus bytes sent to it. The
    /// relay never sends an unvalidated address more than it received from it.
    pub(super) credit: u64,
    /// Cells protected for this link since the last constant-rate padding round.
    pub(super) sent: u32,
}

impl Link {
    /// Protects `hdr` into `cell` for sending on this link, and counts the cell.
    pub(super) fn protect(&mut self, cell: &mut [u8], hdr: &crate::cell::Header) {
        self.tx.protect(cell, hdr);
        self.count_sent();
    }

    /// Counts a cell whose header the caller protects later with this link's send
    /// key (`tx`), together with others ([`crate::cell::HeaderKey::masks_of`]).
    pub(super) fn count_sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
    }

    /// Takes `len` bytes of credit for a send; false if the address is unvalidated
    /// and has not sent that much.
    pub(super) fn spend(&mut self, len: usize) -> bool {
        if self.validated {
            return true;
        }
        match self.credit.checked_sub(len as u64) {
            Some(c) => {
                self.credit = c;
                true
            }
            None => false,
        }
    }
}

/// A fixed-capacity table of links, indexed by slot and by address.
pub(super) struct LinkTable {
    slots: Vec<Option<Link>>,
    free: Vec<u32>,
    by_addr: HashMap<SocketAddr, u32>,
}

impl LinkTable {
    /// A table of `capacity` links, allocated now.
    pub(super) fn new(capacity: usize) -> Self {
        LinkTable {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity as u32).rev().collect(),
            by_addr: HashMap::with_capacity_and_hasher(capacity, ahash::RandomState::new()),
        }
    }

    /// The link to `addr`, if any.
    pub(super) fn find(&self, addr: &SocketAddr) -> Option<u32> {
        self.by_addr.get(addr).copied()
    }

    pub(super) fn get(&self, link: u32) -> Option<&Link> {
        self.slots.get(link as usize)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, link: u32) -> Option<&mut Link> {
        self.slots.get_mut(link as usize)?.as_mut()
    }

    /// Installs a link; `None` when the table is full.
    pub(super) fn insert(&mut self, link: Link) -> Option<u32> {
        let idx = self.free.pop()?;
        self.by_addr.insert(link.addr, idx);
        self.slots[idx as usize] = Some(link);
        Some(idx)
    }

    /// Live links.
    pub(super) fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// True if no slot is free.
    pub(super) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Frees a link's slot (its circuits must already be gone).
    pub(super) fn remove(&mut self, link: u32) -> Option<Link> {
        let l = self.slots.get_mut(link as usize)?.take()?;
        self.by_addr.remove(&l.addr);
        self.free.push(link);
        Some(l)
    }

    /// Every live link with its index.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Link)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i as u32, l)))
    }

    /// Adds free slots up to `capacity` (never shrinks: live links keep their index).
    pub(super) fn grow(&mut self, capacity: usize) {
        let old = self.slots.len();
        if capacity <= old {
            return;
        }
        self.slots.resize_with(capacity, || None);
        self.free.extend((old as u32..capacity as u32).rev());
        self.by_addr.reserve(capacity - old);
    }
}

/// Link ids with this bit set name a peer link, others a client link.
const PEER_BIT: u32 = 1 << 31;

/// The peer and client link tables behind one id space.
pub(super) struct Links {
    peers: LinkTable,
    clients: LinkTable,
    /// The last address found and its link: the cells of one datagram share their
    /// source, so all but the first skip the two hash lookups. Forgotten whenever a
    /// link is removed (an id is only reused after its removal).
    last: core::cell::Cell<Option<(SocketAddr, u32)>>,
    /// Bumped whenever a link is removed or its receive key replaced: header masks
    /// computed ahead under a link's key (`super::batch::HeaderMasks`) are used only while
    /// it is unchanged.
    epoch: u64,
}

impl Links {
    /// `peers` peer slots (one per port of the peer list) and `clients` client slots.
    pub(super) fn new(peers: usize, clients: usize) -> Self {
        Links {
            peers: LinkTable::new(peers),
            clients: LinkTable::new(clients),
            last: core::cell::Cell::new(None),
            epoch: 0,
        }
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A link's receive key was replaced.
    pub(super) fn rekeyed(&mut self) {
        self.epoch += 1;
    }

    fn split(id: u32) -> (bool, u32) {
        (id & PEER_BIT != 0, id & !PEER_BIT)
    }

    pub(super) fn find(&self, addr: &SocketAddr) -> Option<u32> {
        if let Some((a, id)) = self.last.get() {
            if a == *addr {
                return Some(id);
            }
        }
        let id = self
            .peers
            .find(addr)
            .map(|i| i | PEER_BIT)
            .or_else(|| self.clients.find(addr))?;
        self.last.set(Some((*addr, id)));
        Some(id)
    }

    pub(super) fn get(&self, id: u32) -> Option<&Link> {
        match Self::split(id) {
            (true, i) => self.peers.get(i),
            (false, i) => self.clients.get(i),
        }
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut Link> {
        match Self::split(id) {
            (true, i) => self.peers.get_mut(i),
            (false, i) => self.clients.get_mut(i),
        }
    }

    /// Installs a link in the table of its kind; `None` when that table is full.
    pub(super) fn insert(&mut self, link: Link) -> Option<u32> {
        match link.kind {
            LinkKind::Peer => self.peers.insert(link).map(|i| i | PEER_BIT),
            LinkKind::Client => self.clients.insert(link),
        }
    }

    pub(super) fn remove(&mut self, id: u32) -> Option<Link> {
        self.last.set(None);
        self.epoch += 1;
        match Self::split(id) {
            (true, i) => self.peers.remove(i),
            (false, i) => self.clients.remove(i),
        }
    }

    /// Live links: `(clients, peers)`.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.clients.len(), self.peers.len())
    }

    /// True if the client table has no free slot.
    pub(super) fn clients_full(&self) -> bool {
        self.clients.is_full()
    }

    /// Every live link with its id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Link)> {
        self.peers
            .iter()
            .map(|(i, l)| (i | PEER_BIT, l))
            .chain(self.clients.iter())
    }

    /// Makes room for at least `capacity` peer links.
    /// Restarts every peer link's count of cells sent (constant-rate padding; client
    /// links are not padded and their count only saturates).
    pub(super) fn reset_sent(&mut self) {
        for l in self.peers.slots.iter_mut().flatten() {
            l.sent = 0;
        }
    }

    pub(super) fn grow_peers(&mut self, capacity: usize) {
        self.peers.grow(capacity);
    }
}

/// Derives the header-protection keys of the link between two relays from their
/// identity keys: `(tx, rx)` for `me`.
pub fn peer_link_keys(me: &IdentityKey, peer: &IdentityPublic) -> (HeaderKey, HeaderKey) {
    let secret = me.to_x25519_secret();
    let shared = secret.diffie_hellman(&peer.to_x25519());
    let my_id = me.public().relay_id();
    let peer_id = peer.relay_id();
    let (lo, hi) = if my_id < peer_id {
        (my_id, peer_id)
    } else {
        (peer_id, my_id)
    };
    let mut info = [0u8; 32];
    info[..16].copy_from_slice(lo.as_bytes());
    info[16..].copy_from_slice(hi.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(b"shroud-v1 link"), shared.as_bytes());
    let mut okm = zeroize::Zeroizing::new([0u8; 64]);
    hk.expand(&info, okm.as_mut())
        .unwrap_or_else(|_| unreachable!("64 bytes is within HKDF-SHA256's limit"));
    let (lo_to_hi, hi_to_lo) = split_keys(&okm);
    if my_id < peer_id {
        (lo_to_hi, hi_to_lo)
    } else {
        (hi_to_lo, lo_to_hi)
    }
}

/// Derives a client link's header keys `(up, down)` (client-to-relay, relay-to-client)
/// from the client's link seed and the relay's id.
pub fn client_link_keys(seed: &[u8; 16], relay: &RelayId) -> (HeaderKey, HeaderKey) {
    let hk = Hkdf::<Sha256>::new(Some(b"shroud-v1 client-link"), seed);
    let mut okm = zeroize::Zeroizing::new([0u8; 64]);
    hk.expand(relay.as_bytes(), okm.as_mut())
        .unwrap_or_else(|_| unreachable!("64 bytes is within HKDF-SHA256's limit"));
    split_keys(&okm)
}

/// Two header keys from 64 bytes of key material; the copies are wiped.
fn split_keys(okm: &[u8; 64]) -> (HeaderKey, HeaderKey) {
    let mut a = zeroize::Zeroizing::new([0u8; 32]);
    let mut b = zeroize::Zeroizing::new([0u8; 32]);
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    (HeaderKey::new(&a), HeaderKey::new(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(port: u16, kind: LinkKind) -> Link {
        let (tx, rx) = split_keys(&[port as u8; 64]);
        Link {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            kind,
            tx,
            rx,
            seed: [0; 16],
            circuits: 0,
            last_active: 0,
            validated: true,
            credit: 0,
            sent: 0,
        }
    }

    #[test]
    fn the_remembered_lookup_never_outlives_a_removal() {
        let mut links = Links::new(2, 2);
        let a = links.insert(link(1, LinkKind::Client)).unwrap();
        let b = links.insert(link(2, LinkKind::Peer)).unwrap();
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        for _ in 0..3 {
            assert_eq!(links.find(&addr(1)), Some(a));
            assert_eq!(links.find(&addr(2)), Some(b));
        }
        // The same address twice in a row comes from the memo; after the removal it
        // must not, and the freed slot's next owner is found under its own address.
        assert_eq!(links.find(&addr(1)), Some(a));
        links.remove(a).unwrap();
        assert_eq!(links.find(&addr(1)), None);
        let c = links.insert(link(3, LinkKind::Client)).unwrap();
        assert_eq!(c, a, "the slot is reused");
        assert_eq!(links.find(&addr(1)), None);
        assert_eq!(links.find(&addr(3)), Some(c));
        assert_eq!(links.find(&addr(2)), Some(b));
        assert_eq!(links.find(&addr(4)), None);
    }
}
