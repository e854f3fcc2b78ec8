//! Broker failures (DESIGN.md §10): tansu storing in S3 (moto's server), so topics and
//! committed offsets survive it, restarted twice while the consumer works through a
//! stream — once killed (-9), once stopped gracefully — and a broker that is not there
//! yet when the consumer starts. Each ends with the exactly-once audit.

use std::time::{Duration, Instant};

use alignx_tests::services::{
    free_port, http_get, start_moto, start_redis, start_tansu_s3, start_tansu_s3_on,
};
use alignx_tests::stream::{
    ConsumerProcess, applied_total, audit, create_topics, expected_counts, produce, scenario, wait_until_done,
};

const GROUP: &str = "alignx-consumer";

#[test]
fn two_broker_restarts_mid_stream_lose_and_double_nothing() {
    let s3 = start_moto().unwrap();
    let mut broker = start_tansu_s3(&s3).unwrap();
    let redis = start_redis().unwrap();
    let brokers = broker.addr().to_string();
    let redis_url = format!("redis://{}/", redis.addr());
    create_topics(&brokers, 4).unwrap();
    let messages = scenario(300, 6_000, 20, 11);
    let mut consumer = ConsumerProcess::start(&brokers, &redis_url, &[]).unwrap();
    let alive = |c: &mut ConsumerProcess| {
        anyhow::ensure!(c.is_running(), "the consumer exited:\n{}", c.log());
        Ok(())
    };

    // Each chunk is acknowledged before the next (a producer's retries across a broker
    // crash could otherwise duplicate messages, which is the producer's business, not
    // the consumer's); the restarts fall while the consumer is still working.
    let chunks: Vec<_> = messages.chunks(500).collect();
    let users: Vec<String> = expected_counts(&messages).into_keys().collect();
    let users: Vec<&String> = users.iter().collect();
    let mut conn = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let mut restarts = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&brokers, chunk).unwrap();
        if i == chunks.len() / 3 || i == 2 * chunks.len() / 3 {
            let graceful = !restarts.is_empty();
            let produced = messages[..(i + 1) * 500].iter().filter(|m| m.kind.is_some()).count() as u64;
            // Mid-stream: once the consumer is applying this backlog, before it is done.
            let since = applied_total(&mut conn, &users).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let applied = loop {
                let applied = applied_total(&mut conn, &users).unwrap();
                if applied > since || Instant::now() > deadline {
                    break applied;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(applied > since && applied < produced, "{applied} of {produced} applied: not mid-stream");
            println!(
                "broker stopped ({}) with {applied} of {produced} valid signals applied",
                if graceful { "SIGTERM" } else { "SIGKILL" }
            );
            let started = Instant::now();
            broker.stop(graceful);
            std::thread::sleep(Duration::from_secs(2));
            broker.start_again().unwrap();
            restarts.push((if graceful { "SIGTERM" } else { "SIGKILL" }, started.elapsed()));
            alive(&mut consumer).unwrap();
        }
    }
    wait_until_done(&redis_url, &messages, Duration::from_secs(180), || alive(&mut consumer)).unwrap();
    let report = audit(&brokers, &redis_url, GROUP, &messages).unwrap();
    println!("restarts {restarts:?}; {report:?}");
    assert_eq!(restarts.len(), 2);
    consumer.terminate(Duration::from_secs(30)).unwrap();
}

#[test]
fn a_broker_down_at_start_is_waited_for_then_consumed() {
    let redis = start_redis().unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let port = free_port().unwrap();
    let brokers = format!("127.0.0.1:{port}");
    let mut consumer = ConsumerProcess::start(&brokers, &redis_url, &[]).unwrap();

    // Nothing listens yet: the consumer stays up, alive but not ready.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut probes = 0;
    while Instant::now() < deadline {
        if let Ok((status, _)) = http_get(consumer.metrics, "/readyz") {
            assert_eq!(status, 503, "ready without a broker");
            assert_eq!(http_get(consumer.metrics, "/healthz").unwrap().0, 200);
            probes += 1;
        }
        assert!(consumer.is_running(), "the consumer gave up on a missing broker:\n{}", consumer.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(probes >= 5, "the readiness endpoint answers while the broker is down");

    let s3 = start_moto().unwrap();
    let _broker = start_tansu_s3_on(&s3, port).unwrap();
    create_topics(&brokers, 2).unwrap();
    let messages = scenario(50, 500, 20, 12);
    produce(&brokers, &messages).unwrap();
    wait_until_done(&redis_url, &messages, Duration::from_secs(120), || {
        anyhow::ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
        Ok(())
    })
    .unwrap();
    let report = audit(&brokers, &redis_url, GROUP, &messages).unwrap();
    println!("{report:?}");
    assert_eq!(http_get(consumer.metrics, "/readyz").unwrap().0, 200);
    consumer.terminate(Duration::from_secs(30)).unwrap();
}
