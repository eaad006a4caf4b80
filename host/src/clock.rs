//! Time for the policies: the wall clock in milliseconds and sleeping, injectable for tests.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The clock the policies read and sleep on.
pub trait Clock: Send + Sync {
    fn now(&self) -> Millis;
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

pub const DAY_MS: Millis = 86_400_000;

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// "2026-12-04" (UTC) for a time.
pub fn utc_date(ms: Millis) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// "14:03:12 UTC" for a time.
pub fn utc_time(ms: Millis) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// "2026-12-04T14:03:12Z" for a time.
pub fn utc_timestamp(ms: Millis) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{}T{:02}:{:02}:{:02}Z", utc_date(ms), secs / 3600, secs / 60 % 60, secs % 60)
}

/// The start of the UTC day holding `ms`.
pub fn day_start(ms: Millis) -> Millis {
    ms - ms.rem_euclid(DAY_MS)
}

/// "in 23 s", "in 4 min", "in 2 h", "in 3 d" from `now` to `then`.
pub fn from_now(now: Millis, then: Millis) -> String {
    let secs = then.saturating_sub(now).max(0).saturating_add(999) / 1000;
    match secs {
        0..=119 => format!("in {secs} s"),
        120..=7199 => format!("in {} min", (secs + 59) / 60),
        7200..=172_799 => format!("in {} h", (secs + 3599) / 3600),
        _ => format!("in {} d", (secs + 86_399) / 86_400),
    }
}

#[cfg(test)]
pub mod testing {
    //! A clock whose sleeps advance virtual time at once.

    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub struct FakeClock {
        pub now: Mutex<Millis>,
        pub slept: Mutex<Vec<Duration>>,
    }

    impl FakeClock {
        pub fn at(now: Millis) -> FakeClock {
            FakeClock { now: Mutex::new(now), slept: Mutex::default() }
        }
        pub fn advance(&self, ms: Millis) {
            *self.now.lock().unwrap() += ms;
        }
        pub fn total_slept(&self) -> Duration {
            self.slept.lock().unwrap().iter().sum()
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Millis {
            *self.now.lock().unwrap()
        }
        fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            self.slept.lock().unwrap().push(duration);
            self.advance(duration.as_millis() as Millis);
            Box::pin(std::future::ready(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_393_592_000), "2026-12-04T14:13:12Z");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_time(1_796_393_592_000), "14:13:12 UTC");
        assert_eq!(day_start(1_796_393_592_000), 1_796_342_400_000);
        assert_eq!(from_now(0, 23_000), "in 23 s");
        assert_eq!(from_now(0, 3 * DAY_MS), "in 3 d");
    }
}
