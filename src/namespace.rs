//! Namespace changes in the upper layer (SPEC §6): create, mkdir, mknod,
//! symlink, link, unlink, rmdir, rename.
//!
//! Rules kept here: an object is created directly in the upper parent unless
//! a whiteout sits at its name, in which case it is built in the work
//! directory and swapped in atomically (`RENAME_EXCHANGE`, then the old
//! whiteout is removed); a new directory over a whiteout is opaque; deleting
//! a name that a lower layer has leaves a whiteout (made atomically with
//! `RENAME_WHITEOUT` where possible).

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::inode::{DirLayer, Node};
use crate::layer;
use crate::overlay::{Attr, Caller, OpenIo, OverlayFs, Register};
use crate::protect;
use crate::readdir;
use crate::resolve::{self, Resolved};
use crate::sys::{self, xattr};

/// What kind of object a create makes.
pub enum NewObject<'a> {
    File { flags: i32 },
    Dir,
    Node { rdev: u64 },
    Symlink { target: &'a CStr },
}

/// A parent directory ready for changes: its node and its upper directory.
struct Parent {
    node: Arc<Node>,
    upper: DirLayer,
    /// The parent's lower directories (where a whiteout's need is decided).
    lowers: Vec<DirLayer>,
}

/// A running change of the entries of some directories: lookups in them
/// resolve again meanwhile (`EntryVersions`), and when it ends — done,
/// failed half-way or not begun — the kernel's cached listings of them are
/// dropped, before the change is answered.
pub(crate) struct Changing<'a> {
    ov: &'a OverlayFs,
    dirs: Vec<u64>,
    _version: crate::inode::EntryChange<'a>,
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.ov.listings_changed(&self.dirs);
    }
}

impl OverlayFs {
    /// Marks the entries of `dirs` as changing until the guard drops; taken
    /// before the change touches the disk or any node.
    pub(crate) fn changing(&self, dirs: &[u64]) -> Changing<'_> {
        Changing {
            ov: self,
            dirs: dirs.to_vec(),
            _version: self.nodes.versions.change(dirs),
        }
    }

    /// After a change of the entries of `dirs`: the kernel's cached
    /// listings of them are dropped (the kernel drops them itself only when
    /// a listing starts, which misses a cache being filled meanwhile by a
    /// listing that began earlier) — of the directories ever listed (a
    /// listing marks its node before it reads the layers); the others have
    /// no listing to drop, and most changes (untar, builds) are in those.
    fn listings_changed(&self, dirs: &[u64]) {
        if let Some(inv) = self.invalidator.get() {
            for &d in dirs {
                let listed = self
                    .nodes
                    .get(d)
                    .is_some_and(|n| n.listed.load(std::sync::atomic::Ordering::SeqCst));
                if listed {
                    inv.inval_listing(d);
                }
            }
        }
    }

    fn prepare_parent(&self, ino: u64) -> Result<Parent> {
        self.writable()?;
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Error::new(libc::ENOTDIR, "parent is not a directory"));
        }
        // No entry of an immutable directory changes (see `protect`).
        self.refuse_if(&node, protect::IMMUTABLE, "change in directory")?;
        self.copy_up(&node, false)?;
        let dirs = node.snapshot().dirs;
        let (upper, lowers) = dirs
            .split_first()
            .ok_or_else(|| Error::new(libc::EIO, "directory without layers"))?;
        Ok(Parent {
            upper: upper.clone(),
            lowers: lowers.to_vec(),
            node: node.clone(),
        })
    }

    /// Does some lower layer show `name` in this parent (so deleting it needs
    /// a whiteout)?
    fn lower_has(&self, p: &Parent, name: &CStr) -> Result<bool> {
        Ok(resolve::lookup(&self.stack, &p.lowers, name)?.exists())
    }

    /// Is there a whiteout at `name` in the upper parent? A 0/0 character
    /// device, or an xattr whiteout (a file marked `overlay.whiteout`, meant
    /// for lower layers but hiding the name here too), which a new object
    /// replaces as the kernel's does.
    fn upper_whiteout(&self, p: &Parent, name: &CStr) -> Result<bool> {
        match sys::fstatat(p.upper.fd.as_fd(), name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => Ok(matches!(
                xattr::get(
                    xattr::Target::At(p.upper.fd.as_fd(), name),
                    &self.stack.xname("whiteout")
                ),
                Ok(Some(_))
            )),
            Ok(st) => Ok(crate::whiteout::is_whiteout_stat(&st)),
            Err(e) if crate::error::is_enoent(&e) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("stat {name:?}")),
        }
    }

    fn check_name(name: &CStr) -> Result<()> {
        if !layer::valid_name(name) {
            return Err(Error::new(libc::EINVAL, format!("invalid name {name:?}")));
        }
        if name.to_bytes().len() > 255 {
            return Err(Error::new(libc::ENAMETOOLONG, "name too long"));
        }
        Ok(())
    }

    /// Creates a new object at `name` in directory `parent`, owned by the
    /// caller; returns its attributes and, for files, an open fd.
    pub fn create_object(
        &self,
        caller: Caller,
        parent: u64,
        name: &CStr,
        mode: u32,
        obj: NewObject<'_>,
    ) -> Result<(Attr, Option<std::os::fd::OwnedFd>)> {
        Self::check_name(name)?;
        if let NewObject::Node { rdev: 0 } = obj
            && mode & libc::S_IFMT == libc::S_IFCHR
        {
            return Err(Error::new(
                libc::EPERM,
                "a 0/0 character device is a whiteout",
            ));
        }
        let p = self.prepare_parent(parent)?;
        let _g = p.node.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _v = self.changing(&[parent]);
        // The name must be absent from the merged view: no upper entry and
        // none in the lowers, or an upper whiteout, which the new object
        // replaces (one stat of the upper entry for both questions).
        let pdirs = p.node.snapshot().dirs;
        let exists = || Error::new(libc::EEXIST, format!("{name:?} exists"));
        let over_whiteout = match pdirs.split_first() {
            Some((upper, lowers)) => match resolve::entry_in(&self.stack, upper, name)? {
                resolve::Entry::Found(_) => return Err(exists()),
                resolve::Entry::Whiteout => true,
                resolve::Entry::Missing => {
                    if resolve::lookup(&self.stack, lowers, name)?.exists() {
                        return Err(exists());
                    }
                    false
                }
            },
            None => return Err(Error::new(libc::EIO, "directory without layers")),
        };
        let is_dir = matches!(obj, NewObject::Dir);
        // Over a whiteout the object is made in the work dir and swapped
        // in; under a parent with a default ACL, in a staging dir that
        // carries the same ACL, so that the filesystem gives it the ACL and
        // mode it would get in the parent (as the kernel does).
        let stage = if over_whiteout {
            self.acl_stage(&p)?
        } else {
            None
        };
        let (dir, target) = match (&stage, over_whiteout) {
            (Some((_, fd)), _) => (fd.as_fd(), self.tmp_name()),
            (None, true) => (self.stack.work_fd()?, self.tmp_name()),
            (None, false) => (p.upper.fd.as_fd(), name.to_owned()),
        };
        let pst = sys::fstat(p.upper.fd.as_fd()).ctx(|| "stat parent".into())?;
        let made = self
            .make(dir, &target, mode, &obj, caller, &pst, !over_whiteout)
            .and_then(|fd| match over_whiteout {
                true => self.swap_in(dir, &p, &target, name, is_dir).map(|()| fd),
                false => Ok(fd),
            });
        if made.is_err() && over_whiteout {
            let _ = sys::unlinkat(dir, &target, is_dir);
        }
        if let Some((stage, _)) = &stage {
            let _ = sys::unlinkat(self.stack.work_fd()?, stage, true);
        }
        let fd = made?;
        if is_dir && !over_whiteout && self.opts.redirects() && !p.lowers.is_empty() {
            // As the kernel when offline changes of the lowers are off (its
            // redirect_dir=on): a new directory in a merged one is opaque,
            // so its lookups need not search the lowers (best effort).
            let _ = self.set_opaque_at(p.upper.fd.as_fd(), name);
        }
        // A file is what its fd shows, at `name` in the upper parent (no
        // other change of the parent can run meanwhile: its lock is held);
        // anything else is looked up (a directory's opaque mark, layers).
        let r = match &fd {
            Some(f) => resolve::Resolved::NonDir {
                loc: crate::inode::Loc {
                    layer: p.upper.layer,
                    dir: p.upper.fd.clone(),
                    name: name.into(),
                },
                st: sys::fstat(f.as_fd()).ctx(|| format!("stat new {name:?}"))?,
            },
            None => resolve::lookup(&self.stack, &p.node.snapshot().dirs, name)?,
        };
        let (node, attr) = self.record(&p.node, r)?;
        // A new object has no immutable or append-only flag (none is
        // inherited): nothing to read at its first change.
        node.prot
            .store(protect::KNOWN, std::sync::atomic::Ordering::Relaxed);
        Ok((attr, fd))
    }

    /// Makes the object itself in `dir` and gives it the caller's ownership
    /// and what a setgid `parent` passes on. `in_parent`: `dir` is the
    /// parent (else the work dir, whose filesystem passes nothing on).
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        mode: u32,
        obj: &NewObject<'_>,
        caller: Caller,
        parent: &sys::Stat,
        in_parent: bool,
    ) -> Result<Option<std::os::fd::OwnedFd>> {
        let what = || format!("create {name:?}");
        // A default ACL on the parent replaces the umask (the upper's
        // filesystem then applies the ACL itself).
        let default_acl = has_default_acl(dir);
        let perm = if default_acl {
            mode & 0o7777
        } else {
            mode & 0o7777 & !(caller.umask & 0o777)
        };
        let mut fd = None;
        match obj {
            NewObject::File { flags } => {
                let f = (flags
                    & !(libc::O_APPEND
                        | libc::O_TRUNC
                        | libc::O_NOFOLLOW
                        | crate::overlay::DAEMON_IO_ONLY))
                    | libc::O_CREAT
                    | libc::O_EXCL;
                fd = Some(sys::openat(dir, name, f, perm).ctx(what)?);
            }
            NewObject::Dir => sys::mkdirat(dir, name, perm).ctx(what)?,
            NewObject::Node { rdev } => {
                sys::mknodat(dir, name, (mode & libc::S_IFMT) | perm, *rdev).ctx(what)?
            }
            NewObject::Symlink { target } => sys::symlinkat(target, dir, name).ctx(what)?,
        }
        let setgid_dir = parent.st_mode & libc::S_ISGID != 0;
        let gid = if setgid_dir {
            parent.st_gid
        } else {
            caller.gid
        };
        let inherited = setgid_dir && in_parent;
        let (cur_uid, cur_gid) = (0, if inherited { parent.st_gid } else { 0 });
        // A directory made in the work dir lacks the S_ISGID a setgid
        // parent would have given it.
        let add_sgid = setgid_dir && !in_parent && matches!(obj, NewObject::Dir);
        let chown = caller.uid != cur_uid || gid != cur_gid;
        if matches!(obj, NewObject::Symlink { .. }) {
            if chown {
                sys::fchownat(dir, name, caller.uid, gid).ctx(what)?;
            }
            return Ok(fd);
        }
        let path;
        let o = match &fd {
            Some(f) => f.as_fd(),
            None => {
                path = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0).ctx(what)?;
                path.as_fd()
            }
        };
        finish_mode(
            o,
            perm,
            default_acl,
            self.proc_umask,
            add_sgid,
            chown.then_some((caller.uid, gid)),
        )
        .ctx(what)?;
        Ok(fd)
    }

    /// A directory in the work dir with the default ACL of the upper parent
    /// `p` (and its name), if it has one: objects made there get the ACL and
    /// mode they would get in `p`.
    fn acl_stage(&self, p: &Parent) -> Result<Option<(CString, std::os::fd::OwnedFd)>> {
        let name = c"system.posix_acl_default";
        let Ok(Some(acl)) = xattr::get(xattr::Target::Fd(p.upper.fd.as_fd()), name) else {
            return Ok(None);
        };
        let work = self.stack.work_fd()?;
        let stage = self.tmp_name();
        sys::mkdirat(work, &stage, 0o700).ctx(|| "make ACL staging dir".into())?;
        let made = xattr::set(xattr::Target::At(work, &stage), name, &acl, 0)
            .and_then(|()| sys::open_dir_at(work, &stage));
        match made {
            Ok(fd) => Ok(Some((stage, fd))),
            Err(e) => {
                let _ = sys::unlinkat(work, &stage, true);
                Err(e).ctx(|| "give the staging dir the parent's default ACL".into())
            }
        }
    }

    /// Puts the object built as `tmp` in `work` (the work dir or a staging
    /// dir in it) in place of the whiteout at `name`; a directory put there
    /// becomes opaque.
    fn swap_in(
        &self,
        work: std::os::fd::BorrowedFd<'_>,
        p: &Parent,
        tmp: &CStr,
        name: &CStr,
        is_dir: bool,
    ) -> Result<()> {
        if is_dir {
            xattr::set(
                xattr::Target::At(work, tmp),
                &self.stack.xname("opaque"),
                b"y",
                0,
            )
            .ctx(|| "set opaque".into())?;
        }
        sys::renameat2(work, tmp, p.upper.fd.as_fd(), name, sys::RENAME_EXCHANGE)
            .ctx(|| format!("replace whiteout {name:?}"))?;
        sys::unlinkat(work, tmp, false).ctx(|| "remove old whiteout".into())
    }

    /// Makes a whiteout in the work directory: a hard link of one shared
    /// whiteout, as the kernel's overlayfs does (no inode to allocate per
    /// deletion), or a new one where links cannot be made; a new shared
    /// one when the old is gone or has all the links it can (EMLINK).
    fn make_whiteout(&self) -> Result<CString> {
        let work = self.stack.work_fd()?;
        let tmp = self.tmp_name();
        let mut shared = self
            .shared_whiteout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shared.as_ref() {
            match sys::linkat(work, s, work, &tmp) {
                Ok(()) => return Ok(tmp),
                Err(e) => {
                    log::debug!("shared whiteout: {e}; making a new one");
                    let _ = sys::unlinkat(work, s, false);
                    *shared = None;
                }
            }
        }
        sys::mknodat(work, &tmp, libc::S_IFCHR, 0).ctx(|| "create whiteout".into())?;
        if !self
            .no_shared_whiteout
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let s = self.tmp_name();
            match sys::linkat(work, &tmp, work, &s) {
                Ok(()) => *shared = Some(s),
                Err(e) => {
                    log::debug!("whiteouts not shared: {e}");
                    self.no_shared_whiteout
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(tmp)
    }

    /// Puts a whiteout at `name` in the upper parent, over whatever is there
    /// (nothing, a file, or an empty-but-for-whiteouts directory).
    fn whiteout_at(&self, p: &Parent, name: &CStr, upper_kind: Option<u32>) -> Result<()> {
        let work = self.stack.work_fd()?;
        let wh = self.make_whiteout()?;
        let pfd = p.upper.fd.as_fd();
        let r = match upper_kind {
            None => sys::renameat2(work, &wh, pfd, name, sys::RENAME_NOREPLACE),
            Some(libc::S_IFDIR) => sys::renameat2(work, &wh, pfd, name, sys::RENAME_EXCHANGE),
            Some(_) => sys::renameat2(work, &wh, pfd, name, 0),
        };
        if let Err(e) = r {
            let _ = sys::unlinkat(work, &wh, false);
            return Err(e).ctx(|| format!("whiteout {name:?}"));
        }
        if upper_kind == Some(libc::S_IFDIR) {
            // the old directory is now in the work dir under `wh`
            let d = sys::open_dir_at(work, &wh).ctx(|| "open removed dir".into())?;
            layer::clean_dir(d.as_fd()).ctx(|| "clean removed dir".into())?;
            sys::unlinkat(work, &wh, true).ctx(|| "remove dir".into())?;
        }
        Ok(())
    }

    /// unlink and rmdir.
    pub fn remove(&self, parent: u64, name: &CStr, dir: bool) -> Result<()> {
        self.writable()?;
        let pnode = self.node(parent)?;
        let r = resolve::lookup(&self.stack, &pnode.snapshot().dirs, name)?;
        if r.exists() {
            self.refuse_if(&pnode, protect::ANY, "remove from directory")?;
            protect::refuse(self.prot_of(&r), protect::ANY, "remove")?;
        }
        match (&r, dir) {
            (Resolved::Absent, _) => {
                return Err(Error::new(libc::ENOENT, format!("{name:?} not found")));
            }
            (Resolved::Dir { .. }, false) => {
                return Err(Error::new(libc::EISDIR, "unlink of a directory"));
            }
            (Resolved::NonDir { .. }, true) => {
                return Err(Error::new(libc::ENOTDIR, "rmdir of a non-directory"));
            }
            (Resolved::Dir { dirs, .. }, true) if !readdir::list(&self.stack, dirs)?.is_empty() => {
                return Err(Error::new(libc::ENOTEMPTY, format!("{name:?} not empty")));
            }
            _ => {}
        }
        let ino = resolve::ino_of(&self.stack, &r)?;
        let p = self.prepare_parent(parent)?;
        let _g = p.node.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _v = self.changing(&[parent]);
        let upper_kind = match sys::fstatat(p.upper.fd.as_fd(), name) {
            Ok(st) => Some(st.st_mode & libc::S_IFMT),
            Err(e) if crate::error::is_enoent(&e) => None,
            Err(e) => return Err(e).ctx(|| format!("stat {name:?}")),
        };
        self.detach(parent, name, ino, &r);
        self.remove_entry(&p, name, upper_kind)
    }

    /// Removes `name` from the merged view of a locked parent: a whiteout
    /// where a lower layer has it, else the upper entry goes.
    fn remove_entry(&self, p: &Parent, name: &CStr, upper_kind: Option<u32>) -> Result<()> {
        if self.lower_has(p, name)? {
            return self.whiteout_at(p, name, upper_kind);
        }
        match upper_kind {
            Some(libc::S_IFDIR) => {
                let d = sys::open_dir_at(p.upper.fd.as_fd(), name).ctx(|| "open dir".into())?;
                layer::clean_dir(d.as_fd()).ctx(|| "clean whiteouts".into())?;
                sys::unlinkat(p.upper.fd.as_fd(), name, true).ctx(|| format!("rmdir {name:?}"))
            }
            Some(_) => {
                sys::unlinkat(p.upper.fd.as_fd(), name, false).ctx(|| format!("unlink {name:?}"))
            }
            None => Err(Error::new(libc::ENOENT, "vanished")),
        }
    }

    /// Keeps a deleted object reachable for those who still hold it (open
    /// files, a cwd): an `O_PATH` fd on it, and no name.
    fn detach(&self, parent: u64, name: &CStr, ino: u64, r: &Resolved) {
        let (fd, lower) = match r {
            Resolved::NonDir { loc, .. } => (
                sys::openat(loc.dir.as_fd(), &loc.name, libc::O_PATH, 0)
                    .ok()
                    .map(Arc::new),
                self.stack.is_lower(loc.layer),
            ),
            _ => (None, false),
        };
        for node in self.nodes_at(parent, name, ino) {
            node.set_state(|s| {
                s.loc = None;
                s.unlinked = true;
                s.detached = fd.clone();
                s.detached_lower = lower;
            });
            // A per-name node (a name of a hard-linked file) stays in the
            // table until the kernel forgets it, which it tells later: the
            // next object at this name must not be taken for it.
            self.nodes.unkey(&node);
        }
    }

    /// The nodes through which the kernel may hold the object at `name` in
    /// `parent`: its per-name node, and the node of its inode number (or
    /// the one it was copied up from, `NodeTable::alias`) if that node is
    /// located at this very name.
    fn nodes_at(&self, parent: u64, name: &CStr, st_ino: u64) -> Vec<Arc<Node>> {
        let mut v: Vec<Arc<Node>> = self
            .nodes
            .get_path(&(parent, name.to_bytes().to_vec()))
            .into_iter()
            .collect();
        let own = [self.nodes.get(st_ino), self.nodes.aliased(st_ino)];
        for n in own.into_iter().flatten() {
            if v.iter().any(|x| Arc::ptr_eq(x, &n)) {
                continue;
            }
            let s = n.snapshot();
            let here = s.parent.as_ref().map(|p| p.ino) == Some(parent)
                && s.loc.as_ref().is_some_and(|l| l.name.as_c_str() == name);
            if here || n.is_dir() {
                v.push(n);
            }
        }
        v
    }

    /// rename, with `RENAME_NOREPLACE` and `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        oldp: u64,
        oldname: &CStr,
        newp: u64,
        newname: &CStr,
        flags: u32,
    ) -> Result<()> {
        Self::check_name(newname)?;
        self.writable()?;
        let exchange = flags & sys::RENAME_EXCHANGE != 0;
        let op = self.node(oldp)?;
        let np = self.node(newp)?;
        let old = resolve::lookup(&self.stack, &op.snapshot().dirs, oldname)?;
        let new = resolve::lookup(&self.stack, &np.snapshot().dirs, newname)?;
        if !old.exists() || (exchange && !new.exists()) {
            return Err(Error::new(libc::ENOENT, "rename source not found"));
        }
        if new.exists() && flags & sys::RENAME_NOREPLACE != 0 {
            return Err(Error::new(libc::EEXIST, "rename target exists"));
        }
        // Two names of one upper file: nothing to do, as the VFS decides
        // for one inode before the filesystem is asked (here for names the
        // kernel may not know as one yet, e.g. made outside the overlay).
        if (oldp == newp && oldname == newname) || same_upper_file(&self.stack, &old, &new) {
            return Ok(());
        }
        if flags & !(sys::RENAME_EXCHANGE | sys::RENAME_NOREPLACE) != 0 {
            // RENAME_WHITEOUT among them: refused, as the kernel's overlay
            // refuses it.
            return Err(Error::new(libc::EINVAL, "unsupported rename flags"));
        }
        // The kernel's `may_delete` of the source (and of the target it
        // replaces or exchanges), `may_create` in the new parent.
        self.refuse_if(&op, protect::ANY, "rename from directory")?;
        protect::refuse(self.prot_of(&old), protect::ANY, "rename")?;
        match new.exists() {
            true => {
                self.refuse_if(&np, protect::ANY, "rename over an entry of directory")?;
                protect::refuse(self.prot_of(&new), protect::ANY, "rename over")?;
            }
            false => self.refuse_if(&np, protect::IMMUTABLE, "rename into directory")?,
        }
        self.check_rename_types(&old, &new, exchange)?;
        // The nodes through which the kernel holds both objects (a fresh,
        // temporary one if it holds none: lookups given back at the end).
        let mut temp = Vec::new();
        let old_nodes = self.held_nodes(&op, oldname, old, &mut temp)?;
        let new_nodes = match new.exists() {
            true => {
                let r = resolve::lookup(&self.stack, &np.snapshot().dirs, newname)?;
                self.held_nodes(&np, newname, r, &mut temp)?
            }
            false => Vec::new(),
        };
        let result = self.rename_nodes(
            oldp, oldname, newp, newname, &new, exchange, &old_nodes, &new_nodes,
        );
        for n in temp {
            self.forget(n.ino, 1);
        }
        result
    }

    fn held_nodes(
        &self,
        parent: &Arc<Node>,
        name: &CStr,
        r: Resolved,
        temp: &mut Vec<Arc<Node>>,
    ) -> Result<Vec<Arc<Node>>> {
        let ino = resolve::ino_of(&self.stack, &r)?;
        let held = self.nodes_at(parent.ino, name, ino);
        if !held.is_empty() {
            return Ok(held);
        }
        let n = self.record(parent, r)?.0;
        temp.push(n.clone());
        Ok(vec![n])
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_nodes(
        &self,
        oldp: u64,
        oldname: &CStr,
        newp: u64,
        newname: &CStr,
        new: &Resolved,
        exchange: bool,
        old_nodes: &[Arc<Node>],
        new_nodes: &[Arc<Node>],
    ) -> Result<()> {
        let old_node = &old_nodes[0];
        self.movable(old_node)?;
        let exchanged = new_nodes.first().filter(|_| exchange);
        if let Some(n) = exchanged {
            self.movable(n)?;
        }
        self.copy_up(old_node, false)?;
        if let Some(n) = exchanged {
            self.copy_up(n, false)?;
        }
        let po = self.prepare_parent(oldp)?;
        let pn = self.prepare_parent(newp)?;
        // Both parents locked (in inode order) against concurrent changes.
        let (first, second) = if po.node.ino <= pn.node.ino {
            (&po.node, &pn.node)
        } else {
            (&pn.node, &po.node)
        };
        let _g1 = first.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _g2 = (!Arc::ptr_eq(first, second))
            .then(|| second.lock.lock().unwrap_or_else(|e| e.into_inner()));
        // From here until the nodes are updated, lookups in both parents
        // resolve again; a directory moved to another parent has a new `..`.
        let mut dirs = vec![oldp, newp];
        if oldp != newp {
            let moved = old_nodes.iter().chain(exchanged);
            dirs.extend(moved.filter(|n| n.is_dir()).map(|n| n.ino));
        }
        let _v = self.changing(&dirs);
        if !exchange && new.exists() {
            let ino = resolve::ino_of(&self.stack, new)?;
            self.detach(newp, newname, ino, new);
        }
        self.do_rename(&po, oldname, &pn, newname, exchanged, old_node)?;
        if exchanged.is_some() {
            for n in new_nodes {
                self.after_move(&po, oldname, n)?;
            }
        }
        for n in old_nodes {
            self.after_move(&pn, newname, n)?;
        }
        Ok(())
    }

    fn check_rename_types(&self, old: &Resolved, new: &Resolved, exchange: bool) -> Result<()> {
        if exchange {
            return Ok(());
        }
        match (old, new) {
            (Resolved::Dir { .. }, Resolved::NonDir { .. }) => {
                Err(Error::new(libc::ENOTDIR, "dir over non-dir"))
            }
            (Resolved::NonDir { .. }, Resolved::Dir { .. }) => {
                Err(Error::new(libc::EISDIR, "non-dir over dir"))
            }
            (Resolved::Dir { dirs: from, .. }, Resolved::Dir { dirs, .. }) => {
                // A directory that cannot move is refused before the target
                // is looked at, in the kernel's order (EXDEV, then ENOTEMPTY).
                if !self.opts.redirects() && from.iter().any(|d| self.stack.is_lower(d.layer)) {
                    return Err(Error::new(
                        libc::EXDEV,
                        "renaming a directory with lower contents",
                    ));
                }
                if readdir::list(&self.stack, dirs)?.is_empty() {
                    Ok(())
                } else {
                    Err(Error::new(libc::ENOTEMPTY, "rename over a non-empty dir"))
                }
            }
            _ => Ok(()),
        }
    }

    /// A directory with lower contents moves only with the kernel's redirect
    /// format (`redirect_dir=on`); without it, `EXDEV`, as the kernel's
    /// default (`mv` then copies).
    fn movable(&self, node: &Node) -> Result<()> {
        if self.has_lower_dirs(node) && !self.opts.redirects() {
            return Err(Error::new(
                libc::EXDEV,
                "renaming a directory with lower contents (redirect_dir is off)",
            ));
        }
        Ok(())
    }

    /// A directory whose merge takes in lower layers (a merged or lower
    /// directory, the kernel's "merge or lower" type).
    fn has_lower_dirs(&self, node: &Node) -> bool {
        node.is_dir() && node.read_state(|s| s.dirs.iter().any(|d| self.stack.is_lower(d.layer)))
    }

    /// Before a directory with lower contents moves from `name` in `p`
    /// (already copied up): records in its upper copy where its lower
    /// contents are, as the kernel's `ovl_set_redirect`. A redirect it has
    /// stays if it is still right (any, within the same directory; an
    /// absolute one, anywhere); else it becomes its current name (same
    /// directory) or the path of its lower contents from the root: each
    /// component the directory's or an ancestor's relative redirect, else
    /// its name, up to the root or an ancestor's absolute redirect.
    fn set_redirect(&self, p: &Parent, name: &CStr, samedir: bool) -> Result<()> {
        /// The kernel's `redirect_max`: a longer path is refused (`EXDEV`).
        const REDIRECT_MAX: usize = 256;
        let key = self.stack.xname("redirect");
        let what = || format!("redirect of {name:?}");
        let target = xattr::Target::At(p.upper.fd.as_fd(), name);
        let own = xattr::get(target, &key).ctx(what)?;
        if own.as_ref().is_some_and(|r| samedir || r.starts_with(b"/")) {
            return Ok(());
        }
        let value = if samedir {
            name.to_bytes().to_vec()
        } else {
            let mut comps = vec![own.unwrap_or_else(|| name.to_bytes().to_vec())];
            let mut cur = p.node.clone();
            loop {
                let (parent, upper, own_name) = cur.read_state(|s| {
                    let upper = s.dirs.first().filter(|d| self.stack.is_upper(d.layer));
                    (
                        s.parent.clone(),
                        upper.map(|d| d.fd.clone()),
                        s.loc.as_ref().map(|l| l.name.to_bytes().to_vec()),
                    )
                });
                let Some(parent) = parent else { break };
                let r = match &upper {
                    Some(fd) => xattr::get(xattr::Target::Fd(fd.as_fd()), &key).ctx(what)?,
                    None => None,
                };
                let absolute = r.as_ref().is_some_and(|r| r.starts_with(b"/"));
                let comp = r.or(own_name).ok_or_else(|| {
                    Error::new(libc::EXDEV, "a parent directory has no known name")
                })?;
                comps.push(comp);
                if absolute {
                    break;
                }
                cur = parent;
            }
            let mut path = Vec::new();
            for c in comps.iter().rev() {
                if !c.starts_with(b"/") {
                    path.push(b'/');
                }
                path.extend_from_slice(c);
            }
            if path.len() > REDIRECT_MAX {
                return Err(Error::new(
                    libc::EXDEV,
                    "the directory's path is too long for a redirect",
                ));
            }
            path
        };
        match xattr::set(target, &key, &value, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Err(Error::new(
                libc::EXDEV,
                "the upper layer takes no redirect xattr",
            )),
            r => r.ctx(what),
        }
    }

    fn do_rename(
        &self,
        po: &Parent,
        oldname: &CStr,
        pn: &Parent,
        newname: &CStr,
        exchanged: Option<&Arc<Node>>,
        moved: &Arc<Node>,
    ) -> Result<()> {
        let (ofd, nfd) = (po.upper.fd.as_fd(), pn.upper.fd.as_fd());
        // Objects with an origin moving to a new directory make it "impure"
        // (its listing must look up their inode numbers), as the kernel marks it.
        if !Arc::ptr_eq(&po.node, &pn.node) {
            if self.has_origin(ofd, oldname) {
                self.mark_impure(pn);
            }
            if exchanged.is_some() && self.has_origin(nfd, newname) {
                self.mark_impure(po);
            }
        }
        let samedir = Arc::ptr_eq(&po.node, &pn.node);
        if let Some(other) = exchanged {
            if self.has_lower_dirs(moved) {
                self.set_redirect(po, oldname, samedir)?;
            } else if moved.is_dir() && !pn.lowers.is_empty() {
                self.set_opaque_at(ofd, oldname)?;
            }
            if self.has_lower_dirs(other) {
                self.set_redirect(pn, newname, samedir)?;
            } else if other.is_dir() && !po.lowers.is_empty() {
                self.set_opaque_at(nfd, newname)?;
            }
            return sys::renameat2(ofd, oldname, nfd, newname, sys::RENAME_EXCHANGE)
                .ctx(|| format!("exchange {oldname:?} {newname:?}"));
        }
        let old_needs_wh = self.lower_has(po, oldname)?;
        let new_has_lower = self.lower_has(pn, newname)?;
        let new_upper = match sys::fstatat(nfd, newname) {
            Ok(st) => Some(st),
            Err(e) if crate::error::is_enoent(&e) => None,
            Err(e) => return Err(e).ctx(|| format!("stat {newname:?}")),
        };
        let target_is_wh = new_upper
            .as_ref()
            .is_some_and(crate::whiteout::is_whiteout_stat);
        if let Some(st) = &new_upper
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
        {
            let d = sys::open_dir_at(nfd, newname).ctx(|| "open target dir".into())?;
            layer::clean_dir(d.as_fd()).ctx(|| "clean target dir".into())?;
        }
        // Like the kernel: a directory with lower contents keeps them through
        // a redirect; one without, moved into a merged directory (or onto a
        // hidden lower name), becomes opaque, so no lower directory of the
        // same name can ever merge into it.
        if self.has_lower_dirs(moved) {
            self.set_redirect(po, oldname, samedir)?;
        } else if moved.is_dir() && (new_has_lower || target_is_wh || !pn.lowers.is_empty()) {
            self.set_opaque_at(ofd, oldname)?;
        }
        if target_is_wh && moved.is_dir() {
            // A directory cannot replace a whiteout by plain rename.
            sys::renameat2(ofd, oldname, nfd, newname, sys::RENAME_EXCHANGE)
                .ctx(|| "rename over whiteout".into())?;
            if !old_needs_wh {
                sys::unlinkat(ofd, oldname, false).ctx(|| "remove swapped whiteout".into())?;
            }
        } else if old_needs_wh {
            match sys::renameat2(ofd, oldname, nfd, newname, sys::RENAME_WHITEOUT) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    sys::renameat2(ofd, oldname, nfd, newname, 0).ctx(|| "rename".into())?;
                    self.whiteout_at(po, oldname, None)?;
                }
                r => r.ctx(|| format!("rename {oldname:?} to {newname:?}"))?,
            }
        } else {
            sys::renameat2(ofd, oldname, nfd, newname, 0)
                .ctx(|| format!("rename {oldname:?} to {newname:?}"))?;
        }
        Ok(())
    }

    fn set_opaque_at(&self, dir: std::os::fd::BorrowedFd<'_>, name: &CStr) -> Result<()> {
        let d = sys::open_dir_at(dir, name).ctx(|| "open moved dir".into())?;
        xattr::set(
            xattr::Target::Fd(d.as_fd()),
            &self.stack.xname("opaque"),
            b"y",
            0,
        )
        .ctx(|| "set opaque".into())
    }

    fn has_origin(&self, dir: std::os::fd::BorrowedFd<'_>, name: &CStr) -> bool {
        matches!(
            xattr::get(xattr::Target::At(dir, name), &self.stack.xname("origin")),
            Ok(Some(_))
        )
    }

    fn mark_impure(&self, p: &Parent) {
        let _ = xattr::set(
            xattr::Target::Fd(p.upper.fd.as_fd()),
            &self.stack.xname("impure"),
            b"y",
            0,
        );
    }

    /// Points the moved node at its new place.
    fn after_move(&self, pn: &Parent, newname: &CStr, moved: &Arc<Node>) -> Result<()> {
        let r = resolve::lookup(&self.stack, &pn.node.snapshot().dirs, newname)?;
        let (loc, dirs) = match r {
            Resolved::Dir { loc, dirs, .. } => (loc, dirs),
            Resolved::NonDir { loc, .. } => (loc, Vec::new()),
            Resolved::Absent => return Err(Error::new(libc::EIO, "moved object vanished")),
        };
        self.nodes
            .rekey(moved, (pn.node.ino, newname.to_bytes().to_vec()));
        moved.set_state(|s| {
            s.parent = Some(pn.node.clone());
            s.loc = Some(loc);
            if !dirs.is_empty() {
                s.dirs = dirs.into();
            }
        });
        Ok(())
    }

    /// link: a new name for an existing non-directory.
    pub fn link(&self, ino: u64, newp: u64, newname: &CStr) -> Result<Attr> {
        Self::check_name(newname)?;
        self.writable()?;
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(Error::new(libc::EPERM, "hard link to a directory"));
        }
        let np = self.node(newp)?;
        self.refuse_if(&np, protect::IMMUTABLE, "link into directory")?;
        self.refuse_if(&node, protect::ANY, "link")?;
        let snap = node.snapshot();
        let src = match (&snap.loc, &snap.detached) {
            // An O_TMPFILE file (the kernel links no other nameless file):
            // linked through its fd.
            (None, Some(fd)) => crate::inode::Loc {
                layer: 0,
                dir: fd.clone(),
                name: Default::default(),
            },
            _ => self.copy_up(&node, false)?,
        };
        let p = self.prepare_parent(newp)?;
        let _g = p.node.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _v = self.changing(&[newp]);
        if resolve::lookup(&self.stack, &p.node.snapshot().dirs, newname)?.exists() {
            return Err(Error::new(libc::EEXIST, format!("{newname:?} exists")));
        }
        if self.has_origin(src.dir.as_fd(), &src.name) {
            self.mark_impure(&p);
        }
        if self.upper_whiteout(&p, newname)? {
            let tmp = self.tmp_name();
            sys::linkat(src.dir.as_fd(), &src.name, self.stack.work_fd()?, &tmp)
                .ctx(|| "link".into())?;
            self.swap_in(self.stack.work_fd()?, &p, &tmp, newname, false)?;
        } else {
            sys::linkat(src.dir.as_fd(), &src.name, p.upper.fd.as_fd(), newname)
                .ctx(|| "link".into())?;
        }
        // The new name leads to the object's node (`record_as`), whose
        // link count and ctime the kernel updates itself.
        let r = resolve::lookup(&self.stack, &p.node.snapshot().dirs, newname)?;
        Ok(self.record(&p.node, r)?.1)
    }
}

/// Whether `a` and `b` are one file in the upper layer (two of its names).
fn same_upper_file(stack: &crate::layer::Stack, a: &Resolved, b: &Resolved) -> bool {
    match (a, b) {
        (Resolved::NonDir { loc: la, st: sa }, Resolved::NonDir { loc: lb, st: sb }) => {
            stack.is_upper(la.layer)
                && stack.is_upper(lb.layer)
                && (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
        }
        _ => false,
    }
}

/// Whether directory `dir` has a default ACL (which then replaces the
/// umask of objects made in it, and gives them its own mode bits).
fn has_default_acl(dir: std::os::fd::BorrowedFd<'_>) -> bool {
    matches!(
        xattr::get(xattr::Target::Fd(dir), c"system.posix_acl_default"),
        Ok(Some(_))
    )
}

/// Gives a new object (open as `o`, also `O_PATH`) its owner and keeps the
/// mode its filesystem gave it: the bits a default ACL left, and its
/// setuid/setgid bits, which the daemon's chown clears. `perm`: the mode it
/// was made with (the process umask, applied in a library mount, is
/// undone unless a default ACL took the umask's place); `add_sgid`: a
/// directory made outside a setgid parent gets its S_ISGID; `chown`: the
/// owner to give it.
fn finish_mode(
    o: std::os::fd::BorrowedFd<'_>,
    perm: u32,
    default_acl: bool,
    proc_umask: u32,
    add_sgid: bool,
    chown: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let made = sys::fstat(o)?.st_mode & 0o7777;
    let mut want = if !default_acl && perm & proc_umask != 0 {
        perm
    } else {
        made
    };
    if add_sgid {
        want |= libc::S_ISGID;
    }
    if let Some((uid, gid)) = chown {
        sys::fchownat(o, c"", uid, gid)?;
    }
    // The chown can only have cleared setuid/setgid bits.
    let cleared = chown.is_some() && made & (libc::S_ISUID | libc::S_ISGID) != 0;
    if cleared || want != made {
        let now = sys::fstat(o)?.st_mode & 0o7777;
        if now != want {
            sys::fchmod_fd(o, want)?;
        }
    }
    Ok(())
}

impl OverlayFs {
    /// O_TMPFILE: an unnamed file in the upper copy of `parent`, opened; a
    /// later `link` gives it a name.
    pub fn tmpfile(
        &self,
        caller: Caller,
        parent: u64,
        mode: u32,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> Result<(Attr, u64, OpenIo)> {
        let p = self.prepare_parent(parent)?;
        let pst = sys::fstat(p.upper.fd.as_fd()).ctx(|| "stat parent".into())?;
        let default_acl = has_default_acl(p.upper.fd.as_fd());
        let perm = if default_acl {
            mode & 0o7777
        } else {
            mode & 0o7777 & !(caller.umask & 0o777)
        };
        let acc = flags & libc::O_ACCMODE;
        let acc = if acc == libc::O_RDONLY {
            libc::O_RDWR
        } else {
            acc
        };
        let fd = sys::openat(p.upper.fd.as_fd(), c".", libc::O_TMPFILE | acc, perm)
            .ctx(|| "O_TMPFILE".into())?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            caller.gid
        };
        let inherited = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            0
        };
        let chown = (caller.uid != 0 || gid != inherited).then_some((caller.uid, gid));
        finish_mode(fd.as_fd(), perm, default_acl, self.proc_umask, false, chown)
            .ctx(|| "O_TMPFILE mode and owner".into())?;
        let st = sys::fstat(fd.as_fd()).ctx(|| "stat tmpfile".into())?;
        let ino = self.stack.map_ino(p.upper.layer, st.st_ino);
        let path = fd.try_clone().ctx(|| "dup tmpfile".into())?;
        let state = crate::inode::NodeState {
            parent: Some(p.node.clone()),
            loc: None,
            dirs: Box::default(),
            detached: Some(Arc::new(path)),
            detached_lower: false,
            unlinked: true,
        };
        let node = self
            .nodes
            .lookup(
                ino,
                libc::S_IFREG,
                state,
                crate::inode::Fresh::Current,
                |l| self.stack.is_upper(l),
            )
            .ok_or_else(|| Error::new(libc::EIO, "tmpfile not recorded"))?;
        let attr = self.getattr(ino, None)?;
        let (fh, io) = self.insert_file(
            node,
            crate::overlay::OpenFd::Now(fd),
            0,
            flags & !libc::O_TMPFILE,
            register,
        );
        Ok((attr, fh, io))
    }

    /// create: a new regular file, opened.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> Result<(Attr, u64, OpenIo)> {
        let mode = (mode & 0o7777) | libc::S_IFREG;
        let (attr, fd) =
            self.create_object(caller, parent, name, mode, NewObject::File { flags })?;
        let node = self.node(attr.ino)?;
        let fd = fd.ok_or_else(|| Error::new(libc::EIO, "create returned no fd"))?;
        let generation = node.generation.load(std::sync::atomic::Ordering::Acquire);
        let (fh, io) = self.insert_file(
            node,
            crate::overlay::OpenFd::Now(fd),
            generation,
            flags,
            register,
        );
        Ok((attr, fh, io))
    }
}
