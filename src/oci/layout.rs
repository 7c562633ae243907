//! Appending an exported layer to an image in an OCI layout
//! (`export --oci-layout DIR`): the layer blob is stored, a new config
//! (one more `rootfs.diff_ids` entry, one more `history` entry) and a new
//! manifest (one more layer) are written, and `index.json` points the tag
//! at the new manifest. Blobs are written under a temporary name and
//! renamed to their digest; `index.json` is replaced by rename, so a
//! reader never sees a half-written layout.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::compress::Compression;
use super::digest::Digest;
use super::export::Exported;
use super::image::{ANN_REF_NAME, MT_DOCKER_LIST, MT_OCI_INDEX, tag_matches};
use super::{Ctx, Error, Result};

const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

pub struct Append {
    /// The image to extend (required if the index holds several).
    pub tag: Option<String>,
    /// Tag the result as this, leaving `tag` as it was.
    pub new_tag: Option<String>,
    /// The layer blob, already written.
    pub blob: PathBuf,
    /// Move `blob` into the layout (it is a staging file of ours) rather
    /// than copy it.
    pub move_blob: bool,
    pub layer: Exported,
    pub created_by: String,
}

pub struct Appended {
    pub manifest: Digest,
    pub config: Digest,
    pub tag: String,
}

fn blobs(layout: &Path) -> PathBuf {
    layout.join("blobs").join("sha256")
}

/// A file to export into, inside the layout (so it can be renamed to its
/// digest).
pub fn staging_file(layout: &Path) -> Result<PathBuf> {
    let dir = blobs(layout);
    if !layout.join("index.json").is_file() {
        return Err(Error::new(format!(
            "'{}' is not an OCI image layout (no index.json)",
            layout.display()
        )));
    }
    fs::create_dir_all(&dir).ctx(|| format!("creating '{}'", dir.display()))?;
    Ok(dir.join(format!(".layerfs-export-{}", std::process::id())))
}

fn read_json(path: &Path) -> Result<(Value, Vec<u8>)> {
    let raw = fs::read(path).ctx(|| format!("reading '{}'", path.display()))?;
    let v = serde_json::from_slice(&raw)
        .map_err(|e| Error::new(format!("'{}': bad JSON: {e}", path.display())))?;
    Ok((v, raw))
}

/// Reads the blob a descriptor names, checking its digest.
fn read_blob(layout: &Path, desc: &Value) -> Result<Value> {
    let d = Digest::parse(desc["digest"].as_str().unwrap_or(""))?;
    let (v, raw) = read_json(&blobs(layout).join(d.hex()))?;
    let got = Digest::of(&raw);
    if got != d {
        return Err(Error::new(format!(
            "blob {d}: digest mismatch (content is {got})"
        )));
    }
    Ok(v)
}

/// Writes a file atomically (temporary name, then rename).
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".layerfs-")
        .tempfile_in(dir)
        .ctx(|| format!("creating a file in '{}'", dir.display()))?;
    tmp.write_all(data)
        .ctx(|| format!("writing '{}'", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .ctx(|| format!("chmod '{}'", path.display()))?;
    tmp.persist(path)
        .map_err(|e| Error::new(format!("writing '{}': {e}", path.display())))?;
    Ok(())
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<Digest> {
    let d = Digest::of(data);
    write_atomic(&blobs(layout).join(d.hex()), data)?;
    Ok(d)
}

fn layer_media_type(manifest_type: &str, c: Compression) -> Result<&'static str> {
    if manifest_type != MT_DOCKER_MANIFEST {
        return Ok(c.media_type());
    }
    match c {
        Compression::None => Ok("application/vnd.docker.image.rootfs.diff.tar"),
        Compression::Gzip => Ok("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        Compression::Zstd => Err(Error::new(
            "a docker v2 manifest cannot hold zstd layers; use gzip or none",
        )),
    }
}

pub fn append(layout: &Path, a: &Append) -> Result<Appended> {
    let index_path = layout.join("index.json");
    let (mut index, _) = read_json(&index_path)?;
    let mut entries = index["manifests"]
        .as_array()
        .cloned()
        .ok_or_else(|| Error::new("index.json has no manifests"))?;
    let pos = pick(&entries, a.tag.as_deref())?;
    let old = entries[pos].clone();
    let mt = old["mediaType"].as_str().unwrap_or("");
    if mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST {
        return Err(Error::new(
            "the tag names an image index; appending to multi-platform images is not supported",
        ));
    }
    let mut manifest = read_blob(layout, &old)?;
    let mut config = read_blob(layout, &manifest["config"])?;
    let manifest_type = manifest["mediaType"].as_str().unwrap_or(mt).to_string();
    let layer_type = layer_media_type(&manifest_type, a.layer.compression)?;

    // Blobs first, index last: until the index changes, nothing refers to
    // the new blobs and the layout is the old image.
    store_layer(layout, a)?;
    extend_config(&mut config, a)?;
    let (config_digest, config_size) = write_json_blob(layout, &config)?;
    manifest["config"]["digest"] = json!(config_digest.to_string());
    manifest["config"]["size"] = json!(config_size);
    push(
        &mut manifest["layers"],
        json!({"mediaType": layer_type, "digest": a.layer.digest.to_string(), "size": a.layer.size}),
    )?;
    let (manifest_digest, manifest_size) = write_json_blob(layout, &manifest)?;

    let mut entry = old.clone();
    entry["digest"] = json!(manifest_digest.to_string());
    entry["size"] = json!(manifest_size);
    if entry["mediaType"].is_null() {
        entry["mediaType"] = json!(manifest_type);
    }
    let tag = match &a.new_tag {
        Some(t) => {
            entry["annotations"][ANN_REF_NAME] = json!(t);
            entries.retain(|e| e["annotations"][ANN_REF_NAME].as_str() != Some(t));
            entries.push(entry);
            t.clone()
        }
        None => {
            entries[pos] = entry;
            old["annotations"][ANN_REF_NAME]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    };
    index["manifests"] = Value::Array(entries);
    let index_bytes = serde_json::to_vec(&index).map_err(|e| Error::new(e.to_string()))?;
    write_atomic(&index_path, &index_bytes)?;
    Ok(Appended {
        manifest: manifest_digest,
        config: config_digest,
        tag,
    })
}

/// One more diff_id and one more history entry, and a new creation time.
fn extend_config(config: &mut Value, a: &Append) -> Result<()> {
    let now = timestamp();
    push(
        &mut config["rootfs"]["diff_ids"],
        json!(a.layer.diff_id.to_string()),
    )?;
    push(
        &mut config["history"],
        json!({"created": now, "created_by": a.created_by, "comment": "layerfs export"}),
    )?;
    config["created"] = json!(now);
    Ok(())
}

fn write_json_blob(layout: &Path, v: &Value) -> Result<(Digest, usize)> {
    let bytes = serde_json::to_vec(v).map_err(|e| Error::new(e.to_string()))?;
    Ok((write_blob(layout, &bytes)?, bytes.len()))
}

fn push(arr: &mut Value, v: Value) -> Result<()> {
    if arr.is_null() {
        *arr = json!([]);
    }
    arr.as_array_mut()
        .ok_or_else(|| Error::new("unexpected JSON shape (expected an array)"))?
        .push(v);
    Ok(())
}

/// Which index entry to extend.
fn pick(entries: &[Value], tag: Option<&str>) -> Result<usize> {
    let annotations = |e: &Value| -> std::collections::BTreeMap<String, String> {
        serde_json::from_value(e["annotations"].clone()).unwrap_or_default()
    };
    let matching: Vec<usize> = (0..entries.len())
        .filter(|&i| tag.is_none_or(|t| tag_matches(&annotations(&entries[i]), t)))
        .collect();
    match (matching.as_slice(), tag) {
        ([i], _) => Ok(*i),
        ([], Some(t)) => Err(Error::new(format!("no image tagged '{t}' in the layout"))),
        ([], None) => Err(Error::new("the layout holds no image")),
        (_, _) => Err(Error::new(
            "the layout holds several images; choose one with --tag",
        )),
    }
}

/// Puts the layer blob under its digest.
fn store_layer(layout: &Path, a: &Append) -> Result<()> {
    let dest = blobs(layout).join(a.layer.digest.hex());
    fs::create_dir_all(blobs(layout)).ctx(|| "creating blobs/sha256".into())?;
    if a.move_blob {
        return fs::rename(&a.blob, &dest)
            .ctx(|| format!("moving the layer to '{}'", dest.display()));
    }
    if dest.exists() {
        return Ok(());
    }
    let tmp = blobs(layout).join(format!(".layerfs-copy-{}", std::process::id()));
    fs::copy(&a.blob, &tmp).ctx(|| format!("copying the layer to '{}'", tmp.display()))?;
    fs::rename(&tmp, &dest).ctx(|| format!("moving the layer to '{}'", dest.display()))
}

/// Now (or `SOURCE_DATE_EPOCH`) as RFC 3339 UTC.
fn timestamp() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    rfc3339(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
