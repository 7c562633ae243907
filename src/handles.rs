//! Open files, by FUSE file handle. (Directories have none: the kernel
//! lists them by inode, see `OverlayFs::readdir`.)
//!
//! A file handle keeps the fd it was opened with (a lower file opened for
//! reading on a writable overlay: from its first use, see
//! `OverlayFs::open`) and the copy-up generation of its node at the open:
//! a handle opened on a lower file before the object was copied up is
//! reopened on the upper copy at its next read, so readers see what
//! writers wrote (as the kernel's overlayfs does).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::inode::Node;

pub struct FileHandle {
    pub node: Arc<Node>,
    /// The open fd and the node's copy-up generation when it was opened;
    /// no fd yet for a lower file opened for reading until first used.
    pub fd: RwLock<(Option<Arc<OwnedFd>>, u32)>,
    /// That lower file's location (lower layers never change: the file
    /// there later is the one there at the open).
    pub lower: Option<crate::inode::Loc>,
    pub flags: i32,
    /// Passthrough (the kernel reads and writes the backing file itself)
    /// or cached (through layerfs).
    pub passthrough: std::sync::atomic::AtomicBool,
    /// Keeps the kernel's backing-file registration alive while open.
    pub backing: Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>,
}

pub type Handle = FileHandle;

const SHARDS: usize = 32;

pub struct Handles {
    next: AtomicU64,
    shards: Vec<Mutex<HashMap<u64, Arc<Handle>>>>,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            next: AtomicU64::new(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Handles {
    fn shard(&self, fh: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.shards[fh as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(fh).insert(fh, Arc::new(h));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.shard(fh).get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.shard(fh).remove(&fh)
    }

    /// Some open file `pred` accepts (a walk over all of them).
    pub fn find(&self, pred: impl Fn(&Handle) -> bool) -> Option<Arc<Handle>> {
        self.shards.iter().find_map(|s| {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .find(|h| pred(h))
                .cloned()
        })
    }
}
