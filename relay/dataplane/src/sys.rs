//! Socket options and control messages for UDP GRO/GSO, shared by both drivers.
//!
//! This module and the two drivers are the only places with `unsafe`; every block says
//! why it is sound.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `UDP_SEGMENT` (linux/udp.h).
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h).
pub const UDP_GRO: libc::c_int = 104;
/// Control buffer big enough for one `UDP_GRO`/`UDP_SEGMENT` cmsg.
pub const CMSG_BUF: usize = 64;

fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` lives across the call and its size is passed; the fd is open.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enables UDP GRO on a socket (received datagrams of one flow may be coalesced; the
/// segment size arrives in a `UDP_GRO` cmsg).
pub fn enable_gro(fd: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1)
}

/// Reads `SO_RCVBUF`/`SO_SNDBUF` back (the kernel doubles what it grants).
pub fn buffer_sizes(fd: &impl AsRawFd) -> (usize, usize) {
    let get = |name| {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            v as usize
        } else {
            0
        }
    };
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
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

/// Writes a `UDP_SEGMENT` cmsg for segment size `seg` into `buf`; returns the control
/// length to put in the msghdr.
pub fn write_gso_cmsg(buf: &mut [u8; CMSG_BUF], seg: u16) -> usize {
    buf.fill(0);
    // SAFETY: CMSG_SPACE of a u16 is far below CMSG_BUF; we build a msghdr view over
    // `buf` only to use the CMSG_* macros, which stay inside the given control length.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
        let mut hdr: libc::msghdr = zeroed();
        hdr.msg_control = buf.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        space
    }
}

/// Finds the `UDP_GRO` segment size in a received control buffer.
pub fn read_gro_cmsg(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen`, and the CMSG_*
    // macros never read past that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET only writes inside it; the syscall reads it.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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
    // SAFETY: sysconf reads a constant of the running system; it takes no pointers
    // and has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}
