//! The stream gateway: a QUIC server beside an exit relay that turns each stream into
//! a TCP connection, honouring its exit policy.
//!
//! Its UDP socket ([`GatewaySocket`]) speaks the fragment format of [`crate::frag`]:
//! each peer is one circuit (the exit sends every circuit's payloads from that
//! circuit's own socket), fragments are reassembled per peer address in a bounded
//! table, and packets going back are split into fragments of at most
//! `max_datagram` bytes (the cell payload), each one UDP datagram the exit carries
//! back as one cell. The fragments of all the packets of one quinn transmit (up to
//! ten) leave in as few system calls as GSO allows (runs of equal-size fragments,
//! [`gso_runs`]), and reads take a run of datagrams at once (GRO), both through
//! quinn's own `quinn-udp`; so a burst reaches the exit relay as a burst, which it
//! and every relay after it handle in one wake-up. Echo requests ([`crate::frag::KIND_ECHO_REQUEST`], the probe's)
//! are answered at once.
//!
//! Per stream ([`handle_stream`]): read the request ([`crate::wire`]) within the
//! connect timeout; resolve a name (here, at the gateway: `socks5h`); keep the
//! addresses the exit policy permits (`NotAllowed` if none); connect to them in turn
//! within the connect timeout; answer one status byte; then copy both ways until
//! both directions are closed. Every failure is a status byte and a closed stream,
//! never a panic or a stuck task.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use shroud_proto::policy::ExitPolicy;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};

use crate::frag::{self, Reassembler};
use crate::wire::{Status, Target, MAX_REQUEST};

/// Incomplete packets held over all peers.
const REASSEMBLY: usize = 4096;
/// Requested SO_SNDBUF / SO_RCVBUF of the gateway's socket.
const SOCKET_BUF: usize = 8 << 20;
/// Copy buffer per direction of a stream.
const COPY_BUF: usize = 256 * 1024;
/// Packets quinn may hand over in one transmit (it takes at most 10).
const TRANSMIT_SEGMENTS: usize = 10;
/// Most bytes in one GSO send.
pub const MAX_GSO_BYTES: usize = 65_000;

/// Gateway counters (monotonic).
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Streams accepted.
    pub streams: AtomicU64,
    /// Streams answered per status byte (index = SOCKS code).
    pub status: [AtomicU64; 9],
    /// Echo requests answered.
    pub echoes: AtomicU64,
}

struct SockState {
    reasm: Reassembler<SocketAddr>,
    /// The last read: datagrams of `stride` bytes (the last may be shorter) from
    /// `src`, `pos..end` not yet handled.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    stride: usize,
    src: SocketAddr,
    out: Vec<u8>,
    next_id: u32,
    /// Fragments of the transmit being sent, back to back, and their lengths.
    frags: Vec<u8>,
    lens: Vec<usize>,
}

/// The gateway's UDP socket, fragmenting and reassembling (see the module docs).
pub struct GatewaySocket {
    io: UdpSocket,
    udp: UdpSocketState,
    max_datagram: usize,
    state: Mutex<SockState>,
    stats: Arc<GatewayStats>,
}

impl fmt::Debug for GatewaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySocket")
            .field("local", &self.io.local_addr().ok())
            .field("max_datagram", &self.max_datagram)
            .finish_non_exhaustive()
    }
}

impl GatewaySocket {
    /// Wraps a bound socket (turning GRO on where the kernel has it).
    pub fn new(io: UdpSocket, max_datagram: usize, stats: Arc<GatewayStats>) -> io::Result<Self> {
        let udp = UdpSocketState::new((&io).into())?;
        let src = io.local_addr()?;
        Ok(GatewaySocket {
            io,
            udp,
            max_datagram,
            state: Mutex::new(SockState {
                reasm: Reassembler::new(REASSEMBLY),
                buf: vec![0u8; 65536],
                pos: 0,
                end: 0,
                stride: 1,
                src,
                out: Vec::new(),
                next_id: 0,
                frags: Vec::new(),
                lens: Vec::new(),
            }),
            stats,
        })
    }

    /// Sends `contents` (datagrams of `segment` bytes, the last may be shorter) to
    /// `to` in one system call.
    fn send_run(&self, contents: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        self.io.try_io(Interest::WRITABLE, || {
            self.udp.try_send((&self.io).into(), &t)
        })
    }
}

/// Splits datagrams of `lens` (sent back to back) into runs one GSO send can carry:
/// equal sizes, the last of a run possibly shorter, at most `max_segments` datagrams
/// and [`MAX_GSO_BYTES`] bytes. Returns `(first, count, segment size)` per run.
pub fn gso_runs(lens: &[usize], max_segments: usize) -> Vec<(usize, usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let seg = lens[i];
        let (mut n, mut bytes) = (1, seg);
        while i + n < lens.len()
            && n < max_segments.max(1)
            && bytes + lens[i + n] <= MAX_GSO_BYTES
            && lens[i + n] <= seg
        {
            bytes += lens[i + n];
            n += 1;
            if lens[i + n - 1] < seg {
                // A shorter datagram ends a run.
                break;
            }
        }
        runs.push((i, n, seg));
        i += n;
    }
    runs
}

#[derive(Debug)]
struct Writable(Arc<GatewaySocket>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

impl AsyncUdpSocket for GatewaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self))
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let Ok(mut guard) = self.state.lock() else {
            return Err(io::Error::other("gateway socket lock poisoned"));
        };
        let s = &mut *guard;
        s.frags.clear();
        s.lens.clear();
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for packet in t.contents.chunks(seg) {
            s.next_id = s.next_id.wrapping_add(1);
            let (frags, lens) = (&mut s.frags, &mut s.lens);
            frag::fragment(packet, s.next_id, self.max_datagram, |f| {
                frags.extend_from_slice(f);
                lens.push(f.len());
            });
        }
        let mut at = 0;
        for (k, (first, count, segment)) in gso_runs(&s.lens, self.udp.max_gso_segments())
            .into_iter()
            .enumerate()
        {
            let bytes: usize = s.lens[first..first + count].iter().sum();
            match self.send_run(&s.frags[at..at + bytes], segment, t.destination) {
                Ok(()) => {}
                // Nothing of the transmit went out yet: let quinn wait for
                // writability and try again.
                Err(e) if k == 0 && e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // Later fragments: their packets are lost, QUIC recovers.
                Err(_) => {}
            }
            at += bytes;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut guard) = self.state.lock() else {
            return Poll::Ready(Err(io::Error::other("gateway socket lock poisoned")));
        };
        let s = &mut *guard;
        let n = bufs.len().min(meta.len());
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut got = 0;
        loop {
            // Handle what the last read left, one datagram at a time.
            while s.pos < s.end && got < n {
                let end = (s.pos + s.stride).min(s.end);
                let (pos, src) = (s.pos, s.src);
                s.pos = end;
                let d = &s.buf[pos..end];
                if d.first() == Some(&frag::KIND_ECHO_REQUEST) {
                    let mut reply = d.to_vec();
                    reply[0] = frag::KIND_ECHO_REPLY;
                    let _ = self.io.try_send_to(&reply, src);
                    self.stats.echoes.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !s.reasm.push(src, d, &mut s.out) || s.out.len() > bufs[got].len() {
                    continue;
                }
                bufs[got][..s.out.len()].copy_from_slice(&s.out);
                meta[got] = RecvMeta {
                    addr: src,
                    len: s.out.len(),
                    stride: s.out.len(),
                    ecn: None,
                    dst_ip: None,
                };
                got += 1;
            }
            if got > 0 {
                return Poll::Ready(Ok(got));
            }
            ready!(self.io.poll_recv_ready(cx))?;
            let mut m = [RecvMeta::default()];
            let r = {
                let mut b = [IoSliceMut::new(&mut s.buf)];
                self.io.try_io(Interest::READABLE, || {
                    self.udp.recv((&self.io).into(), &mut b, &mut m)
                })
            };
            match r {
                Ok(k) if k > 0 && m[0].len > 0 => {
                    s.pos = 0;
                    s.end = m[0].len;
                    s.stride = m[0].stride.clamp(1, m[0].len);
                    s.src = m[0].addr;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP errors from earlier sends: the socket is fine.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        false
    }

    fn max_transmit_segments(&self) -> usize {
        TRANSMIT_SEGMENTS
    }
}

/// What a gateway needs to serve streams.
#[derive(Debug)]
pub struct StreamRules {
    /// Destinations it may connect to.
    pub policy: ExitPolicy,
    /// Time for the request, the name resolution and the TCP connect, each.
    pub connect_timeout: Duration,
}

/// Serves every connection of `endpoint` until it is closed.
pub async fn serve(endpoint: quinn::Endpoint, rules: Arc<StreamRules>, stats: Arc<GatewayStats>) {
    while let Some(incoming) = endpoint.accept().await {
        let (rules, stats) = (rules.clone(), stats.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            tracing::debug!(peer = %conn.remote_address(), "circuit connected");
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        stats.streams.fetch_add(1, Ordering::Relaxed);
                        let (rules, stats) = (rules.clone(), stats.clone());
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let s = handle_stream(send, recv, &rules).await;
                            let q = conn.stats();
                            tracing::debug!(
                                status = s.name(),
                                rtt_us = q.path.rtt.as_micros() as u64,
                                cwnd = q.path.cwnd,
                                lost_packets = q.path.lost_packets,
                                congestion_events = q.path.congestion_events,
                                sent_packets = q.path.sent_packets,
                                "stream closed"
                            );
                            if let Some(c) = stats.status.get(s as usize) {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "circuit connection ended");
                        return;
                    }
                }
            }
        });
    }
}

/// Reads a request from `recv`: the target, and any bytes after it.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<(Target, Vec<u8>), Status> {
    let mut buf = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0u8; MAX_REQUEST];
    loop {
        if let Some((t, used)) = Target::decode(&buf)? {
            return Ok((t, buf.split_off(used)));
        }
        let room = MAX_REQUEST - buf.len();
        match recv.read(&mut chunk[..room.max(1)]).await {
            Ok(Some(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return Err(Status::General),
        }
        if buf.len() > MAX_REQUEST {
            return Err(Status::General);
        }
    }
}

/// Resolves and checks `t`: the permitted addresses, in resolver order.
async fn permitted(t: &Target, policy: &ExitPolicy) -> Result<Vec<SocketAddr>, Status> {
    let addrs: Vec<SocketAddr> = match t {
        Target::Addr(a) => vec![*a],
        Target::Name(h, p) => tokio::net::lookup_host((h.as_str(), *p))
            .await
            .map_err(|_| Status::HostUnreachable)?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Status::HostUnreachable);
    }
    let ok: Vec<SocketAddr> = addrs.iter().filter_map(|a| policy.permit(*a)).collect();
    if ok.is_empty() {
        return Err(Status::NotAllowed);
    }
    Ok(ok)
}

async fn connect(t: &Target, rules: &StreamRules) -> Result<TcpStream, Status> {
    let addrs = tokio::time::timeout(rules.connect_timeout, permitted(t, &rules.policy))
        .await
        .map_err(|_| Status::HostUnreachable)??;
    let mut last = Status::HostUnreachable;
    for a in addrs {
        match tokio::time::timeout(rules.connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Status::from_io(&e),
            Err(_) => last = Status::TtlExpired,
        }
    }
    Err(last)
}

/// Serves one stream (see the module docs); returns the status it answered.
pub async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    rules: &StreamRules,
) -> Status {
    let req = tokio::time::timeout(rules.connect_timeout, read_request(&mut recv)).await;
    let (target, early) = match req {
        Ok(Ok(r)) => r,
        Ok(Err(s)) => return refuse(send, s).await,
        Err(_) => return refuse(send, Status::General).await,
    };
    let mut tcp = match connect(&target, rules).await {
        Ok(t) => t,
        Err(s) => {
            tracing::debug!(target = %target, status = s.name(), "stream refused");
            return refuse(send, s).await;
        }
    };
    if send.write_all(&[Status::Succeeded as u8]).await.is_err() {
        return Status::Succeeded;
    }
    if !early.is_empty() && tcp.write_all(&early).await.is_err() {
        return Status::Succeeded;
    }
    let mut quic = tokio::io::join(recv, send);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut quic, COPY_BUF, COPY_BUF).await;
    Status::Succeeded
}

async fn refuse(mut send: quinn::SendStream, s: Status) -> Status {
    let _ = send.write_all(&[s as u8]).await;
    let _ = send.finish();
    // Give the status time to leave before the stream is dropped (a dropped stream
    // is finished gracefully by quinn; `stopped` returns once the peer has it).
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    s
}

/// Binds the gateway's UDP socket and endpoint.
pub fn endpoint(
    listen: SocketAddr,
    max_datagram: usize,
    server: quinn::ServerConfig,
    stats: Arc<GatewayStats>,
) -> io::Result<quinn::Endpoint> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel clamps to net.core.{r,w}mem_max.
    let _ = sock.set_send_buffer_size(SOCKET_BUF);
    let _ = sock.set_recv_buffer_size(SOCKET_BUF);
    sock.bind(&listen.into())?;
    let std: std::net::UdpSocket = sock.into();
    std.set_nonblocking(true)?;
    let io = UdpSocket::from_std(std)?;
    let sock = GatewaySocket::new(io, max_datagram, stats)?;
    let max_packet = u16::try_from(frag::max_packet(max_datagram)).unwrap_or(u16::MAX);
    quinn::Endpoint::new_with_abstract_socket(
        crate::tls::endpoint_config(max_packet),
        Some(server),
        Arc::new(sock),
        Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_runs_group_equal_sizes_and_end_on_a_shorter_one() {
        // Two full packets (two full fragments each), then one whose second fragment
        // is short, then a small one-fragment packet and a full one.
        let lens = [877, 877, 877, 877, 877, 300, 500, 877, 877];
        assert_eq!(
            gso_runs(&lens, 64),
            vec![(0, 6, 877), (6, 1, 500), (7, 2, 877)]
        );
        // The segment limit and the byte limit both cut runs.
        assert_eq!(gso_runs(&lens[..4], 3), vec![(0, 3, 877), (3, 1, 877)]);
        let big = vec![1000; 70];
        let runs = gso_runs(&big, 128);
        assert_eq!(runs, vec![(0, 65, 1000), (65, 5, 1000)]);
        // No segmentation offload: one datagram per send.
        assert_eq!(
            gso_runs(&[5, 5, 3], 1),
            vec![(0, 1, 5), (1, 1, 5), (2, 1, 3)]
        );
        assert!(gso_runs(&[], 64).is_empty());
        // Every datagram is in exactly one run, in order.
        let mixed = [9, 9, 1, 4, 4, 8, 2, 2, 2, 7];
        let runs = gso_runs(&mixed, 64);
        let mut next = 0;
        for (first, count, seg) in runs {
            assert_eq!(first, next);
            assert_eq!(mixed[first], seg);
            assert!(mixed[first..first + count - 1].iter().all(|&l| l == seg));
            assert!(mixed[first + count - 1] <= seg);
            next = first + count;
        }
        assert_eq!(next, mixed.len());
    }
}
