//! Runs one request against one service: the plugin builds the command, the executor runs
//! it, the plugin reads the result. Every way of failing ends as a classified outcome.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
pub use crate::outcome::{Failure, FailureKind, Outcome, Tokens};
use crate::plugin::{Plugin, PluginLimits, Runtime, wit};
use crate::process::{self, SpawnError, Status, Stopped};

impl From<wit::FailureKind> for FailureKind {
    fn from(kind: wit::FailureKind) -> Self {
        match kind {
            wit::FailureKind::RateLimited => FailureKind::RateLimited,
            wit::FailureKind::QuotaExhausted => FailureKind::QuotaExhausted,
            wit::FailureKind::Auth => FailureKind::Auth,
            wit::FailureKind::Transient => FailureKind::Transient,
            wit::FailureKind::Timeout => FailureKind::Timeout,
            wit::FailureKind::InvalidRequest => FailureKind::InvalidRequest,
            wit::FailureKind::NotInstalled => FailureKind::NotInstalled,
            wit::FailureKind::PluginError => FailureKind::PluginError,
            wit::FailureKind::Other => FailureKind::Other,
        }
    }
}

/// What the user asks of a service.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: String,
    /// Checked, absolute paths (see [`check_files`]).
    pub files: Vec<PathBuf>,
    pub model: Option<String>,
    pub options: Vec<(String, String)>,
    /// Overrides the service's timeout.
    pub timeout: Option<Duration>,
}

/// Checks that every file exists, is a regular file and can be read; returns absolute paths.
pub fn check_files(files: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).map_err(|e| format!("file {}: {e}", f.display()))?;
            if !meta.is_file() {
                return Err(format!("file {}: not a regular file", f.display()));
            }
            std::fs::File::open(f).map_err(|e| format!("file {}: cannot be read: {e}", f.display()))?;
            std::path::absolute(f).map_err(|e| format!("file {}: {e}", f.display()))
        })
        .collect()
}

/// A configured service with its plugin loaded.
#[derive(Clone)]
pub struct Service {
    pub config: Arc<ServiceConfig>,
    pub info: Arc<wit::PluginInfo>,
    plugin: Plugin,
    view: Arc<wit::Service>,
}

impl Service {
    /// Loads the service's plugin and asks it for its info.
    pub async fn load(runtime: &Runtime, config: &ServiceConfig) -> Result<Service> {
        let limits = PluginLimits { memory: config.limits.plugin_memory, time: config.limits.plugin_time };
        let plugin = runtime
            .load(&config.plugin, limits)
            .with_context(|| format!("service {}", config.name))?;
        let info = plugin.info().await.with_context(|| format!("service {}", config.name))?;
        let view = Arc::new(wit::Service {
            name: config.name.clone(),
            command: config.command.clone(),
            default_model: config.default_model.clone(),
            models: config.models.clone(),
            settings: config.settings.clone(),
        });
        Ok(Service { config: Arc::new(config.clone()), info: Arc::new(info), plugin, view })
    }

    /// Loads the service, or gives the failed outcome that says why it cannot run.
    pub async fn load_or_fail(runtime: &Runtime, config: &ServiceConfig) -> Result<Service, Outcome> {
        Service::load(runtime, config)
            .await
            .map_err(|e| Outcome::failed(&config.name, Failure::new(FailureKind::PluginError, format!("{e:#}"))))
    }

    /// Asks the plugin whether the service's settings are right.
    pub async fn validate(&self) -> Result<Result<(), String>> {
        self.plugin.validate(&self.view).await
    }

    /// The process to run for a plugin's command: the service's program, its environment
    /// plus the plugin's (refusing hijacks), and the service's limits.
    fn spec(&self, command: wit::Command, timeout: Duration) -> Result<process::Spec, String> {
        let mut env: Vec<(String, String)> = self.config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in command.env {
            process::check_plugin_env(&key, &value).map_err(|why| format!("plugin {}: {why}", self.plugin.source()))?;
            env.push((key, value));
        }
        let limits = &self.config.limits;
        Ok(process::Spec {
            program: self.config.command.clone(),
            args: command.args,
            env,
            stdin: command.stdin,
            timeout,
            idle_timeout: limits.idle_timeout,
            kill_grace: limits.kill_grace,
            max_output: limits.max_output,
        })
    }

    /// Runs the plugin's health command, if it has one, within `timeout`.
    /// `Ok(None)`: the plugin has no health check.
    pub async fn health(&self, timeout: Duration, cancel: &CancellationToken) -> Result<Option<process::Finished>, String> {
        let command = self.plugin.health_command(&self.view).await.map_err(|e| format!("{e:#}"))?;
        let Some(command) = command else { return Ok(None) };
        let mut spec = self.spec(command, timeout)?;
        spec.kill_grace = spec.kill_grace.min(Duration::from_millis(500));
        process::run(&spec, cancel).await.map(Some).map_err(|e| e.to_string())
    }

    fn fail(&self, kind: FailureKind, message: impl Into<String>) -> Outcome {
        Outcome::failed(&self.config.name, Failure::new(kind, message))
    }

    /// Runs one attempt of `request`; never returns an error, only failed outcomes.
    pub async fn call(&self, request: &Request, cancel: &CancellationToken) -> Outcome {
        let name = &self.config.name;
        let wit_request = match self.wit_request(request) {
            Ok(r) => r,
            Err(message) => return self.fail(FailureKind::InvalidRequest, format!("service {name}: {message}")),
        };
        let command = match self.plugin.build_command(&self.view, &wit_request).await {
            Ok(Ok(command)) => command,
            Ok(Err(failure)) => return Outcome::failed(name, plugin_failure(failure)),
            Err(e) => return self.fail(FailureKind::PluginError, format!("service {name}: {e:#}")),
        };
        let spec = match self.spec(command, request.timeout.unwrap_or(self.config.limits.timeout)) {
            Ok(spec) => spec,
            Err(why) => return self.fail(FailureKind::PluginError, format!("service {name}: {why}")),
        };
        let finished = match process::run(&spec, cancel).await {
            Ok(finished) => finished,
            Err(e) => {
                let (kind, hint) = match e {
                    SpawnError::NotFound(_) | SpawnError::NotExecutable(_) => {
                        (FailureKind::NotInstalled, "; install it or fix `command` in the configuration")
                    }
                    SpawnError::TooLong(_) => (FailureKind::InvalidRequest, "; send large input on stdin instead"),
                    SpawnError::NulByte(_) => (FailureKind::InvalidRequest, "; send such input on stdin instead"),
                    SpawnError::Resources { .. } => (FailureKind::Transient, "; run fewer at a time (--jobs) or raise the limit (ulimit -n, ulimit -u)"),
                    SpawnError::Other { .. } => (FailureKind::Other, ""),
                };
                return self.fail(kind, format!("service {name}: {e}{hint}"));
            }
        };
        let (exit_code, signal) = match finished.status {
            Status::Code(c) => (Some(c), None),
            Status::Signal(s) => (None, Some(s)),
        };
        let mut outcome = Outcome {
            service: name.clone(),
            success: false,
            text: None,
            model: None,
            tokens: Tokens::default(),
            cost_usd: None,
            exit_code,
            signal,
            duration_ms: finished.duration.as_millis() as u64,
            attempts: 1,
            truncated: finished.stdout_truncated || finished.stderr_truncated,
            error: None,
            stdout: String::from_utf8_lossy(&finished.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&finished.stderr).into_owned(),
            tried: Vec::new(),
        };
        if let Some(stopped) = finished.stopped {
            let (kind, message) = match stopped {
                Stopped::Timeout => (
                    FailureKind::Timeout,
                    format!("service {name}: timed out after {:?}; its process group was killed", spec.timeout),
                ),
                Stopped::Idle => (
                    FailureKind::Timeout,
                    format!(
                        "service {name}: printed nothing for {:?} (idle_timeout); its process group was killed",
                        spec.idle_timeout.unwrap_or_default()
                    ),
                ),
                Stopped::Cancelled => (FailureKind::Cancelled, format!("service {name}: cancelled")),
            };
            outcome.error = Some(Failure::new(kind, message));
            return outcome;
        }
        let output = wit::Output {
            status: match finished.status {
                Status::Code(c) => wit::ExitStatus::Code(c),
                Status::Signal(s) => wit::ExitStatus::Signal(s),
            },
            stdout: finished.stdout,
            stderr: finished.stderr,
            duration_ms: outcome.duration_ms,
            stdout_truncated: finished.stdout_truncated,
            stderr_truncated: finished.stderr_truncated,
        };
        match self.plugin.parse_output(&self.view, &wit_request, &output).await {
            Ok(Ok(response)) => {
                outcome.success = true;
                outcome.tokens = tokens(response.usage, &request.prompt, &response.text);
                outcome.model = response.model;
                outcome.cost_usd = response.cost_usd;
                outcome.text = Some(response.text);
            }
            Ok(Err(failure)) => outcome.error = Some(plugin_failure(failure)),
            Err(e) => outcome.error = Some(Failure::new(FailureKind::PluginError, format!("service {name}: {e:#}"))),
        }
        outcome
    }

    /// The request as the plugin sees it: files with their contents when it asks for them.
    fn wit_request(&self, request: &Request) -> Result<wit::Request, String> {
        let files = request
            .files
            .iter()
            .map(|path| {
                let contents = if self.info.needs_file_contents {
                    Some(read_capped(path, self.config.limits.max_file_size)?)
                } else {
                    None
                };
                Ok(wit::File { path: path.to_string_lossy().into_owned(), contents })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(wit::Request {
            prompt: request.prompt.clone(),
            files,
            model: request.model.clone(),
            options: request.options.clone(),
        })
    }
}

/// Reads a file the plugin asked for, refusing one larger than `cap`.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("file {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("file {}: {e}", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(format!(
            "file {} is larger than max_file_size ({} bytes); raise max_file_size or attach a smaller file",
            path.display(),
            cap
        ));
    }
    Ok(bytes)
}

/// A plugin's failure; a retry-after beyond the longest duration the host takes means "not in
/// any foreseeable time", and is capped there so that the clock's arithmetic cannot overflow.
fn plugin_failure(f: wit::Failure) -> Failure {
    let cap = crate::config::MAX_DURATION.as_millis() as u64;
    Failure { kind: f.kind.into(), message: f.message, retry_after_ms: f.retry_after_ms.map(|ms| ms.min(cap)) }
}

/// Usage as reported, or estimated at about 4 characters a token when there is none.
fn tokens(usage: Option<wit::Usage>, prompt: &str, answer: &str) -> Tokens {
    match usage {
        Some(u) => Tokens {
            input: u.input,
            output: u.output,
            total: u.total.or_else(|| Some(u.input? + u.output?)),
            cached: u.cached,
            reasoning: u.reasoning,
            estimated: false,
        },
        None => {
            let estimate = |text: &str| (text.chars().count() as u64).div_ceil(4);
            let (input, output) = (estimate(prompt), estimate(answer));
            Tokens { input: Some(input), output: Some(output), total: Some(input + output), cached: None, reasoning: None, estimated: true }
        }
    }
}
