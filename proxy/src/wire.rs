//! The stream request a proxy sends at the start of each QUIC stream, and the
//! gateway's one-byte answer (docs/PROTOCOL.md §11).
//!
//! ```text
//! request: version (u8 = 1) | atyp (u8) | address | port (u16)
//!          atyp 1: 4 bytes IPv4; atyp 4: 16 bytes IPv6;
//!          atyp 3: length (u8, 1..=255) | host name (ASCII)
//! reply:   status (u8)
//! ```
//!
//! The status values are SOCKS5's reply codes (RFC 1928 §6), so the proxy passes them
//! on unchanged: [`Status`]. After a `Succeeded` reply the stream carries the TCP
//! connection's bytes both ways; after any other the gateway closes the stream.
//! [`Target::decode`] never panics and accepts exactly the encodings above.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Request version.
pub const VERSION: u8 = 1;
/// Longest encoded request (a 255-byte host name).
pub const MAX_REQUEST: usize = 1 + 1 + 1 + 255 + 2;

/// Where a stream should go: an address, or a host name the gateway resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A host name (1..=255 bytes) and port, resolved at the gateway.
    Name(String, u16),
}

impl core::fmt::Display for Target {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl Target {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Name(_, p) => *p,
        }
    }

    /// SOCKS-style address encoding: `atyp | address | port`.
    pub fn encode_addr(&self, out: &mut Vec<u8>) {
        match self {
            Target::Addr(SocketAddr::V4(a)) => {
                out.push(1);
                out.extend_from_slice(&a.ip().octets());
            }
            Target::Addr(SocketAddr::V6(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            Target::Name(h, _) => {
                out.push(3);
                // Names are checked to be 1..=255 bytes when made (decode, SOCKS).
                out.push(h.len().min(255) as u8);
                out.extend_from_slice(&h.as_bytes()[..h.len().min(255)]);
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }

    /// The request for this target.
    pub fn request(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        self.encode_addr(&mut v);
        v
    }

    /// Parses `atyp | address | port` at the start of `b`: `Ok(Some((target,
    /// used)))`, `Ok(None)` if `b` is a prefix of a valid encoding (read more), or
    /// `Err` with the SOCKS code for what is wrong (`AddressType` for an unknown
    /// type, `General` for a bad name).
    pub fn decode_addr(b: &[u8]) -> Result<Option<(Target, usize)>, Status> {
        let Some(&atyp) = b.first() else {
            return Ok(None);
        };
        let (addr_len, off) = match atyp {
            1 => (4, 1),
            4 => (16, 1),
            3 => match b.get(1) {
                None => return Ok(None),
                Some(0) => return Err(Status::General),
                Some(&n) => (usize::from(n), 2),
            },
            _ => return Err(Status::AddressType),
        };
        let end = off + addr_len + 2;
        if b.len() < end {
            return Ok(None);
        }
        let a = &b[off..off + addr_len];
        let port = u16::from_be_bytes([b[end - 2], b[end - 1]]);
        let t = match atyp {
            1 => {
                let o: [u8; 4] = a.try_into().map_err(|_| Status::General)?;
                Target::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
            }
            4 => {
                let o: [u8; 16] = a.try_into().map_err(|_| Status::General)?;
                Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
            }
            _ => {
                let name = std::str::from_utf8(a).map_err(|_| Status::General)?;
                if !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._:[]".contains(&c))
                {
                    return Err(Status::General);
                }
                Target::Name(name.to_owned(), port)
            }
        };
        Ok(Some((t, end)))
    }

    /// Parses a whole request (`version | atyp | address | port`), as
    /// [`Target::decode_addr`].
    pub fn decode(b: &[u8]) -> Result<Option<(Target, usize)>, Status> {
        match b.first() {
            None => Ok(None),
            Some(&VERSION) => Ok(Target::decode_addr(&b[1..])?.map(|(t, n)| (t, n + 1))),
            Some(_) => Err(Status::General),
        }
    }
}

/// A stream's outcome: the SOCKS5 reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected; bytes follow.
    Succeeded = 0,
    /// General failure (also: a malformed request, a circuit that failed).
    General = 1,
    /// The exit policy refuses the destination.
    NotAllowed = 2,
    /// Network unreachable.
    NetworkUnreachable = 3,
    /// Host unreachable (also: the name does not resolve).
    HostUnreachable = 4,
    /// Connection refused by the destination.
    Refused = 5,
    /// TTL expired (the connection attempt timed out).
    TtlExpired = 6,
    /// Command not supported.
    Command = 7,
    /// Address type not supported.
    AddressType = 8,
}

impl Status {
    /// The status for a reply byte (unknown values are `General`).
    pub fn from_byte(b: u8) -> Status {
        match b {
            0 => Status::Succeeded,
            2 => Status::NotAllowed,
            3 => Status::NetworkUnreachable,
            4 => Status::HostUnreachable,
            5 => Status::Refused,
            6 => Status::TtlExpired,
            7 => Status::Command,
            8 => Status::AddressType,
            _ => Status::General,
        }
    }

    /// The status for a failed TCP connect.
    pub fn from_io(e: &std::io::Error) -> Status {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Status::Refused,
            K::TimedOut => Status::TtlExpired,
            K::HostUnreachable => Status::HostUnreachable,
            K::NetworkUnreachable => Status::NetworkUnreachable,
            K::AddrNotAvailable => Status::HostUnreachable,
            _ => Status::General,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::General => "general_failure",
            Status::NotAllowed => "not_allowed",
            Status::NetworkUnreachable => "network_unreachable",
            Status::HostUnreachable => "host_unreachable",
            Status::Refused => "connection_refused",
            Status::TtlExpired => "ttl_expired",
            Status::Command => "command_not_supported",
            Status::AddressType => "address_type_not_supported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_prefixes_ask_for_more() {
        let targets = [
            Target::Addr("10.1.2.3:443".parse().unwrap()),
            Target::Addr("[2001:db8::1]:22".parse().unwrap()),
            Target::Name("example.org".into(), 80),
        ];
        for t in targets {
            let r = t.request();
            assert_eq!(Target::decode(&r), Ok(Some((t.clone(), r.len()))));
            for cut in 0..r.len() {
                assert_eq!(Target::decode(&r[..cut]), Ok(None), "{t} cut at {cut}");
            }
            let mut longer = r.clone();
            longer.extend_from_slice(b"GET /");
            assert_eq!(Target::decode(&longer), Ok(Some((t, r.len()))));
        }
        assert_eq!(Target::Name("a".into(), 1).request(), [1, 3, 1, b'a', 0, 1]);
    }

    #[test]
    fn bad_requests_get_a_code() {
        assert_eq!(
            Target::decode(&[2, 1, 0, 0, 0, 0, 0, 0]),
            Err(Status::General)
        );
        assert_eq!(Target::decode(&[1, 9]), Err(Status::AddressType));
        assert_eq!(Target::decode(&[1, 3, 0, 0, 80]), Err(Status::General));
        assert_eq!(
            Target::decode(&[1, 3, 3, b'a', b' ', b'b', 0, 80]),
            Err(Status::General)
        );
        assert_eq!(
            Target::decode(&[1, 3, 2, 0xff, 0xfe, 0, 80]),
            Err(Status::General)
        );
    }

    #[test]
    fn status_bytes_are_socks_codes() {
        for b in 0..=8u8 {
            assert_eq!(Status::from_byte(b) as u8, if b == 1 { 1 } else { b });
        }
        assert_eq!(Status::from_byte(200), Status::General);
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Status::from_io(&e) as u8, 5);
        let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(Status::from_io(&e) as u8, 6);
    }
}
