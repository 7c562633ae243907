//! Shared by the targets that build files: where their scratch trees go,
//! and how they are removed again.

use std::path::{Path, PathBuf};

/// Where per-input scratch directories are made: `$LAYERFS_FUZZ_TMPDIR`, else
/// `/dev/shm` (tmpfs: fast, and it holds `trusted.*`/`user.*` xattrs), else
/// the system temp dir.
pub fn scratch_base() -> PathBuf {
    if let Some(d) = std::env::var_os("LAYERFS_FUZZ_TMPDIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A fresh scratch directory (prefix names the target).
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_base())
        .expect("creating a scratch directory")
}

/// Removes a scratch tree whatever modes the input gave its directories.
pub fn remove_tree(t: tempfile::TempDir) {
    let path = t.path().to_path_buf();
    if std::fs::remove_dir_all(&path).is_err() {
        make_writable(&path);
        std::fs::remove_dir_all(&path).expect("removing the scratch directory");
    }
    drop(t); // already gone: its own removal finds nothing
}

fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return;
    };
    if md.is_dir() {
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

/// `LAYERFS_FUZZ_DEBUG=1`: the targets say what each input did (for
/// checking seeds and reproducers by hand, not for fuzzing).
pub fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var_os("LAYERFS_FUZZ_DEBUG").is_some_and(|v| v != "0"))
}
