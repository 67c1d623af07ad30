//! The io_uring driver: one multishot `RecvMsgMulti` per socket with UDP GRO into a
//! provided-buffer ring ([`BufRing`]), one `SendMsg` with `UDP_SEGMENT` (GSO) per
//! next hop and batch, cells sent from the buffer they arrived in, a buffer given back
//! to the ring only after every send that points into it has completed.
//!
//! Memory: every buffer, msghdr, iovec and control buffer is allocated in
//! [`Driver::new`] inside vectors that are never resized, so the addresses handed to
//! the kernel stay valid for as long as an operation is in flight. The driver counts
//! the operations in flight (an operation's last completion is the one without
//! `IORING_CQE_F_MORE`); its `Drop` cancels them all and waits until the count is
//! zero before any buffer is freed, and leaks the buffers if the kernel does not let
//! go of them in time.

use std::io;
use std::mem::zeroed;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use shroud_proto::relay::DropReason;

use crate::bufring::BufRing;
use crate::engine::{delivery_run, CellAt, Out, Plan, SideEffect};
use crate::engine::{Engine, WorkerEnd};
use crate::exits::{ExitSockets, TxArena, EXIT_BUF};

/// Datagrams read from one exit socket per completion of its receive (see
/// `Driver::drain_exit`).
const EXIT_DRAIN: usize = 64;
use crate::spec::WorkerSpec;
use crate::sys::{self, CMSG_BUF};
use shroud_proto::aead::Aead;

/// Payload bytes of one receive buffer: the largest GRO-coalesced datagram.
const RX_BUF: usize = 65536;
/// The buffer group of the receive ring.
const BGID: u16 = 0;
/// Most cells per GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
const MAX_SEGS: usize = 64;

const K_RECV: u64 = 1;
const K_SEND: u64 = 2;
const K_XRECV: u64 = 3;
const K_XSEND: u64 = 4;
const K_CANCEL: u64 = 5;
/// An exit delivery from the transmit arena (mix mode).
const K_XSEND_TX: u64 = 6;
/// A run of exit deliveries in one UDP GSO send, from send slot `idx`.
const K_XSEND_RUN: u64 = 7;

fn pack_user_data(kind: u64, idx: u64) -> u64 {
    (kind << 56) | idx
}

struct SendSlot {
    hdr: libc::msghdr,
    addr: libc::sockaddr_storage,
    iovs: [libc::iovec; MAX_SEGS],
    ctrl: [u8; CMSG_BUF],
    locs: [CellAt; MAX_SEGS],
    n: usize,
}

/// The io_uring driver of one worker.
pub struct Driver {
    ring: IoUring,
    sockets: Vec<std::net::UdpSocket>,
    /// Receive buffers, shared by every socket's multishot receive.
    bufs: BufRing,
    /// Sends (and exit deliveries) still reading from each receive buffer.
    refs: Vec<u32>,
    /// The msghdr of the multishot receives (only its name and control lengths are
    /// read, when each is armed).
    recv_hdr: Box<libc::msghdr>,
    /// Whether each socket's multishot receive is armed.
    armed: Vec<bool>,
    /// Operations submitted whose last completion has not been reaped.
    inflight: usize,
    tx: Vec<SendSlot>,
    free_tx: Vec<u32>,
    arena: TxArena,
    exits: ExitSockets,
    cell: usize,
    max_segs: usize,
    plan: Plan,
    side: Vec<SideEffect>,
    completions: Vec<(u64, i32, u32)>,
    zero_copy: bool,
    /// Exit deliveries may leave in GSO runs (`[io] gro_gso`; off for good once the
    /// kernel refuses one).
    exit_gso: bool,
    batch_bufs: Vec<u32>,
    /// `min_wait_usec` for the wait (0 when unsupported or off).
    batch_wait_us: u32,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("uring::Driver")
            .field("bufs", &self.bufs)
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Sets up the ring (DEFER_TASKRUN + SINGLE_ISSUER where available) and every
    /// buffer. Fails if io_uring is unavailable (e.g. a container's seccomp policy).
    pub fn new(spec: &WorkerSpec) -> io::Result<Self> {
        // Multishot RecvMsg with a provided-buffer ring needs Linux 6.0; on an older
        // kernel the SQE would fail at run time, so refuse here and let the worker
        // fall back to the recvmmsg driver.
        if sys::kernel_version().is_some_and(|v| v < (6, 0)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the io_uring driver needs Linux 6.0 (multishot receive)",
            ));
        }
        let entries = (spec.io.recv_slots + spec.io.send_slots + spec.io.exit_sockets * 2 + 64)
            .next_power_of_two()
            .min(32768) as u32;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().build(entries))?;
        let batch_wait_us = if ring.params().is_feature_min_timeout() {
            spec.io.batch_wait_us
        } else {
            0
        };
        let mut sockets = Vec::with_capacity(spec.sockets.len());
        for s in &spec.sockets {
            let s = s.try_clone()?;
            if spec.io.gro_gso {
                sys::enable_gro(&s)?;
            }
            sys::enable_rx_timestamps(&s)?;
            sockets.push(s);
        }
        let cell = spec.layout.cell;
        let max_segs = if spec.io.gro_gso {
            sys::gso_segments(MAX_SEGS, cell)
        } else {
            1
        };
        let bufs = BufRing::new(spec.io.recv_slots.max(2), RX_BUF, BGID)?;
        // SAFETY: all-zero is a valid msghdr; only the two lengths are set.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        recv_hdr.msg_namelen = crate::bufring::NAME_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = crate::bufring::CTRL_LEN;
        let mut tx: Vec<SendSlot> = Vec::with_capacity(spec.io.send_slots);
        for _ in 0..spec.io.send_slots {
            tx.push(SendSlot {
                // SAFETY: as above; pointers are set per send.
                hdr: unsafe { zeroed() },
                addr: unsafe { zeroed() },
                iovs: unsafe { zeroed() },
                ctrl: [0; CMSG_BUF],
                locs: [CellAt::Tx { idx: 0 }; MAX_SEGS],
                n: 0,
            });
        }
        let mut d = Driver {
            ring,
            sockets,
            free_tx: (0..tx.len() as u32).rev().collect(),
            refs: vec![0; bufs.len()],
            armed: vec![false; spec.sockets.len()],
            bufs,
            recv_hdr,
            inflight: 0,
            tx,
            arena: TxArena::new(spec.io.tx_cells, spec.io.mix_queue, cell),
            exits: ExitSockets::with_binding(
                spec.io.exit_sockets,
                &spec.local_ips(),
                spec.io.socket_buffer_bytes,
                false,
                spec.index,
            )?,
            cell,
            max_segs,
            plan: Plan::default(),
            side: Vec::with_capacity(256),
            completions: Vec::with_capacity(1024),
            zero_copy: spec.io.zero_copy_send,
            exit_gso: spec.io.gro_gso,
            batch_bufs: Vec::with_capacity(64),
            batch_wait_us,
        };
        d.bufs.register(&d.ring)?;
        d.arm_receives()?;
        d.ring.submit()?;
        Ok(d)
    }

    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we push points at memory owned by `self` that stays
            // allocated and unmoved until its completion is reaped (module docs).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.inflight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Arms the multishot receive of every socket that has none, as long as the
    /// ring has buffers (armed on an empty ring it would end at once with ENOBUFS;
    /// meanwhile datagrams wait in the socket's receive buffer).
    fn arm_receives(&mut self) -> io::Result<()> {
        for i in 0..self.sockets.len() {
            if self.armed[i] || self.bufs.available() == 0 {
                continue;
            }
            let fd = self.sockets[i].as_raw_fd();
            let e = opcode::RecvMsgMulti::new(types::Fd(fd), &*self.recv_hdr, self.bufs.bgid())
                .build()
                .user_data(pack_user_data(K_RECV, i as u64));
            self.push(e)?;
            self.armed[i] = true;
        }
        Ok(())
    }

    fn arm_exit_recv(&mut self, x: u32) -> io::Result<()> {
        let slot = &mut self.exits.slots[x as usize];
        let Some(sock) = slot.sock.as_ref() else {
            return Ok(());
        };
        let e = opcode::Recv::new(
            types::Fd(sock.as_raw_fd()),
            slot.buf.as_mut_ptr(),
            EXIT_BUF as u32,
        )
        .build()
        .user_data(pack_user_data(K_XRECV, u64::from(x)));
        self.push(e)
    }

    fn release(&mut self, loc: CellAt) -> io::Result<()> {
        match loc {
            CellAt::Rx { slot, .. } => {
                let r = &mut self.refs[slot as usize];
                *r -= 1;
                if *r == 0 {
                    self.bufs.provide(slot as u16);
                }
            }
            CellAt::Tx { idx } => self.arena.release(idx),
        }
        Ok(())
    }

    /// Submits one GSO send per next hop (in chunks of `max_segs` cells).
    fn flush<A: Aead>(&mut self, engine: &mut Engine<A>) -> io::Result<()> {
        let plan = std::mem::take(&mut self.plan);
        for g in plan.groups() {
            let sock = engine.socket_for(&g.dest);
            for chunk in g.cells.chunks(self.max_segs) {
                let (Some(sock), Some(t)) = (sock, self.free_tx.pop()) else {
                    // No socket of that family, or every send slot busy: drop.
                    engine.count_drop(DropReason::QueueFull, chunk.len() as u64);
                    for &loc in chunk {
                        if let CellAt::Tx { idx } = loc {
                            self.arena.release(idx);
                        }
                    }
                    continue;
                };
                let cell = self.cell;
                let s = &mut self.tx[t as usize];
                s.n = chunk.len();
                for (k, &loc) in chunk.iter().enumerate() {
                    let ptr = match loc {
                        CellAt::Rx { slot, off } => {
                            self.refs[slot as usize] += 1;
                            self.bufs.payload_ptr(slot as u16, off as usize)
                        }
                        CellAt::Tx { idx } => self.arena.ptr(idx),
                    };
                    s.iovs[k] = libc::iovec {
                        iov_base: ptr as *mut libc::c_void,
                        iov_len: cell,
                    };
                    s.locs[k] = loc;
                }
                let namelen = sys::to_sockaddr(&g.dest, &mut s.addr);
                s.hdr.msg_name = (&mut s.addr as *mut libc::sockaddr_storage).cast();
                s.hdr.msg_namelen = namelen;
                s.hdr.msg_iov = s.iovs.as_mut_ptr();
                s.hdr.msg_iovlen = chunk.len();
                if chunk.len() > 1 {
                    s.hdr.msg_controllen = sys::write_gso_cmsg(&mut s.ctrl, cell as u16);
                    s.hdr.msg_control = s.ctrl.as_mut_ptr().cast();
                } else {
                    s.hdr.msg_control = std::ptr::null_mut();
                    s.hdr.msg_controllen = 0;
                }
                let fd = self.sockets[sock].as_raw_fd();
                let e = if self.zero_copy {
                    opcode::SendMsgZc::new(types::Fd(fd), &s.hdr).build()
                } else {
                    opcode::SendMsg::new(types::Fd(fd), &s.hdr).build()
                }
                .user_data(pack_user_data(K_SEND, u64::from(t)));
                self.push(e)?;
                engine
                    .stats()
                    .cells_tx
                    .fetch_add(chunk.len() as u64, Relaxed);
                engine.stats().datagrams_tx.fetch_add(1, Relaxed);
            }
        }
        self.plan = plan;
        self.plan.clear();
        Ok(())
    }

    /// Sends `run`, consecutive exit deliveries of one circuit ([`delivery_run`]), in
    /// one UDP GSO send from a send slot; with every send slot busy, one send each.
    fn deliver_run<A: Aead>(
        &mut self,
        engine: &mut Engine<A>,
        run: &[SideEffect],
    ) -> io::Result<()> {
        let Some(SideEffect::Deliver { circuit, range, .. }) = run.first() else {
            return Ok(());
        };
        let seg = range.len() as u16;
        let fd = self
            .exits
            .get(circuit)
            .and_then(|x| self.exits.slots[x as usize].sock.as_ref())
            .map(|s| s.as_raw_fd());
        let Some(fd) = fd else {
            // No exit socket (the circuit is gone or its socket is closing).
            engine.count_drop(DropReason::UnknownCircuit, run.len() as u64);
            return Ok(());
        };
        let Some(t) = self.free_tx.pop() else {
            for d in run {
                self.deliver_one(engine, d)?;
            }
            return Ok(());
        };
        let s = &mut self.tx[t as usize];
        s.n = 0;
        for d in run {
            let SideEffect::Deliver { slot, range, .. } = d else {
                continue;
            };
            self.refs[*slot as usize] += 1;
            s.iovs[s.n] = libc::iovec {
                iov_base: self.bufs.payload_ptr(*slot as u16, range.start) as *mut libc::c_void,
                iov_len: range.len(),
            };
            s.locs[s.n] = CellAt::Rx {
                slot: *slot,
                off: range.start as u32,
            };
            s.n += 1;
        }
        // The exit socket is connected: no address.
        s.hdr.msg_name = std::ptr::null_mut();
        s.hdr.msg_namelen = 0;
        s.hdr.msg_iov = s.iovs.as_mut_ptr();
        s.hdr.msg_iovlen = s.n;
        s.hdr.msg_controllen = sys::write_gso_cmsg(&mut s.ctrl, seg);
        s.hdr.msg_control = s.ctrl.as_mut_ptr().cast();
        let n = s.n as u64;
        let e = opcode::SendMsg::new(types::Fd(fd), &s.hdr)
            .build()
            .user_data(pack_user_data(K_XSEND_RUN, u64::from(t)));
        self.push(e)?;
        engine.stats().exit_delivered.fetch_add(n, Relaxed);
        engine.stats().exit_sends.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Sends one exit delivery from its receive slot.
    fn deliver_one<A: Aead>(&mut self, engine: &mut Engine<A>, d: &SideEffect) -> io::Result<()> {
        let SideEffect::Deliver {
            circuit,
            slot,
            range,
            ..
        } = d
        else {
            return Ok(());
        };
        let Some(x) = self.exits.get(circuit) else {
            engine.count_drop(DropReason::UnknownCircuit, 1);
            return Ok(());
        };
        let Some(sock) = self.exits.slots[x as usize].sock.as_ref() else {
            // The circuit's exit socket is already closing.
            engine.count_drop(DropReason::UnknownCircuit, 1);
            return Ok(());
        };
        self.refs[*slot as usize] += 1;
        let e = opcode::Send::new(
            types::Fd(sock.as_raw_fd()),
            self.bufs.payload_ptr(*slot as u16, range.start),
            range.len() as u32,
        )
        .build()
        .user_data(pack_user_data(K_XSEND, u64::from(*slot)));
        self.push(e)?;
        engine.stats().exit_delivered.fetch_add(1, Relaxed);
        engine.stats().exit_sends.fetch_add(1, Relaxed);
        Ok(())
    }

    fn on_side<A: Aead>(&mut self, engine: &mut Engine<A>) -> io::Result<()> {
        let side = std::mem::take(&mut self.side);
        let mut i = 0;
        while i < side.len() {
            let n = delivery_run(&side, i, self.exit_gso);
            if n > 1 {
                self.deliver_run(engine, &side[i..i + n])?;
                i += n;
                continue;
            }
            let s = &side[i];
            i += 1;
            match s {
                SideEffect::Opened { circuit, .. } => {
                    if let Some(x) = self.exits.get(circuit) {
                        self.arm_exit_recv(x)?;
                    }
                }
                SideEffect::Closed { circuit } => {
                    if let Some(x) = self.exits.detach(circuit) {
                        let e = opcode::AsyncCancel::new(pack_user_data(K_XRECV, u64::from(x)))
                            .build()
                            .user_data(pack_user_data(K_CANCEL, u64::from(x)));
                        self.push(e)?;
                    }
                }
                SideEffect::Deliver { .. } => self.deliver_one(engine, s)?,
                SideEffect::DeliverHeld { circuit, idx, len } => {
                    let sock = self
                        .exits
                        .get(circuit)
                        .and_then(|x| self.exits.slots[x as usize].sock.as_ref());
                    let Some(sock) = sock else {
                        // The circuit closed while its payload was held.
                        engine.count_drop(DropReason::UnknownCircuit, 1);
                        self.arena.release(*idx);
                        continue;
                    };
                    let e = opcode::Send::new(
                        types::Fd(sock.as_raw_fd()),
                        self.arena.ptr(*idx),
                        u32::from(*len),
                    )
                    .build()
                    .user_data(pack_user_data(K_XSEND_TX, u64::from(*idx)));
                    self.push(e)?;
                    engine.stats().exit_delivered.fetch_add(1, Relaxed);
                    engine.stats().exit_sends.fetch_add(1, Relaxed);
                }
            }
        }
        self.side = side;
        self.side.clear();
        Ok(())
    }

    fn on_exit_reply<A: Aead>(&mut self, engine: &mut Engine<A>, x: u32, len: usize, now_ms: u64) {
        let slot = &self.exits.slots[x as usize];
        let Some(circuit) = slot.circuit else {
            // A reply racing its circuit's teardown.
            engine.count_drop(DropReason::UnknownCircuit, 1);
            return;
        };
        let payload = &slot.buf[..len.min(EXIT_BUF)];
        engine.exit_payload(circuit, payload, &mut self.arena, &mut self.plan, now_ms);
    }

    /// Reads what else waits on exit socket `x` (at most [`EXIT_DRAIN`] datagrams)
    /// before its receive is armed again. A burst from the destination (a QUIC
    /// gateway sends ten packets at once) then joins this batch and leaves in one
    /// send per next hop, instead of costing one wake-up and one send per datagram.
    /// Called only between the completion of the slot's receive and its re-arming, so
    /// the kernel holds no pointer into the slot's buffer.
    fn drain_exit<A: Aead>(&mut self, engine: &mut Engine<A>, x: u32, now_ms: u64) {
        for _ in 0..EXIT_DRAIN {
            let slot = &mut self.exits.slots[x as usize];
            let Some(sock) = slot.sock.as_ref() else {
                return;
            };
            let r = nix::sys::socket::recv(
                sock.as_raw_fd(),
                &mut slot.buf[..EXIT_BUF],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
            match r {
                Ok(n) => self.on_exit_reply(engine, x, n, now_ms),
                Err(nix::errno::Errno::EAGAIN) => return,
                // As the other driver: counted, and the socket waits for its
                // receive to complete again.
                Err(_) => {
                    engine.stats().recv_errors.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }

    /// Runs until stopped or drained.
    pub(crate) fn run<A: Aead>(&mut self, engine: &mut Engine<A>) -> io::Result<WorkerEnd> {
        let mut last_tick = 0u64;
        loop {
            // Wake for the tick (every 100 ms, checked at least every 50 ms) or for the
            // next cell mix mode holds, whichever is first.
            let wait_ms = engine
                .next_wake_ms(sys::now_ms())
                .map_or(50, |ms| ms.clamp(1, 50));
            let ts = types::Timespec::new().nsec(wait_ms as u32 * 1_000_000);
            // With a batch wait, and small datagrams coming in (`Engine::gather`):
            // gather completions for up to `batch_wait_us` from the start of the wait
            // (or until a receive slot's worth arrive); otherwise wake for the first.
            let (want, args) = if self.batch_wait_us > 0 && engine.gather() {
                let want = (self.bufs.len() / 2).max(2);
                let args = types::SubmitArgs::new()
                    .timespec(&ts)
                    .min_wait_usec(self.batch_wait_us);
                (want, args)
            } else {
                (1, types::SubmitArgs::new().timespec(&ts))
            };
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::ETIME)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            let now = sys::now_ms();
            engine.begin_batch();
            self.completions.clear();
            self.completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            // Batch latency: from here to the sends being queued (one clock pair per
            // non-empty batch).
            let reaped = (!self.completions.is_empty()).then(std::time::Instant::now);
            let comps = std::mem::take(&mut self.completions);
            for &(u, res, flags) in &comps {
                if !cqueue::more(flags) {
                    self.inflight -= 1;
                }
                let idx = (u & ((1 << 56) - 1)) as u32;
                match u >> 56 {
                    K_RECV => {
                        // One completion per datagram; without MORE the multishot
                        // receive has ended (ring ran dry, or an error) and is
                        // re-armed at the end of the batch.
                        if !cqueue::more(flags) {
                            self.armed[idx as usize] = false;
                        }
                        if res < 0 {
                            if res == -libc::ENOBUFS {
                                engine.stats().recv_ring_empty.fetch_add(1, Relaxed);
                            } else if res != -libc::ECANCELED {
                                engine.stats().recv_errors.fetch_add(1, Relaxed);
                            }
                            continue;
                        }
                        let Some(bid) = cqueue::buffer_select(flags) else {
                            continue;
                        };
                        self.bufs.taken();
                        self.batch_bufs.push(u32::from(bid));
                        let filled =
                            &self.bufs.buf(bid)[..(res as usize).min(self.bufs.buf(bid).len())];
                        let Ok(out) = types::RecvMsgOut::parse(filled, &self.recv_hdr) else {
                            engine.count_drop(DropReason::Malformed, 1);
                            continue;
                        };
                        let src = sys::sockaddr_from_bytes(out.name_data());
                        let len = out.payload_data().len();
                        let cmsgs = sys::recv_cmsgs(out.control_data());
                        let seg = cmsgs.gro_segment.unwrap_or(len);
                        let truncated = out.is_payload_truncated() || out.is_name_data_truncated();
                        match (src, truncated) {
                            // GRO segments are whole datagrams; each must be a whole
                            // number of cells, which the engine checks on the
                            // concatenation (all segments but the last have the GRO
                            // size, and cells never straddle them when that size is a
                            // multiple of CELL).
                            (Some(src), false) if seg.is_multiple_of(self.cell) => {
                                let buf = &mut self.bufs.payload_mut(bid)[..len];
                                let out = Out {
                                    plan: &mut self.plan,
                                    side: &mut self.side,
                                    arena: &mut self.arena,
                                };
                                engine.on_datagram(
                                    src,
                                    idx as usize,
                                    u32::from(bid),
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
                    K_SEND => {
                        // SENDMSG_ZC completes twice: the result (flagged MORE), then
                        // a notification once the kernel no longer reads the
                        // buffers; only then may the cells' slots be reused.
                        if io_uring::cqueue::more(flags) {
                            if res < 0 {
                                engine.stats().send_errors.fetch_add(1, Relaxed);
                            }
                            continue;
                        }
                        let n = self.tx[idx as usize].n;
                        if res < 0 && !io_uring::cqueue::notif(flags) {
                            engine.send_failed(n as u64);
                        }
                        for k in 0..n {
                            let loc = self.tx[idx as usize].locs[k];
                            self.release(loc)?;
                        }
                        self.free_tx.push(idx);
                    }
                    K_XSEND => {
                        if res < 0 {
                            engine.stats().send_errors.fetch_add(1, Relaxed);
                        }
                        self.release(CellAt::Rx { slot: idx, off: 0 })?;
                    }
                    K_XSEND_RUN => {
                        if res < 0 {
                            engine.stats().send_errors.fetch_add(1, Relaxed);
                            if self.exit_gso && sys::gso_refused(-res) {
                                // The send's payloads are lost (its socket may be
                                // closed and its descriptor reused by now, so they
                                // are not sent again); later ones go one by one.
                                self.exit_gso = false;
                                tracing::warn!(
                                    errno = -res,
                                    "the kernel refused a GSO exit send; exit payloads now leave one send each"
                                );
                            }
                        }
                        for k in 0..self.tx[idx as usize].n {
                            let loc = self.tx[idx as usize].locs[k];
                            self.release(loc)?;
                        }
                        self.free_tx.push(idx);
                    }
                    K_XSEND_TX => {
                        if res < 0 {
                            engine.stats().send_errors.fetch_add(1, Relaxed);
                        }
                        self.arena.release(idx);
                    }
                    K_XRECV => {
                        let closing = self.exits.slots[idx as usize].closing;
                        if closing || res == -libc::ECANCELED {
                            self.exits.free(idx);
                        } else {
                            if res >= 0 {
                                self.on_exit_reply(engine, idx, res as usize, now);
                                self.drain_exit(engine, idx, now);
                            } else {
                                engine.stats().recv_errors.fetch_add(1, Relaxed);
                            }
                            self.arm_exit_recv(idx)?;
                        }
                    }
                    K_CANCEL => {}
                    _ => {}
                }
            }
            self.completions = comps;
            engine.release_held(now, &mut self.plan, &mut self.side);
            engine.pad_links(now, &mut self.arena, &mut self.plan);
            self.on_side(engine)?;
            self.flush(engine)?;
            // The sends are handed over when the loop's next `submit_with_args`
            // enters the kernel, a few microseconds from here.
            engine.sends_handed_over();
            if let Some(t) = reaped {
                engine.stats().batch_latency.record(t.elapsed());
            }
            // Buffers that nothing points into go back to the ring at once (the
            // rest when their sends complete); then re-arm ended receives.
            for &bid in &self.batch_bufs {
                if self.refs[bid as usize] == 0 {
                    self.bufs.provide(bid as u16);
                }
            }
            self.batch_bufs.clear();
            self.arm_receives()?;
            engine.stats().batches.fetch_add(1, Relaxed);
            engine.publish();
            if let Some(exit) = engine.poll_control(now) {
                return Ok(exit);
            }
            if now.saturating_sub(last_tick) >= 100 {
                last_tick = now;
                engine.expire(now, &mut self.arena, &mut self.plan, &mut self.side);
                self.on_side(engine)?;
                self.flush(engine)?;
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Cancel every operation (the multishot and exit receives would otherwise
        // stay armed) and wait until the kernel has completed them all, so that no
        // buffer it may still write into or read from is freed under it.
        let cancel = types::CancelBuilder::any();
        let _ = self
            .ring
            .submitter()
            .register_sync_cancel(Some(types::Timespec::new().sec(1)), cancel);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.inflight > 0 && std::time::Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            for c in self.ring.completion() {
                if !cqueue::more(c.flags()) {
                    self.inflight -= 1;
                }
            }
        }
        if self.inflight > 0 {
            // The kernel still holds some operation: leak every buffer it could
            // touch rather than free memory under it.
            tracing::error!(
                inflight = self.inflight,
                "io_uring operations did not complete at shutdown; leaking their buffers"
            );
            self.bufs.leak();
            std::mem::forget(std::mem::take(&mut self.tx));
            std::mem::forget(std::mem::replace(
                &mut self.arena,
                TxArena::new(0, 0, self.cell),
            ));
            self.exits.stop_pool();
            std::mem::forget(std::mem::replace(&mut self.exits, ExitSockets::new(0)));
            return;
        }
        let _ = self.bufs.unregister(&self.ring);
    }
}
