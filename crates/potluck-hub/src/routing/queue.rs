//! The wait queue in front of the providers: per model, priority tiers, and within a
//! tier deficit round robin across accounts (unit cost per request).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use potluck_protocol::ModelName;
use tokio::sync::oneshot;

use crate::routing::link::{Need, ProviderLink};

pub(super) struct Waiter<L> {
    pub(super) id: u64,
    pub(super) tx: oneshot::Sender<L>,
    seq: u64,
    need: Arc<Need>,
}

/// Waiters of one priority: round robin across accounts (deficit round robin with a
/// unit cost per request), so one account's flood cannot delay another's single request.
struct Tier<L> {
    order: VecDeque<i64>,
    by_account: HashMap<i64, VecDeque<Waiter<L>>>,
}

struct ModelQueue<L> {
    tiers: BTreeMap<u8, Tier<L>>,
    len: usize,
}

/// The wait queue of every model; `L` is what a waiter is sent (a lease).
pub(super) struct Queue<L> {
    models: HashMap<ModelName, ModelQueue<L>>,
    next_id: u64,
}

impl<L> Default for Tier<L> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            by_account: HashMap::new(),
        }
    }
}

impl<L> Default for ModelQueue<L> {
    fn default() -> Self {
        Self {
            tiers: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<L> Default for Queue<L> {
    fn default() -> Self {
        Self {
            models: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<L> Queue<L> {
    /// Nobody waits for any model.
    pub(super) fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub(super) fn len(&self, m: &ModelName) -> usize {
        self.models.get(m).map_or(0, |q| q.len)
    }

    pub(super) fn push(
        &mut self,
        m: &ModelName,
        priority: u8,
        account: i64,
        tx: oneshot::Sender<L>,
        need: Arc<Need>,
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let q = self.models.entry(m.clone()).or_default();
        let tier = q.tiers.entry(priority).or_default();
        let list = tier.by_account.entry(account).or_default();
        if list.is_empty() {
            tier.order.push_back(account);
        }
        list.push_back(Waiter {
            id,
            tx,
            seq: id,
            need,
        });
        q.len += 1;
        id
    }

    /// The best waiter for a model among those `fits` accepts, without taking it:
    /// `(priority, seq, account, id)`. Highest priority first; within a priority, the
    /// round-robin order of accounts, and each account's oldest fitting request.
    pub(super) fn peek_fitting(
        &self,
        m: &ModelName,
        fits: impl Fn(&Need) -> bool,
    ) -> Option<(u8, u64, i64, u64)> {
        let q = self.models.get(m)?;
        for (p, tier) in q.tiers.iter().rev() {
            for account in &tier.order {
                let Some(list) = tier.by_account.get(account) else {
                    continue;
                };
                if let Some(w) = list.iter().find(|w| fits(&w.need)) {
                    return Some((*p, w.seq, *account, w.id));
                }
            }
        }
        None
    }

    /// Take one waiter (found by [`Queue::peek_fitting`]); its account goes to the back
    /// of the round robin.
    pub(super) fn take(
        &mut self,
        m: &ModelName,
        priority: u8,
        account: i64,
        id: u64,
    ) -> Option<Waiter<L>> {
        let q = self.models.get_mut(m)?;
        let tier = q.tiers.get_mut(&priority)?;
        let list = tier.by_account.get_mut(&account)?;
        let pos = list.iter().position(|w| w.id == id)?;
        let w = list.remove(pos)?;
        let empty = list.is_empty();
        if empty {
            tier.by_account.remove(&account);
        }
        tier.order.retain(|a| *a != account);
        if !empty {
            tier.order.push_back(account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&priority);
        }
        q.len -= 1;
        if q.len == 0 {
            self.models.remove(m);
        }
        Some(w)
    }

    /// Take the best waiter that tunnel `t` can serve, over the models it offers.
    pub(super) fn take_for(&mut self, t: &ProviderLink) -> Option<Waiter<L>> {
        let models = t.models();
        let (m, (p, _, account, id)) = models
            .iter()
            .filter_map(|m| {
                self.peek_fitting(m, |need| t.serves(m, need))
                    .map(|k| (m, k))
            })
            .max_by(|(_, a), (_, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))?;
        let m = m.clone();
        self.take(&m, p, account, id)
    }

    #[cfg(test)]
    pub(super) fn pop(&mut self, m: &ModelName) -> Option<Waiter<L>> {
        let q = self.models.get_mut(m)?;
        let (&p, tier) = q.tiers.iter_mut().next_back()?;
        let account = tier.order.pop_front()?;
        let list = tier.by_account.get_mut(&account)?;
        let w = list.pop_front()?;
        if list.is_empty() {
            tier.by_account.remove(&account);
        } else {
            tier.order.push_back(account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&p);
        }
        q.len -= 1;
        if q.len == 0 {
            self.models.remove(m);
        }
        Some(w)
    }

    pub(super) fn remove(&mut self, m: &ModelName, priority: u8, account: i64, id: u64) {
        let Some(q) = self.models.get_mut(m) else {
            return;
        };
        let Some(tier) = q.tiers.get_mut(&priority) else {
            return;
        };
        let Some(list) = tier.by_account.get_mut(&account) else {
            return;
        };
        let before = list.len();
        list.retain(|w| w.id != id);
        if list.len() == before {
            return;
        }
        q.len -= 1;
        if list.is_empty() {
            tier.by_account.remove(&account);
            tier.order.retain(|a| *a != account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&priority);
        }
        if q.len == 0 {
            self.models.remove(m);
        }
    }

    pub(super) fn position(&self, m: &ModelName, priority: u8, account: i64, id: u64) -> usize {
        let Some(q) = self.models.get(m) else {
            return 0;
        };
        let higher: usize = q
            .tiers
            .range(priority.saturating_add(1)..)
            .map(|(_, t)| t.by_account.values().map(VecDeque::len).sum::<usize>())
            .sum();
        let Some(tier) = q.tiers.get(&priority) else {
            return higher;
        };
        let mine = tier
            .by_account
            .get(&account)
            .and_then(|l| l.iter().position(|w| w.id == id))
            .unwrap_or(0);
        // Round robin: each other account gets up to `mine + 1` turns before ours.
        let others: usize = tier
            .by_account
            .iter()
            .filter(|(a, _)| **a != account)
            .map(|(_, l)| l.len().min(mine + 1))
            .sum();
        higher + others + mine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[test]
    fn round_robin_across_accounts_and_priority_first() {
        let mut q = Queue::<()>::default();
        let model = m("x");
        let mut rxs = Vec::new();
        for _ in 0..100 {
            let (tx, rx) = oneshot::channel();
            q.push(&model, 1, 1, tx, Arc::default());
            rxs.push(rx);
        }
        for acct in [2, 3] {
            for _ in 0..5 {
                let (tx, rx) = oneshot::channel();
                q.push(&model, 1, acct, tx, Arc::default());
                rxs.push(rx);
            }
        }
        let (tx, _rx_hi) = oneshot::channel();
        let hi = q.push(&model, 3, 9, tx, Arc::default());
        // The high-priority request goes first, then accounts alternate.
        assert_eq!(q.pop(&model).unwrap().id, hi);
        let mut served: Vec<i64> = Vec::new();
        for _ in 0..15 {
            let w = q.pop(&model).unwrap();
            served.push(if w.id <= 100 {
                1
            } else if w.id <= 105 {
                2
            } else {
                3
            });
        }
        assert_eq!(served.iter().filter(|a| **a == 2).count(), 5);
        assert_eq!(served.iter().filter(|a| **a == 3).count(), 5);
        assert_eq!(q.len(&model), 95);
    }

    #[test]
    fn remove_and_position() {
        let mut q = Queue::<()>::default();
        let model = m("x");
        let mut ids = Vec::new();
        for acct in [1, 1, 1, 2] {
            let (tx, rx) = oneshot::channel();
            std::mem::forget(rx);
            ids.push((acct, q.push(&model, 1, acct, tx, Arc::default())));
        }
        // Account 2's only request is second in line (after account 1's first).
        assert_eq!(q.position(&model, 1, 2, ids[3].1), 1);
        assert_eq!(q.position(&model, 1, 1, ids[2].1), 3);
        q.remove(&model, 1, 1, ids[1].1);
        assert_eq!(q.len(&model), 3);
        q.remove(&model, 1, 2, ids[3].1);
        q.remove(&model, 1, 2, ids[3].1);
        assert_eq!(q.len(&model), 2);
    }

    #[test]
    fn ten_thousand_waiters_bounded() {
        let mut q = Queue::<()>::default();
        let model = m("x");
        let mut rxs = Vec::with_capacity(10_000);
        for i in 0..10_000u64 {
            let (tx, rx) = oneshot::channel();
            q.push(&model, (i % 3) as u8, (i % 50) as i64, tx, Arc::default());
            rxs.push(rx);
        }
        assert_eq!(q.len(&model), 10_000);
        // Each waiter costs a fixed, small amount (id, sender, sequence number).
        assert!(std::mem::size_of::<Waiter<crate::routing::registry::Lease>>() <= 32);
        let mut n = 0;
        while q.pop(&model).is_some() {
            n += 1;
        }
        assert_eq!(n, 10_000);
        assert!(q.models.is_empty(), "nothing left behind");
    }
}
