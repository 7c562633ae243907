//! The command line: both mount forms, and one clear error line (with a
//! non-zero exit and nothing mounted) for each invalid configuration.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_layerfs");

fn is_mounted(p: &Path) -> bool {
    let canon = fs::canonicalize(p).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    for d in ["a", "b", "u", "w", "m", "other/w", "u/w"] {
        fs::create_dir_all(t.path().join(d)).unwrap();
    }
    fs::write(t.path().join("a/f"), "a").unwrap();
    fs::write(t.path().join("b/g"), "b").unwrap();
    let root = t.path().to_path_buf();
    (t, root)
}

fn run(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn option_form_with_escaped_paths_mounts_and_unmounts() {
    let (_t, r) = setup();
    let odd = r.join("x:y,z");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("odd"), "o").unwrap();
    let m = r.join("m");
    let _u = Unmount(m.clone());
    let esc = odd
        .to_str()
        .unwrap()
        .replace(':', "\\:")
        .replace(',', "\\,");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},,",
        esc,
        r.join("a").display(),
        r.join("u").display(),
        r.join("w").display()
    );
    let (ok, err) = run(&["-o".as_ref(), opts.as_ref(), m.as_os_str()]);
    assert!(ok, "{err}");
    assert!(is_mounted(&m));
    assert_eq!(fs::read_to_string(m.join("odd")).unwrap(), "o");
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "a");
    assert!(
        Command::new("fusermount3")
            .arg("-u")
            .arg(&m)
            .status()
            .unwrap()
            .success()
    );
    assert!(!is_mounted(&m));
}

#[test]
fn mount_fuse3_argument_order_works() {
    let (_t, r) = setup();
    let m = r.join("m");
    let _u = Unmount(m.clone());
    let opts = format!("lowerdir={}", r.join("a").display());
    let (ok, err) = run(&[
        "layerfs".as_ref(),
        m.as_os_str(),
        "-o".as_ref(),
        opts.as_ref(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "a");
}

#[test]
fn each_invalid_configuration_gets_one_clear_line() {
    let (_t, r) = setup();
    let m = r.join("m");
    let p = |s: &str| r.join(s).display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--lower".into(), p("missing")], "does not exist"),
        (vec!["--lower".into(), p("a/f")], "is not a directory"),
        (
            vec!["--lower".into(), p("a"), "--lower".into(), p("a")],
            "given twice",
        ),
        (
            vec![
                "--lower".into(),
                p("a"),
                "--upper".into(),
                p("u"),
                "--work".into(),
                p("u/w"),
            ],
            "nested",
        ),
        (
            vec![
                "--lower".into(),
                p("u"),
                "--upper".into(),
                p("u"),
                "--work".into(),
                p("w"),
            ],
            "overlaps",
        ),
        (
            vec![
                "--lower".into(),
                p("a"),
                "--upper".into(),
                p("u"),
                "--work".into(),
                p("u"),
            ],
            "same directory",
        ),
        (
            vec![
                "--lower".into(),
                p("a"),
                "--upper".into(),
                p("u"),
                "--work".into(),
                p("b"),
            ],
            "not empty",
        ),
        (
            vec![
                "--lower".into(),
                p("a"),
                "--upper".into(),
                p("u"),
                "--work".into(),
                "/dev/shm".into(),
            ],
            "same filesystem",
        ),
    ];
    for (args, want) in cases {
        let mut full: Vec<std::ffi::OsString> = vec!["mount".into()];
        full.extend(args.iter().map(Into::into));
        full.push(m.clone().into());
        let refs: Vec<&std::ffi::OsStr> = full.iter().map(|s| s.as_os_str()).collect();
        let (ok, err) = run(&refs);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!is_mounted(&m));
    }
}

#[test]
fn missing_mountpoint_and_unknown_options() {
    let (_t, r) = setup();
    let (ok, err) = run(&[
        "-o".as_ref(),
        format!("lowerdir={}", r.join("a").display()).as_ref(),
    ]);
    assert!(!ok && err.contains("MOUNTPOINT"), "{err}");
    let m = r.join("m");
    let _u = Unmount(m.clone());
    let opts = format!(
        "lowerdir={},bogus_option=1,context=\"a,b\"",
        r.join("a").display()
    );
    let (ok, err) = run(&["-o".as_ref(), opts.as_ref(), m.as_os_str()]);
    assert!(ok, "{err}");
    assert!(
        err.contains("bogus_option"),
        "unknown options are warned about: {err}"
    );
    let (ok, err) = run(&[
        "-o".as_ref(),
        format!("lowerdir={}", r.join("a").display()).as_ref(),
        r.join("nomp").as_os_str(),
    ]);
    assert!(!ok && err.contains("nomp"), "{err}");
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("layerfs "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("lowerdir"));
}
