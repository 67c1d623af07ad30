//! shroud-proxy's fragment layer: the bounded reassembler fed any sequence of
//! fragments from a few senders, and the split-then-reassemble round trip of any
//! packet. Never a panic; the reassembler never holds more than its capacity; a
//! packet that fits is reassembled to exactly itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_proxy::frag::{fragment, Reassembler, MAX_FRAGMENTS};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let capacity = 1 + usize::from(first % 8);
    let mut r: Reassembler<u8> = Reassembler::new(capacity);
    let mut out = Vec::new();
    // The input as fragments: a length byte, then that many bytes (the first of which
    // also picks one of four senders).
    let mut rest = rest;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (frag, next) = tail.split_at(n);
        let from = frag.first().copied().unwrap_or(0) % 4;
        if r.push(from, frag, &mut out) {
            assert!(out.len() <= MAX_FRAGMENTS * 255);
        }
        assert!(r.pending() <= capacity);
        rest = next;
    }
    // Round trip through 100-byte fragments.
    let mut frags = Vec::new();
    if fragment(data, 7, 100, |f| frags.push(f.to_vec())) {
        let mut r = Reassembler::new(4);
        let mut got = None;
        for f in &frags {
            if r.push(0u8, f, &mut out) {
                got = Some(out.clone());
            }
        }
        assert_eq!(got.as_deref(), Some(data));
    }
});
