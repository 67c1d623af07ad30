//! The client's backward path: any cell arriving on the link of an open one-hop
//! circuit (through the fixture relay) goes through `ClientLink::read_header` and
//! `ClientCircuit::open`; neither may panic, whatever the bytes.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use shroud_proto::client::{ClientCircuit, ClientLink, PathHop};
use shroud_proto::keys::IdentityKey;
use shroud_proto::relay::Action;
use shroud_proto::{Command, Header, Layout, RingAead};

#[path = "common.rs"]
mod common;

struct Client {
    link: ClientLink,
    circuit: ClientCircuit<RingAead>,
}

fn client() -> &'static Mutex<Client> {
    static C: OnceLock<Mutex<Client>> = OnceLock::new();
    C.get_or_init(|| {
        let layout = Layout::default();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let relay_addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let client_addr: SocketAddr = "127.0.0.50:40000".parse().unwrap();
        // The fixture relay's identity (common::relay uses seed [1; 32]).
        let id = IdentityKey::from_bytes(&[1; 32]).public().relay_id();
        let hop = PathHop {
            id,
            onion: common::onion().public(),
            addr: relay_addr,
        };
        let mut link = ClientLink::new(&id, relay_addr, &mut rng);
        let mut cell = vec![0u8; layout.cell];
        let dest: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let mut circuit = ClientCircuit::<RingAead>::build(
            &layout,
            &link,
            &[hop],
            dest,
            common::NOW_MS,
            &mut rng,
            &mut cell,
        )
        .expect("build");
        let action = common::relay()
            .lock()
            .unwrap()
            .handle(client_addr, &mut cell, common::NOW_MS);
        match action {
            Action::Send { to, .. } if to == client_addr => {}
            other => panic!("the fixture relay did not answer the setup: {other:?}"),
        }
        let hdr = link.read_header(&cell).expect("CREATED header");
        circuit.open(&hdr, &mut cell).expect("CREATED opens");
        assert_eq!(
            circuit.state(),
            shroud_proto::client::CircuitState::Open,
            "circuit open"
        );
        Mutex::new(Client { link, circuit })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut c = client().lock().unwrap();
    let mut buf = vec![0u8; Layout::default().cell];
    let n = data.len().min(buf.len());
    buf[..n].copy_from_slice(&data[..n]);
    let Client { link, circuit } = &mut *c;
    if let Ok(hdr) = link.read_header(&buf) {
        let _ = circuit.open(&hdr, &mut buf);
    }
    // Header protection is keyed, so random bytes almost never get past
    // `read_header`: also hand `open` a header for this circuit taken from the input
    // (command byte, counter) with the rest of the input as the cell.
    if let Some((&cmd, rest)) = data.split_first() {
        if let (Some(command), Some(counter)) = (Command::from_u8(cmd), rest.get(..8)) {
            let hdr = Header {
                circuit: circuit.id(),
                counter: u64::from_le_bytes(counter.try_into().unwrap()),
                command,
            };
            let body = &rest[8..];
            buf.fill(0);
            let n = body.len().min(buf.len());
            buf[..n].copy_from_slice(&body[..n]);
            let _ = circuit.open(&hdr, &mut buf);
        }
    }
});
