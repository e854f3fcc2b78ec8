//! `alignx-consumer` subcommands as a user runs them.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn consumer(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_alignx-consumer"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run alignx-consumer");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn validate_reports_rejections_and_exit_code() {
    let good = r#"{"schema":"alignx.signal.v1","user_id":"u","signal_id":"1","ts":"2026-01-01T00:00:00Z","kind":"ugc","post":"p","comment":"c"}"#;
    let out = consumer(&["validate"], &format!("{good}\n"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid: 1 (pair 0, text 0, ugc 1)"));

    let out = consumer(&["validate", "-"], &format!("{good}\n{{\"kind\":\"pair\"}}\n"));
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("line 2: missing_field"), "{stdout}");
    assert!(stdout.contains("rejected: 1 (missing_field 1)"), "{stdout}");
}

#[test]
fn doctor_names_a_missing_library() {
    let out = consumer(&["doctor", "--ort-library", "/nonexistent/libonnxruntime.so"], "");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
}

#[test]
fn doctor_loads_the_configured_runtime() {
    let out = consumer(&["doctor"], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ORT Build Info"));
}

#[test]
fn run_explains_bad_configuration_before_connecting_anywhere() {
    let out = consumer(&["run"], "");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--model-dir") && err.contains("--engine counting"), "{err}");

    let out = consumer(&["run", "--engine", "counting", "--config", "/nonexistent/consumer.toml"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/consumer.toml"));

    let out = consumer(&["run", "--engine", "counting", "--window-wait", "soon"], "");
    assert_eq!(out.status.code(), Some(2), "clap rejects a bad duration");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));

    let help = consumer(&["run", "--help"], "");
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in
        ["--brokers", "ALIGNX_BROKERS", "--redis-url", "--window-size", "--window-wait", "--kafka-set"]
    {
        assert!(text.contains(flag), "--help mentions {flag}");
    }
}
