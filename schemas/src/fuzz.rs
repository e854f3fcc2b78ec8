//! Properties checked on arbitrary bytes, shared by the fuzz targets (`fuzz/`, run by
//! `make fuzz`) and by the regression test that replays their corpus and every crasher
//! found (`schemas/tests/fuzz_corpus.rs`, in `make test`). Each function panics when a
//! property fails; returning means the input was handled as the contract says.

use crate::answer::parse_answer;
use crate::prompt::{Evidence, Setting, Templates};
use crate::training::{HistoryComment, HistoryPair};
use crate::{Limits, validate_payload, validate_signal};

/// Signal validation: never panics; a signal it accepts re-validates from its own JSON
/// to the same value; with a Kafka key, it is accepted only when the key is its
/// `user_id`. The first byte picks the key: none, the payload's own `user_id`, or the
/// next bytes up to a NUL.
pub fn signal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let limits = Limits { max_id_bytes: 32, max_text_bytes: 256, max_message_bytes: 4096 };
    let (key, payload): (Option<&[u8]>, &[u8]) = match mode % 3 {
        0 => (None, rest),
        1 => (None, rest), // the payload's own user_id, below
        _ => match rest.iter().position(|&b| b == 0) {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (Some(rest), &[]),
        },
    };
    let parsed = validate_payload(payload, &limits);
    if let Ok(signal) = &parsed {
        let json = serde_json::to_vec(signal).expect("a signal serialises");
        assert_eq!(validate_payload(&json, &limits).as_ref(), Ok(signal), "re-validation of {signal:?}");
        let own = validate_signal(payload, Some(signal.user_id.as_bytes()), &limits);
        assert_eq!(own.as_ref(), Ok(signal), "keyed by its own user_id");
    }
    if mode % 3 == 1 {
        return;
    }
    match validate_signal(payload, key, &limits) {
        Ok(signal) => {
            assert_eq!(key, Some(signal.user_id.as_bytes()), "accepted with a key that is not its user_id")
        }
        Err(problems) => assert!(!problems.to_string().is_empty()),
    }
}

/// Prompt rendering and answer extraction on arbitrary text (fields split at U+001F):
/// the prompt is the template's prefix, the fields verbatim (data is never read as
/// template), and the template's suffix, in both settings; a summary read from the
/// text as a generation is trimmed, non-empty, within its cap and free of answer tags.
pub fn prompt_and_answer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let fields: Vec<&str> = text.split('\u{1f}').collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let mut ev = Evidence::default();
    for chunk in fields.chunks(3).skip(1) {
        match chunk {
            [post, chosen, rejected] => ev.pairs.push(HistoryPair {
                prompt: (*post).into(),
                chosen: (*chosen).into(),
                rejected: (*rejected).into(),
            }),
            [post, comment] => {
                ev.ugc.push(HistoryComment { prompt: (*post).into(), comment: (*comment).into() })
            }
            [t] => ev.texts.push((*t).into()),
            _ => {}
        }
    }
    let t = Templates::default();
    let bos = "<|bos|>";
    let head = t.wrap(bos, "");
    let (prefix, suffix) = head.split_at(head.len() - t.suffix.len());
    for setting in
        [Setting::Base, Setting::Streaming { past: Some(field(0)) }, Setting::Streaming { past: None }]
    {
        let prompt = t.render(bos, setting, &ev);
        let problem = prompt
            .strip_prefix(prefix)
            .and_then(|p| p.strip_suffix(suffix))
            .unwrap_or_else(|| panic!("the template's prefix and suffix frame the prompt: {prompt:?}"));
        assert_eq!(problem, t.problem(setting, &ev));
        for p in &ev.pairs {
            for s in [&p.prompt, &p.chosen, &p.rejected] {
                assert!(problem.contains(s.as_str()), "{s:?} verbatim in {problem:?}");
            }
        }
        for c in &ev.ugc {
            assert!(problem.contains(c.prompt.as_str()) && problem.contains(c.comment.as_str()));
        }
        for s in &ev.texts {
            assert!(problem.contains(s.as_str()), "{s:?} verbatim in {problem:?}");
        }
        // A blank past summary is shown as the "none yet" placeholder, by design.
        if let Setting::Streaming { past: Some(past) } = setting
            && !past.trim().is_empty()
        {
            assert!(problem.contains(past));
        }
    }
    let cap = 64;
    if let Ok(answer) = parse_answer(&text, cap) {
        let s = &answer.summary;
        assert!(!s.is_empty() && s.trim() == s, "trimmed and non-empty: {s:?}");
        assert!(s.chars().count() <= cap, "capped: {s:?}");
        assert!(!s.contains("<answer>") && !s.contains("</answer>"), "no answer tags: {s:?}");
    }
}
