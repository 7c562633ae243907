//! Changes of an upper layer against its lowers, as `docker diff` reports them.
//!
//! Owns: reading a stack of layer directories *without a mount* (the merged
//! view of SPEC §2, for two stacks at once), the change rules of moby's
//! go-archive `ChangesDirs`/`addChanges`/`statDifferent`/`sameFsTime`
//! (SPEC §8), and the output formats of `layerfs diff`.
//!
//! Two views of one stack are compared: **new** = the upper (layer 0) over
//! the lowers, **old** = the lowers alone (layers 1..). Both are resolved by
//! the same lookup: kernel whiteouts (char 0/0), xattr whiteouts (in a dir
//! with `<private>opaque="x"`), `<private>opaque="y"` and `<private>redirect`
//! in any layer; OCI `.wh.NAME` / `.wh..wh..opq` in lower layers only, where
//! they are honoured and never shown.
//!
//! Invariants:
//! - Only the upper tree is walked. A directory whose lower parts are the same
//!   in both views (same layers, same directories) is compared only at the
//!   names its upper part holds: every other name resolves identically in
//!   both views. Where the lower parts differ (an opaque or redirected upper
//!   dir, a dir that replaced a non-dir, a new dir) that one directory is
//!   compared in full, one level, and the walk recurses only into entries
//!   of the new view. Lower trees are walked only where the new view shows
//!   them below a new name (a renamed directory: all its contents are `A`).
//! - What the upper alone cannot tell is out of scope: with the kernel's
//!   `index=on` a copy-up also changes the other names of a hard link through
//!   the workdir's index, which is not read here (docker mounts `index=off`).
//! - Every access is an `*at` call relative to an fd of a layer directory,
//!   never following a symlink: a symlink in a layer is only `lstat`ed, and a
//!   redirect can only lead down through real directories of a layer.
//! - A redirect that cannot be followed (malformed value) is an error: no
//!   diff rather than a wrong diff.
//! - Names are bytes everywhere. The result is sorted by path bytes and has
//!   no duplicates; `/` is never reported.
//!
//! Output formats ([`write_changes`]): `Lines` is `K /path\n` with the raw
//! path bytes; `Nul` is `K /path\0`; `Json` is one object per line,
//! `{"kind":"A","path":"/x"}`. A JSON `path` that is valid UTF-8 is the path
//! itself. Otherwise the object also carries `"raw":false` and `path` holds
//! an escaped form: every byte that is not part of valid UTF-8 becomes the
//! four characters `\xNN` (lowercase hex) and every backslash is doubled, so
//! the bytes can be recovered exactly.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Context, Error, Result, is_enoent};
use crate::sys::{self, xattr};
use crate::whiteout::{self, Opaque, Private};

/// What happened to a path, as `docker diff` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// `A`: in the new view only.
    Added,
    /// `C`: in both, with different attributes, or with changes below it.
    Changed,
    /// `D`: in the old view only.
    Deleted,
}

impl ChangeKind {
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Added => 'A',
            ChangeKind::Changed => 'C',
            ChangeKind::Deleted => 'D',
        }
    }

    /// `A`, `C` or `D`, either case.
    pub fn from_letter(c: char) -> Option<ChangeKind> {
        match c.to_ascii_uppercase() {
            'A' => Some(ChangeKind::Added),
            'C' => Some(ChangeKind::Changed),
            'D' => Some(ChangeKind::Deleted),
            _ => None,
        }
    }
}

/// One line of the diff: `path` is absolute from the overlay root (`/a/b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub path: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Namespace of the overlay's private xattrs (`USER` for `userxattr`).
    pub private: Private,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            private: Private::TRUSTED,
        }
    }
}

/// The changes in `upper` against `lowers` (`lowers[0]` is the topmost).
pub fn diff(upper: &Path, lowers: &[PathBuf], opts: &DiffOptions) -> Result<Vec<Change>> {
    let stack = Stack::open(upper, lowers, &opts.private)?;
    let mut walk = Walk {
        stack: &stack,
        changes: Vec::new(),
    };
    let (new, old) = (stack.root(0)?, stack.root(1)?);
    walk.children(&mut Vec::new(), &new, Some(&old))?;
    Ok(sorted(walk.changes))
}

fn sorted(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    changes.dedup_by(|a, b| a.path == b.path);
    changes
}

// ---------------------------------------------------------------------------
// The rules (pure)

/// The attributes docker compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: i64,
    mtime: (i64, i64),
}

impl Attrs {
    fn of(st: &sys::Stat) -> Attrs {
        Attrs {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// go-archive `statDifferent`: type and mode bits, owner and rdev always;
/// size and mtime only when the *old* entry is not a directory (a directory's
/// size and mtime change whenever its entries do, moby#9874).
fn stat_different(old: &Attrs, new: &Attrs) -> bool {
    old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || old.rdev != new.rdev
        || (!old.is_dir() && (!same_fs_time(old.mtime, new.mtime) || old.size != new.size))
}

/// go-archive `sameFsTime`: equal, or the same second when either side has
/// no nanoseconds (tar headers of old docker versions kept whole seconds).
fn same_fs_time(a: (i64, i64), b: (i64, i64)) -> bool {
    a == b || (a.0 == b.0 && (a.1 == 0 || b.1 == 0))
}

// ---------------------------------------------------------------------------
// Reading the layers

const CAPABILITY: &CStr = c"security.capability";

struct Layer {
    root: Rc<OwnedFd>,
    root_id: (u64, u64),
    /// Lower layers honour OCI `.wh.` markers; the upper does not.
    oci: bool,
    /// Shown in error messages.
    label: String,
}

/// The layers, upper first, then the lowers top-down: one order, never inverted.
struct Stack {
    layers: Vec<Layer>,
    opaque: CString,
    redirect: CString,
    whiteout: CString,
}

/// One layer's directory in a merged directory.
#[derive(Clone)]
struct Part {
    layer: usize,
    fd: Rc<OwnedFd>,
    /// `(st_dev, st_ino)`: two views share a part iff they share this.
    id: (u64, u64),
    /// `opaque="x"`: the directory may hold xattr whiteouts.
    xwhiteouts: bool,
}

/// A directory of a merged view: its parts top-down, cut at opacity.
struct MergedDir {
    parts: Vec<Part>,
}

impl MergedDir {
    fn part(&self, layer: usize) -> Option<&Part> {
        self.parts.iter().find(|p| p.layer == layer)
    }

    fn same_parts(a: &[Part], b: &[Part]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x.layer, x.id) == (y.layer, y.id))
    }
}

/// An object found in one layer, named so that its xattrs can be read.
struct Obj {
    st: sys::Stat,
    parent: Rc<OwnedFd>,
    name: CString,
}

/// An entry of a merged view: attributes of the topmost object, and the
/// merged directory when it is one.
struct Entry {
    obj: Obj,
    dir: Option<MergedDir>,
}

/// A directory in one layer, with what it says about the layers below.
struct DirPart {
    part: Part,
    opaque: bool,
    redirect: Option<Vec<u8>>,
}

/// What one layer holds at a name.
enum Found {
    Missing,
    /// A whiteout, or anything else that ends the lookup with nothing from
    /// this layer (a non-directory in the middle of a redirect path).
    Whiteout,
    NonDir(Obj),
    Dir(Obj, DirPart),
}

/// Where a lookup continues in the layers below: the same or a redirected
/// name in the parent's parts, or a path from the layer roots after an
/// absolute redirect.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Name(Vec<u8>),
    Path(Vec<Vec<u8>>),
}

/// One layer's answer to a path lookup: what it holds, whether the layers
/// below are cut off (an opaque dir on the way), and where they must look
/// (a redirect on the way).
struct Step {
    found: Found,
    stop: bool,
    retarget: Option<Target>,
}

impl Stack {
    fn open(upper: &Path, lowers: &[PathBuf], private: &Private) -> Result<Stack> {
        let mut layers = vec![Layer::open(upper, false, "upper".into())?];
        for (i, l) in lowers.iter().enumerate() {
            layers.push(Layer::open(l, true, format!("lower {}", i + 1))?);
        }
        let cname = |key| CString::new(private.name(key)).expect("no NUL in xattr names");
        Ok(Stack {
            layers,
            opaque: cname("opaque"),
            redirect: cname("redirect"),
            whiteout: cname("whiteout"),
        })
    }

    /// The root of the view made of layers `first..`. The kernel ignores
    /// `opaque` on layer roots; an OCI opaque marker at a lower root is honoured.
    fn root(&self, first: usize) -> Result<MergedDir> {
        let mut parts = Vec::new();
        for (i, layer) in self.layers.iter().enumerate().skip(first) {
            let opaque = self.opaque_value(i, &layer.root)?;
            parts.push(Part {
                layer: i,
                fd: layer.root.clone(),
                id: layer.root_id,
                xwhiteouts: opaque == Opaque::XattrWhiteouts,
            });
            if layer.oci && exists(&layer.root, whiteout::OCI_OPAQUE)? {
                break;
            }
        }
        Ok(MergedDir { parts })
    }

    /// Looks `name` up in merged directory `parent` (SPEC §2, overlayfs
    /// `ovl_lookup`): the first layer holding it decides; a directory merges
    /// with the directories below until an opaque one, a non-directory or a
    /// whiteout, following redirects on the way.
    fn lookup(&self, parent: &MergedDir, name: &[u8]) -> Result<Option<Entry>> {
        let Some(first) = parent.parts.first() else {
            return Ok(None);
        };
        let mut target = Target::Name(name.to_vec());
        let mut top: Option<Obj> = None;
        let mut parts = Vec::new();
        for layer in first.layer..self.layers.len() {
            let step = match &target {
                Target::Name(n) => match parent.part(layer) {
                    Some(p) => Step::found(self.probe(layer, &p.fd, p.xwhiteouts, n)?),
                    None => continue,
                },
                Target::Path(comps) => self.walk_path(layer, comps)?,
            };
            if let Some(t) = step.retarget {
                target = t;
            }
            match step.found {
                Found::Missing => {}
                Found::Whiteout => break,
                Found::NonDir(obj) => {
                    if top.is_none() {
                        return Ok(Some(Entry { obj, dir: None }));
                    }
                    break;
                }
                Found::Dir(obj, dp) => {
                    top.get_or_insert(obj);
                    parts.push(dp.part);
                    if dp.opaque {
                        break;
                    }
                    if let Some(r) = dp.redirect {
                        target = redirected(target, 0, &r)?;
                    }
                }
            }
            if step.stop {
                break;
            }
        }
        Ok(top.map(|obj| Entry {
            obj,
            dir: Some(MergedDir { parts }),
        }))
    }

    /// Walks `comps` from the root of `layer` after an absolute redirect. The
    /// walk in this layer follows the path as given; redirects met on the way
    /// rewrite the path for the layers below (counted from the end, as the
    /// kernel does).
    fn walk_path(&self, layer: usize, comps: &[Vec<u8>]) -> Result<Step> {
        let l = &self.layers[layer];
        let mut dir = l.root.clone();
        let mut xwh = self.opaque_value(layer, &dir)? == Opaque::XattrWhiteouts;
        let mut step = Step::found(Found::Missing);
        let mut next = comps.to_vec();
        for (i, comp) in comps.iter().enumerate() {
            let found = self.probe(layer, &dir, xwh, comp)?;
            let rest = comps.len() - i - 1;
            if rest == 0 {
                step.found = found;
                break;
            }
            match found {
                Found::Dir(_, dp) => {
                    step.stop |= dp.opaque;
                    if let Some(r) = &dp.redirect {
                        next = match redirected(Target::Path(next), rest, r)? {
                            Target::Path(p) => p,
                            Target::Name(n) => vec![n],
                        };
                        step.retarget = Some(Target::Path(next.clone()));
                    }
                    (dir, xwh) = (dp.part.fd, dp.part.xwhiteouts);
                }
                Found::Missing => break,
                Found::Whiteout | Found::NonDir(_) => {
                    step.found = Found::Whiteout;
                    break;
                }
            }
        }
        Ok(step)
    }

    /// What `layer` holds at `name` in its directory `dir`.
    fn probe(&self, layer: usize, dir: &Rc<OwnedFd>, xwh: bool, name: &[u8]) -> Result<Found> {
        let oci = self.layers[layer].oci;
        if oci && whiteout::is_oci_marker(name) {
            return Ok(Found::Missing);
        }
        let cname = cstr(name)?;
        let st = match sys::fstatat(dir.as_fd(), &cname) {
            Ok(st) => st,
            Err(e) if is_enoent(&e) => return self.probe_absent(layer, dir, name),
            Err(e) => return Err(e).ctx(|| self.what(layer, "stat", Some(name))),
        };
        if whiteout::is_whiteout_stat(&st) || (xwh && self.is_xattr_whiteout(dir, &cname, &st)?) {
            return Ok(Found::Whiteout);
        }
        let obj = Obj {
            st,
            parent: dir.clone(),
            name: cname,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Ok(Found::NonDir(obj));
        }
        let fd = sys::open_dir_at(dir.as_fd(), &obj.name)
            .ctx(|| self.what(layer, "open", Some(name)))?;
        let dp = self.dir_part(layer, Rc::new(fd), &st)?;
        Ok(Found::Dir(obj, dp))
    }

    /// A name absent from a lower layer may still be whited out there by OCI `.wh.NAME`.
    fn probe_absent(&self, layer: usize, dir: &Rc<OwnedFd>, name: &[u8]) -> Result<Found> {
        if self.layers[layer].oci {
            let marker = [whiteout::OCI_WH_PREFIX, name].concat();
            // A name too long to have a marker has none.
            if marker.len() <= 255
                && whiteout::oci_whiteout_target(&marker).is_some()
                && exists(dir, &marker)?
            {
                return Ok(Found::Whiteout);
            }
        }
        Ok(Found::Missing)
    }

    fn is_xattr_whiteout(&self, dir: &OwnedFd, name: &CStr, st: &sys::Stat) -> Result<bool> {
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(false);
        }
        let target = xattr::Target::At(dir.as_fd(), name);
        Ok(get_xattr(target, &self.whiteout)?.is_some())
    }

    fn dir_part(&self, layer: usize, fd: Rc<OwnedFd>, st: &sys::Stat) -> Result<DirPart> {
        let opaque = self.opaque_value(layer, &fd)?;
        let oci_opaque = self.layers[layer].oci && exists(&fd, whiteout::OCI_OPAQUE)?;
        let redirect = get_xattr(xattr::Target::Fd(fd.as_fd()), &self.redirect)
            .ctx(|| self.what(layer, "read the redirect xattr", None))?;
        Ok(DirPart {
            part: Part {
                layer,
                fd,
                id: (st.st_dev, st.st_ino),
                xwhiteouts: opaque == Opaque::XattrWhiteouts,
            },
            opaque: opaque == Opaque::Yes || oci_opaque,
            redirect,
        })
    }

    fn opaque_value(&self, layer: usize, dir: &OwnedFd) -> Result<Opaque> {
        let v = get_xattr(xattr::Target::Fd(dir.as_fd()), &self.opaque)
            .ctx(|| self.what(layer, "read the opaque xattr", None))?;
        Ok(Opaque::from_value(v.as_deref()))
    }

    /// All names a merged directory may hold (whiteouts included; OCI
    /// markers of lower layers left out), to be resolved one by one.
    fn names_in(&self, parts: &[Part], names: &mut BTreeSet<Vec<u8>>) -> Result<()> {
        for p in parts {
            let entries =
                sys::read_dir(p.fd.as_fd()).ctx(|| self.what(p.layer, "list a directory", None))?;
            let oci = self.layers[p.layer].oci;
            names.extend(
                entries
                    .into_iter()
                    .map(|(name, _, _)| name)
                    .filter(|n| !(oci && whiteout::is_oci_marker(n))),
            );
        }
        Ok(())
    }

    /// The `security.capability` docker compares; empty counts as absent.
    fn capability(&self, obj: &Obj) -> Result<Option<Vec<u8>>> {
        let v = match get_xattr(xattr::Target::At(obj.parent.as_fd(), &obj.name), CAPABILITY) {
            // An empty capability xattr can be stored but not read back
            // (EINVAL): it counts as absent, as an empty one does.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            r => r.ctx(|| format!("diff: read {CAPABILITY:?} of {:?}", obj.name))?,
        };
        Ok(v.filter(|v| !v.is_empty()))
    }

    fn differs(&self, new: &Entry, old: &Entry) -> Result<bool> {
        if stat_different(&Attrs::of(&old.obj.st), &Attrs::of(&new.obj.st)) {
            return Ok(true);
        }
        Ok(self.capability(&old.obj)? != self.capability(&new.obj)?)
    }

    /// Error context: the layer, what was done, and the name if any (the
    /// walk adds the path).
    fn what(&self, layer: usize, verb: &str, name: Option<&[u8]>) -> String {
        let label = &self.layers[layer].label;
        match name {
            Some(n) => format!("diff: {label}: {verb} \"{}\"", n.escape_ascii()),
            None => format!("diff: {label}: {verb}"),
        }
    }
}

impl Layer {
    fn open(path: &Path, oci: bool, label: String) -> Result<Layer> {
        let label = format!("{label} {}", path.as_os_str().as_bytes().escape_ascii());
        let root = sys::open_path_dir(path).ctx(|| format!("diff: open {label}"))?;
        let st = sys::fstat(root.as_fd()).ctx(|| format!("diff: stat {label}"))?;
        Ok(Layer {
            root: Rc::new(root),
            root_id: (st.st_dev, st.st_ino),
            oci,
            label,
        })
    }
}

impl Step {
    fn found(found: Found) -> Step {
        Step {
            found,
            stop: false,
            retarget: None,
        }
    }
}

/// The target after a redirect met at the component that has `rest`
/// components after it: an absolute value replaces the path up to it, a
/// relative one (a name in the same parent) only that component.
fn redirected(target: Target, rest: usize, value: &[u8]) -> Result<Target> {
    let parsed = crate::layer::parse_redirect(value).map_err(|errno| {
        Error::new(
            errno,
            format!("diff: bad redirect \"{}\"", value.escape_ascii()),
        )
    })?;
    Ok(match (parsed, target) {
        (crate::layer::Redirect::Absolute(comps), target) => {
            let mut comps: Vec<Vec<u8>> = comps.into_iter().map(<[u8]>::to_vec).collect();
            if let Target::Path(p) = target {
                comps.extend_from_slice(&p[p.len() - rest..]);
            }
            Target::Path(comps)
        }
        (crate::layer::Redirect::Relative(name), Target::Name(_)) => Target::Name(name.to_vec()),
        (crate::layer::Redirect::Relative(name), Target::Path(mut p)) => {
            let at = p.len() - rest - 1;
            p[at] = name.to_vec();
            Target::Path(p)
        }
    })
}

fn cstr(name: &[u8]) -> Result<CString> {
    sys::cstr(OsStr::from_bytes(name)).ctx(|| format!("diff: bad name \"{}\"", name.escape_ascii()))
}

fn exists(dir: &OwnedFd, name: &[u8]) -> Result<bool> {
    match sys::fstatat(dir.as_fd(), &cstr(name)?) {
        Ok(_) => Ok(true),
        Err(e) if is_enoent(&e) => Ok(false),
        Err(e) => Err(e).ctx(|| format!("diff: stat \"{}\"", name.escape_ascii())),
    }
}

/// An xattr value; absent when the filesystem has no xattrs at all.
fn get_xattr(t: xattr::Target<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    match xattr::get(t, name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(None),
        r => r,
    }
}

// ---------------------------------------------------------------------------
// The walk (go-archive `addChanges`)

/// How the lower parts of a directory in the new view relate to the old one.
enum Overlap {
    /// Same parts: nothing below can differ.
    Same,
    /// The new view is an upper dir over exactly the old parts: only names
    /// held by the upper dir can differ.
    UpperOnTop,
    /// Anything else: compare every name of both.
    Different,
}

fn overlap(new: &MergedDir, old: Option<&MergedDir>) -> Overlap {
    let Some(old) = old else {
        return Overlap::Different;
    };
    if MergedDir::same_parts(&new.parts, &old.parts) {
        return Overlap::Same;
    }
    match new.parts.split_first() {
        Some((top, rest)) if top.layer == 0 && MergedDir::same_parts(rest, &old.parts) => {
            Overlap::UpperOnTop
        }
        _ => Overlap::Different,
    }
}

struct Walk<'a> {
    stack: &'a Stack,
    changes: Vec<Change>,
}

impl Walk<'_> {
    /// Compares the children of the directory at `path` (`old` is `None`
    /// when it is new, or was not a directory). Returns whether anything was
    /// reported below it.
    fn children(
        &mut self,
        path: &mut Vec<u8>,
        new: &MergedDir,
        old: Option<&MergedDir>,
    ) -> Result<bool> {
        let Some(names) = self.candidates(new, old).map_err(|e| at_path(e, path))? else {
            return Ok(false);
        };
        let mut any = false;
        for name in names {
            let len = path.len();
            path.push(b'/');
            path.extend_from_slice(&name);
            let r = self.child(path, new, old, &name);
            path.truncate(len);
            any |= r?;
        }
        Ok(any)
    }

    /// The names at which the two views of a directory may differ; `None`
    /// when they cannot differ anywhere below it.
    fn candidates(
        &self,
        new: &MergedDir,
        old: Option<&MergedDir>,
    ) -> Result<Option<BTreeSet<Vec<u8>>>> {
        let mut names = BTreeSet::new();
        match overlap(new, old) {
            Overlap::Same => return Ok(None),
            Overlap::UpperOnTop => self.stack.names_in(&new.parts[..1], &mut names)?,
            Overlap::Different => {
                self.stack.names_in(&new.parts, &mut names)?;
                if let Some(old) = old {
                    self.stack.names_in(&old.parts, &mut names)?;
                }
            }
        }
        Ok(Some(names))
    }

    fn child(
        &mut self,
        path: &mut Vec<u8>,
        new: &MergedDir,
        old: Option<&MergedDir>,
        name: &[u8],
    ) -> Result<bool> {
        let found = self.stack.lookup(new, name).and_then(|n| match old {
            Some(dir) => Ok((n, self.stack.lookup(dir, name)?)),
            None => Ok((n, None)),
        });
        match found.map_err(|e| at_path(e, path))? {
            (None, None) => Ok(false),
            (None, Some(_)) => Ok(self.report(ChangeKind::Deleted, path)),
            (Some(n), None) => {
                self.report(ChangeKind::Added, path);
                if let Some(dir) = &n.dir {
                    self.children(path, dir, None)?;
                }
                Ok(true)
            }
            (Some(n), Some(o)) => self.both(path, &n, &o),
        }
    }

    /// An entry of both views: `C` if its attributes differ, or (for a
    /// directory) if anything below it was reported.
    fn both(&mut self, path: &mut Vec<u8>, new: &Entry, old: &Entry) -> Result<bool> {
        let changed = self.stack.differs(new, old).map_err(|e| at_path(e, path))?;
        if changed {
            self.report(ChangeKind::Changed, path);
        }
        let below = match &new.dir {
            Some(dir) => self.children(path, dir, old.dir.as_ref())?,
            None => false,
        };
        if below && !changed {
            self.report(ChangeKind::Changed, path);
        }
        Ok(changed || below)
    }

    fn report(&mut self, kind: ChangeKind, path: &[u8]) -> bool {
        self.changes.push(Change {
            kind,
            path: path.to_vec(),
        });
        true
    }
}

/// Adds the path being compared to an error's context.
fn at_path(e: Error, path: &[u8]) -> Error {
    let path = if path.is_empty() { &b"/"[..] } else { path };
    let context = format!("{} (at \"{}\")", e.context(), path.escape_ascii());
    Error::new(e.errno(), context)
}

// ---------------------------------------------------------------------------
// Output

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `K /path\n`, raw bytes.
    Lines,
    /// `K /path\0`, for names with newlines (`-z`).
    Nul,
    /// One JSON object per line (see the module docs for non-UTF-8 paths).
    Json,
}

pub fn write_changes(out: &mut impl Write, changes: &[Change], fmt: Format) -> io::Result<()> {
    for c in changes {
        let letter = c.kind.letter() as u8;
        match fmt {
            Format::Lines | Format::Nul => {
                out.write_all(&[letter, b' '])?;
                out.write_all(&c.path)?;
                out.write_all(if fmt == Format::Nul { b"\0" } else { b"\n" })?;
            }
            Format::Json => out.write_all(json_line(c).as_bytes())?,
        }
    }
    Ok(())
}

fn json_line(c: &Change) -> String {
    let mut s = format!("{{\"kind\":\"{}\",\"path\":", c.kind.letter());
    match std::str::from_utf8(&c.path) {
        Ok(p) => json_string(&mut s, p),
        Err(_) => {
            json_string(&mut s, &escape_non_utf8(&c.path));
            s.push_str(",\"raw\":false");
        }
    }
    s.push_str("}\n");
    s
}

/// Doubles backslashes and writes bytes outside valid UTF-8 as `\xNN`.
fn escape_non_utf8(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        s.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses a `--kind` filter such as `A,C` (letters in either case).
pub fn parse_kinds(s: &str) -> std::result::Result<Vec<ChangeKind>, String> {
    let mut kinds = Vec::new();
    for tok in s.split(',').map(str::trim) {
        let mut chars = tok.chars();
        let kind = match (chars.next(), chars.next()) {
            (Some(c), None) => ChangeKind::from_letter(c),
            _ => None,
        };
        let kind = kind
            .ok_or_else(|| format!("invalid change kind {tok:?} in {s:?}: expected A, C or D"))?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: (i64, i64) = (1_600_000_000, 123_456_789);

    fn file(mode: u32) -> Attrs {
        Attrs {
            mode: libc::S_IFREG | mode,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 10,
            mtime: T,
        }
    }

    fn dir(mode: u32) -> Attrs {
        Attrs {
            mode: libc::S_IFDIR | mode,
            ..file(0)
        }
    }

    #[test]
    fn same_fs_time_rules() {
        assert!(same_fs_time(T, T));
        assert!(same_fs_time(T, (T.0, 0)), "same second, new has no ns");
        assert!(same_fs_time((T.0, 0), T), "same second, old has no ns");
        assert!(!same_fs_time(T, (T.0, 5)), "same second, both have ns");
        assert!(!same_fs_time(T, (T.0 + 1, 0)), "other second");
        assert!(!same_fs_time((T.0, 0), (T.0 + 1, 0)));
    }

    #[test]
    fn stat_different_on_files() {
        let f = file(0o644);
        assert!(!stat_different(&f, &f));
        assert!(stat_different(&f, &Attrs { size: 11, ..f }));
        assert!(stat_different(
            &f,
            &Attrs {
                mtime: (T.0, 1),
                ..f
            }
        ));
        assert!(!stat_different(
            &f,
            &Attrs {
                mtime: (T.0, 0),
                ..f
            }
        ));
        assert!(stat_different(&f, &file(0o4644)), "setuid");
        assert!(stat_different(&f, &file(0o2644)), "setgid");
        assert!(stat_different(&f, &Attrs { uid: 1, ..f }));
        assert!(stat_different(&f, &Attrs { gid: 1, ..f }));
        let chr = Attrs {
            mode: libc::S_IFCHR | 0o644,
            rdev: 0x103,
            ..f
        };
        assert!(stat_different(&chr, &Attrs { rdev: 0x105, ..chr }));
        assert!(
            stat_different(
                &f,
                &Attrs {
                    mode: libc::S_IFLNK | 0o644,
                    ..f
                }
            ),
            "type"
        );
    }

    #[test]
    fn stat_different_on_dirs_ignores_size_and_mtime() {
        let d = dir(0o755);
        assert!(!stat_different(
            &d,
            &Attrs {
                size: 8192,
                mtime: (1, 1),
                ..d
            }
        ));
        assert!(stat_different(&d, &dir(0o1777)), "sticky");
        assert!(stat_different(&d, &Attrs { uid: 7, ..d }));
        // Only the *old* entry decides: a file that became a dir differs by type anyway,
        // and a dir that became a file of the same mode bits too.
        assert!(stat_different(&d, &file(0o755)));
        assert!(stat_different(&file(0o755), &d));
    }

    fn ch(kind: ChangeKind, path: &[u8]) -> Change {
        Change {
            kind,
            path: path.to_vec(),
        }
    }

    #[test]
    fn sorted_by_bytes_without_duplicates() {
        use ChangeKind::*;
        let v = sorted(vec![
            ch(Added, b"/b/\xff"),
            ch(Changed, b"/b"),
            ch(Added, b"/a b"),
            ch(Changed, b"/b"),
            ch(Deleted, b"/a/c"),
        ]);
        let paths: Vec<&[u8]> = v.iter().map(|c| &c.path[..]).collect();
        assert_eq!(paths, [&b"/a b"[..], b"/a/c", b"/b", b"/b/\xff"]);
    }

    #[test]
    fn redirect_targets() {
        let name = |s: &[u8]| Target::Name(s.to_vec());
        let path = |v: &[&[u8]]| Target::Path(v.iter().map(|c| c.to_vec()).collect());
        assert_eq!(redirected(name(b"a2"), 0, b"a").unwrap(), name(b"a"));
        assert_eq!(
            redirected(name(b"b2"), 0, b"/a/b").unwrap(),
            path(&[b"a", b"b"])
        );
        assert_eq!(
            redirected(path(&[b"x", b"y", b"z"]), 1, b"/q").unwrap(),
            path(&[b"q", b"z"])
        );
        assert_eq!(
            redirected(path(&[b"x", b"y", b"z"]), 1, b"w").unwrap(),
            path(&[b"x", b"w", b"z"])
        );
        assert_eq!(
            redirected(path(&[b"x", b"y"]), 0, b"w").unwrap(),
            path(&[b"x", b"w"])
        );
        for bad in [
            &b""[..],
            b"/",
            b"a/b",
            b"..",
            b"/a/../b",
            b".",
            b"a\0",
            b"/a//b",
            b"/a/",
        ] {
            assert!(
                redirected(name(b"n"), 0, bad).is_err(),
                "{:?}",
                bad.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn output_formats() {
        use ChangeKind::*;
        let v = [
            ch(Added, b"/a b"),
            ch(Deleted, b"/n\nl"),
            ch(Changed, b"/q\"\\\xff\x01"),
        ];
        let mut out = Vec::new();
        write_changes(&mut out, &v, Format::Lines).unwrap();
        assert_eq!(out, b"A /a b\nD /n\nl\nC /q\"\\\xff\x01\n");
        out.clear();
        write_changes(&mut out, &v, Format::Nul).unwrap();
        assert_eq!(out, b"A /a b\0D /n\nl\0C /q\"\\\xff\x01\0");
        out.clear();
        write_changes(&mut out, &v, Format::Json).unwrap();
        let expect = concat!(
            "{\"kind\":\"A\",\"path\":\"/a b\"}\n",
            "{\"kind\":\"D\",\"path\":\"/n\\nl\"}\n",
            "{\"kind\":\"C\",\"path\":\"/q\\\"\\\\\\\\\\\\xff\\u0001\",\"raw\":false}\n",
        );
        assert_eq!(String::from_utf8(out).unwrap(), expect);
    }

    #[test]
    fn non_utf8_escape_is_lossless() {
        assert_eq!(escape_non_utf8(b"a\\b\xffc\xc3\xa9"), "a\\\\b\\xffcé");
        assert_eq!(
            escape_non_utf8(b"\\xff"),
            "\\\\xff",
            "a literal \\xff stays distinct"
        );
    }

    #[test]
    fn kinds() {
        use ChangeKind::*;
        assert_eq!(parse_kinds("A,C").unwrap(), [Added, Changed]);
        assert_eq!(parse_kinds(" d , a,A").unwrap(), [Deleted, Added]);
        assert!(parse_kinds("").is_err());
        assert!(parse_kinds("A,,C").is_err());
        assert!(parse_kinds("AC").is_err());
        assert!(parse_kinds("X").is_err());
    }

    /// A tree of plain dirs and files (no whiteouts, so no root needed).
    fn tree(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
    }

    fn run(upper: &Path, lowers: &[PathBuf]) -> Vec<String> {
        let v = diff(upper, lowers, &DiffOptions::default()).unwrap();
        v.iter()
            .map(|c| format!("{} {}", c.kind.letter(), c.path.escape_ascii()))
            .collect()
    }

    fn same_times(src: &Path, dst: &Path) {
        let m = std::fs::metadata(src).unwrap();
        let f = std::fs::File::open(dst).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
    }

    #[test]
    fn every_ancestor_of_a_change_is_changed() {
        let t = tempfile::tempdir().unwrap();
        let (l, u) = (t.path().join("l"), t.path().join("u"));
        tree(&l, &["a/b/c/f", "a/other", "z"]);
        tree(&u, &["a/b/c/g"]);
        assert_eq!(
            run(&u, std::slice::from_ref(&l)),
            ["C /a", "C /a/b", "C /a/b/c", "A /a/b/c/g"]
        );
        // A copied-up file with the same attributes is no change.
        std::fs::write(u.join("z"), b"x").unwrap();
        same_times(&l.join("z"), &u.join("z"));
        assert_eq!(run(&u, std::slice::from_ref(&l)).len(), 4);
    }

    #[test]
    fn no_lowers_means_everything_added() {
        let t = tempfile::tempdir().unwrap();
        let u = t.path().join("u");
        tree(&u, &["d/e/f", "g"]);
        assert_eq!(run(&u, &[]), ["A /d", "A /d/e", "A /d/e/f", "A /g"]);
    }

    /// Lower directories the upper does not touch are never looked up: each
    /// one here carries a malformed redirect that would fail the diff.
    #[test]
    fn untouched_lower_dirs_are_not_read() {
        let t = tempfile::tempdir().unwrap();
        let (l, u) = (t.path().join("l"), t.path().join("u"));
        tree(&l, &["touched/f", "touched/trap/x", "untouched/trap/x"]);
        tree(&u, &["touched/f"]);
        std::fs::write(u.join("touched/f"), b"longer").unwrap();
        let set = |p: &str| {
            let fd = sys::open_path_dir(&l.join(p)).unwrap();
            xattr::set(
                xattr::Target::Fd(fd.as_fd()),
                c"user.overlay.redirect",
                b"../bad",
                0,
            )
        };
        if let Err(e) = set("touched/trap").and_then(|_| set("untouched/trap")) {
            eprintln!("skipped: no user xattrs here ({e})");
            return;
        }
        let opts = DiffOptions {
            private: Private::USER,
        };
        let v = diff(&u, &[l], &opts).unwrap();
        let paths: Vec<&[u8]> = v.iter().map(|c| &c.path[..]).collect();
        assert_eq!(paths, [&b"/touched"[..], b"/touched/f"]);
    }

    #[test]
    fn oci_markers_in_lowers_are_honoured_and_hidden() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, u) = (t.path().join("l1"), t.path().join("l2"), t.path().join("u"));
        tree(&l2, &["gone", "d/old", "keep"]);
        tree(&l1, &[".wh.gone", "d/.wh..wh..opq", "d/new"]);
        tree(&u, &["gone", "d/old", "d/new"]);
        for p in ["d/old", "d/new"] {
            std::fs::write(u.join(p), b"x").unwrap();
        }
        same_times(&l1.join("d/new"), &u.join("d/new"));
        std::fs::create_dir(u.join("e")).unwrap();
        std::fs::write(u.join("e/.wh.x"), b"").unwrap();
        assert_eq!(
            run(&u, &[l1, l2]),
            ["C /d", "A /d/old", "A /e", "A /e/.wh.x", "A /gone"]
        );
    }
}
