//! ONNX exports of checkpoints made by Hugging Face `transformers` reproduce its logits
//! in ONNX Runtime. Needs the oracle of `scripts/oracle/hf_qwen2.py make DIR`; run by
//! `make hf-parity` (ignored otherwise).

use std::path::PathBuf;

use alignx_consumer::onnx_runtime;
use alignx_trainer::onnx::export::{self, ExportDtype};
use ort::value::{DynValue, Tensor as OrtTensor};
use serde_json::Value;

#[test]
#[ignore = "needs the transformers oracle: scripts/oracle/hf_qwen2.py make DIR"]
fn onnx_exports_of_transformers_checkpoints_match_transformers() {
    let root = PathBuf::from(std::env::var("ALIGNX_HF_ORACLE_DIR").expect("set ALIGNX_HF_ORACLE_DIR"));
    let runtime = onnx_runtime::init(None).unwrap();
    for name in ["tied", "untied"] {
        let dir = root.join(format!("hf_{name}"));
        let out = root.join(format!("onnx_{name}"));
        export::export(&dir, &out, &export::ExportOptions { dtype: ExportDtype::Fp32, ..Default::default() })
            .unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let expected = tch::Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let get = |n: &str| expected.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let ids: Vec<i64> = Vec::try_from(get("input_ids").flatten(0, -1)).unwrap();
        let want: Vec<f32> = Vec::try_from(get("logits").flatten(0, -1)).unwrap();
        let n = ids.len() as i64;
        let layers = config["num_hidden_layers"].as_i64().unwrap();
        let kv = config["num_key_value_heads"].as_i64().unwrap();
        let d = config["hidden_size"].as_i64().unwrap() / config["num_attention_heads"].as_i64().unwrap();
        let int = |v: Vec<i64>| -> DynValue { OrtTensor::from_array((vec![1, n], v)).unwrap().into_dyn() };
        let mut inputs: Vec<(String, DynValue)> = vec![
            ("input_ids".into(), int(ids)),
            ("attention_mask".into(), int(vec![1; n as usize])),
            ("position_ids".into(), int((0..n).collect())),
        ];
        for i in 0..layers {
            for kind in ["key", "value"] {
                let empty = OrtTensor::from_array((vec![1, kv, 0, d], Vec::<f32>::new())).unwrap().into_dyn();
                inputs.push((format!("past_key_values.{i}.{kind}"), empty));
            }
        }
        let mut session =
            runtime.session_builder().unwrap().commit_from_file(out.join(export::MODEL_FILE)).unwrap();
        let outputs = session.run(inputs).unwrap();
        let (_, got) = outputs["logits"].try_extract_tensor::<f32>().unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{name}: ONNX Runtime logits vs transformers: max |diff| = {diff:.3e}");
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}
