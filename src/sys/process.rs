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
