//! Extended attributes of objects inside a layer.
//!
//! An object is named either by an fd opened on it (directories, open files)
//! or by a directory fd plus one name component. The latter goes through
//! `/proc/self/fd/N/NAME` with the `l*xattr` calls: the magic link resolves to
//! the directory itself and the `l` variants never follow a final symlink.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use std::sync::atomic::{AtomicBool, Ordering};

use super::{cvt, cvt_size, proc_fd_path};

// The `*xattrat` system calls (Linux 6.13): one call, no /proc walk.
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;
static NO_XATTRAT: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Runs an `*xattrat` call; `None` when the kernel lacks it (then the
/// caller uses the /proc path).
fn at_call(f: impl FnOnce() -> libc::c_long) -> Option<io::Result<usize>> {
    if NO_XATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    let r = f();
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            NO_XATTRAT.store(true, Ordering::Relaxed);
            return None;
        }
        return Some(Err(e));
    }
    Some(Ok(r as usize))
}

/// Which object an xattr call applies to.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// An fd on the object itself (may be `O_PATH`).
    Fd(BorrowedFd<'a>),
    /// A name in a directory; never followed if it is a symlink.
    At(BorrowedFd<'a>, &'a CStr),
}

enum Resolved {
    Fd(i32),
    Path(CString, bool),
}

impl Target<'_> {
    fn resolve(self) -> Resolved {
        match self {
            Target::Fd(fd) => Resolved::Fd(fd.as_raw_fd()),
            Target::At(dir, name) => {
                let mut p = proc_fd_path(dir.as_raw_fd()).into_bytes();
                p.push(b'/');
                p.extend_from_slice(name.to_bytes());
                Resolved::Path(CString::new(p).expect("no NUL"), true)
            }
        }
    }
}

fn is_ebadf(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADF)
}

/// Calls `f` on the fd, or on its `/proc` path when the fd is `O_PATH`.
fn with_target<T>(t: Target<'_>, mut f: impl FnMut(&Resolved) -> io::Result<T>) -> io::Result<T> {
    let r = t.resolve();
    match (f(&r), &r) {
        (Err(e), Resolved::Fd(fd)) if is_ebadf(&e) => f(&Resolved::Path(proc_fd_path(*fd), false)),
        (res, _) => res,
    }
}

/// Reads an xattr value; `Ok(None)` when it does not exist.
pub fn get(t: Target<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        let at = match t {
            Target::At(dir, file) => at_call(|| {
                let mut args = XattrArgs {
                    value: buf.as_mut_ptr() as u64,
                    size: buf.len() as u32,
                    flags: 0,
                };
                // SAFETY: valid fd and C strings; `args` points at a buffer writable for `size` bytes.
                unsafe {
                    libc::syscall(
                        SYS_GETXATTRAT,
                        dir.as_raw_fd(),
                        file.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        name.as_ptr(),
                        &mut args as *mut XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                }
            }),
            Target::Fd(_) => None,
        };
        let r = at.unwrap_or_else(|| {
            with_target(t, |r| {
                // SAFETY: valid C strings and a buffer writable for its length.
                cvt_size(unsafe {
                    match r {
                        Resolved::Fd(fd) => {
                            libc::fgetxattr(*fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                        }
                        Resolved::Path(p, true) => libc::lgetxattr(
                            p.as_ptr(),
                            name.as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        ),
                        Resolved::Path(p, false) => libc::getxattr(
                            p.as_ptr(),
                            name.as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        ),
                    }
                })
            })
        });
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ENODATA) => return Ok(None),
                Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 16, 0),
                _ => return Err(e),
            },
        }
    }
}

/// Lists xattr names (raw, without the trailing NULs).
pub fn list(t: Target<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        let at = match t {
            // SAFETY: valid fd and C string; the buffer is writable for its length.
            Target::At(dir, file) => at_call(|| unsafe {
                libc::syscall(
                    SYS_LISTXATTRAT,
                    dir.as_raw_fd(),
                    file.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            }),
            Target::Fd(_) => None,
        };
        let r = at.unwrap_or_else(|| {
            with_target(t, |r| {
                // SAFETY: valid C strings and a buffer writable for its length.
                cvt_size(unsafe {
                    match r {
                        Resolved::Fd(fd) => {
                            libc::flistxattr(*fd, buf.as_mut_ptr().cast(), buf.len())
                        }
                        Resolved::Path(p, true) => {
                            libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                        }
                        Resolved::Path(p, false) => {
                            libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                        }
                    }
                })
            })
        });
        match r {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 => {
                buf.resize(buf.len() * 16, 0)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
}

pub fn set(t: Target<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    if let Target::At(dir, file) = t {
        let args = XattrArgs {
            value: value.as_ptr() as u64,
            size: value.len() as u32,
            flags: flags as u32,
        };
        // SAFETY: valid fd and C strings; `args` points at `size` readable bytes.
        let r = at_call(|| unsafe {
            libc::syscall(
                SYS_SETXATTRAT,
                dir.as_raw_fd(),
                file.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
                &args as *const XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        });
        if let Some(r) = r {
            return r.map(drop);
        }
    }
    with_target(t, |r| {
        // SAFETY: valid C strings and a value readable for its length.
        cvt(unsafe {
            match r {
                Resolved::Fd(fd) => libc::fsetxattr(
                    *fd,
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                ),
                Resolved::Path(p, true) => libc::lsetxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                ),
                Resolved::Path(p, false) => libc::setxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                ),
            }
        })
        .map(drop)
    })
}

pub fn remove(t: Target<'_>, name: &CStr) -> io::Result<()> {
    if let Target::At(dir, file) = t {
        // SAFETY: valid fd and C strings.
        let r = at_call(|| unsafe {
            libc::syscall(
                SYS_REMOVEXATTRAT,
                dir.as_raw_fd(),
                file.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
            )
        });
        if let Some(r) = r {
            return r.map(drop);
        }
    }
    with_target(t, |r| {
        // SAFETY: valid C strings.
        cvt(unsafe {
            match r {
                Resolved::Fd(fd) => libc::fremovexattr(*fd, name.as_ptr()),
                Resolved::Path(p, true) => libc::lremovexattr(p.as_ptr(), name.as_ptr()),
                Resolved::Path(p, false) => libc::removexattr(p.as_ptr(), name.as_ptr()),
            }
        })
        .map(drop)
    })
}

/// A C string for an xattr name given as raw bytes.
pub fn name(bytes: &[u8]) -> io::Result<CString> {
    super::cstr(std::ffi::OsStr::from_bytes(bytes))
}
