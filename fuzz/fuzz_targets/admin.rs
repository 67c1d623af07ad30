//! Any bytes (lossy UTF-8) as one admin socket request line: `Request::parse` must
//! never panic, a request it accepts prints back to a line that parses to the same
//! request, and its error reply is a JSON object with `"ok": false`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_admin::{Reply, Request};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The socket loop hands over one line at a time.
    for line in text.lines() {
        match Request::parse(line) {
            Ok(req) => assert_eq!(Request::parse(&req.to_line()), Ok(req)),
            Err(message) => {
                let reply: serde_json::Value =
                    serde_json::from_str(&Reply::error(message).to_line()).unwrap();
                assert_eq!(reply["ok"], false, "error reply {reply}");
            }
        }
    }
});
