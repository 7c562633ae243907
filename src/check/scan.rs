//! The read-only walk behind `layerfs check`: every layer top-down, each
//! directory with what lies below it ([`Below`]), each entry classified by
//! its type, name and xattrs. Only a finding in the upper carries a
//! [`Repair`].

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{CheckOptions, Finding, Kind, Layer, Redundant, Repair, Severity};
use crate::error::{Context, Result, is_enoent};
use crate::layer::cname;
use crate::sys::{self, Stat, xattr};
use crate::whiteout::{self, OCI_OPAQUE, Opaque, Private};

/// What lies below a directory of a layer.
#[derive(Clone, Debug)]
enum Below {
    /// The layers below continue it at this path (`""` is the root).
    Merged(Vec<u8>),
    /// Nothing, for this reason.
    Nothing(Redundant),
}

/// A directory being walked.
struct Dir {
    fd: OwnedFd,
    /// From the layer root: `""` for the root, else `/a/b`.
    path: Vec<u8>,
    below: Below,
    /// Its own `overlay.opaque` (for xattr whiteouts).
    opaque: Opaque,
}

/// One entry of a directory being walked.
struct Entry<'a> {
    name: &'a [u8],
    /// From the layer root.
    path: &'a [u8],
    st: &'a Stat,
    attrs: &'a Attrs<'a>,
    /// Its own `overlay.opaque`.
    opaque: Opaque,
}

/// The xattrs of one object: names, values read on demand.
pub(super) struct Attrs<'a> {
    target: xattr::Target<'a>,
    pub(super) names: Vec<Vec<u8>>,
}

impl Attrs<'_> {
    pub(super) fn get(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        if !self.names.iter().any(|n| n == name) {
            return Ok(None);
        }
        xattr::get(self.target, &xattr::name(name)?)
            .ctx(|| format!("read xattr {}", name.escape_ascii()))
    }
}

pub(super) struct Scan<'a> {
    pub(super) opts: &'a CheckOptions,
    /// Upper first, then the lowers top-down; `None` where not a directory.
    pub(super) layers: Vec<(Layer, Option<OwnedFd>)>,
    pub(super) other: Private,
    out: Vec<Finding>,
}

/// Checks the set; an `Err` only when a layer cannot be read at all.
pub fn scan(opts: &CheckOptions) -> Result<Vec<Finding>> {
    let other = if opts.private == Private::TRUSTED {
        Private::USER
    } else {
        Private::TRUSTED
    };
    let mut s = Scan {
        opts,
        layers: Vec::new(),
        other,
        out: Vec::new(),
    };
    let upper = s.open_root(Layer::Upper, &opts.upper)?;
    s.layers.push((Layer::Upper, upper));
    for (i, l) in opts.lowers.iter().enumerate() {
        let fd = s.open_root(Layer::Lower(i), l)?;
        s.layers.push((Layer::Lower(i), fd));
    }
    let work = match &opts.work {
        Some(w) => s.open_root(Layer::Work, w)?,
        None => None,
    };
    if s.layers.iter().all(|(_, fd)| fd.is_some()) {
        s.check_set(work.as_ref());
    }
    for li in 0..s.layers.len() {
        s.walk_layer(li)?;
    }
    if let Some(w) = work {
        s.check_work(w.as_fd())?;
    }
    Ok(s.out)
}

pub(super) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

fn shown(path: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        b"/".to_vec()
    } else {
        path.to_vec()
    }
}

pub(super) fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// A boolean parameter of the kernel's overlay module, if loaded.
pub(super) fn kernel_param(name: &str) -> Option<bool> {
    let v = std::fs::read_to_string(format!("/sys/module/overlay/parameters/{name}")).ok()?;
    Some(v.trim() == "Y")
}

impl Scan<'_> {
    pub(super) fn add(&mut self, layer: Layer, path: &[u8], f: (Severity, Kind, String, String)) {
        self.out.push(Finding {
            severity: f.0,
            kind: f.1,
            layer,
            path: shown(path),
            what: f.2,
            how: f.3,
            repair: None,
        });
    }

    /// Like [`add`](Self::add), with a repair that `--fix` may apply; in a
    /// lower, which is never changed, `manual` is the advice instead.
    pub(super) fn add_fixable(
        &mut self,
        layer: Layer,
        path: &[u8],
        f: (Severity, Kind, String),
        auto: String,
        manual: String,
        repair: Repair,
    ) {
        let upper = layer == Layer::Upper;
        self.add(
            layer,
            path,
            (f.0, f.1, f.2, if upper { auto } else { manual }),
        );
        if upper && let Some(last) = self.out.last_mut() {
            last.repair = Some(repair);
        }
    }

    fn walk_layer(&mut self, li: usize) -> Result<()> {
        let layer = self.layers[li].0;
        let Some(root) = self.layers[li].1.as_ref() else {
            return Ok(());
        };
        let fd = sys::open_dir_at(root.as_fd(), c".").ctx(|| format!("{layer}: open"))?;
        let attrs = self.attrs(xattr::Target::Fd(fd.as_fd()))?;
        let opaque = Opaque::from_value(attrs.get(&self.opts.private.name("opaque"))?.as_deref());
        self.check_xattrs(layer, b"", &sys::fstat(fd.as_fd())?, &attrs, opaque)?;
        drop(attrs);
        let dir = Dir {
            fd,
            path: Vec::new(),
            below: Below::Merged(Vec::new()),
            opaque,
        };
        self.walk(li, &dir)
    }

    fn attrs<'f>(&self, target: xattr::Target<'f>) -> Result<Attrs<'f>> {
        let names = xattr::list(target).ctx(|| "list xattrs".into())?;
        Ok(Attrs { target, names })
    }

    fn walk(&mut self, li: usize, dir: &Dir) -> Result<()> {
        let layer = self.layers[li].0;
        let at = |p: &[u8]| format!("{layer}:{}", shown(p).escape_ascii());
        let mut entries =
            sys::read_dir(dir.fd.as_fd()).ctx(|| format!("read {}", at(&dir.path)))?;
        entries.sort();
        let names: HashSet<&[u8]> = entries.iter().map(|(n, _, _)| n.as_slice()).collect();
        for (name, _, _) in &entries {
            let c = cname(name)?;
            let path = join(&dir.path, name);
            let st = match sys::fstatat(dir.fd.as_fd(), &c) {
                Err(e) if is_enoent(&e) => continue,
                r => r.ctx(|| format!("stat {}", at(&path)))?,
            };
            let attrs = self.attrs(xattr::Target::At(dir.fd.as_fd(), &c))?;
            let opaque =
                Opaque::from_value(attrs.get(&self.opts.private.name("opaque"))?.as_deref());
            self.check_xattrs(layer, &path, &st, &attrs, opaque)?;
            let e = Entry {
                name,
                path: &path,
                st: &st,
                attrs: &attrs,
                opaque,
            };
            self.check_entry(layer, dir, &e, &names)?;
            if is_dir(&st) {
                let fd =
                    sys::open_dir_at(dir.fd.as_fd(), &c).ctx(|| format!("open {}", at(&path)))?;
                let below = self.child_below(li, dir, &e, fd.as_fd())?;
                drop(attrs);
                let sub = Dir {
                    fd,
                    path,
                    below,
                    opaque,
                };
                self.walk(li, &sub)?;
            }
        }
        Ok(())
    }

    /// Whether a directory is opaque as its writer meant it: the private
    /// xattr, fuse-overlayfs' xattr, or an OCI marker inside it.
    fn meant_opaque(&self, attrs: &Attrs, fd: BorrowedFd<'_>, opaque: Opaque) -> Result<bool> {
        if opaque == Opaque::Yes {
            return Ok(true);
        }
        for n in attrs
            .names
            .iter()
            .filter(|n| n.ends_with(b".fuseoverlayfs.opaque"))
        {
            if attrs.get(n)?.as_deref() == Some(b"y") {
                return Ok(true);
            }
        }
        Ok(sys::fstatat(fd, c".wh..wh..opq").is_ok_and(|st| !is_dir(&st)))
    }

    fn child_below(
        &mut self,
        li: usize,
        dir: &Dir,
        e: &Entry,
        fd: BorrowedFd<'_>,
    ) -> Result<Below> {
        let (name, path, attrs) = (e.name, e.path, e.attrs);
        if self.meant_opaque(attrs, fd, e.opaque)? {
            return Ok(Below::Nothing(Redundant::Opaque(path.to_vec())));
        }
        let inherited = match &dir.below {
            Below::Merged(p) => Some(join(p, name)),
            Below::Nothing(_) => None,
        };
        let target = match attrs.get(&self.opts.private.name("redirect"))? {
            Some(v) => self.redirect(li, dir, path, &v).or(inherited),
            None => inherited,
        };
        let Some(target) = target else {
            return Ok(dir.below.clone());
        };
        Ok(match self.first_below(li, &target) {
            Some((_, st)) if !is_dir(&st) => Below::Nothing(Redundant::NoLowerDir(target)),
            None if li + 1 < self.layers.len() => Below::Nothing(Redundant::NoLowerDir(target)),
            _ => Below::Merged(target),
        })
    }

    /// Notes a redirect and returns where it leads (from the root), if it
    /// can be followed.
    fn redirect(&mut self, li: usize, dir: &Dir, path: &[u8], v: &[u8]) -> Option<Vec<u8>> {
        let layer = self.layers[li].0;
        self.note_redirect(layer, path, v);
        let target = match (crate::layer::parse_redirect(v), &dir.below) {
            (Ok(crate::layer::Redirect::Absolute(_)), _) => v.to_vec(),
            (Ok(crate::layer::Redirect::Relative(n)), Below::Merged(p)) => join(p, n),
            // Relative to a parent with nothing below: leads nowhere.
            (Ok(crate::layer::Redirect::Relative(_)), Below::Nothing(_)) => return None,
            (Err(_), _) => {
                let what = format!(
                    "malformed overlay.redirect \"{}\": layerfs refuses it (as the kernel does)",
                    v.escape_ascii()
                );
                let how = "remove the xattr, or re-create the directory".into();
                self.add(layer, path, (Severity::Error, Kind::BadRedirect, what, how));
                return None;
            }
        };
        self.check_redirect_target(li, path, v, &target);
        Some(target)
    }

    /// The first layer below `li` with something at `path`, and its lstat.
    fn first_below(&self, li: usize, path: &[u8]) -> Option<(Layer, Stat)> {
        self.layers[li + 1..].iter().find_map(|(l, fd)| {
            let fd = fd.as_ref()?;
            lookup(fd.as_fd(), path).map(|st| (*l, st))
        })
    }

    fn note_redirect(&mut self, layer: Layer, path: &[u8], v: &[u8]) {
        let follows = kernel_param("redirect_dir").unwrap_or(false)
            || kernel_param("redirect_always_follow").unwrap_or(true);
        let (sev, kernel, how) = if follows {
            (
                Severity::Note,
                "the kernel follows it (by default here)",
                "nothing to do; do not mount (layerfs or the kernel) with redirect_dir=nofollow or userxattr",
            )
        } else {
            (
                Severity::Warning,
                "this kernel does not follow it by default",
                "mount the kernel overlay with redirect_dir=follow (or on), and layerfs without redirect_dir=nofollow or userxattr",
            )
        };
        let what = format!(
            "directory renamed with redirect_dir (overlay.redirect=\"{}\"): layerfs follows it unless mounted with redirect_dir=nofollow or userxattr; {kernel}",
            v.escape_ascii()
        );
        self.add(layer, path, (sev, Kind::Redirect, what, how.into()));
    }

    /// The first layer below `li` with something at `target` must have a
    /// directory there.
    fn check_redirect_target(&mut self, li: usize, path: &[u8], v: &[u8], target: &[u8]) {
        if li + 1 >= self.layers.len() {
            return;
        }
        let found = self.first_below(li, target).map(|(l, st)| (l, is_dir(&st)));
        let layer = self.layers[li].0;
        let what = match found {
            Some((_, true)) => return,
            Some((l, false)) => format!(
                "overlay.redirect=\"{}\" leads to {}, which is not a directory in {l}",
                v.escape_ascii(),
                target.escape_ascii()
            ),
            None => format!(
                "overlay.redirect=\"{}\" leads to {}, which no layer below has: the renamed directory shows none of its lower contents",
                v.escape_ascii(),
                target.escape_ascii()
            ),
        };
        let how = "check that the lowers are the ones this upper was made on, in order".into();
        self.add(layer, path, (Severity::Error, Kind::BadRedirect, what, how));
    }

    fn check_entry(
        &mut self,
        layer: Layer,
        dir: &Dir,
        e: &Entry,
        names: &HashSet<&[u8]>,
    ) -> Result<()> {
        let (name, path, st, attrs) = (e.name, e.path, e.st, e.attrs);
        let fmt = st.st_mode & libc::S_IFMT;
        if whiteout::is_whiteout_stat(st) {
            if let Below::Nothing(why) = &dir.below {
                let what = format!(
                    "whiteout in a directory {}: it hides nothing, and the kernel lists it (ls: cannot access)",
                    why_nothing(why)
                );
                let f = (Severity::Warning, Kind::RedundantWhiteout, what);
                let repair = Repair::RemoveWhiteout {
                    because: why.clone(),
                };
                let how = "remove it".to_string();
                self.add_fixable(layer, path, f, how.clone(), how, repair);
            }
        } else if fmt == libc::S_IFBLK && st.st_rdev == 0 {
            let what = "block device 0/0: a whiteout is a character device 0/0, so the kernel shows a device and hides nothing".to_string();
            let f = (Severity::Error, Kind::BadWhiteout, what);
            let how = "replace it by a character device 0/0 with the same owner".to_string();
            self.add_fixable(layer, path, f, how.clone(), how, Repair::CharWhiteout);
        } else if fmt == libc::S_IFREG && name == OCI_OPAQUE {
            self.oci_opaque(layer, dir, path)?;
        } else if fmt == libc::S_IFREG
            && let Some(target) = whiteout::oci_whiteout_target(name)
        {
            self.oci_whiteout(layer, dir, path, target, names);
        } else if fmt == libc::S_IFREG
            && dir.opaque != Opaque::XattrWhiteouts
            && attrs.names.contains(&self.opts.private.name("whiteout"))
        {
            let opq = String::from_utf8_lossy(&self.opts.private.name("opaque")).into_owned();
            let what = format!(
                "xattr whiteout in a directory without {opq}=x: the kernel and layerfs show it as an empty file"
            );
            let how = format!("setfattr -n {opq} -v x on its directory");
            self.add(layer, path, (Severity::Error, Kind::BadWhiteout, what, how));
        }
        Ok(())
    }

    fn oci_opaque(&mut self, layer: Layer, dir: &Dir, path: &[u8]) -> Result<()> {
        let private = String::from_utf8_lossy(&self.opts.private.name("opaque")).into_owned();
        if layer != Layer::Upper {
            let what = if dir.opaque == Opaque::Yes {
                "OCI opaque marker: the kernel shows it as a file (layerfs hides it)".to_string()
            } else {
                "OCI opaque marker: layerfs makes its directory opaque; the kernel shows it as a file and merges the directory with the layers below".to_string()
            };
            let how = format!(
                "lowers are never changed: set {private}=y on the directory and remove the marker by hand, or mount with layerfs"
            );
            self.add(
                layer,
                path,
                (Severity::Warning, Kind::LowerOciMarker, what, how),
            );
            return Ok(());
        }
        let what = if dir.opaque == Opaque::Yes {
            format!(
                "OCI opaque marker beside {private}=y (as fuse-overlayfs leaves them): the kernel and layerfs show it as a file"
            )
        } else {
            "OCI opaque marker in the upper: the kernel and layerfs show it as a file and merge its directory with the layers below".to_string()
        };
        let how = format!("set {private}=y on its directory, remove the marker");
        let f = (Severity::Error, Kind::OciOpaque, what);
        self.add_fixable(layer, path, f, how.clone(), how, Repair::OciOpaque);
        Ok(())
    }

    fn oci_whiteout(
        &mut self,
        layer: Layer,
        dir: &Dir,
        path: &[u8],
        target: &[u8],
        names: &HashSet<&[u8]>,
    ) {
        let t = target.escape_ascii().to_string();
        if layer != Layer::Upper {
            let what = format!(
                "OCI whiteout file for {t}: layerfs hides {t}; the kernel shows the marker and does not hide {t}"
            );
            let how = "lowers are never changed: replace it by a character device 0/0 by hand, or mount with layerfs".into();
            self.add(
                layer,
                path,
                (Severity::Warning, Kind::LowerOciMarker, what, how),
            );
            return;
        }
        let what = format!(
            "OCI whiteout file for {t} in the upper: the kernel and layerfs show it as a file and do not hide {t}"
        );
        let (how, nothing_below) = match &dir.below {
            Below::Nothing(why) => (
                format!("remove it (its directory {})", why_nothing(why)),
                Some(why.clone()),
            ),
            Below::Merged(_) if names.contains(target) => (
                format!("remove it ({t} is in the upper; a directory {t} is made opaque)"),
                None,
            ),
            Below::Merged(_) => (
                format!("replace it by a whiteout {t} (character device 0/0, same owner)"),
                None,
            ),
        };
        let f = (Severity::Error, Kind::OciWhiteout, what);
        self.add_fixable(
            layer,
            path,
            f,
            how.clone(),
            how,
            Repair::OciWhiteout { nothing_below },
        );
    }
}

/// Why a directory has nothing below, as words.
fn why_nothing(why: &Redundant) -> String {
    match why {
        Redundant::Opaque(p) if p.is_empty() => "that is opaque".into(),
        Redundant::Opaque(p) => format!("in the opaque {}", p.escape_ascii()),
        Redundant::NoLowerDir(p) => format!("that no lower has ({})", shown(p).escape_ascii()),
    }
}

/// `lstat` of a path below a layer root, one component at a time and never
/// through a symlink; `None` when it is not there.
pub(super) fn lookup(root: BorrowedFd<'_>, path: &[u8]) -> Option<Stat> {
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let (last, dirs) = comps.split_last()?;
    let mut cur: Option<OwnedFd> = None;
    for c in dirs {
        let at = cur.as_ref().map_or(root, |f| f.as_fd());
        cur = Some(sys::open_dir_at(at, &cname(c).ok()?).ok()?);
    }
    let at = cur.as_ref().map_or(root, |f| f.as_fd());
    sys::fstatat(at, &cname(last).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_paths() {
        assert_eq!(join(b"", b"a"), b"/a");
        assert_eq!(join(b"/a", b"b"), b"/a/b");
        assert_eq!(shown(b""), b"/");
    }
}
