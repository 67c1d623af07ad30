//! Property tests for the parsers and the round trip.

mod common;

use common::*;
use proptest::prelude::*;
use shroud_proto::cell::{Command, Header};
use shroud_proto::client::{ClientLink, Received};
use shroud_proto::relay::Action;
use shroud_proto::setup::Routing;
use shroud_proto::{Layout, RingAead};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn header_decode_never_panics_and_is_canonical(bytes in prop::array::uniform16(any::<u8>())) {
        if let Ok(h) = Header::decode(&bytes) {
            prop_assert_eq!(h.encode(), bytes);
        }
    }

    #[test]
    fn header_roundtrip(circuit in any::<u64>(), counter in 0u64..(1 << 48), cmd in prop::sample::select(vec![1u8, 2, 3, 5, 6])) {
        let h = Header { circuit, counter, command: Command::from_u8(cmd).unwrap() };
        prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn routing_decode_never_panics_and_is_canonical(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(r) = Routing::decode(&bytes) {
            prop_assert_eq!(&r.encode()[..], &bytes[..]);
        }
    }

    #[test]
    fn peer_list_params_and_layout_agree(cell in 0u16..9000, h_max in 0u8..12) {
        let p = shroud_proto::peerlist::NetworkParams { cell, h_max };
        prop_assert_eq!(
            p.validate().is_ok(),
            Layout::new(usize::from(cell), usize::from(h_max)).is_ok()
        );
    }

    #[test]
    fn cell_view_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1100)) {
        let layout = Layout::default();
        if let Ok(c) = shroud_proto::Cell::new_checked(&bytes[..], &layout) {
            prop_assert_eq!(c.header().len() + (0..8).map(|j| c.slot(j).unwrap().len()).sum::<usize>() + c.body().len(), 1024);
            prop_assert_eq!(c.setup_ephemeral().len() + c.setup_tag().len() + c.setup_region().len(), 1008);
        }
    }

    #[test]
    fn relay_handles_any_datagram(bytes in prop::collection::vec(any::<u8>(), 0..2100), from_peer in any::<bool>()) {
        let mut r = rng(11);
        let mut net = Net::<RingAead>::new(Layout::default(), 2, &mut r);
        let src = if from_peer { net.addrs[1] } else { CLIENT };
        let mut b = bytes.clone();
        let action = net.relays[0].handle(src, &mut b, NOW_MS);
        prop_assert!(matches!(action, Action::Drop(_)), "{:?}", action);
        prop_assert_eq!(net.relays[0].circuit_count(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_any_payload_any_length(
        hops in 1usize..=8,
        payload in prop::collection::vec(any::<u8>(), 0..=Layout::default().payload_max()),
        seed in any::<u64>(),
    ) {
        let layout = Layout::default();
        let mut r = rng(seed);
        let mut net = Net::<RingAead>::new(layout, hops, &mut r);
        let path: Vec<usize> = (0..hops).collect();
        let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
        let mut c = net.open_circuit(&path, &mut link, &mut r);
        let mut cell = vec![0u8; layout.cell];
        c.seal_data(&link, &payload, &mut cell, &mut r).unwrap();
        net.send(CLIENT, net.addrs[0], cell);
        prop_assert_eq!(&net.delivered.pop().unwrap().1, &payload);
        let mut back = net.to_client.pop_front().unwrap();
        let hdr = link.read_header(&back).unwrap();
        match c.open(&hdr, &mut back).unwrap() {
            Received::Data(range) => prop_assert_eq!(&back[range], &payload[..]),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}
