//! The stream pipeline end to end, as real processes on loopback: tansu (Kafka protocol),
//! Redis, `alignx-consumer run` with the counting engine, and Prometheus. Each test ends
//! with the exactly-once audit (`alignx_tests::stream::audit`).

use std::time::Duration;

use alignx_tests::services::{
    Service, http_get, start_prometheus, start_redis, start_redis_persistent, start_tansu,
};
use alignx_tests::stream::{
    ConsumerProcess, Produced, audit, create_topics, produce, scenario, wait_until_done,
};

const GROUP: &str = "alignx-consumer";

struct World {
    broker: Service,
    redis: Service,
    brokers: String,
    redis_url: String,
}

fn world(redis: Service) -> World {
    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 4).unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    World { broker, redis, brokers, redis_url }
}

fn stream() -> Vec<Produced> {
    // 10,000 signals for 500 users, ~2% invalid.
    scenario(500, 10_000, 20, 7)
}

fn alive(c: &mut ConsumerProcess) -> anyhow::Result<()> {
    anyhow::ensure!(c.is_running(), "the consumer exited:\n{}", c.log());
    Ok(())
}

#[test]
fn every_signal_applied_once_and_prometheus_scrapes_the_consumer() {
    let w = world(start_redis().unwrap());
    let messages = stream();
    produce(&w.brokers, &messages).unwrap();
    let mut consumer =
        ConsumerProcess::start(&w.brokers, &w.redis_url, &["--summaries-topic", "alignx.summaries"]).unwrap();
    let prometheus = start_prometheus(consumer.metrics).unwrap();
    wait_until_done(&w.redis_url, &messages, Duration::from_secs(120), || alive(&mut consumer)).unwrap();
    let report = audit(&w.brokers, &w.redis_url, GROUP, &messages).unwrap();
    println!("{report:?}");
    assert!(report.dead_lettered > 100, "the stream has ~2% invalid messages: {report:?}");

    // The consumer's own view agrees, and a real Prometheus sees it.
    let (status, body) = http_get(consumer.metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    let accepted: f64 = body
        .lines()
        .filter(|l| l.starts_with("alignx_signals_total{") && l.contains("outcome=\"accepted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(accepted as u64, report.valid, "alignx_signals_total{{outcome=accepted}}");
    assert_eq!(http_get(consumer.metrics, "/readyz").unwrap().0, 200);
    // Lag per partition comes from librdkafka's statistics (every second in tests).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !http_get(consumer.metrics, "/metrics").unwrap().1.contains("alignx_consumer_lag{partition=") {
        assert!(std::time::Instant::now() < deadline, "no alignx_consumer_lag series");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, answer) =
            http_get(prometheus.addr(), "/api/v1/query?query=sum(alignx_signals_total)").unwrap();
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
        if value.is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Prometheus has no alignx_signals_total: {answer}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The summaries topic carries every new version.
    let summaries = alignx_tests::stream::read_topic(&w.brokers, "alignx.summaries").unwrap();
    assert!(
        summaries.len() as u64 >= report.updates,
        "{} summaries for {} updates",
        summaries.len(),
        report.updates
    );

    let status = consumer.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "SIGTERM drains and exits 0: {status}\n{}", consumer.log());
    drop(w.broker);
}

#[test]
fn kill_9_at_random_points_loses_and_repeats_nothing() {
    let w = world(start_redis().unwrap());
    let messages = stream();
    // Produce steadily in the background while the consumer is killed and restarted.
    let producer = {
        let (brokers, messages) = (w.brokers.clone(), messages.clone());
        std::thread::spawn(move || {
            for chunk in messages.chunks(250) {
                produce(&brokers, chunk).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let mut rng = alignx_trainer::rng::Rng::new(11);
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    let mut kills = 0;
    while kills < 4 {
        // Right after a restart the consumer works through the backlog that piled up
        // while it was gone: kill it at random points in that window.
        std::thread::sleep(Duration::from_millis(2_000 + rng.next_u64() % 5_000));
        consumer.kill9();
        kills += 1;
        consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    }
    producer.join().unwrap();
    wait_until_done(&w.redis_url, &messages, Duration::from_secs(180), || alive(&mut consumer)).unwrap();
    let report = audit(&w.brokers, &w.redis_url, GROUP, &messages).unwrap();
    println!("{kills} kills: {report:?}");
}

#[test]
fn a_consumer_leaving_the_group_mid_stream_hands_over_cleanly() {
    let w = world(start_redis().unwrap());
    let messages = stream();
    let (first, second) = messages.split_at(messages.len() / 2);
    let mut a = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    let mut b = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    produce(&w.brokers, first).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let status = b.terminate(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status}\n{}", b.log());
    produce(&w.brokers, second).unwrap();
    wait_until_done(&w.redis_url, &messages, Duration::from_secs(180), || alive(&mut a)).unwrap();
    let report = audit(&w.brokers, &w.redis_url, GROUP, &messages).unwrap();
    println!("{report:?}");
    assert!(b.log().contains("partitions assigned"), "b took part:\n{}", b.log());
}

#[test]
fn a_redis_restart_mid_stream_loses_and_repeats_nothing() {
    let mut w = world(start_redis_persistent().unwrap());
    let messages = stream();
    let (first, second) = messages.split_at(messages.len() / 2);
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    produce(&w.brokers, first).unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    w.redis.stop(false); // kill -9: only the append-only file survives
    produce(&w.brokers, second).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(http_get(consumer.metrics, "/readyz").unwrap().0, 503, "not ready without Redis");
    w.redis.start_again().unwrap();
    wait_until_done(&w.redis_url, &messages, Duration::from_secs(180), || alive(&mut consumer)).unwrap();
    let report = audit(&w.brokers, &w.redis_url, GROUP, &messages).unwrap();
    println!("{report:?}");
    assert!(consumer.log().contains("Redis"), "the outage was noticed:\n{}", consumer.log());
}

#[test]
fn a_flood_of_invalid_messages_trips_the_breaker() {
    let w = world(start_redis().unwrap());
    // Per partition: 4 partitions × ~50 ≫ the window of 20.
    let bad: Vec<Produced> = (0..200)
        .map(|i| Produced {
            key: format!("u{i}"),
            payload: b"garbage".to_vec(),
            kind: None,
            reason: Some("invalid_json"),
        })
        .collect();
    produce(&w.brokers, &bad).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("consumer.toml");
    std::fs::write(&config, "[input]\nmax_invalid_ratio = 0.5\ninvalid_ratio_window = 20\n").unwrap();
    let mut consumer =
        ConsumerProcess::start(&w.brokers, &w.redis_url, &["--config", config.to_str().unwrap()]).unwrap();
    let status = consumer.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(3), "{}", consumer.log());
    assert!(consumer.log().contains("circuit breaker"), "{}", consumer.log());
}

#[test]
fn the_base_setting_keeps_recent_signals_and_prompts_with_them() {
    use alignx_schemas::inference_log::{InferenceLogRecord, LoggedSignal};
    use alignx_schemas::keys::{self, UserKeys};
    use alignx_tests::stream::read_topic;

    let w = world(start_redis().unwrap());
    let messages = scenario(5, 60, 0, 9);
    produce(&w.brokers, &messages).unwrap();
    let mut consumer =
        ConsumerProcess::start(&w.brokers, &w.redis_url, &["--setting", "base", "--window-size", "2"])
            .unwrap();
    wait_until_done(&w.redis_url, &messages, Duration::from_secs(60), || alive(&mut consumer)).unwrap();
    let mut r = redis::Client::open(w.redis_url.as_str()).unwrap().get_connection().unwrap();
    let log: Vec<InferenceLogRecord> = read_topic(&w.brokers, keys::INFERENCE_LOG_TOPIC)
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    for user in (0..5).map(|u| format!("user-{u:04}")) {
        // The capped list holds the user's last 4 signals, oldest first.
        let kept: Vec<String> =
            redis::cmd("LRANGE").arg(UserKeys::new(&user).signals).arg(0).arg(-1).query(&mut r).unwrap();
        let kept: Vec<String> =
            kept.iter().map(|j| serde_json::from_str::<LoggedSignal>(j).unwrap().signal.signal_id).collect();
        let produced: Vec<String> = messages
            .iter()
            .filter(|m| m.key == user)
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["signal_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(kept, produced[produced.len() - 4..], "{user}");
    }
    for rec in &log {
        assert!(rec.prompt.contains("Generate the user's preference based on their historical behavior."));
        assert!(!rec.prompt.contains("Past Preferences"), "no summary in a base-setting prompt");
    }
    // An update after the first shows the two previous signals as well as its own two.
    let later = log.iter().find(|r| r.previous_version >= 1).expect("second updates exist");
    let earlier = log
        .iter()
        .find(|r| r.user_id == later.user_id && r.new_version == Some(later.previous_version))
        .expect("the update before it");
    for s in &earlier.signals {
        let text = match &s.signal.body {
            alignx_schemas::SignalBody::Pair { post, .. } | alignx_schemas::SignalBody::Ugc { post, .. } => {
                post
            }
            alignx_schemas::SignalBody::Text { text } => text,
        };
        assert!(later.prompt.contains(text.as_str()), "recent signal {text:?} is in the next prompt");
    }
}
