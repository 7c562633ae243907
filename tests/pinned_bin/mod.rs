//! The layerfs binary for one test process: a hard link (or copy) of the
//! cargo-built binary taken at first use, so that a concurrent `cargo build`
//! replacing it cannot make later cases run another build (or fail to
//! spawn). Removed at exit. Shared by the suites that spawn layerfs
//! themselves (`mod pinned_bin;`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static BIN: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_pinned_bin() {
    if let Some(p) = BIN.get()
        && p.as_path() != Path::new(env!("CARGO_BIN_EXE_layerfs"))
    {
        let _ = fs::remove_file(p);
    }
}

pub fn bin() -> &'static Path {
    BIN.get_or_init(|| {
        let orig = PathBuf::from(env!("CARGO_BIN_EXE_layerfs"));
        let mine = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "layerfs-{}-{}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = fs::remove_file(&mine);
        if fs::hard_link(&orig, &mine).is_ok() || fs::copy(&orig, &mine).is_ok() {
            // SAFETY: registering a plain extern "C" function without state.
            unsafe { libc::atexit(remove_pinned_bin) };
            mine
        } else {
            orig
        }
    })
}
