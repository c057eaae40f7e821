//! The config files: the resolver's `Config::parse` (TOML, then `validate`) and the gateway's
//! `Config::parse` then `validate`, on any text: nothing panics, and what a valid config
//! derives (worker counts, route names) is computed without panicking either.
//!
//! Input: one byte choosing the resolver's (even) or the gateway's (odd) config, then the text.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if which & 1 == 0 {
        use waymark_resolver::config::Config;
        if let Ok(config) = Config::parse(text) {
            let _ = config.dns.udp_worker_count();
            let _ = config.panic_threshold("payment");
        }
    } else {
        use waymark_gateway::config::Config;
        if let Ok(config) = Config::parse(text) {
            if config.validate().is_ok() {
                for r in &config.routes {
                    let _ = r.display_name();
                }
            }
        }
    }
});
