//! The budget of whole answers the hub holds at once (`max_buffered_answer_bytes`). A whole
//! answer takes its share as its bytes arrive from the provider and gives it back when
//! its consumer has taken the last of it, or gone: many large answers that nobody reads
//! cannot grow the hub's memory past the budget (each is also closed after
//! `server.consumer_stall_timeout`, `http/stall.rs`). One provider's answers hold at most
//! [`PROVIDER_PART`] of it (or one answer of `max_response_bytes`, if that is more): a
//! provider that sends large answers slowly, to consumers of its own, cannot take the
//! whole budget and make every other whole answer on the hub a 503.
//!
//! A stream's SSE parser holds a line or event the provider has not finished (up to
//! `max_sse_line_bytes` each): a [`Charge`] puts that on the same provider's part, so a
//! provider cannot hold an unfinished line of a megabyte on each of its streams
//! (`routing.max_slots_per_tunnel` × `routing.max_tunnels_per_provider` of them) outside
//! the budget.

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
    /// The budget's size, in units.
    total_units: usize,
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
            total_units: units,
        }
    }

    /// Bytes held now by every answer and stream together, in whole units.
    pub(crate) fn held_bytes(&self) -> usize {
        self.total_units
            .saturating_sub(self.units.available_permits())
            .saturating_mul(UNIT)
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

/// Whose room ran out when a [`Share`] could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The provider's own part of the budget is spent (by its own answers and streams).
    Provider,
    /// The hub's whole budget is spent.
    Hub,
}

impl Share {
    /// Take room for `n` more bytes; `false` (and nothing taken) when the budget has none.
    fn grow(&mut self, n: usize) -> bool {
        self.try_grow(n).is_ok()
    }

    /// Take room for `n` more bytes, or say whose room ran out (and take nothing).
    fn try_grow(&mut self, n: usize) -> Result<(), Refusal> {
        let bytes = self.bytes.saturating_add(n);
        let want = bytes.div_ceil(UNIT);
        let have = self.held.as_ref().map_or(0, |(h, _)| h.num_permits());
        if want > have {
            let Ok(more) = u32::try_from(want - have) else {
                return Err(Refusal::Provider);
            };
            // The provider's part first: a refusal there takes nothing from the budget.
            let Ok(part) = Arc::clone(&self.part).try_acquire_many_owned(more) else {
                return Err(Refusal::Provider);
            };
            let Ok(permit) = Arc::clone(&self.units).try_acquire_many_owned(more) else {
                return Err(Refusal::Hub);
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
        Ok(())
    }

    /// `body`, which keeps this share until it is dropped.
    pub(crate) fn hold(self, body: Body) -> Body {
        keeping(body, self)
    }
}

/// A stream's charge for what its SSE parser holds of a line or event its provider has
/// not finished, on the provider's part of the budget. It is taken in steps of
/// [`CHARGE_STEP`] as the held bytes grow (a line dripped a byte a frame costs one
/// budget call per step, not per frame) and given back whole when the parser holds
/// nothing again, or when the stream's relay is dropped (done, failed, cut, or its
/// consumer gone). A parser that holds nothing (a frame of whole events, the usual case)
/// costs one comparison: no share is made and no atomic touched.
pub(crate) struct Charge {
    provider: i64,
    share: Option<Share>,
    /// Bytes charged now (a multiple of [`CHARGE_STEP`]).
    charged: usize,
}

/// The step a stream's [`Charge`] grows by, in bytes.
pub(crate) const CHARGE_STEP: usize = 16 * UNIT;

impl Charge {
    /// Nothing charged yet, to `provider`'s part.
    pub(crate) fn new(provider: i64) -> Self {
        Self {
            provider,
            share: None,
            charged: 0,
        }
    }

    /// Whether anything is charged now.
    #[inline]
    pub(crate) fn is_held(&self) -> bool {
        self.charged > 0
    }

    /// Charge at least `held` bytes (given back whole at 0). Holding less than charged
    /// but more than nothing keeps the charge (the parser's buffers keep their room). A
    /// refusal takes nothing more.
    pub(crate) fn set(&mut self, budget: &Budget, held: usize) -> Result<(), Refusal> {
        if held == 0 {
            self.share = None;
            self.charged = 0;
            return Ok(());
        }
        if held <= self.charged {
            return Ok(());
        }
        let want = held.checked_next_multiple_of(CHARGE_STEP).unwrap_or(held);
        let share = self
            .share
            .get_or_insert_with(|| budget.share(self.provider));
        share.try_grow(want - self.charged)?;
        self.charged = want;
        Ok(())
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

    /// A stream's charge grows in steps, is refused past its provider's part (naming
    /// whose room ran out, taking nothing), and is given back whole at 0 and when
    /// dropped.
    #[test]
    fn a_streams_charge_grows_in_steps_and_is_given_back() {
        let budget = Budget::new(64 * CHARGE_STEP, 4 * CHARGE_STEP);
        let mut a = Charge::new(1);
        assert_eq!(a.set(&budget, 0), Ok(()));
        assert!(!a.is_held());
        assert_eq!(budget.held_bytes(), 0, "nothing held, nothing charged");
        assert_eq!(a.set(&budget, 1), Ok(()));
        assert_eq!(budget.held_bytes(), CHARGE_STEP, "one step");
        assert_eq!(a.set(&budget, CHARGE_STEP), Ok(()));
        assert_eq!(budget.held_bytes(), CHARGE_STEP, "still one step");
        assert_eq!(a.set(&budget, 3 * CHARGE_STEP + 1), Ok(()));
        assert_eq!(budget.held_bytes(), 4 * CHARGE_STEP, "the provider's part");
        let mut b = Charge::new(1);
        assert_eq!(b.set(&budget, 1), Err(Refusal::Provider));
        assert_eq!(
            budget.held_bytes(),
            4 * CHARGE_STEP,
            "a refusal takes nothing"
        );
        assert_eq!(a.set(&budget, 5), Ok(()), "less held keeps the charge");
        assert_eq!(budget.held_bytes(), 4 * CHARGE_STEP);
        assert_eq!(a.set(&budget, 0), Ok(()));
        assert_eq!(budget.held_bytes(), 0, "given back whole");
        assert_eq!(
            b.set(&budget, usize::MAX),
            Err(Refusal::Provider),
            "no overflow"
        );
        assert_eq!(b.set(&budget, 2 * CHARGE_STEP), Ok(()));
        drop(b);
        assert_eq!(budget.held_bytes(), 0, "given back when dropped");
        // The hub's whole budget spent by other providers: the hub's refusal.
        let small = Budget::new(2 * CHARGE_STEP, 2 * CHARGE_STEP);
        let mut other = small.share(2);
        assert!(other.grow(2 * CHARGE_STEP));
        assert_eq!(Charge::new(1).set(&small, 1), Err(Refusal::Hub));
    }
}
