//! The FUSE face of the model: translates kernel requests into [`Model`] calls.
//!
//! Files are opened without `direct_io`, so the kernel keeps a page cache for them and shared
//! writable `mmap` works (SQLite maps its WAL index, the `-shm` file, that way). Without the
//! writeback-cache capability (fuser does not ask for it) every `write(2)` is sent to us at once,
//! in order, so the model sees writes exactly as the program issued them; pages dirtied through a
//! shared mapping reach us later through the kernel's writeback, which only matters for the
//! `-shm` file, and SQLite never relies on that file surviving a crash. POSIX locks are not
//! handled here (fuser does not negotiate `FUSE_POSIX_LOCKS`), so the kernel keeps them locally,
//! which is right for processes on one machine.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{self, Attr, Kind, Meta, Model, SetAttr};

/// How long the kernel may cache attributes and names. Every change goes through the kernel, so
/// its caches stay right; after a cut the mount is gone and so are they.
const TTL: Duration = Duration::from_secs(1);

/// The mounted filesystem. The model sits behind a mutex shared with the thread that waits for
/// the power-cut signal, which must be able to freeze it between two requests.
pub struct LossyFs {
    pub model: Arc<Mutex<Model>>,
}

impl LossyFs {
    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn errno(code: model::Errno) -> Errno {
    Errno::from_i32(code)
}

fn file_attr(attr: &Attr) -> FileAttr {
    let (kind, perm_default) = match attr.kind {
        Kind::File => (FileType::RegularFile, 0o644),
        Kind::Dir => (FileType::Directory, 0o755),
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.meta.atime,
        mtime: attr.meta.mtime,
        ctime: attr.meta.ctime,
        crtime: attr.meta.ctime,
        kind,
        perm: if attr.meta.perm == 0 {
            perm_default
        } else {
            attr.meta.perm
        },
        nlink: attr.nlink.max(1),
        uid: attr.meta.uid,
        gid: attr.meta.gid,
        rdev: 0,
        blksize: model::PAGE_SIZE as u32,
        flags: 0,
    }
}

fn time_of(value: Option<TimeOrNow>) -> Option<SystemTime> {
    value.map(|time| match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    })
}

fn perm_bits(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.model().lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(code) => reply.error(errno(code)),
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
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            perm: mode.map(|mode| perm_bits(mode, 0)),
            uid,
            gid,
            size,
            atime: time_of(atime),
            mtime: time_of(mtime),
        };
        match self.model().setattr(ino.0, &change) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let meta = Meta::new(perm_bits(mode, umask), req.uid(), req.gid());
        match self.model().create(parent.0, name, Kind::Dir, meta) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
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
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .model()
            .rename(parent.0, name, new_parent.0, new_name, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().open(ino.0) {
            // No FOPEN_DIRECT_IO: the page cache is what makes shared mmap of `-shm` work.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(code) => reply.error(errno(code)),
        }
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
        let meta = Meta::new(perm_bits(mode, umask), req.uid(), req.gid());
        let mut model = self.model();
        let created = model
            .create(parent.0, name, Kind::File, meta)
            .and_then(|attr| model.open(attr.ino).map(|()| attr));
        match created {
            Ok(attr) => reply.created(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(code) => reply.error(errno(code)),
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
        match self.model().read(ino.0, offset, size as usize) {
            Ok(bytes) => reply.data(&bytes),
            Err(code) => reply.error(errno(code)),
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
        match self.model().write(ino.0, offset, data) {
            Ok(written) => reply.written(written as u32),
            Err(code) => reply.error(errno(code)),
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
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model().release(ino.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // fdatasync also persists the size (the metadata needed to read the data back), so the
        // model treats it like fsync: contents, size and mode of this file, never its names.
        match self.model().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.model().readdir(ino.0) {
            Ok(entries) => entries,
            Err(code) => {
                reply.error(errno(code));
                return;
            }
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".").to_owned()),
            (ino.0, FileType::Directory, OsStr::new("..").to_owned()),
        ];
        let all = dots
            .into_iter()
            .chain(entries.into_iter().map(|(child, kind, name)| {
                let kind = match kind {
                    Kind::File => FileType::RegularFile,
                    Kind::Dir => FileType::Directory,
                };
                (child, kind, name)
            }));
        for (index, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.model().fsync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BLOCKS: u64 = 1 << 24;
        reply.statfs(BLOCKS, BLOCKS, BLOCKS, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
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
        let mut model = self.model();
        let result = match mode {
            libc::FALLOC_FL_KEEP_SIZE => model.getattr(ino.0).map(|_| ()),
            0 => model.getattr(ino.0).and_then(|attr| {
                let end = offset + length;
                if end <= attr.size {
                    return Ok(());
                }
                let grow = SetAttr {
                    size: Some(end),
                    ..SetAttr::default()
                };
                model.setattr(ino.0, &grow).map(|_| ())
            }),
            _ => Err(libc::EOPNOTSUPP),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }
}
