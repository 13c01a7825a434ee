//! ID shifting between what the layers store and what the mount shows, as the mount options
//! `uidmapping=`/`gidmapping=` and `squash_to_uid=`/`squash_to_gid=`/`squash_to_root` ask
//! (the options containers/storage passes to its mount program).
//!
//! A mapping is a list of ranges `STORED:SHOWN:LEN`: IDs `STORED..STORED+LEN` in the layers are
//! shown as `SHOWN..SHOWN+LEN` and the other way round for what callers write (chown, the owner
//! of a new object). containers/storage writes `uidmapping=:0:100000:65536` (container IDs on
//! disk, host IDs through the mount; note the leading colon) and joins several ranges with `:`.
//! An ID outside every range maps to the overflow ID (65534), both ways, as fuse-overlayfs does.
//!
//! ```
//! use ovl_core::idmap::IdMap;
//! let m = IdMap::parse(":0:100000:65536").unwrap();
//! assert_eq!(m.shown(5), 100005);
//! assert_eq!(m.stored(100005), 5);
//! ```

/// The ID shown for IDs no range maps (the kernel's default `overflowuid`/`overflowgid`).
pub const OVERFLOW_ID: u32 = 65534;

/// One range of a mapping: `len` IDs from `stored` in the layers are `shown..shown+len` through
/// the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First ID as stored in the layers.
    pub stored: u32,
    /// First ID as the mount shows it.
    pub shown: u32,
    /// How many IDs (at least 1).
    pub len: u32,
}

/// A mapping of IDs between layers and mount; empty means the identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<IdRange>,
}

impl IdMap {
    /// Parses `STORED:SHOWN:LEN[:STORED:SHOWN:LEN...]`; empty fields (a leading colon, as
    /// containers/storage writes) are skipped. Ranges may not overlap on either side (the map
    /// would not be invertible), be empty, or run past the last 32-bit ID.
    pub fn parse(s: &str) -> Result<Self, String> {
        let fields: Vec<&str> = s.split(':').filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            return Err("no ranges given (expected STORED:SHOWN:LEN, e.g. 0:100000:65536)".into());
        }
        if fields.len() % 3 != 0 {
            return Err(format!(
                "{} numbers given, expected groups of three (STORED:SHOWN:LEN, e.g. 0:100000:65536)",
                fields.len()
            ));
        }
        let mut ranges = Vec::new();
        for f in fields.chunks_exact(3) {
            let num = |v: &str| v.parse::<u32>().map_err(|_| format!("`{v}` is not an ID (0 to 4294967295)"));
            let r = IdRange { stored: num(f[0])?, shown: num(f[1])?, len: num(f[2])? };
            if r.len == 0 {
                return Err(format!("range {}:{}:0 is empty", r.stored, r.shown));
            }
            let end = |start: u32| u64::from(start) + u64::from(r.len);
            if end(r.stored) > 1 << 32 || end(r.shown) > 1 << 32 {
                return Err(format!("range {}:{}:{} runs past the last ID", r.stored, r.shown, r.len));
            }
            let overlaps = |a: u32, b: u32, blen: u32| u64::from(a) < end_of(b, blen) && u64::from(b) < end(a);
            if let Some(o) = ranges
                .iter()
                .find(|o: &&IdRange| overlaps(r.stored, o.stored, o.len) || overlaps(r.shown, o.shown, o.len))
            {
                return Err(format!(
                    "ranges {}:{}:{} and {}:{}:{} overlap",
                    o.stored, o.shown, o.len, r.stored, r.shown, r.len
                ));
            }
            ranges.push(r);
        }
        Ok(Self { ranges })
    }

    /// True for the identity (no ranges given).
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, in the order given.
    pub fn ranges(&self) -> &[IdRange] {
        &self.ranges
    }

    /// The ID the mount shows for `stored` ([`OVERFLOW_ID`] if no range holds it).
    pub fn shown(&self, stored: u32) -> u32 {
        self.find(stored, |r| (r.stored, r.shown))
    }

    /// The ID stored for `shown` written by a caller ([`OVERFLOW_ID`] if no range holds it).
    pub fn stored(&self, shown: u32) -> u32 {
        self.find(shown, |r| (r.shown, r.stored))
    }

    fn find(&self, id: u32, dir: impl Fn(&IdRange) -> (u32, u32)) -> u32 {
        if self.ranges.is_empty() {
            return id;
        }
        for r in &self.ranges {
            let (from, to) = dir(r);
            if id >= from && id - from < r.len {
                return to + (id - from);
            }
        }
        OVERFLOW_ID
    }
}

fn end_of(start: u32, len: u32) -> u64 {
    u64::from(start) + u64::from(len)
}

/// Everything that changes owners between layers and mount: the two mappings and the squash
/// options, which make every object *shown* as owned by one uid or gid (what callers write is
/// still only mapped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdShift {
    /// `uidmapping=`.
    pub uids: IdMap,
    /// `gidmapping=`.
    pub gids: IdMap,
    /// `squash_to_uid=`: every object shown as owned by this uid.
    pub squash_uid: Option<u32>,
    /// `squash_to_gid=`: every object shown as owned by this gid.
    pub squash_gid: Option<u32>,
    /// `squash_to_root`: uid and gid shown as 0 unless `squash_to_uid`/`squash_to_gid` say
    /// otherwise (they take precedence).
    pub squash_to_root: bool,
}

impl IdShift {
    /// True when owners pass unchanged both ways.
    pub fn is_identity(&self) -> bool {
        self.uids.is_identity() && self.gids.is_identity() && !self.is_squashing()
    }

    /// True when a squash option is given.
    pub fn is_squashing(&self) -> bool {
        self.squash_uid.is_some() || self.squash_gid.is_some() || self.squash_to_root
    }

    /// The uid shown for a stored uid.
    pub fn shown_uid(&self, stored: u32) -> u32 {
        self.squash_uid.or(self.squash_to_root.then_some(0)).unwrap_or_else(|| self.uids.shown(stored))
    }

    /// The gid shown for a stored gid.
    pub fn shown_gid(&self, stored: u32) -> u32 {
        self.squash_gid.or(self.squash_to_root.then_some(0)).unwrap_or_else(|| self.gids.shown(stored))
    }

    /// The uid stored for a uid a caller writes (or creates as).
    pub fn stored_uid(&self, shown: u32) -> u32 {
        self.uids.stored(shown)
    }

    /// The gid stored for a gid a caller writes (or creates as).
    pub fn stored_gid(&self, shown: u32) -> u32 {
        self.gids.stored(shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_containers_storage_writes() {
        let m = IdMap::parse(":0:100000:65536").unwrap();
        assert_eq!(m.ranges(), &[IdRange { stored: 0, shown: 100000, len: 65536 }]);
        assert_eq!((m.shown(0), m.shown(65535), m.shown(65536)), (100000, 165535, OVERFLOW_ID));
        assert_eq!((m.stored(100000), m.stored(99999)), (0, OVERFLOW_ID));
        // --userns=keep-id for uid 1000 with 65536 subuids: three ranges.
        let k = IdMap::parse(":0:1:1000:1000:0:1:1001:1001:64536").unwrap();
        assert_eq!((k.shown(1000), k.shown(0), k.shown(1001)), (0, 1, 1001));
        assert_eq!((k.stored(0), k.stored(1)), (1000, 0));
    }

    #[test]
    fn bad_mappings_say_why() {
        let err = |s| IdMap::parse(s).unwrap_err();
        assert!(err("").contains("no ranges"), "{}", err(""));
        assert!(err(":0:100000").contains("groups of three"), "{}", err(":0:100000"));
        assert!(err("0:x:1").contains("`x` is not an ID"), "{}", err("0:x:1"));
        assert!(err("0:-1:1").contains("`-1`"), "{}", err("0:-1:1"));
        assert!(err("0:1:0").contains("empty"), "{}", err("0:1:0"));
        assert!(err("0:4294967295:2").contains("past the last ID"), "{}", err("0:4294967295:2"));
        assert!(err("0:100:10:5:200:10").contains("overlap"), "{}", err("0:100:10:5:200:10"));
        assert!(err("0:100:10:50:105:10").contains("overlap"), "{}", err("0:100:10:50:105:10"));
        assert!(IdMap::parse("0:100:10:10:110:10").is_ok());
        assert!(IdMap::parse("0:4294967295:1").is_ok());
    }

    #[test]
    fn squash_shows_one_owner_and_maps_writes() {
        let s = IdShift { squash_uid: Some(7), squash_to_root: true, ..Default::default() };
        assert_eq!((s.shown_uid(123), s.shown_gid(123)), (7, 0));
        assert_eq!((s.stored_uid(5), s.stored_gid(6)), (5, 6));
        assert!(!s.is_identity());
        assert!(IdShift::default().is_identity());
    }
}
