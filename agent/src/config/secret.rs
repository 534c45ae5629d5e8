//! Secrets: `${ENV_VAR}` expansion, secrets read from files, and never printing them.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// One secret given inline (`key`) or as a file (`key_file`), not both.
pub fn one_secret<'a>(
    key: &str,
    inline: &'a Option<Secret>,
    file: &'a Option<SecretFile>,
) -> Result<Option<&'a Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("give `{key}` or `{key}_file`, not both")),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(f)) => Ok(Some(&f.secret)),
        (None, None) => Ok(None),
    }
}

/// A secret string, given literally or as `${ENV_VAR}`; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        expand_env(&text, environment)
            .map(Secret)
            .map_err(|(_, message)| de::Error::custom(message))
    }
}

fn environment(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Where in `raw`, the source text of a value, the `${` is that `message` is about: the
/// error of a secret names its whole value, the file names the variable.
pub(super) fn env_error_offset(raw: &str, message: &str) -> Option<usize> {
    match expand_env(raw, environment) {
        Err((at, again)) if again == message => Some(at),
        _ => None,
    }
}

/// Replaces every `${NAME}` by the variable's value; `$${` stands for a literal `${`.
/// An error comes with the byte offset of its `${`.
pub(super) fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let offset = text.len() - rest.len() + at;
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or_else(|| {
                (
                    offset,
                    "unterminated ${ in value; write ${NAME}, or $${ for a literal ${".to_owned(),
                )
            })?;
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err((
                    offset,
                    format!("invalid environment variable name {name:?}: letters, digits and _"),
                ));
            }
            let value = lookup(name).ok_or_else(|| {
                (
                    offset,
                    format!(
                        "environment variable {name} is not set; set it for the agent (systemd: Environment= or EnvironmentFile=), or write $${{ for a literal ${{"
                    ),
                )
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A secret read from a file when the configuration is loaded (trailing newline removed).
#[derive(Clone)]
pub struct SecretFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// What it holds.
    pub secret: Secret,
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret from {}>", self.path.display())
    }
}

impl<'de> Deserialize<'de> for SecretFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = PathBuf::deserialize(deserializer)?;
        let text = std::fs::read_to_string(&path).map_err(|err| {
            de::Error::custom(format!("cannot read secret file {}: {err}", path.display()))
        })?;
        let secret = Secret(text.trim_end_matches(['\n', '\r']).to_owned());
        Ok(SecretFile { path, secret })
    }
}
