//! Traffic pieces shared by the benchmarks: a generator that builds circuits with the
//! protocol core and sends pre-sealed cells with UDP GSO, an in-process sink relay,
//! and a payload sink.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rand_core::OsRng;
use shroud_proto::aead::Aead;
use shroud_proto::client::{ClientCircuit, ClientLink, PathHop, Received};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{Action, Peer, Relay, RelayLimits};
use shroud_proto::retry::{apply_token, open_retry, retry_key};
use shroud_proto::Layout;

use crate::net::Virtual;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sets SO_RCVBUF/SO_SNDBUF (best effort).
pub fn set_buffers(s: &UdpSocket, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                4,
            );
        }
    }
}

/// Sends `cells` (a whole number of `cell`-byte cells) to `dest`, up to 64 cells per
/// `sendmsg` with `UDP_SEGMENT`. Returns the cells the kernel accepted.
pub fn gso_send(sock: &UdpSocket, dest: SocketAddr, cells: &[u8], cell: usize) -> usize {
    use shroud_relay::sys;
    let per = sys::gso_segments(64, cell);
    let mut sent = 0;
    for chunk in cells.chunks(per * cell) {
        let mut iov = [libc::iovec {
            iov_base: chunk.as_ptr() as *mut libc::c_void,
            iov_len: chunk.len(),
        }];
        let seg = (chunk.len() > cell).then_some(cell as u16);
        // SAFETY: the iovec points to `chunk`, borrowed for this synchronous call.
        let r = unsafe { sys::send_gso(sock, Some(&dest), &mut iov, seg) };
        if r > 0 {
            sent += r as usize / cell;
        }
    }
    sent
}

/// A client that builds circuits with the protocol core and seals cells in bulk.
pub struct Generator {
    /// The socket everything is sent from.
    pub sock: UdpSocket,
    /// Layout.
    pub layout: Layout,
    links: Vec<ClientLink>,
    /// Junk and padding randomness for sealing, seeded from the OS once (one
    /// getrandom per cell would dominate the generator's cost).
    rng: rand_chacha::ChaCha20Rng,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

/// A built circuit.
pub struct Circ<A: Aead> {
    /// Protocol state.
    pub inner: ClientCircuit<A>,
    /// Index of its link in the generator.
    pub link: usize,
    /// First hop.
    pub first: SocketAddr,
}

impl<A: Aead> std::fmt::Debug for Circ<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circ")
            .field("first", &self.first)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// A generator bound to `bind`.
    pub fn new(bind: SocketAddr, layout: Layout) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind(bind).with_context(|| format!("cannot bind {bind}"))?;
        Self::with_socket(sock, layout)
    }

    /// A generator on a socket the caller made (e.g. in another network namespace).
    pub fn with_socket(sock: UdpSocket, layout: Layout) -> anyhow::Result<Self> {
        set_buffers(&sock, 16 << 20);
        shroud_relay::sys::enable_gro(&sock)?;
        let rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_rng(OsRng)
            .map_err(|e| anyhow::anyhow!("seeding the generator: {e}"))?;
        Ok(Generator {
            sock,
            layout,
            links: Vec::new(),
            rng,
        })
    }

    /// Builds a circuit through `path` to `dest` and waits for CREATED.
    pub fn build<A: Aead>(
        &mut self,
        path: &[PathHop],
        mix_mean_ms: &[u16],
        dest: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Circ<A>> {
        let first = path[0].addr;
        let link = match self.links.iter().position(|l| l.relay() == first) {
            Some(i) => i,
            None => {
                self.links
                    .push(ClientLink::new(&path[0].id, first, &mut OsRng));
                self.links.len() - 1
            }
        };
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let mut cell = vec![0u8; self.layout.cell];
            let mut c = ClientCircuit::<A>::build_mixed(
                &self.layout,
                &self.links[link],
                path,
                mix_mean_ms,
                dest,
                now_ms(),
                &mut OsRng,
                &mut cell,
            )?;
            self.sock.send_to(&cell, first)?;
            // A first hop under load answers a new link's setup with a RETRY
            // (PROTOCOL.md 5.5): send the same setup again with its token.
            let retry_key: A = retry_key(&path[0].id);
            let mut retries = 0;
            let attempt_end = Instant::now() + Duration::from_millis(500);
            while Instant::now() < attempt_end {
                self.sock
                    .set_read_timeout(Some(Duration::from_millis(50)))?;
                let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                    continue;
                };
                if from != first || n % self.layout.cell != 0 {
                    continue;
                }
                for reply in buf[..n].chunks_exact_mut(self.layout.cell) {
                    if !self.links[link].is_linked() && retries < 2 {
                        let mut copy = reply.to_vec();
                        if let Some(token) = open_retry(&self.layout, &retry_key, &cell, &mut copy)
                        {
                            retries += 1;
                            self.links[link].set_retry_token(token, now_ms());
                            apply_token(&token, &mut cell);
                            self.sock.send_to(&cell, first)?;
                            continue;
                        }
                    }
                    let Ok(h) = self.links[link].read_header(reply) else {
                        continue;
                    };
                    if h.circuit != c.id() {
                        continue;
                    }
                    match c.open(&h, reply) {
                        Ok(Received::Created) => {
                            return Ok(Circ {
                                inner: c,
                                link,
                                first,
                            })
                        }
                        Ok(Received::Refused { hop, reason }) => {
                            bail!("hop {hop} refused the circuit (reason {reason})")
                        }
                        _ => {}
                    }
                }
            }
        }
        bail!("no CREATED from {first} within {timeout:?}")
    }

    /// `n` setup cells (appended to `out`) of circuits through `path` to `dest`, on the
    /// link to `path[0]` that an earlier [`Generator::build`] established, built now
    /// and not sent: the setup benchmark sends them later, so that the relay is timed
    /// and not the client's public-key work.
    pub fn setup_cells<A: Aead>(
        &mut self,
        path: &[PathHop],
        dest: SocketAddr,
        n: usize,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let link = self
            .links
            .iter()
            .position(|l| l.relay() == path[0].addr && l.is_linked())
            .context("no established link to the first hop: build a circuit first")?;
        let cell = self.layout.cell;
        for _ in 0..n {
            let start = out.len();
            out.resize(start + cell, 0);
            ClientCircuit::<A>::build_mixed(
                &self.layout,
                &self.links[link],
                path,
                &[],
                dest,
                now_ms(),
                &mut self.rng,
                &mut out[start..],
            )?;
        }
        Ok(())
    }

    /// Seals one data cell carrying `payload` for `c` into `cell`.
    pub fn seal_one<A: Aead>(
        &mut self,
        c: &mut Circ<A>,
        payload: &[u8],
        cell: &mut [u8],
    ) -> anyhow::Result<()> {
        c.inner
            .seal_data(&self.links[c.link], payload, cell, &mut self.rng)?;
        Ok(())
    }

    /// Seals `per_circuit` data cells for each of `circuits` ahead of time, on up to
    /// `threads` threads (each seals whole circuits, with its own randomness). Cell `j`
    /// of circuit `i` carries `payload` with its first 8 bytes replaced by
    /// `stamp(i, j)` (little endian). Returns each circuit's cells back to back, in the
    /// order they must be sent: each cell's counter is one more than the last one's,
    /// and the circuits' own counters move past them, so cells sealed live afterwards
    /// follow on. When `stop` is set, each thread stops after the cell at hand and the
    /// circuits it was sealing keep the cells sealed so far.
    pub fn preseal<A: Aead + Send>(
        &self,
        circuits: &mut [Circ<A>],
        per_circuit: usize,
        payload: &[u8],
        threads: usize,
        stamp: impl Fn(usize, usize) -> u64 + Sync,
        stop: &AtomicBool,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        anyhow::ensure!(payload.len() >= 8, "a stamped payload needs 8 bytes");
        let cell = self.layout.cell;
        let per_thread = circuits.len().div_ceil(threads.max(1)).max(1);
        let (links, stamp) = (&self.links, &stamp);
        let count = circuits.len();
        std::thread::scope(|scope| {
            let workers: Vec<_> = circuits
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(t, chunk)| {
                    scope.spawn(move || -> anyhow::Result<Vec<Vec<u8>>> {
                        let mut rng =
                            <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_rng(OsRng)
                                .map_err(|e| anyhow::anyhow!("seeding a sealer: {e}"))?;
                        let mut data = payload.to_vec();
                        let mut out = Vec::with_capacity(chunk.len());
                        for (k, c) in chunk.iter_mut().enumerate() {
                            let i = t * per_thread + k;
                            let mut cells = vec![0u8; per_circuit * cell];
                            let mut sealed = 0;
                            for (j, dst) in cells.chunks_exact_mut(cell).enumerate() {
                                if stop.load(Relaxed) {
                                    break;
                                }
                                data[..8].copy_from_slice(&stamp(i, j).to_le_bytes());
                                c.inner.seal_data(&links[c.link], &data, dst, &mut rng)?;
                                sealed += 1;
                            }
                            cells.truncate(sealed * cell);
                            out.push(cells);
                        }
                        Ok(out)
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(count);
            for w in workers {
                let part = w
                    .join()
                    .map_err(|_| anyhow::anyhow!("a sealing thread panicked"))??;
                all.extend(part);
            }
            Ok(all)
        })
    }

    /// Seals `n` data cells with `payload` bytes each for `c` into `out` (appended).
    pub fn seal<A: Aead>(
        &mut self,
        c: &mut Circ<A>,
        n: usize,
        payload: usize,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let cell = self.layout.cell;
        let data = vec![0xa5u8; payload];
        for _ in 0..n {
            let start = out.len();
            out.resize(start + cell, 0);
            c.inner
                .seal_data(&self.links[c.link], &data, &mut out[start..], &mut OsRng)?;
        }
        Ok(())
    }
}

/// An in-process relay of the peer list that acts as the exit for setups and, once
/// counting, only counts the cells it receives (the relay benchmark's sink).
pub struct SinkRelay {
    /// Cells received while counting.
    pub cells: Arc<AtomicU64>,
    counting: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
    reached: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SinkRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkRelay")
            .field("cells", &self.cells.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl SinkRelay {
    /// Starts the sink relay `v`, knowing `peers`.
    pub fn start<A: Aead>(v: &Virtual, peers: Vec<Peer>, layout: Layout) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind(v.addr)
            .with_context(|| format!("cannot bind the sink at {}", v.addr))?;
        Self::start_on::<A>(sock, v, peers, layout)
    }

    /// As [`SinkRelay::start`], on a socket bound to `v.addr` by the caller (e.g. in
    /// another network namespace).
    pub fn start_on<A: Aead>(
        sock: UdpSocket,
        v: &Virtual,
        peers: Vec<Peer>,
        layout: Layout,
    ) -> anyhow::Result<Self> {
        set_buffers(&sock, 32 << 20);
        shroud_relay::sys::enable_gro(&sock)?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut relay = Relay::<A>::new(
            layout,
            v.identity.clone(),
            vec![v.onion.clone()],
            peers,
            // Loopback, and the veth path's block (crate::veth).
            ExitPolicy::parse(&["accept 127.0.0.0/8:*", "accept 10.251.0.0/24:*"])
                .unwrap_or_default(),
            RelayLimits {
                max_circuits: 4096,
                max_links: 1024,
                setup_rate: 100_000,
                setup_burst: 100_000,
                ..RelayLimits::default()
            },
            now_ms(),
        );
        let cells = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let reached = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, k2, t2, r2, s2) = (
            cells.clone(),
            counting.clone(),
            target.clone(),
            reached.clone(),
            stop.clone(),
        );
        let cell = layout.cell;
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s2.load(Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if k2.load(Relaxed) {
                        let total = c2.fetch_add((n / cell) as u64, Relaxed) + (n / cell) as u64;
                        if total >= t2.load(Relaxed) {
                            let mut r = r2.lock().unwrap_or_else(|e| e.into_inner());
                            if r.is_none() {
                                *r = Some(Instant::now());
                            }
                        }
                        continue;
                    }
                    for c in buf[..n].chunks_exact_mut(cell) {
                        if let Action::Send { to, .. } = relay.handle(from, c, now_ms()) {
                            let _ = sock.send_to(c, to);
                        }
                    }
                }
            })?;
        Ok(SinkRelay {
            cells,
            counting,
            target,
            reached,
            stop,
            thread: Some(thread),
        })
    }

    /// Switches to counting mode.
    pub fn count(&self) {
        self.counting.store(true, Relaxed);
    }

    /// Arms the sink: the time the total reaches `target` is recorded.
    pub fn arm(&self, target: u64) {
        *self.reached.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.target.store(target, Relaxed);
    }

    /// When the armed target was reached.
    pub fn reached(&self) -> Option<Instant> {
        *self.reached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SinkRelay {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
