//! The model store: versions published whole, the pointer moved atomically, one
//! writer at a time.

use std::path::Path;

use alignx_trainer::init::{self, Preset};
use alignx_trainer::model_store::{ModelStore, StoreError, VersionMeta};
use alignx_trainer::onnx::export::ExportOptions;

fn meta() -> VersionMeta {
    VersionMeta::new(None, None, serde_json::Value::Null)
}

#[test]
fn versions_are_published_whole_pointed_at_atomically_and_locked() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "a small corpus for a small tokenizer <answer> </answer> ".repeat(50)).unwrap();
    let model = dir.path().join("model");
    init::init(&corpus, &Preset::Tiny.shape(), 0, &model, false).unwrap();
    let options = ExportOptions::for_consumer();

    let store = ModelStore::open(&dir.path().join("store")).unwrap();
    assert!(matches!(store.current(None), Err(StoreError::NoCurrent(_))));

    // One holder at a time (flock: a second open of the lock file is refused too).
    let lock = store.try_lock().unwrap().expect("free");
    assert!(store.try_lock().unwrap().is_none(), "held");
    drop(lock);
    let _lock = store.try_lock().unwrap().expect("released on drop");

    let v1 = store.publish(&model, false, meta(), &options).unwrap();
    assert_eq!(v1.id, "v0001");
    assert!(model.join("config.json").is_file(), "copied, not moved");
    store.point(&v1, None).unwrap();
    assert_eq!(store.current(None).unwrap(), v1);
    let v2 = store
        .publish(&model, false, VersionMeta { parent: Some(v1.id.clone()), ..meta() }, &options)
        .unwrap();
    assert_eq!(v2.id, "v0002");
    assert_eq!(store.current(None).unwrap(), v1, "published is not yet served");
    store.point(&v2, None).unwrap();
    assert_eq!(store.current(None).unwrap(), v2);
    assert_eq!(std::fs::read_link(store.root().join("current")).unwrap(), Path::new("versions/v0002"));
    assert!(v2.served.join("model.onnx").is_file() && v2.policy.join("model.safetensors").is_file());
    let m = store.meta(&v2).unwrap();
    assert_eq!((m.id.as_str(), m.parent.as_deref()), ("v0002", Some("v0001")));
    // A moved-in training output keeps its files but not its checkpoints.
    let trained = dir.path().join("trained");
    std::fs::create_dir(&trained).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, trained.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir(trained.join("checkpoint-2")).unwrap();
    std::fs::write(trained.join("rl_log.jsonl"), "{}\n").unwrap();
    let v3 = store.publish(&trained, true, meta(), &options).unwrap();
    assert!(!trained.exists(), "moved, not copied");
    assert!(v3.policy.join("rl_log.jsonl").is_file() && !v3.policy.join("checkpoint-2").exists());
    // Nothing half-written is left behind.
    for sub in ["versions", "policies"] {
        let names: Vec<String> = std::fs::read_dir(store.root().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    // A pointer at a directory the store did not publish: no weights to train from.
    std::fs::remove_file(store.root().join("current")).unwrap();
    std::os::unix::fs::symlink(&model, store.root().join("current")).unwrap();
    assert!(matches!(store.current(None), Err(StoreError::Foreign(_))));
}
