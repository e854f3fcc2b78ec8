//! `alignx-trainer synth` as a user runs it: deterministic output in every format the
//! trainer and consumer read, disjoint train/holdout users, clear errors.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use alignx_schemas::training::{ColdStartRecord, EvalRecord, RlRecord, StreamingRlRecord, read_records};
use alignx_schemas::{Limits, validate_signal};
use alignx_trainer::synth::STYLES;

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alignx-trainer")).args(args).output().expect("run alignx-trainer")
}

fn synth(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["synth", "--users", "60", "--seed", "7", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    trainer(&args)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

fn user_ids(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["user_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn the_world_is_deterministic_and_every_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a, &b] {
        let out = synth(d, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for entry in std::fs::read_dir(&a).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_str().unwrap();
        assert!(read(&a, name) == read(&b, name), "{name} differs between two runs with one seed");
    }

    // Signals pass the consumer's own validation, keyed by user, in time order per user.
    let mut last_ts: std::collections::HashMap<String, String> = Default::default();
    let mut kinds = BTreeSet::new();
    for file in ["signals_train.jsonl", "signals_holdout.jsonl"] {
        for line in read(&a, file).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let user = v["user_id"].as_str().unwrap();
            let s = validate_signal(line.as_bytes(), Some(user.as_bytes()), &Limits::default()).unwrap();
            kinds.insert(format!("{:?}", s.kind()));
            let ts = v["ts"].as_str().unwrap().to_owned();
            if let Some(prev) = last_ts.insert(user.to_owned(), ts.clone()) {
                assert!(prev < ts, "{user}: {prev} then {ts}");
            }
        }
    }
    assert_eq!(kinds.len(), 3, "pair, ugc and text signals: {kinds:?}");
    let train = user_ids(&read(&a, "signals_train.jsonl"));
    let holdout = user_ids(&read(&a, "signals_holdout.jsonl"));
    assert!(!train.is_empty() && !holdout.is_empty());
    assert!(train.is_disjoint(&holdout));

    let cold: Vec<ColdStartRecord> = read_records(&read(&a, "cold_start.jsonl")).unwrap();
    assert!(
        cold.iter().all(|r| r.prompt.ends_with("\nAssistant: <think>") && r.response.contains("<answer>"))
    );
    // Streaming records carry the teacher's previous summary as the past.
    assert!(cold.iter().any(|r| r.prompt.contains("**Past Preferences:**\n\nNot provided")));
    assert!(
        cold.iter()
            .any(|r| r.prompt.contains("**Past Preferences:**\n\n") && !r.prompt.contains("Not provided"))
    );
    let rl: Vec<RlRecord> = read_records(&read(&a, "rl_train.jsonl")).unwrap();
    let streaming: Vec<StreamingRlRecord> = read_records(&read(&a, "streaming_rl_train.jsonl")).unwrap();
    assert_eq!(streaming.len(), train.len());
    assert!(!rl.is_empty());
    // The judge curriculum: every answer follows the selection prefix; it is a letter or a
    // copy of response B's sign-off or of a summary's key word.
    let words: Vec<String> = STYLES.iter().flat_map(|s| [s.signoff, s.key]).map(String::from).collect();
    for file in ["judge_copy.jsonl", "judge_short_one.jsonl", "judge_short.jsonl", "judge_train.jsonl"] {
        let judge: Vec<ColdStartRecord> = read_records(&read(&a, file)).unwrap();
        let answer = |r: &ColdStartRecord| {
            r.response
                .strip_prefix("{\"selection\": \"Response ")
                .and_then(|x| x.strip_suffix("\"}<|im_end|>"))
                .unwrap_or_else(|| panic!("{file}: {}", r.response))
                .to_owned()
        };
        let (letters, copies): (Vec<_>, Vec<_>) =
            judge.iter().map(answer).partition(|x| x == "A" || x == "B");
        assert!(copies.iter().all(|w| words.contains(w)), "{file}: copy targets are style words");
        if file == "judge_copy.jsonl" {
            assert!(letters.is_empty());
            continue;
        }
        // Both orders of every comparison.
        let a_share = letters.iter().filter(|x| *x == "A").count() as f64 / letters.len() as f64;
        assert_eq!(a_share, 0.5, "{file}");
        let full = judge.iter().all(|r| r.prompt.contains("Here is an example."));
        assert_eq!(full, file == "judge_train.jsonl", "{file}: only the last stage shows the whole prompt");
    }
    // A summary never uses a response's words: the judge must learn which goes with which.
    for style in STYLES {
        assert!(!style.description.contains(style.keyword) && !style.description.contains(style.signoff));
    }

    let eval: Vec<EvalRecord> = read_records(&read(&a, "eval.jsonl")).unwrap();
    let shift: Vec<EvalRecord> = read_records(&read(&a, "eval_shift.jsonl")).unwrap();
    let stale: Vec<EvalRecord> = read_records(&read(&a, "eval_shift_stale.jsonl")).unwrap();
    assert!(!eval.is_empty() && !shift.is_empty());
    assert_eq!(shift.len(), stale.len());
    for (s, t) in shift.iter().zip(&stale) {
        assert_eq!((&s.prompt, s.answer), (&t.prompt, t.answer), "the same held-out comparisons");
        assert!(t.pairs.len() < s.pairs.len(), "stale histories stop at the shift");
    }
    for r in eval.iter().chain(&shift) {
        let user = r.user_id.as_deref().unwrap();
        assert!(holdout.contains(user), "eval users are held out: {user}");
        assert!(!r.latent_summary.as_deref().unwrap().is_empty());
    }
}

#[test]
fn noise_flips_pairs_without_changing_the_users() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, noisy) = (dir.path().join("clean"), dir.path().join("noisy"));
    assert!(synth(&clean, &["--noise", "0"]).status.success());
    let out = synth(&noisy, &["--noise", "0.2"]);
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flipped = summary["flipped_pairs"].as_u64().unwrap() as f64;
    let pairs = read(&noisy, "signals_train.jsonl").matches("\"kind\":\"pair\"").count()
        + read(&noisy, "signals_holdout.jsonl").matches("\"kind\":\"pair\"").count();
    assert!((0.12..0.28).contains(&(flipped / pairs as f64)), "{flipped} of {pairs}");
    assert_eq!(read(&clean, "users.jsonl"), read(&noisy, "users.jsonl"));
}

#[test]
fn bad_input_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("w");
    let cases: [(&[&str], &str); 4] = [
        (&["synth", "--users", "0", "--out"], "--users must be at least 2"),
        (
            &["synth", "--users", "10", "--styles", "humor,sarcasm,concise,formal", "--out"],
            "unknown style \"sarcasm\"",
        ),
        (&["synth", "--users", "10", "--noise", "1.5", "--out"], "--noise must be in [0, 1)"),
        (&["synth", "--users", "10", "--styles", "humor,concise,detailed", "--out"], "at least 3 styles"),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        args.push(out_dir.to_str().unwrap());
        let out = trainer(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // An output path under a regular file cannot be created.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = trainer(&["synth", "--users", "10", "--out", file.join("w").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write"));
}
