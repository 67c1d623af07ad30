//! The protocol properties of DESIGN.md, each proven by a named test on an in-process
//! network of real `Relay` state machines with real cryptography.

mod common;

use common::*;
use shroud_proto::aead::{Aead, RingAead, RustCryptoAead};
use shroud_proto::client::{ClientCircuit, ClientLink, Received};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{Action, CellBatch, DropReason, OnionKeyring, Relay, RelayLimits};
use shroud_proto::Layout;

fn roundtrip_all_lengths<A: Aead>() {
    let layout = Layout::default();
    let mut r = rng(1);
    for hops in 1..=layout.h_max {
        let mut net = Net::<A>::new(layout, hops, &mut r);
        let path: Vec<usize> = (0..hops).collect();
        let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
        let mut c = net.open_circuit(&path, &mut link, &mut r);
        for (k, size) in [0usize, 1, 100, layout.payload_max()]
            .into_iter()
            .enumerate()
        {
            let payload: Vec<u8> = (0..size).map(|i| (i * 7 + k + hops) as u8).collect();
            let mut cell = vec![0u8; layout.cell];
            c.seal_data(&link, &payload, &mut cell, &mut r).unwrap();
            net.send(CLIENT, net.addrs[0], cell);
            let (dest, got) = net.delivered.pop().expect("delivered at the exit");
            assert_eq!(dest, DEST);
            assert_eq!(got, payload, "forward payload intact through {hops} hops");
            let mut back = net.to_client.pop_front().expect("echo returns");
            let hdr = link.read_header(&back).unwrap();
            match c.open(&hdr, &mut back).unwrap() {
                Received::Data(range) => {
                    assert_eq!(&back[range], &payload[..], "backward payload intact")
                }
                other => panic!("expected data, got {other:?}"),
            }
        }
        assert!(net.drops.is_empty(), "{:?}", net.drops);
    }
}

#[test]
fn round_trip_1_to_h_max_hops_ring() {
    roundtrip_all_lengths::<RingAead>();
}

#[test]
fn round_trip_1_to_h_max_hops_rustcrypto() {
    roundtrip_all_lengths::<RustCryptoAead>();
}

#[test]
fn round_trip_small_network_parameters() {
    // A smaller CELL with fewer hops works the same.
    let layout = Layout::new(512, 3).unwrap();
    let mut r = rng(2);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    let mut cell = vec![0u8; 512];
    c.seal_data(&link, b"hello", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.delivered.pop().unwrap().1, b"hello");
}

/// Builds a 3-hop circuit and returns a sealed data cell as it leaves the client,
/// plus everything needed to inject variants of it.
fn three_hops() -> (Net<RingAead>, ClientLink, ClientCircuit<RingAead>, TestRng) {
    let layout = Layout::default();
    let mut r = rng(3);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    net.wire.clear();
    (net, link, c, r)
}

#[test]
fn bit_flip_anywhere_is_rejected_at_the_next_hop() {
    // Walk one data cell hop by hop. Before a hop sees the real cell, it gets a copy
    // with one bit flipped at every byte position in turn: since the real cell has
    // not been processed, its counter is still fresh, so a flip can only be caught by
    // the header (bytes 0..32: the header and the sample that keys its mask) or by
    // the tag over the body and the rest of the stack (every byte from 32 on must be
    // `bad_tag`, never a replay).
    let (mut net, link, mut c, mut r) = three_hops();
    let layout = net.layout;
    let mut cell = vec![0u8; layout.cell];
    c.seal_data(&link, b"flip me", &mut cell, &mut r).unwrap();
    let mut from = CLIENT;
    let mut to = net.addrs[0];
    for hop in 0..3 {
        assert_eq!(net.relay_index(to), Some(hop));
        for byte in 0..layout.cell {
            let mut bad = cell.clone();
            bad[byte] ^= 1 << (byte % 8);
            let before = net.relays[hop].stats().cells_forward;
            let action = net.relays[hop].handle(from, &mut bad, NOW_MS);
            if byte < 32 {
                assert!(
                    matches!(
                        action,
                        Action::Drop(
                            DropReason::BadTag | DropReason::Malformed | DropReason::UnknownCircuit
                        )
                    ),
                    "hop {hop}, byte {byte}: flipped cell was not dropped: {action:?}"
                );
            } else {
                assert_eq!(
                    action,
                    Action::Drop(DropReason::BadTag),
                    "hop {hop}, byte {byte}: the tag did not catch the flip"
                );
            }
            assert_eq!(before, net.relays[hop].stats().cells_forward);
        }
        // Now the real cell: accepted, and passed on (or delivered at the exit).
        match net.relays[hop].handle(from, &mut cell, NOW_MS) {
            Action::Send { to: next, .. } => {
                from = to;
                to = next;
            }
            Action::Deliver { .. } => assert_eq!(hop, 2, "delivered early"),
            other => panic!("hop {hop}: the real cell was refused after the flips: {other:?}"),
        }
    }
}

/// A datagram's cells handled as one batch (`Relay::handle_batch`: header masks in one
/// AES call, the layers of consecutive data cells stripped together) get exactly what
/// one cell at a time gives: good cells pass on and are delivered intact and in order,
/// while a replay, a flipped header and a cell under a foreign link key inside the
/// same datagram get the same drop as alone.
#[test]
fn datagram_batch_changes_nothing() {
    let (mut net, link, mut c, mut r) = three_hops();
    let layout = net.layout;
    let cell = layout.cell;
    let seal = |c: &mut ClientCircuit<RingAead>, r: &mut TestRng, text: &[u8]| {
        let mut v = vec![0u8; cell];
        c.seal_data(&link, text, &mut v, r).unwrap();
        v
    };
    let first = seal(&mut c, &mut r, b"first");
    net.send(CLIENT, net.addrs[0], first.clone());
    assert_eq!(net.delivered.len(), 1);
    // A datagram: good, replay of `first`, good with a flipped header byte, good,
    // random bytes (no key the relay holds), good.
    let mut foreign = vec![0u8; cell];
    rand_core::RngCore::fill_bytes(&mut r, &mut foreign);
    let texts: [&[u8]; 3] = [b"a", b"b", b"c"];
    let good: Vec<Vec<u8>> = texts.iter().map(|t| seal(&mut c, &mut r, t)).collect();
    let mut flipped = seal(&mut c, &mut r, b"flipped");
    flipped[3] ^= 0x40;
    let parts = [
        good[0].clone(),
        first.clone(),
        flipped.clone(),
        good[1].clone(),
        foreign.clone(),
        good[2].clone(),
    ];
    // What each bad cell gets alone (a drop changes no state, so asking first is
    // harmless).
    let alone: Vec<Option<Action>> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            [1, 2, 4]
                .contains(&i)
                .then(|| net.relays[0].handle(CLIENT, &mut p.clone(), NOW_MS))
        })
        .collect();
    assert!(matches!(alone[1], Some(Action::Drop(DropReason::Replay))));
    assert!(matches!(alone[2], Some(Action::Drop(_))));
    assert!(matches!(alone[4], Some(Action::Drop(_))));
    let mut datagram: Vec<u8> = parts.concat();
    let mut batch = CellBatch::default();
    net.relays[0].handle_batch(CLIENT, &mut datagram, NOW_MS, &mut batch);
    assert_eq!(batch.len(), parts.len());
    net.wire.clear();
    for (i, c) in datagram.chunks_exact_mut(cell).enumerate() {
        let action = batch.take(i);
        match &alone[i] {
            Some(expected) => assert_eq!(&action, expected, "cell {i}"),
            None => {
                let Action::Send { to, .. } = action else {
                    panic!("cell {i}: {action:?}");
                };
                net.send(net.addrs[0], to, c.to_vec());
            }
        }
    }
    let got: Vec<&[u8]> = net.delivered[1..]
        .iter()
        .map(|(_, d)| d.as_slice())
        .collect();
    assert_eq!(got, texts, "the good cells arrive intact, in order");
    // Backward cells from a peer link (relay 2 to relay 1) in one batch: the first
    // goes back towards the client, its copy is a replay.
    let mut reply = vec![0u8; cell];
    let circuit = net.last_exit.unwrap();
    let back = net.relays[2]
        .exit_reply(circuit, b"back", &mut reply, NOW_MS)
        .unwrap();
    assert_eq!(back, net.addrs[1]);
    let mut two = [reply.clone(), reply.clone()].concat();
    net.relays[1].handle_batch(net.addrs[2], &mut two, NOW_MS, &mut batch);
    let a0 = batch.take(0);
    assert!(
        matches!(a0, Action::Send { to, .. } if to == net.addrs[0]),
        "{a0:?}"
    );
    assert_eq!(batch.take(1), Action::Drop(DropReason::Replay));
}

/// The layers of a batch's data cells are stripped together, across circuits whose
/// keys share a key-cache entry, around a copy of a cell in the same batch, a forged
/// tag, a DESTROY and the cells after it: every cell gets what it would get alone, in
/// order (the replay window takes a counter only after its tag verified, so the copy
/// in the same batch is still a replay; a job never reads keys a later cell evicted).
#[test]
fn a_batch_acts_as_its_cells_one_by_one() {
    let layout = Layout::default();
    let mut r = rng(31);
    // A key cache of 2 entries: the forward keys of circuits in slots 0 and 2 share
    // an entry.
    let limits = RelayLimits {
        max_circuits: 64,
        max_links: 64,
        key_cache: 2,
        ..RelayLimits::default()
    };
    let mut net = Net::<RingAead>::with_limits(layout, 2, limits, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut a = net.open_circuit(&[0, 1], &mut link, &mut r);
    let mut b = net.open_circuit(&[0, 1], &mut link, &mut r);
    let mut c = net.open_circuit(&[0, 1], &mut link, &mut r);
    net.wire.clear();
    let cell = layout.cell;
    let seal = |x: &mut ClientCircuit<RingAead>, r: &mut TestRng, text: &[u8]| {
        let mut v = vec![0u8; cell];
        x.seal_data(&link, text, &mut v, r).unwrap();
        v
    };
    let a0 = seal(&mut a, &mut r, b"a0");
    let c0 = seal(&mut c, &mut r, b"c0");
    let a1 = seal(&mut a, &mut r, b"a1");
    let b0 = seal(&mut b, &mut r, b"b0");
    let mut forged = seal(&mut b, &mut r, b"forged");
    forged[cell - 1] ^= 1;
    let a2 = seal(&mut a, &mut r, b"a2");
    // Sealed before the DESTROY (a closed client circuit seals nothing), sent after.
    let b1 = seal(&mut b, &mut r, b"b1");
    let mut destroy_b = vec![0u8; cell];
    b.seal_destroy(&link, &mut destroy_b, &mut r).unwrap();
    let c1 = seal(&mut c, &mut r, b"c1");
    let parts = [
        &a0, &c0, &a1, &b0, &a1, &forged, &a2, &destroy_b, &b1, &c1, &c0,
    ];
    let misses = net.relays[0].stats().key_cache_misses;
    let mut datagram: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut batch = CellBatch::default();
    net.relays[0].handle_batch(CLIENT, &mut datagram, NOW_MS, &mut batch);
    let actions: Vec<Action> = (0..parts.len()).map(|i| batch.take(i)).collect();
    let kinds: Vec<String> = actions
        .iter()
        .map(|x| match x {
            Action::Send { to, event: None } if *to == net.addrs[1] => "send".into(),
            Action::Send {
                to,
                event: Some(shroud_proto::relay::Event::Closed { .. }),
            } if *to == net.addrs[1] => "send+closed".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "send".to_string(),
            "send".into(),
            "send".into(),
            "send".into(),
            format!("{:?}", Action::Drop(DropReason::Replay)),
            format!("{:?}", Action::Drop(DropReason::BadTag)),
            "send".into(),
            "send+closed".into(),
            format!("{:?}", Action::Drop(DropReason::UnknownCircuit)),
            "send".into(),
            format!("{:?}", Action::Drop(DropReason::Replay)),
        ]
    );
    assert!(
        net.relays[0].stats().key_cache_misses >= misses + 3,
        "circuits a and c took turns in one key-cache entry"
    );
    // The cells passed on are the right ones: relay 1 (the exit) delivers the six
    // data cells intact, in order.
    for (i, x) in datagram.chunks_exact(cell).enumerate() {
        if matches!(actions[i], Action::Send { .. }) {
            net.send(net.addrs[0], net.addrs[1], x.to_vec());
        }
    }
    let got: Vec<&[u8]> = net.delivered.iter().map(|(_, d)| d.as_slice()).collect();
    assert_eq!(got, [&b"a0"[..], b"c0", b"a1", b"b0", b"a2", b"c1"]);
    assert_eq!(net.relays[0].stats().cells_forward, 7);
}

#[test]
fn replayed_data_cell_is_rejected() {
    let (mut net, link, mut c, mut r) = three_hops();
    let mut cell = vec![0u8; net.layout.cell];
    c.seal_data(&link, b"once", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell.clone());
    assert_eq!(net.delivered.len(), 1);
    // Replay at the first hop and every later hop (their copies from the wire).
    let copies: Vec<_> = net
        .wire
        .iter()
        .filter(|(_, to, _)| *to != CLIENT)
        .cloned()
        .collect();
    for (from, to, cell) in copies {
        let i = net.relay_index(to).unwrap();
        let mut again = cell.clone();
        assert_eq!(
            net.relays[i].handle(from, &mut again, NOW_MS),
            Action::Drop(DropReason::Replay)
        );
    }
    assert_eq!(net.delivered.len(), 1, "replay delivered nothing");
}

#[test]
fn replayed_setup_cell_is_rejected() {
    let layout = Layout::default();
    let mut r = rng(4);
    let mut net = Net::<RingAead>::new(layout, 2, &mut r);
    let link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let hops = vec![net.hops[0], net.hops[1]];
    let _c =
        ClientCircuit::<RingAead>::build(&layout, &link, &hops, DEST, NOW_MS, &mut r, &mut cell)
            .unwrap();
    net.send(CLIENT, net.addrs[0], cell.clone());
    assert_eq!(net.relays[0].stats().setups, 1);
    // The same setup again, even from another address, is a replay at hop 0.
    let other = "127.0.0.99:5555".parse().unwrap();
    let mut again = cell.clone();
    assert_eq!(
        net.relays[0].handle(other, &mut again, NOW_MS),
        Action::Drop(DropReason::Replay)
    );
    // And the forwarded setup replayed at hop 1 too.
    let (from, _, fwd) = net
        .wire
        .iter()
        .find(|(_, to, _)| *to == net.addrs[1])
        .cloned()
        .unwrap();
    let mut again = fwd.clone();
    assert_eq!(
        net.relays[1].handle(from, &mut again, NOW_MS),
        Action::Drop(DropReason::Replay)
    );
    assert_eq!(net.relays[0].stats().setups, 1);
    assert_eq!(net.relays[1].stats().setups, 1);
}

/// A second worker of the same relay (same identity and onion key, a port of its own)
/// shares the first one's keyring: the setup it already accepted is a replay there, and
/// a restarted process refuses setups stamped up to its start.
#[test]
fn setup_replayed_to_another_worker_or_after_a_restart_builds_nothing() {
    let layout = Layout::default();
    let mut r = rng(40);
    let mut net = Net::<RingAead>::new(layout, 2, &mut r);
    let limits = RelayLimits::default();
    let keyring = {
        let mut k = OnionKeyring::new(limits.setup_skew_s, limits.setup_filter_capacity);
        k.update(vec![net.onions[1].clone()], NOW_MS);
        k
    };
    net.relays[1].set_keyring(keyring.clone());
    let (identity, peers) = (net.identities[1].clone(), net.peers.clone());
    let worker2 = |keyring: OnionKeyring| {
        let mut w = Relay::<RingAead>::new(
            layout,
            identity.clone(),
            vec![],
            peers.clone(),
            ExitPolicy::parse(&["accept 127.0.0.0/8:1-65535"]).unwrap(),
            limits.clone(),
            NOW_MS,
        );
        w.set_keyring(keyring);
        w
    };
    let link = ClientLink::new(&net.hops[1].id, net.addrs[1], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let _c = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &[net.hops[1]],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    net.send(CLIENT, net.addrs[1], cell.clone());
    assert_eq!(net.relays[1].stats().setups, 1);
    // Worker 2 of the same relay, sharing the keyring: a replay, no circuit.
    let mut w2 = worker2(keyring.clone());
    let mut again = cell.clone();
    assert_eq!(
        w2.handle(CLIENT, &mut again, NOW_MS + 10),
        Action::Drop(DropReason::Replay)
    );
    assert_eq!(w2.circuit_count(), 0);
    // Without sharing (the old behaviour) the same cell builds a second circuit:
    // this is what the shared keyring prevents.
    let mut lone = worker2({
        let mut k = OnionKeyring::new(limits.setup_skew_s, limits.setup_filter_capacity);
        k.update(vec![net.onions[1].clone()], NOW_MS);
        k
    });
    let mut again = cell.clone();
    assert!(matches!(
        lone.handle(CLIENT, &mut again, NOW_MS + 10),
        Action::Send { .. }
    ));
    assert_eq!(lone.circuit_count(), 1);
    // A restarted process (fresh filters) started after the setup's stamp (which the
    // client may put up to TIMESTAMP_JITTER_S ahead) refuses it.
    let restart_ms = NOW_MS + 1000 * (shroud_proto::setup::TIMESTAMP_JITTER_S + 1);
    let mut restarted = worker2({
        let mut k = OnionKeyring::new(limits.setup_skew_s, limits.setup_filter_capacity);
        k.update(vec![net.onions[1].clone()], restart_ms);
        k.started_at(restart_ms)
    });
    let mut again = cell.clone();
    assert_eq!(
        restarted.handle(CLIENT, &mut again, restart_ms + 100),
        Action::Drop(DropReason::Expired)
    );
    assert_eq!(restarted.circuit_count(), 0);
    // A key dropped from a keyring and later re-added does not reopen the window.
    let mut k = keyring.clone();
    k.update(vec![], restart_ms);
    k.update(vec![net.onions[1].clone()], restart_ms + 100);
    let mut readded = worker2(k);
    let mut again = cell.clone();
    assert_eq!(
        readded.handle(CLIENT, &mut again, restart_ms + 200),
        Action::Drop(DropReason::Expired)
    );
}

/// DESIGN property 10: relays learn nothing end to end. For one 3-hop circuit, the
/// headers hop 0 sees (on its links to the client and to hop 1) and the headers the
/// last hop sees (on its link from hop 1) share no circuit id and no counter, in
/// either direction; payload and cover cells carry the same command; and the exit
/// cannot mark backward cells with a large counter jump.
#[test]
fn colluding_first_and_last_hops_share_no_header_value() {
    use shroud_proto::cell::Header;
    use shroud_proto::relay::peer_link_keys;
    let (mut net, mut link, mut c, mut r) = three_hops();
    let layout = net.layout;
    for k in 0..40usize {
        let mut cell = vec![0u8; layout.cell];
        if k % 5 == 4 {
            c.seal_padding(&link, &mut cell, &mut r).unwrap();
        } else {
            c.seal_data(&link, &[k as u8; 50], &mut cell, &mut r)
                .unwrap();
        }
        net.send(CLIENT, net.addrs[0], cell);
    }
    assert_eq!(
        net.delivered.len(),
        32,
        "32 payloads delivered, 8 cover dropped"
    );
    assert_eq!(net.relays[2].stats().cover_received, 8);
    let (a0, a1, a2) = (net.addrs[0], net.addrs[1], net.addrs[2]);
    // Header keys of the links between relays (as the relays derive them).
    let k01 = peer_link_keys(&net.identities[0], &net.identities[1].public());
    let k12 = peer_link_keys(&net.identities[1], &net.identities[2].public());
    let mut hop0: Vec<Header> = Vec::new();
    let mut last: Vec<Header> = Vec::new();
    for (from, to, bytes) in &net.wire {
        let hdr = match (*from, *to) {
            (f, t) if f == a0 && t == a1 => k01.0.unprotect(bytes),
            (f, t) if f == a1 && t == a0 => k01.1.unprotect(bytes),
            (f, t) if f == a1 && t == a2 => k12.0.unprotect(bytes),
            (f, t) if f == a2 && t == a1 => k12.1.unprotect(bytes),
            (f, t) if f == a0 && t == CLIENT => link.read_header(bytes),
            _ => continue,
        }
        .expect("header decodes with its link key");
        if *from == a2 || *to == a2 {
            last.push(hdr);
        } else {
            hop0.push(hdr);
        }
    }
    assert!(
        hop0.len() >= 3 * 32 && last.len() >= 2 * 32,
        "{} {}",
        hop0.len(),
        last.len()
    );
    for h in &hop0 {
        for l in &last {
            assert_ne!(h.circuit, l.circuit, "circuit id seen by both");
            assert_ne!(h.counter, l.counter, "counter seen by both");
        }
    }
    // Payload and cover look alike to every relay: one command for both.
    assert!(last
        .iter()
        .all(|h| h.command == shroud_proto::Command::Data));

    // An exit that skips backward sequence numbers to signal to a colluding first hop
    // (here: 5000 replies made and never sent) gets its next cell refused by the
    // client; a small gap (loss) is accepted.
    let circuit = net.last_exit.expect("the exit delivered");
    let mut reply = vec![0u8; layout.cell];
    for _ in 0..10 {
        net.relays[2]
            .exit_reply(circuit, b"lost", &mut reply, NOW_MS)
            .unwrap();
    }
    net.to_client.clear();
    let to = net.relays[2]
        .exit_reply(circuit, b"after a small gap", &mut reply, NOW_MS)
        .unwrap();
    net.send(a2, to, reply.clone());
    let mut back = net.to_client.pop_front().expect("relayed to the client");
    let hdr = link.read_header(&back).unwrap();
    assert!(matches!(c.open(&hdr, &mut back), Ok(Received::Data(_))));
    for _ in 0..5000 {
        net.relays[2]
            .exit_reply(circuit, b"skipped", &mut reply, NOW_MS)
            .unwrap();
    }
    let to = net.relays[2]
        .exit_reply(circuit, b"marked", &mut reply, NOW_MS)
        .unwrap();
    net.send(a2, to, reply);
    let mut back = net.to_client.pop_front().expect("relayed to the client");
    let hdr = link.read_header(&back).unwrap();
    assert!(matches!(
        c.open(&hdr, &mut back),
        Err(shroud_proto::client::ClientError::Rejected(
            "backward counter jump"
        ))
    ));
}

#[test]
fn every_cell_on_every_link_has_the_same_length() {
    let (mut net, link, mut c, mut r) = three_hops();
    let layout = net.layout;
    for n in 0..5 {
        let mut cell = vec![0u8; layout.cell];
        c.seal_data(&link, &vec![n as u8; n * 100], &mut cell, &mut r)
            .unwrap();
        net.send(CLIENT, net.addrs[0], cell);
    }
    let mut cell = vec![0u8; layout.cell];
    c.seal_padding(&link, &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    let mut cell = vec![0u8; layout.cell];
    c.seal_destroy(&link, &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert!(net.wire.len() > 20);
    for (from, to, bytes) in &net.wire {
        assert_eq!(bytes.len(), layout.cell, "{from} -> {to}");
    }
    // DESTROY removed the circuit everywhere.
    for relay in &net.relays {
        assert_eq!(relay.circuit_count(), 0);
    }
}

/// Statistical shape check: relay 2 (never the exit) sits at positions 0, 1, 2 and 3
/// of circuits of 2 to 5 hops. Over many cells, every byte of what it receives and of
/// what it sends on (its own view of the decrypted stack included: header protection
/// is the only change after it strips its layer) looks uniform, whatever the position
/// and the number of hops after it. So the stack tells a hop nothing about where it is.
#[test]
fn a_hop_sees_the_same_shape_whatever_its_position() {
    let layout = Layout::default();
    let mut r = rng(5);
    let mut net = Net::<RingAead>::new(layout, 5, &mut r);
    const T: usize = 2;
    let paths: [&[usize]; 4] = [&[2, 4], &[0, 2, 4], &[0, 1, 2, 4], &[4, 0, 1, 2, 3]];
    // One client link per first-hop relay (a link is one socket to one relay port).
    let mut links: Vec<ClientLink> = (0..5)
        .map(|i| ClientLink::new(&net.hops[i].id, net.addrs[i], &mut r))
        .collect();
    for path in paths {
        let pos = path.iter().position(|&x| x == T).unwrap();
        let link = &mut links[path[0]];
        let mut c = net.open_circuit(path, link, &mut r);
        let mut received = Vec::new();
        let mut sent = Vec::new();
        for k in 0..200u32 {
            net.wire.clear();
            let mut cell = vec![0u8; layout.cell];
            c.seal_data(link, &k.to_be_bytes(), &mut cell, &mut r)
                .unwrap();
            net.send(CLIENT, net.addrs[path[0]], cell);
            let next = net.addrs[path[pos + 1]];
            for (from, to, b) in &net.wire {
                if *to == net.addrs[T] && *from != next {
                    received.push(b.clone());
                }
                if *from == net.addrs[T] && *to == next {
                    sent.push(b.clone());
                }
            }
            net.to_client.clear();
        }
        assert_eq!(received.len(), 200);
        assert_eq!(sent.len(), 200);
        for (what, cells) in [("received", &received), ("sent", &sent)] {
            for b in 0..layout.cell {
                let mut vals: Vec<u8> = cells.iter().map(|c| c[b]).collect();
                let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / vals.len() as f64;
                vals.sort_unstable();
                vals.dedup();
                assert!(
                    vals.len() > 100,
                    "path {path:?}, {what} byte {b}: only {} distinct values",
                    vals.len()
                );
                assert!(
                    (80.0..175.0).contains(&mean),
                    "path {path:?}, {what} byte {b}: mean {mean}"
                );
            }
        }
    }
}

#[test]
fn wrong_key_truncated_garbage_and_oversized_are_rejected() {
    let (mut net, link, mut c, mut r) = three_hops();
    let layout = net.layout;
    let mut cell = vec![0u8; layout.cell];
    c.seal_data(&link, b"x", &mut cell, &mut r).unwrap();
    // Wrong link key: a different client link (same relay) sealed it.
    let other_link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut c2 = ClientCircuit::<RingAead>::build(
        &layout,
        &other_link,
        &[net.hops[0]],
        DEST,
        NOW_MS,
        &mut r,
        &mut vec![0u8; layout.cell],
    )
    .unwrap();
    assert!(
        c2.seal_data(&other_link, b"x", &mut vec![0u8; layout.cell], &mut r)
            .is_err(),
        "not open yet"
    );
    // Truncated and oversized.
    for len in [
        0usize,
        1,
        15,
        16,
        100,
        layout.cell - 1,
        layout.cell + 1,
        2 * layout.cell,
    ] {
        let mut b = vec![0u8; len];
        let n = len.min(layout.cell);
        b[..n].copy_from_slice(&cell[..n]);
        assert_eq!(
            net.relays[0].handle(CLIENT, &mut b, NOW_MS),
            Action::Drop(DropReason::Malformed),
            "len {len}"
        );
    }
    // Garbage from the known client: not a data cell, not a valid setup.
    for seed in 0..50u8 {
        let mut g: Vec<u8> = (0..layout.cell)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let a = net.relays[0].handle(CLIENT, &mut g, NOW_MS);
        assert!(matches!(a, Action::Drop(_)), "{a:?}");
    }
    // Garbage from a relay peer address.
    let mut g = vec![0x42u8; layout.cell];
    assert!(matches!(
        net.relays[1].handle(net.addrs[0], &mut g, NOW_MS),
        Action::Drop(DropReason::Malformed | DropReason::UnknownCircuit)
    ));
    // The real cell still goes through afterwards.
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.delivered.len(), 1);
}

#[test]
fn setup_to_a_hop_outside_the_peer_list_is_refused() {
    let layout = Layout::default();
    let mut r = rng(6);
    let mut net = Net::<RingAead>::new(layout, 2, &mut r);
    // A relay the others do not list.
    let rogue = Net::<RingAead>::new(layout, 1, &mut rng(60));
    let mut hop = rogue.hops[0];
    hop.addr = "127.0.0.50:9000".parse().unwrap();
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let mut c = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &[net.hops[0], hop],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.drops, vec![(0, DropReason::NotAPeer)]);
    let mut reply = net.to_client.pop_front().expect("REFUSED comes back");
    let hdr = link.read_header(&reply).unwrap();
    assert_eq!(
        c.open(&hdr, &mut reply).unwrap(),
        Received::Refused {
            hop: 0,
            reason: DropReason::NotAPeer as u8
        }
    );
    assert_eq!(net.relays[0].circuit_count(), 0);
}

#[test]
fn exit_policy_refuses_destinations() {
    let layout = Layout::default();
    let mut r = rng(7);
    let mut net = Net::<RingAead>::new(layout, 1, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let mut c = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &[net.hops[0]],
        "10.1.2.3:53".parse().unwrap(),
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    let mut reply = net.to_client.pop_front().unwrap();
    let hdr = link.read_header(&reply).unwrap();
    assert_eq!(
        c.open(&hdr, &mut reply).unwrap(),
        Received::Refused {
            hop: 0,
            reason: DropReason::Policy as u8
        }
    );
}

#[test]
fn client_rejects_tampered_and_replayed_backward_cells() {
    let (mut net, mut link, mut c, mut r) = three_hops();
    let layout = net.layout;
    let mut cell = vec![0u8; layout.cell];
    c.seal_data(&link, b"echo", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    let back = net.to_client.pop_front().unwrap();
    for byte in 0..layout.cell {
        let mut bad = back.clone();
        bad[byte] ^= 0x80;
        // A client demultiplexes by circuit id: a header naming another circuit is
        // not this circuit's cell at all.
        let ok = link
            .read_header(&bad)
            .ok()
            .filter(|h| h.circuit == c.id())
            .map(|h| c.open(&h, &mut bad));
        assert!(
            !matches!(ok, Some(Ok(Received::Data(_)))),
            "byte {byte} flip accepted"
        );
    }
    let mut good = back.clone();
    let hdr = link.read_header(&good).unwrap();
    assert!(matches!(c.open(&hdr, &mut good), Ok(Received::Data(_))));
    let mut again = back.clone();
    assert!(c.open(&hdr, &mut again).is_err(), "replay accepted");
}

#[test]
fn setup_with_stale_timestamp_is_expired() {
    let layout = Layout::default();
    let mut r = rng(8);
    let mut net = Net::<RingAead>::new(layout, 1, &mut r);
    let link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let _c = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &[net.hops[0]],
        DEST,
        NOW_MS - 3_600_000,
        &mut r,
        &mut cell,
    )
    .unwrap();
    assert_eq!(
        net.relays[0].handle(CLIENT, &mut cell, NOW_MS),
        Action::Drop(DropReason::Expired)
    );
}

/// Random garbage from one source costs at most its prefix's setup budget (and the
/// newcomer budget) in public-key work, counted by the relay itself (`setup_dh`):
/// beyond the newcomer budget a cell gets a one-cell RETRY that opens only against the
/// cell it answers, within the prefix's RETRY budget; everything else is refused as
/// rate_limited, unanswered, before any X25519.
#[test]
fn garbage_from_one_source_gets_public_key_work_only_up_to_its_budget() {
    let layout = Layout::default();
    let mut r = rng(77);
    let net = Net::<RingAead>::new(layout, 1, &mut r);
    let mut relay = Relay::<RingAead>::new(
        layout,
        net.identities[0].clone(),
        vec![net.onions[0].clone()],
        net.peers.clone(),
        ExitPolicy::default(),
        RelayLimits {
            setup_rate: 200,
            setup_burst: 400,
            newcomer_setup_rate: 100,
            ..RelayLimits::default()
        },
        NOW_MS,
    );
    let key: RingAead = shroud_proto::retry::retry_key(&relay.id());
    let src: std::net::SocketAddr = "127.200.0.1:5555".parse().unwrap();
    let (mut work, mut retries, mut limited) = (0, 0, 0);
    for k in 0..5000u64 {
        let mut cell = vec![0u8; layout.cell];
        rand_core::RngCore::fill_bytes(&mut r, &mut cell);
        let sent = cell.clone();
        relay.begin_batch(16);
        // 5000 cells over 5 seconds: the prefix allows 400 + 200/s * 5 s = 1400, of
        // which the newcomer budget gives work to 100 + 100/s * 5 s = 600.
        match relay.handle(src, &mut cell, NOW_MS + k) {
            Action::Drop(DropReason::RateLimited) => limited += 1,
            Action::Drop(_) => work += 1,
            Action::Send { to, event: None } if to == src => {
                let token = shroud_proto::retry::open_retry(&layout, &key, &sent, &mut cell);
                assert!(token.is_some(), "a reply to garbage that is not its RETRY");
                retries += 1;
            }
            other => panic!("garbage accepted: {other:?}"),
        }
    }
    let dh = relay.stats().setup_dh;
    assert_eq!(dh, work, "one X25519 per cell that got work");
    assert!(
        (550..=600).contains(&work),
        "public-key work for {work} garbage cells"
    );
    // The prefix's RETRY budget: 8/s, bursts of 16, over 5 s. (The token buckets
    // refill in floating point: allow a token of rounding.)
    assert!((54..=56).contains(&retries), "{retries} RETRY replies");
    assert_eq!(limited, 5000 - work - retries);
    assert_eq!(relay.stats().retries_sent, retries);
}

/// Under load (the newcomer budget spent), a setup from a new address gets a RETRY
/// instead of public-key work; the same setup sent again with the token is opened,
/// skips the budget and starts a validated link (the exit may answer before any
/// forward data). A token is good only for its address and for one to two epochs.
#[test]
fn retry_token_under_load_admits_a_client_that_receives_and_no_one_else() {
    use shroud_proto::relay::Event;
    use shroud_proto::retry::{apply_token, open_retry, retry_key, RETRY_EPOCH_S};
    let layout = Layout::default();
    let mut r = rng(91);
    let net = Net::<RingAead>::new(layout, 1, &mut r);
    let mut relay = Relay::<RingAead>::new(
        layout,
        net.identities[0].clone(),
        vec![net.onions[0].clone()],
        net.peers.clone(),
        ExitPolicy::parse(&["accept 127.0.0.0/8:1-65535"]).unwrap(),
        RelayLimits {
            newcomer_setup_rate: 1,
            ..RelayLimits::default()
        },
        NOW_MS,
    );
    let key: RingAead = retry_key(&relay.id());
    // A spoofed setup takes the one newcomer token.
    let mut garbage = vec![7u8; layout.cell];
    assert_eq!(
        relay.handle("127.9.9.9:1".parse().unwrap(), &mut garbage, NOW_MS),
        Action::Drop(DropReason::Malformed)
    );
    assert_eq!(relay.stats().setup_dh, 1);

    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let _first = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &net.hops[..1],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    let setup = cell.clone();
    assert_eq!(
        relay.handle(CLIENT, &mut cell, NOW_MS),
        Action::Send {
            to: CLIENT,
            event: None
        }
    );
    assert_eq!(relay.stats().setup_dh, 1, "a RETRY costs no X25519");
    assert_eq!(relay.stats().retries_sent, 1);
    let token = open_retry(&layout, &key, &setup, &mut cell).expect("a RETRY for our setup");

    // The token from another address, or too late, is worth another RETRY only.
    let mut stolen = setup.clone();
    apply_token(&token, &mut stolen);
    let thief: std::net::SocketAddr = "127.0.0.101:40000".parse().unwrap();
    assert_eq!(
        relay.handle(thief, &mut stolen.clone(), NOW_MS + 1),
        Action::Send {
            to: thief,
            event: None
        }
    );
    let late = NOW_MS + 2 * RETRY_EPOCH_S * 1000;
    // (The newcomer budget has refilled by then: spend it again.)
    let mut garbage = vec![8u8; layout.cell];
    relay.handle("127.9.9.9:1".parse().unwrap(), &mut garbage, late);
    let mut stale = stolen.clone();
    assert!(matches!(
        relay.handle(CLIENT, &mut stale, late),
        Action::Send {
            to: CLIENT,
            event: None
        }
    ));
    assert_eq!(relay.stats().setup_dh, 2);
    assert_eq!(relay.stats().retries_sent, 3);

    // The client builds again (the token goes in place of the random header).
    link.set_retry_token(token, NOW_MS);
    let mut c = ClientCircuit::<RingAead>::build(
        &layout,
        &link,
        &net.hops[..1],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    assert_eq!(&cell[..16], &token[..]);
    let circuit = match relay.handle(CLIENT, &mut cell, NOW_MS + 2) {
        Action::Send {
            to: CLIENT,
            event: Some(Event::ExitOpened { circuit, .. }),
        } => circuit,
        other => panic!("expected CREATED, got {other:?}"),
    };
    assert_eq!(relay.stats().setup_dh, 3);
    let hdr = link.read_header(&cell).unwrap();
    assert_eq!(c.open(&hdr, &mut cell), Ok(Received::Created));
    // Validated at once: the exit's replies are not held to the client's credit.
    for _ in 0..5 {
        let mut reply = vec![0u8; layout.cell];
        assert_eq!(
            relay.exit_reply(circuit, b"early", &mut reply, NOW_MS + 3),
            Ok(CLIENT)
        );
    }
    assert_eq!(relay.stats().drops[DropReason::Unvalidated as usize], 0);
}

/// The per-batch budget: at most `setup_budget` client setups of one receive batch get
/// public-key work, the rest of the batch's are refused as rate_limited before any
/// (so setups cannot starve the batch's data cells), and the next batch starts afresh;
/// a setup arriving from a peer relay is never charged to it.
#[test]
fn setup_budget_caps_client_setups_per_batch_but_not_peer_setups() {
    let layout = Layout::default();
    let mut r = rng(93);
    let mut net = Net::<RingAead>::new(layout, 2, &mut r);
    let setup_from = |net: &Net<RingAead>, path: &[usize], r: &mut TestRng| {
        let link = ClientLink::new(&net.hops[path[0]].id, net.addrs[path[0]], r);
        let hops: Vec<_> = path.iter().map(|&i| net.hops[i]).collect();
        let mut cell = vec![0u8; layout.cell];
        ClientCircuit::<RingAead>::build(&layout, &link, &hops, DEST, NOW_MS, r, &mut cell)
            .unwrap();
        cell
    };
    let client = |k: u8| -> std::net::SocketAddr { format!("127.0.{k}.100:4000").parse().unwrap() };
    net.relays[0].begin_batch(2);
    let mut outcomes = Vec::new();
    for k in 0..4 {
        let mut cell = setup_from(&net, &[0], &mut r);
        outcomes.push(net.relays[0].handle(client(k), &mut cell, NOW_MS));
    }
    assert!(
        matches!(outcomes[0], Action::Send { .. }),
        "{:?}",
        outcomes[0]
    );
    assert!(
        matches!(outcomes[1], Action::Send { .. }),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2], Action::Drop(DropReason::RateLimited));
    assert_eq!(outcomes[3], Action::Drop(DropReason::RateLimited));
    assert_eq!(
        net.relays[0].stats().setup_dh,
        2,
        "no X25519 beyond the budget"
    );
    net.relays[0].begin_batch(2);
    let mut cell = setup_from(&net, &[0], &mut r);
    assert!(matches!(
        net.relays[0].handle(client(9), &mut cell, NOW_MS),
        Action::Send { .. }
    ));

    // At relay 1 with no budget left: a client's setup is refused, the setup relay 0
    // forwards on its peer link is not.
    let mut cell = setup_from(&net, &[0, 1], &mut r);
    net.relays[0].begin_batch(1);
    let Action::Send { to, .. } = net.relays[0].handle(client(20), &mut cell, NOW_MS) else {
        panic!("hop 0 admits the 2-hop setup");
    };
    assert_eq!(to, net.addrs[1]);
    net.relays[1].begin_batch(0);
    let mut direct = setup_from(&net, &[1], &mut r);
    assert_eq!(
        net.relays[1].handle(client(21), &mut direct, NOW_MS),
        Action::Drop(DropReason::RateLimited)
    );
    let from_peer = std::net::SocketAddr::new(net.addrs[0].ip(), net.addrs[0].port());
    match net.relays[1].handle(from_peer, &mut cell, NOW_MS) {
        Action::Send { to, .. } => assert_eq!(to, from_peer, "CREATED back to hop 0"),
        other => panic!("a peer's setup was charged to the client budget: {other:?}"),
    }
}

/// The relay keeps only raw layer keys per circuit and expands them into a small
/// cache (`RelayLimits::key_cache`). With 2 entries and 6 circuits through the same
/// three relays whose cells interleave, nearly every cell finds another circuit's keys
/// in its entry: each must still get its own, both ways (forward tags verify at every
/// hop, the client verifies every backward layer).
#[test]
fn more_busy_circuits_than_the_key_cache_holds_still_carry_every_cell_both_ways() {
    let layout = Layout::default();
    for (cache, rounds) in [(2usize, 4u64), (4096, 4)] {
        let mut r = rng(31);
        let limits = RelayLimits {
            max_circuits: 64,
            max_links: 64,
            key_cache: cache,
            ..RelayLimits::default()
        };
        let mut net = Net::<RingAead>::with_limits(layout, 3, limits, &mut r);
        let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
        let mut circuits: Vec<ClientCircuit<RingAead>> = (0..6)
            .map(|_| net.open_circuit(&[0, 1, 2], &mut link, &mut r))
            .collect();
        let before: Vec<u64> = net
            .relays
            .iter()
            .map(|x| x.stats().key_cache_misses)
            .collect();
        for round in 0..rounds {
            for (k, c) in circuits.iter_mut().enumerate() {
                let payload = vec![(round * 16 + k as u64) as u8; 300];
                let mut cell = vec![0u8; layout.cell];
                c.seal_data(&link, &payload, &mut cell, &mut r).unwrap();
                net.send(CLIENT, net.addrs[0], cell);
                assert_eq!(net.delivered.pop().expect("delivered").1, payload);
                let mut back = net.to_client.pop_front().expect("the echo returns");
                let hdr = link.read_header(&back).unwrap();
                match c.open(&hdr, &mut back).unwrap() {
                    Received::Data(range) => assert_eq!(&back[range], &payload[..]),
                    other => panic!("expected data, got {other:?}"),
                }
            }
        }
        assert!(net.drops.is_empty(), "{:?}", net.drops);
        for (i, relay) in net.relays.iter().enumerate() {
            let misses = relay.stats().key_cache_misses - before[i];
            if cache == 2 {
                // 6 circuits x rounds cells each way; the entries alternate.
                assert!(misses >= 6 * rounds, "relay {i}: only {misses} misses");
            } else {
                // The backward keys were cached by the CREATED; each circuit's
                // forward keys miss once, on its first data cell.
                assert_eq!(misses, 6, "relay {i}");
            }
        }
    }
}
