//! Name resolution across layers (SPEC §2), the way the kernel's
//! `ovl_lookup` does it: walk the parent's contributing directories top
//! down, stop at a whiteout, at a non-directory, or below an opaque
//! directory; directories found on the way merge.

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::inode::{DirLayer, Loc};
use crate::layer::{Redirect, Stack};
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
pub(crate) enum Entry {
    Missing,
    /// Whited out here (kernel whiteout, xattr whiteout, or OCI marker).
    Whiteout,
    Found(Stat),
}

pub(crate) fn entry_in(stack: &Stack, dl: &DirLayer, name: &CStr) -> Result<Entry> {
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
        Ok(st) if is_metacopy(stack, dl, name, &st)? => Err(Error::new(
            libc::EPERM,
            format!(
                "{name:?} is a metadata-only copy-up (overlay.metacopy), which layerfs does not follow"
            ),
        )),
        Ok(st) => Ok(Entry::Found(st)),
        Err(e) if crate::error::is_enoent(&e) => {
            if lower && has_oci_markers(dl)? && oci_whiteout_exists(dl, name)? {
                Ok(Entry::Whiteout)
            } else {
                Ok(Entry::Missing)
            }
        }
        Err(e) => Err(e).ctx(|| format!("lookup {:?} in layer {}", name, dl.layer)),
    }
}

/// A kernel metadata-only copy-up: a sparse stub without data blocks that
/// carries `overlay.metacopy` (only such files are checked, so ordinary
/// lookups cost no xattr read). Like the kernel without `metacopy=on`,
/// layerfs refuses these rather than show the stub's zeros as data.
fn is_metacopy(stack: &Stack, dl: &DirLayer, name: &CStr, st: &Stat) -> Result<bool> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_blocks != 0 || st.st_size == 0 {
        return Ok(false);
    }
    let v = xattr::get(
        xattr::Target::At(dl.fd.as_fd(), name),
        &stack.xname("metacopy"),
    )
    .ctx(|| format!("read metacopy xattr of {name:?}"))?;
    Ok(v.is_some())
}

/// Does this lower directory hold any `.wh.` name (scanned once)?
fn has_oci_markers(dl: &DirLayer) -> Result<bool> {
    if let Some(&v) = dl.oci_markers.get() {
        return Ok(v);
    }
    let entries =
        sys::read_dir_noatime(dl.fd.as_fd()).ctx(|| "scan dir for .wh. markers".into())?;
    let any = entries.iter().any(|(n, _, _)| whiteout::is_oci_marker(n));
    Ok(*dl.oci_markers.get_or_init(|| any))
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

/// A directory found in a layer: opened, with its opaque state and its
/// `overlay.redirect` target, if any.
pub struct FoundDir {
    pub dir: DirLayer,
    pub redirect: Option<Vec<u8>>,
}

/// Opens a directory found in a layer and reads its overlay xattrs (one
/// `listxattr` when it has none, as nearly all directories).
pub fn open_dir_layer(
    stack: &Stack,
    layer: usize,
    parent: &DirLayer,
    name: &CStr,
) -> Result<FoundDir> {
    let fd = if stack.is_lower(layer) {
        sys::open_lower_dir_at(parent.fd.as_fd(), name)
    } else {
        sys::open_dir_at(parent.fd.as_fd(), name)
    }
    .ctx(|| format!("open dir {name:?}"))?;
    let (opaque, redirect) = dir_xattrs(stack, layer, &fd)?;
    Ok(FoundDir {
        dir: DirLayer::new(layer, Arc::new(fd), opaque),
        redirect,
    })
}

/// The opaque state of a directory in a layer (the private xattr, or in a
/// lower an OCI `.wh..wh..opq` marker inside it) and its redirect.
pub fn dir_xattrs(
    stack: &Stack,
    layer: usize,
    fd: &std::os::fd::OwnedFd,
) -> Result<(Opaque, Option<Vec<u8>>)> {
    let target = xattr::Target::Fd(fd.as_fd());
    let names = xattr::list(target).ctx(|| "list dir xattrs".into())?;
    let (opq, redir) = (stack.private.name("opaque"), stack.private.name("redirect"));
    let get = |n: &[u8]| -> Result<Option<Vec<u8>>> {
        if !names.iter().any(|x| x == n) {
            return Ok(None);
        }
        xattr::get(target, &xattr::name(n)?).ctx(|| "read dir xattr".into())
    };
    let mut opaque = Opaque::from_value(get(&opq)?.as_deref());
    if opaque == Opaque::No
        && stack.is_lower(layer)
        && sys::fstatat(fd.as_fd(), c".wh..wh..opq").is_ok()
    {
        opaque = Opaque::Yes;
    }
    let redirect = if opaque == Opaque::Yes {
        None
    } else {
        get(&redir)?
    };
    Ok((opaque, redirect))
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
                    name: cur.into(),
                };
                return Ok(Resolved::NonDir { loc, st });
            }
            break;
        }
        let FoundDir { dir: sub, redirect } = open_dir_layer(stack, dl.layer, &dl, &cur)?;
        let opaque = sub.opaque == Opaque::Yes;
        if found.is_none() {
            found = Some((
                Loc {
                    layer: dl.layer,
                    dir: dl.fd.clone(),
                    name: cur.as_c_str().into(),
                },
                st,
            ));
        }
        dirs.push(sub);
        if opaque
            || (stack.is_lower(dl.layer)
                && has_oci_markers(&dl)?
                && oci_whiteout_exists(&dl, &cur)?)
        {
            break;
        }
        if let Some(target) = redirect {
            let parsed = crate::layer::parse_redirect(&target)
                .map_err(|errno| invalid_redirect(errno, &target))?;
            // Not followed (redirect_dir=nofollow, userxattr): refused when
            // there are layers below to search, as the kernel refuses it (an
            // absolute redirect searches from the root, which has them all).
            if !stack.follow_redirects {
                let more = match parsed {
                    Redirect::Absolute(_) => stack.layers.len() > dl.layer + 1,
                    Redirect::Relative(_) => candidates.iter().any(|d| d.layer > dl.layer),
                };
                if more {
                    return Err(Error::new(
                        libc::EPERM,
                        format!(
                            "not following overlay.redirect {:?} of {cur:?} \
                             (redirect_dir=nofollow, or userxattr)",
                            String::from_utf8_lossy(&target)
                        ),
                    ));
                }
            }
            // A relative redirect names a sibling in the directories being
            // searched now: the parent's, or those an absolute redirect
            // above led to (the kernel's lookup path so far).
            let (below, last) = redirect_target(stack, &candidates, dl.layer, parsed)?;
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

/// Where a redirected directory found in layer `layer` continues: the
/// directories (in layers below `layer`) holding the last component, and
/// that component. A relative redirect names a sibling in `searched`, the
/// directories the lookup was searching; an absolute one a path from the
/// roots.
fn redirect_target(
    stack: &Stack,
    searched: &[DirLayer],
    layer: usize,
    target: Redirect<'_>,
) -> Result<(Vec<DirLayer>, CString)> {
    let cstring = |c: &[u8]| CString::new(c).expect("NUL refused by parse_redirect");
    let below = |v: &[DirLayer]| {
        v.iter()
            .filter(|d| d.layer > layer)
            .cloned()
            .collect::<Vec<_>>()
    };
    match target {
        Redirect::Relative(name) => Ok((below(searched), cstring(name))),
        Redirect::Absolute(comps) => {
            let (last, path) = comps.split_last().expect("at least one component");
            let mut dirs = below(&root_dirs(stack)?);
            for comp in path {
                dirs = match lookup(stack, &dirs, &cstring(comp))? {
                    Resolved::Dir { dirs, .. } => dirs,
                    _ => Vec::new(),
                };
            }
            Ok((dirs, cstring(last)))
        }
    }
}

fn invalid_redirect(errno: i32, target: &[u8]) -> Error {
    Error::new(
        errno,
        format!(
            "invalid overlay.redirect {:?}",
            String::from_utf8_lossy(target)
        ),
    )
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
            Ok(DirLayer::new(l.index, l.root.clone(), opaque))
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
            if stack.is_upper(loc.layer) {
                // A merged directory reports the directory below it, with
                // or without an origin: the kernel records a missing one at
                // lookup (an upper dir made outside the overlay).
                if let Some(below) = dirs.get(1) {
                    let bst = sys::fstat(below.fd.as_fd()).ctx(|| "stat lower dir".into())?;
                    return Ok(stack.map_ino(below.layer, bst.st_ino));
                }
                if let Some(o) = origin_at(stack, loc)?
                    && let Some(ino) = stack.origin_ino(&o, true)
                {
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
