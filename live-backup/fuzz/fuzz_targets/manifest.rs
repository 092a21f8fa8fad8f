//! Any bytes read as a backup manifest: a manifest whose checks hold, or an error; never a
//! panic. What parses writes back to JSON that parses to the same manifest.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use live_backup::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data, Path::new("manifest.json")) {
        assert!(manifest.check().is_ok());
        let text = serde_json::to_vec(&manifest).expect("a parsed manifest serialises");
        let again = Manifest::parse(&text, Path::new("manifest.json")).expect("and parses again");
        assert_eq!(again, manifest);
    }
});
