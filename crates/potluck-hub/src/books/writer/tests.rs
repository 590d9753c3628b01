use super::*;
use potluck_store::{Role, Standing};

fn finished(id: &str, consumer: i64, provider: i64) -> Finished {
    Finished {
        usage: UsageRecord {
            request_id: id.to_owned(),
            key_id: 1,
            account_id: consumer,
            provider_id: None,
            model: "m".into(),
            endpoint: "chat",
            stream: false,
            status: 200,
            outcome: "ok",
            prompt_tokens: 5,
            completion_tokens: 5,
            started_at_ms: 0,
            duration_ms: 0,
            ttft_ms: None,
        },
        settlement: Some(Settlement {
            request_id: id.to_owned(),
            consumer_account: consumer,
            provider_account: provider,
            cost: 700,
            tax: 0,
            vests_at_ms: None,
        }),
        pending: None,
    }
}

/// A request that was in flight when its provider was quarantined reaches the writer
/// after the claw-back: what it earns goes to the treasury, until the release.
#[tokio::test]
async fn a_record_queued_after_the_claw_back_pays_the_treasury() {
    let store = Store::open_in_memory().await.unwrap();
    let consumer = store
        .create_account("c", Role::Member, Standing::Active)
        .await
        .unwrap();
    let provider = store
        .create_account("p", Role::Member, Standing::Active)
        .await
        .unwrap();
    let treasury = store
        .system_account(potluck_store::ledger::TREASURY)
        .await
        .unwrap();
    let (accounting, _rx) = Accounting::new(16);
    let mut w = Writer::new(
        store.clone(),
        CreditsConfig::default(),
        Arc::new(Reservations::default()),
    )
    .for_books(&accounting, treasury);
    accounting.clawback(provider).await;
    write_contained(&mut w, &mut vec![finished("late", consumer, provider)]).await;
    let b = store.balance(provider).await.unwrap();
    assert_eq!(
        (b.available, b.unvested),
        (0, 0),
        "the barred provider earned"
    );
    let t = store.balance(treasury).await.unwrap();
    assert_eq!(t.available + t.unvested, 700, "the treasury got it");
    // Released: it earns again.
    accounting.unbar(provider);
    write_contained(&mut w, &mut vec![finished("after", consumer, provider)]).await;
    let b = store.balance(provider).await.unwrap();
    assert_eq!(b.available + b.unvested, 700);
    store.audit_ledger().await.unwrap();
}

async fn two_accounts(store: &Store) -> (i64, i64) {
    let c = store.create_account("c", Role::Member, Standing::Active);
    let c = c.await.unwrap();
    let p = store.create_account("p", Role::Member, Standing::Active);
    (c, p.await.unwrap())
}

async fn earned(store: &Store, account: i64) -> i64 {
    let b = store.balance(account).await.unwrap();
    b.available + b.unvested
}

/// A writer task over a fresh store with a consumer and a provider account.
struct Running {
    store: Store,
    consumer: i64,
    provider: i64,
    tx: mpsc::Sender<Record>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn run_with_window(window: Duration) -> Running {
    let store = Store::open_in_memory().await.unwrap();
    let (consumer, provider) = two_accounts(&store).await;
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let w = Writer::new(
        store.clone(),
        CreditsConfig::default(),
        Arc::new(Reservations::default()),
    )
    .batch_window(window);
    let task = tokio::spawn(run_writer(w, rx, stop.clone()));
    Running {
        store,
        consumer,
        provider,
        tx,
        stop,
        task,
    }
}

/// What trickles in within the window waits for it (one transaction for all), and a
/// stop writes it at once instead of waiting the window out.
#[tokio::test]
async fn records_wait_out_the_window_and_a_stop_writes_them_at_once() {
    let r = run_with_window(Duration::from_secs(600)).await;
    for id in ["a", "b"] {
        let f = finished(id, r.consumer, r.provider);
        r.tx.send(Record::Finished(f)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        earned(&r.store, r.provider).await,
        0,
        "written inside the window"
    );
    let stopping = std::time::Instant::now();
    r.stop.cancel();
    r.task.await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop waited"
    );
    assert_eq!(
        earned(&r.store, r.provider).await,
        1400,
        "both written at the stop"
    );
    r.store.audit_ledger().await.unwrap();
}

/// A short window writes a lone record soon.
#[tokio::test]
async fn a_short_window_writes_a_lone_record_soon() {
    let r = run_with_window(Duration::from_millis(10)).await;
    let f = finished("a", r.consumer, r.provider);
    r.tx.send(Record::Finished(f)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while earned(&r.store, r.provider).await == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        earned(&r.store, r.provider).await,
        700,
        "not written before the stop"
    );
    r.stop.cancel();
    r.task.await.unwrap();
}
