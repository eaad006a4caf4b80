//! The result types of a request: outcome, classified failure, token usage.

use serde::Serialize;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    RateLimited,
    QuotaExhausted,
    Auth,
    Transient,
    Timeout,
    InvalidRequest,
    NotInstalled,
    PluginError,
    Other,
    /// The service's circuit breaker is open: nothing was run.
    CircuitOpen,
    /// The user interrupted the run.
    Cancelled,
}

impl FailureKind {
    /// Every kind with its name as written in output and configuration.
    pub const ALL: [(FailureKind, &'static str); 11] = [
        (FailureKind::RateLimited, "rate-limited"),
        (FailureKind::QuotaExhausted, "quota-exhausted"),
        (FailureKind::Auth, "auth"),
        (FailureKind::Transient, "transient"),
        (FailureKind::Timeout, "timeout"),
        (FailureKind::InvalidRequest, "invalid-request"),
        (FailureKind::NotInstalled, "not-installed"),
        (FailureKind::PluginError, "plugin-error"),
        (FailureKind::Other, "other"),
        (FailureKind::CircuitOpen, "circuit-open"),
        (FailureKind::Cancelled, "cancelled"),
    ];

    pub fn as_str(self) -> &'static str {
        FailureKind::ALL.iter().find(|(k, _)| *k == self).map_or("other", |(_, name)| name)
    }

    /// Parses a kind's name; the error lists the valid names.
    pub fn parse(name: &str) -> Result<FailureKind, String> {
        FailureKind::ALL.iter().find(|(_, n)| *n == name).map(|(k, _)| *k).ok_or_else(|| {
            let names: Vec<&str> = FailureKind::ALL.iter().map(|(_, n)| *n).collect();
            format!("unknown failure kind `{name}`; kinds are: {}", names.join(", "))
        })
    }
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into(), retry_after_ms: None }
    }
}

/// Token usage of a request; `estimated` when the service reported none and the host
/// counted about 4 characters a token.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tokens {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<u64>,
    pub estimated: bool,
}

/// The result of a request to a service, successful or not.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub service: String,
    pub success: bool,
    pub text: Option<String>,
    pub model: Option<String>,
    pub tokens: Tokens,
    pub cost_usd: Option<f64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub attempts: u32,
    pub truncated: bool,
    pub error: Option<Failure>,
    pub stdout: String,
    pub stderr: String,
    /// With failover: the services tried before this one, and why each failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<Tried>,
}

/// A service that failover tried and left.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tried {
    pub service: String,
    pub kind: FailureKind,
    pub message: String,
}

impl Outcome {
    /// An outcome for a request that failed before or without a finished process.
    pub fn failed(service: &str, failure: Failure) -> Outcome {
        Outcome {
            service: service.to_string(),
            success: false,
            text: None,
            model: None,
            tokens: Tokens::default(),
            cost_usd: None,
            exit_code: None,
            signal: None,
            duration_ms: 0,
            attempts: 1,
            truncated: false,
            error: Some(failure),
            stdout: String::new(),
            stderr: String::new(),
            tried: Vec::new(),
        }
    }
}

