//! The `diff` and `run` commands.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use crate::cli::{DiffArgs, DiffOutput, RunArgs};
use crate::diff::{self, Change, DiffOptions, Format};
use crate::whiteout::Private;

fn options(o: &DiffOutput) -> DiffOptions {
    DiffOptions {
        private: if o.userxattr {
            Private::USER
        } else {
            Private::TRUSTED
        },
    }
}

/// Filters and prints changes; a closed pipe (`| head`) is not an error.
fn print(changes: Vec<Change>, o: &DiffOutput) -> Result<(), String> {
    let kinds = match &o.kind {
        Some(k) => Some(diff::parse_kinds(k)?),
        None => None,
    };
    let changes: Vec<Change> = changes
        .into_iter()
        .filter(|c| kinds.as_ref().is_none_or(|k| k.contains(&c.kind)))
        .collect();
    let fmt = if o.json {
        Format::Json
    } else if o.zero {
        Format::Nul
    } else {
        Format::Lines
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match diff::write_changes(&mut out, &changes, fmt).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| format!("writing the changes: {e}")),
    }
}

fn check_dir(option: &str, p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{option} '{}': is not a directory", p.display())),
        Err(e) => Err(format!("{option} '{}': {e}", p.display())),
    }
}

pub fn diff_cmd(a: DiffArgs) -> Result<(), String> {
    let mut opts = options(&a.output);
    let (upper, lowers) = match (&a.upper, &a.mountpoint) {
        (Some(u), _) => (u.clone(), a.lowers.clone()),
        (None, Some(mp)) => {
            let r = crate::registry::find(mp)?;
            if r.userxattr {
                opts.private = Private::USER;
            }
            let u = r.upper.ok_or_else(|| {
                format!("'{}' is a read-only mount: it has no changes", mp.display())
            })?;
            (u, r.lowers)
        }
        (None, None) => return Err("give --upper DIR --lower DIR ... or a MOUNTPOINT".into()),
    };
    check_dir("--upper", &upper)?;
    for l in &lowers {
        check_dir("--lower", l)?;
    }
    let changes = diff::diff(&upper, &lowers, &opts).map_err(|e| format!("diff failed: {e}"))?;
    print(changes, &a.output)
}

/// Runs the command in an ephemeral overlay and prints its changes; the
/// returned code is the command's exit status.
pub fn run_cmd(a: RunArgs) -> Result<i32, String> {
    // Before any thread exists (the mount starts FUSE threads), so that no
    // thread takes SIGINT/SIGTERM/SIGHUP by default and kills us: they are
    // forwarded to the command instead.
    crate::sys::process::block_term_signals();
    let scratch = tempfile::Builder::new()
        .prefix("layerfs-run.")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let (upper, work) = match &a.upper {
        Some(u) => {
            std::fs::create_dir_all(u).map_err(|e| format!("--upper '{}': {e}", u.display()))?;
            let parent = u
                .canonicalize()
                .map_err(|e| format!("--upper '{}': {e}", u.display()))?;
            let work = tempfile::Builder::new()
                .prefix(".layerfs-work.")
                .tempdir_in(parent.parent().unwrap_or(Path::new("/")))
                .map_err(|e| {
                    format!(
                        "cannot create a work directory beside '{}': {e}",
                        u.display()
                    )
                })?;
            (parent, Some(work))
        }
        None => (scratch.path().join("upper"), None),
    };
    let work_path: PathBuf = match &work {
        Some(w) => w.path().to_path_buf(),
        None => scratch.path().join("work"),
    };
    let mnt = scratch.path().join("merged");
    for d in [&upper, &work_path, &mnt] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create '{}': {e}", d.display()))?;
    }
    let mut ov = crate::Overlay::new();
    for l in &a.lowers {
        ov = ov.lower(l);
    }
    if a.output.userxattr {
        ov = ov.options("userxattr")?;
    }
    let guard = ov.upper(&upper, &work_path).mount(&mnt)?;
    let status = run_child(&a, &mnt);
    // Something the command left running may still use the mount: it is
    // then detached (gone from the namespace at once, freed when unused).
    guard
        .unmount_or_detach(std::time::Duration::from_secs(1))
        .map_err(|e| format!("unmount of '{}': {e}", mnt.display()))?;
    let status = status?;
    let changes = diff::diff(&upper, &a.lowers, &options(&a.output))
        .map_err(|e| format!("diff failed: {e}"))?;
    print(changes, &a.output)?;
    Ok(status)
}

/// Starts the command (in the merged view, or chrooted into it), forwards
/// SIGINT/SIGTERM to it, and returns its exit code (128+N for a signal).
fn run_child(a: &RunArgs, mnt: &Path) -> Result<i32, String> {
    let mut cmd = std::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..]);
    if !a.chroot {
        cmd.current_dir(mnt);
    }
    crate::sys::process::prepare_child(&mut cmd, a.chroot.then(|| mnt.to_path_buf()));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // Like a shell: 127 for a command not found, 126 for one that
        // cannot be executed; the (empty) diff is still printed.
        Err(e) => {
            eprintln!("layerfs: cannot run {:?}: {e}", a.command[0]);
            return Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let pid = child.id();
    std::thread::spawn(move || {
        loop {
            let sig = crate::sys::process::wait_term_signal();
            crate::sys::process::kill(pid, sig);
        }
    });
    let st = child
        .wait()
        .map_err(|e| format!("waiting for the command: {e}"))?;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}
