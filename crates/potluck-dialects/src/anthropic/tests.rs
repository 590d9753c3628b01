use super::*;
use crate::openai::{Chunk, Completion};
use crate::{DialectError, Finish, Usage};
use proptest::prelude::*;
use serde_json::{json, Value};

fn req(v: Value) -> Result<Request, DialectError> {
    to_openai(v.to_string().as_bytes())
}

fn chunk(v: Value) -> Chunk {
    Chunk::parse(v.to_string().as_bytes()).expect("chunk")
}

#[test]
fn a_plain_request_maps_system_turns_and_sampling() {
    let r = req(json!({
        "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": [{"type": "text", "text": "more"}]}],
        "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"], "metadata": {"user_id": "x"}
    }))
    .expect("valid");
    assert_eq!(r.model, "m");
    assert!(!r.stream);
    assert_eq!(
        r.openai,
        json!({"model": "m", "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "stop": ["END"],
               "messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": [{"type": "text", "text": "more"}]}]})
    );
}

#[test]
fn system_turns_between_messages_become_system_messages() {
    let r = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "reminder", "cache_control": {"type": "ephemeral"}}]}]}))
    .expect("valid");
    assert_eq!(
        r.openai["messages"][1],
        json!({"role": "system", "content": "reminder"})
    );
}

#[test]
fn streaming_asks_the_provider_for_usage() {
    let r =
        req(json!({"model": "m", "max_tokens": 1, "stream": true, "messages": []})).expect("valid");
    assert!(r.stream);
    assert_eq!(r.openai["stream_options"], json!({"include_usage": true}));
}

#[test]
fn tool_use_and_tool_result_become_tool_calls_and_tool_messages() {
    let r = req(json!({
        "model": "m", "max_tokens": 64,
        "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3C"}]},
                {"type": "text", "text": "thanks"}]}
        ]
    }))
    .expect("valid");
    let o = &r.openai;
    assert_eq!(o["tool_choice"], json!("required"));
    assert_eq!(o["parallel_tool_calls"], json!(false));
    assert_eq!(o["tools"][0]["function"]["name"], json!("get_weather"));
    assert_eq!(
        o["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
        json!("string")
    );
    let msgs = o["messages"].as_array().expect("messages");
    assert_eq!(msgs[1]["tool_calls"][0]["id"], json!("toolu_1"));
    let args: Value = serde_json::from_str(
        msgs[1]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .expect("text"),
    )
    .expect("json");
    assert_eq!(args, json!({"city": "Oslo"}));
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "-3C"})
    );
    assert_eq!(
        msgs[3],
        json!({"role": "user", "content": [{"type": "text", "text": "thanks"}]})
    );
}

#[test]
fn images_travel_inline_only() {
    let ok = req(json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]}]}))
    .expect("valid");
    assert_eq!(
        ok.openai["messages"][0]["content"][0]["image_url"]["url"],
        json!("data:image/png;base64,iVBO")
    );
    let remote = req(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/x.png"}}]}]}),
    )
    .expect_err("remote image refused");
    assert_eq!(remote.param(), Some("messages.0.content.0.source"));
}

#[test]
fn bad_requests_name_the_field_without_echoing_text() {
    let secret = "CANARY-9f3";
    let cases = [
        (json!({"max_tokens": 1, "messages": []}), "model"),
        (json!({"model": "m", "messages": []}), "max_tokens"),
        (
            json!({"model": "m", "max_tokens": -1, "messages": []}),
            "max_tokens",
        ),
        (json!({"model": "m", "max_tokens": 1}), "messages"),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "robot", "content": secret}]}),
            "messages.0.role",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": secret}]}]}),
            "messages.0.content.0",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "w"}]}),
            "tools.0",
        ),
    ];
    for (body, field) in cases {
        let err = req(body).expect_err("invalid");
        assert_eq!(err.param(), Some(field), "{err}");
        assert!(!err.to_string().contains(secret));
    }
    assert!(matches!(
        to_openai(b"{not json"),
        Err(DialectError::Json(_))
    ));
    assert!(matches!(to_openai(b"[1]"), Err(DialectError::Json(_))));
}

#[test]
fn a_whole_answer_becomes_a_message_with_billed_usage() {
    let answer = Completion::parse(
        json!({"id": "chatcmpl-abc", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "let me see",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 999, "completion_tokens": 999}})
        .to_string()
        .as_bytes(),
    )
    .expect("answer");
    let msg = from_openai(
        &answer,
        "m",
        false,
        &[],
        Usage {
            input: 12,
            output: 7,
        },
    );
    assert_eq!(msg["id"], json!("msg_chatcmpl-abc"));
    assert_eq!(msg["stop_reason"], json!("tool_use"));
    assert_eq!(
        msg["content"][0],
        json!({"type": "text", "text": "let me see"})
    );
    assert_eq!(
        msg["content"][1],
        json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}})
    );
    assert_eq!(
        msg["usage"],
        json!({"input_tokens": 12, "output_tokens": 7})
    );
}

#[test]
fn finish_reasons_map_to_stop_reasons() {
    assert_eq!(stop_reason(Finish::from_openai("stop")), "end_turn");
    assert_eq!(stop_reason(Finish::from_openai("length")), "max_tokens");
    assert_eq!(stop_reason(Finish::from_openai("tool_calls")), "tool_use");
    assert_eq!(
        stop_reason(Finish::from_openai("content_filter")),
        "refusal"
    );
}

fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.name).collect()
}

#[test]
fn a_text_stream_has_anthropics_event_order() {
    let mut s = Stream::new("m", false);
    let mut all = Vec::new();
    all.extend(s.chunk(&chunk(
        json!({"id": "c1", "choices": [{"delta": {"role": "assistant", "content": ""}}]}),
    )));
    all.extend(s.chunk(&chunk(
        json!({"id": "c1", "choices": [{"delta": {"content": "Hel"}}]}),
    )));
    all.extend(s.chunk(&chunk(
        json!({"id": "c1", "choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]}),
    )));
    all.extend(s.chunk(&chunk(
        json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
    )));
    all.extend(s.finish(Usage {
        input: 3,
        output: 2,
    }));
    assert_eq!(
        names(&all),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(all[0].data["message"]["id"], json!("msg_c1"));
    assert_eq!(
        all[3].data["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(all[6].data["delta"]["stop_reason"], json!("max_tokens"));
    assert_eq!(all[6].data["usage"]["output_tokens"], json!(2));
    let sse = String::from_utf8(all[7].to_sse()).expect("utf8");
    assert_eq!(
        sse,
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    );
}

#[test]
fn streamed_tool_calls_become_tool_use_blocks_with_json_deltas() {
    let mut s = Stream::new("m", false);
    let mut all = Vec::new();
    all.extend(s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"content": "ok"}}]}),
    )));
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}]}}]}))));
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}}]}))));
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}))));
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]}))));
    all.extend(s.finish(Usage::default()));
    assert_eq!(
        names(&all),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(all[5].data["index"], json!(1));
    assert_eq!(
        all[5].data["content_block"],
        json!({"type": "tool_use", "id": "call_a", "name": "f", "input": {}})
    );
    // The arguments come whole, when the block closes: always an object.
    assert_eq!(
        all[6].data["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"x\":1}"})
    );
    assert_eq!(all[8].data["index"], json!(2));
    assert_eq!(all[11].data["delta"]["stop_reason"], json!("tool_use"));
}

#[test]
fn streamed_arguments_cut_off_or_not_an_object_still_make_an_object() {
    let mut s = Stream::new("m", false);
    let mut all = s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{\"x\": [1, 2"}}]}, "finish_reason": "length"}]})));
    all.extend(s.finish(Usage::default()));
    let delta = all
        .iter()
        .find(|e| e.name == "content_block_delta")
        .expect("a delta");
    let input: Value =
        serde_json::from_str(delta.data["delta"]["partial_json"].as_str().unwrap()).unwrap();
    assert_eq!(input, json!({"_raw": "{\"x\": [1, 2"}));
}

#[test]
fn an_empty_stream_still_opens_and_closes_the_message() {
    let mut s = Stream::new("m", false);
    assert_eq!(
        names(&s.finish(Usage::default())),
        ["message_start", "ping", "message_delta", "message_stop"]
    );
}

#[test]
fn errors_take_anthropics_types_and_statuses() {
    assert_eq!(
        error_body(401, "bad key")["error"]["type"],
        json!("authentication_error")
    );
    assert_eq!(
        error_body(429, "slow down")["error"]["type"],
        json!("rate_limit_error")
    );
    assert_eq!(error_type(503), "overloaded_error");
    assert_eq!(error_status(503, Some("no_capacity")), 529);
    assert_eq!(error_status(429, Some("rate_limit_exceeded")), 429);
    assert_eq!(error_status(429, Some("insufficient_quota")), 402);
    assert_eq!(error_type(402), "billing_error");
    for other_client_error in [400, 405, 408, 409, 415, 422] {
        assert_eq!(error_type(other_client_error), "invalid_request_error");
    }
    assert_eq!(error_type(500), "api_error");
    assert_eq!(error_type(504), "timeout_error");
    assert_eq!(error_body(413, "big")["type"], json!("error"));
}

proptest! {
    #[test]
    fn no_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = to_openai(&bytes);
    }

    #[test]
    fn no_panic_on_arbitrary_json_shapes(model in ".{0,8}", n in any::<i64>(), text in ".{0,16}", ty in "[a-z_]{0,12}") {
        let body = json!({"model": model, "max_tokens": n, "system": [{"type": ty, "text": text}],
            "messages": [{"role": "user", "content": [{"type": ty, "text": text, "source": {"type": ty}}]},
                         {"role": "assistant", "content": [{"type": ty, "id": text, "name": text}]}],
            "tools": [{"name": text}], "tool_choice": {"type": ty}});
        let _ = to_openai(body.to_string().as_bytes());
    }
}

#[test]
fn a_named_tool_choice_becomes_required_with_only_that_tool() {
    let tools = json!([{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}]);
    let r = req(
        json!({"model": "m", "max_tokens": 1, "messages": [], "tools": tools,
                       "tool_choice": {"type": "tool", "name": "b"}}),
    )
    .expect("valid");
    assert_eq!(r.openai["tool_choice"], json!("required"));
    assert_eq!(r.openai["tools"].as_array().map(Vec::len), Some(1));
    assert_eq!(r.openai["tools"][0]["function"]["name"], json!("b"));
    let unknown = req(
        json!({"model": "m", "max_tokens": 1, "messages": [], "tools": tools,
                             "tool_choice": {"type": "tool", "name": "zzz"}}),
    );
    assert_eq!(
        unknown.expect_err("no such tool").param(),
        Some("tool_choice")
    );
}

#[test]
fn tool_uses_without_ids_get_ids_unique_across_answers() {
    let answer = |id: &str| {
        Completion::parse(
            json!({"id": id, "choices": [{"finish_reason": "tool_calls", "message": {
                "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}}]})
            .to_string()
            .as_bytes(),
        )
        .expect("answer")
    };
    let a = from_openai(&answer("chatcmpl-1"), "m", false, &[], Usage::default());
    let b = from_openai(&answer("chatcmpl-2"), "m", false, &[], Usage::default());
    assert_eq!(a["content"][0]["id"], json!("toolu_chatcmpl-1_0"));
    assert_ne!(a["content"][0]["id"], b["content"][0]["id"]);
    // Arguments that are not an object are kept, inside one.
    assert_eq!(a["content"][0]["input"], json!({"_raw": "[1]"}));
}

/// A reasoning model's thinking (llama.cpp's `reasoning_content`) is shown as Anthropic
/// shows it, a `thinking` block before the text, when the consumer turned extended
/// thinking on; otherwise it is left out, as Anthropic leaves it out.
#[test]
fn a_reasoning_models_thinking_is_a_thinking_block_when_asked_for() {
    let on = req(json!({"model": "m", "max_tokens": 9, "messages": [],
                        "thinking": {"type": "enabled", "budget_tokens": 2048}}));
    assert!(on.unwrap().thinking);
    let adaptive = req(json!({"model": "m", "max_tokens": 9, "messages": [],
                              "thinking": {"type": "adaptive"}}));
    assert!(adaptive.unwrap().thinking);
    for off in [json!(null), json!({"type": "disabled"})] {
        let r = req(json!({"model": "m", "max_tokens": 9, "messages": [], "thinking": off}));
        assert!(!r.unwrap().thinking);
    }
    for bad in [
        json!(true),
        json!({"type": "maybe"}),
        json!({"type": "enabled", "budget_tokens": -1}),
    ] {
        let r = req(json!({"model": "m", "max_tokens": 9, "messages": [], "thinking": bad}));
        assert!(matches!(r, Err(DialectError::Invalid { .. })), "{r:?}");
    }

    let whole = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "stop",
               "message": {"content": "4", "reasoning_content": "2+2"}}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let shown = from_openai(&whole, "m", true, &[], Usage::default());
    assert_eq!(
        shown["content"],
        json!([{"type": "thinking", "thinking": "2+2", "signature": ""},
               {"type": "text", "text": "4"}])
    );
    let hidden = from_openai(&whole, "m", false, &[], Usage::default());
    assert_eq!(hidden["content"], json!([{"type": "text", "text": "4"}]));

    let mut s = Stream::new("m", true);
    let mut all = Vec::new();
    for delta in [
        json!({"reasoning_content": "hm"}),
        json!({"reasoning_content": "m"}),
        json!({"content": "4"}),
    ] {
        all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": delta}]}))));
    }
    all.extend(s.finish(Usage::default()));
    assert_eq!(
        names(&all),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(
        all[2].data["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert_eq!(
        all[3].data["delta"],
        json!({"type": "thinking_delta", "thinking": "hm"})
    );
    assert_eq!(
        (all[5].data["index"].clone(), all[6].data["index"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(
        all[7].data["delta"],
        json!({"type": "text_delta", "text": "4"})
    );

    let mut quiet = Stream::new("m", false);
    let events = quiet.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"reasoning_content": "hm"}}]}),
    ));
    assert!(
        events.iter().all(|e| e.name != "content_block_start"),
        "no block for thinking nobody asked to see"
    );
}

/// Ollama's OpenAI-compatible API and newer vLLM send the thinking as `reasoning`, not
/// `reasoning_content`: it is a thinking block too, whole and streamed, and shown once
/// when a server sends it under both names. Before, it was dropped.
#[test]
fn thinking_sent_as_reasoning_is_a_thinking_block_too() {
    let parse = |message: Value| {
        let answer = json!({"id": "c", "choices": [{"finish_reason": "stop", "message": message}]});
        Completion::parse(answer.to_string().as_bytes()).unwrap()
    };
    let block = json!({"type": "thinking", "thinking": "2+2", "signature": ""});
    let text = json!({"type": "text", "text": "4"});
    for message in [
        json!({"content": "4", "reasoning": "2+2"}),
        json!({"content": "4", "reasoning": "2+2", "reasoning_content": "2+2"}),
    ] {
        let shown = from_openai(&parse(message.clone()), "m", true, &[], Usage::default());
        assert_eq!(shown["content"], json!([block, text]), "{message}");
    }
    let mut s = Stream::new("m", true);
    let events = s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"reasoning": "hm"}}]}),
    ));
    assert!(
        events
            .iter()
            .any(|e| e.data["delta"] == json!({"type": "thinking_delta", "thinking": "hm"})),
        "{events:?}"
    );
}

/// A reasoning model thinks for minutes where the consumer did not ask to see it: the
/// stream is not silent meanwhile (a proxy that closes idle connections would cut it), a
/// `ping` goes out every `QUIET_CHUNKS_PER_PING` chunks that gave nothing, and the count
/// starts again after anything sent.
#[test]
fn hidden_thinking_keeps_the_stream_alive_with_pings() {
    use crate::anthropic::QUIET_CHUNKS_PER_PING;
    let mut s = Stream::new("m", false);
    let think = chunk(json!({"id": "c", "choices": [{"delta": {"reasoning_content": "hm"}}]}));
    let text = chunk(json!({"id": "c", "choices": [{"delta": {"content": "4"}}]}));
    let mut all = s.chunk(&text);
    let n = QUIET_CHUNKS_PER_PING * 3 + 5;
    for _ in 0..n {
        all.extend(s.chunk(&think));
    }
    let pings = all.iter().filter(|e| e.name == "ping").count();
    assert_eq!(pings, 1 + 3, "the opening ping, then one per quiet run");
    let mut s = Stream::new("m", false);
    s.chunk(&text);
    for i in 0..QUIET_CHUNKS_PER_PING * 2 {
        let events = if i % 10 == 9 {
            s.chunk(&text)
        } else {
            s.chunk(&think)
        };
        assert!(
            events.iter().all(|e| e.name != "ping"),
            "never quiet for long"
        );
    }
}

/// `message_start` carries the prompt's size the hub estimated (clients read a
/// conversation's size there); the billed figures come in `message_delta`.
#[test]
fn message_start_shows_the_hubs_prompt_estimate() {
    let mut s = Stream::new("m", false).with_input_estimate(42);
    let start = s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"content": "a"}}]}),
    ));
    assert_eq!(start[0].name, "message_start");
    assert_eq!(
        start[0].data["message"]["usage"],
        json!({"input_tokens": 42, "output_tokens": 0})
    );
    let end = s.finish(Usage {
        input: 40,
        output: 1,
    });
    let delta = end.iter().find(|e| e.name == "message_delta").unwrap();
    assert_eq!(
        delta.data["usage"],
        json!({"input_tokens": 40, "output_tokens": 1})
    );
}

/// Older vLLM (with `tool_choice` required) and some mlx servers end a tool call with
/// `finish_reason: "stop"`; an agent loop that waits for `stop_reason == "tool_use"` then
/// stopped with the call unanswered. An answer holding tool calls is a tool use.
#[test]
fn tool_calls_finished_with_stop_are_a_tool_use_whole_and_streamed() {
    let answer = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "stop", "message": {"content": null,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]})
        .to_string()
        .as_bytes(),
    )
    .expect("answer");
    let msg = from_openai(&answer, "m", false, &[], Usage::default());
    assert_eq!(msg["stop_reason"], json!("tool_use"));

    let mut s = Stream::new("m", false);
    let mut all = s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}}]})));
    all.extend(s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {}, "finish_reason": "stop"}]}),
    )));
    all.extend(s.finish(Usage::default()));
    let delta = all
        .iter()
        .find(|e| e.name == "message_delta")
        .expect("delta");
    assert_eq!(delta.data["delta"]["stop_reason"], json!("tool_use"));

    // A call cut by the token limit is still the limit's.
    let mut s = Stream::new("m", false);
    s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{"}}]}, "finish_reason": "length"}]})));
    let end = s.finish(Usage::default());
    let delta = end
        .iter()
        .find(|e| e.name == "message_delta")
        .expect("delta");
    assert_eq!(delta.data["delta"]["stop_reason"], json!("max_tokens"));
}

fn png(n: usize) -> Vec<Value> {
    vec![
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}});
        n
    ]
}

/// Anthropic's requests are held to the same image count as Ollama's ([`crate::MAX_IMAGES`]
/// over the whole request), counted before any is translated, refused in Anthropic's
/// words (a 400 naming `messages`).
#[test]
fn at_most_max_images_in_one_request() {
    let half = crate::MAX_IMAGES / 2;
    let rest = crate::MAX_IMAGES - half;
    let turns = |extra: usize| {
        json!({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": png(half)},
            {"role": "assistant", "content": "seen"},
            {"role": "user", "content": png(rest + extra)}]})
    };
    req(turns(0)).expect("the most images");
    let e = req(turns(1)).expect_err("one too many");
    assert_eq!(e.param(), Some("messages"));
    assert!(e.to_string().contains(crate::TOO_MANY_IMAGES), "{e}");
}

/// Claude Code's Read tool on a PNG answers with an image block in the tool result: it was
/// refused ("tool results may carry text only"), and as it stays in the client's history
/// every later turn failed too. The text stays in the `tool` message; the images follow
/// all of the turn's tool messages in one `user` message (chat completions wants the tool
/// messages right after the call), inline only and counted with the request's others.
#[test]
fn tool_result_images_follow_the_tool_messages_in_a_user_message() {
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}});
    let r = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "read both"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "Read", "input": {"file_path": "a.png"}},
            {"type": "tool_use", "id": "t2", "name": "Read", "input": {"file_path": "b.txt"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.png:"}, image.clone()]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "no such file", "is_error": true},
            {"type": "text", "text": "and?"}]}]}))
    .expect("valid");
    let msgs = r.openai["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 5, "{msgs:?}");
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "tool_call_id": "t1",
               "content": "a.png:\n[1 image(s): in the next user message]"})
    );
    assert_eq!(
        msgs[3],
        json!({"role": "tool", "tool_call_id": "t2", "content": "Error: no such file"}),
        "is_error is said, not dropped"
    );
    assert_eq!(
        msgs[4],
        json!({"role": "user", "content": [
            {"type": "text", "text": "Images of the result of tool call t1:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            {"type": "text", "text": "and?"}]})
    );

    // One turn's results split over two user turns (Anthropic joins them): every tool
    // message still follows the calls, the images and text after them all.
    let split = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "read both"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "Read", "input": {}},
            {"type": "tool_use", "id": "t2", "name": "Read", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [image.clone()]},
            {"type": "text", "text": "first"}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t2", "content": "b"}]}]}))
    .expect("valid");
    let roles: Vec<_> = split.openai["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["role"].clone(), m["tool_call_id"].clone()))
        .collect();
    assert_eq!(
        roles,
        [
            (json!("user"), json!(null)),
            (json!("assistant"), json!(null)),
            (json!("tool"), json!("t1")),
            (json!("tool"), json!("t2")),
            (json!("user"), json!(null)),
        ]
    );

    // System text between the calls and their results (Claude Code's reminders): the
    // results still follow the calls, the system text after them.
    let between = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "read"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
        {"role": "system", "content": "a reminder"},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "a"},
            {"type": "text", "text": "go on"}]}]}))
    .expect("valid");
    let roles: Vec<_> = between.openai["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "system", "user"]);

    // The same rules as a turn's own images: inline only, and counted with them.
    let remote = req(
        json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/x.png"}}]}]}]}),
    )
    .expect_err("remote image refused");
    assert_eq!(
        remote.param(),
        Some("messages.0.content.0.content.0.source")
    );
    let many = |n: usize| {
        json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": png(n)},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]}]})
    };
    req(many(crate::MAX_IMAGES - 1)).expect("the most images");
    let e = req(many(crate::MAX_IMAGES)).expect_err("one too many");
    assert_eq!(e.param(), Some("messages"));
}

/// Anthropic lets turns of one role follow each other (and joins them itself); strict
/// chat templates (Gemma, Mistral) refuse turns that do not alternate. Consecutive user
/// turns are one message, consecutive assistant turns too; tool messages stay apart.
#[test]
fn consecutive_turns_of_one_role_are_one_message() {
    let r = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "thinking it over"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}]},
        {"role": "user", "content": [{"type": "text", "text": "c"}]},
        {"role": "user", "content": "d"}]}))
    .expect("valid");
    let m = r.openai["messages"].as_array().expect("messages");
    let roles: Vec<_> = m.iter().map(|m| m["role"].as_str().unwrap_or("")).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "user"]);
    assert_eq!(m[0]["content"], json!("a\n\nb"));
    assert_eq!(m[1]["content"], json!("thinking it over"));
    assert_eq!(m[1]["tool_calls"][0]["id"], json!("t1"));
    assert_eq!(
        m[3]["content"],
        json!([{"type": "text", "text": "c"}, {"type": "text", "text": "d"}])
    );
}

/// Anthropic's structured outputs (`output_config.format`, and the beta's `output_format`)
/// were dropped: the client asked for JSON of a schema and got free text. They are chat
/// completions' `response_format` of that schema.
#[test]
fn structured_outputs_become_a_response_format() {
    let schema =
        json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
    let want = json!({"type": "json_schema", "json_schema": {"name": OUTPUT_SCHEMA_NAME, "schema": schema}});
    let format = json!({"type": "json_schema", "schema": schema});
    let base = |key: &str, v: Value| {
        let mut body =
            json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
        body[key] = v;
        req(body)
    };
    let ga = base("output_config", json!({"format": format, "effort": "low"})).expect("valid");
    assert_eq!(ga.openai["response_format"], want);
    let beta = base("output_format", format.clone()).expect("valid");
    assert_eq!(beta.openai["response_format"], want);
    let none = base("output_config", json!({"effort": "low"})).expect("valid");
    assert_eq!(none.openai.get("response_format"), None);

    let e = base("output_format", json!({"type": "yaml"})).expect_err("unknown type");
    assert_eq!(e.param(), Some("output_format.type"));
    let e =
        base("output_config", json!({"format": {"type": "json_schema"}})).expect_err("no schema");
    assert_eq!(e.param(), Some("output_config.format.schema"));
    let e = base("output_config", json!("json")).expect_err("not an object");
    assert_eq!(e.param(), Some("output_config"));
}

/// vLLM names the stop string an answer ended at in the choice's `stop_reason`; when it is
/// one of the request's `stop_sequences`, Anthropic's clients are told so
/// (`stop_reason: "stop_sequence"` and the sequence), whole and streamed. Before, every
/// such answer said `end_turn` and `stop_sequence: null`.
#[test]
fn a_matched_stop_sequence_is_reported_whole_and_streamed() {
    let asked = vec!["END".to_owned(), "\n\nHuman:".to_owned()];
    let answer = |reason: Value| {
        Completion::parse(
            json!({"id": "c", "choices": [{"finish_reason": "stop", "stop_reason": reason,
                "message": {"content": "done"}}]})
            .to_string()
            .as_bytes(),
        )
        .expect("answer")
    };
    let msg = from_openai(&answer(json!("END")), "m", false, &asked, Usage::default());
    assert_eq!(msg["stop_reason"], json!("stop_sequence"));
    assert_eq!(msg["stop_sequence"], json!("END"));
    // Not one the request asked for, a token id (vLLM's for a stop token), or none.
    for reason in [json!("OTHER"), json!(128_009), Value::Null] {
        let msg = from_openai(
            &answer(reason.clone()),
            "m",
            false,
            &asked,
            Usage::default(),
        );
        assert_eq!(msg["stop_reason"], json!("end_turn"), "{reason}");
        assert_eq!(msg["stop_sequence"], Value::Null, "{reason}");
    }

    let streamed = |reason: Value| {
        let mut s = Stream::new("m", false).with_stop_sequences(asked.clone());
        s.chunk(&chunk(
            json!({"id": "c", "choices": [{"delta": {"content": "done"}}]}),
        ));
        s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {}, "finish_reason": "stop", "stop_reason": reason}]})));
        let end = s.finish(Usage::default());
        let delta = end
            .iter()
            .find(|e| e.name == "message_delta")
            .expect("delta");
        delta.data["delta"].clone()
    };
    assert_eq!(
        streamed(json!("\n\nHuman:")),
        json!({"stop_reason": "stop_sequence", "stop_sequence": "\n\nHuman:"})
    );
    assert_eq!(
        streamed(json!("OTHER")),
        json!({"stop_reason": "end_turn", "stop_sequence": null})
    );
}

#[test]
fn stop_sequences_must_be_a_list_of_texts() {
    let r =
        req(json!({"model": "m", "max_tokens": 8, "messages": [], "stop_sequences": ["A", "B"]}))
            .expect("valid");
    assert_eq!(r.stop_sequences, ["A", "B"]);
    assert_eq!(r.openai["stop"], json!(["A", "B"]));
    let e = req(json!({"model": "m", "max_tokens": 8, "messages": [], "stop_sequences": "A"}))
        .expect_err("not a list");
    assert_eq!(e.param(), Some("stop_sequences"));
}

/// Millions of `""` in `stop_sequences` would be kept as strings for the request's life
/// (and slow every stream of the volunteer's server): refused before any is copied.
#[test]
fn too_many_or_too_long_stop_sequences_are_refused_before_they_are_copied() {
    let sixteen = vec!["a"; 16];
    assert!(
        req(json!({"model": "m", "max_tokens": 8, "messages": [], "stop_sequences": sixteen}))
            .is_ok()
    );
    let million = vec![""; 1_000_000];
    let long = "x".repeat(1025);
    for bad in [json!(million), json!(vec!["a"; 17]), json!([long])] {
        let e = req(json!({"model": "m", "max_tokens": 8, "messages": [], "stop_sequences": bad}))
            .expect_err("past the bounds");
        assert_eq!(e.param(), Some("stop_sequences"));
    }
}

/// A hostile request puts thousands of system and user messages after an assistant's
/// call and then thousands of tool results: each tool message is moved in front of at
/// most `MAX_MESSAGES_PASSED` of them, so the translation is linear, not a walk over all
/// of them for each result (before: minutes of the hub's one thread for a few megabytes).
#[test]
fn tool_results_after_thousands_of_turns_translate_in_linear_time() {
    let n = 20_000;
    let mut turns = vec![
        json!({"role": "user", "content": "go"}),
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}),
    ];
    for _ in 0..n {
        turns.push(json!({"role": "system", "content": "s"}));
        turns.push(json!({"role": "user", "content": "u"}));
    }
    let results: Vec<_> = (0..n)
        .map(|i| json!({"type": "tool_result", "tool_use_id": format!("t{i}"), "content": "r"}))
        .collect();
    turns.push(json!({"role": "user", "content": results}));
    let started = std::time::Instant::now();
    let r = req(json!({"model": "m", "max_tokens": 8, "messages": turns})).expect("valid");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let msgs = r.openai["messages"].as_array().expect("messages");
    let tools = msgs.iter().filter(|m| m["role"] == "tool").count();
    assert_eq!(tools, n, "every result kept");
}

/// A conversation that ends with the assistant's own words asks Anthropic to continue
/// them (a prefill), and its answer is the continuation only. The pool cannot promise
/// that of every backend (vLLM and older llama.cpp answer anew after it), so it is a 400
/// naming the turn, in the words clients that fall back know. Before, it went to the
/// provider as a last assistant message, and the answer was whatever that made of it.
/// An empty last assistant turn asks nothing to be continued: left out, answered whole.
#[test]
fn a_prefill_is_refused_and_an_empty_last_assistant_turn_left_out() {
    for last in [
        json!({"role": "assistant", "content": "The answer is"}),
        json!({"role": "assistant", "content": [{"type": "text", "text": "{"}]}),
        json!({"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": ""},
                                                  {"type": "text", "text": "So"}]}),
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}),
    ] {
        for after in [
            None,
            Some(json!({"role": "system", "content": "a reminder"})),
        ] {
            let mut turns = vec![json!({"role": "user", "content": "hi"}), last.clone()];
            turns.extend(after);
            let e = req(json!({"model": "m", "max_tokens": 8, "messages": turns})).unwrap_err();
            assert_eq!(e.param(), Some("messages.1"), "{last}");
            assert!(e.to_string().contains("assistant message prefill"), "{e}");
        }
    }
    for empty in [json!(""), json!([]), json!([{"type": "text", "text": ""}])] {
        let r = req(json!({"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": empty}]}))
        .unwrap();
        assert_eq!(
            r.openai["messages"],
            json!([{"role": "user", "content": "hi"}]),
            "{empty}"
        );
    }
    // An assistant turn before the last user turn is the conversation, as ever.
    let r = req(json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}]}))
    .unwrap();
    assert_eq!(r.openai["messages"].as_array().map(Vec::len), Some(3));
    // Turns that give no message after a full assistant turn leave it last: a prefill by
    // another road, refused the same way.
    for tail in [
        json!([{"role": "assistant", "content": ""}]),
        json!([{"role": "user", "content": []}]),
        json!([{"role": "user", "content": [{"type": "thinking", "thinking": "x", "signature": ""}]}]),
    ] {
        let mut turns = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "The answer is"}),
        ];
        turns.extend(tail.as_array().unwrap().iter().cloned());
        match req(json!({"model": "m", "max_tokens": 8, "messages": turns})) {
            Err(e) => {
                assert_eq!(e.param(), Some("messages.1"), "{tail}");
                assert!(e.to_string().contains("assistant message prefill"), "{e}");
            }
            Ok(r) => panic!("{tail}: sent as {}", r.openai["messages"]),
        }
    }
}
