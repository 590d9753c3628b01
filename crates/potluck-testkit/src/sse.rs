//! Reading an SSE response in tests, event by event.

use futures_util::StreamExt;

/// One parsed `data:` event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A JSON payload.
    Json(serde_json::Value),
    /// `[DONE]`
    Done,
}

/// Reads `data:` events from a streaming reqwest response.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl SseReader {
    /// Wrap a response.
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next event, or `None` when the stream ends (cleanly or not).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let data = data.join("\n");
                if data == "[DONE]" {
                    return Some(Event::Done);
                }
                return Some(Event::Json(
                    serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
                ));
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                _ => return None,
            }
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Some(e) = self.next().await {
            v.push(e);
        }
        v
    }
}
