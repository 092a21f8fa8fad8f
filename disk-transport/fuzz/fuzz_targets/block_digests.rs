//! Any bytes as a stored table of block digests (a backup's `.blkdigests` file): refused with
//! an error, or read as a table whose encoding is exactly those bytes and whose block hash can
//! be computed; never a panic or an allocation larger than the input.
#![no_main]

use disk_transport::blkhash::{BlkHasher, BlockDigests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(digests) = BlockDigests::from_bytes(data) {
        assert_eq!(digests.to_bytes(), data);
        let hash = digests.blkhash();
        assert_eq!(hash.size(), digests.size());
        // A resumed hasher given nothing new gives the same hash.
        let again = BlkHasher::resume(digests.clone());
        assert_eq!(again.finish().expect("nothing partial"), hash);
    }
});
