//! Crash safety: `kill -9` the layerfs daemon at random points while it
//! copies up a large lower file that is being appended to, removes a lower
//! tree (`rm -rf`), creates whiteouts (and files and opaque dirs over them)
//! and renames files and directories; then `umount -l` the dead mount,
//! remount layerfs over the same upper and work dir and check that
//!
//! * the merged view is a state a correct overlay could show: every
//!   acknowledged operation done, the one in flight either fully done or not
//!   at all, nothing else changed (no partial or missing file, no temporary
//!   file visible, no rename showing both or neither name);
//! * the work dir's `work/` is empty after the remount;
//! * a kernel overlay mounted over the same upper shows the same tree.
//!
//! And: after a clean unmount (daemon in the foreground, exit status 0),
//! everything written and fsync'ed is in the upper dir.
//!
//! Kill points: the scenario is first run once without a kill to measure its
//! duration T (and to check the model against the result); iteration i of n
//! then kills after a random delay in [T·i/n, T·(i+1)/n).
//!
//! Environment: `CRASH_ITERS` (kills per scenario, default 4), `CRASH_SEED`
//! (default: from the clock; printed), `CRASH_BIG_MIB` (size of the large
//! lower file, default 200). Run as root:
//! `cargo test --release --test crash -- --nocapture --test-threads=1`.

mod reliability_support;

use reliability_support::*;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

type View = BTreeMap<String, Node>;

/// Errors a syscall gets once the daemon is dead: over FUSE-over-io-uring
/// a request the kernel was handing to a ring thread as it died ends with
/// ECANCELED (the ring's task is gone) instead of ENOTCONN/ECONNABORTED.
fn daemon_gone(e: i32) -> bool {
    e == libc::ENOTCONN || e == libc::ECONNABORTED || e == libc::ECANCELED
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn iters() -> u64 {
    env_u64("CRASH_ITERS", 4)
}

/// Join a worker, failing if it does not finish within `limit` (a syscall
/// hung on a dead mount).
fn join_within<T: Send + 'static>(h: thread::JoinHandle<T>, limit: Duration, what: &str) -> T {
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let r = h.join();
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(limit).is_err() {
        panic!("{what}: worker still blocked {limit:?} after the daemon was killed (hung syscall)");
    }
    match waiter.join().unwrap() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// After a kill: lazily unmount, remount the same upper/work, check the work
/// dir, walk the view; then mount the kernel overlay over the same dirs and
/// compare. Returns the layerfs view and a list of problems.
fn remount_and_compare(
    dead: Layerfs,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    d: &Dirs,
    tag: &str,
) -> (View, Vec<String>) {
    let mut problems = Vec::new();
    dead.lazy_unmount();
    let leftovers = dir_names(&work.join("work"));
    let m = Layerfs::try_mount(lowers, upper, work, &d.path(&format!("re-{tag}")), None)
        .unwrap_or_else(|e| panic!("{tag}: remount after kill -9 failed: {e}"));
    let after = dir_names(&work.join("work"));
    if !after.is_empty() {
        problems.push(format!(
            "work dir not emptied on remount: {}/work holds {after:?}",
            work.display()
        ));
    }
    let (view, errs) = walk(m.path());
    for e in errs {
        problems.push(format!("layerfs remount: {e}"));
    }
    if let Err(e) = m.unmount() {
        problems.push(format!("unmount after check: {e}"));
    }
    let k = KernelOverlay::mount(lowers, upper, work, &d.path(&format!("k-{tag}")));
    let (kview, kerrs) = walk(k.path());
    k.unmount();
    for e in kerrs {
        problems.push(format!("kernel overlay: {e}"));
    }
    for l in diff_views("layerfs", &view, "kernel", &kview) {
        problems.push(format!("kernel overlay over the same upper disagrees: {l}"));
    }
    if !leftovers.is_empty() {
        eprintln!(
            "  {tag}: {} leftover(s) in work/ before remount (cleaned)",
            leftovers.len()
        );
    }
    (view, problems)
}

// ===========================================================================
// Scripted scenarios: a list of operations, a model of the view.
// ===========================================================================

#[derive(Clone, Debug)]
enum FsOp {
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    /// Create (O_EXCL) a file with `pattern(tag, len)`.
    Create(String, u64, usize),
    Mkdir(String),
    /// Open a file O_WRONLY (copy-up) and overwrite its first bytes.
    Overwrite(String, u64, usize),
}

impl FsOp {
    fn exec(&self, root: &Path) -> Result<(), i32> {
        let p = |s: &String| root.join(s);
        let r = match self {
            FsOp::Unlink(a) => fs::remove_file(p(a)),
            FsOp::Rmdir(a) => fs::remove_dir(p(a)),
            FsOp::Rename(a, b) => fs::rename(p(a), p(b)),
            FsOp::Create(a, tag, len) => fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(p(a))
                .and_then(|mut f| f.write_all(&pattern(*tag, *len))),
            FsOp::Mkdir(a) => fs::create_dir(p(a)),
            FsOp::Overwrite(a, tag, len) => fs::OpenOptions::new()
                .write(true)
                .open(p(a))
                .and_then(|mut f| f.write_all(&pattern(*tag, *len))),
        };
        r.map_err(|e| io_errno(&e))
    }

    /// Apply to a model of the view (only for an operation that succeeded).
    fn apply(&self, m: &mut View) {
        match self {
            FsOp::Unlink(a) | FsOp::Rmdir(a) => {
                m.remove(a);
            }
            FsOp::Rename(a, b) => {
                let pre = format!("{a}/");
                let moved: Vec<(String, Node)> = m
                    .iter()
                    .filter(|(k, _)| *k == a || k.starts_with(&pre))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // Replacing an (empty) dir or a file.
                let bpre = format!("{b}/");
                m.retain(|k, _| k != b && !k.starts_with(&bpre));
                for (k, _) in &moved {
                    m.remove(k);
                }
                for (k, v) in moved {
                    let nk = format!("{b}{}", &k[a.len()..]);
                    m.insert(nk, v);
                }
            }
            FsOp::Create(a, tag, len) => {
                m.insert(a.clone(), file_node(&pattern(*tag, *len)));
            }
            FsOp::Mkdir(a) => {
                m.insert(a.clone(), Node::Dir);
            }
            FsOp::Overwrite(a, tag, len) => {
                // Only used on files whose content the model knows as bytes.
                let old = m.get(a).cloned();
                if let Some(Node::File { .. }) = old {
                    // Recomputed by the scenario (see OVERWRITE_BASE).
                    let mut data = overwrite_base(a);
                    let new = pattern(*tag, *len);
                    if data.len() < new.len() {
                        data.resize(new.len(), 0);
                    }
                    data[..new.len()].copy_from_slice(&new);
                    m.insert(a.clone(), file_node(&data));
                }
            }
        }
    }
}

fn file_node(data: &[u8]) -> Node {
    let mut h = FNV_INIT;
    hash_bytes(&mut h, data);
    Node::File {
        size: data.len() as u64,
        hash: h,
    }
}

/// Content of lower files that scenarios overwrite: derived from the name.
fn overwrite_base(rel: &str) -> Vec<u8> {
    let tag = rel
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    pattern(tag, 64 * 1024 + (tag % 5000) as usize)
}

struct Script {
    name: &'static str,
    /// Builds the lower layers (topmost first) in the given dirs.
    build: fn(&[PathBuf]),
    nlowers: usize,
    ops: fn() -> Vec<FsOp>,
}

/// Result of running the ops until the first failure.
#[derive(Default)]
struct Progress {
    /// Results of the operations that returned.
    results: Vec<Result<(), i32>>,
    /// Index of the operation in flight when the daemon died (if any).
    inflight: Option<usize>,
}

fn run_ops(root: &Path, ops: &[FsOp], stop_on_gone: bool) -> Progress {
    let mut p = Progress::default();
    for (i, op) in ops.iter().enumerate() {
        match op.exec(root) {
            Err(e) if stop_on_gone && daemon_gone(e) => {
                p.inflight = Some(i);
                return p;
            }
            r => p.results.push(r),
        }
    }
    p
}

fn model_after(initial: &View, ops: &[FsOp], results: &[Result<(), i32>]) -> View {
    let mut m = initial.clone();
    for (op, r) in ops.iter().zip(results) {
        if r.is_ok() {
            op.apply(&mut m);
        }
    }
    m
}

fn run_script(s: &Script) {
    let seed = seed_from_env("CRASH_SEED");
    let mut rng = Rng::new(seed);
    let n = iters();
    eprintln!("crash {}: seed {seed} (CRASH_SEED), {n} kills", s.name);
    let d = Dirs::new(&format!("crash-{}", s.name));
    let lowers: Vec<PathBuf> = (0..s.nlowers)
        .map(|i| d.dir(&format!("lower{i}")))
        .collect();
    (s.build)(&lowers);
    let ops = (s.ops)();

    // The initial view, as the kernel shows it.
    let (initial, errs) = {
        let k = KernelOverlay::mount(
            &lowers,
            &d.dir("u-init"),
            &d.dir("w-init"),
            &d.path("k-init"),
        );
        let v = walk(k.path());
        k.unmount();
        v
    };
    assert!(errs.is_empty(), "{errs:?}");

    // Calibration run (no kill): duration, deterministic results, model check.
    let (cu, cw) = (d.dir("u-cal"), d.dir("w-cal"));
    let m = Layerfs::mount(&lowers, &cu, &cw, &d.path("m-cal"));
    let t0 = Instant::now();
    let cal = run_ops(m.path(), &ops, false);
    let total = t0.elapsed();
    let (view, errs) = walk(m.path());
    m.unmount().expect("calibration unmount");
    assert!(errs.is_empty(), "calibration walk: {errs:?}");
    let failed: Vec<String> = ops
        .iter()
        .zip(&cal.results)
        .filter_map(|(o, r)| r.err().map(|e| format!("{o:?}: {}", errno_name(e))))
        .collect();
    eprintln!(
        "  calibration: {} ops in {:.3} s; {} failed{}",
        ops.len(),
        total.as_secs_f64(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {}", failed.join("; "))
        }
    );
    let want = model_after(&initial, &ops, &cal.results);
    let diff = diff_views("model", &want, "layerfs", &view);
    assert!(
        diff.is_empty(),
        "{}: without any kill, layerfs's view differs from the model:\n  {}",
        s.name,
        diff.join("\n  ")
    );
    // The same ops on the kernel overlay give the same results.
    {
        let k = KernelOverlay::mount(
            &lowers,
            &d.dir("u-kcal"),
            &d.dir("w-kcal"),
            &d.path("k-cal"),
        );
        let kres = run_ops(k.path(), &ops, false);
        k.unmount();
        let diffs: Vec<String> = ops
            .iter()
            .zip(cal.results.iter().zip(&kres.results))
            .filter(|(_, (a, b))| a != b)
            .map(|(o, (a, b))| format!("{o:?}: layerfs {a:?}, kernel {b:?}"))
            .collect();
        if !diffs.is_empty() {
            eprintln!(
                "  note: results differ from the kernel overlay: {}",
                diffs.join("; ")
            );
        }
    }

    let mut problems = Vec::new();
    let mut inflight_hits = 0;
    for i in 0..n {
        let tag = format!("{i}");
        let (u, w) = (d.dir(&format!("u{i}")), d.dir(&format!("w{i}")));
        let m = Layerfs::mount(&lowers, &u, &w, &d.path(&format!("m{i}")));
        let span = total.as_secs_f64().max(0.002);
        let delay = span * (i as f64 + (rng.below(1000) as f64) / 1000.0) / n as f64;
        let root = m.path().to_path_buf();
        let ops2 = ops.clone();
        let h = thread::spawn(move || run_ops(&root, &ops2, true));
        thread::sleep(Duration::from_secs_f64(delay));
        m.kill9();
        let prog = join_within(h, Duration::from_secs(60), s.name);
        let (view, mut probs) = remount_and_compare(m, &lowers, &u, &w, &d, &tag);
        // Errors other than "daemon gone" must be the calibration's.
        for (j, r) in prog.results.iter().enumerate() {
            if *r != cal.results[j] {
                probs.push(format!(
                    "op {j} {:?}: {r:?} (without a kill: {:?})",
                    ops[j], cal.results[j]
                ));
            }
        }
        let before = model_after(&initial, &ops, &prog.results);
        let acked = prog.results.len();
        let ok = match prog.inflight {
            None => diff_views("expected", &before, "layerfs", &view).is_empty(),
            Some(j) => {
                inflight_hits += 1;
                let mut after = before.clone();
                if cal.results[j].is_ok() {
                    ops[j].apply(&mut after);
                }
                let mut candidates = vec![before.clone(), after];
                if let FsOp::Create(a, ..) = &ops[j] {
                    // open(O_CREAT) returned, the write did not: empty file.
                    let mut e = before.clone();
                    e.insert(a.clone(), file_node(&[]));
                    candidates.push(e);
                }
                candidates
                    .iter()
                    .any(|c| diff_views("expected", c, "layerfs", &view).is_empty())
            }
        };
        eprintln!(
            "  kill {i}: after {:.1} ms, {acked}/{} ops acknowledged, in flight: {}",
            delay * 1000.0,
            ops.len(),
            prog.inflight
                .map(|j| format!("{:?}", ops[j]))
                .unwrap_or("none".into())
        );
        if !ok {
            let mut msg = format!(
                "kill {i} (after {:.1} ms; {acked} ops acknowledged; in flight {:?}): view is neither the state before nor after the op in flight:\n",
                delay * 1000.0,
                prog.inflight.map(|j| &ops[j])
            );
            for l in diff_views("expected(before in-flight op)", &before, "layerfs", &view)
                .into_iter()
                .take(20)
            {
                msg.push_str(&format!("      {l}\n"));
            }
            probs.push(msg);
        }
        for p in probs {
            problems.push(format!("{} kill {i}: {p}", s.name));
        }
    }
    eprintln!(
        "  {}: {inflight_hits}/{n} kills hit an operation in flight",
        s.name
    );
    assert!(
        problems.is_empty(),
        "crash {}:\n{}",
        s.name,
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------
// rm -rf of a lower tree
// ---------------------------------------------------------------------------

fn build_tree(lowers: &[PathBuf]) {
    // Two lowers with overlapping dirs: merged directories, files in both.
    for a in 0..5 {
        for b in 0..5 {
            for (li, l) in lowers.iter().enumerate() {
                let dir = l.join(format!("tree/d{a}/e{b}"));
                fs::create_dir_all(&dir).unwrap();
                for f in 0..4 {
                    if (a + b + f) % 2 == li {
                        let len = 100 + (a * 977 + b * 131 + f * 1013) % 20_000;
                        fs::write(
                            dir.join(format!("f{f}")),
                            pattern((a * 100 + b * 10 + f) as u64, len),
                        )
                        .unwrap();
                    }
                }
            }
        }
        symlink("../elsewhere", lowers[0].join(format!("tree/d{a}/link"))).unwrap();
        fs::create_dir_all(lowers[1].join(format!("tree/d{a}/empty"))).unwrap();
    }
    fs::write(lowers[1].join("keep"), b"keep").unwrap();
}

/// `rm -rf tree` in post order (what rm does), from the merged listing.
fn rmrf_ops() -> Vec<FsOp> {
    let mut ops = Vec::new();
    for a in 0..5 {
        for b in 0..5 {
            for f in 0..4 {
                ops.push(FsOp::Unlink(format!("tree/d{a}/e{b}/f{f}")));
            }
            ops.push(FsOp::Rmdir(format!("tree/d{a}/e{b}")));
        }
        ops.push(FsOp::Unlink(format!("tree/d{a}/link")));
        ops.push(FsOp::Rmdir(format!("tree/d{a}/empty")));
        ops.push(FsOp::Rmdir(format!("tree/d{a}")));
    }
    ops.push(FsOp::Rmdir("tree".into()));
    ops
}

#[test]
fn crash_during_rm_rf_of_lower_tree() {
    run_script(&Script {
        name: "rm-rf",
        build: build_tree,
        nlowers: 2,
        ops: rmrf_ops,
    });
}

/// The real `rm -rf`, killed at a random point: afterwards, whatever is left
/// of the tree is a subset of the original with unchanged contents, and the
/// kernel agrees.
#[test]
fn crash_during_rm_rf_command() {
    let seed = seed_from_env("CRASH_SEED");
    let mut rng = Rng::new(seed ^ 0x77);
    let d = Dirs::new("crash-rmrf-cmd");
    let lowers: Vec<PathBuf> = (0..2).map(|i| d.dir(&format!("lower{i}"))).collect();
    build_tree(&lowers);
    let (initial, _) = {
        let k = KernelOverlay::mount(
            &lowers,
            &d.dir("u-init"),
            &d.dir("w-init"),
            &d.path("k-init"),
        );
        let v = walk(k.path());
        k.unmount();
        v
    };
    // Calibrate.
    let m = Layerfs::mount(&lowers, &d.dir("u-cal"), &d.dir("w-cal"), &d.path("m-cal"));
    let t0 = Instant::now();
    let st = Command::new("rm")
        .arg("-rf")
        .arg(m.path().join("tree"))
        .status()
        .unwrap();
    let total = t0.elapsed();
    assert!(st.success());
    m.unmount().unwrap();
    let n = iters();
    let mut problems = Vec::new();
    for i in 0..n {
        let (u, w) = (d.dir(&format!("u{i}")), d.dir(&format!("w{i}")));
        let m = Layerfs::mount(&lowers, &u, &w, &d.path(&format!("m{i}")));
        let mut child = Command::new("rm")
            .arg("-rf")
            .arg(m.path().join("tree"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = total.as_secs_f64() * (i as f64 + rng.below(1000) as f64 / 1000.0) / n as f64;
        thread::sleep(Duration::from_secs_f64(delay));
        m.kill9();
        let _ = child.wait();
        let (view, probs) = remount_and_compare(m, &lowers, &u, &w, &d, &format!("{i}"));
        problems.extend(probs.into_iter().map(|p| format!("kill {i}: {p}")));
        // Subset of the original, same contents; a dir left implies its
        // parent is left (walk guarantees that).
        let mut left = 0;
        for (k, v) in &view {
            match initial.get(k) {
                Some(o) if o == v => left += 1,
                Some(o) => problems.push(format!("kill {i}: {k}: was {o:?}, now {v:?}")),
                None => problems.push(format!("kill {i}: {k}: not in the original tree ({v:?})")),
            }
        }
        if !view.contains_key("keep") {
            problems.push(format!("kill {i}: 'keep' (outside the tree) is gone"));
        }
        eprintln!(
            "  rm -rf kill {i}: after {:.1} ms, {left}/{} entries left",
            delay * 1000.0,
            initial.len()
        );
    }
    assert!(
        problems.is_empty(),
        "crash rm -rf (command):\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Whiteouts: unlink lower files and dirs, files and dirs over whiteouts
// ---------------------------------------------------------------------------

fn build_whiteouts(lowers: &[PathBuf]) {
    let w = lowers[0].join("w");
    fs::create_dir_all(&w).unwrap();
    for i in 0..150 {
        fs::write(w.join(format!("f{i}")), format!("lower file {i}\n")).unwrap();
    }
    for j in 0..20 {
        fs::create_dir_all(w.join(format!("g{j}"))).unwrap();
    }
    fs::create_dir_all(w.join("full/sub")).unwrap();
    fs::write(w.join("full/sub/x"), b"x").unwrap();
}

fn whiteout_ops() -> Vec<FsOp> {
    let mut ops = Vec::new();
    for i in 0..150 {
        ops.push(FsOp::Unlink(format!("w/f{i}")));
        if i % 4 == 0 {
            ops.push(FsOp::Create(format!("w/f{i}"), 1000 + i, 10 + i as usize));
        }
        if i % 8 == 0 {
            let j = i / 8;
            ops.push(FsOp::Rmdir(format!("w/g{j}")));
            if j % 2 == 0 {
                // mkdir over a whiteout: an opaque dir
                ops.push(FsOp::Mkdir(format!("w/g{j}")));
                ops.push(FsOp::Create(format!("w/g{j}/new"), 5000 + j, 100));
            }
        }
    }
    ops.push(FsOp::Unlink("w/full/sub/x".into()));
    ops.push(FsOp::Rmdir("w/full/sub".into()));
    ops.push(FsOp::Rmdir("w/full".into()));
    ops
}

#[test]
fn crash_during_whiteout_creation() {
    run_script(&Script {
        name: "whiteouts",
        build: build_whiteouts,
        nlowers: 1,
        ops: whiteout_ops,
    });
}

// ---------------------------------------------------------------------------
// Renames: lower files (copy-up + whiteout), over lower files, directories
// ---------------------------------------------------------------------------

fn build_renames(lowers: &[PathBuf]) {
    let r0 = lowers[0].join("r");
    let r1 = lowers[1].join("r");
    fs::create_dir_all(r0.join("c")).unwrap();
    fs::create_dir_all(&r1).unwrap();
    for i in 0..40 {
        let rel = format!("r/a{i}");
        // Some large files so that copy-up takes a while.
        let data = if i % 10 == 3 {
            pattern(i, 3 << 20)
        } else {
            overwrite_base(&rel)
        };
        fs::write(lowers[i as usize % 2].join(&rel), data).unwrap();
        fs::write(
            lowers[1].join(format!("r/keep{i}")),
            overwrite_base(&format!("r/keep{i}")),
        )
        .unwrap();
    }
    for j in 0..6 {
        for (li, l) in lowers.iter().enumerate() {
            let dir = l.join(format!("r/dir{j}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join(format!("file{li}")),
                format!("dir {j} layer {li}\n"),
            )
            .unwrap();
        }
    }
}

fn rename_ops() -> Vec<FsOp> {
    let mut ops = Vec::new();
    for i in 0..40 {
        ops.push(FsOp::Rename(format!("r/a{i}"), format!("r/b{i}")));
        if i % 3 == 0 {
            ops.push(FsOp::Rename(format!("r/b{i}"), format!("r/c/x{i}")));
        }
        if i % 4 == 1 {
            // a new upper file over a lower one
            ops.push(FsOp::Create(format!("r/t{i}"), 7000 + i, 3000));
            ops.push(FsOp::Rename(format!("r/t{i}"), format!("r/keep{i}")));
        }
        if i % 4 == 2 {
            // a lower file over another lower file
            ops.push(FsOp::Rename(
                format!("r/keep{i}"),
                format!("r/keep{}", i + 1),
            ));
        }
        if i % 7 == 0 {
            let j = i / 7;
            ops.push(FsOp::Rename(format!("r/dir{j}"), format!("r/moved{j}")));
            ops.push(FsOp::Rename(
                format!("r/moved{j}/file0"),
                format!("r/c/from{j}"),
            ));
        }
        if i % 8 == 0 {
            // copy-up by open(O_WRONLY) of a lower file no rename touches
            ops.push(FsOp::Overwrite(format!("r/keep{i}"), 9000 + i, 10));
        }
    }
    ops
}

#[test]
fn crash_during_renames() {
    run_script(&Script {
        name: "renames",
        build: build_renames,
        nlowers: 2,
        ops: rename_ops,
    });
}

// ---------------------------------------------------------------------------
// Copy-up of a large lower file being appended to
// ---------------------------------------------------------------------------

const BLOCK: usize = 4096;
const APPEND: usize = 64 * 1024;

/// Block `k` of the old file: its index, repeated.
fn old_block(k: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&k.to_le_bytes());
    }
    b
}

/// Block `k` of the appended data.
fn new_block(k: u64) -> [u8; BLOCK] {
    old_block(k | 0xa5a5_0000_0000_0000)
}

fn write_big(path: &Path, bytes: u64) {
    let mut f = fs::File::create(path).unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    let blocks = bytes / BLOCK as u64;
    for k in 0..blocks {
        buf.extend_from_slice(&old_block(k));
        if buf.len() >= 1 << 20 {
            f.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// Check a file: `old` bytes of the old pattern, then a prefix of the
/// appended pattern. Returns (appended bytes, problems).
fn check_big(path: &Path, old: u64) -> Result<u64, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; BLOCK];
    let mut off = 0u64;
    loop {
        let mut got = 0;
        while got < BLOCK {
            let n = f
                .read(&mut buf[got..])
                .map_err(|e| format!("read at {off}: {e}"))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            break;
        }
        let k = off / BLOCK as u64;
        let want = if off < old {
            old_block(k)
        } else {
            new_block(k - old / BLOCK as u64)
        };
        if buf[..got] != want[..got] {
            let i = buf[..got]
                .iter()
                .zip(&want[..got])
                .position(|(a, b)| a != b)
                .unwrap();
            return Err(format!(
                "byte {} differs ({} data expected, got {:02x?})",
                off + i as u64,
                if off < old { "old" } else { "appended" },
                &buf[i..(i + 8).min(got)]
            ));
        }
        off += got as u64;
        if got < BLOCK {
            break;
        }
    }
    if off < old {
        return Err(format!(
            "only {off} of the {old} old bytes: partial copy-up"
        ));
    }
    Ok(off - old)
}

#[test]
fn crash_during_copy_up_of_large_file_being_appended() {
    let seed = seed_from_env("CRASH_SEED");
    let mut rng = Rng::new(seed ^ 0xb16);
    let mib = env_u64("CRASH_BIG_MIB", 200);
    let old = mib << 20;
    let appends = 48u64;
    let n = iters();
    eprintln!(
        "crash copy-up: seed {seed}, {mib} MiB lower file, {appends} appends of {APPEND} bytes, {n} kills"
    );
    let d = Dirs::new("crash-copyup");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("data")).unwrap();
    write_big(&lower.join("data/big"), old);
    fs::write(lower.join("data/small"), b"small").unwrap();
    let lowers = vec![lower.clone()];

    // The appender: open O_APPEND (copy-up), then append+fsync blocks.
    // `acked` counts fsync'ed appends; `opened` tells whether open returned.
    struct Shared {
        opened: AtomicBool,
        acked: AtomicU64,
        err: Mutex<Option<String>>,
    }
    fn appender(path: PathBuf, appends: u64, sh: Arc<Shared>) {
        let mut f = match fs::OpenOptions::new().append(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                if !daemon_gone(io_errno(&e)) {
                    *sh.err.lock().unwrap() = Some(format!("open O_APPEND: {e}"));
                }
                return;
            }
        };
        sh.opened.store(true, Ordering::SeqCst);
        let mut buf = Vec::with_capacity(APPEND);
        for a in 0..appends {
            buf.clear();
            for b in 0..(APPEND / BLOCK) as u64 {
                buf.extend_from_slice(&new_block(a * (APPEND / BLOCK) as u64 + b));
            }
            if let Err(e) = f.write_all(&buf).and_then(|_| f.sync_data()) {
                if !daemon_gone(io_errno(&e)) {
                    *sh.err.lock().unwrap() = Some(format!("append {a}: {e}"));
                }
                return;
            }
            sh.acked.store(a + 1, Ordering::SeqCst);
        }
    }

    // Calibration.
    let m = Layerfs::mount(&lowers, &d.dir("u-cal"), &d.dir("w-cal"), &d.path("m-cal"));
    let sh = Arc::new(Shared {
        opened: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        err: Mutex::new(None),
    });
    let t0 = Instant::now();
    appender(m.path().join("data/big"), appends, sh.clone());
    let total = t0.elapsed();
    assert!(
        sh.err.lock().unwrap().is_none(),
        "{:?}",
        sh.err.lock().unwrap()
    );
    assert_eq!(
        check_big(&m.path().join("data/big"), old),
        Ok(appends * APPEND as u64),
        "calibration (no kill)"
    );
    m.unmount().unwrap();
    eprintln!(
        "  calibration: copy-up + {appends} appends in {:.3} s",
        total.as_secs_f64()
    );

    let mut problems = Vec::new();
    for i in 0..n {
        let (u, w) = (d.dir(&format!("u{i}")), d.dir(&format!("w{i}")));
        let m = Layerfs::mount(&lowers, &u, &w, &d.path(&format!("m{i}")));
        let sh = Arc::new(Shared {
            opened: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            err: Mutex::new(None),
        });
        let (p, s2) = (m.path().join("data/big"), sh.clone());
        let h = thread::spawn(move || appender(p, appends, s2));
        let delay = total.as_secs_f64() * (i as f64 + rng.below(1000) as f64 / 1000.0) / n as f64;
        thread::sleep(Duration::from_secs_f64(delay));
        m.kill9();
        join_within(h, Duration::from_secs(60), "appender");
        // The copy is built unnamed (O_TMPFILE, as the kernel does): a
        // killed daemon leaves no partial file taking space in the work dir.
        let left = regular_files_below(&w);
        if !left.is_empty() {
            problems.push(format!("kill {i}: files left in the work dir: {left:?}"));
        }
        let opened = sh.opened.load(Ordering::SeqCst);
        let acked = sh.acked.load(Ordering::SeqCst);
        if let Some(e) = sh.err.lock().unwrap().take() {
            problems.push(format!("kill {i}: appender: {e}"));
        }
        // The upper never holds a partial copy.
        if let Ok(md) = fs::metadata(u.join("data/big"))
            && md.len() < old
        {
            problems.push(format!(
                "kill {i}: upper/data/big has {} bytes < {old}: a partial copy-up is visible",
                md.len()
            ));
        }
        let (view, probs) = remount_and_compare(m, &lowers, &u, &w, &d, &format!("{i}"));
        problems.extend(probs.into_iter().map(|p| format!("kill {i}: {p}")));
        let names: Vec<&String> = view.keys().collect();
        if names != ["data", "data/big", "data/small"] {
            problems.push(format!("kill {i}: unexpected names in the view: {names:?}"));
        }
        // Re-read through a fresh layerfs mount for the content check.
        let m2 = Layerfs::mount(&lowers, &u, &w, &d.path(&format!("c{i}")));
        match check_big(&m2.path().join("data/big"), old) {
            Ok(app) => {
                let min = acked * APPEND as u64;
                let max = if opened {
                    (acked + 1) * APPEND as u64
                } else {
                    APPEND as u64
                };
                if app < min || app > max {
                    problems.push(format!(
                        "kill {i}: {app} bytes appended, expected {min}..={max} ({acked} appends fsync'ed)"
                    ));
                }
                eprintln!(
                    "  kill {i}: after {:.1} ms: open {}, {acked} appends fsync'ed, file has old + {app} bytes, copied up: {}",
                    delay * 1000.0,
                    if opened { "returned" } else { "in flight" },
                    u.join("data/big").exists()
                );
            }
            Err(e) => problems.push(format!(
                "kill {i} (after {:.1} ms, open {}): data/big: {e}",
                delay * 1000.0,
                if opened { "returned" } else { "in flight" }
            )),
        }
        m2.unmount().unwrap();
        // Free the disk space of this iteration.
        let _ = fs::remove_dir_all(&u);
    }
    assert!(
        problems.is_empty(),
        "crash copy-up:\n{}",
        problems.join("\n")
    );
}

fn regular_files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(regular_files_below(&e.path())),
            Ok(t) if t.is_file() => out.push(e.path()),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Clean unmount: fsync'ed data is in the upper dir, daemon exits 0
// ---------------------------------------------------------------------------

#[test]
fn clean_unmount_keeps_fsynced_data_in_upper() {
    let d = Dirs::new("crash-fsync");
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("dir")).unwrap();
    fs::write(lower.join("dir/old"), pattern(1, 100_000)).unwrap();
    fs::write(lower.join("dir/gone"), b"gone").unwrap();
    let (upper, work, mnt) = (d.dir("upper"), d.dir("work"), d.dir("mnt"));
    // Foreground daemon: our child, so its exit status is ours to see.
    let mut child = Command::new(layerfs_bin())
        .arg("mount")
        .arg("-f")
        .arg("--lower")
        .arg(&lower)
        .arg("--upper")
        .arg(&upper)
        .arg("--work")
        .arg(&work)
        .arg(&mnt)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(i32, PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            unmount_path(&self.1);
            if pid_alive(self.0) {
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
        }
    }
    let _guard = Kill(child.id() as i32, mnt.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mount_fstype(&mnt).is_some_and(|t| t.starts_with("fuse")) {
        assert!(Instant::now() < deadline, "layerfs -f: no mount after 30 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "layerfs -f exited before mounting"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let new = pattern(2, 3 << 20);
    let mut f = fs::File::create(mnt.join("dir/new")).unwrap();
    f.write_all(&new).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut old = pattern(1, 100_000);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("dir/old"))
        .unwrap();
    f.write_all(b"CHANGED").unwrap();
    f.sync_data().unwrap();
    drop(f);
    old[..7].copy_from_slice(b"CHANGED");
    let mut f2 = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("dir/old"))
        .unwrap();
    f2.write_all(b"tail").unwrap();
    f2.sync_all().unwrap();
    old.extend_from_slice(b"tail");
    drop(f2);
    fs::create_dir(mnt.join("dir/sub")).unwrap();
    fs::write(mnt.join("dir/sub/s"), b"sub").unwrap();
    fs::rename(mnt.join("dir/sub/s"), mnt.join("dir/sub/t")).unwrap();
    fs::remove_file(mnt.join("dir/gone")).unwrap();
    // syncfs through the mount
    let dirf = fs::File::open(mnt.join("dir")).unwrap();
    // SAFETY: syncfs(2) on an open fd.
    let r = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dirf)) };
    assert_eq!(r, 0, "syncfs: {}", errno_name(errno()));
    drop(dirf);
    let (st, out) = run_timeout(Command::new("umount").arg(&mnt), Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "umount: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit 10 s after umount"
        );
        thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "daemon exited with {status} after a clean unmount"
    );
    assert!(mount_fstype(&mnt).is_none(), "a mount is left behind");
    assert_eq!(
        fs::read(upper.join("dir/new")).unwrap(),
        new,
        "upper/dir/new"
    );
    assert_eq!(
        fs::read(upper.join("dir/old")).unwrap(),
        old,
        "upper/dir/old"
    );
    assert_eq!(fs::read(upper.join("dir/sub/t")).unwrap(), b"sub");
    assert!(!upper.join("dir/sub/s").exists());
    let md = fs::symlink_metadata(upper.join("dir/gone")).expect("whiteout for dir/gone");
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&md.file_type()),
        "dir/gone is not a whiteout"
    );
    assert_eq!(
        fs::read(lower.join("dir/old")).unwrap(),
        pattern(1, 100_000),
        "lower changed"
    );
    assert!(
        dir_names(&work.join("work")).is_empty(),
        "work/work not empty after clean unmount: {:?}",
        dir_names(&work.join("work"))
    );
}
