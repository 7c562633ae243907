//! Tar members with their extension headers resolved: PAX (`x`) records
//! (`path`, `linkpath`, `uid`, `gid`, `mtime`, `SCHILY.xattr.*`) and GNU long
//! names (`L`, `K`). The `tar` crate gives us the raw blocks; we apply the
//! extensions ourselves so that each one is read with a size limit — a
//! hostile "header" of gigabytes of zeros is refused before it is read.
//!
//! Unsupported (refused with a clear error, never misread): GNU sparse
//! members, PAX sparse records, and PAX `size` records that disagree with
//! the header (members over 8 GiB).

use std::io::{self, Read};

use super::{Error, Result, show};

/// Largest PAX extended header accepted.
pub const PAX_LIMIT: u64 = 1 << 20;
/// Largest GNU long name or long link name accepted.
pub const LONG_NAME_LIMIT: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// A point in time, seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// One member, as the extraction needs it.
#[derive(Clone, Debug)]
pub struct Member {
    /// The name, with PAX/GNU long names applied.
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Link target of a symlink or hard link (empty otherwise).
    pub link: Vec<u8>,
    /// Permission bits including setuid/setgid/sticky (`07777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    pub size: u64,
    pub rdev: (u32, u32),
    /// `SCHILY.xattr.NAME` records, in the order given.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the member's data starts in the archive.
    pub offset: u64,
}

/// Extension records waiting for the member they describe.
#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Time>,
    size: Option<u64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    any: bool,
}

/// Calls `f` for every member of the archive, in order, with a reader of its
/// data (which `f` may leave unread).
pub fn for_each<R: Read>(
    entries: tar::Entries<'_, R>,
    mut f: impl FnMut(&Member, &mut dyn Read) -> Result<()>,
) -> Result<()> {
    let mut pending = Pending::default();
    let mut last: Option<Vec<u8>> = None;
    let at = |last: &Option<Vec<u8>>| match last {
        Some(n) => format!("after entry '{}'", show(n)),
        None => "at the first entry".to_string(),
    };
    for entry in entries.raw(true) {
        let mut e = entry.map_err(|e| Error::new(format!("corrupt tar {}: {e}", at(&last))))?;
        let ty = e.header().entry_type();
        let ctx = |r: Result<Vec<u8>>| r.map_err(|m| m.context(at(&last)));
        match ty {
            tar::EntryType::XHeader => {
                let data = ctx(read_limited(&mut e, PAX_LIMIT, "PAX header"))?;
                pending.pax(&data).map_err(|m| m.context(at(&last)))?;
            }
            tar::EntryType::XGlobalHeader => {
                ctx(read_limited(&mut e, PAX_LIMIT, "PAX global header"))?;
            }
            tar::EntryType::GNULongName => {
                let v = ctx(read_limited(&mut e, LONG_NAME_LIMIT, "GNU long name"))?;
                pending.name = Some(trim_nul(v));
                pending.any = true;
            }
            tar::EntryType::GNULongLink => {
                let v = ctx(read_limited(&mut e, LONG_NAME_LIMIT, "GNU long link"))?;
                pending.link = Some(trim_nul(v));
                pending.any = true;
            }
            _ => {
                let m = member(&e, std::mem::take(&mut pending))?;
                f(&m, &mut e)?;
                last = Some(m.name);
            }
        }
    }
    if pending.any {
        return Err(Error::new(format!(
            "truncated tar: extension header {} describes no entry",
            at(&last)
        )));
    }
    Ok(())
}

fn read_limited<R: Read>(e: &mut tar::Entry<'_, R>, limit: u64, what: &str) -> Result<Vec<u8>> {
    let size = e.size();
    if size > limit {
        return Err(Error::new(format!(
            "{what} of {size} bytes exceeds the limit of {limit} bytes"
        )));
    }
    let mut v = Vec::with_capacity(size as usize);
    e.read_to_end(&mut v)
        .map_err(|err| Error::new(format!("reading {what}: {err}")))?;
    if (v.len() as u64) < size {
        return Err(Error::new(format!("truncated {what}")));
    }
    Ok(v)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(p) = v.iter().position(|&b| b == 0) {
        v.truncate(p);
    }
    v
}

impl Pending {
    fn pax(&mut self, data: &[u8]) -> Result<()> {
        self.any = true;
        for rec in tar::PaxExtensions::new(data) {
            let rec = rec.map_err(|e| Error::new(format!("malformed PAX header: {e}")))?;
            let (k, v) = (rec.key_bytes(), rec.value_bytes());
            let num = || parse_u64(v).ok_or_else(|| bad_record(k, v));
            match k {
                b"path" => self.name = Some(v.to_vec()),
                b"linkpath" => self.link = Some(v.to_vec()),
                b"uid" => self.uid = Some(num()?),
                b"gid" => self.gid = Some(num()?),
                b"size" => self.size = Some(num()?),
                b"mtime" => self.mtime = Some(parse_time(v).ok_or_else(|| bad_record(k, v))?),
                _ if k.starts_with(b"SCHILY.xattr.") => self
                    .xattrs
                    .push((k[b"SCHILY.xattr.".len()..].to_vec(), v.to_vec())),
                _ if k.starts_with(b"GNU.sparse.") => {
                    return Err(Error::new("PAX sparse files are not supported"));
                }
                _ => {} // atime, ctime, uname, gname, comment, charset, …
            }
        }
        Ok(())
    }
}

fn bad_record(k: &[u8], v: &[u8]) -> Error {
    Error::new(format!("malformed PAX record {}={}", show(k), show(v)))
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A PAX time: `[-]SECONDS[.FRACTION]`.
pub fn parse_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = int.parse().ok()?;
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nsec: u32 = digits.parse().ok()?;
    Some(match (neg, nsec) {
        (false, _) => Time { sec, nsec },
        (true, 0) => Time { sec: -sec, nsec: 0 },
        (true, n) => Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - n,
        },
    })
}

fn kind_of(ty: tar::EntryType, name: &[u8]) -> Option<Kind> {
    Some(match ty {
        tar::EntryType::Regular | tar::EntryType::Continuous if name.ends_with(b"/") => Kind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
        tar::EntryType::Link => Kind::HardLink,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Char => Kind::Char,
        tar::EntryType::Block => Kind::Block,
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Fifo => Kind::Fifo,
        _ => return None,
    })
}

fn member<R: Read>(e: &tar::Entry<'_, R>, p: Pending) -> Result<Member> {
    let h = e.header();
    let name = p.name.unwrap_or_else(|| h.path_bytes().into_owned());
    let bad = |field: &str, err: io::Error| {
        Error::new(format!("entry '{}': bad {field} field: {err}", show(&name)))
    };
    let ty = h.entry_type();
    let Some(kind) = kind_of(ty, &name) else {
        let what = if ty == tar::EntryType::GNUSparse {
            "GNU sparse files are not supported".to_string()
        } else {
            format!("unsupported entry type '{}'", ty.as_byte().escape_ascii())
        };
        return Err(Error::new(format!("entry '{}': {what}", show(&name))));
    };
    let hsize = h.entry_size().map_err(|err| bad("size", err))?;
    if let Some(s) = p.size
        && s != hsize
    {
        return Err(Error::new(format!(
            "entry '{}': PAX size {s} differs from the header's {hsize} (members over 8 GiB are not supported)",
            show(&name)
        )));
    }
    let id = |v: u64, field: &str| {
        u32::try_from(v)
            .map_err(|_| Error::new(format!("entry '{}': {field} {v} out of range", show(&name))))
    };
    let uid = id(
        p.uid
            .map_or_else(|| h.uid(), Ok)
            .map_err(|err| bad("uid", err))?,
        "uid",
    )?;
    let gid = id(
        p.gid
            .map_or_else(|| h.gid(), Ok)
            .map_err(|err| bad("gid", err))?,
        "gid",
    )?;
    let mtime = match p.mtime {
        Some(t) => t,
        None => Time {
            sec: h.mtime().map_err(|err| bad("mtime", err))? as i64,
            nsec: 0,
        },
    };
    let rdev = match kind {
        Kind::Char | Kind::Block => (
            h.device_major()
                .map_err(|err| bad("devmajor", err))?
                .unwrap_or(0),
            h.device_minor()
                .map_err(|err| bad("devminor", err))?
                .unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let link = match kind {
        Kind::HardLink | Kind::Symlink => p
            .link
            .or_else(|| h.link_name_bytes().map(|c| c.into_owned()))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(Member {
        kind,
        link,
        mode: h.mode().map_err(|err| bad("mode", err))? & 0o7777,
        uid,
        gid,
        mtime,
        size: hsize,
        rdev,
        xattrs: p.xattrs,
        offset: e.raw_file_position(),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_time(b"12"), Some(Time { sec: 12, nsec: 0 }));
        assert_eq!(
            parse_time(b"12.5"),
            Some(Time {
                sec: 12,
                nsec: 500_000_000
            })
        );
        assert_eq!(
            parse_time(b"1.123456789123"),
            Some(Time {
                sec: 1,
                nsec: 123_456_789
            })
        );
        assert_eq!(
            parse_time(b"-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(parse_time(b"x"), None);
        assert_eq!(parse_time(b"1.x"), None);
        assert_eq!(parse_time(b".5"), None);
    }
}
