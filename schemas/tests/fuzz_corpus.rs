//! The fuzz targets' kept corpus and every crasher they found (`fuzz/corpus/*`,
//! `fuzz/artifacts/*`), replayed through the same property checks (`alignx_schemas::fuzz`)
//! so a fixed bug stays fixed. `make fuzz` runs the fuzzers themselves.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

fn replay(target: &str, check: fn(&[u8])) {
    let cases = inputs(target);
    assert!(cases.len() > 100, "the {target} corpus is kept in fuzz/corpus/{target}");
    for (path, data) in &cases {
        if std::panic::catch_unwind(|| check(data)).is_err() {
            panic!("{} fails the {target} properties", path.display());
        }
    }
    println!("{target}: {} inputs", cases.len());
}

#[test]
fn signal_corpus_and_crashers_hold_the_properties() {
    replay("signal", alignx_schemas::fuzz::signal);
}

#[test]
fn prompt_and_answer_corpus_and_crashers_hold_the_properties() {
    replay("prompt_and_answer", alignx_schemas::fuzz::prompt_and_answer);
}
