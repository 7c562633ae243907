//! OCI import/export against real tools from Debian: `buildah` builds an
//! image offline (a base layer from the `busybox-static` package, then a
//! layer that deletes a file and makes a directory opaque), `umoci unpack`
//! is the reference for what the image contains, and `skopeo` converts it
//! to other formats and checks what `layerfs export --oci-layout` writes.
//!
//! The tools are installed with `apt-get` if missing; when that is not
//! possible (not root, no package archive) the tests print a SKIP line and
//! pass. The `.deb` is cached under the target dir between runs.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{CompareOpts, KernelMount, LayerfsMount, Snapshot, Syntax};

fn skip(why: &str) {
    eprintln!("SKIP oci_real: {why}");
}

/// Runs a command; Err with its output if it fails.
fn run<I, S>(prog: &str, args: I) -> Result<String, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = Command::new(prog)
        .args(&args)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{prog} {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the tools if missing (once per process).
fn tools() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let missing: Vec<&str> = ["umoci", "skopeo", "buildah"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !layerfs::oci::running_as_root() {
            return Err(format!("{missing:?} missing and not root to install them"));
        }
        let mut args = vec![
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
        ];
        args.extend(&missing);
        if run("apt-get", &args).is_err() {
            // A fresh machine may have no package lists yet.
            let _ = run("apt-get", ["update", "-q", "-o", "DPkg::Lock::Timeout=300"]);
            run("apt-get", &args).map_err(|e| format!("cannot install {missing:?}: {e}"))?;
        }
        Ok(())
    })
    .clone()
}

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oci-real-cache")
}

/// The busybox-static package, downloaded once into the cache.
fn busybox_deb() -> Result<PathBuf, String> {
    let dir = cache();
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let find = || {
        fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "busybox-static"])
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("apt-get: {e}"))
    };
    let mut o = download()?;
    if !o.status.success() {
        let _ = run("apt-get", ["update", "-q", "-o", "DPkg::Lock::Timeout=300"]);
        o = download()?;
    }
    find().ok_or_else(|| {
        format!(
            "apt-get download busybox-static: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// The image everything here works on, built once per test process.
struct Fixture {
    work: PathBuf,
    /// OCI layout with `v1` (base) and `v2` (base + deletions/opaque dir).
    layout: PathBuf,
}

fn buildah(work: &Path, args: &[&str]) -> Result<String, String> {
    let root = work.join("storage");
    let runroot = work.join("run");
    let mut v: Vec<&OsStr> = vec![
        "--root".as_ref(),
        root.as_os_str(),
        "--runroot".as_ref(),
        runroot.as_os_str(),
        "--storage-driver".as_ref(),
        "overlay".as_ref(),
        "--storage-opt".as_ref(),
        "overlay.skip_mount_home=true".as_ref(),
    ];
    v.extend(args.iter().map(OsStr::new));
    run("buildah", v).map(|s| s.trim().to_string())
}

fn sh(script: &str, dir: &Path) -> Result<(), String> {
    run("sh", ["-ec", &format!("cd '{}'\n{script}", dir.display())]).map(drop)
}

/// Work directories of earlier test processes that are gone.
fn remove_stale_work(base: &Path) {
    let Ok(rd) = fs::read_dir(base) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("oci-real-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn build_fixture() -> Result<Fixture, String> {
    tools()?;
    let deb = busybox_deb()?;
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    remove_stale_work(&base);
    let work = base.join(format!("oci-real-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let rootfs = work.join("rootfs");
    run(
        "dpkg-deb",
        ["-x".as_ref(), deb.as_os_str(), rootfs.as_os_str()],
    )?;
    // Extra content of every kind for the comparison.
    sh(
        "mkdir -p bin etc var/lib/app tmp dev
         ln -sf ../usr/bin/busybox bin/sh 2>/dev/null || ln -sf busybox bin/sh
         [ -e bin/busybox ] && chmod 4755 bin/busybox
         echo 'name=app' > etc/app.conf
         setfattr -n user.tag -v base etc/app.conf
         echo a > var/lib/app/a; echo b > var/lib/app/b
         ln var/lib/app/a var/lib/app/a-link
         chmod 1777 tmp
         mkfifo dev/fifo
         echo old > etc/old.conf; chown 1000:1000 etc/old.conf",
        &rootfs,
    )?;
    let layout = work.join("layout");
    let layout_ref = |tag: &str| format!("oci:{}:{tag}", layout.display());
    let ctr = buildah(&work, &["from", "scratch"])?;
    buildah(
        &work,
        &["copy", &ctr, &format!("{}/", rootfs.display()), "/"],
    )?;
    buildah(
        &work,
        &[
            "config",
            "--cmd",
            "/bin/sh",
            "--created-by",
            "COPY busybox-static rootfs /",
            &ctr,
        ],
    )?;
    buildah(&work, &["commit", "-q", &ctr, &layout_ref("v1")])?;
    // The second layer: delete a file, replace a directory (opaque).
    let ctr2 = buildah(&work, &["from", "-q", &layout_ref("v1")])?;
    let mnt = PathBuf::from(buildah(&work, &["mount", &ctr2])?);
    sh(
        "rm etc/old.conf
         rm -rf var/lib/app && mkdir var/lib/app && echo c > var/lib/app/c
         echo extra >> etc/app.conf",
        &mnt,
    )?;
    buildah(&work, &["umount", &ctr2])?;
    buildah(
        &work,
        &[
            "config",
            "--created-by",
            "RUN rm /etc/old.conf; replace /var/lib/app",
            &ctr2,
        ],
    )?;
    buildah(&work, &["commit", "-q", &ctr2, &layout_ref("v2")])?;
    buildah(&work, &["rm", "-a"])?;
    Ok(Fixture { work, layout })
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Result<Fixture, String>> = OnceLock::new();
    if !layerfs::oci::running_as_root() {
        skip("not root");
        return None;
    }
    match F.get_or_init(build_fixture) {
        Ok(f) => Some(f),
        Err(e) => {
            skip(e);
            None
        }
    }
}

fn import(image: &Path, dest: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let mut args: Vec<&OsStr> = vec!["import".as_ref(), image.as_os_str(), dest.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let out = run(common::layerfs_bin(), args).unwrap();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("lowerdir="))
        .expect("lowerdir line");
    line.split(':').map(PathBuf::from).collect()
}

fn umoci_unpack(f: &Fixture, tag: &str, into: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(into);
    run(
        "umoci",
        [
            "unpack".as_ref(),
            "--image".as_ref(),
            OsStr::new(&format!("{}:{tag}", f.layout.display())),
            into.as_os_str(),
        ],
    )
    .unwrap();
    into.join("rootfs")
}

/// What both sides must agree on: names, types, modes, owners, contents,
/// symlink targets, device numbers, xattrs, file mtimes, hard links.
/// Directory mtimes are not compared (umoci sets them as it unpacks).
fn assert_same_tree(reference: &Snapshot, got: &Snapshot) {
    let opts = CompareOpts {
        dir_mtime: false,
        blocks: false,
        invariants: false,
        ..CompareOpts::default()
    };
    common::assert_same_with(opts, reference, got);
}

#[test]
fn buildah_image_mounts_like_umoci_unpacks_it() {
    let Some(f) = fixture() else { return };
    let dest = f.work.join("layers-1");
    let lowers = import(&f.layout, &dest, &["--tag", "v2"]);
    assert_eq!(lowers.len(), 2);
    let rootfs = umoci_unpack(f, "v2", &f.work.join("bundle-1"));
    let reference = common::snapshot("umoci", &rootfs);
    assert!(reference.entries.contains_key(&b"var/lib/app/c"[..]));
    assert!(!reference.entries.contains_key(&b"var/lib/app/a"[..]));
    assert!(!reference.entries.contains_key(&b"etc/old.conf"[..]));
    let conf = &reference.entries[&b"etc/app.conf"[..]];
    assert!(
        conf.xattrs
            .as_ref()
            .is_ok_and(|x| x.contains_key(&b"user.tag"[..])),
        "xattrs are part of the comparison"
    );

    let l = LayerfsMount::new(&lowers, false, Syntax::Subcommand);
    assert_same_tree(&reference, &l.snapshot());
    let k = KernelMount::new(&lowers, false);
    assert_same_tree(&reference, &k.snapshot());
}

#[test]
fn skopeo_archives_import_to_the_same_layers() {
    let Some(f) = fixture() else { return };
    let dest = f.work.join("layers-2");
    let from_layout = import(&f.layout, &dest, &["--tag", "v2"]);
    let src = format!("oci:{}:v2", f.layout.display());
    for (kind, name) in [("docker-archive", "docker.tar"), ("oci-archive", "oci.tar")] {
        let p = f.work.join(name);
        let _ = fs::remove_file(&p);
        let tagged = if kind == "docker-archive" {
            ":app:v2"
        } else {
            ":v2"
        };
        run(
            "skopeo",
            [
                "copy",
                "-q",
                &src,
                &format!("{kind}:{}{tagged}", p.display()),
            ],
        )
        .unwrap();
        let lowers = import(&p, &dest, &["-q"]);
        assert_eq!(lowers, from_layout, "{kind}: the same layer directories");
        // `… | gzip` archives too.
        let gz = f.work.join(format!("{name}.gz"));
        let out = Command::new("gzip").arg("-c").arg(&p).output().unwrap();
        fs::write(&gz, out.stdout).unwrap();
        let lowers = import(&gz, &dest, &["-q"]);
        assert_eq!(
            lowers, from_layout,
            "{kind} | gzip: the same layer directories"
        );
    }
    assert_eq!(
        fs::read_dir(&dest).unwrap().count(),
        2,
        "layers shared, not duplicated"
    );
}

#[test]
fn exported_layer_loads_with_skopeo_and_umoci() {
    let Some(f) = fixture() else { return };
    // A copy of the layout, so the other tests see it unchanged.
    let layout = f.work.join("layout-export");
    let _ = fs::remove_dir_all(&layout);
    run(
        "cp",
        ["-a".as_ref(), f.layout.as_os_str(), layout.as_os_str()],
    )
    .unwrap();
    let dest = f.work.join("layers-3");
    let lowers = import(&layout, &dest, &["--tag", "v2"]);
    let m = LayerfsMount::new(&lowers, true, Syntax::Subcommand);
    sh(
        "rm bin/sh
         rm -rf usr/share/doc && mkdir usr/share/doc && echo mine > usr/share/doc/README
         echo changed > etc/app.conf
         setfattr -n user.state -v exported etc/app.conf
         mkdir -p srv && echo hello > srv/index.html && chmod 640 srv/index.html
         ln srv/index.html srv/index.htm",
        m.path(),
    )
    .unwrap();
    let view = m.snapshot();
    let out = run(
        common::layerfs_bin(),
        [
            "export".as_ref(),
            m.path().as_os_str(),
            "--oci-layout".as_ref(),
            layout.as_os_str(),
            "--tag".as_ref(),
            "v2".as_ref(),
            "--new-tag".as_ref(),
            "v3".as_ref(),
        ],
    )
    .unwrap();
    assert!(out.contains("tag: v3"), "{out}");
    drop(m);

    let image = format!("oci:{}:v3", layout.display());
    let inspect = run("skopeo", ["inspect", &image]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{inspect}");
    let copy = f.work.join("copied");
    let _ = fs::remove_dir_all(&copy);
    run(
        "skopeo",
        ["copy", "-q", &image, &format!("oci:{}:v3", copy.display())],
    )
    .unwrap();

    let fx = Fixture {
        work: f.work.clone(),
        layout: layout.clone(),
    };
    let rootfs = umoci_unpack(&fx, "v3", &f.work.join("bundle-3"));
    let mut reference = common::snapshot("umoci", &rootfs);
    // The merged root's times come from the upper; a layer has no root.
    let root = view.entries[&Vec::new()].mtime;
    reference.entries.get_mut(&Vec::new()).unwrap().mtime = root;
    assert_same_tree(&reference, &view);
}
