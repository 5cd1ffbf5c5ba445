//! One writing tallyd per SQLite file: an exclusive `flock` on `<db>.lock`, held for the life of
//! the store.
//!
//! Why a lock of our own: SQLite serialises single transactions, not processes. Two tallyd
//! processes on one file would each decide against the balances they hold in memory and each
//! commit, and acknowledged money would be lost. Why `flock` on a separate file: the kernel
//! releases it when the process dies, however it dies (SIGKILL included), so a stale lock cannot
//! outlive its holder; it works on the local and overlay filesystems a container volume gives
//! (and NFS emulates it with byte-range locks); and keeping it off the database file means it
//! never interacts with SQLite's own POSIX locks there. The file holds the holder's pid, so the
//! refusal can name it. It is never deleted: unlinking a lock file races with the next process
//! opening it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiting `serve` tries the lock again.
const LOCK_RETRY_PERIOD: Duration = Duration::from_millis(50);

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{db} is in use by another tallyd (pid {holder}, lock file {lock}); stop that process first, \
         or pass --lock-wait-ms to wait for it to exit"
    )]
    Held {
        db: String,
        lock: String,
        holder: String,
    },
    #[error("cannot use the lock file {lock}: {source}")]
    Io {
        lock: String,
        #[source]
        source: std::io::Error,
    },
}

/// Held while it exists; the kernel releases it when it is dropped or the process dies.
#[derive(Debug)]
pub struct WriterLock {
    /// The open file description that carries the `flock`.
    _file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Takes the writer lock of the database at `db`, waiting up to `wait` for another holder to
    /// exit (zero: fail at once).
    pub fn acquire(db: &Path, wait: Duration) -> Result<Self, LockError> {
        let path = lock_path(db);
        let io = |source| LockError::Io {
            lock: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::Error(source)) => return Err(io(source)),
                Err(TryLockError::WouldBlock) => {
                    let holder = read_holder(&mut file);
                    if Instant::now() >= deadline {
                        return Err(LockError::Held {
                            db: db.display().to_string(),
                            lock: path.display().to_string(),
                            holder,
                        });
                    }
                    if !told {
                        tracing::info!(db = %db.display(), %holder, wait_ms = wait.as_millis() as u64,
                            "another tallyd holds the database; waiting for it to exit");
                        told = true;
                    }
                    std::thread::sleep(LOCK_RETRY_PERIOD);
                }
            }
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `users.db` -> `users.db.lock`, beside it.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn read_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
    match text.trim() {
        "" => "unknown".to_owned(),
        pid => pid.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("users.db");
        let first = WriterLock::acquire(&db, Duration::ZERO).unwrap();
        // flock locks belong to open file descriptions, so a second open in this process conflicts too.
        let refused = WriterLock::acquire(&db, Duration::from_millis(120)).unwrap_err();
        let message = refused.to_string();
        assert!(message.contains(&std::process::id().to_string()), "{message}");
        assert!(message.contains("users.db"), "{message}");
        drop(first);
        let second = WriterLock::acquire(&db, Duration::ZERO).unwrap();
        assert_eq!(second.path(), lock_path(&db));
    }
}
