//! Mount-option parsing: arbitrary bytes as a `-o` string, as a `lowerdir=`
//! value and as an id mapping. Nothing may panic; what parses is then used
//! the way a mount uses it (ids presented through the parsed mapping).
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use layerfs::config::{MountConfig, apply_option_string, split_lowerdirs, split_options};
use layerfs::idmap::IdMap;
use libfuzzer_sys::fuzz_target;

/// A few ids taken from the input's last bytes, plus the edges.
fn probe_ids(data: &[u8]) -> Vec<u32> {
    let mut ids = vec![0, 1, 65535, 65536, u32::MAX - 1, u32::MAX];
    for c in data.rchunks(4).take(4) {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        ids.push(u32::from_le_bytes(b));
    }
    ids
}

fuzz_target!(|data: &[u8]| {
    // The whole `-o` string.
    let mut cfg = MountConfig::new(vec![]);
    if apply_option_string(&mut cfg, OsStr::from_bytes(data)).is_ok() {
        // Ids are shown (stat) and stored (chown) through the mapping.
        let view = &cfg.options.view;
        for id in probe_ids(data) {
            let mut st = layerfs::sys::zeroed_stat();
            st.st_uid = id;
            st.st_gid = id;
            st.st_mode = libc::S_IFDIR | 0o755;
            st.st_nlink = 3;
            view.present(&mut st);
            let _ = view.uid_to_disk(id);
            let _ = view.gid_to_disk(id);
        }
        assert!(cfg.options.threads >= 1 && cfg.options.threads <= 64);
    }

    // The splitters on their own.
    let items = split_options(data);
    assert!(items.iter().all(|i| !i.is_empty()), "empty option item");
    assert!(items.iter().map(Vec::len).sum::<usize>() <= data.len());
    let lowers = split_lowerdirs(data);
    assert!(
        lowers.iter().all(|p| !p.as_os_str().is_empty()),
        "empty lower dir"
    );

    // An id mapping on its own (uidmapping=/gidmapping= values).
    if let Ok(m) = IdMap::parse(&String::from_utf8_lossy(data)) {
        assert!(!m.is_empty());
        for id in probe_ids(data) {
            let _ = m.to_view(id);
            let _ = m.to_disk(id);
        }
    }
});
