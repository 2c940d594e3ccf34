//! A filesystem that forgets, on a power cut, what was never synced: the
//! test double of a disk with a volatile write cache (FUSE, in the test
//! process, on the `fuser` crate).
//!
//! Everything lives in memory. Each file has its current bytes and its
//! durable bytes: a write changes only the current ones; `fsync` or
//! `fdatasync` of that file makes them (and the length) durable. Each
//! directory has its current names and its durable names: a create, link,
//! unlink, rename or mkdir changes only the current ones; `fsync` of that
//! directory makes them durable. `cut()` is the power cut: every file and
//! directory goes back to its durable state, and what no durable name
//! reaches is gone. Nothing else is synced: no `sync_file_range`, no
//! periodic writeback, no journal that orders metadata, which is the
//! strictest reading of POSIX a disk may take.
//!
//! A cut needs the mount gone first (the kernel's caches would otherwise
//! remember the forgotten state): `PowerFs::cut` unmounts, forgets and
//! mounts again on the same path.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const PAGE: u64 = 4096;
/// How long the kernel may cache names and attributes: every change goes
/// through this filesystem, so its caches stay right until a cut, which
/// remounts.
const TTL: Duration = Duration::from_secs(1);

enum Body {
    File {
        data: Vec<u8>,
        durable: Vec<u8>,
        /// Pages written since the last sync.
        dirty: BTreeSet<u64>,
    },
    Dir {
        names: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: SystemTime,
}

impl Inode {
    fn kind(&self) -> FileType {
        match self.body {
            Body::File { .. } => FileType::RegularFile,
            Body::Dir { .. } => FileType::Directory,
        }
    }

    fn size(&self) -> u64 {
        match &self.body {
            Body::File { data, .. } => data.len() as u64,
            Body::Dir { names, .. } => names.len() as u64,
        }
    }
}

/// What the filesystem saw, for the test's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub writes: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    /// Bytes written and never synced when the cuts came.
    pub bytes_lost: u64,
    /// Names changed and never synced when the cuts came.
    pub names_lost: u64,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next: u64,
    counts: Counts,
}

impl State {
    fn new() -> State {
        let mut s = State {
            next: 2,
            ..State::default()
        };
        s.inodes.insert(
            1,
            Inode {
                body: Body::Dir {
                    names: BTreeMap::new(),
                    durable: BTreeMap::new(),
                },
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                mtime: SystemTime::now(),
            },
        );
        s
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let i = self.inodes.get(&ino)?;
        let size = i.size();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: i.mtime,
            mtime: i.mtime,
            ctime: i.mtime,
            crtime: i.mtime,
            kind: i.kind(),
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn names(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&dir).map(|i| &mut i.body) {
            Some(Body::Dir { names, .. }) => Ok(names),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.names(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn make(
        &mut self,
        dir: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
        req: &Request,
    ) -> Result<u64, Errno> {
        if self.names(dir)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let is_dir = matches!(body, Body::Dir { .. });
        self.inodes.insert(
            ino,
            Inode {
                body,
                perm,
                uid: req.uid(),
                gid: req.gid(),
                nlink: if is_dir { 2 } else { 1 },
                mtime: SystemTime::now(),
            },
        );
        self.names(dir)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// Drops `name` from `dir`; the inode stays (an open file, a durable name).
    fn unlink(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        let ino = self.names(dir)?.remove(name).ok_or(Errno::ENOENT)?;
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlink = i.nlink.saturating_sub(1);
        }
        Ok(ino)
    }

    fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let Some(Body::File { data, dirty, .. }) = self.inodes.get_mut(&ino).map(|i| &mut i.body)
        else {
            return Err(Errno::EISDIR);
        };
        let end = offset as usize + bytes.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(bytes);
        for p in offset / PAGE..=(end as u64).saturating_sub(1) / PAGE {
            dirty.insert(p);
        }
        self.counts.writes += 1;
        Ok(())
    }

    fn truncate(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let Some(Body::File { data, dirty, .. }) = self.inodes.get_mut(&ino).map(|i| &mut i.body)
        else {
            return Err(Errno::EISDIR);
        };
        let was = data.len() as u64;
        data.resize(len as usize, 0);
        for p in was.min(len) / PAGE..=was.max(len) / PAGE {
            dirty.insert(p);
        }
        Ok(())
    }

    fn sync(&mut self, ino: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        match &mut i.body {
            Body::File {
                data,
                durable,
                dirty,
            } => {
                durable.resize(data.len(), 0);
                for p in std::mem::take(dirty) {
                    let from = (p * PAGE) as usize;
                    if from >= data.len() {
                        continue;
                    }
                    let to = ((p + 1) * PAGE).min(data.len() as u64) as usize;
                    durable[from..to].copy_from_slice(&data[from..to]);
                }
                self.counts.file_syncs += 1;
            }
            Body::Dir { names, durable } => {
                *durable = names.clone();
                self.counts.dir_syncs += 1;
            }
        }
    }

    /// The power cut: everything back to its durable state.
    fn cut(&mut self) {
        for i in self.inodes.values_mut() {
            match &mut i.body {
                Body::File {
                    data,
                    durable,
                    dirty,
                } => {
                    self.counts.bytes_lost += dirty.len() as u64 * PAGE;
                    *data = durable.clone();
                    dirty.clear();
                }
                Body::Dir { names, durable } => {
                    if names != durable {
                        self.counts.names_lost += 1;
                    }
                    *names = durable.clone();
                }
            }
        }
        // What no durable name reaches is gone; link counts follow the names.
        let mut reached: HashMap<u64, u32> = HashMap::from([(1, 1)]);
        let mut todo = vec![1u64];
        while let Some(d) = todo.pop() {
            let children: Vec<u64> = match self.inodes.get(&d).map(|i| &i.body) {
                Some(Body::Dir { names, .. }) => names.values().copied().collect(),
                _ => continue,
            };
            for c in children {
                let n = reached.entry(c).or_insert(0);
                *n += 1;
                if *n == 1 {
                    todo.push(c);
                }
            }
        }
        self.inodes.retain(|ino, _| reached.contains_key(ino));
        for (ino, i) in self.inodes.iter_mut() {
            i.nlink = match i.body {
                Body::Dir { .. } => 2,
                Body::File { .. } => reached.get(ino).copied().unwrap_or(1),
            };
        }
    }

    /// Everything durable as it is now (the installation before the test).
    fn sync_all(&mut self) {
        let all: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in all {
            self.sync(ino);
        }
    }
}

/// The FUSE side: every request on the shared state.
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply_entry(s: &State, ino: u64, reply: ReplyEntry) {
    match s.attr(ino) {
        Some(a) => reply.entry(&TTL, &a, Generation(0)),
        None => reply.error(Errno::ENOENT),
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        match s.lookup(parent.0, name) {
            Ok(ino) => reply_entry(&s, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
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
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        if let Some(len) = size {
            if let Err(e) = s.truncate(ino.0, len) {
                return reply.error(e);
            }
        }
        let Some(i) = s.inodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(m) = mode {
            i.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        i.mtime = SystemTime::now();
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
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
        let mut s = self.state();
        let body = Body::Dir {
            names: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        match s.make(parent.0, name, body, (mode & !umask & 0o7777) as u16, req) {
            Ok(ino) => reply_entry(&s, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().unlink(parent.0, name) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let ino = match s.lookup(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match s.names(ino) {
            Ok(n) if !n.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        match s.unlink(parent.0, name) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let ino = match s.lookup(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if s.lookup(newparent.0, newname).is_ok() {
            if let Err(e) = s.unlink(newparent.0, newname) {
                return reply.error(e);
            }
        }
        let moved = s.names(parent.0).map(|n| n.remove(name)).and_then(|_| {
            s.names(newparent.0)
                .map(|n| n.insert(newname.to_os_string(), ino))
        });
        match moved {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let names = match s.names(newparent.0) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if names.contains_key(newname) {
            return reply.error(Errno::EEXIST);
        }
        names.insert(newname.to_os_string(), ino.0);
        if let Some(i) = s.inodes.get_mut(&ino.0) {
            i.nlink += 1;
        }
        reply_entry(&s, ino.0, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.state().inodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOENT);
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
        let s = self.state();
        match s.inodes.get(&ino.0).map(|i| &i.body) {
            Some(Body::File { data, .. }) => {
                let from = (offset as usize).min(data.len());
                let to = (from + size as usize).min(data.len());
                reply.data(&data[from..to]);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
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
        // close(2) syncs nothing.
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
        self.state().sync(ino.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let names: Vec<(OsString, u64)> = match s.names(ino.0) {
            Ok(n) => n.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), ino.0, FileType::Directory),
        ];
        for (name, child) in names {
            let kind = s
                .inodes
                .get(&child)
                .map_or(FileType::RegularFile, Inode::kind);
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
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
        self.state().sync(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Plenty of room: this test is about power, not space.
        let blocks = 1 << 28;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 24,
            1 << 24,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let body = Body::File {
            data: Vec::new(),
            durable: Vec::new(),
            dirty: BTreeSet::new(),
        };
        match s.make(parent.0, name, body, (mode & !umask & 0o7777) as u16, req) {
            Ok(ino) => match s.attr(ino) {
                Some(a) => {
                    reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty())
                }
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut s = self.state();
        let size = s.inodes.get(&ino.0).map_or(0, Inode::size);
        if offset + length > size {
            if let Err(e) = s.truncate(ino.0, offset + length) {
                return reply.error(e);
            }
        }
        reply.ok();
    }
}

/// A mounted `PowerFs`; unmounted on drop.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    /// Holds the mount point's directory.
    _dir: tempfile::TempDir,
}

impl PowerFs {
    /// Mounts an empty one on a fresh directory.
    pub fn mount() -> PowerFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fs = PowerFs {
            state: Arc::new(Mutex::new(State::new())),
            mountpoint: dir.path().to_path_buf(),
            session: None,
            _dir: dir,
        };
        fs.attach();
        fs
    }

    fn attach(&mut self) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("powerfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(Fs(Arc::clone(&self.state)), &self.mountpoint, &config)
            .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
        self.session = Some(session);
    }

    fn detach(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                // Busy: detach it lazily, as the daemon is dead anyway.
                eprintln!("unmounting the power-cut filesystem: {e}; detaching it");
                if let Ok(c) =
                    std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: umount2 on a NUL-terminated path we own.
                    unsafe {
                        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                    }
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: unmounts, forgets every write and name change never
    /// synced, mounts again.
    pub fn cut(&mut self) {
        self.detach();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).cut();
        self.attach();
    }

    /// Makes everything durable as it is now.
    pub fn sync_everything(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_all();
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).counts
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        self.detach();
    }
}
