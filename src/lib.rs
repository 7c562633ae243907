//! layerfs: a copy-on-write union filesystem (FUSE), format-compatible with
//! the kernel's overlayfs.

pub mod diff;
pub mod error;
pub mod sys;
pub mod whiteout;
