//! The relay's Elligator2 decode (`shroud_proto::elligator`, its own field
//! arithmetic) against `curve25519-elligator2`'s map on arbitrary 32 bytes: the same
//! Montgomery `u` for every representative, and no arithmetic overflow (fuzz builds
//! keep overflow checks on).
#![no_main]
use curve25519_elligator2::MontgomeryPoint;
use libfuzzer_sys::fuzz_target;
use shroud_proto::elligator::representative_to_u;

fuzz_target!(|data: &[u8]| {
    let mut r = [0u8; 32];
    let n = data.len().min(32);
    r[..n].copy_from_slice(&data[..n]);
    assert_eq!(
        representative_to_u(&r),
        MontgomeryPoint::map_to_point(&r).to_bytes(),
        "representative {r:02x?}"
    );
});
