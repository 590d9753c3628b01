//! The walk over the prompt fields (`messages`, `prompt`, `input`, `tools`): counts text
//! and token ids, bounds nesting, and holds message content to the allow-list.
//!
//! Content parts (the objects of a message's `content` array, and any object in
//! `prompt` or `input`) are an allow-list, because a backend fetches what a part names
//! from inside the volunteer's network:
//!
//! - `{"type": "text", "text": ...}` (and an assistant's `"refusal"`);
//! - `{"type": "image_url", "image_url": {"url": "data:..."}}` (or the URL as a bare
//!   string): only `data:` URIs;
//! - `{"type": "input_audio", "input_audio": {"data": ..., "format": ...}}`: `data` is
//!   base64 or a `data:` URI, never a URL;
//! - a part's keys are `type`, `text`, `refusal`, `image_url`, `input_audio` and
//!   `cache_control`; its `type` is one of the four above and its payload is present.
//!
//! Anything else (`video_url`, `audio_url`, `file`, a `type` not known, a part without
//! one) is refused. An `image_url` anywhere else in `messages`, `prompt` or `input` must
//! be a `data:` URI too, and `video_url`, `audio_url`, `file` and `file_url` keys there
//! are refused. `tools` is only counted: a tool's parameter may be named `url`.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Shape, Walked};

/// How a walked value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// The `messages` array.
    Messages,
    /// One message.
    Message,
    /// A message's `content`.
    Content,
    /// One content part.
    Part,
    /// Anything else inside `messages`: `image_url` keys are checked.
    Nested,
    /// `prompt` or `input`: text counts, integers are token ids, objects are parts.
    TokenIds,
    /// Text counts (tools).
    Text,
    /// The value of an `image_url` key: a string must be a `data:` URI, an object must
    /// hold one under `url`, anything else is refused.
    ImageUrl,
    /// The `url` inside an `image_url` object: must be a `data:` URI string.
    Url,
    /// The value of an `input_audio` key: an object with `data` and `format`.
    Audio,
    /// The `data` of `input_audio`: base64 or a `data:` URI string.
    AudioData,
}

fn is_data_uri(s: &str) -> bool {
    s.trim_start()
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
}

/// Raw base64 (standard or URL-safe alphabet, padding, line breaks): no URL can hide in it.
fn is_base64(s: &str) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_' | b'\r' | b'\n')
    })
}

/// A key inside a walked object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InnerKey {
    Type,
    Text,
    Refusal,
    CacheControl,
    Content,
    ImageUrl,
    InputAudio,
    Url,
    Data,
    Format,
    /// `video_url`, `audio_url`, `file`, `file_url`: never forwarded.
    Remote,
    /// A key of [`MESSAGE_KEYS`] in another case (see [`super::folds_to`]).
    CaseVariant(&'static str),
    Other,
}

/// The keys of a message a backend reads, as sent: one in another case (`Content`) is
/// refused in a message, since ollama (Go's JSON decoder folds key case) would read it in
/// place of the one the guard and the rules read.
const MESSAGE_KEYS: &[&str] = &[
    "content",
    "role",
    "name",
    "tool_calls",
    "tool_call_id",
    "images",
    "thinking",
    "reasoning_content",
    "reasoning",
];

impl<'de> serde::Deserialize<'de> for InnerKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = InnerKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<InnerKey, E> {
                Ok(match s {
                    "type" => InnerKey::Type,
                    "text" => InnerKey::Text,
                    "refusal" => InnerKey::Refusal,
                    "cache_control" => InnerKey::CacheControl,
                    "content" => InnerKey::Content,
                    "image_url" => InnerKey::ImageUrl,
                    "input_audio" => InnerKey::InputAudio,
                    "url" => InnerKey::Url,
                    "data" => InnerKey::Data,
                    "format" => InnerKey::Format,
                    "video_url" | "audio_url" | "file" | "file_url" => InnerKey::Remote,
                    s => MESSAGE_KEYS
                        .iter()
                        .find(|k| **k != s && super::folds_to(s, k))
                        .map_or(InnerKey::Other, |k| InnerKey::CaseVariant(k)),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A content part's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartType {
    Text,
    Refusal,
    ImageUrl,
    InputAudio,
    Unknown,
}

/// A part's `type` value, and its length in bytes (it counts as prompt text, as every
/// string in `messages` does).
struct TypeValue(PartType, u64);

impl<'de> serde::Deserialize<'de> for TypeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'v> Visitor<'v> for V {
            type Value = TypeValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a part type")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TypeValue, E> {
                let ty = match s {
                    "text" => PartType::Text,
                    "refusal" => PartType::Refusal,
                    "image_url" => PartType::ImageUrl,
                    "input_audio" => PartType::InputAudio,
                    _ => PartType::Unknown,
                };
                Ok(TypeValue(ty, s.len() as u64))
            }
            // Any other JSON value as a type is no type we know.
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TypeValue, E> {
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<TypeValue, E> {
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TypeValue, E> {
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<TypeValue, E> {
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TypeValue, E> {
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_seq<A: SeqAccess<'v>>(self, mut seq: A) -> Result<TypeValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TypeValue(PartType::Unknown, 0))
            }
            fn visit_map<A: MapAccess<'v>>(self, mut map: A) -> Result<TypeValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TypeValue(PartType::Unknown, 0))
            }
        }
        d.deserialize_any(V)
    }
}

/// Walks one value, counting into `st`; returns its shape.
pub(super) struct Walk<'s> {
    pub(super) st: &'s mut Walked,
    /// Nesting of a container that starts here (the body's object is 1).
    pub(super) depth: usize,
    pub(super) max_depth: usize,
    pub(super) mode: Mode,
}

impl Walk<'_> {
    fn child(&mut self, mode: Mode) -> Walk<'_> {
        Walk {
            st: self.st,
            depth: self.depth + 1,
            max_depth: self.max_depth,
            mode,
        }
    }

    /// The mode of a container's elements (arrays) or of its other keys (objects).
    fn inner_mode(&self) -> Mode {
        match self.mode {
            Mode::Messages => Mode::Message,
            Mode::Content => Mode::Part,
            Mode::Message | Mode::Part | Mode::Nested => Mode::Nested,
            Mode::TokenIds => Mode::TokenIds,
            Mode::Text | Mode::ImageUrl | Mode::Url | Mode::Audio | Mode::AudioData => Mode::Text,
        }
    }

    /// The mode of the value under `key` in an object read in this mode.
    fn key_mode(&mut self, key: InnerKey) -> Mode {
        match (self.mode, key) {
            (Mode::Message, InnerKey::Content) => Mode::Content,
            (Mode::Message, InnerKey::CaseVariant(name)) => {
                self.st.case_variant.get_or_insert(name);
                self.inner_mode()
            }
            (Mode::Message | Mode::Nested | Mode::TokenIds, InnerKey::ImageUrl) => {
                self.st.images = self.st.images.saturating_add(1);
                Mode::ImageUrl
            }
            (Mode::Message | Mode::Nested | Mode::TokenIds, InnerKey::Remote) => {
                self.st.bad_part = true;
                Mode::Text
            }
            (Mode::ImageUrl, InnerKey::Url) => Mode::Url,
            (Mode::Audio, InnerKey::Data) => Mode::AudioData,
            (Mode::Audio, InnerKey::Format) => Mode::Text,
            (Mode::Audio, _) => {
                self.st.bad_part = true;
                Mode::Text
            }
            _ => self.inner_mode(),
        }
    }

    /// A string or array directly in a top-level `prompt` (or `input`) array is one
    /// prompt of a batch, each completed on its own.
    fn count_batch_item(&mut self) {
        if self.mode == Mode::TokenIds && self.depth == 3 {
            self.st.batch_items = self.st.batch_items.saturating_add(1);
        }
    }

    /// A scalar or array where only a `data:` URI (or an audio object) belongs.
    fn not_an_image(&mut self) {
        match self.mode {
            Mode::ImageUrl | Mode::Url => self.st.remote_image = true,
            Mode::Audio | Mode::AudioData => self.st.bad_part = true,
            _ => {}
        }
    }

    /// One content part, against the allow-list (see the module docs).
    fn part<'de, A: MapAccess<'de>>(mut self, mut map: A) -> Result<Shape, A::Error> {
        let mut ty = None;
        let (mut image, mut audio) = (false, false);
        while let Some(key) = map.next_key::<InnerKey>()? {
            let mode = match key {
                InnerKey::Type => {
                    let TypeValue(t, len) = map.next_value()?;
                    self.st.text_bytes = self.st.text_bytes.saturating_add(len);
                    if ty.replace(t).is_some() {
                        self.st.bad_part = true;
                    }
                    continue;
                }
                InnerKey::Text | InnerKey::Refusal | InnerKey::CacheControl => Mode::Text,
                InnerKey::ImageUrl => {
                    image = true;
                    self.st.images = self.st.images.saturating_add(1);
                    Mode::ImageUrl
                }
                InnerKey::InputAudio => {
                    audio = true;
                    self.st.audio_parts = self.st.audio_parts.saturating_add(1);
                    Mode::Audio
                }
                _ => {
                    self.st.bad_part = true;
                    Mode::Text
                }
            };
            map.next_value_seed(self.child(mode))?;
        }
        let allowed = match ty {
            Some(PartType::Text | PartType::Refusal) => true,
            Some(PartType::ImageUrl) => image,
            Some(PartType::InputAudio) => audio,
            Some(PartType::Unknown) | None => false,
        };
        if !allowed {
            self.st.bad_part = true;
        }
        Ok(Shape::Other)
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<Shape, E> {
        self.not_an_image();
        Ok(Shape::Other)
    }

    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<Shape, E> {
        self.not_an_image();
        if self.mode == Mode::TokenIds {
            self.st.token_ids = self.st.token_ids.saturating_add(1);
        }
        Ok(Shape::Other)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shape, E> {
        // A negative number is no token id, but it still costs the backend a token.
        self.visit_u64(v.unsigned_abs())
    }

    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<Shape, E> {
        self.not_an_image();
        Ok(Shape::Other)
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<Shape, E> {
        self.not_an_image();
        Ok(Shape::Null)
    }

    fn visit_str<E: de::Error>(mut self, s: &str) -> Result<Shape, E> {
        if is_data_uri(s) {
            return Ok(Shape::Other);
        }
        if self.mode == Mode::AudioData && is_base64(s) {
            // Audio bytes, not text: like a data: URI, they say nothing of the tokens.
            return Ok(Shape::Other);
        }
        self.not_an_image();
        self.count_batch_item();
        self.st.text_bytes = self.st.text_bytes.saturating_add(s.len() as u64);
        Ok(Shape::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Shape, A::Error> {
        self.not_an_image();
        self.count_batch_item();
        if self.depth > self.max_depth {
            self.st.too_deep = true;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Shape::Array);
        }
        let mode = self.inner_mode();
        let mut items: u64 = 0;
        while seq.next_element_seed(self.child(mode))?.is_some() {
            items = items.saturating_add(1);
        }
        Ok(if items == 0 {
            Shape::EmptyArray
        } else {
            Shape::Array
        })
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Shape, A::Error> {
        if self.depth > self.max_depth {
            self.st.too_deep = true;
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Shape::Other);
        }
        match self.mode {
            // A content object (not in an array) and objects in `prompt`/`input` are
            // parts too.
            Mode::Content | Mode::Part | Mode::TokenIds => return self.part(map),
            Mode::Url | Mode::AudioData => self.not_an_image(),
            _ => {}
        }
        let (mut url_seen, mut data_seen) = (false, false);
        while let Some(key) = map.next_key::<InnerKey>()? {
            let mode = self.key_mode(key);
            url_seen |= mode == Mode::Url;
            data_seen |= mode == Mode::AudioData;
            map.next_value_seed(self.child(mode))?;
        }
        if self.mode == Mode::ImageUrl && !url_seen {
            self.st.remote_image = true;
        }
        if self.mode == Mode::Audio && !data_seen {
            self.st.bad_part = true;
        }
        Ok(Shape::Other)
    }
}
