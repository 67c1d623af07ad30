//! Any bytes (lossy UTF-8) as the relay's TOML configuration: `Config::parse` and
//! the derived settings must never panic.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shroud_relay::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = Config::parse(&text, Path::new("/etc/shroud/relay.toml")) {
        let _ = cfg.exit_policy();
        let _ = cfg.relay_limits();
        let _ = cfg.io_config();
    }
});
