//! The WAL index in memory, off the SD card, and the guard that keeps other programs'
//! SQLite out of a live spool.
//!
//! SQLite keeps an index of the WAL's frames in shared memory, by default a file
//! `NAME-shm` beside the database, mapped shared: each commit dirties its header page and
//! one to four pages of its hash table, which the kernel writes back 30 s later, so with a
//! flush a minute every flush paid them again (about 23 KB of the 38 KB a flush wrote,
//! docs/benchmarks.md). edgespool's SQLite is built with
//! `SQLITE_SHM_DIRECTORY="/dev/shm"` (`.cargo/config.toml`, for every build in the
//! repository): the index is the file [`index_path`], `/dev/shm/sqlite-shm-INODE-DEVICE`
//! (hexadecimal, the low 32 bits of each), on a tmpfs. Nothing of it was ever durable:
//! SQLite never syncs it and rebuilds it from the WAL when the first connection opens the
//! database and finds no other holding it (its "dead-man switch" lock, byte
//! [`DMS_OFFSET`] of the file), after a reboot (tmpfs emptied) as after `kill -9`.
//!
//! The hazard: a program that is not edgespool (the `sqlite3` shell, Python's `sqlite3`)
//! looks for the index at `NAME-shm`, would build one of its own there beside ours, and
//! could then read torn pages or, writing, lose or corrupt the agent's WAL. So while the
//! agent runs it holds [`IndexGuard`]: it creates `NAME-shm`, keeps it empty, and holds an
//! open-file-description (`F_OFD_SETLK`) write lock over all of it, dead-man-switch byte
//! included. A foreign SQLite opening the spool asks (`F_GETLK`) who holds that byte, sees
//! a write lock, takes it for an index being rebuilt and retries for about 10 s, then
//! fails with `SQLITE_PROTOCOL` ("locking protocol") before it reads a page.
//! An agent starting while a foreign SQLite has the spool open (it holds a read lock on
//! that byte) is refused: [`SpoolError::OpenElsewhere`] names the file.
//!
//! `/dev/shm` is writable by every user, and the index's name can be guessed, so before
//! the agent opens its spool it checks what is already there under that name
//! ([`check_index`]): a symbolic link, a file of several names or one another user owns
//! is refused ([`SpoolError::IndexNotOurs`]), never opened: SQLite would trust what it
//! holds. Once SQLite has made the index, it is the agent's (its mode is the spool's) and,
//! `/dev/shm` being sticky, no other user can remove or replace it.
//!
//! Design: an OFD lock rather than a classic POSIX one: a process loses its POSIX locks
//! on a file when it closes *any* descriptor of it, OFD locks only with their own
//! descriptor; and two OFD locks of one process conflict, so the unit tests see the
//! refusal as another process would. edgespool's SQLite never opens `NAME-shm` (its index
//! is elsewhere), and `edgespool status`, which reads the spool while the agent runs,
//! never takes the guard.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use super::{FileId, SpoolError};

/// Where edgespool's SQLite keeps WAL indexes: `SQLITE_SHM_DIRECTORY` of
/// `.cargo/config.toml` (checked by a test: the file is found there).
pub const INDEX_DIRECTORY: &str = "/dev/shm";

/// The byte of a `-shm` file SQLite's unix VFS locks as its dead-man switch:
/// `UNIX_SHM_DMS` = `(22 + SQLITE_SHM_NLOCK) * 4 + SQLITE_SHM_NLOCK`, with 8 locks.
pub const DMS_OFFSET: u64 = (22 + 8) * 4 + 8;

/// The WAL index of the database file `file`, as edgespool's SQLite names it.
pub fn index_path(file: FileId) -> PathBuf {
    PathBuf::from(format!(
        "{INDEX_DIRECTORY}/sqlite-shm-{:x}-{:x}",
        file.ino as u32, file.dev as u32
    ))
}

/// `NAME-shm` beside the spool: where another build of SQLite would put the index.
pub fn guard_path(spool: &Path) -> PathBuf {
    let mut name = spool.as_os_str().to_owned();
    name.push("-shm");
    PathBuf::from(name)
}

/// The guard on `NAME-shm`, held while this value lives.
#[derive(Debug)]
pub struct IndexGuard {
    /// Held open, never read or written: the lock lives as long as this descriptor.
    _held: File,
    spool: PathBuf,
    path: PathBuf,
    id: FileId,
}

impl IndexGuard {
    /// Creates `NAME-shm` (empty) and locks it without waiting. Fails with
    /// [`SpoolError::OpenElsewhere`] if another program's SQLite holds a lock there, and
    /// with [`SpoolError::IndexDirectory`] if [`INDEX_DIRECTORY`] cannot hold the index.
    pub fn take(spool: &Path) -> Result<IndexGuard, SpoolError> {
        if let Err(errno) = rustix::fs::access(
            INDEX_DIRECTORY,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        ) {
            return Err(SpoolError::IndexDirectory {
                path: PathBuf::from(INDEX_DIRECTORY),
                source: errno.into(),
            });
        }
        let path = guard_path(spool);
        let io = |source: std::io::Error| SpoolError::IndexGuard {
            path: path.clone(),
            source,
        };
        // As with the lock file: lock, then check that the path still names the file.
        loop {
            // Not through a symbolic link (SQLite opens `-shm` so too): the file is
            // truncated below.
            let held = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io)?;
            if !rustix::fs::fstat(&held)
                .map_err(|e| io(e.into()))
                .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())?
            {
                return Err(io(std::io::Error::other("not a regular file")));
            }
            match lock_whole(&held) {
                Ok(()) => {}
                Err(Errno::AGAIN | Errno::ACCESS) => {
                    return Err(SpoolError::OpenElsewhere {
                        spool: spool.to_owned(),
                        guard: path,
                    });
                }
                Err(errno) => return Err(io(errno.into())),
            }
            let id = FileId::from(&rustix::fs::fstat(&held).map_err(|e| io(e.into()))?);
            if FileId::of_path(&path).map_err(io)? != Some(id) {
                continue;
            }
            // Another build's index left by a program that ended: not ours to keep, and
            // that build rebuilds it from the WAL when it next opens the spool.
            held.set_len(0).map_err(io)?;
            return Ok(IndexGuard {
                _held: held,
                spool: spool.to_owned(),
                path,
                id,
            });
        }
    }

    /// `NAME-shm`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks (one `stat`) that `NAME-shm` is still the file locked; if it was deleted or
    /// replaced (with the spool, or moved aside with it), guards what the path names now.
    pub fn follow(&mut self) -> Result<(), SpoolError> {
        let found = FileId::of_path(&self.path).map_err(|source| SpoolError::IndexGuard {
            path: self.path.clone(),
            source,
        })?;
        if found != Some(self.id) {
            // The old one is let go only once the new one is held.
            *self = IndexGuard::take(&self.spool)?;
        }
        Ok(())
    }
}

/// Checks what `/dev/shm` holds under the index name of the spool `spool` (made here,
/// empty, if it is not there yet: SQLite takes an empty file for an empty database, and
/// the index's name needs its inode): nothing, or a regular file of one name that this
/// process's user owns. Anything else another user could have put there first, to feed
/// SQLite an index of their own or keep the agent from starting; it is refused, not
/// opened.
pub fn check_index(spool: &Path) -> Result<(), SpoolError> {
    let made = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(spool)
        .map_err(|source| SpoolError::IndexGuard {
            path: spool.to_owned(),
            source,
        })?;
    let id = FileId::from(
        &rustix::fs::fstat(&made).map_err(|e| SpoolError::IndexGuard {
            path: spool.to_owned(),
            source: e.into(),
        })?,
    );
    drop(made);
    let path = index_path(id);
    let refused = |why: &str| SpoolError::IndexNotOurs {
        path: path.clone(),
        why: why.to_owned(),
    };
    let stat = match rustix::fs::lstat(&path) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(errno) => {
            return Err(SpoolError::IndexDirectory {
                path: path.clone(),
                source: errno.into(),
            });
        }
    };
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    if kind.is_symlink() {
        return Err(refused("a symbolic link"));
    }
    if !kind.is_file() {
        return Err(refused("not a regular file"));
    }
    if stat.st_nlink != 1 {
        return Err(refused("a file of several names"));
    }
    let user = rustix::process::geteuid().as_raw();
    if stat.st_uid != user {
        return Err(refused(&format!(
            "owned by user {}, not by this agent's {user}",
            stat.st_uid
        )));
    }
    Ok(())
}

/// A non-blocking OFD write lock over the whole file (`l_len` 0: to its end, however it
/// grows), through the syscall itself: on 32-bit targets `fcntl64` with a 64-bit
/// `struct flock64`, the layout `F_OFD_SETLK` needs there.
fn lock_whole(file: &File) -> Result<(), Errno> {
    // SAFETY: a zeroed `flock64` is valid (integers only).
    let mut lock: libc::flock64 = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as _;
    lock.l_whence = libc::SEEK_SET as _;
    lock.l_start = 0;
    lock.l_len = 0;
    #[cfg(target_pointer_width = "32")]
    let call = libc::SYS_fcntl64;
    #[cfg(target_pointer_width = "64")]
    let call = libc::SYS_fcntl;
    // SAFETY: the descriptor is open for the call's duration and `lock` outlives it.
    let rc = unsafe {
        libc::syscall(
            call,
            file.as_raw_fd(),
            libc::F_OFD_SETLK,
            &lock as *const libc::flock64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_man_switch_is_byte_128() {
        assert_eq!(DMS_OFFSET, 128);
    }

    #[test]
    fn the_index_is_named_by_inode_and_device_in_hex() {
        let id = FileId {
            dev: 0x803,
            ino: 0x1_0000_2a2b,
        };
        assert_eq!(
            index_path(id),
            Path::new("/dev/shm/sqlite-shm-2a2b-803"),
            "the low 32 bits of each, as SQLite's `(u32)` casts"
        );
        assert_eq!(
            guard_path(Path::new("/var/lib/edgespool/spool.db")),
            Path::new("/var/lib/edgespool/spool.db-shm")
        );
    }

    #[test]
    fn a_second_guard_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let first = IndexGuard::take(&spool).expect("the first takes it");
        let err = IndexGuard::take(&spool).expect_err("held");
        assert_eq!(
            err.to_string(),
            format!(
                "the spool {} is open in another program (it holds a lock on {}): close it (an sqlite3 shell, a script) and start the agent again; `edgespool status` reads a spool safely",
                spool.display(),
                guard_path(&spool).display()
            )
        );
        // Closing another descriptor of the file keeps the lock (a POSIX lock would go).
        drop(File::open(guard_path(&spool)).expect("open it again"));
        assert!(matches!(
            IndexGuard::take(&spool),
            Err(SpoolError::OpenElsewhere { .. })
        ));
        drop(first);
        IndexGuard::take(&spool).expect("free once the first is dropped");
    }

    #[test]
    fn a_deleted_guard_file_is_made_and_locked_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let mut guard = IndexGuard::take(&spool).expect("take");
        std::fs::remove_file(guard.path()).expect("rm");
        guard.follow().expect("follow");
        assert!(guard.path().exists());
        assert!(matches!(
            IndexGuard::take(&spool),
            Err(SpoolError::OpenElsewhere { .. })
        ));
    }

    /// Removes a file put in /dev/shm by a test, even when the test fails.
    struct Planted(PathBuf);

    impl Drop for Planted {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn index_of(spool: &Path) -> PathBuf {
        std::fs::write(spool, b"").expect("an empty spool");
        index_path(FileId::of_path(spool).expect("stat").expect("there"))
    }

    fn refusal(spool: &Path) -> String {
        check_index(spool).expect_err("refused").to_string()
    }

    #[test]
    fn an_index_name_another_user_could_have_taken_first_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let index = index_of(&spool);
        let text = |why: &str| {
            format!(
                "the spool's WAL index {} is not this agent's ({why}): another user may have made it; remove it and start the agent again",
                index.display()
            )
        };
        // An index left at this name by a killed test whose spool had this inode before.
        let _ = std::fs::remove_file(&index);
        check_index(&spool).expect("nothing there yet");

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").expect("target");
        std::os::unix::fs::symlink(&target, &index).expect("symlink");
        let planted = Planted(index.clone());
        assert_eq!(refusal(&spool), text("a symbolic link"));
        drop(planted);

        std::fs::write(&index, b"").expect("a file");
        let planted = Planted(index.clone());
        let second = PathBuf::from(format!("{}-second-name", index.display()));
        std::fs::hard_link(&index, &second).expect("link");
        let _second = Planted(second.clone());
        assert_eq!(refusal(&spool), text("a file of several names"));
        std::fs::remove_file(&second).expect("rm the second name");
        check_index(&spool).expect("one name, this user's: SQLite's own, left by a kill");

        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&index, Some(65534), None).expect("chown");
            assert_eq!(
                refusal(&spool),
                text("owned by user 65534, not by this agent's 0")
            );
        }
        drop(planted);
    }

    #[test]
    fn a_spool_that_is_not_there_yet_is_made_empty_to_name_its_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("new.db");
        check_index(&spool).expect("checked");
        assert_eq!(std::fs::metadata(&spool).expect("made").len(), 0);
    }

    #[test]
    fn the_guard_file_is_not_opened_through_a_symbolic_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.db");
        let target = dir.path().join("precious");
        std::fs::write(&target, b"kept").expect("target");
        std::os::unix::fs::symlink(&target, guard_path(&spool)).expect("symlink");
        let err = IndexGuard::take(&spool).expect_err("refused");
        assert!(matches!(err, SpoolError::IndexGuard { .. }), "{err}");
        assert_eq!(std::fs::read(&target).expect("read"), b"kept");
    }
}
