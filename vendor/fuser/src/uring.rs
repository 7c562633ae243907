//! layerfs patch 6: FUSE-over-io-uring transport (kernel 6.14+, FUSE ABI
//! 7.42, `FUSE_OVER_IO_URING`; the kernel offers it when the `fuse` module's
//! `enable_uring` parameter is set).
//!
//! The kernel keeps one queue per possible CPU and puts a request on the
//! queue of the CPU its caller runs on. Each queue here is served by
//! threads pinned to that CPU, each with an io_uring of its own and one
//! registered ring entry (a header buffer and a payload buffer): the
//! request is handed to a thread on the caller's CPU and its reply wakes
//! the caller there, without the cross-CPU wake-ups of `/dev/fuse` reads.
//! One entry per thread, so that the kernel only gives a request to a
//! thread that waits for one; at least two threads per queue (the session's
//! thread count spread over the queues), so that a handler that waits for
//! another request of its own CPU (an invalidation waiting for a read)
//! does not wait for itself, and one slow request does not hold up every
//! other caller on its CPU.
//!
//! Requests arrive as a `fuse_in_header` and the opcode's fixed argument
//! in the header buffer and the rest in the payload buffer; they are put
//! back together as `/dev/fuse` would have delivered them (in a buffer of
//! the thread's own, so that the reply can be written into the payload
//! buffer while the request's arguments are still borrowed) and dispatched
//! as usual. A reply is written into the entry by the reply sender and
//! committed with the next fetch.
//! Forgets, interrupts and notifications still go through `/dev/fuse`.
//!
//! Scheduling class (`Config::uring_class`): a reply wakes its caller
//! while the ring thread still runs on the caller's CPU, and the scheduler
//! then moves the caller to an idle CPU (waking a halted one on a VM, and
//! the next request goes to that CPU's queue) at almost every request of a
//! caller that makes them back to back (`ls -l`: a GETXATTR per entry). A
//! CPU whose only running task is SCHED_IDLE counts as idle, so with the
//! ring thread in the idle class the caller is woken where it was and runs
//! as soon as the thread sleeps. `RingClass::Idle` keeps the threads
//! there, watched by an `IdleGuard`: a thread woken there waits behind
//! every normal task of its CPU (unwatched, under heavy load a daemon once
//! took over 5 s to exit after its unmount), so threads that starve are
//! moved to the normal class for a while; a request its caller does not
//! wait for (a release after a close) is served when the caller next
//! waits, on the same CPU, which costs less than waking another.
//! `RingClass::IdleOnReply` enters the idle class only to commit and for
//! the first 5 ms of the wait that follows, serves in the normal class,
//! and stays normal while other CPUs are busy or for a while after its
//! requests were held up (see `IdleOnReply`); its class changes cost two
//! system calls and its checks three reads per request (slower than
//! `Idle` on each of the eleven rows of a benchmark run of tree walks,
//! small-file reads, creates, removals, a build and a concurrency job).
//! In both, the
//! I/O priority is set to best-effort explicitly, or it would follow the
//! CPU class into the idle I/O class.
//!
//! Once the kernel has granted the rings, every request waits until each
//! queue has an entry registered; whatever keeps a queue from registering
//! (a ring or thread that cannot be made, a registration the kernel
//! refuses) makes the connection fall back to `/dev/fuse`.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::info;
use log::warn;

use crate::Filesystem;
use crate::RingClass;
use crate::channel::Channel;
use crate::ll::fuse_abi as abi;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `fuse_uring_req_header`: `in_out` (128), `op_in` (128), then
/// `fuse_uring_ent_in_out` (flags, commit_id, payload_sz, padding, reserved).
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const OP_IN_SZ: usize = 128;
const ENT_IN_OUT: usize = 256;
const HEADER_SZ: usize = 288;
/// Offset of the payload buffer in an entry's memory.
const FRONT: usize = 4096;
const IN_HEADER_SZ: usize = std::mem::size_of::<abi::fuse_in_header>();
const OUT_HEADER_SZ: usize = std::mem::size_of::<abi::fuse_out_header>();

/// Transport parameters, from the INIT exchange.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UringParams {
    /// Payload buffer size the kernel requires (max of its minimum read
    /// buffer, `max_write` and `max_pages` pages).
    pub(crate) payload: usize,
    /// The ring threads' scheduling class (see the module doc).
    pub(crate) class: RingClass,
}

/// How many queues the kernel makes: `num_possible_cpus()`, the number of
/// CPUs in the possible mask (queue ids are CPU numbers, so a sparse mask
/// leaves CPUs without a queue of their own: the kernel then refuses their
/// registration and the connection stays on `/dev/fuse`).
pub(crate) fn possible_cpus() -> usize {
    let count = |s: &str| -> Option<usize> {
        let mut n = 0;
        for part in s.trim().split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
                None => {
                    let c = part.parse::<usize>().ok()?;
                    (c, c)
                }
            };
            n += hi.checked_sub(lo)? + 1;
        }
        Some(n)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| count(&s))
        // SAFETY: plain libc call; configured CPUs, as libfuse counts them.
        .unwrap_or_else(|| unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize)
}

/// A request's entry buffers, as seen by the reply sender: the header
/// buffer and the payload buffer, written by at most one reply.
#[derive(Debug)]
struct Slot {
    header: *mut u8,
    payload: *mut u8,
    payload_cap: usize,
    replied: bool,
    /// The serving thread waits on the condvar for this reply (a reply sent
    /// later from another thread): only then is there anyone to wake. A
    /// notify is a system call even with no waiter, and most replies are
    /// sent by the serving thread itself before it would wait.
    waiting: bool,
}

// SAFETY: the pointers are to buffers owned by the serving thread, which
// waits (on the condvar) without touching them while a reply may write.
unsafe impl Send for Slot {}

/// Where the reply to a ring request goes.
#[derive(Debug, Clone)]
pub(crate) struct UringSender {
    slot: Arc<(Mutex<Slot>, Condvar)>,
    /// The payload buffer's size (fixed for the entry).
    payload_cap: usize,
    /// The device, for backing-file registration.
    pub(crate) ch: crate::channel::ChannelSender,
}

impl UringSender {
    /// Whether a reply of `size` payload bytes fits the entry.
    pub(crate) fn fits(&self, size: usize) -> bool {
        size <= self.payload_cap
    }

    /// Replies with data that `fill` writes straight into the payload
    /// buffer (`Ok(n)`: its first `n` bytes), or with `fill`'s error.
    pub(crate) fn send_filled(
        &self,
        unique: u64,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, crate::Errno>,
    ) -> io::Result<()> {
        let (lock, cv) = &*self.slot;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        if slot.replied || size > slot.payload_cap {
            return Err(io::Error::other("ring entry taken or too small"));
        }
        // SAFETY: the payload buffer holds payload_cap >= size bytes, and
        // only this reply writes it (the slot is locked and not replied).
        let buf = unsafe { std::slice::from_raw_parts_mut(slot.payload, size) };
        // A panic in `fill` must still leave a reply (EIO) in the entry.
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(buf)));
        let (error, n) = match filled {
            Ok(Ok(n)) => (0i32, n.min(size)),
            Ok(Err(e)) => (-e.code(), 0),
            Err(_) => (-libc::EIO, 0),
        };
        let mut h = [0u8; OUT_HEADER_SZ];
        h[0..4].copy_from_slice(&((OUT_HEADER_SZ + n) as u32).to_ne_bytes());
        h[4..8].copy_from_slice(&error.to_ne_bytes());
        h[8..16].copy_from_slice(&unique.to_ne_bytes());
        // SAFETY: the header buffer is HEADER_SZ bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), slot.header.add(IN_OUT), OUT_HEADER_SZ);
            let p = slot.header.add(ENT_IN_OUT + 16) as *mut u32;
            p.write_unaligned(n as u32);
        }
        slot.replied = true;
        if slot.waiting {
            cv.notify_all();
        }
        Ok(())
    }

    /// Writes a reply (`fuse_out_header` then its arguments) into the entry.
    pub(crate) fn send(&self, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        let (lock, cv) = &*self.slot;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        if slot.replied {
            return Err(io::Error::other("second reply to a ring request"));
        }
        let total: usize = data.iter().map(|b| b.len()).sum();
        let payload_len = total.saturating_sub(OUT_HEADER_SZ);
        let mut out = [0u8; OUT_HEADER_SZ];
        let mut error = None;
        if total < OUT_HEADER_SZ || payload_len > slot.payload_cap {
            error = Some(io::Error::other(format!(
                "reply of {total} bytes does not fit the ring entry"
            )));
        }
        let mut written = 0usize;
        for b in data {
            for (i, byte) in b.iter().enumerate() {
                let pos = written + i;
                if pos < OUT_HEADER_SZ {
                    out[pos] = *byte;
                } else {
                    break;
                }
            }
            if error.is_none() && written + b.len() > OUT_HEADER_SZ {
                let skip = OUT_HEADER_SZ.saturating_sub(written);
                let dst = written + skip - OUT_HEADER_SZ;
                // SAFETY: dst + len <= payload_len <= payload_cap (checked).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        b.as_ptr().add(skip),
                        slot.payload.add(dst),
                        b.len() - skip,
                    );
                }
            }
            written += b.len();
        }
        if error.is_some() {
            // Answer EIO instead: header only.
            let mut h = [0u8; OUT_HEADER_SZ];
            h[0..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            h[8..16].copy_from_slice(&out[8..16]);
            out = h;
        }
        let payload_sz = if error.is_some() { 0 } else { payload_len as u32 };
        // SAFETY: the header buffer is HEADER_SZ bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(out.as_ptr(), slot.header.add(IN_OUT), OUT_HEADER_SZ);
            let p = slot.header.add(ENT_IN_OUT + 16) as *mut u32;
            p.write_unaligned(payload_sz);
        }
        slot.replied = true;
        if slot.waiting {
            cv.notify_all();
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Memory of one entry, mapped (so pages the kernel never writes stay
/// unallocated: the payload buffer must hold `max_write` bytes, though most
/// requests and replies are small): the header buffer, then (at `FRONT`)
/// the payload buffer.
struct EntryBuf {
    ptr: *mut u8,
    size: usize,
    payload: usize,
}

impl EntryBuf {
    fn new(payload: usize) -> io::Result<EntryBuf> {
        let size = FRONT + payload;
        // SAFETY: an anonymous private mapping, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(EntryBuf {
            ptr: ptr.cast(),
            size,
            payload,
        })
    }
    fn header(&self) -> *mut u8 {
        self.ptr
    }
    fn payload(&self) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.ptr.add(FRONT) }
    }
}

impl Drop for EntryBuf {
    fn drop(&mut self) {
        // SAFETY: mapped in new() with this size.
        unsafe {
            libc::munmap(self.ptr.cast(), self.size);
        }
    }
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

fn new_ring() -> io::Result<Ring> {
    IoUring::builder().build(4)
}

/// Whether this process can use io_uring with 128-byte entries (it may be
/// off by sysctl or filtered by seccomp, as in containers): asked before
/// FUSE-over-io-uring is requested at INIT, since once it is granted every
/// request waits until all queues are registered.
pub(crate) fn probe() -> io::Result<()> {
    new_ring().map(drop)
}

/// Makes the kernel give up FUSE-over-io-uring for this connection (so
/// requests flow through `/dev/fuse`): a REGISTER it must refuse (no
/// buffers) switches the connection back.
fn fall_back(ch: &Channel, ring: Option<Ring>) {
    let ring = match ring.map_or_else(new_ring, Ok) {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot leave FUSE-over-io-uring ({e}): requests may hang");
            return;
        }
    };
    let mut ring = ring;
    let dev = types::Fd(ch.as_fd().as_raw_fd());
    let bad = opcode::UringCmd80::new(dev, CMD_REGISTER)
        .cmd(cmd_req(0, 0))
        .build()
        .user_data(0);
    // SAFETY: the entry references no memory (no iovecs: len 0).
    let r = unsafe { ring.submission().push(&bad) }
        .map_err(|_| io::Error::other("ring submission queue full"))
        .and_then(|()| loop {
            match ring.submit_and_wait(1) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => break r.map(drop),
            }
        });
    match (r, ring.completion().next()) {
        (Ok(()), Some(c)) if c.result() < 0 => {
            warn!("FUSE-over-io-uring given up: requests go through /dev/fuse")
        }
        (r, c) => log::error!(
            "FUSE-over-io-uring could not be set up nor given up ({r:?}, {:?}): \
             requests may hang; remount with -o uring=off",
            c.map(|c| c.result())
        ),
    }
}

/// What one ring thread works with, made before any thread starts.
struct Prepared {
    qid: usize,
    ring: Ring,
    buf: EntryBuf,
}

// SAFETY: the mapping is owned by the entry and used by one thread at a time.
unsafe impl Send for EntryBuf {}

/// Starts the ring threads. Returns their handles; each ends when the
/// connection ends (its entry is torn down) or its ring fails. If a ring
/// cannot be made or a thread started, the connection falls back to
/// `/dev/fuse`.
pub(crate) fn start<FS: Filesystem>(
    params: UringParams,
    ch: &Channel,
    make_loop: impl Fn(String) -> SessionEventLoop<FS>,
    threads_per_queue: usize,
) -> io::Result<Vec<JoinHandle<()>>> {
    let queues = possible_cpus();
    let per_queue = threads_per_queue.max(2);
    let mut params = params;
    if params.class != RingClass::Normal && !can_leave_idle() {
        info!(
            "FUSE ring threads in the normal scheduling class only: this process may not \
             return a thread from SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE below 20)"
        );
        params.class = RingClass::Normal;
    }
    let mut prepared = Vec::new();
    for qid in 0..queues {
        for _ in 0..per_queue {
            let made = new_ring().and_then(|ring| Ok((ring, EntryBuf::new(params.payload)?)));
            match made {
                Ok((ring, buf)) => prepared.push(Prepared { qid, ring, buf }),
                Err(e) => {
                    fall_back(ch, prepared.pop().map(|p| p.ring));
                    return Err(e);
                }
            }
        }
    }
    let mut handles = Vec::new();
    let guard = (params.class == RingClass::Idle)
        .then(|| Arc::new(IdleGuard::new(prepared.iter().map(|p| p.qid))));
    for (i, p) in prepared.into_iter().enumerate() {
        let name = format!("fuser-q{}.{}", p.qid, i % per_queue);
        let event_loop = make_loop(name.clone());
        let ch2 = ch.clone();
        let watched = guard.as_ref().map(|g| (g.clone(), i));
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(p, ch2, event_loop, params.class, watched))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                fall_back(ch, None);
                warn!("FUSE ring thread not started: {e}");
                break;
            }
        }
    }
    if let Some(g) = guard {
        // Started threads end with the connection; those never started
        // (the fallback above) count as ended.
        for t in &g.threads[handles.len()..] {
            t.ended.store(true, Ordering::Release);
        }
        match std::thread::Builder::new()
            .name("fuser-idle-guard".into())
            .spawn(move || g.watch())
        {
            Ok(h) => handles.push(h),
            Err(e) => warn!("FUSE ring threads unguarded in the idle class: {e}"),
        }
    }
    Ok(handles)
}

fn pin_to(cpu: usize) {
    // SAFETY: plain libc calls on a zeroed cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "ring thread not pinned to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

fn cmd_req(commit_id: u64, qid: usize) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&(qid as u16).to_ne_bytes());
    cmd
}

fn serve<FS: Filesystem>(
    p: Prepared,
    ch: Channel,
    se: SessionEventLoop<FS>,
    class: RingClass,
    watched: Option<(Arc<IdleGuard>, usize)>,
) {
    pin_to(p.qid);
    let watched = watched.map(|(g, i)| Watched {
        guard: g,
        index: i,
    });
    let mut guarded = None;
    let mut lend = match class {
        RingClass::Normal => None,
        // The I/O priority first: left unset, it would follow the CPU class
        // into the idle I/O class (served last by I/O schedulers).
        _ if !best_effort_io() => None,
        RingClass::Idle => {
            if let Some(w) = &watched {
                w.thread().start(set_idle(true));
                guarded = Some(w.thread());
            }
            None
        }
        RingClass::IdleOnReply => IdleOnReply::new(),
    };
    let Prepared { qid, ring, buf } = p;
    let served = serve_ring(qid, ring, &buf, &ch, &se, &mut lend, guarded);
    drop(watched);
    match served {
        // Torn down: the kernel no longer uses the buffers.
        Ok(()) => drop(buf),
        Err(e) => {
            warn!("FUSE ring queue {qid}: {e}");
            // The kernel may still hold the entry (its cancellation runs
            // after the ring is closed): the buffers are left mapped.
            std::mem::forget(buf);
        }
    }
}

/// Sets this thread's I/O priority to best-effort (level 4) explicitly.
fn best_effort_io() -> bool {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const BEST_EFFORT_4: libc::c_long = (2 << 13) | 4;
    // SAFETY: plain syscall on this thread.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, BEST_EFFORT_4) };
    if r != 0 {
        debug!(
            "ring thread I/O priority not set ({}): kept in the normal class",
            io::Error::last_os_error()
        );
    }
    r == 0
}

/// Puts this thread in the idle (`true`) or normal scheduling class.
fn set_idle(idle: bool) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: plain libc call on this thread.
    let ok = unsafe { libc::sched_setscheduler(0, policy, &param) } == 0;
    if !ok {
        debug!(
            "ring thread not moved to {}: {}",
            if idle { "SCHED_IDLE" } else { "SCHED_OTHER" },
            io::Error::last_os_error()
        );
    }
    ok
}

/// Whether a thread of this process may return from the idle class to the
/// normal one (it needs `CAP_SYS_NICE`, or an `RLIMIT_NICE` of at least
/// 20 minus its nice value): tried on a throwaway thread, which would be
/// stuck otherwise.
fn can_leave_idle() -> bool {
    std::thread::Builder::new()
        .name("fuser-probe".into())
        .spawn(|| set_idle(true) && set_idle(false))
        .ok()
        .and_then(|h| h.join().ok())
        .unwrap_or(false)
}

/// The idle class while committing a reply (`RingClass::IdleOnReply`).
///
/// The commit wakes the caller while this thread still runs on the
/// caller's CPU; as an idle-class thread it leaves that CPU looking idle,
/// so the caller is woken there (and runs once this thread sleeps) instead
/// of being moved to another, halted CPU. The commit and the wait for the
/// next request are one system call, so that the thread is not left
/// runnable beside the caller (which would make the load balancer move the
/// caller anyway, unless the kernel preempts the thread before it sleeps).
/// The thread waits in the idle class for at most [`IDLE_WAIT_NS`] and
/// returns to the normal class as soon as it wakes: a request that comes
/// later wakes a normal-class thread.
///
/// An idle-class thread is woken late on a CPU busy with normal tasks: the
/// caller then waits for them. The thread's run delay over each idle-class
/// wait (`/proc/thread-self/schedstat`) is judged by [`DelayJudge`].
#[derive(Debug)]
struct IdleOnReply {
    schedstat: std::fs::File,
    /// `/proc/loadavg`, for the number of runnable tasks.
    loadavg: std::fs::File,
    /// Online CPUs.
    cpus: u64,
    /// Run delay over the last idle-class wait, not yet judged.
    waited: Option<u64>,
    judge: DelayJudge,
    /// A return to the normal class failed: the idle class is not used again.
    disabled: bool,
}

/// How long a thread waits for the next request in the idle class (with
/// 1 ms, back-to-back GETXATTRs took 32 µs each instead of 12, for reasons
/// not understood; 5 ms and more kept 12).
const IDLE_WAIT_NS: u32 = 5_000_000;
const IDLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);
/// Run delay per request (a CPU migration costs a few tens of µs on a VM).
const IDLE_DELAY_PER_REQUEST_NS: u64 = 30_000;
/// Less run delay than this in a period is never reason to pause.
const IDLE_DELAY_MIN_NS: u64 = 2_000_000;
const IDLE_PAUSE_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const IDLE_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// layerfs patch 6: when a ring thread should keep to the normal class.
///
/// The run delays of idle-class waits whose request's caller waited are
/// summed over each period of 100 ms; when they exceed 30 µs per request
/// on average and 2 ms in all (a CPU busy with other work, where a move to
/// an idle CPU is what the caller needs), the thread keeps to the normal
/// class for a pause: 100 ms, doubling (up to 5 s) when it happens again
/// within 5 s of the last pause's end. An occasional delay (a pipe's reader
/// running a little) is not worth a pause. Public for tests only.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct DelayJudge {
    /// The current period: its start, requests whose callers waited, and
    /// their run delay.
    period: std::time::Instant,
    requests: u64,
    delayed_ns: u64,
    /// Normal class until then (the last pause's end).
    paused_until: Option<std::time::Instant>,
    pause: std::time::Duration,
}

impl DelayJudge {
    /// A judge whose first period starts at `now`.
    pub fn new(now: std::time::Instant) -> DelayJudge {
        DelayJudge {
            period: now,
            requests: 0,
            delayed_ns: 0,
            paused_until: None,
            pause: IDLE_PAUSE_MIN,
        }
    }

    /// Whether the idle class is paused at `now`.
    pub fn paused(&self, now: std::time::Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
    }

    /// Counts a request whose caller waited while the thread, woken for it
    /// at `now`, had been runnable for `waited_ns`; returns the pause this
    /// starts, if any.
    pub fn count(&mut self, now: std::time::Instant, waited_ns: u64) -> Option<std::time::Duration> {
        if now.saturating_duration_since(self.period) > IDLE_PERIOD {
            self.period = now;
            self.requests = 0;
            self.delayed_ns = 0;
        }
        self.requests += 1;
        self.delayed_ns += waited_ns;
        if self.delayed_ns < IDLE_DELAY_MIN_NS.max(self.requests * IDLE_DELAY_PER_REQUEST_NS) {
            return None;
        }
        // Again soon after the last pause: a longer one.
        let again = self
            .paused_until
            .is_some_and(|t| now.saturating_duration_since(t) < IDLE_PAUSE_MAX);
        self.pause = if again {
            (self.pause * 2).min(IDLE_PAUSE_MAX)
        } else {
            IDLE_PAUSE_MIN
        };
        debug!(
            "ring thread held up {} us over {} requests: normal class for {:?}",
            self.delayed_ns / 1000,
            self.requests,
            self.pause
        );
        self.paused_until = Some(now + self.pause);
        self.period = now + self.pause;
        self.requests = 0;
        self.delayed_ns = 0;
        Some(self.pause)
    }
}

impl IdleOnReply {
    fn new() -> Option<IdleOnReply> {
        let schedstat = std::fs::File::open("/proc/thread-self/schedstat")
            .map_err(|e| debug!("ring thread: no schedstat ({e}): normal class only"))
            .ok()?;
        let loadavg = std::fs::File::open("/proc/loadavg")
            .map_err(|e| debug!("ring thread: no loadavg ({e}): normal class only"))
            .ok()?;
        // SAFETY: plain libc call.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
        let s = IdleOnReply {
            schedstat,
            loadavg,
            cpus,
            waited: None,
            judge: DelayJudge::new(std::time::Instant::now()),
            disabled: false,
        };
        s.run_delay()?;
        Some(s)
    }

    /// Whether another CPU is likely idle: the runnable tasks (this thread
    /// and others) plus the caller about to be woken, this thread aside,
    /// leave a CPU free. If none is, the caller is not moved anyway, and an
    /// idle-class thread would only risk waiting behind normal tasks.
    fn other_cpu_idle(&self) -> bool {
        // "0.52 0.58 0.59 2/187 12345": runnable / all tasks.
        proc_field(&self.loadavg, 3, |f| f.split_once('/')?.0.parse::<u64>().ok())
            .is_some_and(|runnable| runnable < self.cpus)
    }

    /// This thread's time spent runnable but not running, in ns.
    fn run_delay(&self) -> Option<u64> {
        proc_field(&self.schedstat, 1, |f| f.parse().ok())
    }

    /// Runs `commit_and_wait` in the idle class unless paused.
    fn commit<T>(&mut self, commit_and_wait: impl FnOnce() -> T) -> T {
        if self.disabled
            || self.judge.paused(std::time::Instant::now())
            || !self.other_cpu_idle()
        {
            return commit_and_wait();
        }
        let before = self.run_delay();
        if before.is_none() || !set_idle(true) {
            return commit_and_wait();
        }
        let r = commit_and_wait();
        if !set_idle(false) {
            // Stuck in the idle class (the probe said it could leave, but
            // e.g. RLIMIT_NICE was lowered since): it serves on from there.
            warn!("FUSE ring thread left in the idle scheduling class");
            self.disabled = true;
            return r;
        }
        self.waited = before
            .zip(self.run_delay())
            .map(|(b, a)| a.saturating_sub(b));
        r
    }

    /// Counts the run delay of the last wait once its request is known:
    /// the caller of a release does not wait for it (and may well be what
    /// ran meanwhile).
    fn settle(&mut self, async_op: bool) {
        if let Some(waited) = self.waited.take()
            && !async_op
        {
            self.judge.count(std::time::Instant::now(), waited);
        }
    }
}

/// Field `n` (whitespace-separated) of a one-line /proc file kept open,
/// through `parse` (read on the request path: no allocation).
fn proc_field<T>(
    f: &std::fs::File,
    n: usize,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 128];
    let len = f.read_at(&mut b, 0).ok()?;
    let s = std::str::from_utf8(&b[..len]).ok()?;
    parse(s.split_ascii_whitespace().nth(n)?)
}

/// layerfs patch 6: keeps the threads of `RingClass::Idle` from starving.
///
/// A ring thread is pinned to its CPU, and in the idle class it runs only
/// when no normal task of that CPU wants to: on a CPU kept busy by other
/// work, a request would wait for it however long its caller waits. A
/// watcher thread (normal class) looks at the ring threads every 2 ms
/// while requests flow (every 20 ms once none was served for 100 ms, every
/// 200 ms after 10 s). A thread that was runnable at two looks in a row
/// without running in between (its CPU time unchanged), or that waited
/// over 1 ms since the last look at over 500 µs per run (it runs now and
/// then, between a busy CPU's normal tasks), has its CPU's ring threads
/// moved to the normal class, for 100 ms, doubling up to 5 s when it
/// happens again within 5 s of their last return (the watcher moves them
/// both ways: a starving thread cannot run to do it itself). Short
/// waits are what the class is for: a thread woken for a request its
/// caller does not wait for (a release) runs when the caller next waits.
#[derive(Debug)]
pub(crate) struct IdleGuard {
    threads: Vec<GuardedThread>,
    /// Wakes the watcher when a ring thread ends.
    ended: (Mutex<()>, Condvar),
}

/// What a ring thread shares with the watcher (a cache line of its own:
/// each thread counts its requests in it).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct GuardedThread {
    /// The queue (CPU) it serves.
    qid: usize,
    /// Its thread id; 0 until it started.
    tid: std::sync::atomic::AtomicI32,
    /// Requests served.
    served: std::sync::atomic::AtomicU64,
    /// In the idle class (as the watcher last set it).
    idle: std::sync::atomic::AtomicBool,
    ended: std::sync::atomic::AtomicBool,
}

/// Run delay since the last look that means starving: over 1 ms in all,
/// and over 500 µs per run on average.
const GUARD_WAITED_NS: u64 = 1_000_000;
const GUARD_WAIT_PER_RUN_NS: u64 = 500_000;
/// The watcher's period while requests flow, and once quiet for a while.
const GUARD_LOOKS: [(std::time::Duration, std::time::Duration); 3] = [
    (std::time::Duration::ZERO, std::time::Duration::from_millis(2)),
    (std::time::Duration::from_millis(100), std::time::Duration::from_millis(20)),
    (std::time::Duration::from_secs(10), std::time::Duration::from_millis(200)),
];

impl GuardedThread {
    /// Called by the thread once, in the idle class if `idle`.
    fn start(&self, idle: bool) {
        // SAFETY: plain syscall.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        self.idle.store(idle, Ordering::Release);
        self.tid.store(tid, Ordering::Release);
    }

    /// Called by the thread for each request it gets.
    fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// A ring thread's place in the guard; marks it ended when dropped.
struct Watched {
    guard: Arc<IdleGuard>,
    index: usize,
}

impl Watched {
    fn thread(&self) -> &GuardedThread {
        &self.guard.threads[self.index]
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.thread().ended.store(true, Ordering::Release);
        let (lock, cv) = &self.guard.ended;
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        cv.notify_all();
    }
}

/// The watcher's own notes on one ring thread.
#[derive(Debug, Default)]
struct Look {
    served: u64,
    /// CPU time at the last look, if it was runnable then.
    runnable_at: Option<u64>,
    stat: Option<std::fs::File>,
    /// Run delay (time runnable but not running) and times run, at the
    /// last look.
    delay: Option<(u64, u64)>,
    schedstat: Option<std::fs::File>,
}

/// The watcher's notes on one queue's threads.
#[derive(Debug, Default)]
struct QueuePause {
    normal_until: Option<std::time::Instant>,
    returned: Option<std::time::Instant>,
    pause: std::time::Duration,
}

impl IdleGuard {
    /// A guard for threads serving the queues `qids`, in order.
    fn new(qids: impl Iterator<Item = usize>) -> IdleGuard {
        IdleGuard {
            threads: qids
                .map(|qid| GuardedThread {
                    qid,
                    ..Default::default()
                })
                .collect(),
            ended: (Mutex::new(()), Condvar::new()),
        }
    }

    /// The watcher's loop; returns once every ring thread has ended.
    fn watch(&self) {
        let mut looks: Vec<Look> = self.threads.iter().map(|_| Look::default()).collect();
        let queues = self.threads.iter().map(|t| t.qid + 1).max().unwrap_or(0);
        let mut pauses: Vec<QueuePause> = (0..queues).map(|_| QueuePause::default()).collect();
        let mut last_served = std::time::Instant::now();
        loop {
            let quiet = last_served.elapsed();
            let period = GUARD_LOOKS
                .iter()
                .rev()
                .find(|(after, _)| quiet >= *after)
                .map_or(GUARD_LOOKS[0].1, |(_, p)| *p);
            {
                let (lock, cv) = &self.ended;
                let g = lock.lock().unwrap_or_else(|e| e.into_inner());
                if self.threads.iter().all(|t| t.ended.load(Ordering::Acquire)) {
                    return;
                }
                drop(cv.wait_timeout(g, period));
            }
            let now = std::time::Instant::now();
            let mut starved = vec![false; queues];
            for (t, l) in self.threads.iter().zip(looks.iter_mut()) {
                let tid = t.tid.load(Ordering::Acquire);
                if tid == 0 || t.ended.load(Ordering::Acquire) {
                    continue;
                }
                let served = t.served.load(Ordering::Relaxed);
                if served != l.served {
                    l.served = served;
                    last_served = now;
                }
                if !t.idle.load(Ordering::Acquire) {
                    l.runnable_at = None;
                    l.delay = None;
                    continue;
                }
                let cpu = thread_cpu_ns(tid);
                let same = cpu.is_some() && l.runnable_at == cpu;
                l.runnable_at = cpu.filter(|_| runnable(tid, &mut l.stat));
                // Not run at all since the last look, or run only now and
                // then, after long waits (an idle-class thread woken while
                // its CPU's caller keeps running waits for it a few µs at a
                // time, which is the point of the class).
                let delay = run_delay(tid, &mut l.schedstat);
                let (waited, runs) = delay
                    .zip(l.delay)
                    .map_or((0, 0), |((d, n), (d0, n0))| (d.saturating_sub(d0), n.saturating_sub(n0)));
                l.delay = delay;
                if (same && l.runnable_at.is_some())
                    || (waited > GUARD_WAITED_NS && waited / runs.max(1) > GUARD_WAIT_PER_RUN_NS)
                {
                    starved[t.qid] = true;
                }
            }
            for (qid, q) in pauses.iter_mut().enumerate() {
                if let Some(until) = q.normal_until
                    && now >= until
                {
                    q.normal_until = None;
                    q.returned = Some(now);
                    for t in self.threads.iter().filter(|t| t.qid == qid) {
                        let tid = t.tid.load(Ordering::Acquire);
                        if tid != 0 && !t.idle.load(Ordering::Acquire) && set_class(tid, true) {
                            t.idle.store(true, Ordering::Release);
                        }
                    }
                }
                if !starved[qid] {
                    continue;
                }
                // Again soon after the last return: a longer pause.
                let again = q.returned.is_some_and(|r| now.duration_since(r) < IDLE_PAUSE_MAX);
                q.pause = if again {
                    (q.pause * 2).clamp(IDLE_PAUSE_MIN, IDLE_PAUSE_MAX)
                } else {
                    IDLE_PAUSE_MIN
                };
                debug!("ring threads of CPU {qid} starved in the idle class: normal class for {:?}", q.pause);
                q.normal_until = Some(now + q.pause);
                let on_queue = self.threads.iter().zip(looks.iter_mut());
                for (t, l) in on_queue.filter(|(t, _)| t.qid == qid) {
                    let tid = t.tid.load(Ordering::Acquire);
                    if tid != 0 && t.idle.load(Ordering::Acquire) && set_class(tid, false) {
                        t.idle.store(false, Ordering::Release);
                        l.runnable_at = None;
                        l.delay = None;
                    }
                }
            }
        }
    }
}

/// CPU time of thread `tid` of this process, in ns (exact also while it
/// runs, unlike `/proc/.../schedstat`).
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    // The per-thread CPUCLOCK_SCHED clock id (MAKE_THREAD_CPUCLOCK).
    let clock = ((!tid) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into `ts`.
    let r = unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The run delay of thread `tid` of this process (ns spent runnable but
/// not running, up to its last run) and the number of times it ran, from
/// its `schedstat`, kept open in `file`.
fn run_delay(tid: i32, file: &mut Option<std::fs::File>) -> Option<(u64, u64)> {
    if file.is_none() {
        *file = std::fs::File::open(format!("/proc/self/task/{tid}/schedstat")).ok();
    }
    let f = file.as_ref()?;
    Some((
        proc_field(f, 1, |f| f.parse().ok())?,
        proc_field(f, 2, |f| f.parse().ok())?,
    ))
}

/// Whether thread `tid` of this process is runnable (state R in its
/// `stat`, kept open in `file`).
fn runnable(tid: i32, file: &mut Option<std::fs::File>) -> bool {
    use std::os::unix::fs::FileExt;
    if file.is_none() {
        *file = std::fs::File::open(format!("/proc/self/task/{tid}/stat")).ok();
    }
    let Some(f) = file else {
        return false;
    };
    let mut b = [0u8; 512];
    let Ok(n) = f.read_at(&mut b, 0) else {
        return false;
    };
    // "tid (comm) S ...": the state follows the last ')'.
    let line = &b[..n];
    line.iter()
        .rposition(|&c| c == b')')
        .and_then(|i| line.get(i + 2))
        .is_some_and(|&c| c == b'R')
}

/// Moves thread `tid` of this process to the idle (`true`) or normal class.
fn set_class(tid: i32, idle: bool) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    // SAFETY: plain libc call.
    let ok = unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0;
    if !ok {
        debug!("ring thread {tid} not moved to policy {policy}: {}", io::Error::last_os_error());
    }
    ok
}

/// Consecutive unexpected errors on one entry before its thread gives up.
const MAX_ENTRY_ERRORS: u32 = 8;

fn serve_ring<FS: Filesystem>(
    qid: usize,
    mut ring: Ring,
    buf: &EntryBuf,
    ch: &Channel,
    se: &SessionEventLoop<FS>,
    lend: &mut Option<IdleOnReply>,
    guarded: Option<&GuardedThread>,
) -> io::Result<()> {
    let dev = types::Fd(ch.as_fd().as_raw_fd());
    let iov: Box<[libc::iovec; 2]> = Box::new([
        libc::iovec {
            iov_base: buf.header().cast(),
            iov_len: HEADER_SZ,
        },
        libc::iovec {
            iov_base: buf.payload().cast(),
            iov_len: buf.payload,
        },
    ]);
    let mut register = opcode::UringCmd80::new(dev, CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(iov.as_ptr() as u64))
        .build()
        .user_data(0);
    // sqe->len: the number of iovecs (no builder method for it).
    // SAFETY: Entry128 is repr(C) over io_uring_sqe; `len` is at byte 24.
    unsafe {
        let p = (&mut register as *mut squeue::Entry128).cast::<u8>();
        p.add(24).cast::<u32>().write_unaligned(2);
    }
    let submit = |ring: &mut Ring, e: &squeue::Entry128| -> io::Result<()> {
        // SAFETY: the iovecs (read at submission) and the buffers (kept
        // mapped while the kernel may use them, see `serve`) outlive it.
        unsafe { ring.submission().push(e) }
            .map_err(|_| io::Error::other("ring submission queue full"))?;
        loop {
            match ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.map(drop),
            }
        }
    };
    if let Err(e) = submit(&mut ring, &register) {
        // This queue stays empty: without a fallback every request would
        // wait for it. (A fresh ring: this one may still hold the REGISTER.)
        fall_back(ch, None);
        return Err(e);
    }
    let slot = Arc::new((
        Mutex::new(Slot {
            header: buf.header(),
            payload: buf.payload(),
            payload_cap: buf.payload,
            replied: false,
            waiting: false,
        }),
        Condvar::new(),
    ));
    let sender = UringSender {
        slot: slot.clone(),
        payload_cap: buf.payload,
        ch: ch.sender(),
    };
    let mut request: Vec<u64> = Vec::new();
    let mut served_any = false;
    let mut errors = 0;
    // A commit pushed at the end of the last round, submitted with the wait.
    let mut committing = false;
    let ext_arg = ring.params().is_feature_ext_arg();
    // Kernels that know IORING_ENTER_NO_IOWAIT (6.15+) are asked not to count
    // the wait for the next request as I/O wait (else every mount shows its
    // CPUs "some" 100% I/O-pressured in /proc/pressure/io while it idles).
    let mut no_iowait = true;
    let idle_wait_ts = types::Timespec::new().nsec(IDLE_WAIT_NS);
    let idle_wait = types::SubmitArgs::new().timespec(&idle_wait_ts);
    loop {
        let waited = match lend {
            Some(l) if committing && ext_arg => {
                // The idle class for the commit and the first moments of the
                // wait only: a request that comes later wakes a normal-class
                // thread (an idle-class one would wait behind any normal
                // task of its CPU).
                let r = l.commit(|| ring.submitter().submit_with_args(1, &idle_wait));
                if ring.completion().is_empty() {
                    // Timed out: no caller waited for this thread.
                    l.waited = None;
                }
                match r {
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
                    r => r,
                }
            }
            _ => wait_one(&mut ring, &mut no_iowait),
        };
        committing = false;
        match waited {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        let res = cqe.result();
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            match -res {
                libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED | libc::ENODEV => {
                    debug!("FUSE ring queue {qid} ends: {e}");
                    return Ok(());
                }
                _ if !served_any => {
                    // The kernel refused the registration before it got as
                    // far as giving up the rings itself (e.g. an LSM denied
                    // the command): every request would wait for this queue.
                    fall_back(ch, None);
                    return Err(e);
                }
                _ if errors < MAX_ENTRY_ERRORS => {
                    // The entry is lost to the kernel (e.g. a commit it did
                    // not accept): register it again.
                    errors += 1;
                    warn!("FUSE ring queue {qid}: {e}; registering the entry again");
                    submit(&mut ring, &register)?;
                    continue;
                }
                _ => return Err(e),
            }
        }
        served_any = true;
        errors = 0;
        if let Some(g) = guarded {
            g.served();
        }
        if let Some(l) = lend.as_mut() {
            // SAFETY: the opcode of the request now in the header buffer.
            let opcode = unsafe { buf.header().add(IN_OUT + 4).cast::<u32>().read_unaligned() };
            l.settle(matches!(
                abi::fuse_opcode::try_from(opcode),
                Ok(abi::fuse_opcode::FUSE_RELEASE | abi::fuse_opcode::FUSE_RELEASEDIR)
            ));
        }
        // SAFETY: the kernel wrote the request into the entry buffers and
        // waits for our commit; nothing else touches them now.
        let commit_id = unsafe {
            handle_request(buf, &mut request, &slot, &sender, se);
            buf.header()
                .add(ENT_IN_OUT + 8)
                .cast::<u64>()
                .read_unaligned()
        };
        let commit = opcode::UringCmd80::new(dev, CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(commit_id, qid))
            .build()
            .user_data(0);
        // SAFETY: as in `submit`; submitted by the next wait.
        unsafe { ring.submission().push(&commit) }
            .map_err(|_| io::Error::other("ring submission queue full"))?;
        committing = true;
    }
}

/// Rebuilds the request `/dev/fuse` would have delivered, dispatches it,
/// and waits until its reply is in the entry.
unsafe fn handle_request<FS: Filesystem>(
    buf: &EntryBuf,
    request: &mut Vec<u64>,
    slot: &Arc<(Mutex<Slot>, Condvar)>,
    sender: &UringSender,
    se: &SessionEventLoop<FS>,
) {
    let header = buf.header();
    // SAFETY (whole fn): offsets within the header and payload buffers,
    // sizes checked against the kernel's numbers.
    unsafe {
        let payload_sz = header.add(ENT_IN_OUT + 16).cast::<u32>().read_unaligned() as usize;
        let mut in_h = [0u8; IN_HEADER_SZ];
        std::ptr::copy_nonoverlapping(header.add(IN_OUT), in_h.as_mut_ptr(), IN_HEADER_SZ);
        let len = u32::from_ne_bytes(in_h[0..4].try_into().unwrap()) as usize;
        let unique = u64::from_ne_bytes(in_h[8..16].try_into().unwrap());
        {
            let mut s = slot.0.lock().unwrap_or_else(|e| e.into_inner());
            s.replied = false;
        }
        let arg0 = len
            .checked_sub(IN_HEADER_SZ + payload_sz)
            .filter(|a| *a <= OP_IN_SZ && payload_sz <= buf.payload);
        let Some(arg0) = arg0 else {
            warn!("malformed ring request (len {len}, payload {payload_sz}): answering EIO");
            header_reply(sender, unique, libc::EIO);
            return;
        };
        // 8-byte aligned, as the parser requires of the in-header.
        if request.len() < len.div_ceil(8) {
            request.resize(len.div_ceil(8), 0);
        }
        let start = request.as_mut_ptr().cast::<u8>();
        std::ptr::copy_nonoverlapping(in_h.as_ptr(), start, IN_HEADER_SZ);
        std::ptr::copy_nonoverlapping(header.add(OP_IN), start.add(IN_HEADER_SZ), arg0);
        std::ptr::copy_nonoverlapping(buf.payload(), start.add(IN_HEADER_SZ + arg0), payload_sz);
        let data = std::slice::from_raw_parts(start, len);
        let opcode = u32::from_ne_bytes(in_h[4..8].try_into().unwrap());
        let dispatched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match RequestWithSender::new_ring(sender.clone(), data) {
                Some(req) => req.dispatch(se),
                None => header_reply(sender, unique, libc::EIO),
            }
        }));
        let replied = slot.0.lock().unwrap_or_else(|e| e.into_inner()).replied;
        if !replied {
            if dispatched.is_err() {
                // The caller gets EIO, as on /dev/fuse (the reply a
                // panicking handler dropped could not be committed).
                header_reply(sender, unique, libc::EIO);
            } else if opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET {
                // No reply to a forget; the entry still has to be
                // committed to get the next request.
                header_reply(sender, unique, 0);
            }
        }
        // A reply sent later from another thread is waited for here (the
        // entry can only be committed once it holds the reply).
        let (lock, cv) = &**slot;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !s.replied {
            s.waiting = true;
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting = false;
    }
}

/// `IORING_ENTER_GETEVENTS`: wait for completions.
const ENTER_GETEVENTS: u32 = 1 << 0;
/// `IORING_ENTER_NO_IOWAIT` (Linux 6.15+): the wait is not I/O wait.
const ENTER_NO_IOWAIT: u32 = 1 << 7;

/// Submits what the ring holds and waits for one completion, as
/// `submit_and_wait(1)`, asking the kernel not to count the wait as I/O wait
/// while `no_iowait` holds (cleared at the first EINVAL of an older kernel).
fn wait_one(ring: &mut Ring, no_iowait: &mut bool) -> io::Result<usize> {
    if *no_iowait {
        let pending = ring.submission().len() as u32;
        let flags = ENTER_GETEVENTS | ENTER_NO_IOWAIT;
        // SAFETY: no argument is passed; the entries pushed are valid until
        // their completions (as for submit_and_wait).
        match unsafe { ring.submitter().enter::<libc::sigset_t>(pending, 1, flags, None) } {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *no_iowait = false,
            r => return r,
        }
    }
    ring.submit_and_wait(1)
}

const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

/// Replies with a bare out-header (`error` an errno, or 0).
fn header_reply(sender: &UringSender, unique: u64, error: i32) {
    let mut h = [0u8; OUT_HEADER_SZ];
    h[0..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-error).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    if let Err(e) = sender.send(&[io::IoSlice::new(&h)]) {
        warn!("ring reply: {e}");
    }
}
