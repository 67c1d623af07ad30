//! Exit policy: which destinations an exit relay may send circuit payload to.
//!
//! An ordered list of rules `accept|reject ADDR[/PREFIX]:PORT[-PORT]`; the first rule
//! that matches decides, and a destination no rule matches is rejected. An empty policy
//! therefore makes a relay a non-exit.
//!
//! - `ADDR` is `*` (every address, IPv4 and IPv6), `*4` (every IPv4 address, the same as
//!   `0.0.0.0/0`), `*6` (every IPv6 address, the same as `[::]/0`), an IPv4 address or
//!   an IPv6 address in brackets (`[::1]`, `[fc00::]/7`; `[fc00::/7]` also parses).
//!   Host bits below the prefix are ignored. `PORT` is `*` (1-65535), a port or an
//!   inclusive range; port 0 is never allowed.
//! - Canonical form ([`canonical`]): an IPv4-mapped IPv6 address `::ffff:a.b.c.d` *is*
//!   the IPv4 address `a.b.c.d`, in destinations and in rules (`[::ffff:10.0.0.0]/104`
//!   is `10.0.0.0/8`). Rules match the canonical destination, and
//!   [`ExitPolicy::permit`] returns it: that is the address the exit must send to.
//! - Special destinations ([`is_special`]: unspecified, loopback, private, link-local,
//!   multicast, broadcast, reserved, documentation, ...) are refused even when a rule
//!   accepts them, unless the first matching rule is an `accept` that *names* them: its
//!   network lies inside the special block the destination is in. So
//!   `accept 127.0.0.0/8:*` or `accept 127.0.0.1:53` let loopback through, while
//!   `accept *:*`, `accept 0.0.0.0/0:*` or `accept 0.0.0.0/1:*` never do. As always
//!   the first match decides: put such a rule *before* `accept *:*`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The addresses a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addrs {
    /// `*`: every address of both families.
    Any,
    /// One network (`*4` is `0.0.0.0/0`, `*6` is `[::]/0`). Never an IPv4-mapped IPv6
    /// network of prefix 96 or more: parsing makes that the IPv4 network.
    Net {
        /// Network address.
        net: IpAddr,
        /// Prefix length in bits.
        prefix: u8,
    },
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRule {
    /// Accept (true) or reject.
    pub accept: bool,
    /// The addresses it covers.
    pub addrs: Addrs,
    /// Inclusive port range, never starting at 0.
    pub ports: (u16, u16),
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad exit rule {rule:?}: {reason} (expected `accept|reject ADDR[/PREFIX]:PORT[-PORT]` with ADDR `*`, `*4`, `*6`, IPv4 or [IPv6], e.g. `accept 127.0.0.0/8:1-65535`)")]
pub struct PolicyError {
    /// The rule text.
    pub rule: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn parse_addrs(addr: &str) -> Result<Addrs, &'static str> {
    match addr {
        "*" => return Ok(Addrs::Any),
        "*4" => {
            return Ok(Addrs::Net {
                net: Ipv4Addr::UNSPECIFIED.into(),
                prefix: 0,
            })
        }
        "*6" => {
            return Ok(Addrs::Net {
                net: Ipv6Addr::UNSPECIFIED.into(),
                prefix: 0,
            })
        }
        _ => {}
    }
    let (net, prefix): (IpAddr, _) = if let Some(rest) = addr.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("missing ]")?;
        let (ip, prefix) = match (inside.split_once('/'), after) {
            (Some((ip, p)), "") => (ip, Some(p)),
            (None, "") => (inside, None),
            (None, after) => (inside, Some(after.strip_prefix('/').ok_or("junk after ]")?)),
            (Some(_), _) => return Err("junk after ]"),
        };
        let ip: Ipv6Addr = ip.parse().map_err(|_| "bad IPv6 address")?;
        (ip.into(), prefix)
    } else {
        let (ip, prefix) = match addr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (addr, None),
        };
        if ip.contains(':') {
            return Err("an IPv6 address needs brackets, e.g. [::1]:53");
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| "bad address")?;
        (ip.into(), prefix)
    };
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| "prefix too long")?
        }
        Some(_) => return Err("bad prefix"),
        None => max,
    };
    if prefix > max {
        return Err("prefix too long");
    }
    // An IPv4-mapped network is the IPv4 network (destinations are canonical too).
    Ok(match net {
        IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Addrs::Net {
                net: v4.into(),
                prefix: prefix - 96,
            },
            None => Addrs::Net { net, prefix },
        },
        _ => Addrs::Net { net, prefix },
    })
}

fn parse_port(p: &str) -> Result<u16, &'static str> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad port");
    }
    p.parse().map_err(|_| "bad port")
}

impl FromStr for ExitRule {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let err = |reason| PolicyError {
            rule: s.to_string(),
            reason,
        };
        let (verb, rest) = s
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| err("missing verb"))?;
        let accept = match verb {
            "accept" => true,
            "reject" => false,
            _ => return Err(err("verb must be accept or reject")),
        };
        let (addr, ports) = rest
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| err("missing :PORT"))?;
        let addrs = parse_addrs(addr).map_err(err)?;
        let ports = if ports == "*" {
            (1, 65535)
        } else if let Some((a, b)) = ports.split_once('-') {
            (parse_port(a).map_err(err)?, parse_port(b).map_err(err)?)
        } else {
            let p = parse_port(ports).map_err(err)?;
            (p, p)
        };
        if ports.0 == 0 || ports.0 > ports.1 {
            return Err(err("bad port range"));
        }
        Ok(ExitRule {
            accept,
            addrs,
            ports,
        })
    }
}

/// The rule in a form that parses back to it: `accept 127.0.0.0/8:*`, `reject [::]/0:25`.
impl fmt::Display for ExitRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.accept { "accept " } else { "reject " })?;
        match self.addrs {
            Addrs::Any => f.write_str("*")?,
            Addrs::Net {
                net: IpAddr::V4(n),
                prefix,
            } => write!(f, "{n}/{prefix}")?,
            Addrs::Net {
                net: IpAddr::V6(n),
                prefix,
            } => write!(f, "[{n}]/{prefix}")?,
        }
        match self.ports {
            (1, 65535) => f.write_str(":*"),
            (a, b) if a == b => write!(f, ":{a}"),
            (a, b) => write!(f, ":{a}-{b}"),
        }
    }
}

/// Is `ip` inside `net/prefix` (same family only)?
fn in_net(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(d)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            n.to_bits() & mask == d.to_bits() & mask
        }
        (IpAddr::V6(n), IpAddr::V6(d)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            n.to_bits() & mask == d.to_bits() & mask
        }
        _ => false,
    }
}

impl ExitRule {
    /// Does the rule match `dest` (which must be canonical)?
    fn matches(&self, dest: &SocketAddr) -> bool {
        if dest.port() < self.ports.0 || dest.port() > self.ports.1 {
            return false;
        }
        match self.addrs {
            Addrs::Any => true,
            Addrs::Net { net, prefix } => in_net(net, prefix, dest.ip()),
        }
    }

    /// Does the rule name (lie inside) a special block of `block_prefix` bits that a
    /// destination it matched is in? `*` and `/0` never do.
    fn names(&self, block_prefix: u8) -> bool {
        match self.addrs {
            Addrs::Any => false,
            Addrs::Net { prefix, .. } => prefix > 0 && prefix >= block_prefix,
        }
    }
}

/// The destination an exit must use: an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`)
/// becomes the IPv4 address (`a.b.c.d:p`); everything else is returned unchanged (the
/// deprecated IPv4-compatible form `::a.b.c.d` is *not* converted: [`is_special`]
/// refuses it).
pub fn canonical(dest: SocketAddr) -> SocketAddr {
    match dest {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => dest,
        },
        SocketAddr::V4(_) => dest,
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    Ipv4Addr::new(a, b, c, d).to_bits()
}

const fn v6(a: u16, b: u16, c: u16) -> u128 {
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0).to_bits()
}

/// Special IPv4 blocks: network, prefix, class. First match wins.
const SPECIAL_V4: &[(u32, u8, &str)] = &[
    (v4(0, 0, 0, 0), 8, "unspecified"),
    (v4(10, 0, 0, 0), 8, "private"),
    (v4(100, 64, 0, 0), 10, "cgnat"),
    (v4(127, 0, 0, 0), 8, "loopback"),
    (v4(169, 254, 0, 0), 16, "link-local"),
    (v4(172, 16, 0, 0), 12, "private"),
    (v4(192, 0, 0, 0), 24, "ietf-protocol"),
    (v4(192, 0, 2, 0), 24, "documentation"),
    (v4(192, 88, 99, 0), 24, "6to4-relay"),
    (v4(192, 168, 0, 0), 16, "private"),
    (v4(198, 18, 0, 0), 15, "benchmarking"),
    (v4(198, 51, 100, 0), 24, "documentation"),
    (v4(203, 0, 113, 0), 24, "documentation"),
    (v4(224, 0, 0, 0), 4, "multicast"),
    (v4(255, 255, 255, 255), 32, "broadcast"),
    (v4(240, 0, 0, 0), 4, "reserved"),
];

/// Special IPv6 blocks (after the IPv4-mapped ones became IPv4). First match wins;
/// NAT64 `64:ff9b::/96` and 6to4 `2002::/16` are special when the IPv4 address they
/// carry is, and whatever else lies outside global unicast `2000::/3` is "reserved".
const SPECIAL_V6: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    (0, 96, "ipv4-compatible"),
    (v6(0x64, 0xff9b, 1), 48, "nat64-local"),
    (v6(0x100, 0, 0), 64, "discard"),
    (v6(0x2001, 2, 0), 48, "benchmarking"),
    (v6(0x2001, 0, 0), 23, "ietf-protocol"),
    (v6(0x2001, 0xdb8, 0), 32, "documentation"),
    (v6(0x3fff, 0, 0), 20, "documentation"),
    (v6(0xfc00, 0, 0), 7, "unique-local"),
    (v6(0xfe80, 0, 0), 10, "link-local"),
    (v6(0xfec0, 0, 0), 10, "site-local"),
    (v6(0xff00, 0, 0), 8, "multicast"),
];

fn special_v4(a: u32) -> Option<(&'static str, u8)> {
    SPECIAL_V4
        .iter()
        .find(|&&(net, prefix, _)| {
            in_net(
                Ipv4Addr::from_bits(net).into(),
                prefix,
                Ipv4Addr::from_bits(a).into(),
            )
        })
        .map(|&(_, prefix, class)| (class, prefix))
}

/// The class and the block prefix length of a canonical special address.
fn special_block(ip: IpAddr) -> Option<(&'static str, u8)> {
    let a = match ip.to_canonical() {
        IpAddr::V4(a) => return special_v4(a.to_bits()),
        IpAddr::V6(a) => a,
    };
    if let Some(&(_, prefix, class)) = SPECIAL_V6
        .iter()
        .find(|&&(net, prefix, _)| in_net(Ipv6Addr::from_bits(net).into(), prefix, a.into()))
    {
        return Some((class, prefix));
    }
    let bits = a.to_bits();
    if in_net(
        Ipv6Addr::from_bits(v6(0x64, 0xff9b, 0)).into(),
        96,
        a.into(),
    ) {
        return special_v4(bits as u32).map(|(class, p)| (class, 96 + p));
    }
    if bits >> 112 == 0x2002 {
        return special_v4((bits >> 80) as u32).map(|(class, p)| (class, 16 + p));
    }
    if bits >> 125 != 0b001 {
        return Some(("reserved", 3));
    }
    None
}

/// The class of a special (not globally reachable) address, `None` for an ordinary one.
/// An IPv4-mapped address is judged as its IPv4 address.
///
/// IPv4: `unspecified` 0/8, `private` 10/8, 172.16/12, 192.168/16, `cgnat` 100.64/10,
/// `loopback` 127/8, `link-local` 169.254/16, `ietf-protocol` 192.0.0/24,
/// `documentation` 192.0.2/24, 198.51.100/24, 203.0.113/24, `6to4-relay` 192.88.99/24,
/// `benchmarking` 198.18/15, `multicast` 224/4, `broadcast` 255.255.255.255,
/// `reserved` 240/4.
///
/// IPv6: `unspecified` ::, `loopback` ::1, `ipv4-compatible` the rest of ::/96 (the
/// deprecated `::a.b.c.d` form, refused rather than converted), `nat64-local`
/// 64:ff9b:1::/48, `discard` 100::/64, `benchmarking` 2001:2::/48, `ietf-protocol`
/// 2001::/23 (Teredo included), `documentation` 2001:db8::/32, 3fff::/20,
/// `unique-local` fc00::/7, `link-local` fe80::/10, `site-local` fec0::/10,
/// `multicast` ff00::/8; NAT64 64:ff9b::/96 and 6to4 2002::/16 take the class of the
/// IPv4 address they carry; anything else outside 2000::/3 is `reserved`.
pub fn is_special(ip: IpAddr) -> Option<&'static str> {
    special_block(ip).map(|(class, _)| class)
}

/// An ordered exit policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitPolicy {
    /// Rules, first match wins.
    pub rules: Vec<ExitRule>,
}

impl ExitPolicy {
    /// Parses one rule per item.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<ExitPolicy, PolicyError> {
        Ok(ExitPolicy {
            rules: rules
                .iter()
                .map(|r| r.as_ref().parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// True if some rule accepts (this relay can be an exit at all).
    pub fn is_exit(&self) -> bool {
        self.rules.iter().any(|r| r.accept)
    }

    /// The canonical destination ([`canonical`]) the exit must send to if the policy
    /// allows `dest`, else `None`: port 0 never, no match or a `reject` first means no,
    /// and a special destination ([`is_special`]) needs a first-matching `accept` whose
    /// network lies inside its special block.
    pub fn permit(&self, dest: SocketAddr) -> Option<SocketAddr> {
        let dest = canonical(dest);
        if dest.port() == 0 {
            return None;
        }
        let rule = self.rules.iter().find(|r| r.matches(&dest))?;
        if !rule.accept {
            return None;
        }
        match special_block(dest.ip()) {
            Some((_, block)) if !rule.names(block) => None,
            _ => Some(dest),
        }
    }

    /// Does the policy allow sending to `dest` (in its canonical form, see
    /// [`ExitPolicy::permit`])?
    pub fn allows(&self, dest: &SocketAddr) -> bool {
        self.permit(*dest).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pol<S: AsRef<str>>(rules: &[S]) -> ExitPolicy {
        ExitPolicy::parse(rules).unwrap()
    }

    #[test]
    fn first_match_wins_default_deny() {
        let p = pol(&[
            "reject 127.0.0.1:22",
            "accept 127.0.0.0/8:1-65535",
            "accept [::1]:53",
        ]);
        assert!(p.allows(&sa("127.0.0.5:9")));
        assert!(!p.allows(&sa("127.0.0.1:22")));
        assert!(!p.allows(&sa("10.0.0.1:80")));
        assert!(p.allows(&sa("[::1]:53")));
        assert!(!p.allows(&sa("[::1]:54")));
        assert!(ExitPolicy::default().rules.is_empty());
        assert!(!ExitPolicy::default().allows(&sa("127.0.0.1:1")));
    }

    #[test]
    fn bad_rules_are_refused() {
        for r in [
            "allow 1.2.3.4:5",
            "accept 1.2.3.4",
            "accept 1.2.3.4/33:1",
            "accept x:1",
            "accept 1.2.3.4:0",
            "accept 1.2.3.4:9-3",
            "accept 1.2.3.4:+5",
            "accept 1.2.3.4/+8:5",
            "accept 1.2.3.4/:5",
            "accept ::1:53",
            "accept [::1:53",
            "accept [::]/129:*",
            "accept [::1]x:53",
            "accept [::/0]/0:*",
            "accept [1.2.3.4]:5",
            "accept */8:*",
            "accept *5:*",
            "accept *:0",
            "accept *:0-5",
            "accept",
            "",
        ] {
            assert!(r.parse::<ExitRule>().is_err(), "{r}");
        }
    }

    #[test]
    fn address_forms_parse() {
        let net = |r: &str| r.parse::<ExitRule>().unwrap().addrs;
        let n = |net: &str, prefix| Addrs::Net {
            net: net.parse().unwrap(),
            prefix,
        };
        assert_eq!(net("accept *:*"), Addrs::Any);
        assert_eq!(net("accept *4:*"), n("0.0.0.0", 0));
        assert_eq!(net("accept *6:*"), n("::", 0));
        assert_eq!(net("accept 0.0.0.0/0:*"), n("0.0.0.0", 0));
        assert_eq!(net("accept [::]/0:*"), n("::", 0));
        assert_eq!(net("accept [::/0]:*"), n("::", 0));
        assert_eq!(net("accept [::1]:53"), n("::1", 128));
        assert_eq!(net("accept [fc00::]/7:1-9"), n("fc00::", 7));
        assert_eq!(net("accept 127.0.0.1:1"), n("127.0.0.1", 32));
        assert_eq!(net("reject\t10.0.0.0/8:*"), n("10.0.0.0", 8));
        // IPv4-mapped networks are the IPv4 networks.
        assert_eq!(net("accept [::ffff:127.0.0.0]/104:*"), n("127.0.0.0", 8));
        assert_eq!(net("accept [::ffff:127.0.0.1]:*"), n("127.0.0.1", 32));
        assert_eq!(net("accept [::ffff:0:0]/96:*"), n("0.0.0.0", 0));
        assert_eq!(net("accept [::ffff:0:0]/95:*"), n("::ffff:0:0", 95));
        let r: ExitRule = "accept [::]/0:*".parse().unwrap();
        assert_eq!(r.ports, (1, 65535));
    }

    #[test]
    fn display_parses_back() {
        for (text, shown) in [
            ("accept *:*", "accept *:*"),
            ("reject *4:25", "reject 0.0.0.0/0:25"),
            ("accept *6:1-1024", "accept [::]/0:1-1024"),
            ("accept 127.0.0.1:1", "accept 127.0.0.1/32:1"),
            ("accept [::ffff:10.0.0.0]/104:80", "accept 10.0.0.0/8:80"),
            ("reject [fe80::]/10:*", "reject [fe80::]/10:*"),
        ] {
            let r: ExitRule = text.parse().unwrap();
            assert_eq!(r.to_string(), shown);
            assert_eq!(shown.parse::<ExitRule>().unwrap(), r);
        }
    }

    #[test]
    fn star_matches_both_families_and_star4_star6_one() {
        let v4 = sa("8.8.8.8:53");
        let v6 = sa("[2001:4860:4860::8888]:53");
        let any = pol(&["accept *:*"]);
        assert_eq!(any.permit(v4), Some(v4));
        assert_eq!(any.permit(v6), Some(v6));
        for p in [pol(&["accept *4:*"]), pol(&["accept 0.0.0.0/0:*"])] {
            assert_eq!(p.permit(v4), Some(v4));
            assert_eq!(p.permit(v6), None);
        }
        for p in [pol(&["accept *6:*"]), pol(&["accept [::]/0:*"])] {
            assert_eq!(p.permit(v4), None);
            assert_eq!(p.permit(v6), Some(v6));
        }
        // `reject *:*` ends the policy for both families.
        let p = pol(&["reject *:25", "accept *:*"]);
        assert!(!p.allows(&sa("8.8.8.8:25")));
        assert!(!p.allows(&sa("[2001:4860:4860::8888]:25")));
        assert!(p.allows(&sa("[2001:4860:4860::8888]:26")));
    }

    /// The audit's case: `reject 127.0.0.0/8:*` + `accept *:*` let every other spelling
    /// of loopback through.
    #[test]
    fn audit_case_loopback_spellings_are_refused() {
        let p = pol(&["reject 127.0.0.0/8:*", "accept *:*"]);
        for d in [
            "127.0.0.1:80",
            "0.0.0.0:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "[::1]:80",
            "[::ffff:0.0.0.0]:80",
            "[::127.0.0.1]:80",
            "[64:ff9b::127.0.0.1]:80",
            "[2002:7f00:1::]:80",
            "8.8.8.8:0",
            "[::ffff:8.8.8.8]:0",
            "[2001:4860:4860::8888]:0",
        ] {
            assert_eq!(p.permit(sa(d)), None, "{d}");
        }
        assert_eq!(p.permit(sa("8.8.8.8:80")), Some(sa("8.8.8.8:80")));
        assert_eq!(p.permit(sa("[::ffff:8.8.8.8]:80")), Some(sa("8.8.8.8:80")));
        // `accept *:*` alone refuses them too.
        let p = pol(&["accept *:*"]);
        for d in ["127.0.0.1:80", "0.0.0.0:80", "[::]:80", "[::1]:80"] {
            assert_eq!(p.permit(sa(d)), None, "{d}");
        }
    }

    #[test]
    fn port_zero_is_never_allowed() {
        let p = pol(&["accept 127.0.0.0/8:*", "accept *:*"]);
        for d in [
            "127.0.0.1:0",
            "[::ffff:127.0.0.1]:0",
            "1.1.1.1:0",
            "[2606:4700::1111]:0",
        ] {
            assert_eq!(p.permit(sa(d)), None, "{d}");
        }
        assert_eq!(p.permit(sa("127.0.0.1:1")), Some(sa("127.0.0.1:1")));
    }

    #[test]
    fn permit_returns_the_canonical_destination() {
        let p = pol(&["accept *:*"]);
        assert_eq!(
            p.permit(sa("[::ffff:1.1.1.1]:443")),
            Some(sa("1.1.1.1:443"))
        );
        assert_eq!(p.permit(sa("1.1.1.1:443")), Some(sa("1.1.1.1:443")));
        assert_eq!(canonical(sa("[::ffff:1.2.3.4]:5")), sa("1.2.3.4:5"));
        assert_eq!(canonical(sa("[::1.2.3.4]:5")), sa("[::1.2.3.4]:5"));
        assert_eq!(canonical(sa("[2001:db8::1]:5")), sa("[2001:db8::1]:5"));
        // A mapped rule matches the IPv4 destination and the other way round.
        let p = pol(&["accept [::ffff:127.0.0.0]/104:*"]);
        assert_eq!(p.permit(sa("127.0.0.1:9")), Some(sa("127.0.0.1:9")));
        assert_eq!(
            p.permit(sa("[::ffff:127.0.0.1]:9")),
            Some(sa("127.0.0.1:9"))
        );
        let p = pol(&["reject 10.0.0.0/8:*", "accept 10.0.0.0/8:*"]);
        assert_eq!(p.permit(sa("[::ffff:10.1.1.1]:9")), None);
        let p = pol(&["accept 10.0.0.0/8:*"]);
        assert_eq!(p.permit(sa("[::ffff:10.1.1.1]:9")), Some(sa("10.1.1.1:9")));
    }

    #[test]
    fn repo_policies_still_allow_loopback() {
        for (rules, dest) in [
            (&["accept 127.0.0.0/8:*"][..], "127.0.0.1:9"),
            (&["accept 127.0.0.0/8:1-65535"][..], "127.0.0.7:65535"),
            (&["accept 127.0.0.1:1"][..], "127.0.0.1:1"),
        ] {
            assert_eq!(pol(rules).permit(sa(dest)), Some(sa(dest)), "{rules:?}");
        }
        assert_eq!(pol(&["accept 127.0.0.1:1"]).permit(sa("127.0.0.2:1")), None);
    }

    #[test]
    fn explicit_means_inside_the_special_block_and_first() {
        let lo = sa("127.0.0.1:80");
        // Wider than the block (even if not the whole space): not explicit.
        for r in [
            "accept 0.0.0.0/1:*",
            "accept 64.0.0.0/2:*",
            "accept 126.0.0.0/7:*",
        ] {
            assert_eq!(pol(&[r]).permit(lo), None, "{r}");
        }
        // Inside the block: explicit.
        for r in [
            "accept 127.0.0.0/8:*",
            "accept 127.0.0.0/24:80",
            "accept [::ffff:127.0.0.1]:80",
        ] {
            assert_eq!(pol(&[r]).permit(lo), Some(lo), "{r}");
        }
        // One private block does not name another.
        let p = pol(&["accept 10.0.0.0/8:*", "accept *:*"]);
        assert!(p.allows(&sa("10.2.3.4:1")));
        assert!(!p.allows(&sa("192.168.1.1:1")));
        assert!(!p.allows(&sa("172.16.0.1:1")));
        // First match decides: an explicit rule after `accept *:*` is never reached.
        let p = pol(&["accept *:*", "accept 127.0.0.0/8:*"]);
        assert!(!p.allows(&lo));
        assert!(p.allows(&sa("9.9.9.9:1")));
        // An explicit reject still rejects.
        let p = pol(&["reject 127.0.0.1:22", "accept 127.0.0.0/8:*"]);
        assert!(!p.allows(&sa("127.0.0.1:22")));
        assert!(p.allows(&sa("127.0.0.1:23")));
    }

    #[test]
    fn ordinary_addresses_are_not_special() {
        let p = pol(&["accept *:*"]);
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "192.0.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "2001:4860:4860::8888",
            "2001:200::1",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(is_special(ip), None, "{a}");
            let d = SocketAddr::new(ip, 443);
            assert_eq!(p.permit(d), Some(canonical(d)), "{a}");
        }
    }

    /// For one special address: its class; refused by every whole-space accept (and in
    /// its IPv4-mapped form); allowed, as its canonical form, by a rule naming its block;
    /// refused by a rule one bit wider than the block.
    fn check_special(addr: &str, class: &str, block: &str) {
        let ip: IpAddr = addr.parse().unwrap();
        let dest = SocketAddr::new(ip, 80);
        let mut forms = vec![dest];
        if let IpAddr::V4(v4) = ip {
            forms.push(SocketAddr::new(v4.to_ipv6_mapped().into(), 80));
        }
        for d in &forms {
            assert_eq!(is_special(d.ip()), Some(class), "{d}");
            for r in [
                "accept *:*",
                "accept *4:*",
                "accept *6:*",
                "accept 0.0.0.0/0:*",
                "accept [::]/0:*",
            ] {
                assert_eq!(pol(&[r]).permit(*d), None, "{r} {d}");
            }
            let accept = format!("accept {block}:*");
            assert_eq!(pol(&[&accept]).permit(*d), Some(dest), "{block} {d}");
            let reject = format!("reject {block}:*");
            let p = pol(&[&reject, "accept *:*"]);
            assert_eq!(p.permit(*d), None, "{block} {d}");
        }
        let named: ExitRule = format!("accept {block}:*").parse().unwrap();
        if let Addrs::Net { net, prefix } = named.addrs {
            if prefix > 1 {
                let wider = ExitPolicy {
                    rules: vec![ExitRule {
                        addrs: Addrs::Net {
                            net,
                            prefix: prefix - 1,
                        },
                        ..named
                    }],
                };
                for d in &forms {
                    assert_eq!(wider.permit(*d), None, "{:?} {d}", wider.rules[0]);
                }
            }
        }
    }

    macro_rules! special {
        ($($name:ident: $addr:expr, $class:expr, $block:expr;)*) => {
            $(
                #[test]
                fn $name() {
                    check_special($addr, $class, $block);
                }
            )*
        };
    }

    special! {
        special_v4_unspecified: "0.0.0.0", "unspecified", "0.0.0.0/8";
        special_v4_this_network: "0.1.2.3", "unspecified", "0.0.0.0/8";
        special_v4_loopback: "127.0.0.1", "loopback", "127.0.0.0/8";
        special_v4_loopback_high: "127.255.255.254", "loopback", "127.0.0.0/8";
        special_v4_link_local: "169.254.169.254", "link-local", "169.254.0.0/16";
        special_v4_multicast: "224.0.0.1", "multicast", "224.0.0.0/4";
        special_v4_multicast_high: "239.255.255.250", "multicast", "224.0.0.0/4";
        special_v4_broadcast: "255.255.255.255", "broadcast", "255.255.255.255";
        special_v4_reserved: "240.0.0.1", "reserved", "240.0.0.0/4";
        special_v4_reserved_high: "255.255.255.254", "reserved", "240.0.0.0/4";
        special_v4_private_10: "10.0.0.1", "private", "10.0.0.0/8";
        special_v4_private_172: "172.31.255.255", "private", "172.16.0.0/12";
        special_v4_private_192: "192.168.1.1", "private", "192.168.0.0/16";
        special_v4_cgnat: "100.64.0.1", "cgnat", "100.64.0.0/10";
        special_v4_ietf_protocol: "192.0.0.8", "ietf-protocol", "192.0.0.0/24";
        special_v4_documentation_1: "192.0.2.1", "documentation", "192.0.2.0/24";
        special_v4_documentation_2: "198.51.100.1", "documentation", "198.51.100.0/24";
        special_v4_documentation_3: "203.0.113.1", "documentation", "203.0.113.0/24";
        special_v4_benchmarking: "198.19.255.1", "benchmarking", "198.18.0.0/15";
        special_v4_6to4_relay: "192.88.99.1", "6to4-relay", "192.88.99.0/24";
        special_v6_unspecified: "::", "unspecified", "[::]";
        special_v6_loopback: "::1", "loopback", "[::1]";
        special_v6_ipv4_compatible: "::127.0.0.1", "ipv4-compatible", "[::]/96";
        special_v6_ipv4_compatible_global: "::8.8.8.8", "ipv4-compatible", "[::]/96";
        special_v6_link_local: "fe80::1", "link-local", "[fe80::]/10";
        special_v6_multicast: "ff02::1", "multicast", "[ff00::]/8";
        special_v6_unique_local: "fd12:3456::1", "unique-local", "[fc00::]/7";
        special_v6_site_local: "fec0::1", "site-local", "[fec0::]/10";
        special_v6_nat64_loopback: "64:ff9b::127.0.0.1", "loopback", "[64:ff9b::127.0.0.0]/104";
        special_v6_nat64_private: "64:ff9b::10.0.0.1", "private", "[64:ff9b::10.0.0.0]/104";
        special_v6_nat64_local: "64:ff9b:1::1", "nat64-local", "[64:ff9b:1::]/48";
        special_v6_6to4_loopback: "2002:7f00:1::1", "loopback", "[2002:7f00::]/24";
        special_v6_6to4_private: "2002:c0a8:101::1", "private", "[2002:c0a8::]/32";
        special_v6_discard: "100::1", "discard", "[100::]/64";
        special_v6_benchmarking: "2001:2::1", "benchmarking", "[2001:2::]/48";
        special_v6_teredo: "2001::1", "ietf-protocol", "[2001::]/23";
        special_v6_documentation: "2001:db8::1", "documentation", "[2001:db8::]/32";
        special_v6_documentation_3fff: "3fff::1", "documentation", "[3fff::]/20";
        special_v6_reserved: "4000::1", "reserved", "[4000::]/3";
        special_v6_reserved_low: "::ffff:0:1.2.3.4", "reserved", "[::]/3";
    }

    fn v4_near_special() -> impl Strategy<Value = u32> {
        prop_oneof![
            any::<u32>(),
            (prop::sample::select(SPECIAL_V4), any::<u32>()).prop_map(|((net, prefix, _), low)| {
                net | (low & u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0))
            }),
        ]
    }

    fn rule() -> impl Strategy<Value = ExitRule> {
        let addrs = prop_oneof![
            Just(Addrs::Any),
            (v4_near_special(), 0u8..=32).prop_map(|(n, prefix)| Addrs::Net {
                net: Ipv4Addr::from_bits(n).into(),
                prefix,
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(n, prefix)| Addrs::Net {
                net: Ipv6Addr::from_bits(n).into(),
                prefix,
            }),
            // Mapped networks, written as IPv6 and parsed to IPv4.
            (v4_near_special(), 96u8..=128).prop_map(|(n, prefix)| {
                format!(
                    "accept [{}]/{prefix}:*",
                    Ipv4Addr::from_bits(n).to_ipv6_mapped()
                )
                .parse::<ExitRule>()
                .unwrap()
                .addrs
            }),
        ];
        (any::<bool>(), addrs, 1u16..=65535, 1u16..=65535).prop_map(|(accept, addrs, a, b)| {
            ExitRule {
                accept,
                addrs,
                ports: (a.min(b), a.max(b)),
            }
        })
    }

    proptest! {
        /// An IPv4 destination and its IPv4-mapped form get the same answer, and an
        /// allowed one is returned as IPv4.
        #[test]
        fn mapped_and_plain_ipv4_agree(
            rules in prop::collection::vec(rule(), 0..6),
            a in v4_near_special(),
            port in prop_oneof![Just(0u16), any::<u16>()],
        ) {
            let p = ExitPolicy { rules };
            let a = Ipv4Addr::from_bits(a);
            let plain = SocketAddr::new(a.into(), port);
            let mapped = SocketAddr::new(a.to_ipv6_mapped().into(), port);
            let got = p.permit(plain);
            prop_assert_eq!(got, p.permit(mapped));
            if let Some(d) = got {
                prop_assert_eq!(d, plain);
                prop_assert_ne!(port, 0);
            }
            prop_assert_eq!(p.allows(&plain), got.is_some());
        }

        /// `accept *:*` allows exactly the ordinary destinations of both families.
        #[test]
        fn star_never_allows_special(a in any::<u128>(), b in v4_near_special(), port in 1u16..) {
            let p = pol(&["accept *:*"]);
            for ip in [IpAddr::V6(Ipv6Addr::from_bits(a)), IpAddr::V4(Ipv4Addr::from_bits(b))] {
                let d = SocketAddr::new(ip, port);
                prop_assert_eq!(p.permit(d).is_some(), is_special(ip).is_none());
            }
        }

        /// Every rule prints as text that parses back to it.
        #[test]
        fn rules_print_and_parse_back(r in rule()) {
            prop_assert_eq!(r.to_string().parse::<ExitRule>().unwrap(), r);
        }
    }
}
