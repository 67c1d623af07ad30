//! Setup-cell parsing: the routing slot decoder and the setup layer opener on
//! arbitrary bytes must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_proto::setup::{open_setup, Routing};
use shroud_proto::{Layout, RingAead};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let _ = Routing::decode(data);
    if data.len() >= 112 {
        if let Ok(r) = Routing::decode(&data[..112]) {
            // Canonical: what decodes re-encodes to the same bytes.
            assert_eq!(&r.encode()[..], &data[..112]);
        }
    }
    let layout = Layout::default();
    let mut cell = vec![0u8; layout.cell];
    let n = data.len().min(layout.cell);
    cell[..n].copy_from_slice(&data[..n]);
    let onion = common::onion();
    let _ = open_setup::<RingAead>(&layout, &onion, onion.public().as_bytes(), &mut cell);
});
