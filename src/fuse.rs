//! The only module that speaks `fuser`: decode a request, call the core
//! (`OverlayFs`), reply. Each core call runs under `catch_unwind`, so a bug
//! answers `EIO` instead of taking the mount down; every request gets
//! exactly one reply.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, error, info, warn};

use crate::attrs::{SetAttr, SetTime, Writer};
use crate::error::{Error, Result};
use crate::namespace::NewObject;
use crate::overlay::{Attr, Caller, OpenIo, OverlayFs};

pub struct LayerFs {
    pub ov: Arc<OverlayFs>,
    /// How owners and link counts are presented (id mappings, squashing).
    pub view: crate::idmap::View,
    pub ttl: Duration,
    pub acl: bool,
    /// Offer FUSE passthrough (set from the kernel's answer at init).
    pub passthrough: bool,
    /// Ask for the writeback cache where passthrough is off (set from the
    /// kernel's answer at init).
    pub writeback: bool,
    /// Ask for FUSE-over-io-uring (taken when the kernel offers it).
    pub uring: bool,
}

/// Runs a core call; a panic becomes `EIO` with a log line.
fn guard<T>(op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => {
            if let Err(e) = &r {
                if e.is_expected() {
                    debug!("{op}: {e}");
                } else {
                    warn!("{op}: {e}");
                }
            }
            r
        }
        Err(_) => {
            error!("{op}: internal error (panic); answered EIO");
            Err(Error::new(libc::EIO, "panic"))
        }
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn cname(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Error::new(libc::EINVAL, "NUL in name"))
}

fn caller(req: &Request, umask: u32) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask,
    }
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

pub fn file_type(fmt: u32) -> FileType {
    match fmt & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The `FileAttr` of a reply; its `ino` is the reported `st_ino` (the node
/// id, which may differ, travels separately).
fn fuse_attr(a: &Attr) -> FileAttr {
    let st = &a.st;
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec),
        mtime: systime(st.st_mtime, st.st_mtime_nsec),
        ctime: systime(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                if ns == 0 {
                    SetTime::At(-s, 0)
                } else {
                    SetTime::At(-s - 1, 1_000_000_000 - ns)
                }
            }
        },
    })
}

impl LayerFs {
    /// The flags layerfs opens a file with: with the writeback cache the
    /// kernel also reads through a write-only open (the rest of a page it
    /// writes part of), so a write-only open is made read-write.
    fn io_flags(&self, flags: i32) -> i32 {
        if self.writeback && flags & libc::O_ACCMODE == libc::O_WRONLY {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            flags
        }
    }

    fn to_fuse(&self, a: &Attr) -> FileAttr {
        let mut a = *a;
        self.view.present(&mut a.st);
        fuse_attr(&a)
    }

    /// The caller of `req` as a writer; `lacks_fsetid`: the kernel says it
    /// has no `CAP_FSETID` (else it is asked when it matters).
    fn writer(&self, req: &Request, lacks_fsetid: bool) -> Writer<'_> {
        Writer {
            pid: req.pid(),
            gid: self.view.gid_to_disk(req.gid()),
            view: &self.view,
            lacks_fsetid,
        }
    }

    /// The caller's credentials as stored on disk (through the id mappings).
    fn caller(&self, req: &Request, umask: u32) -> Caller {
        let c = caller(req, umask);
        Caller {
            uid: self.view.uid_to_disk(c.uid),
            gid: self.view.gid_to_disk(c.gid),
            ..c
        }
    }

    /// The attribute timeout: zero for attributes that may change behind
    /// the kernel's back (`Attr::cache`).
    fn attr_ttl(&self, a: &Attr) -> Duration {
        if a.cache { self.ttl } else { Duration::ZERO }
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Attr>) {
        match r {
            Ok(a) => reply.entry_node(
                INodeNo(a.ino),
                &self.attr_ttl(&a),
                &self.ttl,
                &self.to_fuse(&a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(reply: ReplyEmpty, r: Result<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        obj: NewObject<'_>,
    ) -> Result<Attr> {
        let n = cname(name)?;
        self.ov
            .create_object(self.caller(req, umask), parent.0, &n, mode, obj)
            .map(|(a, _)| a)
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // HANDLE_KILLPRIV_V2: layerfs clears setuid/setgid bits on writes
        // and truncations (flagged by the kernel when the caller lacks
        // CAP_FSETID), and in return the kernel stops asking for
        // security.capability before every write (SB_NOSEC): a small write
        // through passthrough costs no round trip (24 -> 0.7 us).
        // Passthrough writes never reach layerfs: setuid/setgid files are
        // not passed through for writing, and backing files are registered
        // without CAP_FSETID, so a file that becomes setuid while open loses
        // the bit at the next write through the backing filesystem.
        // DONT_MASK: the umask is applied by layerfs, and not where the
        // parent has a default ACL (which replaces it, as on the kernel).
        // No ATOMIC_O_TRUNC: with it the file is truncated inside OPEN,
        // before the kernel's ETXTBSY check for a running executable; without
        // it the kernel checks, then truncates with a SETATTR (which copies
        // up no data for size 0).
        let mut wanted = InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.acl {
            // The kernel then caches ACLs per inode instead of asking for
            // system.posix_acl_access on every `ls -l`.
            wanted |= InitFlags::FUSE_POSIX_ACL;
        }
        if self.passthrough && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            // Backing files on a plain filesystem (depth 0); layers on an
            // overlay of their own fall back to cached I/O.
            if config.set_max_stack_depth(1).is_ok() {
                wanted |= InitFlags::FUSE_PASSTHROUGH;
            }
        }
        if self.uring {
            // Requests handled on the CPU that made them (per-CPU queues).
            wanted |= InitFlags::FUSE_OVER_IO_URING;
        }
        let passthrough = wanted.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH);
        if self.writeback && passthrough {
            // Writes to upper files then go to their backing files (setuid
            // files aside), not through the page cache of this mount, and
            // lower files are copied up before any write: little to gather.
            info!("writeback: not used, the mount has FUSE passthrough (passthrough=off for it)");
        } else if self.writeback {
            // Writes are gathered in the kernel's page cache and sent in
            // large requests; the kernel keeps size and times of regular
            // files itself meanwhile (see README).
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let supported = config.capabilities() & wanted;
        let _ = config.add_capabilities(supported);
        self.passthrough = supported.contains(InitFlags::FUSE_PASSTHROUGH);
        debug!("passthrough: {}", self.passthrough);
        self.writeback = supported.contains(InitFlags::FUSE_WRITEBACK_CACHE);
        debug!("writeback cache: {}", self.writeback);
        self.uring = supported.contains(InitFlags::FUSE_OVER_IO_URING);
        debug!("io_uring requested: {}", self.uring);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        debug!("lookup({parent}, {name:?})");
        let r = guard("lookup", || self.ov.lookup(parent.0, &cname(name)?));
        match r {
            // A negative entry the kernel may cache (node id 0 with a
            // timeout), as it caches negative dentries over the kernel's
            // overlay: names only appear through this mount, and the kernel
            // replaces the entry when one does.
            Err(e) if e.is(libc::ENOENT) && e.context() != crate::overlay::RACED_ABSENCE => reply
                .entry_node(
                    INodeNo(0),
                    &Duration::ZERO,
                    &self.ttl,
                    &bare_attr(0, libc::S_IFREG),
                    Generation(0),
                ),
            r => self.entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        debug!("forget({ino}, {nlookup})");
        self.ov.forget(ino.0, nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        debug!("getattr({ino})");
        match guard("getattr", || self.ov.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.to_fuse(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// The kernel asks when a caller wants the birth time (`stat`, `ls
    /// --time=birth`): the attributes, and the topmost real file's birth
    /// time, as the kernel's overlayfs reports it.
    fn statx(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Option<FileHandle>,
        _mask: u32,
        reply: fuser::ReplyStatx,
    ) {
        debug!("statx({ino})");
        let fh = fh.map(|f| f.0);
        match guard("statx", || {
            let a = self.ov.getattr(ino.0, fh)?;
            Ok((a, self.ov.btime(ino.0, fh)))
        }) {
            Ok((a, b)) => reply.statx(&self.attr_ttl(&a), &self.to_fuse(&a), b),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suidgid: bool,
        reply: ReplyAttr,
    ) {
        debug!("setattr({ino}, mode={mode:?}, uid={uid:?}, gid={gid:?}, size={size:?})");
        let a = SetAttr {
            mode,
            uid: uid.map(|u| self.view.uid_to_disk(u)),
            gid: gid.map(|g| self.view.gid_to_disk(g)),
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        let caller = self.writer(req, false);
        match guard("setattr", || {
            self.ov.setattr(ino.0, a, caller, kill_suidgid)
        }) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.to_fuse(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        debug!("readlink({ino})");
        match guard("readlink", || self.ov.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        debug!("mknod({parent}, {name:?}, {mode:o}, {rdev})");
        let r = guard("mknod", || {
            self.make(
                req,
                parent,
                name,
                mode,
                umask,
                NewObject::Node { rdev: rdev as u64 },
            )
        });
        self.entry(reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        debug!("mkdir({parent}, {name:?}, {mode:o})");
        let mode = mode | libc::S_IFDIR;
        let r = guard("mkdir", || {
            self.make(req, parent, name, mode, umask, NewObject::Dir)
        });
        self.entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        debug!("unlink({parent}, {name:?})");
        Self::empty(
            reply,
            guard("unlink", || self.ov.remove(parent.0, &cname(name)?, false)),
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        debug!("rmdir({parent}, {name:?})");
        Self::empty(
            reply,
            guard("rmdir", || self.ov.remove(parent.0, &cname(name)?, true)),
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        debug!("symlink({parent}, {link_name:?}, {target:?})");
        let r = guard("symlink", || {
            let t = cname(target.as_os_str())?;
            self.make(
                req,
                parent,
                link_name,
                libc::S_IFLNK | 0o777,
                0,
                NewObject::Symlink { target: &t },
            )
        });
        self.entry(reply, r)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        debug!("rename({parent}, {name:?}, {newparent}, {newname:?}, {flags:?})");
        let r = guard("rename", || {
            self.ov.rename(
                parent.0,
                &cname(name)?,
                newparent.0,
                &cname(newname)?,
                flags.bits(),
            )
        });
        Self::empty(reply, r)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        debug!("link({ino}, {newparent}, {newname:?})");
        let r = guard("link", || {
            self.ov.link(ino.0, newparent.0, &cname(newname)?)
        });
        self.entry(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        debug!("open({ino}, {:#x})", flags.0);
        // Nothing to flush at close (no locks or data are kept by layerfs)
        // for a read-only open, or a passthrough one (its data never passes
        // the kernel's cache of this inode): spare the kernel that round trip.
        let noflush = if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::empty()
        };
        let register =
            |fd: std::os::fd::BorrowedFd<'_>| register_backing(fd, |f| reply.open_backing(f));
        let open = |f| {
            self.ov
                .open(ino.0, f, self.passthrough.then_some(&register))
        };
        let r = guard("open", || match open(self.io_flags(flags.0)) {
            // A write-only file the daemon may not read: the kernel's
            // reads to complete a partly written page will fail.
            Err(e) if e.is(libc::EACCES) && self.io_flags(flags.0) != flags.0 => open(flags.0),
            r => r,
        });
        match r {
            Ok((fh, OpenIo::Cached { keep_cache })) => {
                reply.opened(FileHandle(fh), cache_flags(keep_cache) | noflush)
            }
            Ok((fh, OpenIo::Passthrough(b))) => match b.downcast::<BackingId>() {
                Ok(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id),
                Err(_) => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        debug!("read({ino}, {fh}, {offset}, {size})");
        reply.data_with(size as usize, |buf| {
            guard("read", || self.ov.read_into(fh.0, offset, buf, flags.0)).map_err(|e| errno(&e))
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        debug!("write({ino}, {fh}, {offset}, {})", data.len());
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| self.writer(req, true));
        match guard("write", || self.ov.write(fh.0, offset, data, kill, flags.0)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        debug!("flush({ino}, {fh})");
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        debug!("release({ino}, {fh})");
        self.ov.release(fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        debug!("fsync({ino}, {fh})");
        Self::empty(reply, guard("fsync", || self.ov.fsync(fh.0, datasync)))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        debug!("opendir({ino})");
        // ENOSYS: the kernel then stops sending opendir and releasedir
        // (two round trips per listing) and caches listings itself
        // (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE, its default without
        // opendir), asking by inode for what it lacks; layerfs drops those
        // caches when a directory's entries change (`listings_changed`).
        // With `timeout=0` nothing is to be cached: a handle-less open
        // without cache flags, so every listing asks layerfs.
        if self.ttl.is_zero() {
            reply.opened(FileHandle(0), FopenFlags::empty())
        } else {
            reply.error(Errno::ENOSYS)
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        debug!("readdir({ino}, {fh}, {offset})");
        match guard("readdir", || self.ov.readdir(ino.0, offset)) {
            Ok(listing) => {
                let mut it = listing.entries().peekable();
                let mut sent = 0;
                while let Some(e) = it.next() {
                    if sent > 0 && !run_fits(e, &it, 24, reply.remaining()) {
                        break;
                    }
                    if reply.add(
                        INodeNo(e.ino),
                        e.off,
                        file_type(e.fmt),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                    sent += 1;
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        debug!("readdirplus({ino}, {fh}, {offset})");
        let listing = match guard("readdirplus", || self.ov.readdir(ino.0, offset)) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut it = listing.entries().peekable();
        let mut sent = 0;
        while let Some(e) = it.next() {
            if sent > 0 && !run_fits(e, &it, 152, reply.remaining()) {
                break;
            }
            let name = OsStr::from_bytes(&e.name);
            let dots = e.name == b"." || e.name == b"..";
            let looked_up = match dots || self.ov.holds_entry(ino.0, &e.name, e.ino) {
                true => None,
                // A name that cannot be looked up now is still listed (the
                // kernel may cache this listing): by name alone.
                false => guard("readdirplus lookup", || {
                    self.ov.lookup_entry(ino.0, &e.name)
                })
                .ok(),
            };
            let full = match looked_up {
                Some(a) => {
                    let full = reply.add(
                        INodeNo(a.ino),
                        e.off,
                        name,
                        &self.attr_ttl(&a),
                        &self.to_fuse(&a),
                        Generation(0),
                    );
                    if full {
                        // Not sent: give the lookup back.
                        self.ov.forget(a.ino, 1);
                    }
                    full
                }
                // Name only (node id 0): the kernel skips `.` and `..` and
                // keeps the nodes it holds as they are.
                None => reply.add(
                    INodeNo(0),
                    e.off,
                    name,
                    &Duration::ZERO,
                    &bare_attr(e.ino, e.fmt),
                    Generation(0),
                ),
            };
            if full {
                break;
            }
            sent += 1;
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        debug!("fsyncdir({ino})");
        Self::empty(
            reply,
            guard("fsyncdir", || self.ov.fsyncdir(ino.0, datasync)),
        )
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        debug!("statfs");
        match guard("statfs", || self.ov.statfs()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        debug!("setxattr({ino}, {name:?})");
        Self::empty(
            reply,
            guard("setxattr", || {
                let w = self.writer(req, false);
                self.ov.setxattr(ino.0, name.as_bytes(), value, flags, w)
            }),
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        debug!("getxattr({ino}, {name:?}, {size})");
        match guard("getxattr", || self.ov.getxattr(ino.0, name.as_bytes())) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        debug!("listxattr({ino}, {size})");
        let pid = req.pid();
        let sees_trusted = || crate::sys::process::is_host_admin(pid);
        match guard("listxattr", || {
            self.ov.listxattr(ino.0, size == 0, sees_trusted)
        }) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        debug!("removexattr({ino}, {name:?})");
        Self::empty(
            reply,
            guard("removexattr", || {
                let w = self.writer(req, false);
                self.ov.removexattr(ino.0, name.as_bytes(), w)
            }),
        )
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        debug!("access({ino}, {mask:?})");
        Self::empty(
            reply,
            guard("access", || self.ov.access(ino.0, mask.bits())),
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        debug!("create({parent}, {name:?}, {mode:o}, {flags:#x})");
        let register =
            |fd: std::os::fd::BorrowedFd<'_>| register_backing(fd, |f| reply.open_backing(f));
        let r = guard("create", || {
            self.ov.create(
                self.caller(req, umask),
                parent.0,
                &cname(name)?,
                mode,
                self.io_flags(flags),
                self.passthrough.then_some(&register),
            )
        });
        self.created(reply, r)
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        debug!("tmpfile({parent}, {mode:o}, {flags:#x})");
        let register =
            |fd: std::os::fd::BorrowedFd<'_>| register_backing(fd, |f| reply.open_backing(f));
        let r = guard("tmpfile", || {
            self.ov.tmpfile(
                self.caller(req, umask),
                parent.0,
                mode,
                self.io_flags(flags),
                self.passthrough.then_some(&register),
            )
        });
        self.created(reply, r)
    }

    /// No ioctl is passed through (as for most FUSE filesystems): answered
    /// `ENOTTY` quietly (a shell asks TCGETS of every file it opens), but
    /// for the inode flags: the kernel turns `FS_IOC_GETFLAGS`,
    /// `FS_IOC_SETFLAGS` and their `FS_IOC_FS[GS]ETXATTR` forms (`lsattr`,
    /// `chattr`) on a FUSE file into these, through an open of its own,
    /// after checking ownership and `CAP_LINUX_IMMUTABLE` itself.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        debug!("ioctl({ino}, {cmd:#x})");
        use crate::attrs::FS_IOC_FSGETXATTR;
        use crate::protect::{FS_IOC_FSSETXATTR, FS_IOC_SETFLAGS};
        let get = [
            libc::FS_IOC_GETFLAGS as u32,
            libc::FS_IOC32_GETFLAGS as u32,
            FS_IOC_FSGETXATTR,
        ];
        let set = [
            FS_IOC_SETFLAGS,
            libc::FS_IOC32_SETFLAGS as u32,
            FS_IOC_FSSETXATTR,
        ];
        if get.contains(&cmd) {
            match guard("ioctl", || {
                self.ov.get_fileattr(ino.0, fh.0, cmd, out_size as usize)
            }) {
                Ok(data) => reply.ioctl(0, &data),
                Err(e) => reply.error(errno(&e)),
            }
        } else if set.contains(&cmd) {
            match guard("ioctl", || self.ov.set_fileattr(ino.0, fh.0, cmd, in_data)) {
                Ok(()) => reply.ioctl(0, &[]),
                Err(e) => reply.error(errno(&e)),
            }
        } else {
            reply.error(Errno::from_i32(libc::ENOTTY))
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        debug!("fallocate({ino}, {fh}, {offset}, {length}, {mode})");
        Self::empty(
            reply,
            guard("fallocate", || {
                let w = self.writer(req, false);
                self.ov.fallocate(fh.0, offset, length, mode, w)
            }),
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        debug!("lseek({ino}, {fh}, {offset}, {whence})");
        match guard("lseek", || self.ov.lseek(fh.0, offset, whence)) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        debug!("copy_file_range({ino_in}, {fh_in}, {offset_in}, {fh_out}, {offset_out}, {len})");
        match guard("copy_file_range", || {
            let w = self.writer(req, false);
            self.ov
                .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len, w)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl LayerFs {
    fn created(&self, reply: ReplyCreate, r: Result<(Attr, u64, OpenIo)>) {
        let (a, fh, io) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(errno(&e)),
        };
        let backing = match io {
            OpenIo::Cached { .. } => None,
            OpenIo::Passthrough(b) => match b.downcast::<BackingId>() {
                Ok(id) => Some(id),
                Err(_) => return reply.error(Errno::EIO),
            },
        };
        reply.created_node(
            INodeNo(a.ino),
            &self.attr_ttl(&a),
            &self.to_fuse(&a),
            Generation(0),
            FileHandle(fh),
            match backing {
                Some(_) => FopenFlags::FOPEN_NOFLUSH,
                None => FopenFlags::empty(),
            },
            backing.as_deref(),
        );
    }
}

/// Whether the run of entries sharing `e`'s offset (a hash collision; `e`
/// and those `rest` starts with) fits in `room` bytes of a listing reply,
/// `header` bytes per entry plus the name. A run is never split across
/// replies: the next request resumes after the offset, which would skip
/// the run's rest.
fn run_fits<'a>(
    e: &crate::readdir::DirEntry,
    rest: &(impl Iterator<Item = &'a crate::readdir::DirEntry> + Clone),
    header: usize,
    room: usize,
) -> bool {
    let size = |x: &crate::readdir::DirEntry| (header + x.name.len()).next_multiple_of(8);
    let run: usize = size(e)
        + rest
            .clone()
            .take_while(|n| n.off == e.off)
            .map(size)
            .sum::<usize>();
    run <= room
}

/// Attributes that carry an inode number and type only, for replies whose
/// attributes the kernel ignores (node id 0: a readdirplus entry given by
/// name, a negative lookup).
fn bare_attr(ino: u64, fmt: u32) -> FileAttr {
    let mut st = crate::sys::zeroed_stat();
    st.st_ino = ino;
    st.st_mode = fmt;
    fuse_attr(&Attr {
        ino,
        st,
        cache: false,
    })
}

fn cache_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

/// Registers `fd` as a passthrough backing file with the kernel; `None`
/// (the open then continues cached) when the kernel refuses, e.g. for a
/// backing file on a stacked filesystem or without CAP_SYS_ADMIN.
fn register_backing(
    fd: std::os::fd::BorrowedFd<'_>,
    open: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
) -> Option<crate::overlay::Backing> {
    // The backing file does its I/O with the credentials of this thread as
    // they are now: without CAP_FSETID, a write through it clears the
    // setuid/setgid bits of a file made setuid while it was open.
    match crate::sys::process::without_fsetid(|| open(fd)) {
        Ok(id) => Some(Arc::new(id)),
        Err(e) => {
            debug!("passthrough refused: {e}");
            None
        }
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE))
    } else {
        reply.data(v)
    }
}

/// Sends the core's invalidations to the kernel, from the request thread
/// that asks (so they are done before its reply), except listing
/// invalidations with a single request thread: the kernel may hold a
/// directory's cache page locked while it copies a listing into a buffer
/// whose page fault needs a READ from this very filesystem, which a lone
/// request thread waiting on that page could never answer. (Over
/// FUSE-over-io-uring that READ goes to the queue of the reader's CPU,
/// which has at least two threads, like `/dev/fuse` with two threads.)
pub struct Notify {
    notifier: fuser::Notifier,
    background: Option<std::sync::Mutex<std::sync::mpsc::Sender<u64>>>,
}

impl Notify {
    pub fn new(notifier: fuser::Notifier, threads: usize) -> Notify {
        let background = if threads < 2 {
            let (tx, rx) = std::sync::mpsc::channel::<u64>();
            let n = notifier.clone();
            std::thread::Builder::new()
                .name("layerfs-inval".into())
                .spawn(move || {
                    for ino in rx {
                        if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                            debug!("inval_inode: {e}");
                        }
                    }
                })
                .ok()
                .map(|_| std::sync::Mutex::new(tx))
        } else {
            None
        };
        Notify {
            notifier,
            background,
        }
    }
}

impl crate::overlay::Invalidator for Notify {
    /// Synchronous: attribute invalidation takes no inode lock in the kernel.
    fn inval_attr(&self, ino: u64) {
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), -1, 0) {
            debug!("inval_inode: {e}");
        }
    }

    /// Synchronous: called only while no READ of the inode can be pending
    /// (its single open, before the open is answered).
    fn store(&self, ino: u64, data: &[u8]) {
        if let Err(e) = self.notifier.store(INodeNo(ino), 0, data) {
            debug!("notify store: {e}");
        }
    }

    /// Synchronous with several request threads (see `Notify`).
    fn inval_listing(&self, ino: u64) {
        if let Some(tx) = &self.background {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(ino);
        } else if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
            debug!("inval_inode: {e}");
        }
    }
}
