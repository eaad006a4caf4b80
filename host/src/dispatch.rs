//! Sends a request to a service through the policies: circuit-breaker and quota admission,
//! the attempt itself, the usage ledger, and retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::breaker::{self, Admit};
use crate::clock::{Clock, Millis};
use crate::config::{BreakerMode, ServiceConfig};
use crate::outcome::{Failure, FailureKind, Outcome};
use crate::quota::{self, MINUTE_MS};
use crate::retry;
use crate::service::{Request, Service};
use crate::state::{self, AttemptRow, BreakerRow, State};

/// What a request is doing, for live displays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// An attempt was admitted and its command is running.
    Running,
    /// The last attempt failed; the next starts after this wait.
    Retrying(Duration),
    /// The request is over: `true` for a success.
    Finished(bool),
}

/// Hears what each service's request is doing.
pub type Observer = Arc<dyn Fn(&str, Progress) + Send + Sync>;

/// What every request shares: the state store, the clock, the cancellation signal, and an
/// optional observer.
#[derive(Clone)]
pub struct Context {
    pub state: Arc<State>,
    pub clock: Arc<dyn Clock>,
    pub cancel: CancellationToken,
    pub observer: Option<Observer>,
}

impl Context {
    fn tell(&self, service: &str, progress: Progress) {
        if let Some(observer) = &self.observer {
            observer(service, progress);
        }
    }
}

/// Runs `request` on `service` with retries, breaker, quota and ledger; never fails, only
/// returns failed outcomes.
pub async fn execute(service: &Service, request: &Request, ctx: &Context) -> Outcome {
    let name = service.config.name.as_str();
    let on_wait = |wait| ctx.tell(name, Progress::Retrying(wait));
    let outcome = retry::run(&service.config.limits.retry, &*ctx.clock, &ctx.cancel, &on_wait, |number| {
        attempt(service, request, ctx, number)
    })
    .await;
    ctx.tell(name, Progress::Finished(outcome.success));
    outcome
}

/// A service ready to run, or the outcome that says why it cannot (e.g. a broken plugin).
pub type Target = Result<Service, Outcome>;

/// Sends the same request to every target at once, at most `jobs` at a time. Outcomes are
/// sent on the returned channel in the order they finish; one target's failure or hang does
/// not hold up the others.
pub fn fan_out(targets: Vec<Target>, request: Arc<Request>, ctx: Context, jobs: usize) -> tokio::sync::mpsc::UnboundedReceiver<Outcome> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let permits = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    for target in targets {
        let (tx, ctx, request, permits) = (tx.clone(), ctx.clone(), request.clone(), permits.clone());
        tokio::spawn(async move {
            let outcome = match target {
                Err(outcome) => outcome,
                Ok(service) => {
                    let _permit = permits.acquire_owned().await;
                    execute(&service, &request, &ctx).await
                }
            };
            let _ = tx.send(outcome);
        });
    }
    rx
}

/// Tries the targets in order until one succeeds. Services whose circuit is open or whose
/// quota is used up are passed over without running anything. The outcome is the success
/// (or the last failure) with `tried` listing the services left before it and why.
pub async fn failover(chain: Vec<Target>, request: &Request, ctx: &Context) -> Outcome {
    let mut tried = Vec::new();
    let mut last = None;
    for target in chain {
        if let Some(previous) = last.take() {
            tried.push(previous_failure(previous));
        }
        let outcome = match target {
            Err(outcome) => outcome,
            Ok(service) => execute(&service, request, ctx).await,
        };
        let stop = outcome.success || outcome.error.as_ref().is_some_and(|e| e.kind == FailureKind::Cancelled);
        last = Some(outcome);
        if stop {
            break;
        }
    }
    let Some(mut outcome) = last else {
        return Outcome::failed("", Failure::new(FailureKind::InvalidRequest, "no service to try"));
    };
    outcome.tried = tried;
    outcome
}

fn previous_failure(outcome: Outcome) -> crate::outcome::Tried {
    let error = outcome.error.unwrap_or_else(|| Failure::new(FailureKind::Other, "failed"));
    crate::outcome::Tried { service: outcome.service, kind: error.kind, message: error.message }
}

/// Why admission refused an attempt.
struct Refusal {
    failure: Failure,
    until: Millis,
}

/// One attempt: admission (waiting for quota within `quota_wait`), the call, the record.
async fn attempt(service: &Service, request: &Request, ctx: &Context, number: u32) -> Outcome {
    let config = &service.config;
    if ctx.cancel.is_cancelled() {
        // Stopping means starting nothing more, here after a wait for a slot or a retry.
        return Outcome::failed(&config.name, Failure::new(FailureKind::Cancelled, format!("service {}: cancelled before it started", config.name)));
    }
    let started_ms = ctx.clock.now();
    let Admitted { id, probe } = loop {
        match admit(ctx, config, request).await {
            Ok(Ok(admitted)) => break admitted,
            Ok(Err(refusal)) => {
                let wait = (refusal.until - ctx.clock.now()).max(0) as u64;
                let waitable = refusal.failure.kind == FailureKind::QuotaExhausted
                    && Duration::from_millis(wait) <= config.limits.quota_wait;
                if !waitable {
                    record_refusal(ctx, config, request, &refusal.failure).await;
                    return Outcome::failed(&config.name, refusal.failure);
                }
                tracing::info!(service = %config.name, "attempt {number}: waiting {wait} ms for quota");
                tokio::select! {
                    _ = ctx.clock.sleep(Duration::from_millis(wait)) => {}
                    _ = ctx.cancel.cancelled() => {
                        return Outcome::failed(&config.name, Failure::new(FailureKind::Cancelled, format!("service {}: cancelled while waiting for quota", config.name)));
                    }
                }
            }
            Err(e) => return state_failure(ctx, config, e),
        }
    };
    tracing::debug!(service = %config.name, "attempt {number} admitted{}", if probe { " as a half-open probe" } else { "" });
    ctx.tell(&config.name, Progress::Running);
    let outcome = service.call(request, &ctx.cancel).await;
    if let Err(e) = record(ctx, config, request, (id, started_ms), probe, &outcome).await {
        tracing::warn!("service {}: the attempt's result could not be recorded: {e:#}", config.name);
    }
    outcome
}

fn state_failure(ctx: &Context, config: &ServiceConfig, e: anyhow::Error) -> Outcome {
    let file = ctx.state.path().map_or_else(|| "in memory".to_string(), |p| p.display().to_string());
    Outcome::failed(&config.name, Failure::new(FailureKind::Other, format!("service {}: state store ({file}): {e:#}", config.name)))
}

/// How long a half-open probe may take before its slot is presumed lost.
fn probe_lease(config: &ServiceConfig) -> Millis {
    (config.limits.timeout + config.limits.kill_grace + Duration::from_secs(5)).as_millis() as Millis
}

/// An admitted attempt: its ledger row when admission entered it (as running), and whether
/// it is a half-open probe.
struct Admitted {
    id: Option<i64>,
    probe: bool,
}

/// The breaker's decision on the stored row: admit or not, the row after it, and whether
/// the row changed (a half-open probe taken).
fn decide(config: &ServiceConfig, stored: Option<BreakerRow>, now: Millis) -> (Admit, BreakerRow, bool) {
    let mut row = stored.clone().unwrap_or_else(|| BreakerRow::closed(now));
    let admit = breaker::admit(&config.limits.breaker, &config.name, &mut row, now, probe_lease(config));
    let changed = match &stored {
        Some(stored) => *stored != row,
        None => row != BreakerRow::closed(now),
    };
    (admit, row, changed)
}

/// The breaker decides and the quota is checked. With a quota, or when the breaker's state
/// changes (a half-open probe), this is one write transaction that also enters the attempt
/// in the ledger as running, so concurrent processes count it at once. Otherwise a read
/// suffices and the attempt is entered when it finishes.
async fn admit(ctx: &Context, config: &Arc<ServiceConfig>, request: &Request) -> Result<Result<Admitted, Refusal>> {
    let now = ctx.clock.now();
    let quota = &config.limits.quota;
    let has_quota = quota.rpm.is_some() || quota.tpm.is_some() || quota.daily.is_some();
    if !has_quota {
        let name = config.name.clone();
        let stored = ctx.state.read_soon(move |tx| state::load_breaker(tx, &name)).await?;
        match decide(config, stored, now) {
            (Admit::Yes { probe }, _, false) => return Ok(Ok(Admitted { id: None, probe })),
            (Admit::No { until, message }, _, false) => {
                return Ok(Err(Refusal { failure: Failure::new(FailureKind::CircuitOpen, message), until }));
            }
            _ => {} // The state changes: decide again under the write lock.
        }
    }
    let (config, model) = (config.clone(), request.model.clone().or_else(|| config.default_model.clone()));
    ctx.state
        .write_soon(move |tx| {
            let name = config.name.as_str();
            let quota = &config.limits.quota;
            let (admit, row, changed) = decide(&config, state::load_breaker(tx, name)?, now);
            let probe = match admit {
                Admit::Yes { probe } => probe,
                Admit::No { until, message } => {
                    return Ok(Err(Refusal { failure: Failure::new(FailureKind::CircuitOpen, message), until }));
                }
            };
            if has_quota {
                let recent = state::spawned_since(tx, name, now - MINUTE_MS)?;
                let today = if quota.daily.is_some() { state::spawned_on_day(tx, name, now)? } else { 0 };
                if let Err(exhausted) = quota::check(quota, name, &recent, today, now) {
                    // Nothing runs, so an admitted probe slot is not taken: the row is not saved.
                    let failure = Failure::new(FailureKind::QuotaExhausted, exhausted.message);
                    return Ok(Err(Refusal { failure, until: exhausted.until }));
                }
            }
            if changed {
                state::save_breaker(tx, name, &row)?;
            }
            let running = AttemptRow {
                service: name.to_string(),
                model: model.clone(),
                started_ms: now,
                outcome: state::RUNNING.into(),
                spawned: true,
                ..AttemptRow::default()
            };
            Ok(Ok(Admitted { id: Some(state::insert_attempt(tx, &running)?), probe }))
        })
        .await
}

fn ledger_row(config: &ServiceConfig, request: &Request, outcome: &Outcome, started_ms: Millis, spawned: bool) -> AttemptRow {
    let as_i64 = |v: Option<u64>| v.map(|n| n as i64);
    AttemptRow {
        service: config.name.clone(),
        model: outcome.model.clone().or_else(|| request.model.clone()).or_else(|| config.default_model.clone()),
        started_ms,
        duration_ms: Some(outcome.duration_ms as i64),
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        tokens_in: as_i64(outcome.tokens.input),
        tokens_out: as_i64(outcome.tokens.output),
        tokens_total: as_i64(outcome.tokens.total),
        estimated: outcome.tokens.estimated,
        outcome: outcome.error.as_ref().map_or_else(|| state::OK.to_string(), |e| e.kind.as_str().to_string()),
        spawned,
    }
}

/// Completes the attempt's ledger row and tells the breaker how it went.
/// `entry` is the ledger row admission entered (if it did) and when the attempt started.
async fn record(
    ctx: &Context,
    config: &Arc<ServiceConfig>,
    request: &Request,
    entry: (Option<i64>, Millis),
    probe: bool,
    outcome: &Outcome,
) -> Result<()> {
    let now = ctx.clock.now();
    let row = ledger_row(config, request, outcome, entry.1, true);
    let (config, failure) = (config.clone(), outcome.error.as_ref().map(|e| e.kind));
    ctx.state
        .write_soon(move |tx| {
            let name = config.name.as_str();
            match entry.0 {
                Some(id) => state::finish_attempt(tx, id, &row)?,
                None => {
                    state::insert_attempt(tx, &row)?;
                }
            }
            let policy = &config.limits.breaker;
            let stored = state::load_breaker(tx, name)?;
            let mut breaker_row = stored.clone().unwrap_or_else(|| BreakerRow::closed(now));
            let window = match policy.mode {
                BreakerMode::Rate { window, .. } if policy.enabled && failure.is_some() => {
                    let since = (now - window.as_millis() as Millis).max(breaker_row.closed_since_ms);
                    state::outcomes_since(tx, name, since)?
                }
                _ => Vec::new(),
            };
            breaker::record(policy, &mut breaker_row, now, probe, failure, &window);
            if stored.as_ref() != Some(&breaker_row) {
                state::save_breaker(tx, name, &breaker_row)?;
            }
            Ok(())
        })
        .await
}

/// Enters a request refused without running (open circuit, exhausted quota) in the ledger.
async fn record_refusal(ctx: &Context, config: &ServiceConfig, request: &Request, failure: &Failure) {
    let outcome = Outcome::failed(&config.name, failure.clone());
    let row = ledger_row(config, request, &outcome, ctx.clock.now(), false);
    if let Err(e) = ctx.state.write_soon(move |tx| state::insert_attempt(tx, &row)).await {
        tracing::warn!("service {}: the refusal could not be recorded: {e:#}", config.name);
    }
}


#[cfg(test)]
mod tests {
    //! Quota waiting, on the real plugin runtime and a real `echo`, with a virtual clock.

    use super::*;
    use crate::clock::testing::FakeClock;
    use crate::config::Config;
    use crate::plugin::Runtime;

    async fn setup(quota_wait: &str) -> (Service, Context, Arc<FakeClock>) {
        let text = format!(
            "[services.echo]\nplugin = \"template\"\ncommand = \"echo\"\nquota = {{ rpm = 1 }}\nquota_wait = \"{quota_wait}\"\n"
        );
        let config = Config::parse(&text, None).unwrap();
        let runtime = Runtime::new(64 << 20, None).unwrap();
        let service = Service::load(&runtime, &config.services["echo"]).await.unwrap();
        let clock = Arc::new(FakeClock::at(1_000_000));
        let ctx = Context { state: State::in_memory().unwrap(), clock: clock.clone(), cancel: CancellationToken::new(), observer: None };
        (service, ctx, clock)
    }

    fn request(prompt: &str) -> Request {
        Request { prompt: prompt.into(), ..Request::default() }
    }

    #[tokio::test]
    async fn a_request_waits_for_quota_when_the_wait_is_within_quota_wait() {
        let (service, ctx, clock) = setup("90s").await;
        assert!(execute(&service, &request("one"), &ctx).await.success);
        clock.advance(10_000);
        let second = execute(&service, &request("two"), &ctx).await;
        assert_eq!(second.text.as_deref(), Some("two"));
        assert_eq!(clock.total_slept(), Duration::from_secs(50), "waited until the first left the minute");
    }

    #[tokio::test]
    async fn a_request_fails_fast_when_the_quota_frees_later_than_quota_wait() {
        let (service, ctx, clock) = setup("10s").await;
        assert!(execute(&service, &request("one"), &ctx).await.success);
        let second = execute(&service, &request("two"), &ctx).await;
        let error = second.error.unwrap();
        assert_eq!(error.kind, FailureKind::QuotaExhausted);
        assert!(error.message.contains("(in 60 s)"), "{}", error.message);
        assert_eq!(clock.total_slept(), Duration::ZERO);
    }
}
