//! Mounting: the library's `Overlay` builder and `MountGuard`, and the
//! serve loop the daemon runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::config::MountConfig;
use crate::fuse::{LayerFs, Notify};
use crate::layer::Stack;
use crate::overlay::OverlayFs;

/// Builds an overlay and mounts it; see the crate docs for an example.
#[derive(Clone, Debug)]
pub struct Overlay {
    cfg: MountConfig,
}

impl Default for Overlay {
    fn default() -> Self {
        Self::new()
    }
}

impl Overlay {
    pub fn new() -> Overlay {
        Overlay {
            cfg: MountConfig::new(Vec::new()),
        }
    }

    /// Adds a lower layer below those already added (the first is topmost).
    pub fn lower(mut self, dir: impl Into<PathBuf>) -> Overlay {
        self.cfg.lowers.push(dir.into());
        self
    }

    /// Makes the overlay writable: changes go to `upper`, built in `work`
    /// (an empty directory on the same filesystem).
    pub fn upper(mut self, upper: impl Into<PathBuf>, work: impl Into<PathBuf>) -> Overlay {
        self.cfg.upper = Some(upper.into());
        self.cfg.work = Some(work.into());
        self
    }

    /// Applies a fuse-overlayfs style option string (`volatile`, `ro`, ...).
    pub fn options(mut self, opts: &str) -> Result<Overlay, String> {
        crate::config::apply_option_string(&mut self.cfg, std::ffi::OsStr::new(opts))?;
        Ok(self)
    }

    /// Validates and mounts at `mountpoint`; unmounted when the guard drops.
    pub fn mount(self, mountpoint: impl AsRef<Path>) -> Result<MountGuard, String> {
        let cfg = self.cfg.validate()?;
        let mp = mountpoint.as_ref().to_path_buf();
        let session = new_session(&cfg, &mp)?;
        let bg = session
            .spawn()
            .map_err(|e| format!("cannot start the filesystem thread: {e}"))?;
        Ok(MountGuard {
            session: Some(bg),
            mountpoint: mp,
        })
    }
}

/// A mounted overlay; dropping it (also while unwinding) unmounts it.
pub struct MountGuard {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl MountGuard {
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts now, reporting errors that `drop` would swallow.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }

    /// Unmounts, retrying while the mount is busy for up to `wait`; then
    /// (as root) detaches it lazily: it leaves the namespace at once and is
    /// freed when its last user lets go, without waiting for that.
    pub fn unmount_or_detach(mut self, wait: std::time::Duration) -> std::io::Result<()> {
        if !crate::config::is_root() {
            return self.unmount();
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            match crate::sys::umount(&self.mountpoint, false) {
                Ok(()) => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    crate::sys::umount(&self.mountpoint, true)?;
                    // Users remain: the session ends when they do; not waited
                    // for, and not dropped (that would try to unmount again).
                    std::mem::forget(self.session.take());
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            log::warn!("unmount {}: {e}", self.mountpoint.display());
        }
    }
}

/// Opens the layers and mounts; the returned session is ready to serve
/// (the kernel's INIT has been answered).
pub fn new_session(cfg: &MountConfig, mountpoint: &Path) -> Result<Session<LayerFs>, String> {
    let md = std::fs::metadata(mountpoint)
        .map_err(|e| format!("mountpoint '{}': {e}", mountpoint.display()))?;
    if !md.is_dir() {
        return Err(format!(
            "mountpoint '{}': is not a directory",
            mountpoint.display()
        ));
    }
    if let Some(fs) = mounted_at(mountpoint) {
        return Err(format!(
            "mountpoint '{}': a {fs} filesystem is already mounted there; unmount it first",
            mountpoint.display()
        ));
    }
    crate::sys::raise_nofile_limit();
    let stack = Stack::open(cfg).map_err(|e| format!("cannot open the layers: {e}"))?;
    let ov = OverlayFs::new(stack, cfg.options.clone())
        .map_err(|e| format!("cannot read the layers: {e}"))?;
    let ov = Arc::new(ov);
    let fs = LayerFs {
        ov: ov.clone(),
        view: cfg.options.view.clone(),
        ttl: cfg.options.timeout,
        acl: cfg.options.acl,
        passthrough: cfg.options.passthrough,
        writeback: cfg.options.writeback,
        uring: cfg.options.uring,
    };
    let mut config = Config::default();
    config.mount_options = mount_options(cfg);
    config.acl = if cfg.options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.options.threads);
    config.uring_class = cfg.options.uring_class;
    let session = Session::new(fs, mountpoint, &config)
        .map_err(|e| format!("cannot mount on '{}': {e}", mountpoint.display()))?;
    ov.set_invalidator(Box::new(Notify::new(
        session.notifier(),
        cfg.options.threads,
    )));
    raise_readahead(mountpoint);
    Ok(session)
}

fn mount_options(cfg: &MountConfig) -> Vec<MountOption> {
    let mut v = vec![
        MountOption::FSName("layerfs".into()),
        MountOption::Subtype("layerfs".into()),
        MountOption::DefaultPermissions,
    ];
    let writable = cfg.upper.is_some() && !cfg.options.read_only;
    v.push(if writable {
        MountOption::RW
    } else {
        MountOption::RO
    });
    // Like a kernel overlay mount, device nodes and setuid bits work (a
    // container or chroot root needs both) unless nodev/nosuid are asked
    // for; FUSE's own default would be nodev,nosuid. Only root may.
    let flags = &cfg.options.kernel_flags;
    if cfg.options.allow_other && crate::config::is_root() {
        if !flags.iter().any(|f| f == "nodev") {
            v.push(MountOption::Dev);
        }
        if !flags.iter().any(|f| f == "nosuid") {
            v.push(MountOption::Suid);
        }
    }
    for f in flags
        .iter()
        .filter(|f| !matches!(f.as_str(), "dev" | "suid"))
    {
        v.push(match f.as_str() {
            "nodev" => MountOption::NoDev,
            "nosuid" => MountOption::NoSuid,
            "noexec" => MountOption::NoExec,
            "dev" => MountOption::Dev,
            "suid" => MountOption::Suid,
            "exec" => MountOption::Exec,
            "noatime" => MountOption::NoAtime,
            _ => MountOption::Atime,
        });
    }
    v
}

/// The filesystem type mounted exactly at `p`, if any (from mountinfo).
fn mounted_at(p: &Path) -> Option<String> {
    mount_field(p, usize::MAX)
}

/// Field `idx` of the newest mountinfo line for mount point `p` (fields
/// numbered as in proc(5)), or with `usize::MAX` its filesystem type.
fn mount_field(p: &Path, idx: usize) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let canon = std::fs::canonicalize(p).ok()?;
    let want = mountinfo_escape(canon.as_os_str().as_bytes());
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    info.split(|&b| b == b'\n').rev().find_map(|l| {
        let f: Vec<&[u8]> = l.split(|&b| b == b' ').collect();
        if f.get(4) != Some(&want.as_slice()) {
            return None;
        }
        let field = if idx == usize::MAX {
            let sep = f.iter().position(|x| *x == b"-")?;
            f.get(sep + 1)?
        } else {
            f.get(idx)?
        };
        Some(String::from_utf8_lossy(field).into_owned())
    })
}

/// Paths in mountinfo escape space, tab, newline and backslash as octal.
fn mountinfo_escape(p: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    for &b in p {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => s.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            _ => s.push(b),
        }
    }
    s
}

/// FUSE's default readahead (128 KiB) makes sequential reads of lower files
/// (which go through layerfs) cost a round trip per 128 KiB; 1 MiB requests
/// need a larger window. Best effort, root only (sysfs). The device number
/// comes from mountinfo: a `stat` of the mount point would wait for this
/// very daemon, which does not serve yet.
fn raise_readahead(mountpoint: &Path) {
    let Some(dev) = mount_field(mountpoint, 2) else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        log::debug!("readahead not raised ({path}): {e}");
    }
}
