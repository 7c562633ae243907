//! The inode table: FUSE inode number ↔ overlay object, with lookup counts.
//!
//! A node's number is normally the inode number it reports (see
//! `layer::Stack::map_ino`), so it is stable across copy-up, and every
//! name of one upper file leads to its one node, as every name of one
//! file leads to one inode on the kernel's overlayfs: locks, FIFOs,
//! inotify watches and cached attributes are the file's, whichever name
//! they were reached by. The exception is a lower hard link: each of its
//! names gets a node of its own, with a number from a private range, keyed
//! by (parent, name), reporting the shared `st_ino`. The kernel's overlayfs
//! gives each name of a lower hard link its own inode too (`index=off`),
//! because a copy-up through one name must not change the others; and
//! since FUSE never says through which name an inode is used, each name
//! must be its own node to be copied up through that name alone. Once
//! copied up, such a node is its file's node (an alias of the copy's
//! inode number), found through any name the copy gains.
//! Invariants: a node stays in the table while the kernel holds lookups on
//! it (`forget` drops them); a child holds an `Arc` of its parent, so the
//! parent chain needed for copy-up is always there; a node's location only
//! ever moves from a lower layer to the upper, never back (except when the
//! object is deleted).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::whiteout::Opaque;

pub const ROOT_INO: u64 = 1;

/// One layer's directory that contributes to a merged directory.
#[derive(Clone)]
pub struct DirLayer {
    pub layer: usize,
    pub fd: Arc<OwnedFd>,
    /// The directory's `overlay.opaque` value in this layer (`x` matters:
    /// it may hold xattr whiteouts).
    pub opaque: Opaque,
    /// For lower layers: whether the directory holds any OCI `.wh.` marker,
    /// learnt from one scan on the first lookup miss, so that misses in
    /// marker-free directories (nearly all) need no `.wh.NAME` lookup.
    pub oci_markers: Arc<std::sync::OnceLock<bool>>,
}

impl DirLayer {
    pub fn new(layer: usize, fd: Arc<OwnedFd>, opaque: Opaque) -> DirLayer {
        DirLayer {
            layer,
            fd,
            opaque,
            oci_markers: Arc::default(),
        }
    }
}

/// A file name in a layer directory: inline when short (most are, and
/// every node the kernel knows holds one), else on the heap.
#[derive(Clone)]
pub struct Name(NameRepr);

/// Inline: the name, a NUL and zero padding (names up to 22 bytes).
#[derive(Clone)]
enum NameRepr {
    Inline([u8; 23]),
    Heap(Box<CStr>),
}

impl Name {
    pub fn as_c_str(&self) -> &CStr {
        match &self.0 {
            NameRepr::Inline(b) => CStr::from_bytes_until_nul(b).unwrap_or_default(),
            NameRepr::Heap(c) => c,
        }
    }
}

impl Default for Name {
    fn default() -> Name {
        Name(NameRepr::Inline([0; 23]))
    }
}

impl std::ops::Deref for Name {
    type Target = CStr;
    fn deref(&self) -> &CStr {
        self.as_c_str()
    }
}

impl From<&CStr> for Name {
    fn from(c: &CStr) -> Name {
        let b = c.to_bytes();
        if b.len() < 23 {
            let mut buf = [0u8; 23];
            buf[..b.len()].copy_from_slice(b);
            Name(NameRepr::Inline(buf))
        } else {
            Name(NameRepr::Heap(c.into()))
        }
    }
}

impl From<CString> for Name {
    fn from(c: CString) -> Name {
        Name::from(c.as_c_str())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_c_str().fmt(f)
    }
}

/// Where an object's topmost entry lives: a name in a layer directory.
#[derive(Clone)]
pub struct Loc {
    pub layer: usize,
    /// The containing directory, in that layer.
    pub dir: Arc<OwnedFd>,
    pub name: Name,
}

/// Open files of a node by I/O mode. The kernel refuses to mix modes on
/// one inode (a cached open while passthrough ones are open fails with
/// ETXTBSY) and needs one backing file for all passthrough opens, so the
/// mode of a new open follows the ones already open.
#[derive(Default)]
pub struct NodeIo {
    pub cached: u32,
    pub passthrough: u32,
    /// The kernel's backing-file registration shared by passthrough opens
    /// (an opaque token owned by the FUSE adapter).
    pub backing: Option<std::sync::Weak<dyn std::any::Any + Send + Sync>>,
}

/// The `NodeIo` of every node with open files, by node id (kept apart from
/// the nodes: most are never open).
pub struct IoTable {
    shards: Box<[Mutex<HashMap<u64, NodeIo>>]>,
}

impl Default for IoTable {
    fn default() -> IoTable {
        IoTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl IoTable {
    /// Runs `f` on node `ino`'s entry (created empty when missing) under its
    /// shard's lock; the entry goes once no file is open.
    pub fn with<T>(&self, ino: u64, f: impl FnOnce(&mut NodeIo) -> T) -> T {
        let mut shard = self.shards[shard_of(ino)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let io = shard.entry(ino).or_default();
        let r = f(io);
        if io.cached == 0 && io.passthrough == 0 {
            shard.remove(&ino);
        }
        r
    }
}

/// The mutable part of a node.
#[derive(Clone)]
pub struct NodeState {
    /// Merged-tree parent (None for the root).
    pub parent: Option<Arc<Node>>,
    /// Topmost entry; None for the root and for deleted objects.
    pub loc: Option<Loc>,
    /// For directories: the contributing layer directories, top to bottom.
    pub dirs: Box<[DirLayer]>,
    /// An `O_PATH` fd kept when the name the node was last found by went
    /// away (unlinked or renamed over, while open or while the file keeps
    /// other names); an `O_TMPFILE` file's own fd.
    pub detached: Option<Arc<OwnedFd>>,
    /// `detached` is a lower layer's file (never copied up: changes through
    /// an open file of it fail, see `OverlayFs::change_loc`).
    pub detached_lower: bool,
    /// Deleted from the merged namespace (an upper object's `st_nlink`
    /// drops with it; a lower object's stays, as on the kernel).
    pub unlinked: bool,
}

impl NodeState {
    /// The layer of the topmost entry.
    pub fn top_layer(&self) -> Option<usize> {
        self.dirs
            .first()
            .map(|d| d.layer)
            .or(self.loc.as_ref().map(|l| l.layer))
    }
}

/// `Node::lower_xattrs`: not looked at yet, none, some.
pub const XATTRS_UNKNOWN: u8 = 0;
pub const XATTRS_NONE: u8 = 1;
pub const XATTRS_SOME: u8 = 2;

pub struct Node {
    /// The FUSE node id.
    pub ino: u64,
    /// The kernel was given this lower file's content (`OverlayFs::prefill`).
    pub prefilled: std::sync::atomic::AtomicBool,
    /// This lower file was opened for reading once: later opens may leave
    /// opening it to their first use (`OverlayFs::open`).
    pub opened: std::sync::atomic::AtomicBool,
    /// Open files of this node passed through for writing: the kernel then
    /// writes the upper file itself (mmap writes change its times without
    /// a request), so its attributes are not cached meanwhile.
    pub passthrough_writers: AtomicU32,
    /// Whether this object's file in a lower layer has xattrs (`XATTRS_*`):
    /// lower files never change, so a GETXATTR of one that has none (every
    /// `ls -l` entry asks for `security.selinux`) is answered without a
    /// system call.
    pub lower_xattrs: std::sync::atomic::AtomicU8,
    /// The object's immutable and append-only flags (`protect::IMMUTABLE`,
    /// `APPEND`) with `protect::KNOWN` once read (`OverlayFs::prot`).
    pub prot: std::sync::atomic::AtomicU8,
    /// This directory was listed to the kernel, which may keep the listing
    /// (so a change of its entries must drop it); never cleared.
    pub listed: std::sync::atomic::AtomicBool,
    /// `S_IFMT` bits; an object never changes type.
    pub fmt: u32,
    lookups: AtomicU64,
    pub state: RwLock<NodeState>,
    /// Serialises copy-up and namespace changes of this object.
    pub lock: Mutex<()>,
    /// Bumped each time the object moves to a new underlying file (copy-up),
    /// so open handles know to reopen.
    pub generation: AtomicU32,
}

impl Node {
    /// Whether the kernel may cache this node's attributes (see
    /// `passthrough_writers`). A file's names all lead to its one node, a
    /// lower hard link's each to its own, and a change through one of
    /// those copies up that name alone, leaving the others' lower file as
    /// it was.
    pub fn cacheable(&self) -> bool {
        self.passthrough_writers.load(Ordering::Relaxed) == 0
    }

    pub fn new(ino: u64, fmt: u32, state: NodeState) -> Node {
        Node {
            ino,
            prefilled: std::sync::atomic::AtomicBool::new(false),
            opened: std::sync::atomic::AtomicBool::new(false),
            passthrough_writers: AtomicU32::new(0),
            lower_xattrs: std::sync::atomic::AtomicU8::new(XATTRS_UNKNOWN),
            prot: std::sync::atomic::AtomicU8::new(0),
            listed: std::sync::atomic::AtomicBool::new(false),
            fmt,
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            lock: Mutex::new(()),
            generation: AtomicU32::new(0),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }

    /// A snapshot of the state (cheap: Arcs and small vectors).
    pub fn snapshot(&self) -> NodeState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `f` on the state without copying it.
    pub fn read_state<T>(&self, f: impl FnOnce(&NodeState) -> T) -> T {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_state(&self, f: impl FnOnce(&mut NodeState)) {
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }
}

/// Change counters of directory entries. A lookup resolves a name on disk
/// and then records the result in a node; a rename or unlink in the same
/// directory that runs in between would otherwise be undone by that record
/// (the node pointed back at the old name, which may by then hold a
/// whiteout or another file). Namespace changes hold an `EntryChange` on
/// their parent directories from before they touch the disk until their
/// nodes are updated; a lookup records its result only if no change of its
/// directory began or was running meanwhile, and resolves again otherwise.
/// The counters are shared by directories whose ids hash alike: a collision
/// costs a retry, never a wrong answer.
pub struct EntryVersions {
    slots: Box<[EntrySlot]>,
}

#[derive(Default)]
struct EntrySlot {
    busy: AtomicU32,
    generation: AtomicU64,
}

const ENTRY_SLOTS: usize = 4096;

impl Default for EntryVersions {
    fn default() -> EntryVersions {
        EntryVersions {
            slots: (0..ENTRY_SLOTS).map(|_| EntrySlot::default()).collect(),
        }
    }
}

impl EntryVersions {
    fn slot(&self, dir: u64) -> &EntrySlot {
        let h = dir.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52;
        &self.slots[h as usize % ENTRY_SLOTS]
    }

    /// Marks a change of entries in `dirs` as running until the guard drops.
    pub fn change(&self, dirs: &[u64]) -> EntryChange<'_> {
        let slots: Vec<&EntrySlot> = dirs.iter().map(|&d| self.slot(d)).collect();
        for s in &slots {
            s.busy.fetch_add(1, Ordering::SeqCst);
        }
        EntryChange { slots }
    }

    /// The version of `dir`'s entries, or None while a change is running.
    pub fn begin(&self, dir: u64) -> Option<u64> {
        let s = self.slot(dir);
        let generation = s.generation.load(Ordering::SeqCst);
        (s.busy.load(Ordering::SeqCst) == 0).then_some(generation)
    }

    /// No change of `dir`'s entries began since `begin` returned `seen`.
    pub fn unchanged(&self, dir: u64, seen: u64) -> bool {
        let s = self.slot(dir);
        s.busy.load(Ordering::SeqCst) == 0 && s.generation.load(Ordering::SeqCst) == seen
    }
}

/// A running change of directory entries (see `EntryVersions`).
pub struct EntryChange<'a> {
    slots: Vec<&'a EntrySlot>,
}

impl Drop for EntryChange<'_> {
    fn drop(&mut self) {
        for s in &self.slots {
            s.generation.fetch_add(1, Ordering::SeqCst);
            s.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// How a lookup's result may be recorded in an existing node.
#[derive(Clone, Copy)]
pub enum Fresh {
    /// Made by a namespace change holding its directory: always current.
    Current,
    /// Resolved by a lookup of directory `.0` at entry version `.1`:
    /// recorded only if that version still holds.
    Seen(u64, u64),
    /// Of unknown age: a new node gets it, an existing node keeps its own.
    Unknown,
}

/// The table, sharded to keep lock contention low under many threads.
pub struct NodeTable {
    pub versions: EntryVersions,
    /// The root's `st_ino` (its node id is always 1).
    root_st_ino: AtomicU64,
    shards: Vec<RwLock<HashSet<Entry>>>,
    /// Per-name nodes of hard-linked lower files, both ways, and the
    /// aliases of copied-up nodes.
    paths: Mutex<PathIndex>,
    /// How many aliases there are (`PathIndex::aliases`; none: no lookup of
    /// an upper file takes `paths`' lock).
    aliases: AtomicU64,
    next_path_id: AtomicU64,
}

/// A table entry: a node, found by its id (8 bytes per entry rather than a
/// map's 16: the table holds every inode the kernel knows).
struct Entry(Arc<Node>);

impl std::borrow::Borrow<u64> for Entry {
    fn borrow(&self) -> &u64 {
        &self.0.ino
    }
}

impl std::hash::Hash for Entry {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.ino.hash(h)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.0.ino == other.0.ino
    }
}

impl Eq for Entry {}

/// (parent, name) ↔ node id of the per-name nodes; aliases.
#[derive(Default)]
struct PathIndex {
    ids: HashMap<(u64, Vec<u8>), u64>,
    keys: HashMap<u64, (u64, Vec<u8>)>,
    /// The `st_ino` each reports.
    st_inos: HashMap<u64, u64>,
    /// The number an upper file would have as a node of its own → the
    /// node it was copied up from, which every name of the file leads to:
    /// a lower hard link's per-name node, or a node whose copy has no
    /// `overlay.origin` to take the lower's number from (see
    /// `NodeTable::alias`).
    aliases: HashMap<u64, u64>,
    /// Node id → its alias.
    alias_of: HashMap<u64, u64>,
}

impl PathIndex {
    /// Points `key` at node `id` (and `id` at `key`), dropping the old key.
    fn set(&mut self, id: u64, key: (u64, Vec<u8>)) {
        if let Some(old) = self.keys.remove(&id)
            && self.ids.get(&old) == Some(&id)
        {
            self.ids.remove(&old);
        }
        self.ids.insert(key.clone(), id);
        self.keys.insert(id, key);
    }

    /// `id`'s name no longer leads to it.
    fn unkey(&mut self, id: u64) {
        if let Some(key) = self.keys.remove(&id)
            && self.ids.get(&key) == Some(&id)
        {
            self.ids.remove(&key);
        }
    }

    fn remove(&mut self, id: u64) {
        self.st_inos.remove(&id);
        self.unalias(id);
        self.unkey(id);
    }

    fn unalias(&mut self, id: u64) {
        if let Some(ino) = self.alias_of.remove(&id)
            && self.aliases.get(&ino) == Some(&id)
        {
            self.aliases.remove(&ino);
        }
    }
}

/// Node ids of per-name nodes: a range no real inode number reaches.
const PATH_ID_BASE: u64 = 0xfff0_0000_0000_0000;

const SHARDS: usize = 64;

/// The shard of a node id, in the node table and the I/O-mode table.
fn shard_of(ino: u64) -> usize {
    (ino as usize ^ (ino >> 32) as usize) % SHARDS
}

impl NodeTable {
    pub fn new(root: Node) -> NodeTable {
        let shards: Vec<_> = (0..SHARDS).map(|_| RwLock::new(HashSet::new())).collect();
        let t = NodeTable {
            versions: EntryVersions::default(),
            root_st_ino: AtomicU64::new(ROOT_INO),
            shards,
            paths: Mutex::new(PathIndex::default()),
            aliases: AtomicU64::new(0),
            next_path_id: AtomicU64::new(PATH_ID_BASE),
        };
        let root = Arc::new(root);
        root.lookups.store(1, Ordering::Relaxed);
        t.shard(ROOT_INO)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Entry(root));
        t
    }

    fn shard(&self, ino: u64) -> &RwLock<HashSet<Entry>> {
        &self.shards[shard_of(ino)]
    }

    /// The `st_ino` a node reports: its id, except for the root and the
    /// per-name nodes.
    pub fn st_ino(&self, node: &Node) -> u64 {
        match node.ino {
            ROOT_INO => self.root_st_ino.load(Ordering::Relaxed),
            id if id >= PATH_ID_BASE => {
                let paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
                paths.st_inos.get(&id).copied().unwrap_or(id)
            }
            id => id,
        }
    }

    /// Sets the `st_ino` of the root, or of a per-name node copied up to
    /// an upper file of its own (which makes it that file's node: `alias`);
    /// ignored for others, which report their id.
    pub fn set_st_ino(&self, node: &Node, st_ino: u64) {
        match node.ino {
            ROOT_INO => self.root_st_ino.store(st_ino, Ordering::Relaxed),
            id if id >= PATH_ID_BASE => {
                // (Not for a node already forgotten.)
                let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = paths.st_inos.get_mut(&id) {
                    *v = st_ino;
                    self.alias_locked(&mut paths, id, st_ino);
                }
            }
            _ => {}
        }
    }

    /// `node` was copied up to an upper file that would otherwise be found
    /// as node `ino` (its own inode number, having no origin to take the
    /// lower's from): every name of that file leads to `node` while the
    /// kernel holds it (`lookup_upper`).
    pub fn alias(&self, node: &Node, ino: u64) {
        if ino == node.ino {
            return;
        }
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        // (Not for a node already forgotten; the paths lock before a
        // shard's, as in `lookup_path`.)
        if self.get(node.ino).is_some() {
            self.alias_locked(&mut paths, node.ino, ino);
        }
    }

    fn alias_locked(&self, paths: &mut PathIndex, id: u64, ino: u64) {
        paths.unalias(id);
        paths.aliases.insert(ino, id);
        paths.alias_of.insert(id, ino);
        self.aliases
            .store(paths.aliases.len() as u64, Ordering::Release);
    }

    /// The node an upper file numbered `ino` was copied up from (`alias`).
    pub fn aliased(&self, ino: u64) -> Option<Arc<Node>> {
        if self.aliases.load(Ordering::Acquire) == 0 {
            return None;
        }
        let id = *self
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .aliases
            .get(&ino)?;
        self.get(id)
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.shard(ino)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .map(|e| e.0.clone())
    }

    /// Whether a result of that freshness is known to be current.
    pub fn fresh(&self, fresh: Fresh) -> bool {
        match fresh {
            Fresh::Current => true,
            Fresh::Seen(dir, seen) => self.versions.unchanged(dir, seen),
            Fresh::Unknown => false,
        }
    }

    /// Applies a lookup's result to an existing node as `fresh` allows:
    /// `update` runs when the result is current, nothing happens when its
    /// age is unknown; false when it went stale. Checked under the state
    /// lock: a change that updates this node after the check waits for this
    /// update, and wins.
    fn refresh(&self, n: &Node, fresh: Fresh, update: impl FnOnce(&mut NodeState)) -> bool {
        let mut stale = false;
        n.set_state(|s| match fresh {
            Fresh::Unknown => {}
            _ if !self.fresh(fresh) => stale = true,
            _ => update(s),
        });
        !stale
    }

    /// Records one kernel lookup of an object: inserts a new node, or
    /// refreshes an existing one with `state` (unless that would move it from
    /// the upper layer back to a lower one, which only a stale lookup racing
    /// a copy-up could ask for). None when `fresh` says the result is stale
    /// (the caller resolves again).
    pub fn lookup(
        &self,
        ino: u64,
        fmt: u32,
        state: NodeState,
        fresh: Fresh,
        is_upper: impl Fn(usize) -> bool,
    ) -> Option<Arc<Node>> {
        let mut shard = self.shard(ino).write().unwrap_or_else(|e| e.into_inner());
        let node = match shard.get(&ino).map(|e| &e.0) {
            Some(n) if n.fmt == fmt => {
                let current = self.refresh(n, fresh, |s| {
                    let was_upper = s.top_layer().is_some_and(&is_upper);
                    let now_upper = state.top_layer().is_some_and(&is_upper);
                    if !was_upper || now_upper {
                        *s = state;
                    }
                });
                if !current {
                    return None;
                }
                n.clone()
            }
            _ => {
                if matches!(fresh, Fresh::Seen(..)) && !self.fresh(fresh) {
                    return None;
                }
                let n = Arc::new(Node::new(ino, fmt, state));
                shard.replace(Entry(n.clone()));
                n
            }
        };
        node.lookups.fetch_add(1, Ordering::Relaxed);
        Some(node)
    }

    /// Records one kernel lookup of an upper non-directory numbered `ino`,
    /// found at `key()`: the node it was copied up from if that one lives and
    /// has it as its alias (`alias`), else its node by number, as `lookup`
    /// — one node whichever of its names is looked up.
    pub fn lookup_upper(
        &self,
        key: impl FnOnce() -> (u64, Vec<u8>),
        ino: u64,
        fmt: u32,
        state: NodeState,
        fresh: Fresh,
        is_upper: impl Fn(usize) -> bool,
    ) -> Option<Arc<Node>> {
        if self.aliases.load(Ordering::Acquire) > 0 {
            let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&id) = paths.aliases.get(&ino) {
                // Counted under the shard lock, as in `lookup_path`.
                let shard = self.shard(id).write().unwrap_or_else(|e| e.into_inner());
                if let Some(Entry(n)) = shard.get(&id).filter(|e| e.0.fmt == fmt) {
                    if !self.refresh(n, fresh, |s| *s = state) {
                        return None;
                    }
                    n.lookups.fetch_add(1, Ordering::Relaxed);
                    let n = n.clone();
                    drop(shard);
                    if id >= PATH_ID_BASE {
                        // Its name is the one it was last found by.
                        paths.set(id, key());
                    }
                    return Some(n);
                }
            }
        }
        self.lookup(ino, fmt, state, fresh, is_upper)
    }

    /// Records a lookup of a name of a lower hard link: its own node,
    /// reporting `st_ino`. None when `fresh` says the result is stale.
    pub fn lookup_path(
        &self,
        key: (u64, Vec<u8>),
        st_ino: u64,
        fmt: u32,
        state: NodeState,
        fresh: Fresh,
    ) -> Option<Arc<Node>> {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = paths.ids.get(&key) {
            // Counted under the shard lock, so a concurrent `forget` cannot
            // drop the node between finding and counting it.
            let shard = self.shard(id).write().unwrap_or_else(|e| e.into_inner());
            if let Some(Entry(n)) = shard.get(&id) {
                let current = self.refresh(n, fresh, |s| {
                    if s.top_layer() == state.top_layer() {
                        *s = state;
                    }
                });
                if !current {
                    return None;
                }
                n.lookups.fetch_add(1, Ordering::Relaxed);
                return Some(n.clone());
            }
        }
        if matches!(fresh, Fresh::Seen(..)) && !self.fresh(fresh) {
            return None;
        }
        let id = self.next_path_id.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node::new(id, fmt, state));
        node.lookups.store(1, Ordering::Relaxed);
        paths.set(id, key);
        paths.st_inos.insert(id, st_ino);
        self.shard(id)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Entry(node.clone()));
        Some(node)
    }

    /// Moves a per-name node to its new (parent, name) after a rename.
    pub fn rekey(&self, node: &Node, key: (u64, Vec<u8>)) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if paths.keys.contains_key(&node.ino) {
            paths.set(node.ino, key);
        }
    }

    /// A per-name node's name is gone (unlinked, or replaced by a rename):
    /// that name leads to it no more (to what is there next instead); the
    /// node keeps its `st_ino` while the kernel holds it.
    pub fn unkey(&self, node: &Node) {
        if node.ino >= PATH_ID_BASE {
            self.paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unkey(node.ino);
        }
    }

    /// The per-name node at (parent, name), if the kernel holds one.
    pub fn get_path(&self, key: &(u64, Vec<u8>)) -> Option<Arc<Node>> {
        let id = *self
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids
            .get(key)?;
        self.get(id)
    }

    /// Drops `n` kernel lookups; the node leaves the table at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        // The shard lock is released before the paths lock is taken:
        // `lookup_path` takes them in the other order.
        let removed = {
            let mut shard = self.shard(ino).write().unwrap_or_else(|e| e.into_inner());
            match shard.get(&ino) {
                Some(Entry(node)) => {
                    let had = node.lookups.load(Ordering::Relaxed);
                    let prev = node.lookups.fetch_sub(n.min(had), Ordering::Relaxed);
                    prev <= n && shard.remove(&ino)
                }
                None => false,
            }
        };
        if removed && (ino >= PATH_ID_BASE || self.aliases.load(Ordering::Acquire) > 0) {
            let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
            paths.remove(ino);
            self.aliases
                .store(paths.aliases.len() as u64, Ordering::Release);
        }
    }
}
