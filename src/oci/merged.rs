//! A read-only view of an upper layer merged with its lowers, for the parts
//! of an upper that do not stand alone: directories renamed with the
//! kernel's `redirect_dir` (their lower content is at another path) and
//! metadata-only copy-ups (`metacopy`, their data is in a lower).
//!
//! The view is a kernel overlay mount of `lowerdir=UPPER:LOWERS…` with
//! `redirect_dir=follow,metacopy=on` (the upper as the topmost lower), on a
//! private temporary directory; it is unmounted when dropped. It needs
//! root, like any kernel overlay mount.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Ctx, Error, Result, lowerdir_value, show};
use crate::layer::cname;
use crate::sys;

pub struct MergedView {
    dir: tempfile::TempDir,
    root: Option<OwnedFd>,
}

impl MergedView {
    pub fn mount(upper: &Path, lowers: &[PathBuf], userxattr: bool) -> Result<MergedView> {
        let dir = tempfile::Builder::new()
            .prefix("layerfs-export-view-")
            .tempdir()
            .ctx(|| "creating a mount point".into())?;
        let mut layers = vec![upper.to_path_buf()];
        layers.extend(lowers.iter().cloned());
        let mut opts = b"lowerdir=".to_vec();
        opts.extend_from_slice(&lowerdir_value(&layers));
        opts.extend_from_slice(b",redirect_dir=follow,metacopy=on");
        if userxattr {
            opts.extend_from_slice(b",userxattr");
        }
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(OsString::from_vec(opts))
            .arg(dir.path())
            .output()
            .ctx(|| "running mount".into())?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "mounting the upper over its lowers (needed for renamed directories and metadata-only copy-ups) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut view = MergedView { dir, root: None };
        view.root = Some(sys::open_path_dir(view.dir.path()).ctx(|| "opening the view".into())?);
        Ok(view)
    }

    /// The directory at `path` (relative, `/`-separated) in the view.
    pub fn open_dir(&self, path: &[u8]) -> Result<OwnedFd> {
        let root = self.root.as_ref().expect("mounted view has a root");
        let mut cur = sys::openat(root.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .ctx(|| "opening the view".into())?;
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let name = cname(c).ctx(|| "bad name".into())?;
            cur = sys::open_dir_at(cur.as_fd(), &name)
                .ctx(|| format!("'/{}' in the merged view", show(path)))?;
        }
        Ok(cur)
    }
}

impl Drop for MergedView {
    fn drop(&mut self) {
        self.root = None;
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
