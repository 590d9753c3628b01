//! The agent's allow-list of what the hub may ask it (`InferenceEndpoint::from_method_path`):
//! a method and a raw request target, split at the first space. Only the exact pairs pass.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_protocol::InferenceEndpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, target) = text.split_once(' ').unwrap_or((text, ""));
    if let Some(e) = InferenceEndpoint::from_method_path(method, target) {
        assert_eq!(e.method(), method);
        assert_eq!(e.path(), target, "a path off the allow-list passed");
    }
});
