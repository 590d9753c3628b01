//! What the hub reads from a guard model's answer (Llama Guard and ShieldGemma verdicts),
//! and the text it takes from a request body for the guard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_hub::testing::{guard_input_text, guard_verdicts};

fuzz_target!(|data: &[u8]| {
    let _ = guard_input_text(data);
    let text = String::from_utf8_lossy(data);
    let (llama, gemma) = guard_verdicts(&text);
    if let Some((unsafe_, codes)) = llama {
        assert!(
            unsafe_ || codes.is_empty(),
            "a safe verdict carries categories"
        );
        assert!(codes.iter().all(|c| c.starts_with('S') && c.len() <= 3));
    }
    let _ = gemma;
});
