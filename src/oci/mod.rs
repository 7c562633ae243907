//! OCI/Docker layers: import images and layer tars as overlay lower layers,
//! export an upper layer as a layer tar (SPEC §9).
//!
//! - [`tarstream`] reads tar members with PAX/GNU extensions resolved and
//!   bounded (no header can make us allocate more than a few MiB);
//! - [`tarsafe`] holds the pure rules for member names (no `..`, no
//!   absolute names, OCI whiteout markers);
//! - [`unpack`] applies one layer tar to a directory in overlay format, only
//!   with fd-relative calls that never follow a symlink;
//! - [`image`] reads OCI image layouts and `docker save` archives;
//! - [`import`] and [`export`] are the two operations, [`cmd`] their
//!   command-line front; [`layout`] appends an exported layer to an OCI
//!   layout; [`merged`] mounts the merged view an export needs for kernel
//!   redirects and metacopy files; [`digest`], [`compress`] and
//!   [`progress`] are plumbing.
//!
//! Invariants: nothing is ever written outside the destination directory;
//! an import that fails leaves the destination as it found it (layers are
//! built in a staging directory inside it and renamed into place only once
//! every digest has been checked); an export of the same upper gives the
//! same bytes.

pub mod cmd;
pub mod compress;
pub mod digest;
pub mod export;
pub mod image;
pub mod import;
pub mod layout;
pub mod merged;
pub mod progress;
pub mod tarsafe;
pub mod tarstream;
pub mod unpack;

use std::fmt;
use std::io;

/// An error of an import or export: a message for the user, naming the
/// blob, entry or file concerned.
#[derive(Debug)]
pub struct Error {
    msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error { msg: msg.into() }
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// Prefixes the message with more context (outermost first).
    pub fn context(self, what: impl fmt::Display) -> Error {
        Error {
            msg: format!("{what}: {}", self.msg),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// Adds what was being done to an I/O error.
pub trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(format!("{}: {e}", what())))
    }
}

impl<T> Ctx<T> for Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.context(what()))
    }
}

/// A name for messages: the bytes shown as text, invalid UTF-8 escaped.
pub fn show(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => name.escape_ascii().to_string(),
    }
}

/// The value of a `lowerdir=` option for these layers (topmost first):
/// joined with `:`, with `:`, `,` and `\` in paths escaped by `\`.
pub fn lowerdir_value(layers: &[std::path::PathBuf]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for (i, p) in layers.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        for &b in p.as_os_str().as_bytes() {
            if matches!(b, b'\\' | b':' | b',') {
                out.push(b'\\');
            }
            out.push(b);
        }
    }
    out
}

/// Whether this process runs with full privileges (may chown, mknod and set
/// `trusted.*` xattrs).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowerdir_escapes() {
        let v = super::lowerdir_value(&["/a:b,c\\d".into(), "/e".into()]);
        assert_eq!(v, b"/a\\:b\\,c\\\\d:/e");
    }
}
