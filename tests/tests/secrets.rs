//! Secrets stay secret: a Redis password (from a file, and from the environment) and a
//! Kafka property read from a file (`--kafka-set-file`) work, and never show up in the
//! consumer's log (at debug level), its `/metrics`, `--help`, or the errors of a wrong
//! password.

use std::process::Command;
use std::time::Duration;

use alignx_tests::services::{http_get, start_redis, start_tansu};
use alignx_tests::stream::{
    ConsumerProcess, consumer_binary, create_topics, produce, scenario, wait_until_done,
};

const REDIS_SECRET: &str = "redis-s3cret-7f3a";
const KAFKA_SECRET: &str = "kafka-s3cret-91c2";

fn assert_clean(what: &str, text: &str) {
    for secret in [REDIS_SECRET, KAFKA_SECRET] {
        assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
    }
}

#[test]
fn secrets_from_files_and_env_never_appear_in_logs_metrics_help_or_errors() {
    let broker = start_tansu().unwrap();
    let redis = start_redis().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 2).unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let mut admin = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(REDIS_SECRET).query(&mut admin).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let redis_file = dir.path().join("redis-password");
    let kafka_file = dir.path().join("kafka-password");
    std::fs::write(&redis_file, format!("{REDIS_SECRET}\n")).unwrap();
    std::fs::write(&kafka_file, KAFKA_SECRET).unwrap();
    let (redis_arg, kafka_arg) =
        (redis_file.display().to_string(), format!("sasl.password={}", kafka_file.display()));

    // The real thing works with them: a stream is applied through the password-protected Redis.
    let messages = scenario(20, 200, 20, 5);
    produce(&brokers, &messages).unwrap();
    let mut consumer = ConsumerProcess::start_with_env(
        &brokers,
        &redis_url,
        &["--redis-password-file", &redis_arg, "--kafka-set-file", &kafka_arg],
        &[("ALIGNX_LOG", "debug,librdkafka=info,rdkafka=info")],
    )
    .unwrap();
    let authed = format!("redis://:{REDIS_SECRET}@{}/", redis.addr());
    wait_until_done(&authed, &messages, Duration::from_secs(60), || {
        anyhow::ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
        Ok(())
    })
    .unwrap();
    let (_, metrics) = http_get(consumer.metrics, "/metrics").unwrap();
    assert!(metrics.contains("alignx_signals_total"));
    assert_clean("/metrics", &metrics);
    consumer.terminate(Duration::from_secs(30)).unwrap();
    let log = consumer.log();
    assert!(log.contains("partitions assigned"), "the log is the real one:\n{log}");
    assert_clean("the consumer's debug log", &log);

    // The password from the environment works the same, and --help shows no value.
    let help = Command::new(consumer_binary().unwrap())
        .args(["run", "--help"])
        .env("ALIGNX_REDIS_PASSWORD", REDIS_SECRET)
        .env("ALIGNX_REDIS_PASSWORD_FILE", &redis_file)
        .output()
        .unwrap();
    assert!(help.status.success());
    assert_clean("run --help", &String::from_utf8_lossy(&help.stdout));
    let inspect = Command::new(consumer_binary().unwrap())
        .args(["inspect", "user-0001", "--redis-url", &redis_url])
        .env("ALIGNX_REDIS_PASSWORD", REDIS_SECRET)
        .output()
        .unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&inspect.stdout), String::from_utf8_lossy(&inspect.stderr));
    assert!(inspect.status.success() && said.contains("summary: version"), "{said}");
    assert_clean("inspect", &said);

    // A wrong password: the errors say so without showing either password.
    std::fs::write(&redis_file, "not-the-redis-s3cret").unwrap();
    let wrong = Command::new(consumer_binary().unwrap())
        .args(["inspect", "user-0001", "--redis-url", &redis_url, "--redis-password-file", &redis_arg])
        .args(["--kafka-set-file", &kafka_arg])
        .output()
        .unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&wrong.stdout), String::from_utf8_lossy(&wrong.stderr));
    assert!(!wrong.status.success(), "{said}");
    assert!(
        said.to_lowercase().contains("pass") || said.contains("auth"),
        "the error says what failed: {said}"
    );
    assert!(!said.contains("not-the-redis-s3cret"), "{said}");
    assert_clean("a wrong-password error", &said);
}
