//! Mounting the real `lossyfs` binary in a scratch directory, cutting its power and booting again.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a mount or an unmount may take before the test gives up.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// A scratch pair of directories: `mnt` (the mountpoint) and `disk` (the backing directory).
pub struct Rig {
    pub root: PathBuf,
    pub mnt: PathBuf,
    pub disk: PathBuf,
    fs: Option<Child>,
}

/// FUSE needs /dev/fuse and the right to mount; without them these tests cannot say anything.
pub fn fuse_available() -> bool {
    let usable = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if !usable {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    usable
}

impl Rig {
    pub fn new(name: &str) -> Rig {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root =
            std::env::temp_dir().join(format!("lossyfs-test-{}-{}-{name}", std::process::id(), unique));
        let _ = fs::remove_dir_all(&root);
        let mnt = root.join("mnt");
        let disk = root.join("disk");
        fs::create_dir_all(&mnt).unwrap();
        fs::create_dir_all(&disk).unwrap();
        Rig {
            root,
            mnt,
            disk,
            fs: None,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Boots: mounts lossyfs over what the backing directory holds.
    pub fn mount(&mut self) {
        assert!(self.fs.is_none(), "already mounted");
        let child = Command::new(env!("CARGO_BIN_EXE_lossyfs"))
            .args(["--tear-seed", "7"])
            .arg(&self.mnt)
            .arg(&self.disk)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn lossyfs");
        self.fs = Some(child);
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !self.is_mounted() {
            assert!(Instant::now() < deadline, "lossyfs did not mount");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_mounted(&self) -> bool {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let target = self.mnt.to_string_lossy().into_owned();
        mounts
            .lines()
            .any(|line| line.starts_with("lossyfs ") && line.split(' ').nth(1) == Some(&target))
    }

    fn signal_and_wait(&mut self, signal: i32) {
        let mut child = self.fs.take().expect("not mounted");
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("wait for lossyfs");
        assert!(status.success(), "lossyfs exited with {status}");
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while self.is_mounted() {
            assert!(Instant::now() < deadline, "lossyfs did not unmount");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The power goes out; the backing directory keeps what was durable.
    pub fn cut(&mut self) {
        self.signal_and_wait(libc::SIGUSR1);
    }

    /// The power goes out in the middle of the last unsynced write.
    pub fn cut_tearing(&mut self) {
        self.signal_and_wait(libc::SIGUSR2);
    }

    /// A clean shutdown: everything is synced first.
    pub fn shutdown(&mut self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    /// Power cut followed by a boot.
    pub fn cut_and_boot(&mut self) {
        self.cut();
        self.mount();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.fs.is_some() {
            self.cut();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// fsync of a directory, the way SQLite and careful programs make a create or rename durable.
pub fn fsync_dir(path: &Path) {
    fs::File::open(path).unwrap().sync_all().unwrap();
}
