//! The mount command: options to a validated configuration, then serve —
//! in the foreground, or forked into the background once the mount is
//! ready (the parent exits 0 only then, as container engines expect).

use std::io::Read;
use std::path::{Path, PathBuf};

use log::info;

use crate::cli::{CompatArgs, MountArgs};
use crate::config::{MountConfig, apply_option_string};
use crate::mount::new_session;
use crate::sys::process::{self, Forked};

pub fn mount_from_args(m: MountArgs) -> Result<(), String> {
    let mut cfg = MountConfig::new(m.lowers);
    cfg.upper = m.upper;
    cfg.work = m.work;
    for o in &m.options {
        apply_option_string(&mut cfg, o)?;
    }
    run(cfg, &m.mountpoint, m.foreground)
}

pub fn mount_from_compat(c: CompatArgs) -> Result<(), String> {
    let mountpoint: PathBuf = match c.positional.as_slice() {
        [mp] => mp.clone(),
        [_source, mp] => mp.clone(),
        _ => {
            return Err("missing MOUNTPOINT; usage: layerfs -o lowerdir=DIR[:DIR...][,upperdir=DIR,workdir=DIR] MOUNTPOINT (see --help)".into());
        }
    };
    let mut cfg = MountConfig::new(Vec::new());
    for o in &c.options {
        apply_option_string(&mut cfg, o)?;
    }
    run(cfg, &mountpoint, c.foreground || c.debug)
}

fn run(cfg: MountConfig, mountpoint: &Path, foreground: bool) -> Result<(), String> {
    let cfg = cfg.validate()?;
    for o in &cfg.options.ignored {
        eprintln!("layerfs: warning: ignoring unknown option '{o}'");
    }
    if foreground {
        return serve(&cfg, mountpoint, None);
    }
    match process::fork_with_pipe().map_err(|e| format!("cannot fork: {e}"))? {
        Forked::Parent { ready } => {
            let mut msg = Vec::new();
            let _ = std::fs::File::from(ready).read_to_end(&mut msg);
            match msg.as_slice() {
                b"ok" => Ok(()),
                [] => Err("the daemon exited before the mount was ready".into()),
                m => Err(String::from_utf8_lossy(m).into_owned()),
            }
        }
        Forked::Child { ready } => {
            let r = serve(&cfg, mountpoint, Some(ready));
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
    }
}

/// Mounts and serves until unmounted or signalled. `ready` gets "ok" or the
/// error message once the outcome of the mount is known.
fn serve(
    cfg: &MountConfig,
    mountpoint: &Path,
    ready: Option<std::os::fd::OwnedFd>,
) -> Result<(), String> {
    process::block_term_signals();
    // The daemon creates objects with exactly the caller's mode.
    crate::sys::umask(0);
    let mut session = match new_session(cfg, mountpoint) {
        Ok(s) => s,
        Err(e) => {
            if let Some(fd) = &ready {
                process::write_all(fd, e.as_bytes());
            }
            return Err(e);
        }
    };
    // Recorded before "ready", so `layerfs diff MOUNTPOINT` works at once.
    let record = crate::registry::record(mountpoint, cfg);
    if let Some(fd) = ready {
        process::write_all(&fd, b"ok");
        drop(fd);
        process::detach();
    }
    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        let sig = process::wait_term_signal();
        info!("signal {sig}: unmounting {}", mp.display());
        if let Err(e) = unmounter.unmount() {
            log::warn!("unmount on signal: {e}");
        }
    });
    let r = session
        .run()
        .map_err(|e| format!("filesystem loop ended with an error: {e}"));
    if let Some(f) = record {
        let _ = std::fs::remove_file(f);
    }
    r
}
