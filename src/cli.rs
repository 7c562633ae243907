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
/// Options understood in -o:
///   lowerdir=L1:L2 upperdir=U workdir=W   layers (escape ':' ',' '\' with '\')
///   lowerdir+=DIR                         one more lower layer (repeatable)
///   ro, rw                                read-only even with an upper
///   userxattr                             private xattrs as user.overlay.* (rootless)
///   volatile, fsync=0                     no fsync of copied-up files
///   redirect_dir=on                       directories with lower contents are
///                                         renamed, recorded as the kernel's
///                                         redirect_dir=on does (default unless
///                                         userxattr); off, follow: such
///                                         renames fail with EXDEV; nofollow
///                                         (userxattr's only value): also
///                                         EPERM for redirected directories
///   timeout=SECS                          kernel cache time of names/attrs (86400)
///   threaded=N                            FUSE worker threads
///   noacl                                 no POSIX ACL support
///   passthrough=off                       no FUSE passthrough for upper files
///   writeback                             without passthrough: the kernel's
///                                         writeback cache (see README)
///   uring=off                             no FUSE-over-io-uring (used when the
///                                         kernel offers it: fuse enable_uring=Y)
///   uring=idle                            ring threads in the idle sched class,
///                                         moved out while starved (default)
///   uring=normal                          ring threads in the normal class
///   uring=idle-commit                     ring threads in the idle sched class
///                                         while they commit a reply and wait
///   uidmapping=ID:MAPPED:LEN[:...]        show on-disk ids ID.. as MAPPED..
///   gidmapping=ID:MAPPED:LEN[:...]        (and store them back mapped)
///   squash_to_root, squash_to_uid=U, squash_to_gid=G   show every owner as given
///   static_nlink                          directories report st_nlink 1
///   allow_other, allow_root               others may use the mount (default as root)
///   nodev, nosuid, noexec, noatime        kernel mount flags (as root the
///                                         default is dev,suid, like overlayfs)
/// Accepted and ignored: default_permissions (always on), fast_ino,
/// nonempty; anything else is ignored with a warning (e.g. context=,
/// xattr_permissions=, max_write=).
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
    /// Print what an upper layer changes against its lowers, as `docker diff`
    /// does (A added, C changed, D deleted), sorted by path.
    Diff(DiffArgs),
    /// Run a command in an ephemeral overlay of the lowers, then print what
    /// it changed; exits with the command's status.
    Run(RunArgs),
    /// Unpack an OCI image layout, a `docker save` archive or a layer tar
    /// into one directory per layer, and print the `lowerdir=` to mount it.
    ///
    /// Layers are checked against their digests and unpacked in overlay
    /// format; DEST is left as it was if anything fails. Not as root, device
    /// nodes are refused and owners stay the importing user's (use
    /// --userxattr for the opaque markers then).
    Import(ImportArgs),
    /// Write an upper layer as an OCI layer tar, as docker commits one.
    Export(ExportArgs),
    /// Check that the kernel's overlayfs can mount an upper/lowers set and
    /// shows the intended view, without mounting it; --fix converts what
    /// fuse-overlayfs and OCI tools leave in an upper into the kernel's
    /// format.
    ///
    /// One line per finding: SEVERITY, LAYER:PATH, what is wrong, and the
    /// fix ("--fix:" when --fix does it), separated by tabs; a summary goes
    /// to stderr. Severities: error (the kernel refuses the set, or shows
    /// something else than was meant), warning (the view may differ, or
    /// only one of the kernel and layerfs reads it as meant), note
    /// (harmless or redundant).
    ///
    /// Findings: OCI `.wh.NAME` and `.wh..wh..opq` files in the upper (the
    /// kernel shows them as files) and in lowers (layerfs honours them, the
    /// kernel does not); fuse-overlayfs leftovers (`.wh..wh..opq` beside or
    /// instead of the opaque xattr, `user.fuseoverlayfs.opaque`, `.origin`,
    /// `.override_stat`); private xattrs of the other namespace (trusted vs
    /// user); `overlay.redirect` (followed) and its target; `overlay.metacopy`
    /// (layerfs refuses it); whiteouts inside opaque directories; block
    /// devices 0/0 and misplaced xattr whiteouts; leftovers in the work dir
    /// (work/*, index/); non-directories where a directory is expected; a
    /// work dir on another filesystem and nested or repeated layers.
    ///
    /// --fix changes only the upper, one entry at a time, each change
    /// atomic (a new whiteout is built under a temporary name in its own
    /// directory and renamed into place), then checks again. Do not fix a
    /// set that is mounted.
    ///
    /// Exit status: 0 clean, 1 findings, 2 error.
    Check(CheckArgs),
    /// Write the man page or shell completions to stdout.
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// Output options shared by `diff` and `run`.
#[derive(Args, Debug, Default)]
pub struct DiffOutput {
    /// One JSON object per line: {"kind":"A","path":"/x"}.
    #[arg(long, conflicts_with = "zero")]
    pub json: bool,
    /// End each line with NUL instead of newline (for names with newlines).
    #[arg(short = 'z', long = "null")]
    pub zero: bool,
    /// Only these kinds, e.g. `A,D`.
    #[arg(long, value_name = "KINDS")]
    pub kind: Option<String>,
    /// The layers use user.overlay.* xattrs (rootless, `userxattr`).
    #[arg(long)]
    pub userxattr: bool,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The upper layer to inspect (with --lower), instead of MOUNTPOINT.
    #[arg(
        long,
        value_name = "DIR",
        requires = "lowers",
        conflicts_with = "mountpoint"
    )]
    pub upper: Option<PathBuf>,
    /// A lower layer; repeat for more, the first is topmost.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// A running layerfs mount, whose layers are inspected.
    #[arg(value_name = "MOUNTPOINT", required_unless_present = "upper")]
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub output: DiffOutput,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A read-only lower layer; repeat for more, the first is topmost.
    #[arg(long = "lower", value_name = "DIR", required = true)]
    pub lowers: Vec<PathBuf>,
    /// Keep the changes in this directory (default: a temporary one, removed).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Run the command with the merged view as its root directory.
    #[arg(long)]
    pub chroot: bool,
    #[command(flatten)]
    pub output: DiffOutput,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
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

/// `layerfs import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// An OCI image layout (directory or tar), a `docker save` archive, or a
    /// single layer tar; plain, gzip or zstd, detected from the content.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Where the layer directories go (one per layer, named by diff_id,
    /// shared between images).
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,
    /// Which image of a layout/archive holding several (ref name or repo tag).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Which platform of a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Also write the `lowerdir=` string to this file.
    #[arg(long, value_name = "FILE")]
    pub lowerdir_file: Option<PathBuf>,
    /// Print only the `lowerdir=` line.
    #[arg(short, long)]
    pub quiet: bool,
    /// Do not shorten the history's CREATED BY column.
    #[arg(long)]
    pub no_trunc: bool,
    /// Mark opaque directories with user.overlay.opaque (rootless layers).
    #[arg(long)]
    pub userxattr: bool,
}

/// `layerfs export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The upper layer to export, instead of MOUNTPOINT.
    #[arg(long, value_name = "DIR", conflicts_with = "mountpoint")]
    pub upper: Option<PathBuf>,
    /// A lower layer under the upper; repeat for more, the first is
    /// topmost. The layer is made from the upper, as docker's overlay2
    /// driver makes it; the lowers are read only for directories renamed
    /// with redirect_dir and metadata-only copy-ups.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// A running layerfs mount, whose upper layer is exported.
    #[arg(value_name = "MOUNTPOINT", required_unless_present = "upper")]
    pub mountpoint: Option<PathBuf>,
    /// The layer tar to write (`-` for stdout); `.gz`/`.zst` compress.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        required_unless_present = "oci_layout"
    )]
    pub output: Option<PathBuf>,
    /// none, gzip or zstd (default: from the output name; gzip with
    /// --oci-layout and no output).
    #[arg(long, value_name = "KIND")]
    pub compression: Option<String>,
    /// Append the layer to the image in this OCI layout (new config,
    /// manifest and index entry).
    #[arg(long, value_name = "DIR")]
    pub oci_layout: Option<PathBuf>,
    /// The image of --oci-layout to extend; it is re-tagged to the result.
    #[arg(long, value_name = "TAG", requires = "oci_layout")]
    pub tag: Option<String>,
    /// Tag the result as this instead (keeping --tag as it was).
    #[arg(long, value_name = "TAG", requires = "oci_layout")]
    pub new_tag: Option<String>,
    /// The history entry's created_by (default: "layerfs export").
    #[arg(long, value_name = "TEXT")]
    pub created_by: Option<String>,
    /// The layers use user.overlay.* xattrs (rootless, `userxattr`).
    #[arg(long)]
    pub userxattr: bool,
}

/// `layerfs check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The upper layer to check.
    #[arg(long, value_name = "DIR", required_unless_present = "options")]
    pub upper: Option<PathBuf>,
    /// A lower layer; repeat for more, the first is topmost. A
    /// `lowerdir=` list (`L1:L2`, with `\:` for a colon) works too.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// The work dir, checked for leftovers and against the upper.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// The set as mount options: `lowerdir=L1:L2,upperdir=U,workdir=W`
    /// (and `userxattr`); other options are ignored.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<OsString>,
    /// The layers use user.overlay.* xattrs (rootless, `userxattr`).
    #[arg(long)]
    pub userxattr: bool,
    /// Convert fuse-overlayfs and OCI leftovers in the upper into the
    /// kernel's format, then check again. Lowers are never changed.
    #[arg(long)]
    pub fix: bool,
    /// One JSON object per line: {"severity","kind","layer","path","what",
    /// "fix","fixable"}; with --fix, one {"fixed",...} per repair first.
    #[arg(long)]
    pub json: bool,
}

/// `layerfs generate` (for packagers; hidden).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Generate,
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// The man page layerfs.1 (roff).
    Man,
    /// Completions for a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}
