//! Folders that survive a power cut: creating them and syncing the folders that hold
//! their entries.
//!
//! A file's data is durable once the file is fsynced; its name, and a folder's name, live
//! in the parent folder and are durable once that folder is fsynced. Until then a power
//! cut may take them away even though every process saw them. The spool (its folder) and
//! the local-folder sink (its root and the partition folders) use these helpers; the
//! blocking calls belong on a blocking thread (`tokio::task::spawn_blocking`).

use std::fs::File;
use std::io;
use std::path::Path;

/// fsyncs the folder `dir`, making the entries in it (created, renamed, removed) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Creates `path` and the folders missing above it, then fsyncs the parent of each one
/// created, so that the whole chain survives a power cut. `path`'s own parent is synced
/// even when nothing was missing: an earlier run may have created the folder and died
/// before syncing it.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    // The highest folder that is missing now (or `path` itself when none is).
    let mut top = path;
    while let Some(parent) = top.parent().filter(|p| !p.as_os_str().is_empty()) {
        if parent.exists() {
            break;
        }
        top = parent;
    }
    std::fs::create_dir_all(path)?;
    let end = top.parent().unwrap_or(Path::new(""));
    for dir in path.ancestors().skip(1) {
        sync_dir(dir)?;
        if dir == end {
            break;
        }
    }
    Ok(())
}

/// fsyncs every folder above `file` up to and including `root` (`file` must lie below
/// `root`), so that folders an earlier run created but never synced are durable too.
pub fn sync_ancestors(root: &Path, file: &Path) -> io::Result<()> {
    for dir in file.ancestors().skip(1) {
        if !dir.starts_with(root) {
            break;
        }
        sync_dir(dir)?;
        if dir == root {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_chain_is_created_and_an_existing_one_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).expect("creates the chain");
        assert!(deep.is_dir());
        create_dir_all(&deep).expect("an existing folder is fine");
        let file = deep.join("f");
        std::fs::write(&file, "x").expect("write");
        sync_ancestors(dir.path(), &file).expect("syncs up to the root");
        assert!(create_dir_all(&file.join("below-a-file")).is_err());
    }
}
