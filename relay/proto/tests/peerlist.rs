//! The signed peer list: canonical encoding, signatures, trust policy,
//! validity window, rollback protection, and robustness of the parser.
//!
//! Fixtures live in `testdata/peerlist/`; they are written by the ignored
//! test `write_fixtures` (`cargo test -p shroud-proto --test peerlist --
//! --ignored write_fixtures`) and checked by `fixture_known_answer`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use proptest::prelude::*;
use shroud_proto::keys::{IdentityKey, IdentityPublic, OnionPublic, OnionSecret, RelayId};
use shroud_proto::peerlist::{
    NetworkParams, OnionKeyEntry, PeerList, PeerListError, RelayDescriptor, TrustPolicy,
    MAX_DOCUMENT_BYTES, MAX_RELAYS,
};

const VALID_AFTER: u64 = 1_764_000_000;
const VALID_UNTIL: u64 = 1_764_086_400;
/// Fixed "now" for the known-answer check: inside the validity window.
const NOW: u64 = 1_764_043_200;

/// Authority keys: three trusted authorities and one unknown signer. Seeds are
/// fixed so documents (and ed25519 signatures) are deterministic.
fn authority(n: u8) -> IdentityKey {
    IdentityKey::from_bytes(&[0xa0 + n; 32])
}

fn outsider() -> IdentityKey {
    IdentityKey::from_bytes(&[0x5e; 32])
}

fn policy(threshold: usize) -> TrustPolicy {
    TrustPolicy::new(
        vec![
            authority(1).public(),
            authority(2).public(),
            authority(3).public(),
        ],
        threshold,
    )
}

fn onion(seed: u8, valid_until: u64) -> OnionKeyEntry {
    OnionKeyEntry {
        key: OnionSecret::from_bytes(&[seed; 32]).public(),
        valid_until,
    }
}

fn relay(seed: u8, addr: &str, ports: (u16, u16), exit: bool, weight: u32) -> RelayDescriptor {
    RelayDescriptor {
        identity: IdentityKey::from_bytes(&[seed; 32]).public(),
        addr: addr.parse().expect("test address"),
        ports,
        onion_keys: vec![onion(seed.wrapping_add(100), VALID_UNTIL + 3600)],
        exit,
        weight,
    }
}

/// An unsigned, normalized example list with IPv4 and IPv6 relays, exit and
/// non-exit relays, and a relay with two onion keys.
fn example_unsigned() -> PeerList {
    let mut list = PeerList::new(42, VALID_AFTER, VALID_UNTIL, NetworkParams::default());
    list.relays
        .push(relay(1, "127.0.0.2", (9000, 9001), true, 100));
    list.relays
        .push(relay(2, "127.0.0.3", (9000, 9000), false, 50));
    let mut r3 = relay(3, "2001:db8::7", (443, 443), true, 25);
    r3.onion_keys.push(onion(200, VALID_UNTIL + 7200));
    r3.onion_keys.push(onion(201, VALID_UNTIL - 3600));
    list.relays.push(r3);
    list.normalize();
    list
}

/// The example signed by authorities 1 and 2 (of 3).
fn example_signed() -> PeerList {
    let mut list = example_unsigned();
    list.sign(&authority(1)).expect("sign 1");
    list.sign(&authority(2)).expect("sign 2");
    list
}

fn example_text() -> String {
    example_signed().encode()
}

fn testdata_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/peerlist")
}

fn kind(r: Result<impl Sized, PeerListError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

/// Byte range of the body (everything before the first `signature` line).
fn body_len(text: &str) -> usize {
    text.find("\nsignature ").map_or(text.len(), |i| i + 1)
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

#[test]
fn body_matches_documented_format() {
    let mut list = PeerList::new(42, VALID_AFTER, VALID_UNTIL, NetworkParams::default());
    let r = relay(1, "127.0.0.2", (9000, 9001), true, 100);
    let (id, key) = (r.identity, r.onion_keys[0].key);
    list.relays.push(r);
    let expected = format!(
        "shroud-peerlist 1\n\
         serial 42\n\
         valid-after 1764000000\n\
         valid-until 1764086400\n\
         params cell=1024 h-max=8\n\
         relay {id}\n \
         addr 127.0.0.2\n \
         ports 9000-9001\n \
         onion {key} until=1764090000\n \
         flags exit\n \
         weight 100\n\
         end\n"
    );
    assert_eq!(
        String::from_utf8(list.body_bytes()).expect("ascii"),
        expected
    );
    assert_eq!(list.encode(), format!("{expected}end-peerlist\n"));

    list.sign(&authority(1)).expect("sign");
    let text = list.encode();
    let sig_line = text.lines().nth(12).expect("signature line");
    assert!(sig_line.starts_with(&format!("signature {} ", authority(1).public())));
    assert_eq!(sig_line.len(), "signature ".len() + 44 + 1 + 88);
    assert!(text.ends_with("\nend-peerlist\n"));
}

#[test]
fn non_exit_relay_has_dash_flags_and_ipv6_is_canonical() {
    let text = example_text();
    assert!(text.contains("\n flags -\n"));
    assert!(text.contains("\n addr 2001:db8::7\n"));
}

#[test]
fn round_trip_is_byte_identical() {
    let list = example_signed();
    let text = list.encode();
    let parsed = PeerList::parse(&text).expect("parse");
    assert_eq!(parsed, list);
    assert_eq!(parsed.encode(), text);
    assert_eq!(parsed.body_bytes(), list.body_bytes());
    // Unsigned documents parse too (authorities pass them around to sign).
    let unsigned = example_unsigned().encode();
    assert_eq!(
        PeerList::parse(&unsigned).expect("unsigned").encode(),
        unsigned
    );
}

#[test]
fn normalize_orders_relays_onion_keys_and_signatures() {
    let list = example_signed();
    let ids: Vec<[u8; 32]> = list.relays.iter().map(|r| r.identity.to_bytes()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let r3 = list
        .relay_by_identity(&IdentityKey::from_bytes(&[3; 32]).public())
        .expect("relay 3");
    let untils: Vec<u64> = r3.onion_keys.iter().map(|k| k.valid_until).collect();
    assert_eq!(
        untils,
        [VALID_UNTIL - 3600, VALID_UNTIL + 3600, VALID_UNTIL + 7200]
    );
    assert!(list.signatures[0].signer < list.signatures[1].signer);
}

// ---------------------------------------------------------------------------
// Signing and verification
// ---------------------------------------------------------------------------

#[test]
fn two_of_three_authorities_verify() {
    let text = example_text();
    let list = PeerList::parse_and_verify(&text, &policy(2), NOW, None).expect("2-of-3");
    assert_eq!(list.serial, 42);
    assert_eq!(list.signatures.len(), 2);
    assert_eq!(list.verify(&policy(1), NOW, Some(41)), Ok(()));
    assert_eq!(
        list.verify(&policy(3), NOW, None),
        Err(PeerListError::UnderThreshold { have: 2, need: 3 })
    );
}

#[test]
fn third_signature_satisfies_three_of_three() {
    let mut list = example_signed();
    list.sign(&authority(3)).expect("sign 3");
    assert_eq!(list.signatures.len(), 3);
    assert_eq!(list.verify(&policy(3), NOW, None), Ok(()));
    // Re-signing replaces rather than duplicates.
    list.sign(&authority(3)).expect("sign 3 again");
    assert_eq!(list.signatures.len(), 3);
    assert_eq!(list.validate(), Ok(()));
}

#[test]
fn tampered_body_is_forged() {
    let text = example_text();
    assert!(text.contains("\n weight 100\n"));
    let tampered = text.replacen("\n weight 100\n", "\n weight 101\n", 1);
    let list = PeerList::parse(&tampered).expect("still well-formed");
    let first_signer = list.signatures[0].signer;
    assert_eq!(
        list.verify(&policy(2), NOW, None),
        Err(PeerListError::Forged {
            signer: first_signer
        })
    );
    // Forged is reported even when the policy only needs one signature.
    assert_eq!(kind(list.verify(&policy(1), NOW, None)), "forged");
}

#[test]
fn every_single_byte_change_of_the_body_is_rejected() {
    let text = example_text();
    let body = body_len(&text);
    let mut reparsed = 0;
    for i in 0..body {
        let b = text.as_bytes()[i];
        let replacement = match b {
            b'0'..=b'8' | b'a'..=b'y' | b'A'..=b'Y' => b + 1,
            b'9' => b'0',
            b'z' => b'a',
            b'Z' => b'A',
            b'+' => b'/',
            b'/' => b'+',
            _ => b'x',
        };
        let mut bytes = text.clone().into_bytes();
        bytes[i] = replacement;
        let tampered = String::from_utf8(bytes).expect("ascii");
        match PeerList::parse(&tampered) {
            Err(_) => {}
            Ok(list) => {
                reparsed += 1;
                let verdict = list.verify(&policy(2), NOW, None);
                assert!(
                    matches!(verdict, Err(PeerListError::Forged { .. })),
                    "byte {i} changed to {:?}: {verdict:?}",
                    replacement as char
                );
            }
        }
    }
    assert!(
        reparsed > 50,
        "the test should exercise signature checks, got {reparsed}"
    );
}

#[test]
fn tampered_signature_is_forged() {
    let text = example_text();
    let mut list = PeerList::parse(&text).expect("parse");
    list.signatures[1].sig[10] ^= 0x01;
    let signer = list.signatures[1].signer;
    assert_eq!(
        PeerList::parse_and_verify(&list.encode(), &policy(1), NOW, None).map(|_| ()),
        Err(PeerListError::Forged { signer })
    );
}

#[test]
fn signature_reattributed_to_unknown_key_is_under_threshold() {
    let mut list = example_signed();
    list.signatures[0].signer = outsider().public();
    list.normalize();
    assert_eq!(
        list.verify(&policy(2), NOW, None),
        Err(PeerListError::UnderThreshold { have: 1, need: 2 })
    );
}

#[test]
fn under_threshold() {
    let mut list = example_unsigned();
    list.sign(&authority(3)).expect("sign");
    let err = PeerList::parse_and_verify(&list.encode(), &policy(2), NOW, None)
        .expect_err("one signature of two needed");
    assert_eq!(err, PeerListError::UnderThreshold { have: 1, need: 2 });
    assert_eq!(err.kind(), "under_threshold");
    assert_eq!(
        err.to_string(),
        "peer list has 1 valid signature(s) from trusted authorities, 2 required"
    );
}

#[test]
fn unknown_authority_only_signatures_are_under_threshold() {
    let mut list = example_unsigned();
    list.sign(&outsider()).expect("sign");
    list.sign(&IdentityKey::from_bytes(&[0x77; 32]))
        .expect("sign");
    assert_eq!(
        PeerList::parse_and_verify(&list.encode(), &policy(1), NOW, None).map(|_| ()),
        Err(PeerListError::UnderThreshold { have: 0, need: 1 })
    );
}

#[test]
fn unsigned_list_is_refused() {
    let list = example_unsigned();
    assert_eq!(
        list.verify(&policy(1), NOW, None),
        Err(PeerListError::Unsigned)
    );
    // Stripping the signature lines of a signed document gives the same.
    let text = example_text();
    let stripped = format!("{}end-peerlist\n", &text[..body_len(&text)]);
    assert_eq!(
        PeerList::parse_and_verify(&stripped, &policy(1), NOW, None).map(|_| ()),
        Err(PeerListError::Unsigned)
    );
}

#[test]
fn zero_threshold_policy_is_refused() {
    let list = example_signed();
    assert_eq!(kind(list.verify(&policy(0), NOW, None)), "invalid_policy");
}

#[test]
fn expired() {
    let list = example_signed();
    assert_eq!(list.verify(&policy(2), VALID_UNTIL - 1, None), Ok(()));
    let err = list
        .verify(&policy(2), VALID_UNTIL, None)
        .expect_err("valid-until is exclusive");
    assert_eq!(
        err,
        PeerListError::Expired {
            until: VALID_UNTIL,
            now: VALID_UNTIL
        }
    );
    assert_eq!(err.kind(), "expired");
    assert_eq!(kind(list.verify(&policy(2), u64::MAX, None)), "expired");
}

#[test]
fn not_yet_valid() {
    let list = example_signed();
    assert_eq!(list.verify(&policy(2), VALID_AFTER, None), Ok(()));
    assert_eq!(
        list.verify(&policy(2), VALID_AFTER - 1, None),
        Err(PeerListError::NotYetValid {
            after: VALID_AFTER,
            now: VALID_AFTER - 1
        })
    );
    assert_eq!(kind(list.verify(&policy(2), 0, None)), "not_yet_valid");
}

#[test]
fn rolled_back_serial_is_refused() {
    let list = example_signed();
    assert_eq!(
        list.verify(&policy(2), NOW, Some(43)),
        Err(PeerListError::Rollback { have: 42, last: 43 })
    );
    // The same list fetched again, or a newer one, is fine.
    assert_eq!(list.verify(&policy(2), NOW, Some(42)), Ok(()));
    assert_eq!(list.verify(&policy(2), NOW, Some(0)), Ok(()));
}

#[test]
fn invalid_params_are_refused_after_authentication() {
    let mut list = example_unsigned();
    list.params = NetworkParams {
        cell: 768,
        h_max: 8,
    };
    list.sign(&authority(1)).expect("sign");
    list.sign(&authority(2)).expect("sign");
    let text = list.encode();
    assert!(text.contains("\nparams cell=768 h-max=8\n"));
    let err = PeerList::parse_and_verify(&text, &policy(2), NOW, None).expect_err("params");
    assert_eq!(err.kind(), "invalid_params");
    assert!(err.to_string().contains("768"), "{err}");
    // An unauthenticated document reports the signature problem first.
    let unsigned_bad = PeerList::parse(&text).expect("parse");
    assert_eq!(
        unsigned_bad.verify(&policy(3), NOW, None),
        Err(PeerListError::UnderThreshold { have: 2, need: 3 })
    );
}

#[test]
fn sign_refuses_non_canonical_lists_until_normalized() {
    let mut list = example_unsigned();
    list.relays.reverse();
    let err = list.sign(&authority(1)).expect_err("unsorted");
    assert_eq!(err.kind(), "malformed");
    assert!(err.to_string().contains("sorted"), "{err}");
    list.normalize();
    list.sign(&authority(1)).expect("sorted now");

    let mut dup = example_unsigned();
    let first = dup.relays[0].clone();
    dup.relays.push(first);
    dup.normalize();
    assert_eq!(kind(dup.sign(&authority(1))), "duplicate");

    let mut no_keys = example_unsigned();
    no_keys.relays[0].onion_keys.clear();
    assert_eq!(kind(no_keys.sign(&authority(1))), "malformed");
}

#[test]
fn verify_checks_in_memory_invariants() {
    let mut list = example_signed();
    list.relays.swap(0, 1);
    assert_eq!(kind(list.verify(&policy(2), NOW, None)), "malformed");
}

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

#[test]
fn truncated_documents_never_verify() {
    let text = example_text();
    for end in 0..text.len() {
        let prefix = &text[..end];
        if let Ok(list) = PeerList::parse(prefix) {
            assert!(
                list.verify(&policy(1), NOW, None).is_err(),
                "prefix of {end} bytes verified"
            );
        }
    }
    // In fact no strict prefix is even a well-formed document.
    assert!((0..text.len()).all(|end| PeerList::parse(&text[..end]).is_err()));
}

/// Applies `edit` to the example text, checks it changed something, and
/// returns the parse result's kind.
fn edited(edit: impl FnOnce(&str) -> String) -> &'static str {
    let text = example_text();
    let changed = edit(&text);
    assert_ne!(changed, text, "the edit must change the document");
    kind(PeerList::parse(&changed))
}

/// Text of the relay blocks, each from `relay ` to `end\n` inclusive.
fn relay_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("\nrelay ") {
        let after = &rest[start + 1..];
        let end = after.find("\nend\n").expect("relay end") + "\nend\n".len();
        blocks.push(after[..end].to_owned());
        rest = &after[end - 1..];
    }
    blocks
}

#[test]
fn non_canonical_variations_are_rejected() {
    let crlf = edited(|t| t.replace('\n', "\r\n"));
    assert_eq!(crlf, "malformed");

    let blocks = relay_blocks(&example_text());
    assert_eq!(blocks.len(), 3);
    let reordered = edited(|t| {
        t.replacen(&blocks[0], "@", 1)
            .replacen(&blocks[1], &blocks[0], 1)
            .replacen('@', &blocks[1], 1)
    });
    assert_eq!(reordered, "malformed");
    let duplicated = edited(|t| t.replacen(&blocks[1], &format!("{}{}", blocks[1], blocks[1]), 1));
    assert_eq!(duplicated, "duplicate");

    // (what, replace this, with this): each makes the document non-canonical.
    let replacements: &[(&str, &str, &str)] = &[
        ("extra space", "serial 42", "serial  42"),
        ("trailing space", "weight 100\n", "weight 100 \n"),
        ("double indent", "\n addr", "\n  addr"),
        ("tab", "serial 42", "serial\t42"),
        ("leading zero", "serial 42", "serial 042"),
        ("plus sign", "serial 42", "serial +42"),
        ("non-ascii digit", "serial 42", "serial 4\u{0662}"),
        ("unknown keyword", "\n flags", "\n nickname bob\n flags"),
        ("unknown flag", " flags exit", " flags exit fast"),
        ("repeated flag", " flags exit", " flags exit exit"),
        ("empty flags", " flags -", " flags "),
        ("missing weight", " weight 100\n", ""),
        ("missing params", "params cell=1024 h-max=8\n", ""),
        (
            "swapped header lines",
            "serial 42\nvalid-after 1764000000",
            "valid-after 1764000000\nserial 42",
        ),
        (
            "swapped relay fields",
            " addr 127.0.0.2\n ports 9000-9001",
            " ports 9000-9001\n addr 127.0.0.2",
        ),
        ("non-canonical ipv6", "2001:db8::7", "2001:db8:0:0:0:0:0:7"),
        ("uppercase ipv6", "2001:db8::7", "2001:DB8::7"),
        ("ipv4-mapped", "addr 127.0.0.2", "addr ::ffff:127.0.0.2"),
        ("unspecified addr", "addr 127.0.0.2", "addr 0.0.0.0"),
        ("port zero", "ports 9000-9001", "ports 0-9001"),
        ("reversed ports", "ports 9000-9001", "ports 9001-9000"),
        ("single port shorthand", "ports 9000-9000", "ports 9000"),
        ("overlapping endpoint", "addr 127.0.0.3", "addr 127.0.0.2"),
        ("empty line", "\nend\n", "\nend\n\n"),
        ("missing end-peerlist", "end-peerlist\n", ""),
        ("missing relay end", "\nend\n", "\n"),
        ("unpadded key", "=\n addr", "\n addr"),
        (
            "empty window",
            "valid-until 1764086400",
            "valid-until 1764000000",
        ),
        ("version 2", "shroud-peerlist 1", "shroud-peerlist 2"),
        ("not a peer list", "shroud-peerlist 1", "shroud-peerlist-v1"),
    ];
    for &(name, from, to) in replacements {
        let result = edited(|t| t.replacen(from, to, 1));
        assert_ne!(result, "ok", "{name} was accepted");
    }
    let missing_final_newline = edited(|t| t.trim_end_matches('\n').to_owned());
    assert_eq!(missing_final_newline, "malformed");
    for (name, suffix) in [
        ("trailing garbage", "x\n"),
        ("second end", "end-peerlist\n"),
    ] {
        assert_ne!(
            edited(|t| format!("{t}{suffix}")),
            "ok",
            "{name} was accepted"
        );
    }
    assert_ne!(
        edited(|t| format!("# comment\n{t}")),
        "ok",
        "comment accepted"
    );
}

#[test]
fn signature_order_and_uniqueness_are_canonical() {
    let text = example_text();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    let (s1, s2) = (lines[n - 3], lines[n - 2]);
    assert!(s1.starts_with("signature ") && s2.starts_with("signature "));
    let swapped = text.replacen(&format!("{s1}\n{s2}\n"), &format!("{s2}\n{s1}\n"), 1);
    assert_eq!(kind(PeerList::parse(&swapped)), "malformed");
    let doubled = text.replacen(&format!("{s1}\n"), &format!("{s1}\n{s1}\n"), 1);
    assert_eq!(kind(PeerList::parse(&doubled)), "duplicate");
    let extra_space = text.replacen(s1, &s1.replacen(' ', "  ", 1), 1);
    assert_eq!(kind(PeerList::parse(&extra_space)), "malformed");
}

#[test]
fn onion_key_rules() {
    // Out of order.
    let mut list = example_unsigned();
    list.relays[0]
        .onion_keys
        .insert(0, onion(250, VALID_UNTIL + 99_999));
    assert_eq!(kind(list.validate()), "malformed");
    list.normalize();
    assert_eq!(kind(list.validate()), "ok");
    // Same key twice, even with different validity.
    let mut list = example_unsigned();
    let again = OnionKeyEntry {
        valid_until: VALID_UNTIL + 99_999,
        ..list.relays[0].onion_keys[0]
    };
    list.relays[0].onion_keys.push(again);
    assert_eq!(kind(list.validate()), "duplicate");
    // At most three.
    let mut list = example_unsigned();
    for i in 0..3 {
        list.relays[0]
            .onion_keys
            .push(onion(240 + i, VALID_UNTIL + 10 * u64::from(i)));
    }
    list.normalize();
    assert_eq!(list.relays[0].onion_keys.len(), 4);
    assert_eq!(kind(list.validate()), "malformed");
}

#[test]
fn size_limits_are_enforced() {
    let text = example_text();
    let padded = format!("{text}{}", " ".repeat(MAX_DOCUMENT_BYTES));
    assert_eq!(
        PeerList::parse(&padded),
        Err(PeerListError::TooLarge {
            size: padded.len(),
            max: MAX_DOCUMENT_BYTES
        })
    );

    let mut list = PeerList::new(1, VALID_AFTER, VALID_UNTIL, NetworkParams::default());
    for i in 0..=MAX_RELAYS {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let [_, _, hi, lo] = u32::try_from(i).expect("small").to_be_bytes();
        list.relays.push(RelayDescriptor {
            identity: IdentityKey::from_bytes(&seed).public(),
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, hi, lo)),
            ports: (1, 1),
            onion_keys: vec![OnionKeyEntry {
                key: OnionPublic([7; 32]),
                valid_until: VALID_UNTIL,
            }],
            exit: false,
            weight: 1,
        });
    }
    list.normalize();
    let text = list.encode();
    assert!(
        text.len() <= MAX_DOCUMENT_BYTES,
        "only the relay limit applies"
    );
    assert!(matches!(
        PeerList::parse(&text),
        Err(PeerListError::TooManyRelays {
            max: MAX_RELAYS,
            ..
        })
    ));
    list.relays.pop();
    assert_eq!(list.relays.len(), MAX_RELAYS);
    assert_eq!(list.validate(), Ok(()));
}

#[test]
fn errors_have_clear_messages() {
    let text = example_text();
    let err = PeerList::parse(&text.replacen("serial 42", "serial 042", 1)).expect_err("zero");
    assert_eq!(err.kind(), "malformed");
    assert_eq!(
        err.to_string(),
        "malformed peer list, line 2: serial: `042` is not a decimal number in \
         0..=18446744073709551615 (no sign, no leading zeros)"
    );
    let err = PeerList::parse(&text.replacen(" flags exit", " flags fast", 1)).expect_err("flag");
    assert!(err.to_string().contains("unknown flag `fast`"), "{err}");
    let err = PeerList::parse(&text.replace('\n', "\r\n")).expect_err("crlf");
    assert!(err.to_string().contains("line 1"), "{err}");
    assert!(err.to_string().contains("CRLF"), "{err}");
    assert_eq!(
        PeerListError::Rollback { have: 1, last: 2 }.to_string(),
        "peer list serial 1 is older than the last accepted serial 2 (rollback)"
    );
}

// ---------------------------------------------------------------------------
// Lookups
// ---------------------------------------------------------------------------

#[test]
fn lookups_by_id_identity_and_address() {
    let list = example_signed();
    let r1 = IdentityKey::from_bytes(&[1; 32]).public();
    let found = list.relay_by_id(&r1.relay_id()).expect("by id");
    assert_eq!(found.identity, r1);
    assert_eq!(found.relay_id(), r1.relay_id());
    assert_eq!(list.relay_by_identity(&r1).map(|r| r.identity), Some(r1));
    assert!(list.relay_by_id(&RelayId([0; 16])).is_none());

    let at = |s: &str| s.parse::<SocketAddr>().expect("socket addr");
    assert_eq!(
        list.relay_by_addr(at("127.0.0.2:9000")).map(|r| r.identity),
        Some(r1)
    );
    assert_eq!(
        list.relay_by_addr(at("127.0.0.2:9001")).map(|r| r.identity),
        Some(r1)
    );
    assert!(list.relay_by_addr(at("127.0.0.2:9002")).is_none());
    assert!(list.relay_by_addr(at("127.0.0.2:8999")).is_none());
    assert!(list.relay_by_addr(at("127.0.0.9:9000")).is_none());
    // IPv4-mapped IPv6 (dual-stack sockets) matches the IPv4 relay.
    let mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped()),
        9000,
    );
    assert_eq!(list.relay_by_addr(mapped).map(|r| r.identity), Some(r1));
    let v6 = SocketAddr::new(
        IpAddr::V6("2001:db8::7".parse::<Ipv6Addr>().expect("v6")),
        443,
    );
    assert!(list.relay_by_addr(v6).is_some_and(|r| r.exit));
}

// ---------------------------------------------------------------------------
// Known-answer fixture
// ---------------------------------------------------------------------------

const FIXTURE_DOC: &str = "example.peerlist";
const FIXTURE_AUTHORITIES: [&str; 3] = ["authority-1.pub", "authority-2.pub", "authority-3.pub"];

/// Writes the fixtures. Run after an intentional format change:
/// `cargo test -p shroud-proto --test peerlist -- --ignored write_fixtures`.
#[test]
#[ignore = "writes testdata/peerlist; run by hand after a format change"]
fn write_fixtures() {
    let dir = testdata_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(FIXTURE_DOC), example_text()).expect("write document");
    for (n, name) in (1..).zip(FIXTURE_AUTHORITIES) {
        let public = authority(n).public();
        std::fs::write(
            dir.join(name),
            shroud_proto::keys::encode_key(public.as_bytes()),
        )
        .expect("write key");
    }
}

#[test]
fn fixture_known_answer() {
    let dir = testdata_dir();
    let text = std::fs::read_to_string(dir.join(FIXTURE_DOC)).expect("fixture document");
    let authorities: Vec<IdentityPublic> = FIXTURE_AUTHORITIES
        .iter()
        .map(|name| {
            std::fs::read_to_string(dir.join(name))
                .expect("fixture key")
                .parse()
                .expect("valid key file")
        })
        .collect();
    let policy = TrustPolicy::new(authorities, 2);

    let list = PeerList::parse_and_verify(&text, &policy, NOW, None).expect("fixture verifies");
    assert_eq!(list.encode(), text, "fixture is canonical");
    assert_eq!(list.serial, 42);
    assert_eq!(
        (list.valid_after, list.valid_until),
        (VALID_AFTER, VALID_UNTIL)
    );
    assert_eq!(list.params, NetworkParams::default());
    assert_eq!(list.relays.len(), 3);
    assert_eq!(list.signatures.len(), 2);
    assert_eq!(list.relays.iter().filter(|r| r.exit).count(), 2);
    let ids: Vec<String> = list
        .relays
        .iter()
        .map(|r| r.relay_id().to_string())
        .collect();
    assert_eq!(
        ids,
        [
            "9a3521a20adff642624e668219d64735",
            "4d1cb9c3d1998948f22b645d923ef688",
            "8e57cae27174f46b4c7b127cd5f78704",
        ]
    );
    assert_eq!(
        list.verify(
            &TrustPolicy {
                threshold: 3,
                ..policy.clone()
            },
            NOW,
            None
        ),
        Err(PeerListError::UnderThreshold { have: 2, need: 3 })
    );
    assert_eq!(kind(list.verify(&policy, VALID_UNTIL, None)), "expired");

    // Deterministic keys and ed25519 signatures: the generator reproduces the
    // committed bytes exactly, so any change to the encoding or the signed
    // message shows up here.
    assert_eq!(
        example_text(),
        text,
        "regenerate with `write_fixtures` if intended"
    );
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

fn addr_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..=223, any::<[u8; 3]>())
            .prop_map(|(a, [b, c, d])| IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        any::<[u16; 7]>().prop_map(|s| IpAddr::V6(Ipv6Addr::new(
            0x2001, s[0], s[1], s[2], s[3], s[4], s[5], s[6]
        ))),
    ]
}

fn relay_strategy() -> impl Strategy<Value = RelayDescriptor> {
    (
        any::<[u8; 32]>(),
        addr_strategy(),
        1u16..=u16::MAX,
        0u16..8,
        prop::collection::vec((any::<[u8; 32]>(), any::<u64>()), 1..=3),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(
            |(seed, addr, first, span, keys, exit, weight)| RelayDescriptor {
                identity: IdentityKey::from_bytes(&seed).public(),
                addr,
                ports: (first, first.saturating_add(span)),
                onion_keys: keys
                    .into_iter()
                    .map(|(k, valid_until)| OnionKeyEntry {
                        key: OnionPublic(k),
                        valid_until,
                    })
                    .collect(),
                exit,
                weight,
            },
        )
}

prop_compose! {
    fn list_strategy()(
        serial in any::<u64>(),
        valid_after in 0u64..u64::MAX - 1,
        span in 1u64..1_000_000,
        cell in any::<u16>(),
        h_max in any::<u8>(),
        relays in prop::collection::vec(relay_strategy(), 0..6),
        signers in prop::sample::subsequence(vec![1u8, 2, 3], 0..=3),
    ) -> (PeerList, usize) {
        let mut list = PeerList::new(
            serial,
            valid_after,
            valid_after.saturating_add(span),
            NetworkParams { cell, h_max },
        );
        list.relays = relays;
        list.normalize();
        let mut signed = 0;
        if list.validate().is_ok() {
            for n in signers {
                list.sign(&authority(n)).expect("valid list signs");
                signed += 1;
            }
        }
        (list, signed)
    }
}

proptest! {
    #[test]
    fn prop_parse_never_panics_on_arbitrary_strings(s in any::<String>()) {
        let _ = PeerList::parse(&s);
    }

    #[test]
    fn prop_parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = PeerList::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn prop_parse_never_panics_on_peerlist_like_text(
        s in "(shroud-peerlist 1\n|serial [0-9]{1,3}\n|valid-(after|until) [0-9]{1,3}\n|params cell=[0-9]{1,5} h-max=[0-9]\n|relay [A-Za-z0-9+/=]{0,46}\n| addr [0-9a-f.:]{0,20}\n| ports [0-9]{1,5}-[0-9]{1,5}\n| onion [A-Za-z0-9+/=]{44} until=[0-9]{1,3}\n| flags (exit|-)\n| weight [0-9]{1,3}\n|end\n|signature [A-Za-z0-9+/=]{44} [A-Za-z0-9+/=]{88}\n|end-peerlist\n|[ -~]{0,10}\n){0,30}"
    ) {
        if let Ok(list) = PeerList::parse(&s) {
            prop_assert_eq!(list.encode(), s);
        }
    }

    /// Any mutation of a valid document either fails to parse or is itself
    /// canonical (re-encodes to the same bytes) — and never verifies unless
    /// it is the original.
    #[test]
    fn prop_mutated_documents_are_rejected_or_canonical(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, 32u8..127), 1..4)
    ) {
        let original = example_text();
        let mut bytes = original.clone().into_bytes();
        for (at, op, byte) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.push(b'\n'),
            }
        }
        let text = String::from_utf8(bytes).expect("ascii edits");
        if let Ok(list) = PeerList::parse(&text) {
            prop_assert_eq!(&list.encode(), &text);
            if text != original {
                prop_assert!(list.verify(&policy(2), NOW, None).is_err());
            }
        }
    }

    #[test]
    fn prop_generated_lists_round_trip((list, signed) in list_strategy()) {
        prop_assume!(list.validate().is_ok());
        let text = list.encode();
        let parsed = PeerList::parse(&text).expect("generated list parses");
        prop_assert_eq!(&parsed, &list);
        prop_assert_eq!(parsed.encode(), text);
        let now = list.valid_after;
        let verdict = parsed.verify(&policy(signed.max(1)), now, Some(list.serial));
        match (signed, list.params.validate()) {
            (0, _) => prop_assert_eq!(verdict, Err(PeerListError::Unsigned)),
            (_, Ok(())) => prop_assert_eq!(verdict, Ok(())),
            (_, Err(e)) => prop_assert_eq!(verdict, Err(PeerListError::InvalidParams(e))),
        }
    }
}
