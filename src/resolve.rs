//! Name resolution across layers (SPEC §2), the way the kernel's
//! `ovl_lookup` does it: walk the parent's contributing directories top
//! down, stop at a whiteout, at a non-directory, or below an opaque
//! directory; directories found on the way merge.

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::inode::{DirLayer, Loc};
use crate::layer::Stack;
use crate::sys::{self, Stat, xattr};
use crate::whiteout::{self, Opaque};

/// What a name resolves to in a merged directory.
pub enum Resolved {
    /// Not there, or whited out.
    Absent,
    /// A (possibly merged) directory.
    Dir {
        loc: Loc,
        dirs: Vec<DirLayer>,
        st: Stat,
    },
    /// A file, symlink or special file: only its topmost entry counts.
    NonDir { loc: Loc, st: Stat },
}

impl Resolved {
    pub fn exists(&self) -> bool {
        !matches!(self, Resolved::Absent)
    }
}

/// How one layer's entry for a name looks.
enum Entry {
    Missing,
    /// Whited out here (kernel whiteout, xattr whiteout, or OCI marker).
    Whiteout,
    Found(Stat),
}

fn entry_in(stack: &Stack, dl: &DirLayer, name: &CStr) -> Result<Entry> {
    let lower = stack.is_lower(dl.layer);
    if lower && whiteout::is_oci_marker(name.to_bytes()) {
        return Ok(Entry::Missing);
    }
    match sys::fstatat(dl.fd.as_fd(), name) {
        Ok(st) if whiteout::is_whiteout_stat(&st) => Ok(Entry::Whiteout),
        Ok(st)
            if dl.opaque == Opaque::XattrWhiteouts && is_xattr_whiteout(stack, dl, name, &st)? =>
        {
            Ok(Entry::Whiteout)
        }
        Ok(st) => Ok(Entry::Found(st)),
        Err(e) if crate::error::is_enoent(&e) => {
            if lower && oci_whiteout_exists(dl, name)? {
                Ok(Entry::Whiteout)
            } else {
                Ok(Entry::Missing)
            }
        }
        Err(e) => Err(e).ctx(|| format!("lookup {:?} in layer {}", name, dl.layer)),
    }
}

fn is_xattr_whiteout(stack: &Stack, dl: &DirLayer, name: &CStr, st: &Stat) -> Result<bool> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size != 0 {
        return Ok(false);
    }
    let v = xattr::get(
        xattr::Target::At(dl.fd.as_fd(), name),
        &stack.xname("whiteout"),
    )
    .ctx(|| format!("read whiteout xattr of {name:?}"))?;
    Ok(v.is_some())
}

/// Does `.wh.NAME` exist in this (lower) directory?
fn oci_whiteout_exists(dl: &DirLayer, name: &CStr) -> Result<bool> {
    let mut wh = whiteout::OCI_WH_PREFIX.to_vec();
    wh.extend_from_slice(name.to_bytes());
    if wh.len() > 255 {
        return Ok(false);
    }
    let c = CString::new(wh).map_err(|_| Error::new(libc::EINVAL, "NUL in name"))?;
    match sys::fstatat(dl.fd.as_fd(), &c) {
        Ok(_) => Ok(true),
        Err(e) if crate::error::is_enoent(&e) => Ok(false),
        Err(e) => Err(e).ctx(|| format!("lookup {c:?}")),
    }
}

/// Opens a directory found in a layer and reads whether it is opaque.
pub fn open_dir_layer(
    stack: &Stack,
    layer: usize,
    parent: &DirLayer,
    name: &CStr,
) -> Result<DirLayer> {
    let fd = sys::open_dir_at(parent.fd.as_fd(), name).ctx(|| format!("open dir {name:?}"))?;
    let opaque = dir_opaque(stack, layer, &fd)?;
    Ok(DirLayer {
        layer,
        fd: Arc::new(fd),
        opaque,
    })
}

/// The opaque state of a directory in a layer: the private xattr, or (in a
/// lower) an OCI `.wh..wh..opq` marker inside it.
pub fn dir_opaque(stack: &Stack, layer: usize, fd: &std::os::fd::OwnedFd) -> Result<Opaque> {
    let v = xattr::get(xattr::Target::Fd(fd.as_fd()), &stack.xname("opaque"))
        .ctx(|| "read opaque xattr".to_string())?;
    let o = Opaque::from_value(v.as_deref());
    if o == Opaque::No && stack.is_lower(layer) && sys::fstatat(fd.as_fd(), c".wh..wh..opq").is_ok()
    {
        return Ok(Opaque::Yes);
    }
    Ok(o)
}

/// Resolves `name` in the merged directory made of `parent_dirs`.
///
/// A directory carrying `overlay.redirect` (a directory renamed by the
/// kernel with `redirect_dir=on`) continues the merge in the layers below
/// it at the redirected path: relative to the same parent, or absolute from
/// the overlay root.
pub fn lookup(stack: &Stack, parent_dirs: &[DirLayer], name: &CStr) -> Result<Resolved> {
    let mut found: Option<(Loc, Stat)> = None;
    let mut dirs: Vec<DirLayer> = Vec::new();
    let mut candidates: Vec<DirLayer> = parent_dirs.to_vec();
    let mut cur: CString = name.to_owned();
    let mut i = 0;
    while i < candidates.len() {
        let dl = candidates[i].clone();
        i += 1;
        let st = match entry_in(stack, &dl, &cur)? {
            Entry::Missing => continue,
            Entry::Whiteout => break,
            Entry::Found(st) => st,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            if found.is_none() {
                let loc = Loc {
                    layer: dl.layer,
                    dir: dl.fd.clone(),
                    name: cur,
                };
                return Ok(Resolved::NonDir { loc, st });
            }
            break;
        }
        let sub = open_dir_layer(stack, dl.layer, &dl, &cur)?;
        let opaque = sub.opaque == Opaque::Yes;
        let redirect = if opaque {
            None
        } else {
            redirect_of(stack, &sub)?
        };
        if found.is_none() {
            found = Some((
                Loc {
                    layer: dl.layer,
                    dir: dl.fd.clone(),
                    name: cur.clone(),
                },
                st,
            ));
        }
        dirs.push(sub);
        if opaque || (stack.is_lower(dl.layer) && oci_whiteout_exists(&dl, &cur)?) {
            break;
        }
        if let Some(target) = redirect {
            let (below, last) = redirect_target(stack, parent_dirs, dl.layer, &target)?;
            candidates = below;
            cur = last;
            i = 0;
        }
    }
    Ok(match found {
        Some((loc, st)) => Resolved::Dir { loc, dirs, st },
        None => Resolved::Absent,
    })
}

fn redirect_of(stack: &Stack, d: &DirLayer) -> Result<Option<Vec<u8>>> {
    xattr::get(xattr::Target::Fd(d.fd.as_fd()), &stack.xname("redirect"))
        .ctx(|| "read redirect xattr".into())
}

/// Where a redirected directory found in layer `layer` continues: the
/// directories (in layers below `layer`) holding the last component, and
/// that component.
fn redirect_target(
    stack: &Stack,
    parent_dirs: &[DirLayer],
    layer: usize,
    target: &[u8],
) -> Result<(Vec<DirLayer>, CString)> {
    let bad = || {
        Error::new(
            libc::EIO,
            format!(
                "invalid overlay.redirect {:?}",
                String::from_utf8_lossy(target)
            ),
        )
    };
    let below = |v: &[DirLayer]| {
        v.iter()
            .filter(|d| d.layer > layer)
            .cloned()
            .collect::<Vec<_>>()
    };
    let Some(abs) = target.strip_prefix(b"/") else {
        let c = CString::new(target).map_err(|_| bad())?;
        if !crate::layer::valid_name(&c) {
            return Err(bad());
        }
        return Ok((below(parent_dirs), c));
    };
    let comps: Vec<&[u8]> = abs
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let (last, path) = comps.split_last().ok_or_else(bad)?;
    let mut dirs = below(&root_dirs(stack)?);
    for comp in path {
        let c = CString::new(*comp).map_err(|_| bad())?;
        if !crate::layer::valid_name(&c) {
            return Err(bad());
        }
        dirs = match lookup(stack, &dirs, &c)? {
            Resolved::Dir { dirs, .. } => dirs,
            _ => Vec::new(),
        };
    }
    let c = CString::new(*last).map_err(|_| bad())?;
    if !crate::layer::valid_name(&c) {
        return Err(bad());
    }
    Ok((dirs, c))
}

/// The root's contributing directories: every layer's root.
pub fn root_dirs(stack: &Stack) -> Result<Vec<DirLayer>> {
    stack
        .layers
        .iter()
        .map(|l| {
            let o = xattr::get(xattr::Target::Fd(l.root.as_fd()), &stack.xname("opaque"))
                .ctx(|| "read root opaque xattr".into())?;
            let opaque = match Opaque::from_value(o.as_deref()) {
                Opaque::XattrWhiteouts => Opaque::XattrWhiteouts,
                _ => Opaque::No,
            };
            Ok(DirLayer {
                layer: l.index,
                fd: l.root.clone(),
                opaque,
            })
        })
        .collect()
}

/// The inode number a resolved object reports (SPEC §4): the real inode of
/// its topmost entry, except that a copied-up object reports its origin's.
pub fn ino_of(stack: &Stack, r: &Resolved) -> Result<u64> {
    match r {
        Resolved::Absent => Err(Error::new(libc::ENOENT, "no such entry")),
        Resolved::NonDir { loc, st } => {
            if stack.is_upper(loc.layer)
                && let Some(o) = origin_at(stack, loc)?
                && let Some(ino) = stack.origin_ino(&o, false)
            {
                return Ok(ino);
            }
            Ok(stack.map_ino(loc.layer, st.st_ino))
        }
        Resolved::Dir { loc, dirs, st } => {
            if stack.is_upper(loc.layer)
                && let Some(o) = origin_at(stack, loc)?
            {
                if let Some(below) = dirs.get(1) {
                    let bst = sys::fstat(below.fd.as_fd()).ctx(|| "stat lower dir".into())?;
                    return Ok(stack.map_ino(below.layer, bst.st_ino));
                }
                if let Some(ino) = stack.origin_ino(&o, true) {
                    return Ok(ino);
                }
            }
            Ok(stack.map_ino(loc.layer, st.st_ino))
        }
    }
}

fn origin_at(stack: &Stack, loc: &Loc) -> Result<Option<Vec<u8>>> {
    xattr::get(
        xattr::Target::At(loc.dir.as_fd(), &loc.name),
        &stack.xname("origin"),
    )
    .ctx(|| format!("read origin of {:?}", loc.name))
}
