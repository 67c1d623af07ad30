//! The client side: build a circuit from a path of relays, seal outgoing cells, open
//! returning ones, tear down.
//!
//! A [`ClientLink`] is the client's end of one link (one local socket to one relay
//! port): it holds the link seed and the header keys derived from it. The first setup
//! sent on a link introduces the seed to the relay (inside the encrypted routing slot
//! of the first hop); until the client has received a cell on the link, its setup
//! cells carry a random header, afterwards a protected one.
//!
//! A [`ClientCircuit`] is a built (or building) circuit: its hops' layer keys, its
//! send counter and its receive window. Sealing and opening are pure functions of the
//! circuit state and the cell; the I/O half (sockets, timers) lives in the data-plane
//! crate.

use rand_core::{CryptoRng, RngCore};
use std::net::SocketAddr;

use crate::aead::Aead;
use crate::cell::{
    counter_add, Command, Header, HeaderError, HeaderKey, Layout, COUNTER_MAX, H_MAX_LIMIT,
};
use crate::keys::{OnionPublic, RelayId};
use crate::layer::{
    open_backward, read_body, seal_forward, write_cover, write_loop_cover, write_payload, Body,
    LayerKeys, ORIGIN_MARKER_LEN,
};
use crate::relay::client_link_keys;
use crate::replay::{ReplayWindow, WindowCheck};
use crate::setup::{build_setup, Next, SetupHop};

/// One relay of a path, as the client needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathHop {
    /// The relay's id.
    pub id: RelayId,
    /// Its current onion key.
    pub onion: OnionPublic,
    /// The address and port (worker) to use.
    pub addr: SocketAddr,
}

/// The client's end of one link.
pub struct ClientLink {
    relay: SocketAddr,
    seed: [u8; 16],
    up: HeaderKey,
    down: HeaderKey,
    linked: bool,
    /// The relay's retry token and when it arrived (ms).
    token: Option<([u8; crate::retry::TOKEN_LEN], u64)>,
}

impl core::fmt::Debug for ClientLink {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientLink")
            .field("relay", &self.relay)
            .field("linked", &self.linked)
            .finish_non_exhaustive()
    }
}

impl ClientLink {
    /// A new link to `relay` (`id`), with a fresh random seed.
    pub fn new<R: RngCore + CryptoRng>(id: &RelayId, relay: SocketAddr, rng: &mut R) -> Self {
        let mut seed = [0u8; 16];
        while seed == [0u8; 16] {
            rng.fill_bytes(&mut seed);
        }
        let (up, down) = client_link_keys(&seed, id);
        ClientLink {
            relay,
            seed,
            up,
            down,
            linked: false,
            token: None,
        }
    }

    /// The relay address this link talks to.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// Reads the header of a cell received on this link (which circuit it is for).
    /// Receiving any valid cell marks the link as established.
    pub fn read_header(&mut self, cell: &[u8]) -> Result<Header, HeaderError> {
        let h = self.down.unprotect(cell)?;
        self.linked = true;
        Ok(h)
    }

    /// True once the relay has answered on this link.
    pub fn is_linked(&self) -> bool {
        self.linked
    }

    /// Remembers the token of a `RETRY` from the relay (received at `now_ms`): until
    /// the link is established, setups built on it carry the token in place of their
    /// random header, for as long as the relay accepts it (one epoch,
    /// [`crate::retry::RETRY_EPOCH_S`]).
    pub fn set_retry_token(&mut self, token: [u8; crate::retry::TOKEN_LEN], now_ms: u64) {
        self.token = Some((token, now_ms));
    }

    /// The retry token to use at `now_ms`, if one is held and still accepted.
    pub fn retry_token(&self, now_ms: u64) -> Option<[u8; crate::retry::TOKEN_LEN]> {
        self.token
            .filter(|&(_, at)| now_ms.saturating_sub(at) < crate::retry::RETRY_EPOCH_S * 1000)
            .map(|(t, _)| t)
    }
}

/// Why a client operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The path is empty or longer than `H_MAX`.
    #[error("a circuit needs 1 to {max} hops, got {got}")]
    PathLength {
        /// Hops given.
        got: usize,
        /// H_MAX.
        max: usize,
    },
    /// The buffer is not one cell.
    #[error("buffer of {got} bytes is not one {want}-byte cell")]
    CellSize {
        /// Buffer length.
        got: usize,
        /// CELL.
        want: usize,
    },
    /// Payload larger than one cell carries.
    #[error("payload of {got} bytes exceeds the {max}-byte cell payload")]
    PayloadTooLarge {
        /// Payload length.
        got: usize,
        /// Maximum.
        max: usize,
    },
    /// The circuit is not open (still building, refused or closed).
    #[error("circuit is {0:?}, not open")]
    NotOpen(CircuitState),
    /// A received cell failed authentication or was replayed.
    #[error("received cell rejected: {0}")]
    Rejected(&'static str),
    /// The counter space is exhausted; build a new circuit.
    #[error("circuit counter exhausted")]
    Exhausted,
    /// Mix delays were given, but not one per hop.
    #[error("{got} mix delays for a path of {hops} hops")]
    MixLength {
        /// Delays given.
        got: usize,
        /// Hops in the path.
        hops: usize,
    },
    /// A hop's onion key is a low-order point: X25519 with it is all zeros, so the
    /// relay would contribute nothing to the circuit keys. Nothing was built.
    #[error("the onion key of hop {hop} is a low-order point; refusing to build")]
    BadOnionKey {
        /// Which hop (0-based).
        hop: usize,
    },
}

/// Lifecycle of a client circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Setup sent, no reply yet.
    Building,
    /// CREATED received: data may flow.
    Open,
    /// A hop refused (`hop` is 0-based) with a reason byte.
    Refused {
        /// Which hop.
        hop: usize,
        /// Reason code (`DropReason as u8`).
        reason: u8,
    },
    /// Torn down by either side.
    Closed,
}

/// What a received cell meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The circuit is now open.
    Created,
    /// Payload from the destination, at `cell[range]`.
    Data(core::ops::Range<usize>),
    /// Cover traffic.
    Padding,
    /// A hop refused the circuit.
    Refused {
        /// Which hop (0-based).
        hop: usize,
        /// Reason code.
        reason: u8,
    },
    /// A hop tore the circuit down.
    Destroyed {
        /// Which hop (0-based).
        hop: usize,
        /// Reason code (`expired` when the circuit idled out at that hop).
        reason: u8,
    },
}

/// A client circuit.
pub struct ClientCircuit<A: Aead> {
    layout: Layout,
    id: u64,
    first_hop: SocketAddr,
    fwd: Vec<LayerKeys<A>>,
    bwd: Vec<LayerKeys<A>>,
    /// Start of the counters the first hop sees: random until CREATED, then the first
    /// hop's cookie from the CREATED header (echoing it validates the address).
    base: u64,
    send_counter: u64,
    /// Replay window over the exit's backward sequence numbers.
    window: ReplayWindow,
    state: CircuitState,
}

impl<A: Aead> core::fmt::Debug for ClientCircuit<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientCircuit")
            .field("id", &self.id)
            .field("hops", &self.fwd.len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn nonzero_id<R: RngCore>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64();
        if v != 0 {
            return v;
        }
    }
}

impl<A: Aead> ClientCircuit<A> {
    /// Builds a circuit through `path` (first hop first, reached over `link`) to the
    /// exit destination `dest`, writing the setup cell into `cell`. Send `cell` to
    /// `link.relay()`; the circuit opens when [`ClientCircuit::open`] sees CREATED.
    /// A low-order onion key in `path` is refused ([`ClientError::BadOnionKey`]).
    pub fn build<R: RngCore + CryptoRng>(
        layout: &Layout,
        link: &ClientLink,
        path: &[PathHop],
        dest: SocketAddr,
        now_ms: u64,
        rng: &mut R,
        cell: &mut [u8],
    ) -> Result<Self, ClientError> {
        Self::build_mixed(layout, link, path, &[], dest, now_ms, rng, cell)
    }

    /// [`ClientCircuit::build`] for a mix-mode circuit: hop `i` holds each data cell
    /// for an exponential delay of mean `mix_mean_ms[i]` milliseconds (0: no delay at
    /// that hop). `mix_mean_ms` is empty (a plain circuit) or has one entry per hop.
    #[allow(clippy::too_many_arguments)]
    pub fn build_mixed<R: RngCore + CryptoRng>(
        layout: &Layout,
        link: &ClientLink,
        path: &[PathHop],
        mix_mean_ms: &[u16],
        dest: SocketAddr,
        now_ms: u64,
        rng: &mut R,
        cell: &mut [u8],
    ) -> Result<Self, ClientError> {
        if !mix_mean_ms.is_empty() && mix_mean_ms.len() != path.len() {
            return Err(ClientError::MixLength {
                got: mix_mean_ms.len(),
                hops: path.len(),
            });
        }
        if path.is_empty() || path.len() > layout.h_max {
            return Err(ClientError::PathLength {
                got: path.len(),
                max: layout.h_max,
            });
        }
        if cell.len() != layout.cell {
            return Err(ClientError::CellSize {
                got: cell.len(),
                want: layout.cell,
            });
        }
        let ids: Vec<u64> = path.iter().map(|_| nonzero_id(rng)).collect();
        let hops: Vec<SetupHop> = path
            .iter()
            .enumerate()
            .map(|(i, hop)| SetupHop {
                onion_pub: *hop.onion.as_bytes(),
                next: match path.get(i + 1) {
                    Some(n) => Next::Relay {
                        id: n.id,
                        port: n.addr.port(),
                        out_id: ids[i + 1],
                    },
                    None => Next::Exit { dest },
                },
                in_id: ids[i],
                link_seed: if i == 0 { link.seed } else { [0; 16] },
                mix_mean_ms: mix_mean_ms.get(i).copied().unwrap_or(0),
            })
            .collect();
        let secrets = build_setup::<A, R>(layout, &hops, now_ms / 1000, rng, cell)
            .map_err(|e| ClientError::BadOnionKey { hop: e.hop })?;
        if link.linked {
            link.up.protect(
                cell,
                &Header {
                    circuit: ids[0],
                    counter: 0,
                    command: Command::Setup,
                },
            );
        } else if let Some(token) = link.retry_token(now_ms) {
            crate::retry::apply_token(&token, cell);
        } else {
            rng.fill_bytes(&mut cell[..crate::cell::HEADER_LEN]);
        }
        Ok(ClientCircuit {
            layout: *layout,
            id: ids[0],
            first_hop: link.relay,
            fwd: secrets.iter().map(|s| s.forward()).collect(),
            bwd: secrets.iter().map(|s| s.backward()).collect(),
            base: rng.next_u64() & (COUNTER_MAX >> 1),
            send_counter: 0,
            window: ReplayWindow::new(),
            state: CircuitState::Building,
        })
    }

    /// Circuit id on the first link (what [`ClientLink::read_header`] returns for
    /// cells of this circuit).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where to send this circuit's cells.
    pub fn first_hop(&self) -> SocketAddr {
        self.first_hop
    }

    /// Number of hops.
    pub fn hops(&self) -> usize {
        self.fwd.len()
    }

    /// Current state.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Cells sealed so far.
    pub fn sent(&self) -> u64 {
        self.send_counter
    }

    fn seal(
        &mut self,
        link: &ClientLink,
        command: Command,
        cell: &mut [u8],
        junk: &[[u8; 16]; H_MAX_LIMIT],
    ) -> Result<(), ClientError> {
        if self.send_counter >= MAX_CELLS {
            return Err(ClientError::Exhausted);
        }
        let counter = counter_add(self.base, self.send_counter);
        self.send_counter += 1;
        seal_forward(&self.layout, &self.fwd, command, counter, cell, junk);
        link.up.protect(
            cell,
            &Header {
                circuit: self.id,
                counter,
                command,
            },
        );
        Ok(())
    }

    fn check_cell(&self, cell: &[u8]) -> Result<(), ClientError> {
        if cell.len() != self.layout.cell {
            return Err(ClientError::CellSize {
                got: cell.len(),
                want: self.layout.cell,
            });
        }
        Ok(())
    }

    /// Seals `payload` into a data cell in `cell`, ready to send to the first hop.
    pub fn seal_data<R: RngCore>(
        &mut self,
        link: &ClientLink,
        payload: &[u8],
        cell: &mut [u8],
        rng: &mut R,
    ) -> Result<(), ClientError> {
        self.check_cell(cell)?;
        if self.state != CircuitState::Open {
            return Err(ClientError::NotOpen(self.state));
        }
        if !write_payload(&self.layout, cell, payload) {
            return Err(ClientError::PayloadTooLarge {
                got: payload.len(),
                max: self.layout.payload_max(),
            });
        }
        let junk = random_junk(rng);
        self.seal(link, Command::Data, cell, &junk)
    }

    /// Seals a cover (padding) cell, discarded by the exit.
    pub fn seal_padding<R: RngCore>(
        &mut self,
        link: &ClientLink,
        cell: &mut [u8],
        rng: &mut R,
    ) -> Result<(), ClientError> {
        self.check_cell(cell)?;
        if self.state != CircuitState::Open {
            return Err(ClientError::NotOpen(self.state));
        }
        write_cover(&self.layout, cell);
        let junk = random_junk(rng);
        self.seal(link, Command::Data, cell, &junk)
    }

    /// Seals a loop cover cell: the exit discards it and sends a cover cell back on
    /// this circuit (which [`ClientCircuit::open`] reports as [`Received::Padding`]).
    pub fn seal_loop_cover<R: RngCore>(
        &mut self,
        link: &ClientLink,
        cell: &mut [u8],
        rng: &mut R,
    ) -> Result<(), ClientError> {
        self.check_cell(cell)?;
        if self.state != CircuitState::Open {
            return Err(ClientError::NotOpen(self.state));
        }
        write_loop_cover(&self.layout, cell);
        let junk = random_junk(rng);
        self.seal(link, Command::Data, cell, &junk)
    }

    /// Seals a DESTROY cell that tears the circuit down at every hop, and marks the
    /// circuit closed.
    pub fn seal_destroy<R: RngCore>(
        &mut self,
        link: &ClientLink,
        cell: &mut [u8],
        rng: &mut R,
    ) -> Result<(), ClientError> {
        self.check_cell(cell)?;
        rng.fill_bytes(&mut cell[self.layout.stack_end()..]);
        let junk = random_junk(rng);
        self.seal(link, Command::Destroy, cell, &junk)?;
        self.state = CircuitState::Closed;
        Ok(())
    }

    /// Opens a cell received for this circuit (`hdr` from [`ClientLink::read_header`]).
    ///
    /// Cells originated by the exit carry its backward sequence number (recovered from
    /// the first hop's counter and every hop's shift): a number already seen, or more
    /// than [`MAX_BACKWARD_JUMP`] ahead of the highest seen, is rejected, so an exit
    /// cannot signal to the first hop through large counter jumps.
    pub fn open(&mut self, hdr: &Header, cell: &mut [u8]) -> Result<Received, ClientError> {
        self.check_cell(cell)?;
        // A CREATED's header counter is the first hop's cookie; its real counter is
        // the exit's sequence number 0 shifted by every hop.
        let counter = if hdr.command == Command::Created {
            self.bwd.iter().fold(0, |c, k| k.shifted(c))
        } else {
            hdr.counter
        };
        let opened = open_backward(&self.layout, &self.bwd, hdr.command, counter, cell)
            .map_err(|_| ClientError::Rejected("bad tag"))?;
        let hop = opened.layers - 1;
        if hop + 1 == self.fwd.len() {
            let seq = opened.sequence;
            if self.window.check(seq) == WindowCheck::Replay {
                return Err(ClientError::Rejected("replayed cell"));
            }
            if self.window.ahead(seq) > MAX_BACKWARD_JUMP {
                return Err(ClientError::Rejected("backward counter jump"));
            }
            self.window.commit(seq);
        }
        Ok(match hdr.command {
            Command::Created if hop + 1 == self.fwd.len() => {
                if self.state == CircuitState::Building {
                    self.state = CircuitState::Open;
                    // Start the forward counters at the first hop's cookie: that is
                    // how the first hop learns this address receives what it sends.
                    self.base = hdr.counter;
                }
                Received::Created
            }
            Command::Data => match read_body(&self.layout, cell) {
                Some(Body::Data(r)) => Received::Data(r),
                Some(Body::Cover) => Received::Padding,
                // Loop cover only travels forward.
                Some(Body::Loop) | None => {
                    return Err(ClientError::Rejected("bad body type or length"))
                }
            },
            Command::Refused => {
                let reason = cell[self.layout.stack_end() + ORIGIN_MARKER_LEN];
                self.state = CircuitState::Refused { hop, reason };
                Received::Refused { hop, reason }
            }
            Command::Destroy => {
                self.state = CircuitState::Closed;
                let reason = cell[self.layout.stack_end() + ORIGIN_MARKER_LEN];
                Received::Destroyed { hop, reason }
            }
            _ => return Err(ClientError::Rejected("unexpected command")),
        })
    }
}

/// Cells a client sends on one circuit at most; then it must build a new one.
pub const MAX_CELLS: u64 = 1 << 40;

/// How far ahead of the highest backward sequence number seen the next one may be.
/// Gaps come from loss; a larger jump is refused (and the bits an exit could signal
/// per jump to a colluding first hop are bounded by its logarithm: 12).
pub const MAX_BACKWARD_JUMP: u64 = 4096;

fn random_junk<R: RngCore>(rng: &mut R) -> [[u8; 16]; H_MAX_LIMIT] {
    let mut flat = [0u8; 16 * H_MAX_LIMIT];
    rng.fill_bytes(&mut flat);
    let mut j = [[0u8; 16]; H_MAX_LIMIT];
    for (s, chunk) in j.iter_mut().zip(flat.chunks_exact(16)) {
        s.copy_from_slice(chunk);
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aead::RingAead;
    use crate::keys::OnionSecret;

    /// The encodings of the low-order points of Curve25519 and its twist (0, 1, the two
    /// points of order 8, p-1, p, p+1), each also with bit 255 set (X25519 ignores it).
    /// Checked offline: OpenSSL's X25519 refuses every one as an all-zero result.
    const LOW_ORDER: [&str; 7] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    fn path(n: u8) -> Vec<PathHop> {
        (0..n)
            .map(|i| PathHop {
                id: RelayId([i + 1; 16]),
                onion: OnionSecret::from_bytes(&[i + 40; 32]).public(),
                addr: SocketAddr::from(([127, 0, 0, i + 1], 9000)),
            })
            .collect()
    }

    #[test]
    fn build_refuses_low_order_onion_keys() {
        let layout = Layout::default();
        let mut rng = rand_core::OsRng;
        let good = path(3);
        let link = ClientLink::new(&good[0].id, good[0].addr, &mut rng);
        let dest = SocketAddr::from(([127, 0, 0, 9], 7));
        let mut cell = vec![0u8; layout.cell];
        ClientCircuit::<RingAead>::build(&layout, &link, &good, dest, 0, &mut rng, &mut cell)
            .expect("a path of valid keys builds");
        for (n, text) in LOW_ORDER.iter().enumerate() {
            for high_bit in [0u8, 0x80] {
                let mut key = [0u8; 32];
                hex::decode_to_slice(text, &mut key).expect("hex");
                key[31] |= high_bit;
                let hop = n % 3;
                let mut bad = good.clone();
                bad[hop].onion = OnionPublic(key);
                let mut cell = vec![0x5au8; layout.cell];
                let got = ClientCircuit::<RingAead>::build(
                    &layout, &link, &bad, dest, 0, &mut rng, &mut cell,
                );
                assert_eq!(
                    got.map(|c| c.id()),
                    Err(ClientError::BadOnionKey { hop }),
                    "low-order key {text} (bit 255: {high_bit}) at hop {hop}"
                );
                assert!(cell.iter().all(|&b| b == 0x5a), "nothing was written");
            }
        }
    }
}
