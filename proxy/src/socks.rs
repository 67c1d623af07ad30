//! The SOCKS5 server (RFC 1928, RFC 1929): method negotiation, `CONNECT` over QUIC
//! streams to the gateway, `UDP ASSOCIATE` over raw circuits.
//!
//! Invariants:
//! - Every input is read with an exact length the protocol gives (never more than
//!   255 bytes at a time) within the handshake timeout; nothing a client sends can
//!   make a task allocate more than a few hundred bytes before a stream starts, or
//!   panic.
//! - Bad input gets the protocol's error reply where it has one (`0xFF` for no
//!   acceptable method, status 1 for bad RFC 1929 input, reply codes 1, 7 and 8 for
//!   bad requests) and the connection is closed.
//! - Credentials are accepted whatever they are: they only choose the circuit
//!   ([`crate::pool::IsoKey`], as Tor's `IsolateSOCKSAuth`).
//! - A `CONNECT` whose circuit fails before the gateway answers is tried again on
//!   another circuit (`streams.attempts` in all); a gateway's answer is final.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::circuit::Mode;
use crate::pool::{IsoKey, Pool};
use crate::wire::{Status, Target};

/// Copy buffer per direction of a stream.
const COPY_BUF: usize = 256 * 1024;

/// Proxy counters (monotonic).
#[derive(Debug, Default)]
pub struct SocksStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Handshakes refused for bad input.
    pub bad_input: AtomicU64,
    /// CONNECT replies per code (index = SOCKS reply code).
    pub replies: [AtomicU64; 9],
    /// UDP datagrams relayed to / from destinations.
    pub udp_out: AtomicU64,
    /// UDP datagrams from destinations relayed back.
    pub udp_in: AtomicU64,
    /// UDP datagrams dropped (fragmented, a name, too large, no circuit).
    pub udp_dropped: AtomicU64,
}

/// What the SOCKS server needs.
#[derive(Debug)]
pub struct Socks {
    /// The circuit pool.
    pub pool: Arc<Pool>,
    /// Counters.
    pub stats: SocksStats,
    /// Circuits a CONNECT tries.
    pub attempts: usize,
    /// Time for the gateway's answer.
    pub answer_timeout: Duration,
    /// Time for the handshake.
    pub handshake_timeout: Duration,
    /// Destinations per UDP session.
    pub udp_destinations: usize,
    /// CONNECTs to different hosts get different circuits.
    pub isolate_destination: bool,
}

/// Why a SOCKS exchange ended early.
#[derive(Debug)]
enum Fail {
    /// Reply with this code (if a reply is possible here) and close.
    Reply(Status),
    /// Close without a reply (no reply defined, or the client left).
    Close,
}

impl From<std::io::Error> for Fail {
    fn from(_: std::io::Error) -> Self {
        Fail::Close
    }
}

/// A request after the handshake.
#[derive(Debug)]
struct Request {
    cmd: u8,
    target: Target,
    key: IsoKey,
}

/// Reply `rep` with bound address `bound`.
fn reply(rep: Status, bound: SocketAddr) -> Vec<u8> {
    let mut v = vec![5, rep as u8, 0];
    Target::Addr(bound).encode_addr(&mut v);
    v
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// Negotiation and request (RFC 1928 §3-4, RFC 1929). Writes the method and auth
/// replies itself; bad requests come back as `Fail::Reply`.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Request, Fail> {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await?;
    if hdr[0] != 5 {
        return Err(Fail::Close);
    }
    let mut methods = vec![0u8; usize::from(hdr[1])];
    s.read_exact(&mut methods).await?;
    let method = if methods.contains(&2) {
        2
    } else if methods.contains(&0) {
        0
    } else {
        s.write_all(&[5, 0xff]).await?;
        return Err(Fail::Close);
    };
    s.write_all(&[5, method]).await?;
    let mut key = None;
    if method == 2 {
        let mut v = [0u8; 2];
        s.read_exact(&mut v).await?;
        if v[0] != 1 {
            s.write_all(&[1, 1]).await?;
            return Err(Fail::Close);
        }
        let mut user = vec![0u8; usize::from(v[1])];
        s.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        s.read_exact(&mut pass).await?;
        s.write_all(&[1, 0]).await?;
        key = Some((user, pass));
    }
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(Fail::Reply(Status::General));
    }
    let cmd = req[1];
    let atyp = req[3];
    let mut enc = vec![atyp];
    match atyp {
        1 => enc.resize(1 + 4 + 2, 0),
        4 => enc.resize(1 + 16 + 2, 0),
        3 => {
            let mut n = [0u8; 1];
            s.read_exact(&mut n).await?;
            enc.push(n[0]);
            enc.resize(2 + usize::from(n[0]) + 2, 0);
        }
        _ => return Err(Fail::Reply(Status::AddressType)),
    }
    let start = if atyp == 3 { 2 } else { 1 };
    s.read_exact(&mut enc[start..]).await?;
    let target = match Target::decode_addr(&enc) {
        Ok(Some((t, _))) => t,
        Ok(None) | Err(_) => return Err(Fail::Reply(Status::General)),
    };
    if !matches!(cmd, 1 | 3) {
        return Err(Fail::Reply(Status::Command));
    }
    Ok(Request { cmd, target, key })
}

impl Socks {
    /// Accepts clients on `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move { me.client(tcp).await });
        }
    }

    async fn client(&self, mut tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let req = match tokio::time::timeout(self.handshake_timeout, handshake(&mut tcp)).await {
            Ok(Ok(r)) => r,
            Ok(Err(Fail::Reply(code))) => {
                self.stats.bad_input.fetch_add(1, Ordering::Relaxed);
                self.count(code);
                let _ = tcp.write_all(&reply(code, unspecified())).await;
                let _ = tcp.shutdown().await;
                return;
            }
            Ok(Err(Fail::Close)) | Err(_) => {
                self.stats.bad_input.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.shutdown().await;
                return;
            }
        };
        match req.cmd {
            1 => self.connect(tcp, req).await,
            _ => self.udp_associate(tcp, req).await,
        }
    }

    fn count(&self, s: Status) {
        if let Some(c) = self.stats.replies.get(s as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens a stream for `req` on a circuit of its key; retries on another circuit
    /// while the circuit, not the gateway, fails.
    async fn open(
        &self,
        req: &Request,
    ) -> Result<
        (
            quinn::SendStream,
            quinn::RecvStream,
            Arc<crate::pool::Entry>,
        ),
        Status,
    > {
        let mut last = Status::General;
        for attempt in 1..=self.attempts {
            let key = if self.isolate_destination {
                destination_key(&req.key, &req.target)
            } else {
                req.key.clone()
            };
            let entry = match self.pool.get(&key).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "no circuit for a stream");
                    continue;
                }
            };
            let r = tokio::time::timeout(self.answer_timeout, async {
                let (mut send, mut recv) = entry.conn.open_bi().await.map_err(|_| None)?;
                send.write_all(&req.target.request())
                    .await
                    .map_err(|_| None)?;
                let mut b = [0u8; 1];
                recv.read_exact(&mut b).await.map_err(|_| None)?;
                match Status::from_byte(b[0]) {
                    Status::Succeeded => Ok((send, recv)),
                    s => Err(Some(s)),
                }
            })
            .await;
            match r {
                Ok(Ok((send, recv))) => return Ok((send, recv, entry)),
                Ok(Err(Some(s))) => return Err(s),
                Ok(Err(None)) | Err(_) => {
                    tracing::warn!(attempt, "stream failed on its circuit; trying another");
                    self.pool.failed(&entry).await;
                    last = Status::General;
                }
            }
        }
        Err(last)
    }

    async fn connect(&self, mut tcp: TcpStream, req: Request) {
        match self.open(&req).await {
            Err(s) => {
                self.count(s);
                tracing::debug!(status = s.name(), "CONNECT refused");
                let _ = tcp.write_all(&reply(s, unspecified())).await;
                let _ = tcp.shutdown().await;
            }
            Ok((send, recv, entry)) => {
                self.count(Status::Succeeded);
                if tcp
                    .write_all(&reply(Status::Succeeded, unspecified()))
                    .await
                    .is_err()
                {
                    return;
                }
                entry.streams.fetch_add(1, Ordering::AcqRel);
                let mut quic = tokio::io::join(recv, send);
                let r = tokio::io::copy_bidirectional_with_sizes(
                    &mut tcp, &mut quic, COPY_BUF, COPY_BUF,
                )
                .await;
                entry.streams.fetch_sub(1, Ordering::AcqRel);
                let q = entry.conn.stats();
                let c = &entry.circuit.stats;
                tracing::debug!(
                    bytes = ?r.ok(),
                    rtt_us = q.path.rtt.as_micros() as u64,
                    cwnd = q.path.cwnd,
                    lost_packets = q.path.lost_packets,
                    congestion_events = q.path.congestion_events,
                    circuit_sent = c.packets_sent.load(Ordering::Relaxed),
                    circuit_received = c.packets_received.load(Ordering::Relaxed),
                    circuit_dropped = c.packets_dropped.load(Ordering::Relaxed),
                    cells_dropped = c.cells_dropped.load(Ordering::Relaxed),
                    "stream closed"
                );
            }
        }
    }

    /// UDP ASSOCIATE (RFC 1928 §7): a UDP socket on the listener's address; each
    /// destination gets its own raw circuit; the association lives as long as the TCP
    /// connection.
    async fn udp_associate(&self, mut tcp: TcpStream, _req: Request) {
        let local_ip = tcp
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let client_ip = match tcp.peer_addr() {
            Ok(a) => a.ip(),
            Err(_) => return,
        };
        let udp = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "UDP ASSOCIATE: bind failed");
                let _ = tcp.write_all(&reply(Status::General, unspecified())).await;
                return;
            }
        };
        let Ok(bound) = udp.local_addr() else { return };
        self.count(Status::Succeeded);
        if tcp
            .write_all(&reply(Status::Succeeded, bound))
            .await
            .is_err()
        {
            return;
        }
        let (back_tx, mut back_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(1024);
        let mut circuits: HashMap<SocketAddr, crate::circuit::Circuit> = HashMap::new();
        let mut client: Option<SocketAddr> = None;
        let mut buf = vec![0u8; 65536];
        let mut ctl = [0u8; 64];
        loop {
            tokio::select! {
                r = tcp.read(&mut ctl) => {
                    if matches!(r, Ok(0) | Err(_)) {
                        break;
                    }
                }
                r = udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    if from.ip() != client_ip {
                        continue;
                    }
                    client = Some(from);
                    let Some((dest, data)) = parse_udp(&buf[..n]) else {
                        self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if circuits.get(&dest).is_some_and(|c| c.is_dead()) {
                        circuits.remove(&dest);
                    }
                    if !circuits.contains_key(&dest) {
                        if circuits.len() >= self.udp_destinations {
                            self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        match self.pool.build_circuit(dest, None, Mode::Raw).await {
                            Ok((c, mut rx)) => {
                                let tx = back_tx.clone();
                                tokio::spawn(async move {
                                    while let Some(p) = rx.recv().await {
                                        if tx.send((dest, p)).await.is_err() {
                                            break;
                                        }
                                    }
                                });
                                circuits.insert(dest, c);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "UDP ASSOCIATE: no circuit");
                                self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    if let Some(c) = circuits.get(&dest) {
                        if data.len() <= c.payload_max && c.send(data.to_vec()) {
                            self.stats.udp_out.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some((dest, p)) = back_rx.recv() => {
                    let Some(to) = client else { continue };
                    let mut v = vec![0, 0, 0];
                    Target::Addr(dest).encode_addr(&mut v);
                    v.extend_from_slice(&p);
                    if udp.send_to(&v, to).await.is_ok() {
                        self.stats.udp_in.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The isolation key of a stream to `target` when destinations are isolated: the
/// credentials' key extended with the destination host (an address, or a name in
/// lower case; the port is not part of it, as in Tor's `IsolateDestAddr`).
pub fn destination_key(key: &IsoKey, target: &Target) -> IsoKey {
    let host = match target {
        Target::Addr(a) => a.ip().to_string(),
        Target::Name(n, _) => n.to_ascii_lowercase(),
    };
    let (user, mut pass) = key.clone().unwrap_or_default();
    // (A client that picks a password ending in this suffix only makes its own streams
    // share a circuit: keys are per client connection's choice anyway.)
    pass.extend_from_slice(b"\0dest\0");
    pass.extend_from_slice(host.as_bytes());
    Some((user, pass))
}

/// What [`negotiate`] made of a connection: the request's command and target, or the
/// reply code the proxy would send (`None`: it closes without one).
pub type Negotiated = Result<(u8, Target), Option<Status>>;

/// Runs the SOCKS5 negotiation and request parser (what a connection to the proxy
/// goes through before anything is sent on a circuit) over `input`, the bytes a client
/// sent followed by the end of the stream, with no network. Returns the request's
/// command and target if one came out (else the reply code, if the proxy would send
/// one) and every byte the proxy wrote back. For the fuzzer (`fuzz/fuzz_targets/socks.rs`)
/// and tests; never panics.
pub fn negotiate(input: &[u8]) -> (Negotiated, Vec<u8>) {
    let mut io = tokio::io::join(input, Vec::new());
    let outcome = {
        let mut fut = std::pin::pin!(handshake(&mut io));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Reading a slice and writing a vector never wait, so one poll finishes it.
        match std::future::Future::poll(fut.as_mut(), &mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => Err(Fail::Close),
        }
    };
    let written = io.into_inner().1;
    let outcome = match outcome {
        Ok(r) => Ok((r.cmd, r.target)),
        Err(Fail::Reply(s)) => Err(Some(s)),
        Err(Fail::Close) => Err(None),
    };
    (outcome, written)
}

/// Parses a SOCKS5 UDP request header (RFC 1928 §7): `RSV(2) FRAG ATYP DST.ADDR
/// DST.PORT DATA`. Fragmented datagrams and host names are not carried (a circuit's
/// UDP destination is an address fixed at setup; resolving here would leak the name).
pub fn parse_udp(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if d.len() < 4 || d[0] != 0 || d[1] != 0 || d[2] != 0 {
        return None;
    }
    match Target::decode_addr(&d[3..]) {
        Ok(Some((Target::Addr(a), used))) => Some((a, &d[3 + used..])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_keys_separate_hosts_but_not_ports_and_keep_credentials_apart() {
        let a = |s: &str| Target::Addr(s.parse().unwrap());
        let none: IsoKey = None;
        let alice: IsoKey = Some((b"alice".to_vec(), b"pw".to_vec()));
        assert_eq!(
            destination_key(&none, &a("1.2.3.4:80")),
            destination_key(&none, &a("1.2.3.4:443"))
        );
        assert_ne!(
            destination_key(&none, &a("1.2.3.4:80")),
            destination_key(&none, &a("1.2.3.5:80"))
        );
        assert_ne!(
            destination_key(&none, &a("1.2.3.4:80")),
            destination_key(&alice, &a("1.2.3.4:80"))
        );
        assert_eq!(
            destination_key(&none, &Target::Name("Example.ORG".into(), 80)),
            destination_key(&none, &Target::Name("example.org".into(), 443))
        );
    }

    #[test]
    fn negotiate_parses_a_whole_connection_without_a_network() {
        let connect = [5, 1, 0, 5, 1, 0, 1, 1, 2, 3, 4, 0, 80];
        let (r, written) = negotiate(&connect);
        assert_eq!(r.unwrap(), (1, Target::Addr("1.2.3.4:80".parse().unwrap())));
        assert_eq!(written, [5, 0]);
        // An unknown address type gets its reply code; garbage a silent close.
        let (r, _) = negotiate(&[5, 1, 0, 5, 1, 0, 9]);
        assert_eq!(r.unwrap_err(), Some(Status::AddressType));
        let (r, written) = negotiate(b"GET / HTTP/1.1");
        assert_eq!((r.unwrap_err(), written.len()), (None, 0));
        // Cut short: no request, and only the method reply went out.
        let (r, written) = negotiate(&connect[..9]);
        assert_eq!((r.unwrap_err(), written), (None, vec![5, 0]));
    }

    async fn run(input: &[u8]) -> (Result<Request, Fail>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(input).await.unwrap();
        a.shutdown().await.unwrap();
        let r = handshake(&mut b).await;
        drop(b);
        let mut out = Vec::new();
        a.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn connect_with_a_name_and_with_credentials() {
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 3, 3, b'a', b'.', b'b', 0, 80]).await;
        let r = r.unwrap();
        assert_eq!((r.cmd, r.key), (1, None));
        assert_eq!(r.target, Target::Name("a.b".into(), 80));
        assert_eq!(out, [5, 0]);
        let (r, out) = run(&[
            5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 1, 0, 22,
        ])
        .await;
        let r = r.unwrap();
        assert_eq!(r.key, Some((b"u".to_vec(), b"pw".to_vec())));
        assert_eq!(r.target, Target::Addr("[::1]:22".parse().unwrap()));
        assert_eq!(out, [5, 2, 1, 0]);
    }

    #[tokio::test]
    async fn bad_input_gets_the_protocols_answer() {
        // Wrong version: no reply defined.
        let (r, out) = run(&[4, 1, 0]).await;
        assert!(matches!(r, Err(Fail::Close)));
        assert!(out.is_empty());
        // No acceptable method.
        let (r, out) = run(&[5, 1, 0x80]).await;
        assert!(matches!(r, Err(Fail::Close)));
        assert_eq!(out, [5, 0xff]);
        // Truncated request.
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 1, 127]).await;
        assert!(matches!(r, Err(Fail::Close)));
        // BIND is not supported; unknown address types neither.
        let (r, _) = run(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await;
        assert!(matches!(r, Err(Fail::Reply(Status::Command))));
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 9, 1, 2]).await;
        assert!(matches!(r, Err(Fail::Reply(Status::AddressType))));
        // Bad auth version.
        let (r, out) = run(&[5, 1, 2, 9, 0]).await;
        assert!(matches!(r, Err(Fail::Close)));
        assert_eq!(out, [5, 2, 1, 1]);
        // An empty or non-ASCII host name.
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80]).await;
        assert!(matches!(r, Err(Fail::Reply(Status::General))));
    }

    #[test]
    fn udp_headers() {
        let mut d = vec![0, 0, 0, 1, 10, 0, 0, 1, 0, 53];
        d.extend_from_slice(b"query");
        assert_eq!(
            parse_udp(&d),
            Some(("10.0.0.1:53".parse().unwrap(), &b"query"[..]))
        );
        d[2] = 1;
        assert_eq!(parse_udp(&d), None);
        assert_eq!(parse_udp(&[0, 0, 0, 3, 1, b'a', 0, 53]), None);
        assert_eq!(parse_udp(&[0, 0]), None);
    }
}
