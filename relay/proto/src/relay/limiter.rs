//! The per-source setup rate limiter: a token bucket per source address, in a table
//! of fixed capacity.

use std::net::IpAddr;

use super::HashMap;

struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// Token buckets for setups, one per source IP, at most `capacity` sources.
pub(super) struct SetupLimiter {
    buckets: HashMap<IpAddr, Bucket>,
    rate: f64,
    burst: f64,
    capacity: usize,
}

impl SetupLimiter {
    /// `rate` setups per second with bursts of `burst`, for at most `capacity` sources.
    pub(super) fn new(rate: u32, burst: u32, capacity: usize) -> Self {
        SetupLimiter {
            buckets: HashMap::with_capacity_and_hasher(capacity, ahash::RandomState::new()),
            rate: f64::from(rate),
            burst: f64::from(burst),
            capacity,
        }
    }

    /// Takes a token of `ip`'s bucket; false if it has none or the table is full.
    pub(super) fn allow(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.capacity {
            // Table full: forget sources whose bucket has refilled (they would start
            // full anyway); if none, refuse the newcomer rather than grow.
            self.buckets.retain(|_, b| {
                b.tokens + (now_ms.saturating_sub(b.last_ms) as f64 / 1000.0) * rate < burst
            });
            if self.buckets.len() >= self.capacity {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last_ms: now_ms,
        });
        b.tokens =
            (b.tokens + (now_ms.saturating_sub(b.last_ms) as f64 / 1000.0) * rate).min(burst);
        b.last_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
