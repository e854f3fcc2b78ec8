//! `make bench` (export part): ONNX export time, file sizes and ONNX Runtime session
//! creation time for the tiny and small presets, fp32 and fp16. JSON to the path given
//! as the first argument.

use std::time::Instant;

use alignx_consumer::onnx_runtime;
use alignx_trainer::init::{Preset, init};
use alignx_trainer::onnx::export::{self, ExportDtype};
use serde_json::json;

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/onnx.json".into());
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text: String =
        (0..2000).map(|i| format!("user {i} prefers answers of kind {} and says so. ", i % 13)).collect();
    std::fs::write(&corpus, text).unwrap();
    let runtime = onnx_runtime::init(None).unwrap();
    let mut rows = Vec::new();
    for preset in [Preset::Tiny, Preset::Small] {
        let model = dir.path().join(format!("{preset:?}"));
        init(&corpus, &preset.shape(), 0, &model, false).unwrap();
        let params = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
        for dtype in [ExportDtype::Fp32, ExportDtype::Fp16] {
            let onnx = dir.path().join(format!("{preset:?}-{dtype:?}"));
            let t = Instant::now();
            let report =
                export::export(&model, &onnx, &export::ExportOptions { dtype, ..Default::default() })
                    .unwrap();
            let export_s = t.elapsed().as_secs_f64();
            let size = std::fs::metadata(onnx.join(export::MODEL_FILE)).unwrap().len();
            let t = Instant::now();
            let session =
                runtime.session_builder().unwrap().commit_from_file(onnx.join(export::MODEL_FILE)).unwrap();
            let session_s = t.elapsed().as_secs_f64();
            drop(session);
            rows.push(json!({
                "preset": format!("{preset:?}").to_lowercase(), "dtype": format!("{dtype:?}").to_lowercase(),
                "safetensors_bytes": params, "onnx_bytes": size, "nodes": report.nodes,
                "export_seconds": export_s, "session_create_seconds": session_s,
            }));
        }
    }
    let report = json!({"machine": format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())), "exports": rows});
    if let Some(parent) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
