//! The one error type of the core: an errno for the caller, plus what was
//! being done, for the log. Every OS error is mapped to an errno here.

use std::fmt;
use std::io;

#[derive(Debug)]
pub struct Error {
    errno: i32,
    context: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(errno: i32, context: impl Into<String>) -> Error {
        Error {
            errno,
            context: context.into(),
        }
    }

    /// The errno the FUSE caller receives.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == errno
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// An error that is part of normal operation (not worth a warning).
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno,
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENODATA
                | libc::ERANGE
                | libc::EROFS
                | libc::EACCES
                | libc::EPERM
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EXDEV
                | libc::ENOTSUP
                | libc::EINVAL
                | libc::ELOOP
                | libc::ENAMETOOLONG
        )
    }
}

/// Maps an OS error to the errno reported to the caller: the OS errno, or
/// `EIO` for errors that carry none.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::new(errno_of(&e), e.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.context,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for Error {}

/// Adds what was being done to an OS error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(errno_of(&e), format!("{}: {e}", what())))
    }
}

pub fn is_enoent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}
