//! The simulated disk: two complete filesystem states, one that survives a power cut and one that
//! does not.
//!
//! `volatile` is what programs see: every write, truncate, create, unlink and rename lands there
//! first, as it would in an operating system's page cache and dentry cache. `durable` is what the
//! platter holds. Only the calls that make data durable on a POSIX system move state from one to
//! the other, and each moves exactly what it covers:
//!
//! - `fsync`/`fdatasync` of a file copies that file's contents, size and mode (not its names);
//! - `fsync` of a directory copies that directory's entries (the names in it and which inode each
//!   name points to), so a create, unlink or rename becomes durable only once the directory that
//!   holds the name is synced, and a rename across directories needs both synced.
//!
//! A power cut throws `volatile` away. The durable state is mirrored into a backing directory as it
//! changes (see [`crate::mirror`]), so after a cut the backing directory holds exactly what the disk
//! kept, and mounting it again is "booting after the outage".
//!
//! Pages are reference counted, so a file's durable and volatile copies share every page that has
//! not changed since the last sync, and an `fsync` copies only the pages written since then.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::mirror::Mirror;

/// Unit of copy-on-write sharing between the two states and of the dirty tracking.
pub const PAGE_SIZE: usize = 4096;
/// Unit of a torn write: a disk persists whole sectors or nothing of each.
pub const SECTOR_SIZE: usize = 512;
/// Inode number as the kernel sees it.
pub type Ino = u64;
/// The root directory's inode number (fixed by FUSE).
pub const ROOT: Ino = 1;

/// An errno value, as the FUSE layer will return it.
pub type Errno = i32;
pub type Result<T> = std::result::Result<T, Errno>;

type Page = Arc<[u8; PAGE_SIZE]>;

/// A regular file's bytes. Invariant: bytes of the last page beyond `size` are zero, so growing
/// the file exposes zeros as POSIX requires.
#[derive(Clone, Debug, Default)]
pub struct FileData {
    size: u64,
    /// `None` is a hole (all zeros), so sparse and unwritten regions cost nothing.
    pages: Vec<Option<Page>>,
}

impl FileData {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn from_bytes(bytes: &[u8]) -> FileData {
        let mut data = FileData::default();
        data.write(0, bytes, &mut BTreeSet::new());
        for page in &mut data.pages {
            if page.as_ref().is_some_and(|p| p.iter().all(|b| *b == 0)) {
                *page = None;
            }
        }
        data
    }

    /// The bytes of page `index`, clipped to the file size.
    pub fn page_bytes(&self, index: usize) -> Vec<u8> {
        let start = index as u64 * PAGE_SIZE as u64;
        if start >= self.size {
            return Vec::new();
        }
        let len = (self.size - start).min(PAGE_SIZE as u64) as usize;
        match self.pages.get(index).and_then(Option::as_ref) {
            Some(page) => page[..len].to_vec(),
            None => vec![0; len],
        }
    }

    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset + len as u64);
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let index = (pos / PAGE_SIZE as u64) as usize;
            let within = (pos % PAGE_SIZE as u64) as usize;
            let take = ((end - pos) as usize).min(PAGE_SIZE - within);
            match &self.pages[index] {
                Some(page) => out.extend_from_slice(&page[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            pos += take as u64;
        }
        out
    }

    /// Writes `data` at `offset`, growing the file, and records every touched page in `dirty`.
    pub fn write(&mut self, offset: u64, data: &[u8], dirty: &mut BTreeSet<usize>) {
        let end = offset + data.len() as u64;
        if end > self.size {
            self.set_size(end, dirty);
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = (pos / PAGE_SIZE as u64) as usize;
            let within = (pos % PAGE_SIZE as u64) as usize;
            let take = rest.len().min(PAGE_SIZE - within);
            let page = self.pages[index].get_or_insert_with(|| Arc::new([0; PAGE_SIZE]));
            Arc::make_mut(page)[within..within + take].copy_from_slice(&rest[..take]);
            dirty.insert(index);
            rest = &rest[take..];
            pos += take as u64;
        }
    }

    /// Truncates or extends to `size`. Pages that appear on growth are marked dirty too: the
    /// durable copy may still hold old bytes at those indices from before an earlier shrink.
    pub fn set_size(&mut self, size: u64, dirty: &mut BTreeSet<usize>) {
        let page_count = size.div_ceil(PAGE_SIZE as u64) as usize;
        if size < self.size {
            self.pages.truncate(page_count);
            dirty.retain(|index| *index < page_count);
            let within = (size % PAGE_SIZE as u64) as usize;
            if within != 0 {
                if let Some(page) = &mut self.pages[page_count - 1] {
                    Arc::make_mut(page)[within..].fill(0);
                }
                dirty.insert(page_count - 1);
            }
        } else {
            let old_count = self.pages.len();
            self.pages.resize(page_count, None);
            dirty.extend(old_count..page_count);
        }
        self.size = size;
    }

    /// Makes this copy equal to `source` given the pages that differ (`dirty`).
    fn copy_pages_from(&mut self, source: &FileData, dirty: &BTreeSet<usize>) {
        self.size = source.size;
        self.pages.resize(source.pages.len(), None);
        for index in dirty {
            self.pages[*index] = source.pages[*index].clone();
        }
    }
}

/// Permission bits, owner and times of an inode.
#[derive(Clone, Debug)]
pub struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Meta {
    pub fn new(perm: u16, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Kind {
    File,
    Dir,
}

#[derive(Clone, Debug)]
pub enum Body {
    File(FileData),
    Dir(BTreeMap<OsString, Ino>),
}

/// One inode in one of the two states.
#[derive(Clone, Debug)]
pub struct Node {
    pub meta: Meta,
    pub body: Body,
}

impl Node {
    pub fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
        }
    }

    fn empty_like(&self) -> Node {
        let body = match self.body {
            Body::File(_) => Body::File(FileData::default()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
        };
        Node {
            meta: self.meta.clone(),
            body,
        }
    }
}

/// A live inode: its volatile contents plus what the model needs to know about it.
#[derive(Debug)]
struct Live {
    node: Node,
    /// Pages written or resized since the last `fsync` of this file.
    dirty: BTreeSet<usize>,
    /// The last write since the last `fsync` (its sequence number among all writes, offset and
    /// bytes), kept so a cut can tear it.
    last_write: Option<(u64, u64, Vec<u8>)>,
    /// Names pointing at this inode in the volatile namespace.
    nlink: u32,
    /// Open file handles; an unlinked file lives until the last one is released.
    open: u32,
}

/// What attributes the kernel is told.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub nlink: u32,
    pub meta: Meta,
}

/// Attribute changes requested by `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// What a power cut threw away, for the operator's log.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CutReport {
    /// Files that had writes or size changes not yet fsynced.
    pub files_with_unsynced_data: usize,
    /// Pages of such unsynced data.
    pub unsynced_pages: usize,
    /// Directories whose entries differed from their durable entries.
    pub dirs_with_unsynced_entries: usize,
    /// `(durable path, bytes kept, bytes written)` when the last unsynced write was torn.
    pub torn: Option<(PathBuf, usize, usize)>,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "discarded unsynced data of {} files ({} pages) and unsynced entries of {} directories",
            self.files_with_unsynced_data, self.unsynced_pages, self.dirs_with_unsynced_entries
        )?;
        if let Some((path, kept, of)) = &self.torn {
            write!(
                f,
                "; tore the last write to {}: kept {kept} of {of} bytes",
                path.display()
            )?;
        }
        Ok(())
    }
}

/// The whole simulated disk.
#[derive(Debug)]
pub struct Model {
    live: HashMap<Ino, Live>,
    durable: HashMap<Ino, Node>,
    next_ino: Ino,
    /// Counts writes, so a cut can tell which unsynced write was issued last.
    writes: u64,
    /// Where the durable state is mirrored; `None` in pure in-memory tests.
    mirror: Option<Mirror>,
    /// Set by a power cut or a clean shutdown: every later operation fails with EIO.
    frozen: bool,
}

impl Model {
    /// An empty filesystem (only the root directory, already durable), mirrored nowhere.
    pub fn new_empty() -> Model {
        let root = Node {
            meta: Meta::new(0o755, 0, 0),
            body: Body::Dir(BTreeMap::new()),
        };
        Model::from_durable(HashMap::from([(ROOT, root)]), ROOT + 1, None)
    }

    /// A model whose durable and volatile states both equal `durable` (a freshly booted disk).
    pub fn from_durable(durable: HashMap<Ino, Node>, next_ino: Ino, mirror: Option<Mirror>) -> Model {
        let mut nlinks: HashMap<Ino, u32> = HashMap::new();
        for node in durable.values() {
            if let Body::Dir(entries) = &node.body {
                for child in entries.values() {
                    *nlinks.entry(*child).or_default() += 1;
                }
            }
        }
        let live = durable
            .iter()
            .map(|(ino, node)| {
                let live = Live {
                    node: node.clone(),
                    dirty: BTreeSet::new(),
                    last_write: None,
                    nlink: if *ino == ROOT {
                        1
                    } else {
                        nlinks.get(ino).copied().unwrap_or(0)
                    },
                    open: 0,
                };
                (*ino, live)
            })
            .collect();
        Model {
            live,
            durable,
            next_ino,
            writes: 0,
            mirror,
            frozen: false,
        }
    }

    fn check_up(&self) -> Result<()> {
        if self.frozen { Err(libc::EIO) } else { Ok(()) }
    }

    fn live(&self, ino: Ino) -> Result<&Live> {
        self.check_up()?;
        self.live.get(&ino).ok_or(libc::ENOENT)
    }

    fn live_mut(&mut self, ino: Ino) -> Result<&mut Live> {
        self.check_up()?;
        self.live.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: Ino) -> Result<&BTreeMap<OsString, Ino>> {
        match &self.live(dir)?.node.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> Result<&mut BTreeMap<OsString, Ino>> {
        let live = self.live_mut(dir)?;
        live.node.meta.mtime = SystemTime::now();
        match &mut live.node.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let live = self.live(ino)?;
        let size = match &live.node.body {
            Body::File(data) => data.size,
            Body::Dir(entries) => entries.len() as u64,
        };
        Ok(Attr {
            ino,
            kind: live.node.kind(),
            size,
            nlink: live.nlink,
            meta: live.node.meta.clone(),
        })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        self.getattr(ino)
    }

    /// Creates a file or directory named `name` in `parent` (volatile only).
    pub fn create(&mut self, parent: Ino, name: &OsStr, kind: Kind, meta: Meta) -> Result<Attr> {
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let body = match kind {
            Kind::File => Body::File(FileData::default()),
            Kind::Dir => Body::Dir(BTreeMap::new()),
        };
        let live = Live {
            node: Node { meta, body },
            dirty: BTreeSet::new(),
            last_write: None,
            nlink: 1,
            open: 0,
        };
        self.live.insert(ino, live);
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.getattr(ino)
    }

    /// Removes a name of a file (`want_dir` false) or an empty directory (`want_dir` true).
    pub fn remove(&mut self, parent: Ino, name: &OsStr, want_dir: bool) -> Result<()> {
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        match (&self.live(ino)?.node.body, want_dir) {
            (Body::Dir(_), false) => return Err(libc::EISDIR),
            (Body::File(_), true) => return Err(libc::ENOTDIR),
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.unlink_inode(ino);
        Ok(())
    }

    fn unlink_inode(&mut self, ino: Ino) {
        if let Some(live) = self.live.get_mut(&ino) {
            live.nlink = live.nlink.saturating_sub(1);
            live.node.meta.ctime = SystemTime::now();
        }
        self.drop_if_unused(ino);
    }

    fn drop_if_unused(&mut self, ino: Ino) {
        if self
            .live
            .get(&ino)
            .is_some_and(|live| live.nlink == 0 && live.open == 0)
        {
            self.live.remove(&ino);
            self.collect_durable_garbage();
        }
    }

    /// `rename(2)`: atomic in the volatile namespace; durable once both directories are synced.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<()> {
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        self.entries(new_parent)?;
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        let moving_dir = self.live(ino)?.node.kind() == Kind::Dir;
        if moving_dir && self.is_same_or_descendant(new_parent, ino) {
            return Err(libc::EINVAL);
        }
        let replaced = self.entries(new_parent)?.get(new_name).copied();
        if let Some(target) = replaced {
            if no_replace {
                return Err(libc::EEXIST);
            }
            match (&self.live(target)?.node.body, moving_dir) {
                (Body::Dir(_), false) => return Err(libc::EISDIR),
                (Body::File(_), true) => return Err(libc::ENOTDIR),
                (Body::Dir(entries), true) if !entries.is_empty() => {
                    return Err(libc::ENOTEMPTY);
                }
                _ => {}
            }
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(new_parent)?.insert(new_name.to_owned(), ino);
        if let Some(target) = replaced {
            self.unlink_inode(target);
        }
        Ok(())
    }

    fn is_same_or_descendant(&self, candidate: Ino, ancestor: Ino) -> bool {
        let mut stack = vec![ancestor];
        let mut seen = HashSet::new();
        while let Some(dir) = stack.pop() {
            if dir == candidate {
                return true;
            }
            if !seen.insert(dir) {
                continue;
            }
            if let Some(Live {
                node:
                    Node {
                        body: Body::Dir(entries),
                        ..
                    },
                ..
            }) = self.live.get(&dir)
            {
                stack.extend(entries.values());
            }
        }
        false
    }

    pub fn readdir(&self, dir: Ino) -> Result<Vec<(Ino, Kind, OsString)>> {
        let entries = self.entries(dir)?;
        let mut out = Vec::with_capacity(entries.len());
        for (name, ino) in entries {
            out.push((*ino, self.live(*ino)?.node.kind(), name.clone()));
        }
        Ok(out)
    }

    pub fn open(&mut self, ino: Ino) -> Result<()> {
        self.live_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: Ino) {
        if let Some(live) = self.live.get_mut(&ino) {
            live.open = live.open.saturating_sub(1);
        }
        self.drop_if_unused(ino);
    }

    pub fn read(&self, ino: Ino, offset: u64, len: usize) -> Result<Vec<u8>> {
        match &self.live(ino)?.node.body {
            Body::File(data) => Ok(data.read(offset, len)),
            Body::Dir(_) => Err(libc::EISDIR),
        }
    }

    pub fn write(&mut self, ino: Ino, offset: u64, bytes: &[u8]) -> Result<usize> {
        self.writes += 1;
        let sequence = self.writes;
        let live = self.live_mut(ino)?;
        let Body::File(data) = &mut live.node.body else {
            return Err(libc::EISDIR);
        };
        data.write(offset, bytes, &mut live.dirty);
        live.last_write = Some((sequence, offset, bytes.to_vec()));
        live.node.meta.mtime = SystemTime::now();
        Ok(bytes.len())
    }

    pub fn setattr(&mut self, ino: Ino, change: &SetAttr) -> Result<Attr> {
        let live = self.live_mut(ino)?;
        if let Some(size) = change.size {
            let Body::File(data) = &mut live.node.body else {
                return Err(libc::EISDIR);
            };
            data.set_size(size, &mut live.dirty);
            live.last_write = None;
            live.node.meta.mtime = SystemTime::now();
        }
        let meta = &mut live.node.meta;
        meta.perm = change.perm.unwrap_or(meta.perm);
        meta.uid = change.uid.unwrap_or(meta.uid);
        meta.gid = change.gid.unwrap_or(meta.gid);
        meta.atime = change.atime.unwrap_or(meta.atime);
        meta.mtime = change.mtime.unwrap_or(meta.mtime);
        meta.ctime = SystemTime::now();
        self.getattr(ino)
    }

    /// `fsync`/`fdatasync` of a file, or `fsync` of a directory.
    pub fn fsync(&mut self, ino: Ino) -> Result<()> {
        let live = self.live_mut(ino)?;
        if live.node.kind() == Kind::Dir {
            return self.fsync_dir(ino);
        }
        let dirty = std::mem::take(&mut live.dirty);
        live.last_write = None;
        let live = &self.live[&ino];
        let Body::File(source) = &live.node.body else {
            unreachable!("checked above that {ino} is a file");
        };
        let durable = self.durable.entry(ino).or_insert_with(|| live.node.empty_like());
        durable.meta = live.node.meta.clone();
        let Body::File(target) = &mut durable.body else {
            return Err(libc::EIO);
        };
        target.copy_pages_from(source, &dirty);
        if let Some(mirror) = &self.mirror {
            mirror
                .write_file_pages(&self.durable, ino, &dirty)
                .map_err(|_| libc::EIO)?;
        }
        Ok(())
    }

    /// `fsync` of a directory: its entries become the durable entries.
    pub fn fsync_dir(&mut self, dir: Ino) -> Result<()> {
        let entries = self.entries(dir)?.clone();
        let live_node = &self.live[&dir].node;
        let durable = self.durable.entry(dir).or_insert_with(|| live_node.empty_like());
        let Body::Dir(old) = &mut durable.body else {
            return Err(libc::EIO);
        };
        let removed: Vec<OsString> = old
            .iter()
            .filter(|(name, ino)| entries.get(*name) != Some(ino))
            .map(|(name, _)| name.clone())
            .collect();
        let added: Vec<(OsString, Ino)> = entries
            .iter()
            .filter(|(name, ino)| old.get(*name) != Some(ino))
            .map(|(name, ino)| (name.clone(), *ino))
            .collect();
        *old = entries;
        for (_, child) in &added {
            if !self.durable.contains_key(child) {
                // The name is durable but nothing of the file was synced: an empty file or an
                // empty directory is what a real disk would show.
                let empty = self.live[child].node.empty_like();
                self.durable.insert(*child, empty);
            }
        }
        if let Some(mirror) = &self.mirror {
            mirror
                .apply_dir_change(&self.durable, dir, &removed, &added)
                .map_err(|_| libc::EIO)?;
        }
        self.collect_durable_garbage();
        Ok(())
    }

    /// Drops durable inodes that no durable name reaches and that no longer exist in the volatile
    /// state (so can never be named again).
    fn collect_durable_garbage(&mut self) {
        let reachable = durable_reachable(&self.durable);
        self.durable
            .retain(|ino, _| reachable.contains(ino) || self.live.contains_key(ino));
    }

    /// Makes everything durable, as a clean shutdown's `sync` does.
    pub fn sync_all(&mut self) -> Result<()> {
        let mut inos: Vec<Ino> = self.live.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            self.fsync(ino)?;
        }
        Ok(())
    }

    /// The power goes out: everything not yet durable is gone, and the filesystem stops answering.
    /// With `tear_seed`, a random whole-sector prefix of the write issued last (of those not yet
    /// synced and longer than a sector) reaches the disk, as a disk losing power mid-write may do.
    pub fn cut(&mut self, tear_seed: Option<u64>) -> CutReport {
        let mut report = CutReport::default();
        // (sequence, ino, offset, bytes) of the write issued last, if it can be torn.
        let mut last: Option<(u64, Ino, u64, Vec<u8>)> = None;
        for (ino, live) in &self.live {
            match (&live.node.body, self.durable.get(ino)) {
                (Body::File(_), _) if !live.dirty.is_empty() => {
                    report.files_with_unsynced_data += 1;
                    report.unsynced_pages += live.dirty.len();
                    if let Some((sequence, offset, bytes)) = &live.last_write
                        && bytes.len() > SECTOR_SIZE
                        && self.durable.contains_key(ino)
                        && last.as_ref().is_none_or(|newest| newest.0 < *sequence)
                    {
                        last = Some((*sequence, *ino, *offset, bytes.clone()));
                    }
                }
                (
                    Body::Dir(entries),
                    Some(Node {
                        body: Body::Dir(old), ..
                    }),
                ) if entries != old => {
                    report.dirs_with_unsynced_entries += 1;
                }
                (Body::Dir(_), None) => report.dirs_with_unsynced_entries += 1,
                _ => {}
            }
        }
        if let (Some(seed), Some((_, ino, offset, bytes))) = (tear_seed, last) {
            let mut rng = SplitMix64(seed);
            let sectors = bytes.len().div_ceil(SECTOR_SIZE) as u64;
            let kept = (1 + rng.below(sectors - 1) as usize) * SECTOR_SIZE;
            if self.tear(ino, offset, &bytes[..kept]).is_ok() {
                let path = self.durable_paths(ino).into_iter().next();
                report.torn = Some((path.unwrap_or_default(), kept, bytes.len()));
            }
        }
        self.frozen = true;
        report
    }

    fn tear(&mut self, ino: Ino, offset: u64, kept: &[u8]) -> Result<()> {
        let Some(Node {
            body: Body::File(data),
            ..
        }) = self.durable.get_mut(&ino)
        else {
            return Err(libc::ENOENT);
        };
        let mut pages = BTreeSet::new();
        data.write(offset, kept, &mut pages);
        if let Some(mirror) = &self.mirror {
            mirror
                .write_file_pages(&self.durable, ino, &pages)
                .map_err(|_| libc::EIO)?;
        }
        Ok(())
    }

    /// Stops answering after a clean shutdown (call [`Model::sync_all`] first).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// The durable state (what a cut keeps), for tests.
    pub fn durable_read(&self, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for part in path {
            let Body::Dir(entries) = &self.durable.get(&ino)?.body else {
                return None;
            };
            ino = *entries.get(OsStr::new(part))?;
        }
        match &self.durable.get(&ino)?.body {
            Body::File(data) => Some(data.read(0, data.size as usize)),
            Body::Dir(_) => None,
        }
    }

    /// Paths (relative to the root) of every durable name of `ino`.
    pub fn durable_paths(&self, ino: Ino) -> Vec<PathBuf> {
        durable_paths(&self.durable, ino)
    }
}

/// Every inode reachable from the durable root.
fn durable_reachable(durable: &HashMap<Ino, Node>) -> HashSet<Ino> {
    let mut seen = HashSet::new();
    let mut stack = vec![ROOT];
    while let Some(ino) = stack.pop() {
        if !seen.insert(ino) {
            continue;
        }
        if let Some(Node {
            body: Body::Dir(entries),
            ..
        }) = durable.get(&ino)
        {
            stack.extend(entries.values());
        }
    }
    seen
}

/// Paths (relative to the root) under which `target` is durably named. Usually one; none for a
/// file whose name was never made durable; two for a file renamed across directories when only
/// the destination directory was synced.
pub fn durable_paths(durable: &HashMap<Ino, Node>, target: Ino) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(ROOT, PathBuf::new())];
    if target == ROOT {
        return vec![PathBuf::new()];
    }
    while let Some((dir, path)) = stack.pop() {
        if !seen.insert(dir) {
            continue;
        }
        let Some(Node {
            body: Body::Dir(entries),
            ..
        }) = durable.get(&dir)
        else {
            continue;
        };
        for (name, child) in entries {
            if *child == target {
                found.push(path.join(name));
            }
            if matches!(
                durable.get(child),
                Some(Node {
                    body: Body::Dir(_),
                    ..
                })
            ) {
                stack.push((*child, path.join(name)));
            }
        }
    }
    found
}

/// A tiny deterministic generator, so a torn cut can be replayed from its seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next() % bound }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(model: &mut Model, dir: Ino, name: &str) -> Ino {
        model
            .create(dir, OsStr::new(name), Kind::File, Meta::new(0o644, 0, 0))
            .unwrap()
            .ino
    }

    #[test]
    fn fsync_copies_only_the_file_and_dir_sync_only_the_names() {
        let mut model = Model::new_empty();
        let ino = file(&mut model, ROOT, "a");
        model.write(ino, 0, b"hello").unwrap();
        model.fsync(ino).unwrap();
        assert_eq!(model.durable_read(&["a"]), None, "no durable name yet");
        model.fsync_dir(ROOT).unwrap();
        assert_eq!(model.durable_read(&["a"]).unwrap(), b"hello");
        model.write(ino, 5, b" world").unwrap();
        model.fsync_dir(ROOT).unwrap();
        assert_eq!(model.durable_read(&["a"]).unwrap(), b"hello");
    }

    #[test]
    fn a_cross_directory_rename_needs_both_directories_synced() {
        let mut model = Model::new_empty();
        let sub = model
            .create(ROOT, OsStr::new("sub"), Kind::Dir, Meta::new(0o755, 0, 0))
            .unwrap()
            .ino;
        let ino = file(&mut model, ROOT, "f");
        model.write(ino, 0, b"x").unwrap();
        model.fsync(ino).unwrap();
        model.fsync_dir(ROOT).unwrap();
        model
            .rename(ROOT, OsStr::new("f"), sub, OsStr::new("g"), false)
            .unwrap();
        model.fsync_dir(sub).unwrap();
        assert_eq!(model.durable_paths(ino).len(), 2, "old and new name both durable");
        model.fsync_dir(ROOT).unwrap();
        assert_eq!(model.durable_paths(ino), vec![PathBuf::from("sub/g")]);
    }

    #[test]
    fn an_unlinked_file_is_collected_once_closed_and_unnamed() {
        let mut model = Model::new_empty();
        let ino = file(&mut model, ROOT, "f");
        model.open(ino).unwrap();
        model.fsync(ino).unwrap();
        model.fsync_dir(ROOT).unwrap();
        model.remove(ROOT, OsStr::new("f"), false).unwrap();
        assert!(model.read(ino, 0, 1).is_ok(), "still open");
        model.release(ino);
        assert_eq!(model.read(ino, 0, 1), Err(libc::ENOENT));
        assert!(model.durable.contains_key(&ino), "still durably named");
        model.fsync_dir(ROOT).unwrap();
        assert!(!model.durable.contains_key(&ino));
    }

    #[test]
    fn shrink_then_grow_exposes_zeros_after_sync() {
        let mut model = Model::new_empty();
        let ino = file(&mut model, ROOT, "f");
        model.write(ino, 0, &[9; 3 * PAGE_SIZE]).unwrap();
        model.fsync(ino).unwrap();
        model.fsync_dir(ROOT).unwrap();
        let shrink = SetAttr {
            size: Some(10),
            ..SetAttr::default()
        };
        model.setattr(ino, &shrink).unwrap();
        let grow = SetAttr {
            size: Some(3 * PAGE_SIZE as u64),
            ..SetAttr::default()
        };
        model.setattr(ino, &grow).unwrap();
        model.fsync(ino).unwrap();
        let durable = model.durable_read(&["f"]).unwrap();
        assert_eq!(&durable[..10], &[9; 10]);
        assert!(durable[10..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_cut_freezes_the_model() {
        let mut model = Model::new_empty();
        let ino = file(&mut model, ROOT, "f");
        model.write(ino, 0, b"x").unwrap();
        let report = model.cut(None);
        assert_eq!(report.files_with_unsynced_data, 1);
        assert_eq!(report.dirs_with_unsynced_entries, 1);
        assert_eq!(model.getattr(ROOT).unwrap_err(), libc::EIO);
    }
}
