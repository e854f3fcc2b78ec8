//! The consumer's ONNX Runtime generation against the trainer's tch generation of the
//! same weights: greedy decoding must agree token for token, at batch 1 and batched with
//! prompts of different lengths (left padding, rows leaving the batch as they finish).
//! Also the `Engine` adapter (BOS from the tokenizer config, stop strings) and the
//! `generate` command.

use std::path::Path;

use alignx_consumer::engine::{Engine, UpdateRequest};
use alignx_consumer::onnx_engine::{OnnxEngine, ServeOptions};
use alignx_consumer::onnx_model::{DeviceChoice, Finish, OnnxModel};
use alignx_consumer::onnx_runtime;
use alignx_consumer::sampler::SamplingParams;
use alignx_trainer::generate::{self, SamplingParams as TchParams};
use alignx_trainer::init::{Preset, init};
use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::onnx::export::{self, ExportDtype, KvLayout};
use tch::Device;

fn serve(device: DeviceChoice, max_new_tokens: usize) -> ServeOptions {
    ServeOptions { device, threads: 1, sampling: None, max_new_tokens, max_rows: 8 }
}

/// A tiny random model (its tokenizer trained on a small corpus) and its ONNX export.
fn tiny(dir: &Path, dtype: ExportDtype) -> (std::path::PathBuf, std::path::PathBuf) {
    tiny_in(dir, dtype, KvLayout::Optimum)
}

fn tiny_in(dir: &Path, dtype: ExportDtype, kv_layout: KvLayout) -> (std::path::PathBuf, std::path::PathBuf) {
    let corpus = dir.join("corpus.txt");
    let text: String = (0..400)
        .map(|i| {
            format!(
                "User {i} likes short answers with examples; <answer>concise</answer> Assistant: <think> ok "
            )
        })
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let model = dir.join("model");
    init(&corpus, &Preset::Tiny.shape(), 3, &model, false).unwrap();
    let onnx = match kv_layout {
        KvLayout::Optimum => dir.join(format!("onnx-{dtype:?}")),
        KvLayout::Shared => dir.join(format!("onnx-{dtype:?}-shared")),
    };
    export::export(&model, &onnx, &export::ExportOptions { dtype, kv_layout, ..Default::default() }).unwrap();
    (model, onnx)
}

#[test]
fn greedy_generation_matches_the_trainer_token_for_token() {
    greedy_generation_matches_the_trainer(KvLayout::Optimum);
}

/// The same with the cache in fixed buffers updated in place (`GroupQueryAttention`):
/// right padding, per-row lengths, rows leaving the batch.
#[test]
fn greedy_generation_with_the_shared_cache_matches_the_trainer_token_for_token() {
    greedy_generation_matches_the_trainer(KvLayout::Shared);
}

fn greedy_generation_matches_the_trainer(kv_layout: KvLayout) {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, onnx_dir) = tiny_in(dir.path(), ExportDtype::Fp32, kv_layout);
    let loaded = model_dir::load(&model_dir, Device::Cpu, Dtype::Fp32).unwrap();
    let runtime = onnx_runtime::init(None).unwrap();
    let onnx = OnnxModel::load(runtime, &onnx_dir, DeviceChoice::Cpu, 1).unwrap();
    assert_eq!(onnx.provider, "cpu");

    let texts = [
        "A conversation between User and Assistant. User: likes",
        "short",
        "User 7 likes short answers with examples; <answer>",
        "Assistant: <think> the user 12 likes",
    ];
    let prompts: Vec<Vec<u32>> =
        texts.iter().map(|t| loaded.tokenizer.encode(*t, false).unwrap().get_ids().to_vec()).collect();
    let max_new = 24;
    let tch_out = |ps: &[Vec<u32>]| -> Vec<Vec<u32>> {
        let ids: Vec<Vec<i64>> = ps.iter().map(|p| p.iter().map(|&t| i64::from(t)).collect()).collect();
        generate::generate(
            &loaded.model,
            &ids,
            &TchParams::greedy(max_new),
            &loaded.eos,
            |_, _| false,
            Device::Cpu,
        )
        .into_iter()
        .map(|g| g.tokens.into_iter().map(|t| t as u32).collect())
        .collect()
    };
    let ort_out = |ps: &[Vec<u32>]| -> Vec<Vec<u32>> {
        let params = vec![SamplingParams::greedy(max_new); ps.len()];
        let seeds = vec![0; ps.len()];
        let (out, timings) = onnx.generate(ps, &params, &seeds, |_, _| false).unwrap();
        assert!(timings.prefill_s > 0.0);
        out.into_iter().map(|o| o.tokens).collect()
    };
    for p in &prompts {
        assert_eq!(ort_out(std::slice::from_ref(p)), tch_out(std::slice::from_ref(p)), "batch 1: {p:?}");
    }
    // An export with logits for the last position only generates the same tokens.
    let last_dir = dir.path().join("onnx-last");
    let options = export::ExportOptions { logits: export::Logits::Last, kv_layout, ..Default::default() };
    export::export(&model_dir, &last_dir, &options).unwrap();
    let last = OnnxModel::load(runtime, &last_dir, DeviceChoice::Cpu, 1).unwrap();
    let params = vec![SamplingParams::greedy(max_new); prompts.len()];
    let (last_out, _) = last.generate(&prompts, &params, &vec![0; prompts.len()], |_, _| false).unwrap();
    assert_eq!(last_out.into_iter().map(|o| o.tokens).collect::<Vec<_>>(), tch_out(&prompts), "logits=last");
    let batched = ort_out(&prompts);
    println!("lengths: {:?}", batched.iter().map(Vec::len).collect::<Vec<_>>());
    assert!(
        batched.iter().filter(|r| r.len() > 5).count() >= 2,
        "long enough to mean something: {batched:?}"
    );
    assert_eq!(batched, tch_out(&prompts), "batched, mixed lengths");
    // And batching changes nothing for any row.
    for (p, row) in prompts.iter().zip(&batched) {
        assert_eq!(&ort_out(std::slice::from_ref(p))[0], row);
    }
}

/// Requests that join a running batch mid-generation (their caches left-padded to the
/// batch's length) get exactly the tokens they get alone; with fewer rows than requests
/// the rest wait their turn.
#[test]
fn continuous_batching_admits_requests_mid_generation_without_changing_them() {
    continuous_batching_changes_no_request(KvLayout::Optimum);
}

/// The same with the shared cache: joining rows widen the buffers, each row keeps its
/// own length.
#[test]
fn continuous_batching_with_the_shared_cache_changes_no_request() {
    continuous_batching_changes_no_request(KvLayout::Shared);
}

fn continuous_batching_changes_no_request(kv_layout: KvLayout) {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, onnx_dir) = tiny_in(dir.path(), ExportDtype::Fp32, kv_layout);
    let loaded = model_dir::load(&model_dir, Device::Cpu, Dtype::Fp32).unwrap();
    let runtime = onnx_runtime::init(None).unwrap();
    let texts = [
        "A conversation between User and",
        "short",
        "User 7 likes short answers with examples;",
        "Assistant: <think> the",
    ];
    let prompts: Vec<Vec<u32>> =
        texts.iter().map(|t| loaded.tokenizer.encode(*t, false).unwrap().get_ids().to_vec()).collect();
    // The first row runs long, so the later requests arrive while it is generating.
    let params = [
        SamplingParams::greedy(160),
        SamplingParams::greedy(6),
        SamplingParams::greedy(20),
        SamplingParams::greedy(25),
    ];
    let model = std::sync::Arc::new(OnnxModel::load(runtime, &onnx_dir, DeviceChoice::Cpu, 1).unwrap());
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&params)
        .map(|(p, params)| {
            model
                .generate(std::slice::from_ref(p), &[*params], &[0], |_, _| false)
                .unwrap()
                .0
                .remove(0)
                .tokens
        })
        .collect();
    for max_rows in [8, 2] {
        let batcher = model.clone().continuous(max_rows, None);
        let never: alignx_consumer::onnx_model::StopFn = std::sync::Arc::new(|_: &[u32]| false);
        let (first, second) = std::thread::scope(|s| {
            let first = s.spawn(|| batcher.generate(&prompts[..2], &params[..2], &[0, 0], never.clone()));
            std::thread::sleep(std::time::Duration::from_millis(15));
            let second = batcher.generate(&prompts[2..], &params[2..], &[0, 0], never.clone());
            (first.join().unwrap(), second)
        });
        let mut got: Vec<Vec<u32>> = first.into_iter().map(|o| o.unwrap().tokens).collect();
        got.extend(second.into_iter().map(|o| o.unwrap().tokens));
        assert_eq!(got, alone, "max_rows {max_rows}");
    }
}

#[test]
fn fp16_exports_generate_and_rows_finish_independently() {
    fp16_generates(KvLayout::Optimum);
}

#[test]
fn fp16_shared_cache_exports_generate_and_rows_finish_independently() {
    fp16_generates(KvLayout::Shared);
}

fn fp16_generates(kv_layout: KvLayout) {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx_dir) = tiny_in(dir.path(), ExportDtype::Fp16, kv_layout);
    let runtime = onnx_runtime::init(None).unwrap();
    let onnx = OnnxModel::load(runtime, &onnx_dir, DeviceChoice::Cpu, 1).unwrap();
    let prompts = vec![vec![5, 6, 7], vec![8, 9]];
    let params = [SamplingParams::greedy(3), SamplingParams::greedy(9)];
    let (out, _) = onnx.generate(&prompts, &params, &[1, 2], |_, _| false).unwrap();
    for (o, p) in out.iter().zip(&params) {
        assert!(o.finish == Finish::Eos || o.tokens.len() == p.max_new_tokens, "{o:?}");
    }
    // Sampling is reproducible from the seed.
    let sampled = [SamplingParams { temperature: 1.0, top_k: 50, ..SamplingParams::greedy(12) }; 2];
    let a = onnx.generate(&prompts, &sampled, &[7, 8], |_, _| false).unwrap().0;
    let b = onnx.generate(&prompts, &sampled, &[7, 8], |_, _| false).unwrap().0;
    assert_eq!(a, b);
}

#[test]
fn the_engine_renders_with_the_models_bos_and_stops_at_stop_strings() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx_dir) = tiny(dir.path(), ExportDtype::Fp32);
    let runtime = onnx_runtime::init(None).unwrap();
    let engine = OnnxEngine::load(runtime, &onnx_dir, &serve(DeviceChoice::Auto, 40), None).unwrap();
    assert_eq!(engine.bos(), "<|begin_of_text|>", "from tokenizer_config.json");
    assert_eq!(engine.provider(), "cpu", "no GPU here: auto falls back to the CPU");
    let request = |seed| UpdateRequest {
        user_id: "u".into(),
        prompt: "<|begin_of_text|>A conversation between User and Assistant. User: hi\nAssistant: <think>"
            .into(),
        previous_summary: None,
        kinds: vec![],
        seed,
    };
    let out: Vec<_> =
        engine.generate(&[request(1), request(2)]).unwrap().into_iter().map(Result::unwrap).collect();
    for g in &out {
        assert!(g.prompt_tokens > 5 && g.generated_tokens >= 1 && g.generated_tokens <= 40, "{g:?}");
        // A stop string ends the text if it appears at all.
        for stop in alignx_consumer::onnx_engine::STOP_STRINGS {
            if let Some(i) = g.text.find(stop) {
                assert_eq!(i + stop.len(), g.text.len(), "text continues after {stop:?}: {:?}", g.text);
            }
        }
    }
}

#[test]
fn a_prompt_too_long_for_the_context_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx_dir) = tiny(dir.path(), ExportDtype::Fp32);
    let runtime = onnx_runtime::init(None).unwrap();
    let engine = OnnxEngine::load(runtime, &onnx_dir, &serve(DeviceChoice::Cpu, 40), None).unwrap();
    assert_eq!(engine.max_prompt_tokens(), Some(2048 - 40), "the context less the generation budget");
    let request = |prompt: String| UpdateRequest {
        user_id: "u".into(),
        prompt,
        previous_summary: None,
        kinds: vec![],
        seed: 0,
    };
    let long = "likes short answers with examples ".repeat(800);
    assert!(engine.count_tokens(&long) > 2048);
    let out = engine.generate(&[request(long), request("User: hi\nAssistant: <think>".into())]).unwrap();
    assert!(out[0].as_ref().unwrap_err().to_string().contains("does not fit"), "{:?}", out[0]);
    assert!(out[1].is_ok(), "the other request of the batch is unaffected");
}

#[test]
fn a_model_dir_missing_pieces_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = onnx_runtime::init(None).unwrap();
    let err = OnnxModel::load(runtime, dir.path(), DeviceChoice::Cpu, 1).err().unwrap();
    assert!(err.to_string().contains("model.onnx is missing"), "{err}");
    let (_, onnx_dir) = tiny(dir.path(), ExportDtype::Fp32);
    std::fs::remove_file(onnx_dir.join("tokenizer.json")).unwrap();
    let err = OnnxEngine::load(runtime, &onnx_dir, &serve(DeviceChoice::Cpu, 8), None).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json is missing"), "{err}");
    let err = OnnxModel::load(runtime, &onnx_dir, DeviceChoice::Cuda, 1).err().unwrap();
    assert!(err.to_string().contains("CUDA"), "--device cuda fails loudly: {err}");
}

/// `alignx-consumer run --engine onnx` end to end on a tiny random model (exported with
/// the shared cache, as the recipe ships its policy): every signal is consumed (its
/// windows applied or, as this untrained model writes no `<answer>`, given up after the
/// retries), and the inference log holds the model's real generations.
#[test]
fn the_pipeline_serves_an_exported_model() {
    use alignx_schemas::inference_log::InferenceLogRecord;
    use alignx_schemas::keys;
    use alignx_tests::services::{http_get, start_redis, start_tansu};
    use alignx_tests::stream::{
        ConsumerProcess, consumed_total, create_topics, expected_counts, produce, read_topic, scenario,
    };

    let dir = tempfile::tempdir().unwrap();
    let (_, onnx_dir) = tiny_in(dir.path(), ExportDtype::Fp32, KvLayout::Shared);
    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 2).unwrap();
    let redis = start_redis().unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let mut messages = scenario(6, 24, 0, 3);
    // A user whose latest signal is longer than the model's context: the prompt drops the
    // older signal, still does not fit, and that update fails alone.
    for (i, text) in
        ["short and sweet".to_owned(), "likes short answers with examples ".repeat(400)].iter().enumerate()
    {
        let payload = format!(
            r#"{{"schema":"alignx.signal.v1","user_id":"verbose","signal_id":"v{i}","ts":"2026-11-27T10:00:00Z","kind":"text","text":"{text}"}}"#
        );
        messages.push(alignx_tests::stream::Produced {
            key: "verbose".into(),
            payload: payload.into_bytes(),
            kind: Some("text"),
            reason: None,
        });
    }
    produce(&brokers, &messages).unwrap();
    let model = onnx_dir.to_str().unwrap();
    let mut consumer = ConsumerProcess::start(
        &brokers,
        &redis_url,
        &[
            "--engine",
            "onnx",
            "--model-dir",
            model,
            "--device",
            "cpu",
            "--max-new-tokens",
            "12",
            "--window-size",
            "2",
        ],
    )
    .unwrap();

    let expected = expected_counts(&messages);
    let want: u64 = expected.values().map(|c| c.iter().sum::<u64>()).sum();
    let mut r = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        assert!(consumer.is_running(), "{}", consumer.log());
        let users: Vec<&String> = expected.keys().collect();
        let consumed = consumed_total(&mut r, &users).unwrap();
        if consumed == want {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{consumed} of {want} consumed:\n{}", consumer.log());
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let log = read_topic(&brokers, keys::INFERENCE_LOG_TOPIC).unwrap();
    assert!(!log.is_empty());
    for record in &log {
        let rec: InferenceLogRecord = serde_json::from_slice(&record.payload).unwrap();
        assert_eq!(rec.model, "onnx-Fp32-shared", "the model directory names the version");
        assert!(rec.prompt.starts_with("<|begin_of_text|>A conversation between User and Assistant."));
        assert!(rec.prompt.ends_with("\nAssistant: <think>"));
        if rec.user_id == "verbose" {
            assert_eq!(rec.outcome, alignx_schemas::inference_log::UpdateOutcome::EngineError);
            assert!(!rec.prompt.contains("short and sweet"), "the older signal was left out of the prompt");
            continue;
        }
        assert!(
            rec.generated_tokens >= 1 && rec.generated_tokens <= 12,
            "{}: {:?}",
            rec.user_id,
            rec.outcome
        );
        assert!(!rec.generation.is_empty());
    }
    let (_, metrics) = http_get(consumer.metrics, "/metrics").unwrap();
    assert!(metrics.contains(r#"alignx_model_info{model="onnx-Fp32-shared",provider="cpu"} 1"#), "{metrics}");
    let prefills = metrics
        .lines()
        .find(|l| l.starts_with(r#"alignx_engine_seconds_count{phase="prefill"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(prefills > 0.0, "engine time is measured by phase");
    // Cut on each of its 3 attempts (engine errors are retried like failed generations).
    assert!(
        metrics.contains("alignx_prompt_truncations_total 3"),
        "the verbose user's prompt was cut: {metrics}"
    );
    assert!(consumer.terminate(std::time::Duration::from_secs(30)).unwrap().success());
}

/// Hot reload: re-pointing the `--model-dir` symlink, then setting `alignx:model:current`,
/// switches the served model between batches; every signal is consumed exactly once and
/// each log record names the model that generated it.
#[test]
fn a_new_model_version_is_swapped_in_without_losing_work() {
    use alignx_schemas::inference_log::InferenceLogRecord;
    use alignx_schemas::keys;
    use alignx_tests::services::{http_get, start_redis, start_tansu};
    use alignx_tests::stream::{
        ConsumerProcess, Produced, consumed_total, create_topics, produce, read_topic,
    };
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (_, first) = tiny(dir.path(), ExportDtype::Fp32);
    let versions: Vec<std::path::PathBuf> = ["v1", "v2", "v3"]
        .iter()
        .map(|v| {
            let to = dir.path().join(v);
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(&first).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
            to
        })
        .collect();
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(&versions[0], &current).unwrap();
    let config = dir.path().join("consumer.toml");
    std::fs::write(&config, "[engine]\nmax_retries = 1\n").unwrap();

    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 2).unwrap();
    let redis = start_redis().unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let mut consumer = ConsumerProcess::start(
        &brokers,
        &redis_url,
        &[
            "--config",
            config.to_str().unwrap(),
            "--engine",
            "onnx",
            "--model-dir",
            current.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--window-size",
            "1",
            "--reload-interval",
            "200ms",
        ],
    )
    .unwrap();
    let mut r = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let batch = |tag: &str| -> Vec<Produced> {
        (0..8)
            .map(|i| {
                let user = format!("user-{}", i % 4);
                let payload = format!(
                    r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"{tag}{i}","ts":"2026-11-27T10:00:00Z","kind":"text","text":"likes {tag}"}}"#
                );
                Produced { key: user, payload: payload.into_bytes(), kind: Some("text"), reason: None }
            })
            .collect()
    };
    let mut sent = 0u64;
    let consumer_done = |r: &mut redis::Connection, sent: u64, consumer: &mut ConsumerProcess| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(consumer.is_running(), "{}", consumer.log());
            let users: Vec<String> = (0..4).map(|u| format!("user-{u}")).collect();
            let consumed = consumed_total(r, &users).unwrap();
            if consumed == sent {
                return;
            }
            assert!(
                consumed < sent && Instant::now() < deadline,
                "{consumed} of {sent}:\n{}",
                consumer.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let wait_serving = |model: &str, consumer: &mut ConsumerProcess| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = format!(r#"alignx_model_info{{model="{model}",provider="cpu"}} 1"#);
        while !http_get(consumer.metrics, "/metrics").unwrap().1.contains(&want) {
            assert!(Instant::now() < deadline, "{model} never served:\n{}", consumer.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    produce(&brokers, &batch("a")).unwrap();
    sent += 8;
    consumer_done(&mut r, sent, &mut consumer);
    // Re-point the symlink atomically (rename over it), as a deployment would.
    let next = dir.path().join("current.next");
    std::os::unix::fs::symlink(&versions[1], &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    wait_serving("v2", &mut consumer);
    produce(&brokers, &batch("b")).unwrap();
    sent += 8;
    consumer_done(&mut r, sent, &mut consumer);
    // The Redis pointer wins over the directory.
    let _: () =
        redis::cmd("SET").arg(keys::MODEL_POINTER).arg(versions[2].to_str().unwrap()).query(&mut r).unwrap();
    wait_serving("v3", &mut consumer);
    produce(&brokers, &batch("c")).unwrap();
    sent += 8;
    consumer_done(&mut r, sent, &mut consumer);

    let mut seen = std::collections::HashSet::new();
    for record in read_topic(&brokers, keys::INFERENCE_LOG_TOPIC).unwrap() {
        let rec: InferenceLogRecord = serde_json::from_slice(&record.payload).unwrap();
        let id = &rec.signals[0].signal.signal_id;
        let want = match &id[..1] {
            "a" => "v1",
            "b" => "v2",
            _ => "v3",
        };
        assert_eq!(rec.model, want, "signal {id}");
        assert!(seen.insert(id.clone()), "signal {id} logged twice");
    }
    assert_eq!(seen.len() as u64, sent, "one record per signal (window size 1)");
    assert!(
        !http_get(consumer.metrics, "/metrics").unwrap().1.contains(r#"model="v1""#),
        "the old series is gone"
    );
}

/// The consumer e2e on a model that has learnt the output format: the tiny model is
/// fine-tuned (SFT, ~2 minutes on this 2-core CPU) to answer `<answer>Prefers concise
/// answers.</answer>`, exported, and served — summaries in Redis are parsed from its
/// real generations.
#[test]
fn a_fine_tuned_model_writes_the_summaries() {
    use alignx_schemas::keys::UserKeys;
    use alignx_schemas::prompt::{Evidence, Setting, Templates};
    use alignx_schemas::{Limits, validate_signal};
    use alignx_tests::services::{start_redis, start_tansu};
    use alignx_tests::stream::{ConsumerProcess, create_topics, expected_counts, produce, scenario};
    use alignx_trainer::sft::{self, SftConfig};

    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, _) = tiny(dir.path(), ExportDtype::Fp32);
    // Cold-start data in the consumer's own prompt format, from a synthetic stream.
    let templates = Templates::default();
    let stream = scenario(16, 64, 0, 21);
    let mut data = String::new();
    for (i, chunk) in stream.chunks(2).enumerate() {
        let signals: Vec<_> = chunk
            .iter()
            .map(|m| validate_signal(&m.payload, Some(m.key.as_bytes()), &Limits::default()).unwrap())
            .collect();
        let past = (i % 2 == 1).then_some("Prefers concise answers.");
        let prompt = templates.render(
            "<|begin_of_text|>",
            Setting::Streaming { past },
            &Evidence::from_signals(&signals),
        );
        let response = " The user is brief. </think> <answer>Prefers concise answers.</answer>";
        data.push_str(&serde_json::json!({"prompt": prompt, "response": response}).to_string());
        data.push('\n');
    }
    let data_path = dir.path().join("cold_start.jsonl");
    std::fs::write(&data_path, data).unwrap();
    let tuned = dir.path().join("tuned");
    let summary = sft::run(&SftConfig {
        epochs: 30,
        max_steps: Some(120),
        lr: 3e-3,
        warmup_steps: 5,
        seed: 1,
        ..SftConfig::new(model_dir, data_path, &tuned)
    })
    .unwrap();
    let last = summary.losses.last().copied().unwrap();
    println!(
        "sft: {} steps, {} tokens in {:.1}s ({:.0} tok/s)",
        summary.steps, summary.tokens, summary.seconds, summary.tokens_per_second
    );
    assert!(last < 0.5, "the format is learnt: loss {:?} → {last}", summary.losses.first());
    let served = dir.path().join("tuned-onnx");
    let options = export::ExportOptions { logits: export::Logits::Last, ..Default::default() };
    export::export(&tuned, &served, &options).unwrap();

    let broker = start_tansu().unwrap();
    let brokers = broker.addr().to_string();
    create_topics(&brokers, 2).unwrap();
    let redis = start_redis().unwrap();
    let redis_url = format!("redis://{}/", redis.addr());
    let messages = scenario(5, 20, 0, 4);
    produce(&brokers, &messages).unwrap();
    let mut consumer = ConsumerProcess::start(
        &brokers,
        &redis_url,
        &[
            "--engine",
            "onnx",
            "--model-dir",
            served.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-new-tokens",
            "40",
        ],
    )
    .unwrap();
    let expected = expected_counts(&messages);
    let mut r = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        assert!(consumer.is_running(), "{}", consumer.log());
        let states: Vec<(Option<u64>, Option<u64>, Option<String>)> = expected
            .keys()
            .map(|u| {
                redis::cmd("HMGET")
                    .arg(UserKeys::new(u).summary)
                    .arg("signals_applied")
                    .arg("signals_failed")
                    .arg("summary")
                    .query(&mut r)
                    .unwrap()
            })
            .collect();
        let consumed: u64 = states.iter().map(|(a, f, _)| a.unwrap_or(0) + f.unwrap_or(0)).sum();
        if consumed == messages.len() as u64 {
            let summaries: Vec<&str> = states.iter().filter_map(|(_, _, s)| s.as_deref()).collect();
            assert!(!summaries.is_empty(), "no user got a summary");
            assert!(summaries.iter().all(|s| *s == "Prefers concise answers."), "{summaries:?}");
            let applied: u64 = states.iter().map(|(a, _, _)| a.unwrap_or(0)).sum();
            println!(
                "{applied} of {consumed} signals applied through real generations; summaries {summaries:?}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{consumed} consumed:\n{}", consumer.log());
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}
