//! The backend's name for a model, in its answers, replaced by the public one. The agent
//! sends the backend its own name (a file path for a model named by its path: llama.cpp
//! and vLLM serve `/home/alice/models/x.gguf` under that name), and backends echo it in
//! every answer's and chunk's `model`: left there, every hub would learn the volunteer's
//! user name and directories, which the offer itself hides.
//!
//! The name is matched as a whole JSON string, quotes included: text inside a string
//! (an answer quoting the path) has its quotes escaped and is never matched.

use memchr::memmem::Finder;

/// One model's backend name → public name, as JSON strings.
#[derive(Debug, Clone)]
pub struct Rename {
    from: Finder<'static>,
    to: Box<[u8]>,
}

impl Rename {
    /// The rename of `backend` to `public`; `None` when they are the same name.
    pub fn new(backend: &str, public: &str) -> Option<Self> {
        if backend == public {
            return None;
        }
        let from = serde_json::to_vec(backend).ok()?;
        let to = serde_json::to_vec(public).ok()?;
        Some(Self {
            from: Finder::new(&from).into_owned(),
            to: to.into_boxed_slice(),
        })
    }

    /// Whether `data` holds the backend's name.
    pub fn found_in(&self, data: &[u8]) -> bool {
        self.from.find(data).is_some()
    }

    /// `data` with every occurrence of the backend's name replaced; `None` when it holds
    /// none.
    pub fn apply(&self, data: &[u8]) -> Option<Vec<u8>> {
        let mut at = self.from.find_iter(data).peekable();
        at.peek()?;
        let n = self.from.needle().len();
        let mut out = Vec::with_capacity(data.len() + self.to.len());
        let mut last = 0;
        for i in at {
            out.extend_from_slice(&data[last..i]);
            out.extend_from_slice(&self.to);
            last = i + n;
        }
        out.extend_from_slice(&data[last..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backends_name_is_replaced_as_a_whole_json_string_only() {
        let r = Rename::new("/home/alice/m.gguf", "smol").unwrap();
        let answer = br#"{"model":"/home/alice/m.gguf","choices":[{"delta":{"content":"see \"/home/alice/m.gguf\""}}]}"#;
        let out = String::from_utf8(r.apply(answer).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"smol","choices":[{"delta":{"content":"see \"/home/alice/m.gguf\""}}]}"#
        );
        assert!(r.apply(br#"{"model":"smol"}"#).is_none());
        assert!(Rename::new("same", "same").is_none());
        let quoted = Rename::new("C:\\m\"x", "p").unwrap();
        assert_eq!(
            quoted.apply(br#"{"model":"C:\\m\"x"}"#).unwrap(),
            br#"{"model":"p"}"#
        );
    }
}
