//! `make bench` (engine part): generation tokens/s of the consumer's ONNX Runtime engine
//! at batch 1, 8 and 32 — with the cache in fixed buffers updated in place
//! (`export-onnx --kv-cache shared`) and in Hugging Face Optimum's layout (past + new
//! concatenated each step) — side by side in one run with the same weights generated
//! (a) by ONNX Runtime without a KV cache (the whole sequence recomputed per token) and
//! (b) by the trainer's tch generation — one CPU thread each, greedy, 200-token prompts,
//! 128 new tokens, a ~5M-parameter Qwen2 (hidden 256, 4 layers, vocab 4096). Also where
//! the engine's time goes (prefill, decode, sampling; tokenisation measured apart).
//! JSON to the path given as the first argument.
//!
//! On a GPU machine: `ALIGNX_BENCH_DEVICE=cuda` runs both engines on CUDA, and
//! `ALIGNX_BENCH_MODEL=qwen2-0.5b` swaps in Qwen2-0.5B's body (hidden 896, 24 layers,
//! 14 heads, 2 KV heads) in fp16 with random weights — the size of model this service is
//! meant to serve. `ALIGNX_BENCH_WORKDIR` keeps the model directories (for a peer to
//! load the same weights).

use std::path::Path;
use std::time::Instant;

use alignx_consumer::onnx_model::{DeviceChoice, OnnxModel};
use alignx_consumer::onnx_runtime;
use alignx_consumer::sampler::{SamplingParams, argmax};
use alignx_trainer::generate::{self, SamplingParams as TchParams};
use alignx_trainer::init::{Shape, init};
use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::onnx::export::{self, ExportDtype};
use alignx_trainer::rng::Rng;
use ort::value::{DynValue, Tensor};
use serde_json::{Value, json};

const PROMPT: usize = 200;
const NEW: usize = 128;

fn corpus(path: &Path) {
    let syllables =
        ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "xe", "du", "fa", "gi", "he", "jo", "qu", "ve"];
    let mut rng = Rng::new(1);
    let mut text = String::new();
    for _ in 0..60_000 {
        let n = 1 + rng.next_u64() % 4;
        for _ in 0..n {
            text.push_str(syllables[(rng.next_u64() % syllables.len() as u64) as usize]);
        }
        text.push(if rng.next_u64().is_multiple_of(12) { '\n' } else { ' ' });
    }
    std::fs::write(path, text).unwrap();
}

/// No generation stops early: EOS removed from the served configs.
fn without_eos(dir: &Path) {
    for file in ["config.json", "generation_config.json"] {
        let path = dir.join(file);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("eos_token_id");
        std::fs::write(&path, v.to_string()).unwrap();
    }
}

fn prompts(batch: usize, vocab: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(batch as u64);
    (0..batch).map(|_| (0..PROMPT).map(|_| 10 + (rng.next_u64() % (vocab - 10)) as u32).collect()).collect()
}

/// ONNX Runtime without a KV cache: every step runs the whole sequence (empty past).
fn no_cache(
    session: &mut ort::session::Session,
    layers: usize,
    kv_heads: i64,
    head_dim: i64,
    prompt: &[u32],
) -> usize {
    let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    for _ in 0..NEW {
        let n = ids.len() as i64;
        let mut inputs: Vec<(String, DynValue)> = vec![
            ("input_ids".into(), Tensor::from_array((vec![1, n], ids.clone())).unwrap().into_dyn()),
            (
                "attention_mask".into(),
                Tensor::from_array((vec![1, n], vec![1i64; n as usize])).unwrap().into_dyn(),
            ),
            (
                "position_ids".into(),
                Tensor::from_array((vec![1, n], (0..n).collect::<Vec<i64>>())).unwrap().into_dyn(),
            ),
        ];
        for i in 0..layers {
            for kind in ["key", "value"] {
                let empty = Tensor::from_array((vec![1, kv_heads, 0, head_dim], Vec::<f32>::new())).unwrap();
                inputs.push((format!("past_key_values.{i}.{kind}"), empty.into_dyn()));
            }
        }
        let out = session.run(inputs).unwrap();
        let (shape, logits) = out["logits"].try_extract_tensor::<f32>().unwrap();
        let (seq, vocab) = (shape[1] as usize, shape[2] as usize);
        let last = &logits[(seq - 1) * vocab..seq * vocab];
        ids.push(argmax(last) as i64);
    }
    NEW
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/engine.json".into());
    let cuda = match std::env::var("ALIGNX_BENCH_DEVICE").as_deref() {
        Ok("cuda") => true,
        Ok("cpu") | Err(_) => false,
        Ok(other) => panic!("ALIGNX_BENCH_DEVICE={other}: cpu or cuda"),
    };
    let large = match std::env::var("ALIGNX_BENCH_MODEL").as_deref() {
        Ok("qwen2-0.5b") => true,
        Ok("small") | Err(_) => false,
        Ok(other) => panic!("ALIGNX_BENCH_MODEL={other}: small or qwen2-0.5b"),
    };
    let (tch_device, device, dtype, export_dtype) = if cuda {
        {
            // The trainer's resolver loads libtorch_cuda.so, which nothing links directly.
            let tch = alignx_trainer::device::resolve(alignx_trainer::device::DeviceChoice::Cuda).unwrap();
            (tch, DeviceChoice::Cuda, Dtype::Fp16, ExportDtype::Fp16)
        }
    } else {
        (tch::Device::Cpu, DeviceChoice::Cpu, Dtype::Fp32, ExportDtype::Fp32)
    };
    tch::set_num_threads(1);
    let temp = tempfile::tempdir().unwrap();
    let work = std::env::var_os("ALIGNX_BENCH_WORKDIR").map_or_else(|| temp.path().to_owned(), Into::into);
    std::fs::create_dir_all(&work).unwrap();
    let corpus_path = work.join("corpus.txt");
    corpus(&corpus_path);
    let shape = if large {
        Shape {
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: 2,
            vocab_size: 32_768,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
        }
    } else {
        Shape {
            hidden_size: 256,
            intermediate_size: 1024,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 4096,
            max_position_embeddings: 1024,
            tie_word_embeddings: true,
        }
    };
    let model_dir = work.join("model");
    let config = init(&corpus_path, &shape, 0, &model_dir, true).unwrap();
    // Served as the consumer would be: logits for the last position only.
    let exported = |layout: export::KvLayout, name: &str| {
        let dir = work.join(name);
        let options = export::ExportOptions {
            dtype: export_dtype,
            logits: export::Logits::Last,
            kv_layout: layout,
            ..Default::default()
        };
        export::export(&model_dir, &dir, &options).unwrap();
        without_eos(&dir);
        dir
    };
    let onnx_dir = exported(export::KvLayout::Optimum, "onnx");
    let shared_dir = exported(export::KvLayout::Shared, "onnx-shared");
    let vocab = config.vocab_size as u64;
    let loaded = model_dir::load(&model_dir, tch_device, dtype).unwrap();
    let params: i64 = loaded.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    eprintln!("model: {params} parameters, vocab {vocab}, device {device:?}, dtype {dtype:?}");

    let runtime = onnx_runtime::init(None).unwrap();
    let model = OnnxModel::load(runtime, &onnx_dir, device, 1).unwrap();
    let shared = OnnxModel::load(runtime, &shared_dir, device, 1).unwrap();
    assert_eq!(model.provider, if cuda { "cuda" } else { "cpu" });
    assert_eq!(shared.provider, model.provider);
    let mut rows = Vec::new();
    for batch in [1usize, 8, 32] {
        let ps = prompts(batch, vocab);
        let greedy = vec![SamplingParams::greedy(NEW); batch];
        let run = |m: &OnnxModel| {
            let t = Instant::now();
            let (outs, timings) = m.generate(&ps, &greedy, &vec![0; batch], |_, _| false).unwrap();
            (outs, timings, t.elapsed().as_secs_f64())
        };
        let (shared_outs, shared_timings, shared_s) = run(&shared);
        let shared_tokens: usize = shared_outs.iter().map(|o| o.tokens.len()).sum();
        let (outs, timings, ort_s) = run(&model);
        let ort_tokens: usize = outs.iter().map(|o| o.tokens.len()).sum();

        let ids: Vec<Vec<i64>> = ps.iter().map(|p| p.iter().map(|&t| i64::from(t)).collect()).collect();
        let t = Instant::now();
        let tch_out =
            generate::generate(&loaded.model, &ids, &TchParams::greedy(NEW), &[], |_, _| false, tch_device);
        let tch_s = t.elapsed().as_secs_f64();
        let tch_tokens: usize = tch_out.iter().map(|g| g.tokens.len()).sum();
        let same_as_tch = |outs: &[alignx_consumer::onnx_model::Output]| {
            outs.iter()
                .zip(&tch_out)
                .all(|(o, g)| o.tokens.iter().map(|&t| i64::from(t)).eq(g.tokens.iter().copied()))
        };
        let phases = |tokens: usize, s: f64, t: &alignx_consumer::onnx_model::Timings| {
            json!({ "tokens": tokens, "seconds": s, "tokens_per_second": tokens as f64 / s,
                "prefill_seconds": t.prefill_s, "decode_seconds": t.decode_s, "sampling_seconds": t.sampling_s })
        };
        let (shared_tps, ort_tps, tch_tps) =
            (shared_tokens as f64 / shared_s, ort_tokens as f64 / ort_s, tch_tokens as f64 / tch_s);
        let row = json!({
            "batch": batch,
            "onnx_shared_kv_cache": phases(shared_tokens, shared_s, &shared_timings),
            "onnx_kv_cache": phases(ort_tokens, ort_s, &timings),
            "tch": { "tokens": tch_tokens, "seconds": tch_s, "tokens_per_second": tch_tps },
            "shared_vs_optimum_layout": shared_tps / ort_tps,
            "shared_vs_tch": shared_tps / tch_tps,
            "onnx_vs_tch": ort_tps / tch_tps,
            "greedy_tokens_identical": same_as_tch(&outs) && same_as_tch(&shared_outs),
        });
        eprintln!("{row}");
        rows.push(row);
    }
    // Without a KV cache, batch 1 (it is slow): the small model on the CPU only.
    let no_cache_row = if cuda || large {
        Value::Null
    } else {
        let mut session = runtime
            .session_builder()
            .unwrap()
            .with_intra_threads(1)
            .unwrap()
            .commit_from_file(onnx_dir.join("model.onnx"))
            .unwrap();
        let p = &prompts(1, vocab)[0];
        let t = Instant::now();
        let n = no_cache(&mut session, 4, 2, 64, p);
        let seconds = t.elapsed().as_secs_f64();
        let batch1 = rows[0]["onnx_shared_kv_cache"]["tokens_per_second"].as_f64().unwrap();
        json!({ "tokens_per_second": n as f64 / seconds, "seconds": seconds,
                "kv_cache_speedup": batch1 / (n as f64 / seconds) })
    };
    let p = &prompts(1, vocab)[0];

    // Tokenisation, apart: encoding a ~200-token prompt and decoding 128 tokens.
    let text: String = std::fs::read_to_string(&corpus_path).unwrap().chars().take(700).collect();
    let tokenizer = &loaded.tokenizer;
    let t = Instant::now();
    let reps = 200;
    let mut encoded = 0;
    for _ in 0..reps {
        encoded = tokenizer.encode(text.as_str(), false).unwrap().get_ids().len();
    }
    let encode_s = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        tokenizer.decode(&p[..NEW], false).unwrap();
    }
    let decode_s = t.elapsed().as_secs_f64() / reps as f64;

    let report = json!({
        "model": { "parameters": params, "hidden": shape.hidden_size, "layers": shape.num_hidden_layers,
            "vocab": vocab, "dtype": format!("{dtype:?}"), "export_logits": "last" },
        "device": if cuda { "cuda" } else { "cpu" }, "onnx_provider": model.provider,
        "threads": 1, "prompt_tokens": PROMPT, "new_tokens": NEW, "sampling": "greedy",
        "batches": rows,
        "onnx_no_kv_cache_batch1": no_cache_row,
        "tokenization": { "encode_prompt_seconds": encode_s, "prompt_tokens": encoded, "decode_128_tokens_seconds": decode_s },
        "peer_hf_transformers_reference_tokens_per_second": if cuda || large { Value::Null } else {
            json!({ "batch1": 235.0, "batch32": 1600.0, "batch1_no_cache": 36.0 }) },
    });
    std::fs::create_dir_all(Path::new(&out).parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
