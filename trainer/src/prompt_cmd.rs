//! `alignx-trainer prompt`: print exactly the prompt a model sees for an input file in
//! the golden-vector format (`spec/golden/*.input.json`).

use std::io::Read;
use std::path::{Path, PathBuf};

use alignx_schemas::prompt::{PromptInput, Setting, TemplateError, Templates};

/// Which prompt layout to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SettingArg {
    /// Preferences from behaviour alone.
    Base,
    /// Update a previous summary (`--past-summary`) with new behaviour.
    Streaming,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptCmdError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {problems}")]
    Input { path: String, problems: alignx_schemas::Problems },
    #[error(transparent)]
    Templates(#[from] TemplateError),
    #[error("--past-summary only applies to --setting streaming")]
    PastWithoutStreaming,
}

impl PromptCmdError {
    /// Bad input is the caller's to fix (exit 2); the rest are environment failures.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, PromptCmdError::Read { .. })
    }
}

fn read_input(path: &Path) -> Result<String, PromptCmdError> {
    let shown = path.display().to_string();
    let text = if shown == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map(|_| text)
    } else {
        std::fs::read_to_string(path)
    };
    text.map_err(|source| PromptCmdError::Read { path: shown, source })
}

/// Renders the prompt for `input` (a path, or `-` for stdin).
pub fn render(
    input: &Path,
    setting: SettingArg,
    past_summary: Option<&str>,
    templates: Option<&PathBuf>,
) -> Result<String, PromptCmdError> {
    let templates = match templates {
        Some(path) => Templates::from_file(path)?,
        None => Templates::default(),
    };
    let setting = match (setting, past_summary) {
        (SettingArg::Base, Some(_)) => return Err(PromptCmdError::PastWithoutStreaming),
        (SettingArg::Base, None) => Setting::Base,
        (SettingArg::Streaming, past) => Setting::Streaming { past },
    };
    let text = read_input(input)?;
    let parsed = PromptInput::parse(&text)
        .map_err(|problems| PromptCmdError::Input { path: input.display().to_string(), problems })?;
    Ok(templates.render(&parsed.bos_token, setting, &parsed.evidence))
}
