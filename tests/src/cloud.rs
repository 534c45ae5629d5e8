//! Emulators of the cloud object stores, for the end-to-end tests: Azurite (Azure Blob
//! Storage, the npm package `azurite`) and gcp-storage-emulator (Google Cloud Storage,
//! from PyPI). Each runs on a free loopback port with its data in its own temp dir, and
//! is stopped on drop (gcp-storage-emulator with the one header it lacks added: see
//! [`GcsEmulator`]). Their objects are listed and downloaded by clients we did not
//! write: Microsoft's `azure-storage-blob` for Azurite, the emulator's own JSON API
//! (GCS's object listing and `alt=media` downloads) through Python's urllib.
//!
//! `scripts/test.sh` installs both (`target/test-node`, `target/test-python`) and sets
//! `EDGESPOOL_REQUIRE_EMULATORS`: a test that finds its emulator missing then fails. Run
//! by hand without it (`cargo test` alone), such a test says `SKIPPED: …` and why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{free_port, python, spawn_listening, stop_child};

/// Azurite's well-known development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";

/// The well-known key of [`AZURITE_ACCOUNT`] (public, the same in every Azurite).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// One object as an emulator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudObject {
    /// Its key (blob or object name).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its Content-Type.
    pub content_type: String,
    /// Azure only: the blocks of its committed block list (0 for a blob written whole
    /// with one Put Blob; a multipart upload commits one block per part).
    pub blocks: u64,
}

/// The objects a client script printed, sorted by key.
/// Why an emulator cannot run, for a test to skip, or a panic with it when
/// `EDGESPOOL_REQUIRE_EMULATORS` is set (as `scripts/test.sh` sets it): the suite as CI
/// runs it never passes a test it did not run.
fn required_unless(missing: Option<String>) -> Option<String> {
    if let Some(reason) = &missing {
        assert!(
            std::env::var_os("EDGESPOOL_REQUIRE_EMULATORS").is_none(),
            "{reason} (EDGESPOOL_REQUIRE_EMULATORS is set: the emulator must be there)"
        );
    }
    missing
}

fn objects_of(listed: &Value) -> Vec<CloudObject> {
    let mut objects: Vec<CloudObject> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|o| CloudObject {
            key: o["key"].as_str().expect("key").to_owned(),
            size: o["size"].as_u64().expect("size"),
            content_type: o["content_type"].as_str().unwrap_or("").to_owned(),
            blocks: o["blocks"].as_u64().unwrap_or(0),
        })
        .collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    objects
}

/// Runs a client script with `args`: what it printed (JSON), or its standard error.
fn run_client(script: &str, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(python())
        .args(["-c", script])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("the client printed no JSON: {e}"))
}

/// The folder `scripts/test.sh` installs npm packages into: `target/test-node`.
fn node_prefix() -> PathBuf {
    let exe = std::env::current_exe().expect("a test knows its own path");
    // target/<profile>/deps/<test> → target/test-node
    exe.ancestors()
        .nth(3)
        .expect("tests run from target/<profile>/deps")
        .join("test-node")
}

/// An Azure Blob Storage client, Microsoft's `azure-storage-blob`.
const AZURE_CLIENT: &str = r#"
import json, os, sys
from azure.storage.blob import BlobServiceClient
endpoint, account, key, command, container = sys.argv[1:6]
service = BlobServiceClient(account_url=endpoint,
                            credential={"account_name": account, "account_key": key},
                            retry_total=0)
if command == "mkcontainer":
    service.create_container(container)
    print("[]")
elif command == "list":
    client = service.get_container_client(container)
    found = []
    for blob in client.list_blobs():
        blocks = client.get_blob_client(blob.name).get_block_list("committed")[0]
        found.append({"key": blob.name, "size": blob.size,
                      "content_type": blob.content_settings.content_type or "",
                      "blocks": len(blocks)})
    print(json.dumps(found))
elif command == "sas":
    import datetime
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    print(json.dumps(generate_container_sas(
        account, container, account_key=key, expiry=expiry,
        permission=ContainerSasPermissions(create=True, write=True))))
elif command == "mirror":
    target = sys.argv[6]
    client = service.get_container_client(container)
    for blob in client.list_blobs():
        path = os.path.join(target, blob.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(client.download_blob(blob.name).readall())
    print("[]")
"#;

/// Azurite's blob service on a free loopback port, its data in a temp dir that outlives
/// a restart; stopped on drop.
pub struct AzuriteServer {
    /// The blob endpoint of the development account:
    /// `http://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    port: u16,
    program: PathBuf,
    data: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl AzuriteServer {
    /// Why Azurite cannot run here (`azurite-blob` not installed), or `None`.
    pub fn unavailable() -> Option<String> {
        let program = AzuriteServer::program();
        required_unless((!program.exists()).then(|| {
            format!(
                "{} is missing: scripts/test.sh installs Azurite with npm (node and npm needed)",
                program.display()
            )
        }))
    }

    fn program() -> PathBuf {
        std::env::var_os("EDGESPOOL_AZURITE")
            .map(PathBuf::from)
            .unwrap_or_else(|| node_prefix().join("node_modules/.bin/azurite-blob"))
    }

    /// Starts Azurite, logging to `log`, and waits until it listens.
    pub fn start(log: &Path) -> AzuriteServer {
        let port = free_port();
        let mut server = AzuriteServer {
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            port,
            program: AzuriteServer::program(),
            data: tempfile::tempdir().expect("tempdir"),
            log: log.to_owned(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut azurite = Command::new(&self.program);
        azurite
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(self.data.path())
            .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"]);
        self.child = Some(spawn_listening(azurite, &self.log, self.port, "Azurite"));
    }

    /// Stops it (SIGTERM, so that it saves its metadata; SIGKILL after 15 s):
    /// connections are refused until [`AzuriteServer::start_again`].
    pub fn stop(&mut self) {
        stop_child(
            self.child.take(),
            rustix::process::Signal::TERM,
            Duration::from_secs(15),
        );
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }

    fn client(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec![self.endpoint.as_str(), AZURITE_ACCOUNT, AZURITE_KEY];
        all.extend_from_slice(args);
        run_client(AZURE_CLIENT, &all)
    }

    /// Creates a container.
    pub fn create_container(&self, container: &str) {
        self.client(&["mkcontainer", container])
            .unwrap_or_else(|e| panic!("cannot create container {container}: {e}"));
    }

    /// Every blob of a container, sorted by key; fails the test if it cannot list.
    pub fn list(&self, container: &str) -> Vec<CloudObject> {
        self.try_list(container)
            .unwrap_or_else(|| panic!("cannot list container {container}"))
    }

    /// [`AzuriteServer::list`], or `None` while it cannot list (for polls).
    pub fn try_list(&self, container: &str) -> Option<Vec<CloudObject>> {
        self.client(&["list", container])
            .ok()
            .map(|listed| objects_of(&listed))
    }

    /// A shared access signature (the query string) that may create and write blobs in
    /// `container` for an hour, and nothing else.
    pub fn write_only_sas(&self, container: &str) -> String {
        let sas = self
            .client(&["sas", container])
            .unwrap_or_else(|e| panic!("cannot make a SAS for {container}: {e}"));
        sas.as_str().expect("a SAS is a string").to_owned()
    }

    /// Downloads every blob of a container below `dir`, keys as paths.
    pub fn mirror(&self, container: &str, dir: &Path) {
        let dir = dir.to_str().expect("utf-8 path");
        self.client(&["mirror", container, dir])
            .unwrap_or_else(|e| panic!("cannot download container {container}: {e}"));
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A GCS client through the JSON API (`storage/v1`), with Python's urllib.
const GCS_CLIENT: &str = r#"
import json, os, sys, urllib.parse, urllib.request
endpoint, command, bucket = sys.argv[1:4]
def get(path):
    with urllib.request.urlopen(endpoint + path, timeout=30) as answer:
        return answer.read()
def objects():
    found, token = [], None
    while True:
        query = "?pageToken=" + urllib.parse.quote(token) if token else ""
        page = json.loads(get("/storage/v1/b/%s/o%s" % (bucket, query)))
        found.extend(page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            return found
if command == "list":
    print(json.dumps([{"key": o["name"], "size": int(o["size"]),
                       "content_type": o.get("contentType", "")} for o in objects()]))
elif command == "mirror":
    target = sys.argv[4]
    for o in objects():
        path = os.path.join(target, o["name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        name = urllib.parse.quote(o["name"], safe="")
        with open(path, "wb") as f:
            f.write(get("/storage/v1/b/%s/o/%s?alt=media" % (bucket, name)))
    print("[]")
"#;

/// Starts gcp-storage-emulator with one addition: an ETag on the answer to an upload
/// (`PUT /bucket/object`, the XML API that `object_store` uses), as GCS sends it for an
/// object written whole (the body's MD5). The emulator answers without one, and
/// `object_store` takes an upload without an ETag for a failure.
const GCS_LAUNCHER: &str = r#"
import hashlib, sys
from gcp_storage_emulator import server, __main__ as cli
from gcp_storage_emulator.handlers import objects
def xml_upload(request, response, storage, *args, **kwargs):
    objects.xml_upload(request, response, storage, *args, **kwargs)
    if response.status == 200:
        response["ETag"] = '"%s"' % hashlib.md5(request.data).hexdigest()
server.HANDLERS = tuple(
    (route, {m: xml_upload if h is objects.xml_upload else h for m, h in handlers.items()})
    for route, handlers in server.HANDLERS)
cli.main(sys.argv[1:])
"#;

/// gcp-storage-emulator on a free loopback port with a bucket made at start, its data
/// on disk in a temp dir that outlives a restart; stopped on drop.
pub struct GcsEmulator {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    bucket: String,
    data: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl GcsEmulator {
    /// Why the emulator cannot run here (the Python package is missing), or `None`.
    pub fn unavailable() -> Option<String> {
        let found = Command::new(python())
            .args(["-c", "import gcp_storage_emulator"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        required_unless((!found).then(|| {
            format!(
                "{} has no gcp_storage_emulator: scripts/test.sh installs it from PyPI",
                python()
            )
        }))
    }

    /// Starts the emulator with `bucket` made, logging to `log`; waits until it listens.
    pub fn start(log: &Path, bucket: &str) -> GcsEmulator {
        let port = free_port();
        let mut server = GcsEmulator {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            bucket: bucket.to_owned(),
            data: tempfile::tempdir().expect("tempdir"),
            log: log.to_owned(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut emulator = Command::new(python());
        emulator
            .args(["-c", GCS_LAUNCHER, "start", "--host", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .args(["--default-bucket", &self.bucket])
            // Its data lives under STORAGE_BASE (else the working folder).
            .env("STORAGE_BASE", self.data.path())
            .current_dir(self.data.path());
        self.child = Some(spawn_listening(
            emulator,
            &self.log,
            self.port,
            "gcp-storage-emulator",
        ));
    }

    /// Stops it: connections are refused until [`GcsEmulator::start_again`].
    pub fn stop(&mut self) {
        stop_child(
            self.child.take(),
            rustix::process::Signal::TERM,
            Duration::from_secs(10),
        );
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }

    fn client(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec![self.endpoint.as_str()];
        all.extend_from_slice(args);
        run_client(GCS_CLIENT, &all)
    }

    /// Every object of the bucket, sorted by key; fails the test if it cannot list.
    pub fn list(&self) -> Vec<CloudObject> {
        self.try_list().expect("the emulator lists the bucket")
    }

    /// [`GcsEmulator::list`], or `None` while it cannot list (for polls).
    pub fn try_list(&self) -> Option<Vec<CloudObject>> {
        self.client(&["list", &self.bucket])
            .ok()
            .map(|listed| objects_of(&listed))
    }

    /// Downloads every object of the bucket below `dir`, keys as paths.
    pub fn mirror(&self, dir: &Path) {
        let dir = dir.to_str().expect("utf-8 path");
        self.client(&["mirror", &self.bucket, dir])
            .unwrap_or_else(|e| panic!("cannot download the bucket: {e}"));
    }
}

impl Drop for GcsEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}
