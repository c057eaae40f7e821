//! The resolver's config file: `Config::parse` (TOML, then `validate`) on any text: nothing
//! panics, and what a valid config derives (worker counts, panic thresholds, the trust
//! domain) is computed without panicking either. (The gateway's config is left out:
//! building pingora with the sanitizer would more than double the CI's fuzzing time.)
//!
//! Input: one byte (kept for the seed corpus's format), then the text.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let _ = which;
    use waymark_resolver::config::Config;
    if let Ok(config) = Config::parse(text) {
        let _ = config.dns.udp_worker_count();
        let _ = config.panic_thresholds();
        let _ = config.trust_domain();
    }
});
