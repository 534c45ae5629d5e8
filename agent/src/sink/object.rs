//! The object-store sink: one object per part, through `object_store`, so that every
//! backend (a local folder now) shares the keys, encodings and idempotence.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Delivery, Sink, SinkError, encode, layout};
use crate::config::{Format, LocalSink};

/// Opens the store; called until it succeeds (a folder on a disk not yet mounted).
type Opener = Box<dyn Fn() -> Result<Arc<dyn ObjectStore>, String> + Send + Sync>;

pub struct ObjectSink {
    name: String,
    store: tokio::sync::OnceCell<Arc<dyn ObjectStore>>,
    open: Opener,
    prefix: String,
    format: Format,
    /// Where the store is, for log lines ("/data/out", later "s3://bucket").
    location: String,
}

impl ObjectSink {
    /// A sink writing into a local folder; objects appear by atomic rename, never
    /// half-written. The folder is created at the first delivery, and a failure to create
    /// it is retried like any failed write.
    pub fn local(name: &str, config: &LocalSink) -> ObjectSink {
        let path = config.path.clone();
        let sink = name.to_owned();
        let open: Opener = Box::new(move || {
            std::fs::create_dir_all(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let removed = remove_staging_files(&path);
            if removed > 0 {
                tracing::info!(sink = %sink, files = removed, "removed staging files left by an interrupted write");
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(&path)
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(store) as Arc<dyn ObjectStore>)
        });
        ObjectSink {
            name: name.to_owned(),
            store: tokio::sync::OnceCell::new(),
            open,
            prefix: config.prefix.clone(),
            format: config.format,
            location: config.path.display().to_string(),
        }
    }
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
    async fn deliver(&self, delivery: Delivery<'_>) -> Result<String, SinkError> {
        let plan = delivery.plan;
        let key = layout::object_key(
            &self.prefix,
            delivery.device,
            plan.partition,
            plan.part,
            encode::extension(self.format),
        );
        let body = encode::encode(self.format, delivery.device, delivery.rows);
        let fail = |reason: String| SinkError::Write {
            sink: self.name.clone(),
            key: key.clone(),
            reason,
        };
        let path = ObjectPath::parse(&key).map_err(|e| fail(e.to_string()))?;
        let store = self
            .store
            .get_or_try_init(|| async { (self.open)() })
            .await
            .map_err(|reason| SinkError::Setup {
                sink: self.name.clone(),
                reason,
            })?;
        store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(format!("{}/{key}", self.location.trim_end_matches('/')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_staging_files_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hour = dir
            .path()
            .join("device=d/year=2026/month=01/day=02/hour=03");
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
