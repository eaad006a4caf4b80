//! The retry policy: which failures are retried, and exponential backoff with full jitter
//! that honours a service's retry-after.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, DAY_MS, from_now, utc_time, utc_timestamp};
use crate::config::RetryPolicy;
use crate::outcome::{Failure, FailureKind, Outcome};

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Wait this long, then try again.
    Retry(Duration),
    /// Do not retry: the kind is not retryable or the attempts are used up.
    Stop,
    /// Retrying is pointless within this policy; the text says why and until when.
    GiveUp(String),
}

/// Decides after failed attempt number `attempt` (1-based), `elapsed` after the first began.
/// `random` is uniform in [0, 1) and picks the jittered wait.
pub fn next(policy: &RetryPolicy, attempt: u32, elapsed: Duration, failure: &Failure, random: f64, now: i64) -> Next {
    if !policy.on.contains(&failure.kind) || attempt >= policy.max_attempts {
        return Next::Stop;
    }
    let exponent = (attempt - 1).min(30);
    let bound = policy.base_delay.saturating_mul(1 << exponent).min(policy.max_delay);
    let mut wait = if policy.jitter { bound.mul_f64(random.clamp(0.0, 1.0)) } else { bound };
    if let Some(after) = failure.retry_after_ms.map(Duration::from_millis) {
        let allowed = policy.max_delay.min(policy.max_elapsed.saturating_sub(elapsed));
        if after > allowed {
            let at = now + after.as_millis() as i64;
            return Next::GiveUp(format!(
                "the service accepts requests again at {} ({}), later than this retry policy waits (max_delay {:?}, max_elapsed {:?})",
                if at - now < DAY_MS { utc_time(at) } else { utc_timestamp(at) },
                from_now(now, at),
                policy.max_delay,
                policy.max_elapsed
            ));
        }
        wait = wait.max(after);
    }
    if elapsed + wait > policy.max_elapsed {
        return Next::Stop;
    }
    Next::Retry(wait)
}

/// Runs `attempt` until it succeeds or the policy says stop; returns the last outcome with
/// `attempts` set. Waits are on `clock` and end early, as a cancelled outcome, on `cancel`;
/// `on_wait` hears of each wait before it starts.
pub async fn run<F, Fut>(
    policy: &RetryPolicy,
    clock: &dyn Clock,
    cancel: &CancellationToken,
    on_wait: &(dyn Fn(Duration) + Send + Sync),
    mut attempt: F,
) -> Outcome
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let started = clock.now();
    let mut number = 1;
    loop {
        let mut outcome = attempt(number).await;
        outcome.attempts = number;
        let Some(failure) = outcome.error.clone() else { return outcome };
        let elapsed = Duration::from_millis((clock.now() - started).max(0) as u64);
        match next(policy, number, elapsed, &failure, rand::random::<f64>(), clock.now()) {
            Next::Stop => return outcome,
            Next::GiveUp(why) => {
                if let Some(error) = outcome.error.as_mut() {
                    error.message = format!("{}; not retried: {why}", error.message);
                }
                return outcome;
            }
            Next::Retry(wait) => {
                tracing::info!(
                    service = %outcome.service,
                    "attempt {number} failed ({}): retrying in {wait:?}: {}",
                    failure.kind.as_str(),
                    failure.message
                );
                on_wait(wait);
                tokio::select! {
                    _ = clock.sleep(wait) => {}
                    _ = cancel.cancelled() => {
                        let mut cancelled = Outcome::failed(&outcome.service, Failure::new(FailureKind::Cancelled, format!("service {}: cancelled while waiting to retry", outcome.service)));
                        cancelled.attempts = number;
                        return cancelled;
                    }
                }
                number += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::testing::FakeClock;

    fn policy() -> RetryPolicy {
        RetryPolicy { jitter: false, ..RetryPolicy::default() }
    }

    fn failure(kind: FailureKind, retry_after_ms: Option<u64>) -> Failure {
        Failure { kind, message: "boom".into(), retry_after_ms }
    }

    /// Outcomes in order: `None` is a success.
    fn scripted(script: Vec<Option<Failure>>) -> impl FnMut(u32) -> std::future::Ready<Outcome> {
        let mut script = script.into_iter();
        move |_| {
            let outcome = match script.next().expect("no more scripted attempts") {
                None => Outcome { success: true, error: None, text: Some("ok".into()), ..Outcome::failed("svc", failure(FailureKind::Other, None)) },
                Some(f) => Outcome::failed("svc", f),
            };
            std::future::ready(outcome)
        }
    }

    #[tokio::test]
    async fn rate_limited_twice_then_success_takes_three_attempts_with_doubling_waits() {
        let clock = FakeClock::at(0);
        let rl = Some(failure(FailureKind::RateLimited, None));
        let outcome = run(&policy(), &clock, &CancellationToken::new(), &|_| {}, scripted(vec![rl.clone(), rl, None])).await;
        assert!(outcome.success);
        assert_eq!(outcome.attempts, 3);
        assert_eq!(*clock.slept.lock().unwrap(), vec![Duration::from_secs(1), Duration::from_secs(2)]);
    }

    #[tokio::test]
    async fn non_retryable_kinds_stop_at_the_first_attempt() {
        for kind in [FailureKind::Auth, FailureKind::InvalidRequest, FailureKind::NotInstalled, FailureKind::PluginError] {
            let clock = FakeClock::at(0);
            let outcome = run(&policy(), &clock, &CancellationToken::new(), &|_| {}, scripted(vec![Some(failure(kind, None))])).await;
            assert_eq!(outcome.attempts, 1, "{kind:?}");
            assert_eq!(clock.total_slept(), Duration::ZERO);
        }
    }

    #[tokio::test]
    async fn attempts_stop_at_max_attempts() {
        let clock = FakeClock::at(0);
        let t = Some(failure(FailureKind::Transient, None));
        let outcome = run(&policy(), &clock, &CancellationToken::new(), &|_| {}, scripted(vec![t.clone(), t.clone(), t])).await;
        assert_eq!(outcome.attempts, 3);
        assert_eq!(outcome.error.unwrap().kind, FailureKind::Transient);
    }

    #[tokio::test]
    async fn retry_after_is_honoured_as_the_least_wait() {
        let clock = FakeClock::at(0);
        let outcome = run(&policy(), &clock, &CancellationToken::new(), &|_| {}, scripted(vec![Some(failure(FailureKind::RateLimited, Some(7_000))), None])).await;
        assert!(outcome.success);
        assert_eq!(clock.total_slept(), Duration::from_secs(7));
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_policy_stops_at_once_saying_when() {
        let clock = FakeClock::at(1_796_393_592_000);
        let outcome = run(&policy(), &clock, &CancellationToken::new(), &|_| {}, scripted(vec![Some(failure(FailureKind::RateLimited, Some(90_000)))])).await;
        assert_eq!(outcome.attempts, 1);
        assert_eq!(clock.total_slept(), Duration::ZERO);
        let message = outcome.error.unwrap().message;
        assert!(message.contains("accepts requests again at 14:14:42 UTC (in 90 s)"), "{message}");
    }

    #[test]
    fn full_jitter_stays_within_the_exponential_bound() {
        let p = RetryPolicy { max_attempts: 10, ..RetryPolicy::default() };
        let f = failure(FailureKind::Transient, None);
        for (attempt, bound) in [(1, 1), (2, 2), (3, 4), (6, 30), (9, 30)] {
            for random in [0.0, 0.5, 0.999] {
                let Next::Retry(wait) = next(&p, attempt, Duration::ZERO, &f, random, 0) else { panic!() };
                assert!(wait <= Duration::from_secs(bound), "attempt {attempt}: {wait:?}");
                assert_eq!(wait, Duration::from_secs(bound).mul_f64(random));
            }
        }
    }

    #[test]
    fn no_retry_starts_after_max_elapsed() {
        let p = policy();
        let f = failure(FailureKind::Transient, None);
        assert_eq!(next(&p, 1, Duration::from_millis(119_500), &f, 0.5, 0), Next::Stop);
        assert_eq!(next(&p, 1, Duration::from_secs(100), &f, 0.5, 0), Next::Retry(Duration::from_secs(1)));
    }
}
