//! The bare forwarder: the baseline `shroud-bench relay` measures the relay against.
//!
//! It does what the probes in `shared/limits` measured as this machine's ceiling and
//! nothing else: read with UDP GRO (one `recvmmsg` returns up to 64 runs of cells),
//! optionally open one AES-256-GCM layer per cell in place with `ring` (as many bytes
//! as the relay's forward layer opens: tag-stack slots 1.. and body), and send every cell on to one destination in GSO sends of
//! up to 64 cells (gathered from however they arrived), all in one `sendmmsg`. No
//! circuits, no headers, no replay windows, no policy: the difference between the
//! relay and this is what Shroud's own work costs.
//!
//! It runs as its own process (`shroud-bench __forward`), so the benchmark can stop and
//! resume it and read its CPU time exactly as it does for a relay.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};

use anyhow::Context;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    MultiHeaders, SockaddrStorage,
};
use shroud_client::udp::{MAX_GSO_BYTES, MAX_SEGMENTS};
use shroud_proto::aead::{nonce_for, Aead, RingAead, TAG_LEN};

/// The forwarder's fixed key (a benchmark baseline; it protects nothing).
const KEY: [u8; 32] = [0x42; 32];
/// Bytes in front of the sealed body: the nonce's counter.
const COUNTER: usize = 8;

/// What the forwarder does to each cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing: receive and send.
    Nothing,
    /// One `ring` AES-256-GCM open of `body` bytes per cell.
    Open {
        /// Bytes the AEAD opens per cell (the relay's forward layer:
        /// `Layout::forward_sealed_len`).
        body: usize,
    },
}

impl Work {
    fn check(self, cell: usize) -> anyhow::Result<()> {
        if let Work::Open { body } = self {
            anyhow::ensure!(
                COUNTER + body + TAG_LEN <= cell,
                "a body of {body} B does not fit a {cell}-byte cell"
            );
        }
        Ok(())
    }
}

/// Seals `n` cells for a forwarder doing `work` into `out` (cell `i` under counter
/// `i`); with [`Work::Nothing`] the cells are filler.
pub fn seal_cells(work: Work, cell: usize, n: usize, out: &mut Vec<u8>) -> anyhow::Result<()> {
    work.check(cell)?;
    let key = RingAead::new(&KEY);
    for i in 0..n {
        let start = out.len();
        out.resize(start + cell, 0x5a);
        let c = &mut out[start..];
        if let Work::Open { body } = work {
            c[..COUNTER].copy_from_slice(&(i as u64).to_le_bytes());
            let tag = key.seal(&nonce_for(i as u64), &[], &mut c[COUNTER..COUNTER + body]);
            c[COUNTER + body..COUNTER + body + TAG_LEN].copy_from_slice(&tag);
        }
    }
    Ok(())
}

/// Opens one cell in place; false if its tag does not verify.
fn open_cell(key: &RingAead, body: usize, c: &mut [u8]) -> bool {
    let mut counter = [0u8; COUNTER];
    counter.copy_from_slice(&c[..COUNTER]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&c[COUNTER + body..COUNTER + body + TAG_LEN]);
    key.open(
        &nonce_for(u64::from_le_bytes(counter)),
        &[],
        &mut c[COUNTER..COUNTER + body],
        &tag,
    )
    .is_ok()
}

/// Runs the forwarder until killed: prints `ready` on stdout once bound.
pub fn run(
    listen: SocketAddr,
    to: SocketAddr,
    cell: usize,
    work: Work,
    cpu: Option<usize>,
) -> anyhow::Result<()> {
    work.check(cell)?;
    if let Some(c) = cpu {
        shroud_relay::sys::pin_to_cpu(c).with_context(|| format!("pinning to CPU {c}"))?;
    }
    let sock = UdpSocket::bind(listen).with_context(|| format!("cannot bind {listen}"))?;
    crate::flow::set_buffers(&sock, 32 << 20);
    println!("ready");
    std::io::stdout().flush()?;
    forward(&sock, to, cell, work)
}

/// Datagrams (each a GRO run of up to 64 cells, or a single cell) per `recvmmsg`.
const BATCH: usize = 32;
/// After a batch that did not fill, sleep this long before reading again, so that
/// more arrives per wake-up (the relay's `[io] batch_wait_us`, default 50).
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_micros(50);
/// Bytes per receive buffer (one GRO run).
const RUN_BYTES: usize = 1 << 16;

/// The forwarding loop on a bound socket (returns only on a socket error):
/// `recvmmsg` of up to [`BATCH`] GRO runs, the work on every cell, then one
/// `sendmmsg` of all the cells as GSO sends.
fn forward(sock: &UdpSocket, to: SocketAddr, cell: usize, work: Work) -> anyhow::Result<()> {
    work.check(cell)?;
    setsockopt(sock, sockopt::UdpGroSegment, &true).context("turning UDP_GRO on")?;
    let key = RingAead::new(&KEY);
    let mut bufs = vec![0u8; BATCH * RUN_BYTES];
    let per_send = MAX_SEGMENTS.min(MAX_GSO_BYTES / cell).max(1);
    let mut tx_headers =
        MultiHeaders::<SockaddrStorage>::preallocate(BATCH * 64, Some(nix::cmsg_space!(u16)));
    let dest = SockaddrStorage::from(to);
    let segment = u16::try_from(cell)?;
    let mut lens = [0usize; BATCH];
    let mut reported = false;
    loop {
        let mut received = 0;
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .chunks_mut(RUN_BYTES)
                .map(|b| [IoSliceMut::new(b)])
                .collect();
            // Fresh headers per call: nix 0.32's recvmmsg does not reset the control
            // length the previous call shrank (MSG_CTRUNC after a datagram without GRO).
            let mut rx_headers =
                MultiHeaders::<SockaddrStorage>::preallocate(BATCH, Some(nix::cmsg_space!(i32)));
            let r = recvmmsg(
                sock.as_raw_fd(),
                &mut rx_headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            );
            let msgs = match r {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(std::io::Error::from(e).into()),
            };
            for (m, len) in msgs.zip(lens.iter_mut()) {
                let mut stride = m.bytes;
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::UdpGroSegments(s) = c {
                            stride = usize::try_from(s).unwrap_or(0);
                        }
                    }
                }
                // Only whole runs of cells are forwarded.
                *len = if stride == cell && m.bytes % cell == 0 {
                    m.bytes
                } else {
                    0
                };

                received += 1;
            }
        }
        let mut bad = false;
        if let Work::Open { body } = work {
            for (b, &len) in bufs.chunks_mut(RUN_BYTES).zip(&lens[..received]) {
                for c in b[..len].chunks_exact_mut(cell) {
                    bad |= !open_cell(&key, body, c);
                }
            }
        }
        bad |= lens[..received].contains(&0);
        // Every cell received, gathered into GSO sends of up to `per_send` cells
        // (single datagrams are batched on, as the relay batches per next hop).
        let cells: Vec<IoSlice<'_>> = bufs
            .chunks(RUN_BYTES)
            .zip(&lens[..received])
            .flat_map(|(b, &len)| b[..len].chunks(cell))
            .map(IoSlice::new)
            .collect();
        let sends: Vec<&[IoSlice<'_>]> = cells.chunks(per_send).collect();
        if !sends.is_empty() {
            let addrs = vec![Some(dest); sends.len()];
            let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
            if let Err(e) = sendmmsg(
                sock.as_raw_fd(),
                &mut tx_headers,
                sends.iter(),
                addrs,
                cmsg,
                MsgFlags::empty(),
            ) {
                if !reported {
                    eprintln!("bare forwarder: sendmmsg failed: {e}");
                    reported = true;
                }
            }
        }
        if received < BATCH {
            std::thread::sleep(BATCH_WAIT);
        }
        if bad && !reported {
            eprintln!(
                "bare forwarder: a datagram that is not a run of {cell}-byte cells, or a bad tag"
            );
            reported = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_cells_open_and_a_flipped_bit_does_not() {
        let (cell, body) = (1024, 880);
        let mut cells = Vec::new();
        seal_cells(Work::Open { body }, cell, 3, &mut cells).unwrap();
        assert_eq!(cells.len(), 3 * cell);
        let key = RingAead::new(&KEY);
        for c in cells.chunks_exact_mut(cell) {
            assert!(open_cell(&key, body, c));
        }
        let mut cells = Vec::new();
        seal_cells(Work::Open { body }, cell, 1, &mut cells).unwrap();
        cells[COUNTER + 5] ^= 1;
        assert!(!open_cell(&key, body, &mut cells));
        assert!(seal_cells(Work::Open { body: 1010 }, cell, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn the_forwarder_forwards_whole_runs_and_opens_every_cell() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = sink.local_addr().unwrap();
        let fwd = UdpSocket::bind("127.0.0.1:0").unwrap();
        let listen = fwd.local_addr().unwrap();
        std::thread::spawn(move || forward(&fwd, to, 1024, Work::Open { body: 880 }));
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cells = Vec::new();
        seal_cells(Work::Open { body: 880 }, 1024, 10, &mut cells).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // One GSO run, as the benchmark sends.
        shroud_client::udp::send_segments(&src, &cells, 1024, listen).unwrap();
        while got < 10 && std::time::Instant::now() < deadline {
            if let Ok((n, _)) = sink.recv_from(&mut buf) {
                // Each forwarded cell is the opened plaintext: the filler body sealed
                // by seal_cells was 0x5a.
                assert_eq!(n % 1024, 0);
                for c in buf[..n].chunks(1024) {
                    assert!(c[COUNTER..COUNTER + 880].iter().all(|&b| b == 0x5a));
                }
                got += n / 1024;
            }
        }
        assert_eq!(got, 10);
    }
}
