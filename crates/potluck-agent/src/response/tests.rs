//! The relay of whole and streamed answers, against hostile backends.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::policy::Limits;
use http_body_util::{BodyExt, StreamBody};
use std::sync::Mutex;

pub(crate) fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Unpin {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|t| (t, rx))
    }))
}

type SeenState = (Option<Usage>, Option<&'static str>, bool);

#[derive(Default, Clone)]
struct Seen(Arc<Mutex<SeenState>>);

impl Outcome for Seen {
    fn usage(&mut self, u: Usage) {
        self.0.lock().unwrap().0 = Some(u);
    }
    fn cut(&mut self, why: &'static str) {
        self.0.lock().unwrap().1 = Some(why);
    }
    fn complete(&mut self) {
        self.0.lock().unwrap().2 = true;
    }
}

fn source(
    chunks: Vec<&'static [u8]>,
) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + Send {
    StreamBody::new(futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
    ))
}

fn limits() -> Limits {
    Limits {
        max_line_bytes: 128,
        max_response_bytes: 1024,
        ..Limits::default()
    }
}

async fn run(chunks: Vec<&'static [u8]>) -> (String, Seen) {
    let seen = Seen::default();
    let body = relay_sse(
        source(chunks),
        limits(),
        Instant::now() + std::time::Duration::from_secs(5),
        Arc::new(Bandwidth::default()),
        seen.clone(),
        None,
    );
    let out = body.collect().await.unwrap().to_bytes();
    (String::from_utf8(out.to_vec()).unwrap(), seen)
}

/// Relay what `rx` yields (a backend that may never end its answer) through
/// [`LookAhead`], as the agent does; what reached the hub, within 5 s.
async fn relay_open_backend(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    seen: Seen,
) -> Bytes {
    let body = crate::ending::LookAhead::new(Box::pin(relay_sse(
        StreamBody::new(tokio_stream_from(rx)),
        limits(),
        Instant::now() + std::time::Duration::from_secs(30),
        Arc::new(Bandwidth::default()),
        seen,
        None,
    )));
    tokio::time::timeout(std::time::Duration::from_secs(5), body.collect())
        .await
        .expect("the relay waited for the backend after [DONE]")
        .unwrap()
        .to_bytes()
}

/// A backend that keeps its answer open after `data: [DONE]` (or sends more) holds
/// neither the stream nor the slot: the relay ends at `[DONE]`, closes the event,
/// and reports the answer complete; nothing after `[DONE]` is relayed.
#[tokio::test]
async fn the_answer_ends_at_done_whatever_follows() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    for c in [
        &b"data: {\"choices\":[]}\n\n"[..],
        b"data: [DONE]\n",
        b"\ndata: late, in the same read\n\n",
        b"data: later\n\n",
    ] {
        tx.send(Ok(Frame::data(Bytes::from_static(c))))
            .await
            .unwrap();
    }
    let seen = Seen::default();
    let out = relay_open_backend(rx, seen.clone()).await;
    assert_eq!(&out[..], b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
    assert!(seen.0.lock().unwrap().2, "complete");
    drop(tx);
    // `[DONE]` split from its blank line, then nothing: the event is closed anyway.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n"))))
        .await
        .unwrap();
    let out = relay_open_backend(rx, Seen::default()).await;
    assert_eq!(&out[..], b"data: [DONE]\n\n");
    drop(tx);
}

#[tokio::test]
async fn sse_lines_pass_and_usage_is_read() {
    let (out, seen) = run(vec![
        b"data: {\"choices\":[]}\n",
        b"\ndata: {\"choices\":[],\"us",
        b"age\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
    ])
    .await;
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    let s = seen.0.lock().unwrap();
    assert_eq!(
        s.0,
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4
        })
    );
    assert!(s.2 && s.1.is_none());
}

/// What the relay makes of `frames`: the bytes relayed and what it saw.
async fn relay_frames(frames: Vec<Bytes>) -> (Vec<u8>, SeenState) {
    relay_renamed(frames, None).await
}

/// [`relay_frames`] with the backend's name for the model replaced.
async fn relay_renamed(frames: Vec<Bytes>, rename: Option<Rename>) -> (Vec<u8>, SeenState) {
    let seen = Seen::default();
    let body = relay_sse(
        StreamBody::new(futures_util::stream::iter(
            frames
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
        )),
        limits(),
        Instant::now() + std::time::Duration::from_secs(5),
        Arc::new(Bandwidth::default()),
        seen.clone(),
        rename,
    );
    let out = body.collect().await.unwrap().to_bytes().to_vec();
    let state = *seen.0.lock().unwrap();
    (out, state)
}

/// Frames of whole lines are relayed as they came, others line by line through the
/// buffer: however a backend splits its answer, the hub gets the same bytes and the
/// agent sees the same usage, end and cut.
#[tokio::test]
async fn any_framing_relays_the_same() {
    let streams: [&[u8]; 5] = [
        b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
        b": comment\r\ndata: {\"a\":1}\r\n\r\ndata: [DONE]\n\ndata: after\n\n",
        b"data: {\"a\":1}\n\ndata: \xff\n\ndata: [DONE]\n\n",
        b"data: {\"a\":1}\n\ndata: [DONE]\n",
        b"data: ok\n\ndata: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\n\n",
    ];
    for stream in streams {
        let whole = relay_frames(vec![Bytes::from_static(stream)]).await;
        let bytewise = stream.iter().map(|b| Bytes::from(vec![*b])).collect();
        assert_eq!(relay_frames(bytewise).await, whole, "byte by byte");
        let lines = stream
            .split_inclusive(|b| *b == b'\n')
            .map(Bytes::copy_from_slice)
            .collect();
        assert_eq!(relay_frames(lines).await, whole, "line by line");
        for at in 1..stream.len() {
            let (a, b) = stream.split_at(at);
            let two = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
            assert_eq!(relay_frames(two).await, whole, "split at {at}");
        }
    }
}

/// Each chunk's top-level `model` is renamed whatever the framing, in a frame of whole
/// lines as in one split anywhere; a content that is the backend's name is not.
#[tokio::test]
async fn any_framing_renames_only_the_model() {
    let stream: &[u8] = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"m\"}}]}\n\n: m\ndata: {\"choices\":[],\"model\":\"m\"}\n\ndata: [DONE]\n\n";
    let want: &[u8] = b"data: {\"model\":\"p\",\"choices\":[{\"delta\":{\"content\":\"m\"}}]}\n\n: m\ndata: {\"choices\":[],\"model\":\"p\"}\n\ndata: [DONE]\n\n";
    let rename = || Rename::new("m", "p");
    let whole = relay_renamed(vec![Bytes::from_static(stream)], rename()).await;
    assert_eq!(
        String::from_utf8_lossy(&whole.0),
        String::from_utf8_lossy(want)
    );
    for at in 1..stream.len() {
        let (a, b) = stream.split_at(at);
        let two = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
        assert_eq!(relay_renamed(two, rename()).await, whole, "split at {at}");
    }
    let lines = stream
        .split_inclusive(|b| *b == b'\n')
        .map(Bytes::copy_from_slice)
        .collect();
    assert_eq!(relay_renamed(lines, rename()).await, whole, "line by line");
}

#[tokio::test]
async fn bad_streams_are_cut_cleanly() {
    let too_much: Vec<&'static [u8]> = std::iter::repeat_n([&[b'y'; 60][..], &b"\n"[..]], 20)
        .flatten()
        .collect();
    for chunks in [
        vec![&b"data: ok\n\n"[..], &[b'x'; 200][..]],
        vec![&b"data: \xff\xfe\n\n"[..]],
        too_much,
    ] {
        let (out, seen) = run(chunks).await;
        assert!(out.ends_with("\"code\":\"agent_error\"}}\n\n"), "{out}");
        assert!(!out.contains("[DONE]"));
        let s = seen.0.lock().unwrap();
        assert!(s.1.is_some() && !s.2);
    }
}

#[tokio::test]
async fn whole_answers_checked() {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let (_, u) = read_whole(
        source(vec![
            b"{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"x\":[1]}",
        ]),
        1024,
        deadline,
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        u,
        Some(Usage {
            prompt_tokens: 1,
            completion_tokens: 2
        })
    );
    assert_eq!(
        read_whole(source(vec![b"{\"a\":"]), 1024, deadline, true)
            .await
            .unwrap_err(),
        WholeError::Malformed
    );
    assert_eq!(
        read_whole(source(vec![&[b' '; 2000]]), 1024, deadline, true)
            .await
            .unwrap_err(),
        WholeError::TooLarge
    );
    read_whole(
        source(vec![b"not json but an error"]),
        1024,
        deadline,
        false,
    )
    .await
    .unwrap();
}

/// A hostile hub stops granting HTTP/2 window and keeps asking: a whole answer is handed
/// to the tunnel in pieces of at most `MAX_WHOLE_PIECE_BYTES`, its last byte alone, and
/// it is complete (its slot freed) only once all but that byte have been taken. Before, with no bandwidth cap the
/// answer went as one frame of up to `max_response_bytes`, completed at once, and HTTP/2
/// held its bytes for as long as the tunnel lived.
#[tokio::test]
async fn a_whole_answer_goes_in_pieces_and_completes_when_taken() {
    let seen = Seen::default();
    let answer = Bytes::from(vec![b'x'; 3 * MAX_WHOLE_PIECE_BYTES + 5]);
    // Through the tunnel's server's look-ahead, as the agent sends it.
    let mut body = std::pin::pin!(crate::ending::LookAhead::new(Box::pin(paced_whole(
        answer.clone(),
        Arc::new(Bandwidth::default()),
        seen.clone(),
        Instant::now() + std::time::Duration::from_secs(60),
    ))));
    let mut got: Vec<Bytes> = Vec::new();
    while let Some(f) = body.frame().await {
        let piece = f.unwrap().into_data().unwrap();
        assert!(piece.len() <= MAX_WHOLE_PIECE_BYTES, "{}", piece.len());
        let done = seen.0.lock().unwrap().2;
        if done {
            assert_eq!(
                piece.len(),
                1,
                "complete with only the last byte left to take"
            );
        }
        got.push(piece);
    }
    assert_eq!(got.concat(), answer);
    assert_eq!(got.last().map(Bytes::len), Some(1), "the last byte alone");
    assert!(seen.0.lock().unwrap().2, "complete once taken");

    // Taken past its time (a hub taking a piece now and then): the rest is not sent.
    let late = Seen::default();
    let mut body = std::pin::pin!(paced_whole(
        answer,
        Arc::new(Bandwidth::default()),
        late.clone(),
        Instant::now(),
    ));
    assert!(body.frame().await.unwrap().is_err());
    assert!(body.frame().await.is_none());
    let state = late.0.lock().unwrap();
    assert_eq!(
        (state.1, state.2),
        (
            Some("the hub took the answer past the response time limit"),
            false
        )
    );
}

/// A hostile hub takes a streamed answer a frame now and then while the backend's frames
/// are always ready (generation is over, or the backend is fast): the answer is cut at
/// its time limit all the same, and its slot freed. Before, the limit was only looked at
/// when the backend had nothing ready, so such a hub held the answer without end.
#[tokio::test(start_paused = true)]
async fn a_hub_that_reads_slowly_does_not_hold_an_answer_past_its_time() {
    let seen = Seen::default();
    let endless = futures_util::stream::repeat_with(|| {
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"data: {\"x\":1}\n\n")))
    });
    let limits = Limits {
        max_line_bytes: 128,
        max_response_bytes: 1 << 30,
        ..Limits::default()
    };
    let body = relay_sse(
        StreamBody::new(endless),
        limits,
        Instant::now() + std::time::Duration::from_secs(1),
        Arc::new(Bandwidth::default()),
        seen.clone(),
        None,
    );
    let mut body = std::pin::pin!(body);
    let mut frames = 0;
    let mut last = Bytes::new();
    while let Some(f) = body.frame().await {
        last = f.unwrap().into_data().unwrap();
        frames += 1;
        assert!(frames < 1000, "still relaying past the time limit");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(String::from_utf8_lossy(&last).contains("response time limit"));
    assert_eq!(
        seen.0.lock().unwrap().1,
        Some("the backend's answer exceeded the response time limit")
    );
}

/// A backend that fails mid-stream says why in its own words (vLLM: CUDA's out-of-memory
/// text with the GPU and process ids): the hub gets the agent's error event, none of
/// that text, whether the line comes in a frame of its own or split across frames.
#[tokio::test]
async fn a_backends_error_event_mid_stream_reaches_the_hub_in_the_agents_words() {
    for chunks in [
        vec![
            &b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"[..],
            b"data: {\"error\":{\"message\":\"CUDA out of memory on GPU 0, pid 4242\"}}\n\n",
        ],
        vec![
            &b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"err"[..],
            b"or\":{\"message\":\"CUDA out of memory on GPU 0, pid 4242\"}}\n\n",
        ],
    ] {
        let (out, seen) = run(chunks).await;
        assert!(out.contains("\"content\":\"hi\""), "{out}");
        assert!(!out.contains("CUDA") && !out.contains("4242"), "{out}");
        assert!(
            out.contains("\"error\""),
            "the stream ends in an error: {out}"
        );
        assert_eq!(
            seen.0.lock().unwrap().1,
            Some("the backend failed during generation")
        );
    }
    // Content that quotes the word is content.
    let (out, seen) = run(vec![
        b"data: {\"choices\":[{\"delta\":{\"content\":\"an \\\"error\\\"\"}}]}\n\ndata: [DONE]\n\n",
    ])
    .await;
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    assert_eq!(seen.0.lock().unwrap().1, None);
}
