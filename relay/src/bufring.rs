//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) for multishot receives.
//!
//! The kernel picks a free buffer from the ring for every datagram it completes, so
//! one `RecvMsgMulti` per socket stays armed across batches instead of one `RecvMsg`
//! per buffer re-armed every batch. A buffer goes back into the ring
//! ([`BufRing::provide`]) only once nothing points into it any more (the driver
//! counts the sends that read cells from it).
//!
//! Each buffer holds what a multishot `recvmsg` writes: an `io_uring_recvmsg_out`
//! header, the source address (a fixed [`NAME_LEN`]-byte field), the control
//! messages (a fixed [`CTRL_LEN`]-byte field), then the payload from
//! [`PAYLOAD_AT`] on.
//!
//! Ownership: the ring memory and the buffers are allocated once in [`BufRing::new`]
//! and never move or resize. The ring must be unregistered (or its io_uring closed)
//! and every operation that could write into a buffer completed before a `BufRing`
//! is dropped; the driver's `Drop` does that, and leaks the ring instead when it
//! cannot confirm it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// Bytes of the `io_uring_recvmsg_out` header at the start of each buffer (four
/// u32: name, control and payload lengths, flags).
pub const OUT_HDR: usize = 16;
/// Bytes reserved for the source address (a `sockaddr_storage`).
pub const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();
/// Bytes reserved for control messages (the `UDP_GRO` cmsg).
pub const CTRL_LEN: usize = crate::sys::CMSG_BUF;
/// Offset of the payload in a buffer.
pub const PAYLOAD_AT: usize = OUT_HDR + NAME_LEN + CTRL_LEN;

/// One `io_uring_buf` ring entry (linux/io_uring.h): the kernel reads `addr`, `len`
/// and `bid`; `resv` of entry 0 is the ring's tail, written by us.
#[repr(C)]
struct RawEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// Offset of the tail in the ring (entry 0's `resv`).
const TAIL_AT: usize = std::mem::offset_of!(RawEntry, resv);

/// A registered ring of equally sized receive buffers.
pub struct BufRing {
    ring: NonNull<RawEntry>,
    ring_layout: Layout,
    entries: u16,
    tail: u16,
    bufs: Box<[u8]>,
    buf_len: usize,
    bgid: u16,
    registered: bool,
    /// Set by [`BufRing::leak`]: never free the memory.
    leaked: bool,
    /// Buffers currently in the ring (the kernel may take them).
    available: usize,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("entries", &self.entries)
            .field("buf_len", &self.buf_len)
            .field("available", &self.available)
            .finish_non_exhaustive()
    }
}

impl BufRing {
    /// Allocates `count` buffers (rounded up to a power of two, at most 32768) with
    /// room for `payload` bytes of datagram each, in an unregistered ring.
    pub fn new(count: usize, payload: usize, bgid: u16) -> io::Result<Self> {
        let entries = count.clamp(1, 32768).next_power_of_two();
        let ring_layout = Layout::from_size_align(entries * std::mem::size_of::<RawEntry>(), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (entries >= 1).
        let ring = NonNull::new(unsafe { alloc_zeroed(ring_layout) }.cast::<RawEntry>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let buf_len = (PAYLOAD_AT + payload).next_multiple_of(64);
        Ok(BufRing {
            ring,
            ring_layout,
            entries: entries as u16,
            tail: 0,
            bufs: vec![0u8; entries * buf_len].into_boxed_slice(),
            buf_len,
            bgid,
            registered: false,
            leaked: false,
            available: 0,
        })
    }

    /// Registers the ring with `uring` as buffer group `bgid` and hands it every
    /// buffer.
    pub fn register(&mut self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring memory is page aligned, `entries` long, and lives until
        // `self` is dropped, which the owner does only after unregistering it or
        // closing the io_uring with nothing in flight (module docs).
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.entries,
                self.bgid,
                0,
            )?;
        }
        self.registered = true;
        for bid in 0..self.entries {
            self.provide(bid);
        }
        Ok(())
    }

    /// Unregisters the ring (the kernel takes no more buffers from it).
    pub fn unregister(&mut self, uring: &IoUring) -> io::Result<()> {
        if self.registered {
            uring.submitter().unregister_buf_ring(self.bgid)?;
            self.registered = false;
        }
        Ok(())
    }

    /// Gives up the memory for good: for when the kernel may still use it (an
    /// operation did not complete at shutdown), so it is never freed.
    pub fn leak(&mut self) {
        self.leaked = true;
        std::mem::forget(std::mem::take(&mut self.bufs));
    }

    /// The buffer group id for `RecvMsgMulti`.
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Number of buffers.
    pub fn len(&self) -> usize {
        usize::from(self.entries)
    }

    /// True if the ring has no buffers (never: at least one is allocated).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Buffers the kernel can take right now.
    pub fn available(&self) -> usize {
        self.available
    }

    /// Notes that the kernel took a buffer (a completion named it).
    pub fn taken(&mut self) {
        self.available = self.available.saturating_sub(1);
    }

    /// Puts buffer `bid` back into the ring. The caller guarantees nothing reads or
    /// writes it any more (no send points into it).
    pub fn provide(&mut self, bid: u16) {
        debug_assert!(bid < self.entries);
        let idx = usize::from(self.tail & (self.entries - 1));
        let addr = self.bufs[usize::from(bid) * self.buf_len..].as_ptr() as u64;
        // SAFETY: `idx < entries`, so the entry is inside the ring allocation. The
        // kernel reads only entries below the published tail, and this one is at or
        // past it, so nothing reads these fields while they are written. The writes
        // go through raw pointers to the three fields, never touching `resv` (entry
        // 0's `resv` is the tail, which the kernel may be reading).
        unsafe {
            let e = self.ring.as_ptr().add(idx);
            std::ptr::addr_of_mut!((*e).addr).write(addr);
            std::ptr::addr_of_mut!((*e).len).write(self.buf_len as u32);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is a naturally aligned u16 inside the ring allocation,
        // shared with the kernel only through atomic accesses; the Release store
        // publishes the entry written above before the kernel can see the new tail.
        let tail = unsafe {
            &*self
                .ring
                .as_ptr()
                .cast::<u8>()
                .add(TAIL_AT)
                .cast::<AtomicU16>()
        };
        tail.store(self.tail, Ordering::Release);
        self.available += 1;
    }

    /// The whole of buffer `bid` as the kernel filled it.
    pub fn buf(&self, bid: u16) -> &[u8] {
        let at = usize::from(bid) * self.buf_len;
        &self.bufs[at..at + self.buf_len]
    }

    /// Buffer `bid`'s payload area, for processing cells in place.
    pub fn payload_mut(&mut self, bid: u16) -> &mut [u8] {
        let at = usize::from(bid) * self.buf_len;
        &mut self.bufs[at + PAYLOAD_AT..at + self.buf_len]
    }

    /// A pointer to byte `off` of buffer `bid`'s payload, for a send's iovec.
    pub fn payload_ptr(&self, bid: u16, off: usize) -> *const u8 {
        let at = usize::from(bid) * self.buf_len + PAYLOAD_AT + off;
        self.bufs[at..].as_ptr()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: allocated in `new` with exactly this layout, freed once.
        unsafe { dealloc(self.ring.as_ptr().cast(), self.ring_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<RawEntry>(), 16);
        assert_eq!(TAIL_AT, 14);
        assert_eq!(OUT_HDR, 16);
        assert_eq!(PAYLOAD_AT % 8, 0);
    }

    #[test]
    fn provide_publishes_entries_in_ring_order() {
        let mut r = BufRing::new(3, 1024, 7).unwrap();
        assert_eq!(r.len(), 4);
        for bid in [2u16, 0, 3, 1, 2] {
            r.provide(bid);
        }
        assert_eq!(r.available(), 5);
        // SAFETY: reading our own (unregistered) ring.
        let (e0, e1, tail) = unsafe {
            let p = r.ring.as_ptr();
            (
                ((*p).addr, (*p).bid),
                ((*p.add(1)).addr, (*p.add(1)).bid),
                (*p).resv,
            )
        };
        // The fifth provide wrapped around into entry 0.
        assert_eq!(e0, (r.buf(2).as_ptr() as u64, 2));
        assert_eq!(e1, (r.buf(0).as_ptr() as u64, 0));
        assert_eq!(tail, 5);
        r.taken();
        assert_eq!(r.available(), 4);
        assert_eq!(r.payload_mut(1).len(), r.buf(1).len() - PAYLOAD_AT);
        assert!(r.buf(1).len() >= PAYLOAD_AT + 1024);
    }
}
