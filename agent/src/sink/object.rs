//! The object-store sink: one object per part, through `object_store`, so that every
//! backend (a local folder now) shares the keys, encodings and idempotence.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Delivery, Sink, SinkError, encode, layout};
use crate::config::{Format, LocalSink};

pub struct ObjectSink {
    name: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    format: Format,
    /// Where the store is, for log lines ("/data/out", later "s3://bucket").
    location: String,
}

impl ObjectSink {
    /// A sink writing into a local folder; objects appear by atomic rename, never half-written.
    pub fn local(name: &str, config: &LocalSink) -> Result<ObjectSink, SinkError> {
        let setup = |reason: String| SinkError::Setup {
            sink: name.to_owned(),
            reason,
        };
        std::fs::create_dir_all(&config.path)
            .map_err(|e| setup(format!("cannot create {}: {e}", config.path.display())))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&config.path)
            .map_err(|e| setup(e.to_string()))?
            .with_automatic_cleanup(true);
        Ok(ObjectSink {
            name: name.to_owned(),
            store: Arc::new(store),
            prefix: config.prefix.clone(),
            format: config.format,
            location: config.path.display().to_string(),
        })
    }
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
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(format!("{}/{key}", self.location.trim_end_matches('/')))
    }
}
