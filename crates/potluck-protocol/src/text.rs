//! Text a stranger names things with (a model, a group, an agent's version, a receipt's
//! fields) and that a page or a terminal then shows: none of it may hold a character
//! that is not shown as itself.

/// A character that is not shown as itself: a control character (a terminal escape), a
/// bidirectional format character (which reorders what is shown around it: a model
/// named `gpt\u{202E}...` reads backwards), an invisible one (zero-width spaces and
/// joiners, the word joiner, the byte order mark, the soft hyphen, the combining grapheme
/// joiner, Hangul fillers, tag characters: two names that look alike and differ), a
/// space other than the plain one (a no-break or wide space reads as a plain space), or
/// a line or paragraph separator. Zero-width joiners are refused too, emoji sequences
/// and Persian or Indic words included: a name here is an identifier, not prose.
pub fn unprintable(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    c.is_control()
        || matches!(
            c,
            '\u{00A0}'
                | '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{1680}'
                | '\u{180E}'
                | '\u{2000}'..='\u{200F}'
                | '\u{2028}'..='\u{202F}'
                | '\u{205F}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{3000}'
                | '\u{3164}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// Whether `s` holds an [`unprintable`] character. ASCII text (model names, ids, the
/// usual case) is read a byte at a time, without the table of other characters.
pub fn has_unprintable(s: &str) -> bool {
    if s.is_ascii() {
        return s.bytes().any(|b| b.is_ascii_control());
    }
    s.chars().any(unprintable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_shown_as_itself() {
        for c in [
            '\u{1b}',
            '\n',
            '\u{7f}',
            '\u{85}',
            '\u{200B}',
            '\u{200D}',
            '\u{200E}',
            '\u{202E}',
            '\u{2028}',
            '\u{2066}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{061C}',
            '\u{00A0}',
            '\u{2003}',
            '\u{202F}',
            '\u{3000}',
            '\u{3164}',
            '\u{FFA0}',
            '\u{034F}',
            '\u{E0041}',
        ] {
            assert!(unprintable(c), "{:?}", c);
        }
        for c in [
            'a', ' ', '-', ':', '/', 'é', 'ß', '中', '\u{2013}', '\u{2070}',
        ] {
            assert!(!unprintable(c), "{:?}", c);
        }
        // The ASCII fast path says what the table says.
        for b in 0u8..=127 {
            let c = char::from(b);
            assert_eq!(unprintable(c), c.is_control(), "{b}");
            assert_eq!(has_unprintable(&c.to_string()), c.is_control(), "{b}");
        }
        assert!(has_unprintable("gpt\u{202E}4o"));
        assert!(!has_unprintable("hf.co/org/model:Q4_K_M"));
    }
}
