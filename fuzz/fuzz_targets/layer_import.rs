//! The layer-tar importer: arbitrary bytes as a layer tar (gzip and zstd
//! streams are recognised by their magic, as the importer sniffs them; some
//! plain inputs are also fed wrapped in gzip or zstd) imported with
//! `layerfs::oci::import::import` into a fresh DEST.
//!
//! Checked for every input: no panic; nothing outside DEST changed (a canary
//! file and a directory next to DEST, the input file itself, and a fixed
//! sentinel tree at an absolute path that symlinks in the seeds point at);
//! no mount left at or under the scratch directory; a failed import leaves
//! DEST as it found it (empty), a successful one leaves only layer
//! directories named by their diff_id and no staging directory.
#![no_main]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use layerfs::oci::image::Selector;
use layerfs::oci::{import, unpack};
use layerfs::whiteout::Private;
use libfuzzer_sys::fuzz_target;

/// A fixed absolute path, so that absolute symlink targets in inputs can
/// name it (`/tmp/layerfs-fuzz-sentinel/...`).
const SENTINEL: &str = "/tmp/layerfs-fuzz-sentinel";

/// What is compared of each object: type and mode, owner, size, mtime,
/// and the content of files or the target of symlinks.
#[derive(Debug, PartialEq, Eq)]
struct Desc {
    mode: u32,
    owner: (u32, u32),
    size: u64,
    mtime: (i64, i64),
    data: Vec<u8>,
}

/// Every object under `root` (not following symlinks), except `skip`.
fn snapshot(root: &Path, skip: Option<&Path>) -> BTreeMap<PathBuf, Desc> {
    let mut out = BTreeMap::new();
    walk(root, skip, &mut out);
    out
}

fn walk(p: &Path, skip: Option<&Path>, out: &mut BTreeMap<PathBuf, Desc>) {
    if Some(p) == skip {
        return;
    }
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return;
    };
    let ft = md.file_type();
    let data = if ft.is_file() {
        std::fs::read(p).unwrap_or_default()
    } else if ft.is_symlink() {
        std::fs::read_link(p)
            .map(|t| t.as_os_str().as_bytes().to_vec())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    out.insert(
        p.to_path_buf(),
        Desc {
            mode: md.mode(),
            owner: (md.uid(), md.gid()),
            size: if ft.is_dir() { 0 } else { md.size() },
            mtime: if ft.is_dir() {
                (0, 0) // a directory's mtime is compared through its entries
            } else {
                (md.mtime(), md.mtime_nsec())
            },
            data,
        },
    );
    if ft.is_dir()
        && let Ok(rd) = std::fs::read_dir(p)
    {
        for e in rd.flatten() {
            walk(&e.path(), skip, out);
        }
    }
}

/// The sentinel tree, made once per process (idempotently: parallel jobs
/// share it) and its snapshot.
fn sentinel() -> &'static BTreeMap<PathBuf, Desc> {
    static S: OnceLock<BTreeMap<PathBuf, Desc>> = OnceLock::new();
    S.get_or_init(|| {
        let root = Path::new(SENTINEL);
        std::fs::create_dir_all(root.join("d")).expect("sentinel dir");
        for (name, body) in [("file", &b"sentinel\n"[..]), ("d/inner", b"inner\n")] {
            let p = root.join(name);
            if std::fs::read(&p).ok().as_deref() != Some(body) {
                std::fs::write(&p, body).expect("sentinel file");
            }
        }
        snapshot(root, None)
    })
}

/// Mount points at or below `under`, from /proc/self/mountinfo.
fn mounts_under(under: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let under = under.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m == &under || m.starts_with(&format!("{under}/")))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_layer_dir_name(n: &str) -> bool {
    let (hex, suffix) = match n.split_once('.') {
        Some((h, s)) => (h, Some(s)),
        None => (n, None),
    };
    hex.len() == 64
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && suffix.is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// The bytes to write as the layer file: the input itself, or for some
/// plain inputs the input wrapped in gzip or zstd.
fn layer_bytes(data: &[u8]) -> Vec<u8> {
    let compressed = data.starts_with(&[0x1f, 0x8b]) || data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    match (compressed, data.len() % 8) {
        (false, 3) => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        (false, 5) => zstd::encode_all(data, 1).unwrap(),
        _ => data.to_vec(),
    }
}

fn options() -> import::Options {
    let root = layerfs::oci::running_as_root();
    import::Options {
        selector: Selector::default(),
        unpack: unpack::Options {
            private: if root {
                Private::TRUSTED
            } else {
                Private::USER
            },
            root,
        },
        progress: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let sentinel_before = sentinel();
    let t = common::scratch("layerfs-fuzz-import-");
    let top = t.path().to_path_buf();
    let dest = top.join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(top.join("canary"), b"canary\n").unwrap();
    std::fs::create_dir_all(top.join("outside/sub")).unwrap();
    std::fs::write(top.join("outside/keep"), b"keep\n").unwrap();
    std::os::unix::fs::symlink("../canary", top.join("outside/link")).unwrap();
    let layer = top.join("layer.tar");
    std::fs::write(&layer, layer_bytes(data)).unwrap();
    let before = snapshot(&top, Some(&dest));

    let result = import::import(&layer, &dest, &options());
    if common::debug() {
        match &result {
            Ok(imp) => eprintln!(
                "import: {} layer(s) {:?}, warnings {:?}",
                imp.layers.len(),
                imp.layers
                    .iter()
                    .map(|l| l.stats.as_ref().map(|s| s.entries))
                    .collect::<Vec<_>>(),
                imp.warnings()
            ),
            Err(e) => eprintln!("import: error: {e}"),
        }
    }

    let after = snapshot(&top, Some(&dest));
    if before != after {
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        panic!("the import changed something outside DEST: {changed:?}");
    }
    assert!(
        snapshot(Path::new(SENTINEL), None) == *sentinel_before,
        "the import changed the sentinel tree {SENTINEL}"
    );
    let mounts = mounts_under(&top);
    assert!(mounts.is_empty(), "the import left mounts: {mounts:?}");

    let names: Vec<String> = std::fs::read_dir(&dest)
        .expect("DEST is still a directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    match &result {
        Err(e) => assert!(
            names.is_empty(),
            "a failed import ({e}) left {names:?} in DEST"
        ),
        Ok(imp) => {
            assert!(
                names.iter().all(|n| is_layer_dir_name(n)),
                "DEST holds more than layer directories: {names:?}"
            );
            let dest = std::fs::canonicalize(&dest).unwrap();
            for l in &imp.layers {
                assert!(
                    l.dir.parent() == Some(dest.as_path()),
                    "layer {} is not in DEST",
                    l.dir.display()
                );
                let md = std::fs::symlink_metadata(&l.dir).expect("the layer directory exists");
                assert!(md.is_dir(), "layer {} is not a directory", l.dir.display());
            }
        }
    }
    common::remove_tree(t);
});
