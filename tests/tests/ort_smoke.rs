//! ONNX Runtime loads as the consumer loads it, and runs a graph that our own ONNX
//! writer produced: x·W + b followed by a softmax, with a dynamic batch axis. The
//! expected values are computed here in plain Rust.

use alignx_consumer::onnx_runtime;
use alignx_trainer::onnx::build::{Dim, attr_int, f32_tensor, model_bytes, node, value_info};
use alignx_trainer::onnx::proto::{GraphProto, data_type};
use ort::value::Tensor;

const W: [f32; 6] = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5];
const B: [f32; 2] = [0.1, -0.2];

fn graph() -> Vec<u8> {
    let graph = GraphProto {
        name: "smoke".into(),
        node: vec![
            node("MatMul", "matmul", &["x", "w"], &["xw"], vec![]),
            node("Add", "add", &["xw", "b"], &["logits"], vec![]),
            node("Softmax", "softmax", &["logits"], &["probs"], vec![attr_int("axis", -1)]),
        ],
        initializer: vec![f32_tensor("w", &[3, 2], &W), f32_tensor("b", &[2], &B)],
        input: vec![value_info("x", data_type::FLOAT, &[Dim::Named("batch_size"), Dim::Fixed(3)])],
        output: vec![
            value_info("logits", data_type::FLOAT, &[Dim::Named("batch_size"), Dim::Fixed(2)]),
            value_info("probs", data_type::FLOAT, &[Dim::Named("batch_size"), Dim::Fixed(2)]),
        ],
        ..Default::default()
    };
    model_bytes(graph, env!("CARGO_PKG_VERSION"))
}

fn expected(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut logits, mut probs) = (Vec::new(), Vec::new());
    for row in x.chunks(3) {
        let l: Vec<f32> = (0..2).map(|j| (0..3).map(|k| row[k] * W[k * 2 + j]).sum::<f32>() + B[j]).collect();
        let m = l.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = l.iter().map(|v| (v - m).exp()).sum();
        probs.extend(l.iter().map(|v| (v - m).exp() / z));
        logits.extend(l);
    }
    (logits, probs)
}

#[test]
fn runs_a_graph_written_by_our_onnx_writer() {
    let runtime =
        onnx_runtime::init(None).expect("ONNX Runtime must load (run scripts/setup; see scripts/env.sh)");
    let mut session = runtime.session_builder().unwrap().commit_from_memory(&graph()).unwrap();
    let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    assert_eq!(names, ["x"]);

    for batch in [1usize, 4] {
        let x: Vec<f32> = (0..batch * 3).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let input = Tensor::from_array((vec![batch as i64, 3], x.clone())).unwrap();
        let outputs = session.run(ort::inputs!["x" => input]).unwrap();
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(&shape[..], &[batch as i64, 2]);
        let (_, probs) = outputs["probs"].try_extract_tensor::<f32>().unwrap();
        let (want_logits, want_probs) = expected(&x);
        for (got, want) in logits.iter().zip(&want_logits).chain(probs.iter().zip(&want_probs)) {
            assert!((got - want).abs() < 1e-6, "batch {batch}: got {got}, want {want}");
        }
    }
}

#[test]
fn a_missing_library_is_named_in_the_error() {
    let err = onnx_runtime::locate(Some(std::path::Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ONNX Runtime library /nonexistent/libonnxruntime.so (from --ort-library) does not exist"
    );
}

#[test]
fn one_runtime_per_process() {
    let a = onnx_runtime::init(None).unwrap();
    let b = onnx_runtime::init(None).unwrap();
    assert!(std::ptr::eq(a, b), "a second init returns the loaded runtime");
    // Another existing file: refused, naming both.
    let other = std::env::current_exe().unwrap();
    let err = onnx_runtime::init(Some(&other)).unwrap_err().to_string();
    assert!(err.contains("already loaded") && err.contains(&other.display().to_string()), "{err}");
}
