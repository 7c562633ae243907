//! The `import` and `export` commands: arguments in, report out.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::compress::Compression;
use super::image::{Platform, Selector};
use super::{export, import, layout, unpack};
use crate::cli::{ExportArgs, ImportArgs};
use crate::whiteout::Private;

fn private(userxattr: bool) -> Private {
    if userxattr {
        Private::USER
    } else {
        Private::TRUSTED
    }
}

pub fn import_cmd(a: ImportArgs) -> Result<(), String> {
    let opts = import::Options {
        selector: Selector {
            tag: a.tag.clone(),
            platform: a.platform.as_deref().map(Platform::parse).transpose()?,
        },
        unpack: unpack::Options {
            private: private(a.userxattr),
            root: super::running_as_root(),
        },
        progress: true,
    };
    let imp =
        import::import(&a.image, &a.dest, &opts).map_err(|e| format!("import failed: {e}"))?;
    for w in imp.warnings() {
        eprintln!("layerfs: warning: {w}");
    }
    let lowerdir = imp.lowerdir();
    if let Some(f) = &a.lowerdir_file {
        fs::write(f, [&lowerdir[..], b"\n"].concat())
            .map_err(|e| format!("writing '{}': {e}", f.display()))?;
    }
    let mut out = String::new();
    if !a.quiet {
        let new = imp.layers.iter().filter(|l| !l.shared).count();
        out.push_str(&format!("Image: {}\n", imp.name));
        out.push_str(&import::history_table(&imp, a.no_trunc));
        out.push_str(&format!(
            "{} layers in {} ({new} new, {} already there)\n",
            imp.layers.len(),
            a.dest.display(),
            imp.layers.len() - new
        ));
    }
    let mut out = out.into_bytes();
    out.extend_from_slice(&lowerdir);
    out.push(b'\n');
    print_out(&out)
}

/// Writes to stdout; a closed pipe is not an error.
fn print_out(s: &[u8]) -> Result<(), String> {
    let mut o = std::io::stdout().lock();
    match o.write_all(s).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| format!("writing the output: {e}")),
    }
}

pub fn export_cmd(a: ExportArgs) -> Result<(), String> {
    let mut userxattr = a.userxattr;
    let mut lowers = a.lowers.clone();
    let upper = match (&a.upper, &a.mountpoint) {
        (Some(u), _) => u.clone(),
        (None, Some(mp)) => {
            let r = crate::registry::find(mp)?;
            userxattr |= r.userxattr;
            lowers = r.lowers;
            r.upper.ok_or_else(|| {
                format!(
                    "'{}' is a read-only mount: it has no upper layer",
                    mp.display()
                )
            })?
        }
        (None, None) => return Err("give --upper DIR or a MOUNTPOINT".into()),
    };
    for l in &lowers {
        if !l.is_dir() {
            return Err(format!("--lower '{}': is not a directory", l.display()));
        }
    }
    if !upper.is_dir() {
        return Err(format!("--upper '{}': is not a directory", upper.display()));
    }
    let to_stdout = a.output.as_deref() == Some(Path::new("-"));
    if let Some(o) = a.output.as_deref().filter(|_| !to_stdout) {
        check_outside(o, &upper)?;
    }
    let compression = match (&a.compression, &a.output) {
        (Some(c), _) => Compression::parse(c)?,
        (None, Some(o)) if !to_stdout => Compression::from_name(o),
        (None, _) if a.oci_layout.is_some() => Compression::Gzip,
        (None, _) => Compression::None,
    };
    let opts = export::Options {
        private: private(userxattr),
        lowers,
        compression,
        progress: true,
    };
    let fail = |e: super::Error| format!("export failed: {e}");
    let (exp, file) = if to_stdout {
        let out = BufWriter::with_capacity(256 << 10, std::io::stdout().lock());
        let (exp, mut w) = export::export(&upper, out, &opts).map_err(fail)?;
        w.flush().map_err(|e| format!("writing to stdout: {e}"))?;
        (exp, None)
    } else {
        let target = match (&a.output, &a.oci_layout) {
            (Some(o), _) => o.clone(),
            (None, Some(l)) => layout::staging_file(l).map_err(fail)?,
            (None, None) => return Err("give -o FILE or --oci-layout DIR".into()),
        };
        let exp = write_file(&upper, &target, &opts).map_err(fail)?;
        (exp, Some(target))
    };
    let mut report = format!(
        "diff_id: {}\ndigest: {}\nsize: {}\ncompression: {}\n",
        exp.diff_id,
        exp.digest,
        exp.size,
        exp.compression.name()
    );
    for w in &exp.warnings {
        eprintln!("layerfs: warning: {w}");
    }
    if let Some(dir) = &a.oci_layout {
        let file = file.ok_or("--oci-layout needs -o FILE (not stdout)")?;
        let res = layout::append(
            dir,
            &layout::Append {
                tag: a.tag.clone(),
                new_tag: a.new_tag.clone(),
                blob: file.clone(),
                move_blob: a.output.is_none(),
                layer: exp.clone(),
                created_by: a
                    .created_by
                    .clone()
                    .unwrap_or_else(|| "layerfs export".into()),
            },
        )
        .map_err(|e| format!("appending to '{}': {e}", dir.display()))?;
        report.push_str(&format!(
            "manifest: {}\nconfig: {}\ntag: {}\n",
            res.manifest, res.config, res.tag
        ));
    }
    if to_stdout {
        eprint!("{report}");
        Ok(())
    } else {
        print_out(report.as_bytes())
    }
}

/// The output may not be inside the upper being exported (it would be
/// part of its own content).
fn check_outside(output: &Path, upper: &Path) -> Result<(), String> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (Ok(p), Ok(u)) = (fs::canonicalize(parent), fs::canonicalize(upper)) else {
        return Ok(()); // reported when writing
    };
    if p.starts_with(&u) {
        return Err(format!(
            "-o '{}' is inside the upper layer being exported",
            output.display()
        ));
    }
    Ok(())
}

/// Exports into a temporary file beside `target`, renamed into place at
/// the end: a failed export leaves no partial output.
fn write_file(
    upper: &Path,
    target: &Path,
    opts: &export::Options,
) -> Result<export::Exported, super::Error> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".layerfs-export-")
        .tempfile_in(&dir)
        .map_err(|e| super::Error::new(format!("creating a file in '{}': {e}", dir.display())))?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(|e| super::Error::new(format!("chmod '{}': {e}", tmp.path().display())))?;
    let out = BufWriter::with_capacity(256 << 10, tmp);
    let (exp, w) = export::export(upper, out, opts)?;
    let tmp = w
        .into_inner()
        .map_err(|e| super::Error::new(format!("writing '{}': {e}", target.display())))?;
    tmp.persist(target)
        .map_err(|e| super::Error::new(format!("writing '{}': {e}", target.display())))?;
    Ok(exp)
}
