//! `make bench` (trainer part): SFT throughput on the tiny preset, generation throughput
//! with the KV cache against recomputing the whole sequence each step, side by side in
//! one run, and GRPO's rollout tokens/s and optimizer step time. Writes JSON to the path
//! given as the first argument.

use std::path::Path;
use std::time::Instant;

use alignx_schemas::training::{Choice, Comparison, RlRecord};
use alignx_trainer::generate::{SamplingParams, generate};
use alignx_trainer::init::{Preset, init};
use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::rl::{self, RlConfig};
use alignx_trainer::sft::{SftConfig, run};
use serde_json::json;
use tch::{Device, Tensor};

const NEW_TOKENS: usize = 64;

fn corpus_and_data(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut corpus = String::new();
    let mut data = String::new();
    for i in 0..256 {
        let prompt =
            format!("This is the problem:\nuser {i} prefers replies of kind {}\nAssistant: <think>", i % 7);
        let response = format!(
            " Kind {} again and again. </think> <answer> Likes kind {} replies. </answer>",
            i % 7,
            i % 7
        );
        corpus.push_str(&prompt);
        corpus.push_str(&response);
        corpus.push('\n');
        data.push_str(&json!({"prompt": prompt, "response": response}).to_string());
        data.push('\n');
    }
    let (c, d) = (dir.join("corpus.txt"), dir.join("sft.jsonl"));
    std::fs::write(&c, corpus.repeat(4)).unwrap();
    std::fs::write(&d, data).unwrap();
    (c, d)
}

/// Greedy decoding that recomputes the full sequence every step (no cache).
fn generate_uncached(m: &alignx_trainer::qwen2::Qwen2, prompt: &[i64], n: usize) -> Vec<i64> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = tch::no_grad(|| m.forward_full(&Tensor::from_slice(&ids).unsqueeze(0)));
        ids.push(logits.select(1, -1).argmax(-1, false).int64_value(&[0]));
    }
    ids[prompt.len()..].to_vec()
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/trainer.json".into());
    let dir = tempfile::tempdir().unwrap();
    let (corpus, data) = corpus_and_data(dir.path());
    let model = dir.path().join("tiny");
    init(&corpus, &Preset::Tiny.shape(), 0, &model, false).unwrap();

    let sft = run(&SftConfig {
        max_steps: Some(16),
        batch_size: 16,
        max_length: 512,
        ..SftConfig::new(&model, data, dir.path().join("sft"))
    })
    .unwrap();

    let loaded = model_dir::load(&model, Device::Cpu, Dtype::Fp32).unwrap();
    let prompt: Vec<i64> = (0..96).map(|i| (i * 7 % 500) + 10).collect();
    let greedy = SamplingParams::greedy(NEW_TOKENS);
    let mut generation = json!({});
    for batch in [1usize, 8, 32] {
        let prompts = vec![prompt.clone(); batch];
        let t = Instant::now();
        let outs = generate(&loaded.model, &prompts, &greedy, &[], |_, _| false, Device::Cpu);
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = outs.iter().map(|g| g.tokens.len()).sum();
        generation[format!("cached_batch_{batch}_tokens_per_s")] = json!(tokens as f64 / secs);
    }
    let t = Instant::now();
    let uncached = generate_uncached(&loaded.model, &prompt, NEW_TOKENS);
    let uncached_tps = NEW_TOKENS as f64 / t.elapsed().as_secs_f64();
    let cached =
        generate(&loaded.model, std::slice::from_ref(&prompt), &greedy, &[], |_, _| false, Device::Cpu)
            .remove(0)
            .tokens;
    assert_eq!(cached, uncached, "cached and uncached greedy decoding must agree");
    generation["uncached_batch_1_tokens_per_s"] = json!(uncached_tps);
    generation["kv_cache_speedup_batch_1"] =
        json!(generation["cached_batch_1_tokens_per_s"].as_f64().unwrap() / uncached_tps);

    // GRPO on the SFT model (also the judge: scoring is one forward pass either way).
    let rl_data = dir.path().join("rl.jsonl");
    let records: String = (0..64)
        .map(|i| {
            let (chosen, rejected) =
                (format!("Kind {} reply.", i % 7), format!("Kind {} reply.", (i + 3) % 7));
            let record = RlRecord {
                value: format!("This is the problem:\nuser {i} prefers replies of kind {}", i % 7),
                comparison: Comparison {
                    task: "Answer the user.".into(),
                    chosen: chosen.clone(),
                    rejected: rejected.clone(),
                    response_a: chosen,
                    response_b: rejected,
                    answer: Choice::A,
                },
                ground_truth: Choice::A,
            };
            serde_json::to_string(&record).unwrap() + "\n"
        })
        .collect();
    std::fs::write(&rl_data, records).unwrap();
    let sft_model = dir.path().join("sft");
    let grpo = rl::run(&RlConfig {
        steps: 4,
        prompts_per_step: 8,
        group_size: 4,
        max_new_tokens: NEW_TOKENS,
        ..RlConfig::new(&sft_model, &sft_model, &rl_data, dir.path().join("rl"))
    })
    .unwrap();

    let report = json!({
        "machine": format!("{} cores, OMP_NUM_THREADS={}", std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::env::var("OMP_NUM_THREADS").unwrap_or_default()),
        "model": "tiny preset (init defaults)",
        "sft": {"steps": sft.steps, "batch_size": 16, "tokens": sft.tokens, "seconds": sft.seconds,
                "tokens_per_second": sft.tokens_per_second, "first_loss": sft.losses[0], "last_loss": sft.losses.last()},
        "generation": generation,
        "grpo": {"steps": grpo.steps, "prompts_per_step": 8, "group_size": 4, "max_new_tokens": NEW_TOKENS,
                 "rollouts": grpo.rollouts, "rollout_tokens_per_second": grpo.rollout_tokens_per_second,
                 "update_seconds_per_step": grpo.update_seconds_per_step, "seconds": grpo.seconds},
        "prompt_tokens": prompt.len(),
        "new_tokens": NEW_TOKENS,
    });
    if let Some(parent) = Path::new(&out).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
