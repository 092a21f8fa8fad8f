//! Any bytes as the raw reply of the host, through the whole client stack (simulated host,
//! RPCI channel, version fallback, decoders): an error or statistics, never a panic or hang.
#![no_main]

use guest_stats::vmware::sim::SimHost;
use guest_stats::vmware::VmwareGuestStats;
use guest_stats::GuestStats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reply = data.to_vec();
    let mut stats = VmwareGuestStats::with_backdoor(SimHost::new(move |_| reply.clone()));
    if stats.update().is_ok() {
        let _ = stats.snapshot();
    }
});
