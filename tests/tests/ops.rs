//! The operator commands end to end, as processes against a real broker (tansu) and
//! Redis: `produce` validates before sending, `inspect`/`export` show what is stored,
//! and `erase` — racing live traffic for the same user — leaves nothing of the user's
//! past behind while later signals make a new summary.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alignx_consumer::ops::{EXPORT_SCHEMA, UserExport};
use alignx_schemas::inference_log::LogTopicRecord;
use alignx_schemas::keys::{self, UserKeys};
use alignx_tests::services::{Service, start_redis, start_tansu};
use alignx_tests::stream::{
    ConsumerProcess, Produced, audit, committed, consumed_total, consumer_binary, create_topics, input_ends,
    produce, read_topic, scenario, wait_until_done,
};

struct World {
    _broker: Service,
    _redis: Service,
    brokers: String,
    redis_url: String,
}

fn world() -> World {
    let broker = start_tansu().unwrap();
    let redis = start_redis().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 4).unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    World { _broker: broker, _redis: redis, brokers, redis_url }
}

/// `alignx-consumer ARGS… --brokers … --redis-url …`, with `stdin` as its input.
fn ops(w: &World, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(consumer_binary().unwrap())
        .args(args)
        .args(["--brokers", &w.brokers, "--redis-url", &w.redis_url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Waits (up to 60 s) until `field` of the user's summary satisfies `done`; `alive`
/// fails the wait early.
fn wait_for_summary(
    w: &World,
    user: &str,
    field: &str,
    done: impl Fn(u64) -> bool,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) {
    let mut redis = redis::Client::open(w.redis_url.as_str()).unwrap().get_connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let value: Option<u64> =
            redis::cmd("HGET").arg(UserKeys::new(user).summary).arg(field).query(&mut redis).unwrap();
        if value.is_some_and(&done) {
            return;
        }
        alive().unwrap();
        assert!(Instant::now() < deadline, "{user}: summary {field} still {value:?} after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn signal(user: &str, id: &str, ts: &str, kind: &str) -> String {
    let body = match kind {
        "pair" => r#""post":"p","chosen":"short","rejected":"long""#,
        "ugc" => r#""post":"p","comment":"thanks""#,
        _ => r#""text":"I like examples""#,
    };
    format!(
        r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"{id}","ts":"{ts}","kind":"{kind}",{body}}}"#
    )
}

#[test]
fn produce_validates_first_then_inspect_and_export_show_the_stored_user() {
    let w = world();
    let lines = [
        signal("ada", "1", "2026-11-27T09:00:00Z", "pair"),
        r#"{"schema":"alignx.signal.v1","user_id":"ada","signal_id":"2","ts":"yesterday","kind":"text","text":"x"}"#
            .to_owned(),
        signal("ada", "3", "2026-11-27T09:01:00Z", "ugc"),
        "{not json".to_owned(),
        signal("bob", "5", "2026-11-27T09:02:00Z", "text"),
        signal("ada", "6", "2026-11-27T09:03:00Z", "text"),
    ];
    let file = lines.join("\n") + "\n";

    // Invalid lines are reported by number and nothing is sent.
    let out = ops(&w, &["produce", "-"], Some(&file));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("line 2: invalid_timestamp") && said.contains("line 4: invalid_json"), "{said}");
    assert!(said.contains("nothing sent"), "{said}");
    assert!(read_topic(&w.brokers, keys::SIGNALS_TOPIC).unwrap().is_empty(), "nothing on the topic");

    // --skip-invalid sends the four valid ones, keyed by user, in file order per user.
    let out = ops(&w, &["produce", "--skip-invalid", "-"], Some(&file));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("sent 4 signals") && said.contains("skipped 2 invalid lines"), "{said}");
    let sent = read_topic(&w.brokers, keys::SIGNALS_TOPIC).unwrap();
    assert_eq!(sent.len(), 4);
    let mut ada: Vec<_> = sent.iter().filter(|r| r.key.as_deref() == Some(b"ada".as_slice())).collect();
    ada.sort_by_key(|r| r.offset);
    let ids: Vec<String> = ada
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["signal_id"].to_string())
        .collect();
    assert_eq!(ids, [r#""1""#, r#""3""#, r#""6""#]);

    // The consumer applies them; inspect and export show the same stored state.
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    wait_for_summary(
        &w,
        "ada",
        "signals_applied",
        |n| n == 3,
        || {
            anyhow::ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
            Ok(())
        },
    );
    let out = ops(&w, &["inspect", "ada"], None);
    let human = text(&out);
    assert!(out.status.success(), "{human}");
    assert!(human.contains("user: ada") && human.contains("3 signals applied"), "{human}");
    assert!(human.contains("pending signals: 0") && human.contains("erased: never"), "{human}");

    let out = ops(&w, &["inspect", "ada", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let inspected: UserExport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected.schema, EXPORT_SCHEMA);
    let summary = inspected.summary.as_ref().unwrap();
    assert_eq!((summary.signals_applied, summary.model.as_str()), (3, "counting"));
    assert!(inspected.not_included.contains("alignx.signals"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ada.json");
    let out = ops(&w, &["export", "ada", "--out", path.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out));
    let exported: UserExport = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(UserExport { exported_at_ms: 0, ..exported }, UserExport { exported_at_ms: 0, ..inspected });

    // A user never seen: an empty record, not an error.
    let out = ops(&w, &["inspect", "nobody"], None);
    assert!(out.status.success() && text(&out).contains("summary: none"), "{}", text(&out));
    consumer.terminate(Duration::from_secs(30)).unwrap();
}

/// Counts by kind as the counting engine writes them.
fn counts(signals: &[(i64, &'static str)]) -> String {
    let mut by: BTreeMap<&str, u64> = BTreeMap::from([("pair", 0), ("ugc", 0), ("text", 0)]);
    for (_, k) in signals {
        *by.get_mut(k).unwrap() += 1;
    }
    format!("pair={} ugc={} text={}", by["pair"], by["ugc"], by["text"])
}

#[test]
fn erase_racing_live_traffic_leaves_only_what_came_after() {
    let w = world();
    let mut others = scenario(50, 2_000, 10, 11);
    // A user erased with nothing after: a replay of the topic must not bring them back.
    for i in 0..6 {
        let kind = ["pair", "ugc", "text"][i % 3];
        let payload =
            signal("ghost", &format!("g{i}"), &format!("2026-11-27T08:00:0{i}Z"), kind).into_bytes();
        others.push(Produced { key: "ghost".into(), payload, kind: Some(kind), reason: None });
    }
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();

    // The victim's signals stream in (stamped with the wall clock) alongside everyone
    // else's while the erase runs.
    let stop = AtomicBool::new(false);
    let victim: Vec<(i64, &'static str)> = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let kinds = ["pair", "ugc", "text"];
            let mut sent = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let now = chrono::Utc::now();
                let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let kind = kinds[i % 3];
                let m = Produced {
                    key: "victim".into(),
                    payload: signal("victim", &format!("v{i}"), &ts, kind).into_bytes(),
                    kind: Some(kind),
                    reason: None,
                };
                produce(&w.brokers, &[m]).unwrap();
                sent.push((now.timestamp_millis(), kind));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        });
        produce(&w.brokers, &others).unwrap();
        // Erase once the victim has a summary with history, while more is in flight.
        wait_for_summary(&w, "victim", "version", |v| v >= 3, || Ok(()));
        wait_until_done(&w.redis_url, &others, Duration::from_secs(60), || Ok(())).unwrap();
        let out = ops(&w, &["erase", "ghost"], None);
        assert!(out.status.success(), "{}", text(&out));
        let out = ops(&w, &["erase", "victim", "--reason", "ticket DSR-1"], None);
        assert!(out.status.success(), "{}", text(&out));
        println!("{}", text(&out));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        producer.join().unwrap()
    });

    let mut redis = redis::Client::open(w.redis_url.as_str()).unwrap().get_connection().unwrap();
    let keys = UserKeys::new("victim");
    let erased_at: i64 = redis::cmd("GET").arg(&keys.erased).query(&mut redis).unwrap();
    let (before, after): (Vec<_>, Vec<_>) = victim.iter().partition(|(ts, _)| *ts <= erased_at);
    println!("victim: {} signals before the erasure, {} after", before.len(), after.len());
    assert!(before.len() > 20 && after.len() > 20, "both sides of the erasure have traffic");

    // Everyone else exactly once; the victim's summary holds exactly the later signals.
    let after_msgs: Vec<Produced> = after
        .iter()
        .map(|(_, k)| Produced { key: "victim".into(), payload: Vec::new(), kind: Some(*k), reason: None })
        .collect();
    let others: Vec<Produced> = others.into_iter().filter(|m| m.key != "ghost").collect();
    let mut all = others.clone();
    all.extend(after_msgs);
    wait_until_done(&w.redis_url, &all, Duration::from_secs(120), || {
        anyhow::ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
        Ok(())
    })
    .unwrap();
    let summary: String = redis::cmd("HGET").arg(&keys.summary).arg("summary").query(&mut redis).unwrap();
    assert_eq!(summary, counts(&after), "only signals stamped after the erasure");
    let report = audit(&w.brokers, &w.redis_url, "alignx-consumer", &others).unwrap();
    println!("{report:?}");

    // The audit record is on the inference-log topic, with no content.
    let erasures: Vec<_> = read_topic(&w.brokers, keys::INFERENCE_LOG_TOPIC)
        .unwrap()
        .into_iter()
        .filter_map(|r| match serde_json::from_slice(&r.payload).unwrap() {
            LogTopicRecord::Erasure(e) => Some(e),
            LogTopicRecord::Update(_) => None,
        })
        .collect();
    assert_eq!(erasures.len(), 2);
    let ghost: Option<String> =
        redis::cmd("GET").arg(UserKeys::new("ghost").erased).query(&mut redis).unwrap();
    assert!(ghost.is_some());
    let erasures: Vec<_> = erasures.into_iter().filter(|e| e.user_id == "victim").collect();
    assert_eq!(erasures[0].erased_at_ms as i64, erased_at);
    assert_eq!(erasures[0].reason.as_deref(), Some("ticket DSR-1"));
    assert!(erasures[0].erased_version >= 3, "the erased user had a summary: {:?}", erasures[0]);
    consumer.terminate(Duration::from_secs(30)).unwrap();

    // Another group replays the whole topic into the same Redis: every signal is a
    // re-delivery or predates its user's erasure, so nothing changes and the ghost
    // stays gone.
    let victim_before: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(&keys.summary).query(&mut redis).unwrap();
    let mut replay =
        ConsumerProcess::start(&w.brokers, &w.redis_url, &["--group-id", "alignx-replay"]).unwrap();
    let ends = input_ends(&w.brokers).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&w.brokers, "alignx-replay").unwrap() != ends {
        assert!(replay.is_running() && Instant::now() < deadline, "replay stalled:\n{}", replay.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let ghost_keys: Vec<String> = redis::cmd("KEYS").arg("alignx:{ghost}:*").query(&mut redis).unwrap();
    let ghost_summary: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(UserKeys::new("ghost").summary).query(&mut redis).unwrap();
    assert_eq!(
        ghost_keys,
        ["alignx:{ghost}:erased"],
        "the erased user stays erased after a replay: {ghost_summary:?}\n{}",
        replay.log()
    );
    let victim_after: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(&keys.summary).query(&mut redis).unwrap();
    assert_eq!(victim_after, victim_before);
    replay.terminate(Duration::from_secs(30)).unwrap();
}

#[test]
fn backfill_while_the_consumer_runs_loses_and_doubles_nothing() {
    let w = world();
    let first = scenario(100, 2_000, 0, 21);
    produce(&w.brokers, &first).unwrap();
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &[]).unwrap();
    let alive = |c: &mut ConsumerProcess| {
        anyhow::ensure!(c.is_running(), "the consumer exited:\n{}", c.log());
        Ok(())
    };
    wait_until_done(&w.redis_url, &first, Duration::from_secs(60), || alive(&mut consumer)).unwrap();
    let backfill = |extra: &[&str]| {
        let mut args = vec!["backfill", "--engine", "counting", "--max-rate", "0", "--log-idle", "1s"];
        args.extend_from_slice(extra);
        let out = ops(&w, &args, None);
        assert!(out.status.success(), "{}", text(&out));
        let report: serde_json::Value = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<serde_json::Value>()
            .next()
            .unwrap()
            .unwrap();
        println!("{report}");
        report
    };

    // Every summary was written by this model: nothing to do (a rerun resumes).
    let report = backfill(&[]);
    assert_eq!((report["selected"].as_u64(), report["already_current"].as_u64()), (Some(100), Some(100)));

    // Re-infer everyone while the same users' new signals are being applied.
    let mut second = scenario(100, 2_000, 0, 22);
    for m in &mut second {
        m.payload = String::from_utf8(m.payload.clone())
            .unwrap()
            .replace("\"signal_id\":\"s", "\"signal_id\":\"t")
            .into_bytes();
    }
    let report = std::thread::scope(|s| {
        // The new signals arrive over ~3 s; the backfill starts in the middle.
        let producer = s.spawn(|| {
            for chunk in second.chunks(100) {
                produce(&w.brokers, chunk).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        std::thread::sleep(Duration::from_millis(800));
        let report = backfill(&["--include-current"]);
        producer.join().unwrap();
        report
    });
    let n = |k: &str| report[k].as_u64().unwrap();
    assert_eq!(n("rewritten") + n("raced") + n("log_behind") + n("no_answer"), 100, "{report}");
    assert!(n("rewritten") > 0, "{report}");
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    wait_until_done(&w.redis_url, &all, Duration::from_secs(120), || alive(&mut consumer)).unwrap();
    // Exactly once for every signal, every version 1..=v in the log (backfilled ones too).
    let audit = audit(&w.brokers, &w.redis_url, "alignx-consumer", &all).unwrap();
    println!("{audit:?}");
    let mut redis = redis::Client::open(w.redis_url.as_str()).unwrap().get_connection().unwrap();
    for user in all.iter().map(|m| m.key.as_str()).collect::<std::collections::BTreeSet<_>>() {
        let history: Vec<String> =
            redis::cmd("LRANGE").arg(UserKeys::new(user).history).arg(0).arg(-1).query(&mut redis).unwrap();
        let versions: Vec<u64> = history
            .iter()
            .map(|h| serde_json::from_str::<serde_json::Value>(h).unwrap()["version"].as_u64().unwrap())
            .collect();
        assert!(versions.windows(2).all(|p| p[0] > p[1]), "{user}: history versions {versions:?}");
    }
    consumer.terminate(Duration::from_secs(30)).unwrap();
}

/// The backfill at scale with a real model: 1,000 users, the tiny ONNX policy serving
/// (`ALIGNX_TINY_POLICY`, a model directory; e.g. from `alignx-trainer recipe tiny`),
/// a second copy of it as the "new" model, while the consumer applies new signals.
/// Minutes on a CPU, so not in `make test`:
/// `ALIGNX_TINY_POLICY=DIR cargo nextest run -p alignx-tests --test ops --run-ignored only`.
#[test]
#[ignore]
fn backfill_of_1000_users_with_the_tiny_model() {
    let policy = std::path::PathBuf::from(std::env::var("ALIGNX_TINY_POLICY").expect("ALIGNX_TINY_POLICY"));
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (dir.path().join("tiny-v1"), dir.path().join("tiny-v2"));
    for d in [&v1, &v2] {
        std::fs::create_dir(d).unwrap();
        for f in std::fs::read_dir(&policy).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
    }
    let w = world();
    let first = scenario(1_000, 4_000, 0, 31);
    let second = scenario(1_000, 2_000, 0, 32);
    produce(&w.brokers, &first).unwrap();
    let model = |d: &std::path::Path| {
        vec!["--engine".to_owned(), "onnx".into(), "--model-dir".into(), d.display().to_string()]
    };
    let serving = model(&v1);
    let mut extra: Vec<&str> = serving.iter().map(String::as_str).collect();
    extra.extend(["--max-new-tokens", "96", "--batch-size", "32", "--reload-interval", "0s"]);
    let mut consumer = ConsumerProcess::start(&w.brokers, &w.redis_url, &extra).unwrap();
    let mut redis = redis::Client::open(w.redis_url.as_str()).unwrap().get_connection().unwrap();
    let users: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|m| m.key.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // Every signal consumed once: applied or (the model wrote no answer) failed.
    let consumed = |redis: &mut redis::Connection| consumed_total(redis, &users).unwrap();
    let wait = |redis: &mut redis::Connection, want: u64, consumer: &mut ConsumerProcess| {
        let deadline = Instant::now() + Duration::from_secs(1_800);
        loop {
            let got = consumed(redis);
            assert!(got <= want, "{got} signals consumed of {want}: some twice");
            if got == want {
                break;
            }
            assert!(
                consumer.is_running() && Instant::now() < deadline,
                "stalled at {got}/{want}:\n{}",
                consumer.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let started = Instant::now();
    wait(&mut redis, 4_000, &mut consumer);
    println!("first stream: 4,000 signals of 1,000 users in {:.0}s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            for chunk in second.chunks(100) {
                produce(&w.brokers, chunk).unwrap();
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let mut args = vec!["backfill", "--max-rate", "0", "--max-new-tokens", "96", "--batch-size", "32"];
        let new = model(&v2);
        args.extend(new.iter().map(String::as_str));
        let out = ops(&w, &args, None);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    println!("backfill ({:.0}s): {report}", started.elapsed().as_secs_f64());
    wait(&mut redis, 6_000, &mut consumer);

    // Versions: strictly decreasing history, and every version 1..=v in the log.
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for u in &users {
        let v: Option<u64> =
            redis::cmd("HGET").arg(UserKeys::new(u).summary).arg("version").query(&mut redis).unwrap();
        let history: Vec<String> =
            redis::cmd("LRANGE").arg(UserKeys::new(u).history).arg(0).arg(-1).query(&mut redis).unwrap();
        let hv: Vec<u64> = history
            .iter()
            .map(|h| serde_json::from_str::<serde_json::Value>(h).unwrap()["version"].as_u64().unwrap())
            .collect();
        assert!(
            hv.windows(2).all(|p| p[0] > p[1]) && hv.first().is_none_or(|&h| Some(h) < v),
            "{u}: {hv:?} {v:?}"
        );
        versions.insert(u.clone(), v.unwrap_or(0));
    }
    let mut logged: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
    let mut by_model: BTreeMap<String, u64> = BTreeMap::new();
    for r in read_topic(&w.brokers, keys::INFERENCE_LOG_TOPIC).unwrap() {
        if let LogTopicRecord::Update(rec) = serde_json::from_slice(&r.payload).unwrap()
            && let Some(v) = rec.new_version
        {
            logged.entry(rec.user_id).or_default().insert(v);
            *by_model.entry(rec.model).or_default() += 1;
        }
    }
    for (u, v) in &versions {
        let got: Vec<u64> = logged.get(u).map(|s| s.iter().copied().collect()).unwrap_or_default();
        assert_eq!(got, (1..=*v).collect::<Vec<_>>(), "{u}: logged versions");
    }
    println!("versions logged by model: {by_model:?}; total versions {}", versions.values().sum::<u64>());
    consumer.terminate(Duration::from_secs(60)).unwrap();
}
