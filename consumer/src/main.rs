//! `alignx-consumer`: command-line entry point. Parsing, logging setup and exit codes
//! only; the work lives in the library.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use alignx_consumer::config::{EngineKind, RunArgs, RunConfig};
use alignx_consumer::engine::{CountingEngine, Engine};
use alignx_consumer::pipeline::{self, Exit};
use alignx_consumer::{onnx_runtime, validate_cmd};
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
    /// Check that ONNX Runtime loads, and say from where.
    Doctor {
        /// ONNX Runtime library file (default: $ORT_DYLIB_PATH, then next to this binary).
        #[arg(long, env = "ALIGNX_ORT_LIBRARY")]
        ort_library: Option<PathBuf>,
    },
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

fn doctor(ort_library: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let runtime = onnx_runtime::init(ort_library.as_deref())?;
    println!("onnx runtime: {}", runtime.path().display());
    println!("build: {}", runtime.build_info());
    Ok(ExitCode::SUCCESS)
}

fn validate(input: PathBuf, limits: Limits) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn std::io::BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
        Box::new(BufReader::new(file))
    };
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

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = RunConfig::load(args)?;
    let engine: Arc<dyn Engine> = match cfg.engine.kind {
        EngineKind::Counting => {
            tracing::warn!("engine `counting`: summaries count signal kinds; no model runs");
            Arc::new(CountingEngine)
        }
        EngineKind::Onnx => anyhow::bail!(
            "the ONNX Runtime engine is not in this build yet; `--engine counting` runs the \
             pipeline with the deterministic counting engine"
        ),
    };
    match pipeline::run(cfg, engine, Arc::new(AtomicBool::new(false)))? {
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
        Command::Doctor { ort_library } => doctor(ort_library),
        Command::Validate { input, max_id_bytes, max_text_bytes, max_message_bytes } => {
            validate(input, Limits { max_id_bytes, max_text_bytes, max_message_bytes })
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
