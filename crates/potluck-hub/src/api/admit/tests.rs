//! Admission's body rules: what is forwarded, spliced or refused.

use super::*;

const MAX: usize = 1 << 20;

fn seed_of(endpoint: InferenceEndpoint, body: &'static [u8]) -> Value {
    let p = parse(endpoint, Bytes::from_static(body), MAX).unwrap();
    let v: Value = serde_json::from_slice(&p.body).unwrap();
    v["seed"].clone()
}

#[test]
fn every_generating_request_gets_a_fresh_seed_unless_it_has_one() {
    let chat = InferenceEndpoint::ChatCompletions;
    // Spliced without a tree: the rest of the body stays byte for byte.
    let raw = br#" {"model":"m", "messages":[],"temperature":0.7}"#;
    let p = parse(chat, Bytes::from_static(raw), MAX).unwrap();
    let text = std::str::from_utf8(&p.body).unwrap();
    let (head, rest) = text.split_once(',').unwrap();
    assert!(head.starts_with(r#" {"seed":"#), "{text}");
    assert_eq!(rest, r#""model":"m", "messages":[],"temperature":0.7}"#);
    let seeds: std::collections::HashSet<u64> = (0..20)
        .map(|_| seed_of(chat, raw).as_u64().unwrap())
        .collect();
    assert!(seeds.len() > 15, "fresh per request: {seeds:?}");
    assert!(seeds.iter().all(|s| *s < u64::from(u32::MAX)));
    // Completions too, and streamed ones (rewritten for usage) too.
    assert!(seed_of(
        InferenceEndpoint::Completions,
        br#"{"model":"m","prompt":"x"}"#
    )
    .is_u64());
    assert!(seed_of(chat, br#"{"model":"m","messages":[],"stream":true}"#).is_u64());
    // The consumer's own seed is kept; a null one is replaced (not duplicated).
    assert_eq!(seed_of(chat, br#"{"model":"m","messages":[],"seed":7}"#), 7);
    let p = parse(
        chat,
        Bytes::from_static(br#"{"model":"m","messages":[],"seed":null}"#),
        MAX,
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&p.body).matches("seed").count(), 1);
    assert!(seed_of(chat, br#"{"model":"m","messages":[],"seed":null}"#).is_u64());
}

use proptest::prelude::*;

proptest! {
    /// Whatever the body's shape, what the hub forwards passes the shared rules again
    /// (the agent applies them), reads the same, and carries exactly one seed: the
    /// consumer's if it set one.
    #[test]
    fn forwarded_bodies_parse_again_with_one_seed(
        pad in "[ \t\r\n]{0,3}",
        seed in proptest::option::of(prop_oneof![
            Just("null".to_owned()),
            (0u64..u64::MAX).prop_map(|n| n.to_string()),
        ]),
        stream in proptest::bool::ANY,
        options in proptest::option::of(prop_oneof![
            Just(r#"{"include_usage":true}"#),
            Just(r#"{"include_usage":false}"#),
            Just(r#"{"x":1}"#),
        ]),
        user in proptest::bool::ANY,
        completions in proptest::bool::ANY,
        extra in "[a-z]{1,8}",
    ) {
        let (endpoint, input) = if completions {
            (InferenceEndpoint::Completions, r#""prompt":"hi""#)
        } else {
            (InferenceEndpoint::ChatCompletions, r#""messages":[]"#)
        };
        let mut fields = vec![r#""model":"m""#.to_owned(), input.to_owned(), format!(r#""{extra}x":1"#)];
        if let Some(s) = &seed {
            fields.insert(1, format!(r#""seed":{s}"#));
        }
        if stream {
            fields.push(r#""stream":true"#.to_owned());
            if let Some(o) = options {
                fields.push(format!(r#""stream_options":{o}"#));
            }
        }
        if user {
            fields.push(r#""user":"u""#.to_owned());
        }
        let raw = format!("{pad}{{{}}}", fields.join(","));
        let p = parse(endpoint, Bytes::from(raw), MAX).unwrap();
        let again = InferenceRequest::parse(endpoint, &p.body, &RequestLimits::new(MAX)).unwrap();
        prop_assert!(again.has_seed && !again.null_seed && !again.identifying_fields);
        prop_assert_eq!(again.stream, stream);
        // A stream always asks its backend for usage, in one `stream_options`.
        prop_assert_eq!(again.include_usage, stream);
        let text = String::from_utf8_lossy(&p.body);
        prop_assert_eq!(text.matches("stream_options").count(), usize::from(stream));
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        if options == Some(r#"{"x":1}"#) && stream {
            prop_assert_eq!(&v["stream_options"]["x"], 1, "the consumer's options are kept");
        }
        match seed.as_deref() {
            Some(s) if s != "null" => prop_assert_eq!(v["seed"].to_string(), s),
            _ => prop_assert!(v["seed"].as_u64().is_some_and(|n| n < u64::from(u32::MAX))),
        }
    }
}

/// A stream that does not ask for usage gets the request for it written in front,
/// without a JSON tree: the rest of the body byte for byte. One that names
/// `stream_options` twice (to hide one from the hub) is refused.
#[test]
fn a_stream_is_asked_for_usage_without_a_tree() {
    let chat = InferenceEndpoint::ChatCompletions;
    let raw =
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"seed":3}"#;
    let p = parse(chat, Bytes::from_static(raw), MAX).unwrap();
    let text = std::str::from_utf8(&p.body).unwrap();
    assert_eq!(
        text,
        r#"{"stream_options":{"include_usage":true},"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"seed":3}"#
    );
    assert!(
        p.stream && !p.wants_usage,
        "the consumer did not ask for it"
    );
    let hidden = br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}}"#;
    match parse(chat, Bytes::from_static(hidden), MAX) {
        Err(ApiError::BadRequest { code, .. }) => {
            assert_eq!(code, Some("duplicate_parameter"));
        }
        other => panic!("not refused: {:?}", other.map(|p| p.body)),
    }
}

#[test]
fn parse_checks_and_strips() {
    let p = parse(
        InferenceEndpoint::ChatCompletions,
        Bytes::from_static(br#"{"model":"m","messages":[],"user":"alice@example.org","tools":[{"x":1}],"stream":true}"#),
        MAX,
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&p.body).unwrap();
    assert!(v.get("user").is_none(), "user never reaches a provider");
    assert!(v["seed"].is_u64(), "a rewritten body gets a seed too");
    assert_eq!(v["tools"][0]["x"], 1, "unknown fields pass through");
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert!(p.stream && !p.wants_usage);
    // A body that needs no change goes as it came, byte for byte.
    let plain = br#"{ "model": "m", "messages": [],  "temperature": 0, "seed": 5 }"#;
    let p = parse(
        InferenceEndpoint::ChatCompletions,
        Bytes::from_static(plain),
        MAX,
    )
    .unwrap();
    assert_eq!(&p.body[..], &plain[..]);
    // Embeddings generate nothing and get no seed.
    let emb = br#"{"model":"m","input":"x"}"#;
    let p = parse(InferenceEndpoint::Embeddings, Bytes::from_static(emb), MAX).unwrap();
    assert_eq!(&p.body[..], &emb[..]);
    // Both length fields: refused, as the agent refuses them.
    let both = br#"{"model":"m","messages":[],"max_tokens":1,"max_completion_tokens":2}"#;
    match parse(
        InferenceEndpoint::ChatCompletions,
        Bytes::from_static(both),
        MAX,
    ) {
        Err(ApiError::BadRequest { code, .. }) => {
            assert_eq!(code, Some("invalid_parameter_combination"))
        }
        _ => panic!("expected 400"),
    }

    for (body, param) in [
        (&br#"{"messages":[]}"#[..], Some("model")),
        (br#"{"model":5,"messages":[]}"#, Some("model")),
        (br#"{"model":"","messages":[]}"#, Some("model")),
        (br#"{"model":"m"}"#, Some("messages")),
        (br#"{"model":"m","messages":{}}"#, Some("messages")),
        (
            br#"{"model":"m","messages":[],"stream":"yes"}"#,
            Some("stream"),
        ),
        (br#"[1]"#, None),
        (br#"{"model":"#, None),
    ] {
        match parse(
            InferenceEndpoint::ChatCompletions,
            Bytes::from_static(body),
            MAX,
        ) {
            Err(ApiError::BadRequest { param: p, .. }) => assert_eq!(p, param),
            _ => panic!("expected 400"),
        }
    }
}
