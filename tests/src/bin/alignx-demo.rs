//! `make demo`'s driver: the whole system on one machine with real parts — the tansu
//! broker and Redis on free loopback ports (or yours), `alignx-consumer run` serving the
//! tiny ONNX policy, a synthetic stream of holdout users' signals (one with a preference
//! shift, some invalid messages) — then what a user of the system wants to see: evolving
//! summaries next to the users' latent preferences, the dead letters, a metrics snapshot,
//! and ACC_jud of the live summaries against the no-summary baseline. Everything it
//! started is stopped (by PID) when it ends, also on failure.
//!
//! It lives with the test harness because it runs the same services the end-to-end
//! tests do. `scripts/demo` builds the models (cached) and calls it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alignx_schemas::keys::{self, UserKeys};
use alignx_schemas::training::{Choice, EvalRecord, read_records};
use alignx_tests::services::{Service, http_get, start_redis, start_tansu};
use alignx_tests::stream::{ConsumerProcess, Produced, create_topics, produce, read_topic};
use alignx_trainer::judge::{Judge, JudgeItem};
use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

/// Run the AlignXplore Stream demo on a tiny model.
#[derive(Debug, Parser)]
#[command(name = "alignx-demo")]
struct Args {
    /// The policy to serve (an ONNX model directory).
    #[arg(long)]
    policy: PathBuf,
    /// The judge model directory (for ACC_jud).
    #[arg(long)]
    judge: PathBuf,
    /// The synthetic world (`alignx-trainer synth` output).
    #[arg(long)]
    world: PathBuf,
    /// Use this Kafka instead of starting tansu.
    #[arg(long, env = "ALIGNX_DEMO_BROKERS")]
    brokers: Option<String>,
    /// Use this Redis instead of starting one.
    #[arg(long, env = "ALIGNX_DEMO_REDIS_URL")]
    redis_url: Option<String>,
    /// Holdout users to stream.
    #[arg(long, default_value_t = 36)]
    users: usize,
    /// Users whose summaries are printed version by version.
    #[arg(long, default_value_t = 4)]
    show: usize,
}

#[derive(Debug, Deserialize)]
struct User {
    user_id: String,
    split: String,
    summary: String,
    shift_at_signal: Option<usize>,
    summary_after_shift: Option<String>,
}

fn step(n: usize, what: &str) {
    println!("\n\x1b[1m== [{n}/6] {what}\x1b[0m");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let t0 = Instant::now();

    step(1, "services");
    let mut started: Vec<Service> = Vec::new();
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
            let broker = start_tansu()?;
            let addr = broker.addr().to_string();
            println!("tansu (Kafka protocol) on {addr}, pid {}", broker.pid());
            started.push(broker);
            addr
        }
    };
    let redis_url = match &args.redis_url {
        Some(r) => r.clone(),
        None => {
            let redis = start_redis()?;
            println!("redis on {}, pid {}", redis.addr(), redis.pid());
            let url = format!("redis://{}/", redis.addr());
            started.push(redis);
            url
        }
    };
    if let Err(e) = create_topics(&brokers, 4) {
        println!("topics: {e:#} (keeping the existing ones)");
    }
    let policy = args.policy.display().to_string();
    let mut consumer = ConsumerProcess::start(
        &brokers,
        &redis_url,
        &["--engine", "onnx", "--model-dir", &policy, "--max-new-tokens", "128", "--window-wait", "1s"],
    )?;
    println!(
        "alignx-consumer pid {} serving {policy}; metrics on http://{}/metrics",
        consumer.pid(),
        consumer.metrics
    );

    step(2, "a stream of holdout users' signals, with one preference shift and invalid messages");
    let users: Vec<User> = std::fs::read_to_string(args.world.join("users.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("users.jsonl")?;
    let holdout: Vec<&User> = users.iter().filter(|u| u.split == "holdout").collect();
    // The shifted users first, so one of them is shown.
    let mut chosen: Vec<&User> =
        holdout.iter().copied().filter(|u| u.shift_at_signal.is_some()).take(1).collect();
    chosen.extend(
        holdout.iter().copied().filter(|u| u.shift_at_signal.is_none()).take(args.users.saturating_sub(1)),
    );
    let ids: BTreeSet<&str> = chosen.iter().map(|u| u.user_id.as_str()).collect();
    let mut messages: Vec<Produced> = Vec::new();
    // Stamped now (1 ms apart, in file order), so the latency metric is the pipeline's.
    let now = chrono::Utc::now();
    for (i, line) in std::fs::read_to_string(args.world.join("signals_holdout.jsonl"))?.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        let user = v["user_id"].as_str().unwrap_or_default().to_owned();
        if ids.contains(user.as_str()) {
            let ts = now + chrono::Duration::milliseconds(i as i64);
            v["ts"] = ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into();
            let kind = match v["kind"].as_str() {
                Some("pair") => "pair",
                Some("ugc") => "ugc",
                _ => "text",
            };
            let payload = serde_json::to_vec(&v)?;
            messages.push(Produced { key: user, payload, kind: Some(kind), reason: None });
        }
    }
    let someone = chosen[0].user_id.clone();
    for (payload, key, reason) in [
        (b"{not json".to_vec(), someone.clone(), "invalid_json"),
        (format!(r#"{{"schema":"alignx.signal.v1","user_id":"{someone}","signal_id":"x1","ts":"2026-01-01T00:00:00Z","kind":"pair","post":"p"}}"#).into_bytes(), someone.clone(), "missing_field"),
        (format!(r#"{{"schema":"alignx.signal.v1","user_id":"{someone}","signal_id":"x2","ts":"2026-01-01T00:00:00Z","kind":"text","text":"hi"}}"#).into_bytes(), "someone-else".into(), "key_mismatch"),
    ] {
        messages.insert(messages.len() / 2, Produced { key, payload, kind: None, reason: Some(reason) });
    }
    let valid = messages.iter().filter(|m| m.kind.is_some()).count() as u64;
    let produced_at = Instant::now();
    produce(&brokers, &messages)?;
    println!(
        "produced {} messages for {} users ({valid} valid, {} invalid)",
        messages.len(),
        chosen.len(),
        messages.len() as u64 - valid
    );

    step(3, "the consumer at work");
    let mut redis = redis::Client::open(redis_url.as_str())?.get_connection()?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_print = Instant::now();
    loop {
        let mut pipe = redis::pipe();
        for u in &ids {
            pipe.cmd("HMGET").arg(UserKeys::new(u).summary).arg("signals_applied").arg("signals_failed");
        }
        let rows: Vec<(Option<u64>, Option<u64>)> = pipe.query(&mut redis)?;
        let done: u64 = rows.iter().map(|(a, f)| a.unwrap_or(0) + f.unwrap_or(0)).sum();
        if done >= valid {
            println!(
                "all {valid} signals folded into summaries in {:.1}s",
                produced_at.elapsed().as_secs_f64()
            );
            break;
        }
        if last_print.elapsed() > Duration::from_secs(3) {
            println!("  {done}/{valid} signals folded in ({:.0}s)", produced_at.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        if !consumer.is_running() {
            bail!("the consumer exited:\n{}", consumer.log());
        }
        if Instant::now() > deadline {
            bail!("only {done} of {valid} signals folded in after 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let elapsed = produced_at.elapsed().as_secs_f64();

    step(4, "summaries, version by version, next to the users' latent preferences");
    for user in chosen.iter().take(args.show) {
        println!("\n\x1b[1m{}\x1b[0m", user.user_id);
        println!("  latent preferences: {}", user.summary.replace('\n', " / "));
        if let (Some(at), Some(after)) = (user.shift_at_signal, &user.summary_after_shift) {
            println!("  after signal {at} they shift to: {}", after.replace('\n', " / "));
        }
        let k = UserKeys::new(&user.user_id);
        let history: Vec<String> = redis::cmd("LRANGE").arg(&k.history).arg(0).arg(-1).query(&mut redis)?;
        for h in history.iter().rev() {
            let h: serde_json::Value = serde_json::from_str(h)?;
            println!(
                "  v{}: {}",
                h["version"],
                h["summary"].as_str().unwrap_or_default().replace('\n', " / ")
            );
        }
        let cur: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&k.summary).query(&mut redis)?;
        match (cur.get("version"), cur.get("summary")) {
            (Some(v), Some(s)) => println!("  v{v} (current, {}): {}", cur["model"], s.replace('\n', " / ")),
            _ => println!("  (no summary: every window failed)"),
        }
    }

    step(5, "dead letters and metrics");
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for r in read_topic(&brokers, keys::DLQ_TOPIC)? {
        *reasons.entry(r.headers.get(keys::HEADER_ERROR).cloned().unwrap_or_default()).or_default() += 1;
    }
    println!("dead-lettered: {} {:?}", reasons.values().sum::<u64>(), reasons);
    let (_, metrics) = http_get(consumer.metrics, "/metrics")?;
    let sum = |name: &str, filter: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let accepted = sum("alignx_signals_total{", "outcome=\"accepted\"");
    let mut outcomes = Vec::new();
    for o in ["applied", "no_answer", "truncated", "empty_answer", "engine_error", "stale"] {
        let n = sum("alignx_updates_total{", &format!("outcome=\"{o}\""));
        if n > 0.0 {
            outcomes.push(format!("{o} {n}"));
        }
    }
    let generated = sum("alignx_generated_tokens_total", "");
    let engine_s = sum("alignx_engine_seconds_sum", "");
    println!("signals accepted: {accepted} ({:.1}/s over the run)", accepted / elapsed);
    println!("updates: {}", outcomes.join(", "));
    println!(
        "update latency (oldest signal of a window → its summary written): p50 ≤ {}s, p99 ≤ {}s",
        quantile(&metrics, "alignx_update_latency_seconds", 0.5),
        quantile(&metrics, "alignx_update_latency_seconds", 0.99)
    );
    println!(
        "engine: {generated} tokens generated, {:.0} tokens/s of engine time, batch size p50 ≤ {}",
        generated / engine_s.max(1e-9),
        quantile(&metrics, "alignx_engine_batch_size", 0.5)
    );

    step(6, "ACC_jud of the live summaries on these users' held-out pairs");
    let evals: Vec<EvalRecord> = read_records(&std::fs::read_to_string(args.world.join("eval.jsonl"))?)?;
    let mut items = Vec::new();
    let mut summaries = Vec::new();
    for e in evals.iter().filter(|e| e.user_id.as_deref().is_some_and(|u| ids.contains(u))) {
        let user = e.user_id.as_deref().unwrap_or_default();
        let s: Option<String> =
            redis::cmd("HGET").arg(UserKeys::new(user).summary).arg("summary").query(&mut redis)?;
        summaries.push(s.unwrap_or_default());
        items.push(e);
    }
    let judge = Judge::load(&args.judge, tch::Device::Cpu)?;
    let score = |use_summary: bool| -> anyhow::Result<f64> {
        let q: Vec<JudgeItem<'_>> = items
            .iter()
            .zip(&summaries)
            .map(|(e, s)| JudgeItem {
                post: &e.prompt,
                summary: if use_summary { s } else { "" },
                a: &e.response_a,
                b: &e.response_b,
            })
            .collect();
        let p = judge.prob_a(&q, 16)?;
        let right = p.iter().zip(&items).filter(|(p, e)| (**p >= 0.5) == (e.answer == Choice::A)).count();
        Ok(right as f64 / items.len().max(1) as f64)
    };
    println!(
        "{} held-out pairs: ACC_jud with the live summaries {:.1}%, with no summary {:.1}%",
        items.len(),
        100.0 * score(true)?,
        100.0 * score(false)?
    );

    let status = consumer.terminate(Duration::from_secs(60))?;
    drop(started);
    println!(
        "\nstopped the consumer ({status}) and every service this demo started; {:.0}s in all",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The upper bound of the histogram bucket holding quantile `q` (Prometheus text).
fn quantile(metrics: &str, name: &str, q: f64) -> String {
    let prefix = format!("{name}_bucket{{");
    let buckets: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return "-".into();
    }
    buckets.iter().find(|(_, c)| *c >= q * total).map_or("-".into(), |(le, _)| le.clone())
}
