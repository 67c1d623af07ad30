//! UDP segmentation offload for the client's socket (Linux): many cells in one system
//! call each way.
//!
//! - **Send** ([`send_segments`]): a buffer of equal-size cells goes out in one
//!   `sendmsg` with `UDP_SEGMENT` (GSO); the kernel splits it into one datagram per
//!   cell, so the relay sees exactly what one `send_to` per cell would have sent.
//! - **Receive** ([`Receiver`]): with `UDP_GRO` on, the kernel hands back a run of
//!   datagrams from one source in one read, with their size (the stride) in a control
//!   message; every datagram but the last of the run is exactly one stride long.
//!
//! Both degrade to one datagram per call: GSO is given up for good on the first
//! `EIO`/`EINVAL` (a device or kernel without it), and a socket on which `UDP_GRO`
//! cannot be set reads one datagram at a time (the stride is then the whole read).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older
/// kernels, 128 on newer ones).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (an IPv6 UDP payload in one 64 KiB packet).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Sends `buf`, a run of datagrams of `segment` bytes each (the last may be shorter),
/// to `to` in one `sendmsg` with `UDP_SEGMENT`. The caller keeps `buf` within
/// [`MAX_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`].
pub fn send_segments(
    socket: &UdpSocket,
    buf: &[u8],
    segment: usize,
    to: SocketAddr,
) -> io::Result<()> {
    let seg = u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let addr = SockaddrStorage::from(to);
    let iov = [IoSlice::new(buf)];
    let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
    loop {
        match sendmsg(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&addr),
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Whether a failed GSO send means "this path cannot segment" (then send one
/// datagram per call from now on).
pub fn gso_unsupported(e: &io::Error) -> bool {
    [Errno::EIO, Errno::EINVAL, Errno::EOPNOTSUPP]
        .iter()
        .any(|&x| e.raw_os_error() == Some(x as i32))
}

/// Reads datagrams with `UDP_GRO` when the socket allows it.
#[derive(Debug)]
pub struct Receiver {
    gro: bool,
    cmsg: Vec<u8>,
}

impl Receiver {
    /// Turns `UDP_GRO` on for `socket` if it can (best effort).
    pub fn new(socket: &UdpSocket) -> Receiver {
        let gro = setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok();
        Receiver {
            gro,
            cmsg: nix::cmsg_space!(i32),
        }
    }

    /// Whether reads may return several datagrams.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// One read (blocking, within the socket's read timeout): the bytes, the source,
    /// and the stride (the size of every datagram in `buf[..len]` but the last).
    pub fn recv(
        &mut self,
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, usize)> {
        if !self.gro {
            let (n, src) = socket.recv_from(buf)?;
            return Ok((n, src, n));
        }
        let mut iov = [IoSliceMut::new(buf)];
        loop {
            let r = recvmsg::<SockaddrStorage>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::empty(),
            );
            let msg = match r {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            let n = msg.bytes;
            let mut stride = n;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(s) = c {
                        stride = usize::try_from(s).unwrap_or(n).clamp(1, n.max(1));
                    }
                }
            }
            let src = msg.address.as_ref().and_then(to_socket_addr);
            return match src {
                Some(src) => Ok((n, src, stride)),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "datagram without an IP source address",
                )),
            };
        }
    }
}

fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A GSO send of 40 cells arrives as 40 datagrams of the cell size at a plain
    /// socket, and as runs with the right stride at a GRO socket.
    #[test]
    fn segments_leave_as_separate_datagrams_and_gro_reads_them_back() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&plain, &gro] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let mut rx = Receiver::new(&gro);
        let cell = 1000;
        let buf: Vec<u8> = (0..40 * cell).map(|i| (i / cell) as u8).collect();
        send_segments(&a, &buf, cell, plain.local_addr().unwrap()).unwrap();
        send_segments(&a, &buf, cell, gro.local_addr().unwrap()).unwrap();
        let mut d = vec![0u8; 65536];
        for k in 0..40u8 {
            let (n, src) = plain.recv_from(&mut d).unwrap();
            assert_eq!((n, src), (cell, a.local_addr().unwrap()));
            assert!(d[..n].iter().all(|&b| b == k), "datagram {k} out of order");
        }
        let mut got = Vec::new();
        while got.len() < buf.len() {
            let (n, src, stride) = rx.recv(&gro, &mut d).unwrap();
            assert_eq!(src, a.local_addr().unwrap());
            assert_eq!(stride, cell.min(n));
            got.extend_from_slice(&d[..n]);
        }
        assert_eq!(got, buf);
    }

    /// A short last segment is allowed and arrives as a short datagram.
    #[test]
    fn a_short_last_segment_is_its_own_datagram() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        send_segments(&a, &[7u8; 2500], 1000, b.local_addr().unwrap()).unwrap();
        let mut d = [0u8; 4096];
        let sizes: Vec<usize> = (0..3).map(|_| b.recv_from(&mut d).unwrap().0).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
    }
}
