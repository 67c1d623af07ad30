//! Known answers from the standards, not from this crate: the primitives of
//! `docs/PROTOCOL.md` (X25519, HKDF-SHA256, AES-256, AES-256-GCM, the Elligator2 map)
//! checked against the published test vectors in `testdata/standard/*.txt`, whose
//! header comments name the RFC or FIPS section and the test case of every value.
//!
//! Each check goes through the code path the protocol uses: `OnionSecret` and
//! `Ephemeral` for X25519, `HeaderKey` for AES-256, both `Aead` backends for
//! AES-256-GCM, `relay_agree` and the map it calls for Elligator2. HKDF is checked
//! through the `hkdf` crate called the way `HopSecrets::derive` calls it, since that
//! function fixes its salt and output length.

use std::path::PathBuf;

use curve25519_elligator2::{MontgomeryPoint, Randomized};
use hkdf::Hkdf;
use sha2::Sha256;
use shroud_proto::aead::{Aead, BadTag, RingAead, RustCryptoAead};
use shroud_proto::cell::{Command, Header, HeaderKey};
use shroud_proto::keys::OnionSecret;
use shroud_proto::setup::{relay_agree, Ephemeral};

/// One test case of a vector file: `key = value` lines, in file order.
#[derive(Debug)]
struct Record(Vec<(String, String)>);

impl Record {
    fn text(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("record {:?} has no {key}", self.0))
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// A hex value (possibly empty).
    fn bytes(&self, key: &str) -> Vec<u8> {
        hex::decode(self.text(key))
            .unwrap_or_else(|e| panic!("{}: {key} is not hex: {e}", self.text("case")))
    }

    fn arr<const N: usize>(&self, key: &str) -> [u8; N] {
        let v = self.bytes(key);
        v.as_slice().try_into().unwrap_or_else(|_| {
            panic!(
                "{}: {key} has {} bytes, not {N}",
                self.text("case"),
                v.len()
            )
        })
    }

    fn case(&self) -> &str {
        self.text("case")
    }
}

/// Parses `testdata/standard/<name>`: `#` comment lines, records separated by blank
/// lines, every record starting with `case = ...`.
fn records(name: &str) -> Vec<Record> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/standard")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(Record(std::mem::take(&mut cur)));
            }
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{name}: not `key = value`: {line:?}"));
        cur.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if !cur.is_empty() {
        out.push(Record(cur));
    }
    for r in &out {
        assert_eq!(r.0[0].0, "case", "{name}: a record must start with `case`");
    }
    out
}

/// A field element printed big-endian (as in RFC 9380) to its little-endian encoding.
fn le_from_be(r: &Record, key: &str) -> [u8; 32] {
    let mut a: [u8; 32] = r.arr(key);
    a.reverse();
    a
}

#[test]
fn x25519_rfc7748() {
    let recs = records("x25519.txt");
    assert_eq!(recs.len(), 3);
    let mut ephemerals_checked = 0;
    for r in &recs {
        if r.has("scalar") {
            // Section 5.2: the relay's exchange (`relay_agree` calls the checked form).
            let k = OnionSecret::from_bytes(&r.arr("scalar"));
            let u: [u8; 32] = r.arr("u");
            let want: [u8; 32] = r.arr("output");
            assert_eq!(*k.diffie_hellman(&u), want, "{}", r.case());
            assert_eq!(
                k.diffie_hellman_checked(&u).map(|s| *s),
                Ok(want),
                "{}",
                r.case()
            );
            // The client's exchange, when the scalar is usable as an ephemeral.
            if let Some(e) = Ephemeral::from_secret(r.arr("scalar"), 0) {
                assert_eq!(e.agree(&u).map(|s| *s), Some(want), "{}", r.case());
                ephemerals_checked += 1;
            }
        } else {
            // Section 6.1: public keys, and the shared secret computed by both sides.
            let shared: [u8; 32] = r.arr("shared");
            let sides = [
                ("alice_private", "alice_public", "bob_public"),
                ("bob_private", "bob_public", "alice_public"),
            ];
            for (private, public, peer) in sides {
                let k = OnionSecret::from_bytes(&r.arr(private));
                assert_eq!(k.public().0, r.arr::<32>(public), "{}: {public}", r.case());
                let peer: [u8; 32] = r.arr(peer);
                assert_eq!(
                    k.diffie_hellman_checked(&peer).map(|s| *s),
                    Ok(shared),
                    "{}: {private}",
                    r.case()
                );
                if let Some(e) = Ephemeral::from_secret(r.arr(private), 0) {
                    assert_eq!(e.agree(&peer).map(|s| *s), Some(shared), "{}", r.case());
                    ephemerals_checked += 1;
                }
            }
        }
    }
    // Only about half of all secrets have an Elligator2 representative: two of the
    // four RFC secrets do, so `Ephemeral::agree` is checked on those two.
    assert_eq!(ephemerals_checked, 2, "representable RFC 7748 secrets");
}

#[test]
fn hkdf_sha256_rfc5869() {
    let recs = records("hkdf_sha256.txt");
    assert_eq!(recs.len(), 3);
    for r in &recs {
        let (salt, ikm, info) = (r.bytes("salt"), r.bytes("ikm"), r.bytes("info"));
        let want = r.bytes("okm");
        // As `HopSecrets::derive` does: `new(Some(salt), ikm)`, then `expand`.
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let mut okm = vec![0u8; want.len()];
        hk.expand(&info, &mut okm).expect("L is within 255 * 32");
        assert_eq!(hex::encode(&okm), hex::encode(&want), "{}: OKM", r.case());
        let (prk, _) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(hex::encode(prk), r.text("prk"), "{}: PRK", r.case());
    }
}

#[test]
fn aes256_fips197_through_header_protection() {
    let recs = records("aes256.txt");
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    let key = HeaderKey::new(&r.arr("key"));
    let plaintext: [u8; 16] = r.arr("plaintext");
    let ciphertext: [u8; 16] = r.arr("ciphertext");
    let hdr = Header {
        circuit: 0x0102_0304_0506_0708,
        counter: 0x0000_0a0b_0c0d_0e0f,
        command: Command::Data,
    };
    // protect() writes header XOR AES(key, cell[16..32]) into cell[0..16]: with the
    // FIPS plaintext as the sample, XORing the header back out leaves the AES output.
    let mut cell = vec![0u8; 1024];
    cell[16..32].copy_from_slice(&plaintext);
    key.protect(&mut cell, &hdr);
    let mask: Vec<u8> = cell[..16]
        .iter()
        .zip(hdr.encode())
        .map(|(c, h)| c ^ h)
        .collect();
    assert_eq!(hex::encode(mask), hex::encode(ciphertext), "{}", r.case());
    // And unprotect() removes exactly that mask.
    for (i, b) in hdr.encode().iter().enumerate() {
        cell[i] = b ^ ciphertext[i];
    }
    assert_eq!(key.unprotect(&cell), Ok(hdr), "{}", r.case());
}

fn aes256_gcm<A: Aead>() {
    let recs = records("aes256_gcm.txt");
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let key = A::new(&r.arr("key"));
        let nonce: [u8; 12] = r.arr("iv");
        let aad = r.bytes("aad");
        let (plaintext, ciphertext) = (r.bytes("plaintext"), r.bytes("ciphertext"));
        let want_tag: [u8; 16] = r.arr("tag");
        let ctx = format!("{} ({})", r.case(), A::NAME);

        let mut buf = plaintext.clone();
        let tag = key.seal(&nonce, &aad, &mut buf);
        assert_eq!(hex::encode(&buf), hex::encode(&ciphertext), "{ctx}: C");
        assert_eq!(hex::encode(tag), hex::encode(want_tag), "{ctx}: T");

        let mut buf = ciphertext.clone();
        key.open(&nonce, &aad, &mut buf, &want_tag)
            .unwrap_or_else(|_| panic!("{ctx}: the standard's tag does not verify"));
        assert_eq!(buf, plaintext, "{ctx}: P");

        let mut bad_tag = want_tag;
        bad_tag[15] ^= 1;
        let mut buf = ciphertext.clone();
        assert_eq!(
            key.open(&nonce, &aad, &mut buf, &bad_tag),
            Err(BadTag),
            "{ctx}"
        );
        if !aad.is_empty() {
            let mut bad_aad = aad.clone();
            bad_aad[0] ^= 0x80;
            let mut buf = ciphertext.clone();
            assert_eq!(
                key.open(&nonce, &bad_aad, &mut buf, &want_tag),
                Err(BadTag),
                "{ctx}: altered AAD"
            );
        }
    }
}

#[test]
fn aes256_gcm_spec_ring() {
    aes256_gcm::<RingAead>();
}

#[test]
fn aes256_gcm_spec_rustcrypto() {
    aes256_gcm::<RustCryptoAead>();
}

/// The relay decodes a setup's `E_i` with `MontgomeryPoint::map_to_point` (in
/// `relay_agree`): RFC 9380's `map_to_curve_elligator2` on the representative with its
/// two top bits cleared. The `Randomized` variant named in PROTOCOL.md §5.1 decodes
/// the same way (it differs from RFC 9380 only in how the client *encodes*), which is
/// checked here too.
#[test]
fn elligator2_map_rfc9380() {
    let recs = records("elligator2.txt");
    assert_eq!(recs.len(), 8);
    // Any onion key will do for the end-to-end check; take RFC 7748's Alice.
    let onion = OnionSecret::from_bytes(&records("x25519.txt")[2].arr("alice_private"));
    for r in &recs {
        let u = le_from_be(r, "u");
        let q_x = le_from_be(r, "q_x");
        assert_eq!(u[31] & 0xc0, 0, "{}: u must be below 2^254", r.case());
        for padding in [0x00u8, 0x40, 0x80, 0xc0] {
            let mut e = u;
            e[31] |= padding;
            let ctx = format!("{} (top bits {padding:#04x})", r.case());
            assert_eq!(
                hex::encode(MontgomeryPoint::map_to_point(&e).to_bytes()),
                hex::encode(q_x),
                "{ctx}"
            );
            let randomized = MontgomeryPoint::from_representative::<Randomized>(&e)
                .expect("every representative decodes");
            assert_eq!(randomized.to_bytes(), q_x, "{ctx}: Randomized");
            // The relay's whole exchange: X25519 with the RFC's Q.x.
            assert_eq!(
                relay_agree(&onion, &e).map(|s| *s),
                Some(*onion.diffie_hellman(&q_x)),
                "{ctx}: relay_agree"
            );
        }
    }
}
