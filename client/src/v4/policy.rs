//! Retention policies: which snapshots `forget` keeps, and why.
//!
//! The rules are restic's, which users of restic, borg and Kopia know: within one
//! group (same host and paths), snapshots are taken newest first; `last N` keeps the N
//! newest; `hourly/daily/weekly/monthly/yearly N` keep the newest snapshot of each of
//! the N newest hours/days/ISO weeks/months/years that have one; `within D` keeps
//! everything newer than D before the group's newest snapshot; `tag T` keeps every
//! snapshot tagged T. A snapshot is kept if any rule keeps it, and every reason is
//! reported. Calendar buckets are in UTC (snapshot times are stored in UTC, so a
//! policy gives the same answer on every machine).

use std::time::Duration;

/// A retention policy. An empty policy keeps everything (and `forget` refuses it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    pub within: Option<Duration>,
    pub tags: Vec<String>,
}

impl Policy {
    /// True when no rule is set.
    pub fn is_empty(&self) -> bool {
        *self
            == Policy {
                ..Default::default()
            }
    }
}

/// What the policy decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into the input.
    pub index: usize,
    pub keep: bool,
    /// The rules that keep it ("daily 2026-12-04", "last 1", ...); empty when removed.
    pub reasons: Vec<String>,
}

/// A snapshot as a policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub tags: Vec<String>,
}

pub use cyberbackup_protocol::civil::{civil_from_days, days_from_civil};

/// The ISO 8601 week (year, week) of a day.
fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday; Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (y, _, _) = civil_from_days(thursday);
    let jan1 = days_from_civil(y, 1, 1);
    (y, ((thursday - jan1) / 7 + 1) as u32)
}

/// The bucket names of a time for each calendar rule.
fn buckets(time_ms: i64) -> [String; 5] {
    let secs = time_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = secs.rem_euclid(86_400) / 3600;
    let (y, m, d) = civil_from_days(days);
    let (wy, w) = iso_week(days);
    [
        format!("{y:04}-{m:02}-{d:02} {hour:02}h"),
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{wy:04}-W{w:02}"),
        format!("{y:04}-{m:02}"),
        format!("{y:04}"),
    ]
}

/// Applies `p` to one group. Returns a decision per item, in the input's order.
pub fn apply(items: &[Item], p: &Policy) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Newest first; ties keep the input order.
    order.sort_by(|a, b| items[*b].time_ms.cmp(&items[*a].time_ms).then(a.cmp(b)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); items.len()];
    for (rank, &i) in order.iter().enumerate() {
        if (rank as u32) < p.last {
            reasons[i].push(format!("last {}", rank + 1));
        }
    }
    let counts = [p.hourly, p.daily, p.weekly, p.monthly, p.yearly];
    let names = ["hourly", "daily", "weekly", "monthly", "yearly"];
    for rule in 0..5 {
        let mut left = counts[rule];
        let mut last: Option<String> = None;
        for &i in &order {
            if left == 0 {
                break;
            }
            let b = buckets(items[i].time_ms)[rule].clone();
            if last.as_ref() != Some(&b) {
                reasons[i].push(format!("{} {b}", names[rule]));
                last = Some(b);
                left -= 1;
            }
        }
    }
    if let (Some(d), Some(&newest)) = (p.within, order.first()) {
        let cutoff = items[newest]
            .time_ms
            .saturating_sub(d.as_millis().min(i64::MAX as u128) as i64);
        for &i in &order {
            if items[i].time_ms >= cutoff {
                reasons[i].push(format!("within {}", humanize(d)));
            }
        }
    }
    for (i, it) in items.iter().enumerate() {
        for t in &p.tags {
            if it.tags.contains(t) {
                reasons[i].push(format!("tag {t}"));
            }
        }
    }
    reasons
        .into_iter()
        .enumerate()
        .map(|(index, reasons)| Decision {
            index,
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect()
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Parses a UTC time, `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DD` (a `T` may stand for the
/// space, and a trailing `Z` is allowed), into milliseconds since the epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = match s.split_once([' ', 'T']) {
        Some((d, t)) => (d, t),
        None => (s, "00:00:00"),
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || !(2..=3).contains(&t.len()) {
        return None;
    }
    let (y, m, day): (i64, u32, u32) = (d[0].parse().ok()?, d[1].parse().ok()?, d[2].parse().ok()?);
    let (hh, mm): (i64, i64) = (t[0].parse().ok()?, t[1].parse().ok()?);
    let ss: i64 = t.get(2).map_or(Some(0), |x| x.parse().ok())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = days_from_civil(y, m, day);
    if civil_from_days(days) != (y, m, day) {
        return None;
    }
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Parses a duration like restic's `--keep-within`: `1y2m3d4h`, `90d`, `36h`, `30m`
/// (y = 365 days, m = 30 days when before d/h; a lone trailing `m` after `h` means
/// minutes). Units: y, m (months, 30 days), w, d, h, min, s.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'i') {
            chars.next();
            if chars.next() != Some('n') {
                return None;
            }
            unit = "min".into();
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let secs = match unit.as_str() {
            "y" => 365 * 86_400,
            "m" => 30 * 86_400,
            "w" => 7 * 86_400,
            "d" => 86_400,
            "h" => 3600,
            "min" => 60,
            "s" => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(secs)?)?;
    }
    if !num.is_empty() {
        return None;
    }
    Some(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;

    fn t(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + h * HOUR
    }

    fn item(ms: i64) -> Item {
        Item {
            time_ms: ms,
            tags: vec![],
        }
    }

    fn kept(items: &[Item], p: &Policy) -> Vec<usize> {
        let mut k: Vec<usize> = apply(items, p)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.index)
            .collect();
        k.sort();
        k
    }

    #[test]
    fn calendar_helpers() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // ISO weeks at year boundaries.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2024, 12, 30)), (2025, 1));
        assert_eq!(iso_week(days_from_civil(2026, 12, 4)), (2026, 49));
    }

    /// A table of cases in the style of restic's policy tests: a fixed set of
    /// snapshots and, for each policy, the ones kept.
    #[test]
    fn policy_table() {
        // Newest last: two a day on 2026-11-28 .. 2026-12-04, plus older monthly ones.
        let mut items = Vec::new();
        for (y, m, d) in [(2025, 12, 15), (2026, 6, 1), (2026, 10, 20), (2026, 11, 2)] {
            items.push(item(t(y, m, d, 12)));
        }
        for d in 28..=30 {
            items.push(item(t(2026, 11, d, 9)));
            items.push(item(t(2026, 11, d, 21)));
        }
        for d in 1..=4 {
            items.push(item(t(2026, 12, d, 9)));
            items.push(item(t(2026, 12, d, 21)));
        }
        let n = items.len(); // 18
        let cases: Vec<(Policy, Vec<usize>)> = vec![
            (
                Policy {
                    last: 3,
                    ..Default::default()
                },
                vec![n - 3, n - 2, n - 1],
            ),
            (
                Policy {
                    daily: 3,
                    ..Default::default()
                },
                // The newest of each of the 3 newest days: Dec 4, 3, 2 at 21h.
                vec![n - 5, n - 3, n - 1],
            ),
            (
                Policy {
                    weekly: 2,
                    ..Default::default()
                },
                // 2026-W49 (Nov 30 - Dec 6): Dec 4 21h; W48 (Nov 23-29): Nov 29 21h.
                vec![7, n - 1],
            ),
            (
                Policy {
                    monthly: 4,
                    ..Default::default()
                },
                // Dec, Nov (Nov 30 21h), Oct, Jun.
                vec![1, 2, 9, n - 1],
            ),
            (
                Policy {
                    yearly: 5,
                    ..Default::default()
                },
                vec![0, n - 1],
            ),
            (
                Policy {
                    hourly: 2,
                    ..Default::default()
                },
                vec![n - 2, n - 1],
            ),
            (
                Policy {
                    within: Some(Duration::from_secs(36 * 3600)),
                    ..Default::default()
                },
                // Newer than Dec 4 21h minus 36 h = Dec 3 9h.
                vec![n - 4, n - 3, n - 2, n - 1],
            ),
            (
                Policy {
                    last: 1,
                    monthly: 2,
                    ..Default::default()
                },
                vec![9, n - 1],
            ),
        ];
        for (p, want) in cases {
            assert_eq!(kept(&items, &p), want, "{p:?}");
        }
        // Reasons name every rule that keeps a snapshot.
        let d = apply(
            &items,
            &Policy {
                last: 1,
                daily: 1,
                ..Default::default()
            },
        );
        assert_eq!(d[n - 1].reasons, vec!["last 1", "daily 2026-12-04"]);
        assert!(d[0].reasons.is_empty() && !d[0].keep);
    }

    #[test]
    fn tags_and_empty_policy() {
        let mut items = vec![item(1000), item(2000), item(3000)];
        items[0].tags = vec!["keep".into()];
        let p = Policy {
            tags: vec!["keep".into()],
            ..Default::default()
        };
        assert_eq!(kept(&items, &p), vec![0]);
        assert!(Policy::default().is_empty());
        assert!(!p.is_empty());
        assert_eq!(kept(&[], &p), Vec::<usize>::new());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01"), Some(0));
        assert_eq!(
            parse_time("2026-12-04 10:30:00"),
            Some(t(2026, 12, 4, 10) + 30 * 60_000)
        );
        assert_eq!(
            parse_time("2026-12-04T10:30Z"),
            Some(t(2026, 12, 4, 10) + 30 * 60_000)
        );
        for bad in ["2026-02-30", "2026-13-01", "yesterday", "2026-12-04 25:00"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("90d"),
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(
            parse_duration("1y2m3d4h"),
            Some(Duration::from_secs((365 + 60 + 3) * 86_400 + 4 * 3600))
        );
        assert_eq!(parse_duration("30min"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2w"), Some(Duration::from_secs(14 * 86_400)));
        for bad in ["", "d", "5", "5x", "1mi"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}

/// One snapshot's fate under a policy.
#[derive(Debug, Clone)]
pub struct Planned {
    pub info: cyberbackup_protocol::v4::wire::SnapshotInfo,
    /// Its group: host and the paths named to the backup.
    pub host: String,
    pub paths: Vec<String>,
    pub keep: bool,
    /// The rules that keep it; empty when it goes.
    pub reasons: Vec<String>,
}

/// Applies `policy` to every snapshot, within each group of host and paths (read from
/// the encrypted roots), as restic does; with `only_paths`, only the group(s) with
/// those paths are judged (a profile's own backups). Groups in order, newest first
/// within each.
pub fn plan(
    conn: &super::conn::Connection,
    key: &cyberbackup_protocol::v4::format::RepoKey,
    policy: &Policy,
    only_paths: Option<&[Vec<u8>]>,
) -> Result<Vec<Planned>, super::snapshots::SnapshotError> {
    use cyberbackup_protocol::v4::wire::{Answer, Request, SnapshotInfo};
    use std::collections::BTreeMap;
    let all = super::snapshots::list(conn)?;
    let mut groups: BTreeMap<(String, Vec<Vec<u8>>), Vec<SnapshotInfo>> = BTreeMap::new();
    for s in all {
        let sealed = match conn.call(&Request::GetSnapshot(s.header.id))? {
            Answer::Snapshot { root, .. } => root,
            _ => return Err(super::conn::ConnError::UnexpectedAnswer("GET_SNAPSHOT").into()),
        };
        let root = key.open_root(&s.header.id, &sealed).map_err(|source| {
            super::snapshots::SnapshotError::Format {
                id: super::profile::hex(&s.header.id),
                source,
            }
        })?;
        if only_paths.is_some_and(|want| want != root.paths.as_slice()) {
            continue;
        }
        groups
            .entry((s.header.host.clone(), root.paths))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for ((host, paths), snaps) in groups {
        let items: Vec<Item> = snaps
            .iter()
            .map(|s| Item {
                time_ms: s.header.time_ms,
                tags: s.header.tags.clone(),
            })
            .collect();
        let mut decisions = apply(&items, policy);
        decisions.sort_by_key(|d| std::cmp::Reverse(snaps[d.index].header.time_ms));
        let paths: Vec<String> = paths
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        for d in decisions {
            out.push(Planned {
                info: snaps[d.index].clone(),
                host: host.clone(),
                paths: paths.clone(),
                keep: d.keep,
                reasons: d.reasons,
            });
        }
    }
    Ok(out)
}
