//! The Qwen2 model: the KV cache and left padding change nothing but speed, checkpoints
//! round-trip exactly in the HF layout, and bad configs or weights are named errors.

use std::path::Path;

use alignx_trainer::checkpoint::{self, CheckpointError};
use alignx_trainer::qwen2::{Config, ConfigError, KvCache, Qwen2};
use serde_json::{Value, json};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn config_json(tied: bool) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
        "use_sliding_window": false, "hidden_act": "silu"
    })
}

fn model(tied: bool, seed: i64) -> (VarStore, Qwen2, Value) {
    tch::manual_seed(seed);
    let json = config_json(tied);
    let config: Config = serde_json::from_value(json.clone()).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let m = Qwen2::new(&vs.root(), &config);
    (vs, m, json)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn ids(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).unsqueeze(0)
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    let (_vs, m, _) = model(false, 1);
    let tokens = [5i64, 17, 3, 42, 9, 60, 11];
    let full = tch::no_grad(|| m.forward_full(&ids(&tokens)));
    let mut cache = KvCache::new();
    // Prefill 4, then one token at a time.
    let prefill = tch::no_grad(|| {
        m.forward(
            &ids(&tokens[..4]),
            &Tensor::ones([1, 4], (Kind::Int64, Device::Cpu)),
            &ids(&[0, 1, 2, 3]),
            &mut cache,
        )
    });
    assert!(max_diff(&prefill, &full.narrow(1, 0, 4)) < 1e-5);
    for (i, &t) in tokens.iter().enumerate().skip(4) {
        let mask = Tensor::ones([1, i as i64 + 1], (Kind::Int64, Device::Cpu));
        let step = tch::no_grad(|| m.forward(&ids(&[t]), &mask, &ids(&[i as i64]), &mut cache));
        let d = max_diff(&step, &full.narrow(1, i as i64, 1));
        assert!(d < 1e-5, "step {i}: {d}");
    }
    assert_eq!(cache.past_len(), tokens.len() as i64);
}

#[test]
fn left_padding_leaves_real_positions_unchanged() {
    let (_vs, m, _) = model(true, 2);
    let short = [7i64, 8, 9];
    let long = [1i64, 2, 3, 4, 5];
    let alone = tch::no_grad(|| m.forward_full(&ids(&short)));
    let batch = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 1, 2, 3, 4, 5]).view([2, 5]);
    let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let positions = Tensor::from_slice(&[0i64, 0, 0, 1, 2, 0, 1, 2, 3, 4]).view([2, 5]);
    let out = tch::no_grad(|| m.forward(&batch, &mask, &positions, &mut KvCache::new()));
    assert!(out.isfinite().all().int64_value(&[]) == 1, "padding produced non-finite logits");
    let d = max_diff(&out.get(0).narrow(0, 2, 3), &alone.get(0));
    assert!(d < 1e-5, "padded row differs by {d}");
    let d = max_diff(&out.get(1), &tch::no_grad(|| m.forward_full(&ids(&long))).get(0));
    assert!(d < 1e-5, "unpadded row differs by {d}");
}

#[test]
fn checkpoints_round_trip_tied_and_untied() {
    for tied in [true, false] {
        let (vs, m, json) = model(tied, 3);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        checkpoint::save(&vs, &json, None, &out).unwrap();
        assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
        let config = Config::from_file(&out.join("config.json")).unwrap();
        let vs2 = VarStore::new(Device::Cpu);
        let m2 = Qwen2::new(&vs2.root(), &config);
        checkpoint::load(&vs2, &out).unwrap();
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
        let d = max_diff(&tch::no_grad(|| m.forward_full(&x)), &tch::no_grad(|| m2.forward_full(&x)));
        assert_eq!(d, 0.0, "tied={tied}");
    }
}

#[test]
fn bf16_weights_load_and_run() {
    let (mut vs, m, json) = model(false, 4);
    vs.bfloat16();
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&vs, &json, None, &dir.path().join("m")).unwrap();
    let logits = tch::no_grad(|| m.forward_full(&ids(&[1, 2, 3])));
    assert_eq!(logits.kind(), Kind::Float);
    let config = Config::from_file(&dir.path().join("m/config.json")).unwrap();
    let vs2 = VarStore::new(Device::Cpu);
    let m2 = Qwen2::new(&vs2.root(), &config);
    checkpoint::load(&vs2, &dir.path().join("m")).unwrap();
    // bf16 values widen exactly to f32; the f32 model computes at least as precisely.
    let d = max_diff(&logits, &tch::no_grad(|| m2.forward_full(&ids(&[1, 2, 3]))));
    assert!(d < 0.05, "bf16 vs f32 logits differ by {d}");
    // fp16 runs too (attention scores, softmax and norms stay f32 inside).
    let mut vs2 = vs2;
    vs2.half();
    let half = tch::no_grad(|| m2.forward_full(&ids(&[1, 2, 3])));
    assert!(max_diff(&half, &logits) < 0.05);
}

fn write_config(dir: &Path, patch: Value) -> Result<Config, ConfigError> {
    let mut json = config_json(false);
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            json.as_object_mut().unwrap().remove(k);
        } else {
            json[k] = v.clone();
        }
    }
    let path = dir.join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    Config::from_file(&path)
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = |patch| write_config(dir.path(), patch).unwrap_err().to_string();
    assert!(err(json!({"use_sliding_window": true})).contains("`use_sliding_window`"));
    assert!(err(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})).contains("`rope_scaling`"));
    assert!(err(json!({"rope_theta": null})).contains("`rope_theta` is missing"));
    assert!(err(json!({"hidden_size": null})).contains("missing field `hidden_size`"));
    assert!(err(json!({"num_key_value_heads": 3})).contains("`num_key_value_heads`"));
    assert!(err(json!({"model_type": "llama"})).contains("`model_type`"));
    assert!(err(json!({"layer_types": ["full_attention", "sliding_attention"]})).contains("`layer_types`"));
    // transformers >= 5 writes the RoPE base under rope_parameters.
    let c = write_config(
        dir.path(),
        json!({"rope_theta": null, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}),
    )
    .unwrap();
    assert_eq!(c.rope_theta(), 1e6);
    assert!(write_config(dir.path(), json!({"rope_scaling": null})).is_ok());
}

#[test]
fn weight_errors_name_file_and_tensor() {
    let (vs, _m, json) = model(false, 5);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    checkpoint::save(&vs, &json, None, &out).unwrap();
    let file = out.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();

    // A tensor of the wrong shape.
    let i = tensors.iter().position(|(n, _)| n == "model.norm.weight").unwrap();
    tensors[i].1 = Tensor::ones([31], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&tensors, &file).unwrap();
    match checkpoint::load(&vs, &out).unwrap_err() {
        CheckpointError::Shape { file: f, name, got, want } => {
            assert!(f.ends_with("model.safetensors"));
            assert_eq!((name.as_str(), got, want), ("model.norm.weight", vec![31], vec![32]));
        }
        other => panic!("unexpected {other}"),
    }
    // An unknown tensor.
    tensors[i] = ("model.extra.weight".into(), Tensor::ones([32], (Kind::Float, Device::Cpu)));
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = checkpoint::load(&vs, &out).unwrap_err().to_string();
    assert!(err.contains("unknown tensor `model.extra.weight`"), "{err}");
    // A missing tensor.
    let _removed = tensors.remove(i);
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = checkpoint::load(&vs, &out).unwrap_err().to_string();
    assert!(err.contains("missing 1 tensor(s), e.g. `model.norm.weight`"), "{err}");
}
