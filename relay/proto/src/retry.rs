//! Retry under load: a stateless return-routability check before public-key work, as
//! QUIC's Retry or WireGuard's cookie reply (`docs/PROTOCOL.md` §5.5).
//!
//! When the budget of setups from addresses without a link is spent, a relay answers
//! such a setup with a `RETRY` cell instead of opening it: one cell (so it never sends
//! more than it received) carrying a **retry token**, a MAC of the client's address and
//! the current epoch under a key only the relay holds. The client sends the same setup
//! again with the token in place of its 16 random header bytes; a setup whose header is
//! a valid token for its source address has proved that the address receives, skips the
//! shared newcomer budget and installs an already validated link. Spoofed setups never
//! see a token, so a flood of them costs the relay one AES block per cell and no
//! X25519.
//!
//! The `RETRY` cell is `R (12) || GCM(k_retry, R, aad = E, token || 0…) || tag (16)`
//! with `k_retry` derived from the relay id: anyone can compute the key, so it hides
//! nothing; the associated data `E` (the setup's Elligator2 string) binds the reply to
//! the setup it answers, which an off-path attacker never saw. To a link observer it is
//! a `CELL`-byte datagram of pseudo-random bytes like every other.

use hkdf::Hkdf;
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};

use crate::aead::{Aead, NONCE_LEN, TAG_LEN};
use crate::cell::{HeaderKey, Layout, HEADER_LEN};
use crate::keys::RelayId;

/// Bytes of a retry token.
pub const TOKEN_LEN: usize = 16;

/// Seconds per token epoch; a token is accepted in its epoch and the next, so it lives
/// between one and two epochs.
pub const RETRY_EPOCH_S: u64 = 60;

/// Bytes of the random prefix of a `RETRY` cell: the GCM nonce.
pub const R_LEN: usize = NONCE_LEN;

/// `k_retry` of a relay: `HKDF-SHA256(salt = "shroud-v2 retry", ikm = relay id)`.
pub fn retry_key<A: Aead>(relay: &RelayId) -> A {
    let hk = Hkdf::<Sha256>::new(Some(b"shroud-v2 retry"), &relay.0);
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    hk.expand(&[], k.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
    A::new(&k)
}

/// The relay's secret for tokens: a random AES-256 key drawn at start.
pub struct TokenKey(HeaderKey);

impl core::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TokenKey(<key>)")
    }
}

impl TokenKey {
    /// A token key from 32 secret bytes.
    pub fn new(key: &[u8; 32]) -> Self {
        TokenKey(HeaderKey::new(key))
    }

    /// The token for `addr` in epoch `epoch`: a two-block CBC-MAC under AES-256 of
    /// the fixed-length message `ip (16 bytes, IPv4 as IPv4-mapped IPv6) || port (u16)
    /// || epoch (u64) || 0^6`.
    pub fn token(&self, addr: SocketAddr, epoch: u64) -> [u8; TOKEN_LEN] {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let x = self.0.encrypt_block(ip.octets());
        let mut m = [0u8; 16];
        m[..2].copy_from_slice(&addr.port().to_be_bytes());
        m[2..10].copy_from_slice(&epoch.to_be_bytes());
        for (b, k) in m.iter_mut().zip(x) {
            *b ^= k;
        }
        self.0.encrypt_block(m)
    }

    /// True if `header` (a setup cell's first 16 bytes) is the token of `addr` for the
    /// epoch of `now_ms` or the one before.
    pub fn check(&self, header: &[u8], addr: SocketAddr, now_ms: u64) -> bool {
        let epoch = now_ms / 1000 / RETRY_EPOCH_S;
        // Compare without an early exit on the first differing byte.
        let eq =
            |t: [u8; TOKEN_LEN]| t.iter().zip(header).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        header.len() >= TOKEN_LEN
            && (eq(self.token(addr, epoch)) || eq(self.token(addr, epoch.wrapping_sub(1))))
    }
}

/// Relay: rewrites `cell`, a setup from `addr` that will not be opened, into the
/// `RETRY` reply carrying `token`. `r` must be unpredictable and differ per reply.
pub fn write_retry<A: Aead>(
    layout: &Layout,
    key: &A,
    token: &[u8; TOKEN_LEN],
    r: &[u8; R_LEN],
    cell: &mut [u8],
) {
    let mut e = [0u8; 32];
    e.copy_from_slice(&cell[layout.setup_e()..layout.setup_e() + 32]);
    let end = cell.len() - TAG_LEN;
    cell[..R_LEN].copy_from_slice(r);
    cell[R_LEN..end].fill(0);
    cell[R_LEN..R_LEN + TOKEN_LEN].copy_from_slice(token);
    let (body, tag) = cell.split_at_mut(end);
    let t = key.seal(r, &e, &mut body[R_LEN..]);
    tag.copy_from_slice(&t);
}

/// Client: if `reply` is the `RETRY` answer to the setup cell `setup` sent to the relay
/// whose key is `key`, returns its token. `reply` is left unspecified either way.
pub fn open_retry<A: Aead>(
    layout: &Layout,
    key: &A,
    setup: &[u8],
    reply: &mut [u8],
) -> Option<[u8; TOKEN_LEN]> {
    if reply.len() != layout.cell || setup.len() != layout.cell {
        return None;
    }
    let e = &setup[layout.setup_e()..layout.setup_e() + 32];
    let end = reply.len() - TAG_LEN;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&reply[..NONCE_LEN]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&reply[end..]);
    key.open(&nonce, e, &mut reply[R_LEN..end], &tag).ok()?;
    if reply[R_LEN + TOKEN_LEN..end].iter().any(|&b| b != 0) {
        return None;
    }
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&reply[R_LEN..R_LEN + TOKEN_LEN]);
    Some(token)
}

/// Client: puts `token` in place of a newcomer setup cell's random header.
pub fn apply_token(token: &[u8; TOKEN_LEN], setup: &mut [u8]) {
    setup[..HEADER_LEN].copy_from_slice(token);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RingAead;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn token_is_bound_to_address_port_and_epoch() {
        let k = TokenKey::new(&[7; 32]);
        let a = addr("192.0.2.1:4000");
        let t = k.token(a, 10);
        assert_ne!(t, k.token(addr("192.0.2.2:4000"), 10));
        assert_ne!(t, k.token(addr("192.0.2.1:4001"), 10));
        assert_ne!(t, k.token(a, 11));
        assert_ne!(t, TokenKey::new(&[8; 32]).token(a, 10));
        // The IPv4-mapped spelling is the same address.
        assert_eq!(t, k.token(addr("[::ffff:192.0.2.1]:4000"), 10));
        let now = 10 * RETRY_EPOCH_S * 1000;
        assert!(k.check(&t, a, now));
        assert!(k.check(&t, a, now + RETRY_EPOCH_S * 1000), "next epoch");
        assert!(!k.check(&t, a, now + 2 * RETRY_EPOCH_S * 1000), "too old");
        assert!(!k.check(&t, a, now - 1), "earlier epoch");
        assert!(!k.check(&t[..8], a, now), "short header");
    }

    #[test]
    fn retry_round_trip_and_binding_to_the_setup() {
        let layout = Layout::default();
        let relay = RelayId([3; 16]);
        let key: RingAead = retry_key(&relay);
        let mut setup = vec![0u8; layout.cell];
        for (i, b) in setup.iter_mut().enumerate() {
            *b = i as u8;
        }
        let r = [9; R_LEN];
        let token = [0xAB; TOKEN_LEN];
        let mut reply = setup.clone();
        write_retry(&layout, &key, &token, &r, &mut reply);
        assert_eq!(reply.len(), layout.cell);
        assert_eq!(
            open_retry(&layout, &key, &setup, &mut reply.clone()),
            Some(token)
        );
        // Another setup (another E), another relay, or any flipped byte: not ours.
        let mut other = setup.clone();
        other[layout.setup_e()] ^= 1;
        assert_eq!(open_retry(&layout, &key, &other, &mut reply.clone()), None);
        let wrong: RingAead = retry_key(&RelayId([4; 16]));
        assert_eq!(
            open_retry(&layout, &wrong, &setup, &mut reply.clone()),
            None
        );
        for i in (0..layout.cell).step_by(37) {
            let mut f = reply.clone();
            f[i] ^= 0x80;
            assert_eq!(open_retry(&layout, &key, &setup, &mut f), None, "byte {i}");
        }
    }
}
