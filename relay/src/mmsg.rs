//! The fallback driver, used only when io_uring cannot be set up: `recvmmsg` with UDP
//! GRO, one `sendmsg` with `UDP_SEGMENT` per next hop and batch, `poll` to wait.
//! Same engine, same zero-copy rule (cells are sent from the buffer they arrived in
//! before that buffer is reused), synchronous sends.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

use shroud_proto::relay::DropReason;

use crate::engine::{delivery_run, CellAt, Out, Plan, SideEffect, MAX_DELIVERY_RUN};
use crate::engine::{Engine, WorkerEnd};
use crate::exits::{ExitSockets, TxArena, EXIT_BUF};
use crate::spec::WorkerSpec;
use crate::sys::{self, CMSG_BUF};
use shroud_proto::aead::Aead;

const RX_BUF: usize = 65536;
const MAX_SEGS: usize = 64;

/// The recvmmsg/sendmmsg driver of one worker.
pub struct Driver {
    sockets: Vec<std::net::UdpSocket>,
    bufs: Vec<Box<[u8]>>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    ctrls: Vec<[u8; CMSG_BUF]>,
    msgs: Vec<libc::mmsghdr>,
    arena: TxArena,
    exits: ExitSockets,
    cell: usize,
    max_segs: usize,
    /// Exit deliveries may leave in GSO runs (`[io] gro_gso`; off for good once the
    /// kernel refuses one).
    exit_gso: bool,
    plan: Plan,
    side: Vec<SideEffect>,
    pollfds: Vec<libc::pollfd>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("mmsg::Driver")
            .field("slots", &self.bufs.len())
            .finish_non_exhaustive()
    }
}

/// Sends one exit payload on its circuit's connected socket, and counts it.
fn send_payload<A: Aead>(engine: &mut Engine<A>, sock: &std::net::UdpSocket, payload: &[u8]) {
    match sock.send(payload) {
        Ok(_) => engine.stats().exit_delivered.fetch_add(1, Relaxed),
        Err(_) => engine.stats().send_errors.fetch_add(1, Relaxed),
    };
    engine.stats().exit_sends.fetch_add(1, Relaxed);
}

impl Driver {
    /// Allocates every buffer.
    pub fn new(spec: &WorkerSpec) -> io::Result<Self> {
        let mut sockets = Vec::new();
        for s in &spec.sockets {
            let s = s.try_clone()?;
            if spec.io.gro_gso {
                sys::enable_gro(&s)?;
            }
            sys::enable_rx_timestamps(&s)?;
            s.set_nonblocking(true)?;
            sockets.push(s);
        }
        let n = spec.io.recv_slots.max(1);
        let cell = spec.layout.cell;
        let mut d = Driver {
            sockets,
            bufs: (0..n)
                .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
                .collect(),
            // SAFETY: all-zero is valid for these plain C structs; pointers are set below.
            iovs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            addrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            ctrls: vec![[0u8; CMSG_BUF]; n],
            msgs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            arena: TxArena::new(spec.io.tx_cells, spec.io.mix_queue, cell),
            exits: ExitSockets::with_binding(
                spec.io.exit_sockets,
                &spec.local_ips(),
                spec.io.socket_buffer_bytes,
                true,
                spec.index,
            )?,
            cell,
            exit_gso: spec.io.gro_gso,
            max_segs: if spec.io.gro_gso {
                sys::gso_segments(MAX_SEGS, cell)
            } else {
                1
            },
            plan: Plan::default(),
            side: Vec::with_capacity(256),
            pollfds: Vec::with_capacity(spec.sockets.len() + spec.io.exit_sockets),
        };
        for i in 0..n {
            d.iovs[i].iov_base = d.bufs[i].as_mut_ptr().cast();
            d.iovs[i].iov_len = RX_BUF;
        }
        Ok(d)
    }

    fn reset_msgs(&mut self) {
        for i in 0..self.msgs.len() {
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrls[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_BUF;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
    }

    fn send_group<A: Aead>(
        &self,
        engine: &mut Engine<A>,
        dest: &std::net::SocketAddr,
        cells: &[CellAt],
    ) {
        let Some(sock) = engine.socket_for(dest).map(|i| &self.sockets[i]) else {
            engine.count_drop(DropReason::QueueFull, cells.len() as u64);
            return;
        };
        // SAFETY: all-zero is a valid iovec array.
        let mut iovs: [libc::iovec; MAX_SEGS] = unsafe { zeroed() };
        for chunk in cells.chunks(self.max_segs) {
            for (k, loc) in chunk.iter().enumerate() {
                let ptr = match *loc {
                    CellAt::Rx { slot, off } => self.bufs[slot as usize][off as usize..].as_ptr(),
                    CellAt::Tx { idx } => self.arena.ptr(idx),
                };
                iovs[k] = libc::iovec {
                    iov_base: ptr as *mut libc::c_void,
                    iov_len: self.cell,
                };
            }
            let seg = (chunk.len() > 1).then_some(self.cell as u16);
            // SAFETY: every iovec points to a whole cell in a receive buffer or the
            // transmit arena, both owned by self and alive for this synchronous call.
            let r = unsafe { sys::send_gso(sock, Some(dest), &mut iovs[..chunk.len()], seg) };
            if r < 0 {
                engine.send_failed(chunk.len() as u64);
            } else {
                engine
                    .stats()
                    .cells_tx
                    .fetch_add(chunk.len() as u64, Relaxed);
                engine.stats().datagrams_tx.fetch_add(1, Relaxed);
            }
        }
    }

    /// Sends `run`, consecutive exit deliveries of one circuit ([`delivery_run`]), in
    /// one UDP GSO send.
    fn deliver_run<A: Aead>(&mut self, engine: &mut Engine<A>, run: &[SideEffect]) {
        let Some(SideEffect::Deliver { circuit, range, .. }) = run.first() else {
            return;
        };
        let sock = self
            .exits
            .get(circuit)
            .and_then(|x| self.exits.slots[x as usize].sock.as_ref());
        let Some(sock) = sock else {
            engine.count_drop(DropReason::UnknownCircuit, run.len() as u64);
            return;
        };
        // SAFETY: all-zero is a valid iovec array and msghdr.
        let mut iovs: [libc::iovec; MAX_DELIVERY_RUN] = unsafe { zeroed() };
        let mut n = 0;
        for d in run.iter().take(MAX_DELIVERY_RUN) {
            if let SideEffect::Deliver { slot, range, .. } = d {
                let payload = &self.bufs[*slot as usize][range.clone()];
                iovs[n] = libc::iovec {
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                };
                n += 1;
            }
        }
        // SAFETY: every iovec points to a payload in a receive buffer owned by self,
        // alive for this synchronous call; the socket is connected (no address).
        let r = unsafe { sys::send_gso(sock, None, &mut iovs[..n], Some(range.len() as u16)) };
        engine.stats().exit_sends.fetch_add(1, Relaxed);
        if r >= 0 {
            engine.stats().exit_delivered.fetch_add(n as u64, Relaxed);
            return;
        }
        engine.stats().send_errors.fetch_add(1, Relaxed);
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if !sys::gso_refused(errno) {
            return;
        }
        // This path cannot segment: send these payloads and every later one alone.
        self.exit_gso = false;
        tracing::warn!(
            errno,
            "the kernel refused a GSO exit send; exit payloads now leave one send each"
        );
        for d in run {
            if let SideEffect::Deliver { slot, range, .. } = d {
                send_payload(engine, sock, &self.bufs[*slot as usize][range.clone()]);
            }
        }
    }

    fn flush<A: Aead>(&mut self, engine: &mut Engine<A>) {
        let side = std::mem::take(&mut self.side);
        let mut i = 0;
        while i < side.len() {
            let n = delivery_run(&side, i, self.exit_gso);
            if n > 1 {
                self.deliver_run(engine, &side[i..i + n]);
                i += n;
                continue;
            }
            let s = &side[i];
            i += 1;
            match s {
                // The engine opened the socket; reads poll every open socket.
                SideEffect::Opened { .. } => {}
                SideEffect::Closed { circuit } => {
                    if let Some(x) = self.exits.detach(circuit) {
                        self.exits.free(x);
                    }
                }
                SideEffect::Deliver {
                    circuit,
                    slot,
                    range,
                    ..
                } => {
                    let sock = self
                        .exits
                        .get(circuit)
                        .and_then(|x| self.exits.slots[x as usize].sock.as_ref());
                    match sock {
                        Some(sock) => {
                            send_payload(engine, sock, &self.bufs[*slot as usize][range.clone()])
                        }
                        None => engine.count_drop(DropReason::UnknownCircuit, 1),
                    }
                }
                SideEffect::DeliverHeld { circuit, idx, len } => {
                    let sock = self
                        .exits
                        .get(circuit)
                        .and_then(|x| self.exits.slots[x as usize].sock.as_ref());
                    match sock {
                        Some(sock) => {
                            let cell = self.arena.cell_mut(*idx);
                            send_payload(engine, sock, &cell[..usize::from(*len)]);
                        }
                        // The circuit closed while its payload was held.
                        None => engine.count_drop(DropReason::UnknownCircuit, 1),
                    }
                    self.arena.release(*idx);
                }
            }
        }
        self.side = side;
        self.side.clear();
        let plan = std::mem::take(&mut self.plan);
        for g in plan.groups() {
            self.send_group(engine, &g.dest, &g.cells);
            for loc in &g.cells {
                if let CellAt::Tx { idx } = *loc {
                    self.arena.release(idx);
                }
            }
        }
        self.plan = plan;
        self.plan.clear();
        engine.sends_handed_over();
    }

    fn read_exits<A: Aead>(&mut self, engine: &mut Engine<A>, now: u64) {
        for x in 0..self.exits.slots.len() {
            loop {
                let slot = &self.exits.slots[x];
                let (Some(sock), Some(circuit)) = (slot.sock.as_ref(), slot.circuit) else {
                    break;
                };
                let mut buf = [0u8; EXIT_BUF];
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        engine.stats().recv_errors.fetch_add(1, Relaxed);
                        break;
                    }
                };
                engine.exit_payload(circuit, &buf[..n], &mut self.arena, &mut self.plan, now);
            }
        }
    }

    /// Runs until stopped or drained.
    pub(crate) fn run<A: Aead>(&mut self, engine: &mut Engine<A>) -> io::Result<WorkerEnd> {
        let mut last_tick = 0u64;
        loop {
            self.pollfds.clear();
            for s in &self.sockets {
                self.pollfds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for e in &self.exits.slots {
                if let Some(s) = &e.sock {
                    self.pollfds.push(libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            // Wake for the tick or for the next cell mix mode holds (see uring.rs).
            let wait_ms = engine
                .next_wake_ms(sys::now_ms())
                .map_or(50, |ms| ms.clamp(1, 50));
            // SAFETY: pollfds is a valid array of the length passed.
            let r = unsafe {
                libc::poll(
                    self.pollfds.as_mut_ptr(),
                    self.pollfds.len() as libc::nfds_t,
                    wait_ms as i32,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
            let now = sys::now_ms();
            engine.begin_batch();
            for si in 0..self.sockets.len() {
                loop {
                    self.reset_msgs();
                    // SAFETY: msgs/iovs/addrs/ctrls are owned by self, sized as passed,
                    // and their pointers were just set by reset_msgs.
                    let n = unsafe {
                        libc::recvmmsg(
                            self.sockets[si].as_raw_fd(),
                            self.msgs.as_mut_ptr(),
                            self.msgs.len() as u32,
                            libc::MSG_DONTWAIT,
                            std::ptr::null_mut(),
                        )
                    };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        if !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) {
                            engine.stats().recv_errors.fetch_add(1, Relaxed);
                        }
                        break;
                    }
                    if n == 0 {
                        break;
                    }
                    // Batch latency: from here to the sends being submitted.
                    let reaped = std::time::Instant::now();
                    for i in 0..n as usize {
                        let h = &self.msgs[i].msg_hdr;
                        let len = self.msgs[i].msg_len as usize;
                        let ctrl = &self.ctrls[i][..h.msg_controllen.min(CMSG_BUF)];
                        let cmsgs = sys::recv_cmsgs(ctrl);
                        let seg = cmsgs.gro_segment.unwrap_or(len);
                        let src = sys::from_sockaddr(&self.addrs[i], h.msg_namelen);
                        let trunc = h.msg_flags & libc::MSG_TRUNC != 0;
                        match src {
                            Some(src) if !trunc && seg.is_multiple_of(self.cell) => {
                                let buf = &mut self.bufs[i][..len];
                                let out = Out {
                                    plan: &mut self.plan,
                                    side: &mut self.side,
                                    arena: &mut self.arena,
                                };
                                engine.on_datagram(
                                    src,
                                    si,
                                    i as u32,
                                    buf,
                                    cmsgs.received_ns,
                                    out,
                                    &mut self.exits,
                                    now,
                                );
                            }
                            _ => engine.count_drop(DropReason::Malformed, 1),
                        }
                    }
                    // Send before the buffers are reused by the next recvmmsg.
                    self.flush(engine);
                    engine.stats().batch_latency.record(reaped.elapsed());
                    engine.stats().batches.fetch_add(1, Relaxed);
                    if (n as usize) < self.msgs.len() {
                        break;
                    }
                }
            }
            self.read_exits(engine, now);
            engine.release_held(now, &mut self.plan, &mut self.side);
            engine.pad_links(now, &mut self.arena, &mut self.plan);
            self.flush(engine);
            engine.publish();
            if let Some(exit) = engine.poll_control(now) {
                return Ok(exit);
            }
            if now.saturating_sub(last_tick) >= 100 {
                last_tick = now;
                engine.expire(now, &mut self.arena, &mut self.plan, &mut self.side);
                self.flush(engine);
            }
        }
    }
}
