//! layerfs: a copy-on-write union filesystem (FUSE), format-compatible with
//! the kernel's overlayfs.
//!
//! Mount an overlay from a test or a tool; it is unmounted when the guard
//! drops (also while unwinding from a panic):
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let (lower, upper, work, mnt) = (
//!     dir.path().join("lower"), dir.path().join("upper"),
//!     dir.path().join("work"), dir.path().join("mnt"),
//! );
//! for d in [&lower, &upper, &work, &mnt] { std::fs::create_dir(d).unwrap(); }
//! std::fs::write(lower.join("hello"), "from the lower layer\n").unwrap();
//!
//! let mount = layerfs::Overlay::new()
//!     .lower(&lower)
//!     .upper(&upper, &work)
//!     .mount(&mnt)
//!     .unwrap();
//! std::fs::write(mnt.join("hello"), "changed\n").unwrap();
//! drop(mount);
//! assert_eq!(std::fs::read_to_string(upper.join("hello")).unwrap(), "changed\n");
//! assert_eq!(std::fs::read_to_string(lower.join("hello")).unwrap(), "from the lower layer\n");
//! ```

pub mod attrs;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod copy_up;
pub mod daemon;
pub mod diff;
pub mod docs;
pub mod error;
pub mod fuse;
pub mod handles;
pub mod idmap;
pub mod inode;
pub mod layer;
pub mod mount;
pub mod namespace;
pub mod oci;
pub mod overlay;
pub mod protect;
pub mod readdir;
pub mod registry;
pub mod resolve;
pub mod sys;
pub mod whiteout;

pub use mount::{MountGuard, Overlay};
