//! Any bytes as the content of a secret key file (`parse_secret_key`, what
//! `read_identity_key_file` / `read_onion_key_file` use after the file checks) and
//! as base64 key text (`decode_key`): never a panic, and an accepted key round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_control::keyfile::parse_secret_key;
use shroud_proto::keys::{decode_key, encode_key, IdentityKey, IdentityPublic, OnionSecret};

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_secret_key(data) {
        let _ = IdentityKey::from_bytes(&key).public();
        let _ = OnionSecret::from_bytes(&key).public();
        let _ = IdentityPublic::from_bytes(&key);
        let line = encode_key(&key);
        assert_eq!(decode_key(&line).as_ref(), Ok(&*key), "round trip");
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(key) = decode_key(&text) {
        assert_eq!(decode_key(&encode_key(&key)), Ok(key), "round trip");
    }
});
