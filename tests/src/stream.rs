//! End-to-end helpers for the stream pipeline: topics, producing a synthetic signal
//! stream, running `alignx-consumer run` as a real process (and killing it), and the
//! exactly-once audit of what ended up in Redis and Kafka.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use alignx_schemas::inference_log::LogTopicRecord;
use alignx_schemas::keys::{self, UserKeys};
use anyhow::{Context, bail, ensure};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::services::free_port;

/// Topics every pipeline test uses, with their partition counts.
pub fn create_topics(brokers: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("admin client")?;
    let topics = [
        NewTopic::new(keys::SIGNALS_TOPIC, partitions, TopicReplication::Fixed(1)),
        NewTopic::new(keys::DLQ_TOPIC, 1, TopicReplication::Fixed(1)),
        NewTopic::new(keys::INFERENCE_LOG_TOPIC, 1, TopicReplication::Fixed(1)),
        NewTopic::new(keys::SUMMARIES_TOPIC, 1, TopicReplication::Fixed(1)),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let results = rt.block_on(admin.create_topics(&topics, &AdminOptions::new()))?;
    for r in results {
        if let Err((topic, e)) = r {
            bail!("create topic {topic}: {e}");
        }
    }
    Ok(())
}

/// One message of a synthetic stream, and what the pipeline must make of it.
#[derive(Debug, Clone)]
pub struct Produced {
    pub key: String,
    pub payload: Vec<u8>,
    /// `Some(kind)` for a valid signal, `None` for one that must be dead-lettered.
    pub kind: Option<&'static str>,
    /// The DLQ reason code expected for an invalid one.
    pub reason: Option<&'static str>,
}

/// A deterministic stream: `signals` messages over `users` users (mixed kinds, each user's
/// in order), about `invalid_per_mille`/1000 of them invalid in assorted ways.
pub fn scenario(users: usize, signals: usize, invalid_per_mille: u64, seed: u64) -> Vec<Produced> {
    let mut rng = alignx_trainer::rng::Rng::new(seed);
    let mut out = Vec::with_capacity(signals);
    for i in 0..signals {
        let user = format!("user-{:04}", rng.next_u64() % users as u64);
        let ts = format!("2026-11-27T10:{:02}:{:02}Z", (i / 60) % 60, i % 60);
        if rng.next_u64() % 1000 < invalid_per_mille {
            let (payload, key, reason) = match rng.next_u64() % 5 {
                0 => (b"{not json".to_vec(), user.clone(), "invalid_json"),
                1 => (
                    format!(r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{i}","ts":"{ts}","kind":"text","text":"x"}}"#).into_bytes(),
                    "someone-else".to_owned(),
                    "key_mismatch",
                ),
                2 => (
                    format!(r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{i}","ts":"{ts}","kind":"pair","post":"p"}}"#).into_bytes(),
                    user.clone(),
                    "missing_field",
                ),
                3 => (
                    format!(r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{i}","ts":"{ts}","kind":"like"}}"#).into_bytes(),
                    user.clone(),
                    "unknown_kind",
                ),
                _ => (vec![0xff, 0xfe, b'{'], user.clone(), "invalid_utf8"),
            };
            out.push(Produced { key, payload, kind: None, reason: Some(reason) });
            continue;
        }
        let (kind, body) = match rng.next_u64() % 3 {
            0 => {
                ("pair", format!(r#""post":"post {i}","chosen":"a short answer","rejected":"a long answer""#))
            }
            1 => ("ugc", format!(r#""post":"post {i}","comment":"thanks, very clear""#)),
            _ => ("text", r#""text":"I like examples""#.to_owned()),
        };
        let payload = format!(
            r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{i}","ts":"{ts}","kind":"{kind}",{body}}}"#
        );
        out.push(Produced { key: user, payload: payload.into_bytes(), kind: Some(kind), reason: None });
    }
    out
}

/// Produces messages to the input topic (keyed, so each user stays in one partition) and
/// waits until the broker has them all.
pub fn produce(brokers: &str, messages: &[Produced]) -> anyhow::Result<()> {
    produce_with(brokers, messages, &[])
}

/// [`produce`] one message per batch: tansu's high watermarks are then right (DESIGN.md
/// §8), for readers that stop at them as they would on Kafka (`build-dataset`).
pub fn produce_unbatched(brokers: &str, messages: &[Produced]) -> anyhow::Result<()> {
    produce_with(brokers, messages, &[("batch.num.messages", "1")])
}

fn produce_with(brokers: &str, messages: &[Produced], settings: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let producer: BaseProducer = config.create()?;
    for m in messages {
        let mut record =
            BaseRecord::to(keys::SIGNALS_TOPIC).key(m.key.as_bytes()).payload(m.payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    ensure!(
                        e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        "produce: {e}"
                    );
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Every message of a topic (all partitions, from the start), read until none has come
/// for a second — counted only once every partition that holds messages has delivered
/// one, since a broker's first fetch can be slow (tansu reading S3 after a restart).
/// (tansu's high watermarks are unreliable after batched produce — DESIGN.md §8 — so
/// they cannot say exactly where a topic ends, only whether it holds anything.)
pub fn read_topic(brokers: &str, topic: &str) -> anyhow::Result<Vec<Record>> {
    // `assign` needs a group id; this reader never joins the group or commits.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "alignx-test-reader")
        .set("enable.auto.commit", "false")
        // Not lower: tansu answers a fetch its storage has not served within this time
        // with nothing (S3 storage is slower than memory), and would never be read.
        .set("fetch.wait.max.ms", "500")
        // An offset the broker cannot serve is an error here, not a silent jump to the end.
        .set("auto.offset.reset", "error")
        .create()?;
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut silent = HashSet::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        if high > low {
            silent.insert(p.id());
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = Instant::now();
    while !silent.is_empty() || last.elapsed() < Duration::from_secs(1) {
        ensure!(
            Instant::now() < deadline,
            "timed out reading {topic} (no message yet from partitions {silent:?})"
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m?;
        silent.remove(&m.partition());
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
        last = Instant::now();
    }
    Ok(out)
}

/// The offset after the last message of each partition of the input topic.
pub fn input_ends(brokers: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut ends = BTreeMap::new();
    for r in read_topic(brokers, keys::SIGNALS_TOPIC)? {
        let e = ends.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    Ok(ends)
}

/// The group's committed offset per input partition (-1: none).
pub fn committed(brokers: &str, group: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create()?;
    let meta = consumer.fetch_metadata(Some(keys::SIGNALS_TOPIC), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition(keys::SIGNALS_TOPIC, p.id());
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { o } else { -1 }))
        .collect())
}

/// `alignx-consumer`, built by the workspace build next to this binary (the demo) or one
/// directory up (test binaries live in `deps/`).
pub fn consumer_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("alignx-consumer")
}

/// A binary of the workspace (`alignx-consumer`, `alignx-trainer`), found as
/// [`consumer_binary`] says.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("binary has no directory")?;
    let candidates = [here.join(name), here.parent().unwrap_or(here).join(name)];
    candidates.iter().find(|b| b.exists()).cloned().with_context(|| {
        format!(
            "{} not built: run through `make test` or `make demo` (a workspace build)",
            candidates[1].display()
        )
    })
}

/// A running `alignx-consumer run` process with the counting engine.
pub struct ConsumerProcess {
    child: Child,
    pub metrics: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConsumerProcess {
    pub fn start(brokers: &str, redis_url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(brokers, redis_url, extra, &[])
    }

    /// [`Self::start`] with extra environment variables (they override the defaults).
    pub fn start_with_env(
        brokers: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("consumer.log");
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(consumer_binary()?)
            .args(["run", "--engine", "counting", "--brokers", brokers, "--redis-url", redis_url])
            .args([
                "--metrics-addr",
                &metrics.to_string(),
                "--window-wait",
                "500ms",
                "--commit-interval",
                "200ms",
            ])
            .args(["--kafka-set", "session.timeout.ms=6000", "--kafka-set", "heartbeat.interval.ms=500"])
            .args(["--kafka-set", "statistics.interval.ms=1000"])
            .args(extra)
            .env("ALIGNX_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start alignx-consumer")?;
        Ok(Self { child, metrics, log, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("consumer did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the stream should produce, per user: valid signals by kind.
pub fn expected_counts(messages: &[Produced]) -> BTreeMap<String, [u64; 3]> {
    let mut out: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for m in messages {
        if let Some(kind) = m.kind {
            let i = ["pair", "ugc", "text"].iter().position(|k| *k == kind).expect("a known kind");
            out.entry(m.key.clone()).or_default()[i] += 1;
        }
    }
    out
}

/// Signals consumed by the given users' summaries: `signals_applied` + `signals_failed`
/// (a real model's window that never gave an answer is failed, not lost).
pub fn consumed_total<U: AsRef<str>>(redis: &mut redis::Connection, users: &[U]) -> anyhow::Result<u64> {
    let mut pipe = redis::pipe();
    for u in users {
        pipe.cmd("HMGET").arg(UserKeys::new(u.as_ref()).summary).arg("signals_applied").arg("signals_failed");
    }
    let rows: Vec<(Option<u64>, Option<u64>)> = pipe.query(redis)?;
    Ok(rows.into_iter().map(|(a, f)| a.unwrap_or(0) + f.unwrap_or(0)).sum())
}

/// Sum of `signals_applied` over the given users (0 for users without a summary).
pub fn applied_total(redis: &mut redis::Connection, users: &[&String]) -> anyhow::Result<u64> {
    let mut pipe = redis::pipe();
    for u in users {
        pipe.hget(UserKeys::new(u).summary, "signals_applied");
    }
    let values: Vec<Option<u64>> = pipe.query(redis)?;
    Ok(values.into_iter().flatten().sum())
}

/// Waits until every valid signal is applied and every invalid one dead-lettered.
pub fn wait_until_done(
    redis_url: &str,
    messages: &[Produced],
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let expected = expected_counts(messages);
    let users: Vec<&String> = expected.keys().collect();
    let want: u64 = expected.values().map(|c| c.iter().sum::<u64>()).sum();
    let mut redis = redis::Client::open(redis_url)?.get_connection()?;
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let got = applied_total(&mut redis, &users).unwrap_or(0);
        if got == want {
            return Ok(());
        }
        ensure!(got < want, "{got} signals applied but only {want} valid ones were produced");
        if Instant::now() > deadline {
            bail!("only {got} of {want} valid signals applied after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The exactly-once audit: per user, the counting summary equals the user's valid signals
/// by kind (each applied once), `signals_applied` matches, nothing is pending, the log has
/// one record per version 1..=v; the DLQ has each invalid message once with its reason;
/// committed offsets reached the end of every partition.
pub fn audit(
    brokers: &str,
    redis_url: &str,
    group: &str,
    messages: &[Produced],
) -> anyhow::Result<AuditReport> {
    let expected = expected_counts(messages);
    let mut redis = redis::Client::open(redis_url)?.get_connection()?;
    let mut versions: HashMap<String, u64> = HashMap::new();
    for (user, counts) in &expected {
        let keys = UserKeys::new(user);
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&keys.summary).query(&mut redis)?;
        let want = format!("pair={} ugc={} text={}", counts[0], counts[1], counts[2]);
        ensure!(
            fields.get("summary") == Some(&want),
            "user {user}: summary {:?}, want {want:?}",
            fields.get("summary")
        );
        let total: u64 = counts.iter().sum();
        ensure!(fields.get("signals_applied") == Some(&total.to_string()), "user {user}: {fields:?}");
        let pending: u64 = redis::cmd("LLEN").arg(&keys.pending).query(&mut redis)?;
        ensure!(pending == 0, "user {user}: {pending} signals still pending");
        versions.insert(user.clone(), fields["version"].parse()?);
    }

    // The inference log: every version of every user. A record is produced just after
    // its summary is written, so the last ones may still be on their way.
    let deadline = Instant::now() + Duration::from_secs(20);
    let resent = loop {
        match check_log(brokers, &versions) {
            Ok(resent) => break resent,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    };

    // The DLQ: every invalid message, with the expected reason and its origin. Dead
    // letters are at-least-once: one delivered just before a crash, whose offset was not
    // yet committed, is sent again after the restart — with the same origin headers, by
    // which readers tell the copies apart.
    let dlq = read_topic(brokers, keys::DLQ_TOPIC)?;
    let want_reasons: Vec<&str> = messages.iter().filter_map(|m| m.reason).collect();
    let mut origins = HashSet::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for h in dlq.iter().map(|r| &r.headers) {
        let origin =
            (h.get(keys::HEADER_ORIGIN_PARTITION).cloned(), h.get(keys::HEADER_ORIGIN_OFFSET).cloned());
        ensure!(origin.0.is_some() && origin.1.is_some(), "dead letter without origin headers: {h:?}");
        if origins.insert(origin) {
            *reasons.entry(h.get(keys::HEADER_ERROR).cloned().unwrap_or_default()).or_default() += 1;
        }
    }
    ensure!(
        origins.len() == want_reasons.len(),
        "{} distinct dead letters, want {}",
        origins.len(),
        want_reasons.len()
    );
    let mut want_by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for r in want_reasons {
        *want_by_reason.entry(r.to_owned()).or_default() += 1;
    }
    ensure!(reasons == want_by_reason, "dead letters by reason {reasons:?}, want {want_by_reason:?}");

    // Offsets: committed up to the end of every partition (commits trail by an interval).
    let ends = input_ends(brokers)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let offsets = committed(brokers, group)?;
        if offsets == ends {
            break;
        }
        ensure!(Instant::now() < deadline, "committed offsets {offsets:?}, partition ends {ends:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(AuditReport {
        users: expected.len(),
        valid: expected.values().map(|c| c.iter().sum::<u64>()).sum(),
        dead_lettered: origins.len(),
        dead_letter_resends: dlq.len() - origins.len(),
        updates: versions.values().sum(),
        log_resends: resent,
    })
}

/// Every version 1..=v of every user is in the inference log; returns how many records
/// were repeats (outbox re-sends after a crash).
fn check_log(brokers: &str, versions: &HashMap<String, u64>) -> anyhow::Result<usize> {
    let mut logged: HashMap<String, Vec<u64>> = HashMap::new();
    for r in &read_topic(brokers, keys::INFERENCE_LOG_TOPIC)? {
        let rec = match serde_json::from_slice(&r.payload).context("an inference-log record")? {
            LogTopicRecord::Update(rec) => rec,
            LogTopicRecord::Erasure(_) => continue,
        };
        if let Some(v) = rec.new_version {
            logged.entry(rec.user_id).or_default().push(v);
        }
    }
    let mut resent = 0;
    for (user, v) in versions {
        let mut got = logged.remove(user).unwrap_or_default();
        let n = got.len();
        // An outbox re-send after a crash repeats a record, possibly after the next one.
        got.sort_unstable();
        got.dedup();
        resent += n - got.len();
        let want: Vec<u64> = (1..=*v).collect();
        ensure!(got == want, "user {user}: logged versions {got:?}, want 1..={v}");
    }
    Ok(resent)
}

#[derive(Debug)]
pub struct AuditReport {
    pub users: usize,
    pub valid: u64,
    pub dead_lettered: usize,
    /// Dead letters sent again after a crash (same origin).
    pub dead_letter_resends: usize,
    pub updates: u64,
    pub log_resends: usize,
}
