//! The budget of whole answers the hub holds at once (`max_buffered_answer_bytes`). A whole
//! answer takes its share as its bytes arrive from the provider and gives it back when
//! its consumer has taken the last of it, or gone: many large answers that nobody reads
//! cannot grow the hub's memory past the budget (each is also closed after
//! `server.consumer_stall_timeout`, `http/stall.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use potluck_tunnel::TunnelBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget's unit, in bytes.
const UNIT: usize = 1024;

/// The budget, shared by every request.
pub(crate) struct Budget {
    units: Arc<Semaphore>,
}

impl Budget {
    /// A budget of `bytes` (rounded up to the unit: an answer of at most `bytes` always
    /// fits an empty budget).
    pub(crate) fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
        }
    }

    /// An empty share, grown as an answer arrives.
    pub(crate) fn share(&self) -> Share {
        Share {
            units: Arc::clone(&self.units),
            held: None,
            bytes: 0,
        }
    }
}

/// One answer's part of the budget, given back when dropped.
pub(crate) struct Share {
    units: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Share {
    /// Take room for `n` more bytes; `false` (and nothing taken) when the budget has none.
    fn grow(&mut self, n: usize) -> bool {
        let bytes = self.bytes.saturating_add(n);
        let want = bytes.div_ceil(UNIT);
        let have = self
            .held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        if want > have {
            let Ok(more) = u32::try_from(want - have) else {
                return false;
            };
            let Ok(permit) = Arc::clone(&self.units).try_acquire_many_owned(more) else {
                return false;
            };
            match &mut self.held {
                Some(held) => held.merge(permit),
                None => self.held = Some(permit),
            }
        }
        self.bytes = bytes;
        true
    }

    /// `body`, which keeps this share until it is dropped.
    pub(crate) fn hold(self, body: Body) -> Body {
        Body::new(Held {
            inner: body,
            _share: self,
        })
    }
}

/// Why a whole answer could not be gathered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Shortfall {
    /// The provider's body failed, or passed `max` bytes.
    Provider,
    /// The budget had no room left.
    Budget,
}

/// Gather `body`'s data under `max` bytes, growing `share` with each frame. One frame is
/// kept as it is; several are joined.
pub(crate) async fn gather(
    mut body: TunnelBody,
    max: usize,
    mut share: Share,
) -> Result<(Bytes, Share), Shortfall> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Shortfall::Provider)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len());
        if total > max {
            return Err(Shortfall::Provider);
        }
        if !share.grow(data.len()) {
            return Err(Shortfall::Budget);
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut j = BytesMut::with_capacity(f.len() + data.len());
                j.extend_from_slice(f);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
            (_, Some(j)) => j.extend_from_slice(&data),
        }
    }
    let bytes = joined.map(BytesMut::freeze).or(first).unwrap_or_default();
    Ok((bytes, share))
}

/// A response body that keeps its answer's [`Share`] until the server drops it.
struct Held {
    inner: Body,
    _share: Share,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_take_whole_units_and_give_them_back() {
        let budget = Budget::new(4 * UNIT);
        let mut a = budget.share();
        assert!(a.grow(1));
        assert!(a.grow(UNIT - 1), "still one unit");
        assert_eq!(budget.units.available_permits(), 3);
        assert!(a.grow(2 * UNIT));
        assert_eq!(budget.units.available_permits(), 1);
        let mut b = budget.share();
        assert!(!b.grow(2 * UNIT), "no room");
        assert_eq!(
            budget.units.available_permits(),
            1,
            "a refusal takes nothing"
        );
        drop(a);
        assert!(b.grow(2 * UNIT));
        assert_eq!(budget.units.available_permits(), 2);
    }

    #[test]
    fn an_answer_as_large_as_a_small_budget_fits_it() {
        let budget = Budget::new(100);
        let mut a = budget.share();
        assert!(a.grow(100));
        assert!(!budget.share().grow(1));
    }
}
