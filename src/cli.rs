//! Command-line definitions only (clap). `main.rs` turns them into a
//! validated `MountConfig` and runs the command.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// layerfs: a copy-on-write union filesystem (FUSE), format-compatible with
/// the kernel's overlayfs.
///
/// Mount forms:
///   layerfs mount --lower L1 [--lower L2 ...] [--upper U --work W] MOUNTPOINT
///   layerfs [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W[,OPTS] MOUNTPOINT
///   layerfs SOURCE MOUNTPOINT -o OPTS          (as run by mount.fuse3)
///
/// Options understood in -o: lowerdir, upperdir, workdir, ro, rw, userxattr,
/// volatile, fsync=0, allow_other, allow_root, threaded=N, nodev, nosuid,
/// noexec, noatime. Accepted and ignored: default_permissions (always on),
/// noacl, static_nlink, fast_ino, and anything unknown (with a warning).
#[derive(Parser, Debug)]
#[command(
    name = "layerfs",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub compat: CompatArgs,
}

/// The fuse-overlayfs compatible form.
#[derive(Args, Debug, Default)]
pub struct CompatArgs {
    /// Mount options (may be repeated).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<OsString>,
    /// Stay in the foreground.
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,
    /// Debug: foreground, with a log line per operation.
    #[arg(short = 'd')]
    pub debug: bool,
    /// MOUNTPOINT, or SOURCE MOUNTPOINT (mount.fuse3 order).
    #[arg(value_name = "MOUNTPOINT", num_args = 0..=2)]
    pub positional: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount an overlay (returns once the mount is ready).
    Mount(MountArgs),
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// A read-only lower layer; repeat for more, the first is topmost.
    #[arg(long = "lower", value_name = "DIR", required = true)]
    pub lowers: Vec<PathBuf>,
    /// The writable upper layer (needs --work).
    #[arg(long, value_name = "DIR", requires = "work")]
    pub upper: Option<PathBuf>,
    /// An empty directory on the upper's filesystem (needs --upper).
    #[arg(long, value_name = "DIR", requires = "upper")]
    pub work: Option<PathBuf>,
    /// Extra mount options, as with -o.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<OsString>,
    /// Stay in the foreground.
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,
    /// Where to mount.
    pub mountpoint: PathBuf,
}
