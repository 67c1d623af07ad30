// Shared fixture: one relay with fixed keys, built once per process.
// Each target uses part of it.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{Peer, Relay, RelayLimits};
use shroud_proto::{Layout, RingAead};

pub const NOW_MS: u64 = 1_764_000_000_000;

/// Milliseconds the fuzz clock advances per input.
pub const TICK_MS: u64 = 100;

/// The fuzz clock: starts at [`NOW_MS`] and moves [`TICK_MS`] per call, so rate
/// limits and timeouts in the shared relay keep refilling and expiring (a constant
/// clock leaves every setup `rate_limited` after a few hundred inputs). The time an
/// input sees depends only on how many inputs came before it in this process.
pub fn tick() -> u64 {
    static CLOCK: AtomicU64 = AtomicU64::new(NOW_MS);
    CLOCK.fetch_add(TICK_MS, Ordering::Relaxed) + TICK_MS
}

pub fn peer_addr() -> SocketAddr {
    "127.0.0.2:9000".parse().unwrap()
}

pub fn onion() -> OnionSecret {
    OnionSecret::from_bytes(&[0x11; 32])
}

pub fn relay() -> &'static Mutex<Relay<RingAead>> {
    static R: OnceLock<Mutex<Relay<RingAead>>> = OnceLock::new();
    R.get_or_init(|| {
        let me = IdentityKey::from_bytes(&[1; 32]);
        let peer = IdentityKey::from_bytes(&[2; 32]).public();
        let peers = vec![Peer {
            id: peer.relay_id(),
            identity: peer,
            addr: peer_addr().ip(),
            ports: (9000, 9001),
        }];
        Mutex::new(Relay::new(
            Layout::default(),
            me,
            vec![onion()],
            peers,
            ExitPolicy::parse(&["accept 127.0.0.0/8:*"]).unwrap(),
            RelayLimits {
                max_circuits: 256,
                max_links: 256,
                // One setup from a new address a second gets the X25519 (one input in
                // ten, at TICK_MS per input); the others take the RETRY path, which
                // keeps long runs fast and fuzzes that path too.
                newcomer_setup_rate: 1,
                // Mix mode offered, so mixed circuits' paths are reached too.
                max_mix_mean_ms: 1000,
                ..RelayLimits::default()
            },
            NOW_MS,
        ))
    })
}
