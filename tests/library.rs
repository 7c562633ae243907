//! The library API used exactly as a user's integration test would:
//! build an overlay, mount it, change things, drop the guard.

use std::fs;
use std::os::unix::fs::MetadataExt;

fn is_mounted(p: &std::path::Path) -> bool {
    let canon = fs::canonicalize(p).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

fn dirs() -> (tempfile::TempDir, [std::path::PathBuf; 5]) {
    let t = tempfile::tempdir().unwrap();
    let p = ["l1", "l2", "upper", "work", "mnt"].map(|n| t.path().join(n));
    for d in &p {
        fs::create_dir(d).unwrap();
    }
    (t, p)
}

#[test]
fn builder_mounts_and_guard_unmounts() {
    let (_t, [l1, l2, upper, work, mnt]) = dirs();
    fs::write(l1.join("top"), "top\n").unwrap();
    fs::write(l2.join("top"), "shadowed\n").unwrap();
    fs::write(l2.join("bottom"), "bottom\n").unwrap();
    let guard = layerfs::Overlay::new()
        .lower(&l1)
        .lower(&l2)
        .upper(&upper, &work)
        .mount(&mnt)
        .unwrap();
    assert!(is_mounted(&mnt));
    assert_eq!(fs::read_to_string(mnt.join("top")).unwrap(), "top\n");
    assert_eq!(fs::read_to_string(mnt.join("bottom")).unwrap(), "bottom\n");
    fs::write(mnt.join("bottom"), "changed\n").unwrap();
    fs::remove_file(mnt.join("top")).unwrap();
    drop(guard);
    assert!(!is_mounted(&mnt));
    assert_eq!(
        fs::read_to_string(upper.join("bottom")).unwrap(),
        "changed\n"
    );
    assert_eq!(fs::read_to_string(l2.join("bottom")).unwrap(), "bottom\n");
    let wh = fs::symlink_metadata(upper.join("top")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));
    assert_eq!(wh.rdev(), 0);
}

#[test]
fn guard_unmounts_when_the_test_panics() {
    let (_t, [l1, _l2, _u, _w, mnt]) = dirs();
    fs::write(l1.join("f"), "x").unwrap();
    let m2 = mnt.clone();
    let r = std::panic::catch_unwind(move || {
        let _g = layerfs::Overlay::new().lower(&l1).mount(&m2).unwrap();
        assert!(is_mounted(&m2));
        panic!("a failing user test");
    });
    assert!(r.is_err());
    assert!(!is_mounted(&mnt));
}

#[test]
fn read_only_overlay_refuses_writes_with_erofs() {
    let (_t, [l1, _l2, _u, _w, mnt]) = dirs();
    fs::write(l1.join("f"), "x").unwrap();
    let _g = layerfs::Overlay::new().lower(&l1).mount(&mnt).unwrap();
    let e = fs::write(mnt.join("f"), "y").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = fs::create_dir(mnt.join("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::read_to_string(l1.join("f")).unwrap(), "x");
}

#[test]
fn invalid_configuration_is_an_error_naming_the_path() {
    let (_t, [l1, _l2, upper, _w, mnt]) = dirs();
    let missing = l1.join("nope");
    let e = layerfs::Overlay::new()
        .lower(&missing)
        .mount(&mnt)
        .err()
        .unwrap();
    assert!(e.contains("lowerdir") && e.contains("nope"), "{e}");
    let e = layerfs::Overlay::new()
        .lower(&l1)
        .upper(&upper, upper.join("w"))
        .mount(&mnt)
        .err()
        .unwrap();
    assert!(e.contains("workdir"), "{e}");
    assert!(!is_mounted(&mnt));
}
