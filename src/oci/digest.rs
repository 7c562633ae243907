//! SHA-256 digests (`sha256:<64 hex>`), and readers/writers that compute one
//! over the bytes passing through them.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Read, Write};
use std::rc::Rc;

use sha2::{Digest as _, Sha256};

use super::{Error, Result};

/// A SHA-256 content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; other algorithms are refused.
    pub fn parse(s: &str) -> Result<Digest> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::new(format!("unsupported digest '{s}' (only sha256 is)")))?;
        Digest::from_hex(hex).ok_or_else(|| Error::new(format!("malformed digest '{s}'")))
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
        }
        Some(Digest(out))
    }

    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits, as `docker` shows ids.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A running digest and byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.len += data.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (Digest, u64) {
        (Digest(self.sha.finalize().into()), self.len)
    }
}

/// Hashes what is read through it, into a hasher that can be shared (read
/// it after the reader was moved into a decoder). The byte count can also
/// go to a shared counter, for progress display.
pub struct HashReader<R> {
    inner: R,
    hasher: Rc<RefCell<Hasher>>,
    counter: Option<Rc<Cell<u64>>>,
    /// False: only count (the digest is known to equal another one).
    hashing: bool,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Rc::default(),
            counter: None,
            hashing: true,
        }
    }

    /// A reader that does not hash (its digest is meaningless): for a
    /// stream whose digest another reader computes anyway.
    pub fn unhashed(inner: R) -> Self {
        HashReader {
            hashing: false,
            ..HashReader::new(inner)
        }
    }

    pub fn with_counter(mut self, c: Rc<Cell<u64>>) -> Self {
        self.counter = Some(c);
        self
    }

    /// The hasher, to be read once the stream has been consumed.
    pub fn hasher(&self) -> Rc<RefCell<Hasher>> {
        self.hasher.clone()
    }

    /// Reads the rest of the stream (so the digest covers all of it), then
    /// returns the digest and the total length.
    pub fn drain_and_finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.hasher.borrow().clone().finish())
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hashing {
            self.hasher.borrow_mut().update(&buf[..n]);
        }
        if let Some(c) = &self.counter {
            c.set(c.get() + n as u64);
        }
        Ok(n)
    }
}

/// Hashes what is written through it.
pub struct HashWriter<W> {
    inner: W,
    hasher: Hasher,
    /// False: only count (the digest is known to equal another one).
    hashing: bool,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Hasher::default(),
            hashing: true,
        }
    }

    /// A writer that only counts: its digest is meaningless.
    pub fn unhashed(inner: W) -> Self {
        HashWriter {
            hashing: false,
            ..HashWriter::new(inner)
        }
    }

    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    pub fn finish(self) -> (W, Digest, u64) {
        let (d, n) = self.hasher.finish();
        (self.inner, d, n)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.hashing {
            self.hasher.update(&buf[..n]);
        } else {
            self.hasher.len += n as u64;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_parse() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:E3B0").is_err());
        assert_eq!(d.short(), "e3b0c44298fc");
    }

    #[test]
    fn reader_hashes_everything() {
        let r = HashReader::new(&b"hello"[..]);
        let (d, n) = r.drain_and_finish().unwrap();
        assert_eq!((d, n), (Digest::of(b"hello"), 5));
    }
}
