//! `alignx-trainer init` and `generate` as a user runs them: a model directory that
//! loads, a tokenizer that round-trips prompts exactly, and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::tokenizer::TAG_TOKENS;
use tch::Device;

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alignx-trainer")).args(args).output().expect("run alignx-trainer")
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/spec/golden")
}

/// A corpus of prompt-like text: the golden prompts and the dimension catalogue.
fn corpus(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for _ in 0..20 {
        for e in std::fs::read_dir(golden()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "txt") {
                text.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
        text.push_str(&std::fs::read_to_string(golden().join("../dimensions.txt")).unwrap());
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn init_makes_a_loadable_model_whose_tokenizer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let out = dir.path().join("tiny");
    let run = trainer(&[
        "init",
        "--out",
        out.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let loaded = model_dir::load(&out, Device::Cpu, Dtype::Fp32).unwrap();
    assert_eq!(loaded.eos.len(), 1);
    let tok = &loaded.tokenizer;
    let prompt = std::fs::read_to_string(golden().join("base_unicode_multiline.prompt.txt")).unwrap()
        + " reasoning </think> <answer> Mag 👍, «Kürze». </answer>";
    let enc = tok.encode(prompt.as_str(), false).unwrap();
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), prompt, "prompt must round-trip exactly");
    for tag in TAG_TOKENS {
        assert_eq!(tok.encode(tag, false).unwrap().get_ids().len(), 1, "{tag} is one token");
    }
    // Leading spaces are not invented (add_prefix_space = false).
    let enc = tok.encode("word", false).unwrap();
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "word");

    // Same seed, same weights; a second init into the same place needs --force.
    let again = trainer(&["init", "--out", out.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --force"));
    let out2 = dir.path().join("tiny2");
    assert!(
        trainer(&[
            "init",
            "--out",
            out2.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--seed",
            "3"
        ])
        .status
        .success()
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );

    // generate: greedy is deterministic, stops on max tokens, prints only the continuation.
    let prompt_file = dir.path().join("p.txt");
    std::fs::write(&prompt_file, "This is the problem:\n").unwrap();
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt-file",
            prompt_file.to_str().unwrap(),
            "--max-new-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        trainer(&args)
    };
    let a = generate(&["--greedy"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, generate(&[]).stdout);
    assert!(
        String::from_utf8_lossy(&a.stderr).contains("finished: Length")
            || String::from_utf8_lossy(&a.stderr).contains("finished: Eos")
    );
    let s1 = generate(&["--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]);
    assert_eq!(s1.stdout, generate(&["--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]).stdout);
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let one_line = |o: &Output, needle: &str| {
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    };
    let out = dir.path().join("m");
    one_line(
        &trainer(&["init", "--out", out.to_str().unwrap(), "--corpus", "/nonexistent.txt"]),
        "/nonexistent.txt",
    );
    assert!(!out.exists(), "nothing is written on failure");
    let p = dir.path().join("p.txt");
    std::fs::write(&p, "x").unwrap();
    one_line(
        &trainer(&["generate", "--model", "/nonexistent", "--prompt-file", p.to_str().unwrap()]),
        "/nonexistent/config.json",
    );
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
    one_line(
        &trainer(&["generate", "--model", out.to_str().unwrap(), "--prompt-file", p.to_str().unwrap()]),
        "missing field",
    );
}

#[test]
fn export_onnx_writes_a_servable_directory_and_refuses_unsupported_configs() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let model = dir.path().join("m");
    assert!(
        trainer(&["init", "--out", model.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()])
            .status
            .success()
    );
    let out = dir.path().join("onnx");
    let run = trainer(&["export-onnx", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for f in ["model.onnx", "config.json", "tokenizer.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // A sliding-window config is refused, naming the field, and nothing is written.
    let config = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["use_sliding_window"] = serde_json::Value::Bool(true);
    std::fs::write(&config, json.to_string()).unwrap();
    let out2 = dir.path().join("onnx2");
    let run = trainer(&["export-onnx", "--model", model.to_str().unwrap(), "--out", out2.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("`use_sliding_window`") && err.trim_end().lines().count() == 1, "{err}");
    assert!(!out2.exists());
}
