//! Health checks: each service's plugin names a cheap command (e.g. `--version`); the host
//! runs them in parallel with a short timeout and says what is wrong.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
use crate::plugin::Runtime;
use crate::process::{Status, find_program};
use crate::service::Service;

/// One service's health.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub service: String,
    pub ok: bool,
    /// What is wrong, when not ok.
    pub reason: Option<String>,
    /// The first line the health command printed (e.g. the version).
    pub detail: Option<String>,
    pub duration_ms: u64,
}

/// Checks every service at once, each within `timeout`; results in the order given.
pub async fn check_all(runtime: &Runtime, services: &[&ServiceConfig], timeout: Duration, cancel: &CancellationToken) -> Vec<Health> {
    // Loading plugins is quick and CPU-bound; the commands are what take time.
    let loaded = futures::future::join_all(services.iter().map(|config| async move { (config, Service::load(runtime, config).await) })).await;
    let checks = loaded.into_iter().map(|(config, service)| async move {
        let started = Instant::now();
        let mut health = Health { service: config.name.clone(), ok: false, reason: None, detail: None, duration_ms: 0 };
        let verdict = match service {
            Err(e) => Err(format!("plugin: {e:#}")),
            Ok(service) => check(&service, timeout, cancel).await,
        };
        match verdict {
            Ok(detail) => {
                health.ok = true;
                health.detail = detail;
            }
            Err(reason) => health.reason = Some(reason),
        }
        health.duration_ms = started.elapsed().as_millis() as u64;
        health
    });
    futures::future::join_all(checks).await
}

async fn check(service: &Service, timeout: Duration, cancel: &CancellationToken) -> Result<Option<String>, String> {
    let config = &service.config;
    if find_program(&config.command, config.env.get("PATH").map(String::as_str)).is_none() {
        return Err(format!("not installed: command `{}` {}", config.command, crate::process::where_not_found(&config.command)));
    }
    if let Some(var) = &config.auth_env
        && std::env::var_os(var).is_none_or(|v| v.is_empty())
    {
        return Err(format!("auth: environment variable {var} is not set"));
    }
    let Some(finished) = service.health(timeout, cancel).await? else {
        return Ok(Some("no health command; the program is installed".into()));
    };
    let first_line = |bytes: &[u8]| String::from_utf8_lossy(bytes).lines().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string());
    if finished.stopped.is_some() {
        return Err(format!("no answer within {timeout:?}"));
    }
    match finished.status {
        Status::Code(0) => Ok(first_line(&finished.stdout).or_else(|| first_line(&finished.stderr))),
        Status::Code(code) => Err(format!(
            "health command exited with code {code}{}",
            first_line(&finished.stderr).or_else(|| first_line(&finished.stdout)).map(|l| format!(": {l}")).unwrap_or_default()
        )),
        Status::Signal(signal) => Err(format!("health command was killed by signal {signal}")),
    }
}
