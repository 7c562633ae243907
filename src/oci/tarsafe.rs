//! The rules for names in a layer tar, as pure functions.
//!
//! A member name is split into components relative to the layer root.
//! Refused: absolute names, `..` components, NUL bytes, components longer
//! than `NAME_MAX`. `.` and empty components (`./a//b`) are dropped, so `./`
//! names the layer root. OCI markers in the last component are classified
//! here too; a marker can never be a parent directory.

use crate::whiteout::{OCI_OPAQUE, OCI_WH_PREFIX};

/// Longest single name component Linux accepts.
const NAME_MAX: usize = 255;
/// Longest member name we accept (Linux `PATH_MAX`).
const PATH_MAX: usize = 4096;

/// Why a name is refused (shown after the entry's name).
pub type Refusal = &'static str;

/// The components of a member name, relative to the layer root (empty for
/// the root itself).
pub fn split_name(raw: &[u8]) -> Result<Vec<&[u8]>, Refusal> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw.len() > PATH_MAX {
        return Err("name longer than PATH_MAX");
    }
    if raw.contains(&0) {
        return Err("NUL byte in name");
    }
    if raw[0] == b'/' {
        return Err("absolute name");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' component escapes the layer"),
            c if c.len() > NAME_MAX => return Err("name component longer than NAME_MAX"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What a last name component means in an OCI layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Marker<'a> {
    /// An ordinary name.
    Plain,
    /// `.wh..wh..opq`: the directory holding it is opaque.
    Opaque,
    /// `.wh.NAME`: NAME is deleted.
    Whiteout(&'a [u8]),
    /// Other `.wh..wh.*` names: AUFS bookkeeping (`.wh..wh.plnk`, …) that
    /// docker skips.
    AufsMeta,
    /// `.wh.`, `.wh..`, `.wh...`: a whiteout of nothing, or of `.`/`..`.
    Invalid,
}

pub fn classify(name: &[u8]) -> Marker<'_> {
    let Some(target) = name.strip_prefix(OCI_WH_PREFIX) else {
        return Marker::Plain;
    };
    if name == OCI_OPAQUE {
        Marker::Opaque
    } else if target.is_empty() || target == b"." || target == b".." {
        Marker::Invalid
    } else if target.starts_with(OCI_WH_PREFIX) {
        Marker::AufsMeta
    } else {
        Marker::Whiteout(target)
    }
}

/// Whether a component may be a directory on the way to another member.
pub fn valid_parent(c: &[u8]) -> bool {
    !c.starts_with(OCI_WH_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(split_name(b"./").unwrap(), Vec::<&[u8]>::new());
        assert_eq!(split_name(b".").unwrap(), Vec::<&[u8]>::new());
        assert_eq!(
            split_name(b"a//b/./c/").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert_eq!(split_name(b"./usr/bin").unwrap(), vec![&b"usr"[..], b"bin"]);
        assert!(split_name(b"../x").is_err());
        assert!(split_name(b"a/../../x").is_err());
        assert!(split_name(b"a/..").is_err());
        assert!(split_name(b"/etc/passwd").is_err());
        assert!(split_name(b"").is_err());
        assert!(split_name(b"a\0b").is_err());
        assert!(split_name(&[b'x'; 256]).is_err());
        assert!(split_name(&[b'x'; 255]).is_ok());
        // Odd but legal names.
        assert_eq!(split_name(b"...").unwrap(), vec![&b"..."[..]]);
        assert_eq!(split_name(b"a\nb").unwrap(), vec![&b"a\nb"[..]]);
        assert_eq!(split_name(b"\xff\xfe").unwrap(), vec![&b"\xff\xfe"[..]]);
    }

    #[test]
    fn markers() {
        assert_eq!(classify(b"foo"), Marker::Plain);
        assert_eq!(classify(b".wh.foo"), Marker::Whiteout(b"foo"));
        assert_eq!(classify(b".wh...."), Marker::Whiteout(b"..."));
        assert_eq!(classify(b".wh..wh..opq"), Marker::Opaque);
        assert_eq!(classify(b".wh..wh.plnk"), Marker::AufsMeta);
        assert_eq!(classify(b".wh."), Marker::Invalid);
        assert_eq!(classify(b".wh.."), Marker::Invalid);
        assert_eq!(classify(b".wh..."), Marker::Invalid);
        assert_eq!(classify(b".whx"), Marker::Plain);
        assert!(!valid_parent(b".wh.x"));
        assert!(valid_parent(b"x"));
    }
}
