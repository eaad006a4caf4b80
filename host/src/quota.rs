//! Quotas: requests per minute, tokens per minute and requests per UTC day, counted from the
//! ledger across processes.

use crate::clock::{DAY_MS, Millis, day_start, from_now, utc_time};
use crate::config::QuotaPolicy;

pub const MINUTE_MS: Millis = 60_000;

/// A limit that is used up, and when it frees.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    pub until: Millis,
    pub message: String,
}

/// Checks the policy against `recent` (start and tokens of each attempt that ran in the last
/// minute, oldest first) and `today` (attempts that ran since the UTC day began).
pub fn check(policy: &QuotaPolicy, service: &str, recent: &[(Millis, i64)], today: u64, now: Millis) -> Result<(), Exhausted> {
    let exhausted = |what: String, until: Millis| Exhausted {
        until,
        message: format!("quota of {what} for {service} is used up; it frees at {} ({})", utc_time(until), from_now(now, until)),
    };
    if let Some(rpm) = policy.rpm
        && recent.len() >= rpm as usize
    {
        // The request may run once enough of the oldest have left the minute.
        let until = recent[recent.len() - rpm as usize].0 + MINUTE_MS;
        return Err(exhausted(format!("{rpm} requests per minute"), until));
    }
    if let Some(tpm) = policy.tpm {
        let mut used: i64 = recent.iter().map(|(_, t)| t).sum();
        if used >= tpm as i64 {
            let mut until = now;
            for (start, tokens) in recent {
                used -= tokens;
                until = start + MINUTE_MS;
                if used < tpm as i64 {
                    break;
                }
            }
            return Err(exhausted(format!("{tpm} tokens per minute"), until));
        }
    }
    if let Some(daily) = policy.daily
        && today >= u64::from(daily)
    {
        return Err(exhausted(format!("{daily} requests per day (UTC)"), day_start(now) + DAY_MS));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_frees_when_the_oldest_request_leaves_the_minute() {
        let policy = QuotaPolicy { rpm: Some(2), ..QuotaPolicy::default() };
        assert!(check(&policy, "s", &[(1_000, 0)], 1, 2_000).is_ok());
        let err = check(&policy, "s", &[(1_000, 0), (5_000, 0)], 2, 6_000).unwrap_err();
        assert_eq!(err.until, 61_000);
        assert!(err.message.starts_with("quota of 2 requests per minute for s is used up; it frees at 00:01:01 UTC (in 55 s)"), "{}", err.message);
    }

    #[test]
    fn tpm_frees_when_enough_tokens_leave_the_minute() {
        let policy = QuotaPolicy { tpm: Some(100), ..QuotaPolicy::default() };
        assert!(check(&policy, "s", &[(0, 40), (10, 40)], 2, 20).is_ok());
        let err = check(&policy, "s", &[(0, 50), (10, 40), (20, 30)], 3, 30).unwrap_err();
        assert_eq!(err.until, 60_000, "after the first 50 leave, 70 < 100");
    }

    #[test]
    fn daily_frees_at_the_next_utc_midnight() {
        let policy = QuotaPolicy { daily: Some(3), ..QuotaPolicy::default() };
        let now = 5 * DAY_MS + 1_000;
        assert!(check(&policy, "s", &[], 2, now).is_ok());
        assert_eq!(check(&policy, "s", &[], 3, now).unwrap_err().until, 6 * DAY_MS);
    }
}
