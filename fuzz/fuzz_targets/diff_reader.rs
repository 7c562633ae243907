//! The diff reader: the input is a little program that builds a layer stack
//! (an upper and one or two lowers) in a scratch directory: files, dirs,
//! symlinks with arbitrary targets, kernel whiteouts (char 0/0), opaque and
//! redirect xattrs with arbitrary values, xattr whiteouts, OCI `.wh.`
//! markers, hard links, devices, attribute changes, copies with the same
//! attributes between layers, removals. Names come from a small alphabet
//! (with markers, NAME_MAX, non-UTF-8 and newline names) or raw input bytes.
//! Then `layerfs::diff::diff(upper, lowers, opts)` runs.
//!
//! It may fail; it must not panic or hang (the runner's `-timeout`), and an
//! `Ok` result is sorted by path bytes with no duplicates, never reports `/`
//! itself, has only well-formed absolute paths, and reports every ancestor
//! of a change (`A` below `A`, nothing below `D`).
//!
//! Program (all bytes optional; the program ends with the input):
//! - byte 0: bit 0 → two lowers (else one); bit 1 → `userxattr`
//!   (`user.overlay.*`, else `DiffOptions::default()`, `trusted.overlay.*`);
//! - then operations: one byte `LK` (L = layer, high nibble mod the number
//!   of layers, 0 = upper; K = kind, low nibble), then the kind's arguments.
#![no_main]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use layerfs::diff::{ChangeKind, DiffOptions, diff};
use layerfs::whiteout::Private;
use libfuzzer_sys::fuzz_target;

const MAX_OPS: usize = 96;
const T0: i64 = 1_600_000_000;

struct Input<'a> {
    d: &'a [u8],
    i: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = self.d.get(self.i).copied();
        self.i += 1;
        b
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let end = (self.i + n).min(self.d.len());
        let v = self.d.get(self.i..end).unwrap_or(&[]).to_vec();
        self.i += n;
        v
    }

    fn name(&mut self) -> Option<Vec<u8>> {
        const NAMES: [&[u8]; 16] = [
            b"a",
            b"b",
            b"c",
            b"d",
            b"e",
            b"x y",
            "\u{e9}".as_bytes(),
            b"\xff\xfe",
            b".wh.a",
            b".wh.b",
            b".wh..wh..opq",
            b".wh.",
            b".wh..wh.a",
            b"n\nl",
            b"-",
            b"",
        ];
        let b = self.byte()?;
        Some(match b {
            0..0xe0 => match NAMES[(b & 15) as usize] {
                b"" => vec![b'N'; 255], // NAME_MAX
                n => n.to_vec(),
            },
            _ => {
                let mut raw = self.bytes((b & 0x1f) as usize + 1);
                for c in raw.iter_mut() {
                    if *c == b'/' || *c == 0 {
                        *c = b'_';
                    }
                }
                if raw.is_empty() || raw == b"." || raw == b".." {
                    raw = b"_".to_vec();
                }
                raw
            }
        })
    }

    /// 1–4 components.
    fn path(&mut self) -> Option<Vec<Vec<u8>>> {
        let depth = 1 + (self.byte()? & 3) as usize;
        (0..depth).map(|_| self.name()).collect()
    }

    fn value(&mut self, max: u8) -> Vec<u8> {
        let n = self.byte().unwrap_or(0) % max;
        self.bytes(n as usize)
    }
}

const MODES: [u32; 8] = [0o644, 0o755, 0o600, 0o4755, 0o000, 0o777, 0o2755, 0o1777];
const IDS: [u32; 4] = [0, 1, 1000, 65534];

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in scratch paths")
}

/// Makes the parent directories of `comps` under `root` (real directories
/// only: a symlink or a non-directory on the way skips the operation, so
/// that the builder itself never follows a link out of the scratch tree).
fn parents(root: &Path, comps: &[Vec<u8>]) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in &comps[..comps.len() - 1] {
        p.push(std::ffi::OsStr::from_bytes(c));
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return None,
            Err(_) => {
                std::fs::create_dir(&p).ok()?;
                set_time(&p, T0, 0);
            }
        }
    }
    Some(p.join(std::ffi::OsStr::from_bytes(comps.last()?)))
}

fn set_time(p: &Path, sec: i64, nsec: i64) {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    let c = cpath(p);
    // SAFETY: `c` is a NUL-terminated path and `ts` two valid timespecs.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
}

fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> bool {
    let c = cpath(p);
    // SAFETY: `c` is a NUL-terminated path.
    let ok = unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0;
    if ok {
        set_time(p, T0, 0);
    }
    ok
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    let c = cpath(p);
    // SAFETY: `c` is a NUL-terminated path.
    unsafe { libc::lchown(c.as_ptr(), uid, gid) };
}

/// Sets an xattr on the object itself (never following a symlink).
fn setx(p: &Path, name: &[u8], value: &[u8]) {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated path and name; `value` is valid for its length.
    unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
}

fn is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Opens a regular file for writing, never following a symlink and never
/// blocking (on a FIFO): an existing file only if it is a regular one, else
/// a new file. The builder runs as root with symlinks of arbitrary targets
/// in the tree: a path-following write could land anywhere.
fn open_regular(p: &Path, truncate: bool) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_file() => o.truncate(truncate),
        Ok(_) => return None,
        Err(_) => o.create_new(true),
    };
    let f = o.open(p).ok()?;
    f.metadata().ok().filter(|m| m.is_file())?;
    Some(f)
}

fn new_file(p: &Path, len: usize, mode: u32) {
    use std::io::Write;
    if let Some(mut f) = open_regular(p, true) {
        let _ = f.write_all(&vec![b'x'; len]);
        let _ = f.set_permissions(std::fs::Permissions::from_mode(mode));
        drop(f);
        set_time(p, T0, 0);
    }
}

/// Copies one object (not below it) from `src` to `dst` with the same
/// type, mode, owner, size, content and mtime: a copy-up that changed nothing.
fn copy_same(src: &Path, dst: &Path) {
    let Ok(md) = std::fs::symlink_metadata(src) else {
        return;
    };
    let ft = md.file_type();
    if ft.is_dir() {
        if std::fs::create_dir(dst).is_err() {
            return;
        }
    } else if ft.is_file() {
        use std::io::Write;
        if std::fs::symlink_metadata(dst).is_ok() {
            return;
        }
        let Some(mut f) = open_regular(dst, true) else {
            return;
        };
        let _ = f.write_all(&vec![b'x'; md.len().min(64) as usize]);
    } else if ft.is_symlink() {
        let Ok(t) = std::fs::read_link(src) else {
            return;
        };
        if std::os::unix::fs::symlink(t, dst).is_err() {
            return;
        }
    } else if !mknod(dst, md.mode(), md.rdev()) {
        return;
    }
    lchown(dst, md.uid(), md.gid());
    if !ft.is_symlink() {
        let _ = std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777));
    }
    set_time(dst, md.mtime(), md.mtime_nsec());
}

struct Builder {
    layers: Vec<PathBuf>,
    private: &'static [u8],
    other: &'static [u8],
}

impl Builder {
    fn xname(&self, key: &str) -> Vec<u8> {
        [self.private, key.as_bytes()].concat()
    }

    fn op(&self, inp: &mut Input) -> Option<()> {
        let op = inp.byte()?;
        let layer = &self.layers[(op >> 4) as usize % self.layers.len()];
        let comps = inp.path()?;
        let p = parents(layer, &comps)?;
        match op & 15 {
            0 => {
                if std::fs::create_dir(&p).is_ok() {
                    set_time(&p, T0, 0);
                }
            }
            1 => {
                let b = inp.byte().unwrap_or(0);
                new_file(&p, (b & 7) as usize, MODES[(b >> 3 & 7) as usize]);
            }
            2 => {
                let mut t = inp.value(48);
                t.iter_mut().filter(|c| **c == 0).for_each(|c| *c = b'x');
                if t.is_empty() {
                    t = b"../../../../..".to_vec();
                }
                if std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), &p).is_ok() {
                    set_time(&p, T0, 0);
                }
            }
            3 => {
                mknod(&p, libc::S_IFCHR, 0);
            }
            4 => {
                let v = match inp.byte().unwrap_or(0) % 5 {
                    0 => b"y".to_vec(),
                    1 => b"x".to_vec(),
                    2 => b"n".to_vec(),
                    3 => Vec::new(),
                    _ => inp.value(8),
                };
                setx(&p, &self.xname("opaque"), &v);
            }
            5 => {
                let name = [b".wh.".as_slice(), comps.last()?].concat();
                new_file(
                    &p.with_file_name(std::ffi::OsStr::from_bytes(&name)),
                    0,
                    0o644,
                );
            }
            6 => {
                if is_dir(&p) {
                    new_file(&p.join(".wh..wh..opq"), 0, 0o644);
                }
            }
            7 => {
                let v = match inp.byte().unwrap_or(0) % 3 {
                    0 => {
                        let target = inp.path()?;
                        let mut v = Vec::new();
                        for c in target {
                            v.push(b'/');
                            v.extend_from_slice(&c);
                        }
                        v
                    }
                    1 => inp.name()?,
                    _ => inp.value(32),
                };
                setx(&p, &self.xname("redirect"), &v);
            }
            8 => {
                let to = parents(layer, &inp.path()?)?;
                let _ = std::fs::hard_link(&p, &to);
            }
            9 => {
                new_file(&p, 0, 0o644);
                setx(&p, &self.xname("whiteout"), b"");
            }
            10 => {
                let b = inp.byte().unwrap_or(0);
                let is_link = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_symlink());
                match b & 3 {
                    0 if !is_link => {
                        let _ = std::fs::set_permissions(
                            &p,
                            std::fs::Permissions::from_mode(MODES[(b >> 2 & 7) as usize]),
                        );
                    }
                    1 => lchown(&p, IDS[(b >> 2 & 3) as usize], IDS[(b >> 4 & 3) as usize]),
                    2 => set_time(&p, T0 + (b >> 2 & 1) as i64, (b >> 3) as i64 * 1000),
                    _ if !is_link && !is_dir(&p) => {
                        if let Some(f) = open_regular(&p, false) {
                            let _ = f.set_len((b >> 2) as u64);
                        }
                        set_time(&p, T0, 0);
                    }
                    _ => {}
                }
            }
            11 => {
                let (mode, dev) = match inp.byte().unwrap_or(0) % 4 {
                    0 => (libc::S_IFIFO | 0o644, 0),
                    1 => (libc::S_IFCHR | 0o644, libc::makedev(1, 3)),
                    2 => (libc::S_IFBLK | 0o600, libc::makedev(7, 0)),
                    _ => (libc::S_IFCHR | 0o644, 0),
                };
                mknod(&p, mode, dev);
            }
            12 => setx(&p, b"security.capability", &inp.value(24)),
            13 => {
                let to = &self.layers[inp.byte()? as usize % self.layers.len()];
                if let Some(dst) = parents(to, &comps) {
                    copy_same(&p, &dst);
                }
            }
            14 => {
                if is_dir(&p) {
                    let _ = std::fs::remove_dir_all(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
            _ => {
                let (name, v) = match inp.byte().unwrap_or(0) % 6 {
                    0 => ([self.other, b"opaque"].concat(), b"y".to_vec()),
                    1 => ([self.other, b"redirect"].concat(), b"/a".to_vec()),
                    2 => (self.xname("metacopy"), Vec::new()),
                    3 => (self.xname("origin"), inp.value(16)),
                    4 => (self.xname("nlink"), inp.value(8)),
                    _ => (b"user.fuzz".to_vec(), inp.value(8)),
                };
                setx(&p, &name, &v);
            }
        }
        Some(())
    }
}

fn check(changes: &[layerfs::diff::Change]) {
    for w in changes.windows(2) {
        assert!(
            w[0].path < w[1].path,
            "not sorted or duplicated: {:?} then {:?}",
            w[0].path.escape_ascii().to_string(),
            w[1].path.escape_ascii().to_string()
        );
    }
    for c in changes {
        let p = &c.path;
        let show = p.escape_ascii().to_string();
        assert!(p.as_slice() != b"/", "reported / itself");
        assert!(p.first() == Some(&b'/'), "not an absolute path: {show:?}");
        assert!(
            p[1..].split(|&b| b == b'/').all(|comp| !comp.is_empty()
                && comp != b"."
                && comp != b".."
                && !comp.contains(&0)),
            "malformed path: {show:?}"
        );
        let parent = &p[..p.iter().rposition(|&b| b == b'/').unwrap()];
        if parent.is_empty() {
            continue;
        }
        let Ok(i) = changes.binary_search_by(|x| x.path.as_slice().cmp(parent)) else {
            panic!("{show:?} is reported ({:?}) but its parent is not", c.kind);
        };
        match (changes[i].kind, c.kind) {
            (ChangeKind::Deleted, _) => panic!("{show:?} is reported below a deleted directory"),
            (ChangeKind::Added, k) if k != ChangeKind::Added => {
                panic!("{show:?} is {k:?} below an added directory")
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input { d: data, i: 0 };
    let flags = inp.byte().unwrap_or(0);
    let nlowers = 1 + (flags & 1) as usize;
    let (private, opts) = if flags & 2 != 0 {
        (
            &b"user.overlay."[..],
            DiffOptions {
                private: Private::USER,
            },
        )
    } else {
        (&b"trusted.overlay."[..], DiffOptions::default())
    };
    let other: &'static [u8] = if flags & 2 != 0 {
        b"trusted.overlay."
    } else {
        b"user.overlay."
    };

    let t = common::scratch("layerfs-fuzz-diff-");
    let mut layers = vec![t.path().join("upper")];
    layers.extend((1..=nlowers).map(|i| t.path().join(format!("lower{i}"))));
    for l in &layers {
        std::fs::create_dir(l).unwrap();
    }
    let b = Builder {
        layers,
        private,
        other,
    };
    for _ in 0..MAX_OPS {
        if b.op(&mut inp).is_none() {
            break;
        }
    }

    let result = diff(&b.layers[0], &b.layers[1..], &opts);
    if common::debug() {
        match &result {
            Ok(v) => {
                let lines: Vec<String> = v
                    .iter()
                    .map(|c| format!("{} {}", c.kind.letter(), c.path.escape_ascii()))
                    .collect();
                eprintln!("diff: {lines:?}");
            }
            Err(e) => eprintln!("diff: error: {e}"),
        }
    }
    if let Ok(changes) = result {
        check(&changes);
    }
    common::remove_tree(t);
});
