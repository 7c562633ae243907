//! `layerfs run`: runs a command in an ephemeral overlay of the lowers,
//! prints what it changed (`docker diff` lines) and exits with its status.
//!
//! Every test runs `layerfs run` with `TMPDIR` pointing into its own temp
//! dir, so that the scratch directory (upper, work, mount point) can be
//! checked afterwards: nothing may stay mounted below the test's dir and
//! the scratch directory must be gone, whether the command succeeded,
//! failed, could not start, died of a signal, or `layerfs run` itself got
//! SIGTERM/SIGINT (which it forwards to the command).
//!
//! `--chroot` runs `/bin/busybox sh` inside a tiny root layer: busybox comes
//! from the Debian package `busybox-static` (`apt-get download`, once, into
//! the gitignored `.cache/run-cmd/` of the repository, where it is also
//! unpacked; a package file already in `.cache/debs/` is used as is).
//!
//! Needs root (FUSE mounts, chroot, mknod).

mod pinned_bin;

use pinned_bin::bin;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Processes

/// Collects a spawned child's output; kills it (and panics) after `limit`.
fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    let reader = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A leftover process (the command, orphaned) may hold the pipes open:
    // say so in the output instead of waiting for it.
    let get = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or_else(|_| {
            format!("<{what} exited ({status}) but a leftover process holds this pipe open>")
                .into_bytes()
        })
    };
    Output {
        status,
        stdout: get(out),
        stderr: get(err),
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn run_timeout(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    wait_output(spawn(cmd), Duration::from_secs(60), &what)
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

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) of a process this test started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Mount points (as mountinfo spells them) at or below `dir`.
fn mounts_below(dir: &Path) -> Vec<String> {
    let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let prefix = canon.to_str().expect("UTF-8 temp path").to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

fn umount(target: &Path, flags: i32) -> bool {
    let t = CString::new(target.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid C string.
    unsafe { libc::umount2(t.as_ptr(), flags) == 0 }
}

fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run_cmd tests need root");
    // SAFETY: umask cannot fail; every test sets the same value.
    unsafe { libc::umask(0o022) };
}

// ---------------------------------------------------------------------------
// The test environment

/// A temp dir holding the layers, and `tmp`, the `TMPDIR` of `layerfs run`.
/// On drop (also while unwinding) anything still mounted below it is
/// unmounted and the commands it started (`marker` in their argv) killed.
struct Env {
    dir: tempfile::TempDir,
    tmp: PathBuf,
    /// A unique argument given to every command, to find leftovers.
    marker: String,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("layerfs-run-test.")
            .tempdir()
            .expect("tempdir");
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).expect("mkdir");
        let marker = format!("run-cmd-test-{}", dir.path().display());
        Env { dir, tmp, marker }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// `layerfs run ARGS -- sh -c SCRIPT marker`, not yet waited for.
    fn command(&self, args: &[&OsStr], cmd: &[&OsStr]) -> Command {
        let mut c = Command::new(bin());
        c.arg("run")
            .args(args)
            .arg("--")
            .args(cmd)
            .env("TMPDIR", &self.tmp)
            .current_dir(self.root());
        c
    }

    fn sh(&self, args: &[&OsStr], script: &str) -> Output {
        let cmd = [
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            self.marker.as_ref(),
        ];
        run_timeout(&mut self.command(args, &cmd))
    }

    /// What is left behind: mounts below the test dir, scratch entries,
    /// running commands.
    fn leftovers(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mounts = mounts_below(self.root());
        if !mounts.is_empty() {
            problems.push(format!("left mounted: {mounts:?}"));
        }
        let left: Vec<PathBuf> = fs::read_dir(&self.tmp)
            .expect("tmp")
            .map(|e| e.expect("entry").path())
            .collect();
        if !left.is_empty() {
            problems.push(format!("scratch left behind: {left:?}"));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while !pids_with_arg(self.marker.as_bytes()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pids = pids_with_arg(self.marker.as_bytes());
        if !pids.is_empty() {
            problems.push(format!("commands still running: {pids:?}"));
        }
        problems
    }

    /// Nothing mounted below the test dir, the scratch dir removed, and no
    /// command left running.
    fn assert_clean(&self) {
        let problems = self.leftovers();
        assert!(problems.is_empty(), "{}", problems.join("; "));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in pids_with_arg(self.marker.as_bytes()) {
            kill(p as u32, libc::SIGKILL);
        }
        let mut mounts = mounts_below(self.root());
        mounts.reverse();
        for m in mounts {
            if !umount(Path::new(&m), 0) {
                umount(Path::new(&m), libc::MNT_DETACH);
            }
        }
    }
}

fn os(p: &Path) -> &OsStr {
    p.as_os_str()
}

fn write(p: &Path, data: &str) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
    fs::write(p, data).expect("write");
}

/// The lower every scenario starts from.
fn std_lower(env: &Env) -> PathBuf {
    let l = env.path("lower");
    write(&l.join("keep"), "keep\n");
    write(&l.join("modify"), "old\n");
    write(&l.join("delete"), "delete me\n");
    write(&l.join("chmod-me"), "x\n");
    write(&l.join("tree/a/b/c"), "c\n");
    write(&l.join("tree/x"), "x\n");
    write(&l.join("etc/conf"), "a=1\n");
    l
}

/// The changes of `CHANGES`, as `layerfs run` prints them.
const CHANGES: &str = "echo new > created && echo more >> modify && rm delete && \
                       mkdir newdir && rm -rf tree && chmod 600 chmod-me";
const CHANGES_OUT: &str = "C /chmod-me\nA /created\nD /delete\nC /modify\nA /newdir\nD /tree\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

// ---------------------------------------------------------------------------
// Changes and exit status

#[test]
fn prints_what_the_command_changed_and_leaves_the_lower_alone() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let before = fs::read_dir(&l).unwrap().count();
    let out = env.sh(&["--lower".as_ref(), os(&l)], CHANGES);
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        CHANGES_OUT,
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(fs::read_to_string(l.join("modify")).unwrap(), "old\n");
    assert!(l.join("delete").exists() && l.join("tree/a/b/c").exists());
    assert_eq!(fs::read_dir(&l).unwrap().count(), before);
    let mode = fs::metadata(l.join("chmod-me"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
    env.assert_clean();
}

#[test]
fn the_command_runs_in_the_merged_view_and_its_output_comes_first() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let l2 = env.path("lower2");
    write(&l2.join("below"), "from lower2\n");
    write(&l2.join("keep"), "shadowed\n");
    let args = ["--lower".as_ref(), os(&l), "--lower".as_ref(), os(&l2)];
    let out = env.sh(&args, "cat keep below; echo x > n; pwd >&2");
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "keep\nfrom lower2\nA /n\n");
    // The working directory was the merged view inside the scratch dir.
    let cwd = text(&out.stderr);
    let tmp = fs::canonicalize(&env.tmp).unwrap();
    assert!(cwd.starts_with(tmp.to_str().unwrap()), "cwd {cwd:?}");
    env.assert_clean();
}

#[test]
fn the_command_reads_the_callers_stdin() {
    require_root();
    use std::io::Write;
    let env = Env::new();
    let l = std_lower(&env);
    let upper = env.path("upper");
    let args = ["--upper".as_ref(), os(&upper), "--lower".as_ref(), os(&l)];
    let cmd = [
        "sh".as_ref(),
        "-c".as_ref(),
        "cat > piped".as_ref(),
        env.marker.as_ref(),
    ];
    let mut c = env.command(&args, &cmd);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"from the caller\n").unwrap();
    drop(stdin);
    let out = wait_output(child, Duration::from_secs(60), "layerfs run");
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "A /piped\n");
    assert_eq!(
        fs::read_to_string(upper.join("piped")).unwrap(),
        "from the caller\n"
    );
    env.assert_clean();
}

#[test]
fn exit_status_is_the_commands() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let lower = ["--lower".as_ref(), os(&l)];
    let cases: &[(&str, i32, &str)] = &[
        ("true", 0, ""),
        ("exit 3", 3, ""),
        ("echo x > f; exit 3", 3, "A /f\n"),
        ("rm keep; exit 255", 255, "D /keep\n"),
        ("echo x > f; kill -KILL $$", 128 + libc::SIGKILL, "A /f\n"),
        (
            "rm delete; kill -TERM $$",
            128 + libc::SIGTERM,
            "D /delete\n",
        ),
        ("mkdir d; kill -USR1 $$", 128 + libc::SIGUSR1, "A /d\n"),
    ];
    for &(script, status, changes) in cases {
        let out = env.sh(&lower, script);
        assert_eq!(
            (code(&out), text(&out.stdout).as_str()),
            (Some(status), changes),
            "{script:?}: stderr {}",
            text(&out.stderr)
        );
        env.assert_clean();
    }
}

#[test]
fn a_command_that_cannot_start_leaves_nothing_behind() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let not_exec = env.path("not-executable");
    write(&not_exec, "#!/bin/sh\n");
    let missing = env.path("no/such/command");
    for cmd in [&missing, &not_exec] {
        let out = run_timeout(&mut env.command(&["--lower".as_ref(), os(&l)], &[os(cmd)]));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} started? {out:?}");
        assert!(err.contains(cmd.to_str().unwrap()), "{cmd:?}: {err}");
        assert!(out.stdout.is_empty(), "{cmd:?}: {}", text(&out.stdout));
        env.assert_clean();
    }
    // A missing lower: refused before anything is mounted.
    let gone = env.path("no-lower");
    let out = env.sh(&["--lower".as_ref(), os(&gone)], "true");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(gone.to_str().unwrap()),
        "{}",
        text(&out.stderr)
    );
    env.assert_clean();
}

// ---------------------------------------------------------------------------
// Output formats

/// A JSON value of the kinds `--json` prints.
#[derive(Debug, PartialEq)]
enum Json {
    Str(String),
    Bool(bool),
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

fn skip_ws(it: &mut Chars) {
    while it.next_if(|c| c.is_ascii_whitespace()).is_some() {}
}

fn expect_char(it: &mut Chars, want: char) -> Result<(), String> {
    skip_ws(it);
    match it.next() {
        Some(c) if c == want => Ok(()),
        other => Err(format!("expected {want:?}, found {other:?}")),
    }
}

/// The rest of a JSON string after its opening quote, unescaped.
fn json_string(it: &mut Chars) -> Result<String, String> {
    let mut s = String::new();
    loop {
        match it.next().ok_or("unterminated string")? {
            '"' => return Ok(s),
            '\\' => {
                let c = match it.next().ok_or("unterminated escape")? {
                    '"' => '"',
                    '\\' => '\\',
                    '/' => '/',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => {
                        let h: String = it.take(4).collect();
                        let cp = u32::from_str_radix(&h, 16).map_err(|_| "bad \\u")?;
                        // Paths here are ASCII/BMP; surrogates would need pairing.
                        char::from_u32(cp).ok_or("surrogate \\u escape")?
                    }
                    c => return Err(format!("bad escape \\{c}")),
                };
                s.push(c);
            }
            c if (c as u32) < 0x20 => return Err(format!("raw control char {c:?}")),
            c => s.push(c),
        }
    }
}

/// One flat JSON object of string and boolean members, strictly.
fn parse_json_object(line: &str) -> Result<BTreeMap<String, Json>, String> {
    let mut it = line.chars().peekable();
    let mut map = BTreeMap::new();
    expect_char(&mut it, '{')?;
    loop {
        expect_char(&mut it, '"')?;
        let key = json_string(&mut it)?;
        expect_char(&mut it, ':')?;
        skip_ws(&mut it);
        let value = if it.next_if_eq(&'"').is_some() {
            Json::Str(json_string(&mut it)?)
        } else {
            let word: String =
                std::iter::from_fn(|| it.next_if(char::is_ascii_lowercase)).collect();
            match word.as_str() {
                "true" => Json::Bool(true),
                "false" => Json::Bool(false),
                _ => return Err(format!("bad value {word:?}")),
            }
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate key {key:?}"));
        }
        skip_ws(&mut it);
        match it.next() {
            Some(',') => continue,
            Some('}') => break,
            other => return Err(format!("expected , or }} found {other:?}")),
        }
    }
    skip_ws(&mut it);
    match it.next() {
        None => Ok(map),
        Some(c) => Err(format!("trailing {c:?}")),
    }
}

#[test]
fn json_output_is_one_object_per_line() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let script = format!("{CHANGES}; echo q > 'a \"quoted\\ name'; echo n > 'new\nline'");
    let out = env.sh(&["--json".as_ref(), "--lower".as_ref(), os(&l)], &script);
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.ends_with('\n'), "{stdout:?}");
    let mut got = Vec::new();
    for line in stdout.lines() {
        let obj = parse_json_object(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(obj.len(), 2, "{line:?}");
        match (obj.get("kind"), obj.get("path")) {
            (Some(Json::Str(k)), Some(Json::Str(p))) => got.push(format!("{k} {p}")),
            _ => panic!("no kind/path in {line:?}"),
        }
    }
    let mut want: Vec<String> = CHANGES_OUT.lines().map(str::to_string).collect();
    want.push("A /a \"quoted\\ name".into());
    want.push("A /new\nline".into());
    want.sort_by(|a, b| a[2..].cmp(&b[2..]));
    assert_eq!(got, want);
    env.assert_clean();
}

#[test]
fn kind_filter_and_nul_output() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let script = format!("{CHANGES}; echo n > 'new\nline'");
    let args = [
        "-z".as_ref(),
        "--kind".as_ref(),
        "A,d".as_ref(),
        "--lower".as_ref(),
        os(&l),
    ];
    let out = env.sh(&args, &script);
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        out.stdout,
        b"A /created\0D /delete\0A /new\nline\0A /newdir\0D /tree\0"
    );
    env.assert_clean();
}

// ---------------------------------------------------------------------------
// --upper: the changes are kept in the overlay format

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let (cp, cn) = (
        CString::new(p.as_os_str().as_bytes()).ok()?,
        CString::new(name).ok()?,
    );
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer writable for its length.
    let n =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

/// The merged view through a mount: relative path → content (or `<dir>`).
fn view(mnt: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).expect("readdir").flatten() {
            let name = format!("{rel}{}", e.file_name().to_str().expect("UTF-8 names"));
            if e.file_type().unwrap().is_dir() {
                out.insert(name.clone(), "<dir>".into());
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.insert(name, fs::read_to_string(e.path()).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(mnt, "", &mut out);
    out
}

/// Mounts (layerfs or the kernel's overlayfs), snapshots the view, unmounts.
fn mounted_view(
    env: &Env,
    kernel: bool,
    lower: &Path,
    upper: &Path,
    name: &str,
) -> BTreeMap<String, String> {
    let (work, mnt) = (
        env.path(&format!("{name}-work")),
        env.path(&format!("{name}-mnt")),
    );
    fs::create_dir(&work).unwrap();
    fs::create_dir(&mnt).unwrap();
    let out = if kernel {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run_timeout(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&mnt),
        )
    } else {
        run_timeout(
            Command::new(bin())
                .arg("mount")
                .args([
                    OsStr::new("--lower"),
                    os(lower),
                    "--upper".as_ref(),
                    os(upper),
                ])
                .args([OsStr::new("--work"), os(&work), os(&mnt)]),
        )
    };
    assert!(out.status.success(), "mount: {}", text(&out.stderr));
    let v = view(&mnt);
    assert!(umount(&mnt, 0), "umount {}", mnt.display());
    v
}

#[test]
fn upper_dir_keeps_the_changes_in_overlay_format() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let upper = env.path("keep/upper");
    fs::create_dir(env.path("keep")).unwrap();
    let script = format!("{CHANGES}; rm -rf etc && mkdir etc && echo b=2 > etc/new");
    // Relative paths, resolved against the caller's working directory.
    let args = [
        "--upper".as_ref(),
        "keep/upper".as_ref(),
        "--lower".as_ref(),
        "lower".as_ref(),
    ];
    let out = env.sh(&args, &script);
    let want = "C /chmod-me\nA /created\nD /delete\nC /etc\nD /etc/conf\nA /etc/new\n\
                C /modify\nA /newdir\nD /tree\n";
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want);
    env.assert_clean();
    // Beside the upper: nothing left (the work dir is gone).
    let beside: Vec<_> = fs::read_dir(env.path("keep"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside, vec![OsStr::new("upper").to_os_string()]);
    // The kernel's format: whiteouts, an opaque directory, plain files.
    assert!(is_whiteout(&upper.join("delete")), "delete is no whiteout");
    assert!(is_whiteout(&upper.join("tree")), "tree is no whiteout");
    assert_eq!(
        getxattr(&upper.join("etc"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read_to_string(upper.join("created")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(upper.join("modify")).unwrap(),
        "old\nmore\n"
    );
    // `layerfs diff` of the kept upper says the same.
    let diff = run_timeout(Command::new(bin()).arg("diff").args([
        "--upper".as_ref(),
        os(&upper),
        "--lower".as_ref(),
        os(&l),
    ]));
    assert_eq!(text(&diff.stdout), want, "{}", text(&diff.stderr));
    // A later mount, by layerfs and by the kernel, shows the changes.
    let mut expected: BTreeMap<String, String> = [
        ("keep", "keep\n"),
        ("modify", "old\nmore\n"),
        ("chmod-me", "x\n"),
        ("created", "new\n"),
        ("newdir", "<dir>"),
        ("etc", "<dir>"),
        ("etc/new", "b=2\n"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(mounted_view(&env, false, &l, &upper, "layerfs"), expected);
    assert_eq!(mounted_view(&env, true, &l, &upper, "kernel"), expected);
    // A second run over the same upper continues from there.
    let out = env.sh(&args, "rm created; echo again > keep");
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    let want2 = "C /chmod-me\nD /delete\nC /etc\nD /etc/conf\nA /etc/new\nC /keep\n\
                 C /modify\nA /newdir\nD /tree\n";
    assert_eq!(text(&out.stdout), want2);
    expected.remove("created");
    expected.insert("keep".into(), "again\n".into());
    assert_eq!(mounted_view(&env, false, &l, &upper, "layerfs2"), expected);
    env.assert_clean();
}

#[test]
fn userxattr_upper_uses_user_overlay_xattrs() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    let upper = env.path("u");
    let args = [
        "--userxattr".as_ref(),
        "--upper".as_ref(),
        os(&upper),
        "--lower".as_ref(),
        os(&l),
    ];
    let out = env.sh(&args, "rm -rf tree && mkdir tree && rm keep");
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "D /keep\nC /tree\nD /tree/a\nD /tree/x\n"
    );
    assert_eq!(
        getxattr(&upper.join("tree"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(&upper.join("tree"), "trusted.overlay.opaque"),
        None
    );
    env.assert_clean();
}

// ---------------------------------------------------------------------------
// Signals: forwarded to the command, and nothing left mounted

/// How the test delivers a signal to `layerfs run`.
#[derive(Clone, Copy, Debug)]
enum Deliver {
    /// kill(2) of the `layerfs run` process alone (its command gets the
    /// signal only if layerfs forwards it).
    ToRun,
    /// kill(2) of the process group, as a terminal's Ctrl-C does (the
    /// command gets it directly, and maybe forwarded too).
    ToGroup,
}

/// Starts `layerfs run --upper U` of `script` (in a process group of its
/// own) and waits until the script has written `ready` (through the mount,
/// so it lands in the upper).
fn start_and_wait_ready(env: &Env, l: &Path, upper: &Path, script: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let cmd = [
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
        env.marker.as_ref(),
    ];
    let args = ["--upper".as_ref(), os(upper), "--lower".as_ref(), os(l)];
    let mut run = env.command(&args, &cmd);
    // SAFETY: only async-signal-safe signal(2) calls between fork and exec.
    unsafe {
        run.pre_exec(|| {
            // Default dispositions whatever the test runner inherited (a
            // shell's `&` ignores SIGINT): exec keeps ignored signals.
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        })
    };
    let mut child = spawn(run.process_group(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !upper.join("ready").exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let out = wait_output(child, Duration::from_secs(5), "layerfs run");
            panic!("layerfs run ended early ({st}): {}", text(&out.stderr));
        }
        assert!(Instant::now() < deadline, "the command never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Signals `layerfs run` once its command is ready, and checks its exit
/// status and output, and that nothing is left behind; returns the problems.
fn interrupt(script: &str, sig: i32, how: Deliver, status: i32, stdout: &str) -> Vec<String> {
    let env = Env::new();
    let l = std_lower(&env);
    let upper = env.path("upper");
    let child = start_and_wait_ready(&env, &l, &upper, script);
    let pid = child.id();
    match how {
        Deliver::ToRun => kill(pid, sig),
        // SAFETY: kill(2) of the process group this test created.
        Deliver::ToGroup => unsafe {
            libc::kill(-(pid as libc::pid_t), sig);
        },
    }
    let out = wait_output(child, Duration::from_secs(30), "layerfs run");
    let mut problems = Vec::new();
    let got = (out.status.code(), out.status.signal());
    if got != (Some(status), None) {
        problems.push(format!("exit {got:?}, want ({status}, None)"));
    }
    if text(&out.stdout) != stdout {
        problems.push(format!("stdout {:?}, want {stdout:?}", text(&out.stdout)));
    }
    if !out.stderr.is_empty() {
        problems.push(format!("stderr {:?}", text(&out.stderr)));
    }
    problems.extend(env.leftovers());
    problems
        .into_iter()
        .map(|p| format!("signal {sig} {how:?}: {p}"))
        .collect()
}

#[test]
fn sigterm_and_sigint_are_forwarded_and_the_overlay_unmounted() {
    require_root();
    let mut problems = Vec::new();
    for (sig, name, how) in [
        (libc::SIGTERM, "TERM", Deliver::ToRun),
        (libc::SIGINT, "INT", Deliver::ToRun),
        (libc::SIGINT, "INT", Deliver::ToGroup),
    ] {
        // The command traps the signal, records it in the overlay, exits 7.
        let script = format!(
            "trap 'echo got > got-{name}; exit 7' {name}; rm keep; echo > ready; \
             while :; do sleep 0.05; done"
        );
        let want = format!("A /got-{name}\nD /keep\nA /ready\n");
        problems.extend(interrupt(&script, sig, how, 7, &want));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_command_killed_by_the_forwarded_signal_gives_128_plus_signal() {
    require_root();
    let mut problems = Vec::new();
    for (sig, how) in [
        (libc::SIGTERM, Deliver::ToRun),
        (libc::SIGINT, Deliver::ToRun),
        (libc::SIGHUP, Deliver::ToRun),
        (libc::SIGTERM, Deliver::ToGroup),
    ] {
        // No `exec sleep`: the command must keep the marker in its argv.
        let script = "echo > ready; while :; do sleep 0.05; done";
        problems.extend(interrupt(script, sig, how, 128 + sig, "A /ready\n"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_background_process_outliving_the_command_does_not_keep_the_mount() {
    require_root();
    let env = Env::new();
    let l = std_lower(&env);
    // The background sleep keeps its working directory in the merged view
    // after the command exited: `layerfs run` must still unmount (wait,
    // kill it or detach lazily) and report the command's status and changes.
    let script = "echo x > f; sleep 3 >/dev/null 2>&1 & exit 4";
    let out = env.sh(&["--lower".as_ref(), os(&l)], script);
    let mut problems = Vec::new();
    if code(&out) != Some(4) {
        problems.push(format!("exit {:?}, want 4", out.status));
    }
    if text(&out.stdout) != "A /f\n" {
        problems.push(format!("stdout {:?}, want \"A /f\\n\"", text(&out.stdout)));
    }
    if !out.stderr.is_empty() {
        problems.push(format!("stderr {:?}", text(&out.stderr)));
    }
    problems.extend(env.leftovers());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// --chroot

/// `/bin/busybox` from the Debian package `busybox-static`, extracted once
/// into the cache (through a private dir, then renamed into place).
fn busybox() -> &'static Path {
    static BUSYBOX: OnceLock<PathBuf> = OnceLock::new();
    BUSYBOX.get_or_init(|| {
        let deb = busybox_deb();
        let stem = deb.file_stem().and_then(OsStr::to_str).expect("deb name");
        let cache = &Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/run-cmd");
        fs::create_dir_all(cache).expect("mkdir cache");
        let dest = cache.join(format!("root-{stem}"));
        let find = |root: &Path| {
            ["bin/busybox", "usr/bin/busybox"]
                .iter()
                .map(|p| root.join(p))
                .find(|p| p.is_file())
        };
        if let Some(p) = find(&dest) {
            return p;
        }
        let private = cache.join(format!("extract-{}", std::process::id()));
        let _ = fs::remove_dir_all(&private);
        let out = run_timeout(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&private));
        assert!(
            out.status.success(),
            "dpkg-deb -x {deb:?}: {}",
            text(&out.stderr)
        );
        if fs::rename(&private, &dest).is_err() {
            let _ = fs::remove_dir_all(&private); // another process was first
        }
        find(&dest).unwrap_or_else(|| panic!("no busybox in {deb:?}"))
    })
}

/// The package file: from `.cache/run-cmd/` or `.cache/debs/`, else
/// downloaded into `.cache/run-cmd/` (through a private dir, then renamed,
/// so concurrent test processes never see a partial file).
fn busybox_deb() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = repo.join(".cache/run-cmd");
    let find = |dir: &Path| -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find(&cache).or_else(|| find(&repo.join(".cache/debs"))) {
        return p;
    }
    let private = cache.join(format!("download-{}", std::process::id()));
    fs::create_dir_all(&private).expect("mkdir cache");
    let out = run_timeout(
        Command::new("apt-get")
            .args(["download", "-q", "busybox-static"])
            .current_dir(&private),
    );
    let got = find(&private).unwrap_or_else(|| {
        panic!(
            "apt-get download busybox-static failed: {}",
            text(&out.stderr)
        )
    });
    let dest = cache.join(got.file_name().unwrap());
    fs::rename(&got, &dest).expect("rename into the cache");
    let _ = fs::remove_dir_all(&private);
    dest
}

/// A root layer: busybox and a few files; an app layer above it.
fn rootfs(env: &Env) -> (PathBuf, PathBuf) {
    let base = env.path("base");
    fs::create_dir_all(base.join("bin")).unwrap();
    fs::copy(busybox(), base.join("bin/busybox")).unwrap();
    fs::set_permissions(base.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&base.join("etc/motd"), "welcome\n");
    write(&base.join("marker"), "in the layer\n");
    let app = env.path("app");
    write(&app.join("app/data"), "data\n");
    (app, base)
}

#[test]
fn chroot_runs_the_command_inside_the_merged_root() {
    require_root();
    let env = Env::new();
    let (app, base) = rootfs(&env);
    let layers = [
        "--chroot".as_ref(),
        "--lower".as_ref(),
        os(&app),
        "--lower".as_ref(),
        os(&base),
    ];
    let script = "cd /tmp 2>/dev/null; pwd; /bin/busybox cat /marker /app/data; \
                  /bin/busybox ls /; echo hi > /hello; /bin/busybox rm /etc/motd; \
                  /bin/busybox mkdir -p /var/x; exit 5";
    let cmd = [
        "/bin/busybox".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
        env.marker.as_ref(),
    ];
    let out = run_timeout(&mut env.command(&layers, &cmd));
    assert_eq!(code(&out), Some(5), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "/\nin the layer\ndata\napp\nbin\netc\nmarker\n\
         C /etc\nD /etc/motd\nA /hello\nA /var\nA /var/x\n",
        "stderr: {}",
        text(&out.stderr)
    );
    env.assert_clean();
    // A program name without a slash is looked up in the root's PATH.
    let cmd = [
        "busybox".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "busybox ls /bin; echo x > /y".as_ref(),
        env.marker.as_ref(),
    ];
    let out = run_timeout(&mut env.command(&layers, &cmd));
    assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "busybox\nA /y\n");
    env.assert_clean();
    // A program that exists on the host but not in the root cannot start.
    let out = run_timeout(&mut env.command(
        &layers,
        &["/bin/bash".as_ref(), "-c".as_ref(), "true".as_ref()],
    ));
    assert!(
        !out.status.success(),
        "/bin/bash ran inside the chroot: {out:?}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    env.assert_clean();
}
