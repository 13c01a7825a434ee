//! Timeline snapshots and their retention (issue 21), as snapper's timeline and sanoid keep them:
//! `ovlsnap auto`, run from a timer, takes `auto-TIME` and then deletes the timeline snapshots no
//! rule keeps. A rule keeps the first snapshot of each of the last N hours, days, weeks (Monday to
//! Sunday, UTC), months or years that have one: once chosen, a period's snapshot stays chosen.
//! The newest timeline snapshot and held ones are always kept; a snapshot whose name is not a
//! timeline name (taken by hand, `pre-`/`post-` pairs) is never touched.
//!
//! Times come from the names, which carry the clock of the run that took them, not from the
//! store's creation times: a schedule (or a test's clock, `OVLSNAP_NOW`) decides, as the names
//! zfs-auto-snapshot and sanoid parse. This module only plans; the caller lists, takes, deletes.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// The name prefix of timeline snapshots.
pub const PREFIX: &str = "auto-";

/// How many periods of each kind keep their first snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Hours (`--hourly`).
    pub hourly: usize,
    /// Days, UTC (`--daily`).
    pub daily: usize,
    /// Weeks from Monday, UTC (`--weekly`).
    pub weekly: usize,
    /// Months (`--monthly`).
    pub monthly: usize,
    /// Years (`--yearly`).
    pub yearly: usize,
}

/// A kind of period a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// The number of the period holding `secs` (periods of one kind numbered in time order).
    fn of(self, secs: u64) -> u64 {
        let days = secs / 86_400;
        match self {
            Period::Hour => secs / 3600,
            Period::Day => days,
            // 1970-01-01 was a Thursday: weeks start on Mondays.
            Period::Week => (days + 3) / 7,
            Period::Month => {
                let (y, m, _) = crate::snapper::civil(days);
                y as u64 * 12 + u64::from(m) - 1
            }
            Period::Year => crate::snapper::civil(days).0 as u64,
        }
    }
}

/// The name of the timeline snapshot taken at `secs` (seconds since the epoch).
pub fn name_at(secs: u64) -> String {
    format!("{PREFIX}{}", crate::snapper::rfc3339(secs))
}

/// When timeline snapshot `name` was taken, if it is one: `auto-YYYY-MM-DDTHH:MM:SSZ`, maybe
/// followed by `-N` (a second one in the same second).
pub fn time_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let (stamp, suffix) = rest.split_at_checked(20)?;
    if !(suffix.is_empty()
        || suffix.strip_prefix('-').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    let b = stamp.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:ddZ";
    if b.len() != shape.len() || !b.iter().zip(shape).all(|(c, s)| if *s == b'd' { c.is_ascii_digit() } else { c == s })
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| stamp[r].parse::<u32>().ok();
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = crate::snapper::days_from_civil(i64::from(y), mo, d);
    let secs = u64::try_from(days).ok()? * 86_400 + u64::from(h * 3600 + mi * 60 + s);
    // A date that does not exist (February 30) comes back as another one: not a timeline name.
    (crate::snapper::rfc3339(secs) == stamp).then_some(secs)
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The timeline snapshots kept, oldest first, each with the rules that keep it.
    pub keep: Vec<(String, Vec<&'static str>)>,
    /// The timeline snapshots to delete, oldest first.
    pub delete: Vec<String>,
}

/// Which timeline snapshots among `snaps` (name, held) `policy` keeps, and which go. Others are
/// left out of both.
pub fn plan(snaps: &[(String, bool)], policy: &Policy) -> Plan {
    let mut timeline: Vec<(u64, &str, bool)> =
        snaps.iter().filter_map(|(n, held)| Some((time_of(n)?, n.as_str(), *held))).collect();
    timeline.sort();
    let mut why: HashMap<&str, Vec<&'static str>> = HashMap::new();
    if let Some((_, newest, _)) = timeline.last() {
        why.entry(newest).or_default().push("newest");
    }
    let rules = [
        (Period::Hour, policy.hourly),
        (Period::Day, policy.daily),
        (Period::Week, policy.weekly),
        (Period::Month, policy.monthly),
        (Period::Year, policy.yearly),
    ];
    for (period, count) in rules {
        // The first snapshot of each period, by period; the last `count` periods keep theirs.
        let mut first: BTreeMap<u64, &str> = BTreeMap::new();
        for (t, name, _) in &timeline {
            first.entry(period.of(*t)).or_insert(name);
        }
        for name in first.values().rev().take(count) {
            why.entry(name).or_default().push(period.name());
        }
    }
    for (_, name, held) in &timeline {
        if *held {
            why.entry(name).or_default().push("held");
        }
    }
    let mut out = Plan::default();
    for (_, name, _) in &timeline {
        match why.remove(name) {
            Some(reasons) => out.keep.push((name.to_string(), reasons)),
            None => out.delete.push(name.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;
    const D: u64 = 86_400;
    /// Monday 2026-01-05 00:00:00 UTC.
    const MONDAY: u64 = 1_767_571_200;

    fn snaps(times: &[u64]) -> Vec<(String, bool)> {
        times.iter().map(|t| (name_at(*t), false)).collect()
    }

    #[test]
    fn names_round_trip_and_others_are_not_timeline_names() {
        assert_eq!(crate::snapper::rfc3339(MONDAY), "2026-01-05T00:00:00Z");
        for t in [0, MONDAY, MONDAY + 59 * D + 23 * H + 3599, 4_102_444_799] {
            assert_eq!(time_of(&name_at(t)), Some(t), "{}", name_at(t));
        }
        assert_eq!(time_of(&format!("{}-2", name_at(MONDAY))), Some(MONDAY));
        for bad in [
            "monday",
            "auto-",
            "auto-2026-01-05T00:00:00",
            "auto-2026-01-05T00:00:00Z-",
            "auto-2026-01-05T00:00:00Zx",
            "auto-2026-02-30T00:00:00Z",
            "auto-2026-13-01T00:00:00Z",
            "auto-2026-01-05T24:00:00Z",
            "pre-2026-01-05T00:00:00Z",
            "auto-2026-01-05T00:00:00Z-1a",
        ] {
            assert_eq!(time_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_rule_keeps_the_first_snapshot_of_its_last_periods() {
        // Hourly over three days from Monday.
        let times: Vec<u64> = (0..72).map(|h| MONDAY + h * H).collect();
        let p = plan(&snaps(&times), &Policy { hourly: 5, daily: 2, weekly: 1, ..Default::default() });
        let kept: Vec<&str> = p.keep.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            kept,
            [
                "auto-2026-01-05T00:00:00Z", // the week's first (weekly)
                "auto-2026-01-06T00:00:00Z", // Tuesday's first (daily)
                "auto-2026-01-07T00:00:00Z", // Wednesday's first (daily)
                "auto-2026-01-07T19:00:00Z",
                "auto-2026-01-07T20:00:00Z",
                "auto-2026-01-07T21:00:00Z",
                "auto-2026-01-07T22:00:00Z",
                "auto-2026-01-07T23:00:00Z", // the newest (and hourly)
            ]
        );
        assert_eq!(p.keep.last().unwrap().1, ["newest", "hourly"]);
        assert_eq!(p.keep[0].1, ["weekly"]);
        assert_eq!(p.delete.len(), 72 - 8);
        assert_eq!(p.delete[0], "auto-2026-01-05T01:00:00Z", "deleted oldest first");
    }

    #[test]
    fn weeks_start_on_monday_and_months_and_years_follow_the_calendar() {
        // Sunday 23:00 and Monday 00:00 are in two weeks; Jan 31 and Feb 1 in two months.
        let times = [MONDAY - H, MONDAY, MONDAY + 26 * D, MONDAY + 27 * D, MONDAY + 361 * D];
        let p = plan(&snaps(&times), &Policy { weekly: 10, monthly: 10, yearly: 10, ..Default::default() });
        let why: HashMap<&str, &Vec<&str>> = p.keep.iter().map(|(n, w)| (n.as_str(), w)).collect();
        assert_eq!(why["auto-2026-01-04T23:00:00Z"], &vec!["weekly", "monthly", "yearly"]);
        assert_eq!(why["auto-2026-01-05T00:00:00Z"], &vec!["weekly"]);
        assert_eq!(why["auto-2026-01-31T00:00:00Z"], &vec!["weekly"]);
        assert_eq!(why["auto-2026-02-01T00:00:00Z"], &vec!["monthly"], "Sunday Feb 1: same week as Jan 31");
        assert_eq!(why["auto-2027-01-01T00:00:00Z"], &vec!["newest", "weekly", "monthly", "yearly"]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn held_and_other_snapshots_are_never_deleted() {
        let mut s = snaps(&[MONDAY, MONDAY + H, MONDAY + 2 * H, MONDAY + 3 * H]);
        s[1].1 = true;
        s.push(("before-upgrade".into(), false));
        s.push(("pre-2026-01-05T00:00:00Z".into(), false));
        let p = plan(&s, &Policy::default());
        assert_eq!(p.delete, ["auto-2026-01-05T00:00:00Z", "auto-2026-01-05T02:00:00Z"]);
        let kept: Vec<(&str, &[&str])> = p.keep.iter().map(|(n, w)| (n.as_str(), w.as_slice())).collect();
        assert_eq!(
            kept,
            [("auto-2026-01-05T01:00:00Z", &["held"][..]), ("auto-2026-01-05T03:00:00Z", &["newest"][..])]
        );
    }
}
