use super::header_text;
use http::{HeaderMap, HeaderValue};

/// What a hostile hub may put in the request id and pseudonym headers never reaches
/// the journal beyond letters, digits and `-_.:`, nor past its length.
#[test]
fn header_text_keeps_only_its_alphabet_and_length() {
    let mut h = HeaderMap::new();
    let cases: [(&[u8], Option<&str>); 6] = [
        (b"0195abc-def_1.2:3", Some("0195abc-")),
        (b"a-b_c.d:", Some("a-b_c.d:")),
        (b"a b\tc/../d", Some("abc..d")),
        (b"\"';<>|$", None),
        (b"abcdefghij", Some("abcdefgh")),
        (b"caf\xc3\xa9", None),
    ];
    for (raw, want) in cases {
        h.insert("x-t", HeaderValue::from_bytes(raw).unwrap());
        assert_eq!(
            header_text(&h, "x-t", 8).as_deref(),
            want,
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(header_text(&h, "absent", 8), None);
}
