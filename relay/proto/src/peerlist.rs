//! The peer list: the network's signed directory of relays.
//!
//! A peer list is a canonical, versioned, human-readable text document that
//! directory authorities sign. Relays and clients fetch it, check it with
//! [`PeerList::verify`] against a [`TrustPolicy`] and use it to pick paths.
//!
//! # Format (version 1)
//!
//! ASCII only, one item per line, every line (including the last) ends with
//! `"\n"`; relay lines are indented by exactly one space:
//!
//! ```text
//! shroud-peerlist 1
//! serial 42
//! valid-after 1764000000
//! valid-until 1764086400
//! params cell=1024 h-max=8
//! relay <identity base64>
//!  addr 127.0.0.2
//!  ports 9000-9001
//!  onion <base64> until=1764090000
//!  flags exit
//!  weight 100
//! end
//! signature <signer base64> <signature base64>
//! end-peerlist
//! ```
//!
//! Everything before the first `signature` line is the *body*
//! ([`PeerList::body_bytes`]). Authorities sign
//! `b"shroud-v1 peerlist\0" || body` with ed25519 ([`SIGNATURE_CONTEXT`]).
//!
//! # Invariants
//!
//! [`PeerList::parse`] accepts exactly one spelling of every document, so
//! `parse(text)?.encode() == text` for every accepted `text`. It rejects
//! anything non-canonical, and never panics. A parsed list satisfies:
//!
//! * `version == 1`, `valid_after < valid_until`;
//! * at most [`MAX_RELAYS`] relays, sorted by identity key bytes
//!   (ascending), with no two relays sharing an identity or a [`RelayId`];
//! * every relay address is in `std`'s canonical `Display` form and is not
//!   unspecified, multicast, broadcast or IPv4-mapped IPv6; its port range is
//!   `first..=last` with `0 < first <= last`; no two relays have overlapping
//!   port ranges on the same address (so [`PeerList::relay_by_addr`] is
//!   unambiguous);
//! * every relay has 1 to [`MAX_ONION_KEYS`] onion keys, sorted by
//!   `(valid_until, key bytes)` ascending, with no key repeated;
//! * flags appear once each, in the fixed order (`exit`), or as `-`;
//! * numbers are decimal without sign or leading zeros;
//! * keys and signatures are canonical padded standard base64; identity keys
//!   are valid, canonically encoded, non-small-order ed25519 points;
//! * signatures are sorted by signer key bytes, at most one per signer;
//! * the document is at most [`MAX_DOCUMENT_BYTES`] long.
//!
//! The network parameters are only *syntactically* checked by `parse`;
//! [`PeerList::verify`] checks them with [`NetworkParams::validate`].
//!
//! The fields of [`PeerList`] are public so that authorities can build lists;
//! a list built in memory may break the invariants. [`PeerList::normalize`]
//! fixes the orderings, [`PeerList::validate`] checks everything, and
//! [`PeerList::sign`] and [`PeerList::verify`] refuse invalid lists.
//!
//! This module is sans-IO: it reads no clock; `now` is always an argument
//! (Unix seconds).

use core::fmt;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use crate::keys::{
    decode_base64_exact, encode_base64, IdentityKey, IdentityPublic, OnionPublic, RelayId, KEY_LEN,
    SIGNATURE_LEN,
};

/// The only document version this implementation reads and writes.
pub const VERSION: u32 = 1;

/// Largest document [`PeerList::parse`] accepts, in bytes (1 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Largest number of relays [`PeerList::parse`] accepts.
///
/// Both this and [`MAX_DOCUMENT_BYTES`] apply.
pub const MAX_RELAYS: usize = 4096;

/// Largest number of onion keys a relay may list.
pub const MAX_ONION_KEYS: usize = 3;

/// Prefix of the message authorities sign: the signed message is
/// `SIGNATURE_CONTEXT || body_bytes`.
pub const SIGNATURE_CONTEXT: &[u8] = b"shroud-v1 peerlist\0";

/// Default cell size in bytes.
pub const DEFAULT_CELL: u16 = 1024;

/// Default maximum number of hops in a circuit.
pub const DEFAULT_H_MAX: u8 = 8;

/// Smallest allowed cell size.
pub const MIN_CELL: u16 = crate::cell::Layout::min_cell(1) as u16;

/// Largest allowed cell size.
pub const MAX_CELL: u16 = 8192;

/// Cell sizes must be a multiple of this.
pub const CELL_ALIGN: u16 = 16;

/// Largest allowed `h_max`.
pub const MAX_H_MAX: u8 = 8;

/// Fixed part of a setup cell, in bytes.
const SETUP_FIXED: usize = 64;
/// Per-hop part of a setup cell, in bytes.
const SETUP_PER_HOP: usize = 112;
/// Trailer of a setup cell, in bytes.
const SETUP_TRAILER: usize = 16;

/// Relay flags in their canonical order.
const FLAGS: [&str; 1] = ["exit"];

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a set of [`NetworkParams`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamsError {
    /// The cell size is out of range or misaligned.
    #[error("cell size {cell} must be a multiple of 16 between 192 and 8192, and at least 80 + 112 * h-max")]
    CellSize {
        /// The offending cell size.
        cell: u16,
    },
    /// `h_max` is out of range.
    #[error("h-max {h_max} must be between 1 and 8")]
    HMax {
        /// The offending value.
        h_max: u8,
    },
    /// A setup cell for `h_max` hops does not fit in a cell.
    #[error(
        "cell size {cell} is too small for setup cells of {h_max} hops (need at least {need})"
    )]
    SetupDoesNotFit {
        /// The cell size.
        cell: u16,
        /// The hop count.
        h_max: u8,
        /// Smallest cell size that would fit.
        need: usize,
    },
}

/// Everything that can go wrong parsing, signing or verifying a peer list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerListError {
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("peer list is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Size of the document.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The document lists more than [`MAX_RELAYS`] relays.
    #[error("peer list has more than {max} relays (line {line})")]
    TooManyRelays {
        /// Line of the first relay over the limit.
        line: usize,
        /// The limit.
        max: usize,
    },
    /// The document is not a canonical version-1 peer list. Line numbers are
    /// 1-based; for in-memory lists they refer to the canonical encoding.
    #[error("malformed peer list, line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Something that must be unique appears twice (relay identity, relay
    /// id, onion key, signer, or an address/port range).
    #[error("peer list line {line}: duplicate {what}")]
    Duplicate {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// What is duplicated.
        what: String,
    },
    /// The document declares a version other than [`VERSION`].
    #[error("unsupported peer list version {version} (only version 1 is understood)")]
    UnsupportedVersion {
        /// The declared version.
        version: u32,
    },
    /// The document carries no signature at all.
    #[error("peer list is unsigned")]
    Unsigned,
    /// Too few trusted authorities signed the document.
    #[error("peer list has {have} valid signature(s) from trusted authorities, {need} required")]
    UnderThreshold {
        /// Valid signatures from distinct trusted authorities.
        have: usize,
        /// The policy's threshold.
        need: usize,
    },
    /// A trusted authority's signature does not verify: the document was
    /// altered after signing or the signature is forged.
    #[error(
        "signature by trusted authority {signer} does not verify: \
         the peer list was altered or the signature forged"
    )]
    Forged {
        /// The authority whose signature failed.
        signer: IdentityPublic,
    },
    /// `now >= valid_until`.
    #[error("peer list expired: valid until {until}, now is {now}")]
    Expired {
        /// End of validity (exclusive), Unix seconds.
        until: u64,
        /// The time checked.
        now: u64,
    },
    /// `now < valid_after`.
    #[error("peer list is not valid yet: valid after {after}, now is {now}")]
    NotYetValid {
        /// Start of validity, Unix seconds.
        after: u64,
        /// The time checked.
        now: u64,
    },
    /// The serial is lower than that of a list accepted earlier.
    #[error("peer list serial {have} is older than the last accepted serial {last} (rollback)")]
    Rollback {
        /// Serial of this list.
        have: u64,
        /// Last accepted serial.
        last: u64,
    },
    /// The network parameters are unusable.
    #[error("peer list has invalid network parameters: {0}")]
    InvalidParams(#[from] ParamsError),
    /// The [`TrustPolicy`] cannot be satisfied meaningfully.
    #[error("invalid trust policy: {reason}")]
    InvalidPolicy {
        /// What is wrong with the policy.
        reason: &'static str,
    },
}

impl PeerListError {
    /// A short, stable, snake_case name for the error case (for logs and
    /// metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::TooManyRelays { .. } => "too_many_relays",
            Self::Malformed { .. } => "malformed",
            Self::Duplicate { .. } => "duplicate",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::Unsigned => "unsigned",
            Self::UnderThreshold { .. } => "under_threshold",
            Self::Forged { .. } => "forged",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Rollback { .. } => "rollback",
            Self::InvalidParams(_) => "invalid_params",
            Self::InvalidPolicy { .. } => "invalid_policy",
        }
    }
}

// ---------------------------------------------------------------------------
// Data types
// ---------------------------------------------------------------------------

/// Network-wide parameters carried by the peer list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkParams {
    /// Cell size in bytes.
    pub cell: u16,
    /// Maximum number of hops in a circuit.
    pub h_max: u8,
}

impl NetworkParams {
    /// Smallest cell size that fits a setup cell for `h_max` hops:
    /// `64 + 112 * h_max + 16`.
    pub const fn min_cell_for(h_max: u8) -> usize {
        SETUP_FIXED + SETUP_PER_HOP * h_max as usize + SETUP_TRAILER
    }

    /// Checks that `cell` is a multiple of 16 in `MIN_CELL..=8192`, `h_max` is in
    /// `1..=8`, and a setup cell for `h_max` hops fits in a cell. Exactly the
    /// parameters [`crate::cell::Layout::new`] accepts (a property test checks it).
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(MIN_CELL..=MAX_CELL).contains(&self.cell) || !self.cell.is_multiple_of(CELL_ALIGN) {
            return Err(ParamsError::CellSize { cell: self.cell });
        }
        if !(1..=MAX_H_MAX).contains(&self.h_max) {
            return Err(ParamsError::HMax { h_max: self.h_max });
        }
        let need = Self::min_cell_for(self.h_max);
        if usize::from(self.cell) < need {
            return Err(ParamsError::SetupDoesNotFit {
                cell: self.cell,
                h_max: self.h_max,
                need,
            });
        }
        Ok(())
    }

    /// The cell layout for these parameters.
    pub fn layout(&self) -> Result<crate::cell::Layout, ParamsError> {
        self.validate()?;
        crate::cell::Layout::new(usize::from(self.cell), usize::from(self.h_max))
            .map_err(|_| ParamsError::CellSize { cell: self.cell })
    }
}

impl Default for NetworkParams {
    fn default() -> Self {
        Self {
            cell: DEFAULT_CELL,
            h_max: DEFAULT_H_MAX,
        }
    }
}

/// One onion key of a relay and the end of its validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OnionKeyEntry {
    /// The x25519 public key.
    pub key: OnionPublic,
    /// Unix seconds after which the key must no longer be used.
    pub valid_until: u64,
}

/// One relay's entry in the peer list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayDescriptor {
    /// Long-term identity key.
    pub identity: IdentityPublic,
    /// Address the relay listens on.
    pub addr: IpAddr,
    /// Listening ports, `(first, last)` inclusive, `0 < first <= last`.
    pub ports: (u16, u16),
    /// 1 to [`MAX_ONION_KEYS`] onion keys, sorted by `(valid_until, key)`.
    pub onion_keys: Vec<OnionKeyEntry>,
    /// Whether the relay may be used as the last hop (exit).
    pub exit: bool,
    /// Relative selection weight.
    pub weight: u32,
}

impl RelayDescriptor {
    /// The relay's id (derived from its identity key).
    pub fn relay_id(&self) -> RelayId {
        self.identity.relay_id()
    }

    /// Whether `addr` is one of this relay's listening endpoints (IPv4-mapped
    /// IPv6 addresses match their IPv4 form).
    pub fn serves(&self, addr: SocketAddr) -> bool {
        self.addr.to_canonical() == addr.ip().to_canonical()
            && (self.ports.0..=self.ports.1).contains(&addr.port())
    }
}

/// An authority's signature over a peer list body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature {
    /// The signing authority.
    pub signer: IdentityPublic,
    /// ed25519 signature over `SIGNATURE_CONTEXT || body_bytes`.
    pub sig: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature")
            .field("signer", &self.signer)
            .field("sig", &encode_base64(&self.sig))
            .finish()
    }
}

/// Which authorities to trust and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Trusted authority keys.
    pub authorities: Vec<IdentityPublic>,
    /// Number of distinct authorities that must have signed (at least 1).
    pub threshold: usize,
}

impl TrustPolicy {
    /// A policy requiring `threshold` of `authorities`.
    pub fn new(authorities: Vec<IdentityPublic>, threshold: usize) -> Self {
        Self {
            authorities,
            threshold,
        }
    }
}

/// The signed directory of relays. See the [module docs](self) for the
/// format and invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerList {
    /// Document version; always [`VERSION`].
    pub version: u32,
    /// Monotonic serial number; clients refuse to go back to lower serials.
    pub serial: u64,
    /// Start of validity, Unix seconds (inclusive).
    pub valid_after: u64,
    /// End of validity, Unix seconds (exclusive).
    pub valid_until: u64,
    /// Network parameters.
    pub params: NetworkParams,
    /// Relays, sorted by identity.
    pub relays: Vec<RelayDescriptor>,
    /// Authority signatures, sorted by signer.
    pub signatures: Vec<Signature>,
}

impl PeerList {
    /// An empty, unsigned version-1 list.
    pub fn new(serial: u64, valid_after: u64, valid_until: u64, params: NetworkParams) -> Self {
        Self {
            version: VERSION,
            serial,
            valid_after,
            valid_until,
            params,
            relays: Vec::new(),
            signatures: Vec::new(),
        }
    }

    /// The canonical body: the whole document up to (not including) the
    /// signature lines. This is what authorities sign (after
    /// [`SIGNATURE_CONTEXT`]).
    pub fn body_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        self.write_body(&mut out);
        out.into_bytes()
    }

    /// The full document: body, signature lines, `end-peerlist`.
    ///
    /// For a list that satisfies the invariants (for example one returned by
    /// [`Self::parse`]) this is the canonical text; for other lists it is
    /// text that `parse` will reject.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.write_body(&mut out);
        for s in &self.signatures {
            push_line(
                &mut out,
                format_args!("signature {} {}", s.signer, encode_base64(&s.sig)),
            );
        }
        out.push_str("end-peerlist\n");
        out
    }

    fn write_body(&self, out: &mut String) {
        push_line(out, format_args!("shroud-peerlist {}", self.version));
        push_line(out, format_args!("serial {}", self.serial));
        push_line(out, format_args!("valid-after {}", self.valid_after));
        push_line(out, format_args!("valid-until {}", self.valid_until));
        push_line(
            out,
            format_args!(
                "params cell={} h-max={}",
                self.params.cell, self.params.h_max
            ),
        );
        for r in &self.relays {
            push_line(out, format_args!("relay {}", r.identity));
            push_line(out, format_args!(" addr {}", r.addr));
            push_line(out, format_args!(" ports {}-{}", r.ports.0, r.ports.1));
            for k in &r.onion_keys {
                push_line(
                    out,
                    format_args!(" onion {} until={}", k.key, k.valid_until),
                );
            }
            // Flags in the order of `FLAGS`, or `-` when none is set.
            out.push_str(if r.exit {
                " flags exit\n"
            } else {
                " flags -\n"
            });
            push_line(out, format_args!(" weight {}", r.weight));
            out.push_str("end\n");
        }
    }

    /// The message signed by authorities: `SIGNATURE_CONTEXT || body`.
    fn signing_message(&self) -> Vec<u8> {
        let mut msg = SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(&self.body_bytes());
        msg
    }

    /// Parses a canonical peer list. Does not check signatures, validity
    /// times or parameter values; use [`Self::verify`] or
    /// [`Self::parse_and_verify`] for that.
    ///
    /// Never panics. Rejects documents over [`MAX_DOCUMENT_BYTES`], with more
    /// than [`MAX_RELAYS`] relays, or in any non-canonical form.
    pub fn parse(text: &str) -> Result<Self, PeerListError> {
        Parser::parse_document(text)
    }

    /// Puts relays, onion keys and signatures into canonical order.
    ///
    /// Changing the order of relays or onion keys changes the body, so
    /// signatures made before normalizing may no longer verify.
    pub fn normalize(&mut self) {
        for r in &mut self.relays {
            r.onion_keys.sort_by_key(|k| (k.valid_until, k.key));
        }
        self.relays.sort_by_key(|r| r.identity);
        self.signatures.sort_by_key(|s| s.signer);
    }

    /// Checks every invariant of the [module docs](self) (by parsing the
    /// canonical encoding). Error line numbers refer to [`Self::encode`].
    pub fn validate(&self) -> Result<(), PeerListError> {
        let parsed = Self::parse(&self.encode())?;
        debug_assert_eq!(&parsed, self, "encode/parse must round-trip");
        Ok(())
    }

    /// Adds `key`'s signature over the current body, replacing any earlier
    /// signature by the same key; signatures stay sorted by signer.
    ///
    /// Refuses to sign a body that violates the invariants (call
    /// [`Self::normalize`] first when building a list).
    pub fn sign(&mut self, key: &IdentityKey) -> Result<(), PeerListError> {
        let mut body = String::new();
        self.write_body(&mut body);
        // The body followed by `end-peerlist` is an unsigned document; parsing
        // it checks every invariant of the body.
        Self::parse(&format!("{body}end-peerlist\n"))?;

        let mut msg = SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(body.as_bytes());
        let signer = key.public();
        let sig = key.sign(&msg);
        self.signatures.retain(|s| s.signer != signer);
        self.signatures.push(Signature { signer, sig });
        self.signatures.sort_by_key(|s| s.signer);
        Ok(())
    }

    /// Checks that the list may be used at time `now`:
    ///
    /// 1. the list satisfies the invariants of the [module docs](self);
    /// 2. it carries at least one signature ([`PeerListError::Unsigned`]);
    /// 3. every signature by a key in `policy.authorities` verifies
    ///    ([`PeerListError::Forged`] otherwise; signatures by other keys are
    ///    ignored), and at least `policy.threshold` distinct authorities
    ///    signed ([`PeerListError::UnderThreshold`]);
    /// 4. the network parameters are valid;
    /// 5. `valid_after <= now < valid_until`;
    /// 6. `serial >= last_serial` (an equal serial is the same list fetched
    ///    again; a lower one is a [`PeerListError::Rollback`]).
    ///
    /// Authenticity is checked before any claim in the document is reported.
    pub fn verify(
        &self,
        policy: &TrustPolicy,
        now: u64,
        last_serial: Option<u64>,
    ) -> Result<(), PeerListError> {
        self.validate()?;
        self.verify_valid(policy, now, last_serial)
    }

    /// [`Self::parse`] followed by [`Self::verify`].
    pub fn parse_and_verify(
        text: &str,
        policy: &TrustPolicy,
        now: u64,
        last_serial: Option<u64>,
    ) -> Result<Self, PeerListError> {
        let list = Self::parse(text)?;
        list.verify_valid(policy, now, last_serial)?;
        Ok(list)
    }

    /// [`Self::verify`] for a list already known to satisfy the invariants.
    fn verify_valid(
        &self,
        policy: &TrustPolicy,
        now: u64,
        last_serial: Option<u64>,
    ) -> Result<(), PeerListError> {
        if policy.threshold == 0 {
            return Err(PeerListError::InvalidPolicy {
                reason: "threshold must be at least 1",
            });
        }
        if self.signatures.is_empty() {
            return Err(PeerListError::Unsigned);
        }
        let msg = self.signing_message();
        let mut signers = HashSet::new();
        for s in &self.signatures {
            if policy.authorities.contains(&s.signer) {
                s.signer
                    .verify(&msg, &s.sig)
                    .map_err(|_| PeerListError::Forged { signer: s.signer })?;
                signers.insert(s.signer);
            }
        }
        if signers.len() < policy.threshold {
            return Err(PeerListError::UnderThreshold {
                have: signers.len(),
                need: policy.threshold,
            });
        }
        self.params.validate()?;
        if now < self.valid_after {
            return Err(PeerListError::NotYetValid {
                after: self.valid_after,
                now,
            });
        }
        if now >= self.valid_until {
            return Err(PeerListError::Expired {
                until: self.valid_until,
                now,
            });
        }
        if let Some(last) = last_serial {
            if self.serial < last {
                return Err(PeerListError::Rollback {
                    have: self.serial,
                    last,
                });
            }
        }
        Ok(())
    }

    /// The relay with this id, if listed. Linear in the number of relays.
    pub fn relay_by_id(&self, id: &RelayId) -> Option<&RelayDescriptor> {
        self.relays.iter().find(|r| r.relay_id() == *id)
    }

    /// The relay with this identity key, if listed.
    pub fn relay_by_identity(&self, identity: &IdentityPublic) -> Option<&RelayDescriptor> {
        self.relays.iter().find(|r| r.identity == *identity)
    }

    /// The relay listening on `addr` (same IP, port within its range), if
    /// any. IPv4-mapped IPv6 addresses match their IPv4 form.
    pub fn relay_by_addr(&self, addr: SocketAddr) -> Option<&RelayDescriptor> {
        self.relays.iter().find(|r| r.serves(addr))
    }
}

/// Appends formatted text and a newline.
fn push_line(out: &mut String, args: fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = fmt::Write::write_fmt(out, args);
    out.push('\n');
}

// ---------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------

/// Longest excerpt of an offending line quoted in an error message.
const EXCERPT_LEN: usize = 60;

/// Line-by-line cursor over a document.
struct Parser<'a> {
    lines: core::iter::Peekable<core::str::Split<'a, char>>,
    /// 1-based number of the line last returned by `next_line` (0 before).
    line: usize,
}

impl<'a> Parser<'a> {
    fn parse_document(text: &'a str) -> Result<PeerList, PeerListError> {
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(PeerListError::TooLarge {
                size: text.len(),
                max: MAX_DOCUMENT_BYTES,
            });
        }
        check_characters(text)?;
        let Some(body) = text.strip_suffix('\n') else {
            return Err(malformed(
                text.bytes().filter(|b| *b == b'\n').count() + 1,
                "the last line must end with a newline (\"\\n\")",
            ));
        };
        let mut p = Parser {
            lines: body.split('\n').peekable(),
            line: 0,
        };
        let list = p.document()?;
        if p.lines.peek().is_some() {
            return Err(malformed(
                p.line + 1,
                "unexpected content after `end-peerlist`",
            ));
        }
        Ok(list)
    }

    fn next_line(&mut self) -> Result<&'a str, PeerListError> {
        match self.lines.next() {
            Some(l) => {
                self.line += 1;
                Ok(l)
            }
            None => Err(malformed(
                self.line + 1,
                "unexpected end of document (missing `end-peerlist`?)",
            )),
        }
    }

    fn peek_starts_with(&mut self, prefix: &str) -> bool {
        self.lines.peek().is_some_and(|l| l.starts_with(prefix))
    }

    fn err(&self, reason: impl Into<String>) -> PeerListError {
        malformed(self.line, reason)
    }

    /// Reads a line `<keyword> <value>` and returns the value. `shape`
    /// describes the expected line for error messages.
    fn field(&mut self, keyword: &str, shape: &str) -> Result<&'a str, PeerListError> {
        let l = self.next_line()?;
        l.strip_prefix(keyword)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| self.err(format!("expected `{shape}`, found `{}`", excerpt(l))))
    }

    /// Reads a line `<keyword> <number>`.
    fn number_field(&mut self, keyword: &str, max: u64) -> Result<u64, PeerListError> {
        let v = self.field(keyword, &format!("{keyword} <number>"))?;
        self.number(v, keyword, max)
    }

    fn number(&self, text: &str, what: &str, max: u64) -> Result<u64, PeerListError> {
        parse_decimal(text).filter(|n| *n <= max).ok_or_else(|| {
            self.err(format!(
                "{what}: `{}` is not a decimal number in 0..={max} \
                 (no sign, no leading zeros)",
                excerpt(text)
            ))
        })
    }

    fn document(&mut self) -> Result<PeerList, PeerListError> {
        let first = self.next_line()?;
        let version_text = first.strip_prefix("shroud-peerlist ").ok_or_else(|| {
            self.err(format!(
                "expected `shroud-peerlist 1` (is this a Shroud peer list?), found `{}`",
                excerpt(first)
            ))
        })?;
        let version = u32_from(self.number(version_text, "version", u32::MAX.into())?);
        if version != VERSION {
            return Err(PeerListError::UnsupportedVersion { version });
        }

        let serial = self.number_field("serial", u64::MAX)?;
        let valid_after = self.number_field("valid-after", u64::MAX)?;
        let valid_until = self.number_field("valid-until", u64::MAX)?;
        if valid_until <= valid_after {
            return Err(self.err(format!(
                "valid-until {valid_until} must be later than valid-after {valid_after}"
            )));
        }
        let params = self.params()?;

        let mut relays: Vec<RelayDescriptor> = Vec::new();
        let mut relay_ids = HashSet::new();
        // (address, first port, last port, line of the relay)
        let mut endpoints: Vec<(IpAddr, u16, u16, usize)> = Vec::new();
        while self.peek_starts_with("relay ") {
            if relays.len() >= MAX_RELAYS {
                return Err(PeerListError::TooManyRelays {
                    line: self.line + 1,
                    max: MAX_RELAYS,
                });
            }
            let start = self.line + 1;
            let relay = self.relay(relays.last())?;
            if !relay_ids.insert(relay.relay_id()) {
                return Err(PeerListError::Duplicate {
                    line: start,
                    what: format!("relay id {}", relay.relay_id()),
                });
            }
            endpoints.push((relay.addr, relay.ports.0, relay.ports.1, start));
            relays.push(relay);
        }
        check_endpoints(&mut endpoints)?;

        let mut signatures: Vec<Signature> = Vec::new();
        while self.peek_starts_with("signature ") {
            let s = self.signature()?;
            if let Some(prev) = signatures.last() {
                if prev.signer == s.signer {
                    return Err(PeerListError::Duplicate {
                        line: self.line,
                        what: format!("signature by {}", s.signer),
                    });
                }
                if prev.signer > s.signer {
                    return Err(
                        self.err("signatures must be sorted by signer key bytes (ascending)")
                    );
                }
            }
            signatures.push(s);
        }

        let last = self.next_line()?;
        if last != "end-peerlist" {
            let expected = match (relays.is_empty(), signatures.is_empty()) {
                (_, false) => "`signature <signer> <signature>` or `end-peerlist`",
                (true, true) => {
                    "`relay <identity>`, `signature <signer> <signature>` or `end-peerlist`"
                }
                (false, true) => {
                    "`relay <identity>` (after `end`), `signature <signer> <signature>` \
                     or `end-peerlist`"
                }
            };
            return Err(self.err(format!("expected {expected}, found `{}`", excerpt(last))));
        }

        Ok(PeerList {
            version,
            serial,
            valid_after,
            valid_until,
            params,
            relays,
            signatures,
        })
    }

    fn params(&mut self) -> Result<NetworkParams, PeerListError> {
        const SHAPE: &str = "params cell=<number> h-max=<number>";
        let v = self.field("params", SHAPE)?;
        let (cell, h_max) = v
            .split_once(' ')
            .and_then(|(c, h)| Some((c.strip_prefix("cell=")?, h.strip_prefix("h-max=")?)))
            .ok_or_else(|| self.err(format!("expected `{SHAPE}`")))?;
        let cell = u16_from(self.number(cell, "cell", u16::MAX.into())?);
        let h_max = u8_from(self.number(h_max, "h-max", u8::MAX.into())?);
        Ok(NetworkParams { cell, h_max })
    }

    fn relay(&mut self, prev: Option<&RelayDescriptor>) -> Result<RelayDescriptor, PeerListError> {
        let id_text = self.field("relay", "relay <identity>")?;
        let identity = self.identity(id_text, "relay identity")?;
        if let Some(prev) = prev {
            if prev.identity == identity {
                return Err(PeerListError::Duplicate {
                    line: self.line,
                    what: format!("relay identity {identity}"),
                });
            }
            if prev.identity > identity {
                return Err(self.err(format!(
                    "relays must be sorted by identity key bytes (ascending): \
                     {identity} must come before {}",
                    prev.identity
                )));
            }
        }

        let addr = self.addr()?;

        let ports = self.field(" ports", " ports <first>-<last>")?;
        let (first, last) = ports
            .split_once('-')
            .ok_or_else(|| self.err("expected ` ports <first>-<last>`"))?;
        let first = u16_from(self.number(first, "first port", u16::MAX.into())?);
        let last = u16_from(self.number(last, "last port", u16::MAX.into())?);
        if first == 0 || first > last {
            return Err(self.err(format!(
                "port range {first}-{last} must satisfy 0 < first <= last"
            )));
        }

        let mut onion_keys: Vec<OnionKeyEntry> = Vec::new();
        while self.peek_starts_with(" onion ") {
            if onion_keys.len() >= MAX_ONION_KEYS {
                return Err(malformed(
                    self.line + 1,
                    format!("a relay may list at most {MAX_ONION_KEYS} onion keys"),
                ));
            }
            let entry = self.onion()?;
            if onion_keys.iter().any(|k| k.key == entry.key) {
                return Err(PeerListError::Duplicate {
                    line: self.line,
                    what: format!("onion key {}", entry.key),
                });
            }
            if let Some(prev) = onion_keys.last() {
                if (prev.valid_until, prev.key) > (entry.valid_until, entry.key) {
                    return Err(self
                        .err("onion keys must be sorted by `until` (then key bytes), ascending"));
                }
            }
            onion_keys.push(entry);
        }
        if onion_keys.is_empty() {
            return Err(malformed(
                self.line + 1,
                "expected at least one ` onion <key> until=<time>` line",
            ));
        }

        let exit = self.flags()?;
        let weight = u32_from(self.number_field(" weight", u32::MAX.into())?);
        let end = self.next_line()?;
        if end != "end" {
            return Err(self.err(format!(
                "expected `end` closing the relay, found `{}`",
                excerpt(end)
            )));
        }
        Ok(RelayDescriptor {
            identity,
            addr,
            ports: (first, last),
            onion_keys,
            exit,
            weight,
        })
    }

    fn addr(&mut self) -> Result<IpAddr, PeerListError> {
        let text = self.field(" addr", " addr <ip>")?;
        let addr: IpAddr = text
            .parse()
            .map_err(|_| self.err(format!("`{}` is not an IP address", excerpt(text))))?;
        if addr.to_string() != text {
            return Err(self.err(format!(
                "address `{}` is not in canonical form (write `{addr}`)",
                excerpt(text)
            )));
        }
        let refused = match addr {
            IpAddr::V4(a) => {
                if a.is_unspecified() {
                    Some("unspecified")
                } else if a.is_multicast() {
                    Some("multicast")
                } else if a.is_broadcast() {
                    Some("broadcast")
                } else {
                    None
                }
            }
            IpAddr::V6(a) => {
                if a.is_unspecified() {
                    Some("unspecified")
                } else if a.is_multicast() {
                    Some("multicast")
                } else if a.to_ipv4_mapped().is_some() {
                    Some("IPv4-mapped (write the IPv4 form)")
                } else {
                    None
                }
            }
        };
        match refused {
            Some(why) => Err(self.err(format!("relay address {addr} is {why}"))),
            None => Ok(addr),
        }
    }

    fn onion(&mut self) -> Result<OnionKeyEntry, PeerListError> {
        const SHAPE: &str = " onion <key> until=<time>";
        let v = self.field(" onion", SHAPE)?;
        let (key, until) = v
            .split_once(' ')
            .and_then(|(k, u)| Some((k, u.strip_prefix("until=")?)))
            .ok_or_else(|| self.err(format!("expected `{SHAPE}`")))?;
        let key =
            decode_base64_exact::<KEY_LEN>(key).map_err(|e| self.err(format!("onion key: {e}")))?;
        let valid_until = self.number(until, "until", u64::MAX)?;
        Ok(OnionKeyEntry {
            key: OnionPublic(key),
            valid_until,
        })
    }

    fn flags(&mut self) -> Result<bool, PeerListError> {
        let v = self.field(" flags", " flags <flag>... | -")?;
        if v == "-" {
            return Ok(false);
        }
        let mut next_index = 0;
        let mut exit = false;
        for token in v.split(' ') {
            let Some(index) = FLAGS.iter().position(|f| *f == token) else {
                return Err(self.err(format!(
                    "unknown flag `{}` (known flags: {}; write `-` for none)",
                    excerpt(token),
                    FLAGS.join(" ")
                )));
            };
            if index < next_index {
                return Err(self.err(format!(
                    "flags must appear once each, in the order: {}",
                    FLAGS.join(" ")
                )));
            }
            next_index = index + 1;
            if token == "exit" {
                exit = true;
            }
        }
        Ok(exit)
    }

    fn signature(&mut self) -> Result<Signature, PeerListError> {
        const SHAPE: &str = "signature <signer> <signature>";
        let v = self.field("signature", SHAPE)?;
        let (signer, sig) = v
            .split_once(' ')
            .ok_or_else(|| self.err(format!("expected `{SHAPE}`")))?;
        let signer = self.identity(signer, "signer")?;
        let sig = decode_base64_exact::<SIGNATURE_LEN>(sig)
            .map_err(|e| self.err(format!("signature: {e}")))?;
        Ok(Signature { signer, sig })
    }

    fn identity(&self, text: &str, what: &str) -> Result<IdentityPublic, PeerListError> {
        decode_base64_exact::<KEY_LEN>(text)
            .and_then(|b| IdentityPublic::from_bytes(&b))
            .map_err(|e| self.err(format!("{what}: {e}")))
    }
}

/// Rejects any byte other than printable ASCII and `\n`.
fn check_characters(text: &str) -> Result<(), PeerListError> {
    let Some(pos) = text
        .bytes()
        .position(|b| b != b'\n' && !(b' '..=b'~').contains(&b))
    else {
        return Ok(());
    };
    let line = text
        .as_bytes()
        .get(..pos)
        .map_or(0, |before| before.iter().filter(|b| **b == b'\n').count())
        + 1;
    let reason = match text.as_bytes().get(pos).copied().unwrap_or(0) {
        b'\r' => "carriage return found: lines must end with \"\\n\" only (no CRLF)".to_owned(),
        b'\t' => "tab character found: fields are separated by single spaces".to_owned(),
        b if b.is_ascii() => format!("control character 0x{b:02x} found"),
        _ => "non-ASCII character found: peer lists are ASCII only".to_owned(),
    };
    Err(malformed(line, reason))
}

/// Rejects two relays whose port ranges overlap on the same address.
fn check_endpoints(endpoints: &mut [(IpAddr, u16, u16, usize)]) -> Result<(), PeerListError> {
    endpoints.sort_unstable();
    // Sorted by (address, first port): a range overlaps an earlier one on the
    // same address iff it starts at or before the previous range's end.
    let mut reach: Option<(IpAddr, u16, usize)> = None;
    for &(addr, first, last, line) in endpoints.iter() {
        match reach {
            Some((a, max_last, other)) if a == addr && first <= max_last => {
                return Err(PeerListError::Duplicate {
                    line: line.max(other),
                    what: format!(
                        "endpoint: address {addr} ports {first}-{last} overlap the relay at line {}",
                        line.min(other)
                    ),
                });
            }
            _ => reach = Some((addr, last, line)),
        }
    }
    Ok(())
}

/// Parses a canonical decimal number: ASCII digits only, no sign, no
/// leading zeros (except `0` itself), fits in a `u64`.
fn parse_decimal(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || (bytes.len() > 1 && bytes.first() == Some(&b'0')) {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

// Narrowing helpers for numbers already range-checked by `Parser::number`;
// they saturate rather than panic should that ever not hold.
fn u32_from(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
fn u16_from(n: u64) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}
fn u8_from(n: u64) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn malformed(line: usize, reason: impl Into<String>) -> PeerListError {
    PeerListError::Malformed {
        line,
        reason: reason.into(),
    }
}

/// A short excerpt of (printable ASCII) input for error messages.
fn excerpt(text: &str) -> String {
    match text.get(..EXCERPT_LEN) {
        Some(head) if text.len() > EXCERPT_LEN => format!("{head}..."),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert_eq!(NetworkParams::default().validate(), Ok(()));
        assert_eq!(NetworkParams::min_cell_for(8), 976);
        let p = |cell, h_max| NetworkParams { cell, h_max }.validate();
        assert_eq!(p(768, 6), Ok(()));
        assert_eq!(p(8192, 8), Ok(()));
        assert_eq!(p(752, 1), Ok(()));
        assert_eq!(p(176, 1), Err(ParamsError::CellSize { cell: 176 }));
        assert_eq!(p(512, 3), Ok(()));
        assert_eq!(p(8208, 1), Err(ParamsError::CellSize { cell: 8208 }));
        assert_eq!(p(1000, 1), Err(ParamsError::CellSize { cell: 1000 }));
        assert_eq!(p(1024, 0), Err(ParamsError::HMax { h_max: 0 }));
        assert_eq!(p(1024, 9), Err(ParamsError::HMax { h_max: 9 }));
        assert_eq!(
            p(768, 7),
            Err(ParamsError::SetupDoesNotFit {
                cell: 768,
                h_max: 7,
                need: 864
            })
        );
        assert_eq!(p(864, 7), Ok(()));
    }

    #[test]
    fn decimal_numbers_are_canonical() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("42"), Some(42));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "042",
            "+1",
            "-1",
            "1 ",
            " 1",
            "1e3",
            "18446744073709551616",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn overlapping_endpoints_are_duplicates() {
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let mut ok = vec![(a, 1, 10, 6), (a, 11, 20, 13), (b, 5, 5, 20)];
        assert_eq!(check_endpoints(&mut ok), Ok(()));
        let mut nested = vec![(a, 1, 100, 6), (a, 20, 30, 13), (a, 50, 60, 20)];
        assert!(matches!(
            check_endpoints(&mut nested),
            Err(PeerListError::Duplicate { line: 13, .. })
        ));
        let mut touching = vec![(a, 1, 10, 6), (a, 10, 20, 13)];
        assert!(check_endpoints(&mut touching).is_err());
    }

    #[test]
    fn character_errors_name_the_line() {
        let e = PeerList::parse("shroud-peerlist 1\r\n").expect_err("CR");
        assert_eq!(e.kind(), "malformed");
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(e.to_string().contains("CRLF"), "{e}");
        let e = PeerList::parse("a\nb\n\u{e9}\n").expect_err("non-ascii");
        assert!(matches!(e, PeerListError::Malformed { line: 3, .. }), "{e}");
        let e = PeerList::parse("").expect_err("empty");
        assert!(matches!(e, PeerListError::Malformed { line: 1, .. }), "{e}");
    }

    #[test]
    fn unsupported_version_is_reported() {
        let e = PeerList::parse("shroud-peerlist 2\n").expect_err("v2");
        assert_eq!(e, PeerListError::UnsupportedVersion { version: 2 });
        assert_eq!(e.kind(), "unsupported_version");
    }

    #[test]
    fn too_large_is_checked_first() {
        let big = "x".repeat(MAX_DOCUMENT_BYTES + 1);
        assert_eq!(
            PeerList::parse(&big),
            Err(PeerListError::TooLarge {
                size: MAX_DOCUMENT_BYTES + 1,
                max: MAX_DOCUMENT_BYTES
            })
        );
    }
}
