//! The seeds' scenario end to end, on layers built from real Debian packages
//! by `scripts/debian-layers.sh` (cached in the repository's `.cache/`):
//!
//! * an image of four layer directories — `base` (busybox, libc) and
//!   `python` (`python3-minimal`), together the seeds' "base with Python",
//!   then `flask` (`python3-flask` and what it needs) and `hello` (`/app.py`,
//!   a Flask app answering "hello world!") — is mounted with layerfs over a
//!   fresh upper; `chroot MNT python3 /app.py` serves "hello world!" on
//!   127.0.0.1; the app is changed through the mount to say "hello beautiful
//!   world!" and restarted; it serves the new text; `layerfs diff` shows
//!   exactly `C /app.py`; `layerfs export` writes the upper as a layer tar,
//!   and that tar, imported with `layerfs import` as a new top layer of the
//!   image, serves "hello beautiful world!" from a fresh mount;
//! * layer sharing: a second image on the same `base`/`python`/`flask`
//!   directories with its own `/app2.py` is mounted at the same time; both
//!   apps serve at once, and each container's change lands in its own upper
//!   only.
//!
//! Python runs with `PYTHONDONTWRITEBYTECODE=1`, so no `__pycache__` ends up
//! in the uppers. The servers listen on free ports, every wait is bounded,
//! and servers and mounts are stopped by guards (also when a step fails).
//!
//! Needs root (chroot, FUSE mounts, layers with device-node whiteouts). Tools
//! that are missing (`setfattr`, `fusermount3`) are installed with apt-get;
//! if the Debian packages cannot be downloaded at all, the tests print a SKIP
//! line and pass.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{LayerfsMount, Syntax, layerfs_bin};

fn skip(why: &str) {
    eprintln!("SKIP seeds: {why}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/debian-layers.sh` keeps the layers (shared with
/// `scripts/demo.sh`; concurrent builders wait for each other).
fn layers_dir() -> PathBuf {
    repo().join(".cache/layers")
}

/// Output of a command run with a time limit.
struct Output {
    status: Option<ExitStatus>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `cmd` with stdout/stderr in files, killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("layerfs-seeds-cmd-")
        .tempdir()
        .expect("temp dir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("log"))
        .stderr(fs::File::create(&err).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(st) => break Some(st),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Output {
        status,
        stdout: fs::read(&out).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&fs::read(&err).unwrap_or_default()).into_owned(),
    }
}

/// Runs `cmd` (bounded); panics with its output unless it succeeds.
fn must(cmd: &mut Command, limit: Duration) -> String {
    let o = run_bounded(cmd, limit);
    match o.status {
        None => panic!("{cmd:?} did not finish within {limit:?}\n{}", o.stderr),
        Some(st) if !st.success() => {
            panic!("{cmd:?} failed ({st}):\n{}{}", o.stdout(), o.stderr)
        }
        _ => o.stdout(),
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Checks root and installs missing tools (once per process).
fn tools() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        if !layerfs::oci::running_as_root() {
            return Err("not root (needs chroot, FUSE mounts, whiteout device nodes)".into());
        }
        for tool in ["apt-get", "dpkg-deb", "chroot", "flock"] {
            if !have(tool) {
                return Err(format!("'{tool}' is missing"));
            }
        }
        let missing: Vec<&str> = [("setfattr", "attr"), ("fusermount3", "fuse3")]
            .into_iter()
            .filter(|(tool, _)| !have(tool))
            .map(|(_, pkg)| pkg)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let install = || {
            let mut c = Command::new("apt-get");
            c.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(["-o", "DPkg::Lock::Timeout=300"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive");
            run_bounded(&mut c, Duration::from_secs(600))
        };
        if !install().ok() {
            // A fresh machine may have no package lists yet.
            let mut c = Command::new("apt-get");
            c.args(["update", "-q", "-o", "DPkg::Lock::Timeout=300"]);
            run_bounded(&mut c, Duration::from_secs(600));
            let o = install();
            if !o.ok() {
                return Err(format!("cannot install {missing:?}: {}", o.stderr));
            }
        }
        Ok(())
    })
    .clone()
}

/// Builds (or finds up to date) the layers of one image with
/// `scripts/debian-layers.sh`, topmost first. `Ok(None)`: the Debian
/// packages cannot be downloaded (the caller skips).
fn image(layers: &[&str]) -> Result<Option<Vec<PathBuf>>, String> {
    let mut cmd = Command::new(repo().join("scripts/debian-layers.sh"));
    cmd.arg(layers_dir()).args(layers);
    let o = run_bounded(&mut cmd, Duration::from_secs(900));
    if !o.ok() {
        if o.stderr.contains("could not download") {
            return Ok(None);
        }
        return Err(format!(
            "scripts/debian-layers.sh {layers:?} failed ({:?}):\n{}",
            o.status, o.stderr
        ));
    }
    let want: Vec<PathBuf> = layers.iter().map(|l| layers_dir().join(l)).collect();
    // The script's output contract: the lowerdir string, topmost first.
    let lowerdir = o.stdout();
    let expect = want
        .iter()
        .map(|p| p.to_str().expect("utf-8 path"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(
        lowerdir.trim_end(),
        expect,
        "lowerdir printed by the script"
    );
    Ok(Some(want))
}

/// Tools and the layers of the given images, or a SKIP (None).
fn setup(images: &[&[&str]]) -> Option<Vec<Vec<PathBuf>>> {
    if let Err(e) = tools() {
        skip(&e);
        return None;
    }
    let mut out = Vec::new();
    for layers in images {
        let start = Instant::now();
        match image(layers) {
            Ok(Some(dirs)) => out.push(dirs),
            Ok(None) => {
                skip("the Debian packages cannot be downloaded (apt-get download failed)");
                return None;
            }
            Err(e) => panic!("{e}"),
        }
        eprintln!("seeds: layers {layers:?} ready in {:?}", start.elapsed());
    }
    Some(out)
}

/// A free TCP port on 127.0.0.1 (free when asked; a server that then
/// cannot bind it is restarted on another one).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// GET http://127.0.0.1:PORT/ → the body of a 200 answer.
fn http_get(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(3))))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {resp:?}"))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("not a 200 answer: {head:?}"));
    }
    Ok(body.to_string())
}

/// `chroot MNT python3 SCRIPT` serving on a port; killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    what: String,
}

impl Server {
    /// Starts the app and waits (bounded) until it answers; returns it with
    /// the first answer's body.
    fn start(mnt: &Path, script: &str, logdir: &Path) -> (Server, String) {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log = logdir.join(format!("{}-{port}.log", script.trim_start_matches('/')));
            let out = fs::File::create(&log).expect("log");
            let err = out.try_clone().expect("log");
            let child = Command::new("chroot")
                .arg(mnt)
                .args(["python3", script])
                .env("PORT", port.to_string())
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn chroot python3");
            let mut srv = Server {
                child: Some(child),
                port,
                log,
                what: format!("chroot {} python3 {script} (port {port})", mnt.display()),
            };
            match srv.wait_ready(Duration::from_secs(30)) {
                Ok(body) => return (srv, body),
                Err(e) => {
                    last = e;
                    let in_use = srv.log_text().contains("Address already in use");
                    drop(srv);
                    if !in_use {
                        break;
                    }
                    eprintln!("seeds: port {port} taken meanwhile (attempt {attempt}), retrying");
                }
            }
        }
        panic!("{last}");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let last_err = match http_get(self.port) {
                Ok(body) => return Ok(body),
                Err(e) => e,
            };
            let child = self.child.as_mut().expect("running");
            if let Some(st) = child.try_wait().expect("wait") {
                return Err(format!(
                    "{} exited ({st}) before answering:\n{}",
                    self.what,
                    self.log_text()
                ));
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{} did not answer within {limit:?} (last error: {last_err}):\n{}",
                    self.what,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, wait (bounded), SIGKILL if need be.
    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) of the child this guard started (not yet reaped).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                eprintln!("seeds: {} ignored SIGTERM; killing", self.what);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn layerfs(args: &[&OsStr]) -> String {
    must(
        Command::new(layerfs_bin()).args(args),
        Duration::from_secs(120),
    )
}

/// `layerfs diff MOUNTPOINT`.
fn diff_mount(m: &LayerfsMount) -> String {
    layerfs(&["diff".as_ref(), m.path().as_os_str()])
}

/// `layerfs diff --upper U --lower L...` (or `export`) arguments.
fn upper_lower_args<'a>(upper: &'a Path, lowers: &'a [PathBuf]) -> Vec<&'a OsStr> {
    let mut v: Vec<&OsStr> = vec!["--upper".as_ref(), upper.as_os_str()];
    for l in lowers {
        v.push("--lower".as_ref());
        v.push(l.as_os_str());
    }
    v
}

/// Relative paths of everything in `dir` (sorted).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn temp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// Replaces `from` by `to` in the file, through the mount (as an editor in
/// the container would: the file is copied up and rewritten).
fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).expect("read app");
    assert!(
        text.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    fs::write(path, text.replace(from, to)).expect("write app");
}

#[test]
fn flask_app_change_diff_export_import() {
    let t0 = Instant::now();
    let Some(images) = setup(&[&["hello", "flask", "python", "base"]]) else {
        return;
    };
    let lowers = &images[0];
    let logs = temp("layerfs-seeds-logs-");

    // 1. Mount the image and serve.
    let m = LayerfsMount::new(lowers, true, Syntax::Subcommand);
    let upper = m.upper().expect("rw mount").to_path_buf();
    assert_eq!(diff_mount(&m), "", "a fresh mount changes nothing");
    let (srv, body) = Server::start(m.path(), "/app.py", logs.path());
    assert_eq!(body, "hello world!");
    srv.stop();
    eprintln!("seeds: served \"hello world!\" at {:?}", t0.elapsed());

    // 2. Change the app through the mount and restart it.
    edit(
        &m.path().join("app.py"),
        "hello world!",
        "hello beautiful world!",
    );
    let (srv, body) = Server::start(m.path(), "/app.py", logs.path());
    assert_eq!(body, "hello beautiful world!");
    srv.stop();

    // 3. The diff is exactly the change (no __pycache__, no parent dirs).
    assert_eq!(diff_mount(&m), "C /app.py\n", "layerfs diff MOUNTPOINT");
    assert_eq!(tree(&upper), ["app.py"], "upper dir");
    let mut args: Vec<&OsStr> = vec!["diff".as_ref()];
    args.extend(upper_lower_args(&upper, lowers));
    assert_eq!(
        layerfs(&args),
        "C /app.py\n",
        "layerfs diff --upper --lower"
    );
    // The lowers are never written.
    let hello = fs::read_to_string(lowers[0].join("app.py")).unwrap();
    assert!(
        hello.contains("\"hello world!\""),
        "the hello layer changed:\n{hello}"
    );

    // 4. Export the upper as a layer: from the mount and from the dirs,
    // the same bytes. (The upper lives in the mount's temp dir, gone once
    // it is unmounted.)
    let out = temp("layerfs-seeds-export-");
    let tar_mnt = out.path().join("from-mount.tar");
    layerfs(&[
        "export".as_ref(),
        m.path().as_os_str(),
        "-o".as_ref(),
        tar_mnt.as_os_str(),
    ]);
    let tar = out.path().join("change.tar");
    let mut args: Vec<&OsStr> = vec!["export".as_ref()];
    args.extend(upper_lower_args(&upper, lowers));
    args.extend(["-o".as_ref(), tar.as_os_str()]);
    layerfs(&args);
    m.unmount().expect("unmount");
    assert!(
        fs::read(&tar).unwrap() == fs::read(&tar_mnt).unwrap(),
        "export from the mount and from --upper/--lower differ"
    );

    // 5. Import it as a new top layer and serve from a fresh mount.
    let dest = out.path().join("imported");
    let printed = layerfs(&[
        "import".as_ref(),
        "-q".as_ref(),
        tar.as_os_str(),
        dest.as_os_str(),
    ]);
    let lowerdir = printed
        .lines()
        .find_map(|l| l.strip_prefix("lowerdir="))
        .unwrap_or_else(|| panic!("no lowerdir= line in: {printed}"));
    assert!(!lowerdir.contains(':'), "one layer expected: {lowerdir}");
    let new_layer = PathBuf::from(lowerdir);
    assert_eq!(tree(&new_layer), ["app.py"], "imported layer");
    let mut stacked = vec![new_layer];
    stacked.extend(lowers.iter().cloned());
    let m2 = LayerfsMount::new(&stacked, true, Syntax::Subcommand);
    let (srv, body) = Server::start(m2.path(), "/app.py", logs.path());
    assert_eq!(
        body, "hello beautiful world!",
        "served from the imported layer"
    );
    srv.stop();
    assert_eq!(diff_mount(&m2), "", "running the app again changes nothing");
    m2.unmount().expect("unmount");
    eprintln!(
        "seeds: flask_app_change_diff_export_import took {:?}",
        t0.elapsed()
    );
}

#[test]
fn two_images_share_layers() {
    let t0 = Instant::now();
    let Some(images) = setup(&[
        &["hello", "flask", "python", "base"],
        &["app2", "flask", "python", "base"],
    ]) else {
        return;
    };
    let (img1, img2) = (&images[0], &images[1]);
    assert_eq!(
        img1[1..],
        img2[1..],
        "both images use the same flask/python/base dirs"
    );
    let logs = temp("layerfs-seeds-logs-");

    let m1 = LayerfsMount::new(img1, true, Syntax::Subcommand);
    let m2 = LayerfsMount::new(img2, true, Syntax::Subcommand);

    // Each image sees its own app only.
    assert!(m1.path().join("app.py").exists() && !m1.path().join("app2.py").exists());
    assert!(m2.path().join("app2.py").exists() && !m2.path().join("app.py").exists());
    // Both read the shared layers' files from the same directories on disk:
    // same content, and (all layers on one filesystem, as in overlayfs) the
    // on-disk inode number.
    let rel = "usr/lib/python3/dist-packages/flask/app.py";
    let disk = fs::metadata(img1[1].join(rel)).expect("flask in the flask layer");
    for m in [&m1, &m2] {
        let st = fs::metadata(m.path().join(rel)).expect("flask through the mount");
        assert_eq!(st.ino(), disk.ino(), "{rel} through {}", m.path().display());
        assert_eq!(
            fs::read(m.path().join(rel)).unwrap(),
            fs::read(img1[1].join(rel)).unwrap()
        );
    }

    // Both apps serve at the same time.
    let (s1, body1) = Server::start(m1.path(), "/app.py", logs.path());
    assert_eq!(body1, "hello world!");
    let (s2, body2) = Server::start(m2.path(), "/app2.py", logs.path());
    assert_eq!(body2, "hello from app 2");
    assert_ne!(s1.port, s2.port);
    assert_eq!(
        http_get(s1.port).as_deref(),
        Ok("hello world!"),
        "app 1 while app 2 runs"
    );
    s2.stop();

    // Container 2 changes its app; container 1 is not affected.
    edit(
        &m2.path().join("app2.py"),
        "hello from app 2",
        "hello again from app 2",
    );
    let (s2, body2) = Server::start(m2.path(), "/app2.py", logs.path());
    assert_eq!(body2, "hello again from app 2");
    assert_eq!(http_get(s1.port).as_deref(), Ok("hello world!"));
    s2.stop();
    s1.stop();

    // Container 1 changes its app too.
    edit(
        &m1.path().join("app.py"),
        "hello world!",
        "hello beautiful world!",
    );
    let (s1, body1) = Server::start(m1.path(), "/app.py", logs.path());
    assert_eq!(body1, "hello beautiful world!");
    s1.stop();

    // Each change is in its own upper only; the shared layers are untouched.
    assert_eq!(diff_mount(&m1), "C /app.py\n");
    assert_eq!(diff_mount(&m2), "C /app2.py\n");
    assert_eq!(tree(m1.upper().unwrap()), ["app.py"]);
    assert_eq!(tree(m2.upper().unwrap()), ["app2.py"]);
    let st = fs::metadata(img1[1].join(rel)).unwrap();
    assert_eq!(
        (st.ino(), st.mtime(), st.size()),
        (disk.ino(), disk.mtime(), disk.size())
    );
    assert!(
        fs::read_to_string(img2[0].join("app2.py"))
            .unwrap()
            .contains("\"hello from app 2\"")
    );
    m2.unmount().expect("unmount");
    m1.unmount().expect("unmount");
    eprintln!("seeds: two_images_share_layers took {:?}", t0.elapsed());
}
