//! The JSON Schema files and the Rust types are two statements of one contract. Every
//! shipped example must be accepted by both or rejected by both, and every accepted
//! example must still satisfy the schema after a trip through the Rust types.

use std::path::{Path, PathBuf};

use alignx_schemas::inference_log::{ErasureRecord, InferenceLogRecord};
use alignx_schemas::summary::SummaryRecord;
use alignx_schemas::training::{
    ColdStartRecord, EvalRecord, RlRecord, StreamingRlRecord, TrainingRecord, read_records,
};
use alignx_schemas::{Limits, validate_signal};
use jsonschema::{Registry, Validator};
use serde_json::Value;

fn json_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("json")
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every schema file, by file stem (`signal.v1`, `rl_train`, …).
fn schemas() -> Vec<(String, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(json_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), load(&p)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn validators() -> Vec<(String, Validator)> {
    let all = schemas();
    let resources = all.iter().map(|(_, s)| (s["$id"].as_str().unwrap().to_owned(), s.clone()));
    let registry = Registry::new().extend(resources).unwrap().prepare().unwrap();
    all.iter()
        .map(|(name, schema)| {
            let v = jsonschema::options()
                .with_registry(&registry)
                .should_validate_formats(true)
                .build(schema)
                .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
            (name.clone(), v)
        })
        .collect()
}

fn training<T: TrainingRecord + serde::Serialize>(doc: &Value) -> Result<Value, String> {
    let text = serde_json::to_string(&vec![doc]).unwrap();
    read_records::<T>(&text).map(|r| serde_json::to_value(&r[0]).unwrap()).map_err(|e| e.to_string())
}

/// Our Rust reading of a document: `Ok(re-serialised)` or the problems.
fn rust_side(schema: &str, doc: &Value) -> Result<Value, String> {
    match schema {
        "signal.v1" => {
            let key = doc["user_id"].as_str().unwrap_or("").as_bytes().to_vec();
            let bytes = serde_json::to_vec(doc).unwrap();
            validate_signal(&bytes, Some(&key), &Limits::default())
                .map(|s| serde_json::to_value(s).unwrap())
                .map_err(|e| e.to_string())
        }
        "summary.v1" => serde_json::from_value::<SummaryRecord>(doc.clone())
            .map(|r| serde_json::to_value(r).unwrap())
            .map_err(|e| e.to_string()),
        "inference_log.v1" => serde_json::from_value::<InferenceLogRecord>(doc.clone())
            .map(|r| serde_json::to_value(r).unwrap())
            .map_err(|e| e.to_string()),
        "erasure.v1" => serde_json::from_value::<ErasureRecord>(doc.clone())
            .map(|r| serde_json::to_value(r).unwrap())
            .map_err(|e| e.to_string()),
        "cold_start" => training::<ColdStartRecord>(doc),
        "rl_train" => training::<RlRecord>(doc),
        "streaming_rl_train" => training::<StreamingRlRecord>(doc),
        "eval" => training::<EvalRecord>(doc),
        other => panic!("no Rust reader for schema {other}"),
    }
}

#[test]
fn examples_agree_with_schema_and_types() {
    let validators = validators();
    let mut examples: Vec<PathBuf> =
        std::fs::read_dir(json_dir().join("examples")).unwrap().map(|e| e.unwrap().path()).collect();
    examples.sort();
    let mut seen_valid = std::collections::BTreeSet::new();
    let mut seen_invalid = std::collections::BTreeSet::new();
    for path in &examples {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (schema, expect_valid) = if let Some((s, _)) = name.split_once(".valid.") {
            (s.to_owned(), true)
        } else if let Some((s, _)) = name.split_once(".invalid.") {
            (s.to_owned(), false)
        } else {
            panic!("example {name} is named neither SCHEMA.valid.* nor SCHEMA.invalid.*");
        };
        let (_, validator) = validators
            .iter()
            .find(|(n, _)| *n == schema)
            .unwrap_or_else(|| panic!("example {name} names unknown schema {schema}"));
        let doc = load(path);
        let schema_errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        let rust = rust_side(&schema, &doc);
        if expect_valid {
            assert!(
                schema_errors.is_empty(),
                "{name}: JSON Schema rejects a valid example: {schema_errors:?}"
            );
            let round = rust.unwrap_or_else(|e| panic!("{name}: Rust types reject a valid example: {e}"));
            let again: Vec<String> = validator.iter_errors(&round).map(|e| e.to_string()).collect();
            assert!(again.is_empty(), "{name}: re-serialised value breaks the schema: {again:?}\n{round}");
            seen_valid.insert(schema);
        } else {
            assert!(!schema_errors.is_empty(), "{name}: JSON Schema accepts an invalid example");
            assert!(rust.is_err(), "{name}: Rust types accept an invalid example");
            seen_invalid.insert(schema);
        }
    }
    let names: std::collections::BTreeSet<String> = validators.into_iter().map(|(n, _)| n).collect();
    assert_eq!(seen_valid, names, "every schema needs at least one valid example");
    assert_eq!(seen_invalid, names, "every schema needs at least one invalid example");
}

#[test]
fn signal_schema_states_the_default_limits() {
    let (_, schema) = schemas().into_iter().find(|(n, _)| n == "signal.v1").unwrap();
    let limits = Limits::default();
    assert_eq!(schema["$defs"]["id"]["maxLength"], limits.max_id_bytes);
    assert_eq!(schema["$defs"]["text"]["maxLength"], limits.max_text_bytes);
}
