//! SFT on a tiny model: the loss falls, micro-batching does not change the step loss,
//! a resumed run repeats the uninterrupted one exactly, and over-long examples are
//! dropped and counted.

use std::path::{Path, PathBuf};

use alignx_trainer::init::{Preset, init};
use alignx_trainer::lora::{self, LoraConfig};
use alignx_trainer::model_dir::{self, Dtype, load_with_lora};
use alignx_trainer::sft::{Example, SftConfig, SftError, response_logprobs, run};
use tch::{Device, Kind, Tensor};

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let styles = [
        ("brief", "Prefers brief, direct answers."),
        ("jokes", "Enjoys humour and playful replies."),
        ("detail", "Wants thorough, detailed explanations with examples."),
    ];
    let mut corpus = String::new();
    let mut data = String::new();
    for i in 0..48 {
        let (k, summary) = styles[i % 3];
        let prompt = format!("This is the problem:\nuser {i} chose the {k} reply\nAssistant: <think>");
        let response = format!(" The user picks {k} replies. </think> <answer> {summary} </answer>");
        corpus.push_str(&format!("{prompt}{response}\n"));
        data.push_str(&serde_json::json!({"prompt": prompt, "response": response}).to_string());
        data.push('\n');
    }
    let corpus_path = dir.join("corpus.txt");
    std::fs::write(&corpus_path, corpus.repeat(4)).unwrap();
    let data_path = dir.join("sft.jsonl");
    std::fs::write(&data_path, data).unwrap();
    let model = dir.join("model");
    let mut shape = Preset::Tiny.shape();
    shape.vocab_size = 400;
    init(&corpus_path, &shape, 1, &model, false).unwrap();
    (model, data_path)
}

fn config(model: &Path, data: &Path, out: &Path) -> SftConfig {
    SftConfig {
        model: model.to_path_buf(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        epochs: 3,
        max_steps: None,
        batch_size: 8,
        grad_accum: 1,
        lr: 3e-3,
        warmup_steps: 2,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_length: 256,
        save_every: 6,
        seed: 9,
        resume: None,
        device: Device::Cpu,
        dtype: Dtype::Fp32,
        progress: false,
        lora: None,
    }
}

#[test]
fn loss_falls_and_resume_repeats_the_run_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let full = run(&config(&model, &data, &dir.path().join("a"))).unwrap();
    assert_eq!((full.steps, full.examples, full.dropped_too_long), (18, 48, 0));
    let (first, last) = (full.losses[0], *full.losses.last().unwrap());
    assert!(last < first * 0.7, "loss should fall: {first} -> {last}");

    let resumed = run(&SftConfig {
        resume: Some(dir.path().join("a/checkpoint-12")),
        ..config(&model, &data, &dir.path().join("b"))
    })
    .unwrap();
    assert_eq!(resumed.start_step, 12);
    assert_eq!(resumed.losses, full.losses[12..], "a resumed run must repeat the losses exactly");
    let weights = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(weights("a"), weights("b"));
}

#[test]
fn micro_batches_do_not_change_the_step_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let whole = SftConfig { epochs: 1, save_every: 0, ..config(&model, &data, &dir.path().join("a")) };
    let split = SftConfig { batch_size: 2, grad_accum: 4, ..whole.clone() };
    let (a, b) = (run(&whole).unwrap(), run(&SftConfig { out: dir.path().join("b"), ..split }).unwrap());
    assert_eq!(a.losses.len(), b.losses.len());
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

#[test]
fn over_long_examples_are_dropped_and_bad_records_named() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let long = SftConfig { max_length: 10, ..config(&model, &data, &dir.path().join("a")) };
    assert!(matches!(run(&long), Err(SftError::Invalid(m)) if m.contains("no example fits")));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"prompt": "p", "response": "r"}, {"prompt": "p"}]"#).unwrap();
    let err = run(&SftConfig { data: bad, ..config(&model, &data, &dir.path().join("b")) })
        .unwrap_err()
        .to_string();
    assert!(err.contains("$[1].response"), "{err}");
}

#[test]
fn lora_writes_an_adapter_that_resumes_exactly_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let lora =
        LoraConfig { rank: 4, lora_alpha: 8.0, target_modules: LoraConfig::parse_targets("q,v,up").unwrap() };
    let cfg =
        SftConfig { lr: 1e-2, lora: Some(lora.clone()), ..config(&model, &data, &dir.path().join("a")) };
    let full = run(&cfg).unwrap();
    // Adapters on a random tiny base learn slowly; the loss still falls clearly.
    assert!(*full.losses.last().unwrap() < full.losses[0] - 0.3, "{:?}", full.losses);
    let out = dir.path().join("a");
    assert!(out.join(lora::ADAPTER_CONFIG).is_file() && out.join(lora::ADAPTER_WEIGHTS).is_file());
    assert!(!out.join("model.safetensors").exists(), "a LoRA run writes an adapter, not a model");
    let resumed =
        run(&SftConfig { resume: Some(out.join("checkpoint-12")), out: dir.path().join("b"), ..cfg.clone() })
            .unwrap();
    assert_eq!(resumed.losses, full.losses[12..]);

    // Base + adapter, and the merged model, compute the same logits.
    let with = load_with_lora(&model, Device::Cpu, Dtype::Fp32, Some(&lora)).unwrap();
    lora::load_adapter(with.lora_vs.as_ref().unwrap(), &out).unwrap();
    let merged_dir = dir.path().join("merged");
    model_dir::merge_lora(&model, &out, &merged_dir).unwrap();
    let merged = model_dir::load(&merged_dir, Device::Cpu, Dtype::Fp32).unwrap();
    let base = model_dir::load(&model, Device::Cpu, Dtype::Fp32).unwrap();
    let x = tch::Tensor::from_slice(&[5i64, 9, 13, 2, 40, 7]).unsqueeze(0);
    let (a, m, b) = tch::no_grad(|| {
        (with.model.forward_full(&x), merged.model.forward_full(&x), base.model.forward_full(&x))
    });
    assert!((&a - &m).abs().max().double_value(&[]) < 1e-4, "merged model differs from base + adapter");
    assert!((&a - &b).abs().max().double_value(&[]) > 1e-3, "the adapter should have changed the model");
}

#[test]
fn bf16_training_keeps_f32_masters_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let cfg = SftConfig { dtype: Dtype::Bf16, ..config(&model, &data, &dir.path().join("a")) };
    let full = run(&cfg).unwrap();
    assert!(*full.losses.last().unwrap() < full.losses[0] * 0.8, "{:?}", full.losses);
    let resumed = run(&SftConfig {
        resume: Some(dir.path().join("a/checkpoint-12")),
        out: dir.path().join("b"),
        ..cfg
    })
    .unwrap();
    assert_eq!(resumed.losses, full.losses[12..]);
}

#[test]
fn a_shared_prompt_prefix_runs_once_with_the_same_logprobs_and_gradients() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = setup(dir.path());
    let loaded = model_dir::load(&model, Device::Cpu, Dtype::Fp32).unwrap();
    let encode = |t: &str| alignx_trainer::tokenizer::encode_ids(&loaded.tokenizer, t).unwrap();
    let prefix = encode("This is the problem:\nuser 1 chose the brief reply, user 2 the jokes, user 3 ");
    assert!(prefix.len() >= 20, "the prefix must be long enough to be shared: {}", prefix.len());
    let examples: Vec<Example> = ["detail", "brief one", "jokes and more jokes"]
        .iter()
        .map(|tail| {
            let mut ids = prefix.clone();
            ids.extend(encode(&format!("{tail}\nAssistant: <think>")));
            let prompt_len = ids.len();
            ids.extend(encode(&format!(" The user picks {tail}. </think> <answer> x </answer>")));
            Example { ids, prompt_len }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let grads = |logp: Tensor| {
        let mut vars = loaded.vs.variables().into_iter().collect::<Vec<_>>();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in vars.iter_mut() {
            v.zero_grad();
        }
        logp.sum(Kind::Float).backward();
        vars.into_iter().map(|(_, v)| v.grad().copy()).collect::<Vec<_>>()
    };
    // Together (the prefix run once) and one at a time (nothing shared).
    let together = response_logprobs(&loaded.model, &refs, Device::Cpu);
    let alone = Tensor::cat(
        &refs.iter().map(|e| response_logprobs(&loaded.model, &[*e], Device::Cpu)).collect::<Vec<_>>(),
        0,
    );
    let lens: i64 = examples.iter().map(|e| e.response_len() as i64).sum();
    assert_eq!(together.size(), [lens]);
    let diff = (&together - &alone).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "log-probs differ by {diff}");
    let (g1, g2) = (grads(together), grads(alone));
    for (a, b) in g1.iter().zip(&g2) {
        let scale = b.abs().max().double_value(&[]).max(1e-6);
        let d = (a - b).abs().max().double_value(&[]) / scale;
        assert!(d < 1e-3, "gradients differ by {d} (relative)");
    }
}
