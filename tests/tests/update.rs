//! One update batch against a real Redis and broker, with an engine whose generations
//! fail: the window is retried a bounded number of times, then consumed without a new
//! summary and recorded as failed in the inference log and the metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use alignx_consumer::config::KafkaConfig;
use alignx_consumer::engine::{Engine, EngineError, EngineSlot, Generation, UpdateRequest};
use alignx_consumer::metrics::Metrics;
use alignx_consumer::redis_conn::RedisConn;
use alignx_consumer::sink::Sink;
use alignx_consumer::store::Store;
use alignx_consumer::update::Updater;
use alignx_consumer::window::{Finished, UpdateInput};
use alignx_schemas::inference_log::{InferenceLogRecord, LoggedSignal, UpdateOutcome};
use alignx_schemas::keys;
use alignx_schemas::prompt::Templates;
use alignx_schemas::{Limits, validate_signal};
use alignx_tests::services::{start_redis, start_tansu};
use alignx_tests::stream::{create_topics, read_topic};

/// Never closes its answer.
struct Rambling;

impl Engine for Rambling {
    fn model_id(&self) -> &str {
        "rambling"
    }
    fn provider(&self) -> &str {
        "cpu"
    }
    fn generate(&self, batch: &[UpdateRequest]) -> Result<Vec<Result<Generation, EngineError>>, EngineError> {
        Ok(batch
            .iter()
            .map(|_| {
                Ok(Generation {
                    text: " I wonder </think> <answer>likes".into(),
                    prompt_tokens: 10,
                    generated_tokens: 5,
                })
            })
            .collect())
    }
}

fn signal(offset: i64) -> Arc<LoggedSignal> {
    let json = format!(
        r#"{{"schema":"alignx.signal.v1","user_id":"u","signal_id":"s{offset}","ts":"2026-11-27T09:00:00Z","kind":"text","text":"hello"}}"#
    );
    Arc::new(LoggedSignal {
        partition: 0,
        offset,
        signal: validate_signal(json.as_bytes(), Some(b"u"), &Limits::default()).unwrap(),
    })
}

#[test]
fn failing_generations_are_retried_then_recorded_as_failed() {
    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 1).unwrap();
    let redis = start_redis().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = Metrics::new();
    let abandon = Arc::new(AtomicBool::new(false));
    let kafka = KafkaConfig { brokers: brokers.clone(), ..KafkaConfig::default() };
    let redis_cfg = alignx_consumer::config::RedisConfig {
        url: format!("redis://{}/", redis.addr()),
        ..Default::default()
    };
    let store = Store::new(rt.block_on(RedisConn::connect(&redis_cfg)).unwrap(), 4);
    let updater = Arc::new(Updater {
        engine: Arc::new(EngineSlot::new(Arc::new(Rambling))),
        store: store.clone(),
        sink: Sink::new(&kafka, abandon.clone()).unwrap(),
        metrics: metrics.clone(),
        templates: Templates::default(),
        max_summary_chars: 2048,
        keep_reasoning: false,
        max_retries: 3,
        base_signals: 0,
        redis_ok: Arc::new(AtomicBool::new(true)),
        abandon,
    });
    let window = vec![signal(5), signal(6)];
    rt.block_on(store.persist_pending("u", &window)).unwrap();
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let run = |attempt| {
        let input = UpdateInput {
            user: Arc::from("u"),
            expected_version: 0,
            previous_summary: None,
            signals: window.clone(),
            attempt,
            recent: vec![],
        };
        let permit = rt.block_on(slots.clone().acquire_owned()).unwrap();
        rt.block_on(updater.clone().run_batch(vec![input], permit)).pop().unwrap().1
    };
    for attempt in 0..2 {
        assert!(matches!(run(attempt), Finished::Retry { .. }), "attempt {attempt} is retried");
        assert_eq!(rt.block_on(store.pending("u")).unwrap().len(), 2, "signals stay pending");
    }
    assert!(matches!(run(2), Finished::Skipped), "the third failure gives up");
    assert!(rt.block_on(store.pending("u")).unwrap().is_empty());
    let user = rt.block_on(store.load_user("u")).unwrap();
    assert!(user.summary.is_none(), "no summary was invented");
    assert_eq!(user.applied.get(&0), Some(&6), "the window counts as consumed: a replay skips it");

    let log = read_topic(&brokers, keys::INFERENCE_LOG_TOPIC).unwrap();
    assert_eq!(log.len(), 1, "one record for the failed update, not one per attempt");
    let rec: InferenceLogRecord = serde_json::from_slice(&log[0].payload).unwrap();
    assert_eq!(rec.outcome, UpdateOutcome::Truncated);
    assert_eq!((rec.summary, rec.new_version, rec.signals.len()), (None, None, 2));
    let text = metrics.render();
    assert!(text.contains("alignx_updates_total{outcome=\"truncated\"} 3"), "{text}");
}
