//! The exit-policy parser on arbitrary rule text and `permit` on arbitrary destinations:
//! never panics, every parsed rule prints as text that parses back to it, and `permit`
//! answers the same for a destination and its canonical form, returning that form and
//! never port 0 (an IPv4 destination and its IPv4-mapped form agree).
//!
//! Input: 16 address bytes, 2 port bytes, 1 form byte (even: IPv4 from the first 4
//! bytes, odd: IPv6), then rules, one per line.
#![no_main]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use shroud_proto::policy::{canonical, is_special, Addrs, ExitPolicy, ExitRule};

fuzz_target!(|data: &[u8]| {
    if data.len() < 19 {
        return;
    }
    let mut a = [0u8; 16];
    a.copy_from_slice(&data[..16]);
    let port = u16::from_be_bytes([data[16], data[17]]);
    let ip = if data[18] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let Ok(text) = std::str::from_utf8(&data[19..]) else {
        return;
    };
    let mut rules = Vec::new();
    for line in text.lines() {
        if let Ok(r) = line.parse::<ExitRule>() {
            assert_eq!(
                r.to_string().parse::<ExitRule>().as_ref(),
                Ok(&r),
                "{line:?}"
            );
            rules.push(r);
        }
    }
    let policy = ExitPolicy { rules };
    let dest = SocketAddr::new(ip, port);
    let got = policy.permit(dest);
    assert_eq!(got, policy.permit(canonical(dest)));
    assert_eq!(policy.allows(&dest), got.is_some());
    if let Some(d) = got {
        assert_eq!(d, canonical(dest));
        assert_ne!(d.port(), 0);
    }
    if let IpAddr::V4(v4) = ip {
        let mapped = SocketAddr::new(v4.to_ipv6_mapped().into(), port);
        assert_eq!(got, policy.permit(mapped));
        assert_eq!(is_special(ip), is_special(mapped.ip()));
    }
    if policy.rules.iter().all(|r| r.addrs == Addrs::Any) {
        assert!(got.is_none() || is_special(ip).is_none());
    }
});
