//! The peer-list parser on arbitrary text: never panics, and whatever parses encodes
//! back to the same bytes (the document is canonical).
#![no_main]
use libfuzzer_sys::fuzz_target;
use shroud_proto::peerlist::PeerList;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(list) = PeerList::parse(text) {
            assert_eq!(list.encode(), text);
        }
    }
});
