//! The one-round-trip circuit setup.
//!
//! A setup cell carries one handshake per hop, Sphinx style, in a stack of
//! `H_MAX` routing slots of [`ROUTING_SLOT_LEN`] bytes:
//!
//! ```text
//! | header 16 | E_i 32 | T_i 16 | routing slots 112*H | rest |
//!                                 \_______ region, sealed under k_setup_i _______/
//! ```
//!
//! Hop `i` decodes `E_i` (an Elligator2 representative of the client's fresh
//! ephemeral x25519 key for this hop), computes `s = X25519(onion_i, E_i)`, derives the
//! hop's keys with HKDF-SHA256, verifies `T_i` over the region (associated data `E_i`)
//! and decrypts it. Slot 0 then holds this hop's [`Routing`] (next hop or exit
//! destination, circuit ids, timestamp, and the next hop's `E` and `T`); the hop moves
//! `E_{i+1}` and `T_{i+1}` into place, shifts the routing stack down one slot and
//! appends the deterministic filler `AES-256(k_fill, j)`, so the cell keeps its size
//! and the next hop's tag (computed by the client, who can predict the filler) covers
//! every byte. The client builds the cell from the exit backwards ([`build_setup`]).
//!
//! Key schedule (HKDF-SHA256, salt `"shroud-v1 setup"`, info `E_i || onion_pub_i`,
//! 208 bytes): `k_setup | kf | sf | kb | sb | k_fill`, 32 bytes each, then the forward
//! and backward counter shifts (48 bits each, big endian) and 4 unused bytes. (The salt
//! keeps its version-1 label: the first 192 bytes are those of version 1, so a relay
//! can open a version-1 setup and refuse it by its version byte.)

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use curve25519_elligator2::{MapToPointVariant, Randomized};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::aead::{Aead, BadTag, NONCE_LEN};
use crate::cell::{Layout, PROTOCOL_VERSION, ROUTING_SLOT_LEN};
use crate::keys::{OnionSecret, RelayId};
use crate::layer::{LayerKeys, LayerSecret};

/// The secrets one hop shares with the client for one circuit.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HopSecrets {
    /// Setup-layer AEAD key.
    pub k_setup: [u8; 32],
    /// Forward AEAD key.
    pub kf: [u8; 32],
    /// Forward stack key.
    pub sf: [u8; 32],
    /// Backward AEAD key.
    pub kb: [u8; 32],
    /// Backward stack key.
    pub sb: [u8; 32],
    /// Setup filler key.
    pub k_fill: [u8; 32],
    /// Forward counter shift (48 bits).
    pub shift_f: u64,
    /// Backward counter shift (48 bits).
    pub shift_b: u64,
}

impl core::fmt::Debug for HopSecrets {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HopSecrets(<redacted>)")
    }
}

impl HopSecrets {
    /// Derives a hop's keys from the x25519 shared secret, the ephemeral's
    /// representative and the relay's onion public key.
    pub fn derive(shared: &[u8; 32], representative: &[u8; 32], onion_pub: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"shroud-v1 setup"), shared);
        let mut info = [0u8; 64];
        info[..32].copy_from_slice(representative);
        info[32..].copy_from_slice(onion_pub);
        let mut okm = [0u8; 208];
        hk.expand(&info, &mut okm)
            .unwrap_or_else(|_| unreachable!("208 bytes is within HKDF-SHA256's limit"));
        let u48_at = |o: usize| {
            let mut b = [0u8; 8];
            b[2..].copy_from_slice(&okm[o..o + 6]);
            u64::from_be_bytes(b)
        };
        let (shift_f, shift_b) = (u48_at(192), u48_at(198));
        let mut k = [[0u8; 32]; 6];
        for (i, key) in k.iter_mut().enumerate() {
            key.copy_from_slice(&okm[32 * i..32 * (i + 1)]);
        }
        okm.zeroize();
        let s = HopSecrets {
            k_setup: k[0],
            kf: k[1],
            sf: k[2],
            kb: k[3],
            sb: k[4],
            k_fill: k[5],
            shift_f,
            shift_b,
        };
        k.zeroize();
        s
    }

    /// Forward layer keys, as the client holds them (with the AEAD key's AES schedule
    /// for the stack keystream, [`LayerSecret::expand_for_sealing`]).
    pub fn forward<A: Aead>(&self) -> LayerKeys<A> {
        self.forward_secret().expand_for_sealing()
    }

    /// Backward layer keys.
    pub fn backward<A: Aead>(&self) -> LayerKeys<A> {
        self.backward_secret().expand()
    }

    /// Forward layer keys, unexpanded (what a relay keeps per circuit).
    pub fn forward_secret(&self) -> LayerSecret {
        LayerSecret::new(&self.kf, &self.sf, self.shift_f)
    }

    /// Backward layer keys, unexpanded.
    pub fn backward_secret(&self) -> LayerSecret {
        LayerSecret::new(&self.kb, &self.sb, self.shift_b)
    }

    fn filler(&self) -> [u8; ROUTING_SLOT_LEN] {
        let aes = aes::Aes256::new((&self.k_fill).into());
        let mut out = [0u8; ROUTING_SLOT_LEN];
        for (j, chunk) in out.chunks_exact_mut(16).enumerate() {
            let mut b = aes::Block::default();
            b[8..].copy_from_slice(&(j as u64).to_be_bytes());
            aes.encrypt_block(&mut b);
            chunk.copy_from_slice(&b);
        }
        out
    }
}

/// Where a hop sends the circuit next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Another relay, by id, at one of its ports, on circuit id `out_id`.
    Relay {
        /// The next relay.
        id: RelayId,
        /// The next relay's port (it picks the worker).
        port: u16,
        /// Circuit id on the link to the next relay.
        out_id: u64,
    },
    /// This hop is the exit: payload goes to `dest` as UDP datagrams.
    Exit {
        /// The destination.
        dest: SocketAddr,
    },
}

/// The decrypted routing slot of one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Protocol version of the client ([`PROTOCOL_VERSION`]; 0 from a version-1
    /// client, whose slot had a zero byte here).
    pub version: u8,
    /// What to do with the circuit.
    pub next: Next,
    /// Client clock when the setup was made (unix seconds).
    pub timestamp: u64,
    /// Circuit id of the incoming link.
    pub in_id: u64,
    /// Client link seed (first hop only; zero elsewhere).
    pub link_seed: [u8; 16],
    /// Next hop's ephemeral representative (random at the exit).
    pub e_next: [u8; 32],
    /// Next hop's setup tag (random at the exit).
    pub t_next: [u8; 16],
    /// Mix mode: the mean, in milliseconds, of the exponential delay this hop holds
    /// each data cell of the circuit for, in both directions; 0 for a plain circuit.
    pub mix_mean_ms: u16,
}

/// Why a routing slot did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// Unknown next-hop kind.
    #[error("unknown routing kind {0}")]
    Kind(u8),
    /// Reserved bytes were not zero.
    #[error("reserved routing bytes are not zero")]
    Reserved,
    /// A circuit id was zero (the id of link padding, never of a circuit).
    #[error("circuit id 0")]
    ZeroId,
}

const KIND_RELAY: u8 = 1;
const KIND_EXIT_V4: u8 = 2;
const KIND_EXIT_V6: u8 = 3;

impl Routing {
    /// Encodes to one slot.
    pub fn encode(&self) -> [u8; ROUTING_SLOT_LEN] {
        let mut s = [0u8; ROUTING_SLOT_LEN];
        match self.next {
            Next::Relay { id, port, out_id } => {
                s[0] = KIND_RELAY;
                s[2..4].copy_from_slice(&port.to_be_bytes());
                s[20..28].copy_from_slice(&out_id.to_be_bytes());
                s[28..44].copy_from_slice(id.as_bytes());
            }
            Next::Exit { dest } => {
                s[2..4].copy_from_slice(&dest.port().to_be_bytes());
                match dest.ip() {
                    IpAddr::V4(a) => {
                        s[0] = KIND_EXIT_V4;
                        s[28..32].copy_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        s[0] = KIND_EXIT_V6;
                        s[28..44].copy_from_slice(&a.octets());
                    }
                }
            }
        }
        s[1] = self.version;
        s[4..12].copy_from_slice(&self.timestamp.to_be_bytes());
        s[12..20].copy_from_slice(&self.in_id.to_be_bytes());
        s[44..60].copy_from_slice(&self.link_seed);
        s[60..92].copy_from_slice(&self.e_next);
        s[92..108].copy_from_slice(&self.t_next);
        s[108..110].copy_from_slice(&self.mix_mean_ms.to_be_bytes());
        s
    }

    /// Decodes one slot.
    pub fn decode(s: &[u8]) -> Result<Routing, RoutingError> {
        let s: &[u8; ROUTING_SLOT_LEN] = s.try_into().map_err(|_| RoutingError::Reserved)?;
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&s[o..o + 8]);
            u64::from_be_bytes(b)
        };
        if s[110..].iter().any(|&b| b != 0) {
            return Err(RoutingError::Reserved);
        }
        if u64_at(12) == 0 || (s[0] == KIND_RELAY && u64_at(20) == 0) {
            return Err(RoutingError::ZeroId);
        }
        let port = u16::from_be_bytes([s[2], s[3]]);
        let next = match s[0] {
            KIND_RELAY => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&s[28..44]);
                Next::Relay {
                    id: RelayId(id),
                    port,
                    out_id: u64_at(20),
                }
            }
            KIND_EXIT_V4 | KIND_EXIT_V6 => {
                if u64_at(20) != 0 {
                    return Err(RoutingError::Reserved);
                }
                let ip = if s[0] == KIND_EXIT_V4 {
                    if s[32..44].iter().any(|&b| b != 0) {
                        return Err(RoutingError::Reserved);
                    }
                    IpAddr::V4(Ipv4Addr::new(s[28], s[29], s[30], s[31]))
                } else {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&s[28..44]);
                    IpAddr::V6(Ipv6Addr::from(o))
                };
                Next::Exit {
                    dest: SocketAddr::new(ip, port),
                }
            }
            k => return Err(RoutingError::Kind(k)),
        };
        let mut link_seed = [0u8; 16];
        link_seed.copy_from_slice(&s[44..60]);
        let mut e_next = [0u8; 32];
        e_next.copy_from_slice(&s[60..92]);
        let mut t_next = [0u8; 16];
        t_next.copy_from_slice(&s[92..108]);
        Ok(Routing {
            version: s[1],
            next,
            timestamp: u64_at(4),
            in_id: u64_at(12),
            link_seed,
            e_next,
            t_next,
            mix_mean_ms: u16::from_be_bytes([s[108], s[109]]),
        })
    }
}

/// A fresh client ephemeral whose public key has an Elligator2 representative.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Ephemeral {
    secret: [u8; 32],
    /// The uniformly random-looking 32-byte encoding sent on the wire.
    #[zeroize(skip)]
    pub representative: [u8; 32],
}

impl core::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Ephemeral(<redacted>)")
    }
}

impl Ephemeral {
    /// Draws keys until one is representable (each try succeeds with probability 1/2).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Ephemeral {
        loop {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let tweak = (rng.next_u32() & 0xff) as u8;
            let rep: Option<[u8; 32]> = Randomized::to_representative(&secret, tweak).into();
            if let Some(representative) = rep {
                return Ephemeral {
                    secret,
                    representative,
                };
            }
            secret.zeroize();
        }
    }

    /// Builds an ephemeral from fixed bytes (test vectors); `None` if unrepresentable.
    pub fn from_secret(secret: [u8; 32], tweak: u8) -> Option<Ephemeral> {
        let rep: Option<[u8; 32]> = Randomized::to_representative(&secret, tweak).into();
        rep.map(|representative| Ephemeral {
            secret,
            representative,
        })
    }

    /// X25519 with a relay's onion public key (wiped on drop). `None` if the result is
    /// all zeros: the onion key is a low-order point and the relay's key would not
    /// contribute to the circuit keys.
    pub fn agree(&self, onion_pub: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let s = x25519_dalek::StaticSecret::from(self.secret);
        let shared = s.diffie_hellman(&x25519_dalek::PublicKey::from(*onion_pub));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }
}

/// Relay side: X25519 between the onion secret and a representative (wiped on drop).
/// `None` if the result is the all-zero point (low-order input).
pub fn relay_agree(onion: &OnionSecret, representative: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    // Elligator2 maps straight to the Edwards y of the client's point (the u of
    // `curve25519-elligator2`'s `map_to_point`, which spends four exponentiations, and
    // the y curve25519-dalek's `to_edwards` would compute from it with one more), with
    // one field exponentiation (`crate::elligator`); the X25519 is then computed on the
    // Edwards form. The way through u is kept for inputs the direct map does not
    // cover (none is known to exist).
    if let Some(y) = crate::elligator::representative_to_edwards_y(representative) {
        if let Some(shared) = onion.diffie_hellman_checked_edwards_y(&y) {
            return shared.ok();
        }
    }
    let u = crate::elligator::representative_to_u(representative);
    onion.diffie_hellman_checked_fast(&u).ok()
}

const SETUP_NONCE: [u8; NONCE_LEN] = [0u8; NONCE_LEN];

/// One hop of a circuit to build.
#[derive(Debug, Clone)]
pub struct SetupHop {
    /// The relay's current onion public key (from the peer list).
    pub onion_pub: [u8; 32],
    /// What this hop must do (its `e_next`/`t_next` are filled in by [`build_setup`]).
    pub next: Next,
    /// Circuit id of the link into this hop.
    pub in_id: u64,
    /// Client link seed for the first hop (zero for the others).
    pub link_seed: [u8; 16],
    /// Mix mode: this hop's mean delay in milliseconds (0: plain).
    pub mix_mean_ms: u16,
}

/// The client stamps each hop's routing slot with its clock plus an independent
/// uniform delay of up to this many seconds, so that two relays of one circuit see
/// different timestamps and a relay cannot read the client's clock offset from one
/// setup. Only forward: a relay that restarted at second `t` refuses setups stamped at
/// or before `t`, which an honest client's stamps never are.
pub const TIMESTAMP_JITTER_S: u64 = 30;

/// The client refuses to build a setup through a hop whose onion key is a low-order
/// point (X25519 with it is all zeros, whatever the ephemeral).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the onion key of hop {hop} is a low-order point")]
pub struct LowOrderOnionKey {
    /// Which hop (0-based).
    pub hop: usize,
}

/// Client: builds a setup cell for `hops` (first hop first) into `cell` (the header is
/// left for the caller to protect) and returns every hop's secrets. `now` is the
/// client's clock (unix seconds); see [`TIMESTAMP_JITTER_S`]. Fails, before writing
/// to `cell`, if a hop's onion key is a low-order point.
pub fn build_setup<A: Aead, R: RngCore + CryptoRng>(
    layout: &Layout,
    hops: &[SetupHop],
    now: u64,
    rng: &mut R,
    cell: &mut [u8],
) -> Result<Vec<HopSecrets>, LowOrderOnionKey> {
    let ephemerals: Vec<Ephemeral> = hops.iter().map(|_| Ephemeral::generate(rng)).collect();
    build_setup_with::<A, R>(layout, hops, &ephemerals, PROTOCOL_VERSION, now, rng, cell)
}

/// [`build_setup`] with caller-chosen ephemerals (test vectors) and the version byte
/// to write in every routing slot ([`PROTOCOL_VERSION`], or what a client of another
/// version writes there, to test the refusal it gets).
pub fn build_setup_with<A: Aead, R: RngCore + CryptoRng>(
    layout: &Layout,
    hops: &[SetupHop],
    ephemerals: &[Ephemeral],
    version: u8,
    now: u64,
    rng: &mut R,
    cell: &mut [u8],
) -> Result<Vec<HopSecrets>, LowOrderOnionKey> {
    let h = layout.h_max;
    let l = hops.len();
    assert!(l >= 1 && l <= h && ephemerals.len() == l, "1..=H_MAX hops");
    assert_eq!(cell.len(), layout.cell, "cell buffer has the wrong length");
    const RS: usize = ROUTING_SLOT_LEN;
    let rl = layout.routing_len();
    let region_len = layout.cell - layout.setup_region();

    let secrets = hops
        .iter()
        .zip(ephemerals)
        .enumerate()
        .map(|(i, (hop, e))| {
            let shared = e.agree(&hop.onion_pub).ok_or(LowOrderOnionKey { hop: i })?;
            Ok(HopSecrets::derive(
                &shared,
                &e.representative,
                &hop.onion_pub,
            ))
        })
        .collect::<Result<Vec<HopSecrets>, LowOrderOnionKey>>()?;
    let aeads: Vec<A> = secrets.iter().map(|s| A::new(&s.k_setup)).collect();
    // Keystream of each hop over the routing stack: the encryption of zeros.
    let ks: Vec<Vec<u8>> = aeads
        .iter()
        .zip(ephemerals)
        .map(|(a, e)| {
            let mut z = vec![0u8; rl];
            a.seal(&SETUP_NONCE, &e.representative, &mut z);
            z
        })
        .collect();

    // Junk below the real slots, as each hop will see it.
    let mut beta = vec![0u8; rl];
    rng.fill_bytes(&mut beta);
    for i in 0..l - 1 {
        let mut next = vec![0u8; rl];
        for j in 0..h - 1 {
            for b in 0..RS {
                next[j * RS + b] = beta[(j + 1) * RS + b] ^ ks[i][(j + 1) * RS + b];
            }
        }
        next[(h - 1) * RS..].copy_from_slice(&secrets[i].filler());
        beta = next;
    }

    // Seal from the exit back to the first hop.
    let mut region = vec![0u8; region_len];
    let mut rest = vec![0u8; region_len - rl];
    rng.fill_bytes(&mut rest);
    let mut next_e_t: Option<([u8; 32], [u8; 16])> = None;
    for i in (0..l).rev() {
        let (e_next, t_next) = next_e_t.unwrap_or_else(|| {
            let mut e = [0u8; 32];
            let mut t = [0u8; 16];
            rng.fill_bytes(&mut e);
            rng.fill_bytes(&mut t);
            (e, t)
        });
        let routing = Routing {
            version,
            next: hops[i].next,
            timestamp: now + u64::from(rng.next_u32()) % (TIMESTAMP_JITTER_S + 1),
            in_id: hops[i].in_id,
            link_seed: hops[i].link_seed,
            e_next,
            t_next,
            mix_mean_ms: hops[i].mix_mean_ms,
        };
        region[..RS].copy_from_slice(&routing.encode());
        if i == l - 1 {
            for b in RS..rl {
                region[b] = beta[b] ^ ks[i][b];
            }
            region[rl..].copy_from_slice(&rest);
        } else {
            // Slots 1.. are the next hop's whole view (its ciphertext) minus the last
            // slot, which this hop's filler will recreate; the rest follows as is.
            region[RS..rl].copy_from_slice(&beta[..rl - RS]);
            region[rl..].copy_from_slice(&rest);
        }
        let tag = aeads[i].seal(&SETUP_NONCE, &ephemerals[i].representative, &mut region);
        beta.copy_from_slice(&region[..rl]);
        rest.copy_from_slice(&region[rl..]);
        next_e_t = Some((ephemerals[i].representative, tag));
    }
    let (e0, t0) = next_e_t.unwrap_or_else(|| unreachable!("at least one hop"));
    cell[layout.setup_e()..layout.setup_e() + 32].copy_from_slice(&e0);
    cell[layout.setup_tag()..layout.setup_tag() + 16].copy_from_slice(&t0);
    cell[layout.setup_region()..layout.setup_region() + rl].copy_from_slice(&beta);
    cell[layout.setup_region() + rl..].copy_from_slice(&rest);
    Ok(secrets)
}

/// Why a relay refused a setup cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// The ephemeral decoded to a low-order point.
    BadPoint,
    /// The setup tag did not verify under any onion key tried.
    BadTag,
    /// The routing slot did not parse.
    Malformed,
}

impl From<BadTag> for SetupError {
    fn from(_: BadTag) -> Self {
        SetupError::BadTag
    }
}

/// Relay: the ephemeral representative of a setup cell.
pub fn setup_ephemeral(layout: &Layout, cell: &[u8]) -> [u8; 32] {
    let mut e = [0u8; 32];
    e.copy_from_slice(&cell[layout.setup_e()..layout.setup_e() + 32]);
    e
}

/// Relay: verifies and decrypts this hop's setup layer in place with one onion key.
/// On success the region is decrypted (call [`forward_setup`] next to pass it on).
pub fn open_setup<A: Aead>(
    layout: &Layout,
    onion: &OnionSecret,
    onion_pub: &[u8; 32],
    cell: &mut [u8],
) -> Result<(HopSecrets, Routing), SetupError> {
    let e = setup_ephemeral(layout, cell);
    let shared = relay_agree(onion, &e).ok_or(SetupError::BadPoint)?;
    let secrets = HopSecrets::derive(&shared, &e, onion_pub);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&cell[layout.setup_tag()..layout.setup_tag() + 16]);
    let region_start = layout.setup_region();
    // Decrypt a copy first: a failed attempt (wrong onion key during rotation) must
    // leave the cell intact for the next key. The copy is wiped on every return.
    let a = A::new(&secrets.k_setup);
    let mut tmp = Zeroizing::new([0u8; 8192]);
    let region = &mut tmp[..layout.cell - region_start];
    region.copy_from_slice(&cell[region_start..]);
    a.open(&SETUP_NONCE, &e, region, &tag)?;
    cell[region_start..].copy_from_slice(region);
    let routing = Routing::decode(&cell[region_start..region_start + ROUTING_SLOT_LEN])
        .map_err(|_| SetupError::Malformed)?;
    Ok((secrets, routing))
}

/// Relay: turns an opened setup cell into the next hop's setup cell (header excluded).
pub fn forward_setup(layout: &Layout, secrets: &HopSecrets, routing: &Routing, cell: &mut [u8]) {
    let r0 = layout.setup_region();
    let rl = layout.routing_len();
    cell[layout.setup_e()..layout.setup_e() + 32].copy_from_slice(&routing.e_next);
    cell[layout.setup_tag()..layout.setup_tag() + 16].copy_from_slice(&routing.t_next);
    cell.copy_within(r0 + ROUTING_SLOT_LEN..r0 + rl, r0);
    cell[r0 + rl - ROUTING_SLOT_LEN..r0 + rl].copy_from_slice(&secrets.filler());
}

#[cfg(test)]
mod map_tests {
    use super::*;
    use curve25519_elligator2::MontgomeryPoint;
    #[test]
    fn direct_montgomery_map_matches_the_randomized_variant() {
        let mut rng = rand_core::OsRng;
        for _ in 0..50 {
            let e = Ephemeral::generate(&mut rng);
            let a = MontgomeryPoint::from_representative::<Randomized>(&e.representative).unwrap();
            let b = MontgomeryPoint::map_to_point(&e.representative);
            assert_eq!(a.to_bytes(), b.to_bytes());
        }
    }

    #[test]
    fn the_relay_and_the_client_agree_on_the_shared_secret() {
        let mut rng = rand_core::OsRng;
        let onion = OnionSecret::generate(&mut rng);
        for _ in 0..50 {
            let e = Ephemeral::generate(&mut rng);
            let client = e.agree(onion.public().as_bytes()).unwrap();
            let relay = relay_agree(&onion, &e.representative).unwrap();
            assert_eq!(*client, *relay);
        }
    }
}
