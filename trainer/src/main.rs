//! `alignx-trainer`: command-line entry point. Parsing and exit codes only; the work
//! lives in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use alignx_trainer::prompt_cmd::{self, SettingArg};
use clap::{Parser, Subcommand};

/// Trains and exports the AlignXplore preference-inference model, and renders its
/// prompt protocol.
#[derive(Debug, Parser)]
#[command(name = "alignx-trainer", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print exactly the prompt the model sees for an input file, with no trailing newline.
    ///
    /// The input is JSON in the golden-vector format: {"bos_token": "...", "pairs":
    /// [{"prompt","chosen","rejected"}], "ugc": [{"prompt","comment"}], "texts": ["..."]}.
    /// Exit code 2 when the input is invalid, naming the field.
    Prompt {
        /// Prompt layout.
        #[arg(long, value_enum, default_value = "base")]
        setting: SettingArg,
        /// Input JSON file, or `-` for standard input.
        #[arg(long)]
        input: PathBuf,
        /// The user's previous summary (streaming only; default: none, rendered as
        /// "Not provided").
        #[arg(long)]
        past_summary: Option<String>,
        /// TOML file overriding prompt templates (any subset of fields).
        #[arg(long, env = "ALIGNX_TEMPLATES")]
        templates: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Prompt { setting, input, past_summary, templates } => {
            match prompt_cmd::render(&input, setting, past_summary.as_deref(), templates.as_ref()) {
                Ok(prompt) => {
                    let mut out = std::io::stdout().lock();
                    if out.write_all(prompt.as_bytes()).and_then(|()| out.flush()).is_err() {
                        return ExitCode::from(1);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
                }
            }
        }
    }
}
