//! Chunked request bodies: cortex's decoder against hyper's, and cortex's
//! decoder against itself across read boundaries.
//!
//! Input: four bytes of read sizes, then a chunked body (and whatever
//! follows it). The body goes after a fixed chunked request head and
//! through the differential check of `h1_request`; then cortex's body
//! reader is fed the body in pieces of those sizes (as the serving loop
//! feeds it socket reads) and must read what it reads from one piece.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (sizes, body) = data.split_at(4);
    cortex_gateway_fuzz::check_chunked(sizes, body);
});
