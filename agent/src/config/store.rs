//! The object stores' own keys (`local`, `s3`, `gcs`, `azure`) and the file formats an
//! object-store sink writes.

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{Secret, SecretFile};

/// `kind = "local"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStore {
    /// The folder the object tree is written under (created when missing).
    pub path: PathBuf,
}

/// `kind = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Store {
    /// The bucket.
    pub bucket: String,
    /// The region (default: `AWS_REGION` / `AWS_DEFAULT_REGION`, else "us-east-1").
    #[serde(default)]
    pub region: Option<String>,
    /// The endpoint of an S3-compatible store (`https://…`, or `http://…` for plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `https://endpoint/bucket/key` (true, the default) rather than
    /// `https://bucket.endpoint/key`.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Access key; without one, the standard AWS environment variables, web identity or
    /// the instance profile are used.
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    #[serde(default)]
    pub access_key_id_file: Option<SecretFile>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(default)]
    pub secret_access_key_file: Option<SecretFile>,
    #[serde(default)]
    pub session_token: Option<Secret>,
    #[serde(default)]
    pub session_token_file: Option<SecretFile>,
}

fn yes() -> bool {
    true
}

/// `kind = "gcs"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsStore {
    /// The bucket.
    pub bucket: String,
    /// A service account key (JSON) given inline, usually as `${ENV_VAR}`.
    #[serde(default)]
    pub service_account_key: Option<Secret>,
    /// A service account key file; without either, application default credentials
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file, the metadata server) are used.
    #[serde(default)]
    pub service_account_key_file: Option<SecretFile>,
    /// Another endpoint than `https://storage.googleapis.com`: a GCS emulator or a
    /// proxy (`https://…`, or `http://…` for plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Send no credentials at all (an emulator, which wants none); excludes a key.
    #[serde(default)]
    pub anonymous: bool,
}

/// `kind = "azure"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureStore {
    /// The storage account.
    pub account: String,
    /// The container.
    pub container: String,
    /// The account's access key.
    #[serde(default)]
    pub access_key: Option<Secret>,
    #[serde(default)]
    pub access_key_file: Option<SecretFile>,
    /// A shared access signature (the query string, without `?`).
    #[serde(default)]
    pub sas_token: Option<Secret>,
    #[serde(default)]
    pub sas_token_file: Option<SecretFile>,
    /// A service principal: client id, secret and tenant. Without any credential, the
    /// `AZURE_*` environment variables or the managed identity are used.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub client_secret_file: Option<SecretFile>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The blob endpoint, for Azurite or a sovereign cloud (`http://…` for plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Output file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (`.ndjson`).
    Ndjson,
    /// JSON Text Sequences, RFC 7464 (`.json-seq`).
    JsonSeq,
    /// Comma-separated values with a header line (`.csv`).
    Csv,
    /// Apache Parquet (`.parquet`).
    Parquet,
}

impl Format {
    /// The `format = "…"` word.
    pub fn word(self) -> &'static str {
        match self {
            Format::Ndjson => "ndjson",
            Format::JsonSeq => "json_seq",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }
}

/// How rows are laid out in a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// One row per series and window.
    #[default]
    Long,
    /// One row per window, columns `{stat}_{series}`.
    Wide,
}

/// How the partition folders of an object key spell the window's time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keys {
    /// Plain integers, `year=2026/month=1/day=5/hour=9`: every reader infers integers
    /// for them on every date.
    #[default]
    Unpadded,
    /// Zero-padded, `year=2026/month=01/day=05/hour=09`: the keys of edgespool before
    /// `keys` existed, for lakes that already hold them (readers type them as text or
    /// integers depending on which folders exist).
    Padded,
}

/// Compression codecs. Parquet compresses its pages (zstd, snappy or none); the text
/// formats compress the whole file (gzip, zstd or none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Zstandard (level 3).
    #[default]
    Zstd,
    /// Snappy (Parquet only).
    Snappy,
    /// gzip, RFC 1952 (text formats only).
    Gzip,
    /// No compression.
    None,
}

impl Compression {
    /// The `compression = "…"` word.
    pub fn word(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    /// Whether a sink writing `format` can use this codec.
    pub fn fits(self, format: Format) -> bool {
        match (self, format) {
            (Compression::Zstd | Compression::None, _) => true,
            (Compression::Snappy, Format::Parquet) => true,
            (Compression::Gzip, Format::Parquet) => false,
            (Compression::Snappy, _) => false,
            (Compression::Gzip, _) => true,
        }
    }
}
