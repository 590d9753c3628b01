//! The hub's parser of a provider's SSE stream (`potluck_hub::testing::sse_parse`). The
//! first byte picks where the rest is cut in pieces; the events must not depend on the
//! cuts, and no event may pass the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_hub::testing::sse_parse;

const MAX: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let whole = sse_parse(&[wire], MAX);
    let pieces: Vec<&[u8]> = wire.chunks(step).collect();
    let cut = sse_parse(&pieces, MAX);
    if let (Ok(a), Ok(b)) = (&whole, &cut) {
        assert_eq!(a, b, "events depend on where the stream is cut");
    }
    for events in [whole, cut].into_iter().flatten() {
        assert!(events.iter().all(|e| e.len() <= MAX));
    }
});
