//! A deterministic in-process network of relays for protocol tests: cells are moved
//! between `Relay` state machines by a queue, with no sockets and no clock.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rand_core::{CryptoRng, RngCore, SeedableRng};
use shroud_proto::aead::Aead;
use shroud_proto::client::{ClientCircuit, ClientLink, PathHop, Received};
use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{Action, Peer, Relay, RelayLimits};
use shroud_proto::Layout;

pub const NOW_MS: u64 = 1_764_000_000_000;
pub const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 100)), 40000);
pub const DEST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200)), 7);

/// Deterministic generator so every test run sees the same keys and cells. It is NOT
/// a CSPRNG; it is marked `CryptoRng` only so the protocol API accepts it in tests.
pub type TestRng = splitmix::Rng;

pub mod splitmix {
    use rand_core::{impls, CryptoRng, Error, RngCore, SeedableRng};
    /// SplitMix64-based deterministic generator, marked CryptoRng for tests only.
    #[derive(Debug, Clone)]
    pub struct Rng(u64);
    impl RngCore for Rng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            impls::fill_bytes_via_next(self, dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for Rng {}
    impl SeedableRng for Rng {
        type Seed = [u8; 8];
        fn from_seed(seed: [u8; 8]) -> Self {
            Rng(u64::from_le_bytes(seed))
        }
    }
}

pub fn rng(seed: u64) -> TestRng {
    TestRng::from_seed(seed.to_le_bytes())
}

pub struct Net<A: Aead> {
    pub layout: Layout,
    pub relays: Vec<Relay<A>>,
    pub addrs: Vec<SocketAddr>,
    pub hops: Vec<PathHop>,
    pub identities: Vec<IdentityKey>,
    pub onions: Vec<OnionSecret>,
    /// The peer list every relay was given.
    pub peers: Vec<Peer>,
    /// Every datagram that crossed a link: (from, to, bytes).
    pub wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Payloads delivered at exits: (dest, bytes).
    pub delivered: Vec<(SocketAddr, Vec<u8>)>,
    /// Cells that reached the client.
    pub to_client: VecDeque<Vec<u8>>,
    pub drops: Vec<(usize, shroud_proto::relay::DropReason)>,
    /// The circuit of the last payload an exit delivered.
    pub last_exit: Option<shroud_proto::relay::CircuitRef>,
    /// `(relay, mean_ms)` of every cell a relay held (mix mode), in order.
    pub delayed: Vec<(usize, u16)>,
}

pub fn relay_addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)), 9000)
}

impl<A: Aead> Net<A> {
    pub fn new<R: RngCore + CryptoRng>(layout: Layout, n: usize, rng: &mut R) -> Self {
        Self::with_limits(
            layout,
            n,
            RelayLimits {
                max_circuits: 64,
                max_links: 64,
                max_mix_mean_ms: 1000,
                ..RelayLimits::default()
            },
            rng,
        )
    }

    /// `n` relays with `limits`.
    pub fn with_limits<R: RngCore + CryptoRng>(
        layout: Layout,
        n: usize,
        limits: RelayLimits,
        rng: &mut R,
    ) -> Self {
        let identities: Vec<IdentityKey> = (0..n).map(|_| IdentityKey::generate(rng)).collect();
        let onions: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(rng)).collect();
        let addrs: Vec<SocketAddr> = (0..n).map(relay_addr).collect();
        let peers: Vec<Peer> = identities
            .iter()
            .zip(&addrs)
            .map(|(k, a)| Peer {
                id: k.public().relay_id(),
                identity: k.public(),
                addr: a.ip(),
                ports: (a.port(), a.port() + 1),
            })
            .collect();
        let policy = ExitPolicy::parse(&["accept 127.0.0.0/8:1-65535"]).unwrap();
        let relays = identities
            .iter()
            .zip(&onions)
            .map(|(k, o)| {
                Relay::new(
                    layout,
                    k.clone(),
                    vec![o.clone()],
                    peers.clone(),
                    policy.clone(),
                    limits.clone(),
                    NOW_MS,
                )
            })
            .collect();
        let hops = identities
            .iter()
            .zip(&onions)
            .zip(&addrs)
            .map(|((k, o), a)| PathHop {
                id: k.public().relay_id(),
                onion: o.public(),
                addr: *a,
            })
            .collect();
        Net {
            layout,
            relays,
            addrs,
            hops,
            identities,
            onions,
            peers,
            wire: Vec::new(),
            delivered: Vec::new(),
            to_client: VecDeque::new(),
            drops: Vec::new(),
            last_exit: None,
            delayed: Vec::new(),
        }
    }

    pub fn relay_index(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|a| {
            a.ip() == addr.ip() && (addr.port() == a.port() || addr.port() == a.port() + 1)
        })
    }

    /// Sends `cell` from `from` to `to` and runs the network until quiet.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, cell: Vec<u8>) {
        let mut q = VecDeque::from([(from, to, cell)]);
        while let Some((from, to, mut cell)) = q.pop_front() {
            self.wire.push((from, to, cell.clone()));
            if to == CLIENT {
                self.to_client.push_back(cell);
                continue;
            }
            let Some(i) = self.relay_index(to) else {
                panic!("datagram to unknown address {to}");
            };
            let action = self.relays[i].handle(from, &mut cell, NOW_MS);
            match action {
                Action::Send { to: next, .. } => q.push_back((to, next, cell)),
                // No clock here: a held cell goes on at once, and the hold is noted.
                Action::Delay { to: next, mean_ms } => {
                    self.delayed.push((i, mean_ms));
                    q.push_back((to, next, cell))
                }
                Action::Refuse { to: next, reason } => {
                    self.drops.push((i, reason));
                    q.push_back((to, next, cell))
                }
                Action::Deliver {
                    circuit,
                    dest,
                    payload,
                } => {
                    let data = cell[payload].to_vec();
                    self.delivered.push((dest, data.clone()));
                    self.last_exit = Some(circuit);
                    // Echo it back along the circuit, as the exit's UDP peer would.
                    let mut reply = vec![0u8; self.layout.cell];
                    let back = self.relays[i]
                        .exit_reply(circuit, &data, &mut reply, NOW_MS)
                        .unwrap();
                    q.push_back((to, back, reply));
                }
                Action::Consumed { .. } => {}
                Action::Drop(r) => self.drops.push((i, r)),
            }
        }
    }

    /// Builds a circuit through relays `path` and returns it open.
    pub fn open_circuit<R: RngCore + CryptoRng>(
        &mut self,
        path: &[usize],
        link: &mut ClientLink,
        rng: &mut R,
    ) -> ClientCircuit<A> {
        self.open_mixed_circuit(path, &[], link, rng)
    }

    /// Builds a mix-mode circuit (`mix[i]`: hop i's mean delay, ms) and returns it open.
    pub fn open_mixed_circuit<R: RngCore + CryptoRng>(
        &mut self,
        path: &[usize],
        mix: &[u16],
        link: &mut ClientLink,
        rng: &mut R,
    ) -> ClientCircuit<A> {
        let hops: Vec<PathHop> = path.iter().map(|&i| self.hops[i]).collect();
        let mut cell = vec![0u8; self.layout.cell];
        let mut c = ClientCircuit::<A>::build_mixed(
            &self.layout,
            link,
            &hops,
            mix,
            DEST,
            NOW_MS,
            rng,
            &mut cell,
        )
        .unwrap();
        let first = link.relay();
        self.send(CLIENT, first, cell);
        let mut reply = self
            .to_client
            .pop_front()
            .expect("CREATED reaches the client");
        let hdr = link.read_header(&reply).unwrap();
        assert_eq!(hdr.circuit, c.id());
        assert_eq!(c.open(&hdr, &mut reply).unwrap(), Received::Created);
        c
    }
}
