//! `layerfs import`: unpack an image (or one layer tar) into one directory
//! per layer under DEST, ready to be lowers.
//!
//! Layer directories are named by the layer's `diff_id` (the sha256 of its
//! uncompressed tar, 64 hex digits), so images that share a layer share its
//! directory: a layer already present is not unpacked again.
//!
//! Atomicity: new layers are unpacked into a staging directory inside DEST
//! (`.layerfs-import-PID-N`) and renamed into place only after every layer
//! of the image has been unpacked and its digests checked. On any error the
//! staging directory is removed and DEST is as it was. A staging directory
//! left by a killed import is removed by the next import into DEST.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::compress::{self, Compression};
use super::digest::{Digest, HashReader};
use super::image::{self, History, LayerRef, Plan, Selector, Source};
use super::progress::{Progress, human};
use super::unpack::{self, Stats};
use super::{Ctx, Error, Result};
use crate::sys;

const STAGING_PREFIX: &str = ".layerfs-import-";

#[derive(Clone, Debug)]
pub struct Options {
    pub selector: Selector,
    pub unpack: unpack::Options,
    /// Show progress on stderr (only if it is a terminal).
    pub progress: bool,
}

/// One layer of the imported image.
#[derive(Debug)]
pub struct Layer {
    pub dir: PathBuf,
    pub diff_id: Digest,
    /// The blob's digest, where the image names one.
    pub digest: Option<Digest>,
    /// The blob's size in bytes (compressed, as stored).
    pub size: u64,
    /// Already present under DEST (from an earlier import).
    pub shared: bool,
    /// What unpacking did (`None` for shared layers).
    pub stats: Option<Stats>,
}

/// The result of an import.
#[derive(Debug)]
pub struct Imported {
    /// Which image was chosen (tag, digest or file name).
    pub name: String,
    /// Bottom layer first, as in the manifest.
    pub layers: Vec<Layer>,
    pub history: Vec<History>,
}

impl Imported {
    /// The layer directories, topmost first (the `lowerdir=` order).
    pub fn lowers(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Vec::new();
        for l in self.layers.iter().rev() {
            // Consecutive identical layers apply the same changes twice.
            if v.last() != Some(&l.dir) {
                v.push(l.dir.clone());
            }
        }
        v
    }

    /// `lowerdir=TOP:…:BOTTOM`, with `:`, `,` and `\` escaped (bytes: the
    /// paths need not be UTF-8).
    pub fn lowerdir(&self) -> Vec<u8> {
        let mut v = b"lowerdir=".to_vec();
        v.extend_from_slice(&super::lowerdir_value(&self.lowers()));
        v
    }

    pub fn warnings(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter_map(|l| l.stats.as_ref())
            .flat_map(|s| s.warnings.iter().cloned())
            .collect()
    }
}

/// What the IMAGE argument is.
enum Input {
    Image(Source),
    Layer(PathBuf),
}

/// What IMAGE is: a directory is an image; a tar is an image archive if it
/// holds `manifest.json` or an OCI layout, else a layer. A compressed tar
/// whose first member looks like part of an image archive (`docker save |
/// gzip`) is decompressed into DEST (`scratch`) to be read as one.
fn open_input(image: &Path, scratch: &Path) -> Result<(Input, Option<tempfile::TempPath>)> {
    let meta = fs::metadata(image).ctx(|| format!("'{}'", image.display()))?;
    if meta.is_dir() {
        return Ok((Input::Image(Source::Dir(image.to_path_buf())), None));
    }
    let mut head = [0u8; 512];
    let mut f = File::open(image).ctx(|| format!("opening '{}'", image.display()))?;
    let n = read_up_to(&mut f, &mut head).ctx(|| format!("reading '{}'", image.display()))?;
    let (tar, temp) = if Compression::sniff(&head[..n])? == Compression::None {
        (image.to_path_buf(), None)
    } else if compressed_archive(image)? {
        let t = decompress_into(image, scratch)?;
        (t.to_path_buf(), Some(t))
    } else {
        return Ok((Input::Layer(image.to_path_buf()), None));
    };
    Ok(match Source::scan_archive(&tar)? {
        Some(src) => (Input::Image(src), temp),
        None => (Input::Layer(image.to_path_buf()), None),
    })
}

/// Whether the first member of a compressed tar is one an image archive
/// starts with (`blobs/`, `<64 hex>/`, `manifest.json`, …).
fn compressed_archive(image: &Path) -> Result<bool> {
    let f = File::open(image).ctx(|| format!("opening '{}'", image.display()))?;
    let (mut r, _) = compress::decoder(f)?;
    let mut h = [0u8; 512];
    if read_up_to(&mut r, &mut h).unwrap_or(0) < 512 {
        return Ok(false);
    }
    let name = &h[..100];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(100)];
    let name = std::str::from_utf8(name).unwrap_or("");
    let first = name
        .trim_start_matches("./")
        .split('/')
        .next()
        .unwrap_or("");
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    Ok(matches!(
        first,
        "blobs" | "oci-layout" | "index.json" | "manifest.json" | "repositories"
    ) || hex(first)
        || [".json", ".tar"]
            .iter()
            .any(|x| first.strip_suffix(x).is_some_and(hex)))
}

fn decompress_into(image: &Path, scratch: &Path) -> Result<tempfile::TempPath> {
    let f = File::open(image).ctx(|| format!("opening '{}'", image.display()))?;
    let (mut r, _) = compress::decoder(f)?;
    let mut t = tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-archive-", std::process::id()))
        .tempfile_in(scratch)
        .ctx(|| format!("creating a file in '{}'", scratch.display()))?;
    std::io::copy(&mut r, &mut t).ctx(|| format!("decompressing '{}'", image.display()))?;
    Ok(t.into_temp_path())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The staging directory inside DEST; removed on drop.
struct Staging {
    path: PathBuf,
    fd: OwnedFd,
    dest: OwnedFd,
}

impl Staging {
    fn new(dest: &Path) -> Result<Staging> {
        remove_stale_staging(dest);
        let dest_fd = sys::open_path_dir(dest).ctx(|| format!("opening '{}'", dest.display()))?;
        for n in 0u32.. {
            let name = format!("{STAGING_PREFIX}{}-{n}", std::process::id());
            let c = crate::layer::cname(name.as_bytes()).ctx(|| name.clone())?;
            match sys::mkdirat(dest_fd.as_fd(), &c, 0o700) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                r => r.ctx(|| format!("creating a staging directory in '{}'", dest.display()))?,
            }
            let fd = sys::open_dir_at(dest_fd.as_fd(), &c).ctx(|| name.clone())?;
            return Ok(Staging {
                path: dest.join(name),
                fd,
                dest: dest_fd,
            });
        }
        unreachable!("u32 names ran out")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes staging directories of imports whose process is gone.
fn remove_stale_staging(dest: &Path) {
    let Ok(rd) = fs::read_dir(dest) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(e.path()),
                _ => fs::remove_file(e.path()),
            };
        }
    }
}

/// Imports IMAGE into DEST.
pub fn import(image_path: &Path, dest: &Path, opts: &Options) -> Result<Imported> {
    fs::create_dir_all(dest).ctx(|| format!("creating '{}'", dest.display()))?;
    let dest = fs::canonicalize(dest).ctx(|| format!("'{}'", dest.display()))?;
    let (input, _decompressed) = open_input(image_path, &dest)?;
    let (src, plan) = match input {
        Input::Image(src) => {
            let plan =
                image::plan(&src, &opts.selector).ctx(|| format!("'{}'", image_path.display()))?;
            (Some(src), plan)
        }
        Input::Layer(p) => (
            None,
            Plan {
                name: p.display().to_string(),
                layers: vec![LayerRef {
                    path: p.display().to_string(),
                    digest: None,
                    size: None,
                    diff_id: None,
                }],
                history: Vec::new(),
            },
        ),
    };
    let staging = Staging::new(&dest)?;
    let mut run = Run {
        src: src.as_ref(),
        dest: &dest,
        staging: &staging,
        opts,
        progress: if opts.progress {
            Progress::new()
        } else {
            Progress::with(false)
        },
        total: plan.layers.len(),
        names: HashMap::new(),
        staged: Vec::new(),
    };
    let mut layers = Vec::new();
    for (i, l) in plan.layers.iter().enumerate() {
        let layer = run
            .layer(i, l)
            .ctx(|| format!("layer {} of {} ({})", i + 1, plan.layers.len(), l.path))?;
        layers.push(layer);
    }
    run.progress.done();
    run.commit()?;
    Ok(Imported {
        name: plan.name,
        layers,
        history: plan.history,
    })
}

/// The state of one import.
struct Run<'a> {
    src: Option<&'a Source>,
    dest: &'a Path,
    staging: &'a Staging,
    opts: &'a Options,
    progress: Progress,
    total: usize,
    /// Directory name given to each diff_id so far, and the index of the
    /// last layer that used it.
    names: HashMap<Digest, (String, usize)>,
    /// Unpacked layers waiting to be renamed into DEST: (staged name, final name).
    staged: Vec<(String, String)>,
}

impl Run<'_> {
    fn layer(&mut self, i: usize, l: &LayerRef) -> Result<Layer> {
        if let Some(diff) = l.diff_id {
            let name = self.dir_name(diff, i);
            if self.dest.join(&name).is_dir() || self.staged.iter().any(|(_, f)| *f == name) {
                return Ok(Layer {
                    dir: self.dest.join(&name),
                    diff_id: diff,
                    digest: l.digest,
                    size: self.blob_size(l),
                    shared: true,
                    stats: None,
                });
            }
        }
        let staged = format!("{i}");
        let c = crate::layer::cname(staged.as_bytes()).ctx(|| staged.clone())?;
        sys::mkdirat(self.staging.fd.as_fd(), &c, 0o755)
            .ctx(|| "creating the layer directory".into())?;
        let into = sys::open_dir_at(self.staging.fd.as_fd(), &c)
            .ctx(|| "opening the layer directory".into())?;
        // A layer without a `./` entry has a 0755 root, whatever the umask.
        sys::fchmod_fd(into.as_fd(), 0o755).ctx(|| "chmod the layer directory".into())?;
        let out = self.unpack_blob(i, l, into)?;
        let name = match l.diff_id {
            Some(d) => self.dir_name(d, i),
            None => self.dir_name(out.diff_id, i),
        };
        // A lone layer tar is named only now: it may be there already.
        let shared = self.dest.join(&name).is_dir();
        if !shared {
            self.staged.push((staged, name.clone()));
        }
        Ok(Layer {
            dir: self.dest.join(name),
            shared,
            ..out
        })
    }

    /// `<hex>` for the first use of a layer; a layer that comes back after
    /// others gets its own copy (`<hex>.N`), since a directory can appear
    /// only once in a lowerdir list.
    fn dir_name(&mut self, diff: Digest, i: usize) -> String {
        let base = diff.hex();
        let n = match self.names.get(&diff) {
            None => 0,
            Some((name, last)) if *last + 1 >= i => {
                let name = name.clone();
                self.names.insert(diff, (name.clone(), i));
                return name;
            }
            Some((name, _)) => {
                name.rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0)
                    + 1
            }
        };
        let name = if n == 0 { base } else { format!("{base}.{n}") };
        self.names.insert(diff, (name.clone(), i));
        name
    }

    fn blob_size(&self, l: &LayerRef) -> u64 {
        l.size
            .or_else(|| self.src.and_then(|s| s.open(&l.path).ok()).map(|(_, n)| n))
            .unwrap_or(0)
    }

    fn open_blob(&self, l: &LayerRef) -> Result<Box<dyn Read>> {
        match self.src {
            Some(s) => Ok(s.open(&l.path)?.0),
            None => Ok(Box::new(
                File::open(&l.path).ctx(|| format!("opening '{}'", l.path))?,
            )),
        }
    }

    /// Unpacks a blob, hashing it (as stored) and its tar (uncompressed) on
    /// the way, and checks both against what the image says.
    fn unpack_blob(&mut self, i: usize, l: &LayerRef, into: OwnedFd) -> Result<Layer> {
        let counter = Rc::new(Cell::new(0u64));
        let blob = HashReader::new(self.open_blob(l)?).with_counter(counter.clone());
        let blob_hash = blob.hasher();
        let (dec, compression) = compress::decoder(blob)?;
        // An uncompressed blob is its own tar: hash it once.
        let plain = compression == Compression::None;
        let tar = if plain {
            HashReader::unhashed(dec)
        } else {
            HashReader::new(dec)
        };
        let label = format!("layer {}/{}", i + 1, self.total);
        let progress = &mut self.progress;
        let (stats, tar) = unpack::unpack(tar, into.as_fd(), &self.opts.unpack, |_| {
            progress.update(&label, counter.get())
        })?;
        let (diff_id, _) = tar
            .drain_and_finish()
            .map_err(|e| Error::new(format!("reading after the end of the tar: {e}")))?;
        let (digest, size) = blob_hash.borrow().clone().finish();
        let diff_id = if plain { digest } else { diff_id };
        if let Some(want) = l.digest
            && want != digest
        {
            return Err(Error::new(format!(
                "blob digest mismatch: the manifest says {want}, the blob is {digest}"
            )));
        }
        if let Some(want) = l.size
            && want != size
        {
            return Err(Error::new(format!(
                "blob size mismatch: the manifest says {want} bytes, the blob has {size}"
            )));
        }
        if let Some(want) = l.diff_id
            && want != diff_id
        {
            return Err(Error::new(format!(
                "diff_id mismatch: the config says {want}, the uncompressed tar is {diff_id}"
            )));
        }
        Ok(Layer {
            dir: PathBuf::new(),
            diff_id,
            digest: Some(digest),
            size,
            shared: false,
            stats: Some(stats),
        })
    }

    /// Moves the unpacked layers into DEST. A layer another import put there
    /// meanwhile is kept (same diff_id, same content).
    fn commit(&mut self) -> Result<()> {
        for (staged, name) in &self.staged {
            let from = crate::layer::cname(staged.as_bytes()).ctx(|| staged.clone())?;
            let to = crate::layer::cname(name.as_bytes()).ctx(|| name.clone())?;
            match sys::renameat2(
                self.staging.fd.as_fd(),
                &from,
                self.staging.dest.as_fd(),
                &to,
                sys::RENAME_NOREPLACE,
            ) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                r => r.ctx(|| format!("moving layer {name} into place"))?,
            }
        }
        Ok(())
    }
}

/// The image's history as `docker image history` shows it: newest first,
/// one line per history entry (empty layers too), with the layer each
/// non-empty entry made.
pub fn history_table(imp: &Imported, no_trunc: bool) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut layers = imp.layers.iter();
    for h in &imp.history {
        let (id, size) = if h.empty_layer {
            ("<empty>".to_string(), "0B".to_string())
        } else {
            match layers.next() {
                Some(l) => (l.diff_id.short(), human(l.size)),
                None => ("<missing>".to_string(), "-".to_string()),
            }
        };
        rows.push([
            id,
            created(h.created.as_deref()),
            clip(h.created_by.as_deref().unwrap_or(""), 45, no_trunc),
            size,
            clip(h.comment.as_deref().unwrap_or(""), 30, no_trunc),
        ]);
    }
    for l in layers {
        rows.push([
            l.diff_id.short(),
            String::new(),
            String::new(),
            human(l.size),
            String::new(),
        ]);
    }
    rows.reverse();
    let mut out = format!(
        "{:<14} {:<20} {:<47} {:<9} {}\n",
        "LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"
    );
    for r in rows {
        let line = format!(
            "{:<14} {:<20} {:<47} {:<9} {}",
            r[0], r[1], r[2], r[3], r[4]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `2024-05-01T10:20:30.5Z` → `2024-05-01 10:20:30`.
fn created(s: Option<&str>) -> String {
    match s {
        Some(s) if s.len() >= 19 && s.is_char_boundary(19) => s[..19].replace('T', " "),
        Some(s) => s.to_string(),
        None => String::new(),
    }
}

/// One line, cut to `n` characters with `…` unless `no_trunc`.
fn clip(s: &str, n: usize, no_trunc: bool) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if no_trunc || one.chars().count() <= n {
        one
    } else {
        let mut t: String = one.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping() {
        assert_eq!(clip("a  b\n c", 10, false), "a b c");
        assert_eq!(clip("abcdef", 4, false), "abc…");
        assert_eq!(clip("abcdef", 4, true), "abcdef");
        assert_eq!(
            created(Some("2024-05-01T10:20:30.5Z")),
            "2024-05-01 10:20:30"
        );
    }
}
