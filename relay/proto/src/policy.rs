//! Exit policy: which destinations an exit relay may send circuit payload to.
//!
//! An ordered list of rules `accept|reject ADDR[/PREFIX]:PORT[-PORT]`; the first rule
//! that matches decides, and a destination no rule matches is rejected. An empty policy
//! therefore makes a relay a non-exit.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRule {
    /// Accept (true) or reject.
    pub accept: bool,
    /// Network address.
    pub net: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
    /// Inclusive port range.
    pub ports: (u16, u16),
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad exit rule {rule:?}: {reason} (expected `accept|reject ADDR[/PREFIX]:PORT[-PORT]`, e.g. `accept 127.0.0.0/8:1-65535`)")]
pub struct PolicyError {
    /// The rule text.
    pub rule: String,
    /// What is wrong.
    pub reason: &'static str,
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
            .split_once(' ')
            .ok_or_else(|| err("missing verb"))?;
        let accept = match verb {
            "accept" => true,
            "reject" => false,
            _ => return Err(err("verb must be accept or reject")),
        };
        let rest = rest.trim();
        let (addr, ports) = rest.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let (net, prefix) = match addr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (addr, None),
        };
        let net: IpAddr = if net == "*" {
            "0.0.0.0".parse().map_err(|_| err("bad address"))?
        } else {
            net.parse().map_err(|_| err("bad address"))?
        };
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err("bad prefix"))?,
            None if addr == "*" => 0,
            None => max,
        };
        if prefix > max {
            return Err(err("prefix too long"));
        }
        let ports = if ports == "*" {
            (1, 65535)
        } else if let Some((a, b)) = ports.split_once('-') {
            (
                a.parse().map_err(|_| err("bad port"))?,
                b.parse().map_err(|_| err("bad port"))?,
            )
        } else {
            let p = ports.parse().map_err(|_| err("bad port"))?;
            (p, p)
        };
        if ports.0 == 0 || ports.0 > ports.1 {
            return Err(err("bad port range"));
        }
        Ok(ExitRule {
            accept,
            net,
            prefix,
            ports,
        })
    }
}

impl ExitRule {
    fn matches(&self, dest: &SocketAddr) -> bool {
        if dest.port() < self.ports.0 || dest.port() > self.ports.1 {
            return false;
        }
        match (self.net, dest.ip()) {
            (IpAddr::V4(n), IpAddr::V4(d)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & mask == u32::from(d) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(d)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & mask == u128::from(d) & mask
            }
            _ => false,
        }
    }
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

    /// Does the policy allow sending to `dest`?
    pub fn allows(&self, dest: &SocketAddr) -> bool {
        self.rules
            .iter()
            .find(|r| r.matches(dest))
            .is_some_and(|r| r.accept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_default_deny() {
        let p = ExitPolicy::parse(&[
            "reject 127.0.0.1:22",
            "accept 127.0.0.0/8:1-65535",
            "accept [::1]:53",
        ])
        .unwrap();
        assert!(p.allows(&"127.0.0.5:9".parse().unwrap()));
        assert!(!p.allows(&"127.0.0.1:22".parse().unwrap()));
        assert!(!p.allows(&"10.0.0.1:80".parse().unwrap()));
        assert!(p.allows(&"[::1]:53".parse().unwrap()));
        assert!(!p.allows(&"[::1]:54".parse().unwrap()));
        assert!(ExitPolicy::default().rules.is_empty());
        assert!(!ExitPolicy::default().allows(&"127.0.0.1:1".parse().unwrap()));
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
        ] {
            assert!(r.parse::<ExitRule>().is_err(), "{r}");
        }
    }
}
