//! Bindings for the `exechost:service` contract (wit/) and helpers shared by the plugins for
//! the AI CLIs: building failures, reading JSON out of noisy output, spotting HTTP statuses.
//!
//! A plugin crate implements [`Guest`] and calls
//! `exechost_plugin_sdk::export!(MyPlugin with_types_in exechost_plugin_sdk);`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "service-plugin",
    pub_export_macro: true,
    default_bindings_module: "exechost_plugin_sdk",
});

pub use exechost::service::types::{
    Command, ExitStatus, Failure, FailureKind, File, Output, PluginInfo, Request, Response, Service, Usage,
};
pub use exports::exechost::service::plugin::Guest;

/// A failure of `kind` with `message`.
pub fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure { kind, message: message.into(), retry_after_ms: None }
}

/// The service's settings as a JSON object (empty when absent or not an object).
pub fn settings(service: &Service) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(&service.settings) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// A string setting.
pub fn setting_str(service: &Service, key: &str) -> Option<String> {
    settings(service).get(key).and_then(|v| v.as_str()).map(str::to_string)
}

/// A list-of-strings setting (empty when absent).
pub fn setting_list(service: &Service, key: &str) -> Vec<String> {
    settings(service)
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// A boolean setting.
pub fn setting_bool(service: &Service, key: &str) -> Option<bool> {
    settings(service).get(key).and_then(|v| v.as_bool())
}

/// Checks that the settings hold only `known` keys; the error names the first stranger.
pub fn check_settings(service: &Service, known: &[&str]) -> Result<(), String> {
    if !service.settings.trim().is_empty() && serde_json::from_str::<serde_json::Value>(&service.settings).map(|v| !v.is_object()).unwrap_or(true) {
        return Err("settings must be a table".into());
    }
    match settings(service).keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(format!("settings: unknown key `{key}`; known keys: {}", known.join(", "))),
        None => Ok(()),
    }
}

/// The model to ask for: the request's, else the service's default.
pub fn model(service: &Service, request: &Request) -> Option<String> {
    request.model.clone().or_else(|| service.default_model.clone())
}

/// Output bytes as text, invalid UTF-8 replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every JSON value that stands alone on a line or spans the whole text: the whole text
/// first, then each line that parses.
pub fn json_values(text: &str) -> Vec<serde_json::Value> {
    if let Ok(value) = serde_json::from_str(text.trim()) {
        return vec![value];
    }
    text.lines().filter_map(|l| serde_json::from_str(l.trim()).ok()).collect()
}

/// The first JSON object embedded in `text` (after any noise before its `{`).
pub fn embedded_json(text: &str) -> Option<serde_json::Value> {
    let start = text.find('{')?;
    let mut de = serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
    de.next()?.ok()
}

/// A u64 at a JSON path.
pub fn u64_at(value: &serde_json::Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_u64()
}

/// The failure kind an HTTP status means.
pub fn kind_for_status(status: u64) -> FailureKind {
    match status {
        429 => FailureKind::RateLimited,
        401 | 403 => FailureKind::Auth,
        400 | 404 | 413 | 422 => FailureKind::InvalidRequest,
        408 | 500..=599 => FailureKind::Transient,
        _ => FailureKind::Other,
    }
}

/// Classifies an error message by the words the CLIs use.
pub fn kind_for_text(message: &str) -> FailureKind {
    let m = message.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
    if has(&["429", "rate limit", "too many requests", "rate_limit", "resource_exhausted", "exceeded retry limit"]) {
        FailureKind::RateLimited
    } else if has(&["insufficient_quota", "quota exceeded", "billing"]) {
        FailureKind::QuotaExhausted
    } else if has(&["401", "403", "unauthorized", "unauthenticated", "invalid api key", "api key not valid", "not logged in", "authentication", "auth method", "no key found", "missing api key", "auth type"]) {
        FailureKind::Auth
    } else if has(&["model not found", "unknown model", "does not exist", "400 bad request", "invalid_request"]) {
        FailureKind::InvalidRequest
    } else if has(&[
        "500", "502", "503", "504", "529", "overloaded", "internal server error", "server error", "high demand",
        "unavailable", "connection", "fetch failed", "econnrefused", "timed out", "timeout", "network",
    ]) {
        FailureKind::Transient
    } else {
        FailureKind::Other
    }
}

/// "retry after 7 seconds", "Retry-After: 7", "retry in 7s", "retryDelay": "7s" → milliseconds.
pub fn retry_after_ms(message: &str) -> Option<u64> {
    let m = message.to_lowercase();
    for marker in ["retry-after:", "retry after", "retry in", "retrydelay\":\"", "retrydelay\": \"", "try again in"] {
        let Some(at) = m.find(marker) else { continue };
        let rest = m[at + marker.len()..].trim_start();
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let Ok(value) = digits.parse::<f64>() else { continue };
        let unit = rest[digits.len()..].trim_start();
        let ms = if unit.starts_with("ms") { value } else { value * 1000.0 };
        return Some(ms.round() as u64);
    }
    None
}

/// A classified failure from an error message, with any retry-after it mentions.
pub fn classified(service: &Service, message: &str, status: Option<u64>, hint: impl Fn(FailureKind) -> Option<String>) -> Failure {
    let kind = status.map(kind_for_status).filter(|k| *k != FailureKind::Other).unwrap_or_else(|| kind_for_text(message));
    let mut text = format!("{}: {}", service.name, one_line(message));
    if let Some(hint) = hint(kind) {
        text.push_str(": ");
        text.push_str(&hint);
    }
    Failure { kind, message: text, retry_after_ms: retry_after_ms(message) }
}

/// At most 400 characters of `text` on one line.
pub fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.chars().count() <= 400 {
        joined
    } else {
        format!("{}...", joined.chars().take(400).collect::<String>())
    }
}

/// The prompt with each file named as ` @/path`, the way gemini, qwen and claude take files.
pub fn prompt_with_at_files(request: &Request) -> String {
    let mut prompt = request.prompt.clone();
    for file in &request.files {
        prompt.push_str(&format!(" @{}", file.path));
    }
    prompt
}

/// The health check every CLI supports: `--version` (no model call, no cost).
pub fn version_check() -> Option<Command> {
    Some(Command { args: vec!["--version".into()], env: Vec::new(), stdin: None })
}

/// The exit code, or `None` for a signal.
pub fn exit_code(output: &Output) -> Option<i32> {
    match output.status {
        ExitStatus::Code(c) => Some(c),
        ExitStatus::Signal(_) => None,
    }
}

/// "exited with code 3" / "was killed by signal 9".
pub fn how_it_ended(output: &Output) -> String {
    match output.status {
        ExitStatus::Code(c) => format!("exited with code {c}"),
        ExitStatus::Signal(s) => format!("was killed by signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_statuses_classify() {
        assert_eq!(kind_for_status(429), FailureKind::RateLimited);
        assert_eq!(kind_for_status(503), FailureKind::Transient);
        assert_eq!(kind_for_text("Error: Error code: 401 - Invalid API key"), FailureKind::Auth);
        assert_eq!(kind_for_text("Connection error."), FailureKind::Transient);
        assert_eq!(retry_after_ms("Please retry in 2.5s"), Some(2500));
    }

    #[test]
    fn json_is_found_in_noisy_output() {
        let noisy = "Warning: something\n{\"a\": {\"b\": 3}}\ntrailing";
        assert_eq!(u64_at(&embedded_json(noisy).unwrap(), &["a", "b"]), Some(3));
        assert_eq!(json_values("{\"x\":1}\n{\"x\":2}\n").len(), 2);
    }
}

/// Helpers for the plugins' own tests.
pub mod testing {
    use super::*;

    /// A service entry as the host would hand it over.
    pub fn service(name: &str, settings: &str) -> Service {
        Service {
            name: name.into(),
            command: name.into(),
            default_model: None,
            models: Vec::new(),
            settings: settings.into(),
        }
    }

    /// A request with just a prompt.
    pub fn request(prompt: &str) -> Request {
        Request { prompt: prompt.into(), files: Vec::new(), model: None, options: Vec::new() }
    }

    /// A recorded run of the real CLI from the plugin's fixtures/ folder:
    /// `recorded!("429")` reads fixtures/429.stdout, .stderr and .code.
    #[macro_export]
    macro_rules! recorded {
        ($case:literal) => {
            $crate::Output {
                status: $crate::ExitStatus::Code(
                    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/", $case, ".code")).trim().parse().unwrap(),
                ),
                stdout: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/", $case, ".stdout")).to_vec(),
                stderr: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/", $case, ".stderr")).to_vec(),
                duration_ms: 1000,
                stdout_truncated: false,
                stderr_truncated: false,
            }
        };
    }

    /// The tests every CLI plugin passes: its recorded runs parse to the right answers and
    /// failure kinds, a prompt that looks like an option stays one argument, the model is the
    /// requested one else the default, unknown settings are reported.
    /// `plugin_tests!(Gemini, "gemini");` in the plugin's test module.
    #[macro_export]
    macro_rules! plugin_tests {
        ($plugin:ty, $name:literal) => {
            use $crate::testing::{check_recorded, request, service};
            use $crate::{FailureKind, Guest, recorded};

            #[test]
            fn recorded_runs_parse_to_answers_and_classified_failures() {
                check_recorded::<$plugin>(
                    $name,
                    &[
                        ("ok", recorded!("ok"), None),
                        ("429", recorded!("429"), Some(FailureKind::RateLimited)),
                        ("401", recorded!("401"), Some(FailureKind::Auth)),
                        ("500", recorded!("500"), Some(FailureKind::Transient)),
                        ("down", recorded!("down"), Some(FailureKind::Transient)),
                    ],
                );
            }

            #[test]
            fn a_prompt_that_looks_like_an_option_stays_one_argument() {
                let prompt = "--help me\nwith \"this\" $(and that)";
                let command = <$plugin>::build_command(service($name, "{}"), request(prompt)).unwrap();
                assert_eq!(command.args.iter().filter(|a| a.contains("$(and that)")).count(), 1, "{:?}", command.args);
                assert!(!command.args.iter().any(|a| a == "--help" || a == "--help me"), "{:?}", command.args);
            }

            #[test]
            fn the_model_is_the_requested_one_else_the_default() {
                let mut svc = service($name, "{}");
                svc.default_model = Some("default-m".into());
                let args = <$plugin>::build_command(svc.clone(), request("hi")).unwrap().args;
                assert!(args.iter().any(|a| a == "default-m"), "{args:?}");
                let mut req = request("hi");
                req.model = Some("asked-m".into());
                let args = <$plugin>::build_command(svc, req).unwrap().args;
                assert!(args.iter().any(|a| a == "asked-m") && !args.iter().any(|a| a == "default-m"), "{args:?}");
            }

            #[test]
            fn unknown_settings_are_reported() {
                let err = <$plugin>::validate(service($name, r#"{"extra_argz": []}"#)).unwrap_err();
                assert!(err.contains("extra_argz"), "{err}");
            }
        };
    }

    /// Checks a plugin's parser against its recorded runs: the answer and usage of `ok`, and
    /// the failure kind of each error case.
    pub fn check_recorded<P: Guest>(name: &str, runs: &[(&str, Output, Option<FailureKind>)]) {
        let service = service(name, "{}");
        for (case, output, expected) in runs {
            let parsed = P::parse_output(service.clone(), request("hi"), output.clone());
            match (expected, parsed) {
                (None, Ok(response)) => {
                    assert_eq!(response.text, "MOCK_ANSWER: hello from the mock server.", "{case}");
                    let usage = response.usage.expect("usage");
                    assert_eq!((usage.input, usage.output, usage.total), (Some(123), Some(45), Some(168)), "{case}");
                }
                (Some(kind), Err(failure)) => {
                    assert_eq!(failure.kind, *kind, "{case}: {}", failure.message);
                    assert!(failure.message.starts_with(&format!("{name}: ")), "{case}: {}", failure.message);
                }
                (expected, got) => panic!("{case}: expected {expected:?}, got {got:?}"),
            }
        }
    }
}
