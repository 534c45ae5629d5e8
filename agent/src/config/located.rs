//! Configuration errors and where they are: spans, lines and columns.

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::DeValue;

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read the configuration: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    /// The path names a folder.
    #[error("{path}: is a folder; give the path of the TOML file")]
    Folder { path: PathBuf },
    /// A syntax error, an unknown key, a bad value or a failed check.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

pub(super) type Located = (Option<Range<usize>>, String);

pub(super) fn located(err: toml::de::Error) -> Located {
    (err.span(), err.message().to_owned())
}

/// The span of the value of `key` in a table, when the table has that key.
pub(super) fn value_span(table: &Spanned<DeValue<'_>>, key: &str) -> Option<Range<usize>> {
    match table.get_ref() {
        DeValue::Table(t) => t.get(key).map(|v| v.span()),
        _ => None,
    }
}

/// The span of the first occurrence of `needle`, to point at a table header.
pub(super) fn key_span(text: &str, needle: &str) -> Option<Range<usize>> {
    text.find(needle).map(|at| at..at + needle.len())
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The most a configuration file may hold; a larger file is not a configuration.
const MOST_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a configuration file as bytes, refusing a folder and stopping after
/// [`MOST_BYTES`] (a device such as `/dev/zero` never ends).
pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    if path.is_dir() {
        return Err(ConfigError::Folder {
            path: path.to_owned(),
        });
    }
    let read = |reason| ConfigError::Read {
        path: path.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MOST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    Ok(bytes)
}

/// The text of a configuration file, or where and why it is not UTF-8 text: a byte
/// offset into `bytes` and the message.
pub(super) fn text_of(bytes: &[u8]) -> Result<&str, (usize, String)> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err((0, "the file is UTF-16 text; save it as UTF-8".to_owned()));
    }
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err((
            at,
            "is not a text file (it holds a NUL byte here); give the path of the TOML file"
                .to_owned(),
        ));
    }
    if bytes.len() as u64 > MOST_BYTES {
        return Err((
            0,
            "is larger than 16 MiB, too large for a configuration; give the path of the TOML file"
                .to_owned(),
        ));
    }
    std::str::from_utf8(bytes).map_err(|err| {
        let at = err.valid_up_to();
        let byte = bytes.get(at).copied().unwrap_or_default();
        (
            at,
            format!("invalid UTF-8 (byte 0x{byte:02X}); save the file as UTF-8"),
        )
    })
}

/// 1-based line and column of a byte offset into bytes that may not be UTF-8 (an
/// invalid sequence counts as one character).
pub(super) fn byte_line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = String::from_utf8_lossy(&bytes[..offset.min(bytes.len())]);
    line_column(&before, before.len())
}
