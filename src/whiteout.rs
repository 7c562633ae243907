//! The overlay on-disk markers, as pure predicates and constants.
//!
//! Two formats are read: the kernel's (a whiteout is a character device
//! 0/0, an opaque directory carries `overlay.opaque="y"`, and since 6.7 a
//! directory with `overlay.opaque="x"` may hold xattr whiteouts: empty
//! regular files with `overlay.whiteout`), and the OCI layer convention that
//! container engines leave in unpacked lower layers (`.wh.NAME` hides NAME,
//! `.wh..wh..opq` makes its directory opaque). Only the kernel format is
//! ever written.

/// Prefix of OCI whiteout files.
pub const OCI_WH_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OCI_OPAQUE: &[u8] = b".wh..wh..opq";

/// Is this `stat` a kernel whiteout (character device 0/0)?
pub fn is_whiteout_stat(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// For a lower-layer name `.wh.X`, the hidden name `X`; `None` for other names
/// and for the opaque marker. Invalid markers (`.wh.`, `.wh..`, `.wh...`
/// and names with `/`) are not whiteouts of anything.
pub fn oci_whiteout_target(name: &[u8]) -> Option<&[u8]> {
    let target = name.strip_prefix(OCI_WH_PREFIX)?;
    if name == OCI_OPAQUE || target.is_empty() || target == b"." || target == b".." {
        return None;
    }
    if target.starts_with(OCI_WH_PREFIX) && target != b".wh..opq" {
        // `.wh..wh.X` is a (meaningless) whiteout of a marker; treat as plain marker.
        return None;
    }
    Some(target)
}

/// Is this name an OCI marker of any kind (never shown from a lower layer)?
pub fn is_oci_marker(name: &[u8]) -> bool {
    name.starts_with(OCI_WH_PREFIX)
}

/// What a directory's `overlay.opaque` value says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opaque {
    /// Not opaque: lower layers contribute.
    No,
    /// `"y"`: layers below do not contribute.
    Yes,
    /// `"x"`: not opaque, but may hold xattr whiteouts.
    XattrWhiteouts,
}

impl Opaque {
    pub fn from_value(v: Option<&[u8]>) -> Opaque {
        match v {
            Some(b"y") => Opaque::Yes,
            Some(b"x") => Opaque::XattrWhiteouts,
            _ => Opaque::No,
        }
    }
}

/// The namespace of the overlay's private xattrs: `trusted.overlay.`, or
/// `user.overlay.` in userxattr (rootless) mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Private {
    prefix: &'static [u8],
}

impl Private {
    pub const TRUSTED: Private = Private {
        prefix: b"trusted.overlay.",
    };
    pub const USER: Private = Private {
        prefix: b"user.overlay.",
    };

    /// The full xattr name of private key `key` (e.g. `opaque`).
    pub fn name(&self, key: &str) -> Vec<u8> {
        let mut v = self.prefix.to_vec();
        v.extend_from_slice(key.as_bytes());
        v
    }

    /// The name a user-visible xattr is stored under: `P.X` is escaped to
    /// `P.overlay.X` (the kernel's nesting rule); others are unchanged.
    pub fn escape(&self, user_name: &[u8]) -> Vec<u8> {
        match user_name.strip_prefix(self.prefix) {
            Some(rest) => {
                let mut v = self.name("overlay.");
                v.extend_from_slice(rest);
                v
            }
            None => user_name.to_vec(),
        }
    }

    /// The user-visible name of a stored xattr, or `None` if it is private.
    pub fn unescape<'a>(&self, stored: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
        let Some(rest) = stored.strip_prefix(self.prefix) else {
            return Some(stored.into());
        };
        let inner = rest.strip_prefix(b"overlay.")?;
        let mut v = self.prefix.to_vec();
        v.extend_from_slice(inner);
        Some(v.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_targets() {
        assert_eq!(oci_whiteout_target(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(oci_whiteout_target(b".wh..wh..opq"), None);
        assert_eq!(oci_whiteout_target(b".wh."), None);
        assert_eq!(oci_whiteout_target(b".wh.."), None);
        assert_eq!(
            oci_whiteout_target(b".wh..."),
            Some(&b"."[..]).filter(|_| false)
        );
        assert_eq!(oci_whiteout_target(b"foo"), None);
        assert!(is_oci_marker(b".wh..wh..opq"));
    }

    #[test]
    fn escaping_round_trips() {
        let p = Private::TRUSTED;
        assert_eq!(p.escape(b"trusted.overlay.x"), b"trusted.overlay.overlay.x");
        assert_eq!(p.escape(b"user.a"), b"user.a");
        assert_eq!(p.unescape(b"trusted.overlay.opaque"), None);
        assert_eq!(
            p.unescape(b"trusted.overlay.overlay.x").as_deref(),
            Some(&b"trusted.overlay.x"[..])
        );
        assert_eq!(p.unescape(b"user.a").as_deref(), Some(&b"user.a"[..]));
    }

    #[test]
    fn opaque_values() {
        assert_eq!(Opaque::from_value(Some(b"y")), Opaque::Yes);
        assert_eq!(Opaque::from_value(Some(b"x")), Opaque::XattrWhiteouts);
        assert_eq!(Opaque::from_value(Some(b"n")), Opaque::No);
        assert_eq!(Opaque::from_value(None), Opaque::No);
    }
}
