use super::*;
use crate::openai::{Chunk, Completion};
use crate::Usage;
use proptest::prelude::*;
use serde_json::{json, Value};

fn chunk(v: Value) -> Chunk {
    Chunk::parse(v.to_string().as_bytes()).expect("chunk")
}

#[test]
fn chat_maps_options_format_images_and_streams_by_default() {
    let r = chat_to_openai(
        json!({"model": "llama3:8b", "keep_alive": "5m",
               "messages": [{"role": "system", "content": "s"},
                            {"role": "user", "content": "what is this?", "images": ["/9j/4AAQ"]}],
               "options": {"temperature": 0.1, "num_predict": 20, "stop": ["\n"], "seed": 7, "top_k": 5, "num_ctx": 99999},
               "format": "json"})
        .to_string()
        .as_bytes(),
    )
    .expect("valid");
    assert!(r.stream, "ollama streams unless told not to");
    let o = &r.openai;
    assert_eq!(o["max_tokens"], json!(20));
    assert_eq!(o["temperature"], json!(0.1));
    assert_eq!(o["seed"], json!(7));
    assert_eq!(o["top_k"], json!(5));
    assert_eq!(o["stop"], json!(["\n"]));
    assert!(o.get("num_ctx").is_none() && o.get("keep_alive").is_none());
    assert_eq!(o["response_format"], json!({"type": "json_object"}));
    assert_eq!(o["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        o["messages"][1]["content"][1]["image_url"]["url"],
        json!("data:image/jpeg;base64,/9j/4AAQ")
    );
}

#[test]
fn unlimited_num_predict_leaves_the_cap_to_the_pool() {
    for n in [-1, -2] {
        let r = chat_to_openai(
            json!({"model": "m", "stream": false, "messages": [], "options": {"num_predict": n}})
                .to_string()
                .as_bytes(),
        )
        .expect("valid");
        assert!(r.openai.get("max_tokens").is_none());
        assert!(!r.stream);
    }
}

#[test]
fn tool_calls_get_ids_and_tool_messages_answer_them_in_order() {
    let r = chat_to_openai(
        json!({"model": "m", "messages": [
            {"role": "user", "content": "weather in Oslo and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "w", "arguments": {"city": "Oslo"}}},
                {"function": {"name": "w", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "content": "-3"}, {"role": "tool", "content": "18"}],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]})
        .to_string()
        .as_bytes(),
    )
    .expect("valid");
    let m = &r.openai["messages"];
    let first = m[1]["tool_calls"][0]["id"].clone();
    let second = m[1]["tool_calls"][1]["id"].clone();
    assert_ne!(first, second);
    assert_eq!(m[2]["tool_call_id"], first);
    assert_eq!(m[3]["tool_call_id"], second);
    assert_eq!(
        m[1]["tool_calls"][0]["function"]["arguments"],
        json!("{\"city\":\"Oslo\"}")
    );
}

#[test]
fn generate_becomes_a_chat_and_refuses_what_it_cannot_honour() {
    let r = generate_to_openai(
        json!({"model": "m", "prompt": "why?", "system": "s", "stream": false})
            .to_string()
            .as_bytes(),
    )
    .expect("valid");
    assert_eq!(
        r.openai["messages"],
        json!([{"role": "system", "content": "s"}, {"role": "user", "content": "why?"}])
    );
    for (body, field) in [
        (
            json!({"model": "m", "prompt": "a", "suffix": "b"}),
            "suffix",
        ),
        (json!({"model": "m", "prompt": "a", "raw": true}), "raw"),
        (
            json!({"model": "m", "prompt": "a", "context": [1, 2]}),
            "context",
        ),
        (
            json!({"model": "m", "prompt": "a", "template": "{{ .Prompt }}"}),
            "template",
        ),
        (json!({"prompt": "a"}), "model"),
        (
            json!({"model": "m", "prompt": "a", "images": ["http://x/y.png"]}),
            "images.0",
        ),
    ] {
        assert_eq!(
            generate_to_openai(body.to_string().as_bytes())
                .expect_err("refused")
                .param(),
            Some(field)
        );
    }
}

#[test]
fn embed_and_legacy_embeddings_translate_both_ways() {
    let r = embed_to_openai(
        json!({"model": "e", "input": ["a", "b"], "truncate": true})
            .to_string()
            .as_bytes(),
        false,
    )
    .expect("valid");
    assert_eq!(r.openai, json!({"model": "e", "input": ["a", "b"]}));
    let legacy = embed_to_openai(
        json!({"model": "e", "prompt": "a"}).to_string().as_bytes(),
        true,
    )
    .expect("valid");
    assert_eq!(legacy.openai["input"], json!("a"));
    let answer =
        json!({"data": [{"index": 1, "embedding": [0.5]}, {"index": 0, "embedding": [0.25]}]});
    let out = embed_from_openai(
        &answer,
        "e",
        Usage {
            input: 4,
            output: 0,
        },
        Timing { total_ns: 9 },
        false,
    );
    assert_eq!(out["embeddings"], json!([[0.25], [0.5]]));
    assert_eq!(out["prompt_eval_count"], json!(4));
    assert_eq!(
        embed_from_openai(&answer, "e", Usage::default(), Timing::default(), true),
        json!({"embedding": [0.25]})
    );
}

#[test]
fn a_whole_answer_has_ollamas_fields() {
    let answer = Completion::parse(
        json!({"id": "x", "choices": [{"finish_reason": "length", "message": {"content": "hi",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]})
        .to_string()
        .as_bytes(),
    )
    .expect("answer");
    let chat = from_openai(
        Call::Chat,
        &answer,
        "m",
        true,
        "2026-12-02T00:00:00Z",
        Usage {
            input: 3,
            output: 2,
        },
        Timing { total_ns: 5 },
    );
    assert_eq!(
        chat["message"],
        json!({"role": "assistant", "content": "hi", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]})
    );
    assert_eq!(chat["done"], json!(true));
    assert_eq!(chat["done_reason"], json!("length"));
    assert_eq!(chat["prompt_eval_count"], json!(3));
    assert_eq!(chat["eval_count"], json!(2));
    let gen = from_openai(
        Call::Generate,
        &answer,
        "m",
        true,
        "t",
        Usage::default(),
        Timing::default(),
    );
    assert_eq!(gen["response"], json!("hi"));
}

#[test]
fn a_stream_is_ndjson_lines_ending_with_done_and_counts() {
    let mut s = Stream::new(Call::Chat, "m", true);
    let mut lines = Vec::new();
    lines.extend(s.chunk(
        &chunk(json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})),
        "t",
    ));
    lines.extend(s.chunk(
        &chunk(json!({"choices": [{"delta": {"content": "Hi"}}]})),
        "t",
    ));
    lines.extend(s.chunk(&chunk(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{\"a\""}}]}}]})), "t"));
    lines.extend(s.chunk(&chunk(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":2}"}}]}, "finish_reason": "tool_calls"}]})), "t"));
    lines.push(s.finish(
        "t",
        Usage {
            input: 1,
            output: 2,
        },
        Timing { total_ns: 3 },
    ));
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        json!({"model": "m", "created_at": "t", "message": {"role": "assistant", "content": "Hi"}, "done": false})
    );
    assert_eq!(lines[1]["done"], json!(true));
    assert_eq!(
        lines[1]["message"]["tool_calls"],
        json!([{"function": {"name": "f", "arguments": {"a": 2}}}])
    );
    assert_eq!(lines[1]["eval_count"], json!(2));
    assert_eq!(ndjson(&lines[0]).last(), Some(&b'\n'));
}

#[test]
fn tags_show_version_and_errors() {
    let card = ModelCard {
        name: "smollm2".into(),
        sha256: Some("ab".into()),
        format: Some("gguf".into()),
        capabilities: vec!["completion".into(), "tools".into()],
        context_length: Some(8192),
    };
    let t = tags(std::slice::from_ref(&card), "t");
    assert_eq!(t["models"][0]["name"], json!("smollm2"));
    assert_eq!(t["models"][0]["digest"], json!("ab"));
    let s = show(&card, "t");
    assert_eq!(s["capabilities"], json!(["completion", "tools"]));
    assert_eq!(s["model_info"]["general.context_length"], json!(8192));
    // Where editors (VS Code's Ollama provider) read the context: `<architecture>.context_length`.
    let arch = s["model_info"]["general.architecture"].as_str().unwrap();
    assert_eq!(
        s["model_info"][format!("{arch}.context_length")],
        json!(8192)
    );
    assert_eq!(s["model_info"]["general.basename"], json!("smollm2"));
    assert_eq!(s["details"]["family"], json!(arch));
    let p = ps(std::slice::from_ref(&card), "2026-12-06T12:05:00Z");
    assert_eq!(p["models"][0]["model"], json!("smollm2"));
    assert_eq!(p["models"][0]["digest"], json!("ab"));
    assert_eq!(p["models"][0]["expires_at"], json!("2026-12-06T12:05:00Z"));
    assert_eq!(p["models"][0]["context_length"], json!(8192));
    assert_eq!(p["models"][0]["details"], t["models"][0]["details"]);
    assert_eq!(show_model(br#"{"name":"x"}"#).expect("old field"), "x");
    assert_eq!(version()["version"], json!(COMPAT_VERSION));
    assert_eq!(error_body("nope"), json!({"error": "nope"}));
}

proptest! {
    #[test]
    fn no_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = chat_to_openai(&bytes);
        let _ = generate_to_openai(&bytes);
        let _ = embed_to_openai(&bytes, false);
        let _ = embed_to_openai(&bytes, true);
        let _ = show_model(&bytes);
    }

    #[test]
    fn no_panic_on_arbitrary_shapes(role in "[a-z]{0,10}", text in ".{0,12}", n in any::<i64>(), f in any::<f64>()) {
        let body = json!({"model": "m", "messages": [{"role": role, "content": text, "images": [text],
            "tool_calls": [{"function": {"name": text, "arguments": n}}]}],
            "options": {"num_predict": n, "temperature": f}, "format": text, "tools": [{"function": {"name": n}}]});
        let _ = chat_to_openai(body.to_string().as_bytes());
    }
}

#[test]
fn the_image_refusal_names_the_limit_it_enforces() {
    assert!(
        crate::TOO_MANY_IMAGES.contains(&format!("at most {} ", crate::MAX_IMAGES)),
        "{}",
        crate::TOO_MANY_IMAGES
    );
    let images = vec!["iVBORw0KGgo="; crate::MAX_IMAGES + 1];
    let body = json!({"model": "m", "prompt": "p", "images": images});
    let e = generate_to_openai(body.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.param(), Some("images"));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "", "images": [""]}]});
    let e = chat_to_openai(body.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.param(), Some("messages.0.images.0"));
}

#[test]
fn an_empty_prompt_or_message_list_only_loads_the_model() {
    let load = |call, body: Value| load_only(call, body.to_string().as_bytes());
    // `ollama run` (a load) and `ollama stop` (an unload), and the chat forms.
    assert_eq!(
        load(Call::Generate, json!({"model": "m", "prompt": ""})),
        Some(Load {
            model: "m".into(),
            unload: false
        })
    );
    assert_eq!(
        load(Call::Generate, json!({"model": "m", "keep_alive": 0})),
        Some(Load {
            model: "m".into(),
            unload: true
        })
    );
    for zero in [json!("0"), json!("0s"), json!("0m"), json!(0.0)] {
        let l = load(
            Call::Chat,
            json!({"model": "m", "messages": [], "keep_alive": zero}),
        );
        assert!(l.is_some_and(|l| l.unload), "{zero}");
    }
    for kept in [json!("5m"), json!(-1), json!("-1m"), json!(300), json!("")] {
        let l = load(
            Call::Chat,
            json!({"model": "m", "messages": null, "keep_alive": kept}),
        );
        assert!(l.is_some_and(|l| !l.unload), "{kept}");
    }
    // Anything to generate from is not a load.
    assert_eq!(
        load(Call::Generate, json!({"model": "m", "prompt": "hi"})),
        None
    );
    assert_eq!(
        load(Call::Generate, json!({"model": "m", "images": ["aGk="]})),
        None
    );
    assert_eq!(
        load(
            Call::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        ),
        None
    );
    // Nor is a body the translation must refuse.
    assert_eq!(load(Call::Chat, json!({"messages": []})), None);
    assert_eq!(load(Call::Chat, json!({"model": "m", "messages": 3})), None);
    assert_eq!(load_only(Call::Chat, b"not json"), None);
    let answer = load_answer(
        Call::Chat,
        &Load {
            model: "m".into(),
            unload: true,
        },
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(answer["done"], json!(true));
    assert_eq!(answer["done_reason"], json!("unload"));
    assert_eq!(
        answer["message"],
        json!({"role": "assistant", "content": ""})
    );
}

#[test]
fn tool_arguments_are_always_an_object() {
    use crate::openai::{arguments_value, RAW_ARGUMENTS_KEY};
    assert_eq!(arguments_value(r#"{"a":1}"#), json!({"a": 1}));
    assert_eq!(arguments_value("  "), json!({}));
    // Cut by the token limit mid-call, or not an object at all: kept as text.
    for raw in [r#"{"a":"#, "[1,2]", "3", "null", "not json"] {
        assert_eq!(
            arguments_value(raw),
            json!({RAW_ARGUMENTS_KEY: raw}),
            "{raw}"
        );
    }
}

/// Ollama's own OpenAI-compatible API (and newer vLLM) sends the thinking as
/// `reasoning`: it is the thinking of the Ollama answer too, streamed and whole. Before,
/// it was dropped.
#[test]
fn thinking_sent_as_reasoning_is_thinking_too() {
    let mut s = Stream::new(Call::Chat, "m", true);
    let line = s
        .chunk(
            &chunk(json!({"choices": [{"delta": {"reasoning": "hmm"}}]})),
            "t",
        )
        .expect("a line for thinking alone");
    assert_eq!(line["message"]["thinking"], json!("hmm"));
    let answer = Completion::parse(
        json!({"choices": [{"finish_reason": "stop", "message": {"content": "4", "reasoning": "2+2"}}]})
            .to_string()
            .as_bytes(),
    )
    .expect("answer");
    let whole = from_openai(
        Call::Chat,
        &answer,
        "m",
        true,
        "t",
        Usage::default(),
        Timing::default(),
    );
    assert_eq!(whole["message"]["thinking"], json!("2+2"));
}

#[test]
fn a_reasoning_models_thinking_is_sent_as_ollama_does() {
    let mut s = Stream::new(Call::Chat, "m", true);
    let line = s
        .chunk(
            &chunk(json!({"choices": [{"delta": {"reasoning_content": "hmm"}}]})),
            "t",
        )
        .expect("a line for thinking alone");
    assert_eq!(line["message"]["thinking"], json!("hmm"));
    assert_eq!(line["message"]["content"], json!(""));
    assert_eq!(line["done"], json!(false));
    let mut g = Stream::new(Call::Generate, "m", true);
    let line = g
        .chunk(
            &chunk(json!({"choices": [{"delta": {"reasoning_content": "so"}}]})),
            "t",
        )
        .expect("line");
    assert_eq!(line["thinking"], json!("so"));
    assert!(s
        .chunk(&chunk(json!({"choices": [{"delta": {}}]})), "t")
        .is_none());
    let answer = Completion::parse(
        json!({"choices": [{"finish_reason": "stop", "message": {"content": "4", "reasoning_content": "2+2"}}]})
            .to_string()
            .as_bytes(),
    )
    .expect("answer");
    let whole = from_openai(
        Call::Chat,
        &answer,
        "m",
        true,
        "t",
        Usage::default(),
        Timing::default(),
    );
    assert_eq!(whole["message"]["thinking"], json!("2+2"));
    assert_eq!(whole["message"]["content"], json!("4"));
}

/// Some providers repeat `function.name` in every delta of a call: the name is the first
/// one, not the pieces joined ("get_weatherget_weather" named no tool the client has).
#[test]
fn a_streamed_tool_name_repeated_in_every_delta_is_taken_once() {
    let mut s = Stream::new(Call::Chat, "m", true);
    s.chunk(&chunk(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "get_weather", "arguments": "{\"city\""}}]}}]})), "t");
    s.chunk(&chunk(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "get_weather", "arguments": ":\"Oslo\"}"}}]}, "finish_reason": "tool_calls"}]})), "t");
    let last = s.finish("t", Usage::default(), Timing::default());
    assert_eq!(
        last["message"]["tool_calls"],
        json!([{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    );
}

/// Open WebUI and other Ollama clients send their history as they keep it, where a
/// retried or edited turn can leave one role after itself: strict chat templates (Gemma,
/// Mistral) refuse turns that do not alternate. Consecutive messages of one role are one,
/// as with the other APIs; nothing merges across a tool message.
#[test]
fn consecutive_turns_of_one_role_are_one_message() {
    let body = json!({"model": "m", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "user", "content": "in Oslo"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "-3C"},
        {"role": "assistant", "content": "Cold."},
        {"role": "assistant", "content": "Very."}
    ]});
    let r = chat_to_openai(&serde_json::to_vec(&body).unwrap()).expect("valid");
    let m = r.openai["messages"].as_array().expect("messages");
    let roles: Vec<_> = m.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(m[0]["content"], json!("weather?\n\nin Oslo"));
    assert_eq!(m[3]["content"], json!("Cold.\n\nVery."));
}

/// Options are numbers (and `stop` texts): an array of megabytes in `temperature` is
/// refused, not carried to the provider.
#[test]
fn options_that_are_not_numbers_are_refused() {
    let junk = vec![0; 10_000];
    for (key, bad) in [
        ("temperature", json!(junk)),
        ("seed", json!("7")),
        ("stop", json!([1])),
    ] {
        let mut options = serde_json::Map::new();
        options.insert(key.into(), bad);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "options": options});
        let e = chat_to_openai(body.to_string().as_bytes()).expect_err("not a number");
        assert_eq!(e.param().map(str::to_owned), Some(format!("options.{key}")));
    }
}

/// Ollama's `think`: `false` asks the template for no thinking and shows none, whatever
/// the model sends; `true` asks for it; a level goes as `reasoning_effort`; absent, as
/// before, nothing is sent and the thinking is shown. Anything else is a 400 naming
/// `think`. Before, `think` was dropped: `false` still showed the thinking.
#[test]
fn think_is_asked_of_the_template_and_decides_what_is_shown() {
    let chat = |think: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if !think.is_null() {
            body["think"] = think;
        }
        chat_to_openai(body.to_string().as_bytes())
    };
    let off = chat(json!(false)).unwrap();
    assert!(!off.thinking);
    assert_eq!(
        off.openai["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
    let on = chat(json!(true)).unwrap();
    assert!(on.thinking);
    assert_eq!(
        on.openai["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );
    for level in ["low", "medium", "high"] {
        let r = chat(json!(level)).unwrap();
        assert!(r.thinking);
        assert_eq!(r.openai["reasoning_effort"], json!(level));
        assert!(r.openai.get("chat_template_kwargs").is_none());
    }
    let unset = chat(Value::Null).unwrap();
    assert!(unset.thinking);
    assert!(unset.openai.get("chat_template_kwargs").is_none());
    assert!(unset.openai.get("reasoning_effort").is_none());
    for bad in [json!("max"), json!(1), json!({"on": true})] {
        let e = chat(bad.clone()).unwrap_err();
        assert_eq!(e.param(), Some("think"), "{bad}");
    }
    let gen = generate_to_openai(br#"{"model":"m","prompt":"hi","think":false}"#).unwrap();
    assert!(!gen.thinking);
    assert_eq!(
        gen.openai["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );

    // Shown or not, streamed and whole.
    let thought = chunk(json!({"choices": [{"delta": {"reasoning_content": "hmm"}}]}));
    let mut hidden = Stream::new(Call::Chat, "m", false);
    assert!(hidden.chunk(&thought, "t").is_none());
    let text = hidden
        .chunk(
            &chunk(json!({"choices": [{"delta": {"content": "4"}}]})),
            "t",
        )
        .expect("the text");
    assert_eq!(
        text["message"],
        json!({"role": "assistant", "content": "4"})
    );
    // Long hidden thinking: an empty line now and then, never the thinking.
    let lines: Vec<Value> = (0..QUIET_CHUNKS_PER_LINE * 2)
        .filter_map(|_| hidden.chunk(&thought, "t"))
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["message"], json!({"role": "assistant", "content": ""}));
        assert_eq!(l["done"], json!(false));
    }
    let answer = Completion::parse(
        json!({"choices": [{"finish_reason": "stop", "message": {"content": "4", "reasoning_content": "2+2"}}]})
            .to_string()
            .as_bytes(),
    )
    .expect("answer");
    for (call, show) in [
        (Call::Chat, false),
        (Call::Generate, false),
        (Call::Chat, true),
    ] {
        let whole = from_openai(
            call,
            &answer,
            "m",
            show,
            "t",
            Usage::default(),
            Timing::default(),
        );
        let thinking = match call {
            Call::Chat => &whole["message"]["thinking"],
            Call::Generate => &whole["thinking"],
        };
        assert_eq!(thinking.is_null(), !show, "{whole}");
    }
}
