//! Read-path differential tests: each scenario builds lower layers, mounts
//! them with the kernel's overlayfs and with layerfs (read-only, and with an
//! empty upper + work dir), walks both views and compares everything the
//! harness records (see `tests/common/mod.rs`).
//!
//! Run as root: `cargo test --test read_differential`.
//! Harness self-check (layerfs replaced by a second kernel overlay mount):
//! `LAYERFS_TEST_BACKEND=kernel cargo test --test read_differential`.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

// ---------------------------------------------------------------------------
// Layer topology scenarios
// ---------------------------------------------------------------------------

#[test]
fn shadowing_a_file() {
    differential(vec![
        Layer::new()
            .file("a", "top\n")
            .file("d/x", "top x")
            .mode(0o600)
            .file("only_top", "t"),
        Layer::new()
            .file("a", "middle content, longer\n")
            .mode(0o755)
            .owner(1000, 1000)
            .file("d/x", "middle x")
            .file("d/y", "middle y")
            .file("b", "b from middle"),
        Layer::new()
            .file("a", "bottom")
            .file("c", "c from bottom")
            .file("d/z", "bottom z"),
    ]);
}

#[test]
fn whiteouts_hide_files_and_dirs() {
    differential(vec![
        Layer::new()
            .whiteout("f")
            .whiteout("dir")
            .whiteout("sub/g")
            .whiteout("no_such_name")
            .file("keep", "keep"),
        Layer::new()
            .file("f", "hidden")
            .file("dir/a", "hidden a")
            .file("dir/deeper/b", "hidden b")
            .file("sub/g", "hidden g")
            .file("sub/h", "visible h")
            // A whiteout in the bottom-most layer hides nothing but is hidden.
            .whiteout("sub/lonely")
            // A whiteout in a directory only this layer has (not merged).
            .file("single/f", "f")
            .whiteout("single/wh"),
        Layer::new()
            .file("dir/c", "also hidden")
            .file("f", "hidden too")
            .file("sub/g", "g below")
            .whiteout("w_bottom"),
    ]);
}

#[test]
fn opaque_dirs() {
    differential(vec![
        Layer::new()
            .opaque_dir("o")
            .file("o/top", "top")
            .file("p/top", "p top")
            .opaque_dir("empty_opaque")
            // Only "y" means opaque; other values (and user.overlay.* without
            // the userxattr option) do not.
            .dir("not_opaque_n")
            .xattr("trusted.overlay.opaque", "n")
            .file("not_opaque_n/top", "t")
            .dir("user_ns_opaque")
            .xattr("user.overlay.opaque", "y")
            .file("user_ns_opaque/top", "t"),
        Layer::new()
            .file("not_opaque_n/mid", "visible")
            .file("user_ns_opaque/mid", "visible")
            .file("o/mid", "mid")
            .file("o/sub/x", "x")
            .opaque_dir("p")
            .file("p/mid", "p mid")
            .file("empty_opaque/hidden", "h"),
        Layer::new()
            .file("o/low", "low")
            .file("p/low", "p low (hidden)")
            .file("p/sub/deep", "hidden"),
    ]);
}

#[test]
fn opaque_dir_with_whiteout_inside() {
    differential(vec![
        Layer::new()
            .opaque_dir("o")
            .whiteout("o/x")
            .file("o/y", "y top")
            .dir("n")
            .whiteout("n/x")
            .file("n/new", "new"),
        Layer::new()
            .file("o/x", "x mid")
            .file("o/z", "z mid")
            .file("n/x/inner", "x is a dir here")
            .file("n/z", "z"),
        Layer::new()
            .file("o/w", "w low")
            .file("n/x/low", "low")
            .file("n/w", "w"),
    ]);
}

#[test]
fn file_over_dir_and_dir_over_file() {
    differential(vec![
        Layer::new()
            .file("fd", "a file over a dir")
            .file("df/inner", "dir over file")
            .symlink("sd", "x")
            .file("ds/in", "dir over symlink")
            .fifo("pd"),
        Layer::new()
            .file("fd/a/b", "hidden under file")
            .file("df", "file under dir (hidden)")
            .file("sd/q", "under symlink")
            .symlink("ds", "/")
            .file("pd/q", "under fifo"),
        // Below a non-directory the dir does not merge any more.
        Layer::new()
            .file("df/low", "must not show")
            .file("fd/c", "hidden")
            .file("ds/low", "must not show"),
    ]);
}

#[test]
fn three_layer_merge_mixed_contributions() {
    differential(vec![
        Layer::new()
            .dir("m")
            .mode(0o700)
            .owner(5, 6)
            .xattr("user.layer", "top")
            .file("m/a", "a top")
            .file("m/sub/t", "t")
            .whiteout("m/gone")
            .file("top_only/f", "f"),
        Layer::new()
            .dir("m")
            .mode(0o755)
            .xattr("user.layer", "mid")
            .xattr("user.midonly", "1")
            .file("m/a", "a mid")
            .file("m/b", "b mid")
            .file("m/sub/s", "s")
            .file("m/sub2/x", "x")
            .file("mid_only/g", "g"),
        Layer::new()
            .dir("m")
            .mode(0o777)
            .file("m/a", "a low")
            .file("m/b", "b low")
            .file("m/c", "c low")
            .file("m/gone", "gone")
            .file("m/sub/r", "r")
            .file("m/sub2/y", "y")
            .file("m/sub3/z", "z")
            .file("low_only/h", "h"),
    ]);
}

#[test]
fn merged_dir_attributes_come_from_topmost_layer() {
    differential(vec![
        Layer::new()
            .at("")
            .mode(0o750)
            .owner(11, 12)
            .xattr("user.root", "top")
            .dir("d")
            .mode(0o711)
            .owner(100, 200)
            .mtime(1_111_111_111, 111)
            .xattr("user.top", "1"),
        Layer::new()
            .at("")
            .mode(0o755)
            .xattr("user.root", "low")
            .dir("d")
            .mode(0o777)
            .owner(300, 400)
            .mtime(1_222_222_222, 222)
            .xattr("user.low", "2")
            .file("d/f", "f"),
    ]);
}

#[test]
fn opaque_xattr_on_a_layer_root() {
    // The kernel ignores trusted.overlay.opaque on a layer's root directory.
    differential(vec![
        Layer::new().file("top", "t"),
        Layer::new()
            .at("")
            .xattr("trusted.overlay.opaque", "y")
            .file("mid", "m"),
        Layer::new().file("low", "l"),
    ]);
}

#[test]
fn deep_nesting() {
    let mut deep = Vec::new();
    let mut top = Layer::new();
    let mut low = Layer::new();
    for level in 0..60 {
        if level > 0 {
            deep.push(b'/');
        }
        deep.extend_from_slice(format!("level{level:02}").as_bytes());
        let f = |n: &str| {
            let mut p = deep.clone();
            p.extend_from_slice(n.as_bytes());
            p.insert(deep.len(), b'/');
            p
        };
        low = low.file(f("low"), format!("low {level}"));
        if level < 46 {
            top = top.file(f("top"), format!("top {level}"));
        }
        if level == 45 {
            // Hide everything below level 46.
            top = top.whiteout({
                let mut p = deep.clone();
                p.extend_from_slice(b"/level46");
                p
            });
        }
        if level % 10 == 0 {
            low = low.file(f("shadowed"), "low").mode(0o600);
            if level < 46 {
                top = top.file(f("shadowed"), "top");
            }
        }
    }
    differential(vec![top, low]);
}

#[test]
fn hard_links_within_one_lower() {
    let stack = differential(vec![
        Layer::new()
            .file("b", "b shadows a link")
            .whiteout("y")
            .file("sub/new", "n"),
        Layer::new()
            .file("a", "three names")
            .hardlink("b", "a")
            .hardlink("sub/c", "a")
            .file("x", "two names")
            .owner(7, 8)
            .mode(0o640)
            .hardlink("y", "x")
            .fifo("fifo")
            .hardlink("fifo_link", "fifo")
            .symlink("sl", "target")
            .hardlink("sl_link", "sl"),
    ]);
    // Explicit: a and sub/c share st_ino and report the real nlink (3).
    let k = stack.kernel(false);
    let t = stack.under_test(false);
    for m in [k.path(), t.path()] {
        let a = fs::symlink_metadata(m.join("a")).unwrap();
        let c = fs::symlink_metadata(m.join("sub/c")).unwrap();
        let b = fs::symlink_metadata(m.join("b")).unwrap();
        assert_eq!(
            a.ino(),
            c.ino(),
            "{}: a and sub/c must share st_ino",
            m.display()
        );
        assert_ne!(a.ino(), b.ino(), "{}: b is a different file", m.display());
        assert_eq!(a.nlink(), 3, "{}: nlink of a", m.display());
        assert_eq!(
            fs::symlink_metadata(m.join("x")).unwrap().nlink(),
            2,
            "{}: nlink of x",
            m.display()
        );
    }
}

#[test]
fn fifos_sockets_and_devices() {
    differential(vec![
        Layer::new()
            .fifo("f_over_file")
            .mode(0o600)
            .char_dev("null", 1, 3)
            .mode(0o666)
            .socket("sock_top")
            .block_dev("dev/loop7", 7, 7)
            .file("dev/was_dev", "now a file"),
        Layer::new()
            .file("f_over_file", "file below fifo")
            .fifo("fifo")
            .owner(42, 43)
            .mode(0o620)
            .socket("sock")
            .char_dev("dev/tty0", 4, 0)
            .char_dev("dev/big", 250, 1_048_000)
            .block_dev("dev/sda1", 8, 1)
            .owner(0, 6)
            .mode(0o660)
            .block_dev("dev/was_dev", 8, 16)
            // Only a *character* device 0/0 is a whiteout.
            .block_dev("blk00", 0, 0)
            .char_dev("chr01", 0, 1)
            .char_dev("chr10", 1, 0),
    ]);
}

#[test]
fn symlinks_are_never_followed() {
    let long_target = "x/".repeat(1500) + "end";
    differential(vec![
        Layer::new()
            .symlink("over_file", "/etc/hostname")
            .symlink("rel", "real/file")
            .symlink("dir_link", "real")
            .symlink("to_root", "/")
            .owner(1001, 1002),
        Layer::new()
            .file("over_file", "file under symlink")
            .file("real/file", "real")
            .symlink("abs", "/abs/path/that/does/not/exist")
            .symlink("dangling", "nowhere")
            .symlink("passwd", "/etc/passwd")
            .symlink("up", "../../..")
            .symlink("dot", ".")
            .symlink("self_loop", "self_loop")
            .symlink("long", long_target.as_bytes())
            .symlink("odd_target", b"new\nline \xff\xfe")
            .symlink("real/back", "../real"),
    ]);
}

#[test]
fn odd_names() {
    let names: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b" leading space".to_vec(),
        b"trailing space ".to_vec(),
        b"new\nline".to_vec(),
        b"tab\tname".to_vec(),
        "ünïcödé-✓-日本語".as_bytes().to_vec(),
        b"bad\xff\xfe\x80utf8".to_vec(),
        b"-dash".to_vec(),
        b"*star?[x]".to_vec(),
        b"back\\slash".to_vec(),
        b":colon,comma=eq".to_vec(),
        b"quote'\"".to_vec(),
        b".hidden".to_vec(),
        b"...".to_vec(),
        b".wh".to_vec(),
        b".whx".to_vec(),
        b"wh.x".to_vec(),
        vec![b'a'; 255],
        {
            let mut v = "é".repeat(127).into_bytes();
            v.push(b'z'); // 255 bytes
            v
        },
    ];
    let mut top = Layer::new();
    let mut low = Layer::new();
    let under = |dir: &[u8], n: &[u8]| {
        let mut p = dir.to_vec();
        p.push(b'/');
        p.extend_from_slice(n);
        p
    };
    for (i, n) in names.iter().enumerate() {
        assert!(n.len() <= 255);
        // As a file, and as a merged directory holding a file of that name.
        low = low.file(under(b"files", n), format!("low {i}"));
        low = low.file(under(b"dirs", &under_name(n)), format!("nested {i}"));
        match i % 3 {
            0 => top = top.file(under(b"files", n), format!("top {i}")),
            1 => top = top.whiteout(under(b"files", n)),
            _ => top = top.file(under(b"dirs", &under(n, b"t")), "t"),
        }
        top = top.symlink(under(b"links", n), n);
    }
    // A 255-byte directory name holding a 255-byte file name.
    let long_dir = [b'd'; 255];
    let mut p = long_dir.to_vec();
    p.push(b'/');
    p.extend_from_slice(&[b'f'; 255]);
    top = top.file(&p, "long");
    differential(vec![top, low]);
}

/// `NAME/NAME`.
fn under_name(n: &[u8]) -> Vec<u8> {
    let mut p = n.to_vec();
    p.push(b'/');
    p.extend_from_slice(n);
    p
}

#[test]
fn large_and_sparse_files() {
    const MIB: u64 = 1 << 20;
    let stack = differential(vec![
        Layer::new()
            .sparse_file(
                "sparse",
                64 * MIB,
                &[
                    (0, b"head"),
                    (MIB + 3, b"middle"),
                    (63 * MIB, b"near the end"),
                ],
            )
            .sparse_file("all_hole", 16 * MIB, &[])
            .file("was_large", "small now"),
        Layer::new()
            .large_file("large", 20 * MIB, 1)
            .large_file("was_large", 5 * MIB, 2)
            .large_file("odd_size", 3 * MIB + 12345, 3),
    ]);
    // Content read through the mount must equal the generated data.
    let t = stack.under_test(false);
    let data = fs::read(t.path().join("large")).unwrap();
    assert!(
        data == pattern_bytes((20 * MIB) as usize, 1),
        "content of /large differs from what was written"
    );
    let sparse = fs::read(t.path().join("sparse")).unwrap();
    assert_eq!(sparse.len() as u64, 64 * MIB);
    assert_eq!(&sparse[(MIB + 3) as usize..(MIB + 9) as usize], b"middle");
    assert!(
        sparse[4..(MIB + 3) as usize].iter().all(|&b| b == 0),
        "hole must read as zeros"
    );
    let md = fs::metadata(t.path().join("sparse")).unwrap();
    assert!(
        md.blocks() * 512 < 4 * MIB,
        "sparse file should stay sparse: {} blocks",
        md.blocks()
    );
}

#[test]
fn xattrs_user_visible_overlay_private_hidden() {
    let big = vec![b'v'; 2000];
    let mut many = Layer::new().file("many", "many xattrs");
    for i in 0..60 {
        many = many.xattr(
            format!("user.attribute_number_{i:03}"),
            format!("value {i}"),
        );
    }
    let stack = differential(vec![
        Layer::new()
            .file("f", "f")
            .xattr("user.a", "1")
            .xattr("user.binary", b"\x00\xff\x01")
            .xattr("user.empty", "")
            .xattr("user.big", &big)
            .xattr("trusted.plain", "root only")
            .xattr("security.test", "sec")
            .xattr("trusted.overlay.opaque", "y")
            .xattr("trusted.overlay.foo", "private")
            .xattr("trusted.overlay.overlay.x", "escaped")
            .dir("d")
            .xattr("user.dir", "top dir")
            .xattr("trusted.overlay.overlay.dirx", "escaped on dir")
            .symlink("l", "f")
            .xattr("trusted.link", "on symlink")
            .xattr("trusted.overlay.overlay.l", "escaped on symlink"),
        many.dir("d")
            .xattr("user.dir", "lower dir")
            .xattr("user.lower_only", "x")
            .file("d/in", "in"),
    ]);
    // Sanity of what the kernel shows (keeps the scenario meaningful).
    let k = stack.kernel(false);
    let f = k.path().join("f");
    assert_eq!(get_xattr(&f, b"user.a"), Ok(b"1".to_vec()));
    assert_eq!(get_xattr(&f, b"trusted.overlay.x"), Ok(b"escaped".to_vec()));
    assert_eq!(get_xattr(&f, b"trusted.overlay.foo"), Err(libc::ENODATA));
    // And directly on the filesystem under test.
    let t = stack.under_test(false);
    let f = t.path().join("f");
    assert_eq!(
        get_xattr(&f, b"trusted.overlay.x"),
        Ok(b"escaped".to_vec()),
        "escaped xattr"
    );
    assert_eq!(
        get_xattr(&f, b"trusted.overlay.opaque"),
        Err(libc::ENODATA),
        "private xattr via getxattr"
    );
    assert_eq!(
        get_xattr(&f, b"trusted.overlay.overlay.x"),
        Err(libc::ENODATA),
        "escaped name itself"
    );
}

#[test]
fn modes_and_owners() {
    differential(vec![
        Layer::new()
            .file("setuid", "su")
            .owner(1000, 1000)
            .mode(0o4755)
            .file("setgid", "sg")
            .owner(0, 50)
            .mode(0o2755)
            .file("both", "b")
            .owner(1, 2)
            .mode(0o6711)
            .file("none", "n")
            .mode(0)
            .file("all", "a")
            .mode(0o7777)
            .file("nobody", "x")
            .owner(65534, 65534)
            .mode(0o400)
            .file("bigid", "x")
            .owner(3_000_000_000, 4_000_000_000)
            .dir("sticky")
            .mode(0o1777)
            .dir("sgdir")
            .owner(0, 100)
            .mode(0o2775)
            .dir("private")
            .owner(1234, 5678)
            .mode(0o700)
            .file("private/f", "f")
            .fifo("fifo")
            .owner(42, 43)
            .mode(0o600)
            .symlink("link", "setuid")
            .owner(1001, 1002),
        Layer::new()
            .file("setuid", "lower")
            .mode(0o644)
            .dir("private")
            .mode(0o777)
            .owner(9, 9)
            .file("private/g", "g")
            .mode(0o4700)
            .owner(77, 0),
    ]);
}

#[test]
fn empty_dirs() {
    differential(vec![
        Layer::new()
            .dir("empty_top")
            .dir("empty_both")
            .dir("empty_over_full")
            .opaque_dir("opaque_empty_over_full")
            .whiteout("all_whited/a")
            .whiteout("all_whited/b")
            .dir("nested/empty/deeper"),
        Layer::new()
            .dir("empty_low")
            .dir("empty_both")
            .file("empty_over_full/f", "f")
            .file("opaque_empty_over_full/f", "hidden")
            .file("all_whited/a", "a")
            .file("all_whited/b", "b"),
    ]);
}

#[test]
fn hundred_layers() {
    let mut layers = Vec::new();
    for i in 0..100usize {
        let mut l = Layer::new()
            .file("common", format!("layer {i}"))
            .file(format!("own/{i:03}"), format!("own {i}"))
            .file(format!("shadow/{}", i % 10), format!("shadow from {i}"))
            .symlink(format!("links/{i:03}"), format!("../own/{i:03}"));
        if i % 7 == 3 {
            l = l.whiteout(format!("own/{:03}", i + 1));
        }
        l = if i % 13 == 5 {
            l.opaque_dir("deep")
        } else {
            l.dir("deep")
        };
        l = l.file(format!("deep/from{i:03}"), format!("{i}"));
        if i % 9 == 0 {
            l = l
                .dir("attrs")
                .mode(0o700 + (i as u32 % 8) * 0o10)
                .xattr("user.layer", i.to_string());
        }
        layers.push(l);
    }
    let stack = differential(layers);
    // Spot checks: topmost wins, opaque at layer 5 cuts off below.
    let t = stack.under_test(false);
    assert_eq!(
        fs::read_to_string(t.path().join("common")).unwrap(),
        "layer 0"
    );
    assert!(t.path().join("deep/from005").exists());
    assert!(!t.path().join("deep/from006").exists());
    assert!(!t.path().join("own/004").exists());
}

// ---------------------------------------------------------------------------
// OCI markers: compared against a hand-written expected view
// ---------------------------------------------------------------------------

#[test]
fn oci_markers_in_lowers_vs_expected_view() {
    const T: (i64, i64) = (1_300_000_000, 5);
    let stack = Stack::build(vec![
        Layer::new()
            .default_mtime(T.0, T.1)
            .oci_whiteout("a")
            .oci_whiteout("gone_dir")
            .oci_whiteout("dir/x")
            .oci_opaque("opq")
            .file("opq/new", "new")
            .oci_whiteout("sub/f2")
            .file("sub/f3", "f3")
            .whiteout("kernel_wh")
            .file("keep", "keep"),
        Layer::new()
            .default_mtime(T.0, T.1)
            .file("a", "a mid")
            .file("dir/x", "x")
            .file("dir/y", "y")
            .file("opq/old", "old")
            .file("opq/olddir/z", "z")
            .file("gone_dir/q", "q")
            .file("sub/f1", "f1")
            .file("sub/f2", "f2")
            .file("kernel_wh", "hidden")
            .file("b", "b"),
        Layer::new()
            .default_mtime(T.0, T.1)
            .file("a", "a low")
            .file("opq/older", "older")
            .file("sub/f2", "f2 low")
            .oci_whiteout("nothing_below")
            .oci_opaque("bottom_opaque")
            .file("bottom_opaque/f", "f"),
    ]);
    let expected = |variant: Variant| {
        let mut e = Layer::new()
            .default_mtime(T.0, T.1)
            .file("keep", "keep")
            .file("b", "b")
            .file("dir/y", "y")
            .file("opq/new", "new")
            .file("sub/f1", "f1")
            .file("sub/f3", "f3")
            .file("bottom_opaque/f", "f");
        if variant == Variant::EmptyUpper {
            e = e.at("").mtime(UPPER_MTIME.0, UPPER_MTIME.1);
        }
        e
    };
    let before = stack.lower_snapshots("before");
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let t = stack.under_test(v.rw());
        let snap = t.snapshot();
        let mismatches = expect_view(&snap, &expected(v));
        if self_check() {
            // The kernel ignores OCI markers: the expected-view comparison
            // must notice (proves the helper can fail).
            assert!(
                mismatches.iter().any(|m| m.contains(".wh.a")),
                "self-check: kernel view unexpectedly matched the OCI expectation: {mismatches:?}"
            );
            continue;
        }
        problems.extend(mismatches.into_iter().map(|m| format!("[{v:?}] {m}")));
        for name in [
            ".wh.a",
            "a",
            "gone_dir",
            "opq/.wh..wh..opq",
            "opq/old",
            "dir/.wh.x",
            "dir/x",
        ] {
            if let Ok(md) = fs::symlink_metadata(t.path().join(name)) {
                problems.push(format!(
                    "[{v:?}] lstat /{name} succeeded ({:o}), expected ENOENT",
                    md.mode()
                ));
            }
        }
    }
    problems.extend(stack.lowers_unchanged(&before));
    report("OCI markers vs expected view", problems);
}

// ---------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------

fn identity_layers() -> Vec<Layer> {
    vec![
        Layer::new()
            .file("t", "top")
            .file("d/t", "top in d")
            .symlink("s_top", "t")
            .file("shadow", "top"),
        Layer::new()
            .file("m", "mid")
            .hardlink("m2", "m")
            .file("d/m", "mid in d")
            .fifo("fifo")
            .char_dev("cdev", 1, 7)
            .file("shadow", "mid"),
        Layer::new()
            .file("l", "low")
            .file("d/l", "low in d")
            .symlink("s_low", "l")
            .file("shadow", "low"),
    ]
}

#[test]
fn raw_inode_numbers_match_kernel() {
    let stack = Stack::build(identity_layers());
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let k = stack.kernel(v.rw()).snapshot();
        let t = stack.under_test(v.rw());
        let ts = t.snapshot();
        problems.extend(compare(&k, &ts).into_iter().map(|m| format!("[{v:?}] {m}")));
        problems.extend(
            raw_ino_mismatches(&k, &ts)
                .into_iter()
                .map(|m| format!("[{v:?}] {m}")),
        );
        // Directly: a non-directory reports the st_ino of the real file in
        // the topmost layer that has it (all layers are on one filesystem).
        for (path, e) in &ts.entries {
            if e.ftype == FileType::Dir || e.error.is_some() {
                continue;
            }
            let real = stack
                .lowers
                .iter()
                .find_map(|l| fs::symlink_metadata(join(l, path)).ok())
                .expect("path in some layer");
            if real.ino() != e.ino {
                problems.push(format!(
                    "[{v:?}] {}: st_ino {} but the layer file has {}",
                    show(path),
                    e.ino,
                    real.ino()
                ));
            }
        }
    }
    report("raw inode numbers", problems);
}

#[test]
fn inode_numbers_stable_across_cache_eviction() {
    let stack = Stack::build(identity_layers());
    let t = stack.under_test(false);
    let k = stack.kernel(false);
    let (t1, k1) = (t.snapshot(), k.snapshot());
    // Evict dentries and inodes: the FUSE kernel side forgets everything and
    // looks names up again.
    fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
    let (t2, k2) = (t.snapshot(), k.snapshot());
    let mut problems = Vec::new();
    for (a, b) in [(&k1, &k2), (&t1, &t2)] {
        for (p, e1) in &a.entries {
            match b.entries.get(p) {
                Some(e2) if e2.ino == e1.ino => {}
                Some(e2) => problems.push(format!(
                    "{} [{}]: st_ino {} then {}",
                    show(p),
                    a.label,
                    e1.ino,
                    e2.ino
                )),
                None => problems.push(format!("{} [{}]: vanished", show(p), a.label)),
            }
        }
    }
    problems.extend(compare(&k2, &t2));
    report("st_ino stability", problems);
}

// ---------------------------------------------------------------------------
// Whole-mount properties
// ---------------------------------------------------------------------------

#[test]
fn statfs_works() {
    let stack = Stack::build(vec![
        Layer::new().file("a", "a"),
        Layer::new().file("b", "b"),
    ]);
    let statvfs = |p: &Path| -> libc::statvfs {
        let c = cpath(p);
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out-pointer.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
        assert_eq!(r, 0, "statvfs {}: {}", p.display(), errno_name(errno()));
        s
    };
    let real = statvfs(&stack.lowers[0]);
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let k = stack.kernel(v.rw());
        let t = stack.under_test(v.rw());
        let (ks, ts) = (statvfs(k.path()), statvfs(t.path()));
        let mut field = |name: &str, a: u64, b: u64| {
            if a != b {
                problems.push(format!("[{v:?}] {name}: kernel={a} test={b}"));
            }
        };
        field("f_blocks", ks.f_blocks, ts.f_blocks);
        field("f_bsize", ks.f_bsize, ts.f_bsize);
        field("f_files", ks.f_files, ts.f_files);
        field("f_namemax", ks.f_namemax, ts.f_namemax);
        field(
            "ST_RDONLY",
            ks.f_flag & libc::ST_RDONLY,
            ts.f_flag & libc::ST_RDONLY,
        );
        field("f_blocks vs layer fs", real.f_blocks, ts.f_blocks);
        field("f_namemax == 255", 255, ts.f_namemax);
        let expect_ro = if v.rw() { 0 } else { libc::ST_RDONLY };
        field("ST_RDONLY expected", expect_ro, ts.f_flag & libc::ST_RDONLY);
        if ts.f_bavail > ts.f_bfree || ts.f_bfree > ts.f_blocks {
            problems.push(format!(
                "[{v:?}] implausible free counts: {} {} {}",
                ts.f_bavail, ts.f_bfree, ts.f_blocks
            ));
        }
    }
    report("statfs", problems);
}

/// errno of a libc call returning -1 on error (0 on success).
fn rc(r: libc::c_int) -> i32 {
    if r < 0 { errno() } else { 0 }
}

#[test]
fn read_only_mount_rejects_writes_with_erofs() {
    let stack = Stack::build(vec![
        Layer::new()
            .file("file", "data")
            .xattr("user.x", "1")
            .dir("emptydir")
            .file("other", "o"),
        Layer::new().file("lowfile", "low"),
    ]);
    let before = stack.lower_snapshots("before");
    let k = stack.kernel(false);
    let t = stack.under_test(false);
    type Op = (&'static str, bool, fn(&Path) -> i32);
    fn c(m: &Path, rel: &str) -> CString {
        cpath(&m.join(rel))
    }
    fn open_rc(m: &Path, rel: &str, flags: i32) -> i32 {
        let p = c(m, rel);
        // SAFETY: valid path; the fd is closed right away if opened.
        let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
        if fd < 0 {
            return errno();
        }
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
        0
    }
    // (name, must be EROFS per the brief, op). All compare with the kernel.
    let ops: Vec<Op> = vec![
        ("create", true, |m| {
            open_rc(m, "newfile", libc::O_CREAT | libc::O_WRONLY)
        }),
        ("create O_EXCL", true, |m| {
            open_rc(m, "newfile2", libc::O_CREAT | libc::O_EXCL | libc::O_RDWR)
        }),
        ("open O_WRONLY", false, |m| {
            open_rc(m, "file", libc::O_WRONLY)
        }),
        ("open O_RDWR|O_TRUNC", false, |m| {
            open_rc(m, "lowfile", libc::O_RDWR | libc::O_TRUNC)
        }),
        ("open O_APPEND", false, |m| {
            open_rc(m, "file", libc::O_WRONLY | libc::O_APPEND)
        }),
        ("unlink", true, |m| rc(libc_unlink(&c(m, "file")))),
        ("unlink lower", true, |m| rc(libc_unlink(&c(m, "lowfile")))),
        ("rmdir", false, |m| rc(libc_rmdir(&c(m, "emptydir")))),
        ("mkdir", true, |m| rc(libc_mkdir(&c(m, "newdir")))),
        ("chmod", true, |m| rc(libc_chmod(&c(m, "file"), 0o600))),
        ("chown", false, |m| rc(libc_lchown(&c(m, "file"), 1, 1))),
        ("setxattr", true, |m| {
            set_xattr(&m.join("file"), b"user.new", b"v")
                .err()
                .unwrap_or(0)
        }),
        ("setxattr replace", true, |m| {
            set_xattr(&m.join("file"), b"user.x", b"2")
                .err()
                .unwrap_or(0)
        }),
        ("removexattr", false, |m| {
            rc(libc_removexattr(&c(m, "file"), c"user.x"))
        }),
        ("rename", false, |m| {
            rc(libc_rename(&c(m, "file"), &c(m, "renamed")))
        }),
        ("symlink", false, |m| {
            rc(libc_symlink(c"target", &c(m, "newlink")))
        }),
        ("link", false, |m| {
            rc(libc_link(&c(m, "file"), &c(m, "hardlink")))
        }),
        ("mknod fifo", false, |m| rc(libc_mkfifo(&c(m, "newfifo")))),
        ("truncate", false, |m| rc(libc_truncate(&c(m, "file")))),
        ("utimensat", false, |m| rc(libc_utimens(&c(m, "file")))),
        ("access W_OK", true, |m| {
            rc(libc_access(&c(m, "file"), libc::W_OK))
        }),
        ("access R_OK", false, |m| {
            rc(libc_access(&c(m, "file"), libc::R_OK))
        }),
    ];
    let mut problems = Vec::new();
    for (name, must_erofs, op) in &ops {
        let ke = op(k.path());
        let te = op(t.path());
        if *must_erofs && ke != libc::EROFS {
            problems.push(format!(
                "{name}: kernel gave {} (harness assumption: EROFS)",
                errno_name(ke)
            ));
        }
        if te != ke {
            problems.push(format!(
                "{name}: kernel={} test={}",
                errno_name(ke),
                errno_name(te)
            ));
        }
        if *must_erofs && te != libc::EROFS {
            problems.push(format!("{name}: expected EROFS, got {}", errno_name(te)));
        }
    }
    // Still readable, and nothing changed.
    assert_eq!(
        fs::read_to_string(t.path().join("file")).ok().as_deref(),
        Some("data")
    );
    drop(t);
    drop(k);
    problems.extend(stack.lowers_unchanged(&before));
    report("writes on a read-only mount", problems);
}

// Thin wrappers so the op table above stays readable.
fn libc_unlink(p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::unlink(p.as_ptr()) }
}
fn libc_rmdir(p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::rmdir(p.as_ptr()) }
}
fn libc_mkdir(p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::mkdir(p.as_ptr(), 0o755) }
}
fn libc_chmod(p: &CString, mode: libc::mode_t) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::chmod(p.as_ptr(), mode) }
}
fn libc_lchown(p: &CString, u: u32, g: u32) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::lchown(p.as_ptr(), u, g) }
}
fn libc_removexattr(p: &CString, n: &std::ffi::CStr) -> libc::c_int {
    // SAFETY: valid NUL-terminated strings.
    unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }
}
fn libc_rename(a: &CString, b: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated paths.
    unsafe { libc::rename(a.as_ptr(), b.as_ptr()) }
}
fn libc_symlink(t: &std::ffi::CStr, p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated strings.
    unsafe { libc::symlink(t.as_ptr(), p.as_ptr()) }
}
fn libc_link(a: &CString, b: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated paths.
    unsafe { libc::link(a.as_ptr(), b.as_ptr()) }
}
fn libc_mkfifo(p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::mknod(p.as_ptr(), libc::S_IFIFO | 0o644, 0) }
}
fn libc_truncate(p: &CString) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::truncate(p.as_ptr(), 0) }
}
fn libc_access(p: &CString, how: libc::c_int) -> libc::c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::access(p.as_ptr(), how) }
}
fn libc_utimens(p: &CString) -> libc::c_int {
    // SAFETY: valid path; a null times pointer means "now".
    unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), std::ptr::null(), 0) }
}

#[test]
fn hostile_layer_symlinks_stay_symlinks() {
    let stack = differential(vec![
        Layer::new()
            .symlink("etc", "/etc")
            .symlink("up", "../../..")
            .file("d/plain", "p")
            .symlink("d/root", "/")
            .file("shadowed_etc/own", "own")
            .file("x/a", "a")
            .file("upd/u", "u")
            .file("p/q/own", "own"),
        Layer::new()
            // Non-directories below a directory stop the merge: the daemon
            // must never follow these into the host.
            .symlink("shadowed_etc", "/etc")
            .symlink("x", "/")
            .symlink("upd", "../../../../../../..")
            .symlink("d/inner", "../../../../..")
            .symlink("passwd_link", "/etc/passwd")
            .symlink("p/q", "/etc"),
    ]);
    let host_passwd = fs::read("/etc/passwd").unwrap();
    let k = stack.kernel(false);
    let t = stack.under_test(false);
    let mut problems = Vec::new();
    for (label, m) in [("kernel", k.path()), ("test", t.path())] {
        let mut check = |what: &str, ok: bool| {
            if !ok {
                problems.push(format!("[{label}] {what}"));
            }
        };
        check(
            "readlink /etc == \"/etc\"",
            fs::read_link(m.join("etc")).ok().as_deref() == Some(Path::new("/etc")),
        );
        check(
            "lstat /etc is a symlink",
            fs::symlink_metadata(m.join("etc")).is_ok_and(|md| md.file_type().is_symlink()),
        );
        check(
            "readlink /up",
            fs::read_link(m.join("up")).ok().as_deref() == Some(Path::new("../../..")),
        );
        // Symlinks are resolved by the VFS: this legitimately reaches the host.
        check(
            "/etc/passwd via the symlink is the host's",
            fs::read(m.join("etc/passwd")).ok() == Some(host_passwd.clone()),
        );
        check(
            "/passwd_link reads the host's passwd",
            fs::read(m.join("passwd_link")).ok() == Some(host_passwd.clone()),
        );
        let names = |p: &Path| -> BTreeSet<Vec<u8>> {
            fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().as_bytes().to_vec())
                        .collect()
                })
                .unwrap_or_default()
        };
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| s.as_bytes().to_vec())
                .collect::<BTreeSet<_>>()
        };
        check(
            "/shadowed_etc lists only the layer's dir",
            names(&m.join("shadowed_etc")) == set(&["own"]),
        );
        check(
            "/shadowed_etc/passwd does not exist",
            fs::symlink_metadata(m.join("shadowed_etc/passwd")).is_err(),
        );
        check(
            "/shadowed_etc/hostname does not exist",
            fs::symlink_metadata(m.join("shadowed_etc/hostname")).is_err(),
        );
        check(
            "/x lists only the layer's dir",
            names(&m.join("x")) == set(&["a"]),
        );
        check(
            "/x/etc does not exist",
            fs::symlink_metadata(m.join("x/etc")).is_err(),
        );
        check(
            "/upd lists only the layer's dir",
            names(&m.join("upd")) == set(&["u"]),
        );
        check(
            "/d lists only layer names",
            names(&m.join("d")) == set(&["plain", "root", "inner"]),
        );
        check(
            "root lists only layer names",
            names(m)
                == set(&[
                    "etc",
                    "up",
                    "d",
                    "shadowed_etc",
                    "x",
                    "upd",
                    "passwd_link",
                    "p",
                ]),
        );
    }
    report("hostile layer", problems);
}

#[test]
fn dash_o_syntax_and_clean_unmount() {
    let stack = Stack::build(vec![
        Layer::new()
            .file("a", "a")
            .whiteout("b")
            .opaque_dir("o")
            .file("o/x", "x"),
        Layer::new().file("b", "b").file("o/y", "y").file("c", "c"),
    ]);
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let ks = stack.kernel(v.rw()).snapshot();
        if self_check() {
            let ts = stack.under_test(v.rw()).snapshot();
            problems.extend(compare(&ks, &ts));
            continue;
        }
        let m = stack.layerfs(v.rw(), Syntax::DashO);
        let ts = m.snapshot();
        problems.extend(
            compare(&ks, &ts)
                .into_iter()
                .map(|s| format!("[{v:?}] {s}")),
        );
        let path = m.path().to_path_buf();
        let pids = m.daemon_pids().to_vec();
        if pids.is_empty() {
            problems.push(format!(
                "[{v:?}] no daemon process found with the mount point in its argv"
            ));
        }
        if let Err(e) = m.unmount() {
            problems.push(format!("[{v:?}] {e}"));
        }
        if mount_fstype(&path).is_some() {
            problems.push(format!("[{v:?}] still mounted after unmount"));
        }
    }
    report("-o syntax", problems);
}

// ---------------------------------------------------------------------------
// Tools over a generated 20,000+ file tree
// ---------------------------------------------------------------------------

fn big_tree_layers() -> Vec<Layer> {
    const DIRS: usize = 210;
    const FILES: usize = 100;
    let mut low = Layer::new();
    for d in 0..DIRS {
        for f in 0..FILES {
            let mode = if f % 5 == 0 {
                0o600
            } else if f % 7 == 0 {
                0o755
            } else {
                0o644
            };
            low = low
                .file(
                    format!("d{d:03}/f{f:04}.txt"),
                    format!("base {d} {f}\n").repeat(1 + f % 4),
                )
                .mode(mode);
        }
        low = low.symlink(format!("d{d:03}/link"), "f0000.txt");
    }
    let mut mid = Layer::new();
    for d in (0..DIRS).filter(|d| !(190..200).contains(d)) {
        for f in 0..FILES {
            if d % 2 == 0 && f % 7 == 0 {
                mid = mid.file(format!("d{d:03}/f{f:04}.txt"), format!("mid {d} {f}\n"));
            } else if d < 50 && f % 11 == 0 {
                mid = mid.whiteout(format!("d{d:03}/f{f:04}.txt"));
            }
        }
    }
    for d in 190..200 {
        mid = mid.whiteout(format!("d{d:03}"));
    }
    for e in 0..1000 {
        mid = mid
            .file(format!("extra1/e{e:04}"), format!("extra {e}"))
            .owner(e % 3, e % 5);
    }
    mid = mid
        .file("extra1/h1", "hard")
        .hardlink("extra1/h2", "extra1/h1");
    let mut top = Layer::new();
    for d in 100..110 {
        top = top.opaque_dir(format!("d{d:03}"));
        for f in 0..5 {
            top = top.file(format!("d{d:03}/top{f}"), format!("top {d} {f}"));
        }
    }
    top = top.file("d120", "file over dir");
    for e in 0..500 {
        top = top.file(format!("extra0/sub{}/t{e:04}", e % 10), format!("t {e}"));
    }
    for d in 0..100 {
        for f in (0..FILES).step_by(13) {
            top = top.file(format!("d{d:03}/f{f:04}.txt"), format!("top {d} {f}\n"));
        }
    }
    vec![top, mid, low]
}

fn run_tool(cmd: &mut Command) -> (bool, Vec<u8>, String) {
    cmd.env("LC_ALL", "C").env("TZ", "UTC");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// First difference of two outputs, as context for a report.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let pos = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let ctx = |v: &[u8]| {
        let start = pos.saturating_sub(120);
        esc(&v[start..(pos + 120).min(v.len())])
    };
    format!(
        "lengths {} vs {}, first difference at byte {pos}:\n    kernel: {}\n    test:   {}",
        a.len(),
        b.len(),
        ctx(a),
        ctx(b)
    )
}

fn sorted_lines(v: &[u8]) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = v.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    lines.sort();
    lines.join(&b'\n')
}

/// `ls -lRn` output with alignment spaces collapsed, and the link count,
/// size of directory lines and the `total` lines (which add up directory
/// blocks) blanked: the walk does not compare those for directories either.
fn normalize_ls(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in v.split(|&b| b == b'\n') {
        let mut f: Vec<&[u8]> = line
            .split(|&b| b == b' ')
            .filter(|f| !f.is_empty())
            .collect();
        if f.first() == Some(&&b"total"[..]) {
            f.truncate(1);
        } else if line.first() == Some(&b'd') && f.len() >= 6 {
            f[1] = b"-";
            f[4] = b"-";
        }
        out.extend_from_slice(&f.join(&b' '));
        out.push(b'\n');
    }
    out
}

#[test]
fn tools_find_ls_tar_diff_on_20k_files() {
    let clock = std::time::Instant::now();
    let lap = |what: &str| eprintln!("[{:>6.2}s] {what}", clock.elapsed().as_secs_f64());
    let layers = big_tree_layers();
    let stack = Stack::build(layers);
    let k = stack.kernel(false);
    let t = stack.under_test(false);
    let (km, tm) = (k.path(), t.path());
    lap("built and mounted");
    let mut problems = Vec::new();

    let ks = k.snapshot();
    let ts = t.snapshot();
    let files = ks
        .entries
        .values()
        .filter(|e| e.ftype == FileType::File)
        .count();
    assert!(files >= 20_000, "generated tree too small: {files} files");
    problems.extend(compare(&ks, &ts));
    lap("walked and compared");

    // find (order is readdir order: compare sorted)
    for args in [
        vec![
            "!",
            "-type",
            "d",
            "-printf",
            "%P\t%y\t%m\t%s\t%U\t%G\t%l\t%T@\t%n\n",
        ],
        vec!["-type", "d", "-printf", "%P\t%m\t%U\t%G\t%T@\n"],
    ] {
        let (ok1, o1, e1) = run_tool(Command::new("find").arg(km).args(&args));
        let (ok2, o2, e2) = run_tool(Command::new("find").arg(tm).args(&args));
        if !ok1 || !ok2 {
            problems.push(format!(
                "find {args:?} failed: kernel ok={ok1} {e1} test ok={ok2} {e2}"
            ));
        }
        let (s1, s2) = (sorted_lines(&o1), sorted_lines(&o2));
        if s1 != s2 {
            problems.push(format!(
                "find {args:?} output differs: {}",
                first_difference(&s1, &s2)
            ));
        }
    }

    lap("find");
    // ls -lR (sorted by ls itself)
    let ls = |m: &Path| {
        run_tool(
            Command::new("ls")
                .args(["-lRn", "--time-style=+%s.%N", "."])
                .current_dir(m),
        )
    };
    let (ok1, o1, e1) = ls(km);
    let (ok2, o2, e2) = ls(tm);
    if !ok1 || !ok2 {
        problems.push(format!(
            "ls -lR failed: kernel ok={ok1} {e1} test ok={ok2} {e2}"
        ));
    }
    let (n1, n2) = (normalize_ls(&o1), normalize_ls(&o2));
    if n1 != n2 {
        problems.push(format!(
            "ls -lR output differs: {}",
            first_difference(&n1, &n2)
        ));
    }

    lap("ls -lR");
    // tar: byte-identical archives
    let tar = |m: &Path| {
        run_tool(
            Command::new("tar")
                .args(["-c", "--sort=name", "--numeric-owner", "-f", "-", "."])
                .current_dir(m),
        )
    };
    let (ok1, o1, e1) = tar(km);
    let (ok2, o2, e2) = tar(tm);
    if !ok1 || !ok2 || !e2.is_empty() {
        problems.push(format!(
            "tar failed or warned: kernel ok={ok1} {e1} test ok={ok2} {e2}"
        ));
    }
    assert!(
        o1.len() > 10 << 20,
        "kernel tar suspiciously small: {}",
        o1.len()
    );
    if o1 != o2 {
        problems.push(format!(
            "tar -c --sort=name output differs: {}",
            first_difference(&o1, &o2)
        ));
    }

    lap("tar");
    // diff -r between the two mounts
    let (ok, out, err) = run_tool(
        Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(km)
            .arg(tm),
    );
    if !ok {
        let out = String::from_utf8_lossy(&out);
        let head: Vec<&str> = out.lines().take(20).collect();
        problems.push(format!(
            "diff -r reports differences: {}\n{err}",
            head.join("\n")
        ));
    }
    lap("diff -r");
    report("tools on a 20k-file tree", problems);
}

// ---------------------------------------------------------------------------
// Directory reading in detail, lookups, partial reads
// ---------------------------------------------------------------------------

fn big_dir_layers() -> Vec<Layer> {
    let mut top = Layer::new();
    let mut mid = Layer::new();
    let mut low = Layer::new();
    for i in 0..3000 {
        low = low.file(format!("big/low_{i:05}_{}", "x".repeat(i % 40)), "l");
        if i % 3 == 0 {
            mid = mid.file(format!("big/low_{i:05}_{}", "x".repeat(i % 40)), "shadow");
        }
        if i % 5 == 0 {
            top = top.whiteout(format!("big/low_{i:05}_{}", "x".repeat(i % 40)));
        }
    }
    for i in 0..1500 {
        mid = mid.file(format!("big/mid_{i:05}"), "m");
        top = top.file(format!("big/top_{i:05}"), "t");
    }
    vec![top, mid, low]
}

/// Read a directory with telldir recorded before every entry.
fn read_with_positions(path: &Path) -> Vec<(libc::c_long, Vec<u8>)> {
    let c = cpath(path);
    // SAFETY: valid path.
    let dirp = unsafe { libc::opendir(c.as_ptr()) };
    assert!(
        !dirp.is_null(),
        "opendir {}: {}",
        path.display(),
        errno_name(errno())
    );
    let mut out = Vec::new();
    loop {
        // SAFETY: dirp is an open DIR stream.
        let pos = unsafe { libc::telldir(dirp) };
        // SAFETY: dirp is an open DIR stream.
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            break;
        }
        // SAFETY: valid dirent until the next readdir call.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }
            .to_bytes()
            .to_vec();
        out.push((pos, name));
    }
    // SAFETY: closing the stream we opened.
    unsafe { libc::closedir(dirp) };
    out
}

/// seekdir to recorded positions must resume at the same entry, rewinddir
/// must restart; returns problems.
fn check_seekdir(label: &str, path: &Path) -> Vec<String> {
    let all = read_with_positions(path);
    let names: Vec<&Vec<u8>> = all.iter().map(|(_, n)| n).collect();
    let mut out = Vec::new();
    let c = cpath(path);
    // SAFETY: valid path.
    let dirp = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!dirp.is_null());
    let n = all.len();
    for &i in &[n - 1, 0, n / 2, 1, n / 3, n - 2, 2 * n / 3] {
        // SAFETY: dirp is open; the position came from telldir on the same directory.
        unsafe { libc::seekdir(dirp, all[i].0) };
        let mut got = Vec::new();
        for _ in 0..5 {
            // SAFETY: dirp is an open DIR stream.
            let ent = unsafe { libc::readdir64(dirp) };
            if ent.is_null() {
                break;
            }
            // SAFETY: valid dirent until the next readdir call.
            got.push(
                unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }
                    .to_bytes()
                    .to_vec(),
            );
        }
        let want: Vec<Vec<u8>> = names[i..(i + 5).min(n)]
            .iter()
            .map(|v| (*v).clone())
            .collect();
        if got != want {
            out.push(format!(
                "[{label}] seekdir to entry {i} of {n}: got {:?} want {:?}",
                got.iter().map(|g| esc(g)).collect::<Vec<_>>(),
                want.iter().map(|g| esc(g)).collect::<Vec<_>>()
            ));
        }
    }
    // SAFETY: dirp is open.
    unsafe { libc::rewinddir(dirp) };
    let mut again = Vec::new();
    loop {
        // SAFETY: dirp is an open DIR stream.
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            break;
        }
        // SAFETY: valid dirent until the next readdir call.
        again.push(
            unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }
                .to_bytes()
                .to_vec(),
        );
    }
    // SAFETY: closing the stream we opened.
    unsafe { libc::closedir(dirp) };
    if again.iter().collect::<Vec<_>>() != names {
        out.push(format!(
            "[{label}] rewinddir: second pass differs ({} vs {} entries)",
            again.len(),
            n
        ));
    }
    out
}

#[test]
fn large_directory_readdir_seekdir_small_buffers() {
    let stack = differential(big_dir_layers());
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let k = stack.kernel(v.rw());
        let t = stack.under_test(v.rw());
        let kd = k.path().join("big");
        let td = t.path().join("big");
        let want: BTreeSet<Vec<u8>> = list_dir(&kd).unwrap().into_iter().map(|e| e.name).collect();
        assert!(want.len() > 5000, "kernel lists {} entries", want.len());
        for bufsize in [300usize, 1024, 4096, 65536] {
            match list_dir_getdents(&td, bufsize) {
                Ok(got) => {
                    let set: BTreeSet<Vec<u8>> = got.iter().map(|e| e.name.clone()).collect();
                    if set.len() != got.len() {
                        problems.push(format!(
                            "[{v:?}] getdents({bufsize}): {} records, {} distinct",
                            got.len(),
                            set.len()
                        ));
                    }
                    if set != want {
                        let missing = want.difference(&set).count();
                        let extra = set.difference(&want).count();
                        problems.push(format!(
                            "[{v:?}] getdents({bufsize}): {missing} names missing, {extra} extra"
                        ));
                    }
                }
                Err(e) => problems.push(format!("[{v:?}] getdents({bufsize}): {}", errno_name(e))),
            }
        }
        problems.extend(check_seekdir(&format!("{v:?} kernel"), &kd));
        problems.extend(check_seekdir(&format!("{v:?} test"), &td));
    }
    report("large directory", problems);
}

#[test]
fn lookup_errors_match_kernel() {
    let stack = Stack::build(vec![
        Layer::new()
            .whiteout("gone")
            .opaque_dir("o")
            .whiteout("o/x")
            .symlink("loop", "loop")
            .symlink("dangling", "nowhere")
            .symlink("to_dir", "dir")
            .file("dir/in", "in"),
        Layer::new()
            .file("file", "data")
            .file("gone", "hidden")
            .file("o/x", "x")
            .fifo("fifo")
            .dir("dir"),
    ]);
    let long = "n".repeat(256);
    let paths: Vec<String> = vec![
        "nope".into(),
        "file".into(),
        "file/x".into(),
        "file/".into(),
        "gone".into(),
        "gone/x".into(),
        "o/x".into(),
        "loop".into(),
        "loop/x".into(),
        "dangling".into(),
        "to_dir/in".into(),
        "dir/../file".into(),
        "dir/./in".into(),
        "fifo".into(),
        long.clone(),
        format!("dir/{long}"),
    ];
    fn open_err(p: &Path, flags: i32) -> i32 {
        let c = cpath(p);
        // SAFETY: valid path; the fd is closed right away.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return errno();
        }
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        0
    }
    fn e<T>(r: std::io::Result<T>) -> i32 {
        r.err().map(|e| e.raw_os_error().unwrap_or(-1)).unwrap_or(0)
    }
    let probe = |m: &Path, rel: &str| -> Vec<(&'static str, i32)> {
        let p = m.join(rel);
        let x = get_xattr(&p, b"user.none").err().unwrap_or(0);
        vec![
            ("lstat", e(fs::symlink_metadata(&p))),
            ("stat", e(fs::metadata(&p))),
            ("open O_RDONLY", open_err(&p, libc::O_RDONLY)),
            (
                "open O_DIRECTORY",
                open_err(&p, libc::O_RDONLY | libc::O_DIRECTORY),
            ),
            (
                "open O_NOFOLLOW",
                open_err(&p, libc::O_RDONLY | libc::O_NOFOLLOW),
            ),
            ("open O_PATH", open_err(&p, libc::O_PATH)),
            ("readlink", e(fs::read_link(&p))),
            ("getxattr missing name", x),
        ]
    };
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let k = stack.kernel(v.rw());
        let t = stack.under_test(v.rw());
        for rel in &paths {
            for ((op, ke), (_, te)) in probe(k.path(), rel).into_iter().zip(probe(t.path(), rel)) {
                if ke != te {
                    problems.push(format!(
                        "[{v:?}] {op} /{rel}: kernel={} test={}",
                        errno_name(ke),
                        errno_name(te)
                    ));
                }
            }
        }
        // `..` of a subdirectory is the root; `.` is the dir itself.
        let ino = |p: &Path| fs::symlink_metadata(p).map(|m| m.ino()).unwrap_or(0);
        if ino(&t.path().join("dir/..")) != ino(t.path()) {
            problems.push(format!("[{v:?}] st_ino of /dir/.. differs from the root's"));
        }
        if ino(&t.path().join("dir/.")) != ino(&t.path().join("dir")) {
            problems.push(format!("[{v:?}] st_ino of /dir/. differs from /dir's"));
        }
    }
    report("lookup errors", problems);
}

#[test]
fn partial_reads_pread_and_mmap_match_kernel() {
    const SIZE: u64 = 3 * (1 << 20) + 777;
    let stack = Stack::build(vec![
        Layer::new()
            .large_file("big", SIZE, 9)
            .file("small", "0123456789"),
        Layer::new()
            .large_file("below", 100_000, 4)
            .file("empty", ""),
    ]);
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let k = stack.kernel(v.rw());
        let t = stack.under_test(v.rw());
        for name in ["big", "small", "below", "empty"] {
            let kf = fs::File::open(k.path().join(name)).unwrap();
            let tf = fs::File::open(t.path().join(name)).unwrap();
            let size = kf.metadata().unwrap().len();
            for off in [
                0,
                1,
                7,
                4095,
                4096,
                65535,
                131072,
                1 << 20,
                size.saturating_sub(1),
                size,
                size + 100,
            ] {
                for len in [1usize, 100, 8191, 200_000] {
                    let mut a = vec![0u8; len];
                    let mut b = vec![0u8; len];
                    let ra = std::os::unix::fs::FileExt::read_at(&kf, &mut a, off)
                        .map_err(|e| e.raw_os_error());
                    let rb = std::os::unix::fs::FileExt::read_at(&tf, &mut b, off)
                        .map_err(|e| e.raw_os_error());
                    let same = match (&ra, &rb) {
                        (Ok(x), Ok(y)) => x == y && a[..*x] == b[..*y],
                        _ => ra == rb,
                    };
                    if !same {
                        problems.push(format!(
                            "[{v:?}] pread /{name} off={off} len={len}: kernel {ra:?} test {rb:?}"
                        ));
                    }
                }
            }
            // mmap the whole file and compare with the kernel's content.
            if size > 0 {
                let map = |f: &fs::File| -> Vec<u8> {
                    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
                    // SAFETY: read-only private mapping of `size` bytes of an open file.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            size as usize,
                            libc::PROT_READ,
                            libc::MAP_PRIVATE,
                            fd,
                            0,
                        )
                    };
                    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", errno_name(errno()));
                    // SAFETY: the mapping is `size` bytes long and readable.
                    let v = unsafe { std::slice::from_raw_parts(p as *const u8, size as usize) }
                        .to_vec();
                    // SAFETY: unmapping what we mapped.
                    unsafe { libc::munmap(p, size as usize) };
                    v
                };
                if map(&kf) != map(&tf) {
                    problems.push(format!("[{v:?}] mmap content of /{name} differs"));
                }
            }
        }
    }
    report("partial reads", problems);
}

// ---------------------------------------------------------------------------
// Kernel-written formats: follow them or refuse to mount, never show wrong data
// ---------------------------------------------------------------------------

/// Compare kernel and layerfs over `layers`; layerfs may instead refuse to
/// mount with an error naming one of `keywords`.
fn follow_or_refuse(layers: Vec<Layer>, keywords: &[&str]) -> Vec<String> {
    let stack = Stack::build(layers);
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let ks = stack.kernel(v.rw()).snapshot();
        if self_check() {
            problems.extend(compare(&ks, &stack.under_test(v.rw()).snapshot()));
            continue;
        }
        match stack.try_layerfs(v.rw()) {
            Ok(m) => problems.extend(
                compare(&ks, &m.snapshot())
                    .into_iter()
                    .map(|s| format!("[{v:?}] {s}")),
            ),
            Err(MountFailure::Refused { output, .. }) => {
                let lower = output.to_lowercase();
                if !keywords.iter().any(|k| lower.contains(k)) || output.trim().is_empty() {
                    problems.push(format!(
                        "[{v:?}] refused to mount without naming {keywords:?}: {output}"
                    ));
                }
            }
            Err(e) => problems.push(format!("[{v:?}] {e}")),
        }
    }
    problems
}

#[test]
fn redirect_dirs_in_lowers_followed_or_refused() {
    // What the kernel writes for `mv a a2; mv a2/b x/b2` with redirect_dir=on.
    let problems = follow_or_refuse(
        vec![
            Layer::new()
                .whiteout("a")
                .dir("a2")
                .xattr("trusted.overlay.redirect", "a")
                .whiteout("a2/b")
                .dir("x/b2")
                .xattr("trusted.overlay.redirect", "/a/b")
                .file("a2/new", "n"),
            Layer::new()
                .file("a/f", "f")
                .file("a/b/g", "g")
                .file("x/own", "own"),
        ],
        &["redirect"],
    );
    report("redirect_dir", problems);
}

#[test]
fn xattr_whiteouts_in_lowers_followed_or_refused() {
    // Kernel >= 6.7 format: empty file with overlay.whiteout in a directory
    // marked overlay.opaque=x (which is then *not* opaque).
    let problems = follow_or_refuse(
        vec![
            Layer::new()
                .dir("xw")
                .xattr("trusted.overlay.opaque", "x")
                .file("xw/gone", "")
                .xattr("trusted.overlay.whiteout", "")
                .file("xw/top", "t"),
            Layer::new().file("xw/gone", "hidden").file("xw/keep", "k"),
        ],
        &["whiteout", "opaque"],
    );
    report("xattr whiteouts", problems);
}

#[test]
fn metacopy_stub_in_lower_never_shown_as_data() {
    // A metadata-only copy-up: sparse stub of the full size with
    // overlay.metacopy; the data lives below. Showing the stub's zeros as the
    // content would be silently wrong data.
    let data = b"the real data";
    let stack = Stack::build(vec![
        Layer::new()
            .sparse_file("stub", data.len() as u64, &[])
            .xattr("trusted.overlay.metacopy", "")
            .file("plain", "p"),
        Layer::new().file("stub", data),
    ]);
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let t = match (self_check(), stack.try_layerfs(v.rw())) {
            (true, _) => stack.under_test(v.rw()),
            (false, Ok(m)) => TestMount::Layerfs(m),
            (false, Err(MountFailure::Refused { output, .. })) => {
                if !output.to_lowercase().contains("metacopy") {
                    problems.push(format!("[{v:?}] refused without naming metacopy: {output}"));
                }
                continue;
            }
            (false, Err(e)) => {
                problems.push(format!("[{v:?}] {e}"));
                continue;
            }
        };
        match fs::read(t.path().join("stub")) {
            Ok(got) if got == data => {}
            Ok(got) => problems.push(format!(
                "[{v:?}] /stub read as \"{}\" (stub shown as data)",
                esc(&got)
            )),
            Err(_) => {} // an error, as the kernel gives without metacopy=on
        }
        if fs::read(t.path().join("plain")).ok().as_deref() != Some(&b"p"[..]) {
            problems.push(format!("[{v:?}] /plain unreadable"));
        }
    }
    report("metacopy", problems);
}

// ---------------------------------------------------------------------------
// Layers on different filesystems; concurrency
// ---------------------------------------------------------------------------

#[test]
fn lowers_on_different_filesystems_keep_inodes_unique() {
    let ta = TmpfsMount::new();
    let tb = TmpfsMount::new();
    // Same creation order on two fresh tmpfs: the real inode numbers collide.
    let layer = |tag: &str| {
        Layer::new()
            .file(format!("{tag}_1"), tag)
            .file(format!("{tag}_2"), tag)
            .file("common", tag)
            .file("d/x", tag)
            .file(format!("d/{tag}"), tag)
            .symlink(format!("{tag}_link"), "x")
    };
    let stack = Stack::build_placed(
        vec![
            layer("a").whiteout("c_2"),
            layer("b").hardlink("b_hard", "b_1"),
            layer("c"),
        ],
        |i| match i {
            0 => Some(ta.path().join("l")),
            1 => Some(tb.path().join("l")),
            _ => None,
        },
    );
    let mut problems = Vec::new();
    for v in Variant::ALL {
        let ks = stack.kernel(v.rw()).snapshot();
        let t = stack.under_test(v.rw());
        let ts = t.snapshot();
        // Identity is compared as (st_dev, st_ino) classes; the kernel gives
        // each filesystem its own st_dev, so its per-view invariants and raw
        // inode numbers do not apply.
        let opts = CompareOpts {
            invariants: false,
            ..Default::default()
        };
        problems.extend(
            compare_with(opts, &ks, &ts)
                .into_iter()
                .map(|s| format!("[{v:?}] {s}")),
        );
        // st_ino alone must identify objects in the test view.
        let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (p, e) in &ts.entries {
            by_ino.entry(e.ino).or_default().push(show(p));
        }
        let shared: Vec<String> = by_ino
            .values()
            .filter(|ps| ps.len() > 1 && **ps != ["/b_1", "/b_hard"])
            .map(|ps| ps.join(" "))
            .collect();
        if self_check() {
            assert!(
                !shared.is_empty(),
                "scenario should produce colliding real inode numbers"
            );
            continue;
        }
        problems.extend(
            check_invariants(&ts)
                .into_iter()
                .map(|s| format!("[{v:?}] {s}")),
        );
        for s in shared {
            problems.push(format!("[{v:?}] different objects share an st_ino: {s}"));
        }
    }
    drop(stack);
    report("layers on different filesystems", problems);
}

#[test]
fn concurrent_walks_agree() {
    let stack = Stack::build(vec![
        Layer::new()
            .opaque_dir("o")
            .file("o/a", "a")
            .whiteout("gone")
            .large_file("big", 2 << 20, 5)
            .file("m/top", "t"),
        Layer::new()
            .file("gone", "g")
            .file("o/b", "b")
            .file("h1", "h")
            .hardlink("h2", "h1")
            .file("m/mid", "m"),
        {
            let mut l = Layer::new();
            for i in 0..400 {
                l = l
                    .file(format!("m/f{i:03}"), format!("{i}"))
                    .file(format!("n{}/f{i}", i % 20), "x");
            }
            l
        },
    ]);
    let k = stack.kernel(false);
    let t = stack.under_test(false);
    let ks = k.snapshot();
    let results: Vec<Snapshot> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| t.snapshot())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("walker thread"))
            .collect()
    });
    let mut problems = Vec::new();
    for (i, ts) in results.iter().enumerate() {
        problems.extend(
            compare(&ks, ts)
                .into_iter()
                .map(|m| format!("[walker {i}] {m}")),
        );
    }
    report("concurrent walks", problems);
}

/// Listing a directory, reading a file and copying another up through the
/// overlay leave the lower layer's access times alone, as on the kernel's
/// overlay (which opens what it reads in the layers `O_NOATIME`): the lowers
/// are never written, their inodes' times included. Except one documented
/// case: on a read-only overlay layerfs passes lower files through, and the
/// kernel reads those backing files with the reader's open flags.
#[test]
fn lower_access_times_stay() {
    const OLD: i64 = 1_577_836_800; // 2020-01-01
    let stack = Stack::build(vec![
        Layer::new()
            .dir("d")
            .mtime(OLD, 0)
            .file("d/f", "data\n")
            .mtime(OLD, 0)
            .file("g", "g\n")
            .mtime(OLD, 0),
    ]);
    let atime = |rel: &str| -> i64 {
        fs::symlink_metadata(stack.lowers[0].join(rel))
            .expect("lower entry")
            .atime()
    };
    let exercise = |m: &Path, rw: bool| {
        fs::read_dir(m.join("d")).expect("list d").for_each(drop);
        fs::read(m.join("d/f")).expect("read d/f");
        if rw {
            let mut g = fs::OpenOptions::new()
                .append(true)
                .open(m.join("g"))
                .expect("open g");
            std::io::Write::write_all(&mut g, b"more\n").expect("append to g (copy-up)");
        }
    };
    let mut problems = Vec::new();
    for v in Variant::ALL {
        for label in ["kernel", "layerfs"] {
            for rel in ["d", "d/f", "g"] {
                set_mtime(&stack.lowers[0].join(rel), (OLD, 0)).expect("reset times");
            }
            if label == "kernel" {
                let k = stack.kernel(v.rw());
                exercise(k.path(), v.rw());
            } else {
                let t = stack.under_test(v.rw());
                exercise(t.path(), v.rw());
            }
            let passthrough = label == "layerfs" && v == Variant::ReadOnly;
            for rel in ["d", "d/f", "g"] {
                if atime(rel) != OLD && !(passthrough && rel == "d/f") {
                    problems.push(format!("[{v:?}] {label}: lower {rel}: atime changed"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
