//! The agent's checks of a backend's answer: a streamed answer relayed line by line under
//! the line and size caps (`response::relay_sse`), and a whole answer read under the cap
//! and checked as JSON (`response::read_whole`). The first byte picks the piece size.
//! Whatever the backend sends, the relay ends (whole, or cut with one error event) and
//! never sends more than the cap plus that event. An odd first byte also has the model's
//! backend name (`m`) renamed to its public one (`p`, as long: the cap holds as it is),
//! so the pass that finds a chunk's top-level `model` reads every line too.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use potluck_agent::policy::Limits;
use potluck_agent::response::{read_whole, relay_sse, sse_error_event, Outcome, Rename, Usage};
use potluck_agent::slots::Bandwidth;
use tokio::time::Instant;

const MAX_LINE: usize = 200;
const MAX_RESPONSE: usize = 2048;

#[derive(Default, Clone)]
struct Seen(Arc<Mutex<(Option<Usage>, bool, bool)>>);

impl Outcome for Seen {
    fn usage(&mut self, u: Usage) {
        if let Ok(mut s) = self.0.lock() {
            s.0 = Some(u);
        }
    }
    fn cut(&mut self, _why: &'static str) {
        if let Ok(mut s) = self.0.lock() {
            s.1 = true;
        }
    }
    fn complete(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.2 = true;
        }
    }
}

fn body(
    wire: &[u8],
    step: usize,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
    let frames: Vec<_> = wire
        .chunks(step)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let limits = Limits {
        max_line_bytes: MAX_LINE,
        max_response_bytes: MAX_RESPONSE,
        ..Limits::default()
    };
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = Seen::default();
        let rename = if step % 2 == 1 {
            Rename::new("m", "p")
        } else {
            None
        };
        let relayed = relay_sse(
            body(wire, step),
            limits.clone(),
            deadline,
            Arc::new(Bandwidth::default()),
            seen.clone(),
            rename,
        )
        .collect()
        .await
        .map(|c| c.to_bytes());
        let out = relayed.expect("the relay's own body never fails");
        let (_, cut, complete) = *seen.0.lock().expect("no poisoning");
        assert!(cut != complete, "a relay ends exactly once: whole or cut");
        let error_event = sse_error_event("").len() + 128;
        assert!(
            out.len() <= MAX_RESPONSE + 1 + error_event,
            "relayed more than the cap"
        );
        if complete {
            assert!(std::str::from_utf8(&out).is_ok(), "relayed invalid UTF-8");
        }
        let _ = read_whole(body(wire, step), MAX_RESPONSE, deadline, true).await;
    });
});
