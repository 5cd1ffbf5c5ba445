//! lossyfs: a FUSE filesystem that forgets, on command, everything that was not made durable.
//!
//! Killing a process proves little about durability: the operating system's page cache survives
//! the kill, so a program that never calls `fsync` looks durable. lossyfs plays the disk instead.
//! [`model`] keeps two states of the filesystem, the volatile one programs see and the durable one
//! a disk would keep, and moves data from the first to the second only on `fsync`/`fdatasync` of a
//! file (its contents) and `fsync` of a directory (its names). [`mirror`] writes the durable state
//! through to a backing directory as it changes. [`fs`] serves the volatile state over FUSE. A
//! power cut (SIGUSR1, or SIGUSR2 to also tear the last unsynced write) freezes the filesystem,
//! discards the volatile state and unmounts: the backing directory is then what survived.

pub mod fs;
pub mod mirror;
pub mod model;
