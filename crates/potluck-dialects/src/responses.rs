//! OpenAI's Responses API (`POST /v1/responses`) onto chat completions, and chat
//! completion answers and chunks back into response objects and events.
//!
//! The hub stores nothing, so `store` is ignored and every response says `"store": false`,
//! and `previous_response_id` (which needs stored responses) is refused with a 400 that
//! says so. `input` may be a string or a list of items (messages with `input_text` and
//! inline `input_image` parts, `function_call` and `function_call_output` items);
//! `instructions` becomes the system message; function tools map one to one.

mod answer;
mod request;
mod stream;
mod wire;

pub use answer::*;
pub use request::*;
pub use stream::*;

#[cfg(test)]
mod tests;
