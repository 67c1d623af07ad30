//! Setup routing-slot parsing: the decoder of a hop's decrypted routing slot must never
//! panic, and what it accepts must re-encode to the same bytes (one content, one
//! encoding). No public-key work, so long runs reach 10^7 inputs; the opener that
//! precedes it (Elligator2 decode, X25519, the setup layer) has its own target,
//! `setup_open`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_proto::setup::Routing;

fuzz_target!(|data: &[u8]| {
    let _ = Routing::decode(data);
    if data.len() >= 112 {
        if let Ok(r) = Routing::decode(&data[..112]) {
            // Canonical: what decodes re-encodes to the same bytes.
            assert_eq!(&r.encode()[..], &data[..112]);
        }
    }
});
