//! Support code for `tests/cow_differential.rs`: a scenario runner that
//! executes the same sequence of steps on a kernel overlay mount and on the
//! filesystem under test (layerfs, or a second kernel overlay in self-check
//! mode `LAYERFS_TEST_BACKEND=kernel`), then compares
//!
//! 1. every step's result (`Ok(observation)` or the errno),
//! 2. the merged views (everything the shared harness records; mtimes are
//!    compared as *classes*: an old time must be identical to the
//!    nanosecond, a time set during the test only has to be recent on both),
//! 3. the two upper directories in overlay format (whiteouts, opaque
//!    markers, `impure` marks, escaped `trusted.overlay.overlay.*`,
//!    presence of `trusted.overlay.origin`; values of origin and the whole
//!    of `uuid` are ignored, as is the shared-whiteout inode trick of the
//!    kernel),
//! 4. the cross-mount: a kernel overlay over layerfs's upper must show what
//!    layerfs showed; optionally the reverse (layerfs over the kernel's
//!    upper shows the kernel's view),
//! 5. that the lower layers were not modified.
//!
//! Steps are closures over the mount root; they use std/libc calls through
//! the small wrappers below, which all return [`R`].

#![allow(dead_code)]

use crate::common::*;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// Result of one step: an observation (compared verbatim) or an errno.
pub type R = Result<String, i32>;

// ===========================================================================
// Syscall wrappers
// ===========================================================================

fn cs(p: &Path) -> CString {
    cpath(p)
}

pub fn chk(r: libc::c_int) -> R {
    if r == 0 {
        Ok(String::new())
    } else {
        Err(errno())
    }
}

/// Render a result for humans / for combined observations.
pub fn show_r(r: &R) -> String {
    match r {
        Ok(s) if s.is_empty() => "Ok".to_string(),
        Ok(s) => format!("Ok({s})"),
        Err(e) => errno_name(*e),
    }
}

/// Several sub-results as one observation (never fails, so a step keeps
/// going after an expected error).
pub fn seq(items: Vec<(&str, R)>) -> R {
    Ok(items
        .iter()
        .map(|(l, r)| format!("{l}={}", show_r(r)))
        .collect::<Vec<_>>()
        .join("; "))
}

/// An owned file descriptor.
pub struct Fd(pub i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

pub fn open(p: &Path, flags: i32, mode: u32) -> Result<Fd, i32> {
    let c = cs(p);
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 { Err(errno()) } else { Ok(Fd(fd)) }
}

impl Fd {
    pub fn write(&self, data: &[u8]) -> R {
        let mut done = 0;
        while done < data.len() {
            // SAFETY: valid buffer slice.
            let n = unsafe { libc::write(self.0, data[done..].as_ptr().cast(), data.len() - done) };
            if n < 0 {
                return Err(errno());
            }
            done += n as usize;
        }
        Ok(String::new())
    }

    pub fn pwrite(&self, data: &[u8], off: u64) -> R {
        let mut done = 0;
        while done < data.len() {
            // SAFETY: valid buffer slice.
            let n = unsafe {
                libc::pwrite(
                    self.0,
                    data[done..].as_ptr().cast(),
                    data.len() - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                return Err(errno());
            }
            done += n as usize;
        }
        Ok(String::new())
    }

    /// pread `len` bytes at `off` (short at EOF).
    pub fn pread(&self, len: usize, off: u64) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            // SAFETY: valid writable buffer slice.
            let n = unsafe {
                libc::pread(
                    self.0,
                    buf[got..].as_mut_ptr().cast(),
                    len - got,
                    (off + got as u64) as libc::off_t,
                )
            };
            if n < 0 {
                return Err(errno());
            }
            if n == 0 {
                break;
            }
            got += n as usize;
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Whole content from offset 0.
    pub fn read_all(&self) -> Result<Vec<u8>, i32> {
        let mut out = Vec::new();
        loop {
            let chunk = self.pread(1 << 20, out.len() as u64)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// read(2) from the current position.
    pub fn read(&self, len: usize) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len];
        // SAFETY: valid writable buffer.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), len) };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    pub fn fstat(&self) -> Result<libc::stat, i32> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out pointer.
        let r = unsafe { libc::fstat(self.0, &mut st) };
        if r == 0 { Ok(st) } else { Err(errno()) }
    }

    pub fn ftruncate(&self, len: u64) -> R {
        // SAFETY: plain syscall.
        chk(unsafe { libc::ftruncate(self.0, len as libc::off_t) })
    }

    pub fn fsync(&self) -> R {
        // SAFETY: plain syscall.
        chk(unsafe { libc::fsync(self.0) })
    }
}

/// Observation of file content: short content verbatim, long as len+hash.
pub fn content_obs(data: &[u8]) -> String {
    if data.len() <= 200 {
        format!("\"{}\"", esc(data))
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        format!("<{} bytes fnv {h:016x}>", data.len())
    }
}

/// open + write + close.
pub fn write_file(p: &Path, flags: i32, data: &[u8]) -> R {
    let fd = open(p, flags, 0o644)?;
    fd.write(data)
}

/// Read the whole file (observation: its content).
pub fn read_file(p: &Path) -> R {
    let fd = open(p, libc::O_RDONLY, 0)?;
    Ok(content_obs(&fd.read_all()?))
}

pub fn truncate(p: &Path, len: u64) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) })
}

pub fn chmod(p: &Path, mode: u32) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) })
}

/// lchown; `None` leaves the id unchanged.
pub fn lchown(p: &Path, uid: Option<u32>, gid: Option<u32>) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::lchown(c.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })
}

/// chown (follows symlinks).
pub fn chown(p: &Path, uid: Option<u32>, gid: Option<u32>) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::chown(c.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })
}

/// A timestamp argument of utimensat.
#[derive(Clone, Copy, Debug)]
pub enum Ts {
    Set(i64, i64),
    Now,
    Omit,
}

fn ts(t: Ts) -> libc::timespec {
    match t {
        Ts::Set(s, n) => libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: n as _,
        },
        Ts::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Ts::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// utimensat(AT_FDCWD, p, [atime, mtime], nofollow ? AT_SYMLINK_NOFOLLOW : 0).
pub fn utimens(p: &Path, atime: Ts, mtime: Ts, nofollow: bool) -> R {
    let c = cs(p);
    let times = [ts(atime), ts(mtime)];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string and two timespecs.
    chk(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

/// utimensat with a NULL times pointer (both to now; needs only write access).
pub fn utimens_null(p: &Path) -> R {
    let c = cs(p);
    // SAFETY: valid C string, NULL times allowed.
    chk(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) })
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> R {
    let c = cs(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    chk(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub fn lgetxattr(p: &Path, name: &str) -> R {
    get_xattr(p, name.as_bytes()).map(|v| format!("\"{}\"", esc(&v)))
}

/// Sorted xattr names, comma separated.
pub fn llistxattr(p: &Path) -> R {
    let m = get_xattrs(p)?;
    Ok(m.keys().map(|k| esc(k)).collect::<Vec<_>>().join(","))
}

pub fn lremovexattr(p: &Path, name: &str) -> R {
    let c = cs(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings.
    chk(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

pub fn mkdir(p: &Path, mode: u32) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) })
}

/// mknod with a full mode (type | permissions) and device numbers.
pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe {
        libc::mknod(
            c.as_ptr(),
            mode as libc::mode_t,
            libc::makedev(major, minor),
        )
    })
}

pub fn symlink(target: &str, p: &Path) -> R {
    let c = cs(p);
    let t = CString::new(target).unwrap();
    // SAFETY: valid C strings.
    chk(unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) })
}

pub fn link(old: &Path, new: &Path) -> R {
    let (a, b) = (cs(old), cs(new));
    // SAFETY: valid C strings.
    chk(unsafe { libc::link(a.as_ptr(), b.as_ptr()) })
}

pub fn unlink(p: &Path) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::unlink(c.as_ptr()) })
}

pub fn rmdir(p: &Path) -> R {
    let c = cs(p);
    // SAFETY: valid C string.
    chk(unsafe { libc::rmdir(c.as_ptr()) })
}

pub fn rename(old: &Path, new: &Path) -> R {
    rename2(old, new, 0)
}

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const RENAME_WHITEOUT: u32 = 4;

/// renameat2 through the raw syscall.
pub fn rename2(old: &Path, new: &Path, flags: u32) -> R {
    let (a, b) = (cs(old), cs(new));
    // SAFETY: valid C strings; renameat2 takes (int, char*, int, char*, uint).
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(String::new())
    } else {
        Err(errno())
    }
}

pub fn lstat(p: &Path) -> Result<libc::stat, i32> {
    let c = cs(p);
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let r = unsafe { libc::lstat(c.as_ptr(), &mut st) };
    if r == 0 { Ok(st) } else { Err(errno()) }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A time for observations: "recent" if within the last 10 minutes (or in
/// the future), else exact.
pub fn tclass(sec: i64, nsec: i64) -> String {
    if sec >= now_secs() - 600 {
        "recent".to_string()
    } else {
        format!("{sec}.{nsec:09}")
    }
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "dir",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        _ => "?",
    }
}

/// Summary of a stat result without inode numbers or times.
pub fn stat_obs(st: &libc::stat) -> String {
    let mut s = format!(
        "{} {:04o} {}:{}",
        type_name(st.st_mode),
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid
    );
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        s.push_str(&format!(" size={} nlink={}", st.st_size, st.st_nlink));
    }
    if matches!(st.st_mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
        s.push_str(&format!(
            " rdev={}:{}",
            libc::major(st.st_rdev),
            libc::minor(st.st_rdev)
        ));
    }
    s
}

/// lstat observation (no inode numbers, no times).
pub fn describe(p: &Path) -> R {
    let st = lstat(p)?;
    let mut s = stat_obs(&st);
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        let t = fs::read_link(p).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        s.push_str(&format!(" -> {}", esc(t.as_os_str().as_bytes())));
    }
    Ok(s)
}

/// atime/mtime observation (exact if old, "recent" otherwise).
pub fn times(p: &Path) -> R {
    let st = lstat(p)?;
    Ok(format!(
        "atime={} mtime={}",
        tclass(st.st_atime, st.st_atime_nsec),
        tclass(st.st_mtime, st.st_mtime_nsec)
    ))
}

/// Sorted names of a directory (without . and ..).
pub fn list(p: &Path) -> R {
    let mut v: Vec<String> = list_dir(p)?
        .into_iter()
        .filter(|e| e.name != b"." && e.name != b"..")
        .map(|e| esc(&e.name))
        .collect();
    v.sort();
    Ok(v.join(","))
}

/// st_ino of a path (for identity relations inside one step, never as an
/// observation).
pub fn ino(p: &Path) -> Result<u64, i32> {
    lstat(p).map(|s| s.st_ino)
}

/// Run a shell command line (for real-tool workloads); observation: exit
/// code. stderr is echoed to the test log on failure.
pub fn sh(cmdline: &str, envs: &[(&str, &str)]) -> R {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmdline)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!(
            "sh `{cmdline}` exit {code}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(format!("exit {code}"))
}

// ===========================================================================
// Running code as another user
// ===========================================================================

/// Run `f` in a forked child with all ids set to `uid`/`gid` (no
/// supplementary groups, umask 022); its result comes back through a pipe.
pub fn as_user<F: FnOnce() -> R>(uid: u32, gid: u32, f: F) -> R {
    let mut fds = [0i32; 2];
    // SAFETY: valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        panic!("pipe2: {}", errno_name(errno()));
    }
    // SAFETY: fork; the child only runs `f` and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        panic!("fork: {}", errno_name(errno()));
    }
    if pid == 0 {
        // Child.
        // SAFETY: plain syscalls in the child.
        unsafe {
            libc::close(fds[0]);
            libc::umask(0o022);
        }
        let msg = {
            // SAFETY: plain syscalls.
            let ok = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(gid, gid, gid) == 0
                    && libc::setresuid(uid, uid, uid) == 0
            };
            if !ok {
                format!("P:setresuid failed: {}", errno_name(errno()))
            } else {
                match catch_unwind(AssertUnwindSafe(f)) {
                    Ok(Ok(s)) => format!("O:{s}"),
                    Ok(Err(e)) => format!("E:{e}"),
                    Err(_) => "P:panic in child".to_string(),
                }
            }
        };
        let b = msg.as_bytes();
        let mut off = 0;
        while off < b.len() {
            // SAFETY: valid buffer.
            let n = unsafe { libc::write(fds[1], b[off..].as_ptr().cast(), b.len() - off) };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        // SAFETY: terminate the child without running destructors/atexit.
        unsafe { libc::_exit(0) };
    }
    // Parent.
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(fds[1]) };
    let rd = Fd(fds[0]);
    let mut msg = Vec::new();
    loop {
        match rd.read(65536) {
            Ok(b) if b.is_empty() => break,
            Ok(b) => msg.extend_from_slice(&b),
            Err(libc::EINTR) => continue,
            Err(e) => panic!("read pipe: {}", errno_name(e)),
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let msg = String::from_utf8_lossy(&msg).into_owned();
    if let Some(s) = msg.strip_prefix("O:") {
        Ok(s.to_string())
    } else if let Some(e) = msg.strip_prefix("E:") {
        Err(e.parse().unwrap_or(-1))
    } else {
        Ok(format!("<child failed: {msg:?} status {status}>"))
    }
}

// ===========================================================================
// Mounts with explicit upper/work dirs (so uppers survive the unmount)
// ===========================================================================

/// Which implementation serves a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Kernel,
    Layerfs,
}

/// The implementation under test (layerfs, or the kernel in self-check).
pub fn under_test() -> Fs {
    if self_check() {
        Fs::Kernel
    } else {
        Fs::Layerfs
    }
}

/// Label of the implementation under test.
pub fn ut_label() -> &'static str {
    if self_check() { "kernel#2" } else { "layerfs" }
}

/// Make a fresh directory with fixed attributes (like the harness does for
/// uppers), so two uppers look identical before use.
pub fn fresh_dir(p: &Path) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
    set_mtime(p, UPPER_MTIME).expect("utimensat");
}

static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

extern "C" fn remove_bin_link() {
    if let Some(p) = BIN.get()
        && p.as_path() != Path::new(layerfs_bin())
    {
        let _ = fs::remove_file(p);
    }
}

/// The layerfs binary for this test process: a hard link (or copy) of the
/// cargo-built binary taken at first use, so a concurrent `cargo build`
/// replacing the binary cannot make later scenarios of the same run use
/// another build (or fail to spawn it). Removed at exit.
pub fn layerfs_binary() -> &'static Path {
    BIN.get_or_init(|| {
        let orig = PathBuf::from(layerfs_bin());
        let mine = test_tmp().join(format!("layerfs-cow-bin-{}", std::process::id()));
        let _ = fs::remove_file(&mine);
        let ok = fs::hard_link(&orig, &mine).is_ok() || fs::copy(&orig, &mine).is_ok();
        if ok {
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(remove_bin_link) };
            mine
        } else {
            orig
        }
    })
}

fn pids_with_arg(arg: &[u8]) -> Vec<i32> {
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
        {
            out.push(pid);
        }
    }
    out
}

fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// A mount guard; unmounts on drop.
pub struct Mnt {
    pub fs: Fs,
    pub mnt: PathBuf,
    pids: Vec<i32>,
    watchdog: Option<mpsc::Sender<()>>,
    mounted: bool,
}

impl Mnt {
    /// Mount `lowers` (topmost first) with `upper`/`work` on `mnt`.
    pub fn mount(
        fs_kind: Fs,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
    ) -> Result<Mnt, String> {
        Mnt::mount_with(fs_kind, lowers, upper, work, mnt, "")
    }

    /// [`Mnt::mount`] with extra mount options (`-o`, both implementations).
    pub fn mount_with(
        fs_kind: Fs,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        opts_extra: &str,
    ) -> Result<Mnt, String> {
        let logdir = mnt.parent().unwrap();
        let name = mnt.file_name().unwrap().to_string_lossy().into_owned();
        let out_path = logdir.join(format!("{name}.out"));
        let mut cmd = match fs_kind {
            Fs::Kernel => {
                let l: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
                let mut opts = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    l.join(":"),
                    upper.display(),
                    work.display()
                );
                if !opts_extra.is_empty() {
                    opts = format!("{opts},{opts_extra}");
                }
                let mut c = Command::new("mount");
                c.args(["-t", "overlay", "overlay", "-o", &opts]).arg(mnt);
                c
            }
            Fs::Layerfs => {
                let mut c = Command::new(layerfs_binary());
                c.arg("mount");
                for l in lowers {
                    c.arg("--lower").arg(l);
                }
                c.arg("--upper").arg(upper).arg("--work").arg(work).arg(mnt);
                if !opts_extra.is_empty() {
                    c.arg("-o").arg(opts_extra);
                }
                c
            }
        };
        let out = fs::File::create(&out_path).expect("log file");
        let err = out.try_clone().expect("dup");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if start.elapsed() > Duration::from_secs(30) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("wait: {e}")),
            }
        };
        let text = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
        let mut m = Mnt {
            fs: fs_kind,
            mnt: mnt.to_path_buf(),
            pids: Vec::new(),
            watchdog: None,
            mounted: true,
        };
        if fs_kind == Fs::Layerfs {
            m.pids = pids_with_arg(mnt.as_os_str().as_bytes());
        }
        let fstype = mount_fstype(mnt);
        let ok = match (&status, fs_kind, &fstype) {
            (Some(s), Fs::Kernel, Some(t)) => s.success() && t == "overlay",
            (Some(s), Fs::Layerfs, Some(t)) => s.success() && t.starts_with("fuse"),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "mounting {fs_kind:?} on {} failed (status {status:?}, fstype {fstype:?}): {}",
                mnt.display(),
                text.trim()
            ));
        }
        if fs_kind == Fs::Layerfs {
            let (tx, rx) = mpsc::channel::<()>();
            let pids = m.pids.clone();
            let mp = mnt.to_path_buf();
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(150))
                {
                    eprintln!(
                        "cow: mount {} alive too long; killing {pids:?}",
                        mp.display()
                    );
                    for p in pids {
                        // SAFETY: kill of the daemon this test started.
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            });
            m.watchdog = Some(tx);
        }
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Unmount and wait for a layerfs daemon to exit (5 s).
    pub fn unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        unmount(&self.mnt);
        drop(self.watchdog.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: Vec<i32> = self
                .pids
                .iter()
                .copied()
                .filter(|p| pid_alive(*p))
                .collect();
            if alive.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                for p in &alive {
                    // SAFETY: kill of the daemon this test started.
                    unsafe { libc::kill(*p, libc::SIGKILL) };
                }
                return Err(format!(
                    "daemon {alive:?} of {} still running 5 s after unmount; killed",
                    self.mnt.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("cow: {e}");
        }
    }
}

/// A base temp dir for a scenario's uppers/works/mount points, traversable
/// by other users (non-root steps need to reach the mount points).
pub fn scenario_base(tag: &str) -> TempDir {
    let t = tempfile::Builder::new()
        .prefix(&format!("layerfs-test-{}-cow-{tag}-", std::process::id()))
        .tempdir_in(test_tmp())
        .expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod base");
    t
}

// ===========================================================================
// Comparison helpers
// ===========================================================================

/// Compare mtimes as classes: both at/after `fresh_after` ("set during the
/// test"), or identical to the nanosecond.
pub fn compare_mtime_classes(a: &Snapshot, b: &Snapshot, fresh_after: i64) -> Vec<String> {
    let mut out = Vec::new();
    let class = |t: (i64, i64)| {
        if t.0 >= fresh_after {
            "<set during test>".to_string()
        } else {
            format!("{}.{:09}", t.0, t.1)
        }
    };
    for (k, ea) in &a.entries {
        let Some(eb) = b.entries.get(k) else { continue };
        if ea.error.is_some() || eb.error.is_some() || ea.ftype != eb.ftype {
            continue;
        }
        let (ca, cb) = (class(ea.mtime), class(eb.mtime));
        if ca != cb {
            out.push(format!(
                "{}: mtime ({:?}): {}={} {}={}",
                show(k),
                ea.ftype,
                a.label,
                ca,
                b.label,
                cb
            ));
        }
    }
    out
}

/// Compare two merged views (all fields, invariants, mtimes as classes).
pub fn compare_views(a: &Snapshot, b: &Snapshot, fresh_after: i64) -> Vec<String> {
    compare_views_with(a, b, fresh_after, true)
}

/// [`compare_views`], optionally without exact st_blocks.
pub fn compare_views_with(
    a: &Snapshot,
    b: &Snapshot,
    fresh_after: i64,
    blocks: bool,
) -> Vec<String> {
    let mut out = compare_with(
        CompareOpts {
            mtime: false,
            dir_mtime: false,
            blocks,
            ..Default::default()
        },
        a,
        b,
    );
    out.extend(compare_mtime_classes(a, b, fresh_after));
    out
}

/// Compare two raw upper dirs (no view invariants; mtimes as classes).
pub fn compare_uppers(a: &Snapshot, b: &Snapshot, fresh_after: i64, blocks: bool) -> Vec<String> {
    let mut out = compare_with(
        CompareOpts {
            mtime: false,
            dir_mtime: false,
            blocks,
            invariants: false,
            ..Default::default()
        },
        a,
        b,
    );
    out.extend(compare_mtime_classes(a, b, fresh_after));
    out
}

const IGNORED_UPPER_XATTRS: &[&[u8]] = &[b"trusted.overlay.uuid", b"user.overlay.uuid"];

/// Make an upper-dir snapshot comparable across implementations: drop
/// `uuid` (random), replace origin values by `<present>` (file handles),
/// and neutralise the kernel's shared whiteout inode (nlink and identity
/// of char 0/0).
pub fn normalize_upper(s: &mut Snapshot) {
    let mut n = 0u64;
    for e in s.entries.values_mut() {
        if let Ok(x) = &mut e.xattrs {
            x.retain(|k, _| !IGNORED_UPPER_XATTRS.contains(&&k[..]));
            for o in [&b"trusted.overlay.origin"[..], b"user.overlay.origin"] {
                if let Some(v) = x.get_mut(o) {
                    *v = Ok(b"<present>".to_vec());
                }
            }
        }
        if e.ftype == FileType::CharDev && e.rdev == Some((0, 0)) {
            e.nlink = None;
            n += 1;
            e.ino = u64::MAX - n;
        }
    }
}

/// Forget content and st_blocks of `paths` (files whose bytes legitimately
/// differ, e.g. git's index with inode numbers and ctimes).
pub fn strip_content(s: &mut Snapshot, paths: &[Vec<u8>]) {
    for p in paths {
        if let Some(e) = s.entries.get_mut(p) {
            e.content = None;
            e.blocks = None;
        }
    }
}

// ===========================================================================
// Scenarios
// ===========================================================================

type StepFn = dyn Fn(&Path) -> R;
type CheckFn = dyn Fn(&Path) -> Vec<String>;

/// One differential copy-on-write scenario. See the module docs.
pub struct Scenario {
    name: String,
    layers: Vec<Layer>,
    steps: Vec<(String, Box<StepFn>)>,
    reverse: bool,
    cross: bool,
    blocks: bool,
    ignore_content: Vec<Vec<u8>>,
    ignore_mtime: Vec<Vec<u8>>,
    upper_checks: Vec<(String, Box<CheckFn>)>,
    view_checks: Vec<(String, Box<CheckFn>)>,
    opts: String,
}

impl Scenario {
    pub fn new(name: &str, layers: Vec<Layer>) -> Scenario {
        Scenario {
            name: name.to_string(),
            layers,
            steps: Vec::new(),
            reverse: false,
            cross: true,
            blocks: true,
            ignore_content: Vec::new(),
            ignore_mtime: Vec::new(),
            upper_checks: Vec::new(),
            view_checks: Vec::new(),
            // layerfs's default, which the kernel must be asked for.
            opts: "redirect_dir=on".to_string(),
        }
    }

    /// Mount options for every mount of the scenario, the kernel's and
    /// layerfs's (both understand `redirect_dir=`); instead of the default
    /// `redirect_dir=on`, layerfs's default, which the kernel's is not.
    pub fn opts(mut self, opts: &str) -> Scenario {
        self.opts = opts.to_string();
        self
    }

    /// Add a step; `f` gets the mount root.
    pub fn step(mut self, label: &str, f: impl Fn(&Path) -> R + 'static) -> Scenario {
        self.steps.push((label.to_string(), Box::new(f)));
        self
    }

    /// Also mount the implementation under test over the kernel's upper and
    /// compare with the kernel's view.
    pub fn reverse(mut self) -> Scenario {
        self.reverse = true;
        self
    }

    /// Skip the cross-mount (kernel over layerfs's upper).
    pub fn no_cross(mut self) -> Scenario {
        self.cross = false;
        self
    }

    /// Do not compare st_blocks exactly (e.g. a large file whose
    /// allocation ext4 settles late); pair it with an
    /// [`Scenario::upper_check`].
    pub fn no_exact_blocks(mut self) -> Scenario {
        self.blocks = false;
        self
    }

    /// Do not compare content/st_blocks of this path (merged and upper).
    pub fn ignore_content(mut self, rel: &str) -> Scenario {
        self.ignore_content.push(rel.as_bytes().to_vec());
        self
    }

    /// Do not compare the mtime of this path (e.g. a parent dir whose
    /// time restoration races between concurrent copy-ups, in the kernel
    /// as well).
    pub fn ignore_mtime(mut self, rel: &str) -> Scenario {
        self.ignore_mtime.push(rel.as_bytes().to_vec());
        self
    }

    /// Apply `ignore_content` and `ignore_mtime` to a snapshot.
    fn strip(&self, s: &mut Snapshot) {
        strip_content(s, &self.ignore_content);
        for p in &self.ignore_mtime {
            if let Some(e) = s.entries.get_mut(p) {
                e.mtime = (0, 0);
            }
        }
    }

    /// A check run on each upper dir after unmount; returns problems. The
    /// kernel's upper must pass too (else the check is wrong).
    pub fn upper_check(
        mut self,
        label: &str,
        f: impl Fn(&Path) -> Vec<String> + 'static,
    ) -> Scenario {
        self.upper_checks.push((label.to_string(), Box::new(f)));
        self
    }

    /// A check run on each mount root after the steps, while mounted.
    pub fn view_check(
        mut self,
        label: &str,
        f: impl Fn(&Path) -> Vec<String> + 'static,
    ) -> Scenario {
        self.view_checks.push((label.to_string(), Box::new(f)));
        self
    }

    /// Run the scenario and panic with every mismatch found.
    pub fn run(self) {
        let problems = self.run_collect();
        report(
            &format!("scenario `{}`: kernel vs {}", self.name, ut_label()),
            problems,
        );
    }

    fn run_step(f: &StepFn, root: &Path) -> R {
        match catch_unwind(AssertUnwindSafe(|| f(root))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Ok(format!("<step panicked: {msg}>"))
            }
        }
    }

    /// Run and return the mismatches (each prefixed with its section).
    pub fn run_collect(&self) -> Vec<String> {
        let fresh_after = now_secs() - 2;
        let ut = ut_label();
        let stack = Stack::build(self.layers.clone());
        let before = stack.lower_snapshots("before");
        let base = scenario_base(&self.name.chars().take(20).collect::<String>());
        let b = base.path();
        for d in [
            "k_up", "k_work", "f_up", "f_work", "x_work", "r_work", "m_work",
        ] {
            fresh_dir(&b.join(d));
        }
        for d in ["k_mnt", "f_mnt", "x_mnt", "r_mnt", "m_mnt"] {
            fresh_dir(&b.join(d));
        }
        let (k_up, f_up) = (b.join("k_up"), b.join("f_up"));
        let mut problems = Vec::new();

        let mut km = Mnt::mount_with(
            Fs::Kernel,
            &stack.lowers,
            &k_up,
            &b.join("k_work"),
            &b.join("k_mnt"),
            &self.opts,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut fm = Mnt::mount_with(
            under_test(),
            &stack.lowers,
            &f_up,
            &b.join("f_work"),
            &b.join("f_mnt"),
            &self.opts,
        )
        .unwrap_or_else(|e| panic!("{e}"));

        // 1. Steps.
        let mut trace = Vec::new();
        for (i, (label, f)) in self.steps.iter().enumerate() {
            let rk = Self::run_step(f.as_ref(), km.path());
            let rf = Self::run_step(f.as_ref(), fm.path());
            trace.push(format!("step {i} `{label}`: kernel={}", show_r(&rk)));
            if rk != rf {
                problems.push(format!(
                    "[step {i} `{label}`] kernel={} {ut}={}",
                    show_r(&rk),
                    show_r(&rf)
                ));
            }
        }
        if std::env::var("COW_TRACE").is_ok() {
            eprintln!("{}:\n  {}", self.name, trace.join("\n  "));
        }
        for (label, f) in &self.view_checks {
            for (m, l) in [(&km, "kernel"), (&fm, ut)] {
                for p in f(m.path()) {
                    problems.push(format!("[view check `{label}` on {l}] {p}"));
                }
            }
        }

        // 2. Merged views.
        let mut ks = snapshot("kernel", km.path());
        let mut fs_ = snapshot(ut, fm.path());
        self.strip(&mut ks);
        self.strip(&mut fs_);
        problems.extend(
            compare_views_with(&ks, &fs_, fresh_after, self.blocks)
                .into_iter()
                .map(|m| format!("[merged] {m}")),
        );
        for (m, l) in [(&mut km, "kernel"), (&mut fm, ut)] {
            if let Err(e) = m.unmount() {
                problems.push(format!("[unmount {l}] {e}"));
            }
        }

        // 3. Uppers.
        let mut ku = snapshot("kernel-upper", &k_up);
        let mut fu = snapshot(&format!("{ut}-upper"), &f_up);
        normalize_upper(&mut ku);
        normalize_upper(&mut fu);
        self.strip(&mut ku);
        self.strip(&mut fu);
        problems.extend(
            compare_uppers(&ku, &fu, fresh_after, self.blocks)
                .into_iter()
                .map(|m| format!("[upper] {m}")),
        );
        for (label, f) in &self.upper_checks {
            for (u, l) in [(&k_up, "kernel"), (&f_up, ut)] {
                for p in f(u) {
                    problems.push(format!("[upper check `{label}` on {l}] {p}"));
                }
            }
        }

        for (w, l) in [(b.join("k_work"), "kernel"), (b.join("f_work"), ut)] {
            for p in workdir_leftovers(&w) {
                problems.push(format!("[workdir of {l}] leftover after unmount: {p}"));
            }
        }

        // 4. Cross-mount: the kernel over the upper written by the
        // implementation under test shows what it showed.
        if self.cross {
            match Mnt::mount_with(
                Fs::Kernel,
                &stack.lowers,
                &f_up,
                &b.join("x_work"),
                &b.join("x_mnt"),
                &self.opts,
            ) {
                Ok(mut xm) => {
                    let mut xs = snapshot(&format!("kernel-over-{ut}-upper"), xm.path());
                    self.strip(&mut xs);
                    problems.extend(
                        compare_views_with(&fs_, &xs, fresh_after, self.blocks)
                            .into_iter()
                            .chain(raw_ino_mismatches(&fs_, &xs))
                            .map(|m| format!("[cross] {m}")),
                    );
                    let _ = xm.unmount();
                }
                Err(e) => problems.push(format!("[cross] {e}")),
            }
        }
        // 5. Reverse: the implementation under test over the kernel's upper.
        if self.reverse {
            match Mnt::mount_with(
                under_test(),
                &stack.lowers,
                &k_up,
                &b.join("r_work"),
                &b.join("r_mnt"),
                &self.opts,
            ) {
                Ok(mut rm) => {
                    let mut rs = snapshot(&format!("{ut}-over-kernel-upper"), rm.path());
                    self.strip(&mut rs);
                    problems.extend(
                        compare_views_with(&ks, &rs, fresh_after, self.blocks)
                            .into_iter()
                            .chain(raw_ino_mismatches(&ks, &rs))
                            .map(|m| format!("[reverse] {m}")),
                    );
                    if let Err(e) = rm.unmount() {
                        problems.push(format!("[reverse unmount] {e}"));
                    }
                }
                Err(e) => problems.push(format!("[reverse] {e}")),
            }
        }

        // 6. Remount: the implementation under test over its own upper
        // (fresh work dir) shows what it showed before.
        match Mnt::mount_with(
            under_test(),
            &stack.lowers,
            &f_up,
            &b.join("m_work"),
            &b.join("m_mnt"),
            &self.opts,
        ) {
            Ok(mut mm) => {
                let mut ms = snapshot(&format!("{ut}-remounted"), mm.path());
                self.strip(&mut ms);
                problems.extend(
                    compare_views_with(&fs_, &ms, fresh_after, self.blocks)
                        .into_iter()
                        .chain(raw_ino_mismatches(&fs_, &ms))
                        .map(|m| format!("[remount] {m}")),
                );
                if let Err(e) = mm.unmount() {
                    problems.push(format!("[remount unmount] {e}"));
                }
            }
            Err(e) => problems.push(format!("[remount] {e}")),
        }

        // 7. Lowers untouched.
        problems.extend(stack.lowers_unchanged(&before));
        problems
    }
}

/// Non-directories left in a work dir after unmount (the kernel may leave
/// its shared whiteout inode there, so whiteouts are tolerated): a
/// copy-up or whiteout creation that did not finish, or was not cleaned.
pub fn workdir_leftovers(work: &Path) -> Vec<String> {
    let s = snapshot("work", work);
    s.entries
        .iter()
        .filter(|(_, e)| {
            e.ftype != FileType::Dir && !(e.ftype == FileType::CharDev && e.rdev == Some((0, 0)))
        })
        .map(|(k, e)| format!("{} ({})", show(k), e.summary()))
        .collect()
}

/// Sum of st_blocks (512-byte units) of a file.
pub fn blocks_of(p: &Path) -> Result<u64, i32> {
    lstat(p).map(|s| s.st_blocks as u64)
}

/// A deterministic snapshot-independent digest of a directory tree (paths,
/// types, modes, owners, sizes, contents, link targets, xattrs, mtimes):
/// used to prove lowers are byte-for-byte unchanged.
pub fn tree_digest(root: &Path) -> BTreeMap<Vec<u8>, String> {
    let s = snapshot("digest", root);
    s.entries
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                format!(
                    "{:?} {:o} {}:{} {:?} {} {:?} {:?} {:?} {:?}",
                    e.ftype,
                    e.mode,
                    e.uid,
                    e.gid,
                    e.size,
                    e.content
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    e.target,
                    e.rdev,
                    e.mtime,
                    e.xattrs
                ),
            )
        })
        .collect()
}
