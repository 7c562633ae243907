//! `layerfs check` and `layerfs generate`, end to end through the binary.
//!
//! Every finding kind is produced on purpose (with the layer DSL, with the
//! kernel's own options, or by running fuse-overlayfs itself) and must be
//! reported; uppers the kernel wrote through a real overlay mount must be
//! clean; `--fix` must leave an upper that the kernel overlay mounts with
//! the view that was meant, and lowers untouched. Then the man page and the
//! shell completions. Must run as root (kernel overlay mounts, mknod,
//! trusted.* xattrs).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Layer, get_xattrs, layerfs_bin, unmount};

/// A layer set in a temp dir: lowers `l0`, `l1`, …, an upper, a work dir.
struct Set {
    dir: tempfile::TempDir,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
}

/// One reported finding (from `--json`).
#[derive(Debug, Clone, PartialEq)]
struct Found {
    severity: String,
    kind: String,
    layer: String,
    path: String,
    fixable: bool,
}

struct Out {
    code: i32,
    found: Vec<Found>,
    /// `--fix` lines: (kind, path, fixed).
    fixed: Vec<(String, String, bool)>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn has(&self, severity: &str, kind: &str, layer: &str, path: &str) -> bool {
        self.found
            .iter()
            .any(|f| f.severity == severity && f.kind == kind && f.layer == layer && f.path == path)
    }

    #[track_caller]
    fn expect(&self, severity: &str, kind: &str, layer: &str, path: &str) {
        assert!(
            self.has(severity, kind, layer, path),
            "expected {severity} {kind} at {layer}:{path}; got:\n{}{}",
            self.stdout,
            self.stderr
        );
    }
}

impl Set {
    fn new(lowers: Vec<Layer>, upper: Layer) -> Set {
        let dir = tempfile::Builder::new()
            .prefix("lfchk")
            .tempdir()
            .expect("tempdir");
        let mut paths = Vec::new();
        for (i, l) in lowers.iter().enumerate() {
            let p = dir.path().join(format!("l{i}"));
            l.build(&p);
            paths.push(p);
        }
        let upper_dir = dir.path().join("upper");
        upper.build(&upper_dir);
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        Set {
            dir,
            lowers: paths,
            upper: upper_dir,
            work,
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec!["check".to_string(), "--upper".into(), s(&self.upper)];
        for l in &self.lowers {
            a.push("--lower".into());
            a.push(s(l));
        }
        a.push("--work".into());
        a.push(s(&self.work));
        a
    }

    fn check(&self, extra: &[&str]) -> Out {
        let mut args = self.args();
        args.extend(extra.iter().map(|x| x.to_string()));
        run_check(&args)
    }

    /// The merged view of a kernel overlay mounted over this set.
    fn kernel_view(&self, extra_opts: &str) -> Vec<String> {
        let m = KernelMount::new(self, extra_opts);
        view(&m.mnt)
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 test path").to_string()
}

fn run_check(args: &[String]) -> Out {
    let mut args = args.to_vec();
    if !args.iter().any(|a| a == "--json") {
        args.push("--json".into());
    }
    let out = Command::new(layerfs_bin())
        .args(&args)
        .output()
        .expect("run layerfs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    let mut fixed = Vec::new();
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        let st = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        if let Some(ok) = v["fixed"].as_bool() {
            fixed.push((st("kind"), st("path"), ok));
            continue;
        }
        found.push(Found {
            severity: st("severity"),
            kind: st("kind"),
            layer: st("layer"),
            path: st("path"),
            fixable: v["fixable"].as_bool().expect("fixable"),
        });
    }
    Out {
        code: out.status.code().unwrap_or(-1),
        found,
        fixed,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A kernel overlay over a set's own upper and work dir.
struct KernelMount {
    mnt: PathBuf,
}

impl KernelMount {
    fn new(set: &Set, extra_opts: &str) -> KernelMount {
        let mnt = set.dir.path().join(format!("mnt{}", std::process::id()));
        let _ = fs::create_dir(&mnt);
        let lowers: Vec<String> = set.lowers.iter().map(|l| s(l)).collect();
        let mut opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            s(&set.upper),
            s(&set.work)
        );
        if !extra_opts.is_empty() {
            opts.push(',');
            opts.push_str(extra_opts);
        }
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "kernel overlay mount failed: {}\noptions: {opts}",
            String::from_utf8_lossy(&out.stderr)
        );
        KernelMount { mnt }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// A merged tree as sorted lines: `d /dir`, `f /file=content`,
/// `l /link->target`, `o /node` for other types, `? /name` for a listed
/// name that cannot be looked up.
fn view(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
        let mut names: Vec<String> = fs::read_dir(root.join(rel.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("readdir {rel}: {e}"))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for n in names {
            let p = format!("{rel}/{n}");
            let full = root.join(p.trim_start_matches('/'));
            // The kernel lists whiteouts in directories with nothing below.
            let Ok(m) = fs::symlink_metadata(&full) else {
                out.push(format!("? {p}"));
                continue;
            };
            let t = m.file_type();
            if t.is_dir() {
                out.push(format!("d {p}"));
                walk(root, &p, out);
            } else if t.is_file() {
                let c = fs::read_to_string(&full).unwrap_or_else(|_| "<binary>".into());
                out.push(format!("f {p}={}", c.trim_end()));
            } else if t.is_symlink() {
                let target = fs::read_link(&full).unwrap();
                out.push(format!("l {p}->{}", target.display()));
            } else {
                out.push(format!("o {p}"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, "", &mut out);
    out
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn lower() -> Layer {
    Layer::new()
        .file("a", "lower a")
        .file("d/f", "lower d/f")
        .file("d/sub/g", "lower g")
        .file("e/h", "lower h")
        .file("k/keep", "keep")
        .symlink("s", "a")
}

/// A shell command run with `sh -c`; panics with its output on failure.
fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "sh -c {script:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Clean sets: written by the kernel itself
// ---------------------------------------------------------------------------

/// The usual operations through a kernel overlay: new files, copy-ups
/// (with origin), whiteouts, an opaque directory, renames, links, nodes.
fn kernel_writes(set: &Set, opts: &str) {
    let m = KernelMount::new(set, opts);
    let d = s(&m.mnt);
    sh(&format!(
        "set -e; cd {d}; echo new > n; echo more >> a; chmod 600 e/h; rm k/keep; \
         rm -rf d; mkdir d; echo x > d/x; mkdir -p p/q; echo y > p/q/y; mv n n2; \
         ln n2 n3; ln -s n2 sl; mkfifo fifo; touch t; rm t; setfattr -n user.k -v v a"
    ));
}

#[test]
fn kernel_written_upper_is_clean() {
    let set = Set::new(vec![lower()], Layer::new());
    kernel_writes(&set, "");
    let out = set.check(&[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.found.is_empty() && out.stdout.is_empty(),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("clean"), "{}", out.stderr);
    // The text form says nothing either.
    let text = Command::new(layerfs_bin())
        .args(set.args())
        .output()
        .unwrap();
    assert_eq!(text.status.code(), Some(0));
    assert!(text.stdout.is_empty());
}

#[test]
fn kernel_written_userxattr_upper_is_clean_with_userxattr_only() {
    let set = Set::new(vec![lower()], Layer::new());
    kernel_writes(&set, "userxattr");
    let out = set.check(&["--userxattr"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    // Checked as a root-written set, the user.overlay.* xattrs are the other
    // namespace, and the opaque one matters.
    let out = set.check(&[]);
    assert_eq!(out.code, 1);
    out.expect("warning", "other-namespace", "upper", "/d");
    assert!(
        out.found
            .iter()
            .all(|f| f.kind == "other-namespace" && !f.fixable)
    );
}

#[test]
fn kernel_redirect_is_noted_and_its_target_checked() {
    let set = Set::new(vec![lower()], Layer::new());
    {
        let m = KernelMount::new(&set, "redirect_dir=on");
        sh(&format!(
            "set -e; cd {}; mv d d2; mkdir x; mv d2/sub x/sub2",
            s(&m.mnt)
        ));
    }
    let out = set.check(&[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    out.expect("note", "redirect", "upper", "/d2");
    out.expect("note", "redirect", "upper", "/x/sub2");
    assert!(
        !out.found.iter().any(|f| f.kind == "bad-redirect"),
        "{}",
        out.stdout
    );
    // Over lowers that lack the renamed directories, the redirects lead
    // nowhere; where a file stands instead, to a non-directory.
    let other = Set::new(vec![Layer::new().file("d", "a file")], Layer::new());
    let mut args = set.args();
    args[4] = s(&other.lowers[0]);
    let out = run_check(&args);
    out.expect("error", "bad-redirect", "upper", "/d2");
    out.expect("error", "bad-redirect", "upper", "/x/sub2");
}

#[test]
fn kernel_metacopy_is_an_error() {
    let set = Set::new(vec![lower()], Layer::new());
    {
        let m = KernelMount::new(&set, "metacopy=on,redirect_dir=on");
        sh(&format!("chown 1:1 {}/e/h", s(&m.mnt)));
    }
    let out = set.check(&[]);
    out.expect("error", "metacopy", "upper", "/e/h");
    assert!(
        !out.found
            .iter()
            .find(|f| f.kind == "metacopy")
            .unwrap()
            .fixable
    );
}

// ---------------------------------------------------------------------------
// Each finding, on purpose
// ---------------------------------------------------------------------------

#[test]
fn oci_markers_in_the_upper_are_fixed_into_kernel_format() {
    let upper = Layer::new()
        .oci_whiteout("a")
        .owner(7, 8)
        .oci_whiteout("e")
        .dir("e")
        .file("e/new", "new in e")
        .oci_whiteout("k/keep")
        .file("k/keep", "upper keep")
        .oci_opaque("d")
        .file("d/only", "only");
    let set = Set::new(vec![lower()], upper);
    // The kernel shows the markers as files and hides nothing.
    let before = set.kernel_view("");
    assert!(before.contains(&"f /.wh.a=".to_string()), "{before:?}");
    assert!(before.contains(&"f /a=lower a".to_string()), "{before:?}");

    let out = set.check(&[]);
    assert_eq!(out.code, 1);
    for p in ["/.wh.a", "/.wh.e", "/k/.wh.keep"] {
        out.expect("error", "oci-whiteout", "upper", p);
    }
    out.expect("error", "oci-opaque", "upper", "/d/.wh..wh..opq");
    assert!(out.found.iter().all(|f| f.fixable));

    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.fixed.len(), 4);
    assert!(out.fixed.iter().all(|f| f.2));
    assert!(out.found.is_empty(), "{}", out.stdout);
    // The whiteout of `a` is a 0/0 character device with the marker's owner.
    let m = fs::symlink_metadata(set.upper.join("a")).unwrap();
    assert_eq!((m.mode() & libc::S_IFMT, m.rdev()), (libc::S_IFCHR, 0));
    assert_eq!((m.uid(), m.gid()), (7, 8));
    assert_eq!(
        set.kernel_view(""),
        lines(&[
            "d /d",
            "f /d/only=only",
            "d /e",
            "f /e/new=new in e",
            "d /k",
            "f /k/keep=upper keep",
            "l /s->a",
        ])
    );
}

#[test]
fn fuse_overlayfs_xattrs_are_fixed() {
    let upper = Layer::new()
        .dir("d")
        .xattr("user.fuseoverlayfs.opaque", "y")
        .whiteout("d/.wh..opq")
        .file("d/x", "x")
        .file("e/h", "upper h")
        .mode(0o755)
        .xattr("user.fuseoverlayfs.origin", "e/h")
        .xattr("user.fuseoverlayfs.override_stat", "5:6:100640")
        .opaque_dir("k")
        .xattr("user.fuseoverlayfs.opaque", "y");
    let set = Set::new(vec![lower()], upper);
    let out = set.check(&[]);
    out.expect("error", "fuse-overlayfs-opaque", "upper", "/d");
    out.expect("warning", "redundant-whiteout", "upper", "/d/.wh..opq");
    out.expect("note", "fuse-overlayfs-xattr", "upper", "/e/h");
    out.expect("warning", "fuse-overlayfs-xattr", "upper", "/e/h");
    out.expect("note", "fuse-overlayfs-opaque", "upper", "/k");
    // The kernel merges /d with the lower /d.
    assert!(
        set.kernel_view("")
            .contains(&"f /d/f=lower d/f".to_string())
    );

    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let m = fs::symlink_metadata(set.upper.join("e/h")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5, 6, 0o640));
    let x = get_xattrs(&set.upper.join("e/h")).unwrap();
    assert!(
        x.keys().all(|k| !k.starts_with(b"user.fuseoverlayfs.")),
        "{x:?}"
    );
    let x = get_xattrs(&set.upper.join("d")).unwrap();
    assert!(x.contains_key(&b"trusted.overlay.opaque"[..]), "{x:?}");
    assert_eq!(
        set.kernel_view(""),
        lines(&[
            "f /a=lower a",
            "d /d",
            "f /d/x=x",
            "d /e",
            "f /e/h=upper h",
            "d /k",
            "l /s->a",
        ])
    );
}

#[test]
fn redundant_whiteouts_are_listed_by_the_kernel_and_fixed() {
    let upper = Layer::new()
        .opaque_dir("d")
        .file("d/x", "x")
        .whiteout("d/f")
        .whiteout("d/deep/w")
        .whiteout("e/h")
        .whiteout("new/w");
    let set = Set::new(vec![lower()], upper);
    let out = set.check(&[]);
    assert_eq!(out.code, 1);
    for p in ["/d/f", "/d/deep/w", "/new/w"] {
        out.expect("warning", "redundant-whiteout", "upper", p);
    }
    assert!(!out.has("warning", "redundant-whiteout", "upper", "/e/h"));
    // The kernel filters whiteouts only out of merged directories.
    let before = set.kernel_view("");
    for p in ["? /d/f", "? /d/deep/w", "? /new/w"] {
        assert!(before.contains(&p.to_string()), "{before:?}");
    }
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(fs::symlink_metadata(set.upper.join("e/h")).is_ok());
    let after: Vec<String> = before.into_iter().filter(|l| !l.starts_with('?')).collect();
    assert_eq!(set.kernel_view(""), after);
    // Without the lowers nothing says that /new has nothing below.
    let out = run_check(&["check".into(), "--upper".into(), s(&set.upper)]);
    assert_eq!(out.code, 0, "{}", out.stdout);
}

#[test]
fn fix_refuses_an_upper_in_use_by_a_kernel_overlay() {
    let set = Set::new(vec![lower()], Layer::new().oci_whiteout("a"));
    let m = KernelMount::new(&set, "");
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("unmount it first"), "{}", out.stderr);
    assert!(set.upper.join(".wh.a").exists());
    drop(m);
    assert_eq!(set.check(&["--fix"]).code, 0);
}

#[test]
fn block_device_whiteout_is_fixed() {
    let upper = Layer::new().block_dev("a", 0, 0).owner(3, 4);
    let set = Set::new(vec![lower()], upper);
    let out = set.check(&[]);
    out.expect("error", "bad-whiteout", "upper", "/a");
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let m = fs::symlink_metadata(set.upper.join("a")).unwrap();
    assert_eq!((m.mode() & libc::S_IFMT, m.rdev()), (libc::S_IFCHR, 0));
    assert_eq!((m.uid(), m.gid()), (3, 4));
    assert!(!set.kernel_view("").iter().any(|l| l.starts_with("f /a=")));
}

#[test]
fn xattr_whiteout_outside_an_x_dir_is_an_error() {
    let upper = Layer::new()
        .file("e/h", "")
        .xattr("trusted.overlay.whiteout", "")
        .dir("x")
        .xattr("trusted.overlay.opaque", "x")
        .file("x/gone", "")
        .xattr("trusted.overlay.whiteout", "");
    let set = Set::new(vec![lower()], upper);
    let out = set.check(&[]);
    out.expect("error", "bad-whiteout", "upper", "/e/h");
    assert!(
        !out.has("error", "bad-whiteout", "upper", "/x/gone"),
        "{}",
        out.stdout
    );
}

#[test]
fn other_namespace_and_malformed_redirect_are_reported_not_fixed() {
    let upper = Layer::new()
        .dir("d")
        .xattr("user.overlay.opaque", "y")
        .dir("r")
        .xattr("trusted.overlay.redirect", "../x");
    let set = Set::new(vec![lower()], upper);
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 1);
    assert!(out.fixed.is_empty());
    out.expect("warning", "other-namespace", "upper", "/d");
    out.expect("error", "bad-redirect", "upper", "/r");
    // With --userxattr the trusted.* redirect is the other namespace.
    let out = set.check(&["--userxattr"]);
    out.expect("warning", "other-namespace", "upper", "/r");
    assert!(!out.has("warning", "other-namespace", "upper", "/d"));
}

#[test]
fn lowers_with_oci_markers_are_reported_and_never_changed() {
    let l0 = Layer::new()
        .oci_whiteout("a")
        .oci_opaque("d")
        .file("d/n", "n");
    let set = Set::new(vec![l0, lower()], Layer::new().oci_whiteout("e/h"));
    let before = view(&set.lowers[0]);
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 1);
    out.expect("warning", "lower-oci-marker", "lower1", "/.wh.a");
    out.expect("warning", "lower-oci-marker", "lower1", "/d/.wh..wh..opq");
    assert!(out.found.iter().all(|f| !f.fixable));
    assert_eq!(
        out.fixed.len(),
        1,
        "only the upper's marker: {:?}",
        out.fixed
    );
    assert_eq!(view(&set.lowers[0]), before);
}

#[test]
fn work_dir_leftovers_and_not_directories() {
    let set = Set::new(vec![lower()], Layer::new());
    fs::create_dir_all(set.work.join("work/#1f")).unwrap();
    fs::create_dir(set.work.join("index")).unwrap();
    fs::write(set.work.join("stray"), "").unwrap();
    let out = set.check(&[]);
    assert_eq!(out.code, 1);
    out.expect("note", "work-leftover", "work", "/work/#1f");
    out.expect("note", "work-leftover", "work", "/index");
    out.expect("warning", "bad-layer-set", "work", "/stray");
    // Work leftovers do not keep the kernel from mounting.
    assert!(
        out.stderr.contains("the kernel can mount"),
        "{}",
        out.stderr
    );

    fs::remove_dir_all(set.work.join("work")).unwrap();
    fs::write(set.work.join("work"), "").unwrap();
    set.check(&[])
        .expect("note", "not-a-directory", "work", "/work");

    // An upper that is a file: the kernel cannot mount.
    let file = set.dir.path().join("file");
    fs::write(&file, "").unwrap();
    let out = run_check(&["check".into(), "--upper".into(), s(&file)]);
    assert_eq!(out.code, 1);
    out.expect("error", "not-a-directory", "upper", "/");
    assert!(out.stderr.contains("cannot mount"), "{}", out.stderr);
    // A missing upper is an error, not a finding.
    let missing = set.dir.path().join("missing");
    let out = run_check(&["check".into(), "--upper".into(), s(&missing)]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("missing"), "{}", out.stderr);
}

#[test]
fn bad_layer_sets() {
    let set = Set::new(vec![lower()], Layer::new());
    // A lower given twice, a lower inside the upper.
    let inner = set.upper.join("inner");
    fs::create_dir(&inner).unwrap();
    let mut args = set.args();
    args.extend([
        "--lower".into(),
        s(&set.lowers[0]),
        "--lower".into(),
        s(&inner),
    ]);
    let out = run_check(&args);
    out.expect("error", "bad-layer-set", "lower2", "/");
    out.expect("error", "bad-layer-set", "lower3", "/");
    assert!(out.stderr.contains("cannot mount"), "{}", out.stderr);
    // A work dir on another filesystem (/dev/shm is a tmpfs).
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    if fs::metadata(shm.path()).unwrap().dev() == fs::metadata(&set.upper).unwrap().dev() {
        eprintln!("SKIP: /dev/shm is on the upper's filesystem");
        return;
    }
    let mut args = set.args();
    let n = args.len();
    args[n - 1] = s(shm.path());
    run_check(&args).expect("error", "bad-layer-set", "work", "/");
}

#[test]
fn mount_option_form_and_text_output() {
    let set = Set::new(vec![lower()], Layer::new().oci_whiteout("a"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&set.lowers[0]),
        s(&set.upper),
        s(&set.work)
    );
    let out = run_check(&["check".into(), "-o".into(), opts.clone()]);
    out.expect("error", "oci-whiteout", "upper", "/.wh.a");
    let text = Command::new(layerfs_bin())
        .args(["check", "-o", &opts])
        .output()
        .unwrap();
    assert_eq!(text.status.code(), Some(1));
    let stdout = String::from_utf8(text.stdout).unwrap();
    let cols: Vec<&str> = stdout.trim_end().split('\t').collect();
    assert_eq!(cols.len(), 4, "{stdout}");
    assert_eq!(&cols[..2], ["error", "upper:/.wh.a"]);
    assert!(cols[3].starts_with("--fix: "), "{stdout}");
}

// ---------------------------------------------------------------------------
// fuse-overlayfs itself
// ---------------------------------------------------------------------------

/// Runs fuse-overlayfs over a set (as root, or in a user namespace, where it
/// marks opaque directories with user.fuseoverlayfs.opaque), makes changes,
/// then checks, fixes, and mounts the kernel overlay over the result.
fn fuse_overlayfs_round_trip(rootless: bool) {
    if Command::new("fuse-overlayfs")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: fuse-overlayfs is not installed");
        return;
    }
    let set = Set::new(vec![lower()], Layer::new());
    let mnt = set.dir.path().join("fmnt");
    fs::create_dir(&mnt).unwrap();
    let script = format!(
        "set -e; fuse-overlayfs -o lowerdir={},upperdir={},workdir={} {m}; \
         cd {m}; rm a; rm -rf d; mkdir d; echo x > d/new; echo more >> e/h; chmod 600 e/h; \
         cd /; fusermount3 -u {m}",
        s(&set.lowers[0]),
        s(&set.upper),
        s(&set.work),
        m = s(&mnt)
    );
    let prefix = if rootless { "unshare -Urm " } else { "" };
    sh(&format!("{prefix}sh -c '{script}'"));
    let expected = lines(&[
        "d /d",
        "f /d/new=x",
        "d /e",
        "f /e/h=lower hmore",
        "d /k",
        "f /k/keep=keep",
        "l /s->a",
    ]);
    assert_ne!(set.kernel_view(""), expected, "nothing to fix?");
    let out = set.check(&[]);
    assert_eq!(out.code, 1);
    out.expect("error", "oci-opaque", "upper", "/d/.wh..wh..opq");
    if rootless {
        out.expect("error", "fuse-overlayfs-opaque", "upper", "/d");
    }
    let out = set.check(&["--fix"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(set.kernel_view(""), expected);
    let mode = fs::metadata(set.upper.join("e/h"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn fuse_overlayfs_upper_is_fixed_for_the_kernel() {
    fuse_overlayfs_round_trip(false);
}

#[test]
fn rootless_fuse_overlayfs_upper_is_fixed_for_the_kernel() {
    fuse_overlayfs_round_trip(true);
}

// ---------------------------------------------------------------------------
// Man page and completions
// ---------------------------------------------------------------------------

fn generate(args: &[&str]) -> String {
    let out = Command::new(layerfs_bin())
        .arg("generate")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_page_generates_and_the_committed_one_is_current() {
    let page = generate(&["man"]);
    assert!(
        page.contains("\n.TH LAYERFS 1"),
        "{}",
        &page[..80.min(page.len())]
    );
    for word in [
        "lowerdir",
        "upperdir",
        "workdir",
        ".SS \"layerfs check\"",
        "fuse.layerfs",
    ] {
        assert!(page.contains(word), "man page lacks {word}");
    }
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("man/layerfs.1");
    let committed = fs::read_to_string(&committed).expect("man/layerfs.1");
    // Every command, flag and -o option of today's CLI is in the committed
    // page (its prose may lag behind a little without failing others' work).
    let lines: Vec<&str> = page.lines().collect();
    let terms = lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .map(|w| w[1])
        .chain(lines.iter().copied().filter(|l| l.starts_with(".SS ")));
    let have: std::collections::HashSet<&str> = committed.lines().collect();
    let missing: Vec<&str> = terms.filter(|t| !have.contains(t)).collect();
    assert!(
        missing.is_empty(),
        "man/layerfs.1 is stale (run scripts/gen-docs.sh); it lacks: {missing:?}"
    );
    // man renders it without complaints (when man is installed).
    if let Ok(out) = Command::new("man")
        .args(["--warnings", "-l", "-"])
        .env("MANWIDTH", "80")
        .stdin(fs::File::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("man/layerfs.1")).unwrap())
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("MOUNT OPTIONS"), "{text}");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.trim().is_empty(), "man warnings: {warnings}");
    }
}

#[test]
fn completions_generate_for_bash_zsh_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let script = generate(&["completions", shell]);
        assert!(script.len() > 1000, "{shell}: {script}");
        assert!(
            script.contains("lowerdir"),
            "{shell} completions lack lowerdir"
        );
        assert!(script.contains("check"), "{shell} completions lack check");
    }
    let bash = generate(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("layerfs.bash");
    fs::write(&f, &bash).unwrap();
    sh(&format!(
        "bash -c '. {f}; COMP_WORDS=(layerfs check --up); COMP_CWORD=2; \
         _layerfs layerfs --up check; [ \"${{COMPREPLY[*]}}\" = --upper ]'",
        f = s(&f)
    ));
}
