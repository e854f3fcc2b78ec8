//! The ONNX export runs in ONNX Runtime (loaded the consumer's way) and computes what
//! the tch model computes: prefill without past, decode steps feeding `present.*` back
//! as `past_key_values.*`, and a left-padded batch. fp32 within 1e-4; fp16 within the
//! tolerance stated below.

use std::path::Path;

use alignx_consumer::onnx_runtime;
use alignx_trainer::checkpoint;
use alignx_trainer::onnx::export::{self, ExportDtype};
use alignx_trainer::qwen2::{Config, KvCache, Qwen2};
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor};
use serde_json::{Value, json};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// fp16 logits may differ from the f32 tch model by this much on these random models
/// (logit magnitudes ~1): fp16 weights and activations, f32 norms/softmax/logits.
const FP16_TOLERANCE: f64 = 2e-2;

fn make_model(dir: &Path, tied: bool, seed: i64) -> (VarStore, Qwen2, Config) {
    tch::manual_seed(seed);
    let json: Value = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 89, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": tied, "eos_token_id": 2, "initializer_range": 0.2
    });
    let config: Config = serde_json::from_value(json.clone()).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = Qwen2::new(&vs.root(), &config);
    checkpoint::save(&vs, &json, None, dir).unwrap();
    (vs, model, config)
}

fn session(dir: &Path) -> Session {
    let runtime = onnx_runtime::init(None).expect("ONNX Runtime loads");
    runtime.session_builder().unwrap().commit_from_file(dir.join(export::MODEL_FILE)).unwrap()
}

fn i64_input(t: &Tensor) -> DynValue {
    let data: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
    OrtTensor::from_array((t.size(), data)).unwrap().into_dyn()
}

fn float_input(t: &Tensor, fp16: bool) -> DynValue {
    let data: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
    if fp16 {
        let half: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
        OrtTensor::from_array((t.size(), half)).unwrap().into_dyn()
    } else {
        OrtTensor::from_array((t.size(), data)).unwrap().into_dyn()
    }
}

/// One ONNX forward: returns logits and the present key/values (as tch tensors, f32).
fn run(
    s: &mut Session,
    c: &Config,
    ids: &Tensor,
    mask: &Tensor,
    pos: &Tensor,
    past: &[Tensor],
    fp16: bool,
) -> (Tensor, Vec<Tensor>) {
    let b = ids.size()[0];
    let mut inputs: Vec<(String, DynValue)> = vec![
        ("input_ids".into(), i64_input(ids)),
        ("attention_mask".into(), i64_input(mask)),
        ("position_ids".into(), i64_input(pos)),
    ];
    for i in 0..c.num_hidden_layers as usize {
        for (j, kind) in ["key", "value"].iter().enumerate() {
            let t = past.get(2 * i + j).map_or_else(
                || Tensor::zeros([b, c.kv_heads(), 0, c.head_dim()], (Kind::Float, Device::Cpu)),
                Tensor::shallow_clone,
            );
            inputs.push((format!("past_key_values.{i}.{kind}"), float_input(&t, fp16)));
        }
    }
    let outputs = s.run(inputs).unwrap();
    let to_tch = |name: &str| -> Tensor {
        let v = &outputs[name];
        if fp16 && name != "logits" {
            let (shape, data) = v.try_extract_tensor::<half::f16>().unwrap();
            let f: Vec<f32> = data.iter().map(|h| h.to_f32()).collect();
            Tensor::from_slice(&f).view(&shape[..])
        } else {
            let (shape, data) = v.try_extract_tensor::<f32>().unwrap();
            Tensor::from_slice(data).view(&shape[..])
        }
    };
    let presents = (0..c.num_hidden_layers)
        .flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")])
        .map(|n| to_tch(&n))
        .collect();
    (to_tch("logits"), presents)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn ones(b: i64, n: i64) -> Tensor {
    Tensor::ones([b, n], (Kind::Int64, Device::Cpu))
}

/// Prefill + 3 decode steps (batch 2), then a left-padded batch; returns the worst diff.
fn parity(dir: &Path, model: &Qwen2, c: &Config, fp16: bool) -> f64 {
    let mut s = session(dir);
    let mut worst = 0f64;
    // Prefill of 5 tokens, no past.
    let ids = Tensor::from_slice(&[3i64, 14, 15, 9, 26, 5, 35, 8, 9, 7]).view([2, 5]);
    let pos = Tensor::arange(5, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
    let mut cache = KvCache::new();
    let want = tch::no_grad(|| model.forward(&ids, &ones(2, 5), &pos, &mut cache));
    let (got, mut past) = run(&mut s, c, &ids, &ones(2, 5), &pos, &[], fp16);
    worst = worst.max(max_diff(&got, &want));
    // Decode: one token per row per step, presents fed back as past.
    for step in 0..3i64 {
        let next = Tensor::from_slice(&[40 + step, 50 + step]).view([2, 1]);
        let p = Tensor::from_slice(&[5 + step, 5 + step]).view([2, 1]);
        let mask = ones(2, 6 + step);
        let want = tch::no_grad(|| model.forward(&next, &mask, &p, &mut cache));
        let (got, present) = run(&mut s, c, &next, &mask, &p, &past, fp16);
        assert_eq!(present[0].size()[2], 6 + step, "present grows by one position per step");
        worst = worst.max(max_diff(&got, &want));
        past = present;
    }
    // Left padding: row 0 has 3 real tokens after 2 pads.
    let ids = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 1, 2, 3, 4, 5]).view([2, 5]);
    let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let pos = Tensor::from_slice(&[0i64, 0, 0, 1, 2, 0, 1, 2, 3, 4]).view([2, 5]);
    let want = tch::no_grad(|| model.forward(&ids, &mask, &pos, &mut KvCache::new()));
    let (got, _) = run(&mut s, c, &ids, &mask, &pos, &[], fp16);
    // Real positions only: padded query rows are defined but meaningless.
    let real = |t: &Tensor| Tensor::cat(&[t.get(0).narrow(0, 2, 3), t.get(1)], 0);
    worst.max(max_diff(&real(&got), &real(&want)))
}

#[test]
fn fp32_export_matches_tch_untied_and_tied_external() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, external) in [(false, false), (true, true)] {
        let model_dir = dir.path().join(format!("m-{tied}"));
        let (_vs, model, config) = make_model(&model_dir, tied, 3);
        let out = dir.path().join(format!("onnx-{tied}"));
        let report = export::export(
            &model_dir,
            &out,
            &export::ExportOptions {
                dtype: ExportDtype::Fp32,
                force_external: external,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(report.external, external);
        assert_eq!(out.join(export::EXTERNAL_DATA_FILE).is_file(), external);
        assert!(out.join("config.json").is_file());
        let d = parity(&out, &model, &config, false);
        println!("fp32 tied={tied} external={external}: max |logit diff| = {d:.3e}");
        assert!(d <= 1e-4, "fp32 logits differ by {d}");
    }
}

#[test]
fn fp16_export_stays_within_its_stated_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    let (_vs, model, config) = make_model(&model_dir, false, 4);
    let out = dir.path().join("onnx16");
    export::export(
        &model_dir,
        &out,
        &export::ExportOptions { dtype: ExportDtype::Fp16, ..Default::default() },
    )
    .unwrap();
    let d = parity(&out, &model, &config, true);
    println!("fp16: max |logit diff| vs f32 tch = {d:.3e}");
    assert!(d <= FP16_TOLERANCE, "fp16 logits differ by {d}");
}

#[test]
fn graph_has_the_optimum_interface() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    let (_vs, _model, config) = make_model(&model_dir, true, 5);
    let out = dir.path().join("onnx");
    export::export(
        &model_dir,
        &out,
        &export::ExportOptions { dtype: ExportDtype::Fp32, ..Default::default() },
    )
    .unwrap();
    let s = session(&out);
    let inputs: Vec<&str> = s.inputs().iter().map(|i| i.name()).collect();
    let outputs: Vec<&str> = s.outputs().iter().map(|o| o.name()).collect();
    let mut want_in = vec!["input_ids".to_owned(), "attention_mask".into(), "position_ids".into()];
    let mut want_out = vec!["logits".to_owned()];
    for i in 0..config.num_hidden_layers {
        want_in.extend([format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")]);
        want_out.extend([format!("present.{i}.key"), format!("present.{i}.value")]);
    }
    assert_eq!(inputs, want_in);
    assert_eq!(outputs, want_out);
}
