//! Copy-up: bringing a lower object into the upper layer before its first
//! modification (SPEC §5).
//!
//! Order, and why: parents first (an object can only be linked into an
//! upper directory); the copy is built in the work directory — data, then
//! owner, then mode (chown clears setuid bits), then xattrs and origin, then
//! fsync (unless volatile), then times (anything earlier would touch them) —
//! and only then linked (a regular file, built unnamed with `O_TMPFILE` as
//! the kernel does) or renamed (anything else) into place, so a crash leaves
//! either no upper copy or a complete one, and a killed daemon no partial
//! file in the work directory. The upper parent's times are saved before
//! the link and restored after it, so copied-up directories keep the
//! lower's times.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use log::debug;

use crate::error::{Context, Error, Result};
use crate::inode::{DirLayer, Loc, Node};
use crate::layer;
use crate::overlay::OverlayFs;
use crate::sys::{self, Stat, xattr};
use crate::whiteout::Opaque;

/// Where a built copy is.
enum Built {
    /// In the work directory under `CopyUp::tmp`.
    Named,
    /// A directory there, and an fd of it, which stays valid after the
    /// rename into place (the copy's upper directory, not opened again).
    Dir(OwnedFd),
    /// Not linked anywhere yet (`O_TMPFILE`).
    Unnamed(OwnedFd),
}

/// What is being copied and where it goes.
struct CopyUp<'a> {
    src_dir: BorrowedFd<'a>,
    name: &'a CStr,
    st: Stat,
    /// The upper directory receiving the copy.
    dest: BorrowedFd<'a>,
    work: BorrowedFd<'a>,
    tmp: std::ffi::CString,
    /// `O_TRUNC` open: the data would be thrown away anyway.
    skip_data: bool,
    /// The source directory, already open (a directory's node holds its
    /// layers' directories open): read for its inode flags.
    src_fd: Option<BorrowedFd<'a>>,
    /// What the data copy from the source's layer cannot do (`NO_CLONE`,
    /// `NO_COPY_RANGE`).
    caps: &'a std::sync::atomic::AtomicU8,
    /// Set once the copy has its `overlay.origin` (not for a lower hard
    /// link, nor where the upper refuses it: `user.*` xattrs on a special
    /// file or symlink with `userxattr`, no file handles).
    origin: std::cell::Cell<bool>,
}

pub fn timespecs(st: &Stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

impl OverlayFs {
    /// Makes sure `node`'s topmost entry is in the upper layer and returns
    /// its upper location. `skip_data` is for opens with `O_TRUNC`.
    pub(crate) fn copy_up(&self, node: &Arc<Node>, skip_data: bool) -> Result<Loc> {
        self.writable()?;
        // (Read in place: every create and write open asks.)
        if let Some(loc) = node.read_state(|s| self.upper_loc(s)) {
            return Ok(loc);
        }
        // The kernel's cached attributes of the copied objects and their
        // parents are dropped once the whole chain is copied, each once.
        let mut changed = Vec::new();
        let r = self.copy_up_chain(node, skip_data, &mut changed);
        if let Some(inv) = self.invalidator.get() {
            changed.sort_unstable();
            changed.dedup();
            for ino in changed {
                inv.inval_attr(ino);
            }
        }
        r
    }

    /// `copy_up` of `node` and, first, of its parents; notes in `changed`
    /// the nodes whose attributes changed.
    fn copy_up_chain(
        &self,
        node: &Arc<Node>,
        skip_data: bool,
        changed: &mut Vec<u64>,
    ) -> Result<Loc> {
        let parent = match node.read_state(|s| (self.upper_loc(s), s.parent.clone())) {
            (Some(loc), _) => return Ok(loc),
            (None, Some(parent)) => parent,
            (None, None) => return Err(Error::new(libc::EIO, "copy-up of the root")),
        };
        self.copy_up_chain(&parent, false, changed)?;
        let _g = node.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = node.snapshot();
        if let Some(loc) = self.upper_loc(&s) {
            return Ok(loc);
        }
        let src = s
            .loc
            .clone()
            .ok_or_else(|| Error::new(libc::ENOENT, "copy-up of a deleted object"))?;
        let pdirs = parent.snapshot().dirs;
        let dest = pdirs
            .first()
            .filter(|d| self.stack.is_upper(d.layer))
            .ok_or_else(|| Error::new(libc::EIO, "parent not in upper after copy-up"))?
            .clone();
        let st = sys::fstatat(src.dir.as_fd(), &src.name)
            .ctx(|| format!("copy-up stat {:?}", src.name))?;
        if st.st_mode & libc::S_IFMT != node.fmt {
            // The layer was changed under the mount (e.g. a directory
            // swapped for a symlink): copy nothing from the new object.
            return Err(Error::new(
                libc::ESTALE,
                format!("{:?} changed type in its layer", src.name),
            ));
        }
        let ctx = CopyUp {
            src_dir: src.dir.as_fd(),
            name: &src.name,
            st,
            dest: dest.fd.as_fd(),
            work: self.stack.work_fd()?,
            tmp: self.tmp_name(),
            skip_data,
            src_fd: s
                .dirs
                .first()
                .filter(|d| d.layer == src.layer)
                .map(|d| d.fd.as_fd()),
            caps: &self.copy_caps[src.layer],
            origin: std::cell::Cell::new(false),
        };
        debug!("copy-up {:?} (ino {})", src.name, node.ino);
        // A lower hard link's copy gets an inode number of its own: the
        // parent's listing (its d_ino) changes with it.
        let _v = (st.st_nlink > 1 && !node.is_dir()).then(|| self.changing(&[parent.ino]));
        let dir = self.build_and_link(&ctx)?;
        let loc = Loc {
            layer: dest.layer,
            dir: dest.fd.clone(),
            name: src.name.clone(),
        };
        if node.is_dir() {
            let upper = match dir {
                Some(fd) => fd,
                None => sys::open_dir_at(dest.fd.as_fd(), &src.name)
                    .ctx(|| "open copied-up dir".into())?,
            };
            let mut dirs = vec![DirLayer::new(dest.layer, Arc::new(upper), Opaque::No)];
            dirs.extend(s.dirs.iter().cloned());
            node.set_state(|st| {
                st.loc = Some(loc.clone());
                st.dirs = dirs.into();
            });
        } else {
            node.set_state(|st| st.loc = Some(loc.clone()));
            if st.st_nlink > 1 || !ctx.origin.get() {
                let up = sys::fstatat(dest.fd.as_fd(), &src.name).ctx(|| "stat copy".into())?;
                let own = self.stack.map_ino(dest.layer, up.st_ino);
                if st.st_nlink > 1 {
                    // A lower hard link (a per-name node): the copy is a new
                    // file with its own inode number, as with the kernel's
                    // index=off.
                    self.nodes.set_st_ino(node, own);
                } else {
                    // A copy without an origin is found by its own number
                    // through its other names (`link`): this node.
                    self.nodes.alias(node, own);
                }
            }
        }
        // The kernel's cached attributes describe the lower object: the copy
        // has its own st_blocks (the origin xattr may take a block), a merged
        // directory reports st_nlink 1, a broken hard link a new st_ino. The
        // parent's too: its upper directory got an entry, and its restored
        // times a new ctime (a stale one made `tar` report the directory as
        // changed while it read it, when the next stat saw the new one).
        changed.extend([node.ino, parent.ino]);
        node.generation.fetch_add(1, Ordering::Release);
        Ok(loc)
    }

    fn upper_loc(&self, s: &crate::inode::NodeState) -> Option<Loc> {
        match (s.dirs.first(), &s.loc) {
            (Some(d), Some(loc)) if self.stack.is_upper(d.layer) => Some(loc.clone()),
            (Some(d), None) if self.stack.is_upper(d.layer) => {
                // the root
                Some(Loc {
                    layer: d.layer,
                    dir: d.fd.clone(),
                    name: c".".into(),
                })
            }
            (None, Some(loc)) if self.stack.is_upper(loc.layer) => Some(loc.clone()),
            _ => None,
        }
    }

    /// Builds the copy and links or renames it into place; a directory's
    /// copy comes back open.
    fn build_and_link(&self, c: &CopyUp<'_>) -> Result<Option<OwnedFd>> {
        let is_dir = c.st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let built = match self.build(c) {
            Ok(b) => b,
            Err(e) => {
                let _ = sys::unlinkat(c.work, &c.tmp, is_dir);
                return Err(e);
            }
        };
        let parent_st = sys::fstat(c.dest).ctx(|| "stat upper parent".into())?;
        let rename = || match sys::renameat2(c.work, &c.tmp, c.dest, c.name, sys::RENAME_NOREPLACE)
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = sys::unlinkat(c.work, &c.tmp, is_dir);
                Err(e).ctx(|| format!("copy-up rename {:?} into place", c.name))
            }
        };
        let mut dir = None;
        match built {
            Built::Named => rename()?,
            Built::Dir(fd) => {
                rename()?;
                dir = Some(fd);
            }
            Built::Unnamed(fd) => {
                // Nothing to clean up on failure: an unnamed file goes with
                // its last descriptor.
                match sys::linkat(fd.as_fd(), c"", c.dest, c.name) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOENT))
                            && !sys::fstat(c.dest).is_ok_and(|st| st.st_nlink == 0) =>
                    {
                        // Linking an unnamed file refused (an older kernel,
                        // no CAP_DAC_READ_SEARCH and no /proc), not a parent
                        // removed meanwhile: named copies from now on.
                        debug!("copy-up: cannot link an O_TMPFILE copy ({e}): named copies");
                        self.tmpfile_ok.store(false, Ordering::Relaxed);
                        return self.build_and_link(c);
                    }
                    Err(e) => {
                        return Err(e).ctx(|| format!("copy-up link {:?} into place", c.name));
                    }
                }
            }
        }
        let impure = self.stack.xname("impure");
        let _ = xattr::set(xattr::Target::Fd(c.dest), &impure, b"y", 0);
        let _ = sys::utimensat(c.dest, c"", &timespecs(&parent_st));
        Ok(dir)
    }

    /// Builds the copy in the work directory: a regular file unnamed
    /// (`O_TMPFILE`, as the kernel does) where the filesystem allows it,
    /// anything else under `c.tmp`.
    fn build(&self, c: &CopyUp<'_>) -> Result<Built> {
        let fmt = c.st.st_mode & libc::S_IFMT;
        let perm = c.st.st_mode & 0o7777;
        let what = || format!("copy-up {:?}", c.name);
        match fmt {
            libc::S_IFREG => {
                let (dst, named) = match self.open_unnamed(c.work).ctx(what)? {
                    Some(fd) => (fd, false),
                    None => {
                        let fd = sys::openat(
                            c.work,
                            &c.tmp,
                            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                            0o600,
                        )
                        .ctx(what)?;
                        (fd, true)
                    }
                };
                let open_src = || sys::openat_noatime(c.src_dir, c.name, libc::O_RDONLY);
                let src = if !c.skip_data && c.st.st_size > 0 {
                    let src = open_src().ctx(what)?;
                    copy_data(src.as_fd(), dst.as_fd(), &c.st, c.caps).ctx(what)?;
                    Some(src)
                } else {
                    // Only for its flags.
                    open_src().ok()
                };
                self.finish_fd(c, &dst, perm)?;
                if let Some(src) = &src {
                    self.copy_inode_flags(src.as_fd(), &dst);
                }
                if !self.opts.volatile {
                    sys::fsync(dst.as_fd(), false).ctx(what)?;
                }
                sys::utimensat(dst.as_fd(), c"", &timespecs(&c.st)).ctx(what)?;
                return Ok(if named {
                    Built::Named
                } else {
                    Built::Unnamed(dst)
                });
            }
            libc::S_IFDIR => {
                sys::mkdirat(c.work, &c.tmp, 0o700).ctx(what)?;
                let d = sys::open_dir_at(c.work, &c.tmp).ctx(what)?;
                self.finish_fd(c, &d, perm)?;
                match c.src_fd {
                    Some(src) => self.copy_inode_flags(src, &d),
                    None => {
                        if let Ok(src) = sys::open_lower_dir_at(c.src_dir, c.name) {
                            self.copy_inode_flags(src.as_fd(), &d);
                        }
                    }
                }
                sys::utimensat(d.as_fd(), c"", &timespecs(&c.st)).ctx(what)?;
                return Ok(Built::Dir(d));
            }
            libc::S_IFLNK => {
                let target = sys::readlinkat(c.src_dir, c.name).ctx(what)?;
                let t = std::ffi::CString::new(target)
                    .map_err(|_| Error::new(libc::EINVAL, "NUL in link"))?;
                sys::symlinkat(&t, c.work, &c.tmp).ctx(what)?;
                self.finish_at(c)?;
            }
            _ => {
                sys::mknodat(c.work, &c.tmp, fmt | 0o600, c.st.st_rdev).ctx(what)?;
                self.finish_at(c)?;
            }
        }
        Ok(Built::Named)
    }

    /// An unnamed file in the work directory, or `None` where its filesystem
    /// cannot make one (no `O_TMPFILE`: named copies from then on).
    fn open_unnamed(&self, work: BorrowedFd<'_>) -> std::io::Result<Option<OwnedFd>> {
        if !self.tmpfile_ok.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match sys::openat(work, c".", libc::O_TMPFILE | libc::O_WRONLY, 0o600) {
            Ok(fd) => Ok(Some(fd)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                debug!("copy-up: no O_TMPFILE in the work dir ({e}): named copies");
                self.tmpfile_ok.store(false, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The inode flags a copy keeps, as the kernel's overlayfs copies them
    /// (`ovl_copy_fileattr`): synchronous updates and no atime updates
    /// (`chattr +S`, `+A`) are set on the copy; immutable and append-only
    /// (`+i`, `+a`), which would keep the copy from being linked into place,
    /// are recorded in `overlay.protattr` instead. Filesystems without
    /// inode flags are passed over.
    fn copy_inode_flags(&self, src: BorrowedFd<'_>, dst: &OwnedFd) {
        const COPIED: u32 = sys::FS_SYNC_FL | sys::FS_NOATIME_FL;
        const PROTECTED: u32 = sys::FS_APPEND_FL | sys::FS_IMMUTABLE_FL;
        let Ok(flags) = sys::inode_flags(src) else {
            return;
        };
        if flags & PROTECTED != 0 {
            let mut v = Vec::new();
            if flags & sys::FS_APPEND_FL != 0 {
                v.push(b'a');
            }
            if flags & sys::FS_IMMUTABLE_FL != 0 {
                v.push(b'i');
            }
            let name = self.stack.xname("protattr");
            if let Err(e) = xattr::set(xattr::Target::Fd(dst.as_fd()), &name, &v, 0) {
                debug!("copy-up: {name:?} not set: {e}");
            }
        }
        if flags & COPIED == 0 {
            return;
        }
        let set = sys::inode_flags(dst.as_fd())
            .and_then(|f| sys::set_inode_flags(dst.as_fd(), (f & !COPIED) | (flags & COPIED)));
        if let Err(e) = set {
            debug!("copy-up: inode flags not copied: {e}");
        }
    }

    /// Owner, mode, xattrs and origin of a copy open as `fd`.
    fn finish_fd(&self, c: &CopyUp<'_>, fd: &OwnedFd, perm: u32) -> Result<()> {
        let what = || format!("copy-up attrs of {:?}", c.name);
        sys::fchownat(fd.as_fd(), c"", c.st.st_uid, c.st.st_gid).ctx(what)?;
        sys::fchmod_fd(fd.as_fd(), perm).ctx(what)?;
        self.copy_xattrs(c, xattr::Target::Fd(fd.as_fd()))?;
        Ok(())
    }

    /// Owner, mode, xattrs, origin and times of a symlink or special file.
    fn finish_at(&self, c: &CopyUp<'_>) -> Result<()> {
        let what = || format!("copy-up attrs of {:?}", c.name);
        sys::fchownat(c.work, &c.tmp, c.st.st_uid, c.st.st_gid).ctx(what)?;
        if c.st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            let p = sys::openat(c.work, &c.tmp, libc::O_PATH, 0).ctx(what)?;
            sys::fchmod_fd(p.as_fd(), c.st.st_mode & 0o7777).ctx(what)?;
        }
        self.copy_xattrs(c, xattr::Target::At(c.work, &c.tmp))?;
        sys::utimensat(c.work, &c.tmp, &timespecs(&c.st)).ctx(what)
    }

    /// Copies the lower's xattrs (not the overlay's private ones, which
    /// describe the lower layer) and writes `overlay.origin`.
    fn copy_xattrs(&self, c: &CopyUp<'_>, dst: xattr::Target<'_>) -> Result<()> {
        let src = xattr::Target::At(c.src_dir, c.name);
        let what = || format!("copy-up xattrs of {:?}", c.name);
        for n in xattr::list(src).ctx(what)? {
            if self.stack.private.unescape(&n).is_none() {
                continue;
            }
            let cn = xattr::name(&n)?;
            if let Some(v) = xattr::get(src, &cn).ctx(what)? {
                match xattr::set(dst, &cn, &v, 0) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENOTSUP)
                            || e.raw_os_error() == Some(libc::EPERM) =>
                    {
                        debug!("copy-up: xattr {cn:?} not copied: {e}")
                    }
                    r => r.ctx(what)?,
                }
            }
        }
        // No origin for a lower hard link: the copy is a new, separate file.
        let hardlink = c.st.st_mode & libc::S_IFMT != libc::S_IFDIR && c.st.st_nlink > 1;
        if !hardlink && let Ok(origin) = layer::make_origin_at(c.src_dir, c.name) {
            let set = xattr::set(dst, &self.stack.xname("origin"), &origin, 0);
            c.origin.set(set.is_ok());
        }
        Ok(())
    }
}

/// What a copy from one lower layer to the upper cannot do, learnt from a
/// failed attempt (bits in `OverlayFs::copy_caps`; the filesystems stay the
/// same while mounted): not tried again.
const NO_CLONE: u8 = 1;
const NO_COPY_RANGE: u8 = 2;

/// Whether an error says the operation cannot work between these two
/// filesystems at all (not just for this file).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Copies the data of a file of lstat `st`: reflink when the filesystems
/// can, else `copy_file_range` (else read/write) in the kernel's chunks
/// (see below). A file no larger than a block, with a block allocated, has
/// no hole: it is copied whole, without looking for one.
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    st: &Stat,
    caps: &std::sync::atomic::AtomicU8,
) -> std::io::Result<()> {
    let size = st.st_size as u64;
    if caps.load(Ordering::Relaxed) & NO_CLONE == 0 {
        match sys::ficlone(dst, src) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {
                caps.fetch_or(NO_CLONE, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
    let mut reached = 0;
    // A block: the preferred I/O size (ext4's block size, 1 KiB on some),
    // at most 4 KiB (ZFS gives its larger record size there).
    if size <= (st.st_blksize as u64).min(4096) && st.st_blocks > 0 {
        reached = copy_range(src, dst, 0, size, caps)?;
    } else {
        // As the kernel's overlay copies (`ovl_copy_up_file`): in chunks of
        // 1 MiB, a hole passed over only where the next data starts beyond
        // the position reached, so holes inside a chunk are written as
        // zeros and the copy takes the blocks the kernel's copy takes.
        const CHUNK: u64 = 1 << 20;
        let (mut pos, mut data_pos, mut seek) = (0u64, None, true);
        while pos < size {
            if seek && data_pos.is_none_or(|d| d < pos) {
                match sys::lseek(src, pos as i64, libc::SEEK_DATA) {
                    Ok(Some(d)) if d as u64 > pos => {
                        pos = d as u64;
                        data_pos = Some(pos);
                        continue;
                    }
                    Ok(Some(d)) => data_pos = Some(d as u64),
                    // Only a hole left.
                    Ok(None) => break,
                    // No SEEK_DATA: everything is copied.
                    Err(_) => seek = false,
                }
            }
            let end = (pos + CHUNK).min(size);
            reached = copy_range(src, dst, pos, end, caps)?;
            if reached < end {
                break;
            }
            pos = end;
        }
    }
    // A hole at the end (or a source shorter than its lstat said).
    if reached != size {
        sys::ftruncate(dst, size)?;
    }
    Ok(())
}

/// Copies `off..end`; where the copy stopped (`end` unless the source ended
/// first).
fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    end: u64,
    caps: &std::sync::atomic::AtomicU8,
) -> std::io::Result<u64> {
    if caps.load(Ordering::Relaxed) & NO_COPY_RANGE != 0 {
        return copy_rw(src, dst, off, end);
    }
    while off < end {
        let len = ((end - off) as usize).min(1 << 30);
        let n = match sys::copy_file_range(src, off, dst, off, len) {
            Ok(0) => return Ok(off),
            Ok(n) => n,
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                if unsupported(&e) {
                    caps.fetch_or(NO_COPY_RANGE, Ordering::Relaxed);
                }
                return copy_rw(src, dst, off, end);
            }
            Err(e) => return Err(e),
        };
        off += n as u64;
    }
    Ok(off)
}

fn copy_rw(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    end: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; ((end - off) as usize).clamp(1, 1 << 20)];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        let mut w = 0;
        while w < n {
            w += sys::pwrite(dst, &buf[w..n], off + w as u64)?;
        }
        off += n as u64;
    }
    Ok(off)
}
