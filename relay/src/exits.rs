//! Exit sockets and the transmit arena, shared by both drivers.
//!
//! An exit circuit gets its own UDP socket connected to its destination, so replies
//! map to the circuit by socket (as a NAT would), never by guessing from addresses.
//! Both tables are allocated at start-up with fixed capacity.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

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

/// The fixed-capacity exit socket table.
#[derive(Debug)]
pub struct ExitSockets {
    /// Slots (index = exit id).
    pub slots: Vec<ExitSlot>,
    free: Vec<u32>,
    by_circuit: HashMap<CircuitRef, u32>,
    /// Where exit sockets bind (port 0): the relay's own address of the destination's
    /// family, so exit traffic leaves from it.
    bind_v4: IpAddr,
    bind_v6: IpAddr,
    /// SO_RCVBUF/SO_SNDBUF asked for each exit socket (0: the kernel's default).
    buffer: usize,
}

impl ExitSockets {
    /// `n` exit slots binding the unspecified address, with the kernel's buffers.
    pub fn new(n: usize) -> Self {
        Self::with_binding(n, &[], 0)
    }

    /// `n` exit slots whose sockets bind the first address of the destination's family
    /// in `local` (the relay's own listen addresses; the unspecified address if it has
    /// none of that family, or when it listens on the unspecified address) and ask for
    /// `buffer` bytes of socket buffer (0: the kernel's default; the kernel clamps to
    /// `net.core.rmem_max`/`wmem_max`).
    pub fn with_binding(n: usize, local: &[IpAddr], buffer: usize) -> Self {
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
            bind_v4: first(true),
            bind_v6: first(false),
            buffer,
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

    /// Opens a socket connected to `dest` for `circuit`. `Ok(None)` if the table is full.
    pub fn open(
        &mut self,
        circuit: CircuitRef,
        dest: SocketAddr,
        nonblocking: bool,
    ) -> io::Result<Option<u32>> {
        let Some(idx) = self.free.pop() else {
            return Ok(None);
        };
        let ip = if dest.is_ipv4() {
            self.bind_v4
        } else {
            self.bind_v6
        };
        let sock = match open_exit_socket(SocketAddr::new(ip, 0), dest, self.buffer) {
            Ok(s) => s,
            Err(e) => {
                self.free.push(idx);
                return Err(e);
            }
        };
        sock.set_nonblocking(nonblocking)?;
        let slot = &mut self.slots[idx as usize];
        slot.sock = Some(sock);
        slot.circuit = Some(circuit);
        slot.closing = false;
        self.by_circuit.insert(circuit, idx);
        Ok(Some(idx))
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

/// A UDP socket bound to `bind`, with `buffer` bytes of socket buffer asked for (0:
/// the kernel's default), connected to `dest`.
fn open_exit_socket(bind: SocketAddr, dest: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if buffer > 0 {
        // Best effort: the kernel clamps to its maximum.
        let _ = s.set_recv_buffer_size(buffer);
        let _ = s.set_send_buffer_size(buffer);
    }
    s.bind(&bind.into())?;
    s.connect(&dest.into())?;
    Ok(s.into())
}
