//! The xattr checks of `layerfs check`: fuse-overlayfs' own xattrs
//! (`*.fuseoverlayfs.opaque`, `.override_stat`, `.origin`), private xattrs
//! of the namespace not in use, and metadata-only copy-ups.

use super::scan::{Attrs, Scan, is_dir, kernel_param};
use super::{Kind, Layer, Repair, Severity};
use crate::error::Result;
use crate::sys::Stat;
use crate::whiteout::{Opaque, Private};

impl Scan<'_> {
    pub(super) fn check_xattrs(
        &mut self,
        layer: Layer,
        path: &[u8],
        st: &Stat,
        attrs: &Attrs,
        opaque: Opaque,
    ) -> Result<()> {
        let other = self.other.name("");
        for n in &attrs.names {
            if n.starts_with(&other) {
                self.other_namespace(layer, path, n, attrs)?;
            } else if n.ends_with(b".fuseoverlayfs.opaque") {
                self.fuse_opaque(layer, path, n, attrs, opaque)?;
            } else if n.ends_with(b".fuseoverlayfs.override_stat") {
                self.override_stat(layer, path, n, attrs, st)?;
            } else if let Some(key) = find(n, b".fuseoverlayfs.") {
                let what = format!(
                    "fuse-overlayfs xattr {}: only fuse-overlayfs reads it{}",
                    n.escape_ascii(),
                    if key == b"origin" {
                        " (the kernel keeps the inode number with overlay.origin instead)"
                    } else {
                        ""
                    }
                );
                let f = (Severity::Note, Kind::FuseXattr, what);
                let rm = format!("remove {}", n.escape_ascii());
                let repair = Repair::RemoveXattr { xattr: n.clone() };
                self.add_fixable(layer, path, f, rm.clone(), rm, repair);
            }
        }
        if !is_dir(st) && attrs.names.contains(&self.opts.private.name("metacopy")) {
            self.metacopy(layer, path);
        }
        Ok(())
    }

    fn other_namespace(
        &mut self,
        layer: Layer,
        path: &[u8],
        n: &[u8],
        attrs: &Attrs,
    ) -> Result<()> {
        let user = self.other == Private::USER;
        let mount = if user { "without" } else { "with" };
        let mut what = format!(
            "private xattr of the other namespace ({}): the kernel mounting {mount} userxattr ignores it",
            n.escape_ascii()
        );
        if n == self.other.name("opaque").as_slice() && attrs.get(n)?.as_deref() == Some(b"y") {
            what.push_str(", so this directory merges with the layers below");
        }
        let how = if user {
            "if the whole set was written rootless, check with --userxattr and mount with -o userxattr"
        } else {
            "if the whole set was written as root, check and mount without userxattr"
        };
        self.add(
            layer,
            path,
            (Severity::Warning, Kind::OtherNamespace, what, how.into()),
        );
        Ok(())
    }

    fn fuse_opaque(
        &mut self,
        layer: Layer,
        path: &[u8],
        n: &[u8],
        attrs: &Attrs,
        opaque: Opaque,
    ) -> Result<()> {
        let private = String::from_utf8_lossy(&self.opts.private.name("opaque")).into_owned();
        let name = n.escape_ascii().to_string();
        let yes = attrs.get(n)?.as_deref() == Some(b"y");
        let (f, auto, repair) = if !yes || opaque == Opaque::Yes {
            let what = format!("fuse-overlayfs' opaque xattr {name} beside {private}: redundant");
            let f = (Severity::Note, Kind::FuseOpaque, what);
            (
                f,
                format!("remove {name}"),
                Repair::RemoveXattr { xattr: n.to_vec() },
            )
        } else {
            let what = format!(
                "fuse-overlayfs marks this directory opaque with {name}: the kernel and layerfs ignore it and merge it with the layers below"
            );
            let f = (Severity::Error, Kind::FuseOpaque, what);
            let auto = format!("set {private}=y, then remove {name}");
            (f, auto, Repair::FuseOpaque { xattr: n.to_vec() })
        };
        let manual = format!("setfattr -n {private} -v y DIR; setfattr -x {name} DIR");
        self.add_fixable(layer, path, f, auto, manual, repair);
        Ok(())
    }

    fn override_stat(
        &mut self,
        layer: Layer,
        path: &[u8],
        n: &[u8],
        attrs: &Attrs,
        st: &Stat,
    ) -> Result<()> {
        let name = n.escape_ascii().to_string();
        let v = attrs.get(n)?.unwrap_or_default();
        let Some((uid, gid, mode)) = parse_override_stat(&v) else {
            let what = format!(
                "fuse-overlayfs xattr {name} with a malformed value \"{}\"",
                v.escape_ascii()
            );
            let f = (Severity::Warning, Kind::FuseXattr, what);
            let rm = format!("remove {name}");
            self.add_fixable(
                layer,
                path,
                f,
                rm.clone(),
                rm,
                Repair::RemoveXattr { xattr: n.to_vec() },
            );
            return Ok(());
        };
        let real = (st.st_uid, st.st_gid, st.st_mode & 0o7777);
        let m = mode & 0o7777;
        if real == (uid, gid, m) {
            let what =
                format!("fuse-overlayfs xattr {name}: the same owner and mode as the file's own");
            let f = (Severity::Note, Kind::FuseXattr, what);
            let rm = format!("remove {name}");
            let repair = Repair::RemoveXattr { xattr: n.to_vec() };
            self.add_fixable(layer, path, f, rm.clone(), rm, repair);
            return Ok(());
        }
        let what = format!(
            "fuse-overlayfs (xattr_permissions) shows owner {uid}:{gid} mode {m:o} here; the kernel and layerfs show the real {}:{} {:o}",
            real.0, real.1, real.2
        );
        let f = (Severity::Warning, Kind::FuseXattr, what);
        let auto = format!("chown {uid}:{gid}, chmod {m:o}, then remove {name}");
        let manual = format!("chown {uid}:{gid} FILE; chmod {m:o} FILE; setfattr -x {name} FILE");
        let repair = Repair::OverrideStat { xattr: n.to_vec() };
        self.add_fixable(layer, path, f, auto, manual, repair);
        Ok(())
    }

    fn metacopy(&mut self, layer: Layer, path: &[u8]) {
        let on = kernel_param("metacopy").unwrap_or(false);
        let what = format!(
            "metadata-only copy-up (overlay.metacopy): layerfs refuses to open it; the kernel shows it only when mounted with metacopy=on ({} by default here)",
            if on { "on" } else { "off" }
        );
        let how = if layer == Layer::Upper {
            "copy its data up: open it for writing once (`: >> FILE`) through a kernel overlay mounted with metacopy=on,redirect_dir=on"
        } else {
            "mount this set with the kernel's metacopy=on, or rebuild the layer"
        };
        self.add(
            layer,
            path,
            (Severity::Error, Kind::Metacopy, what, how.into()),
        );
    }
}

/// The part of `n` after `needle`, if `n` contains it.
fn find<'a>(n: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
    let i = n.windows(needle.len()).position(|w| w == needle)?;
    Some(&n[i + needle.len()..])
}

/// `uid:gid:mode` (mode in octal, with the file type bits), as
/// fuse-overlayfs writes `override_stat`.
pub(super) fn parse_override_stat(v: &[u8]) -> Option<(u32, u32, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut it = s.trim_end_matches('\0').split(':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    it.next().is_none().then_some((uid, gid, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_stat_values() {
        assert_eq!(parse_override_stat(b"0:0:100640"), Some((0, 0, 0o100640)));
        assert_eq!(
            parse_override_stat(b"1000:100:40755"),
            Some((1000, 100, 0o40755))
        );
        assert_eq!(parse_override_stat(b"0:0"), None);
        assert_eq!(parse_override_stat(b"0:0:9"), None);
        assert_eq!(parse_override_stat(b"a:0:644"), None);
    }

    #[test]
    fn finds_after() {
        assert_eq!(
            find(b"user.fuseoverlayfs.origin", b".fuseoverlayfs."),
            Some(&b"origin"[..])
        );
        assert_eq!(find(b"user.overlay.origin", b".fuseoverlayfs."), None);
    }
}
