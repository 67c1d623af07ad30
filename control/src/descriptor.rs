//! Relay descriptors: a relay's own entry for the peer list, signed by the relay.
//!
//! `shroudctl daemon` writes one whenever the relay's onion keys change, so that
//! the authorities can publish the next onion key before the relay's clients need
//! it; `shroudctl peers import LIST --descriptor FILE` checks the signature and adds
//! or replaces the relay in a peer list.
//!
//! # Format (version 1)
//!
//! ASCII, one item per line, every line ends with `"\n"`. The `relay` block is
//! byte for byte the relay's block in a peer list (docs/PROTOCOL.md §7), with the
//! same canonical rules (onion keys sorted by expiry, flags, no leading zeros):
//!
//! ```text
//! shroud-descriptor 1
//! published 1764000000
//! relay <identity base64>
//!  addr 192.0.2.1
//!  ports 9000-9003
//!  onion <base64> until=1764086400
//!  flags exit
//!  weight 100
//! end
//! signature <ed25519 signature base64>
//! end-descriptor
//! ```
//!
//! The *body* is everything before the `signature` line. The signature is the
//! relay identity key's ed25519 signature over `b"shroud-v1 descriptor\0" || body`
//! ([`SIGNATURE_CONTEXT`]); the domain separation means a descriptor signature can
//! never pass as a peer-list signature or the reverse. The signer is the identity
//! named in the `relay` line, so a descriptor proves that the holder of that
//! identity key published these onion keys and this address.
//!
//! # Invariants
//!
//! [`Descriptor::parse`] accepts exactly one spelling of each descriptor
//! (`parse(t)?.encode() == t`) and never panics; a parsed descriptor's relay
//! satisfies every per-relay invariant of the peer list. Parsing does not check the
//! signature: [`Descriptor::verify`] does.

use shroud_proto::keys::{IdentityKey, IdentityPublic, SIGNATURE_LEN};
use shroud_proto::peerlist::{PeerList, PeerListError, RelayDescriptor, Signature};

use crate::exit;

/// Domain separation for descriptor signatures.
pub const SIGNATURE_CONTEXT: &[u8] = b"shroud-v1 descriptor\0";

/// The largest descriptor accepted, in bytes (a relay block is under 600).
pub const MAX_DESCRIPTOR_BYTES: usize = 4096;

/// A signed relay descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// When the relay wrote it (Unix seconds).
    pub published: u64,
    /// The relay's peer-list entry.
    pub relay: RelayDescriptor,
    /// The relay's signature over the body.
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why a descriptor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorError {
    /// Not a canonical version-1 descriptor.
    #[error("not a valid relay descriptor: line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The relay block breaks a peer-list rule.
    #[error("invalid relay block")]
    Relay(#[source] PeerListError),
    /// The signature does not verify with the relay's identity key.
    #[error("the signature does not verify with relay identity {identity}: the descriptor was altered or not signed by that relay")]
    BadSignature {
        /// The identity named in the descriptor.
        identity: String,
    },
}

impl DescriptorError {
    /// [`exit::CONFIG`] for a malformed file, [`exit::FAILURE`] for a bad signature.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Malformed { .. } | Self::Relay(_) => exit::CONFIG,
            Self::BadSignature { .. } => exit::FAILURE,
        }
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Relay(_) => "relay",
            Self::BadSignature { .. } => "bad_signature",
        }
    }
}

/// The header that turns a relay block into a one-relay peer list for the
/// peer-list parser (its values are irrelevant but valid).
const WRAP_HEADER: &str =
    "shroud-peerlist 1\nserial 0\nvalid-after 0\nvalid-until 1\nparams cell=1024 h-max=8\n";

/// The canonical `relay ... end` block of `relay`, as in a peer list.
pub fn relay_block(relay: &RelayDescriptor) -> String {
    let mut list = PeerList::new(0, 0, 1, Default::default());
    let mut relay = relay.clone();
    relay.onion_keys.sort_by_key(|k| (k.valid_until, k.key));
    list.relays.push(relay);
    let body = String::from_utf8(list.body_bytes()).unwrap_or_default();
    body.find("relay ")
        .map_or_else(String::new, |i| body[i..].to_owned())
}

/// A signature in canonical padded base64, exactly as the peer list writes its
/// signatures (so both documents share one encoding).
fn signature_base64(signer: IdentityPublic, sig: &[u8; SIGNATURE_LEN]) -> String {
    let mut list = PeerList::new(0, 0, 1, Default::default());
    list.signatures.push(Signature { signer, sig: *sig });
    let text = list.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("signature "))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned()
}

/// Decodes a signature with the peer list's (strict, canonical) base64 rules.
fn parse_signature_base64(signer: IdentityPublic, text: &str) -> Option<[u8; SIGNATURE_LEN]> {
    if text.bytes().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    let doc = format!("{WRAP_HEADER}signature {signer} {text}\nend-peerlist\n");
    PeerList::parse(&doc)
        .ok()?
        .signatures
        .first()
        .map(|s| s.sig)
}

/// Parses a canonical relay block (`relay ...` to `end\n`) with the peer-list
/// parser.
fn parse_relay_block(block: &str, first_line: usize) -> Result<RelayDescriptor, DescriptorError> {
    let doc = format!("{WRAP_HEADER}{block}end-peerlist\n");
    let list = PeerList::parse(&doc).map_err(|e| match e {
        PeerListError::Malformed { line, reason } => DescriptorError::Malformed {
            // Lines of the block, renumbered to the descriptor.
            line: (line + first_line).saturating_sub(WRAP_HEADER.lines().count() + 1),
            reason,
        },
        other => DescriptorError::Relay(other),
    })?;
    match <[RelayDescriptor; 1]>::try_from(list.relays) {
        Ok([relay]) => Ok(relay),
        Err(_) => Err(DescriptorError::Malformed {
            line: first_line,
            reason: "a descriptor holds exactly one relay block".into(),
        }),
    }
}

impl Descriptor {
    /// Signs `relay` with its identity key `key` (whose public key replaces
    /// `relay.identity`), as published at `published`.
    pub fn sign(mut relay: RelayDescriptor, key: &IdentityKey, published: u64) -> Descriptor {
        relay.identity = key.public();
        relay.onion_keys.sort_by_key(|k| (k.valid_until, k.key));
        let body = body(published, &relay);
        let mut msg = SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(body.as_bytes());
        Descriptor {
            published,
            signature: key.sign(&msg),
            relay,
        }
    }

    /// The canonical text.
    pub fn encode(&self) -> String {
        format!(
            "{}signature {}\nend-descriptor\n",
            body(self.published, &self.relay),
            signature_base64(self.relay.identity, &self.signature)
        )
    }

    /// Parses a canonical descriptor (see the [module docs](self)); does not check
    /// the signature.
    pub fn parse(text: &str) -> Result<Descriptor, DescriptorError> {
        let malformed = |line: usize, reason: &str| DescriptorError::Malformed {
            line,
            reason: reason.to_owned(),
        };
        if text.len() > MAX_DESCRIPTOR_BYTES {
            return Err(malformed(
                1,
                &format!("larger than {MAX_DESCRIPTOR_BYTES} bytes"),
            ));
        }
        if !text.is_ascii() {
            return Err(malformed(1, "non-ASCII character"));
        }
        let rest = text
            .strip_prefix("shroud-descriptor 1\n")
            .ok_or_else(|| malformed(1, "expected `shroud-descriptor 1`"))?;
        let (published_line, rest) = rest
            .split_once('\n')
            .ok_or_else(|| malformed(2, "expected `published <unix seconds>`"))?;
        let published = published_line
            .strip_prefix("published ")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .filter(|n| *n == "0" || !n.starts_with('0'))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| malformed(2, "expected `published <unix seconds>`"))?;
        let end = rest
            .find("\nend\n")
            .map(|i| i + "\nend\n".len())
            .ok_or_else(|| malformed(3, "the relay block has no `end` line"))?;
        let (block, rest) = rest.split_at(end);
        let relay = parse_relay_block(block, 3)?;
        let sig_line = 3 + block.lines().count();
        let sig = rest
            .strip_prefix("signature ")
            .and_then(|r| r.strip_suffix("\nend-descriptor\n"))
            .ok_or_else(|| {
                malformed(
                    sig_line,
                    "expected `signature <base64>` then `end-descriptor` and nothing else",
                )
            })?;
        let signature = parse_signature_base64(relay.identity, sig).ok_or_else(|| {
            malformed(
                sig_line,
                "the signature is not canonical base64 of 64 bytes",
            )
        })?;
        let d = Descriptor {
            published,
            relay,
            signature,
        };
        if d.encode() != text {
            return Err(malformed(1, "not in canonical form"));
        }
        Ok(d)
    }

    /// Checks the signature with the identity key named in the descriptor.
    pub fn verify(&self) -> Result<(), DescriptorError> {
        let mut msg = SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(body(self.published, &self.relay).as_bytes());
        self.relay
            .identity
            .verify(&msg, &self.signature)
            .map_err(|_| DescriptorError::BadSignature {
                identity: self.relay.identity.to_string(),
            })
    }

    /// [`Self::parse`] then [`Self::verify`].
    pub fn parse_and_verify(text: &str) -> Result<Descriptor, DescriptorError> {
        let d = Self::parse(text)?;
        d.verify()?;
        Ok(d)
    }
}

fn body(published: u64, relay: &RelayDescriptor) -> String {
    format!(
        "shroud-descriptor 1\npublished {published}\n{}",
        relay_block(relay)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::OnionPublic;
    use shroud_proto::peerlist::OnionKeyEntry;

    fn relay(key: &IdentityKey) -> RelayDescriptor {
        RelayDescriptor {
            identity: key.public(),
            addr: "192.0.2.1".parse().expect("addr"),
            ports: (9000, 9003),
            onion_keys: vec![
                OnionKeyEntry {
                    key: OnionPublic([3; 32]),
                    valid_until: 2_000,
                },
                OnionKeyEntry {
                    key: OnionPublic([2; 32]),
                    valid_until: 1_000,
                },
            ],
            exit: true,
            weight: 100,
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let key = IdentityKey::from_bytes(&[1; 32]);
        let d = Descriptor::sign(relay(&key), &key, 1_764_000_000);
        let text = d.encode();
        assert!(
            text.starts_with("shroud-descriptor 1\npublished 1764000000\nrelay "),
            "{text}"
        );
        assert!(
            text.contains("\n addr 192.0.2.1\n ports 9000-9003\n"),
            "{text}"
        );
        assert!(text.ends_with("end-descriptor\n"), "{text}");
        // Onion keys are in canonical (expiry) order.
        let first = text.find("until=1000").expect("1000");
        assert!(first < text.find("until=2000").expect("2000"));
        let back = Descriptor::parse_and_verify(&text).expect("valid");
        assert_eq!(back, d);
        assert_eq!(back.encode(), text);
        // The block is the peer list's block.
        let mut list = PeerList::new(1, 0, 10, Default::default());
        list.relays.push(d.relay.clone());
        let list_text = String::from_utf8(list.body_bytes()).expect("ascii");
        assert!(list_text.contains(&relay_block(&d.relay)));
    }

    #[test]
    fn tampering_and_wrong_signers_are_refused() {
        let key = IdentityKey::from_bytes(&[1; 32]);
        let text = Descriptor::sign(relay(&key), &key, 5).encode();
        for (from, to) in [
            ("weight 100", "weight 101"),
            ("addr 192.0.2.1", "addr 192.0.2.2"),
            ("published 5", "published 6"),
            ("flags exit", "flags -"),
        ] {
            let bad = text.replace(from, to);
            let e = Descriptor::parse_and_verify(&bad).expect_err(to);
            assert_eq!(e.kind(), "bad_signature", "{to}");
            assert_eq!(e.exit_code(), exit::FAILURE);
        }
        // Signed by another key but claiming this identity.
        let other = IdentityKey::from_bytes(&[2; 32]);
        let mut forged = Descriptor::sign(relay(&key), &other, 5);
        forged.relay.identity = key.public();
        let e = Descriptor::parse_and_verify(&forged.encode()).expect_err("forged");
        assert_eq!(e.kind(), "bad_signature");
        // A peer-list signature context does not verify as a descriptor.
        let mut msg = shroud_proto::peerlist::SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(body(5, &relay(&key)).as_bytes());
        let cross = Descriptor {
            published: 5,
            relay: relay(&key),
            signature: key.sign(&msg),
        };
        let mut sorted = cross.clone();
        sorted
            .relay
            .onion_keys
            .sort_by_key(|k| (k.valid_until, k.key));
        assert!(Descriptor::parse_and_verify(&sorted.encode()).is_err());
    }

    #[test]
    fn malformed_descriptors_are_config_errors() {
        let key = IdentityKey::from_bytes(&[1; 32]);
        let text = Descriptor::sign(relay(&key), &key, 5).encode();
        let cases = [
            String::new(),
            text[..text.len() / 2].to_owned(),
            text.replace("shroud-descriptor 1", "shroud-descriptor 2"),
            text.replace("published 5", "published 05"),
            text.replace(" weight 100\n", ""),
            text.replace("end-descriptor\n", "end-descriptor\n\n"),
            text.replace("\nend\n", "\nend\nrelay x\nend\n"),
            text.replace(" ports 9000-9003", " ports 9003-9000"),
            format!("{text}x"),
            text.replace("signature ", "signature  "),
            "x".repeat(MAX_DESCRIPTOR_BYTES + 1),
        ];
        for bad in cases {
            let e = Descriptor::parse(&bad).expect_err(&bad);
            assert_eq!(e.exit_code(), exit::CONFIG, "{bad:?}: {e}");
        }
    }
}
