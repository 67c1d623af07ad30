//! Known-answer vectors: the byte-exact outputs of every construction of
//! `docs/PROTOCOL.md` for fixed inputs, stored in `testdata/vectors/*.txt`.
//!
//! `known_answers_match_the_files` recomputes every vector from its inputs and compares
//! it with the committed file, so any change to the wire format or a key derivation
//! fails here until the spec, the code and the vectors are updated together. Run
//! `cargo test -p shroud-proto --test vectors -- --ignored regenerate` after an
//! intentional change.

use std::fmt::Write as _;
use std::path::PathBuf;

use shroud_proto::aead::{Aead, RingAead, RustCryptoAead};
use shroud_proto::cell::{Command, Header, HeaderKey};
use shroud_proto::client::{ClientCircuit, ClientLink, PathHop};
use shroud_proto::keys::{IdentityKey, OnionSecret, RelayId};
use shroud_proto::layer::{add_backward, strip_forward, LayerKeys};
use shroud_proto::relay::{client_link_keys, peer_link_keys};
use shroud_proto::setup::{
    build_setup_with, forward_setup, open_setup, relay_agree, Ephemeral, HopSecrets, Next, SetupHop,
};
use shroud_proto::Layout;

mod common;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/vectors")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

fn arr32(seed: u8) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(&pattern(32, seed));
    a
}

fn line(out: &mut String, k: &str, v: &[u8]) {
    writeln!(out, "{k} = {}", hex::encode(v)).unwrap();
}

/// Ephemerals from fixed secrets: the first representable one at or after `seed`.
fn ephemeral(seed: u8) -> Ephemeral {
    (seed..=255)
        .find_map(|s| Ephemeral::from_secret(arr32(s), s))
        .expect("a representable key among 256 tries")
}

fn kdf() -> String {
    let mut o = String::from("# HopSecrets::derive: HKDF-SHA256(salt=\"shroud-v1 setup\", ikm=shared, info=E||onion_pub), 208 bytes: six keys, then the 48-bit forward and backward counter shifts\n\n");
    for seed in [1u8, 2] {
        let shared = arr32(seed);
        let rep = arr32(seed + 10);
        let onion = arr32(seed + 20);
        let s = HopSecrets::derive(&shared, &rep, &onion);
        line(&mut o, "shared", &shared);
        line(&mut o, "representative", &rep);
        line(&mut o, "onion_pub", &onion);
        line(&mut o, "k_setup", &s.k_setup);
        line(&mut o, "kf", &s.kf);
        line(&mut o, "sf", &s.sf);
        line(&mut o, "kb", &s.kb);
        line(&mut o, "sb", &s.sb);
        line(&mut o, "k_fill", &s.k_fill);
        line(&mut o, "shift_f", &s.shift_f.to_be_bytes()[2..]);
        line(&mut o, "shift_b", &s.shift_b.to_be_bytes()[2..]);
        o.push('\n');
    }
    o
}

fn elligator() -> String {
    let mut o = String::from("# Elligator2 (Randomized variant) representative of a client ephemeral, and X25519 on both sides\n\n");
    let onion = OnionSecret::from_bytes(&arr32(99));
    for seed in [3u8, 40, 77] {
        let e = ephemeral(seed);
        let client = e.agree(onion.public().as_bytes()).unwrap();
        let relay = relay_agree(&onion, &e.representative).unwrap();
        assert_eq!(client, relay);
        line(&mut o, "onion_secret", &arr32(99));
        line(&mut o, "onion_pub", onion.public().as_bytes());
        line(&mut o, "representative", &e.representative);
        line(&mut o, "shared", &relay[..]);
        o.push('\n');
    }
    o
}

fn header() -> String {
    let mut o = String::from("# Header protection: header XOR AES-256(key, cell[16..32])\n\n");
    let key = arr32(5);
    let hk = HeaderKey::new(&key);
    let mut cell = pattern(64, 9);
    let h = Header {
        circuit: 0x0123_4567_89ab_cdef,
        counter: 0x0000_1122_3344_5566,
        command: Command::Data,
    };
    hk.protect(&mut cell, &h);
    line(&mut o, "key", &key);
    line(&mut o, "sample", &cell[16..32]);
    line(&mut o, "plain", &h.encode());
    line(&mut o, "protected", &cell[..16]);
    o
}

fn layers<A: Aead>() -> String {
    let layout = Layout::default();
    let mut o = String::from("# One forward strip and one backward add, CELL=1024, H_MAX=8; the hop's counter is the header counter plus its shift (mod 2^48)\n\n");
    const SHIFT: u64 = 0xfffe_0102_0304;
    let ks = [LayerKeys::<A>::new(&arr32(7), &arr32(8)).with_shift(SHIFT)];
    let k = &ks[0];
    // Forward: seal a body with one layer (as the client would for a 1-hop circuit).
    let mut cell = pattern(layout.cell, 1);
    let junk = [[0x5au8; 16]; 8];
    shroud_proto::layer::seal_forward(&layout, &ks, Command::Data, 42, &mut cell, &junk);
    line(&mut o, "aead_key", &arr32(7));
    line(&mut o, "stack_key", &arr32(8));
    line(&mut o, "shift", &SHIFT.to_be_bytes()[2..]);
    writeln!(
        o,
        "command = data\nheader_counter = 42\nhop_counter = {:012x}",
        k.shifted(42)
    )
    .unwrap();
    line(&mut o, "forward_in", &cell[16..]);
    strip_forward(&layout, k, Command::Data, k.shifted(42), &mut cell).unwrap();
    line(&mut o, "forward_out", &cell[16..]);
    o.push('\n');
    let mut cell = pattern(layout.cell, 2);
    line(&mut o, "backward_in", &cell[16..]);
    add_backward(&layout, k, Command::Data, k.shifted(43), &mut cell);
    writeln!(
        o,
        "header_counter_in = 43\nhop_counter = {:012x}",
        k.shifted(43)
    )
    .unwrap();
    line(&mut o, "backward_out", &cell[16..]);
    o
}

fn setup() -> String {
    let layout = Layout::default();
    let mut o =
        String::from("# A 2-hop setup cell and what hop 0 does with it (CELL=1024, H_MAX=8)\n\n");
    let onions = [
        OnionSecret::from_bytes(&arr32(50)),
        OnionSecret::from_bytes(&arr32(51)),
    ];
    let ids = [RelayId([1; 16]), RelayId([2; 16])];
    let hops = vec![
        SetupHop {
            onion_pub: *onions[0].public().as_bytes(),
            next: Next::Relay {
                id: ids[1],
                port: 9001,
                out_id: 0x2222,
            },
            in_id: 0x1111,
            link_seed: [0x33; 16],
            mix_mean_ms: 0,
        },
        SetupHop {
            onion_pub: *onions[1].public().as_bytes(),
            next: Next::Exit {
                dest: "127.0.0.9:7".parse().unwrap(),
            },
            in_id: 0x2222,
            link_seed: [0; 16],
            mix_mean_ms: 0,
        },
    ];
    let eph = [ephemeral(10), ephemeral(60)];
    let mut cell = vec![0u8; layout.cell];
    let mut r = common::rng(77);
    let secrets = build_setup_with::<RingAead, _>(
        &layout,
        &hops,
        &eph,
        shroud_proto::cell::PROTOCOL_VERSION,
        1_764_000_000,
        &mut r,
        &mut cell,
    )
    .expect("valid onion keys");
    line(&mut o, "onion_secret_0", &arr32(50));
    line(&mut o, "onion_secret_1", &arr32(51));
    line(&mut o, "setup_cell", &cell[16..]);
    let (s0, routing) = open_setup::<RingAead>(
        &layout,
        &onions[0],
        onions[0].public().as_bytes(),
        &mut cell,
    )
    .unwrap();
    assert_eq!(s0.kf, secrets[0].kf);
    line(&mut o, "hop0_kf", &s0.kf);
    line(&mut o, "hop0_routing", &routing.encode());
    forward_setup(&layout, &s0, &routing, &mut cell);
    line(&mut o, "hop1_cell", &cell[16..]);
    let (s1, routing1) = open_setup::<RingAead>(
        &layout,
        &onions[1],
        onions[1].public().as_bytes(),
        &mut cell,
    )
    .unwrap();
    assert_eq!(s1.kb, secrets[1].kb);
    line(&mut o, "hop1_kb", &s1.kb);
    line(&mut o, "hop1_routing", &routing1.encode());
    o
}

fn links() -> String {
    let mut o = String::from(
        "# Link header keys: peers from identity keys, clients from the link seed\n\n",
    );
    let a = IdentityKey::from_bytes(&arr32(70));
    let b = IdentityKey::from_bytes(&arr32(71));
    let (a_tx, _) = peer_link_keys(&a, &b.public());
    let (_, b_rx) = peer_link_keys(&b, &a.public());
    let h = Header {
        circuit: 9,
        counter: 1,
        command: Command::Setup,
    };
    let mut cell = pattern(64, 3);
    a_tx.protect(&mut cell, &h);
    assert_eq!(b_rx.unprotect(&cell), Ok(h));
    line(&mut o, "identity_seed_a", &arr32(70));
    line(&mut o, "identity_seed_b", &arr32(71));
    line(&mut o, "a_to_b_protected", &cell[..32]);
    let seed = [0x44u8; 16];
    let (up, down) = client_link_keys(&seed, &RelayId([7; 16]));
    let mut c1 = pattern(64, 4);
    up.protect(&mut c1, &h);
    let mut c2 = pattern(64, 4);
    down.protect(&mut c2, &h);
    line(&mut o, "client_seed", &seed);
    line(&mut o, "relay_id", &[7; 16]);
    line(&mut o, "up_protected", &c1[..32]);
    line(&mut o, "down_protected", &c2[..32]);
    o
}

fn retry<A: Aead>() -> String {
    use shroud_proto::retry::{retry_key, write_retry, TokenKey, R_LEN};
    let mut o = String::from(
        "# Retry under load (PROTOCOL.md 5.5): the token (two-block CBC-MAC under AES-256 of ip||port||epoch) and a RETRY cell for a 1024-byte setup, k_retry = HKDF-SHA256(salt=\"shroud-v2 retry\", ikm=relay id)\n\n",
    );
    let tk = TokenKey::new(&arr32(80));
    let v4: std::net::SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let v6: std::net::SocketAddr = "[2001:db8::7]:443".parse().unwrap();
    line(&mut o, "token_key", &arr32(80));
    line(
        &mut o,
        "token_192.0.2.1:4000_epoch_29400000",
        &tk.token(v4, 29_400_000),
    );
    line(
        &mut o,
        "token_[2001:db8::7]:443_epoch_29400001",
        &tk.token(v6, 29_400_001),
    );
    let relay = RelayId([7; 16]);
    let key: A = retry_key(&relay);
    let setup = pattern(1024, 5);
    let mut r = [0u8; R_LEN];
    r.copy_from_slice(&pattern(R_LEN, 6));
    let token = tk.token(v4, 29_400_000);
    let mut cell = setup.clone();
    write_retry(&Layout::default(), &key, &token, &r, &mut cell);
    line(&mut o, "relay_id", &relay.0);
    line(&mut o, "setup_e", &setup[16..48]);
    line(&mut o, "r", &r);
    line(&mut o, "retry_cell", &cell);
    o
}

fn all() -> Vec<(&'static str, String)> {
    let ring = layers::<RingAead>();
    assert_eq!(
        ring,
        layers::<RustCryptoAead>(),
        "backends must agree byte for byte"
    );
    vec![
        ("kdf.txt", kdf()),
        ("elligator.txt", elligator()),
        ("header.txt", header()),
        ("layer.txt", ring),
        ("setup.txt", setup()),
        ("links.txt", links()),
        ("retry.txt", {
            let ring = retry::<RingAead>();
            assert_eq!(ring, retry::<RustCryptoAead>(), "backends must agree");
            ring
        }),
    ]
}

#[test]
fn known_answers_match_the_files() {
    for (name, text) in all() {
        let path = dir().join(name);
        let want =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(text, want, "{name} differs from the committed vector");
    }
}

#[test]
fn client_build_is_what_the_vector_relay_accepts() {
    // An end-to-end check across the API surface used by the vectors.
    let layout = Layout::default();
    let onion = OnionSecret::from_bytes(&arr32(50));
    let link = ClientLink::new(
        &RelayId([1; 16]),
        "127.0.0.1:9000".parse().unwrap(),
        &mut common::rng(5),
    );
    let hop = PathHop {
        id: RelayId([1; 16]),
        onion: onion.public(),
        addr: "127.0.0.1:9000".parse().unwrap(),
    };
    let mut cell = vec![0u8; layout.cell];
    ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &[hop],
        "127.0.0.9:7".parse().unwrap(),
        0,
        &mut common::rng(6),
        &mut cell,
    )
    .unwrap();
    assert!(open_setup::<RingAead>(&layout, &onion, onion.public().as_bytes(), &mut cell).is_ok());
}

#[test]
#[ignore = "writes testdata/vectors; run after an intentional wire change"]
fn regenerate() {
    std::fs::create_dir_all(dir()).unwrap();
    for (name, text) in all() {
        std::fs::write(dir().join(name), text).unwrap();
    }
}
