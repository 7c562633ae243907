//! Writes the seed corpora under `fuzz/corpus/<target>/`:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! Seeds are named `seed-*`; files the fuzzer adds keep their hash names.

use std::io::Write;
use std::path::{Path, PathBuf};

fn out(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

// ---------------------------------------------------------------------------
// mount_options

const OPTION_SEEDS: &[(&str, &[u8])] = &[
    ("basic", b"lowerdir=/l1:/l2,upperdir=/u,workdir=/w"),
    ("escapes", br#"lowerdir=/a\:b:/c\,d::/e\\f,upperdir=/u\,x,workdir=/w\"#),
    ("quoted", br#"context="system_u:object_r:x,y",lowerdir=/l,ro"#),
    ("flags", b"ro,rw,userxattr,volatile,fsync=0,fsync=1,allow_other,allow_root,noacl,nodev,nosuid,noexec,noatime,default_permissions,fast_ino,nonempty"),
    ("threads", b"threads=8,threaded=0,threads=99999999999999999999,timeout=1.5,timeout=nan,timeout=-1,timeout=1e300"),
    ("idmap", b"uidmapping=0:1000:1:1:100000:65536,gidmapping=0,1000,1,squash_to_root,squash_to_uid=7,squash_to_gid=8,static_nlink"),
    ("idmap-edge", b"uidmapping=0:4294967295:2,gidmapping=4294967295:0:1"),
    ("passthrough", b"passthrough=off,passthrough=on,nopassthrough,passthrough=0"),
    ("bad", b"threads=x,squash_to_uid=-1,uidmapping=1:2,=,==,,,\\"),
    ("nonutf8", b"lowerdir=/\xff\xfe:/\xc3\xa9,upperdir=\xff,bogus\xff=1"),
];

// ---------------------------------------------------------------------------
// layer_import

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h
    }

    fn dir(mut self, name: &str) -> Tar {
        let mut h = Self::header(tar::EntryType::Directory, 0o755);
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    fn file(mut self, name: &str, data: &[u8]) -> Tar {
        let mut h = Self::header(tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Tar {
        let mut h = Self::header(kind, 0o777);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    fn node(mut self, kind: tar::EntryType, name: &str, major: u32, minor: u32) -> Tar {
        let mut h = Self::header(kind, 0o644);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    fn pax(mut self, kv: &[(&str, &[u8])]) -> Tar {
        self.0.append_pax_extensions(kv.iter().copied()).unwrap();
        self
    }

    /// A raw 512-byte ustar header with `name` as is (the tar crate refuses
    /// `..` and absolute names).
    fn raw(mut self, name: &[u8], kind: u8, link: &[u8]) -> Tar {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.as_mut_bytes()[156] = kind;
        h.set_cksum();
        self.0.get_mut().extend_from_slice(h.as_bytes());
        self
    }

    fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 19).unwrap()
}

fn import_seeds() {
    use tar::EntryType::*;
    let simple = Tar::new()
        .dir("./")
        .dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .link(Symlink, "etc/link", "hosts")
        .link(Link, "etc/hard", "etc/hosts")
        .file("etc/.wh.gone", b"")
        .dir("var/")
        .file("var/.wh..wh..opq", b"")
        .file("var/new", b"new")
        .done();
    out("layer_import", "simple.tar", &simple);
    out("layer_import", "simple.tar.gz", &gzip(&simple));
    out("layer_import", "simple.tar.zst", &zstd(&simple));

    let xattrs = Tar::new()
        .pax(&[
            ("SCHILY.xattr.user.comment", b"hello"),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            (
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
            ("mtime", b"1600000000.123456789"),
            ("uid", b"1000"),
            ("gname", b"staff"),
        ])
        .file("bin/ping", b"\x7fELF")
        .pax(&[
            ("path", "long/".repeat(60).as_bytes()),
            ("linkpath", b"../x"),
        ])
        .link(Symlink, "placeholder", "y")
        .done();
    out("layer_import", "pax-xattrs.tar", &xattrs);

    let nodes = Tar::new()
        .node(Char, "dev/null", 1, 3)
        .node(Block, "dev/loop0", 7, 0)
        .node(Fifo, "run/fifo", 0, 0)
        .node(Char, "wh", 0, 0)
        .done();
    out("layer_import", "nodes.tar", &nodes);

    // Escapes the importer must refuse or contain, one per tar (the first
    // refused entry ends an import). The relative targets point from the
    // staging layer dir at the canary next to DEST, the absolute one at the
    // fuzz target's sentinel tree.
    let escapes: Vec<(&str, Tar)> = vec![
        (
            "up",
            Tar::new()
                .dir("d/")
                .link(Symlink, "d/up", "../../../..")
                .file("d/up/canary", b"overwritten"),
        ),
        (
            "abs",
            Tar::new()
                .link(Symlink, "abs", "/tmp/layerfs-fuzz-sentinel")
                .file("abs/file", b"overwritten"),
        ),
        (
            "hardlink-through",
            Tar::new()
                .link(Symlink, "abs", "/tmp/layerfs-fuzz-sentinel")
                .link(Link, "hard", "abs/file"),
        ),
        (
            "hardlink-symlink",
            Tar::new()
                .link(Symlink, "c", "../../../canary")
                .link(Link, "hl", "c")
                .file("hl", b"written through a link?"),
        ),
        (
            "replace-parent",
            Tar::new()
                .dir("p/")
                .file("p/f", b"x")
                .link(Symlink, "p", "../../..")
                .file("p/canary", b"overwritten"),
        ),
        (
            "wh-through",
            Tar::new()
                .link(Symlink, "s", "../../../outside")
                .file("s/.wh.keep", b""),
        ),
        (
            "opq-through",
            Tar::new()
                .link(Symlink, "s", "/tmp/layerfs-fuzz-sentinel")
                .file("s/.wh..wh..opq", b""),
        ),
    ];
    for (name, t) in escapes {
        out("layer_import", &format!("escape-{name}.tar"), &t.done());
    }
    let raw: [(&str, &[u8], u8, &[u8]); 8] = [
        ("dotdot", b"../outside", b'0', b""),
        ("abs", b"/abs/file", b'0', b""),
        ("inner-dotdot", b"a/../../x", b'0', b""),
        ("opq-parent", b".wh..wh..opq/x", b'0', b""),
        ("empty-wh", b".wh.", b'0', b""),
        ("plnk", b"a/.wh..wh.plnk/1", b'0', b""),
        ("hardlink-up", b"h", b'1', b"../../../canary"),
        ("empty-symlink", b"s", b'2', b""),
    ];
    for (name, path, kind, link) in raw {
        out(
            "layer_import",
            &format!("bad-{name}.tar"),
            &Tar::new().raw(path, kind, link).done(),
        );
    }

    // Later entries replace earlier ones; a dir replaces a file and back.
    let replace = Tar::new()
        .file("x", b"file first")
        .dir("x/")
        .file("x/y", b"then a dir")
        .file("x", b"a file again")
        .dir("x/")
        .link(Symlink, "x/y", "/")
        .file(".wh.x", b"")
        .done();
    out("layer_import", "replace.tar", &replace);

    // A `docker save` archive holding the simple layer.
    let diff_id = layerfs::oci::digest::Digest::of(&simple);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}},"history":[{{"created_by":"seed"}}]}}"#,
        diff_id.hex()
    );
    let config_name = format!(
        "{}.json",
        layerfs::oci::digest::Digest::of(config.as_bytes()).hex()
    );
    let manifest = format!(
        r#"[{{"Config":"{config_name}","RepoTags":["fuzz:latest"],"Layers":["l1/layer.tar"]}}]"#
    );
    let save = Tar::new()
        .file("manifest.json", manifest.as_bytes())
        .file(&config_name, config.as_bytes())
        .dir("l1/")
        .file("l1/layer.tar", &simple)
        .done();
    out("layer_import", "docker-save.tar", &save);
    out("layer_import", "docker-save.tar.gz", &gzip(&save));

    // An OCI layout holding the simple layer, gzip-compressed.
    let blob = gzip(&simple);
    let d = |b: &[u8]| layerfs::oci::digest::Digest::of(b).hex();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{}}}]}}"#,
        d(config.as_bytes()),
        config.len(),
        d(&blob),
        blob.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
        d(manifest.as_bytes()),
        manifest.len()
    );
    let oci = Tar::new()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("index.json", index.as_bytes())
        .file(
            &format!("blobs/sha256/{}", d(manifest.as_bytes())),
            manifest.as_bytes(),
        )
        .file(
            &format!("blobs/sha256/{}", d(config.as_bytes())),
            config.as_bytes(),
        )
        .file(&format!("blobs/sha256/{}", d(&blob)), &blob)
        .done();
    out("layer_import", "oci-layout.tar", &oci);

    out("layer_import", "empty", b"");
    out("layer_import", "zeros", &[0u8; 1024]);
}

// ---------------------------------------------------------------------------
// diff_reader (see fuzz_targets/diff_reader.rs for the program format)

const UP: u8 = 0;
const L1: u8 = 1;
const L2: u8 = 2;
// Names of the alphabet.
const A: u8 = 0;
const B: u8 = 1;
const C: u8 = 2;
const D: u8 = 3;
const E: u8 = 4;
const WH_A: u8 = 8;
const OPQ: u8 = 10;
const NL: u8 = 13;
const NAME_MAX: u8 = 15;

/// One operation: layer, kind, path (names), extra argument bytes.
fn op(layer: u8, kind: u8, path: &[u8], args: &[u8]) -> Vec<u8> {
    let mut v = vec![layer << 4 | kind, path.len() as u8 - 1];
    v.extend_from_slice(path);
    v.extend_from_slice(args);
    v
}

fn prog(flags: u8, ops: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![flags];
    for o in ops {
        v.extend_from_slice(o);
    }
    v
}

fn diff_seeds() {
    let (mkdir, file, symlink, whiteout, opaque, oci_wh, oci_opq, redirect) =
        (0, 1, 2, 3, 4, 5, 6, 7);
    let (hardlink, xwhiteout, attrs, device, cap, copy, remove, other) =
        (8, 9, 10, 11, 12, 13, 14, 15);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "add-change",
            prog(
                0,
                &[
                    op(L1, mkdir, &[A], &[]),
                    op(L1, file, &[A, B], &[3]),
                    op(UP, mkdir, &[A], &[]),
                    op(UP, file, &[A, C], &[1]),
                    op(L1, file, &[D], &[2]),
                    op(L1, copy, &[D], &[UP]),
                    op(L1, file, &[E], &[2]),
                    op(L1, copy, &[E], &[UP]),
                    op(UP, attrs, &[E], &[2 | 4]),
                ],
            ),
        ),
        (
            "whiteouts",
            prog(
                0,
                &[
                    op(L1, file, &[B], &[1]),
                    op(L1, mkdir, &[A, B], &[]),
                    op(UP, whiteout, &[B], &[]),
                    op(UP, whiteout, &[A, B], &[]),
                    op(UP, whiteout, &[C], &[]),
                    op(UP, device, &[D], &[1]),
                ],
            ),
        ),
        (
            "opaque",
            prog(
                0,
                &[
                    op(L1, file, &[A, B], &[1]),
                    op(L1, file, &[A, C], &[1]),
                    op(UP, mkdir, &[A], &[]),
                    op(UP, opaque, &[A], &[0]),
                    op(UP, file, &[A, C], &[1]),
                ],
            ),
        ),
        (
            "xattr-whiteouts",
            prog(
                0,
                &[
                    op(L1, file, &[A, B], &[1]),
                    op(L1, file, &[A, C], &[1]),
                    op(UP, mkdir, &[A], &[]),
                    op(UP, opaque, &[A], &[1]),
                    op(UP, xwhiteout, &[A, B], &[]),
                ],
            ),
        ),
        (
            "redirect",
            prog(
                0,
                &[
                    op(L1, file, &[A, B], &[1]),
                    op(L1, mkdir, &[A, C, D], &[]),
                    op(UP, mkdir, &[E], &[]),
                    op(UP, redirect, &[E], &[0, 0, A]),
                    op(UP, whiteout, &[A], &[]),
                    op(UP, mkdir, &[C], &[]),
                    op(UP, redirect, &[C], &[1, D]),
                ],
            ),
        ),
        (
            "bad-redirect",
            prog(
                0,
                &[
                    op(L1, file, &[A, B], &[1]),
                    op(UP, mkdir, &[D, D], &[]),
                    op(UP, redirect, &[D, D], &[2, 5, b'/', b'a', b'/', b'.', b'.']),
                ],
            ),
        ),
        (
            "name-max",
            prog(
                0,
                &[op(L1, file, &[A], &[1]), op(UP, file, &[NAME_MAX], &[1])],
            ),
        ),
        (
            "two-lowers-oci",
            prog(
                1,
                &[
                    op(L2, file, &[A], &[1]),
                    op(L2, file, &[B, C], &[1]),
                    op(L2, file, &[B, D], &[1]),
                    op(L1, oci_wh, &[A], &[]),
                    op(L1, mkdir, &[B], &[]),
                    op(L1, oci_opq, &[B], &[]),
                    op(L1, file, &[B, E], &[1]),
                    op(UP, file, &[A], &[1]),
                    op(UP, file, &[B, D], &[1]),
                    op(UP, file, &[WH_A], &[0]),
                    op(UP, oci_opq, &[B], &[]),
                ],
            ),
        ),
        (
            "two-lowers-redirect",
            prog(
                1,
                &[
                    op(L2, file, &[A, B, C], &[1]),
                    op(L1, mkdir, &[D], &[]),
                    op(L1, redirect, &[D], &[0, 1, A, B]),
                    op(L1, whiteout, &[A], &[]),
                    op(UP, mkdir, &[E], &[]),
                    op(UP, redirect, &[E], &[1, D]),
                    op(UP, whiteout, &[D], &[]),
                    op(UP, file, &[E, C], &[9]),
                ],
            ),
        ),
        (
            "links-and-odd-names",
            prog(
                0,
                &[
                    op(L1, file, &[A], &[1]),
                    op(UP, file, &[A], &[1]),
                    op(UP, hardlink, &[A], &[0, B]),
                    op(UP, hardlink, &[A], &[1, C, NL]),
                    op(
                        UP,
                        symlink,
                        &[D],
                        &[
                            13, b'/', b'e', b't', b'c', b'/', b'p', b'a', b's', b's', b'w', b'd',
                            0, 0,
                        ],
                    ),
                    op(UP, symlink, &[E], &[0]),
                    op(UP, mkdir, &[0xe3, 0xff, b'.', b'\n', 0x80], &[]),
                    op(
                        UP,
                        cap,
                        &[A],
                        &[
                            20, 1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                        ],
                    ),
                    op(L1, file, &[OPQ], &[1]),
                ],
            ),
        ),
        (
            "userxattr",
            prog(
                2,
                &[
                    op(L1, file, &[A, B], &[1]),
                    op(UP, mkdir, &[A], &[]),
                    op(UP, opaque, &[A], &[0]),
                    op(UP, other, &[A], &[0]),
                    op(UP, mkdir, &[C], &[]),
                    op(UP, redirect, &[C], &[0, 0, A]),
                    op(UP, remove, &[A], &[]),
                ],
            ),
        ),
    ];
    for (name, data) in seeds {
        out("diff_reader", name, &data);
    }
}

fn main() {
    for (name, data) in OPTION_SEEDS {
        out("mount_options", name, data);
    }
    import_seeds();
    diff_seeds();
    let corpus: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    println!("seeds written under {}", corpus.display());
}
