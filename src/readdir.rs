//! Merged directory listings (SPEC §3).
//!
//! A listing is sorted by entry offset, a hash of the name (`cookie`) that
//! is valid in any listing of the directory, so a listing read while the
//! directory changes (`rm -rf`) resumes after the right name; the core keeps
//! recent listings per entry version (`OverlayFs::readdir`). Each name
//! appears once, with the type of its topmost entry; whiteouts, OCI markers
//! in lowers and names they hide are left out; `d_ino` equals the `st_ino`
//! a lookup reports.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::AsFd;

use crate::error::{Context, Result};
use crate::inode::DirLayer;
use crate::layer::Stack;
use crate::resolve;
use crate::sys::{self, xattr};
use crate::whiteout::{self, Opaque};

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// `S_IFMT` bits of the topmost entry.
    pub fmt: u32,
    /// The entry's directory offset (`d_off`: where the listing resumes
    /// after it), see `cookie`.
    pub off: u64,
}

/// The first offset of named entries: 1 and 2 are `.` and `..`.
pub const FIRST_COOKIE: u64 = 3;

/// A name's directory offset: a hash of the name, so that an entry has the
/// same offset in every listing of its directory (as on ext4), whatever
/// else was added or removed. Listings are sorted by it. The kernel's
/// cache of a directory stream may be filled from several listings; with
/// offsets that name entries rather than count them, the pieces fit
/// together. 62 bits, so that two names of a directory share an offset
/// practically never: when they do, a caller whose buffer fills between
/// them resumes after the offset and misses the second (layerfs never
/// splits such a run across its own replies, see `fuse.rs`; 31-bit offsets
/// made that a few-percent event on directories of thousands of entries).
/// The cost: 32-bit programs built without large-file support get
/// EOVERFLOW from `readdir`. The hash key is random per daemon, so names
/// cannot be crafted to collide.
pub fn cookie(name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let h = KEY.get_or_init(std::hash::RandomState::new).hash_one(name);
    FIRST_COOKIE + h % ((1 << 62) - FIRST_COOKIE)
}

/// Sorts a listing into offset order.
pub fn sort(list: &mut [DirEntry]) {
    list.sort_unstable_by(|a, b| a.off.cmp(&b.off).then_with(|| a.name.cmp(&b.name)));
}

fn fmt_of_dtype(d: u8) -> Option<u32> {
    Some(match d {
        libc::DT_REG => libc::S_IFREG,
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_CHR => libc::S_IFCHR,
        _ => return None,
    })
}

/// Lists a merged directory made of `dirs` (top to bottom) for layerfs's
/// own checks (is it empty?): no layer's directory has its access time
/// touched, as the kernel's overlay reads its layers with `O_NOATIME`.
pub fn list(stack: &Stack, dirs: &[DirLayer]) -> Result<Vec<DirEntry>> {
    Ok(merged(stack, dirs, false)?.0)
}

/// Lists a merged directory for a caller reading it, and says whether the
/// directory is an upper-only one marked `overlay.impure` none of whose
/// entries reports an inode number other than its own: the mark is no
/// longer needed (the kernel then drops it). The upper directory's access
/// time moves as a read of it moves it, as the kernel's overlay passes a
/// reader's access on to the upper directory.
pub fn list_noting_impure(stack: &Stack, dirs: &[DirLayer]) -> Result<(Vec<DirEntry>, bool)> {
    merged(stack, dirs, true)
}

fn merged(stack: &Stack, dirs: &[DirLayer], read: bool) -> Result<(Vec<DirEntry>, bool)> {
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut out = Vec::new();
    // Upper entries of a merged or impure upper dir may be copy-ups whose
    // inode number is their origin's: those are resolved fully.
    let impure = match dirs {
        [d] if stack.is_upper(d.layer) => is_impure(stack, d)?,
        _ => false,
    };
    let resolve_upper = match dirs.first() {
        Some(d) if stack.is_upper(d.layer) => dirs.len() > 1 || impure,
        _ => false,
    };
    let mut borrowed = false;
    for dl in dirs {
        let lower = stack.is_lower(dl.layer);
        let mut hidden_below = Vec::new();
        let entries = if lower || !read {
            sys::read_dir_noatime(dl.fd.as_fd())
        } else {
            sys::read_dir(dl.fd.as_fd())
        }
        .ctx(|| format!("read dir in layer {}", dl.layer))?;
        if lower {
            // Spares lookups in this directory their own scan for markers.
            dl.oci_markers
                .get_or_init(|| entries.iter().any(|(n, _, _)| whiteout::is_oci_marker(n)));
        }
        for (name, d_ino, dtype) in entries {
            if lower && whiteout::is_oci_marker(&name) {
                if let Some(t) = whiteout::oci_whiteout_target(&name) {
                    hidden_below.push(t.to_vec());
                }
                continue;
            }
            if seen.contains(&name) {
                continue;
            }
            seen.insert(name.clone());
            let Some(e) = entry(stack, dl, name, d_ino, dtype, resolve_upper, dirs)? else {
                continue;
            };
            borrowed |= e.ino != stack.map_ino(dl.layer, d_ino);
            out.push(e);
        }
        seen.extend(hidden_below);
    }
    Ok((out, impure && !borrowed))
}

fn is_impure(stack: &Stack, d: &DirLayer) -> Result<bool> {
    Ok(
        xattr::get(xattr::Target::Fd(d.fd.as_fd()), &stack.xname("impure"))
            .ctx(|| "read impure xattr".into())?
            .is_some(),
    )
}

/// The listing entry for one name first seen in layer `dl`, or `None` when it
/// is a whiteout.
fn entry(
    stack: &Stack,
    dl: &DirLayer,
    name: Vec<u8>,
    d_ino: u64,
    dtype: u8,
    resolve_upper: bool,
    dirs: &[DirLayer],
) -> Result<Option<DirEntry>> {
    let needs_stat = matches!(dtype, libc::DT_CHR | libc::DT_UNKNOWN)
        || (dtype == libc::DT_REG && dl.opaque == Opaque::XattrWhiteouts);
    let cname = || CString::new(name.clone()).expect("no NUL in dir entries");
    if resolve_upper && stack.is_upper(dl.layer) {
        let resolved = resolve::lookup(stack, dirs, &cname()).and_then(|r| {
            let fmt = match &r {
                resolve::Resolved::Dir { .. } => libc::S_IFDIR,
                resolve::Resolved::NonDir { st, .. } => st.st_mode & libc::S_IFMT,
                resolve::Resolved::Absent => return Ok(None),
            };
            Ok(Some((resolve::ino_of(stack, &r)?, fmt)))
        });
        match resolved {
            Ok(None) => return Ok(None),
            Ok(Some((ino, fmt))) => {
                return Ok(Some(DirEntry {
                    off: cookie(&name),
                    name,
                    ino,
                    fmt,
                }));
            }
            // An entry that cannot be resolved (a malformed redirect, say)
            // is still listed, with its own inode number, as the kernel
            // lists it; looking it up gives the error. One bad entry must
            // not make the whole directory unreadable.
            Err(e) => log::debug!(
                "listing {:?} with its own inode number: {e}",
                String::from_utf8_lossy(&name)
            ),
        }
    }
    let mut fmt = fmt_of_dtype(dtype);
    if needs_stat {
        let c = cname();
        let st = match sys::fstatat(dl.fd.as_fd(), &c) {
            Ok(st) => st,
            Err(e) if crate::error::is_enoent(&e) => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("stat {c:?}")),
        };
        if whiteout::is_whiteout_stat(&st) {
            return Ok(None);
        }
        if dl.opaque == Opaque::XattrWhiteouts
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_size == 0
            && xattr::get(
                xattr::Target::At(dl.fd.as_fd(), &c),
                &stack.xname("whiteout"),
            )
            .ctx(|| "read whiteout xattr".into())?
            .is_some()
        {
            return Ok(None);
        }
        fmt = Some(st.st_mode & libc::S_IFMT);
    }
    Ok(Some(DirEntry {
        off: cookie(&name),
        name,
        ino: stack.map_ino(dl.layer, d_ino),
        fmt: fmt.unwrap_or(libc::S_IFREG),
    }))
}
