//! POSIX conformance: pjdfstest (the Rust port) on a layerfs mount and on
//! the kernel's overlayfs over the same layers, from a directory that exists
//! only in the lowers (every create copies up first), as root and as other
//! users. `scripts/pjdfstest.sh` fails when a layerfs failure is not also a
//! kernel failure listed in `scripts/pjdfstest-exclude.txt`, or when an
//! exclusion has gone stale.

use std::process::Command;

fn totals(log: &str, who: &str) -> Option<(u32, u32)> {
    let line = log.lines().find(|l| l.starts_with(&format!("{who}:")))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

#[test]
fn pjdfstest_matches_the_kernel_overlay() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pjdfstest.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("LAYERFS_BIN", env!("CARGO_BIN_EXE_layerfs"))
        .env("PJDFSTEST_TIMEOUT", "600")
        .output()
        .expect("run scripts/pjdfstest.sh");
    let log = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success(),
        "pjdfstest.sh failed ({}):\n{}\n{}",
        out.status,
        tail.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let kernel = totals(&log, "kernel").expect("kernel totals");
    let layerfs = totals(&log, "layerfs").expect("layerfs totals");
    assert_eq!(layerfs, kernel, "passed/failed: layerfs vs kernel");
    assert!(layerfs.0 >= 300, "too few cases passed: {layerfs:?}");
    eprintln!("pjdfstest: layerfs {layerfs:?} == kernel {kernel:?} (passed, failed)");
}
