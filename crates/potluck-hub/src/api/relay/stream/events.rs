//! A relayed stream's events: each read (the fast path over raw top-level values, or the
//! general path for what it cannot borrow) and written back for the consumer.

use bytes::Bytes;
use potluck_protocol::InferenceEndpoint;
use serde_json::Value;

use super::Relay;
use crate::api::now_ms;
use crate::api::relay::chunk::{splice, ChoiceView, TopLevel};
use crate::api::relay::shown::Claim;
use crate::api::relay::whole::answer_text;
use crate::api::relay::{rewrite, shown};
use crate::trust::plausibility::{assess, Usage};

/// What a stream ends with when a chunk names a choice the request did not ask for (an
/// `index` at or past its `n`, or more choices than that in one chunk).
const BEYOND_ASKED: &str = "The provider sent a choice the request did not ask for.";

impl Relay {
    /// Handle one event's data.
    pub(super) fn event(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            return self.done();
        }
        // Fast path: split the top level into raw values, look only at what matters, and
        // copy the rest through as bytes (profiling showed the full JSON tree costing 13%
        // of the hub's CPU per chunk).
        let Ok(top) = serde_json::from_slice::<TopLevel<'_>>(data) else {
            return self.event_slow(data);
        };
        if top.contains_key("error") {
            self.fail(
                "The provider's backend failed during generation.",
                "provider_error",
            );
            return;
        }
        // The provider's usage is read and kept, never relayed as it comes: the stream
        // shows its usage once, before `[DONE]`, when its bill is known (`usage_chunk`).
        let usage = top.get("usage").filter(|u| u.get() != "null");
        let carries_usage = usage.is_some();
        if let Some(u) = usage {
            if let Some(claim) = Claim::read(u.get()) {
                self.usage = Some(claim.counts());
            }
            self.usage_raw = Some(u.get().as_bytes().to_vec());
        }
        let choices: Vec<ChoiceView<'_>> = match top.get("choices") {
            Some(c) => match serde_json::from_str(c.get()) {
                Ok(v) => v,
                Err(_) => {
                    return self.fail("The provider sent a malformed stream.", "provider_error")
                }
            },
            None => Vec::new(),
        };
        self.seen
            .add_slots(choices.len(), choices.iter().map(ChoiceView::index));
        if self.seen.slots > self.ctx.bounds.choices {
            return self.fail(BEYOND_ASKED, "provider_error");
        }
        let has_choices = !choices.is_empty();
        if has_choices && self.ttft.is_none() {
            self.ttft = Some(self.ctx.started.elapsed());
        }
        if !self.take_text(&choices) {
            return;
        }
        if !has_choices && (carries_usage || !self.wants_usage) {
            return;
        }
        let keep_usage = self.wants_usage && !carries_usage;
        let line = splice(
            &top,
            &self.model_json,
            &self.id_json,
            keep_usage,
            data.len(),
        );
        self.emit(Bytes::from(line));
    }

    /// Count a chunk's text against the request's bound, keep it for the audit and the
    /// guard. `false` when the stream failed (more text than the request allows).
    fn take_text(&mut self, choices: &[ChoiceView<'_>]) -> bool {
        let chars: usize = choices.iter().map(ChoiceView::chars).sum();
        if chars > 0 {
            self.seen.chunks += 1;
            self.seen.chars += chars as i64;
            if self.seen.chars > self.ctx.bounds.text_bytes() {
                self.fail(
                    "The provider sent more text than the request allows.",
                    "provider_error",
                );
                return false;
            }
        }
        // A tool call's name comes in a chunk of no text (`chars` counts arguments only).
        if let (Some(sample), Some(c)) = (self.ctx.audit.get_mut(), ChoiceView::zero(choices)) {
            c.keep_for_audit(sample);
        }
        if let Some(g) = &mut self.guard {
            let before = g.window.len();
            for c in choices {
                c.push_text(&mut g.window);
            }
            if g.window.len() > before {
                g.tokens += 1;
            }
        }
        true
    }

    /// The stream's usage chunk, for a consumer that asked for usage: what the stream is
    /// billed if it ends as `completed` says, shown as the provider's own object when
    /// that says the same ([`shown::honest`]).
    pub(super) fn usage_chunk(&self, completed: bool) -> Bytes {
        let endpoint = self.ctx.endpoint;
        let (billed, _) = assess(self.usage, self.seen, completed, endpoint, &self.ctx.bounds);
        let usage = shown::usage_json(self.usage_raw.as_deref(), billed, endpoint);
        let object: &[u8] = if endpoint == InferenceEndpoint::ChatCompletions {
            b"chat.completion.chunk"
        } else {
            b"text_completion"
        };
        let created = (now_ms() / 1000).to_string();
        let mut line = Vec::with_capacity(128 + usage.len());
        for part in [
            &b"data: {\"id\":"[..],
            &self.id_json,
            b",\"object\":\"",
            object,
            b"\",\"created\":",
            created.as_bytes(),
            b",\"model\":",
            &self.model_json,
            b",\"choices\":[],\"usage\":",
            &usage,
            b"}\n\n",
        ] {
            line.extend_from_slice(part);
        }
        Bytes::from(line)
    }

    /// The general path, for events the fast path cannot borrow (escaped keys).
    fn event_slow(&mut self, data: &[u8]) {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(data) else {
            self.fail("The provider sent a malformed stream.", "provider_error");
            return;
        };
        if obj.contains_key("error") {
            self.fail(
                "The provider's backend failed during generation.",
                "provider_error",
            );
            return;
        }
        if let Some(u) = Usage::from_obj(&obj) {
            self.usage = Some(u);
        }
        let has_choices = obj
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if has_choices && self.ttft.is_none() {
            self.ttft = Some(self.ctx.started.elapsed());
        }
        self.seen.add_text_of(&obj);
        if self.seen.slots > self.ctx.bounds.choices {
            return self.fail(BEYOND_ASKED, "provider_error");
        }
        if self.seen.chars > self.ctx.bounds.text_bytes() {
            return self.fail(
                "The provider sent more text than the request allows.",
                "provider_error",
            );
        }
        self.ctx
            .delivered(crate::routing::send::choice_zero(obj.get("choices")));
        if let Some(g) = &mut self.guard {
            let text = answer_text(&obj);
            if !text.is_empty() {
                g.window.push_str(&text);
                g.tokens += 1;
            }
        }
        let carries_usage = obj.get("usage").is_some_and(|u| !u.is_null());
        if let Some(u) = obj.get("usage").filter(|_| carries_usage) {
            self.usage_raw = Some(u.to_string().into_bytes());
        }
        if !self.wants_usage || carries_usage {
            obj.remove("usage");
            if !has_choices {
                return;
            }
        }
        rewrite(&mut obj, &self.ctx);
        match serde_json::to_vec(&Value::Object(obj)) {
            Ok(json) => {
                let mut line = Vec::with_capacity(json.len() + 8);
                line.extend_from_slice(b"data: ");
                line.extend_from_slice(&json);
                line.extend_from_slice(b"\n\n");
                self.emit(Bytes::from(line));
            }
            Err(_) => self.fail("The hub could not relay the stream.", "internal_error"),
        }
    }
}
