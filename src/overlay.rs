//! The core: every filesystem operation as a method returning
//! `Result<T, Error>`, with no FUSE types. `fuse.rs` adapts it to `fuser`.
//!
//! Locking: the node table and handle table are sharded; a node's `lock`
//! serialises copy-up and namespace changes of that object; no lock is held
//! across a read or write of file data.

use std::ffi::{CStr, CString};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use crate::config::Options;
use crate::error::{Context, Error, Result};
use crate::handles::{FileHandle, Handle, Handles};
use crate::inode::{
    Fresh, Loc, Node, NodeState, NodeTable, ROOT_INO, XATTRS_NONE, XATTRS_SOME, XATTRS_UNKNOWN,
};
use crate::layer::{self, Stack};
use crate::readdir::{self, DirEntry};
use crate::resolve::{self, Resolved};
use crate::sys::{self, Stat, xattr};

/// Attributes as reported: the underlying `stat` with the overlay's inode
/// number in `st.st_ino` (and `st_nlink` 1 for merged directories, as the
/// kernel reports); `ino` is the FUSE node id, which equals `st.st_ino`
/// except for the per-name nodes of hard-linked lower files.
#[derive(Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub st: Stat,
    /// Whether the kernel may cache these attributes (not for objects
    /// reachable through several nodes).
    pub cache: bool,
}

/// The file an open gives a handle: opened now, or (a lower file opened
/// for reading) at the handle's first use, from where it was.
pub(crate) enum OpenFd {
    Now(OwnedFd),
    Later(Loc),
}

/// The kernel's registration of a passthrough backing file: an opaque
/// token owned by the FUSE adapter (dropping the last one unregisters).
pub type Backing = Arc<dyn std::any::Any + Send + Sync>;

/// Registers a file with the kernel for passthrough (the FUSE adapter's
/// job); `None` when the kernel refuses.
pub type Register<'a> = &'a dyn Fn(std::os::fd::BorrowedFd<'_>) -> Option<Backing>;

/// How the kernel should do the I/O of a new open file.
pub enum OpenIo {
    /// Through layerfs; `keep_cache`: the page cache stays valid across
    /// opens (lower files never change).
    Cached { keep_cache: bool },
    /// Directly on the registered backing file.
    Passthrough(Backing),
}

/// Who asks: the calling process's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The caller's umask, for objects it creates.
    pub umask: u32,
}

/// Invalidations the core asks the kernel for (a copy-up that broke a hard
/// link gives the copied name a new inode).
pub trait Invalidator: Send + Sync {
    /// Drops the kernel's cached attributes of an inode.
    fn inval_attr(&self, ino: u64);
    /// Drops the kernel's cached listing (and attributes) of a directory.
    fn inval_listing(&self, ino: u64);
    /// Puts a file's content (from offset 0) into the kernel's page cache.
    fn store(&self, ino: u64, data: &[u8]);
}

pub struct OverlayFs {
    pub(crate) stack: Stack,
    pub(crate) nodes: NodeTable,
    /// I/O modes of the nodes with open files.
    pub(crate) io: crate::inode::IoTable,
    /// Recent listings: (directory, entry version, sorted entries).
    listings: std::sync::Mutex<std::collections::VecDeque<RecentListing>>,
    /// Prefills running (see `prefill`).
    prefills: std::sync::atomic::AtomicUsize,
    /// The work-directory whiteout new whiteouts are links of (see
    /// `make_whiteout`), and whether the upper can link them at all.
    pub(crate) shared_whiteout: std::sync::Mutex<Option<CString>>,
    pub(crate) no_shared_whiteout: std::sync::atomic::AtomicBool,
    pub(crate) handles: Handles,
    pub(crate) opts: Options,
    pub(crate) invalidator: OnceLock<Box<dyn Invalidator>>,
    tmp_counter: std::sync::atomic::AtomicU64,
    /// Copies of regular files are built unnamed (`O_TMPFILE`) until the
    /// work directory's filesystem refuses it.
    pub(crate) tmpfile_ok: std::sync::atomic::AtomicBool,
    /// Per layer: what a copy-up's data copy from it to the upper found
    /// impossible (bits of `copy_up::copy_data`), not to be tried again.
    pub(crate) copy_caps: Vec<std::sync::atomic::AtomicU8>,
    /// This process's umask (0 in the daemon; a library user's may not be).
    pub(crate) proc_umask: u32,
    /// Mounted `noatime`: reads never update an upper file's atime.
    pub(crate) noatime: bool,
    forgets: std::sync::atomic::AtomicU64,
}

/// Up to `size` bytes of `fd` from `off` (fewer at the end of the file).
fn read_at(fd: &OwnedFd, off: u64, size: u32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let done = read_into(fd, off, &mut buf)?;
    buf.truncate(done);
    Ok(buf)
}

/// I/O of `len` bytes at `off` through an open file with O_DIRECT in
/// `flags`: the offset and length the file's filesystem asks of direct
/// I/O (EINVAL otherwise, as the kernel's overlay answers through it).
/// layerfs's own fd is not O_DIRECT (its buffers are not aligned), so it
/// checks for the caller.
pub(crate) fn check_direct_io(flags: i32, fd: BorrowedFd<'_>, off: u64, len: usize) -> Result<()> {
    if flags & libc::O_DIRECT == 0 {
        return Ok(());
    }
    match sys::dio_offset_align(fd).map(u64::from) {
        Some(a) if !off.is_multiple_of(a) || !(len as u64).is_multiple_of(a) => Err(Error::new(
            libc::EINVAL,
            format!("O_DIRECT I/O of {len} bytes at {off}, not {a}-aligned"),
        )),
        _ => Ok(()),
    }
}

/// Fills `buf` from `off` on, short only at the end of the file.
fn read_into(fd: &OwnedFd, off: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n =
            sys::pread(fd.as_fd(), &mut buf[done..], off + done as u64).ctx(|| "read".into())?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// The largest lower file whose content an open puts in the kernel's
/// page cache (see `OverlayFs::prefill`).
const PREFILL_MAX: u64 = 128 * 1024;

/// How many directory listings are kept for the requests that continue
/// them.
const RECENT_LISTINGS: usize = 32;

/// A computed listing: (directory, its entry version, sorted entries).
type RecentListing = (u64, u64, Arc<Vec<DirEntry>>);

/// A directory listing from some offset on (see `OverlayFs::readdir`).
pub struct Listing {
    dots: [DirEntry; 2],
    named: Arc<Vec<DirEntry>>,
    /// Index of the first entry to give, counting `.` and `..`.
    start: usize,
}

impl Listing {
    pub fn entries(&self) -> impl Iterator<Item = &DirEntry> + Clone {
        self.dots.iter().chain(self.named.iter()).skip(self.start)
    }
}

/// The context of an ENOENT from a lookup that kept racing changes of its
/// directory: not to be cached by the kernel.
pub const RACED_ABSENCE: &str = "no such entry (while the directory changed)";

/// How often a lookup resolves again when namespace changes of its
/// directory keep racing it.
const LOOKUP_TRIES: u32 = 64;

/// Open flags that concern the caller's I/O, not the daemon's: `O_DIRECT`
/// asks the kernel to bypass its caches for the caller (FUSE does so, and
/// a passed-through backing file gets the caller's flags); on layerfs's own
/// fd it would make every read or write into an unaligned request buffer
/// fail with EINVAL.
pub(crate) const DAEMON_IO_ONLY: i32 = libc::O_DIRECT;

/// `O_ACCMODE` and flags that make an open modify the file.
pub(crate) fn opens_for_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl OverlayFs {
    pub fn new(stack: Stack, opts: Options) -> Result<OverlayFs> {
        let noatime = opts.noatime();
        if let Err(e) = mark_new_upper(&stack) {
            log::warn!("{e}");
        }
        let dirs = resolve::root_dirs(&stack)?;
        // The root reports its topmost directory's inode number, as the
        // kernel's overlay root does (its FUSE node id is always 1).
        let top = &dirs[0];
        let root_ino = stack.map_ino(
            top.layer,
            sys::fstat(top.fd.as_fd())
                .ctx(|| "stat root".into())?
                .st_ino,
        );
        let root = Node::new(
            ROOT_INO,
            libc::S_IFDIR,
            NodeState {
                parent: None,
                loc: None,
                dirs: dirs.into(),
                detached: None,
                detached_lower: false,
                unlinked: false,
            },
        );
        let copy_caps = (0..stack.layers.len())
            .map(|_| std::sync::atomic::AtomicU8::new(0))
            .collect();
        Ok(OverlayFs {
            stack,
            nodes: {
                let t = NodeTable::new(root);
                if let Some(r) = t.get(ROOT_INO) {
                    t.set_st_ino(&r, root_ino);
                }
                t
            },
            io: Default::default(),
            listings: Default::default(),
            prefills: Default::default(),
            shared_whiteout: Default::default(),
            no_shared_whiteout: Default::default(),
            handles: Handles::default(),
            opts,
            invalidator: OnceLock::new(),
            tmp_counter: std::sync::atomic::AtomicU64::new(0),
            tmpfile_ok: std::sync::atomic::AtomicBool::new(true),
            copy_caps,
            proc_umask: process_umask(),
            noatime,
            forgets: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn set_invalidator(&self, inv: Box<dyn Invalidator>) {
        let _ = self.invalidator.set(inv);
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    pub(crate) fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.nodes
            .get(ino)
            .ok_or_else(|| Error::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    pub(crate) fn writable(&self) -> Result<()> {
        match self.stack.upper() {
            Some(_) => Ok(()),
            None => Err(Error::new(libc::EROFS, "read-only overlay")),
        }
    }

    /// A fresh name for an object being built in the work directory.
    pub(crate) fn tmp_name(&self) -> CString {
        // The daemon's pid, read once (it is read after any daemonizing
        // fork: at the first copy-up or whiteout).
        static PID: OnceLock<u32> = OnceLock::new();
        let pid = *PID.get_or_init(std::process::id);
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#{pid:x}.{n:x}")).expect("no NUL")
    }

    // ---- attributes -------------------------------------------------------

    /// `stat` of a node's topmost entry.
    pub(crate) fn stat_state(&self, s: &NodeState) -> Result<Stat> {
        if let Some(d) = s.dirs.first() {
            return sys::fstat(d.fd.as_fd()).ctx(|| "stat dir".into());
        }
        if let Some(fd) = &s.detached {
            return sys::fstat(fd.as_fd()).ctx(|| "stat detached".into());
        }
        match &s.loc {
            Some(loc) => {
                let st = sys::fstatat(loc.dir.as_fd(), &loc.name)
                    .ctx(|| format!("stat {:?}", loc.name))?;
                // A location overtaken by a concurrent delete or rename now
                // holds a whiteout: the object is gone from here.
                if crate::whiteout::is_whiteout_stat(&st) {
                    return Err(Error::new(
                        libc::ENOENT,
                        format!("{:?} was removed", loc.name),
                    ));
                }
                Ok(st)
            }
            None => Err(Error::new(libc::ENOENT, "deleted object")),
        }
    }

    pub(crate) fn attr_of(&self, node: &Node, s: &NodeState) -> Result<Attr> {
        let mut st = self.stat_state(s)?;
        if s.dirs.len() > 1 {
            st.st_nlink = 1;
        }
        st.st_ino = self.nodes.st_ino(node);
        Ok(Attr {
            ino: node.ino,
            st,
            cache: node.cacheable(),
        })
    }

    /// Whether `node`'s topmost entry is in the upper layer (read in place:
    /// the open path asks at every OPEN); also an upper object kept after
    /// its name went, or an `O_TMPFILE` file.
    pub(crate) fn top_is_upper(&self, node: &Node) -> bool {
        node.read_state(|s| {
            s.top_layer().is_some_and(|l| self.stack.is_upper(l))
                || (s.detached.is_some() && !s.detached_lower)
        })
    }

    /// The birth time of `ino`'s topmost real file (through the open file
    /// `fh` first, as `getattr`), as the kernel's overlayfs reports it;
    /// `None` where its filesystem keeps none.
    pub fn btime(&self, ino: u64, fh: Option<u64>) -> Option<std::time::SystemTime> {
        if let Some(fh) = fh
            && let Ok((_h, fd)) = self.file_fd(fh)
        {
            return sys::birth_time(fd.as_fd(), c"");
        }
        let node = self.node(ino).ok()?;
        node.read_state(|s| {
            let (dir, name, _) = self.top_object(s)?;
            sys::birth_time(dir, name)
        })
    }

    /// Where `s`'s topmost real object is, for `*at` calls: a directory's
    /// or a kept object's fd with an empty name, else its name in its
    /// layer's directory; and whether it is in the upper layer. `None` for
    /// a deleted object.
    pub(crate) fn top_object<'a>(
        &self,
        s: &'a NodeState,
    ) -> Option<(BorrowedFd<'a>, &'a CStr, bool)> {
        if let Some(d) = s.dirs.first() {
            return Some((d.fd.as_fd(), c"", self.stack.is_upper(d.layer)));
        }
        if let Some(fd) = &s.detached {
            return Some((fd.as_fd(), c"", !s.detached_lower));
        }
        let loc = s.loc.as_ref()?;
        Some((loc.dir.as_fd(), &loc.name, self.stack.is_upper(loc.layer)))
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        let node = self.node(ino)?;
        // Through the open file (reopened on the upper copy if the object
        // was copied up since it was opened: the lower file's size and link
        // count are stale then).
        if let Some(fh) = fh
            && let Ok((_h, fd)) = self.file_fd(fh)
            && let Ok(mut st) = sys::fstat(fd.as_fd())
        {
            st.st_ino = self.nodes.st_ino(&node);
            if node.is_dir() && node.read_state(|s| s.dirs.len() > 1) {
                st.st_nlink = 1;
            }
            return Ok(Attr {
                ino,
                st,
                cache: node.cacheable(),
            });
        }
        self.attr_of(&node, &node.snapshot())
    }

    // ---- lookup -----------------------------------------------------------

    /// Resolves `name` in directory `parent` and records a kernel lookup.
    pub fn lookup(&self, parent: u64, name: &CStr) -> Result<Attr> {
        if !layer::valid_name(name) {
            return Err(Error::new(libc::ENOENT, format!("invalid name {name:?}")));
        }
        let pnode = self.node(parent)?;
        // A change of the directory's entries racing this lookup makes its
        // result stale: resolve again (see `EntryVersions`). Changes are
        // short; after many retries the result is recorded without
        // overriding what an existing node knows.
        let mut tries = 0;
        loop {
            tries += 1;
            let last = tries >= LOOKUP_TRIES;
            let seen = self.nodes.versions.begin(parent);
            if seen.is_none() && !last {
                std::thread::yield_now();
                continue;
            }
            let ps = pnode.snapshot();
            if ps.dirs.is_empty() {
                return Err(Error::new(libc::ENOTDIR, "lookup in a non-directory"));
            }
            if ps.unlinked {
                return Err(Error::new(libc::ENOENT, "lookup in a deleted directory"));
            }
            let r = resolve::lookup(&self.stack, &ps.dirs, name)?;
            #[cfg(test)]
            tests::after_resolve(name);
            let fresh = match seen {
                Some(v) if !last => Fresh::Seen(parent, v),
                _ => Fresh::Unknown,
            };
            // An absence is cached by the kernel (a negative entry): only
            // one that no change of the directory raced.
            if !r.exists() {
                if self.nodes.fresh(fresh) {
                    return Err(Error::new(libc::ENOENT, "no such entry"));
                }
                if last {
                    return Err(Error::new(libc::ENOENT, RACED_ABSENCE));
                }
            } else {
                match self.record_as(&pnode, r, fresh) {
                    Ok(Some((_, a))) => return Ok(a),
                    // Stale (only a `Seen` result can be, never the last).
                    Ok(None) => {}
                    // The entry went away between resolving and recording it.
                    Err(e) if e.is(libc::ENOENT) && !last && !self.nodes.fresh(fresh) => {}
                    Err(e) => return Err(e),
                }
            }
            std::thread::yield_now();
        }
    }

    /// Enters an object resolved by a namespace change (which holds its
    /// directory) in the node table (one kernel lookup).
    pub(crate) fn record(&self, parent: &Arc<Node>, r: Resolved) -> Result<(Arc<Node>, Attr)> {
        self.record_as(parent, r, Fresh::Current)?
            .ok_or_else(|| Error::new(libc::EIO, "lookup not recorded"))
    }

    /// An upper object can take the inode number of another (a copied-up
    /// file or directory its origin's, a merged directory the one below
    /// it). A second upper object borrowing the same number (one duplicated
    /// outside the overlay, xattrs and all, e.g. with `cp -a`) would share
    /// the first one's node and show its data: `ESTALE` for it, as the
    /// kernel answers.
    fn check_borrowed_ino(&self, ino: u64, state: &NodeState, st: &Stat) -> Result<()> {
        let Some(top) = state.top_layer().filter(|&l| self.stack.is_upper(l)) else {
            return Ok(());
        };
        if self.stack.map_ino(top, st.st_ino) == ino {
            return Ok(());
        }
        let Some(old) = self.nodes.get(ino) else {
            return Ok(());
        };
        let s = old.snapshot();
        if s.unlinked || !s.top_layer().is_some_and(|l| self.stack.is_upper(l)) {
            return Ok(());
        }
        match self.stat_state(&s) {
            Ok(o) if (o.st_dev, o.st_ino) != (st.st_dev, st.st_ino) => Err(Error::new(
                libc::ESTALE,
                "two upper objects with one origin (duplicated outside the overlay)",
            )),
            _ => Ok(()),
        }
    }

    /// Enters a resolved object in the node table (one kernel lookup);
    /// None when `fresh` shows the result went stale.
    fn record_as(
        &self,
        parent: &Arc<Node>,
        r: Resolved,
        fresh: Fresh,
    ) -> Result<Option<(Arc<Node>, Attr)>> {
        let ino = resolve::ino_of(&self.stack, &r)?;
        let (st, state) = match r {
            Resolved::Absent => return Err(Error::new(libc::ENOENT, "no such entry")),
            Resolved::Dir { loc, dirs, st } => (
                st,
                NodeState {
                    parent: Some(parent.clone()),
                    loc: Some(loc),
                    dirs: dirs.into(),
                    detached: None,
                    detached_lower: false,
                    unlinked: false,
                },
            ),
            Resolved::NonDir { loc, st } => (
                st,
                NodeState {
                    parent: Some(parent.clone()),
                    loc: Some(loc),
                    dirs: Box::default(),
                    detached: None,
                    detached_lower: false,
                    unlinked: false,
                },
            ),
        };
        let merged = state.dirs.len() > 1;
        let fmt = st.st_mode & libc::S_IFMT;
        let upper = state.top_layer().is_some_and(|l| self.stack.is_upper(l));
        // Each name of a lower hard link is a node of its own (the kernel's
        // `index=off`: a copy-up through one name leaves the others); every
        // name of any other file leads to the file's one node.
        let per_name = fmt != libc::S_IFDIR && st.st_nlink > 1 && !upper;
        if !per_name {
            self.check_borrowed_ino(ino, &state, &st)?;
        }
        let name = state
            .loc
            .as_ref()
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let key = || (parent.ino, name.to_bytes().to_vec());
        let node = if per_name {
            self.nodes.lookup_path(key(), ino, fmt, state, fresh)
        } else if fmt != libc::S_IFDIR && upper {
            self.nodes
                .lookup_upper(key, ino, fmt, state, fresh, |l| self.stack.is_upper(l))
        } else {
            self.nodes
                .lookup(ino, fmt, state, fresh, |l| self.stack.is_upper(l))
        };
        let Some(node) = node else { return Ok(None) };
        let mut st = st;
        if merged {
            st.st_nlink = 1;
        }
        st.st_ino = self.nodes.st_ino(&node);
        let cache = node.cacheable();
        Ok(Some((
            node.clone(),
            Attr {
                ino: node.ino,
                st,
                cache,
            },
        )))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.nodes.forget(ino, n);
        // When the kernel drops inodes in bulk (memory pressure,
        // drop_caches), give the freed node memory back to the system.
        if self.forgets.fetch_add(1, Ordering::Relaxed) % 65536 == 65535 {
            sys::trim_heap();
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let s = self.node(ino)?.snapshot();
        if let Some(fd) = &s.detached {
            return sys::readlinkat(fd.as_fd(), c"").ctx(|| "readlink".into());
        }
        let loc = s.loc.ok_or_else(|| Error::new(libc::ENOENT, "deleted"))?;
        sys::readlinkat(loc.dir.as_fd(), &loc.name).ctx(|| format!("readlink {:?}", loc.name))
    }

    // ---- files ------------------------------------------------------------

    /// Opens the topmost entry of a non-directory (`O_PATH`-free, real open).
    pub(crate) fn open_loc(&self, s: &NodeState, flags: i32) -> Result<OwnedFd> {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | DAEMON_IO_ONLY);
        if opens_for_write(flags)
            && !s.top_layer().is_some_and(|l| self.stack.is_upper(l))
            && s.detached.is_none()
        {
            // Never reached by a correct caller: lower layers are read-only.
            return Err(Error::new(
                libc::EIO,
                "refusing to open a lower file for writing",
            ));
        }
        if let Some(fd) = &s.detached {
            return sys::reopen(fd.as_fd(), flags).ctx(|| "reopen detached".into());
        }
        let loc = s
            .loc
            .as_ref()
            .ok_or_else(|| Error::new(libc::ENOENT, "deleted"))?;
        self.open_at(loc, flags)
    }

    /// Opens the entry at `loc` (no checks: see `open_loc`).
    fn open_at(&self, loc: &Loc, flags: i32) -> Result<OwnedFd> {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | DAEMON_IO_ONLY);
        let opened = if self.stack.is_lower(loc.layer) || self.noatime {
            sys::openat_noatime(loc.dir.as_fd(), &loc.name, flags)
        } else {
            sys::openat(loc.dir.as_fd(), &loc.name, flags, 0)
        };
        match opened {
            // A whiteout took the name meanwhile (concurrent delete/rename).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Err(Error::new(
                libc::ENOENT,
                format!("{:?} was removed", loc.name),
            )),
            r => r.ctx(|| format!("open {:?}", loc.name)),
        }
    }

    /// Opens a file; `passthrough` says whether the kernel may do its I/O
    /// directly on the backing file.
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> Result<(u64, OpenIo)> {
        let node = self.node(ino)?;
        // Loaded before the node's location is read: a copy-up moves the
        // location first and then counts, so a handle opened on the lower
        // file while a copy-up runs is reopened on the copy at its first use.
        let before = node.generation.load(Ordering::Acquire);
        let (fd, generation) = if opens_for_write(flags) {
            self.writable()?;
            // The kernel's `may_open` for immutable and append-only files.
            let appending = flags & libc::O_APPEND != 0 && flags & libc::O_TRUNC == 0;
            let refused = match appending {
                true => crate::protect::IMMUTABLE,
                false => crate::protect::ANY,
            };
            self.refuse_if(&node, refused, "open for writing")?;
            // An upper file whose name the node had is gone (it may have
            // other names the kernel opens it by, or be reopened through
            // `/proc/self/fd`) is opened through the object kept for it.
            let loc = self.change_loc(&node, None, flags & libc::O_TRUNC != 0)?;
            // Without O_APPEND: writes come with their offsets (the kernel
            // keeps the position), which pwrite on an O_APPEND fd ignores;
            // but an append-only (chattr +a) file opens only with it.
            let f = flags
                & !(libc::O_APPEND
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOCTTY
                    | DAEMON_IO_ONLY);
            let (dir, name) = (loc.dir.as_fd(), loc.name.as_c_str());
            let open = |f| match self.noatime {
                _ if name.is_empty() => {
                    sys::reopen(dir, f | (libc::O_NOATIME * self.noatime as i32))
                }
                true => sys::openat_noatime(dir, name, f),
                false => sys::openat(dir, name, f, 0),
            };
            let fd = match open(f) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && flags & libc::O_APPEND != 0 => {
                    open(f | libc::O_APPEND)
                }
                r => r,
            }
            .ctx(|| format!("open {name:?}"))?;
            // The upper file's generation: this copy-up's count included.
            (OpenFd::Now(fd), node.generation.load(Ordering::Acquire))
        } else {
            // A lower file opened for reading on a writable overlay is
            // opened by layerfs at its first READ (or other use of the
            // handle), not now: its pages stay in the kernel's cache across
            // opens, so most such opens (`tar`, `grep -r`, a build reading
            // its headers again) never read through layerfs, and their
            // round trips are spared the daemon's open and close of the
            // lower file. Lower layers never change: the file found at this
            // location later is the one found now, and opens as it did —
            // the node's first open is done now, so that a file the daemon
            // cannot open (a rootless daemon, a file it may not read)
            // fails at the open, as on the kernel, not at a read.
            let lazy = match self.stack.upper() {
                Some(_) if node.fmt == libc::S_IFREG && node.opened.load(Ordering::Relaxed) => node
                    .read_state(|s| match &s.loc {
                        Some(loc) if !s.unlinked && s.detached.is_none() => {
                            self.stack.is_lower(loc.layer).then(|| loc.clone())
                        }
                        _ => None,
                    }),
                _ => None,
            };
            let fd = match lazy {
                Some(loc) => OpenFd::Later(loc),
                None => {
                    let fd = self.open_loc(&node.snapshot(), flags & !libc::O_APPEND)?;
                    node.opened.store(true, Ordering::Relaxed);
                    OpenFd::Now(fd)
                }
            };
            (fd, before)
        };
        let (fh, io) = self.insert_file(node.clone(), fd, generation, flags, register);
        match io {
            OpenIo::Cached { keep_cache: true } => self.prefill(&node, fh),
            // The first open passed through for writing: the attributes
            // the kernel cached before are dropped too (see
            // `Node::passthrough_writers`).
            OpenIo::Passthrough(_)
                if opens_for_write(flags)
                    && node.passthrough_writers.load(Ordering::Acquire) == 1 =>
            {
                if let Some(inv) = self.invalidator.get() {
                    inv.inval_attr(node.ino);
                }
            }
            _ => {}
        }
        Ok((fh, io))
    }

    /// Puts the whole content of a small lower file into the kernel's page
    /// cache of its inode (FUSE_NOTIFY_STORE) before the first open is
    /// answered, which spares a READ round trip per small file read (`tar`,
    /// `grep -r`, interpreters loading modules). Done once per node (lower
    /// files never change; pages the kernel evicts later are read as
    /// usual), only for the node's single open (no READ of it can be in
    /// flight), under the node's lock (a copy-up, and writes after it,
    /// wait for the store), and by at most all but one request thread.
    fn prefill(&self, node: &Arc<Node>, fh: u64) {
        if node.fmt != libc::S_IFREG || node.prefilled.load(Ordering::Relaxed) {
            return;
        }
        let Some(inv) = self.invalidator.get() else {
            return;
        };
        if !self
            .io
            .with(node.ino, |io| io.cached == 1 && io.passthrough == 0)
        {
            return;
        }
        let limit = self.opts.threads.saturating_sub(1);
        if self.prefills.fetch_add(1, Ordering::AcqRel) >= limit {
            self.prefills.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let _g = node.lock.lock().unwrap_or_else(|e| e.into_inner());
        let lower = !self.top_is_upper(node);
        if lower
            && !node.prefilled.swap(true, Ordering::AcqRel)
            && let Ok((_h, fd)) = self.file_fd(fh)
            && let Ok(st) = sys::fstat(fd.as_fd())
            && st.st_size > 0
            && st.st_size as u64 <= PREFILL_MAX
            && let Ok(data) = read_at(&fd, 0, st.st_size as u32)
            && data.len() as i64 == st.st_size
        {
            inv.store(node.ino, &data);
        }
        self.prefills.fetch_sub(1, Ordering::AcqRel);
    }

    /// Registers an open file and chooses its I/O mode: passthrough for a
    /// file in the upper layer when no cached open of the node exists;
    /// cached otherwise — lower files in particular, so that a reader opened
    /// before a copy-up sees the data written after it (the kernel's rule),
    /// with the page cache kept across opens since lower files never change.
    /// On a read-only overlay nothing is ever copied up: lower files are
    /// passed through too.
    pub(crate) fn insert_file(
        &self,
        node: Arc<Node>,
        fd: OpenFd,
        generation: u32,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> (u64, OpenIo) {
        let upper = self.top_is_upper(&node);
        let frozen = self.stack.upper().is_none();
        let (fd, lower) = match fd {
            OpenFd::Now(fd) => (Some(Arc::new(fd)), None),
            OpenFd::Later(loc) => (None, Some(loc)),
        };
        // A write to a setuid/setgid file must be seen by layerfs, which
        // clears those bits when the writer may not keep them (the kernel
        // leaves that to the filesystem: FUSE_HANDLE_KILLPRIV_V2); a
        // passthrough write would never reach it, and its backing file,
        // registered without CAP_FSETID, would clear them even for root.
        // Since a later open must follow the I/O mode of those already
        // open, no open of such a file is passed through (asked only when
        // a backing file would be registered).
        let setid = || {
            !frozen
                && fd.as_ref().is_some_and(|fd| {
                    sys::fstat(fd.as_fd())
                        .is_ok_and(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0)
                })
        };
        // On a `noatime` mount reads must not update the upper file's atime:
        // layerfs reads it with O_NOATIME, which a backing file (opened by
        // the kernel with the caller's flags) would not have.
        let reads = flags & libc::O_ACCMODE != libc::O_WRONLY;
        let register = register.filter(|_| !(reads && self.noatime));
        // Decided and registered under the node's lock: two opens racing
        // must never hand the kernel two backing files, or a cached open
        // while passthrough ones are open (the kernel fails those with EIO).
        let mode = self.io.with(node.ino, |io| {
            let existing = io.backing.as_ref().and_then(std::sync::Weak::upgrade);
            let mode = match (existing, register) {
                (Some(b), _) if io.passthrough > 0 => OpenIo::Passthrough(b),
                (_, Some(register))
                    if (upper || frozen) && io.cached == 0 && io.passthrough == 0 && !setid() =>
                {
                    match fd.as_ref().and_then(|fd| register(fd.as_fd())) {
                        Some(b) => {
                            io.backing = Some(Arc::downgrade(&b));
                            OpenIo::Passthrough(b)
                        }
                        None => OpenIo::Cached { keep_cache: false },
                    }
                }
                _ => OpenIo::Cached { keep_cache: !upper },
            };
            match &mode {
                OpenIo::Passthrough(_) => io.passthrough += 1,
                OpenIo::Cached { .. } => io.cached += 1,
            }
            mode
        });
        let backing = match &mode {
            OpenIo::Passthrough(b) => Some(b.clone()),
            OpenIo::Cached { .. } => None,
        };
        if backing.is_some() && opens_for_write(flags) {
            node.passthrough_writers.fetch_add(1, Ordering::AcqRel);
        }
        let fh = self.handles.insert(FileHandle {
            node,
            fd: std::sync::RwLock::new((fd, generation)),
            lower,
            flags,
            passthrough: std::sync::atomic::AtomicBool::new(backing.is_some()),
            backing: std::sync::Mutex::new(backing),
        });
        (fh, mode)
    }

    /// The fd of an open file, reopened on the upper copy if the object was
    /// copied up since the handle was opened.
    pub(crate) fn file_fd(&self, fh: u64) -> Result<(Arc<Handle>, Arc<OwnedFd>)> {
        let h = self
            .handles
            .get(fh)
            .ok_or_else(|| Error::new(libc::EBADF, format!("unknown file handle {fh}")))?;
        let f = &*h;
        let generation = f.node.generation.load(Ordering::Acquire);
        let (fd, g) = f.fd.read().unwrap_or_else(|e| e.into_inner()).clone();
        let flags = f.flags & !(libc::O_TRUNC | libc::O_APPEND);
        // The handle's own fd, opening the lower file it was opened on if
        // that was left for now (see `open`); its generation is left alone.
        let own = || -> Result<Arc<OwnedFd>> {
            let mut slot = f.fd.write().unwrap_or_else(|e| e.into_inner());
            let fd = match (&slot.0, &f.lower) {
                (Some(fd), _) => return Ok(fd.clone()),
                (None, Some(loc)) => Arc::new(self.open_at(loc, flags)?),
                (None, None) => return Err(Error::new(libc::EIO, "an open file without an fd")),
            };
            slot.0 = Some(fd.clone());
            Ok(fd)
        };
        if g == generation {
            return Ok((h.clone(), fd.map_or_else(own, Ok)?));
        }
        let newfd = match self.open_loc(&f.node.snapshot(), flags) {
            Ok(fd) => Arc::new(fd),
            // The object was removed (or renamed away) since: an open file
            // stays readable, so the handle keeps the file it has (found
            // by the load test: a read on an open fd answered ENOENT).
            Err(e) if e.is(libc::ENOENT) => return Ok((h.clone(), own()?)),
            Err(e) => return Err(e),
        };
        *f.fd.write().unwrap_or_else(|e| e.into_inner()) = (Some(newfd.clone()), generation);
        Ok((h.clone(), newfd))
    }

    /// Reads into `buf` (the reply's own buffer); the byte count.
    /// `flags`: the open file's flags now (the kernel's, which `fcntl`
    /// may have changed since the open).
    pub fn read_into(&self, fh: u64, off: u64, buf: &mut [u8], flags: i32) -> Result<usize> {
        let (_h, fd) = self.file_fd(fh)?;
        check_direct_io(flags, fd.as_fd(), off, buf.len())?;
        read_into(&fd, off, buf)
    }

    pub fn release(&self, fh: u64) {
        if let Some(f) = self.handles.remove(fh) {
            if f.passthrough.load(Ordering::Acquire) && opens_for_write(f.flags) {
                f.node.passthrough_writers.fetch_sub(1, Ordering::AcqRel);
            }
            self.io.with(f.node.ino, |io| {
                if f.passthrough.load(Ordering::Acquire) {
                    io.passthrough = io.passthrough.saturating_sub(1);
                    if io.passthrough == 0 {
                        io.backing = None;
                    }
                } else {
                    io.cached = io.cached.saturating_sub(1);
                }
            });
        }
    }

    // ---- directories ------------------------------------------------------

    /// The listing of directory `ino` and the index of its first entry
    /// after `offset` (1 is `.`, 2 is `..`, then the merged entries in
    /// `readdir::cookie` order, each entry's offset being its cookie).
    /// Directories have no handles: the kernel caches their listings itself
    /// (the default when it has no `opendir`), and asks by inode for the
    /// parts it lacks. A listing stays valid until an entry of the directory
    /// changes (`EntryVersions`), so one read in many requests is computed
    /// once; offsets that name entries keep a listing read while the
    /// directory changes exact (`rm -rf` of a large directory).
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Listing> {
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Error::new(libc::ENOTDIR, "readdir of a non-directory"));
        }
        // Before the layers are read: a change that ends after this reads
        // the mark and drops the kernel's copy (`listings_changed`).
        node.listed.store(true, std::sync::atomic::Ordering::SeqCst);
        // The version first: a listing made from layers seen after it is
        // never kept under a later version.
        let version = self.nodes.versions.begin(ino);
        let s = node.snapshot();
        let dots = [
            DirEntry {
                name: b".".to_vec(),
                ino: self.nodes.st_ino(&node),
                fmt: libc::S_IFDIR,
                off: 1,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: s
                    .parent
                    .as_ref()
                    .map_or(self.nodes.st_ino(&node), |p| self.nodes.st_ino(p)),
                fmt: libc::S_IFDIR,
                off: 2,
            },
        ];
        // With `timeout=0` no listing is reused either.
        let version = version.filter(|_| !self.opts.timeout.is_zero());
        let named = if s.unlinked {
            Arc::default()
        } else {
            self.named_entries(&node, version, &s.dirs)?
        };
        let start = match offset {
            0..=2 => offset as usize,
            _ => 2 + named.partition_point(|e| e.off <= offset),
        };
        Ok(Listing { dots, named, start })
    }

    /// The merged entries of a directory, sorted: a recent listing when no
    /// entry changed since, else a new one.
    fn named_entries(
        &self,
        node: &Node,
        version: Option<u64>,
        dirs: &[crate::inode::DirLayer],
    ) -> Result<Arc<Vec<DirEntry>>> {
        let ino = node.ino;
        let mut recent = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = version
            && let Some(l) = recent.iter().find(|l| l.0 == ino && l.1 == v)
        {
            return Ok(l.2.clone());
        }
        drop(recent);
        let (mut named, unneeded_impure) = readdir::list_noting_impure(&self.stack, dirs)?;
        if unneeded_impure
            && self.writable().is_ok()
            && let Some(v) = version
        {
            // As the kernel: a listing that finds no entry needing the mark
            // drops it (best effort) — unless an entry changed meanwhile
            // (a rename into the directory marks it first, under the
            // directory's lock, which this takes).
            let _g = node.lock.lock().unwrap_or_else(|e| e.into_inner());
            if self.nodes.versions.unchanged(ino, v) {
                let _ = xattr::remove(
                    xattr::Target::Fd(dirs[0].fd.as_fd()),
                    &self.stack.xname("impure"),
                );
            }
        }
        readdir::sort(&mut named);
        let named = Arc::new(named);
        if let Some(v) = version
            && self.nodes.versions.unchanged(ino, v)
        {
            recent = self.listings.lock().unwrap_or_else(|e| e.into_inner());
            recent.retain(|l| l.0 != ino);
            if recent.len() >= RECENT_LISTINGS {
                recent.pop_front();
            }
            recent.push_back((ino, v, named.clone()));
        }
        Ok(named)
    }

    /// Whether the kernel already holds the listed entry `name` (with
    /// inode number `st_ino`) of directory `parent` as a node: readdirplus
    /// then sends the name alone. Looking it up again would cost a
    /// resolution and make the kernel drop the inode's cached ACLs.
    pub fn holds_entry(&self, parent: u64, name: &[u8], st_ino: u64) -> bool {
        if let Some(n) = self.nodes.get(st_ino) {
            let s = n.state.read().unwrap_or_else(|e| e.into_inner());
            return !s.unlinked
                && s.parent.as_ref().is_some_and(|p| p.ino == parent)
                && s.loc.as_ref().is_some_and(|l| l.name.to_bytes() == name);
        }
        false
    }

    /// Looks up one listed entry for readdirplus (a counted lookup).
    pub fn lookup_entry(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let c = layer::cname(name)?;
        self.lookup(parent, &c)
    }

    // ---- misc -------------------------------------------------------------

    pub fn statfs(&self) -> Result<libc::statvfs> {
        let l = self.stack.upper().unwrap_or(&self.stack.layers[0]);
        sys::fstatvfs(l.root.as_fd()).ctx(|| "statfs".into())
    }

    pub fn access(&self, ino: u64, mask: i32) -> Result<()> {
        self.node(ino)?;
        if mask & libc::W_OK != 0 {
            self.writable()?;
        }
        Ok(())
    }

    // ---- xattrs -----------------------------------------------------------

    fn xattr_target<'a>(s: &'a NodeState) -> Result<xattr::Target<'a>> {
        if let Some(d) = s.dirs.first() {
            return Ok(xattr::Target::Fd(d.fd.as_fd()));
        }
        if let Some(fd) = &s.detached {
            return Ok(xattr::Target::Fd(fd.as_fd()));
        }
        let loc = s
            .loc
            .as_ref()
            .ok_or_else(|| Error::new(libc::ENOENT, "deleted"))?;
        Ok(xattr::Target::At(loc.dir.as_fd(), &loc.name))
    }

    /// Runs an xattr read on `node`, or, for a file whose name is gone,
    /// on an upper file open for it (see `change_loc`).
    fn read_xattrs<T>(
        &self,
        node: &Arc<Node>,
        s: &NodeState,
        what: impl Fn() -> String,
        f: impl Fn(xattr::Target<'_>) -> std::io::Result<T>,
    ) -> Result<T> {
        match Self::xattr_target(s) {
            Ok(t) => f(t).ctx(what),
            Err(e) if e.is(libc::ENOENT) => match self.open_upper_file(node, None) {
                Some(fd) => f(xattr::Target::Fd(fd.as_fd())).ctx(what),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let stored = self.stack.private.escape(name);
        if self.stack.private.unescape(&stored).is_none() {
            return Err(Error::new(libc::ENODATA, "private xattr"));
        }
        let node = self.node(ino)?;
        let none = || Error::new(libc::ENODATA, "no such xattr");
        // A file in a lower layer (unless layers may change behind the
        // mount, `timeout=0`) keeps the xattrs it has. Decided before the
        // state is copied: the answer from memory (every `ls -l` entry)
        // needs no copy.
        let lower = !self.opts.timeout.is_zero()
            && node.read_state(|s| s.top_layer().is_some_and(|l| self.stack.is_lower(l)));
        if lower && node.lower_xattrs.load(Ordering::Relaxed) == XATTRS_NONE {
            return Err(none());
        }
        let s = node.snapshot();
        let c = xattr::name(&stored)?;
        let v = self.read_xattrs(
            &node,
            &s,
            || format!("getxattr {c:?}"),
            |t| xattr::get(t, &c),
        )?;
        // (A listing that fails leaves it unknown: this answer stands.)
        if lower
            && v.is_none()
            && node.lower_xattrs.load(Ordering::Relaxed) == XATTRS_UNKNOWN
            && let Ok(names) = self.read_xattrs(&node, &s, || "listxattr".into(), xattr::list)
        {
            let known = if names.is_empty() {
                XATTRS_NONE
            } else {
                XATTRS_SOME
            };
            node.lower_xattrs.store(known, Ordering::Relaxed);
        }
        v.ok_or_else(none)
    }

    /// Names as the caller sees them: private ones hidden, escaped ones
    /// unescaped, `trusted.*` ones only if `sees_trusted` says the caller
    /// may see them (asked only if there are any; the kernel lists them to
    /// callers with CAP_SYS_ADMIN, though the daemon's own list has them).
    /// For a `probe` (a call with no buffer, asking for the size): all the
    /// stored names, as the kernel's overlay answers it — the size of the
    /// real list, the overlay's private xattrs and `trusted.*` included
    /// (what a caller then reads is never longer).
    pub fn listxattr(
        &self,
        ino: u64,
        probe: bool,
        sees_trusted: impl FnOnce() -> bool,
    ) -> Result<Vec<u8>> {
        let node = self.node(ino)?;
        let names =
            self.read_xattrs(&node, &node.snapshot(), || "listxattr".into(), xattr::list)?;
        if probe {
            return Ok(names
                .iter()
                .flat_map(|n| n.iter().copied().chain([0]))
                .collect());
        }
        let mut sees_trusted = Some(sees_trusted);
        let mut trusted = None;
        let mut out = Vec::new();
        for n in names {
            let Some(u) = self.stack.private.unescape(&n) else {
                continue;
            };
            if u.starts_with(b"trusted.")
                && !*trusted.get_or_insert_with(|| sees_trusted.take().is_some_and(|f| f()))
            {
                continue;
            }
            out.extend_from_slice(&u);
            out.push(0);
        }
        Ok(out)
    }
}

/// Gives a new upper the random `overlay.uuid` the kernel writes on the
/// first mount of an upper, so both leave the same format behind. New, by
/// the kernel's rule: no uuid yet and the root not marked impure (an upper
/// used before uuids existed, which the kernel leaves without one), whatever
/// the root holds.
fn mark_new_upper(stack: &Stack) -> Result<()> {
    let Some(upper) = stack.upper() else {
        return Ok(());
    };
    let root = xattr::Target::Fd(upper.root.as_fd());
    let name = stack.xname("uuid");
    if xattr::get(root, &name)
        .ctx(|| "read upper uuid".into())?
        .is_some()
        || xattr::get(root, &stack.xname("impure"))
            .ctx(|| "read upper impure".into())?
            .is_some()
    {
        return Ok(());
    }
    let mut uuid = [0u8; 16];
    sys::getrandom(&mut uuid);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    xattr::set(root, &name, &uuid, 0).ctx(|| "write upper uuid".into())
}

/// The process umask, read without changing it (from /proc/self/status).
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

impl Drop for OverlayFs {
    /// The shared whiteout leaves the work directory with the mount (a
    /// later mount would remove it as a leftover anyway).
    fn drop(&mut self) {
        let shared = self
            .shared_whiteout
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(s), Ok(work)) = (shared, self.stack.work_fd()) {
            let _ = sys::unlinkat(work, &s, false);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Races between a lookup and a namespace change, made deterministic:
    //! the lookup is held between resolving the name and recording the
    //! result while the change runs.
    use super::*;
    use crate::config::MountConfig;
    use std::sync::mpsc;
    use std::sync::{Mutex, MutexGuard};

    type Pause = (CString, mpsc::Sender<()>, mpsc::Receiver<()>);

    /// At most one armed pause: the name whose lookup stops, a channel to
    /// say it stopped and one to let it go on.
    static PAUSE: Mutex<Option<Pause>> = Mutex::new(None);
    static SERIAL: Mutex<()> = Mutex::new(());

    pub(super) fn after_resolve(name: &CStr) {
        let armed = {
            let mut g = PAUSE.lock().unwrap();
            match g.as_ref() {
                Some((n, _, _)) if n.as_c_str() == name => g.take(),
                _ => None,
            }
        };
        if let Some((_, stopped, go)) = armed {
            stopped.send(()).unwrap();
            go.recv().unwrap();
        }
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        ov: Arc<OverlayFs>,
        _serial: MutexGuard<'static, ()>,
    }

    fn fixture() -> Fixture {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let (lower, upper, work) = (
            tmp.path().join("lower"),
            tmp.path().join("upper"),
            tmp.path().join("work"),
        );
        for d in [&lower, &upper, &work] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(upper.join("a"), b"upper file a").unwrap();
        std::fs::write(lower.join("c"), b"lower file c").unwrap();
        let mut cfg = MountConfig::new(vec![lower]);
        cfg.upper = Some(upper);
        cfg.work = Some(work);
        let cfg = cfg.validate().unwrap();
        let ov = OverlayFs::new(Stack::open(&cfg).unwrap(), cfg.options.clone()).unwrap();
        Fixture {
            _tmp: tmp,
            ov: Arc::new(ov),
            _serial: serial,
        }
    }

    /// Looks `name` up in the root on another thread, stops it after the
    /// name is resolved, runs `change`, and returns the lookup's result.
    fn lookup_racing(ov: &Arc<OverlayFs>, name: &CStr, change: impl FnOnce()) -> Result<Attr> {
        let (stopped_tx, stopped_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *PAUSE.lock().unwrap() = Some((name.to_owned(), stopped_tx, go_rx));
        let t = {
            let ov = ov.clone();
            let name = name.to_owned();
            std::thread::spawn(move || ov.lookup(ROOT_INO, &name))
        };
        stopped_rx.recv().unwrap();
        change();
        go_tx.send(()).unwrap();
        t.join().unwrap()
    }

    fn loc_name(ov: &OverlayFs, ino: u64) -> Option<CString> {
        ov.node(ino)
            .unwrap()
            .snapshot()
            .loc
            .map(|l| l.name.as_c_str().to_owned())
    }

    #[test]
    fn lookup_racing_rename_does_not_point_the_node_back() {
        let f = fixture();
        let a = f.ov.lookup(ROOT_INO, c"a").unwrap();
        let r = lookup_racing(&f.ov, c"a", || {
            f.ov.rename(ROOT_INO, c"a", ROOT_INO, c"b", 0).unwrap();
            // Another process makes a new "a" at once.
            std::fs::write(f._tmp.path().join("upper/a"), b"x").unwrap();
        })
        .unwrap();
        assert_ne!(r.ino, a.ino, "the new a is another object");
        assert_eq!(r.st.st_size, 1);
        assert_eq!(loc_name(&f.ov, a.ino).as_deref(), Some(c"b"));
        assert_eq!(f.ov.getattr(a.ino, None).unwrap().st.st_size, 12);
    }

    #[test]
    fn lookup_racing_unlink_does_not_revive_a_whited_out_file() {
        let f = fixture();
        let c = f.ov.lookup(ROOT_INO, c"c").unwrap();
        let r = lookup_racing(&f.ov, c"c", || {
            f.ov.remove(ROOT_INO, c"c", false).unwrap();
        });
        assert_eq!(r.err().map(|e| e.errno()), Some(libc::ENOENT));
        let s = f.ov.node(c.ino).unwrap().snapshot();
        assert!(s.unlinked && s.loc.is_none(), "the node must stay deleted");
    }

    #[test]
    fn lookup_that_resolved_before_a_rename_into_its_name_sees_the_new_object() {
        let f = fixture();
        let a = f.ov.lookup(ROOT_INO, c"a").unwrap();
        let c = f.ov.lookup(ROOT_INO, c"c").unwrap();
        let r = lookup_racing(&f.ov, c"c", || {
            f.ov.rename(ROOT_INO, c"a", ROOT_INO, c"c", 0).unwrap();
        })
        .unwrap();
        assert_eq!(r.ino, a.ino, "c is now the object that was a");
        assert_eq!(loc_name(&f.ov, a.ino).as_deref(), Some(c"c"));
        assert!(f.ov.node(c.ino).unwrap().snapshot().unlinked);
    }
}
