//! AES-256-GCM behind one trait, with two backends.
//!
//! Every onion layer of Shroud is AES-256-GCM with a 16-byte tag kept *outside* the
//! encrypted bytes (the tag travels in the cell's tag stack). The trait works in place
//! on caller-owned buffers and never allocates, so it can sit on the relay's hot path.
//!
//! Backends:
//! - [`RingAead`]: `ring`'s assembly AES-GCM (default; on the reference machine it is
//!   1.7x faster per 1 KiB cell than the RustCrypto build, see `docs/BENCHMARKING.md`);
//! - [`RustCryptoAead`]: RustCrypto `aes-gcm`, whose AES-NI/CLMUL paths are picked at
//!   run time.
//!
//! Both produce byte-identical output for the same key, nonce, AAD and plaintext; the
//! known-answer tests check that.

use core::fmt;

/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;

/// The tag did not verify: the cell was altered, forged, or sealed under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTag;

impl fmt::Display for BadTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("authentication tag did not verify")
    }
}

impl std::error::Error for BadTag {}

/// An AES-256-GCM key schedule that seals and opens in place, tag detached.
pub trait Aead: Send + Sync + Sized + 'static {
    /// Short stable name used in benchmarks and logs.
    const NAME: &'static str;
    /// Expands a 256-bit key.
    fn new(key: &[u8; KEY_LEN]) -> Self;
    /// Encrypts `buf` in place and returns the tag over (`aad`, ciphertext).
    fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN];
    /// Verifies `tag` over (`aad`, `buf`) and decrypts `buf` in place. On failure `buf`
    /// is left unspecified and must be discarded.
    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag>;
}

/// `ring`'s AES-256-GCM.
pub struct RingAead(ring::aead::LessSafeKey);

impl fmt::Debug for RingAead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RingAead(<key>)")
    }
}

impl Aead for RingAead {
    const NAME: &'static str = "ring";

    fn new(key: &[u8; KEY_LEN]) -> Self {
        // A 32-byte key is always valid for AES_256_GCM; ring only refuses wrong lengths.
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("AES-256 key has the right length"));
        RingAead(ring::aead::LessSafeKey::new(unbound))
    }

    fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = ring::aead::Nonce::assume_unique_for_key(*nonce);
        // ring only fails for inputs longer than GCM's 2^36-byte limit; cells are tiny.
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), buf)
            .unwrap_or_else(|_| unreachable!("cell-sized input is within GCM limits"));
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag> {
        let nonce = ring::aead::Nonce::assume_unique_for_key(*nonce);
        let tag = ring::aead::Tag::from(*tag);
        self.0
            .open_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), tag, buf, 0..)
            .map(|_| ())
            .map_err(|_| BadTag)
    }
}

/// RustCrypto `aes-gcm` AES-256-GCM.
pub struct RustCryptoAead(aes_gcm::Aes256Gcm);

impl fmt::Debug for RustCryptoAead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RustCryptoAead(<key>)")
    }
}

impl Aead for RustCryptoAead {
    const NAME: &'static str = "rustcrypto";

    fn new(key: &[u8; KEY_LEN]) -> Self {
        use aes_gcm::aead::KeyInit;
        RustCryptoAead(aes_gcm::Aes256Gcm::new(&(*key).into()))
    }

    fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        use aes_gcm::aead::AeadInOut;
        let tag = self
            .0
            .encrypt_inout_detached(&(*nonce).into(), aad, buf.into())
            .unwrap_or_else(|_| unreachable!("cell-sized input is within GCM limits"));
        tag.into()
    }

    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag> {
        use aes_gcm::aead::AeadInOut;
        self.0
            .decrypt_inout_detached(&(*nonce).into(), aad, buf.into(), &(*tag).into())
            .map_err(|_| BadTag)
    }
}

/// A stand-in "AEAD" with no cryptographic strength, so benchmarks can measure the
/// relay's I/O path with the cell crypto removed (the in-run baseline of
/// `shroud-bench relay`). It XORs the first 16 bytes of the buffer with the first 16
/// key bytes (so layers still change bytes and the protocol's XOR-keystream structure
/// holds) and never rejects a tag. It exists only with the `bench-null-crypto`
/// feature.
#[cfg(feature = "bench-null-crypto")]
#[derive(Debug)]
pub struct NullAead([u8; 16]);

#[cfg(feature = "bench-null-crypto")]
impl NullAead {
    fn xor(&self, buf: &mut [u8]) {
        for (b, k) in buf.iter_mut().zip(self.0.iter()) {
            *b ^= k;
        }
    }
}

#[cfg(feature = "bench-null-crypto")]
impl Aead for NullAead {
    const NAME: &'static str = "none";

    fn new(key: &[u8; KEY_LEN]) -> Self {
        let mut k = [0u8; 16];
        k.copy_from_slice(&key[..16]);
        NullAead(k)
    }

    fn seal(&self, _nonce: &[u8; NONCE_LEN], _aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        self.xor(buf);
        [0; TAG_LEN]
    }

    fn open(
        &self,
        _nonce: &[u8; NONCE_LEN],
        _aad: &[u8],
        buf: &mut [u8],
        _tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag> {
        self.xor(buf);
        Ok(())
    }
}

/// The backend chosen by measurement (see the module docs).
pub type DefaultAead = RingAead;

/// The 96-bit GCM nonce for a cell counter: four zero bytes, then the counter, big endian.
///
/// Every layer key is used in one direction of one circuit hop only, and a hop never
/// processes a counter twice (replay window), so (key, nonce) pairs never repeat.
pub fn nonce_for(counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<A: Aead>() {
        let k = A::new(&[7u8; 32]);
        let mut buf = *b"the quick brown fox jumps over the lazy dog......";
        let orig = buf;
        let tag = k.seal(&nonce_for(9), b"aad", &mut buf);
        assert_ne!(buf, orig);
        let mut bad = buf;
        bad[3] ^= 1;
        assert_eq!(k.open(&nonce_for(9), b"aad", &mut bad, &tag), Err(BadTag));
        let mut wrong_aad = buf;
        assert_eq!(
            k.open(&nonce_for(9), b"aae", &mut wrong_aad, &tag),
            Err(BadTag)
        );
        k.open(&nonce_for(9), b"aad", &mut buf, &tag).unwrap();
        assert_eq!(buf, orig);
    }

    #[test]
    fn ring_roundtrip() {
        roundtrip::<RingAead>();
    }

    #[test]
    fn rustcrypto_roundtrip() {
        roundtrip::<RustCryptoAead>();
    }

    /// AES-256-GCM test cases 13 and 14 of McGrew & Viega, "The Galois/Counter Mode of
    /// Operation" (the GCM specification): zero key, zero IV.
    fn gcm_spec_vectors<A: Aead>() {
        let k = A::new(&[0u8; 32]);
        let tag = k.seal(&[0u8; 12], &[], &mut []);
        assert_eq!(hex::encode(tag), "530f8afbc74536b9a963b4f1c4cb738b");
        let mut p = [0u8; 16];
        let tag = k.seal(&[0u8; 12], &[], &mut p);
        assert_eq!(hex::encode(p), "cea7403d4d606b6e074ec5d3baf39d18");
        assert_eq!(hex::encode(tag), "d0d1c8a799996bf0265b98b5d48ab919");
    }

    #[test]
    fn gcm_spec_vectors_ring() {
        gcm_spec_vectors::<RingAead>();
    }

    #[test]
    fn gcm_spec_vectors_rustcrypto() {
        gcm_spec_vectors::<RustCryptoAead>();
    }

    /// AES key schedules are wiped on drop: `aes` and `aes-gcm` are built with their
    /// `zeroize` feature (without it these types do not implement `ZeroizeOnDrop` and
    /// this test does not compile). `ring` offers no way to wipe its keys.
    #[test]
    fn rustcrypto_key_schedules_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<aes::Aes256>();
        wiped_on_drop::<aes_gcm::Aes256Gcm>();
    }

    #[test]
    fn backends_agree() {
        let a = RingAead::new(&[1u8; 32]);
        let b = RustCryptoAead::new(&[1u8; 32]);
        let mut x = [0x5au8; 1000];
        let mut y = x;
        let ta = a.seal(&nonce_for(1 << 40), b"hdr", &mut x);
        let tb = b.seal(&nonce_for(1 << 40), b"hdr", &mut y);
        assert_eq!(x, y);
        assert_eq!(ta, tb);
    }
}
