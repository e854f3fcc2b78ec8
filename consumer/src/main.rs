//! `alignx-consumer`: command-line entry point. Parsing, logging setup and exit codes
//! only; the work lives in the library.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use alignx_consumer::backfill::{self, BackfillOptions};
use alignx_consumer::config::{ConnArgs, EngineKind, RunArgs, RunConfig};
use alignx_consumer::engine::{CountingEngine, Engine};
use alignx_consumer::metrics::Metrics;
use alignx_consumer::onnx_engine::{OnnxEngine, ServeOptions};
use alignx_consumer::onnx_model::DeviceChoice;
use alignx_consumer::pipeline::{self, Exit};
use alignx_consumer::reload::{Loader, Reload};
use alignx_consumer::sampler::SamplingParams;
use alignx_consumer::{onnx_runtime, ops, validate_cmd};
use alignx_schemas::Limits;
use anyhow::Context;

// The pipeline allocates many small, short-lived buffers across threads; glibc's malloc
// spent a third of the consumer's CPU on them (arena locks, consolidation) in the
// pipeline benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

/// Keeps a human-readable preference summary per user, updated from a Kafka stream of
/// behavioural signals by an LLM run with ONNX Runtime, stored in Redis.
#[derive(Debug, Parser)]
#[command(name = "alignx-consumer", version, about, long_about = None, propagate_version = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume signals and keep every user's summary current (runs until SIGTERM/SIGINT,
    /// then drains, commits and exits 0; exit 3 when the invalid-message breaker trips).
    Run(Box<RunArgs>),
    /// Continue a prompt with a model directory, printing the completion (stdout) and
    /// what it took (stderr): a smoke test of a model before serving it.
    Generate(GenerateArgs),
    /// Check that ONNX Runtime loads, and say from where.
    Doctor {
        /// ONNX Runtime library file (default: $ORT_DYLIB_PATH, then next to this binary).
        #[arg(long, env = "ALIGNX_ORT_LIBRARY")]
        ort_library: Option<PathBuf>,
    },
    /// Send signals (JSON Lines, `alignx.signal.v1`) to the input topic keyed by user_id,
    /// after checking every line as the consumer would. Invalid lines are printed with
    /// their line number and reason, and nothing is sent (exit 1) unless --skip-invalid.
    Produce {
        /// Input file, or `-` for standard input.
        #[arg(default_value = "-")]
        input: PathBuf,
        /// Send the valid lines even when some are invalid (those are reported, not sent).
        #[arg(long)]
        skip_invalid: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show everything stored about a user: current summary (version, model, update
    /// time), pending signals, summary history, erasure.
    Inspect {
        user_id: String,
        /// The full record as JSON (the same document as `export`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Export everything stored about a user in Redis as JSON (`alignx.user_export.v1`):
    /// summary, history, pending and recent signals. Kafka topics are not included (see
    /// the README on retention).
    Export {
        user_id: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Erase a user: delete their summary, history, pending and recent signals from Redis
    /// and leave a tombstone, so that replayed or in-flight signals stamped before now
    /// never become state again (signals after it start a new summary); then write an
    /// `alignx.erasure.v1` audit record (no content) to the inference-log topic. Safe to
    /// run again.
    Erase {
        user_id: String,
        /// Why, for the audit record (e.g. a ticket id). Never put user content here.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// After a model upgrade, re-infer users' summaries with the new model from their
    /// history (the windows recorded on the inference-log topic), at a bounded rate, while
    /// the live consumer runs: a summary the consumer updated meanwhile is kept. Users
    /// already written by this model are skipped, so rerunning resumes. Takes `run`'s
    /// flags for Kafka, Redis and the model.
    Backfill(Box<BackfillArgs>),
    /// Check signals (JSON Lines, `alignx.signal.v1`) as the consumer would, printing
    /// each rejected line with its DLQ reason. Exit code 1 when any line is rejected.
    Validate {
        /// Input file, or `-` for standard input.
        #[arg(default_value = "-")]
        input: PathBuf,
        /// Longest user_id / signal_id in bytes.
        #[arg(long, default_value_t = Limits::default().max_id_bytes)]
        max_id_bytes: usize,
        /// Longest text field in bytes.
        #[arg(long, default_value_t = Limits::default().max_text_bytes)]
        max_text_bytes: usize,
        /// Largest message in bytes.
        #[arg(long, default_value_t = Limits::default().max_message_bytes)]
        max_message_bytes: usize,
    },
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Model directory (model.onnx, tokenizer.json, config.json, generation_config.json).
    #[arg(long, env = "ALIGNX_MODEL_DIR")]
    model_dir: PathBuf,
    /// The prompt, exactly as the model sees it; `-` for standard input.
    #[arg(long)]
    prompt_file: PathBuf,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Argmax decoding (the default unless a sampling option is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampling RNG (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// ONNX Runtime intra-op threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, env = "ALIGNX_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BackfillArgs {
    /// Only these users (comma-separated); default: every user with history in the log.
    #[arg(long, value_delimiter = ',', conflicts_with = "users_file")]
    users: Option<Vec<String>>,
    /// Only the users listed in this file, one per line.
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Also re-infer users whose summary this model already wrote.
    #[arg(long)]
    include_current: bool,
    /// Users per second at most (0: no limit), leaving the live consumer its share.
    #[arg(long, default_value_t = 20.0)]
    max_rate: f64,
    /// Reading the inference log stops after this long without a new record.
    #[arg(long, default_value = "2s", value_parser = alignx_consumer::config::parse_duration)]
    log_idle: std::time::Duration,
    #[command(flatten)]
    run: RunArgs,
}

fn generate(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let prompt = if a.prompt_file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("read the prompt from stdin")?
    } else {
        std::fs::read_to_string(&a.prompt_file)
            .with_context(|| format!("read {}", a.prompt_file.display()))?
    };
    let runtime = onnx_runtime::init(a.ort_library.as_deref())?;
    let sampled = !a.greedy && (a.temperature.is_some() || a.top_p.is_some() || a.top_k.is_some());
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: if sampled { a.temperature.unwrap_or(1.0) } else { 0.0 },
        top_k: a.top_k.unwrap_or(0),
        top_p: a.top_p.unwrap_or(1.0),
        repetition_penalty: a.repetition_penalty,
    };
    let options = ServeOptions {
        device: a.device,
        threads: a.threads,
        sampling: Some(params),
        max_new_tokens: a.max_new_tokens,
        max_rows: 1,
    };
    let engine = OnnxEngine::load(runtime, &a.model_dir, &options, None)
        .with_context(|| format!("load the model in {}", a.model_dir.display()))?;
    let started = std::time::Instant::now();
    let mut done = engine.complete(&[prompt], &[params], &[a.seed])?;
    let c = done.remove(0)?;
    let (text, finish, prompt_tokens, generated) = (c.text, c.finish, c.prompt_tokens, c.generated_tokens);
    let seconds = started.elapsed().as_secs_f64();
    print!("{text}");
    eprintln!(
        "\n[{} on {}: {prompt_tokens} prompt tokens, {generated} generated ({finish:?}) in {seconds:.2}s, {:.1} tokens/s]",
        engine.model_id(),
        engine.provider(),
        generated as f64 / seconds
    );
    Ok(ExitCode::SUCCESS)
}

fn doctor(ort_library: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let runtime = onnx_runtime::init(ort_library.as_deref())?;
    println!("onnx runtime: {}", runtime.path().display());
    println!("build: {}", runtime.build_info());
    Ok(ExitCode::SUCCESS)
}

fn validate(input: PathBuf, limits: Limits) -> anyhow::Result<ExitCode> {
    let reader = input_reader(&input)?;
    let report = validate_cmd::validate_lines(reader, &limits, |r| {
        println!("line {}: {} — {}", r.line, r.reason, r.detail);
    })
    .with_context(|| format!("cannot read {}", input.display()))?;
    let kinds: Vec<String> = report.valid.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let reasons: Vec<String> = report.rejected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("valid: {} ({})", report.valid_total(), kinds.join(", "));
    println!(
        "rejected: {}{}",
        report.rejected_total(),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
    );
    Ok(if report.rejected_total() == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn input_reader(input: &PathBuf) -> anyhow::Result<Box<dyn std::io::BufRead>> {
    Ok(if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
        Box::new(BufReader::new(file))
    })
}

/// A current-thread runtime for the operator commands.
fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn backfill(a: BackfillArgs) -> anyhow::Result<ExitCode> {
    let cfg = RunConfig::load(a.run)?;
    let (engine, _) = load_engine(&cfg, &Metrics::new())?;
    let templates = cfg.engine.templates()?;
    let users = match (a.users, a.users_file) {
        (Some(list), _) => Some(list),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        (None, None) => None,
    };
    let opts = BackfillOptions {
        users,
        include_current: a.include_current,
        max_users_per_second: a.max_rate,
        batch_size: cfg.engine.batch_size,
        log_idle: a.log_idle,
    };
    eprintln!("reading user histories from {} …", cfg.kafka.log_topic);
    let bar = indicatif::ProgressBar::no_length();
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} users ({per_sec}, eta {eta})",
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report =
        runtime.block_on(backfill::backfill(&cfg, engine.clone(), &templates, &opts, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        }))?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!(
        "backfill with {}: {} rewritten, {} already current, {} raced by the live consumer (kept theirs), \
         {} updated since the log was read (run again), {} without a summary, {} without any answer",
        engine.model_id(),
        report.rewritten,
        report.already_current,
        report.raced,
        report.log_behind,
        report.no_summary,
        report.no_answer
    );
    Ok(ExitCode::SUCCESS)
}

fn produce(input: PathBuf, skip_invalid: bool, conn: ConnArgs) -> anyhow::Result<ExitCode> {
    let cfg = conn.load()?;
    let reader = input_reader(&input)?;
    let bar = indicatif::ProgressBar::new_spinner().with_message("sent");
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {pos} signals {msg} ({per_sec})")?);
    let report = block_on(ops::produce(
        &cfg,
        reader,
        skip_invalid,
        |bad| println!("line {}: {} — {}", bad.line, bad.reason, bad.detail),
        |n| bar.set_position(n),
    ))?;
    bar.finish_and_clear();
    let kinds: Vec<String> = report.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    if report.invalid > 0 && !skip_invalid {
        println!("{} invalid lines: nothing sent (fix them, or pass --skip-invalid)", report.invalid);
        return Ok(ExitCode::from(1));
    }
    println!(
        "sent {} signals to {} ({}){}",
        report.sent,
        cfg.kafka.input_topic,
        kinds.join(", "),
        if report.invalid > 0 {
            format!("; skipped {} invalid lines", report.invalid)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect(user_id: &str, json: bool, conn: ConnArgs) -> anyhow::Result<ExitCode> {
    let cfg = conn.load()?;
    let e = block_on(ops::export(&cfg, user_id))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", ops::render(&e));
    }
    Ok(ExitCode::SUCCESS)
}

fn export(user_id: &str, out: Option<PathBuf>, conn: ConnArgs) -> anyhow::Result<ExitCode> {
    let cfg = conn.load()?;
    let e = block_on(ops::export(&cfg, user_id))?;
    let json = serde_json::to_string_pretty(&e)? + "\n";
    match out {
        Some(path) => {
            std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
            eprintln!("exported {user_id} to {}", path.display());
        }
        None => print!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn erase(user_id: &str, reason: Option<String>, conn: ConnArgs) -> anyhow::Result<ExitCode> {
    let cfg = conn.load()?;
    let r = block_on(ops::erase(&cfg, user_id, reason))?;
    println!(
        "erased {}: summary version {}, {} pending signals, {} past summaries; tombstone at {} ms; \
         audit record on {}",
        r.user_id,
        r.erased_version,
        r.pending_removed,
        r.history_removed,
        r.erased_at_ms,
        cfg.kafka.log_topic
    );
    Ok(ExitCode::SUCCESS)
}

/// The configured engine, and for a model the loader hot reload uses.
fn load_engine(cfg: &RunConfig, metrics: &Metrics) -> anyhow::Result<(Arc<dyn Engine>, Option<Loader>)> {
    match cfg.engine.kind {
        EngineKind::Counting => {
            tracing::warn!("engine `counting`: summaries count signal kinds; no model runs");
            Ok((Arc::new(CountingEngine), None))
        }
        EngineKind::Onnx => {
            let dir = cfg.engine.model_dir.clone().context("--engine onnx needs --model-dir")?;
            let runtime = onnx_runtime::init(cfg.ort_library.as_deref())?;
            let e = cfg.engine.clone();
            let m = metrics.clone();
            let options = ServeOptions {
                device: e.device,
                threads: e.threads,
                sampling: e.sampling,
                max_new_tokens: e.max_new_tokens,
                // Enough rows for every engine call in flight.
                max_rows: e.batch_size * e.concurrency,
            };
            let loader: Loader = Arc::new(move |dir: &std::path::Path| {
                let engine = OnnxEngine::load(runtime, dir, &options, Some(m.clone()))
                    .with_context(|| format!("load the model in {}", dir.display()))?;
                Ok(Arc::new(engine) as Arc<dyn Engine>)
            });
            let engine = loader(&dir)?;
            tracing::info!(model = engine.model_id(), provider = engine.provider(), "model loaded");
            Ok((engine, Some(loader)))
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = RunConfig::load(args)?;
    let metrics = Metrics::new();
    let (engine, loader) = load_engine(&cfg, &metrics)?;
    let interval = cfg.engine.reload_interval;
    let reload = match (loader, &cfg.engine.model_dir) {
        (Some(loader), Some(dir)) if !interval.is_zero() => {
            Some(Reload { model_dir: dir.clone(), interval, loader })
        }
        _ => None,
    };
    match pipeline::run(cfg, engine, reload, metrics, Arc::new(AtomicBool::new(false)))? {
        Exit::Shutdown => Ok(ExitCode::SUCCESS),
        Exit::InvalidRatio(reason) => {
            tracing::error!("invalid-message circuit breaker: {reason}");
            Ok(ExitCode::from(3))
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ALIGNX_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Generate(args) => generate(args),
        Command::Doctor { ort_library } => doctor(ort_library),
        Command::Validate { input, max_id_bytes, max_text_bytes, max_message_bytes } => {
            validate(input, Limits { max_id_bytes, max_text_bytes, max_message_bytes })
        }
        Command::Produce { input, skip_invalid, conn } => produce(input, skip_invalid, conn),
        Command::Backfill(args) => backfill(*args),
        Command::Inspect { user_id, json, conn } => inspect(&user_id, json, conn),
        Command::Export { user_id, out, conn } => export(&user_id, out, conn),
        Command::Erase { user_id, reason, conn } => erase(&user_id, reason, conn),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
