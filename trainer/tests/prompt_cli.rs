//! `alignx-trainer prompt` as a user runs it: byte-exact output, one-line errors,
//! exit code 2 for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alignx-trainer")).args(args).output().expect("run alignx-trainer")
}

/// `prompt --input <a golden input> --templates <a file holding toml>`.
fn prompt_with_templates(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("templates.toml");
    std::fs::write(&tpl, toml).unwrap();
    let good = golden_dir().join("base_two_pairs.input.json");
    trainer(&["prompt", "--input", good.to_str().unwrap(), "--templates", tpl.to_str().unwrap()])
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/spec/golden")
}

#[test]
fn reproduces_every_golden_prompt_byte_for_byte() {
    let mut n = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let input = entry.unwrap().path();
        let Some(name) = input.file_name().unwrap().to_str().unwrap().strip_suffix(".input.json") else {
            continue;
        };
        let out = trainer(&["prompt", "--setting", "base", "--input", input.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let want = std::fs::read(golden_dir().join(format!("{name}.prompt.txt"))).unwrap();
        assert!(out.stdout == want, "{name}: output differs from the golden prompt");
        n += 1;
    }
    assert!(n >= 4);
}

#[test]
fn streaming_setting_carries_the_past_summary() {
    let input = golden_dir().join("base_two_pairs.input.json");
    let out = trainer(&[
        "prompt",
        "--setting",
        "streaming",
        "--past-summary",
        "Likes puns.",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("This is the problem:\nSummarize comprehensive user preferences"));
    assert!(text.contains("**Past Preferences:**\n\nLikes puns.\n\n**This person has chosen or rejected"));
    assert!(text.ends_with("\n\n\nAssistant: <think>"));
}

fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "error must be one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"bos_token": "", "pairs": [{"prompt": "p", "chosen": 3, "rejected": "r"}]}"#)
        .unwrap();
    assert_one_line_error(&trainer(&["prompt", "--input", bad.to_str().unwrap()]), 2, "$.pairs[0].chosen");
    std::fs::write(&bad, "{ not json").unwrap();
    assert_one_line_error(&trainer(&["prompt", "--input", bad.to_str().unwrap()]), 2, "not JSON");
    assert_one_line_error(
        &trainer(&["prompt", "--input", "/nonexistent.json"]),
        1,
        "cannot read /nonexistent.json",
    );
    let out = prompt_with_templates("pair_item = \"{i} {psot}\"\n");
    assert_one_line_error(&out, 2, "unknown placeholder {psot}");
}

#[test]
fn template_file_overrides_wording() {
    let out = prompt_with_templates("base_header = \"Describe this user.\\n\\n\"\n");
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("This is the problem:\nDescribe this user.\n\n**This person")
    );
}

#[test]
fn help_and_version() {
    let help = trainer(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("prompt"));
    let version = trainer(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("alignx-trainer {}", env!("CARGO_PKG_VERSION"))
    );
}
