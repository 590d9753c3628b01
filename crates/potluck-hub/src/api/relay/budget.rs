//! The budget of whole answers the hub holds at once (`max_buffered_answer_bytes`). A whole
//! answer takes its share as its bytes arrive from the provider and gives it back when
//! its consumer has taken the last of it, or gone: many large answers that nobody reads
//! cannot grow the hub's memory past the budget (each is also closed after
//! `server.consumer_stall_timeout`, `http/stall.rs`). One provider's answers hold at most
//! [`PROVIDER_PART`] of it (or one answer of `max_response_bytes`, if that is more): a
//! provider that sends large answers slowly, to consumers of its own, cannot take the
//! whole budget and make every other whole answer on the hub a 503.

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

/// The part of the budget one provider's answers may hold at once: one sixteenth.
pub(crate) const PROVIDER_PART: usize = 16;

/// The budget, shared by every request.
pub(crate) struct Budget {
    units: Arc<Semaphore>,
    /// Each provider's own part, made on its first answer.
    providers: parking_lot::Mutex<std::collections::HashMap<i64, Arc<Semaphore>>>,
    provider_units: usize,
}

impl Budget {
    /// A budget of `bytes` (rounded up to the unit: an answer of at most `bytes` always
    /// fits an empty budget), of which one provider holds at most a [`PROVIDER_PART`]th
    /// or `largest` (one whole answer), whichever is more.
    pub(crate) fn new(bytes: usize, largest: usize) -> Self {
        let units = bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS);
        let provider_units = (units / PROVIDER_PART)
            .max(largest.div_ceil(UNIT))
            .min(units);
        Self {
            units: Arc::new(Semaphore::new(units)),
            providers: Default::default(),
            provider_units,
        }
    }

    /// An empty share of `provider`'s answer, grown as it arrives.
    pub(crate) fn share(&self, provider: i64) -> Share {
        let part = Arc::clone(
            self.providers
                .lock()
                .entry(provider)
                .or_insert_with(|| Arc::new(Semaphore::new(self.provider_units))),
        );
        Share {
            units: Arc::clone(&self.units),
            part,
            held: None,
            bytes: 0,
        }
    }
}

/// One answer's part of the budget (and of its provider's part), given back when
/// dropped.
pub(crate) struct Share {
    units: Arc<Semaphore>,
    part: Arc<Semaphore>,
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    bytes: usize,
}

impl Share {
    /// Take room for `n` more bytes; `false` (and nothing taken) when the budget has none.
    fn grow(&mut self, n: usize) -> bool {
        let bytes = self.bytes.saturating_add(n);
        let want = bytes.div_ceil(UNIT);
        let have = self.held.as_ref().map_or(0, |(h, _)| h.num_permits());
        if want > have {
            let Ok(more) = u32::try_from(want - have) else {
                return false;
            };
            // The provider's part first: a refusal there takes nothing from the budget.
            let Ok(part) = Arc::clone(&self.part).try_acquire_many_owned(more) else {
                return false;
            };
            let Ok(permit) = Arc::clone(&self.units).try_acquire_many_owned(more) else {
                return false;
            };
            match &mut self.held {
                Some((held, held_part)) => {
                    held.merge(permit);
                    held_part.merge(part);
                }
                None => self.held = Some((permit, part)),
            }
        }
        self.bytes = bytes;
        true
    }

    /// `body`, which keeps this share until it is dropped.
    pub(crate) fn hold(self, body: Body) -> Body {
        keeping(body, self)
    }
}

/// `body`, which keeps `kept` (an answer's [`Share`], or the body that holds one) until
/// the server drops it: a whole answer translated into another API's shape keeps the
/// share of the answer it was made from for as long as it is waiting to be read.
pub(crate) fn keeping<K: Send + Unpin + 'static>(body: Body, kept: K) -> Body {
    Body::new(Held {
        inner: body,
        _kept: kept,
    })
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
struct Held<K> {
    inner: Body,
    _kept: K,
}

impl<K: Unpin> http_body::Body for Held<K> {
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
        let budget = Budget::new(4 * UNIT, 4 * UNIT);
        let mut a = budget.share(1);
        assert!(a.grow(1));
        assert!(a.grow(UNIT - 1), "still one unit");
        assert_eq!(budget.units.available_permits(), 3);
        assert!(a.grow(2 * UNIT));
        assert_eq!(budget.units.available_permits(), 1);
        let mut b = budget.share(2);
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
        let budget = Budget::new(100, 100);
        let mut a = budget.share(1);
        assert!(a.grow(100));
        assert!(!budget.share(2).grow(1));
    }

    /// One provider's answers hold at most its part (a sixteenth, or one whole answer):
    /// the rest of the budget stays for the others. Before, one provider's slow large
    /// answers could take all of it.
    #[test]
    fn one_provider_holds_at_most_its_part() {
        let budget = Budget::new(64 * UNIT, 2 * UNIT);
        let (mut a, mut b) = (budget.share(1), budget.share(1));
        assert!(a.grow(4 * UNIT), "its part: a sixteenth of 64 units");
        assert!(!b.grow(1), "its part is spent");
        assert_eq!(
            budget.units.available_permits(),
            60,
            "a refusal takes nothing"
        );
        let mut other = budget.share(2);
        assert!(other.grow(4 * UNIT), "another provider's own part");
        drop(a);
        assert!(b.grow(4 * UNIT), "given back");
        // One whole answer always fits a provider's part.
        let small = Budget::new(8 * UNIT, 6 * UNIT);
        assert!(small.share(1).grow(6 * UNIT));
    }
}
