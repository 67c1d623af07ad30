//! Any bytes (lossy UTF-8) as one admin socket request line: `parse_admin_request`
//! must never panic and its error replies are JSON objects with `"ok": false`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_relay::daemon::parse_admin_request;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The socket loop hands over one line at a time.
    for line in text.lines() {
        if let Err(reply) = parse_admin_request(line) {
            assert_eq!(reply["ok"], false, "error reply {reply}");
        }
    }
});
