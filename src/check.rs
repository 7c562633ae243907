//! `layerfs check`: is a set of layers (an upper, its lowers, a work dir)
//! in the kernel's overlay format, so that `mount -t overlay` accepts it and
//! shows the view that the tool which wrote it meant? Nothing is mounted.
//!
//! [`scan`] walks every layer and reports [`Finding`]s: one per entry that
//! the kernel would read differently from its writer (OCI `.wh.` markers
//! left in an upper, fuse-overlayfs' own xattrs and opaque markers, private
//! xattrs of the other namespace, metadata-only copy-ups, broken redirects,
//! whiteouts the kernel does not recognise), harmless leftovers (whiteouts
//! in opaque directories, the work dir's contents), and layer sets the
//! kernel refuses (a non-directory, nested layers, work on another
//! filesystem). The kernel's own format is never a finding, except
//! redirects, which are noted because they need `redirect_dir` to be
//! followed.
//!
//! Invariants: scanning never writes. [`fix::repair`] writes only inside the
//! upper, and only what a finding's [`Repair`] names, re-reading each entry
//! before changing it; every change is atomic on its own (a new entry is
//! built under a temporary name in its own directory and renamed into
//! place; an xattr is set before the marker it replaces is removed), so an
//! interrupted `--fix` leaves a valid layer that a second run finishes.

mod fix;
mod scan;
mod set;
mod xattrs;

use std::io::Write;
use std::path::PathBuf;

use crate::cli::CheckArgs;
use crate::config::{MountConfig, apply_option_string, split_lowerdirs};
use crate::whiteout::Private;

pub use fix::{Fixed, repair};
pub use scan::scan;

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Harmless or redundant; the view is as intended.
    Note,
    /// The view may differ from the intended one, or only one of the
    /// kernel and layerfs reads it as intended.
    Warning,
    /// The kernel refuses the set, or shows a view that is not the
    /// intended one.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// Which directory of the set a finding's path is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Upper,
    /// A lower layer; 0 is the topmost.
    Lower(usize),
    Work,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Upper => f.write_str("upper"),
            Layer::Lower(i) => write!(f, "lower{}", i + 1),
            Layer::Work => f.write_str("work"),
        }
    }
}

/// What was found (the `kind` field of `--json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A layer, `work/` or a redirect target that should be a directory.
    NotADirectory,
    /// The set breaks a rule of the kernel or layerfs (same filesystem,
    /// no nesting, no repeats, nothing else in the work dir).
    BadLayerSet,
    /// A whiteout in a directory that nothing below can contribute to.
    RedundantWhiteout,
    /// An OCI `.wh.NAME` file in the upper.
    OciWhiteout,
    /// An OCI `.wh..wh..opq` file in the upper.
    OciOpaque,
    /// An OCI marker in a lower: layerfs honours it, the kernel shows it.
    LowerOciMarker,
    /// `user.fuseoverlayfs.opaque`.
    FuseOpaque,
    /// Another `*.fuseoverlayfs.*` xattr (origin, override_stat, ...).
    FuseXattr,
    /// A private xattr of the namespace not in use (trusted vs user).
    OtherNamespace,
    /// `overlay.redirect` (a directory renamed with `redirect_dir=on`).
    Redirect,
    /// A redirect that leads nowhere or to a non-directory.
    BadRedirect,
    /// `overlay.metacopy` (a metadata-only copy-up).
    Metacopy,
    /// Something meant as a whiteout that the kernel does not read as one.
    BadWhiteout,
    /// Entries in the work dir.
    WorkLeftover,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NotADirectory => "not-a-directory",
            Kind::BadLayerSet => "bad-layer-set",
            Kind::RedundantWhiteout => "redundant-whiteout",
            Kind::OciWhiteout => "oci-whiteout",
            Kind::OciOpaque => "oci-opaque",
            Kind::LowerOciMarker => "lower-oci-marker",
            Kind::FuseOpaque => "fuse-overlayfs-opaque",
            Kind::FuseXattr => "fuse-overlayfs-xattr",
            Kind::OtherNamespace => "other-namespace",
            Kind::Redirect => "redirect",
            Kind::BadRedirect => "bad-redirect",
            Kind::Metacopy => "metacopy",
            Kind::BadWhiteout => "bad-whiteout",
            Kind::WorkLeftover => "work-leftover",
        }
    }
}

/// What `--fix` does about a finding in the upper. Paths are from the
/// upper's root, as in [`Finding::path`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Remove a redundant whiteout, once the reason still holds.
    RemoveWhiteout { because: Redundant },
    /// `.wh.NAME` → a 0/0 whiteout NAME with the marker's owner; if NAME
    /// exists beside it, a directory NAME is made opaque and the marker
    /// removed. With `nothing_below` (its directory hides no lower one)
    /// the marker is only removed.
    OciWhiteout { nothing_below: Option<Redundant> },
    /// `.wh..wh..opq` → the opaque xattr on its directory, marker removed.
    OciOpaque,
    /// `NAME=y` → the private opaque xattr, then `NAME` removed.
    FuseOpaque { xattr: Vec<u8> },
    /// Remove an xattr that only fuse-overlayfs reads.
    RemoveXattr { xattr: Vec<u8> },
    /// Apply `override_stat` (`uid:gid:mode`) as the real owner and mode,
    /// then remove it.
    OverrideStat { xattr: Vec<u8> },
    /// Replace a block device 0/0 by a character device 0/0.
    CharWhiteout,
}

/// Why nothing lies below a directory of the upper, so that a whiteout in
/// it hides nothing (and the kernel, which filters whiteouts only out of
/// merged directories, lists it: `ls` shows a `c?????????` entry that
/// cannot be looked up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redundant {
    /// The directory at this path (it or an ancestor) is opaque.
    Opaque(Vec<u8>),
    /// No lower layer has a directory at this path (from the lowers' root).
    NoLowerDir(Vec<u8>),
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub kind: Kind,
    pub layer: Layer,
    /// From the layer's root, starting with `/` (`/` is the root itself).
    pub path: Vec<u8>,
    /// What is wrong and what the kernel (and layerfs) make of it.
    pub what: String,
    /// How to fix it by hand (or what `--fix` does, when `repair` is set).
    pub how: String,
    pub repair: Option<Repair>,
}

/// The set to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub upper: PathBuf,
    /// Topmost first.
    pub lowers: Vec<PathBuf>,
    pub work: Option<PathBuf>,
    pub private: Private,
}

/// What the findings mean for a kernel mount, from the worst one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Intended,
    ViewDiffers,
    Unmountable,
}

pub fn verdict(findings: &[Finding]) -> Verdict {
    let refused = |f: &Finding| {
        f.severity == Severity::Error
            && matches!(f.kind, Kind::BadLayerSet | Kind::NotADirectory)
            && f.path == b"/"
    };
    if findings.iter().any(refused) {
        Verdict::Unmountable
    } else if findings.iter().any(|f| f.severity > Severity::Note) {
        Verdict::ViewDiffers
    } else {
        Verdict::Intended
    }
}

/// `layerfs check`: exit status 0 clean, 1 findings, 2 error.
pub fn check_cmd(a: CheckArgs) -> Result<i32, String> {
    match run(a) {
        Ok(code) => Ok(code),
        Err(msg) => {
            eprintln!("layerfs: check: {msg}");
            Ok(2)
        }
    }
}

fn options(a: &CheckArgs) -> Result<CheckOptions, String> {
    let mut cfg = MountConfig::new(Vec::new());
    for o in &a.options {
        apply_option_string(&mut cfg, o)?;
    }
    let mut lowers = cfg.lowers;
    for l in &a.lowers {
        lowers.extend(split_lowerdirs(l.as_os_str().as_encoded_bytes()));
    }
    let upper =
        a.upper.clone().or(cfg.upper).ok_or(
            "no upper layer: give --upper DIR (or -o upperdir=DIR); see layerfs check --help",
        )?;
    let userxattr = a.userxattr || cfg.options.userxattr;
    Ok(CheckOptions {
        upper,
        lowers,
        work: a.work.clone().or(cfg.work),
        private: if userxattr {
            Private::USER
        } else {
            Private::TRUSTED
        },
    })
}

fn run(a: CheckArgs) -> Result<i32, String> {
    let opts = options(&a)?;
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    let mut findings = scan(&opts).map_err(|e| e.to_string())?;
    if a.fix && findings.iter().any(|f| f.repair.is_some()) {
        if let Some(m) = mounted_at(&opts.upper) {
            return Err(format!(
                "--fix: {} is the upper of the overlay mounted at {m}: unmount it first",
                opts.upper.display()
            ));
        }
        for r in repair(&opts, &findings) {
            failed |= r.result.is_err();
            print_fixed(&mut out, &r, a.json).map_err(|e| e.to_string())?;
        }
        findings = scan(&opts).map_err(|e| e.to_string())?;
    }
    for f in &findings {
        print_finding(&mut out, f, a.json).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    eprintln!("layerfs check: {}", summary(&findings));
    Ok(if failed {
        2
    } else if findings.is_empty() {
        0
    } else {
        1
    })
}

/// The mount point of a kernel overlay whose upperdir is `upper`, from
/// `/proc/self/mountinfo` (`... MOUNTPOINT ... - overlay SOURCE OPTS`).
/// layerfs mounts do not show their layers there; `--fix` under one of
/// them is the user's to avoid.
fn mounted_at(upper: &std::path::Path) -> Option<String> {
    let upper = std::fs::canonicalize(upper).ok()?;
    let want = format!("upperdir={}", upper.display());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (head, tail) = l.split_once(" - ")?;
        let mut t = tail.split(' ');
        let (fstype, _, opts) = (t.next()?, t.next()?, t.next()?);
        let hit = fstype == "overlay" && opts.split(',').any(|o| o == want);
        hit.then(|| head.split(' ').nth(4).unwrap_or("?").to_string())
    })
}

fn summary(findings: &[Finding]) -> String {
    let count = |s: Severity, word: &str| {
        let n = findings.iter().filter(|f| f.severity == s).count();
        (n > 0).then(|| format!("{n} {word}{}", if n == 1 { "" } else { "s" }))
    };
    let counts: Vec<String> = [
        count(Severity::Error, "error"),
        count(Severity::Warning, "warning"),
        count(Severity::Note, "note"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let head = if counts.is_empty() {
        "clean".to_string()
    } else {
        counts.join(", ")
    };
    let tail = match verdict(findings) {
        Verdict::Intended => "the kernel can mount this set and shows the intended view",
        Verdict::ViewDiffers => {
            "the kernel can mount this set, but does not show the intended view everywhere"
        }
        Verdict::Unmountable => "the kernel cannot mount this set",
    };
    format!("{head}: {tail}")
}

/// `SEVERITY<TAB>LAYER:PATH<TAB>WHAT<TAB>fix: HOW`, or one JSON object.
fn print_finding(out: &mut impl Write, f: &Finding, json: bool) -> std::io::Result<()> {
    if json {
        let mut v = serde_json::json!({
            "severity": f.severity.as_str(),
            "kind": f.kind.as_str(),
            "layer": f.layer.to_string(),
            "what": f.what,
            "fix": f.how,
            "fixable": f.repair.is_some(),
        });
        put_path(&mut v, &f.path);
        return writeln!(out, "{v}");
    }
    let how = if f.repair.is_some() { "--fix" } else { "fix" };
    writeln!(
        out,
        "{}\t{}:{}\t{}\t{how}: {}",
        f.severity.as_str(),
        f.layer,
        f.path.escape_ascii(),
        f.what,
        f.how
    )
}

fn print_fixed(out: &mut impl Write, r: &Fixed, json: bool) -> std::io::Result<()> {
    let result = match &r.result {
        Ok(done) => done.clone(),
        Err(e) => format!("not fixed: {e}"),
    };
    if json {
        let mut v = serde_json::json!({
            "fixed": r.result.is_ok(),
            "kind": r.kind.as_str(),
            "layer": "upper",
            "what": result,
        });
        put_path(&mut v, &r.path);
        return writeln!(out, "{v}");
    }
    let word = if r.result.is_ok() { "fixed" } else { "failed" };
    writeln!(out, "{word}\tupper:{}\t{result}", r.path.escape_ascii())
}

/// A JSON `path`: the path itself when it is UTF-8; otherwise every byte
/// outside valid UTF-8 as `\xNN`, backslashes doubled, and `"raw":false`
/// (as `layerfs diff --json` writes it).
fn put_path(v: &mut serde_json::Value, path: &[u8]) {
    let (s, raw) = match std::str::from_utf8(path) {
        Ok(s) => (s.to_string(), true),
        Err(_) => {
            let mut s = String::new();
            for chunk in path.utf8_chunks() {
                s.push_str(&chunk.valid().replace('\\', "\\\\"));
                for b in chunk.invalid() {
                    s.push_str(&format!("\\x{b:02x}"));
                }
            }
            (s, false)
        }
    };
    v["path"] = s.into();
    if !raw {
        v["raw"] = false.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity, kind: Kind, path: &[u8]) -> Finding {
        Finding {
            severity,
            kind,
            layer: Layer::Upper,
            path: path.to_vec(),
            what: String::new(),
            how: String::new(),
            repair: None,
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&[]), Verdict::Intended);
        let note = finding(Severity::Note, Kind::RedundantWhiteout, b"/a");
        assert_eq!(verdict(std::slice::from_ref(&note)), Verdict::Intended);
        let err = finding(Severity::Error, Kind::OciOpaque, b"/d/.wh..wh..opq");
        assert_eq!(verdict(&[note.clone(), err]), Verdict::ViewDiffers);
        let set = finding(Severity::Error, Kind::BadLayerSet, b"/");
        assert_eq!(verdict(&[note, set]), Verdict::Unmountable);
    }

    #[test]
    fn summaries() {
        assert_eq!(
            summary(&[]),
            "clean: the kernel can mount this set and shows the intended view"
        );
        let s = summary(&[
            finding(Severity::Note, Kind::RedundantWhiteout, b"/a"),
            finding(Severity::Note, Kind::RedundantWhiteout, b"/b"),
            finding(Severity::Error, Kind::OciWhiteout, b"/.wh.c"),
        ]);
        assert!(s.starts_with("1 error, 2 notes: "), "{s}");
    }

    #[test]
    fn json_paths() {
        let mut v = serde_json::json!({});
        put_path(&mut v, b"/a\\b\xff");
        assert_eq!(v["path"], "/a\\\\b\\xff");
        assert_eq!(v["raw"], false);
        let mut v = serde_json::json!({});
        put_path(&mut v, "/é".as_bytes());
        assert_eq!(v["path"], "/é");
        assert!(v.get("raw").is_none());
    }

    #[test]
    fn text_lines() {
        let mut f = finding(Severity::Error, Kind::OciWhiteout, b"/x/.wh.y\n");
        f.what = "w".into();
        f.how = "h".into();
        f.repair = Some(Repair::OciWhiteout {
            nothing_below: None,
        });
        let mut out = Vec::new();
        print_finding(&mut out, &f, false).unwrap();
        assert_eq!(out, b"error\tupper:/x/.wh.y\\n\tw\t--fix: h\n");
    }
}
