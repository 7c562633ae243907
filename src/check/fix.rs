//! `layerfs check --fix`: applies the [`Repair`]s of the findings in the
//! upper, converting what other tools left there into the kernel's format.
//!
//! Each repair re-reads the entry it is about (a finding may be stale) and
//! changes one entry atomically: a whiteout is built under a temporary name
//! in its own directory and renamed into place; an xattr is set before the
//! marker or xattr that it replaces is removed. Opaque markers are
//! converted first, so that a whiteout made redundant by one is removed
//! only once its directory really is opaque. Lowers are never opened for
//! writing.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::scan::lookup;
use super::xattrs::parse_override_stat;
use super::{CheckOptions, Finding, Kind, Layer, Redundant, Repair};
use crate::error::{Context, Error, Result, is_enoent};
use crate::layer::cname;
use crate::sys::{self, Stat, xattr};
use crate::whiteout::Private;

/// The outcome of one repair.
#[derive(Debug)]
pub struct Fixed {
    pub kind: Kind,
    pub path: Vec<u8>,
    /// What was done, or why nothing was.
    pub result: Result<String>,
}

/// Applies every repair of `findings` (upper only), opaque markers first.
pub fn repair(opts: &CheckOptions, findings: &[Finding]) -> Vec<Fixed> {
    let (root, lowers) = match open_layers(opts) {
        Ok(fds) => fds,
        Err(e) => {
            return vec![Fixed {
                kind: Kind::NotADirectory,
                path: b"/".to_vec(),
                result: Err(e),
            }];
        }
    };
    let ctx = Ctx {
        root: root.as_fd(),
        lowers,
        private: &opts.private,
    };
    let first = |r: &Repair| matches!(r, Repair::OciOpaque | Repair::FuseOpaque { .. });
    let upper = findings
        .iter()
        .filter(|f| f.layer == Layer::Upper)
        .filter_map(|f| f.repair.as_ref().map(|r| (f, r)));
    let (phase1, phase2): (Vec<_>, Vec<_>) = upper.partition(|(_, r)| first(r));
    phase1
        .into_iter()
        .chain(phase2)
        .map(|(f, r)| Fixed {
            kind: f.kind,
            path: f.path.clone(),
            result: ctx.apply(&f.path, r),
        })
        .collect()
}

/// The upper's root, and the lowers' (to look up only).
fn open_layers(opts: &CheckOptions) -> Result<(OwnedFd, Vec<OwnedFd>)> {
    let open = |what: &str, p: &std::path::Path| {
        sys::open_path_dir(p).ctx(|| format!("open {what} {}", p.display()))
    };
    let root = open("upper", &opts.upper)?;
    let lowers = opts.lowers.iter().map(|l| open("lower", l));
    Ok((root, lowers.collect::<Result<_>>()?))
}

struct Ctx<'a> {
    root: BorrowedFd<'a>,
    /// Opened only to look up (`O_RDONLY`), never written.
    lowers: Vec<OwnedFd>,
    private: &'a Private,
}

/// An object of the upper: its parent directory and its name (empty for
/// the root itself).
struct Obj<'a> {
    parent: Option<OwnedFd>,
    root: BorrowedFd<'a>,
    name: CString,
}

impl Obj<'_> {
    fn dir(&self) -> BorrowedFd<'_> {
        self.parent.as_ref().map_or(self.root, |p| p.as_fd())
    }

    fn target(&self) -> xattr::Target<'_> {
        if self.name.is_empty() {
            xattr::Target::Fd(self.dir())
        } else {
            xattr::Target::At(self.dir(), &self.name)
        }
    }

    fn stat(&self) -> Result<Stat> {
        sys::fstatat(self.dir(), &self.name).ctx(|| "stat".into())
    }
}

fn fail(what: &str) -> Error {
    Error::new(libc::ESTALE, what)
}

impl Ctx<'_> {
    /// Opens the parent of `path` (from the upper's root), one component
    /// at a time, never through a symlink.
    fn obj(&self, path: &[u8]) -> Result<Obj<'_>> {
        let comps: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Ok(Obj {
                parent: None,
                root: self.root,
                name: CString::default(),
            });
        };
        let mut parent: Option<OwnedFd> = None;
        for c in dirs {
            let at = parent.as_ref().map_or(self.root, |p| p.as_fd());
            parent = Some(sys::open_dir_at(at, &cname(c)?).ctx(|| "open parent".into())?);
        }
        Ok(Obj {
            parent,
            root: self.root,
            name: cname(last)?,
        })
    }

    fn apply(&self, path: &[u8], r: &Repair) -> Result<String> {
        let obj = self.obj(path)?;
        match r {
            Repair::RemoveWhiteout { because } => self.remove_whiteout(&obj, because),
            Repair::OciWhiteout { nothing_below } => {
                self.oci_whiteout(&obj, nothing_below.as_ref())
            }
            Repair::OciOpaque => self.oci_opaque(&obj),
            Repair::FuseOpaque { xattr } => self.fuse_opaque(&obj, xattr),
            Repair::RemoveXattr { xattr } => remove_xattr(&obj, xattr),
            Repair::OverrideStat { xattr } => override_stat(&obj, xattr),
            Repair::CharWhiteout => char_whiteout(&obj),
        }
    }

    fn is_opaque(&self, t: xattr::Target<'_>) -> Result<bool> {
        let v = xattr::get(t, &xattr::name(&self.private.name("opaque"))?)
            .ctx(|| "read opaque xattr".into())?;
        Ok(v.as_deref() == Some(b"y"))
    }

    /// Sets the private opaque xattr (before anything it replaces goes).
    fn set_opaque(&self, t: xattr::Target<'_>) -> Result<()> {
        if !self.is_opaque(t)? {
            let name = xattr::name(&self.private.name("opaque"))?;
            xattr::set(t, &name, b"y", 0).ctx(|| "set opaque xattr".into())?;
        }
        Ok(())
    }

    /// Does `why` still hold: is the directory opaque now, does no lower
    /// have a directory at the path?
    fn still_nothing_below(&self, why: &Redundant) -> Result<bool> {
        match why {
            Redundant::Opaque(dir) => self.is_opaque(self.obj(dir)?.target()),
            Redundant::NoLowerDir(path) => {
                let first = self.lowers.iter().find_map(|l| lookup(l.as_fd(), path));
                Ok(first.is_none_or(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR))
            }
        }
    }

    fn remove_whiteout(&self, obj: &Obj, why: &Redundant) -> Result<String> {
        if !crate::whiteout::is_whiteout_stat(&obj.stat()?) {
            return Err(fail("no longer a whiteout"));
        }
        if !self.still_nothing_below(why)? {
            return Err(fail("its directory has something below (now): kept"));
        }
        sys::unlinkat(obj.dir(), &obj.name, false).ctx(|| "unlink".into())?;
        Ok("removed the redundant whiteout".into())
    }

    fn oci_whiteout(&self, obj: &Obj, nothing_below: Option<&Redundant>) -> Result<String> {
        let st = obj.stat()?;
        let target = crate::whiteout::oci_whiteout_target(obj.name.to_bytes())
            .filter(|_| st.st_mode & libc::S_IFMT == libc::S_IFREG)
            .ok_or_else(|| fail("no longer an OCI whiteout file"))?;
        let t = cname(target)?;
        let shown = target.escape_ascii();
        let done = if nothing_below.is_some_and(|w| self.still_nothing_below(w).unwrap_or(false)) {
            "removed (nothing below its directory)".to_string()
        } else {
            match sys::fstatat(obj.dir(), &t) {
                Ok(s) if s.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    self.set_opaque(xattr::Target::At(obj.dir(), &t))?;
                    format!("made the directory {shown} opaque, removed the marker")
                }
                Ok(_) => format!("removed ({shown} itself hides the lower {shown})"),
                Err(e) if is_enoent(&e) => {
                    make_whiteout(obj.dir(), &t, &st, sys::RENAME_NOREPLACE)?;
                    format!("replaced by a whiteout {shown}")
                }
                Err(e) => return Err(e).ctx(|| format!("stat {shown}")),
            }
        };
        sys::unlinkat(obj.dir(), &obj.name, false).ctx(|| "unlink the marker".into())?;
        Ok(done)
    }

    fn oci_opaque(&self, obj: &Obj) -> Result<String> {
        if obj.stat()?.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(fail("the marker is a directory"));
        }
        self.set_opaque(xattr::Target::Fd(obj.dir()))?;
        sys::unlinkat(obj.dir(), &obj.name, false).ctx(|| "unlink the marker".into())?;
        Ok(format!(
            "set {} on its directory, removed the marker",
            String::from_utf8_lossy(&self.private.name("opaque"))
        ))
    }

    fn fuse_opaque(&self, obj: &Obj, name: &[u8]) -> Result<String> {
        let c = xattr::name(name)?;
        let v = xattr::get(obj.target(), &c).ctx(|| "read xattr".into())?;
        if v.as_deref() != Some(b"y") {
            return Err(fail("the xattr is gone or no longer \"y\""));
        }
        self.set_opaque(obj.target())?;
        xattr::remove(obj.target(), &c).ctx(|| "remove xattr".into())?;
        Ok(format!(
            "set {}=y, removed {}",
            String::from_utf8_lossy(&self.private.name("opaque")),
            name.escape_ascii()
        ))
    }
}

fn remove_xattr(obj: &Obj, name: &[u8]) -> Result<String> {
    match xattr::remove(obj.target(), &xattr::name(name)?) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
        r => r.ctx(|| "remove xattr".into())?,
    }
    Ok(format!("removed {}", name.escape_ascii()))
}

/// Chown, then chmod (chown may clear setuid bits), then the xattr goes:
/// each step may be repeated, so an interrupted run is finished by another.
fn override_stat(obj: &Obj, name: &[u8]) -> Result<String> {
    let c = xattr::name(name)?;
    let v = xattr::get(obj.target(), &c).ctx(|| "read xattr".into())?;
    let Some((uid, gid, mode)) = v.as_deref().and_then(parse_override_stat) else {
        return Err(fail("the xattr is gone or malformed"));
    };
    sys::fchownat(obj.dir(), &obj.name, uid, gid).ctx(|| "chown".into())?;
    if obj.stat()?.st_mode & libc::S_IFMT != libc::S_IFLNK {
        let fd = if obj.name.is_empty() {
            sys::open_dir_at(obj.dir(), c".")
        } else {
            sys::openat(obj.dir(), &obj.name, libc::O_PATH, 0)
        }
        .ctx(|| "open".into())?;
        sys::fchmod_fd(fd.as_fd(), mode & 0o7777).ctx(|| "chmod".into())?;
    }
    xattr::remove(obj.target(), &c).ctx(|| "remove xattr".into())?;
    Ok(format!(
        "owner {uid}:{gid}, mode {:o} applied, removed {}",
        mode & 0o7777,
        name.escape_ascii()
    ))
}

fn char_whiteout(obj: &Obj) -> Result<String> {
    let st = obj.stat()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK || st.st_rdev != 0 {
        return Err(fail("no longer a block device 0/0"));
    }
    make_whiteout(obj.dir(), &obj.name, &st, 0)?;
    Ok("replaced by a character device 0/0".into())
}

/// Builds a whiteout (character device 0/0, mode 0, `owner`'s uid and gid)
/// under a temporary name in `dir`, then renames it to `name` with
/// `flags`; nothing is left behind if a step fails.
fn make_whiteout(dir: BorrowedFd<'_>, name: &CStr, owner: &Stat, flags: u32) -> Result<()> {
    let tmp = temp_name();
    sys::mknodat(dir, &tmp, libc::S_IFCHR, 0).ctx(|| "mknod a whiteout".into())?;
    let r = sys::fchownat(dir, &tmp, owner.st_uid, owner.st_gid)
        .and_then(|()| sys::renameat2(dir, &tmp, dir, name, flags));
    if let Err(e) = r {
        let _ = sys::unlinkat(dir, &tmp, false);
        return Err(e).ctx(|| "put the whiteout in place".into());
    }
    Ok(())
}

fn temp_name() -> CString {
    let mut b = [0u8; 8];
    sys::getrandom(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    CString::new(format!(".layerfs-check-{hex}")).expect("no NUL")
}
