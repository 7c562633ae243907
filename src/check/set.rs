//! The checks of `layerfs check` on the set as a whole: each layer is a
//! directory, the work dir is on the upper's filesystem and outside it, no
//! layer is given twice or nested in another, and what the work dir holds.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::scan::{Scan, is_dir, join};
use super::{Kind, Layer, Severity};
use crate::error::{Context, Result};
use crate::layer::cname;
use crate::sys;

impl Scan<'_> {
    pub(super) fn open_root(&mut self, layer: Layer, path: &Path) -> Result<Option<OwnedFd>> {
        match sys::open_path_dir(path) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let what = format!("{} is not a directory", path.display());
                let how = "give the layer's directory".to_string();
                self.add(
                    layer,
                    b"",
                    (Severity::Error, Kind::NotADirectory, what, how),
                );
                Ok(None)
            }
            Err(e) => Err(e).ctx(|| format!("{layer} {}", path.display())),
        }
    }

    fn bad_set(&mut self, layer: Layer, sev: Severity, what: String, how: &str) {
        self.add(layer, b"", (sev, Kind::BadLayerSet, what, how.into()));
    }

    /// The rules the kernel (and layerfs) apply to the directories as a set.
    pub(super) fn check_set(&mut self, work: Option<&OwnedFd>) {
        let canon = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let upper = canon(&self.opts.upper);
        let nested = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        if let (Some(w), Some(wpath)) = (work, &self.opts.work) {
            let wc = canon(wpath);
            let dev = |fd: BorrowedFd<'_>| sys::fstat(fd).map(|s| s.st_dev).ok();
            let udev = self.layers[0].1.as_ref().and_then(|fd| dev(fd.as_fd()));
            if udev != dev(w.as_fd()) {
                let what = "the work dir is not on the upper's filesystem: the kernel and layerfs refuse to mount".into();
                self.bad_set(
                    Layer::Work,
                    Severity::Error,
                    what,
                    "give a work dir beside the upper, on its filesystem",
                );
            } else if nested(&wc, &upper) {
                let what = "the work dir and the upper are the same or nested: the kernel and layerfs refuse to mount".into();
                self.bad_set(
                    Layer::Work,
                    Severity::Error,
                    what,
                    "give a work dir beside the upper, not inside it",
                );
            }
        }
        let mut seen: Vec<PathBuf> = Vec::new();
        for (i, l) in self.opts.lowers.iter().enumerate() {
            let lc = canon(l);
            let wc = self.opts.work.as_ref().map(canon);
            let clash = if seen.contains(&lc) {
                Some("is given twice")
            } else if nested(&lc, &upper) || wc.as_deref().is_some_and(|w| nested(&lc, w)) {
                Some("overlaps the upper or the work dir")
            } else {
                None
            };
            if let Some(c) = clash {
                let what = format!(
                    "{} {c}: the kernel and layerfs refuse to mount",
                    l.display()
                );
                self.bad_set(
                    Layer::Lower(i),
                    Severity::Error,
                    what,
                    "give each layer once, none inside another",
                );
            }
            seen.push(lc);
        }
    }

    pub(super) fn check_work(&mut self, w: BorrowedFd<'_>) -> Result<()> {
        let mut entries = sys::read_dir(w).ctx(|| "read the work dir".into())?;
        entries.sort();
        for (name, _, _) in entries {
            let c = cname(&name)?;
            let path = join(b"", &name);
            let st = sys::fstatat(w, &c).ctx(|| "stat in the work dir".into())?;
            match (&name[..], is_dir(&st)) {
                (b"work", true) => self.work_leftovers(w, &c, &path)?,
                (b"work", false) => {
                    let what = "work/ is not a directory: the kernel replaces it at mount".into();
                    self.add(
                        Layer::Work,
                        &path,
                        (
                            Severity::Note,
                            Kind::NotADirectory,
                            what,
                            "remove it".into(),
                        ),
                    );
                }
                (b"index", _) => {
                    let what = "index/ from a mount with index=on: the kernel ignores it with index=off; with index=on it must be this upper's".into();
                    let how = "remove it if the set is mounted with index=off".into();
                    self.add(
                        Layer::Work,
                        &path,
                        (Severity::Note, Kind::WorkLeftover, what, how),
                    );
                }
                _ => {
                    let what = "layerfs refuses a work dir holding anything but work/ and index/ (the kernel does not mind)".into();
                    self.add(
                        Layer::Work,
                        &path,
                        (
                            Severity::Warning,
                            Kind::BadLayerSet,
                            what,
                            "remove it, or give an empty work dir".into(),
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn work_leftovers(&mut self, w: BorrowedFd<'_>, c: &CStr, path: &[u8]) -> Result<()> {
        let fd = sys::open_dir_at(w, c).ctx(|| "open work/".into())?;
        let mut entries = sys::read_dir(fd.as_fd()).ctx(|| "read work/".into())?;
        entries.sort();
        for (name, _, _) in entries {
            // The kernel keeps one whiteout in work/ to hard-link new
            // whiteouts to (the upper's whiteouts are links of it), and
            // leaves it there at unmount: not a leftover.
            let st = sys::fstatat(fd.as_fd(), &cname(&name)?).ctx(|| "stat in work/".into())?;
            if name.starts_with(b"#") && crate::whiteout::is_whiteout_stat(&st) {
                continue;
            }
            let what = "left in work/ by an interrupted copy-up, whiteout or rename: the kernel and layerfs empty work/ at mount".into();
            let how = "nothing to do (or remove it while nothing is mounted)".into();
            self.add(
                Layer::Work,
                &join(path, &name),
                (Severity::Note, Kind::WorkLeftover, what, how),
            );
        }
        Ok(())
    }
}
