//! `make soak DURATION=10m`: a bounded soak of the whole pipeline with faults injected on
//! a seeded schedule, ending with the exactly-once audit.
//!
//! Runs moto's S3 server, tansu storing in it (topics and offsets survive a broker
//! restart), Redis with an append-only file synced on every write (data survives a
//! kill -9), and `alignx-consumer run` with the counting engine. By default tansu keeps
//! its data in memory and faults strike the consumer and Redis; `--broker s3` stores it
//! in moto's S3 server and restarts the broker too — but moto, a Python server whose work
//! grows with its bucket, then bounds the whole pipeline (about 10 signals/s after ten
//! minutes of faults here), so keep such runs short and slow. A steady stream (about
//! `--rate` signals/s over `--users` users, ~2% invalid) is produced in acknowledged
//! chunks; every `--fault-every` one fault strikes: the consumer killed (-9) and
//! restarted, Redis killed (-9) and restarted, or the broker killed (-9) and restarted
//! (between chunks, so the producer's own retries cannot duplicate input). The consumer's
//! resident memory is sampled throughout. At the end: every valid signal applied exactly
//! once, every invalid one dead-lettered, offsets committed to the end, and no consumer
//! process grew by more than `--max-growth-mib` after its first `--warmup`. JSON report
//! to `--out` (default target/bench/soak.json); exit status 1 when a check fails.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alignx_tests::services::{start_moto, start_redis_persistent, start_tansu, start_tansu_s3};
use alignx_tests::stream::{
    ConsumerProcess, Produced, audit, create_topics, produce, scenario, wait_until_done,
};
use alignx_trainer::rng::Rng;
use anyhow::{Context, ensure};
use clap::Parser;
use serde_json::json;

/// Soak the pipeline with faults, then audit it.
#[derive(Debug, Parser)]
#[command(name = "alignx-soak")]
struct Args {
    /// How long to produce and inject faults (e.g. 90s, 10m, 1h).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Signals per second, about.
    #[arg(long, default_value_t = 500)]
    rate: usize,
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// `memory`: tansu in memory, never restarted (consumer and Redis faults); `s3`:
    /// tansu storing in moto's S3 server, restarted among the faults — moto bounds what
    /// the broker serves (use `--rate 25` and a few minutes; `tests/broker.rs` is the
    /// broker-restart test).
    #[arg(long, value_enum, default_value = "memory")]
    broker: Storage,
    /// The consumer's --window-wait: longer windows, fewer updates (and fewer log records
    /// for the audit to read back from the S3-backed broker, which serves ~100 batches/s).
    #[arg(long, default_value = "5s")]
    window_wait: String,
    /// One fault this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    fault_every: Duration,
    /// Seed of the stream and of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Memory samples before this (per consumer process) are its warm-up.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    warmup: Duration,
    /// Largest allowed growth of a consumer's resident memory after its warm-up.
    #[arg(long, default_value_t = 64.0)]
    max_growth_mib: f64,
    #[arg(long, default_value = "target/bench/soak.json")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Storage {
    S3,
    Memory,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: a number then s, m or h (e.g. 10m)"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit is s, m or h")),
    }
}

/// Resident memory of a process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One consumer process's memory over its life: (seconds since it started, MiB).
struct Incarnation {
    pid: u32,
    started: Instant,
    samples: Vec<(f64, f64)>,
}

impl Incarnation {
    fn new(pid: u32) -> Self {
        Self { pid, started: Instant::now(), samples: Vec::new() }
    }

    /// Growth after warm-up: the largest sample minus the first sample past `warmup`.
    fn growth(&self, warmup: Duration) -> Option<f64> {
        let after: Vec<f64> =
            self.samples.iter().filter(|(t, _)| *t >= warmup.as_secs_f64()).map(|(_, m)| *m).collect();
        let first = *after.first()?;
        Some(after.iter().copied().fold(f64::MIN, f64::max) - first)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let s3 = if args.broker == Storage::S3 { Some(start_moto()?) } else { None };
    let broker = Arc::new(Mutex::new(match &s3 {
        Some(s3) => start_tansu_s3(s3)?,
        None => start_tansu()?,
    }));
    let mut redis = start_redis_persistent()?;
    let brokers = broker.lock().unwrap().addr().to_string();
    let redis_url = format!("redis://{}/", redis.addr());
    create_topics(&brokers, 4)?;
    eprintln!(
        "soak: {:?} at ~{} signals/s, a fault every {:?} (seed {})",
        args.duration, args.rate, args.fault_every, args.seed
    );

    // The producer: acknowledged chunks every 500 ms, holding the broker lock so a broker
    // fault never falls inside a chunk.
    let produced: Arc<Mutex<Vec<Produced>>> = Arc::default();
    let stop_at = started + args.duration;
    let producer = {
        let (broker, produced, brokers) = (broker.clone(), produced.clone(), brokers.clone());
        let (rate, users, seed) = (args.rate, args.users, args.seed);
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut chunk_no = 0u64;
            while Instant::now() < stop_at {
                let tick = Instant::now();
                let chunk = scenario(users, (rate / 2).max(1), 20, seed.wrapping_mul(1_000_003) + chunk_no);
                {
                    let _guard = broker.lock().unwrap();
                    produce(&brokers, &chunk)?;
                }
                produced.lock().unwrap().extend(chunk);
                chunk_no += 1;
                std::thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
            }
            Ok(())
        })
    };

    let consumer_args = ["--window-wait", args.window_wait.as_str()];
    let mut consumer = ConsumerProcess::start(&brokers, &redis_url, &consumer_args)?;
    let mut incarnations = vec![Incarnation::new(consumer.pid())];
    let mut faults = Vec::new();
    let mut rng = Rng::new(args.seed ^ 0xfa17);
    let mut next_fault = Instant::now() + args.fault_every;
    let mut next_sample = Instant::now();
    while Instant::now() < stop_at {
        if Instant::now() >= next_sample {
            let inc = incarnations.last_mut().expect("one");
            if let Some(m) = rss_mib(inc.pid) {
                inc.samples.push((inc.started.elapsed().as_secs_f64(), m));
            }
            next_sample += Duration::from_secs(5);
        }
        ensure!(consumer.is_running(), "the consumer exited on its own:\n{}", consumer.log());
        if Instant::now() >= next_fault {
            let at = started.elapsed().as_secs_f64();
            let kinds = if args.broker == Storage::S3 { 3 } else { 2 };
            let kind = match rng.next_u64() % kinds {
                0 => {
                    consumer.kill9();
                    std::thread::sleep(Duration::from_secs(1));
                    consumer = ConsumerProcess::start(&brokers, &redis_url, &consumer_args)?;
                    incarnations.push(Incarnation::new(consumer.pid()));
                    "consumer kill -9"
                }
                1 => {
                    redis.stop(false);
                    std::thread::sleep(Duration::from_secs(2));
                    redis.start_again()?;
                    "redis kill -9"
                }
                _ => {
                    let mut b = broker.lock().unwrap();
                    b.stop(false);
                    std::thread::sleep(Duration::from_secs(2));
                    b.start_again()?;
                    "broker kill -9"
                }
            };
            eprintln!("soak: {at:.0}s {kind}");
            faults.push(json!({"at_seconds": at, "fault": kind}));
            next_fault += args.fault_every;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    producer.join().expect("producer thread")?;
    let messages = produced.lock().unwrap().clone();
    let produce_secs = started.elapsed().as_secs_f64();
    eprintln!("soak: {} messages produced; waiting for the consumer to finish", messages.len());
    let drained = Instant::now();
    wait_until_done(&redis_url, &messages, Duration::from_secs(600), || {
        ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
        Ok(())
    })?;
    let drain_secs = drained.elapsed().as_secs_f64();
    let report =
        audit(&brokers, &redis_url, "alignx-consumer", &messages).context("the exactly-once audit")?;
    if let Some(inc) = incarnations.last_mut()
        && let Some(m) = rss_mib(inc.pid)
    {
        inc.samples.push((inc.started.elapsed().as_secs_f64(), m));
    }
    consumer.terminate(Duration::from_secs(60))?;

    let growth: Vec<Option<f64>> = incarnations.iter().map(|i| i.growth(args.warmup)).collect();
    let worst = growth.iter().flatten().copied().fold(0.0, f64::max);
    let memory_ok = worst <= args.max_growth_mib;
    let summary = json!({
        "broker_storage": format!("{:?}", args.broker),
        "rate_signals_per_second": args.rate,
        "duration_seconds": produce_secs,
        "drain_seconds": drain_secs,
        "messages": messages.len(),
        "valid_signals": report.valid,
        "dead_lettered": report.dead_lettered,
        "dead_letter_resends": report.dead_letter_resends,
        "updates": report.updates,
        "log_resends": report.log_resends,
        "signals_per_second": report.valid as f64 / (produce_secs + drain_secs),
        "faults": faults,
        "audit": "passed: every valid signal applied once, every invalid one dead-lettered, offsets at the end",
        "memory": {
            "bound_mib": args.max_growth_mib,
            "warmup_seconds": args.warmup.as_secs_f64(),
            "worst_growth_mib": worst,
            "within_bound": memory_ok,
            "consumers": incarnations.iter().zip(&growth).map(|(i, g)| json!({
                "pid": i.pid, "growth_after_warmup_mib": g, "samples_seconds_mib": i.samples,
            })).collect::<Vec<_>>(),
        },
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&summary)?)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    ensure!(memory_ok, "a consumer grew by {worst:.1} MiB after warm-up (bound {} MiB)", args.max_growth_mib);
    Ok(())
}
