//! GRPO end to end with real (tiny, really trained) models.
//!
//! The learning test is built so that the right direction is known: a judge trained to
//! follow its summary ("Pick the first." / "Pick the second."), a policy trained to
//! write either summary half the time whatever it reads, and RL data whose user always
//! chose response A. Only one summary earns reward, so GRPO must move the policy toward
//! it; a sign or masking error moves it away or nowhere. The same holds with R_gen and a
//! generator trained to write response A after the first summary, B after the second,
//! and with PPO (value head + GAE) in place of the group baseline. The mechanics test checks the
//! streaming setting, the log, checkpoints and that a resumed run ends with exactly the
//! weights of an uninterrupted one.

use std::path::{Path, PathBuf};

use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::training::{
    Choice, ColdStartRecord, Comparison, HistoryPair, RlRecord, StreamingEntry, StreamingRlRecord,
    StreamingStep,
};
use alignx_trainer::eval::{EvalSetting, answer_closed};
use alignx_trainer::generate::{self, SamplingParams};
use alignx_trainer::init::{Preset, init};
use alignx_trainer::judge;
use alignx_trainer::judge::{Judge, JudgeItem};
use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::rgen::{self, GenItem, Generator};
use alignx_trainer::rl::{self, Algo, RewardKind, RlConfig, RlError};
use alignx_trainer::rng::Rng;
use alignx_trainer::sft::{self, SftConfig};
use alignx_trainer::synth::{self, SynthConfig};
use alignx_trainer::tokenizer::encode_ids;
use tch::Device;

const FIRST: &str = "Pick the first.";
const SECOND: &str = "Pick the second.";

fn jsonl<T: serde::Serialize>(items: &[T]) -> String {
    items.iter().map(|i| serde_json::to_string(i).unwrap() + "\n").collect()
}

fn comparison(i: usize) -> Comparison {
    Comparison {
        task: format!("Post {}?", i % 5),
        chosen: "Brief: yes.".into(),
        rejected: "Formally: no.".into(),
        response_a: "Brief: yes.".into(),
        response_b: "Formally: no.".into(),
        answer: Choice::A,
    }
}

fn problem(i: usize, setting: Setting<'_>) -> String {
    let ev = Evidence {
        pairs: vec![HistoryPair {
            prompt: format!("Post {}?", i % 7),
            chosen: "Brief: yes.".into(),
            rejected: "Formally: no.".into(),
        }],
        ..Evidence::default()
    };
    Templates::default().problem(setting, &ev)
}

/// A judge that follows the summary, and a policy that writes either summary at random,
/// both trained from `init` in `dir`.
struct Models {
    judge: PathBuf,
    policy: PathBuf,
}

fn train_models(dir: &Path) -> Models {
    let templates = Templates::default();
    // The tokenizer learns from the synthetic world's text (its prompts and chats).
    let world = dir.join("world");
    synth::generate(&SynthConfig { users: 40, ..SynthConfig::default() }, &world).unwrap();
    let corpus = world.join("corpus.txt");
    let init_dir = dir.join("init");
    init(&corpus, &Preset::Tiny.shape(), 0, &init_dir, false).unwrap();

    // Prompts start with the tokenizer's BOS text, as `grpo` renders them.
    let bos = alignx_schemas::prompt::bos_text(&init_dir);
    let mut rng = Rng::new(3);
    let mut coin = || if rng.next_u64().is_multiple_of(2) { Choice::A } else { Choice::B };
    let say = |c: Choice| if c == Choice::A { FIRST } else { SECOND };
    let judge_data: Vec<ColdStartRecord> = (0..400)
        .map(|i| {
            let c = coin();
            let cmp = comparison(i);
            judge::training_record(&templates, &cmp.task, say(c), &cmp.response_a, &cmp.response_b, c)
        })
        .collect();
    // The policy answers base and streaming prompts alike, either way at random.
    let policy_data: Vec<ColdStartRecord> = (0..400)
        .map(|i| {
            let setting = if i % 2 == 0 { Setting::Base } else { Setting::Streaming { past: None } };
            ColdStartRecord {
                prompt: templates.wrap(&bos, &problem(i, setting)),
                response: format!("ok</think>\n<answer>{}</answer>", say(coin())),
            }
        })
        .collect();
    let mut paths = Vec::new();
    for (name, data, steps) in [("judge", judge_data, 200), ("policy", policy_data, 150)] {
        let file = dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, jsonl(&data)).unwrap();
        let out = dir.join(name);
        let summary = sft::run(&SftConfig {
            epochs: 100,
            max_steps: Some(steps),
            batch_size: 16,
            lr: 3e-3,
            warmup_steps: 5,
            ..SftConfig::new(&init_dir, file, &out)
        })
        .unwrap();
        let l = &summary.losses;
        println!("{name} SFT loss {:.3} → {:.3}", l[0], l[l.len() - 1]);
        paths.push(out);
    }
    let policy = paths.pop().unwrap();
    Models { judge: paths.pop().unwrap(), policy }
}

fn rl_data(dir: &Path) -> (PathBuf, PathBuf) {
    let base: Vec<RlRecord> = (0..40)
        .map(|i| RlRecord {
            value: problem(i, Setting::Base),
            comparison: comparison(i),
            ground_truth: Choice::A,
        })
        .collect();
    let streaming: Vec<StreamingRlRecord> = (0..10)
        .map(|u| {
            let history = (0..3)
                .map(|k| StreamingStep {
                    value: problem(u * 3 + k, Setting::Streaming { past: None }),
                    comparison: comparison(u + k),
                })
                .collect();
            StreamingRlRecord(vec![StreamingEntry { history }])
        })
        .collect();
    let (b, s) = (dir.join("rl_train.jsonl"), dir.join("streaming_rl_train.jsonl"));
    std::fs::write(&b, jsonl(&base)).unwrap();
    std::fs::write(&s, jsonl(&streaming)).unwrap();
    (b, s)
}

/// Share of sampled summaries (temperature 1, 64 samples over 8 prompts) that say
/// "Pick the first.".
fn share_first(policy: &Path) -> f64 {
    let loaded = model_dir::load(policy, Device::Cpu, Dtype::Fp32).unwrap();
    let templates = Templates::default();
    let prompts: Vec<Vec<i64>> = (0..64)
        .map(|i| {
            let prompt =
                templates.wrap(&alignx_schemas::prompt::bos_text(policy), &problem(i % 8, Setting::Base));
            encode_ids(&loaded.tokenizer, &prompt).unwrap()
        })
        .collect();
    let params = SamplingParams { temperature: 1.0, seed: 99, ..SamplingParams::greedy(24) };
    let tok = &loaded.tokenizer;
    let gens = generate::generate(
        &loaded.model,
        &prompts,
        &params,
        &loaded.eos,
        |_, t| answer_closed(tok, t),
        Device::Cpu,
    );
    let texts: Vec<String> = gens
        .iter()
        .map(|g| tok.decode(&g.tokens.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap())
        .collect();
    texts.iter().filter(|t| t.contains(FIRST)).count() as f64 / texts.len() as f64
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn rl_moves_the_policy_toward_what_the_judge_or_the_generator_rewards_and_resumes_exactly() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let models = train_models(dir.path());
    let (base, streaming) = rl_data(dir.path());
    // The setup: the judge follows the summary, the policy says either.
    let judge = Judge::load(&models.judge, Device::Cpu).unwrap();
    let cmp = comparison(0);
    let item = |summary| JudgeItem { post: &cmp.task, summary, a: &cmp.response_a, b: &cmp.response_b };
    let p = judge.prob_a(&[item(FIRST), item(SECOND)], 2).unwrap();
    println!("judge P(A | first) {:.3}, P(A | second) {:.3}", p[0], p[1]);
    assert!(p[0] > 0.5 && p[1] < 0.5, "{p:?}");
    let before = share_first(&models.policy);

    let cfg = RlConfig {
        steps: 30,
        prompts_per_step: 4,
        group_size: 4,
        max_new_tokens: 24,
        lr: 1e-3,
        ..RlConfig::new(&models.policy, &models.judge, &base, dir.path().join("grpo"))
    };
    let summary = rl::run(&cfg).unwrap();
    let curve: Vec<String> = summary.log.iter().map(|s| format!("{:.2}", s.reward)).collect();
    println!("reward per step: {}", curve.join(" "));
    println!(
        "reward first {:.3} → last {:.3}; {:.0} rollout tok/s, {:.3} s/update",
        summary.reward_first,
        summary.reward_last,
        summary.rollout_tokens_per_second,
        summary.update_seconds_per_step
    );
    assert_eq!(summary.log.len(), 30);
    assert_eq!(summary.rollouts, 30 * 4 * 4);
    // Only "Pick the first." is rewarded: GRPO must make it more likely.
    let after = share_first(&dir.path().join("grpo"));
    println!("share of 'Pick the first.': {before:.2} before GRPO, {after:.2} after");
    assert!((0.2..0.8).contains(&before), "the SFT policy should say either: {before}");
    assert!(after > before + 0.15 && after > 0.8, "{before} → {after}; rewards {curve:?}");
    let logged = std::fs::read_to_string(dir.path().join("grpo/rl_log.jsonl")).unwrap();
    assert_eq!(logged.lines().count(), 30);

    // Streaming: two steps per draw, the second prompt carrying the first's summary;
    // checkpoints and an exact resume.
    let run = |out: &str, steps_saved: usize, resume: Option<PathBuf>| {
        let cfg = RlConfig {
            setting: EvalSetting::Streaming,
            steps: 4,
            prompts_per_step: 2,
            group_size: 3,
            max_new_tokens: 24,
            lr: 3e-4,
            kl_coef: 0.1,
            ppo_epochs: 2,
            save_every: steps_saved,
            resume,
            ..RlConfig::new(&models.policy, &models.judge, &streaming, dir.path().join(out))
        };
        rl::run(&cfg).unwrap()
    };
    let whole = run("whole", 2, None);
    assert_eq!(whole.rollouts, 4 * 2 * 3 * 2);
    assert!(whole.log.iter().all(|s| s.kl.is_finite() && s.kl >= 0.0), "{:?}", whole.log);
    assert!(whole.log.iter().skip(1).any(|s| s.kl > 0.0), "the policy moved away from its reference");
    let checkpoint = dir.path().join("whole/checkpoint-2");
    assert!(checkpoint.join("optimizer.safetensors").is_file());
    let resumed = run("resumed", 0, Some(checkpoint));
    assert_eq!(resumed.start_step, 2);
    assert_eq!(resumed.log.len(), 2);
    for (a, b) in whole.log[2..].iter().zip(&resumed.log) {
        assert_eq!(a.reward, b.reward, "resumed rollouts differ");
    }
    assert!(
        weights(&dir.path().join("whole")) == weights(&dir.path().join("resumed")),
        "resumed weights differ"
    );

    // R_gen: a generator that writes response A after "Pick the first." and B after
    // "Pick the second." (either with no summary) rewards the first summary only, so GRPO
    // with --reward gen must move the same policy the same way.
    let generator = train_generator(dir.path());
    let g = Generator::load(&generator, Device::Cpu).unwrap();
    let gen_item =
        |summary| GenItem { post: &cmp.task, summary, chosen: &cmp.chosen, rejected: &cmp.rejected };
    let margins = g.margins(&[gen_item(FIRST), gen_item(SECOND), gen_item("")], 2).unwrap();
    println!("R_gen margins: first {:.2}, second {:.2}, none {:.2}", margins[0], margins[1], margins[2]);
    assert!(margins[0] > rgen::DEFAULT_MARGIN && margins[1] < 0.0, "{margins:?}");
    assert_eq!(margins[2], 0.0, "no summary: both sides of the margin are the same");
    let cfg = RlConfig {
        reward: RewardKind::Gen,
        steps: 30,
        prompts_per_step: 4,
        group_size: 4,
        max_new_tokens: 24,
        lr: 1e-3,
        ..RlConfig::new(&models.policy, &generator, &base, dir.path().join("grpo-gen"))
    };
    let summary = rl::run(&cfg).unwrap();
    let after = share_first(&dir.path().join("grpo-gen"));
    println!(
        "R_gen: reward {:.3} → {:.3}; share of 'Pick the first.' {before:.2} → {after:.2}",
        summary.reward_first, summary.reward_last
    );
    assert!(summary.reward_last > summary.reward_first + 0.2, "{summary:?}");
    assert!(after > before + 0.15 && after >= 0.75, "{before} → {after}");

    // PPO: a value head and GAE instead of the group baseline, same direction; its
    // checkpoints carry the value head, and a resumed run ends where an uninterrupted one does.
    let ppo = |out: &str, steps: usize, save_every: usize, resume: Option<PathBuf>| {
        rl::run(&RlConfig {
            algo: Algo::Ppo,
            steps,
            prompts_per_step: 4,
            group_size: 4,
            max_new_tokens: 24,
            lr: 1e-3,
            save_every,
            resume,
            ..RlConfig::new(&models.policy, &models.judge, &base, dir.path().join(out))
        })
        .unwrap()
    };
    let summary = ppo("ppo", 30, 0, None);
    let after = share_first(&dir.path().join("ppo"));
    println!(
        "PPO: reward {:.3} → {:.3}; share of 'Pick the first.' {before:.2} → {after:.2}",
        summary.reward_first, summary.reward_last
    );
    assert!(after > before + 0.15 && after >= 0.75, "{before} → {after}; {:?}", summary.log);
    ppo("ppo-whole", 4, 2, None);
    let checkpoint = dir.path().join("ppo-whole/checkpoint-2");
    assert!(checkpoint.join("value_head.safetensors").is_file());
    let resumed = ppo("ppo-resumed", 4, 0, Some(checkpoint));
    assert_eq!(resumed.start_step, 2);
    assert!(
        weights(&dir.path().join("ppo-whole")) == weights(&dir.path().join("ppo-resumed")),
        "resumed PPO weights differ"
    );
}

/// A generator (the R_gen reward model) whose response follows the summary in its chat.
fn train_generator(dir: &Path) -> PathBuf {
    let templates = Templates::default();
    let mut rng = Rng::new(5);
    let cmp = comparison(0);
    let data: Vec<ColdStartRecord> = (0..400)
        .map(|i| {
            let post = format!("Post {}?", i % 5);
            let (summary, response) = match i % 3 {
                0 => (FIRST, cmp.response_a.as_str()),
                1 => (SECOND, cmp.response_b.as_str()),
                _ if rng.next_u64().is_multiple_of(2) => ("", cmp.response_a.as_str()),
                _ => ("", cmp.response_b.as_str()),
            };
            ColdStartRecord {
                prompt: judge::chatml(&templates.rgen_messages(summary, &post)),
                response: format!("{response}<|im_end|>"),
            }
        })
        .collect();
    let file = dir.join("generator.jsonl");
    std::fs::write(&file, jsonl(&data)).unwrap();
    let out = dir.join("generator");
    sft::run(&SftConfig {
        epochs: 100,
        max_steps: Some(150),
        batch_size: 16,
        lr: 3e-3,
        warmup_steps: 5,
        ..SftConfig::new(dir.join("init"), file, &out)
    })
    .unwrap();
    out
}

#[test]
fn bad_settings_and_empty_data_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let cfg = |data: &Path| RlConfig::new("no-policy", "no-judge", data, dir.path().join("out"));
    let err = rl::run(&RlConfig { group_size: 1, ..cfg(&empty) }).unwrap_err();
    assert!(err.to_string().contains("--group-size"), "{err}");
    let err = rl::run(&RlConfig { temperature: 0.0, ..cfg(&empty) }).unwrap_err();
    assert!(err.to_string().contains("--temperature"), "{err}");
    let err = rl::run(&cfg(&empty)).unwrap_err();
    assert!(matches!(err, RlError::NoData { .. }), "{err}");
    assert!(err.to_string().contains("no rl_train records"), "{err}");
    // A streaming history of one step has no next step to feed.
    let one = dir.path().join("one.jsonl");
    let record = StreamingRlRecord(vec![StreamingEntry {
        history: vec![StreamingStep {
            value: problem(0, Setting::Streaming { past: None }),
            comparison: comparison(0),
        }],
    }]);
    std::fs::write(&one, jsonl(&[record])).unwrap();
    let err = rl::run(&RlConfig { setting: EvalSetting::Streaming, ..cfg(&one) }).unwrap_err();
    assert!(err.to_string().contains("two or more steps"), "{err}");
    let err = rl::run(&cfg(&dir.path().join("missing.jsonl"))).unwrap_err();
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}
