//! Relay key material: long-term identity keys, onion (circuit-setup) keys,
//! relay identifiers, and their text encoding.
//!
//! # Key kinds
//!
//! * [`IdentityKey`] / [`IdentityPublic`]: a relay's (or directory
//!   authority's) long-term ed25519 key. It signs peer lists and names the
//!   relay. Signatures are checked with `verify_strict`, which rejects
//!   malleable signatures and small-order keys.
//! * [`RelayId`]: a short, stable name for a relay, derived from its identity
//!   key: the first 16 bytes of `SHA-256("shroud-v1 relay-id" || identity)`.
//! * [`OnionSecret`] / [`OnionPublic`]: x25519 keys used in circuit setup.
//!   Onion keys rotate; the peer list says until when each one is valid.
//!
//! # Invariants
//!
//! * An [`IdentityPublic`] always holds a canonically encoded ed25519 point
//!   that is not of small order; this is checked whenever one is built from
//!   bytes or text.
//! * Secret types ([`IdentityKey`], [`OnionSecret`]) are zeroized on drop and
//!   never print their contents through `Debug`. They do not implement
//!   `PartialEq` (comparisons of secrets should not be casual or variable-time).
//!
//! # Text encoding
//!
//! Keys are written the way WireGuard writes them: one line of standard
//! base64 *with* padding encoding the 32 raw bytes (44 characters),
//! optionally followed by a single `"\n"`. Anything else — surrounding or
//! embedded whitespace, CRLF line endings, a second line, missing padding,
//! non-canonical trailing bits, the wrong length — is refused. See
//! [`encode_key`] and [`decode_key`].

use core::fmt;
use core::str::FromStr;

use base64ct::{Base64, Encoding};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length in bytes of every key handled by this module (public or secret).
pub const KEY_LEN: usize = 32;

/// Length in bytes of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Length in bytes of a [`RelayId`].
pub const RELAY_ID_LEN: usize = 16;

/// Domain-separation prefix hashed in front of the identity key to form a
/// [`RelayId`].
pub const RELAY_ID_CONTEXT: &[u8] = b"shroud-v1 relay-id";

/// Errors from decoding or using keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key text had more than one line.
    #[error("key text must be a single line (optionally followed by one \"\\n\")")]
    MultipleLines,
    /// The key text contained whitespace or control characters.
    #[error(
        "key text contains whitespace or a control character \
         (CRLF line endings and surrounding spaces are not accepted)"
    )]
    Whitespace,
    /// The base64 text had the wrong number of characters.
    #[error("key text must be exactly {expected} base64 characters, found {found}")]
    Length {
        /// Number of characters required.
        expected: usize,
        /// Number of characters found.
        found: usize,
    },
    /// The text is not canonical, padded, standard base64.
    #[error("key text is not canonical padded standard base64")]
    Base64,
    /// The bytes are not a valid, canonically encoded ed25519 public key.
    #[error("not a valid ed25519 public key (bad point encoding)")]
    InvalidIdentity,
    /// The ed25519 public key is a small-order point, which must never be used.
    #[error("ed25519 public key is a small-order (weak) point")]
    WeakIdentity,
    /// An ed25519 signature did not verify.
    #[error("ed25519 signature does not verify")]
    BadSignature,
    /// A relay id was not 32 lowercase hexadecimal digits.
    #[error("relay id must be 32 lowercase hexadecimal digits")]
    RelayIdFormat,
    /// An x25519 exchange produced the all-zero output: the peer's public key
    /// is a low-order point.
    #[error("x25519 exchange is non-contributory (peer public key has low order)")]
    NonContributory,
}

// ---------------------------------------------------------------------------
// Text encoding
// ---------------------------------------------------------------------------

/// Encodes a 32-byte key as one line of padded standard base64 followed by
/// `"\n"` (the form written to key files).
pub fn encode_key(key: &[u8; KEY_LEN]) -> String {
    let mut s = Base64::encode_string(key);
    s.push('\n');
    s
}

/// Decodes key text written by [`encode_key`].
///
/// Accepts exactly 44 characters of canonical, padded standard base64,
/// optionally followed by a single `"\n"`. Everything else is refused with a
/// [`KeyError`] saying what was wrong.
pub fn decode_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    if body.contains('\n') {
        return Err(KeyError::MultipleLines);
    }
    if body
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(KeyError::Whitespace);
    }
    decode_base64_exact::<KEY_LEN>(body)
}

/// Number of characters of padded base64 for `n` bytes.
const fn b64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Strictly decodes padded standard base64 that must encode exactly `N`
/// bytes. No whitespace or newline is accepted; the encoding must be
/// canonical (re-encoding the result reproduces the input).
pub(crate) fn decode_base64_exact<const N: usize>(text: &str) -> Result<[u8; N], KeyError> {
    let expected = b64_len(N);
    if text.len() != expected {
        return Err(KeyError::Length {
            expected,
            found: text.chars().count(),
        });
    }
    let mut out = [0u8; N];
    let decoded_len = Base64::decode(text, &mut out)
        .map_err(|_| KeyError::Base64)?
        .len();
    if decoded_len != N {
        return Err(KeyError::Base64);
    }
    // Belt and braces: base64ct already rejects non-zero trailing bits, but
    // canonicality is what the peer list relies on, so check it directly.
    let mut check = [0u8; 128];
    match check.get_mut(..expected) {
        Some(buf) => match Base64::encode(&out, buf) {
            Ok(re) if re == text => Ok(out),
            _ => Err(KeyError::Base64),
        },
        None => Err(KeyError::Base64),
    }
}

/// Encodes bytes as padded standard base64 (no newline).
pub(crate) fn encode_base64(bytes: &[u8]) -> String {
    Base64::encode_string(bytes)
}

// ---------------------------------------------------------------------------
// Identity keys
// ---------------------------------------------------------------------------

/// A relay's or authority's long-term ed25519 signing key.
///
/// Zeroized on drop; `Debug` does not print the secret.
#[derive(Clone)]
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// Generates a fresh identity key from a cryptographically secure RNG
    /// (for example `rand_core::OsRng`).
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// Builds a key from its 32-byte ed25519 seed.
    pub fn from_bytes(seed: &[u8; KEY_LEN]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Returns the 32-byte ed25519 seed. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The secret encoded as base64 (no trailing newline).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(Base64::encode_string(&*self.to_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> IdentityPublic {
        let key = self.0.verifying_key();
        IdentityPublic {
            bytes: key.to_bytes(),
            montgomery: key.to_montgomery().to_bytes(),
        }
    }

    /// Signs `msg` (pure ed25519, deterministic).
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(msg).to_bytes()
    }

    /// The x25519 secret corresponding to this identity (the ed25519 secret
    /// scalar, see `SigningKey::to_scalar_bytes`). Its public key equals
    /// [`IdentityPublic::to_x25519`] of [`Self::public`].
    pub fn to_x25519_secret(&self) -> x25519_dalek::StaticSecret {
        let scalar = Zeroizing::new(self.0.to_scalar_bytes());
        x25519_dalek::StaticSecret::from(*scalar)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey(<redacted>)")
    }
}

impl FromStr for IdentityKey {
    type Err = KeyError;

    /// Parses key text as accepted by [`decode_key`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let seed = Zeroizing::new(decode_key(s)?);
        Ok(Self::from_bytes(&seed))
    }
}

/// An ed25519 public identity key.
///
/// Always a canonically encoded point that is not of small order. Ordered,
/// compared and hashed by its 32-byte encoding.
#[derive(Clone, Copy)]
pub struct IdentityPublic {
    /// The compressed Edwards encoding (validated).
    bytes: [u8; KEY_LEN],
    /// The Montgomery u-coordinate of the same point, for x25519.
    montgomery: [u8; KEY_LEN],
}

impl IdentityPublic {
    /// Validates and wraps a 32-byte ed25519 public key.
    ///
    /// Rejects bytes that are not a point, non-canonical encodings and
    /// small-order points.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidIdentity)?;
        if key.to_edwards().compress().to_bytes() != *bytes {
            return Err(KeyError::InvalidIdentity);
        }
        if key.is_weak() {
            return Err(KeyError::WeakIdentity);
        }
        Ok(Self {
            bytes: *bytes,
            montgomery: key.to_montgomery().to_bytes(),
        })
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.bytes
    }

    /// The 32-byte encoding, borrowed.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The key as base64 (no trailing newline). Same as `Display`.
    pub fn to_base64(&self) -> String {
        Base64::encode_string(self.as_bytes())
    }

    /// Verifies an ed25519 signature with `verify_strict` (rejects
    /// non-canonical signatures and small-order components).
    pub fn verify(&self, msg: &[u8], sig: &[u8; SIGNATURE_LEN]) -> Result<(), KeyError> {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        VerifyingKey::from_bytes(&self.bytes)
            .and_then(|key| key.verify_strict(msg, &sig))
            .map_err(|_| KeyError::BadSignature)
    }

    /// The x25519 (Montgomery form) public key of this identity; pairs with
    /// [`IdentityKey::to_x25519_secret`].
    pub fn to_x25519(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.montgomery)
    }

    /// The relay id naming this identity.
    pub fn relay_id(&self) -> RelayId {
        RelayId::from_identity(self)
    }
}

impl PartialEq for IdentityPublic {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for IdentityPublic {}

impl PartialOrd for IdentityPublic {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdentityPublic {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl core::hash::Hash for IdentityPublic {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Display for IdentityPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityPublic({})", self.to_base64())
    }
}

impl FromStr for IdentityPublic {
    type Err = KeyError;

    /// Parses key text as accepted by [`decode_key`], then validates the point.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(&decode_key(s)?)
    }
}

impl TryFrom<[u8; KEY_LEN]> for IdentityPublic {
    type Error = KeyError;

    fn try_from(bytes: [u8; KEY_LEN]) -> Result<Self, Self::Error> {
        Self::from_bytes(&bytes)
    }
}

// ---------------------------------------------------------------------------
// Relay ids
// ---------------------------------------------------------------------------

/// A relay's short identifier: the first 16 bytes of
/// `SHA-256("shroud-v1 relay-id" || identity public key bytes)`.
///
/// Displayed (and parsed) as 32 lowercase hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub [u8; RELAY_ID_LEN]);

impl RelayId {
    /// Derives the relay id of an identity key.
    pub fn from_identity(identity: &IdentityPublic) -> Self {
        let digest = Sha256::new()
            .chain_update(RELAY_ID_CONTEXT)
            .chain_update(identity.as_bytes())
            .finalize();
        let mut id = [0u8; RELAY_ID_LEN];
        id.copy_from_slice(&digest[..RELAY_ID_LEN]);
        Self(id)
    }

    /// The 16 raw bytes.
    pub fn as_bytes(&self) -> &[u8; RELAY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayId({self})")
    }
}

impl FromStr for RelayId {
    type Err = KeyError;

    /// Parses exactly 32 lowercase hexadecimal digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 2 * RELAY_ID_LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(KeyError::RelayIdFormat);
        }
        let mut id = [0u8; RELAY_ID_LEN];
        hex::decode_to_slice(s, &mut id).map_err(|_| KeyError::RelayIdFormat)?;
        Ok(Self(id))
    }
}

// ---------------------------------------------------------------------------
// Onion keys
// ---------------------------------------------------------------------------

/// A relay's x25519 onion (circuit-setup) secret key.
///
/// Zeroized on drop; `Debug` prints `OnionSecret(<redacted>)`.
#[derive(Clone)]
pub struct OnionSecret(x25519_dalek::StaticSecret);

impl OnionSecret {
    /// Generates a fresh onion key from a cryptographically secure RNG.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(rng))
    }

    /// Builds a key from 32 secret bytes (clamping happens at use).
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self(x25519_dalek::StaticSecret::from(*bytes))
    }

    /// The 32 secret bytes. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The secret encoded as base64 (no trailing newline).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(Base64::encode_string(self.0.as_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> OnionPublic {
        OnionPublic(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// Raw x25519 with the peer's Montgomery-form public key (wiped on drop).
    ///
    /// The output is all zeros when the peer key is a low-order point;
    /// protocols that need a contributory exchange should use
    /// [`Self::diffie_hellman_checked`] instead.
    pub fn diffie_hellman(
        &self,
        peer_montgomery_bytes: &[u8; KEY_LEN],
    ) -> Zeroizing<[u8; KEY_LEN]> {
        let peer = x25519_dalek::PublicKey::from(*peer_montgomery_bytes);
        Zeroizing::new(self.0.diffie_hellman(&peer).to_bytes())
    }

    /// [`Self::diffie_hellman_checked`] computed on the Edwards form: `u` is mapped to
    /// an Edwards point (`MontgomeryPoint::to_edwards`), multiplied by the clamped
    /// secret with curve25519-dalek's variable-base multiplication (vectorised with
    /// AVX2 where the CPU has it, constant time in the secret) and mapped back. The
    /// u-coordinate of `[k]P` does not depend on which of the two points with that
    /// `u` is taken, and the clamped scalar (a multiple of 8, below 2^255) is used
    /// unreduced, exactly as the Montgomery ladder does, so the result is the same
    /// bytes as X25519 for every `u` on the curve (the relay's `u` come from Elligator2,
    /// which always lands on it). A `u` on the twist has no Edwards point and goes
    /// through the ladder (`x25519_equivalence` checks both against x25519-dalek).
    pub fn diffie_hellman_checked_fast(
        &self,
        peer_montgomery_bytes: &[u8; KEY_LEN],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
        let u = curve25519_dalek::montgomery::MontgomeryPoint(*peer_montgomery_bytes);
        let Some(point) = u.to_edwards(0) else {
            return self.diffie_hellman_checked(peer_montgomery_bytes);
        };
        self.mul_edwards(&point)
    }

    /// [`Self::diffie_hellman_checked_fast`] for a peer given as the Edwards `y` of
    /// its point with sign bit 0 (`peer_edwards_y`, what `to_edwards(0)` of its `u`
    /// compresses to: [`crate::elligator::representative_to_edwards_y`] computes it
    /// without the inversion `to_edwards` makes). `None` if `y` is no point's.
    pub fn diffie_hellman_checked_edwards_y(
        &self,
        peer_edwards_y: &[u8; KEY_LEN],
    ) -> Option<Result<Zeroizing<[u8; KEY_LEN]>, KeyError>> {
        let point = curve25519_dalek::edwards::CompressedEdwardsY(*peer_edwards_y).decompress()?;
        Some(self.mul_edwards(&point))
    }

    /// The X25519 output (the Montgomery `u` of the clamped secret times `point`), or
    /// [`KeyError::NonContributory`] if it is zero.
    fn mul_edwards(
        &self,
        point: &curve25519_dalek::edwards::EdwardsPoint,
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
        let secret = Zeroizing::new(self.0.to_bytes());
        let shared = Zeroizing::new(point.mul_clamped(*secret).to_montgomery().to_bytes());
        // OR of every byte (no early exit: the position of a first non-zero byte of
        // the shared secret must not show in the timing).
        if shared.iter().fold(0u8, |acc, &b| acc | b) == 0 {
            Err(KeyError::NonContributory)
        } else {
            Ok(shared)
        }
    }

    /// Like [`Self::diffie_hellman`] but refuses a non-contributory
    /// (all-zero) result.
    pub fn diffie_hellman_checked(
        &self,
        peer_montgomery_bytes: &[u8; KEY_LEN],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
        let peer = x25519_dalek::PublicKey::from(*peer_montgomery_bytes);
        let shared = self.0.diffie_hellman(&peer);
        if shared.was_contributory() {
            Ok(Zeroizing::new(shared.to_bytes()))
        } else {
            Err(KeyError::NonContributory)
        }
    }
}

impl fmt::Debug for OnionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnionSecret(<redacted>)")
    }
}

impl FromStr for OnionSecret {
    type Err = KeyError;

    /// Parses key text as accepted by [`decode_key`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = Zeroizing::new(decode_key(s)?);
        Ok(Self::from_bytes(&bytes))
    }
}

/// An x25519 onion public key (Montgomery u-coordinate, 32 bytes).
///
/// Any 32 bytes are accepted; low-order points are caught at exchange time by
/// [`OnionSecret::diffie_hellman_checked`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OnionPublic(pub [u8; KEY_LEN]);

impl OnionPublic {
    /// The 32-byte encoding, borrowed.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as base64 (no trailing newline). Same as `Display`.
    pub fn to_base64(&self) -> String {
        Base64::encode_string(&self.0)
    }
}

impl From<[u8; KEY_LEN]> for OnionPublic {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for OnionPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for OnionPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OnionPublic({})", self.to_base64())
    }
}

impl FromStr for OnionPublic {
    type Err = KeyError;

    /// Parses key text as accepted by [`decode_key`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Edwards-form X25519 gives x25519-dalek's bytes, or the same refusal, for
    /// random points on the curve (Elligator2 outputs), random 32-byte strings (half
    /// of them on the twist, which take the ladder), the small-order points and
    /// non-canonical encodings.
    #[test]
    fn x25519_equivalence() {
        let mut rng = rand_core::OsRng;
        let p_minus = |k: u8| {
            // p - k, little endian (p = 2^255 - 19).
            let mut b = [0xffu8; 32];
            b[0] = 0xed - k;
            b[31] = 0x7f;
            b
        };
        let mut inputs: Vec<[u8; 32]> = vec![
            [0; 32],
            {
                let mut b = [0; 32];
                b[0] = 1;
                b
            },
            p_minus(0),
            p_minus(1),
            [0xff; 32],
            hex_u("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex_u("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            hex_u("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex_u("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex_u("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ];
        let mut representatives = Vec::new();
        for _ in 0..300 {
            let mut r = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rng, &mut r);
            inputs.push(r);
            inputs.push(crate::elligator::representative_to_u(&r));
            representatives.push(r);
        }
        let mut on_curve = 0;
        for _ in 0..4 {
            let secret = OnionSecret::generate(&mut rng);
            // The relay's way (the Edwards y straight from the representative) gives
            // the ladder's bytes on the representative's u.
            for r in &representatives {
                let u = crate::elligator::representative_to_u(r);
                let ladder = secret.diffie_hellman_checked(&u).ok().map(|s| *s);
                let relay = crate::setup::relay_agree(&secret, r).map(|s| *s);
                assert_eq!(ladder, relay, "representative {}", hex::encode(r));
            }
            for u in &inputs {
                let ladder = secret.diffie_hellman_checked(u).map(|s| *s);
                let fast = secret.diffie_hellman_checked_fast(u).map(|s| *s);
                assert_eq!(ladder, fast, "u = {}", hex::encode(u));
                if curve25519_dalek::montgomery::MontgomeryPoint(*u)
                    .to_edwards(0)
                    .is_some()
                {
                    on_curve += 1;
                }
            }
        }
        // Every Elligator2 output and some random strings took the Edwards path.
        assert!(on_curve >= 4 * 300, "{on_curve}");
    }

    fn hex_u(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).expect("test vector hex");
        out
    }

    #[test]
    fn rfc8032_test_vector_1() {
        let key = IdentityKey::from_bytes(&hex32(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        assert_eq!(
            key.public().to_bytes(),
            hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        let sig = key.sign(b"");
        assert_eq!(
            hex::encode(sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert_eq!(key.public().verify(b"", &sig), Ok(()));
        assert_eq!(key.public().verify(b"x", &sig), Err(KeyError::BadSignature));
    }

    #[test]
    fn key_text_round_trip() {
        for seed in [[0u8; 32], [0xff; 32], [7; 32]] {
            let text = encode_key(&seed);
            assert_eq!(text.len(), 45);
            assert!(text.ends_with('\n'));
            assert_eq!(decode_key(&text), Ok(seed));
            assert_eq!(decode_key(text.trim_end()), Ok(seed));
        }
    }

    #[test]
    fn key_text_rejects_non_canonical_forms() {
        let good = encode_key(&[0x42; 32]);
        let bare = good.trim_end();
        assert_eq!(
            decode_key(&format!("{bare}\n\n")),
            Err(KeyError::MultipleLines)
        );
        assert_eq!(
            decode_key(&format!("{bare}\nxx")),
            Err(KeyError::MultipleLines)
        );
        assert_eq!(
            decode_key(&format!("{bare}\r\n")),
            Err(KeyError::Whitespace)
        );
        assert_eq!(decode_key(&format!(" {bare}")), Err(KeyError::Whitespace));
        assert_eq!(decode_key(&format!("{bare} ")), Err(KeyError::Whitespace));
        assert_eq!(
            decode_key(&format!("{}\t{}", &bare[..10], &bare[10..])),
            Err(KeyError::Whitespace)
        );
        // Missing padding.
        assert!(matches!(
            decode_key(&bare[..43]),
            Err(KeyError::Length {
                expected: 44,
                found: 43
            })
        ));
        assert!(matches!(decode_key(""), Err(KeyError::Length { .. })));
        // 31 bytes with "==" padding has the right length but the wrong size.
        let short = Base64::encode_string(&[1u8; 31]);
        assert_eq!(short.len(), 44);
        assert_eq!(decode_key(&short), Err(KeyError::Base64));
        // Non-canonical trailing bits: "QkI=" is canonical, "QkJ=" is not.
        let mut nc = bare.as_bytes().to_vec();
        assert_eq!(nc[42], b'I');
        nc[42] = b'J';
        let nc = String::from_utf8(nc).expect("ascii");
        assert_eq!(decode_key(&nc), Err(KeyError::Base64));
        // URL-safe alphabet is not standard base64.
        let urlsafe = encode_key(&[0xfb; 32]).replace('+', "-").replace('/', "_");
        assert_eq!(decode_key(&urlsafe), Err(KeyError::Base64));
        // Non-ASCII.
        assert!(decode_key("é").is_err());
    }

    #[test]
    fn identity_public_validation() {
        // The identity point (y = 1) is of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            IdentityPublic::from_bytes(&identity),
            Err(KeyError::WeakIdentity)
        );
        // y = 1 with the sign bit set encodes x = -0: non-canonical.
        let mut neg_zero = identity;
        neg_zero[31] = 0x80;
        assert!(IdentityPublic::from_bytes(&neg_zero).is_err());
        // y = 2 is not on the curve.
        let mut not_point = [0u8; 32];
        not_point[0] = 2;
        assert_eq!(
            IdentityPublic::from_bytes(&not_point),
            Err(KeyError::InvalidIdentity)
        );
        let key = IdentityKey::from_bytes(&[9; 32]);
        let public = key.public();
        assert_eq!(IdentityPublic::from_bytes(public.as_bytes()), Ok(public));
        assert_eq!(public.to_base64().parse::<IdentityPublic>(), Ok(public));
        assert_eq!(encode_key(public.as_bytes()).parse(), Ok(public));
    }

    #[test]
    fn secrets_round_trip_through_text() {
        let key = IdentityKey::from_bytes(&[3; 32]);
        let parsed: IdentityKey = key.to_base64().parse().expect("identity secret");
        assert_eq!(parsed.public(), key.public());

        let onion = OnionSecret::from_bytes(&[4; 32]);
        let parsed: OnionSecret = onion.to_base64().parse().expect("onion secret");
        assert_eq!(parsed.public(), onion.public());
        assert_eq!(
            onion.public().to_base64().parse::<OnionPublic>(),
            Ok(onion.public())
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let onion = OnionSecret::from_bytes(&[4; 32]);
        assert_eq!(format!("{onion:?}"), "OnionSecret(<redacted>)");
        let key = IdentityKey::from_bytes(&[3; 32]);
        assert_eq!(format!("{key:?}"), "IdentityKey(<redacted>)");
        assert!(!format!("{key:?}").contains(key.to_base64().as_str()));
    }

    #[test]
    fn relay_id_is_truncated_domain_separated_sha256() {
        let public = IdentityKey::from_bytes(&[1; 32]).public();
        let mut h = Sha256::new();
        h.update(b"shroud-v1 relay-id");
        h.update(public.as_bytes());
        let digest = h.finalize();
        let id = public.relay_id();
        assert_eq!(&id.0[..], &digest[..16]);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text, hex::encode(&digest[..16]));
        assert_eq!(text.parse::<RelayId>(), Ok(id));
        assert_eq!(
            text.to_uppercase().parse::<RelayId>(),
            Err(KeyError::RelayIdFormat)
        );
        assert_eq!("00".parse::<RelayId>(), Err(KeyError::RelayIdFormat));
    }

    #[test]
    fn identity_converts_to_matching_x25519_pair() {
        let key = IdentityKey::from_bytes(&[5; 32]);
        let secret = key.to_x25519_secret();
        assert_eq!(
            x25519_dalek::PublicKey::from(&secret).to_bytes(),
            key.public().to_x25519().to_bytes()
        );
        // And the converted keys agree with an onion key.
        let onion = OnionSecret::from_bytes(&[6; 32]);
        let a = onion.diffie_hellman(key.public().to_x25519().as_bytes());
        let b = secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(onion.public().0))
            .to_bytes();
        assert_eq!(*a, b);
    }

    #[test]
    fn onion_diffie_hellman_agrees_and_rejects_low_order() {
        let mut rng = rand_core::OsRng;
        let a = OnionSecret::generate(&mut rng);
        let b = OnionSecret::generate(&mut rng);
        let ab = a.diffie_hellman(&b.public().0);
        assert_eq!(ab, b.diffie_hellman(&a.public().0));
        assert_eq!(a.diffie_hellman_checked(&b.public().0), Ok(ab));
        assert_eq!(*a.diffie_hellman(&[0; 32]), [0; 32]);
        assert_eq!(
            a.diffie_hellman_checked(&[0; 32]),
            Err(KeyError::NonContributory)
        );
    }

    #[test]
    fn generated_identity_signs_and_verifies() {
        let key = IdentityKey::generate(&mut rand_core::OsRng);
        let sig = key.sign(b"hello");
        assert_eq!(key.public().verify(b"hello", &sig), Ok(()));
        let mut bad = sig;
        bad[0] ^= 1;
        assert_eq!(
            key.public().verify(b"hello", &bad),
            Err(KeyError::BadSignature)
        );
    }
}
