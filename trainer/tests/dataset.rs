//! `build-dataset` on a hand-made log: what becomes a record, what is dropped and counted.

use alignx_schemas::inference_log::{
    ErasureRecord, ErasureSchema, InferenceLogRecord, InferenceLogSchema, LogTopicRecord, LoggedSignal,
    UpdateOutcome,
};
use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::signal::{Limits, validate_payload};
use alignx_schemas::training::{Choice, RlRecord, StreamingRlRecord, read_records};
use alignx_trainer::dataset::{self, DatasetConfig, DatasetError, Source};
use alignx_trainer::eval::EvalSetting;

fn signal(user: &str, offset: i64, body: serde_json::Value) -> LoggedSignal {
    let mut v = serde_json::json!({
        "schema": "alignx.signal.v1",
        "user_id": user,
        "signal_id": format!("{user}-{offset}"),
        "ts": format!("2026-12-01T10:{:02}:00Z", offset % 60),
    });
    v.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
    let signal = validate_payload(v.to_string().as_bytes(), &Limits::default()).expect("valid signal");
    LoggedSignal { partition: 0, offset, signal }
}

fn pair(user: &str, offset: i64) -> LoggedSignal {
    signal(
        user,
        offset,
        serde_json::json!({"kind": "pair", "post": format!("post {offset}"),
            "chosen": format!("good {offset}"), "rejected": format!("bad {offset}")}),
    )
}

fn text(user: &str, offset: i64) -> LoggedSignal {
    signal(user, offset, serde_json::json!({"kind": "text", "text": format!("words {offset}")}))
}

/// An applied update of `window`, from version `from` to `from + 1`, its prompt rendered
/// the consumer's way.
fn update(user: &str, from: u64, window: Vec<LoggedSignal>) -> InferenceLogRecord {
    let previous = (from > 0).then(|| format!("summary v{from}"));
    let templates = Templates::default();
    let ev = Evidence::from_signals(window.iter().map(|s| &s.signal));
    let prompt = templates.render("", Setting::Streaming { past: previous.as_deref() }, &ev);
    InferenceLogRecord {
        schema: InferenceLogSchema::V1,
        user_id: user.into(),
        model: "m1".into(),
        logged_at_ms: 1_000 + from,
        previous_version: from,
        previous_summary: previous,
        signals: window,
        prompt,
        generation: "<answer>x</answer>".into(),
        summary: Some(format!("summary v{}", from + 1)),
        new_version: Some(from + 1),
        prompt_tokens: 10,
        generated_tokens: 5,
        latency_ms: 3,
        outcome: UpdateOutcome::Applied,
    }
}

/// Two users: `u1` with three chained updates (the last one has no later pair), and a
/// duplicate and a stale record; `u2` with one update, then erased.
fn world() -> (Vec<LogTopicRecord>, Vec<LoggedSignal>) {
    let u1: Vec<LoggedSignal> =
        (0..8).map(|o| if o % 2 == 0 { pair("u1", o) } else { text("u1", o) }).collect();
    let u2: Vec<LoggedSignal> = (100..104).map(|o| pair("u2", o)).collect();
    let up = |r: InferenceLogRecord| LogTopicRecord::Update(Box::new(r));
    let first = update("u1", 0, u1[0..2].to_vec());
    let mut stale = update("u1", 1, u1[2..4].to_vec());
    stale.outcome = UpdateOutcome::Stale;
    stale.new_version = None;
    let log = vec![
        up(first.clone()),
        up(first),
        up(stale),
        up(update("u1", 1, u1[2..4].to_vec())),
        up(update("u1", 2, u1[4..8].to_vec())),
        up(update("u2", 0, u2[0..2].to_vec())),
        LogTopicRecord::Erasure(ErasureRecord {
            schema: ErasureSchema::V1,
            user_id: "u2".into(),
            erased_at_ms: u64::try_from(u2[3].signal.ts.unix_ms()).unwrap(),
            erased_version: 1,
            reason: Some("ticket-1".into()),
        }),
    ];
    (log, u1.into_iter().chain(u2).collect())
}

#[test]
fn logged_updates_become_records_scored_by_the_next_pair() {
    let (log, signals) = world();
    let cfg = DatasetConfig { holdout: 0.0, ..DatasetConfig::default() };
    let ds = dataset::build(&cfg, log, signals).unwrap();
    let s = &ds.stats;
    assert_eq!((s.log_records, s.erasures, s.duplicates, s.stale), (7, 1, 1, 1));
    // u2's four signals and its one update.
    assert_eq!(s.erased, 5);
    assert_eq!(s.no_later_pair, 1, "u1's last window ends the stream");
    assert_eq!((s.users_train, s.users_holdout, s.rl_train, s.rl_holdout), (1, 0, 2, 0));
    assert_eq!(s.prompt_mismatch, 0);

    // The window [0, 1] is scored by the pair at offset 2, [2, 3] by the one at 4.
    for (record, next) in ds.rl_train.iter().zip([2, 4]) {
        let c = &record.comparison;
        assert_eq!(
            (c.task.as_str(), c.chosen.as_str()),
            (format!("post {next}").as_str(), format!("good {next}").as_str())
        );
        let shown_chosen = if c.answer == Choice::A { &c.response_a } else { &c.response_b };
        assert_eq!(shown_chosen, &c.chosen);
        assert_eq!(record.ground_truth, c.answer);
    }
    // Streaming setting: the prompt state includes the summary the consumer had.
    assert!(ds.rl_train[1].value.contains("summary v1"), "{}", ds.rl_train[1].value);
    assert!(!ds.rl_train[0].value.contains("summary v"));
    // The chain v0→v1→v2 (v2→v3 has no later pair): steps without a past.
    let [StreamingRlRecord(entries)] = ds.streaming_train.as_slice() else { panic!("one streaming record") };
    assert_eq!(entries[0].history.len(), 2);
    assert!(entries[0].history.iter().all(|h| !h.value.contains("summary v")));

    // Base setting: the window alone.
    let (log, signals) = world();
    let base = DatasetConfig { setting: EvalSetting::Base, holdout: 0.0, ..DatasetConfig::default() };
    let ds = dataset::build(&base, log, signals).unwrap();
    assert!(!ds.rl_train[1].value.contains("summary v1"));
}

#[test]
fn the_split_is_by_user_and_stable_and_a_b_order_is_seeded() {
    let users: Vec<String> = (0..2_000).map(|i| format!("user-{i}")).collect();
    let held = users.iter().filter(|u| dataset::is_holdout(u, 7, 0.2)).count();
    assert!((300..500).contains(&held), "{held} of 2000 held out at 0.2");
    assert!(users.iter().all(|u| dataset::is_holdout(u, 7, 0.2) == dataset::is_holdout(u, 7, 0.2)));
    assert_ne!(
        users.iter().map(|u| dataset::is_holdout(u, 7, 0.2)).collect::<Vec<_>>(),
        users.iter().map(|u| dataset::is_holdout(u, 8, 0.2)).collect::<Vec<_>>()
    );

    // Many users, one update each: both A and B appear as the answer, the same per seed.
    let mut log = Vec::new();
    let mut signals = Vec::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let s: Vec<LoggedSignal> = (0..2).map(|o| pair(&user, o)).collect();
        log.push(LogTopicRecord::Update(Box::new(update(&user, 0, s[..1].to_vec()))));
        signals.extend(s);
    }
    let cfg = DatasetConfig { holdout: 0.25, seed: 3, ..DatasetConfig::default() };
    let a = dataset::build(&cfg, log.clone(), signals.clone()).unwrap();
    let b = dataset::build(&cfg, log, signals).unwrap();
    assert_eq!(a.rl_train, b.rl_train);
    assert_eq!(a.stats.users_train + a.stats.users_holdout, 40);
    assert!(a.stats.users_holdout > 0 && a.stats.users_train > 0);
    let answers: Vec<Choice> = a.rl_train.iter().map(|r| r.ground_truth).collect();
    assert!(answers.contains(&Choice::A) && answers.contains(&Choice::B), "{answers:?}");
}

#[test]
fn files_round_trip_through_the_trainer_readers_and_empty_data_is_an_error() {
    let (log, signals) = world();
    let dir = tempfile::tempdir().unwrap();
    let lines = |items: Vec<String>| items.join("\n") + "\n";
    let log_path = dir.path().join("log.jsonl");
    let signals_path = dir.path().join("signals.jsonl");
    std::fs::write(&log_path, lines(log.iter().map(|r| serde_json::to_string(r).unwrap()).collect()))
        .unwrap();
    // Bare signal.v1 lines: their order in the file is their order.
    std::fs::write(
        &signals_path,
        lines(signals.iter().map(|s| serde_json::to_string(&s.signal).unwrap()).collect()),
    )
    .unwrap();
    let out = dir.path().join("out");
    let source = Source::Files { log: log_path.clone(), signals: signals_path };
    let cfg = DatasetConfig { holdout: 0.0, ..DatasetConfig::default() };
    let stats = dataset::run(&cfg, &source, &out).unwrap().stats;
    assert_eq!(stats.rl_train, 2);
    let rl: Vec<RlRecord> =
        read_records(&std::fs::read_to_string(out.join(dataset::RL_TRAIN_FILE)).unwrap()).unwrap();
    assert_eq!(rl.len(), 2);
    let streaming: Vec<StreamingRlRecord> =
        read_records(&std::fs::read_to_string(out.join(dataset::STREAMING_TRAIN_FILE)).unwrap()).unwrap();
    assert_eq!(streaming.len(), 1);
    assert!(out.join(dataset::STATS_FILE).is_file());

    // A log whose users never chose again: an error that says so, with counts.
    let (log, _) = world();
    let err = dataset::build(&cfg, log, Vec::new()).unwrap_err();
    assert!(matches!(err, DatasetError::Empty { no_later_pair: 3, .. }), "{err}");
    assert!(err.to_string().contains("without a later pair"), "{err}");

    // A damaged line names its file and line.
    std::fs::write(&log_path, "{\"schema\": \"nope\"}\n").unwrap();
    let err = dataset::read_log_jsonl(&log_path).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    let err = dataset::build(&DatasetConfig { holdout: 1.5, ..cfg }, Vec::new(), Vec::new()).unwrap_err();
    assert!(matches!(err, DatasetError::Holdout(_)));
}
