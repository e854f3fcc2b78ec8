//! The Redis store against a real Redis: pending windows are idempotent, updates apply
//! once, stale and replayed updates change nothing, history is capped.

use std::collections::BTreeMap;

use alignx_consumer::store::{ApplyOutcome, HistoryEntry, Store, Update};
use alignx_schemas::inference_log::LoggedSignal;
use alignx_schemas::{Limits, validate_signal};
use alignx_tests::services::start_redis;

fn signal(user: &str, partition: i32, offset: i64) -> LoggedSignal {
    let json = format!(
        r#"{{"schema":"alignx.signal.v1","user_id":{user:?},"signal_id":"s{offset}","ts":"2026-11-27T09:00:00Z","kind":"text","text":"t{offset}"}}"#
    );
    let signal = validate_signal(json.as_bytes(), Some(user.as_bytes()), &Limits::default()).unwrap();
    LoggedSignal { partition, offset, signal }
}

fn update(user: &str, expected: u64, summary: &str, consumed: &[(i32, i64)], n: u64) -> Update {
    Update {
        user_id: user.into(),
        expected_version: expected,
        summary: summary.into(),
        model: "m1".into(),
        reasoning: None,
        consumed: consumed.iter().copied().collect::<BTreeMap<_, _>>(),
        signals: n,
        oldest_ts_ms: 0,
        now_ms: 1_000 + expected,
        outbox: String::new(),
        recent: vec![],
    }
}

#[tokio::test(flavor = "current_thread")]
async fn updates_apply_once_and_replays_change_nothing() {
    let redis = start_redis().unwrap();
    let client = redis::Client::open(format!("redis://{}/", redis.addr())).unwrap();
    let store = Store::new(client.get_multiplexed_async_connection().await.unwrap(), 3);
    // A user id that tries to break the key's hash tag.
    let user = "a}b{c:1";

    let window: Vec<LoggedSignal> =
        [(0, 10), (0, 11), (1, 5)].iter().map(|&(p, o)| signal(user, p, o)).collect();
    assert_eq!(store.persist_pending(user, &window).await.unwrap(), 3);
    assert_eq!(store.persist_pending(user, &window).await.unwrap(), 0, "a re-delivery adds nothing");
    assert_eq!(store.pending(user).await.unwrap(), window);

    // Apply the first two (partition 0 up to 11); partition 1's signal stays pending.
    let first = update(user, 0, "likes brevity", &[(0, 11)], 2);
    assert_eq!(store.apply(&first).await.unwrap(), ApplyOutcome::Applied { version: 1, signals_applied: 2 });
    assert_eq!(store.pending(user).await.unwrap(), vec![window[2].clone()]);
    let rec = store.summary(user).await.unwrap().unwrap();
    assert_eq!((rec.version, rec.summary.as_str(), rec.signals_applied), (1, "likes brevity", 2));
    assert_eq!(rec.applied, BTreeMap::from([(0, 11)]));

    // The same update again (a replay after a crash) and a stale one: no change.
    assert_eq!(
        store.apply(&update(user, 1, "x", &[(0, 11)], 2)).await.unwrap(),
        ApplyOutcome::Replayed { current: 1 }
    );
    assert_eq!(
        store.apply(&update(user, 0, "y", &[(1, 5)], 1)).await.unwrap(),
        ApplyOutcome::Stale { current: 1 }
    );
    assert_eq!(store.summary(user).await.unwrap().unwrap(), rec);
    // Signals at or below the applied offset are not pending again after a re-delivery.
    assert_eq!(store.persist_pending(user, &window[..2]).await.unwrap(), 0);

    // More versions: history keeps the newest 3 past summaries.
    for (expected, offset) in (1u64..).zip(12..17) {
        store.persist_pending(user, &[signal(user, 0, offset)]).await.unwrap();
        let out = store
            .apply(&update(user, expected, &format!("v{}", expected + 1), &[(0, offset)], 1))
            .await
            .unwrap();
        assert_eq!(out, ApplyOutcome::Applied { version: expected + 1, signals_applied: expected + 2 });
    }
    let history = store.history(user).await.unwrap();
    let want: Vec<HistoryEntry> = [(5, "v5"), (4, "v4"), (3, "v3")]
        .iter()
        .map(|&(v, s)| HistoryEntry { version: v, summary: s.into() })
        .collect();
    assert_eq!(history, want);
    let rec = store.summary(user).await.unwrap().unwrap();
    assert_eq!((rec.version, rec.signals_applied), (6, 7));
    assert_eq!(rec.applied, BTreeMap::from([(0, 16)]));
    // Partition 1's signal is still waiting.
    assert_eq!(store.pending(user).await.unwrap(), vec![window[2].clone()]);
}

#[tokio::test(flavor = "current_thread")]
async fn erasure_removes_everything_and_old_signals_never_come_back() {
    let redis = start_redis().unwrap();
    let client = redis::Client::open(format!("redis://{}/", redis.addr())).unwrap();
    let store = Store::new(client.get_multiplexed_async_connection().await.unwrap(), 3);
    let user = "erin{x}";
    let ts = signal(user, 0, 0).signal.ts.unix_ms();
    store.persist_pending(user, &[signal(user, 0, 1), signal(user, 0, 2)]).await.unwrap();
    let mut first = update(user, 0, "likes brevity", &[(0, 1)], 1);
    first.oldest_ts_ms = ts;
    assert!(matches!(store.apply(&first).await.unwrap(), ApplyOutcome::Applied { version: 1, .. }));
    assert_eq!(store.erased_at(user).await.unwrap(), None);

    let erased = store.erase(user, ts + 1_000).await.unwrap();
    assert_eq!((erased.version, erased.pending, erased.history), (1, 1, 0));
    let rec = store.load_user(user).await.unwrap();
    assert!(rec.summary.is_none() && rec.applied.is_empty() && rec.outbox.is_none());
    assert_eq!(rec.erased_at_ms, Some(ts + 1_000));
    assert!(store.pending(user).await.unwrap().is_empty());
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("alignx:{erin%7Bx%7D}:*").query_async(&mut conn).await.unwrap();
    assert_eq!(keys, ["alignx:{erin%7Bx%7D}:erased"], "only the tombstone is left");

    // A replay of the old signals, and the update that was in flight: refused.
    assert_eq!(store.persist_pending(user, &[signal(user, 0, 2)]).await.unwrap(), 0);
    let mut in_flight = update(user, 0, "likes brevity", &[(0, 2)], 1);
    in_flight.oldest_ts_ms = ts;
    assert_eq!(store.apply(&in_flight).await.unwrap(), ApplyOutcome::Erased { current: 0 });
    assert!(store.summary(user).await.unwrap().is_none());

    // Signals after the erasure make a new summary from nothing.
    let mut fresh = update(user, 0, "likes detail", &[(0, 3)], 1);
    fresh.oldest_ts_ms = ts + 2_000;
    assert!(matches!(
        store.apply(&fresh).await.unwrap(),
        ApplyOutcome::Applied { version: 1, signals_applied: 1 }
    ));

    // Erasing again is idempotent; the tombstone never moves back.
    store.erase(user, ts + 5_000).await.unwrap();
    store.erase(user, ts).await.unwrap();
    assert_eq!(store.erased_at(user).await.unwrap(), Some(ts + 5_000));
}
