//! OCI/Docker layer import and export (SPEC §9), without network or
//! external tools: layer tars, OCI layouts and `docker save` archives are
//! built here byte by byte, imported with the `layerfs` binary, and the
//! resulting directories (and mounts of them, kernel overlay and layerfs)
//! are compared with what the layers say.
//!
//! Must run as root (mknod, chown, trusted.* xattrs, mounts).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{CompareOpts, KernelMount, LayerfsMount, Snapshot, Syntax};
use layerfs::oci::digest::Digest;
use serde_json::{Value, json};

// ===========================================================================
// Running the binary
// ===========================================================================

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn layerfs<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let o = Command::new(common::layerfs_bin())
        .args(args)
        .output()
        .expect("run layerfs");
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Imports and returns the lowers, topmost first (from the `lowerdir=` line).
fn import(image: &Path, dest: &Path, extra: &[&str]) -> (Vec<PathBuf>, Out) {
    let mut args: Vec<&OsStr> = vec!["import".as_ref(), image.as_os_str(), dest.as_os_str()];
    args.extend(extra.iter().map(|s| OsStr::new(*s)));
    let out = layerfs(args);
    assert!(
        out.ok,
        "import {} failed:\n{}{}",
        image.display(),
        out.stdout,
        out.stderr
    );
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("lowerdir="))
        .expect("a lowerdir= line");
    let lowers = line.split(':').map(PathBuf::from).collect();
    (lowers, out)
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("layerfs-oci-")
        .tempdir_in(common::test_tmp())
        .unwrap()
}

// ===========================================================================
// Building layer tars byte by byte (hostile ones too)
// ===========================================================================

/// One tar member, with raw name bytes (nothing normalised or checked).
#[derive(Clone)]
struct E {
    name: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Vec<u8>,
    data: Vec<u8>,
    dev: (u32, u32),
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Declared size, if different from the data's (hostile headers).
    size: Option<u64>,
}

fn ent(kind: tar::EntryType, name: impl AsRef<[u8]>) -> E {
    let dir = kind == tar::EntryType::Directory;
    E {
        name: name.as_ref().to_vec(),
        kind,
        mode: if dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        link: Vec::new(),
        data: Vec::new(),
        dev: (0, 0),
        pax: Vec::new(),
        size: None,
    }
}

fn dir(name: impl AsRef<[u8]>) -> E {
    ent(tar::EntryType::Directory, name)
}
fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> E {
    ent(tar::EntryType::Regular, name).data(data)
}
fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    ent(tar::EntryType::Symlink, name).link(target).mode(0o777)
}
fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    ent(tar::EntryType::Link, name).link(target)
}

impl E {
    fn mode(mut self, m: u32) -> Self {
        self.mode = m;
        self
    }
    fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn mtime(mut self, t: u64) -> Self {
        self.mtime = t;
        self
    }
    fn data(mut self, d: impl AsRef<[u8]>) -> Self {
        self.data = d.as_ref().to_vec();
        self
    }
    fn link(mut self, l: impl AsRef<[u8]>) -> Self {
        self.link = l.as_ref().to_vec();
        self
    }
    fn dev(mut self, major: u32, minor: u32) -> Self {
        self.dev = (major, minor);
        self
    }
    fn pax(mut self, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) -> Self {
        self.pax.push((k.as_ref().to_vec(), v.as_ref().to_vec()));
        self
    }
    fn xattr(self, k: &str, v: impl AsRef<[u8]>) -> Self {
        self.pax(format!("SCHILY.xattr.{k}"), v)
    }
}

fn pax_body(recs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        let body = k.len() + v.len() + 3;
        let mut n = body + 1;
        while n != body + n.to_string().len() {
            n = body + n.to_string().len();
        }
        out.extend_from_slice(format!("{n} ").as_bytes());
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let u = h.as_ustar_mut().unwrap();
    let n = name.len().min(100);
    u.name[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(kind);
    h.set_size(size);
    h
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut pax = e.pax.clone();
        if e.name.len() > 100 {
            pax.push((b"path".to_vec(), e.name.clone()));
        }
        if e.link.len() > 100 {
            pax.push((b"linkpath".to_vec(), e.link.clone()));
        }
        if !pax.is_empty() {
            let body = pax_body(&pax);
            let mut x = raw_header(b"PaxHeaders/x", tar::EntryType::XHeader, body.len() as u64);
            x.set_mode(0o644);
            x.set_cksum();
            b.append(&x, &body[..]).unwrap();
        }
        let mut h = raw_header(&e.name, e.kind, e.size.unwrap_or(e.data.len() as u64));
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        if !e.link.is_empty() {
            let l = e.link.len().min(100);
            h.as_ustar_mut().unwrap().linkname[..l].copy_from_slice(&e.link[..l]);
        }
        h.set_device_major(e.dev.0).unwrap();
        h.set_device_minor(e.dev.1).unwrap();
        h.set_cksum();
        b.append(&h, &e.data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

/// A valid VFS_CAP_REVISION_2 `security.capability` value (cap_net_raw+ep).
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted lo: CAP_NET_RAW
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable lo
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted hi
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable hi
    v
}

fn lget(path: &Path, name: &str) -> Option<Vec<u8>> {
    common::get_xattr(path, name.as_bytes()).ok()
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

/// The single layer directory an import of one layer made.
fn only_layer(dest: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(dest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "one layer dir expected in {}: {dirs:?}",
        dest.display()
    );
    dirs.into_iter().next().unwrap()
}

// ===========================================================================
// OCI layouts and docker save archives
// ===========================================================================

fn put_blob(layout: &Path, data: &[u8]) -> (String, u64) {
    let d = Digest::of(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(d.hex()), data).unwrap();
    (d.to_string(), data.len() as u64)
}

struct LayerBlob {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

fn layer_blob(tar: &[u8], compression: &str) -> LayerBlob {
    let (blob, mt) = match compression {
        "gzip" => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
        "zstd" => (zstd(tar), "application/vnd.oci.image.layer.v1.tar+zstd"),
        _ => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
    };
    LayerBlob {
        blob,
        media_type: mt,
        diff_id: Digest::of(tar).to_string(),
    }
}

/// Writes an image (config, manifest, layer blobs) into `layout`; returns
/// the index entry for it.
fn oci_image(layout: &Path, layers: &[LayerBlob], history: Value, tag: &str) -> Value {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let (cd, cs) = put_blob(layout, &serde_json::to_vec(&config).unwrap());
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| {
            let (d, s) = put_blob(layout, &l.blob);
            json!({"mediaType": l.media_type, "digest": d, "size": s})
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": tag},
        "platform": {"architecture": "amd64", "os": "linux"},
    })
}

fn write_index(layout: &Path, entries: Vec<Value>) {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": entries});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// The three layers of the test image: a base, a layer that changes and
/// deletes things, and a layer that makes a directory opaque.
fn three_layers() -> [Vec<u8>; 3] {
    let base = tar_bytes(&[
        dir("./"),
        dir("etc"),
        file("etc/os-release", "ID=test\n"),
        file("etc/old.conf", "old\n").mode(0o600),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/tool", "#!/bin/sh\necho tool\n").mode(0o755),
        hardlink("usr/bin/tool-alias", "usr/bin/tool"),
        symlink("bin", "usr/bin"),
        dir("var/cache").mode(0o700),
        file("var/cache/a", "a"),
        file("var/cache/b", "b"),
        dir("tmp").mode(0o1777),
    ]);
    let middle = tar_bytes(&[
        dir("etc"),
        file("etc/.wh.old.conf", ""),
        file("etc/new.conf", "new\n").owner(1000, 1000),
        dir("home/user").owner(1000, 1000).mode(0o750),
        file("home/user/.profile", "PS1=x\n").owner(1000, 1000),
        ent(tar::EntryType::Fifo, "run/fifo").mode(0o600),
        file("usr/bin/ping", "ping")
            .mode(0o4755)
            .xattr("security.capability", capability()),
    ]);
    let top = tar_bytes(&[
        // The marker comes before its directory's entry: it still applies.
        file("var/cache/.wh..wh..opq", ""),
        dir("var/cache").mode(0o700),
        file("var/cache/c", "c"),
        file("usr/bin/.wh.tool-alias", ""),
        file("etc/os-release", "ID=test\nVERSION=2\n").xattr("user.layer", "3"),
    ]);
    [base, middle, top]
}

fn history3() -> Value {
    json!([
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:base in /"},
        {"created": "2024-01-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"sh\"]", "empty_layer": true},
        {"created": "2024-01-02T00:00:00Z", "created_by": "RUN rm /etc/old.conf && useradd user"},
        {"created": "2024-01-03T00:00:00Z", "created_by": "RUN rm -rf /var/cache && mkdir /var/cache", "comment": "buildkit"},
    ])
}

/// A layout with the 3-layer image tagged `v1` and a 1-layer image sharing
/// its base, tagged `base`.
fn build_layout(layout: &Path) -> [Vec<u8>; 3] {
    let tars = three_layers();
    let blobs = [
        layer_blob(&tars[0], "gzip"),
        layer_blob(&tars[1], "zstd"),
        layer_blob(&tars[2], "none"),
    ];
    let v1 = oci_image(layout, &blobs, history3(), "v1");
    let base = oci_image(
        layout,
        &[layer_blob(&tars[0], "gzip")],
        json!([{"created_by": "ADD base"}]),
        "base",
    );
    write_index(layout, vec![v1, base]);
    tars
}

/// The merged view of `lowers` (topmost first) through the kernel and
/// through layerfs, both read-only; asserts they agree and returns the
/// kernel's.
fn mounted_views(lowers: &[PathBuf]) -> Snapshot {
    let mut klowers = lowers.to_vec();
    let empty = tmpdir();
    if klowers.len() == 1 {
        klowers.push(empty.path().to_path_buf()); // the kernel needs two for ro
    }
    let k = KernelMount::new(&klowers, false);
    let ks = k.snapshot();
    let l = LayerfsMount::new(lowers, false, Syntax::Subcommand);
    let ls = l.snapshot();
    common::assert_same_with(CompareOpts::default(), &ks, &ls);
    ks
}

fn entry<'a>(s: &'a Snapshot, p: &str) -> Option<&'a common::Entry> {
    s.entries.get(p.as_bytes())
}

// ===========================================================================
// Import: single layers
// ===========================================================================

#[test]
fn every_entry_type_and_marker() {
    let t = tmpdir();
    let long_name = format!("long/{}", "n".repeat(150));
    let layer = tar_bytes(&[
        dir("./").mode(0o750).mtime(1_500_000_000),
        // A directory listed first: its mtime must survive its children.
        dir("d").mode(0o2750).owner(7, 8).mtime(1_400_000_000),
        file("d/f", "data")
            .mode(0o4755)
            .owner(1, 2)
            .pax("mtime", "1234567890.123456789"),
        file("d/cap", "x")
            .xattr("security.capability", capability())
            .xattr("user.k", "v"),
        hardlink("d/f-link", "d/f"),
        symlink("d/sym", "../etc/../nowhere").owner(3, 4),
        // Linux has no user.* xattrs on symlinks: a warning, not a failure.
        symlink("d/sym2", "x").xattr("user.k", "v"),
        ent(tar::EntryType::Char, "dev/null").dev(1, 3).mode(0o666),
        ent(tar::EntryType::Block, "dev/loop9")
            .dev(7, 9)
            .mode(0o660)
            .owner(0, 6),
        ent(tar::EntryType::Fifo, "dev/fifo").mode(0o620),
        dir("sticky").mode(0o1777),
        file(".wh.gone", "").owner(5, 6),
        file("sub/.wh.x y", ""),
        // Opaque markers: before its directory, and after its children.
        file("op1/.wh..wh..opq", ""),
        dir("op1").mode(0o711),
        dir("op2"),
        file("op2/kept", "k"),
        file("op2/.wh..wh..opq", ""),
        file("odd/a b\nc", "newline"),
        file(b"odd/\xff\xfe", "latin"),
        file("odd/é✓", "utf8"),
        file(&long_name, "long"),
        symlink("odd/longlink", "t".repeat(200)),
        // A later entry replaces an earlier one.
        file("re/place", "first"),
        dir("re/place"),
        file("re/place/inner", "second"),
        // An escaped private xattr comes back escaped.
        file("x/priv", "p").xattr("trusted.overlay.foo", "bar"),
    ]);
    let src = t.path().join("layer.tar");
    fs::write(&src, &layer).unwrap();
    let dest = t.path().join("dest");
    let (lowers, out) = import(&src, &dest, &[]);
    assert_eq!(lowers.len(), 1);
    let l = only_layer(&dest);
    assert_eq!(l, lowers[0]);
    assert_eq!(
        l.file_name().unwrap().to_str().unwrap(),
        Digest::of(&layer).hex(),
        "layer dir named by diff_id"
    );
    assert!(
        out.stdout.contains(&Digest::of(&layer).short()),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("'d/sym2': xattr user.k not set"),
        "{}",
        out.stderr
    );

    let m = |p: &str| fs::symlink_metadata(l.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(m(".").mode() & 0o7777, 0o750);
    assert_eq!(m(".").mtime(), 1_500_000_000);
    let d = m("d");
    assert_eq!(
        (d.mode() & 0o7777, d.uid(), d.gid(), d.mtime()),
        (0o2750, 7, 8, 1_400_000_000)
    );
    let f = m("d/f");
    assert_eq!((f.mode() & 0o7777, f.uid(), f.gid()), (0o4755, 1, 2));
    assert_eq!((f.mtime(), f.mtime_nsec()), (1_234_567_890, 123_456_789));
    assert_eq!(f.nlink(), 2);
    assert_eq!(f.ino(), m("d/f-link").ino(), "hard link");
    assert_eq!(fs::read(l.join("d/f")).unwrap(), b"data");
    assert_eq!(
        lget(&l.join("d/cap"), "security.capability"),
        Some(capability())
    );
    assert_eq!(lget(&l.join("d/cap"), "user.k"), Some(b"v".to_vec()));
    let s = m("d/sym");
    assert!(s.file_type().is_symlink());
    assert_eq!((s.uid(), s.gid()), (3, 4));
    assert_eq!(
        fs::read_link(l.join("d/sym")).unwrap(),
        Path::new("../etc/../nowhere")
    );
    let c = m("dev/null");
    assert!(c.file_type().is_char_device());
    assert_eq!(
        (
            libc::major(c.rdev()),
            libc::minor(c.rdev()),
            c.mode() & 0o7777
        ),
        (1, 3, 0o666)
    );
    let b = m("dev/loop9");
    assert!(b.file_type().is_block_device());
    assert_eq!(
        (libc::major(b.rdev()), libc::minor(b.rdev()), b.gid()),
        (7, 9, 6)
    );
    assert!(m("dev/fifo").file_type().is_fifo());
    assert_eq!(m("dev/fifo").mode() & 0o7777, 0o620);
    assert_eq!(m("sticky").mode() & 0o7777, 0o1777);
    // Whiteouts: char 0/0 with the marker's owner; markers never appear.
    assert!(is_whiteout(&l.join("gone")));
    assert_eq!((m("gone").uid(), m("gone").gid()), (5, 6));
    assert!(is_whiteout(&l.join("sub/x y")));
    assert!(!l.join(".wh.gone").exists() && !l.join("op1/.wh..wh..opq").exists());
    // Opaque wherever the marker was.
    assert_eq!(
        lget(&l.join("op1"), "trusted.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert_eq!(m("op1").mode() & 0o777, 0o711);
    assert_eq!(
        lget(&l.join("op2"), "trusted.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert!(l.join("op2/kept").exists());
    assert_eq!(lget(&l.join("d"), "trusted.overlay.opaque"), None);
    // Odd names.
    assert_eq!(fs::read(l.join("odd/a b\nc")).unwrap(), b"newline");
    assert_eq!(
        fs::read(l.join(OsStr::from_bytes(b"odd/\xff\xfe"))).unwrap(),
        b"latin"
    );
    assert_eq!(fs::read(l.join("odd/é✓")).unwrap(), b"utf8");
    assert_eq!(fs::read(l.join(&long_name)).unwrap(), b"long");
    assert_eq!(
        fs::read_link(l.join("odd/longlink"))
            .unwrap()
            .as_os_str()
            .len(),
        200
    );
    assert_eq!(fs::read(l.join("re/place/inner")).unwrap(), b"second");
    assert_eq!(
        lget(&l.join("x/priv"), "trusted.overlay.overlay.foo"),
        Some(b"bar".to_vec())
    );
    assert_eq!(lget(&l.join("x/priv"), "trusted.overlay.foo"), None);
}

#[test]
fn compression_is_detected_from_content() {
    let t = tmpdir();
    let layer = tar_bytes(&[file("hello", "world")]);
    let diff = Digest::of(&layer).hex();
    // Names that lie about the content.
    for (name, blob) in [
        ("a.tar.gz", zstd(&layer)),
        ("b.tar", gzip(&layer)),
        ("c.zst", layer.clone()),
    ] {
        let src = t.path().join(name);
        fs::write(&src, blob).unwrap();
        let dest = t.path().join(format!("dest-{name}"));
        let (lowers, _) = import(&src, &dest, &[]);
        assert_eq!(lowers, vec![dest.canonicalize().unwrap().join(&diff)]);
        assert_eq!(fs::read(dest.join(&diff).join("hello")).unwrap(), b"world");
    }
    // The same layer imported again into one DEST is shared, not redone.
    let src = t.path().join("b.tar");
    let dest = t.path().join("dest-a.tar.gz");
    let (_, out) = import(&src, &dest, &[]);
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("0 new, 1 already there"),
        "{}",
        out.stdout
    );
}

// ===========================================================================
// Import: images
// ===========================================================================

#[test]
fn oci_layout_three_layers_mounts_like_the_layers_say() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    let tars = build_layout(&layout);
    let dest = t.path().join("layers");
    let lowerdir_file = t.path().join("lowerdir");
    let (lowers, out) = import(
        &layout,
        &dest,
        &[
            "--tag",
            "v1",
            "--lowerdir-file",
            lowerdir_file.to_str().unwrap(),
        ],
    );
    let ids: Vec<String> = tars.iter().map(|t| Digest::of(t).hex()).collect();
    let want: Vec<PathBuf> = ids
        .iter()
        .rev()
        .map(|h| dest.canonicalize().unwrap().join(h))
        .collect();
    assert_eq!(lowers, want, "topmost first, named by diff_id");
    let file_line = fs::read_to_string(&lowerdir_file).unwrap();
    assert!(out.stdout.contains(file_line.trim()), "{file_line}");

    // History like `docker image history`: newest first, empty layers shown.
    let hist: Vec<&str> = out.stdout.lines().collect();
    let pos = |s: &str| {
        hist.iter()
            .position(|l| l.contains(s))
            .unwrap_or_else(|| panic!("no '{s}' in:\n{}", out.stdout))
    };
    assert!(pos("RUN rm -rf /var/cache") < pos("RUN rm /etc/old.conf"));
    assert!(pos("RUN rm /etc/old.conf") < pos("CMD"));
    assert!(hist[pos("CMD")].contains("<empty>"));
    assert!(hist[pos("RUN rm -rf /var/cache")].contains(&ids[2][..12]));
    assert!(hist[pos("ADD file:base")].contains(&ids[0][..12]));

    let view = mounted_views(&lowers);
    let has = |p: &str| entry(&view, p).is_some();
    assert!(!has("etc/old.conf"), "whited out by the middle layer");
    assert!(has("etc/new.conf") && has("home/user/.profile") && has("run/fifo"));
    assert!(
        !has("var/cache/a") && !has("var/cache/b") && has("var/cache/c"),
        "opaque"
    );
    assert!(!has("usr/bin/tool-alias") && has("usr/bin/tool"));
    let e = entry(&view, "etc/os-release").unwrap();
    assert_eq!(
        e.content,
        Some(common::ContentSummary::Bytes(
            b"ID=test\nVERSION=2\n".to_vec()
        ))
    );
    let ping = entry(&view, "usr/bin/ping").unwrap();
    assert_eq!(ping.mode, 0o4755);
    let xattrs = ping.xattrs.as_ref().unwrap();
    assert_eq!(
        xattrs.get(&b"security.capability"[..]),
        Some(&Ok(capability()))
    );
    assert_eq!(entry(&view, "tmp").unwrap().mode, 0o1777);
    assert_eq!(entry(&view, "home/user").unwrap().uid, 1000);

    // A second image on the same base shares its directory.
    let (base_lowers, out) = import(&layout, &dest, &["--tag", "base"]);
    assert_eq!(base_lowers, vec![want[2].clone()]);
    assert!(
        out.stdout.contains("0 new, 1 already there"),
        "{}",
        out.stdout
    );
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 3);

    // Several images and no --tag: a clear refusal naming the tags.
    let out = layerfs([
        "import".as_ref(),
        layout.as_os_str(),
        t.path().join("x").as_os_str(),
    ]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("--tag") && out.stderr.contains("'v1'"),
        "{}",
        out.stderr
    );
    let out = layerfs([
        "import".as_ref(),
        layout.as_os_str(),
        t.path().join("x").as_os_str(),
        "--tag".as_ref(),
        "nope".as_ref(),
    ]);
    assert!(
        !out.ok && out.stderr.contains("no image tagged 'nope'"),
        "{}",
        out.stderr
    );
}

#[test]
fn nested_index_is_chosen_by_platform() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    let amd = tar_bytes(&[file("arch", "amd64")]);
    let arm = tar_bytes(&[file("arch", "arm64")]);
    let mut e_amd = oci_image(&layout, &[layer_blob(&amd, "gzip")], json!([]), "x");
    let mut e_arm = oci_image(&layout, &[layer_blob(&arm, "gzip")], json!([]), "x");
    e_arm["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    e_amd.as_object_mut().unwrap().remove("annotations");
    e_arm.as_object_mut().unwrap().remove("annotations");
    let nested = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [e_arm, e_amd]});
    let (d, s) = put_blob(&layout, &serde_json::to_vec(&nested).unwrap());
    write_index(
        &layout,
        vec![
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s,
                    "annotations": {"org.opencontainers.image.ref.name": "multi"}}),
        ],
    );
    let dest = t.path().join("d");
    let (l, _) = import(&layout, &dest, &["--platform", "linux/arm64"]);
    assert_eq!(fs::read(l[0].join("arch")).unwrap(), b"arm64");
    let (l, _) = import(
        &layout,
        &dest,
        &["--platform", "linux/amd64", "--tag", "multi"],
    );
    assert_eq!(fs::read(l[0].join("arch")).unwrap(), b"amd64");
    let out = layerfs([
        "import".as_ref(),
        layout.as_os_str(),
        dest.as_os_str(),
        "--platform".as_ref(),
        "linux/s390x".as_ref(),
    ]);
    assert!(
        !out.ok && out.stderr.contains("linux/s390x"),
        "{}",
        out.stderr
    );
}

/// A tar archive from (name, bytes) files and (name, target) symlinks.
fn archive(files: &[(&str, Vec<u8>)], links: &[(&str, &str)]) -> Vec<u8> {
    let mut entries: Vec<E> = files.iter().map(|(n, d)| file(n, d)).collect();
    entries.extend(links.iter().map(|(n, t)| symlink(n, t)));
    tar_bytes(&entries)
}

#[test]
fn docker_save_archives_both_forms() {
    let t = tmpdir();
    let tars = three_layers();
    let ids: Vec<String> = tars.iter().map(|t| Digest::of(t).to_string()).collect();
    let config = serde_json::to_vec(&json!({
        "rootfs": {"type": "layers", "diff_ids": ids},
        "history": history3(),
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());

    // Legacy: <id>/layer.tar (one of them a symlink to another's, as docker
    // writes for a layer that appears twice), config named by its digest.
    let manifest = json!([{"Config": config_name, "RepoTags": ["app:v1"],
                           "Layers": ["l0/layer.tar", "l1/layer.tar", "l2/layer.tar"]}]);
    let legacy = archive(
        &[
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            (&config_name, config.clone()),
            ("l0/layer.tar", tars[0].clone()),
            ("lx/layer.tar", tars[1].clone()),
            ("l2/layer.tar", tars[2].clone()),
        ],
        &[("l1/layer.tar", "../lx/layer.tar")],
    );
    // Newer: blobs/sha256/<digest>, plus an OCI index beside manifest.json.
    let blob = |d: &[u8]| format!("blobs/sha256/{}", Digest::of(d).hex());
    let manifest = json!([{"Config": blob(&config), "RepoTags": ["app:v1", "app:latest"],
                           "Layers": tars.iter().map(|t| blob(t)).collect::<Vec<_>>()}]);
    let newer = archive(
        &[
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            (&blob(&config), config.clone()),
            (&blob(&tars[0]), tars[0].clone()),
            (&blob(&tars[1]), tars[1].clone()),
            (&blob(&tars[2]), tars[2].clone()),
        ],
        &[],
    );
    let dest = t.path().join("dest");
    let mut results = Vec::new();
    for (name, bytes) in [("legacy.tar", legacy), ("newer.tar", newer)] {
        let p = t.path().join(name);
        fs::write(&p, bytes).unwrap();
        let (lowers, out) = import(&p, &dest, &["--tag", "v1"]);
        assert!(out.stdout.contains("app:v1"), "{}", out.stdout);
        results.push(lowers);
    }
    // An unpacked `docker save` directory works too.
    let unpacked = t.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(t.path().join("legacy.tar"))
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let (from_dir, _) = import(&unpacked, &dest, &[]);
    assert_eq!(from_dir, results[0]);
    assert_eq!(results[0], results[1], "same layers, same directories");
    // Compressed archives (`docker save | gzip`) too.
    for (name, blob) in [
        (
            "legacy.tar.zst",
            zstd(&fs::read(t.path().join("legacy.tar")).unwrap()),
        ),
        (
            "newer.tar.gz",
            gzip(&fs::read(t.path().join("newer.tar")).unwrap()),
        ),
    ] {
        let p = t.path().join(name);
        fs::write(&p, blob).unwrap();
        let (lowers, _) = import(&p, &dest, &["--tag", "v1"]);
        assert_eq!(lowers, results[0], "{name}");
    }
    assert_eq!(results[0].len(), 3);
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 3);
    assert!(is_whiteout(&results[0][1].join("etc/old.conf")));
}

// ===========================================================================
// Refusals: hostile tars, bad digests
// ===========================================================================

/// A directory with a canary file beside DEST; everything in it must be
/// unchanged after a refused import, and DEST empty.
struct Arena {
    t: tempfile::TempDir,
}

impl Arena {
    fn new() -> Arena {
        let t = tmpdir();
        fs::create_dir(t.path().join("outside")).unwrap();
        fs::write(t.path().join("outside/canary"), "canary").unwrap();
        fs::create_dir(t.path().join("dest")).unwrap();
        Arena { t }
    }
    fn root(&self) -> &Path {
        self.t.path()
    }
    fn dest(&self) -> PathBuf {
        self.t.path().join("dest")
    }
    fn listing(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = walkdir(self.root());
        v.sort();
        v
    }
    /// Imports `blob`, expects a refusal mentioning each of `words`.
    fn refuse(&self, what: &str, blob: &[u8], words: &[&str]) {
        let src = self.root().join("in.tar");
        fs::write(&src, blob).unwrap();
        let before = self.listing();
        let out = layerfs(["import".as_ref(), src.as_os_str(), self.dest().as_os_str()]);
        assert!(!out.ok, "{what}: import succeeded:\n{}", out.stdout);
        eprintln!("{what}: {}", out.stderr.trim());
        for w in words {
            assert!(
                out.stderr.contains(w),
                "{what}: '{w}' not in: {}",
                out.stderr
            );
        }
        assert_eq!(self.listing(), before, "{what}: files changed");
        assert_eq!(
            fs::read(self.root().join("outside/canary")).unwrap(),
            b"canary"
        );
        assert_eq!(
            fs::read_dir(self.dest()).unwrap().count(),
            0,
            "{what}: leftovers in DEST"
        );
    }
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(walkdir(&e.path()));
        }
    }
    out
}

#[test]
fn hostile_tars_are_refused_naming_the_entry() {
    let a = Arena::new();
    let outside = a.root().join("outside");
    let o = outside.to_str().unwrap();
    let ok = file("fine", "ok");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "dotdot",
            tar_bytes(&[ok.clone(), file("../outside/evil", "x")]),
            vec!["'../outside/evil'", ".."],
        ),
        (
            "deep dotdot",
            tar_bytes(&[file("a/b/../../../x", "x")]),
            vec!["'a/b/../../../x'"],
        ),
        (
            "absolute",
            tar_bytes(&[file(format!("{o}/evil"), "x")]),
            vec!["absolute"],
        ),
        (
            "through a symlink",
            tar_bytes(&[symlink("s", o), file("s/evil", "x")]),
            vec!["'s/evil'", "symlink"],
        ),
        (
            "through a relative symlink",
            tar_bytes(&[
                dir("d"),
                symlink("d/up", "../.."),
                file("d/up/outside/evil", "x"),
            ]),
            vec!["'d/up/outside/evil'", "symlink"],
        ),
        (
            "hard link outside",
            tar_bytes(&[hardlink("l", "../outside/canary")]),
            vec!["'l'", "hard link"],
        ),
        (
            "hard link through a symlink",
            tar_bytes(&[symlink("s", o), hardlink("l", "s/canary")]),
            vec!["'l'", "symlink"],
        ),
        (
            "hard link to a missing target",
            tar_bytes(&[hardlink("l", "nothere")]),
            vec!["'l'", "does not exist"],
        ),
        (
            "whiteout of nothing",
            tar_bytes(&[file("d/.wh.", "")]),
            vec!["'d/.wh.'", "invalid whiteout"],
        ),
        (
            "whiteout of .",
            tar_bytes(&[file(".wh..", "")]),
            vec!["'.wh..'"],
        ),
        (
            "whiteout of ..",
            tar_bytes(&[file("x/.wh...", "")]),
            vec!["'x/.wh...'"],
        ),
        (
            "entry inside a marker",
            tar_bytes(&[file(".wh.d/x", "")]),
            vec!["'.wh.d/x'", "marker"],
        ),
    ];
    for (what, blob, words) in cases {
        a.refuse(what, &blob, &words);
    }

    // Huge extension headers are refused before being read.
    let mut huge = tar_bytes(std::slice::from_ref(&ok));
    huge.truncate(huge.len() - 1024);
    let mut x = raw_header(b"PaxHeaders/x", tar::EntryType::XHeader, 1 << 40);
    x.set_cksum();
    huge.extend_from_slice(x.as_bytes());
    a.refuse(
        "huge PAX header",
        &huge,
        &["PAX header", "exceeds the limit", "'fine'"],
    );
    let mut long = tar_bytes(std::slice::from_ref(&ok));
    long.truncate(long.len() - 1024);
    let mut x = raw_header(b"././@LongLink", tar::EntryType::GNULongName, 10 << 20);
    x.set_cksum();
    long.extend_from_slice(x.as_bytes());
    long.extend_from_slice(&vec![b'a'; 10 << 20]);
    a.refuse(
        "huge GNU long name",
        &long,
        &["GNU long name", "exceeds the limit"],
    );

    // Corrupt and truncated streams.
    let big = tar_bytes(&[
        file("big", common::pattern_bytes(200_000, 1)),
        file("after", "x"),
    ]);
    let gz = gzip(&big);
    a.refuse("truncated gzip", &gz[..gz.len() / 2], &["'big'"]);
    let mut bad_crc = gz.clone();
    let n = bad_crc.len();
    bad_crc[n - 6] ^= 0xff; // the gzip trailer's CRC
    a.refuse("gzip with a bad CRC", &bad_crc, &["corrupt"]);
    a.refuse("truncated tar", &big[..100_000], &["'big'", "truncated"]);
    let mut bad_sum = big.clone();
    bad_sum[0] = b'X';
    a.refuse("bad header checksum", &bad_sum, &["checksum"]);
}

#[test]
fn device_nodes_are_refused_when_not_root() {
    let a = Arena::new();
    for p in [a.root(), &a.dest()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let src = a.root().join("in.tar");
    fs::write(
        &src,
        tar_bytes(&[ent(tar::EntryType::Char, "dev/mem").dev(1, 1)]),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::layerfs_bin(),
            "import",
        ])
        .arg(&src)
        .arg(a.dest())
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("'dev/mem'") && stderr.contains("root"),
        "{stderr}"
    );
    assert_eq!(fs::read_dir(a.dest()).unwrap().count(), 0);
}

#[test]
fn digest_mismatches_leave_nothing_behind() {
    let t = tmpdir();
    let tars = three_layers();
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), "mine").unwrap();

    // The top layer's blob does not match its digest.
    let layout = t.path().join("bad-blob");
    let blobs: Vec<LayerBlob> = tars.iter().map(|t| layer_blob(t, "gzip")).collect();
    let e = oci_image(&layout, &blobs, history3(), "v1");
    write_index(&layout, vec![e]);
    let victim = layout
        .join("blobs/sha256")
        .join(Digest::of(&blobs[2].blob).hex());
    fs::write(&victim, gzip(&tar_bytes(&[file("evil", "x")]))).unwrap();
    let out = layerfs(["import".as_ref(), layout.as_os_str(), dest.as_os_str()]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("layer 3 of 3")
            && out.stderr.contains("digest mismatch")
            && out.stderr.contains(&Digest::of(&blobs[2].blob).hex()),
        "{}",
        out.stderr
    );
    assert_eq!(
        walkdir(&dest),
        vec![dest.join("keep")],
        "the two good layers are not kept either"
    );

    // The config's diff_id is wrong for the middle layer.
    let layout = t.path().join("bad-diff");
    let mut blobs: Vec<LayerBlob> = tars.iter().map(|t| layer_blob(t, "zstd")).collect();
    blobs[1].diff_id = Digest::of(b"something else").to_string();
    let e = oci_image(&layout, &blobs, history3(), "v1");
    write_index(&layout, vec![e]);
    let out = layerfs(["import".as_ref(), layout.as_os_str(), dest.as_os_str()]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("layer 2 of 3") && out.stderr.contains("diff_id mismatch"),
        "{}",
        out.stderr
    );
    assert_eq!(walkdir(&dest), vec![dest.join("keep")]);

    // A tampered manifest.
    let layout = t.path().join("bad-manifest");
    build_layout(&layout);
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = Digest::parse(index["manifests"][0]["digest"].as_str().unwrap()).unwrap();
    let mpath = layout.join("blobs/sha256").join(d.hex());
    let mut m = fs::read(&mpath).unwrap();
    m.push(b' ');
    fs::write(&mpath, m).unwrap();
    let out = layerfs([
        "import".as_ref(),
        layout.as_os_str(),
        dest.as_os_str(),
        "--tag".as_ref(),
        "v1".as_ref(),
    ]);
    assert!(
        !out.ok && out.stderr.contains("digest mismatch"),
        "{}",
        out.stderr
    );
    assert_eq!(walkdir(&dest), vec![dest.join("keep")]);
}

// ===========================================================================
// Export
// ===========================================================================

fn export(args: &[&OsStr]) -> Out {
    let mut v: Vec<&OsStr> = vec!["export".as_ref()];
    v.extend_from_slice(args);
    let out = layerfs(v);
    assert!(out.ok, "export failed:\n{}{}", out.stdout, out.stderr);
    out
}

fn sh(script: &str, dir: &Path) {
    let st = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "script failed: {script}");
}

/// Changes of every kind, made through a mount.
const CHANGES: &str = r#"
echo changed > etc/os-release
rm etc/new.conf
rm -rf var/cache && mkdir var/cache && echo fresh > var/cache/d
rm -rf home
mkdir -p new/deeper && echo hi > new/deeper/file && chmod 640 new/deeper/file
chown 1234:5678 new/deeper/file
ln new/deeper/file new/hard
ln -s ../etc/os-release new/sym
mkfifo new/fifo
mknod new/char c 10 200
chmod 4711 usr/bin/tool
setfattr -n user.note -v hello usr/bin/tool
setfattr -n trusted.overlay.mine -v nested usr/bin/tool
setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= new/deeper/file
touch -d '2001-02-03 04:05:06.789' new/deeper
touch -h -d '2002-01-01 00:00:00.5' new/sym
mv etc/os-release etc/renamed
printf 'x%.0s' $(seq 1 300) > "new/$(printf 'n%.0s' $(seq 1 120))"
"#;

/// Compares a view with the reference, ignoring the root's times (the
/// root is never part of a layer).
fn assert_same_view(reference: &Snapshot, got: &Snapshot) {
    let mut got = got.clone();
    let root = reference.entries[&Vec::new()].mtime;
    got.entries.get_mut(&Vec::new()).unwrap().mtime = root;
    let opts = CompareOpts {
        blocks: false,
        ..CompareOpts::default()
    };
    common::assert_same_with(opts, reference, &got);
}

#[test]
fn export_round_trip_through_a_layerfs_mount() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    build_layout(&layout);
    let dest = t.path().join("layers");
    let (lowers, _) = import(&layout, &dest, &["--tag", "v1"]);

    let m = LayerfsMount::new(&lowers, true, Syntax::Subcommand);
    sh(CHANGES, m.path());
    let view = m.snapshot();
    // From the running mount, by its mount point.
    let tarball = t.path().join("changes.tar.zst");
    let out = export(&[m.path().as_os_str(), "-o".as_ref(), tarball.as_os_str()]);
    assert!(out.stdout.contains("diff_id: sha256:"), "{}", out.stdout);
    let digest = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .unwrap()
        .to_string();
    assert_eq!(Digest::of(&fs::read(&tarball).unwrap()).to_string(), digest);
    drop(m);

    let (new, _) = import(&tarball, &dest, &[]);
    let mut stack = new.clone();
    stack.extend(lowers.iter().cloned());
    let again = mounted_views(&stack);
    assert_same_view(&view, &again);
    let tool = entry(&again, "usr/bin/tool").unwrap();
    assert_eq!(
        tool.xattrs
            .as_ref()
            .unwrap()
            .get(&b"trusted.overlay.mine"[..]),
        Some(&Ok(b"nested".to_vec()))
    );
}

#[test]
fn export_round_trip_through_a_kernel_mount() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    build_layout(&layout);
    let dest = t.path().join("layers");
    let (lowers, _) = import(&layout, &dest, &["--tag", "v1"]);

    let k = KernelMount::new(&lowers, true);
    sh(CHANGES, k.path());
    let view = k.snapshot();
    let upper = k.upper().unwrap().to_path_buf();
    let tarball = t.path().join("changes.tar.gz");
    let mut args: Vec<&OsStr> = vec!["--upper".as_ref(), upper.as_os_str()];
    for l in &lowers {
        args.push("--lower".as_ref());
        args.push(l.as_os_str());
    }
    args.extend(["-o".as_ref(), tarball.as_os_str()]);
    export(&args);
    drop(k);
    let (new, _) = import(&tarball, &dest, &[]);
    let mut stack = new.clone();
    stack.extend(lowers.iter().cloned());
    assert_same_view(&view, &mounted_views(&stack));
}

/// The members of a tar: (name, type, mode, size, uid, PAX records).
type Members = Vec<(
    Vec<u8>,
    tar::EntryType,
    u32,
    u64,
    u64,
    BTreeMap<String, Vec<u8>>,
)>;

fn members(tar: &[u8]) -> Members {
    let mut a = tar::Archive::new(tar);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut pax = BTreeMap::new();
        if let Some(p) = e.pax_extensions().unwrap() {
            for r in p {
                let r = r.unwrap();
                pax.insert(r.key().unwrap().to_string(), r.value_bytes().to_vec());
            }
        }
        let h = e.header();
        assert!(h.as_ustar().is_some(), "ustar/PAX headers only");
        out.push((
            e.path_bytes().into_owned(),
            h.entry_type(),
            h.mode().unwrap(),
            h.size().unwrap(),
            h.uid().unwrap(),
            pax,
        ));
    }
    out
}

#[test]
fn export_writes_what_docker_writes_and_is_reproducible() {
    let t = tmpdir();
    let lower = t.path().join("lower");
    common::Layer::new()
        .file("etc/gone", "x")
        .file("etc/keep", "k")
        .file("op/old", "o")
        .build(&lower);
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let k = KernelMount::new(&[lower.clone(), empty], true);
    sh(
        "rm etc/gone; rm -rf op; mkdir op; echo n > op/new; echo h > a; ln a b; \
         setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= a; \
         setfattr -n user.x -v 1 etc/keep; chown 3:4 op",
        k.path(),
    );
    let upper = k.upper().unwrap().to_path_buf();
    let out1 = t.path().join("one.tar");
    let out2 = t.path().join("two.tar");
    export(&[
        "--upper".as_ref(),
        upper.as_os_str(),
        "-o".as_ref(),
        out1.as_os_str(),
    ]);
    // Reading the upper (atime) and another export must not change the bytes.
    sh("cat a etc/keep > /dev/null", &upper);
    export(&[
        "--upper".as_ref(),
        upper.as_os_str(),
        "-o".as_ref(),
        out2.as_os_str(),
    ]);
    let (b1, b2) = (fs::read(&out1).unwrap(), fs::read(&out2).unwrap());
    let digest = format!("digest: {}", Digest::of(&b1));
    let out = export(&[
        "--upper".as_ref(),
        upper.as_os_str(),
        "-o".as_ref(),
        out2.as_os_str(),
    ]);
    assert!(out.stdout.contains(&digest), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("diff_id: {}", Digest::of(&b1))),
        "{}",
        out.stdout
    );
    assert!(b1 == b2, "two exports of the same upper differ");
    for c in ["gz", "zst"] {
        let p1 = t.path().join(format!("1.tar.{c}"));
        let p2 = t.path().join(format!("2.tar.{c}"));
        export(&[
            "--upper".as_ref(),
            upper.as_os_str(),
            "-o".as_ref(),
            p1.as_os_str(),
        ]);
        export(&[
            "--upper".as_ref(),
            upper.as_os_str(),
            "-o".as_ref(),
            p2.as_os_str(),
        ]);
        assert!(
            fs::read(&p1).unwrap() == fs::read(&p2).unwrap(),
            "{c} exports differ"
        );
    }
    drop(k);

    let m = members(&b1);
    let names: Vec<String> = m
        .iter()
        .map(|e| String::from_utf8_lossy(&e.0).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "a",
            "b",
            "etc/",
            "etc/.wh.gone",
            "etc/keep",
            "op/",
            "op/.wh..wh..opq",
            "op/new"
        ],
        "sorted, depth-first, dir entry then its opaque marker"
    );
    let get = |n: &str| m.iter().find(|e| e.0 == n.as_bytes()).unwrap();
    let wh = get("etc/.wh.gone");
    assert_eq!((wh.1, wh.2, wh.3), (tar::EntryType::Regular, 0o600, 0));
    let opq = get("op/.wh..wh..opq");
    assert_eq!((opq.1, opq.3, opq.4), (tar::EntryType::Regular, 0, 3));
    assert_eq!(get("op/").4, 3);
    assert_eq!(get("b").1, tar::EntryType::Link);
    assert!(get("a").5.contains_key("SCHILY.xattr.security.capability"));
    assert_eq!(
        get("etc/keep")
            .5
            .get("SCHILY.xattr.user.x")
            .map(Vec::as_slice),
        Some(&b"1"[..])
    );
    for e in &m {
        assert!(
            !e.5.keys().any(|k| k.contains("trusted.overlay")),
            "private xattr exported on {}",
            String::from_utf8_lossy(&e.0)
        );
    }
}

#[test]
fn export_appends_a_layer_to_an_oci_layout() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    build_layout(&layout);
    let dest = t.path().join("layers");
    let (lowers, _) = import(&layout, &dest, &["--tag", "v1"]);
    let k = KernelMount::new(&lowers, true);
    sh("echo appended > app.txt; rm etc/new.conf", k.path());
    let view = k.snapshot();
    let upper = k.upper().unwrap().to_path_buf();
    let out = export(&[
        "--upper".as_ref(),
        upper.as_os_str(),
        "--oci-layout".as_ref(),
        layout.as_os_str(),
        "--tag".as_ref(),
        "v1".as_ref(),
        "--new-tag".as_ref(),
        "v2".as_ref(),
        "--created-by".as_ref(),
        "test: add app.txt".as_ref(),
    ]);
    assert!(out.stdout.contains("tag: v2"), "{}", out.stdout);
    drop(k);
    // v1 is untouched; v2 has one more layer and a history line for it.
    let (v1, _) = import(&layout, &dest, &["--tag", "v1"]);
    assert_eq!(v1, lowers);
    let (v2, out) = import(&layout, &dest, &["--tag", "v2"]);
    assert_eq!(v2.len(), 4);
    assert_eq!(&v2[1..], &lowers[..]);
    assert!(out.stdout.contains("test: add app.txt"), "{}", out.stdout);
    assert_same_view(&view, &mounted_views(&v2));
    // No stray files in the layout.
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let n = e.unwrap().file_name();
        assert!(
            Digest::from_hex(n.to_str().unwrap()).is_some(),
            "stray {n:?}"
        );
    }
}

#[test]
fn implicit_directories_are_0755_whatever_the_umask() {
    let t = tmpdir();
    let src = t.path().join("l.tar");
    fs::write(&src, tar_bytes(&[file("a/b/f", "x").mode(0o600)])).unwrap();
    let dest = t.path().join("dest");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 077; exec '{}' import -q '{}' '{}'",
            common::layerfs_bin(),
            src.display(),
            dest.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let l = only_layer(&dest);
    for p in [l.clone(), l.join("a"), l.join("a/b")] {
        let mode = fs::metadata(&p).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{}", p.display());
    }
    assert_eq!(
        fs::metadata(l.join("a/b/f")).unwrap().mode() & 0o7777,
        0o600
    );
}

#[test]
fn rootless_import_marks_opaque_dirs_with_user_xattrs() {
    let t = tmpdir();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let src = t.path().join("l.tar");
    fs::write(
        &src,
        tar_bytes(&[
            dir("d").owner(1000, 1000),
            file("d/.wh..wh..opq", ""),
            file("d/f", "x").owner(1000, 1000),
            file(".wh.gone", ""),
        ]),
    )
    .unwrap();
    let dest = t.path().join("dest");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::layerfs_bin(),
            "import",
        ])
        .arg(&src)
        .arg(&dest)
        .arg("--userxattr")
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("keep the importing user as owner"),
        "{stderr}"
    );
    let l = only_layer(&dest);
    assert_eq!(
        lget(&l.join("d"), "user.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert_eq!(fs::metadata(l.join("d/f")).unwrap().uid(), 65534);
    assert!(
        is_whiteout(&l.join("gone")),
        "unprivileged whiteouts (char 0/0)"
    );
}

/// A tree of every kind tar can hold, with odd names and attributes.
fn sample_tree() -> common::Layer {
    let long = format!("deep/{}/{}", "d".repeat(120), "f".repeat(120));
    common::Layer::new()
        .dir("etc")
        .mode(0o755)
        .file("etc/passwd", "root:x:0:0\n")
        .owner(0, 0)
        .file("etc/shadow", "secret")
        .mode(0o640)
        .owner(0, 42)
        .file("bin/su", "su")
        .mode(0o4755)
        .file("bin/ping", "ping")
        .xattr("security.capability", capability())
        .file("bin/tagged", "t")
        .xattr("user.a", "1")
        .xattr("user.b", "\u{0}binary\u{ff}")
        .hardlink("bin/su-again", "bin/su")
        .symlink("lib", "usr/lib")
        .symlink("abs", "/etc/passwd")
        .char_dev("dev/null", 1, 3)
        .block_dev("dev/sda", 8, 0)
        .fifo("run/pipe")
        .dir("tmp")
        .mode(0o1777)
        .dir("srv/g")
        .mode(0o2775)
        .owner(1000, 1000)
        .file("odd/with space", "s")
        .file("odd/new\nline", "n")
        .file(b"odd/\xe9t\xe9", "latin1")
        .file(long, "long")
        .symlink("odd/longtarget", "t".repeat(150))
        .file("big", common::pattern_bytes(300_000, 7))
        .mtime(1_234_567_890, 987_654_321)
}

/// Layers written by GNU tar (gnu and posix formats) unpack exactly as GNU
/// tar itself unpacks them.
#[test]
fn gnu_tar_layers_unpack_like_gnu_tar() {
    let t = tmpdir();
    let src = t.path().join("src");
    sample_tree().build(&src);
    for format in ["gnu", "posix"] {
        let blob = t.path().join(format!("{format}.tar"));
        // Only the posix format can hold xattrs.
        let xattrs: &[&str] = if format == "posix" {
            &["--xattrs", "--xattrs-include=*"]
        } else {
            &[]
        };
        let st = Command::new("tar")
            .args(xattrs)
            .arg("--numeric-owner")
            .arg(format!("--format={format}"))
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&blob)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let reference = t.path().join(format!("ref-{format}"));
        fs::create_dir(&reference).unwrap();
        let st = Command::new("tar")
            .args(xattrs)
            .args(["--numeric-owner", "-xpf"])
            .arg(&blob)
            .arg("-C")
            .arg(&reference)
            .status()
            .unwrap();
        assert!(st.success());
        let dest = t.path().join(format!("dest-{format}"));
        let (lowers, _) = import(&blob, &dest, &[]);
        let opts = CompareOpts {
            blocks: false,
            ..CompareOpts::raw_dirs()
        };
        let want = common::snapshot(&format!("tar -x ({format})"), &reference);
        let got = common::snapshot(&format!("layerfs import ({format})"), &lowers[0]);
        common::assert_same_with(opts, &want, &got);
        if format == "posix" {
            let big = &got.entries[&b"big"[..]];
            assert_eq!(big.mtime, (1_234_567_890, 987_654_321), "sub-second mtimes");
        }
    }
}

/// What export writes, GNU tar reads back into the same tree (names,
/// types, modes, owners, contents, xattrs, sub-second mtimes, hard links).
#[test]
fn exported_layers_read_back_with_gnu_tar() {
    let t = tmpdir();
    let src = t.path().join("src");
    sample_tree().build(&src);
    let blob = t.path().join("out.tar");
    export(&[
        "--upper".as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        blob.as_os_str(),
    ]);
    let back = t.path().join("back");
    fs::create_dir(&back).unwrap();
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&blob)
        .arg("-C")
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    let want = common::snapshot("source", &src);
    let mut got = common::snapshot("tar -x of the export", &back);
    // The root is not part of a layer.
    let root = &want.entries[&Vec::new()];
    let r = got.entries.get_mut(&Vec::new()).unwrap();
    (r.mtime, r.mode) = (root.mtime, root.mode);
    let opts = CompareOpts {
        blocks: false,
        ..CompareOpts::raw_dirs()
    };
    common::assert_same_with(opts, &want, &got);
}

/// A layer that comes back after another one gets its own copy (a
/// directory can be given only once in a lowerdir); one repeated right away
/// is applied once.
#[test]
fn repeated_layers() {
    let t = tmpdir();
    let a = tar_bytes(&[file("f", "from a")]);
    let b = tar_bytes(&[file("f", "from b"), file("g", "b")]);
    let layout = t.path().join("layout");
    let blobs = |tars: &[&Vec<u8>]| -> Vec<LayerBlob> {
        tars.iter().map(|t| layer_blob(t, "gzip")).collect()
    };
    let aba = oci_image(&layout, &blobs(&[&a, &b, &a]), json!([]), "aba");
    let aab = oci_image(&layout, &blobs(&[&a, &a, &b]), json!([]), "aab");
    write_index(&layout, vec![aba, aab]);
    let dest = t.path().join("dest");
    let (l, _) = import(&layout, &dest, &["--tag", "aba"]);
    let (ha, hb) = (Digest::of(&a).hex(), Digest::of(&b).hex());
    let names: Vec<String> = l
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [format!("{ha}.1"), hb.clone(), ha.clone()]);
    let view = mounted_views(&l);
    assert_eq!(
        entry(&view, "f").unwrap().content,
        Some(common::ContentSummary::Bytes(b"from a".to_vec()))
    );
    let (l, _) = import(&layout, &dest, &["--tag", "aab"]);
    let names: Vec<String> = l
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [hb, ha]);
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        common::unmount(&self.0);
    }
}

/// An upper written by the kernel with `redirect_dir=on,metacopy=on` holds
/// renamed directories and data-less copy-ups; with the lowers given, the
/// export still reproduces the merged view.
#[test]
fn export_of_renamed_directories_and_metacopy_copy_ups() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    build_layout(&layout);
    let dest = t.path().join("layers");
    let (lowers, _) = import(&layout, &dest, &["--tag", "v1"]);
    let (upper, work, mnt) = (t.path().join("u"), t.path().join("w"), t.path().join("m"));
    for d in [&upper, &work, &mnt] {
        fs::create_dir(d).unwrap();
    }
    let lowerdir: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=on,metacopy=on",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount {opts}");
    let m = Mounted(mnt.clone());
    sh(
        "mv usr/bin usr/tools && echo new > usr/tools/added
         mkdir -p opt && mv var/cache opt/cache2
         chmod 600 etc/os-release && chown 7:7 usr/tools/tool",
        &mnt,
    );
    let view = common::snapshot("kernel rw", &mnt);
    drop(m);
    let redirect = lget(&upper.join("usr/tools"), "trusted.overlay.redirect");
    assert!(redirect.is_some(), "the kernel wrote a redirect");
    let metacopy = lget(&upper.join("etc/os-release"), "trusted.overlay.metacopy");
    assert!(metacopy.is_some(), "the kernel wrote a metacopy");

    let tarball = t.path().join("out.tar");
    let out = layerfs([
        "export".as_ref(),
        "--upper".as_ref(),
        upper.as_os_str(),
        "-o".as_ref(),
        tarball.as_os_str(),
    ]);
    assert!(!out.ok && out.stderr.contains("--lower"), "{}", out.stderr);
    let mut args: Vec<&OsStr> = vec!["--upper".as_ref(), upper.as_os_str()];
    for l in &lowers {
        args.extend(["--lower".as_ref(), l.as_os_str()]);
    }
    args.extend(["-o".as_ref(), tarball.as_os_str()]);
    export(&args);
    let (new, _) = import(&tarball, &dest, &[]);
    let mut stack = new.clone();
    stack.extend(lowers.iter().cloned());
    assert_same_view(&view, &mounted_views(&stack));
}

/// Two images on the same base share its directory, mount at the same time,
/// and each mount's changes stay in its own upper.
#[test]
fn images_sharing_a_base_mount_side_by_side() {
    let t = tmpdir();
    let layout = t.path().join("layout");
    build_layout(&layout);
    let dest = t.path().join("layers");
    let (app, _) = import(&layout, &dest, &["--tag", "v1"]);
    let (base, _) = import(&layout, &dest, &["--tag", "base"]);
    assert_eq!(
        app.last(),
        base.last(),
        "the base layer directory is shared"
    );
    let before = common::snapshot("base layer", &base[0]);
    let m1 = LayerfsMount::new(&app, true, Syntax::Subcommand);
    let m2 = LayerfsMount::new(&base, true, Syntax::Subcommand);
    fs::write(m1.path().join("etc/os-release"), "app\n").unwrap();
    fs::write(m2.path().join("etc/os-release"), "base\n").unwrap();
    fs::remove_file(m2.path().join("etc/old.conf")).unwrap();
    assert_eq!(
        fs::read(m1.path().join("etc/os-release")).unwrap(),
        b"app\n"
    );
    assert_eq!(
        fs::read(m2.path().join("etc/os-release")).unwrap(),
        b"base\n"
    );
    assert!(
        !m1.path().join("etc/old.conf").exists(),
        "whited out in the app image"
    );
    assert!(
        !m2.path().join("etc/old.conf").exists(),
        "deleted in the base container"
    );
    assert_eq!(
        fs::read(m1.upper().unwrap().join("etc/os-release")).unwrap(),
        b"app\n"
    );
    assert!(is_whiteout(&m2.upper().unwrap().join("etc/old.conf")));
    assert!(!m1.upper().unwrap().join("etc/old.conf").exists());
    drop((m1, m2));
    let after = common::snapshot("base layer", &base[0]);
    common::assert_same_with(CompareOpts::raw_dirs(), &before, &after);
}
