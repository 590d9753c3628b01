//! Reading the journal back: every line, the receipts (a whole batch's line expanded
//! into receipts with their proofs), their check against a hub's key, and the totals of
//! the status view.

use std::collections::BTreeMap;
use std::path::Path;

use potluck_protocol::receipt::SignedReceipt;
use serde::{Deserialize, Serialize};

use super::{files, Entry};

/// Every line of the journal, parsed or not (`Err` holds the file and line number).
pub fn read_all(dir: &Path) -> Vec<(String, Result<Entry, String>)> {
    let mut out = Vec::new();
    for (day, path) in files(dir) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            out.push((day, Err(format!("{}: unreadable", path.display()))));
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push((
                day.clone(),
                serde_json::from_str(line)
                    .map_err(|_| format!("{} line {}: malformed", path.display(), i + 1)),
            ));
        }
    }
    out
}

/// Receipts in the journal, one per request id (the last one kept), and lines that did
/// not parse. A batch line gives each of its receipts with its proof, rebuilt from the
/// batch; a batch that cannot be rebuilt is a bad line.
pub fn receipts(dir: &Path) -> (Vec<(String, SignedReceipt)>, Vec<String>) {
    let mut by_id: BTreeMap<String, (String, SignedReceipt)> = BTreeMap::new();
    let mut bad = Vec::new();
    for (day, e) in read_all(dir) {
        match e {
            Ok(Entry::Receipt(r)) => {
                by_id.insert(r.receipt.request_id.clone(), (day, r));
            }
            Ok(Entry::ReceiptBatch(b)) => match b.expand() {
                Ok(rs) => {
                    for r in rs {
                        by_id.insert(r.receipt.request_id.clone(), (day.clone(), r));
                    }
                }
                Err(e) => bad.push(format!("a batch of {} receipts ({}): {e}", b.size(), day)),
            },
            Ok(Entry::Request(_)) => {}
            Err(why) => bad.push(why),
        }
    }
    let mut v: Vec<_> = by_id.into_values().collect();
    v.sort_by_key(|(_, r)| r.receipt.time_ms);
    (v, bad)
}

/// The result of checking every receipt in a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Receipts whose signature matches.
    pub verified: usize,
    /// What failed: a request id and why, or an unreadable line.
    pub failed: Vec<String>,
    /// Receipts that verify but count fewer tokens than this agent's backend reported
    /// for the same request (a request id and both counts): what the volunteer was paid
    /// for less than what was served. A hub may cut a count to the request's bound, so
    /// these are told, not failed.
    pub short: Vec<String>,
}

/// Check every receipt (and every line) of the journal in `dir` against a hub's key.
pub fn verify(dir: &Path, hub: &potluck_protocol::receipt::HubInfo) -> VerifyReport {
    let (list, bad) = receipts(dir);
    let mut report = VerifyReport {
        verified: 0,
        failed: bad,
        short: Vec::new(),
    };
    let served: std::collections::HashMap<String, (u64, u64)> = read_all(dir)
        .into_iter()
        .filter_map(|(_, e)| match e {
            Ok(Entry::Request(r)) => Some((r.request_id, (r.prompt_tokens, r.completion_tokens))),
            _ => None,
        })
        .collect();
    for (_, r) in list {
        match r.verify_for(hub) {
            Ok(()) => report.verified += 1,
            Err(e) => {
                report.failed.push(format!("{}: {e}", r.receipt.request_id));
                continue;
            }
        }
        let c = &r.receipt;
        if let Some(&(prompt, completion)) = served.get(&c.request_id) {
            if c.prompt_tokens < prompt || c.completion_tokens < completion {
                report.short.push(format!(
                    "{}: the hub counted {} prompt and {} completion tokens; your backend reported {prompt} and {completion}",
                    c.request_id, c.prompt_tokens, c.completion_tokens
                ));
            }
        }
    }
    report
}

/// Totals for the status view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests served today (UTC).
    pub requests_today: u64,
    /// Prompt tokens today.
    pub prompt_tokens_today: u64,
    /// Completion tokens today.
    pub completion_tokens_today: u64,
    /// Credits earned today (receipts of today), micro-credits.
    pub credits_today_micro: i64,
    /// Credits earned over the whole journal.
    pub credits_total_micro: i64,
    /// Receipts in the journal.
    pub receipts: u64,
}

/// Totals from the journal, `today` being a `YYYY-MM-DD` UTC day.
pub fn totals(dir: &Path, today: &str) -> Totals {
    let mut t = Totals::default();
    for (day, e) in read_all(dir) {
        if let Ok(Entry::Request(r)) = e {
            if day == today {
                t.requests_today += 1;
                t.prompt_tokens_today += r.prompt_tokens;
                t.completion_tokens_today += r.completion_tokens;
            }
        }
    }
    for (day, r) in receipts(dir).0 {
        t.receipts += 1;
        t.credits_total_micro = t
            .credits_total_micro
            .saturating_add(r.receipt.credits_micro);
        if day == today {
            t.credits_today_micro = t
                .credits_today_micro
                .saturating_add(r.receipt.credits_micro);
        }
    }
    t
}
