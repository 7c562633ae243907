//! Load: 4 concurrent writer threads (create, write, append, rename, unlink,
//! link, mkdir/rmdir, readdir, stat, read — each on its own names, in its own
//! directory and in one directory shared by all, many of them lower files
//! that get copied up or whited out) and 2 reader threads scanning
//! everything, on one layerfs mount, for a bounded time. Then:
//!
//! * every writer's model (names, contents, link counts) matches the mount,
//!   a remount and a kernel overlay over the same upper;
//! * no EIO (no unexpected errno at all) in any thread;
//! * no deadlock: a watchdog fails the test with the stuck operation and the
//!   daemon's thread states if one operation takes over `LOAD_WATCHDOG_SECS`
//!   (default 60), and kills the daemon so the test cannot hang;
//! * the daemon's open fds and RSS after the run (dentry/inode caches
//!   dropped, so the kernel has sent its FORGETs) are within bounds of the
//!   numbers before it.
//!
//! A second test loops mmap-then-close, mkdir/rmdir (also over whiteouts),
//! failed renames and failed opens, and checks the daemon's fd count before
//! and after: nothing may leak.
//!
//! A third test races opens against renames and unlinks in one directory:
//! readers may see ENOENT, nothing else.
//!
//! Environment: `LOAD_SECS` (default 10; 60 for the full run), `LOAD_SEED`,
//! `LOAD_WATCHDOG_SECS`, `LEAK_LOOPS` (default 300), `RACE_SECS` (default
//! 8). For narrowing a failure down: `LOAD_WRITERS` (1–4), `LOAD_READERS`,
//! `LOAD_LINKS=0` (no hard links), `LOAD_TRACE=PREFIX` (each writer's
//! operations, one per line, to PREFIX.wN; with one writer and no readers a
//! run is deterministic for its seed and the trace can be replayed), and
//! `LOAD_BACKEND=kernel` (the same load on the kernel overlay: checks the
//! test's model). Run as root:
//! `LOAD_SECS=60 cargo test --release --test load -- --nocapture`.

mod reliability_support;

use reliability_support::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Writers that the lower layer has files for (at most `LOAD_WRITERS`).
const WRITERS: usize = 4;

/// Writer and reader threads: `LOAD_WRITERS` (1..=4, default 4) and
/// `LOAD_READERS` (default 2), for narrowing a failure down.
fn writers() -> usize {
    (env_u64("LOAD_WRITERS", WRITERS as u64) as usize).clamp(1, WRITERS)
}
fn readers() -> usize {
    env_u64("LOAD_READERS", 2) as usize
}
const LOWER_PER_WORKER: usize = 12;

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn build_lower(lower: &Path) {
    fs::create_dir_all(lower.join("shared")).unwrap();
    for w in 0..WRITERS {
        let own = lower.join(format!("w{w}"));
        fs::create_dir_all(&own).unwrap();
        for k in 0..LOWER_PER_WORKER {
            fs::write(own.join(format!("l{k}")), lower_content(w, k, "own")).unwrap();
            fs::write(
                lower.join(format!("shared/l{w}_{k}")),
                lower_content(w, k, "shared"),
            )
            .unwrap();
        }
    }
}

fn lower_content(w: usize, k: usize, which: &str) -> Vec<u8> {
    let mut v = format!("lower {which} file of worker {w} number {k}\n").into_bytes();
    v.extend_from_slice(&pattern((w * 100 + k) as u64, 1000 + k * 700));
    v
}

/// What one writer owns: names (relative to the mount) → object id, and
/// the content of each object.
#[derive(Default, Clone)]
struct Model {
    names: BTreeMap<String, u64>,
    data: HashMap<u64, Vec<u8>>,
    next: u64,
}

impl Model {
    fn add(&mut self, name: String, content: Vec<u8>) {
        self.next += 1;
        self.names.insert(name, self.next);
        self.data.insert(self.next, content);
    }
    fn nlink(&self, id: u64) -> usize {
        self.names.values().filter(|v| **v == id).count()
    }
    fn remove(&mut self, name: &str) {
        if let Some(id) = self.names.remove(name)
            && self.nlink(id) == 0
        {
            self.data.remove(&id);
        }
    }
    fn in_dir(&self, dir: &str) -> BTreeSet<String> {
        self.names
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{dir}/")).map(|s| s.to_string()))
            .collect()
    }
}

/// Does the name in `dir` belong to writer `w`?
fn owned(w: usize, dir: &str, name: &str) -> bool {
    if dir == "shared" {
        name.starts_with(&format!("t{w}_")) || name.starts_with(&format!("l{w}_"))
    } else {
        dir == format!("w{w}")
    }
}

struct Status {
    ops: AtomicU64,
    /// ms since start when the current op began (0 = idle).
    op_start: AtomicU64,
    current: Mutex<String>,
    errors: Mutex<Vec<String>>,
}

impl Status {
    fn new() -> Status {
        Status {
            ops: AtomicU64::new(0),
            op_start: AtomicU64::new(0),
            current: Mutex::new(String::new()),
            errors: Mutex::new(Vec::new()),
        }
    }
}

struct Ctx {
    root: PathBuf,
    start: Instant,
    stop: AtomicBool,
}

impl Ctx {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }
}

fn writer(w: usize, ctx: Arc<Ctx>, st: Arc<Status>, seed: u64) -> Model {
    let mut rng = Rng::new(seed ^ ((w as u64 + 1) * 0x1234_5678));
    // LOAD_LINKS=0: no hard links (to look past hard-link bugs).
    let links = env_u64("LOAD_LINKS", 1) != 0;
    let mut m = Model::default();
    for k in 0..LOWER_PER_WORKER {
        m.add(format!("w{w}/l{k}"), lower_content(w, k, "own"));
        m.add(format!("shared/l{w}_{k}"), lower_content(w, k, "shared"));
    }
    let dirs = [format!("w{w}"), "shared".to_string()];
    let mut seq = 0u64;
    let mut history: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    // LOAD_TRACE=PREFIX: every operation of writer w goes to PREFIX.wN.
    let mut trace = std::env::var("LOAD_TRACE")
        .ok()
        .map(|p| fs::File::create(format!("{p}.w{w}")).expect("LOAD_TRACE file"));
    let root = ctx.root.clone();
    let p = |rel: &str| root.join(rel);
    while !ctx.stop.load(Ordering::Relaxed) {
        let names: Vec<String> = m.names.keys().cloned().collect();
        let pick = |rng: &mut Rng| names[rng.below(names.len() as u64) as usize].clone();
        let r = rng.below(100);
        seq += 1;
        let newname = |rng: &mut Rng| format!("{}/t{w}_{seq}", dirs[rng.below(2) as usize]);
        let desc;
        st.op_start.store(ctx.now_ms(), Ordering::SeqCst);
        let res: Result<(), String> = if names.is_empty() || (r < 15 && names.len() < 300) {
            let n = newname(&mut rng);
            let len = rng.below(32 * 1024) as usize;
            let data = rng.bytes(len);
            desc = format!("create {n} ({len} bytes)");
            *st.current.lock().unwrap() = desc.clone();
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(p(&n))
                .and_then(|mut f| f.write_all(&data))
            {
                Ok(()) => {
                    m.add(n, data);
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 30 {
            let n = pick(&mut rng);
            let id = m.names[&n];
            let cur = m.data[&id].len();
            let off = rng.below(cur as u64 + 4096) as usize;
            let len = 1 + rng.below(16 * 1024) as usize;
            let data = rng.bytes(len);
            desc = format!("write {n} {}+{}", off, data.len());
            *st.current.lock().unwrap() = desc.clone();
            match fs::OpenOptions::new()
                .write(true)
                .open(p(&n))
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(off as u64))?;
                    f.write_all(&data)
                }) {
                Ok(()) => {
                    let c = m.data.get_mut(&id).unwrap();
                    if c.len() < off + data.len() {
                        c.resize(off + data.len(), 0);
                    }
                    c[off..off + data.len()].copy_from_slice(&data);
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 38 {
            let n = pick(&mut rng);
            let id = m.names[&n];
            let len = 1 + rng.below(4096) as usize;
            let data = rng.bytes(len);
            desc = format!("append {n} {}", data.len());
            *st.current.lock().unwrap() = desc.clone();
            match fs::OpenOptions::new()
                .append(true)
                .open(p(&n))
                .and_then(|mut f| f.write_all(&data))
            {
                Ok(()) => {
                    m.data.get_mut(&id).unwrap().extend_from_slice(&data);
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 53 {
            let a = pick(&mut rng);
            // Sometimes over another owned name (replace), else a new name.
            let b = if rng.chance(25) {
                pick(&mut rng)
            } else {
                newname(&mut rng)
            };
            desc = format!("rename {a} -> {b}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::rename(p(&a), p(&b)) {
                Ok(()) => {
                    let ida = m.names[&a];
                    if m.names.get(&b) != Some(&ida) {
                        m.remove(&b);
                        m.names.remove(&a);
                        m.names.insert(b, ida);
                    }
                    // rename of two links of one object: POSIX no-op
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 63 {
            let a = pick(&mut rng);
            desc = format!("unlink {a}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::remove_file(p(&a)) {
                Ok(()) => {
                    m.remove(&a);
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 70 && links {
            let a = pick(&mut rng);
            let b = newname(&mut rng);
            desc = format!("link {a} -> {b}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::hard_link(p(&a), p(&b)) {
                Ok(()) => {
                    let id = m.names[&a];
                    m.names.insert(b, id);
                    Ok(())
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 78 {
            let dir = dirs[rng.below(2) as usize].clone();
            desc = format!("readdir {dir}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::read_dir(p(&dir)).and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<Vec<String>, _>>()
            }) {
                Ok(list) => {
                    let mine: Vec<&String> = list.iter().filter(|n| owned(w, &dir, n)).collect();
                    let set: BTreeSet<String> = mine.iter().map(|s| s.to_string()).collect();
                    let want = m.in_dir(&dir);
                    if set.len() != mine.len() {
                        let mut seen = BTreeSet::new();
                        let twice: Vec<&String> = mine
                            .iter()
                            .filter(|n| !seen.insert(n.as_str()))
                            .copied()
                            .collect();
                        Err(format!(
                            "{desc}: names listed twice: {twice:?} ({} entries in the listing)",
                            list.len()
                        ))
                    } else if set != want {
                        let missing: Vec<_> = want.difference(&set).collect();
                        let extra: Vec<_> = set.difference(&want).collect();
                        Err(format!("{desc}: missing {missing:?}, unexpected {extra:?}"))
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 86 {
            let a = pick(&mut rng);
            let id = m.names[&a];
            desc = format!("stat {a}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::symlink_metadata(p(&a)) {
                Ok(md) => {
                    if md.len() != m.data[&id].len() as u64 {
                        Err(format!(
                            "{desc}: size {}, expected {}",
                            md.len(),
                            m.data[&id].len()
                        ))
                    } else if md.nlink() != m.nlink(id) as u64 {
                        Err(format!(
                            "{desc}: nlink {}, expected {}",
                            md.nlink(),
                            m.nlink(id)
                        ))
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 94 {
            let a = pick(&mut rng);
            let id = m.names[&a];
            desc = format!("read {a}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::read(p(&a)) {
                Ok(d) if d == m.data[&id] => Ok(()),
                Ok(d) => Err(format!(
                    "{desc}: {} bytes, expected {}; first difference at {}",
                    d.len(),
                    m.data[&id].len(),
                    d.iter()
                        .zip(&m.data[&id])
                        .position(|(x, y)| x != y)
                        .unwrap_or(d.len().min(m.data[&id].len()))
                )),
                Err(e) => Err(format!("{desc}: {e}")),
            }
        } else if r < 97 {
            let d = format!("w{w}/d{seq}");
            desc = format!("mkdir+rmdir {d}");
            *st.current.lock().unwrap() = desc.clone();
            fs::create_dir(p(&d))
                .and_then(|_| fs::write(p(&format!("{d}/f")), b"f"))
                .and_then(|_| fs::remove_file(p(&format!("{d}/f"))))
                .and_then(|_| fs::remove_dir(p(&d)))
                .map_err(|e| format!("{desc}: {e}"))
        } else {
            // A rename that must fail.
            let a = format!("w{w}/missing{seq}");
            desc = format!("failing rename {a}");
            *st.current.lock().unwrap() = desc.clone();
            match fs::rename(p(&a), p(&format!("w{w}/x{seq}"))) {
                Err(e) if errno_of(&e) == libc::ENOENT => Ok(()),
                Err(e) => Err(format!("{desc}: {e} (expected ENOENT)")),
                Ok(()) => Err(format!("{desc}: succeeded")),
            }
        };
        st.op_start.store(0, Ordering::SeqCst);
        st.ops.fetch_add(1, Ordering::Relaxed);
        if history.len() == 40 {
            history.pop_front();
        }
        if let Some(t) = trace.as_mut() {
            let _ = writeln!(t, "{desc}{}", if res.is_err() { "  # FAILED" } else { "" });
        }
        history.push_back(desc);
        if let Err(e) = res {
            let hist: Vec<String> = history.iter().map(|h| format!("      {h}")).collect();
            let touched: Vec<&String> = history
                .iter()
                .filter(|h| {
                    e.split(':').next().is_some_and(|first| {
                        first
                            .split_whitespace()
                            .skip(1)
                            .any(|tok| tok != "->" && h.contains(tok))
                    })
                })
                .collect();
            st.errors.lock().unwrap().push(format!(
                "writer {w}: {e}\n    its last {} operations (oldest first):\n{}\n    of which on the same names: {touched:?}",
                hist.len(),
                hist.join("\n")
            ));
            // The model may be off now: stop this writer.
            break;
        }
    }
    m
}

fn reader(i: usize, ctx: Arc<Ctx>, st: Arc<Status>, seed: u64) {
    let mut rng = Rng::new(seed ^ 0xeade_0000 ^ i as u64);
    let mut dirs = vec!["shared".to_string(), "".to_string()];
    dirs.extend((0..WRITERS).map(|w| format!("w{w}")));
    let mut buf = vec![0u8; 64 * 1024];
    while !ctx.stop.load(Ordering::Relaxed) {
        let dir = &dirs[rng.below(dirs.len() as u64) as usize];
        st.op_start.store(ctx.now_ms(), Ordering::SeqCst);
        *st.current.lock().unwrap() = format!("scan {dir}");
        let tolerate = |e: &std::io::Error| errno_of(e) == libc::ENOENT;
        match fs::read_dir(ctx.root.join(dir)) {
            Ok(rd) => {
                for e in rd {
                    let e = match e {
                        Ok(e) => e,
                        Err(e) => {
                            st.errors
                                .lock()
                                .unwrap()
                                .push(format!("reader {i}: readdir {dir}: {e}"));
                            break;
                        }
                    };
                    let path = e.path();
                    match fs::symlink_metadata(&path) {
                        Ok(md) if md.is_file() && rng.chance(30) => match fs::File::open(&path) {
                            Ok(mut f) => {
                                if let Err(e) = f.read(&mut buf) {
                                    st.errors
                                        .lock()
                                        .unwrap()
                                        .push(format!("reader {i}: read {}: {e}", path.display()));
                                }
                            }
                            Err(e) if tolerate(&e) => {}
                            Err(e) => st
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("reader {i}: open {}: {e}", path.display())),
                        },
                        Ok(_) => {}
                        Err(e) if tolerate(&e) => {}
                        Err(e) => st
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("reader {i}: lstat {}: {e}", path.display())),
                    }
                }
            }
            Err(e) => st
                .errors
                .lock()
                .unwrap()
                .push(format!("reader {i}: opendir {dir}: {e}")),
        }
        st.op_start.store(0, Ordering::SeqCst);
        st.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Check the writers' models against the tree at `root`.
fn verify(label: &str, root: &Path, models: &[Model]) -> Vec<String> {
    let mut out = Vec::new();
    for (w, m) in models.iter().enumerate() {
        for dir in [format!("w{w}"), "shared".to_string()] {
            let list: BTreeSet<String> = dir_names(&root.join(&dir))
                .into_iter()
                .filter(|n| owned(w, &dir, n))
                .collect();
            let want = m.in_dir(&dir);
            if list != want {
                out.push(format!(
                    "{label}: writer {w} {dir}: missing {:?}, unexpected {:?}",
                    want.difference(&list).collect::<Vec<_>>(),
                    list.difference(&want).collect::<Vec<_>>()
                ));
            }
        }
        for (name, id) in &m.names {
            match fs::read(root.join(name)) {
                Ok(d) if d == m.data[id] => {}
                Ok(d) => out.push(format!(
                    "{label}: {name}: {} bytes, expected {}",
                    d.len(),
                    m.data[id].len()
                )),
                Err(e) => out.push(format!("{label}: {name}: {e}")),
            }
            if let Ok(md) = fs::symlink_metadata(root.join(name))
                && md.nlink() != m.nlink(*id) as u64
            {
                out.push(format!(
                    "{label}: {name}: nlink {}, expected {}",
                    md.nlink(),
                    m.nlink(*id)
                ));
            }
        }
    }
    out
}

struct Usage {
    fds: usize,
    rss_kb: u64,
    threads: usize,
}

fn usage(pid: i32) -> Usage {
    drop_caches();
    thread::sleep(Duration::from_millis(300));
    Usage {
        fds: fd_count(pid),
        rss_kb: status_kb(pid, "VmRSS"),
        threads: threads(pid),
    }
}

fn fd_diff(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> String {
    let mut out = Vec::new();
    for (k, n) in after {
        let b = before.get(k).copied().unwrap_or(0);
        if *n > b {
            out.push(format!("{k} +{}", n - b));
        }
    }
    out.truncate(20);
    out.join(", ")
}

#[test]
fn load_concurrent_writers_and_readers() {
    let secs = env_u64("LOAD_SECS", 10);
    let (nw, nr) = (writers(), readers());
    let seed = seed_from_env("LOAD_SEED");
    let watchdog = Duration::from_secs(env_u64("LOAD_WATCHDOG_SECS", 60));
    let d = Dirs::new("load");
    let lower = d.dir("lower");
    build_lower(&lower);
    let (upper, work) = (d.dir("upper"), d.dir("work"));
    let lowers = vec![lower.clone()];
    // LOAD_BACKEND=kernel: the same load on the kernel overlay (checks the
    // test's own model).
    let kernel_backend = std::env::var("LOAD_BACKEND").as_deref() == Ok("kernel");
    let (m, km) = if kernel_backend {
        let k = KernelOverlay::mount(&lowers, &upper, &work, &d.path("mnt"));
        (None, Some(k))
    } else {
        (
            Some(Layerfs::mount(&lowers, &upper, &work, &d.path("mnt"))),
            None,
        )
    };
    let root = match (&m, &km) {
        (Some(m), _) => m.path().to_path_buf(),
        (_, Some(k)) => k.path().to_path_buf(),
        _ => unreachable!(),
    };
    let pid = m.as_ref().map(|m| m.pid).unwrap_or(0);
    let _ = walk(&root);
    let before = usage(pid);
    let before_fds = fd_targets(pid);
    eprintln!(
        "load: seed {seed} (LOAD_SEED), {secs} s, {nw} writers + {nr} readers, daemon {pid}: before: {} fds, RSS {} kB, {} threads",
        before.fds, before.rss_kb, before.threads
    );

    let ctx = Arc::new(Ctx {
        root: root.clone(),
        start: Instant::now(),
        stop: AtomicBool::new(false),
    });
    let stats: Vec<Arc<Status>> = (0..nw + nr).map(|_| Arc::new(Status::new())).collect();
    let mut wh = Vec::new();
    for (w, st) in stats.iter().take(nw).enumerate() {
        let (c, s) = (ctx.clone(), st.clone());
        wh.push(thread::spawn(move || writer(w, c, s, seed)));
    }
    let mut rh = Vec::new();
    for r in 0..nr {
        let (c, s) = (ctx.clone(), stats[nw + r].clone());
        rh.push(thread::spawn(move || reader(r, c, s, seed)));
    }
    let mut max_rss = 0;
    let mut hang = None;
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        thread::sleep(Duration::from_millis(100));
        max_rss = max_rss.max(status_kb(pid, "VmRSS"));
        if Instant::now() >= end {
            ctx.stop.store(true, Ordering::SeqCst);
        }
        let now = ctx.now_ms();
        for (i, s) in stats.iter().enumerate() {
            let t = s.op_start.load(Ordering::SeqCst);
            if t != 0 && now.saturating_sub(t) > watchdog.as_millis() as u64 {
                hang = Some(format!(
                    "DEADLOCK/HANG: thread {i} ({}) stuck for {:.1} s in `{}`; daemon {pid} threads:\n{}",
                    if i < nw { "writer" } else { "reader" },
                    (now - t) as f64 / 1000.0,
                    s.current.lock().unwrap(),
                    describe_threads(pid)
                ));
            }
        }
        if hang.is_some() {
            ctx.stop.store(true, Ordering::SeqCst);
            // Unblock everything: the stuck syscalls fail with ENOTCONN.
            if let Some(m) = &m {
                m.kill9();
            }
            break;
        }
        if ctx.stop.load(Ordering::SeqCst)
            && wh.iter().all(|h| h.is_finished())
            && rh.iter().all(|h| h.is_finished())
        {
            break;
        }
        // Writers that stopped on an error: stop everything early.
        if wh.iter().any(|h| h.is_finished()) && !ctx.stop.load(Ordering::SeqCst) {
            ctx.stop.store(true, Ordering::SeqCst);
        }
    }
    let models: Vec<Model> = wh
        .into_iter()
        .map(|h| h.join().expect("writer panicked"))
        .collect();
    for h in rh {
        h.join().expect("reader panicked");
    }
    if let Some(h) = hang {
        if let Some(m) = m {
            m.lazy_unmount();
        }
        panic!("{h}");
    }
    let elapsed = ctx.start.elapsed();
    let counts: Vec<u64> = stats.iter().map(|s| s.ops.load(Ordering::SeqCst)).collect();
    let total: u64 = counts.iter().sum();
    let mut problems: Vec<String> = stats
        .iter()
        .flat_map(|s| s.errors.lock().unwrap().clone())
        .collect();
    let eio = problems
        .iter()
        .filter(|p| p.contains("os error 5)"))
        .count();
    eprintln!(
        "load: {total} operations in {:.1} s (per thread {counts:?}); {} errors ({eio} EIO)",
        elapsed.as_secs_f64(),
        problems.len()
    );

    problems.extend(verify("mount", &root, &models));
    if let Some(k) = km {
        k.unmount();
        assert!(
            problems.is_empty(),
            "load test (kernel backend):\n  {}",
            problems.join("\n  ")
        );
        return;
    }
    let m = m.unwrap();
    let after = usage(pid);
    let after_fds = fd_targets(pid);
    eprintln!(
        "load: daemon after: {} fds (before {}), RSS {} kB (before {}, max during run {}), {} threads",
        after.fds, before.fds, after.rss_kb, before.rss_kb, max_rss, after.threads
    );
    let fd_slack = 16;
    if after.fds > before.fds + fd_slack {
        problems.push(format!(
            "daemon fds grew from {} to {} (caches dropped): {}",
            before.fds,
            after.fds,
            fd_diff(&before_fds, &after_fds)
        ));
    }
    let rss_slack = 64 * 1024;
    if after.rss_kb > before.rss_kb + rss_slack {
        problems.push(format!(
            "daemon RSS grew from {} kB to {} kB (> {rss_slack} kB)",
            before.rss_kb, after.rss_kb
        ));
    }
    m.unmount().expect("clean unmount");
    let m = Layerfs::mount(&lowers, &upper, &work, &d.path("mnt2"));
    problems.extend(verify("layerfs remount", m.path(), &models));
    m.unmount().expect("clean unmount");
    let k = KernelOverlay::mount(&lowers, &upper, &work, &d.path("kmnt"));
    problems.extend(verify("kernel overlay over the upper", k.path(), &models));
    k.unmount();
    assert!(
        problems.is_empty(),
        "load test:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// fd leaks: mmap-then-close, mkdir/rmdir, failed renames, failed opens
// ---------------------------------------------------------------------------

fn expect_err(what: &str, r: std::io::Result<()>, want: i32, problems: &mut Vec<String>) {
    match r {
        Err(e) if errno_of(&e) == want => {}
        Err(e) => problems.push(format!("{what}: {e}, expected {}", errno_name(want))),
        Ok(()) => problems.push(format!("{what}: succeeded, expected {}", errno_name(want))),
    }
}

#[test]
fn load_no_fd_leaks_in_loops() {
    let loops = env_u64("LEAK_LOOPS", 300) as usize;
    let d = Dirs::new("leaks");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("dir/full/sub")).unwrap();
    fs::write(lower.join("dir/full/sub/x"), b"x").unwrap();
    fs::write(lower.join("dir/lowerfile"), pattern(1, 100_000)).unwrap();
    fs::write(lower.join("dir/cow"), pattern(2, 50_000)).unwrap();
    for k in 0..loops {
        fs::create_dir_all(lower.join(format!("dir/ld{k}"))).unwrap();
    }
    let (upper, work) = (d.dir("upper"), d.dir("work"));
    let m = Layerfs::mount(std::slice::from_ref(&lower), &upper, &work, &d.path("mnt"));
    let pid = m.pid;
    let root = m.path().to_path_buf();
    fs::write(root.join("dir/upperfile"), pattern(3, 70_000)).unwrap();
    fs::create_dir(root.join("dir/udir")).unwrap();
    fs::write(root.join("dir/udir/f"), b"f").unwrap();
    let _ = walk(&root);
    let _wd = m.watchdog(120, "fd-leak loops");
    let base = usage(pid);
    let base_fds = fd_targets(pid);
    let mut problems = Vec::new();
    let mut report = Vec::new();
    let mut check = |phase: &str, problems: &mut Vec<String>| {
        let u = usage(pid);
        report.push(format!("{phase}: {} fds, RSS {} kB", u.fds, u.rss_kb));
        if u.fds > base.fds + 8 {
            problems.push(format!(
                "after {phase}: daemon has {} fds, {} before the loops: {}",
                u.fds,
                base.fds,
                fd_diff(&base_fds, &fd_targets(pid))
            ));
        }
    };

    // mmap, close the fd, use the mapping, munmap (lower, copied-up, upper).
    for i in 0..loops {
        let (name, write) = match i % 3 {
            0 => ("dir/lowerfile", false),
            1 => ("dir/cow", true),
            _ => ("dir/upperfile", true),
        };
        let f = fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(root.join(name))
            .unwrap();
        let len = 8192;
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        // SAFETY: mapping an open file; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {name}: {}", errno_name(errno()));
        drop(f);
        // SAFETY: the mapping is 8192 bytes long, files are larger.
        unsafe {
            let b = p.cast::<u8>();
            let v = std::ptr::read_volatile(b.add(100));
            if write {
                std::ptr::write_volatile(b.add(200), v.wrapping_add(1));
                libc::msync(p, len, libc::MS_SYNC);
            }
            libc::munmap(p, len);
        }
    }
    check("mmap-then-close loop", &mut problems);

    // mkdir/rmdir: new dirs, lower dirs (whiteouts), mkdir over whiteouts.
    for i in 0..loops {
        let n = root.join(format!("dir/new{i}"));
        fs::create_dir(&n).unwrap();
        fs::remove_dir(&n).unwrap();
        let l = root.join(format!("dir/ld{i}"));
        fs::remove_dir(&l).unwrap();
        fs::create_dir(&l).unwrap();
        fs::remove_dir(&l).unwrap();
    }
    check("mkdir/rmdir loop", &mut problems);

    // Renames that fail, and opens that fail.
    for i in 0..loops {
        let p = |s: &str| root.join(s);
        expect_err(
            "rename missing",
            fs::rename(p(&format!("dir/missing{i}")), p("dir/x")),
            libc::ENOENT,
            &mut problems,
        );
        expect_err(
            "rename dir over non-empty dir",
            fs::rename(p("dir/udir"), p("dir/full")),
            libc::ENOTEMPTY,
            &mut problems,
        );
        expect_err(
            "rename dir into itself",
            fs::rename(p("dir/full"), p("dir/full/sub/y")),
            libc::EINVAL,
            &mut problems,
        );
        expect_err(
            "rename file over dir",
            fs::rename(p("dir/lowerfile"), p("dir/udir")),
            libc::EISDIR,
            &mut problems,
        );
        expect_err(
            "rename dir over file",
            fs::rename(p("dir/udir"), p("dir/upperfile")),
            libc::ENOTDIR,
            &mut problems,
        );
        expect_err(
            "open O_EXCL existing",
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p("dir/lowerfile"))
                .map(|_| ()),
            libc::EEXIST,
            &mut problems,
        );
        expect_err(
            "open missing",
            fs::File::open(p(&format!("dir/nope{i}"))).map(|_| ()),
            libc::ENOENT,
            &mut problems,
        );
        expect_err(
            "rmdir non-empty lower dir",
            fs::remove_dir(p("dir/full")),
            libc::ENOTEMPTY,
            &mut problems,
        );
        if problems.len() > 20 {
            break;
        }
    }
    check("failed renames/opens loop", &mut problems);

    // Hard links: of new files and of lower files (copy-up), then both
    // names removed; renames over and of linked names.
    for i in 0..loops {
        let p = |s: String| root.join(s);
        let r = (|| -> std::io::Result<()> {
            fs::write(p(format!("dir/h{i}")), b"h")?;
            fs::hard_link(p(format!("dir/h{i}")), p(format!("dir/h{i}b")))?;
            let _ = fs::read_dir(root.join("dir"))?.count();
            fs::rename(p(format!("dir/h{i}")), p(format!("dir/h{i}c")))?;
            fs::read(p(format!("dir/h{i}b")))?;
            fs::read(p(format!("dir/h{i}c")))?;
            fs::remove_file(p(format!("dir/h{i}b")))?;
            fs::remove_file(p(format!("dir/h{i}c")))?;
            Ok(())
        })();
        if let Err(e) = r {
            problems.push(format!("hard-link loop iteration {i}: {e}"));
            break;
        }
    }
    check("hard-link loop", &mut problems);

    // Open/close of lower, copied-up and upper files; readdir loops.
    for _ in 0..loops {
        for n in [
            "dir/lowerfile",
            "dir/cow",
            "dir/upperfile",
            "dir/full/sub/x",
        ] {
            let mut f = fs::File::open(root.join(n)).unwrap();
            let mut b = [0u8; 16];
            let _ = f.read(&mut b).unwrap();
        }
        let _ = fs::read_dir(root.join("dir")).unwrap().count();
    }
    check("open/close/readdir loop", &mut problems);

    eprintln!(
        "leaks: daemon {pid}, {loops} iterations per loop; before: {} fds, RSS {} kB; {}",
        base.fds,
        base.rss_kb,
        report.join("; ")
    );
    m.unmount().expect("clean unmount");
    assert!(
        problems.is_empty(),
        "fd leaks / errors:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Lookups and opens racing renames and unlinks in one directory
// ---------------------------------------------------------------------------

/// Two threads create, rename, rewrite and unlink files in a directory (a
/// copied-up lower dir) while two others list it and open and read every
/// entry. A reader may get ENOENT (the name went away); any other errno
/// (EIO in particular) is a failure. The kernel overlay gives none.
#[test]
fn load_open_racing_rename_unlink_gives_only_enoent() {
    let secs = env_u64("RACE_SECS", 8);
    let d = Dirs::new("race");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("s")).unwrap();
    fs::write(lower.join("s/lowerfile"), b"lower").unwrap();
    let m = Layerfs::mount(&[lower], &d.dir("upper"), &d.dir("work"), &d.path("mnt"));
    let dir = m.path().join("s");
    let _wd = m.watchdog(secs + 60, "open/rename race");
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let note = |errors: &Arc<Mutex<BTreeMap<String, u64>>>, what: String| {
        *errors.lock().unwrap().entry(what).or_insert(0) += 1;
    };
    let mut hs = Vec::new();
    for w in 0..2 {
        let (dir, stop, errors) = (dir.clone(), stop.clone(), errors.clone());
        hs.push(thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let a = dir.join(format!("w{w}_{i}"));
                let b = dir.join(format!("w{w}_{i}r"));
                let steps: [(&str, &dyn Fn() -> std::io::Result<()>); 4] = [
                    ("create+write", &|| fs::write(&a, vec![b'x'; 5000])),
                    ("rename", &|| fs::rename(&a, &b)),
                    ("open O_WRONLY+write", &|| {
                        fs::OpenOptions::new()
                            .write(true)
                            .open(&b)
                            .and_then(|mut f| f.write_all(&[b'y'; 100]))
                    }),
                    ("unlink", &|| fs::remove_file(&b)),
                ];
                let mut failed = false;
                for (what, f) in steps {
                    if let Err(e) = f() {
                        note(
                            &errors,
                            format!("writer {what}: {}", errno_name(errno_of(&e))),
                        );
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
            }
            i
        }));
    }
    for _ in 0..2 {
        let (dir, stop, errors) = (dir.clone(), stop.clone(), errors.clone());
        hs.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let names = dir_names(&dir);
                for name in names {
                    n += 1;
                    match fs::File::open(dir.join(&name)).and_then(|mut f| {
                        let mut v = Vec::new();
                        f.read_to_end(&mut v).map(|_| ())
                    }) {
                        Ok(()) => {}
                        Err(e) if errno_of(&e) == libc::ENOENT => {}
                        Err(e) => note(
                            &errors,
                            format!(
                                "reader open+read of a racing name: {}",
                                errno_name(errno_of(&e))
                            ),
                        ),
                    }
                }
            }
            n
        }));
    }
    thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::SeqCst);
    let counts: Vec<u64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let errors = errors.lock().unwrap().clone();
    eprintln!("race: {secs} s, iterations per thread {counts:?}, errors {errors:?}");
    m.unmount().expect("clean unmount");
    assert!(errors.is_empty(), "errors other than ENOENT: {errors:?}");
}

// ---------------------------------------------------------------------------
// Hard links while the kernel forgets inodes: no deadlock
// ---------------------------------------------------------------------------

/// Three threads link, rename over, read, list and unlink hard-linked files
/// while a fourth drops the dentry/inode caches every 10 ms (so the kernel
/// sends FORGETs concurrently with LOOKUPs of linked names). Every thread
/// must keep making progress: no operation may block for
/// `LINK_STALL_SECS` (default 20; the run lasts `LINK_SECS`, default 15); on a stall the daemon's threads are
/// printed and the daemon killed.
#[test]
fn load_hard_links_with_forgets_no_deadlock() {
    let secs = env_u64("LINK_SECS", 15);
    let stall = Duration::from_secs(env_u64("LINK_STALL_SECS", 20));
    let d = Dirs::new("linkforget");
    let lower = d.dir("lower");
    let m = Layerfs::mount(&[lower], &d.dir("upper"), &d.dir("work"), &d.path("mnt"));
    let stop = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let errors: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut hs = Vec::new();
    for t in 0..3 {
        let (root, stop, progress, errors) = (
            m.path().to_path_buf(),
            stop.clone(),
            progress.clone(),
            errors.clone(),
        );
        hs.push(thread::spawn(move || {
            let dir = root.join(format!("t{t}"));
            if let Err(e) = fs::create_dir(&dir) {
                errors.lock().unwrap().push(format!("mkdir: {e}"));
                return;
            }
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (a, b, c) = (
                    dir.join(format!("x{i}")),
                    dir.join(format!("y{i}")),
                    dir.join(format!("z{i}")),
                );
                let r = (|| -> std::io::Result<()> {
                    fs::write(&a, b"A")?;
                    fs::write(&c, b"C")?;
                    fs::hard_link(&a, &b)?;
                    fs::rename(&b, &c)?;
                    if fs::read(&c)? != b"A" || fs::read(&a)? != b"A" {
                        return Err(std::io::Error::other(
                            "wrong content after link + rename over",
                        ));
                    }
                    let _ = fs::read_dir(&dir)?.count();
                    // Lookups of another thread's (linked) names.
                    let other = root.join(format!("t{}", (t + 1) % 3));
                    for n in dir_names(&other) {
                        let _ = fs::symlink_metadata(other.join(n));
                    }
                    fs::remove_file(&a)?;
                    fs::remove_file(&c)?;
                    Ok(())
                })();
                if let Err(e) = r {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("thread {t} iteration {i}: {e}"));
                    if errno_of(&e) == libc::ENOTCONN || errno_of(&e) == libc::ECONNABORTED {
                        return;
                    }
                }
                progress[t].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    {
        let (stop, progress) = (stop.clone(), progress.clone());
        hs.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                drop_caches_now();
                progress[3].fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut last: Vec<u64> = vec![0; 4];
    let mut last_change = Instant::now();
    let mut stalled = None;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(200));
        let now: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        if now[..3] != last[..3] {
            last_change = Instant::now();
            last = now;
        } else if last_change.elapsed() > stall {
            stalled = Some(format!(
                "DEADLOCK: no link/rename/lookup progress for {stall:?} (iterations per thread {last:?}); daemon {} threads:\n{}",
                m.pid,
                describe_threads(m.pid)
            ));
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    // The threads must also finish: a deadlock in the last seconds blocks
    // them in a syscall.
    let deadline = Instant::now() + stall;
    while stalled.is_none() && !hs.iter().all(|h| h.is_finished()) {
        if Instant::now() > deadline {
            let now: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
            stalled = Some(format!(
                "DEADLOCK: threads still blocked {stall:?} after the end of the run (iterations per thread {now:?}); daemon {} threads:\n{}",
                m.pid,
                describe_threads(m.pid)
            ));
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if stalled.is_some() {
        m.kill9();
    }
    for h in hs {
        let _ = h.join();
    }
    let counts: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
    eprintln!("link/forget: {secs} s, iterations per thread {counts:?}");
    if let Some(s) = stalled {
        m.lazy_unmount();
        panic!("{s}");
    }
    m.unmount().expect("clean unmount");
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors: {errors:?}");
}

// ---------------------------------------------------------------------------
// readdir while other threads list the same directory
// ---------------------------------------------------------------------------

/// One thread creates, renames and unlinks files in a directory and lists
/// it after every change: the listing must be exactly its names, each once.
/// Two other threads only list the directory and stat its entries at the
/// same time (a shared, kernel-cached listing must not leak between them).
#[test]
fn load_readdir_while_others_list_is_exact() {
    let secs = env_u64("READDIR_SECS", 8);
    let d = Dirs::new("readdir");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("s")).unwrap();
    for i in 0..20 {
        fs::write(lower.join(format!("s/lower{i}")), b"l").unwrap();
    }
    let m = Layerfs::mount(&[lower], &d.dir("upper"), &d.dir("work"), &d.path("mnt"));
    let _wd = m.watchdog(secs + 60, "readdir race");
    let dir = m.path().join("s");
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (dir, stop) = (dir.clone(), stop.clone());
        readers.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for name in dir_names(&dir) {
                    let _ = fs::symlink_metadata(dir.join(name));
                }
                n += 1;
            }
            n
        }));
    }
    let mut names: BTreeSet<String> = (0..20).map(|i| format!("lower{i}")).collect();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut problem = None;
    let mut i = 0u64;
    while Instant::now() < end && problem.is_none() {
        i += 1;
        let n = format!("f{i}");
        let r = fs::write(dir.join(&n), b"x").and_then(|_| {
            names.insert(n.clone());
            if i.is_multiple_of(3) {
                let old = names.iter().next().unwrap().clone();
                let new = format!("r{i}");
                fs::rename(dir.join(&old), dir.join(&new))?;
                names.remove(&old);
                names.insert(new);
            }
            if i.is_multiple_of(5) {
                let old = names.iter().next_back().unwrap().clone();
                fs::remove_file(dir.join(&old))?;
                names.remove(&old);
            }
            Ok(())
        });
        if let Err(e) = r {
            problem = Some(format!("iteration {i}: {e}"));
            break;
        }
        let list: Vec<String> = match fs::read_dir(&dir).and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<String>, _>>()
        }) {
            Ok(l) => l,
            Err(e) => {
                problem = Some(format!("iteration {i}: readdir: {e}"));
                break;
            }
        };
        let set: BTreeSet<String> = list.iter().cloned().collect();
        if set.len() != list.len() || set != names {
            let mut seen = BTreeSet::new();
            let twice: Vec<&String> = list.iter().filter(|n| !seen.insert(n.as_str())).collect();
            problem = Some(format!(
                "iteration {i}: listing of {} entries: listed twice {twice:?}, missing {:?}, unexpected {:?}",
                list.len(),
                names.difference(&set).collect::<Vec<_>>(),
                set.difference(&names).collect::<Vec<_>>()
            ));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let scans: Vec<u64> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("readdir race: {i} changes+listings, reader scans {scans:?}");
    m.unmount().expect("clean unmount");
    assert!(problem.is_none(), "{}", problem.unwrap());
}

/// A directory stream read with libc (`readdir`, `telldir`, `seekdir`).
struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(p: &Path) -> DirStream {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; the result is checked.
        let d = unsafe { libc::opendir(c.as_ptr()) };
        assert!(!d.is_null(), "opendir {}", p.display());
        DirStream(d)
    }

    /// The next entry: its name and `d_ino`.
    fn entry(&mut self) -> Option<(String, u64)> {
        // SAFETY: an open stream; the entry is read before the next call.
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            return None;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        // SAFETY: as above.
        Some((name.to_string_lossy().into_owned(), unsafe { (*e).d_ino }))
    }

    /// The next name other than `.` and `..`.
    fn next(&mut self) -> Option<String> {
        std::iter::from_fn(|| self.entry())
            .map(|(name, _)| name)
            .find(|name| name != "." && name != "..")
    }

    /// The `d_ino` of `..`.
    fn dotdot_ino(&mut self) -> Option<u64> {
        std::iter::from_fn(|| self.entry()).find_map(|(name, ino)| (name == "..").then_some(ino))
    }

    fn tell(&self) -> libc::c_long {
        // SAFETY: an open stream.
        unsafe { libc::telldir(self.0) }
    }

    fn seek(&self, pos: libc::c_long) {
        // SAFETY: an open stream and a position telldir gave.
        unsafe { libc::seekdir(self.0, pos) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: opened by opendir, closed once.
        unsafe { libc::closedir(self.0) };
    }
}

/// A listing read while names are removed stays exact: a position from
/// `telldir` still resumes after the same name, and a stream read in
/// batches whose names are unlinked in between (what `rm -rf` does) gives
/// every name once and leaves the directory empty. Half of the names are in
/// the lower layer (whiteouts on removal), half in the upper.
#[test]
fn listing_while_unlinking_and_seeking_is_exact() {
    let d = Dirs::new("listing");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("big")).unwrap();
    let n = 1500;
    for i in 0..n {
        fs::write(lower.join(format!("big/l{i:04}")), b"l").unwrap();
    }
    let (upper, work) = (d.dir("upper"), d.dir("work"));
    let m = Layerfs::mount(&[lower], &upper, &work, &d.path("mnt"));
    let _wd = m.watchdog(120, "listing while unlinking");
    let dir = m.path().join("big");
    for i in 0..n {
        fs::write(dir.join(format!("u{i:04}")), b"u").unwrap();
    }

    // telldir/seekdir across removals.
    let mut s = DirStream::open(&dir);
    let mut names = Vec::new();
    let mut after = Vec::new();
    for _ in 0..100 {
        names.push(s.next().expect("100 names"));
        after.push(s.tell());
    }
    for name in &names[50..60] {
        fs::remove_file(dir.join(name)).unwrap();
    }
    s.seek(after[45]);
    let resumed: Vec<String> = (0..10).map(|_| s.next().expect("a name")).collect();
    let mut want: Vec<String> = names[46..50].to_vec();
    want.extend_from_slice(&names[60..66]);
    assert_eq!(
        resumed, want,
        "seekdir after removals must resume after the same name"
    );
    drop(s);

    // rm -rf style: batches read, then unlinked, from one stream.
    let mut left: BTreeSet<String> = dir_names(&dir).into_iter().collect();
    assert_eq!(left.len(), 2 * n - 10);
    let mut s = DirStream::open(&dir);
    let mut seen = BTreeSet::new();
    loop {
        let batch: Vec<String> = (0..200).map_while(|_| s.next()).collect();
        if batch.is_empty() {
            break;
        }
        for name in batch {
            assert!(seen.insert(name.clone()), "{name} listed twice");
            assert!(left.remove(&name), "{name} listed but not present");
            fs::remove_file(dir.join(&name)).unwrap();
        }
    }
    drop(s);
    assert!(
        left.is_empty(),
        "never listed: {:?}",
        left.iter().take(10).collect::<Vec<_>>()
    );
    assert_eq!(dir_names(&dir), Vec::<String>::new());
    // The lower names left whiteouts, hard links of one shared whiteout
    // (as the kernel makes them), until the directory itself went.
    fs::remove_dir(&dir).unwrap();
    assert!(!dir.exists());
    let wh = fs::symlink_metadata(upper.join("big")).map(|m| m.file_type().is_char_device());
    assert!(matches!(wh, Ok(true)), "big must be a whiteout now: {wh:?}");
    assert!(
        fs::symlink_metadata(upper.join("big")).unwrap().nlink() > 1,
        "whiteouts are links of a shared one"
    );
    m.unmount().expect("clean unmount");
    let left: Vec<_> = fs::read_dir(work.join("work")).unwrap().flatten().collect();
    assert!(left.is_empty(), "work dir not cleaned at unmount: {left:?}");
}

/// A name of a hard-linked upper file (a node per name) replaced by a
/// rename, or unlinked, leads to what is there next, also while the kernel
/// has not yet forgotten the old name's node (its FORGET comes later, in
/// the background). Found by the load test: `rename(lower file, name)` then
/// `rename(name, other)` failed with ENOENT now and then, the second rename
/// taking the replaced file's node for the name's; a reader listing and
/// stating the directories makes the kernel look names up meanwhile.
#[test]
fn replaced_hard_link_name_leads_to_the_new_file() {
    let n = env_u64("REPLACED_NAMES", 600) as usize;
    let d = Dirs::new("replaced-name");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("s")).unwrap();
    fs::create_dir_all(lower.join("w")).unwrap();
    for i in 0..n {
        fs::write(lower.join(format!("s/l{i}")), format!("lower {i}")).unwrap();
    }
    let m = Layerfs::mount(&[lower], &d.dir("upper"), &d.dir("work"), &d.path("mnt"));
    let _wd = m.watchdog(120, "replaced hard-link names");
    let root = m.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (root, stop) = (root.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for dir in ["w", "s"] {
                    for e in fs::read_dir(root.join(dir)).into_iter().flatten().flatten() {
                        let _ = fs::symlink_metadata(e.path());
                    }
                }
            }
        })
    };
    let mut problems = Vec::new();
    for i in 0..n {
        let t = root.join(format!("w/t{i}"));
        let steps: [(&str, &dyn Fn() -> std::io::Result<()>); 6] = [
            ("create", &|| fs::write(&t, b"upper")),
            ("link", &|| fs::hard_link(&t, root.join(format!("s/h{i}")))),
            ("rename lower file over it", &|| {
                fs::rename(root.join(format!("s/l{i}")), &t)
            }),
            ("rename it on", &|| {
                fs::rename(&t, root.join(format!("w/u{i}")))
            }),
            ("create again", &|| fs::write(&t, b"again")),
            ("unlink", &|| fs::remove_file(&t)),
        ];
        for (what, f) in steps {
            if let Err(e) = f() {
                problems.push(format!("{i}: {what}: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    for i in (0..n).step_by(97) {
        let got = fs::read(root.join(format!("w/u{i}"))).unwrap_or_default();
        if got != format!("lower {i}").as_bytes() {
            problems.push(format!("w/u{i} holds {:?}", String::from_utf8_lossy(&got)));
        }
    }
    m.unmount().expect("clean unmount");
    assert!(
        problems.is_empty(),
        "{} problems: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}

/// A directory moved to another parent lists the new parent as `..`, also
/// when its listing was cached before the move.
#[test]
fn moved_directory_lists_its_new_parent() {
    let d = Dirs::new("moved-dotdot");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("a/d")).unwrap();
    fs::create_dir_all(lower.join("b")).unwrap();
    fs::write(lower.join("a/d/f"), b"f").unwrap();
    let m = Layerfs::mount(&[lower], &d.dir("upper"), &d.dir("work"), &d.path("mnt"));
    let _wd = m.watchdog(60, "moved directory");
    let root = m.path();
    // A directory made in the upper can be renamed (a lower one is EXDEV).
    fs::create_dir(root.join("a/e")).unwrap();
    fs::write(root.join("a/e/g"), b"g").unwrap();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    for _ in 0..2 {
        let dd = DirStream::open(&root.join("a/e")).dotdot_ino();
        assert_eq!(dd, Some(ino(&root.join("a"))));
    }
    fs::rename(root.join("a/e"), root.join("b/e")).unwrap();
    let dd = DirStream::open(&root.join("b/e")).dotdot_ino();
    assert_eq!(
        dd,
        Some(ino(&root.join("b"))),
        "`..` of the moved directory"
    );
    assert_eq!(dir_names(&root.join("b/e")), vec!["g"]);
    m.unmount().expect("clean unmount");
}

/// With `timeout=0` nothing is cached by the kernel: a name added to a
/// layer behind the mount's back shows in the next listing and lookup.
#[test]
fn timeout_zero_lists_every_time() {
    let d = Dirs::new("timeout0");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("d")).unwrap();
    fs::write(lower.join("d/a"), b"a").unwrap();
    let m = Layerfs::try_mount(
        std::slice::from_ref(&lower),
        &d.dir("upper"),
        &d.dir("work"),
        &d.path("mnt"),
        Some("timeout=0"),
    )
    .unwrap();
    let dir = m.path().join("d");
    assert_eq!(dir_names(&dir), vec!["a"]);
    assert!(!dir.join("b").exists());
    fs::write(lower.join("d/b"), b"b").unwrap();
    assert_eq!(dir_names(&dir), vec!["a", "b"]);
    assert_eq!(fs::read(dir.join("b")).unwrap(), b"b");
    m.unmount().expect("clean unmount");
}
