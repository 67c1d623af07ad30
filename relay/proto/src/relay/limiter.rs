//! Per-prefix budgets: every client source prefix (IPv4 /24, IPv6 /64) gets a setup
//! token bucket and a share of the link and circuit tables, so that one host, or one
//! network, with many addresses or source ports cannot fill them. Peers of the signed
//! list are not counted here. The table of prefixes has a fixed capacity; a prefix
//! with nothing in the tables and a full bucket is forgotten when room is needed.

use std::net::IpAddr;

use super::HashMap;

/// The prefix a source address is accounted under: IPv4 /24, IPv6 /64 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Prefix {
    V4([u8; 3]),
    V6([u8; 8]),
}

impl Prefix {
    pub(super) fn of(ip: IpAddr) -> Prefix {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                Prefix::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(a) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&a.octets()[..8]);
                Prefix::V6(p)
            }
        }
    }
}

struct Entry {
    tokens: f64,
    last_ms: u64,
    /// RETRY replies the prefix may still get, and when that was last refilled.
    retries: f64,
    retries_ms: u64,
    links: u32,
    circuits: u32,
}

/// Budgets per source prefix, and one shared by all addresses the relay has no link
/// with yet.
pub(super) struct PrefixTable {
    entries: HashMap<Prefix, Entry>,
    /// Setups from addresses without a link (all of them together): tokens, last refill.
    newcomers: (f64, u64),
    newcomer_rate: f64,
    /// RETRY replies for all prefixes together: tokens, last refill.
    retries: (f64, u64),
    retry_total_rate: f64,
    retry_rate: f64,
    rate: f64,
    burst: f64,
    capacity: usize,
    links_per_prefix: u32,
    circuits_per_prefix: u32,
}

impl PrefixTable {
    /// `rate` setups per second with bursts of `burst` per prefix, at most `capacity`
    /// prefixes, and these shares of the link and circuit tables per prefix.
    pub(super) fn new(
        rate: u32,
        burst: u32,
        capacity: usize,
        links_per_prefix: u32,
        circuits_per_prefix: u32,
    ) -> Self {
        PrefixTable {
            entries: HashMap::with_capacity_and_hasher(capacity, ahash::RandomState::new()),
            newcomers: (0.0, 0),
            newcomer_rate: 0.0,
            retries: (0.0, 0),
            retry_total_rate: 0.0,
            retry_rate: 0.0,
            rate: f64::from(rate),
            burst: f64::from(burst),
            capacity,
            links_per_prefix,
            circuits_per_prefix,
        }
    }

    fn entry(&mut self, p: Prefix, now_ms: u64) -> Option<&mut Entry> {
        let (rate, burst) = (self.rate, self.burst);
        let retry_burst = 2.0 * self.retry_rate;
        if !self.entries.contains_key(&p) && self.entries.len() >= self.capacity {
            // Full: forget prefixes that hold nothing and whose bucket has refilled
            // (they would start afresh anyway); if none, refuse the newcomer.
            self.entries.retain(|_, e| {
                e.links > 0
                    || e.circuits > 0
                    || e.tokens + (now_ms.saturating_sub(e.last_ms) as f64 / 1000.0) * rate < burst
            });
            if self.entries.len() >= self.capacity {
                return None;
            }
        }
        Some(self.entries.entry(p).or_insert(Entry {
            tokens: burst,
            last_ms: now_ms,
            retries: retry_burst,
            retries_ms: now_ms,
            links: 0,
            circuits: 0,
        }))
    }

    /// Sets the budget shared by setups from addresses without a link: `rate` per
    /// second, bursts of one second's worth.
    pub(super) fn set_newcomer_rate(&mut self, rate: u32, now_ms: u64) {
        self.newcomer_rate = f64::from(rate);
        self.newcomers = (self.newcomer_rate, now_ms);
    }

    /// Takes a token of the budget shared by setups from addresses without a link.
    pub(super) fn allow_newcomer(&mut self, now_ms: u64) -> bool {
        let (tokens, last) = self.newcomers;
        let t = (tokens + (now_ms.saturating_sub(last) as f64 / 1000.0) * self.newcomer_rate)
            .min(self.newcomer_rate.max(1.0));
        if t >= 1.0 {
            self.newcomers = (t - 1.0, now_ms);
            true
        } else {
            self.newcomers = (t, now_ms);
            false
        }
    }

    /// Sets the RETRY budgets: `per_prefix` replies a second per prefix (bursts of two
    /// seconds' worth) and `total` a second for all prefixes together (bursts of one
    /// second's worth).
    pub(super) fn set_retry_rates(&mut self, per_prefix: u32, total: u32, now_ms: u64) {
        self.retry_rate = f64::from(per_prefix);
        self.retry_total_rate = f64::from(total);
        self.retries = (self.retry_total_rate, now_ms);
    }

    /// Takes a RETRY token of `ip`'s prefix and of the total budget (replies to setups
    /// under load cost a send each: a spoofed flood from many prefixes must not turn
    /// the relay into a sender of as many cells as it receives).
    pub(super) fn allow_retry(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let (tokens, last) = self.retries;
        let total = (tokens
            + (now_ms.saturating_sub(last) as f64 / 1000.0) * self.retry_total_rate)
            .min(self.retry_total_rate.max(1.0));
        self.retries = (total, now_ms);
        if total < 1.0 {
            return false;
        }
        let rate = self.retry_rate;
        let Some(e) = self.entry(Prefix::of(ip), now_ms) else {
            return false;
        };
        e.retries = (e.retries + (now_ms.saturating_sub(e.retries_ms) as f64 / 1000.0) * rate)
            .min(2.0 * rate);
        e.retries_ms = now_ms;
        if e.retries < 1.0 {
            return false;
        }
        e.retries -= 1.0;
        self.retries.0 -= 1.0;
        true
    }

    /// Takes a setup token of `ip`'s prefix; false if it has none or the table is full.
    pub(super) fn allow_setup(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let Some(e) = self.entry(Prefix::of(ip), now_ms) else {
            return false;
        };
        e.tokens =
            (e.tokens + (now_ms.saturating_sub(e.last_ms) as f64 / 1000.0) * rate).min(burst);
        e.last_ms = now_ms;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True if `ip`'s prefix may have one more client link.
    pub(super) fn link_allowed(&self, ip: IpAddr) -> bool {
        self.entries
            .get(&Prefix::of(ip))
            .is_none_or(|e| e.links < self.links_per_prefix)
    }

    /// True if `ip`'s prefix may have one more circuit.
    pub(super) fn circuit_allowed(&self, ip: IpAddr) -> bool {
        self.entries
            .get(&Prefix::of(ip))
            .is_none_or(|e| e.circuits < self.circuits_per_prefix)
    }

    /// Counts a new client link of `ip`'s prefix.
    pub(super) fn add_link(&mut self, ip: IpAddr, now_ms: u64) {
        if let Some(e) = self.entry(Prefix::of(ip), now_ms) {
            e.links += 1;
        }
    }

    /// Counts a client link of `ip`'s prefix gone.
    pub(super) fn release_link(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&Prefix::of(ip)) {
            e.links = e.links.saturating_sub(1);
        }
    }

    /// Counts a new circuit from a client of `ip`'s prefix.
    pub(super) fn add_circuit(&mut self, ip: IpAddr, now_ms: u64) {
        if let Some(e) = self.entry(Prefix::of(ip), now_ms) {
            e.circuits += 1;
        }
    }

    /// Counts a circuit of a client of `ip`'s prefix gone.
    pub(super) fn release_circuit(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&Prefix::of(ip)) {
            e.circuits = e.circuits.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_group_ipv4_by_24_and_ipv6_by_64() {
        let p = |s: &str| Prefix::of(s.parse().unwrap());
        assert_eq!(p("10.1.2.3"), p("10.1.2.200"));
        assert_ne!(p("10.1.2.3"), p("10.1.3.3"));
        assert_eq!(p("::ffff:10.1.2.3"), p("10.1.2.9"));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
    }

    #[test]
    fn shares_and_buckets_are_per_prefix() {
        let mut t = PrefixTable::new(10, 2, 4, 2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a2: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.1.1".parse().unwrap();
        assert!(t.allow_setup(a, 0));
        assert!(t.allow_setup(a2, 0));
        assert!(!t.allow_setup(a, 0), "the /24 shares one bucket");
        assert!(t.allow_setup(b, 0));
        assert!(t.allow_setup(a, 100), "refilled at 10/s");
        t.add_link(a, 0);
        t.add_link(a2, 0);
        assert!(!t.link_allowed(a));
        assert!(t.link_allowed(b));
        t.release_link(a);
        assert!(t.link_allowed(a2));
        for _ in 0..3 {
            t.add_circuit(a, 0);
        }
        assert!(!t.circuit_allowed(a2));
        assert!(t.circuit_allowed(b));
    }
}
