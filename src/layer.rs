//! The layer stack: one directory fd per layer, upper first, then the lowers
//! top to bottom. This is the only order used anywhere in layerfs.
//!
//! Also owns the mapping from an underlying inode to the inode number layerfs
//! reports: on one filesystem it is the real inode number (as the kernel's
//! overlayfs reports); layers on further filesystems get the filesystem's
//! index in the top bits (the kernel's `xino` scheme), so numbers never
//! collide.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::MountConfig;
use crate::sys;
use crate::whiteout::Private;

/// Bits left for the real inode number when layers span filesystems.
const XINO_SHIFT: u32 = 56;

pub struct Layer {
    /// Position in the stack (0 = topmost).
    pub index: usize,
    pub root: Arc<OwnedFd>,
    pub path: PathBuf,
    pub dev: u64,
    /// Index of this layer's filesystem among the stack's distinct ones.
    pub fs_index: u64,
    pub writable: bool,
}

pub struct Stack {
    pub layers: Vec<Layer>,
    /// `W/work`: where copy-ups and whiteouts are built before being linked or renamed in.
    pub work: Option<OwnedFd>,
    pub private: Private,
    /// Whether lookups follow `overlay.redirect` (`redirect_dir=nofollow`
    /// and `userxattr` do not: `EPERM`, as the kernel).
    pub follow_redirects: bool,
}

impl Stack {
    /// Opens every layer directory. The caller validated the configuration.
    pub fn open(cfg: &MountConfig) -> io::Result<Stack> {
        let mut paths: Vec<(PathBuf, bool)> = Vec::new();
        if let Some(u) = &cfg.upper {
            paths.push((u.clone(), !cfg.options.read_only));
        }
        paths.extend(cfg.lowers.iter().map(|l| (l.clone(), false)));
        let mut devs: Vec<u64> = Vec::new();
        let mut layers = Vec::new();
        for (index, (path, writable)) in paths.into_iter().enumerate() {
            let root = if writable {
                sys::open_path_dir(&path)
            } else {
                sys::open_private_lower_root(&path).or_else(|e| {
                    log::debug!(
                        "{}: no private read-only mount ({e}): opened in place",
                        path.display()
                    );
                    sys::open_lower_root(&path)
                })
            }?;
            let dev = sys::fstat(root.as_fd())?.st_dev;
            let fs_index = match devs.iter().position(|&d| d == dev) {
                Some(i) => i,
                None => {
                    devs.push(dev);
                    devs.len() - 1
                }
            } as u64;
            layers.push(Layer {
                index,
                root: Arc::new(root),
                path,
                dev,
                fs_index,
                writable,
            });
        }
        let work = match (&cfg.work, cfg.upper.is_some() && !cfg.options.read_only) {
            (Some(w), true) => Some(open_workdir(w)?),
            _ => None,
        };
        Ok(Stack {
            layers,
            work,
            private: cfg.options.private(),
            follow_redirects: cfg.options.follows_redirects(),
        })
    }

    /// The writable upper layer, if any.
    pub fn upper(&self) -> Option<&Layer> {
        self.layers.first().filter(|l| l.writable)
    }

    pub fn is_upper(&self, index: usize) -> bool {
        index == 0 && self.upper().is_some()
    }

    /// Whether `index` is a lower (read-only) layer.
    pub fn is_lower(&self, index: usize) -> bool {
        !self.layers[index].writable
    }

    /// The inode number reported for inode `ino` of layer `index`.
    pub fn map_ino(&self, index: usize, ino: u64) -> u64 {
        let fs = self.layers[index].fs_index;
        let mapped = if fs == 0 {
            ino
        } else {
            ino | (fs << XINO_SHIFT)
        };
        // 1 is FUSE's root id; no real file has it on ext4/xfs/tmpfs, but be sure.
        if mapped == 1 {
            1 | (0x7f << XINO_SHIFT)
        } else {
            mapped
        }
    }

    /// Decodes an `overlay.origin` value to the inode number of the lower
    /// object it names, if that object is found in a lower layer and is not
    /// hard-linked (the kernel's rule: hard links break on copy-up).
    pub fn origin_ino(&self, origin: &[u8], is_dir: bool) -> Option<u64> {
        let (kind, handle) = parse_origin(origin)?;
        for layer in self.layers.iter().filter(|l| !l.writable) {
            if let Ok(fd) = sys::open_by_handle(layer.root.as_fd(), kind, handle) {
                let st = sys::fstat(fd.as_fd()).ok()?;
                if is_dir || st.st_nlink == 1 {
                    return Some(self.map_ino(layer.index, st.st_ino));
                }
                return None;
            }
        }
        None
    }

    /// The private xattr name for `key`, as a C string.
    pub fn xname(&self, key: &str) -> std::ffi::CString {
        sys::xattr::name(&self.private.name(key)).expect("no NUL in private names")
    }

    pub fn work_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }
}

/// Opens (creating if needed) `W/work` and empties it: leftovers there are
/// unfinished copy-ups or whiteouts of an earlier, interrupted mount. Its
/// POSIX ACLs go, as the kernel removes them: a default ACL inherited from
/// `W` would otherwise give the objects built there (new directories and
/// files over whiteouts, copied-up directories) modes and ACLs of its own.
fn open_workdir(w: &std::path::Path) -> io::Result<OwnedFd> {
    let wfd = sys::open_path_dir(w)?;
    match sys::mkdirat(wfd.as_fd(), c"work", 0o700) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    let work = sys::open_dir_at(wfd.as_fd(), c"work")?;
    for acl in [c"system.posix_acl_default", c"system.posix_acl_access"] {
        match sys::xattr::remove(sys::xattr::Target::Fd(work.as_fd()), acl) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => {
                return Err(e);
            }
            _ => {}
        }
    }
    clean_dir(work.as_fd())?;
    Ok(work)
}

/// Removes everything inside a directory (never following symlinks).
pub fn clean_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    for (name, _, dtype) in sys::read_dir(dir)? {
        let c = sys::cstr(std::os::unix::ffi::OsStrExt::from_bytes(&name[..]))?;
        if dtype == libc::DT_DIR {
            let sub = sys::open_dir_at(dir, &c)?;
            clean_dir(sub.as_fd())?;
        }
        sys::unlinkat(dir, &c, dtype == libc::DT_DIR)?;
    }
    Ok(())
}

/// Splits an origin value `00 fb LEN FLAGS TYPE UUID[16] HANDLE...`.
fn parse_origin(v: &[u8]) -> Option<(i32, &[u8])> {
    if v.len() < 21 || v[0] != 0 || v[1] != 0xfb || v[2] as usize != v.len() {
        return None;
    }
    Some((v[4] as i32, &v[21..]))
}

/// Builds the origin value the kernel writes for lower object `name` in
/// `dir` (a final symlink not followed; `dir` itself for an empty name).
pub fn make_origin_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let (kind, handle) = sys::file_handle_at(dir, name)?;
    let len = 21 + handle.len();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&[0, 0xfb, len as u8, 0, kind as u8]);
    v.extend_from_slice(&[0u8; 16]);
    v.extend_from_slice(&handle);
    Ok(v)
}

/// A C-string view of a raw name, for `*at` calls.
pub fn cname(name: &[u8]) -> io::Result<std::ffi::CString> {
    sys::cstr(std::os::unix::ffi::OsStrExt::from_bytes(name))
}

/// An `overlay.redirect` value, as the kernel reads it: a name in the same
/// parent's lower directories, or a path from the lower layers' roots.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect<'a> {
    Relative(&'a [u8]),
    Absolute(Vec<&'a [u8]>),
}

/// Parses a redirect the way the kernel's lookup takes it; a malformed one
/// gives the errno the kernel answers for it: EINVAL for an empty value, a
/// relative one with a slash, an absolute one with an empty component
/// (`//`, a trailing `/`, `/` alone) or a NUL; EACCES for a `.` or `..`
/// component (its lookup refuses those). Used by the mount, `diff` and
/// `check` alike.
pub fn parse_redirect(v: &[u8]) -> std::result::Result<Redirect<'_>, i32> {
    let component = |c: &'_ [u8]| {
        if c.is_empty() || c.contains(&b'/') || c.contains(&0) {
            Err(libc::EINVAL)
        } else if c == b"." || c == b".." {
            Err(libc::EACCES)
        } else {
            Ok(())
        }
    };
    match v.strip_prefix(b"/") {
        None => component(v).map(|()| Redirect::Relative(v)),
        Some(abs) => {
            let comps: Vec<&[u8]> = abs.split(|&b| b == b'/').collect();
            // Shape first (EINVAL), then names (EACCES), as the kernel checks.
            if comps.iter().any(|c| c.is_empty() || c.contains(&0)) {
                return Err(libc::EINVAL);
            }
            comps.iter().try_for_each(|c| component(c))?;
            Ok(Redirect::Absolute(comps))
        }
    }
}

/// Is `name` one component that may be used relative to a layer directory?
pub fn valid_name(name: &CStr) -> bool {
    let b = name.to_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/')
}

#[cfg(test)]
mod tests {
    #[test]
    fn redirects_parse_as_the_kernel_takes_them() {
        use super::{Redirect, parse_redirect};
        assert_eq!(parse_redirect(b"a"), Ok(Redirect::Relative(b"a")));
        assert_eq!(
            parse_redirect(b"/a/b"),
            Ok(Redirect::Absolute(vec![&b"a"[..], b"b"]))
        );
        for (v, errno) in [
            (&b""[..], libc::EINVAL),
            (b"a/b", libc::EINVAL),
            (b"a/", libc::EINVAL),
            (b"/", libc::EINVAL),
            (b"/a//b", libc::EINVAL),
            (b"/a/b/", libc::EINVAL),
            (b"a\0", libc::EINVAL),
            (b".", libc::EACCES),
            (b"..", libc::EACCES),
            (b"/a/../a", libc::EACCES),
        ] {
            assert_eq!(
                parse_redirect(v),
                Err(errno),
                "{:?}",
                v.escape_ascii().to_string()
            );
        }
    }
}
