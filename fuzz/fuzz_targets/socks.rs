//! shroud-proxy's SOCKS5 front end: the negotiation, authentication and request
//! parser (run over the input as a whole connection), the UDP ASSOCIATE header
//! parser and the stream request decoder. Never a panic; the proxy writes back only
//! its fixed-size method and authentication replies; a request that comes out names
//! CONNECT or UDP ASSOCIATE and a target that encodes back to what it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_proxy::socks::{negotiate, parse_udp};
use shroud_proxy::wire::Target;

fuzz_target!(|data: &[u8]| {
    let (outcome, written) = negotiate(data);
    assert!(written.len() <= 4, "wrote {written:?}");
    if let Ok((cmd, target)) = outcome {
        assert!(matches!(cmd, 1 | 3), "command {cmd}");
        let mut enc = Vec::new();
        target.encode_addr(&mut enc);
        assert_eq!(Target::decode_addr(&enc), Ok(Some((target, enc.len()))));
    }
    if let Some((_, payload)) = parse_udp(data) {
        assert!(data.ends_with(payload) && payload.len() < data.len());
    }
    let _ = Target::decode(data);
});
