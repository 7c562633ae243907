//! Applies one layer tar to a directory, in overlay format (SPEC §9):
//! `.wh.NAME` becomes a character device 0/0 at NAME (owner from the
//! header), `.wh..wh..opq` sets `<private>opaque="y"` on its directory
//! wherever it appears in the tar, hard links become hard links.
//!
//! Safety: every object is reached from the layer's directory fd, one
//! component at a time, with `O_NOFOLLOW`; a parent that is a symlink (or
//! anything but a directory) is an error, never followed. Names with `..`
//! or a leading `/` are refused (see [`super::tarsafe`]). Hard links must
//! point at an object already in this layer.
//!
//! Order of work, and why:
//! - regular files: data, then owner (chown clears setuid bits and
//!   `security.capability`), then mode, then xattrs, then times;
//! - directories are created owner-writable; their mode, opaque marker and
//!   times are applied at the end, deepest first, once nothing more will be
//!   created in them (creating a child changes a directory's mtime, and a
//!   read-only mode would stop an unprivileged import half-way).
//!
//! When not running as root, device nodes are refused (the import fails,
//! naming the entry) and owners that cannot be set are left as the
//! importing user's, with one warning at the end.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::tarsafe::{self, Marker};
use super::tarstream::{self, Kind, Member, Time};
use super::{Error, Result, show};
use crate::layer::cname;
use crate::sys::{self, xattr};
use crate::whiteout::Private;

/// How a layer is unpacked.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the opaque marker goes (`trusted.overlay.` or `user.overlay.`).
    pub private: Private,
    /// Whether we may chown, mknod devices and set `trusted.*` xattrs.
    pub root: bool,
}

/// What an unpack did.
#[derive(Debug, Default)]
pub struct Stats {
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Entries whose owner could not be set (not running as root).
    pub unowned: u64,
    /// Non-fatal problems, one line each.
    pub warnings: Vec<String>,
}

/// Unpacks the layer tar read from `r` into the directory `root`.
/// `progress` is called after each member.
pub fn unpack<R: Read>(
    r: R,
    root: BorrowedFd<'_>,
    opts: &Options,
    mut progress: impl FnMut(&Stats),
) -> Result<(Stats, R)> {
    let mut archive = tar::Archive::new(r);
    let mut u = Unpacker::new(root, opts);
    let entries = archive
        .entries()
        .map_err(|e| Error::new(format!("reading the tar: {e}")))?;
    tarstream::for_each(entries, |m, data| {
        u.apply(m, data)?;
        progress(&u.s.st);
        Ok(())
    })?;
    let stats = u.finish()?;
    Ok((stats, archive.into_inner()))
}

/// Open directories along the path of the last entry, so that a sorted tar
/// costs one `openat` per new directory, not one per component per entry.
struct DirStack {
    comps: Vec<Vec<u8>>,
    fds: Vec<OwnedFd>,
}

impl DirStack {
    /// The directory `comps` below `root`, creating missing ones (mode 0755,
    /// as docker does for parents a tar does not list) if `create`.
    fn open<'a>(
        &'a mut self,
        root: BorrowedFd<'a>,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<BorrowedFd<'a>> {
        let common = self
            .comps
            .iter()
            .zip(comps)
            .take_while(|(a, b)| a.as_slice() == **b)
            .count();
        self.comps.truncate(common);
        self.fds.truncate(common);
        for (i, c) in comps.iter().enumerate().skip(common) {
            let parent = self.fds.last().map_or(root, |f| f.as_fd());
            let fd = open_subdir(parent, c, create)
                .map_err(|why| Error::new(format!("'{}' {why}", show(&comps[..=i].join(&b'/')))))?;
            self.comps.push(c.to_vec());
            self.fds.push(fd);
        }
        Ok(self.fds.last().map_or(root, |f| f.as_fd()))
    }

    /// Forgets directories deeper than `depth` (after a removal below it).
    fn truncate(&mut self, depth: usize) {
        self.comps.truncate(depth);
        self.fds.truncate(depth);
    }
}

/// Opens one directory component, never following a symlink.
fn open_subdir(
    parent: BorrowedFd<'_>,
    name: &[u8],
    create: bool,
) -> std::result::Result<OwnedFd, String> {
    let c = cname(name).map_err(|e| e.to_string())?;
    match sys::open_dir_at(parent, &c) {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
            sys::mkdirat(parent, &c, 0o755).map_err(|e| format!("cannot be created: {e}"))?;
            let fd = sys::open_dir_at(parent, &c).map_err(|e| format!("cannot be opened: {e}"))?;
            // Explicitly, whatever the umask.
            sys::fchmod_fd(fd.as_fd(), 0o755).map_err(|e| format!("chmod: {e}"))?;
            Ok(fd)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Err("does not exist in the layer".into())
        }
        Err(e) => Err(match sys::fstatat(parent, &c) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                "is a symlink (refusing to follow it)".into()
            }
            Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => "is not a directory".into(),
            _ => format!("cannot be opened: {e}"),
        }),
    }
}

/// A directory whose mode and times are set at the end.
struct DeferredDir {
    comps: Vec<Vec<u8>>,
    mode: u32,
    mtime: Time,
}

/// Everything but the directory cache, so both can be borrowed at once.
struct State<'a> {
    root: BorrowedFd<'a>,
    opts: &'a Options,
    dirs: Vec<DeferredDir>,
    opaque: Vec<Vec<Vec<u8>>>,
    /// Set when a directory was removed (the cache below it is stale).
    removed_dir: bool,
    st: Stats,
    buf: Vec<u8>,
}

struct Unpacker<'a> {
    stack: DirStack,
    s: State<'a>,
}

impl<'a> Unpacker<'a> {
    fn new(root: BorrowedFd<'a>, opts: &'a Options) -> Self {
        Unpacker {
            stack: DirStack {
                comps: Vec::new(),
                fds: Vec::new(),
            },
            s: State {
                root,
                opts,
                dirs: Vec::new(),
                opaque: Vec::new(),
                removed_dir: false,
                st: Stats::default(),
                buf: vec![0u8; 256 * 1024],
            },
        }
    }

    fn apply(&mut self, m: &Member, data: &mut dyn Read) -> Result<()> {
        self.apply_inner(m, data)
            .map_err(|e| e.context(format!("entry '{}'", show(&m.name))))
    }

    fn apply_inner(&mut self, m: &Member, data: &mut dyn Read) -> Result<()> {
        self.s.st.entries += 1;
        let comps = tarsafe::split_name(&m.name).map_err(Error::new)?;
        let Some((last, parents)) = comps.split_last() else {
            return self.s.layer_root(m);
        };
        if let Some(bad) = parents.iter().find(|c| !tarsafe::valid_parent(c)) {
            return Err(Error::new(format!(
                "parent '{}' is an OCI whiteout marker, not a directory",
                show(bad)
            )));
        }
        let marker = tarsafe::classify(last);
        if let Marker::Invalid = marker {
            return Err(Error::new("invalid whiteout name (it hides nothing)"));
        }
        if let Marker::AufsMeta = marker {
            self.s
                .st
                .warnings
                .push(format!("skipped AUFS metadata entry '{}'", show(&m.name)));
            return Ok(());
        }
        let dir = self.stack.open(self.s.root, parents, true)?;
        match marker {
            Marker::Opaque => {
                self.s
                    .opaque
                    .push(parents.iter().map(|c| c.to_vec()).collect());
                Ok(())
            }
            Marker::Whiteout(target) => self.s.whiteout(dir, target, m),
            _ => self.s.create(dir, parents, last, m, data),
        }?;
        if std::mem::take(&mut self.s.removed_dir) {
            self.stack.truncate(parents.len());
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Stats> {
        self.stack.truncate(0);
        self.s.finish()?;
        Ok(self.s.st)
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::new(format!("{what}: {e}"))
}

fn is(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

fn times(t: Time) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    };
    [ts, ts]
}

impl State<'_> {
    /// `./` names the layer directory itself: its owner, xattrs, mode and
    /// times are those of the merged root.
    fn layer_root(&mut self, m: &Member) -> Result<()> {
        if m.kind != Kind::Dir {
            return Err(Error::new("names the layer root but is not a directory"));
        }
        let root = self.root;
        self.chown(root, c"", m)?;
        self.xattrs(xattr::Target::Fd(root), m)?;
        self.dirs.push(DeferredDir {
            comps: Vec::new(),
            mode: m.mode,
            mtime: m.mtime,
        });
        Ok(())
    }

    fn create(
        &mut self,
        dir: BorrowedFd<'_>,
        parents: &[&[u8]],
        name: &[u8],
        m: &Member,
        data: &mut dyn Read,
    ) -> Result<()> {
        let c = cname(name).map_err(io_err("bad name"))?;
        match m.kind {
            Kind::Dir => self.dir(dir, &c, parents, name, m),
            Kind::File => self.file(dir, &c, m, data),
            Kind::Symlink => {
                let target = CString::new(m.link.clone())
                    .map_err(|_| Error::new("NUL byte in symlink target"))?;
                if target.as_bytes().is_empty() {
                    return Err(Error::new("empty symlink target"));
                }
                self.make_room(dir, &c, |()| sys::symlinkat(&target, dir, &c))?;
                self.finish_node(dir, &c, m, false)
            }
            Kind::HardLink => self.hard_link(dir, &c, parents, name, m),
            Kind::Char | Kind::Block | Kind::Fifo => self.node(dir, &c, m),
        }
    }

    fn dir(
        &mut self,
        dir: BorrowedFd<'_>,
        c: &CString,
        parents: &[&[u8]],
        name: &[u8],
        m: &Member,
    ) -> Result<()> {
        match sys::mkdirat(dir, c, 0o700) {
            Err(e) if is(&e, libc::EEXIST) => {
                let st = sys::fstatat(dir, c).map_err(io_err("stat"))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    // A later entry replaces an earlier non-directory.
                    self.remove(dir, c)?;
                    sys::mkdirat(dir, c, 0o700).map_err(io_err("mkdir"))?;
                }
            }
            r => r.map_err(io_err("mkdir"))?,
        }
        self.chown(dir, c, m)?;
        self.xattrs(xattr::Target::At(dir, c), m)?;
        let mut comps: Vec<Vec<u8>> = parents.iter().map(|p| p.to_vec()).collect();
        comps.push(name.to_vec());
        self.dirs.push(DeferredDir {
            comps,
            mode: m.mode,
            mtime: m.mtime,
        });
        Ok(())
    }

    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        c: &CString,
        m: &Member,
        data: &mut dyn Read,
    ) -> Result<()> {
        let fd = self.make_room(dir, c, |()| {
            sys::openat(dir, c, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)
        })?;
        let mut f = File::from(fd);
        let mut done = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::new(format!("reading its data: {e}"))),
            };
            f.write_all(&self.buf[..n]).map_err(io_err("writing"))?;
            done += n as u64;
        }
        if done != m.size {
            return Err(Error::new(format!(
                "truncated data ({done} of {} bytes)",
                m.size
            )));
        }
        self.st.bytes += done;
        let fd = f.as_fd();
        self.chown(fd, c"", m)?;
        sys::fchmod_fd(fd, m.mode).map_err(io_err("chmod"))?;
        self.xattrs(xattr::Target::Fd(fd), m)?;
        sys::utimensat(fd, c"", &times(m.mtime)).map_err(io_err("set times"))
    }

    fn node(&mut self, dir: BorrowedFd<'_>, c: &CString, m: &Member) -> Result<()> {
        let (ty, rdev) = match m.kind {
            Kind::Char => (libc::S_IFCHR, libc::makedev(m.rdev.0, m.rdev.1)),
            Kind::Block => (libc::S_IFBLK, libc::makedev(m.rdev.0, m.rdev.1)),
            _ => (libc::S_IFIFO, 0),
        };
        let is_dev = ty != libc::S_IFIFO;
        if is_dev && !self.opts.root && rdev != 0 {
            return Err(Error::new(
                "device nodes can only be created by root (import as root)",
            ));
        }
        self.make_room(dir, c, |()| {
            sys::mknodat(dir, c, ty | (m.mode & 0o7777), rdev)
        })?;
        self.finish_node(dir, c, m, true)
    }

    /// Owner, mode (unless a symlink), xattrs and times of a non-regular
    /// object named `c` in `dir`.
    fn finish_node(
        &mut self,
        dir: BorrowedFd<'_>,
        c: &CString,
        m: &Member,
        chmod: bool,
    ) -> Result<()> {
        self.chown(dir, c, m)?;
        if chmod {
            let fd = sys::openat(dir, c, libc::O_PATH, 0).map_err(io_err("open"))?;
            sys::fchmod_fd(fd.as_fd(), m.mode).map_err(io_err("chmod"))?;
        }
        self.xattrs(xattr::Target::At(dir, c), m)?;
        sys::utimensat(dir, c, &times(m.mtime)).map_err(io_err("set times"))
    }

    fn hard_link(
        &mut self,
        dir: BorrowedFd<'_>,
        c: &CString,
        parents: &[&[u8]],
        name: &[u8],
        m: &Member,
    ) -> Result<()> {
        let what = || format!("hard link target '{}'", show(&m.link));
        let tcomps =
            tarsafe::split_name(&m.link).map_err(|why| Error::new(format!("{}: {why}", what())))?;
        let Some((tname, tparents)) = tcomps.split_last() else {
            return Err(Error::new(format!("{}: is the layer root", what())));
        };
        if tparents == parents && *tname == name {
            return Ok(()); // a link to itself: nothing to do
        }
        let mut walk = DirStack {
            comps: Vec::new(),
            fds: Vec::new(),
        };
        let tdir = walk
            .open(self.root, tparents, false)
            .map_err(|e| e.context(what()))?;
        let tc = cname(tname).map_err(io_err("bad name"))?;
        let tst = match sys::fstatat(tdir, &tc) {
            Ok(st) => st,
            Err(e) if is(&e, libc::ENOENT) => {
                return Err(Error::new(format!(
                    "{}: does not exist in the layer",
                    what()
                )));
            }
            Err(e) => return Err(Error::new(format!("{}: {e}", what()))),
        };
        if tst.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(Error::new(format!("{}: is a directory", what())));
        }
        if let Ok(cur) = sys::fstatat(dir, c)
            && (cur.st_dev, cur.st_ino) == (tst.st_dev, tst.st_ino)
        {
            return Ok(());
        }
        self.make_room(dir, c, |()| sys::linkat(tdir, &tc, dir, c))
            .map_err(|e| e.context(what()))
    }

    /// A kernel whiteout (char 0/0, mode 0) at `target`, owned as the marker.
    fn whiteout(&mut self, dir: BorrowedFd<'_>, target: &[u8], m: &Member) -> Result<()> {
        let c = cname(target).map_err(io_err("bad name"))?;
        self.make_room(dir, &c, |()| sys::mknodat(dir, &c, libc::S_IFCHR, 0))
            .map_err(|e| e.context("creating the whiteout"))?;
        self.chown(dir, &c, m)
    }

    /// Runs `make`; if the name is taken, removes what is there (a later
    /// entry replaces an earlier one) and runs it again.
    fn make_room<T>(
        &mut self,
        dir: BorrowedFd<'_>,
        c: &CString,
        mut make: impl FnMut(()) -> io::Result<T>,
    ) -> Result<T> {
        match make(()) {
            Err(e) if is(&e, libc::EEXIST) => {
                self.remove(dir, c)?;
                make(()).map_err(io_err("create"))
            }
            r => r.map_err(io_err("create")),
        }
    }

    fn remove(&mut self, dir: BorrowedFd<'_>, c: &CString) -> Result<()> {
        let st = sys::fstatat(dir, c).map_err(io_err("stat"))?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir {
            let fd = sys::open_dir_at(dir, c).map_err(io_err("open"))?;
            crate::layer::clean_dir(fd.as_fd()).map_err(io_err("remove the old directory"))?;
            self.removed_dir = true;
        }
        sys::unlinkat(dir, c, is_dir).map_err(io_err("remove the old entry"))
    }

    fn chown(&mut self, dir: BorrowedFd<'_>, c: &std::ffi::CStr, m: &Member) -> Result<()> {
        match sys::fchownat(dir, c, m.uid, m.gid) {
            Err(e) if !self.opts.root && (is(&e, libc::EPERM) || is(&e, libc::EINVAL)) => {
                self.st.unowned += 1;
                Ok(())
            }
            r => r.map_err(io_err("chown")),
        }
    }

    /// Sets the member's xattrs; a name in the overlay's private namespace
    /// is stored escaped, as the kernel would store it through a mount.
    fn xattrs(&mut self, t: xattr::Target<'_>, m: &Member) -> Result<()> {
        for (name, value) in &m.xattrs {
            let stored = self.opts.private.escape(name);
            let c = xattr::name(&stored).map_err(io_err("bad xattr name"))?;
            match xattr::set(t, &c, value, 0) {
                Ok(()) => {}
                // Not supported here, not allowed to us, or a user.* xattr on
                // a symlink or device (Linux allows those on files and dirs only).
                Err(e)
                    if is(&e, libc::ENOTSUP)
                        || (is(&e, libc::EPERM)
                            && (!self.opts.root || name.starts_with(b"user."))) =>
                {
                    self.st.warnings.push(format!(
                        "entry '{}': xattr {} not set: {e}",
                        show(&m.name),
                        show(name)
                    ));
                }
                Err(e) => {
                    return Err(Error::new(format!("setting xattr {}: {e}", show(name))));
                }
            }
        }
        Ok(())
    }

    /// Opaque markers, then directory modes and times, deepest first.
    fn finish(&mut self) -> Result<()> {
        let opaque = self.opts.private.name("opaque");
        let opaque = xattr::name(&opaque).map_err(io_err("xattr name"))?;
        for comps in std::mem::take(&mut self.opaque) {
            let Some(fd) = self.open_final(&comps) else {
                continue; // removed again later in the tar
            };
            xattr::set(xattr::Target::Fd(fd.as_fd()), &opaque, b"y", 0).map_err(|e| {
                Error::new(format!(
                    "'{}': setting {}: {e}{}",
                    show(&comps.join(&b'/')),
                    opaque.to_string_lossy(),
                    if self.opts.root {
                        ""
                    } else {
                        " (use --userxattr when not root)"
                    }
                ))
            })?;
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.comps.len()));
        for d in dirs {
            let Some(fd) = self.open_final(&d.comps) else {
                continue;
            };
            let what = || format!("directory '{}'", show(&d.comps.join(&b'/')));
            sys::fchmod_fd(fd.as_fd(), d.mode)
                .map_err(|e| Error::new(format!("{}: chmod: {e}", what())))?;
            sys::utimensat(fd.as_fd(), c"", &times(d.mtime))
                .map_err(|e| Error::new(format!("{}: set times: {e}", what())))?;
        }
        if self.st.unowned > 0 {
            self.st.warnings.push(format!(
                "{} entries keep the importing user as owner (chown needs root)",
                self.st.unowned
            ));
        }
        Ok(())
    }

    /// A directory of the layer at the end of the unpack, if it still is one.
    fn open_final(&self, comps: &[Vec<u8>]) -> Option<OwnedFd> {
        let mut cur = sys::openat(self.root, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0).ok()?;
        for c in comps {
            cur = open_subdir(cur.as_fd(), c, false).ok()?;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_000);
        // Our own ids: the test needs no privileges.
        let me = std::fs::metadata("/proc/self").unwrap();
        h.set_uid(me.uid() as u64);
        h.set_gid(me.gid() as u64);
        h.set_cksum();
        h
    }

    /// Unpacks (dir, file, link) members into a fresh directory, as the
    /// current user, with user.* markers (no privileges needed).
    fn unpack_members(
        members: &[(&str, tar::EntryType, &str)],
    ) -> (tempfile::TempDir, Result<Stats>) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in members {
            let mut h = header(
                name,
                *kind,
                if *kind == tar::EntryType::Regular {
                    data.len() as u64
                } else {
                    0
                },
            );
            if *kind == tar::EntryType::Link || *kind == tar::EntryType::Symlink {
                h.set_link_name(data).unwrap();
                h.set_cksum();
            }
            let body: &[u8] = if *kind == tar::EntryType::Regular {
                data.as_bytes()
            } else {
                b""
            };
            b.append(&h, body).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fd = sys::open_path_dir(dir.path()).unwrap();
        let opts = Options {
            private: Private::USER,
            root: false,
        };
        let r = unpack(&bytes[..], fd.as_fd(), &opts, |_| {}).map(|(s, _)| s);
        (dir, r)
    }

    #[test]
    fn markers_links_and_replacements() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let (d, r) = unpack_members(&[
            ("a/.wh..wh..opq", Regular, ""),
            ("a/", Directory, ""),
            ("a/f", Regular, "one"),
            ("a/g", Link, "a/f"),
            ("a/.wh.gone", Regular, ""),
            ("s", Symlink, "a"),
            ("x", Regular, "file first"),
            ("x/", Directory, ""),
            ("x/y", Regular, "then a dir"),
        ]);
        let st = r.unwrap();
        assert_eq!(st.entries, 9);
        let p = d.path();
        assert_eq!(std::fs::read(p.join("a/g")).unwrap(), b"one");
        assert_eq!(std::fs::metadata(p.join("a/f")).unwrap().nlink(), 2);
        let wh = std::fs::symlink_metadata(p.join("a/gone")).unwrap();
        assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
        let fd = sys::open_path_dir(&p.join("a")).unwrap();
        let v = xattr::get(xattr::Target::Fd(fd.as_fd()), c"user.overlay.opaque").unwrap();
        assert_eq!(v.as_deref(), Some(&b"y"[..]));
        assert_eq!(std::fs::read(p.join("x/y")).unwrap(), b"then a dir");
    }

    #[test]
    fn symlinked_parents_are_refused() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let (d, r) = unpack_members(&[
            ("d/", Directory, ""),
            ("d/link", Symlink, "/"),
            ("d/link/escape", Regular, "x"),
        ]);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("'d/link/escape'") && e.contains("symlink"),
            "{e}"
        );
        assert!(!d.path().join("d/link/escape").exists());
    }
}
