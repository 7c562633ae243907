//! Shared harness for layerfs integration tests.
//!
//! Every integration test file does `mod common;` and gets:
//!
//! * **A layer DSL** ([`Layer`]): describe a layer directory declaratively —
//!   regular files (with content, mode, owner, mtime, xattrs), directories,
//!   symlinks, hard links, fifos, sockets, char/block devices, kernel
//!   whiteouts (char 0/0), opaque directories (`trusted.overlay.opaque=y`),
//!   OCI markers (`.wh.NAME`, `.wh..wh..opq`), large pseudo-random files and
//!   sparse files. Paths and names are bytes (`impl AsRef<[u8]>`), so spaces,
//!   newlines, UTF-8 and invalid UTF-8 all work. Missing parent directories
//!   are created implicitly. Modifiers ([`Layer::mode`], [`Layer::owner`],
//!   [`Layer::xattr`], [`Layer::mtime`]) apply to the node declared last (or
//!   selected with [`Layer::at`]). Every node gets a deterministic mtime, so
//!   two builds of the same description are identical.
//! * **A stack** ([`Stack`]): builds a list of layers (topmost first) in a
//!   fresh temp dir and mounts them as a kernel overlay ([`KernelMount`]) or
//!   with the layerfs binary ([`LayerfsMount`]), read-only or with a fresh
//!   empty upper + work dir ([`Stack::under_test`] picks the backend, see
//!   below; [`Stack::try_layerfs`] returns a [`MountFailure`] instead of
//!   panicking, for layers layerfs may refuse). [`Stack::build_placed`] puts
//!   layers elsewhere, e.g. on a [`TmpfsMount`]. Guards always unmount on
//!   drop (also on panic), falling back to `umount -l`; mount points are
//!   unique per mount, so tests run in parallel. Stale mounts of dead test
//!   processes are cleaned up on first use.
//! * **Snapshots** ([`snapshot`], [`walk`]): an lstat-based walk that never
//!   follows symlinks and records for every path: type, permission bits
//!   (all 12), uid, gid, size, blocks, content (bytes if small, else a hash),
//!   symlink target, rdev, nlink (non-dirs), mtime, all xattrs with values,
//!   st_ino, st_dev — plus the raw `readdir` of every directory (names,
//!   `d_type`, `d_ino`). Kernel snapshots drop the whiteouts the kernel lists
//!   in non-merged directories but cannot look up
//!   ([`drop_listed_whiteouts`]). [`list_dir`] and [`list_dir_getdents`]
//!   (raw getdents64 with a chosen buffer size) are available directly.
//! * **Comparison** ([`compare`], [`assert_same`], [`check_invariants`],
//!   [`assert_same_raw_ino`], [`expect_view`]): a readable list of mismatches
//!   (path + field + both values). Inode identity is compared as equivalence
//!   classes (which paths share an object identity, (st_dev, st_ino)); raw
//!   st_ino equality of non-directories has its own helper
//!   ([`raw_ino_mismatches`]). Per-view invariants: no whiteouts or
//!   overlay-private xattrs visible, `readdir` names unique with `.` and `..`,
//!   never `DT_UNKNOWN`, `d_type` matching lstat, `d_ino == st_ino`, one
//!   `st_dev` for the whole view.
//! * **Differential driver** ([`differential`], [`differential_on`]): build
//!   layers, mount kernel and the filesystem under test over them (read-only
//!   and with an empty upper), snapshot both, compare, and check that the
//!   lowers (and the upper) were not modified by reading.
//!
//! The filesystem under test is layerfs by default. Setting
//! `LAYERFS_TEST_BACKEND=kernel` replaces it by a *second kernel overlay
//! mount*, which validates the harness itself (every differential test must
//! pass in that mode; the expected-view tests assert the kernel view differs
//! from the OCI expectation instead).
//!
//! Mount watchdog: a layerfs mount that lives longer than
//! `LAYERFS_TEST_MOUNT_TIMEOUT` seconds (default 180) gets its daemon killed,
//! so a hung daemon turns into failing system calls instead of a hung test.
//!
//! Must run as root (kernel overlay mounts, mknod, trusted.* xattrs, chown).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Once, mpsc};
use std::time::{Duration, Instant};

use tempfile::TempDir;

// ===========================================================================
// Small byte/path helpers
// ===========================================================================

/// Borrow a byte string as a `Path`.
pub fn bpath(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// `root` joined with a relative byte path (`b""` is `root` itself).
pub fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(bpath(rel))
    }
}

/// A `CString` of a path (panics on interior NUL, which paths cannot have).
pub fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path with NUL byte")
}

/// Escape bytes for humans: printable ASCII as is, `\n`, `\t`, `\\`, and
/// `\xNN` for everything else (so invalid UTF-8 stays visible).
pub fn esc(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// Human form of a relative path in a view: `/` + escaped bytes.
pub fn show(rel: &[u8]) -> String {
    format!("/{}", esc(rel))
}

/// Current `errno`.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Symbolic name of an errno value (for messages).
pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "OK",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ERANGE => "ERANGE",
        libc::EBUSY => "EBUSY",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn concat_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut v = parent.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), used for large files.
pub fn pattern_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; size];
    fill_pattern(&mut out, seed, 0);
    out
}

/// Fill `buf` with the pattern for `seed` starting at byte `offset` of the
/// stream (`offset` must be a multiple of 8).
fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    assert_eq!(offset % 8, 0);
    for (word_index, chunk) in (offset / 8..).zip(buf.chunks_mut(8)) {
        let mut x = word_index
            .wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(0x2545_F491_4F6C_DD1D);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

// ===========================================================================
// Layer DSL
// ===========================================================================

/// Content of a regular file in a [`Layer`].
#[derive(Clone, Debug)]
pub enum Content {
    /// Literal bytes.
    Bytes(Vec<u8>),
    /// `size` bytes of [`pattern_bytes`]`(size, seed)`, written in chunks.
    Pattern { size: u64, seed: u64 },
    /// A sparse file of apparent size `size` with data only at the given
    /// `(offset, bytes)` chunks; the rest are holes.
    Sparse {
        size: u64,
        chunks: Vec<(u64, Vec<u8>)>,
    },
}

#[derive(Clone, Debug)]
enum NodeKind {
    Dir,
    File(Content),
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Fifo,
    Socket,
    CharDev(u32, u32),
    BlockDev(u32, u32),
}

#[derive(Clone, Debug)]
struct Node {
    path: Vec<u8>,
    kind: NodeKind,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    mtime: Option<(i64, i64)>,
}

/// Declarative description of one layer directory. See the module docs.
///
/// ```ignore
/// let l = Layer::new()
///     .file("a/b.txt", "hello").mode(0o600).owner(1000, 1000)
///     .symlink("s", "/etc/passwd")
///     .whiteout("gone")
///     .opaque_dir("d").xattr("user.k", "v");
/// ```
#[derive(Clone, Debug)]
pub struct Layer {
    nodes: Vec<Node>,
    index: HashMap<Vec<u8>, usize>,
    cur: usize,
    default_mtime: Option<(i64, i64)>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

fn normalize(path: &[u8]) -> Vec<u8> {
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    for c in &comps {
        assert!(
            *c != b"." && *c != b"..",
            "layer path {} contains . or ..",
            esc(path)
        );
        assert!(
            c.len() <= 255,
            "name longer than 255 bytes in {}",
            esc(path)
        );
        assert!(!c.contains(&0), "NUL in path");
    }
    comps.join(&b'/')
}

impl Layer {
    /// An empty layer (just the root directory).
    pub fn new() -> Self {
        let root = Node {
            path: Vec::new(),
            kind: NodeKind::Dir,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
            mtime: None,
        };
        let mut index = HashMap::new();
        index.insert(Vec::new(), 0);
        Layer {
            nodes: vec![root],
            index,
            cur: 0,
            default_mtime: None,
        }
    }

    /// Number of declared nodes (including implicit parents and the root).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    fn ensure_dir(&mut self, path: &[u8]) -> usize {
        if let Some(&i) = self.index.get(path) {
            assert!(
                matches!(self.nodes[i].kind, NodeKind::Dir),
                "{} is used as a parent directory but was declared as a non-directory",
                show(path)
            );
            return i;
        }
        let (parent, _) = split_parent(path);
        if !path.is_empty() {
            self.ensure_dir(parent);
        }
        self.nodes.push(Node {
            path: path.to_vec(),
            kind: NodeKind::Dir,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
            mtime: None,
        });
        let i = self.nodes.len() - 1;
        self.index.insert(path.to_vec(), i);
        i
    }

    fn add(mut self, path: impl AsRef<[u8]>, kind: NodeKind) -> Self {
        let path = normalize(path.as_ref());
        if let NodeKind::Dir = kind {
            self.cur = self.ensure_dir(&path);
            return self;
        }
        assert!(!path.is_empty(), "the layer root can only be a directory");
        assert!(
            !self.index.contains_key(&path),
            "{} declared twice in one layer",
            show(&path)
        );
        if let NodeKind::Hardlink(target) = &kind {
            let t = self
                .index
                .get(target)
                .unwrap_or_else(|| panic!("hard link target {} not declared before", show(target)));
            assert!(
                !matches!(self.nodes[*t].kind, NodeKind::Dir),
                "hard link to a directory"
            );
        }
        let (parent, _) = split_parent(&path);
        let parent = parent.to_vec();
        self.ensure_dir(&parent);
        self.nodes.push(Node {
            path: path.clone(),
            kind,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
            mtime: None,
        });
        self.cur = self.nodes.len() - 1;
        self.index.insert(path, self.cur);
        self
    }

    /// A directory (declaring an existing directory again just selects it).
    pub fn dir(self, path: impl AsRef<[u8]>) -> Self {
        self.add(path, NodeKind::Dir)
    }

    /// A regular file with the given content.
    pub fn file(self, path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Self {
        let c = Content::Bytes(content.as_ref().to_vec());
        self.add(path, NodeKind::File(c))
    }

    /// A regular file with any [`Content`].
    pub fn file_content(self, path: impl AsRef<[u8]>, content: Content) -> Self {
        self.add(path, NodeKind::File(content))
    }

    /// A large file of `size` pseudo-random bytes ([`pattern_bytes`]).
    pub fn large_file(self, path: impl AsRef<[u8]>, size: u64, seed: u64) -> Self {
        self.add(path, NodeKind::File(Content::Pattern { size, seed }))
    }

    /// A sparse file of apparent `size` with data only at `chunks`.
    pub fn sparse_file(self, path: impl AsRef<[u8]>, size: u64, chunks: &[(u64, &[u8])]) -> Self {
        let chunks = chunks.iter().map(|(o, d)| (*o, d.to_vec())).collect();
        self.add(path, NodeKind::File(Content::Sparse { size, chunks }))
    }

    /// A symlink (the target is stored verbatim, never resolved).
    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let t = target.as_ref().to_vec();
        self.add(path, NodeKind::Symlink(t))
    }

    /// A hard link at `path` to the already declared non-directory `existing`.
    /// Modifiers on it change the shared inode.
    pub fn hardlink(self, path: impl AsRef<[u8]>, existing: impl AsRef<[u8]>) -> Self {
        let t = normalize(existing.as_ref());
        self.add(path, NodeKind::Hardlink(t))
    }

    /// A named pipe.
    pub fn fifo(self, path: impl AsRef<[u8]>) -> Self {
        self.add(path, NodeKind::Fifo)
    }

    /// A unix socket (made by binding a listener; `mknod` if the path is too
    /// long for `sun_path`).
    pub fn socket(self, path: impl AsRef<[u8]>) -> Self {
        self.add(path, NodeKind::Socket)
    }

    /// A character device.
    pub fn char_dev(self, path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        self.add(path, NodeKind::CharDev(major, minor))
    }

    /// A block device.
    pub fn block_dev(self, path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        self.add(path, NodeKind::BlockDev(major, minor))
    }

    /// A kernel-format whiteout: character device 0/0 (mode 0, like the
    /// kernel creates them).
    pub fn whiteout(self, path: impl AsRef<[u8]>) -> Self {
        self.add(path, NodeKind::CharDev(0, 0))
    }

    /// A directory marked opaque with `trusted.overlay.opaque=y`.
    pub fn opaque_dir(self, path: impl AsRef<[u8]>) -> Self {
        self.dir(path).xattr("trusted.overlay.opaque", "y")
    }

    /// An OCI whiteout marker: an empty file `PARENT/.wh.NAME` (mode 0600).
    pub fn oci_whiteout(self, path: impl AsRef<[u8]>) -> Self {
        let path = normalize(path.as_ref());
        let (parent, name) = split_parent(&path);
        let mut marker = b".wh.".to_vec();
        marker.extend_from_slice(name);
        let marker = concat_path(parent, &marker);
        self.file(marker, "").mode(0o600)
    }

    /// An OCI opaque marker: directory `dir` containing `.wh..wh..opq`.
    /// Selects `dir` afterwards.
    pub fn oci_opaque(self, dir: impl AsRef<[u8]>) -> Self {
        let dir = normalize(dir.as_ref());
        let marker = concat_path(&dir, b".wh..wh..opq");
        self.dir(&dir).file(marker, "").mode(0o600).at(&dir)
    }

    /// Select an already declared node (`""` is the layer root) for the
    /// following modifiers.
    pub fn at(mut self, path: impl AsRef<[u8]>) -> Self {
        let path = normalize(path.as_ref());
        self.cur = *self
            .index
            .get(&path)
            .unwrap_or_else(|| panic!("at({}): not declared", show(&path)));
        self
    }

    /// Permission bits (incl. setuid/setgid/sticky) of the selected node.
    pub fn mode(mut self, mode: u32) -> Self {
        assert!(
            !matches!(self.nodes[self.cur].kind, NodeKind::Symlink(_)),
            "symlinks have no settable mode"
        );
        assert_eq!(mode & !0o7777, 0, "mode {mode:o} has non-permission bits");
        self.nodes[self.cur].mode = Some(mode);
        self
    }

    /// Owner of the selected node (applied with lchown, before the mode, so
    /// setuid bits survive).
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.nodes[self.cur].owner = Some((uid, gid));
        self
    }

    /// Add an extended attribute to the selected node (lsetxattr).
    pub fn xattr(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        let n = self.cur;
        self.nodes[n]
            .xattrs
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// mtime (and atime) of the selected node.
    pub fn mtime(mut self, sec: i64, nsec: i64) -> Self {
        self.nodes[self.cur].mtime = Some((sec, nsec));
        self
    }

    /// mtime for every node without an explicit one. [`Stack::build`] gives
    /// each layer a distinct default when this is not set.
    pub fn default_mtime(mut self, sec: i64, nsec: i64) -> Self {
        self.default_mtime = Some((sec, nsec));
        self
    }

    fn default_mode(kind: &NodeKind) -> Option<u32> {
        match kind {
            NodeKind::Dir => Some(0o755),
            NodeKind::File(_) => Some(0o644),
            NodeKind::Fifo => Some(0o644),
            NodeKind::Socket => Some(0o755),
            NodeKind::CharDev(0, 0) => Some(0),
            NodeKind::CharDev(..) | NodeKind::BlockDev(..) => Some(0o640),
            NodeKind::Symlink(_) | NodeKind::Hardlink(_) => None,
        }
    }

    /// Create the layer in `dir` (created if missing; must be empty or new).
    pub fn build(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        for node in &self.nodes[1..] {
            create_node(dir, node);
        }
        // Attributes: owner first (chown clears setuid/setgid), then mode,
        // then xattrs.
        for node in &self.nodes {
            let path = join(dir, &node.path);
            if let Some((uid, gid)) = node.owner {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
            }
            let mode = node.mode.or_else(|| Self::default_mode(&node.kind));
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            }
            for (name, value) in &node.xattrs {
                set_xattr(&path, name, value).unwrap_or_else(|e| {
                    panic!(
                        "lsetxattr {} {}: {}",
                        path.display(),
                        esc(name),
                        errno_name(e)
                    )
                });
            }
        }
        // Times last, children before parents (reverse declaration order);
        // an inode reached again through a hard link keeps the first time set.
        let default = self.default_mtime.unwrap_or((1_000_000_000, 0));
        let mut done: HashSet<u64> = HashSet::new();
        for node in self.nodes.iter().rev() {
            let path = join(dir, &node.path);
            let ino = fs::symlink_metadata(&path).expect("lstat built node").ino();
            let t = match (&node.kind, node.mtime) {
                (_, Some(t)) => t,
                (NodeKind::Hardlink(_), None) => continue,
                (_, None) => default,
            };
            if !done.insert(ino) {
                continue;
            }
            set_mtime(&path, t)
                .unwrap_or_else(|e| panic!("utimensat {}: {}", path.display(), errno_name(e)));
        }
    }
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> Result<(), i32> {
    let c = cpath(path);
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

/// `lsetxattr(path, name, value)`.
pub fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> Result<(), i32> {
    let c = cpath(path);
    let n = CString::new(name).expect("xattr name with NUL");
    // SAFETY: valid C strings and a valid (ptr, len) buffer for the value.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

/// Set atime and mtime of `path` without following a final symlink.
pub fn set_mtime(path: &Path, (sec, nsec): (i64, i64)) -> Result<(), i32> {
    let c = cpath(path);
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    // SAFETY: `c` is a valid path and `times` an array of two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

fn create_node(root: &Path, node: &Node) {
    let path = join(root, &node.path);
    let ctx = |e: &dyn std::fmt::Display| format!("creating {}: {e}", path.display());
    match &node.kind {
        NodeKind::Dir => fs::create_dir(&path).unwrap_or_else(|e| panic!("{}", ctx(&e))),
        NodeKind::File(content) => write_content(&path, content),
        NodeKind::Symlink(target) => std::os::unix::fs::symlink(bpath(target), &path)
            .unwrap_or_else(|e| panic!("{}", ctx(&e))),
        NodeKind::Hardlink(target) => {
            fs::hard_link(join(root, target), &path).unwrap_or_else(|e| panic!("{}", ctx(&e)))
        }
        NodeKind::Fifo => mknod(&path, libc::S_IFIFO | 0o644, 0)
            .unwrap_or_else(|e| panic!("{}", ctx(&errno_name(e)))),
        NodeKind::Socket => {
            if path.as_os_str().len() < 100 {
                let l = std::os::unix::net::UnixListener::bind(&path)
                    .unwrap_or_else(|e| panic!("{}", ctx(&e)));
                drop(l);
            } else {
                mknod(&path, libc::S_IFSOCK | 0o755, 0)
                    .unwrap_or_else(|e| panic!("{}", ctx(&errno_name(e))));
            }
        }
        NodeKind::CharDev(ma, mi) => mknod(&path, libc::S_IFCHR, libc::makedev(*ma, *mi))
            .unwrap_or_else(|e| panic!("{}", ctx(&errno_name(e)))),
        NodeKind::BlockDev(ma, mi) => mknod(&path, libc::S_IFBLK, libc::makedev(*ma, *mi))
            .unwrap_or_else(|e| panic!("{}", ctx(&errno_name(e)))),
    }
}

fn write_content(path: &Path, content: &Content) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    match content {
        Content::Bytes(b) => f.write_all(b).expect("write"),
        Content::Pattern { size, seed } => {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < *size {
                let n = ((*size - off) as usize).min(buf.len());
                fill_pattern(&mut buf[..n], *seed, off);
                f.write_all(&buf[..n]).expect("write");
                off += n as u64;
            }
        }
        Content::Sparse { size, chunks } => {
            f.set_len(*size).expect("set_len");
            for (off, data) in chunks {
                f.write_all_at(data, *off).expect("pwrite");
            }
        }
    }
}

// ===========================================================================
// Snapshots (walk + readdir)
// ===========================================================================

/// File type as seen by lstat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// lstat failed or returned an unknown S_IFMT.
    Unknown,
}

impl FileType {
    fn from_mode(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileType::Dir,
            libc::S_IFREG => FileType::File,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFIFO => FileType::Fifo,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDev,
            libc::S_IFBLK => FileType::BlockDev,
            _ => FileType::Unknown,
        }
    }

    /// The `d_type` readdir should report for this type.
    pub fn d_type(self) -> u8 {
        match self {
            FileType::Dir => libc::DT_DIR,
            FileType::File => libc::DT_REG,
            FileType::Symlink => libc::DT_LNK,
            FileType::Fifo => libc::DT_FIFO,
            FileType::Socket => libc::DT_SOCK,
            FileType::CharDev => libc::DT_CHR,
            FileType::BlockDev => libc::DT_BLK,
            FileType::Unknown => libc::DT_UNKNOWN,
        }
    }
}

/// Human name of a `d_type` value.
pub fn d_type_name(t: u8) -> &'static str {
    match t {
        libc::DT_DIR => "DT_DIR",
        libc::DT_REG => "DT_REG",
        libc::DT_LNK => "DT_LNK",
        libc::DT_FIFO => "DT_FIFO",
        libc::DT_SOCK => "DT_SOCK",
        libc::DT_CHR => "DT_CHR",
        libc::DT_BLK => "DT_BLK",
        libc::DT_UNKNOWN => "DT_UNKNOWN",
        _ => "DT_?",
    }
}

/// What was read from a regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentSummary {
    /// The whole content (files up to [`SMALL_CONTENT`] bytes).
    Bytes(Vec<u8>),
    /// Length and 128-bit hash of larger files.
    Hash { len: u64, hash: u128 },
    /// open/read failed with this errno.
    Error(i32),
}

/// Files up to this size are kept verbatim in a snapshot.
pub const SMALL_CONTENT: usize = 512;

impl std::fmt::Display for ContentSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentSummary::Bytes(b) => write!(f, "\"{}\"", esc(b)),
            ContentSummary::Hash { len, hash } => write!(f, "<{len} bytes, hash {hash:032x}>"),
            ContentSummary::Error(e) => write!(f, "<read error {}>", errno_name(*e)),
        }
    }
}

/// Value of one xattr (or the errno lgetxattr gave for a listed name).
pub type XattrValue = Result<Vec<u8>, i32>;

/// lstat-based information about one path of a view.
#[derive(Clone, Debug)]
pub struct Entry {
    pub ftype: FileType,
    /// All 12 permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `st_size` of regular files and symlinks.
    pub size: Option<u64>,
    /// `st_blocks` of regular files (holes of sparse files show here).
    pub blocks: Option<u64>,
    pub content: Option<ContentSummary>,
    /// readlink of symlinks.
    pub target: Option<Vec<u8>>,
    /// (major, minor) of char and block devices.
    pub rdev: Option<(u32, u32)>,
    /// `st_nlink` of non-directories.
    pub nlink: Option<u64>,
    /// (sec, nsec).
    pub mtime: (i64, i64),
    /// llistxattr + lgetxattr, or the errno llistxattr failed with.
    pub xattrs: Result<BTreeMap<Vec<u8>, XattrValue>, i32>,
    pub ino: u64,
    pub dev: u64,
    /// lstat (or readlink) failure, as text.
    pub error: Option<String>,
}

impl Entry {
    /// One-line summary, used when a path exists in one view only.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("<{e}>");
        }
        let mut s = format!(
            "{:?} mode={:04o} uid={} gid={}",
            self.ftype, self.mode, self.uid, self.gid
        );
        if let Some(size) = self.size {
            let _ = write!(s, " size={size}");
        }
        if let Some(t) = &self.target {
            let _ = write!(s, " -> \"{}\"", esc(t));
        }
        if let Some((a, b)) = self.rdev {
            let _ = write!(s, " rdev={a}:{b}");
        }
        if let Some(ContentSummary::Bytes(b)) = &self.content {
            let _ = write!(s, " content=\"{}\"", esc(&b[..b.len().min(40)]));
        }
        s
    }
}

/// One `readdir` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEnt {
    pub name: Vec<u8>,
    pub d_type: u8,
    pub d_ino: u64,
}

/// The raw readdir result of one directory (in readdir order).
#[derive(Clone, Debug)]
pub struct Listing {
    pub entries: Vec<DirEnt>,
    /// errno of opendir/readdir, if it failed.
    pub error: Option<i32>,
}

/// Relative path (bytes, `b""` = root) → entry.
pub type Tree = BTreeMap<Vec<u8>, Entry>;

/// A full view of a directory tree: lstat info of every path and the raw
/// readdir of every directory.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Name used in reports ("kernel", "layerfs", "expected", ...).
    pub label: String,
    pub root: PathBuf,
    pub entries: Tree,
    pub dirs: BTreeMap<Vec<u8>, Listing>,
}

struct Hasher {
    a: u64,
    b: u64,
    len: u64,
    pending: Vec<u8>,
}

impl Hasher {
    fn new() -> Self {
        Hasher {
            a: 0x243F_6A88_85A3_08D3,
            b: 0x1319_8A2E_0370_7344,
            len: 0,
            pending: Vec::new(),
        }
    }

    fn word(&mut self, x: u64) {
        self.a = (self.a ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.a ^= self.a >> 29;
        self.b = (self.b.rotate_left(23) ^ x).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            while !data.is_empty() && self.pending.len() < 8 {
                self.pending.push(data[0]);
                data = &data[1..];
            }
            if self.pending.len() == 8 {
                let w = u64::from_le_bytes(self.pending[..8].try_into().unwrap());
                self.word(w);
                self.pending.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.word(w);
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    fn finish(mut self) -> u128 {
        let mut tail = [0u8; 8];
        tail[..self.pending.len()].copy_from_slice(&self.pending);
        let w = u64::from_le_bytes(tail);
        self.word(w);
        self.word(self.len);
        ((self.a as u128) << 64) | self.b as u128
    }
}

/// Read a whole directory with opendir/readdir64 (including `.` and `..`).
pub fn list_dir(path: &Path) -> Result<Vec<DirEnt>, i32> {
    let c = cpath(path);
    // SAFETY: `c` is a valid NUL-terminated path.
    let dirp = unsafe { libc::opendir(c.as_ptr()) };
    if dirp.is_null() {
        return Err(errno());
    }
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: writing errno of this thread, to tell end-of-dir from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is a valid, open DIR stream.
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            let e = errno();
            break if e == 0 { Ok(()) } else { Err(e) };
        }
        // SAFETY: `ent` points to a valid dirent64 until the next readdir on
        // `dirp`; d_name is NUL-terminated.
        let (name, d_type, d_ino) = unsafe {
            (
                CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes().to_vec(),
                (*ent).d_type,
                (*ent).d_ino,
            )
        };
        out.push(DirEnt {
            name,
            d_type,
            d_ino,
        });
    };
    // SAFETY: `dirp` came from opendir and is closed exactly once.
    unsafe { libc::closedir(dirp) };
    result.map(|_| out)
}

/// Read a whole directory with raw `getdents64` calls into a buffer of
/// `bufsize` bytes (small buffers force many calls that resume at the
/// offset of the last returned entry). Includes `.` and `..`.
pub fn list_dir_getdents(path: &Path, bufsize: usize) -> Result<Vec<DirEnt>, i32> {
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    let mut buf = vec![0u8; bufsize];
    let mut out = Vec::new();
    loop {
        // SAFETY: `fd` is an open directory and `buf` a writable buffer of
        // `buf.len()` bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0usize;
        while off < n as usize {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen;
            //                         u8 d_type; char d_name[]; }
            let rec = &buf[off..n as usize];
            let d_ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap());
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap()) as usize;
            let d_type = rec[18];
            let name_area = &rec[19..reclen];
            let len = name_area
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_area.len());
            out.push(DirEnt {
                name: name_area[..len].to_vec(),
                d_type,
                d_ino,
            });
            assert!(reclen > 0, "getdents64 returned a zero-length record");
            off += reclen;
        }
    }
}

/// llistxattr + lgetxattr of every listed name.
pub fn get_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, XattrValue>, i32> {
    let c = cpath(path);
    let mut buf: Vec<u8> = vec![0; 4096];
    let names = loop {
        // SAFETY: `buf` is a writable buffer of buf.len() bytes.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break buf;
        }
        let e = errno();
        if e != libc::ERANGE {
            return Err(e);
        }
        // SAFETY: size query with a null buffer.
        let need = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            return Err(errno());
        }
        buf = vec![0; need as usize + 1024];
    };
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        out.insert(name.to_vec(), get_xattr(path, name));
    }
    Ok(out)
}

/// lgetxattr of one name.
pub fn get_xattr(path: &Path, name: &[u8]) -> XattrValue {
    let c = cpath(path);
    let cn = CString::new(name).expect("NUL in xattr name");
    let mut buf: Vec<u8> = vec![0; 1024];
    loop {
        // SAFETY: valid C strings and a writable buffer of buf.len() bytes.
        let n =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = errno();
        if e != libc::ERANGE || buf.len() > (1 << 20) {
            return Err(e);
        }
        let l = buf.len() * 4;
        buf = vec![0; l];
    }
}

fn read_content(path: &Path, buf: &mut [u8]) -> ContentSummary {
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return ContentSummary::Error(e.raw_os_error().unwrap_or(-1)),
    };
    let mut h = Hasher::new();
    let mut small = Vec::new();
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return ContentSummary::Error(e.raw_os_error().unwrap_or(-1)),
            }
        }
        if filled == 0 {
            break;
        }
        if small.len() <= SMALL_CONTENT {
            let take = filled.min(SMALL_CONTENT + 1 - small.len());
            small.extend_from_slice(&buf[..take]);
        }
        h.update(&buf[..filled]);
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    if total as usize <= SMALL_CONTENT {
        ContentSummary::Bytes(small)
    } else {
        ContentSummary::Hash {
            len: total,
            hash: h.finish(),
        }
    }
}

fn stat_entry(path: &Path, buf: &mut [u8]) -> Entry {
    let md = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Entry {
                ftype: FileType::Unknown,
                mode: 0,
                uid: 0,
                gid: 0,
                size: None,
                blocks: None,
                content: None,
                target: None,
                rdev: None,
                nlink: None,
                mtime: (0, 0),
                xattrs: Ok(BTreeMap::new()),
                ino: 0,
                dev: 0,
                error: Some(format!(
                    "lstat: {}",
                    errno_name(e.raw_os_error().unwrap_or(-1))
                )),
            };
        }
    };
    let ftype = FileType::from_mode(md.mode());
    let mut e = Entry {
        ftype,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: None,
        blocks: None,
        content: None,
        target: None,
        rdev: None,
        nlink: if ftype == FileType::Dir {
            None
        } else {
            Some(md.nlink())
        },
        mtime: (md.mtime(), md.mtime_nsec()),
        xattrs: get_xattrs(path),
        ino: md.ino(),
        dev: md.dev(),
        error: None,
    };
    match ftype {
        FileType::File => {
            e.size = Some(md.size());
            e.blocks = Some(md.blocks());
            e.content = Some(read_content(path, buf));
        }
        FileType::Symlink => {
            e.size = Some(md.size());
            match fs::read_link(path) {
                Ok(t) => e.target = Some(t.into_os_string().into_vec()),
                Err(err) => {
                    e.error = Some(format!(
                        "readlink: {}",
                        errno_name(err.raw_os_error().unwrap_or(-1))
                    ))
                }
            }
        }
        FileType::CharDev | FileType::BlockDev => {
            let r = md.rdev();
            e.rdev = Some((libc::major(r), libc::minor(r)));
        }
        _ => {}
    }
    e
}

use std::os::unix::ffi::OsStringExt;

/// Walk `root` (never following symlinks) and return the lstat view of every
/// path, keyed by relative path bytes (`b""` = `root`).
pub fn walk(root: &Path) -> Tree {
    snapshot("walk", root).entries
}

/// Walk `root` recording lstat info of every path and the raw readdir of
/// every directory. Errors are recorded, never panicked on.
pub fn snapshot(label: &str, root: &Path) -> Snapshot {
    let mut buf = vec![0u8; 1 << 20];
    let mut entries = Tree::new();
    let mut dirs = BTreeMap::new();
    let root_entry = stat_entry(root, &mut buf);
    let root_is_dir = root_entry.ftype == FileType::Dir;
    entries.insert(Vec::new(), root_entry);
    let mut stack: Vec<Vec<u8>> = if root_is_dir {
        vec![Vec::new()]
    } else {
        Vec::new()
    };
    while let Some(rel) = stack.pop() {
        let dpath = join(root, &rel);
        let listing = match list_dir(&dpath) {
            Ok(v) => Listing {
                entries: v,
                error: None,
            },
            Err(e) => Listing {
                entries: Vec::new(),
                error: Some(e),
            },
        };
        for de in &listing.entries {
            if de.name == b"." || de.name == b".." {
                continue;
            }
            let child = concat_path(&rel, &de.name);
            if entries.contains_key(&child) {
                continue; // duplicate name: reported by check_invariants
            }
            let e = stat_entry(&join(root, &child), &mut buf);
            if e.ftype == FileType::Dir {
                stack.push(child.clone());
            }
            entries.insert(child, e);
        }
        dirs.insert(rel, listing);
    }
    Snapshot {
        label: label.to_string(),
        root: root.to_path_buf(),
        entries,
        dirs,
    }
}

/// Kernel quirk normalisation for reference snapshots.
///
/// In a directory that is not merged (present in one layer only, or opaque
/// in the topmost layer that has it) the kernel's readdir passes the real
/// directory through, so a whiteout stored there is *listed* (as `DT_CHR`)
/// although looking it up gives `ENOENT`. SPEC §2 says whiteouts are never
/// visible in readdir, so the kernel's reference view is taken without such
/// names. Returns the paths dropped.
pub fn drop_listed_whiteouts(s: &mut Snapshot) -> Vec<Vec<u8>> {
    let mut dropped = Vec::new();
    for (dir, listing) in s.dirs.iter_mut() {
        listing.entries.retain(|de| {
            if de.d_type != libc::DT_CHR {
                return true;
            }
            let p = concat_path(dir, &de.name);
            let unreachable = s
                .entries
                .get(&p)
                .is_some_and(|e| e.error.as_deref() == Some("lstat: ENOENT"));
            if unreachable {
                dropped.push(p);
            }
            !unreachable
        });
    }
    for p in &dropped {
        s.entries.remove(p);
    }
    dropped
}

// ===========================================================================
// Comparison
// ===========================================================================

/// What [`compare_with`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct CompareOpts {
    /// Compare mtimes of non-directories.
    pub mtime: bool,
    /// Compare mtimes of directories.
    pub dir_mtime: bool,
    /// Compare st_blocks of regular files.
    pub blocks: bool,
    /// Compare inode identity as equivalence classes.
    pub ino_classes: bool,
    /// Compare readdir name → d_type maps.
    pub readdir: bool,
    /// Also run [`check_invariants`] on both snapshots.
    pub invariants: bool,
}

impl Default for CompareOpts {
    fn default() -> Self {
        CompareOpts {
            mtime: true,
            dir_mtime: true,
            blocks: true,
            ino_classes: true,
            readdir: true,
            invariants: true,
        }
    }
}

impl CompareOpts {
    /// For comparing raw layer directories (before/after): no view
    /// invariants (layers legitimately hold whiteouts and overlay xattrs).
    pub fn raw_dirs() -> Self {
        CompareOpts {
            invariants: false,
            ..Default::default()
        }
    }
}

fn fmt_xattrs(x: &Result<BTreeMap<Vec<u8>, XattrValue>, i32>) -> String {
    match x {
        Err(e) => format!("<llistxattr error {}>", errno_name(*e)),
        Ok(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| match v {
                    Ok(v) => format!("{}=\"{}\"", esc(k), esc(v)),
                    Err(e) => format!("{}=<{}>", esc(k), errno_name(*e)),
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

fn fmt_opt<T: std::fmt::Debug>(v: &Option<T>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "-".into(),
    }
}

/// Compare two snapshots with default options (everything).
pub fn compare(kernel: &Snapshot, layerfs: &Snapshot) -> Vec<String> {
    compare_with(CompareOpts::default(), kernel, layerfs)
}

/// Compare two snapshots; returns one human-readable line per mismatch,
/// naming the path, the field and both values (labelled with the snapshots'
/// labels). `a` is the reference.
pub fn compare_with(opts: CompareOpts, a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let (la, lb) = (&a.label, &b.label);
    let mut out = Vec::new();
    if opts.invariants {
        out.extend(check_invariants(a));
        out.extend(check_invariants(b));
    }
    let keys: BTreeSet<&Vec<u8>> = a.entries.keys().chain(b.entries.keys()).collect();
    // Paths whose parent is missing in the other view are summarised by the
    // parent only.
    let mut missing_dirs_a: Vec<Vec<u8>> = Vec::new();
    let mut missing_dirs_b: Vec<Vec<u8>> = Vec::new();
    let under = |list: &Vec<Vec<u8>>, p: &[u8]| {
        list.iter()
            .any(|d| p.len() > d.len() && p.starts_with(d) && p[d.len()] == b'/')
    };
    for k in keys {
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(ea), None) => {
                if under(&missing_dirs_b, k) {
                    continue;
                }
                if ea.ftype == FileType::Dir {
                    missing_dirs_b.push(k.clone());
                }
                out.push(format!(
                    "{}: only in {la} ({}), missing in {lb}",
                    show(k),
                    ea.summary()
                ));
            }
            (None, Some(eb)) => {
                if under(&missing_dirs_a, k) {
                    continue;
                }
                if eb.ftype == FileType::Dir {
                    missing_dirs_a.push(k.clone());
                }
                out.push(format!(
                    "{}: only in {lb} ({}), missing in {la}",
                    show(k),
                    eb.summary()
                ));
            }
            (Some(ea), Some(eb)) => compare_entry(opts, k, la, ea, lb, eb, &mut out),
            (None, None) => unreachable!(),
        }
    }
    if opts.ino_classes {
        out.extend(compare_ino_classes(a, b));
    }
    if opts.readdir {
        for (d, lista) in &a.dirs {
            let Some(listb) = b.dirs.get(d) else { continue };
            let ma: BTreeMap<&[u8], u8> = lista
                .entries
                .iter()
                .map(|e| (&e.name[..], e.d_type))
                .collect();
            let mb: BTreeMap<&[u8], u8> = listb
                .entries
                .iter()
                .map(|e| (&e.name[..], e.d_type))
                .collect();
            if lista.error != listb.error {
                out.push(format!(
                    "readdir {}: error {la}={} {lb}={}",
                    show(d),
                    fmt_opt(&lista.error.map(errno_name)),
                    fmt_opt(&listb.error.map(errno_name))
                ));
            }
            for name in ma.keys().chain(mb.keys()).collect::<BTreeSet<_>>() {
                let (ta, tb) = (ma.get(name), mb.get(name));
                if ta != tb {
                    out.push(format!(
                        "readdir {}: entry \"{}\" d_type {la}={} {lb}={}",
                        show(d),
                        esc(name),
                        ta.map(|t| d_type_name(*t)).unwrap_or("absent"),
                        tb.map(|t| d_type_name(*t)).unwrap_or("absent"),
                    ));
                }
            }
        }
    }
    out
}

fn compare_entry(
    opts: CompareOpts,
    k: &[u8],
    la: &str,
    ea: &Entry,
    lb: &str,
    eb: &Entry,
    out: &mut Vec<String>,
) {
    let p = show(k);
    let mut diff = |field: &str, va: String, vb: String| {
        if va != vb {
            out.push(format!("{p}: {field}: {la}={va} {lb}={vb}"));
        }
    };
    if ea.error.is_some() || eb.error.is_some() {
        diff("error", fmt_opt(&ea.error), fmt_opt(&eb.error));
        if ea.ftype != eb.ftype {
            diff("type", format!("{:?}", ea.ftype), format!("{:?}", eb.ftype));
        }
        return;
    }
    if ea.ftype != eb.ftype {
        diff("type", format!("{:?}", ea.ftype), format!("{:?}", eb.ftype));
        return;
    }
    diff(
        "mode",
        format!("{:04o}", ea.mode),
        format!("{:04o}", eb.mode),
    );
    diff("uid", ea.uid.to_string(), eb.uid.to_string());
    diff("gid", ea.gid.to_string(), eb.gid.to_string());
    diff("size", fmt_opt(&ea.size), fmt_opt(&eb.size));
    if opts.blocks {
        diff("blocks", fmt_opt(&ea.blocks), fmt_opt(&eb.blocks));
    }
    let content =
        |c: &Option<ContentSummary>| c.as_ref().map(|c| c.to_string()).unwrap_or("-".into());
    diff("content", content(&ea.content), content(&eb.content));
    let target = |t: &Option<Vec<u8>>| {
        t.as_ref()
            .map(|t| format!("\"{}\"", esc(t)))
            .unwrap_or("-".into())
    };
    diff("symlink target", target(&ea.target), target(&eb.target));
    diff("rdev", fmt_opt(&ea.rdev), fmt_opt(&eb.rdev));
    diff("nlink", fmt_opt(&ea.nlink), fmt_opt(&eb.nlink));
    let check_mtime = if ea.ftype == FileType::Dir {
        opts.dir_mtime
    } else {
        opts.mtime
    };
    if check_mtime {
        diff(
            "mtime",
            format!("{}.{:09}", ea.mtime.0, ea.mtime.1),
            format!("{}.{:09}", eb.mtime.0, eb.mtime.1),
        );
    }
    diff("xattrs", fmt_xattrs(&ea.xattrs), fmt_xattrs(&eb.xattrs));
}

/// Paths grouped by object identity, (st_dev, st_ino): the kernel reports
/// several st_dev values when layers are on different filesystems.
fn ino_groups(s: &Snapshot) -> HashMap<(u64, u64), Vec<&Vec<u8>>> {
    let mut m: HashMap<(u64, u64), Vec<&Vec<u8>>> = HashMap::new();
    for (k, e) in &s.entries {
        if e.error.is_none() {
            m.entry((e.dev, e.ino)).or_default().push(k);
        }
    }
    m
}

/// Compare which paths share an object identity — (st_dev, st_ino) — in
/// each view.
pub fn compare_ino_classes(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let (ga, gb) = (ino_groups(a), ino_groups(b));
    let mut out = Vec::new();
    let mut reported: HashSet<Vec<Vec<u8>>> = HashSet::new();
    for (k, ea) in &a.entries {
        let Some(eb) = b.entries.get(k) else { continue };
        if ea.error.is_some() || eb.error.is_some() {
            continue;
        }
        let class = |g: &HashMap<(u64, u64), Vec<&Vec<u8>>>, id: (u64, u64)| -> Vec<Vec<u8>> {
            let mut v: Vec<Vec<u8>> = g[&id].iter().map(|p| (*p).clone()).collect();
            v.sort();
            v
        };
        let (ca, cb) = (class(&ga, (ea.dev, ea.ino)), class(&gb, (eb.dev, eb.ino)));
        if ca != cb && reported.insert(ca.clone()) && reported.insert(cb.clone()) {
            let fmtc = |c: &Vec<Vec<u8>>| c.iter().map(|p| show(p)).collect::<Vec<_>>().join(" ");
            out.push(format!(
                "{}: paths sharing st_ino: {}=[{}] {}=[{}]",
                show(k),
                a.label,
                fmtc(&ca),
                b.label,
                fmtc(&cb)
            ));
        }
    }
    out
}

/// Raw st_ino equality of every non-directory present in both views.
pub fn raw_ino_mismatches(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (k, ea) in &a.entries {
        let Some(eb) = b.entries.get(k) else { continue };
        if ea.ftype == FileType::Dir || ea.error.is_some() || eb.error.is_some() {
            continue;
        }
        if ea.ino != eb.ino {
            out.push(format!(
                "{}: st_ino: {}={} {}={}",
                show(k),
                a.label,
                ea.ino,
                b.label,
                eb.ino
            ));
        }
    }
    out
}

/// Panic unless every non-directory has the same raw st_ino in both views.
pub fn assert_same_raw_ino(kernel: &Snapshot, layerfs: &Snapshot) {
    report(
        "raw st_ino of non-directories",
        raw_ino_mismatches(kernel, layerfs),
    );
}

/// Overlay-private xattr names that must never be visible through a mount.
pub const PRIVATE_XATTRS: &[&str] = &[
    "trusted.overlay.opaque",
    "trusted.overlay.redirect",
    "trusted.overlay.origin",
    "trusted.overlay.impure",
    "trusted.overlay.metacopy",
    "trusted.overlay.whiteout",
    "trusted.overlay.whiteouts",
    "trusted.overlay.uuid",
    "trusted.overlay.nlink",
    "trusted.overlay.upper",
    "trusted.overlay.protattr",
];

/// Per-view invariants of a mounted overlay view:
/// readdir lists every name once, has `.` and `..`, never `DT_UNKNOWN`,
/// `d_type` matches lstat, `d_ino` equals st_ino (entries and `.`); no
/// whiteout (char 0/0) and no overlay-private xattr is visible; every entry
/// has the root's st_dev; nothing fails to lstat.
pub fn check_invariants(s: &Snapshot) -> Vec<String> {
    let l = &s.label;
    let mut out = Vec::new();
    let root_dev = s.entries.get(&Vec::new()).map(|e| e.dev);
    for (k, e) in &s.entries {
        if let Some(err) = &e.error {
            out.push(format!("{}: [{l}] {err}", show(k)));
            continue;
        }
        if e.ftype == FileType::CharDev && e.rdev == Some((0, 0)) {
            out.push(format!("{}: [{l}] whiteout (char 0/0) visible", show(k)));
        }
        match &e.xattrs {
            Ok(x) => {
                for name in x.keys() {
                    if PRIVATE_XATTRS.iter().any(|p| p.as_bytes() == &name[..]) {
                        out.push(format!(
                            "{}: [{l}] private xattr {} visible",
                            show(k),
                            esc(name)
                        ));
                    }
                }
            }
            Err(err) => out.push(format!(
                "{}: [{l}] llistxattr failed: {}",
                show(k),
                errno_name(*err)
            )),
        }
        if let Some(d) = root_dev
            && e.dev != d
        {
            out.push(format!(
                "{}: [{l}] st_dev {} differs from the root's {}",
                show(k),
                e.dev,
                d
            ));
        }
    }
    for (d, listing) in &s.dirs {
        if let Some(err) = listing.error {
            out.push(format!(
                "readdir {}: [{l}] failed: {}",
                show(d),
                errno_name(err)
            ));
            continue;
        }
        let mut seen: HashMap<&[u8], usize> = HashMap::new();
        for de in &listing.entries {
            *seen.entry(&de.name).or_default() += 1;
        }
        for (name, n) in &seen {
            if *n > 1 {
                out.push(format!(
                    "readdir {}: [{l}] \"{}\" listed {n} times",
                    show(d),
                    esc(name)
                ));
            }
        }
        for dot in [&b"."[..], &b".."[..]] {
            if !seen.contains_key(dot) {
                out.push(format!(
                    "readdir {}: [{l}] \"{}\" missing",
                    show(d),
                    esc(dot)
                ));
            }
        }
        for de in &listing.entries {
            if de.d_type == libc::DT_UNKNOWN {
                out.push(format!(
                    "readdir {}: [{l}] \"{}\" has DT_UNKNOWN",
                    show(d),
                    esc(&de.name)
                ));
            }
            if de.name == b".." {
                continue;
            }
            let target = if de.name == b"." {
                d.clone()
            } else {
                concat_path(d, &de.name)
            };
            let Some(e) = s.entries.get(&target) else {
                continue;
            };
            if e.error.is_some() {
                continue;
            }
            if de.name != b"." && de.d_type != libc::DT_UNKNOWN && de.d_type != e.ftype.d_type() {
                out.push(format!(
                    "readdir {}: [{l}] \"{}\" d_type {} but lstat says {:?}",
                    show(d),
                    esc(&de.name),
                    d_type_name(de.d_type),
                    e.ftype
                ));
            }
            if de.d_ino != e.ino {
                out.push(format!(
                    "readdir {}: [{l}] \"{}\" d_ino {} != st_ino {}",
                    show(d),
                    esc(&de.name),
                    de.d_ino,
                    e.ino
                ));
            }
        }
    }
    out
}

/// Panic with a readable report if `problems` is not empty.
pub fn report(what: &str, problems: Vec<String>) {
    if problems.is_empty() {
        return;
    }
    const MAX: usize = 400;
    let mut msg = format!("{what}: {} mismatch(es):\n", problems.len());
    for p in problems.iter().take(MAX) {
        let _ = writeln!(msg, "  {p}");
    }
    if problems.len() > MAX {
        let _ = writeln!(msg, "  ... and {} more", problems.len() - MAX);
    }
    panic!("{msg}");
}

/// Compare (everything) and panic with all mismatches listed.
pub fn assert_same(kernel: &Snapshot, layerfs: &Snapshot) {
    assert_same_with(CompareOpts::default(), kernel, layerfs);
}

/// [`compare_with`] and panic with all mismatches listed.
pub fn assert_same_with(opts: CompareOpts, a: &Snapshot, b: &Snapshot) {
    let what = format!(
        "{} ({}) vs {} ({})",
        a.label,
        a.root.display(),
        b.label,
        b.root.display()
    );
    report(&what, compare_with(opts, a, b));
}

/// Build `expected` (one layer, as the merged view should look) in a temp dir
/// and compare `actual` against it. Returns the mismatches (used for views
/// the kernel cannot produce, e.g. with OCI `.wh.` markers, which the kernel
/// ignores). Give `expected` the same `default_mtime` as the layers.
pub fn expect_view(actual: &Snapshot, expected: &Layer) -> Vec<String> {
    let tmp = tempfile::Builder::new()
        .prefix("lf-exp")
        .tempdir_in(test_tmp())
        .expect("tempdir");
    let root = tmp.path().join("e");
    expected.build(&root);
    let exp = snapshot("expected", &root);
    // The expected tree is a plain directory: compare everything but its own
    // invariants (it has no overlay semantics) and raw inode numbers.
    let mut out = check_invariants(actual);
    out.extend(compare_with(
        CompareOpts {
            invariants: false,
            ..Default::default()
        },
        &exp,
        actual,
    ));
    out
}

// ===========================================================================
// Mounts
// ===========================================================================

const MNT_PREFIX: &str = "layerfs-test-";

/// Directory for test temp dirs (short, on the same filesystem for all
/// layers so the kernel reports real inode numbers).
pub fn test_tmp() -> PathBuf {
    std::env::temp_dir()
}

/// Is `path` a mount point (per /proc/self/mountinfo)? Returns the fs type.
pub fn mount_fstype(path: &Path) -> Option<String> {
    let info = fs::read("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 10 {
            continue;
        }
        if unescape_mountinfo(fields[4]) == want {
            // fstype is the first field after " - "
            if let Some(dash) = fields.iter().position(|f| *f == b"-") {
                found = fields
                    .get(dash + 1)
                    .map(|f| String::from_utf8_lossy(f).into_owned());
            }
        }
    }
    found
}

fn unescape_mountinfo(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the ")" of the command name
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

static CLEANUP: Once = Once::new();

/// Lazily unmount leftover test mounts of test processes that no longer
/// exist (mount points are named `layerfs-test-<pid>-…`).
fn cleanup_stale_mounts() {
    CLEANUP.call_once(|| {
        let Ok(info) = fs::read("/proc/self/mountinfo") else {
            return;
        };
        let mut stale = Vec::new();
        for line in info.split(|&b| b == b'\n') {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            if fields.len() < 5 {
                continue;
            }
            let mp = unescape_mountinfo(fields[4]);
            let s = String::from_utf8_lossy(&mp).into_owned();
            let Some(i) = s.find(MNT_PREFIX) else {
                continue;
            };
            let rest = &s[i + MNT_PREFIX.len()..];
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if !pid_alive(pid) {
                stale.push(s);
            }
        }
        // Deepest first.
        stale.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for s in stale {
            eprintln!("harness: lazily unmounting stale test mount {s}");
            let _ = Command::new("umount").arg("-l").arg(&s).status();
        }
    });
}

/// Unmount `path`: `umount` with retries (EBUSY), then `fusermount3 -u`
/// for FUSE mounts, then `umount -l` as a last resort. Never leaves the
/// mount behind.
pub fn unmount(path: &Path) {
    for attempt in 0..12u64 {
        if mount_fstype(path).is_none() {
            return;
        }
        let ok = Command::new("umount")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok && mount_fstype(path).is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
    }
    if mount_fstype(path).is_some_and(|t| t.starts_with("fuse")) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(path)
            .stderr(Stdio::null())
            .status();
    }
    while mount_fstype(path).is_some() {
        eprintln!(
            "harness: umount of {} keeps failing, using umount -l",
            path.display()
        );
        let st = Command::new("umount").arg("-l").arg(path).status();
        if !st.map(|s| s.success()).unwrap_or(false) {
            break;
        }
    }
}

/// Make a fresh upper (or work) directory with fixed attributes, so two
/// uppers made at different times look identical.
fn prepare_rw_dir(path: &Path) {
    fs::create_dir(path).expect("mkdir upper/work");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    set_mtime(path, UPPER_MTIME).expect("utimensat");
}

/// mtime given to fresh upper directories.
pub const UPPER_MTIME: (i64, i64) = (1_500_000_000, 500_000_000);

/// Base temp dir of one mount: `<tmp>/layerfs-test-<pid>-XXXX/{mnt,upper,work}`.
fn mount_base() -> TempDir {
    cleanup_stale_mounts();
    tempfile::Builder::new()
        .prefix(&format!("{MNT_PREFIX}{}-", std::process::id()))
        .tempdir_in(test_tmp())
        .expect("tempdir for mount")
}

fn check_lower_path(p: &Path) {
    let b = p.as_os_str().as_bytes();
    assert!(
        !b.iter().any(|c| matches!(c, b':' | b',' | b'\\')),
        "harness does not escape ':' ',' '\\' in layer paths: {}",
        p.display()
    );
}

/// Run a command with stdout/stderr redirected to files (so a daemonising
/// child that keeps them open cannot block us) and a timeout.
fn run_logged(cmd: &mut Command, logdir: &Path, timeout: Duration) -> (Option<ExitStatus>, String) {
    let out_path = logdir.join("cmd.out");
    let err_path = logdir.join("cmd.err");
    let out = fs::File::create(&out_path).expect("log file");
    let err = fs::File::create(&err_path).expect("log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait: {e}"),
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()),
        String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default())
    );
    (status, text)
}

/// A kernel overlay mount (`mount -t overlay`); unmounted on drop.
pub struct KernelMount {
    mnt: PathBuf,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    label: String,
    // Drop order: `Drop::drop` unmounts first, then these temp dirs go.
    _base: TempDir,
    _keep: Option<Arc<TempDir>>,
}

impl KernelMount {
    /// Mount `lowers` (topmost first) read-only, or with a fresh empty upper
    /// and work dir when `rw`. The kernel needs two lowers for a read-only
    /// mount ([`Stack`] adds an empty one when needed).
    pub fn new(lowers: &[PathBuf], rw: bool) -> KernelMount {
        Self::with_keep(lowers, rw, None)
    }

    fn with_keep(lowers: &[PathBuf], rw: bool, keep: Option<Arc<TempDir>>) -> KernelMount {
        assert!(!lowers.is_empty());
        let base = mount_base();
        let mnt = base.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        for l in lowers {
            check_lower_path(l);
        }
        let lower_opt: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let mut opts = format!("lowerdir={}", lower_opt.join(":"));
        let (mut upper, mut work) = (None, None);
        if rw {
            let u = base.path().join("upper");
            let w = base.path().join("work");
            prepare_rw_dir(&u);
            prepare_rw_dir(&w);
            let _ = write!(opts, ",upperdir={},workdir={}", u.display(), w.display());
            upper = Some(u);
            work = Some(w);
        }
        let (st, text) = run_logged(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&mnt),
            base.path(),
            Duration::from_secs(30),
        );
        let m = KernelMount {
            mnt,
            upper,
            work,
            label: "kernel".into(),
            _base: base,
            _keep: keep,
        };
        if !st.is_some_and(|s| s.success()) {
            panic!("kernel overlay mount failed ({st:?}): {text}\noptions: {opts}");
        }
        m
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }
    pub fn upper(&self) -> Option<&Path> {
        self.upper.as_deref()
    }
    pub fn work(&self) -> Option<&Path> {
        self.work.as_deref()
    }
    /// Snapshot of the mounted view, labelled "kernel", with the kernel's
    /// listed-but-unreachable whiteouts removed (see
    /// [`drop_listed_whiteouts`]).
    pub fn snapshot(&self) -> Snapshot {
        let mut s = snapshot(&self.label, &self.mnt);
        drop_listed_whiteouts(&mut s);
        s
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// A tmpfs mounted on a fresh temp dir (for layers on another filesystem);
/// unmounted on drop.
pub struct TmpfsMount {
    mnt: PathBuf,
    _base: TempDir,
}

impl TmpfsMount {
    pub fn new() -> TmpfsMount {
        let base = mount_base();
        let mnt = base.path().join("tmpfs");
        fs::create_dir(&mnt).expect("mkdir");
        let (st, text) = run_logged(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0755", "layerfs-test-tmpfs"])
                .arg(&mnt),
            base.path(),
            Duration::from_secs(30),
        );
        let m = TmpfsMount { mnt, _base: base };
        assert!(st.is_some_and(|s| s.success()), "mount tmpfs: {text}");
        m
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// How to call the layerfs binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// `layerfs mount --lower L1 --lower L2 [--upper U --work W] MNT`
    Subcommand,
    /// `layerfs -o lowerdir=L1:L2[,upperdir=U,workdir=W] MNT`
    DashO,
}

/// Path of the layerfs binary under test.
pub fn layerfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_layerfs")
}

fn mount_timeout() -> Duration {
    let secs = std::env::var("LAYERFS_TEST_MOUNT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// Pids of processes (other than us) with `arg` among their argv.
fn pids_with_arg(arg: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for d in rd.flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline"))
            && cmd.split(|&b| b == 0).any(|a| a == arg)
        {
            out.push(pid);
        }
    }
    out
}

/// Why a layerfs mount could not be made.
#[derive(Debug)]
pub enum MountFailure {
    /// The binary exited non-zero (a refusal, with its message).
    Refused {
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// Anything else: timeout, exit 0 without a mount.
    Broken(String),
}

impl std::fmt::Display for MountFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountFailure::Refused {
                command,
                status,
                output,
            } => {
                write!(f, "`{command}` failed ({status}): {output}")
            }
            MountFailure::Broken(m) => f.write_str(m),
        }
    }
}

/// A layerfs mount made by running the binary; unmounted on drop (the
/// daemon is expected to exit; it is killed if it has not after 5 s).
pub struct LayerfsMount {
    mnt: PathBuf,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    daemon_pids: Vec<i32>,
    watchdog: Option<mpsc::Sender<()>>,
    unmounted: bool,
    _base: TempDir,
    _keep: Option<Arc<TempDir>>,
}

impl LayerfsMount {
    /// Mount `lowers` (topmost first) with layerfs, read-only or with a fresh
    /// empty upper + work dir. Panics with the binary's output on failure.
    pub fn new(lowers: &[PathBuf], rw: bool, syntax: Syntax) -> LayerfsMount {
        Self::with_keep(lowers, rw, syntax, None)
    }

    fn with_keep(
        lowers: &[PathBuf],
        rw: bool,
        syntax: Syntax,
        keep: Option<Arc<TempDir>>,
    ) -> LayerfsMount {
        match Self::try_with_keep(lowers, rw, syntax, keep) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`LayerfsMount::new`] but returns the failure instead of
    /// panicking (for layers layerfs may legitimately refuse).
    pub fn try_new(
        lowers: &[PathBuf],
        rw: bool,
        syntax: Syntax,
    ) -> Result<LayerfsMount, MountFailure> {
        Self::try_with_keep(lowers, rw, syntax, None)
    }

    fn try_with_keep(
        lowers: &[PathBuf],
        rw: bool,
        syntax: Syntax,
        keep: Option<Arc<TempDir>>,
    ) -> Result<LayerfsMount, MountFailure> {
        let base = mount_base();
        let mnt = base.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        let (mut upper, mut work) = (None, None);
        if rw {
            let u = base.path().join("upper");
            let w = base.path().join("work");
            prepare_rw_dir(&u);
            prepare_rw_dir(&w);
            upper = Some(u);
            work = Some(w);
        }
        let mut cmd = Command::new(layerfs_bin());
        match syntax {
            Syntax::Subcommand => {
                cmd.arg("mount");
                for l in lowers {
                    cmd.arg("--lower").arg(l);
                }
                if let (Some(u), Some(w)) = (&upper, &work) {
                    cmd.arg("--upper").arg(u).arg("--work").arg(w);
                }
            }
            Syntax::DashO => {
                for l in lowers {
                    check_lower_path(l);
                }
                let mut o = b"lowerdir=".to_vec();
                o.extend_from_slice(
                    &lowers
                        .iter()
                        .map(|l| l.as_os_str().as_bytes())
                        .collect::<Vec<_>>()
                        .join(&b':'),
                );
                if let (Some(u), Some(w)) = (&upper, &work) {
                    o.extend_from_slice(b",upperdir=");
                    o.extend_from_slice(u.as_os_str().as_bytes());
                    o.extend_from_slice(b",workdir=");
                    o.extend_from_slice(w.as_os_str().as_bytes());
                }
                cmd.arg("-o").arg(OsStr::from_bytes(&o));
            }
        }
        cmd.arg(&mnt);
        let (st, text) = run_logged(&mut cmd, base.path(), Duration::from_secs(30));
        let mut m = LayerfsMount {
            mnt,
            upper,
            work,
            daemon_pids: Vec::new(),
            watchdog: None,
            unmounted: false,
            _base: base,
            _keep: keep,
        };
        m.daemon_pids = pids_with_arg(m.mnt.as_os_str().as_bytes());
        let fstype = mount_fstype(&m.mnt);
        match st {
            None => {
                return Err(MountFailure::Broken(format!(
                    "`{cmd:?}` did not return within 30 s (mount must return once ready): {text}"
                )));
            }
            Some(s) if !s.success() => {
                return Err(MountFailure::Refused {
                    command: format!("{cmd:?}"),
                    status: s,
                    output: text,
                });
            }
            _ => {}
        }
        match &fstype {
            Some(t) if t.starts_with("fuse") => {}
            other => {
                return Err(MountFailure::Broken(format!(
                    "`{cmd:?}` exited 0 but {} is not a FUSE mount (fstype {other:?}): {text}",
                    m.mnt.display()
                )));
            }
        }
        m.start_watchdog();
        Ok(m)
    }

    fn start_watchdog(&mut self) {
        let (tx, rx) = mpsc::channel::<()>();
        let pids = self.daemon_pids.clone();
        let mnt = self.mnt.clone();
        let limit = mount_timeout();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "harness: mount {} alive for over {limit:?}: killing daemon {pids:?}",
                    mnt.display()
                );
                let mut pids = pids;
                if pids.is_empty() {
                    pids = pids_with_arg(mnt.as_os_str().as_bytes());
                }
                for p in pids {
                    // SAFETY: plain kill(2) of a daemon this test started.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        });
        self.watchdog = Some(tx);
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }
    pub fn upper(&self) -> Option<&Path> {
        self.upper.as_deref()
    }
    pub fn work(&self) -> Option<&Path> {
        self.work.as_deref()
    }
    /// Pids of the daemon serving this mount (found by its argv).
    pub fn daemon_pids(&self) -> &[i32] {
        &self.daemon_pids
    }
    /// Snapshot of the mounted view, labelled "layerfs".
    pub fn snapshot(&self) -> Snapshot {
        snapshot("layerfs", &self.mnt)
    }

    /// Unmount now and wait (5 s) for the daemon to exit. Err if it did not
    /// (it is then killed).
    pub fn unmount(mut self) -> Result<(), String> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), String> {
        if self.unmounted {
            return Ok(());
        }
        self.unmounted = true;
        unmount(&self.mnt);
        drop(self.watchdog.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: Vec<i32> = self
                .daemon_pids
                .iter()
                .copied()
                .filter(|p| pid_alive(*p))
                .collect();
            if alive.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                for p in &alive {
                    // SAFETY: plain kill(2) of a daemon this test started.
                    unsafe { libc::kill(*p, libc::SIGKILL) };
                }
                return Err(format!(
                    "daemon {alive:?} still running 5 s after unmount; killed"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LayerfsMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            eprintln!("harness: {}: {e}", self.mnt.display());
        }
    }
}

/// Which filesystem plays "layerfs" in the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The layerfs binary (default).
    Layerfs,
    /// A second kernel overlay mount (`LAYERFS_TEST_BACKEND=kernel`): harness
    /// self-check.
    Kernel,
}

/// The backend under test, from `LAYERFS_TEST_BACKEND`.
pub fn backend() -> Backend {
    match std::env::var("LAYERFS_TEST_BACKEND").as_deref() {
        Ok("kernel") => Backend::Kernel,
        Ok("layerfs") | Ok("") | Err(_) => Backend::Layerfs,
        Ok(other) => panic!("LAYERFS_TEST_BACKEND={other}: expected kernel or layerfs"),
    }
}

/// True when the harness runs in self-check mode (kernel vs kernel).
pub fn self_check() -> bool {
    backend() == Backend::Kernel
}

/// A mount of the filesystem under test (layerfs, or a kernel overlay in
/// self-check mode).
pub enum TestMount {
    Layerfs(LayerfsMount),
    Kernel(KernelMount),
}

impl TestMount {
    pub fn path(&self) -> &Path {
        match self {
            TestMount::Layerfs(m) => m.path(),
            TestMount::Kernel(m) => m.path(),
        }
    }
    pub fn upper(&self) -> Option<&Path> {
        match self {
            TestMount::Layerfs(m) => m.upper(),
            TestMount::Kernel(m) => m.upper(),
        }
    }
    pub fn label(&self) -> &str {
        match self {
            TestMount::Layerfs(_) => "layerfs",
            TestMount::Kernel(_) => "kernel#2",
        }
    }
    pub fn snapshot(&self) -> Snapshot {
        match self {
            TestMount::Layerfs(m) => m.snapshot(),
            TestMount::Kernel(m) => m.snapshot(),
        }
    }
}

/// Layers built on disk: `<tmp>/lfXXXX/<i>` for layer i (0 = topmost).
pub struct Stack {
    tmp: Arc<TempDir>,
    /// Layer directories, topmost first.
    pub lowers: Vec<PathBuf>,
}

/// Default mtime of layer `i` of a stack (distinct per layer, with
/// nanoseconds, so taking attributes from the wrong layer shows).
pub fn layer_default_mtime(i: usize) -> (i64, i64) {
    (
        1_200_000_000 + 1_000_003 * i as i64,
        100_000_000 + 1_234_567 * i as i64,
    )
}

impl Stack {
    /// Build `layers` (topmost first). Layers without a `default_mtime` get
    /// [`layer_default_mtime`]. A single layer gets an empty layer added
    /// below it (the kernel needs two lowers for a read-only mount).
    pub fn build(layers: Vec<Layer>) -> Stack {
        Self::build_placed(layers, |_| None)
    }

    /// Like [`Stack::build`], but layer `i` is built at `place(i)` when that
    /// is `Some` (e.g. inside a [`TmpfsMount`], to put layers on different
    /// filesystems); the caller keeps such places alive longer than the
    /// stack's mounts.
    pub fn build_placed(layers: Vec<Layer>, place: impl Fn(usize) -> Option<PathBuf>) -> Stack {
        let tmp = tempfile::Builder::new()
            .prefix("lf")
            .tempdir_in(test_tmp())
            .expect("tempdir");
        let mut layers = layers;
        if layers.len() == 1 {
            layers.push(Layer::new());
        }
        let mut lowers = Vec::new();
        for (i, l) in layers.into_iter().enumerate() {
            let dir = place(i).unwrap_or_else(|| tmp.path().join(i.to_string()));
            let l = if l.default_mtime.is_none() {
                let (s, n) = layer_default_mtime(i);
                l.default_mtime(s, n)
            } else {
                l
            };
            l.build(&dir);
            lowers.push(dir);
        }
        Stack {
            tmp: Arc::new(tmp),
            lowers,
        }
    }

    /// Root of the stack's temp dir.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Kernel overlay over the lowers (read-only, or with an empty upper).
    pub fn kernel(&self, rw: bool) -> KernelMount {
        KernelMount::with_keep(&self.lowers, rw, Some(self.tmp.clone()))
    }

    /// layerfs over the lowers, with the given command-line syntax.
    pub fn layerfs(&self, rw: bool, syntax: Syntax) -> LayerfsMount {
        LayerfsMount::with_keep(&self.lowers, rw, syntax, Some(self.tmp.clone()))
    }

    /// layerfs over the lowers, returning a refusal instead of panicking.
    pub fn try_layerfs(&self, rw: bool) -> Result<LayerfsMount, MountFailure> {
        LayerfsMount::try_with_keep(&self.lowers, rw, Syntax::Subcommand, Some(self.tmp.clone()))
    }

    /// The filesystem under test over the lowers (see [`backend`]).
    pub fn under_test(&self, rw: bool) -> TestMount {
        match backend() {
            Backend::Layerfs => TestMount::Layerfs(self.layerfs(rw, Syntax::Subcommand)),
            Backend::Kernel => {
                let mut k = KernelMount::with_keep(&self.lowers, rw, Some(self.tmp.clone()));
                k.label = "kernel#2".into();
                TestMount::Kernel(k)
            }
        }
    }

    /// Snapshots of the raw layer directories (for "nothing was modified").
    /// Labelled `"{tag} lower {i}"`.
    pub fn lower_snapshots(&self, tag: &str) -> Vec<Snapshot> {
        self.lowers
            .iter()
            .enumerate()
            .map(|(i, l)| snapshot(&format!("{tag}-lower{i}"), l))
            .collect()
    }

    /// Check that the layer dirs still match `before` (taken with
    /// [`Stack::lower_snapshots`]); returns mismatches.
    pub fn lowers_unchanged(&self, before: &[Snapshot]) -> Vec<String> {
        let after = self.lower_snapshots("after");
        let mut out = Vec::new();
        for (b, a) in before.iter().zip(&after) {
            out.extend(
                // st_blocks of freshly written layer files settle at
                // writeback (ext4 delayed allocation): not a modification.
                compare_with(
                    CompareOpts {
                        blocks: false,
                        ..CompareOpts::raw_dirs()
                    },
                    b,
                    a,
                )
                .into_iter()
                .map(|m| format!("[layer modified] {m}")),
            );
        }
        out
    }
}

/// The two mount variants every read scenario runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Lowers only: a read-only mount.
    ReadOnly,
    /// Lowers plus a fresh, empty upper and work dir.
    EmptyUpper,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::ReadOnly, Variant::EmptyUpper];
    pub fn rw(self) -> bool {
        self == Variant::EmptyUpper
    }
}

/// Is the directory empty (no entries besides . and ..)?
fn dir_entries(path: &Path) -> Vec<String> {
    match fs::read_dir(path) {
        Ok(rd) => rd
            .flatten()
            .map(|e| esc(e.file_name().as_bytes()))
            .collect(),
        Err(e) => vec![format!("<read_dir error {e}>")],
    }
}

/// Mount kernel and the filesystem under test over `stack` in `variant`,
/// snapshot both, and return all mismatches (prefixed with the variant).
/// Also checks that reading left the upper dir empty.
pub fn differential_on(stack: &Stack, variant: Variant) -> Vec<String> {
    let k = stack.kernel(variant.rw());
    let t = stack.under_test(variant.rw());
    let ks = k.snapshot();
    let ts = t.snapshot();
    let mut out: Vec<String> = compare(&ks, &ts);
    if let Some(u) = t.upper() {
        let left = dir_entries(u);
        if !left.is_empty() {
            out.push(format!(
                "{}: reading left entries in the upper dir: {left:?}",
                t.label()
            ));
        }
    }
    out.into_iter()
        .map(|m| format!("[{variant:?}] {m}"))
        .collect()
}

/// Build `layers`, run [`differential_on`] for both variants, check that the
/// layer directories were not modified, and panic with every mismatch.
/// Returns the stack for further checks.
pub fn differential(layers: Vec<Layer>) -> Stack {
    let stack = Stack::build(layers);
    let before = stack.lower_snapshots("before");
    let mut problems = Vec::new();
    for v in Variant::ALL {
        problems.extend(differential_on(&stack, v));
    }
    problems.extend(stack.lowers_unchanged(&before));
    report("kernel vs filesystem under test", problems);
    stack
}
