//! `layerfs export`: write an upper layer as an OCI layer tar, the way
//! docker's overlay2 driver commits one (SPEC §9).
//!
//! - a whiteout (char 0/0, or an xattr whiteout in an `opaque="x"` dir)
//!   becomes an empty regular file `dir/.wh.NAME`, mode 0600, owner and
//!   mtime of the whiteout;
//! - an opaque directory is written, then `dir/.wh..wh..opq` (regular,
//!   empty, the directory's permission bits and owner, mtime 0);
//! - hard links within the upper are tar hard links to the first name (in
//!   the order written);
//! - xattrs are kept, except the overlay's private ones; an escaped
//!   `trusted.overlay.overlay.X` goes out as `trusted.overlay.X`;
//! - sockets are skipped (tar cannot hold them), with a warning;
//! - the upper's root directory itself is not written (docker does not
//!   either: `/` is never a change).
//!
//! Determinism: entries are written depth-first with each directory's
//! names in byte order; headers hold only mode, owner ids, size, mtime,
//! type, link name and device numbers (no user/group names, no atime or
//! ctime); PAX records (sorted) only where the ustar header cannot hold a
//! value: long names, big ids, sub-second or out-of-range mtimes, xattrs.
//! Unlike docker, sub-second mtimes are kept (as PAX `mtime`), so that
//! applying the layer reproduces the merged view exactly.
//!
//! Uppers the kernel wrote with `redirect_dir=on` or `metacopy=on` do not
//! stand alone: a renamed directory (`overlay.redirect`) holds only its
//! changes, a metadata-only copy-up (`overlay.metacopy`) has no data. With
//! the lowers given, such a directory is written whole, as an opaque
//! directory with every entry of its merged view, and such a file with its
//! data, both read from a merged view (see [`super::merged`]); without the
//! lowers the export is refused.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::compress::{Compression, Encoder};
use super::digest::{Digest, HashWriter};
use super::merged::MergedView;
use super::progress::Progress;
use super::{Ctx, Error, Result, show};
use crate::layer::cname;
use crate::sys::{self, Stat, xattr};
use crate::whiteout::{OCI_OPAQUE, OCI_WH_PREFIX, Opaque, Private};

#[derive(Clone, Debug)]
pub struct Options {
    pub private: Private,
    /// The upper's lower layers (topmost first): needed only for renamed
    /// directories and metadata-only copy-ups (see [`super::merged`]).
    pub lowers: Vec<PathBuf>,
    pub compression: Compression,
    pub progress: bool,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// sha256 of the blob as written (compressed or not).
    pub digest: Digest,
    /// Bytes of the blob.
    pub size: u64,
    pub compression: Compression,
    pub entries: u64,
    pub warnings: Vec<String>,
}

/// Writes the layer tar of `upper` to `out`; returns what was written and
/// the writer.
pub fn export<W: Write>(upper: &Path, out: W, opts: &Options) -> Result<(Exported, W)> {
    let root = sys::open_path_dir(upper).ctx(|| format!("opening '{}'", upper.display()))?;
    // An uncompressed blob is its own tar: hash it once (as the tar).
    let plain = opts.compression == Compression::None;
    let blob = if plain {
        HashWriter::unhashed(out)
    } else {
        HashWriter::new(out)
    };
    let enc = Encoder::new(blob, opts.compression).ctx(|| "starting the compressor".into())?;
    let tar = HashWriter::new(enc);
    let mut w = Walker {
        b: tar::Builder::new(tar),
        private: opts.private.clone(),
        upper: upper.to_path_buf(),
        lowers: opts.lowers.clone(),
        view: None,
        in_view: false,
        names: XattrNames::new(&opts.private)?,
        links: HashMap::new(),
        entries: 0,
        warnings: Vec::new(),
        progress: if opts.progress {
            Progress::new()
        } else {
            Progress::with(false)
        },
        buf: vec![0; 256 << 10],
    };
    w.walk(root.as_fd(), b"", false)?;
    w.progress.done();
    w.view = None; // unmount
    let (entries, warnings) = (w.entries, std::mem::take(&mut w.warnings));
    let tar = w.b.into_inner().ctx(|| "finishing the tar".into())?;
    let (enc, diff_id, _) = tar.finish();
    let blob = enc
        .finish()
        .ctx(|| "finishing the compressed stream".into())?;
    let (out, digest, size) = blob.finish();
    let digest = if plain { diff_id } else { digest };
    Ok((
        Exported {
            diff_id,
            digest,
            size,
            compression: opts.compression,
            entries,
            warnings,
        },
        out,
    ))
}

/// The private xattr names the walk looks for.
struct XattrNames {
    opaque: CString,
    redirect: CString,
    metacopy: CString,
    whiteout: CString,
}

impl XattrNames {
    fn new(p: &Private) -> Result<XattrNames> {
        let n = |k: &str| xattr::name(&p.name(k)).ctx(|| k.to_string());
        Ok(XattrNames {
            opaque: n("opaque")?,
            redirect: n("redirect")?,
            metacopy: n("metacopy")?,
            whiteout: n("whiteout")?,
        })
    }
}

struct Walker<W: Write> {
    b: tar::Builder<HashWriter<W>>,
    private: Private,
    upper: PathBuf,
    lowers: Vec<PathBuf>,
    /// The merged view, mounted when first needed.
    view: Option<MergedView>,
    /// Walking the merged view (below a renamed directory), where no
    /// overlay markers are visible and xattr names are the user's.
    in_view: bool,
    names: XattrNames,
    /// First name written for each hard-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
    warnings: Vec<String>,
    progress: Progress,
    /// Copy buffer for file data.
    buf: Vec<u8>,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut v = Vec::with_capacity(dir.len() + 1 + name.len());
    v.extend_from_slice(dir);
    v.push(b'/');
    v.extend_from_slice(name);
    v
}

fn fmt(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

impl<W: Write> Walker<W> {
    /// Writes the children of `dir` (the directory `rel` of the upper).
    /// `xwh`: the directory may hold xattr whiteouts (`opaque="x"`).
    fn walk(&mut self, dir: BorrowedFd<'_>, rel: &[u8], xwh: bool) -> Result<()> {
        let mut names: Vec<Vec<u8>> = sys::read_dir(dir)
            .ctx(|| format!("reading directory '/{}'", show(rel)))?
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        names.sort();
        for name in names {
            let path = join(rel, &name);
            self.entry(dir, rel, &name, &path, xwh)
                .map_err(|e| e.context(format!("'/{}'", show(&path))))?;
            let n = self.b.get_ref().len();
            self.progress
                .update(&format!("{} entries", self.entries), n);
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
        path: &[u8],
        xwh: bool,
    ) -> Result<()> {
        let c = cname(name).ctx(|| "bad name".into())?;
        if name.starts_with(OCI_WH_PREFIX) {
            self.warnings.push(format!(
                "'/{}' is named like an OCI whiteout marker: tools that apply the layer will read it as one",
                show(path)
            ));
        }
        let st = sys::fstatat(dir, &c).ctx(|| "stat".into())?;
        let mut h = Hdr::from_stat(path.to_vec(), &st);
        match fmt(&st) {
            libc::S_IFCHR if st.st_rdev == 0 => return self.whiteout(rel, name, &st),
            libc::S_IFDIR => return self.dir(dir, &c, h, &st),
            libc::S_IFSOCK => {
                self.warnings.push(format!(
                    "skipped socket '/{}' (tar cannot hold sockets)",
                    show(path)
                ));
                return Ok(());
            }
            libc::S_IFREG => {
                let t = xattr::Target::At(dir, &c);
                if !self.in_view && xwh && st.st_size == 0 && self.has(t, &self.names.whiteout)? {
                    return self.whiteout(rel, name, &st);
                }
                if !self.in_view && self.has(t, &self.names.metacopy)? {
                    return self.metacopy(rel, name, path);
                }
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key) {
                        h.kind = tar::EntryType::Link;
                        h.link = first.clone();
                        h.size = 0;
                        return self.write(&h, io::empty());
                    }
                    self.links.insert(key, path.to_vec());
                }
                h.xattrs = self.xattrs(xattr::Target::At(dir, &c))?;
                let f = File::from(sys::openat(dir, &c, libc::O_RDONLY, 0).ctx(|| "open".into())?);
                return self.write(&h, Exact::new(f, h.size));
            }
            libc::S_IFLNK => {
                h.link = sys::readlinkat(dir, &c).ctx(|| "readlink".into())?;
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                h.rdev = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
            }
            _ => {} // fifo
        }
        h.xattrs = self.xattrs(xattr::Target::At(dir, &c))?;
        self.write(&h, io::empty())
    }

    fn dir(&mut self, parent: BorrowedFd<'_>, c: &CStr, mut h: Hdr, _st: &Stat) -> Result<()> {
        let fd = sys::open_dir_at(parent, c).ctx(|| "open".into())?;
        let t = xattr::Target::Fd(fd.as_fd());
        h.xattrs = self.xattrs(t)?;
        let path = h.path.clone();
        if self.in_view {
            self.dir_header(h, false)?;
            return self.walk(fd.as_fd(), &path, false);
        }
        if self.has(t, &self.names.redirect)? {
            return self.redirected(h);
        }
        let opaque = Opaque::from_value(
            xattr::get(t, &self.names.opaque)
                .ctx(|| "read opaque xattr".into())?
                .as_deref(),
        );
        self.dir_header(h, opaque == Opaque::Yes)?;
        self.walk(fd.as_fd(), &path, opaque == Opaque::XattrWhiteouts)
    }

    /// The directory's entry, then (if `opaque`) its opaque marker:
    /// regular, empty, the directory's permission bits and owner, mtime 0.
    fn dir_header(&mut self, mut h: Hdr, opaque: bool) -> Result<()> {
        let path = h.path.clone();
        h.path.push(b'/');
        self.write(&h, io::empty())?;
        if opaque {
            h.path = join(&path, OCI_OPAQUE);
            h.kind = tar::EntryType::Regular;
            h.mode &= 0o777;
            h.mtime = (0, 0);
            h.xattrs.clear();
            self.write(&h, io::empty())?;
        }
        Ok(())
    }

    /// A directory renamed with `redirect_dir` holds only what changed in
    /// it; the rest is at its old path in the lowers. The layer gets it
    /// whole: opaque, with every entry of its merged view.
    fn redirected(&mut self, h: Hdr) -> Result<()> {
        let path = h.path.clone();
        self.dir_header(h, true)?;
        let fd = self
            .view("is a renamed directory (overlay.redirect)")?
            .open_dir(&path)?;
        let outer = std::mem::replace(&mut self.in_view, true);
        let r = self.walk(fd.as_fd(), &path, false);
        self.in_view = outer;
        r
    }

    /// A metadata-only copy-up: attributes from the upper, data from a
    /// lower; the merged view has both.
    fn metacopy(&mut self, rel: &[u8], name: &[u8], path: &[u8]) -> Result<()> {
        let dir = self
            .view("is a metadata-only copy-up (overlay.metacopy)")?
            .open_dir(rel)?;
        let outer = std::mem::replace(&mut self.in_view, true);
        let r = self.entry(dir.as_fd(), rel, name, path, false);
        self.in_view = outer;
        r
    }

    /// The merged view of the upper over its lowers, mounted on first use.
    fn view(&mut self, why: &str) -> Result<&MergedView> {
        if self.view.is_none() {
            if self.lowers.is_empty() {
                return Err(Error::new(format!(
                    "{why}: its content is partly in the lower layers; give them with --lower (or export the MOUNTPOINT)"
                )));
            }
            self.view = Some(MergedView::mount(
                &self.upper,
                &self.lowers,
                self.private == Private::USER,
            )?);
        }
        Ok(self.view.as_ref().expect("just mounted"))
    }

    fn whiteout(&mut self, rel: &[u8], name: &[u8], st: &Stat) -> Result<()> {
        let mut wh = OCI_WH_PREFIX.to_vec();
        wh.extend_from_slice(name);
        let mut h = Hdr::from_stat(join(rel, &wh), st);
        h.kind = tar::EntryType::Regular;
        h.mode = 0o600;
        h.size = 0;
        self.write(&h, io::empty())
    }

    fn has(&self, t: xattr::Target<'_>, name: &CStr) -> Result<bool> {
        Ok(xattr::get(t, name)
            .ctx(|| format!("read xattr {}", name.to_string_lossy()))?
            .is_some())
    }

    /// The object's xattrs as a layer carries them: private ones dropped,
    /// escaped ones unescaped; sorted by name.
    fn xattrs(&self, t: xattr::Target<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for name in xattr::list(t).ctx(|| "list xattrs".into())? {
            // In the merged view, names are already as users see them.
            let visible = match self.in_view {
                true => Some(std::borrow::Cow::Borrowed(&name[..])),
                false => self.private.unescape(&name),
            };
            let Some(visible) = visible else {
                continue;
            };
            let c = xattr::name(&name).ctx(|| "xattr name".into())?;
            if let Some(v) = xattr::get(t, &c).ctx(|| format!("read xattr {}", show(&name)))? {
                out.push((visible.into_owned(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    fn write(&mut self, h: &Hdr, data: impl Read) -> Result<()> {
        self.entries += 1;
        write_entry(&mut self.b, h, data, &mut self.buf).ctx(|| "writing the tar".into())
    }
}

/// Reads exactly `n` bytes of a file: fewer (it shrank while being read)
/// is an error, not a short tar member; more is not read.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, n: u64) -> Self {
        Exact { inner, left: n }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while being exported",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A tar member to write.
#[derive(Clone, Debug)]
struct Hdr {
    path: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    size: u64,
    link: Vec<u8>,
    rdev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Hdr {
    fn from_stat(path: Vec<u8>, st: &Stat) -> Hdr {
        let kind = match fmt(st) {
            libc::S_IFDIR => tar::EntryType::Directory,
            libc::S_IFLNK => tar::EntryType::Symlink,
            libc::S_IFCHR => tar::EntryType::Char,
            libc::S_IFBLK => tar::EntryType::Block,
            libc::S_IFIFO => tar::EntryType::Fifo,
            _ => tar::EntryType::Regular,
        };
        Hdr {
            path,
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            size: if kind == tar::EntryType::Regular {
                st.st_size as u64
            } else {
                0
            },
            link: Vec::new(),
            rdev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

const USTAR_NAME: usize = 100;
const USTAR_PREFIX: usize = 155;
const MAX_OCTAL_ID: u64 = 0o7777777;
const MAX_OCTAL_12: u64 = 0o77777777777;

/// Splits a long name into the ustar `prefix` and `name` fields, at a `/`.
fn split_ustar(p: &[u8]) -> Option<(&[u8], &[u8])> {
    if p.len() <= USTAR_NAME {
        return Some((&[], p));
    }
    let mut end = p.len().min(USTAR_PREFIX + 1);
    if end == p.len() && p[end - 1] == b'/' {
        end -= 1;
    }
    let i = p[..end].iter().rposition(|&b| b == b'/')?;
    let (prefix, name) = (&p[..i], &p[i + 1..]);
    (i > 0 && !name.is_empty() && name.len() <= USTAR_NAME && prefix.len() <= USTAR_PREFIX)
        .then_some((prefix, name))
}

/// One PAX record: `LEN key=value\n`, LEN counting the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn pax_time(sec: i64, nsec: u32) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    let (s, n) = if sec < 0 {
        // -1.25 s is sec=-2, nsec=750_000_000
        (format!("-{}", -(sec + 1)), 1_000_000_000 - nsec)
    } else {
        (sec.to_string(), nsec)
    };
    let frac = format!("{n:09}");
    format!("{s}.{}", frac.trim_end_matches('0'))
}

/// Writes one member: its PAX header if needed, its ustar header, its data.
fn write_entry<W: Write>(
    b: &mut tar::Builder<HashWriter<W>>,
    h: &Hdr,
    data: impl Read,
    buf: &mut [u8],
) -> io::Result<()> {
    let split = split_ustar(&h.path);
    let pax = pax_records(h, split.is_none());
    if !pax.is_empty() {
        let (x, body) = pax_header(h, &pax);
        b.append(&x, &body[..])?;
    }
    let t = ustar_header(h, split)?;
    // Header, data, padding: as `Builder::append` does, with a large buffer.
    let w = b.get_mut();
    w.write_all(t.as_bytes())?;
    let n = copy(data, w, buf)?;
    let pad = (512 - n % 512) % 512;
    w.write_all(&[0u8; 512][..pad as usize])
}

/// What the ustar header cannot hold, as sorted PAX records.
fn pax_records(h: &Hdr, long_path: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut add = |k: &[u8], v: Vec<u8>| pax.push((k.to_vec(), v));
    if long_path {
        add(b"path", h.path.clone());
    }
    if h.link.len() > USTAR_NAME {
        add(b"linkpath", h.link.clone());
    }
    if h.uid as u64 > MAX_OCTAL_ID {
        add(b"uid", h.uid.to_string().into_bytes());
    }
    if h.gid as u64 > MAX_OCTAL_ID {
        add(b"gid", h.gid.to_string().into_bytes());
    }
    if h.size > MAX_OCTAL_12 {
        add(b"size", h.size.to_string().into_bytes());
    }
    if h.mtime.1 != 0 || h.mtime.0 < 0 || h.mtime.0 as u64 > MAX_OCTAL_12 {
        add(b"mtime", pax_time(h.mtime.0, h.mtime.1).into_bytes());
    }
    for (k, v) in &h.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax.push((key, v.clone()));
    }
    pax.sort();
    pax
}

/// The `x` member carrying `pax`, named `PaxHeaders.0/BASENAME` as Go's
/// archive/tar names it, with fixed owner, mode and time.
fn pax_header(h: &Hdr, pax: &[(Vec<u8>, Vec<u8>)]) -> (tar::Header, Vec<u8>) {
    let mut body = Vec::new();
    for (k, v) in pax {
        pax_record(&mut body, k, v);
    }
    let base = h
        .path
        .rsplit(|&b| b == b'/')
        .find(|c| !c.is_empty())
        .unwrap_or(b"");
    let mut name = b"PaxHeaders.0/".to_vec();
    name.extend_from_slice(base);
    name.truncate(USTAR_NAME);
    let mut x = tar::Header::new_ustar();
    set_name(&mut x, &[], &name);
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_mode(0o644);
    x.set_uid(0);
    x.set_gid(0);
    x.set_mtime(0);
    x.set_size(body.len() as u64);
    x.set_cksum();
    (x, body)
}

/// The ustar header; fields that do not fit are cut (their PAX records
/// carry the real values).
fn ustar_header(h: &Hdr, split: Option<(&[u8], &[u8])>) -> io::Result<tar::Header> {
    let mut t = tar::Header::new_ustar();
    match split {
        Some((prefix, name)) => set_name(&mut t, prefix, name),
        None => set_name(&mut t, &[], &h.path[..h.path.len().min(USTAR_NAME)]),
    }
    t.set_entry_type(h.kind);
    t.set_mode(h.mode);
    t.set_uid(h.uid as u64);
    t.set_gid(h.gid as u64);
    t.set_mtime(h.mtime.0.clamp(0, MAX_OCTAL_12 as i64) as u64);
    t.set_size(h.size);
    if let Some(u) = t.as_ustar_mut() {
        let l = &h.link[..h.link.len().min(USTAR_NAME)];
        u.linkname[..l.len()].copy_from_slice(l);
    }
    if matches!(h.kind, tar::EntryType::Char | tar::EntryType::Block) {
        t.set_device_major(h.rdev.0)?;
        t.set_device_minor(h.rdev.1)?;
    }
    t.set_cksum();
    Ok(t)
}

/// Copies `r` to `w` through `buf`; returns the byte count.
fn copy(mut r: impl Read, w: &mut impl Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut n = 0u64;
    loop {
        let k = match r.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

fn set_name(t: &mut tar::Header, prefix: &[u8], name: &[u8]) {
    if let Some(u) = t.as_ustar_mut() {
        u.name = [0; 100];
        u.prefix = [0; 155];
        u.name[..name.len()].copy_from_slice(name);
        u.prefix[..prefix.len()].copy_from_slice(prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_themselves() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"x");
        assert_eq!(v, b"9 path=x\n");
        let mut v = Vec::new();
        pax_record(&mut v, b"k", &[b'a'; 95]);
        // 1 + 95 + 3 = 99 (+2 digits = 101, so 3 digits: 102)
        assert_eq!(v.len(), 102);
        assert!(v.starts_with(b"102 k="));
    }

    #[test]
    fn ustar_split() {
        let short = b"a/b";
        assert_eq!(split_ustar(short), Some((&b""[..], &b"a/b"[..])));
        let mut long = vec![b'd'; 120];
        long.extend_from_slice(b"/file");
        assert_eq!(split_ustar(&long), Some((&long[..120], &b"file"[..])));
        assert_eq!(split_ustar(&[b'x'; 150]), None);
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(5, 0), "5");
        assert_eq!(pax_time(5, 500_000_000), "5.5");
        assert_eq!(pax_time(-2, 750_000_000), "-1.25");
        let t = super::super::tarstream::parse_time(pax_time(-2, 750_000_000).as_bytes()).unwrap();
        assert_eq!((t.sec, t.nsec), (-2, 750_000_000));
    }
}
