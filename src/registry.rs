//! Where running mounts record their layers, so that `layerfs diff
//! MOUNTPOINT` can find them: one small file per mount under `/run/layerfs`
//! (or `$XDG_RUNTIME_DIR/layerfs` for non-root users), named by a hash of
//! the canonical mount point and the daemon's pid, written once the mount is
//! ready and removed when that daemon exits. Container engines mount again
//! at a path at once, so several records of one path may exist for a moment:
//! the newest one whose daemon is alive wins. A file left by a killed daemon
//! is recognised by its dead pid and ignored.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::config::MountConfig;

const MAGIC: &[u8] = b"layerfs-mount-v1";

/// The layers of a running mount.
#[derive(Debug)]
pub struct Recorded {
    pub pid: u32,
    pub upper: Option<PathBuf>,
    pub lowers: Vec<PathBuf>,
    pub userxattr: bool,
}

fn dir() -> PathBuf {
    // SAFETY-free: geteuid has no preconditions, read through /proc.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root && let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("layerfs");
    }
    PathBuf::from("/run/layerfs")
}

/// FNV-1a: a stable file name for a mount point of any length.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The record-name prefix of a mount point, and the canonical path.
fn prefix_for(mountpoint: &Path) -> Option<(String, PathBuf)> {
    let canon = std::fs::canonicalize(mountpoint).ok()?;
    Some((
        format!("{:016x}-", fnv(canon.as_os_str().as_bytes())),
        canon,
    ))
}

/// Records a ready mount; returns the file to remove at exit.
pub fn record(mountpoint: &Path, cfg: &MountConfig) -> Option<PathBuf> {
    let (prefix, canon) = prefix_for(mountpoint)?;
    let file = dir().join(format!("{prefix}{}", std::process::id()));
    let mut v: Vec<Vec<u8>> = vec![
        MAGIC.to_vec(),
        std::process::id().to_string().into_bytes(),
        canon.as_os_str().as_bytes().to_vec(),
        vec![if cfg.options.userxattr { b'1' } else { b'0' }],
        cfg.upper
            .as_ref()
            .map(|u| u.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
    ];
    v.extend(cfg.lowers.iter().map(|l| l.as_os_str().as_bytes().to_vec()));
    std::fs::create_dir_all(dir()).ok()?;
    let tmp = dir().join(format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, v.join(&b'\0')).ok()?;
    std::fs::rename(&tmp, &file).ok()?;
    Some(file)
}

/// The layers of the layerfs mount at `mountpoint`.
pub fn find(mountpoint: &Path) -> Result<Recorded, String> {
    let not_found = || {
        format!(
            "'{}' is not a running layerfs mount (no record of it); give its layers with --upper DIR --lower DIR ...",
            mountpoint.display()
        )
    };
    let (prefix, canon) = prefix_for(mountpoint).ok_or_else(not_found)?;
    let mut best: Option<(std::time::SystemTime, Recorded)> = None;
    for ent in std::fs::read_dir(dir()).map_err(|_| not_found())?.flatten() {
        if !ent.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        let Ok(data) = std::fs::read(ent.path()) else {
            continue;
        };
        let Some(r) = parse(&data, &canon) else {
            continue;
        };
        let mtime = ent
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| mtime >= *t) {
            best = Some((mtime, r));
        }
    }
    best.map(|(_, r)| r).ok_or_else(not_found)
}

/// A record of a live daemon for `canon`, if `data` is one.
fn parse(data: &[u8], canon: &Path) -> Option<Recorded> {
    let f: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    if f.len() < 6 || f[0] != MAGIC || f[2] != canon.as_os_str().as_bytes() {
        return None;
    }
    let pid: u32 = std::str::from_utf8(f[1]).ok()?.parse().ok()?;
    if !alive(pid) {
        return None;
    }
    let path = |b: &[u8]| PathBuf::from(OsString::from_vec(b.to_vec()));
    Some(Recorded {
        pid,
        userxattr: f[3] == b"1",
        upper: (!f[4].is_empty()).then(|| path(f[4])),
        lowers: f[5..].iter().map(|b| path(b)).collect(),
    })
}

/// Is `pid` a running (not zombie) process?
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}
