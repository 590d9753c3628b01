//! Property test of the money path over arbitrary usage a provider may report (any
//! `i64`, missing, negative, non-numeric, beyond `i64`): both usage readers (whole answer
//! and stream chunk), the bounds, the price, the hold and the usage writer. No panic, no
//! failed batch (a corrupt settlement beside them costs the others nothing), the ledger
//! sums to zero, nothing billed above the bound, no charge above the hold.

use std::sync::Arc;

use potluck_protocol::{InferenceEndpoint, InferenceRequest, ModelName, RequestLimits};
use potluck_store::ledger::Settlement;
use potluck_store::{Role, Standing, Store, UsageRecord};
use proptest::prelude::*;
use serde_json::Value;

use crate::api::finish::{cost, settlement, within, Parties, Request};
use crate::api::relay::shown::Claim;
use crate::books::money::Micro;
use crate::books::reserve::Reservations;
use crate::books::usage::Finished;
use crate::books::writer::{write_contained, Writer};
use crate::config::{CreditsConfig, Rates};
use crate::trust::plausibility::{Bounds, Usage};

/// One reported count, as JSON text (`None`: the field is missing).
fn count() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|v| Some(v.to_string())),
        (0i64..10_000).prop_map(|v| Some(v.to_string())),
        any::<u64>().prop_map(|v| Some(v.to_string())),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|v| Some(format!("{v:e}"))),
        "[a-z]{0,8}".prop_map(|s| Some(format!("\"{s}\""))),
        Just(Some("null".to_owned())),
        Just(Some("[1]".to_owned())),
    ]
}

/// The usage a provider reports, read both ways the relay reads it.
fn reported(prompt: &Option<String>, completion: &Option<String>) -> [Option<Usage>; 2] {
    let mut fields = Vec::new();
    if let Some(p) = prompt {
        fields.push(format!("\"prompt_tokens\":{p}"));
    }
    if let Some(c) = completion {
        fields.push(format!("\"completion_tokens\":{c}"));
    }
    let usage = format!("{{{}}}", fields.join(","));
    let whole = serde_json::from_str::<Value>(&format!("{{\"usage\":{usage}}}"))
        .ok()
        .and_then(|v| v.as_object().and_then(Usage::from_obj));
    let chunk = Claim::read(&usage).map(|c| c.counts());
    [whole, chunk]
}

fn record(id: &str, account: i64, u: Usage) -> UsageRecord {
    UsageRecord {
        request_id: id.to_owned(),
        key_id: 1,
        account_id: account,
        provider_id: None,
        model: "m".into(),
        endpoint: "chat",
        stream: false,
        status: 200,
        outcome: "ok",
        prompt_tokens: u.prompt,
        completion_tokens: u.completion,
        started_at_ms: 0,
        duration_ms: 0,
        ttft_ms: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_reported_usage_is_billed_within_bounds_and_the_books_balance(
        reports in proptest::collection::vec((count(), count()), 1..8),
        max_tokens in proptest::option::of(any::<u32>()),
        text_len in 0usize..5_000,
        rates in (0i64..5_000, 0i64..5_000),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Store::open_in_memory().await.unwrap();
            let consumer = store.create_account("consumer", Role::Member, Standing::Active).await.unwrap();
            let provider = store.create_account("provider", Role::Member, Standing::Active).await.unwrap();
            let credits = CreditsConfig {
                trust_min_account_age: std::time::Duration::ZERO,
                ..CreditsConfig::default()
            };
            let body = match max_tokens {
                Some(m) => format!(r#"{{"model":"m","max_tokens":{m},"messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(text_len)),
                None => format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(text_len)),
            };
            let req = InferenceRequest::parse(
                InferenceEndpoint::ChatCompletions, body.as_bytes(), &RequestLimits::new(1 << 20),
            ).unwrap();
            let bounds = Bounds::of(&req, body.len(), 0, &credits);
            let rates = Rates { prompt: rates.0, completion: rates.1 };
            let most = cost(rates, Usage { prompt: bounds.prompt, completion: bounds.completion });
            let table = Arc::new(Reservations::default());
            let now = std::time::Instant::now();
            assert!(table.seed(consumer, i64::MAX, 0, now));
            let model = ModelName::parse("m").unwrap();
            let parties = Parties { treasury: 0, provider_account: provider, quarantined: false, tax: Micro::ZERO };
            let mut batch = Vec::new();
            let mut charged = 0i64;
            for (i, (p, c)) in reports.iter().enumerate() {
                for (j, u) in reported(p, c).into_iter().enumerate() {
                    let asked = u.unwrap_or_default();
                    let (billed, _) = bounds.cut(asked);
                    prop_assert!((0..=bounds.prompt).contains(&billed.prompt));
                    prop_assert!((0..=bounds.completion).contains(&billed.completion));
                    let id = format!("r{i}-{j}");
                    let r = Request { request_id: &id, key_id: 1, account_id: consumer, anonymous: false,
                        model: &model, endpoint: InferenceEndpoint::ChatCompletions, stream: false, started_ms: 0 };
                    let hold = table.try_hold(consumer, most, now).unwrap();
                    let mut s = settlement(&r, parties, billed, cost(rates, billed));
                    let pending = s.as_mut().and_then(|s| hold.settle(within(s, hold.amount())));
                    if let Some(s) = &s {
                        prop_assert!(s.cost + s.tax <= most.get());
                        charged += s.cost + s.tax;
                    }
                    batch.push(Finished { usage: record(&id, consumer, billed), settlement: s, pending });
                }
            }
            // A corrupt settlement (it would overflow) in the same batch.
            batch.push(Finished {
                usage: record("corrupt", consumer, Usage::default()),
                settlement: Some(Settlement { request_id: "corrupt".into(), consumer_account: consumer,
                    provider_account: provider, cost: i64::MAX, tax: 1, vests_at_ms: None }),
                pending: None,
            });
            let rows = batch.len();
            let mut w = Writer::new(store.clone(), credits, Arc::clone(&table));
            write_contained(&mut w, &mut batch).await;
            prop_assert_eq!(store.recent_usage(10_000).await.unwrap().len(), rows, "every row written");
            store.audit_ledger().await.unwrap();
            let all = store.sum_balances(true).await.unwrap() + store.sum_balances(false).await.unwrap();
            prop_assert_eq!(all, 0, "the ledger sums to zero");
            let b = store.balance(consumer).await.unwrap();
            prop_assert_eq!(-b.available, charged, "the consumer paid what was billed");
            Ok(())
        })?;
    }
}
