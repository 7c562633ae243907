//! Immutable and append-only objects (`chattr +i`, `chattr +a`).
//!
//! The kernel's overlayfs gives its inode these flags from the topmost
//! real file's flags and, for an upper object, from `overlay.protattr`
//! (`i`, `a`): it records them there rather than on the upper file, which
//! the overlay itself must still be able to change (copy-up, renames,
//! whiteouts). The VFS then refuses changes of such an inode with `EPERM`.
//! A FUSE inode carries no such flags, so layerfs refuses the same
//! requests itself, before any copy-up:
//! - immutable: opening for writing or truncation, chmod, chown, truncate,
//!   setting times (touching to now too), setting or removing xattrs,
//!   unlinking, renaming or linking it, fallocate, copy_file_range into it;
//!   for a directory also creating, removing or renaming entries in it;
//! - append-only: the same, except opening for writing with `O_APPEND`
//!   (without `O_TRUNC`), touching times to now, fallocate that keeps the
//!   size, and creating entries in a directory.
//!
//! Setting the flags through the mount (`FS_IOC_SETFLAGS`,
//! `FS_IOC_FSSETXATTR`, what `chattr` uses) copies the object up and
//! records `+i`/`+a` in `overlay.protattr`, the other flags on the upper
//! file, as the kernel's `ovl_fileattr_set`. As on the kernel, the flags
//! are read once per object (here: at its first change; every later change
//! of them goes through its one node) and changes made behind the mount
//! are not seen meanwhile. An upper file's own flags are not
//! read: its filesystem refuses what they forbid when layerfs makes the
//! change there.
//! Not enforced (the kernel checks them on its FUSE inode, before asking
//! layerfs): `access(W_OK)` answers 0, a shared writable `mmap` and
//! `fcntl(F_SETFL)` dropping `O_APPEND` of an append-only file are
//! allowed.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use crate::error::{Context, Error, Result};
use crate::inode::{Node, NodeState};
use crate::overlay::OverlayFs;
use crate::resolve::Resolved;
use crate::sys::{self, xattr};

/// `chattr +i`: no change at all.
pub const IMMUTABLE: u8 = 1;
/// `chattr +a`: data only appended, never removed or renamed.
pub const APPEND: u8 = 2;
/// Either.
pub const ANY: u8 = IMMUTABLE | APPEND;
/// `Node::prot` holds the flags read.
pub const KNOWN: u8 = 0x80;

const STATX_ATTR_IMMUTABLE: u64 = 0x10;
const STATX_ATTR_APPEND: u64 = 0x20;

/// `FS_IOC_SETFLAGS` as the kernel sends it (declared with a long).
pub const FS_IOC_SETFLAGS: u32 = libc::FS_IOC_SETFLAGS as u32;
/// `_IOW('X', 32, struct fsxattr)`.
pub const FS_IOC_FSSETXATTR: u32 = libc::_IOW::<[u8; 28]>(b'X' as u32, 32) as u32;

const FS_XFLAG_IMMUTABLE: u32 = 0x8;
const FS_XFLAG_APPEND: u32 = 0x10;

/// The bits of `IMMUTABLE` and `APPEND` in `FS_IOC_GETFLAGS` flags
/// (`fsx = false`) or in `struct fsxattr`'s `fsx_xflags`.
pub fn flag_bits(fsx: bool) -> (u32, u32) {
    match fsx {
        false => (sys::FS_IMMUTABLE_FL, sys::FS_APPEND_FL),
        true => (FS_XFLAG_IMMUTABLE, FS_XFLAG_APPEND),
    }
}

/// An `overlay.protattr` value: `a` and `i` only, else none is taken (the
/// kernel ignores a value it does not know, with a warning).
pub fn parse_protattr(v: &[u8]) -> u8 {
    let mut p = 0;
    for c in v {
        p |= match c {
            b'a' => APPEND,
            b'i' => IMMUTABLE,
            _ => return 0,
        };
    }
    p
}

/// The `overlay.protattr` value for flags `p` (the kernel's order).
pub fn protattr_value(p: u8) -> Vec<u8> {
    let mut v = Vec::new();
    if p & APPEND != 0 {
        v.push(b'a');
    }
    if p & IMMUTABLE != 0 {
        v.push(b'i');
    }
    v
}

impl OverlayFs {
    /// `node`'s immutable and append-only flags, read at the first call:
    /// every later change of them goes through this node (all names of a
    /// file lead to it; a lower hard link's names each to their own, and
    /// a change through one copies that name up alone).
    pub(crate) fn prot(&self, node: &Node) -> u8 {
        let p = node.prot.load(Ordering::Relaxed);
        if p & KNOWN != 0 {
            return p & ANY;
        }
        let p = node.read_state(|s| self.prot_of_state(s));
        node.prot.store(p | KNOWN, Ordering::Relaxed);
        p
    }

    /// Refuses a change of `node` with `EPERM` when it has any of `flags`.
    pub(crate) fn refuse_if(&self, node: &Node, flags: u8, what: &str) -> Result<()> {
        refuse(self.prot(node), flags, what)
    }

    /// The flags of the object a name resolved to (not cached: the name
    /// may have no node).
    pub(crate) fn prot_of(&self, r: &Resolved) -> u8 {
        match r {
            Resolved::Absent => 0,
            Resolved::Dir { dirs, .. } => dirs.first().map_or(0, |d| {
                self.prot_at(self.stack.is_upper(d.layer), d.fd.as_fd(), c"")
            }),
            Resolved::NonDir { loc, .. } => {
                self.prot_at(self.stack.is_upper(loc.layer), loc.dir.as_fd(), &loc.name)
            }
        }
    }

    fn prot_of_state(&self, s: &NodeState) -> u8 {
        self.top_object(s)
            .map_or(0, |(dir, name, upper)| self.prot_at(upper, dir, name))
    }

    /// The flags of `name` in `dir` (`dir` itself for an empty name): a
    /// lower file's own; an upper file's `overlay.protattr` (see the module
    /// documentation for its own flags). A file that cannot be read counts
    /// as unflagged (the change asked for then meets the error itself).
    fn prot_at(&self, upper: bool, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> u8 {
        let mut p = 0;
        if !upper && let Ok(a) = sys::stat_attributes(dir, name) {
            if a & STATX_ATTR_IMMUTABLE != 0 {
                p |= IMMUTABLE;
            }
            if a & STATX_ATTR_APPEND != 0 {
                p |= APPEND;
            }
        }
        if upper {
            let target = match name.is_empty() {
                true => xattr::Target::Fd(dir),
                false => xattr::Target::At(dir, name),
            };
            if let Ok(Some(v)) = xattr::get(target, &self.stack.xname("protattr")) {
                let q = parse_protattr(&v);
                if q == 0 {
                    log::warn!("{name:?}: overlay.protattr {v:?} not understood: left alone");
                }
                p |= q;
            }
        }
        p
    }

    /// `FS_IOC_SETFLAGS` or `FS_IOC_FSSETXATTR` (`data`: the new flags, or
    /// the new `struct fsxattr`), as the kernel's overlayfs: the object is
    /// copied up, immutable and append-only go to `overlay.protattr` (an
    /// upper layer without xattrs refuses them with `EPERM`), the rest to
    /// the upper file (its filesystem's errors as they come).
    pub fn set_fileattr(&self, ino: u64, fh: u64, cmd: u32, data: &[u8]) -> Result<()> {
        self.writable()?;
        let fsx = cmd == FS_IOC_FSSETXATTR;
        let want_len = if fsx { 28 } else { 4 };
        if data.len() < want_len {
            return Err(Error::new(libc::EINVAL, "short ioctl argument"));
        }
        let req = u32::from_ne_bytes(data[..4].try_into().unwrap_or_default());
        let (i_bit, a_bit) = flag_bits(fsx);
        let want = (if req & i_bit != 0 { IMMUTABLE } else { 0 })
            | (if req & a_bit != 0 { APPEND } else { 0 });
        let node = self.node(ino)?;
        let before = self.prot(&node);
        let loc = self.change_loc(&node, (!node.is_dir()).then_some(fh), false)?;
        // An fd of the upper object that takes ioctls (not O_PATH).
        let fd = match node.read_state(|s| s.dirs.first().map(|d| d.fd.clone())) {
            Some(d) => sys::reopen(d.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY),
            None if loc.name.is_empty() => {
                sys::reopen(loc.dir.as_fd(), libc::O_RDONLY | libc::O_NONBLOCK)
            }
            None => sys::openat(
                loc.dir.as_fd(),
                &loc.name,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
                0,
            ),
        }
        .ctx(|| format!("open {:?} for its flags", loc.name))?;
        let name = self.stack.xname("protattr");
        let target = xattr::Target::Fd(fd.as_fd());
        if want != 0 {
            match xattr::set(target, &name, &protattr_value(want), 0) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(Error::new(
                        libc::EPERM,
                        "the upper layer takes no xattrs, which keep immutable and append-only flags",
                    ));
                }
                r => r.ctx(|| format!("set {name:?}"))?,
            }
        } else if before != 0 {
            match xattr::remove(target, &name) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENODATA)) => {}
                r => r.ctx(|| format!("remove {name:?}"))?,
            }
        }
        node.prot.store(want | KNOWN, Ordering::Relaxed);
        // The rest as asked (the kernel filled in the flags it did not
        // change from what layerfs reported), on the upper file.
        let flags = req & !(i_bit | a_bit);
        if fsx {
            let mut arg = [0u8; 28];
            arg.copy_from_slice(&data[..28]);
            arg[..4].copy_from_slice(&flags.to_ne_bytes());
            sys::set_fsxattr(fd.as_fd(), &arg).ctx(|| "set the upper file's flags".into())?;
        } else {
            sys::set_inode_flags(fd.as_fd(), flags).ctx(|| "set the upper file's flags".into())?;
        }
        if let Some(inv) = self.invalidator.get() {
            inv.inval_attr(node.ino);
        }
        Ok(())
    }
}

/// `EPERM` when `prot` has any of `flags`.
pub(crate) fn refuse(prot: u8, flags: u8, what: &str) -> Result<()> {
    if prot & flags == 0 {
        return Ok(());
    }
    let kind = if prot & flags & IMMUTABLE != 0 {
        "immutable"
    } else {
        "append-only"
    };
    Err(Error::new(libc::EPERM, format!("{what}: {kind}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protattr_values_round_trip_and_unknown_ones_count_for_nothing() {
        for p in [0, IMMUTABLE, APPEND, ANY] {
            assert_eq!(parse_protattr(&protattr_value(p)), p);
        }
        assert_eq!(protattr_value(ANY), b"ai");
        assert_eq!(parse_protattr(b"ia"), ANY);
        assert_eq!(parse_protattr(b"ix"), 0);
        assert_eq!(parse_protattr(b""), 0);
    }

    #[test]
    fn refusal_names_the_flag() {
        assert!(refuse(APPEND, IMMUTABLE, "x").is_ok());
        let e = refuse(ANY, ANY, "unlink").unwrap_err();
        assert!(e.is(libc::EPERM));
        assert!(e.to_string().contains("immutable"));
    }
}
