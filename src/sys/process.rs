//! Process plumbing for the daemon: fork with a readiness pipe, detaching
//! from the terminal, and waiting for termination signals.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::cvt;

pub enum Forked {
    Parent { ready: OwnedFd },
    Child { ready: OwnedFd },
}

/// Forks; the child gets the write end of a pipe on which it reports
/// readiness, the parent the read end. Must be called before any thread is
/// started.
pub fn fork_with_pipe() -> io::Result<Forked> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two pipe fds.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (documented precondition).
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        drop(r);
        Forked::Child { ready: w }
    } else {
        drop(w);
        Forked::Parent { ready: r }
    })
}

/// Starts a new session and points stdin/stdout/stderr at /dev/null, so a
/// caller waiting for our output (podman) is released.
pub fn detach() {
    // SAFETY: setsid/open/dup2/close on valid arguments have no memory effects.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

fn term_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP in this thread and the threads it starts
/// afterwards, so that `wait_term_signal` can take them.
pub fn block_term_signals() {
    let set = term_set();
    // SAFETY: valid set pointer; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for one of the blocked termination signals; returns its number.
pub fn wait_term_signal() -> i32 {
    let set = term_set();
    let mut sig = 0;
    // SAFETY: valid set and output pointers.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// Writes a whole message to a pipe (best effort).
pub fn write_all(fd: &OwnedFd, msg: &[u8]) {
    let mut done = 0;
    while done < msg.len() {
        // SAFETY: `msg[done..]` is readable for its length.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                msg[done..].as_ptr().cast(),
                msg.len() - done,
            )
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
}

/// Sets up a child to be started: the termination signals this process
/// blocks are unblocked again before exec, and with `root` the child is
/// chrooted there (and starts in its `/`).
pub fn prepare_child(cmd: &mut std::process::Command, root: Option<std::path::PathBuf>) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let root = root.map(|r| std::ffi::CString::new(r.as_os_str().as_bytes()).unwrap_or_default());
    let set = term_set();
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if let Some(r) = &root
                && (libc::chroot(r.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends a signal to a process (best effort).
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
pub const CAP_FSETID: u32 = 4;

/// Runs `f` with `CAP_FSETID` out of the calling thread's effective set
/// (other threads keep theirs), and puts it back. Credentials captured
/// meanwhile (a FUSE passthrough backing file's) then write as a caller
/// without it: the filesystem clears setuid/setgid bits on each write.
pub fn without_fsetid<T>(f: impl FnOnce() -> T) -> T {
    let mut hdr = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a v3 header (pid 0: this thread) and room for
    // the two data words v3 uses.
    let got = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } == 0;
    if !got || data[0].effective & (1 << CAP_FSETID) == 0 {
        return f();
    }
    let mut without = data;
    without[0].effective &= !(1 << CAP_FSETID);
    // SAFETY: capset(2) of this thread (pid 0) with sets it already has,
    // minus one effective capability.
    let dropped = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, without.as_ptr()) } == 0;
    let r = f();
    if dropped {
        // SAFETY: as above; the effective set back to what capget gave,
        // within the unchanged permitted set.
        unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    }
    r
}

/// The supplementary group ids of process `pid` (`Groups:` of its
/// `/proc/PID/status`); empty if it cannot be read.
pub fn supplementary_groups(pid: u32) -> Vec<u32> {
    status_field(pid, "Groups:")
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` has capability `cap` in its effective set
/// (`CapEff:` of its `/proc/PID/status`); false if it cannot be read.
pub fn has_cap(pid: u32, cap: u32) -> bool {
    status_field(pid, "CapEff:")
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether process `pid` has CAP_SYS_ADMIN in the initial user namespace
/// (the kernel's `capable(CAP_SYS_ADMIN)`, e.g. to list `trusted.*`
/// xattrs): in its effective set, and in the user namespace of process 1
/// (assumed when that one cannot be read).
pub fn is_host_admin(pid: u32) -> bool {
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    has_cap(pid, CAP_SYS_ADMIN)
        && match (ns(pid), ns(1)) {
            (Some(a), Some(b)) => a == b,
            (None, _) => false,
            (Some(_), None) => true,
        }
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    if pid == 0 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::to_owned)
}
