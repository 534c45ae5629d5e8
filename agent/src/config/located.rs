//! Configuration errors and where they are: spans, lines and columns.

use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;
use toml::de::DeValue;

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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

pub(super) fn kind_value_span(table: &Spanned<DeValue<'_>>) -> Option<Range<usize>> {
    match table.get_ref() {
        DeValue::Table(t) => t.get("kind").map(|v| v.span()),
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
