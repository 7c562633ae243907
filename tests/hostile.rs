//! Layers changed under a live mount by a hostile host process: a layer
//! directory the kernel already knows is swapped for a symlink pointing out
//! of the layer. Whatever layerfs then answers (the old directory's
//! contents, an error), the daemon must never read or write through that
//! symlink: the target directory stays untouched and never shows through
//! the directory's node. The test works through a descriptor of the
//! directory taken before the swap, with single-name `*at` calls, so that
//! its own path walks follow no symlink: whatever reaches the target would
//! be the daemon's doing. (Once the kernel looks the name up again, it is
//! the symlink it now is, which a caller's path walk may follow, as any
//! symlink in a layer — the kernel's overlayfs behaves alike.)

mod reliability_support;

use reliability_support::*;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::Path;

/// A directory descriptor; every call below names one entry in it.
struct At(OwnedFd);

impl At {
    fn open(p: &Path) -> At {
        let c = cpath(p);
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd >= 0, "open {}: {}", p.display(), errno_name(errno()));
        // SAFETY: a fresh fd we own.
        At(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn name(n: &str) -> CString {
        CString::new(n).unwrap()
    }

    /// Creates (or truncates) `n` and writes `data`; the errno on failure.
    fn write(&self, n: &str, data: &[u8]) -> Result<(), i32> {
        let c = Self::name(n);
        // SAFETY: valid fd and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                0o644,
            )
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh fd we own.
        let f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::io::Write::write_all(&mut &f, data).map_err(|e| e.raw_os_error().unwrap_or(0))
    }

    fn read(&self, n: &str) -> Result<Vec<u8>, i32> {
        let c = Self::name(n);
        // SAFETY: valid fd and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh fd we own.
        let mut f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).map_err(|e| e.raw_os_error().unwrap_or(0))?;
        Ok(data)
    }

    fn mkdir(&self, n: &str) -> i32 {
        let c = Self::name(n);
        // SAFETY: valid fd and C string.
        unsafe { libc::mkdirat(self.0.as_raw_fd(), c.as_ptr(), 0o755) }
    }

    fn unlink(&self, n: &str) -> i32 {
        let c = Self::name(n);
        // SAFETY: valid fd and C string.
        unsafe { libc::unlinkat(self.0.as_raw_fd(), c.as_ptr(), 0) }
    }

    fn rename(&self, a: &str, b: &str) -> i32 {
        let (a, b) = (Self::name(a), Self::name(b));
        let fd = self.0.as_raw_fd();
        // SAFETY: valid fd and C strings.
        unsafe { libc::renameat(fd, a.as_ptr(), fd, b.as_ptr()) }
    }

    /// The names listed through the descriptor.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Names and contents of a directory's files (not recursive).
fn contents(p: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| {
            let data = fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect()
}

/// A target outside every layer, with a file that must never show or change.
fn outside(d: &Dirs) -> std::path::PathBuf {
    let out = d.dir("outside");
    fs::write(out.join("secret"), b"host secret\n").unwrap();
    out
}

fn assert_untouched(out: &Path) {
    let c = contents(out);
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        vec!["secret"],
        "something was created in the symlink's target {}",
        out.display()
    );
    assert_eq!(c["secret"], b"host secret\n");
}

#[test]
fn lower_dir_swapped_for_a_symlink_while_mounted_is_never_followed() {
    let d = Dirs::new("hostile-lower");
    let out = outside(&d);
    let lower = d.dir("lower");
    fs::create_dir_all(lower.join("dir/sub")).unwrap();
    fs::write(lower.join("dir/f"), b"f\n").unwrap();
    fs::write(lower.join("dir/sub/g"), b"g\n").unwrap();
    let upper = d.dir("upper");
    let m = Layerfs::mount(
        std::slice::from_ref(&lower),
        &upper,
        &d.dir("work"),
        &d.path("mnt"),
    );
    let _wd = m.watchdog(120, "hostile lower swap");
    let dir = m.path().join("dir");
    let at = At::open(&dir);
    assert_eq!(at.read("f").unwrap(), b"f\n");
    assert_eq!(at.names(), vec!["f", "sub"]);

    // The host swaps the directory for a symlink out of the layer.
    fs::rename(lower.join("dir"), lower.join("dir.old")).unwrap();
    symlink(&out, lower.join("dir")).unwrap();

    // Through the node the kernel holds: never the target's contents.
    let names = at.names();
    assert!(
        !names.contains(&"secret".to_string()),
        "the symlink's target was listed: {names:?}"
    );
    match at.read("secret") {
        Ok(data) => assert_ne!(data, b"host secret\n", "read through the symlink"),
        Err(e) => assert_eq!(e, libc::ENOENT, "{}", errno_name(e)),
    }
    // Writes need a copy-up of the directory, which finds a symlink where
    // the directory was: refused, nothing copied, nothing written outside.
    let _ = at.write("new", b"n\n");
    let _ = at.write("f", b"changed\n");
    let _ = at.mkdir("newdir");
    let _ = at.unlink("f");
    let _ = at.rename("f", "f2");
    assert_untouched(&out);
    assert!(
        fs::symlink_metadata(upper.join("dir")).is_err(),
        "the swapped-in symlink was copied up"
    );
    drop(at);

    // Once the kernel forgets the node, the name is the symlink it now is.
    drop_caches();
    let md = fs::symlink_metadata(&dir).unwrap();
    assert!(
        md.file_type().is_symlink() || md.file_type().is_dir(),
        "unexpected type {:?}",
        md.file_type()
    );
    if md.file_type().is_symlink() {
        assert_eq!(fs::read_link(&dir).unwrap(), out);
    }
    assert_untouched(&out);
    assert_eq!(
        contents(&lower.join("dir.old")).keys().collect::<Vec<_>>(),
        vec!["f", "sub"],
        "the lower layer was written"
    );
    m.unmount().expect("clean unmount");
    assert_untouched(&out);
}

#[test]
fn upper_dir_swapped_for_a_symlink_while_mounted_keeps_writes_inside() {
    let d = Dirs::new("hostile-upper");
    let out = outside(&d);
    let lower = d.dir("lower");
    fs::write(lower.join("base"), b"b\n").unwrap();
    let upper = d.dir("upper");
    let m = Layerfs::mount(
        std::slice::from_ref(&lower),
        &upper,
        &d.dir("work"),
        &d.path("mnt"),
    );
    let _wd = m.watchdog(120, "hostile upper swap");
    let w = m.path().join("w");
    fs::create_dir(&w).unwrap();
    let at = At::open(&w);
    at.write("a", b"a\n").unwrap();
    assert_eq!(at.names(), vec!["a"]);

    fs::rename(upper.join("w"), upper.join("w.old")).unwrap();
    symlink(&out, upper.join("w")).unwrap();

    // Creates through the held node go to the directory it was (now
    // w.old, still inside the upper) or fail; never to the target.
    let _ = at.write("b", b"b\n");
    let _ = at.mkdir("c");
    let _ = at.unlink("a");
    let _ = at.rename("b", "b2");
    let names = at.names();
    assert!(
        !names.contains(&"secret".to_string()),
        "the symlink's target was listed: {names:?}"
    );
    assert_untouched(&out);
    for e in fs::read_dir(upper.join("w.old")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            ["a", "b", "b2", "c"].contains(&n.as_str()),
            "unexpected {n} in the moved directory"
        );
    }
    drop(at);
    m.unmount().expect("clean unmount");
    assert_untouched(&out);
}
