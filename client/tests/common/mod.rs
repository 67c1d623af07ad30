//! A real-UDP test network: each relay is a `shroud_proto::relay::Relay` state machine
//! on its own thread and its own `127.0.0.1` socket, with the exit's traffic to and
//! from destinations on one UDP socket per exit circuit. There is no relay daemon yet;
//! this is the smallest driver that moves real datagrams through real relays.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use shroud_proto::cell::{Command, Header, HeaderKey};
use shroud_proto::client::PathHop;
use shroud_proto::keys::{IdentityKey, IdentityPublic, OnionSecret, RelayId};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{peer_link_keys, Action, DropReason, Event, Peer, Relay, RelayLimits};
use shroud_proto::{DefaultAead, Layout};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(LOCALHOST, port)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// How one relay of the test network behaves.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// Exit policy rules.
    pub policy: Vec<&'static str>,
    /// Listed with the exit flag.
    pub exit: bool,
    /// Drop this many received datagrams before handling any (simulated loss).
    pub drop_first: u64,
    /// Send every outgoing datagram twice (simulated duplication / replay).
    pub duplicate: bool,
    /// Exit: hold replies from destinations until this many are pending, then send
    /// them as one datagram of several cells (as a GSO sender without segmentation
    /// offload on the path, or GRO at the receiver, would deliver them). 0: off.
    pub coalesce_replies: usize,
}

impl Default for RelayOpts {
    fn default() -> Self {
        RelayOpts {
            policy: vec!["accept 127.0.0.0/8:1-65535"],
            exit: true,
            drop_first: 0,
            duplicate: false,
            coalesce_replies: 0,
        }
    }
}

enum Ctl {
    /// Originate a backward DESTROY on the circuit of the last cell received from a
    /// peer relay, as if that peer had torn it down.
    ForgeDestroyFromLastPeer,
}

/// A running relay thread.
pub struct RelayHandle {
    pub addr: SocketAddr,
    pub id: RelayId,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    ctl: mpsc::Sender<Ctl>,
    drops: Arc<Mutex<Vec<DropReason>>>,
    delivered: Arc<AtomicU64>,
}

impl RelayHandle {
    /// Stops the relay thread and closes its sockets.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("relay thread panicked");
        }
    }

    /// Drop reasons counted so far (including refusals).
    pub fn drops(&self) -> Vec<DropReason> {
        self.drops.lock().unwrap().clone()
    }

    /// Payloads delivered to destinations (exit role).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// See [`Ctl::ForgeDestroyFromLastPeer`].
    pub fn forge_destroy_from_last_peer(&self) {
        self.ctl.send(Ctl::ForgeDestroyFromLastPeer).unwrap();
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A network of relays on 127.0.0.1 and its in-memory (unsigned) peer list.
pub struct TestNet {
    pub layout: Layout,
    pub list: PeerList,
    pub relays: Vec<RelayHandle>,
    /// `hops[i]`: the path hop for relay `i`.
    pub hops: Vec<PathHop>,
}

impl TestNet {
    pub fn new(opts: &[RelayOpts]) -> TestNet {
        let layout = Layout::default();
        let sockets: Vec<UdpSocket> = opts
            .iter()
            .map(|_| UdpSocket::bind(local(0)).unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let identities: Vec<IdentityKey> = opts
            .iter()
            .map(|_| IdentityKey::generate(&mut OsRng))
            .collect();
        let onions: Vec<OnionSecret> = opts
            .iter()
            .map(|_| OnionSecret::generate(&mut OsRng))
            .collect();
        let peers: Vec<Peer> = identities
            .iter()
            .zip(&addrs)
            .map(|(k, a)| Peer {
                id: k.public().relay_id(),
                identity: k.public(),
                addr: a.ip(),
                ports: (a.port(), a.port()),
            })
            .collect();
        let now = unix_ms();
        let mut list = PeerList::new(
            1,
            now / 1000 - 60,
            now / 1000 + 3600,
            NetworkParams::default(),
        );
        for (i, o) in opts.iter().enumerate() {
            list.relays.push(RelayDescriptor {
                identity: identities[i].public(),
                addr: addrs[i].ip(),
                ports: (addrs[i].port(), addrs[i].port()),
                onion_keys: vec![OnionKeyEntry {
                    key: onions[i].public(),
                    valid_until: now / 1000 + 7200,
                }],
                exit: o.exit,
                weight: 100,
            });
        }
        list.normalize();
        let by_addr: HashMap<SocketAddr, IdentityPublic> = addrs
            .iter()
            .zip(&identities)
            .map(|(a, k)| (*a, k.public()))
            .collect();
        let hops = (0..opts.len())
            .map(|i| PathHop {
                id: identities[i].public().relay_id(),
                onion: onions[i].public(),
                addr: addrs[i],
            })
            .collect();
        let relays = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let relay = Relay::<DefaultAead>::new(
                    layout,
                    identities[i].clone(),
                    vec![onions[i].clone()],
                    peers.clone(),
                    ExitPolicy::parse(&opts[i].policy).unwrap(),
                    RelayLimits {
                        max_circuits: 256,
                        max_links: 64,
                        // Every test source is 127.0.0.1: do not rate-limit it.
                        setup_rate: 100_000,
                        setup_burst: 100_000,
                        ..RelayLimits::default()
                    },
                    now,
                );
                spawn_relay(
                    relay,
                    identities[i].clone(),
                    by_addr.clone(),
                    socket,
                    opts[i].clone(),
                )
            })
            .collect();
        TestNet {
            layout,
            list,
            relays,
            hops,
        }
    }

    /// `n` relays with the default options.
    pub fn plain(n: usize) -> TestNet {
        TestNet::new(&vec![RelayOpts::default(); n])
    }

    pub fn path(&self, relays: &[usize]) -> Vec<PathHop> {
        relays.iter().map(|&i| self.hops[i]).collect()
    }
}

struct Worker {
    relay: Relay<DefaultAead>,
    identity: IdentityKey,
    peers: HashMap<SocketAddr, IdentityPublic>,
    socket: UdpSocket,
    opts: RelayOpts,
    exits: HashMap<shroud_proto::relay::CircuitRef, UdpSocket>,
    drops: Arc<Mutex<Vec<DropReason>>>,
    delivered: Arc<AtomicU64>,
    dropped_first: u64,
    /// Replies held for coalescing: (destination, cells).
    held: Option<(SocketAddr, Vec<u8>)>,
    /// The last (peer address, circuit id on that link) a cell arrived with from a peer.
    last_peer_circuit: Option<(SocketAddr, u64)>,
    /// The header counter of the last cell sent to a peer relay (read with our link
    /// key): a forged backward cell must come after it.
    last_peer_counter: std::cell::Cell<u64>,
}

fn spawn_relay(
    relay: Relay<DefaultAead>,
    identity: IdentityKey,
    peers: HashMap<SocketAddr, IdentityPublic>,
    socket: UdpSocket,
    opts: RelayOpts,
) -> RelayHandle {
    let addr = socket.local_addr().unwrap();
    let id = relay.id();
    let stop = Arc::new(AtomicBool::new(false));
    let drops = Arc::new(Mutex::new(Vec::new()));
    let delivered = Arc::new(AtomicU64::new(0));
    let (ctl_tx, ctl_rx) = mpsc::channel();
    socket.set_nonblocking(true).unwrap();
    let mut w = Worker {
        relay,
        identity,
        peers,
        socket,
        opts,
        exits: HashMap::new(),
        drops: Arc::clone(&drops),
        delivered: Arc::clone(&delivered),
        dropped_first: 0,
        held: None,
        last_peer_circuit: None,
        last_peer_counter: std::cell::Cell::new(0),
    };
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name(format!("relay-{addr}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let busy = w.poll();
                    while let Ok(c) = ctl_rx.try_recv() {
                        match c {
                            Ctl::ForgeDestroyFromLastPeer => w.forge_destroy(),
                        }
                    }
                    if !busy {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
            .unwrap()
    };
    RelayHandle {
        addr,
        id,
        stop,
        thread: Some(thread),
        ctl: ctl_tx,
        drops,
        delivered,
    }
}

impl Worker {
    fn send(&self, bytes: &[u8], to: SocketAddr) {
        let cell_len = self.relay.layout().cell;
        if let (Some(peer), true) = (self.peers.get(&to), bytes.len() >= cell_len) {
            let (tx, _) = peer_link_keys(&self.identity, peer);
            if let Ok(h) = tx.unprotect(&bytes[bytes.len() - cell_len..]) {
                self.last_peer_counter.set(h.counter);
            }
        }
        let n = if self.opts.duplicate { 2 } else { 1 };
        for _ in 0..n {
            let _ = self.socket.send_to(bytes, to);
        }
    }

    fn drop_reason(&self, r: DropReason) {
        self.drops.lock().unwrap().push(r);
    }

    /// One round over the relay socket and the exit sockets; true if anything moved.
    fn poll(&mut self) -> bool {
        let mut busy = false;
        let mut buf = vec![0u8; 65536];
        let cell_len = self.relay.layout().cell;
        loop {
            let (n, src) = match self.socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            busy = true;
            if self.dropped_first < self.opts.drop_first {
                self.dropped_first += 1;
                continue;
            }
            if n == 0 || n % cell_len != 0 {
                self.drop_reason(DropReason::Malformed);
                continue;
            }
            for cell in buf[..n].chunks_exact_mut(cell_len) {
                self.note_peer_circuit(src, cell);
                match self.relay.handle(src, cell, unix_ms()) {
                    Action::Send { to, event } => {
                        self.send(cell, to);
                        if let Some(Event::Closed { circuit }) = event {
                            self.exits.remove(&circuit);
                        }
                    }
                    // This harness offers no mix mode (the default limits), so
                    // nothing is held; a held cell would go on at once.
                    Action::Delay { to, .. } => self.send(cell, to),
                    Action::Refuse { to, reason } => {
                        self.drop_reason(reason);
                        self.send(cell, to);
                    }
                    Action::Deliver {
                        circuit,
                        dest,
                        payload,
                    } => {
                        let s = self.exits.entry(circuit).or_insert_with(|| {
                            let s = UdpSocket::bind(local(0)).unwrap();
                            s.set_nonblocking(true).unwrap();
                            s
                        });
                        let _ = s.send_to(&cell[payload], dest);
                        self.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Action::Consumed { event } => {
                        if let Some(Event::Closed { circuit }) = event {
                            self.exits.remove(&circuit);
                        }
                    }
                    Action::Drop(r) => self.drop_reason(r),
                }
            }
        }
        // Replies from destinations go back along their circuit.
        let mut out = vec![0u8; cell_len];
        let mut sends = Vec::new();
        for (circuit, s) in &self.exits {
            while let Ok((n, _from)) = s.recv_from(&mut buf) {
                busy = true;
                match self
                    .relay
                    .exit_reply(*circuit, &buf[..n], &mut out, unix_ms())
                {
                    Ok(to) => sends.push((out.clone(), to)),
                    Err(r) => self.drops.lock().unwrap().push(r),
                }
            }
        }
        for (cell, to) in sends {
            if self.opts.coalesce_replies == 0 {
                self.send(&cell, to);
                continue;
            }
            let (_, held) = self.held.get_or_insert_with(|| (to, Vec::new()));
            held.extend_from_slice(&cell);
            if held.len() == self.opts.coalesce_replies * cell_len {
                if let Some((to, cells)) = self.held.take() {
                    self.send(&cells, to);
                }
            }
        }
        busy
    }

    /// Remembers the circuit id of a cell from a peer relay (header read with the peer
    /// link key, as the relay itself will).
    fn note_peer_circuit(&mut self, src: SocketAddr, cell: &[u8]) {
        if let Some(peer) = self.peers.get(&src) {
            let (_, rx) = peer_link_keys(&self.identity, peer);
            if let Ok(h) = rx.unprotect(cell) {
                self.last_peer_circuit = Some((src, h.circuit));
            }
        }
    }

    /// Sends the previous relay a backward DESTROY for the last circuit it used, built
    /// the way an originating hop builds a control cell (origin marker body, all-zero
    /// stack) but without a layer of ours: the previous relay adds its own layer, so to
    /// the client the DESTROY comes from that previous relay.
    fn forge_destroy(&mut self) {
        let Some((to, circuit)) = self.last_peer_circuit else {
            return;
        };
        let peer = self.peers[&to];
        let (tx, _): (HeaderKey, HeaderKey) = peer_link_keys(&self.identity, &peer);
        let mut cell = vec![0u8; self.relay.layout().cell];
        tx.protect(
            &mut cell,
            &Header {
                circuit,
                // Just after the last counter this relay sent on the link.
                counter: shroud_proto::cell::counter_add(self.last_peer_counter.get(), 1),
                command: Command::Destroy,
            },
        );
        let _ = self.socket.send_to(&cell, to);
    }
}
