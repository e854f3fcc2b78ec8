//! Parity with Hugging Face `transformers`, against checkpoints and outputs made by
//! `scripts/oracle/hf_qwen2.py make DIR`. Ignored by default (it needs that Python
//! oracle); run with `ALIGNX_HF_ORACLE_DIR=DIR cargo test -p alignx-trainer --test
//! hf_parity -- --ignored`, then `hf_qwen2.py check DIR`.

use std::path::PathBuf;

use alignx_trainer::checkpoint;
use alignx_trainer::qwen2::{Config, KvCache, Qwen2};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn oracle_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("ALIGNX_HF_ORACLE_DIR").expect("set ALIGNX_HF_ORACLE_DIR (see the module doc)"),
    )
}

fn tensor(file: &[(String, Tensor)], name: &str) -> Tensor {
    file.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

/// Greedy continuation with the KV cache: prefill, then one token per step.
fn greedy(m: &Qwen2, prompt: &Tensor, steps: i64) -> Vec<i64> {
    let mut cache = KvCache::new();
    let len = prompt.size()[1];
    let ones = |n: i64| Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(len, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut logits = m.forward(prompt, &ones(len), &positions, &mut cache);
    let mut out = Vec::new();
    for step in 0..steps {
        let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
        out.push(next);
        let pos = Tensor::from_slice(&[len + step]).unsqueeze(0);
        logits =
            m.forward(&Tensor::from_slice(&[next]).unsqueeze(0), &ones(len + step + 1), &pos, &mut cache);
    }
    out
}

#[test]
#[ignore = "needs the transformers oracle: scripts/oracle/hf_qwen2.py make DIR"]
fn matches_transformers_and_writes_checkpoints_it_loads() {
    let root = oracle_dir();
    for name in ["tied", "untied"] {
        let dir = root.join(format!("hf_{name}"));
        let config = Config::from_file(&dir.join("config.json")).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let m = Qwen2::new(&vs.root(), &config);
        checkpoint::load(&vs, &dir).unwrap();
        let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let ids = tensor(&expected, "input_ids");
        let logits = tch::no_grad(|| m.forward_full(&ids));
        let diff = (&logits - tensor(&expected, "logits")).abs().max().double_value(&[]);
        let want: Vec<i64> = Vec::try_from(tensor(&expected, "generated").flatten(0, -1)).unwrap();
        let got = tch::no_grad(|| greedy(&m, &ids, want.len() as i64));
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
