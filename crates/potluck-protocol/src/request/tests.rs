//! The cases only the parser decides: each rule of the module docs, its error and param.

use proptest::prelude::*;
use serde_json::json;

use super::*;

const CHAT: InferenceEndpoint = InferenceEndpoint::ChatCompletions;
const COMPLETIONS: InferenceEndpoint = InferenceEndpoint::Completions;
const EMBEDDINGS: InferenceEndpoint = InferenceEndpoint::Embeddings;
const LIMITS: RequestLimits = RequestLimits::new(1 << 20);
const CANARY: &str = "CANARY-4d1e";

fn parse(endpoint: InferenceEndpoint, body: &str) -> Result<InferenceRequest, RequestError> {
    InferenceRequest::parse(endpoint, body.as_bytes(), &LIMITS)
}

fn chat(body: &str) -> Result<InferenceRequest, RequestError> {
    parse(CHAT, body)
}

fn refused(endpoint: InferenceEndpoint, body: &str) -> RequestError {
    match parse(endpoint, body) {
        Ok(r) => panic!("accepted {body}: {r:?}"),
        Err(e) => {
            let wire = e.to_error_body().to_json();
            assert!(!wire.contains(CANARY), "an error quoted the body: {wire}");
            e
        }
    }
}

#[test]
fn reads_the_fields_routing_needs() {
    let r = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":7,"user":"alice","temperature":0.2}"#,
    )
    .unwrap();
    assert_eq!(r.model.as_str(), "m");
    assert!(r.stream && r.include_usage && r.has_stream_options);
    assert_eq!(
        r.token_limit,
        Some(TokenLimit {
            field: TokenField::MaxTokens,
            tokens: 7
        })
    );
    assert!(r.identifying_fields);
    assert!(!r.token_id_prompt);

    let r = chat(
        r#"{"model":"m","messages":[],"stream":null,"max_tokens":null,"max_completion_tokens":9}"#,
    )
    .unwrap();
    assert!(!r.stream && !r.include_usage && !r.has_stream_options && !r.identifying_fields);
    assert_eq!(
        r.token_limit,
        Some(TokenLimit {
            field: TokenField::MaxCompletionTokens,
            tokens: 9
        })
    );
    // include_usage other than `true` is not a request for usage.
    let r = chat(
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":"yes"}}"#,
    )
    .unwrap();
    assert!(r.has_stream_options && !r.include_usage);
    // Escaped keys are the same keys.
    let r = chat(r#"{"mod\u0065l":"m","messages":[],"max_tok\u0065ns":3}"#).unwrap();
    assert_eq!((r.model.as_str(), r.max_tokens()), ("m", Some(3)));
    // Whitespace around the body and its values is fine.
    let r =
        chat(" \n{ \"model\" : \"m\" , \"messages\" : [ ] , \"max_tokens\" : 12 }\r\n").unwrap();
    assert_eq!(r.max_tokens(), Some(12));
}

#[test]
fn every_refusal_names_its_param() {
    let cases: &[(InferenceEndpoint, &str, Option<&str>, &str)] = &[
        (
            CHAT,
            r#"{"messages":[]}"#,
            Some("model"),
            "missing_required_parameter",
        ),
        (
            CHAT,
            r#"{"model":null,"messages":[]}"#,
            Some("model"),
            "missing_required_parameter",
        ),
        (
            CHAT,
            r#"{"model":42,"messages":[]}"#,
            Some("model"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"","messages":[]}"#,
            Some("model"),
            "invalid_value",
        ),
        (
            CHAT,
            r#"{"model":" m","messages":[]}"#,
            Some("model"),
            "invalid_value",
        ),
        (
            CHAT,
            r#"{"model":"m"}"#,
            Some("messages"),
            "missing_required_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":null}"#,
            Some("messages"),
            "missing_required_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":{}}"#,
            Some("messages"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":"CANARY-4d1e"}"#,
            Some("messages"),
            "invalid_type",
        ),
        (
            COMPLETIONS,
            r#"{"model":"m"}"#,
            Some("prompt"),
            "missing_required_parameter",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"m","prompt":"x"}"#,
            Some("input"),
            "missing_required_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":"yes"}"#,
            Some("stream"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":1}"#,
            Some("stream"),
            "invalid_type",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"m","input":"x","stream":true}"#,
            Some("stream"),
            "unsupported_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream_options":{}}"#,
            Some("stream_options"),
            "invalid_parameter_combination",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":false,"stream_options":{"include_usage":true}}"#,
            Some("stream_options"),
            "invalid_parameter_combination",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":[]}"#,
            Some("stream_options"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":"x"}"#,
            Some("stream_options"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":-1}"#,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":1.5}"#,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":1e3}"#,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":"7"}"#,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_completion_tokens":true}"#,
            Some("max_completion_tokens"),
            "invalid_type",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":5,"max_completion_tokens":5}"#,
            Some("max_tokens"),
            "invalid_parameter_combination",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":0,"max_completion_tokens":900}"#,
            Some("max_tokens"),
            "invalid_parameter_combination",
        ),
        (
            CHAT,
            r#"{"model":"m","model":"n","messages":[]}"#,
            Some("model"),
            "duplicate_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","mod\u0065l":"n","messages":[]}"#,
            Some("model"),
            "duplicate_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"max_tokens":1,"max_tokens":900}"#,
            Some("max_tokens"),
            "duplicate_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"messages":[]}"#,
            Some("messages"),
            "duplicate_parameter",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[],"stream":false,"stream":true}"#,
            Some("stream"),
            "duplicate_parameter",
        ),
        (CHAT, r#"[1,2]"#, None, "invalid_json"),
        (CHAT, r#""CANARY-4d1e""#, None, "invalid_json"),
        (CHAT, r#"null"#, None, "invalid_json"),
        (
            CHAT,
            r#"{"model":"m","messages":[CANARY-4d1e"#,
            None,
            "invalid_json",
        ),
        (
            CHAT,
            r#"{"model":"m","messages":[]} {}"#,
            None,
            "invalid_json",
        ),
        (CHAT, "", None, "invalid_json"),
        (CHAT, "\u{feff}{}", None, "invalid_json"),
    ];
    for (endpoint, body, param, code) in cases {
        let e = refused(*endpoint, body);
        assert_eq!((e.param(), e.code()), (*param, *code), "{body}: {e}");
        assert_eq!(e.http_status(), 400);
        let wire = e.to_error_body();
        assert_eq!(wire.error.kind, "invalid_request_error");
        assert_eq!(wire.error.param.as_deref(), *param);
        assert!(!wire.error.message.is_empty());
    }
}

#[test]
fn invalid_json_says_where_it_broke() {
    match refused(CHAT, "{\"model\":\"m\",\n\"messages\":[}") {
        RequestError::InvalidJson { line, column } => assert_eq!((line, column), (2, 13)),
        e => panic!("{e:?}"),
    }
}

#[test]
fn size_and_depth_are_bounded() {
    let body = r#"{"model":"m","messages":[]}"#;
    let tight = RequestLimits::new(body.len() - 1);
    let e = InferenceRequest::parse(CHAT, body.as_bytes(), &tight).unwrap_err();
    assert_eq!(
        e,
        RequestError::TooLarge {
            limit: body.len() - 1
        }
    );
    assert_eq!((e.http_status(), e.code()), (413, "request_too_large"));
    InferenceRequest::parse(CHAT, body.as_bytes(), &RequestLimits::new(body.len())).unwrap();

    let limits = RequestLimits {
        max_body_bytes: 1 << 20,
        max_depth: 5,
    };
    // The body's object is 1, `messages` 2, a message 3, `content` 4, a part 5.
    let at_limit =
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#;
    InferenceRequest::parse(CHAT, at_limit.as_bytes(), &limits).unwrap();
    let over =
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":["x"]}]}]}"#;
    let e = InferenceRequest::parse(CHAT, over.as_bytes(), &limits).unwrap_err();
    assert_eq!(e, RequestError::TooDeep { limit: 5 });
    // Fields that are not walked may nest as deep as JSON allows.
    let deep_other = format!(
        r#"{{"model":"m","messages":[],"x":{}1{}}}"#,
        "[".repeat(20),
        "]".repeat(20)
    );
    InferenceRequest::parse(CHAT, deep_other.as_bytes(), &limits).unwrap();
    // Far deeper than serde_json's own limit: refused, without a stack overflow.
    let very_deep = format!(
        r#"{{"model":"m","messages":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        InferenceRequest::parse(CHAT, very_deep.as_bytes(), &RequestLimits::new(1 << 20)),
        Err(RequestError::TooDeep {
            limit: DEFAULT_MAX_DEPTH
        })
    );
}

#[test]
fn prompt_estimate_counts_text_tools_and_token_ids() {
    // "user" (4) + 9 bytes = 13 bytes: 4 tokens, rounded up.
    let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"123456789"}]}"#).unwrap();
    assert_eq!(r.prompt_estimate, 4);
    // Keys do not count; escapes count as the bytes they stand for ("é" is 2 bytes).
    let r = chat(r#"{"model":"m","messages":[{"r":"\u00e9\u00e9"}]}"#).unwrap();
    assert_eq!(r.prompt_estimate, 1);
    // Tools count: they go into the prompt.
    let r = chat(r#"{"model":"m","messages":[],"tools":[{"type":"12345678"}]}"#).unwrap();
    assert_eq!(r.prompt_estimate, 2);
    // Other fields do not.
    let r = chat(r#"{"model":"m","messages":[],"x":"12345678","max_tokens":5}"#).unwrap();
    assert_eq!(r.prompt_estimate, 0);
    // data: URIs do not count, in any case or after spaces.
    let r = chat(
        r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAAAAAAAAAAAAAA"}},{"type":"text","image_url":" DATA:x"}]}]}"#,
    )
    .unwrap();
    // "image_url" (9) and "text" (4) as `type` values: 4 tokens.
    assert_eq!(r.prompt_estimate, 4);
    // Token-id prompts: one token per id, with text rounded up on top.
    let r = parse(COMPLETIONS, r#"{"model":"m","prompt":[1,2,3,4,5]}"#).unwrap();
    assert_eq!(r.prompt_estimate, 5);
    assert!(r.token_id_prompt);
    let r = parse(COMPLETIONS, r#"{"model":"m","prompt":[[1,2],[3]]}"#).unwrap();
    assert_eq!(r.prompt_estimate, 3);
    let r = parse(EMBEDDINGS, r#"{"model":"m","input":["abcde",7]}"#).unwrap();
    assert_eq!((r.prompt_estimate, r.token_id_prompt), (3, true));
    let r = parse(COMPLETIONS, r#"{"model":"m","prompt":"abcd"}"#).unwrap();
    assert_eq!((r.prompt_estimate, r.token_id_prompt), (1, false));
    // Numbers in messages are not token ids.
    let r = chat(r#"{"model":"m","messages":[{"n":1}]}"#).unwrap();
    assert_eq!((r.prompt_estimate, r.token_id_prompt), (0, false));
}

#[test]
fn images_must_be_data_uris() {
    let ok = [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":"what"}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":"data:image/png;base64,AA"}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{"url":"data:x","detail":"high"},"type":"image_url"}]}]}"#,
        // `image_url` outside messages is not an image (a tool parameter may be named so).
        r#"{"model":"m","messages":[],"tools":[{"function":{"parameters":{"properties":{"image_url":{"type":"string"}}}}}]}"#,
    ];
    for body in ok {
        assert!(chat(body).is_ok(), "{body}");
    }
    let bad = [
        r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":{"url":"http://192.168.1.1/admin"}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":"file:///etc/passwd"}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{"url":" HTTPS://x"}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":5}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":null}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":["data:x"]}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{"url":{"url":"data:x"}}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{"url":"data:x","url":"http://x"}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image\u005furl":{"url":"http://x"}}]}]}"#,
        r#"{"model":"m","messages":[{"content":[{"image_url":{"ur\u006c":"http://x"}}]}]}"#,
        r#"{"model":"m","messages":[[[{"image_url":"http://deep"}]]]}"#,
    ];
    for body in bad {
        assert_eq!(chat(body), Err(RequestError::ImageUrlNotAllowed), "{body}");
    }
}

/// Each image part costs the model prompt tokens its bytes do not show (a 1x1 PNG is a
/// few hundred), so the rules count them for the hub's prompt bound, and hold them to
/// [`MAX_IMAGES`] as the other APIs' translators do. Before, a chat request could carry
/// any number.
#[test]
fn images_are_counted_and_at_most_max_images() {
    let body = |n: u32| {
        let part = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}});
        json!({"model": "m", "messages": [{"role": "user",
            "content": vec![part; n as usize]}]})
        .to_string()
    };
    assert_eq!(chat(&body(0)).unwrap().images, 0);
    let r = chat(&body(10)).unwrap();
    assert_eq!((r.images, r.has_images), (10, true));
    assert_eq!(chat(&body(MAX_IMAGES)).unwrap().images, MAX_IMAGES);
    let e = chat(&body(MAX_IMAGES + 1)).unwrap_err();
    assert_eq!(e, RequestError::TooManyImages { limit: MAX_IMAGES });
    assert_eq!(e.http_status(), 400);
    assert!(e.to_string().contains(&MAX_IMAGES.to_string()));
}

/// Audio parts are counted (each costs at least an encoder window of tokens, however few
/// its bytes): at most [`MAX_AUDIO_PARTS`], else a 400 in the API's words.
#[test]
fn audio_parts_are_counted_and_at_most_max_audio_parts() {
    let body = |n: u32| {
        let part =
            json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}});
        json!({"model": "m", "messages": [{"role": "user",
            "content": vec![part; n as usize]}]})
        .to_string()
    };
    assert_eq!(chat(&body(0)).unwrap().audio_parts, 0);
    let r = chat(&body(10)).unwrap();
    assert_eq!((r.audio_parts, r.images), (10, 0));
    assert_eq!(
        chat(&body(MAX_AUDIO_PARTS)).unwrap().audio_parts,
        MAX_AUDIO_PARTS
    );
    let e = chat(&body(MAX_AUDIO_PARTS + 1)).unwrap_err();
    assert_eq!(
        e,
        RequestError::TooManyAudioParts {
            limit: MAX_AUDIO_PARTS
        }
    );
    assert_eq!(e.http_status(), 400);
    assert_eq!(
        (e.code(), e.param()),
        ("too_many_audio_parts", Some("messages"))
    );
    assert!(e.to_string().contains(&MAX_AUDIO_PARTS.to_string()));
}

#[test]
fn provider_limits() {
    let limits = ModelLimits {
        max_tokens: Some(100),
        max_context: Some(200),
    };
    // 396 bytes + "user" = 400: 100 tokens of prompt, plus the inserted cap of 100.
    let fits = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(396)
    );
    let r = chat(&fits).unwrap();
    assert_eq!(r.completion_budget(&limits), 100);
    r.check_limits(&limits).unwrap();
    let over = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(397)
    );
    let e = chat(&over).unwrap().check_limits(&limits).unwrap_err();
    assert_eq!(
        e,
        RequestError::ContextLengthExceeded {
            param: "messages",
            limit: 200,
            need: 201,
            prompt: 101
        }
    );
    assert_eq!(e.code(), "context_length_exceeded");
    // A smaller max_tokens makes room for the prompt.
    let smaller = over.replacen('{', r#"{"max_tokens":50,"#, 1);
    chat(&smaller).unwrap().check_limits(&limits).unwrap();
    // Over the cap, named by the field that asked.
    for field in ["max_tokens", "max_completion_tokens"] {
        let e = chat(&format!(r#"{{"model":"m","messages":[],"{field}":101}}"#))
            .unwrap()
            .check_limits(&limits)
            .unwrap_err();
        assert_eq!((e.param(), e.code()), (Some(field), "max_tokens_exceeded"));
    }
    chat(r#"{"model":"m","messages":[],"max_tokens":100}"#)
        .unwrap()
        .check_limits(&limits)
        .unwrap();
    // Embeddings generate nothing: only the prompt counts, and max_tokens is not capped.
    let r = parse(
        EMBEDDINGS,
        r#"{"model":"m","input":[1,2,3],"max_tokens":5000}"#,
    )
    .unwrap();
    assert_eq!(r.context_need(&limits), 3);
    r.check_limits(&limits).unwrap();
    let e = parse(COMPLETIONS, r#"{"model":"m","prompt":"xxxxxxxx"}"#)
        .unwrap()
        .check_limits(&ModelLimits {
            max_tokens: None,
            max_context: Some(1),
        })
        .unwrap_err();
    assert_eq!(e.param(), Some("prompt"));
    // No caps, nothing to refuse; a huge max_tokens saturates.
    let r = chat(r#"{"model":"m","messages":[],"max_tokens":99999999999999999999}"#).unwrap();
    assert_eq!(r.max_tokens(), Some(u32::MAX));
    r.check_limits(&ModelLimits::default()).unwrap();
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for endpoint in InferenceEndpoint::ALL {
            if let Ok(r) = InferenceRequest::parse(endpoint, &bytes, &LIMITS) {
                prop_assert_eq!(r.endpoint, endpoint);
            }
        }
    }

    #[test]
    fn json_shaped_input_never_panics(s in r#"[{}\[\]",:0-9a-z_\\ ]{0,200}"#) {
        let body = format!(r#"{{"model":"m","messages":[{s}"#);
        let _ = InferenceRequest::parse(CHAT, body.as_bytes(), &LIMITS);
        let _ = InferenceRequest::parse(CHAT, s.as_bytes(), &LIMITS);
    }

    #[test]
    fn generated_requests_read_back(
        model in "[a-z][a-z0-9./:_-]{0,40}",
        text in ".{0,300}",
        stream in any::<bool>(),
        usage in any::<bool>(),
        max in proptest::option::of(any::<u32>()),
        completion_field in any::<bool>(),
    ) {
        let mut v = json!({"model": model, "messages": [{"role": "user", "content": text}], "stream": stream});
        if stream {
            v["stream_options"] = json!({"include_usage": usage});
        }
        if let Some(n) = max {
            v[if completion_field { "max_completion_tokens" } else { "max_tokens" }] = json!(n);
        }
        let r = InferenceRequest::parse(CHAT, &serde_json::to_vec(&v).unwrap(), &LIMITS).unwrap();
        prop_assert_eq!(r.model.as_str(), model.as_str());
        prop_assert_eq!(r.stream, stream);
        prop_assert_eq!(r.include_usage, stream && usage);
        prop_assert_eq!(r.max_tokens(), max);
        let bytes = ("user".len() + text.len()) as u64;
        prop_assert_eq!(u64::from(r.prompt_estimate), bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE));
    }
}

/// A stranger's request must not make the volunteer's backend fetch anything: content
/// parts are an allow-list (text; images and audio inline only), refused with a 400 in
/// the API's error shape before any provider sees them.
#[test]
fn content_parts_that_would_make_a_backend_fetch_are_refused() {
    let ok = [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"data:audio/wav;base64,UklGRg==","format":"wav"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"assistant","content":[{"type":"refusal","refusal":"no"}]}]}"#,
        // Text that mentions a URL is text.
        r#"{"model":"m","messages":[{"role":"user","content":"see http://example.org/x.png"}]}"#,
        // A tool may have parameters named like parts.
        r#"{"model":"m","messages":[],"tools":[{"function":{"parameters":{"properties":{"file":{},"video_url":{}}}}}]}"#,
        // A tool call's arguments are a string.
        r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{\"file\":\"http://x\"}"}}]}]}"#,
    ];
    for body in ok {
        assert!(chat(body).is_ok(), "{body}");
    }
    let bad = [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"video_url","video_url":{"url":"http://10.0.0.1/v.mp4"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"audio_url","audio_url":{"url":"http://10.0.0.1/a.wav"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-1"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_data":"data:application/pdf;base64,AA"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"http://10.0.0.1/a.wav","format":"wav"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"url":"http://x","data":"AA"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":"http://x"}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio"}]}]}"#,
        // A type not known, no type, two types, a type that is not a string.
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image","source":{"url":"http://x"}}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"text":"hi"}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","type":"video_url","text":"a"}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":["text"],"text":"a"}]}]}"#,
        // A text part that also carries a URL-bearing payload.
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a","video_url":{"url":"http://x"}}]}]}"#,
        // Escaped keys and type values are read as what they mean.
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"video\u005furl","video_url":{"url":"http://x"}}]}]}"#,
        // A content object instead of an array, and parts in completions and embeddings.
        r#"{"model":"m","messages":[{"role":"user","content":{"type":"file","file":{"file_id":"f"}}}]}"#,
        // URL-bearing keys elsewhere in a message.
        r#"{"model":"m","messages":[{"role":"user","content":"hi","audio_url":"http://x"}]}"#,
    ];
    for body in bad {
        let e = chat(body).unwrap_err();
        assert_eq!(e, RequestError::ContentPartNotAllowed, "{body}");
        assert_eq!(
            (e.http_status(), e.code(), e.param()),
            (400, "content_part_not_allowed", Some("messages"))
        );
    }
    for (endpoint, body) in [
        (
            COMPLETIONS,
            r#"{"model":"m","prompt":[{"type":"file","file":{"file_id":"f"}}]}"#,
        ),
        (
            EMBEDDINGS,
            r#"{"model":"m","input":[{"type":"video_url","video_url":{"url":"http://x"}}]}"#,
        ),
        (
            EMBEDDINGS,
            r#"{"model":"m","input":[{"type":"image_url","image_url":{"url":"http://x"}}]}"#,
        ),
    ] {
        assert!(parse(endpoint, body).is_err(), "{body}");
    }
}

#[test]
fn a_seed_is_noticed_and_cannot_appear_twice() {
    let m = r#""model":"m","messages":[]"#;
    let r = chat(&format!("{{{m}}}")).unwrap();
    assert!(!r.has_seed && !r.null_seed);
    let r = chat(&format!(r#"{{{m},"seed":42}}"#)).unwrap();
    assert!(r.has_seed && !r.null_seed);
    let r = chat(&format!(r#"{{{m},"seed":null}}"#)).unwrap();
    assert!(!r.has_seed && r.null_seed);
    assert_eq!(
        refused(CHAT, &format!(r#"{{{m},"seed":1,"seed":2}}"#)),
        RequestError::Duplicate("seed")
    );
}

#[test]
fn choices_count_n_best_of_and_batched_prompts() {
    let one = chat(r#"{"model":"m","messages":[]}"#).unwrap();
    assert_eq!(one.choices, 1);
    let r = chat(r#"{"model":"m","messages":[],"n":4}"#).unwrap();
    assert_eq!(r.choices, 4);
    let r = chat(r#"{"model":"m","messages":[],"n":null,"best_of":3}"#).unwrap();
    assert_eq!(r.choices, 3);
    // A single prompt, as text or token ids, is one; a batch is one per prompt.
    for (body, want) in [
        (r#"{"model":"m","prompt":"abc"}"#, 1),
        (r#"{"model":"m","prompt":[1,2,3]}"#, 1),
        (r#"{"model":"m","prompt":["a","b","c"]}"#, 3),
        (r#"{"model":"m","prompt":[[1,2],[3]],"n":2}"#, 4),
    ] {
        assert_eq!(parse(COMPLETIONS, body).unwrap().choices, want, "{body}");
    }
    for bad in [
        r#"{"model":"m","messages":[],"n":0}"#,
        r#"{"model":"m","messages":[],"n":17}"#,
        r#"{"model":"m","messages":[],"n":1.5}"#,
        r#"{"model":"m","messages":[],"best_of":"2"}"#,
    ] {
        let e = chat(bad).unwrap_err();
        assert!(matches!(e, RequestError::WrongType { .. }), "{bad}: {e:?}");
    }
    assert!(CHOICES_EXPECTED.ends_with(&MAX_CHOICES.to_string()));
}

#[test]
fn a_providers_token_cap_counts_every_choice() {
    let caps = ModelLimits {
        max_tokens: Some(100),
        max_context: None,
    };
    let one = chat(r#"{"model":"m","messages":[],"max_tokens":100}"#).unwrap();
    assert!(one.check_limits(&caps).is_ok());
    let four = chat(r#"{"model":"m","messages":[],"max_tokens":50,"n":4}"#).unwrap();
    assert!(matches!(
        four.check_limits(&caps),
        Err(RequestError::MaxTokensExceeded {
            asked: 200,
            cap: 100,
            ..
        })
    ));
    // No max_tokens: each choice may use the cap, so two choices pass it.
    let two = chat(r#"{"model":"m","messages":[],"n":2}"#).unwrap();
    assert!(two.check_limits(&caps).is_err());
    let batch = parse(
        COMPLETIONS,
        r#"{"model":"m","prompt":["a","b"],"max_tokens":50}"#,
    )
    .unwrap();
    assert!(
        batch.check_limits(&caps).is_ok(),
        "two prompts of 50 fit 100"
    );
}

/// A backend that matches keys without regard to case (ollama reads JSON with Go's
/// decoder, which also folds the Kelvin sign to `k` and the long s to `s`) would take a
/// second `Model` or `MAX_TOKENS` in place of the checked one: such keys are refused,
/// and so are a backend's own fields that override the checked ones (llama.cpp's
/// `n_predict` replaces `max_tokens`). Other keys in any case still pass.
#[test]
fn keys_a_backend_would_read_in_place_of_the_checked_ones_are_refused() {
    let m = r#""model":"m","messages":[]"#;
    for (key, field) in [
        ("Model", "model"),
        ("MAX_TOKENS", "max_tokens"),
        ("max_to\\u212Aens", "max_tokens"),
        ("Messages", "messages"),
        ("\\u017Ftream", "stream"),
        ("N", "n"),
    ] {
        let e = refused(CHAT, &format!(r#"{{{m},"{key}":1}}"#));
        assert_eq!(e, RequestError::CaseVariant(field), "{key}");
        assert_eq!(e.code(), "duplicate_parameter");
        assert_eq!(e.param(), Some(field));
    }
    for (key, field) in [
        ("n_predict", "n_predict"),
        ("N_Predict", "n_predict"),
        ("lora", "lora"),
        ("id_slot", "id_slot"),
        ("n_cmpl", "n_cmpl"),
        ("N_CMPL", "n_cmpl"),
        ("n_probs", "n_probs"),
        ("priority", "priority"),
        ("chat_template", "chat_template"),
        ("kv_transfer_params", "kv_transfer_params"),
    ] {
        let e = refused(CHAT, &format!(r#"{{{m},"max_tokens":5,"{key}":-1}}"#));
        assert_eq!(e, RequestError::BackendOverride(field), "{key}");
        assert_eq!(e.code(), "unsupported_parameter");
    }
    // A template's own switches pass; a template, or tokenizing, inside its kwargs does
    // not (vLLM before 0.11 took a whole template from there too).
    chat(&format!(
        r#"{{{m},"chat_template_kwargs":{{"enable_thinking":false}}}}"#
    ))
    .expect("a template's switch");
    chat(&format!(r#"{{{m},"chat_template_kwargs":null}}"#)).expect("null");
    for kwargs in [
        r#"{"chat_template":"{{ 7*7 }}"}"#,
        r#"{"enable_thinking":true,"Tokenize":true}"#,
    ] {
        let e = refused(CHAT, &format!(r#"{{{m},"chat_template_kwargs":{kwargs}}}"#));
        assert_eq!(
            e,
            RequestError::BackendOverride("chat_template_kwargs"),
            "{kwargs}"
        );
    }
    // Untracked keys pass whatever their case; a key that only starts like one passes.
    for key in [
        "Temperature",
        "top_p",
        "models",
        "max_tokens_x",
        "inputs",
        "k",
    ] {
        chat(&format!(r#"{{{m},"{key}":1}}"#)).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}

/// ollama folds key case inside a message too (`Content` read in place of `content`,
/// the text the guard and the rules read): a message key in another case is refused.
/// Keys in another case anywhere else (a tool's parameter named `Content`, a part's own
/// keys are checked as parts) are the consumer's own business.
#[test]
fn a_message_key_in_another_case_is_refused() {
    for (msg, field) in [
        (
            r#"{"role":"user","content":"benign","Content":"hidden"}"#,
            "content",
        ),
        (r#"{"Role":"system","role":"user","content":"x"}"#, "role"),
        (
            r#"{"role":"assistant","content":null,"Tool_Calls":[]}"#,
            "tool_calls",
        ),
    ] {
        let e = refused(CHAT, &format!(r#"{{"model":"m","messages":[{msg}]}}"#));
        assert_eq!(e, RequestError::CaseVariant(field), "{msg}");
    }
    let tools = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],
        "tools":[{"type":"function","function":{"name":"f","parameters":
        {"type":"object","properties":{"Content":{"type":"string"},"Role":{"type":"string"}}}}}]}"#;
    chat(tools).unwrap();
}

/// vLLM and llama.cpp check every stop string against the text after every token, for
/// every request of that server: `stop` is bounded in count and length, at the hub and
/// again at the agent, and a case variant (`Stop`, which ollama would read) is refused.
#[test]
fn stop_lists_are_bounded() {
    let long = "x".repeat(MAX_STOP_SEQUENCE_BYTES);
    let sixteen: Vec<&str> = vec!["a"; MAX_STOP_SEQUENCES];
    for good in [
        json!(null),
        json!("\n"),
        json!(long),
        json!([]),
        json!(sixteen),
        json!(["", "\u{00e9}\\\"", long]),
    ] {
        let body = json!({"model": "m", "messages": [], "stop": good}).to_string();
        assert!(chat(&body).is_ok(), "{good}");
    }
    let seventeen: Vec<&str> = vec!["a"; MAX_STOP_SEQUENCES + 1];
    let many: Vec<&str> = vec![""; 100_000];
    for bad in [
        json!(seventeen),
        json!(many),
        json!(format!("{long}x")),
        json!(["a", format!("{long}x")]),
        json!([1]),
        json!({"a": 1}),
        json!(true),
    ] {
        let body = json!({"model": "m", "messages": [], "stop": bad}).to_string();
        let e = chat(&body).unwrap_err();
        assert!(
            matches!(e, RequestError::WrongType { param: "stop", .. }),
            "{e:?}"
        );
    }
    let e = chat(r#"{"model":"m","messages":[],"Stop":["a"]}"#).unwrap_err();
    assert_eq!(e, RequestError::CaseVariant("stop"));
    let e = chat(r#"{"model":"m","messages":[],"stop":"a","stop":"b"}"#).unwrap_err();
    assert_eq!(e, RequestError::Duplicate("stop"));
    assert!(STOP_EXPECTED.contains(&format!("at most {MAX_STOP_SEQUENCES} strings")));
    assert!(STOP_EXPECTED.ends_with(&format!("{MAX_STOP_SEQUENCE_BYTES} bytes")));
}

/// An embeddings request's `encoding_format` is one of OpenAI's two forms (the answer is
/// checked against it); anything else is a 400 naming the field, without its value.
#[test]
fn an_embeddings_encoding_format_is_float_or_base64() {
    let with = |f: &str| format!(r#"{{"model":"m","input":"hi","encoding_format":{f}}}"#);
    let read = |body: &str| parse(EMBEDDINGS, body).map(|r| r.encoding);
    assert_eq!(
        read(r#"{"model":"m","input":"hi"}"#),
        Ok(EmbeddingEncoding::Float)
    );
    assert_eq!(read(&with("null")), Ok(EmbeddingEncoding::Float));
    assert_eq!(read(&with(r#""float""#)), Ok(EmbeddingEncoding::Float));
    assert_eq!(read(&with(r#""base64""#)), Ok(EmbeddingEncoding::Base64));
    assert_eq!(
        read(&with(r#""b\u0061se64""#)),
        Ok(EmbeddingEncoding::Base64)
    );
    for bad in [
        r#""int8""#,
        r#""FLOAT""#,
        r#""""#,
        "1",
        "[]",
        r#"{"a":1}"#,
        "true",
    ] {
        let e = refused(EMBEDDINGS, &with(bad));
        assert_eq!(e, RequestError::InvalidEncodingFormat, "{bad}");
        assert_eq!(e.http_status(), 400);
        assert_eq!(
            (e.param(), e.code()),
            (Some("encoding_format"), "invalid_value")
        );
        assert!(!e.to_string().contains("int8"));
    }
    // Sent twice, or in another case (which a backend might read instead): refused.
    let twice =
        r#"{"model":"m","input":"hi","encoding_format":"float","encoding_format":"base64"}"#;
    assert_eq!(
        refused(EMBEDDINGS, twice),
        RequestError::Duplicate("encoding_format")
    );
    let other_case =
        r#"{"model":"m","input":"hi","encoding_format":"float","Encoding_Format":"base64"}"#;
    assert_eq!(
        refused(EMBEDDINGS, other_case),
        RequestError::CaseVariant("encoding_format")
    );
    // Other endpoints do not read it.
    assert_eq!(
        chat(r#"{"model":"m","messages":[],"encoding_format":"x"}"#).map(|r| r.encoding),
        Ok(EmbeddingEncoding::Float)
    );
}
