//! `layerfs::diff` and `layerfs diff` against uppers written by the kernel's
//! overlayfs and by layerfs itself.
//!
//! Each table case builds lower layers with a small DSL and performs real
//! container-style operations twice, each time with a fresh upper: through
//! the kernel's overlayfs, and through a layerfs mount (`layerfs mount`)
//! over the same lowers. For both uppers, `diff(upper, lowers)` must give
//! the lines written by hand from docker's rules (moby go-archive
//! `addChanges`/`statDifferent`/`sameFsTime`); on the live layerfs mount the
//! CLI must print them too, as `layerfs diff MOUNTPOINT` and as
//! `layerfs diff --upper U --lower L...`. Some cases first run an earlier
//! container whose upper becomes the top lower ("committed", always through
//! the kernel with `redirect_dir=on`), so that lowers hold kernel-written
//! whiteouts, opaque dirs and redirects. Renames of lower directories run
//! with `redirect_dir=on` on both (layerfs's default); the case that needs
//! a kernel-only mount option (`metacopy=on`) runs on the kernel only, and
//! one that needs OCI markers honoured in a lower
//! runs on layerfs only; each says why. A few cases need formats no mount
//! writes (OCI markers, xattr whiteouts in the upper), so their upper is
//! built by hand.
//!
//! The randomized test applies random operation sequences (seeded, no
//! crates; `DIFF_SEED`/`DIFF_ROUNDS` to replay or extend) through a kernel
//! mount and compares `diff` with a naive docker-style comparison of the two
//! complete merged trees, each read through a read-only kernel mount
//! (upper+lowers, and lowers alone). The same sequence is then replayed
//! through a layerfs mount with its own upper, and `diff` of that upper is
//! compared with the naive comparison of the layerfs views (the live mount
//! as the container saw it, and a read-only layerfs mount of the lowers), and
//! with the kernel's reading of the same upper (`DIFF_LAYERFS_EVERY=N`
//! replays only every Nth round). `DIFF_KEEP=1` keeps the layers of a
//! failing round.
//!
//! The CLI tests cover the output formats (`--json`, `-z`, `--kind`) on a
//! live layerfs mount, and the error exits.
//!
//! Needs root (mount(2), mknod, trusted.* xattrs).

mod pinned_bin;

use pinned_bin::bin;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use layerfs::diff::{self, DiffOptions};
use layerfs::whiteout::Private;

type B = &'static [u8];

/// The mtime every lower object gets unless a case says otherwise.
const FIXED: (i64, i64) = (1_600_000_000, 123_456_789);

/// A valid v2 `security.capability` value: cap_net_raw, effective.
const CAP_NET_RAW: B =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

// ---------------------------------------------------------------------------
// Thin libc wrappers (paths are bytes; nothing follows a final symlink)

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    // SAFETY: valid C string; mknod has no memory effects.
    check(unsafe { libc::mknod(c(p).as_ptr(), mode, libc::makedev(major, minor)) })
}

fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) })
}

fn lutimes(p: &Path, (sec, nsec): (i64, i64)) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        t,
    ];
    let flags = libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), times.as_ptr(), flags) })
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let n = CString::new(name).expect("no NUL");
    // SAFETY: valid C strings and a value readable for its length.
    check(unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let n = CString::new(name).expect("no NUL");
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) })
}

fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let n = CString::new(name).expect("no NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer writable for its length.
    let r = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

fn set_umask() {
    // SAFETY: umask cannot fail; every test sets the same value.
    unsafe { libc::umask(0o022) };
}

fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "diff_kernel tests need root");
    set_umask();
}

// ---------------------------------------------------------------------------
// Mounts

/// A mounted overlay; unmounted on drop (also while unwinding from a panic).
struct Mount {
    target: PathBuf,
    active: bool,
}

impl Mount {
    fn overlay(target: &Path, opts: &str, read_only: bool) -> Mount {
        let flags = if read_only { libc::MS_RDONLY } else { 0 };
        let data = CString::new(opts).expect("no NUL");
        // SAFETY: valid C strings; `data` is the overlay option string.
        let r = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                c(target).as_ptr(),
                c"overlay".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if let Err(e) = check(r) {
            panic!("mount -t overlay -o {opts} {}: {e}", target.display());
        }
        Mount {
            target: target.to_path_buf(),
            active: true,
        }
    }

    fn unmount(mut self) {
        let r = umount_retrying(&self.target);
        r.unwrap_or_else(|e| panic!("umount {}: {e}", self.target.display()));
        self.active = false;
    }
}

/// umount(2), retried for 2 s on `EBUSY`: a process that another test thread
/// is starting holds a copy of our open files (directory fds of a snapshot
/// in progress) between its fork and its exec.
fn umount_retrying(target: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: valid C string.
        match check(unsafe { libc::umount2(c(target).as_ptr(), 0) }) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.active {
            let t = c(&self.target);
            // SAFETY: valid C string.
            if unsafe { libc::umount2(t.as_ptr(), 0) } < 0 {
                // SAFETY: valid C string; a lazy unmount as the last resort.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The layerfs binary and its mounts

/// Runs a command to completion (stdin closed, output captured); panics if
/// it takes longer than `limit`, after killing it.
fn run_timeout(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    // The daemon of `layerfs mount` detaches from our pipes; a reader still
    // blocked after 10 s means something kept them open.
    let get = |rx: mpsc::Receiver<Vec<u8>>, what: &str| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{cmd:?} exited but its {what} stayed open"))
    };
    Output {
        status,
        stdout: get(out, "stdout"),
        stderr: get(err, "stderr"),
    }
}

/// The file system type mounted at `target` (`None` if nothing is).
fn mount_fstype(target: &Path) -> Option<String> {
    let canon = fs::canonicalize(target).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines().rev().find_map(|l| {
        let mut halves = l.split(" - ");
        let left: Vec<&str> = halves.next()?.split(' ').collect();
        (left.get(4).copied() == canon.to_str()).then(|| {
            let right = halves.next().unwrap_or("");
            right.split(' ').next().unwrap_or("").to_string()
        })
    })
}

/// Pids of the processes (other than us) that have `arg` among their argv.
fn pids_with_arg(arg: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|d| d.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|a| a == arg))
        })
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    // `/proc/PID` of a zombie stays until reaped; the daemon is reaped by init.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// A layerfs mount made with `layerfs mount`; unmounted on drop (also while
/// unwinding), its daemon killed if it has not exited 5 s later.
struct LayerfsMount {
    target: PathBuf,
    daemons: Vec<i32>,
    active: bool,
}

impl LayerfsMount {
    /// `layerfs mount --lower L.. [--upper U --work W] [-o OPTS] TARGET`.
    fn new(
        lowers: &[PathBuf],
        rw: Option<(&Path, &Path)>,
        opts: &str,
        target: &Path,
    ) -> Result<LayerfsMount, String> {
        let mut cmd = Command::new(bin());
        cmd.arg("mount");
        for l in lowers {
            cmd.arg("--lower").arg(l);
        }
        if let Some((upper, work)) = rw {
            cmd.arg("--upper").arg(upper).arg("--work").arg(work);
        }
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        cmd.arg(target);
        Self::run(cmd, target)
    }

    /// Runs a mount command `cmd` that mounts layerfs at `target`.
    fn run(mut cmd: Command, target: &Path) -> Result<LayerfsMount, String> {
        let out = run_timeout(&mut cmd, Duration::from_secs(30));
        let fstype = mount_fstype(target);
        let m = LayerfsMount {
            target: target.to_path_buf(),
            daemons: pids_with_arg(target.as_os_str().as_bytes()),
            active: fstype.is_some(),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("{cmd:?} failed ({}): {stderr}", out.status));
        }
        if fstype.as_deref() != Some("fuse.layerfs") {
            return Err(format!("{cmd:?} exited 0 but mounted {fstype:?}: {stderr}"));
        }
        Ok(m)
    }

    fn unmount(mut self) -> Result<(), String> {
        self.active = false;
        umount_retrying(&self.target)
            .map_err(|e| format!("umount {}: {e}", self.target.display()))?;
        self.wait_daemons()
    }

    /// Waits 5 s for the daemons to exit after the unmount, then kills them.
    fn wait_daemons(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: Vec<i32> = self
                .daemons
                .iter()
                .copied()
                .filter(|&p| pid_alive(p))
                .collect();
            if alive.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                for &p in &alive {
                    // SAFETY: kill(2) of a daemon this test started.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                return Err(format!(
                    "layerfs daemon {alive:?} of {} still running 5 s after the unmount",
                    self.target.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LayerfsMount {
    fn drop(&mut self) {
        if self.active {
            let t = c(&self.target);
            // SAFETY: valid C string.
            if unsafe { libc::umount2(t.as_ptr(), 0) } < 0 {
                // SAFETY: valid C string; a lazy unmount as the last resort.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
            if let Err(e) = self.wait_daemons() {
                eprintln!("{e}");
            }
        }
    }
}

/// Lower dirs `l1..ln` (l1 topmost), an upper, a work dir and a mount point
/// for the kernel, and the same three for layerfs.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    lfs_upper: PathBuf,
    lfs_work: PathBuf,
    lfs_mnt: PathBuf,
}

impl Fixture {
    fn new(nlowers: usize) -> Fixture {
        let mut dir = tempfile::tempdir().expect("tempdir");
        // DIFF_KEEP=1 keeps the layers for inspection after a failure.
        dir.disable_cleanup(std::env::var_os("DIFF_KEEP").is_some());
        let root = dir.path().to_path_buf();
        let lowers: Vec<PathBuf> = (1..=nlowers).map(|i| root.join(format!("l{i}"))).collect();
        let (upper, work, mnt) = (root.join("u"), root.join("w"), root.join("m"));
        let (lfs_upper, lfs_work, lfs_mnt) = (root.join("lu"), root.join("lw"), root.join("lm"));
        for d in lowers
            .iter()
            .chain([&upper, &work, &mnt, &lfs_upper, &lfs_work, &lfs_mnt])
        {
            fs::create_dir(d).expect("mkdir");
        }
        Fixture {
            _dir: dir,
            root,
            lowers,
            upper,
            work,
            mnt,
            lfs_upper,
            lfs_work,
            lfs_mnt,
        }
    }

    /// A layerfs mount of the lowers with the layerfs upper, at `lfs_mnt`.
    fn mount_layerfs(&self, opts: &str) -> Result<LayerfsMount, String> {
        let rw = Some((self.lfs_upper.as_path(), self.lfs_work.as_path()));
        LayerfsMount::new(&self.lowers, rw, opts, &self.lfs_mnt)
    }

    fn lowerdir(&self) -> String {
        let v: Vec<String> = self
            .lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect();
        v.join(":")
    }

    fn mount_rw(&self, extra: &str) -> Mount {
        let mut opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lowerdir(),
            self.upper.display(),
            self.work.display()
        );
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        Mount::overlay(&self.mnt, &opts, false)
    }

    /// Runs the operations `next` gives (it sees the mount point) in a
    /// container whose upper is `lowers[0]`, over the lowers below it, on the
    /// kernel (with `redirect_dir=on`) or on layerfs; errors are returned
    /// only when `strict`.
    fn commit(
        &self,
        mut next: impl FnMut(&Path) -> Option<Op>,
        strict: bool,
        engine: Engine,
    ) -> Result<Vec<Op>, String> {
        let below: Vec<String> = self.lowers[1..]
            .iter()
            .map(|l| l.display().to_string())
            .collect();
        let work = self.root.join("w0");
        fs::create_dir(&work).expect("mkdir");
        enum Either {
            K(Mount),
            L(LayerfsMount),
        }
        let m = match engine {
            Engine::Kernel => Either::K(Mount::overlay(
                &self.mnt,
                &format!(
                    "lowerdir={},upperdir={},workdir={},redirect_dir=on",
                    below.join(":"),
                    self.lowers[0].display(),
                    work.display()
                ),
                false,
            )),
            Engine::Layerfs => Either::L(LayerfsMount::new(
                &self.lowers[1..],
                Some((&self.lowers[0], &work)),
                "",
                &self.mnt,
            )?),
        };
        let mut ops = Vec::new();
        while let Some(op) = next(&self.mnt) {
            if let Err(e) = apply(&self.mnt, &op)
                && strict
            {
                return Err(format!("commit {op:?}: {e}"));
            }
            ops.push(op);
        }
        match m {
            Either::K(m) => m.unmount(),
            Either::L(m) => m.unmount()?,
        }
        Ok(ops)
    }

    fn diff(&self, upper: &Path, private: Private) -> Vec<Vec<u8>> {
        let opts = DiffOptions { private };
        let changes =
            diff::diff(upper, &self.lowers, &opts).unwrap_or_else(|e| panic!("diff failed: {e}"));
        let lines: Vec<Vec<u8>> = changes
            .iter()
            .map(|ch| [&[ch.kind.letter() as u8, b' '][..], &ch.path].concat())
            .collect();
        let paths: Vec<&[u8]> = changes.iter().map(|ch| &ch.path[..]).collect();
        assert!(
            paths.windows(2).all(|w| w[0] < w[1]),
            "not sorted/unique: {}",
            show(&lines)
        );
        lines
    }
}

fn at(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn show(lines: &[Vec<u8>]) -> String {
    let v: Vec<String> = lines.iter().map(|l| l.escape_ascii().to_string()).collect();
    format!("[{}]", v.join(", "))
}

// ---------------------------------------------------------------------------
// The layer DSL

/// One object of a layer built by hand. Paths are relative, parents implicit.
#[derive(Clone, Copy, Debug)]
enum E {
    /// Regular file (0644) with content.
    F(B, B),
    /// Directory (0755).
    D(B),
    /// Symlink: path, target.
    S(B, B),
    /// Hard link: new path, existing path.
    H(B, B),
    /// Fifo.
    P(B),
    /// Character device: path, major, minor.
    Chr(B, u32, u32),
    /// Kernel whiteout (char 0/0).
    Wh(B),
    /// `trusted.overlay.opaque=y` on a directory.
    Opq(B),
    /// An xattr: path, name, value.
    X(B, &'static str, B),
    Mode(B, u32),
    Own(B, u32, u32),
    /// mtime, applied after every object got `FIXED`.
    Time(B, i64, i64),
}

fn make_parent(p: &Path) -> io::Result<()> {
    fs::create_dir_all(p.parent().expect("has a parent"))
}

fn create(root: &Path, e: &E) -> io::Result<()> {
    match *e {
        E::F(p, data) => {
            make_parent(&at(root, p))?;
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            open_nofollow(&at(root, p), &mut opts)?.write_all(data)
        }
        E::D(p) => fs::create_dir_all(at(root, p)),
        E::S(p, target) => {
            make_parent(&at(root, p))?;
            std::os::unix::fs::symlink(OsStr::from_bytes(target), at(root, p))
        }
        E::H(p, existing) => {
            make_parent(&at(root, p))?;
            fs::hard_link(at(root, existing), at(root, p))
        }
        E::P(p) => {
            make_parent(&at(root, p))?;
            mknod(&at(root, p), libc::S_IFIFO | 0o644, 0, 0)
        }
        E::Chr(p, major, minor) => {
            make_parent(&at(root, p))?;
            mknod(&at(root, p), libc::S_IFCHR | 0o644, major, minor)
        }
        E::Wh(p) => {
            make_parent(&at(root, p))?;
            mknod(&at(root, p), libc::S_IFCHR, 0, 0)
        }
        E::Opq(p) => lsetxattr(&at(root, p), "trusted.overlay.opaque", b"y"),
        E::X(p, name, value) => lsetxattr(&at(root, p), name, value),
        E::Mode(p, mode) => {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(at(root, p), fs::Permissions::from_mode(mode))
        }
        E::Own(p, uid, gid) => lchown(&at(root, p), uid, gid),
        E::Time(..) => Ok(()),
    }
}

/// Sets `FIXED` on every object below `dir` (children before parents).
fn fix_times(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fix_times(&entry.path())?;
        }
        lutimes(&entry.path(), FIXED)?;
    }
    lutimes(dir, FIXED)
}

/// Builds a layer; `strict` fails on any error (table cases), otherwise
/// impossible entries (random trees) are skipped.
fn build(root: &Path, spec: &[E], strict: bool) {
    fs::create_dir_all(root).expect("layer root");
    for e in spec {
        if let Err(err) = create(root, e)
            && strict
        {
            panic!("building {e:?} in {}: {err}", root.display());
        }
    }
    fix_times(root).expect("fix times");
    for e in spec {
        if let E::Time(p, sec, nsec) = *e
            && let Err(err) = lutimes(&at(root, p), (sec, nsec))
            && strict
        {
            panic!("setting mtime of {p:?}: {err}");
        }
    }
}

// ---------------------------------------------------------------------------
// Container operations, performed through the mount

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create or truncate, then write.
    Write(B, B),
    Append(B, B),
    Truncate(B, u64),
    Chmod(B, u32),
    Chown(B, u32, u32),
    Touch(B, i64, i64),
    SetX(B, &'static str, B),
    RmX(B, &'static str),
    Rm(B),
    Rmdir(B),
    RmRf(B),
    Mkdir(B),
    MkdirP(B),
    Mv(B, B),
    Link(B, B),
    /// Symlink: target, path.
    Symlink(B, B),
    Mkfifo(B),
    Mknod(B, u32, u32),
    /// Open for writing and close without writing.
    OpenWrite(B),
    /// mv(1): a rename, or on `EXDEV` a copy keeping attributes, then a delete.
    MvCmd(B, B),
}

/// Opens without following a final symlink, and without blocking on a fifo.
fn open_nofollow(p: &Path, opts: &mut fs::OpenOptions) -> io::Result<fs::File> {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
}

fn apply(mnt: &Path, op: &Op) -> io::Result<()> {
    let p = |rel: B| at(mnt, rel);
    match *op {
        Op::Write(f, data) => open_nofollow(
            &p(f),
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
        )?
        .write_all(data),
        Op::Append(f, data) => {
            open_nofollow(&p(f), fs::OpenOptions::new().append(true))?.write_all(data)
        }
        Op::Truncate(f, len) => {
            open_nofollow(&p(f), fs::OpenOptions::new().write(true))?.set_len(len)
        }
        Op::Chmod(f, mode) => chmod_nofollow(&p(f), mode),
        Op::Chown(f, uid, gid) => lchown(&p(f), uid, gid),
        Op::Touch(f, sec, nsec) => lutimes(&p(f), (sec, nsec)),
        Op::SetX(f, name, value) => lsetxattr(&p(f), name, value),
        Op::RmX(f, name) => lremovexattr(&p(f), name),
        Op::Rm(f) => fs::remove_file(p(f)),
        Op::Rmdir(f) => fs::remove_dir(p(f)),
        Op::RmRf(f) => fs::remove_dir_all(p(f)),
        Op::Mkdir(f) => fs::create_dir(p(f)),
        Op::MkdirP(f) => fs::create_dir_all(p(f)),
        Op::Mv(a, b) => fs::rename(p(a), p(b)),
        Op::Link(a, b) => fs::hard_link(p(a), p(b)),
        Op::Symlink(target, f) => std::os::unix::fs::symlink(OsStr::from_bytes(target), p(f)),
        Op::Mkfifo(f) => mknod(&p(f), libc::S_IFIFO | 0o644, 0, 0),
        Op::Mknod(f, major, minor) => mknod(&p(f), libc::S_IFCHR | 0o644, major, minor),
        Op::OpenWrite(f) => open_nofollow(&p(f), fs::OpenOptions::new().write(true)).map(drop),
        Op::MvCmd(a, b) => {
            let out = run_timeout(
                Command::new("mv").arg("-T").arg(p(a)).arg(p(b)),
                Duration::from_secs(30),
            );
            match out.status.success() {
                true => Ok(()),
                false => Err(io::Error::other(format!(
                    "mv: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))),
            }
        }
    }
}

/// chmod that never changes a symlink's target.
fn chmod_nofollow(p: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if fs::symlink_metadata(p)?.file_type().is_symlink() {
        return Ok(());
    }
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

// ---------------------------------------------------------------------------
// The table

/// Where a case's operations run.
#[derive(Clone, Copy, Debug)]
enum On {
    /// Through a kernel overlay mount and through a layerfs mount.
    Both,
    /// Kernel only; the reason (a kernel mount option layerfs does not have).
    Kernel(&'static str),
    /// layerfs only; the reason (a lower format the kernel does not read).
    Layerfs(&'static str),
}

/// The two implementations an upper is written by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Kernel,
    Layerfs,
}

/// A scenario: lowers (topmost first), mount options, operations, and the
/// `docker diff` lines expected, worked out by hand.
struct Case {
    name: &'static str,
    lowers: &'static [&'static [E]],
    /// Extra mount options (`redirect_dir=on`, `userxattr`); for layerfs
    /// (only `userxattr` is shared), given as `-o`.
    opts: &'static str,
    on: On,
    ops: &'static [Op],
    /// Operations of an earlier container, committed: run with `lowers[0]` as
    /// the upper over the other lowers (`redirect_dir=on`), so the top lower
    /// holds what the kernel writes (whiteouts, opaque dirs, redirects).
    commit: &'static [Op],
    /// Who runs `commit`: the kernel, or layerfs (the top lower then holds
    /// what layerfs writes).
    commit_on: Engine,
    /// Instead of mounting: an upper built by hand (formats the kernel does not write).
    upper: Option<&'static [E]>,
    /// Paths that must exist in the upper afterwards (proves a copy-up happened).
    copied: &'static [B],
    expect: &'static [B],
}

const CASE: Case = Case {
    name: "",
    lowers: &[],
    opts: "",
    on: On::Both,
    ops: &[],
    commit: &[],
    commit_on: Engine::Kernel,
    upper: None,
    copied: &[],
    expect: &[],
};

const RICH: &[E] = &[
    E::F(b"etc/passwd", b"root:x:0:0\n"),
    E::S(b"etc/localtime", b"/usr/share/zoneinfo/UTC"),
    E::F(b"bin/tool", b"#!/bin/sh\n"),
    E::Mode(b"bin/tool", 0o755),
    E::H(b"bin/tool-link", b"bin/tool"),
    E::P(b"run/fifo"),
    E::Chr(b"dev/null", 1, 3),
    E::D(b"tmp"),
    E::Mode(b"tmp", 0o1777),
    E::F(b"home/u/.profile", b"x"),
    E::Own(b"home/u", 1000, 1000),
    E::Own(b"home/u/.profile", 1000, 1000),
];

const FILE: &[E] = &[E::F(b"f", b"data"), E::D(b"d"), E::F(b"d/x", b"x")];

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "seeds",
            lowers: &[
                &[E::F(b"app.py", b"hello world!\n"), E::D(b"tmp")],
                &[E::F(b"usr/lib/x/file", b"lib")],
            ],
            ops: &[
                Op::Write(b"app.py", b"hello beautiful world!\n"),
                Op::Write(b"tmp/cache", b"cached"),
                Op::Rm(b"usr/lib/x/file"),
            ],
            expect: &[
                b"C /app.py",
                b"C /tmp",
                b"A /tmp/cache",
                b"C /usr",
                b"C /usr/lib",
                b"C /usr/lib/x",
                b"D /usr/lib/x/file",
            ],
            ..CASE
        },
        Case {
            name: "no_changes_over_a_rich_lower",
            lowers: &[RICH],
            ..CASE
        },
        Case {
            name: "append",
            lowers: &[&[E::F(b"etc/conf", b"a=1\n")]],
            ops: &[Op::Append(b"etc/conf", b"b=2\n")],
            expect: &[b"C /etc", b"C /etc/conf"],
            ..CASE
        },
        Case {
            name: "truncate",
            lowers: &[&[E::F(b"data/f", b"hello")]],
            ops: &[Op::Truncate(b"data/f", 2)],
            expect: &[b"C /data", b"C /data/f"],
            ..CASE
        },
        Case {
            name: "rewrite_same_size_changes_mtime",
            lowers: &[FILE],
            ops: &[Op::Write(b"f", b"DATA")],
            expect: &[b"C /f"],
            ..CASE
        },
        Case {
            name: "chmod",
            lowers: &[RICH],
            ops: &[Op::Chmod(b"bin/tool", 0o700)],
            expect: &[b"C /bin", b"C /bin/tool"],
            ..CASE
        },
        Case {
            name: "chmod_to_same_mode_is_no_change",
            lowers: &[FILE],
            ops: &[Op::Chmod(b"f", 0o644)],
            copied: &[b"f"],
            ..CASE
        },
        Case {
            name: "setuid_bit",
            lowers: &[RICH],
            ops: &[Op::Chmod(b"bin/tool", 0o4755)],
            expect: &[b"C /bin", b"C /bin/tool"],
            ..CASE
        },
        Case {
            name: "sticky_bit_removed_from_dir",
            lowers: &[RICH],
            ops: &[Op::Chmod(b"tmp", 0o777)],
            expect: &[b"C /tmp"],
            ..CASE
        },
        Case {
            name: "chown",
            lowers: &[FILE],
            ops: &[Op::Chown(b"f", 1000, 1000)],
            expect: &[b"C /f"],
            ..CASE
        },
        Case {
            name: "chown_group_only",
            lowers: &[RICH],
            ops: &[Op::Chown(b"home/u/.profile", 1000, 0)],
            expect: &[b"C /home", b"C /home/u", b"C /home/u/.profile"],
            ..CASE
        },
        Case {
            name: "chown_to_same_owner_is_no_change",
            lowers: &[RICH],
            ops: &[Op::Chown(b"home/u/.profile", 1000, 1000)],
            copied: &[b"home/u/.profile"],
            ..CASE
        },
        Case {
            name: "touch_other_time",
            lowers: &[FILE],
            ops: &[Op::Touch(b"f", 1_700_000_000, 5)],
            expect: &[b"C /f"],
            ..CASE
        },
        Case {
            name: "touch_same_second_without_ns_is_same_time",
            lowers: &[FILE],
            ops: &[Op::Touch(b"f", FIXED.0, 0)],
            copied: &[b"f"],
            ..CASE
        },
        Case {
            name: "touch_same_second_other_ns_differs",
            lowers: &[FILE],
            ops: &[Op::Touch(b"f", FIXED.0, 5)],
            expect: &[b"C /f"],
            ..CASE
        },
        Case {
            name: "dir_mtime_is_ignored",
            lowers: &[FILE],
            ops: &[Op::Touch(b"d", 1_700_000_000, 0)],
            copied: &[b"d"],
            ..CASE
        },
        Case {
            name: "set_capability",
            lowers: &[&[
                E::F(b"usr/bin/ping", b"elf"),
                E::Mode(b"usr/bin/ping", 0o755),
            ]],
            ops: &[Op::SetX(
                b"usr/bin/ping",
                "security.capability",
                CAP_NET_RAW,
            )],
            expect: &[b"C /usr", b"C /usr/bin", b"C /usr/bin/ping"],
            ..CASE
        },
        Case {
            name: "capability_kept_by_copy_up",
            lowers: &[&[
                E::F(b"ping", b"elf"),
                E::Mode(b"ping", 0o755),
                E::X(b"ping", "security.capability", CAP_NET_RAW),
            ]],
            ops: &[Op::Chmod(b"ping", 0o755)],
            copied: &[b"ping"],
            ..CASE
        },
        Case {
            name: "capability_removed_only",
            lowers: &[&[
                E::F(b"ping", b"elf"),
                E::X(b"ping", "security.capability", CAP_NET_RAW),
            ]],
            ops: &[Op::RmX(b"ping", "security.capability")],
            expect: &[b"C /ping"],
            ..CASE
        },
        Case {
            name: "other_xattrs_are_ignored",
            lowers: &[FILE],
            ops: &[
                Op::SetX(b"f", "user.note", b"hi"),
                Op::SetX(b"d", "user.x", b"1"),
            ],
            copied: &[b"f", b"d"],
            ..CASE
        },
        Case {
            name: "open_for_write_without_writing",
            lowers: &[RICH],
            ops: &[Op::OpenWrite(b"etc/passwd")],
            copied: &[b"etc/passwd"],
            ..CASE
        },
        Case {
            name: "rm_nested_file",
            lowers: &[&[E::F(b"a/b/c", b"x"), E::F(b"a/b/d", b"y")]],
            ops: &[Op::Rm(b"a/b/c")],
            expect: &[b"C /a", b"C /a/b", b"D /a/b/c"],
            ..CASE
        },
        Case {
            name: "rm_rf_whole_tree_is_one_delete",
            lowers: &[
                &[E::F(b"t/a", b"1"), E::F(b"t/deep/er/f", b"2")],
                &[E::F(b"t/b", b"3"), E::F(b"t/c/d", b"4")],
            ],
            ops: &[Op::RmRf(b"t")],
            expect: &[b"D /t"],
            ..CASE
        },
        Case {
            name: "rmdir_empty_lower_dir",
            lowers: &[&[E::D(b"e"), E::D(b"keep")]],
            ops: &[Op::Rmdir(b"e")],
            expect: &[b"D /e"],
            ..CASE
        },
        Case {
            name: "rm_rf_then_mkdir_is_opaque",
            lowers: &[
                &[E::F(b"d/x", b"x")],
                &[E::F(b"d/y", b"y"), E::F(b"d/sub/z", b"z")],
            ],
            ops: &[
                Op::RmRf(b"d"),
                Op::Mkdir(b"d"),
                Op::Write(b"d/new", b"n"),
                Op::Write(b"d/y", b"re-created"),
            ],
            expect: &[b"C /d", b"A /d/new", b"D /d/sub", b"D /d/x", b"C /d/y"],
            ..CASE
        },
        Case {
            name: "rm_rf_then_mkdir_empty",
            lowers: &[FILE],
            ops: &[Op::RmRf(b"d"), Op::Mkdir(b"d")],
            expect: &[b"C /d", b"D /d/x"],
            ..CASE
        },
        Case {
            name: "rm_rf_then_mkdir_other_mode",
            lowers: &[&[E::D(b"d")]],
            ops: &[Op::RmRf(b"d"), Op::Mkdir(b"d"), Op::Chmod(b"d", 0o700)],
            expect: &[b"C /d"],
            ..CASE
        },
        Case {
            name: "mv_file_across_dirs",
            lowers: &[&[E::F(b"a/f", b"x"), E::D(b"b")]],
            ops: &[Op::Mv(b"a/f", b"b/g")],
            expect: &[b"C /a", b"D /a/f", b"C /b", b"A /b/g"],
            ..CASE
        },
        Case {
            name: "mv_over_lower_file",
            lowers: &[&[E::F(b"a", b"aaa"), E::F(b"b", b"b")]],
            ops: &[Op::Mv(b"a", b"b")],
            expect: &[b"D /a", b"C /b"],
            ..CASE
        },
        Case {
            name: "hard_link_to_lower_file",
            lowers: &[&[E::F(b"d/f", b"x"), E::D(b"e")]],
            ops: &[Op::Link(b"d/f", b"e/h")],
            copied: &[b"d/f"],
            expect: &[b"C /e", b"A /e/h"],
            ..CASE
        },
        Case {
            name: "write_through_one_name_of_a_lower_hard_link",
            lowers: &[RICH],
            ops: &[Op::Append(b"bin/tool-link", b"echo\n")],
            expect: &[b"C /bin", b"C /bin/tool-link"],
            ..CASE
        },
        Case {
            name: "mkfifo_and_mknod",
            lowers: &[RICH],
            ops: &[Op::Mkfifo(b"run/new-fifo"), Op::Mknod(b"dev/zero", 1, 5)],
            expect: &[b"C /dev", b"A /dev/zero", b"C /run", b"A /run/new-fifo"],
            ..CASE
        },
        Case {
            name: "device_rdev_changed",
            lowers: &[RICH],
            ops: &[
                Op::Rm(b"dev/null"),
                Op::Mknod(b"dev/null", 1, 7),
                Op::Touch(b"dev/null", FIXED.0, FIXED.1),
            ],
            expect: &[b"C /dev", b"C /dev/null"],
            ..CASE
        },
        Case {
            name: "fifo_replaced_by_file",
            lowers: &[RICH],
            ops: &[Op::Rm(b"run/fifo"), Op::Write(b"run/fifo", b"")],
            expect: &[b"C /run", b"C /run/fifo"],
            ..CASE
        },
        Case {
            name: "symlink_target_is_not_compared",
            lowers: &[&[E::S(b"link", b"a")]],
            ops: &[
                Op::Rm(b"link"),
                Op::Symlink(b"b", b"link"),
                Op::Touch(b"link", FIXED.0, FIXED.1),
            ],
            ..CASE
        },
        Case {
            name: "symlink_size_is_compared",
            lowers: &[&[E::S(b"link", b"a")]],
            ops: &[
                Op::Rm(b"link"),
                Op::Symlink(b"longer", b"link"),
                Op::Touch(b"link", FIXED.0, FIXED.1),
            ],
            expect: &[b"C /link"],
            ..CASE
        },
        Case {
            name: "replace_dir_with_file",
            lowers: &[FILE],
            ops: &[Op::RmRf(b"d"), Op::Write(b"d", b"now a file")],
            expect: &[b"C /d"],
            ..CASE
        },
        Case {
            name: "replace_file_with_dir",
            lowers: &[FILE],
            ops: &[
                Op::Rm(b"f"),
                Op::Mkdir(b"f"),
                Op::Write(b"f/a", b"a"),
                Op::Mkdir(b"f/b"),
                Op::Write(b"f/b/c", b"c"),
            ],
            expect: &[b"C /f", b"A /f/a", b"A /f/b", b"A /f/b/c"],
            ..CASE
        },
        Case {
            name: "create_then_delete",
            lowers: &[RICH],
            ops: &[
                Op::Write(b"tmp/x", b"x"),
                Op::Rm(b"tmp/x"),
                Op::MkdirP(b"tmp/y/z"),
                Op::RmRf(b"tmp/y"),
            ],
            copied: &[b"tmp"],
            ..CASE
        },
        Case {
            name: "odd_names",
            lowers: &[&[E::F(b"old\xffname", b"x"), E::D(b"sp ace")]],
            ops: &[
                Op::Write(b"a b", b"1"),
                Op::Write(b"new\nline", b"2"),
                Op::Write(b"\xff\xfe", b"3"),
                Op::Mkdir(b"dir with space"),
                Op::Write(b"dir with space/f\tg", b"4"),
                Op::Rm(b"old\xffname"),
                Op::Write(b"sp ace/x y", b"5"),
            ],
            expect: &[
                b"A /a b",
                b"A /dir with space",
                b"A /dir with space/f\tg",
                b"A /new\nline",
                b"D /old\xffname",
                b"C /sp ace",
                b"A /sp ace/x y",
                b"A /\xff\xfe",
            ],
            ..CASE
        },
        Case {
            name: "deep_new_dirs",
            lowers: &[RICH],
            ops: &[Op::MkdirP(b"p/q/r/s/t"), Op::Write(b"p/q/r/s/t/f", b"deep")],
            expect: &[
                b"A /p",
                b"A /p/q",
                b"A /p/q/r",
                b"A /p/q/r/s",
                b"A /p/q/r/s/t",
                b"A /p/q/r/s/t/f",
            ],
            ..CASE
        },
        Case {
            name: "new_dirs_below_lower_dirs",
            lowers: &[&[E::D(b"usr/share")]],
            ops: &[Op::MkdirP(b"usr/share/app/data")],
            expect: &[
                b"C /usr",
                b"C /usr/share",
                b"A /usr/share/app",
                b"A /usr/share/app/data",
            ],
            ..CASE
        },
        Case {
            name: "symlinks_created_pointing_out",
            lowers: &[RICH],
            ops: &[
                Op::Symlink(b"/etc", b"escape"),
                Op::Symlink(b"/", b"home/u/root"),
            ],
            expect: &[b"A /escape", b"C /home", b"C /home/u", b"A /home/u/root"],
            ..CASE
        },
        Case {
            name: "hostile_symlinks_in_lower_are_not_followed",
            lowers: &[&[E::S(b"etc", b"/etc"), E::S(b"up", b"../../../..")]],
            ops: &[
                Op::Rm(b"etc"),
                Op::Mkdir(b"etc"),
                Op::Write(b"etc/passwd", b"x"),
            ],
            expect: &[b"C /etc", b"A /etc/passwd"],
            ..CASE
        },
        Case {
            name: "multi_lower_shadowing_and_lower_whiteout",
            lowers: &[
                &[E::F(b"etc/f", b"new"), E::Wh(b"etc/h")],
                &[
                    E::F(b"etc/f", b"old"),
                    E::F(b"etc/g", b"g"),
                    E::F(b"etc/h", b"h"),
                ],
            ],
            ops: &[Op::Rm(b"etc/f"), Op::Write(b"etc/h", b"again")],
            expect: &[b"C /etc", b"D /etc/f", b"A /etc/h"],
            ..CASE
        },
        Case {
            name: "opaque_dir_in_lower",
            lowers: &[
                &[E::F(b"d/a", b"a"), E::Opq(b"d")],
                &[E::F(b"d/b", b"b"), E::F(b"d/c", b"c")],
            ],
            ops: &[Op::Rm(b"d/a"), Op::Write(b"d/b", b"x")],
            expect: &[b"C /d", b"D /d/a", b"A /d/b"],
            ..CASE
        },
        Case {
            name: "renamed_dir_redirect",
            lowers: &[&[E::F(b"a/f", b"f"), E::F(b"a/sub/g", b"g"), E::F(b"z", b"z")]],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"a", b"a2")],
            expect: &[b"D /a", b"A /a2", b"A /a2/f", b"A /a2/sub", b"A /a2/sub/g"],
            ..CASE
        },
        Case {
            name: "renamed_dir_absolute_redirect",
            lowers: &[&[E::F(b"x/b/f", b"f"), E::D(b"y")]],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"x/b", b"y/b2")],
            expect: &[b"C /x", b"D /x/b", b"C /y", b"A /y/b2", b"A /y/b2/f"],
            ..CASE
        },
        Case {
            name: "renamed_dir_then_modified",
            lowers: &[&[E::F(b"a/f", b"f"), E::F(b"a/sub/g", b"g")]],
            opts: "redirect_dir=on",
            ops: &[
                Op::Mv(b"a", b"a2"),
                Op::Rm(b"a2/f"),
                Op::Write(b"a2/new", b"n"),
            ],
            expect: &[
                b"D /a",
                b"A /a2",
                b"A /a2/new",
                b"A /a2/sub",
                b"A /a2/sub/g",
            ],
            ..CASE
        },
        Case {
            name: "renamed_dir_twice_and_into_new_dir",
            lowers: &[&[E::F(b"a/f", b"f"), E::F(b"b/g", b"g")]],
            opts: "redirect_dir=on",
            ops: &[
                Op::Mv(b"a", b"a2"),
                Op::Mv(b"a2", b"a3"),
                Op::Mkdir(b"n"),
                Op::Mv(b"b", b"n/b"),
            ],
            expect: &[
                b"D /a",
                b"A /a3",
                b"A /a3/f",
                b"D /b",
                b"A /n",
                b"A /n/b",
                b"A /n/b/g",
            ],
            ..CASE
        },
        Case {
            name: "renamed_dir_over_empty_lower_dir",
            lowers: &[&[E::F(b"a/f", b"f"), E::D(b"e")]],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"a", b"e")],
            expect: &[b"D /a", b"C /e", b"A /e/f"],
            ..CASE
        },
        Case {
            name: "renamed_subdir_of_renamed_dir",
            lowers: &[&[E::F(b"a/b/f", b"f"), E::F(b"a/c", b"c"), E::D(b"x")]],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"a", b"a2"), Op::Mv(b"a2/b", b"x/b2")],
            expect: &[
                b"D /a",
                b"A /a2",
                b"A /a2/c",
                b"C /x",
                b"A /x/b2",
                b"A /x/b2/f",
            ],
            ..CASE
        },
        Case {
            name: "userxattr_opaque_dir",
            lowers: &[&[E::F(b"d/x", b"x"), E::F(b"e", b"e")]],
            opts: "userxattr",
            ops: &[Op::RmRf(b"d"), Op::Mkdir(b"d"), Op::Rm(b"e")],
            expect: &[b"C /d", b"D /d/x", b"D /e"],
            ..CASE
        },
        Case {
            name: "metacopy_chmod_and_rename",
            lowers: &[&[E::F(b"f", b"data"), E::F(b"h", b"data")]],
            opts: "metacopy=on,redirect_dir=on",
            on: On::Kernel(
                "metacopy=on is a kernel option (metadata-only copy-up); layerfs always \
                 copies data, and the rename of a metacopy file needs redirect_dir=on",
            ),
            ops: &[
                Op::Chmod(b"f", 0o600),
                Op::Mv(b"f", b"g"),
                Op::Chmod(b"h", 0o600),
            ],
            expect: &[b"D /f", b"A /g", b"C /h"],
            ..CASE
        },
        Case {
            name: "committed_lower_with_redirect",
            lowers: &[&[], &[E::F(b"a/f", b"f"), E::F(b"a/g", b"g")]],
            commit: &[Op::Mv(b"a", b"a2"), Op::Rm(b"a2/g")],
            ops: &[Op::Write(b"a2/new", b"n")],
            expect: &[b"C /a2", b"A /a2/new"],
            ..CASE
        },
        Case {
            name: "committed_redirect_renamed_again",
            lowers: &[&[], &[E::F(b"a/b/f", b"f"), E::D(b"x")]],
            commit: &[Op::Mv(b"a/b", b"x/b2")],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"x/b2", b"b3"), Op::Rm(b"b3/f")],
            expect: &[b"A /b3", b"C /x", b"D /x/b2"],
            ..CASE
        },
        Case {
            name: "absolute_redirect_through_a_redirected_lower_dir",
            lowers: &[&[], &[E::F(b"a/b/f", b"f"), E::D(b"x")]],
            commit: &[Op::Mv(b"a", b"a2")],
            opts: "redirect_dir=on",
            ops: &[Op::Mv(b"a2/b", b"x/b2")],
            expect: &[b"C /a2", b"D /a2/b", b"C /x", b"A /x/b2", b"A /x/b2/f"],
            ..CASE
        },
        Case {
            name: "committed_opaque_dir_and_whiteout",
            lowers: &[&[], &[E::F(b"d/x", b"x"), E::F(b"e", b"e")]],
            commit: &[
                Op::RmRf(b"d"),
                Op::Mkdir(b"d"),
                Op::Write(b"d/y", b"y"),
                Op::Rm(b"e"),
            ],
            ops: &[Op::Write(b"e", b"back"), Op::Write(b"d/x", b"new x")],
            expect: &[b"C /d", b"A /d/x", b"A /e"],
            ..CASE
        },
        Case {
            name: "mv_dir_with_lower_contents_by_the_mv_command",
            // rename(2) fails with EXDEV on both (no redirect_dir): mv copies.
            lowers: &[&[
                E::F(b"a/f", b"f"),
                E::Own(b"a/f", 1000, 1000),
                E::F(b"a/sub/g", b"g"),
                E::Mode(b"a/sub", 0o700),
                E::D(b"b"),
            ]],
            ops: &[Op::MvCmd(b"a", b"b/a2")],
            expect: &[
                b"D /a",
                b"C /b",
                b"A /b/a2",
                b"A /b/a2/f",
                b"A /b/a2/sub",
                b"A /b/a2/sub/g",
            ],
            ..CASE
        },
        Case {
            name: "rename_new_dir",
            lowers: &[RICH],
            ops: &[
                Op::Mkdir(b"n"),
                Op::Write(b"n/f", b"x"),
                Op::Mv(b"n", b"n2"),
            ],
            expect: &[b"A /n2", b"A /n2/f"],
            ..CASE
        },
        Case {
            name: "rename_away_and_back_is_no_change",
            lowers: &[&[E::F(b"d/a", b"x"), E::F(b"d/z", b"z")]],
            ops: &[Op::Mv(b"d/a", b"d/b"), Op::Mv(b"d/b", b"d/a")],
            copied: &[b"d/a"],
            ..CASE
        },
        Case {
            name: "replace_symlink_with_dir",
            lowers: &[&[E::S(b"l", b"target")]],
            ops: &[Op::Rm(b"l"), Op::Mkdir(b"l"), Op::Write(b"l/f", b"x")],
            expect: &[b"C /l", b"A /l/f"],
            ..CASE
        },
        Case {
            name: "replace_dir_with_symlink",
            lowers: &[FILE],
            ops: &[Op::RmRf(b"d"), Op::Symlink(b"x", b"d")],
            expect: &[b"C /d"],
            ..CASE
        },
        Case {
            name: "rm_one_name_of_a_lower_hard_link",
            lowers: &[RICH],
            ops: &[Op::Rm(b"bin/tool-link")],
            expect: &[b"C /bin", b"D /bin/tool-link"],
            ..CASE
        },
        Case {
            name: "new_hard_links",
            lowers: &[FILE],
            ops: &[
                Op::Write(b"n1", b"x"),
                Op::Link(b"n1", b"n2"),
                Op::Mkdir(b"d2"),
                Op::Link(b"n1", b"d2/n3"),
            ],
            expect: &[b"A /d2", b"A /d2/n3", b"A /n1", b"A /n2"],
            ..CASE
        },
        Case {
            name: "chmod_and_back_is_no_change",
            lowers: &[FILE],
            ops: &[Op::Chmod(b"f", 0o600), Op::Chmod(b"f", 0o644)],
            copied: &[b"f"],
            ..CASE
        },
        Case {
            name: "rm_rf_then_mkdir_p_nested",
            lowers: &[&[E::F(b"a/x", b"x"), E::F(b"a/b/y", b"y")]],
            ops: &[
                Op::RmRf(b"a"),
                Op::MkdirP(b"a/b"),
                Op::Write(b"a/b/y", b"new"),
            ],
            expect: &[b"C /a", b"C /a/b", b"C /a/b/y", b"D /a/x"],
            ..CASE
        },
        Case {
            name: "lchown_symlink",
            lowers: &[RICH],
            ops: &[Op::Chown(b"etc/localtime", 1000, 1000)],
            expect: &[b"C /etc", b"C /etc/localtime"],
            ..CASE
        },
        Case {
            name: "setgid_dir",
            lowers: &[&[E::D(b"shared")]],
            ops: &[Op::Chmod(b"shared", 0o2775)],
            expect: &[b"C /shared"],
            ..CASE
        },
        Case {
            name: "deep_delete_in_bottom_lower",
            lowers: &[
                &[E::F(b"top", b"t")],
                &[E::F(b"a/b/c/d/e/f", b"x"), E::F(b"a/b/c/d/e/g", b"y")],
            ],
            ops: &[Op::Rm(b"a/b/c/d/e/f")],
            expect: &[
                b"C /a",
                b"C /a/b",
                b"C /a/b/c",
                b"C /a/b/c/d",
                b"C /a/b/c/d/e",
                b"D /a/b/c/d/e/f",
            ],
            ..CASE
        },
        Case {
            name: "odd_names_deleted_and_changed",
            lowers: &[&[
                E::F(b"x\ny", b"1"),
                E::F(b"dir\xff/f", b"2"),
                E::F(b"tab\tname", b"3"),
            ]],
            ops: &[
                Op::Rm(b"x\ny"),
                Op::RmRf(b"dir\xff"),
                Op::Write(b"tab\tname", b"33"),
            ],
            expect: &[b"D /dir\xff", b"C /tab\tname", b"D /x\ny"],
            ..CASE
        },
        Case {
            name: "committed_by_layerfs",
            lowers: &[
                &[],
                &[E::F(b"d/x", b"x"), E::F(b"e", b"e"), E::F(b"g", b"g")],
            ],
            commit: &[
                Op::RmRf(b"d"),
                Op::Mkdir(b"d"),
                Op::Write(b"d/y", b"y"),
                Op::Rm(b"e"),
                Op::Write(b"g", b"G"),
            ],
            commit_on: Engine::Layerfs,
            ops: &[
                Op::Write(b"e", b"back"),
                Op::Write(b"d/x", b"new x"),
                Op::Rm(b"g"),
            ],
            expect: &[b"C /d", b"A /d/x", b"A /e", b"D /g"],
            ..CASE
        },
        Case {
            name: "oci_markers_in_lower_through_layerfs",
            on: On::Layerfs(
                "the lowers carry OCI .wh. markers, which layerfs honours and the kernel \
                 shows as plain files",
            ),
            lowers: &[
                &[
                    E::F(b".wh.foo", b""),
                    E::F(b"dir/.wh..wh..opq", b""),
                    E::F(b"dir/keep", b"k"),
                    E::F(b"bar2", b"b"),
                ],
                &[
                    E::F(b"foo", b"f"),
                    E::F(b"dir/hidden", b"h"),
                    E::F(b"bar", b"b"),
                    E::F(b"other/x", b"x"),
                ],
            ],
            ops: &[
                Op::Write(b"foo", b"new"),
                Op::Rm(b"dir/keep"),
                Op::Write(b"dir/hidden", b"h2"),
                Op::Rm(b"bar"),
                Op::Rm(b"other/x"),
            ],
            expect: &[
                b"D /bar",
                b"C /dir",
                b"A /dir/hidden",
                b"D /dir/keep",
                b"A /foo",
                b"C /other",
                b"D /other/x",
            ],
            ..CASE
        },
        Case {
            name: "oci_markers_in_lower_with_hand_built_upper",
            lowers: &[
                &[
                    E::F(b".wh.foo", b""),
                    E::F(b"dir/.wh..wh..opq", b""),
                    E::F(b"dir/keep", b"k"),
                ],
                &[
                    E::F(b"foo", b"f"),
                    E::F(b"dir/hidden", b"h"),
                    E::F(b"bar", b"b"),
                ],
            ],
            upper: Some(&[
                E::F(b"foo", b"new"),
                E::F(b"dir/y", b"y"),
                E::Wh(b"dir/hidden"),
                E::Wh(b"bar"),
                E::Wh(b"ghost"),
            ]),
            expect: &[b"D /bar", b"C /dir", b"A /dir/y", b"A /foo"],
            ..CASE
        },
        Case {
            name: "xattr_whiteouts_with_hand_built_upper",
            lowers: &[
                &[
                    E::F(b"d/f", b""),
                    E::X(b"d/f", "trusted.overlay.whiteout", b""),
                    E::X(b"d", "trusted.overlay.opaque", b"x"),
                ],
                &[E::F(b"d/f", b"f"), E::F(b"d/g", b"g"), E::F(b"e/g", b"g")],
            ],
            upper: Some(&[
                E::F(b"d/f", b"back"),
                E::F(b"e/g", b""),
                E::X(b"e/g", "trusted.overlay.whiteout", b""),
                E::X(b"e", "trusted.overlay.opaque", b"x"),
            ]),
            expect: &[b"C /d", b"A /d/f", b"C /e", b"D /e/g"],
            ..CASE
        },
    ]
}

impl Case {
    fn engines(&self) -> &'static [Engine] {
        match self.on {
            On::Both => &[Engine::Kernel, Engine::Layerfs],
            On::Kernel(_) => &[Engine::Kernel],
            On::Layerfs(_) => &[Engine::Layerfs],
        }
    }

    fn private(&self) -> Private {
        if self.opts.contains("userxattr") {
            Private::USER
        } else {
            Private::TRUSTED
        }
    }

    /// The expected lines, in the order `diff` prints them (by path bytes).
    fn want(&self) -> Vec<Vec<u8>> {
        let mut want: Vec<Vec<u8>> = self.expect.iter().map(|l| l.to_vec()).collect();
        want.sort_by(|a, b| a[2..].cmp(&b[2..]));
        want
    }
}

fn run_case(c: &Case) -> Result<(), String> {
    let fx = Fixture::new(c.lowers.len());
    for (l, spec) in fx.lowers.iter().zip(c.lowers) {
        build(l, spec, true);
    }
    if !c.commit.is_empty() {
        let mut ops = c.commit.iter().copied();
        fx.commit(|_| ops.next(), true, c.commit_on)?;
    }
    if let Some(spec) = c.upper {
        build(&fx.upper, spec, true);
        return check_upper(c, &fx, &fx.upper);
    }
    let failures: Vec<String> = c
        .engines()
        .iter()
        .filter_map(|&e| run_on(c, &fx, e).err().map(|m| format!("[{e:?}] {m}")))
        .collect();
    match failures.is_empty() {
        true => Ok(()),
        false => Err(failures.join("\n")),
    }
}

fn apply_all(mnt: &Path, ops: &[Op]) -> Result<(), String> {
    for op in ops {
        apply(mnt, op).map_err(|e| format!("{op:?}: {e}"))?;
    }
    Ok(())
}

/// Runs the case's operations through one implementation, then checks its upper.
fn run_on(c: &Case, fx: &Fixture, engine: Engine) -> Result<(), String> {
    match engine {
        Engine::Kernel => {
            let m = fx.mount_rw(c.opts);
            apply_all(&fx.mnt, c.ops)?;
            m.unmount();
            check_upper(c, fx, &fx.upper)
        }
        Engine::Layerfs => {
            let m = fx.mount_layerfs(c.opts)?;
            apply_all(&fx.lfs_mnt, c.ops)?;
            check_cli_on_live_mount(c, fx)?;
            m.unmount()?;
            check_upper(c, fx, &fx.lfs_upper)
        }
    }
}

/// `layerfs diff -z MOUNTPOINT` and `layerfs diff -z --upper U --lower L..`
/// on the live layerfs mount both print the expected lines.
fn check_cli_on_live_mount(c: &Case, fx: &Fixture) -> Result<(), String> {
    let want = c.want();
    let by_mount = cli_diff(&[fx.lfs_mnt.as_os_str(), "-z".as_ref()])?;
    if by_mount != want {
        return Err(format!(
            "`layerfs diff -z MOUNTPOINT` on the live mount\ngot  {}\nwant {}",
            show(&by_mount),
            show(&want)
        ));
    }
    let mut args: Vec<&OsStr> = vec!["-z".as_ref(), "--upper".as_ref(), fx.lfs_upper.as_ref()];
    for l in &fx.lowers {
        args.extend([OsStr::new("--lower"), l.as_os_str()]);
    }
    if c.private() == Private::USER {
        args.push("--userxattr".as_ref());
    }
    let by_layers = cli_diff(&args)?;
    if by_layers != want {
        return Err(format!(
            "`layerfs diff -z --upper --lower` on the live mount\ngot  {}\nwant {}",
            show(&by_layers),
            show(&want)
        ));
    }
    Ok(())
}

/// Runs `layerfs diff ARGS` (which must include `-z`) and splits its records.
fn cli_diff(args: &[&OsStr]) -> Result<Vec<Vec<u8>>, String> {
    let out = run_timeout(
        Command::new(bin()).arg("diff").args(args),
        Duration::from_secs(30),
    );
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "layerfs diff {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    nul_records(&out.stdout)
}

/// `-z` output: records each ended by NUL.
fn nul_records(out: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let Some(body) = out.strip_suffix(b"\0") else {
        return match out.is_empty() {
            true => Ok(Vec::new()),
            false => Err(format!(
                "-z output not NUL-terminated: {}",
                out.escape_ascii()
            )),
        };
    };
    Ok(body.split(|&b| b == 0).map(<[u8]>::to_vec).collect())
}

/// The copy-ups the case expects happened, and `diff` of `upper` is the
/// expected lines.
fn check_upper(c: &Case, fx: &Fixture, upper: &Path) -> Result<(), String> {
    for p in c.copied {
        let st = fs::symlink_metadata(at(upper, p))
            .map_err(|e| format!("copied {}: {e}", p.escape_ascii()))?;
        if st.file_type().is_char_device() && st.rdev() == 0 {
            return Err(format!("{} is a whiteout in the upper", p.escape_ascii()));
        }
    }
    let got = fx.diff(upper, c.private());
    let want = c.want();
    if got != want {
        return Err(format!("got  {}\nwant {}", show(&got), show(&want)));
    }
    Ok(())
}

#[test]
fn table_cases_match_docker_rules() {
    require_root();
    let cases = cases();
    assert!(cases.len() >= 30);
    let count = |f: fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    let hand_built = count(|c| c.upper.is_some());
    let on_both = count(|c| c.upper.is_none() && matches!(c.on, On::Both));
    let kernel_only = count(|c| c.upper.is_none() && matches!(c.on, On::Kernel(_)));
    let layerfs_only = count(|c| c.upper.is_none() && matches!(c.on, On::Layerfs(_)));
    eprintln!(
        "{} cases: {on_both} on kernel and layerfs, {kernel_only} kernel only, \
         {layerfs_only} layerfs only, {hand_built} hand-built uppers",
        cases.len()
    );
    for c in &cases {
        if let On::Kernel(why) | On::Layerfs(why) = c.on {
            eprintln!("  {} runs on {:?} only: {why}", c.name, c.engines()[0]);
        }
    }
    assert!(on_both >= 30, "the issue asks for 30 cases run on both");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| run_case(c).err().map(|e| format!("--- {}\n{e}", c.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn output_of_odd_names_in_every_format() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"x", b"x")], true);
    build(
        &fx.upper,
        &[E::F(b"n\nl", b""), E::F(b"q\"\\\xff", b""), E::Wh(b"x")],
        true,
    );
    let changes = diff::diff(&fx.upper, &fx.lowers, &DiffOptions::default()).unwrap();
    let mut out = Vec::new();
    diff::write_changes(&mut out, &changes, diff::Format::Nul).unwrap();
    assert_eq!(out, b"A /n\nl\0A /q\"\\\xff\0D /x\0");
    out.clear();
    diff::write_changes(&mut out, &changes, diff::Format::Json).unwrap();
    let want = concat!(
        r#"{"kind":"A","path":"/n\nl"}"#,
        "\n",
        r#"{"kind":"A","path":"/q\"\\\\\\xff","raw":false}"#,
        "\n",
        r#"{"kind":"D","path":"/x"}"#,
        "\n"
    );
    assert_eq!(String::from_utf8(out).unwrap(), want);
}

#[test]
fn bad_redirect_is_an_error_not_a_diff() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"a/f", b"f")], true);
    build(
        &fx.upper,
        &[
            E::Wh(b"a"),
            E::D(b"a2"),
            E::X(b"a2", "trusted.overlay.redirect", b"../../etc"),
        ],
        true,
    );
    let err = diff::diff(&fx.upper, &fx.lowers, &DiffOptions::default()).unwrap_err();
    assert!(err.context().contains("redirect"), "{err}");
}

// ---------------------------------------------------------------------------
// Randomized: random operations through the kernel vs a naive docker diff

/// xorshift64*: deterministic per seed, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

const NAMES: &[B] = &[b"a", b"b", b"c", b"d e", b"n\nl", b"\xff"];
const TIMES: &[(i64, i64)] = &[FIXED, (FIXED.0, 0), (FIXED.0, 7), (FIXED.0 + 1, FIXED.1)];
const MODES: &[u32] = &[0o644, 0o755, 0o600, 0o4755, 0o1777];

fn leak(v: Vec<u8>) -> B {
    Box::leak(v.into_boxed_slice())
}

fn rand_path(rng: &mut Rng) -> B {
    let depth = 1 + rng.below(3);
    let comps: Vec<B> = (0..depth).map(|_| rng.pick(NAMES)).collect();
    leak(comps.join(&b'/'))
}

/// Relative targets only: even when followed, they stay inside the tree.
fn rand_target(rng: &mut Rng) -> B {
    rng.pick(&[b"a", b"b/c", b"missing", b"d e"])
}

fn rand_layer(rng: &mut Rng, n: usize, with_markers: bool) -> Vec<E> {
    let mut spec = Vec::new();
    for _ in 0..n {
        let p = rand_path(rng);
        let kinds = if with_markers { 9 } else { 7 };
        spec.push(match rng.below(kinds) {
            0 | 1 => E::F(p, rng.pick(&[b"", b"x", b"xyz"])),
            2 | 3 => E::D(p),
            4 => E::S(p, rand_target(rng)),
            5 => E::P(p),
            6 => E::H(p, rand_path(rng)),
            7 => E::Wh(p),
            _ => E::Opq(p),
        });
        match rng.below(6) {
            0 => spec.push(E::Mode(p, rng.pick(MODES))),
            1 => spec.push(E::Own(p, 1000, rng.pick(&[0, 1000]))),
            2 => spec.push(E::X(p, "security.capability", CAP_NET_RAW)),
            3 => {
                let (s, ns) = rng.pick(TIMES);
                spec.push(E::Time(p, s, ns))
            }
            _ => {}
        }
    }
    spec
}

/// The paths currently in the mount (never through a symlink), so that half
/// of the operations hit something that exists.
fn existing(dir: &Path, prefix: &[u8], out: &mut Vec<B>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let rel = [prefix, entry.file_name().as_bytes()].concat();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            existing(&entry.path(), &[&rel[..], b"/"].concat(), out);
        }
        out.push(leak(rel));
    }
}

fn rand_op(rng: &mut Rng, mnt: &Path) -> Op {
    let mut paths = Vec::new();
    existing(mnt, b"", &mut paths);
    let path = |rng: &mut Rng| {
        if !paths.is_empty() && rng.below(2) == 0 {
            rng.pick(&paths)
        } else {
            rand_path(rng)
        }
    };
    let p = path(rng);
    match rng.below(21) {
        0 | 1 => Op::Write(p, rng.pick(&[b"", b"x", b"new data"])),
        2 => Op::Append(p, b"+"),
        3 => Op::Truncate(p, rng.below(3) as u64),
        4 => Op::Chmod(p, rng.pick(MODES)),
        5 => Op::Chown(p, rng.pick(&[0, 1000]), rng.pick(&[0, 1000])),
        6 => {
            let (s, ns) = rng.pick(TIMES);
            Op::Touch(p, s, ns)
        }
        7 => Op::SetX(p, "security.capability", CAP_NET_RAW),
        8 => Op::Rm(p),
        9 => Op::RmRf(p),
        10 | 11 => Op::Mkdir(p),
        12..=14 => Op::Mv(p, path(rng)),
        15 => Op::Link(p, rand_path(rng)),
        16 => Op::Symlink(rand_target(rng), p),
        17 => Op::Mkfifo(p),
        18 => Op::Mknod(p, 1, rng.pick(&[3, 5])),
        19 => Op::OpenWrite(p),
        _ => Op::SetX(p, "user.x", b"1"),
    }
}

/// What the naive walk records per path: exactly what docker reads.
#[derive(Debug)]
struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: u64,
    mtime: (i64, i64),
    cap: Option<Vec<u8>>,
    children: BTreeMap<Vec<u8>, Node>,
}

impl Node {
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// `None` for a name listed but not found: the kernel lists whiteouts of a
/// directory that only one lower layer has, and docker's walker skips names
/// whose lstat says ENOENT.
fn snapshot(p: &Path) -> Option<Node> {
    let st = match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        r => r.unwrap_or_else(|e| panic!("lstat {}: {e}", p.display())),
    };
    let mut children = BTreeMap::new();
    if st.is_dir() {
        for entry in fs::read_dir(p).expect("readdir") {
            let entry = entry.expect("entry");
            if let Some(node) = snapshot(&entry.path()) {
                children.insert(entry.file_name().as_bytes().to_vec(), node);
            }
        }
    }
    Some(Node {
        mode: st.mode(),
        uid: st.uid(),
        gid: st.gid(),
        rdev: st.rdev(),
        size: st.size(),
        mtime: (st.mtime(), st.mtime_nsec()),
        cap: lgetxattr(p, "security.capability").filter(|v| !v.is_empty()),
        children,
    })
}

/// The rule as moby's `statDifferent` states it, written out independently.
fn naive_stat_different(old: &Node, new: &Node) -> bool {
    let same_time = old.mtime == new.mtime
        || (old.mtime.0 == new.mtime.0 && (old.mtime.1 == 0 || new.mtime.1 == 0));
    old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || old.rdev != new.rdev
        || (!old.is_dir() && (!same_time || old.size != new.size))
}

/// moby's `addChanges` over two complete trees.
fn naive_changes(new: &Node, old: Option<&Node>, path: &[u8], added: bool, out: &mut Vec<Vec<u8>>) {
    let start = out.len();
    let none = BTreeMap::new();
    let old_children = match old {
        Some(o) if new.is_dir() => &o.children,
        _ => &none,
    };
    for (name, nc) in &new.children {
        let p = [path, b"/", name].concat();
        let oc = old_children.get(name);
        let child_added = match oc {
            None => true,
            Some(oc) => naive_stat_different(oc, nc) || oc.cap != nc.cap,
        };
        if child_added {
            out.push([if oc.is_none() { &b"A "[..] } else { b"C " }, &p].concat());
        }
        naive_changes(nc, oc, &p, child_added, out);
    }
    for name in old_children
        .keys()
        .filter(|n| !new.children.contains_key(*n))
    {
        out.push([&b"D "[..], path, b"/", name].concat());
    }
    if out.len() > start && new.is_dir() && !added && !path.is_empty() {
        out.push([&b"C "[..], path].concat());
    }
}

/// The naive diff of two snapshots, sorted by path like `diff` prints it.
fn naive_lines(new: &Node, old: &Node) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    naive_changes(new, Some(old), b"", false, &mut out);
    out.sort_by(|a, b| a[2..].cmp(&b[2..]));
    out
}

/// A snapshot of `layers` (topmost first) through a read-only kernel mount
/// at `fx.root/name` (redirects followed, or `userxattr`).
fn kernel_view(fx: &Fixture, name: &str, layers: &[&Path], userxattr: bool) -> Node {
    let mnt = fx.root.join(name);
    fs::create_dir(&mnt).expect("mkdir");
    let dirs: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
    let extra = if userxattr {
        "userxattr"
    } else {
        "redirect_dir=follow"
    };
    let opts = format!("lowerdir={},{extra}", dirs.join(":"));
    let m = Mount::overlay(&mnt, &opts, true);
    let node = snapshot(&mnt).expect("root");
    m.unmount();
    node
}

/// A snapshot of the lowers through a read-only layerfs mount.
fn layerfs_view(fx: &Fixture, name: &str, opts: &str) -> Result<Node, String> {
    let mnt = fx.root.join(name);
    fs::create_dir(&mnt).expect("mkdir");
    let m = LayerfsMount::new(&fx.lowers, None, opts, &mnt)?;
    let node = snapshot(&mnt).expect("root");
    m.unmount()?;
    Ok(node)
}

/// What an operation did: `Ok`, or the error's errno.
type Outcome = Result<(), i32>;

fn outcome(r: io::Result<()>) -> Outcome {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// One random scenario: the lowers (the top one built by hand or committed
/// by an earlier container) and the operations, generated on the kernel.
struct Round {
    fx: Fixture,
    redirect: bool,
    /// Both mounts with `userxattr` (private xattrs in `user.overlay.`).
    userxattr: bool,
    /// The operations and their outcomes on the kernel.
    ops: Vec<(Op, Outcome)>,
    about: String,
}

fn random_round(seed: u64) -> Result<Round, String> {
    let mut rng = Rng::new(seed);
    let fx = Fixture::new(2);
    let l2 = rand_layer(&mut rng, 14, false);
    build(&fx.lowers[1], &l2, false);
    // The top lower: built by hand, or written by the kernel or by layerfs
    // as an earlier container's upper (redirects, opaque dirs and whiteouts
    // in a lower).
    let (mut l1, mut commit) = (Vec::new(), Vec::new());
    let (mut committer, mut userxattr) = (None, false);
    if rng.below(3) == 0 {
        let engine = rng.pick(&[Engine::Kernel, Engine::Layerfs]);
        committer = Some(engine);
        let mut left = 20;
        let next = |mnt: &Path| {
            (left > 0).then(|| {
                left -= 1;
                rand_op(&mut rng, mnt)
            })
        };
        commit = fx.commit(next, false, engine)?;
    } else {
        l1 = rand_layer(&mut rng, 10, true);
        // Sometimes rootless-style: user.overlay.* xattrs (the kernel
        // refuses userxattr with redirect_dir=on, so no committed lower).
        userxattr = rng.below(4) == 0;
        for e in l1.iter_mut().filter(|_| userxattr) {
            if let E::Opq(p) = *e {
                *e = E::X(p, "user.overlay.opaque", b"y");
            }
        }
        build(&fx.lowers[0], &l1, false);
    }
    let redirect = !userxattr && rng.below(3) != 0;
    let m = fx.mount_rw(match (redirect, userxattr) {
        (true, _) => "redirect_dir=on",
        (false, true) => "userxattr",
        (false, false) => "",
    });
    let mut ops = Vec::new();
    for _ in 0..30 {
        let op = rand_op(&mut rng, &fx.mnt);
        // Failing operations (ENOENT, EXDEV…) are part of the game.
        let r = outcome(apply(&fx.mnt, &op));
        ops.push((op, r));
    }
    m.unmount();
    let about = format!(
        "seed {seed} (kernel redirect_dir={redirect}, userxattr={userxattr})\nL1 {l1:?}\nL2 {l2:?}\n\
         commit by {committer:?} {commit:?}\nops {:?}",
        ops.iter().map(|(op, _)| op).collect::<Vec<_>>()
    );
    Ok(Round {
        fx,
        redirect,
        userxattr,
        ops,
        about,
    })
}

impl Round {
    fn private(&self) -> Private {
        if self.userxattr {
            Private::USER
        } else {
            Private::TRUSTED
        }
    }
}

/// The kernel's upper: `diff` equals the naive comparison of the kernel's views.
fn check_kernel_round(r: &Round, old: &Node) -> Result<(), String> {
    let fx = &r.fx;
    let mut layers = vec![fx.upper.as_path()];
    layers.extend(fx.lowers.iter().map(PathBuf::as_path));
    let want = naive_lines(&kernel_view(fx, "new", &layers, r.userxattr), old);
    let got = fx.diff(&fx.upper, r.private());
    if got != want {
        return Err(format!(
            "kernel upper\n{}\ngot  {}\nwant {}",
            r.about,
            show(&got),
            show(&want)
        ));
    }
    Ok(())
}

/// The same operations replayed through layerfs: `diff` of its upper equals
/// the naive comparison of the layerfs views (the live mount, and a
/// read-only mount of the lowers), and the kernel's reading of that upper.
fn check_layerfs_round(r: &Round, kernel_old: &Node) -> Result<(), String> {
    let fx = &r.fx;
    let opts = if r.userxattr { "userxattr" } else { "" };
    let m = fx.mount_layerfs(opts)?;
    let mut diverged = Vec::new();
    for (op, on_kernel) in &r.ops {
        let on_layerfs = outcome(apply(&fx.lfs_mnt, op));
        if on_layerfs != *on_kernel {
            diverged.push(format!(
                "{op:?}: kernel {on_kernel:?}, layerfs {on_layerfs:?}"
            ));
        }
    }
    let live = snapshot(&fx.lfs_mnt).expect("root");
    let on_live_mount = cli_diff(&[fx.lfs_mnt.as_os_str(), "-z".as_ref()])?;
    m.unmount()?;
    let old = layerfs_view(fx, "lfs-old", opts)?;
    let got = fx.diff(&fx.lfs_upper, r.private());
    let want = naive_lines(&live, &old);
    let mut layers = vec![fx.lfs_upper.as_path()];
    layers.extend(fx.lowers.iter().map(PathBuf::as_path));
    let by_kernel = naive_lines(
        &kernel_view(fx, "lfs-new", &layers, r.userxattr),
        kernel_old,
    );
    if got == want && got == by_kernel && got == on_live_mount {
        return Ok(());
    }
    // Outcomes differ legitimately where the kernel had redirect_dir=on.
    let diverged = match (r.redirect, diverged.is_empty()) {
        (_, true) => "none".to_string(),
        (true, false) => format!("(kernel had redirect_dir=on) {}", diverged.join("; ")),
        (false, false) => diverged.join("; "),
    };
    Err(format!(
        "layerfs upper\n{}\nop outcomes differing from the kernel's: {diverged}\n\
         got              {}\nwant (layerfs)   {}\nwant (kernel view of the layerfs upper) {}\n\
         `layerfs diff MOUNTPOINT` before the unmount: {}",
        r.about,
        show(&got),
        show(&want),
        show(&by_kernel),
        show(&on_live_mount)
    ))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_sequences_match_a_naive_docker_diff() {
    require_root();
    // DIFF_ROUNDS rounds on the kernel; every DIFF_LAYERFS_EVERY-th of them
    // (1: all) is also replayed through layerfs.
    let rounds = env_u64("DIFF_ROUNDS", 120);
    let first = env_u64("DIFF_SEED", 1);
    let every = env_u64("DIFF_LAYERFS_EVERY", 1).max(1);
    let mut failures = Vec::new();
    let mut on_layerfs = 0;
    for seed in first..first + rounds {
        let r = random_round(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let lowers: Vec<&Path> = r.fx.lowers.iter().map(PathBuf::as_path).collect();
        let old = kernel_view(&r.fx, "old", &lowers, r.userxattr);
        if let Err(e) = check_kernel_round(&r, &old) {
            failures.push(e);
        }
        if (seed - first).is_multiple_of(every) {
            on_layerfs += 1;
            if let Err(e) = check_layerfs_round(&r, &old) {
                failures.push(e);
            }
        }
        if failures.len() >= 3 {
            break;
        }
    }
    eprintln!("{rounds} random rounds on the kernel, {on_layerfs} replayed through layerfs");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// The command line: output formats on a live layerfs mount, and errors

/// A JSON value of the kinds `--json` prints.
#[derive(Debug, PartialEq)]
enum Json {
    Str(String),
    Bool(bool),
}

/// Reads one flat JSON object of string and boolean members (all that
/// `--json` prints), strictly: anything else is an error.
fn parse_json_object(text: &str) -> Result<BTreeMap<String, Json>, String> {
    let mut it = text.chars().peekable();
    let ws = |it: &mut std::iter::Peekable<std::str::Chars>| {
        while it.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            it.next();
        }
    };
    let expect = |it: &mut std::iter::Peekable<std::str::Chars>, want: char| {
        ws(it);
        match it.next() {
            Some(c) if c == want => Ok(()),
            other => Err(format!("expected {want:?}, found {other:?} in {text:?}")),
        }
    };
    let mut map = BTreeMap::new();
    expect(&mut it, '{')?;
    loop {
        expect(&mut it, '"')?;
        let key = json_string_body(&mut it)?;
        expect(&mut it, ':')?;
        ws(&mut it);
        let value = match it.peek() {
            Some('"') => {
                it.next();
                Json::Str(json_string_body(&mut it)?)
            }
            Some('t') | Some('f') => {
                let word: String =
                    std::iter::from_fn(|| it.next_if(|c| c.is_ascii_lowercase())).collect();
                match word.as_str() {
                    "true" => Json::Bool(true),
                    "false" => Json::Bool(false),
                    _ => return Err(format!("bad literal {word:?} in {text:?}")),
                }
            }
            other => return Err(format!("unexpected value start {other:?} in {text:?}")),
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate key {key:?} in {text:?}"));
        }
        ws(&mut it);
        match it.next() {
            Some(',') => continue,
            Some('}') => break,
            other => return Err(format!("expected , or }} found {other:?} in {text:?}")),
        }
    }
    ws(&mut it);
    match it.next() {
        None => Ok(map),
        Some(c) => Err(format!("trailing {c:?} in {text:?}")),
    }
}

/// The rest of a JSON string after its opening quote, unescaped.
fn json_string_body(it: &mut std::iter::Peekable<std::str::Chars>) -> Result<String, String> {
    let mut s = String::new();
    let hex4 = |it: &mut std::iter::Peekable<std::str::Chars>| -> Result<u32, String> {
        let h: String = it.take(4).collect();
        u32::from_str_radix(&h, 16).map_err(|_| format!("bad \\u escape {h:?}"))
    };
    loop {
        match it.next().ok_or("unterminated string")? {
            '"' => return Ok(s),
            '\\' => match it.next().ok_or("unterminated escape")? {
                '"' => s.push('"'),
                '\\' => s.push('\\'),
                '/' => s.push('/'),
                'b' => s.push('\u{8}'),
                'f' => s.push('\u{c}'),
                'n' => s.push('\n'),
                'r' => s.push('\r'),
                't' => s.push('\t'),
                'u' => {
                    let mut cp = hex4(it)?;
                    if (0xd800..0xdc00).contains(&cp) {
                        if it.next() != Some('\\') || it.next() != Some('u') {
                            return Err("lone high surrogate".into());
                        }
                        let lo = hex4(it)?;
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    }
                    s.push(char::from_u32(cp).ok_or("bad code point")?);
                }
                c => return Err(format!("bad escape \\{c}")),
            },
            c if (c as u32) < 0x20 => return Err(format!("raw control char {c:?} in a string")),
            c => s.push(c),
        }
    }
}

/// `--json` output as `K /path` lines: one object per line, `kind` and
/// `path`, and `"raw":false` exactly when the path is not UTF-8 (its bytes
/// then escaped as `\xNN`, backslashes doubled).
fn json_lines(out: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(out).map_err(|e| format!("--json output not UTF-8: {e}"))?;
    let Some(body) = text.strip_suffix('\n') else {
        return match text.is_empty() {
            true => Ok(Vec::new()),
            false => Err(format!(
                "--json output does not end with a newline: {text:?}"
            )),
        };
    };
    let mut lines = Vec::new();
    for line in body.split('\n') {
        let obj = parse_json_object(line)?;
        let (Some(Json::Str(kind)), Some(Json::Str(path))) = (obj.get("kind"), obj.get("path"))
        else {
            return Err(format!("no kind/path strings in {line:?}"));
        };
        if !["A", "C", "D"].contains(&kind.as_str()) {
            return Err(format!("bad kind in {line:?}"));
        }
        let bytes = match obj.get("raw") {
            None => path.as_bytes().to_vec(),
            Some(Json::Bool(false)) => unescape_raw(path)?,
            Some(other) => return Err(format!("raw is {other:?} in {line:?}")),
        };
        if obj.len() != 2 + usize::from(obj.contains_key("raw")) {
            return Err(format!("unexpected members in {line:?}"));
        }
        if obj.contains_key("raw") == std::str::from_utf8(&bytes).is_ok() {
            return Err(format!(
                "\"raw\":false present iff the path is not UTF-8: {line:?}"
            ));
        }
        lines.push([kind.as_bytes(), b" ", &bytes].concat());
    }
    Ok(lines)
}

/// Undoes the `"raw":false` path escaping: `\\` and `\xNN`.
fn unescape_raw(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'\\')) => {
                out.push(b'\\');
                i += 2;
            }
            (b'\\', Some(b'x')) => {
                let hex = s.get(i + 2..i + 4).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x{hex}"))?);
                i += 4;
            }
            (b'\\', _) => return Err(format!("lone backslash in {s:?}")),
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// `layerfs diff ARGS`: status, stdout, stderr.
fn layerfs_diff(args: &[&OsStr]) -> Output {
    run_timeout(
        Command::new(bin()).arg("diff").args(args),
        Duration::from_secs(30),
    )
}

fn lines_output(lines: &[Vec<u8>], end: u8) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| [&l[..], &[end]].concat())
        .collect()
}

#[test]
fn cli_formats_on_a_live_layerfs_mount() {
    require_root();
    let fx = Fixture::new(1);
    build(
        &fx.lowers[0],
        &[
            E::F(b"x", b"x"),
            E::F(b"keep/f", b"f"),
            E::F(b"old\nname", b"o"),
        ],
        true,
    );
    let m = fx.mount_layerfs("").unwrap();
    let ops = [
        Op::Write(b"n\nl", b""),
        Op::Write(b"q\"\\\xff", b""),
        Op::Write("é\u{1F600}".as_bytes(), b""),
        Op::Write(b"ctl\x01\x1f", b""),
        Op::Rm(b"x"),
        Op::Rm(b"old\nname"),
        Op::Append(b"keep/f", b"+"),
        Op::Mkdir(b"new dir"),
    ];
    apply_all(&fx.lfs_mnt, &ops).unwrap();
    let want: Vec<Vec<u8>> = [
        &b"A /ctl\x01\x1f"[..],
        b"C /keep",
        b"C /keep/f",
        b"A /n\nl",
        b"A /new dir",
        b"D /old\nname",
        b"A /q\"\\\xff",
        b"D /x",
        "A /é\u{1F600}".as_bytes(),
    ]
    .iter()
    .map(|l| l.to_vec())
    .collect();
    let mnt = fx.lfs_mnt.as_os_str();
    let mut by_layers: Vec<&OsStr> = vec!["--upper".as_ref(), fx.lfs_upper.as_ref()];
    by_layers.extend(["--lower".as_ref(), fx.lowers[0].as_os_str()]);
    let ok = |args: &[&OsStr]| {
        let out = layerfs_diff(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{args:?}: {err}");
        out.stdout
    };
    // Each format, in both forms: the same bytes.
    for form in [vec![mnt], by_layers.clone()] {
        let with = |extra: &[&str]| {
            let mut a = form.clone();
            a.extend(extra.iter().map(OsStr::new));
            ok(&a)
        };
        assert_eq!(
            with(&[]).escape_ascii().to_string(),
            lines_output(&want, b'\n').escape_ascii().to_string()
        );
        assert_eq!(with(&["-z"]), lines_output(&want, 0));
        assert_eq!(with(&["--null"]), lines_output(&want, 0));
        assert_eq!(show(&json_lines(&with(&["--json"])).unwrap()), show(&want));
        let only = |kinds: &[u8]| -> Vec<Vec<u8>> {
            want.iter()
                .filter(|l| kinds.contains(&l[0]))
                .cloned()
                .collect()
        };
        assert_eq!(
            with(&["--kind", "A,C", "-z"]),
            lines_output(&only(b"AC"), 0)
        );
        assert_eq!(with(&["--kind", "d", "-z"]), lines_output(&only(b"D"), 0));
        assert_eq!(with(&["--kind", "C"]), lines_output(&only(b"C"), b'\n'));
        let json_d = json_lines(&with(&["--kind", "D,d", "--json"])).unwrap();
        assert_eq!(show(&json_d), show(&only(b"D")));
        for bad in ["X", "A,", "AC", ""] {
            let mut a = form.clone();
            a.extend([OsStr::new("--kind"), OsStr::new(bad)]);
            let out = layerfs_diff(&a);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "--kind {bad:?} accepted");
            assert!(err.contains("kind"), "--kind {bad:?}: {err}");
            assert!(out.stdout.is_empty(), "--kind {bad:?} printed changes");
        }
    }
    m.unmount().unwrap();
    // The library agrees after the unmount.
    assert_eq!(show(&fx.diff(&fx.lfs_upper, Private::TRUSTED)), show(&want));
}

#[test]
fn cli_mountpoint_given_relative_with_slash_or_through_a_symlink() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"f", b"f")], true);
    let m = fx.mount_layerfs("").unwrap();
    apply_all(&fx.lfs_mnt, &[Op::Rm(b"f"), Op::Write(b"g", b"g")]).unwrap();
    std::os::unix::fs::symlink(&fx.lfs_mnt, fx.root.join("link")).unwrap();
    for arg in ["lm", "lm/", "./lm/.", "link", "link/"] {
        let out = run_timeout(
            Command::new(bin())
                .args(["diff", arg])
                .current_dir(&fx.root),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "diff {arg}: {err}");
        assert_eq!(out.stdout, b"D /f\nA /g\n", "diff {arg}");
    }
    m.unmount().unwrap();
}

#[test]
fn cli_mountpoint_of_mounts_made_with_relative_paths_with_dash_o_and_again_at_one_path() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"f", b"f")], true);
    for d in ["u2", "w2"] {
        fs::create_dir(fx.root.join(d)).unwrap();
    }
    let mut sub = Command::new(bin());
    sub.args([
        "mount", "--lower", "l1", "--upper", "lu", "--work", "lw", "lm",
    ]);
    let mut dash_o = Command::new(bin());
    dash_o.args(["-o", "lowerdir=l1,upperdir=u2,workdir=w2", "lm"]);
    // The second mount is at the same path with another upper: `diff`
    // must find the layers of the mount that is there now.
    let forms: [(&str, Command, &[Op], &[u8]); 2] = [
        (
            "mount --lower",
            sub,
            &[Op::Rm(b"f"), Op::Write(b"g", b"g")],
            b"D /f\nA /g\n",
        ),
        ("-o", dash_o, &[Op::Write(b"h", b"h")], b"A /h\n"),
    ];
    for (form, mut cmd, ops, want) in forms {
        cmd.current_dir(&fx.root);
        let m = LayerfsMount::run(cmd, &fx.lfs_mnt).unwrap();
        apply_all(&fx.lfs_mnt, ops).unwrap();
        // From another working directory than the mount's.
        let out = run_timeout(
            Command::new(bin())
                .arg("diff")
                .arg(&fx.lfs_mnt)
                .current_dir("/"),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{form}: {err}");
        assert_eq!(
            out.stdout.escape_ascii().to_string(),
            want.escape_ascii().to_string(),
            "{form}: {err}"
        );
        m.unmount().unwrap();
    }
}

#[test]
fn cli_no_changes_is_exit_0_and_no_output() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"d/f", b"f")], true);
    let m = fx.mount_layerfs("").unwrap();
    // A copy-up that changes nothing, and a file created then deleted.
    let ops = [
        Op::OpenWrite(b"d/f"),
        Op::Write(b"tmp", b"t"),
        Op::Rm(b"tmp"),
    ];
    apply_all(&fx.lfs_mnt, &ops).unwrap();
    assert!(fx.lfs_upper.join("d/f").exists(), "no copy-up happened");
    for args in [
        vec![fx.lfs_mnt.as_os_str()],
        vec![
            "--upper".as_ref(),
            fx.lfs_upper.as_os_str(),
            "--lower".as_ref(),
            fx.lowers[0].as_os_str(),
        ],
    ] {
        let out = layerfs_diff(&args);
        assert!(out.status.success(), "{args:?}: {}", out.status);
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    }
    m.unmount().unwrap();
}

/// Asserts `layerfs diff ARGS` fails, prints nothing on stdout, and says
/// all of `needles` on stderr.
fn assert_diff_fails(args: &[&OsStr], needles: &[&str]) {
    let out = layerfs_diff(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
    }
}

#[test]
fn cli_errors_exit_non_zero_with_a_message_naming_the_culprit() {
    require_root();
    let fx = Fixture::new(1);
    build(&fx.lowers[0], &[E::F(b"f", b"f")], true);
    let r = &fx.root;
    let (missing, file) = (r.join("no-such-dir"), r.join("l1/f"));
    let (u, l) = (fx.upper.as_os_str(), fx.lowers[0].as_os_str());
    let m = missing.as_os_str();
    let ms = missing.to_str().unwrap();
    assert_diff_fails(&["--upper".as_ref(), m, "--lower".as_ref(), l], &[ms]);
    assert_diff_fails(&["--upper".as_ref(), u, "--lower".as_ref(), m], &[ms]);
    assert_diff_fails(
        &[
            "--upper".as_ref(),
            u,
            "--lower".as_ref(),
            l,
            "--lower".as_ref(),
            m,
        ],
        &[ms],
    );
    let fs_ = file.to_str().unwrap();
    assert_diff_fails(
        &["--upper".as_ref(), file.as_os_str(), "--lower".as_ref(), l],
        &[fs_, "not a directory"],
    );
    assert_diff_fails(&["--upper".as_ref(), u], &["--lower"]);
    assert_diff_fails(&[], &["Usage"]);
    // MOUNTPOINT that is no layerfs mount: missing, a plain directory, a kernel overlay.
    assert_diff_fails(&[m], &[ms]);
    let plain = fx.root.join("l1");
    assert_diff_fails(
        &[plain.as_os_str()],
        &[plain.to_str().unwrap(), "not a running layerfs mount"],
    );
    let k = fx.mount_rw("");
    assert_diff_fails(
        &[fx.mnt.as_os_str()],
        &[fx.mnt.to_str().unwrap(), "not a running layerfs mount"],
    );
    k.unmount();
    // A read-only layerfs mount has no changes to show.
    let ro_mnt = fx.root.join("ro");
    fs::create_dir(&ro_mnt).unwrap();
    let ro = LayerfsMount::new(&fx.lowers, None, "", &ro_mnt).unwrap();
    assert_diff_fails(
        &[ro_mnt.as_os_str()],
        &[ro_mnt.to_str().unwrap(), "read-only"],
    );
    ro.unmount().unwrap();
    // A layerfs mount once it is unmounted.
    let lm = fx.mount_layerfs("").unwrap();
    let out = layerfs_diff(&[fx.lfs_mnt.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    lm.unmount().unwrap();
    assert_diff_fails(&[fx.lfs_mnt.as_os_str()], &["not a running layerfs mount"]);
    // An upper that cannot be read as a layer (a malformed redirect).
    build(
        &fx.upper,
        &[
            E::D(b"a2"),
            E::X(b"a2", "trusted.overlay.redirect", b"../../etc"),
        ],
        true,
    );
    assert_diff_fails(
        &["--upper".as_ref(), u, "--lower".as_ref(), l],
        &["redirect"],
    );
    // A mount whose daemon was killed (ENOTCONN): an error, not a hang.
    let lm = fx.mount_layerfs("").unwrap();
    assert!(
        !lm.daemons.is_empty(),
        "no daemon found for {}",
        fx.lfs_mnt.display()
    );
    for &p in &lm.daemons {
        // SAFETY: kill(2) of the daemon this test started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    lm.wait_daemons().unwrap();
    let out = layerfs_diff(&[fx.lfs_mnt.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(fx.lfs_mnt.to_str().unwrap()),
        "`layerfs diff MOUNTPOINT` of a mount whose daemon was killed (the record \
         of a dead daemon must be ignored): {out:?}"
    );
    // The killed daemon could not remove its record: do it for it.
    let suffixes: Vec<String> = lm.daemons.iter().map(|p| format!("-{p}")).collect();
    drop(lm);
    for e in fs::read_dir("/run/layerfs").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = fs::read(e.path()).is_ok_and(|d| {
            d.split(|&b| b == 0)
                .any(|f| f == fx.lfs_mnt.as_os_str().as_bytes())
        });
        if ours && suffixes.iter().any(|s| name.ends_with(s)) {
            let _ = fs::remove_file(e.path());
        }
    }
}
