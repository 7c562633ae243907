//! Support for the reliability tests (`tests/fsx.rs`, `tests/crash.rs`,
//! `tests/load.rs`): mounting layerfs and the kernel overlay over given
//! lower/upper/work dirs (so a test can kill a daemon and remount the same
//! upper), guards that always unmount (also on panic), the daemon's pid, fd
//! count and RSS, a seeded PRNG, and a tree walker for comparing views.
//!
//! Independent of `tests/common` so these tests can mount the *same* upper
//! and work dir several times.
//!
//! `LAYERFS_BIN` replaces the binary under test (default: the one cargo
//! built for this test run). The binary is copied once per test process so
//! a concurrent rebuild of `target/` cannot change it under a running test.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/// SplitMix64: tiny, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    pub fn range(&mut self, lo: u64, hi_incl: u64) -> u64 {
        lo + self.below(hi_incl - lo + 1)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Seed from `var` if set, else from the clock. Printed by the caller.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s}: not a number")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
        }
    }
}

pub fn env_u64(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s}: not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------
// errno helpers
// ---------------------------------------------------------------------------

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ESTALE => "ESTALE",
        libc::EINTR => "EINTR",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::ENODATA => "ENODATA",
        libc::ETXTBSY => "ETXTBSY",
        _ => "",
    };
    if name.is_empty() {
        format!("errno {e}")
    } else {
        format!("{name} ({e})")
    }
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

// ---------------------------------------------------------------------------
// Binary under test
// ---------------------------------------------------------------------------

static BIN: OnceLock<PathBuf> = OnceLock::new();

const BIN_PREFIX: &str = "lfs-rel-bin-";

fn bin_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{BIN_PREFIX}{pid}"))
}

extern "C" fn remove_bin_copy() {
    let _ = fs::remove_dir_all(bin_dir(std::process::id()));
}

/// The layerfs binary, copied once per process to `$TMPDIR/lfs-rel-bin-PID`
/// (removed at exit; copies of dead processes are removed here).
pub fn layerfs_bin() -> &'static Path {
    BIN.get_or_init(|| {
        if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
            for d in rd.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix(BIN_PREFIX)
                    .and_then(|p| p.parse::<i32>().ok())
                    && !pid_alive(pid)
                {
                    let _ = fs::remove_dir_all(d.path());
                }
            }
        }
        let src = std::env::var_os("LAYERFS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_layerfs")));
        let dir = bin_dir(std::process::id());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir for the binary copy");
        let dst = dir.join("layerfs");
        fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        // SAFETY: registers a plain extern "C" function without arguments.
        unsafe { libc::atexit(remove_bin_copy) };
        dst
    })
}

// ---------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------

/// A temp dir holding `lowerN`, `upper`, `work` and mount points.
pub struct Dirs {
    pub base: TempDir,
}

impl Dirs {
    pub fn new(tag: &str) -> Dirs {
        let base = tempfile::Builder::new()
            .prefix(&format!("lfs-rel-{tag}-"))
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir");
        // Non-root callers (allow_other) must be able to reach the mount.
        chmod(base.path(), 0o755);
        Dirs { base }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.base.path().join(name)
    }
    /// Make (if needed) and return the dir `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(&p, 0o755);
        p
    }
}

pub fn chmod(p: &Path, mode: u32) {
    let c = cpath(p);
    // SAFETY: plain chmod(2) on a NUL-terminated path.
    let r = unsafe { libc::chmod(c.as_ptr(), mode) };
    assert_eq!(r, 0, "chmod {}: {}", p.display(), errno_name(errno()));
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

/// Is `path` a mount point (per /proc/self/mountinfo)? Returns the fs type.
pub fn mount_fstype(path: &Path) -> Option<String> {
    let info = fs::read("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 10 {
            continue;
        }
        if unescape_mountinfo(fields[4]) == want
            && let Some(dash) = fields.iter().position(|f| *f == b"-")
        {
            found = fields
                .get(dash + 1)
                .map(|f| String::from_utf8_lossy(f).into_owned());
        }
    }
    found
}

fn unescape_mountinfo(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

/// Alive and not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(')') {
            Some(i) => !s[i + 1..].trim_start().starts_with('Z'),
            None => false,
        },
        Err(_) => false,
    }
}

/// Pids (other than ours) whose argv contains `arg` exactly.
pub fn pids_with_arg(arg: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for d in rd.flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline"))
            && cmd.split(|&b| b == 0).any(|a| a == arg)
            && pid_alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// What the daemon's fds point at (for leak reports), sorted with counts.
pub fn fd_targets(pid: i32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for d in rd.flatten() {
            let t = fs::read_link(d.path())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            *out.entry(t).or_insert(0) += 1;
        }
    }
    out
}

/// A field of /proc/PID/status in kB (e.g. "VmRSS").
pub fn status_kb(pid: i32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field)
            && let Some(rest) = rest.strip_prefix(':')
        {
            return rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

pub fn threads(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// Kernel stacks / wchan of every thread of `pid` (for hang reports).
pub fn describe_threads(pid: i32) -> String {
    let mut out = String::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
        for d in rd.flatten() {
            let tid = d.file_name().to_string_lossy().into_owned();
            let comm = fs::read_to_string(d.path().join("comm")).unwrap_or_default();
            let wchan = fs::read_to_string(d.path().join("wchan")).unwrap_or_default();
            let stat = fs::read_to_string(d.path().join("stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .map(|i| stat[i + 1..].trim_start().chars().next().unwrap_or('?'))
                .unwrap_or('?');
            out.push_str(&format!(
                "  tid {tid} {} state {state} wchan {wchan}\n",
                comm.trim()
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Running commands with a timeout
// ---------------------------------------------------------------------------

/// Run `cmd` with a timeout; returns (exit status or None on timeout, output).
pub fn run_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let out = tempfile::NamedTempFile::new().expect("tempfile");
    let f1 = out.reopen().unwrap();
    let f2 = out.reopen().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f1)
        .stderr(f2)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait {cmd:?}: {e}"),
        }
    };
    let mut text = String::new();
    let _ = fs::File::open(out.path()).and_then(|mut f| f.read_to_string(&mut text));
    (status, text.trim().to_string())
}

/// Unmount `path` (umount, then umount -l); true if it is no longer mounted.
pub fn unmount_path(path: &Path) -> bool {
    if mount_fstype(path).is_none() {
        return true;
    }
    for _ in 0..50 {
        let (st, _) = run_timeout(Command::new("umount").arg(path), Duration::from_secs(20));
        if st.is_some_and(|s| s.success()) || mount_fstype(path).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = run_timeout(
        Command::new("umount").arg("-l").arg(path),
        Duration::from_secs(20),
    );
    mount_fstype(path).is_none()
}

// ---------------------------------------------------------------------------
// layerfs mounts
// ---------------------------------------------------------------------------

/// A running layerfs mount; unmounted on drop (daemon killed if it does not
/// exit within 5 s of the unmount). A watchdog kills the daemon of a mount
/// that lives longer than `RELIABILITY_MOUNT_TIMEOUT` seconds (default 900),
/// so a deadlocked daemon turns into failing syscalls, not a hung test.
pub struct Layerfs {
    pub mnt: PathBuf,
    pub pid: i32,
    done: bool,
    _watchdog: Watchdog,
}

/// Kills `pid` (and reports why) unless dropped within the time limit.
pub struct Watchdog {
    disarm: Option<std::sync::mpsc::Sender<()>>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    pub fn new(pid: i32, limit: Duration, what: String) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = fired.clone();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                f2.store(true, std::sync::atomic::Ordering::SeqCst);
                eprintln!(
                    "WATCHDOG: {what}: not done after {limit:?} (deadlock?); daemon {pid} threads:\n{}killing the daemon",
                    describe_threads(pid)
                );
                if pid_alive(pid) {
                    // SAFETY: kill(2) of a daemon a test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        });
        Watchdog {
            disarm: Some(tx),
            fired,
        }
    }
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
    }
}

impl Layerfs {
    /// `layerfs mount --lower … --upper U --work W [-o opts] MNT`.
    pub fn mount(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path) -> Layerfs {
        Self::try_mount(lowers, upper, work, mnt, None).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_mount(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        opts: Option<&str>,
    ) -> Result<Layerfs, String> {
        fs::create_dir_all(mnt).map_err(|e| format!("mkdir {}: {e}", mnt.display()))?;
        let mut cmd = Command::new(layerfs_bin());
        cmd.arg("mount");
        for l in lowers {
            cmd.arg("--lower").arg(l);
        }
        cmd.arg("--upper").arg(upper).arg("--work").arg(work);
        if let Some(o) = opts {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(mnt);
        let (st, text) = run_timeout(&mut cmd, Duration::from_secs(30));
        match st {
            None => return Err(format!("{cmd:?} did not return within 30 s: {text}")),
            Some(s) if !s.success() => return Err(format!("{cmd:?} failed ({s}): {text}")),
            _ => {}
        }
        match mount_fstype(mnt) {
            Some(t) if t.starts_with("fuse") => {}
            other => {
                return Err(format!(
                    "{cmd:?} exited 0 but {} is not a FUSE mount ({other:?}): {text}",
                    mnt.display()
                ));
            }
        }
        let pids = pids_with_arg(mnt.as_os_str().as_bytes());
        if pids.len() != 1 {
            unmount_path(mnt);
            return Err(format!(
                "expected one daemon with {} in argv, found {pids:?}",
                mnt.display()
            ));
        }
        let limit = Duration::from_secs(env_u64("RELIABILITY_MOUNT_TIMEOUT", 900));
        Ok(Layerfs {
            mnt: mnt.to_path_buf(),
            pid: pids[0],
            done: false,
            _watchdog: Watchdog::new(pids[0], limit, format!("mount {}", mnt.display())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// A watchdog for one phase of a test on this mount.
    pub fn watchdog(&self, secs: u64, what: &str) -> Watchdog {
        Watchdog::new(self.pid, Duration::from_secs(secs), what.to_string())
    }

    /// kill -9 the daemon and wait until it is gone. The mount stays (dead:
    /// ENOTCONN) until [`Layerfs::lazy_unmount`] or drop.
    pub fn kill9(&self) {
        // SAFETY: kill(2) of the daemon this guard mounted.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(self.pid) {
            assert!(
                Instant::now() < deadline,
                "daemon {} survived SIGKILL for 10 s",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `umount -l` (for a dead mount).
    pub fn lazy_unmount(mut self) {
        self.done = true;
        let _ = run_timeout(
            Command::new("umount").arg("-l").arg(&self.mnt),
            Duration::from_secs(20),
        );
        if mount_fstype(&self.mnt).is_some() {
            panic!("umount -l {} left it mounted", self.mnt.display());
        }
        if pid_alive(self.pid) {
            // SAFETY: kill(2) of the daemon this guard mounted.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Clean unmount; Err if umount fails or the daemon does not exit in 5 s.
    pub fn unmount(mut self) -> Result<(), String> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        if !unmount_path(&self.mnt) {
            return Err(format!("could not unmount {}", self.mnt.display()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(self.pid) {
            if Instant::now() > deadline {
                // SAFETY: kill(2) of the daemon this guard mounted.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                return Err(format!(
                    "daemon {} still running 5 s after unmount of {}; killed",
                    self.pid,
                    self.mnt.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Layerfs {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            eprintln!("reliability: {e}");
        }
    }
}

/// A kernel overlay mount; unmounted on drop.
pub struct KernelOverlay {
    pub mnt: PathBuf,
    done: bool,
}

impl KernelOverlay {
    pub fn mount(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path) -> KernelOverlay {
        fs::create_dir_all(mnt).unwrap();
        let lower = lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        let (st, text) = run_timeout(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(&opts)
                .arg(mnt),
            Duration::from_secs(30),
        );
        assert!(
            st.is_some_and(|s| s.success()),
            "kernel overlay mount {opts} on {}: {text}",
            mnt.display()
        );
        KernelOverlay {
            mnt: mnt.to_path_buf(),
            done: false,
        }
    }
    pub fn path(&self) -> &Path {
        &self.mnt
    }
    pub fn unmount(mut self) {
        self.done = true;
        assert!(unmount_path(&self.mnt), "umount {}", self.mnt.display());
    }
}

impl Drop for KernelOverlay {
    fn drop(&mut self) {
        if !self.done {
            unmount_path(&self.mnt);
        }
    }
}

// ---------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------

/// What a path shows: type + size + content hash (files), target (symlinks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { size: u64, hash: u64 },
    Symlink(Vec<u8>),
    Other(u32),
}

/// FNV-1a 64.
pub fn hash_bytes(h: &mut u64, data: &[u8]) {
    for &b in data {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

pub fn hash_file(p: &Path) -> std::io::Result<(u64, u64)> {
    let mut f = fs::File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = FNV_INIT;
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        hash_bytes(&mut h, &buf[..k]);
        n += k as u64;
    }
    Ok((n, h))
}

/// Walk `root` (no symlink following): relative path → node. Errors while
/// walking are returned as `path: error` strings.
pub fn walk(root: &Path) -> (BTreeMap<String, Node>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut errs = Vec::new();
    walk_into(root, root, &mut out, &mut errs);
    (out, errs)
}

fn walk_into(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>, errs: &mut Vec<String>) {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            errs.push(format!("readdir {}: {e}", dir.display()));
            return;
        }
    };
    let mut names: Vec<_> = Vec::new();
    for d in rd {
        match d {
            Ok(d) => names.push(d.file_name()),
            Err(e) => errs.push(format!("readdir {}: {e}", dir.display())),
        }
    }
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                errs.push(format!("lstat {rel}: {e}"));
                continue;
            }
        };
        let ft = md.file_type();
        if ft.is_dir() {
            out.insert(rel, Node::Dir);
            walk_into(root, &p, out, errs);
        } else if ft.is_file() {
            match hash_file(&p) {
                Ok((n, h)) => {
                    if n != md.len() {
                        errs.push(format!("{rel}: st_size {} but read {n} bytes", md.len()));
                    }
                    out.insert(rel, Node::File { size: n, hash: h });
                }
                Err(e) => errs.push(format!("read {rel}: {e}")),
            }
        } else if ft.is_symlink() {
            let t = fs::read_link(&p)
                .map(|t| t.as_os_str().as_bytes().to_vec())
                .unwrap_or_default();
            out.insert(rel, Node::Symlink(t));
        } else {
            let _ = ft.is_char_device();
            out.insert(rel, Node::Other(md.mode() & libc::S_IFMT));
        }
    }
}

/// Differences between two walks, as readable lines.
pub fn diff_views(
    a_label: &str,
    a: &BTreeMap<String, Node>,
    b_label: &str,
    b: &BTreeMap<String, Node>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("{k}: {a_label} {v:?}, missing on {b_label}")),
            Some(w) if w != v => out.push(format!("{k}: {a_label} {v:?}, {b_label} {w:?}")),
            _ => {}
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            out.push(format!("{k}: missing on {a_label}, {b_label} {w:?}"));
        }
    }
    out
}

/// Entries of a directory (names), sorted; empty if it does not exist.
pub fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Deterministic content for `(tag, len)`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(tag.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ len as u64);
    r.bytes(len)
}

/// Drop the dentry and inode caches (so the kernel sends FUSE FORGETs).
pub fn drop_caches() {
    drop_caches_now();
}

pub fn drop_caches_now() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}
