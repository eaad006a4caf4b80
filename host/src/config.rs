//! Loads and checks services.toml: the registry of services and their limits.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::clock::DAY_MS;
use crate::outcome::FailureKind;

/// The services.toml built into the binary, used when no other file is found.
pub const BUILTIN_CONFIG: &str = include_str!("../../services.toml");

/// Names of the plugins embedded in the binary.
pub const BUILTIN_PLUGINS: &[&str] = &["template", "gemini", "qwen", "claude", "codex", "llm"];

/// The name that stands for every configured service.
pub const ALL: &str = "all";

/// Service names with a meaning of their own on the command line and in batch jobs.
const RESERVED_NAMES: &[&str] = &[ALL];

/// A configuration problem, with the place it was found and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PluginSource {
    /// One of [`BUILTIN_PLUGINS`].
    Builtin(String),
    /// A component file (absolute path, resolved against the config file's folder).
    File(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin(name) => write!(f, "built-in:{name}"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Limits that `[defaults]` sets and each service may override.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock limit for one run of the command.
    pub timeout: Duration,
    /// Kill a command that printed nothing for this long (off when `None`).
    pub idle_timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL when a command is stopped.
    pub kill_grace: Duration,
    /// Cap on captured stdout and on captured stderr, each.
    pub max_output: u64,
    /// Cap on a file whose contents a plugin asks for.
    pub max_file_size: u64,
    /// Linear memory a plugin instance may grow to.
    pub plugin_memory: u64,
    /// CPU (wall) time one plugin call may take.
    pub plugin_time: Duration,
    /// When and how failed attempts are retried.
    pub retry: RetryPolicy,
    /// When the service's circuit opens.
    pub breaker: BreakerPolicy,
    /// Request and token limits.
    pub quota: QuotaPolicy,
    /// How long a request may wait for quota before failing.
    pub quota_wait: Duration,
}

/// `retry = { ... }`: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retries).
    pub max_attempts: u32,
    /// The wait before the first retry; it doubles with each retry.
    pub base_delay: Duration,
    /// No single wait is longer.
    pub max_delay: Duration,
    /// No retry starts after this much time since the first attempt.
    pub max_elapsed: Duration,
    /// Failure kinds that are retried.
    pub on: Vec<FailureKind>,
    /// Full jitter: each wait is random between 0 and its exponential bound.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(120),
            on: vec![FailureKind::RateLimited, FailureKind::Transient, FailureKind::Timeout],
            jitter: true,
        }
    }
}

/// How a circuit decides to open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerMode {
    /// After `failure_threshold` counted failures in a row.
    Consecutive,
    /// When at least `failure_rate` of the calls in the last `window` failed, once there
    /// were `min_calls` of them.
    Rate { failure_rate: f64, window: Duration, min_calls: u32 },
}

/// `breaker = { ... }`: a closed / open / half-open circuit per service.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub enabled: bool,
    pub mode: BreakerMode,
    pub failure_threshold: u32,
    /// How long the circuit stays open before probes are let through.
    pub reset_timeout: Duration,
    /// Requests admitted at a time while half-open.
    pub half_open_probes: u32,
    /// Failure kinds that count against the circuit.
    pub count: Vec<FailureKind>,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            enabled: true,
            mode: BreakerMode::Consecutive,
            failure_threshold: 5,
            reset_timeout: Duration::from_secs(60),
            half_open_probes: 1,
            count: FailureKind::ALL
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !matches!(k, FailureKind::InvalidRequest | FailureKind::Cancelled | FailureKind::CircuitOpen))
                .collect(),
        }
    }
}

/// `quota = { rpm, tpm, daily }`, counted across processes in the state store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaPolicy {
    /// Requests in any 60 seconds.
    pub rpm: Option<u32>,
    /// Tokens in any 60 seconds.
    pub tpm: Option<u64>,
    /// Requests per UTC calendar day.
    pub daily: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(300),
            idle_timeout: None,
            kill_grace: Duration::from_secs(2),
            max_output: 16 << 20,
            max_file_size: 10 << 20,
            plugin_memory: 64 << 20,
            plugin_time: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            quota: QuotaPolicy::default(),
            quota_wait: Duration::ZERO,
        }
    }
}

/// One `[services.NAME]` entry, checked.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub plugin: PluginSource,
    /// The program to run: a name looked up on PATH, or a path.
    pub command: String,
    pub models: Vec<String>,
    pub default_model: Option<String>,
    /// The environment variable that holds the service's credentials, if any.
    pub auth_env: Option<String>,
    /// Fixed extra environment variables for the command.
    pub env: BTreeMap<String, String>,
    /// `[services.NAME.settings]` as a JSON object text, for the plugin.
    pub settings: String,
    pub limits: Limits,
}

/// A loaded services.toml.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from; `None` for the built-in copy.
    pub path: Option<PathBuf>,
    pub defaults: Limits,
    /// Services by name.
    pub services: BTreeMap<String, ServiceConfig>,
}

impl Config {
    /// Finds the configuration: `explicit` (from `--config`), `$EXECHOST_CONFIG`,
    /// `./services.toml`, `$XDG_CONFIG_HOME/exechost/services.toml`, then the built-in copy.
    pub fn locate(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = explicit {
            return Config::load(path);
        }
        if let Some(path) = std::env::var_os("EXECHOST_CONFIG").filter(|p| !p.is_empty()) {
            return Config::load(Path::new(&path));
        }
        let local = PathBuf::from("services.toml");
        if local.is_file() {
            return Config::load(&local);
        }
        if let Some(dir) = crate::dirs::config_home() {
            let path = dir.join("exechost").join("services.toml");
            if path.is_file() {
                return Config::load(&path);
            }
        }
        Config::parse(BUILTIN_CONFIG, None)
    }

    /// Reads and checks one file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("cannot read configuration {}: {e}", path.display()))
        })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Config::parse(&text, Some(&absolute))
    }

    /// Parses and checks configuration text; `path` names it in errors and anchors relative
    /// plugin paths.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let file_name = path.map_or_else(|| "built-in services.toml".to_string(), |p| p.display().to_string());
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let service = e.span().and_then(|span| service_at(text, span.start));
            let within = service.map(|s| format!(" (service {s})")).unwrap_or_default();
            ConfigError(format!("{file_name}{within}: {}", e.to_string().trim_end()))
        })?;
        let here = |span: Range<usize>, service: &str, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError(format!("{file_name}:{line}:{column}: service {service}: {message}"))
        };
        let defaults = raw.defaults.apply(&Limits::default());
        let base_dir = path.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let mut services = BTreeMap::new();
        for (name, entry) in raw.services {
            let span = name.span();
            let name = name.into_inner();
            let svc = entry.into_inner();
            if RESERVED_NAMES.contains(&name.as_str()) {
                return Err(here(span, &name, format!("`{name}` is a reserved name; rename the service")));
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(here(span, &name, "a service name may hold only letters, digits, `-` and `_`".into()));
            }
            let plugin = resolve_plugin(svc.plugin.get_ref(), &base_dir)
                .map_err(|m| here(svc.plugin.span(), &name, m))?;
            let command = resolve_command(svc.command.get_ref(), &base_dir).map_err(|m| here(svc.command.span(), &name, m))?;
            if let Some(model) = &svc.default_model
                && !svc.models.is_empty()
                && !svc.models.contains(model.get_ref())
            {
                return Err(here(
                    model.span(),
                    &name,
                    format!("default_model `{}` is not one of `models` ({})", model.get_ref(), svc.models.join(", ")),
                ));
            }
            for key in svc.env.keys() {
                if !valid_env_name(key.get_ref()) {
                    return Err(here(key.span(), &name, format!("`{}` is not a valid environment variable name", key.get_ref())));
                }
            }
            let settings = match &svc.settings {
                Some(table) => serde_json::to_string(table)
                    .map_err(|e| ConfigError(format!("{file_name}: service {name}: settings: {e}")))?,
                None => "{}".to_string(),
            };
            let limits = svc.apply(&defaults);
            let limit_error = if limits.timeout.is_zero() {
                Some("`timeout` must be more than 0")
            } else if limits.plugin_time.is_zero() {
                Some("`plugin_time` must be more than 0")
            } else if limits.max_output == 0 {
                Some("`max_output` must be more than 0")
            } else if !(MIN_PLUGIN_MEMORY..=MAX_PLUGIN_MEMORY).contains(&limits.plugin_memory) {
                Some("`plugin_memory` must be from 1MiB to 4GiB (the most a 32-bit WebAssembly memory holds)")
            } else {
                None
            };
            if let Some(why) = limit_error {
                return Err(ConfigError(format!("{file_name}: service {name}: {why}")));
            }
            services.insert(
                name.clone(),
                ServiceConfig {
                    name,
                    plugin,
                    command,
                    models: svc.models,
                    default_model: svc.default_model.map(Spanned::into_inner),
                    auth_env: svc.auth_env,
                    env: svc.env.into_iter().map(|(k, v)| (k.into_inner(), v)).collect(),
                    settings,
                    limits,
                },
            );
        }
        Ok(Config { path: path.map(Path::to_path_buf), defaults, services })
    }

    /// The service called `name`, or an error listing the ones there are.
    pub fn service(&self, name: &str) -> Result<&ServiceConfig, ConfigError> {
        self.services.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.services.keys().map(String::as_str).collect();
            ConfigError(format!(
                "unknown service `{name}` in {}; configured services: {}",
                self.describe(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })
    }

    /// How far back the policies read the ledger: a day for daily quotas, or the longest
    /// window of a rate breaker. Older rows serve only `host usage`.
    pub fn ledger_lookback(&self) -> Duration {
        let windows = self.services.values().filter_map(|s| match s.limits.breaker.mode {
            BreakerMode::Rate { window, .. } => Some(window),
            BreakerMode::Consecutive => None,
        });
        windows.fold(Duration::from_millis(DAY_MS as u64), Duration::max)
    }

    /// The services a request names: every configured one for `all` alone, otherwise the
    /// names given, checked as [`Config::check_services`] does.
    pub fn service_list(&self, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
        if names.len() == 1 && names[0] == ALL {
            if self.services.is_empty() {
                return Err(ConfigError(format!("no services are configured in {}; add one as [services.NAME]", self.describe())));
            }
            return Ok(self.services.keys().cloned().collect());
        }
        self.check_services(&names)?;
        Ok(names)
    }

    /// Checks the services of one request (a fan-out, or a service and its fallbacks): each
    /// is configured, and none is named twice.
    pub fn check_services(&self, names: &[String]) -> Result<(), ConfigError> {
        for (i, name) in names.iter().enumerate() {
            if name == ALL {
                return Err(ConfigError(format!("`{ALL}` means every service and stands alone: it cannot be listed with other services")));
            }
            self.service(name)?;
            if names[..i].contains(name) {
                return Err(ConfigError(format!("service `{name}` is named twice; name each service once")));
            }
        }
        Ok(())
    }

    /// Names the configuration's origin for messages.
    pub fn describe(&self) -> String {
        self.path.as_ref().map_or_else(|| "the built-in services.toml".to_string(), |p| p.display().to_string())
    }
}

/// True for a portable environment variable name.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The program to run: a name (looked up on PATH when run), an absolute path, `~/...`, or a
/// path relative to the configuration file's directory, never to wherever `host` is started:
/// running it in an untrusted directory must not run that directory's programs.
fn resolve_command(command: &str, base_dir: &Path) -> Result<String, String> {
    if command.trim().is_empty() || command.contains('\0') {
        return Err("`command` must name a program".into());
    }
    if !command.contains('/') || Path::new(command).is_absolute() {
        return Ok(command.to_string());
    }
    let path = config_relative(command, base_dir)?;
    path.to_str().map(str::to_string).ok_or_else(|| {
        format!("{} is not UTF-8 text: give `command` as an absolute path", path.display())
    })
}

/// A path from the configuration: `~/...` is in the home directory, a relative one is in
/// the configuration file's directory.
fn config_relative(spec: &str, base_dir: &Path) -> Result<PathBuf, String> {
    match spec.strip_prefix("~/") {
        Some(rest) => crate::dirs::home().map(|home| home.join(rest)).ok_or_else(|| format!("`{spec}` starts with ~, but HOME is not set")),
        None => Ok(base_dir.join(spec)),
    }
}

fn resolve_plugin(spec: &str, base_dir: &Path) -> Result<PluginSource, String> {
    if BUILTIN_PLUGINS.contains(&spec) {
        return Ok(PluginSource::Builtin(spec.to_string()));
    }
    if !spec.contains('/') && !spec.ends_with(".wasm") {
        return Err(format!(
            "unknown built-in plugin `{spec}` (built-in: {}); a plugin file must be a path ending in .wasm",
            BUILTIN_PLUGINS.join(", ")
        ));
    }
    let path = config_relative(spec, base_dir)?;
    if path.is_dir() {
        return Err(format!("plugin file {} is a directory: name the .wasm file in it", path.display()));
    }
    if !path.is_file() {
        return Err(format!("plugin file {} does not exist (paths are relative to the configuration file)", path.display()));
    }
    Ok(PluginSource::File(path))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The service whose table holds the byte offset, by the last `[services.NAME…]` header before it.
fn service_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    before.lines().rev().find_map(|line| {
        let header = line.trim().strip_prefix('[')?.trim_start_matches('[').trim();
        let rest = header.strip_prefix("services.")?;
        let name: String = rest.chars().take_while(|c| *c != '.' && *c != ']').collect();
        Some(name.trim().trim_matches('"').to_string())
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawLimits,
    #[serde(default)]
    services: BTreeMap<Spanned<String>, Spanned<RawService>>,
}

/// Declares a raw table that carries the overridable limits beside its own fields.
macro_rules! with_limits {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        struct $name {
            $($(#[$fmeta])* $field: $ty,)*
            timeout: Option<Secs>,
            idle_timeout: Option<Secs>,
            kill_grace: Option<Secs>,
            max_output: Option<Bytes>,
            max_file_size: Option<Bytes>,
            plugin_memory: Option<Bytes>,
            plugin_time: Option<Secs>,
            retry: Option<RawRetry>,
            breaker: Option<RawBreaker>,
            quota: Option<RawQuota>,
            quota_wait: Option<Secs>,
        }

        impl $name {
            fn apply(&self, base: &Limits) -> Limits {
                Limits {
                    timeout: self.timeout.map_or(base.timeout, |s| s.0),
                    idle_timeout: self.idle_timeout.map(|s| s.0).filter(|d| !d.is_zero()).or(base.idle_timeout),
                    kill_grace: self.kill_grace.map_or(base.kill_grace, |s| s.0),
                    max_output: self.max_output.map_or(base.max_output, |b| b.0),
                    max_file_size: self.max_file_size.map_or(base.max_file_size, |b| b.0),
                    plugin_memory: self.plugin_memory.map_or(base.plugin_memory, |b| b.0),
                    plugin_time: self.plugin_time.map_or(base.plugin_time, |s| s.0),
                    retry: self.retry.as_ref().map_or_else(|| base.retry.clone(), |r| r.apply(&base.retry)),
                    breaker: self.breaker.as_ref().map_or_else(|| base.breaker.clone(), |b| b.apply(&base.breaker)),
                    quota: self.quota.as_ref().map_or_else(|| base.quota.clone(), |q| q.apply(&base.quota)),
                    quota_wait: self.quota_wait.map_or(base.quota_wait, |s| s.0),
                }
            }
        }
    };
}

with_limits! {
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawLimits {}
}

with_limits! {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawService {
        plugin: Spanned<String>,
        command: Spanned<String>,
        #[serde(default)]
        models: Vec<String>,
        default_model: Option<Spanned<String>>,
        auth_env: Option<String>,
        #[serde(default)]
        env: BTreeMap<Spanned<String>, String>,
        settings: Option<toml::Table>,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<AtLeastOne>,
    base_delay: Option<Secs>,
    max_delay: Option<Secs>,
    max_elapsed: Option<Secs>,
    on: Option<Vec<Kind>>,
    jitter: Option<bool>,
}

impl RawRetry {
    fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.map_or(base.max_attempts, |n| n.0),
            base_delay: self.base_delay.map_or(base.base_delay, |s| s.0),
            max_delay: self.max_delay.map_or(base.max_delay, |s| s.0),
            max_elapsed: self.max_elapsed.map_or(base.max_elapsed, |s| s.0),
            on: self.on.as_ref().map_or_else(|| base.on.clone(), |k| k.iter().map(|k| k.0).collect()),
            jitter: self.jitter.unwrap_or(base.jitter),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Consecutive,
    Rate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    mode: Option<RawMode>,
    failure_threshold: Option<AtLeastOne>,
    reset_timeout: Option<Secs>,
    half_open_probes: Option<AtLeastOne>,
    failure_rate: Option<Fraction>,
    window: Option<Secs>,
    min_calls: Option<AtLeastOne>,
    count: Option<Vec<Kind>>,
}

impl RawBreaker {
    fn apply(&self, base: &BreakerPolicy) -> BreakerPolicy {
        let (rate, window, min_calls) = match base.mode {
            BreakerMode::Rate { failure_rate, window, min_calls } => (failure_rate, window, min_calls),
            BreakerMode::Consecutive => (0.5, Duration::from_secs(60), 10),
        };
        let rate_mode = match self.mode {
            Some(RawMode::Rate) => true,
            Some(RawMode::Consecutive) => false,
            None => matches!(base.mode, BreakerMode::Rate { .. }),
        };
        BreakerPolicy {
            enabled: self.enabled.unwrap_or(base.enabled),
            mode: if rate_mode {
                BreakerMode::Rate {
                    failure_rate: self.failure_rate.map_or(rate, |f| f.0),
                    window: self.window.map_or(window, |s| s.0),
                    min_calls: self.min_calls.map_or(min_calls, |n| n.0),
                }
            } else {
                BreakerMode::Consecutive
            },
            failure_threshold: self.failure_threshold.map_or(base.failure_threshold, |n| n.0),
            reset_timeout: self.reset_timeout.map_or(base.reset_timeout, |s| s.0),
            half_open_probes: self.half_open_probes.map_or(base.half_open_probes, |n| n.0),
            count: self.count.as_ref().map_or_else(|| base.count.clone(), |k| k.iter().map(|k| k.0).collect()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    rpm: Option<AtLeastOne>,
    tpm: Option<u64>,
    daily: Option<AtLeastOne>,
}

impl RawQuota {
    fn apply(&self, base: &QuotaPolicy) -> QuotaPolicy {
        QuotaPolicy {
            rpm: self.rpm.map(|n| n.0).or(base.rpm),
            tpm: self.tpm.filter(|t| *t > 0).or(base.tpm),
            daily: self.daily.map(|n| n.0).or(base.daily),
        }
    }
}

/// A failure kind's name, e.g. "rate-limited".
#[derive(Debug, Clone, Copy)]
struct Kind(FailureKind);

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        FailureKind::parse(&name).map(Kind).map_err(de::Error::custom)
    }
}

/// A whole number of at least 1.
#[derive(Debug, Clone, Copy)]
struct AtLeastOne(u32);

impl<'de> Deserialize<'de> for AtLeastOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            0 => Err(de::Error::custom("must be at least 1")),
            n => Ok(AtLeastOne(n)),
        }
    }
}

/// A fraction above 0 and at most 1.
#[derive(Debug, Clone, Copy)]
struct Fraction(f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match f64::deserialize(d)? {
            f if f > 0.0 && f <= 1.0 => Ok(Fraction(f)),
            f => Err(de::Error::custom(format!("{f} is not a fraction between 0 (exclusive) and 1, e.g. 0.5"))),
        }
    }
}

/// A duration: a number of seconds or a string such as "90s", "1500ms", "2m", "1h".
#[derive(Debug, Clone, Copy)]
struct Secs(Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        let seconds = match Raw::deserialize(d)? {
            Raw::Int(n) => n as f64,
            Raw::Float(f) => f,
            Raw::Text(text) => parse_duration(&text).map_err(de::Error::custom)?.as_secs_f64(),
        };
        if !seconds.is_finite() || !(0.0..=MAX_DURATION_SECS).contains(&seconds) {
            return Err(de::Error::custom(format!("invalid duration {seconds}: use a number of seconds or a string like \"90s\"")));
        }
        Ok(Secs(Duration::from_secs_f64(seconds)))
    }
}

const MIN_PLUGIN_MEMORY: u64 = 1 << 20;
const MAX_PLUGIN_MEMORY: u64 = 4 << 30;

/// The longest duration anything takes (about 31 years): longer ones are surely mistakes, and
/// would overflow the clock's arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);
const MAX_DURATION_SECS: f64 = MAX_DURATION.as_secs_f64();

/// A timeout given on the command line or in a job: a duration of more than 0.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout.is_zero() {
        return Err(format!("invalid timeout \"{text}\": it must be more than 0"));
    }
    Ok(timeout)
}

/// Parses "1500ms", "90s", "2m", "1h", "1d" or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\": write a number with a unit, e.g. \"90s\", \"1500ms\", \"2m\""))?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => return Err(format!("invalid duration unit \"{other}\" in \"{text}\": use ms, s, m, h or d")),
    };
    let seconds = value * factor;
    if seconds > MAX_DURATION_SECS {
        return Err(format!("invalid duration \"{text}\": longer than the longest allowed, {MAX_DURATION_SECS} seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A size: a number of bytes or a string such as "16MiB", "512KiB", "1GiB", "10MB".
#[derive(Debug, Clone, Copy)]
struct Bytes(u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Bytes(n)),
            Raw::Text(text) => parse_size(&text).map(Bytes).map_err(de::Error::custom),
        }
    }
}

/// Parses "16MiB", "512KiB", "1GiB", "10MB", "100kB" or a bare number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("invalid size \"{text}\": write e.g. \"16MiB\" or a number of bytes"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("invalid size unit \"{other}\" in \"{text}\": use B, KiB, MiB, GiB, kB, MB or GB")),
    };
    value.checked_mul(factor).ok_or_else(|| format!("size \"{text}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("99999999999999999999999999d").unwrap_err().contains("longer than"));
        assert!(parse_timeout("0s").unwrap_err().contains("more than 0"));
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert!(parse_size("16 parsecs").is_err());
    }

    #[test]
    fn the_builtin_configuration_is_valid() {
        let config = Config::parse(BUILTIN_CONFIG, None).expect("built-in services.toml parses");
        assert!(config.services.contains_key("echo"));
    }

    #[test]
    fn a_bad_value_names_file_line_column_and_service() {
        let text = "[services.a]\nplugin = \"template\"\ncommand = \"echo\"\n\n[services.b]\nplugin = \"template\"\ncommand = \"echo\"\ntimeout = \"soon\"\n";
        let err = Config::parse(text, Some(Path::new("/x/services.toml"))).unwrap_err().0;
        assert!(err.contains("/x/services.toml"), "{err}");
        assert!(err.contains("service b"), "{err}");
        assert!(err.contains("line 8"), "{err}");
    }

    #[test]
    fn a_default_model_outside_models_is_refused_with_its_position() {
        let text = "[services.a]\nplugin = \"template\"\ncommand = \"echo\"\nmodels = [\"x\"]\ndefault_model = \"y\"\n";
        let err = Config::parse(text, Some(Path::new("/s.toml"))).unwrap_err().0;
        assert!(err.starts_with("/s.toml:5:17: service a:"), "{err}");
    }

    #[test]
    fn service_policies_override_the_defaults_key_by_key() {
        let text = "[defaults]\nretry = { max_attempts = 5, base_delay = \"2s\" }\nquota = { rpm = 10 }\n[services.a]\nplugin = \"template\"\ncommand = \"echo\"\nretry = { base_delay = \"100ms\", on = [\"auth\"] }\nbreaker = { mode = \"rate\", min_calls = 4 }\n";
        let config = Config::parse(text, None).unwrap();
        let limits = &config.services["a"].limits;
        assert_eq!(limits.retry.max_attempts, 5);
        assert_eq!(limits.retry.base_delay, Duration::from_millis(100));
        assert_eq!(limits.retry.on, vec![FailureKind::Auth]);
        assert_eq!(limits.quota.rpm, Some(10));
        assert_eq!(limits.breaker.mode, BreakerMode::Rate { failure_rate: 0.5, window: Duration::from_secs(60), min_calls: 4 });
    }

    #[test]
    fn the_ledger_lookback_is_a_day_or_the_longest_rate_window() {
        let plain = "[services.a]\nplugin = \"template\"\ncommand = \"echo\"\n";
        assert_eq!(Config::parse(plain, None).unwrap().ledger_lookback(), Duration::from_secs(86_400));
        let windowed = format!("{plain}breaker = {{ mode = \"rate\", window = \"3d\" }}\n");
        assert_eq!(Config::parse(&windowed, None).unwrap().ledger_lookback(), Duration::from_secs(3 * 86_400));
    }

    #[test]
    fn an_unknown_failure_kind_lists_the_kinds() {
        let text = "[services.a]\nplugin = \"template\"\ncommand = \"echo\"\nretry = { on = [\"ratelimited\"] }\n";
        let err = Config::parse(text, None).unwrap_err().0;
        assert!(err.contains("line 4") && err.contains("rate-limited"), "{err}");
    }

    #[test]
    fn service_limits_override_the_defaults() {
        let text = "[defaults]\ntimeout = 10\nmax_output = \"1KiB\"\n[services.a]\nplugin = \"template\"\ncommand = \"echo\"\ntimeout = \"2s\"\n";
        let config = Config::parse(text, None).unwrap();
        let limits = &config.services["a"].limits;
        assert_eq!(limits.timeout, Duration::from_secs(2));
        assert_eq!(limits.max_output, 1024);
        assert_eq!(config.defaults.timeout, Duration::from_secs(10));
    }
}
