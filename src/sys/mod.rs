//! Thin wrappers over the Linux system calls layerfs needs.
//!
//! This is the only module with `unsafe`. Every path given to these functions
//! is a single name component relative to a directory fd (the callers check
//! that names contain no `/` and are not `.`/`..`), and every call that could
//! follow a symlink in its last component is made with `O_NOFOLLOW` or
//! `AT_SYMLINK_NOFOLLOW`, so nothing here can reach outside a layer.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub mod process;
pub mod xattr;

pub type Stat = libc::stat;

/// Converts a name to a C string; a name with a NUL byte is invalid input.
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// `openat(2)`; `O_CLOEXEC` and `O_NOFOLLOW` are always added.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    retry(|| {
        // SAFETY: `name` is a valid NUL-terminated string and `dir` a live fd.
        let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Opens a path given by the user (a layer root); symlinks in it are followed.
pub fn open_path_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    open_path_dir_with(path, false)
}

/// `open_path_dir` for a lower layer's root, whose listing leaves its access
/// time alone (where this process may ask for that: `openat_noatime`).
pub fn open_lower_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    open_path_dir_with(path, true)
}

/// A lower layer's root in a private, read-only, `noatime` copy of the
/// mount holding `path` (`open_tree(OPEN_TREE_CLONE)`, not recursive), as
/// the kernel's overlay takes its layers: nothing done through it changes
/// the layer, not even an access time (a `readlink` moves a symlink's
/// otherwise), and mounts made inside the layer's tree are not crossed.
/// Where the mount's atime setting is locked (rootless), read-only alone.
/// Fails where this process may not clone mounts (no `CAP_SYS_ADMIN` over
/// the mount, kernels before 5.12).
pub fn open_private_lower_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOATIME: u64 = 0x10;
    const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let c = cstr(path.as_os_str())?;
    // SAFETY: a valid NUL-terminated path; the call returns a new fd or -1.
    let tree = cvt_size(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        ) as libc::ssize_t
    })?;
    // SAFETY: `tree` is fresh and owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    let set = |attr_set, attr_clr| {
        let attr = MountAttr {
            attr_set,
            attr_clr,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `tree` is a live fd, the empty path is NUL-terminated and
        // `attr` is a `struct mount_attr` of the size passed.
        cvt_size(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ) as libc::ssize_t
        })
    };
    match set(
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOATIME,
        MOUNT_ATTR_ATIME_MASK,
    ) {
        // A mount whose atime setting is locked (one a user namespace got
        // from its parent's, as a rootless daemon's): read-only alone, its
        // reads opened `O_NOATIME` as before.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => set(MOUNT_ATTR_RDONLY, 0),
        r => r,
    }?;
    openat_noatime(
        std::os::fd::AsFd::as_fd(&tree),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
    )
}

fn open_path_dir_with(path: &std::path::Path, noatime: bool) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let open = |extra: i32| -> io::Result<OwnedFd> {
        // SAFETY: `c` is a valid NUL-terminated string.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | extra,
            )
        })?;
        // SAFETY: `fd` is fresh and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    match open(if noatime { libc::O_NOATIME } else { 0 }) {
        Err(e) if noatime && e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// Opens a directory below `dir` for reading and xattr access, never following
/// a symlink; falls back to an `O_PATH` fd when the directory is not readable.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_dir_with(dir, name, |f| openat(dir, name, f, 0))
}

/// `open_dir_at` for a lower layer's directory: reading it (`getdents`)
/// leaves its access time alone, as the kernel's overlay does.
pub fn open_lower_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_dir_with(dir, name, |f| openat_noatime(dir, name, f))
}

fn open_dir_with(
    dir: BorrowedFd<'_>,
    name: &CStr,
    open: impl Fn(i32) -> io::Result<OwnedFd>,
) -> io::Result<OwnedFd> {
    match open(libc::O_RDONLY | libc::O_DIRECTORY) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)
        }
        r => r,
    }
}

/// `openat` for reading a lower layer: with `O_NOATIME` (the lowers are
/// never written, their access times included, as with the kernel's
/// overlay), or without it where this process may not use it (`EPERM`: not
/// the owner and no `CAP_FOWNER`, e.g. rootless).
pub fn openat_noatime(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    match openat(dir, name, flags | libc::O_NOATIME, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => openat(dir, name, flags, 0),
        r => r,
    }
}

/// The file offset (and length) alignment O_DIRECT I/O on `fd`'s file
/// needs (`statx` `STATX_DIOALIGN`); `None` where the filesystem does not
/// say or does not do direct I/O.
pub fn dio_offset_align(fd: BorrowedFd<'_>) -> Option<u32> {
    let stx = statx_at(fd, c"", libc::STATX_DIOALIGN).ok()?;
    (stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0)
        .then_some(stx.stx_dio_offset_align)
}

/// `AT_EMPTY_PATH` for an empty name (the call is about `dir` itself).
fn empty_path(name: &CStr) -> libc::c_int {
    if name.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    }
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    let flags = libc::AT_SYMLINK_NOFOLLOW | empty_path(name);
    // SAFETY: valid fd, valid C string, `st` is writable and sized for `stat`.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    fstatat(fd, c"")
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    // SAFETY: all-zero is a valid `statvfs`.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a writable struct of the right type.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings and fd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(2)`, never following a final symlink. An empty `oname` links
/// the file open as `odir` itself (an `O_TMPFILE` file): with
/// `AT_EMPTY_PATH`, which older kernels allow only with
/// `CAP_DAC_READ_SEARCH`, else through its `/proc/self/fd` link, which needs
/// only write access to `ndir`. Fails with `EEXIST` if the name exists.
pub fn linkat(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> io::Result<()> {
    let raw = |od: RawFd, on: &CStr, flags| {
        // SAFETY: valid fds and C strings.
        cvt(unsafe { libc::linkat(od, on.as_ptr(), ndir.as_raw_fd(), nname.as_ptr(), flags) })
            .map(drop)
    };
    if !oname.is_empty() {
        return raw(odir.as_raw_fd(), oname, 0);
    }
    match raw(odir.as_raw_fd(), oname, libc::AT_EMPTY_PATH) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOENT)) => {
            let p = CString::new(format!("/proc/self/fd/{}", odir.as_raw_fd())).expect("no NUL");
            raw(libc::AT_FDCWD, &p, libc::AT_SYMLINK_FOLLOW)
        }
        r => r,
    }
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

pub fn renameat2(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and C strings; renameat2 never follows symlinks.
    cvt(unsafe {
        libc::renameat2(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `fchownat` with `AT_SYMLINK_NOFOLLOW` (an empty name means `dir` itself).
pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let flags = libc::AT_SYMLINK_NOFOLLOW | empty_path(name);
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// chmod of the object an fd refers to (also an `O_PATH` fd), never a symlink's target.
pub fn fchmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    match cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            let p = proc_fd_path(fd.as_raw_fd());
            // SAFETY: valid C string; the magic link names the fd's own object.
            cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
        }
        r => r.map(drop),
    }
}

pub fn proc_fd_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// `utimensat` with `AT_SYMLINK_NOFOLLOW`; an empty name means `dir` itself.
pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2]) -> io::Result<()> {
    if name.is_empty() {
        // SAFETY: valid fd and a two-element timespec array.
        let r = cvt(unsafe { libc::futimens(dir.as_raw_fd(), times.as_ptr()) }).map(drop);
        return match r {
            // An O_PATH fd (an object kept after its name went): by the fd
            // itself (AT_EMPTY_PATH, Linux 5.8).
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
                // SAFETY: valid fd, an empty C string, a two-element array.
                cvt(unsafe {
                    libc::utimensat(
                        dir.as_raw_fd(),
                        c"".as_ptr(),
                        times.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                })
                .map(drop)
            }
            r => r,
        };
    }
    // SAFETY: valid fd, C string and a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is writable for its length.
        cvt_size(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as i64,
            )
        })
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is readable for its length.
        cvt_size(unsafe {
            libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64)
        })
    })
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    retry(|| {
        // SAFETY: valid fd.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }).map(drop)
    })
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    retry(|| {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
    })
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: valid fd.
    let r = unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    };
    cvt(r).map(drop)
}

/// `lseek`; returns `None` for `ENXIO` (no data/hole past the offset).
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> io::Result<Option<i64>> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r))
}

pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(drop)
}

/// Inode flags (`linux/fs.h`).
pub const FS_SYNC_FL: u32 = 0x8;
pub const FS_IMMUTABLE_FL: u32 = 0x10;
pub const FS_APPEND_FL: u32 = 0x20;
pub const FS_NOATIME_FL: u32 = 0x80;

/// The inode flags (`FS_IOC_GETFLAGS`: `FS_NOATIME_FL`, ...).
pub fn inode_flags(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut f: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut f) })?;
    Ok(f as u32)
}

/// Sets the inode flags (`FS_IOC_SETFLAGS`).
pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    let f = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &f) }).map(drop)
}

/// `FS_IOC_FSSETXATTR`: sets a file's extended flags from a `struct
/// fsxattr` (28 bytes).
pub fn set_fsxattr(fd: BorrowedFd<'_>, fsx: &[u8; 28]) -> io::Result<()> {
    use crate::protect::FS_IOC_FSSETXATTR;
    // SAFETY: FS_IOC_FSSETXATTR reads a 28-byte struct, which `fsx` is.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSSETXATTR as libc::Ioctl,
            fsx.as_ptr(),
        )
    })
    .map(drop)
}

/// `statx` of `name` in `dir` (`dir` itself for an empty name, also
/// `O_PATH`), never following a symlink, asking for `mask`.
fn statx_at(dir: BorrowedFd<'_>, name: &CStr, mask: u32) -> io::Result<libc::statx> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_SYMLINK_NOFOLLOW | empty_path(name);
    // SAFETY: valid fd and C string, a writable statx buffer.
    cvt(unsafe { libc::statx(dir.as_raw_fd(), name.as_ptr(), flags, mask, &mut stx) })?;
    Ok(stx)
}

/// The `statx` attributes (`STATX_ATTR_IMMUTABLE`, `STATX_ATTR_APPEND`,
/// ...) of `name` in `dir` (see `statx_at`); only those its filesystem
/// reports.
pub fn stat_attributes(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<u64> {
    let stx = statx_at(dir, name, 0)?;
    Ok(stx.stx_attributes & stx.stx_attributes_mask)
}

/// The birth time (`statx` `STATX_BTIME`) of `name` in `dir` (see
/// `statx_at`); `None` where the filesystem keeps none.
pub fn birth_time(dir: BorrowedFd<'_>, name: &CStr) -> Option<std::time::SystemTime> {
    let stx = statx_at(dir, name, libc::STATX_BTIME).ok()?;
    if stx.stx_mask & libc::STATX_BTIME == 0 {
        return None;
    }
    let t = stx.stx_btime;
    let secs = std::time::Duration::from_secs(t.tv_sec.unsigned_abs());
    // Before the epoch: tv_sec negative, tv_nsec still added.
    let whole = match t.tv_sec >= 0 {
        true => std::time::UNIX_EPOCH + secs,
        false => std::time::UNIX_EPOCH - secs,
    };
    Some(whole + std::time::Duration::from_nanos(t.tv_nsec.into()))
}

/// An ioctl that fills `buf`: `FS_IOC_GETFLAGS` or `FS_IOC_FSGETXATTR`
/// only (their arguments take 4 and 28 bytes).
pub fn ioctl_read(fd: BorrowedFd<'_>, cmd: u32, buf: &mut [u8]) -> io::Result<()> {
    if buf.len() < 32 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the buffer is larger than either command's argument.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::Ioctl, buf.as_mut_ptr()) }).map(drop)
}

pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut so = src_off as i64;
    let mut d = dst_off as i64;
    retry(|| {
        // SAFETY: valid fds and pointers to local offsets.
        cvt_size(unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, len, 0)
        } as libc::ssize_t)
    })
}

/// The file handle of `name` in `dir` (`name_to_handle_at`; a final symlink
/// not followed), or of `dir` itself for an empty name: its type and bytes,
/// as the kernel's overlayfs stores in `overlay.origin`.
pub fn file_handle_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(i32, Vec<u8>)> {
    const MAX: usize = 128;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; MAX],
    }
    let mut h = Handle {
        bytes: MAX as u32,
        kind: 0,
        data: [0; MAX],
    };
    let mut mount_id: libc::c_int = 0;
    let flags = empty_path(name);
    // SAFETY: `h` has the layout of `struct file_handle` with MAX bytes of room.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            flags,
        ) as libc::c_int
    })?;
    let n = (h.bytes as usize).min(MAX);
    Ok((h.kind, h.data[..n].to_vec()))
}

/// Reads all entries of a directory (`.` and `..` excluded) as raw names,
/// with their `d_ino` and `d_type`.
pub fn read_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    read_dir_from(openat(fd, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?)
}

/// `read_dir` leaving the directory's access time alone (`openat_noatime`:
/// lower layers' directories, and listings for layerfs's own checks).
pub fn read_dir_noatime(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    read_dir_from(openat_noatime(
        fd,
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
    )?)
}

fn read_dir_from(dir: OwnedFd) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length; getdents64 fills it with dirents.
        let n = cvt_size(unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            ) as libc::ssize_t
        })?;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name
            let ino = u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"));
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let dtype = buf[off + 18];
            let name = &buf[off + 19..off + reclen];
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = &name[..len];
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino, dtype));
            }
            off += reclen;
        }
    }
    Ok(out)
}

pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

/// Raises the soft open-file limit to the hard limit (the daemon holds one fd
/// per looked-up directory and layer).
pub fn raise_nofile_limit() {
    // SAFETY: all-zero is a valid rlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: valid pointer to an rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
}

/// Sets the thread's filesystem uid/gid (used to create objects as the caller).
pub fn set_fsids(uid: u32, gid: u32) {
    // SAFETY: setfsuid/setfsgid only change this thread's fs credentials.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
    }
}

/// `open_by_handle_at` with `O_PATH`: the object a file handle names, on the
/// filesystem of `mount` (needs `CAP_DAC_READ_SEARCH`).
pub fn open_by_handle(mount: BorrowedFd<'_>, kind: i32, handle: &[u8]) -> io::Result<OwnedFd> {
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: `buf` has the layout of `struct file_handle` with its bytes.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        ) as libc::c_int
    })?;
    // SAFETY: `fd` is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopens the object an fd (possibly `O_PATH`) refers to, through its
/// `/proc/self/fd` magic link, which names that very object.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_fd_path(fd.as_raw_fd());
    let flags = (flags & !libc::O_NOFOLLOW) | libc::O_CLOEXEC;
    // SAFETY: valid C string.
    let r = cvt(unsafe { libc::open(p.as_ptr(), flags, 0) })?;
    // SAFETY: `r` is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Fills `buf` with random bytes (best effort; the kernel's pool).
pub fn getrandom(buf: &mut [u8]) {
    // SAFETY: `buf` is writable for its length.
    unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
}

/// An all-zero `stat` (for tests and defaults).
pub fn zeroed_stat() -> Stat {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    unsafe { std::mem::zeroed() }
}

/// `umount2`, lazily (`MNT_DETACH`) if asked.
pub fn umount(path: &std::path::Path, detach: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    cvt(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
}

/// Returns free heap memory to the system (glibc `malloc_trim`).
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases unused heap pages.
    unsafe { libc::malloc_trim(0) };
}
