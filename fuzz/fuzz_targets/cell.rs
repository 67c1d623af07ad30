//! Any datagram, from a client address or a peer relay, of any length: the relay must
//! answer with an action and never panic; header decoding must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let mut h = [0u8; 16];
        h.copy_from_slice(&data[..16]);
        let _ = shroud_proto::cell::Header::decode(&h);
    }
    let (src, body) = match data.split_first() {
        Some((b, rest)) if b & 1 == 0 => (common::peer_addr(), rest),
        Some((b, rest)) => (
            std::net::SocketAddr::from(([127, 0, 0, 100], 40000 + u16::from(*b))),
            rest,
        ),
        None => return,
    };
    let mut buf = body.to_vec();
    // Also try the exact cell size, zero-padded, so the deep paths are reached.
    let mut cell = vec![0u8; 1024];
    let n = body.len().min(1024);
    cell[..n].copy_from_slice(&body[..n]);
    // Time moves on per input and every input is its own batch, so the setup rate
    // limits and the per-batch setup budget refill and the deep paths stay reachable.
    let now = common::tick();
    let mut r = common::relay().lock().unwrap();
    r.begin_batch(16);
    let _ = r.handle(src, &mut buf, now);
    let _ = r.handle(src, &mut cell, now);
});
