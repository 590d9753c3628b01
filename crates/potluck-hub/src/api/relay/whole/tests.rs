use super::*;

/// The tree path's reading of an answer (without the guard): usage, text, body.
fn by_tree(bytes: &[u8], model: &str, id: &str) -> (Option<Usage>, (i64, i64, i64), Value) {
    let Value::Object(mut obj) = serde_json::from_slice::<Value>(bytes).unwrap() else {
        panic!("not an object")
    };
    let reported = Usage::from_obj(&obj);
    let mut seen = Delivered::default();
    seen.add_text_of(&obj);
    if obj.contains_key("model") {
        obj.insert("model".into(), Value::String(model.into()));
    }
    if obj.contains_key("id") {
        obj.insert("id".into(), Value::String(id.into()));
    }
    let seen = (seen.chunks, seen.chars, seen.slots);
    (reported, seen, Value::Object(obj))
}

#[test]
fn splice_agrees_with_the_tree() {
    let answers: &[&[u8]] = &[
        br#"{"id":"b-1","object":"chat.completion","model":"alias","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"you\" \u00e9"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#,
        br#" { "model" : "x" , "choices" : [ { "text" : "abc" } , 7 , [1,2,"zzzz"] ] } "#,
        br#"{"id":"i","choices":[{"message":{"content":null,"tool_calls":[]}},{"delta":{"content":"ab","reasoning_content":"cd"}}],"usage":null}"#,
        br#"{"choices":{"not":"an array"},"usage":{"prompt_tokens":"7","completion_tokens":-4}}"#,
        br#"{"choices":[{"message":{"content":["parts"],"reasoning_content":"counted as well"}}],"usage":[1]}"#,
        br#"{"choices":[{"message":{"content":"a","reasoning":"as Ollama names it"}},{"delta":{"reasoning":7}}]}"#,
        br#"{"choices":[{"index":1,"message":{"content":"b"}},{"index":0,"message":{"content":"a"}}]}"#,
        br#"{"choices":[{"index":7},{"index":-1},{"index":"9"},{"index":2.0},{"index":null},3]}"#,
        br#"{"choices":[{"index":18446744073709551615}]}"#,
        br#"{"choices":[{"message":{"tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}},{"function":{"arguments":7}},"x",{"function":"y"}]}}]}"#,
        br#"{"data":[{"embedding":[0.1,0.2]}],"model":"e","usage":{"prompt_tokens":2}}"#,
        br#"{}"#,
    ];
    for a in answers {
        let s = Spliced::read(a, "pub/model", "chatcmpl-42").unwrap();
        let (u, seen, v) = by_tree(a, "pub/model", "chatcmpl-42");
        let what = String::from_utf8_lossy(a);
        assert_eq!(s.reported, u, "usage of {what}");
        assert_eq!(
            (s.seen.chunks, s.seen.chars, s.seen.slots),
            seen,
            "text and choices of {what}"
        );
        let spliced: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(spliced, v, "body of {what}");
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&spliced), keys(&v), "field order of {what}");
    }
}

#[test]
fn splice_gives_way_to_the_tree() {
    for a in [
        &br#"[1]"#[..],
        br#"{"choices":[{"message":{"content":"a","content":"b"}}]}"#,
        br#"{"ch\u006fices":[]}"#,
        br#"{"model":"#,
        br#"not json"#,
    ] {
        assert!(
            Spliced::read(a, "m", "i").is_none(),
            "{}",
            String::from_utf8_lossy(a)
        );
    }
}

#[test]
fn splice_replaces_only_id_and_model_and_keeps_bytes() {
    let a = br#"{"id":"backend-id","model":"backend-alias","x":{"model":"inner"},"created":1}"#;
    let s = Spliced::read(a, "m\"q", "cmpl-1").unwrap();
    assert_eq!(
        std::str::from_utf8(&s.body).unwrap(),
        r#"{"id":"cmpl-1","model":"m\"q","x":{"model":"inner"},"created":1}"#
    );
}
