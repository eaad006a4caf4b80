//! The circuit breaker: closed, open and half-open, decided per attempt on the stored state.
//! Half-open admits exactly `half_open_probes` requests at a time.

use crate::clock::{Millis, utc_time};
use crate::config::{BreakerMode, BreakerPolicy};
use crate::outcome::FailureKind;
use crate::state::BreakerRow;

pub const CLOSED: &str = "closed";
pub const OPEN: &str = "open";
pub const HALF_OPEN: &str = "half-open";

/// Whether an attempt may run.
#[derive(Debug, Clone, PartialEq)]
pub enum Admit {
    /// Yes; `probe` when it is a half-open probe whose result decides the circuit.
    Yes { probe: bool },
    /// No: the circuit is open (or its probes are taken) until then.
    No { until: Millis, message: String },
}

/// Decides whether an attempt may run now, updating the row for an admitted probe.
/// `probe_lease` is how long a probe may take before its slot is presumed lost.
pub fn admit(policy: &BreakerPolicy, service: &str, row: &mut BreakerRow, now: Millis, probe_lease: Millis) -> Admit {
    if !policy.enabled {
        return Admit::Yes { probe: false };
    }
    match row.phase.as_str() {
        OPEN if now < row.open_until_ms => Admit::No {
            until: row.open_until_ms,
            message: format!(
                "circuit open for {service} until {} after {}",
                utc_time(row.open_until_ms),
                row.trip_reason.as_deref().unwrap_or("failures")
            ),
        },
        OPEN | HALF_OPEN => {
            if row.phase == OPEN || now >= row.probe_expires_ms {
                row.probes = 0;
            }
            row.phase = HALF_OPEN.into();
            if row.probes < policy.half_open_probes {
                row.probes += 1;
                row.probe_expires_ms = now + probe_lease;
                Admit::Yes { probe: true }
            } else {
                Admit::No {
                    until: row.probe_expires_ms,
                    message: format!(
                        "circuit half-open for {service}: {} probe(s) already testing the service; try again shortly",
                        row.probes
                    ),
                }
            }
        }
        _ => Admit::Yes { probe: false },
    }
}

/// Records a finished attempt: `failure` is `None` for a success. `window` holds the finished
/// outcomes in the failure-rate window (this one included) for the rate mode.
pub fn record(
    policy: &BreakerPolicy,
    row: &mut BreakerRow,
    now: Millis,
    probe: bool,
    failure: Option<FailureKind>,
    window: &[String],
) {
    if !policy.enabled {
        return;
    }
    let counted = failure.filter(|k| policy.count.contains(k));
    match (counted, failure) {
        (None, None) => {
            // A success closes a half-open circuit; while closed it ends a failure streak.
            if probe && row.phase == HALF_OPEN {
                *row = BreakerRow { last_failure: row.last_failure.take(), ..BreakerRow::closed(now) };
            } else if row.phase == CLOSED {
                row.consecutive_failures = 0;
            }
        }
        (None, Some(_)) => {
            // Not the service's fault (e.g. an invalid request): a probe gives its slot back.
            if probe && row.phase == HALF_OPEN {
                row.probes = row.probes.saturating_sub(1);
            }
        }
        (Some(kind), _) => {
            row.last_failure = Some(kind.as_str().to_string());
            if probe {
                trip(policy, row, now, format!("a failed probe ({})", kind.as_str()));
                return;
            }
            if row.phase != CLOSED {
                return;
            }
            row.consecutive_failures += 1;
            match policy.mode {
                BreakerMode::Consecutive => {
                    if row.consecutive_failures >= policy.failure_threshold {
                        let n = row.consecutive_failures;
                        trip(policy, row, now, format!("{n} consecutive failures (last: {})", kind.as_str()));
                    }
                }
                BreakerMode::Rate { failure_rate, min_calls, window: span } => {
                    let calls = window.len();
                    let failed = window
                        .iter()
                        .filter(|o| FailureKind::parse(o).is_ok_and(|k| policy.count.contains(&k)))
                        .count();
                    if calls >= min_calls as usize && failed as f64 >= failure_rate * calls as f64 {
                        trip(
                            policy,
                            row,
                            now,
                            format!("{failed} of {calls} calls failed in {span:?} (last: {})", kind.as_str()),
                        );
                    }
                }
            }
        }
    }
}

fn trip(policy: &BreakerPolicy, row: &mut BreakerRow, now: Millis, reason: String) {
    row.phase = OPEN.into();
    row.open_until_ms = now + policy.reset_timeout.as_millis() as Millis;
    row.probes = 0;
    row.probe_expires_ms = 0;
    row.trip_reason = Some(reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LEASE: Millis = 10_000;

    fn policy() -> BreakerPolicy {
        BreakerPolicy { failure_threshold: 3, reset_timeout: Duration::from_secs(60), ..BreakerPolicy::default() }
    }

    fn fail(p: &BreakerPolicy, row: &mut BreakerRow, now: Millis, probe: bool) {
        record(p, row, now, probe, Some(FailureKind::RateLimited), &[]);
    }

    #[test]
    fn the_circuit_opens_after_the_threshold_of_consecutive_failures() {
        let p = policy();
        let mut row = BreakerRow::closed(0);
        for now in 0..2 {
            fail(&p, &mut row, now, false);
            assert_eq!(row.phase, CLOSED);
        }
        fail(&p, &mut row, 2, false);
        assert_eq!(row.phase, OPEN);
        assert_eq!(row.open_until_ms, 60_002);
        let Admit::No { message, .. } = admit(&p, "gemini", &mut row, 30_000, LEASE) else { panic!("admitted while open") };
        assert_eq!(message, "circuit open for gemini until 00:01:00 UTC after 3 consecutive failures (last: rate-limited)");
    }

    #[test]
    fn a_success_ends_the_failure_streak() {
        let p = policy();
        let mut row = BreakerRow::closed(0);
        fail(&p, &mut row, 0, false);
        fail(&p, &mut row, 1, false);
        record(&p, &mut row, 2, false, None, &[]);
        fail(&p, &mut row, 3, false);
        assert_eq!((row.phase.as_str(), row.consecutive_failures), (CLOSED, 1));
    }

    #[test]
    fn invalid_requests_do_not_count() {
        let p = policy();
        let mut row = BreakerRow::closed(0);
        for now in 0..10 {
            record(&p, &mut row, now, false, Some(FailureKind::InvalidRequest), &[]);
        }
        assert_eq!(row.phase, CLOSED);
    }

    #[test]
    fn half_open_admits_exactly_the_probe_count_at_a_time() {
        let p = BreakerPolicy { half_open_probes: 2, ..policy() };
        let mut row = BreakerRow { phase: OPEN.into(), open_until_ms: 100, ..BreakerRow::closed(0) };
        let admitted: Vec<bool> = (0..5).map(|_| matches!(admit(&p, "s", &mut row, 100, LEASE), Admit::Yes { .. })).collect();
        assert_eq!(admitted, vec![true, true, false, false, false]);
        assert_eq!(row.phase, HALF_OPEN);
    }

    #[test]
    fn a_probe_success_closes_and_a_probe_failure_reopens() {
        let p = policy();
        let mut row = BreakerRow { phase: OPEN.into(), open_until_ms: 100, ..BreakerRow::closed(0) };
        assert_eq!(admit(&p, "s", &mut row, 100, LEASE), Admit::Yes { probe: true });
        fail(&p, &mut row, 200, true);
        assert_eq!((row.phase.as_str(), row.open_until_ms), (OPEN, 60_200));
        assert_eq!(admit(&p, "s", &mut row, 60_200, LEASE), Admit::Yes { probe: true });
        record(&p, &mut row, 60_300, true, None, &[]);
        assert_eq!(row.phase, CLOSED);
        assert_eq!(admit(&p, "s", &mut row, 60_301, LEASE), Admit::Yes { probe: false });
    }

    #[test]
    fn a_lost_probe_frees_its_slot_after_the_lease() {
        let p = policy();
        let mut row = BreakerRow { phase: OPEN.into(), open_until_ms: 0, ..BreakerRow::closed(0) };
        assert_eq!(admit(&p, "s", &mut row, 0, LEASE), Admit::Yes { probe: true });
        assert!(matches!(admit(&p, "s", &mut row, LEASE - 1, LEASE), Admit::No { .. }));
        assert_eq!(admit(&p, "s", &mut row, LEASE, LEASE), Admit::Yes { probe: true });
    }

    #[test]
    fn rate_mode_trips_on_the_failure_share_once_there_are_enough_calls() {
        let p = BreakerPolicy {
            mode: BreakerMode::Rate { failure_rate: 0.5, window: Duration::from_secs(60), min_calls: 4 },
            ..policy()
        };
        let mut row = BreakerRow::closed(0);
        let window = |outcomes: &[&str]| outcomes.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        record(&p, &mut row, 1, false, Some(FailureKind::Transient), &window(&["transient", "ok", "transient"]));
        assert_eq!(row.phase, CLOSED, "three calls are fewer than min_calls");
        record(&p, &mut row, 2, false, Some(FailureKind::Transient), &window(&["transient", "ok", "ok", "ok", "transient"]));
        assert_eq!(row.phase, CLOSED, "2 of 5 is under half");
        record(&p, &mut row, 3, false, Some(FailureKind::Transient), &window(&["transient", "ok", "transient", "ok"]));
        assert_eq!(row.phase, OPEN);
        assert!(row.trip_reason.as_deref().unwrap().starts_with("2 of 4 calls failed"));
    }
}
