//! The built-in `codex` plugin: OpenAI's Codex CLI (`@openai/codex`) as `codex exec --json`.
//! It has no @file syntax: the host hands over the files' contents and the plugin sends them
//! on stdin, which codex appends to the prompt. Failures arrive as a `turn.failed` event.

use exechost_plugin_sdk::*;
use serde_json::Value;

struct Codex;

const SETTINGS: &[&str] = &["extra_args", "provider", "cli_retries"];

impl Guest for Codex {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "codex".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "OpenAI Codex CLI (codex exec --json)".into(),
            supports_files: true,
            supports_stdin: true,
            needs_file_contents: true,
            models: vec!["gpt-6.2-sol".into()],
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        check_settings(&service, SETTINGS)
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        let mut args: Vec<String> = vec!["exec".into(), "--skip-git-repo-check".into(), "--ephemeral".into(), "--json".into()];
        if let Some(model) = model(&service, &request) {
            args.extend(["--model".into(), model]);
        }
        // Codex retries inside each turn; only the host should retry.
        let provider = setting_str(&service, "provider").unwrap_or_else(|| "openai".into());
        let retries = settings(&service).get("cli_retries").and_then(Value::as_u64).unwrap_or(0);
        for knob in ["request_max_retries", "stream_max_retries"] {
            args.extend(["--config".into(), format!("model_providers.{provider}.{knob}={retries}")]);
        }
        args.extend(setting_list(&service, "extra_args"));
        args.extend(["--".into(), request.prompt.clone()]);
        let stdin = if request.files.is_empty() {
            None
        } else {
            let mut input = Vec::new();
            for file in &request.files {
                input.extend_from_slice(format!("--- {} ---\n", file.path).as_bytes());
                input.extend_from_slice(file.contents.as_deref().unwrap_or_default());
                input.extend_from_slice(b"\n");
            }
            Some(input)
        };
        Ok(Command { args, env: Vec::new(), stdin })
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        let stdout = text(&output.stdout);
        let events = json_values(&stdout);
        let hint = |kind: FailureKind| match kind {
            FailureKind::Auth => Some("not authenticated: set the provider's API key (CODEX_API_KEY for OpenAI) or run `codex login`".to_string()),
            _ => None,
        };
        let of_type = |t: &'static str| events.iter().filter(move |e| e.get("type").and_then(Value::as_str) == Some(t));
        if let Some(failed) = of_type("turn.failed").next_back() {
            let message = failed.pointer("/error/message").and_then(Value::as_str).unwrap_or("the turn failed");
            return Err(classified(&service, message, status_in(message), hint));
        }
        let answer = of_type("item.completed")
            .filter_map(|e| e.get("item"))
            .filter(|i| i.get("type").and_then(Value::as_str) == Some("agent_message"))
            .filter_map(|i| i.get("text").and_then(Value::as_str))
            .next_back();
        let (Some(answer), Some(0)) = (answer, exit_code(&output)) else {
            let said = of_type("error").filter_map(|e| e.get("message").and_then(Value::as_str)).next_back().map(str::to_string);
            let said = said.unwrap_or_else(|| text(&output.stderr).lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string());
            let message = format!("`{}` {}: {said}", service.command, how_it_ended(&output));
            return Err(classified(&service, &message, status_in(&said), hint));
        };
        let usage = of_type("turn.completed").filter_map(|e| e.get("usage")).next_back().map(|u| {
            let (input, output) = (u64_at(u, &["input_tokens"]), u64_at(u, &["output_tokens"]));
            Usage {
                input,
                output,
                total: input.zip(output).map(|(i, o)| i + o),
                cached: u64_at(u, &["cached_input_tokens"]),
                reasoning: u64_at(u, &["reasoning_output_tokens"]),
            }
        });
        Ok(Response { text: answer.to_string(), model: model(&service, &request), usage, cost_usd: None })
    }

    fn health_command(_service: Service) -> Option<Command> {
        version_check()
    }
}

/// "last status: 429 Too Many Requests", "unexpected status 401 Unauthorized" → the status.
fn status_in(message: &str) -> Option<u64> {
    let at = message.find("status")?;
    let rest = message[at + "status".len()..].trim_start_matches([':', ' ']);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|s| (100..600).contains(s))
}

export!(Codex with_types_in exechost_plugin_sdk);

#[cfg(test)]
mod tests;
