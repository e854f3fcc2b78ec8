//! `alignx-consumer validate`: run the consumer's signal gate (DESIGN.md §3.1) over a
//! JSON Lines file, reporting each rejected line with the reason the DLQ would give.

use std::collections::BTreeMap;
use std::io::BufRead;

use alignx_schemas::{Limits, ProblemCode, SignalKind, validate_payload};

/// What a file contained.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Valid signals by kind.
    pub valid: BTreeMap<&'static str, u64>,
    /// Rejected lines by primary reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn valid_total(&self) -> u64 {
        self.valid.values().sum()
    }
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// One rejected line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub line: usize,
    pub reason: ProblemCode,
    pub detail: String,
}

/// Checks every non-blank line. Lines are not Kafka messages yet, so there is no key to
/// compare: they are to be produced with key = `user_id`.
pub fn validate_lines(
    reader: impl BufRead,
    limits: &Limits,
    mut on_reject: impl FnMut(&Rejected),
) -> std::io::Result<Report> {
    let mut report = Report::default();
    for kind in SignalKind::ALL {
        report.valid.insert(kind.as_str(), 0);
    }
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match validate_payload(&line, limits) {
            Ok(signal) => *report.valid.entry(signal.kind().as_str()).or_default() += 1,
            Err(problems) => {
                let reason = problems.primary_code();
                *report.rejected.entry(reason.as_str()).or_default() += 1;
                on_reject(&Rejected { line: i + 1, reason, detail: problems.to_string() });
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_valid_and_rejected_lines() {
        let input = concat!(
            r#"{"schema":"alignx.signal.v1","user_id":"u","signal_id":"1","ts":"2026-01-01T00:00:00Z","kind":"text","text":"hi"}"#,
            "\n\n",
            r#"{"schema":"alignx.signal.v1","user_id":"u","signal_id":"2","ts":"2026-01-01T00:00:00Z","kind":"pair","post":"p"}"#,
            "\nnot json\n"
        );
        let mut rejected = Vec::new();
        let report =
            validate_lines(input.as_bytes(), &Limits::default(), |r| rejected.push(r.clone())).unwrap();
        assert_eq!(report.valid["text"], 1);
        assert_eq!(report.valid_total(), 1);
        assert_eq!(report.rejected["missing_field"], 1);
        assert_eq!(report.rejected["invalid_json"], 1);
        assert_eq!(rejected.iter().map(|r| r.line).collect::<Vec<_>>(), [3, 4]);
        assert!(rejected[0].detail.contains("$.chosen"), "{}", rejected[0].detail);
    }
}
