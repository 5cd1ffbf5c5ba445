//! `lossyfs [--tear-seed N] MOUNTPOINT BACKING_DIR`: mounts the backing directory's contents at
//! MOUNTPOINT and waits for a signal:
//!
//! - SIGUSR1: power cut. Unsynced writes and unsynced directory entries are discarded, every
//!   request still in flight fails with EIO, the mount is detached and the process exits 0.
//! - SIGUSR2: power cut that also tears the last unsynced write of one file (a random whole-sector
//!   prefix of it reaches the disk), chosen from `--tear-seed` (default: the clock).
//! - SIGTERM/SIGINT: clean shutdown. Everything is synced first, as a clean shutdown's `sync`
//!   does, then the mount is detached and the process exits 0.
//!
//! It must run as root (it mounts with mount(2) directly) or find `fusermount3` on the PATH.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{Config, MountOption};
use lossyfs::fs::LossyFs;
use lossyfs::mirror::Mirror;

struct Args {
    mountpoint: PathBuf,
    backing: PathBuf,
    tear_seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut tear_seed = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--tear-seed" {
            let value = args.next().ok_or("--tear-seed needs a value")?;
            let seed = value.to_string_lossy().parse::<u64>();
            tear_seed = Some(seed.map_err(|err| format!("--tear-seed: {err}"))?);
        } else if arg == "-h" || arg == "--help" {
            return Err(String::new());
        } else {
            positional.push(PathBuf::from(arg));
        }
    }
    let [mountpoint, backing] =
        <[PathBuf; 2]>::try_from(positional).map_err(|_| "expected MOUNTPOINT BACKING_DIR".to_string())?;
    let clock_seed = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
    };
    Ok(Args {
        mountpoint,
        backing,
        tear_seed: tear_seed.unwrap_or_else(clock_seed),
    })
}

/// Blocks the control signals in this thread before any other starts, so every thread inherits
/// the mask and only `sigwait` below ever sees them.
fn block_control_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a zero-initialised, then sigemptyset-initialised, sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to 200 ms for a control signal; `None` when none came.
fn wait_for_signal(set: &libc::sigset_t) -> Option<i32> {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    // SAFETY: `set` was initialised by block_control_signals; a null siginfo pointer is allowed.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// Lazily detaches the mount: programs that still hold files open get errors, not a hang.
fn detach(mountpoint: &Path) {
    let path = CString::new(mountpoint.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: umount2 with a valid NUL-terminated path.
    let detached = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0;
    if !detached {
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(mountpoint)
            .status();
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}\nusage: lossyfs [--tear-seed N] MOUNTPOINT BACKING_DIR");
            return ExitCode::from(2);
        }
    };
    let signals = block_control_signals();
    let model = match Mirror::load(&args.backing) {
        Ok(model) => Arc::new(Mutex::new(model)),
        Err(err) => {
            eprintln!("lossyfs: cannot load {}: {err}", args.backing.display());
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lossyfs".into()),
        MountOption::Subtype("lossyfs".into()),
        MountOption::DefaultPermissions,
    ];
    let fs = LossyFs {
        model: Arc::clone(&model),
    };
    let session = match fuser::spawn_mount(fs, &args.mountpoint, &config) {
        Ok(session) => session,
        Err(err) => {
            eprintln!("lossyfs: cannot mount {}: {err}", args.mountpoint.display());
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "lossyfs: mounted {} backing={} pid={}",
        args.mountpoint.display(),
        args.backing.display(),
        std::process::id()
    );
    loop {
        let Some(signal) = wait_for_signal(&signals) else {
            if session.guard.is_finished() {
                // Unmounted from outside (umount, fusermount3 -u): nothing left to serve.
                eprintln!("lossyfs: unmounted from outside; unsynced data is lost");
                return ExitCode::SUCCESS;
            }
            continue;
        };
        let mut model = model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match signal {
            libc::SIGUSR1 | libc::SIGUSR2 => {
                let tear = (signal == libc::SIGUSR2).then_some(args.tear_seed);
                let report = model.cut(tear);
                eprintln!("lossyfs: power cut: {report}");
            }
            libc::SIGTERM | libc::SIGINT => {
                if let Err(code) = model.sync_all() {
                    eprintln!("lossyfs: clean shutdown could not sync everything: errno {code}");
                    model.freeze();
                    detach(&args.mountpoint);
                    return ExitCode::FAILURE;
                }
                model.freeze();
                eprintln!("lossyfs: clean shutdown: everything synced");
            }
            _ => continue,
        }
        // The model is frozen: nothing changes any more, whatever arrives before the detach.
        detach(&args.mountpoint);
        // Exiting closes /dev/fuse, which aborts the connection without waiting for the kernel.
        std::process::exit(0);
    }
}
