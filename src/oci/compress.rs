//! Layer compression: detected from the first bytes of a blob (never from a
//! file name or media type, which may lie), and chosen for export from the
//! output name or an option.

use std::io::{self, BufRead, BufReader, Read, Write};

use super::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// What the first bytes of a stream say. Formats we cannot read are an
    /// error rather than being mistaken for a tar.
    pub fn sniff(head: &[u8]) -> Result<Compression> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if head.starts_with(b"BZh") {
            Err(Error::new("bzip2-compressed layers are not supported"))
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Err(Error::new("xz-compressed layers are not supported"))
        } else {
            Ok(Compression::None)
        }
    }

    /// From an output file name: `.gz`/`.tgz` → gzip, `.zst`/`.zstd` →
    /// zstd, anything else → none.
    pub fn from_name(name: &std::path::Path) -> Compression {
        let s = name.to_string_lossy();
        if s.ends_with(".gz") || s.ends_with(".tgz") {
            Compression::Gzip
        } else if s.ends_with(".zst") || s.ends_with(".zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn parse(s: &str) -> std::result::Result<Compression, String> {
        match s {
            "none" | "tar" => Ok(Compression::None),
            "gzip" | "gz" => Ok(Compression::Gzip),
            "zstd" | "zst" => Ok(Compression::Zstd),
            _ => Err(format!("unknown compression '{s}' (none, gzip, zstd)")),
        }
    }

    /// The OCI media type of a layer with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Size of the read buffers between the stages of a layer pipeline.
const BUF: usize = 256 * 1024;

/// Wraps a blob in the decoder its first bytes call for. Concatenated gzip
/// members and zstd frames are read through, as Go's readers do.
pub fn decoder<'a, R: Read + 'a>(inner: R) -> Result<(Box<dyn Read + 'a>, Compression)> {
    let mut br = BufReader::with_capacity(BUF, inner);
    let head = br
        .fill_buf()
        .map_err(|e| Error::new(format!("reading: {e}")))?;
    let c = Compression::sniff(head)?;
    let r: Box<dyn Read> = match c {
        Compression::None => Box::new(br),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            BUF,
            flate2::bufread::MultiGzDecoder::new(br),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            BUF,
            zstd::stream::read::Decoder::with_buffer(br)
                .map_err(|e| Error::new(format!("zstd: {e}")))?,
        )),
    };
    Ok((r, c))
}

/// A compressing writer that must be finished explicitly, so that errors on
/// the last block are not lost in a `Drop`.
pub enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// A deterministic encoder: the gzip header carries no time or name, and
    /// zstd runs single-threaded at a fixed level.
    pub fn new(inner: W, c: Compression) -> io::Result<Encoder<W>> {
        Ok(match c {
            Compression::None => Encoder::None(inner),
            Compression::Gzip => {
                Encoder::Gzip(flate2::GzBuilder::new().write(inner, flate2::Compression::default()))
            }
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(inner, 3)?),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(c: Compression) {
        let data = b"some tar bytes".repeat(1000);
        let mut e = Encoder::new(Vec::new(), c).unwrap();
        e.write_all(&data).unwrap();
        let blob = e.finish().unwrap();
        let (mut r, got) = decoder(&blob[..]).unwrap();
        assert_eq!(got, c);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn all_formats_round_trip() {
        roundtrip(Compression::None);
        roundtrip(Compression::Gzip);
        roundtrip(Compression::Zstd);
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let mut e = Encoder::new(Vec::new(), Compression::Gzip).unwrap();
        e.write_all(&[7u8; 100_000]).unwrap();
        let blob = e.finish().unwrap();
        let (mut r, _) = decoder(&blob[..blob.len() / 2]).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn deterministic_output() {
        let enc = |c| {
            let mut e = Encoder::new(Vec::new(), c).unwrap();
            e.write_all(b"x").unwrap();
            e.finish().unwrap()
        };
        assert_eq!(enc(Compression::Gzip), enc(Compression::Gzip));
        assert_eq!(enc(Compression::Zstd), enc(Compression::Zstd));
    }

    #[test]
    fn refuses_other_formats() {
        assert!(Compression::sniff(b"BZh91AY").is_err());
        assert_eq!(Compression::sniff(b"usr/").unwrap(), Compression::None);
    }
}
