//! Any text parses as an InitEx configuration file or gives a line-numbered error; what parses
//! is written back and read again to the same value. The checked parse agrees with the plain one,
//! and strict checking fails exactly when the lenient one warns.
#![no_main]

use disk_transport::{Config, ConfigCheck};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::check(text, ConfigCheck::Lenient) {
            Ok((config, warnings)) => {
                assert_eq!(text.parse::<Config>().ok(), Some(config));
                assert_eq!(
                    Config::check(text, ConfigCheck::Strict).is_ok(),
                    warnings.is_empty()
                );
            }
            Err(_) => assert!(text.parse::<Config>().is_err()),
        }
        if let Ok(config) = text.parse::<Config>() {
            // Values containing quotes cannot be written back quoted; the rest must round-trip.
            if config.extra.iter().all(|(_, v)| !v.contains('"'))
                && config
                    .tmp_directory
                    .as_ref()
                    .is_none_or(|p| !p.to_string_lossy().contains('"'))
            {
                let again: Config = config.to_string().parse().expect("written config parses");
                assert_eq!(again, config);
            }
        }
    }
});
