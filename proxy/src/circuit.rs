//! One circuit on its own thread, and the QUIC socket that sends through it.
//!
//! [`Circuit::build`] makes a [`Client`] (its own UDP socket, so circuits share no
//! link and no thread), builds the circuit, and moves both to a thread that:
//! - sends every packet queued on the circuit's send channel: in
//!   [`Mode::Fragmented`] as the fragments of [`crate::frag`], in [`Mode::Raw`] as
//!   one cell each; whatever is queued goes out together, up to [`BATCH_CELLS`] cells
//!   per system call ([`Client::send_batch`]), so a burst from QUIC stays a burst
//!   that each relay handles in one wake-up;
//! - receives the circuit's payloads, reassembles them ([`Mode::Fragmented`]) and
//!   hands whole packets to the receive channel;
//! - sends a cover cell when nothing was sent for [`KEEPALIVE`], so the relays do
//!   not expire an idle circuit;
//! - ends when every sender is dropped (it sends `DESTROY` first), or when the
//!   circuit is torn down or fails ([`Circuit::is_dead`] turns true).
//!
//! Both channels are bounded; a full one drops the packet (counted): the circuit is
//! a lossy datagram path and QUIC recovers. [`CircuitSocket`] is quinn's view of a
//! [`Mode::Fragmented`] circuit: a UDP socket whose only peer is the gateway.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use shroud_client::{CircuitId, Client, ClientConfig, ClientError, PathHop};
use shroud_proto::peerlist::PeerList;
use tokio::sync::mpsc;

use crate::frag::{self, Reassembler};

/// Packets queued per direction.
pub const QUEUE: usize = 4096;
/// A cover cell is sent when nothing was sent for this long.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long the thread waits for a cell before looking at the send queue again.
const POLL: Duration = Duration::from_micros(500);
/// Incomplete packets the thread holds.
const REASSEMBLY: usize = 256;
/// Most cells the thread sends in one batch ([`Client::send_batch`]: one system call
/// with GSO).
pub const BATCH_CELLS: usize = 64;
/// Packets quinn may hand over in one transmit (it takes at most 10).
const TRANSMIT_SEGMENTS: usize = 10;

/// Requested SO_RCVBUF / SO_SNDBUF of a circuit's socket. The kernel's default
/// (212 KB, about 90 cells) overflows whenever the circuit's thread is descheduled
/// for a few milliseconds at 10 MB/s (measured with `ss -uam`); every drop there is a
/// QUIC loss and halves its window.
pub const SOCKET_BUF: usize = 4 << 20;

/// A bound UDP socket for a circuit, with [`SOCKET_BUF`] buffers (best effort: the
/// kernel clamps to `net.core.rmem_max` / `wmem_max`).
pub fn socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(SOCKET_BUF);
    let _ = s.set_send_buffer_size(SOCKET_BUF);
    s.bind(&bind.into())?;
    Ok(s.into())
}

/// How payloads map to cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QUIC packets, fragmented ([`crate::frag`]).
    Fragmented,
    /// Application datagrams of at most `payload_max` bytes, one per cell.
    Raw,
}

/// Counters of one circuit (monotonic).
#[derive(Debug, Default)]
pub struct CircuitStats {
    /// Packets sent (before fragmentation).
    pub packets_sent: AtomicU64,
    /// Packets received (after reassembly).
    pub packets_received: AtomicU64,
    /// Packets dropped: a full queue, too large, or incomplete at eviction.
    pub packets_dropped: AtomicU64,
    /// Cells the client dropped (failed authentication or the replay window, unknown,
    /// malformed; `shroud_client::ClientStats`), updated every few hundred cells.
    pub cells_dropped: AtomicU64,
}

/// What [`Circuit::build`] needs.
#[derive(Debug, Clone)]
pub struct CircuitSpec {
    /// The verified peer list.
    pub list: Arc<PeerList>,
    /// First hop first.
    pub path: Vec<PathHop>,
    /// The UDP destination behind the exit.
    pub dest: SocketAddr,
    /// The local address of the circuit's socket.
    pub bind: SocketAddr,
    /// Time allowed for the setup.
    pub timeout: Duration,
    /// How payloads map to cells.
    pub mode: Mode,
}

/// A circuit driven by its own thread. Dropping every clone of its sender
/// ([`Circuit`] and its [`CircuitSocket`]) tears it down.
#[derive(Debug)]
pub struct Circuit {
    /// The path.
    pub path: Vec<PathHop>,
    /// The destination behind the exit.
    pub dest: SocketAddr,
    /// Largest payload of one cell.
    pub payload_max: usize,
    /// Set when the circuit was torn down or failed.
    pub dead: Arc<AtomicBool>,
    /// Counters.
    pub stats: Arc<CircuitStats>,
    /// Why it died (once dead).
    pub why: Arc<Mutex<Option<String>>>,
    tx: crossbeam_channel::Sender<Vec<u8>>,
    local: SocketAddr,
}

impl Circuit {
    /// Builds the circuit (blocking for at most `spec.timeout` plus scheduling) and
    /// starts its thread. Returns it and the channel of received packets.
    pub fn build(spec: CircuitSpec) -> Result<(Circuit, mpsc::Receiver<Vec<u8>>), ClientError> {
        let mut client = Client::with_socket(
            socket(spec.bind)?,
            spec.list.params.layout()?,
            ClientConfig::default(),
        )?;
        let id = client.build_circuit(&spec.path, spec.dest, spec.timeout)?;
        let local = client.local_addr();
        let payload_max = client.payload_max();
        let (tx, rx_send) = crossbeam_channel::bounded(QUEUE);
        let (up, rx) = mpsc::channel(QUEUE);
        let dead = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CircuitStats::default());
        let why = Arc::new(Mutex::new(None));
        let mut worker = Worker {
            client,
            id,
            mode: spec.mode,
            rx: rx_send,
            up,
            stats: stats.clone(),
            payload_max,
        };
        let (d, w) = (dead.clone(), why.clone());
        std::thread::Builder::new()
            .name(format!("circuit-{id}"))
            .spawn(move || {
                let reason = worker.run();
                if let Ok(mut g) = w.lock() {
                    *g = Some(reason);
                }
                d.store(true, Ordering::Release);
            })?;
        Ok((
            Circuit {
                path: spec.path,
                dest: spec.dest,
                payload_max,
                dead,
                stats,
                why,
                tx,
                local,
            },
            rx,
        ))
    }

    /// The local address of the circuit's socket.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Whether the circuit was torn down or failed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Why it died, if it did.
    pub fn why(&self) -> Option<String> {
        self.why.lock().ok().and_then(|g| g.clone())
    }

    /// Queues one packet; `false` (counted) if the queue is full or the circuit is
    /// gone.
    pub fn send(&self, packet: Vec<u8>) -> bool {
        if self.tx.try_send(packet).is_ok() {
            true
        } else {
            self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// The circuit as a QUIC socket whose peer is `peer` (the gateway).
    pub fn socket(&self, rx: mpsc::Receiver<Vec<u8>>, peer: SocketAddr) -> CircuitSocket {
        CircuitSocket {
            tx: self.tx.clone(),
            rx: Mutex::new(rx),
            peer,
            local: self.local,
            stats: self.stats.clone(),
        }
    }
}

struct Worker {
    client: Client,
    id: CircuitId,
    mode: Mode,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
    up: mpsc::Sender<Vec<u8>>,
    stats: Arc<CircuitStats>,
    payload_max: usize,
}

impl Worker {
    /// Runs until the circuit ends; returns why.
    fn run(&mut self) -> String {
        let mut buf = vec![0u8; self.payload_max];
        let mut reasm: Reassembler<()> = Reassembler::new(REASSEMBLY);
        let mut out = Vec::new();
        let mut next_id = 0u32;
        let mut last_send = Instant::now();
        let mut evicted = 0;
        let mut tick = 0u32;
        let mut batch = Batch::default();
        loop {
            loop {
                batch.clear();
                let mut closed = false;
                while batch.lens.len() < BATCH_CELLS {
                    match self.rx.try_recv() {
                        Ok(p) => self.push(&p, &mut next_id, &mut batch),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if !batch.lens.is_empty() {
                    last_send = Instant::now();
                    if let Err(e) = self.client.send_batch(self.id, &batch.slices()) {
                        return format!("send: {e}");
                    }
                }
                if closed {
                    let _ = self.client.destroy(self.id);
                    return "closed by the proxy".into();
                }
                if batch.lens.len() < BATCH_CELLS {
                    break;
                }
            }
            if last_send.elapsed() >= KEEPALIVE {
                last_send = Instant::now();
                if let Err(e) = self.client.send_padding(self.id) {
                    return format!("send: {e}");
                }
            }
            let r = self.client.recv_into(&mut buf, POLL);
            tick = tick.wrapping_add(1);
            if tick.is_multiple_of(256) || r.is_err() {
                let st = self.client.stats();
                self.stats.cells_dropped.store(
                    st.rejected + st.unknown + st.malformed + st.queue_dropped,
                    Ordering::Relaxed,
                );
            }
            match r {
                Ok((_, n)) => {
                    let p = &buf[..n];
                    let packet = match self.mode {
                        Mode::Raw => Some(p.to_vec()),
                        // A QUIC circuit carries only fragments; an echo reply (the
                        // probe's, which uses a circuit of its own) is not a packet.
                        Mode::Fragmented if p.first() == Some(&frag::KIND_ECHO_REPLY) => None,
                        Mode::Fragmented => reasm.push((), p, &mut out).then(|| out.clone()),
                    };
                    let s = reasm.stats().evicted;
                    if s > evicted {
                        self.stats
                            .packets_dropped
                            .fetch_add(s - evicted, Ordering::Relaxed);
                        evicted = s;
                    }
                    if let Some(packet) = packet {
                        self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
                        match self.up.try_send(packet) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                let _ = self.client.destroy(self.id);
                                return "closed by the proxy".into();
                            }
                        }
                    }
                }
                Err(ClientError::Timeout) => {
                    if self.up.is_closed() {
                        let _ = self.client.destroy(self.id);
                        return "closed by the proxy".into();
                    }
                }
                Err(ClientError::CircuitClosed { hop, .. }) => {
                    return format!("torn down by hop {hop}");
                }
                Err(e) => return format!("receive: {e}"),
            }
        }
    }

    /// Adds packet `p` to `batch`: one cell ([`Mode::Raw`]) or its fragments; a packet
    /// too large for that is dropped (counted).
    fn push(&mut self, p: &[u8], next_id: &mut u32, batch: &mut Batch) {
        self.stats.packets_sent.fetch_add(1, Ordering::Relaxed);
        let ok = match self.mode {
            Mode::Raw => {
                let ok = p.len() <= self.payload_max;
                if ok {
                    batch.push(p);
                }
                ok
            }
            Mode::Fragmented => {
                let id = *next_id;
                *next_id = next_id.wrapping_add(1);
                frag::fragment(p, id, self.payload_max, |f| batch.push(f))
            }
        };
        if !ok {
            self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Cell payloads waiting to be sent together, back to back.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lens: Vec<usize>,
}

impl Batch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.lens.clear();
    }

    fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.lens.push(payload.len());
    }

    fn slices(&self) -> Vec<&[u8]> {
        let mut at = 0;
        self.lens
            .iter()
            .map(|&n| {
                let s = &self.bytes[at..at + n];
                at += n;
                s
            })
            .collect()
    }
}

/// quinn's socket over a [`Mode::Fragmented`] circuit: sends go to the circuit's
/// thread, received packets come from it, every packet's peer is the gateway.
pub struct CircuitSocket {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: Mutex<mpsc::Receiver<Vec<u8>>>,
    peer: SocketAddr,
    local: SocketAddr,
    stats: Arc<CircuitStats>,
}

impl fmt::Debug for CircuitSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitSocket")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The circuit's queue never blocks a sender (a full queue drops), so it is always
/// writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for CircuitSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for p in t.contents.chunks(seg) {
            if self.tx.try_send(p.to_vec()).is_err() {
                self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut rx) = self.rx.lock() else {
            return Poll::Ready(Err(io::Error::other("circuit socket lock poisoned")));
        };
        let n = bufs.len().min(meta.len());
        let mut got = 0;
        while got < n {
            let p = if got == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => p,
                    // The circuit is gone: nothing will arrive again; the pool
                    // notices the dead circuit and closes the connection.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            // A reassembled packet is QUIC whatever its first byte: with the QUIC bit
            // greased (RFC 9287, on by default in quinn) a short header may start with
            // any value, 3 included; an earlier check here dropped those as echo replies,
            // about one packet in 128, which QUIC took for congestion.
            if p.len() > bufs[got].len() {
                continue;
            }
            bufs[got][..p.len()].copy_from_slice(&p);
            meta[got] = RecvMeta {
                addr: self.peer,
                len: p.len(),
                stride: p.len(),
                ecn: None,
                dst_ip: None,
            };
            got += 1;
        }
        Poll::Ready(Ok(got))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        TRANSMIT_SEGMENTS
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the QUIC bit greased (RFC 9287), a short-header packet may begin with any
    /// byte; the socket must hand quinn every packet, whatever its first byte (one
    /// starting with 3 was once dropped as a probe's echo reply).
    #[test]
    fn the_socket_hands_quinn_every_packet_whatever_its_first_byte() {
        let (tx, _out) = crossbeam_channel::unbounded();
        let (up, rx) = mpsc::channel(512);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let sock = CircuitSocket {
            tx,
            rx: Mutex::new(rx),
            peer,
            local: peer,
            stats: Arc::new(CircuitStats::default()),
        };
        for first in 0..=255u8 {
            up.try_send(vec![first, 1, 2, 3]).unwrap();
        }
        let mut got = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = vec![[0u8; 64]; 32];
        while got.len() < 256 {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); bufs.len()];
            match sock.poll_recv(&mut cx, &mut bufs, &mut meta) {
                Poll::Ready(Ok(n)) => got.extend(
                    bufs[..n]
                        .iter()
                        .zip(&meta[..n])
                        .map(|(b, m)| b[..m.len].to_vec()),
                ),
                other => panic!("{other:?} after {} packets", got.len()),
            }
        }
        let firsts: Vec<u8> = got.iter().map(|p| p[0]).collect();
        assert_eq!(firsts, (0..=255u8).collect::<Vec<_>>());
    }
}
