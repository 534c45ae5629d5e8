//! One agent per spool: an exclusive `flock(2)` on `NAME.lock` beside the spool, taken
//! before the spool is opened, migrated or moved aside, and held until the writer ends.
//!
//! The kernel drops the lock when its holder dies, `kill -9` included, so a lock is never
//! stale; the file itself stays (removing a lock file races with the next taker) and
//! holds the last holder's pid, which only names who to stop: the lock is what counts.
//!
//! Design: a file of its own rather than the spool file. SQLite locks the spool with
//! POSIX (`fcntl`) locks, which a process loses all at once when it closes *any*
//! descriptor of that file: an extra descriptor on the spool would put SQLite's locks at
//! the mercy of ours. On Linux `flock` and `fcntl` locks are independent, except over
//! NFS, where `flock` is emulated with `fcntl` and would collide with SQLite's. The lock
//! file also survives the spool being moved aside as corrupt, and `status` and
//! `check-config`, which never open it, keep working while an agent runs.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use super::SpoolError;

/// Which file a path names: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The file `path` names now (one `stat`), or `None` if there is none.
    pub fn of_path(path: &Path) -> std::io::Result<Option<FileId>> {
        match rustix::fs::stat(path) {
            Ok(stat) => Ok(Some(FileId::from(&stat))),
            Err(Errno::NOENT) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }

    fn of_file(file: &File) -> std::io::Result<FileId> {
        Ok(FileId::from(&rustix::fs::fstat(file)?))
    }
}

impl From<&rustix::fs::Stat> for FileId {
    // The fields' widths differ between the Pi's targets.
    #[allow(clippy::unnecessary_cast)]
    fn from(stat: &rustix::fs::Stat) -> FileId {
        FileId {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
        }
    }
}

/// What a path names compared with the file a process has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtPath {
    /// The open file itself.
    Same,
    /// Nothing: the file was deleted (or renamed away).
    Gone,
    /// Another file.
    Replaced,
}

impl AtPath {
    /// Compares the file open (`open`) with what the path names (`found`).
    pub fn compare(open: FileId, found: Option<FileId>) -> AtPath {
        match found {
            None => AtPath::Gone,
            Some(id) if id == open => AtPath::Same,
            Some(_) => AtPath::Replaced,
        }
    }
}

/// The lock file of a spool: `NAME.lock` beside `NAME`.
pub fn lock_path(spool: &Path) -> PathBuf {
    let mut name = spool.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The pid a lock file names, if it names one.
fn holder_pid(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

/// The exclusive lock on a spool, held while this value lives.
#[derive(Debug)]
pub struct SpoolLock {
    /// Held open, never read: the lock lives as long as this descriptor.
    _held: File,
    path: PathBuf,
    spool: PathBuf,
    id: FileId,
}

impl SpoolLock {
    /// Takes the lock of `spool` (creating its folder and lock file if needed) without
    /// waiting: [`SpoolError::InUse`] names the holder when another process has it.
    pub fn take(spool: &Path) -> Result<SpoolLock, SpoolError> {
        if let Some(dir) = spool.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::durable::create_dir_all(dir).map_err(|source| SpoolError::Folder {
                path: dir.to_owned(),
                source,
            })?;
        }
        let path = lock_path(spool);
        let io = |source: std::io::Error| SpoolError::Lock {
            path: path.clone(),
            source,
        };
        // A lock file deleted between our open and our flock would lock a file nobody
        // else can find: lock, then check that the path still names what we locked.
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(SpoolError::InUse {
                        path: spool.to_owned(),
                        pid: holder_pid(&text),
                    });
                }
                Err(errno) => return Err(io(errno.into())),
            }
            let id = FileId::of_file(&file).map_err(io)?;
            if FileId::of_path(&path).map_err(io)? != Some(id) {
                continue;
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            writeln!(file, "{}", std::process::id()).map_err(io)?;
            return Ok(SpoolLock {
                _held: file,
                path,
                spool: spool.to_owned(),
                id,
            });
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks (one `stat`) that the lock file is still the one locked; if it was
    /// deleted or replaced, takes the lock again on what the path names now, so that an
    /// agent started next still finds the spool taken. Returns what was found.
    pub fn follow(&mut self) -> Result<AtPath, SpoolError> {
        let found = FileId::of_path(&self.path).map_err(|source| SpoolError::Lock {
            path: self.path.clone(),
            source,
        })?;
        let at_path = AtPath::compare(self.id, found);
        if at_path != AtPath::Same {
            // The old lock is released only once the new one is held.
            *self = SpoolLock::take(&self.spool)?;
        }
        Ok(at_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_the_open_file_nothing_or_another() {
        let open = FileId { dev: 8, ino: 42 };
        assert_eq!(AtPath::compare(open, Some(open)), AtPath::Same);
        assert_eq!(AtPath::compare(open, None), AtPath::Gone);
        let other = FileId { dev: 8, ino: 43 };
        assert_eq!(AtPath::compare(open, Some(other)), AtPath::Replaced);
        let elsewhere = FileId { dev: 9, ino: 42 };
        assert_eq!(AtPath::compare(open, Some(elsewhere)), AtPath::Replaced);
    }

    #[test]
    fn the_holders_pid_is_read_from_the_lock_file() {
        assert_eq!(holder_pid("1234\n"), Some(1234));
        assert_eq!(holder_pid(""), None);
        assert_eq!(holder_pid("0\n"), None);
        assert_eq!(holder_pid("garbage"), None);
    }

    #[test]
    fn the_lock_file_sits_beside_the_spool() {
        assert_eq!(
            lock_path(Path::new("/var/lib/edgespool/spool.db")),
            Path::new("/var/lib/edgespool/spool.db.lock")
        );
    }

    #[test]
    fn a_second_taker_is_refused_with_the_holders_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let first = SpoolLock::take(&spool).expect("the first takes it");
        // flock belongs to the open file description: a second open in this process
        // conflicts as one in another process would.
        match SpoolLock::take(&spool) {
            Err(SpoolError::InUse { path, pid }) => {
                assert_eq!(path, spool);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        let message = SpoolLock::take(&spool).expect_err("still held").to_string();
        assert_eq!(
            message,
            format!(
                "the spool {} is in use by another edgespool (pid {}); stop it first",
                spool.display(),
                std::process::id()
            )
        );
        drop(first);
        SpoolLock::take(&spool).expect("free once the first is dropped");
    }

    #[test]
    fn a_deleted_lock_file_is_taken_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let mut lock = SpoolLock::take(&spool).expect("take");
        assert_eq!(lock.follow().expect("follow"), AtPath::Same);
        std::fs::remove_file(lock.path()).expect("rm the lock file");
        assert_eq!(lock.follow().expect("follow"), AtPath::Gone);
        assert!(matches!(
            SpoolLock::take(&spool),
            Err(SpoolError::InUse { .. })
        ));
    }
}
