//! Reports read from the state store: usage per service and day, and each service's breaker
//! and quota status.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::breaker::{HALF_OPEN, OPEN};
use crate::clock::{Millis, utc_date, utc_timestamp};
use crate::config::Config;
use crate::quota::MINUTE_MS;
use crate::state::{self, BreakerRow, OK, RUNNING, State};

/// Token sums.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TokenSums {
    pub input: i64,
    pub output: i64,
    pub total: i64,
}

/// Usage of one service on one UTC day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DayUsage {
    pub service: String,
    pub day: String,
    /// Ledger rows: attempts that ran, and requests refused without running.
    pub requests: u64,
    pub successes: u64,
    /// Failures by kind (refusals included, as circuit-open or quota-exhausted).
    pub failures: BTreeMap<String, u64>,
    /// Attempts still running, or whose process died before recording a result.
    pub unfinished: u64,
    pub tokens: TokenSums,
    pub mean_duration_ms: Option<f64>,
    pub p95_duration_ms: Option<i64>,
}

/// Usage per service and UTC day since `since`.
pub fn usage(state: &State, since: Millis) -> Result<Vec<DayUsage>> {
    let rows = state.read(|tx| state::attempts_since(tx, since))?;
    let mut groups: BTreeMap<(String, String), (DayUsage, Vec<i64>)> = BTreeMap::new();
    for row in rows {
        let day = utc_date(row.started_ms);
        let (usage, durations) = groups.entry((row.service.clone(), day.clone())).or_insert_with(|| {
            let usage = DayUsage {
                service: row.service.clone(),
                day,
                requests: 0,
                successes: 0,
                failures: BTreeMap::new(),
                unfinished: 0,
                tokens: TokenSums::default(),
                mean_duration_ms: None,
                p95_duration_ms: None,
            };
            (usage, Vec::new())
        });
        usage.requests += 1;
        match row.outcome.as_str() {
            OK => usage.successes += 1,
            RUNNING => usage.unfinished += 1,
            kind => *usage.failures.entry(kind.to_string()).or_default() += 1,
        }
        usage.tokens.input += row.tokens_in.unwrap_or(0);
        usage.tokens.output += row.tokens_out.unwrap_or(0);
        usage.tokens.total += row.tokens_total.unwrap_or(0);
        if let (true, Some(d)) = (row.spawned && row.outcome != RUNNING, row.duration_ms) {
            durations.push(d);
        }
    }
    Ok(groups
        .into_values()
        .map(|(mut usage, mut durations)| {
            if !durations.is_empty() {
                durations.sort_unstable();
                usage.mean_duration_ms = Some(durations.iter().sum::<i64>() as f64 / durations.len() as f64);
                let rank = ((durations.len() as f64) * 0.95).ceil() as usize;
                usage.p95_duration_ms = Some(durations[rank.clamp(1, durations.len()) - 1]);
            }
            usage
        })
        .collect())
}

/// One limit and how much of it is used.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Use {
    pub used: u64,
    pub limit: u64,
}

/// A service's breaker and quota as of now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub service: String,
    /// `closed`, `open` or `half-open`.
    pub breaker: String,
    /// When an open circuit lets a probe through.
    pub open_until: Option<String>,
    pub consecutive_failures: u32,
    pub last_failure: Option<String>,
    pub trip_reason: Option<String>,
    pub rpm: Option<Use>,
    pub tpm: Option<Use>,
    pub daily: Option<Use>,
}

/// The status of every configured service.
pub fn status(state: &State, config: &Config, now: Millis) -> Result<Vec<Status>> {
    state.read(|tx| {
        config
            .services
            .values()
            .map(|svc| {
                let row = state::load_breaker(tx, &svc.name)?.unwrap_or_else(|| BreakerRow::closed(now));
                let quota = &svc.limits.quota;
                let recent = state::spawned_since(tx, &svc.name, now - MINUTE_MS)?;
                let today = state::spawned_on_day(tx, &svc.name, now)?;
                let open = row.phase == OPEN && now < row.open_until_ms;
                let breaker = if row.phase == OPEN && !open { HALF_OPEN.to_string() } else { row.phase.clone() };
                Ok(Status {
                    service: svc.name.clone(),
                    breaker,
                    open_until: open.then(|| utc_timestamp(row.open_until_ms)),
                    consecutive_failures: row.consecutive_failures,
                    last_failure: row.last_failure,
                    trip_reason: row.trip_reason,
                    rpm: quota.rpm.map(|limit| Use { used: recent.len() as u64, limit: limit.into() }),
                    tpm: quota.tpm.map(|limit| Use { used: recent.iter().map(|(_, t)| *t as u64).sum(), limit }),
                    daily: quota.daily.map(|limit| Use { used: today, limit: limit.into() }),
                })
            })
            .collect()
    })
}
