//! Differential copy-on-write tests: every modification lands in the upper
//! layer, in the kernel's on-disk format.
//!
//! Each scenario builds the same lower layers, mounts a kernel overlay and
//! layerfs over them (each with its own empty upper + work dir), runs the
//! same steps on both and compares step results, merged views, the two
//! upper directories (overlay format), a kernel mount over layerfs's upper
//! (cross-mount) and, for some scenarios, a layerfs mount over the kernel's
//! upper (reverse). See `tests/cow_support/mod.rs`.
//!
//! Run as root: `cargo test --test cow_differential -- --test-threads=2`.
//! Harness self-check (layerfs replaced by a second kernel overlay):
//! `LAYERFS_TEST_BACKEND=kernel cargo test --test cow_differential`.
//! `COW_TRACE=1` prints every step's kernel result.

mod common;
#[path = "cow_support/mod.rs"]
mod cow_support;

use common::*;
use cow_support::*;

use std::path::{Path, PathBuf};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// The lower stack most scenarios start from.
fn std_layers() -> Vec<Layer> {
    vec![
        Layer::new()
            .file("f.txt", "hello lower\n")
            .file("g.txt", "gggggggggg\n")
            .mode(0o664)
            .owner(1000, 1000)
            .xattr("user.color", "blue")
            .mtime(1_111_111_111, 123_456_789)
            .file("suid", "#!/bin/sh\necho hi\n")
            .mode(0o4755)
            .file("empty", "")
            .symlink("s", "f.txt")
            .symlink("dangling", "nowhere")
            .fifo("fifo")
            .dir("d")
            .mode(0o750)
            .owner(1000, 100)
            .xattr("user.dir", "dv")
            .mtime(1_222_222_222, 987_654_321)
            .file("d/g.txt", "g in d\n")
            .file("d/both", "top d/both\n")
            .file("d/sub/deep/file", "deep\n")
            .file("a/b/c/leaf", "leaf\n")
            .dir("emptydir")
            .file("both", "top version\n")
            .file("secret", "secret\n")
            .mode(0o600),
        Layer::new()
            .file("both", "bottom version, longer\n")
            .file("f.txt", "shadowed\n")
            .dir("d")
            .mode(0o700)
            .file("a/b/c/leaf", "h from bottom\n")
            .file("d/both", "bottom d/both\n")
            .file("m/x", "x in bottom-only dir\n")
            .dir("m/emptysub")
            .dir("bemptydir"),
    ]
}

fn p(m: &Path, rel: &str) -> PathBuf {
    m.join(rel)
}

fn rd(m: &Path, rel: &str) -> R {
    read_file(&p(m, rel))
}

fn st(m: &Path, rel: &str) -> R {
    describe(&p(m, rel))
}

/// mtime only (atimes of lower files move when they are read).
fn mtime_of(path: &Path) -> R {
    let s = lstat(path)?;
    Ok(tclass(s.st_mtime, s.st_mtime_nsec))
}

fn upper_mtime_is(rel: &'static str, want: (i64, i64)) -> impl Fn(&Path) -> Vec<String> {
    move |u: &Path| match lstat(&u.join(rel)) {
        Ok(s) if (s.st_mtime, s.st_mtime_nsec) == want => vec![],
        Ok(s) => vec![format!(
            "{rel}: upper mtime {}.{:09}, want {}.{:09}",
            s.st_mtime, s.st_mtime_nsec, want.0, want.1
        )],
        Err(e) => vec![format!("{rel}: lstat in upper: {}", errno_name(e))],
    }
}

fn upper_has_origin(rel: &'static str) -> impl Fn(&Path) -> Vec<String> {
    move |u: &Path| match get_xattr(&u.join(rel), b"trusted.overlay.origin") {
        Ok(_) => vec![],
        Err(e) => vec![format!(
            "{rel}: no trusted.overlay.origin ({})",
            errno_name(e)
        )],
    }
}

fn upper_absent(rel: &'static str) -> impl Fn(&Path) -> Vec<String> {
    move |u: &Path| match lstat(&u.join(rel)) {
        Err(libc::ENOENT) => vec![],
        Ok(s) => vec![format!(
            "{rel}: should not be in the upper ({})",
            stat_obs(&s)
        )],
        Err(e) => vec![format!("{rel}: lstat: {}", errno_name(e))],
    }
}

fn upper_is_whiteout(rel: &'static str) -> impl Fn(&Path) -> Vec<String> {
    move |u: &Path| match lstat(&u.join(rel)) {
        Ok(s)
            if s.st_mode & libc::S_IFMT == libc::S_IFCHR
                && libc::major(s.st_rdev) == 0
                && libc::minor(s.st_rdev) == 0 =>
        {
            vec![]
        }
        Ok(s) => vec![format!("{rel}: not a whiteout ({})", stat_obs(&s))],
        Err(e) => vec![format!("{rel}: no whiteout ({})", errno_name(e))],
    }
}

// ===========================================================================
// Data writes
// ===========================================================================

#[test]
fn write_lower_file_partial() {
    Scenario::new("write_lower_file_partial", std_layers())
        .step("ino before/after pwrite", |m| {
            let i0 = ino(&p(m, "f.txt"))?;
            let fd = open(&p(m, "f.txt"), libc::O_WRONLY, 0)?;
            fd.pwrite(b"WORLD", 6)?;
            let i1 = fd.fstat()?.st_ino;
            let i2 = ino(&p(m, "f.txt"))?;
            Ok(format!("stable={} fstat_same={}", i0 == i2, i1 == i2))
        })
        .step("read back", |m| rd(m, "f.txt"))
        .step("pwrite past EOF (owned g.txt)", |m| {
            let fd = open(&p(m, "g.txt"), libc::O_RDWR, 0)?;
            fd.pwrite(b"tail", 20)?;
            Ok(content_obs(&fd.read_all()?))
        })
        .step("describe g.txt", |m| st(m, "g.txt"))
        .step("write deep file", |m| {
            write_file(&p(m, "d/sub/deep/file"), libc::O_WRONLY, b"DEEP")
        })
        .step("read deep", |m| rd(m, "d/sub/deep/file"))
        .upper_check("origin on copied-up file", upper_has_origin("f.txt"))
        .upper_check("origin on copied-up dir", upper_has_origin("d/sub"))
        .reverse()
        .run();
}

#[test]
fn append_lower_file() {
    Scenario::new("append_lower_file", std_layers())
        .step("O_APPEND write", |m| {
            let fd = open(&p(m, "f.txt"), libc::O_WRONLY | libc::O_APPEND, 0)?;
            fd.write(b"appended\n")?;
            Ok(format!("size={}", fd.fstat()?.st_size))
        })
        .step("O_RDWR|O_APPEND write + pread", |m| {
            let fd = open(&p(m, "d/both"), libc::O_RDWR | libc::O_APPEND, 0)?;
            fd.write(b"more\n")?;
            Ok(content_obs(&fd.read_all()?))
        })
        .step("append to bottom-only file", |m| {
            write_file(&p(m, "m/x"), libc::O_WRONLY | libc::O_APPEND, b"+x\n")
        })
        .step("append to empty", |m| {
            write_file(
                &p(m, "empty"),
                libc::O_WRONLY | libc::O_APPEND,
                b"now not empty",
            )
        })
        .step("read all", |m| {
            seq(vec![
                ("f", rd(m, "f.txt")),
                ("dboth", rd(m, "d/both")),
                ("mx", rd(m, "m/x")),
                ("empty", rd(m, "empty")),
            ])
        })
        .upper_check(
            "bottom-only dir copied with its mtime",
            upper_mtime_is("m", layer_default_mtime(1)),
        )
        .reverse()
        .run();
}

#[test]
fn truncate_lower_file() {
    Scenario::new("truncate_lower_file", std_layers())
        .step("truncate shrink", |m| truncate(&p(m, "f.txt"), 3))
        .step("truncate extend", |m| truncate(&p(m, "g.txt"), 10_000))
        .step("ftruncate to 0", |m| {
            let fd = open(&p(m, "d/g.txt"), libc::O_WRONLY, 0)?;
            fd.ftruncate(0)
        })
        .step("truncate same size", |m| truncate(&p(m, "both"), 12))
        .step("truncate dir", |m| truncate(&p(m, "d"), 0))
        .step("truncate through symlink", |m| truncate(&p(m, "s"), 1))
        .step("observe", |m| {
            seq(vec![
                ("f", rd(m, "f.txt")),
                ("g", st(m, "g.txt")),
                ("dg", st(m, "d/g.txt")),
                ("both", rd(m, "both")),
                ("s", st(m, "s")),
            ])
        })
        .run();
}

#[test]
fn o_trunc_open() {
    Scenario::new("o_trunc_open", std_layers())
        .step("O_WRONLY|O_TRUNC, no write", |m| {
            open(&p(m, "f.txt"), libc::O_WRONLY | libc::O_TRUNC, 0).map(|_| String::new())
        })
        .step("O_RDWR|O_TRUNC + write", |m| {
            let fd = open(&p(m, "g.txt"), libc::O_RDWR | libc::O_TRUNC, 0)?;
            fd.write(b"new g")?;
            Ok(content_obs(&fd.read_all()?))
        })
        .step("O_RDONLY|O_TRUNC", |m| {
            open(&p(m, "both"), libc::O_RDONLY | libc::O_TRUNC, 0).map(|_| String::new())
        })
        .step("O_CREAT|O_TRUNC on existing lower", |m| {
            write_file(
                &p(m, "d/both"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                b"x",
            )
        })
        .step("O_TRUNC on fifo (nonblocking)", |m| {
            open(
                &p(m, "fifo"),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_TRUNC,
                0,
            )
            .map(|_| String::new())
        })
        .step("observe", |m| {
            seq(vec![
                ("f", st(m, "f.txt")),
                ("g", st(m, "g.txt")),
                ("both", st(m, "both")),
                ("dboth", rd(m, "d/both")),
                ("g_xattr", lgetxattr(&p(m, "g.txt"), "user.color")),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn mmap_write_lower_file() {
    Scenario::new("mmap_write_lower_file", std_layers())
        .step("mmap MAP_SHARED write + msync", |m| {
            let fd = open(&p(m, "f.txt"), libc::O_RDWR, 0)?;
            // SAFETY: mapping 12 bytes of a 12-byte file we opened O_RDWR.
            unsafe {
                let a = libc::mmap(
                    std::ptr::null_mut(),
                    12,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.0,
                    0,
                );
                if a == libc::MAP_FAILED {
                    return Err(errno());
                }
                let s = std::slice::from_raw_parts_mut(a as *mut u8, 12);
                s[..5].copy_from_slice(b"HELLO");
                let r = libc::msync(a, 12, libc::MS_SYNC);
                libc::munmap(a, 12);
                if r != 0 {
                    return Err(errno());
                }
            }
            Ok(String::new())
        })
        .step("read back", |m| rd(m, "f.txt"))
        .run();
}

// ===========================================================================
// Metadata changes
// ===========================================================================

#[test]
fn chmod_lower_objects() {
    Scenario::new("chmod_lower_objects", std_layers())
        .step("chmod file 0600", |m| chmod(&p(m, "f.txt"), 0o600))
        .step("chmod setuid file 04711", |m| chmod(&p(m, "suid"), 0o4711))
        .step("chmod merged dir 0700", |m| chmod(&p(m, "d"), 0o700))
        .step("chmod deep dir 0711", |m| chmod(&p(m, "a/b"), 0o711))
        .step("chmod via symlink (target)", |m| chmod(&p(m, "s"), 0o640))
        .step("chmod bottom-only dir 01777", |m| chmod(&p(m, "m"), 0o1777))
        .step("chmod fifo", |m| chmod(&p(m, "fifo"), 0o600))
        .step("chmod missing", |m| chmod(&p(m, "nope"), 0o600))
        .step("observe", |m| {
            seq(vec![
                ("f", st(m, "f.txt")),
                ("suid", st(m, "suid")),
                ("d", st(m, "d")),
                ("ab", st(m, "a/b")),
                ("s", st(m, "s")),
                ("m", st(m, "m")),
                ("fifo", st(m, "fifo")),
                ("list_d", list(&p(m, "d"))),
                ("d_mtime", mtime_of(&p(m, "d"))),
            ])
        })
        .upper_check(
            "chmod of dir keeps its mtime",
            upper_mtime_is("d", (1_222_222_222, 987_654_321)),
        )
        .upper_check(
            "chmod'ed dir has no children copied",
            upper_absent("d/g.txt"),
        )
        .reverse()
        .run();
}

#[test]
fn chown_and_lchown() {
    Scenario::new("chown_and_lchown", std_layers())
        .step("chown file", |m| {
            chown(&p(m, "f.txt"), Some(1234), Some(5678))
        })
        .step("chown dir uid only", |m| chown(&p(m, "d"), Some(42), None))
        .step("chown setuid file clears setuid", |m| {
            chown(&p(m, "suid"), Some(7), Some(7))?;
            st(m, "suid")
        })
        .step("lchown symlink", |m| lchown(&p(m, "s"), Some(77), Some(78)))
        .step("lchown dangling symlink", |m| {
            lchown(&p(m, "dangling"), Some(5), Some(5))
        })
        .step("chown via symlink follows", |m| {
            chown(&p(m, "s"), None, Some(99))
        })
        .step("chown gid only on deep", |m| {
            chown(&p(m, "a/b/c/leaf"), None, Some(3))
        })
        .step("observe", |m| {
            seq(vec![
                ("f", st(m, "f.txt")),
                ("d", st(m, "d")),
                ("s", st(m, "s")),
                ("dangling", st(m, "dangling")),
                ("leaf", st(m, "a/b/c/leaf")),
                ("s_mtime", mtime_of(&p(m, "s"))),
            ])
        })
        .upper_check("symlink copied up with origin", upper_has_origin("s"))
        .reverse()
        .run();
}

#[test]
fn utimensat_variants() {
    Scenario::new("utimensat_variants", std_layers())
        .step("explicit ns times on file", |m| {
            let f = p(m, "f.txt");
            utimens(
                &f,
                Ts::Set(1_300_000_000, 111_222_333),
                Ts::Set(1_310_000_000, 999_999_999),
                false,
            )?;
            times(&f)
        })
        .step("UTIME_OMIT atime after explicit set", |m| {
            let f = p(m, "g.txt");
            utimens(
                &f,
                Ts::Set(1_000_000_001, 1),
                Ts::Set(1_000_000_002, 2),
                false,
            )?;
            utimens(&f, Ts::Omit, Ts::Set(1_320_000_000, 5), false)?;
            times(&f)
        })
        .step("UTIME_NOW mtime, omit atime", |m| {
            let f = p(m, "both");
            utimens(&f, Ts::Omit, Ts::Now, false)?;
            mtime_of(&f)
        })
        .step("UTIME_OMIT both (no-op)", |m| {
            let f = p(m, "d/both");
            utimens(&f, Ts::Omit, Ts::Omit, false)?;
            mtime_of(&f)
        })
        .step("UTIME_NOW atime, explicit mtime", |m| {
            let f = p(m, "empty");
            utimens(&f, Ts::Now, Ts::Set(1_330_000_000, 0), false)?;
            times(&f)
        })
        .step("times NULL", |m| {
            utimens_null(&p(m, "suid"))?;
            times(&p(m, "suid"))
        })
        .step("explicit on merged dir", |m| {
            let f = p(m, "d");
            utimens(
                &f,
                Ts::Set(1_340_000_000, 123),
                Ts::Set(1_350_000_000, 456),
                false,
            )?;
            times(&f)
        })
        .step("explicit on deep dir", |m| {
            let f = p(m, "a/b/c");
            utimens(
                &f,
                Ts::Set(1_360_000_000, 1),
                Ts::Set(1_370_000_000, 2),
                false,
            )?;
            times(&f)
        })
        .step("nofollow on symlink", |m| {
            let f = p(m, "s");
            utimens(
                &f,
                Ts::Set(1_380_000_000, 7),
                Ts::Set(1_390_000_000, 8),
                true,
            )?;
            times(&f)
        })
        .step("follow through dangling symlink", |m| {
            utimens(&p(m, "dangling"), Ts::Now, Ts::Now, false)
        })
        .step("on missing", |m| {
            utimens(&p(m, "nope"), Ts::Now, Ts::Now, false)
        })
        .step("f.txt unchanged by symlink nofollow", |m| {
            times(&p(m, "f.txt"))
        })
        .upper_check(
            "deep dir parents keep lower mtime",
            upper_mtime_is("a/b", layer_default_mtime(0)),
        )
        .upper_check(
            "explicit dir time",
            upper_mtime_is("a/b/c", (1_370_000_000, 2)),
        )
        .reverse()
        .run();
}

#[test]
fn user_xattrs_on_lower_objects() {
    Scenario::new("user_xattrs_on_lower_objects", std_layers())
        .step("set new on file", |m| {
            lsetxattr(&p(m, "f.txt"), "user.new", b"v1", 0)
        })
        .step("replace existing", |m| {
            lsetxattr(&p(m, "g.txt"), "user.color", b"red", libc::XATTR_REPLACE)
        })
        .step("XATTR_CREATE on existing", |m| {
            lsetxattr(&p(m, "g.txt"), "user.color", b"x", libc::XATTR_CREATE)
        })
        .step("XATTR_REPLACE on missing (lower, no copy-up)", |m| {
            lsetxattr(&p(m, "both"), "user.none", b"x", libc::XATTR_REPLACE)
        })
        .step("remove missing (lower, no copy-up)", |m| {
            lremovexattr(&p(m, "d/both"), "user.none")
        })
        .step("remove existing on dir", |m| {
            lremovexattr(&p(m, "d"), "user.dir")
        })
        .step("set on deep dir", |m| {
            lsetxattr(&p(m, "a/b"), "user.deep", b"dd", 0)
        })
        .step("set on symlink", |m| {
            lsetxattr(&p(m, "s"), "user.l", b"l", 0)
        })
        .step("set on fifo", |m| {
            lsetxattr(&p(m, "fifo"), "user.f", b"f", 0)
        })
        .step("set trusted.* on file", |m| {
            lsetxattr(&p(m, "empty"), "trusted.mine", b"t", 0)
        })
        .step("set empty value", |m| {
            lsetxattr(&p(m, "m/x"), "user.empty", b"", 0)
        })
        .step("big value", |m| {
            lsetxattr(&p(m, "suid"), "user.big", &[b'z'; 3000], 0)
        })
        .step("observe", |m| {
            seq(vec![
                ("f", llistxattr(&p(m, "f.txt"))),
                ("g", lgetxattr(&p(m, "g.txt"), "user.color")),
                ("d", llistxattr(&p(m, "d"))),
                ("ab", lgetxattr(&p(m, "a/b"), "user.deep")),
                ("empty", lgetxattr(&p(m, "empty"), "trusted.mine")),
                ("mx", lgetxattr(&p(m, "m/x"), "user.empty")),
                ("missing", lgetxattr(&p(m, "f.txt"), "user.missing")),
                ("list_d", list(&p(m, "d"))),
            ])
        })
        .upper_check(
            "removexattr of missing copied nothing up",
            upper_absent("d/both"),
        )
        .reverse()
        .run();
}

#[test]
fn trusted_overlay_xattr_escaping() {
    Scenario::new("trusted_overlay_xattr_escaping", std_layers())
        .step("set trusted.overlay.foo on lower file", |m| {
            lsetxattr(&p(m, "f.txt"), "trusted.overlay.foo", b"bar", 0)
        })
        .step("get it back", |m| {
            lgetxattr(&p(m, "f.txt"), "trusted.overlay.foo")
        })
        .step("list", |m| llistxattr(&p(m, "f.txt")))
        .step("set trusted.overlay.overlay.x (double)", |m| {
            lsetxattr(&p(m, "d"), "trusted.overlay.overlay.x", b"2", 0)
        })
        .step("list dir", |m| llistxattr(&p(m, "d")))
        .step("on new file", |m| {
            write_file(&p(m, "new"), libc::O_WRONLY | libc::O_CREAT, b"n")?;
            lsetxattr(&p(m, "new"), "trusted.overlay.zzz", b"q", 0)?;
            llistxattr(&p(m, "new"))
        })
        .step("remove escaped", |m| {
            lremovexattr(&p(m, "new"), "trusted.overlay.zzz")
        })
        .step("user.overlay.* is not escaped", |m| {
            lsetxattr(&p(m, "g.txt"), "user.overlay.k", b"u", 0)?;
            llistxattr(&p(m, "g.txt"))
        })
        .step("getfattr through the mount", |m| {
            let out = std::process::Command::new("getfattr")
                .args(["-h", "-d", "-m", "-", "-e", "text", "f.txt", "d"])
                .current_dir(m)
                .output()
                .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
            Ok(String::from_utf8_lossy(&out.stdout).replace('\n', " | "))
        })
        .step("get private name that does not exist", |m| {
            lgetxattr(&p(m, "f.txt"), "trusted.overlay.origin")
        })
        .upper_check("escaped in upper", |u: &Path| {
            match get_xattr(&u.join("f.txt"), b"trusted.overlay.overlay.foo") {
                Ok(v) if v == b"bar" => vec![],
                other => vec![format!("f.txt trusted.overlay.overlay.foo = {other:?}")],
            }
        })
        .reverse()
        .run();
}

#[test]
fn copy_up_keeps_metadata() {
    Scenario::new(
        "copy_up_keeps_metadata",
        vec![
            Layer::new()
                .file("dir/file", "metadata test\n")
                .mode(0o2750)
                .owner(1000, 1001)
                .xattr("user.a", "1")
                .xattr("user.b", "two")
                .xattr("trusted.t", "tt")
                .mtime(1_234_567_890, 123_456_789)
                .file("dir/nowrite", "x")
                .mode(0o444)
                .owner(5, 6)
                .mtime(1_111_111_111, 1)
                .symlink("dir/link", "file")
                .owner(3, 4)
                .mtime(1_199_999_999, 999_999_999)
                .char_dev("dir/cdev", 1, 3)
                .mode(0o666)
                .owner(0, 5)
                .xattr("trusted.dev", "c")
                .fifo("dir/pipe")
                .mode(0o620)
                .owner(9, 9)
                .dir("dir")
                .mode(0o751)
                .owner(2000, 2001)
                .xattr("user.d", "d")
                .mtime(1_212_121_212, 121_212_121),
            Layer::new(),
        ],
    )
    .step("open O_RDWR without writing", |m| {
        open(&p(m, "dir/file"), libc::O_RDWR, 0).map(|_| String::new())
    })
    .step("open 0444 file O_WRONLY as root", |m| {
        open(&p(m, "dir/nowrite"), libc::O_WRONLY, 0).map(|_| String::new())
    })
    .step("add xattr to symlink owner-only? (trusted)", |m| {
        lsetxattr(&p(m, "dir/link"), "trusted.l", b"l", 0)
    })
    .step("xattr on device node", |m| {
        lsetxattr(&p(m, "dir/cdev"), "user.more", b"m", 0)
    })
    .step("trusted xattr on fifo", |m| {
        lsetxattr(&p(m, "dir/pipe"), "trusted.p", b"p", 0)
    })
    .step("observe", |m| {
        seq(vec![
            ("file", st(m, "dir/file")),
            ("file_t", times(&p(m, "dir/file"))),
            ("nowrite", st(m, "dir/nowrite")),
            ("link", st(m, "dir/link")),
            ("link_m", mtime_of(&p(m, "dir/link"))),
            ("cdev", st(m, "dir/cdev")),
            ("pipe", st(m, "dir/pipe")),
            ("dir", st(m, "dir")),
            ("dir_x", llistxattr(&p(m, "dir"))),
            ("file_x", llistxattr(&p(m, "dir/file"))),
        ])
    })
    .upper_check(
        "file mtime kept",
        upper_mtime_is("dir/file", (1_234_567_890, 123_456_789)),
    )
    .upper_check(
        "symlink mtime kept",
        upper_mtime_is("dir/link", (1_199_999_999, 999_999_999)),
    )
    .upper_check(
        "parent dir mtime kept",
        upper_mtime_is("dir", (1_212_121_212, 121_212_121)),
    )
    .upper_check("origin on file", upper_has_origin("dir/file"))
    .upper_check("origin on dir", upper_has_origin("dir"))
    .reverse()
    .run();
}

#[test]
fn deep_copy_up_parent_mtimes() {
    Scenario::new(
        "deep_copy_up_parent_mtimes",
        vec![
            Layer::new()
                .file("a/b/c/d/leaf", "leaf\n")
                .file("a/b/sibling", "s")
                .file("a/b/x2/y", "y")
                .at("a")
                .mode(0o755)
                .owner(11, 12)
                .xattr("user.level", "a")
                .mtime(1_100_000_001, 1)
                .at("a/b")
                .mode(0o750)
                .owner(21, 22)
                .xattr("user.level", "b")
                .mtime(1_100_000_002, 2)
                .at("a/b/c")
                .mode(0o705)
                .xattr("user.level", "c")
                .mtime(1_100_000_003, 3)
                .at("a/b/c/d")
                .mode(0o700)
                .owner(41, 42)
                .mtime(1_100_000_004, 4)
                .at("a/b/x2")
                .mtime(1_100_000_005, 5),
            // The bottom layer has the same dirs with other attributes: the
            // top ones must win.
            Layer::new()
                .file("a/b/c/d/other", "o")
                .at("a/b")
                .mode(0o777)
                .owner(99, 99)
                .mtime(1_000_000_000, 0),
        ],
    )
    .step("append to deep leaf", |m| {
        write_file(
            &p(m, "a/b/c/d/leaf"),
            libc::O_WRONLY | libc::O_APPEND,
            b"more\n",
        )
    })
    .step("create in another deep dir", |m| {
        write_file(
            &p(m, "a/b/x2/new"),
            libc::O_WRONLY | libc::O_CREAT,
            b"new\n",
        )
    })
    .step("observe parents", |m| {
        seq(vec![
            ("a", mtime_of(&p(m, "a"))),
            ("ab", mtime_of(&p(m, "a/b"))),
            ("abc", mtime_of(&p(m, "a/b/c"))),
            ("abcd", mtime_of(&p(m, "a/b/c/d"))),
            ("x2", mtime_of(&p(m, "a/b/x2"))),
            ("abcd_st", st(m, "a/b/c/d")),
            ("list", list(&p(m, "a/b/c/d"))),
        ])
    })
    .upper_check("a mtime", upper_mtime_is("a", (1_100_000_001, 1)))
    .upper_check("a/b mtime", upper_mtime_is("a/b", (1_100_000_002, 2)))
    .upper_check("a/b/c mtime", upper_mtime_is("a/b/c", (1_100_000_003, 3)))
    .upper_check(
        "a/b/c/d mtime",
        upper_mtime_is("a/b/c/d", (1_100_000_004, 4)),
    )
    .upper_check("sibling not copied", upper_absent("a/b/sibling"))
    .upper_check("origin on a/b/c", upper_has_origin("a/b/c"))
    .reverse()
    .run();
}

#[test]
fn copy_up_from_bottom_layer() {
    Scenario::new(
        "copy_up_from_bottom_layer",
        vec![
            Layer::new()
                .file("top/only", "t")
                .dir("shared")
                .mode(0o711)
                .owner(1, 1),
            Layer::new().file("x", "x").dir("shared").mode(0o777),
            Layer::new()
                .file("shared/in/bottom/f", "bottom data\n")
                .mode(0o640)
                .owner(300, 301)
                .xattr("user.b", "b")
                .at("shared/in")
                .mode(0o700)
                .owner(302, 303)
                .mtime(1_050_000_000, 50)
                .file("shared/deleted_in_middle", "should stay hidden"),
        ],
    )
    .step("write bottom file", |m| {
        let fd = open(&p(m, "shared/in/bottom/f"), libc::O_RDWR, 0)?;
        fd.pwrite(b"B", 0)?;
        Ok(content_obs(&fd.read_all()?))
    })
    .step("observe", |m| {
        seq(vec![
            ("shared", st(m, "shared")),
            ("in", st(m, "shared/in")),
            ("f", st(m, "shared/in/bottom/f")),
            ("list_shared", list(&p(m, "shared"))),
        ])
    })
    .upper_check(
        "shared/in mtime",
        upper_mtime_is("shared/in", (1_050_000_000, 50)),
    )
    .reverse()
    .run();
}

// ===========================================================================
// Creating objects
// ===========================================================================

#[test]
fn create_files() {
    Scenario::new("create_files", std_layers())
        .step("create in root", |m| {
            write_file(
                &p(m, "new"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"new\n",
            )
        })
        .step("create 0640 in merged dir", |m| {
            let fd = open(&p(m, "d/new"), libc::O_WRONLY | libc::O_CREAT, 0o640)?;
            fd.write(b"in d")
        })
        .step("create in deep lower dir", |m| {
            write_file(
                &p(m, "a/b/c/new"),
                libc::O_WRONLY | libc::O_CREAT,
                b"deep new",
            )
        })
        .step("create in bottom-only dir", |m| {
            write_file(&p(m, "m/emptysub/new"), libc::O_WRONLY | libc::O_CREAT, b"")
        })
        .step("create 04755 (root)", |m| {
            open(&p(m, "newsuid"), libc::O_WRONLY | libc::O_CREAT, 0o4755).map(|_| String::new())
        })
        .step("create in missing dir", |m| {
            write_file(&p(m, "nodir/new"), libc::O_WRONLY | libc::O_CREAT, b"")
        })
        .step("create under a file", |m| {
            write_file(&p(m, "f.txt/new"), libc::O_WRONLY | libc::O_CREAT, b"")
        })
        .step("O_CREAT through dangling symlink", |m| {
            write_file(
                &p(m, "dangling"),
                libc::O_WRONLY | libc::O_CREAT,
                b"via link",
            )
        })
        .step("observe", |m| {
            seq(vec![
                ("new", st(m, "new")),
                ("dnew", st(m, "d/new")),
                ("cnew", st(m, "a/b/c/new")),
                ("mnew", st(m, "m/emptysub/new")),
                ("suid", st(m, "newsuid")),
                ("nowhere", st(m, "nowhere")),
                ("list_d", list(&p(m, "d"))),
                ("list_root", list(m)),
            ])
        })
        .upper_check(
            "a/b keeps mtime after create below",
            upper_mtime_is("a/b", layer_default_mtime(0)),
        )
        .reverse()
        .run();
}

#[test]
fn o_excl_create() {
    Scenario::new("o_excl_create", std_layers())
        .step("O_EXCL over lower file", |m| {
            write_file(
                &p(m, "f.txt"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"x",
            )
        })
        .step("O_EXCL over bottom-only file", |m| {
            write_file(
                &p(m, "m/x"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"x",
            )
        })
        .step("O_EXCL over lower dir", |m| {
            write_file(
                &p(m, "d"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"x",
            )
        })
        .step("O_EXCL over dangling symlink", |m| {
            write_file(
                &p(m, "dangling"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"x",
            )
        })
        .step("O_CREAT|O_RDONLY over lower (no copy-up)", |m| {
            open(&p(m, "both"), libc::O_RDONLY | libc::O_CREAT, 0o600).map(|_| String::new())
        })
        .step("unlink then O_EXCL", |m| {
            unlink(&p(m, "d/both"))?;
            write_file(
                &p(m, "d/both"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                b"fresh",
            )
        })
        .step("observe", |m| {
            seq(vec![
                ("f", rd(m, "f.txt")),
                ("both", st(m, "both")),
                ("dboth", rd(m, "d/both")),
                ("nowhere", st(m, "nowhere")),
            ])
        })
        .upper_check("O_CREAT|O_RDONLY did not copy up", upper_absent("both"))
        .upper_check("O_EXCL failure did not copy up", upper_absent("f.txt"))
        .reverse()
        .run();
}

#[test]
fn mkdir_cases() {
    Scenario::new("mkdir_cases", std_layers())
        .step("mkdir in root", |m| mkdir(&p(m, "nd"), 0o755))
        .step("mkdir 01777 in merged dir", |m| {
            mkdir(&p(m, "d/nd"), 0o1777)
        })
        .step("mkdir -p deep", |m| {
            std::fs::create_dir_all(p(m, "a/b/c/x/y/z"))
                .map(|_| String::new())
                .map_err(|e| e.raw_os_error().unwrap_or(-1))
        })
        .step("mkdir over lower dir", |m| mkdir(&p(m, "d"), 0o755))
        .step("mkdir over bottom-only dir", |m| mkdir(&p(m, "m"), 0o755))
        .step("mkdir over lower file", |m| mkdir(&p(m, "f.txt"), 0o755))
        .step("mkdir over dangling symlink", |m| {
            mkdir(&p(m, "dangling"), 0o755)
        })
        .step("mkdir in bottom-only dir", |m| {
            mkdir(&p(m, "m/emptysub/n"), 0o700)
        })
        .step("observe", |m| {
            seq(vec![
                ("nd", st(m, "nd")),
                ("dnd", st(m, "d/nd")),
                ("z", st(m, "a/b/c/x/y/z")),
                ("n", st(m, "m/emptysub/n")),
                ("list_m", list(&p(m, "m"))),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn mknod_nodes() {
    Scenario::new("mknod_nodes", std_layers())
        .step("fifo", |m| {
            mknod(&p(m, "d/newfifo"), libc::S_IFIFO | 0o640, 0, 0)
        })
        .step("char 10:200", |m| {
            mknod(&p(m, "cdev"), libc::S_IFCHR | 0o620, 10, 200)
        })
        .step("block 8:1", |m| {
            mknod(&p(m, "a/b/bdev"), libc::S_IFBLK | 0o660, 8, 1)
        })
        .step("socket", |m| {
            mknod(&p(m, "sock"), libc::S_IFSOCK | 0o755, 0, 0)
        })
        .step("regular via mknod", |m| {
            mknod(&p(m, "reg"), libc::S_IFREG | 0o600, 0, 0)
        })
        .step("char 0:1", |m| {
            mknod(&p(m, "c01"), libc::S_IFCHR | 0o600, 0, 1)
        })
        .step("over existing lower", |m| {
            mknod(&p(m, "fifo"), libc::S_IFIFO | 0o600, 0, 0)
        })
        .step("observe", |m| {
            seq(vec![
                ("fifo", st(m, "d/newfifo")),
                ("cdev", st(m, "cdev")),
                ("bdev", st(m, "a/b/bdev")),
                ("sock", st(m, "sock")),
                ("reg", st(m, "reg")),
                ("c01", st(m, "c01")),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn mknod_whiteout_is_eperm() {
    Scenario::new("mknod_whiteout_is_eperm", std_layers())
        .step("mknod c 0 0 new name", |m| {
            mknod(&p(m, "wh"), libc::S_IFCHR | 0o600, 0, 0)
        })
        .step("mknod c 0 0 mode 0", |m| {
            mknod(&p(m, "d/wh"), libc::S_IFCHR, 0, 0)
        })
        .step("mknod c 0 0 over lower", |m| {
            mknod(&p(m, "f.txt"), libc::S_IFCHR, 0, 0)
        })
        .step("unlink then mknod c 0 0", |m| {
            unlink(&p(m, "both"))?;
            mknod(&p(m, "both"), libc::S_IFCHR, 0, 0)
        })
        .step("observe", |m| {
            seq(vec![
                ("wh", st(m, "wh")),
                ("both", st(m, "both")),
                ("root", list(m)),
                ("d", list(&p(m, "d"))),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn symlink_create() {
    Scenario::new("symlink_create", std_layers())
        .step("symlink in root", |m| symlink("f.txt", &p(m, "sl")))
        .step("symlink in deep lower dir", |m| {
            symlink("../../../d", &p(m, "a/b/c/up"))
        })
        .step("long target", |m| symlink(&"x/".repeat(500), &p(m, "long")))
        .step("over existing lower", |m| symlink("t", &p(m, "s")))
        .step("over lower dir", |m| symlink("t", &p(m, "emptydir")))
        .step("absolute target", |m| {
            symlink("/etc/passwd", &p(m, "d/abs"))
        })
        .step("observe", |m| {
            seq(vec![
                ("sl", st(m, "sl")),
                ("up", st(m, "a/b/c/up")),
                ("long", st(m, "long")),
                ("abs", st(m, "d/abs")),
                ("through", rd(m, "sl")),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn hardlink_lower_file() {
    Scenario::new("hardlink_lower_file", std_layers())
        .step("link lower file", |m| {
            link(&p(m, "g.txt"), &p(m, "g2"))?;
            Ok(format!(
                "same_ino={}",
                ino(&p(m, "g.txt"))? == ino(&p(m, "g2"))?
            ))
        })
        .step("link into another lower dir", |m| {
            link(&p(m, "g.txt"), &p(m, "d/g3"))
        })
        .step("link bottom-only file into root", |m| {
            link(&p(m, "m/x"), &p(m, "x_link"))
        })
        .step("link symlink itself", |m| link(&p(m, "s"), &p(m, "s_link")))
        .step("link dir", |m| link(&p(m, "d"), &p(m, "d_link")))
        .step("link onto existing", |m| {
            link(&p(m, "f.txt"), &p(m, "both"))
        })
        .step("write through one name", |m| {
            write_file(&p(m, "g2"), libc::O_WRONLY | libc::O_APPEND, b"via g2\n")
        })
        .step("observe", |m| {
            seq(vec![
                ("g", st(m, "g.txt")),
                ("g_c", rd(m, "g.txt")),
                ("g3", st(m, "d/g3")),
                ("x", st(m, "m/x")),
                ("s_link", st(m, "s_link")),
                (
                    "same_gx",
                    Ok(format!("{}", ino(&p(m, "g.txt"))? == ino(&p(m, "d/g3"))?)),
                ),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn o_tmpfile_in_lower_dir() {
    Scenario::new("o_tmpfile_in_lower_dir", std_layers())
        .step("O_TMPFILE, write, fstat, linkat", |m| {
            let fd = open(&p(m, "d"), libc::O_TMPFILE | libc::O_RDWR, 0o640)?;
            fd.write(b"tmpfile data\n")?;
            let nl = fd.fstat()?.st_nlink;
            let src = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.0)).unwrap();
            let dst = cpath(&p(m, "d/linked_tmp"));
            // SAFETY: valid C strings.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if r != 0 {
                return Err(errno());
            }
            Ok(format!("nlink_before={nl} after={}", fd.fstat()?.st_nlink))
        })
        .step("observe", |m| {
            seq(vec![
                ("t", st(m, "d/linked_tmp")),
                ("c", rd(m, "d/linked_tmp")),
            ])
        })
        .run();
}

// ===========================================================================
// Removing objects
// ===========================================================================

#[test]
fn unlink_cases() {
    Scenario::new("unlink_cases", std_layers())
        .step("unlink lower file", |m| unlink(&p(m, "f.txt")))
        .step("unlink bottom-only file in merged dir", |m| {
            unlink(&p(m, "a/b/c/leaf"))
        })
        .step("unlink file present in both lowers", |m| {
            unlink(&p(m, "both"))
        })
        .step("create + unlink upper-only", |m| {
            write_file(&p(m, "tmp"), libc::O_WRONLY | libc::O_CREAT, b"t")?;
            unlink(&p(m, "tmp"))
        })
        .step("unlink copied-up file", |m| {
            chmod(&p(m, "g.txt"), 0o600)?;
            unlink(&p(m, "g.txt"))
        })
        .step("unlink lower symlink", |m| unlink(&p(m, "s")))
        .step("unlink lower fifo", |m| unlink(&p(m, "fifo")))
        .step("unlink missing", |m| unlink(&p(m, "nope")))
        .step("unlink again", |m| unlink(&p(m, "f.txt")))
        .step("unlink dir", |m| unlink(&p(m, "emptydir")))
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("d", list(&p(m, "d"))),
                ("f", st(m, "f.txt")),
            ])
        })
        .upper_check("whiteout for f.txt", upper_is_whiteout("f.txt"))
        .upper_check("whiteout for d/h.txt", upper_is_whiteout("a/b/c/leaf"))
        .upper_check("upper-only file gone", upper_absent("tmp"))
        .reverse()
        .run();
}

#[test]
fn rmdir_cases() {
    Scenario::new("rmdir_cases", std_layers())
        .step("rmdir empty lower dir", |m| rmdir(&p(m, "emptydir")))
        .step("rmdir empty bottom-only dir", |m| rmdir(&p(m, "bemptydir")))
        .step("rmdir empty bottom-only subdir", |m| {
            rmdir(&p(m, "m/emptysub"))
        })
        .step("rmdir non-empty merged dir", |m| rmdir(&p(m, "d")))
        .step("rmdir non-empty lower dir", |m| rmdir(&p(m, "a/b")))
        .step("rmdir upper-only dir", |m| {
            mkdir(&p(m, "nd"), 0o755)?;
            rmdir(&p(m, "nd"))
        })
        .step("rmdir file", |m| rmdir(&p(m, "f.txt")))
        .step("rmdir missing", |m| rmdir(&p(m, "nope")))
        .step("rmdir symlink", |m| rmdir(&p(m, "s")))
        .step("observe", |m| {
            seq(vec![("root", list(m)), ("m", list(&p(m, "m")))])
        })
        .upper_check("whiteout for emptydir", upper_is_whiteout("emptydir"))
        .upper_check("upper-only dir gone", upper_absent("nd"))
        .reverse()
        .run();
}

#[test]
fn rmdir_of_dir_emptied_by_whiteouts() {
    Scenario::new(
        "rmdir_of_dir_emptied_by_whiteouts",
        vec![
            Layer::new()
                .file("e/top1", "1")
                .file("e/top2", "2")
                .symlink("e/tl", "x")
                .file("w/keep", "k")
                .whiteout("w/x")
                .whiteout("v/y"),
            Layer::new()
                .file("e/bottom", "b")
                .dir("e/bdir")
                .file("w/x", "hidden by layer whiteout")
                .file("v/y", "hidden by layer whiteout"),
        ],
    )
    .step("rmdir merged non-empty", |m| rmdir(&p(m, "e")))
    .step("unlink all entries", |m| {
        seq(vec![
            ("top1", unlink(&p(m, "e/top1"))),
            ("top2", unlink(&p(m, "e/top2"))),
            ("tl", unlink(&p(m, "e/tl"))),
            ("bottom", unlink(&p(m, "e/bottom"))),
            ("bdir", rmdir(&p(m, "e/bdir"))),
        ])
    })
    .step("list emptied", |m| list(&p(m, "e")))
    .step("rmdir emptied dir", |m| rmdir(&p(m, "e")))
    .step("list w", |m| list(&p(m, "w")))
    .step("rmdir w (keep inside)", |m| rmdir(&p(m, "w")))
    .step("unlink keep, rmdir w", |m| {
        unlink(&p(m, "w/keep"))?;
        rmdir(&p(m, "w"))
    })
    .step("rmdir v (empty only via layer whiteout)", |m| {
        rmdir(&p(m, "v"))
    })
    .step("observe", |m| {
        seq(vec![
            ("root", list(m)),
            ("e", st(m, "e")),
            ("w", st(m, "w")),
        ])
    })
    .upper_check("e is a whiteout", upper_is_whiteout("e"))
    .upper_check("v is a whiteout", upper_is_whiteout("v"))
    .reverse()
    .run();
}

#[test]
fn rm_rf_lower_tree() {
    Scenario::new(
        "rm_rf_lower_tree",
        vec![
            Layer::new()
                .file("tree/a/1", "1")
                .file("tree/a/2", "2")
                .file("tree/b/c/d/3", "3")
                .symlink("tree/l", "a/1")
                .fifo("tree/b/fifo")
                .dir("tree/empty")
                .file("tree/x", "x")
                .mode(0o000),
            Layer::new()
                .file("tree2/x/y/z", "z")
                .symlink("tree2/x/l", "../../tree")
                .file("tree/a/bottom", "b")
                .file("tree/z/deep/er", "z")
                .file("other", "o"),
        ],
    )
    .step("rm -rf tree", |m| {
        std::fs::remove_dir_all(p(m, "tree"))
            .map(|_| String::new())
            .map_err(|e| e.raw_os_error().unwrap_or(-1))
    })
    .step("rm -rf (tool) tree2", |m| {
        sh(&format!("rm -rf '{}'", m.join("tree2").display()), &[])
    })
    .step("stat tree", |m| st(m, "tree"))
    .step("list root", list)
    .upper_check("tree is a whiteout", upper_is_whiteout("tree"))
    .reverse()
    .run();
}

#[test]
fn rm_rf_then_mkdir_is_opaque() {
    Scenario::new("rm_rf_then_mkdir_is_opaque", std_layers())
        .step("rm -rf d", |m| {
            std::fs::remove_dir_all(p(m, "d"))
                .map(|_| String::new())
                .map_err(|e| e.raw_os_error().unwrap_or(-1))
        })
        .step("mkdir d", |m| mkdir(&p(m, "d"), 0o700))
        .step("create d/new", |m| {
            write_file(&p(m, "d/new"), libc::O_WRONLY | libc::O_CREAT, b"new")
        })
        .step("list d", |m| list(&p(m, "d")))
        .step("old names gone", |m| {
            seq(vec![
                ("g", st(m, "d/g.txt")),
                ("h", st(m, "a/b/c/leaf")),
                ("sub", st(m, "d/sub")),
            ])
        })
        .step("rmdir+mkdir bottom-only m", |m| {
            unlink(&p(m, "m/x"))?;
            rmdir(&p(m, "m/emptysub"))?;
            rmdir(&p(m, "m"))?;
            mkdir(&p(m, "m"), 0o755)?;
            list(&p(m, "m"))
        })
        .step("describe", |m| {
            seq(vec![("d", st(m, "d")), ("m", st(m, "m"))])
        })
        .upper_check("d opaque", |u: &Path| {
            match get_xattr(&u.join("d"), b"trusted.overlay.opaque") {
                Ok(v) if v == b"y" => vec![],
                other => vec![format!("d: trusted.overlay.opaque = {other:?}")],
            }
        })
        .reverse()
        .run();
}

#[test]
fn create_over_whiteout() {
    Scenario::new("create_over_whiteout", std_layers())
        .step("unlink + create file", |m| {
            unlink(&p(m, "f.txt"))?;
            write_file(&p(m, "f.txt"), libc::O_WRONLY | libc::O_CREAT, b"reborn\n")
        })
        .step("unlink + symlink", |m| {
            unlink(&p(m, "both"))?;
            symlink("f.txt", &p(m, "both"))
        })
        .step("unlink file + mkdir (opaque)", |m| {
            unlink(&p(m, "g.txt"))?;
            mkdir(&p(m, "g.txt"), 0o755)
        })
        .step("rmdir + create file", |m| {
            rmdir(&p(m, "emptydir"))?;
            write_file(
                &p(m, "emptydir"),
                libc::O_WRONLY | libc::O_CREAT,
                b"was a dir",
            )
        })
        .step("unlink + mkfifo", |m| {
            unlink(&p(m, "a/b/c/leaf"))?;
            mknod(&p(m, "a/b/c/leaf"), libc::S_IFIFO | 0o600, 0, 0)
        })
        .step("unlink + link", |m| {
            unlink(&p(m, "d/both"))?;
            link(&p(m, "d/g.txt"), &p(m, "d/both"))
        })
        .step("layer whiteout name: create", |m| {
            write_file(&p(m, "d/sub/new"), libc::O_WRONLY | libc::O_CREAT, b"n")
        })
        .step("observe", |m| {
            seq(vec![
                ("f", rd(m, "f.txt")),
                ("both", st(m, "both")),
                ("g", st(m, "g.txt")),
                ("g_list", list(&p(m, "g.txt"))),
                ("emptydir", st(m, "emptydir")),
                ("h", st(m, "a/b/c/leaf")),
                ("dboth", st(m, "d/both")),
                ("list_d", list(&p(m, "d"))),
            ])
        })
        .reverse()
        .run();
}

// ===========================================================================
// Renames
// ===========================================================================

#[test]
fn rename_file_within_dir() {
    Scenario::new("rename_file_within_dir", std_layers())
        .step("rename lower file in root", |m| {
            rename(&p(m, "f.txt"), &p(m, "f_renamed"))
        })
        .step("rename in merged dir", |m| {
            rename(&p(m, "d/g.txt"), &p(m, "d/g2.txt"))
        })
        .step("rename bottom-only file", |m| {
            rename(&p(m, "a/b/c/leaf"), &p(m, "d/h2.txt"))
        })
        .step("rename upper-only file", |m| {
            write_file(&p(m, "u1"), libc::O_WRONLY | libc::O_CREAT, b"u")?;
            rename(&p(m, "u1"), &p(m, "u2"))
        })
        .step("rename lower symlink", |m| rename(&p(m, "s"), &p(m, "s2")))
        .step("rename fifo", |m| rename(&p(m, "fifo"), &p(m, "fifo2")))
        .step("rename missing", |m| rename(&p(m, "nope"), &p(m, "nope2")))
        .step("rename back to a whiteout name", |m| {
            rename(&p(m, "f_renamed"), &p(m, "f.txt"))
        })
        .step("ino stable over rename", |m| {
            let i0 = ino(&p(m, "g.txt"))?;
            rename(&p(m, "g.txt"), &p(m, "g_moved"))?;
            Ok(format!("stable={}", i0 == ino(&p(m, "g_moved"))?))
        })
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("d", list(&p(m, "d"))),
                ("f", rd(m, "f.txt")),
                ("s2", st(m, "s2")),
                ("g_moved", st(m, "g_moved")),
            ])
        })
        .upper_check("whiteout at old d/g.txt", upper_is_whiteout("d/g.txt"))
        .reverse()
        .run();
}

#[test]
fn rename_file_between_dirs() {
    Scenario::new("rename_file_between_dirs", std_layers())
        .step("lower d/g.txt -> a/b/moved", |m| {
            rename(&p(m, "d/g.txt"), &p(m, "a/b/moved"))
        })
        .step("root file -> new dir", |m| {
            mkdir(&p(m, "newdir"), 0o755)?;
            rename(&p(m, "f.txt"), &p(m, "newdir/f"))
        })
        .step("bottom-only m/x -> d/x", |m| {
            rename(&p(m, "m/x"), &p(m, "d/x"))
        })
        .step("deep -> root", |m| {
            rename(&p(m, "d/sub/deep/file"), &p(m, "deepfile"))
        })
        .step("into missing dir", |m| {
            rename(&p(m, "both"), &p(m, "nodir/both"))
        })
        .step("observe", |m| {
            seq(vec![
                ("moved", rd(m, "a/b/moved")),
                ("nf", st(m, "newdir/f")),
                ("dx", rd(m, "d/x")),
                ("m", list(&p(m, "m"))),
                ("deep", list(&p(m, "d/sub/deep"))),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn rename_onto_existing() {
    Scenario::new("rename_onto_existing", std_layers())
        .step("lower onto lower", |m| {
            rename(&p(m, "f.txt"), &p(m, "both"))
        })
        .step("lower onto bottom-only", |m| {
            rename(&p(m, "d/g.txt"), &p(m, "a/b/c/leaf"))
        })
        .step("upper-only onto lower", |m| {
            write_file(&p(m, "u"), libc::O_WRONLY | libc::O_CREAT, b"upper")?;
            rename(&p(m, "u"), &p(m, "g.txt"))
        })
        .step("lower onto upper-only", |m| {
            write_file(&p(m, "u2"), libc::O_WRONLY | libc::O_CREAT, b"upper2")?;
            rename(&p(m, "empty"), &p(m, "u2"))
        })
        .step("onto itself", |m| rename(&p(m, "suid"), &p(m, "suid")))
        .step("hard link onto its other name (no-op)", |m| {
            link(&p(m, "d/both"), &p(m, "d/both_hl"))?;
            rename(&p(m, "d/both"), &p(m, "d/both_hl"))
        })
        .step("file onto dir", |m| {
            rename(&p(m, "secret"), &p(m, "emptydir"))
        })
        .step("dir onto file", |m| {
            rename(&p(m, "emptydir"), &p(m, "secret"))
        })
        .step("file onto symlink", |m| rename(&p(m, "secret"), &p(m, "s")))
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("both", rd(m, "both")),
                ("h", rd(m, "a/b/c/leaf")),
                ("g", rd(m, "g.txt")),
                ("u2", rd(m, "u2")),
                ("s", st(m, "s")),
                ("d", list(&p(m, "d"))),
                ("hl", st(m, "d/both_hl")),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn rename_noreplace() {
    Scenario::new("rename_noreplace", std_layers())
        .step("onto existing lower", |m| {
            rename2(&p(m, "f.txt"), &p(m, "both"), RENAME_NOREPLACE)
        })
        .step("onto existing dir", |m| {
            rename2(&p(m, "f.txt"), &p(m, "d"), RENAME_NOREPLACE)
        })
        .step("onto free name", |m| {
            rename2(&p(m, "f.txt"), &p(m, "free"), RENAME_NOREPLACE)
        })
        .step("onto whited-out name", |m| {
            unlink(&p(m, "both"))?;
            rename2(&p(m, "g.txt"), &p(m, "both"), RENAME_NOREPLACE)
        })
        .step("onto layer-shadowed bottom name", |m| {
            rename2(&p(m, "d/g.txt"), &p(m, "a/b/c/leaf"), RENAME_NOREPLACE)
        })
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("both", st(m, "both")),
                ("free", rd(m, "free")),
            ])
        })
        .upper_check("f.txt whiteout", upper_is_whiteout("f.txt"))
        .reverse()
        .run();
}

/// With `redirect_dir=off` (the kernel's default) and `=on` (layerfs's).
#[test]
fn rename_exchange() {
    for opts in ["redirect_dir=off", "redirect_dir=on"] {
        rename_exchange_with(opts);
    }
}

fn rename_exchange_with(opts: &str) {
    Scenario::new(&format!("rename_exchange {opts}"), std_layers())
        .opts(opts)
        .step("two lower files", |m| {
            rename2(&p(m, "f.txt"), &p(m, "both"), RENAME_EXCHANGE)
        })
        .step("lower and upper-only", |m| {
            write_file(&p(m, "u"), libc::O_WRONLY | libc::O_CREAT, b"upper")?;
            rename2(&p(m, "u"), &p(m, "d/g.txt"), RENAME_EXCHANGE)
        })
        .step("with missing", |m| {
            rename2(&p(m, "g.txt"), &p(m, "nope"), RENAME_EXCHANGE)
        })
        .step("file and upper-only dir", |m| {
            mkdir(&p(m, "ud"), 0o755)?;
            write_file(&p(m, "ud/in"), libc::O_WRONLY | libc::O_CREAT, b"in")?;
            rename2(&p(m, "g.txt"), &p(m, "ud"), RENAME_EXCHANGE)
        })
        .step("file and lower dir", |m| {
            rename2(&p(m, "empty"), &p(m, "emptydir"), RENAME_EXCHANGE)
        })
        .step("bottom-only and top file", |m| {
            rename2(&p(m, "a/b/c/leaf"), &p(m, "d/both"), RENAME_EXCHANGE)
        })
        .step("observe", |m| {
            seq(vec![
                ("f", rd(m, "f.txt")),
                ("both", rd(m, "both")),
                ("u", rd(m, "u")),
                ("dg", rd(m, "d/g.txt")),
                ("g", st(m, "g.txt")),
                ("ud", st(m, "ud")),
                ("g_list", list(&p(m, "g.txt"))),
                ("h", rd(m, "a/b/c/leaf")),
                ("dboth", rd(m, "d/both")),
                ("d", list(&p(m, "d"))),
            ])
        })
        .reverse()
        .run();
}

/// With `redirect_dir=off` (the kernel's default: EXDEV for directories
/// with lower contents) and `=on` (layerfs's default).
#[test]
fn rename_directories() {
    for opts in ["redirect_dir=off", "redirect_dir=on"] {
        rename_directories_with(opts);
    }
}

fn rename_directories_with(opts: &str) {
    Scenario::new(&format!("rename_directories {opts}"), std_layers())
        .opts(opts)
        .step("lower-only dir", |m| rename(&p(m, "a"), &p(m, "a2")))
        .step("merged dir", |m| rename(&p(m, "d"), &p(m, "d2")))
        .step("bottom-only dir", |m| rename(&p(m, "m"), &p(m, "m2")))
        .step("empty lower dir", |m| {
            rename(&p(m, "emptydir"), &p(m, "e2"))
        })
        .step("copied-up lower dir", |m| {
            chmod(&p(m, "a/b"), 0o700)?;
            rename(&p(m, "a/b"), &p(m, "a/b2"))
        })
        .step("upper-only dir", |m| {
            mkdir(&p(m, "nd"), 0o755)?;
            write_file(&p(m, "nd/f"), libc::O_WRONLY | libc::O_CREAT, b"f")?;
            rename(&p(m, "nd"), &p(m, "nd2"))
        })
        .step("opaque dir (rm -rf + mkdir) rename", |m| {
            std::fs::remove_dir_all(p(m, "d/sub")).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
            mkdir(&p(m, "d/sub"), 0o755)?;
            write_file(&p(m, "d/sub/n"), libc::O_WRONLY | libc::O_CREAT, b"n")?;
            rename(&p(m, "d/sub"), &p(m, "sub_moved"))
        })
        .step("RENAME_NOREPLACE lower dir", |m| {
            rename2(&p(m, "a"), &p(m, "a3"), RENAME_NOREPLACE)
        })
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("nd2", list(&p(m, "nd2"))),
                ("sub_moved", list(&p(m, "sub_moved"))),
                ("dsub", st(m, "d/sub")),
                ("d", list(&p(m, "d"))),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn rename_upper_dir_into_merged_dir() {
    Scenario::new("rename_upper_dir_into_merged_dir", std_layers())
        .step("build upper-only tree", |m| {
            mkdir(&p(m, "newd"), 0o750)?;
            write_file(&p(m, "newd/a"), libc::O_WRONLY | libc::O_CREAT, b"a")?;
            mkdir(&p(m, "newd/sub"), 0o755)?;
            write_file(&p(m, "newd/sub/b"), libc::O_WRONLY | libc::O_CREAT, b"b")
        })
        .step("move into merged dir", |m| {
            rename(&p(m, "newd"), &p(m, "d/newd"))
        })
        .step("move into deep lower dir", |m| {
            rename(&p(m, "d/newd"), &p(m, "a/b/c/newd"))
        })
        .step("onto empty lower dir", |m| {
            mkdir(&p(m, "n2"), 0o755)?;
            write_file(&p(m, "n2/z"), libc::O_WRONLY | libc::O_CREAT, b"z")?;
            rename(&p(m, "n2"), &p(m, "emptydir"))
        })
        .step("onto empty bottom-only dir", |m| {
            mkdir(&p(m, "n3"), 0o755)?;
            rename(&p(m, "n3"), &p(m, "m/emptysub"))
        })
        .step("onto non-empty lower dir", |m| {
            mkdir(&p(m, "n4"), 0o755)?;
            rename(&p(m, "n4"), &p(m, "d"))
        })
        .step("observe", |m| {
            seq(vec![
                ("root", list(m)),
                ("c", list(&p(m, "a/b/c"))),
                ("newd", list(&p(m, "a/b/c/newd"))),
                ("emptydir", list(&p(m, "emptydir"))),
                ("emptysub", list(&p(m, "m/emptysub"))),
                ("d", list(&p(m, "d"))),
            ])
        })
        .reverse()
        .run();
}

// ===========================================================================
// Hard links, open files
// ===========================================================================

#[test]
fn lower_hardlinks_break_on_copy_up() {
    Scenario::new(
        "lower_hardlinks_break_on_copy_up",
        vec![
            Layer::new()
                .file("h1", "shared data\n")
                .mode(0o640)
                .owner(10, 10)
                .hardlink("h2", "h1")
                .hardlink("sub/h3", "h1")
                .file("k1", "k data\n")
                .hardlink("k2", "k1"),
            Layer::new(),
        ],
    )
    .step("before", |m| {
        Ok(format!(
            "h1={} same12={} same13={}",
            describe(&p(m, "h1"))?,
            ino(&p(m, "h1"))? == ino(&p(m, "h2"))?,
            ino(&p(m, "h1"))? == ino(&p(m, "sub/h3"))?
        ))
    })
    .step("append to h1", |m| {
        write_file(
            &p(m, "h1"),
            libc::O_WRONLY | libc::O_APPEND,
            b"new for h1\n",
        )
    })
    .step("after", |m| {
        Ok(format!(
            "h1={} h2={} h1c={} h2c={} same12={} same23={}",
            describe(&p(m, "h1"))?,
            describe(&p(m, "h2"))?,
            read_file(&p(m, "h1"))?,
            read_file(&p(m, "h2"))?,
            ino(&p(m, "h1"))? == ino(&p(m, "h2"))?,
            ino(&p(m, "h2"))? == ino(&p(m, "sub/h3"))?
        ))
    })
    .step("chmod k2 (metadata copy-up)", |m| chmod(&p(m, "k2"), 0o600))
    .step("after k", |m| {
        seq(vec![
            ("k1", st(m, "k1")),
            ("k2", st(m, "k2")),
            (
                "same",
                Ok(format!("{}", ino(&p(m, "k1"))? == ino(&p(m, "k2"))?)),
            ),
        ])
    })
    .step("O_TRUNC h3", |m| {
        write_file(&p(m, "sub/h3"), libc::O_WRONLY | libc::O_TRUNC, b"h3 only")?;
        seq(vec![("h2", rd(m, "h2")), ("h3", rd(m, "sub/h3"))])
    })
    .reverse()
    .run();
}

#[test]
fn reader_sees_copy_up() {
    Scenario::new("reader_sees_copy_up", std_layers())
        .step("read fd, then write via another fd, reread", |m| {
            let r = open(&p(m, "f.txt"), libc::O_RDONLY, 0)?;
            let first = r.read(5)?;
            let w = open(&p(m, "f.txt"), libc::O_WRONLY, 0)?;
            w.pwrite(b"XXXXXYYYYYYY", 0)?;
            w.write(b"Z")?; // overwrite position 0 with Z
            drop(w);
            let rest = r.read(100)?;
            let all = r.pread(100, 0)?;
            let size = r.fstat()?.st_size;
            Ok(format!(
                "first={} rest={} all={} fstat_size={size}",
                content_obs(&first),
                content_obs(&rest),
                content_obs(&all)
            ))
        })
        .step("append grows size seen by reader", |m| {
            let r = open(&p(m, "d/g.txt"), libc::O_RDONLY, 0)?;
            let before = r.fstat()?.st_size;
            write_file(
                &p(m, "d/g.txt"),
                libc::O_WRONLY | libc::O_APPEND,
                b"appended!\n",
            )?;
            let after = r.fstat()?.st_size;
            Ok(format!("{before}->{after} {}", content_obs(&r.read_all()?)))
        })
        .step(
            "reader reads past the old end after an append elsewhere",
            |m| {
                // The read beyond the cached size makes the kernel ask for the
                // size through the reader's own (pre-copy-up) open file.
                let r = open(&p(m, "a/b/c/leaf"), libc::O_RDONLY, 0)?;
                let head = r.pread(4, 0)?;
                write_file(
                    &p(m, "a/b/c/leaf"),
                    libc::O_WRONLY | libc::O_APPEND,
                    b"appended after the reader opened\n",
                )?;
                let tail = r.pread(4096, 4)?;
                Ok(format!(
                    "{} {} size={}",
                    content_obs(&head),
                    content_obs(&tail),
                    std::fs::metadata(p(m, "a/b/c/leaf"))
                        .map_err(|e| e.raw_os_error().unwrap_or(0))?
                        .len()
                ))
            },
        )
        .step("reader of a file replaced by rename keeps old data", |m| {
            let r = open(&p(m, "both"), libc::O_RDONLY, 0)?;
            write_file(&p(m, "nb"), libc::O_WRONLY | libc::O_CREAT, b"replacement")?;
            rename(&p(m, "nb"), &p(m, "both"))?;
            Ok(format!(
                "{} now={}",
                content_obs(&r.read_all()?),
                rd(m, "both")?
            ))
        })
        .run();
}

#[test]
fn unlinked_open_files() {
    Scenario::new("unlinked_open_files", std_layers())
        .step("lower file opened O_RDWR, unlinked", |m| {
            let fd = open(&p(m, "f.txt"), libc::O_RDWR, 0)?;
            unlink(&p(m, "f.txt"))?;
            let nl = fd.fstat()?.st_nlink;
            fd.pwrite(b"still writable", 0)?;
            let data = fd.read_all()?;
            Ok(format!(
                "nlink={nl} data={} stat_path={}",
                content_obs(&data),
                show_r(&st(m, "f.txt"))
            ))
        })
        .step("upper-only file unlinked while open", |m| {
            let fd = open(&p(m, "u"), libc::O_RDWR | libc::O_CREAT, 0o644)?;
            fd.write(b"upper data")?;
            unlink(&p(m, "u"))?;
            let nl = fd.fstat()?.st_nlink;
            fd.pwrite(b"UP", 0)?;
            Ok(format!("nlink={nl} data={}", content_obs(&fd.read_all()?)))
        })
        .step("lower file opened O_RDONLY, unlinked", |m| {
            let fd = open(&p(m, "d/g.txt"), libc::O_RDONLY, 0)?;
            unlink(&p(m, "d/g.txt"))?;
            let nl = fd.fstat()?.st_nlink;
            Ok(format!("nlink={nl} data={}", content_obs(&fd.read_all()?)))
        })
        .step("hard-linked: unlink one name of open file", |m| {
            link(&p(m, "both"), &p(m, "both2"))?;
            let fd = open(&p(m, "both"), libc::O_RDWR, 0)?;
            unlink(&p(m, "both"))?;
            Ok(format!("nlink={}", fd.fstat()?.st_nlink))
        })
        .step("observe", |m| {
            seq(vec![("root", list(m)), ("d", list(&p(m, "d")))])
        })
        .run();
}

/// Lower files opened for reading whose first read comes only after their
/// name changed: renamed over, unlinked, copied up and written, copied up
/// and unlinked, renamed and appended to. layerfs opens such a file itself
/// only at its first read (after the file's first open, which fills the
/// kernel's cache), so that read must find the file the open found, or its
/// copy-up.
#[test]
fn first_reads_of_lower_files_after_their_names_changed() {
    fn obs(fd: &Fd) -> R {
        Ok(content_obs(&fd.pread(4096, 0)?))
    }
    // Read once before; the open that follows is the file's second.
    fn open(path: &Path, flags: i32, mode: u32) -> Result<Fd, i32> {
        read_file(path)?;
        cow_support::open(path, flags, mode)
    }
    Scenario::new(
        "first_reads_of_lower_files_after_their_names_changed",
        std_layers(),
    )
    .step("open f.txt, rename g.txt over it, read", |m| {
        let fd = open(&p(m, "f.txt"), libc::O_RDONLY, 0)?;
        rename(&p(m, "g.txt"), &p(m, "f.txt"))?;
        seq(vec![("fd", obs(&fd)), ("f.txt", rd(m, "f.txt"))])
    })
    .step("open d/g.txt, unlink it, read", |m| {
        let fd = open(&p(m, "d/g.txt"), libc::O_RDONLY, 0)?;
        unlink(&p(m, "d/g.txt"))?;
        obs(&fd)
    })
    .step(
        "open both twice, truncate and write through a new fd, read",
        |m| {
            let a = open(&p(m, "both"), libc::O_RDONLY, 0)?;
            let b = open(&p(m, "both"), libc::O_RDONLY, 0)?;
            write_file(&p(m, "both"), libc::O_WRONLY | libc::O_TRUNC, b"rewritten")?;
            seq(vec![("a", obs(&a)), ("b", obs(&b))])
        },
    )
    .step("open a/b/c/leaf, chmod (copy-up), unlink, read", |m| {
        let fd = open(&p(m, "a/b/c/leaf"), libc::O_RDONLY, 0)?;
        chmod(&p(m, "a/b/c/leaf"), 0o600)?;
        unlink(&p(m, "a/b/c/leaf"))?;
        obs(&fd)
    })
    .step(
        "open d/both, rename it, append through the new name, read",
        |m| {
            let fd = open(&p(m, "d/both"), libc::O_RDONLY, 0)?;
            rename(&p(m, "d/both"), &p(m, "d/moved"))?;
            write_file(
                &p(m, "d/moved"),
                libc::O_WRONLY | libc::O_APPEND,
                b"+more\n",
            )?;
            seq(vec![
                ("fd", obs(&fd)),
                ("fstat", Ok(fd.fstat()?.st_size.to_string())),
            ])
        },
    )
    .step("open secret, unlink it, fstat before any read, read", |m| {
        let fd = open(&p(m, "secret"), libc::O_RDONLY, 0)?;
        unlink(&p(m, "secret"))?;
        let size = fd.fstat()?.st_size;
        Ok(format!("size={size} {}", obs(&fd)?))
    })
    .run();
}

// ===========================================================================
// Big and sparse files
// ===========================================================================

const MIB: u64 = 1 << 20;

#[test]
fn sparse_file_copy_up() {
    Scenario::new(
        "sparse_file_copy_up",
        vec![
            Layer::new()
                .sparse_file(
                    "sparse",
                    64 * MIB,
                    &[(0, b"start"), (10 * MIB, b"ten"), (64 * MIB - 3, b"end")],
                )
                .sparse_file("sparse2", 16 * MIB, &[(MIB, b"one")])
                .sparse_file("allhole", 8 * MIB, &[]),
            Layer::new(),
        ],
    )
    .step("write in the middle", |m| {
        let fd = open(&p(m, "sparse"), libc::O_WRONLY, 0)?;
        fd.pwrite(b"middle", 20 * MIB)
    })
    .step("read back pieces", |m| {
        let fd = open(&p(m, "sparse"), libc::O_RDONLY, 0)?;
        Ok(format!(
            "{} {} {} {} {}",
            content_obs(&fd.pread(5, 0)?),
            content_obs(&fd.pread(3, 10 * MIB)?),
            content_obs(&fd.pread(6, 20 * MIB)?),
            content_obs(&fd.pread(8, 30 * MIB)?),
            content_obs(&fd.pread(10, 64 * MIB - 3)?)
        ))
    })
    .step("metadata copy-up of sparse2", |m| {
        chmod(&p(m, "sparse2"), 0o600)
    })
    .step("append to all-hole file", |m| {
        write_file(&p(m, "allhole"), libc::O_WRONLY | libc::O_APPEND, b"tail")
    })
    .step("SEEK_DATA after 1 MiB in sparse", |m| {
        let fd = open(&p(m, "sparse"), libc::O_RDONLY, 0)?;
        // SAFETY: plain lseek on our fd.
        let off = unsafe { libc::lseek(fd.0, MIB as libc::off_t, libc::SEEK_DATA) };
        if off < 0 {
            return Err(errno());
        }
        Ok(format!("next data at {}", off as u64 / 4096 * 4096))
    })
    // The kernel copies data in 1 MiB chunks starting at each data extent,
    // so a few MiB are allocated (layerfs copies alike: the blocks are
    // compared); without holes it would be 64+16+8 MiB.
    .upper_check("holes kept (st_blocks small)", |u: &Path| {
        let mut out = Vec::new();
        for f in ["sparse", "sparse2", "allhole"] {
            match blocks_of(&u.join(f)) {
                Ok(b) if b * 512 <= 8 * MIB => {}
                Ok(b) => out.push(format!("{f}: {} KiB allocated in the upper", b / 2)),
                Err(e) => out.push(format!("{f}: {}", errno_name(e))),
            }
        }
        out
    })
    .run();
}

#[test]
fn big_file_copy_up_64mib() {
    Scenario::new(
        "big_file_copy_up_64mib",
        vec![
            Layer::new().large_file("big", 64 * MIB, 42).mode(0o640),
            Layer::new(),
        ],
    )
    .step("pwrite 4 bytes at 32 MiB", |m| {
        let fd = open(&p(m, "big"), libc::O_WRONLY, 0)?;
        fd.pwrite(b"MARK", 32 * MIB)
    })
    .step("read around the mark and the end", |m| {
        let fd = open(&p(m, "big"), libc::O_RDONLY, 0)?;
        Ok(format!(
            "{} {} size={}",
            content_obs(&fd.pread(16, 32 * MIB - 6)?),
            content_obs(&fd.pread(16, 64 * MIB - 8)?),
            fd.fstat()?.st_size
        ))
    })
    .step("expected bytes unchanged elsewhere", |m| {
        let fd = open(&p(m, "big"), libc::O_RDONLY, 0)?;
        let got = fd.pread(4096, 48 * MIB)?;
        let all = pattern_bytes((48 * MIB + 4096) as usize, 42);
        Ok(format!("matches={}", got[..] == all[48 * MIB as usize..]))
    })
    // ext4 settles the allocation of a freshly written 64 MiB file late
    // (131080 vs 131072 sectors seen under load), so st_blocks is checked
    // as "fully allocated, within a few blocks" instead of exactly.
    .no_exact_blocks()
    .upper_check("copy fully allocated", |u: &Path| {
        match blocks_of(&u.join("big")) {
            Ok(b) if b * 512 >= 64 * MIB && b * 512 <= 64 * MIB + MIB => Vec::new(),
            Ok(b) => vec![format!("big: {} KiB allocated in the upper", b / 2)],
            Err(e) => vec![format!("big: {}", errno_name(e))],
        }
    })
    .run();
}

// ===========================================================================
// Non-root callers, ownership, setgid
// ===========================================================================

fn perm_layers() -> Vec<Layer> {
    vec![
        Layer::new()
            .file("secret", "secret\n")
            .mode(0o600)
            .file("rootdir/file", "root's\n")
            .mode(0o644)
            .dir("rootdir")
            .mode(0o755)
            .file("sticky/rootfile", "r")
            .file("sticky/userfile", "u")
            .owner(NOBODY, NOGROUP)
            .dir("sticky")
            .mode(0o1777)
            .file("mine", "mine\n")
            .owner(NOBODY, NOGROUP)
            .mode(0o644)
            .dir("pub")
            .mode(0o777)
            .file("pub/existing", "e")
            .dir("userdir")
            .owner(NOBODY, NOGROUP)
            .mode(0o755)
            .file("userdir/ufile", "uf")
            .owner(NOBODY, NOGROUP)
            .file("sg/old", "o")
            .dir("sg")
            .mode(0o2775)
            .owner(0, 1234)
            .dir("sgw")
            .mode(0o2777)
            .owner(0, 1234),
        Layer::new()
            .file("sticky/bottomfile", "b")
            .file("pub/bottom", "pb"),
    ]
}

fn user<F: FnOnce() -> R>(f: F) -> R {
    as_user(NOBODY, NOGROUP, f)
}

/// A write or truncation by a caller without CAP_FSETID clears setuid and
/// setgid bits (setgid without group execute only for a caller outside the
/// file's group) and security.capability; root's keep the bits. layerfs does
/// this itself (FUSE_HANDLE_KILLPRIV_V2): through the daemon for
/// setuid/setgid files, through the backing filesystem for a file made
/// setuid while open (passthrough).
#[test]
fn setid_bits_cleared_by_writes() {
    const CAP: &[u8] =
        b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let mut l = Layer::new().dir("d").mode(0o777);
    for n in ["suid", "trunc", "otrunc", "falloc", "cfr", "ftrunc"] {
        l = l.file(format!("d/{n}"), "abc").mode(0o4777);
    }
    let l = l
        .file("d/sgidx", "abc")
        .mode(0o2777)
        .file("d/sgidnx", "abc")
        .mode(0o2767)
        .owner(0, 1234)
        .file("d/sgidnx_member", "abc")
        .mode(0o2767)
        .owner(0, NOGROUP)
        .file("d/root", "abc")
        .mode(0o4755)
        .file("d/cap", "abc")
        .mode(0o777)
        .xattr("security.capability", CAP)
        .file("d/late", "abc")
        .mode(0o644)
        .owner(NOBODY, NOGROUP)
        .file("d/src", "0123456789");
    fn append(f: &Path) -> R {
        write_file(f, libc::O_WRONLY | libc::O_APPEND, b"x")
    }
    fn after(f: &Path, r: R) -> R {
        seq(vec![("op", r), ("after", describe(f))])
    }
    let mut sc = Scenario::new("setid_bits_cleared_by_writes", vec![l]);
    for n in ["suid", "sgidx", "sgidnx", "cap"] {
        sc = sc.step(&format!("user writes lower {n}"), move |m| {
            let f = p(m, &format!("d/{n}"));
            let r = user(|| append(&f));
            after(&f, r)
        });
    }
    sc.step("group member writes lower 2767 file", |m| {
        let f = p(m, "d/sgidnx_member");
        let r = user(|| append(&f));
        after(&f, r)
    })
    .step("root writes lower 4755 file", |m| {
        let f = p(m, "d/root");
        after(&f, append(&f))
    })
    .step("user truncates 4777 file", |m| {
        let f = p(m, "d/trunc");
        let r = user(|| truncate(&f, 1));
        after(&f, r)
    })
    .step("user opens 4777 file O_TRUNC", |m| {
        let f = p(m, "d/otrunc");
        let r = user(|| write_file(&f, libc::O_WRONLY | libc::O_TRUNC, b""));
        after(&f, r)
    })
    .step("user ftruncates an open 4777 file", |m| {
        let f = p(m, "d/ftrunc");
        let r = user(|| {
            let fd = open(&f, libc::O_WRONLY, 0)?;
            // SAFETY: plain syscall on our fd.
            chk(unsafe { libc::ftruncate(fd.0, 2) })
        });
        after(&f, r)
    })
    .step("user fallocates in a 4777 file", |m| {
        let f = p(m, "d/falloc");
        let r = user(|| {
            let fd = open(&f, libc::O_WRONLY, 0)?;
            // SAFETY: plain syscall on our fd.
            chk(unsafe { libc::fallocate(fd.0, 0, 0, 8192) })
        });
        after(&f, r)
    })
    .step("user copy_file_range into a 4777 file", |m| {
        let (src, f) = (p(m, "d/src"), p(m, "d/cfr"));
        let r = user(|| {
            let (i, o) = (open(&src, libc::O_RDONLY, 0)?, open(&f, libc::O_WRONLY, 0)?);
            // SAFETY: plain syscall on our fds.
            let n = unsafe {
                libc::copy_file_range(i.0, std::ptr::null_mut(), o.0, std::ptr::null_mut(), 5, 0)
            };
            if n < 0 {
                Err(errno())
            } else {
                Ok(format!("{n}"))
            }
        });
        after(&f, r)
    })
    .step("user makes its open file setuid, then writes", |m| {
        let f = p(m, "d/late");
        let r = user(|| {
            let fd = open(&f, libc::O_WRONLY | libc::O_APPEND, 0)?;
            fd.write(b"1")?;
            chmod(&f, 0o4755)?;
            let mid = describe(&f)?;
            fd.write(b"2")?;
            Ok(mid)
        });
        after(&f, r)
    })
    .step("root creates a 4777 upper file, user writes it", |m| {
        let f = p(m, "d/new");
        write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"abc")?;
        chmod(&f, 0o4777)?;
        let r = user(|| append(&f));
        after(&f, r)
    })
    .run();
}

/// Objects made over whiteouts are built in the work dir and swapped in:
/// in a setgid directory they still get its group, and directories its
/// setgid bit, as the kernel gives them.
#[test]
fn creating_over_whiteouts_in_a_setgid_dir() {
    Scenario::new(
        "creating_over_whiteouts_in_a_setgid_dir",
        vec![
            Layer::new()
                .dir("sg")
                .mode(0o2775)
                .owner(0, 1234)
                .file("sg/f", "f")
                .file("sg/d/x", "x")
                .file("sg/n", "n"),
        ],
    )
    .step("rm f, mkdir f", |m| {
        let f = p(m, "sg/f");
        seq(vec![
            ("rm", unlink(&f)),
            ("mkdir", mkdir(&f, 0o755)),
            ("it", describe(&f)),
        ])
    })
    .step("rm -r d, create file d", |m| {
        let d = p(m, "sg/d");
        seq(vec![
            ("rm x", unlink(&p(m, "sg/d/x"))),
            ("rmdir", rmdir(&d)),
            (
                "create",
                write_file(&d, libc::O_WRONLY | libc::O_CREAT, b"new"),
            ),
            ("it", describe(&d)),
        ])
    })
    .step("rm n, mkfifo n", |m| {
        let n = p(m, "sg/n");
        seq(vec![
            ("rm", unlink(&n)),
            ("mkfifo", mknod(&n, libc::S_IFIFO | 0o644, 0, 0)),
            ("it", describe(&n)),
        ])
    })
    .run();
}

/// rename(2) errors come in the kernel's order: unsupported flags
/// (RENAME_WHITEOUT) are EINVAL; with `redirect_dir=off`, a directory with
/// lower contents is EXDEV before its target is found non-empty.
#[test]
fn rename_errors_in_the_kernels_order() {
    Scenario::new(
        "rename_errors_in_the_kernels_order",
        vec![
            Layer::new()
                .file("a", "a")
                .file("src/x", "x")
                .file("dst/y", "y"),
        ],
    )
    .opts("redirect_dir=off")
    .step("RENAME_WHITEOUT", |m| {
        rename2(&p(m, "a"), &p(m, "b"), libc::RENAME_WHITEOUT)
    })
    .step("lower dir over a non-empty dir", |m| {
        rename(&p(m, "src"), &p(m, "dst"))
    })
    .run();
}

/// Directories with lower contents are renamed as the kernel renames them
/// with `redirect_dir=on` (layerfs's default): within a directory, to
/// another, again, with their parent, out of a moved parent, over an empty
/// directory, exchanged; the contents follow them, the old names are
/// whited out, new objects land in the moved directories, and the uppers
/// carry the kernel's redirects (the kernel mounted over layerfs's upper,
/// and layerfs over the kernel's, show the same tree).
#[test]
fn directory_renames_with_redirects() {
    /// A name of 100 bytes: three make a path longer than the kernel's
    /// `redirect_max` (256).
    const L100: &str = "llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll";
    fn ino(p: &Path) -> Result<u64, i32> {
        lstat(p).map(|st| st.st_ino)
    }
    /// Renames and tells whether the directory kept its inode number.
    fn mv(m: &Path, from: &str, to: &str, flags: u32) -> R {
        let before = ino(&p(m, from))?;
        rename2(&p(m, from), &p(m, to), flags)?;
        Ok(format!("same ino: {}", ino(&p(m, to))? == before))
    }
    Scenario::new(
        "directory_renames_with_redirects",
        vec![
            Layer::new()
                .file("a/f1", "f1")
                .dir("x")
                .file("m/keep", "k")
                .file("e1/one", "1")
                .dir("e2"),
            Layer::new()
                .file("a/f", "f")
                .file("a/sub/g", "g")
                .file("a/sub/deep/d", "d")
                .file("p/q/r", "r")
                .file("s/t/u", "u")
                .dir("empty")
                .file(format!("{L100}/{L100}/{L100}/f"), "f"),
        ],
    )
    .opts("redirect_dir=on")
    .reverse()
    .step("path too long for a redirect", |m| {
        let long = format!("{L100}/{L100}/{L100}");
        seq(vec![
            ("elsewhere", mv(m, &long, "lx", 0)),
            (
                "within its dir",
                mv(m, &long, &format!("{L100}/{L100}/l2"), 0),
            ),
        ])
    })
    .step("within its dir", |m| mv(m, "a", "a2", 0))
    .step("to another dir", |m| mv(m, "a2/sub", "x/sub2", 0))
    .step("nested lower dir out", |m| mv(m, "p/q", "x/q2", 0))
    .step("again within its new dir", |m| mv(m, "x/q2", "x/q3", 0))
    .step("its parent moves", |m| mv(m, "x", "p2", 0))
    .step("out of a moved parent", |m| {
        mv(m, "p2/sub2/deep", "m/deep2", 0)
    })
    .step("absolute one moves on", |m| mv(m, "p2/q3", "s/q4", 0))
    .step("write in moved dirs", |m| {
        seq(vec![
            (
                "h",
                write_file(&p(m, "p2/sub2/h"), libc::O_CREAT | libc::O_WRONLY, b"new"),
            ),
            (
                "f1",
                write_file(&p(m, "a2/f1"), libc::O_WRONLY | libc::O_APPEND, b"+"),
            ),
            ("rm g", unlink(&p(m, "p2/sub2/g"))),
        ])
    })
    .step("old name made again", |m| mkdir(&p(m, "a"), 0o755))
    .step("over an empty lower dir", |m| mv(m, "s/t", "empty", 0))
    .step("onto a whiteout", |m| mv(m, "e1", "x", 0))
    .step("over a non-empty dir", |m| rename(&p(m, "e2"), &p(m, "m")))
    .step("exchanged across dirs", |m| {
        mv(m, "m/deep2", "s/q4", RENAME_EXCHANGE)
    })
    .step("exchanged in one dir", |m| {
        mv(m, "a2", "p2", RENAME_EXCHANGE)
    })
    .step("back to its first name", |m| {
        mv(m, "a", "a0", 0).and_then(|_| mv(m, "p2", "a", 0))
    })
    .step("listings", |m| {
        seq([
            "", "a", "a2", "a2/sub2", "x", "s", "s/q4", "m", "m/deep2", "empty",
        ]
        .iter()
        .map(|d| (*d, list(&p(m, d))))
        .collect())
    })
    .step("emptied and removed", |m| {
        seq(vec![
            ("r", unlink(&p(m, "m/deep2/r"))),
            ("rmdir", rmdir(&p(m, "m/deep2"))),
            ("gone", list(&p(m, "m"))),
        ])
    })
    .run();
}

/// A directory reached through a relative redirect in a lower layer (a
/// rename committed by an earlier container), moved to another directory:
/// its new absolute redirect leads to the lower directory that carries the
/// relative one, which then names a sibling *there* — not in the moved
/// directory's parent (found by unionmount-testsuite's rename-move-dir
/// with layers rotated: layerfs showed it empty, or merged an unrelated
/// directory of the same name).
#[test]
fn moved_directory_through_a_lower_relative_redirect() {
    Scenario::new(
        "lower_relative_redirect",
        vec![
            Layer::new()
                .dir("dx")
                .xattr("trusted.overlay.redirect", "d")
                .dir("e/gx")
                .xattr("trusted.overlay.redirect", "g")
                .dir("f"),
            Layer::new()
                .file("d/a", "a")
                .file("e/g/b", "b")
                .file("g/wrong_g", "w")
                .file("e/d/wrong_ed", "w")
                .file("f/gg/wrong_gg", "w"),
        ],
    )
    .opts("redirect_dir=on")
    .reverse()
    .step("before", |m| {
        seq(vec![
            ("dx", list(&p(m, "dx"))),
            ("e/gx", list(&p(m, "e/gx"))),
        ])
    })
    .step("into another dir", |m| rename(&p(m, "dx"), &p(m, "e/d2")))
    .step("out to the root", |m| rename(&p(m, "e/gx"), &p(m, "gg")))
    .step("after", |m| {
        seq(vec![
            ("e/d2", list(&p(m, "e/d2"))),
            ("gg", list(&p(m, "gg"))),
        ])
    })
    .run();
}

/// With `userxattr` the kernel follows no redirect, so neither writes one:
/// a directory with lower contents is not renamed (EXDEV, `mv` copies);
/// one without lower contents is.
#[test]
fn userxattr_directory_renames_stay_exdev() {
    Scenario::new(
        "userxattr_dir_renames",
        vec![Layer::new().file("d/f", "f").dir("e")],
    )
    .opts("userxattr")
    .step("lower dir", |m| rename(&p(m, "d"), &p(m, "d2")))
    .step("new dir", |m| {
        mkdir(&p(m, "n"), 0o755).and_then(|_| rename(&p(m, "n"), &p(m, "e/n2")))
    })
    .run();
}

/// O_DIRECT reads and writes (aligned buffers, as O_DIRECT asks of the
/// caller) of lower files, copied-up and new files work as on the kernel;
/// layerfs's own reads into its request buffers are not O_DIRECT.
#[test]
fn o_direct_io() {
    /// Reads or writes `len` bytes at 0 through a 4096-aligned buffer;
    /// the content read (or `fill` written).
    fn direct(path: &Path, flags: i32, len: usize, fill: Option<u8>) -> R {
        direct_at(path, flags, 0, len, fill)
    }
    fn direct_at(path: &Path, flags: i32, off: i64, len: usize, fill: Option<u8>) -> R {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        let fd = open(path, flags | libc::O_DIRECT, 0o644)?;
        // SAFETY: `buf` is valid for `len` bytes.
        let n = unsafe {
            if let Some(b) = fill {
                std::ptr::write_bytes(buf, b, len);
                libc::pwrite(fd.0, buf.cast(), len, off)
            } else {
                libc::pread(fd.0, buf.cast(), len, off)
            }
        };
        let r = if n < 0 {
            Err(errno())
        } else {
            // SAFETY: `n` bytes of `buf` were read or written.
            Ok(content_obs(unsafe {
                std::slice::from_raw_parts(buf, n as usize)
            }))
        };
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(buf, layout) };
        r
    }
    Scenario::new(
        "o_direct_io",
        vec![
            Layer::new()
                .large_file("big", 65536, 7)
                .large_file("w", 16384, 8),
        ],
    )
    .step("O_DIRECT read of a lower file, 512 B", |m| {
        direct(&p(m, "big"), libc::O_RDONLY, 512, None)
    })
    .step("O_DIRECT read of a lower file, 64 KiB", |m| {
        direct(&p(m, "big"), libc::O_RDONLY, 65536, None)
    })
    .step("O_DIRECT write into a lower file", |m| {
        direct(&p(m, "w"), libc::O_WRONLY, 4096, Some(b'd'))
    })
    .step("O_DIRECT read it back", |m| {
        direct(&p(m, "w"), libc::O_RDONLY, 8192, None)
    })
    .step("O_DIRECT write to a new file", |m| {
        direct(
            &p(m, "new"),
            libc::O_WRONLY | libc::O_CREAT,
            8192,
            Some(b'n'),
        )
    })
    // The filesystem's alignment rule (EINVAL), also for a lower file that
    // layerfs reads itself.
    .step("O_DIRECT read of a lower file, unaligned offset", |m| {
        direct_at(&p(m, "big"), libc::O_RDONLY, 100, 512, None)
    })
    .step("O_DIRECT read of a lower file, unaligned length", |m| {
        direct_at(&p(m, "big"), libc::O_RDONLY, 0, 100, None)
    })
    .step("O_DIRECT write to a copied-up file, unaligned", |m| {
        direct_at(&p(m, "w"), libc::O_WRONLY, 100, 512, Some(b'u'))
    })
    .step("O_DIRECT set by fcntl, then an unaligned read", |m| {
        let fd = open(&p(m, "big"), libc::O_RDONLY, 0)?;
        let mut buf = [0u8; 100];
        // SAFETY: plain fcntl/pread on an open fd into a local buffer.
        let n = unsafe {
            if libc::fcntl(fd.0, libc::F_SETFL, libc::O_DIRECT) != 0 {
                return Err(errno());
            }
            libc::pread(fd.0, buf.as_mut_ptr().cast(), buf.len(), 100)
        };
        if n < 0 {
            Err(errno())
        } else {
            Ok(content_obs(&buf[..n as usize]))
        }
    })
    .run();
}

#[test]
fn non_root_permission_errors() {
    Scenario::new("non_root_permission_errors", perm_layers())
        .step("read 0600 root file", |m| {
            let f = p(m, "secret");
            user(|| read_file(&f))
        })
        .step("create in root 0755 dir", |m| {
            let f = p(m, "rootdir/new");
            user(|| write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"x"))
        })
        .step("write root's file", |m| {
            let f = p(m, "rootdir/file");
            user(|| write_file(&f, libc::O_WRONLY, b"x"))
        })
        .step("unlink in root dir", |m| {
            let f = p(m, "rootdir/file");
            user(|| unlink(&f))
        })
        .step("mkdir in root dir", |m| {
            let f = p(m, "rootdir/nd");
            user(|| mkdir(&f, 0o755))
        })
        .step("sticky: delete root's file", |m| {
            let f = p(m, "sticky/rootfile");
            user(|| unlink(&f))
        })
        .step("sticky: delete bottom-layer root file", |m| {
            let f = p(m, "sticky/bottomfile");
            user(|| unlink(&f))
        })
        .step("sticky: rename root's file", |m| {
            let (a, b) = (p(m, "sticky/rootfile"), p(m, "sticky/renamed"));
            user(|| rename(&a, &b))
        })
        .step("sticky: delete own file", |m| {
            let f = p(m, "sticky/userfile");
            user(|| unlink(&f))
        })
        .step("chown own file to root", |m| {
            let f = p(m, "mine");
            user(|| chown(&f, Some(0), None))
        })
        .step("chgrp own file to foreign group", |m| {
            let f = p(m, "mine");
            user(|| chown(&f, None, Some(0)))
        })
        .step("chown own file to self (no-op allowed)", |m| {
            let f = p(m, "mine");
            user(|| chown(&f, Some(NOBODY), Some(NOGROUP)))
        })
        .step("chmod root's file", |m| {
            let f = p(m, "secret");
            user(|| chmod(&f, 0o644))
        })
        .step("explicit utimens on root's file", |m| {
            let f = p(m, "rootdir/file");
            user(|| utimens(&f, Ts::Set(1, 0), Ts::Set(1, 0), false))
        })
        .step("utimens NULL on root's 0644 file", |m| {
            let f = p(m, "rootdir/file");
            user(|| utimens_null(&f))
        })
        .step("truncate root's file", |m| {
            let f = p(m, "rootdir/file");
            user(|| truncate(&f, 0))
        })
        .step("user xattr on root's file", |m| {
            let f = p(m, "rootdir/file");
            user(|| lsetxattr(&f, "user.x", b"x", 0))
        })
        .step("trusted xattr as user", |m| {
            let f = p(m, "mine");
            user(|| lsetxattr(&f, "trusted.x", b"x", 0))
        })
        .step("chmod own file", |m| {
            let f = p(m, "mine");
            user(|| chmod(&f, 0o600))
        })
        .step("write own file", |m| {
            let f = p(m, "mine");
            user(|| write_file(&f, libc::O_WRONLY | libc::O_APPEND, b"by nobody\n"))
        })
        .step("user xattr on own file", |m| {
            let f = p(m, "userdir/ufile");
            user(|| lsetxattr(&f, "user.mine", b"yes", 0))
        })
        .step("link root's 0600 file (protected_hardlinks)", |m| {
            let (a, b) = (p(m, "secret"), p(m, "pub/secret_link"));
            user(|| link(&a, &b))
        })
        .step("observe", |m| {
            seq(vec![
                ("mine", st(m, "mine")),
                ("secret", st(m, "secret")),
                ("sticky", list(&p(m, "sticky"))),
                ("rootdir", list(&p(m, "rootdir"))),
            ])
        })
        .upper_check("failed ops copied nothing up", upper_absent("secret"))
        .upper_check("rootdir not copied up", upper_absent("rootdir"))
        .reverse()
        .run();
}

#[test]
fn non_root_created_objects_are_theirs() {
    Scenario::new("non_root_created_objects_are_theirs", perm_layers())
        .step("create file in 0777 lower dir", |m| {
            let f = p(m, "pub/file");
            user(|| {
                write_file(
                    &f,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    b"nobody's",
                )
            })
        })
        .step("mkdir", |m| {
            let f = p(m, "pub/dir");
            user(|| mkdir(&f, 0o777))
        })
        .step("symlink", |m| {
            let f = p(m, "pub/link");
            user(|| symlink("file", &f))
        })
        .step("mkfifo", |m| {
            let f = p(m, "pub/fifo");
            user(|| mknod(&f, libc::S_IFIFO | 0o666, 0, 0))
        })
        .step("hard link own file", |m| {
            let (a, b) = (p(m, "pub/file"), p(m, "pub/hl"));
            user(|| link(&a, &b))
        })
        .step("create in own lower dir", |m| {
            let f = p(m, "userdir/new");
            user(|| write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"n"))
        })
        .step("create in sticky dir", |m| {
            let f = p(m, "sticky/mine_new");
            user(|| write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"n"))
        })
        .step("overwrite root's file in 0777 dir by rename", |m| {
            let (a, b) = (p(m, "pub/file"), p(m, "pub/existing"));
            user(|| rename(&a, &b))
        })
        .step("create over whiteout of root's bottom file", |m| {
            let f = p(m, "pub/bottom");
            user(|| {
                unlink(&f)?;
                write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"mine now")
            })
        })
        .step("stat as user", |m| {
            let f = p(m, "pub");
            user(|| list(&f))
        })
        .step("observe", |m| {
            seq(vec![
                ("dir", st(m, "pub/dir")),
                ("link", st(m, "pub/link")),
                ("fifo", st(m, "pub/fifo")),
                ("hl", st(m, "pub/hl")),
                ("existing", st(m, "pub/existing")),
                ("bottom", st(m, "pub/bottom")),
                ("unew", st(m, "userdir/new")),
                ("snew", st(m, "sticky/mine_new")),
            ])
        })
        .reverse()
        .run();
}

#[test]
fn setgid_directory_inheritance() {
    Scenario::new("setgid_directory_inheritance", perm_layers())
        .step("root creates file in g+s dir", |m| {
            write_file(&p(m, "sg/f"), libc::O_WRONLY | libc::O_CREAT, b"f")?;
            st(m, "sg/f")
        })
        .step("root mkdir in g+s dir", |m| {
            mkdir(&p(m, "sg/sub"), 0o755)?;
            st(m, "sg/sub")
        })
        .step("mkdir in the new subdir", |m| {
            mkdir(&p(m, "sg/sub/deeper"), 0o700)?;
            st(m, "sg/sub/deeper")
        })
        .step("symlink + fifo in g+s dir", |m| {
            symlink("f", &p(m, "sg/l"))?;
            mknod(&p(m, "sg/p"), libc::S_IFIFO | 0o644, 0, 0)?;
            seq(vec![("l", st(m, "sg/l")), ("p", st(m, "sg/p"))])
        })
        .step("user creates in g+s 2777 dir", |m| {
            let f = p(m, "sgw/uf");
            user(|| write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"u"))?;
            st(m, "sgw/uf")
        })
        .step("user mkdir keeps g+s", |m| {
            let f = p(m, "sgw/ud");
            user(|| mkdir(&f, 0o777))?;
            st(m, "sgw/ud")
        })
        .step(
            "user creates 02755 file as non-member (S_ISGID stripped)",
            |m| {
                let f = p(m, "sgw/sgidfile");
                user(|| open(&f, libc::O_WRONLY | libc::O_CREAT, 0o2755).map(|_| String::new()))?;
                st(m, "sgw/sgidfile")
            },
        )
        .step("user chmod g+s on own file in foreign group", |m| {
            let f = p(m, "sgw/uf");
            user(|| chmod(&f, 0o2755))?;
            st(m, "sgw/uf")
        })
        .step("existing file copy-up keeps its group", |m| {
            write_file(&p(m, "sg/old"), libc::O_WRONLY | libc::O_APPEND, b"+")?;
            st(m, "sg/old")
        })
        .reverse()
        .run();
}

// ===========================================================================
// Real workloads
// ===========================================================================

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn tar_unpack_into_lower_dir() {
    if !have("tar") {
        eprintln!("SKIP tar_unpack_into_lower_dir: tar not installed");
        return;
    }
    let src = tempfile::Builder::new()
        .prefix("lf-tar")
        .tempdir_in(test_tmp())
        .unwrap();
    let tree = src.path().join("tree");
    Layer::new()
        .default_mtime(1_400_000_000, 0)
        .file("bin/tool", "#!/bin/sh\necho new tool\n")
        .mode(0o755)
        .owner(0, 0)
        .file("conf/new.conf", "key=value\n")
        .mode(0o640)
        .owner(1000, 1000)
        .xattr("user.tag", "from-tar")
        .file("conf/shared.conf", "from tar\n")
        .symlink("bin/link", "tool")
        .file("data/one", "1")
        .hardlink("data/one_hl", "data/one")
        .file("repl/inner", "file became dir")
        .file("dir2file", "dir became file")
        .dir("newdir/empty")
        .mode(0o700)
        .large_file("data/blob", 300_000, 7)
        .build(&tree);
    let tarball = src.path().join("app.tar");
    let status = std::process::Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=user.*",
            "-cf",
        ])
        .arg(&tarball)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "creating the tarball failed");
    let tb = tarball.display().to_string();
    Scenario::new(
        "tar_unpack_into_lower_dir",
        vec![
            Layer::new()
                .file("app/bin/tool", "old tool\n")
                .mode(0o700)
                .file("app/conf/shared.conf", "old shared\n")
                .file("app/conf/keep.conf", "keep\n")
                .file("app/old", "untouched\n")
                .file("app/repl", "a file in the lower\n")
                .dir("app/dir2file"),
            Layer::new().file("app/conf/bottom.conf", "bottom\n"),
        ],
    )
    .step("tar -xpf into app", move |m| {
        sh(
            &format!(
                "tar --numeric-owner --xattrs --xattrs-include='user.*' -xpf '{tb}' -C '{}'",
                m.join("app").display()
            ),
            &[],
        )
    })
    .step("observe", |m| {
        seq(vec![
            ("tool", rd(m, "app/bin/tool")),
            ("repl", st(m, "app/repl")),
            ("dir2file", st(m, "app/dir2file")),
            (
                "hl",
                Ok(format!(
                    "{}",
                    ino(&p(m, "app/data/one"))? == ino(&p(m, "app/data/one_hl"))?
                )),
            ),
            ("conf", list(&p(m, "app/conf"))),
            ("x", lgetxattr(&p(m, "app/conf/new.conf"), "user.tag")),
        ])
    })
    .reverse()
    .run();
    drop(src);
}

#[test]
fn git_init_add_commit() {
    if !have("git") {
        eprintln!("SKIP git_init_add_commit: git not installed");
        return;
    }
    let env: &[(&str, &str)] = &[
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("HOME", "/nonexistent"),
        ("GIT_AUTHOR_NAME", "Test"),
        ("GIT_AUTHOR_EMAIL", "t@example.org"),
        ("GIT_COMMITTER_NAME", "Test"),
        ("GIT_COMMITTER_EMAIL", "t@example.org"),
        ("GIT_AUTHOR_DATE", "2005-04-07T22:13:13 +0000"),
        ("GIT_COMMITTER_DATE", "2005-04-07T22:13:13 +0000"),
        ("TZ", "UTC"),
    ];
    let git = |m: &Path, args: &str| -> R {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(m.join("repo"))
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "gc.auto=0",
                "-c",
                "maintenance.auto=false",
            ])
            .args(args.split_whitespace())
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
        if !out.status.success() {
            eprintln!("git {args}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(format!(
            "exit {} {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    };
    Scenario::new(
        "git_init_add_commit",
        vec![
            Layer::new()
                .file("repo/README", "readme\n")
                .file("repo/src/main.c", "int main(void) { return 0; }\n")
                .file("repo/src/lib/util.c", "/* util */\n")
                .file("repo/run.sh", "#!/bin/sh\n")
                .mode(0o755)
                .symlink("repo/link", "README"),
            Layer::new().file("repo/docs/guide.md", "# guide\n"),
        ],
    )
    .step("git init", move |m| git(m, "init -q"))
    .step("git add -A", move |m| git(m, "add -A"))
    .step("git commit", move |m| git(m, "commit -q -m initial"))
    .step("rev-parse", move |m| git(m, "rev-parse HEAD"))
    .step("modify + commit -a", move |m| {
        write_file(
            &p(m, "repo/README"),
            libc::O_WRONLY | libc::O_APPEND,
            b"more\n",
        )?;
        git(m, "commit -q -a -m second")
    })
    .step("status", move |m| git(m, "status --porcelain"))
    .step("log", move |m| git(m, "log --format=%H%x20%s"))
    .step("fsck", move |m| git(m, "fsck --strict"))
    .ignore_content("repo/.git/index")
    .run();
}

#[test]
fn sed_in_place_on_lower_files() {
    Scenario::new(
        "sed_in_place_on_lower_files",
        vec![
            Layer::new()
                .file("etc/conf1", "foo=1\nbar=foo\n")
                .mode(0o640)
                .owner(1000, 1000)
                .file("etc/conf2", "no match here\n")
                .symlink("etc/conf_link", "conf1"),
            Layer::new()
                .file("etc/conf3", "foo in bottom\n")
                .mode(0o600),
        ],
    )
    .step("sed -i", |m| {
        sh(
            &format!(
                "cd '{}' && sed -i 's/foo/FOO/g' conf1 conf2 conf3",
                m.join("etc").display()
            ),
            &[],
        )
    })
    .step("observe", |m| {
        seq(vec![
            ("c1", rd(m, "etc/conf1")),
            ("c1s", st(m, "etc/conf1")),
            ("c2", rd(m, "etc/conf2")),
            ("c3", st(m, "etc/conf3")),
            ("c3c", rd(m, "etc/conf3")),
            ("etc", list(&p(m, "etc"))),
        ])
    })
    .reverse()
    .run();
}

#[test]
fn cp_a_tree() {
    Scenario::new(
        "cp_a_tree",
        vec![
            Layer::new()
                .file("tree/f", "file\n")
                .mode(0o640)
                .owner(1000, 1000)
                .xattr("user.x", "1")
                .mtime(1_300_000_000, 123_456_789)
                .hardlink("tree/f_hl", "tree/f")
                .symlink("tree/link", "f")
                .owner(5, 5)
                .fifo("tree/fifo")
                .file("tree/sub/deep", "deep\n")
                .sparse_file("tree/sparse", 4 * MIB, &[(MIB, b"data")])
                .at("tree/sub")
                .mode(0o700)
                .mtime(1_310_000_000, 1),
            Layer::new().file("tree/bottom", "bottom\n").dir("dest"),
        ],
    )
    .step("cp -a tree tree2", |m| {
        sh(&format!("cd '{}' && cp -a tree tree2", m.display()), &[])
    })
    .step("cp -a tree into merged dest", |m| {
        sh(&format!("cd '{}' && cp -a tree dest/", m.display()), &[])
    })
    .step("cp -a over existing lower file", |m| {
        sh(
            &format!("cd '{}' && cp -a tree/bottom tree/f", m.display()),
            &[],
        )
    })
    .step("observe", |m| {
        seq(vec![
            ("f", st(m, "tree2/f")),
            (
                "hl",
                Ok(format!(
                    "{}",
                    ino(&p(m, "tree2/f"))? == ino(&p(m, "tree2/f_hl"))?
                )),
            ),
            ("x", lgetxattr(&p(m, "tree2/f"), "user.x")),
            ("t", times(&p(m, "tree2/sub"))),
            ("ff", rd(m, "tree/f")),
            ("ffhl", rd(m, "tree/f_hl")),
        ])
    })
    .reverse()
    .run();
}

// ===========================================================================
// Shared layers: two mounts over the same lowers, concurrent writers
// ===========================================================================

const THREADS: usize = 4;
const PER_THREAD: usize = 20;

fn shared_layers() -> Vec<Layer> {
    let mut top = Layer::new().file("common", "common lower data\n").dir("n");
    for t in 0..THREADS {
        for i in 0..PER_THREAD {
            top = top
                .file(format!("t{t}/f{i}"), format!("lower f {t} {i}\n"))
                .file(format!("t{t}/g{i}"), "to delete\n")
                .file(format!("t{t}/r{i}"), "to rename\n")
                .file(format!("t{t}/c{i}"), "to chmod\n");
        }
    }
    vec![
        top,
        Layer::new()
            .file("n/bottom", "b")
            .file("t0/bottom_only", "bo"),
    ]
}

/// The operations of one writer thread of mount `tag`.
fn writer_ops(root: &Path, tag: &str, t: usize) -> Vec<String> {
    let mut errs = Vec::new();
    let mut chk = |what: String, r: R| {
        if let Err(e) = r {
            errs.push(format!("{what}: {}", errno_name(e)));
        }
    };
    for i in 0..PER_THREAD {
        let d = root.join(format!("t{t}"));
        chk(
            format!("append f{i}"),
            write_file(
                &d.join(format!("f{i}")),
                libc::O_WRONLY | libc::O_APPEND,
                format!("{tag} was here\n").as_bytes(),
            ),
        );
        chk(
            format!("create n/{tag}-{t}-{i}"),
            write_file(
                &root.join(format!("n/{tag}-{t}-{i}")),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                format!("{tag} {t} {i}").as_bytes(),
            ),
        );
        if i % 3 == 0 {
            chk(format!("unlink g{i}"), unlink(&d.join(format!("g{i}"))));
        }
        if i % 4 == 0 {
            chk(
                format!("rename r{i}"),
                rename(&d.join(format!("r{i}")), &d.join(format!("r{i}.{tag}"))),
            );
        }
        chk(
            format!("chmod c{i}"),
            chmod(&d.join(format!("c{i}")), 0o600),
        );
        if i % 5 == 0 {
            chk(
                format!("mkdir {tag}{i}"),
                mkdir(&d.join(format!("dir-{tag}-{i}")), 0o755),
            );
        }
    }
    errs
}

#[test]
fn shared_layers_concurrent_writers() {
    let fresh_after = now_secs() - 2;
    let stack = Stack::build(shared_layers());
    let before = stack.lower_snapshots("before");
    let digests_before: Vec<_> = stack.lowers.iter().map(|l| tree_digest(l)).collect();
    let base = scenario_base("shared");
    let b = base.path();
    for d in ["a_up", "a_work", "a_mnt", "b_up", "b_work", "b_mnt"] {
        fresh_dir(&b.join(d));
    }
    for d in ["ka_up", "ka_work", "ka_mnt", "kb_up", "kb_work", "kb_mnt"] {
        fresh_dir(&b.join(d));
    }
    let ma = Mnt::mount(
        under_test(),
        &stack.lowers,
        &b.join("a_up"),
        &b.join("a_work"),
        &b.join("a_mnt"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mb = Mnt::mount(
        under_test(),
        &stack.lowers,
        &b.join("b_up"),
        &b.join("b_work"),
        &b.join("b_mnt"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();

    // Concurrent writers: THREADS per mount, both mounts at once.
    let mut handles = Vec::new();
    for (tag, root) in [
        ("A", ma.path().to_path_buf()),
        ("B", mb.path().to_path_buf()),
    ] {
        for t in 0..THREADS {
            let root = root.clone();
            handles.push(std::thread::spawn(move || {
                writer_ops(&root, tag, t)
                    .into_iter()
                    .map(|e| format!("[{tag} thread {t}] {e}"))
                    .collect::<Vec<_>>()
            }));
        }
    }
    for h in handles {
        problems.extend(h.join().expect("writer thread panicked"));
    }

    // Each mount sees only its own changes.
    for (tag, other, m) in [("A", "B", &ma), ("B", "A", &mb)] {
        let common = read_file(&m.path().join("t1/f3"));
        let want = Ok(content_obs(
            format!("lower f 1 3\n{tag} was here\n").as_bytes(),
        ));
        if common != want {
            problems.push(format!(
                "[{tag}] t1/f3 = {} want {}",
                show_r(&common),
                show_r(&want)
            ));
        }
        let names = list(&m.path().join("n")).unwrap_or_default();
        if names.contains(&format!("{other}-")) {
            problems.push(format!("[{tag}] sees files of mount {other} in n/"));
        }
        let own = names
            .split(',')
            .filter(|n| n.starts_with(&format!("{tag}-")))
            .count();
        if own != THREADS * PER_THREAD {
            problems.push(format!(
                "[{tag}] {own} own files in n/, want {}",
                THREADS * PER_THREAD
            ));
        }
    }

    // The same operations, sequentially, on kernel mounts: views must match.
    let ka = Mnt::mount(
        Fs::Kernel,
        &stack.lowers,
        &b.join("ka_up"),
        &b.join("ka_work"),
        &b.join("ka_mnt"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let kb = Mnt::mount(
        Fs::Kernel,
        &stack.lowers,
        &b.join("kb_up"),
        &b.join("kb_work"),
        &b.join("kb_mnt"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for t in 0..THREADS {
        problems.extend(
            writer_ops(ka.path(), "A", t)
                .into_iter()
                .map(|e| format!("[kernel A] {e}")),
        );
        problems.extend(
            writer_ops(kb.path(), "B", t)
                .into_iter()
                .map(|e| format!("[kernel B] {e}")),
        );
    }
    for (tag, k, m) in [("A", &ka, &ma), ("B", &kb, &mb)] {
        let mut ks = snapshot(&format!("kernel-{tag}"), k.path());
        let mut ms = snapshot(&format!("{}-{tag}", ut_label()), m.path());
        // Concurrent copy-ups into one parent race on restoring the parent's
        // times (the kernel's own result varies), so directory mtimes are
        // not compared here.
        for s in [&mut ks, &mut ms] {
            for e in s.entries.values_mut() {
                if e.ftype == FileType::Dir {
                    e.mtime = (0, 0);
                }
            }
        }
        problems.extend(
            compare_views(&ks, &ms, fresh_after)
                .into_iter()
                .map(|x| format!("[view {tag}] {x}")),
        );
    }
    drop((ma, mb, ka, kb));

    for (i, (l, d)) in stack.lowers.iter().zip(&digests_before).enumerate() {
        if tree_digest(l) != *d {
            problems.push(format!("lower {i} digest changed"));
        }
    }
    problems.extend(stack.lowers_unchanged(&before));
    report(
        &format!("shared layers: kernel vs {}", ut_label()),
        problems,
    );
}

// ===========================================================================
// More copy-up triggers and edge cases
// ===========================================================================

/// Operations through a descriptor opened O_RDONLY on a lower file: the
/// metadata change copies the file up, and the same descriptor keeps
/// working (and sees the copy).
#[test]
fn metadata_ops_on_read_only_fd() {
    Scenario::new("metadata_ops_on_read_only_fd", std_layers())
        .step("fchmod on O_RDONLY fd", |m| {
            let fd = open(&p(m, "f.txt"), libc::O_RDONLY, 0)?;
            // SAFETY: plain syscall on our fd.
            if unsafe { libc::fchmod(fd.0, 0o600) } != 0 {
                return Err(errno());
            }
            Ok(format!(
                "{} {}",
                stat_obs(&fd.fstat()?),
                content_obs(&fd.read_all()?)
            ))
        })
        .step("fchown on O_RDONLY fd", |m| {
            let fd = open(&p(m, "d/g.txt"), libc::O_RDONLY, 0)?;
            // SAFETY: plain syscall on our fd.
            if unsafe { libc::fchown(fd.0, 31, 32) } != 0 {
                return Err(errno());
            }
            Ok(stat_obs(&fd.fstat()?))
        })
        .step("futimens on O_RDONLY fd", |m| {
            let fd = open(&p(m, "both"), libc::O_RDONLY, 0)?;
            let t = [
                libc::timespec {
                    tv_sec: 1_333_333_333,
                    tv_nsec: 333,
                },
                libc::timespec {
                    tv_sec: 1_344_444_444,
                    tv_nsec: 444,
                },
            ];
            // SAFETY: valid fd and two timespecs.
            if unsafe { libc::futimens(fd.0, t.as_ptr()) } != 0 {
                return Err(errno());
            }
            let s = fd.fstat()?;
            Ok(tclass(s.st_mtime, s.st_mtime_nsec))
        })
        .step("fsetxattr on O_RDONLY fd", |m| {
            let fd = open(&p(m, "g.txt"), libc::O_RDONLY, 0)?;
            let n = std::ffi::CString::new("user.fd").unwrap();
            // SAFETY: valid fd, name and buffer.
            if unsafe { libc::fsetxattr(fd.0, n.as_ptr(), b"v".as_ptr().cast(), 1, 0) } != 0 {
                return Err(errno());
            }
            llistxattr(&p(m, "g.txt"))
        })
        .step("fchmod on O_DIRECTORY fd of a lower dir", |m| {
            let fd = open(&p(m, "a/b"), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            // SAFETY: plain syscall on our fd.
            if unsafe { libc::fchmod(fd.0, 0o700) } != 0 {
                return Err(errno());
            }
            st(m, "a/b")
        })
        .step("ftruncate on O_RDONLY fd", |m| {
            let fd = open(&p(m, "empty"), libc::O_RDONLY, 0)?;
            fd.ftruncate(5)
        })
        .upper_check(
            "futimens time",
            upper_mtime_is("both", (1_344_444_444, 444)),
        )
        .reverse()
        .run();
}

/// VFS_CAP_REVISION_2 with the effective flag, permitting CAP_NET_BIND_SERVICE.
fn cap_value() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// security.capability is copied up by metadata copy-ups and dropped by
/// writes and chown, as the kernel does.
#[test]
fn security_capability_copy_up() {
    let cap = cap_value();
    Scenario::new(
        "security_capability_copy_up",
        vec![
            Layer::new()
                .file("cap_chmod", "binary1")
                .mode(0o755)
                .xattr("security.capability", &cap)
                .file("cap_write", "binary2")
                .mode(0o755)
                .xattr("security.capability", &cap)
                .file("cap_chown", "binary3")
                .mode(0o755)
                .xattr("security.capability", &cap)
                .file("cap_xattr", "binary4")
                .mode(0o755)
                .xattr("security.capability", &cap),
            Layer::new(),
        ],
    )
    .step("chmod keeps cap", |m| {
        chmod(&p(m, "cap_chmod"), 0o711)?;
        llistxattr(&p(m, "cap_chmod"))
    })
    .step("write drops cap", |m| {
        write_file(&p(m, "cap_write"), libc::O_WRONLY | libc::O_APPEND, b"!")?;
        llistxattr(&p(m, "cap_write"))
    })
    .step("chown drops cap", |m| {
        chown(&p(m, "cap_chown"), Some(1), Some(1))?;
        llistxattr(&p(m, "cap_chown"))
    })
    .step("user xattr keeps cap", |m| {
        lsetxattr(&p(m, "cap_xattr"), "user.k", b"v", 0)?;
        llistxattr(&p(m, "cap_xattr"))
    })
    .reverse()
    .run();
}

/// Names with spaces, newlines, invalid UTF-8 and the maximum length go
/// through copy-up, whiteouts and renames unchanged.
#[test]
fn odd_names() {
    let long_a: Vec<u8> = vec![b'a'; 255];
    let long_b: Vec<u8> = vec![b'b'; 255];
    let mut dir_nl = b"dir\nwith newline".to_vec();
    dir_nl.extend_from_slice(b"/sp ace");
    let mut top = Layer::new()
        .file(b"sp ace", "space\n")
        .file(b"new\nline", "newline\n")
        .file(&b"bad\xff\xfeutf8"[..], "bytes\n")
        .file(&dir_nl[..], "nested\n")
        .file(b"tab\tname", "tab\n");
    top = top.file(&long_a[..], "long\n");
    let la = long_a.clone();
    let lb = long_b.clone();
    let la2 = long_a.clone();
    let bp = |m: &Path, b: &[u8]| join(m, b);
    Scenario::new(
        "odd_names",
        vec![top, Layer::new().file(b"tab\tname", "bottom tab\n")],
    )
    .step("append to 'sp ace'", move |m| {
        write_file(&bp(m, b"sp ace"), libc::O_WRONLY | libc::O_APPEND, b"+")
    })
    .step("unlink newline name", move |m| unlink(&bp(m, b"new\nline")))
    .step("rename invalid utf-8 to long name", move |m| {
        rename(&bp(m, b"bad\xff\xfeutf8"), &bp(m, &lb))
    })
    .step("chmod file in newline dir", move |m| {
        chmod(&bp(m, b"dir\nwith newline/sp ace"), 0o600)
    })
    .step("unlink 255-byte name", move |m| unlink(&bp(m, &la)))
    .step("recreate 255-byte name", move |m| {
        write_file(&bp(m, &la2), libc::O_WRONLY | libc::O_CREAT, b"again")
    })
    .step("unlink tab name (in both layers)", move |m| {
        unlink(&bp(m, b"tab\tname"))
    })
    .step("list", list)
    .reverse()
    .run();
}

/// A directory with hundreds of entries across both layers: many whiteouts,
/// renames and new names, then rm -rf of another big directory.
#[test]
fn many_entries() {
    let mut top = Layer::new();
    let mut bottom = Layer::new();
    for i in 0..300 {
        top = top.file(format!("big/f{i:03}"), format!("top {i}\n"));
        top = top.file(format!("big2/x{i:03}"), "x");
    }
    for i in 200..400 {
        bottom = bottom.file(format!("big/f{i:03}"), format!("bottom {i}\n"));
    }
    Scenario::new("many_entries", vec![top, bottom])
        .step("unlink every third", |m| {
            for i in (0..400).step_by(3) {
                unlink(&p(m, &format!("big/f{i:03}")))?;
            }
            Ok(String::new())
        })
        .step("rename every seventh", |m| {
            for i in (1..400).step_by(7) {
                let _ = rename(
                    &p(m, &format!("big/f{i:03}")),
                    &p(m, &format!("big/r{i:03}")),
                );
            }
            Ok(String::new())
        })
        .step("create 50", |m| {
            for i in 0..50 {
                write_file(
                    &p(m, &format!("big/n{i:02}")),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    b"n",
                )?;
            }
            Ok(String::new())
        })
        .step("list", |m| list(&p(m, "big")))
        .step("rm -rf big2", |m| {
            std::fs::remove_dir_all(p(m, "big2"))
                .map(|_| String::new())
                .map_err(|e| e.raw_os_error().unwrap_or(-1))
        })
        .step("list root", list)
        .reverse()
        .run();
}

/// Edits inside directories that are opaque in a lower layer, and inside an
/// opaque directory made through the mount.
#[test]
fn edits_in_opaque_dirs() {
    Scenario::new(
        "edits_in_opaque_dirs",
        vec![
            Layer::new()
                .opaque_dir("o")
                .file("o/top", "top\n")
                .file("o/sub/inner", "inner\n"),
            Layer::new()
                .file("o/hidden", "hidden by opaque\n")
                .file("o/top", "hidden bottom top\n")
                .file("o/sub/below", "hidden\n"),
        ],
    )
    .step("write o/top", |m| {
        write_file(&p(m, "o/top"), libc::O_WRONLY | libc::O_APPEND, b"+\n")
    })
    .step("create o/hidden (hidden below)", |m| {
        write_file(
            &p(m, "o/hidden"),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            b"new",
        )
    })
    .step("unlink o/sub/inner", |m| unlink(&p(m, "o/sub/inner")))
    .step("rmdir o/sub", |m| rmdir(&p(m, "o/sub")))
    .step("mkdir o/sub again", |m| mkdir(&p(m, "o/sub"), 0o755))
    .step("list o/sub", |m| list(&p(m, "o/sub")))
    .step("make opaque via rm+mkdir, unlink new child", |m| {
        std::fs::remove_dir_all(p(m, "o")).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
        mkdir(&p(m, "o"), 0o755)?;
        write_file(&p(m, "o/c"), libc::O_WRONLY | libc::O_CREAT, b"c")?;
        unlink(&p(m, "o/c"))?;
        list(&p(m, "o"))
    })
    .reverse()
    .run();
}

/// A truncate through one descriptor is seen by a reader descriptor that
/// was opened on the lower file before.
#[test]
fn truncate_seen_by_earlier_reader() {
    Scenario::new("truncate_seen_by_earlier_reader", std_layers())
        .step("reader open, truncate by path, reader reads", |m| {
            let r = open(&p(m, "both"), libc::O_RDONLY, 0)?;
            truncate(&p(m, "both"), 3)?;
            Ok(format!(
                "size={} data={}",
                r.fstat()?.st_size,
                content_obs(&r.read_all()?)
            ))
        })
        .step("reader open, O_TRUNC rewrite, reader reads", |m| {
            let r = open(&p(m, "d/both"), libc::O_RDONLY, 0)?;
            write_file(
                &p(m, "d/both"),
                libc::O_WRONLY | libc::O_TRUNC,
                b"rewritten",
            )?;
            Ok(content_obs(&r.read_all()?))
        })
        .run();
}

/// Several threads write to distinct offsets of the same lower file at the
/// same time (one copy-up must win and no write may be lost), and others
/// copy up siblings in the same lower directory concurrently.
#[test]
fn concurrent_copy_up() {
    let mut top = Layer::new().file("deep/dir/shared", vec![b'.'; 8 * 4096]);
    for i in 0..8 {
        top = top.file(format!("deep/dir/s{i}"), format!("sibling {i}\n"));
    }
    Scenario::new(
        "concurrent_copy_up",
        vec![top, Layer::new().file("deep/dir/bottom", "b")],
    )
    .step("8 threads pwrite distinct pages of one lower file", |m| {
        let f = p(m, "deep/dir/shared");
        let hs: Vec<_> = (0..8u64)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || -> R {
                    let fd = open(&f, libc::O_WRONLY, 0)?;
                    fd.pwrite(&[b'0' + i as u8; 100], i * 4096)
                })
            })
            .collect();
        let rs: Vec<String> = hs.into_iter().map(|h| show_r(&h.join().unwrap())).collect();
        Ok(rs.join(","))
    })
    .step("read shared", |m| rd(m, "deep/dir/shared"))
    .step("8 threads append to siblings", |m| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let f = p(m, &format!("deep/dir/s{i}"));
                std::thread::spawn(move || -> R {
                    write_file(&f, libc::O_WRONLY | libc::O_APPEND, b"more\n")
                })
            })
            .collect();
        let rs: Vec<String> = hs.into_iter().map(|h| show_r(&h.join().unwrap())).collect();
        Ok(rs.join(","))
    })
    .step("read siblings", |m| {
        let mut out = Vec::new();
        for i in 0..8 {
            out.push(rd(m, &format!("deep/dir/s{i}"))?);
        }
        Ok(out.join(" "))
    })
    // Each copy-up restores the parent's times to what it read before
    // taking the lock; concurrent copy-ups race on that (the kernel's
    // result varies from run to run).
    .ignore_mtime("deep/dir")
    .reverse()
    .run();
}

#[test]
fn fallocate_and_copy_file_range() {
    Scenario::new(
        "fallocate_and_copy_file_range",
        vec![
            Layer::new()
                .large_file("src", 300_000, 3)
                .large_file("punch", 256 * 1024, 4)
                .file("small", "small file\n"),
            Layer::new(),
        ],
    )
    .step("fallocate extend lower file", |m| {
        let fd = open(&p(m, "small"), libc::O_WRONLY, 0)?;
        // SAFETY: plain syscall on our fd.
        if unsafe { libc::fallocate(fd.0, 0, 0, 1 << 20) } != 0 {
            return Err(errno());
        }
        Ok(format!("size={}", fd.fstat()?.st_size))
    })
    .step("fallocate punch hole in lower file", |m| {
        let fd = open(&p(m, "punch"), libc::O_WRONLY, 0)?;
        // SAFETY: plain syscall on our fd.
        if unsafe {
            libc::fallocate(
                fd.0,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                64 * 1024,
                64 * 1024,
            )
        } != 0
        {
            return Err(errno());
        }
        Ok(format!("size={}", fd.fstat()?.st_size))
    })
    .step("copy_file_range lower -> new", |m| {
        let src = open(&p(m, "src"), libc::O_RDONLY, 0)?;
        let dst = open(&p(m, "dst"), libc::O_WRONLY | libc::O_CREAT, 0o644)?;
        let (mut oi, mut oo): (i64, i64) = (1000, 5);
        // SAFETY: valid fds and offset pointers.
        let n = unsafe { libc::copy_file_range(src.0, &mut oi, dst.0, &mut oo, 200_000, 0) };
        if n < 0 {
            return Err(errno());
        }
        Ok(format!("copied={n} oi={oi} oo={oo}"))
    })
    .step("copy_file_range into lower file (copy-up)", |m| {
        let src = open(&p(m, "small"), libc::O_RDONLY, 0)?;
        let dst = open(&p(m, "src"), libc::O_WRONLY, 0)?;
        let (mut oi, mut oo): (i64, i64) = (0, 4096);
        // SAFETY: valid fds and offset pointers.
        let n = unsafe { libc::copy_file_range(src.0, &mut oi, dst.0, &mut oo, 11, 0) };
        if n < 0 {
            return Err(errno());
        }
        Ok(format!("copied={n}"))
    })
    .step("observe", |m| {
        seq(vec![
            ("dst", rd(m, "dst")),
            ("src", rd(m, "src")),
            ("punch", rd(m, "punch")),
            ("small", st(m, "small")),
        ])
    })
    .reverse()
    .run();
}

/// posix_acl_xattr format: version 2, then (tag u16, perm u16, id u32).
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const NOID: u32 = u32::MAX;

/// POSIX ACLs are copied up, enforced for other users, updated by chmod and
/// inherited from default ACLs of (copied-up) directories.
#[test]
fn posix_acl_copy_up() {
    let file_acl = acl(&[
        (ACL_USER_OBJ, 6, NOID),
        (ACL_USER, 6, NOBODY),
        (ACL_GROUP_OBJ, 4, NOID),
        (ACL_MASK, 6, NOID),
        (ACL_OTHER, 0, NOID),
    ]);
    let dir_default = acl(&[
        (ACL_USER_OBJ, 7, NOID),
        (ACL_USER, 7, NOBODY),
        (ACL_GROUP_OBJ, 5, NOID),
        (ACL_MASK, 7, NOID),
        (ACL_OTHER, 5, NOID),
    ]);
    let dir_access = acl(&[
        (ACL_USER_OBJ, 7, NOID),
        (ACL_USER, 7, NOBODY),
        (ACL_GROUP_OBJ, 5, NOID),
        (ACL_MASK, 7, NOID),
        (ACL_OTHER, 5, NOID),
    ]);
    Scenario::new(
        "posix_acl_copy_up",
        vec![
            Layer::new()
                .file("acl/file", "acl protected\n")
                .mode(0o640)
                .xattr("system.posix_acl_access", &file_acl)
                .file("acl/other", "no acl\n")
                .mode(0o640)
                .file("acl/dir/old", "old\n")
                .file("acl/dir/olddir/x", "x")
                .dir("acl/dir")
                .mode(0o755)
                .xattr("system.posix_acl_access", &dir_access)
                .xattr("system.posix_acl_default", &dir_default),
            Layer::new(),
        ],
    )
    .step("nobody reads file via ACL", |m| {
        let f = p(m, "acl/file");
        user(|| read_file(&f))
    })
    .step("nobody reads file without ACL", |m| {
        let f = p(m, "acl/other");
        user(|| read_file(&f))
    })
    .step("nobody appends via ACL (copy-up)", |m| {
        let f = p(m, "acl/file");
        user(|| write_file(&f, libc::O_WRONLY | libc::O_APPEND, b"by nobody\n"))
    })
    .step("ACL after copy-up", |m| {
        lgetxattr(&p(m, "acl/file"), "system.posix_acl_access")
    })
    .step("nobody creates in dir via ACL", |m| {
        let f = p(m, "acl/dir/by_nobody");
        user(|| write_file(&f, libc::O_WRONLY | libc::O_CREAT, b"n"))
    })
    .step("root creates in dir with default ACL", |m| {
        write_file(&p(m, "acl/dir/new"), libc::O_WRONLY | libc::O_CREAT, b"new")?;
        seq(vec![
            ("st", st(m, "acl/dir/new")),
            (
                "acl",
                lgetxattr(&p(m, "acl/dir/new"), "system.posix_acl_access"),
            ),
        ])
    })
    .step("mkdir inherits default ACL", |m| {
        mkdir(&p(m, "acl/dir/sub"), 0o777)?;
        seq(vec![
            ("st", st(m, "acl/dir/sub")),
            (
                "default",
                lgetxattr(&p(m, "acl/dir/sub"), "system.posix_acl_default"),
            ),
        ])
    })
    .step("create over a whiteout in a dir with a default ACL", |m| {
        unlink(&p(m, "acl/dir/old"))?;
        write_file(&p(m, "acl/dir/old"), libc::O_WRONLY | libc::O_CREAT, b"new")?;
        seq(vec![
            ("st", st(m, "acl/dir/old")),
            (
                "acl",
                lgetxattr(&p(m, "acl/dir/old"), "system.posix_acl_access"),
            ),
        ])
    })
    .step("mkdir over a whiteout inherits the default ACL", |m| {
        unlink(&p(m, "acl/dir/olddir/x"))?;
        rmdir(&p(m, "acl/dir/olddir"))?;
        mkdir(&p(m, "acl/dir/olddir"), 0o777)?;
        seq(vec![
            ("st", st(m, "acl/dir/olddir")),
            (
                "default",
                lgetxattr(&p(m, "acl/dir/olddir"), "system.posix_acl_default"),
            ),
            (
                "access",
                lgetxattr(&p(m, "acl/dir/olddir"), "system.posix_acl_access"),
            ),
        ])
    })
    .step("chmod 0600 updates mask", |m| {
        chmod(&p(m, "acl/file"), 0o600)?;
        lgetxattr(&p(m, "acl/file"), "system.posix_acl_access")
    })
    .step("nobody denied after chmod", |m| {
        let f = p(m, "acl/file");
        user(|| read_file(&f))
    })
    .step("remove ACL", |m| {
        lremovexattr(&p(m, "acl/dir"), "system.posix_acl_default")?;
        llistxattr(&p(m, "acl/dir"))
    })
    .reverse()
    .run();
}

/// A non-root user modifies files it owns inside root-owned lower
/// directories it cannot write: the copy-up of the parents is done with the
/// mounter's rights, the result belongs to the user.
#[test]
fn non_root_copy_up_in_root_dir() {
    Scenario::new(
        "non_root_copy_up_in_root_dir",
        vec![
            Layer::new()
                .file("rootdir/sub/userfile", "user data\n")
                .owner(NOBODY, NOGROUP)
                .mode(0o644)
                .file("rootdir/sub/userfile2", "user data 2\n")
                .owner(NOBODY, NOGROUP)
                .at("rootdir/sub")
                .mode(0o755)
                .mtime(1_123_456_789, 1)
                .at("rootdir")
                .mode(0o555),
            Layer::new(),
        ],
    )
    .step("user appends own file", |m| {
        let f = p(m, "rootdir/sub/userfile");
        user(|| write_file(&f, libc::O_WRONLY | libc::O_APPEND, b"more\n"))
    })
    .step("user chmods own file", |m| {
        let f = p(m, "rootdir/sub/userfile2");
        user(|| chmod(&f, 0o600))
    })
    .step("user sets times on own file", |m| {
        let f = p(m, "rootdir/sub/userfile2");
        user(|| {
            utimens(
                &f,
                Ts::Set(1_200_000_000, 9),
                Ts::Set(1_200_000_001, 9),
                false,
            )
        })
    })
    .step("user cannot unlink it", |m| {
        let f = p(m, "rootdir/sub/userfile");
        user(|| unlink(&f))
    })
    .step("user cannot rename into root dir", |m| {
        let (a, b) = (p(m, "rootdir/sub/userfile"), p(m, "rootdir/moved"));
        user(|| rename(&a, &b))
    })
    .step("observe", |m| {
        seq(vec![
            ("f", st(m, "rootdir/sub/userfile")),
            ("f2", st(m, "rootdir/sub/userfile2")),
            ("sub", st(m, "rootdir/sub")),
            ("root", st(m, "rootdir")),
        ])
    })
    .upper_check(
        "sub keeps lower mtime",
        upper_mtime_is("rootdir/sub", (1_123_456_789, 1)),
    )
    .reverse()
    .run();
}

/// Lower hard links: rename of one name onto the other (same inode: a
/// no-op), then renames and links of the names.
#[test]
fn renames_of_lower_hardlinks() {
    Scenario::new(
        "renames_of_lower_hardlinks",
        vec![
            Layer::new()
                .file("h1", "hl data\n")
                .hardlink("h2", "h1")
                .hardlink("dir/h3", "h1"),
            Layer::new(),
        ],
    )
    .step("rename h1 onto h2 (same inode)", |m| {
        rename(&p(m, "h1"), &p(m, "h2"))
    })
    .step("after", |m| {
        seq(vec![
            ("root", list(m)),
            ("h1", st(m, "h1")),
            ("h2", st(m, "h2")),
        ])
    })
    .step("rename h2 -> moved", |m| {
        rename(&p(m, "h2"), &p(m, "moved"))
    })
    .step("link dir/h3 -> h4", |m| link(&p(m, "dir/h3"), &p(m, "h4")))
    .step("identities", |m| {
        let i = |r: &str| ino(&p(m, r));
        Ok(format!(
            "h3=h4:{} moved=h3:{} nl_moved={} nl_h4={}",
            i("dir/h3")? == i("h4")?,
            i("moved")? == i("dir/h3")?,
            lstat(&p(m, "moved"))?.st_nlink,
            lstat(&p(m, "h4"))?.st_nlink
        ))
    })
    .step("write via h4", |m| {
        write_file(&p(m, "h4"), libc::O_WRONLY | libc::O_APPEND, b"via h4\n")?;
        seq(vec![("h3", rd(m, "dir/h3")), ("moved", rd(m, "moved"))])
    })
    .reverse()
    .run();
}

/// Attributes and data seen through one name of a hard-linked file after a
/// change made through another name (caches must not serve stale values).
#[test]
fn hardlink_attr_coherence() {
    Scenario::new(
        "hardlink_attr_coherence",
        vec![
            Layer::new()
                .file("h1", "lower hl\n")
                .hardlink("h2", "h1")
                .file("k1", "k\n")
                .hardlink("k2", "k1"),
            Layer::new(),
        ],
    )
    .step("upper: link, stat, unlink other name, stat", |m| {
        write_file(&p(m, "x"), libc::O_WRONLY | libc::O_CREAT, b"x data\n")?;
        link(&p(m, "x"), &p(m, "y"))?;
        let before = describe(&p(m, "y"))?;
        unlink(&p(m, "x"))?;
        Ok(format!("{before} -> {}", describe(&p(m, "y"))?))
    })
    .step("upper: read via y, append via z, read via y", |m| {
        link(&p(m, "y"), &p(m, "z"))?;
        let before = read_file(&p(m, "y"))?;
        write_file(&p(m, "z"), libc::O_WRONLY | libc::O_APPEND, b"more\n")?;
        Ok(format!(
            "{before} -> {} {}",
            read_file(&p(m, "y"))?,
            describe(&p(m, "y"))?
        ))
    })
    .step("upper: chmod via z, stat y", |m| {
        describe(&p(m, "y"))?;
        chmod(&p(m, "z"), 0o600)?;
        describe(&p(m, "y"))
    })
    .step(
        "lower: stat h2, link h1 -> h5, append via h1, read h5 and h2",
        |m| {
            let h2 = describe(&p(m, "h2"))?;
            link(&p(m, "h1"), &p(m, "h5"))?;
            let h5 = describe(&p(m, "h5"))?;
            write_file(&p(m, "h1"), libc::O_WRONLY | libc::O_APPEND, b"via h1\n")?;
            Ok(format!(
                "h2={h2} h5={h5} -> h5={} {} h2={} {}",
                describe(&p(m, "h5"))?,
                read_file(&p(m, "h5"))?,
                describe(&p(m, "h2"))?,
                read_file(&p(m, "h2"))?
            ))
        },
    )
    .step("lower: stat k2, chmod k1, stat k1 and k2", |m| {
        let before = describe(&p(m, "k2"))?;
        chmod(&p(m, "k1"), 0o600)?;
        Ok(format!(
            "{before} -> k1={} k2={}",
            describe(&p(m, "k1"))?,
            describe(&p(m, "k2"))?
        ))
    })
    .step("lower: unlink h2, stat h1 and h5", |m| {
        unlink(&p(m, "h2"))?;
        seq(vec![("h1", st(m, "h1")), ("h5", st(m, "h5"))])
    })
    .reverse()
    .run();
}

/// Two things only an unusual upper/work set-up shows, each done the same
/// way on the kernel and on layerfs: a default ACL on the work dir (the
/// kernel strips ACLs from `W/work`, or objects built there — files over
/// whiteouts, copied-up directories — would get its modes and ACLs), and an
/// append-only (`chattr +a`) file in the upper, which opens for appending.
#[test]
fn work_dir_default_acl_and_append_only_upper_file() {
    // u::rwx g::r-x o::rwx, in the kernel's xattr format (version 2).
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(1u16, 7u16), (4, 5), (0x20, 7)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let run = |kernel: bool| -> String {
        let base = scenario_base(if kernel { "acl-k" } else { "acl-l" });
        let b = base.path();
        let [l, u, w, m] = ["l", "u", "w", "m"].map(|d| b.join(d));
        for d in [&l, &u, &w, &m] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(l.join("wf"), "lower").unwrap();
        std::fs::create_dir(l.join("cd")).unwrap();
        std::fs::write(u.join("app"), "x").unwrap();
        let c = cpath(&w);
        // SAFETY: valid path, name and buffer.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                c"system.posix_acl_default".as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        };
        assert_eq!(r, 0, "set a default ACL on the work dir");
        assert!(
            std::process::Command::new("chattr")
                .arg("+a")
                .arg(u.join("app"))
                .status()
                .unwrap()
                .success()
        );
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            l.display(),
            u.display(),
            w.display()
        );
        let st = if kernel {
            std::process::Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&m)
                .status()
        } else {
            std::process::Command::new(layerfs_binary())
                .args(["-o", &opts])
                .arg(&m)
                .status()
        };
        assert!(
            st.unwrap().success(),
            "mount ({})",
            if kernel { "kernel" } else { "layerfs" }
        );
        let out = seq(vec![
            (
                "W/work default ACL",
                lgetxattr(&w.join("work"), "system.posix_acl_default"),
            ),
            ("rm wf", unlink(&m.join("wf"))),
            (
                "new wf",
                write_file(&m.join("wf"), libc::O_WRONLY | libc::O_CREAT, b"n"),
            ),
            ("wf", describe(&m.join("wf"))),
            (
                "new cd/x",
                write_file(&m.join("cd/x"), libc::O_WRONLY | libc::O_CREAT, b"n"),
            ),
            ("cd/x", describe(&m.join("cd/x"))),
            (
                "cd default ACL",
                lgetxattr(&m.join("cd"), "system.posix_acl_default"),
            ),
            (
                "append to +a file",
                write_file(&m.join("app"), libc::O_WRONLY | libc::O_APPEND, b"y"),
            ),
            (
                "write +a file",
                write_file(&m.join("app"), libc::O_WRONLY, b"z"),
            ),
            ("app", read_file(&m.join("app"))),
        ]);
        let _ = std::process::Command::new("umount").arg(&m).status();
        let _ = std::process::Command::new("chattr")
            .arg("-a")
            .arg(u.join("app"))
            .status();
        show_r(&out)
    };
    let (k, t) = (run(true), run(false));
    assert_eq!(k, t, "kernel (left) vs layerfs (right)");
}

/// Uppers shaped outside the overlay, mounted by the kernel and by layerfs
/// the same way: a redirected directory and a renamed copied-up file
/// duplicated with `cp -a` (each copy shares the original's origin: ESTALE,
/// never the other's entries or data), a
/// directory already in both upper and lower (reports the lower's inode
/// number), a file made over an xattr whiteout in the upper (replaces it),
/// an upper used before (root impure) without a uuid (keeps none)
/// and a new upper with contents (gets one).
#[test]
fn uppers_shaped_outside_the_overlay() {
    const SCRIPT: &str = r#"
mkdir -p $L/origin $L/pre $U/pre $W $M $B/t
echo lower > $L/origin/file; echo lower > $L/f
mount -t overlay overlay -o lowerdir=$L,upperdir=$U,workdir=$W,redirect_dir=on $B/t
touch $B/t/origin/file && mv $B/t/origin $B/t/redirect1 && mv $B/t/f $B/t/ref1
umount $B/t
setfattr -x trusted.overlay.uuid $U
cp -a $U/redirect1 $U/redirect2; cp -a $U/ref1 $U/ref2
echo right >> $U/redirect1/file; echo wrong >> $U/redirect2/file
echo right >> $U/ref1; echo wrong >> $U/ref2
mkdir -p $L/xw $U/xw; echo lower > $L/xw/hidden; touch $U/xw/hidden
setfattr -n trusted.overlay.opaque -v x $U/xw; setfattr -n trusted.overlay.whiteout -v y $U/xw/hidden
rm -rf $W/work
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
for r in redirect1 redirect2; do
  echo "$r: $(ls $M/$r 2>&1 | tr '\n' ' ') / $(cat $M/$r/file 2>&1 | tr '\n' ' ')" | sed 's/^.*: \(.*Stale file handle\).*$/'$r': ESTALE/'
done
for r in ref1 ref2; do
  echo "$r: $(cat $M/$r 2>&1 | tr '\n' ' ')" | sed 's/^.*Stale file handle.*$/'$r': ESTALE/'
done
stat $M/xw/hidden >/dev/null 2>&1 && echo "xwhiteout: visible" || echo "xwhiteout: hides"
echo new > $M/xw/hidden && echo "over the xwhiteout: $(cat $M/xw/hidden)" || echo "over the xwhiteout: failed"
[ "$(stat -c %i $M/pre)" = "$(stat -c %i $L/pre)" ] && echo "pre: the lower's st_ino" || echo "pre: another st_ino"
umount $M
getfattr --absolute-names -n trusted.overlay.uuid $U >/dev/null 2>&1 && echo "uuid: set" || echo "uuid: none"
mkdir -p $B/u2/x $B/w2
$MNT_CMD lowerdir=$L,upperdir=$B/u2,workdir=$B/w2 $M && umount $M
getfattr --absolute-names -n trusted.overlay.uuid $B/u2 >/dev/null 2>&1 && echo "new upper, not empty: uuid set" || echo "new upper, not empty: no uuid"
"#;
    same_on_kernel_and_layerfs("outside", SCRIPT, &["redirect2: ESTALE", "ref2: ESTALE"]);
}

/// A directory's attributes stay current when something inside it is copied
/// up (its upper directory gets an entry and, times restored, a new ctime):
/// the merged directory reports the upper's ctime right away, as on the
/// kernel, instead of a stale one that changes at a later stat (which made
/// `tar` report "file changed as we read it").
#[test]
fn directory_ctime_current_after_copy_ups_inside() {
    const SCRIPT: &str = r#"
mkdir -p $L/d/sub $U $W $M
echo a > $L/d/f; echo g > $L/d/sub/g
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
check() {
  for d in d d/sub; do
    [ -d $U/$d ] || continue
    [ "$(stat -c %z $M/$d)" = "$(stat -c %z $U/$d)" ] && r=current || r=stale
    echo "$1: $d $r"
  done
}
touch -d 2001-01-01 $M/d; stat $M/d $M/d/sub >/dev/null
chmod 600 $M/d/f; check "chmod d/f"
stat $M/d $M/d/sub >/dev/null
echo x >> $M/d/sub/g; check "append d/sub/g"
tar -cf /dev/null -C $M d && echo "tar: ok" || echo "tar: failed"
umount $M
"#;
    let k = same_on_kernel_and_layerfs("ctime", SCRIPT, &["tar: ok"]);
    assert!(
        !k.is_some_and(|k| k.contains("stale")),
        "the kernel's side of the test changed"
    );
}

/// Malformed redirects in an upper (made by hand): the directory holding
/// them lists as usual, and only the redirected entry fails, with the
/// kernel's errno — EINVAL for a bad shape, EACCES for `.`/`..`; a sound
/// one is followed.
#[test]
fn malformed_redirects_fail_only_their_entry() {
    const SCRIPT: &str = r#"
mkdir -p $L/p/a $L/p/keep $L/a/b $W $M
i=0
for v in a/b ../a a/ / . .. /a/../a /a/b/ /a//b /a/b a; do
  i=$((i+1)); mkdir -p $U/p/r$i; setfattr -n trusted.overlay.redirect -v "$v" $U/p/r$i
done
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
echo "list: $(ls $M/p 2>&1 | tr '\n' ' ')"
for j in $(seq $i); do echo "r$j $(getfattr --only-values -n trusted.overlay.redirect $U/p/r$j): $(stat -c %F $M/p/r$j 2>&1 | sed 's/.*: //')"; done
umount $M
"#;
    same_on_kernel_and_layerfs(
        "badredir",
        SCRIPT,
        &[
            "list: a keep r1 ",
            "r1 a/b: Invalid argument",
            "r5 .: Permission denied",
            "r10 /a/b: directory",
        ],
    );
}

/// With `redirect_dir=nofollow`, and with `userxattr` (no redirect there),
/// a directory whose redirect would send the lookup on to layers below is
/// refused with `EPERM`; one that is also opaque, or in the last layer, is
/// not; `follow` follows. The kernel also refuses userxattr with any other
/// redirect_dir value.
#[test]
fn unfollowed_redirects_are_refused() {
    const SCRIPT: &str = r#"
L2=$B/l2; mkdir -p $L/c $L/d $L2/a $L2/c $U $W $M; touch $L2/a/f
for t in c3 d3 t1 t2 u1 u2; do mkdir $L2/$t; touch $L2/$t/f-$t; mknod $U/$t c 0 0; done
setfattr -n trusted.overlay.redirect -v c3 $L/c; setfattr -n trusted.overlay.redirect -v /d3 $L/d
for x in trusted user; do
  p=${x:0:1}; mkdir $U/$x-b $U/$x-abs $U/$x-o $L2/$x-last
  setfattr -n $x.overlay.redirect -v ${p}1 $U/$x-b
  setfattr -n $x.overlay.redirect -v /${p}2 $U/$x-abs
  setfattr -n $x.overlay.redirect -v a $U/$x-o; setfattr -n $x.overlay.opaque -v y $U/$x-o
  setfattr -n $x.overlay.redirect -v a $L2/$x-last
done
for o in redirect_dir=nofollow redirect_dir=follow userxattr userxattr,redirect_dir=nofollow \
         userxattr,redirect_dir=off userxattr,redirect_dir=follow; do
  rm -rf $W/*
  if ! $MNT_CMD lowerdir=$L:$L2,upperdir=$U,workdir=$W,$o $M 2>/dev/null; then
    echo "$o: mount refused"; continue
  fi
  echo "$o: $(ls $M | tr '\n' ' ')"
  for e in $(ls $M); do echo "  $e: $(ls $M/$e 2>&1 | sed 's/.*: //' | tr '\n' ' ')"; done
  umount $M
done
"#;
    same_on_kernel_and_layerfs(
        "nofollow",
        SCRIPT,
        &[
            "  trusted-b: Operation not permitted",
            "  trusted-abs: Operation not permitted",
            "  c: Operation not permitted",
            "  d: Operation not permitted",
            "  trusted-b: f-t1",
            "  trusted-abs: f-t2",
            "  c: f-c3",
            "  d: f-d3",
            "  user-b: Operation not permitted",
            "  user-abs: Operation not permitted",
            "userxattr,redirect_dir=off: mount refused",
            "userxattr,redirect_dir=follow: mount refused",
        ],
    );
}

/// With the writeback cache (layerfs's `writeback`, passthrough off) writes
/// through write-only opens of part of a page, appends, truncations, holes,
/// mmap and small writes give what the kernel's overlay gives, seen through
/// the mount (sizes, data, a changed mtime) and in the upper afterwards.
#[test]
fn writeback_cache_writes_as_the_kernel() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
seq 100000 | head -c 10000 > $L/f; cp $L/f $L/g; seq 5 5 100000 | head -c 5000 > $L/h
touch -d 2001-01-01 $L/f $L/g $L/h
case $MNT_CMD in mount*) X= ;; *) X=,passthrough=off,writeback ;; esac
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W$X $M
printf abc | dd of=$M/f bs=1 seek=5000 conv=notrunc status=none
echo tail >> $M/g
$PY - $M <<'PYEOF'
import mmap, os, sys
m = sys.argv[1]
fd = os.open(m + "/new", os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(50):
    os.write(fd, bytes([65 + i % 26]) * 100)
os.ftruncate(fd, 3333)
os.pwrite(fd, b"end", 9000)
os.close(fd)
fd = os.open(m + "/h", os.O_RDWR)
mm = mmap.mmap(fd, 0)
mm[100:104] = b"MMAP"
mm.close()
os.ftruncate(fd, 7000)
os.close(fd)
fd = os.open(m + "/g", os.O_WRONLY | os.O_APPEND)
os.write(fd, b"appended")
os.close(fd)
PYEOF
for x in f g h new; do
  echo "$x: $(stat -c %s $M/$x) $(md5sum < $M/$x | cut -c1-12) mtime-changed:$( [ $(stat -c %Y $M/$x) -gt 978307200 ] && echo y || echo n)"
done
umount $M
for x in f g h new; do echo "upper $x: $(stat -c %s $U/$x) $(md5sum < $U/$x | cut -c1-12)"; done
"#;
    same_on_kernel_and_layerfs(
        "writeback",
        SCRIPT,
        &["new: 9003", "h: 7000", "mtime-changed:y"],
    );
}

/// `overlay.impure` on an upper-only directory goes when a listing finds
/// no entry that needs it (the kernel drops it then), and stays while one
/// does (a moved copy-up reporting its origin's inode number).
#[test]
fn unneeded_impure_mark_is_dropped_by_a_listing() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M; echo a > $L/a; echo b > $L/b
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
mkdir $M/dir; mv $M/a $M/b $M/dir/
imp() { getfattr --absolute-names --only-values -n trusted.overlay.impure $U/dir 2>/dev/null || echo none; }
ls $M/dir >/dev/null; echo "two moved copies, listed: $(imp)"
rm $M/dir/a; ls $M/dir >/dev/null; echo "one left, listed: $(imp)"
rm $M/dir/b; echo "none left: $(imp)"; ls $M/dir >/dev/null; echo "none left, listed: $(imp)"
umount $M
"#;
    same_on_kernel_and_layerfs(
        "impure",
        SCRIPT,
        &["one left, listed: y", "none left, listed: none"],
    );
}

/// Runs a bash script once with the kernel's overlay and once with layerfs;
/// their standard outputs. The script gets `$B` (a fresh dir), `$L $U $W
/// $M` (lower, upper, work and mount point paths in it, to create) and
/// `$MNT_CMD`, the mount command to which `OPTS MNT` are appended.
/// `script_on_kernel_and_layerfs`, whose outputs must be the same; the
/// kernel's must show each of `kernel_shows` (so that the script still
/// tests what it says). A script that prints `SKIP: why` on the kernel is
/// skipped. The kernel's output, unless skipped.
fn same_on_kernel_and_layerfs(tag: &str, script: &str, kernel_shows: &[&str]) -> Option<String> {
    let (k, t) = script_on_kernel_and_layerfs(tag, script);
    if let Some(why) = k.lines().find_map(|l| l.strip_prefix("SKIP: ")) {
        eprintln!("skipped: {why}");
        return None;
    }
    for s in kernel_shows {
        assert!(
            k.contains(s),
            "the kernel's side of the test changed (no {s:?}):\n{k}"
        );
    }
    assert_eq!(k, t, "kernel (left) vs layerfs (right)");
    Some(k)
}

fn script_on_kernel_and_layerfs(tag: &str, script: &str) -> (String, String) {
    // The system's python for scripts run as another user (a root-only
    // interpreter, such as a pyenv shim, would fail for them).
    let script = format!(
        "set -u\nB=$1; MNT_CMD=$2\nL=$B/l U=$B/u W=$B/w M=$B/m\n\
         PY=$(command -v /usr/bin/python3 || command -v python3)\n{script}"
    );
    let run = |kernel: bool| -> String {
        let base = scenario_base(&format!("{tag}-{}", if kernel { "k" } else { "l" }));
        let mnt = if kernel {
            "mount -t overlay overlay -o".to_string()
        } else {
            format!("{} -o", layerfs_binary().display())
        };
        let out = std::process::Command::new("bash")
            .args(["-c", &script, "script"])
            .arg(base.path())
            .arg(&mnt)
            .output()
            .expect("run bash");
        // In case the script stopped before its own umount.
        let _ = std::process::Command::new("umount")
            .arg(base.path().join("m"))
            .stderr(std::process::Stdio::null())
            .status();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (run(true), run(false))
}

/// Changes through an open file whose name is gone (unlinked, or unlinked
/// under one of two hard links) reach the file, as on the kernel: fd-based
/// truncate, chmod, chown, utimes and xattrs (xfstests generic/004, 035).
/// layerfs answered ENOENT: it looked the object up by a name.
#[test]
fn changes_through_open_files_whose_name_is_gone() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
echo upperdata > $U/u; echo lowerdata > $L/l; echo linked > $U/h
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
python3 - <<'PY'
import os
def e(what, f):
    try:
        f(); print(what, "ok")
    except OSError as x:
        print(what, os.strerror(x.errno))
for name in ("u", "l", "new"):
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644); os.unlink(name)
    e(name + " ftruncate", lambda: os.ftruncate(fd, 3))
    e(name + " fchmod", lambda: os.fchmod(fd, 0o600))
    e(name + " futimens", lambda: os.utime(fd, (5, 5)))
    e(name + " fsetxattr", lambda: os.setxattr(fd, "user.k", b"v"))
    e(name + " fgetxattr", lambda: print(os.getxattr(fd, "user.k")))
    e(name + " flistxattr", lambda: print(os.listxattr(fd)))
    e(name + " fchown", lambda: os.fchown(fd, 7, 7))
    s = os.fstat(fd)
    print(name, "size", s.st_size, "mode %o" % s.st_mode, "mtime", s.st_mtime, "uid", s.st_uid)
    os.close(fd)
fd = os.open("h", os.O_RDWR); os.link("h", "h2"); os.unlink("h")
e("h ftruncate", lambda: os.ftruncate(fd, 1))
e("h fchmod", lambda: os.fchmod(fd, 0o604))
os.close(fd)
s = os.stat("h2"); print("h2 mode %o size %d" % (s.st_mode, s.st_size))
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs("gone", SCRIPT, &["u fchmod ok", "h2 mode 100604 size 1"]);
}

/// The setuid/setgid bits after chowns, by the kernel's rules: any chown of
/// a non-directory drops setuid, also `chown(f, -1, -1)` (which reaches
/// layerfs as a setattr of nothing), and setgid when the group may execute
/// the file; setgid without group-exec stays for a caller in the file's
/// group or with CAP_FSETID (root's chgrp keeps it). xfstests generic/193.
#[test]
fn setid_bits_after_chown() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
for f in a b; do echo d > $L/$f; done
echo d > $U/c; echo d > $L/e; echo d > $L/dir_f
chown 1000:1000 $L/a $U/c; chmod 6755 $L/a $U/c
chmod 2745 $L/b; chown 0:1000 $L/e; chmod 2745 $L/e
mkdir $L/sd; chown 1000:1000 $L/sd; chmod 6755 $L/sd
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
as_user() { setpriv --reuid=1000 --regid=1000 --clear-groups "$@"; }
as_user $PY -c 'import os; os.chown("a", -1, -1)'; echo "user chown -1 -1 of 6755: $(stat -c %a a)"
as_user $PY -c 'import os; os.chown("c", -1, -1)'; echo "user chown -1 -1 of upper 6755: $(stat -c %a c)"
python3 -c 'import os; os.chown("b", -1, 1001)'; echo "root chgrp of 2745: $(stat -c %a b)"
python3 -c 'import os; os.chown("e", -1, -1)'; echo "root chown -1 -1 of 2745: $(stat -c %a e)"
python3 -c 'import os; os.chown("sd", -1, -1)'; echo "root chown -1 -1 of a 6755 dir: $(stat -c %a sd)"
python3 -c 'import os; os.chown("dir_f", 5, 5)'; echo "plain chown: $(stat -c '%a %u %g' dir_f)"
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "chown-setid",
        SCRIPT,
        &["user chown -1 -1 of 6755: 755", "root chgrp of 2745: 2745"],
    );
}

/// Modes of new files made by a user with setuid/setgid bits: a parent's
/// default ACL masks the permission bits (it replaces the umask) and the
/// setuid/setgid bits stay; an O_TMPFILE keeps them too, follows a default
/// ACL, and in a setgid directory gets its group and S_ISGID. layerfs's
/// chown of the new object dropped the bits, or restored the mode asked
/// for over what the ACL gave.
#[test]
fn new_file_modes_with_setid_bits_and_default_acls() {
    const SCRIPT: &str = r#"
mkdir -p $L/acl $L/d $L/sg $U $W $M
chmod 777 $L/acl $L/d; chmod 2777 $L/sg; chgrp 1000 $L/sg
setfacl -d -m u::rwx,g::r-x,o::--x $L/acl
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
cat > /tmp/layerfs-newmodes.py <<'PY'
import os, sys
os.umask(int(sys.argv[1], 8))
for d, mode in (("acl/f4", 0o4777), ("acl/f2", 0o2777), ("acl/p", 0o666)):
    os.close(os.open(d, os.O_CREAT | os.O_WRONLY, mode))
    print(d, "%o" % os.stat(d).st_mode)
for d in ("d", "acl", "sg"):
    for mode in (0o4755, 0o2755, 0o6777, 0o777):
        fd = os.open(d, os.O_TMPFILE | os.O_WRONLY, mode)
        s = os.fstat(fd)
        print(d, "tmpfile %o" % mode, "-> %o gid %d" % (s.st_mode, s.st_gid))
        os.close(fd)
PY
echo "user:"; setpriv --reuid=1000 --regid=1000 --clear-groups $PY /tmp/layerfs-newmodes.py 022
rm -f acl/f4 acl/f2 acl/p
echo "root:"; python3 /tmp/layerfs-newmodes.py 077
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "newmodes",
        SCRIPT,
        &["acl/f4 104751", "d tmpfile 4755 -> 104755"],
    );
}

/// Times before the epoch with a fraction of a second (`touch -d
/// @-1.25`): fuser read the request's (-2 s, 750,000,000 ns) as -2.75 s.
/// xfstests generic/258.
#[test]
fn times_before_the_epoch() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
echo l > $L/lf
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M; touch uf
touch -m -d '1969-12-31 23:59:58.5 UTC' lf uf; touch -a -d @-1.25 uf
python3 -c 'import os
for f in ("lf", "uf"): s = os.stat(f); print(f, s.st_mtime_ns, s.st_atime_ns if f == "uf" else "")'
cd /; umount $M
python3 -c 'import os, sys; s = os.stat(sys.argv[1]); print("upper", s.st_mtime_ns, s.st_atime_ns)' $U/uf
"#;
    same_on_kernel_and_layerfs("epoch", SCRIPT, &["uf -1500000000 -1250000000"]);
}

/// A write through a shared mapping updates the file's mtime and ctime as
/// seen through the mount, also when its attributes were read before
/// (xfstests generic/080): passthrough writes reach the upper file without
/// layerfs, so a file open for writing through passthrough has its
/// attributes uncached. Also `noatime` (reads through the mount leave an
/// upper file's atime) and `trusted.*` names listed to CAP_SYS_ADMIN only
/// (xfstests generic/097).
#[test]
fn mmap_mtime_noatime_and_trusted_listing() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
echo hello > $U/uf; echo hello > $L/lf; touch -d @1000000000 $U/uf $L/lf
setfattr -n trusted.t -v 1 $L/lf; setfattr -n user.u -v 1 $L/lf
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
python3 - <<'PY'
import mmap, os
for f in ("uf", "lf", "nf"):
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    if f == "nf":  # made by this open
        os.write(fd, b"hello\n"); os.utime(fd, (1000000000, 1000000000))
    before = os.stat(f).st_mtime
    m = mmap.mmap(fd, 6); m[0:1] = b"J"; m.flush()
    print(f, "mtime updated while mapped:", os.stat(f).st_mtime > before)
    m.close(); os.close(fd)
    print(f, "mtime updated after close:", os.stat(f).st_mtime > before, open(f).read().strip())
PY
echo "root lists: $(getfattr --absolute-names -d -m - lf 2>&1 | grep -o '^[a-z]*\.[a-z]*' | sort | tr '\n' ' ')"
echo "user lists: $(setpriv --reuid=1000 --regid=1000 --clear-groups getfattr --absolute-names -d -m - lf 2>&1 | grep -o '^[a-z]*\.[a-z]*' | sort | tr '\n' ' ')"
cd /; umount $M
echo u > $U/at; touch -a -d 2000-01-01 $U/at
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W,noatime $M
cat $M/at >/dev/null; python3 -c 'import sys; open(sys.argv[1], "r+").read()' $M/at
echo "noatime: $(stat -c %x $M/at | cut -c1-10)"
umount $M
"#;
    same_on_kernel_and_layerfs(
        "mmap-atime",
        SCRIPT,
        &[
            "uf mtime updated while mapped: True",
            "nf mtime updated while mapped: True",
            "noatime: 2000-01-01",
            "user lists: user.u",
        ],
    );
}

/// GETXATTRs of lower objects are answered from what layerfs learnt of
/// them (a lower file without xattrs gets ENODATA without a system call),
/// and what changes through the mount shows at once: xattrs set on a lower
/// file or directory after it was asked for one it lacks (copy-up), an
/// xattr asked for twice on a lower file that has others.
#[test]
fn xattrs_of_lower_objects_asked_again_after_changes() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $U $W $M
echo n > $L/none; echo s > $L/some; setfattr -n user.b -v 2 $L/some
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
g() { getfattr --absolute-names --only-values -n "$2" "$1" 2>/dev/null || echo "($1 $2: none)"; echo; }
for f in none some d; do g $f security.selinux; g $f security.selinux; g $f user.a; done
g some user.b; g some user.b
setfattr -n user.a -v 1 none; setfattr -n user.a -v 3 d; setfattr -n user.c -v 4 some
for f in none some d; do g $f user.a; g $f security.selinux; done
g some user.b; g some user.c
setfattr -x user.a none; g none user.a
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "lower-xattrs",
        SCRIPT,
        &["(none security.selinux: none)", "\n1\n", "\n4\n"],
    );
}

/// Inode flags (`lsattr`, FS_IOC_GETFLAGS and FS_IOC_FSGETXATTR through
/// the mount) of lower and upper files and directories, and what a copy-up
/// keeps of them, as the kernel's overlayfs: `+A` and `+S` are set on the
/// copy, `+i` and `+a` recorded in `trusted.overlay.protattr` (and still
/// reported), the rest (`+d`) dropped. layerfs answered ENOTTY to both
/// ioctls and copied no flags.
#[test]
fn inode_flags_reported_and_kept_by_copy_up() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $L/imm $L/app $U/ud $W $M
echo x > $L/f; echo y > $L/g; echo z > $L/d/z; echo i > $L/imm/c; echo a > $L/app/c
echo u > $U/uf; chattr +A $U/uf 2>/dev/null || { echo "SKIP: the test directory's filesystem has no inode flags"; exit 0; }
chattr +d $U/ud; chattr +AS $L/f; chattr +d $L/g; chattr +A $L/d; chattr +i $L/imm; chattr +a $L/app
trap 'chattr -i $L/imm; chattr -a $L/app; umount $M 2>/dev/null' EXIT
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
flags() {
    lsattr -d "$@" 2>&1
    $PY - "$@" <<'PY'
import fcntl, os, struct, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    xf = struct.unpack("7I", fcntl.ioctl(fd, 0x801c581f, bytes(28)))[0]
    os.close(fd)
    print(p, "xflags", hex(xf))
PY
}
echo "before:"; flags f g d imm app uf ud
echo more >> f; echo more >> g; echo more >> d/z; echo more >> imm/c; echo more >> app/c
echo "after copy-up:"; flags f g d imm app
cd /
umount $M
cd $U
echo "upper:"; lsattr -d f g d imm app
for o in imm app d; do echo "$o protattr: $(getfattr --only-values -n trusted.overlay.protattr $o 2>/dev/null)"; done
"#;
    same_on_kernel_and_layerfs(
        "inode-flags",
        SCRIPT,
        &["after copy-up:", "imm protattr: i", "app protattr: a"],
    );
}

/// Immutable and append-only objects (`chattr +i`, `+a`), in the way of
/// xfstests' `t_immutable` (overlay/030, overlay/075, generic/079): files
/// and directories flagged in a lower layer before the mount, and objects
/// made and flagged through the mount (`FS_IOC_SETFLAGS`), then every
/// change refused or allowed as the kernel decides (opens, truncation,
/// times, modes, owners, xattrs, ACLs, links, renames, exchanges, unlinks,
/// entries made and removed inside flagged directories, fallocate modes,
/// files opened before the flag was set, a non-root caller); the upper
/// layer's `overlay.protattr` and flags compared after a remount and after
/// `chattr -i -a` through the mount. The probe is
/// `cow_support/immutable_probe.py`. Left out of the comparison: what the
/// kernel decides on its FUSE inode before layerfs is asked, which carries
/// no such flags — `access(W_OK)`, `fcntl(F_SETFL)` changing `O_APPEND`,
/// a shared `mmap` of a file open for writing (README, Known limitations).
#[test]
fn immutable_and_append_only_objects() {
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cow_support/immutable_probe.py");
    let script = format!(
        r#"
PROBE={probe}
L1=$B/l1 L2=$B/l2
mkdir -p $L1/lo $L2/lo $U $W $M
chattr +i $L1/lo 2>/dev/null || {{ echo "SKIP: the test directory's filesystem has no inode flags"; exit 0; }}
chattr -i $L1/lo
command -v setfacl >/dev/null || {{ echo "SKIP: no setfacl"; exit 0; }}
trap 'umount $M 2>/dev/null; chattr -R -i -a $L1 $L2 $U $W >/dev/null 2>&1' EXIT
umask 000
echo l1 > $L1/lo/only-in-l1; echo l2 > $L2/lo/only-in-l2
mk() {{
    local L=$1 K=$2 S=$3
    printf '%s' "$4" > $L/lo/$S.f; chmod 0666 $L/lo/$S.f
    mkdir -m 0777 $L/lo/$S.d $L/lo/$S.d/dir $L/lo/empty-$S.d
    : > $L/lo/$S.d/file; chmod 0666 $L/lo/$S.d/file
    setfacl -m u:nobody:rw-,m::rw- $L/lo/$S.f
    setfacl -m u:nobody:rwx,m::rwx $L/lo/$S.d
    for f in $L/lo/$S.f $L/lo/$S.d; do
        setfattr -n trusted.test -v readonly $f; setfattr -n user.test -v readonly $f
    done
    chattr +$K $L/lo/$S.f $L/lo/$S.d $L/lo/empty-$S.d
}}
mk $L1 i immutable "$(printf 'This is an immutable file.\nIts contents cannot be altered.\n')
"
mk $L2 a append-only "$(printf 'This is an append-only file.\nIts contents cannot be altered.\nData can only be appended.\n---\n')
"
umask 022
$MNT_CMD lowerdir=$L2:$L1,upperdir=$U,workdir=$W $M
$PY $PROBE $M $U --phase test 2>&1
umount $M
$MNT_CMD lowerdir=$L2:$L1,upperdir=$U,workdir=$W $M
$PY $PROBE $M $U --phase recheck 2>&1
umount $M
"#,
        probe = probe.display()
    );
    let (k, t) = script_on_kernel_and_layerfs("immutable", &script);
    if let Some(why) = k.lines().find_map(|l| l.strip_prefix("SKIP: ")) {
        eprintln!("skipped: {why}");
        return;
    }
    let vfs_only = ["access(W_OK)", "F_SETFL", "F_GETFL", "mmap(SHARED"];
    let keep = |out: &str| -> String {
        out.lines()
            .filter(|l| !vfs_only.iter().any(|v| l.contains(v)))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (k, t) = (keep(&k), keep(&t));
    for s in [
        "A lo/immutable.f open(O_WRONLY) => ERR EPERM",
        "A lo/append-only.f open(O_WRONLY) => ERR EPERM",
        "B up/immutable.f chattr +i (FS_IOC_SETFLAGS) => OK",
        "### phase recheck",
    ] {
        assert!(
            k.contains(s),
            "the kernel's side of the test changed (no {s:?}):\n{k}"
        );
    }
    assert!(k.lines().count() > 600, "the probe stopped early:\n{k}");
    if k != t {
        let (kl, tl): (Vec<_>, Vec<_>) = (k.lines().collect(), t.lines().collect());
        let differ: Vec<String> = (0..kl.len().max(tl.len()))
            .filter(|&i| kl.get(i) != tl.get(i))
            .take(20)
            .map(|i| format!("kernel:  {:?}\nlayerfs: {:?}", kl.get(i), tl.get(i)))
            .collect();
        panic!(
            "kernel vs layerfs, first differing lines:\n{}",
            differ.join("\n")
        );
    }
}

/// Birth times (`statx` `STATX_BTIME`, what `stat` shows as "Birth"): the
/// topmost real file's, as the kernel's overlayfs reports them — a lower
/// file's and directory's from the lower layer, a merged directory's and a
/// copied-up file's from the upper, a new object's its own; and `statx`
/// says it has them. Compared as relations (which file's time each is),
/// since the two runs make their layers at different times.
#[test]
fn birth_times_of_the_topmost_file() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $L/ld $U/d $W $M
echo x > $L/f; echo y > $L/g; echo z > $L/ld/z
[ "$(stat -c %W $L/f)" != 0 ] || { echo "SKIP: the test directory's filesystem keeps no birth times"; exit 0; }
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
# same NAME LAYER: is NAME's birth time that of the same name in LAYER?
same() {
    local o=$B/${2,,}/$1; [ "$1" = . ] && o=$B/${2,,}
    [ "$(stat -c %W "$1")" = "$(stat -c %W "$o")" ] && echo "$1 is $2's" || echo "$1 is not $2's"
}
same f L; same ld L; same ld/z L; same d U; same . U
echo more >> g; same g U
touch new; same new U; mkdir nd; same nd U
$PY -c '
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)
for p in ("f", "ld", "g", "new"):
    assert libc.statx(-100, p.encode(), 0x100, 0x800, buf) == 0
    print(p, "statx btime" if struct.unpack_from("I", buf.raw, 0)[0] & 0x800 else "statx no btime")
'
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "btime",
        SCRIPT,
        &[
            "f is L's",
            "d is U's",
            "g is U's",
            "new is U's",
            "f statx btime",
        ],
    );
}

/// A flag set through one name of a file with several names (a node per
/// name in layerfs) holds for the others, as for the kernel's one inode:
/// a new upper file linked through the mount, and a lower hard link
/// (whose copy-up breaks the link: the other name stays writable). And
/// `chattr` of flags only some filesystems keep (`+c`) is passed on.
#[test]
fn immutable_flag_holds_for_every_name() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $U $W $M
echo l > $L/d/a; ln $L/d/a $L/d/b
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
chattr +i d 2>/dev/null && chattr -i d || { echo "SKIP: no inode flags"; cd /; umount $M; exit 0; }
try() { "$@" 2>/dev/null && echo "$* ok" || echo "$* refused"; }
echo n > n1; echo x >> n1; ln n1 n2
chattr +i n1
try sh -c 'echo y >> n2'; try chmod 600 n2; try rm n2; try mv n2 n3
chattr -i n2
try sh -c 'echo z >> n1'; cat n1
chattr +a d/a
try sh -c 'echo w > d/a'; try sh -c 'echo w > d/b'; cat d/a d/b
chattr -a d/a
chattr +c +d d/b; lsattr d/b | cut -c1-22
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "immutable-names",
        SCRIPT,
        &[
            "sh -c echo y >> n2 refused",
            "sh -c echo z >> n1 ok",
            "sh -c echo w > d/b ok",
        ],
    );
}

/// Setting or removing a file's access ACL clears its setgid bit when the
/// caller is neither in the file's group nor has `CAP_FSETID`, as the
/// kernel's overlay does (xfstests generic/375; the daemon's own change of
/// the ACL keeps the bit, which a non-member's change copies up first);
/// removing an ACL that is not there succeeds on an upper object and fails
/// (`ENODATA`) on a lower one; the size a `listxattr` probe answers is the stored list's, the overlay's
/// private xattrs included (the kernel's rule).
#[test]
fn acl_changes_clear_setgid_and_absent_acls_go_quietly() {
    const SCRIPT: &str = r#"
command -v setfacl >/dev/null || { echo "SKIP: no setfacl"; exit 0; }
mkdir -p $L/sd $U $W $M
for f in $L/a $L/b $L/c $L/kept; do : > $f; done
chown nobody:root $L/a $L/b $L/c $L/sd; chown nobody:nogroup $L/kept
chmod 2775 $L/a $L/b $L/c $L/kept $L/sd
setfattr -n user.x -v 1 $L/c
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
chmod 755 $M
cd $M
as() { su nobody -s /bin/sh -c "$1" 2>&1 | sed 's/^.*: //'; }
as 'setfacl -m u:root:rwx a'; as 'setfacl -m u:root:rwx kept'; as 'setfacl -m u:root:rwx sd'
as 'setfattr -x system.posix_acl_access b; echo rc=$?'
setfattr -x system.posix_acl_access c; echo "root rc=$?"
setfattr -x system.posix_acl_default sd; echo "default rc=$?"
touch new; setfattr -x system.posix_acl_access new; echo "upper rc=$?"
stat -c '%n %A' a b c kept sd
: >> c
$PY -c '
import ctypes
libc = ctypes.CDLL(None)
print("c probe", libc.listxattr(b"c", None, 0), "list", len(__import__("os").listxattr("c")))
'
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "acl-sgid",
        SCRIPT,
        &[
            "a -rwxrwxr-x",
            "kept -rwxrwsr-x",
            "root rc=1",
            "upper rc=0",
            "b -rwxrwxr-x",
            "c probe 30 list 1",
        ],
    );
}

/// A setuid/setgid file written while a reader holds it open: root (with
/// `CAP_FSETID`) keeps the bits, another user's write clears them, as on
/// the kernel (layerfs passes no open of such a file through: a later
/// writer would have to share the reader's backing file, whose writes
/// clear the bits even for root). Found by a differential fuzzer.
#[test]
fn setid_bits_with_a_reader_open() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
printf 'x%.0s' $(seq 300) > $L/f; printf y > $L/g; printf z > $L/h
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
chmod 4755 f; chmod 6777 g; chmod 2755 h
$PY - <<'PY'
import os
def run(name, write):
    fd = os.open(name, os.O_RDONLY)
    write()
    print(name, oct(os.fstat(fd).st_mode), oct(os.lstat(name).st_mode), os.lstat(name).st_size)
    os.close(fd)
def root_trunc():
    with open("f", "wb") as f: f.write(b"abc")
run("f", root_trunc)
def nobody_append():
    if os.fork() == 0:
        os.setgid(65534); os.setuid(65534)
        with open("g", "ab") as f: f.write(b"more")
        os._exit(0)
    os.wait()
run("g", nobody_append)
def root_append():
    with open("h", "ab") as f: f.write(b"more")
run("h", root_append)
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "setid-reader",
        SCRIPT,
        &["f 0o104755 0o104755 3", "g 0o100777 0o100777 5"],
    );
}

/// Changes through an open file whose name is gone, as on the kernel: an
/// upper object unlinked or renamed over (also a FIFO, and a file copied up
/// by a truncation while open read-only) is still changed through the fd;
/// a lower file never copied up fails with `EEXIST` (the kernel's copy-up
/// finds its name taken). Found by a differential fuzzer.
#[test]
fn changes_through_fds_of_objects_whose_name_is_gone() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $U $W $M
echo lower > $L/d/f; echo lower > $L/d/h
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
$PY - <<'PY'
import os
import os, sys, stat
def t(name, f):
    try: r = f(); print(name, "ok", r if r is not None else "")
    except OSError as e: print(name, "ERR", e.errno)
# deleted lower file: metadata via fd
fd = os.open("d/f", os.O_RDONLY); os.unlink("d/f")
t("lower unlinked fchmod", lambda: os.fchmod(fd, 0o600))
t("lower unlinked fsetxattr", lambda: os.setxattr(fd, "user.q", b"1"))
t("lower unlinked futimens", lambda: os.utime(fd, (1, 2)))
# O_TRUNC read-only open, then renamed over
fd2 = os.open("d/h", os.O_RDONLY | os.O_TRUNC)
open("new", "w").write("n")
os.rename("new", "d/h")
t("trunc then renamed-over fsetxattr", lambda: os.setxattr(fd2, "user.q", b"1"))
t("trunc then renamed-over fchmod", lambda: os.fchmod(fd2, 0o600) or oct(os.fstat(fd2).st_mode))
# fifo renamed over
os.mkfifo("ff")
fd3 = os.open("ff", os.O_RDONLY | os.O_NONBLOCK)
open("new2", "w").write("n")
os.rename("new2", "ff")
t("fifo renamed-over fchmod", lambda: os.fchmod(fd3, 0o600) or oct(os.fstat(fd3).st_mode))
# upper file unlinked, read-only fd
open("uf", "w").write("u")
fd4 = os.open("uf", os.O_RDONLY); os.unlink("uf")
t("upper unlinked fchmod", lambda: os.fchmod(fd4, 0o600) or oct(os.fstat(fd4).st_mode))
t("upper unlinked fsetxattr", lambda: os.setxattr(fd4, "user.q", b"1") or os.getxattr(fd4, "user.q"))
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "gone-names",
        SCRIPT,
        &[
            "lower unlinked fchmod ERR 17",
            "fifo renamed-over fchmod ok 0o10600",
        ],
    );
}

/// A name keeps the inode the kernel knows it by while it leads to the
/// same file, as the kernel's one inode: a lower hard link copied up
/// through one name, then its directory listed (whose entries carry the
/// file's attributes), then written through the open file; an upper file
/// linked, its first name unlinked, listed, truncated through an open fd;
/// a file that gained a name through the mount, listed, written through
/// its first name; a file's name renamed over while open for writing,
/// written, its other name looked at. Sizes seen by path, by fd and by
/// reading agree (were the old size by path: two inodes for one file).
/// Found by a differential fuzzer.
#[test]
fn a_name_keeps_its_inode_when_the_files_links_change() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $U $W $M
head -c 100 /dev/zero > $L/a; ln $L/a $L/d/b
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
$PY - <<'PY'
import os
def sizes(tag, fd, path):
    print(tag, "fstat", os.fstat(fd).st_size, "stat", os.stat(path).st_size,
          "read", len(open(path, "rb").read()))
fd = os.open("d/b", os.O_RDWR)
os.listdir("d")
os.pwrite(fd, b"x" * 7, 10000)
sizes("lower link copied up", fd, "d/b")
open("u1", "w").write("abc")
os.link("u1", "u2"); os.unlink("u1")
fd2 = os.open("u2", os.O_RDWR)
os.listdir(".")
os.ftruncate(fd2, 50)
sizes("upper link, first name gone", fd2, "u2")
open("v1", "w").write("abc")
fd3 = os.open("v1", os.O_RDWR)
os.link("v1", "v2")
os.listdir(".")
os.pwrite(fd3, b"y" * 5, 100)
sizes("gained a name", fd3, "v1")
print("v2", os.stat("v2").st_size)
open("w1", "w").write("abc")
os.link("w1", "w2")
fd5 = os.open("w1", os.O_WRONLY | os.O_APPEND)
os.mkfifo("wf"); os.listdir("."); os.stat("w2")
os.rename("wf", "w1")
os.listdir("."); os.stat("w2")
os.write(fd5, b"z" * 5000)
os.listdir(".")
print("renamed over while open: other name", os.stat("w2").st_size, "fd", os.fstat(fd5).st_size)
os.mkfifo("ff")
fd4 = os.open("ff", os.O_RDONLY | os.O_NONBLOCK)
os.unlink("ff")
os.utime(fd4, (1000000000, 1000000000))
print("unlinked fifo mtime", os.fstat(fd4).st_mtime)
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "name-inode",
        SCRIPT,
        &[
            "lower link copied up fstat 10007 stat 10007 read 10007",
            "upper link, first name gone fstat 50 stat 50 read 50",
            "renamed over while open: other name 5003 fd 5003",
        ],
    );
}

/// An `O_TMPFILE` file is an upper file like others (it was served as a
/// lower one: through the page cache, whose write-back of a mapped page
/// turned preallocated space into data): `SEEK_HOLE` after an fallocate
/// and a write through a mapping answers as on the kernel. Found by a
/// differential fuzzer.
#[test]
fn o_tmpfile_files_are_upper_files() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
$PY - <<'PY'
import os, mmap
for kind in ("tmpfile", "named"):
    fd = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600) if kind == "tmpfile" else os.open("f", os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 5000, 4096)
    m = mmap.mmap(fd, 9096); m[1:2] = b"x"; m.flush(); m.close()
    print(kind, "SEEK_HOLE@4096", os.lseek(fd, 4096, os.SEEK_HOLE), "size", os.fstat(fd).st_size)
    os.close(fd)
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs("tmpfile-upper", SCRIPT, &["tmpfile SEEK_HOLE@4096 8192"]);
}

/// A lower FIFO and symlink given another name through the mount stay one
/// inode under both names, also with `userxattr`, where their copies get
/// no `overlay.origin` (no `user.*` xattrs on special files): a reader of
/// one name meets a writer of the other. Before, the new name of such a
/// copy led to a node of its own number (a fuzzer find). The kernel's
/// overlay is the oracle without `userxattr`; with it, it gives the two
/// names two inodes itself (the new name's hashed by its upper inode, the
/// old one's by its lower, for want of an origin: two pipes), so there
/// layerfs must answer as it does without.
#[test]
fn copies_without_origin_keep_one_inode() {
    const SCRIPT: &str = r#"
for opts in "" ",userxattr"; do
echo "== $opts"
rm -rf $L $U $W; mkdir -p $L $U $W $M
mkfifo $L/e; ln -s target $L/s
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W$opts $M
cd $M
ln e m; ln s t
$PY - <<'PY'
import errno, os
rd = os.open("m", os.O_RDONLY | os.O_NONBLOCK)
try:
    wr = os.open("e", os.O_WRONLY | os.O_NONBLOCK); os.write(wr, b"hi"); os.close(wr)
    print("fifo", os.read(rd, 10))
except OSError as e:
    print("fifo", errno.errorcode[e.errno])
os.close(rd)
print("links", os.lstat("e").st_nlink, os.lstat("m").st_nlink, os.lstat("s").st_nlink, os.readlink("t"))
PY
rm e; stat -c "%h %F" m; rm t; stat -c "%h %F" s
cd /; umount $M
done
"#;
    let (k, t) = script_on_kernel_and_layerfs("no-origin-one-inode", SCRIPT);
    let section = |out: &str, n: usize| out.split("== ").nth(n).map(|x| x.to_string());
    let k0 = section(&k, 1).expect("kernel output");
    assert!(
        k0.contains("fifo b'hi'\nlinks 2 2 2 target\n1 fifo\n1 symbolic link"),
        "the kernel's side of the test changed:\n{k}"
    );
    assert_eq!(
        section(&t, 1),
        Some(k0.clone()),
        "kernel (left) vs layerfs (right)"
    );
    let user = section(&t, 2).expect("layerfs userxattr output");
    assert_eq!(
        user.trim_start_matches(",userxattr"),
        k0,
        "layerfs with userxattr (left) vs without (right)"
    );
}

/// Data written through one name of a file shows through its other names
/// at once: to a reader that opened the file (lower then) before a `link`
/// copied it up and a writer changed it through the new name, and, with
/// `writeback` (layerfs only; the kernel runs its default twice), in the
/// size the other name reports after an append. Before, each name was a
/// node of its own: the reader kept the lower data, and `writeback`'s
/// kernel-kept size hid the append.
#[test]
fn writes_show_through_every_name_of_a_file() {
    const SCRIPT: &str = r#"
case "$MNT_CMD" in mount*) WB="" ;; *) WB=",passthrough=off,writeback" ;; esac
for opts in "" "$WB"; do
rm -rf $B/l $B/u $B/w; mkdir -p $L $U $W $M
echo lowerdata > $L/f
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W$opts $M
cd $M
$PY - <<'PY'
import os
r = open("f", "rb")
print("r1", r.read())
os.link("f", "g")
with open("g", "r+b") as w:
    w.write(b"UPPER")
r.seek(0); print("r2", r.read())
print("fresh", open("f", "rb").read())
PY
echo one > a; ln a b; echo two >> a; cat b; stat -c "%s %h" b
cd /; umount $M
done
"#;
    same_on_kernel_and_layerfs(
        "writes-through-names",
        SCRIPT,
        &["r2 b'UPPERdata\\n'", "two\n8 2\n"],
    );
}

/// Lower layers are taken as the kernel's overlay takes them, in private
/// read-only `noatime` copies of their mounts: reading a lower symlink
/// (`readlink`, `ls -l`) leaves its access time in the layer as it was,
/// and a mount made inside a lower layer's tree is not crossed — the
/// overlay shows the directory under it. Before, layerfs's `readlinkat`
/// moved the lower symlink's access time, and its lookups went into the
/// bind mount.
#[test]
fn lower_layers_are_private_read_only_mounts() {
    const SCRIPT: &str = r#"
mkdir -p $L/sub $B/other $U $W $M
ln -s target $L/s; touch -h -a -d '2001-01-01 00:00:00' $L/s
echo under > $L/sub/hidden; echo other > $B/other/visible
mount --bind $B/other $L/sub
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
readlink $M/s; ls -l $M/s | sed 's/.* -> /-> /'
ls $M/sub; cat $M/sub/*
umount $M; umount $L/sub
stat -c '%x' $L/s | grep -q '^2001-' && echo "lower atime kept" || echo "lower atime moved"
"#;
    same_on_kernel_and_layerfs(
        "private-lowers",
        SCRIPT,
        &["target\n-> target\nhidden\nunder\nlower atime kept"],
    );
}

/// Reopening for writing (`/proc/self/fd`) a file whose name went: an
/// upper one opens, a lower one fails with `EEXIST` as on the kernel (its
/// copy-up finds the name taken). Both go through `change_loc`; the open
/// path had its own copy of that rule and answered `ENOENT` for a lower
/// file.
#[test]
fn reopening_a_file_whose_name_went() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M; echo x > $L/f; mkfifo $L/p
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
$PY -c "
import os, errno
fd = os.open('f', os.O_RDONLY); os.unlink('f')
try:
    w = os.open('/proc/self/fd/%d' % fd, os.O_WRONLY); print('reopen ok')
except OSError as e: print('reopen', errno.errorcode[e.errno])
open('g','w').write('u'); fd = os.open('g', os.O_RDONLY); os.unlink('g')
try:
    w = os.open('/proc/self/fd/%d' % fd, os.O_WRONLY); os.write(w, b'Z'); print('upper reopen ok')
except OSError as e: print('upper reopen', errno.errorcode[e.errno])
"
cd /; umount $M
"#;
    same_on_kernel_and_layerfs("reopen-gone", SCRIPT, &["reopen EEXIST\nupper reopen ok"]);
}

/// Checking whether a directory is empty (`rmdir`, a directory renamed
/// over it) leaves its access time alone, as the kernel's overlay reads
/// its layers with `O_NOATIME`; a reader's listing moves it on both (a
/// differential fuzzer find: layerfs listed the upper directory plainly,
/// so a failed `rmdir` made its access time now).
#[test]
fn emptiness_checks_leave_the_access_time() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $L/e/x $U $W $M; echo x > $L/d/f
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
touch -a -d '2001-01-01 00:00:00' d e
rmdir d 2>&1 | sed 's/.*: //'
mkdir n; mv -T n d 2>&1 | sed 's/.*: //'; mv -T n e 2>&1 | sed 's/.*: //'
touch -m -d '2002-02-02 00:00:00' d e
stat -c '%n %x %y' d e
ls d > /dev/null
touch -m -d '2003-03-03 00:00:00' d
stat -c "%x" d | grep -q "^2001-" && echo "d atime kept" || echo "d atime moved"
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "emptiness-atime",
        SCRIPT,
        &[
            "d 2001-01-01 00:00:00.000000000 +0000 2002-02-02",
            "d atime moved",
        ],
    );
}

/// A file whose names all lead to one node keeps working through the
/// names left when the name that node was last found by goes (unlinked,
/// renamed over, moved and unlinked): writes, reads, chmod, xattrs,
/// truncation, times, links and renames through the other name, for a file
/// made in the upper layer, copied-up ones and a lower hard link's copy.
/// (With one node per file, opening such a file for writing failed with
/// `ENOENT` until the node learnt another name.)
#[test]
fn a_file_keeps_working_through_its_other_names() {
    const SCRIPT: &str = r#"
mkdir -p $L/d $U $W $M
echo l > $L/la; ln $L/la $L/lb; echo o > $L/orig; echo p > $L/d/p
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
echo u > x; ln x y; rm y
echo v > x2; ln x2 y2; echo other > o; mv o y2
ln orig o2; rm o2
ln la lc; rm lc
mkdir sc; ln d/p sc/p; mv sc/p sc/q; rm sc/q
$PY - <<'PY'
import os, errno
def t(label, f):
    try:
        r = f()
        print(label, "ok" if r is None else r)
    except OSError as e:
        print(label, errno.errorcode[e.errno])
for n in ["x", "x2", "orig", "la", "d/p"]:
    def w():
        fd = os.open(n, os.O_WRONLY | os.O_APPEND); os.write(fd, b"+"); os.close(fd)
    t(n + " append", w)
    t(n + " read", lambda: open(n, "rb").read())
    t(n + " chmod", lambda: os.chmod(n, 0o600))
    t(n + " setxattr", lambda: os.setxattr(n, "user.k", b"v"))
    t(n + " getxattr", lambda: os.getxattr(n, "user.k"))
    t(n + " listxattr", lambda: sorted(os.listxattr(n)))
    t(n + " truncate", lambda: os.truncate(n, 1))
    t(n + " utime", lambda: os.utime(n, (5, 5)))
    st = os.stat(n)
    print(n, "stat", oct(st.st_mode), st.st_nlink, st.st_size, st.st_mtime)
    t(n + " link", lambda: os.link(n, n + ".l"))
    t(n + " rename", lambda: os.rename(n, n + ".r"))
    t(n + " stat .l", lambda: (os.stat(n + ".l").st_nlink, os.stat(n + ".l").st_size))
    t(n + " unlink .l", lambda: os.unlink(n + ".l"))
    t(n + " stat .r", lambda: (os.stat(n + ".r").st_nlink, os.stat(n + ".r").st_size, oct(os.stat(n + ".r").st_mode)))
PY
ls -la | sed 1d | awk '{print $1, $2, $5, $9}'
cd /; umount $M
ls -la $U | sed 1d | awk '{print $1, $2, $5, $9}'
"#;
    same_on_kernel_and_layerfs(
        "other-names",
        SCRIPT,
        &[
            "x append ok",
            "x2 read b'v\\n+'",
            "la stat .r (1, 1, '0o100600')",
        ],
    );
}

/// Every name of an upper file is one inode, as on the kernel: a lock
/// taken through one name (`flock`, OFD locks) holds against opens of the
/// other, a FIFO's names lead to one pipe, and an inotify watch on one
/// name sees writes and chmods through the other — for a file made in the
/// upper layer, a copied-up one, and a lower hard link's copy, which gets
/// names of its own. A lower hard link's names stay separate inodes (the
/// kernel's `index=off`). Before, each further name of an upper file was a
/// node of its own: locks did not conflict, the FIFO's writer found no
/// reader (`ENXIO`), the watch saw nothing.
#[test]
fn names_of_one_file_share_locks_fifos_and_watches() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
echo l > $L/la; ln $L/la $L/lb; echo o > $L/orig
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
echo u > x; ln x y
mkfifo f; ln f g
echo more >> orig; ln orig orig2
echo c >> la; ln la lc
$PY - <<'PY'
import ctypes, fcntl, os, struct, errno
def flk(a, b):
    fa = os.open(a, os.O_RDWR); fb = os.open(b, os.O_RDWR)
    fcntl.flock(fa, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB); r = "free"
    except OSError as e:
        r = errno.errorcode[e.errno]
    # OFD locks
    F_OFD_SETLK = 37
    lk = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
    fcntl.fcntl(fa, F_OFD_SETLK, lk)
    try:
        fcntl.fcntl(fb, F_OFD_SETLK, lk); r2 = "free"
    except OSError as e:
        r2 = errno.errorcode[e.errno]
    os.close(fa); os.close(fb)
    print("flock", a, b, r, "ofd", r2)
for a, b in [("x", "y"), ("orig", "orig2"), ("la", "lc"), ("la", "lb"), ("lb", "lc")]:
    flk(a, b)
# a FIFO's two names: one pipe
rd = os.open("g", os.O_RDONLY | os.O_NONBLOCK)
try:
    wr = os.open("f", os.O_WRONLY | os.O_NONBLOCK); os.write(wr, b"hi"); os.close(wr)
    print("fifo", os.read(rd, 10))
except OSError as e:
    print("fifo", errno.errorcode[e.errno])
os.close(rd)
# inotify on one name sees changes through the other
libc = ctypes.CDLL(None, use_errno=True)
ino = libc.inotify_init1(os.O_NONBLOCK)
for name in ["y", "orig2", "lc", "lb"]:
    libc.inotify_add_watch(ino, name.encode(), 0x2 | 0x4)  # MODIFY | ATTRIB
def events():
    try:
        buf = os.read(ino, 4096)
    except BlockingIOError:
        return []
    out, i = [], 0
    while i < len(buf):
        wd, mask, cookie, ln = struct.unpack_from("iIII", buf, i)
        out.append((wd, hex(mask))); i += 16 + ln
    return out
for name in ["x", "orig", "la"]:
    with open(name, "a") as f: f.write("z")
    os.chmod(name, 0o640)
    print("inotify", name, events())
for a, b in [("x", "y"), ("orig", "orig2"), ("la", "lc"), ("la", "lb")]:
    sa, sb = os.stat(a), os.stat(b)
    print("stat", a, b, sa.st_ino == sb.st_ino, sa.st_nlink, sb.st_nlink, sa.st_size, sb.st_size, oct(sb.st_mode))
os.unlink("x")
print("after unlink", os.stat("y").st_nlink)
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "one-inode-per-file",
        SCRIPT,
        &[
            "flock x y EAGAIN ofd EAGAIN",
            "flock la lc EAGAIN ofd EAGAIN",
            "flock la lb free ofd free",
            "fifo b'hi'",
            "inotify orig [(2, '0x2'), (2, '0x4')]",
            "after unlink 1",
        ],
    );
}

/// Renaming between two names of one upper file does nothing and
/// succeeds, with any flags the VFS lets through (`RENAME_WHITEOUT`,
/// which the overlay refuses otherwise, `RENAME_EXCHANGE`), as the VFS
/// decides for one inode before the filesystem is asked; names of a lower
/// hard link are separate files there, renamed for real. Found by a
/// differential fuzzer.
#[test]
fn renames_between_names_of_one_file() {
    const SCRIPT: &str = r#"
mkdir -p $L $U $W $M
echo l > $L/la; ln $L/la $L/lb
$MNT_CMD lowerdir=$L,upperdir=$U,workdir=$W $M
cd $M
echo u > x; ln x y
$PY - <<'PY'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def rn(a, b, fl):
    r = libc.renameat2(-100, a.encode(), -100, b.encode(), fl)
    print(a, b, fl, "ok" if r == 0 else os.strerror(ctypes.get_errno()), sorted(os.listdir(".")))
rn("x", "y", 4); rn("x", "y", 2); rn("x", "y", 0); rn("x", "y", 1)
rn("la", "lb", 4); rn("la", "lb", 0)
PY
cd /; umount $M
"#;
    same_on_kernel_and_layerfs(
        "same-file-rename",
        SCRIPT,
        &["x y 4 ok", "la lb 4 Invalid argument"],
    );
}
