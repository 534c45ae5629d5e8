//! A file system that forgets what was not fsynced: the power cut of the fault tests.
//!
//! [`PowerCutFs`] mounts a FUSE file system (through `fuser`) over a backing folder that
//! stands for the medium. At mount it loads the backing folder; while mounted, every change
//! is kept in memory, as a page cache keeps it, beside what the medium holds. Only these
//! reach the medium:
//!
//! - a file's bytes and size, when the file is fsynced (`fsync`, `fdatasync`, or a write
//!   through `O_SYNC`/`O_DSYNC`); `close` and `flush` do not count;
//! - a folder's entries (a file or folder created, renamed, removed in it), when that
//!   folder itself is fsynced. This is the pessimistic reading of POSIX (ext4 without
//!   `auto_da_alloc`): a rename is durable once the folders it changed are fsynced,
//!   and a new folder's name once its parent is. SQLite syncs the folder when it creates
//!   its WAL, so a correct SQLite stays correct here.
//!
//! [`PowerCutFs::cut`] is the power cut. In one instant it takes what the medium holds
//! (the tree reached from the root through the durable entries, each file with its
//! durable bytes) and refuses every later change with `EIO`; it then lets the caller kill
//! the programs that used the mount, writes that state into the backing folder, and
//! mounts again, so that the tree seen equals the medium and no kernel cache is left.
//! [`PowerCutFs::freeze_after`] instead sets the instant at a change that matters to the
//! medium (a name made, moved or removed, an fsync): the power goes as that change is
//! asked for, which lands inside a delivery or a commit far more often than a moment
//! picked by the clock.
//! A caller may let some unsynced state count as written back by chance before the cut,
//! as a kernel does on its own: the folders all together (a journal commit takes every
//! pending name change at once), and each file's bytes on their own (delayed writeback).
//! Whatever is written back is taken whole as the programs last saw it. Folders written
//! back while a renamed file's bytes are not is how a file comes back empty.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use rustix::fs::OFlags;

/// How long the kernel may cache names and attributes: every change goes through this
/// file system, and a cut mounts afresh, so caching never shows stale state.
const TTL: Duration = Duration::from_secs(1);

/// Files keep their page cache when opened again, as on a disk. Without it an open
/// (by `edgespool status`, say) drops the pages of a file another program has mapped
/// (SQLite's `-shm`), and once the medium is gone their dirty contents cannot be
/// written back and are lost.
const OPENED: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

type Ino = u64;

/// What a node holds: a file's bytes or a folder's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, Ino>),
}

/// A file or folder, as the programs see it (`live`) and as the medium holds it (`durable`).
#[derive(Debug)]
struct Node {
    live: Body,
    durable: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    /// Live names of the node (a file no name refers to may still be open, or durable).
    links: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        let empty = match body {
            Body::File(_) => Body::File(Vec::new()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
        };
        Node {
            live: body,
            durable: empty,
            perm,
            uid,
            gid,
            links: 1,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    fn dirty(&self) -> bool {
        self.live != self.durable
    }

    fn kind(&self) -> FileType {
        match self.live {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }

    fn attr(&self, ino: Ino) -> FileAttr {
        let (size, nlink) = match &self.live {
            Body::File(data) => (data.len() as u64, self.links),
            Body::Dir(entries) => (entries.len() as u64, 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind: self.kind(),
            perm: self.perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entries(&self) -> Result<&BTreeMap<OsString, Ino>, Errno> {
        match &self.live {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self) -> Result<&mut BTreeMap<OsString, Ino>, Errno> {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
        match &mut self.live {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn data_mut(&mut self) -> Result<&mut Vec<u8>, Errno> {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
        match &mut self.live {
            Body::File(data) => Ok(data),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }
}

/// An open file or folder.
#[derive(Debug)]
struct Handle {
    /// Opened with `O_SYNC` or `O_DSYNC`: every write is durable at once.
    sync_writes: bool,
    /// A folder's entries when it was opened, for a stable `readdir`.
    listing: Vec<(OsString, Ino, FileType)>,
}

/// A tree as the medium holds it: what a mount loads and a cut leaves.
#[derive(Debug)]
enum Image {
    File {
        perm: u16,
        data: Vec<u8>,
    },
    Dir {
        perm: u16,
        entries: BTreeMap<OsString, Image>,
    },
}

/// Everything the file system knows, behind one lock.
#[derive(Debug)]
struct State {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Set by a cut: the medium is gone, every change fails.
    frozen: bool,
    /// Changes that matter to the medium asked for so far (names and fsyncs).
    changes: u64,
    /// The change at which the medium goes (see [`PowerCutFs::freeze_after`]).
    freeze_at: Option<u64>,
    file_syncs: u64,
    folder_syncs: u64,
}

impl State {
    /// A state whose live and durable trees both equal `image`.
    fn from_image(image: Image) -> State {
        let mut state = State {
            nodes: HashMap::new(),
            next_ino: INodeNo::ROOT.0,
            handles: HashMap::new(),
            next_fh: 1,
            frozen: false,
            changes: 0,
            freeze_at: None,
            file_syncs: 0,
            folder_syncs: 0,
        };
        state.add_image(image);
        state
    }

    fn add_image(&mut self, image: Image) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
        let (body, perm) = match image {
            Image::File { perm, data } => (Body::File(data), perm),
            Image::Dir { perm, entries } => {
                let mut children = BTreeMap::new();
                for (name, child) in entries {
                    children.insert(name, self.add_image(child));
                }
                (Body::Dir(children), perm)
            }
        };
        let mut node = Node::new(body, perm, uid.as_raw(), gid.as_raw());
        node.durable = node.live.clone();
        self.nodes.insert(ino, node);
        ino
    }

    /// What the medium holds now: from the root through durable entries. Unsynced
    /// folders count as written back (their live entries) if `luck.folders`; an unsynced
    /// file's bytes if `luck.file` says so (asked once per such file reached).
    fn durable_image(&self, luck: &mut Luck<'_>, cut: &mut Cut) -> Image {
        let mut decided = HashMap::new();
        let mut path = HashSet::new();
        self.image_of(INodeNo::ROOT.0, luck, &mut decided, &mut path, cut)
            .unwrap_or(Image::Dir {
                perm: 0o755,
                entries: BTreeMap::new(),
            })
    }

    fn image_of(
        &self,
        ino: Ino,
        luck: &mut Luck<'_>,
        decided: &mut HashMap<Ino, bool>,
        path: &mut HashSet<Ino>,
        cut: &mut Cut,
    ) -> Option<Image> {
        let node = self.nodes.get(&ino)?;
        let live = node.dirty()
            && *decided.entry(ino).or_insert_with(|| {
                let kept = match node.live {
                    Body::Dir(_) => luck.folders,
                    Body::File(_) => (luck.file)(),
                };
                cut.written_back += usize::from(kept);
                kept
            });
        match if live { &node.live } else { &node.durable } {
            Body::File(data) => Some(Image::File {
                perm: node.perm,
                data: data.clone(),
            }),
            Body::Dir(children) => {
                // Durable and live entries mixed can name a folder inside itself: cut the loop.
                if !path.insert(ino) {
                    return None;
                }
                let mut entries = BTreeMap::new();
                for (name, child) in children {
                    if let Some(image) = self.image_of(*child, luck, decided, path, cut) {
                        entries.insert(name.clone(), image);
                    }
                }
                path.remove(&ino);
                Some(Image::Dir {
                    perm: node.perm,
                    entries,
                })
            }
        }
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.nodes.get(&ino.0).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    /// Refuses a change once the medium is gone.
    fn writable(&self) -> Result<(), Errno> {
        if self.frozen { Err(Errno::EIO) } else { Ok(()) }
    }

    /// Counts a change that matters to the medium (a name made, moved or removed, an
    /// fsync), and refuses it once the medium is gone or goes with it.
    fn step(&mut self) -> Result<(), Errno> {
        self.writable()?;
        self.changes += 1;
        if self.freeze_at == Some(self.changes) {
            self.frozen = true;
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<Option<Ino>, Errno> {
        Ok(self.node(parent)?.entries()?.get(name).copied())
    }

    /// A new node named `name` in `parent`.
    fn add(&mut self, parent: INodeNo, name: &OsStr, node: Node) -> Result<Ino, Errno> {
        self.step()?;
        if self.child(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.node_mut(parent)?
            .entries_mut()?
            .insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn open(&mut self, ino: Ino, flags: i32) -> Result<u64, Errno> {
        let flags = OFlags::from_bits_retain(flags as u32);
        if flags.contains(OFlags::TRUNC) {
            self.writable()?;
            self.node_mut(INodeNo(ino))?.data_mut()?.clear();
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        let sync_writes = flags.intersects(OFlags::SYNC | OFlags::DSYNC);
        self.handles.insert(
            fh,
            Handle {
                sync_writes,
                listing: Vec::new(),
            },
        );
        Ok(fh)
    }

    fn unlink(&mut self, parent: INodeNo, name: &OsStr, folder: bool) -> Result<(), Errno> {
        self.step()?;
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (&node.live, folder) {
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.node_mut(parent)?.entries_mut()?.remove(name);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links = node.links.saturating_sub(1);
            node.ctime = SystemTime::now();
        }
        Ok(())
    }

    fn rename(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        self.step()?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        if let Some(old) = self.child(new_parent, new_name)? {
            if old == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            let moving_folder = matches!(self.nodes[&ino].live, Body::Dir(_));
            match (&self.nodes[&old].live, moving_folder) {
                (Body::Dir(entries), true) if !entries.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
            if let Some(node) = self.nodes.get_mut(&old) {
                node.links = node.links.saturating_sub(1);
            }
        }
        self.node_mut(parent)?.entries_mut()?.remove(name);
        self.node_mut(new_parent)?
            .entries_mut()?
            .insert(new_name.to_owned(), ino);
        self.node_mut(INodeNo(ino))?.ctime = SystemTime::now();
        Ok(())
    }

    /// fsync: the node's live state becomes durable.
    fn sync(&mut self, ino: INodeNo) -> Result<(), Errno> {
        self.step()?;
        let node = self.node_mut(ino)?;
        node.durable = node.live.clone();
        match node.live {
            Body::File(_) => self.file_syncs += 1,
            Body::Dir(_) => self.folder_syncs += 1,
        }
        Ok(())
    }
}

/// Writes `image` (a folder) into `dir`, replacing what `dir` held.
fn store(image: &Image, dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    if let Image::Dir { entries, .. } = image {
        for (name, child) in entries {
            store_entry(child, &dir.join(name))?;
        }
    }
    Ok(())
}

fn store_entry(image: &Image, path: &Path) -> io::Result<()> {
    match image {
        Image::File { perm, data } => {
            std::fs::write(path, data)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(u32::from(*perm)))
        }
        Image::Dir { perm, entries } => {
            std::fs::create_dir(path)?;
            for (name, child) in entries {
                store_entry(child, &path.join(name))?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(u32::from(*perm)))
        }
    }
}

/// Reads the tree under `path` (a folder) into an [`Image`]; only files and folders.
fn load(path: &Path) -> io::Result<Image> {
    let meta = std::fs::symlink_metadata(path)?;
    let perm = (meta.permissions().mode() & 0o7777) as u16;
    if meta.is_dir() {
        let mut entries = BTreeMap::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() || kind.is_file() {
                entries.insert(entry.file_name(), load(&entry.path())?);
            }
        }
        Ok(Image::Dir { perm, entries })
    } else {
        Ok(Image::File {
            perm,
            data: std::fs::read(path)?,
        })
    }
}

/// The FUSE side: every request works on the shared [`State`].
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the mount down with it.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, result: Result<Ino, Errno>, reply: ReplyEntry) {
        let state = self.state();
        match result.and_then(|ino| Ok((ino, state.node(INodeNo(ino))?))) {
            Ok((ino, node)) => reply.entry(&TTL, &node.attr(ino), Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }
}

fn ids(req: &Request) -> (u32, u32) {
    (req.uid(), req.gid())
}

fn perm(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .state()
            .child(parent, name)
            .and_then(|c| c.ok_or(Errno::ENOENT));
        self.entry(found, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().node(ino) {
            Ok(node) => reply.attr(&TTL, &node.attr(ino.0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let sync_writes = fh
            .and_then(|fh| state.handles.get(&fh.0))
            .is_some_and(|h| h.sync_writes);
        let result = (|| {
            state.writable()?;
            let node = state.node_mut(ino)?;
            if let Some(size) = size {
                node.data_mut()?.resize(size as usize, 0);
                if sync_writes {
                    node.durable = node.live.clone();
                }
            }
            let time = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            node.atime = atime.map_or(node.atime, time);
            node.mtime = mtime.map_or(node.mtime, time);
            node.ctime = SystemTime::now();
            Ok(node.attr(ino.0))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (uid, gid) = ids(req);
        let node = Node::new(Body::Dir(BTreeMap::new()), perm(mode, umask), uid, gid);
        let made = self.state().add(parent, name, node);
        self.entry(made, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().unlink(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().unlink(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .state()
            .rename(parent, name, new_parent, new_name, flags)
        {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (uid, gid) = ids(req);
        let mut state = self.state();
        let result = (|| {
            state.writable()?;
            let ino = match state.child(parent, name)? {
                Some(_) if OFlags::from_bits_retain(flags as u32).contains(OFlags::EXCL) => {
                    return Err(Errno::EEXIST);
                }
                Some(ino) => ino,
                None => {
                    let node = Node::new(Body::File(Vec::new()), perm(mode, umask), uid, gid);
                    state.add(parent, name, node)?
                }
            };
            let fh = state.open(ino, flags)?;
            Ok((ino, fh))
        })();
        match result.and_then(|(ino, fh)| Ok((state.node(INodeNo(ino))?.attr(ino), fh))) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), OPENED),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        let result = state
            .node(ino)
            .and_then(|node| match node.live {
                Body::File(_) => Ok(()),
                Body::Dir(_) => Err(Errno::EISDIR),
            })
            .and_then(|()| state.open(ino.0, flags.0));
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), OPENED),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state();
        match state.node(ino).map(|n| &n.live) {
            Ok(Body::File(data)) => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Ok(Body::Dir(_)) => reply.error(Errno::EISDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let sync_writes = state.handles.get(&fh.0).is_some_and(|h| h.sync_writes);
        let result = (|| {
            state.writable()?;
            let node = state.node_mut(ino)?;
            let file = node.data_mut()?;
            let start = offset as usize;
            let end = start + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[start..end].copy_from_slice(data);
            if sync_writes {
                node.durable = node.live.clone();
            }
            Ok(data.len() as u32)
        })();
        match result {
            Ok(written) => reply.written(written),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Closing is not syncing.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().sync(ino) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        let listing = state.node(ino).and_then(|node| {
            let mut listing = vec![
                (OsString::from("."), ino.0, FileType::Directory),
                (OsString::from(".."), INodeNo::ROOT.0, FileType::Directory),
            ];
            for (name, child) in node.entries()? {
                if let Some(kind) = state.nodes.get(child).map(Node::kind) {
                    listing.push((name.clone(), *child, kind));
                }
            }
            Ok(listing)
        });
        match listing {
            Ok(listing) => {
                let fh = state.next_fh;
                state.next_fh += 1;
                state.handles.insert(
                    fh,
                    Handle {
                        sync_writes: false,
                        listing,
                    },
                );
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.state();
        let Some(handle) = state.handles.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (name, child, kind)) in handle.listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().sync(ino) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A roomy 4 GiB medium, half free.
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

/// What the kernel happened to write back before a cut (see the module's text).
pub struct Luck<'a> {
    /// Every unsynced folder's entries (a journal commit).
    pub folders: bool,
    /// Whether this unsynced file's bytes; asked once per file.
    pub file: &'a mut dyn FnMut() -> bool,
}

/// What a cut threw away.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cut {
    /// Files whose bytes were not all synced.
    pub dirty_files: usize,
    /// Folders whose entries were not all synced.
    pub dirty_folders: usize,
    /// Of those reached from the root, how many counted as written back by luck.
    pub written_back: usize,
}

/// A mounted power-cut file system (see the module's text). Unmounted on drop.
pub struct PowerCutFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    /// fsyncs of files and of folders counted by earlier mounts.
    earlier_syncs: (u64, u64),
}

impl PowerCutFs {
    /// Why the file system cannot be mounted here (no `/dev/fuse`, not root, no
    /// `fusermount3`), or `None` if it can be tried.
    pub fn unavailable() -> Option<String> {
        if !Path::new("/dev/fuse").exists() {
            return Some("no /dev/fuse on this machine".to_owned());
        }
        if !rustix::process::geteuid().is_root() {
            return Some("the power-cut file system needs root to mount FUSE".to_owned());
        }
        let on_path = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("fusermount3").is_file())
        });
        if !on_path {
            return Some(
                "fusermount3 is missing (Debian's fuse3 package; scripts/test.sh installs it)"
                    .to_owned(),
            );
        }
        None
    }

    /// Mounts the tree of `backing` (the medium) on `mountpoint` (an empty folder).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerCutFs> {
        let state = Arc::new(Mutex::new(State::from_image(load(backing)?)));
        let session = spawn(&state, mountpoint)?;
        Ok(PowerCutFs {
            backing: backing.to_owned(),
            mountpoint: mountpoint.to_owned(),
            state,
            session: Some(session),
            earlier_syncs: (0, 0),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Arms the power to go at the `changes`-th change that matters to the medium from
    /// now (a name made, moved or removed, an fsync; plain writes only matter once synced):
    /// that change fails with `EIO`, and so does every change after it, so the medium
    /// stays as it was at that instant until [`cut`](Self::cut) is called, which must
    /// follow.
    pub fn freeze_after(&self, changes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.freeze_at = Some(state.changes + changes.max(1));
    }

    /// Whether the armed instant of [`freeze_after`](Self::freeze_after) has come.
    pub fn frozen(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).frozen
    }

    /// Changes that matter to the medium (names and fsyncs) since the last mount.
    pub fn changes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).changes
    }

    /// fsyncs seen so far, of files and of folders.
    pub fn syncs(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (
            self.earlier_syncs.0 + state.file_syncs,
            self.earlier_syncs.1 + state.folder_syncs,
        )
    }

    /// The power cut: takes what the medium holds (with what `luck` wrote back) and
    /// refuses every later change, then calls `kill` (which must end every program using
    /// the mount: kill -9 them), writes the medium into the backing folder and mounts it
    /// again.
    pub fn cut(&mut self, kill: impl FnOnce(), mut luck: Luck<'_>) -> io::Result<Cut> {
        let mut cut = Cut::default();
        let image = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.frozen = true;
            for node in state.nodes.values().filter(|n| n.dirty()) {
                match node.live {
                    Body::File(_) => cut.dirty_files += 1,
                    Body::Dir(_) => cut.dirty_folders += 1,
                }
            }
            self.earlier_syncs.0 += state.file_syncs;
            self.earlier_syncs.1 += state.folder_syncs;
            state.durable_image(&mut luck, &mut cut)
        };
        kill();
        self.unmount();
        store(&image, &self.backing)?;
        self.state = Arc::new(Mutex::new(State::from_image(image)));
        self.session = Some(spawn(&self.state, &self.mountpoint)?);
        Ok(cut)
    }

    fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if session.umount_and_join().is_err() {
            // Something still holds the mount: detach it, the kernel ends the session
            // once the last user is gone.
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn spawn(state: &Arc<Mutex<State>>, mountpoint: &Path) -> io::Result<BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("edgespool-powercut".to_owned()),
        MountOption::NoAtime,
    ];
    fuser::spawn_mount(Fs(Arc::clone(state)), mountpoint, &config)
}
