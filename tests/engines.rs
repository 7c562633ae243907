//! Container engines on layerfs, driven as a person would drive them.
//!
//! * podman, with layerfs as the overlay driver's `mount_program`: import a
//!   rootfs built from Debian packages, run containers that add, change and
//!   delete files, compare `podman diff` with `layerfs diff`, commit and run
//!   the result, mount an image read-only, build an image from a
//!   Containerfile, run with a user-namespace id mapping, and the "seeds"
//!   flow (a web app whose text a container edits, committed and served).
//! * docker (Debian's `docker.io`), started privately with its
//!   `fuse-overlayfs` storage driver and a `fuse-overlayfs` shim
//!   (scripts/engines/fuse-overlayfs) first on its PATH that runs layerfs:
//!   import, commit, `docker save` / `docker load` of a layered image with
//!   whiteouts and an opaque directory, `docker run`, and `docker diff`
//!   against `layerfs diff`.
//!
//! Every call of the mount program is logged by a wrapper (argv, exit code,
//! stderr); when a scenario fails, the failure message carries that log, and
//! the same scenarios are run again with Debian's `/usr/bin/fuse-overlayfs`
//! so the message says whether the failure is layerfs's own.
//!
//! Needs root and /dev/fuse. The engines are installed with apt-get when
//! missing; a test that cannot install (or, for docker, start) its engine
//! prints `SKIP ...` with the reason and passes. All engine state lives in a
//! temp dir that is reset, unmounted and removed at the end. The rootfs
//! tarball is cached in .cache/engines (the .deb files in .cache/debs).
//!
//! `LAYERFS_ENGINES_MOUNT_PROGRAM=/usr/bin/fuse-overlayfs cargo test --test
//! engines` runs the same scenarios on another mount program.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_layerfs");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const FUSE_OVERLAYFS: &str = "/usr/bin/fuse-overlayfs";

/// apt-get and the rootfs cache are shared by the tests of this file.
static SETUP: Mutex<()> = Mutex::new(());

/// Paths that podman leaves out of `podman diff` (its own bind mounts and
/// the files it writes for them: libpod's `containerMounts`).
const PODMAN_DIFF_HIDES: &[&str] = &[
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/mtab",
    "/etc/resolv.conf",
    "/proc",
    "/run",
    "/run/.containerenv",
    "/run/notify",
    "/run/secrets",
    "/sys",
];

type Res<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------------------
// Running commands: bounded in time, output through files (an engine's
// daemons may inherit the descriptors and outlive the command).

struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"', '\n', '*', '$']) {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

fn run(cmd: &mut Command, limit: Duration) -> Out {
    let dir = tempfile::tempdir().expect("temp dir for command output");
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap());
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => {
            return Out {
                ok: false,
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run {}: {err}", describe(cmd)),
            };
        }
    };
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let stdout = fs::read_to_string(&o).unwrap_or_default();
    let mut stderr = fs::read_to_string(&e).unwrap_or_default();
    if status.is_none() {
        let _ = write!(stderr, "\n(killed after {} s)", limit.as_secs());
    }
    Out {
        ok: status.is_some_and(|s| s.success()),
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    }
}

/// Run and insist on success: stdout, or an error naming the command.
fn must(cmd: &mut Command, limit: Duration) -> Res<String> {
    let out = run(cmd, limit);
    if out.ok {
        Ok(out.stdout)
    } else {
        Err(format!(
            "`{}` failed (exit {:?})\nstdout: {}\nstderr: {}",
            describe(cmd),
            out.code,
            out.stdout.trim_end(),
            out.stderr.trim_end()
        ))
    }
}

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(180);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Install Debian packages unless every file in `needed` exists already.
fn ensure_packages(needed: &[(&str, &str)]) -> Res {
    let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let missing: BTreeSet<&str> = needed
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["-q", "install", "-y", "--no-install-recommends"])
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        must(&mut c, Duration::from_secs(600))
    };
    eprintln!("installing {missing:?} with apt-get");
    if install().is_err() {
        must(
            Command::new("apt-get").args(["-q", "update"]),
            Duration::from_secs(300),
        )?;
        install()?;
    }
    for (path, pkg) in needed {
        ensure!(
            Path::new(path).exists(),
            "{path} is still missing after installing {pkg}"
        );
    }
    Ok(())
}

/// The rootfs tarball (scripts/engines/build-rootfs.sh, cached).
fn rootfs_tar() -> Res<PathBuf> {
    let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let out = Path::new(REPO).join(".cache/engines/rootfs.tar");
    must(
        Command::new(Path::new(REPO).join("scripts/engines/build-rootfs.sh")).arg(&out),
        Duration::from_secs(300),
    )?;
    Ok(out)
}

/// A copy of the layerfs binary for this run: cargo may rebuild the original
/// while engines still start daemons from it.
fn pinned_layerfs(dir: &Path) -> PathBuf {
    let p = dir.join("layerfs");
    fs::copy(BIN, &p).expect("copy the layerfs binary");
    p
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let mut v: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " ").replace("\\011", "\t"))
        .filter(|m| m.starts_with(&prefix) || *m == prefix.trim_end_matches('/'))
        .map(PathBuf::from)
        .collect();
    v.sort();
    v.reverse();
    v
}

fn mount_line(mountpoint: &Path) -> Option<String> {
    let m = mountpoint.to_str()?;
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m))
        .map(str::to_owned)
}

fn unmount_all(dir: &Path) {
    for m in mounts_under(dir) {
        let quiet = |c: &mut Command| run(c, Duration::from_secs(30)).ok;
        if !quiet(Command::new("fusermount3").arg("-u").arg(&m))
            && !quiet(Command::new("umount").arg(&m))
        {
            quiet(Command::new("umount").arg("-l").arg(&m));
        }
    }
}

/// `A /path` lines as a set.
fn change_set(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn without(set: &BTreeSet<String>, hidden: &[&str]) -> BTreeSet<String> {
    set.iter()
        .filter(|l| !hidden.contains(&l.get(2..).unwrap_or("")))
        .cloned()
        .collect()
}

fn set_diff(what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>) -> String {
    let only_a: Vec<_> = a.difference(b).collect();
    let only_b: Vec<_> = b.difference(a).collect();
    format!("{what}: only in the engine's diff: {only_a:?}; only in layerfs diff: {only_b:?}")
}

/// fuse-overlayfs (1.10, as root) leaves a regular file `.wh..wh..opq` (and a
/// whiteout `.wh..opq`) in every directory it makes opaque or creates, beside
/// the opaque xattr; its own mounts hide them, so the engines' diffs never
/// list them, but `layerfs diff --upper` (like the kernel) shows the regular
/// file. Only for the reference runs on fuse-overlayfs: drop those lines.
fn without_fuse_overlayfs_markers(
    set: BTreeSet<String>,
    mounts_are_layerfs: bool,
) -> BTreeSet<String> {
    if mounts_are_layerfs {
        return set;
    }
    set.into_iter()
        .filter(|l| !l.ends_with("/.wh..wh..opq"))
        .collect()
}

fn layerfs_diff(
    layerfs: &Path,
    upper: &str,
    lowers: &str,
    userxattr: bool,
) -> Res<BTreeSet<String>> {
    let mut c = Command::new(layerfs);
    c.args(["diff", "--upper", upper]);
    if userxattr {
        c.arg("--userxattr");
    }
    for l in lowers.split(':').filter(|l| !l.is_empty()) {
        c.args(["--lower", l]);
    }
    Ok(change_set(&must(&mut c, SHORT)?))
}

fn layerfs_diff_mount(layerfs: &Path, mountpoint: &str) -> Res<BTreeSet<String>> {
    Ok(change_set(&must(
        Command::new(layerfs).args(["diff", mountpoint]),
        SHORT,
    )?))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// The body of `GET /` on 127.0.0.1:port, retried until `limit`.
fn http_get(port: u16, limit: Duration) -> Res<String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        let attempt = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp)
        };
        match attempt() {
            Ok(resp) if resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200") => {
                return Ok(resp
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default());
            }
            Ok(resp) => last = format!("unexpected response: {resp:?}"),
            Err(e) => last = e.to_string(),
        }
        sleep(Duration::from_millis(200));
    }
    Err(format!(
        "no answer on 127.0.0.1:{port} in {} s: {last}",
        limit.as_secs()
    ))
}

/// Steps and their durations, printed at the end of a test.
#[derive(Default)]
struct Timings(Vec<(String, Duration)>);

impl Timings {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Res<T>) -> Res<T> {
        let start = Instant::now();
        let r = f().map_err(|e| format!("step '{name}': {e}"));
        self.0.push((name.to_owned(), start.elapsed()));
        r
    }
    fn report(&self, title: &str) -> String {
        let mut s = format!("{title}:\n");
        let mut total = Duration::ZERO;
        for (name, d) in &self.0 {
            let _ = writeln!(s, "  {:7.2} s  {name}", d.as_secs_f64());
            total += *d;
        }
        let _ = writeln!(s, "  {:7.2} s  total", total.as_secs_f64());
        s
    }
}

/// Mount-program log lines: every call exited 0, or the failing calls.
fn failed_calls(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let mut bad = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(code) = l.strip_prefix("exit: ")
            && !code.starts_with("0 ")
            && code != "0"
        {
            let argv = lines[..i]
                .iter()
                .rev()
                .find(|x| x.starts_with("argv: "))
                .copied()
                .unwrap_or("?");
            let stderr: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|x| x.starts_with("stderr: "))
                .copied()
                .collect();
            bad.push(format!("{argv}\n{l}\n{}", stderr.join("\n")));
        }
    }
    bad
}

// ---------------------------------------------------------------------------
// podman

struct Podman {
    dir: PathBuf,
    podman: PathBuf,
    /// For `layerfs diff`.
    layerfs: PathBuf,
    /// The mount program is layerfs (so `layerfs diff MOUNTPOINT` works).
    mounts_are_layerfs: bool,
    /// Rootless: podman runs as this user (and the uppers use user.* xattrs).
    user: Option<String>,
    /// The mount program is fuse-overlayfs (the reference runs).
    on_fuse_overlayfs: bool,
}

impl Podman {
    /// A private podman under `dir` whose mount program is `prog`.
    fn new(dir: &Path, prog: &Path, layerfs: &Path) -> Res<Self> {
        Self::new_as(dir, prog, layerfs, None)
    }

    /// The same, for `user` (rootless) when given.
    fn new_as(dir: &Path, prog: &Path, layerfs: &Path, user: Option<&str>) -> Res<Self> {
        let script = Path::new(REPO).join("scripts/engines/podman-env.sh");
        let mut c = as_user(user, &script);
        c.arg(dir).arg(prog);
        let out = must(&mut c, SHORT)?;
        Ok(Podman {
            dir: dir.to_owned(),
            podman: PathBuf::from(out.trim()),
            layerfs: layerfs.to_owned(),
            mounts_are_layerfs: prog == layerfs,
            user: user.map(str::to_owned),
            on_fuse_overlayfs: prog.file_name().is_some_and(|n| n == "fuse-overlayfs"),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = as_user(self.user.as_deref(), &self.podman);
        c.args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> Res<String> {
        must(&mut self.cmd(args), LONG)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mount-program.log")).unwrap_or_default()
    }

    fn inspect(&self, what: &str, name: &str, field: &str) -> Res<String> {
        let fmt = format!("{{{{.GraphDriver.Data.{field}}}}}");
        Ok(self
            .ok(&[what, "inspect", name, "--format", &fmt])?
            .trim()
            .to_owned())
    }

    fn diff(&self, name: &str) -> Res<BTreeSet<String>> {
        Ok(change_set(&self.ok(&["diff", name])?))
    }

    /// `podman diff` and `layerfs diff` of the container's upper agree.
    fn check_diff(&self, name: &str) -> Res<BTreeSet<String>> {
        let engine = self.diff(name)?;
        if self.on_fuse_overlayfs && self.user.is_some() {
            // fuse-overlayfs rootless marks opaque dirs with
            // user.fuseoverlayfs.opaque and a `.wh..wh..opq` file, neither
            // of which is overlay format: nothing for layerfs diff to read.
            return Ok(engine);
        }
        let upper = self.inspect("container", name, "UpperDir")?;
        let lowers = self.inspect("container", name, "LowerDir")?;
        let ours = without_fuse_overlayfs_markers(
            layerfs_diff(&self.layerfs, &upper, &lowers, self.user.is_some())?,
            self.mounts_are_layerfs,
        );
        let ours_shown = without(&ours, PODMAN_DIFF_HIDES);
        ensure!(
            engine == ours_shown,
            "{}\npodman diff {name}: {engine:?}\nlayerfs diff --upper {upper} --lower {lowers}: {ours:?}",
            set_diff("podman diff vs layerfs diff", &engine, &ours_shown)
        );
        Ok(engine)
    }
}

/// `program`, run as `user` (with runuser) when given.
fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let t = Duration::from_secs(120);
        let _ = run(&mut self.cmd(&["rm", "--all", "--force", "--time", "0"]), t);
        let _ = run(&mut self.cmd(&["image", "unmount", "--all", "--force"]), t);
        let _ = run(&mut self.cmd(&["system", "reset", "--force"]), t);
        unmount_all(&self.dir);
    }
}

/// In the container: add, change and delete files and directories (an
/// opaque directory, a hard link, a symlink, metadata only changes).
const CHANGES: &str = r#"set -e
cd /srv/data
echo added > new.txt
echo changed >> change.txt
rm delete.txt
rm -r olddir
mkdir -p newdir/deeper && echo deep > newdir/deeper/f
rm -rf /usr/lib/python3.11/json && mkdir /usr/lib/python3.11/json && echo opaque > /usr/lib/python3.11/json/only
chmod 0600 keep.txt
ln keep.txt keep.hard
ln -s keep.txt keep.sym
python3 -c 'import email.parser' && echo python-ok
echo done"#;

/// What the committed image must show, checked inside a new container.
const VERIFY: &str = r#"set -e
cd /srv/data
test "$(cat new.txt)" = added
test "$(cat change.txt)" = "$(printf 'change me\nchanged')"
test ! -e delete.txt
test ! -e olddir
test "$(cat newdir/deeper/f)" = deep
test "$(ls -A /usr/lib/python3.11/json)" = only
test "$(stat -c %a keep.txt)" = 600
test "$(readlink keep.sym)" = keep.txt
test "$(cat keep.hard)" = "keep me"
if ls -A / /srv/data /usr/lib/python3.11 | grep -F .wh.; then echo whiteout files visible; exit 1; fi
echo verified"#;

fn expect_contains(set: &BTreeSet<String>, wanted: &[&str], what: &str) -> Res {
    let missing: Vec<_> = wanted.iter().filter(|w| !set.contains(**w)).collect();
    ensure!(missing.is_empty(), "{what} lacks {missing:?}: {set:?}");
    Ok(())
}

/// A read-only mount of the committed image: its content, no whiteout
/// files, and EROFS on writes. layerfs also mounts it `ro` (fuse-overlayfs
/// mounts it read-write and refuses writes itself).
fn check_image_mount(m: &Path, layerfs: bool) -> Res {
    let line = mount_line(m).ok_or(format!("{} is not a mount point", m.display()))?;
    let opts = line.split(' ').nth(5).unwrap_or("");
    ensure!(
        !layerfs || opts.split(',').any(|o| o == "ro"),
        "image mount is not read-only: {line}"
    );
    let data = m.join("srv/data");
    let read = |f: &str| fs::read_to_string(data.join(f)).map_err(|e| format!("{f}: {e}"));
    ensure!(read("new.txt")? == "added\n", "new.txt");
    ensure!(read("keep.txt")? == "keep me\n", "keep.txt");
    ensure!(!data.join("delete.txt").exists(), "deleted file visible");
    let names: Vec<String> = fs::read_dir(&data)
        .map_err(|e| e.to_string())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        !names.iter().any(|n| n.starts_with(".wh.")),
        "whiteouts visible: {names:?}"
    );
    let w = fs::write(m.join("x"), "x");
    ensure!(
        w.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EROFS),
        "write to the image mount: {w:?}, expected EROFS"
    );
    Ok(())
}

fn podman_scenarios(p: &Podman, rootfs: &Path, t: &mut Timings) -> Res {
    let run_flags = [
        "--cgroup-parent=layerfs-engines",
        "--cgroups=no-conmon",
        "--network=host",
    ];
    let prun = |extra: &[&str]| -> Res<String> {
        let mut args = vec!["run"];
        args.extend(run_flags);
        args.extend(extra);
        p.ok(&args)
    };

    t.step("podman import", || {
        p.ok(&[
            "import",
            rootfs.to_str().unwrap(),
            "localhost/lfs-base:latest",
        ])
    })?;

    let out = t.step("podman run: add, change, delete", || {
        prun(&[
            "--name",
            "changes",
            "localhost/lfs-base",
            "sh",
            "-c",
            CHANGES,
        ])
    })?;
    ensure!(
        out.contains("python-ok") && out.contains("done"),
        "container output: {out}"
    );

    let diff = t.step("podman diff = layerfs diff", || p.check_diff("changes"))?;
    expect_contains(
        &diff,
        &[
            "A /srv/data/new.txt",
            "C /srv/data/change.txt",
            "D /srv/data/delete.txt",
            "D /srv/data/olddir",
            "A /srv/data/newdir/deeper/f",
            "C /srv/data/keep.txt",
            "A /srv/data/keep.hard",
            "A /srv/data/keep.sym",
            "C /usr/lib/python3.11/json",
            "A /usr/lib/python3.11/json/only",
        ],
        "podman diff",
    )?;
    ensure!(
        !diff.iter().any(|l| l.contains(".wh.")),
        "whiteout files in podman diff: {diff:?}"
    );

    t.step("podman commit + run the new image", || {
        p.ok(&["commit", "changes", "localhost/lfs-changed:latest"])?;
        let out = prun(&["--rm", "localhost/lfs-changed", "sh", "-c", VERIFY])?;
        ensure!(out.contains("verified"), "output: {out}");
        Ok(())
    })?;

    t.step("layerfs diff MOUNTPOINT of a running container", || {
        prun(&[
            "-d",
            "--name",
            "running",
            "localhost/lfs-changed",
            "sh",
            "-c",
            "echo more >> /srv/data/new.txt; rm /srv/data/keep.hard; touch /ready; exec sleep 600",
        ])?;
        let start = Instant::now();
        while run(
            &mut p.cmd(&["exec", "running", "test", "-e", "/ready"]),
            SHORT,
        )
        .code
            != Some(0)
        {
            ensure!(start.elapsed() < SHORT, "the container never got ready");
            sleep(Duration::from_millis(100));
        }
        let merged = p.inspect("container", "running", "MergedDir")?;
        let ours = if p.mounts_are_layerfs {
            layerfs_diff_mount(&p.layerfs, &merged)?
        } else {
            let upper = p.inspect("container", "running", "UpperDir")?;
            let lowers = p.inspect("container", "running", "LowerDir")?;
            layerfs_diff(&p.layerfs, &upper, &lowers, false)?
        };
        let ours = without(
            &without_fuse_overlayfs_markers(ours, p.mounts_are_layerfs),
            PODMAN_DIFF_HIDES,
        );
        let engine = p.diff("running")?;
        ensure!(
            engine == ours,
            "{}",
            set_diff("running container", &engine, &ours)
        );
        expect_contains(
            &engine,
            &["C /srv/data/new.txt", "D /srv/data/keep.hard", "A /ready"],
            "podman diff running",
        )?;
        p.ok(&["rm", "--force", "--time", "0", "running"])?;
        ensure!(
            mount_line(Path::new(&merged)).is_none(),
            "{merged} still mounted after podman rm"
        );
        Ok(())
    })?;

    t.step("podman image mount (read-only, no upper)", || {
        let m = p.ok(&["image", "mount", "localhost/lfs-changed"])?;
        let m = PathBuf::from(m.trim());
        let r = check_image_mount(&m, p.mounts_are_layerfs);
        p.ok(&["image", "unmount", "localhost/lfs-changed"])?;
        r?;
        ensure!(
            mount_line(&m).is_none(),
            "{} still mounted after image unmount",
            m.display()
        );
        Ok(())
    })?;

    t.step("podman build (RUN whiteouts, opaque dir, COPY)", || {
        let ctx = p.dir.join("build-ctx");
        fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
        fs::write(ctx.join("note.txt"), "copied in\n").map_err(|e| e.to_string())?;
        fs::write(
            ctx.join("Containerfile"),
            "FROM localhost/lfs-base\n\
             RUN rm /srv/data/delete.txt && echo built >> /srv/data/change.txt\n\
             RUN rm -rf /srv/data/olddir && mkdir /srv/data/olddir && echo fresh > /srv/data/olddir/only\n\
             COPY note.txt /srv/note.txt\n",
        )
        .map_err(|e| e.to_string())?;
        p.ok(&[
            "build",
            "--network=host",
            "--cgroup-parent=layerfs-engines",
            "-t",
            "localhost/lfs-built",
            ctx.to_str().unwrap(),
        ])?;
        let out = prun(&[
            "--rm",
            "localhost/lfs-built",
            "sh",
            "-c",
            "test ! -e /srv/data/delete.txt && test \"$(ls -A /srv/data/olddir)\" = only \
             && cat /srv/note.txt && tail -n 1 /srv/data/change.txt",
        ])?;
        ensure!(out == "copied in\nbuilt\n", "output: {out:?}");
        Ok(())
    })?;

    t.step("podman run --uidmap (user namespace)", || {
        let out = prun(&[
            "--name",
            "mapped",
            "--uidmap",
            "0:100000:65536",
            "--gidmap",
            "0:100000:65536",
            "localhost/lfs-base",
            "sh",
            "-c",
            "stat -c %u:%g /srv/data/keep.txt; echo mapped >> /srv/data/change.txt; \
             echo new > /srv/data/mapped.txt; chown 5:6 /srv/data/mapped.txt; stat -c %u:%g /srv/data/mapped.txt",
        ])?;
        ensure!(
            out == "0:0\n5:6\n",
            "inside the user namespace, expected lower files owned by 0:0 and a chown to 5:6 kept; got {out:?}"
        );
        let diff = p.check_diff("mapped")?;
        expect_contains(
            &diff,
            &["C /srv/data/change.txt", "A /srv/data/mapped.txt"],
            "podman diff mapped",
        )?;
        // Not checked: the owners on disk. podman 4.3 hands the mount
        // program lowers that the kernel already id-maps (`mapped/0/...`)
        // *and* `uidmapping=`; the kernel's own overlay (no mount program)
        // stores host ids (100005:100006) in the upper, and a commit keeps
        // them, so not even the kernel round-trips the owners through
        // `podman commit` here.
        Ok(())
    })?;

    // The seeds' flow.
    t.step("seeds: the image serves \"hello world!\"", || {
        let port = free_port().to_string();
        prun(&[
            "-d",
            "--name",
            "web0",
            "-e",
            &format!("PORT={port}"),
            "localhost/lfs-base",
            "python3",
            "/app.py",
        ])?;
        let body = http_get(port.parse().unwrap(), SHORT);
        p.ok(&["rm", "--force", "--time", "0", "web0"])?;
        let body = body?;
        ensure!(body == "hello world!", "body {body:?}");
        Ok(())
    })?;
    t.step("seeds: edit /app.py, podman diff shows C /app.py", || {
        prun(&[
            "--name",
            "seed",
            "localhost/lfs-base",
            "sed",
            "-i",
            "s/hello world!/hello beautiful world!/",
            "/app.py",
        ])?;
        let diff = p.check_diff("seed")?;
        ensure!(diff.contains("C /app.py"), "podman diff seed: {diff:?}");
        let others: Vec<_> = diff
            .iter()
            .filter(|l| *l != "C /app.py" && *l != "C /etc")
            .collect();
        ensure!(others.is_empty(), "unexpected changes: {others:?}");
        Ok(())
    })?;
    t.step("seeds: commit, a new container serves the new text", || {
        p.ok(&["commit", "seed", "localhost/lfs-seeds:latest"])?;
        let port = free_port().to_string();
        prun(&[
            "-d",
            "--name",
            "web1",
            "-e",
            &format!("PORT={port}"),
            "localhost/lfs-seeds",
            "python3",
            "/app.py",
        ])?;
        let body = http_get(port.parse().unwrap(), SHORT);
        let inside = p.ok(&[
            "exec",
            "web1",
            "python3",
            "-c",
            &format!(
                "import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/', timeout=10).read().decode())"
            ),
        ]);
        p.ok(&["rm", "--force", "--time", "0", "web1"])?;
        let body = body?;
        ensure!(body == "hello beautiful world!", "body {body:?}");
        let inside = inside?;
        ensure!(
            inside.trim() == "hello beautiful world!",
            "from inside: {inside:?}"
        );
        Ok(())
    })?;

    let log = p.log();
    let bad = failed_calls(&log);
    ensure!(
        bad.is_empty(),
        "failed mount-program calls:\n{}",
        bad.join("\n")
    );
    ensure!(
        log.lines()
            .any(|l| l.starts_with("argv: ") && !l.contains("upperdir=")),
        "no read-only mount (without upperdir) was made"
    );
    Ok(())
}

/// The distinct shapes of the mount-program calls (paths shortened).
/// Layer ids become `<id>`, the short link names `<l>`, so that calls of
/// the same kind collapse into one line.
fn argv_summary(log: &str, dir: &Path) -> String {
    let d = dir.display().to_string();
    let shape = |seg: &str| -> String {
        let (base, suffix) = seg.split_at(seg.find('-').unwrap_or(seg.len()));
        if base.len() == 64 && base.bytes().all(|b| b.is_ascii_hexdigit()) {
            format!("<id>{suffix}")
        } else if seg.len() == 26
            && seg
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            "<l>".to_owned()
        } else {
            seg.to_owned()
        }
    };
    let mut seen = BTreeSet::new();
    for l in log.lines().filter(|l| l.starts_with("argv: ")) {
        let l = l.replace(&d, "$DIR");
        let mut out = String::new();
        let mut seg = String::new();
        for ch in l.chars() {
            if ch == '/' || ch == ':' || ch == ',' || ch == '\'' || ch == ' ' {
                out.push_str(&shape(&seg));
                seg.clear();
                out.push(ch);
            } else {
                seg.push(ch);
            }
        }
        out.push_str(&shape(&seg));
        seen.insert(out);
    }
    seen.into_iter().collect::<Vec<_>>().join("\n")
}

/// Which mount program the scenarios use, and whether it is layerfs.
fn mount_program(pinned: &Path) -> (PathBuf, bool) {
    match std::env::var_os("LAYERFS_ENGINES_MOUNT_PROGRAM") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), false),
        _ => (pinned.to_owned(), true),
    }
}

#[test]
fn podman_with_layerfs_as_mount_program() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP podman_with_layerfs_as_mount_program: needs root and /dev/fuse");
        return;
    }
    let needed = [
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/conmon", "conmon"),
        ("/usr/libexec/podman/catatonit", "catatonit"),
        ("/usr/bin/fusermount3", "fuse3"),
    ];
    if let Err(e) = ensure_packages(&needed) {
        eprintln!("SKIP podman_with_layerfs_as_mount_program: cannot install podman: {e}");
        return;
    }
    let rootfs = rootfs_tar().expect("build the rootfs tarball");
    let tmp = tempfile::Builder::new()
        .prefix("lfs-podman.")
        .tempdir()
        .unwrap();
    let pinned = pinned_layerfs(tmp.path());
    let (prog, is_layerfs) = mount_program(&pinned);

    let mut t = Timings::default();
    let dir = tmp.path().join("p");
    let result = Podman::new(&dir, &prog, &pinned).and_then(|p| {
        let r = podman_scenarios(&p, &rootfs, &mut t);
        let log = p.log();
        eprintln!("mount-program calls:\n{}", argv_summary(&log, &dir));
        drop(p);
        r.map_err(|e| format!("{e}\n\nmount-program log ({}):\n{log}", prog.display()))
    });
    eprintln!("{}", t.report(&format!("podman on {}", prog.display())));
    ensure_nothing_left(&dir, &pinned);
    if let Err(e) = result {
        let mut msg = format!("podman with {}: {e}", prog.display());
        if is_layerfs && Path::new(FUSE_OVERLAYFS).exists() {
            let dir = tmp.path().join("ref");
            let mut t = Timings::default();
            let r = Podman::new(&dir, Path::new(FUSE_OVERLAYFS), &pinned)
                .and_then(|p| podman_scenarios(&p, &rootfs, &mut t));
            ensure_nothing_left(&dir, &pinned);
            match r {
                Ok(()) => msg.push_str(
                    "\n\nWith /usr/bin/fuse-overlayfs as mount program the same scenarios PASS: the failure is layerfs's.",
                ),
                Err(e) => {
                    let _ = write!(
                        msg,
                        "\n\nWith /usr/bin/fuse-overlayfs as mount program they fail too: {}",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
        panic!("{msg}");
    }
}

/// No mount under `dir` and, within a few seconds of the unmounts, no
/// daemon of the pinned binary `prog` (each exits when its mount goes).
fn ensure_nothing_left(dir: &Path, prog: &Path) {
    let left = mounts_under(dir);
    unmount_all(dir);
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    let start = Instant::now();
    loop {
        let daemons = processes_of(prog);
        if daemons.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} daemons still running 10 s after their mounts went: pids {daemons:?}",
            prog.display()
        );
        sleep(Duration::from_millis(100));
    }
}

/// Pids of the live (not zombie) processes running `exe`.
fn processes_of(exe: &Path) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
                && !fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// docker

struct Docker {
    dir: PathBuf,
    docker: PathBuf,
    /// For `layerfs diff`.
    layerfs: PathBuf,
    /// The mount program is layerfs (so `layerfs diff MOUNTPOINT` works).
    mounts_are_layerfs: bool,
}

impl Docker {
    fn start(dir: &Path, prog: &Path, layerfs: &Path) -> Res<Self> {
        let out = must(
            Command::new(Path::new(REPO).join("scripts/engines/dockerd-env.sh"))
                .arg(dir)
                .arg("start")
                .arg(prog),
            LONG,
        )?;
        Ok(Docker {
            dir: dir.to_owned(),
            docker: PathBuf::from(out.trim()),
            layerfs: layerfs.to_owned(),
            mounts_are_layerfs: prog == layerfs,
        })
    }

    fn ok(&self, args: &[&str]) -> Res<String> {
        must(Command::new(&self.docker).args(args), LONG)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mount-program.log")).unwrap_or_default()
    }

    fn inspect(&self, name: &str, field: &str) -> Res<String> {
        let fmt = format!("{{{{.GraphDriver.Data.{field}}}}}");
        Ok(self
            .ok(&["inspect", name, "--format", &fmt])?
            .trim()
            .to_owned())
    }

    /// `docker diff` and `layerfs diff` of the container's upper agree
    /// (docker's own files live in the container's "-init" layer, a lower).
    fn check_diff(&self, name: &str) -> Res<BTreeSet<String>> {
        let engine = change_set(&self.ok(&["diff", name])?);
        let upper = self.inspect(name, "UpperDir")?;
        let lowers = self.inspect(name, "LowerDir")?;
        let ours = without_fuse_overlayfs_markers(
            layerfs_diff(&self.layerfs, &upper, &lowers, false)?,
            self.mounts_are_layerfs,
        );
        ensure!(
            engine == ours,
            "{}\ndocker diff {name}: {engine:?}\nlayerfs diff --upper {upper} --lower {lowers}: {ours:?}",
            set_diff("docker diff vs layerfs diff", &engine, &ours)
        );
        Ok(engine)
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = run(
            Command::new(Path::new(REPO).join("scripts/engines/dockerd-env.sh"))
                .arg(&self.dir)
                .arg("stop"),
            LONG,
        );
        unmount_all(&self.dir);
    }
}

fn docker_scenarios(d: &Docker, rootfs: &Path, t: &mut Timings) -> Res {
    let drun = |extra: &[&str]| -> Res<String> {
        let mut args = vec!["run", "--network=none"];
        args.extend(extra);
        d.ok(&args)
    };
    t.step("docker import", || {
        d.ok(&["import", rootfs.to_str().unwrap(), "lfs-base:latest"])
    })?;
    t.step(
        "docker run + commit: a layer with whiteouts and an opaque dir",
        || {
            drun(&[
                "--name",
                "prep",
                "lfs-base",
                "sh",
                "-c",
                "rm /app.py && rm -rf /srv/data/olddir && mkdir /srv/data/olddir \
             && echo fresh > /srv/data/olddir/only && echo layered > /srv/data/layered.txt",
            ])?;
            d.ok(&["commit", "prep", "lfs-layered:latest"])?;
            Ok(())
        },
    )?;
    let archive = d.dir.join("lfs-layered.tar");
    t.step("docker save, rmi, docker load", || {
        d.ok(&[
            "save",
            "-o",
            archive.to_str().unwrap(),
            "lfs-layered:latest",
        ])?;
        d.ok(&["rm", "prep"])?;
        d.ok(&["rmi", "lfs-layered:latest", "lfs-base:latest"])?;
        let out = d.ok(&["load", "-i", archive.to_str().unwrap()])?;
        ensure!(out.contains("lfs-layered"), "docker load: {out}");
        Ok(())
    })?;
    let out = t.step("docker run: the loaded layers, then changes", || {
        drun(&[
            "--name",
            "changes",
            "lfs-layered",
            "sh",
            "-c",
            &format!(
                "test ! -e /app.py && test \"$(ls -A /srv/data/olddir)\" = only \
                 && test \"$(cat /srv/data/layered.txt)\" = layered && {CHANGES}"
            ),
        ])
    })?;
    ensure!(out.contains("done"), "container output: {out}");
    let diff = t.step("docker diff = layerfs diff", || d.check_diff("changes"))?;
    expect_contains(
        &diff,
        &[
            "A /srv/data/new.txt",
            "C /srv/data/change.txt",
            "D /srv/data/delete.txt",
            "D /srv/data/olddir",
            "A /srv/data/newdir/deeper/f",
            "A /srv/data/keep.sym",
            "C /usr/lib/python3.11/json",
        ],
        "docker diff",
    )?;
    t.step("docker commit + run the new image", || {
        d.ok(&["commit", "changes", "lfs-changed:latest"])?;
        let verify = format!("test ! -e /app.py\n{VERIFY}");
        let out = drun(&["--rm", "lfs-changed", "sh", "-c", &verify])?;
        ensure!(out.contains("verified"), "output: {out}");
        Ok(())
    })?;
    t.step("layerfs diff MOUNTPOINT of a running container", || {
        drun(&[
            "-d",
            "--name",
            "running",
            "lfs-changed",
            "sh",
            "-c",
            "echo more >> /srv/data/new.txt; rm /srv/data/keep.hard; touch /ready; exec sleep 600",
        ])?;
        let start = Instant::now();
        while d.ok(&["exec", "running", "test", "-e", "/ready"]).is_err() {
            ensure!(start.elapsed() < SHORT, "the container never got ready");
            sleep(Duration::from_millis(100));
        }
        let ours = if d.mounts_are_layerfs {
            layerfs_diff_mount(&d.layerfs, &d.inspect("running", "MergedDir")?)?
        } else {
            let upper = d.inspect("running", "UpperDir")?;
            layerfs_diff(
                &d.layerfs,
                &upper,
                &d.inspect("running", "LowerDir")?,
                false,
            )?
        };
        let ours = without_fuse_overlayfs_markers(ours, d.mounts_are_layerfs);
        let engine = change_set(&d.ok(&["diff", "running"])?);
        ensure!(
            engine == ours,
            "{}",
            set_diff("running container", &engine, &ours)
        );
        expect_contains(
            &engine,
            &["C /srv/data/new.txt", "D /srv/data/keep.hard", "A /ready"],
            "docker diff running",
        )?;
        d.ok(&["rm", "--force", "running"])?;
        Ok(())
    })?;
    let log = d.log();
    let bad = failed_calls(&log);
    ensure!(
        bad.is_empty(),
        "failed mount-program calls:\n{}",
        bad.join("\n")
    );
    ensure!(
        log.contains("argv: "),
        "the fuse-overlayfs shim was never called"
    );
    Ok(())
}

#[test]
fn docker_fuse_overlayfs_driver_runs_layerfs() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP docker_fuse_overlayfs_driver_runs_layerfs: needs root and /dev/fuse");
        return;
    }
    let needed = [
        ("/usr/sbin/dockerd", "docker.io"),
        ("/usr/bin/docker", "docker.io"),
        ("/usr/bin/containerd", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/fusermount3", "fuse3"),
    ];
    if let Err(e) = ensure_packages(&needed) {
        eprintln!("SKIP docker_fuse_overlayfs_driver_runs_layerfs: cannot install docker.io: {e}");
        return;
    }
    let rootfs = rootfs_tar().expect("build the rootfs tarball");
    // Short: dockerd's and containerd's sockets live under it.
    let tmp = tempfile::Builder::new()
        .prefix("lfs-dk.")
        .tempdir()
        .unwrap();
    let pinned = pinned_layerfs(tmp.path());
    let (prog, is_layerfs) = mount_program(&pinned);

    let dir = tmp.path().join("d");
    let docker = match Docker::start(&dir, &prog, &pinned) {
        Ok(d) => d,
        Err(e) => {
            unmount_all(&dir);
            eprintln!(
                "SKIP docker_fuse_overlayfs_driver_runs_layerfs: dockerd cannot run here: {e}"
            );
            return;
        }
    };
    let mut t = Timings::default();
    let r = docker_scenarios(&docker, &rootfs, &mut t);
    let log = docker.log();
    eprintln!("mount-program calls:\n{}", argv_summary(&log, &dir));
    let dockerd_log = fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
    drop(docker);
    eprintln!("{}", t.report(&format!("docker on {}", prog.display())));
    ensure_nothing_left(&dir, &pinned);
    if let Err(e) = r {
        let tail: Vec<&str> = dockerd_log.lines().rev().take(15).collect();
        let mut msg = format!(
            "docker with {}: {e}\n\nmount-program log:\n{log}\ndockerd.log (last lines, newest first):\n{}",
            prog.display(),
            tail.join("\n")
        );
        if is_layerfs && Path::new(FUSE_OVERLAYFS).exists() {
            let dir = tmp.path().join("ref");
            let mut t = Timings::default();
            let r = Docker::start(&dir, Path::new(FUSE_OVERLAYFS), &pinned)
                .and_then(|d| docker_scenarios(&d, &rootfs, &mut t));
            ensure_nothing_left(&dir, &pinned);
            match r {
                Ok(()) => msg.push_str(
                    "\n\nWith /usr/bin/fuse-overlayfs behind the shim the same scenarios PASS: the failure is layerfs's.",
                ),
                Err(e) => {
                    let _ = write!(
                        msg,
                        "\n\nWith /usr/bin/fuse-overlayfs behind the shim they fail too: {}",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------
// rootless podman

const ROOTLESS_USER: &str = "layerfs-engines";

/// Puts /dev/fuse's mode back as it was.
struct FuseMode(u32);

impl Drop for FuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
    }
}

/// An ordinary user with a subordinate id range, for rootless podman;
/// removed again (with its id ranges) when the guard goes.
fn ensure_rootless_user() -> Res<RootlessUser> {
    let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let created = !run(Command::new("id").args(["-u", ROOTLESS_USER]), SHORT).ok;
    if created {
        must(
            Command::new("useradd")
                .args(["--no-create-home", "--home-dir", "/nonexistent"])
                .args(["--shell", "/usr/sbin/nologin", ROOTLESS_USER]),
            SHORT,
        )?;
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        if !text
            .lines()
            .any(|l| l.starts_with(&format!("{ROOTLESS_USER}:")))
        {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .map_err(|e| format!("{file}: {e}"))?;
            writeln!(f, "{ROOTLESS_USER}:400000:65536").map_err(|e| format!("{file}: {e}"))?;
        }
    }
    Ok(RootlessUser { created })
}

struct RootlessUser {
    created: bool,
}

impl Drop for RootlessUser {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        let _ = run(Command::new("userdel").arg(ROOTLESS_USER), SHORT);
        for file in ["/etc/subuid", "/etc/subgid"] {
            if let Ok(text) = fs::read_to_string(file) {
                let prefix = format!("{ROOTLESS_USER}:");
                let kept: String = text
                    .lines()
                    .filter(|l| !l.starts_with(&prefix))
                    .map(|l| format!("{l}\n"))
                    .collect();
                if kept != text {
                    let _ = fs::write(file, kept);
                }
            }
        }
    }
}

fn rootless_scenarios(p: &Podman, rootfs: &Path, t: &mut Timings) -> Res {
    t.step("rootless podman import", || {
        p.ok(&[
            "import",
            rootfs.to_str().unwrap(),
            "localhost/lfs-base:latest",
        ])
    })?;
    let out = t.step("rootless podman run: add, change, delete", || {
        p.ok(&[
            "run",
            "--network=host",
            "--name",
            "changes",
            "localhost/lfs-base",
            "sh",
            "-c",
            CHANGES,
        ])
    })?;
    ensure!(out.contains("done"), "container output: {out}");
    let diff = t.step("rootless podman diff = layerfs diff --userxattr", || {
        p.check_diff("changes")
    })?;
    expect_contains(
        &diff,
        &[
            "A /srv/data/new.txt",
            "C /srv/data/change.txt",
            "D /srv/data/delete.txt",
            "C /usr/lib/python3.11/json",
        ],
        "podman diff",
    )?;
    t.step("rootless podman commit + run the new image", || {
        p.ok(&["commit", "changes", "localhost/lfs-changed:latest"])?;
        let out = p.ok(&[
            "run",
            "--rm",
            "--network=host",
            "localhost/lfs-changed",
            "sh",
            "-c",
            VERIFY,
        ])?;
        ensure!(out.contains("verified"), "output: {out}");
        Ok(())
    })?;
    let bad = failed_calls(&p.log());
    ensure!(
        bad.is_empty(),
        "failed mount-program calls:\n{}",
        bad.join("\n")
    );
    Ok(())
}

/// Rootless podman (an ordinary user, its user namespace, cgroups left to
/// podman) with layerfs as mount program. podman passes no `userxattr`
/// here, so layerfs has to notice by itself that trusted.* xattrs are out
/// of reach (fuse-overlayfs then uses user.* xattrs).
#[test]
fn rootless_podman_with_layerfs() {
    use std::os::unix::fs::{PermissionsExt, chown};
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP rootless_podman_with_layerfs: needs root (to set up a user) and /dev/fuse");
        return;
    }
    let needed = [
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/conmon", "conmon"),
        ("/usr/libexec/podman/catatonit", "catatonit"),
        ("/usr/bin/newuidmap", "uidmap"),
        ("/usr/bin/fusermount3", "fuse3"),
    ];
    let _user = match ensure_packages(&needed).and_then(|()| ensure_rootless_user()) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("SKIP rootless_podman_with_layerfs: {e}");
            return;
        }
    };
    let uid: u32 = must(Command::new("id").args(["-u", ROOTLESS_USER]), SHORT)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("uid of the rootless user");
    let rootfs = rootfs_tar().expect("build the rootfs tarball");
    let tmp = tempfile::Builder::new()
        .prefix("lfs-rootless.")
        .tempdir()
        .unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let pinned = pinned_layerfs(tmp.path());
    let tar = tmp.path().join("rootfs.tar");
    fs::copy(&rootfs, &tar).unwrap();
    // An ordinary user opens /dev/fuse (Debian's default mode is 0666).
    let old = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
    let _restore = FuseMode(old);
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();

    let attempt = |name: &str, prog: &Path, t: &mut Timings| -> Res {
        let dir = tmp.path().join(name);
        fs::create_dir(&dir).map_err(|e| e.to_string())?;
        chown(&dir, Some(uid), None).map_err(|e| e.to_string())?;
        let r = Podman::new_as(&dir, prog, &pinned, Some(ROOTLESS_USER)).and_then(|p| {
            let r = rootless_scenarios(&p, &tar, t);
            let log = p.log();
            drop(p);
            r.map_err(|e| format!("{e}\n\nmount-program log ({}):\n{log}", prog.display()))
        });
        ensure_nothing_left(&dir, &pinned);
        r
    };
    let mut t = Timings::default();
    let (prog, is_layerfs) = mount_program(&pinned);
    let r = attempt("p", &prog, &mut t);
    eprintln!(
        "{}",
        t.report(&format!("rootless podman on {}", prog.display()))
    );
    if let Err(e) = r {
        let mut msg = format!("rootless podman with {}: {e}", prog.display());
        if is_layerfs && Path::new(FUSE_OVERLAYFS).exists() {
            match attempt("ref", Path::new(FUSE_OVERLAYFS), &mut Timings::default()) {
                Ok(()) => msg.push_str(
                    "\n\nWith /usr/bin/fuse-overlayfs as mount program the same scenarios PASS: the failure is layerfs's.",
                ),
                Err(e) => {
                    let _ = write!(
                        msg,
                        "\n\nWith /usr/bin/fuse-overlayfs as mount program they fail too: {}",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------
// What docker does to a container's rootfs: unmount, and mount again at once
// at the same path.

/// When a mount is unmounted from outside, its daemon must not unmount its
/// mount point again on the way out, nor remove the `/run/layerfs` record of
/// that path: by then the engine may have mounted the next layerfs there.
/// (docker starts ~2.5% of its containers on an empty directory otherwise:
/// `exec: "sh": executable file not found in $PATH`, and `layerfs diff
/// MOUNTPOINT` finds no record of a running container now and then.)
#[test]
fn remount_at_the_same_path_survives_the_old_daemon() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!(
            "SKIP remount_at_the_same_path_survives_the_old_daemon: needs root and /dev/fuse"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layerfs = pinned_layerfs(tmp.path());
    let root = tmp.path();
    fs::create_dir(root.join("lower")).unwrap();
    fs::write(root.join("lower/f"), "lower").unwrap();
    let m = root.join("m");
    fs::create_dir(&m).unwrap();
    let mut lost = Vec::new();
    let mut unrecorded = Vec::new();
    for i in 0..300 {
        let (u, w) = (root.join(format!("u{i}")), root.join(format!("w{i}")));
        fs::create_dir(&u).unwrap();
        fs::create_dir(&w).unwrap();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            root.join("lower").display(),
            u.display(),
            w.display()
        );
        // Straight one after the other, as the engines do (no polling).
        let st = Command::new(&layerfs)
            .args(["-o", &opts])
            .arg(&m)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "mount {i}: {st}");
        if mount_line(&m).is_none() {
            lost.push(i);
            continue;
        }
        // And its record for `layerfs diff MOUNTPOINT` is still there.
        let diff = Command::new(&layerfs)
            .arg("diff")
            .arg(&m)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if !diff.success() {
            unrecorded.push(i);
        }
        // Fails too when the mount went in the meantime.
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&m)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if !st.success() {
            lost.push(i);
        }
    }
    ensure_nothing_left(root, &layerfs);
    assert!(
        unrecorded.is_empty(),
        "`layerfs diff MOUNTPOINT` found no record of {} of 300 running mounts \
         (mounts {unrecorded:?}): the previous daemon removed the record of the path on \
         its way out; lost mounts besides: {lost:?}",
        unrecorded.len()
    );
    assert!(
        lost.is_empty(),
        "{} of 300 mounts were gone right after layerfs returned, or before their \
         unmount (mounts {lost:?}): the previous daemon unmounted the path on its way out",
        lost.len()
    );
}
