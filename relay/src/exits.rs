//! Exit sockets and the transmit arena, shared by both drivers.
//!
//! An exit circuit gets its own UDP socket connected to its destination, so replies
//! map to the circuit by socket (as a NAT would), never by guessing from addresses.
//! Both tables are allocated at start-up with fixed capacity.
//!
//! Making a socket (socket, buffer sizes, mode, bind) costs several system calls; none
//! of them happens on the worker thread. A [`SocketPool`] keeps a few ready sockets
//! per address family, made by a helper thread and bound to the relay's address
//! *without a port* (`IP_BIND_ADDRESS_NO_PORT`), so that until its circuit connects it
//! cannot receive anything; opening an exit costs the worker one `connect`, which
//! picks the port. Only when a burst of exits empties the pool does the worker make
//! a socket itself (counted as a pool miss).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use shroud_proto::relay::CircuitRef;

/// Bytes of one exit receive buffer (a reply larger than a cell's payload is dropped).
pub const EXIT_BUF: usize = 2048;

/// Cells the worker originates (exit replies, expiry notices) and cells mix mode holds,
/// in one contiguous buffer with a separate pool for each, so that neither can starve
/// the other.
#[derive(Debug)]
pub struct TxArena {
    buf: Box<[u8]>,
    cell: usize,
    /// Cells `0..originated` are for originated cells, the rest for held ones.
    originated: u32,
    free: Vec<u32>,
    free_held: Vec<u32>,
}

impl TxArena {
    /// `n` cells of `cell` bytes for originated cells and `held` for mix mode.
    pub fn new(n: usize, held: usize, cell: usize) -> Self {
        let end = (n + held) as u32;
        TxArena {
            buf: vec![0u8; (n + held) * cell].into_boxed_slice(),
            cell,
            originated: n as u32,
            free: (0..n as u32).rev().collect(),
            free_held: (n as u32..end).rev().collect(),
        }
    }

    /// Takes a free cell for a cell the worker originates.
    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Takes a free cell for a cell mix mode holds.
    pub fn alloc_held(&mut self) -> Option<u32> {
        self.free_held.pop()
    }

    /// Returns a cell to its pool.
    pub fn release(&mut self, idx: u32) {
        if idx < self.originated {
            self.free.push(idx);
        } else {
            self.free_held.push(idx);
        }
    }

    /// The bytes of cell `idx`.
    pub fn cell_mut(&mut self, idx: u32) -> &mut [u8] {
        let s = idx as usize * self.cell;
        &mut self.buf[s..s + self.cell]
    }

    /// Address of cell `idx` (stable: the buffer never moves).
    pub fn ptr(&self, idx: u32) -> *const u8 {
        self.buf[idx as usize * self.cell..].as_ptr()
    }
}

/// One exit socket.
#[derive(Debug)]
pub struct ExitSlot {
    /// The connected socket (None when free).
    pub sock: Option<UdpSocket>,
    /// Receive buffer.
    pub buf: Box<[u8]>,
    /// The circuit it serves.
    pub circuit: Option<CircuitRef>,
    /// Closing: its circuit is gone, the pending receive is being cancelled.
    pub closing: bool,
}

/// Ready exit sockets per address family per worker: enough for a burst of exit
/// setups between two refills.
pub const POOL_SOCKETS: usize = 16;

/// How an exit socket is made: where it binds, its buffers, its mode.
#[derive(Debug, Clone, Copy)]
struct Recipe {
    bind_v4: IpAddr,
    bind_v6: IpAddr,
    /// SO_RCVBUF/SO_SNDBUF asked for (0: the kernel's default).
    buffer: usize,
    nonblocking: bool,
}

impl Recipe {
    /// A UDP socket of `dest`'s family, bound to the relay's address of that family
    /// with no port yet (the unspecified address: not bound at all), sized, in the
    /// driver's mode. Until it connects it has no port, so nothing can reach it.
    fn make(&self, v4: bool) -> io::Result<UdpSocket> {
        let ip = if v4 { self.bind_v4 } else { self.bind_v6 };
        let s = socket2::Socket::new(
            if v4 {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            },
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if self.buffer > 0 {
            // Best effort: the kernel clamps to its maximum.
            let _ = s.set_recv_buffer_size(self.buffer);
            let _ = s.set_send_buffer_size(self.buffer);
        }
        s.set_nonblocking(self.nonblocking)?;
        if !ip.is_unspecified() {
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
                .map_err(io::Error::from)?;
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        Ok(s.into())
    }
}

/// Ready-made exit sockets, one queue per address family, filled when the pool starts
/// and kept full by a helper thread that blocks while its queue is full. Dropping the
/// pool stops the helpers.
#[derive(Debug)]
pub struct SocketPool {
    /// Ready sockets: IPv4 first, IPv6 second.
    ready: Vec<Receiver<UdpSocket>>,
    stop: Arc<AtomicBool>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

impl SocketPool {
    fn start(recipe: Recipe, worker: usize) -> io::Result<SocketPool> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut helpers = Vec::new();
        let mut ready = Vec::new();
        for v4 in [true, false] {
            let (tx, rx) = bounded(POOL_SOCKETS);
            // Filled here first (at start, not on the data path), so the pool is full
            // before the first receive; best effort: the helper retries what fails.
            for _ in 0..POOL_SOCKETS {
                let Ok(s) = recipe.make(v4) else { break };
                if tx.try_send(s).is_err() {
                    break;
                }
            }
            let stop = stop.clone();
            let family = if v4 { "v4" } else { "v6" };
            helpers.push(
                std::thread::Builder::new()
                    .name(format!("shroud-xs{worker}-{family}"))
                    .spawn(move || fill(recipe, v4, &tx, &stop))?,
            );
            ready.push(rx);
        }
        Ok(SocketPool {
            ready,
            stop,
            helpers,
        })
    }

    /// A ready socket of the family, if one is waiting.
    fn take(&self, v4: bool) -> Option<UdpSocket> {
        self.ready[usize::from(!v4)].try_recv().ok()
    }
}

/// The helper's loop: make sockets while the queue has room; on an error (no IPv6,
/// out of descriptors) wait and try again, so the worker makes its own meanwhile.
fn fill(recipe: Recipe, v4: bool, tx: &Sender<UdpSocket>, stop: &AtomicBool) {
    let mut logged = false;
    while !stop.load(Relaxed) {
        match recipe.make(v4) {
            Ok(s) => {
                // Blocks while the pool is full; fails once the pool is dropped.
                if tx.send(s).is_err() {
                    return;
                }
            }
            Err(e) => {
                if !logged {
                    tracing::debug!(error = %e, v4, "cannot make a pooled exit socket; retrying");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for SocketPool {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Dropping the receivers wakes a helper blocked in `send` with an error; one
        // that is making a socket or waiting after an error sees the flag.
        self.ready.clear();
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The fixed-capacity exit socket table.
#[derive(Debug)]
pub struct ExitSockets {
    /// Slots (index = exit id).
    pub slots: Vec<ExitSlot>,
    free: Vec<u32>,
    by_circuit: HashMap<CircuitRef, u32>,
    /// How sockets are made: bound to the relay's own address of the destination's
    /// family (so exit traffic leaves from it), sized, in the driver's mode.
    recipe: Recipe,
    /// Ready sockets (None with no exit slots).
    pool: Option<SocketPool>,
    /// Opens that found the pool empty and made their socket on the worker.
    pool_misses: u64,
}

impl ExitSockets {
    /// `n` exit slots binding the unspecified address, with the kernel's buffers,
    /// blocking sockets and no pool (for tests and for dropping a table).
    pub fn new(n: usize) -> Self {
        Self::build(n, &[], 0, false)
    }

    /// `n` exit slots whose sockets bind the first address of the destination's family
    /// in `local` (the relay's own listen addresses; the unspecified address if it has
    /// none of that family, or when it listens on the unspecified address), ask for
    /// `buffer` bytes of socket buffer (0: the kernel's default; the kernel clamps to
    /// `net.core.rmem_max`/`wmem_max`) and are `nonblocking` or not; the pool's
    /// helper threads are named `shroud-xs<worker>-v4` and `-v6`.
    pub fn with_binding(
        n: usize,
        local: &[IpAddr],
        buffer: usize,
        nonblocking: bool,
        worker: usize,
    ) -> io::Result<Self> {
        let mut t = Self::build(n, local, buffer, nonblocking);
        if n > 0 {
            t.pool = Some(SocketPool::start(t.recipe, worker)?);
        }
        Ok(t)
    }

    /// The table without a pool.
    fn build(n: usize, local: &[IpAddr], buffer: usize, nonblocking: bool) -> Self {
        let first = |v4: bool| {
            local
                .iter()
                .copied()
                .find(|a| a.is_ipv4() == v4)
                .unwrap_or(if v4 {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                })
        };
        ExitSockets {
            recipe: Recipe {
                bind_v4: first(true),
                bind_v6: first(false),
                buffer,
                nonblocking,
            },
            pool: None,
            pool_misses: 0,
            slots: (0..n)
                .map(|_| ExitSlot {
                    sock: None,
                    buf: vec![0u8; EXIT_BUF].into_boxed_slice(),
                    circuit: None,
                    closing: false,
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            by_circuit: HashMap::with_capacity(n),
        }
    }

    /// Opens a socket connected to `dest` for `circuit`: a ready one from the pool
    /// (one `connect` here), or one made here if the pool is empty. `Ok(None)` if the
    /// table is full.
    pub fn open(&mut self, circuit: CircuitRef, dest: SocketAddr) -> io::Result<Option<u32>> {
        let Some(idx) = self.free.pop() else {
            return Ok(None);
        };
        let v4 = dest.is_ipv4();
        let made = match self.pool.as_ref().and_then(|p| p.take(v4)) {
            Some(s) => Ok(s),
            None => {
                self.pool_misses += 1;
                self.recipe.make(v4)
            }
        };
        let sock = match made.and_then(|s| s.connect(dest).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                self.free.push(idx);
                return Err(e);
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.sock = Some(sock);
        slot.circuit = Some(circuit);
        slot.closing = false;
        self.by_circuit.insert(circuit, idx);
        Ok(Some(idx))
    }

    /// Opens that made their socket on the worker because the pool was empty.
    pub fn pool_misses(&self) -> u64 {
        self.pool_misses
    }

    /// Stops the pool's helpers and closes its sockets (before the table is leaked).
    pub fn stop_pool(&mut self) {
        self.pool = None;
    }

    /// The exit slot of `circuit`.
    pub fn get(&self, circuit: &CircuitRef) -> Option<u32> {
        self.by_circuit.get(circuit).copied()
    }

    /// Detaches `circuit` from its slot and marks the slot closing; returns it.
    pub fn detach(&mut self, circuit: &CircuitRef) -> Option<u32> {
        let idx = self.by_circuit.remove(circuit)?;
        self.slots[idx as usize].closing = true;
        Some(idx)
    }

    /// Closes the socket of slot `idx` and frees it.
    pub fn free(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        if let Some(c) = slot.circuit.take() {
            if self.by_circuit.get(&c) == Some(&idx) {
                self.by_circuit.remove(&c);
            }
        }
        slot.sock = None;
        slot.closing = false;
        self.free.push(idx);
    }

    /// Exit sockets in use.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits (up to 5 s) until `n` helper threads of `worker` run: a thread names
    /// itself once it starts.
    fn helpers_become(worker: usize, n: usize) -> bool {
        let name = format!("shroud-xs{worker}-");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(&name))
                })
                .count();
            if count == n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_full(t: &ExitSockets) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let pool = t.pool.as_ref().unwrap();
        while pool.ready[0].len() < POOL_SOCKETS {
            assert!(Instant::now() < deadline, "the pool did not fill");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn pooled_sockets_have_no_port_until_an_exit_connects_one() {
        let local = [IpAddr::from([127, 0, 0, 1])];
        let mut t = ExitSockets::with_binding(4, &local, 0, false, 901).unwrap();
        wait_full(&t);
        let pooled = t.pool.as_ref().unwrap().take(true).unwrap();
        // Bound to the relay's address, no port: nothing can reach it yet.
        assert_eq!(pooled.local_addr().unwrap(), "127.0.0.1:0".parse().unwrap());
        drop(pooled);
        let dest = UdpSocket::bind("127.0.0.1:0").unwrap();
        dest.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let x = t
            .open(CircuitRef::from_parts(1, 1), dest.local_addr().unwrap())
            .unwrap()
            .unwrap();
        let sock = t.slots[x as usize].sock.as_ref().unwrap();
        let me = sock.local_addr().unwrap();
        assert_eq!(me.ip(), local[0]);
        assert_ne!(me.port(), 0);
        assert_eq!(sock.peer_addr().unwrap(), dest.local_addr().unwrap());
        // Both ways work, and the reply reaches the exit socket.
        sock.send(b"out").unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = dest.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"out"[..], me));
        dest.send_to(b"back", me).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(sock.recv(&mut buf).unwrap(), 4);
        assert_eq!(t.pool_misses(), 0);
    }

    #[test]
    fn a_burst_past_the_pool_still_opens_and_the_pool_refills() {
        let local = [IpAddr::from([127, 0, 0, 1])];
        let n = POOL_SOCKETS + 8;
        let mut t = ExitSockets::with_binding(n + 1, &local, 0, true, 902).unwrap();
        wait_full(&t);
        let dest: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for i in 0..n as u32 {
            t.open(CircuitRef::from_parts(i, 0), dest).unwrap().unwrap();
        }
        assert_eq!(t.in_use(), n);
        // The helper may refill during the burst: at most the excess was made here.
        assert!(t.pool_misses() <= 8, "{}", t.pool_misses());
        wait_full(&t);
        // Full table: no socket, no error.
        t.open(CircuitRef::from_parts(99, 0), dest)
            .unwrap()
            .unwrap();
        assert!(t
            .open(CircuitRef::from_parts(100, 0), dest)
            .unwrap()
            .is_none());
        // Every exit socket is in the mode the driver asked for.
        for s in t.slots.iter().filter_map(|s| s.sock.as_ref()) {
            let mut b = [0u8; 4];
            assert_eq!(
                s.recv(&mut b).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
    }

    #[test]
    fn dropping_the_table_stops_its_helpers() {
        let t = ExitSockets::with_binding(2, &[], 0, false, 903).unwrap();
        assert!(helpers_become(903, 2));
        wait_full(&t);
        drop(t);
        // Joined in drop: gone at once.
        assert!(helpers_become(903, 0));
        // No slots, no pool, no helpers.
        let t = ExitSockets::with_binding(0, &[], 0, false, 904).unwrap();
        assert!(t.pool.is_none());
    }
}
