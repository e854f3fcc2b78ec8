//! Batched generation gives each prompt what it would get alone: left padding, rows
//! leaving the batch on EOS or a stop, and per-prompt seeded sampling.

use alignx_trainer::generate::{Finish, SamplingParams, generate};
use alignx_trainer::qwen2::{Config, Qwen2};
use serde_json::json;
use tch::Device;
use tch::nn::VarStore;

fn tiny() -> (VarStore, Qwen2) {
    tch::manual_seed(11);
    let config: Config = serde_json::from_value(json!({
        "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": true
    }))
    .unwrap();
    let vs = VarStore::new(Device::Cpu);
    // A larger init spreads the logits, so greedy choices are not near-ties.
    let m = Qwen2::new(&vs.root(), &Config { initializer_range: 0.5, ..config });
    (vs, m)
}

fn prompts() -> Vec<Vec<i64>> {
    vec![vec![3, 9, 27], vec![5, 1, 4, 1, 5, 9, 2], vec![8]]
}

fn solo(m: &Qwen2, p: &[i64], params: &SamplingParams, eos: &[i64], seed_offset: u64) -> Vec<i64> {
    let params = SamplingParams { seed: params.seed + seed_offset, ..params.clone() };
    generate(m, &[p.to_vec()], &params, eos, |_, _| false, Device::Cpu).remove(0).tokens
}

#[test]
fn batched_greedy_equals_each_prompt_alone_even_when_rows_finish_early() {
    let (_vs, m) = tiny();
    let params = SamplingParams::greedy(10);
    let alone: Vec<Vec<i64>> = prompts().iter().map(|p| solo(&m, p, &params, &[], 0)).collect();
    // Make the first prompt's 4th token an EOS: that row leaves the batch after 4 tokens.
    let eos = alone[0][3];
    let batch = generate(&m, &prompts(), &params, &[eos], |_, _| false, Device::Cpu);
    for (i, g) in batch.iter().enumerate() {
        let cut = alone[i].iter().position(|&t| t == eos).map_or(alone[i].len(), |p| p + 1);
        assert_eq!(g.tokens, alone[i][..cut], "prompt {i}");
        let expected = if alone[i][..cut].contains(&eos) { Finish::Eos } else { Finish::Length };
        assert_eq!(g.finish, expected, "prompt {i}");
    }
    assert_eq!(batch[0].finish, Finish::Eos);
    assert!(batch[0].tokens.len() <= 4);
}

#[test]
fn sampling_is_reproducible_per_prompt_and_seed() {
    let (_vs, m) = tiny();
    let params =
        SamplingParams { max_new_tokens: 12, temperature: 1.0, top_k: Some(20), top_p: Some(0.95), seed: 7 };
    let a = generate(&m, &prompts(), &params, &[], |_, _| false, Device::Cpu);
    let b = generate(&m, &prompts(), &params, &[], |_, _| false, Device::Cpu);
    assert_eq!(a, b);
    // Prompt i uses seed + i, batched or not.
    for (i, p) in prompts().iter().enumerate() {
        assert_eq!(a[i].tokens, solo(&m, p, &params, &[], i as u64), "prompt {i}");
    }
    let other =
        generate(&m, &prompts(), &SamplingParams { seed: 8, ..params }, &[], |_, _| false, Device::Cpu);
    assert_ne!(a, other);
}

#[test]
fn stop_condition_ends_only_its_row() {
    let (_vs, m) = tiny();
    let out = generate(
        &m,
        &prompts(),
        &SamplingParams::greedy(6),
        &[],
        |row, toks| row == 1 && toks.len() == 2,
        Device::Cpu,
    );
    assert_eq!((out[1].tokens.len(), out[1].finish), (2, Finish::Stop));
    assert_eq!((out[0].tokens.len(), out[0].finish), (6, Finish::Length));
}
