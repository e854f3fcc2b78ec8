//! The prompt protocol against the byte-exact vectors of `spec/golden/`.

use std::path::{Path, PathBuf};

use alignx_schemas::prompt::{PromptInput, Setting, Templates};

fn spec_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("spec")
}

fn golden_cases() -> Vec<(String, PathBuf, PathBuf)> {
    let dir = spec_dir().join("golden");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name()?.to_str()?.strip_suffix(".input.json")?.to_owned();
            let expected = dir.join(format!("{name}.prompt.txt"));
            Some((name, p, expected))
        })
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_golden_input_renders_byte_for_byte() {
    let cases = golden_cases();
    assert!(cases.len() >= 4, "expected the golden vectors under {}", spec_dir().display());
    let templates = Templates::default();
    for (name, input, expected) in cases {
        let input = PromptInput::parse(&std::fs::read_to_string(&input).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = std::fs::read(&expected).unwrap();
        let got = templates.render(&input.bos_token, Setting::Base, &input.evidence);
        if got.as_bytes() != expected.as_slice() {
            let at = got
                .bytes()
                .zip(expected.iter())
                .position(|(a, b)| a != *b)
                .unwrap_or(got.len().min(expected.len()));
            panic!(
                "{name}: prompt differs at byte {at}\n got: {:?}\nwant: {:?}",
                &got[at.saturating_sub(40)..(at + 40).min(got.len())],
                String::from_utf8_lossy(&expected[at.saturating_sub(40)..(at + 40).min(expected.len())])
            );
        }
    }
}

/// The vendored copy must match the team's spec folder when it sits beside the checkout.
#[test]
fn vendored_spec_matches_shared_spec() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec");
    if !shared.is_dir() {
        eprintln!("note: {} not present; vendored copy not compared", shared.display());
        return;
    }
    let mut compared = 0;
    for rel in std::fs::read_dir(shared.join("golden"))
        .unwrap()
        .map(|e| PathBuf::from("golden").join(e.unwrap().file_name()))
        .chain([PathBuf::from("dimensions.txt")])
    {
        let ours = std::fs::read(spec_dir().join(&rel))
            .unwrap_or_else(|e| panic!("vendored {} missing: {e}", rel.display()));
        assert_eq!(
            ours,
            std::fs::read(shared.join(&rel)).unwrap(),
            "{} drifted from shared/spec",
            rel.display()
        );
        compared += 1;
    }
    assert!(compared > 1);
}
