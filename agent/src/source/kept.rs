//! Files read every tick, kept open and read again from offset 0.
//!
//! A sysfs attribute or a /proc file gives its current value to every read from offset 0
//! (`pread`), so the agent opens each one once instead of opening, reading and closing it
//! every second: one system call per file and tick instead of five.
//!
//! - **Reopened when it has to be.** A read that fails on the kept descriptor (a hwmon
//!   device unplugged: the old attribute answers `ENODEV`) drops it and opens the path
//!   again at once, so a device that came back is read in the same tick. A file on any
//!   other file system than sysfs or /proc can be replaced under its name (renamed over,
//!   renamed away, removed and made again): a file its path no longer names is reopened
//!   by name. A reader that has a [`LinkWatch`] asks the kernel to tell it (inotify:
//!   `IN_ATTRIB`, which an unlink or a rename over the file raises, and `IN_MOVE_SELF`)
//!   and checks the name (one `stat` of the path, against the kept file's device and
//!   inode) only of a file it was told of; without one (no inotify, no watch left) and on
//!   a network or FUSE file system (where inotify sees only this machine's changes) the
//!   name is checked before each read. A file's watch goes with the file it was put on.
//! - **Bounded.** At most [`KEEP_AT_MOST`] files are kept open in the whole process (and
//!   never more than half the soft `RLIMIT_NOFILE`, which [`raise_open_file_limit`]
//!   raises to the hard limit at start): beyond that a file is opened, read and closed
//!   each time, as before. The kernel keeps a page-sized buffer for each open sysfs
//!   attribute once read, so 4,096 files cost it up to 16 MiB.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The most files kept open at a time across the agent.
pub const KEEP_AT_MOST: usize = 4096;

/// `statfs` magic numbers of the file systems whose files cannot be replaced by name.
const SYSFS_MAGIC: u64 = 0x6265_6572;
const PROC_SUPER_MAGIC: u64 = 0x9fa0;

/// `statfs` magic numbers of the file systems whose files another machine or a user-space
/// server can change without inotify hearing of it: NFS, SMB (three), FUSE (sshfs, rclone,
/// gvfs), 9p, Ceph, AFS, Coda.
const REMOTE_MAGICS: [u64; 9] = [
    0x6969,
    0x517b,
    0xff53_4d42,
    0xfe53_4d42,
    0x6573_5546,
    0x0102_1997,
    0x00c3_6400,
    0x5346_414f,
    0x7375_7245,
];

/// Raises the soft limit on open files to the hard limit; returns the soft limit now in
/// force (`None` when it cannot be read). Called once at start, before the sources open
/// their files.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // Refused (a container's policy): the agent keeps fewer files open.
        let _ = setrlimit(Resource::Nofile, raised);
    }
    // `None` is "unlimited".
    Some(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// How many files may be kept open, shared by every [`KeptFile`] made with it.
#[derive(Debug)]
pub struct OpenBudget {
    limit: usize,
    kept: AtomicUsize,
}

impl OpenBudget {
    /// A budget of `limit` kept files.
    pub fn new(limit: usize) -> Arc<OpenBudget> {
        Arc::new(OpenBudget {
            limit,
            kept: AtomicUsize::new(0),
        })
    }

    /// The process's budget: [`KEEP_AT_MOST`], or half the soft open-file limit if that
    /// is lower (the rest is for the spool, sockets and files read once).
    pub fn shared() -> Arc<OpenBudget> {
        static SHARED: OnceLock<Arc<OpenBudget>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(|| {
            let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX);
            let half = usize::try_from(soft / 2).unwrap_or(usize::MAX);
            OpenBudget::new(KEEP_AT_MOST.min(half))
        }))
    }

    /// How many files are kept open now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.kept.load(Ordering::Relaxed)
    }

    fn take(self: &Arc<Self>) -> Option<Slot> {
        self.kept
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }
}

/// One file of the budget; given back on drop.
#[derive(Debug)]
struct Slot(Arc<OpenBudget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.kept.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the kernel told of the kept files' links since the last round of reads: one
/// inotify descriptor for the files of a reader.
///
/// Design: an event is queued by the unlink or rename itself, so a [`LinkWatch::poll`]
/// before each round of reads sees every replacement done before it, as a link check
/// before each read would, for one `read` of the descriptor per round instead of one
/// `fstat` per file. `IN_ATTRIB` also comes with other changes of the file's metadata
/// (`chmod`, `touch`): those only cost the file one link check. The descriptor is made
/// with the first watch: a reader of sysfs and /proc files alone has none, and its
/// polls make no system call.
#[derive(Debug)]
pub struct LinkWatch {
    /// Unset until the first watch; `None` when inotify could not be set up: every
    /// file is then checked at each read.
    inotify: std::cell::OnceCell<Option<OwnedFd>>,
    /// How many kept files use each watch: the kernel gives the same watch to every path
    /// of one file (the same file read twice, a hard link).
    users: std::cell::RefCell<HashMap<i32, u32>>,
    /// Watches with an event since the last poll.
    touched: HashSet<i32>,
    /// Events were lost (the queue overflowed, or it could not be read): check all.
    all: bool,
    buf: Vec<MaybeUninit<u8>>,
}

impl LinkWatch {
    /// A watch with an inotify instance of its own once it watches a file; without
    /// inotify, one that checks every file at each read.
    pub fn new() -> LinkWatch {
        LinkWatch {
            inotify: std::cell::OnceCell::new(),
            users: std::cell::RefCell::new(HashMap::new()),
            touched: HashSet::new(),
            all: false,
            buf: Vec::new(),
        }
    }

    /// Takes in what the kernel told since the last call; call before each round of
    /// reads.
    pub fn poll(&mut self) {
        use rustix::fs::inotify::{ReadFlags, Reader};
        self.touched.clear();
        self.all = false;
        let Some(Some(inotify)) = self.inotify.get() else {
            return;
        };
        if self.buf.is_empty() {
            self.buf = vec![MaybeUninit::uninit(); 4096];
        }
        let mut reader = Reader::new(inotify, &mut self.buf);
        // Bounded: the queue holds at most max_queued_events; past it, check all.
        for _ in 0..65_536 {
            match reader.next() {
                Ok(event) => {
                    if event.events().contains(ReadFlags::QUEUE_OVERFLOW) {
                        self.all = true;
                    }
                    self.touched.insert(event.wd());
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => break,
            }
        }
        self.all = true;
    }

    /// Watches the file `path` names now for changes of its links; `None` when it
    /// cannot (no inotify, the user's watches used up).
    fn add(&self, path: &Path) -> Option<i32> {
        use rustix::fs::inotify::{CreateFlags, WatchFlags, add_watch, init};
        let inotify = self
            .inotify
            .get_or_init(|| init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok())
            .as_ref()?;
        let wd = add_watch(inotify, path, WatchFlags::ATTRIB | WatchFlags::MOVE_SELF).ok()?;
        *self.users.borrow_mut().entry(wd).or_default() += 1;
        Some(wd)
    }

    /// One kept file no longer uses watch `wd`; the last one drops it, so that files
    /// renamed away and kept elsewhere (a rotated file) do not use up the user's
    /// watches. The kernel has already dropped the watch of a file that no longer
    /// exists: that error is moot.
    fn remove(&self, wd: i32) {
        let mut users = self.users.borrow_mut();
        let Some(count) = users.get_mut(&wd) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            users.remove(&wd);
            if let Some(Some(inotify)) = self.inotify.get() {
                let _ = rustix::fs::inotify::remove_watch(inotify, wd);
            }
        }
    }

    /// The watches in use, for the tests.
    #[cfg(test)]
    fn watches(&self) -> usize {
        self.users.borrow().len()
    }

    /// Whether the kernel told of a change of watch `wd` since the last round.
    fn told(&self, wd: i32) -> bool {
        self.all || self.touched.contains(&wd)
    }
}

impl Default for LinkWatch {
    fn default() -> Self {
        LinkWatch::new()
    }
}

/// How a kept file is known to be still the one its path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkCheck {
    /// On sysfs or /proc: always.
    Never,
    /// Its name is checked before each read.
    EachRead,
    /// Its name is checked when the [`LinkWatch`] was told of this watch.
    Told(i32),
}

#[derive(Debug)]
struct Open {
    file: File,
    /// Its device and inode, which its path names while it is the file there.
    id: (u64, u64),
    /// Whether and how to check that the file was not replaced by name.
    check: LinkCheck,
    _slot: Slot,
}

/// A file read whole, again and again. It holds no buffer of its own: the reader passes
/// one, shared by all the files it reads (10,000 files, one buffer).
#[derive(Debug)]
pub struct KeptFile {
    path: PathBuf,
    budget: Arc<OpenBudget>,
    open: Option<Open>,
    /// Names checked (`stat`s of the path), for the tests.
    link_checks: u64,
}

impl KeptFile {
    /// The file at `path`, opened at its first read.
    pub fn new(path: PathBuf, budget: Arc<OpenBudget>) -> KeptFile {
        KeptFile {
            path,
            budget,
            open: None,
            link_checks: 0,
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file as it is now, read into `bytes`; its name checked before each read
    /// if it is on another file system than sysfs or /proc.
    pub fn read<'b>(&mut self, bytes: &'b mut Vec<u8>) -> io::Result<&'b str> {
        self.read_told(bytes, None)
    }

    /// [`KeptFile::read`], its name checked only when `watch` was told of a change (call
    /// [`LinkWatch::poll`] before each round of reads); `watch` must be the same for
    /// every read of this file.
    pub fn read_watched<'b>(
        &mut self,
        bytes: &'b mut Vec<u8>,
        watch: &LinkWatch,
    ) -> io::Result<&'b str> {
        self.read_told(bytes, Some(watch))
    }

    fn read_told<'b>(
        &mut self,
        bytes: &'b mut Vec<u8>,
        watch: Option<&LinkWatch>,
    ) -> io::Result<&'b str> {
        let kept_read = match &self.open {
            Some(open) => {
                let check = match open.check {
                    LinkCheck::Never => false,
                    LinkCheck::EachRead => true,
                    LinkCheck::Told(wd) => watch.is_none_or(|w| w.told(wd)),
                };
                if check {
                    self.link_checks += 1;
                }
                let named = !check || names(&self.path, open.id);
                named.then(|| read_whole(&open.file, bytes)).transpose()
            }
            None => Ok(None),
        };
        match kept_read {
            Ok(Some(())) => {}
            // Not kept, replaced, or the kept descriptor failed: open the path again.
            Ok(None) | Err(_) => {
                if let Some(Open {
                    check: LinkCheck::Told(wd),
                    ..
                }) = self.open.take()
                {
                    watch.inspect(|w| w.remove(wd));
                }
                let file = File::open(&self.path)?;
                read_whole(&file, bytes)?;
                if let Some(slot) = self.budget.take() {
                    let meta = file.metadata()?;
                    let id = (meta.dev(), meta.ino());
                    let check = match file_system(&file) {
                        FileSystem::Kernel => LinkCheck::Never,
                        FileSystem::Remote => LinkCheck::EachRead,
                        FileSystem::Local => match watch.and_then(|w| w.add(&self.path)) {
                            // The watch is on the file read, not on one put in its place
                            // in between.
                            Some(wd) if names(&self.path, id) => LinkCheck::Told(wd),
                            Some(wd) => {
                                watch.inspect(|w| w.remove(wd));
                                LinkCheck::EachRead
                            }
                            None => LinkCheck::EachRead,
                        },
                    };
                    self.open = Some(Open {
                        file,
                        id,
                        check,
                        _slot: slot,
                    });
                }
            }
        }
        std::str::from_utf8(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not valid UTF-8"))
    }

    /// How many times its link count was checked.
    #[cfg(test)]
    pub fn link_checks(&self) -> u64 {
        self.link_checks
    }

    /// Whether a descriptor is kept open now.
    #[cfg(test)]
    fn is_kept(&self) -> bool {
        self.open.is_some()
    }

    /// The kept descriptor's number.
    #[cfg(test)]
    fn kept_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.open.as_ref().map(|o| o.file.as_raw_fd())
    }
}

/// Whether `path` names the file of device and inode `id` now: not when the file was
/// renamed over, renamed away or removed (nor when the path cannot be read: the file is
/// then opened again, and that open's error is the read's).
fn names(path: &Path, id: (u64, u64)) -> bool {
    std::fs::metadata(path).is_ok_and(|named| (named.dev(), named.ino()) == id)
}

/// What a file's file system tells of changes to its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileSystem {
    /// sysfs or /proc: a file is never replaced by name.
    Kernel,
    /// Another machine or a user-space server can replace a file unseen by inotify.
    Remote,
    /// Any other: inotify hears of every change.
    Local,
}

fn file_system(file: &File) -> FileSystem {
    rustix::fs::fstatfs(file).map_or(FileSystem::Local, |fs| {
        // f_type's integer type differs between targets.
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        file_system_of(fs.f_type as u64)
    })
}

fn file_system_of(magic: u64) -> FileSystem {
    if magic == SYSFS_MAGIC || magic == PROC_SUPER_MAGIC {
        FileSystem::Kernel
    } else if REMOTE_MAGICS.contains(&magic) {
        FileSystem::Remote
    } else {
        FileSystem::Local
    }
}

/// Reads `file` from offset 0 into `bytes`. A read that returns less than it was given
/// room for has reached the end: sysfs returns an attribute (at most a page) in one read,
/// and a regular file is short only at its end.
fn read_whole(file: &File, bytes: &mut Vec<u8>) -> io::Result<()> {
    bytes.clear();
    loop {
        if bytes.capacity() - bytes.len() < 64 {
            bytes.reserve(bytes.capacity().max(256));
        }
        let filled = bytes.len();
        bytes.resize(bytes.capacity(), 0);
        let read = file.read_at(&mut bytes[filled..], filled as u64);
        let room = bytes.len() - filled;
        match read {
            Ok(n) => {
                bytes.truncate(filled + n);
                if n < room {
                    return Ok(());
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => bytes.truncate(filled),
            Err(err) => {
                bytes.truncate(filled);
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn target_of(fd: i32) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("the kept descriptor is open")
    }

    #[test]
    fn a_file_is_opened_once_and_read_again_from_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("temp1_input");
        std::fs::write(&path, "41000\n").expect("write");
        let mut file = KeptFile::new(path.clone(), OpenBudget::new(8));
        assert_eq!(file.read(&mut Vec::new()).expect("first read"), "41000\n");
        let fd = file.kept_fd().expect("kept after the first read");
        // Rewritten in place (the same inode, as sysfs does): the same descriptor reads
        // the new value, a shorter one too.
        std::fs::write(&path, "9\n").expect("rewrite");
        assert_eq!(file.read(&mut Vec::new()).expect("second read"), "9\n");
        assert_eq!(file.kept_fd(), Some(fd), "not reopened");
        assert_eq!(target_of(fd), path);
        let long = "7".repeat(10_000);
        std::fs::write(&path, &long).expect("rewrite longer than the buffer");
        assert_eq!(file.read(&mut Vec::new()).expect("third read"), long);
        assert_eq!(file.kept_fd(), Some(fd), "not reopened");
    }

    #[test]
    fn a_file_renamed_over_is_read_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w1_slave");
        std::fs::write(&path, "1\n").expect("write");
        let mut file = KeptFile::new(path.clone(), OpenBudget::new(8));
        assert_eq!(file.read(&mut Vec::new()).expect("read"), "1\n");
        let old = file.kept_fd().expect("kept");
        let staged = dir.path().join("w1_slave.new");
        std::fs::write(&staged, "2\n").expect("write the new one");
        std::fs::rename(&staged, &path).expect("rename over");
        assert_eq!(
            file.read(&mut Vec::new()).expect("read after the rename"),
            "2\n"
        );
        let new = file.kept_fd().expect("kept again");
        assert_eq!(target_of(new), path);
        // The old descriptor was closed, not leaked: the number may be reused, but then
        // it names the new file.
        assert!(old == new || std::fs::read_link(format!("/proc/self/fd/{old}")).is_err());
    }

    #[test]
    fn a_watched_file_is_checked_only_when_the_kernel_tells_of_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("temp1_input");
        std::fs::write(&path, "1\n").expect("write");
        let mut watch = LinkWatch::new();
        let mut file = KeptFile::new(path.clone(), OpenBudget::new(8));
        let mut read = |file: &mut KeptFile| {
            watch.poll();
            file.read_watched(&mut Vec::new(), &watch)
                .map(str::to_owned)
        };
        for value in ["1", "22", "3"] {
            // Rewritten in place: no event, no check, the new value.
            std::fs::write(&path, format!("{value}\n")).expect("rewrite");
            assert_eq!(read(&mut file).expect("read"), format!("{value}\n"));
        }
        assert_eq!(file.link_checks, 0, "no fstat while nothing was told");
        // Renamed over: told, checked once, read anew.
        let staged = dir.path().join("temp1_input.new");
        std::fs::write(&staged, "4\n").expect("write the new one");
        std::fs::rename(&staged, &path).expect("rename over");
        assert_eq!(read(&mut file).expect("read after the rename"), "4\n");
        assert_eq!(file.link_checks, 1);
        assert_eq!(target_of(file.kept_fd().expect("kept again")), path);
        assert_eq!(read(&mut file).expect("read again"), "4\n");
        assert_eq!(file.link_checks, 1, "the new file is watched");
        // Its mode changed: told, checked, still the same file.
        let kept = file.kept_fd();
        let mode = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(&path, mode).expect("chmod");
        assert_eq!(read(&mut file).expect("read after chmod"), "4\n");
        assert_eq!((file.link_checks, file.kept_fd()), (2, kept));
        // Removed: an error; made again: read.
        std::fs::remove_file(&path).expect("unplugged");
        let err = read(&mut file).expect_err("a removed file cannot be read");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::write(&path, "5\n").expect("plugged back");
        assert_eq!(read(&mut file).expect("read once it is back"), "5\n");
        assert_eq!(read(&mut file).expect("and again"), "5\n");
        assert_eq!(file.link_checks, 3);
        assert!(
            watch.inotify.get().is_some_and(Option::is_some),
            "inotify is available, made with the first watch"
        );
    }

    /// The watches listed in `/proc/self/fdinfo` of the inotify descriptor of `watch`.
    fn kernel_watches(watch: &LinkWatch) -> usize {
        use std::os::fd::AsRawFd;
        let fd = watch
            .inotify
            .get()
            .and_then(Option::as_ref)
            .expect("inotify made")
            .as_raw_fd();
        std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .expect("fdinfo")
            .lines()
            .filter(|line| line.starts_with("inotify wd:"))
            .count()
    }

    #[test]
    fn a_file_renamed_away_is_read_anew_and_its_watch_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("value");
        std::fs::write(&path, "0\n").expect("write");
        let mut watch = LinkWatch::new();
        let mut watched = KeptFile::new(path.clone(), OpenBudget::new(8));
        let mut unwatched = KeptFile::new(path.clone(), OpenBudget::new(8));
        watch.poll();
        assert_eq!(
            watched.read_watched(&mut Vec::new(), &watch).expect("read"),
            "0\n"
        );
        assert_eq!(unwatched.read(&mut Vec::new()).expect("read"), "0\n");
        // Rotated: the file renamed away (still linked, under another name) and a new
        // one made under the path, three times over.
        for round in 1..=3 {
            std::fs::rename(&path, dir.path().join(format!("value.{round}"))).expect("rotate");
            std::fs::write(&path, format!("{round}\n")).expect("the new file");
            watch.poll();
            assert_eq!(
                watched.read_watched(&mut Vec::new(), &watch).expect("read"),
                format!("{round}\n"),
                "the watched file, round {round}"
            );
            assert_eq!(
                unwatched.read(&mut Vec::new()).expect("read"),
                format!("{round}\n"),
                "the file checked at each read, round {round}"
            );
        }
        assert_eq!(target_of(watched.kept_fd().expect("kept")), path);
        assert_eq!(watch.watches(), 1, "one watch: the current file's");
        assert_eq!(
            kernel_watches(&watch),
            1,
            "the rotated files' watches were dropped"
        );
    }

    #[test]
    fn a_watch_two_kept_files_share_stays_while_one_of_them_uses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join("first");
        let second = dir.path().join("second");
        std::fs::write(&first, "1\n").expect("write");
        std::fs::hard_link(&first, &second).expect("a second name of the same file");
        let mut watch = LinkWatch::new();
        let budget = OpenBudget::new(8);
        let mut files = [
            KeptFile::new(first.clone(), Arc::clone(&budget)),
            KeptFile::new(second.clone(), Arc::clone(&budget)),
        ];
        let mut read_all = |files: &mut [KeptFile]| -> Vec<String> {
            watch.poll();
            files
                .iter_mut()
                .map(|f| {
                    f.read_watched(&mut Vec::new(), &watch)
                        .expect("read")
                        .to_owned()
                })
                .collect()
        };
        assert_eq!(read_all(&mut files), ["1\n", "1\n"]);
        // The kernel gives one watch to the file's two names.
        let staged = dir.path().join("staged");
        std::fs::write(&staged, "2\n").expect("write");
        std::fs::rename(&staged, &first).expect("rename over the first name");
        assert_eq!(read_all(&mut files), ["2\n", "1\n"]);
        // A round with no change, which takes in what the first file's reopening queued.
        assert_eq!(read_all(&mut files), ["2\n", "1\n"]);
        // The second name's file is still watched: replaced, it is read anew.
        std::fs::write(&staged, "3\n").expect("write");
        std::fs::rename(&staged, &second).expect("rename over the second name");
        assert_eq!(read_all(&mut files), ["2\n", "3\n"]);
    }

    #[test]
    fn network_and_fuse_files_are_checked_at_each_read() {
        assert_eq!(file_system_of(SYSFS_MAGIC), FileSystem::Kernel);
        assert_eq!(file_system_of(PROC_SUPER_MAGIC), FileSystem::Kernel);
        // NFS, CIFS, FUSE.
        for magic in [0x6969, 0xff53_4d42, 0x6573_5546] {
            assert_eq!(file_system_of(magic), FileSystem::Remote, "{magic:#x}");
        }
        // ext4, tmpfs, btrfs, f2fs (an SD card's).
        for magic in [0xef53, 0x0102_1994, 0x9123_683e, 0xf2f5_2010] {
            assert_eq!(file_system_of(magic), FileSystem::Local, "{magic:#x}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("value");
        std::fs::write(&path, "1\n").expect("write");
        let file = File::open(&path).expect("open");
        assert_eq!(
            file_system(&file),
            FileSystem::Local,
            "the temp dir's file system"
        );
    }

    #[test]
    fn without_a_watch_a_file_is_checked_at_each_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("temp1_input");
        std::fs::write(&path, "1\n").expect("write");
        let mut file = KeptFile::new(path, OpenBudget::new(8));
        for _ in 0..3 {
            assert_eq!(file.read(&mut Vec::new()).expect("read"), "1\n");
        }
        // The first read opened it: the two after were checked.
        assert_eq!(file.link_checks, 2);
    }

    #[test]
    fn a_file_removed_is_an_error_and_read_again_once_it_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in0_input");
        std::fs::write(&path, "5\n").expect("write");
        let budget = OpenBudget::new(8);
        let mut file = KeptFile::new(path.clone(), Arc::clone(&budget));
        assert_eq!(file.read(&mut Vec::new()).expect("read"), "5\n");
        assert_eq!(budget.kept(), 1);
        std::fs::remove_file(&path).expect("unplugged");
        let err = file
            .read(&mut Vec::new())
            .expect_err("a removed file cannot be read");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!file.is_kept());
        assert_eq!(budget.kept(), 0, "the slot is given back");
        std::fs::write(&path, "6\n").expect("plugged back");
        assert_eq!(
            file.read(&mut Vec::new()).expect("read once it is back"),
            "6\n"
        );
        assert!(file.is_kept());
    }

    #[test]
    fn beyond_the_budget_files_are_opened_read_and_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = OpenBudget::new(2);
        let mut files: Vec<KeptFile> = (0..3)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, format!("{i}\n")).expect("write");
                KeptFile::new(path, Arc::clone(&budget))
            })
            .collect();
        for round in 0..2 {
            for (i, file) in files.iter_mut().enumerate() {
                std::fs::write(file.path(), format!("{}\n", i + 10 * round)).expect("write");
                assert_eq!(
                    file.read(&mut Vec::new()).expect("read"),
                    format!("{}\n", i + 10 * round)
                );
            }
        }
        let kept: Vec<bool> = files.iter().map(KeptFile::is_kept).collect();
        assert_eq!(kept, [true, true, false]);
        assert_eq!(budget.kept(), 2);
        drop(files);
        assert_eq!(budget.kept(), 0);
    }

    #[test]
    fn proc_files_are_kept_without_a_link_check() {
        let mut file = KeptFile::new(PathBuf::from("/proc/loadavg"), OpenBudget::new(1));
        let first = file
            .read(&mut Vec::new())
            .expect("/proc/loadavg reads")
            .to_owned();
        assert_eq!(first.split_ascii_whitespace().count(), 5, "{first:?}");
        assert!(file.read(&mut Vec::new()).expect("again").ends_with('\n'));
        let open = file.open.as_ref().expect("kept");
        assert_eq!(open.check, LinkCheck::Never);
        let mut watch = LinkWatch::new();
        let mut watched = KeptFile::new(PathBuf::from("/proc/loadavg"), OpenBudget::new(1));
        watch.poll();
        assert!(watched.read_watched(&mut Vec::new(), &watch).is_ok());
        assert!(watch.inotify.get().is_none(), "no inotify for /proc files");
    }

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        // Lowered first, so that the raise is seen (other tests need few files).
        let lowered = Rlimit {
            current: Some(hard.map_or(4096, |hard| hard.min(4096)) - 1),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, lowered).expect("a soft limit can be lowered");
        assert_ne!(getrlimit(Resource::Nofile).current, hard);
        let soft = raise_open_file_limit().expect("the limit reads");
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(Some(soft), limit.current.or(Some(u64::MAX)));
        assert_eq!(limit.current, limit.maximum);
    }
}
