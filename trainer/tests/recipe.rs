//! The tiny recipe runs every stage (world, tokenizer, judge SFT, policy SFT, ONNX
//! export, ACC_jud rows) and is reused from its cache directory. Run here with a few
//! steps: what the full recipe achieves is in its report (`alignx-trainer recipe tiny`).

use alignx_trainer::recipe::{self, TinyRecipe};

#[test]
fn every_stage_runs_and_a_finished_recipe_is_reused() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let quick = TinyRecipe::smoke();
    let out = dir.path().join(recipe::key(&quick));
    let built = recipe::tiny(&quick, &out, false).unwrap();
    assert_eq!(built, out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let stages: Vec<&str> =
        report["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["synth", "init", "judge_sft", "policy_sft", "export", "eval"]);
    let rows = report["eval"].as_array().unwrap();
    assert!(rows.len() >= 3, "{rows:?}");
    for row in rows {
        for source in ["no_summary", "latent_summary", "policy"] {
            let acc = row[source]["acc_jud"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{row}");
        }
    }
    assert!(out.join("policy-onnx/model.onnx").is_file());
    assert!(report["peak_rss_mib"].as_f64().unwrap() > 0.0);
    // No temporary directories are left beside it.
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // A second call finds the finished run and does no work.
    let modified = std::fs::metadata(out.join("report.json")).unwrap().modified().unwrap();
    recipe::tiny(&quick, &out, false).unwrap();
    assert_eq!(std::fs::metadata(out.join("report.json")).unwrap().modified().unwrap(), modified);
    // Different settings, a different cache entry.
    assert_ne!(recipe::key(&quick), recipe::key(&TinyRecipe { seed: 1, ..quick.clone() }));
}
