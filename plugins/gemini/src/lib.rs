//! The built-in `gemini` plugin: Google's Gemini CLI (`@google/gemini-cli`) in headless JSON
//! mode. The CLI exits with the HTTP status modulo 256 and prints its error JSON on stderr.

use exechost_plugin_sdk::*;
use serde_json::Value;

struct Gemini;

const SETTINGS: &[&str] = &["extra_args", "trust_workspace", "base_url"];

impl Guest for Gemini {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "gemini".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Google Gemini CLI (gemini -p ... -o json)".into(),
            supports_files: true,
            supports_stdin: false,
            needs_file_contents: false,
            models: vec!["gemini-2.5-pro".into(), "gemini-2.5-flash".into()],
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        check_settings(&service, SETTINGS)
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        // Files are named in the prompt as @path; the CLI reads them itself.
        let prompt = prompt_with_at_files(&request);
        // `--prompt=` keeps a prompt that starts with a dash from being read as an option.
        let mut args = vec![format!("--prompt={prompt}"), "--output-format".into(), "json".into()];
        if let Some(model) = model(&service, &request) {
            args.extend(["--model".into(), model]);
        }
        args.extend(setting_list(&service, "extra_args"));
        let mut env = Vec::new();
        if setting_bool(&service, "trust_workspace").unwrap_or(true) {
            env.push(("GEMINI_CLI_TRUST_WORKSPACE".into(), "true".into()));
        }
        if let Some(url) = setting_str(&service, "base_url") {
            env.push(("GOOGLE_GEMINI_BASE_URL".into(), url));
        }
        Ok(Command { args, env, stdin: None })
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        let stdout = text(&output.stdout);
        if exit_code(&output) == Some(0)
            && let Some(json) = embedded_json(&stdout)
            && let Some(answer) = json.get("response").and_then(Value::as_str)
        {
            return Ok(response(&json, answer, model(&service, &request)));
        }
        Err(failed(&service, &output))
    }

    fn health_command(_service: Service) -> Option<Command> {
        version_check()
    }
}

fn response(json: &Value, answer: &str, asked: Option<String>) -> Response {
    // stats.models maps each model used to its token counts; the busiest one answered.
    let models = json.pointer("/stats/models").and_then(Value::as_object);
    let busiest = models.and_then(|m| {
        m.iter().max_by_key(|(_, v)| u64_at(v, &["api", "totalRequests"]).unwrap_or(0)).map(|(name, v)| (name.clone(), v.clone()))
    });
    let usage = models.map(|m| {
        let sum = |key: &str| m.values().filter_map(|v| u64_at(v, &["tokens", key])).reduce(|a, b| a + b);
        Usage { input: sum("prompt"), output: sum("candidates"), total: sum("total"), cached: sum("cached"), reasoning: sum("thoughts") }
    });
    Response { text: answer.to_string(), model: busiest.map(|(name, _)| name).or(asked), usage, cost_usd: None }
}

/// The error JSON the CLI prints last on stderr: `{"session_id", "error": {type, message, code}}`.
fn error_json(stderr: &str) -> Option<Value> {
    stderr
        .match_indices('{')
        .filter(|(i, _)| *i == 0 || stderr.as_bytes()[i - 1] == b'\n')
        .filter_map(|(i, _)| embedded_json(&stderr[i..])).rfind(|v| v.get("error").is_some())
}

fn failed(service: &Service, output: &Output) -> Failure {
    let stderr = text(&output.stderr);
    let code = exit_code(output);
    let hint = |kind: FailureKind| match kind {
        FailureKind::Auth => Some("not authenticated: set GEMINI_API_KEY or run `gemini` once to log in".to_string()),
        _ => None,
    };
    if code == Some(55) || stderr.contains("not running in a trusted directory") {
        return failure(
            FailureKind::InvalidRequest,
            format!("{}: the folder is not trusted by gemini: keep settings.trust_workspace = true, or trust the folder in gemini", service.name),
        );
    }
    if let Some(error) = error_json(&stderr).and_then(|j| j.get("error").cloned()) {
        let mut message = error.get("message").and_then(Value::as_str).unwrap_or("error").to_string();
        // A provider error arrives as its raw JSON body inside the message.
        if let Some(inner) = embedded_json(&message).and_then(|j| j.pointer("/error/message").and_then(Value::as_str).map(str::to_string)) {
            message = inner;
        }
        let status = error.get("code").and_then(Value::as_u64).filter(|c| *c >= 100);
        let status = status.or_else(|| code.filter(|c| *c == 41).map(|_| 401));
        return classified(service, &message, status, hint);
    }
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let message = format!("`{}` {}: {}", service.command, how_it_ended(output), last);
    classified(service, &message, code.filter(|c| *c == 41).map(|_| 401), hint)
}

export!(Gemini with_types_in exechost_plugin_sdk);

#[cfg(test)]
mod tests;
