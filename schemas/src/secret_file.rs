//! Secrets mounted as files (Kubernetes Secret keys, Docker secrets): how every component
//! reads one, so that the consumer and the trainer get the same value from the same file.

use std::path::Path;

/// The file's content less trailing newlines (`echo` and most editors add one; no secret
/// ends in one).
pub fn read(path: &Path) -> std::io::Result<String> {
    let raw = std::fs::read_to_string(path)?;
    Ok(raw.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn trailing_newlines_are_dropped_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        std::fs::write(&path, " s3 cr\n3t \r\n\n").unwrap();
        assert_eq!(super::read(&path).unwrap(), " s3 cr\n3t ");
        assert!(super::read(&dir.path().join("missing")).is_err());
    }
}
