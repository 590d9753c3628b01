use super::*;
use crate::openai::{Chunk, Completion};
use crate::{DialectError, Usage};
use proptest::prelude::*;
use serde_json::{json, Value};

fn req(v: Value) -> Result<Request, DialectError> {
    to_openai(v.to_string().as_bytes())
}

fn chunk(v: Value) -> Chunk {
    Chunk::parse(v.to_string().as_bytes()).expect("chunk")
}

#[test]
fn a_string_input_with_instructions_becomes_system_and_user() {
    let r = req(
        json!({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 16,
                       "temperature": 0.5, "store": true, "metadata": {"k": "v"}}),
    )
    .expect("valid");
    assert_eq!(
        r.openai,
        json!({"model": "m", "max_tokens": 16, "temperature": 0.5,
               "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})
    );
    assert!(!r.stream);
    assert_eq!(r.echo.instructions, json!("be brief"));
}

#[test]
fn previous_response_id_is_refused_with_the_reason() {
    let err = req(json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"}))
        .expect_err("refused");
    assert!(matches!(err, DialectError::Unsupported(_)));
    assert!(err.to_string().contains("stores no responses"));
}

#[test]
fn items_map_to_messages_tool_calls_and_tool_outputs() {
    let r = req(json!({"model": "m", "stream": true, "input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "-3C"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is cold."}]}
    ], "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}], "tool_choice": "required"}))
    .expect("valid");
    let m = r.openai["messages"].as_array().expect("messages");
    assert_eq!(m[0], json!({"role": "system", "content": "rules"}));
    assert_eq!(
        m[1]["content"][1],
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    );
    assert_eq!(
        m[2]["tool_calls"].as_array().map(Vec::len),
        Some(2),
        "consecutive calls share a turn"
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "c1", "content": "-3C"})
    );
    assert_eq!(m[4], json!({"role": "assistant", "content": "It is cold."}));
    assert_eq!(r.openai["tools"][0]["function"]["name"], json!("w"));
    assert_eq!(r.openai["tool_choice"], json!("required"));
    assert_eq!(r.openai["stream_options"], json!({"include_usage": true}));
}

#[test]
fn remote_images_files_and_hosted_tools_are_refused() {
    let image = req(
        json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}),
    );
    assert_eq!(
        image.expect_err("refused").param(),
        Some("input.0.content.0.image_url")
    );
    let file = req(
        json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
    );
    assert_eq!(
        file.expect_err("refused").param(),
        Some("input.0.content.0")
    );
    let tool = req(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}));
    assert_eq!(tool.expect_err("refused").param(), Some("tools.0.type"));
    assert_eq!(
        req(json!({"input": "x"})).expect_err("no model").param(),
        Some("model")
    );
    assert_eq!(
        req(json!({"model": "m"})).expect_err("no input").param(),
        Some("input")
    );
}

#[test]
fn a_whole_answer_becomes_a_response_object() {
    let answer = Completion::parse(
        json!({"id": "chatcmpl-1", "choices": [{"finish_reason": "length", "message": {"content": "Hi there"}}]})
            .to_string()
            .as_bytes(),
    )
    .expect("answer");
    let echo = Echo {
        tools: Default::default(),
        tool_choice: json!("auto"),
        ..Echo::default()
    };
    let r = from_openai(
        &answer,
        "m",
        &echo,
        1_700_000_000,
        Usage {
            input: 5,
            output: 2,
        },
    );
    assert_eq!(r["id"], json!("resp_chatcmpl-1"));
    assert_eq!(r["object"], json!("response"));
    assert_eq!(r["status"], json!("incomplete"));
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["store"], json!(false));
    assert_eq!(
        r["output"][0]["status"],
        json!("incomplete"),
        "the item of an incomplete response"
    );
    assert_eq!(r["output"][0]["content"][0]["text"], json!("Hi there"));
    assert_eq!(r["usage"]["total_tokens"], json!(7));
}

#[test]
fn a_stream_emits_the_documented_event_sequence() {
    let mut s = Stream::new("m", Echo::default(), 1);
    let mut all = Vec::new();
    all.extend(s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"role": "assistant"}}]}),
    )));
    all.extend(s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"content": "Hel"}}]}),
    )));
    all.extend(s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}),
    )));
    all.extend(s.finish(Usage {
        input: 4,
        output: 2,
    }));
    let names: Vec<_> = all.iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.data["sequence_number"], json!(i));
        assert_eq!(e.data["type"], json!(e.name));
    }
    assert_eq!(all[6].data["text"], json!("Hello"));
    let done = &all[9].data["response"];
    assert_eq!(done["status"], json!("completed"));
    assert_eq!(done["output"][0]["content"][0]["text"], json!("Hello"));
    assert_eq!(done["usage"]["output_tokens"], json!(2));
}

#[test]
fn streamed_function_calls_accumulate_arguments() {
    let mut s = Stream::new("m", Echo::default(), 1);
    let mut all = Vec::new();
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_9", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}))));
    all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]}))));
    all.extend(s.finish(Usage::default()));
    let names: Vec<_> = all.iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(all[5].data["arguments"], json!("{\"a\":1}"));
    assert_eq!(
        all[7].data["response"]["output"][0]["call_id"],
        json!("call_9")
    );
}

proptest! {
    #[test]
    fn no_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = to_openai(&bytes);
    }

    #[test]
    fn no_panic_on_arbitrary_item_shapes(ty in "[a-z_]{0,16}", role in "[a-z]{0,10}", text in ".{0,12}", n in any::<i64>()) {
        let body = json!({"model": "m", "max_output_tokens": n, "input": [
            {"type": ty, "role": role, "content": [{"type": ty, "text": text, "image_url": text}],
             "call_id": text, "name": text, "arguments": text, "output": [{"type": ty}]}],
            "tools": [{"type": ty, "name": text}], "tool_choice": {"type": ty}, "text": {"format": {"type": ty}}});
        let _ = to_openai(body.to_string().as_bytes());
    }
}

#[test]
fn tool_calls_without_ids_get_ids_unique_across_answers_and_their_done_event_a_name() {
    let answer = |id: &str| {
        Completion::parse(
            json!({"id": id, "choices": [{"finish_reason": "tool_calls", "message": {
                "tool_calls": [{"id": "", "function": {"name": "f", "arguments": "{}"}}]}}]})
            .to_string()
            .as_bytes(),
        )
        .expect("answer")
    };
    let ids: Vec<Value> = ["chatcmpl-1", "chatcmpl-2"]
        .iter()
        .map(|id| {
            from_openai(&answer(id), "m", &Echo::default(), 0, Usage::default())["output"][0]
                ["call_id"]
                .clone()
        })
        .collect();
    assert!(
        ids[0].as_str().is_some_and(|i| i.starts_with("call_")),
        "{ids:?}"
    );
    assert_ne!(ids[0], ids[1]);
    let mut s = Stream::new("m", Echo::default(), 0);
    let mut events = s.chunk(&chunk(
        json!({"id": "chatcmpl-9", "choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"name": "lookup", "arguments": "{\"q\":1}"}}]}}]}),
    ));
    events.extend(s.chunk(&chunk(
        json!({"id": "chatcmpl-9", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
    )));
    events.extend(s.finish(Usage::default()));
    let done = events
        .iter()
        .find(|e| e.name == "response.function_call_arguments.done")
        .expect("done event");
    assert_eq!(done.data["name"], json!("lookup"));
    let added = events
        .iter()
        .find(|e| e.name == "response.output_item.added")
        .expect("added");
    assert_eq!(added.data["item"]["call_id"], json!("call_chatcmpl-9_0"));
}

/// Ollama's OpenAI-compatible API and newer vLLM send the thinking as `reasoning`: it is
/// a reasoning item too, whole and streamed. Before, it was dropped.
#[test]
fn thinking_sent_as_reasoning_is_a_reasoning_item_too() {
    let whole = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "stop",
               "message": {"content": "4", "reasoning": "2+2"}}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let r = from_openai(&whole, "m", &Echo::default(), 1, Usage::default());
    assert_eq!(r["output"][0]["type"], json!("reasoning"));
    assert_eq!(r["output"][0]["content"][0]["text"], json!("2+2"));
    let mut s = Stream::new("m", Echo::default(), 1);
    let events = s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"reasoning": "2+"}}]}),
    ));
    assert!(
        events
            .iter()
            .any(|e| e.name == "response.reasoning_text.delta"),
        "{events:?}"
    );
}

/// A reasoning model's thinking (llama.cpp's `reasoning_content`) becomes a reasoning item
/// before the message, with `reasoning_text` content, as the Responses API carries an
/// open-weight model's; streamed, it is closed before the message opens. Before, it was
/// dropped.
#[test]
fn a_reasoning_models_thinking_is_a_reasoning_item() {
    let whole = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "stop",
               "message": {"content": "4", "reasoning_content": "2+2"}}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let r = from_openai(&whole, "m", &Echo::default(), 1, Usage::default());
    assert_eq!(
        r["output"][0],
        json!({"type": "reasoning", "id": "rs_c_0", "summary": [],
               "content": [{"type": "reasoning_text", "text": "2+2"}], "status": "completed"})
    );
    assert_eq!(r["output"][1]["type"], json!("message"));

    let mut s = Stream::new("m", Echo::default(), 1);
    let mut all = Vec::new();
    for delta in [
        json!({"reasoning_content": "2+"}),
        json!({"reasoning_content": "2"}),
        json!({"content": "4"}),
    ] {
        all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": delta}]}))));
    }
    all.extend(s.finish(Usage::default()));
    let names: Vec<_> = all.iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.data["sequence_number"], json!(i));
    }
    assert_eq!(all[2].data["item"]["type"], json!("reasoning"));
    assert_eq!(
        all[3].data["part"],
        json!({"type": "reasoning_text", "text": ""})
    );
    assert_eq!(
        (all[4].data["item_id"].clone(), all[4].data["delta"].clone()),
        (json!("rs_c_0"), json!("2+"))
    );
    assert_eq!(all[6].data["text"], json!("2+2"));
    assert_eq!(
        (
            all[8].data["output_index"].clone(),
            all[9].data["output_index"].clone()
        ),
        (json!(0), json!(1))
    );
    let done = &all[15].data["response"]["output"];
    assert_eq!(done[0]["content"][0]["text"], json!("2+2"));
    assert_eq!(done[1]["content"][0]["text"], json!("4"));

    // Thinking alone (cut off by max tokens) still closes its item.
    let mut s = Stream::new("m", Echo::default(), 1);
    let mut all = s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"reasoning_content": "hm"}, "finish_reason": "length"}]}),
    ));
    all.extend(s.finish(Usage::default()));
    let last = all.last().unwrap();
    assert_eq!(last.name, "response.incomplete");
    assert_eq!(
        last.data["response"]["output"][0]["type"],
        json!("reasoning")
    );
    assert_eq!(
        last.data["response"]["output"][0]["status"],
        json!("incomplete"),
        "thinking the answer was cut in is as incomplete as the answer"
    );
    let cut = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "length",
               "message": {"content": "", "reasoning_content": "hm"}}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let r = from_openai(&cut, "m", &Echo::default(), 1, Usage::default());
    assert_eq!(r["output"][0]["status"], json!("incomplete"));
}

/// A hostile provider alternates a byte of thinking with a byte of answer: the stream
/// keeps at most [`MAX_REASONING_ITEMS`] reasoning items (each held until the end as a
/// tree), not one per chunk, and so at most one message item more; the answer's text is
/// all there.
#[test]
fn interleaved_thinking_makes_a_bounded_number_of_reasoning_items() {
    let mut s = Stream::new("m", Echo::default(), 1);
    let rounds = MAX_REASONING_ITEMS * 3;
    for _ in 0..rounds {
        for delta in [json!({"reasoning_content": "r"}), json!({"content": "t"})] {
            s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": delta}]})));
        }
    }
    let end = s.finish(Usage::default());
    let output = &end.last().unwrap().data["response"]["output"];
    let items = output.as_array().unwrap();
    let reasoning = items.iter().filter(|i| i["type"] == "reasoning").count();
    assert_eq!(reasoning, MAX_REASONING_ITEMS);
    let messages: Vec<_> = items.iter().filter(|i| i["type"] == "message").collect();
    // Thinking came first: a message after each reasoning item, the text past the last
    // shown thought in the last message.
    assert_eq!(messages.len(), MAX_REASONING_ITEMS);
    let text: usize = messages
        .iter()
        .map(|m| m["content"][0]["text"].as_str().unwrap().len())
        .sum();
    assert_eq!(text, rounds);
}

/// A model thinks, answers, thinks again and answers on, then calls a tool: each item is
/// done before the next is added, as the Responses API streams them (a client that
/// records items as they are done, as Codex does, keeps them in order), and the answer
/// after the second thought is a message item of its own. Before, the first message
/// stayed open across the later thinking and the call, and was done last.
#[test]
fn each_streamed_item_is_done_before_the_next_is_added() {
    let mut s = Stream::new("m", Echo::default(), 1);
    let mut all = Vec::new();
    for delta in [
        json!({"reasoning_content": "a"}),
        json!({"content": "one"}),
        json!({"reasoning_content": "b"}),
        json!({"content": "two"}),
        json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
    ] {
        all.extend(s.chunk(&chunk(json!({"id": "c", "choices": [{"delta": delta}]}))));
    }
    all.extend(s.finish(Usage::default()));
    let mut open: Option<u64> = None;
    let mut order = Vec::new();
    for e in &all {
        let index = e.data["output_index"].as_u64();
        match e.name {
            "response.output_item.added" => {
                assert_eq!(open, None, "an item added while {open:?} is open");
                open = index;
                order.push(e.data["item"]["type"].as_str().unwrap().to_owned());
            }
            "response.output_item.done" => {
                assert_eq!(open, index, "done out of order");
                open = None;
            }
            _ => {}
        }
    }
    assert_eq!(
        order,
        [
            "reasoning",
            "message",
            "reasoning",
            "message",
            "function_call"
        ]
    );
    let output = &all.last().unwrap().data["response"]["output"];
    let ids: Vec<_> = output
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["rs_c_0", "msg_c", "rs_c_1", "msg_c_1", "fc_c1"]);
    assert_eq!(output[1]["content"][0]["text"], json!("one"));
    assert_eq!(output[3]["content"][0]["text"], json!("two"));
}

/// Codex sends an assistant `message` item and then the turn's `function_call` items:
/// they were two assistant messages in a row, and strict chat templates (Gemma, Mistral)
/// refuse turns that do not alternate. The calls join the message before them, and
/// consecutive user messages are one; nothing merges across a tool message.
#[test]
fn consecutive_turns_of_one_role_are_one_message() {
    let r = req(json!({"model": "m", "input": [
        {"role": "user", "content": "weather?"},
        {"role": "user", "content": [{"type": "input_text", "text": "in Oslo"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "-3C"},
        {"type": "function_call_output", "call_id": "c2", "output": "-4C"},
        {"role": "assistant", "content": "Cold."},
        {"role": "assistant", "content": "Very."}
    ]}))
    .expect("valid");
    let m = r.openai["messages"].as_array().expect("messages");
    let roles: Vec<_> = m.iter().map(|m| m["role"].as_str().unwrap_or("")).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "tool", "assistant"]);
    assert_eq!(
        m[0]["content"],
        json!([{"type": "text", "text": "weather?"}, {"type": "text", "text": "in Oslo"}])
    );
    assert_eq!(m[1]["content"], json!("Checking."));
    assert_eq!(m[1]["tool_calls"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        m[4],
        json!({"role": "assistant", "content": "Cold.\n\nVery."})
    );
}

/// The request's `tools`, echoed in every response object, stay the request's text: the
/// answer and the events hold no JSON tree of them (a tree of a large `tools` takes tens
/// of times its bytes, and `json!` made one per response object), and the bytes written
/// are those of writing the tree, field for field.
#[test]
fn the_echoed_tools_are_written_as_text_never_held_as_a_tree() {
    let tools = json!([{"type": "function", "name": "w", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let r = req(json!({"model": "m", "input": "x", "tools": tools})).expect("valid");
    let with_tools = |v: &Value, at: &str| {
        let mut v = v.clone();
        if let Some(o) = v.pointer_mut(at) {
            *o = tools.clone();
        }
        v
    };

    let answer = Completion::parse(
        json!({"id": "c", "choices": [{"finish_reason": "stop", "message": {"content": "hi"}}]})
            .to_string()
            .as_bytes(),
    )
    .expect("answer");
    let whole = from_openai(&answer, "m", &r.echo, 1, Usage::default());
    assert_eq!(whole["tools"], Value::Null, "no tree of the tools is held");
    assert_eq!(whole["output"][0]["content"][0]["text"], json!("hi"));
    let written = serde_json::to_string(&whole).expect("written");
    let tree: Value = serde_json::from_str(&written).expect("json");
    assert_eq!(tree["tools"], tools);
    assert_eq!(written, with_tools(&tree, "/tools").to_string());
    assert!(written.contains(&format!(
        "\"tool_choice\":\"auto\",\"tools\":{tools},\"top_p\":null"
    )));

    let mut s = Stream::new("m", r.echo.clone(), 1);
    let mut all = s.chunk(&chunk(
        json!({"id": "c", "choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}),
    ));
    all.extend(s.finish(Usage::default()));
    all.extend(Stream::new("m", r.echo.clone(), 1).fail("server_error", "gone"));
    let objects: Vec<_> = all
        .iter()
        .filter(|e| e.data.get("response").is_some())
        .collect();
    assert_eq!(
        objects.len(),
        6,
        "created, in_progress, completed; created, in_progress, failed"
    );
    for e in objects {
        assert_eq!(
            e.data["response"]["tools"],
            Value::Null,
            "{}: no tree",
            e.name
        );
        let want = crate::sse_event(e.name, &with_tools(&e.data, "/response/tools"));
        assert_eq!(
            String::from_utf8(e.to_sse()).expect("utf8"),
            String::from_utf8(want).expect("utf8"),
            "{}",
            e.name
        );
    }
}

/// The Responses API's `input_image` parts are counted like the other APIs' images: at
/// most `MAX_IMAGES` in one request, refused before any is translated. Before, only
/// Anthropic's and Ollama's were counted.
#[test]
fn at_most_max_images_in_one_request() {
    let image = json!({"type": "input_image", "image_url": "data:image/png;base64,iVBO"});
    let input = |n: usize| {
        let half = n / 2;
        json!({"model": "m", "input": [
            {"role": "user", "content": vec![image.clone(); half]},
            {"role": "assistant", "content": "seen"},
            {"role": "user", "content": vec![image.clone(); n - half]}]})
    };
    let body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    to_openai(&body(input(crate::MAX_IMAGES))).expect("the most images");
    let e = to_openai(&body(input(crate::MAX_IMAGES + 1))).expect_err("one too many");
    assert_eq!(e.param(), Some("input"));
    assert!(e.to_string().contains(crate::TOO_MANY_IMAGES), "{e}");
}

/// A sampling setting is a number, and the echoed `tool_choice` is the normalised one: a
/// `temperature` or a `tool_choice` object carrying megabytes beside its `type` and
/// `name` was copied into the response object held for the request's whole life (and
/// the `temperature` sent on to the provider).
#[test]
fn sampling_settings_are_numbers_and_the_echoed_tool_choice_is_the_normalised_one() {
    let junk = vec![0; 10_000];
    for (key, bad) in [
        ("temperature", json!(junk)),
        ("top_p", json!("0.5")),
        ("parallel_tool_calls", json!([true])),
    ] {
        let mut body = json!({"model": "m", "input": "hi"});
        body[key] = bad;
        let e = req(body).expect_err("not a number or flag");
        assert_eq!(e.param(), Some(key));
    }
    let r = req(
        json!({"model": "m", "input": "hi", "temperature": 0.2, "top_p": 1,
        "tools": [{"type": "function", "name": "f"}],
        "tool_choice": {"type": "function", "name": "f", "x": junk}}),
    )
    .expect("valid");
    assert_eq!(r.echo.tool_choice, json!({"type": "function", "name": "f"}));
    assert_eq!(r.echo.temperature, json!(0.2));
    assert!(
        !r.openai.to_string().contains("\"x\""),
        "the junk is not sent"
    );
    let r = req(json!({"model": "m", "input": "hi"})).expect("valid");
    assert_eq!(r.echo.tool_choice, json!("auto"));
}
