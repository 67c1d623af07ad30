//! Setup-cell opening on arbitrary bytes: Elligator2 decode of `E`, X25519 with the
//! onion key, the setup layer's GCM open and the routing slot decode must never panic.
//! Every input costs one X25519 (about 100 µs), so this target runs about a hundred
//! times slower than `setup`, which covers the slot decoder alone.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_proto::setup::open_setup;
use shroud_proto::{Layout, RingAead};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let layout = Layout::default();
    let mut cell = vec![0u8; layout.cell];
    let n = data.len().min(layout.cell);
    cell[..n].copy_from_slice(&data[..n]);
    let onion = common::onion();
    let _ = open_setup::<RingAead>(&layout, &onion, onion.public().as_bytes(), &mut cell);
});
