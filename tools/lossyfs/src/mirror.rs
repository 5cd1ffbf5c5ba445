//! The backing directory: a plain directory that always holds exactly the durable state.
//!
//! Every change to the durable state is written through here as it happens (file pages on a file
//! `fsync`, names on a directory `fsync`), and nothing else ever is. So after a power cut the
//! backing directory is what the disk kept, readable with ordinary tools, and mounting lossyfs on
//! it again boots from that. The backing directory's own durability is not part of the
//! experiment (the real machine does not lose power), so it is not fsynced.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::model::{Body, FileData, Ino, Meta, Model, Node, PAGE_SIZE, ROOT, durable_paths};

#[derive(Debug)]
pub struct Mirror {
    root: PathBuf,
}

impl Mirror {
    /// Boots from `root`: both states of the returned model equal the directory's contents.
    pub fn load(root: &Path) -> io::Result<Model> {
        let mut durable = HashMap::new();
        let mut next_ino = ROOT + 1;
        load_dir(root, ROOT, &mut durable, &mut next_ino)?;
        let mirror = Mirror {
            root: root.to_path_buf(),
        };
        Ok(Model::from_durable(durable, next_ino, Some(mirror)))
    }

    /// Writes the given pages and the size of file `ino` to every durable name it has.
    pub fn write_file_pages(
        &self,
        durable: &HashMap<Ino, Node>,
        ino: Ino,
        pages: &BTreeSet<usize>,
    ) -> io::Result<()> {
        let Some(Node {
            body: Body::File(data),
            meta,
        }) = durable.get(&ino)
        else {
            return Ok(());
        };
        for path in durable_paths(durable, ino) {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.root.join(&path))?;
            for index in pages {
                let bytes = data.page_bytes(*index);
                file.write_all_at(&bytes, *index as u64 * PAGE_SIZE as u64)?;
            }
            file.set_len(data.size())?;
            file.set_permissions(fs::Permissions::from_mode(u32::from(meta.perm)))?;
        }
        Ok(())
    }

    /// Applies a directory's new durable entries: removes the names that went, writes out what
    /// each new name points at (its durable contents, recursively for a directory).
    pub fn apply_dir_change(
        &self,
        durable: &HashMap<Ino, Node>,
        dir: Ino,
        removed: &[OsString],
        added: &[(OsString, Ino)],
    ) -> io::Result<()> {
        for dir_path in durable_paths(durable, dir) {
            let dir_path = self.root.join(dir_path);
            for name in removed {
                remove_any(&dir_path.join(name))?;
            }
            for (name, child) in added {
                let path = dir_path.join(name);
                remove_any(&path)?;
                materialize(durable, *child, &path, &mut HashSet::new())?;
            }
        }
        Ok(())
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn materialize(
    durable: &HashMap<Ino, Node>,
    ino: Ino,
    path: &Path,
    seen: &mut HashSet<Ino>,
) -> io::Result<()> {
    let Some(node) = durable.get(&ino) else {
        return Ok(());
    };
    if !seen.insert(ino) {
        return Ok(());
    }
    match &node.body {
        Body::File(data) => {
            fs::write(path, data.read(0, data.size() as usize))?;
        }
        Body::Dir(entries) => {
            fs::create_dir(path)?;
            for (name, child) in entries {
                materialize(durable, *child, &path.join(name), seen)?;
            }
        }
    }
    fs::set_permissions(path, fs::Permissions::from_mode(u32::from(node.meta.perm)))
}

fn meta_of(metadata: &fs::Metadata) -> Meta {
    let mut meta = Meta::new((metadata.mode() & 0o7777) as u16, metadata.uid(), metadata.gid());
    if let Ok(mtime) = metadata.modified() {
        meta.mtime = mtime;
        meta.ctime = mtime;
    }
    meta
}

fn load_dir(path: &Path, ino: Ino, durable: &mut HashMap<Ino, Node>, next_ino: &mut Ino) -> io::Result<()> {
    let mut entries = BTreeMap::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        let child = *next_ino;
        if metadata.is_dir() {
            *next_ino += 1;
            load_dir(&entry.path(), child, durable, next_ino)?;
        } else if metadata.is_file() {
            *next_ino += 1;
            let data = FileData::from_bytes(&fs::read(entry.path())?);
            let node = Node {
                meta: meta_of(&metadata),
                body: Body::File(data),
            };
            durable.insert(child, node);
        } else {
            eprintln!(
                "lossyfs: ignoring {} (only files and directories are supported)",
                entry.path().display()
            );
            continue;
        }
        entries.insert(entry.file_name(), child);
    }
    let node = Node {
        meta: meta_of(&fs::metadata(path)?),
        body: Body::Dir(entries),
    };
    durable.insert(ino, node);
    Ok(())
}
