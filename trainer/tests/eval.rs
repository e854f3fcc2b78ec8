//! ACC_jud end to end with a real (tiny, really trained) judge: the evaluation measures
//! what it claims. The judge here learns an easy rule — the summary says which response
//! to pick — so the true-summary row must be near 100% and the no-summary row near 50%;
//! a policy that writes no `<answer>` scores like no summary and is counted as failing.

use alignx_schemas::prompt::Templates;
use alignx_schemas::training::{Choice, EvalRecord, HistoryPair};
use alignx_trainer::eval::{self, EvalConfig, EvalSetting};
use alignx_trainer::init::{Preset, init};
use alignx_trainer::judge;
use alignx_trainer::rng::Rng;
use alignx_trainer::sft::{self, SftConfig};
use alignx_trainer::synth::{self, SynthConfig};
use tch::Device;

fn jsonl<T: serde::Serialize>(items: &[T]) -> String {
    items.iter().map(|i| serde_json::to_string(i).unwrap() + "\n").collect()
}

#[test]
fn a_judge_that_follows_the_summary_scores_it_near_perfect_and_no_summary_at_chance() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    synth::generate(&SynthConfig { users: 40, ..SynthConfig::default() }, &world).unwrap();
    let model = dir.path().join("init");
    init(&world.join("corpus.txt"), &Preset::Tiny.shape(), 0, &model, false).unwrap();

    let templates = Templates::default();
    let mut rng = Rng::new(3);
    let say = |c: Choice| if c == Choice::A { "Pick the first." } else { "Pick the second." };
    let pick = |rng: &mut Rng| if rng.next_u64().is_multiple_of(2) { Choice::A } else { Choice::B };
    let train: Vec<_> = (0..400)
        .map(|i| {
            let c = pick(&mut rng);
            judge::training_record(
                &templates,
                &format!("Post {}?", i % 5),
                say(c),
                "Brief: yes.",
                "Formally: no.",
                c,
            )
        })
        .collect();
    let data = dir.path().join("judge.jsonl");
    std::fs::write(&data, jsonl(&train)).unwrap();
    let judge_dir = dir.path().join("judge");
    let summary = sft::run(&SftConfig {
        epochs: 100,
        max_steps: Some(200),
        batch_size: 16,
        lr: 3e-3,
        warmup_steps: 5,
        ..SftConfig::new(&model, data, &judge_dir)
    })
    .unwrap();
    let losses = &summary.losses;
    println!("judge sft loss {:.3} → {:.3}", losses[0], losses[losses.len() - 1]);

    let history = vec![
        HistoryPair {
            prompt: "Post?".into(),
            chosen: "Brief: yes.".into(),
            rejected: "Formally: no.".into()
        };
        5
    ];
    let records: Vec<EvalRecord> = (0..60)
        .map(|i| {
            let c = pick(&mut rng);
            EvalRecord {
                pairs: history.clone(),
                ugc: Vec::new(),
                prompt: format!("Post {}?", i % 5),
                response_a: "Brief: yes.".into(),
                response_b: "Formally: no.".into(),
                answer: c,
                user_id: Some(format!("u{}", i % 3)),
                latent_summary: Some(say(c).into()),
            }
        })
        .collect();
    let eval_path = dir.path().join("eval.jsonl");
    std::fs::write(&eval_path, jsonl(&records)).unwrap();
    let report = eval::run(&EvalConfig {
        policy: Some(model.clone()),
        // The same policy again: a paired difference of exactly nothing.
        compare: Some(model),
        judge: judge_dir,
        data: eval_path,
        setting: EvalSetting::Streaming,
        window: 2,
        max_new_tokens: 6,
        batch_size: 16,
        device: Device::Cpu,
    })
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let latent = report.latent_summary.as_ref().unwrap();
    assert!(latent.acc_jud >= 0.95, "the judge follows the true summary: {latent:?}");
    assert!(
        (report.no_summary.acc_jud - 0.5).abs() <= 0.2,
        "no summary is near chance: {:?}",
        report.no_summary
    );
    // The untrained policy writes no <answer> for the one distinct history: scored as none.
    assert_eq!((report.histories, report.answer_failures), (1, 1));
    let policy = report.policy.as_ref().unwrap();
    assert_eq!(policy.acc_jud, report.no_summary.acc_jud);
    let paired = report.compared.as_ref().unwrap();
    assert_eq!((paired.difference, paired.standard_error, paired.better, paired.worse), (0.0, 0.0, 0, 0));
    assert_eq!(paired.score.acc_jud, policy.acc_jud);
}
