//! How owners are presented: fuse-overlayfs's dynamic id mappings
//! (`uidmapping=`/`gidmapping=`), `squash_to_root`, `squash_to_uid/gid`, and
//! `static_nlink`. Layers keep their ids on disk; only what the kernel is
//! told (and what callers ask to set) is translated.

/// Ranges `DISK:VIEW:LEN` — an id `DISK + k` on disk is shown as `VIEW + k`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<(u32, u32, u32)>,
}

impl IdMap {
    /// Parses `A:B:N[:A2:B2:N2...]` (triples, colon-separated, as podman
    /// passes them; `,`-separated triples too).
    pub fn parse(s: &str) -> Result<IdMap, String> {
        let nums: Result<Vec<u32>, _> = s
            .split([':', ','])
            .filter(|x| !x.is_empty())
            .map(str::parse)
            .collect();
        let nums = nums.map_err(|_| {
            format!("invalid id mapping '{s}': expected ID:MAPPED-ID:LEN[:ID:MAPPED-ID:LEN...]")
        })?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(format!(
                "invalid id mapping '{s}': expected triples ID:MAPPED-ID:LEN"
            ));
        }
        let ranges: Vec<(u32, u32, u32)> = nums.chunks(3).map(|c| (c[0], c[1], c[2])).collect();
        // Every id of a range must exist on both sides: no wrap-around.
        if ranges
            .iter()
            .any(|&(d, v, n)| d.checked_add(n).is_none() || v.checked_add(n).is_none())
        {
            return Err(format!(
                "invalid id mapping '{s}': a range goes past the largest id"
            ));
        }
        Ok(IdMap { ranges })
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The id shown for an id on disk (unmapped ids are shown unchanged).
    pub fn to_view(&self, disk: u32) -> u32 {
        for &(d, v, n) in &self.ranges {
            if disk >= d && disk - d < n {
                return v + (disk - d);
            }
        }
        disk
    }

    /// The id stored on disk for an id a caller uses.
    pub fn to_disk(&self, view: u32) -> u32 {
        for &(d, v, n) in &self.ranges {
            if view >= v && view - v < n {
                return d + (view - v);
            }
        }
        view
    }
}

/// The whole presentation of owners and directory link counts.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub uids: IdMap,
    pub gids: IdMap,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub static_nlink: bool,
}

impl View {
    /// Applies the view to attributes about to be reported.
    pub fn present(&self, st: &mut libc::stat) {
        st.st_uid = self
            .squash_uid
            .unwrap_or_else(|| self.uids.to_view(st.st_uid));
        st.st_gid = self
            .squash_gid
            .unwrap_or_else(|| self.gids.to_view(st.st_gid));
        if self.static_nlink && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            st.st_nlink = 1;
        }
    }

    pub fn uid_to_disk(&self, uid: u32) -> u32 {
        self.uids.to_disk(uid)
    }

    pub fn gid_to_disk(&self, gid: u32) -> u32 {
        self.gids.to_disk(gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        let m = IdMap::parse("0:1000:1:1:110000:65536").unwrap();
        assert_eq!(m.to_view(0), 1000);
        assert_eq!(m.to_view(5), 110004);
        assert_eq!(m.to_disk(110004), 5);
        assert_eq!(m.to_disk(1000), 0);
        assert_eq!(m.to_view(70000), 70000);
        assert!(IdMap::parse("0:1").is_err());
        assert!(IdMap::parse("a:b:c").is_err());
        assert!(IdMap::parse("0:4294967295:2").is_err());
        assert!(IdMap::parse("4294967295:0:2").is_err());
    }

    #[test]
    fn squash_wins_over_mapping() {
        let v = View {
            uids: IdMap::parse("0:1000:10").unwrap(),
            squash_uid: Some(0),
            static_nlink: true,
            ..View::default()
        };
        let mut st = crate::sys::zeroed_stat();
        st.st_mode = libc::S_IFDIR;
        st.st_nlink = 5;
        st.st_uid = 3;
        st.st_gid = 3;
        v.present(&mut st);
        assert_eq!((st.st_uid, st.st_gid, st.st_nlink), (0, 3, 1));
    }
}
