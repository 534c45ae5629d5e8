//! The object-store sink: one object per part, through `object_store`, so that every
//! backend (a local folder, S3 and S3-compatible stores, GCS, Azure) shares the keys,
//! the encodings and the idempotence.
//!
//! A delivery counts (is returned as done, so that the uploader records it and the spool
//! may delete its rows) only once the object is durable at the destination. A remote
//! store's success answer is that point. A local folder's is reached by fsync: the file
//! is written under a staging name, fsynced, renamed into place, and its folder fsynced;
//! so is every folder on the way up to the sink's root (a folder's entry lives in its
//! parent). A power cut before that leaves the part undelivered in the spool, and it is
//! written again, whole.
//!
//! An object is encoded and sent as the spool reader's chunks come: one that fits in one
//! upload part (`part_size`) is held and sent with a single PUT; a larger one goes as a
//! multipart upload, a part at a time with one in flight, and is aborted if the
//! delivery fails half-way (so no parts are left behind). A local folder's file is
//! written the same way, to its staging file in pieces of at most 1 MiB.

use std::path::PathBuf;
use std::sync::Arc;
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload, WriteMultipart,
};
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
use object_store::{ClientOptions, RetryConfig};

use super::encode::{self, Encoder, Encoding};
use super::{Delivery, Sink, SinkError, layout};
#[cfg(feature = "azure")]
use crate::config::AzureStore;
#[cfg(feature = "gcs")]
use crate::config::GcsStore;
#[cfg(feature = "s3")]
use crate::config::S3Store;
use crate::config::{self, ObjectSink as ObjectConfig, Store};

/// Opens the store; called (on a blocking thread) until it succeeds (a folder on a disk
/// not yet mounted, a credential file not yet written).
type Opener = Arc<dyn Fn() -> Result<Arc<dyn ObjectStore>, String> + Send + Sync>;

pub struct ObjectSink {
    name: String,
    store: tokio::sync::OnceCell<Arc<dyn ObjectStore>>,
    open: Opener,
    prefix: String,
    keys: config::Keys,
    encoding: Encoding,
    /// Remote stores get a Content-Type; a local folder none.
    remote: bool,
    part_size: usize,
    /// Where the store is, for log lines ("/data/out", "s3://bucket").
    location: String,
    /// A local folder's root, whose folders are fsynced after each write.
    local_root: Option<PathBuf>,
    /// The error code a store answers with when the container a sink writes to does
    /// not exist, and what to say instead of its answer.
    missing: Option<(&'static str, String)>,
}

impl ObjectSink {
    /// The sink a configuration entry describes. Nothing is opened yet: a store that
    /// cannot be set up fails the first delivery, which is retried like any other.
    pub fn new(name: &str, config: &ObjectConfig) -> ObjectSink {
        let (open, location): (Opener, String) = match &config.store {
            Store::Local(local) => (
                local_opener(name, local.path.clone()),
                local.path.display().to_string(),
            ),
            #[cfg(feature = "s3")]
            Store::S3(s3) => (s3_opener(s3, config), format!("s3://{}", s3.bucket)),
            #[cfg(feature = "gcs")]
            Store::Gcs(gcs) => (gcs_opener(gcs, config), format!("gs://{}", gcs.bucket)),
            #[cfg(feature = "azure")]
            Store::Azure(azure) => (
                azure_opener(azure, config),
                format!("az://{}/{}", azure.account, azure.container),
            ),
            // The configuration refuses a store this build lacks; this is the last guard.
            #[allow(unreachable_patterns)]
            _ => (not_in_build(), "a store not in this build".to_owned()),
        };
        ObjectSink {
            name: name.to_owned(),
            store: tokio::sync::OnceCell::new(),
            open,
            prefix: config.prefix.clone(),
            keys: config.keys,
            encoding: Encoding {
                format: config.format,
                layout: config.layout,
                compression: config.compression,
            },
            remote: !matches!(config.store, Store::Local(_)),
            part_size: usize::try_from(config.part_size).unwrap_or(usize::MAX),
            location,
            local_root: match &config.store {
                Store::Local(local) => Some(local.path.clone()),
                _ => None,
            },
            missing: match &config.store {
                Store::Azure(azure) => Some((
                    "ContainerNotFound",
                    format!(
                        "container {:?} does not exist in account {:?}; create it \
                         (edgespool does not create containers)",
                        azure.container, azure.account
                    ),
                )),
                _ => None,
            },
        }
    }

    /// The store's error as the sink's status shows it: a missing container said so in
    /// a sentence, anything else as the store put it.
    fn explain(&self, error: &object_store::Error) -> String {
        let text = error.to_string();
        match &self.missing {
            Some((code, message)) if text.contains(code) => message.clone(),
            _ => text,
        }
    }
}

/// A local folder; objects appear by atomic rename, never half-written, and durably:
/// `object_store` fsyncs the staged file before the rename and the folder after it (and
/// the folders it creates). The folder is created (durably too) at the first delivery.
fn local_opener(sink: &str, path: PathBuf) -> Opener {
    let sink = sink.to_owned();
    Arc::new(move || {
        crate::durable::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let removed = remove_staging_files(&path);
        if removed > 0 {
            tracing::info!(sink = %sink, files = removed, "removed staging files left by an interrupted write");
        }
        let store = object_store::local::LocalFileSystem::new_with_prefix(&path)
            .map_err(|e| e.to_string())?
            .with_fsync(true);
        Ok(Arc::new(store) as Arc<dyn ObjectStore>)
    })
}

/// The opener of a store this build lacks: it never opens.
fn not_in_build() -> Opener {
    Arc::new(|| Err("this store is not in this build of edgespool".to_owned()))
}

/// HTTP settings shared by the remote stores: plain HTTP only for an `http://` endpoint.
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn client_options(config: &ObjectConfig, endpoint: Option<&str>) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(config.timeout)
        .with_connect_timeout(config.timeout.min(Duration::from_secs(10)))
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

/// A few quick retries inside one attempt (a dropped connection, a 503); longer outages
/// are the uploader's to wait out, with its own backoff and status.
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn retry_config(config: &ObjectConfig) -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: config.timeout.max(Duration::from_secs(10)),
        ..RetryConfig::default()
    }
}

#[cfg(feature = "s3")]
fn expose(secret: Option<&config::Secret>) -> Option<String> {
    secret.map(|s| s.expose().to_owned())
}

#[cfg(feature = "s3")]
fn s3_opener(s3: &S3Store, config: &ObjectConfig) -> Opener {
    let s3 = s3.clone();
    let options = client_options(config, s3.endpoint.as_deref());
    let retry = retry_config(config);
    Arc::new(move || {
        let pick = |key, inline, file| config::one_secret(key, inline, file).ok().flatten();
        let id = expose(pick(
            "access_key_id",
            &s3.access_key_id,
            &s3.access_key_id_file,
        ));
        let key = expose(pick(
            "secret_access_key",
            &s3.secret_access_key,
            &s3.secret_access_key_file,
        ));
        let token = expose(pick(
            "session_token",
            &s3.session_token,
            &s3.session_token_file,
        ));
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_virtual_hosted_style_request(!s3.path_style)
            .with_client_options(options.clone())
            .with_retry(retry.clone());
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder.with_allow_http(
            s3.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
        );
        if let (Some(id), Some(key)) = (id, key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(key);
            if let Some(token) = token {
                builder = builder.with_token(token);
            }
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        Ok(Arc::new(store) as Arc<dyn ObjectStore>)
    })
}

#[cfg(feature = "gcs")]
fn gcs_opener(gcs: &GcsStore, config: &ObjectConfig) -> Opener {
    let gcs = gcs.clone();
    let options = client_options(config, gcs.endpoint.as_deref());
    let retry = retry_config(config);
    Arc::new(move || {
        let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&gcs.bucket)
            .with_client_options(options.clone())
            .with_retry(retry.clone());
        if let Some(endpoint) = &gcs.endpoint {
            builder = builder.with_base_url(endpoint.trim_end_matches('/'));
        }
        if gcs.anonymous {
            // Design: no token is asked for (from Google, or a VM's metadata server).
            // Skipping the signature alone is not enough: object_store 0.14 still asks
            // its credential provider on uploads, so an empty static token stands in.
            let empty = object_store::gcp::GcpCredential {
                bearer: String::new(),
            };
            builder = builder
                .with_skip_signature(true)
                .with_credentials(Arc::new(object_store::StaticCredentialProvider::new(empty)));
        }
        let key = config::one_secret(
            "service_account_key",
            &gcs.service_account_key,
            &gcs.service_account_key_file,
        )
        .ok()
        .flatten();
        if let Some(key) = key {
            builder = builder.with_service_account_key(key.expose());
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        Ok(Arc::new(store) as Arc<dyn ObjectStore>)
    })
}

#[cfg(feature = "azure")]
fn azure_opener(azure: &AzureStore, config: &ObjectConfig) -> Opener {
    let azure = azure.clone();
    let options = client_options(config, azure.endpoint.as_deref());
    let retry = retry_config(config);
    Arc::new(move || {
        let pick = |key, inline, file| config::one_secret(key, inline, file).ok().flatten();
        let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_account(&azure.account)
            .with_container_name(&azure.container)
            .with_client_options(options.clone())
            .with_retry(retry.clone());
        if let Some(endpoint) = &azure.endpoint {
            builder = builder
                .with_endpoint(endpoint.clone())
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(key) = pick("access_key", &azure.access_key, &azure.access_key_file) {
            builder = builder.with_access_key(key.expose());
        }
        if let Some(sas) = pick("sas_token", &azure.sas_token, &azure.sas_token_file) {
            builder = builder.with_config(
                object_store::azure::AzureConfigKey::SasKey,
                sas.expose().trim_start_matches('?'),
            );
        }
        let secret = pick(
            "client_secret",
            &azure.client_secret,
            &azure.client_secret_file,
        );
        if let (Some(id), Some(secret), Some(tenant)) = (&azure.client_id, secret, &azure.tenant_id)
        {
            builder = builder.with_client_secret_authorization(id, secret.expose(), tenant);
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        Ok(Arc::new(store) as Arc<dyn ObjectStore>)
    })
}

/// Deletes `object_store`'s staging files (`{key}#{n}`) below `root`: a write killed
/// half-way leaves one, and the part is written again whole under its real key.
fn remove_staging_files(root: &std::path::Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if is_staging_name(&entry.file_name().to_string_lossy())
                && std::fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[async_trait::async_trait]
impl Sink for ObjectSink {
    fn wants_series(&self) -> bool {
        self.encoding.layout == crate::config::Layout::Wide
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<String, SinkError> {
        let plan = delivery.plan;
        let key = layout::object_key(
            &self.prefix,
            delivery.device,
            plan.partition,
            plan.part,
            encode::extension(self.encoding),
            self.keys,
        );
        let fail = |reason: String| SinkError::Write {
            sink: self.name.clone(),
            key: key.clone(),
            reason,
        };
        let path = ObjectPath::parse(&key).map_err(|e| fail(e.to_string()))?;
        let store = self
            .store
            .get_or_try_init(|| async {
                let open = Arc::clone(&self.open);
                tokio::task::spawn_blocking(move || open())
                    .await
                    .map_err(|e| format!("opening the store failed: {e}"))?
            })
            .await
            .map_err(|reason| SinkError::Setup {
                sink: self.name.clone(),
                reason,
            })?;
        let mut upload = Upload {
            store: Arc::clone(store),
            path,
            // A local folder's staging file is written in pieces of at most 1 MiB.
            piece: if self.remote {
                self.part_size
            } else {
                self.part_size.min(LOCAL_PIECE)
            },
            attributes: self.remote.then(|| self.attributes()),
            pending: Vec::new(),
            writer: None,
        };
        let sent = self.stream(delivery, &mut upload).await;
        let written = match sent {
            Ok(()) => upload.finish().await,
            Err(reason) => {
                upload.abort().await;
                return Err(fail(reason));
            }
        };
        written.map_err(|e| fail(self.explain(&e)))?;
        if let Some(root) = &self.local_root {
            // Design: object_store synced the file's folder and the folders it created;
            // the ones above, up to the root, are synced as well, in case an earlier run
            // created them and died before syncing them. Unchanged folders cost little.
            let (root, file) = (root.clone(), root.join(&key));
            tokio::task::spawn_blocking(move || crate::durable::sync_ancestors(&root, &file))
                .await
                .map_err(|e| fail(format!("syncing the folders failed: {e}")))?
                .map_err(|e| fail(format!("cannot sync the folders: {e}")))?;
        }
        Ok(format!("{}/{key}", self.location.trim_end_matches('/')))
    }
}

/// The most a local folder's write holds before it goes to the staging file.
const LOCAL_PIECE: usize = 1024 * 1024;

impl ObjectSink {
    /// A remote object's Content-Type and Content-Encoding.
    fn attributes(&self) -> Attributes {
        let mut attributes = Attributes::from_iter([(
            Attribute::ContentType,
            encode::content_type(self.encoding.format),
        )]);
        if let Some(coding) = encode::content_encoding(self.encoding) {
            attributes.insert(Attribute::ContentEncoding, coding.into());
        }
        attributes
    }

    /// Encodes the delivery's chunks as they come (on a blocking thread each, the encoder
    /// moving there and back) and hands the bytes to the upload.
    async fn stream(&self, mut delivery: Delivery<'_>, upload: &mut Upload) -> Result<(), String> {
        let mut encoder = Some(Encoder::new(
            self.encoding,
            delivery.device,
            delivery.series,
        )?);
        loop {
            let chunk = delivery.rows.next().await?;
            let mut working = encoder.take().ok_or("the encoder was lost")?;
            let (working, bytes) = tokio::task::spawn_blocking(move || match chunk {
                Some(rows) => {
                    let bytes = working.push(&rows).map(|b| (b, false));
                    let widest = widest_window(&rows);
                    drop(rows);
                    crate::memory::after_chunk(widest);
                    (Some(working), bytes)
                }
                None => (None, working.finish().map(|b| (b, true))),
            })
            .await
            .map_err(|e| format!("the encoder failed: {e}"))
            .and_then(|(working, bytes)| {
                bytes
                    .map(|b| (working, b))
                    .map_err(|e| format!("cannot encode: {e}"))
            })?;
            let (bytes, last) = bytes;
            upload.write(bytes).await.map_err(|e| self.explain(&e))?;
            if last {
                return Ok(());
            }
            encoder = working;
        }
    }
}

/// The most rows of one window start among these (ordered by window start, as a
/// delivery's chunks are): how many series a window of them holds.
fn widest_window(rows: &[crate::flow::WindowRow]) -> usize {
    rows.chunk_by(|a, b| a.start == b.start)
        .map(<[_]>::len)
        .max()
        .unwrap_or(0)
}

/// One object being written: held whole while it fits in one upload part (it then goes
/// as a single PUT), else a multipart upload (a local folder: a staging file) fed a part
/// at a time, with at most one part in flight.
struct Upload {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    /// The size of an upload part.
    piece: usize,
    /// A remote store's attributes; `None` for a local folder.
    attributes: Option<Attributes>,
    /// Bytes not yet handed to a multipart upload.
    pending: Vec<u8>,
    writer: Option<WriteMultipart>,
}

impl Upload {
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), object_store::Error> {
        match &mut self.writer {
            Some(writer) => {
                writer.wait_for_capacity(0).await?;
                writer.write(&bytes);
            }
            None => {
                self.pending.extend_from_slice(&bytes);
                drop(bytes);
                if self.pending.len() > self.piece {
                    let options = object_store::PutMultipartOptions {
                        attributes: self.attributes.clone().unwrap_or_default(),
                        ..Default::default()
                    };
                    let upload = self.store.put_multipart_opts(&self.path, options).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, self.piece);
                    writer.put(bytes::Bytes::from(std::mem::take(&mut self.pending)));
                    self.writer = Some(writer);
                }
            }
        }
        Ok(())
    }

    /// Completes the object: a single PUT of what is held, or the multipart's last part
    /// and its completion (a local folder: fsync, rename, fsync of the folder).
    async fn finish(mut self) -> Result<(), object_store::Error> {
        match self.writer.take() {
            Some(writer) => writer.finish().await.map(|_| ()),
            None => {
                let body = PutPayload::from(std::mem::take(&mut self.pending));
                match self.attributes.take() {
                    Some(attributes) => {
                        let options = PutOptions {
                            attributes,
                            ..PutOptions::default()
                        };
                        self.store.put_opts(&self.path, body, options).await
                    }
                    None => self.store.put(&self.path, body).await,
                }
                .map(|_| ())
            }
        }
    }

    /// Abandons a multipart upload (a local folder: deletes its staging file), so that no
    /// half object and no parts are left behind.
    async fn abort(mut self) {
        if let Some(writer) = self.writer.take()
            && let Err(err) = writer.abort().await
        {
            tracing::warn!(path = %self.path, error = %err, "cannot abort a multipart upload");
        }
    }
}

#[cfg(all(test, feature = "s3", feature = "azure"))]
mod tests {
    use super::*;

    /// The object sink of a one-sink configuration with these store keys.
    fn object_config(store: &str) -> ObjectConfig {
        let text = format!(
            "[agent]\ndevice_id = \"d\"\nspool = \"/tmp/s.db\"\n\n[[sources]]\nkind = \"system\"\n\n[[sinks]]\n{store}\n"
        );
        let config = config::Config::parse(&text, std::path::Path::new("x.toml")).expect("valid");
        match &config.sinks[0].kind {
            config::SinkKind::Object(object) => (**object).clone(),
            other => panic!("an object sink: {other:?}"),
        }
    }

    #[test]
    fn plain_http_only_for_an_endpoint_written_with_http() {
        let allowed = |endpoint: Option<&str>| {
            let config = object_config("kind = \"gcs\"\nbucket = \"b\"");
            client_options(&config, endpoint)
                .get_config_value(&object_store::ClientConfigKey::AllowHttp)
        };
        assert_eq!(
            allowed(Some("http://127.0.0.1:4443")).as_deref(),
            Some("true")
        );
        assert_eq!(
            allowed(Some("https://gcs.example")).as_deref(),
            Some("false")
        );
        assert_eq!(allowed(None).as_deref(), Some("false"));
    }

    #[test]
    fn a_missing_azure_container_is_said_in_a_sentence() {
        let config = object_config("kind = \"azure\"\naccount = \"acct\"\ncontainer = \"raw\"");
        let sink = ObjectSink::new("lake", &config);
        let missing = object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: "Client error with status 404 Not Found: <Code>ContainerNotFound</Code>".into(),
        };
        assert_eq!(
            sink.explain(&missing),
            "container \"raw\" does not exist in account \"acct\"; create it (edgespool does not create containers)"
        );
        let other = object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: "connection refused".into(),
        };
        assert_eq!(
            sink.explain(&other),
            "Generic MicrosoftAzure error: connection refused"
        );
    }

    #[tokio::test]
    async fn a_chunk_of_a_wide_window_gives_free_memory_back_once_encoded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = object_config(&format!(
            "name = \"lake\"\nkind = \"local\"\npath = \"{}\"\nformat = \"parquet\"",
            dir.path().display()
        ));
        let sink = ObjectSink::new("lake", &config);
        let rows: Vec<crate::flow::WindowRow> = (0..crate::memory::TRIM_AFTER_ROWS)
            .map(|i| crate::flow::WindowRow {
                series: Arc::new(crate::flow::Series::new(format!("s.{i}"), None)),
                start: 1_767_225_600,
                seconds: 60,
                stats: crate::flow::Stats::single(i as f64),
            })
            .collect();
        let plan = crate::spool::PartPlan {
            sink: "lake".into(),
            partition: 1_767_225_600,
            seconds: 3600,
            part: 0,
            after_id: 0,
            last_id: rows.len() as i64,
            rows: rows.len() as i64,
        };
        let before = crate::memory::chunk_trims();
        let delivery = Delivery {
            device: "d",
            plan: &plan,
            rows: super::super::Chunks::of(rows, 10_000),
            series: &[],
        };
        sink.deliver(delivery).await.expect("delivered");
        // Other tests may trim at the same time: this one's trims are at least its own.
        assert!(
            crate::memory::chunk_trims() > before,
            "a chunk of one window of {} series was encoded without a trim",
            crate::memory::TRIM_AFTER_ROWS
        );
    }

    #[test]
    fn only_staging_files_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hour = dir.path().join("device=d/year=2026/month=1/day=2/hour=3");
        std::fs::create_dir_all(&hour).expect("mkdir");
        let keep = hour.join("d-20260102T0300-part-0000.ndjson");
        let stale = hour.join("d-20260102T0300-part-0001.ndjson#3");
        std::fs::write(&keep, "{}\n").expect("write");
        std::fs::write(&stale, "{").expect("write");
        assert_eq!(remove_staging_files(dir.path()), 1);
        assert!(keep.exists() && !stale.exists());
        assert!(!is_staging_name("notes#draft") && !is_staging_name("x#"));
    }
}
