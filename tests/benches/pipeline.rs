//! `make bench` (pipeline part): steady-state signals/s through broker → consumer → Redis
//! with the counting engine and every guarantee on (windows persisted, Lua CAS apply,
//! inference log acknowledged before offsets advance), side by side in one run with
//!  - the same pipeline set to handle one message at a time (no batching, no pipelining),
//!  - rdkafka alone reading the same topic (the ceiling on this machine),
//!
//! plus the CPU seconds each process (consumer, Redis, broker) spent, which says where the
//! time goes. JSON to the path given as the first argument.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use alignx_tests::services::{http_get, start_redis, start_tansu};
use alignx_tests::stream::{ConsumerProcess, Produced, create_topics, produce};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const USERS: usize = 20_000;
/// Signals per user: a multiple of the window (4), so every window fills and the run
/// ends without waiting for timers.
const PER_USER: usize = 16;
const BASELINE_SIGNALS: usize = 6_000;

/// Round-robin over users so windows fill throughout the run.
fn stream(users: usize, per_user: usize) -> Vec<Produced> {
    let mut out = Vec::with_capacity(users * per_user);
    for round in 0..per_user {
        for u in 0..users {
            let user = format!("user-{u:05}");
            let (kind, body) = match (u + round) % 3 {
                0 => (
                    "pair",
                    format!(
                        r#""post":"How do I sort a list? ({round})","chosen":"Use sorted(xs).","rejected":"There are many ways to think about ordering.""#
                    ),
                ),
                1 => (
                    "ugc",
                    format!(
                        r#""post":"Best editor? ({round})","comment":"Short answers please, with one example.""#
                    ),
                ),
                _ => ("text", r#""text":"I prefer concise, technical explanations.""#.to_owned()),
            };
            let payload = format!(
                r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{round}","ts":"2026-11-27T10:00:00Z","kind":"{kind}",{body}}}"#
            );
            out.push(Produced { key: user, payload: payload.into_bytes(), kind: Some(kind), reason: None });
        }
    }
    out
}

/// Reads (signals accepted, pending, in flight) from the consumer's /metrics.
fn progress(addr: SocketAddr) -> Option<(u64, i64, i64)> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    let mut accepted = 0.0;
    let (mut pending, mut inflight) = (0, 0);
    for line in body.lines() {
        let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        if line.starts_with("alignx_signals_total{") && line.contains("outcome=\"accepted\"") {
            accepted += value();
        } else if line.starts_with("alignx_pending_signals ") {
            pending = value() as i64;
        } else if line.starts_with("alignx_inflight_updates ") {
            inflight = value() as i64;
        }
    }
    Some((accepted as u64, pending, inflight))
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Runs a consumer over `n` pre-produced signals; returns the measurement.
fn measure(brokers: &str, redis_url: &str, pids: &[(&str, u32)], n: u64, args: &[&str]) -> serde_json::Value {
    let mut consumer = ConsumerProcess::start(brokers, redis_url, args).unwrap();
    let addr = consumer.metrics;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut start = None;
    let mut cpu_start = HashMap::new();
    // ALIGNX_BENCH_PROFILE=DIR: record the consumer with `perf` during the measured run.
    let profile_dir = std::env::var("ALIGNX_BENCH_PROFILE").ok();
    let mut profiler: Option<std::process::Child> = None;
    let mut r = redis::Client::open(redis_url).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut r).unwrap();
    loop {
        assert!(consumer.is_running(), "consumer exited:\n{}", consumer.log());
        assert!(Instant::now() < deadline, "no end in sight:\n{}", consumer.log());
        let Some((accepted, pending, inflight)) = progress(addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if start.is_none() && accepted > 0 {
            start = Some(Instant::now());
            profiler = profile_dir.as_ref().map(|dir| {
                std::process::Command::new("perf")
                    .args(["record", "-F", "199", "--call-graph", "dwarf,16384", "-o"])
                    .arg(std::path::Path::new(dir).join(format!("consumer-{}.perf.data", args.len())))
                    .args(["-p", &consumer.pid().to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("perf runs")
            });
            cpu_start = pids.iter().map(|(name, pid)| (*name, cpu_seconds(*pid))).collect();
            cpu_start.insert("consumer", cpu_seconds(consumer.pid()));
        }
        if accepted >= n && pending == 0 && inflight == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let seconds = start.expect("started").elapsed().as_secs_f64();
    if let Some(mut p) = profiler {
        // SAFETY: kill(2) on our own child's pid; perf writes its file on SIGINT.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
    }
    // Redis's own account of where its time went, per command.
    let stats: String = redis::cmd("INFO").arg("commandstats").query(&mut r).unwrap();
    let redis_commands: serde_json::Map<String, serde_json::Value> = stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                rest.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<f64>().ok())
            };
            Some((
                name.to_owned(),
                json!({"calls": field("calls")?, "usec_per_call": field("usec_per_call")?}),
            ))
        })
        .collect();
    let mut cpu = serde_json::Map::new();
    for (name, pid) in pids.iter().copied().chain([("consumer", consumer.pid())]) {
        cpu.insert(name.to_owned(), json!(cpu_seconds(pid) - cpu_start[name]));
    }
    consumer.terminate(Duration::from_secs(60)).unwrap();
    json!({
        "signals": n, "seconds": seconds, "signals_per_second": n as f64 / seconds,
        "cpu_seconds": cpu, "redis_commands": redis_commands,
    })
}

/// rdkafka alone: read every message of the topic once, no processing.
fn rdkafka_alone(brokers: &str, topic: &str, n: u64) -> serde_json::Value {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-rdkafka-alone")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut read = 0u64;
    let mut start = None;
    while read < n {
        if let Some(m) = consumer.poll(Duration::from_secs(10)) {
            m.unwrap();
            start.get_or_insert_with(Instant::now);
            read += 1;
        }
    }
    let seconds = start.unwrap().elapsed().as_secs_f64();
    json!({ "signals": n, "seconds": seconds, "signals_per_second": n as f64 / seconds })
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/pipeline.json".into());
    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 4).unwrap();
    let redis = start_redis().unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let pids = [("redis", redis.pid()), ("broker", broker.pid())];

    let messages = stream(USERS, PER_USER);
    let n = messages.len() as u64;
    eprintln!("producing {n} signals for {USERS} users");
    produce(&brokers, &messages).unwrap();
    let alone = rdkafka_alone(&brokers, alignx_schemas::keys::SIGNALS_TOPIC, n);
    eprintln!("rdkafka alone: {alone}");
    // ALIGNX_BENCH_ARGS: extra consumer flags for the pipeline run (to try settings).
    let extra = std::env::var("ALIGNX_BENCH_ARGS").unwrap_or_default();
    let mut args = vec!["--window-wait", "60s", "--commit-interval", "1s"];
    args.extend(extra.split_whitespace());
    let batched = measure(&brokers, &redis_url, &pids, n, &args);
    eprintln!("pipeline: {batched}");

    // The one-at-a-time baseline on its own topic (it is slow), against an empty Redis.
    let baseline_topic = "alignx.signals.baseline";
    {
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let topic =
            rdkafka::admin::NewTopic::new(baseline_topic, 4, rdkafka::admin::TopicReplication::Fixed(1));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(admin.create_topics(&[topic], &rdkafka::admin::AdminOptions::new())).unwrap();
    }
    let small = stream(BASELINE_SIGNALS / PER_USER, PER_USER);
    let producer: rdkafka::producer::BaseProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for m in &small {
        producer
            .send(
                rdkafka::producer::BaseRecord::to(baseline_topic)
                    .key(m.key.as_bytes())
                    .payload(m.payload.as_slice()),
            )
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    let mut r = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("FLUSHALL").query(&mut r).unwrap();
    if std::env::var_os("ALIGNX_BENCH_SKIP_BASELINE").is_some() {
        return;
    }
    let one_at_a_time = measure(
        &brokers,
        &redis_url,
        &pids,
        small.len() as u64,
        &[
            "--input-topic",
            baseline_topic,
            "--group-id",
            "bench-baseline",
            "--window-wait",
            "60s",
            "--poll-batch",
            "1",
            "--max-in-flight",
            "1",
            "--batch-size",
            "1",
            "--commit-interval",
            "0s",
        ],
    );
    eprintln!("one at a time: {one_at_a_time}");

    let rate = |v: &serde_json::Value| v["signals_per_second"].as_f64().unwrap();
    let report = json!({
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        "engine": "counting",
        "users": USERS,
        "window": 4,
        "pipeline": batched,
        "one_at_a_time": one_at_a_time,
        "rdkafka_alone": alone,
        "speedup_vs_one_at_a_time": rate(&batched) / rate(&one_at_a_time),
        "fraction_of_rdkafka_alone": rate(&batched) / rate(&alone),
    });
    std::fs::create_dir_all(std::path::Path::new(&out).parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
