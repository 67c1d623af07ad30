//! Mix mode on the wire: each hop learns its own mean delay inside its layer and
//! holds only the data cells of the circuits that asked it to; cover is consumed (or
//! looped back) at the exit and looks like data to every relay on the way.

mod common;

use common::*;
use shroud_proto::aead::RingAead;
use shroud_proto::client::{ClientCircuit, ClientError, ClientLink, Received};
use std::net::SocketAddr;

use rand_core::RngCore;
use shroud_proto::relay::{Action, DropReason};
use shroud_proto::setup::{Next, Routing, RoutingError};
use shroud_proto::Layout;

#[test]
fn only_the_hops_a_circuit_asked_hold_its_cells_and_plain_circuits_are_never_held() {
    let layout = Layout::default();
    let mut r = rng(41);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    // Hop 0 plain, hop 1 and the exit mixing.
    let mut mixed = net.open_mixed_circuit(&[0, 1, 2], &[0, 200, 300], &mut link, &mut r);
    assert!(net.delayed.is_empty(), "setups and CREATED are never held");
    let mut cell = vec![0u8; layout.cell];
    mixed.seal_data(&link, b"mixed", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.delivered.pop().unwrap().1, b"mixed");
    // Forward, hop 1 held it; backward (the harness echoes at the exit), hop 1 again.
    assert_eq!(net.delayed, vec![(1, 200), (1, 200)]);
    // The exit delivers and originates cells itself: the data plane asks it the mean.
    let at_exit = net.last_exit.unwrap();
    assert_eq!(net.relays[2].mix_mean_ms(at_exit), 300);
    let mut back = net.to_client.pop_front().unwrap();
    let hdr = link.read_header(&back).unwrap();
    assert!(matches!(mixed.open(&hdr, &mut back), Ok(Received::Data(_))));

    // A plain circuit over the same relays: nothing held anywhere.
    net.delayed.clear();
    let mut plain = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    let mut cell = vec![0u8; layout.cell];
    plain.seal_data(&link, b"plain", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.delivered.pop().unwrap().1, b"plain");
    assert!(net.delayed.is_empty());
    assert_eq!(net.relays[2].mix_mean_ms(net.last_exit.unwrap()), 0);
}

#[test]
fn a_mean_delay_above_the_hops_maximum_is_refused_with_reason_mix() {
    let layout = Layout::default();
    let mut r = rng(42);
    let mut net = Net::<RingAead>::new(layout, 2, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    // The harness's relays offer at most 1000 ms; hop 1 is asked for 1001.
    let mut c = ClientCircuit::<RingAead>::build_mixed(
        &layout,
        &link,
        &[net.hops[0], net.hops[1]],
        &[1000, 1001],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    )
    .unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.drops, vec![(1, DropReason::Mix)]);
    let mut reply = net.to_client.pop_front().expect("REFUSED comes back");
    let hdr = link.read_header(&reply).unwrap();
    assert_eq!(
        c.open(&hdr, &mut reply).unwrap(),
        Received::Refused {
            hop: 1,
            reason: DropReason::Mix as u8
        }
    );
    assert_eq!(net.relays[0].circuit_count(), 0);
    assert_eq!(net.relays[1].circuit_count(), 0);
}

#[test]
fn loop_cover_comes_back_as_cover_and_drop_cover_ends_at_the_exit() {
    let layout = Layout::default();
    let mut r = rng(43);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut c = net.open_mixed_circuit(&[0, 1, 2], &[50, 50, 50], &mut link, &mut r);
    net.wire.clear();
    let mut cell = vec![0u8; layout.cell];
    c.seal_loop_cover(&link, &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell.clone());
    assert!(net.delivered.is_empty(), "cover reaches no destination");
    let mut back = net.to_client.pop_front().expect("the loop comes back");
    let hdr = link.read_header(&back).unwrap();
    assert_eq!(c.open(&hdr, &mut back).unwrap(), Received::Padding);
    let exit = net.relays[2].stats();
    assert_eq!((exit.cover_received, exit.loop_cover_returned), (1, 1));
    // Held like data at every hop: forward at hops 0 and 1, the exit's cover reply,
    // then backward at hops 1 and 0.
    assert_eq!(
        net.delayed,
        vec![(0, 50), (1, 50), (2, 50), (1, 50), (0, 50)]
    );
    // Every link carried the same command as for data: the wire shows 6 cells.
    assert_eq!(net.wire.len(), 6);

    c.seal_padding(&link, &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell.clone());
    assert!(net.to_client.is_empty(), "drop cover is not answered");
    let exit = net.relays[2].stats();
    assert_eq!((exit.cover_received, exit.loop_cover_returned), (2, 1));
}

#[test]
fn mix_delays_must_name_every_hop() {
    let layout = Layout::default();
    let mut r = rng(44);
    let net = Net::<RingAead>::new(layout, 3, &mut r);
    let link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut cell = vec![0u8; layout.cell];
    let got = ClientCircuit::<RingAead>::build_mixed(
        &layout,
        &link,
        &net.hops,
        &[100, 100],
        DEST,
        NOW_MS,
        &mut r,
        &mut cell,
    );
    assert!(matches!(
        got,
        Err(ClientError::MixLength { got: 2, hops: 3 })
    ));
}

#[test]
fn the_mean_delay_is_bytes_108_to_110_of_the_routing_slot() {
    let routing = Routing {
        version: 2,
        next: Next::Exit { dest: DEST },
        timestamp: 1,
        in_id: 2,
        link_seed: [0; 16],
        e_next: [3; 32],
        t_next: [4; 16],
        mix_mean_ms: 0x1234,
    };
    let mut slot = routing.encode();
    assert_eq!(&slot[108..112], &[0x12, 0x34, 0, 0]);
    assert_eq!(Routing::decode(&slot).unwrap(), routing);
    slot[110] = 1;
    assert_eq!(Routing::decode(&slot), Err(RoutingError::Reserved));
}

#[test]
fn a_routing_slot_naming_circuit_id_0_is_invalid() {
    let mut routing = Routing {
        version: 2,
        next: Next::Exit { dest: DEST },
        timestamp: 1,
        in_id: 0,
        link_seed: [0; 16],
        e_next: [3; 32],
        t_next: [4; 16],
        mix_mean_ms: 0,
    };
    assert_eq!(
        Routing::decode(&routing.encode()),
        Err(RoutingError::ZeroId)
    );
    routing.in_id = 7;
    routing.next = Next::Relay {
        id: shroud_proto::keys::RelayId([1; 16]),
        port: 9000,
        out_id: 0,
    };
    assert_eq!(
        Routing::decode(&routing.encode()),
        Err(RoutingError::ZeroId)
    );
}

/// Writes the padding cells `relay` makes for a quota, as they leave it.
fn padding(
    net: &mut Net<RingAead>,
    relay: usize,
    quota: u32,
    r: &mut TestRng,
) -> Vec<(SocketAddr, Vec<u8>)> {
    let cell_len = net.layout.cell;
    let mut out = Vec::new();
    net.relays[relay].pad_links(quota, |write| {
        let mut cell = vec![0u8; cell_len];
        r.fill_bytes(&mut cell);
        let to = write(&mut cell);
        out.push((to, cell));
    });
    out
}

#[test]
fn constant_rate_links_top_up_peer_links_with_padding_the_peer_drops() {
    let layout = Layout::default();
    let mut r = rng(45);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    // No circuits, no padded links.
    assert!(padding(&mut net, 0, 5, &mut r).is_empty());
    let mut c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    // The setup went 0 -> 1 on the peer link and the CREATED came back, so relay 0 has
    // sent one cell on it this round: four padding cells top it up to five; the next
    // round (nothing sent meanwhile) takes five.
    let pads = padding(&mut net, 0, 5, &mut r);
    assert_eq!(pads.len(), 4);
    assert_eq!(padding(&mut net, 0, 5, &mut r).len(), 5);
    for (to, cell) in pads {
        assert_eq!(
            to, net.addrs[1],
            "only the peer link is padded, not the client's"
        );
        let action = net.relays[1].handle(net.addrs[0], &mut cell.clone(), NOW_MS);
        assert_eq!(action, Action::Consumed { event: None });
    }
    assert_eq!(net.relays[1].stats().link_padding_received, 4);
    assert_eq!(net.relays[0].stats().link_padding_sent, 9);
    assert!(net.relays[1].stats().drops.iter().all(|&d| d == 0));
    // Data counts toward the rate: three cells forward leave two to pad.
    for k in 0..3u8 {
        let mut cell = vec![0u8; layout.cell];
        c.seal_data(&link, &[k], &mut cell, &mut r).unwrap();
        net.send(CLIENT, net.addrs[0], cell);
    }
    assert_eq!(padding(&mut net, 0, 5, &mut r).len(), 2);
    // Above the rate nothing is added (the excess shows; OPERATIONS.md says so).
    assert!(padding(&mut net, 0, 0, &mut r).is_empty());
}
