//! Reading images: an OCI image layout (a directory, or a tar holding one)
//! and `docker save` archives (tar or unpacked directory; the legacy
//! `<id>/layer.tar` form and the newer `blobs/sha256/…` form).
//!
//! The result is a [`Plan`]: which blobs make up the chosen image, bottom
//! layer first, with the digests each must have. Every JSON document that
//! is named by a digest is checked against it here; layer blobs are checked
//! while they are unpacked (see `import`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::digest::Digest;
use super::tarstream::{self, Kind};
use super::{Ctx, Error, Result, tarsafe};

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANN_IMAGE_NAME: &str = "io.containerd.image.name";

/// Largest JSON document (index, manifest, config) read into memory.
const JSON_LIMIT: u64 = 16 << 20;

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The machine we run on, in OCI terms.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> std::result::Result<Platform, String> {
        let p: Vec<&str> = s.split('/').collect();
        match p.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: p.get(2).map(|v| v.to_string()),
            }),
            _ => Err(format!("bad platform '{s}' (expected os/arch[/variant])")),
        }
    }

    /// Whether an image for `self` satisfies a request for `want` (a
    /// request without a variant takes any).
    fn satisfies(&self, want: &Platform) -> bool {
        self.os == want.os
            && self.architecture == want.architecture
            && (want.variant.is_none() || self.variant == want.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct Config {
    #[serde(default)]
    rootfs: RootFs,
    #[serde(default)]
    history: Vec<History>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// One entry of an image's history (a Dockerfile step).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct History {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub empty_layer: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A layer of the chosen image.
#[derive(Clone, Debug)]
pub struct LayerRef {
    /// Where the blob is, relative to the image.
    pub path: String,
    /// The digest the blob must have (not known for legacy `layer.tar`s).
    pub digest: Option<Digest>,
    /// The blob size the manifest gives.
    pub size: Option<u64>,
    /// The sha256 of the uncompressed tar (from the config); `None` for a
    /// lone layer tar, where it is computed.
    pub diff_id: Option<Digest>,
}

/// The chosen image: its layers, bottom first, and its history.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// How the image was found, for messages (`tag latest`, a digest…).
    pub name: String,
    pub layers: Vec<LayerRef>,
    pub history: Vec<History>,
}

/// A file in a tar archive: its data, or a link to another member.
#[derive(Debug)]
pub enum Member {
    Data { offset: u64, size: u64 },
    Link(String),
}

/// Where the image's files are read from.
pub enum Source {
    Dir(PathBuf),
    Archive {
        path: PathBuf,
        files: HashMap<String, Member>,
    },
}

/// A member name in normal form: `a/b` (no `./`, no trailing `/`).
fn normal(name: &[u8]) -> Option<String> {
    let comps = tarsafe::split_name(name).ok()?;
    String::from_utf8(comps.join(&b'/')).ok()
}

/// Whether a member can be part of an image archive: top-level files,
/// `<id>/layer.tar`-style files, and `blobs/<alg>/<hex>`.
fn could_be_image_file(name: &str) -> bool {
    let depth = name.split('/').count();
    depth <= 2 || (depth == 3 && name.starts_with("blobs/"))
}

/// Resolves `target` of a symlink living at `at`, lexically, within the
/// archive's own names (nothing on disk is involved).
fn resolve_link(at: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        at.split('/').collect()
    };
    if !target.starts_with('/') {
        parts.pop();
    }
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl Source {
    /// Indexes a tar archive (headers only, seeking past the data).
    /// `None` if it is not an image archive (then it is a layer tar).
    pub fn scan_archive(path: &Path) -> Result<Option<Source>> {
        let f = File::open(path).ctx(|| format!("opening '{}'", path.display()))?;
        let mut archive = tar::Archive::new(f);
        let entries = archive
            .entries_with_seek()
            .ctx(|| format!("reading '{}'", path.display()))?;
        let mut files = HashMap::new();
        let scanned = tarstream::for_each(entries, |m, _| {
            let Some(name) = normal(&m.name) else {
                return Ok(());
            };
            if !could_be_image_file(&name) {
                return Ok(()); // keeps the index small for big layer tars
            }
            let member = match m.kind {
                Kind::File => Member::Data {
                    offset: m.offset,
                    size: m.size,
                },
                Kind::Symlink => match std::str::from_utf8(&m.link)
                    .ok()
                    .and_then(|t| resolve_link(&name, t))
                {
                    Some(t) => Member::Link(t),
                    None => return Ok(()),
                },
                Kind::HardLink => match normal(&m.link) {
                    Some(t) => Member::Link(t),
                    None => return Ok(()),
                },
                _ => return Ok(()),
            };
            files.insert(name, member);
            Ok(())
        });
        if scanned.is_err() {
            return Ok(None); // not a readable archive: unpacking will say why
        }
        let is_image = files.contains_key("manifest.json")
            || (files.contains_key("index.json") && files.contains_key("oci-layout"));
        Ok(is_image.then(|| Source::Archive {
            path: path.to_path_buf(),
            files,
        }))
    }

    pub fn exists(&self, rel: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(rel).is_file(),
            Source::Archive { files, .. } => self.find(files, rel).is_some(),
        }
    }

    fn find(&self, files: &HashMap<String, Member>, rel: &str) -> Option<(u64, u64)> {
        let mut name = normal(rel.as_bytes())?;
        for _ in 0..16 {
            match files.get(&name)? {
                Member::Data { offset, size } => return Some((*offset, *size)),
                Member::Link(t) => name = t.clone(),
            }
        }
        None
    }

    /// Opens a file of the image; returns a reader and its size.
    pub fn open(&self, rel: &str) -> Result<(Box<dyn Read>, u64)> {
        let missing = || Error::new(format!("'{rel}' is missing from the image"));
        match self {
            Source::Dir(d) => {
                tarsafe::split_name(rel.as_bytes())
                    .map_err(|why| Error::new(format!("bad path '{rel}' in the image: {why}")))?;
                let p = d.join(rel);
                let f = File::open(&p).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => missing(),
                    _ => Error::new(format!("opening '{}': {e}", p.display())),
                })?;
                let size = f
                    .metadata()
                    .ctx(|| format!("stat '{}'", p.display()))?
                    .len();
                Ok((Box::new(f), size))
            }
            Source::Archive { path, files } => {
                let (offset, size) = self.find(files, rel).ok_or_else(missing)?;
                let mut f = File::open(path).ctx(|| format!("opening '{}'", path.display()))?;
                f.seek(SeekFrom::Start(offset))
                    .ctx(|| format!("reading '{}'", path.display()))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Reads a small file whole.
    fn read_small(&self, rel: &str) -> Result<Vec<u8>> {
        let (r, size) = self.open(rel)?;
        if size > JSON_LIMIT {
            return Err(Error::new(format!(
                "'{rel}' is {size} bytes, over the {JSON_LIMIT} bytes allowed for metadata"
            )));
        }
        let mut v = Vec::with_capacity(size as usize);
        r.take(JSON_LIMIT)
            .read_to_end(&mut v)
            .ctx(|| format!("reading '{rel}'"))?;
        Ok(v)
    }

    /// Reads and parses a JSON file that is not content-addressed.
    fn json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let v = self.read_small(rel)?;
        serde_json::from_slice(&v).map_err(|e| Error::new(format!("'{rel}': bad JSON: {e}")))
    }

    /// Reads a blob named by a descriptor, checks its digest and size, and
    /// parses it.
    fn blob_json<T: DeserializeOwned>(&self, d: &Descriptor) -> Result<(T, Vec<u8>)> {
        let digest = Digest::parse(&d.digest)?;
        let rel = blob_path(&digest);
        let v = self.read_small(&rel)?;
        let got = Digest::of(&v);
        if got != digest {
            return Err(Error::new(format!(
                "blob {rel}: digest mismatch: the descriptor says {digest}, the content is {got}"
            )));
        }
        if v.len() as u64 != d.size {
            return Err(Error::new(format!(
                "blob {rel}: size mismatch: the descriptor says {} bytes, the blob has {}",
                d.size,
                v.len()
            )));
        }
        let t = serde_json::from_slice(&v)
            .map_err(|e| Error::new(format!("blob {rel}: bad JSON: {e}")))?;
        Ok((t, v))
    }
}

/// The path of a blob in an OCI layout.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// What to pick when an image holds several.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub tag: Option<String>,
    pub platform: Option<Platform>,
}

/// Finds the image in `src` (an OCI layout or a docker save archive).
pub fn plan(src: &Source, sel: &Selector) -> Result<Plan> {
    if src.exists("index.json") && (src.exists("oci-layout") || !src.exists("manifest.json")) {
        oci_plan(src, sel)
    } else if src.exists("manifest.json") {
        docker_plan(src, sel)
    } else {
        Err(Error::new(
            "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
        ))
    }
}

pub fn tag_matches(annotations: &BTreeMap<String, String>, tag: &str) -> bool {
    [ANN_REF_NAME, ANN_IMAGE_NAME].iter().any(|k| {
        annotations.get(*k).is_some_and(|v| {
            v == tag || v.ends_with(&format!(":{tag}")) || v.ends_with(&format!("/{tag}"))
        })
    })
}

fn is_index(d: &Descriptor) -> bool {
    d.media_type == MT_OCI_INDEX || d.media_type == MT_DOCKER_LIST
}

/// Attestations and other non-images that indexes list beside images.
fn is_image_manifest(d: &Descriptor) -> bool {
    !d.annotations.contains_key("vnd.docker.reference.type")
        && d.platform.as_ref().is_none_or(|p| p.os != "unknown")
}

fn describe(d: &Descriptor) -> String {
    let mut s = match d.annotations.get(ANN_REF_NAME) {
        Some(t) => format!("tag '{t}'"),
        None => d.digest.clone(),
    };
    if let Some(p) = &d.platform {
        s.push_str(&format!(" ({p})"));
    }
    s
}

fn oci_plan(src: &Source, sel: &Selector) -> Result<Plan> {
    let index: Index = src.json("index.json")?;
    let mut cands: Vec<Descriptor> = index
        .manifests
        .into_iter()
        .filter(is_image_manifest)
        .collect();
    if let Some(t) = &sel.tag {
        let all: Vec<String> = cands.iter().map(describe).collect();
        cands.retain(|d| tag_matches(&d.annotations, t));
        if cands.is_empty() {
            return Err(Error::new(format!(
                "no image tagged '{t}' (the index has: {})",
                if all.is_empty() {
                    "nothing".into()
                } else {
                    all.join(", ")
                }
            )));
        }
    }
    let chosen = choose(src, cands, sel, 0)?;
    let name = describe(&chosen);
    let (manifest, _): (Manifest, _) = src
        .blob_json(&chosen)
        .ctx(|| format!("manifest of {name}"))?;
    let (config, _): (Config, _) = src
        .blob_json(&manifest.config)
        .ctx(|| format!("config of {name}"))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::new(format!(
            "{name}: the manifest has {} layers but the config lists {} diff_ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (d, diff) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let digest = Digest::parse(&d.digest)?;
        layers.push(LayerRef {
            path: blob_path(&digest),
            digest: Some(digest),
            size: Some(d.size),
            diff_id: Some(Digest::parse(diff)?),
        });
    }
    Ok(Plan {
        name,
        layers,
        history: config.history,
    })
}

/// Narrows candidates to one image manifest: descends into nested indexes
/// and filters by platform.
fn choose(src: &Source, cands: Vec<Descriptor>, sel: &Selector, depth: u32) -> Result<Descriptor> {
    if depth > 4 {
        return Err(Error::new("image indexes nested too deeply"));
    }
    let mut flat = Vec::new();
    for d in cands {
        if is_index(&d) {
            let (idx, _): (Index, _) = src.blob_json(&d).ctx(|| format!("index {}", d.digest))?;
            let inner: Vec<Descriptor> = idx
                .manifests
                .into_iter()
                .filter(is_image_manifest)
                .collect();
            if !inner.is_empty() {
                flat.push(choose(src, inner, sel, depth + 1)?);
            }
        } else {
            flat.push(d);
        }
    }
    flat.dedup_by(|a, b| a.digest == b.digest);
    if flat.len() > 1 {
        let want = sel.platform.clone().unwrap_or_else(Platform::host);
        let all: Vec<String> = flat.iter().map(describe).collect();
        flat.retain(|d| d.platform.as_ref().is_none_or(|p| p.satisfies(&want)));
        if flat.is_empty() {
            return Err(Error::new(format!(
                "no image for platform {want} (available: {})",
                all.join(", ")
            )));
        }
        if flat.len() > 1 && flat.iter().any(|d| d.platform.is_none()) {
            return Err(Error::new(format!(
                "the layout holds several images; choose one with --tag (available: {})",
                all.join(", ")
            )));
        }
    }
    match flat.len() {
        0 => Err(Error::new("the index lists no image")),
        1 => Ok(flat.remove(0)),
        _ => Err(Error::new(format!(
            "several images match; choose one with --tag or --platform (matching: {})",
            flat.iter().map(describe).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn docker_plan(src: &Source, sel: &Selector) -> Result<Plan> {
    let entries: Vec<DockerEntry> = src.json("manifest.json")?;
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let all: Vec<String> = entries
        .iter()
        .map(|e| {
            let t = tags(e);
            if t.is_empty() {
                e.config.clone()
            } else {
                t.join(" ")
            }
        })
        .collect();
    let mut cands: Vec<&DockerEntry> = entries.iter().collect();
    if let Some(t) = &sel.tag {
        cands.retain(|e| {
            tags(e)
                .iter()
                .any(|r| r == t || r.ends_with(&format!(":{t}")))
        });
    }
    let e = match cands.as_slice() {
        [e] => *e,
        [] => {
            return Err(Error::new(format!(
                "no image{} in manifest.json (it has: {})",
                sel.tag
                    .as_ref()
                    .map(|t| format!(" tagged '{t}'"))
                    .unwrap_or_default(),
                all.join(", ")
            )));
        }
        _ => {
            return Err(Error::new(format!(
                "manifest.json holds several images; choose one with --tag (available: {})",
                all.join(", ")
            )));
        }
    };
    let name = tags(e).first().cloned().unwrap_or_else(|| e.config.clone());
    let raw = src
        .read_small(&e.config)
        .ctx(|| format!("config of {name}"))?;
    if let Some(want) = content_digest(&e.config) {
        let got = Digest::of(&raw);
        if got != want {
            return Err(Error::new(format!(
                "config '{}': digest mismatch: its name says {want}, the content is {got}",
                e.config
            )));
        }
    }
    let config: Config = serde_json::from_slice(&raw)
        .map_err(|err| Error::new(format!("config '{}': bad JSON: {err}", e.config)))?;
    if config.rootfs.diff_ids.len() != e.layers.len() {
        return Err(Error::new(format!(
            "{name}: manifest.json lists {} layers but the config lists {} diff_ids",
            e.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (p, diff) in e.layers.iter().zip(&config.rootfs.diff_ids) {
        layers.push(LayerRef {
            path: p.clone(),
            digest: content_digest(p),
            size: None,
            diff_id: Some(Digest::parse(diff)?),
        });
    }
    Ok(Plan {
        name,
        layers,
        history: config.history,
    })
}

/// The digest a file's name promises: `blobs/sha256/<hex>` or `<hex>.json`.
fn content_digest(rel: &str) -> Option<Digest> {
    let base = rel.rsplit('/').next()?;
    if let Some(hex) = rel.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex);
    }
    Digest::from_hex(base.strip_suffix(".json")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_lexically() {
        assert_eq!(
            resolve_link("a/layer.tar", "../b/layer.tar").as_deref(),
            Some("b/layer.tar")
        );
        assert_eq!(resolve_link("a/x", "y").as_deref(), Some("a/y"));
        assert_eq!(resolve_link("a/x", "../../y"), None);
        assert_eq!(resolve_link("a/x", "/y").as_deref(), Some("y"));
    }

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(p.satisfies(&Platform::parse("linux/arm64").unwrap()));
        assert!(!p.satisfies(&Platform::parse("linux/arm64/v7").unwrap()));
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn digests_from_names() {
        let h = "a".repeat(64);
        assert!(content_digest(&format!("blobs/sha256/{h}")).is_some());
        assert!(content_digest(&format!("{h}.json")).is_some());
        assert!(content_digest(&format!("{h}/layer.tar")).is_none());
    }

    #[test]
    fn tags() {
        let mut a = BTreeMap::new();
        a.insert(
            ANN_REF_NAME.to_string(),
            "docker.io/library/app:v1".to_string(),
        );
        assert!(tag_matches(&a, "v1"));
        assert!(tag_matches(&a, "docker.io/library/app:v1"));
        assert!(!tag_matches(&a, "v2"));
    }
}
