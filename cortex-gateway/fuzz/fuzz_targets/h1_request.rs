//! Differential fuzz target: the bytes a client sends on one connection,
//! read by cortex's front end and by hyper's HTTP/1 server. Any difference
//! that no rule in `src/lib.rs` allows panics (see that file).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cortex_gateway_fuzz::check(data);
});
