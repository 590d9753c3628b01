//! The consumer's request body, as the hub and the agent read it
//! (`InferenceRequest::parse`), on every endpoint; then the agent's own check and rewrite
//! of what passed. Must never panic; what the agent forwards must parse again.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use potluck_agent::request::{check, ModelCaps};
use potluck_protocol::{InferenceEndpoint, InferenceRequest, RequestLimits};

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits::new(1 << 20);
    for endpoint in InferenceEndpoint::ALL {
        let parsed = InferenceRequest::parse(endpoint, data, &limits);
        if let Ok(req) = &parsed {
            let _ = req.check_limits(&potluck_protocol::ModelLimits {
                max_tokens: Some(64),
                max_context: Some(256),
            });
        }
        let caps = ModelCaps {
            backend_name: "backend-model",
            max_tokens: Some(64),
            max_context: None,
        };
        if let Ok(out) = check(endpoint, Bytes::copy_from_slice(data), &caps, &limits) {
            assert!(
                parsed.is_ok(),
                "the agent forwarded what the shared rules refuse"
            );
            // What goes to the backend passes the same rules again.
            assert!(InferenceRequest::parse(endpoint, &out, &limits).is_ok());
        }
    }
});
