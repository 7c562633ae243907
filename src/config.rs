//! A validated mount configuration, and the parser for fuse-overlayfs style
//! `-o` option strings.
//!
//! Invariant: a `MountConfig` that `validate` returned names existing,
//! non-overlapping directories, with upper and work together on one
//! filesystem; every rule violation is one error line naming the option and
//! the path.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::whiteout::Private;

/// Everything a mount needs, after parsing.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub options: Options,
}

/// Behaviour switches (from `-o` or the builder).
#[derive(Clone, Debug)]
pub struct Options {
    /// Refuse every modification even if an upper is given.
    pub read_only: bool,
    /// Store private xattrs as `user.overlay.*` (rootless).
    pub userxattr: bool,
    /// Skip fsync on copy-up (`volatile`, `fsync=0`).
    pub volatile: bool,
    /// `redirect_dir=`, as given (unset: `on`, or `nofollow` with
    /// `userxattr`, as the kernel); see `Options::redirects`.
    pub redirect_dir: Option<RedirectDir>,
    /// Let users other than the mounter in (default when root).
    pub allow_other: bool,
    /// `writeback`: the kernel's writeback cache for files not passed
    /// through (only when passthrough is off for the mount), so that
    /// writes are gathered in the page cache instead of a round trip each.
    pub writeback: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache names and attributes (`timeout=`).
    /// Every change goes through layerfs, which tells the kernel, so this
    /// can be long; the layers must not be changed behind its back (the
    /// same rule as the kernel's overlayfs).
    pub timeout: std::time::Duration,
    /// Let the kernel enforce and cache POSIX ACLs (off with `noacl`).
    pub acl: bool,
    /// How owners and directory link counts are presented.
    pub view: crate::idmap::View,
    /// Use FUSE passthrough for files in the upper layer when the kernel
    /// allows it (off with `passthrough=off`).
    pub passthrough: bool,
    /// Take requests through FUSE-over-io-uring when the kernel offers it
    /// (its `fuse` module's `enable_uring` parameter; off with `uring=off`).
    pub uring: bool,
    /// Scheduling class of the ring threads: normal (default), idle while
    /// they commit a reply and start waiting for the next
    /// (`uring=idle-commit`), or always idle (`uring=idle`).
    pub uring_class: fuser::RingClass,
    /// Extra options passed to the kernel mount (nodev, nosuid, noexec, ...).
    pub kernel_flags: Vec<String>,
    /// Options accepted but not acted on, to warn about.
    pub ignored: Vec<String>,
}

/// The kernel's `redirect_dir=` modes. `off` is `follow`: the kernel's
/// `redirect_always_follow`, on in Debian's and upstream's default
/// configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectDir {
    /// Directories with lower contents are renamed, recorded in
    /// `overlay.redirect`; redirects in the layers are followed.
    On,
    /// Such renames fail with `EXDEV` (`mv` then copies); redirects in the
    /// layers are followed.
    Follow,
    /// Such renames fail with `EXDEV`, and a lookup that meets a redirect
    /// with layers below it fails with `EPERM` (the kernel's rule: a
    /// redirect is like a symlink into the lower layers without permission
    /// checks).
    NoFollow,
}

impl Options {
    fn redirect_mode(&self) -> RedirectDir {
        match (self.redirect_dir, self.userxattr) {
            (Some(m), _) => m,
            (None, false) => RedirectDir::On,
            // The kernel with userxattr: no redirect written or followed.
            (None, true) => RedirectDir::NoFollow,
        }
    }

    /// Whether renames of directories with lower contents write redirects
    /// (else they fail with `EXDEV`, the kernel's default, and `mv` copies).
    pub fn redirects(&self) -> bool {
        self.redirect_mode() == RedirectDir::On
    }

    /// Whether redirects met in the layers are followed (else `EPERM`).
    pub fn follows_redirects(&self) -> bool {
        self.redirect_mode() != RedirectDir::NoFollow
    }

    /// Whether the mount is `noatime` (the last of `noatime`/`atime` wins).
    pub fn noatime(&self) -> bool {
        self.kernel_flags
            .iter()
            .rev()
            .find(|f| *f == "noatime" || *f == "atime")
            .is_some_and(|f| f == "noatime")
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            read_only: false,
            userxattr: false,
            volatile: false,
            redirect_dir: None,
            allow_other: is_root(),
            writeback: false,
            threads: default_threads(),
            timeout: std::time::Duration::from_secs(86400),
            acl: true,
            passthrough: true,
            uring: true,
            uring_class: fuser::RingClass::Idle,
            view: crate::idmap::View::default(),
            kernel_flags: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 2).clamp(2, 16))
        .unwrap_or(4)
}

impl Options {
    pub fn private(&self) -> Private {
        if self.userxattr {
            Private::USER
        } else {
            Private::TRUSTED
        }
    }
}

/// Splits an `-o` string at commas that are neither escaped (`\,`) nor
/// inside double quotes; empty items are dropped.
pub fn split_options(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut iter = s.iter().copied();
    while let Some(b) = iter.next() {
        match b {
            b'\\' => {
                cur.push(b);
                if let Some(n) = iter.next() {
                    cur.push(n);
                }
            }
            b'"' => {
                quoted = !quoted;
                cur.push(b);
            }
            b',' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(b),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits a `lowerdir=` value at unescaped `:` and removes the escapes
/// (`\:`, `\,`, `\\`). Layers after an unescaped `::` are the kernel's
/// data-only layers, which only metacopy files point into (layerfs refuses
/// metacopy uppers): they are not part of the merged view and are left out.
pub fn split_lowerdirs(s: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut iter = s.iter().copied().peekable();
    while let Some(b) = iter.next() {
        match b {
            b'\\' => cur.push(iter.next().unwrap_or(b'\\')),
            b':' if iter.peek() == Some(&b':') => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(OsString::from_vec(cur)));
                }
                log::info!("data-only lower layers (after '::') left out: nothing refers to them");
                return out;
            }
            b':' => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(OsString::from_vec(std::mem::take(&mut cur))));
                }
            }
            _ => cur.push(b),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(OsString::from_vec(cur)));
    }
    out
}

fn unescape_path(v: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(v.len());
    let mut iter = v.iter().copied();
    while let Some(b) = iter.next() {
        out.push(if b == b'\\' {
            iter.next().unwrap_or(b)
        } else {
            b
        });
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Applies one `-o` string to a configuration.
pub fn apply_option_string(cfg: &mut MountConfig, s: &OsStr) -> Result<(), String> {
    for item in split_options(s.as_bytes()) {
        apply_option(cfg, &item)?;
    }
    Ok(())
}

fn apply_option(cfg: &mut MountConfig, item: &[u8]) -> Result<(), String> {
    let (key, val) = match item.iter().position(|&b| b == b'=') {
        Some(i) => (&item[..i], Some(&item[i + 1..])),
        None => (item, None),
    };
    let key = String::from_utf8_lossy(key).into_owned();
    let o = &mut cfg.options;
    match (key.as_str(), val) {
        ("lowerdir", Some(v)) => cfg.lowers = split_lowerdirs(v),
        // The kernel's newer form: one layer per option, no escapes.
        ("lowerdir+", Some(v)) => cfg.lowers.push(PathBuf::from(OsStr::from_bytes(v))),
        ("datadir+", Some(_)) => {
            log::info!("data-only layer (datadir+=) left out: nothing refers to it")
        }
        ("upperdir", Some(v)) => cfg.upper = Some(unescape_path(v)),
        ("workdir", Some(v)) => cfg.work = Some(unescape_path(v)),
        ("ro", None) => o.read_only = true,
        ("rw", None) => o.read_only = false,
        ("userxattr", None) => o.userxattr = true,
        ("volatile", None) => o.volatile = true,
        ("fsync", Some(b"0")) => o.volatile = true,
        ("fsync", Some(_)) => o.volatile = false,
        ("redirect_dir", Some(b"on")) => o.redirect_dir = Some(RedirectDir::On),
        ("redirect_dir", Some(b"off" | b"follow")) => o.redirect_dir = Some(RedirectDir::Follow),
        ("redirect_dir", Some(b"nofollow")) => o.redirect_dir = Some(RedirectDir::NoFollow),
        ("redirect_dir", Some(v)) => {
            return Err(format!(
                "option redirect_dir: expected on, follow, nofollow or off, got '{}'",
                String::from_utf8_lossy(v)
            ));
        }
        ("allow_other", None) => o.allow_other = true,
        ("writeback" | "writeback_cache", None) => o.writeback = true,
        ("nowriteback" | "nowriteback_cache", None) => o.writeback = false,
        ("allow_root", None) => o.allow_other = true,
        ("threaded", Some(v)) | ("threads", Some(v)) => {
            let n: usize = String::from_utf8_lossy(v)
                .parse()
                .map_err(|_| format!("option {key}: expected a number of threads"))?;
            o.threads = n.clamp(1, 64);
        }
        ("nodev" | "nosuid" | "noexec" | "dev" | "suid" | "exec" | "noatime" | "atime", None) => {
            o.kernel_flags.push(key)
        }
        ("timeout", Some(v)) => {
            let secs: f64 = String::from_utf8_lossy(v)
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    format!(
                        "option timeout: expected seconds, got '{}'",
                        String::from_utf8_lossy(v)
                    )
                })?;
            o.timeout = std::time::Duration::from_secs_f64(secs.min(1e9));
        }
        ("noacl", None) => o.acl = false,
        ("uidmapping", Some(v)) => {
            o.view.uids = crate::idmap::IdMap::parse(&String::from_utf8_lossy(v))?
        }
        ("gidmapping", Some(v)) => {
            o.view.gids = crate::idmap::IdMap::parse(&String::from_utf8_lossy(v))?
        }
        ("squash_to_root", None) => {
            o.view.squash_uid.get_or_insert(0);
            o.view.squash_gid.get_or_insert(0);
        }
        ("squash_to_uid", Some(v)) => o.view.squash_uid = Some(parse_id(&key, v)?),
        ("squash_to_gid", Some(v)) => o.view.squash_gid = Some(parse_id(&key, v)?),
        ("static_nlink", None) => o.view.static_nlink = true,
        ("passthrough", Some(b"off" | b"0" | b"no")) | ("nopassthrough", None) => {
            o.passthrough = false
        }
        ("passthrough", Some(_)) => o.passthrough = true,
        ("uring", Some(b"off" | b"0" | b"no")) | ("nouring", None) => o.uring = false,
        ("uring", v) => {
            o.uring_class = match v {
                None | Some(b"on" | b"1" | b"yes" | b"idle") => fuser::RingClass::Idle,
                Some(b"normal") => fuser::RingClass::Normal,
                Some(b"idle-commit") => fuser::RingClass::IdleOnReply,
                Some(_) => {
                    o.ignored.push(String::from_utf8_lossy(item).into_owned());
                    return Ok(());
                }
            };
            o.uring = true
        }
        ("default_permissions" | "fast_ino" | "nonempty", None) => {}
        _ => o.ignored.push(String::from_utf8_lossy(item).into_owned()),
    }
    Ok(())
}

fn parse_id(key: &str, v: &[u8]) -> Result<u32, String> {
    String::from_utf8_lossy(v).parse().map_err(|_| {
        format!(
            "option {key}: expected a numeric id, got '{}'",
            String::from_utf8_lossy(v)
        )
    })
}

/// Why a configuration cannot be mounted; one line naming option and path.
fn err(option: &str, path: &Path, why: &str) -> String {
    format!("{option} '{}': {why}", path.display())
}

fn canonical_dir(option: &str, p: &Path) -> Result<(PathBuf, u64), String> {
    let md = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err(option, p, "does not exist"),
        _ => err(option, p, &format!("cannot be read: {e}")),
    })?;
    if !md.is_dir() {
        return Err(err(option, p, "is not a directory"));
    }
    let c = std::fs::canonicalize(p).map_err(|e| err(option, p, &e.to_string()))?;
    Ok((c, md.dev()))
}

fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

impl MountConfig {
    pub fn new(lowers: Vec<PathBuf>) -> MountConfig {
        MountConfig {
            lowers,
            upper: None,
            work: None,
            options: Options::default(),
        }
    }

    /// Checks every rule of SPEC §1 and returns the configuration with
    /// canonical paths. The work directory may hold only what a previous
    /// mount left (`work/`, `index/`); anything else is refused.
    pub fn validate(mut self) -> Result<MountConfig, String> {
        if self.lowers.is_empty() {
            return Err("lowerdir: at least one lower directory is required (--lower DIR or -o lowerdir=DIR)".into());
        }
        let mut seen: Vec<(String, PathBuf)> = Vec::new();
        let mut lowers = Vec::new();
        for l in &self.lowers {
            let (c, _) = canonical_dir("lowerdir", l)?;
            lowers.push(c);
        }
        match (&self.upper, &self.work) {
            (Some(_), None) => {
                return Err(
                    "workdir: upperdir needs a workdir too (--work DIR or -o workdir=DIR)".into(),
                );
            }
            (None, Some(w)) => return Err(err("workdir", w, "given without an upperdir")),
            _ => {}
        }
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            let (uc, udev) = canonical_dir("upperdir", u)?;
            let (wc, wdev) = canonical_dir("workdir", w)?;
            if udev != wdev {
                return Err(err(
                    "workdir",
                    w,
                    &format!(
                        "is not on the same filesystem as upperdir '{}'",
                        u.display()
                    ),
                ));
            }
            if uc == wc {
                return Err(err("workdir", w, "is the same directory as upperdir"));
            }
            if nested(&uc, &wc) {
                return Err(err(
                    "workdir",
                    w,
                    &format!("and upperdir '{}' are nested in each other", u.display()),
                ));
            }
            check_workdir_contents(&wc)?;
            seen.push(("upperdir".into(), uc.clone()));
            seen.push(("workdir".into(), wc.clone()));
            self.upper = Some(uc);
            self.work = Some(wc);
        }
        for (i, l) in lowers.iter().enumerate() {
            if lowers[..i].contains(l) {
                return Err(err("lowerdir", &self.lowers[i], "is given twice"));
            }
            // One lower inside another: the kernel refuses it too (ELOOP).
            if let Some((j, _)) = lowers[..i].iter().enumerate().find(|(_, o)| nested(l, o)) {
                return Err(err(
                    "lowerdir",
                    &self.lowers[i],
                    &format!("overlaps lowerdir '{}'", self.lowers[j].display()),
                ));
            }
            for (opt, p) in &seen {
                if nested(l, p) {
                    return Err(err(
                        "lowerdir",
                        &self.lowers[i],
                        &format!("overlaps {opt} '{}'", p.display()),
                    ));
                }
            }
        }
        self.lowers = lowers;
        if !self.options.userxattr && !trusted_xattrs_usable(self.work.as_deref()) {
            // Rootless (a user namespace): trusted.* is out of reach, so the
            // private xattrs are user.overlay.*, as the kernel's userxattr.
            log::info!("trusted.* xattrs are not usable here: using user.overlay.* (userxattr)");
            self.options.userxattr = true;
        }
        if self.options.userxattr
            && self
                .options
                .redirect_dir
                .is_some_and(|m| m != RedirectDir::NoFollow)
        {
            // The kernel refuses these pairs: with userxattr it neither
            // writes nor follows redirects (an unprivileged user could write
            // one in user.overlay.*).
            return Err(
                "option userxattr takes only redirect_dir=nofollow (the kernel's \
                 overlayfs neither writes nor follows redirects in user.overlay.* xattrs, \
                 and refuses other redirect_dir values with userxattr; userxattr is also \
                 chosen where trusted.* xattrs are unusable, e.g. rootless): drop \
                 redirect_dir= (directories with lower contents are then not renamed: \
                 EXDEV, and mv copies them)"
                    .into(),
            );
        }
        Ok(self)
    }
}

/// Can this process store `trusted.*` xattrs? Probed on the work dir when
/// there is one; otherwise judged by the user namespace (outside the initial
/// one they are never available).
fn trusted_xattrs_usable(work: Option<&Path>) -> bool {
    if let Some(w) = work
        && let Ok(fd) = crate::sys::open_path_dir(w)
    {
        use std::os::fd::AsFd;
        let t = crate::sys::xattr::Target::Fd(fd.as_fd());
        let name = c"trusted.overlay.layerfs-probe";
        return match crate::sys::xattr::set(t, name, b"1", 0) {
            Ok(()) => {
                let _ = crate::sys::xattr::remove(t, name);
                true
            }
            Err(e) => e.raw_os_error() != Some(libc::EPERM),
        };
    }
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
        .unwrap_or(true)
}

fn check_workdir_contents(w: &Path) -> Result<(), String> {
    let rd = std::fs::read_dir(w).map_err(|e| err("workdir", w, &e.to_string()))?;
    for ent in rd.flatten() {
        let name = ent.file_name();
        if name != "work" && name != "index" {
            return Err(err(
                "workdir",
                w,
                &format!(
                    "is not empty (it holds '{}'); give an empty directory on the upper's filesystem",
                    name.to_string_lossy()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_options_with_quotes_and_escapes() {
        let v = split_options(br#"lowerdir=a\,b:c,,upperdir=u,context="x,y",volatile,"#);
        let v: Vec<&[u8]> = v.iter().map(Vec::as_slice).collect();
        assert_eq!(
            v,
            vec![
                &br"lowerdir=a\,b:c"[..],
                b"upperdir=u",
                br#"context="x,y""#,
                b"volatile"
            ]
        );
    }

    #[test]
    fn splits_lowerdirs_with_escapes() {
        let v = split_lowerdirs(br"/a\:b:/c\,d:/e\\f:/g\:\:h");
        assert_eq!(
            v,
            vec![
                PathBuf::from("/a:b"),
                PathBuf::from("/c,d"),
                PathBuf::from(r"/e\f"),
                PathBuf::from("/g::h")
            ]
        );
        // Data-only layers after `::` are left out.
        assert_eq!(
            split_lowerdirs(b"/a:/b::/d1:/d2"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }

    #[test]
    fn lowerdir_plus_appends_one_layer_each() {
        let mut c = MountConfig::new(Vec::new());
        apply_option_string(
            &mut c,
            OsStr::new("lowerdir+=/a:b,lowerdir+=/c,datadir+=/d"),
        )
        .unwrap();
        assert_eq!(c.lowers, vec![PathBuf::from("/a:b"), PathBuf::from("/c")]);
        assert!(c.options.ignored.is_empty());
    }

    #[test]
    fn applies_options() {
        let mut c = MountConfig::new(vec![]);
        apply_option_string(
            &mut c,
            OsStr::new("lowerdir=/x:/y,upperdir=/u,workdir=/w,ro,fsync=0,bogus=1"),
        )
        .unwrap();
        assert_eq!(c.lowers, vec![PathBuf::from("/x"), PathBuf::from("/y")]);
        assert_eq!(c.upper, Some(PathBuf::from("/u")));
        assert!(c.options.read_only && c.options.volatile);
        assert_eq!(c.options.ignored, vec!["bogus=1".to_string()]);
    }

    #[test]
    fn uring_is_on_unless_turned_off() {
        let mut c = MountConfig::new(vec![]);
        use fuser::RingClass::*;
        assert!(c.options.uring && c.options.uring_class == Idle);
        for (opt, on, class) in [
            ("uring=off", false, Idle),
            ("uring=normal", true, Normal),
            ("nouring", false, Normal),
            ("uring", true, Idle),
            ("uring=idle-commit", true, IdleOnReply),
            ("uring=0", false, IdleOnReply),
            ("uring=idle", true, Idle),
            ("uring=normal", true, Normal),
            ("uring=on", true, Idle),
        ] {
            apply_option_string(&mut c, OsStr::new(opt)).unwrap();
            assert_eq!(
                (c.options.uring, c.options.uring_class),
                (on, class),
                "{opt}"
            );
        }
        assert!(c.options.ignored.is_empty());
        // An unknown value is warned about and changes nothing.
        apply_option_string(&mut c, OsStr::new("uring=idel")).unwrap();
        assert_eq!((c.options.uring, c.options.uring_class), (true, Idle));
        assert_eq!(c.options.ignored, vec!["uring=idel".to_string()]);
    }

    #[test]
    fn redirect_dir_is_on_unless_userxattr_or_turned_off() {
        let opts = |s: &str| {
            let mut c = MountConfig::new(vec![]);
            apply_option_string(&mut c, OsStr::new(s)).map(|_| c.options)
        };
        let o = opts("").unwrap();
        assert!(o.redirects() && o.follows_redirects());
        let o = opts("userxattr").unwrap();
        assert!(!o.redirects() && !o.follows_redirects());
        for (off, follows) in [
            ("redirect_dir=off", true),
            ("redirect_dir=follow", true),
            ("redirect_dir=nofollow", false),
        ] {
            let o = opts(off).unwrap();
            assert!(!o.redirects(), "{off}");
            assert_eq!(o.follows_redirects(), follows, "{off}");
        }
        assert!(
            opts("redirect_dir=off,redirect_dir=on")
                .unwrap()
                .redirects()
        );
        let e = opts("redirect_dir=yes").unwrap_err();
        assert!(e.contains("redirect_dir") && e.contains("yes"), "{e}");
    }

    #[test]
    fn writeback_is_asked_for() {
        let opts = |s: &str| {
            let mut c = MountConfig::new(vec![]);
            apply_option_string(&mut c, OsStr::new(s)).map(|_| c.options)
        };
        assert!(!opts("").unwrap().writeback);
        assert!(opts("writeback").unwrap().writeback);
        assert!(opts("writeback_cache").unwrap().writeback);
        assert!(!opts("writeback,nowriteback").unwrap().writeback);
        assert!(opts("writeback").unwrap().ignored.is_empty());
    }

    #[test]
    fn validation_names_the_problem() {
        let t = tempfile::tempdir().unwrap();
        let l = t.path().join("l");
        std::fs::create_dir(&l).unwrap();
        let missing = MountConfig::new(vec![t.path().join("nope")])
            .validate()
            .unwrap_err();
        assert!(
            missing.contains("lowerdir") && missing.contains("does not exist"),
            "{missing}"
        );
        let mut c = MountConfig::new(vec![l.clone()]);
        c.upper = Some(l.clone());
        c.work = Some(t.path().join("w"));
        std::fs::create_dir(t.path().join("w")).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("overlaps upperdir"), "{e}");
        let mut c = MountConfig::new(vec![l.clone()]);
        c.upper = Some(t.path().join("w"));
        let e = c.validate().unwrap_err();
        assert!(e.contains("workdir"), "{e}");
        // One lower inside another, in either order.
        std::fs::create_dir(l.join("in")).unwrap();
        for lowers in [vec![l.clone(), l.join("in")], vec![l.join("in"), l.clone()]] {
            let e = MountConfig::new(lowers).validate().unwrap_err();
            assert!(e.contains("overlaps lowerdir"), "{e}");
        }
        // The pairs the kernel refuses, and the one it takes.
        for bad in ["on", "off", "follow"] {
            let mut c = MountConfig::new(vec![l.clone()]);
            apply_option_string(&mut c, OsStr::new(&format!("userxattr,redirect_dir={bad}")))
                .unwrap();
            let e = c.validate().unwrap_err();
            assert!(
                e.contains("userxattr") && e.contains("redirect_dir=nofollow"),
                "{e}"
            );
        }
        let mut c = MountConfig::new(vec![l.clone()]);
        apply_option_string(&mut c, OsStr::new("userxattr,redirect_dir=nofollow")).unwrap();
        c.validate().unwrap();
    }
}
