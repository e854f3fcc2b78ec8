//! Parity with Hugging Face `transformers`, against checkpoints and outputs made by
//! `scripts/oracle/hf_qwen2.py make DIR`. Ignored by default (it needs that Python
//! oracle); run with `ALIGNX_HF_ORACLE_DIR=DIR cargo test -p alignx-trainer --test
//! hf_parity -- --ignored`, then `hf_qwen2.py check DIR`.

use std::path::PathBuf;

use alignx_trainer::checkpoint;
use alignx_trainer::generate::{SamplingParams, generate};
use alignx_trainer::qwen2::{Config, Qwen2};
use tch::nn::VarStore;
use tch::{Device, Tensor};

fn oracle_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("ALIGNX_HF_ORACLE_DIR").expect("set ALIGNX_HF_ORACLE_DIR (see the module doc)"),
    )
}

fn tensor(file: &[(String, Tensor)], name: &str) -> Tensor {
    file.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

#[test]
#[ignore = "needs the transformers oracle: scripts/oracle/hf_qwen2.py make DIR"]
fn matches_transformers_and_writes_checkpoints_it_loads() {
    let root = oracle_dir();
    for name in ["tied", "untied"] {
        let dir = root.join(format!("hf_{name}"));
        if name == "untied" {
            assert!(
                dir.join("model.safetensors.index.json").is_file(),
                "the oracle should have sharded this one"
            );
        }
        let config = Config::from_file(&dir.join("config.json")).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let m = Qwen2::new(&vs.root(), &config);
        checkpoint::load(&vs, &dir).unwrap();
        let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let ids = tensor(&expected, "input_ids");
        let logits = tch::no_grad(|| m.forward_full(&ids));
        let diff = (&logits - tensor(&expected, "logits")).abs().max().double_value(&[]);
        let want: Vec<i64> = Vec::try_from(tensor(&expected, "generated").flatten(0, -1)).unwrap();
        let prompt: Vec<i64> = Vec::try_from(ids.flatten(0, -1)).unwrap();
        let params = SamplingParams::greedy(want.len());
        let got = generate(&m, &[prompt], &params, &[], |_, _| false, Device::Cpu).remove(0).tokens;
        println!(
            "{name}: max |logit diff| vs transformers = {diff:.3e}; greedy {} tokens equal: {}",
            want.len(),
            got == want
        );
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
        assert_eq!(got, want, "{name}: greedy continuation differs");

        let ours = root.join(format!("ours_{name}"));
        let config_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        checkpoint::save(&vs, &config_json, Some(&dir), &ours).unwrap();
        Tensor::write_safetensors(
            &[("input_ids", &ids), ("logits", &logits)],
            ours.join("expected.safetensors"),
        )
        .unwrap();
    }
}
