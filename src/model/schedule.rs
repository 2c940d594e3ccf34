//! A function's schedule: a clock that makes one ordinary call per tick.
//! What is stored (`Schedule`), what its expression means (`Timetable`:
//! a 5-field cron in a time zone, parsed by `croner` and `chrono-tz`, or
//! `@every DURATION` counted from the Unix epoch), and which tick is due
//! (`Schedule::due`: the catch-up policy). Pure: the ticker that fires the
//! ticks is `scheduler/ticks.rs`.

use chrono::TimeZone;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The largest STDIN a schedule may give each of its calls; it is kept in
/// the function's record.
pub const SCHEDULE_PAYLOAD_MAX: usize = 64 * 1024;
/// The shortest `@every` interval.
pub const EVERY_MIN: Duration = Duration::from_secs(1);
/// The longest `@every` interval (a year): a longer one could only be a
/// mistake, and a cron expression says "once a year" better.
pub const EVERY_MAX: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest expression accepted, in bytes.
pub const SCHEDULE_EXPR_MAX: usize = 255;
/// The time zone of a schedule that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// What a function stores about its schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// As given: a 5-field cron expression (`*/5 * * * *`, croner's
    /// `@daily` and the like) or `@every DURATION` (`@every 5m`).
    pub expr: String,
    /// The IANA zone the cron fields are read in (`Europe/Paris`);
    /// `@every` ignores it.
    pub timezone: String,
    /// The STDIN of each tick's call (at most `SCHEDULE_PAYLOAD_MAX`).
    pub payload: Vec<u8>,
    /// When this schedule was set or last changed (ms since the epoch): no
    /// tick before it fires, so a new schedule never catches up on a tick
    /// from before it existed.
    pub since_ms: u64,
}

/// A schedule's expression, understood.
#[derive(Debug, Clone)]
pub enum Timetable {
    /// A tick at every multiple of this many ms since the Unix epoch, so
    /// every node (and every restart) agrees on the ticks.
    Every(u64),
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

impl Timetable {
    /// Parses `expr` in `timezone`; the error says what is wrong in words
    /// a user can act on.
    pub fn parse(expr: &str, timezone: &str) -> Result<Timetable, String> {
        if expr.len() > SCHEDULE_EXPR_MAX {
            return Err(format!(
                "schedule is too long: at most {SCHEDULE_EXPR_MAX} bytes"
            ));
        }
        let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
            format!("unknown time zone {timezone:?}: use an IANA name such as UTC or Europe/Paris")
        })?;
        let trimmed = expr.trim();
        if let Some(d) = trimmed.strip_prefix("@every") {
            let d = d.trim();
            let every = humantime::parse_duration(d).map_err(|e| {
                format!(
                    "invalid schedule {expr:?}: @every takes a duration such as 30s or 5m ({e})"
                )
            })?;
            if every < EVERY_MIN || every > EVERY_MAX {
                return Err(format!(
                    "invalid schedule {expr:?}: @every must be at least 1s and at most {}",
                    humantime::format_duration(EVERY_MAX)
                ));
            }
            return Ok(Timetable::Every(every.as_millis() as u64));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(trimmed)
            .map_err(|e| {
                format!(
                    "invalid schedule {expr:?}: {e}; use 5 cron fields (minute hour day-of-month month day-of-week) or @every DURATION"
                )
            })?;
        let t = Timetable::Cron(Box::new(cron), tz);
        // A pattern may be well formed and still never match (30 February).
        if t.next_after(crate::model::now_ms()).is_none() {
            return Err(format!("invalid schedule {expr:?}: it never fires"));
        }
        Ok(t)
    }

    /// The first tick strictly after `ms`.
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        match self {
            Timetable::Every(d) => (ms / d).checked_add(1)?.checked_mul(*d),
            Timetable::Cron(cron, tz) => {
                let at = tz.timestamp_millis_opt(i64::try_from(ms).ok()?).single()?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The last tick at or before `ms`.
    pub fn latest_at_or_before(&self, ms: u64) -> Option<u64> {
        match self {
            Timetable::Every(d) => Some(ms / d * d),
            Timetable::Cron(cron, tz) => {
                let at = tz.timestamp_millis_opt(i64::try_from(ms).ok()?).single()?;
                let prev = cron.find_previous_occurrence(&at, true).ok()?;
                u64::try_from(prev.timestamp_millis()).ok()
            }
        }
    }

    /// The next `n` ticks after `ms` (fewer if the pattern runs out).
    pub fn upcoming(&self, ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut at = ms;
        while out.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }
}

impl Schedule {
    /// A schedule set at `now`, checked: its expression and zone parse and
    /// its payload is within bounds.
    pub fn new(
        expr: &str,
        timezone: Option<&str>,
        payload: Vec<u8>,
        now: u64,
    ) -> Result<Schedule, String> {
        let timezone = timezone.unwrap_or(DEFAULT_TIMEZONE).trim().to_string();
        Timetable::parse(expr, &timezone)?;
        if payload.len() > SCHEDULE_PAYLOAD_MAX {
            return Err(format!(
                "schedule payload is {} bytes: at most {}",
                payload.len(),
                super::human_bytes(SCHEDULE_PAYLOAD_MAX as u64)
            ));
        }
        Ok(Schedule {
            expr: expr.trim().to_string(),
            timezone,
            payload,
            since_ms: now,
        })
    }

    /// Its timetable (checked when it was set; a zone a newer time zone
    /// database dropped is the one way this fails later).
    pub fn timetable(&self) -> Result<Timetable, String> {
        Timetable::parse(&self.expr, &self.timezone)
    }

    /// Whether `other` is this schedule set again (then `since_ms` stays).
    pub fn same_as(&self, other: &Schedule) -> bool {
        self.expr == other.expr && self.timezone == other.timezone && self.payload == other.payload
    }

    /// The tick to fire at `now`, if any: the latest tick at or before
    /// `now`, and only if it is not before the schedule was set and not
    /// older than `window_ms` (`catch_up_window`). So after any pause
    /// (a daemon down, a slow node) only the latest missed tick fires: one
    /// catch-up call, never a burst. Whether it fired already is the
    /// idempotency key's to say (`tick_key`).
    pub fn due(&self, t: &Timetable, now: u64, window_ms: u64) -> Option<u64> {
        let tick = t.latest_at_or_before(now)?;
        (tick >= self.since_ms && now.saturating_sub(tick) < window_ms).then_some(tick)
    }

    /// How a tick's call is told in its CALL event and record (a message
    /// on the accept: only a tick's call has one there).
    pub fn tick_message(&self, tick: u64) -> String {
        format!(
            "tick {} of \"{}\" ({})",
            super::format_time(tick),
            self.expr,
            self.timezone
        )
    }
}

/// How long after a tick it may still fire. A tick's idempotency key lasts
/// as long as its call's record: `call_retention` after the call ended,
/// so at least `call_retention` after the tick. A tick is tried only while
/// younger than that, less a margin (10 minutes, or half a short
/// retention) for clocks that differ between nodes, so its key is always
/// still there to tell that it fired.
pub fn catch_up_window(call_retention: Duration) -> u64 {
    let r = call_retention.as_millis() as u64;
    let margin = (r / 2).min(10 * 60 * 1000);
    r - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;

    fn ms(rfc3339: &str) -> u64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn every_counts_from_the_epoch() {
        let t = Timetable::parse("@every 2s", "UTC").unwrap();
        assert_eq!(t.next_after(0), Some(2000));
        assert_eq!(t.next_after(1999), Some(2000));
        assert_eq!(t.next_after(2000), Some(4000));
        assert_eq!(t.latest_at_or_before(2000), Some(2000));
        assert_eq!(t.latest_at_or_before(3999), Some(2000));
        assert_eq!(t.upcoming(1000, 3), vec![2000, 4000, 6000]);
        let five = Timetable::parse("  @every 5m ", "Europe/Paris").unwrap();
        assert_eq!(
            five.next_after(ms("2026-01-01T10:03:00Z")),
            Some(ms("2026-01-01T10:05:00Z"))
        );
    }

    #[test]
    fn every_is_bounded() {
        for bad in [
            "@every 500ms",
            "@every 0s",
            "@every",
            "@every five",
            "@every 400days",
        ] {
            assert!(Timetable::parse(bad, "UTC").is_err(), "{bad}");
        }
        assert!(Timetable::parse("@every 1s", "UTC").is_ok());
    }

    #[test]
    fn cron_in_utc() {
        let t = Timetable::parse("*/15 * * * *", "UTC").unwrap();
        let at = ms("2026-03-01T10:07:30Z");
        assert_eq!(t.next_after(at), Some(ms("2026-03-01T10:15:00Z")));
        assert_eq!(t.latest_at_or_before(at), Some(ms("2026-03-01T10:00:00Z")));
        assert_eq!(
            t.latest_at_or_before(ms("2026-03-01T10:15:00Z")),
            Some(ms("2026-03-01T10:15:00Z")),
            "a tick is at or before itself"
        );
        assert_eq!(
            t.upcoming(at, 3),
            vec![
                ms("2026-03-01T10:15:00Z"),
                ms("2026-03-01T10:30:00Z"),
                ms("2026-03-01T10:45:00Z")
            ]
        );
        let daily = Timetable::parse("@daily", "UTC").unwrap();
        assert_eq!(daily.next_after(at), Some(ms("2026-03-02T00:00:00Z")));
    }

    #[test]
    fn cron_fields_are_read_in_the_time_zone() {
        // 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer.
        let t = Timetable::parse("0 9 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            t.next_after(ms("2026-01-10T12:00:00Z")),
            Some(ms("2026-01-11T08:00:00Z"))
        );
        assert_eq!(
            t.next_after(ms("2026-07-10T12:00:00Z")),
            Some(ms("2026-07-11T07:00:00Z"))
        );
        let ny = Timetable::parse("30 17 * * MON-FRI", "America/New_York").unwrap();
        // Friday 2026-01-09 17:30 EST = 22:30 UTC; the next is Monday's.
        assert_eq!(
            ny.next_after(ms("2026-01-09T22:30:00Z")),
            Some(ms("2026-01-12T22:30:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_a_reason() {
        for bad in [
            "",
            "* * * *",
            "0 * * * * *",
            "61 * * * *",
            "* 25 * * *",
            "hello",
            "0 0 30 2 *",
        ] {
            let e = Timetable::parse(bad, "UTC").unwrap_err();
            assert!(e.contains("schedule"), "{bad}: {e}");
        }
        let e = Timetable::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert!(e.contains("time zone"), "{e}");
        assert!(Schedule::new("* * * * *", None, vec![0; SCHEDULE_PAYLOAD_MAX + 1], 0).is_err());
        let s = Schedule::new(" * * * * * ", None, vec![0; SCHEDULE_PAYLOAD_MAX], 5).unwrap();
        assert_eq!(
            (s.expr.as_str(), s.timezone.as_str(), s.since_ms),
            ("* * * * *", "UTC", 5)
        );
    }

    #[test]
    fn only_the_latest_missed_tick_is_due_and_not_before_the_schedule_existed() {
        let set = ms("2026-03-01T10:00:30Z");
        let s = Schedule::new("* * * * *", None, vec![], set).unwrap();
        let t = s.timetable().unwrap();
        let week = 7 * 24 * HOUR;
        // Set at 10:00:30: the 10:00 tick is older than the schedule.
        assert_eq!(s.due(&t, set + 10_000, week), None);
        assert_eq!(
            s.due(&t, ms("2026-03-01T10:01:00Z"), week),
            Some(ms("2026-03-01T10:01:00Z"))
        );
        // Down from 10:01:05 to 10:47:20: one catch-up, the 10:47 tick.
        assert_eq!(
            s.due(&t, ms("2026-03-01T10:47:20Z"), week),
            Some(ms("2026-03-01T10:47:00Z"))
        );
        // A tick older than the window is not fired.
        let short = 30 * 1000;
        assert_eq!(s.due(&t, ms("2026-03-01T10:47:40Z"), short), None);
        assert_eq!(
            s.due(&t, ms("2026-03-01T10:47:20Z"), short),
            Some(ms("2026-03-01T10:47:00Z"))
        );
        let every = Schedule::new("@every 2s", None, vec![], 10_500).unwrap();
        let t = every.timetable().unwrap();
        assert_eq!(every.due(&t, 11_000, week), None);
        assert_eq!(every.due(&t, 12_000, week), Some(12_000));
        assert_eq!(every.due(&t, 31_999, week), Some(30_000));
    }

    #[test]
    fn the_catch_up_window_stays_inside_the_keys_retention() {
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(catch_up_window(week), week.as_millis() as u64 - 10 * MIN);
        assert_eq!(catch_up_window(Duration::from_secs(60)), 30_000);
        assert_eq!(catch_up_window(Duration::ZERO), 0);
    }

    #[test]
    fn a_schedule_set_again_is_the_same() {
        let a = Schedule::new("@every 5m", Some("UTC"), b"x".to_vec(), 1).unwrap();
        let b = Schedule::new("@every 5m", None, b"x".to_vec(), 2).unwrap();
        assert!(a.same_as(&b));
        let c = Schedule::new("@every 5m", None, b"y".to_vec(), 2).unwrap();
        assert!(!a.same_as(&c));
        assert!(a.tick_message(0).contains("1970-01-01T00:00:00Z"));
    }
}
