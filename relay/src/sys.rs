//! Socket options and control messages for UDP GRO/GSO, shared by both drivers.
//!
//! Socket options, CPU affinity and `sysconf` go through `nix`'s safe wrappers; what
//! is left unsafe here is writing and reading `sockaddr` structures for the raw
//! msghdrs the drivers hand to the kernel. This module, the buffer ring and the two
//! drivers are the only places with `unsafe`; every block says why it is sound.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::unistd::{sysconf, Pid, SysconfVar};

/// `UDP_SEGMENT` (linux/udp.h).
pub const UDP_SEGMENT: libc::c_int = libc::UDP_SEGMENT;
/// `UDP_GRO` (linux/udp.h).
pub const UDP_GRO: libc::c_int = libc::UDP_GRO;
/// Control buffer big enough for one `UDP_SEGMENT` cmsg, or for the `UDP_GRO` and
/// `SCM_TIMESTAMPNS` cmsgs of a received datagram (24 + 32 bytes).
pub const CMSG_BUF: usize = 64;

/// Enables UDP GRO on a socket (received datagrams of one flow may be coalesced; the
/// segment size arrives in a `UDP_GRO` cmsg).
pub fn enable_gro(fd: &impl AsFd) -> io::Result<()> {
    Ok(setsockopt(fd, sockopt::UdpGroSegment, &true)?)
}

/// Reads `SO_RCVBUF`/`SO_SNDBUF` back (the kernel doubles what it grants); 0 for
/// one that cannot be read.
pub fn buffer_sizes(fd: &impl AsFd) -> (usize, usize) {
    (
        getsockopt(fd, sockopt::RcvBuf).unwrap_or(0),
        getsockopt(fd, sockopt::SndBuf).unwrap_or(0),
    )
}

/// Encodes `addr` into a `sockaddr_storage`, returning its length.
pub fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and suitably aligned for
            // sockaddr_in; we write one whole, zero-initialised struct.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            // SAFETY: all-zero is a valid sockaddr_in.
            *sin = unsafe { zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            // SAFETY: all-zero is a valid sockaddr_in6.
            *sin6 = unsafe { zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Decodes a `sockaddr_storage` filled by the kernel.
pub fn from_sockaddr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is long enough.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            // Normalise v4-mapped sources (dual-stack sockets) to plain IPv4.
            let sa = match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, u16::from_be(sin6.sin6_port))),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )),
            };
            Some(sa)
        }
        _ => None,
    }
}

/// Bytes of a `cmsghdr` (`cmsg_len`, `cmsg_level`, `cmsg_type`); the data follows.
const CMSG_HDR: usize = size_of::<libc::cmsghdr>();
const CMSG_LEVEL_AT: usize = std::mem::offset_of!(libc::cmsghdr, cmsg_level);
const CMSG_TYPE_AT: usize = std::mem::offset_of!(libc::cmsghdr, cmsg_type);

/// `CMSG_ALIGN`: control messages start at multiples of the word size.
const fn cmsg_align(n: usize) -> usize {
    (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}

/// Writes a `UDP_SEGMENT` cmsg for segment size `seg` into `buf`; returns the control
/// length to put in the msghdr (`CMSG_SPACE` of a u16).
///
/// The header is written field by field as bytes, so `buf` needs no alignment (the
/// kernel copies the control buffer before reading it).
pub fn write_gso_cmsg(buf: &mut [u8; CMSG_BUF], seg: u16) -> usize {
    buf.fill(0);
    let len = CMSG_HDR + size_of::<u16>();
    buf[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    buf[CMSG_LEVEL_AT..CMSG_LEVEL_AT + 4].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    buf[CMSG_TYPE_AT..CMSG_TYPE_AT + 4].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    buf[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&seg.to_ne_bytes());
    cmsg_align(CMSG_HDR) + cmsg_align(size_of::<u16>())
}

/// Most bytes one UDP GSO send carries: the kernel builds one datagram-sized buffer
/// (64 KiB less the headers) and segments it.
pub const GSO_MAX_BYTES: usize = 65_000;

/// How many `seg`-byte segments one GSO send carries: at most `cap` and
/// [`GSO_MAX_BYTES`] in all, at least 1.
pub fn gso_segments(cap: usize, seg: usize) -> usize {
    let by_bytes = GSO_MAX_BYTES.checked_div(seg).unwrap_or(cap);
    cap.min(by_bytes).max(1)
}

/// One `sendmsg` of the buffers `iovs` points to, to `dest` (`None`: a connected
/// socket), with a `UDP_SEGMENT` cmsg of `seg` bytes when `seg` is given. Returns what
/// `sendmsg` returned (bytes sent, or -1 with `errno` set).
///
/// # Safety
/// Every `iov_base` in `iovs` must point to `iov_len` readable bytes that stay alive
/// for the call (it is synchronous: the kernel copies them before it returns).
pub unsafe fn send_gso(
    fd: &impl std::os::fd::AsRawFd,
    dest: Option<&SocketAddr>,
    iovs: &mut [libc::iovec],
    seg: Option<u16>,
) -> isize {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let mut ctrl = [0u8; CMSG_BUF];
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    if let Some(d) = dest {
        hdr.msg_namelen = to_sockaddr(d, &mut addr);
        hdr.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    }
    hdr.msg_iov = iovs.as_mut_ptr();
    hdr.msg_iovlen = iovs.len();
    if let Some(seg) = seg {
        hdr.msg_controllen = write_gso_cmsg(&mut ctrl, seg);
        hdr.msg_control = ctrl.as_mut_ptr().cast();
    }
    // SAFETY: `hdr` points to the locals above (address, control bytes) and to
    // `iovs`, whose buffers the caller guarantees; all outlive this synchronous call.
    unsafe { libc::sendmsg(fd.as_raw_fd(), &hdr, 0) }
}

/// Whether a send failed because the path cannot segment (`UDP_SEGMENT`): `EIO` from
/// a device without checksum offload, `EINVAL`/`EOPNOTSUPP` from a kernel or socket
/// without GSO.
pub fn gso_refused(errno: i32) -> bool {
    matches!(errno, libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
}

/// What the kernel's control messages say about one received datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvCmsgs {
    /// The `UDP_GRO` segment size: the datagram is several coalesced ones of this
    /// size (the last may be shorter).
    pub gro_segment: Option<usize>,
    /// When the datagram reached the socket (`SCM_TIMESTAMPNS`, see
    /// [`enable_rx_timestamps`]), nanoseconds of the realtime clock.
    pub received_ns: Option<u64>,
}

/// Reads the `UDP_GRO` segment size and the `SCM_TIMESTAMPNS` receive time from the
/// control bytes the kernel returned (`msg_control[..msg_controllen]`). Reads bytes
/// only, so the buffer needs no alignment; a malformed or truncated control message
/// ends the search (what was found before it stays).
pub fn recv_cmsgs(control: &[u8]) -> RecvCmsgs {
    let mut found = RecvCmsgs::default();
    let word = size_of::<usize>();
    let int = |b: &[u8], at: usize| -> Option<i32> {
        Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let mut at = 0;
    while control.len().saturating_sub(at) >= CMSG_HDR {
        let c = &control[at..];
        let Ok(len) = c[..word].try_into().map(usize::from_ne_bytes) else {
            break;
        };
        if len < CMSG_HDR || len > c.len() {
            break;
        }
        let (Some(level), Some(kind)) = (int(c, CMSG_LEVEL_AT), int(c, CMSG_TYPE_AT)) else {
            break;
        };
        let data = &c[CMSG_HDR..len];
        if level == libc::SOL_UDP && kind == UDP_GRO {
            found.gro_segment = int(data, 0).and_then(|v| usize::try_from(v).ok());
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            // A `struct timespec`: seconds, then nanoseconds, each a native word.
            let word_at = |at: usize| -> Option<u64> {
                let w = i64::from_ne_bytes(data.get(at..at + 8)?.try_into().ok()?);
                u64::try_from(w).ok()
            };
            found.received_ns = word_at(0)
                .zip(word_at(8))
                .and_then(|(secs, nanos)| secs.checked_mul(1_000_000_000)?.checked_add(nanos));
        }
        at += cmsg_align(len);
    }
    found
}

/// Asks the kernel to stamp every datagram `fd` receives with the time it reached
/// the socket (`SO_TIMESTAMPNS`: an `SCM_TIMESTAMPNS` cmsg of the realtime clock),
/// read by [`recv_cmsgs`]. The relay measures each cell's time in the relay from it.
pub fn enable_rx_timestamps(fd: &impl AsFd) -> io::Result<()> {
    Ok(setsockopt(fd, sockopt::ReceiveTimestampns, &true)?)
}

/// Now on the realtime clock (that of [`RecvCmsgs::received_ns`]), nanoseconds.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Decodes a socket address the kernel wrote as bytes (a `sockaddr_in` or
/// `sockaddr_in6`, as in a multishot receive's name field). v4-mapped IPv6 sources
/// become plain IPv4, as in [`from_sockaddr`].
pub fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match libc::c_int::from(family) {
        libc::AF_INET if b.len() >= size_of::<libc::sockaddr_in>() => {
            let ip: [u8; 4] = b[4..8].try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 if b.len() >= size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_ne_bytes(b[4..8].try_into().ok()?);
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(b[24..28].try_into().ok()?);
            let ip = Ipv6Addr::from(ip);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope)),
            })
        }
        _ => None,
    }
}

/// Whether each socket is bound to an IPv4 address, read once at start so that
/// choosing a socket per next hop costs no `getsockname` per batch (see
/// [`crate::engine::Routes`]).
pub fn ipv4_flags(sockets: &[std::net::UdpSocket]) -> io::Result<Vec<bool>> {
    sockets
        .iter()
        .map(|s| s.local_addr().map(|a| a.is_ipv4()))
        .collect()
}

/// The running kernel's (major, minor) version, from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_kernel_version(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// Parses the start of a kernel release string ("6.18.0-1-amd64" -> (6, 18)).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Raises the soft limit on open files to `needed` (at most the hard limit) if it is
/// below; returns the soft limit now in force. Unprivileged: only up to the hard
/// limit, which the service manager sets (`LimitNOFILE=`).
pub fn raise_nofile(needed: u64) -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= needed {
        return Ok(soft);
    }
    let target = needed.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(target)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    Ok(sched_setaffinity(Pid::from_raw(0), &set)?)
}

/// Current time in milliseconds since the Unix epoch (the drivers' clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of the CPU times in
/// `/proc/self/stat`; 100 if the call fails.
pub fn clock_ticks() -> u64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_segments_respect_the_count_and_the_byte_bound() {
        assert_eq!(gso_segments(64, 1024), 63); // 65,000 / 1024
        assert_eq!(gso_segments(64, 600), 64);
        assert_eq!(gso_segments(16, 1024), 16);
        assert_eq!(gso_segments(64, 65_000), 1);
        assert_eq!(gso_segments(64, 70_000), 1);
        assert_eq!(gso_segments(64, 0), 64);
        assert_eq!(gso_segments(0, 100), 1);
    }

    /// A GSO send through `send_gso` arrives as one datagram per segment, the last
    /// one shorter; without a segment size, the buffers leave as one datagram.
    #[test]
    fn send_gso_segments_and_concatenates() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let (a, b) = ([1u8; 100], [2u8; 40]);
        let mut iovs = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point to `a` and `b`, alive for the call.
        let r = unsafe { send_gso(&tx, Some(&dest), &mut iovs, Some(60)) };
        assert_eq!(r, 140);
        let mut buf = [0u8; 256];
        let sizes: Vec<usize> = (0..3).map(|_| rx.recv(&mut buf).unwrap()).collect();
        assert_eq!(sizes, [60, 60, 20]);
        // SAFETY: as above.
        let r = unsafe { send_gso(&tx, Some(&dest), &mut iovs, None) };
        assert_eq!(r, 140);
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(n, 140);
        assert!(buf[..100].iter().all(|&x| x == 1) && buf[100..140].iter().all(|&x| x == 2));
        // Connected, no address.
        tx.connect(dest).unwrap();
        // SAFETY: as above.
        let r = unsafe { send_gso(&tx, None, &mut iovs[..1], None) };
        assert_eq!(r, 100);
        assert_eq!(rx.recv(&mut buf).unwrap(), 100);
    }

    #[test]
    fn gso_cmsg_matches_the_libc_macros_and_parses_back() {
        let mut buf = [0u8; CMSG_BUF];
        let n = write_gso_cmsg(&mut buf, 1024);
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on their argument.
        let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
        assert_eq!(n, space);
        assert_eq!(usize::from_ne_bytes(buf[..8].try_into().unwrap()), len);
        // The same bytes read as a UDP_GRO message carry the value back.
        let mut gro = buf;
        gro[CMSG_TYPE_AT..CMSG_TYPE_AT + 4].copy_from_slice(&UDP_GRO.to_ne_bytes());
        let l = CMSG_HDR + 4;
        gro[..8].copy_from_slice(&l.to_ne_bytes());
        gro[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1024i32.to_ne_bytes());
        assert_eq!(recv_cmsgs(&gro[..cmsg_align(l)]).gro_segment, Some(1024));
        // Not GRO, truncated, or a length that points outside: nothing.
        assert_eq!(recv_cmsgs(&buf[..n]), RecvCmsgs::default());
        assert_eq!(recv_cmsgs(&gro[..CMSG_HDR + 2]), RecvCmsgs::default());
        assert_eq!(recv_cmsgs(&[]), RecvCmsgs::default());
        let mut bad = gro;
        bad[..8].copy_from_slice(&4096usize.to_ne_bytes());
        assert_eq!(recv_cmsgs(&bad), RecvCmsgs::default());
        bad[..8].copy_from_slice(&3usize.to_ne_bytes());
        assert_eq!(recv_cmsgs(&bad), RecvCmsgs::default());
    }

    #[test]
    fn a_received_datagram_carries_its_gro_size_and_receive_time() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&rx).unwrap();
        enable_rx_timestamps(&rx).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let cells = [7u8; 300];
        let mut iovs = [libc::iovec {
            iov_base: cells.as_ptr() as *mut libc::c_void,
            iov_len: cells.len(),
        }];
        let before = realtime_ns();
        // SAFETY: the iovec points to `cells`, alive for the call.
        assert_eq!(
            unsafe { send_gso(&tx, Some(&dest), &mut iovs, Some(100)) },
            300
        );
        let mut payload = [0u8; 512];
        let mut ctrl = [0u8; CMSG_BUF];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: all-zero is a valid msghdr; it points to `iov` and `ctrl`, alive
        // for the synchronous call.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = ctrl.as_mut_ptr().cast();
        hdr.msg_controllen = ctrl.len();
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(&rx), &mut hdr, 0) };
        let after = realtime_ns();
        assert_eq!(n, 300, "loopback delivers the GSO send coalesced");
        assert_eq!(
            hdr.msg_flags & libc::MSG_CTRUNC,
            0,
            "both cmsgs fit CMSG_BUF"
        );
        let m = recv_cmsgs(&ctrl[..hdr.msg_controllen]);
        assert_eq!(m.gro_segment, Some(100));
        let t = m.received_ns.expect("a receive timestamp");
        assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
        // Without the option there is no timestamp.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&cells[..10], plain.local_addr().unwrap())
            .unwrap();
        hdr.msg_controllen = ctrl.len();
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(&plain), &mut hdr, 0) };
        assert_eq!(n, 10);
        assert_eq!(
            recv_cmsgs(&ctrl[..hdr.msg_controllen]),
            RecvCmsgs::default()
        );
    }

    #[test]
    fn socket_options_and_affinity_take_effect() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!getsockopt(&s, sockopt::UdpGroSegment).unwrap());
        enable_gro(&s).unwrap();
        assert!(getsockopt(&s, sockopt::UdpGroSegment).unwrap());
        let (r, w) = buffer_sizes(&s);
        assert!(r > 0 && w > 0, "{r} {w}");
        std::thread::spawn(|| {
            pin_to_cpu(0).unwrap();
            let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            let on: Vec<usize> = (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap())
                .collect();
            assert_eq!(on, vec![0]);
            assert!(pin_to_cpu(CpuSet::count()).is_err());
        })
        .join()
        .unwrap();
        assert!(clock_ticks() >= 100);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(
            parse_kernel_version("5.15.167.4-microsoft-standard"),
            Some((5, 15))
        );
        assert_eq!(parse_kernel_version("6.0"), Some((6, 0)));
        assert_eq!(parse_kernel_version("six"), None);
        assert!(kernel_version().is_some());
    }

    #[test]
    fn sockaddr_bytes_round_trip_through_sockaddr_storage() {
        for a in [
            "127.0.0.1:9000",
            "[2001:db8::1]:443",
            "[::ffff:10.0.0.1]:53",
            "0.0.0.0:0",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
            let len = to_sockaddr(&a, &mut ss) as usize;
            // SAFETY: `ss` is plain, fully initialised data (zeroed, then written).
            let bytes = unsafe {
                std::slice::from_raw_parts((&ss as *const libc::sockaddr_storage).cast::<u8>(), len)
            };
            let want = from_sockaddr(&ss, len as libc::socklen_t);
            assert_eq!(sockaddr_from_bytes(bytes), want, "{a}");
            assert!(sockaddr_from_bytes(&bytes[..len - 1]).is_none());
        }
        assert!(sockaddr_from_bytes(&[0u8; 28]).is_none());
        assert!(sockaddr_from_bytes(&[]).is_none());
    }
}
