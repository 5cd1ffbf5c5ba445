//! What survives a power cut on a mounted lossyfs, checked through the kernel with ordinary file
//! calls. Guards against a simulator that keeps too much (then a durability test proves nothing)
//! or too little (then it cries wolf): each rule of the model is checked in both directions.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::{Rig, fsync_dir, fuse_available};

/// Writes `bytes` to a new file, syncs it and its directory: the durable starting point.
fn durable_file(rig: &Rig, name: &str, bytes: &[u8]) {
    let mut file = fs::File::create(rig.path(name)).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
    fsync_dir(&rig.mnt);
}

#[test]
fn unsynced_write_is_lost_and_synced_write_is_kept() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("write");
    rig.mount();
    durable_file(&rig, "lost", b"before");
    durable_file(&rig, "kept", b"before");
    for name in ["lost", "kept"] {
        let file = OpenOptions::new().write(true).open(rig.path(name)).unwrap();
        file.write_all_at(b"AFTER!", 0).unwrap();
        if name == "kept" {
            file.sync_data().unwrap();
        }
    }
    assert_eq!(
        fs::read(rig.path("lost")).unwrap(),
        b"AFTER!",
        "reads see the page cache"
    );
    rig.cut_and_boot();
    assert_eq!(fs::read(rig.path("lost")).unwrap(), b"before");
    assert_eq!(fs::read(rig.path("kept")).unwrap(), b"AFTER!");
}

#[test]
fn append_and_truncate_are_undone_unless_synced() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("size");
    rig.mount();
    durable_file(&rig, "grow", &[7; 10_000]);
    durable_file(&rig, "shrink", &[7; 10_000]);
    let mut grow = OpenOptions::new().append(true).open(rig.path("grow")).unwrap();
    grow.write_all(&[8; 5_000]).unwrap();
    let shrink = OpenOptions::new().write(true).open(rig.path("shrink")).unwrap();
    shrink.set_len(100).unwrap();
    shrink.set_len(9_000).unwrap();
    rig.cut_and_boot();
    assert_eq!(fs::read(rig.path("grow")).unwrap(), vec![7; 10_000]);
    assert_eq!(fs::read(rig.path("shrink")).unwrap(), vec![7; 10_000]);

    let shrink = OpenOptions::new().write(true).open(rig.path("shrink")).unwrap();
    shrink.set_len(100).unwrap();
    shrink.set_len(9_000).unwrap();
    shrink.sync_all().unwrap();
    rig.cut_and_boot();
    let mut expected = vec![7; 100];
    expected.resize(9_000, 0);
    assert_eq!(
        fs::read(rig.path("shrink")).unwrap(),
        expected,
        "regrown bytes are zeros"
    );
}

#[test]
fn a_created_file_needs_its_directory_synced() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("create");
    rig.mount();
    let mut file = fs::File::create(rig.path("no-dir-sync")).unwrap();
    file.write_all(b"data").unwrap();
    file.sync_all().unwrap();
    drop(file);
    let mut file = fs::File::create(rig.path("dir-synced-only")).unwrap();
    file.write_all(b"data").unwrap();
    drop(file);
    fs::create_dir(rig.path("subdir")).unwrap();
    fsync_dir(&rig.mnt);
    // A file created after the directory sync is not covered by it.
    fs::write(rig.path("too-late"), b"data").unwrap();
    fs::File::open(rig.path("too-late")).unwrap().sync_all().unwrap();
    rig.cut_and_boot();
    assert!(
        fs::read(rig.path("no-dir-sync")).is_ok(),
        "synced before the directory sync, so named by it"
    );
    assert_eq!(fs::read(rig.path("no-dir-sync")).unwrap(), b"data");
    assert_eq!(
        fs::read(rig.path("dir-synced-only")).unwrap(),
        b"",
        "the name is durable, the unsynced contents are not"
    );
    assert!(rig.path("subdir").is_dir());
    assert!(!rig.path("too-late").exists());
}

#[test]
fn rename_and_unlink_are_durable_only_after_a_directory_sync() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("rename");
    rig.mount();
    durable_file(&rig, "old", b"old contents");
    durable_file(&rig, "victim", b"still here");
    fs::write(rig.path("tmp"), b"new contents").unwrap();
    fs::File::open(rig.path("tmp")).unwrap().sync_all().unwrap();
    fs::rename(rig.path("tmp"), rig.path("old")).unwrap();
    fs::remove_file(rig.path("victim")).unwrap();
    rig.cut_and_boot();
    assert_eq!(fs::read(rig.path("old")).unwrap(), b"old contents");
    assert_eq!(fs::read(rig.path("victim")).unwrap(), b"still here");
    assert!(!rig.path("tmp").exists());

    fs::write(rig.path("tmp"), b"new contents").unwrap();
    fs::File::open(rig.path("tmp")).unwrap().sync_all().unwrap();
    fs::rename(rig.path("tmp"), rig.path("old")).unwrap();
    fs::remove_file(rig.path("victim")).unwrap();
    fsync_dir(&rig.mnt);
    rig.cut_and_boot();
    assert_eq!(fs::read(rig.path("old")).unwrap(), b"new contents");
    assert!(!rig.path("victim").exists());
    assert!(!rig.path("tmp").exists());
}

#[test]
fn a_torn_cut_keeps_a_whole_sector_prefix_of_the_last_write() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("tear");
    rig.mount();
    durable_file(&rig, "page", &[0; 8192]);
    let file = OpenOptions::new().write(true).open(rig.path("page")).unwrap();
    // Page-aligned, so the kernel sends it as one FUSE write (it splits writes at page edges).
    file.write_all_at(&[0xAB; 4096], 4096).unwrap();
    rig.cut_tearing();
    let on_disk = fs::read(rig.disk.join("page")).unwrap();
    assert_eq!(on_disk.len(), 8192);
    assert!(on_disk[..4096].iter().all(|b| *b == 0));
    let kept = on_disk[4096..].iter().take_while(|b| **b == 0xAB).count();
    assert!(kept > 0 && kept < 4096, "kept {kept} bytes");
    assert_eq!(kept % 512, 0, "whole sectors only");
    assert!(on_disk[4096 + kept..].iter().all(|b| *b == 0));
}

#[test]
fn a_clean_shutdown_keeps_everything() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("clean");
    rig.mount();
    fs::create_dir(rig.path("dir")).unwrap();
    fs::write(rig.path("dir/file"), b"never synced").unwrap();
    rig.shutdown();
    assert_eq!(fs::read(rig.disk.join("dir/file")).unwrap(), b"never synced");
    rig.mount();
    assert_eq!(fs::read(rig.path("dir/file")).unwrap(), b"never synced");
}

#[test]
fn shared_mmap_works_and_is_coherent_with_read() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("mmap");
    rig.mount();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(rig.path("shm"))
        .unwrap();
    file.set_len(32 * 1024).unwrap();
    let len = 32 * 1024;
    // SAFETY: mapping a file we own, writing within its length, unmapping before it is closed.
    unsafe {
        use std::os::fd::AsRawFd;
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "shared writable mmap refused");
        let bytes = std::slice::from_raw_parts_mut(addr.cast::<u8>(), len);
        bytes[4096..4100].copy_from_slice(b"wal!");
        assert_eq!(libc::msync(addr, len, libc::MS_SYNC), 0);
        let mut seen = [0u8; 4];
        file.read_exact_at(&mut seen, 4096).unwrap();
        assert_eq!(&seen, b"wal!");
        libc::munmap(addr, len);
    }
}

#[test]
fn nothing_answers_after_a_cut() {
    if !fuse_available() {
        return;
    }
    let mut rig = Rig::new("dead");
    rig.mount();
    let file = fs::File::create(rig.path("open")).unwrap();
    rig.cut();
    assert!(file.write_all_at(b"x", 0).is_err() || file.sync_all().is_err());
}
